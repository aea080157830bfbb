//! Per-connection state the kernel keeps in `CONNS`, keyed by [`conn_key`].

/// Which end of the connection the traced process is.
pub mod role {
    /// Accepted: the process serves requests.
    pub const SERVER: u8 = 1;
    /// Connected: the process sends requests.
    pub const CLIENT: u8 = 2;
}

/// What the kernel has classified the connection's bytes as.
pub mod protocol {
    /// No payload seen yet.
    pub const UNKNOWN: u8 = 0;
    pub const HTTP1: u8 = 1;
    /// PostgreSQL frontend/backend protocol 3.
    pub const POSTGRES: u8 = 2;
    /// Kafka, client side: its whole byte stream (up to a cap per syscall) goes to the agent.
    pub const KAFKA: u8 = 3;
    /// HTTP/2 with prior knowledge (h2c, gRPC), either role: its whole byte stream goes to the
    /// agent, whose HPACK decoders need every header block.
    pub const HTTP2: u8 = 4;
    /// Something zerotel does not parse: its bytes stay in the kernel.
    pub const OTHER: u8 = 255;
}

/// Ids of connections the agent found open at start-up have this bit set (the kernel's never
/// do): their first bytes are mid-stream.
pub const SEEDED_CONN_ID_BIT: u64 = 1 << 63;

/// Byte direction, seen from the traced process.
pub mod direction {
    /// Written by the process (write, send*, sendfile, splice out).
    pub const EGRESS: u8 = 0;
    /// Read by the process (read, recv*, splice in).
    pub const INGRESS: u8 = 1;
}

/// `CONNS` key: the process (tgid) and its file descriptor.
#[inline(always)]
pub const fn conn_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// `CONNS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// Unique for the agent's lifetime; events name their connection by it.
    pub conn_id: u64,
    /// Bytes moved so far per [`direction`]: lets the agent see lost events as gaps.
    pub seq: [u64; 2],
    pub role: u8,
    pub protocol: u8,
    /// Per direction: the previous segment was a small captured one, so the next may continue a head.
    pub capture_next: [u8; 2],
    /// A client sent a request and has not read a byte of the answer yet: its next sends are that
    /// request's body, which propagation must never touch.
    pub request_outstanding: u8,
    /// PostgreSQL: still in the startup phase (untyped messages; an SSLRequest's answer is one byte).
    pub pg_startup: u8,
    /// 1 once the connection is known to carry TLS: its syscalls move ciphertext, which is only
    /// counted; `protocol` and everything after it describe the plaintext the OpenSSL uprobes see.
    pub tls: u8,
    pub _pad: u8,
    /// PostgreSQL, per direction: where the stream stands between two syscalls.
    pub pg: [PgStream; 2],
    /// HTTP/2 client, outgoing: where the frames stand for `traceparent` injection.
    pub h2_out: H2Outgoing,
    /// HTTP/2 server: where the frames stand, and which requests are being served.
    pub h2_server: H2Serving,
    /// [`socket_key`] of the connection as this end sees it: how `sock_ops`, which knows
    /// sockets and not file descriptors, finds the trace context a TCP option carries.
    pub socket_key: u64,
}

/// A connection as one end sees it: its port, the peer's port and (the last 4 bytes of an IPv6)
/// address. `family` is AF_INET (2) or AF_INET6 (10); addresses and ports in host order.
#[inline(always)]
pub const fn socket_key(family: u16, local_port: u16, remote_port: u16, remote_addr: &[u8; 16]) -> u64 {
    let at = if family == 10 { 12 } else { 0 };
    let addr = u32::from_be_bytes([remote_addr[at], remote_addr[at + 1], remote_addr[at + 2], remote_addr[at + 3]]);
    ((local_port as u64) << 48) | ((remote_port as u64) << 32) | addr as u64
}

/// What the kernel follows of a traced HTTP/2 server's connection (in its stream chunks): the
/// streams its client opened and the server has not ended yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Serving {
    /// Per [`direction`]: where the frames stand.
    pub frames: [FrameCursor; 2],
    /// Streams opened and not ended yet, also counted in the process's `PROCESS_SERVING` entry
    /// (changed atomically: the connection's reads and writes may run at once).
    pub open: u64,
    /// The highest stream id a request used: a larger one opens a stream.
    pub last_stream: u32,
    /// Bytes went unseen: the frames cannot be followed; `open` stays counted until the close.
    pub lost: u8,
    pub _pad: [u8; 3],
}

/// Where a walk over HTTP/2 frames stands between two chunks of one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCursor {
    /// Stream offset of the next byte the walk expects: a chunk starting elsewhere means bytes
    /// were not seen.
    pub next: u64,
    /// Bytes of the current frame still to come before the next frame header.
    pub skip: u32,
    /// The first bytes of a frame header split between two chunks, and how many.
    pub held: [u8; 9],
    pub held_len: u8,
    pub _pad: [u8; 2],
}

/// Where a traced HTTP/2 client's outgoing frames stand between two sends (kept by sk_msg).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Outgoing {
    /// Bytes of the current frame still to come before the next frame header.
    pub skip: u32,
    /// The highest stream id a HEADERS frame used: a larger one opens a stream.
    pub last_stream: u32,
    /// [`h2_out`] bits.
    pub state: u8,
    pub _pad: [u8; 7],
}

/// [`H2Outgoing::state`] bits.
pub mod h2_out {
    /// The client connection preface has been sent.
    pub const PREFACE_SENT: u8 = 1;
    /// Never inject on this connection again: the application propagates itself (a
    /// `traceparent` literal was seen), or the frames could not be followed.
    pub const OFF: u8 = 2;
}

/// Where a PostgreSQL byte stream stands at the end of a syscall, so the next one starts on a
/// message boundary.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgStream {
    /// Bytes of the current message still to come before the next header.
    pub skip: u32,
    /// Bulk messages (DataRow, CopyData) not reported yet.
    pub bulk: u32,
    /// The first bytes of a header split across syscalls, and how many.
    pub partial: [u8; 4],
    pub partial_len: u8,
    pub _pad: [u8; 3],
}

/// How the exit program finds the bytes of a call ([`InFlight::buffer`]).
pub mod buffer {
    /// `buf` is the data.
    pub const PLAIN: u8 = 0;
    /// `buf` is a `struct iovec *`.
    pub const IOVEC: u8 = 1;
    /// `buf` is a `struct user_msghdr *`.
    pub const MSGHDR: u8 = 2;
    /// No user buffer (sendfile, splice): byte count only.
    pub const NONE: u8 = 3;
    /// connect(): no data; the exit program tracks the socket.
    pub const CONNECT: u8 = 4;
    /// No call in flight: the thread's last call returned. Its entry is kept for the next call.
    pub const IDLE: u8 = 5;
}

/// `IN_FLIGHT` value: a syscall's arguments from entry to exit, by pid_tgid. The agent also writes
/// it for threads that were already blocked in a call when it attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub buf: u64,
    pub start_ns: u64,
    pub fd: u32,
    /// [`direction`].
    pub direction: u8,
    /// [`buffer`].
    pub buffer: u8,
    pub _pad: [u8; 2],
}
