//! Fuzz drivers for `fuzz/` (cargo-fuzz, `--cfg fuzzing`): each feeds one parser arbitrary bytes
//! the way the assembler feeds it kernel events, then makes of what it decoded what the span code
//! makes of it, so that a panic anywhere from a ring-buffer record to a span attribute shows. Each
//! returns how many spans (or, for `events`, protocol outputs) the input gave; the tests use that
//! to keep the committed seeds meaningful.
//!
//! Stream inputs (HTTP/1, HTTP/2, Kafka) are syscalls in the record format of the protocols'
//! testdata captures, whose first byte also says how the kernel reported the syscall:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | control (below) |
//! | 8, 8 | syscall entry and exit, ns (big-endian) |
//! | 4 | length (big-endian; what is left of the input when longer) |
//! | length | the bytes |
//!
//! Control bit 0 is the direction (0: the traced process sent the bytes, 1: it received them, as
//! in the captures); bits 1-3 + 1 are the pieces the captured bytes come in; bits 4-7 are 0 when
//! every byte was captured, n in 1-14 when only the first n/15 were, 15 when the syscall's events
//! were lost. Captures (bytes 0 and 1) are valid inputs as they are.
//!
//! HTTP/1 and HTTP/2 inputs start with one more byte, the traced process's role (bit 0: 0 client,
//! 1 server); Kafka connections are always the client's. PostgreSQL and ring-buffer inputs have
//! formats of their own, see [`postgres`] and [`events`].

mod spans;

#[cfg(test)]
mod seeds;

use std::net::SocketAddr;

use rustc_hash::FxHashMap;
use zerotel_abi::{
    direction, protocol, role, user::decode, DataMeta, EventHeader, MAX_CAPTURE, PG_BODY, STREAM_CHUNK_BYTES,
};

use crate::{
    capture::CapturedEvent,
    conn::{socket_addr, Connection},
    protocols::{
        http2::{self, H2Connection, Headers},
        kafka::{self, KafkaConnection},
        postgres::{PgConnection, PgMessage},
    },
    spans::rpc,
};

use spans::{Http1Spans, KafkaSpans, PgSpans};

/// Bytes before a syscall's own: control, entry, exit, length.
const CALL_HEAD_BYTES: usize = 21;
/// The control value that marks a syscall whose events were lost.
const LOST: u8 = 15;
/// Connections a ring-buffer input may open at once (the agent's table holds many more; a few
/// are enough to mix their events).
const MAX_EVENT_CONNS: usize = 16;

/// HTTP/1: syscalls of one connection as data events (`Connection::segment`, `Http1Connection`),
/// its exchanges described as HTTP spans.
pub fn http1(input: &[u8]) -> usize {
    let Some((&role_byte, calls)) = input.split_first() else { return 0 };
    let mut conn = connection(role_of(role_byte));
    let mut spans = Http1Spans::default();
    let mut offsets = [0u64; 2];
    let mut end_ns = 0;
    for call in calls_of(calls) {
        let offset = &mut offsets[usize::from(!call.outgoing)];
        let seq = *offset;
        *offset = seq.saturating_add(call.bytes.len() as u64);
        end_ns = call.end_ns;
        if call.lost() {
            continue;
        }
        let payload = &call.captured()[..call.captured().len().min(MAX_CAPTURE)];
        let meta = DataMeta {
            header: EventHeader { kind: zerotel_abi::kind::DATA, ts_ns: call.end_ns, ..Default::default() },
            start_ns: call.start_ns,
            len: call.bytes.len() as u64,
            seq,
            direction: if call.outgoing { direction::EGRESS } else { direction::INGRESS },
            protocol: protocol::HTTP1,
            captured: payload.len() as u16,
            ..Default::default()
        };
        spans.push_segment(&mut conn, &meta, payload);
        if conn.http.is_upgraded() {
            // The assembler forgets an upgraded connection: nothing more is HTTP/1.
            return spans.count;
        }
    }
    spans.close(&mut conn, end_ns.saturating_add(1));
    spans.count
}

/// HTTP/2 (frames, HPACK, streams): syscalls of one connection as stream chunks, its streams
/// described as gRPC or HTTP spans. A connection whose first bytes are an HTTP/1 answer was
/// upgraded (h2c), its stream 1 being the request that asked.
pub fn http2(input: &[u8]) -> usize {
    let Some((&role_byte, calls)) = input.split_first() else { return 0 };
    let conn = connection(role_of(role_byte));
    let role = if conn.is_server { http2::Role::Server } else { http2::Role::Client };
    let mut h2: Option<H2Connection> = None;
    let (mut events, mut count, mut end_ns) = (Vec::new(), 0, 0);
    for chunk in chunks_of(calls) {
        let h2 = h2.get_or_insert_with(|| {
            let connection = if chunk.bytes.starts_with(b"HTTP/1.") {
                H2Connection::upgraded(role, Some((upgrade_request(), chunk.start_ns)))
            } else {
                H2Connection::new(role)
            };
            connection.keeping(rpc::field_used)
        });
        let piece = http2::Piece {
            outgoing: chunk.outgoing,
            offset: chunk.offset,
            bytes: chunk.bytes,
            syscall_end: chunk.syscall_end,
            start_ns: chunk.start_ns,
            end_ns: chunk.end_ns,
        };
        h2.push(&piece, &mut events);
        count += spans::describe_h2(&conn, events.drain(..));
        end_ns = chunk.end_ns;
    }
    if let Some(h2) = h2.as_mut() {
        h2.close(end_ns.saturating_add(1), &mut events);
        count += spans::describe_h2(&conn, events.drain(..));
    }
    count
}

/// Kafka: syscalls of a client connection as stream chunks (requests are what it sent), its
/// exchanges described as messaging spans. Returns the exchanges, spans or not.
pub fn kafka(input: &[u8]) -> usize {
    let mut kafka = KafkaConnection::new();
    let mut spans = KafkaSpans::default();
    let mut exchanges = Vec::new();
    for chunk in chunks_of(input) {
        let piece = kafka::Piece {
            direction: if chunk.outgoing { kafka::Direction::Request } else { kafka::Direction::Response },
            offset: chunk.offset,
            bytes: chunk.bytes,
            syscall_end: chunk.syscall_end,
            start_ns: chunk.start_ns,
            end_ns: chunk.end_ns,
        };
        kafka.push(&piece, &mut exchanges);
        spans.describe(exchanges.drain(..));
    }
    spans.count
}

/// PostgreSQL: the messages of a client connection as the kernel reports them, the statements
/// they complete described as database spans (SQL summaries included). Each message is:
///
/// | bytes | field |
/// |---|---|
/// | 1 | bit 0: 0 the client (frontend) sent it, 1 the server; bits 1-7: bulk messages before it |
/// | 1 | type byte (0: untyped startup-phase message) |
/// | 4 | the message's length field (big-endian; any value, as the kernel passes it on) |
/// | 2 | body bytes captured (big-endian; at most 512, and what is left of the input) |
/// | n | the body |
pub fn postgres(input: &[u8]) -> usize {
    let mut pg = PgConnection::default();
    let mut spans = PgSpans::default();
    let mut statements = Vec::new();
    let mut rest = input;
    let mut now_ns = 0u64;
    while let Some((head, tail)) = rest.split_first_chunk::<8>() {
        let captured = usize::from(u16::from_be_bytes([head[6], head[7]])).min(PG_BODY).min(tail.len());
        let (body, tail) = tail.split_at(captured);
        rest = tail;
        now_ns += 10;
        let message = PgMessage {
            frontend: head[0] & 1 == 0,
            kind: head[1],
            len: u32::from_be_bytes([head[2], head[3], head[4], head[5]]),
            body,
            bulk_before: u32::from(head[0] >> 1),
            start_ns: now_ns,
            end_ns: now_ns + 5,
        };
        pg.push(&message, &mut statements);
        spans.describe(pg.database(), statements.drain(..));
    }
    spans.count
}

/// Ring-buffer records: decoded (`zerotel_abi::user::decode`), made owned as the capture stage
/// does, and dispatched to per-connection parsers as the assembler does. Each record is a
/// big-endian u16 length (what is left of the input when longer), then the record. Returns the
/// protocol outputs the records gave.
pub fn events(input: &[u8]) -> usize {
    let mut conns: FxHashMap<u64, Connection> = FxHashMap::default();
    let mut outputs = Outputs::default();
    let mut rest = input;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (record, tail) = tail.split_at(len);
        rest = tail;
        if let Ok(event) = decode(record) {
            dispatch(&mut conns, CapturedEvent::from(event), &mut outputs);
        }
    }
    outputs.count
}

/// What one record does to the connections, as `Assembler::handle` (minus spans and processes).
fn dispatch(conns: &mut FxHashMap<u64, Connection>, event: CapturedEvent, outputs: &mut Outputs) {
    match event {
        CapturedEvent::ConnOpen(e) if conns.len() < MAX_EVENT_CONNS || conns.contains_key(&e.conn_id) => {
            let conn = Connection::new(e.header.pid, e.fd, e.role, socket_addr(&e.local), socket_addr(&e.remote));
            conns.insert(e.conn_id, conn);
        }
        CapturedEvent::Data { meta, payload, .. } => {
            let Some(conn) = conns.get_mut(&meta.conn_id) else { return };
            let segment = conn.segment(&meta, &payload);
            conn.http.push(&segment, &mut outputs.http1);
            if conn.http.is_upgraded() {
                conns.remove(&meta.conn_id);
            }
        }
        CapturedEvent::PgMessage { head, body } => {
            let Some(conn) = conns.get_mut(&head.conn_id).filter(|c| !c.is_server) else { return };
            let message = PgMessage {
                frontend: head.direction == direction::EGRESS,
                kind: head.msg_type,
                len: head.len,
                body: &body,
                bulk_before: head.bulk_before,
                start_ns: head.start_ns,
                end_ns: head.header.ts_ns,
            };
            conn.postgres.get_or_insert_with(Default::default).push(&message, &mut outputs.statements);
        }
        CapturedEvent::StreamChunk { head, data } => {
            let Some(conn) = conns.get_mut(&head.conn_id) else { return };
            let outgoing = head.direction == direction::EGRESS;
            let (offset, syscall_end, start_ns, end_ns) =
                (head.offset, head.syscall_end, head.start_ns, head.header.ts_ns);
            if head.protocol == protocol::HTTP2 {
                let role = if conn.is_server { http2::Role::Server } else { http2::Role::Client };
                let piece = http2::Piece { outgoing, offset, bytes: &data, syscall_end, start_ns, end_ns };
                let h2 = conn.h2.get_or_insert_with(|| Box::new(H2Connection::new(role).keeping(rpc::field_used)));
                h2.push(&piece, &mut outputs.h2);
            } else if !conn.is_server {
                let direction = if outgoing { kafka::Direction::Request } else { kafka::Direction::Response };
                let piece = kafka::Piece { direction, offset, bytes: &data, syscall_end, start_ns, end_ns };
                conn.kafka.get_or_insert_with(Default::default).push(&piece, &mut outputs.kafka);
            }
        }
        CapturedEvent::ConnClose(e) => {
            if let Some(mut conn) = conns.remove(&e.conn_id) {
                conn.http.close(e.header.ts_ns, &mut outputs.http1);
                if let Some(h2) = conn.h2.as_mut() {
                    h2.close(e.header.ts_ns, &mut outputs.h2);
                }
            }
        }
        CapturedEvent::ConnTls(e) => {
            if let Some(conn) = conns.get_mut(&e.conn_id) {
                conn.start_tls();
            }
        }
        CapturedEvent::ProcessExec(e) | CapturedEvent::ProcessExit(e) => {
            let _ = e.comm();
        }
        CapturedEvent::ConnOpen(_) | CapturedEvent::H2StreamIds(_) => {}
    }
    outputs.settle();
}

/// Protocol outputs of ring-buffer records, counted and dropped.
#[derive(Default)]
struct Outputs {
    http1: Vec<crate::protocols::http1::Output>,
    statements: Vec<crate::protocols::postgres::Statement>,
    h2: Vec<http2::H2Event>,
    kafka: Vec<kafka::Exchange>,
    count: usize,
}

impl Outputs {
    fn settle(&mut self) {
        self.count += self.http1.len() + self.statements.len() + self.h2.len() + self.kafka.len();
        self.http1.clear();
        self.statements.clear();
        self.h2.clear();
        self.kafka.clear();
    }
}

/// One syscall of a stream input.
#[derive(Debug, Clone, Copy)]
struct Call<'a> {
    outgoing: bool,
    control: u8,
    start_ns: u64,
    end_ns: u64,
    /// Every byte the syscall moved, captured or not.
    bytes: &'a [u8],
}

impl<'a> Call<'a> {
    fn lost(&self) -> bool {
        self.control >> 4 == LOST
    }

    /// The bytes that reached the agent: a prefix of `bytes`.
    fn captured(&self) -> &'a [u8] {
        match self.control >> 4 {
            0 => self.bytes,
            LOST => &[],
            fifteenths => &self.bytes[..self.bytes.len() * usize::from(fifteenths) / 15],
        }
    }

    /// Pieces the captured bytes come in: never more than a stream chunk record holds.
    fn piece_len(&self) -> usize {
        let pieces = usize::from((self.control >> 1) & 7) + 1;
        self.captured().len().div_ceil(pieces).clamp(1, STREAM_CHUNK_BYTES)
    }
}

/// The syscalls of a stream input; a truncated last head ends it.
fn calls_of(mut input: &[u8]) -> impl Iterator<Item = Call<'_>> {
    std::iter::from_fn(move || {
        let (head, rest) = input.split_first_chunk::<CALL_HEAD_BYTES>()?;
        let field = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().unwrap_or_default());
        let len = u32::from_be_bytes([head[17], head[18], head[19], head[20]]) as usize;
        let (bytes, rest) = rest.split_at(len.min(rest.len()));
        input = rest;
        Some(Call { outgoing: head[0] & 1 == 0, control: head[0], start_ns: field(1), end_ns: field(9), bytes })
    })
}

/// A stream chunk record's worth of one direction's bytes.
#[derive(Debug, Clone, Copy)]
struct Chunk<'a> {
    outgoing: bool,
    offset: u64,
    bytes: &'a [u8],
    syscall_end: u64,
    start_ns: u64,
    end_ns: u64,
}

/// The stream chunks the kernel would send for a stream input's syscalls, with stream offsets
/// per direction (lost and uncaptured bytes still move them).
fn chunks_of(input: &[u8]) -> impl Iterator<Item = Chunk<'_>> {
    let mut offsets = [0u64; 2];
    calls_of(input).flat_map(move |call| {
        let offset = &mut offsets[usize::from(!call.outgoing)];
        let start = *offset;
        let syscall_end = start.saturating_add(call.bytes.len() as u64);
        *offset = syscall_end;
        call.captured().chunks(call.piece_len()).enumerate().map(move |(index, bytes)| Chunk {
            outgoing: call.outgoing,
            offset: start.saturating_add((index * call.piece_len()) as u64),
            bytes,
            syscall_end,
            start_ns: call.start_ns,
            end_ns: call.end_ns,
        })
    })
}

fn role_of(role_byte: u8) -> u8 {
    if role_byte & 1 == 0 {
        role::CLIENT
    } else {
        role::SERVER
    }
}

/// A loopback connection of the given role.
fn connection(conn_role: u8) -> Connection {
    let local: SocketAddr = ([127, 0, 0, 1], 40000).into();
    let remote: SocketAddr = ([127, 0, 0, 2], 8080).into();
    Connection::new(1, 3, conn_role, local, remote)
}

/// The HTTP/1.1 request an upgraded connection's stream 1 stands for.
fn upgrade_request() -> Headers {
    let fields = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "localhost")];
    Headers { fields: fields.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect() }
}
