//! Kafka: stream chunks -> exchanges -> PRODUCER spans per topic of a Produce request, CONSUMER
//! spans per topic of a Fetch response, linked through record headers or, without them, through
//! the offsets this agent saw produced.

use std::sync::Arc;

use zerotel_abi::{direction, StreamChunkHead};

use super::{Assembler, Described, Lineage};
use crate::{
    context::{self, RemoteParent},
    protocols::kafka::{Direction, Exchange, ExchangeBody, Fetch, FetchedPartition, KafkaConnection, Piece, Produce},
    spans::{
        http::Endpoint,
        messaging::{self, ExchangeFacts},
        model::{SpanKind, SpanLink},
    },
};

/// Links one span carries at most (a poll of many records from many traces).
const MAX_LINKS: usize = 128;

/// The client's end of the exchange, copied out of the connection.
struct ClientSide {
    pid: u32,
    tid: u32,
    server: std::net::SocketAddr,
    server_ip: String,
}

impl Assembler {
    pub(super) fn on_stream_chunk(&mut self, head: &StreamChunkHead, data: &[u8]) {
        let Some(conn) = self.conns.get_mut(head.conn_id).filter(|c| !c.is_server) else { return };
        let piece = Piece {
            direction: if head.direction == direction::EGRESS { Direction::Request } else { Direction::Response },
            offset: head.offset,
            bytes: data,
            syscall_end: head.syscall_end,
            start_ns: head.start_ns,
            end_ns: head.header.ts_ns,
        };
        let kafka = conn.kafka.get_or_insert_with(|| Box::new(KafkaConnection::new()));
        let (desyncs, truncated) = (kafka.desyncs(), kafka.truncated_frames());
        kafka.push(&piece, &mut self.kafka_exchanges);
        self.telemetry.kafka_desyncs.add(kafka.desyncs() - desyncs);
        self.telemetry.kafka_truncated_frames.add(kafka.truncated_frames() - truncated);
        if self.kafka_exchanges.is_empty() {
            return;
        }
        let client = ClientSide { pid: conn.pid, tid: head.header.tid, server: conn.remote, server_ip: conn.remote_ip.clone() };
        for exchange in std::mem::take(&mut self.kafka_exchanges) {
            self.on_kafka_exchange(&client, exchange);
        }
    }

    fn on_kafka_exchange(&mut self, client: &ClientSide, exchange: Exchange) {
        let facts = ExchangeFacts {
            client_id: exchange.client_id.as_deref(),
            server: Endpoint { addr: client.server, ip: &client.server_ip },
        };
        let times = (exchange.start_ns, exchange.end_ns);
        match &exchange.body {
            ExchangeBody::Produce(produce) => self.on_produce(client, produce, &facts, times),
            ExchangeBody::Fetch(fetch) => self.on_fetch(client, fetch, &facts, times),
            ExchangeBody::Metadata { topics } => {
                for (id, name) in topics {
                    self.topic_names.learn(*id, name);
                }
            }
            ExchangeBody::Group { group_id } => {
                self.consumer_groups.learn(client.pid, exchange.client_id.as_deref(), group_id);
            }
        }
    }

    /// One PRODUCER span per topic; its batches' offsets are indexed for the consumers.
    fn on_produce(&mut self, client: &ClientSide, produce: &Produce, facts: &ExchangeFacts<'_>, times: (u64, u64)) {
        for topic in &produce.topics {
            let name = self.topic_names.resolve(&topic.topic);
            let mut contexts = distinct_contexts(
                topic.partitions.iter().flat_map(|p| p.traceparents.iter()).filter_map(|v| v.as_deref()),
            );
            let lineage = match contexts.first() {
                // The application's own instrumentation put a context in the record: join it.
                Some(first) => Lineage::from_remote(Some(first.clone()), &self.sampler),
                None => Lineage::from_serving(self.serving.parent_for(client.pid, client.tid), &self.sampler),
            };
            let links = contexts.drain(..).skip(1).map(|c| link_of(&c)).collect();
            let span = messaging::describe_send(&name, &topic.partitions, facts);
            let described = Described { kind: SpanKind::Producer, name: span.name, attributes: span.attributes, status: span.status, links };
            let Some(producer) = self.push_span(client.pid, lineage, context::new_span_id(), times, described) else {
                continue;
            };
            for partition in &topic.partitions {
                if let Some(base_offset) = partition.base_offset.filter(|_| partition.error_code.unwrap_or(0) == 0) {
                    self.produced.insert(&name, partition.partition, base_offset, partition.record_count, producer);
                }
            }
        }
    }

    /// One CONSUMER span per topic that returned records, linked to where each record came from.
    fn on_fetch(&mut self, client: &ClientSide, fetch: &Fetch, facts: &ExchangeFacts<'_>, times: (u64, u64)) {
        let group = self.consumer_groups.of(client.pid, facts.client_id);
        for topic in &fetch.topics {
            let partitions: Vec<&FetchedPartition> =
                topic.partitions.iter().filter(|p| p.batches.iter().any(|b| b.record_count > 0)).collect();
            let records: u64 = partitions.iter().flat_map(|p| &p.batches).map(|b| u64::from(b.record_count)).sum();
            if records == 0 {
                continue;
            }
            let name = self.topic_names.resolve(&topic.topic);
            let links = self.origins(&name, &partitions);
            // A single record's origin is the span's parent too: the trace then shows the hop.
            let lineage = match links.as_slice() {
                [origin] if records == 1 => Lineage::from_remote(Some(remote_of(origin)), &self.sampler),
                _ => Lineage::root(&self.sampler),
            };
            let span = messaging::describe_poll(&name, &partitions, records, group.as_deref(), facts);
            let described = Described { kind: SpanKind::Consumer, name: span.name, attributes: span.attributes, status: span.status, links };
            self.push_span(client.pid, lineage, context::new_span_id(), times, described);
        }
    }

    /// Where the fetched records came from: their `traceparent` header, else the PRODUCER span this
    /// agent saw writing their offsets. Distinct, at most `MAX_LINKS`.
    fn origins(&self, topic: &Arc<str>, partitions: &[&FetchedPartition]) -> Vec<SpanLink> {
        let mut links: Vec<SpanLink> = Vec::new();
        let mut add = |link: SpanLink| {
            if links.len() < MAX_LINKS && !links.iter().any(|l| l.span_id == link.span_id && l.trace_id == link.trace_id) {
                links.push(link);
            }
        };
        for partition in partitions {
            for batch in &partition.batches {
                for record in &batch.records {
                    let from_header = record.traceparent.as_deref().and_then(parse_traceparent);
                    match from_header {
                        Some(parent) => add(link_of(&parent)),
                        None => {
                            if let Some(producer) = self.produced.find(topic, partition.partition, record.offset) {
                                add(producer);
                            }
                        }
                    }
                }
                // Records past those the parser kept came in the same batch, so most likely from
                // the same Produce request as its first one.
                if batch.records.is_empty() {
                    if let Some(producer) = self.produced.find(topic, partition.partition, batch.base_offset) {
                        add(producer);
                    }
                }
            }
        }
        links
    }
}

fn parse_traceparent(value: &[u8]) -> Option<RemoteParent> {
    context::parse_traceparent(std::str::from_utf8(value).ok()?)
}

/// The valid contexts among header values, first occurrence first.
fn distinct_contexts<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<RemoteParent> {
    let mut contexts: Vec<RemoteParent> = Vec::new();
    for parent in values.filter_map(parse_traceparent) {
        if contexts.len() > MAX_LINKS {
            break;
        }
        if !contexts.iter().any(|c| c.span_id == parent.span_id && c.trace_id == parent.trace_id) {
            contexts.push(parent);
        }
    }
    contexts
}

fn link_of(parent: &RemoteParent) -> SpanLink {
    SpanLink { trace_id: parent.trace_id, span_id: parent.span_id, trace_flags: parent.flags }
}

fn remote_of(link: &SpanLink) -> RemoteParent {
    RemoteParent { trace_id: link.trace_id, span_id: link.span_id, flags: link.trace_flags, trace_state: String::new() }
}
