//! Headers and the few message bodies that carry tracing data: Produce, Fetch and Metadata, and the
//! group id of group-membership requests. Layouts follow Kafka's message definitions
//! (<https://github.com/apache/kafka/tree/trunk/clients/src/main/resources/common/message>).
//!
//! kafka-protocol knows every API key and its header versions, and is used for those. Its body
//! decoders are not: they allocate `Vec::with_capacity(count)` from counts read off the wire, and an
//! allocation failure aborts the process (no unwinding to catch), so hostile bytes could kill the
//! agent. They also build every field this module skips. These readers check each count against the
//! bytes left, borrow instead of copying, and stop at the fields tracing needs. The crate's encoders
//! and decoders cross-check them in the tests.

use kafka_protocol::messages::ApiKey;

use super::{
    records::{Allowance, Batches, MAX_TRACED_RECORDS},
    wire::{Reader, WireResult},
    Fetch, FetchedPartition, FetchedTopic, Produce, ProducedPartition, ProducedTopic, TopicRef,
};

/// The newest versions whose body layouts these readers know; newer ones are framed and matched only.
pub const PRODUCE_MAX_VERSION: i16 = 13;
pub const FETCH_MAX_VERSION: i16 = 18;
pub const METADATA_MAX_VERSION: i16 = 13;
/// Produce and Fetch name topics by id from this version on.
const TOPIC_ID_VERSION: i16 = 13;
/// OffsetFetch asks for several groups from this version on.
const OFFSET_FETCH_GROUPS_VERSION: i16 = 8;
/// api_key, api_version, correlation_id.
pub const REQUEST_HEADER_MIN_BYTES: usize = 8;

/// The header of a request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader<'a> {
    pub api_key: ApiKey,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: Option<&'a [u8]>,
    /// The body is in a flexible version (compact fields, tagged fields): request header v2.
    pub flexible: bool,
}

/// Reads a request header; returns it and the body after it. None for an unknown API key or a
/// header cut short.
pub fn read_request_header(frame: &[u8]) -> Option<(RequestHeader<'_>, &[u8])> {
    let mut reader = Reader::new(frame);
    let api_key = ApiKey::try_from(reader.i16().ok()?).ok()?;
    let api_version = reader.i16().ok()?;
    let correlation_id = reader.i32().ok()?;
    let header_version = api_key.request_header_version(api_version);
    // client_id is a classic nullable STRING even in header v2.
    let client_id = if header_version >= 1 { reader.string(false).ok()? } else { None };
    let flexible = header_version >= 2;
    reader.skip_tagged_fields(flexible).ok()?;
    Some((RequestHeader { api_key, api_version, correlation_id, client_id, flexible }, reader.rest()))
}

/// Whether the first bytes of a request frame of `size` bytes (after the size field) look like a real
/// request: used to resynchronise after lost bytes. None when more bytes are needed to tell.
pub fn plausible_request_start(size: u32, head: &[u8]) -> Option<bool> {
    if (size as usize) < REQUEST_HEADER_MIN_BYTES {
        return Some(false);
    }
    let mut reader = Reader::new(head);
    let (Ok(key), Ok(version), Ok(correlation_id)) = (reader.i16(), reader.i16(), reader.i32()) else {
        return None;
    };
    let Ok(api_key) = ApiKey::try_from(key) else { return Some(false) };
    if !(0..=api_key.valid_versions().max).contains(&version) || correlation_id < 0 {
        return Some(false);
    }
    if api_key.request_header_version(version) == 0 {
        return Some(true);
    }
    // A client id: null, or a length that fits the frame.
    let room = i64::from(size) - (REQUEST_HEADER_MIN_BYTES as i64 + 2);
    let length = i64::from(reader.i16().ok()?);
    Some(length == -1 || (0..=room).contains(&length))
}

/// Whether response bodies of this API use header v1 (tagged fields after the correlation id).
pub fn response_is_flexible(api_key: ApiKey, api_version: i16) -> bool {
    api_key.response_header_version(api_version) >= 1
}

/// A response frame's correlation id.
pub fn response_correlation_id(frame: &[u8]) -> Option<i32> {
    Reader::new(frame).i32().ok()
}

/// The body of a response frame, after its header.
pub fn response_body(frame: &[u8], flexible: bool) -> WireResult<&[u8]> {
    let mut reader = Reader::new(frame);
    let _correlation_id = reader.i32()?;
    reader.skip_tagged_fields(flexible)?;
    Ok(reader.rest())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A topic as Produce and Fetch name it: by name, or by id from v13.
fn read_topic(reader: &mut Reader<'_>, version: i16, flexible: bool) -> WireResult<TopicRef> {
    if version >= TOPIC_ID_VERSION {
        return reader.uuid().map(TopicRef::Id);
    }
    Ok(TopicRef::Name(text(reader.string(flexible)?.unwrap_or_default())))
}

/// Produce request up to acks: the transactional id (v3+) precedes it.
fn read_acks(reader: &mut Reader<'_>, version: i16, flexible: bool) -> WireResult<i16> {
    if version >= 3 {
        let _transactional_id = reader.string(flexible)?;
    }
    reader.i16()
}

/// The acks of a Produce request whose body may be cut short.
pub fn read_produce_acks(body: &[u8], version: i16, flexible: bool) -> WireResult<i16> {
    read_acks(&mut Reader::new(body), version, flexible)
}

/// Caps on what one message makes these readers report. A hostile frame of tiny compressed batches
/// could otherwise turn 16 MiB into gigabytes of records and minutes of inflating; real messages
/// stay far below.
#[derive(Debug)]
struct Budget {
    /// Partitions that may still be reported.
    partitions: usize,
    records: Allowance,
}

/// Partitions one Produce or Fetch reports at most; the rest of the message is not read.
pub const MAX_REPORTED_PARTITIONS: usize = 4096;

impl Default for Budget {
    fn default() -> Self {
        Self { partitions: MAX_REPORTED_PARTITIONS, records: Allowance::default() }
    }
}

impl Budget {
    /// Takes one partition from the budget; false when none is left.
    fn take_partition(&mut self) -> bool {
        let left = self.partitions > 0;
        self.partitions = self.partitions.saturating_sub(1);
        left
    }
}

/// A Produce request: per partition, the records it carries and their traceparents.
pub fn read_produce_request(body: &[u8], version: i16, flexible: bool) -> WireResult<Produce> {
    let mut reader = Reader::new(body);
    let acks = read_acks(&mut reader, version, flexible)?;
    let _timeout_ms = reader.i32()?;
    let mut produce = Produce { acks, topics: Vec::new(), answered: acks != 0 };
    let mut budget = Budget::default();
    let topic_count = reader.array_len(flexible)?;
    for _ in 0..topic_count {
        let topic = read_topic(&mut reader, version, flexible)?;
        let partition_count = reader.array_len(flexible)?;
        let mut partitions = Vec::new();
        for _ in 0..partition_count {
            if !budget.take_partition() {
                produce.topics.push(ProducedTopic { topic, partitions });
                return Ok(produce);
            }
            partitions.push(read_produced_partition(&mut reader, flexible, &mut budget)?);
        }
        reader.skip_tagged_fields(flexible)?;
        produce.topics.push(ProducedTopic { topic, partitions });
    }
    reader.skip_tagged_fields(flexible)?;
    Ok(produce)
}

fn read_produced_partition(
    reader: &mut Reader<'_>,
    flexible: bool,
    budget: &mut Budget,
) -> WireResult<ProducedPartition> {
    let partition = reader.i32()?;
    let records = reader.bytes(flexible)?.unwrap_or_default();
    reader.skip_tagged_fields(flexible)?;
    let mut produced =
        ProducedPartition { partition, record_count: 0, traceparents: Vec::new(), error_code: None, base_offset: None };
    let mut batches = Batches::new(records);
    while let Some(batch) = batches.next_batch(MAX_TRACED_RECORDS - produced.traceparents.len(), &mut budget.records) {
        produced.record_count = produced.record_count.saturating_add(batch.record_count);
        produced.traceparents.extend(batch.records.into_iter().map(|record| record.traceparent));
    }
    Ok(produced)
}

/// Adds a Produce response's error codes and base offsets to the partitions of its request.
pub fn apply_produce_response(body: &[u8], version: i16, flexible: bool, produce: &mut Produce) -> WireResult<()> {
    let mut reader = Reader::new(body);
    let topic_count = reader.array_len(flexible)?;
    for topic_index in 0..topic_count {
        let topic = read_topic(&mut reader, version, flexible)?;
        let partition_count = reader.array_len(flexible)?;
        for partition_index in 0..partition_count {
            let (partition, error_code, base_offset) = read_produce_partition_response(&mut reader, version, flexible)?;
            if let Some(produced) = find_partition(produce, &topic, partition, (topic_index, partition_index)) {
                produced.error_code = Some(error_code);
                produced.base_offset = Some(base_offset);
            }
        }
        reader.skip_tagged_fields(flexible)?;
    }
    Ok(())
}

fn read_produce_partition_response(
    reader: &mut Reader<'_>,
    version: i16,
    flexible: bool,
) -> WireResult<(i32, i16, i64)> {
    let partition = reader.i32()?;
    let error_code = reader.i16()?;
    let base_offset = reader.i64()?;
    if version >= 2 {
        let _log_append_time_ms = reader.i64()?;
    }
    if version >= 5 {
        let _log_start_offset = reader.i64()?;
    }
    if version >= 8 {
        let record_error_count = reader.array_len(flexible)?;
        for _ in 0..record_error_count {
            let _batch_index = reader.i32()?;
            let _message = reader.string(flexible)?;
            reader.skip_tagged_fields(flexible)?;
        }
        let _error_message = reader.string(flexible)?;
    }
    reader.skip_tagged_fields(flexible)?;
    Ok((partition, error_code, base_offset))
}

/// The request's partition a response entry answers. Responses list them in request order, so the
/// entry at the same position is tried first.
fn find_partition<'p>(
    produce: &'p mut Produce,
    topic: &TopicRef,
    partition: i32,
    (topic_index, partition_index): (usize, usize),
) -> Option<&'p mut ProducedPartition> {
    let topic_position = match produce.topics.get(topic_index) {
        Some(candidate) if candidate.topic == *topic => topic_index,
        _ => produce.topics.iter().position(|candidate| candidate.topic == *topic)?,
    };
    let partitions = &mut produce.topics[topic_position].partitions;
    let position = match partitions.get(partition_index) {
        Some(candidate) if candidate.partition == partition => partition_index,
        _ => partitions.iter().position(|candidate| candidate.partition == partition)?,
    };
    partitions.get_mut(position)
}

/// A Fetch response: the partitions that returned records or an error.
pub fn read_fetch_response(body: &[u8], version: i16, flexible: bool) -> WireResult<Fetch> {
    let mut reader = Reader::new(body);
    if version >= 1 {
        let _throttle_time_ms = reader.i32()?;
    }
    let mut fetch = Fetch { error_code: 0, topics: Vec::new() };
    if version >= 7 {
        fetch.error_code = reader.i16()?;
        let _session_id = reader.i32()?;
    }
    let mut budget = Budget::default();
    let topic_count = reader.array_len(flexible)?;
    for _ in 0..topic_count {
        let topic = read_topic(&mut reader, version, flexible)?;
        let partition_count = reader.array_len(flexible)?;
        let mut partitions = Vec::new();
        for _ in 0..partition_count {
            let partition = read_fetched_partition(&mut reader, version, flexible, &mut budget)?;
            if partition.error_code == 0 && partition.batches.is_empty() {
                continue;
            }
            if !budget.take_partition() {
                fetch.topics.push(FetchedTopic { topic, partitions });
                return Ok(fetch);
            }
            partitions.push(partition);
        }
        reader.skip_tagged_fields(flexible)?;
        if !partitions.is_empty() {
            fetch.topics.push(FetchedTopic { topic, partitions });
        }
    }
    // v16+ may tag broker endpoints here.
    reader.skip_tagged_fields(flexible)?;
    Ok(fetch)
}

fn read_fetched_partition(
    reader: &mut Reader<'_>,
    version: i16,
    flexible: bool,
    budget: &mut Budget,
) -> WireResult<FetchedPartition> {
    let partition = reader.i32()?;
    let error_code = reader.i16()?;
    let _high_watermark = reader.i64()?;
    if version >= 4 {
        let _last_stable_offset = reader.i64()?;
    }
    if version >= 5 {
        let _log_start_offset = reader.i64()?;
    }
    if version >= 4 {
        let aborted_count = reader.array_len(flexible)?;
        for _ in 0..aborted_count {
            let _producer_id = reader.i64()?;
            let _first_offset = reader.i64()?;
            reader.skip_tagged_fields(flexible)?;
        }
    }
    if version >= 11 {
        let _preferred_read_replica = reader.i32()?;
    }
    let records = reader.bytes(flexible)?.unwrap_or_default();
    reader.skip_tagged_fields(flexible)?;
    let mut batches = Batches::new(records);
    let batches = std::iter::from_fn(|| batches.next_batch(MAX_TRACED_RECORDS, &mut budget.records)).collect();
    Ok(FetchedPartition { partition, error_code, batches })
}

/// A Metadata response's topic ids and names (v10+ carry ids), for Fetch and Produce v13+.
pub fn read_metadata_response(body: &[u8], version: i16, flexible: bool) -> WireResult<Vec<([u8; 16], String)>> {
    let mut reader = Reader::new(body);
    if version >= 3 {
        let _throttle_time_ms = reader.i32()?;
    }
    skip_brokers(&mut reader, version, flexible)?;
    if version >= 2 {
        let _cluster_id = reader.string(flexible)?;
    }
    if version >= 1 {
        let _controller_id = reader.i32()?;
    }
    let topic_count = reader.array_len(flexible)?;
    let mut topics = Vec::new();
    for _ in 0..topic_count {
        let _error_code = reader.i16()?;
        let name = reader.string(flexible)?;
        let topic_id = if version >= 10 { reader.uuid()? } else { [0; 16] };
        if version >= 1 {
            let _is_internal = reader.i8()?;
        }
        skip_metadata_partitions(&mut reader, version, flexible)?;
        if version >= 8 {
            let _topic_authorized_operations = reader.i32()?;
        }
        reader.skip_tagged_fields(flexible)?;
        if let Some(name) = name.filter(|_| topic_id != [0; 16]) {
            topics.push((topic_id, text(name)));
        }
    }
    Ok(topics)
}

fn skip_brokers(reader: &mut Reader<'_>, version: i16, flexible: bool) -> WireResult<()> {
    let broker_count = reader.array_len(flexible)?;
    for _ in 0..broker_count {
        let _node_id = reader.i32()?;
        let _host = reader.string(flexible)?;
        let _port = reader.i32()?;
        if version >= 1 {
            let _rack = reader.string(flexible)?;
        }
        reader.skip_tagged_fields(flexible)?;
    }
    Ok(())
}

fn skip_metadata_partitions(reader: &mut Reader<'_>, version: i16, flexible: bool) -> WireResult<()> {
    let partition_count = reader.array_len(flexible)?;
    for _ in 0..partition_count {
        // error_code, partition_index, leader_id.
        reader.skip(2 + 4 + 4)?;
        if version >= 7 {
            let _leader_epoch = reader.i32()?;
        }
        // replica_nodes, isr_nodes, offline_replicas (v5+): INT32 arrays.
        reader.skip_fixed_array(flexible, 4)?;
        reader.skip_fixed_array(flexible, 4)?;
        if version >= 5 {
            reader.skip_fixed_array(flexible, 4)?;
        }
        reader.skip_tagged_fields(flexible)?;
    }
    Ok(())
}

/// Whether requests of this API name the consumer group first.
pub fn names_a_group(api_key: ApiKey) -> bool {
    matches!(
        api_key,
        ApiKey::JoinGroup
            | ApiKey::SyncGroup
            | ApiKey::Heartbeat
            | ApiKey::OffsetCommit
            | ApiKey::OffsetFetch
            | ApiKey::LeaveGroup
    )
}

/// The group id a group request starts with (OffsetFetch v8+: when it asks for exactly one group).
/// None when empty or unreadable; works on a body cut short.
pub fn read_group_id(api_key: ApiKey, body: &[u8], version: i16, flexible: bool) -> Option<String> {
    let mut reader = Reader::new(body);
    if api_key == ApiKey::OffsetFetch && version >= OFFSET_FETCH_GROUPS_VERSION {
        // A cut body can still show the count: readers here must not need the whole array.
        let count =
            if flexible { i64::from(reader.unsigned_varint().ok()?) - 1 } else { i64::from(reader.i32().ok()?) };
        if count != 1 {
            return None;
        }
    }
    reader.string(flexible).ok().flatten().filter(|id| !id.is_empty()).map(text)
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::{
        messages::{
            fetch_response::{FetchableTopicResponse, PartitionData},
            metadata_response::MetadataResponseTopic,
            produce_request::{PartitionProduceData, TopicProduceData},
            produce_response::{PartitionProduceResponse, TopicProduceResponse},
            FetchResponse, MetadataResponse, OffsetFetchRequest, ProduceRequest, ProduceResponse, TopicName,
        },
        protocol::{Decodable, Encodable, StrBytes},
    };

    use super::*;
    use crate::protocols::kafka::{
        records::{
            tests::{compress, encode_batch, traced_records},
            MAX_TRACED_PER_MESSAGE,
        },
        FetchedBatch,
    };

    fn encode<M: Encodable>(message: &M, version: i16) -> Vec<u8> {
        let mut buf = BytesMut::new();
        message.encode(&mut buf, version).expect("encodes");
        buf.to_vec()
    }

    fn name(text: &str) -> TopicName {
        TopicName(StrBytes::from_string(text.to_owned()))
    }

    fn produce_request(version: i16, records: &[u8]) -> ProduceRequest {
        let mut topic = TopicProduceData::default();
        if version >= TOPIC_ID_VERSION {
            topic.topic_id = with_id(7).topic_id;
        } else {
            topic.name = name("orders");
        }
        topic.partition_data = vec![
            PartitionProduceData::default().with_index(3).with_records(Some(Bytes::copy_from_slice(records))),
            PartitionProduceData::default().with_index(5).with_records(None),
        ];
        ProduceRequest::default().with_acks(-1).with_timeout_ms(30_000).with_topic_data(vec![topic])
    }

    /// A topic with id sixteen `byte`s, decoded by the crate: its uuid type is not re-exported.
    fn with_id(byte: u8) -> FetchableTopicResponse {
        let mut bytes = Bytes::from([&[byte; 16][..], &[1, 0]].concat());
        FetchableTopicResponse::decode(&mut bytes, TOPIC_ID_VERSION).expect("an id and no partitions")
    }

    fn flexible_request(api_key: ApiKey, version: i16) -> bool {
        api_key.request_header_version(version) >= 2
    }

    #[test]
    fn produce_request_every_version() {
        let records = encode_batch(0, 4, 70, &compress(4, &traced_records(70)));
        for version in 3..=PRODUCE_MAX_VERSION {
            let body = encode(&produce_request(version, &records), version);
            let produce = read_produce_request(&body, version, flexible_request(ApiKey::Produce, version)).unwrap();
            let expected_topic = if version >= 13 { TopicRef::Id([7; 16]) } else { TopicRef::Name("orders".into()) };
            assert_eq!(produce.acks, -1);
            assert!(produce.answered);
            assert_eq!(produce.topics.len(), 1);
            assert_eq!(produce.topics[0].topic, expected_topic, "v{version}");
            let partitions = &produce.topics[0].partitions;
            assert_eq!(partitions.len(), 2);
            assert_eq!((partitions[0].partition, partitions[0].record_count), (3, 70));
            assert_eq!(partitions[0].traceparents.len(), MAX_TRACED_RECORDS);
            assert_eq!(partitions[0].traceparents[1], None);
            assert_eq!(
                partitions[0].traceparents[2].as_deref(),
                Some(&format!("00-{:032x}-{:016x}-01", 2, 2).into_bytes()[..])
            );
            assert_eq!((partitions[1].partition, partitions[1].record_count), (5, 0));
        }
    }

    #[test]
    fn produce_response_every_version() {
        for version in 3..=PRODUCE_MAX_VERSION {
            let request = encode(&produce_request(version, &[]), version);
            let flexible = flexible_request(ApiKey::Produce, version);
            let mut produce = read_produce_request(&request, version, flexible).unwrap();
            let mut topic = TopicProduceResponse::default();
            if version >= TOPIC_ID_VERSION {
                topic.topic_id = with_id(7).topic_id;
            } else {
                topic.name = name("orders");
            }
            topic.partition_responses = vec![
                PartitionProduceResponse::default().with_index(5).with_error_code(6).with_base_offset(-1),
                PartitionProduceResponse::default().with_index(3).with_base_offset(42),
                PartitionProduceResponse::default().with_index(9).with_base_offset(1),
            ];
            let response = ProduceResponse::default().with_responses(vec![topic]);
            let body = encode(&response, version);
            apply_produce_response(&body, version, response_is_flexible(ApiKey::Produce, version), &mut produce)
                .unwrap();
            let partitions = &produce.topics[0].partitions;
            assert_eq!((partitions[0].error_code, partitions[0].base_offset), (Some(0), Some(42)), "v{version}");
            assert_eq!((partitions[1].error_code, partitions[1].base_offset), (Some(6), Some(-1)));
        }
    }

    fn fetch_response(version: i16, records: &[u8]) -> FetchResponse {
        let mut topic = FetchableTopicResponse::default();
        if version >= TOPIC_ID_VERSION {
            topic.topic_id = with_id(9).topic_id;
        } else {
            topic.topic = name("events");
        }
        topic.partitions = vec![
            PartitionData::default().with_partition_index(0).with_records(Some(Bytes::copy_from_slice(records))),
            PartitionData::default().with_partition_index(1).with_records(Some(Bytes::new())),
            PartitionData::default().with_partition_index(2).with_error_code(1).with_records(None),
        ];
        FetchResponse::default().with_responses(vec![topic])
    }

    #[test]
    fn fetch_response_every_version() {
        let mut records = encode_batch(100, 0, 3, &traced_records(3));
        records.extend(encode_batch(103, 1, 2, &compress(1, &traced_records(2))));
        let cut = records.len() - 10;
        for version in 4..=FETCH_MAX_VERSION {
            // The broker may cut the last batch: it is ignored.
            let body = encode(&fetch_response(version, &records[..cut]), version);
            let fetch = read_fetch_response(&body, version, response_is_flexible(ApiKey::Fetch, version)).unwrap();
            let expected_topic = if version >= 13 { TopicRef::Id([9; 16]) } else { TopicRef::Name("events".into()) };
            assert_eq!(fetch.topics.len(), 1, "v{version}");
            assert_eq!(fetch.topics[0].topic, expected_topic);
            let partitions = &fetch.topics[0].partitions;
            assert_eq!(partitions.len(), 2, "the empty partition is left out");
            assert_eq!((partitions[0].partition, partitions[0].error_code), (0, 0));
            assert_eq!(partitions[0].batches.len(), 1);
            assert_eq!(partitions[0].batches[0].record_count, 3);
            assert_eq!(partitions[0].batches[0].records[2].offset, 102);
            assert_eq!((partitions[1].partition, partitions[1].error_code), (2, 1));
        }
    }

    #[test]
    fn metadata_response_every_version() {
        for version in 0..=METADATA_MAX_VERSION {
            let topics = vec![
                MetadataResponseTopic::default().with_name(Some(name("a"))).with_topic_id(with_id(1).topic_id),
                MetadataResponseTopic::default().with_name(None).with_topic_id(with_id(2).topic_id),
                MetadataResponseTopic::default().with_name(Some(name("no-id"))),
            ];
            let response = MetadataResponse::default().with_topics(topics);
            let body = encode(&response, version);
            let read = read_metadata_response(&body, version, response_is_flexible(ApiKey::Metadata, version));
            let expected = if version >= 10 { vec![([1; 16], "a".to_owned())] } else { Vec::new() };
            assert_eq!(read, Ok(expected), "v{version}");
        }
    }

    #[test]
    fn offset_fetch_group_forms() {
        use kafka_protocol::messages::{offset_fetch_request::OffsetFetchRequestGroup, GroupId};
        let group = |text: &str| GroupId(StrBytes::from_string(text.to_owned()));
        // The crate encodes up to v9 (v10 names topics by id; the group comes first all the same).
        for version in 1..=9 {
            let flexible = flexible_request(ApiKey::OffsetFetch, version);
            let request = if version >= OFFSET_FETCH_GROUPS_VERSION {
                let entry = OffsetFetchRequestGroup::default().with_group_id(group("g1"));
                OffsetFetchRequest::default().with_groups(vec![entry])
            } else {
                OffsetFetchRequest::default().with_group_id(group("g1"))
            };
            let body = encode(&request, version);
            assert_eq!(
                read_group_id(ApiKey::OffsetFetch, &body, version, flexible).as_deref(),
                Some("g1"),
                "v{version}"
            );
        }
        let two = OffsetFetchRequest::default().with_groups(vec![
            OffsetFetchRequestGroup::default().with_group_id(group("a")),
            OffsetFetchRequestGroup::default().with_group_id(group("b")),
        ]);
        assert_eq!(read_group_id(ApiKey::OffsetFetch, &encode(&two, 8), 8, true), None);
    }

    #[test]
    fn headers() {
        // Produce v9: header v2 (tagged fields), client id still a classic string.
        let frame = [&[0, 0, 0, 9, 0, 0, 0, 7, 0, 2][..], b"id", &[0], b"body"].concat();
        let (header, body) = read_request_header(&frame).unwrap();
        assert_eq!(
            header,
            RequestHeader {
                api_key: ApiKey::Produce,
                api_version: 9,
                correlation_id: 7,
                client_id: Some(b"id"),
                flexible: true
            }
        );
        assert_eq!(body, b"body");
        assert_eq!(read_request_header(&[0x7f, 0x7f, 0, 0, 0, 0, 0, 1]), None);
        assert_eq!(plausible_request_start(100, &[0, 0, 0, 9, 0, 0, 0, 7, 0xff, 0xff]), Some(true));
        assert_eq!(plausible_request_start(100, &[0, 0, 0, 9, 0, 0, 0, 7, 0, 90]), Some(true));
        assert_eq!(
            plausible_request_start(100, &[0, 0, 0, 9, 0, 0, 0, 7, 0, 91]),
            Some(false),
            "longer than the frame"
        );
        assert_eq!(plausible_request_start(100, &[0, 0, 0, 9, 0, 0, 0, 7]), None);
        assert_eq!(plausible_request_start(7, &[0, 0, 0, 9, 0, 0, 0]), Some(false), "too short for a header");
        assert_eq!(plausible_request_start(100, &[0, 0, 0, 99, 0, 0, 0, 7, 0, 0]), Some(false));
        assert_eq!(plausible_request_start(100, &[0, 0, 0, 9, 0x80, 0, 0, 7, 0, 0]), Some(false));
        assert_eq!(plausible_request_start(100, &[0x7f, 0x7f, 0, 9, 0, 0, 0, 7, 0, 0]), Some(false));
        // ApiVersions responses keep header v0 even in flexible versions.
        assert!(!response_is_flexible(ApiKey::ApiVersions, 3));
        assert!(response_is_flexible(ApiKey::Fetch, 12));
    }

    #[test]
    fn known_layouts_match_the_crate() {
        // A newer crate may know versions whose layout these readers do not: update them together.
        assert_eq!(ApiKey::Produce.valid_versions().max, PRODUCE_MAX_VERSION);
        assert_eq!(ApiKey::Fetch.valid_versions().max, FETCH_MAX_VERSION);
        assert_eq!(ApiKey::Metadata.valid_versions().max, METADATA_MAX_VERSION);
    }

    #[test]
    fn cut_bodies_fail_cleanly() {
        let records = encode_batch(0, 0, 2, &traced_records(2));
        for version in [3, 9, 13] {
            let body = encode(&produce_request(version, &records), version);
            let flexible = flexible_request(ApiKey::Produce, version);
            for cut in 0..body.len() {
                assert!(read_produce_request(&body[..cut], version, flexible).is_err(), "v{version} cut {cut}");
            }
        }
        for version in [4, 12, 16] {
            let body = encode(&fetch_response(version, &records), version);
            let flexible = response_is_flexible(ApiKey::Fetch, version);
            for cut in 0..body.len() {
                assert!(read_fetch_response(&body[..cut], version, flexible).is_err(), "v{version} cut {cut}");
            }
        }
    }

    /// The crate's decoders on the captured frames (valid input: they are safe there) agree with these
    /// readers.
    #[test]
    fn crate_decoders_agree_on_captured_frames() {
        use std::collections::HashMap;

        use kafka_protocol::messages::RequestHeader as CrateHeader;

        use crate::protocols::kafka::{
            captures::{frames, CAPTURES},
            Direction,
        };

        let mut checked = HashMap::<(i16, bool), usize>::new();
        for (name, capture) in CAPTURES {
            let mut requests = HashMap::new();
            let request_frames = frames(capture, Direction::Request);
            for frame in &request_frames {
                let (header, body) = read_request_header(frame).expect("a known request");
                let mut bytes = Bytes::copy_from_slice(frame);
                let theirs = CrateHeader::decode(&mut bytes, header.api_key.request_header_version(header.api_version))
                    .expect("the crate reads the header");
                assert_eq!(theirs.correlation_id, header.correlation_id, "{name}");
                assert_eq!(theirs.client_id.as_ref().map(|id| id.as_bytes()), header.client_id, "{name}");
                assert_eq!(bytes.as_ref(), body, "{name}: same header length");
                if header.api_key == ApiKey::Produce && header.api_version >= 3 {
                    let theirs = ProduceRequest::decode(&mut bytes, header.api_version).unwrap();
                    let ours = read_produce_request(body, header.api_version, header.flexible).unwrap();
                    let their_topics: Vec<(String, Vec<i32>)> = theirs
                        .topic_data
                        .iter()
                        .map(|topic| (topic.name.to_string(), topic.partition_data.iter().map(|p| p.index).collect()))
                        .collect();
                    let our_topics: Vec<(String, Vec<i32>)> = ours
                        .topics
                        .iter()
                        .map(|topic| {
                            let TopicRef::Name(name) = &topic.topic else { panic!("named before v13") };
                            (name.clone(), topic.partitions.iter().map(|p| p.partition).collect())
                        })
                        .collect();
                    assert_eq!((theirs.acks, their_topics), (ours.acks, our_topics), "{name}");
                    *checked.entry((0, false)).or_default() += 1;
                }
                requests.insert(header.correlation_id, (header, ours_produce(&header, body)));
            }
            for frame in frames(capture, Direction::Response) {
                let Some((header, produce)) = response_correlation_id(&frame).and_then(|id| requests.get(&id)) else {
                    continue;
                };
                let (key, version) = (header.api_key, header.api_version);
                let body = response_body(&frame, response_is_flexible(key, version)).unwrap();
                let mut bytes = Bytes::copy_from_slice(body);
                match key {
                    ApiKey::Fetch if version >= 4 => {
                        let theirs = FetchResponse::decode(&mut bytes, version).unwrap();
                        let ours = read_fetch_response(body, version, header.flexible).unwrap();
                        assert_eq!(theirs.error_code, ours.error_code);
                        let their_partitions: Vec<(i32, i16, bool)> = theirs
                            .responses
                            .iter()
                            .flat_map(|topic| &topic.partitions)
                            .map(|p| {
                                (p.partition_index, p.error_code, p.records.as_ref().is_some_and(|r| !r.is_empty()))
                            })
                            .filter(|(_, error_code, records)| *error_code != 0 || *records)
                            .collect();
                        let our_partitions: Vec<(i32, i16, bool)> = ours
                            .topics
                            .iter()
                            .flat_map(|topic| &topic.partitions)
                            .map(|p| (p.partition, p.error_code, !p.batches.is_empty()))
                            .collect();
                        assert_eq!(their_partitions, our_partitions, "{name}");
                        *checked.entry((1, true)).or_default() += 1;
                    }
                    ApiKey::Metadata => {
                        let theirs = MetadataResponse::decode(&mut bytes, version).unwrap();
                        let expected: Vec<([u8; 16], String)> = theirs
                            .topics
                            .iter()
                            .filter(|topic| !topic.topic_id.is_nil())
                            .filter_map(|topic| Some((*topic.topic_id.as_bytes(), topic.name.as_ref()?.to_string())))
                            .collect();
                        assert_eq!(read_metadata_response(body, version, header.flexible), Ok(expected), "{name}");
                        *checked.entry((3, true)).or_default() += 1;
                    }
                    ApiKey::Produce if version >= 3 => {
                        let theirs = ProduceResponse::decode(&mut bytes, version).unwrap();
                        let mut ours = produce.clone().expect("a decoded produce");
                        apply_produce_response(body, version, header.flexible, &mut ours).unwrap();
                        let their_results: Vec<(i32, Option<i16>, Option<i64>)> = theirs
                            .responses
                            .iter()
                            .flat_map(|topic| &topic.partition_responses)
                            .map(|p| (p.index, Some(p.error_code), Some(p.base_offset)))
                            .collect();
                        let our_results: Vec<(i32, Option<i16>, Option<i64>)> = ours
                            .topics
                            .iter()
                            .flat_map(|topic| &topic.partitions)
                            .map(|p| (p.partition, p.error_code, p.base_offset))
                            .collect();
                        assert_eq!(their_results, our_results, "{name}");
                        *checked.entry((0, true)).or_default() += 1;
                    }
                    _ => {}
                }
            }
        }
        // Produce requests and responses, Fetch and Metadata responses were all compared.
        assert_eq!(checked.len(), 4, "{checked:?}");
    }

    #[test]
    fn hostile_messages_are_capped() {
        // Thousands of tiny compressed batches, each inflating to many traced records.
        let batch = encode_batch(0, 4, 64, &compress(4, &traced_records(64)));
        let records: Vec<u8> = std::iter::repeat_n(batch.as_slice(), 200).flatten().copied().collect();
        let partitions: Vec<PartitionData> = (0..5000)
            .map(|index| {
                let records = if index < 100 { Some(Bytes::copy_from_slice(&records)) } else { None };
                PartitionData::default().with_partition_index(index).with_error_code(1).with_records(records)
            })
            .collect();
        let mut topic = FetchableTopicResponse::default();
        topic.topic = name("t");
        topic.partitions = partitions;
        let body = encode(&FetchResponse::default().with_responses(vec![topic]), 12);
        let fetch = read_fetch_response(&body, 12, true).unwrap();
        let partitions = &fetch.topics[0].partitions;
        assert_eq!(partitions.len(), MAX_REPORTED_PARTITIONS);
        let batches: Vec<&FetchedBatch> = partitions.iter().flat_map(|partition| &partition.batches).collect();
        assert_eq!(batches.len(), 100 * 200, "batches are all counted");
        let traced: usize = batches.iter().map(|batch| batch.records.len()).sum();
        assert_eq!(traced, MAX_TRACED_PER_MESSAGE);

        let mut topic = TopicProduceData::default();
        topic.name = name("t");
        topic.partition_data = (0..5000)
            .map(|index| {
                PartitionProduceData::default().with_index(index).with_records(Some(Bytes::copy_from_slice(&batch)))
            })
            .collect();
        let request = ProduceRequest::default().with_acks(1).with_topic_data(vec![topic]);
        let produce = read_produce_request(&encode(&request, 9), 9, true).unwrap();
        let partitions = &produce.topics[0].partitions;
        assert_eq!(partitions.len(), MAX_REPORTED_PARTITIONS);
        assert_eq!(
            partitions.iter().map(|partition| partition.traceparents.len()).sum::<usize>(),
            MAX_TRACED_PER_MESSAGE
        );
        assert!(partitions.iter().all(|partition| partition.record_count == 64));
    }

    fn ours_produce(header: &RequestHeader<'_>, body: &[u8]) -> Option<Produce> {
        (header.api_key == ApiKey::Produce)
            .then(|| read_produce_request(body, header.api_version, header.flexible).ok())?
    }
}
