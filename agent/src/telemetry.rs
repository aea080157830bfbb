//! The agent's own telemetry: typed counters for every stage, served as Prometheus text on
//! `/metrics`, and `/healthz` (200 once every probe is attached).

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    export::ExportCounters,
    spans::model::{SpanKind, WireProtocol},
};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Latency buckets, in seconds: an OTLP request takes milliseconds on a healthy network and
/// up to the export timeout (10 s by default) on a sick one.
const LATENCY_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A Prometheus histogram of durations with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let index = LATENCY_BUCKETS.iter().position(|&le| seconds <= le).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (le, bucket) in LATENCY_BUCKETS.iter().map(|le| le.to_string()).chain(["+Inf".to_string()]).zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Spans made, by kind and protocol.
#[derive(Debug, Default)]
pub struct SpanCounters([[Counter; WireProtocol::ALL.len()]; SpanKind::ALL.len()]);

impl SpanCounters {
    pub fn count(&self, kind: SpanKind, protocol: WireProtocol) {
        self.0[kind as usize][protocol as usize].inc();
    }

    fn samples(&self) -> Vec<(String, u64)> {
        let mut samples = Vec::new();
        for kind in SpanKind::ALL {
            for protocol in WireProtocol::ALL {
                let value = self.0[kind as usize][protocol as usize].get();
                samples.push((format!("{{kind=\"{}\",protocol=\"{}\"}}", kind.label(), protocol.label()), value));
            }
        }
        samples
    }
}

/// Counters of every stage: capture -> assemble -> export.
#[derive(Default)]
pub struct Telemetry {
    /// Capture: events read from the ring buffer.
    pub events_read: Counter,
    /// Capture: records that did not decode.
    pub decode_errors: Counter,
    /// Assemble: spans made, by kind and protocol.
    pub spans: SpanCounters,
    /// Assemble: PostgreSQL messages that did not parse.
    pub postgres_malformed: Counter,
    /// Assemble: Kafka frames skipped because the kernel did not capture all their bytes.
    pub kafka_truncated_frames: Counter,
    /// Assemble: times a Kafka connection lost its framing (lost events).
    pub kafka_desyncs: Counter,
    /// Assemble: HTTP/2 connections whose header blocks could not all be decoded (nothing more
    /// is reported from them: HPACK state is never guessed).
    pub http2_desyncs: Counter,
    /// Assemble: spans not exported because their trace is not sampled.
    pub spans_unsampled: Counter,
    /// Assemble: exchanges whose bytes were lost or could not be framed (no span made).
    pub exchanges_desynchronised: Counter,
    /// Assemble: times an HTTP/1 connection lost sync (gaps, garbage, unframeable messages).
    pub http_desyncs: Counter,
    /// Assemble: connections not tracked because the table was full.
    pub connections_untracked: Counter,
    /// Assemble: connections tracked now (gauge).
    pub connections: AtomicU64,
    /// Assemble -> export: spans dropped because the export queue was full.
    pub spans_queue_full: Counter,
    /// Export stage counters.
    pub export: Arc<ExportCounters>,
    /// Every probe attached.
    pub ready: AtomicBool,
    /// `traceparent` is being inserted into outgoing requests.
    pub propagation: AtomicBool,
    /// Each probe family and whether it is attached (`zerotel_probe_attached{probe}`).
    pub probes_attached: Mutex<Vec<(&'static str, bool)>>,
    /// Discovery: processes selected now, and waiting for their pod's metadata (gauges).
    pub processes_traced: AtomicU64,
    pub processes_pending: AtomicU64,
    /// Kubernetes: pods of this node known (gauge), the first list is complete, watch errors.
    pub k8s_pods: AtomicU64,
    pub k8s_synced: AtomicBool,
    pub k8s_watch_errors: Counter,
    /// The kernel's per-CPU counters (lost events), read at scrape time.
    pub kernel: Mutex<Option<PerCpuArray<MapData, u64>>>,
}

impl Telemetry {
    /// Sum of kernel counter `index` over CPUs.
    pub fn kernel_counter(&self, index: u32) -> u64 {
        let guard = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .and_then(|c| c.get(&index, 0).ok())
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        counter("zerotel_events_read_total", "Events read from the kernel.", &[("", self.events_read.get())]);
        let lost = self.kernel_counter(zerotel_abi::counters::EVENTS_LOST);
        // One ring buffer today; the label keeps dashboards right if a second one comes.
        counter("zerotel_events_lost_total", "Events the kernel could not queue, by ring buffer (full).", &[("{ring=\"events\"}", lost)]);
        let failed = self.kernel_counter(zerotel_abi::counters::CAPTURE_FAILED);
        counter("zerotel_capture_failed_total", "Payload reads that failed in the kernel.", &[("", failed)]);
        let traffic = self.kernel_counter(zerotel_abi::counters::TRAFFIC_EVENTS);
        counter("zerotel_kernel_traffic_events_total", "Connection and data events the kernel queued for traced processes.", &[("", traffic)]);
        counter("zerotel_decode_errors_total", "Kernel records that did not decode.", &[("", self.decode_errors.get())]);
        let spans = self.spans.samples();
        let spans: Vec<(&str, u64)> = spans.iter().map(|(labels, value)| (labels.as_str(), *value)).collect();
        counter("zerotel_spans_total", "Spans assembled (sampled ones), by kind and protocol.", &spans);
        counter(
            "zerotel_parse_errors_total",
            "Traffic that did not parse, by protocol: an HTTP/1 or Kafka connection that lost its framing, an HTTP/2 connection given up, a PostgreSQL message that is not one.",
            &[
                ("{protocol=\"http\"}", self.http_desyncs.get()),
                ("{protocol=\"http2\"}", self.http2_desyncs.get()),
                ("{protocol=\"kafka\"}", self.kafka_desyncs.get()),
                ("{protocol=\"postgresql\"}", self.postgres_malformed.get()),
            ],
        );
        counter("zerotel_spans_unsampled_total", "Spans of unsampled traces (not exported).", &[("", self.spans_unsampled.get())]);
        counter(
            "zerotel_exchanges_desynchronised_total",
            "Exchanges whose bytes were lost or unframeable; no span made.",
            &[("", self.exchanges_desynchronised.get())],
        );
        counter(
            "zerotel_connections_untracked_total",
            "Connections ignored because the connection table was full.",
            &[("", self.connections_untracked.get())],
        );
        counter(
            "zerotel_kafka_truncated_frames_total",
            "Kafka frames skipped: larger than the kernel captures per syscall.",
            &[("", self.kafka_truncated_frames.get())],
        );
        let export = &self.export;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter("zerotel_spans_exported_total", "Spans the backend accepted.", &[("", load(&export.exported))]);
        let dropped = &export.dropped;
        counter(
            "zerotel_spans_dropped_total",
            "Spans not exported, by reason: queue_full (the export queue or the hand-over to it was full), rejected (the backend refused the request), partial_success (the backend refused these spans of an accepted request), shutdown (unsent at the shutdown timeout), no_exporter (OTLP configured but unusable).",
            &[
                ("{reason=\"queue_full\"}", load(&dropped.queue_full) + self.spans_queue_full.get()),
                ("{reason=\"rejected\"}", load(&dropped.rejected)),
                ("{reason=\"partial_success\"}", load(&dropped.partial_success)),
                ("{reason=\"shutdown\"}", load(&dropped.shutdown)),
                ("{reason=\"no_exporter\"}", load(&dropped.no_exporter)),
            ],
        );
        counter("zerotel_export_errors_total", "Export requests that failed (every failed attempt counts).", &[("", load(&export.errors))]);
        counter("zerotel_export_retries_total", "Export requests sent again after a transient failure.", &[("", load(&export.retries))]);
        counter("zerotel_k8s_watch_errors_total", "Kubernetes pod watch errors (it retries).", &[("", self.k8s_watch_errors.get())]);
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge("zerotel_connections", "Connections tracked now.", self.connections.load(Ordering::Relaxed));
        gauge("zerotel_export_queue_spans", "Spans held for export now: queued, in flight or awaiting a retry.", self.export.queued.load(Ordering::Relaxed));
        gauge("zerotel_export_queue_capacity_spans", "Most spans the export queue holds.", self.export.queue_capacity.load(Ordering::Relaxed));
        let propagating = u64::from(self.propagation.load(Ordering::Relaxed));
        gauge("zerotel_propagation_enabled", "1 when traceparent is inserted into outgoing requests.", propagating);
        gauge("zerotel_processes_traced", "Processes selected for tracing now.", self.processes_traced.load(Ordering::Relaxed));
        gauge(
            "zerotel_processes_pending",
            "Processes waiting for their pod's metadata to be selected or excluded.",
            self.processes_pending.load(Ordering::Relaxed),
        );
        gauge("zerotel_k8s_pods", "Pods of this node known from the Kubernetes API.", self.k8s_pods.load(Ordering::Relaxed));
        gauge("zerotel_k8s_synced", "1 once the first list of this node's pods arrived.", u64::from(self.k8s_synced.load(Ordering::Relaxed)));
        self.export.latency.render(&mut out, "zerotel_export_duration_seconds", "Time from sending an export request to its answer.");
        let _ = writeln!(out, "# HELP zerotel_probe_attached 1 when the probe family is attached, 0 when it could not be (or is turned off).\n# TYPE zerotel_probe_attached gauge");
        for (family, attached) in self.probes_attached.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "zerotel_probe_attached{{probe=\"{family}\"}} {}", u64::from(*attached));
        }
        out
    }
}

/// Serve `/healthz` and `/metrics` on an already bound listener until the task is dropped.
pub async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&telemetry, req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn respond(telemetry: &Telemetry, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => (StatusCode::OK, telemetry.render()),
        "/healthz" if telemetry.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ok\n".to_owned()),
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "not found: try /metrics or /healthz\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Bind the telemetry listener, with a message that names the address on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} for /metrics and /healthz: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter() {
        let t = Telemetry::default();
        for _ in 0..3 {
            t.spans.count(SpanKind::Server, WireProtocol::Http);
        }
        *t.probes_attached.lock().unwrap() = vec![("syscalls", true), ("propagation", false)];
        let text = t.render();
        for name in [
            "zerotel_events_read_total 0",
            "zerotel_events_lost_total{ring=\"events\"} 0",
            "zerotel_spans_total{kind=\"server\",protocol=\"http\"} 3",
            "zerotel_spans_total{kind=\"server\",protocol=\"grpc\"} 0",
            "zerotel_spans_total{kind=\"consumer\",protocol=\"kafka\"} 0",
            "zerotel_parse_errors_total{protocol=\"postgresql\"} 0",
            "zerotel_spans_exported_total 0",
            "zerotel_spans_dropped_total{reason=\"queue_full\"} 0",
            "zerotel_spans_dropped_total{reason=\"partial_success\"} 0",
            "zerotel_export_errors_total 0",
            "zerotel_export_retries_total 0",
            "zerotel_export_queue_spans 0",
            "zerotel_export_duration_seconds_count 0",
            "zerotel_probe_attached{probe=\"syscalls\"} 1",
            "zerotel_probe_attached{probe=\"propagation\"} 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    /// Every metric is explained in the README's table, so operators need not read code.
    #[test]
    fn every_metric_is_documented() {
        let readme = include_str!("../../README.md");
        let text = Telemetry::default().render();
        let names: std::collections::BTreeSet<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        let missing: Vec<&&str> = names.iter().filter(|name| !readme.contains(&format!("`{name}`")) && !readme.contains(&format!("`{name}{{"))).collect();
        assert!(missing.is_empty(), "metrics missing from README.md: {missing:?}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for ms in [1, 7, 7, 300, 60_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut text = String::new();
        h.render(&mut text, "t", "help");
        for line in ["t_bucket{le=\"0.005\"} 1", "t_bucket{le=\"0.01\"} 3", "t_bucket{le=\"0.25\"} 3", "t_bucket{le=\"0.5\"} 4", "t_bucket{le=\"10\"} 4", "t_bucket{le=\"+Inf\"} 5", "t_sum 60.315", "t_count 5"] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn healthz_follows_readiness() {
        let t = Telemetry::default();
        assert_eq!(respond(&t, "/healthz").status(), StatusCode::SERVICE_UNAVAILABLE);
        t.ready.store(true, Ordering::Relaxed);
        assert_eq!(respond(&t, "/healthz").status(), StatusCode::OK);
        assert_eq!(respond(&t, "/nope").status(), StatusCode::NOT_FOUND);
    }
}
