//! In-process OTLP receivers for tests: gRPC (tonic) and HTTP/protobuf (raw HTTP/1.1), each
//! answering from a script of replies (then success), to exercise retries and failures.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tonic::transport::{server::TcpIncoming, Server};

/// One accepted request: lower-cased header names and the decoded body.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub request: ExportTraceServiceRequest,
}

/// How to answer one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// Success, refusing this many of the request's spans (OTLP partial success).
    PartialSuccess(i64),
    /// gRPC UNAVAILABLE / HTTP 503, no hint.
    Unavailable,
    /// gRPC RESOURCE_EXHAUSTED with RetryInfo / HTTP 429 with Retry-After.
    Throttled(Duration),
    /// gRPC INVALID_ARGUMENT / HTTP 400.
    BadRequest,
}

#[derive(Default)]
struct State {
    accepted: Vec<Received>,
    script: VecDeque<Reply>,
    attempts: usize,
}

type Shared = Arc<Mutex<State>>;

pub struct Receiver {
    pub addr: SocketAddr,
    state: Shared,
}

impl Receiver {
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().accepted.clone()
    }

    /// Requests answered, whatever the answer.
    pub fn attempts(&self) -> usize {
        self.state.lock().unwrap().attempts
    }

    /// Spans of accepted requests, less those refused by a partial success.
    pub fn spans_accepted(&self) -> u64 {
        self.state.lock().unwrap().accepted.iter().map(|r| span_count(&r.request)).sum::<usize>() as u64
    }
}

fn span_count(request: &ExportTraceServiceRequest) -> usize {
    request.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum()
}

/// The next scripted reply (success once the script is done); records what it accepts.
fn answer(state: &Shared, headers: Vec<(String, String)>, request: ExportTraceServiceRequest) -> Option<Reply> {
    let mut state = state.lock().unwrap();
    state.attempts += 1;
    let reply = state.script.pop_front();
    if let None | Some(Reply::PartialSuccess(_)) = reply {
        let mut request = request;
        if let Some(Reply::PartialSuccess(n)) = reply {
            // The refused spans are not kept, as a backend would not keep them.
            let spans = &mut request.resource_spans[0].scope_spans[0].spans;
            spans.truncate(spans.len().saturating_sub(n as usize));
        }
        state.accepted.push(Received { headers, request });
    }
    reply
}

fn response(reply: Option<Reply>) -> ExportTraceServiceResponse {
    let partial_success = match reply {
        Some(Reply::PartialSuccess(n)) => {
            Some(ExportTracePartialSuccess { rejected_spans: n, error_message: "spans too old".into() })
        }
        _ => None,
    };
    ExportTraceServiceResponse { partial_success }
}

struct Collector(Shared);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let reply = answer(&self.0, headers, request.into_inner());
        match reply {
            Some(Reply::Unavailable) => Err(tonic::Status::unavailable("collector restarting")),
            Some(Reply::Throttled(delay)) => Err(throttled(delay)),
            Some(Reply::BadRequest) => Err(tonic::Status::invalid_argument("malformed")),
            None | Some(Reply::PartialSuccess(_)) => Ok(tonic::Response::new(response(reply))),
        }
    }
}

/// RESOURCE_EXHAUSTED carrying a `google.rpc.RetryInfo` in `grpc-status-details-bin`, with
/// the protobuf written out by hand (Status.details = Any{type_url, RetryInfo{Duration}}).
fn throttled(delay: Duration) -> tonic::Status {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let message = |fields: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        fields(&mut out);
        out
    };
    let length_delimited = |out: &mut Vec<u8>, tag: u32, bytes: &[u8]| {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    };
    let duration = message(&|out| {
        encode_key(1, WireType::Varint, out);
        encode_varint(delay.as_secs(), out);
        encode_key(2, WireType::Varint, out);
        encode_varint(u64::from(delay.subsec_nanos()), out);
    });
    let retry_info = message(&|out| length_delimited(out, 1, &duration));
    let any = message(&|out| {
        length_delimited(out, 1, b"type.googleapis.com/google.rpc.RetryInfo");
        length_delimited(out, 2, &retry_info);
    });
    let status = message(&|out| {
        encode_key(1, WireType::Varint, out);
        encode_varint(tonic::Code::ResourceExhausted as u64, out);
        length_delimited(out, 3, &any);
    });
    tonic::Status::with_details(tonic::Code::ResourceExhausted, "queue full", status.into())
}

fn scripted(replies: Vec<Reply>) -> Shared {
    Arc::new(Mutex::new(State { script: replies.into(), ..State::default() }))
}

pub async fn start_grpc(replies: Vec<Reply>) -> Receiver {
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let state = scripted(replies);
    let service = TraceServiceServer::new(Collector(Arc::clone(&state)));
    tokio::spawn(Server::builder().add_service(service).serve_with_incoming(incoming));
    Receiver { addr, state }
}

pub async fn start_http(replies: Vec<Reply>) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = scripted(replies);
    let accept_state = Arc::clone(&state);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_http(stream, Arc::clone(&accept_state)));
        }
    });
    Receiver { addr, state }
}

/// Keep-alive loop: `POST /v1/traces` with a Content-Length body, answered with 200.
async fn serve_http(stream: TcpStream, state: Shared) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if stream.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let headers = read_headers(&mut stream).await?;
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
        let (status, extra, reply) = if request_line.starts_with("POST /v1/traces ") {
            let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
            match answer(&state, headers, request) {
                Some(Reply::Unavailable) => ("503 Service Unavailable", String::new(), Vec::new()),
                Some(Reply::Throttled(delay)) => {
                    ("429 Too Many Requests", format!("retry-after: {}\r\n", delay.as_secs()), Vec::new())
                }
                Some(Reply::BadRequest) => ("400 Bad Request", String::new(), Vec::new()),
                reply => ("200 OK", String::new(), response(reply).encode_to_vec()),
            }
        } else {
            ("404 Not Found", String::new(), Vec::new())
        };
        let head = format!(
            "HTTP/1.1 {status}\r\n{extra}content-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        );
        stream.get_mut().write_all(head.as_bytes()).await?;
        stream.get_mut().write_all(&reply).await?;
    }
}

async fn read_headers(stream: &mut BufReader<TcpStream>) -> std::io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        let line = line.trim_end();
        if line.is_empty() {
            return Ok(headers);
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
}

/// A listener that accepts connections and never answers, to exercise timeouts.
pub async fn start_silent() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// An address nobody listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
