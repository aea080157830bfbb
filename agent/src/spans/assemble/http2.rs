//! HTTP/2: stream chunks -> streams -> one SERVER or CLIENT span per stream (gRPC calls by the
//! RPC conventions). Ids come from the kernel (H2_SERVED, H2_INJECTED) when it decided them;
//! otherwise a SERVER stream continues the trace its headers carry and is what the process
//! serves meanwhile, and a CLIENT stream is the child of what its process serves.

use zerotel_abi::{direction, H2StreamIdsEvent, StreamChunkHead};

use super::{Assembler, Described, Lineage, Serving, MAX_OPEN_EXCHANGES};

/// Kernel ids waiting for their stream's header block (reported before its bytes).
const MAX_PENDING_IDS: usize = 65_536;
use crate::{
    context,
    protocols::http1::RequestHead,
    protocols::http2::{H2Connection, H2Event, H2Stream, Headers, Piece, Role},
    spans::{
        http::Endpoint,
        model::{SpanId, SpanKind},
        rpc,
    },
};

/// A stream from its request's header block until it ends.
pub(super) struct OpenStream {
    lineage: Lineage,
    span_id: SpanId,
    /// The thread that read (server) or sent (client) the request.
    tid: u32,
}

impl Assembler {
    pub(super) fn on_h2_chunk(&mut self, head: &StreamChunkHead, data: &[u8]) {
        if data.starts_with(b"HTTP/1.") && self.conns.get_mut(head.conn_id).is_some_and(|c| c.h2.is_none()) {
            self.upgrade_to_h2(head.conn_id);
        }
        let Some(conn) = self.conns.get_mut(head.conn_id) else { return };
        let role = if conn.is_server { Role::Server } else { Role::Client };
        let piece = Piece {
            outgoing: head.direction == direction::EGRESS,
            offset: head.offset,
            bytes: data,
            syscall_end: head.syscall_end,
            start_ns: head.start_ns,
            end_ns: head.header.ts_ns,
        };
        let h2 = conn.h2.get_or_insert_with(|| Box::new(H2Connection::new(role).keeping(rpc::field_used)));
        let (desyncs, dropped) = (h2.desyncs(), h2.dropped_streams());
        h2.push(&piece, &mut self.h2_events);
        if h2.desyncs() > desyncs {
            self.telemetry.http2_desyncs.inc();
            log::debug!("HTTP/2 connection {} given up: {}", head.conn_id, h2.desync_reason().map(ToString::to_string).unwrap_or_default());
        }
        self.telemetry.exchanges_desynchronised.add(h2.dropped_streams() - dropped);
        self.flush_h2_events(head.conn_id, head.header.tid);
    }

    /// The connection switched from HTTP/1.1 to h2c: its first HTTP/2 bytes are the server's
    /// `101` answer. The exchange that asked for the switch goes on as stream 1.
    fn upgrade_to_h2(&mut self, conn_id: u64) {
        let asked = self.exchanges.keys().filter(|(c, _)| *c == conn_id).map(|&(_, id)| id).max();
        let exchange = asked.and_then(|id| Some((id, self.exchanges.remove(&(conn_id, id))?)));
        let Some(conn) = self.conns.get_mut(conn_id) else { return };
        let role = if conn.is_server { Role::Server } else { Role::Client };
        let request = exchange.as_ref().map(|(_, e)| (upgrade_request(&e.request), e.start_ns));
        conn.h2 = Some(Box::new(H2Connection::upgraded(role, request).keeping(rpc::field_used)));
        let Some((id, exchange)) = exchange else { return };
        // Served until the `101`, as the kernel sees it.
        self.serving.end(exchange.tid, conn_id, id);
        let stream = OpenStream { lineage: exchange.lineage, span_id: exchange.span_id, tid: exchange.tid };
        self.h2_streams.insert((conn_id, 1), stream);
    }

    /// The kernel decided a stream's ids: a CLIENT span's, injected into the HEADERS frame that
    /// opened it, or a SERVER span's, decided when the server read that frame.
    pub(super) fn on_h2_ids(&mut self, e: &H2StreamIdsEvent) {
        if self.h2_ids.len() >= MAX_PENDING_IDS {
            self.h2_ids.clear();
        }
        self.h2_ids.insert((e.conn_id, e.stream_id), e.ids);
    }

    /// The connection closed: its open streams end now.
    pub(super) fn close_h2(&mut self, conn_id: u64, ts_ns: u64) {
        let Some(h2) = self.conns.get_mut(conn_id).and_then(|c| c.h2.as_mut()) else { return };
        h2.close(ts_ns, &mut self.h2_events);
        self.flush_h2_events(conn_id, 0);
    }

    fn flush_h2_events(&mut self, conn_id: u64, tid: u32) {
        for event in std::mem::take(&mut self.h2_events) {
            match event {
                H2Event::RequestStarted { stream_id, request, start_ns: _ } => self.start_stream(conn_id, stream_id, &request, tid),
                H2Event::StreamEnded(stream) => self.end_stream(conn_id, &stream),
            }
        }
    }

    fn start_stream(&mut self, conn_id: u64, stream_id: u32, request: &Headers, tid: u32) {
        let Some(conn) = self.conns.get_mut(conn_id) else { return };
        let (pid, is_server) = (conn.pid, conn.is_server);
        if self.h2_streams.len() >= MAX_OPEN_EXCHANGES {
            self.telemetry.exchanges_desynchronised.inc();
            return;
        }
        let (lineage, span_id) = match self.h2_ids.remove(&(conn_id, stream_id)) {
            // What the kernel decided (and maybe injected downstream, or gave the calls it makes).
            Some(ids) => {
                let remote = if is_server { rpc::remote_parent(request) } else { None };
                (Lineage::from_kernel(&ids, remote, &self.sampler), ids.span_id)
            }
            None if is_server => (Lineage::from_remote(rpc::remote_parent(request), &self.sampler), context::new_span_id()),
            None => (Lineage::from_serving(self.serving.parent_for(pid, tid), &self.sampler), context::new_span_id()),
        };
        if is_server {
            let serving = Serving {
                pid,
                conn_id,
                exchange: h2_exchange_id(stream_id),
                trace_id: lineage.trace_id,
                span_id,
                flags: lineage.flags,
            };
            self.serving.start(tid, serving);
        }
        self.h2_streams.insert((conn_id, stream_id), OpenStream { lineage, span_id, tid });
    }

    fn end_stream(&mut self, conn_id: u64, stream: &H2Stream) {
        let Some(open) = self.h2_streams.remove(&(conn_id, stream.stream_id)) else { return };
        self.serving.end(open.tid, conn_id, h2_exchange_id(stream.stream_id));
        let Some(conn) = self.conns.get_mut(conn_id) else { return };
        let kind = if conn.is_server { SpanKind::Server } else { SpanKind::Client };
        let pid = conn.pid;
        let span = rpc::describe(
            kind,
            stream,
            Endpoint { addr: conn.local, ip: &conn.local_ip },
            Endpoint { addr: conn.remote, ip: &conn.remote_ip },
            conn.tls,
        );
        let described = Described { kind, name: span.name, attributes: span.attributes, status: span.status, links: Vec::new() };
        self.push_span(pid, open.lineage, open.span_id, (stream.start_ns, stream.end_ns), described);
    }

    /// Streams of a connection that went away without ending them.
    pub(super) fn forget_h2_streams(&mut self, conn_id: u64) {
        self.h2_streams.retain(|(c, _), _| *c != conn_id);
        self.h2_ids.retain(|(c, _), _| *c != conn_id);
    }
}

/// The HTTP/1.1 request that asked for an upgrade, as stream 1's request header block.
fn upgrade_request(head: &RequestHead) -> Headers {
    let mut fields = vec![
        (":method".to_string(), head.method.clone()),
        (":scheme".to_string(), "http".to_string()),
        (":path".to_string(), head.target.clone()),
    ];
    if let Some(host) = &head.host {
        fields.push((":authority".to_string(), host.clone()));
    }
    fields.extend(head.context.iter().cloned());
    Headers { fields }
}

/// HTTP/2 stream ids as `Serving::exchange` values, apart from HTTP/1 exchange numbers.
fn h2_exchange_id(stream_id: u32) -> u64 {
    (1 << 63) | u64::from(stream_id)
}
