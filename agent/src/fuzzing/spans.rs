//! What the assembler makes of decoded exchanges, minus ids, sampling and export: trace context
//! read from headers and span names and attributes described, each span counted.

use std::{net::SocketAddr, sync::Arc};

use rustc_hash::FxHashMap;
use zerotel_abi::DataMeta;

use crate::{
    conn::Connection,
    context,
    protocols::{
        http1::{Outcome, Output, RequestHead},
        http2::H2Event,
        kafka::{Exchange, ExchangeBody, FetchedPartition},
        postgres::Statement,
    },
    spans::{
        db::{self, QueryText, SummaryCache},
        http::{self, http1_version, Endpoint},
        messaging::{self, ConsumerGroups, ExchangeFacts, ProducedIndex, TopicNames},
        model::{SpanKind, SpanLink},
        rpc,
    },
};

/// Request heads kept for open exchanges at most, as the assembler bounds its exchanges.
const MAX_OPEN_HEADS: usize = 1024;

/// The server end of the client connections the Kafka and PostgreSQL drivers trace.
fn server() -> (SocketAddr, String) {
    let addr: SocketAddr = ([127, 0, 0, 2], 9092).into();
    (addr, addr.ip().to_string())
}

fn span_kind(conn: &Connection) -> SpanKind {
    if conn.is_server {
        SpanKind::Server
    } else {
        SpanKind::Client
    }
}

/// HTTP/1 exchanges of one connection as spans.
#[derive(Default)]
pub struct Http1Spans {
    outputs: Vec<Output>,
    heads: FxHashMap<u64, RequestHead>,
    pub count: usize,
}

impl Http1Spans {
    /// A data event of `conn`, as `Assembler::on_data` takes it.
    pub fn push_segment(&mut self, conn: &mut Connection, meta: &DataMeta, payload: &[u8]) {
        let segment = conn.segment(meta, payload);
        conn.http.push(&segment, &mut self.outputs);
        self.settle(conn);
    }

    pub fn close(&mut self, conn: &mut Connection, ts_ns: u64) {
        conn.http.close(ts_ns, &mut self.outputs);
        self.settle(conn);
    }

    fn settle(&mut self, conn: &Connection) {
        for output in std::mem::take(&mut self.outputs) {
            match output {
                Output::RequestStarted { id, head, .. } => {
                    if conn.is_server {
                        let _ = context::extract(&head.context);
                    }
                    if self.heads.len() < MAX_OPEN_HEADS {
                        self.heads.insert(id, head);
                    }
                }
                Output::ExchangeEnded { id, response, outcome, .. } => {
                    let Some(request) = self.heads.remove(&id) else { continue };
                    if outcome == Outcome::Desynchronised {
                        continue;
                    }
                    let _ = http::describe(&http::Exchange {
                        kind: span_kind(conn),
                        request: &request,
                        response: response.as_ref(),
                        version: http1_version(&request),
                        local: Endpoint { addr: conn.local, ip: &conn.local_ip },
                        remote: Endpoint { addr: conn.remote, ip: &conn.remote_ip },
                        tls: conn.tls,
                    });
                    self.count += 1;
                }
            }
        }
    }
}

/// HTTP/2 streams of `conn` as spans; returns how many.
pub fn describe_h2(conn: &Connection, events: impl Iterator<Item = H2Event>) -> usize {
    let mut count = 0;
    for event in events {
        match event {
            H2Event::RequestStarted { request, .. } => {
                if conn.is_server {
                    let _ = rpc::remote_parent(&request);
                }
            }
            H2Event::StreamEnded(stream) => {
                let local = Endpoint { addr: conn.local, ip: &conn.local_ip };
                let remote = Endpoint { addr: conn.remote, ip: &conn.remote_ip };
                let _ = rpc::describe(span_kind(conn), &stream, local, remote, conn.tls);
                count += 1;
            }
        }
    }
    count
}

/// Kafka exchanges of one client as PRODUCER and CONSUMER spans, with the state the assembler
/// keeps across them (topic names, groups, produced offsets). Counts exchanges, spans or not.
#[derive(Default)]
pub struct KafkaSpans {
    topic_names: TopicNames,
    groups: ConsumerGroups,
    produced: ProducedIndex,
    pub count: usize,
}

impl KafkaSpans {
    pub fn describe(&mut self, exchanges: impl Iterator<Item = Exchange>) {
        let (addr, ip) = server();
        for exchange in exchanges {
            self.count += 1;
            let client_id = exchange.client_id.as_deref();
            let facts = ExchangeFacts { client_id, server: Endpoint { addr, ip: &ip } };
            match &exchange.body {
                ExchangeBody::Produce(produce) => {
                    for topic in &produce.topics {
                        let name = self.topic_names.resolve(&topic.topic);
                        let values = topic.partitions.iter().flat_map(|p| p.traceparents.iter().flatten());
                        values.for_each(|value| drop(traceparent(value)));
                        let _ = messaging::describe_send(&name, &topic.partitions, &facts);
                        let producer = SpanLink { trace_id: [1; 16], span_id: [2; 8], trace_flags: 1 };
                        for partition in &topic.partitions {
                            if let Some(base_offset) = partition.base_offset {
                                self.produced.insert(
                                    &name,
                                    partition.partition,
                                    base_offset,
                                    partition.record_count,
                                    producer,
                                );
                            }
                        }
                    }
                }
                ExchangeBody::Fetch(fetch) => {
                    let group = self.groups.of(1, client_id);
                    for topic in &fetch.topics {
                        let partitions: Vec<&FetchedPartition> =
                            topic.partitions.iter().filter(|p| p.batches.iter().any(|b| b.record_count > 0)).collect();
                        let records: u64 =
                            partitions.iter().flat_map(|p| &p.batches).map(|b| u64::from(b.record_count)).sum();
                        if records == 0 {
                            continue;
                        }
                        let name = self.topic_names.resolve(&topic.topic);
                        self.find_origins(&name, &partitions);
                        let _ = messaging::describe_poll(&name, &partitions, records, group.as_deref(), &facts);
                    }
                }
                ExchangeBody::Metadata { topics } => {
                    for (id, name) in topics {
                        self.topic_names.learn(*id, name);
                    }
                }
                ExchangeBody::Group { group_id } => self.groups.learn(1, client_id, group_id),
            }
        }
    }

    /// Where fetched records came from: their headers, else the offsets produced.
    fn find_origins(&self, topic: &Arc<str>, partitions: &[&FetchedPartition]) {
        for partition in partitions {
            for batch in &partition.batches {
                let _ = self.produced.find(topic, partition.partition, batch.base_offset);
                for record in &batch.records {
                    if record.traceparent.as_deref().and_then(traceparent).is_none() {
                        let _ = self.produced.find(topic, partition.partition, record.offset);
                    }
                }
            }
        }
    }
}

fn traceparent(value: &[u8]) -> Option<context::RemoteParent> {
    context::parse_traceparent(std::str::from_utf8(value).ok()?)
}

/// PostgreSQL statements as database spans (their SQL summarized, as by default).
#[derive(Default)]
pub struct PgSpans {
    summaries: SummaryCache,
    pub count: usize,
}

impl PgSpans {
    pub fn describe(&mut self, database: Option<&str>, statements: impl Iterator<Item = Statement>) {
        let (addr, ip) = server();
        let server = Endpoint { addr, ip: &ip };
        for statement in statements {
            let _ = db::describe_postgres(&statement, database, &server, QueryText::Sanitized, &mut self.summaries);
            self.count += 1;
        }
    }
}
