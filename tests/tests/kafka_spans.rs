//! Kafka PRODUCER and CONSUMER spans from the wire protocol, against librdkafka's mock cluster
//! (a real Kafka-protocol broker in an untraced process) and real clients: confluent-kafka
//! (librdkafka 2.16: Produce v10, Fetch v16 with topic ids), kafka-python 2.x (Produce v8,
//! Fetch v10) and kcat (Debian's librdkafka 2.0: Produce v7, Fetch v11).
//!
//! Span counts are exact because the requests are known: producers flush after every message
//! (one Produce request each) or send all in one request, and the mock answers a Fetch with at
//! most one record batch per partition, so a consumer gets one response with records per
//! producer request. Topics have one partition unless said otherwise.
//!
//! The `fixture_*` tests need no agent: they check the mock and the clients themselves.

use std::time::Duration;

use zerotel_tests::kafka::{
    parse_deliveries, parse_records, Acks, ApiKey, Compression, Consume, KafkaError, KafkaHttpService, Library,
    MockKafka, Produce, TOPIC_AUTHORIZATION_FAILED, UNKNOWN_TOPIC_OR_PARTITION,
};
use zerotel_tests::util::{random_span_id, random_trace_id};
use zerotel_tests::{
    curl, describe, pid_args, require_kernel, Agent, OtlpReceiver, Protocol, ReceivedSpan, SpanKind, SPAN_TIMEOUT,
};

/// How long to keep listening for spans beyond the expected ones, to assert exact counts.
const EXTRA_SPANS_WAIT: Duration = Duration::from_millis(1500);

/// An upstream span context, as a producing application would put it in a record.
struct Upstream {
    trace_id: String,
    span_id: String,
}

impl Upstream {
    fn new() -> Upstream {
        Upstream { trace_id: random_trace_id(), span_id: random_span_id() }
    }

    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }

    fn is_parent_of(&self, span: &ReceivedSpan) -> bool {
        span.trace_id == self.trace_id && span.parent_span_id == self.span_id
    }
}

/// The `kind` spans named `name` of process `pid`, sorted by start: waits for `count`, then
/// a little longer, so that callers can assert there are exactly `count`.
fn kafka_spans(receiver: &OtlpReceiver, pid: u32, kind: SpanKind, name: &str, count: usize) -> Vec<ReceivedSpan> {
    let matching = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        spans.iter().filter(|s| s.kind == kind && s.pid() == Some(pid) && s.name == name).cloned().collect()
    };
    receiver.wait_for(|spans| matching(spans).len() >= count, SPAN_TIMEOUT);
    std::thread::sleep(EXTRA_SPANS_WAIT);
    let mut spans = matching(&receiver.spans());
    spans.sort_by_key(|span| span.start_unix_ns);
    spans
}

fn producer_spans(receiver: &OtlpReceiver, pid: u32, topic: &str, count: usize) -> Vec<ReceivedSpan> {
    let spans = kafka_spans(receiver, pid, SpanKind::Producer, &format!("send {topic}"), count);
    assert_eq!(spans.len(), count, "PRODUCER spans of {topic}; all spans:\n{}", describe(&receiver.spans()));
    spans
}

fn consumer_spans(receiver: &OtlpReceiver, pid: u32, topic: &str, count: usize) -> Vec<ReceivedSpan> {
    let spans = kafka_spans(receiver, pid, SpanKind::Consumer, &format!("poll {topic}"), count);
    assert_eq!(spans.len(), count, "CONSUMER spans of {topic}; all spans:\n{}", describe(&receiver.spans()));
    spans
}

/// What every PRODUCER span of a request that wrote `messages` records to partition 0 carries.
fn assert_producer_attributes(span: &ReceivedSpan, kafka: &MockKafka, produce: &Produce, messages: i64) {
    assert_eq!(span.attr_str("messaging.system"), Some("kafka"), "{span}");
    assert_eq!(span.attr_str("messaging.operation.type"), Some("send"), "{span}");
    assert_eq!(span.attr_str("messaging.operation.name"), Some("send"), "{span}");
    assert_eq!(span.attr_str("messaging.destination.name"), Some(produce.topic.as_str()), "{span}");
    assert_eq!(span.attr_str("messaging.destination.partition.id"), Some("0"), "{span}");
    assert_eq!(span.attr_str("messaging.client.id"), Some(produce.client_id.as_str()), "{span}");
    assert_eq!(span.attr_int("messaging.batch.message_count"), Some(messages), "{span}");
    assert_eq!(span.attr_str("server.address"), Some("127.0.0.1"), "{span}");
    assert_eq!(span.attr_int("server.port"), Some(i64::from(kafka.port())), "{span}");
    assert!(!span.status_error, "{span}");
}

/// What every CONSUMER span of a response with `messages` records of partition 0 carries.
fn assert_consumer_attributes(span: &ReceivedSpan, consume: &Consume, messages: i64) {
    assert_eq!(span.attr_str("messaging.system"), Some("kafka"), "{span}");
    assert_eq!(span.attr_str("messaging.operation.type"), Some("receive"), "{span}");
    assert_eq!(span.attr_str("messaging.operation.name"), Some("poll"), "{span}");
    assert_eq!(span.attr_str("messaging.destination.name"), Some(consume.topic.as_str()), "{span}");
    assert_eq!(span.attr_str("messaging.destination.partition.id"), Some("0"), "{span}");
    assert_eq!(span.attr_str("messaging.client.id"), Some(consume.client_id.as_str()), "{span}");
    assert_eq!(span.attr_int("messaging.batch.message_count"), Some(messages), "{span}");
    assert_eq!(span.attr_str("messaging.consumer.group.name"), consume.group.as_deref(), "{span}");
}

/// Produces with one traced producer, then consumes with one traced consumer (separate agents,
/// so that each span's context can only come from the records' headers); three messages, one
/// request each, each with its own traceparent.
fn produce_and_consume_with_headers(library: Library, group: &str) {
    let kafka = MockKafka::start(&[("orders", 1)]);
    let upstreams: Vec<Upstream> = (0..3).map(|_| Upstream::new()).collect();
    let produce = Produce::new("orders", 3)
        .to_partition(0)
        .with_traceparents(upstreams.iter().map(Upstream::traceparent).collect());
    let receiver = OtlpReceiver::start(Protocol::Grpc);

    let producer = library.producer(&kafka, &produce);
    let pid = producer.pid();
    let agent = Agent::start(&pid_args(&[pid]), Some(&receiver));
    producer.run();
    // One Produce request per message: flushed one by one.
    for (span, upstream) in producer_spans(&receiver, pid, "orders", 3).iter().zip(&upstreams) {
        assert_producer_attributes(span, &kafka, &produce, 1);
        assert!(upstream.is_parent_of(span), "the record's traceparent is the PRODUCER span's parent: {span}");
    }
    drop(agent);

    let consume = Consume::new("orders", 3).in_group(group);
    let consumer = library.consumer(&kafka, &consume);
    let pid = consumer.pid();
    let agent = Agent::start(&pid_args(&[pid]), Some(&receiver));
    let records = parse_records(&consumer.run());
    assert_eq!(records.len(), 3);
    // The mock returns one record batch per Fetch, and each batch holds one record.
    for (span, upstream) in consumer_spans(&receiver, pid, "orders", 3).iter().zip(&upstreams) {
        assert_consumer_attributes(span, &consume, 1);
        assert!(span.links_to(&upstream.trace_id, &upstream.span_id), "a link to the record's context: {span}");
        assert!(upstream.is_parent_of(span), "a single record's context is the CONSUMER span's parent: {span}");
    }
    drop(agent);
}

#[test]
fn confluent_group_consumer_links_and_parents_to_record_headers() {
    if require_kernel() {
        produce_and_consume_with_headers(Library::Confluent, "billing");
    }
}

#[test]
fn kafka_python_producer_and_group_consumer_spans() {
    if require_kernel() {
        produce_and_consume_with_headers(Library::KafkaPython, "billing");
    }
}

#[test]
fn kcat_producer_and_consumer_spans() {
    if !require_kernel() {
        return;
    }
    let kafka = MockKafka::start(&[("orders", 1)]);
    let upstream = Upstream::new();
    // batch.num.messages=1: one Produce request per message.
    let produce = Produce::new("orders", 3).to_partition(0).with_traceparent(&upstream.traceparent());
    let consume = Consume::new("orders", 3);
    let producer = Library::Kcat.producer(&kafka, &produce);
    let consumer = Library::Kcat.consumer(&kafka, &consume);
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[producer.pid(), consumer.pid()]), Some(&receiver));
    let (producer_pid, consumer_pid) = (producer.pid(), consumer.pid());
    producer.run();
    assert_eq!(parse_records(&consumer.run()).len(), 3);
    for span in producer_spans(&receiver, producer_pid, "orders", 3) {
        assert_producer_attributes(&span, &kafka, &produce, 1);
        assert!(upstream.is_parent_of(&span), "{span}");
    }
    for span in consumer_spans(&receiver, consumer_pid, "orders", 3) {
        assert_consumer_attributes(&span, &consume, 1);
        assert!(span.links_to(&upstream.trace_id, &upstream.span_id), "{span}");
    }
    drop(agent);
}

#[test]
fn a_group_consumer_without_headers_links_to_the_traced_producer() {
    if !require_kernel() {
        return;
    }
    let kafka = MockKafka::start(&[("orders", 1)]);
    let produce = Produce::new("orders", 2).to_partition(0);
    let consume = Consume::new("orders", 2).in_group("billing");
    let producer = Library::Confluent.producer(&kafka, &produce);
    let consumer = Library::Confluent.consumer(&kafka, &consume);
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[producer.pid(), consumer.pid()]), Some(&receiver));
    let (producer_pid, consumer_pid) = (producer.pid(), consumer.pid());
    let offsets: Vec<Option<i64>> = parse_deliveries(&producer.run()).iter().map(|d| d.offset).collect();
    assert_eq!(offsets, [Some(0), Some(1)]);
    let records = parse_records(&consumer.run());
    assert!(records.iter().all(|record| record.headers.is_empty()), "{records:?}");
    // Message i is offset i: PRODUCER span i wrote what CONSUMER span i read.
    let sends = producer_spans(&receiver, producer_pid, "orders", 2);
    let polls = consumer_spans(&receiver, consumer_pid, "orders", 2);
    for (send, poll) in sends.iter().zip(&polls) {
        assert!(poll.links_to(&send.trace_id, &send.span_id), "a link to the PRODUCER span:\n{send}\n{poll}");
        assert_eq!(
            (&poll.trace_id, &poll.parent_span_id),
            (&send.trace_id, &send.span_id),
            "one record: its producer is the parent"
        );
    }
    drop(agent);
}

#[test]
fn every_compression_codec_gives_one_span_per_batch() {
    if !require_kernel() {
        return;
    }
    const MESSAGES: usize = 5;
    let topics: Vec<(String, Compression)> =
        Compression::ALL.iter().map(|&c| (format!("orders-{}", c.name()), c)).collect();
    let mut kafka = MockKafka::start(&[]);
    for (topic, _) in &topics {
        kafka.create_topic(topic, 1);
    }
    let upstream = Upstream::new();
    let clients: Vec<_> = topics
        .iter()
        .map(|(topic, codec)| {
            let produce = Produce::new(topic, MESSAGES).to_partition(0).compressed(*codec);
            let produce = produce.with_traceparent(&upstream.traceparent()).in_one_request();
            let producer = Library::Confluent.producer(&kafka, &produce);
            // One group per consumer: members of a shared group that subscribe to different
            // topics would rebalance each other.
            let consume = Consume::new(topic, MESSAGES).in_group(&format!("codecs-{}", codec.name()));
            let consumer = Library::Confluent.consumer(&kafka, &consume);
            (produce, producer, consume, consumer)
        })
        .collect();
    let pids: Vec<u32> =
        clients.iter().flat_map(|(_, producer, _, consumer)| [producer.pid(), consumer.pid()]).collect();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&pids), Some(&receiver));
    for (produce, producer, consume, consumer) in clients {
        let (producer_pid, consumer_pid) = (producer.pid(), consumer.pid());
        assert_eq!(parse_deliveries(&producer.run()).len(), MESSAGES);
        assert_eq!(parse_records(&consumer.run()).len(), MESSAGES);
        // All messages in one compressed record batch: one request, one response with records.
        let send = &producer_spans(&receiver, producer_pid, &produce.topic, 1)[0];
        assert_producer_attributes(send, &kafka, &produce, MESSAGES as i64);
        assert!(upstream.is_parent_of(send), "{:?}: {send}", produce.compression);
        let poll = &consumer_spans(&receiver, consumer_pid, &consume.topic, 1)[0];
        assert_consumer_attributes(poll, &consume, MESSAGES as i64);
        assert!(
            poll.links_to(&upstream.trace_id, &upstream.span_id),
            "headers read through {:?}: {poll}",
            produce.compression
        );
    }
    drop(agent);
}

#[test]
fn acks_zero_produce_requests_still_give_spans() {
    if !require_kernel() {
        return;
    }
    let mut kafka = MockKafka::start(&[("orders", 1)]);
    // The mock answers acks=0 requests; held back, the answers come after the producer is gone,
    // i.e. never, as from a real broker.
    kafka.delay_next_responses(ApiKey::Produce, 3, Duration::from_secs(60));
    let produce = Produce::new("orders", 3).to_partition(0).acks(Acks::None);
    let producer = Library::Confluent.producer(&kafka, &produce);
    let pid = producer.pid();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[pid]), Some(&receiver));
    let deliveries = parse_deliveries(&producer.run());
    assert!(deliveries.iter().all(|d| d.offset.is_none()), "acks=0: no offsets come back: {deliveries:?}");
    for span in producer_spans(&receiver, pid, "orders", 3) {
        assert_producer_attributes(&span, &kafka, &produce, 1);
    }
    drop(agent);
}

/// Injects `error` into the next Produce request; a producer without retries sends one
/// message, which fails.
fn failed_produce_span(library: Library, error: KafkaError) {
    let mut kafka = MockKafka::start(&[("orders", 1)]);
    kafka.fail_next_requests(ApiKey::Produce, error, 1);
    let produce = Produce::new("orders", 1).to_partition(0).without_retries();
    let producer = library.producer(&kafka, &produce);
    let pid = producer.pid();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[pid]), Some(&receiver));
    let output = producer.release();
    let deliveries = parse_deliveries(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(deliveries.len(), 1);
    assert!(deliveries[0].error.is_some(), "{deliveries:?}");
    let spans = kafka_spans(&receiver, pid, SpanKind::Producer, "send orders", 1);
    assert_eq!(spans.len(), 1, "one failed request, not retried:\n{}", describe(&spans));
    assert!(spans[0].status_error, "{}", spans[0]);
    assert_eq!(spans[0].attr_str("error.type"), Some(error.name), "{}", spans[0]);
    assert_eq!(spans[0].attr_str("messaging.destination.partition.id"), Some("0"), "{}", spans[0]);
    drop(agent);
}

#[test]
fn a_failed_produce_is_an_error_span() {
    if !require_kernel() {
        return;
    }
    failed_produce_span(Library::KafkaPython, UNKNOWN_TOPIC_OR_PARTITION);
    failed_produce_span(Library::Confluent, TOPIC_AUTHORIZATION_FAILED);
}

#[test]
fn an_http_handler_produce_is_a_child_of_the_request() {
    if !require_kernel() {
        return;
    }
    let kafka = MockKafka::start(&[("orders", 1)]);
    for library in [Library::Confluent, Library::KafkaPython] {
        let produce = Produce::new("orders", 1).to_partition(0);
        let service = KafkaHttpService::start(library, &kafka, &produce);
        let receiver = OtlpReceiver::start(Protocol::Grpc);
        let agent = Agent::start(&pid_args(&[service.pid()]), Some(&receiver));
        let response = curl(&service.url("/produce"), &[]);
        assert_eq!(response.status, 200, "{library:?}; service stderr:\n{}", service.stderr());
        // The client sends the request from its own I/O thread, not the handler's.
        let send = &producer_spans(&receiver, service.pid(), "orders", 1)[0];
        let request = receiver.wait_for_span(|s| s.is(SpanKind::Server, service.pid(), "/produce"), SPAN_TIMEOUT);
        assert_eq!(send.trace_id, request.trace_id, "{library:?}: same trace");
        assert_eq!(send.parent_span_id, request.span_id, "{library:?}: the produce is a child of the request");
        drop(agent);
    }
}

// ---- the fixtures themselves (no agent) ----

#[test]
fn fixture_mock_kafka_creates_topics_and_serves_confluent_clients() {
    let kafka = MockKafka::start(&[("orders", 1), ("events", 3)]);
    let upstream = Upstream::new();
    let produce = Produce::new("events", 3).to_partition(2).with_traceparent(&upstream.traceparent());
    let deliveries = parse_deliveries(&Library::Confluent.producer(&kafka, &produce).run());
    let offsets: Vec<(Option<i32>, Option<i64>)> = deliveries.iter().map(|d| (d.partition, d.offset)).collect();
    assert_eq!(offsets, [(Some(2), Some(0)), (Some(2), Some(1)), (Some(2), Some(2))]);
    let consume = Consume::new("events", 3).in_group("billing");
    let records = parse_records(&Library::Confluent.consumer(&kafka, &consume).run());
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records.iter().all(|r| r.header("traceparent") == Some(upstream.traceparent().as_str())), "{records:?}");
    // A topic not created first gets the mock's default of 4 partitions.
    let spread = Produce::new("auto", 12);
    let partitions: Vec<i32> = parse_deliveries(&Library::Confluent.producer(&kafka, &spread).run())
        .iter()
        .filter_map(|d| d.partition)
        .collect();
    assert!(partitions.iter().all(|p| (0..4).contains(p)), "{partitions:?}");
}

#[test]
fn fixture_kafka_python_clients_work_against_the_mock() {
    let kafka = MockKafka::start(&[("orders", 1)]);
    let upstream = Upstream::new();
    let produce = Produce::new("orders", 2).to_partition(0).with_traceparent(&upstream.traceparent());
    let deliveries = parse_deliveries(&Library::KafkaPython.producer(&kafka, &produce).run());
    assert_eq!(deliveries.iter().map(|d| d.offset).collect::<Vec<_>>(), [Some(0), Some(1)]);
    let batch = Produce::new("orders", 3).to_partition(0).compressed(Compression::Gzip).in_one_request();
    assert_eq!(parse_deliveries(&Library::KafkaPython.producer(&kafka, &batch).run()).len(), 3);
    for consume in [Consume::new("orders", 5), Consume::new("orders", 5).in_group("billing")] {
        let records = parse_records(&Library::KafkaPython.consumer(&kafka, &consume).run());
        let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4], "{consume:?}");
        assert_eq!(records[0].header("traceparent"), Some(upstream.traceparent().as_str()));
        assert_eq!(records[2].header("traceparent"), None);
    }
}

#[test]
fn fixture_kcat_clients_work_against_the_mock() {
    let kafka = MockKafka::start(&[("orders", 1)]);
    let upstream = Upstream::new();
    let produce = Produce::new("orders", 3).to_partition(0).with_traceparent(&upstream.traceparent());
    Library::Kcat.producer(&kafka, &produce).run();
    let batch = Produce::new("orders", 2).to_partition(0).compressed(Compression::Lz4).in_one_request();
    Library::Kcat.producer(&kafka, &batch).run();
    for consume in [Consume::new("orders", 5), Consume::new("orders", 5).in_group("billing")] {
        let records = parse_records(&Library::Kcat.consumer(&kafka, &consume).run());
        assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1, 2, 3, 4], "{consume:?}");
        assert_eq!(records[1].header("traceparent"), Some(upstream.traceparent().as_str()));
        assert_eq!(records[4].header("traceparent"), None);
    }
}

#[test]
fn fixture_every_codec_round_trips_through_the_mock() {
    let mut kafka = MockKafka::start(&[]);
    for codec in Compression::ALL {
        let topic = format!("orders-{}", codec.name());
        kafka.create_topic(&topic, 1);
        let produce = Produce::new(&topic, 4).to_partition(0).compressed(codec).in_one_request();
        assert_eq!(parse_deliveries(&Library::Confluent.producer(&kafka, &produce).run()).len(), 4);
        let records = parse_records(&Library::Confluent.consumer(&kafka, &Consume::new(&topic, 4)).run());
        assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1, 2, 3], "{codec:?}");
    }
}

#[test]
fn fixture_mock_kafka_injects_produce_errors() {
    let mut kafka = MockKafka::start(&[("orders", 1)]);
    let produce = Produce::new("orders", 1).to_partition(0).without_retries();
    for (library, error) in
        [(Library::KafkaPython, UNKNOWN_TOPIC_OR_PARTITION), (Library::Confluent, TOPIC_AUTHORIZATION_FAILED)]
    {
        kafka.fail_next_requests(ApiKey::Produce, error, 1);
        let output = library.producer(&kafka, &produce).release();
        assert!(!output.status.success(), "{library:?}");
        let deliveries = parse_deliveries(&String::from_utf8_lossy(&output.stdout));
        assert_eq!(deliveries[0].error.as_deref(), Some(error.name), "{library:?}: {deliveries:?}");
    }
    // The next request is served again.
    assert_eq!(parse_deliveries(&Library::Confluent.producer(&kafka, &produce).run())[0].offset, Some(0));
}

#[test]
fn fixture_delayed_acks_zero_responses_do_not_hold_the_producer() {
    let mut kafka = MockKafka::start(&[("orders", 1)]);
    kafka.delay_next_responses(ApiKey::Produce, 3, Duration::from_secs(60));
    let produce = Produce::new("orders", 3).to_partition(0).acks(Acks::None);
    let started = std::time::Instant::now();
    let deliveries = parse_deliveries(&Library::Confluent.producer(&kafka, &produce).run());
    assert!(started.elapsed() < Duration::from_secs(10), "acks=0 waited for the held responses");
    assert_eq!(deliveries.len(), 3);
    // The requests were served at once: the messages are there.
    let records = parse_records(&Library::Confluent.consumer(&kafka, &Consume::new("orders", 3)).run());
    assert_eq!(records.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1, 2]);
    // With acks, the producer waits for the held response.
    kafka.delay_next_responses(ApiKey::Produce, 1, Duration::from_secs(1));
    let started = std::time::Instant::now();
    Library::Confluent.producer(&kafka, &Produce::new("orders", 1)).run();
    assert!(started.elapsed() >= Duration::from_secs(1), "the response was not held");
}

#[test]
fn fixture_http_service_produces_per_request() {
    let kafka = MockKafka::start(&[("orders", 1)]);
    for library in [Library::Confluent, Library::KafkaPython] {
        let service = KafkaHttpService::start(library, &kafka, &Produce::new("orders", 1).to_partition(0));
        for _ in 0..2 {
            assert_eq!(curl(&service.url("/produce"), &[]).status, 200, "{library:?}: {}", service.stderr());
        }
        assert_eq!(curl(&service.url("/missing"), &[]).status, 404);
    }
    let records = parse_records(&Library::Confluent.consumer(&kafka, &Consume::new("orders", 4)).run());
    assert_eq!(records.len(), 4);
}

/// Sum of `messaging.batch.message_count` over `spans`.
fn message_count(spans: &[ReceivedSpan]) -> i64 {
    spans.iter().filter_map(|span| span.attr_int("messaging.batch.message_count")).sum()
}

/// Spans of `kind` named `name` of process `pid` until their messages add up to `messages`.
fn spans_holding(receiver: &OtlpReceiver, pid: u32, kind: SpanKind, name: &str, messages: i64) -> Vec<ReceivedSpan> {
    let matching = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        spans.iter().filter(|s| s.kind == kind && s.pid() == Some(pid) && s.name == name).cloned().collect()
    };
    receiver.wait_for(|spans| message_count(&matching(spans)) >= messages, SPAN_TIMEOUT);
    std::thread::sleep(EXTRA_SPANS_WAIT);
    matching(&receiver.spans())
}

/// Batches near librdkafka's 1 MB `batch.size`, sent with one iovec per message value (about a
/// thousand per sendmsg) and fetched back: every message is counted once, no frame is lost.
#[test]
fn megabyte_batches_of_many_iovecs_are_captured_whole() {
    if !require_kernel() {
        return;
    }
    const MESSAGES: usize = 30_000;
    let kafka = MockKafka::start(&[("bulk", 1)]);
    let produce = Produce::new("bulk", MESSAGES).to_partition(0).padded_to(100).in_one_request();
    let consume = Consume::new("bulk", MESSAGES);
    let producer = Library::Kcat.producer(&kafka, &produce);
    let consumer = Library::Kcat.consumer(&kafka, &consume);
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[producer.pid(), consumer.pid()]), Some(&receiver));
    let (producer_pid, consumer_pid) = (producer.pid(), consumer.pid());
    producer.run();
    assert_eq!(parse_records(&consumer.run()).len(), MESSAGES);
    let sends = spans_holding(&receiver, producer_pid, SpanKind::Producer, "send bulk", MESSAGES as i64);
    assert_eq!(message_count(&sends), MESSAGES as i64, "{}", describe(&sends));
    assert!(sends.len() >= 3, "3 MB in batches of at most 1 MB: {}", describe(&sends));
    let polls = spans_holding(&receiver, consumer_pid, SpanKind::Consumer, "poll bulk", MESSAGES as i64);
    assert_eq!(message_count(&polls), MESSAGES as i64, "{}", describe(&polls));
    assert_eq!(agent.metric_sum("zerotel_kafka_truncated_frames_total"), 0);
    assert_eq!(agent.metric_sum_with("zerotel_parse_errors_total", &[("protocol", "kafka")]), 0);
    assert_eq!(agent.metric_sum("zerotel_events_lost_total"), 0);
    drop(agent);
}
