//! Export stage: span batches in, console lines and/or OTLP out.
//!
//! This is the only module that touches the opentelemetry crates; the rest of the agent hands
//! over `Vec<Span>` batches through a channel.

mod config;
mod console;
mod convert;
mod otlp;
#[cfg(test)]
mod receiver;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::sync::mpsc;

pub use config::{ExportConfigError, OtlpConfig, Protocol};

use crate::spans::model::Span;

/// Export statistics, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Spans the backend accepted.
    pub exported: AtomicU64,
    /// Spans given up on: failed exports, memory bound, no exporter available.
    pub dropped: AtomicU64,
    /// Failed export requests.
    pub errors: AtomicU64,
}

/// What to do with spans.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// One line per span on stdout.
    pub print: bool,
    /// `None`: no OTLP export.
    pub otlp: Option<OtlpConfig>,
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
    match otlp::Pipeline::new(otlp, Arc::clone(&counters), otlp::LIMITS) {
        Ok(pipeline) => pipeline.run(&mut rx, printer).await,
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
            c.dropped.fetch_add(spans.len() as u64, Ordering::Relaxed);
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
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(counters.exported.load(Ordering::Relaxed), 0);
    }
}
