//! Stage 1: read the ring buffer, decode records into owned events, hand them on in batches.
//! The kernel batches wake-ups, so the reader also drains on a short timer.

use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc, time};
use zerotel_abi::{
    user::{decode, Event},
    ConnCloseEvent, ConnOpenEvent, DataMeta, H2StreamIdsEvent, PgMessageHead, ProcessEvent, SpanIds, StreamChunkHead,
};

use crate::telemetry::Telemetry;

/// Longest time an event waits in the ring buffer when traffic is too light to trigger a wake-up.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// Events handed on at once.
const BATCH: usize = 256;
/// Payload bytes handed on at once: with the queue's bound, what caps the memory events take
/// between capture and assembly (stream chunks are up to 8 KiB each).
const BATCH_BYTES: usize = 256 * 1024;

/// A decoded event that owns its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapturedEvent {
    ConnOpen(ConnOpenEvent),
    /// `ids`: the span ids the kernel decided when this segment starts a request.
    Data { meta: DataMeta, ids: Option<SpanIds>, payload: Vec<u8> },
    ConnClose(ConnCloseEvent),
    ProcessExec(ProcessEvent),
    ProcessExit(ProcessEvent),
    /// A PostgreSQL message and the first bytes of its body.
    PgMessage { head: PgMessageHead, body: Vec<u8> },
    /// A piece of a stream-captured (Kafka) connection's bytes.
    StreamChunk { head: StreamChunkHead, data: Vec<u8> },
    /// The ids the kernel decided for an HTTP/2 stream (`header.kind` says which end).
    H2StreamIds(H2StreamIdsEvent),
    /// A connection carries TLS.
    ConnTls(zerotel_abi::ConnTlsEvent),
}

impl From<Event<'_>> for CapturedEvent {
    fn from(event: Event<'_>) -> Self {
        match event {
            Event::ConnOpen(e) => Self::ConnOpen(e),
            Event::Data(meta, ids, payload) => Self::Data { meta, ids, payload: payload.to_vec() },
            Event::ConnClose(e) => Self::ConnClose(e),
            Event::ProcessExec(e) => Self::ProcessExec(e),
            Event::ProcessExit(e) => Self::ProcessExit(e),
            Event::PgMessage(head, body) => Self::PgMessage { head, body: body.to_vec() },
            Event::StreamChunk(head, data) => Self::StreamChunk { head, data: data.to_vec() },
            Event::H2StreamIds(e) => Self::H2StreamIds(e),
            Event::ConnTls(e) => Self::ConnTls(e),
        }
    }
}

/// Read until `stop` fires, then drain what is left and return (closing `tx`).
pub async fn run(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<Vec<CapturedEvent>>,
    telemetry: Arc<Telemetry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open while the AsyncFd owns the ring.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    let mut tick = time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                // Cleared before draining, not after: the kernel wakes the reader once per
                // crossing of its threshold, so a wake-up that came during the drain must stay.
                guard.clear_ready();
                drain(guard.get_inner_mut(), &tx, &telemetry).await;
            }
            _ = tick.tick() => drain(ring.get_mut(), &tx, &telemetry).await,
            _ = stop.changed() => break,
        }
    }
    // The probes are still attached (they are detached last, which takes long): what the ring
    // held when asked to stop, at most, not the traffic that keeps coming.
    drain_at_most(ring.get_mut(), &tx, &telemetry, FINAL_DRAIN_BATCHES).await;
    Ok(())
}

/// Enough batches to empty a full ring buffer once.
const FINAL_DRAIN_BATCHES: usize = zerotel_abi::limits::EVENTS_BYTES as usize / BATCH_BYTES + 1;

async fn drain(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Vec<CapturedEvent>>, telemetry: &Telemetry) {
    drain_at_most(ring, tx, telemetry, usize::MAX).await;
}

async fn drain_at_most(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Vec<CapturedEvent>>, telemetry: &Telemetry, batches: usize) {
    for _ in 0..batches {
        let (batch, full) = read_batch(ring, telemetry);
        if batch.is_empty() {
            return;
        }
        // Waiting here (rather than dropping) pushes back into the ring buffer, where the kernel
        // counts what it cannot queue.
        if tx.send(batch).await.is_err() || !full {
            return;
        }
    }
}

/// Up to a batch of events, and whether a bound (not an empty ring) ended it.
fn read_batch(ring: &mut RingBuf<MapData>, telemetry: &Telemetry) -> (Vec<CapturedEvent>, bool) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut bytes = 0;
    while batch.len() < BATCH && bytes < BATCH_BYTES {
        let Some(record) = ring.next() else { break };
        bytes += record.len();
        match decode(&record) {
            Ok(event) => batch.push(event.into()),
            Err(e) => {
                telemetry.decode_errors.inc();
                log::debug!("undecodable event: {e}");
            }
        }
    }
    telemetry.events_read.add(batch.len() as u64);
    let full = batch.len() == BATCH || bytes >= BATCH_BYTES;
    (batch, full)
}
