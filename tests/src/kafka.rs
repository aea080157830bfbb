//! Kafka without a Kafka broker: librdkafka's mock cluster, a real Kafka-protocol broker on a
//! 127.0.0.1 port, held by an untraced Python process; and the clients to trace against it
//! (confluent-kafka, kafka-python 2.x, kcat), each started paused so the agent can be given its
//! pid before its first byte, plus an HTTP service whose handler produces.
//!
//! What the mock does differently from a real broker, which the tests rely on:
//! - a Fetch response holds at most one record batch per partition: the one the fetch offset
//!   falls in, i.e. what one Produce request wrote. Consumers therefore get exactly one
//!   response with records per producer batch;
//! - a topic that is not created first is created on first use (Metadata) with 4 partitions;
//! - consumer groups join at once: the holder sets the initial rebalance delay (3 s) to 0;
//! - it answers acks=0 Produce requests, which a real broker never does
//!   ([`MockKafka::delay_next_responses`] holds the answers until the client is gone);
//! - errors are injected on request ([`MockKafka::fail_next_requests`]), the real broker
//!   response then carries that error code.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value as Json};

use crate::clients::{paused_client, PausedClient};
use crate::process::ScriptProcess;
use crate::servers::python_interpreter;
use crate::util::TempDir;

/// How long the mock cluster, or a command to it, may take.
const MOCK_TIMEOUT: Duration = Duration::from_secs(15);

const INSTALL_HINT: &str = "run `cargo xtask setup`, or `python3 -m pip install confluent-kafka 'kafka-python<3'` \
                            and `apt-get install kcat`";

/// Holds a mock cluster of one broker. Loads the librdkafka that confluent-kafka bundles and
/// drives its mock API (rdkafka_mock.h) through ctypes: topics with exact partition counts, no
/// rebalance delay, and error injection, none of which the Python binding exposes. Prints the
/// bootstrap address, then serves one command per stdin line, answering "ok" or "error ...".
/// The cluster's one broker has id 1.
const MOCK_CLUSTER: &str = r#"
import ctypes
import glob
import importlib.util
import os
import sys
from ctypes import POINTER, c_char_p, c_int, c_int16, c_int32, c_size_t, c_void_p


def bundled_librdkafka():
    package = importlib.util.find_spec("confluent_kafka")
    if package is None:
        sys.exit("confluent-kafka is not installed")
    site = os.path.dirname(os.path.dirname(package.origin))
    found = sorted(glob.glob(os.path.join(site, "confluent_kafka.libs", "librdkafka*.so*")))
    return found[0] if found else "librdkafka.so.1"


lib = ctypes.CDLL(bundled_librdkafka())
lib.rd_kafka_conf_new.restype = c_void_p
lib.rd_kafka_conf_set.argtypes = [c_void_p, c_char_p, c_char_p, c_char_p, c_size_t]
lib.rd_kafka_new.restype = c_void_p
lib.rd_kafka_new.argtypes = [c_int, c_void_p, c_char_p, c_size_t]
lib.rd_kafka_mock_cluster_new.restype = c_void_p
lib.rd_kafka_mock_cluster_new.argtypes = [c_void_p, c_int]
lib.rd_kafka_mock_cluster_bootstraps.restype = c_char_p
lib.rd_kafka_mock_cluster_bootstraps.argtypes = [c_void_p]
lib.rd_kafka_mock_topic_create.argtypes = [c_void_p, c_char_p, c_int, c_int]
lib.rd_kafka_mock_group_initial_rebalance_delay_ms.argtypes = [c_void_p, c_int32]
lib.rd_kafka_mock_push_request_errors_array.argtypes = [c_void_p, c_int16, c_size_t, POINTER(c_int)]
# Variadic: (error, rtt_ms) pairs follow.
lib.rd_kafka_mock_broker_push_request_error_rtts.argtypes = [c_void_p, c_int32, c_int16, c_size_t]
lib.rd_kafka_err2name.restype = c_char_p


def new_cluster():
    errors = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    lib.rd_kafka_conf_set(conf, b"log_level", b"3", errors, len(errors))
    handle = lib.rd_kafka_new(0, conf, errors, len(errors))  # a producer handle owns the cluster
    if not handle:
        sys.exit("rd_kafka_new: " + errors.value.decode())
    cluster = lib.rd_kafka_mock_cluster_new(handle, 1)
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0)
    return handle, cluster


def create_topic(name, partitions):
    error = lib.rd_kafka_mock_topic_create(cluster, name.encode(), int(partitions), 1)
    if error:
        raise RuntimeError(lib.rd_kafka_err2name(error).decode())


def fail_next_requests(api_key, error_code, count):
    codes = (c_int * int(count))(*[int(error_code)] * int(count))
    lib.rd_kafka_mock_push_request_errors_array(cluster, int(api_key), int(count), codes)


def delay_next_responses(api_key, count, delay_ms):
    pairs = [c_int(value) for _ in range(int(count)) for value in (0, int(delay_ms))]
    lib.rd_kafka_mock_broker_push_request_error_rtts(cluster, 1, int(api_key), int(count), *pairs)


COMMANDS = {"topic": create_topic, "fail": fail_next_requests, "delay": delay_next_responses}
handle, cluster = new_cluster()
for topic in sys.argv[1:]:
    create_topic(*topic.rsplit(":", 1))
print(lib.rd_kafka_mock_cluster_bootstraps(cluster).decode(), flush=True)
for line in iter(sys.stdin.readline, ""):
    command, *args = line.split()
    try:
        COMMANDS[command](*args)
        print("ok", flush=True)
    except Exception as error:
        print("error", repr(error), flush=True)
"#;

/// A Kafka API key, as the mock's error injection selects requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKey {
    Produce = 0,
    Fetch = 1,
}

/// A Kafka protocol error: its code and its name as the Kafka protocol spells it (what
/// `error.type` carries; librdkafka abbreviates some, e.g. UNKNOWN_TOPIC_OR_PART).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaError {
    pub code: i16,
    pub name: &'static str,
}

/// Retriable: librdkafka refreshes metadata and sends the batch again even without retries;
/// kafka-python with `retries=0` gives up after the one failed request.
pub const UNKNOWN_TOPIC_OR_PARTITION: KafkaError = KafkaError { code: 3, name: "UNKNOWN_TOPIC_OR_PARTITION" };
/// Not retriable: every client fails the batch after the one request.
pub const TOPIC_AUTHORIZATION_FAILED: KafkaError = KafkaError { code: 29, name: "TOPIC_AUTHORIZATION_FAILED" };

/// A librdkafka mock cluster of one broker on 127.0.0.1:<ephemeral port>, in an untraced
/// Python process that is killed and reaped on drop. Starts in about 0.2 s.
pub struct MockKafka {
    holder: ScriptProcess,
    bootstrap: String,
}

impl MockKafka {
    /// Starts the cluster with `topics` created first, as (name, partition count).
    pub fn start(topics: &[(&str, u32)]) -> MockKafka {
        let python = kafka_python();
        let dir = TempDir::new("mock-kafka");
        dir.write("mock_kafka.py", MOCK_CLUSTER);
        let args: Vec<String> = topics.iter().map(|(name, partitions)| format!("{name}:{partitions}")).collect();
        let holder = ScriptProcess::spawn(python, dir, "mock_kafka.py", &args, &[]);
        let bootstrap = holder.expect_line(MOCK_TIMEOUT);
        let kafka = MockKafka { holder, bootstrap };
        assert!(kafka.port() > 0, "mock cluster printed {:?}; stderr:\n{}", kafka.bootstrap, kafka.holder.stderr());
        kafka
    }

    /// `127.0.0.1:<port>`: the `bootstrap.servers` of every client.
    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// The broker's port (`server.port` of client spans).
    pub fn port(&self) -> u16 {
        self.bootstrap.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or(0)
    }

    /// The holder's pid (the broker runs in it), which no test traces.
    pub fn pid(&self) -> u32 {
        self.holder.pid()
    }

    /// Creates `topic` with exactly `partitions` partitions.
    pub fn create_topic(&mut self, topic: &str, partitions: u32) {
        self.command(&format!("topic {topic} {partitions}"));
    }

    /// Makes the broker answer the next `count` requests of `api` (from any client) with
    /// `error` in every partition, instead of serving them.
    pub fn fail_next_requests(&mut self, api: ApiKey, error: KafkaError, count: usize) {
        self.command(&format!("fail {} {} {count}", api as i16, error.code));
    }

    /// Holds the broker's responses to the next `count` requests of `api` for `delay` (the
    /// requests themselves are served at once). A client that closes its connection before
    /// then sees no response: what a real broker does for acks=0 Produce requests, which the
    /// mock answers.
    pub fn delay_next_responses(&mut self, api: ApiKey, count: usize, delay: Duration) {
        self.command(&format!("delay {} {count} {}", api as i16, delay.as_millis()));
    }

    /// What librdkafka logged in the holder (mock broker debug, errors).
    pub fn stderr(&self) -> String {
        self.holder.stderr()
    }

    fn command(&mut self, line: &str) {
        self.holder.send_line(line);
        let answer = self.holder.expect_line(MOCK_TIMEOUT);
        assert_eq!(answer, "ok", "mock cluster command {line:?}; stderr:\n{}", self.holder.stderr());
    }
}

/// The Python interpreter, checked once to import confluent-kafka and kafka-python 2.x.
fn kafka_python() -> &'static Path {
    static CHECKED: OnceLock<()> = OnceLock::new();
    let python = python_interpreter();
    CHECKED.get_or_init(|| require_python_clients(python));
    python
}

fn require_python_clients(python: &Path) {
    let script = "import confluent_kafka, kafka; print(kafka.__version__)";
    let output = Command::new(python)
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("run {} to check for the Kafka clients: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} cannot import the Kafka clients: {}\n{INSTALL_HINT}",
        python.display(),
        stderr.trim()
    );
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    // kafka-python 3 cannot talk to the mock broker.
    assert!(version.starts_with("2."), "kafka-python {version} is installed, the tests need 2.x: {INSTALL_HINT}");
}

/// kcat, or a panic saying how to install it.
fn kcat() -> &'static str {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let found = Command::new("kcat").arg("-V").output().is_ok_and(|output| output.status.success());
        assert!(found, "kcat is not installed: {INSTALL_HINT}");
    });
    "kcat"
}

/// `compression.type` of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// Every codec Kafka defines. kafka-python needs extra modules for all but gzip.
    pub const ALL: [Compression; 5] =
        [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// How many acknowledgements a producer waits for. With `None` a real broker sends no Produce
/// response at all (the mock does: see [`MockKafka::delay_next_responses`]). kafka-python 2.3
/// never writes acks=0 requests before it closes, so use the other clients for acks=0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    None,
    Leader,
    All,
}

impl Acks {
    fn name(self) -> &'static str {
        match self {
            Acks::None => "0",
            Acks::Leader => "1",
            Acks::All => "all",
        }
    }
}

/// What a producer sends: `count` messages ("message <i>") to `topic`.
///
/// By default each message is flushed before the next is produced, so every message is one
/// Produce request (of one partition); [`Produce::in_one_request`] sends all of them in one
/// request instead. Either way the number of Produce requests, hence of PRODUCER spans, is
/// known in advance.
#[derive(Debug, Clone)]
pub struct Produce {
    pub topic: String,
    pub count: usize,
    /// None: the client's partitioner chooses.
    pub partition: Option<i32>,
    /// Message i carries `traceparent: traceparents[i]` when there is one.
    pub traceparents: Vec<String>,
    pub compression: Compression,
    pub acks: Acks,
    pub one_request: bool,
    /// None: the client's default.
    pub retries: Option<u32>,
    pub client_id: String,
    /// kcat only: each message padded with `x` to this many bytes (0: "message <i>" as it is).
    pub value_bytes: usize,
}

impl Produce {
    pub fn new(topic: &str, count: usize) -> Produce {
        Produce {
            topic: topic.to_string(),
            count,
            partition: None,
            traceparents: Vec::new(),
            compression: Compression::None,
            acks: Acks::All,
            one_request: false,
            retries: None,
            client_id: "zerotel-producer".to_string(),
            value_bytes: 0,
        }
    }

    /// Pads each message to `bytes` (kcat only): librdkafka then sends every value as an iovec
    /// of its own.
    pub fn padded_to(mut self, bytes: usize) -> Produce {
        self.value_bytes = bytes;
        self
    }

    pub fn to_partition(mut self, partition: i32) -> Produce {
        self.partition = Some(partition);
        self
    }

    /// Message i carries `traceparents[i]`.
    pub fn with_traceparents(mut self, traceparents: Vec<String>) -> Produce {
        self.traceparents = traceparents;
        self
    }

    /// Every message carries `traceparent`.
    pub fn with_traceparent(self, traceparent: &str) -> Produce {
        let all = vec![traceparent.to_string(); self.count];
        self.with_traceparents(all)
    }

    pub fn compressed(mut self, compression: Compression) -> Produce {
        self.compression = compression;
        self
    }

    pub fn acks(mut self, acks: Acks) -> Produce {
        self.acks = acks;
        self
    }

    /// All messages in one Produce request (one record batch): needs a fixed partition, or the
    /// client may spread them over several partitions, i.e. several batches.
    pub fn in_one_request(mut self) -> Produce {
        assert!(self.partition.is_some(), "in_one_request needs to_partition first");
        self.one_request = true;
        self
    }

    /// A failed request fails its messages instead of being sent again (the error tests).
    pub fn without_retries(mut self) -> Produce {
        self.retries = Some(0);
        self
    }

    pub fn client_id(mut self, client_id: &str) -> Produce {
        self.client_id = client_id.to_string();
        self
    }

    /// The spec the Python clients read from their argument.
    fn to_json(&self, kafka: &MockKafka) -> Json {
        json!({
            "role": "produce", "bootstrap": kafka.bootstrap(), "client_id": self.client_id,
            "topic": self.topic, "count": self.count, "partition": self.partition,
            "traceparents": self.traceparents, "compression": self.compression.name(),
            "acks": self.acks.name(), "one_request": self.one_request, "retries": self.retries,
        })
    }
}

/// What a consumer reads: the first `count` messages of `topic` (all partitions, from the
/// beginning), in consumer group `group` (subscribe) or without one (assign). confluent-kafka
/// cannot be without a group: it gets `group.id=zerotel-unused`, which it only looks up
/// (FindCoordinator); kcat and kafka-python send no group at all.
#[derive(Debug, Clone)]
pub struct Consume {
    pub topic: String,
    pub count: usize,
    pub group: Option<String>,
    pub client_id: String,
}

impl Consume {
    pub fn new(topic: &str, count: usize) -> Consume {
        Consume { topic: topic.to_string(), count, group: None, client_id: "zerotel-consumer".to_string() }
    }

    pub fn in_group(mut self, group: &str) -> Consume {
        self.group = Some(group.to_string());
        self
    }

    pub fn client_id(mut self, client_id: &str) -> Consume {
        self.client_id = client_id.to_string();
        self
    }

    fn to_json(&self, kafka: &MockKafka) -> Json {
        json!({
            "role": "consume", "bootstrap": kafka.bootstrap(), "client_id": self.client_id,
            "topic": self.topic, "count": self.count, "group": self.group,
        })
    }
}

/// confluent-kafka (librdkafka) producer and consumer: one JSON spec argument (see
/// [`Produce`], [`Consume`]), JSON lines out. The HTTP service imports it.
const CONFLUENT_CLIENT: &str = r#"
import json
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

DEADLINE_S = 20


def make_producer(spec):
    config = {
        "bootstrap.servers": spec["bootstrap"],
        "client.id": spec["client_id"],
        "acks": spec["acks"],
        "compression.type": spec["compression"],
        # flush() sends what is queued at once: a long linger only keeps produce() from sending early.
        "linger.ms": 60000 if spec["one_request"] else 0,
    }
    if spec["retries"] is not None:
        config["message.send.max.retries"] = spec["retries"]
    return Producer(config)


def produce(producer, spec):
    """Produces the messages, flushing after each unless one_request; returns their deliveries."""
    deliveries = []

    def delivered(error, message):
        deliveries.append({
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "error": error.name() if error else None,
        })

    target = {} if spec["partition"] is None else {"partition": spec["partition"]}
    for i in range(spec["count"]):
        headers = [("traceparent", spec["traceparents"][i])] if i < len(spec["traceparents"]) else None
        producer.produce(spec["topic"], value=f"message {i}".encode(), headers=headers, on_delivery=delivered, **target)
        if not spec["one_request"]:
            producer.flush(DEADLINE_S)
    producer.flush(DEADLINE_S)
    return deliveries


def subscribe_or_assign(consumer, spec):
    if spec["group"]:
        consumer.subscribe([spec["topic"]])
        return
    partitions = consumer.list_topics(spec["topic"], timeout=DEADLINE_S).topics[spec["topic"]].partitions
    consumer.assign([TopicPartition(spec["topic"], p, OFFSET_BEGINNING) for p in sorted(partitions)])


def consume(spec):
    consumer = Consumer({
        "bootstrap.servers": spec["bootstrap"],
        "client.id": spec["client_id"],
        # Required even to only assign partitions; then never joined, nor committed to.
        "group.id": spec["group"] or "zerotel-unused",
        "enable.auto.commit": spec["group"] is not None,
        "auto.offset.reset": "earliest",
    })
    subscribe_or_assign(consumer, spec)
    deadline = time.monotonic() + DEADLINE_S
    got = 0
    while got < spec["count"]:
        if time.monotonic() > deadline:
            sys.exit(f"consumed {got} of {spec['count']} messages in {DEADLINE_S} s")
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            print(message.error(), file=sys.stderr)
            continue
        headers = [part for key, value in message.headers() or [] for part in (key, value.decode())]
        record = {"topic": message.topic(), "partition": message.partition(), "offset": message.offset(), "headers": headers}
        print(json.dumps(record), flush=True)
        got += 1
    consumer.close()


def main():
    spec = json.loads(sys.argv[1])
    if spec["role"] == "consume":
        consume(spec)
        return
    deliveries = produce(make_producer(spec), spec)
    for delivery in deliveries:
        print(json.dumps(delivery), flush=True)
    if len(deliveries) != spec["count"] or any(d["error"] for d in deliveries):
        sys.exit(f"not every message was delivered: {deliveries}")


if __name__ == "__main__":
    main()
"#;

/// kafka-python 2.x producer and consumer, with the same spec and output as [`CONFLUENT_CLIENT`].
const KAFKA_PYTHON_CLIENT: &str = r#"
import json
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

DEADLINE_S = 20
ACKS = {"0": 0, "1": 1, "all": "all"}


def make_producer(spec):
    options = {
        "bootstrap_servers": spec["bootstrap"],
        "client_id": spec["client_id"],
        "acks": ACKS[spec["acks"]],
        "compression_type": None if spec["compression"] == "none" else spec["compression"],
        # flush() sends what is queued at once: a long linger only keeps send() from sending early.
        "linger_ms": 60000 if spec["one_request"] else 0,
    }
    if spec["retries"] is not None:
        options["retries"] = spec["retries"]
    return KafkaProducer(**options)


def delivery(future):
    try:
        metadata = future.get(DEADLINE_S)
    except Exception as error:
        # A broker error's `message` is the protocol's name of its code.
        name = getattr(error, "message", type(error).__name__)
        return {"topic": None, "partition": None, "offset": None, "error": name}
    return {"topic": metadata.topic, "partition": metadata.partition, "offset": metadata.offset, "error": None}


def produce(producer, spec):
    """Produces the messages, flushing after each unless one_request; returns their deliveries."""
    futures = []
    for i in range(spec["count"]):
        headers = [("traceparent", spec["traceparents"][i].encode())] if i < len(spec["traceparents"]) else None
        futures.append(producer.send(spec["topic"], f"message {i}".encode(), partition=spec["partition"], headers=headers))
        if not spec["one_request"]:
            producer.flush(DEADLINE_S)
    producer.flush(DEADLINE_S)
    return [delivery(future) for future in futures]


def subscribe_or_assign(consumer, spec):
    if spec["group"]:
        consumer.subscribe([spec["topic"]])
        return
    partitions = sorted(consumer.partitions_for_topic(spec["topic"]) or [])
    consumer.assign([TopicPartition(spec["topic"], p) for p in partitions])
    consumer.seek_to_beginning()


def consume(spec):
    consumer = KafkaConsumer(
        bootstrap_servers=spec["bootstrap"],
        client_id=spec["client_id"],
        group_id=spec["group"],
        auto_offset_reset="earliest",
        enable_auto_commit=spec["group"] is not None,
    )
    subscribe_or_assign(consumer, spec)
    deadline = time.monotonic() + DEADLINE_S
    got = 0
    while got < spec["count"]:
        if time.monotonic() > deadline:
            sys.exit(f"consumed {got} of {spec['count']} messages in {DEADLINE_S} s")
        for records in consumer.poll(timeout_ms=500).values():
            for message in records[: spec["count"] - got]:
                headers = [part for key, value in message.headers for part in (key, value.decode())]
                record = {"topic": message.topic, "partition": message.partition, "offset": message.offset, "headers": headers}
                print(json.dumps(record), flush=True)
                got += 1
    consumer.close()


def main():
    spec = json.loads(sys.argv[1])
    if spec["role"] == "consume":
        consume(spec)
        return
    producer = make_producer(spec)
    deliveries = produce(producer, spec)
    producer.close()
    for delivered in deliveries:
        print(json.dumps(delivered), flush=True)
    if any(d["error"] for d in deliveries):
        sys.exit(f"not every message was delivered: {deliveries}")


if __name__ == "__main__":
    main()
"#;

/// A Kafka client library (or tool) whose processes the tests trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// confluent-kafka-python on the librdkafka it bundles.
    Confluent,
    /// kafka-python 2.x, pure Python.
    KafkaPython,
    /// kcat on the system librdkafka (Debian's, older than confluent-kafka's).
    Kcat,
}

impl Library {
    /// A paused producer of `produce`. Python clients print one [`Delivery`] per message;
    /// kcat prints nothing.
    pub fn producer(self, kafka: &MockKafka, produce: &Produce) -> PausedKafkaClient {
        match self {
            Library::Kcat => kcat_producer(kafka, produce),
            _ => self.python_client(produce.to_json(kafka)),
        }
    }

    /// A paused consumer of `consume`; it prints one [`Record`] per message, then exits.
    pub fn consumer(self, kafka: &MockKafka, consume: &Consume) -> PausedKafkaClient {
        match self {
            Library::Kcat => kcat_consumer(kafka, consume),
            _ => self.python_client(consume.to_json(kafka)),
        }
    }

    fn python_client(self, spec: Json) -> PausedKafkaClient {
        let files = TempDir::new("kafka-client");
        let (name, source) = self.python_module();
        let script = files.write(&format!("{name}.py"), source);
        let spec = spec.to_string();
        let cmd = [kafka_python().as_os_str(), script.as_os_str(), OsStr::new(&spec)];
        PausedKafkaClient { client: paused_client(&cmd), _files: Some(files) }
    }

    /// (module name, source) of a Python library's client script.
    fn python_module(self) -> (&'static str, &'static str) {
        match self {
            Library::Confluent => ("confluent_client", CONFLUENT_CLIENT),
            Library::KafkaPython => ("kafka_python_client", KAFKA_PYTHON_CLIENT),
            Library::Kcat => panic!("kcat is not a Python library"),
        }
    }
}

/// `kcat -P` of the messages, one per line of a file (`-l`). kcat has no flush per message:
/// `batch.num.messages=1` makes each message its own Produce request instead, and for
/// [`Produce::in_one_request`] a 500 ms linger holds them all (the file is read at once).
fn kcat_producer(kafka: &MockKafka, produce: &Produce) -> PausedKafkaClient {
    let files = TempDir::new("kcat-producer");
    let message = |i: usize| match produce.value_bytes {
        0 => format!("message {i}\n"),
        width => format!("{:x<width$}\n", format!("message {i} ")),
    };
    let lines: String = (0..produce.count).map(message).collect();
    let messages = files.write("messages.txt", lines);
    let mut args = kcat_args(kafka, &produce.client_id);
    args.extend(["-P", "-t", &produce.topic, "-z", produce.compression.name()].map(String::from));
    if let Some(partition) = produce.partition {
        args.extend(["-p".to_string(), partition.to_string()]);
    }
    if let Some(traceparent) = kcat_traceparent(produce) {
        args.extend(["-H".to_string(), format!("traceparent={traceparent}")]);
    }
    let batching = if produce.one_request {
        ["linger.ms=500", "batch.num.messages=100000"]
    } else {
        ["linger.ms=0", "batch.num.messages=1"]
    };
    let mut settings: Vec<String> = batching.map(String::from).to_vec();
    settings.push(format!("acks={}", produce.acks.name()));
    settings.extend(produce.retries.map(|retries| format!("message.send.max.retries={retries}")));
    args.extend(settings.into_iter().flat_map(|setting| ["-X".to_string(), setting]));
    args.extend(["-l".to_string(), messages.display().to_string()]);
    PausedKafkaClient { client: paused_client(&args), _files: Some(files) }
}

/// The one traceparent kcat can give (`-H` applies to every message).
fn kcat_traceparent(produce: &Produce) -> Option<&str> {
    let first = produce.traceparents.first()?;
    let same = produce.traceparents.len() == produce.count && produce.traceparents.iter().all(|t| t == first);
    assert!(same, "kcat gives every message the same headers: {:?}", produce.traceparents);
    Some(first)
}

/// `kcat -C -o beginning -c N -e -J` (all partitions, no group), or the balanced consumer
/// `-G <group> <topic>`; one JSON envelope per message.
fn kcat_consumer(kafka: &MockKafka, consume: &Consume) -> PausedKafkaClient {
    let mut args = kcat_args(kafka, &consume.client_id);
    args.extend(["-o", "beginning", "-c", &consume.count.to_string(), "-e", "-J", "-q"].map(String::from));
    match &consume.group {
        None => args.extend(["-C", "-t", &consume.topic].map(String::from)),
        Some(group) => args.extend(["-X", "auto.offset.reset=earliest", "-G", group, &consume.topic].map(String::from)),
    }
    PausedKafkaClient { client: paused_client(&args), _files: None }
}

/// `kcat -b <bootstrap> -X client.id=<id>`.
fn kcat_args(kafka: &MockKafka, client_id: &str) -> Vec<String> {
    [kcat(), "-b", &kafka.bootstrap(), "-X", &format!("client.id={client_id}")].map(String::from).to_vec()
}

/// A paused Kafka client (see [`paused_client`]) and the files it reads.
pub struct PausedKafkaClient {
    client: PausedClient,
    _files: Option<TempDir>,
}

impl PausedKafkaClient {
    /// The pid the client will run under.
    pub fn pid(&self) -> u32 {
        self.client.pid()
    }

    /// Lets the client run to its end, whatever its exit status.
    pub fn release(self) -> Output {
        self.client.release()
    }

    /// Lets the client run to its end; its stdout (panics with stderr unless it succeeded).
    pub fn run(self) -> String {
        let output = self.release();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        assert!(
            output.status.success(),
            "Kafka client failed ({}):\n{}\n{}",
            output.status,
            text(&output.stdout),
            text(&output.stderr)
        );
        text(&output.stdout)
    }
}

/// The outcome of one produced message, as the Python producers print it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: Option<String>,
    pub partition: Option<i32>,
    /// None (confluent) or -1 (kafka-python) when acks=0 or the message failed.
    pub offset: Option<i64>,
    /// The error's name when the message failed.
    pub error: Option<String>,
}

/// One consumed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == key).map(|(_, value)| value.as_str())
    }
}

/// The [`Delivery`] lines of a producer's stdout.
pub fn parse_deliveries(stdout: &str) -> Vec<Delivery> {
    json_lines(stdout).iter().map(delivery).collect()
}

/// The [`Record`] lines of a consumer's stdout (Python clients and `kcat -J` alike).
pub fn parse_records(stdout: &str) -> Vec<Record> {
    json_lines(stdout).iter().map(record).collect()
}

fn json_lines(stdout: &str) -> Vec<Json> {
    let parse = |line: &str| serde_json::from_str(line).unwrap_or_else(|e| panic!("Kafka client line {line:?}: {e}"));
    stdout.lines().filter(|line| !line.trim().is_empty()).map(parse).collect()
}

fn delivery(json: &Json) -> Delivery {
    Delivery {
        topic: json["topic"].as_str().map(String::from),
        partition: json["partition"].as_i64().map(|p| p as i32),
        offset: json["offset"].as_i64(),
        error: json["error"].as_str().map(String::from),
    }
}

fn record(json: &Json) -> Record {
    let field = |key: &str| json[key].as_i64().unwrap_or_else(|| panic!("no integer {key:?} in {json}"));
    Record {
        topic: json["topic"].as_str().unwrap_or_else(|| panic!("no topic in {json}")).to_string(),
        partition: field("partition") as i32,
        offset: field("offset"),
        headers: header_pairs(&json["headers"]),
    }
}

/// Headers as kcat -J writes them, which the Python clients copy: [key, value, key, value...].
fn header_pairs(flat: &Json) -> Vec<(String, String)> {
    let items: Vec<String> =
        flat.as_array().into_iter().flatten().map(|v| v.as_str().unwrap_or_default().to_string()).collect();
    items.chunks(2).map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default())).collect()
}

/// The service: `GET /produce` produces one message with the client module named by argv[1]
/// (its spec in argv[2]) and flushes before it answers 200 with the delivery as JSON.
const HTTP_SERVICE: &str = r#"
import importlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

client = importlib.import_module(sys.argv[1])
spec = json.loads(sys.argv[2])
producer = None
producer_lock = threading.Lock()


def shared_producer():
    # Made by the first request, so a traced service's Kafka connections are seen from their first byte.
    global producer
    with producer_lock:
        if producer is None:
            producer = client.make_producer(spec)
        return producer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/produce":
            self.reply(404, {"error": "not found"})
            return
        deliveries = client.produce(shared_producer(), spec)
        self.reply(500 if any(d["error"] for d in deliveries) else 200, deliveries[0])


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"#;

/// An HTTP service (Python `ThreadingHTTPServer`) whose `GET /produce` handler produces one
/// message to a topic with a Python [`Library`] and flushes before it answers 200, with the
/// [`Delivery`] as its JSON body. Started untraced (the tests trace it by pid); stopped on drop.
pub struct KafkaHttpService {
    script: ScriptProcess,
    port: u16,
}

impl KafkaHttpService {
    /// Starts the service producing `produce` (its count is ignored: one message per request).
    pub fn start(library: Library, kafka: &MockKafka, produce: &Produce) -> KafkaHttpService {
        let dir = TempDir::new("kafka-service");
        let (module, source) = library.python_module();
        dir.write(&format!("{module}.py"), source);
        dir.write("service.py", HTTP_SERVICE);
        let mut spec = produce.to_json(kafka);
        spec["count"] = json!(1);
        let args = [module.to_string(), spec.to_string()];
        let script = ScriptProcess::spawn(kafka_python(), dir, "service.py", &args, &[]);
        let port = ready_port(&script);
        KafkaHttpService { script, port }
    }

    pub fn pid(&self) -> u32 {
        self.script.pid()
    }

    /// `http://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What the service wrote to stderr (tracebacks, librdkafka logs).
    pub fn stderr(&self) -> String {
        self.script.stderr()
    }
}

/// Reads the `READY <port>` line the service prints once it listens.
fn ready_port(script: &ScriptProcess) -> u16 {
    let line = script.expect_line(MOCK_TIMEOUT);
    line.strip_prefix("READY ")
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected \"READY <port>\", got {line:?}; stderr:\n{}", script.stderr()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_python_and_kcat_records() {
        let stdout = "{\"topic\": \"orders\", \"partition\": 0, \"offset\": 3, \"headers\": [\"traceparent\", \"00-ab-cd-01\"]}\n\
                      {\"topic\":\"orders\",\"partition\":1,\"offset\":0,\"tstype\":\"create\",\"broker\":1,\"key\":null,\"payload\":\"m\"}\n";
        let records = parse_records(stdout);
        assert_eq!(records[0].header("traceparent"), Some("00-ab-cd-01"));
        assert_eq!((records[1].partition, records[1].offset, records[1].headers.len()), (1, 0, 0));
    }

    #[test]
    fn parses_deliveries() {
        let stdout = "{\"topic\": \"t\", \"partition\": 0, \"offset\": 5, \"error\": null}\n\
                      {\"topic\": null, \"partition\": null, \"offset\": null, \"error\": \"UNKNOWN_TOPIC_OR_PARTITION\"}\n";
        let deliveries = parse_deliveries(stdout);
        assert_eq!(deliveries[0].offset, Some(5));
        assert_eq!(deliveries[1].error.as_deref(), Some("UNKNOWN_TOPIC_OR_PARTITION"));
    }
}
