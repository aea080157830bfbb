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

/// The trace sampler, decided from the trace id so every agent and the injected flag agree
/// (OpenTelemetry's TraceIdRatioBased: the id's last 8 bytes, big-endian, below a threshold).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    /// Sampled when the id's last 8 bytes are below this; u64::MAX samples everything.
    pub threshold: u64,
    /// 1: a span with a parent follows the parent's sampled flag.
    pub parent_based: u8,
    pub _pad: [u8; 7],
}

impl Sampler {
    pub const ALWAYS_ON: Self = Self { threshold: u64::MAX, parent_based: 1, _pad: [0; 7] };

    /// W3C flags for a span in `trace_id`, given its parent's flags when it has a parent.
    #[inline(always)]
    pub fn flags(&self, trace_id: &[u8; 16], parent_flags: Option<u8>) -> u8 {
        match parent_flags {
            Some(flags) if self.parent_based != 0 => flags & SAMPLED,
            _ => u8::from(self.samples(trace_id)),
        }
    }

    #[inline(always)]
    pub fn samples(&self, trace_id: &[u8; 16]) -> bool {
        if self.threshold == u64::MAX {
            return true;
        }
        let low = u64::from_be_bytes([
            trace_id[8], trace_id[9], trace_id[10], trace_id[11], trace_id[12], trace_id[13], trace_id[14], trace_id[15],
        ]);
        low < self.threshold
    }
}

/// W3C trace flag: sampled.
pub const SAMPLED: u8 = 0x01;

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
    pub const SAMPLER: &str = "SAMPLER";
    pub const INJECT_SOCKS: &str = "INJECT_SOCKS";
    pub const OFFSETS: &str = "OFFSETS";
}

/// Bound of every map, in entries (the ring buffer in bytes).
pub mod limits {
    /// Ring buffer size: 8 MiB holds about 7k captured heads (150 ms at 100k events/s) while the
    /// agent, which drains every 20 ms, catches up. Its pages count twice in the agent's RSS.
    pub const EVENTS_BYTES: u32 = 8 << 20;
    /// Processes and their threads (fork cannot tell them apart): a node's worth of both.
    pub const TRACED_PIDS: u32 = 65_536;
    /// TRACED_PIDS value until the process's first traced syscall records its cgroup v2 id.
    pub const CGROUP_UNRECORDED: u64 = 0;
    pub const CONNS: u32 = 65_536;
    pub const IN_FLIGHT_SYSCALLS: u32 = 16_384;
    /// Threads serving a request at once.
    pub const THREAD_CONTEXTS: u32 = 16_384;
    /// Processes serving requests at once.
    pub const SERVING_PROCESSES: u32 = 16_384;
    /// OpenSSL calls in flight (one per thread), and `SSL*` objects whose socket is known. Also
    /// the threads' last TLS read and held plaintext write of memory-BIO programs.
    pub const TLS_CALLS: u32 = 16_384;
    pub const TLS_SOCKETS: u32 = 65_536;
    /// Trace contexts waiting to leave in, or read from, a TCP header option (`tcp_option`).
    pub const TCP_OPTION_CONTEXTS: u32 = 65_536;
    /// HTTP/2 streams traced servers serve at once (past it, the oldest are forgotten, and their
    /// processes never count as serving exactly one request again until their connections close).
    pub const H2_SERVER_STREAMS: u32 = 65_536;
}

/// Indices of the per-CPU counters the agent reads for its metrics.
pub mod counters {
    /// Events the ring buffer had no room for.
    pub const EVENTS_LOST: u32 = 0;
    /// Data syscalls on tracked connections whose bytes could not be read.
    pub const CAPTURE_FAILED: u32 = 1;
    /// Connection and data events queued for the agent (process events excluded): what traced
    /// processes cost, and zero for processes that are not traced.
    pub const TRAFFIC_EVENTS: u32 = 2;
    pub const COUNT: u32 = 3;
}
