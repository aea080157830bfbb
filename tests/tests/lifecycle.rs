//! Agent lifecycle: process discovery by executable, `--print`, /metrics,
//! SIGTERM flushing, argument errors, connections older than the agent, and restarts.

use std::thread;
use std::time::Duration;

use zerotel_tests::agent::{parse_metrics, run_until_exit};
use zerotel_tests::clients::KeepAliveClient;
use zerotel_tests::print::{parse_print_output, PrintedSpan};
use zerotel_tests::servers::python_interpreter;
use zerotel_tests::util::{free_port, poll_until};
use zerotel_tests::{
    curl, describe, pid_args, propagating_pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer, SpanKind, SPAN_TIMEOUT,
};

#[test]
fn exe_selector_traces_processes_started_after_the_agent() {
    if !require_kernel() {
        return;
    }
    let python = python_interpreter().to_str().expect("python path is UTF-8");
    let exe_regex = format!("^{}$", regex::escape(python));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&["--exe".to_string(), exe_regex], Some(&receiver));

    let server = PyServer::start("backend.py");
    // The contract: a matching process is traced within 1 s of starting.
    thread::sleep(Duration::from_secs(1));
    assert_eq!(curl(&server.url("/users/21"), &[]).status, 200);

    let pid = server.pid();
    let span = receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, "/users/21"), SPAN_TIMEOUT);
    assert_eq!(span.name, "GET /users/*", "span:\n  {span}");
}

#[test]
fn print_flag_writes_one_line_per_span() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let mut args = pid_args(&[server.pid()]);
    args.push("--print".to_string());
    let agent = Agent::start(&args, None);

    assert_eq!(curl(&server.url("/users/5"), &[]).status, 200);
    assert_eq!(curl(&server.url("/error"), &[]).status, 500);

    let users = wait_for_printed_span(&agent, "GET /users/*");
    assert_eq!((users.kind.as_str(), users.status.as_str()), ("SERVER", "UNSET"), "{users:?}");
    assert_eq!(users.service, "backend", "{users:?}");
    assert_eq!(users.parent_span_id, None, "no incoming context: root span; {users:?}");
    assert!(users.duration_us > 0, "{users:?}");
    let error = wait_for_printed_span(&agent, "GET /error");
    assert_eq!((error.kind.as_str(), error.status.as_str()), ("SERVER", "ERROR"), "{error:?}");
}

fn wait_for_printed_span(agent: &Agent, name: &str) -> PrintedSpan {
    let find = || parse_print_output(&agent.stdout()).into_iter().find(|s| s.name == name);
    if !poll_until(SPAN_TIMEOUT, || find().is_some()) {
        panic!("no --print line named {name:?} within {SPAN_TIMEOUT:?}; stdout:\n{}", agent.stdout());
    }
    find().expect("line was there a moment ago")
}

const COUNTERS: [&str; 11] = [
    "zerotel_events_read_total",
    "zerotel_events_lost_total",
    "zerotel_spans_total",
    "zerotel_parse_errors_total",
    "zerotel_spans_exported_total",
    "zerotel_spans_dropped_total",
    "zerotel_export_errors_total",
    "zerotel_export_retries_total",
    "zerotel_export_queue_spans",
    "zerotel_export_duration_seconds_count",
    "zerotel_export_duration_seconds_bucket",
];

#[test]
fn metrics_endpoint_counts_events_and_spans() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[server.pid()]), Some(&receiver));

    let requests = 5;
    for id in 0..requests {
        assert_eq!(curl(&server.url(&format!("/users/{id}")), &[]).status, 200);
    }
    let pid = server.pid();
    receiver.wait_for(
        |spans| spans.iter().filter(|s| s.kind == SpanKind::Server && s.pid() == Some(pid)).count() >= requests,
        SPAN_TIMEOUT,
    );

    let metrics = agent.metrics();
    let names: Vec<String> = parse_metrics(&metrics).into_iter().map(|s| s.name).collect();
    for counter in COUNTERS {
        assert!(names.iter().any(|n| n == counter), "/metrics lacks {counter}:\n{metrics}");
    }
    let server_spans = agent.metric_sum_with("zerotel_spans_total", &[("kind", "server"), ("protocol", "http")]);
    assert!(server_spans >= requests as u64, "spans_total{{kind=\"server\"}} {server_spans} < {requests}:\n{metrics}");
    assert!(agent.metric_sum("zerotel_events_read_total") > 0, "no events read:\n{metrics}");
    let exported =
        poll_until(Duration::from_secs(5), || agent.metric_sum("zerotel_spans_exported_total") >= requests as u64);
    assert!(exported, "spans_exported_total < {requests} after the receiver got them:\n{}", agent.metrics());
    assert!(agent.metric_sum("zerotel_export_duration_seconds_count") >= 1, "{}", agent.metrics());
    assert_eq!(agent.metric_sum("zerotel_parse_errors_total"), 0, "{}", agent.metrics());
}

#[test]
fn sigterm_flushes_pending_spans_and_exits_zero() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[server.pid()]), Some(&receiver));

    assert_eq!(curl(&server.url("/users/31"), &[]).status, 200);
    // Well inside the agent's 1-2 s batch window: the span is still pending.
    thread::sleep(Duration::from_millis(200));
    let exit = agent.stop_with_output();
    let stderr = String::from_utf8_lossy(&exit.stderr);
    assert!(exit.status.success(), "agent exited with {} after SIGTERM; stderr:\n{stderr}", exit.status);

    let pid = server.pid();
    receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, "/users/31"), Duration::from_secs(2));
}

#[test]
fn invalid_exe_regex_fails_fast() {
    if !require_kernel() {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--exe", "(", "--listen", &listen].map(String::from);
    let output = run_until_exit(&args, Duration::from_secs(5));

    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "agent accepted --exe '(': stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.to_lowercase().contains("regex"),
        "error message should mention the regex; stderr:\n{stderr}\nstdout:\n{stdout}"
    );
}

#[test]
fn keep_alive_connection_opened_before_the_agent_is_traced() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let (mut client, first) = KeepAliveClient::connect(server.port(), "/users/41", "/users/42");
    assert_eq!(first.status, 200, "first response: {first:?}");

    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&pid_args(&[server.pid()]), Some(&receiver));
    let second = client.send_second();
    assert_eq!(second.status, 200, "second response: {second:?}");
    assert!(
        first.local_port.is_some() && first.local_port == second.local_port,
        "both requests must use one connection: {first:?} then {second:?}"
    );

    let pid = server.pid();
    let span = receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, "/users/42"), SPAN_TIMEOUT);
    assert_eq!(span.name, "GET /users/*", "span:\n  {span}");
    assert_eq!(span.attr_str("client.address"), Some("127.0.0.1"), "span:\n  {span}");
    let client_port = second.local_port.map(i64::from);
    assert_eq!(span.attr_int("network.peer.port"), client_port, "peer is the client's socket; span:\n  {span}");
}

/// A restart (rolling update, crash loop): agent A traces a keep-alive connection, with the
/// client's socket in A's sockhash for propagation; A stops, the connection goes on untraced and
/// unharmed; agent B finds it in procfs and traces its next request, `traceparent` included.
#[test]
fn a_restarted_agent_resumes_tracing_a_keep_alive_connection() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let paths = ["/users/61", "/users/62", "/users/63", "/users/64"];
    let (mut client, first) = KeepAliveClient::connect_for(server.port(), &paths);
    assert_eq!(first.status, 200, "first response: {first:?}");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let (server_pid, client_pid) = (server.pid(), client.pid());
    let args = propagating_pid_args(&[server_pid, client_pid]);

    let agent_a = Agent::start(&args, Some(&receiver));
    let by_a = client.send_next();
    assert_traced_with_context(&receiver, (server_pid, client_pid), paths[1], "agent A");
    let exit = agent_a.stop_with_output();
    assert!(exit.status.success(), "agent A exited with {}", exit.status);

    let between = client.send_next();
    let agent_b = Agent::start(&args, Some(&receiver));
    let by_b = client.send_next();
    assert_traced_with_context(&receiver, (server_pid, client_pid), paths[3], "agent B");
    drop(agent_b);

    for response in [by_a, between, by_b] {
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.local_port, first.local_port, "every request must use the first connection: {response:?}");
    }
    let untraced: Vec<_> = receiver.spans().into_iter().filter(|s| s.attr_str("url.path") == Some(paths[2])).collect();
    assert!(untraced.is_empty(), "a span for the request sent while no agent ran:\n{}", describe(&untraced));
}

/// The SERVER and CLIENT spans of `path` arrived, the server's a child of the client's.
fn assert_traced_with_context(receiver: &OtlpReceiver, (server_pid, client_pid): (u32, u32), path: &str, by: &str) {
    let server = receiver.wait_for_span(|s| s.is(SpanKind::Server, server_pid, path), SPAN_TIMEOUT);
    let client = receiver.wait_for_span(|s| s.is(SpanKind::Client, client_pid, path), SPAN_TIMEOUT);
    assert_eq!(
        (&server.trace_id, &server.parent_span_id),
        (&client.trace_id, &client.span_id),
        "{by}: the server span of {path} must continue the client's injected context:\n  {client}\n  {server}"
    );
}
