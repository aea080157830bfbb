//! HTTP/2 and gRPC spans: one span per stream, gRPC calls named `{rpc.service}/{rpc.method}`,
//! against real peers: grpcio (Python, gRPC C core) and grpc-go 1.33 servers and clients of the
//! raw-bytes service `demo.Echo`, nghttpd with curl, nghttp and h2load, and a chain curl ->
//! HTTP/1 service -> Go gRPC -> Python gRPC.
//!
//! Span counts are exact: every client call is one HTTP/2 stream on each side, and every
//! process traced here makes no other requests.
//!
//! The `fixture_*` tests need no agent: they check the servers, clients and tools themselves.
//! The other tests are a draft of the agent's HTTP/2 support: ignored until the agent parses
//! HTTP/2 (run them with `-- --ignored`); `a_request_through_the_chain_is_one_trace` also needs
//! traceparent injection into HPACK.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use zerotel_tests::grpc::{
    h2c_curl, h2c_curl_args, h2load_args, parse_front_response, run_h2load, run_nghttp, Code, Concurrency, Downstream,
    GoH2cServer, GrpcCall, GrpcChain, GrpcServer, HttpFront, Nghttpd, Payload, ReceivedRequest, Runtime, ServerOptions,
    NGHTTPD_LARGE_FILE_SIZE,
};
use zerotel_tests::util::{random_span_id, random_trace_id};
use zerotel_tests::{
    describe, paused_client, pid_args, propagating_pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer,
    ReceivedSpan, SpanKind, SPAN_TIMEOUT,
};

/// How long to keep listening for spans beyond the expected ones, to assert exact counts.
const EXTRA_SPANS_WAIT: Duration = Duration::from_millis(1500);

const MIB: usize = 1 << 20;

/// An upstream span context, as an instrumented caller would send it in metadata.
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

/// One call of each kind, all OK.
fn every_call_kind() -> Vec<GrpcCall> {
    vec![
        GrpcCall::unary(Payload::text("hello")),
        GrpcCall::server_stream(3),
        GrpcCall::client_stream(vec![Payload::text("a"), Payload::Filler(100), Payload::text("c")]),
        GrpcCall::bidi(vec![Payload::text("ping 1"), Payload::text("ping 2"), Payload::text("ping 3")]),
    ]
}

/// Every (client, server) pairing of the two runtimes.
fn runtime_pairs() -> Vec<(Runtime, Runtime)> {
    Runtime::ALL.iter().flat_map(|&client| Runtime::ALL.iter().map(move |&server| (client, server))).collect()
}

fn peers(received: &[ReceivedRequest]) -> BTreeSet<String> {
    received.iter().map(|r| r.peer.clone()).collect()
}

// ---- the fixtures themselves (no agent) ----

#[test]
fn fixture_every_call_kind_works_between_both_runtimes() {
    let servers = [GrpcServer::python(), GrpcServer::go()];
    for (client, server_runtime) in runtime_pairs() {
        let server = servers.iter().find(|s| s.runtime() == server_runtime).expect("server");
        let before = server.received().len();
        let mut calls = every_call_kind();
        calls.push(GrpcCall::server_stream_failing(2, Code::Internal));
        calls.push(GrpcCall::fail(Code::Unavailable));
        calls.push(GrpcCall::unimplemented("Missing"));
        let results = client.call(&server.target(), &calls, Concurrency::Sequential);
        let what = format!("{client:?} client -> {server_runtime:?} server");
        let summary: Vec<(i64, usize, bool)> = results.iter().map(|r| (r.code, r.replies, r.echoed)).collect();
        assert_eq!(
            summary,
            [(0, 1, true), (0, 3, false), (0, 1, false), (0, 3, true), (13, 2, false), (14, 0, false), (12, 0, false)],
            "{what}: {results:#?}\nserver stderr:\n{}",
            server.stderr()
        );
        assert_eq!(results[1].first_reply.as_deref(), Some("reply 0"), "{what}");
        assert_eq!(results[2].first_reply.as_deref(), Some(r#"{"messages": 3, "bytes": 102}"#), "{what}");
        assert_eq!(results[5].details, "failed with status 14", "{what}");
        // The server logs every implemented call, all from one connection.
        let received = &server.wait_received(before + 6)[before..];
        let methods: Vec<(&str, i64)> = received.iter().map(|r| (r.method.as_str(), r.code)).collect();
        assert_eq!(
            methods,
            [
                ("/demo.Echo/Unary", 0),
                ("/demo.Echo/ServerStream", 0),
                ("/demo.Echo/ClientStream", 0),
                ("/demo.Echo/BidiStream", 0),
                ("/demo.Echo/ServerStream", 13),
                ("/demo.Echo/Fail", 14),
            ],
            "{what}"
        );
        assert_eq!(peers(received).len(), 1, "{what}: one channel, one connection: {received:?}");
    }
}

#[test]
fn fixture_every_status_code_comes_back() {
    let servers = [GrpcServer::python(), GrpcServer::go()];
    let calls: Vec<GrpcCall> = Code::ALL.iter().map(|&code| GrpcCall::fail(code)).collect();
    for (client, server_runtime) in runtime_pairs() {
        let server = servers.iter().find(|s| s.runtime() == server_runtime).expect("server");
        let results = client.call(&server.target(), &calls, Concurrency::Sequential);
        let codes: Vec<i64> = results.iter().map(|r| r.code).collect();
        assert_eq!(codes, (0..17).collect::<Vec<i64>>(), "{client:?} -> {server_runtime:?}: {results:#?}");
    }
}

#[test]
fn fixture_large_messages_round_trip() {
    for server in [GrpcServer::python(), GrpcServer::go()] {
        for client in Runtime::ALL {
            let calls = [
                GrpcCall::unary(Payload::Filler(MIB)),
                GrpcCall::bidi(vec![Payload::Filler(MIB), Payload::text("small"), Payload::Filler(3 * MIB)]),
                GrpcCall::client_stream(vec![Payload::Filler(2 * MIB), Payload::Filler(MIB)]),
            ];
            let results = client.call(&server.target(), &calls, Concurrency::Sequential);
            let what = format!("{client:?} -> {:?}", server.runtime());
            assert!(results[0].echoed && results[0].reply_bytes == MIB, "{what}: {results:?}");
            assert!(results[1].echoed && results[1].replies == 3, "{what}: {results:?}");
            assert_eq!(results[2].first_reply.as_deref(), Some(r#"{"messages": 2, "bytes": 3145728}"#), "{what}");
        }
    }
}

#[test]
fn fixture_concurrent_calls_share_one_connection() {
    const CALLS: usize = 16;
    const DELAY: Duration = Duration::from_millis(400);
    for (client, server) in [(Runtime::Python, GrpcServer::go()), (Runtime::Go, GrpcServer::python())] {
        let calls: Vec<GrpcCall> =
            (0..CALLS).map(|i| GrpcCall::unary(Payload::Text(format!("call {i}"))).delayed(DELAY)).collect();
        let started = Instant::now();
        let results = client.call(&server.target(), &calls, Concurrency::Concurrent);
        let elapsed = started.elapsed();
        let what = format!("{client:?} -> {:?}", server.runtime());
        assert!(results.iter().all(|r| r.code == 0 && r.echoed), "{what}: {results:?}");
        assert!(results.iter().all(|r| r.elapsed >= DELAY), "{what}: every call waited in the handler");
        // One at a time they would take 16 x 400 ms.
        assert!(elapsed < DELAY * 8, "{what}: the calls did not overlap ({elapsed:?})");
        let received = server.wait_received(CALLS);
        assert_eq!(peers(&received).len(), 1, "{what}: multiplexed on one connection: {received:?}");
    }
}

#[test]
fn fixture_traceparent_metadata_reaches_the_server_and_is_echoed() {
    let first = Upstream::new().traceparent();
    let second = Upstream::new().traceparent();
    for server_runtime in Runtime::ALL {
        let server = server_runtime.server(&ServerOptions::new().echoing_metadata());
        for client in Runtime::ALL {
            let before = server.received().len();
            let calls = [
                GrpcCall::unary(Payload::text("a")).with_traceparent(&first),
                GrpcCall::unary(Payload::text("b")).with_traceparent(&first),
                GrpcCall::unary(Payload::text("c")).with_traceparent(&second),
                GrpcCall::server_stream(2).with_traceparent(&second),
                GrpcCall::fail(Code::Internal).with_traceparent(&first),
                GrpcCall::unary(Payload::text("none")),
            ];
            let results = client.call(&server.target(), &calls, Concurrency::Sequential);
            let what = format!("{client:?} -> {server_runtime:?}");
            let echoed: Vec<Vec<String>> = results.iter().map(|r| r.echo_traceparent.clone()).collect();
            let sent = [vec![first.clone()], vec![first.clone()], vec![second.clone()], vec![second.clone()]];
            assert_eq!(echoed[..4], sent, "{what}: {results:?}");
            assert_eq!(echoed[4], [first.as_str()], "{what}: echoed on a failed call too");
            assert!(echoed[5].is_empty(), "{what}");
            let received: Vec<Vec<String>> =
                server.wait_received(before + 6)[before..].iter().map(|r| r.traceparent.clone()).collect();
            assert_eq!(received[..4], sent, "{what}");
        }
    }
}

#[test]
fn fixture_a_deadline_ends_the_call_on_both_sides() {
    for server in [GrpcServer::python(), GrpcServer::go()] {
        for client in Runtime::ALL {
            let before = server.received().len();
            let calls = [GrpcCall::slow(Duration::from_millis(600)).with_timeout(Duration::from_millis(150))];
            let results = client.call(&server.target(), &calls, Concurrency::Sequential);
            let what = format!("{client:?} -> {:?}", server.runtime());
            assert_eq!(results[0].code(), Some(Code::DeadlineExceeded), "{what}: {results:?}");
            assert!(results[0].elapsed < Duration::from_millis(600), "{what}: the client gave up first");
            // The server's own timer (from grpc-timeout) and the client's RST_STREAM race: the
            // handler sees its context end with either.
            let received = server.wait_received(before + 1);
            let seen = [Code::DeadlineExceeded.value(), Code::Cancelled.value()];
            assert!(seen.contains(&received[before].code), "{what}: {received:?}");
        }
    }
}

#[test]
fn fixture_servers_call_their_downstream() {
    let python = GrpcServer::python();
    let go = GrpcServer::start(Runtime::Go, &ServerOptions::new().calling(Downstream::Grpc(python.target())));
    let results =
        Runtime::Python.call(&go.target(), &[GrpcCall::unary(Payload::text("via go"))], Concurrency::Sequential);
    assert_eq!((results[0].code, results[0].first_reply.as_deref()), (0, Some("via go")), "{}", go.stderr());
    assert_eq!(python.wait_received(1)[0].method, "/demo.Echo/Unary");

    let http = PyServer::start("backend.py");
    for runtime in Runtime::ALL {
        let ok = runtime.server(&ServerOptions::new().calling(Downstream::Http(http.url("/users/1"))));
        let failing = runtime.server(&ServerOptions::new().calling(Downstream::Http(http.url("/error"))));
        let call = [GrpcCall::unary(Payload::text("x"))];
        assert_eq!(Runtime::Go.call(&ok.target(), &call, Concurrency::Sequential)[0].code, 0, "{runtime:?}");
        let failed = &Runtime::Go.call(&failing.target(), &call, Concurrency::Sequential)[0];
        assert_eq!(failed.code(), Some(Code::Unavailable), "{runtime:?}: {failed:?}");
        assert_eq!(failed.details, "downstream HTTP 500", "{runtime:?}");
    }

    // An unreachable gRPC downstream: its status becomes the server's.
    let port = zerotel_tests::util::free_port();
    for runtime in Runtime::ALL {
        let server = runtime.server(&ServerOptions::new().calling(Downstream::Grpc(format!("127.0.0.1:{port}"))));
        let calls = [GrpcCall::unary(Payload::text("x"))];
        let result = &Runtime::Python.call(&server.target(), &calls, Concurrency::Sequential)[0];
        assert_eq!(result.code(), Some(Code::Unavailable), "{runtime:?}: {result:?}");
        assert!(result.details.starts_with("downstream: "), "{runtime:?}: {result:?}");
    }
}

/// Established TCP connections of process `pid` (its socket fds in /proc/net/tcp{,6}, state 01).
fn established_tcp_connections(pid: u32) -> usize {
    let inodes: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| text.lines().skip(1).map(String::from).collect::<Vec<_>>())
        .filter(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            fields.get(3) == Some(&"01") && fields.get(9).is_some_and(|inode| inodes.contains(*inode))
        })
        .count()
}

#[test]
fn fixture_chain_answers_end_to_end_and_connects_only_on_demand() {
    let chain = GrpcChain::start();
    for pid in chain.pids() {
        assert_eq!(established_tcp_connections(pid), 0, "pid {pid} connected before its first request");
    }
    let response = chain.request("hello");
    assert_eq!((response.code, response.reply.as_deref()), (0, Some("hello")), "{response:?}\n{}", chain.stderr());
    assert!(response.echo_traceparent.is_empty(), "nothing instruments the hops: {response:?}");
    assert_eq!(established_tcp_connections(chain.front.pid()), 1, "the front keeps its channel to Go");
    assert_eq!(established_tcp_connections(chain.python.pid()), 1, "the Python server: the one from Go");
    assert_eq!(established_tcp_connections(chain.go.pid()), 2, "the Go server: from the front, to Python");

    // A traced curl would be paused: the same command, released.
    let upstream = Upstream::new();
    let mut cmd = chain.curl_cmd("again");
    cmd.extend(["-H".to_string(), format!("traceparent: {}", upstream.traceparent())]);
    let response = parse_front_response(&paused_client(&cmd).release());
    assert_eq!((response.code, response.reply.as_deref()), (0, Some("again")), "{response:?}");
    let front = chain.front.wait_received(2);
    assert_eq!(front[1].traceparent, [upstream.traceparent()], "{front:?}");
    assert_eq!(front.iter().map(|r| (r.method.as_str(), r.code)).collect::<Vec<_>>(), [("GET /call", 200); 2]);
    // Uninstrumented, the hops do not forward the context.
    for hop in [&chain.go, &chain.python] {
        let received = hop.wait_received(2);
        assert!(received.iter().all(|r| r.traceparent.is_empty() && r.code == 0), "{received:?}");
        assert_eq!(peers(&received).len(), 1, "each hop reuses its downstream channel: {received:?}");
    }
}

#[test]
fn fixture_nghttpd_serves_curl_nghttp_and_h2load() {
    let nghttpd = Nghttpd::start();
    assert_eq!(h2c_curl(&nghttpd.url("/index.html"), &[]).status, 200, "{}", nghttpd.log());
    assert_eq!(h2c_curl(&nghttpd.url("/missing"), &[]).status, 404);
    let args = h2c_curl_args(
        &nghttpd.url("/large.bin"),
        &["-H", "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
    );
    let output = paused_client(&args).release();
    zerotel_tests::grpc::assert_h2c_curl_spoke_http2(&output);
    let sizes = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &nghttpd.url("/large.bin"),
        ])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&sizes.stdout), NGHTTPD_LARGE_FILE_SIZE.to_string());

    let (index, missing) = (nghttpd.url("/index.html"), nghttpd.url("/missing"));
    let responses = run_nghttp(&[&index, &missing], &[]);
    let statuses: Vec<(u16, &str)> = responses.iter().map(|r| (r.status, r.path.as_str())).collect();
    assert_eq!(statuses.len(), 2, "{responses:?}");
    assert!(statuses.contains(&(200, "/index.html")) && statuses.contains(&(404, "/missing")), "{responses:?}");
    assert!(responses.iter().all(|r| r.stream_id >= 13 && r.stream_id % 2 == 1), "{responses:?}");

    let result = run_h2load(&h2load_args(&index, 200, 4, 10, &[]));
    assert_eq!((result.total, result.succeeded, result.status_2xx), (200, 200, 200), "{result:?}");
    assert_eq!((result.failed, result.errored, result.timeout), (0, 0, 0), "{result:?}");
}

#[test]
fn fixture_http_front_reports_failed_calls() {
    let front = HttpFront::start(&format!("127.0.0.1:{}", zerotel_tests::util::free_port()));
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", &front.call_url("x")])
        .output()
        .expect("run curl");
    let response = parse_front_response(&output);
    assert_eq!(response.code, Code::Unavailable.value(), "{response:?}");
    assert_eq!(front.wait_received(1)[0].code, 502);
}

// ---- agent tests ----

/// The gRPC spans of `kind` of process `pid`, sorted by start: waits for `count`, then a little
/// longer, so that callers can assert there are exactly `count`.
fn rpc_spans(receiver: &OtlpReceiver, pid: u32, kind: SpanKind, count: usize) -> Vec<ReceivedSpan> {
    let matching = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        let rpc =
            |s: &&ReceivedSpan| s.kind == kind && s.pid() == Some(pid) && s.attr_str("rpc.system") == Some("grpc");
        spans.iter().filter(rpc).cloned().collect()
    };
    receiver.wait_for(|spans| matching(spans).len() >= count, SPAN_TIMEOUT);
    std::thread::sleep(EXTRA_SPANS_WAIT);
    let mut spans = matching(&receiver.spans());
    spans.sort_by_key(|span| span.start_unix_ns);
    spans
}

/// Exactly `count` gRPC spans of `kind` of `pid`.
fn exactly_rpc_spans(receiver: &OtlpReceiver, pid: u32, kind: SpanKind, count: usize) -> Vec<ReceivedSpan> {
    let spans = rpc_spans(receiver, pid, kind, count);
    assert_eq!(spans.len(), count, "{kind:?} gRPC spans of pid {pid}; all spans:\n{}", describe(&receiver.spans()));
    spans
}

/// What every gRPC span of `call` carries, on either side, when it ended with `code`.
fn assert_rpc_span(span: &ReceivedSpan, call: &GrpcCall, code: Code, server: &GrpcServer) {
    assert_eq!(span.name, call.span_name(), "{span}");
    assert_eq!(span.attr_str("rpc.system"), Some("grpc"), "{span}");
    assert_eq!(span.attr_str("rpc.service"), Some(call.service.as_str()), "{span}");
    assert_eq!(span.attr_str("rpc.method"), Some(call.method.as_str()), "{span}");
    assert_eq!(span.attr_int("rpc.grpc.status_code"), Some(code.value()), "{span}");
    assert_eq!(span.attr_str("server.address"), Some("127.0.0.1"), "{span}");
    assert_eq!(span.attr_int("server.port"), Some(i64::from(server.port())), "{span}");
    assert_eq!(span.attr_str("network.protocol.version"), Some("2"), "{span}");
    let error = match span.kind {
        SpanKind::Server => code.is_server_error(),
        _ => code != Code::Ok,
    };
    assert_eq!(span.status_error, error, "{code:?} on a {:?} span: {span}", span.kind);
    assert!(span.duration_ns() > 0, "{span}");
}

/// A traced client (paused until the agent runs) makes `calls` to a traced server; returns the
/// spans of each side, sorted by start, exactly one per call on each.
fn traced_calls(
    client: Runtime,
    server: &GrpcServer,
    calls: &[GrpcCall],
    concurrency: Concurrency,
) -> (Vec<ReceivedSpan>, Vec<ReceivedSpan>) {
    let paused = client.client(&server.target(), calls, concurrency);
    let client_pid = paused.pid();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[client_pid, server.pid()]), Some(&receiver));
    let results = paused.results();
    assert_eq!(results.len(), calls.len(), "{results:?}");
    let both_sides = |spans: &[ReceivedSpan]| {
        let of = |pid, kind| spans.iter().filter(|s| s.kind == kind && s.pid() == Some(pid)).count() >= calls.len();
        of(client_pid, SpanKind::Client) && of(server.pid(), SpanKind::Server)
    };
    // Megabytes of messages go through the ring buffer: on a slow host give it time, and if
    // spans are missing say what the agent lost on the way.
    if let Err(timeout) = receiver.try_wait_for(both_sides, SPAN_TIMEOUT * 3) {
        panic!("{timeout}\nagent losses:\n{}", losses(&agent.metrics()));
    }
    let client_spans = exactly_rpc_spans(&receiver, client_pid, SpanKind::Client, calls.len());
    let server_spans = exactly_rpc_spans(&receiver, server.pid(), SpanKind::Server, calls.len());
    drop(agent);
    (client_spans, server_spans)
}

/// The agent's counters of data lost or misread, as /metrics gives them.
fn losses(metrics: &str) -> String {
    let lossy = ["lost", "desync", "dropped", "failed", "errors", "truncated", "untracked"];
    metrics.lines().filter(|l| !l.starts_with('#') && lossy.iter().any(|w| l.contains(w))).collect::<Vec<_>>().join("\n")
}

/// Unary and each streaming kind: exactly one span per call in each process.
fn every_call_kind_scenario(client: Runtime, server: GrpcServer) {
    let calls = every_call_kind();
    let (client_spans, server_spans) = traced_calls(client, &server, &calls, Concurrency::Sequential);
    for spans in [&client_spans, &server_spans] {
        // Sequential calls: the spans start in call order.
        for (span, call) in spans.iter().zip(&calls) {
            assert_rpc_span(span, call, Code::Ok, &server);
        }
    }
    for (client_span, server_span) in client_spans.iter().zip(&server_spans) {
        assert!(client_span.start_unix_ns <= server_span.start_unix_ns, "{client_span}\n{server_span}");
        assert!(client_span.end_unix_ns >= server_span.end_unix_ns, "{client_span}\n{server_span}");
    }
}

#[test]
fn python_client_to_go_server_one_span_per_call_of_each_kind() {
    if require_kernel() {
        every_call_kind_scenario(Runtime::Python, GrpcServer::go());
    }
}

#[test]
fn go_client_to_python_server_one_span_per_call_of_each_kind() {
    if require_kernel() {
        every_call_kind_scenario(Runtime::Go, GrpcServer::python());
    }
}

/// N concurrent calls multiplexed on one connection: exactly N spans on each side, overlapping.
fn concurrent_streams_scenario(client: Runtime, server: GrpcServer) {
    const CALLS: usize = 20;
    let calls: Vec<GrpcCall> = (0..CALLS)
        .map(|i| GrpcCall::unary(Payload::Text(format!("call {i}"))).delayed(Duration::from_millis(300)))
        .collect();
    let (client_spans, server_spans) = traced_calls(client, &server, &calls, Concurrency::Concurrent);
    assert_eq!(peers(&server.received()).len(), 1, "the calls shared one connection");
    for span in client_spans.iter().chain(&server_spans) {
        assert_rpc_span(span, &calls[0], Code::Ok, &server);
        assert!(span.duration_ns() >= 300_000_000, "each call waited 300 ms in the handler: {span}");
    }
    let first_end = server_spans.iter().map(|s| s.end_unix_ns).min().unwrap_or(0);
    let last_start = server_spans.iter().map(|s| s.start_unix_ns).max().unwrap_or(0);
    assert!(last_start < first_end, "the streams overlapped:\n{}", describe(&server_spans));
    // Concurrent calls share sends (grpc-go writes all 20 HEADERS frames at once); each still
    // gets exactly one traceparent, naming its own CLIENT span, whose SERVER span is its child.
    assert!(server.received().iter().all(|r| r.traceparent.len() == 1), "{:?}", server.received());
    let injected: Vec<String> = server.received().iter().flat_map(|r| r.traceparent.clone()).collect();
    let all = describe(&client_spans);
    for traceparent in &injected {
        let client_span = client_spans
            .iter()
            .find(|c| *traceparent == format!("00-{}-{}-01", c.trace_id, c.span_id))
            .unwrap_or_else(|| panic!("{traceparent} names no CLIENT span:\n{all}"));
        assert!(server_spans.iter().any(|s| s.parent_span_id == client_span.span_id), "{client_span}");
    }
}

#[test]
fn concurrent_streams_on_one_connection_give_one_span_each() {
    if require_kernel() {
        concurrent_streams_scenario(Runtime::Python, GrpcServer::python());
        concurrent_streams_scenario(Runtime::Go, GrpcServer::go());
    }
}

/// Every status code, trailers-only (`Fail`) and after replies (`ServerStream`), plus an
/// unimplemented method.
fn status_codes_scenario(client: Runtime, server: GrpcServer) {
    let mut calls: Vec<(GrpcCall, Code)> = Code::ALL.iter().map(|&code| (GrpcCall::fail(code), code)).collect();
    calls.push((GrpcCall::server_stream_failing(2, Code::Internal), Code::Internal));
    calls.push((GrpcCall::server_stream_failing(1, Code::InvalidArgument), Code::InvalidArgument));
    calls.push((GrpcCall::unimplemented("Missing"), Code::Unimplemented));
    let just_calls: Vec<GrpcCall> = calls.iter().map(|(call, _)| call.clone()).collect();
    let (client_spans, server_spans) = traced_calls(client, &server, &just_calls, Concurrency::Sequential);
    for spans in [&client_spans, &server_spans] {
        for (span, (call, code)) in spans.iter().zip(&calls) {
            assert_rpc_span(span, call, *code, &server);
        }
    }
    // A deadline the client gives up on: no grpc-status goes over the wire (the client resets
    // the stream), so the expectation for rpc.grpc.status_code is open; left out on purpose.
}

#[test]
fn every_status_code_sets_the_span_status_python_client_go_server() {
    if require_kernel() {
        status_codes_scenario(Runtime::Python, GrpcServer::go());
    }
}

#[test]
fn every_status_code_sets_the_span_status_go_client_python_server() {
    if require_kernel() {
        status_codes_scenario(Runtime::Go, GrpcServer::python());
    }
}

/// A SERVER span whose request carries `traceparent` metadata is its child. Only the server is
/// traced (the client's metadata comes from "an instrumented caller"). The calls repeat a value
/// and then change it: grpc-go sends the repeat as one indexed HPACK byte (dynamic table) and
/// the change as a new literal with an indexed name; grpcio sends raw literals every time.
fn traceparent_metadata_scenario(client: Runtime, server: GrpcServer) {
    let upstreams = [Upstream::new(), Upstream::new()];
    let order = [0, 0, 1, 1, 0];
    let calls: Vec<GrpcCall> = order
        .iter()
        .enumerate()
        .map(|(i, &u)| {
            GrpcCall::unary(Payload::Text(format!("call {i}"))).with_traceparent(&upstreams[u].traceparent())
        })
        .collect();
    let paused = client.client(&server.target(), &calls, Concurrency::Sequential);
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[server.pid()]), Some(&receiver));
    assert!(paused.results().iter().all(|r| r.code == 0));
    let spans = exactly_rpc_spans(&receiver, server.pid(), SpanKind::Server, calls.len());
    for ((span, &u), call) in spans.iter().zip(&order).zip(&calls) {
        assert_rpc_span(span, call, Code::Ok, &server);
        assert!(upstreams[u].is_parent_of(span), "call with upstream {u}: {span}");
    }
    drop(agent);
}

#[test]
fn traceparent_metadata_is_the_server_span_parent() {
    if require_kernel() {
        traceparent_metadata_scenario(Runtime::Go, GrpcServer::python());
        traceparent_metadata_scenario(Runtime::Python, GrpcServer::go());
    }
}

/// Messages of 256 KiB span many DATA frames (16 KiB each by default) and flow-control windows.
/// They stay below what the kernel copies of one syscall (1 MiB): a single write larger than
/// that loses frame headers, and zerotel then gives the connection up (see the README's limits).
#[test]
fn large_messages_give_one_span_per_call() {
    if !require_kernel() {
        return;
    }
    const LARGE: usize = MIB / 4;
    for (client, server) in [(Runtime::Python, GrpcServer::go()), (Runtime::Go, GrpcServer::python())] {
        let calls = vec![
            GrpcCall::unary(Payload::Filler(LARGE)),
            GrpcCall::bidi(vec![Payload::Filler(LARGE), Payload::text("small"), Payload::Filler(2 * LARGE)]),
            GrpcCall::client_stream(vec![Payload::Filler(LARGE), Payload::Filler(LARGE)]),
            GrpcCall::unary(Payload::text("after")),
        ];
        let (client_spans, server_spans) = traced_calls(client, &server, &calls, Concurrency::Sequential);
        for spans in [&client_spans, &server_spans] {
            for (span, call) in spans.iter().zip(&calls) {
                assert_rpc_span(span, call, Code::Ok, &server);
            }
        }
    }
}

/// Plain HTTP/2: curl (h2c prior knowledge) to nghttpd, both traced; HTTP spans as for HTTP/1.1
/// with `network.protocol.version` "2".
#[test]
fn curl_to_nghttpd_gives_http_spans_over_http2() {
    if !require_kernel() {
        return;
    }
    let nghttpd = Nghttpd::start();
    let ok = paused_client(&h2c_curl_args(&nghttpd.url("/index.html"), &[]));
    let missing = paused_client(&h2c_curl_args(&nghttpd.url("/missing"), &[]));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[ok.pid(), missing.pid(), nghttpd.pid()]), Some(&receiver));
    let (ok_pid, missing_pid) = (ok.pid(), missing.pid());
    zerotel_tests::clients::parse_curl_output(&ok.release());
    zerotel_tests::clients::parse_curl_output(&missing.release());
    let spans = receiver.wait_for(
        |spans| {
            spans.iter().any(|s| s.is(SpanKind::Client, ok_pid, "/index.html"))
                && spans.iter().any(|s| s.is(SpanKind::Client, missing_pid, "/missing"))
                && spans.iter().filter(|s| s.kind == SpanKind::Server && s.pid() == Some(nghttpd.pid())).count() >= 2
        },
        SPAN_TIMEOUT,
    );
    for (pid, path, status) in [(ok_pid, "/index.html", 200), (missing_pid, "/missing", 404)] {
        for (kind, span_pid) in [(SpanKind::Client, pid), (SpanKind::Server, nghttpd.pid())] {
            let span = zerotel_tests::find_span(&spans, &format!("{kind:?} {path}"), |s| s.is(kind, span_pid, path));
            assert!(span.name.starts_with("GET "), "{span}");
            assert_eq!(span.attr_str("http.request.method"), Some("GET"), "{span}");
            assert_eq!(span.attr_int("http.response.status_code"), Some(status), "{span}");
            assert_eq!(span.attr_str("network.protocol.version"), Some("2"), "{span}");
            assert_eq!(span.attr_int("server.port"), Some(i64::from(nghttpd.port())), "{span}");
            assert!(span.attr_str("rpc.system").is_none(), "not gRPC: {span}");
            // HTTP/1 rules: 404 is an error on the CLIENT span only.
            assert_eq!(span.status_error, kind == SpanKind::Client && status >= 400, "{span}");
        }
    }
    drop(agent);
}

/// h2load: 200 requests over 4 connections of up to 10 concurrent streams: exactly 200 SERVER
/// spans in nghttpd.
/// `curl --http2` on an http:// URL asks for h2c by HTTP/1.1 Upgrade (RFC 7540 §3.2): the first
/// request goes out as HTTP/1.1 and is answered on stream 1 after `101 Switching Protocols`, the
/// second goes out on stream 3 of the same connection. Both sides give one HTTP/2 span per
/// request, and each SERVER span is the child of the CLIENT span that asked: the first carried
/// `traceparent` as an HTTP/1.1 header, the second in its HEADERS frame.
#[test]
fn an_h2c_upgrade_gives_http2_spans_linked_across() {
    if !require_kernel() {
        return;
    }
    let server = GoH2cServer::start();
    let (first, second) = (server.url("/first"), server.url("/second"));
    let curl = paused_client(&["curl", "-sS", "--noproxy", "*", "--http2", "--max-time", "20", &first, &second]);
    let curl_pid = curl.pid();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&propagating_pid_args(&[curl_pid, server.pid()]), Some(&receiver));
    let output = curl.release();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Go's h2c hands the upgrade request to the handler as it came (HTTP/1.1); its answer goes
    // out on stream 1.
    assert_eq!(stdout, "hello /first over HTTP/1\nhello /second over HTTP/2\n", "{output:?}");
    let received = server.wait_received(2);
    assert_eq!(peers(&received).len(), 1, "one connection, upgraded: {received:?}");

    let spans = receiver.wait_for(
        |spans| {
            let count = |kind, pid| spans.iter().filter(|s| s.kind == kind && s.pid() == Some(pid)).count();
            count(SpanKind::Client, curl_pid) >= 2 && count(SpanKind::Server, server.pid()) >= 2
        },
        SPAN_TIMEOUT,
    );
    let all = describe(&spans);
    for (path, arrived) in ["/first", "/second"].iter().zip(&received) {
        let client = zerotel_tests::find_span(&spans, &format!("CLIENT {path}"), |s| s.is(SpanKind::Client, curl_pid, path));
        let served = zerotel_tests::find_span(&spans, &format!("SERVER {path}"), |s| s.is(SpanKind::Server, server.pid(), path));
        for span in [&client, &served] {
            assert_eq!(span.attr_str("http.request.method"), Some("GET"), "{span}");
            assert_eq!(span.attr_int("http.response.status_code"), Some(200), "{span}");
            assert_eq!(span.attr_str("network.protocol.version"), Some("2"), "{span}");
            assert_eq!(span.attr_int("server.port"), Some(i64::from(server.port())), "{span}");
        }
        assert_eq!((&served.trace_id, &served.parent_span_id), (&client.trace_id, &client.span_id), "{path}:\n{all}");
        assert_eq!(arrived.traceparent, [format!("00-{}-{}-01", client.trace_id, client.span_id)], "{path}");
    }
    drop(agent);
}

/// Other upgrades stay HTTP/1: a traced server that switches to another protocol (here
/// WebSocket-style, with "h2c" inside its accept token) and then echoes bytes that look like
/// HTTP/2 gives one HTTP/1.1 span for the `101` and no HTTP/2 span, and every byte comes back
/// as it was sent.
#[test]
fn a_websocket_upgrade_is_not_taken_for_h2c() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&propagating_pid_args(&[server.pid()]), Some(&receiver));
    const CLIENT: &str = r#"
import socket, sys
payload = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]) + bytes([0, 0, 3, 1, 5, 0, 0, 0, 1, 0x82, 0x86, 0x84]) * 50
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /echo-upgrade HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
for _ in range(20):
    s.sendall(payload)
    echoed = b""
    while len(echoed) < len(payload):
        echoed += s.recv(65536)
    assert echoed == payload, "echo differs"
s.close()
print(head.split(b"\r\n")[0].decode())
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", CLIENT, &server.port().to_string()])
        .output()
        .expect("run the upgrade client");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "HTTP/1.1 101 Switching Protocols\n");
    receiver.wait_for(|spans| spans.iter().any(|s| s.is(SpanKind::Server, server.pid(), "/echo-upgrade")), SPAN_TIMEOUT);
    std::thread::sleep(EXTRA_SPANS_WAIT);
    let spans = receiver.spans();
    let all = describe(&spans);
    let switched: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.pid() == Some(server.pid())).collect();
    assert_eq!(switched.len(), 1, "{all}");
    assert_eq!(switched[0].attr_int("http.response.status_code"), Some(101), "{all}");
    assert_eq!(switched[0].attr_str("network.protocol.version"), Some("1.1"), "{all}");
    drop(agent);
}

#[test]
fn h2load_200_requests_give_exactly_200_server_spans() {
    if !require_kernel() {
        return;
    }
    let nghttpd = Nghttpd::start();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[nghttpd.pid()]), Some(&receiver));
    let result = run_h2load(&h2load_args(&nghttpd.url("/index.html"), 200, 4, 10, &[]));
    assert_eq!(result.status_2xx, 200, "{result:?}");
    let server_spans = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        spans.iter().filter(|s| s.is(SpanKind::Server, nghttpd.pid(), "/index.html")).cloned().collect()
    };
    receiver.wait_for(|spans| server_spans(spans).len() >= 200, SPAN_TIMEOUT);
    std::thread::sleep(EXTRA_SPANS_WAIT);
    let spans = server_spans(&receiver.spans());
    assert_eq!(spans.len(), 200, "one SERVER span per stream");
    let all_server = receiver.spans().iter().filter(|s| s.kind == SpanKind::Server).count();
    assert_eq!(all_server, 200, "no other SERVER spans:\n{}", describe(&receiver.spans()));
    assert!(spans.iter().all(|s| s.attr_str("network.protocol.version") == Some("2") && !s.status_error));
    drop(agent);
}

/// curl (untraced) -> front (Python HTTP/1.1, its handler calls gRPC) -> Go gRPC server (its
/// handler calls gRPC) -> Python gRPC server, the three hops traced by one agent. The front's
/// call leaves from a grpcio thread, yet it is the child of the request the front serves, and it
/// carries that context to the Go server. The Go server's call, made from another goroutine than
/// the one that read the request, is the child of the one call it serves and carries its own span
/// to the Python server. One trace, every parent exact.
#[test]
fn a_chain_through_grpc_hops_is_one_trace() {
    if !require_kernel() {
        return;
    }
    let chain = GrpcChain::start();
    let [front_pid, go_pid, python_pid] = chain.pids();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&propagating_pid_args(&chain.pids()), Some(&receiver));
    let response = chain.request("traced");
    assert_eq!(response.code, 0, "{response:?}\n{}", chain.stderr());

    let unary = GrpcCall::unary(Payload::text("traced"));
    let front_server = receiver.wait_for_span(|s| s.is(SpanKind::Server, front_pid, "/call"), SPAN_TIMEOUT);
    let front_client = &exactly_rpc_spans(&receiver, front_pid, SpanKind::Client, 1)[0];
    let go_server = &exactly_rpc_spans(&receiver, go_pid, SpanKind::Server, 1)[0];
    let go_client = &exactly_rpc_spans(&receiver, go_pid, SpanKind::Client, 1)[0];
    let python_server = &exactly_rpc_spans(&receiver, python_pid, SpanKind::Server, 1)[0];
    assert_rpc_span(front_client, &unary, Code::Ok, &chain.go);
    assert_rpc_span(go_server, &unary, Code::Ok, &chain.go);
    assert_rpc_span(go_client, &unary, Code::Ok, &chain.python);
    assert_rpc_span(python_server, &unary, Code::Ok, &chain.python);

    let all = describe(&receiver.spans());
    assert!(front_server.is_root(), "curl sent no context:\n{all}");
    let links = [
        (&front_server, front_client, "front CLIENT under the front SERVER"),
        (front_client, go_server, "Go SERVER under the front's CLIENT"),
        (go_server, go_client, "Go CLIENT under the Go SERVER"),
        (go_client, python_server, "Python SERVER under the Go CLIENT"),
    ];
    for (parent, child, what) in links {
        assert_eq!((&child.trace_id, &child.parent_span_id), (&parent.trace_id, &parent.span_id), "{what}:\n{all}");
    }
    // What arrived at each gRPC hop: exactly one traceparent, naming the CLIENT span that called.
    let at_go = &chain.go.wait_received(1)[0];
    assert_eq!(at_go.traceparent, [format!("00-{}-{}-01", front_client.trace_id, front_client.span_id)]);
    let at_python = &chain.python.wait_received(1)[0];
    assert_eq!(at_python.traceparent, [format!("00-{}-{}-01", go_client.trace_id, go_client.span_id)]);
    drop(agent);
}

/// A gRPC server's own calls are children of the call it serves, whichever thread makes them: the
/// kernel follows the server's HTTP/2 frames, so while it serves exactly one call, a call it makes
/// carries that one's context. While it serves two at once it cannot tell which one a call is
/// for, and guesses nothing: those calls start traces of their own.
fn serving_scenario(middle: Runtime, downstream: Runtime) {
    let backend = downstream.server(&ServerOptions::new().echoing_metadata());
    let server = middle.server(&ServerOptions::new().calling(Downstream::Grpc(backend.target())));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&propagating_pid_args(&[server.pid(), backend.pid()]), Some(&receiver));
    let what = format!("{middle:?} server calling a {downstream:?} server");

    let one_at_a_time: Vec<GrpcCall> = (0..3).map(|i| GrpcCall::unary(Payload::Text(format!("one {i}")))).collect();
    let results = Runtime::Python.call(&server.target(), &one_at_a_time, Concurrency::Sequential);
    assert!(results.iter().all(|r| r.code == 0), "{what}: {results:?}\n{}", server.stderr());
    let served = exactly_rpc_spans(&receiver, server.pid(), SpanKind::Server, 3);
    let calls = exactly_rpc_spans(&receiver, server.pid(), SpanKind::Client, 3);
    let at_backend = exactly_rpc_spans(&receiver, backend.pid(), SpanKind::Server, 3);
    let all = describe(&receiver.spans());
    for ((serving, call), downstream_span) in served.iter().zip(&calls).zip(&at_backend) {
        assert_eq!((&call.trace_id, &call.parent_span_id), (&serving.trace_id, &serving.span_id), "{what}:\n{all}");
        assert_eq!((&downstream_span.trace_id, &downstream_span.parent_span_id), (&call.trace_id, &call.span_id), "{what}:\n{all}");
    }

    // Both handlers wait before calling, so both calls are served when either calls out.
    let overlapping: Vec<GrpcCall> =
        (0..2).map(|i| GrpcCall::unary(Payload::Text(format!("two {i}"))).delayed(Duration::from_millis(300))).collect();
    let results = Runtime::Python.call(&server.target(), &overlapping, Concurrency::Concurrent);
    assert!(results.iter().all(|r| r.code == 0), "{what}: {results:?}\n{}", server.stderr());
    let calls = exactly_rpc_spans(&receiver, server.pid(), SpanKind::Client, 5);
    let all = describe(&receiver.spans());
    for call in &calls[3..] {
        assert!(call.is_root(), "{what}: a call made while two were served has no parent to guess:\n{all}");
    }
    drop(agent);
}

#[test]
fn a_grpc_server_s_calls_are_children_of_the_one_call_it_serves() {
    if require_kernel() {
        serving_scenario(Runtime::Go, Runtime::Python);
        serving_scenario(Runtime::Python, Runtime::Go);
    }
}

/// A traced client's calls carry the CLIENT span's context to the server in a `traceparent` it
/// did not send itself: exactly one per call, naming the span, and the server's span is its child.
fn injection_scenario(client: Runtime, server: GrpcServer) {
    let calls: Vec<GrpcCall> = (0..3).map(|i| GrpcCall::unary(Payload::Text(format!("call {i}")))).collect();
    let (client_spans, server_spans) = traced_calls(client, &server, &calls, Concurrency::Sequential);
    let received = server.wait_received(calls.len());
    for ((client_span, server_span), arrived) in client_spans.iter().zip(&server_spans).zip(&received) {
        let expected = format!("00-{}-{}-01", client_span.trace_id, client_span.span_id);
        assert_eq!(arrived.traceparent, [expected], "what reached the server, for {client_span}");
        assert_eq!(
            (&server_span.trace_id, &server_span.parent_span_id),
            (&client_span.trace_id, &client_span.span_id),
            "the SERVER span under the CLIENT span that called:\n{client_span}\n{server_span}"
        );
    }
}

#[test]
fn outgoing_calls_carry_the_client_span_in_one_traceparent() {
    if require_kernel() {
        injection_scenario(Runtime::Python, GrpcServer::go());
        injection_scenario(Runtime::Go, GrpcServer::python());
    }
}

/// A client that sends `traceparent` itself (grpcio as a plain literal, grpc-go Huffman-coded and
/// then indexed) keeps it: the server gets exactly the application's value on every call.
fn application_traceparent_scenario(client: Runtime, server: GrpcServer) {
    let upstream = Upstream::new();
    let calls: Vec<GrpcCall> = (0..3)
        .map(|i| GrpcCall::unary(Payload::Text(format!("call {i}"))).with_traceparent(&upstream.traceparent()))
        .collect();
    traced_calls(client, &server, &calls, Concurrency::Sequential);
    for arrived in server.wait_received(calls.len()) {
        assert_eq!(arrived.traceparent, [upstream.traceparent()], "never a second traceparent");
    }
}

#[test]
fn an_application_traceparent_is_never_doubled() {
    if require_kernel() {
        application_traceparent_scenario(Runtime::Python, GrpcServer::go());
        application_traceparent_scenario(Runtime::Go, GrpcServer::python());
    }
}
