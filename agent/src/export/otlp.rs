//! OTLP export: a bounded queue of spans, sent in batches by a few concurrent requests and
//! retried with exponential backoff while the backend fails transiently.
//!
//! Every span that enters is accounted for exactly once: exported, or dropped with a reason
//! (`ExportCounters::dropped`). Memory is bounded by `queue_size` spans, whatever the backend
//! does: while it is away, new spans beyond the bound are dropped, never the process's memory.
//! Sending happens in spawned tasks, so a slow backend never stalls the stages before this one.

use std::{
    collections::{HashMap, VecDeque},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::{
    sync::mpsc,
    task::{self, JoinError, JoinSet},
    time::MissedTickBehavior,
};

use super::{
    backoff::Backoff,
    console::Printer,
    convert,
    transport::{Client, Outcome},
    ExportCounters, OtlpConfig,
};
use crate::spans::model::Span;

/// Partial batches wait at most this long.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Requests in flight at once: enough to hide a backend's latency, few enough not to swamp it.
const MAX_IN_FLIGHT: usize = 4;
/// Neither the HTTP client nor tonic is built with a TLS backend (see the crate features).
const TLS_SUPPORTED: bool = false;

/// A batch on its way: spans not yet converted, or the request of an earlier failed attempt
/// (sent again as it was).
enum Payload {
    Spans(Vec<Span>),
    Request(ExportTraceServiceRequest),
}

struct Batch {
    payload: Payload,
    spans: usize,
}

/// What an export task hands back.
struct Attempt {
    request: ExportTraceServiceRequest,
    spans: usize,
    outcome: Outcome,
}

pub(super) struct Pipeline {
    client: Client,
    endpoint: String,
    timeout: Duration,
    queue_size: usize,
    batch_size: usize,
    counters: Arc<ExportCounters>,
    /// Spans not yet in a request.
    queue: VecDeque<Span>,
    /// Requests that failed transiently, oldest first: they go before any new batch.
    retries: VecDeque<Batch>,
    tasks: JoinSet<Attempt>,
    /// Spans per running task, to account for a task that panicked.
    in_flight: HashMap<task::Id, usize>,
    /// Spans queued, in flight or waiting for a retry.
    held: usize,
    backoff: Backoff,
    /// No request starts before this, after a transient failure.
    paused_until: Option<Instant>,
    warn: WarnLimiter,
}

impl Pipeline {
    pub(super) fn new(config: &OtlpConfig, counters: Arc<ExportCounters>) -> Result<Self, String> {
        if !TLS_SUPPORTED && config.endpoint.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("https:")) {
            log::warn!("OTLP endpoint {} uses https, but this build has no TLS support: exports will fail", config.endpoint);
        }
        let client = Client::new(config)?;
        log::info!(
            "exporting spans over OTLP {} to {} (queue of {} spans, batches of {})",
            config.protocol,
            config.endpoint,
            config.queue_size,
            config.batch_size
        );
        counters.queue_capacity.store(config.queue_size as u64, Ordering::Relaxed);
        Ok(Self {
            client,
            endpoint: config.endpoint.clone(),
            timeout: config.timeout,
            queue_size: config.queue_size,
            batch_size: config.batch_size,
            counters,
            queue: VecDeque::new(),
            retries: VecDeque::new(),
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            held: 0,
            backoff: Backoff::default(),
            paused_until: None,
            warn: WarnLimiter::default(),
        })
    }

    /// Exports until `rx` closes, then sends what it holds within `flush_timeout`.
    pub(super) async fn run(mut self, rx: &mut mpsc::Receiver<Vec<Span>>, mut printer: Option<Printer>, flush_timeout: Duration) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(spans) => {
                        if let Some(p) = printer.as_mut() {
                            p.print(&spans);
                        }
                        self.push(spans);
                    }
                    None => break,
                },
                _ = tick.tick() => self.pump(true),
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.complete(done),
                () = sleep_until(self.paused_until), if self.paused_until.is_some() => {
                    self.paused_until = None;
                    self.pump(true);
                }
            }
        }
        self.shutdown(Instant::now() + flush_timeout).await;
    }

    /// Queues spans; what does not fit the bound is dropped and counted.
    pub(super) fn push(&mut self, mut spans: Vec<Span>) {
        let room = self.queue_size.saturating_sub(self.held);
        if spans.len() > room {
            let excess = spans.len() - room;
            self.counters.dropped.queue_full.fetch_add(excess as u64, Ordering::Relaxed);
            spans.truncate(room);
            let (size, endpoint) = (self.queue_size, &self.endpoint);
            self.warn.warn(|| format!("export queue full ({size} spans): dropping spans until {endpoint} takes more"));
        }
        self.held += spans.len();
        self.queue.extend(spans);
        self.update_gauge();
        self.pump(false);
    }

    /// Starts requests while there is room in flight and no backoff pending: retries first,
    /// then full batches, then (`partial`) what is left.
    fn pump(&mut self, partial: bool) {
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.paused_until = None;
        // While the backend fails, one request at a time probes it: a burst would only fail
        // together and run the backoff up several steps at once.
        let limit = if self.backoff.failures() > 0 { 1 } else { MAX_IN_FLIGHT };
        while self.tasks.len() < limit {
            let batch = match self.retries.pop_front() {
                Some(batch) => batch,
                None if self.queue.len() >= self.batch_size || (partial && !self.queue.is_empty()) => {
                    let n = self.queue.len().min(self.batch_size);
                    Batch { payload: Payload::Spans(self.queue.drain(..n).collect()), spans: n }
                }
                None => return,
            };
            self.spawn(batch);
        }
    }

    fn spawn(&mut self, batch: Batch) {
        let (client, timeout, counters) = (self.client.clone(), self.timeout, Arc::clone(&self.counters));
        let spans = batch.spans;
        let handle = self.tasks.spawn(async move {
            let request = match batch.payload {
                Payload::Spans(spans) => convert::request(spans),
                Payload::Request(request) => request,
            };
            let started = Instant::now();
            let outcome = match tokio::time::timeout(timeout, client.send(&request)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Retry { after: None, reason: format!("no answer within {timeout:?}") },
            };
            counters.latency.observe(started.elapsed());
            Attempt { request, spans, outcome }
        });
        self.in_flight.insert(handle.id(), spans);
    }

    /// Accounts for a finished request; a transient failure queues it again and pauses sending.
    fn complete(&mut self, done: Result<(task::Id, Attempt), JoinError>) {
        let attempt = match done {
            Ok((id, attempt)) => {
                self.in_flight.remove(&id);
                attempt
            }
            Err(e) => {
                // Only a bug gets here (the task does not panic by design): count, don't lose track.
                let spans = self.in_flight.remove(&e.id()).unwrap_or(0);
                self.release(spans);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.counters.dropped.rejected.fetch_add(spans as u64, Ordering::Relaxed);
                log::error!("OTLP export task failed: {e}");
                return;
            }
        };
        let Attempt { request, spans, outcome } = attempt;
        match outcome {
            Outcome::Accepted { rejected, message } => {
                let rejected = rejected.min(spans as u64);
                self.counters.exported.fetch_add(spans as u64 - rejected, Ordering::Relaxed);
                self.counters.dropped.partial_success.fetch_add(rejected, Ordering::Relaxed);
                if rejected > 0 {
                    self.warn.warn(|| format!("the backend refused {rejected} of {spans} spans: {message}"));
                }
                self.backoff.reset();
                self.release(spans);
            }
            Outcome::Retry { after, reason } => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                let delay = self.backoff.next_delay(after);
                let resume = Instant::now() + delay;
                self.paused_until = Some(self.paused_until.map_or(resume, |t| t.max(resume)));
                self.retries.push_back(Batch { payload: Payload::Request(request), spans });
                let (failures, endpoint) = (self.backoff.failures(), &self.endpoint);
                self.warn.warn(|| {
                    format!("OTLP export of {spans} spans to {endpoint} failed ({reason}); retrying in {delay:.1?} (failure {failures} in a row)")
                });
            }
            Outcome::Rejected { reason } => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.counters.dropped.rejected.fetch_add(spans as u64, Ordering::Relaxed);
                self.release(spans);
                let endpoint = &self.endpoint;
                self.warn.warn(|| format!("{endpoint} refused {spans} spans ({reason}); they are dropped, not retried"));
            }
        }
        self.pump(false);
    }

    fn release(&mut self, spans: usize) {
        self.held = self.held.saturating_sub(spans);
        self.update_gauge();
    }

    fn update_gauge(&self) {
        self.counters.queued.store(self.held as u64, Ordering::Relaxed);
    }

    fn is_idle(&self) -> bool {
        self.tasks.is_empty() && self.retries.is_empty() && self.queue.is_empty()
    }

    /// Sends everything held, retrying transient failures, until done or `deadline`; what is
    /// left then is dropped and counted.
    async fn shutdown(mut self, deadline: Instant) {
        let give_up = tokio::time::sleep_until(deadline.into());
        tokio::pin!(give_up);
        loop {
            self.pump(true);
            // Nothing in flight and the next retry due after the deadline: waiting is pointless.
            let retry_too_late = self.paused_until.is_some_and(|t| t >= deadline) && self.tasks.is_empty();
            if self.is_idle() || retry_too_late {
                break;
            }
            tokio::select! {
                () = &mut give_up => break,
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.complete(done),
                () = sleep_until(self.paused_until), if self.paused_until.is_some() => self.paused_until = None,
            }
        }
        self.tasks.abort_all();
        let left = self.held;
        if left > 0 {
            self.counters.dropped.shutdown.fetch_add(left as u64, Ordering::Relaxed);
            log::warn!("{left} spans could not be exported to {} before the shutdown timeout", self.endpoint);
        }
        self.release(left);
    }
}

/// Waits for `at`; never completes for `None` (the caller guards with `if is_some()`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// At most one warning per `WARN_INTERVAL`, counting the ones it swallowed.
#[derive(Default)]
struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    fn warn(&mut self, message: impl FnOnce() -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < WARN_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{}", message()),
            n => log::warn!("{} ({n} similar messages not logged)", message()),
        }
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{
        receiver::{self, Reply},
        run, ExportConfig, Protocol,
    };
    use crate::spans::model::{AttrValue, Resource, SpanKind, SpanStatus};
    use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue as ProtoKeyValue};
    use std::collections::BTreeMap;

    const PROTOCOLS: [Protocol; 2] = [Protocol::Grpc, Protocol::HttpProtobuf];

    fn resource(service: &'static str, pid: i64) -> Arc<Resource> {
        Arc::new(Resource {
            attributes: vec![("service.name".into(), service.into()), ("process.pid".into(), AttrValue::Int(pid))],
        })
    }

    fn span(resource: &Arc<Resource>, n: u32) -> Span {
        Span {
            trace_id: [n as u8; 16],
            span_id: [n as u8; 8],
            parent_span_id: None,
            trace_flags: 1,
            trace_state: String::new(),
            kind: SpanKind::Server,
            name: format!("span-{n}"),
            start_unix_ns: 1_700_000_000_000_000_000,
            end_unix_ns: 1_700_000_000_001_000_000,
            attributes: vec![("http.response.status_code".into(), AttrValue::Int(200))],
            status: SpanStatus::Unset,
            links: Vec::new(),
            resource: Arc::clone(resource),
        }
    }

    fn spans(n: u32) -> Vec<Span> {
        let r = resource("svc", 1);
        (0..n).map(|i| span(&r, i)).collect()
    }

    fn config(protocol: Protocol, addr: std::net::SocketAddr, timeout: Duration) -> OtlpConfig {
        let endpoint = match protocol {
            Protocol::Grpc => format!("http://{addr}"),
            Protocol::HttpProtobuf => format!("http://{addr}/v1/traces"),
        };
        OtlpConfig {
            endpoint,
            protocol,
            headers: vec![("x-api-key".into(), "s e%cret".into())],
            timeout,
            queue_size: 8192,
            batch_size: 512,
        }
    }

    async fn start(protocol: Protocol, replies: Vec<Reply>) -> receiver::Receiver {
        match protocol {
            Protocol::Grpc => receiver::start_grpc(replies).await,
            Protocol::HttpProtobuf => receiver::start_http(replies).await,
        }
    }

    /// Runs the export stage on `spans` sent in one go, closes its input and waits for it.
    async fn export_all(otlp: OtlpConfig, spans: Vec<Span>, flush_timeout: Duration) -> Arc<ExportCounters> {
        let counters = Arc::new(ExportCounters::default());
        let (tx, rx) = mpsc::channel(8);
        let stage = tokio::spawn(run(ExportConfig { print: false, otlp: Some(otlp), flush_timeout }, rx, Arc::clone(&counters)));
        tx.send(spans).await.unwrap();
        drop(tx);
        tokio::time::timeout(flush_timeout + Duration::from_secs(5), stage).await.expect("the flush is bounded").unwrap();
        counters
    }

    fn attr(attrs: &[ProtoKeyValue], key: &str) -> Option<any_value::Value> {
        attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()?.value)
    }

    /// service.name -> (process.pid, sorted span names)
    fn by_service(received: &[receiver::Received]) -> BTreeMap<String, (i64, Vec<String>)> {
        let mut out: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
        for rs in received.iter().flat_map(|r| &r.request.resource_spans) {
            let attrs = &rs.resource.as_ref().expect("resource").attributes;
            let Some(any_value::Value::StringValue(service)) = attr(attrs, "service.name") else { panic!("{attrs:?}") };
            let Some(any_value::Value::IntValue(pid)) = attr(attrs, "process.pid") else { panic!("{attrs:?}") };
            let entry = out.entry(service).or_insert((pid, Vec::new()));
            for ss in &rs.scope_spans {
                assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some("zerotel"));
                entry.1.extend(ss.spans.iter().map(|s| s.name.clone()));
            }
        }
        out.values_mut().for_each(|(_, names)| names.sort());
        out
    }

    fn exported(c: &ExportCounters) -> u64 {
        c.exported.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resources_share_a_request_and_headers_arrive() {
        for protocol in PROTOCOLS {
            let receiver = start(protocol, Vec::new()).await;
            let (alpha, beta) = (resource("alpha", 1), resource("beta", 2));
            let batch = vec![span(&alpha, 1), span(&beta, 2), span(&alpha, 3), span(&Arc::new(Resource::clone(&alpha)), 4)];
            let counters = export_all(config(protocol, receiver.addr, Duration::from_secs(5)), batch, Duration::from_secs(5)).await;

            let received = receiver.received();
            assert_eq!(received.len(), 1, "{protocol}: one request");
            let got = by_service(&received);
            let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert_eq!(got["alpha"], (1, names(&["span-1", "span-3", "span-4"])), "{protocol}");
            assert_eq!(got["beta"], (2, names(&["span-2"])), "{protocol}");
            assert!(received[0].headers.contains(&("x-api-key".into(), "s e%cret".into())), "{:?}", received[0].headers);
            assert_eq!((exported(&counters), counters.dropped.total(), counters.errors.load(Ordering::Relaxed)), (4, 0, 0));
            assert_eq!(counters.latency.count(), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transient_failures_are_retried_until_the_backend_takes_them() {
        for protocol in PROTOCOLS {
            // Unavailable with no hint (about 1 s of backoff), then throttled twice with a
            // zero-delay hint, then accepted.
            let replies = vec![Reply::Unavailable, Reply::Throttled(Duration::ZERO), Reply::Throttled(Duration::ZERO)];
            let receiver = start(protocol, replies).await;
            let started = Instant::now();
            let counters = export_all(config(protocol, receiver.addr, Duration::from_secs(5)), spans(700), Duration::from_secs(10)).await;
            assert_eq!(exported(&counters), 700, "{protocol}");
            assert_eq!(counters.dropped.total(), 0, "{protocol}");
            assert_eq!(counters.retries.load(Ordering::Relaxed), 3, "{protocol}");
            assert_eq!(counters.errors.load(Ordering::Relaxed), 3, "{protocol}");
            assert_eq!(receiver.attempts(), 5, "{protocol}: 2 batches, 3 of the attempts failed");
            assert_eq!(receiver.spans_accepted(), 700, "{protocol}: every span once");
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(800), "{protocol}: the hintless failure waited out a backoff, took {took:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_request_is_dropped_not_retried() {
        for protocol in PROTOCOLS {
            let receiver = start(protocol, vec![Reply::BadRequest]).await;
            let counters = export_all(config(protocol, receiver.addr, Duration::from_secs(5)), spans(3), Duration::from_secs(5)).await;
            assert_eq!(counters.dropped.rejected.load(Ordering::Relaxed), 3, "{protocol}");
            assert_eq!((exported(&counters), counters.retries.load(Ordering::Relaxed)), (0, 0), "{protocol}");
            assert_eq!(receiver.attempts(), 1, "{protocol}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_success_is_counted() {
        for protocol in PROTOCOLS {
            let receiver = start(protocol, vec![Reply::PartialSuccess(2)]).await;
            let counters = export_all(config(protocol, receiver.addr, Duration::from_secs(5)), spans(5), Duration::from_secs(5)).await;
            assert_eq!(exported(&counters), 3, "{protocol}");
            assert_eq!(counters.dropped.partial_success.load(Ordering::Relaxed), 2, "{protocol}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_backend_costs_the_bound_and_every_span_is_counted() {
        for protocol in PROTOCOLS {
            for addr in [receiver::closed_port().await, receiver::start_silent().await] {
                let mut otlp = config(protocol, addr, Duration::from_millis(300));
                otlp.queue_size = 1000;
                let started = Instant::now();
                let counters = export_all(otlp, spans(1500), Duration::from_secs(1)).await;
                let took = started.elapsed();
                assert_eq!(counters.dropped.queue_full.load(Ordering::Relaxed), 500, "{protocol} {addr}");
                assert_eq!(counters.dropped.shutdown.load(Ordering::Relaxed), 1000, "{protocol} {addr}");
                assert_eq!(exported(&counters), 0);
                assert_eq!(counters.queued.load(Ordering::Relaxed), 0, "nothing held after the flush");
                assert!(counters.errors.load(Ordering::Relaxed) >= 1, "{protocol} {addr}");
                assert!(took < Duration::from_secs(3), "{protocol} {addr}: the flush timeout bounds shutdown, took {took:?}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_spans_never_exceed_the_queue_size() {
        let addr = receiver::start_silent().await;
        let mut otlp = config(Protocol::HttpProtobuf, addr, Duration::from_secs(30));
        otlp.queue_size = 2048;
        let counters = Arc::new(ExportCounters::default());
        let mut pipeline = Pipeline::new(&otlp, Arc::clone(&counters)).unwrap();
        pipeline.push(spans(10_000));
        assert_eq!(pipeline.held, 2048);
        assert_eq!(pipeline.tasks.len(), MAX_IN_FLIGHT, "4 full batches in flight");
        assert_eq!(counters.queued.load(Ordering::Relaxed), 2048);
        pipeline.push(spans(1));
        assert_eq!(counters.dropped.queue_full.load(Ordering::Relaxed), 10_000 - 2048 + 1);
        pipeline.shutdown(Instant::now() + Duration::from_millis(200)).await;
        assert_eq!(counters.dropped.total(), 10_001);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backend_that_comes_back_gets_what_was_held() {
        for protocol in PROTOCOLS {
            let receiver = start(protocol, vec![Reply::Unavailable; 2]).await;
            let counters = Arc::new(ExportCounters::default());
            let (tx, rx) = mpsc::channel(8);
            let mut otlp = config(protocol, receiver.addr, Duration::from_secs(5));
            otlp.queue_size = 100;
            let stage = tokio::spawn(run(
                ExportConfig { print: false, otlp: Some(otlp), flush_timeout: Duration::from_secs(10) },
                rx,
                Arc::clone(&counters),
            ));
            // While the first attempts fail, more arrive than the queue holds.
            for _ in 0..3 {
                tx.send(spans(60)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while exported(&counters) + counters.dropped.total() < 180 {
                assert!(Instant::now() < deadline, "{protocol}: {counters:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(tx);
            stage.await.unwrap();
            assert_eq!(exported(&counters) + counters.dropped.queue_full.load(Ordering::Relaxed), 180, "{protocol}: {counters:?}");
            assert_eq!(receiver.spans_accepted(), exported(&counters), "{protocol}");
            assert!(counters.dropped.queue_full.load(Ordering::Relaxed) >= 80, "{protocol}: {counters:?}");
        }
    }
}
