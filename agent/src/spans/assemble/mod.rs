//! Stage 2: events -> connections -> HTTP exchanges -> spans, with trace context and in-process
//! parent/child links. Owns discovery, so process state and connection state change together.
//! Kafka exchanges become messaging spans in `kafka`.

mod http2;
mod kafka;

use std::{sync::Arc, time::Duration};

use rustc_hash::FxHashMap;

use tokio::{sync::mpsc, time};
use zerotel_abi::{
    direction, protocol, ConnCloseEvent, ConnOpenEvent, DataMeta, PgMessageHead, ProcessEvent, Sampler, SpanIds,
};

use crate::{
    capture::CapturedEvent,
    clock,
    conn::{socket_addr, ConnTable, Connection},
    context::{self, RemoteParent},
    discovery::{Discovery, SeededConn},
    kubernetes::PodUpdate,
    protocols::{
        http1::{Output, Outcome, RequestHead, ResponseHead},
        postgres::{PgConnection, PgMessage},
    },
    spans::{
        db::{self, DbSpan, QueryText, SummaryCache},
        http::{describe, http1_version, Endpoint, Exchange},
        messaging::{ConsumerGroups, ProducedIndex, TopicNames},
        model::{Span, SpanId, SpanKind, SpanLink, TraceId, WireProtocol},
    },
    telemetry::Telemetry,
};

/// The trace a new span joins, and its parent there.
struct Lineage {
    trace_id: TraceId,
    parent: Option<SpanId>,
    flags: u8,
    trace_state: String,
}

impl Lineage {
    fn root(sampler: &Sampler) -> Self {
        let trace_id = context::new_trace_id();
        Self { flags: sampler.flags(&trace_id, None), trace_id, parent: None, trace_state: String::new() }
    }

    /// A SERVER span continues the caller's trace when the request carries one.
    fn from_remote(remote: Option<RemoteParent>, sampler: &Sampler) -> Self {
        remote.map_or_else(
            || Self::root(sampler),
            |p| Self {
                flags: sampler.flags(&p.trace_id, Some(p.flags)),
                trace_id: p.trace_id,
                parent: Some(p.span_id),
                trace_state: p.trace_state,
            },
        )
    }

    /// The kernel's decision. `remote` is what userspace read from a SERVER request's headers
    /// (None for a CLIENT request): its tracestate is kept, and when the kernel found no parent
    /// (it reads W3C version 00 only, and of HTTP/2 only the plain literal zerotel injects) a
    /// parent only userspace understood (B3, a later version, an HPACK-coded header) is kept.
    fn from_kernel(ids: &SpanIds, remote: Option<RemoteParent>, sampler: &Sampler) -> Self {
        match remote {
            Some(parent) if ids.parent_id == [0; 8] => Self::from_remote(Some(parent), sampler),
            remote => Self {
                trace_id: ids.trace_id,
                parent: (ids.parent_id != [0; 8]).then_some(ids.parent_id),
                flags: ids.flags,
                trace_state: remote.map(|p| p.trace_state).unwrap_or_default(),
            },
        }
    }

    /// A CLIENT span is the child of the request its thread is serving, if any.
    fn from_serving(serving: Option<Serving>, sampler: &Sampler) -> Self {
        serving.map_or_else(|| Self::root(sampler), |s| Self {
            trace_id: s.trace_id,
            parent: Some(s.span_id),
            flags: s.flags,
            trace_state: String::new(),
        })
    }
}

/// A span's description, before ids and times.
struct Described {
    kind: SpanKind,
    name: String,
    attributes: crate::spans::model::Attributes,
    status: crate::spans::model::SpanStatus,
    links: Vec<SpanLink>,
}

/// Ids and timing of an exchange from its request head until it ends.
struct OpenExchange {
    lineage: Lineage,
    span_id: SpanId,
    request: RequestHead,
    start_ns: u64,
    tid: u32,
}

/// The SERVER exchange a thread is serving: CLIENT requests it sends become its children.
#[derive(Clone, Copy)]
struct Serving {
    pid: u32,
    conn_id: u64,
    exchange: u64,
    trace_id: TraceId,
    span_id: SpanId,
    flags: u8,
}

/// Bounds of the per-exchange and per-thread state.
const MAX_OPEN_EXCHANGES: usize = 65_536;
const MAX_SERVING_THREADS: usize = 65_536;

/// What each thread is serving, and which threads of a process are serving.
#[derive(Default)]
struct ServingTable {
    by_tid: FxHashMap<u32, Serving>,
    tids_by_pid: FxHashMap<u32, Vec<u32>>,
}

impl ServingTable {
    fn of_thread(&self, tid: u32) -> Option<Serving> {
        self.by_tid.get(&tid).copied()
    }

    /// What a request sent by `tid` of `pid` is the child of: what the thread serves, else the
    /// one request its process serves (as the kernel decides for HTTP/1).
    fn parent_for(&self, pid: u32, tid: u32) -> Option<Serving> {
        self.of_thread(tid).or_else(|| self.only_one_of(pid))
    }

    /// The request a process is serving when it serves exactly one: a client library that sends
    /// from its own thread (librdkafka, kafka-python) still sends on behalf of that request.
    fn only_one_of(&self, pid: u32) -> Option<Serving> {
        match self.tids_by_pid.get(&pid).map(Vec::as_slice) {
            Some([tid]) => self.of_thread(*tid),
            _ => None,
        }
    }

    fn start(&mut self, tid: u32, serving: Serving) {
        if self.by_tid.len() >= MAX_SERVING_THREADS {
            self.by_tid.clear();
            self.tids_by_pid.clear();
        }
        if let Some(previous) = self.by_tid.insert(tid, serving) {
            self.unindex(previous.pid, tid);
        }
        self.tids_by_pid.entry(serving.pid).or_default().push(tid);
    }

    /// The thread is done with this exchange (and not with a later one it started since).
    fn end(&mut self, tid: u32, conn_id: u64, exchange: u64) {
        let Some(serving) = self.by_tid.get(&tid) else { return };
        if serving.conn_id == conn_id && serving.exchange == exchange {
            let pid = serving.pid;
            self.by_tid.remove(&tid);
            self.unindex(pid, tid);
        }
    }

    /// A process ended: nothing of it is served any more.
    fn forget_process(&mut self, pid: u32) {
        for tid in self.tids_by_pid.remove(&pid).unwrap_or_default() {
            self.by_tid.remove(&tid);
        }
    }

    fn unindex(&mut self, pid: u32, tid: u32) {
        if let Some(tids) = self.tids_by_pid.get_mut(&pid) {
            tids.retain(|t| *t != tid);
            if tids.is_empty() {
                self.tids_by_pid.remove(&pid);
            }
        }
    }
}

pub struct Assembler {
    conns: ConnTable,
    exchanges: FxHashMap<(u64, u64), OpenExchange>,
    serving: ServingTable,
    discovery: Discovery,
    telemetry: Arc<Telemetry>,
    sampler: Sampler,
    /// How much SQL text spans carry.
    query_text: QueryText,
    sql_summaries: SummaryCache,
    topic_names: TopicNames,
    produced: ProducedIndex,
    consumer_groups: ConsumerGroups,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to turn kernel times into wall-clock times.
    mono_to_unix_ns: i128,
    outputs: Vec<Output>,
    kafka_exchanges: Vec<crate::protocols::kafka::Exchange>,
    h2_events: Vec<crate::protocols::http2::H2Event>,
    h2_streams: FxHashMap<(u64, u32), http2::OpenStream>,
    /// Ids the kernel decided for HTTP/2 streams (injected, or served), until their stream starts.
    h2_ids: FxHashMap<(u64, u32), SpanIds>,
    spans: Vec<Span>,
}

impl Assembler {
    pub fn new(discovery: Discovery, telemetry: Arc<Telemetry>, sampler: Sampler, query_text: QueryText) -> Self {
        Self {
            sampler,
            query_text,
            sql_summaries: SummaryCache::default(),
            conns: ConnTable::default(),
            exchanges: FxHashMap::default(),
            serving: ServingTable::default(),
            topic_names: TopicNames::default(),
            produced: ProducedIndex::default(),
            consumer_groups: ConsumerGroups::default(),
            discovery,
            telemetry,
            mono_to_unix_ns: mono_to_unix_offset(),
            outputs: Vec::new(),
            kafka_exchanges: Vec::new(),
            h2_events: Vec::new(),
            h2_streams: FxHashMap::default(),
            h2_ids: FxHashMap::default(),
            spans: Vec::new(),
        }
    }

    /// Select the processes running now and adopt their existing connections.
    pub fn initial_scan(&mut self) {
        let seeded = self.discovery.scan();
        self.adopt(seeded);
    }

    pub fn handle(&mut self, event: CapturedEvent) {
        match event {
            CapturedEvent::ConnOpen(e) => self.on_open(&e),
            CapturedEvent::Data { meta, ids, payload } => self.on_data(&meta, ids.as_ref(), &payload),
            CapturedEvent::ConnClose(e) => self.on_close(&e),
            CapturedEvent::ProcessExec(e) => self.on_exec(&e),
            CapturedEvent::ProcessExit(e) => self.on_exit(&e),
            CapturedEvent::PgMessage { head, body } => self.on_pg_message(&head, &body),
            CapturedEvent::StreamChunk { head, data } if head.protocol == protocol::HTTP2 => self.on_h2_chunk(&head, &data),
            CapturedEvent::StreamChunk { head, data } => self.on_stream_chunk(&head, &data),
            CapturedEvent::H2StreamIds(e) => self.on_h2_ids(&e),
            CapturedEvent::ConnTls(e) => {
                if let Some(conn) = self.conns.get_mut(e.conn_id) {
                    conn.start_tls();
                }
            }
        }
    }

    /// Spans finished since the last call.
    pub fn take_spans(&mut self) -> Vec<Span> {
        std::mem::take(&mut self.spans)
    }

    /// Once a second: rescan for port rules, decide for processes whose pod metadata is overdue.
    pub fn on_tick(&mut self) {
        let mut seeded = self.discovery.settle_overdue();
        if self.discovery.needs_rescan() {
            seeded.extend(self.discovery.scan());
        }
        self.adopt(seeded);
    }

    pub fn on_pod_update(&mut self, update: PodUpdate) {
        let seeded = self.discovery.on_pod_update(update);
        self.adopt(seeded);
    }

    fn adopt(&mut self, seeded: Vec<SeededConn>) {
        for c in seeded {
            self.track(c.conn_id, Connection::new(c.pid, c.fd, c.role, c.local, c.remote), 0);
        }
    }

    fn on_open(&mut self, e: &ConnOpenEvent) {
        // Make the resource now: short-lived clients may be gone by the time their span ends.
        self.discovery.resource(e.header.pid);
        let conn = Connection::new(e.header.pid, e.fd, e.role, socket_addr(&e.local), socket_addr(&e.remote));
        self.track(e.conn_id, conn, e.header.ts_ns);
    }

    fn track(&mut self, conn_id: u64, conn: Connection, ts_ns: u64) {
        // The fd was reused, so its previous connection closed (its close event was lost).
        if let Some(previous) = self.conns.holding(conn.pid, conn.fd) {
            self.close_conn(previous, ts_ns);
        }
        if !self.conns.insert(conn_id, conn) {
            self.telemetry.connections_untracked.inc();
        }
    }

    fn on_data(&mut self, meta: &DataMeta, ids: Option<&SpanIds>, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(meta.conn_id) else { return };
        let segment = conn.segment(meta, payload);
        // The kernel's ids belong to the request that starts at this segment's first byte, which
        // may be reported only once a later segment completes its head.
        if let Some(ids) = ids {
            conn.kernel_ids = Some((segment.first_byte_ns, *ids));
        }
        conn.http.push(&segment, &mut self.outputs);
        let upgraded = conn.http.is_upgraded();
        self.flush_outputs(meta.conn_id, meta.header.tid);
        if upgraded {
            // WebSocket and other upgrades: nothing more to parse here.
            self.forget(meta.conn_id);
        }
    }

    /// A PostgreSQL message: statements it completes become CLIENT spans, children of the request
    /// the calling thread is serving.
    fn on_pg_message(&mut self, head: &PgMessageHead, body: &[u8]) {
        let Some(conn) = self.conns.get_mut(head.conn_id).filter(|c| !c.is_server) else { return };
        let message = PgMessage {
            frontend: head.direction == direction::EGRESS,
            kind: head.msg_type,
            len: head.len,
            body,
            bulk_before: head.bulk_before,
            start_ns: head.start_ns,
            end_ns: head.header.ts_ns,
        };
        let mut statements = Vec::new();
        let postgres = conn.postgres.get_or_insert_with(Default::default);
        let malformed = postgres.malformed_messages();
        postgres.push(&message, &mut statements);
        self.telemetry.postgres_malformed.add(postgres.malformed_messages() - malformed);
        if statements.is_empty() {
            return;
        }
        let server = Endpoint { addr: conn.remote, ip: &conn.remote_ip };
        let database = conn.postgres.as_deref().and_then(PgConnection::database);
        let described: Vec<(u64, u64, DbSpan)> = statements
            .iter()
            .map(|s| (s.start_ns, s.end_ns, db::describe_postgres(s, database, &server, self.query_text, &mut self.sql_summaries)))
            .collect();
        let pid = conn.pid;
        for (start_ns, end_ns, span) in described {
            self.push_client_span(pid, head.header.tid, start_ns, end_ns, span);
        }
    }

    fn push_client_span(&mut self, pid: u32, tid: u32, start_ns: u64, end_ns: u64, span: DbSpan) {
        let lineage = Lineage::from_serving(self.serving.parent_for(pid, tid), &self.sampler);
        let described = Described { kind: SpanKind::Client, name: span.name, attributes: span.attributes, status: span.status, links: Vec::new() };
        self.push_span(pid, lineage, context::new_span_id(), (start_ns, end_ns), described);
    }

    /// Export a span unless its trace is not sampled; the span's link for others to use.
    fn push_span(&mut self, pid: u32, lineage: Lineage, span_id: SpanId, (start_ns, end_ns): (u64, u64), span: Described) -> Option<SpanLink> {
        if lineage.flags & context::SAMPLED == 0 {
            self.telemetry.spans_unsampled.inc();
            return None;
        }
        self.telemetry.spans.count(span.kind, WireProtocol::of(&span.attributes));
        let link = SpanLink { trace_id: lineage.trace_id, span_id, trace_flags: lineage.flags };
        self.spans.push(Span {
            trace_id: lineage.trace_id,
            span_id,
            parent_span_id: lineage.parent,
            trace_flags: lineage.flags,
            trace_state: lineage.trace_state,
            kind: span.kind,
            name: span.name,
            start_unix_ns: self.to_unix(start_ns),
            end_unix_ns: self.to_unix(end_ns.max(start_ns)),
            attributes: span.attributes,
            status: span.status,
            links: span.links,
            resource: self.discovery.resource(pid),
        });
        Some(link)
    }

    fn on_close(&mut self, e: &ConnCloseEvent) {
        self.close_conn(e.conn_id, e.header.ts_ns);
    }

    fn close_conn(&mut self, conn_id: u64, ts_ns: u64) {
        let Some(conn) = self.conns.get_mut(conn_id) else { return };
        conn.http.close(ts_ns, &mut self.outputs);
        self.flush_outputs(conn_id, 0);
        self.close_h2(conn_id, ts_ns);
        self.forget(conn_id);
    }

    fn forget(&mut self, conn_id: u64) {
        if let Some(conn) = self.conns.remove(conn_id) {
            self.telemetry.http_desyncs.add(conn.http.desync_count());
            if conn.h2.is_some() {
                self.forget_h2_streams(conn_id);
            }
        }
    }

    fn on_exec(&mut self, e: &ProcessEvent) {
        self.discovery.on_exec(e.header.pid, e.comm());
    }

    /// A process ended: its sockets closed without close(2), so end them here.
    fn on_exit(&mut self, e: &ProcessEvent) {
        let pid = e.header.pid;
        let conn_ids = self.conns.ids_of(pid);
        if !conn_ids.is_empty() {
            for conn_id in conn_ids {
                if let Some(fd) = self.conns.get_mut(conn_id).map(|c| c.fd) {
                    self.discovery.forget_conn(pid, fd);
                }
                self.close_conn(conn_id, e.header.ts_ns);
            }
        }
        self.serving.forget_process(pid);
        self.consumer_groups.forget_process(pid);
        self.discovery.on_exit(pid);
    }

    fn flush_outputs(&mut self, conn_id: u64, tid: u32) {
        for output in std::mem::take(&mut self.outputs) {
            match output {
                Output::RequestStarted { id, head, start_ns } => {
                    // Taken, not copied: a second request pipelined in the same segment shares the
                    // start time but not the ids (the kernel decided them for the first).
                    let ids = self
                        .conns
                        .get_mut(conn_id)
                        .and_then(|c| c.kernel_ids.take_if(|(first_byte_ns, _)| *first_byte_ns == start_ns))
                        .map(|(_, ids)| ids);
                    self.start_exchange(conn_id, id, head, start_ns, tid, ids)
                }
                Output::ExchangeEnded { id, response, end_ns, outcome } => {
                    self.end_exchange(conn_id, id, response.as_ref(), end_ns, outcome)
                }
            }
        }
    }

    fn start_exchange(
        &mut self,
        conn_id: u64,
        id: u64,
        request: RequestHead,
        start_ns: u64,
        tid: u32,
        kernel_ids: Option<SpanIds>,
    ) {
        let Some(conn) = self.conns.get_mut(conn_id) else { return };
        let (pid, is_server) = (conn.pid, conn.is_server);
        if self.exchanges.len() >= MAX_OPEN_EXCHANGES {
            self.telemetry.exchanges_desynchronised.inc();
            return;
        }
        let (lineage, span_id) = match kernel_ids {
            // The kernel decided at send/receive time; an injected header carries these ids.
            Some(ids) => {
                let remote = if is_server { context::extract(&request.context) } else { None };
                (Lineage::from_kernel(&ids, remote, &self.sampler), ids.span_id)
            }
            None if is_server => {
                (Lineage::from_remote(context::extract(&request.context), &self.sampler), context::new_span_id())
            }
            None => (Lineage::from_serving(self.serving.parent_for(pid, tid), &self.sampler), context::new_span_id()),
        };
        if is_server {
            let serving = Serving { pid, conn_id, exchange: id, trace_id: lineage.trace_id, span_id, flags: lineage.flags };
            self.serving.start(tid, serving);
        }
        self.exchanges.insert((conn_id, id), OpenExchange { lineage, span_id, request, start_ns, tid });
    }

    fn end_exchange(&mut self, conn_id: u64, id: u64, response: Option<&ResponseHead>, end_ns: u64, outcome: Outcome) {
        let Some(exchange) = self.exchanges.remove(&(conn_id, id)) else { return };
        self.serving.end(exchange.tid, conn_id, id);
        if outcome == Outcome::Desynchronised {
            self.telemetry.exchanges_desynchronised.inc();
            return;
        }
        if exchange.lineage.flags & context::SAMPLED == 0 {
            self.telemetry.spans_unsampled.inc();
            return;
        }
        let Some(conn) = self.conns.get_mut(conn_id) else { return };
        let kind = if conn.is_server { SpanKind::Server } else { SpanKind::Client };
        let pid = conn.pid;
        let http = describe(&Exchange {
            kind,
            request: &exchange.request,
            response,
            version: http1_version(&exchange.request),
            local: Endpoint { addr: conn.local, ip: &conn.local_ip },
            remote: Endpoint { addr: conn.remote, ip: &conn.remote_ip },
            tls: conn.tls,
        });
        let described = Described { kind, name: http.name, attributes: http.attributes, status: http.status, links: Vec::new() };
        self.push_span(pid, exchange.lineage, exchange.span_id, (exchange.start_ns, end_ns), described);
    }

    fn to_unix(&self, mono_ns: u64) -> u64 {
        u64::try_from(i128::from(mono_ns) + self.mono_to_unix_ns).unwrap_or(0)
    }
}

fn mono_to_unix_offset() -> i128 {
    clock::now_ns(libc::CLOCK_REALTIME) - clock::now_ns(libc::CLOCK_MONOTONIC)
}

/// How often port selectors are re-applied.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Run stage 2 until the event channel closes; spans go to export without ever waiting on it.
pub async fn run(
    mut assembler: Assembler,
    mut rx: mpsc::Receiver<Vec<CapturedEvent>>,
    mut pods: mpsc::Receiver<PodUpdate>,
    tx: mpsc::Sender<Vec<Span>>,
) {
    let mut rescan = time::interval(RESCAN_INTERVAL);
    let mut pods_open = true;
    loop {
        tokio::select! {
            update = pods.recv(), if pods_open => match update {
                Some(update) => {
                    assembler.on_pod_update(update);
                    forward(&mut assembler, &tx);
                }
                None => pods_open = false,
            },
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                for event in batch {
                    assembler.handle(event);
                }
                forward(&mut assembler, &tx);
                assembler.telemetry.connections.store(assembler.conns.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            _ = rescan.tick() => assembler.on_tick(),
        }
    }
    forward(&mut assembler, &tx);
}

fn forward(assembler: &mut Assembler, tx: &mpsc::Sender<Vec<Span>>) {
    let spans = assembler.take_spans();
    if spans.is_empty() {
        return;
    }
    let n = spans.len() as u64;
    if tx.try_send(spans).is_err() {
        // A slow backend must never slow the capture: drop and count.
        assembler.telemetry.spans_queue_full.add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving(pid: u32, conn_id: u64, exchange: u64) -> Serving {
        Serving { pid, conn_id, exchange, trace_id: [1; 16], span_id: [exchange as u8; 8], flags: 1 }
    }

    #[test]
    fn a_process_serving_one_request_lends_it_to_its_other_threads() {
        let mut table = ServingTable::default();
        table.start(11, serving(1, 100, 1));
        assert_eq!(table.only_one_of(1).map(|s| s.exchange), Some(1));
        table.start(12, serving(1, 101, 2));
        assert!(table.only_one_of(1).is_none(), "two requests at once: no guess");
        table.end(11, 100, 1);
        assert_eq!(table.only_one_of(1).map(|s| s.exchange), Some(2));
        assert!(table.of_thread(11).is_none());
    }

    #[test]
    fn ending_an_older_exchange_keeps_the_thread_on_its_newer_one() {
        let mut table = ServingTable::default();
        table.start(11, serving(1, 100, 1));
        table.start(11, serving(1, 100, 2));
        table.end(11, 100, 1);
        assert_eq!(table.of_thread(11).map(|s| s.exchange), Some(2));
        assert_eq!(table.only_one_of(1).map(|s| s.exchange), Some(2), "the thread is indexed once");
        table.forget_process(1);
        assert!(table.of_thread(11).is_none() && table.only_one_of(1).is_none());
    }
}
