//! HTTP/1.x exchange reconstruction for one TCP connection.
//!
//! The kernel reports each read/write syscall as a [`Segment`]: how many bytes moved and only the
//! first of them. [`Http1Connection`] rebuilds request/response exchanges from those segments. Body
//! bytes it never saw ("blind" bytes) still count against known lengths; when blind bytes hide the
//! framing, a side waits for the next recognisable message start instead of guessing.

use std::collections::VecDeque;

/// Most head bytes buffered per side; a longer head is handled as cut by capture.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Buffers that grew past this are released once their head is decoded, so idle connections stay small.
const RETAINED_HEAD_CAPACITY: usize = 1024;
const MAX_HEADERS: usize = 64;
const MAX_OPEN_EXCHANGES: usize = 32;
/// A chunk-size line longer than this (extensions included) is taken as garbage, not HTTP.
const MAX_CHUNK_LINE_BYTES: u32 = 4096;
/// Sixteen hex digits fill a u64; more would overflow the chunk size.
const MAX_CHUNK_SIZE_DIGITS: u8 = 16;
const SWITCHING_PROTOCOLS: u16 = 101;

const REQUEST_STARTS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];
const RESPONSE_START: &[u8] = b"HTTP/1.";
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// The last chunk as it follows a previous chunk's data (its CRLF ends in `\n`).
const LAST_CHUNK_AFTER_DATA: &[u8] = b"\n0\r\n\r\n";
const CONTEXT_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Which half of the exchange a segment carries: requests flow one way, responses the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// One syscall's worth of bytes on one side of the connection.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub side: Side,
    /// When the first byte of this segment counts as sent/received (ns, monotonic).
    pub first_byte_ns: u64,
    /// When the last byte of this segment counts as sent/received (ns, monotonic).
    pub last_byte_ns: u64,
    /// Bytes the syscall moved.
    pub len: u64,
    /// The first captured bytes of them: payload.len() <= len (the caller guarantees; clamp anyway if not).
    pub payload: &'a [u8],
    /// Bytes of this side were lost just before this segment (events dropped).
    pub gap_before: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// Request target as sent (path and query), lossy UTF-8.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    pub host: Option<String>,
    /// Trace-context headers, name lowercased, value trimmed: traceparent, tracestate, b3, x-b3-traceid,
    /// x-b3-spanid, x-b3-parentspanid, x-b3-sampled, x-b3-flags. In the order they appeared.
    pub context: Vec<(String, String)>,
    /// The head was not fully captured: fields after the cut are missing.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub version_minor: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response was read to its end.
    Complete,
    /// The connection closed before the response (or before its end).
    ConnectionClosed,
    /// Bytes were lost or could not be framed; the exchange's end is unknown.
    Desynchronised,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A request head was decoded; its exchange is open. `id` numbers exchanges of this connection from 0.
    RequestStarted { id: u64, head: RequestHead, start_ns: u64 },
    /// An exchange ended. `response` is None when no response head was seen.
    /// `end_ns` = last_byte_ns of the segment holding the response's last byte (or the best known
    /// time: close time, last segment seen).
    ExchangeEnded { id: u64, response: Option<ResponseHead>, end_ns: u64, outcome: Outcome },
}

/// Does `bytes` begin with a known request method followed by a space?
pub fn looks_like_request_start(bytes: &[u8]) -> bool {
    REQUEST_STARTS.iter().any(|start| bytes.starts_with(start))
}

/// Does `bytes` begin with a response's "HTTP/1."?
pub fn looks_like_response_start(bytes: &[u8]) -> bool {
    bytes.starts_with(RESPONSE_START)
}

/// Decodes the HTTP/1.x exchanges of one connection, both directions, segment by segment.
#[derive(Debug, Default)]
pub struct Http1Connection {
    requests: SideDecoder,
    responses: SideDecoder,
    /// Exchanges whose final response head has not been seen yet, oldest first.
    waiting: VecDeque<PendingExchange>,
    /// The exchange whose response body is being read.
    responding: Option<RespondingExchange>,
    next_id: u64,
    upgraded: bool,
    desyncs: u64,
    /// Latest last_byte_ns of any segment: the best end time for exchanges cut short.
    last_seen_ns: u64,
    /// last_byte_ns of the latest response segment: where a response read blind or until close ends.
    last_response_ns: u64,
}

impl Http1Connection {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one segment; decoded events are appended to `out`.
    pub fn push(&mut self, segment: &Segment<'_>, out: &mut Vec<Output>) {
        if self.upgraded {
            return;
        }
        if segment.gap_before {
            self.lose_sync(out);
        }
        let captured = captured_bytes(segment);
        let blind = segment.len.saturating_sub(len_u64(captured));
        if self.resume_if_blind(segment, captured, out) {
            self.read_captured(segment, captured, out);
            self.read_blind(segment, blind, out);
        }
        self.record_times(segment);
    }

    /// The connection closed at `ts_ns`: end every open exchange (a response framed "until close"
    /// is Complete; others ConnectionClosed).
    pub fn close(&mut self, ts_ns: u64, out: &mut Vec<Output>) {
        if let Some(responding) = self.responding.take() {
            let (end_ns, outcome) = if self.responses.phase.ends_at_close() {
                (self.last_response_ns, Outcome::Complete)
            } else {
                (ts_ns, Outcome::ConnectionClosed)
            };
            responding.end(end_ns, outcome, out);
        }
        self.end_waiting(ts_ns, Outcome::ConnectionClosed, out);
        self.requests = SideDecoder::default();
        self.responses = SideDecoder::default();
    }

    /// True after a 101 Switching Protocols: the connection no longer speaks HTTP/1 and segments are ignored.
    pub fn is_upgraded(&self) -> bool {
        self.upgraded
    }

    /// Number of times this connection lost sync (for metrics).
    pub fn desync_count(&self) -> u64 {
        self.desyncs
    }

    fn decoder(&self, side: Side) -> &SideDecoder {
        match side {
            Side::Request => &self.requests,
            Side::Response => &self.responses,
        }
    }

    fn decoder_mut(&mut self, side: Side) -> &mut SideDecoder {
        match side {
            Side::Request => &mut self.requests,
            Side::Response => &mut self.responses,
        }
    }

    fn record_times(&mut self, segment: &Segment<'_>) {
        self.last_seen_ns = self.last_seen_ns.max(segment.last_byte_ns);
        if segment.side == Side::Response {
            self.last_response_ns = self.last_response_ns.max(segment.last_byte_ns);
        }
    }

    /// A blind side comes back only at a recognisable message start, or at a fully captured last
    /// chunk when it lost track inside a chunked body. Returns whether to decode the segment.
    fn resume_if_blind(&mut self, segment: &Segment<'_>, captured: &[u8], out: &mut Vec<Output>) -> bool {
        let Phase::Blind { chunked } = self.decoder(segment.side).phase else {
            return true;
        };
        if looks_like_message_start(segment.side, captured) {
            self.finish_message(segment.side, self.last_response_ns, out);
            return true;
        }
        if chunked && ends_with_last_chunk(segment, captured) {
            self.finish_message(segment.side, segment.last_byte_ns, out);
        }
        false
    }

    fn read_captured(&mut self, segment: &Segment<'_>, captured: &[u8], out: &mut Vec<Output>) {
        let mut rest = captured;
        while !rest.is_empty() && !self.upgraded {
            rest = match self.decoder(segment.side).phase {
                Phase::Head => self.read_head(segment, rest, out),
                Phase::Body(body) => self.read_body(segment, body, rest, out),
                Phase::Blind { .. } => return,
            };
        }
    }

    /// Buffers head bytes until httparse sees a whole head; returns the bytes after it.
    fn read_head<'b>(&mut self, segment: &Segment<'_>, bytes: &'b [u8], out: &mut Vec<Output>) -> &'b [u8] {
        let side = segment.side;
        let head = &mut self.decoder_mut(side).head;
        let bytes = if head.is_empty() { skip_blank_lines(bytes) } else { bytes };
        if bytes.is_empty() {
            return bytes;
        }
        if head.is_empty() && !could_begin_message(side, bytes) {
            self.garbage(side);
            return &[];
        }
        let already_buffered = head.len();
        let appended = head.append(bytes, segment.first_byte_ns);
        let new_bytes = bytes.get(..appended).unwrap_or_default();
        // A head can only end on a line feed: skip re-parsing (quadratic for byte-wise writers) until one arrives.
        if !head.is_full() && !new_bytes.contains(&b'\n') {
            return &[];
        }
        match parse_head(side, head.bytes()) {
            HeadParse::Complete { head: parsed, len } => {
                let start_ns = head.start_ns;
                head.clear();
                self.accept_head(parsed, false, start_ns, segment, out);
                bytes.get(len.saturating_sub(already_buffered)..).unwrap_or_default()
            }
            HeadParse::Partial if head.is_full() => {
                self.read_cut_head(segment, out);
                &[]
            }
            // Decode the first MAX_HEADERS fields; the rest of the head is treated like a capture cut.
            HeadParse::TooManyHeaders => {
                self.read_cut_head(segment, out);
                &[]
            }
            HeadParse::Partial => &[],
            HeadParse::Invalid => {
                self.garbage(side);
                &[]
            }
        }
    }

    /// Capture stopped inside a head: decode its whole lines and follow the rest of the message blind.
    fn read_cut_head(&mut self, segment: &Segment<'_>, out: &mut Vec<Output>) {
        let side = segment.side;
        let head = &mut self.decoder_mut(side).head;
        let start_ns = head.start_ns;
        let parsed = parse_whole_lines(side, head.bytes());
        head.clear();
        match parsed {
            Some(parsed) => self.accept_head(parsed, true, start_ns, segment, out),
            None => self.garbage(side),
        }
    }

    fn read_body<'b>(
        &mut self,
        segment: &Segment<'_>,
        mut body: Body,
        bytes: &'b [u8],
        out: &mut Vec<Output>,
    ) -> &'b [u8] {
        let read = body.read_captured(bytes);
        self.decoder_mut(segment.side).phase = Phase::Body(body);
        match read {
            BodyRead::Inside => &[],
            BodyRead::Ended { used } => {
                self.finish_message(segment.side, segment.last_byte_ns, out);
                bytes.get(used..).unwrap_or_default()
            }
            BodyRead::Invalid => {
                self.framing_lost(segment.side, segment.last_byte_ns, out);
                &[]
            }
        }
    }

    /// Accounts for the uncaptured tail of a segment.
    fn read_blind(&mut self, segment: &Segment<'_>, count: u64, out: &mut Vec<Output>) {
        if count == 0 || self.upgraded {
            return;
        }
        let side = segment.side;
        match self.decoder(side).phase {
            Phase::Head if self.decoder(side).head.is_empty() => self.decoder_mut(side).go_blind(false),
            Phase::Head => self.read_cut_head(segment, out),
            Phase::Body(mut body) => match body.read_blind(count) {
                BlindRead::Inside => self.decoder_mut(side).phase = Phase::Body(body),
                BlindRead::Ended { leftover } => {
                    self.finish_message(side, segment.last_byte_ns, out);
                    if leftover > 0 {
                        // The next message began where nothing was captured.
                        self.decoder_mut(side).go_blind(false);
                    }
                }
                BlindRead::FramingHidden => self.decoder_mut(side).go_blind(body.is_chunked()),
            },
            Phase::Blind { .. } => {}
        }
    }

    fn accept_head(
        &mut self,
        parsed: ParsedHead,
        truncated: bool,
        start_ns: u64,
        segment: &Segment<'_>,
        out: &mut Vec<Output>,
    ) {
        match parsed {
            ParsedHead::Request(request) => self.accept_request(request, truncated, start_ns, out),
            ParsedHead::Response(response) => self.accept_response(response, truncated, segment.last_byte_ns, out),
        }
    }

    fn accept_request(&mut self, request: ParsedRequest, truncated: bool, start_ns: u64, out: &mut Vec<Output>) {
        let ParsedRequest { mut head, framing } = request;
        head.truncated = truncated;
        let method = Method::of(&head.method);
        let id = self.open_exchange(method, start_ns, out);
        out.push(Output::RequestStarted { id, head, start_ns });
        let framing = framing.request_framing();
        if truncated {
            self.requests.go_blind(framing.is_chunked());
        } else {
            self.enter_body(Side::Request, framing, start_ns, out);
        }
    }

    fn accept_response(&mut self, response: ParsedResponse, truncated: bool, head_end_ns: u64, out: &mut Vec<Output>) {
        let ParsedResponse { head, framing } = response;
        if head.status == SWITCHING_PROTOCOLS {
            let exchange = self.waiting.pop_front();
            return self.upgrade(exchange, head, head_end_ns, out);
        }
        if is_interim(head.status) {
            // 100-continue and friends: the final response is still to come.
            self.responses.phase = if truncated { Phase::Blind { chunked: false } } else { Phase::Head };
            return;
        }
        let exchange = self.waiting.pop_front();
        let method = exchange.map(|exchange| exchange.method);
        if method == Some(Method::Connect) && is_success(head.status) {
            return self.upgrade(exchange, head, head_end_ns, out);
        }
        let framing = if has_no_body(head.status, method) { Framing::NoBody } else { framing.response_framing() };
        self.responding = exchange.map(|exchange| RespondingExchange { exchange, head });
        if truncated {
            self.responses.go_blind(framing.is_chunked());
        } else {
            self.enter_body(Side::Response, framing, head_end_ns, out);
        }
    }

    fn enter_body(&mut self, side: Side, framing: Framing, head_end_ns: u64, out: &mut Vec<Output>) {
        match framing {
            Framing::NoBody => self.finish_message(side, head_end_ns, out),
            Framing::Body(body) => self.decoder_mut(side).phase = Phase::Body(body),
            Framing::Invalid => self.framing_lost(side, head_end_ns, out),
        }
    }

    /// Opens an exchange for a new request, making room by giving up on the oldest one.
    fn open_exchange(&mut self, method: Method, start_ns: u64, out: &mut Vec<Output>) -> u64 {
        if self.open_exchanges() >= MAX_OPEN_EXCHANGES {
            if let Some(oldest) = self.waiting.pop_front() {
                self.count_desync();
                oldest.end(None, self.last_seen_ns, Outcome::Desynchronised, out);
            }
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.waiting.push_back(PendingExchange { id, start_ns, method });
        id
    }

    fn count_desync(&mut self) {
        self.desyncs = self.desyncs.saturating_add(1);
    }

    fn open_exchanges(&self) -> usize {
        self.waiting.len() + usize::from(self.responding.is_some())
    }

    /// A message of `side` ended: the side expects a new head; a response completes its exchange.
    fn finish_message(&mut self, side: Side, end_ns: u64, out: &mut Vec<Output>) {
        self.decoder_mut(side).phase = Phase::Head;
        if side == Side::Response {
            if let Some(responding) = self.responding.take() {
                responding.end(end_ns, Outcome::Complete, out);
            }
        }
    }

    /// A body could not be framed: its end is unknown, so the side waits for the next message start.
    fn framing_lost(&mut self, side: Side, end_ns: u64, out: &mut Vec<Output>) {
        self.count_desync();
        self.decoder_mut(side).go_blind(false);
        if side == Side::Response {
            if let Some(responding) = self.responding.take() {
                responding.end(end_ns, Outcome::Desynchronised, out);
            }
        }
    }

    /// Bytes that cannot be HTTP where a head must start: wait, silently, for a real message start.
    fn garbage(&mut self, side: Side) {
        self.count_desync();
        self.decoder_mut(side).go_blind(false);
    }

    /// Bytes were lost: every open exchange's end is unknown and both sides must find a message start.
    fn lose_sync(&mut self, out: &mut Vec<Output>) {
        self.count_desync();
        if let Some(responding) = self.responding.take() {
            responding.end(self.last_seen_ns, Outcome::Desynchronised, out);
        }
        self.end_waiting(self.last_seen_ns, Outcome::Desynchronised, out);
        self.requests.go_blind(false);
        self.responses.go_blind(false);
    }

    /// The connection stops speaking HTTP/1: the switching exchange is complete, any others never will be.
    fn upgrade(&mut self, exchange: Option<PendingExchange>, head: ResponseHead, end_ns: u64, out: &mut Vec<Output>) {
        self.upgraded = true;
        if let Some(exchange) = exchange {
            exchange.end(Some(head), end_ns, Outcome::Complete, out);
        }
        self.end_waiting(end_ns, Outcome::Desynchronised, out);
        self.requests = SideDecoder::default();
        self.responses = SideDecoder::default();
    }

    fn end_waiting(&mut self, end_ns: u64, outcome: Outcome, out: &mut Vec<Output>) {
        for exchange in self.waiting.drain(..) {
            exchange.end(None, end_ns, outcome, out);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Head,
    Connect,
    Other,
}

impl Method {
    fn of(name: &str) -> Self {
        match name {
            "HEAD" => Method::Head,
            "CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PendingExchange {
    id: u64,
    start_ns: u64,
    method: Method,
}

impl PendingExchange {
    fn end(self, response: Option<ResponseHead>, end_ns: u64, outcome: Outcome, out: &mut Vec<Output>) {
        // Clamp so a stale "best known time" never puts an end before the start.
        let end_ns = end_ns.max(self.start_ns);
        out.push(Output::ExchangeEnded { id: self.id, response, end_ns, outcome });
    }
}

#[derive(Debug)]
struct RespondingExchange {
    exchange: PendingExchange,
    head: ResponseHead,
}

impl RespondingExchange {
    fn end(self, end_ns: u64, outcome: Outcome, out: &mut Vec<Output>) {
        self.exchange.end(Some(self.head), end_ns, outcome, out);
    }
}

/// Decoding state of one direction.
#[derive(Debug, Default)]
struct SideDecoder {
    phase: Phase,
    head: HeadBuffer,
}

impl SideDecoder {
    fn go_blind(&mut self, chunked: bool) {
        self.phase = Phase::Blind { chunked };
        self.head.clear();
    }
}

#[derive(Debug, Default, Clone, Copy)]
enum Phase {
    /// Expecting (or buffering) a message head.
    #[default]
    Head,
    Body(Body),
    /// Framing was lost; `chunked` tells whether the lost message had a chunked body.
    Blind {
        chunked: bool,
    },
}

impl Phase {
    /// A response in this phase has no visible end, so closing the connection is its end.
    fn ends_at_close(self) -> bool {
        matches!(self, Phase::Body(Body::UntilClose) | Phase::Blind { .. })
    }
}

/// Captured bytes of a head not yet complete, capped at MAX_HEAD_BYTES.
#[derive(Debug, Default)]
struct HeadBuffer {
    bytes: Vec<u8>,
    /// first_byte_ns of the segment holding the head's first byte.
    start_ns: u64,
}

impl HeadBuffer {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn is_full(&self) -> bool {
        self.bytes.len() >= MAX_HEAD_BYTES
    }

    /// Appends as much of `bytes` as fits; returns how many were taken.
    fn append(&mut self, bytes: &[u8], segment_start_ns: u64) -> usize {
        if self.bytes.is_empty() {
            self.start_ns = segment_start_ns;
        }
        let room = MAX_HEAD_BYTES.saturating_sub(self.bytes.len());
        let taken = bytes.get(..room).unwrap_or(bytes);
        self.bytes.extend_from_slice(taken);
        taken.len()
    }

    fn clear(&mut self) {
        if self.bytes.capacity() > RETAINED_HEAD_CAPACITY {
            self.bytes = Vec::new();
        } else {
            self.bytes.clear();
        }
    }
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    NoBody,
    Body(Body),
    /// Contradictory or malformed length headers: the body's end cannot be known.
    Invalid,
}

impl Framing {
    fn is_chunked(self) -> bool {
        matches!(self, Framing::Body(body) if body.is_chunked())
    }
}

#[derive(Debug, Clone, Copy)]
enum Body {
    /// Bytes still expected.
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
}

enum BodyRead {
    /// All the bytes belonged to the body, which goes on.
    Inside,
    /// The body ended after `used` bytes.
    Ended {
        used: usize,
    },
    Invalid,
}

enum BlindRead {
    Inside,
    /// The body ended; `leftover` unseen bytes follow it.
    Ended {
        leftover: u64,
    },
    /// The unseen bytes cover framing (chunk sizes): the body's end can no longer be found.
    FramingHidden,
}

impl Body {
    fn is_chunked(self) -> bool {
        matches!(self, Body::Chunked(_))
    }

    fn read_captured(&mut self, bytes: &[u8]) -> BodyRead {
        match self {
            Body::Length(remaining) => {
                let used = prefix_len(*remaining, bytes.len());
                *remaining = remaining.saturating_sub(len_u64_of(used));
                if *remaining == 0 {
                    BodyRead::Ended { used }
                } else {
                    BodyRead::Inside
                }
            }
            Body::Chunked(state) => read_chunked(state, bytes),
            Body::UntilClose => BodyRead::Inside,
        }
    }

    fn read_blind(&mut self, count: u64) -> BlindRead {
        match self {
            Body::Length(remaining) if count >= *remaining => {
                BlindRead::Ended { leftover: count.saturating_sub(*remaining) }
            }
            Body::Length(remaining) => {
                *remaining = remaining.saturating_sub(count);
                BlindRead::Inside
            }
            Body::Chunked(ChunkState::Data { remaining }) if count <= *remaining => {
                *self = Body::Chunked(ChunkState::after_data(remaining.saturating_sub(count)));
                BlindRead::Inside
            }
            Body::Chunked(_) => BlindRead::FramingHidden,
            Body::UntilClose => BlindRead::Inside,
        }
    }
}

/// Where a chunked body decoder stands (RFC 9112 section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex chunk size.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the size digits: whitespace or extensions up to the line feed.
    SizeLineTail {
        value: u64,
        in_extension: bool,
        line_len: u32,
    },
    Data {
        remaining: u64,
    },
    /// The CRLF closing a chunk's data.
    DataEnd,
    /// Trailer fields after the last chunk; an empty line ends the body.
    Trailer {
        line_empty: bool,
    },
}

enum ChunkStep {
    Next(ChunkState),
    BodyEnd,
    Invalid,
}

impl ChunkState {
    const START: ChunkState = ChunkState::Size { value: 0, digits: 0 };

    fn after_data(remaining: u64) -> Self {
        if remaining == 0 {
            ChunkState::DataEnd
        } else {
            ChunkState::Data { remaining }
        }
    }

    fn after_size_line(size: u64) -> Self {
        if size == 0 {
            ChunkState::Trailer { line_empty: true }
        } else {
            ChunkState::Data { remaining: size }
        }
    }

    fn step(self, byte: u8) -> ChunkStep {
        match self {
            ChunkState::Size { value, digits } => size_step(value, digits, byte),
            ChunkState::SizeLineTail { value, in_extension, line_len } => {
                size_tail_step(value, in_extension, line_len, byte)
            }
            ChunkState::Data { remaining } => ChunkStep::Next(ChunkState::after_data(remaining.saturating_sub(1))),
            ChunkState::DataEnd => match byte {
                b'\r' => ChunkStep::Next(ChunkState::DataEnd),
                b'\n' => ChunkStep::Next(ChunkState::START),
                _ => ChunkStep::Invalid,
            },
            ChunkState::Trailer { line_empty } => trailer_step(line_empty, byte),
        }
    }
}

fn size_step(value: u64, digits: u8, byte: u8) -> ChunkStep {
    if let Some(digit) = hex_value(byte) {
        if digits >= MAX_CHUNK_SIZE_DIGITS {
            return ChunkStep::Invalid;
        }
        let value = (value << 4) | u64::from(digit);
        return ChunkStep::Next(ChunkState::Size { value, digits: digits + 1 });
    }
    if digits == 0 {
        return ChunkStep::Invalid;
    }
    size_tail_step(value, false, 0, byte)
}

fn size_tail_step(value: u64, in_extension: bool, line_len: u32, byte: u8) -> ChunkStep {
    if byte == b'\n' {
        return ChunkStep::Next(ChunkState::after_size_line(value));
    }
    let in_extension = in_extension || byte == b';';
    let allowed = in_extension || matches!(byte, b' ' | b'\t' | b'\r');
    if !allowed || line_len >= MAX_CHUNK_LINE_BYTES {
        return ChunkStep::Invalid;
    }
    ChunkStep::Next(ChunkState::SizeLineTail { value, in_extension, line_len: line_len + 1 })
}

fn trailer_step(line_empty: bool, byte: u8) -> ChunkStep {
    match byte {
        b'\r' => ChunkStep::Next(ChunkState::Trailer { line_empty }),
        b'\n' if line_empty => ChunkStep::BodyEnd,
        b'\n' => ChunkStep::Next(ChunkState::Trailer { line_empty: true }),
        _ => ChunkStep::Next(ChunkState::Trailer { line_empty: false }),
    }
}

fn read_chunked(state: &mut ChunkState, bytes: &[u8]) -> BodyRead {
    let mut offset = 0;
    while let Some(rest) = bytes.get(offset..).filter(|rest| !rest.is_empty()) {
        if let ChunkState::Data { remaining } = *state {
            // Skip chunk data in one go rather than byte by byte.
            let skipped = prefix_len(remaining, rest.len());
            offset += skipped;
            *state = ChunkState::after_data(remaining.saturating_sub(len_u64_of(skipped)));
            continue;
        }
        let Some(&byte) = rest.first() else { break };
        offset += 1;
        match state.step(byte) {
            ChunkStep::Next(next) => *state = next,
            ChunkStep::BodyEnd => return BodyRead::Ended { used: offset },
            ChunkStep::Invalid => return BodyRead::Invalid,
        }
    }
    BodyRead::Inside
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte).to_digit(16).and_then(|digit| u8::try_from(digit).ok())
}

/// Length-related headers of one head.
#[derive(Debug, Default)]
struct FramingHeaders {
    content_length: ContentLength,
    transfer_encoding: TransferEncoding,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ContentLength {
    #[default]
    Absent,
    Valid(u64),
    /// Unparsable, or several values that disagree.
    Invalid,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum TransferEncoding {
    #[default]
    Absent,
    /// The final coding is chunked.
    Chunked,
    /// The final coding is something else: the body runs until close.
    Other,
}

impl FramingHeaders {
    fn absorb(&mut self, header: &httparse::Header<'_>) {
        if header.name.eq_ignore_ascii_case("content-length") {
            self.content_length = self.content_length.with_value(header.value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            self.transfer_encoding = TransferEncoding::from_value(header.value);
        }
    }

    /// RFC 9112 section 6.3: Transfer-Encoding wins over Content-Length; no length means no body.
    fn request_framing(&self) -> Framing {
        match (self.transfer_encoding, self.content_length) {
            (TransferEncoding::Chunked, _) => Framing::Body(Body::Chunked(ChunkState::START)),
            // A request cannot be read until close: its length is unknowable.
            (TransferEncoding::Other, _) | (_, ContentLength::Invalid) => Framing::Invalid,
            (TransferEncoding::Absent, ContentLength::Absent | ContentLength::Valid(0)) => Framing::NoBody,
            (TransferEncoding::Absent, ContentLength::Valid(length)) => Framing::Body(Body::Length(length)),
        }
    }

    /// Framing of a response that may have a body (status and request method checked by the caller).
    fn response_framing(&self) -> Framing {
        match (self.transfer_encoding, self.content_length) {
            (TransferEncoding::Chunked, _) => Framing::Body(Body::Chunked(ChunkState::START)),
            (TransferEncoding::Other, _) => Framing::Body(Body::UntilClose),
            (TransferEncoding::Absent, ContentLength::Invalid) => Framing::Invalid,
            (TransferEncoding::Absent, ContentLength::Valid(0)) => Framing::NoBody,
            (TransferEncoding::Absent, ContentLength::Valid(length)) => Framing::Body(Body::Length(length)),
            (TransferEncoding::Absent, ContentLength::Absent) => Framing::Body(Body::UntilClose),
        }
    }
}

impl ContentLength {
    /// Folds one header value in; "5, 5" and repeated equal headers are tolerated (RFC 9110 section 8.6).
    fn with_value(self, value: &[u8]) -> Self {
        value.split(|&byte| byte == b',').fold(self, ContentLength::with_item)
    }

    fn with_item(self, item: &[u8]) -> Self {
        match (self, parse_decimal(item.trim_ascii())) {
            (ContentLength::Absent, Some(length)) => ContentLength::Valid(length),
            (ContentLength::Valid(known), Some(length)) if known == length => self,
            _ => ContentLength::Invalid,
        }
    }
}

impl TransferEncoding {
    fn from_value(value: &[u8]) -> Self {
        let last_coding = value.rsplit(|&byte| byte == b',').map(<[u8]>::trim_ascii).find(|coding| !coding.is_empty());
        match last_coding {
            Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => TransferEncoding::Chunked,
            _ => TransferEncoding::Other,
        }
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

struct ParsedRequest {
    head: RequestHead,
    framing: FramingHeaders,
}

struct ParsedResponse {
    head: ResponseHead,
    framing: FramingHeaders,
}

enum ParsedHead {
    Request(ParsedRequest),
    Response(ParsedResponse),
}

enum HeadParse {
    Complete {
        head: ParsedHead,
        len: usize,
    },
    Partial,
    /// A well-formed head with more fields than MAX_HEADERS.
    TooManyHeaders,
    Invalid,
}

fn parse_head(side: Side, bytes: &[u8]) -> HeadParse {
    match side {
        Side::Request => parse_request(bytes),
        Side::Response => parse_response(bytes),
    }
}

fn parse_request(bytes: &[u8]) -> HeadParse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => match request_from(&request) {
            Some(parsed) => HeadParse::Complete { head: ParsedHead::Request(parsed), len },
            None => HeadParse::Invalid,
        },
        Ok(httparse::Status::Partial) => HeadParse::Partial,
        Err(httparse::Error::TooManyHeaders) => HeadParse::TooManyHeaders,
        Err(_) => HeadParse::Invalid,
    }
}

fn parse_response(bytes: &[u8]) -> HeadParse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => match response_from(&response) {
            Some(parsed) => HeadParse::Complete { head: ParsedHead::Response(parsed), len },
            None => HeadParse::Invalid,
        },
        Ok(httparse::Status::Partial) => HeadParse::Partial,
        Err(httparse::Error::TooManyHeaders) => HeadParse::TooManyHeaders,
        Err(_) => HeadParse::Invalid,
    }
}

fn request_from(request: &httparse::Request<'_, '_>) -> Option<ParsedRequest> {
    let mut head = RequestHead {
        method: request.method?.to_owned(),
        target: request.path?.to_owned(),
        version_minor: request.version?,
        host: None,
        context: Vec::new(),
        truncated: false,
    };
    let mut framing = FramingHeaders::default();
    for header in request.headers.iter() {
        framing.absorb(header);
        absorb_request_header(&mut head, header);
    }
    Some(ParsedRequest { head, framing })
}

fn absorb_request_header(head: &mut RequestHead, header: &httparse::Header<'_>) {
    let value = || String::from_utf8_lossy(header.value).trim().to_owned();
    if header.name.eq_ignore_ascii_case("host") {
        head.host.get_or_insert_with(value);
    } else if let Some(name) = CONTEXT_HEADERS.iter().find(|name| header.name.eq_ignore_ascii_case(name)) {
        head.context.push(((*name).to_owned(), value()));
    }
}

fn response_from(response: &httparse::Response<'_, '_>) -> Option<ParsedResponse> {
    let head = ResponseHead { status: response.code?, version_minor: response.version? };
    let mut framing = FramingHeaders::default();
    for header in response.headers.iter() {
        framing.absorb(header);
    }
    Some(ParsedResponse { head, framing })
}

/// Decodes the whole lines of a head cut short: the start line and the header lines before the cut.
/// Keeps the start line and at most MAX_HEADERS header lines, so an overlong head still decodes.
fn parse_whole_lines(side: Side, bytes: &[u8]) -> Option<ParsedHead> {
    let line_ends = bytes.iter().enumerate().filter(|(_, &byte)| byte == b'\n').map(|(index, _)| index);
    let last_kept_line_end = line_ends.take(MAX_HEADERS + 1).last()?;
    let mut whole_lines = bytes.get(..=last_kept_line_end)?.to_vec();
    whole_lines.extend_from_slice(b"\r\n");
    match parse_head(side, &whole_lines) {
        HeadParse::Complete { head, .. } => Some(head),
        HeadParse::Partial | HeadParse::TooManyHeaders | HeadParse::Invalid => None,
    }
}

fn is_interim(status: u16) -> bool {
    (100..200).contains(&status)
}

fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// RFC 9112 section 6.3: responses to HEAD, 204 and 304 end with their head.
fn has_no_body(status: u16, method: Option<Method>) -> bool {
    method == Some(Method::Head) || status == 204 || status == 304
}

fn looks_like_message_start(side: Side, bytes: &[u8]) -> bool {
    match side {
        Side::Request => looks_like_request_start(bytes),
        Side::Response => looks_like_response_start(bytes),
    }
}

/// Like `looks_like_*_start`, but accepts a message start still arriving a byte at a time.
fn could_begin_message(side: Side, bytes: &[u8]) -> bool {
    match side {
        Side::Request => REQUEST_STARTS.iter().any(|start| agrees_with_start(bytes, start)),
        Side::Response => agrees_with_start(bytes, RESPONSE_START),
    }
}

/// True when `bytes` and `start` match over their common length.
fn agrees_with_start(bytes: &[u8], start: &[u8]) -> bool {
    bytes.iter().zip(start).all(|(byte, expected)| byte == expected)
}

/// A whole (fully captured) segment ending with the last chunk closes a chunked body we lost track of.
fn ends_with_last_chunk(segment: &Segment<'_>, captured: &[u8]) -> bool {
    let whole = len_u64(captured) == segment.len;
    whole && (captured == LAST_CHUNK || captured.ends_with(LAST_CHUNK_AFTER_DATA))
}

/// Empty lines before a message are allowed (RFC 9112 section 2.2) and left over by sloppy peers.
fn skip_blank_lines(bytes: &[u8]) -> &[u8] {
    let first_content = bytes.iter().position(|byte| !matches!(byte, b'\r' | b'\n'));
    first_content.and_then(|start| bytes.get(start..)).unwrap_or_default()
}

/// The captured payload, never longer than the bytes the syscall moved.
fn captured_bytes<'a>(segment: &Segment<'a>) -> &'a [u8] {
    let moved = usize::try_from(segment.len).unwrap_or(usize::MAX);
    segment.payload.get(..moved).unwrap_or(segment.payload)
}

/// How many of `available` bytes fall within `remaining`.
fn prefix_len(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |remaining| remaining.min(available))
}

fn len_u64(bytes: &[u8]) -> u64 {
    len_u64_of(bytes.len())
}

fn len_u64_of(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::test_rng::XorShift;
    use std::collections::HashSet;

    const GET_A: &[u8] = b"GET /a?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n";
    const OK_2: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    /// A fully captured segment whose bytes span `at_ns ..= at_ns + 5`.
    fn seg(side: Side, at_ns: u64, bytes: &[u8]) -> Segment<'_> {
        Segment {
            side,
            first_byte_ns: at_ns,
            last_byte_ns: at_ns + 5,
            len: bytes.len() as u64,
            payload: bytes,
            gap_before: false,
        }
    }

    fn req(at_ns: u64, bytes: &[u8]) -> Segment<'_> {
        seg(Side::Request, at_ns, bytes)
    }

    fn resp(at_ns: u64, bytes: &[u8]) -> Segment<'_> {
        seg(Side::Response, at_ns, bytes)
    }

    /// The same segment, but the syscall moved `len` bytes of which only the payload was captured.
    fn moved(segment: Segment<'_>, len: u64) -> Segment<'_> {
        Segment { len, ..segment }
    }

    fn after_gap(segment: Segment<'_>) -> Segment<'_> {
        Segment { gap_before: true, ..segment }
    }

    fn feed(connection: &mut Http1Connection, segments: &[Segment<'_>]) -> Vec<Output> {
        let mut out = Vec::new();
        for segment in segments {
            connection.push(segment, &mut out);
        }
        out
    }

    fn ended(id: u64, status: Option<u16>, end_ns: u64, outcome: Outcome) -> Output {
        let response = status.map(|status| ResponseHead { status, version_minor: 1 });
        Output::ExchangeEnded { id, response, end_ns, outcome }
    }

    fn complete(id: u64, status: u16, end_ns: u64) -> Output {
        ended(id, Some(status), end_ns, Outcome::Complete)
    }

    fn started_head(output: &Output) -> &RequestHead {
        match output {
            Output::RequestStarted { head, .. } => head,
            other => panic!("expected RequestStarted, got {other:?}"),
        }
    }

    fn started(id: u64, start_ns: u64, output: &Output) -> &RequestHead {
        match output {
            Output::RequestStarted { id: got_id, start_ns: got_start, head } => {
                assert_eq!((*got_id, *got_start), (id, start_ns), "{output:?}");
                head
            }
            other => panic!("expected RequestStarted, got {other:?}"),
        }
    }

    #[test]
    fn keep_alive_exchanges() {
        let mut connection = Http1Connection::new();
        for round in 0..3u64 {
            let at = round * 100;
            let out = feed(&mut connection, &[req(at, GET_A), resp(at + 50, OK_2)]);
            assert_eq!(out.len(), 2, "{out:?}");
            let head = started(round, at, &out[0]);
            assert_eq!(head.method, "GET");
            assert_eq!(head.target, "/a?x=1");
            assert_eq!(head.version_minor, 1);
            assert_eq!(head.host.as_deref(), Some("example.com"));
            assert!(!head.truncated);
            assert_eq!(out[1], complete(round, 200, at + 55));
        }
        assert_eq!(connection.desync_count(), 0);
    }

    #[test]
    fn request_head_split_byte_by_byte() {
        let mut connection = Http1Connection::new();
        let mut out = Vec::new();
        for (index, byte) in GET_A.iter().enumerate() {
            assert!(out.is_empty(), "started before the head was complete");
            connection.push(&req(1000 + index as u64, std::slice::from_ref(byte)), &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(started(0, 1000, &out[0]).target, "/a?x=1");
        let out = feed(&mut connection, &[resp(5000, OK_2)]);
        assert_eq!(out, vec![complete(0, 200, 5005)]);
    }

    #[test]
    fn response_head_split_in_small_reads() {
        let mut connection = Http1Connection::new();
        feed(&mut connection, &[req(0, GET_A)]);
        let pieces: Vec<Segment<'_>> =
            OK_2.chunks(3).enumerate().map(|(index, piece)| resp(100 + 10 * index as u64, piece)).collect();
        let out = feed(&mut connection, &pieces);
        let last_end = 100 + 10 * (pieces.len() as u64 - 1) + 5;
        assert_eq!(out, vec![complete(0, 200, last_end)]);
    }

    #[test]
    fn pipelined_requests_pair_with_responses_in_order() {
        let requests = [GET_A, b"GET /b HTTP/1.1\r\n\r\n", b"GET /c HTTP/1.1\r\n\r\n"].concat();
        let not_found: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let created: &[u8] = b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc";

        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[req(10, &requests)]);
        let targets: Vec<&str> = out.iter().map(|output| started_head(output).target.as_str()).collect();
        assert_eq!(targets, ["/a?x=1", "/b", "/c"]);
        let out = feed(&mut connection, &[resp(20, OK_2), resp(30, not_found), resp(40, created)]);
        assert_eq!(out, vec![complete(0, 200, 25), complete(1, 404, 35), complete(2, 201, 45)]);

        let responses = [OK_2, not_found, created].concat();
        let out = feed(&mut connection, &[req(50, &requests), resp(60, &responses)]);
        assert_eq!(out.len(), 6);
        assert_eq!(&out[3..], &[complete(3, 200, 65), complete(4, 404, 65), complete(5, 201, 65)]);
    }

    #[test]
    fn content_length_bodies_count_blind_bytes() {
        let upload: &[u8] = b"POST /up HTTP/1.1\r\nContent-Length: 100000\r\n\r\n";
        let download: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[
                req(0, upload),
                moved(req(10, b""), 60_000),
                moved(req(20, b"abc"), 40_000),
                moved(resp(30, download), download.len() as u64 + 60_000),
                moved(resp(40, b""), 39_999),
            ],
        );
        assert_eq!(out.len(), 1, "{out:?}");
        let out = feed(&mut connection, &[moved(resp(50, b""), 1)]);
        assert_eq!(out, vec![complete(0, 200, 55)]);
        // The request side is back at a message boundary too.
        let out = feed(&mut connection, &[req(60, GET_A), resp(70, OK_2)]);
        started(1, 60, &out[0]);
        assert_eq!(out[1], complete(1, 200, 75));
        assert_eq!(connection.desync_count(), 0);
    }

    #[test]
    fn chunked_response_split_across_segments() {
        let response: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n";
        for piece_len in [1, 2, 3, 7, 16, response.len()] {
            let mut connection = Http1Connection::new();
            feed(&mut connection, &[req(0, GET_A)]);
            let pieces: Vec<Segment<'_>> =
                response.chunks(piece_len).enumerate().map(|(index, piece)| resp(100 + index as u64, piece)).collect();
            let (last, before) = pieces.split_last().expect("at least one piece");
            assert!(feed(&mut connection, before).is_empty(), "ended early with pieces of {piece_len}");
            let out = feed(&mut connection, std::slice::from_ref(last));
            assert_eq!(out, vec![complete(0, 200, last.last_byte_ns)]);
            let out = feed(&mut connection, &[req(500, GET_A), resp(600, OK_2)]);
            assert_eq!(out[1], complete(1, 200, 605));
        }
    }

    #[test]
    fn chunked_response_with_blind_middle_ends_on_captured_last_chunk() {
        let first: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\nabc";
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[
                req(0, GET_A),
                // Blind bytes run past the 0x1000-byte chunk: the next size line is never seen.
                moved(resp(10, first), first.len() as u64 + 5000),
                moved(resp(20, b""), 3000),
                moved(resp(30, b"f1"), 8000),
            ],
        );
        assert_eq!(out.len(), 1, "{out:?}");
        let out = feed(&mut connection, &[resp(40, b"\r\n0\r\n\r\n")]);
        assert_eq!(out, vec![complete(0, 200, 45)]);
        let out = feed(&mut connection, &[req(50, GET_A), resp(60, OK_2)]);
        assert_eq!(out[1], complete(1, 200, 65));
        assert_eq!(connection.desync_count(), 0);
    }

    #[test]
    fn chunked_body_stays_in_sync_when_blind_bytes_end_inside_a_chunk() {
        let first: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123";
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[req(0, GET_A), moved(resp(10, first), first.len() as u64 + 12), resp(20, b"\r\n0\r\n\r\n")],
        );
        assert_eq!(out[1], complete(0, 200, 25));
    }

    #[test]
    fn expect_continue_interim_response_keeps_exchange_open() {
        let head: &[u8] = b"POST /items HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[req(0, head), resp(10, b"HTTP/1.1 100 Continue\r\n\r\n"), req(20, b"data")]);
        assert_eq!(out.len(), 1);
        started(0, 0, &out[0]);
        let out = feed(&mut connection, &[resp(30, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")]);
        assert_eq!(out, vec![complete(0, 201, 35)]);
    }

    #[test]
    fn head_response_has_no_body() {
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[
                req(0, b"HEAD /big HTTP/1.1\r\n\r\n"),
                resp(10, b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\n\r\n"),
                req(20, GET_A),
                resp(30, OK_2),
            ],
        );
        assert_eq!(out[1], complete(0, 200, 15));
        assert_eq!(out[3], complete(1, 200, 35));
    }

    #[test]
    fn no_content_and_not_modified_have_no_body() {
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[
                req(0, GET_A),
                resp(10, b"HTTP/1.1 204 No Content\r\n\r\n"),
                req(20, GET_A),
                resp(30, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"),
                req(40, GET_A),
                resp(50, OK_2),
            ],
        );
        let ends: Vec<&Output> = out.iter().skip(1).step_by(2).collect();
        assert_eq!(ends, [&complete(0, 204, 15), &complete(1, 304, 35), &complete(2, 200, 55)]);
    }

    #[test]
    fn response_without_length_ends_complete_at_close() {
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[req(0, b"GET / HTTP/1.0\r\n\r\n"), resp(10, b"HTTP/1.0 200 OK\r\n\r\nabc"), resp(20, b"more body")],
        );
        assert_eq!(started_head(&out[0]).version_minor, 0);
        assert_eq!(out.len(), 1);
        let mut out = Vec::new();
        connection.close(100, &mut out);
        let response = Some(ResponseHead { status: 200, version_minor: 0 });
        assert_eq!(out, vec![Output::ExchangeEnded { id: 0, response, end_ns: 25, outcome: Outcome::Complete }]);
    }

    #[test]
    fn close_mid_response_ends_open_exchanges() {
        let mut connection = Http1Connection::new();
        let requests = [GET_A, GET_A].concat();
        feed(&mut connection, &[req(0, &requests), resp(10, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")]);
        let mut out = Vec::new();
        connection.close(100, &mut out);
        assert_eq!(
            out,
            vec![ended(0, Some(200), 100, Outcome::ConnectionClosed), ended(1, None, 100, Outcome::ConnectionClosed)]
        );
        connection.close(200, &mut out);
        assert_eq!(out.len(), 2, "a second close has nothing left to end");
    }

    #[test]
    fn switching_protocols_upgrades_and_ignores_the_rest() {
        let upgrade: &[u8] = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let switching: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[req(0, upgrade), resp(10, switching)]);
        assert_eq!(out[1], complete(0, 101, 15));
        assert!(connection.is_upgraded());
        let out = feed(&mut connection, &[req(20, GET_A), resp(30, OK_2), req(40, b"\x82\x00garbage")]);
        assert!(out.is_empty());
        assert_eq!(connection.desync_count(), 0);
    }

    #[test]
    fn connect_tunnel_stops_decoding() {
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[
                req(0, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
                resp(10, b"HTTP/1.1 200 Connection Established\r\n\r\n"),
                req(20, b"\x16\x03\x01\x02\x00"),
            ],
        );
        assert_eq!(out[1], complete(0, 200, 15));
        assert!(connection.is_upgraded());
    }

    #[test]
    fn gap_desynchronises_then_recovers_at_next_request() {
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[
                req(0, GET_A),
                resp(10, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"),
                after_gap(resp(30, b"body bytes after the loss")),
            ],
        );
        assert_eq!(out[1], ended(0, Some(200), 15, Outcome::Desynchronised));
        assert_eq!(connection.desync_count(), 1);
        let out = feed(&mut connection, &[resp(40, b"more lost body"), req(50, GET_A), resp(60, OK_2)]);
        started(1, 50, &out[0]);
        assert_eq!(out[1], complete(1, 200, 65));
        assert_eq!(connection.desync_count(), 1);
    }

    #[test]
    fn gap_on_a_segment_that_starts_a_request_decodes_it() {
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[req(0, GET_A), after_gap(req(20, GET_A)), resp(30, OK_2)]);
        assert_eq!(out[1], ended(0, None, 5, Outcome::Desynchronised));
        started(1, 20, &out[2]);
        assert_eq!(out[3], complete(1, 200, 35));
    }

    #[test]
    fn truncated_request_head_keeps_whole_lines_then_recovers() {
        let captured: &[u8] = b"GET /cut HTTP/1.1\r\nHost: svc\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nUser-Ag";
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[moved(req(0, captured), 900)]);
        let head = started(0, 0, &out[0]);
        assert!(head.truncated);
        assert_eq!(head.target, "/cut");
        assert_eq!(head.host.as_deref(), Some("svc"));
        assert_eq!(head.context.len(), 1);
        let out = feed(&mut connection, &[moved(req(10, b""), 50), resp(20, OK_2), req(30, GET_A), resp(40, OK_2)]);
        assert_eq!(out[0], complete(0, 200, 25));
        assert!(!started(1, 30, &out[1]).truncated);
        assert_eq!(out[2], complete(1, 200, 45));
        assert_eq!(connection.desync_count(), 0);
    }

    #[test]
    fn request_line_cut_by_capture_is_not_reported() {
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[moved(req(0, b"GET /very/long/pa"), 500), req(10, GET_A), resp(20, OK_2)]);
        started(0, 10, &out[0]);
        assert_eq!(out[1], complete(0, 200, 25));
    }

    #[test]
    fn truncated_response_head_reports_status_and_ends_at_next_response() {
        let mut connection = Http1Connection::new();
        let requests = [GET_A, GET_A].concat();
        let out = feed(
            &mut connection,
            &[
                req(0, &requests),
                moved(resp(10, b"HTTP/1.1 503 Service Unavailable\r\nContent-Ty"), 4000),
                moved(resp(20, b""), 100),
                resp(30, OK_2),
            ],
        );
        assert_eq!(&out[2..], &[complete(0, 503, 25), complete(1, 200, 35)]);
    }

    #[test]
    fn blind_response_ends_complete_at_close() {
        let mut connection = Http1Connection::new();
        let first: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n";
        feed(&mut connection, &[req(0, GET_A), moved(resp(10, first), 5000), moved(resp(20, b""), 5000)]);
        let mut out = Vec::new();
        connection.close(100, &mut out);
        assert_eq!(out, vec![complete(0, 200, 25)]);
    }

    #[test]
    fn conflicting_content_lengths_desynchronise_the_response() {
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[req(0, GET_A), resp(10, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")],
        );
        assert_eq!(out[1], ended(0, Some(200), 15, Outcome::Desynchronised));
        assert_eq!(connection.desync_count(), 1);
        let out = feed(&mut connection, &[req(20, GET_A), resp(30, OK_2)]);
        assert_eq!(out[1], complete(1, 200, 35));
    }

    #[test]
    fn oversized_head_is_treated_as_truncated() {
        let mut head = b"GET /huge HTTP/1.1\r\nHost: h\r\nX-Big: ".to_vec();
        head.resize(MAX_HEAD_BYTES + 5000, b'a');
        let mut connection = Http1Connection::new();
        let mut out = Vec::new();
        for piece in head.chunks(1000) {
            connection.push(&req(0, piece), &mut out);
            assert!(connection.requests.head.len() <= MAX_HEAD_BYTES);
        }
        let head = started(0, 0, &out[0]);
        assert!(head.truncated);
        assert_eq!(head.host.as_deref(), Some("h"));
    }

    #[test]
    fn head_with_too_many_headers_keeps_the_first_ones() {
        let mut request = b"GET /many HTTP/1.1\r\nHost: h\r\ntraceparent: 00-abc-def-01\r\n".to_vec();
        for index in 0..MAX_HEADERS {
            request.extend_from_slice(format!("X-Filler-{index}: v\r\n").as_bytes());
        }
        request.extend_from_slice(b"b3: late\r\n\r\n");
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[req(0, &request), resp(10, OK_2), req(20, GET_A), resp(30, OK_2)]);
        let head = started(0, 0, &out[0]);
        assert!(head.truncated);
        assert_eq!(head.host.as_deref(), Some("h"));
        assert_eq!(head.context, [("traceparent".to_owned(), "00-abc-def-01".to_owned())]);
        assert_eq!(out[1], complete(0, 200, 15));
        started(1, 20, &out[2]);
        assert_eq!(out[3], complete(1, 200, 35));
    }

    #[test]
    fn trace_context_headers_are_collected_in_order() {
        let request: &[u8] =
            b"GET / HTTP/1.1\r\nTraceparent:  00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 \r\n\
            tracestate: congo=t61rcWkgMzE\r\nAccept: */*\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\
            X-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\nx-b3-SPANID: a2fb4a1d1a96d312\r\nX-B3-Sampled: 1\r\n\r\n";
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[req(0, request)]);
        let context: Vec<(&str, &str)> =
            started_head(&out[0]).context.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        assert_eq!(
            context,
            [
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ("tracestate", "congo=t61rcWkgMzE"),
                ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
                ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-sampled", "1"),
            ]
        );
    }

    #[test]
    fn timings_come_from_first_request_and_last_response_segments() {
        let mut connection = Http1Connection::new();
        let segments = [
            Segment { first_byte_ns: 1_000, last_byte_ns: 1_100, ..req(0, b"POST /t HTTP/1.1\r\nContent-") },
            Segment { first_byte_ns: 2_000, last_byte_ns: 2_100, ..req(0, b"Length: 2\r\n\r\nhi") },
            Segment {
                first_byte_ns: 5_000,
                last_byte_ns: 5_100,
                ..resp(0, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            },
            Segment { first_byte_ns: 7_000, last_byte_ns: 7_300, ..resp(0, b"cd") },
        ];
        let out = feed(&mut connection, &segments);
        started(0, 1_000, &out[0]);
        assert_eq!(out[1], complete(0, 200, 7_300));
    }

    #[test]
    fn garbage_is_ignored_until_a_request_starts() {
        let mut connection = Http1Connection::new();
        let out = feed(
            &mut connection,
            &[req(0, b"\x16\x03\x01\x02\x00\x01"), req(10, b"more binary"), resp(20, b"\x17\x03\x03")],
        );
        assert!(out.is_empty());
        assert_eq!(connection.desync_count(), 2);
        let out = feed(&mut connection, &[req(30, GET_A), resp(40, OK_2)]);
        started(0, 30, &out[0]);
        assert_eq!(out[1], complete(0, 200, 45));
    }

    #[test]
    fn invalid_head_counts_as_desync() {
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[req(0, b"GET / HTTP/9.9\r\n\r\n")]);
        assert!(out.is_empty());
        assert_eq!(connection.desync_count(), 1);
    }

    #[test]
    fn chunked_request_body_is_framed() {
        let mut connection = Http1Connection::new();
        let request: &[u8] =
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\n\r\n";
        let out = feed(&mut connection, &[req(0, request)]);
        let targets: Vec<&str> = out.iter().map(|output| started_head(output).target.as_str()).collect();
        assert_eq!(targets, ["/c", "/next"]);
    }

    #[test]
    fn open_exchanges_are_capped() {
        let mut connection = Http1Connection::new();
        let requests = GET_A.repeat(MAX_OPEN_EXCHANGES + 8);
        let out = feed(&mut connection, &[req(0, &requests)]);
        let evicted = out.iter().filter(|output| matches!(output, Output::ExchangeEnded { .. })).count();
        assert_eq!(evicted, 8);
        assert_eq!(connection.open_exchanges(), MAX_OPEN_EXCHANGES);
        assert_eq!(connection.desync_count(), 8);
    }

    #[test]
    fn payload_longer_than_len_is_clamped() {
        let mut connection = Http1Connection::new();
        let out = feed(&mut connection, &[Segment { len: 10, ..req(0, GET_A) }]);
        assert!(out.is_empty());
    }

    #[test]
    fn message_start_checks() {
        assert!(looks_like_request_start(b"GET / HTTP/1.1"));
        assert!(looks_like_request_start(b"OPTIONS * HTTP/1.1"));
        assert!(!looks_like_request_start(b"GET"));
        assert!(!looks_like_request_start(b"get / HTTP/1.1"));
        assert!(!looks_like_request_start(b"PROPFIND / HTTP/1.1"));
        assert!(looks_like_response_start(b"HTTP/1.1 200 OK"));
        assert!(looks_like_response_start(b"HTTP/1.0 200 OK"));
        assert!(!looks_like_response_start(b"HTTP/2 200"));
        assert!(!looks_like_response_start(b""));
    }

    #[test]
    fn content_length_and_transfer_encoding_rules() {
        assert_eq!(ContentLength::Absent.with_value(b" 42 "), ContentLength::Valid(42));
        assert_eq!(ContentLength::Absent.with_value(b"7, 7"), ContentLength::Valid(7));
        assert_eq!(ContentLength::Valid(7).with_value(b"8"), ContentLength::Invalid);
        assert_eq!(ContentLength::Absent.with_value(b"+5"), ContentLength::Invalid);
        assert_eq!(ContentLength::Absent.with_value(b"99999999999999999999999"), ContentLength::Invalid);
        assert_eq!(TransferEncoding::from_value(b"gzip, Chunked"), TransferEncoding::Chunked);
        assert_eq!(TransferEncoding::from_value(b"chunked, gzip"), TransferEncoding::Other);
        assert_eq!(TransferEncoding::from_value(b"chunked,"), TransferEncoding::Chunked);
    }


    /// Valid exchanges: request bytes, response bytes, final status.
    const TRAFFIC: [(&[u8], &[u8], u16); 7] = [
        (GET_A, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200),
        (
            b"POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n",
            201,
        ),
        (b"HEAD /c HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 200),
        (b"GET /d HTTP/1.1\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n", 204),
        (b"GET /e HTTP/1.1\r\nIf-None-Match: x\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 77\r\n\r\n", 304),
        (
            b"PUT /f HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\nwxyz\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            200,
        ),
        (
            b"POST /g HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            200,
        ),
    ];

    fn random_pieces<'b>(rng: &mut XorShift, bytes: &'b [u8]) -> Vec<&'b [u8]> {
        let max_piece = [1, 2, 7, 64, bytes.len()][rng.below(5)];
        let mut pieces = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at((1 + rng.below(max_piece)).min(rest.len()));
            pieces.push(piece);
            rest = tail;
        }
        pieces
    }

    #[test]
    fn random_splits_of_valid_traffic_decode_completely() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut connection = Http1Connection::new();
        let mut next_id = 0;
        for round in 0..2_000u64 {
            let batch: Vec<_> = (0..1 + rng.below(5)).map(|_| TRAFFIC[rng.below(TRAFFIC.len())]).collect();
            let requests: Vec<u8> = batch.iter().flat_map(|(request, _, _)| request.iter().copied()).collect();
            let responses: Vec<u8> = batch.iter().flat_map(|(_, response, _)| response.iter().copied()).collect();
            let mut out = Vec::new();
            for piece in random_pieces(&mut rng, &requests) {
                connection.push(&req(round, piece), &mut out);
            }
            assert_eq!(out.len(), batch.len(), "round {round}: {out:?}");
            out.clear();
            for piece in random_pieces(&mut rng, &responses) {
                connection.push(&resp(round, piece), &mut out);
            }
            let expected: Vec<Output> = batch
                .iter()
                .map(|(_, _, status)| {
                    next_id += 1;
                    complete(next_id - 1, *status, round + 5)
                })
                .collect();
            assert_eq!(out, expected, "round {round}");
        }
        assert_eq!(connection.desync_count(), 0);
    }

    /// Checks each id starts once, ends at most once and only after it started.
    #[derive(Default)]
    struct Ledger {
        started: HashSet<u64>,
        ended: HashSet<u64>,
    }

    impl Ledger {
        fn record(&mut self, outputs: &[Output]) {
            for output in outputs {
                match output {
                    Output::RequestStarted { id, .. } => assert!(self.started.insert(*id), "{id} started twice"),
                    Output::ExchangeEnded { id, .. } => {
                        assert!(self.started.contains(id), "{id} ended before it started");
                        assert!(self.ended.insert(*id), "{id} ended twice");
                    }
                }
            }
        }

        fn all_ended(&self) -> bool {
            self.started == self.ended
        }
    }

    fn random_payload(rng: &mut XorShift, traffic: &[u8], oversized: &[u8]) -> Vec<u8> {
        match rng.below(4) {
            0 => (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
            1 => oversized.get(..rng.below(oversized.len())).unwrap_or_default().to_vec(),
            _ => {
                let start = rng.below(traffic.len());
                let end = (start + rng.below(300)).min(traffic.len());
                traffic.get(start..end).unwrap_or_default().to_vec()
            }
        }
    }

    fn assert_bounded(connection: &Http1Connection) {
        for decoder in [&connection.requests, &connection.responses] {
            assert!(decoder.head.len() <= MAX_HEAD_BYTES);
            assert!(decoder.head.bytes.capacity() <= 2 * MAX_HEAD_BYTES);
        }
        assert!(connection.open_exchanges() <= MAX_OPEN_EXCHANGES);
    }

    #[test]
    fn fuzz_random_segments_never_panic_and_stay_bounded() {
        let traffic: Vec<u8> =
            TRAFFIC.iter().flat_map(|(request, response, _)| [*request, *response].concat()).collect();
        let mut oversized = b"GET /x HTTP/1.1\r\nX: ".to_vec();
        oversized.resize(MAX_HEAD_BYTES + 2048, b'y');
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        let mut connection = Http1Connection::new();
        let mut ledger = Ledger::default();
        let mut now = 0u64;
        let mut out = Vec::new();
        for _ in 0..20_000 {
            out.clear();
            now += rng.next() % 1000;
            if rng.chance(3) || connection.is_upgraded() {
                connection.close(now, &mut out);
                ledger.record(&out);
                assert!(ledger.all_ended(), "close left exchanges open");
                connection = Http1Connection::new();
                ledger = Ledger::default();
                continue;
            }
            let payload = random_payload(&mut rng, &traffic, &oversized);
            let blind = [0, 0, rng.next() % 200, rng.next() % 200_000][rng.below(4)];
            let segment = Segment {
                side: if rng.chance(50) { Side::Request } else { Side::Response },
                first_byte_ns: now,
                last_byte_ns: if rng.chance(5) { rng.next() } else { now + rng.next() % 100 },
                // Sometimes shorter than the payload: the decoder must clamp.
                len: if rng.chance(3) { rng.next() % 100 } else { payload.len() as u64 + blind },
                payload: &payload,
                gap_before: rng.chance(2),
            };
            connection.push(&segment, &mut out);
            ledger.record(&out);
            assert_bounded(&connection);
        }
    }
}
