//! The streams a client opens on a connection, from their request header block to their end.

use std::collections::BTreeMap;

use super::{H2Event, H2Stream, Headers, StreamOutcome, MAX_OPEN_STREAMS};

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Client to server: requests.
    ToServer = 0,
    /// Server to client: responses.
    ToClient = 1,
}

/// The open streams of a connection.
#[derive(Debug, Default)]
pub struct Streams {
    open: BTreeMap<u32, OpenStream>,
    /// The highest stream id started: a client opens streams in increasing order, so an unknown
    /// lower one is closed.
    last_started: u32,
    /// The server's last GOAWAY: streams above its last stream id will not be served.
    goaway: Option<GoAway>,
    dropped: u64,
}

#[derive(Debug)]
struct OpenStream {
    request: Headers,
    response: Option<Headers>,
    trailers: Option<Headers>,
    start_ns: u64,
    request_ended: bool,
    /// When the response's END_STREAM came.
    response_end_ns: Option<u64>,
    request_body_bytes: u64,
    response_body_bytes: u64,
}

impl OpenStream {
    fn new(request: Headers, start_ns: u64, request_ended: bool) -> Self {
        Self {
            request,
            response: None,
            trailers: None,
            start_ns,
            request_ended,
            response_end_ns: None,
            request_body_bytes: 0,
            response_body_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct GoAway {
    last_stream_id: u32,
    error_code: u32,
}

impl Streams {
    pub fn is_open(&self, stream_id: u32) -> bool {
        self.open.contains_key(&stream_id)
    }

    /// Whether a request header block on `stream_id` starts a stream: client streams are odd and
    /// increasing.
    pub fn opens(&self, stream_id: u32) -> bool {
        stream_id % 2 == 1 && stream_id > self.last_started
    }

    #[cfg(test)]
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Streams dropped unreported to stay within [`MAX_OPEN_STREAMS`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn start(&mut self, stream_id: u32, request: Headers, start_ns: u64, out: &mut Vec<H2Event>) {
        if !self.opens(stream_id) {
            return;
        }
        self.last_started = stream_id;
        if self.open.len() >= MAX_OPEN_STREAMS {
            self.open.pop_first();
            self.dropped += 1;
        }
        out.push(H2Event::RequestStarted { stream_id, request: request.clone(), start_ns });
        self.open.insert(stream_id, OpenStream::new(request, start_ns, false));
    }

    /// Stream 1 of a connection upgraded from HTTP/1.1: the upgrade request, already sent whole
    /// (and reported as it was sent).
    pub fn adopt(&mut self, stream_id: u32, request: Headers, start_ns: u64) {
        self.last_started = self.last_started.max(stream_id);
        self.open.insert(stream_id, OpenStream::new(request, start_ns, true));
    }

    /// A request sent after the server's GOAWAY with a lower last stream id is not served.
    pub fn refuse_after_goaway(&mut self, stream_id: u32, end_ns: u64, out: &mut Vec<H2Event>) {
        let Some(goaway) = self.goaway.filter(|goaway| stream_id > goaway.last_stream_id) else { return };
        self.end(stream_id, StreamOutcome::GoAway { error_code: goaway.error_code }, end_ns, out);
    }

    /// A response header block: the response (1xx ones skipped), then the trailers.
    pub fn response_headers(&mut self, stream_id: u32, headers: Headers) {
        let Some(stream) = self.open.get_mut(&stream_id) else { return };
        if stream.response.is_none() {
            if !is_informational(&headers) {
                stream.response = Some(headers);
            }
        } else if stream.trailers.is_none() {
            stream.trailers = Some(headers);
        }
    }

    pub fn body(&mut self, flow: Flow, stream_id: u32, bytes: u64) {
        let Some(stream) = self.open.get_mut(&stream_id) else { return };
        let total = match flow {
            Flow::ToServer => &mut stream.request_body_bytes,
            Flow::ToClient => &mut stream.response_body_bytes,
        };
        *total = total.saturating_add(bytes);
    }

    /// END_STREAM from one side; the stream is complete when both sides sent theirs.
    pub fn end_side(&mut self, flow: Flow, stream_id: u32, end_ns: u64, out: &mut Vec<H2Event>) {
        let Some(stream) = self.open.get_mut(&stream_id) else { return };
        match flow {
            Flow::ToServer => stream.request_ended = true,
            Flow::ToClient => stream.response_end_ns = Some(end_ns),
        }
        if stream.request_ended && stream.response_end_ns.is_some() {
            self.end(stream_id, StreamOutcome::Complete, end_ns, out);
        }
    }

    pub fn reset(&mut self, stream_id: u32, error_code: u32, end_ns: u64, out: &mut Vec<H2Event>) {
        self.end(stream_id, StreamOutcome::Reset { error_code }, end_ns, out);
    }

    /// The server's GOAWAY: streams above `last_stream_id` end unserved, the others go on.
    pub fn goaway(&mut self, last_stream_id: u32, error_code: u32, end_ns: u64, out: &mut Vec<H2Event>) {
        self.goaway = Some(GoAway { last_stream_id, error_code });
        let unserved = self.open.split_off(&last_stream_id.saturating_add(1));
        for (stream_id, stream) in unserved {
            out.push(ended(stream_id, stream, StreamOutcome::GoAway { error_code }, end_ns));
        }
    }

    pub fn close(&mut self, end_ns: u64, out: &mut Vec<H2Event>) {
        for (stream_id, stream) in std::mem::take(&mut self.open) {
            out.push(ended(stream_id, stream, StreamOutcome::ConnectionClosed, end_ns));
        }
    }

    fn end(&mut self, stream_id: u32, outcome: StreamOutcome, end_ns: u64, out: &mut Vec<H2Event>) {
        if let Some(stream) = self.open.remove(&stream_id) {
            out.push(ended(stream_id, stream, outcome, end_ns));
        }
    }
}

/// The report of a stream ending with `outcome`, or complete if its response had ended.
fn ended(stream_id: u32, stream: OpenStream, outcome: StreamOutcome, end_ns: u64) -> H2Event {
    let (outcome, end_ns) = match stream.response_end_ns {
        Some(response_end_ns) if outcome != StreamOutcome::Complete => (StreamOutcome::Complete, response_end_ns),
        _ => (outcome, end_ns),
    };
    H2Event::StreamEnded(H2Stream {
        stream_id,
        request: stream.request,
        response: stream.response,
        trailers: stream.trailers,
        start_ns: stream.start_ns,
        // Clocks from the agent: never before the start.
        end_ns: end_ns.max(stream.start_ns),
        request_body_bytes: stream.request_body_bytes,
        response_body_bytes: stream.response_body_bytes,
        outcome,
    })
}

/// A 1xx response (100-continue, 103 early hints): another header block follows.
fn is_informational(headers: &Headers) -> bool {
    headers.get(":status").is_some_and(|status| status.len() == 3 && status.starts_with('1'))
}
