//! In-process OTLP trace receiver (gRPC and HTTP/protobuf) that collects
//! flattened spans for assertions.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::Link, status::StatusCode as ProtoStatusCode, Span};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// OTLP transport the receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// The agent's `--otlp-protocol` value.
    pub fn flag(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Span kind, decoded from the OTLP enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Unspecified,
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    fn from_otlp(kind: i32) -> SpanKind {
        match kind {
            1 => SpanKind::Internal,
            2 => SpanKind::Server,
            3 => SpanKind::Client,
            4 => SpanKind::Producer,
            5 => SpanKind::Consumer,
            _ => SpanKind::Unspecified,
        }
    }
}

/// An attribute value. Arrays, maps and bytes are kept as their debug text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Double(d) => write!(f, "{d}"),
        }
    }
}

/// One span as received, with its resource attributes copied in.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub status_error: bool,
    pub attributes: BTreeMap<String, Value>,
    pub resource: BTreeMap<String, Value>,
    pub links: Vec<ReceivedLink>,
}

/// A span link: the span context another span points at (for a batch consumer, each producer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedLink {
    pub trace_id: String,
    pub span_id: String,
}

impl ReceivedSpan {
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        str_of(self.attributes.get(key))
    }

    pub fn attr_int(&self, key: &str) -> Option<i64> {
        int_of(self.attributes.get(key))
    }

    pub fn resource_str(&self, key: &str) -> Option<&str> {
        str_of(self.resource.get(key))
    }

    pub fn resource_int(&self, key: &str) -> Option<i64> {
        int_of(self.resource.get(key))
    }

    /// `process.pid` of the resource.
    pub fn pid(&self) -> Option<u32> {
        self.resource_int("process.pid").and_then(|pid| u32::try_from(pid).ok())
    }

    pub fn service_name(&self) -> Option<&str> {
        self.resource_str("service.name")
    }

    /// end - start in nanoseconds (0 when end precedes start).
    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }

    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }

    /// Whether one of the links points at span `span_id` of trace `trace_id`.
    pub fn links_to(&self, trace_id: &str, span_id: &str) -> bool {
        self.links.iter().any(|link| link.trace_id == trace_id && link.span_id == span_id)
    }

    /// Whether this is a span of `kind` emitted by process `pid` for `url.path` == `path`.
    pub fn is(&self, kind: SpanKind, pid: u32, path: &str) -> bool {
        self.kind == kind && self.pid() == Some(pid) && self.attr_str("url.path") == Some(path)
    }
}

impl fmt::Display for ReceivedSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parent = if self.is_root() { "-" } else { &self.parent_span_id };
        write!(
            f,
            "{:?} {:?} trace={} id={} parent={} duration_us={} error={}",
            self.kind,
            self.name,
            self.trace_id,
            self.span_id,
            parent,
            self.duration_ns() / 1000,
            self.status_error
        )?;
        write!(f, "\n    attributes: {}", format_map(&self.attributes))?;
        if !self.links.is_empty() {
            let links: Vec<String> = self.links.iter().map(|l| format!("{}/{}", l.trace_id, l.span_id)).collect();
            write!(f, "\n    links:      {}", links.join(", "))?;
        }
        write!(f, "\n    resource:   {}", format_map(&self.resource))
    }
}

fn format_map(map: &BTreeMap<String, Value>) -> String {
    let pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

fn str_of(value: Option<&Value>) -> Option<&str> {
    match value {
        Some(Value::Str(s)) => Some(s),
        _ => None,
    }
}

fn int_of(value: Option<&Value>) -> Option<i64> {
    match value {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    }
}

/// Renders spans one per line (with attributes) for assertion messages.
pub fn describe(spans: &[ReceivedSpan]) -> String {
    if spans.is_empty() {
        return "  (no spans)".to_string();
    }
    spans.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n")
}

/// The first span matching `predicate`, panicking with all spans otherwise.
pub fn find_span<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    predicate: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    spans.iter().find(|s| predicate(s)).unwrap_or_else(|| panic!("no span matches {what}; spans:\n{}", describe(spans)))
}

#[derive(Default)]
struct Collected {
    spans: Vec<ReceivedSpan>,
    /// Requests the receiver rejected (bad path, content type, undecodable body).
    errors: Vec<String>,
}

#[derive(Clone, Default)]
struct SpanSink {
    inner: Arc<(Mutex<Collected>, Condvar)>,
}

impl SpanSink {
    fn record(&self, request: ExportTraceServiceRequest) {
        let (lock, changed) = &*self.inner;
        lock.lock().expect("span sink poisoned").spans.extend(flatten(request));
        changed.notify_all();
    }

    fn record_error(&self, error: String) {
        let (lock, changed) = &*self.inner;
        lock.lock().expect("span sink poisoned").errors.push(error);
        changed.notify_all();
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.map(|r| attributes(r.attributes)).unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            out.extend(scope_spans.spans.into_iter().map(|span| received(span, &resource)));
        }
    }
    out
}

fn received(span: Span, resource: &BTreeMap<String, Value>) -> ReceivedSpan {
    let status_error = span.status.as_ref().is_some_and(|s| s.code == ProtoStatusCode::Error as i32);
    ReceivedSpan {
        trace_id: hex(&span.trace_id),
        span_id: hex(&span.span_id),
        parent_span_id: hex(&span.parent_span_id),
        name: span.name,
        kind: SpanKind::from_otlp(span.kind),
        start_unix_ns: span.start_time_unix_nano,
        end_unix_ns: span.end_time_unix_nano,
        status_error,
        attributes: attributes(span.attributes),
        resource: resource.clone(),
        links: span.links.iter().map(received_link).collect(),
    }
}

fn received_link(link: &Link) -> ReceivedLink {
    ReceivedLink { trace_id: hex(&link.trace_id), span_id: hex(&link.span_id) }
}

fn attributes(pairs: Vec<KeyValue>) -> BTreeMap<String, Value> {
    pairs.into_iter().map(|kv| (kv.key, value(kv.value))).collect()
}

fn value(any: Option<AnyValue>) -> Value {
    match any.and_then(|v| v.value) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s),
        Some(any_value::Value::IntValue(i)) => Value::Int(i),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(d),
        Some(other) => Value::Str(format!("{other:?}")),
        None => Value::Str("<empty>".to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running OTLP receiver on 127.0.0.1 with its own tokio runtime thread.
/// Stops on drop.
pub struct OtlpReceiver {
    protocol: Protocol,
    addr: SocketAddr,
    sink: SpanSink,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpReceiver {
    pub fn start(protocol: Protocol) -> OtlpReceiver {
        OtlpReceiver::start_at(protocol, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// On a chosen address: a backend that comes up where an agent already sends.
    pub fn start_at(protocol: Protocol, bind: SocketAddr) -> OtlpReceiver {
        let sink = SpanSink::default();
        let (addr_tx, addr_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_sink = sink.clone();
        let thread = thread::Builder::new()
            .name(format!("otlp-{}", protocol.flag()))
            .spawn(move || run_receiver(protocol, bind, thread_sink, addr_tx, shutdown_rx))
            .expect("spawn OTLP receiver thread");
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).expect("OTLP receiver did not report its address");
        OtlpReceiver { protocol, addr, sink, shutdown: Some(shutdown_tx), thread: Some(thread) }
    }

    /// Full endpoint URL for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        match self.protocol {
            Protocol::Grpc => format!("http://{}", self.addr),
            Protocol::HttpProtobuf => format!("http://{}/v1/traces", self.addr),
        }
    }

    /// Value for `--otlp-protocol`.
    pub fn protocol_flag(&self) -> &'static str {
        self.protocol.flag()
    }

    /// All spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let (lock, _) = &*self.sink.inner;
        lock.lock().expect("span sink poisoned").spans.clone()
    }

    /// Waits until `predicate` holds for the spans received so far and returns
    /// them; panics with every span received (and any rejected request) on timeout.
    pub fn wait_for(&self, predicate: impl Fn(&[ReceivedSpan]) -> bool, timeout: Duration) -> Vec<ReceivedSpan> {
        self.try_wait_for(predicate, timeout).unwrap_or_else(|message| panic!("{message}"))
    }

    /// As `wait_for`, but a timeout is returned (with what was received) for the caller to explain.
    pub fn try_wait_for(
        &self,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>, String> {
        let (lock, changed) = &*self.sink.inner;
        let deadline = Instant::now() + timeout;
        let mut collected = lock.lock().expect("span sink poisoned");
        loop {
            if predicate(&collected.spans) {
                return Ok(collected.spans.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(timeout_message(&collected, timeout));
            }
            collected = changed.wait_timeout(collected, deadline - now).expect("span sink poisoned").0;
        }
    }

    /// Waits for one span matching `predicate` and returns it.
    pub fn wait_for_span(&self, predicate: impl Fn(&ReceivedSpan) -> bool, timeout: Duration) -> ReceivedSpan {
        let spans = self.wait_for(|spans| spans.iter().any(&predicate), timeout);
        spans.into_iter().find(|s| predicate(s)).expect("span matched a moment ago")
    }
}

fn timeout_message(collected: &Collected, timeout: Duration) -> String {
    let mut message = format!(
        "timed out after {timeout:?} waiting for spans; received {} span(s):\n{}",
        collected.spans.len(),
        describe(&collected.spans)
    );
    if !collected.errors.is_empty() {
        message.push_str(&format!("\nrejected export requests:\n  {}", collected.errors.join("\n  ")));
    }
    message
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The server may already have stopped on its own; nothing to tell it then.
            if shutdown.send(()).is_err() {
                eprintln!("note: OTLP receiver had already stopped");
            }
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() && !thread::panicking() {
                panic!("OTLP receiver thread panicked");
            }
        }
    }
}

fn run_receiver(
    protocol: Protocol,
    bind: SocketAddr,
    sink: SpanSink,
    addr_tx: mpsc::Sender<SocketAddr>,
    shutdown: oneshot::Receiver<()>,
) {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("build OTLP receiver runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(bind).await.expect("bind OTLP receiver");
        let addr = listener.local_addr().expect("OTLP receiver local_addr");
        addr_tx.send(addr).expect("report OTLP receiver address");
        match protocol {
            Protocol::Grpc => serve_grpc(listener, sink, shutdown).await,
            Protocol::HttpProtobuf => serve_http(listener, sink, shutdown).await,
        }
    });
}

struct GrpcCollector {
    sink: SpanSink,
}

#[tonic::async_trait]
impl TraceService for GrpcCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.sink.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn serve_grpc(listener: TcpListener, sink: SpanSink, shutdown: oneshot::Receiver<()>) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(GrpcCollector { sink }))
        .serve_with_incoming_shutdown(incoming, async {
            // A dropped sender also means shut down.
            let _ = shutdown.await;
        })
        .await
        .expect("OTLP gRPC receiver failed");
}

async fn serve_http(listener: TcpListener, sink: SpanSink, mut shutdown: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let (stream, _) = accepted.expect("OTLP HTTP receiver accept");
                tokio::spawn(serve_http_connection(stream, sink.clone()));
            }
        }
    }
}

async fn serve_http_connection(stream: tokio::net::TcpStream, sink: SpanSink) {
    let service = service_fn(move |request| handle_http_export(request, sink.clone()));
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
        eprintln!("OTLP HTTP receiver connection error: {e}");
    }
}

async fn handle_http_export(request: Request<Incoming>, sink: SpanSink) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match decode_http_export(request).await {
        Ok(export) => {
            sink.record(export);
            let body = ExportTraceServiceResponse::default().encode_to_vec();
            protobuf_response(StatusCode::OK, body.into())
        }
        Err((status, message)) => {
            sink.record_error(format!("{status}: {message}"));
            protobuf_response(status, Bytes::from(message))
        }
    };
    Ok(response)
}

async fn decode_http_export(request: Request<Incoming>) -> Result<ExportTraceServiceRequest, (StatusCode, String)> {
    if request.method() != Method::POST || request.uri().path() != "/v1/traces" {
        let what = format!("unexpected {} {}", request.method(), request.uri());
        return Err((StatusCode::NOT_FOUND, what));
    }
    let content_type = request.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let mime = content_type.and_then(|v| v.split(';').next()).map(str::trim);
    if mime != Some("application/x-protobuf") {
        let what = format!("unsupported content-type {content_type:?} (want application/x-protobuf)");
        return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, what));
    }
    if let Some(encoding) = request.headers().get(http::header::CONTENT_ENCODING) {
        return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("unsupported content-encoding {encoding:?}")));
    }
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("reading body: {e}")))?
        .to_bytes();
    ExportTraceServiceRequest::decode(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("decoding protobuf: {e}")))
}

fn protobuf_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(body))
        .expect("valid response")
}
