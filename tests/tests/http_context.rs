//! Trace context: incoming W3C / B3 headers, and CLIENT spans parented to the
//! SERVER span of the thread that sends them.

use zerotel_tests::util::{is_valid_hex_id, random_span_id, random_trace_id};
use zerotel_tests::{
    curl, describe, find_span, pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer, ReceivedSpan,
    SpanKind, SPAN_TIMEOUT,
};

/// A traced backend.py with its receiver and agent (dropped in field order:
/// the agent flushes to a live receiver, then the server stops).
struct TracedBackend {
    _agent: Agent,
    receiver: OtlpReceiver,
    server: PyServer,
}

fn traced_backend() -> TracedBackend {
    let server = PyServer::start("backend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[server.pid()]), Some(&receiver));
    TracedBackend { _agent: agent, receiver, server }
}

impl TracedBackend {
    /// GETs `path` with one extra header (untraced curl) and asserts 200.
    fn get_with_header(&self, path: &str, header: &str) {
        let result = curl(&self.server.url(path), &["-H", header]);
        assert_eq!(result.status, 200, "GET {path} with {header:?}");
    }

    fn wait_for_server_span(&self, path: &str) -> ReceivedSpan {
        let pid = self.server.pid();
        self.receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, path), SPAN_TIMEOUT)
    }
}

#[test]
fn w3c_traceparent_is_continued() {
    if !require_kernel() {
        return;
    }
    let backend = traced_backend();
    let (trace_id, parent_id) = (random_trace_id(), random_span_id());
    backend.get_with_header("/users/11", &format!("traceparent: 00-{trace_id}-{parent_id}-01"));

    let span = backend.wait_for_server_span("/users/11");
    assert_eq!(span.trace_id, trace_id, "trace id from traceparent; span:\n  {span}");
    assert_eq!(span.parent_span_id, parent_id, "parent id from traceparent; span:\n  {span}");
    assert!(is_valid_hex_id(&span.span_id, 16) && span.span_id != parent_id, "fresh span id; span:\n  {span}");
}

#[test]
fn invalid_traceparents_start_new_traces() {
    if !require_kernel() {
        return;
    }
    let backend = traced_backend();
    let (trace_id, parent_id) = (random_trace_id(), random_span_id());
    let invalid_headers = [
        ("/users/101", format!("ff-{trace_id}-{parent_id}-01")),
        ("/users/102", format!("00-{}-{parent_id}-01", "0".repeat(32))),
        ("/users/103", format!("00-{}-{parent_id}-01", &trace_id[..16])),
    ];
    for (path, traceparent) in &invalid_headers {
        backend.get_with_header(path, &format!("traceparent: {traceparent}"));
    }
    for (path, traceparent) in &invalid_headers {
        let span = backend.wait_for_server_span(path);
        let context = format!("traceparent {traceparent:?} is invalid and must be ignored; span:\n  {span}");
        assert!(is_valid_hex_id(&span.trace_id, 32), "{context}");
        assert_ne!(span.trace_id, trace_id, "{context}");
        assert!(span.is_root(), "{context}");
    }
}

#[test]
fn b3_single_header_is_honoured() {
    if !require_kernel() {
        return;
    }
    let backend = traced_backend();
    let (trace_id, parent_id) = (random_trace_id(), random_span_id());
    backend.get_with_header("/users/12", &format!("b3: {trace_id}-{parent_id}-1"));

    let span = backend.wait_for_server_span("/users/12");
    assert_eq!(span.trace_id, trace_id, "trace id from b3; span:\n  {span}");
    assert_eq!(span.parent_span_id, parent_id, "parent id from b3; span:\n  {span}");
}

#[test]
fn client_span_sent_while_serving_is_child_of_server_span() {
    if !require_kernel() {
        return;
    }
    let backend = PyServer::start("backend.py");
    let frontend = PyServer::start("frontend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&pid_args(&[frontend.pid(), backend.pid()]), Some(&receiver));

    let chain_url = frontend.url(&format!("/chain?to={}", backend.url("/users/1")));
    assert_eq!(curl(&chain_url, &[]).status, 200, "GET {chain_url}");

    let (front_pid, back_pid) = (frontend.pid(), backend.pid());
    let spans = receiver.wait_for(
        |spans| {
            spans.iter().any(|s| s.is(SpanKind::Server, front_pid, "/chain"))
                && spans.iter().any(|s| s.is(SpanKind::Client, front_pid, "/users/1"))
                && spans.iter().any(|s| s.is(SpanKind::Server, back_pid, "/users/1"))
        },
        SPAN_TIMEOUT,
    );
    let front_server = find_span(&spans, "frontend SERVER /chain", |s| s.is(SpanKind::Server, front_pid, "/chain"));
    let front_client = find_span(&spans, "frontend CLIENT /users/1", |s| s.is(SpanKind::Client, front_pid, "/users/1"));
    let back_server = find_span(&spans, "backend SERVER /users/1", |s| s.is(SpanKind::Server, back_pid, "/users/1"));

    let context = format!("spans:\n{}", describe(&spans));
    assert_eq!(front_server.name, "GET /chain", "{context}");
    assert_eq!(front_client.trace_id, front_server.trace_id, "frontend CLIENT joins the SERVER's trace; {context}");
    assert_eq!(front_client.parent_span_id, front_server.span_id, "CLIENT is the SERVER's child; {context}");
    assert_eq!(back_server.name, "GET /users/*", "{context}");
    assert_eq!(back_server.service_name(), Some("backend"), "{context}");
    assert_frontend_shares_one_trace(&spans, front_pid, &front_server.trace_id);
}

fn assert_frontend_shares_one_trace(spans: &[ReceivedSpan], frontend_pid: u32, trace_id: &str) {
    let frontend_spans: Vec<ReceivedSpan> = spans.iter().filter(|s| s.pid() == Some(frontend_pid)).cloned().collect();
    assert!(
        frontend_spans.iter().all(|s| s.trace_id == trace_id),
        "all frontend spans must share trace {trace_id}:\n{}",
        describe(&frontend_spans)
    );
}
