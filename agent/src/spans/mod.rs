//! Span assembly: protocol messages in, spans with ids, parents and semantics out.

pub mod assemble;
pub mod db;
pub mod http;
pub mod messaging;
pub mod model;
pub mod rpc;
