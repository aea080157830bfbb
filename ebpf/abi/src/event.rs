//! Events sent through the `EVENTS` ring buffer.

/// Bytes of payload a data event carries at most (a power of two: the verifier bounds reads with it).
pub const MAX_CAPTURE: usize = 1024;

/// `EventHeader::kind` values.
pub mod kind {
    pub const CONN_OPEN: u32 = 1;
    /// A data syscall whose bytes were not captured (body bytes): [`super::DataMeta`] alone.
    pub const DATA_META: u32 = 2;
    /// A data syscall with its first bytes: [`super::DataEvent`].
    pub const DATA: u32 = 3;
    pub const CONN_CLOSE: u32 = 4;
    pub const PROCESS_EXEC: u32 = 5;
    pub const PROCESS_EXIT: u32 = 6;
    /// One PostgreSQL message of a traced connection: [`super::PgMessageEvent`].
    pub const PG_MESSAGE: u32 = 7;
    /// A piece of a connection's byte stream, for protocols the agent frames itself (Kafka): a
    /// [`super::StreamChunkHead`] and `captured` bytes.
    pub const STREAM_CHUNK: u32 = 8;
    /// sk_msg put a `traceparent` into a traced client's HTTP/2 request: [`super::H2StreamIdsEvent`]
    /// with its CLIENT span's ids.
    pub const H2_INJECTED: u32 = 9;
    /// A traced HTTP/2 server read a request's HEADERS frame: [`super::H2StreamIdsEvent`] with
    /// its SERVER span's ids (the parent of what the process sends while it serves only this one).
    pub const H2_SERVED: u32 = 10;
    /// A traced connection carries TLS: [`super::ConnTlsEvent`]. Its data events from now on are
    /// the plaintext OpenSSL read or wrote.
    pub const CONN_TLS: u32 = 11;
}

/// A tracked connection turned out to carry TLS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnTlsEvent {
    pub header: EventHeader,
    pub conn_id: u64,
}

/// The ids the kernel decided for the HTTP/2 stream `stream_id` ([`kind::H2_INJECTED`],
/// [`kind::H2_SERVED`]); sent before the stream's bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2StreamIdsEvent {
    pub header: EventHeader,
    pub conn_id: u64,
    pub stream_id: u32,
    pub _pad: u32,
    pub ids: SpanIds,
}

/// Bytes one stream chunk record carries at most (a power of two: the verifier bounds copies
/// with it). The kernel packs the pieces of every iovec into chunks of this size, so a send of
/// a thousand small iovecs costs a few records, not a thousand.
pub const STREAM_CHUNK_BYTES: usize = 8 * 1024;

/// Bytes of one syscall that reach the agent at most, in chunks; the rest is only counted (the
/// agent skips a frame it did not get whole). 1 MiB holds the largest batch a default-configured
/// producer sends (librdkafka `batch.size`, the broker's `message.max.bytes`: both ~1 MB) and a
/// partition's worth of a Fetch (`max.partition.fetch.bytes`).
pub const STREAM_SYSCALL_CAP: u64 = 1 << 20;

/// A piece of one syscall's bytes on a stream-captured connection, followed by `captured` bytes.
/// Pieces of a syscall come in order and name the stream offset where the syscall ends, so the
/// agent tells bytes that were moved but not captured from events that were lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamChunkHead {
    /// `ts_ns`: when the syscall returned.
    pub header: EventHeader,
    pub conn_id: u64,
    /// When the syscall started.
    pub start_ns: u64,
    /// Stream offset (bytes moved in this direction before) of the first byte that follows.
    pub offset: u64,
    /// Stream offset just past the syscall's last byte.
    pub syscall_end: u64,
    /// [`crate::direction`].
    pub direction: u8,
    /// [`crate::protocol`] of the connection.
    pub protocol: u8,
    /// Bytes that follow the head.
    pub captured: u16,
    pub _pad2: u32,
}

/// Body bytes a PostgreSQL message record carries at most (a power of two: the verifier bounds
/// reads with it). Enough for a statement name and most query texts; longer ones are truncated.
pub const PG_BODY: usize = 512;

/// A PostgreSQL message type byte for untyped startup-phase messages (StartupMessage, SSLRequest,
/// CancelRequest, GSSENCRequest: length + code, no type byte).
pub const PG_UNTYPED: u8 = 0;

/// One PostgreSQL message, found by walking the message headers of a syscall's bytes (so message
/// boundaries survive any read size). Bulk messages (DataRow, CopyData) are only counted, in the
/// next record of the same direction. Sent with only `head.captured` bytes of `body`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgMessageEvent {
    pub head: PgMessageHead,
    pub body: [u8; PG_BODY],
}

/// Everything of a [`PgMessageEvent`] but its body.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgMessageHead {
    /// `ts_ns`: when the syscall that moved the message returned.
    pub header: EventHeader,
    pub conn_id: u64,
    /// When that syscall started.
    pub start_ns: u64,
    /// The message's length field (includes itself, not the type byte); 0 for a bare answer byte
    /// to SSLRequest/GSSENCRequest.
    pub len: u32,
    /// Bulk messages in this direction since the previous record.
    pub bulk_before: u32,
    /// [`crate::direction`].
    pub direction: u8,
    /// The type byte, or [`PG_UNTYPED`].
    pub msg_type: u8,
    /// Body bytes that follow (after the length field).
    pub captured: u16,
    pub _pad: u32,
}

impl PgMessageEvent {
    /// Bytes of the record before `body`.
    pub const HEAD_SIZE: usize = core::mem::size_of::<PgMessageHead>();
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) when the event was made.
    pub ts_ns: u64,
}

/// An IPv4 or IPv6 endpoint. IPv4 uses the first 4 bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub _pad: u32,
}

/// A traced process accepted or connected a TCP socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOpenEvent {
    pub header: EventHeader,
    pub conn_id: u64,
    pub fd: u32,
    /// [`crate::role`].
    pub role: u8,
    pub _pad: [u8; 3],
    pub local: Endpoint,
    pub remote: Endpoint,
}

/// What every data event says about one syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataMeta {
    pub header: EventHeader,
    pub conn_id: u64,
    /// Syscall entry time (the header's `ts_ns` is the exit time).
    pub start_ns: u64,
    /// Bytes the syscall moved.
    pub len: u64,
    /// Bytes moved in this direction before this syscall.
    pub seq: u64,
    pub fd: u32,
    /// [`crate::direction`].
    pub direction: u8,
    /// [`crate::protocol`] of the connection.
    pub protocol: u8,
    /// Payload bytes that follow in a [`DataEvent`] (0 for a bare [`DataMeta`]).
    pub captured: u16,
}

/// Span ids the kernel decided for the request that starts in a data event. Deciding them in the
/// kernel, at the moment the bytes move, is what lets an injected `traceparent` and the exported
/// span agree: the agent uses these ids rather than making its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// All zero for a root span.
    pub parent_id: [u8; 8],
    /// W3C trace flags.
    pub flags: u8,
    /// 1 when the ids are set (the event starts a request on a traced connection).
    pub valid: u8,
    pub _pad: [u8; 6],
}

/// A data syscall with its first bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataEvent {
    pub meta: DataMeta,
    pub ids: SpanIds,
    pub payload: [u8; MAX_CAPTURE],
}

/// What a traced thread is serving: CLIENT requests it sends continue this trace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadContext {
    pub trace_id: [u8; 16],
    /// The SERVER span's id: the parent of the thread's CLIENT spans.
    pub span_id: [u8; 8],
    pub flags: u8,
    /// 1 while the thread serves the request; 0 once it answered (the entry is kept for its next
    /// request: updating in place costs less than an LRU insert and delete per request).
    pub serving: u8,
    pub _pad: [u8; 6],
}

/// A traced process closed a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCloseEvent {
    pub header: EventHeader,
    pub conn_id: u64,
    pub fd: u32,
    pub _pad: u32,
}

/// A process executed a new program, or a traced process ended (header only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    pub header: EventHeader,
    /// The task's name (`comm`), NUL-padded: names the process once /proc no longer has it.
    pub comm: [u8; 16],
}
