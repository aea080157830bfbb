//! Garbage on traced connections: a traced client sends random bytes, truncated and oversized
//! HTTP heads, invalid UTF-8, byte-at-a-time heads, and bytes that open like PostgreSQL, Kafka,
//! HTTP/2 or TLS and then turn to noise, to a traced server that echoes every byte back. With
//! propagation on (the kernel may insert a header into what the client sends), the agent must
//! not panic, every byte must come back as sent, nothing that is not an HTTP request may become a
//! span, and the agent's memory must stay bounded although more garbage passes than that bound.
//!
//! A request sent afterwards must still give its spans: the agent was tracing all along.
//!
//! The random bytes come from a seed printed at the start; set `ZT_GARBAGE_SEED` to replay one.

use std::time::{Duration, Instant};

use zerotel_tests::footprint::{listening_addresses, peak_rss_kib, rss_kib};
use zerotel_tests::process::ScriptProcess;
use zerotel_tests::servers::python_interpreter;
use zerotel_tests::util::{http_get, is_valid_hex_id, TempDir};
use zerotel_tests::{
    describe, propagating_pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer,
    ReceivedSpan, SpanKind, SPAN_TIMEOUT,
};

/// The agent's peak resident memory may not pass this. Idle it holds about 30 MiB (16 MiB of it
/// the ring buffer, mapped twice), and its own buffers are bounded per connection (a Kafka frame
/// at most 8 MiB, HTTP heads 1 KiB); the corpus pushes well over this many bytes through the
/// traced connections ([`MIN_GARBAGE_BYTES`]), so an agent that kept garbage would pass it.
const RSS_BOUND_KIB: u64 = 96 * 1024;
/// The corpus holds at least this much, so keeping it would break [`RSS_BOUND_KIB`].
const MIN_GARBAGE_BYTES: usize = 128 << 20;
/// Where spans for requests with odd but complete heads may name (see [`Expect::MaySpan`]).
const HOSTILE_PREFIX: &str = "/hostile/";
/// How long one case (send, echo, close) may take.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// After the marker's spans arrived, how long to wait for late spans of the garbage connections.
const SETTLE: Duration = Duration::from_secs(3);

/// A TCP server that echoes every byte it reads on each connection, then closes when the client
/// does.
const ECHO_SERVER: &str = r#"
import socket
import threading


def echo(conn):
    with conn:
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            conn.sendall(data)


listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(128)
print("READY", listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"#;

/// Commands on stdin, one answer line each:
/// `case <file> <mode>`: one connection to the echo server; sends the file's bytes (`whole`: one
/// sendall; `bytewise:<ms>`: one byte per send, with TCP_NODELAY; `chunks:<n>`), half-closes,
/// reads everything back into `<file>.echo`, prints `{"case": .., "error": ..}`.
/// `get <url>`: one urllib GET, prints the status.
const ECHO_CLIENT: &str = r#"
import json
import os
import socket
import sys
import threading
import time
import urllib.request

PORT = int(sys.argv[1])
DIR = sys.argv[2]


def send(sock, data, mode):
    if mode == "whole":
        sock.sendall(data)
    elif mode.startswith("bytewise:"):
        delay = int(mode.split(":")[1]) / 1000
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
            time.sleep(delay)
    elif mode.startswith("chunks:"):
        size = int(mode.split(":")[1])
        for i in range(0, len(data), size):
            sock.sendall(data[i:i + size])
    else:
        raise ValueError(mode)
    sock.shutdown(socket.SHUT_WR)


def run_case(name, mode):
    with open(os.path.join(DIR, name), "rb") as f:
        data = f.read()
    errors = []
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=60)

    def sender():
        try:
            send(sock, data, mode)
        except Exception as error:
            errors.append(repr(error))

    thread = threading.Thread(target=sender)
    thread.start()
    chunks = []
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except Exception as error:
        errors.append(repr(error))
    thread.join()
    sock.close()
    with open(os.path.join(DIR, name + ".echo"), "wb") as f:
        f.write(b"".join(chunks))
    print(json.dumps({"case": name, "error": errors[0] if errors else None}), flush=True)


for line in sys.stdin:
    command, *args = line.split()
    if command == "case":
        run_case(*args)
    elif command == "get":
        with urllib.request.urlopen(args[0], timeout=10) as response:
            response.read()
            print(response.status, flush=True)
"#;

// ---------------------------------------------------------------------------------------------
// The corpus.

/// What the agent may make of a case.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Not an HTTP request (nor any protocol message the agent reports): no span at all.
    NoSpan,
    /// A head that is odd but may be a request (complete, or longer than the 1 KiB the kernel
    /// captures of a head, so its end is out of sight): a span is allowed, for its
    /// `/hostile/...` path only.
    MaySpan,
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    /// How the client writes it (see [`ECHO_CLIENT`]).
    mode: &'static str,
    expect: Expect,
}

fn case(name: &str, bytes: Vec<u8>, mode: &'static str, expect: Expect) -> Case {
    Case {
        name: name.to_string(),
        bytes,
        mode,
        expect,
    }
}

/// SplitMix64: reproducible bytes from a seed.
struct Noise(u64);

impl Noise {
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn random_cases(noise: &mut Noise) -> Vec<Case> {
    let mut cases: Vec<Case> = [1, 7, 8, 100, 4096, 1 << 20]
        .iter()
        .map(|&len| {
            case(
                &format!("random-{len}"),
                noise.bytes(len),
                "whole",
                Expect::NoSpan,
            )
        })
        .collect();
    cases.push(case(
        "random-chunked-1mib",
        noise.bytes(1 << 20),
        "chunks:1000",
        Expect::NoSpan,
    ));
    cases.push(case(
        "zeros-64kib",
        vec![0; 64 << 10],
        "whole",
        Expect::NoSpan,
    ));
    cases.push(case(
        "blank-lines",
        b"\r\n".repeat(32 << 10),
        "whole",
        Expect::NoSpan,
    ));
    cases
}

fn http_cases(noise: &mut Noise) -> Vec<Case> {
    let long_value = "a".repeat(64 << 10);
    vec![
        case("method-only", b"GET ".to_vec(), "whole", Expect::NoSpan),
        case("cut-request-line", b"GET /garbage/cut-request-line HTT".to_vec(), "whole", Expect::NoSpan),
        case(
            "cut-headers",
            b"GET /garbage/cut-headers HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\nX-Cut: val".to_vec(),
            "whole",
            Expect::NoSpan,
        ),
        case(
            "cut-post",
            b"POST /garbage/cut-post HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n".to_vec(),
            "whole",
            Expect::NoSpan,
        ),
        case(
            "slowloris-unfinished",
            b"GET /garbage/slowloris HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\nX-A: 1\r\nX-B: 2\r\n".to_vec(),
            "bytewise:2",
            Expect::NoSpan,
        ),
        case("utf8-method", b"G\xc3\x28T /garbage/utf8-method HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(), "whole", Expect::NoSpan),
        case("binary-method", concat(&[b"\xff\xfe\xfd\xfc /garbage HTTP/1.1\r\n\r\n", &noise.bytes(200)]), "whole", Expect::NoSpan),
        case("long-path-no-version", concat(&[b"GET /", "p".repeat(8 << 10).as_bytes()]), "whole", Expect::NoSpan),
        case(
            "long-header-complete",
            format!("GET /hostile/long-header HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: {long_value}\r\n\r\n").into_bytes(),
            "whole",
            Expect::MaySpan,
        ),
        case(
            "long-header-unfinished",
            format!("GET /hostile/long-header-unfinished HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: {long_value}").into_bytes(),
            "whole",
            Expect::MaySpan,
        ),
        case("utf8-path", b"GET /hostile/\xc3\x28\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(), "whole", Expect::MaySpan),
        case(
            "utf8-headers",
            b"GET /hostile/utf8-headers HTTP/1.1\r\nHost: \xff\xfe.example\r\nX-Bin: \xc3\x28\xff\r\ntraceparent: 00-\xff\xfe\r\n\r\n".to_vec(),
            "whole",
            Expect::MaySpan,
        ),
        case(
            "bad-traceparent",
            format!("GET /hostile/bad-traceparent HTTP/1.1\r\nHost: 127.0.0.1\r\ntraceparent: 00-{}\r\n\r\n", "f".repeat(300))
                .into_bytes(),
            "whole",
            Expect::MaySpan,
        ),
        case("many-headers", many_headers(), "whole", Expect::MaySpan),
        case(
            "slowloris-complete",
            b"GET /hostile/slowloris HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n\r\n".to_vec(),
            "bytewise:2",
            Expect::MaySpan,
        ),
        case(
            "body-then-noise",
            concat(&[b"POST /hostile/body-then-noise HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello", &noise.bytes(64 << 10)]),
            "whole",
            Expect::MaySpan,
        ),
    ]
}

fn many_headers() -> Vec<u8> {
    let mut head = String::from("GET /hostile/many-headers HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for i in 0..500 {
        head.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// PostgreSQL: a valid StartupMessage, then a Query claiming ~2 GiB; a startup claiming a huge
/// length.
fn postgres_cases(noise: &mut Noise) -> Vec<Case> {
    let params = b"user\0postgres\0database\0app\0\0";
    let startup_len = (8 + params.len()) as u32;
    let startup = concat(&[
        &startup_len.to_be_bytes(),
        &196_608u32.to_be_bytes(),
        params,
    ]);
    let huge_query = concat(&[b"Q", &0x7fff_fff0u32.to_be_bytes()]);
    vec![
        case(
            "postgres-huge-query",
            concat(&[&startup, &huge_query, &noise.bytes(64 << 20)]),
            "whole",
            Expect::NoSpan,
        ),
        case(
            "postgres-huge-startup",
            concat(&[
                &0x7fff_ffffu32.to_be_bytes(),
                &196_608u32.to_be_bytes(),
                &noise.bytes(64 << 10),
            ]),
            "whole",
            Expect::NoSpan,
        ),
    ]
}

/// Kafka: a Produce v9 header in a frame claiming 60 MiB, then noise (the agent buffers at most
/// 8 MiB of a frame); a Metadata header whose frame ends inside its client id.
fn kafka_cases(noise: &mut Noise) -> Vec<Case> {
    let produce = concat(&[
        &(60u32 << 20).to_be_bytes(),
        &0u16.to_be_bytes(),
        &9u16.to_be_bytes(),
        &1u32.to_be_bytes(),
        &5u16.to_be_bytes(),
        b"noise",
    ]);
    let metadata = concat(&[
        &12u32.to_be_bytes(),
        &3u16.to_be_bytes(),
        &12u16.to_be_bytes(),
        &7u32.to_be_bytes(),
        &0x7fffu16.to_be_bytes(),
        b"ab",
    ]);
    vec![
        case(
            "kafka-huge-produce",
            concat(&[&produce, &noise.bytes(64 << 20)]),
            "whole",
            Expect::NoSpan,
        ),
        case(
            "kafka-cut-client-id",
            concat(&[&metadata, &noise.bytes(4096)]),
            "whole",
            Expect::NoSpan,
        ),
    ]
}

/// HTTP/2: the client preface, then noise; then a HEADERS frame whose block uses index 0 (an
/// HPACK error); then a frame claiming 16 MiB.
fn http2_cases(noise: &mut Noise) -> Vec<Case> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let block = concat(&[&[0x80], &noise.bytes(31)]);
    let headers = concat(&[&[0, 0, block.len() as u8, 1, 0x5, 0, 0, 0, 1], &block]);
    let huge_frame = [0xffu8, 0xff, 0xff, 0, 0, 0, 0, 0, 1];
    vec![
        case(
            "h2-preface-then-noise",
            concat(&[PREFACE, &noise.bytes(4096)]),
            "whole",
            Expect::NoSpan,
        ),
        case(
            "h2-bad-hpack",
            concat(&[PREFACE, &settings, &headers]),
            "whole",
            Expect::NoSpan,
        ),
        case(
            "h2-huge-frame",
            concat(&[PREFACE, &settings, &huge_frame, &noise.bytes(64 << 10)]),
            "whole",
            Expect::NoSpan,
        ),
    ]
}

/// A TLS handshake record header, then noise.
fn tls_cases(noise: &mut Noise) -> Vec<Case> {
    vec![case(
        "tls-record-then-noise",
        concat(&[&[0x16, 3, 1, 2, 0], &noise.bytes(1024)]),
        "whole",
        Expect::NoSpan,
    )]
}

fn corpus(seed: u64) -> Vec<Case> {
    let mut noise = Noise(seed);
    let mut cases = random_cases(&mut noise);
    cases.extend(http_cases(&mut noise));
    cases.extend(postgres_cases(&mut noise));
    cases.extend(kafka_cases(&mut noise));
    cases.extend(http2_cases(&mut noise));
    cases.extend(tls_cases(&mut noise));
    cases
}

fn seed() -> u64 {
    match std::env::var("ZT_GARBAGE_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|e| panic!("ZT_GARBAGE_SEED={text:?}: {e}")),
        Err(_) => rand::random(),
    }
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// The `traceparent` the agent inserts, `00-<trace id>-<span id>-<flags>`.
fn is_traceparent_value(value: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && is_valid_hex_id(parts[1], 32)
        && is_valid_hex_id(parts[2], 16)
        && parts[3].len() == 2
}

/// Whether `echoed` is `sent` with one `traceparent` header line inserted after the request
/// line: what propagation does, by design, to a send that opens with an HTTP/1 request line.
fn is_sent_plus_http1_header(sent: &[u8], echoed: &[u8]) -> bool {
    let Some(line_end) = sent.windows(2).position(|w| w == b"\r\n").map(|i| i + 2) else {
        return false;
    };
    let Some(inserted) = echoed.len().checked_sub(sent.len()) else {
        return false;
    };
    if echoed[..line_end] != sent[..line_end] || echoed[line_end + inserted..] != sent[line_end..] {
        return false;
    }
    let line = &echoed[line_end..line_end + inserted];
    line.strip_prefix(b"traceparent: ")
        .and_then(|l| l.strip_suffix(b"\r\n"))
        .is_some_and(is_traceparent_value)
}

/// Whether `echoed` is `sent` with a `traceparent` field appended to the block of its first
/// HTTP/2 HEADERS frame, and that frame's length grown to match: what propagation does, by
/// design, to the frame that opens a stream, whatever the block before it holds.
fn is_sent_plus_h2_field(sent: &[u8], echoed: &[u8]) -> bool {
    const PREFACE_LEN: usize = 24;
    const HEADERS: u8 = 1;
    let mut at = PREFACE_LEN;
    while let Some(header) = sent.get(at..at + 9) {
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        if header[3] != HEADERS {
            at += 9 + len;
            continue;
        }
        let Some(inserted) = echoed.len().checked_sub(sent.len()) else {
            return false;
        };
        let (payload_end, grown) = (at + 9 + len, (len + inserted) as u32);
        let same_header = echoed
            .get(at..at + 9)
            .is_some_and(|h| h[..3] == grown.to_be_bytes()[1..] && h[3..] == header[3..]);
        let same_elsewhere = echoed[..at] == sent[..at]
            && echoed.get(at + 9..payload_end) == sent.get(at + 9..payload_end)
            && echoed.get(payload_end + inserted..) == sent.get(payload_end..);
        let field = echoed.get(payload_end..payload_end + inserted);
        return same_header && same_elsewhere && field.is_some_and(is_traceparent_field);
    }
    false
}

/// An HPACK literal field without indexing, new name `traceparent`, plain (not Huffman) strings.
fn is_traceparent_field(field: &[u8]) -> bool {
    let Some(rest) = field.strip_prefix(b"\x00\x0btraceparent") else {
        return false;
    };
    rest.split_first()
        .is_some_and(|(&len, value)| usize::from(len) == value.len() && is_traceparent_value(value))
}

/// Where the first difference is, for a failure message.
fn first_difference(sent: &[u8], echoed: &[u8]) -> String {
    let at = sent
        .iter()
        .zip(echoed)
        .position(|(a, b)| a != b)
        .unwrap_or(sent.len().min(echoed.len()));
    let show = |bytes: &[u8]| {
        String::from_utf8_lossy(&bytes[at.min(bytes.len())..(at + 40).min(bytes.len())])
            .into_owned()
    };
    format!(
        "sent {} bytes, got {} back; first difference at {at}: sent {:?}, got {:?}",
        sent.len(),
        echoed.len(),
        show(sent),
        show(echoed)
    )
}

/// Spans of the echo server, and CLIENT spans of the client towards it.
fn echo_spans(
    spans: &[ReceivedSpan],
    server_pid: u32,
    client_pid: u32,
    echo_port: u16,
) -> Vec<ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.pid() == Some(server_pid)
                || (s.pid() == Some(client_pid)
                    && s.attr_int("server.port") == Some(i64::from(echo_port)))
        })
        .cloned()
        .collect()
}

fn agent_healthz(agent: &Agent) -> u16 {
    let listen = listening_addresses(agent.pid());
    let addr = listen
        .first()
        .unwrap_or_else(|| panic!("the agent listens nowhere"));
    http_get(*addr, "/healthz")
        .unwrap_or_else(|e| panic!("GET /healthz: {e}"))
        .status
}

#[test]
fn garbage_never_breaks_the_agent_nor_the_bytes() {
    if !require_kernel() {
        return;
    }
    let seed = seed();
    eprintln!("garbage seed: {seed} (replay with ZT_GARBAGE_SEED={seed})");
    let cases = corpus(seed);
    let total: usize = cases.iter().map(|c| c.bytes.len()).sum();
    assert!(
        total >= MIN_GARBAGE_BYTES,
        "the corpus ({total} bytes) must exceed the memory bound it tests"
    );

    let files = TempDir::new("garbage");
    for case in &cases {
        let names_hostile_path = case
            .bytes
            .windows(HOSTILE_PREFIX.len())
            .any(|w| w == HOSTILE_PREFIX.as_bytes());
        assert_eq!(
            names_hostile_path,
            case.expect == Expect::MaySpan,
            "case {}: only cases that may give a span name {HOSTILE_PREFIX}",
            case.name
        );
        files.write(&case.name, &case.bytes);
    }
    let echo_dir = TempDir::new("echo-server");
    echo_dir.write("echo.py", ECHO_SERVER);
    let echo = ScriptProcess::spawn(python_interpreter(), echo_dir, "echo.py", &[], &[]);
    let echo_port: u16 = echo
        .expect_line(Duration::from_secs(15))
        .strip_prefix("READY ")
        .and_then(|p| p.trim().parse().ok())
        .expect("READY <port>");
    let web = PyServer::start("web.py");
    let client_dir = TempDir::new("echo-client");
    client_dir.write("client.py", ECHO_CLIENT);
    let client_args = [echo_port.to_string(), files.path().display().to_string()];
    let mut client = ScriptProcess::spawn(
        python_interpreter(),
        client_dir,
        "client.py",
        &client_args,
        &[],
    );

    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(
        &propagating_pid_args(&[echo.pid(), client.pid(), web.pid()]),
        Some(&receiver),
    );
    let idle_rss = rss_kib(agent.pid());

    let started = Instant::now();
    let mut injected = Vec::new();
    for case in &cases {
        client.send_line(&format!("case {} {}", case.name, case.mode));
        let answer: serde_json::Value =
            serde_json::from_str(&client.expect_line(CASE_TIMEOUT)).expect("client answers JSON");
        assert!(
            answer["error"].is_null(),
            "case {}: the client failed: {answer}",
            case.name
        );
        let echoed = std::fs::read(files.join(&format!("{}.echo", case.name))).expect("echo file");
        if echoed != case.bytes {
            assert!(
                is_sent_plus_http1_header(&case.bytes, &echoed)
                    || is_sent_plus_h2_field(&case.bytes, &echoed),
                "case {}: bytes changed in transit: {}",
                case.name,
                first_difference(&case.bytes, &echoed)
            );
            injected.push(case.name.clone());
        }
    }
    eprintln!(
        "{} cases, {} MiB each way, in {:?}; traceparent inserted into {injected:?}",
        cases.len(),
        total >> 20,
        started.elapsed()
    );

    // A well-formed request afterwards: its spans prove the agent traced through the garbage.
    let marker = web.url("/users/424242");
    client.send_line(&format!("get {marker}"));
    assert_eq!(
        client.expect_line(CASE_TIMEOUT),
        "200",
        "the marker request failed"
    );
    let (web_pid, client_pid) = (web.pid(), client.pid());
    receiver.wait_for(
        |spans| {
            spans
                .iter()
                .any(|s| s.is(SpanKind::Server, web_pid, "/users/424242"))
                && spans
                    .iter()
                    .any(|s| s.is(SpanKind::Client, client_pid, "/users/424242"))
        },
        SPAN_TIMEOUT,
    );
    std::thread::sleep(SETTLE);

    let spans = echo_spans(&receiver.spans(), echo.pid(), client_pid, echo_port);
    let strays: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            !s.attr_str("url.path")
                .is_some_and(|p| p.starts_with(HOSTILE_PREFIX))
        })
        .cloned()
        .collect();
    let allowed: Vec<String> = spans
        .iter()
        .map(|s| format!("{:?} {:?}", s.kind, s.name))
        .collect();
    eprintln!("spans for odd heads (allowed): {allowed:?}");
    assert!(
        strays.is_empty(),
        "spans made of garbage:\n{}",
        describe(&strays)
    );

    let pid = agent.pid();
    let peak = peak_rss_kib(pid);
    eprintln!(
        "agent RSS: {} MiB idle, peak {} MiB, now {} MiB",
        idle_rss / 1024,
        peak / 1024,
        rss_kib(pid) / 1024
    );
    assert!(
        peak < RSS_BOUND_KIB,
        "agent peak RSS {peak} KiB passed the bound {RSS_BOUND_KIB} KiB"
    );
    assert_eq!(
        agent_healthz(&agent),
        200,
        "agent unhealthy after the garbage"
    );
    assert_eq!(
        agent.metric_sum("zerotel_export_errors_total"),
        0,
        "exports failed:\n{}",
        agent.metrics()
    );
    // Each case is at least an open, data and a close on both ends: the kernel did report them.
    let traffic = agent.metric_sum("zerotel_kernel_traffic_events_total");
    assert!(
        traffic >= 2 * cases.len() as u64,
        "only {traffic} kernel traffic events for {} connections",
        cases.len()
    );
    let output = agent.stop_with_output();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stderr.contains("panicked"),
        "agent exit {}; stderr:\n{stderr}",
        output.status
    );
}

#[test]
fn recognises_only_the_agents_own_insertions() {
    let value = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01";
    let sent = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    let with_header = format!("GET / HTTP/1.1\r\ntraceparent: {value}\r\nHost: a\r\n");
    assert!(is_sent_plus_http1_header(&sent, with_header.as_bytes()));
    let elsewhere = format!("GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {value}\r\n");
    assert!(!is_sent_plus_http1_header(&sent, elsewhere.as_bytes()));

    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let block = [0x82u8, 0x84];
    let sent = [&preface[..], &[0, 0, 2, 1, 5, 0, 0, 0, 1], &block].concat();
    let field = [&b"\x00\x0btraceparent\x37"[..], value.as_bytes()].concat();
    let grown = [
        &preface[..],
        &[0, 0, 2 + field.len() as u8, 1, 5, 0, 0, 0, 1],
        &block,
        &field,
    ]
    .concat();
    assert!(is_sent_plus_h2_field(&sent, &grown));
    let unchanged_length = [&preface[..], &[0, 0, 2, 1, 5, 0, 0, 0, 1], &block, &field].concat();
    assert!(!is_sent_plus_h2_field(&sent, &unchanged_length));
}
