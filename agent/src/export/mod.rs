//! Export stage: span batches in, console lines and/or OTLP out.
//!
//! This is the only module that touches the opentelemetry crates; the rest of the agent hands
//! over `Vec<Span>` batches through a channel.

mod backoff;
mod config;
mod console;
mod convert;
mod otlp;
#[cfg(test)]
mod receiver;
mod transport;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::mpsc;

pub use config::{ExportConfigError, OtlpConfig, Protocol};

use crate::{spans::model::Span, telemetry::Histogram};

/// Export statistics, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Spans the backend accepted.
    pub exported: AtomicU64,
    /// Spans given up on, by reason.
    pub dropped: DroppedSpans,
    /// Export requests that failed (each retry that fails counts again).
    pub errors: AtomicU64,
    /// Requests sent again after a transient failure.
    pub retries: AtomicU64,
    /// Spans held now: queued, in flight or waiting for a retry (gauge).
    pub queued: AtomicU64,
    /// The bound on `queued`.
    pub queue_capacity: AtomicU64,
    /// Seconds from sending a request to its answer.
    pub latency: Histogram,
}

/// Why spans were not exported. Every span the export stage receives is either exported or
/// counted in exactly one of these.
#[derive(Debug, Default)]
pub struct DroppedSpans {
    /// The queue held its maximum (the backend was slow or away for long).
    pub queue_full: AtomicU64,
    /// The backend refused the request for good (bad request, unauthenticated, ...).
    pub rejected: AtomicU64,
    /// The backend accepted the request but refused these spans (OTLP partial success).
    pub partial_success: AtomicU64,
    /// Still unsent when the shutdown timeout ran out.
    pub shutdown: AtomicU64,
    /// OTLP was configured but no exporter could be built.
    pub no_exporter: AtomicU64,
}

impl DroppedSpans {
    #[cfg(test)]
    pub fn total(&self) -> u64 {
        [&self.queue_full, &self.rejected, &self.partial_success, &self.shutdown, &self.no_exporter]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// What to do with spans.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// One line per span on stdout.
    pub print: bool,
    /// `None`: no OTLP export.
    pub otlp: Option<OtlpConfig>,
    /// How long the export stage may take to send what it holds once its input closes.
    pub flush_timeout: Duration,
}

/// Runs until `rx` is closed, then flushes what it holds and returns. Never panics on export
/// failure. Needs a tokio runtime with the time driver (multi-threaded is fine).
pub async fn run(
    config: ExportConfig,
    mut rx: mpsc::Receiver<Vec<Span>>,
    counters: Arc<ExportCounters>,
) {
    let printer = config.print.then(console::Printer::default);
    let Some(otlp) = &config.otlp else {
        return print_only(&mut rx, printer, None).await;
    };
    match otlp::Pipeline::new(otlp, Arc::clone(&counters)) {
        Ok(pipeline) => pipeline.run(&mut rx, printer, config.flush_timeout).await,
        Err(e) => {
            log::error!("OTLP export disabled: {e}");
            print_only(&mut rx, printer, Some(&counters)).await;
        }
    }
}

/// Without a working exporter; spans count as dropped when OTLP was wanted.
async fn print_only(
    rx: &mut mpsc::Receiver<Vec<Span>>,
    mut printer: Option<console::Printer>,
    dropped: Option<&ExportCounters>,
) {
    while let Some(spans) = rx.recv().await {
        if let Some(p) = printer.as_mut() {
            p.print(&spans);
        }
        if let Some(c) = dropped {
            c.dropped.no_exporter.fetch_add(spans.len() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::model::{Resource, SpanKind, SpanStatus};

    #[tokio::test]
    async fn print_only_runs_until_closed() {
        let (tx, rx) = mpsc::channel(1);
        let counters = Arc::new(ExportCounters::default());
        let task = tokio::spawn(run(
            ExportConfig {
                print: true,
                otlp: None,
                flush_timeout: Duration::from_secs(1),
            },
            rx,
            Arc::clone(&counters),
        ));
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_flags: 1,
            trace_state: String::new(),
            kind: SpanKind::Consumer,
            name: "orders process".into(),
            start_unix_ns: 0,
            end_unix_ns: 5_000,
            attributes: Vec::new(),
            status: SpanStatus::Unset,
            links: Vec::new(),
            resource: Arc::new(Resource {
                attributes: Vec::new(),
            }),
        };
        tx.send(vec![span]).await.unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!(counters.dropped.total(), 0);
        assert_eq!(counters.exported.load(Ordering::Relaxed), 0);
    }
}
