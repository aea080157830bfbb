//! An OTLP/HTTP (protobuf) trace receiver that keeps the raw bytes of every export request, so a
//! test can search everything the agent sent (not only the fields a decoder knows), plus the
//! spans decoded from them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::otlp::{ReceivedSpan, SpanKind, Value};

#[derive(Default)]
struct Received {
    /// Whether bodies and spans are kept, or only counted (for millions of spans).
    keep: bool,
    /// Spans decoded so far, kept or not.
    span_count: u64,
    /// Every request body, as it came (also the ones that did not decode).
    bodies: Vec<Vec<u8>>,
    spans: Vec<ReceivedSpan>,
    /// Bodies that are not an ExportTraceServiceRequest, with the reason.
    rejected: Vec<String>,
}

/// OTLP/HTTP receiver on 127.0.0.1 (its own runtime thread), stopped on drop. Point the agent at
/// it with [`RawOtlpReceiver::agent_args`].
pub struct RawOtlpReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RawOtlpReceiver {
    /// A receiver that keeps every body and span.
    pub fn start() -> RawOtlpReceiver {
        RawOtlpReceiver::start_with(true)
    }

    /// A receiver that only counts spans: for loads whose spans would not fit in memory.
    pub fn start_counting() -> RawOtlpReceiver {
        RawOtlpReceiver::start_with(false)
    }

    fn start_with(keep: bool) -> RawOtlpReceiver {
        let received = Arc::new(Mutex::new(Received {
            keep,
            ..Received::default()
        }));
        let (addr_tx, addr_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let sink = received.clone();
        let thread = thread::Builder::new()
            .name("raw-otlp".into())
            .spawn(move || serve(sink, addr_tx, shutdown_rx))
            .expect("spawn raw OTLP receiver thread");
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("raw OTLP receiver did not report its address");
        RawOtlpReceiver {
            addr,
            received,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// `--otlp-endpoint <url> --otlp-protocol http/protobuf`.
    pub fn agent_args(&self) -> Vec<String> {
        let endpoint = format!("http://{}/v1/traces", self.addr);
        [
            "--otlp-endpoint".to_string(),
            endpoint,
            "--otlp-protocol".to_string(),
            "http/protobuf".to_string(),
        ]
        .to_vec()
    }

    /// The raw body of every export request so far.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        self.lock().bodies.clone()
    }

    /// How many spans arrived so far (kept or only counted).
    pub fn span_count(&self) -> u64 {
        self.lock().span_count
    }

    /// Every span decoded so far (none when only counting).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.lock().spans.clone()
    }

    /// Requests whose body was not a valid export request, with why.
    pub fn rejected(&self) -> Vec<String> {
        self.lock().rejected.clone()
    }

    /// Polls until `predicate` holds for the spans so far; the spans, or `Err` with what arrived.
    pub fn wait_for(
        &self,
        predicate: impl Fn(&[ReceivedSpan]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if predicate(&spans) {
                return Ok(spans);
            }
            if Instant::now() >= deadline {
                let listed = crate::otlp::describe(&spans);
                return Err(format!(
                    "timed out after {timeout:?}; {} span(s) received:\n{listed}",
                    spans.len()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().expect("raw OTLP receiver poisoned")
    }
}

impl Drop for RawOtlpReceiver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // Already stopped on its own: nothing to tell it.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() && !thread::panicking() {
                panic!("raw OTLP receiver thread panicked");
            }
        }
    }
}

fn serve(
    received: Arc<Mutex<Received>>,
    addr_tx: mpsc::Sender<SocketAddr>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build receiver runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw OTLP receiver");
        addr_tx.send(listener.local_addr().expect("receiver address")).expect("report receiver address");
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => {
                    let (stream, _) = accepted.expect("raw OTLP receiver accept");
                    let received = received.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request| record(request, received.clone()));
                        // A connection the agent drops mid-request is its business, not a test failure.
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                    });
                }
            }
        }
    });
}

async fn record(
    request: Request<Incoming>,
    received: Arc<Mutex<Received>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = request.into_body().collect().await?.to_bytes();
    let decoded = ExportTraceServiceRequest::decode(body.clone());
    let mut received = received.lock().expect("raw OTLP receiver poisoned");
    if received.keep {
        received.bodies.push(body.to_vec());
    }
    let status = match decoded {
        Ok(export) => {
            let resource_spans = export.resource_spans.iter();
            received.span_count += resource_spans
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len() as u64)
                .sum::<u64>();
            if received.keep {
                received.spans.extend(flatten(export));
            }
            StatusCode::OK
        }
        Err(e) => {
            received.rejected.push(format!("{} bytes: {e}", body.len()));
            StatusCode::BAD_REQUEST
        }
    };
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    let response = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(answer)))
        .expect("valid response");
    Ok(response)
}

fn flatten(export: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for resource_spans in export.resource_spans {
        let resource = attributes(
            resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default(),
        );
        for span in resource_spans
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            spans.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name,
                kind: kind(span.kind),
                start_unix_ns: span.start_time_unix_nano,
                end_unix_ns: span.end_time_unix_nano,
                status_error: span.status.is_some_and(|s| s.code == 2),
                attributes: attributes(span.attributes),
                resource: resource.clone(),
                links: Vec::new(),
            });
        }
    }
    spans
}

fn kind(otlp: i32) -> SpanKind {
    match otlp {
        1 => SpanKind::Internal,
        2 => SpanKind::Server,
        3 => SpanKind::Client,
        4 => SpanKind::Producer,
        5 => SpanKind::Consumer,
        _ => SpanKind::Unspecified,
    }
}

fn attributes(pairs: Vec<KeyValue>) -> BTreeMap<String, Value> {
    let value = |kv: KeyValue| match kv.value.and_then(|v| v.value) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s),
        Some(any_value::Value::IntValue(i)) => Value::Int(i),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(d),
        Some(other) => Value::Str(format!("{other:?}")),
        None => Value::Str(String::new()),
    };
    pairs
        .into_iter()
        .map(|kv| (kv.key.clone(), value(kv)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
