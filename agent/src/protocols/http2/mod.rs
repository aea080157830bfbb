//! HTTP/2 over cleartext TCP (h2c, RFC 9113) with HPACK (RFC 7541): the streams of one connection.
//!
//! The kernel reports the bytes each syscall of a traced connection moved, possibly only a prefix of
//! them, as [`Piece`]s with stream offsets per direction. [`H2Connection`] frames both directions,
//! decodes every header block with one HPACK decoder per direction (each has its own dynamic table)
//! and follows the streams the client opens: requests, responses and trailers (gRPC included), body
//! sizes, resets and GOAWAY.
//!
//! HPACK state is never guessed. A DATA frame not captured whole is fine (its length says where the
//! next frame starts, and its payload is only counted), but a header block frame missing bytes, a
//! lost frame boundary or an HPACK error desynchronises the connection for good: from then on it
//! reports nothing, and streams still open are dropped rather than reported wrong. A connection
//! first seen after its start is never decoded. One upgraded from HTTP/1.1 (RFC 7540 §3.2) is
//! decoded from the `101` answer on, its stream 1 being the request that asked for the upgrade.
//! Bytes a syscall left uncaptured are known lost once the other direction's next syscall started
//! after it returned (or at the close); a lost syscall shows only when its direction's next piece
//! comes, and until then the other direction may end streams with what was seen.
//!
//! Work and memory are bounded per connection whatever the bytes: header blocks up to
//! [`MAX_HEADER_BLOCK`] bytes, HPACK tables up to [`hpack::MAX_TABLE_SIZE`],
//! [`hpack::MAX_DECODED_LIST`] bytes decoded per block, [`MAX_OPEN_STREAMS`] open streams, and per
//! header block at most [`MAX_KEPT_FIELDS`] fields, [`MAX_KEPT_VALUE`] bytes per name or value and
//! [`MAX_KEPT_BLOCK`] bytes in all. DATA payloads are never buffered.
//!
//! The caller pushes pieces in syscall order, so that a request comes before the response to it.

mod connection;
mod frames;
pub mod hpack;
mod huffman;
mod streams;

#[cfg(test)]
mod captures;

pub use connection::H2Connection;
pub use hpack::HpackError;
use thiserror::Error;

/// A header block longer than this (HEADERS or PUSH_PROMISE with its CONTINUATIONs) is not decoded:
/// the connection desynchronises.
pub const MAX_HEADER_BLOCK: usize = 256 << 10;
/// Open streams kept per connection; beyond, the oldest is dropped unreported.
pub const MAX_OPEN_STREAMS: usize = 1024;
/// Fields kept per header block; later ones are decoded (the HPACK table needs them) but not kept.
pub const MAX_KEPT_FIELDS: usize = 128;
/// Bytes kept of a name or value; longer ones are cut.
pub const MAX_KEPT_VALUE: usize = 4096;
/// Name and value bytes kept per header block; fields beyond are not kept.
pub const MAX_KEPT_BLOCK: usize = 16 << 10;
/// The error code of a RST_STREAM whose payload was not captured.
pub const UNKNOWN_ERROR_CODE: u32 = u32::MAX;

/// Which end of the connection the traced process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It connected: it sends requests.
    Client,
    /// It accepted: it receives requests.
    Server,
}

/// A piece of one direction's byte stream.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// Bytes the traced process sent (true) or received (false).
    pub outgoing: bool,
    /// Stream offset of `bytes[0]` in this direction.
    pub offset: u64,
    pub bytes: &'a [u8],
    /// Stream offset just past the syscall: bytes from `offset + bytes.len()` to here were moved but
    /// not captured. Pieces of one syscall share it.
    pub syscall_end: u64,
    /// Monotonic ns: the syscall's entry and exit.
    pub start_ns: u64,
    pub end_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum H2Event {
    /// A request's header block is complete (HEADERS [+ CONTINUATION]): the server starts serving it
    /// / the client has sent it.
    RequestStarted { stream_id: u32, request: Headers, start_ns: u64 },
    /// The stream is done (both sides ended, reset, or the connection went away).
    StreamEnded(H2Stream),
}

/// A decoded header block, in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// Names lowercase as on the wire, pseudo-headers included (":method", ":path", ":status"...);
    /// lossy UTF-8, cut to the `MAX_KEPT_*` bounds.
    pub fields: Vec<(String, String)>,
}

impl Headers {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(field, _)| field == name).map(|(_, value)| value.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H2Stream {
    pub stream_id: u32,
    pub request: Headers,
    /// The first final response header block (1xx ones are skipped); for a trailers-only gRPC
    /// response it also holds grpc-status.
    pub response: Option<Headers>,
    /// Trailing header block of the response (gRPC status lives here).
    pub trailers: Option<Headers>,
    /// The syscall carrying the request's first HEADERS byte: its start when the traced process is
    /// the client (it sent it), its end when it is the server (it read it).
    pub start_ns: u64,
    /// End of the syscall that completed the stream (the later END_STREAM), or of the one carrying
    /// the RST_STREAM / GOAWAY, or the close time.
    pub end_ns: u64,
    /// DATA payload bytes, padding excluded.
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    pub outcome: StreamOutcome,
}

impl H2Stream {
    /// The gRPC status: from the trailers, else from a trailers-only response.
    pub fn grpc_status(&self) -> Option<u32> {
        let status = match &self.trailers {
            Some(trailers) => trailers.get("grpc-status"),
            None => self.response.as_ref().and_then(|response| response.get("grpc-status")),
        };
        status.and_then(|status| status.trim().parse().ok())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOutcome {
    /// Both sides ended the stream; also a stream whose response ended before a reset, a GOAWAY
    /// or the close.
    Complete,
    /// RST_STREAM from either side ([`UNKNOWN_ERROR_CODE`] when its payload was not captured).
    Reset { error_code: u32 },
    /// The server's GOAWAY left the stream unprocessed (its id is above the last one served).
    GoAway { error_code: u32 },
    /// The connection closed before the stream ended.
    ConnectionClosed,
}

/// Why a connection stopped being decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Desync {
    /// A direction was first seen after its first byte: the HPACK state is unknown.
    #[error("connection first seen after its start")]
    NotFromStart,
    /// The client's first bytes are not the HTTP/2 connection preface (not prior-knowledge h2c).
    #[error("no HTTP/2 client preface")]
    NoPreface,
    /// An upgraded connection's `101` answer has no end to its head within bounds.
    #[error("no end to the 101 answer's head")]
    UpgradeAnswerTooLong,
    /// Bytes were lost where a frame header was: the framing is gone.
    #[error("bytes lost at a frame boundary")]
    LostFrameBoundary,
    /// Some bytes of a HEADERS, PUSH_PROMISE or CONTINUATION frame were not captured.
    #[error("header block bytes not captured")]
    UncapturedHeaderBlock,
    /// A header block longer than [`MAX_HEADER_BLOCK`].
    #[error("header block longer than {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge,
    /// A CONTINUATION without an open block or for another stream, or another frame inside a block:
    /// the peer fails the connection.
    #[error("frame out of header block sequence")]
    BrokenHeaderSequence,
    /// Padding or priority fields longer than their header block frame.
    #[error("padding longer than its frame")]
    BadPadding,
    #[error("HPACK: {0}")]
    Hpack(#[from] HpackError),
}
