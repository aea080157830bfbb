//! One h2c connection: frames both directions, decodes their header blocks and follows the streams.

use super::{
    frames::{flag, kind, Frame, FrameHeader, FrameSink, Framer, SyscallTimes},
    hpack::Decoder,
    streams::{Flow, Streams},
    Desync, H2Event, Headers, Piece, Role, MAX_HEADER_BLOCK, MAX_KEPT_BLOCK, MAX_KEPT_FIELDS, MAX_KEPT_VALUE,
    UNKNOWN_ERROR_CODE,
};

/// SETTINGS_HEADER_TABLE_SIZE (RFC 9113 §6.5.2).
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
/// A header block buffer that grew past this is released after its block.
const KEPT_BLOCK_CAPACITY: usize = 64 << 10;

/// Decodes one HTTP/2 connection, both directions.
#[derive(Debug)]
pub struct H2Connection {
    role: Role,
    /// Per flow, indexed by `Flow as usize`.
    sides: [Side; 2],
    streams: Streams,
    desync: Option<Desync>,
    closed: bool,
    truncated_blocks: u64,
    /// Which fields header blocks keep (all when None); every field is still decoded.
    keep: Option<fn(&[u8]) -> bool>,
}

/// One direction: its frames, its encoder's HPACK state, and a header block awaiting CONTINUATIONs.
#[derive(Debug)]
struct Side {
    framer: Framer,
    decoder: Decoder,
    block: HeaderBlock,
}

impl Side {
    fn new(flow: Flow) -> Self {
        Self { framer: Framer::new(flow == Flow::ToServer), decoder: Decoder::default(), block: HeaderBlock::default() }
    }

    fn upgraded(flow: Flow) -> Self {
        Self { framer: Framer::upgraded(flow == Flow::ToServer), decoder: Decoder::default(), block: HeaderBlock::default() }
    }

    fn lost() -> Self {
        Self { framer: Framer::lost(), decoder: Decoder::default(), block: HeaderBlock::default() }
    }
}

#[derive(Debug, Default)]
struct HeaderBlock {
    /// Set between a HEADERS or PUSH_PROMISE without END_HEADERS and the CONTINUATION with it.
    open: Option<BlockStart>,
    /// The fragments so far.
    bytes: Vec<u8>,
}

/// What the frame starting a header block said.
#[derive(Debug, Clone, Copy)]
struct BlockStart {
    stream_id: u32,
    end_stream: bool,
    promise: bool,
    first: SyscallTimes,
}

impl H2Connection {
    pub fn new(role: Role) -> Self {
        Self {
            role,
            sides: [Side::new(Flow::ToServer), Side::new(Flow::ToClient)], // Flow order
            streams: Streams::default(),
            desync: None,
            closed: false,
            truncated_blocks: 0,
            keep: None,
        }
    }

    /// Keep only the header fields whose (lowercase) name `keep` accepts: what the caller will
    /// read, so that the rest costs no copy.
    pub fn keeping(mut self, keep: fn(&[u8]) -> bool) -> Self {
        self.keep = Some(keep);
        self
    }

    /// A connection upgraded from HTTP/1.1 (`Upgrade: h2c`), from the `101` answer on. Stream 1 is
    /// the request that asked for it (sent whole, at `start_ns`), when it is known.
    pub fn upgraded(role: Role, request: Option<(Headers, u64)>) -> Self {
        let mut connection = Self::new(role);
        connection.sides = [Side::upgraded(Flow::ToServer), Side::upgraded(Flow::ToClient)];
        if let Some((request, start_ns)) = request {
            connection.streams.adopt(1, request, start_ns);
        }
        connection
    }

    /// Feeds a piece; events it completes are appended to `out`.
    pub fn push(&mut self, piece: &Piece<'_>, out: &mut Vec<H2Event>) {
        if self.desync.is_some() || self.closed {
            return;
        }
        let flow = match (self.role, piece.outgoing) {
            (Role::Client, true) | (Role::Server, false) => Flow::ToServer,
            _ => Flow::ToClient,
        };
        // The other direction's last syscall returned before this one started: its uncaptured tail
        // is known lost (pieces come in syscall order).
        let other = if flow == Flow::ToServer { Flow::ToClient } else { Flow::ToServer };
        let result = self.with_handler(other, out, |framer, handler| framer.settle_tail(piece.start_ns, handler));
        let result = result.and_then(|()| self.with_handler(flow, out, |framer, handler| framer.push(piece, handler)));
        match result {
            Ok(()) => {}
            // The other direction was seen from its start: this one's first bytes were lost.
            Err(Desync::NotFromStart) if self.sides[other as usize].framer.started() => {
                self.desynchronise(Desync::LostFrameBoundary)
            }
            Err(desync) => self.desynchronise(desync),
        }
    }

    /// The connection closed: streams still open end with `StreamOutcome::ConnectionClosed`.
    pub fn close(&mut self, end_ns: u64, out: &mut Vec<H2Event>) {
        if self.desync.is_some() || self.closed {
            return;
        }
        self.closed = true;
        for flow in [Flow::ToServer, Flow::ToClient] {
            if let Err(desync) = self.with_handler(flow, out, |framer, handler| framer.settle_tail(u64::MAX, handler)) {
                self.desynchronise(desync);
                return;
            }
        }
        self.streams.close(end_ns, out);
    }

    /// Runs `action` on a direction's framer with the handler of its frames.
    fn with_handler(
        &mut self,
        flow: Flow,
        out: &mut Vec<H2Event>,
        action: impl FnOnce(&mut Framer, &mut FrameHandler<'_>) -> Result<(), Desync>,
    ) -> Result<(), Desync> {
        let [to_server, to_client] = &mut self.sides;
        let (side, peer) = match flow {
            Flow::ToServer => (to_server, to_client),
            Flow::ToClient => (to_client, to_server),
        };
        let mut handler = FrameHandler {
            role: self.role,
            flow,
            decoder: &mut side.decoder,
            block: &mut side.block,
            peer_decoder: &mut peer.decoder,
            streams: &mut self.streams,
            out,
            truncated_blocks: &mut self.truncated_blocks,
            keep: self.keep,
        };
        action(&mut side.framer, &mut handler)
    }

    #[cfg(test)]
    pub fn is_desynchronised(&self) -> bool {
        self.desync.is_some()
    }

    /// 1 when decoding stopped for lost or undecodable bytes (not for a connection first seen after
    /// its start), else 0.
    pub fn desyncs(&self) -> u64 {
        u64::from(self.desync.as_ref().is_some_and(|desync| *desync != Desync::NotFromStart))
    }

    /// Why decoding stopped.
    pub fn desync_reason(&self) -> Option<&Desync> {
        self.desync.as_ref()
    }

    /// Streams dropped unreported beyond [`MAX_OPEN_STREAMS`](super::MAX_OPEN_STREAMS).
    pub fn dropped_streams(&self) -> u64 {
        self.streams.dropped()
    }

    /// Header blocks reported without some of their fields or with values cut (`MAX_KEPT_*`).
    #[cfg(test)]
    pub fn truncated_header_blocks(&self) -> u64 {
        self.truncated_blocks
    }

    /// Stops decoding for good; streams still open are dropped, memory released.
    fn desynchronise(&mut self, desync: Desync) {
        self.desync = Some(desync);
        self.sides = [Side::lost(), Side::lost()];
        self.streams = Streams::default();
    }
}

/// Receives the frames of one direction.
struct FrameHandler<'c> {
    role: Role,
    flow: Flow,
    decoder: &'c mut Decoder,
    block: &'c mut HeaderBlock,
    /// Decodes the other direction, whose table size this direction's SETTINGS announce.
    peer_decoder: &'c mut Decoder,
    streams: &'c mut Streams,
    out: &'c mut Vec<H2Event>,
    truncated_blocks: &'c mut u64,
    keep: Option<fn(&[u8]) -> bool>,
}

impl FrameSink for FrameHandler<'_> {
    fn frame(&mut self, frame: Frame<'_>) -> Result<(), Desync> {
        // Between HEADERS and END_HEADERS only CONTINUATION may come (RFC 9113 §6.10).
        if self.block.open.is_some() && frame.header.kind != kind::CONTINUATION {
            return Err(Desync::BrokenHeaderSequence);
        }
        match frame.header.kind {
            kind::HEADERS | kind::PUSH_PROMISE => self.block_start(&frame)?,
            kind::CONTINUATION => self.continuation(&frame)?,
            kind::DATA => self.data(&frame),
            kind::RST_STREAM => self.reset(&frame),
            kind::SETTINGS => self.settings(&frame),
            kind::GOAWAY => self.goaway(&frame),
            // PRIORITY, PING, WINDOW_UPDATE and unknown types change no stream.
            _ => {}
        }
        Ok(())
    }
}

impl FrameHandler<'_> {
    fn block_start(&mut self, frame: &Frame<'_>) -> Result<(), Desync> {
        let header = frame.header;
        let fragment = fragment(header, header_block_payload(frame)?)?;
        let start = BlockStart {
            stream_id: header.stream_id,
            end_stream: header.kind == kind::HEADERS && header.has(flag::END_STREAM),
            promise: header.kind == kind::PUSH_PROMISE,
            first: frame.first,
        };
        if header.has(flag::END_HEADERS) {
            return self.decode_block(start, fragment, frame.end_ns);
        }
        self.block.bytes.clear();
        self.block.bytes.extend_from_slice(fragment);
        self.block.open = Some(start);
        Ok(())
    }

    fn continuation(&mut self, frame: &Frame<'_>) -> Result<(), Desync> {
        let start = self.block.open.filter(|start| start.stream_id == frame.header.stream_id);
        let Some(start) = start else { return Err(Desync::BrokenHeaderSequence) };
        let payload = header_block_payload(frame)?;
        if self.block.bytes.len() + payload.len() > MAX_HEADER_BLOCK {
            return Err(Desync::HeaderBlockTooLarge);
        }
        self.block.bytes.extend_from_slice(payload);
        if !frame.header.has(flag::END_HEADERS) {
            return Ok(());
        }
        self.block.open = None;
        let mut bytes = std::mem::take(&mut self.block.bytes);
        let result = self.decode_block(start, &bytes, frame.end_ns);
        bytes.clear();
        if bytes.capacity() <= KEPT_BLOCK_CAPACITY {
            self.block.bytes = bytes;
        }
        result
    }

    /// Decodes a whole header block (the table needs every one), keeping the fields of requests
    /// that start streams and of responses to open ones.
    fn decode_block(&mut self, start: BlockStart, block: &[u8], end_ns: u64) -> Result<(), Desync> {
        let id = start.stream_id;
        let wanted = !start.promise
            && match self.flow {
                Flow::ToServer => self.streams.opens(id),
                Flow::ToClient => self.streams.is_open(id),
            };
        let keep = self.keep;
        let mut collector = wanted.then(|| HeaderCollector { keep, ..HeaderCollector::default() });
        self.decoder.decode(block, &mut |name, value| {
            if let Some(collector) = &mut collector {
                collector.add(name, value);
            }
        })?;
        if start.promise {
            return Ok(());
        }
        if let Some(collector) = collector {
            *self.truncated_blocks += u64::from(collector.truncated);
            match self.flow {
                Flow::ToServer => {
                    let start_ns = match self.role {
                        Role::Client => start.first.start_ns,
                        Role::Server => start.first.end_ns,
                    };
                    self.streams.start(id, collector.headers(), start_ns, self.out);
                }
                Flow::ToClient => self.streams.response_headers(id, collector.headers()),
            }
        }
        if start.end_stream {
            self.streams.end_side(self.flow, id, end_ns, self.out);
        }
        if wanted && self.flow == Flow::ToServer {
            self.streams.refuse_after_goaway(id, end_ns, self.out);
        }
        Ok(())
    }

    fn data(&mut self, frame: &Frame<'_>) {
        let header = frame.header;
        let length = u64::from(header.length);
        // Padding (its length byte included) is not body; a pad length not captured counts as 0.
        let body = match (header.has(flag::PADDED), frame.payload.first()) {
            (false, _) => length,
            (true, Some(&pad)) => length.saturating_sub(1 + u64::from(pad)),
            (true, None) => length.saturating_sub(1),
        };
        self.streams.body(self.flow, header.stream_id, body);
        if header.has(flag::END_STREAM) {
            self.streams.end_side(self.flow, header.stream_id, frame.end_ns, self.out);
        }
    }

    fn reset(&mut self, frame: &Frame<'_>) {
        let error_code = frame.payload.first_chunk::<4>().map_or(UNKNOWN_ERROR_CODE, |code| u32::from_be_bytes(*code));
        self.streams.reset(frame.header.stream_id, error_code, frame.end_ns, self.out);
    }

    /// A SETTINGS_HEADER_TABLE_SIZE bounds the table the other direction's encoder may use.
    fn settings(&mut self, frame: &Frame<'_>) {
        if frame.header.has(flag::ACK) {
            return;
        }
        for setting in frame.payload.chunks_exact(6) {
            let Some(&[i0, i1, v0, v1, v2, v3]) = setting.first_chunk::<6>() else { continue };
            if u16::from_be_bytes([i0, i1]) == SETTINGS_HEADER_TABLE_SIZE {
                self.peer_decoder.announce_table_size(Some(u32::from_be_bytes([v0, v1, v2, v3])));
            }
        }
        if !frame.complete || frame.payload.len() < frame.header.length as usize {
            self.peer_decoder.announce_table_size(None);
        }
    }

    /// Only the server's GOAWAY concerns the client's streams.
    fn goaway(&mut self, frame: &Frame<'_>) {
        let Some(fields) = frame.payload.first_chunk::<8>() else { return };
        if self.flow != Flow::ToClient {
            return;
        }
        let [l0, l1, l2, l3, c0, c1, c2, c3] = *fields;
        let last_stream_id = u32::from_be_bytes([l0, l1, l2, l3]) & 0x7fff_ffff;
        self.streams.goaway(last_stream_id, u32::from_be_bytes([c0, c1, c2, c3]), frame.end_ns, self.out);
    }
}

/// The payload of a header block frame, which must be all there.
fn header_block_payload<'f>(frame: &Frame<'f>) -> Result<&'f [u8], Desync> {
    if !frame.complete {
        return Err(Desync::UncapturedHeaderBlock);
    }
    if frame.payload.len() != frame.header.length as usize {
        return Err(Desync::HeaderBlockTooLarge);
    }
    Ok(frame.payload)
}

/// The header block fragment of a HEADERS or PUSH_PROMISE payload: without pad length, priority
/// fields or promised stream id, and padding.
fn fragment(header: FrameHeader, payload: &[u8]) -> Result<&[u8], Desync> {
    let (pad, rest) = match payload.split_first() {
        Some((&pad, rest)) if header.has(flag::PADDED) => (usize::from(pad), rest),
        None if header.has(flag::PADDED) => return Err(Desync::BadPadding),
        _ => (0, payload),
    };
    let leading = match header.kind {
        kind::HEADERS if header.has(flag::PRIORITY) => 5,
        kind::PUSH_PROMISE => 4,
        _ => 0,
    };
    let end = rest.len().checked_sub(pad).ok_or(Desync::BadPadding)?;
    rest.get(leading..end).ok_or(Desync::BadPadding)
}

/// Keeps a header block's fields (those `keep` accepts) within the `MAX_KEPT_*` bounds.
#[derive(Debug, Default)]
struct HeaderCollector {
    fields: Vec<(String, String)>,
    kept_bytes: usize,
    truncated: bool,
    keep: Option<fn(&[u8]) -> bool>,
}

impl HeaderCollector {
    fn add(&mut self, name: &[u8], value: &[u8]) {
        if self.keep.is_some_and(|keep| !keep(name)) {
            return;
        }
        let (kept_name, kept_value) = (cut(name), cut(value));
        let size = kept_name.len() + kept_value.len();
        if self.fields.len() >= MAX_KEPT_FIELDS || self.kept_bytes + size > MAX_KEPT_BLOCK {
            self.truncated = true;
            return;
        }
        self.truncated |= kept_name.len() < name.len() || kept_value.len() < value.len();
        let (name, value) = (kept_name, kept_value);
        self.kept_bytes += size;
        self.fields.push((text(name), text(value)));
    }

    fn headers(self) -> Headers {
        Headers { fields: self.fields }
    }
}

/// Lossy UTF-8, checked first as headers almost always are ASCII.
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn cut(bytes: &[u8]) -> &[u8] {
    bytes.get(..MAX_KEPT_VALUE).unwrap_or(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::protocols::{
        http2::{
            captures::{
                block, capture, frame, integer, plan, push_all, replay, replay_pieces, syscalls, whole, PlannedPiece, Script,
                Syscall, CAPTURES,
            },
            frames::{HEADER_LEN, PREFACE},
            H2Stream, HpackError, StreamOutcome, MAX_OPEN_STREAMS,
        },
        test_rng::XorShift,
    };

    const PRIORITY: u8 = 0x2;
    const WINDOW_UPDATE: u8 = 0x8;
    const PING: u8 = 0x6;

    fn ended(out: &[H2Event]) -> Vec<&H2Stream> {
        out.iter()
            .filter_map(|event| match event {
                H2Event::StreamEnded(stream) => Some(stream),
                H2Event::RequestStarted { .. } => None,
            })
            .collect()
    }

    /// One line per event: what tests compare.
    fn summary(event: &H2Event) -> String {
        let target = |request: &Headers| {
            format!("{} {}", request.get(":method").unwrap_or("-"), request.get(":path").unwrap_or("-"))
        };
        match event {
            H2Event::RequestStarted { stream_id, request, .. } => format!("start {stream_id} {}", target(request)),
            H2Event::StreamEnded(stream) => {
                let status = stream.response.as_ref().and_then(|response| response.get(":status")).unwrap_or("-");
                let grpc = stream.grpc_status().map_or(String::new(), |status| format!(" grpc={status}"));
                format!(
                    "end {} {} -> {status}{grpc} req={} resp={} {:?}",
                    stream.stream_id,
                    target(&stream.request),
                    stream.request_body_bytes,
                    stream.response_body_bytes,
                    stream.outcome
                )
            }
        }
    }

    fn summaries(out: &[H2Event]) -> Vec<String> {
        out.iter().map(summary).collect()
    }

    fn fields(list: &[(&str, &str)]) -> Headers {
        Headers { fields: list.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect() }
    }

    const GRPC_SUMMARIES: [&str; 14] = [
        "start 1 POST /zt.Demo/Echo",
        "end 1 POST /zt.Demo/Echo -> 200 grpc=0 req=10 resp=15 Complete",
        "start 3 POST /zt.Demo/Count",
        "end 3 POST /zt.Demo/Count -> 200 grpc=0 req=6 resp=33 Complete",
        "start 5 POST /zt.Demo/Fail",
        "end 5 POST /zt.Demo/Fail -> 200 grpc=5 req=6 resp=0 Complete",
        "start 7 POST /zt.Demo/StreamFail",
        "end 7 POST /zt.Demo/StreamFail -> 200 grpc=8 req=6 resp=10 Complete",
        "start 9 POST /zt.Demo/Echo",
        "end 9 POST /zt.Demo/Echo -> 200 grpc=0 req=10 resp=15 Complete",
        "start 11 POST /zt.Demo/Echo",
        "end 11 POST /zt.Demo/Echo -> 200 grpc=0 req=8 resp=13 Complete",
        "start 13 POST /zt.Demo/Slow",
        "end 13 POST /zt.Demo/Slow -> 200 req=5 resp=22 Reset { error_code: 8 }",
    ];

    #[test]
    fn grpc_unary_streaming_errors_and_cancel() {
        for name in ["grpc_client", "grpc_server"] {
            let (connection, out) = replay(name);
            assert_eq!(summaries(&out), GRPC_SUMMARIES, "{name}");
            assert_eq!((connection.desyncs(), connection.truncated_header_blocks()), (0, 1), "{name}: x-big was cut");
            let streams = ended(&out);
            let user_agent = "grpc-python/1.85.1 grpc-c/58.0.0 (linux; chttp2)";
            let request = fields(&[
                (":path", "/zt.Demo/Echo"),
                (":authority", "127.0.0.1:50553"),
                (":method", "POST"),
                (":scheme", "http"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-accept-encoding", "identity, deflate, gzip"),
                ("user-agent", user_agent),
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ]);
            assert_eq!(streams[0].request, request);
            let response = [
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-accept-encoding", "identity, deflate, gzip"),
            ];
            assert_eq!(streams[0].response, Some(fields(&response)));
            let trailers = fields(&[("grpc-status", "0"), ("grpc-message", ""), ("x-echo-trailer", "done")]);
            assert_eq!(streams[0].trailers, Some(trailers));
            // Trailers-only: the status is in the only header block.
            let trailers_only = [
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "5"),
                ("grpc-message", "no such thing"),
            ];
            assert_eq!((&streams[2].response, &streams[2].trailers), (&Some(fields(&trailers_only)), &None));
            assert_eq!(streams[3].trailers, Some(fields(&[("grpc-status", "8"), ("grpc-message", "stop now")])));
            // Stream 9 is all indexed fields (HEADERS of 8 bytes): the dynamic table was followed.
            assert_eq!(streams[4].request.fields[..8], request.fields[..8]);
            // 20000 bytes of metadata, kept to 4096.
            assert_eq!(streams[5].request.get("x-big"), Some("v".repeat(MAX_KEPT_VALUE).as_str()));
        }
    }

    #[test]
    fn curl_to_nghttpd() {
        let nghttpd = |length: &str, kind: &str| {
            vec![
                (":status", "200"),
                ("server", "nghttpd nghttp2/1.52.0"),
                ("cache-control", "max-age=3600"),
                ("date", "Sun, 22 Nov 2026 06:20:18 GMT"),
                ("content-length", length),
                ("last-modified", "Sun, 22 Nov 2026 06:20:05 GMT"),
                ("content-type", kind),
            ]
            .into_iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect::<Vec<_>>()
        };
        let (connection, out) = replay("curl_get");
        assert_eq!(summaries(&out), ["start 1 GET /index.html", "end 1 GET /index.html -> 200 req=0 resp=22 Complete"]);
        let stream = ended(&out)[0];
        assert_eq!(stream.request.get("traceparent"), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        assert_eq!(stream.request.get(":authority"), Some("127.0.0.1:8081"));
        assert_eq!(stream.response.as_ref().unwrap().fields, nghttpd("22", "text/html"));
        assert_eq!(connection.desyncs(), 0);

        let (_, out) = replay("curl_post");
        assert_eq!(summaries(&out), ["start 1 POST /missing", "end 1 POST /missing -> 404 req=22 resp=147 Complete"]);
        let (_, out) = replay("curl_big");
        assert_eq!(summaries(&out), ["start 1 GET /big.bin", "end 1 GET /big.bin -> 200 req=0 resp=60000 Complete"]);
    }

    #[test]
    fn h2load_ten_concurrent_streams() {
        for name in ["h2load", "h2load_server"] {
            let (connection, out) = replay(name);
            let streams = ended(&out);
            assert_eq!(streams.len(), 20, "{name}");
            for (index, stream) in streams.iter().enumerate() {
                assert_eq!(stream.stream_id, 1 + 2 * index as u32);
                assert_eq!(summary(&out[0]), "start 1 GET /small.txt");
                let status = stream.response.as_ref().and_then(|response| response.get(":status"));
                assert_eq!(
                    (status, stream.response_body_bytes, stream.outcome),
                    (Some("200"), 6, StreamOutcome::Complete)
                );
                assert_eq!(stream.request.fields.len(), 5);
            }
            // Ten requests were open at once.
            let mut open = 0;
            let most = out.iter().fold(0, |most, event| {
                open += if matches!(event, H2Event::RequestStarted { .. }) { 1 } else { -1 };
                most.max(open)
            });
            assert_eq!((most, connection.desyncs()), (10, 0), "{name}");
        }
    }

    #[test]
    fn continuation_frames_and_priorities() {
        let (connection, out) = replay("nghttp_continuation");
        assert_eq!(
            summaries(&out),
            [
                "start 13 GET /index.html",
                "start 15 GET /missing",
                "start 17 GET /small.txt",
                "end 13 GET /index.html -> 200 req=0 resp=22 Complete",
                "end 15 GET /missing -> 404 req=0 resp=147 Complete",
                "end 17 GET /small.txt -> 200 req=0 resp=6 Complete",
            ]
        );
        let streams = ended(&out);
        assert!(streams.iter().all(|stream| stream.request.get("x-big").map(str::len) == Some(MAX_KEPT_VALUE)));
        assert_eq!(streams[1].request.get("user-agent"), Some("nghttp2/1.52.0"));
        assert_eq!((connection.desyncs(), connection.truncated_header_blocks()), (0, 3));
    }

    #[test]
    fn server_push_is_decoded_not_reported() {
        let (connection, out) = replay("nghttp_push");
        assert_eq!(
            summaries(&out),
            ["start 13 GET /index.html", "end 13 GET /index.html -> 200 req=0 resp=22 Complete"]
        );
        // The response block after the PUSH_PROMISE decodes right: the table stayed in sync.
        assert_eq!(ended(&out)[0].response.as_ref().unwrap().get("content-type"), Some("text/html"));
        assert_eq!(connection.desyncs(), 0);
    }

    /// Per stream, from the frames themselves: (start_ns, end_ns) as the connection should report.
    fn expected_times(name: &str) -> BTreeMap<u32, (u64, u64)> {
        let (role, bytes) = capture(name);
        let calls = syscalls(bytes);
        let to_server = |call: &Syscall| call.outgoing == (role == Role::Client);
        // Per flow: each frame's header and the syscalls of its first and last byte.
        let mut frames: Vec<(usize, bool, FrameHeader)> = Vec::new();
        for flow_to_server in [true, false] {
            let (mut stream, mut owners) = (Vec::new(), Vec::new());
            for (index, call) in calls.iter().enumerate().filter(|(_, call)| to_server(call) == flow_to_server) {
                stream.extend_from_slice(&call.bytes);
                owners.extend(std::iter::repeat_n(index, call.bytes.len()));
            }
            let mut at = if flow_to_server { PREFACE.len() } else { 0 };
            while let Some(header) = stream.get(at..at + HEADER_LEN) {
                let header = FrameHeader::parse(header.try_into().unwrap());
                let end = at + HEADER_LEN + header.length as usize;
                frames.push((owners[at], flow_to_server, header));
                frames.push((owners[end - 1], flow_to_server, header));
                at = end;
            }
        }
        frames.sort_by_key(|(index, ..)| *index);
        let mut times = BTreeMap::new();
        let mut ends: BTreeMap<u32, [bool; 2]> = BTreeMap::new();
        for pair in frames.chunks(1) {
            let (index, to_server, header) = pair[0];
            let call = &calls[index];
            let id = header.stream_id;
            if header.kind == kind::HEADERS && to_server && !times.contains_key(&id) {
                let start_ns = if role == Role::Client { call.start_ns } else { call.end_ns };
                times.insert(id, (start_ns, 0));
            }
            let Some(entry) = times.get_mut(&id) else { continue };
            let sides = ends.entry(id).or_default();
            if header.has(flag::END_STREAM) && matches!(header.kind, kind::DATA | kind::HEADERS) {
                sides[usize::from(to_server)] = true;
            }
            if header.kind == kind::RST_STREAM || sides == &[true, true] {
                entry.1 = entry.1.max(call.end_ns);
            }
        }
        times
    }

    #[test]
    fn streams_are_timed_by_their_syscalls() {
        for (name, ..) in CAPTURES {
            let (_, out) = replay(name);
            let times: BTreeMap<u32, (u64, u64)> =
                ended(&out).iter().map(|stream| (stream.stream_id, (stream.start_ns, stream.end_ns))).collect();
            let expected = expected_times(name);
            assert_eq!(times.len(), expected.len(), "{name}");
            for (id, (start_ns, end_ns)) in times {
                let (expected_start, _) = expected[&id];
                assert_eq!(start_ns, expected_start, "{name} stream {id} start");
                assert!(end_ns >= start_ns, "{name} stream {id}");
            }
            for event in &out {
                if let H2Event::RequestStarted { stream_id, start_ns, .. } = event {
                    assert_eq!(*start_ns, expected[stream_id].0, "{name}");
                }
            }
        }
    }

    /// Events as cut pieces may leave them: the same, or a prefix of them when the connection
    /// desynchronised.
    fn assert_same_or_prefix(name: &str, what: &str, connection: &H2Connection, out: &[H2Event], full: &[H2Event]) {
        if connection.is_desynchronised() {
            assert!(out.len() <= full.len() && out == &full[..out.len()], "{name} {what}: {:?}", summaries(out));
        } else {
            assert_eq!(out, full, "{name} {what}");
        }
    }

    #[test]
    fn pieces_split_anywhere_change_nothing() {
        for (name, role, bytes) in CAPTURES {
            let calls = syscalls(bytes);
            let (_, full) = replay(name);
            let longest = calls.iter().map(|call| call.bytes.len()).max().unwrap_or(0);
            // Every syscall split at the same position: every one up to 300, a sample beyond.
            for split in (1..longest.min(300)).chain((300..longest).step_by(397)) {
                let pieces = plan(&calls, |_, _| vec![split], |_, len| len, |_| false);
                let (connection, out) = replay_pieces(role, &pieces);
                assert_eq!((summaries(&out), connection.desyncs()), (summaries(&full), 0), "{name} split at {split}");
                assert_eq!(out, full, "{name} split at {split}");
            }
            let pieces = plan(&calls, |_, len| (1..len).collect(), |_, len| len, |_| false);
            assert_eq!(replay_pieces(role, &pieces).1, full, "{name} byte by byte");
        }
    }

    #[test]
    fn several_frames_per_syscall() {
        for (name, role, bytes) in CAPTURES {
            // Consecutive syscalls of one direction merged into one.
            let mut merged: Vec<Syscall> = Vec::new();
            for call in syscalls(bytes) {
                match merged.last_mut() {
                    Some(last) if last.outgoing == call.outgoing => {
                        last.bytes.extend_from_slice(&call.bytes);
                        last.end_ns = call.end_ns;
                    }
                    _ => merged.push(call),
                }
            }
            let (connection, out) = replay_pieces(role, &whole(&merged));
            assert_eq!(summaries(&out), summaries(&replay(name).1), "{name}");
            assert_eq!(connection.desyncs(), 0);
        }
    }

    #[test]
    fn uncaptured_data_keeps_streams() {
        // The 60000-byte download's two big reads captured only in part, each cut inside a DATA
        // frame: framing goes on, and the last one ends the stream with its own syscall.
        let calls = syscalls(capture("curl_big").1);
        assert_eq!((calls[4].bytes.len(), calls[5].bytes.len()), (32768, 27380));
        let pieces = plan(&calls, |_, _| Vec::new(), |index, len| if index >= 4 { 20_000 } else { len }, |_| false);
        let (connection, out) = replay_pieces(Role::Client, &pieces);
        assert_eq!(out, replay("curl_big").1, "same streams, same times");
        assert_eq!(connection.desyncs(), 0);
        // Captured only up to the first DATA frame's start: the next frame header is lost.
        let pieces = plan(&calls, |_, _| Vec::new(), |index, len| if index == 4 { 200 } else { len }, |_| false);
        let (connection, out) = replay_pieces(Role::Client, &pieces);
        assert_eq!(
            (summaries(&out), connection.desync_reason()),
            (vec!["start 1 GET /big.bin".to_string()], Some(&Desync::LostFrameBoundary))
        );
    }

    #[test]
    fn uncaptured_tails_never_report_wrong() {
        for (name, role, bytes) in CAPTURES {
            let calls = syscalls(bytes);
            let (mut connection, mut full) = replay(name);
            connection.close(u64::MAX, &mut full);
            for cut in 0..calls.len() {
                for share in [0, 1, 2] {
                    let pieces = plan(
                        &calls,
                        |_, _| Vec::new(),
                        |index, len| if index == cut { len * share / 3 } else { len },
                        |_| false,
                    );
                    let (mut connection, mut out) = replay_pieces(role, &pieces);
                    connection.close(u64::MAX, &mut out);
                    assert_same_or_prefix(name, &format!("cut {cut} to {share}/3"), &connection, &out, &full);
                    if let Some(reason) = connection.desync_reason() {
                        assert!(
                            matches!(
                                reason,
                                Desync::UncapturedHeaderBlock | Desync::LostFrameBoundary | Desync::NoPreface
                            ),
                            "{name} {cut}: {reason}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn lost_syscalls_never_report_wrong() {
        let untimed = |out: &[H2Event]| -> Vec<String> { summaries(out) };
        for (name, role, bytes) in CAPTURES {
            let calls = syscalls(bytes);
            let full = untimed(&replay(name).1);
            for lost in 0..calls.len() {
                // A lost syscall shows only when its direction's next piece comes: the other direction
                // may end streams meanwhile with what was seen. Here it shows at once.
                if calls.get(lost + 1).is_none_or(|next| next.outgoing != calls[lost].outgoing) {
                    continue;
                }
                let pieces = plan(&calls, |_, _| Vec::new(), |_, len| len, |index| index == lost);
                let (connection, out) = replay_pieces(role, &pieces);
                let out = untimed(&out);
                if connection.is_desynchronised() {
                    assert!(out.iter().all(|line| full.contains(line)), "{name} lost {lost}: {out:?}");
                } else {
                    assert_eq!(out, full, "{name} lost {lost}");
                }
            }
        }
        // Losing only DATA payload keeps the framing: curl_big's last read split in three, inside a
        // DATA frame (bytes 139..16532 of it), the middle one lost.
        let mut calls = syscalls(capture("curl_big").1);
        let last = calls.pop().unwrap();
        for range in [0..1000, 1000..2000, 2000..last.bytes.len()] {
            calls.push(Syscall { bytes: last.bytes[range].to_vec(), ..last.clone() });
        }
        let pieces = plan(&calls, |_, _| Vec::new(), |_, len| len, |index| index == 6);
        let (connection, out) = replay_pieces(Role::Client, &pieces);
        assert_eq!((summaries(&out), connection.desyncs()), (full_summaries("curl_big"), 0));
    }

    fn full_summaries(name: &str) -> Vec<String> {
        summaries(&replay(name).1)
    }

    #[test]
    fn uncaptured_header_bytes_desync_silently() {
        // The client's HEADERS of stream 3 loses its last byte: nothing more is reported, and
        // stream 1, open then, is dropped rather than ended.
        let script = Script::new()
            .client(&request(1, "/one", true))
            .client(&request(3, "/three", true))
            .server(&response(1, "200", true))
            .server(&response(3, "200", true));
        let cut = script.calls.len() - 3;
        let pieces =
            plan(&script.calls, |_, _| Vec::new(), |index, len| if index == cut { len - 1 } else { len }, |_| false);
        let (mut connection, mut out) = replay_pieces(Role::Client, &pieces);
        connection.close(1_000, &mut out);
        assert_eq!(summaries(&out), ["start 1 GET /one"]);
        assert_eq!((connection.desync_reason(), connection.desyncs()), (Some(&Desync::UncapturedHeaderBlock), 1));
        // Known lost as soon as the server's syscall started after it: the response is not used.
        let (_, out) = replay_pieces(Role::Client, &pieces[..pieces.len() - 1]);
        assert_eq!(summaries(&out), ["start 1 GET /one"]);
        // Or at the close.
        let (mut connection, mut out) = replay_pieces(Role::Client, &pieces[..pieces.len() - 2]);
        connection.close(1_000, &mut out);
        assert_eq!((summaries(&out), connection.desyncs()), (vec!["start 1 GET /one".to_string()], 1));
    }

    #[test]
    fn first_seen_mid_stream_is_never_decoded() {
        let (role, bytes) = capture("grpc_client");
        let calls = syscalls(bytes);
        let pieces = plan(&calls, |_, _| Vec::new(), |_, len| len, |index| index < 4);
        let (connection, out) = replay_pieces(role, &pieces);
        assert!(out.is_empty());
        assert!(connection.is_desynchronised());
        assert_eq!((connection.desync_reason(), connection.desyncs()), (Some(&Desync::NotFromStart), 0));
        // Only the server's first bytes lost: a loss, counted.
        let first_received = calls.iter().position(|call| !call.outgoing).unwrap();
        let pieces = plan(&calls, |_, _| Vec::new(), |_, len| len, |index| index == first_received);
        let (connection, _) = replay_pieces(role, &pieces);
        assert_eq!((connection.desync_reason(), connection.desyncs()), (Some(&Desync::LostFrameBoundary), 1));
    }

    fn request(stream_id: u32, path: &str, end_stream: bool) -> Vec<u8> {
        let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
        frame(kind::HEADERS, flags, stream_id, &block(&[(":method", "GET"), (":path", path)]))
    }

    fn response(stream_id: u32, status: &str, end_stream: bool) -> Vec<u8> {
        let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
        frame(kind::HEADERS, flags, stream_id, &block(&[(":status", status)]))
    }

    fn goaway(last_stream_id: u32, error_code: u32) -> Vec<u8> {
        frame(kind::GOAWAY, 0, 0, &[&last_stream_id.to_be_bytes()[..], &error_code.to_be_bytes(), b"debug"].concat())
    }

    fn rst(stream_id: u32, error_code: u32) -> Vec<u8> {
        frame(kind::RST_STREAM, 0, stream_id, &error_code.to_be_bytes())
    }

    /// An h2c upgrade, from either end: the server's bytes start with its `101` answer (split
    /// across two syscalls here), the client's HTTP/2 bytes with the preface after its HTTP/1.1
    /// request (80 bytes); the request that asked is stream 1.
    #[test]
    fn an_upgraded_connection_goes_on_from_the_101_with_stream_1() {
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
        let settings = frame(kind::SETTINGS, 0, 0, &[]);
        let body = frame(kind::DATA, flag::END_STREAM, 1, b"hello");
        let to_client = [&answer[..], &settings, &response(1, "200", false), &body].concat();
        let to_server = [PREFACE, &settings, &request(3, "/second", true)].concat();
        let second = response(3, "204", true);
        let asked = fields(&[(":method", "GET"), (":scheme", "http"), (":path", "/first"), (":authority", "h:1")]);
        for role in [Role::Client, Role::Server] {
            let client = role == Role::Client;
            let piece = |outgoing: bool, offset: usize, bytes: &[u8], at: u64| PlannedPiece {
                outgoing,
                offset: offset as u64,
                bytes: bytes.to_vec(),
                syscall_end: (offset + bytes.len()) as u64,
                start_ns: at,
                end_ns: at + 5,
            };
            let pieces = [
                piece(!client, 0, &to_client[..20], 100),
                piece(!client, 20, &to_client[20..], 110),
                piece(client, 80, &to_server, 120),
                piece(!client, to_client.len(), &second, 130),
            ];
            let mut connection = H2Connection::upgraded(role, Some((asked.clone(), 50)));
            let out = push_all(&mut connection, &pieces);
            assert_eq!(
                summaries(&out),
                [
                    "end 1 GET /first -> 200 req=0 resp=5 Complete",
                    "start 3 GET /second",
                    "end 3 GET /second -> 204 req=0 resp=0 Complete"
                ],
                "{role:?}"
            );
            assert_eq!((ended(&out)[0].start_ns, connection.desyncs()), (50, 0), "{role:?}");
        }
        // A server that never ends its answer's head is not speaking HTTP/2.
        let mut connection = H2Connection::upgraded(Role::Client, None);
        let endless = [&b"HTTP/1.1 101 Switching Protocols\r\n"[..], &vec![b'x'; 9000]].concat();
        let out = push_all(&mut connection, &[PlannedPiece { outgoing: false, offset: 0, syscall_end: 9034, bytes: endless, start_ns: 1, end_ns: 2 }]);
        assert!(out.is_empty());
        assert_eq!(connection.desync_reason(), Some(&Desync::UpgradeAnswerTooLong));
    }

    /// With a filter only the fields it accepts are kept, yet every field is decoded: the indexed
    /// fields of the second request still read right from the dynamic table.
    #[test]
    fn a_filter_keeps_only_what_it_accepts() {
        let (role, bytes) = capture("grpc_client");
        let mut connection = H2Connection::new(role).keeping(|name| name.first() == Some(&b':') || name == b"traceparent");
        let out = push_all(&mut connection, &whole(&syscalls(bytes)));
        let streams = ended(&out);
        let request = fields(&[
            (":path", "/zt.Demo/Echo"),
            (":authority", "127.0.0.1:50553"),
            (":method", "POST"),
            (":scheme", "http"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ]);
        assert_eq!(streams[0].request, request);
        assert_eq!(streams[4].request.fields[..4], request.fields[..4]);
        assert_eq!(streams[0].response, Some(fields(&[(":status", "200")])));
        assert_eq!(connection.desyncs(), 0);
    }

    #[test]
    fn resets_goaway_and_close() {
        let script = Script::new()
            .client(&request(1, "/one", true))
            .client(&request(3, "/three", true))
            .client(&request(5, "/five", true))
            .client(&request(7, "/seven", false))
            .server(&response(1, "200", false))
            // The server refuses stream 3, and stops after stream 5: stream 7 goes unserved.
            .server(&rst(3, 7))
            .server(&goaway(5, 0))
            // A request sent after the GOAWAY is not served either.
            .client(&request(9, "/nine", true))
            .server(&frame(kind::DATA, flag::END_STREAM, 1, b"done"))
            .server(&response(5, "200", true))
            // Stream 5's request body keeps it open; a reset after the response leaves it complete.
            .client(&rst(5, 8));
        let (connection, out) = script.run();
        assert_eq!(
            summaries(&out),
            [
                "start 1 GET /one",
                "start 3 GET /three",
                "start 5 GET /five",
                "start 7 GET /seven",
                "end 3 GET /three -> - req=0 resp=0 Reset { error_code: 7 }",
                "end 7 GET /seven -> - req=0 resp=0 GoAway { error_code: 0 }",
                "start 9 GET /nine",
                "end 9 GET /nine -> - req=0 resp=0 GoAway { error_code: 0 }",
                "end 1 GET /one -> 200 req=0 resp=4 Complete",
                "end 5 GET /five -> 200 req=0 resp=0 Complete",
            ]
        );
        let times: Vec<u64> = ended(&out).iter().map(|stream| stream.end_ns).collect();
        assert_eq!(times, [175, 185, 195, 205, 215]);
        assert_eq!(connection.desyncs(), 0);

        let script = Script::new()
            .client(&request(1, "/open", false))
            .client(&request(3, "/answered", false))
            .server(&response(3, "204", true));
        let (_, out) = script.run();
        assert_eq!(
            summaries(&out)[2..],
            ["end 1 GET /open -> - req=0 resp=0 ConnectionClosed", "end 3 GET /answered -> 204 req=0 resp=0 Complete",]
        );
        assert_eq!(ended(&out).iter().map(|stream| stream.end_ns).collect::<Vec<_>>(), [1_000_000, 145]);
    }

    #[test]
    fn client_goaway_ends_nothing() {
        let script =
            Script::new().client(&request(1, "/", true)).client(&goaway(0, 0)).server(&response(1, "200", true));
        assert_eq!(summaries(&script.run().1)[1], "end 1 GET / -> 200 req=0 resp=0 Complete");
    }

    #[test]
    fn informational_responses_are_skipped() {
        let post =
            frame(kind::HEADERS, flag::END_HEADERS, 1, &block(&[(":method", "POST"), ("expect", "100-continue")]));
        let script = Script::new()
            .client(&post)
            .server(&response(1, "100", false))
            .client(&frame(kind::DATA, flag::END_STREAM, 1, b"body"))
            .server(&response(1, "103", false))
            .server(&response(1, "201", false))
            .server(&frame(kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, 1, &block(&[("x-trailer", "t")])));
        let (_, out) = script.run();
        let stream = ended(&out)[0];
        assert_eq!(stream.response, Some(fields(&[(":status", "201")])));
        assert_eq!(stream.trailers, Some(fields(&[("x-trailer", "t")])));
        assert_eq!((stream.request_body_bytes, stream.outcome), (4, StreamOutcome::Complete));
    }

    #[test]
    fn padding_priority_and_continuation() {
        let request_block = block(&[(":method", "PUT"), (":path", "/padded"), ("x-a", "1")]);
        // HEADERS with 3 bytes of padding and priority fields, the block's end in two CONTINUATIONs.
        let mut headers = vec![3];
        headers.extend_from_slice(&[0x80, 0, 0, 1, 15]);
        headers.extend_from_slice(&request_block[..5]);
        headers.extend_from_slice(&[0; 3]);
        let script = Script::new()
            .client(&frame(kind::HEADERS, flag::PADDED | flag::PRIORITY, 1, &headers))
            .client(&frame(kind::CONTINUATION, 0, 1, &request_block[5..12]))
            .client(&frame(kind::CONTINUATION, flag::END_HEADERS, 1, &request_block[12..]))
            .client(&frame(PRIORITY, 0, 3, &[0, 0, 0, 1, 20]))
            .client(&frame(WINDOW_UPDATE, 0, 0, &[0, 1, 0, 0]))
            .client(&frame(PING, 0, 0, &[1; 8]))
            .client(&frame(kind::DATA, flag::PADDED | flag::END_STREAM, 1, &[&[10][..], &[7; 30], &[0; 10]].concat()))
            .server(&response(1, "200", false))
            .server(&frame(kind::DATA, flag::PADDED, 1, &[0, 1, 2, 3]))
            .server(&frame(kind::DATA, flag::END_STREAM, 1, &[]));
        let (connection, out) = script.run();
        assert_eq!(summaries(&out), ["start 1 PUT /padded", "end 1 PUT /padded -> 200 req=30 resp=3 Complete"]);
        assert_eq!(ended(&out)[0].request.get("x-a"), Some("1"));
        assert_eq!(ended(&out)[0].start_ns, 120, "the HEADERS frame's syscall, not the last CONTINUATION's");
        assert_eq!(connection.desyncs(), 0);
    }

    #[test]
    fn broken_header_sequences_desync() {
        let open = frame(kind::HEADERS, 0, 1, &block(&[(":method", "GET")]));
        let cases: [(Vec<u8>, Desync); 5] = [
            (frame(kind::CONTINUATION, flag::END_HEADERS, 1, &[]), Desync::BrokenHeaderSequence),
            ([open.clone(), frame(kind::DATA, 0, 1, b"x")].concat(), Desync::BrokenHeaderSequence),
            (
                [open.clone(), frame(kind::CONTINUATION, flag::END_HEADERS, 3, &[])].concat(),
                Desync::BrokenHeaderSequence,
            ),
            (frame(kind::HEADERS, flag::PADDED | flag::END_HEADERS, 1, &[9, 0x82]), Desync::BadPadding),
            (frame(kind::HEADERS, flag::END_HEADERS, 1, &[0x80]), Desync::Hpack(HpackError::BadIndex(0))),
        ];
        for (bytes, desync) in cases {
            let (connection, out) = Script::new().client(&bytes).server(&response(1, "200", true)).run();
            assert!(out.is_empty());
            assert_eq!(connection.desync_reason(), Some(&desync));
        }
        // A block longer than the bound, in CONTINUATIONs.
        let mut script = Script::new().client(&open);
        for _ in 0..=MAX_HEADER_BLOCK / 16384 {
            script = script.client(&frame(kind::CONTINUATION, 0, 1, &[0x82; 16384]));
        }
        assert_eq!(script.run().0.desync_reason(), Some(&Desync::HeaderBlockTooLarge));
    }

    #[test]
    fn header_table_size_settings() {
        // The server's encoder grows its table to 8192: only fine once the client announced it.
        let mut grown = Vec::new();
        integer(&mut grown, 0x20, 5, 8192);
        grown.extend_from_slice(&block(&[(":status", "200")]));
        let grown = frame(kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, 1, &grown);
        let announce = frame(kind::SETTINGS, 0, 0, &[0, 1, 0, 0, 0x20, 0]);
        let (connection, out) = Script::new().client(&announce).client(&request(1, "/", true)).server(&grown).run();
        assert_eq!((out.len(), connection.desyncs()), (2, 0));
        // The server announcing it is no use: it bounds the client's encoder.
        let script = Script::new().server(&announce).client(&request(1, "/", true)).server(&grown);
        let (connection, _) = script.run();
        let too_big = HpackError::TableSizeAboveLimit { size: 8192, limit: 4096 };
        assert_eq!(connection.desync_reason(), Some(&Desync::Hpack(too_big)));
    }

    #[test]
    fn server_role_times_requests_by_their_read() {
        let script = Script::new().client(&request(1, "/", true)).server(&response(1, "200", true));
        let (connection, out) = replay_pieces(Role::Server, &whole(&script.as_server()));
        let H2Event::RequestStarted { start_ns, .. } = out[0] else { panic!("a request") };
        // The request's syscall ran 120..125: the server read it at 125.
        assert_eq!((start_ns, ended(&out)[0].start_ns, ended(&out)[0].end_ns), (125, 125, 135));
        assert_eq!(connection.desyncs(), 0);
    }

    #[test]
    fn open_streams_are_bounded_oldest_dropped() {
        let mut script = Script::new();
        for index in 0..MAX_OPEN_STREAMS as u32 + 10 {
            script = script.client(&request(1 + 2 * index, "/", false));
        }
        let (connection, out) = script.run();
        assert_eq!(connection.dropped_streams(), 10);
        let streams = ended(&out);
        assert_eq!(streams.len(), MAX_OPEN_STREAMS);
        assert_eq!(streams[0].stream_id, 21, "the ten oldest dropped");
    }

    #[test]
    fn kept_fields_are_bounded() {
        let many: Vec<(String, String)> = (0..200).map(|index| (format!("x-{index}"), "v".repeat(100))).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        let huge = "h".repeat(10_000);
        let list = [&[(":method", "GET"), ("huge", huge.as_str())][..], &many].concat();
        let script =
            Script::new().client(&frame(kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, 1, &block(&list)));
        let (connection, out) = script.run();
        let request = &ended(&out)[0].request;
        assert_eq!(request.get("huge").map(str::len), Some(MAX_KEPT_VALUE));
        let kept: usize = request.fields.iter().map(|(name, value)| name.len() + value.len()).sum();
        assert!(kept <= MAX_KEPT_BLOCK && request.fields.len() <= MAX_KEPT_FIELDS);
        // The small fields fill what the huge value left.
        let mut room = MAX_KEPT_BLOCK - ":methodGET".len() - "huge".len() - MAX_KEPT_VALUE;
        let fitting = many
            .iter()
            .take_while(|(name, value)| room.checked_sub(name.len() + value.len()).map(|left| room = left).is_some());
        assert_eq!(request.fields.len(), 2 + fitting.count());
        assert_eq!(connection.truncated_header_blocks(), 1);
    }

    /// A random mutation of a captured syscall sequence.
    fn mutate(rng: &mut XorShift, calls: &mut Vec<Syscall>) {
        for _ in 0..1 + rng.below(4) {
            let index = rng.below(calls.len());
            if rng.chance(10) {
                let Some(copy) = calls.get(index).cloned() else { return };
                calls.insert(rng.below(calls.len() + 1), copy);
                continue;
            }
            let Some(call) = calls.get_mut(index) else { return };
            match rng.below(6) {
                0 if !call.bytes.is_empty() => {
                    let at = rng.below(call.bytes.len());
                    call.bytes[at] = rng.next() as u8;
                }
                1 => {
                    let kept = rng.below(call.bytes.len() + 1);
                    call.bytes.truncate(kept);
                }
                2 if call.bytes.len() >= 4 => {
                    // A hostile length, id or HPACK integer somewhere.
                    let at = rng.below(call.bytes.len() - 3);
                    let value = [0x7fff_ffffu32, 0xffff_ffff, 0x00ff_ffff, 0x0000_4000, 0x7f7f_7f7f][rng.below(5)];
                    call.bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
                }
                3 => {
                    let extra: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                    let at = rng.below(call.bytes.len() + 1);
                    call.bytes.splice(at..at, extra);
                }
                4 if !call.bytes.is_empty() => {
                    // A flag flipped: END_STREAM, END_HEADERS, PADDED, PRIORITY...
                    let at = rng.below(call.bytes.len());
                    call.bytes[at] ^= 1 << rng.below(8);
                }
                _ => call.outgoing = !call.outgoing,
            }
        }
    }

    fn assert_bounded(out: &[H2Event], connection: &H2Connection, context: &str) {
        for event in out {
            let blocks: Vec<&Headers> = match event {
                H2Event::RequestStarted { request, .. } => vec![request],
                H2Event::StreamEnded(stream) => {
                    assert!(stream.start_ns <= stream.end_ns, "{context}");
                    [Some(&stream.request), stream.response.as_ref(), stream.trailers.as_ref()]
                        .into_iter()
                        .flatten()
                        .collect()
                }
            };
            for headers in blocks {
                assert!(headers.fields.len() <= MAX_KEPT_FIELDS, "{context}");
                // Lossy UTF-8 may triple a byte (U+FFFD).
                let size: usize = headers.fields.iter().map(|(name, value)| name.len() + value.len()).sum();
                assert!(size <= 3 * MAX_KEPT_BLOCK, "{context}");
            }
        }
        assert!(connection.streams.open_count() <= MAX_OPEN_STREAMS, "{context}");
    }

    #[test]
    fn fuzz_mutated_captures_never_panic() {
        let mut rng = XorShift(0x4832_4655_5a5a_0001);
        for round in 0..3_000 {
            let (name, role, bytes) = CAPTURES[rng.below(CAPTURES.len())];
            let mut calls = syscalls(bytes);
            mutate(&mut rng, &mut calls);
            let cut_chance = rng.below(30) as u64;
            // Per syscall: a split position, a captured share (per mille), lost or not.
            let fates: Vec<(Option<usize>, usize, bool)> = calls
                .iter()
                .map(|_| {
                    let split = rng.chance(20).then(|| rng.below(4096));
                    let share = if rng.chance(cut_chance) { rng.below(1001) } else { 1000 };
                    (split, share, rng.chance(3))
                })
                .collect();
            let pieces: Vec<PlannedPiece> = plan(
                &calls,
                |index, len| fates[index].0.map(|split| vec![split % (len + 1)]).unwrap_or_default(),
                |index, len| len * fates[index].1 / 1000,
                |index| fates[index].2,
            );
            let (mut connection, mut out) = replay_pieces(role, &pieces);
            connection.close(u64::MAX, &mut out);
            assert_bounded(&out, &connection, &format!("round {round} {name}"));
        }
    }

    #[test]
    fn fuzz_random_frames_never_panic() {
        let mut rng = XorShift(0x4832_4655_5a5a_0002);
        for round in 0..300 {
            let role = if rng.chance(50) { Role::Client } else { Role::Server };
            let mut connection = H2Connection::new(role);
            let mut offsets = [0u64; 2];
            let mut out = Vec::new();
            for step in 0..200u64 {
                let to_server = rng.chance(50);
                let mut bytes =
                    if offsets[usize::from(to_server)] == 0 && to_server { PREFACE.to_vec() } else { Vec::new() };
                // Mostly well-formed frames of random kinds, flags, streams and payloads.
                let payload: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
                let stream_id = [0, 1, 3, 5, rng.next() as u32][rng.below(5)];
                bytes.extend(frame(rng.below(11) as u8, rng.next() as u8, stream_id, &payload));
                if rng.chance(5) {
                    bytes.truncate(rng.below(bytes.len()));
                }
                let outgoing = to_server == (role == Role::Client);
                let offset = &mut offsets[usize::from(to_server)];
                let syscall_end = *offset + bytes.len() as u64 + if rng.chance(5) { rng.below(30) as u64 } else { 0 };
                let piece =
                    Piece { outgoing, offset: *offset, bytes: &bytes, syscall_end, start_ns: step, end_ns: step };
                connection.push(&piece, &mut out);
                *offset = syscall_end;
            }
            connection.close(1000, &mut out);
            assert_bounded(&out, &connection, &format!("round {round}"));
        }
    }
}
