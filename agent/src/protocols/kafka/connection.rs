//! One client connection: frames both directions and pairs each response with its request.
//!
//! A broker reads a connection's requests one at a time and answers them in order, so a response
//! also tells that requests sent before its own will get no answer we can still see (theirs were
//! lost): they are dropped then, which keeps the queue short without timeouts.

use std::{collections::VecDeque, sync::Arc};

use kafka_protocol::messages::ApiKey;

use super::{
    framing::{Frame, FrameSink, Framer},
    messages::{
        apply_produce_response, names_a_group, plausible_request_start, read_fetch_response, read_group_id,
        read_metadata_response, read_produce_acks, read_produce_request, read_request_header, response_body,
        response_correlation_id, response_is_flexible, RequestHeader, FETCH_MAX_VERSION, METADATA_MAX_VERSION,
        PRODUCE_MAX_VERSION,
    },
    Direction, Exchange, ExchangeBody, Piece, Produce,
};

/// Requests awaiting their response; the oldest are dropped beyond this.
pub const MAX_PENDING: usize = 1024;

/// Decodes one Kafka client connection, both directions.
#[derive(Debug, Default)]
pub struct KafkaConnection {
    requests: Framer,
    responses: Framer,
    pending: VecDeque<Pending>,
    /// The last client id seen, shared by pending requests: a client keeps one.
    client_id: Option<Arc<str>>,
}

/// A request awaiting its response.
#[derive(Debug)]
struct Pending {
    correlation_id: i32,
    api_key: ApiKey,
    api_version: i16,
    /// The bodies use flexible versions (a response header may still not: ApiVersions).
    flexible: bool,
    client_id: Option<Arc<str>>,
    start_ns: u64,
    awaits: Awaits,
}

/// What the response will complete.
#[derive(Debug)]
enum Awaits {
    /// The request's Produce, to which the response adds errors and offsets.
    Produce(Produce),
    Fetch,
    Metadata,
    Group(String),
    /// Nothing to report: the response is only matched.
    Nothing,
}

impl KafkaConnection {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed a piece; completed exchanges are appended to `out`.
    pub fn push(&mut self, piece: &Piece<'_>, out: &mut Vec<Exchange>) {
        match piece.direction {
            Direction::Request => {
                let mut sink = Requests { pending: &mut self.pending, client_id: &mut self.client_id, out };
                self.requests.push(piece, &mut sink);
            }
            Direction::Response => {
                let mut sink = Responses { pending: &mut self.pending, out };
                self.responses.push(piece, &mut sink);
            }
        }
    }

    /// Number of times a direction lost its framing (counted for telemetry).
    pub fn desyncs(&self) -> u64 {
        self.requests.desyncs() + self.responses.desyncs()
    }

    /// Frames skipped undecoded: not all their bytes were captured, or they exceed
    /// [`MAX_BUFFERED_FRAME`](super::framing::MAX_BUFFERED_FRAME) and span pieces.
    pub fn truncated_frames(&self) -> u64 {
        let (requests, responses) = (&self.requests, &self.responses);
        requests.truncated() + requests.oversized() + responses.truncated() + responses.oversized()
    }

    /// Requests awaiting a response.
    #[cfg(test)]
    fn pending_requests(&self) -> usize {
        self.pending.len()
    }
}

/// Receives request frames.
struct Requests<'c> {
    pending: &'c mut VecDeque<Pending>,
    client_id: &'c mut Option<Arc<str>>,
    out: &'c mut Vec<Exchange>,
}

impl FrameSink for Requests<'_> {
    fn plausible(&self, size: u32, head: &[u8]) -> Option<bool> {
        plausible_request_start(size, head)
    }

    fn frame(&mut self, frame: Frame<'_>) {
        let Some((header, body)) = read_request_header(frame.bytes) else { return };
        let client_id = intern(self.client_id, header.client_id);
        let awaits = if frame.whole { awaits_whole(&header, body) } else { awaits_cut(&header, body) };
        match awaits {
            // acks=0: no response comes, the exchange ends with the request.
            Some(Awaits::Produce(produce)) if !produce.answered => {
                let Some(end_ns) = frame.end_ns else { return };
                self.out.push(Exchange {
                    client_id: client_id.as_deref().map(str::to_owned),
                    api_key: header.api_key as i16,
                    api_version: header.api_version,
                    start_ns: frame.start_ns,
                    end_ns,
                    body: ExchangeBody::Produce(produce),
                });
            }
            Some(awaits) => self.enqueue(&header, client_id, frame.start_ns, awaits),
            None => {}
        }
    }
}

impl Requests<'_> {
    fn enqueue(&mut self, header: &RequestHeader<'_>, client_id: Option<Arc<str>>, start_ns: u64, awaits: Awaits) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(Pending {
            correlation_id: header.correlation_id,
            api_key: header.api_key,
            api_version: header.api_version,
            flexible: header.flexible,
            client_id,
            start_ns,
            awaits,
        });
    }
}

/// The client id as a shared string, reusing the last one when it repeats.
fn intern(last: &mut Option<Arc<str>>, client_id: Option<&[u8]>) -> Option<Arc<str>> {
    let bytes = client_id?;
    if let Some(known) = last.as_ref().filter(|known| known.as_bytes() == bytes) {
        return Some(Arc::clone(known));
    }
    let fresh: Arc<str> = String::from_utf8_lossy(bytes).into();
    *last = Some(Arc::clone(&fresh));
    Some(fresh)
}

/// What a whole request's response will complete; None for a Produce with acks=0, which gets none.
fn awaits_whole(header: &RequestHeader<'_>, body: &[u8]) -> Option<Awaits> {
    let version = header.api_version;
    let awaits = match header.api_key {
        ApiKey::Produce if version <= PRODUCE_MAX_VERSION => return whole_produce(header, body),
        ApiKey::Fetch if version <= FETCH_MAX_VERSION => Awaits::Fetch,
        ApiKey::Metadata if version <= METADATA_MAX_VERSION => Awaits::Metadata,
        key if names_a_group(key) => group(header, body),
        _ => Awaits::Nothing,
    };
    Some(awaits)
}

fn whole_produce(header: &RequestHeader<'_>, body: &[u8]) -> Option<Awaits> {
    match read_produce_request(body, header.api_version, header.flexible) {
        Ok(produce) => Some(Awaits::Produce(produce)),
        // Malformed records or later fields: still no response when acks=0.
        Err(_) => awaits_cut(header, body),
    }
}

/// What a request cut by capture awaits: its group id, read from the head, is all it can tell.
/// None for a Produce with acks=0, which gets no response.
fn awaits_cut(header: &RequestHeader<'_>, body: &[u8]) -> Option<Awaits> {
    let version = header.api_version;
    match header.api_key {
        ApiKey::Produce if version <= PRODUCE_MAX_VERSION => {
            let unanswered = read_produce_acks(body, version, header.flexible) == Ok(0);
            (!unanswered).then_some(Awaits::Nothing)
        }
        key if names_a_group(key) => Some(group(header, body)),
        _ => Some(Awaits::Nothing),
    }
}

fn group(header: &RequestHeader<'_>, body: &[u8]) -> Awaits {
    match read_group_id(header.api_key, body, header.api_version, header.flexible) {
        Some(group_id) => Awaits::Group(group_id),
        None => Awaits::Nothing,
    }
}

/// Receives response frames.
struct Responses<'c> {
    pending: &'c mut VecDeque<Pending>,
    out: &'c mut Vec<Exchange>,
}

impl FrameSink for Responses<'_> {
    fn plausible(&self, _size: u32, head: &[u8]) -> Option<bool> {
        let correlation_id = response_correlation_id(head)?;
        Some(self.pending.iter().any(|pending| pending.correlation_id == correlation_id))
    }

    fn frame(&mut self, frame: Frame<'_>) {
        let Some(correlation_id) = response_correlation_id(frame.bytes) else { return };
        let Some(pending) = self.answered(correlation_id, frame.end_ns) else { return };
        let Some(end_ns) = frame.end_ns else { return };
        let body = if frame.whole {
            response_body(frame.bytes, response_is_flexible(pending.api_key, pending.api_version)).ok()
        } else {
            None
        };
        let Pending { api_key, api_version, flexible, client_id, start_ns, awaits, .. } = pending;
        let Some(body) = exchange_body(awaits, api_version, flexible, body) else { return };
        let client_id = client_id.as_deref().map(str::to_owned);
        self.out.push(Exchange { client_id, api_key: api_key as i16, api_version, start_ns, end_ns, body });
    }
}

impl Responses<'_> {
    /// Takes the request a response answers, dropping those sent before it (see the module docs). A
    /// response received before a request was sent cannot answer it.
    fn answered(&mut self, correlation_id: i32, end_ns: Option<u64>) -> Option<Pending> {
        let answers = |pending: &Pending| {
            pending.correlation_id == correlation_id && end_ns.is_none_or(|end_ns| pending.start_ns <= end_ns)
        };
        let position = self.pending.iter().position(answers)?;
        self.pending.drain(..position);
        self.pending.pop_front()
    }
}

/// The exchange a response completes; `body` is None when the response was not captured whole.
fn exchange_body(awaits: Awaits, version: i16, flexible: bool, body: Option<&[u8]>) -> Option<ExchangeBody> {
    match awaits {
        Awaits::Produce(mut produce) => {
            if let Some(body) = body {
                // A malformed response keeps what it told before the fault.
                let _ = apply_produce_response(body, version, flexible, &mut produce);
            }
            Some(ExchangeBody::Produce(produce))
        }
        Awaits::Fetch => read_fetch_response(body?, version, flexible).ok().map(ExchangeBody::Fetch),
        Awaits::Metadata => {
            read_metadata_response(body?, version, flexible).ok().map(|topics| ExchangeBody::Metadata { topics })
        }
        Awaits::Group(group_id) => Some(ExchangeBody::Group { group_id }),
        Awaits::Nothing => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::protocols::{
        kafka::{
            captures::{
                capture, frames, plan, push_all, replay, syscalls, traceparent, PlannedPiece, Syscall, CAPTURES,
            },
            error_name,
            records::MAX_TRACED_RECORDS,
            FetchedBatch, FetchedRecord, ProducedPartition, ProducedTopic, TopicRef,
        },
        test_rng::XorShift,
    };

    fn tp(n: u64) -> Option<Vec<u8>> {
        Some(traceparent(n, n))
    }

    fn partition(partition: i32, traceparents: Vec<Option<Vec<u8>>>, error_code: i16) -> ProducedPartition {
        let record_count = traceparents.len() as u32;
        ProducedPartition { partition, record_count, traceparents, error_code: Some(error_code), base_offset: Some(0) }
    }

    fn produce(acks: i16, topic: &str, partitions: Vec<ProducedPartition>) -> ExchangeBody {
        let topics = vec![ProducedTopic { topic: TopicRef::Name(topic.into()), partitions }];
        ExchangeBody::Produce(Produce { acks, topics, answered: acks != 0 })
    }

    fn bodies(out: &[Exchange]) -> Vec<&ExchangeBody> {
        out.iter().map(|exchange| &exchange.body).collect()
    }

    /// (api_key, api_version) of each exchange.
    fn apis(out: &[Exchange]) -> Vec<(i16, i16)> {
        out.iter().map(|exchange| (exchange.api_key, exchange.api_version)).collect()
    }

    #[test]
    fn librdkafka_produce_v10_every_codec() {
        for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
            let (connection, out) = replay(capture(&format!("produce_v10_{codec}")));
            let topic = format!("t-{codec}");
            // librdkafka sends a request per partition; record 2 carries another header only.
            let expected = [
                produce(-1, &topic, vec![partition(0, vec![tp(1), None, tp(5)], 0)]),
                produce(-1, &topic, vec![partition(1, vec![tp(2), tp(4), tp(6)], 0)]),
            ];
            assert_eq!(bodies(&out), expected.iter().collect::<Vec<_>>(), "{codec}");
            assert!(out.iter().all(|exchange| exchange.client_id.as_deref() == Some("zt-producer")));
            assert_eq!(apis(&out), [(0, 10), (0, 10)]);
            assert_eq!((connection.desyncs(), connection.truncated_frames(), connection.pending_requests()), (0, 0, 0));
        }
        // Timed from the request syscall's entry to the exit of the syscall reading the response's end.
        let (_, out) = replay(capture("produce_v10_none"));
        assert_eq!((out[0].start_ns, out[0].end_ns), (2_212_864, 2_470_992));
    }

    #[test]
    fn produce_acks_zero_ends_with_the_request() {
        let (connection, out) = replay(capture("produce_v10_acks0"));
        let expected = [
            produce(0, "t-acks0", vec![partition(0, vec![tp(1), None, tp(5)], 0)]),
            produce(0, "t-acks0", vec![partition(1, vec![tp(2), tp(4), tp(6)], 0)]),
        ];
        let unanswered: Vec<ExchangeBody> = expected
            .into_iter()
            .map(|mut body| {
                if let ExchangeBody::Produce(produce) = &mut body {
                    let partition = &mut produce.topics[0].partitions[0];
                    (partition.error_code, partition.base_offset) = (None, None);
                }
                body
            })
            .collect();
        assert_eq!(bodies(&out), unanswered.iter().collect::<Vec<_>>());
        // The request syscall's own times. librdkafka's mock broker answers acks=0 all the same (a
        // real broker does not): those answers match nothing.
        assert_eq!((out[0].start_ns, out[0].end_ns), (2_111_232, 2_187_232));
        assert_eq!((connection.pending_requests(), connection.desyncs()), (0, 0));
    }

    #[test]
    fn older_produce_versions() {
        let kp = |n: u64| Some(traceparent(0xa0 + n, 0xb0 + n));
        let (_, out) = replay(capture("produce_v8"));
        assert_eq!(apis(&out), [(3, 8), (0, 8)]);
        let expected =
            produce(-1, "kp-default", vec![partition(0, vec![kp(1), kp(3)], 0), partition(1, vec![kp(2), kp(4)], 0)]);
        assert_eq!(out[1].body, expected);
        assert_eq!(out[1].client_id.as_deref(), Some("kp-producer"));

        let (_, out) = replay(capture("produce_v3_gzip"));
        let expected =
            produce(-1, "kp-v011", vec![partition(0, vec![kp(1), kp(3)], 0), partition(1, vec![kp(2), kp(4)], 0)]);
        assert_eq!(bodies(&out), [&expected]);
        assert_eq!(apis(&out), [(0, 3)]);

        let (_, out) = replay(capture("produce_v7_snappy"));
        let kcat = Some(traceparent(0xcafe, 0xbeef));
        assert_eq!(bodies(&out)[1], &produce(-1, "kcat-t", vec![partition(0, vec![kcat], 0)]));
        assert_eq!(apis(&out), [(3, 4), (0, 7)]);

        // Magic 1 message sets: counted, no headers.
        let (_, out) = replay(capture("produce_v2_legacy"));
        let expected =
            produce(-1, "kp-legacy", vec![partition(0, vec![None, None], 0), partition(1, vec![None, None], 0)]);
        assert_eq!(bodies(&out), [&expected]);
        // The mock broker refuses compressed magic 1 sets: the error reaches the partitions.
        let (_, out) = replay(capture("produce_v2_legacy_gzip"));
        let ExchangeBody::Produce(refused) = &out[0].body else { panic!("a produce") };
        for partition in &refused.topics[0].partitions {
            assert_eq!((partition.record_count, partition.error_code, partition.base_offset), (2, Some(35), Some(-1)));
        }
        assert_eq!(error_name(35), "UNSUPPORTED_VERSION");
    }

    #[test]
    fn produce_of_200_records_traces_the_first_64() {
        let (_, out) = replay(capture("produce_v10_zstd_200"));
        let ExchangeBody::Produce(produce) = &out[0].body else { panic!("a produce") };
        let partition = &produce.topics[0].partitions[0];
        assert_eq!(partition.record_count, 200);
        let expected: Vec<_> = (0..MAX_TRACED_RECORDS as u64).map(|i| if i % 3 == 0 { None } else { tp(i) }).collect();
        assert_eq!(partition.traceparents, expected);
    }

    /// The captured fetches return what the producers above sent: per partition, one batch of three.
    fn librdkafka_batches(partition: i32) -> Vec<FetchedBatch> {
        let traceparents = if partition == 0 { [tp(1), None, tp(5)] } else { [tp(2), tp(4), tp(6)] };
        let records = traceparents
            .into_iter()
            .enumerate()
            .map(|(offset, traceparent)| FetchedRecord { offset: offset as i64, traceparent })
            .collect();
        vec![FetchedBatch { base_offset: 0, record_count: 3, records }]
    }

    #[test]
    fn fetch_v16_names_topics_by_id_and_metadata_resolves_them() {
        let (connection, out) = replay(capture("fetch_v16"));
        assert_eq!(apis(&out), [(3, 13), (1, 16)]);
        let ExchangeBody::Metadata { topics } = &out[0].body else { panic!("metadata first") };
        let names: HashMap<[u8; 16], &str> = topics.iter().map(|(id, name)| (*id, name.as_str())).collect();
        let ExchangeBody::Fetch(fetch) = &out[1].body else { panic!("then a fetch") };
        assert_eq!(fetch.error_code, 0);
        let mut fetched: Vec<&str> = Vec::new();
        for topic in &fetch.topics {
            let TopicRef::Id(id) = topic.topic else { panic!("v16 names topics by id") };
            fetched.push(names[&id]);
            let partitions: Vec<_> = topic.partitions.iter().map(|p| (p.partition, p.error_code, &p.batches)).collect();
            assert_eq!(partitions, [(0, 0, &librdkafka_batches(0)), (1, 0, &librdkafka_batches(1))], "{}", names[&id]);
        }
        fetched.sort();
        assert_eq!(fetched, ["t-gzip", "t-lz4", "t-none", "t-snappy", "t-zstd"]);
        assert_eq!((out[1].start_ns, out[1].end_ns), (3_114_903_040, 3_115_187_888));
        // The last fetch was still waiting when the consumer closed.
        assert_eq!((connection.pending_requests(), connection.desyncs()), (1, 0));
    }

    #[test]
    fn metadata_v13_maps_ids() {
        let (_, out) = replay(capture("metadata_v13"));
        let id = [73, 54, 159, 169, 106, 80, 65, 57, 155, 215, 47, 107, 202, 5, 14, 203];
        assert_eq!(bodies(&out), [&ExchangeBody::Metadata { topics: vec![(id, "t-none".to_owned())] }]);
        // Before v10 no ids: nothing to map.
        let (_, out) = replay(capture("metadata_v4"));
        assert_eq!(bodies(&out), [&ExchangeBody::Metadata { topics: Vec::new() }]);
    }

    /// A batch as these tests compare it: base offset, record count, detailed offsets, traced records.
    type BatchSummary = (i64, u32, Vec<i64>, usize);

    fn fetched_partitions(body: &ExchangeBody) -> Vec<(String, i32, Vec<BatchSummary>)> {
        let ExchangeBody::Fetch(fetch) = body else { return Vec::new() };
        let mut summary = Vec::new();
        for topic in &fetch.topics {
            let TopicRef::Name(name) = &topic.topic else { continue };
            for partition in &topic.partitions {
                let batches = partition
                    .batches
                    .iter()
                    .map(|batch| {
                        let offsets = batch.records.iter().map(|record| record.offset).collect();
                        let traced = batch.records.iter().filter(|record| record.traceparent.is_some()).count();
                        (batch.base_offset, batch.record_count, offsets, traced)
                    })
                    .collect();
                summary.push((name.clone(), partition.partition, batches));
            }
        }
        summary
    }

    #[test]
    fn older_fetch_versions() {
        let (_, out) = replay(capture("fetch_v10"));
        assert_eq!(apis(&out), [(3, 8), (1, 10)]);
        let summary = fetched_partitions(&out[1].body);
        let kp = |partition| ("kp-default".to_owned(), partition, vec![(0, 2, vec![0, 1], 2)]);
        let rd = |partition| {
            ("t-none".to_owned(), partition, vec![(0, 3, vec![0, 1, 2], if partition == 0 { 2 } else { 3 })])
        };
        assert_eq!(summary, [kp(0), kp(1), rd(0), rd(1)]);

        let (_, out) = replay(capture("fetch_v5"));
        let gzip = |partition| {
            ("t-gzip".to_owned(), partition, vec![(0, 3, vec![0, 1, 2], if partition == 0 { 2 } else { 3 })])
        };
        let v011 = |partition| ("kp-v011".to_owned(), partition, vec![(0, 2, vec![0, 1], 2)]);
        assert_eq!(fetched_partitions(&out[0].body), [v011(0), v011(1), gzip(0), gzip(1)]);
        assert_eq!(apis(&out), [(1, 5)]);

        let (_, out) = replay(capture("fetch_v11"));
        assert_eq!(apis(&out), [(3, 4), (3, 4), (1, 11), (1, 11)]);
        let ExchangeBody::Fetch(fetch) = &out[2].body else { panic!("a fetch") };
        assert_eq!(fetch.topics[0].partitions[0].batches[0].records[0].traceparent, Some(traceparent(0xcafe, 0xbeef)));
        // A long poll that returned nothing.
        assert_eq!(fetched_partitions(&out[3].body), []);

        // Magic 1 messages, one per entry; the compressed ones were refused at produce time.
        let (_, out) = replay(capture("fetch_v3_legacy"));
        let legacy = |partition| ("kp-legacy".to_owned(), partition, vec![(0, 1, vec![0], 0), (1, 1, vec![1], 0)]);
        assert_eq!(fetched_partitions(&out[0].body), [legacy(0), legacy(1)]);
        assert!(apis(&out).iter().all(|api| *api == (1, 3)));
    }

    #[test]
    fn fetch_of_200_records_traces_the_first_64() {
        let (_, out) = replay(capture("fetch_v16_zstd_200"));
        let ExchangeBody::Fetch(fetch) = &out[0].body else { panic!("a fetch") };
        let batch = &fetch.topics[0].partitions[0].batches[0];
        assert_eq!((batch.base_offset, batch.record_count), (0, 200));
        let expected: Vec<_> = (0..MAX_TRACED_RECORDS as u64)
            .map(|i| FetchedRecord { offset: i as i64, traceparent: if i % 3 == 0 { None } else { tp(i) } })
            .collect();
        assert_eq!(batch.records, expected);
    }

    #[test]
    fn group_requests_name_the_group() {
        let group = |name: &str| ExchangeBody::Group { group_id: name.to_owned() };
        let (_, out) = replay(capture("group_v5_flexible"));
        let groups: Vec<(i16, i16)> = out
            .iter()
            .filter(|exchange| exchange.body == group("zt-group"))
            .map(|e| (e.api_key, e.api_version))
            .collect();
        // JoinGroup v5, SyncGroup v3, Heartbeat v3, OffsetFetch v6 (flexible), OffsetCommit v9
        // (flexible), LeaveGroup v1.
        assert_eq!(groups, [(11, 5), (14, 3), (12, 3), (9, 6), (8, 9), (13, 1)]);
        // JoinGroup waits for the group to settle: its span covers it.
        assert!(out[1].end_ns - out[1].start_ns > 2_000_000_000);

        let (_, out) = replay(capture("group_v3"));
        assert!(out.iter().all(|exchange| exchange.body == group("kp-group")));
        assert_eq!(apis(&out), [(11, 5), (14, 3), (9, 5), (8, 7), (13, 3)]);
    }

    #[test]
    fn every_captured_frame_is_framed_and_matched() {
        let correlation_id = |frame: &Vec<u8>, at: usize| frame.get(at..at + 4).map(|id| id.to_vec());
        for (name, bytes) in CAPTURES {
            let (connection, _) = replay(bytes);
            assert_eq!((connection.desyncs(), connection.truncated_frames()), (0, 0), "{name}");
            // Still waiting: the requests the capture has no response to (a consumer's last fetch).
            let answered: Vec<_> =
                frames(bytes, Direction::Response).iter().filter_map(|frame| correlation_id(frame, 0)).collect();
            let unanswered = frames(bytes, Direction::Request)
                .iter()
                .filter(|frame| !answered.contains(&correlation_id(frame, 4).unwrap()))
                .count();
            assert_eq!(connection.pending_requests(), unanswered, "{name}");
        }
    }

    /// Exchanges without their times, which depend on how bytes are grouped into syscalls.
    fn untimed(out: &[Exchange]) -> Vec<(Option<String>, i16, i16, ExchangeBody)> {
        out.iter().map(|e| (e.client_id.clone(), e.api_key, e.api_version, e.body.clone())).collect()
    }

    fn replay_planned(pieces: &[PlannedPiece]) -> (KafkaConnection, Vec<Exchange>) {
        let mut connection = KafkaConnection::new();
        let out = push_all(&mut connection, pieces);
        (connection, out)
    }

    #[test]
    fn pieces_split_anywhere_change_nothing() {
        for (name, bytes) in CAPTURES {
            let calls = syscalls(bytes);
            let (_, expected) = replay(bytes);
            let longest = calls.iter().map(|call| call.bytes.len()).max().unwrap_or(0);
            // Every syscall split at the same position, for every position.
            for split in 1..longest {
                let pieces = plan(&calls, |_, _| vec![split], |_, len| len, |_| false);
                let (connection, out) = replay_planned(&pieces);
                assert_eq!(out, expected, "{name} split at {split}");
                assert_eq!(connection.desyncs(), 0);
            }
            // Byte by byte.
            let pieces = plan(&calls, |_, len| (1..len).collect(), |_, len| len, |_| false);
            assert_eq!(replay_planned(&pieces).1, expected, "{name} byte by byte");
        }
    }

    #[test]
    fn several_frames_per_syscall() {
        for (name, bytes) in CAPTURES {
            // Consecutive syscalls of one direction merged into one: the frames they carry share it.
            let mut merged: Vec<Syscall> = Vec::new();
            for call in syscalls(bytes) {
                match merged.last_mut() {
                    Some(last) if last.outgoing == call.outgoing => {
                        last.bytes.extend_from_slice(&call.bytes);
                        last.end_ns = call.end_ns;
                    }
                    _ => merged.push(call),
                }
            }
            let pieces = plan(&merged, |_, _| Vec::new(), |_, len| len, |_| false);
            let (connection, out) = replay_planned(&pieces);
            assert_eq!(untimed(&out), untimed(&replay(bytes).1), "{name}");
            assert_eq!(connection.desyncs(), 0);
            for exchange in &out {
                assert!(exchange.start_ns <= exchange.end_ns, "{name}");
            }
        }
    }

    #[test]
    fn uncaptured_tails_skip_their_frames_only() {
        // The Metadata response's body (740 bytes in one syscall) captured only in part.
        let calls = syscalls(capture("fetch_v16"));
        let metadata_body = calls.iter().position(|call| call.bytes.len() == 740).unwrap();
        let pieces =
            plan(&calls, |_, _| Vec::new(), |index, len| if index == metadata_body { 100 } else { len }, |_| false);
        let (connection, out) = replay_planned(&pieces);
        assert_eq!(apis(&out), [(1, 16)], "the metadata is skipped, the fetch is not");
        assert_eq!((connection.truncated_frames(), connection.desyncs()), (1, 0));

        // Every syscall of every capture captured in half: no invented exchanges, and framing goes on.
        for (name, bytes) in CAPTURES {
            let calls = syscalls(bytes);
            let full = untimed(&replay(bytes).1);
            for cut in 0..calls.len() {
                let pieces =
                    plan(&calls, |_, _| Vec::new(), |index, len| if index == cut { len / 2 } else { len }, |_| false);
                let (connection, out) = replay_planned(&pieces);
                for exchange in untimed(&out) {
                    let same = |known: &&(Option<String>, i16, i16, ExchangeBody)| match (&known.3, &exchange.3) {
                        // A response cut short still ends the produce, without its errors.
                        (ExchangeBody::Produce(known), ExchangeBody::Produce(cut)) => {
                            known.topics.len() == cut.topics.len()
                        }
                        _ => **known == exchange,
                    };
                    assert!(full.iter().any(|known| same(&known)), "{name} cut {cut}: {exchange:?}");
                }
                // A cut shows when the direction's next piece arrives.
                let later = calls[cut + 1..].iter().any(|call| call.outgoing == calls[cut].outgoing);
                if later && calls[cut].bytes.len() >= 2 {
                    assert!(connection.truncated_frames() + connection.desyncs() >= 1, "{name} cut {cut}");
                }
            }
        }
    }

    #[test]
    fn truncated_produce_response_still_ends_the_produce() {
        let calls = syscalls(capture("produce_v10_none"));
        // Syscall 8 holds the first Produce response's body: capture 3 of its bytes.
        let pieces = plan(&calls, |_, _| Vec::new(), |index, len| if index == 8 { 3 } else { len }, |_| false);
        let (connection, out) = replay_planned(&pieces);
        let ExchangeBody::Produce(produce) = &out[0].body else { panic!("a produce") };
        assert_eq!(produce.topics[0].partitions[0].error_code, None);
        assert_eq!(produce.topics[0].partitions[0].record_count, 3);
        assert_eq!((out[0].start_ns, out[0].end_ns), (2_212_864, 2_470_992));
        assert_eq!(out[1].body, replay(capture("produce_v10_none")).1[1].body);
        assert_eq!(connection.truncated_frames(), 1);
    }

    #[test]
    fn lost_syscalls_desync_then_resync() {
        let calls = syscalls(capture("fetch_v16"));
        // Lose the ListOffsets request #5 (syscall 12) and the response size+id of #6 (syscall 34).
        let pieces = plan(&calls, |_, _| Vec::new(), |_, len| len, |index| index == 12 || index == 34);
        let (connection, out) = replay_planned(&pieces);
        assert_eq!(connection.desyncs(), 2);
        // Both directions resynchronised: the fetch is still seen, timed as before.
        assert_eq!(untimed(&out), untimed(&replay(capture("fetch_v16")).1));
        assert_eq!(out[1].end_ns, 3_115_187_888);

        // Starting mid-connection: framing is found at the first plausible syscalls.
        let pieces = plan(&calls, |_, _| Vec::new(), |_, len| len, |index| index < 7);
        let (connection, out) = replay_planned(&pieces);
        assert_eq!(apis(&out), [(1, 16)], "the metadata response's request was never seen");
        assert_eq!(connection.desyncs(), 0);
    }

    #[test]
    fn frames_spanning_syscalls_are_timed_by_their_first_and_last() {
        let request = frames(capture("produce_v10_none"), Direction::Request).remove(3);
        let response = frames(capture("produce_v10_none"), Direction::Response).remove(3);
        let stream = |frame: &[u8]| [&(frame.len() as u32).to_be_bytes()[..], frame].concat();
        let (request, response) = (stream(&request), stream(&response));
        let mut connection = KafkaConnection::new();
        let mut out = Vec::new();
        let halves = [(Direction::Request, &request, 100), (Direction::Response, &response, 300)];
        for (direction, bytes, at) in halves {
            let middle = bytes.len() / 2;
            for (offset, part, start_ns) in [(0, &bytes[..middle], at), (middle, &bytes[middle..], at + 100)] {
                let syscall_end = (offset + part.len()) as u64;
                let piece = Piece {
                    direction,
                    offset: offset as u64,
                    bytes: part,
                    syscall_end,
                    start_ns,
                    end_ns: start_ns + 10,
                };
                connection.push(&piece, &mut out);
            }
        }
        assert_eq!((out[0].start_ns, out[0].end_ns), (100, 410));
    }

    #[test]
    fn pending_requests_are_bounded_oldest_dropped() {
        let request = frames(capture("produce_v10_none"), Direction::Request).remove(2);
        let mut connection = KafkaConnection::new();
        let mut out = Vec::new();
        let mut offset = 0u64;
        for correlation_id in 0..(MAX_PENDING as i32 + 10) {
            let mut frame = request.clone();
            frame[4..8].copy_from_slice(&correlation_id.to_be_bytes());
            let bytes = [&(frame.len() as u32).to_be_bytes()[..], &frame].concat();
            let end = offset + bytes.len() as u64;
            let piece = Piece {
                direction: Direction::Request,
                offset,
                bytes: &bytes,
                syscall_end: end,
                start_ns: 1,
                end_ns: 2,
            };
            connection.push(&piece, &mut out);
            offset = end;
        }
        assert_eq!(connection.pending_requests(), MAX_PENDING);
        let answer = |correlation_id: i32, offset: u64, connection: &mut KafkaConnection, out: &mut Vec<Exchange>| {
            let body = [&correlation_id.to_be_bytes()[..], &[0, 0, 0, 0, 0, 0]].concat();
            let bytes = [&(body.len() as u32).to_be_bytes()[..], &body].concat();
            let end = offset + bytes.len() as u64;
            let piece = Piece {
                direction: Direction::Response,
                offset,
                bytes: &bytes,
                syscall_end: end,
                start_ns: 3,
                end_ns: 4,
            };
            connection.push(&piece, out);
            end
        };
        let offset = answer(0, 0, &mut connection, &mut out);
        assert!(out.is_empty(), "dropped to make room");
        answer(MAX_PENDING as i32 + 5, offset, &mut connection, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(connection.pending_requests(), 4, "answered in order: those before it are gone");
    }

    /// A random mutation of a captured syscall stream.
    fn mutate(rng: &mut XorShift, calls: &mut Vec<Syscall>) {
        for _ in 0..1 + rng.below(4) {
            let index = rng.below(calls.len());
            if rng.chance(15) {
                // A syscall seen twice.
                let Some(copy) = calls.get(index).cloned() else { return };
                calls.insert(rng.below(calls.len() + 1), copy);
                continue;
            }
            let Some(call) = calls.get_mut(index) else { return };
            match rng.below(5) {
                0 if !call.bytes.is_empty() => {
                    let at = rng.below(call.bytes.len());
                    call.bytes[at] = rng.next() as u8;
                }
                1 => {
                    let kept = rng.below(call.bytes.len() + 1);
                    call.bytes.truncate(kept);
                }
                2 if call.bytes.len() >= 4 => {
                    // A hostile length or count somewhere.
                    let at = rng.below(call.bytes.len() - 3);
                    let value = [0x7fff_ffffu32, 0xffff_ffff, 0x8000_0000, 0x00ff_ffff][rng.below(4)];
                    call.bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
                }
                3 => {
                    let extra: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                    call.bytes.extend(extra);
                }
                _ => call.outgoing = !call.outgoing,
            }
        }
    }

    #[test]
    fn fuzz_mutated_captures_never_panic() {
        let mut rng = XorShift(0x5EED_CAFE_F00D_1234);
        for round in 0..3_000 {
            let (name, bytes) = CAPTURES[rng.below(CAPTURES.len())];
            let mut calls = syscalls(bytes);
            mutate(&mut rng, &mut calls);
            for (index, call) in calls.iter_mut().enumerate() {
                (call.start_ns, call.end_ns) = (index as u64 * 10, index as u64 * 10 + 5);
            }
            let cut_chance = rng.below(30) as u64;
            // Per syscall: a split position, a captured share (per mille), lost or not.
            let fates: Vec<(Option<usize>, usize, bool)> = calls
                .iter()
                .map(|_| {
                    let split = rng.chance(20).then(|| rng.below(4096));
                    let share = if rng.chance(cut_chance) { rng.below(1001) } else { 1000 };
                    (split, share, rng.chance(3))
                })
                .collect();
            let pieces = plan(
                &calls,
                |index, len| fates[index].0.map(|split| vec![split % (len + 1)]).unwrap_or_default(),
                |index, len| len * fates[index].1 / 1000,
                |index| fates[index].2,
            );
            let (connection, out) = replay_planned(&pieces);
            assert!(connection.pending_requests() <= MAX_PENDING);
            for exchange in &out {
                assert!(exchange.start_ns <= exchange.end_ns, "round {round} {name}");
                if let ExchangeBody::Fetch(fetch) = &exchange.body {
                    let records = fetch.topics.iter().flat_map(|t| &t.partitions).flat_map(|p| &p.batches);
                    assert!(records.into_iter().all(|batch| batch.records.len() <= MAX_TRACED_RECORDS));
                }
            }
        }
    }

    #[test]
    fn fuzz_random_bytes_never_panic() {
        let mut rng = XorShift(0x0BAD_F00D_DEAD_BEEF);
        let mut connection = KafkaConnection::new();
        let mut offsets = [0u64; 2];
        let mut out = Vec::new();
        for round in 0..20_000u64 {
            let direction = if rng.chance(50) { Direction::Request } else { Direction::Response };
            let mut bytes: Vec<u8> = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
            if rng.chance(30) {
                // Something that frames: a small size, then a known-looking header.
                let mut frame =
                    vec![0, 0, 0, 0, 0, rng.below(20) as u8, 0, rng.below(14) as u8, 0, 0, 0, rng.below(3) as u8];
                frame.extend(bytes);
                let size = (frame.len() - 4) as u32;
                frame[..4].copy_from_slice(&size.to_be_bytes());
                bytes = frame;
            }
            let offset = &mut offsets[direction as usize];
            if rng.chance(5) {
                *offset += rng.below(100) as u64;
            }
            let syscall_end = *offset + bytes.len() as u64 + if rng.chance(10) { rng.below(50) as u64 } else { 0 };
            let piece =
                Piece { direction, offset: *offset, bytes: &bytes, syscall_end, start_ns: round, end_ns: round };
            out.clear();
            connection.push(&piece, &mut out);
            *offset = syscall_end;
            assert!(connection.pending_requests() <= MAX_PENDING);
        }
    }
}
