//! OTLP export: batches per resource, one SDK exporter per distinct resource.
//!
//! An OTLP SDK exporter carries exactly one resource (`set_resource`), while our spans come
//! from many processes. So exporters are created lazily per resource (keyed by content), kept
//! in a bounded LRU, and all share one gRPC channel or one HTTP client.
//!
//! Failed exports are dropped and counted; retry comes in a later issue (hence the SDK's own
//! retry is disabled too).

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::{
    RetryPolicy, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::trace::SpanExporter as _;
use tokio::{
    sync::mpsc,
    task::{self, JoinError, JoinSet},
    time::MissedTickBehavior,
};
use tonic::{
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, Endpoint},
};

use super::{console::Printer, convert, ExportCounters, OtlpConfig, Protocol};
use crate::spans::model::{Resource, Span};

const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Neither the HTTP client nor tonic is built with a TLS backend (see the crate features).
const TLS_SUPPORTED: bool = false;

/// Memory and fan-out bounds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Spans per export request.
    pub batch: usize,
    /// Spans pending or in flight, across all resources.
    pub max_held: usize,
    /// Live exporters (distinct resources).
    pub max_exporters: usize,
}

pub(super) const LIMITS: Limits = Limits {
    batch: 512,
    max_held: 8192,
    max_exporters: 256,
};

/// The connection every exporter shares, plus what each exporter is built with.
enum Transport {
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
    },
    Http {
        client: reqwest::Client,
        headers: HashMap<String, String>,
    },
}

struct Factory {
    transport: Transport,
    endpoint: String,
    timeout: Duration,
}

impl Factory {
    /// Must run inside a tokio runtime: the lazy gRPC channel spawns its worker.
    fn new(config: &OtlpConfig) -> Result<Self, String> {
        let transport = match config.protocol {
            Protocol::Grpc => Transport::Grpc {
                channel: grpc_channel(config)?,
                metadata: grpc_metadata(&config.headers),
            },
            Protocol::HttpProtobuf => Transport::Http {
                client: reqwest::Client::builder()
                    .timeout(config.timeout)
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
                headers: http_headers(&config.headers),
            },
        };
        Ok(Self {
            transport,
            endpoint: config.endpoint.clone(),
            timeout: config.timeout,
        })
    }

    fn build(&self, resource: &Resource) -> Result<SpanExporter, String> {
        let mut exporter = match &self.transport {
            Transport::Grpc { channel, metadata } => SpanExporter::builder()
                .with_tonic()
                .with_channel(channel.clone())
                .with_metadata(metadata.clone())
                .with_timeout(self.timeout)
                .with_retry_policy(RetryPolicy::disabled())
                .build(),
            // The protocol is explicit so OTEL_EXPORTER_OTLP_PROTOCOL=grpc cannot fail the build.
            Transport::Http { client, headers } => SpanExporter::builder()
                .with_http()
                .with_http_client(client.clone())
                .with_endpoint(self.endpoint.as_str())
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(self.timeout)
                .with_headers(headers.clone())
                .with_retry_policy(RetryPolicy::disabled())
                .build(),
        }
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
        exporter.set_resource(&convert::resource(resource));
        Ok(exporter)
    }
}

fn grpc_channel(config: &OtlpConfig) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| format!("invalid gRPC endpoint {:?}: {e}", config.endpoint))?;
    Ok(endpoint
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .connect_lazy())
}

fn grpc_metadata(headers: &[(String, String)]) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    for (key, value) in headers {
        match (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            (Ok(k), Ok(v)) => {
                metadata.insert(k, v);
            }
            _ => log::warn!("OTLP header {key:?} is not valid ASCII gRPC metadata, not sent"),
        }
    }
    metadata
}

/// The SDK percent-decodes `with_headers` values once more; ours are decoded already, so
/// escape `%` to keep a literal `%` literal.
fn http_headers(headers: &[(String, String)]) -> HashMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| (k.clone(), v.replace('%', "%25")))
        .collect()
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
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        match std::mem::take(&mut self.suppressed) {
            0 => log::warn!("{}", message()),
            n => log::warn!("{} ({n} similar failures not logged)", message()),
        }
        self.last = Some(now);
    }
}

/// One resource: its exporter and the spans waiting for it.
struct Entry {
    /// Tells a recreated entry from an evicted one with the same key.
    id: u64,
    exporter: Arc<SpanExporter>,
    pending: Vec<Span>,
    /// The SDK contract: no concurrent `export` calls on one exporter.
    busy: bool,
    last_used: u64,
}

struct InFlight {
    key: String,
    entry_id: u64,
    count: usize,
}

type ExportResult = Result<(), String>;

pub(super) struct Pipeline {
    factory: Factory,
    limits: Limits,
    counters: Arc<ExportCounters>,
    scope: InstrumentationScope,
    entries: HashMap<String, Entry>,
    tasks: JoinSet<ExportResult>,
    in_flight: HashMap<task::Id, InFlight>,
    /// Spans pending or in flight.
    held: usize,
    clock: u64,
    next_entry_id: u64,
    shutting_down: bool,
    warn: WarnLimiter,
}

impl Pipeline {
    pub(super) fn new(
        config: &OtlpConfig,
        counters: Arc<ExportCounters>,
        limits: Limits,
    ) -> Result<Self, String> {
        if !TLS_SUPPORTED
            && config
                .endpoint
                .get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case("https:"))
        {
            log::warn!(
                "OTLP endpoint {} uses https, but this build has no TLS support: exports will fail",
                config.endpoint
            );
        }
        let factory = Factory::new(config)?;
        log::info!(
            "exporting spans over OTLP {} to {}",
            config.protocol,
            config.endpoint
        );
        Ok(Self {
            factory,
            limits,
            counters,
            scope: convert::scope(),
            entries: HashMap::new(),
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            held: 0,
            clock: 0,
            next_entry_id: 0,
            shutting_down: false,
            warn: WarnLimiter::default(),
        })
    }

    /// Exports until `rx` closes, then flushes everything (bounded by twice the timeout).
    pub(super) async fn run(
        mut self,
        rx: &mut mpsc::Receiver<Vec<Span>>,
        mut printer: Option<Printer>,
    ) {
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
                _ = tick.tick() => self.flush_idle(),
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.complete(done);
                }
            }
        }
        self.shutdown().await;
    }

    /// Queues spans, grouping runs that share a resource `Arc` so the key is computed once.
    pub(super) fn push(&mut self, spans: Vec<Span>) {
        self.clock += 1;
        let mut run: Vec<Span> = Vec::new();
        for span in spans {
            if run
                .last()
                .is_some_and(|last| !Arc::ptr_eq(&last.resource, &span.resource))
            {
                self.push_run(std::mem::take(&mut run));
            }
            run.push(span);
        }
        self.push_run(run);
    }

    fn push_run(&mut self, mut run: Vec<Span>) {
        let Some(resource) = run.first().map(|s| Arc::clone(&s.resource)) else {
            return;
        };
        let room = self.limits.max_held.saturating_sub(self.held);
        if run.len() > room {
            self.count_dropped(run.len() - room);
            run.truncate(room);
        }
        if run.is_empty() {
            return;
        }
        let key = convert::resource_key(&resource);
        let (clock, batch) = (self.clock, self.limits.batch);
        let Some(entry) = self.entry(&key, &resource) else {
            self.count_dropped(run.len());
            return;
        };
        entry.last_used = clock;
        let added = run.len();
        entry.pending.append(&mut run);
        let ready = !entry.busy && entry.pending.len() >= batch;
        self.held += added;
        if ready {
            self.dispatch(&key);
        }
    }

    /// The entry for `key`, created on first use; `None` if no exporter can be had.
    fn entry(&mut self, key: &str, resource: &Resource) -> Option<&mut Entry> {
        if !self.entries.contains_key(key) {
            let entry = self.new_entry(resource)?;
            self.entries.insert(key.to_owned(), entry);
        }
        self.entries.get_mut(key)
    }

    fn new_entry(&mut self, resource: &Resource) -> Option<Entry> {
        if self.entries.len() >= self.limits.max_exporters && !self.evict_lru() {
            let max = self.limits.max_exporters;
            self.warn.warn(|| {
                format!("{max} OTLP exporters are all busy, dropping spans of a new resource")
            });
            return None;
        }
        let exporter = match self.factory.build(resource) {
            Ok(exporter) => exporter,
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.warn.warn(|| e);
                return None;
            }
        };
        self.next_entry_id += 1;
        Some(Entry {
            id: self.next_entry_id,
            exporter: Arc::new(exporter),
            pending: Vec::new(),
            busy: false,
            last_used: self.clock,
        })
    }

    /// Drops the least recently used idle exporter, sending what it still holds.
    fn evict_lru(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| !e.busy)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        let Some(entry) = victim.and_then(|k| self.entries.remove_entry(&k)) else {
            return false;
        };
        let (key, entry) = entry;
        if !entry.pending.is_empty() {
            self.spawn_export(key, entry.id, entry.exporter, entry.pending);
        }
        true
    }

    /// Sends up to one batch for `key` unless its exporter is busy. At shutdown everything
    /// pending goes in one request, so the flush takes one round trip.
    fn dispatch(&mut self, key: &str) {
        let (batch_size, shutting_down) = (self.limits.batch, self.shutting_down);
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.busy || entry.pending.is_empty() {
            return;
        }
        let batch = if shutting_down || entry.pending.len() <= batch_size {
            std::mem::take(&mut entry.pending)
        } else {
            entry.pending.drain(..batch_size).collect()
        };
        entry.busy = true;
        let (id, exporter) = (entry.id, Arc::clone(&entry.exporter));
        self.spawn_export(key.to_owned(), id, exporter, batch);
    }

    fn spawn_export(
        &mut self,
        key: String,
        entry_id: u64,
        exporter: Arc<SpanExporter>,
        batch: Vec<Span>,
    ) {
        let count = batch.len();
        let scope = self.scope.clone();
        let timeout = self.factory.timeout;
        let handle = self.tasks.spawn(async move {
            let data = batch
                .into_iter()
                .map(|span| convert::span_data(span, &scope))
                .collect();
            match tokio::time::timeout(timeout, exporter.export(data)).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        self.in_flight.insert(
            handle.id(),
            InFlight {
                key,
                entry_id,
                count,
            },
        );
    }

    /// Accounts for a finished export and frees its exporter for the next batch.
    fn complete(&mut self, done: Result<(task::Id, ExportResult), JoinError>) {
        let (id, result) = match done {
            Ok(done) => done,
            Err(e) => (e.id(), Err(format!("export task failed: {e}"))),
        };
        let Some(InFlight {
            key,
            entry_id,
            count,
        }) = self.in_flight.remove(&id)
        else {
            return;
        };
        self.held = self.held.saturating_sub(count);
        match result {
            Ok(()) => {
                self.counters
                    .exported
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.count_dropped(count);
                let endpoint = &self.factory.endpoint;
                self.warn
                    .warn(|| format!("OTLP export of {count} spans to {endpoint} failed: {e}"));
            }
        }
        let Some(entry) = self.entries.get_mut(&key).filter(|e| e.id == entry_id) else {
            return;
        };
        entry.busy = false;
        if !self.shutting_down && entry.pending.len() >= self.limits.batch {
            self.dispatch(&key);
        }
    }

    /// The periodic flush: whatever waits on an idle exporter goes now.
    fn flush_idle(&mut self) {
        let ready: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.busy && !e.pending.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for key in ready {
            self.dispatch(&key);
        }
    }

    /// Waits for in-flight exports, then sends the rest in one request per resource. Each
    /// step is bounded by the export timeout.
    async fn shutdown(mut self) {
        self.shutting_down = true;
        self.wait_all().await;
        self.flush_idle();
        self.wait_all().await;
    }

    async fn wait_all(&mut self) {
        while let Some(done) = self.tasks.join_next_with_id().await {
            self.complete(done);
        }
    }

    fn count_dropped(&self, n: usize) {
        self.counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{
        receiver::{self, Received},
        run, ExportConfig,
    };
    use crate::spans::model::{AttrValue, SpanKind, SpanStatus};
    use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue as ProtoKeyValue};
    use std::collections::BTreeMap;

    fn resource(service: &'static str, pid: i64) -> Arc<Resource> {
        Arc::new(Resource {
            attributes: vec![
                ("service.name".into(), service.into()),
                ("process.pid".into(), AttrValue::Int(pid)),
            ],
        })
    }

    fn span(resource: &Arc<Resource>, n: u8) -> Span {
        Span {
            trace_id: [n; 16],
            span_id: [n; 8],
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

    fn config(endpoint: String, protocol: Protocol, timeout: Duration) -> OtlpConfig {
        OtlpConfig {
            endpoint,
            protocol,
            headers: vec![("x-api-key".into(), "s e%cret".into())],
            timeout,
        }
    }

    fn endpoint(protocol: Protocol, addr: std::net::SocketAddr) -> String {
        match protocol {
            Protocol::Grpc => format!("http://{addr}"),
            Protocol::HttpProtobuf => format!("http://{addr}/v1/traces"),
        }
    }

    fn attr(attrs: &[ProtoKeyValue], key: &str) -> Option<any_value::Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    /// service.name -> (process.pid, sorted span names)
    fn by_service(received: &[Received]) -> BTreeMap<String, (i64, Vec<String>)> {
        let mut out: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
        for rs in received.iter().flat_map(|r| &r.request.resource_spans) {
            let attrs = &rs.resource.as_ref().expect("resource").attributes;
            let Some(any_value::Value::StringValue(service)) = attr(attrs, "service.name") else {
                panic!("no service.name in {attrs:?}");
            };
            let Some(any_value::Value::IntValue(pid)) = attr(attrs, "process.pid") else {
                panic!("no process.pid in {attrs:?}");
            };
            let entry = out.entry(service).or_insert((pid, Vec::new()));
            assert_eq!(entry.0, pid);
            for ss in &rs.scope_spans {
                assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some("zerotel"));
                entry.1.extend(ss.spans.iter().map(|s| s.name.clone()));
            }
        }
        out.values_mut().for_each(|(_, names)| names.sort());
        out
    }

    async fn wait_for(receiver: &receiver::Receiver, spans: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let count = || -> usize {
            receiver
                .received()
                .iter()
                .flat_map(|r| &r.request.resource_spans)
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum()
        };
        while count() < spans {
            assert!(
                Instant::now() < deadline,
                "only {} of {spans} spans arrived",
                count()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn two_resources_arrive(protocol: Protocol) {
        let receiver = match protocol {
            Protocol::Grpc => receiver::start_grpc().await,
            Protocol::HttpProtobuf => receiver::start_http().await,
        };
        let otlp = config(
            endpoint(protocol, receiver.addr),
            protocol,
            Duration::from_secs(5),
        );
        let counters = Arc::new(ExportCounters::default());
        let (tx, rx) = mpsc::channel(8);
        let exporter = tokio::spawn(run(
            ExportConfig {
                print: false,
                otlp: Some(otlp),
            },
            rx,
            Arc::clone(&counters),
        ));
        let (alpha, beta) = (resource("alpha", 1), resource("beta", 2));
        // Same content, different allocation: must be the same resource.
        let alpha_again = Arc::new(Resource::clone(&alpha));

        tx.send(vec![span(&alpha, 1), span(&beta, 2), span(&alpha, 3)])
            .await
            .unwrap();
        // The periodic flush sends these without waiting for more.
        wait_for(&receiver, 3).await;
        tx.send(vec![span(&alpha_again, 4), span(&beta, 5)])
            .await
            .unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(15), exporter)
            .await
            .unwrap()
            .unwrap();

        let received = receiver.received();
        let got = by_service(&received);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["alpha"], (1, names(&["span-1", "span-3", "span-4"])));
        assert_eq!(got["beta"], (2, names(&["span-2", "span-5"])));
        for r in &received {
            assert!(
                r.headers.contains(&("x-api-key".into(), "s e%cret".into())),
                "{:?}",
                r.headers
            );
            assert_eq!(
                r.request.resource_spans.len(),
                1,
                "one resource per request"
            );
        }
        let span_proto = &received[0].request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(
            span_proto.end_time_unix_nano - span_proto.start_time_unix_nano,
            1_000_000
        );
        assert_eq!(counters.exported.load(Ordering::Relaxed), 5);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(counters.errors.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_two_resources() {
        two_resources_arrive(Protocol::Grpc).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_two_resources() {
        two_resources_arrive(Protocol::HttpProtobuf).await;
    }

    /// Runs the exporter against `addr`, returning the counters and how long the flush took.
    async fn export_to_broken(
        protocol: Protocol,
        addr: std::net::SocketAddr,
    ) -> (Arc<ExportCounters>, Duration) {
        let otlp = config(
            endpoint(protocol, addr),
            protocol,
            Duration::from_millis(300),
        );
        let counters = Arc::new(ExportCounters::default());
        let (tx, rx) = mpsc::channel(8);
        let exporter = tokio::spawn(run(
            ExportConfig {
                print: false,
                otlp: Some(otlp),
            },
            rx,
            Arc::clone(&counters),
        ));
        let (a, b) = (resource("a", 1), resource("b", 2));
        tx.send(vec![span(&a, 1), span(&b, 2), span(&a, 3)])
            .await
            .unwrap();
        drop(tx);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), exporter)
            .await
            .unwrap()
            .unwrap();
        (counters, started.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_are_counted_not_retried() {
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            for addr in [
                receiver::closed_port().await,
                receiver::start_silent().await,
            ] {
                let (counters, took) = export_to_broken(protocol, addr).await;
                assert_eq!(counters.exported.load(Ordering::Relaxed), 0);
                assert_eq!(
                    counters.dropped.load(Ordering::Relaxed),
                    3,
                    "{protocol} {addr}"
                );
                assert_eq!(
                    counters.errors.load(Ordering::Relaxed),
                    2,
                    "one request per resource"
                );
                // Two steps (in flight, rest) of at most the 300 ms timeout each, plus slack.
                assert!(
                    took < Duration::from_secs(2),
                    "{protocol}: flush took {took:?}"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_spans_are_bounded() {
        let addr = receiver::closed_port().await;
        let otlp = config(
            endpoint(Protocol::HttpProtobuf, addr),
            Protocol::HttpProtobuf,
            Duration::from_millis(300),
        );
        let counters = Arc::new(ExportCounters::default());
        let mut pipeline = Pipeline::new(&otlp, Arc::clone(&counters), LIMITS).unwrap();
        let r = resource("r", 1);
        pipeline.push((0..10_000u32).map(|i| span(&r, i as u8)).collect());
        // The first 512 are in flight, the rest wait: 8192 held in all.
        assert_eq!(pipeline.held, LIMITS.max_held);
        assert_eq!(pipeline.in_flight.len(), 1);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 10_000 - 8192);
        pipeline.push(vec![span(&r, 1)]);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 10_000 - 8192 + 1);
        pipeline.shutdown().await;
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 10_001);
        assert_eq!(counters.errors.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exporters_are_bounded_lru() {
        let addr = receiver::closed_port().await;
        let otlp = config(
            endpoint(Protocol::Grpc, addr),
            Protocol::Grpc,
            Duration::from_millis(300),
        );
        let counters = Arc::new(ExportCounters::default());
        let limits = Limits {
            max_exporters: 2,
            ..LIMITS
        };
        let mut pipeline = Pipeline::new(&otlp, Arc::clone(&counters), limits).unwrap();
        let (r1, r2, r3) = (resource("r1", 1), resource("r2", 2), resource("r3", 3));
        pipeline.push(vec![span(&r1, 1)]);
        pipeline.push(vec![span(&r2, 2)]);
        pipeline.push(vec![span(&r1, 3)]); // r1 is now the most recently used
        pipeline.push(vec![span(&r3, 4)]);
        let mut keys: Vec<&String> = pipeline.entries.keys().collect();
        keys.sort();
        let mut want = [convert::resource_key(&r1), convert::resource_key(&r3)];
        want.sort();
        assert_eq!(keys, want.iter().collect::<Vec<_>>());
        // The evicted r2 sent its pending span on the way out.
        assert_eq!(pipeline.in_flight.len(), 1);
        assert_eq!(pipeline.held, 4);
        pipeline.shutdown().await;
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_resource_dropped_when_all_exporters_busy() {
        let addr = receiver::start_silent().await;
        let otlp = config(
            endpoint(Protocol::HttpProtobuf, addr),
            Protocol::HttpProtobuf,
            Duration::from_millis(300),
        );
        let counters = Arc::new(ExportCounters::default());
        let limits = Limits {
            batch: 1,
            max_exporters: 2,
            ..LIMITS
        };
        let mut pipeline = Pipeline::new(&otlp, Arc::clone(&counters), limits).unwrap();
        pipeline.push(vec![span(&resource("r1", 1), 1)]);
        pipeline.push(vec![span(&resource("r2", 2), 2)]);
        assert_eq!(pipeline.in_flight.len(), 2);
        pipeline.push(vec![span(&resource("r3", 3), 3)]);
        assert_eq!(pipeline.entries.len(), 2);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 1);
        pipeline.shutdown().await;
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn http_header_values_survive_sdk_decoding() {
        let h = http_headers(&[("k".into(), "50%25 off%".into())]);
        assert_eq!(h["k"], "50%2525 off%25");
    }
}
