//! PRODUCER and CONSUMER spans of Kafka exchanges, named and attributed as the OpenTelemetry
//! messaging conventions say (`send {topic}`, `poll {topic}`), and what links a consumed record
//! to the span that produced it when no header says so: the offsets Produce responses assigned.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use rustc_hash::FxHashMap;

use crate::{
    protocols::kafka::{error_name, FetchedPartition, ProducedPartition, TopicRef},
    spans::{
        http::Endpoint,
        model::{Attributes, SpanLink, SpanStatus},
    },
};

pub struct MessagingSpan {
    pub name: String,
    pub attributes: Attributes,
    pub status: SpanStatus,
}

/// What every span of one exchange shares.
pub struct ExchangeFacts<'a> {
    pub client_id: Option<&'a str>,
    pub server: Endpoint<'a>,
}

/// A PRODUCER span for the partitions of one topic a Produce request wrote.
pub fn describe_send(topic: &str, partitions: &[ProducedPartition], facts: &ExchangeFacts<'_>) -> MessagingSpan {
    let records: u64 = partitions.iter().map(|p| u64::from(p.record_count)).sum();
    let mut attributes = common("send", topic, single_partition(partitions.iter().map(|p| p.partition)), records, facts);
    let error = partitions.iter().find_map(|p| p.error_code.filter(|code| *code != 0));
    let status = match error {
        Some(code) => {
            attributes.push(("error.type".into(), error_name(code).into_owned().into()));
            SpanStatus::Error
        }
        None => SpanStatus::Unset,
    };
    MessagingSpan { name: format!("send {topic}"), attributes, status }
}

/// A CONSUMER span for the records of one topic a Fetch response returned.
pub fn describe_poll(
    topic: &str,
    partitions: &[&FetchedPartition],
    records: u64,
    group: Option<&str>,
    facts: &ExchangeFacts<'_>,
) -> MessagingSpan {
    let mut attributes = common("poll", topic, single_partition(partitions.iter().map(|p| p.partition)), records, facts);
    if let Some(group) = group {
        attributes.push(("messaging.consumer.group.name".into(), group.to_owned().into()));
    }
    MessagingSpan { name: format!("poll {topic}"), attributes, status: SpanStatus::Unset }
}

fn common(operation: &'static str, topic: &str, partition: Option<i32>, records: u64, facts: &ExchangeFacts<'_>) -> Attributes {
    let operation_type = if operation == "send" { "send" } else { "receive" };
    let mut attributes: Attributes = vec![
        ("messaging.system".into(), "kafka".into()),
        ("messaging.operation.type".into(), operation_type.into()),
        ("messaging.operation.name".into(), operation.into()),
        ("messaging.destination.name".into(), topic.to_owned().into()),
    ];
    if let Some(partition) = partition {
        attributes.push(("messaging.destination.partition.id".into(), partition.to_string().into()));
    }
    if let Some(client_id) = facts.client_id.filter(|c| !c.is_empty()) {
        attributes.push(("messaging.client.id".into(), client_id.to_owned().into()));
    }
    attributes.push(("messaging.batch.message_count".into(), i64::try_from(records).unwrap_or(i64::MAX).into()));
    attributes.push(("server.address".into(), facts.server.ip.to_owned().into()));
    attributes.push(("server.port".into(), i64::from(facts.server.addr.port()).into()));
    attributes
}

/// The partition, when all of them are one.
fn single_partition(mut partitions: impl Iterator<Item = i32>) -> Option<i32> {
    let first = partitions.next()?;
    partitions.all(|p| p == first).then_some(first)
}

/// Topic names by topic id, from the Metadata responses the agent saw (Fetch v13+ and Produce
/// v13+ name topics by id only).
#[derive(Default)]
pub struct TopicNames {
    names: FxHashMap<[u8; 16], Arc<str>>,
}

/// Topic ids remembered; beyond, the map starts over (the next Metadata refills it).
const MAX_TOPIC_IDS: usize = 65_536;

impl TopicNames {
    pub fn learn(&mut self, id: [u8; 16], name: &str) {
        if self.names.get(&id).is_some_and(|known| **known == *name) {
            return;
        }
        if self.names.len() >= MAX_TOPIC_IDS {
            self.names.clear();
        }
        self.names.insert(id, Arc::from(name));
    }

    /// The topic's name; an id no Metadata response named reads as its UUID.
    pub fn resolve(&self, topic: &TopicRef) -> Arc<str> {
        match topic {
            TopicRef::Name(name) => Arc::from(name.as_str()),
            TopicRef::Id(id) => self.names.get(id).cloned().unwrap_or_else(|| Arc::from(uuid_text(id))),
        }
    }
}

fn uuid_text(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Offset ranges of produced records, by topic and partition, and the PRODUCER span that wrote
/// each: a consumer traced by the same agent links to it without any header in the records.
/// Bounded: the oldest ranges go first.
#[derive(Default)]
pub struct ProducedIndex {
    ranges: FxHashMap<TopicPartition, BTreeMap<i64, ProducedRange>>,
    /// (partition, base offset) in insertion order, for eviction.
    order: VecDeque<(TopicPartition, i64)>,
}

type TopicPartition = (Arc<str>, i32);

/// Records up to `end` (exclusive) from a base offset, and the span that wrote them.
type ProducedRange = (i64, SpanLink);

/// Produce batches remembered (each one a range of offsets).
const MAX_PRODUCED_RANGES: usize = 65_536;

impl ProducedIndex {
    /// Records `base_offset .. base_offset + count` of `topic`/`partition` were written by `span`.
    pub fn insert(&mut self, topic: &Arc<str>, partition: i32, base_offset: i64, count: u32, span: SpanLink) {
        if count == 0 || base_offset < 0 {
            return;
        }
        if self.order.len() >= MAX_PRODUCED_RANGES {
            self.evict_oldest();
        }
        let key = (topic.clone(), partition);
        let end = base_offset.saturating_add(i64::from(count));
        self.ranges.entry(key.clone()).or_default().insert(base_offset, (end, span));
        self.order.push_back((key, base_offset));
    }

    /// The span that produced the record at `offset`.
    pub fn find(&self, topic: &Arc<str>, partition: i32, offset: i64) -> Option<SpanLink> {
        let ranges = self.ranges.get(&(topic.clone(), partition))?;
        let (_, (end, span)) = ranges.range(..=offset).next_back()?;
        (offset < *end).then_some(*span)
    }

    fn evict_oldest(&mut self) {
        let Some((key, base_offset)) = self.order.pop_front() else { return };
        if let Some(ranges) = self.ranges.get_mut(&key) {
            ranges.remove(&base_offset);
            if ranges.is_empty() {
                self.ranges.remove(&key);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ranges.values().map(BTreeMap::len).sum()
    }
}

/// The consumer group of each client, from its group requests (JoinGroup, OffsetCommit...),
/// keyed by process and client id: the coordinator connection is not the one that fetches.
#[derive(Default)]
pub struct ConsumerGroups {
    groups: FxHashMap<(u32, String), Arc<str>>,
}

const MAX_CONSUMER_GROUPS: usize = 16_384;

impl ConsumerGroups {
    pub fn learn(&mut self, pid: u32, client_id: Option<&str>, group: &str) {
        let key = (pid, client_id.unwrap_or_default().to_owned());
        if self.groups.get(&key).is_some_and(|known| **known == *group) {
            return;
        }
        if self.groups.len() >= MAX_CONSUMER_GROUPS {
            self.groups.clear();
        }
        self.groups.insert(key, Arc::from(group));
    }

    pub fn of(&self, pid: u32, client_id: Option<&str>) -> Option<Arc<str>> {
        self.groups.get(&(pid, client_id.unwrap_or_default().to_owned())).cloned()
    }

    /// A process ended: its clients are gone.
    pub fn forget_process(&mut self, pid: u32) {
        self.groups.retain(|(p, _), _| *p != pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(n: u8) -> SpanLink {
        SpanLink { trace_id: [n; 16], span_id: [n; 8], trace_flags: 1 }
    }

    #[test]
    fn index_finds_the_batch_holding_an_offset() {
        let topic: Arc<str> = Arc::from("orders");
        let mut index = ProducedIndex::default();
        index.insert(&topic, 0, 10, 5, link(1));
        index.insert(&topic, 0, 15, 1, link(2));
        index.insert(&topic, 1, 10, 5, link(3));
        assert_eq!(index.find(&topic, 0, 10), Some(link(1)));
        assert_eq!(index.find(&topic, 0, 14), Some(link(1)));
        assert_eq!(index.find(&topic, 0, 15), Some(link(2)));
        assert_eq!(index.find(&topic, 0, 16), None, "past the last range");
        assert_eq!(index.find(&topic, 0, 9), None, "before the first range");
        assert_eq!(index.find(&topic, 1, 12), Some(link(3)));
        assert_eq!(index.find(&Arc::from("other"), 0, 12), None);
    }

    #[test]
    fn index_is_bounded_and_forgets_oldest_first() {
        let topic: Arc<str> = Arc::from("t");
        let mut index = ProducedIndex::default();
        for i in 0..(MAX_PRODUCED_RANGES as i64 + 10) {
            index.insert(&topic, 0, i * 2, 2, link(1));
        }
        assert_eq!(index.len(), MAX_PRODUCED_RANGES);
        assert_eq!(index.find(&topic, 0, 0), None, "the oldest range was evicted");
        assert!(index.find(&topic, 0, (MAX_PRODUCED_RANGES as i64 + 9) * 2 + 1).is_some());
    }

    #[test]
    fn topic_ids_resolve_to_names_or_uuids() {
        let mut names = TopicNames::default();
        let id = [0xab; 16];
        assert_eq!(&*names.resolve(&TopicRef::Id(id)), "abababab-abab-abab-abab-abababababab");
        names.learn(id, "payments");
        assert_eq!(&*names.resolve(&TopicRef::Id(id)), "payments");
        assert_eq!(&*names.resolve(&TopicRef::Name("x".into())), "x");
    }

    #[test]
    fn groups_are_per_process_and_client() {
        let mut groups = ConsumerGroups::default();
        groups.learn(1, Some("c1"), "g");
        assert_eq!(groups.of(1, Some("c1")).as_deref(), Some("g"));
        assert_eq!(groups.of(1, Some("c2")), None);
        assert_eq!(groups.of(2, Some("c1")), None);
        groups.forget_process(1);
        assert_eq!(groups.of(1, Some("c1")), None);
    }

    #[test]
    fn single_partition_only_when_all_agree() {
        assert_eq!(single_partition([3, 3].into_iter()), Some(3));
        assert_eq!(single_partition([3, 4].into_iter()), None);
        assert_eq!(single_partition(std::iter::empty()), None);
    }
}
