//! Kafka wire protocol (<https://kafka.apache.org/protocol>): the exchanges one client connection makes.
//!
//! The kernel reports the bytes each syscall of a traced connection moved, possibly only a prefix
//! of them, as [`Piece`]s with stream offsets. [`KafkaConnection`] frames each direction (an INT32
//! size, then the frame), pairs responses with requests by correlation id, and reports the exchanges
//! tracing cares about: Produce (per partition: record counts, traceparent headers, errors, offsets),
//! Fetch (per batch: offsets and traceparent headers), Metadata (topic ids to names, as Fetch and
//! Produce v13+ name topics by id) and group membership. Every other request is framed and matched
//! only.
//!
//! A frame not captured whole is skipped (its size still tells where the next one starts); a frame
//! cut by a missing tail shows as such when the direction's next piece arrives. Lost size fields
//! lose the framing until a syscall starts with a plausible frame. Work and memory are bounded per
//! connection and per message whatever the bytes (see the `MAX_*` constants of the submodules):
//! frames up to 8 MiB buffered per direction, 1024 requests awaiting answers, 4096 partitions and
//! 4096 traced records per message, 64 per batch, 32 MiB inflated per message, 8 MiB per batch.
//!
//! The caller pushes a request before the response to it, as the broker reads it before answering.

mod connection;
mod error_codes;
mod framing;
mod messages;
mod records;
mod wire;

#[cfg(test)]
mod captures;

pub use connection::KafkaConnection;
pub use error_codes::error_name;

/// Which way bytes went on a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the client sent.
    Request,
    /// Bytes the client received.
    Response,
}

/// A piece of one direction's byte stream.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    pub direction: Direction,
    /// Stream offset of `bytes[0]` in this direction (bytes sent/received before it).
    pub offset: u64,
    pub bytes: &'a [u8],
    /// Stream offset just past the syscall this piece belongs to: bytes between `offset + bytes.len()`
    /// and `syscall_end` were moved but not captured. Pieces of one syscall share it.
    pub syscall_end: u64,
    /// Monotonic ns: the syscall's entry and exit.
    pub start_ns: u64,
    pub end_ns: u64,
}

/// A request and its response (or a request that gets none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub client_id: Option<String>,
    /// The request's API key (0 Produce, 1 Fetch, 3 Metadata, 11 JoinGroup, 12 Heartbeat, ...): tells
    /// group requests apart.
    pub api_key: i16,
    pub api_version: i16,
    /// When the syscall carrying the request's first byte started.
    pub start_ns: u64,
    /// When the syscall carrying the response's last byte returned (the request's, without response).
    pub end_ns: u64,
    pub body: ExchangeBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeBody {
    Produce(Produce),
    Fetch(Fetch),
    /// Metadata response: topic id -> name (for Fetch and Produce v13+ that name topics by id). Only
    /// entries with both.
    Metadata {
        topics: Vec<([u8; 16], String)>,
    },
    /// JoinGroup, SyncGroup, Heartbeat, OffsetCommit, OffsetFetch (v8+: when it names exactly one
    /// group), LeaveGroup requests: the group this client belongs to.
    Group {
        group_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produce {
    pub acks: i16,
    pub topics: Vec<ProducedTopic>,
    /// False when acks=0: no response comes.
    pub answered: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedTopic {
    pub topic: TopicRef,
    pub partitions: Vec<ProducedPartition>,
}

/// Produce and Fetch v13+ name topics by id (see [`ExchangeBody::Metadata`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopicRef {
    Name(String),
    Id([u8; 16]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedPartition {
    pub partition: i32,
    /// Records in the partition's batches (exact; legacy message sets: messages counted).
    pub record_count: u32,
    /// Per record, in order, for the first 64 records ([`records::MAX_TRACED_RECORDS`]): the value of
    /// its `traceparent` header, if any (raw bytes as sent).
    pub traceparents: Vec<Option<Vec<u8>>>,
    /// From the response (None when acks=0 or the response lacks the partition).
    pub error_code: Option<i16>,
    pub base_offset: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The response's top-level error (v7+, e.g. a fetch session error); 0 when none.
    pub error_code: i16,
    /// Only partitions that returned records or an error.
    pub topics: Vec<FetchedTopic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedTopic {
    pub topic: TopicRef,
    pub partitions: Vec<FetchedPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPartition {
    pub partition: i32,
    pub error_code: i16,
    /// Complete batches, without transaction markers; a partial batch at the end is left out.
    pub batches: Vec<FetchedBatch>,
}

/// A record batch (a legacy message or compressed wrapper for magic 0/1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedBatch {
    pub base_offset: i64,
    pub record_count: u32,
    /// Per record, for the first 64 ([`records::MAX_TRACED_RECORDS`]): its offset and traceparent
    /// header value.
    pub records: Vec<FetchedRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRecord {
    pub offset: i64,
    pub traceparent: Option<Vec<u8>>,
}
