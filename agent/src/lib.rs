//! zerotel: zero-code distributed tracing from the kernel.
//!
//! Pipeline: kernel hooks -> capture (ring buffer) -> assemble (connections, HTTP, spans, process
//! metadata) -> export (OTLP or console), stages joined by bounded queues. The binary (main.rs)
//! wires the stages together; the modules it names are public for that, the rest stay inside.

pub mod capture;
mod clock;
pub mod config;
mod conn;
mod context;
pub mod discovery;
pub mod export;
pub mod kubernetes;
pub mod probes;
mod protocols;
pub mod spans;
pub mod telemetry;

#[cfg(any(fuzzing, test))]
pub mod fuzzing;
