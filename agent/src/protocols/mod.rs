//! Protocol parsers: pure (bytes in, messages out), never panic, tests beside each.

pub mod http1;
pub mod http2;
pub mod kafka;
pub mod postgres;
#[cfg(test)]
pub mod replay;
pub mod sql;
#[cfg(test)]
pub mod test_rng;
