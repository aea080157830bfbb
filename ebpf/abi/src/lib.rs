//! The contract between zerotel's kernel programs and its agent.
//!
//! Every event starts with an [`EventHeader`]; its `kind` says which struct follows. All structs are
//! `#[repr(C)]` with explicit padding so both sides agree byte for byte. The `user` feature adds the
//! userspace-only parts (aya `Pod` impls and decoding).
#![no_std]

pub mod conn;
pub mod event;
pub mod offsets;
#[cfg(feature = "user")]
pub mod user;

pub use conn::*;
pub use event::*;
pub use offsets::KernelOffsets;

/// Names of the maps and globals the agent looks up in the object file.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const TRACED_PIDS: &str = "TRACED_PIDS";
    pub const CONNS: &str = "CONNS";
    pub const IN_FLIGHT: &str = "IN_FLIGHT";
    pub const THREAD_CONTEXT: &str = "THREAD_CONTEXT";
    pub const COUNTERS: &str = "COUNTERS";
    pub const TRACE_ALL: &str = "TRACE_ALL";
    pub const AGENT_PID: &str = "AGENT_PID";
    pub const PROPAGATE: &str = "PROPAGATE";
    pub const INJECT_SOCKS: &str = "INJECT_SOCKS";
    pub const OFFSETS: &str = "OFFSETS";
}

/// Bound of every map, in entries (the ring buffer in bytes).
pub mod limits {
    /// Ring buffer size: 8 MiB holds about 7k captured heads (150 ms at 100k events/s) while the
    /// agent, which drains every 20 ms, catches up. Its pages count twice in the agent's RSS.
    pub const EVENTS_BYTES: u32 = 8 << 20;
    pub const TRACED_PIDS: u32 = 16_384;
    pub const CONNS: u32 = 65_536;
    pub const IN_FLIGHT_SYSCALLS: u32 = 16_384;
    /// Threads serving a request at once.
    pub const THREAD_CONTEXTS: u32 = 16_384;
}

/// Indices of the per-CPU counters the agent reads for its metrics.
pub mod counters {
    /// Events the ring buffer had no room for.
    pub const EVENTS_LOST: u32 = 0;
    /// Data syscalls on tracked connections whose bytes could not be read.
    pub const CAPTURE_FAILED: u32 = 1;
    pub const COUNT: u32 = 2;
}
