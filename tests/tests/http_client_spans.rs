//! CLIENT spans for requests sent by traced processes (curl, Python urllib).

use zerotel_tests::clients::{parse_curl_output, parse_urllib_output};
use zerotel_tests::{
    curl_args_many, find_span, paused_client, paused_urllib_client, pid_args, require_kernel, Agent, OtlpReceiver,
    Protocol, PyServer, ReceivedSpan, SpanKind, SPAN_TIMEOUT,
};

#[test]
fn curl_requests_yield_client_spans() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let (ok_url, missing_url) = (server.url("/users/5"), server.url("/nope"));
    let client = paused_client(&curl_args_many(&[ok_url.as_str(), missing_url.as_str()], &[]));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&pid_args(&[client.pid()]), Some(&receiver));

    let curl_pid = client.pid();
    let results = parse_curl_output(&client.release());
    let statuses: Vec<u16> = results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404], "curl results: {results:?}");

    let spans = receiver.wait_for(
        |spans| {
            spans.iter().any(|s| s.is(SpanKind::Client, curl_pid, "/users/5"))
                && spans.iter().any(|s| s.is(SpanKind::Client, curl_pid, "/nope"))
        },
        SPAN_TIMEOUT,
    );
    assert_curl_ok_span(&spans, curl_pid, &server);
    assert_curl_not_found_span(&spans, curl_pid);
}

fn client_span<'a>(spans: &'a [ReceivedSpan], pid: u32, path: &str) -> &'a ReceivedSpan {
    find_span(spans, &format!("CLIENT {path} of pid {pid}"), |s| s.is(SpanKind::Client, pid, path))
}

fn assert_curl_ok_span(spans: &[ReceivedSpan], curl_pid: u32, server: &PyServer) {
    let span = client_span(spans, curl_pid, "/users/5");
    let context = format!("span:\n  {span}");
    assert_eq!(span.name, "GET /users/*", "{context}");
    assert!(!span.status_error, "200 must leave a CLIENT span UNSET; {context}");
    assert_eq!(span.attr_str("http.request.method"), Some("GET"), "{context}");
    assert_eq!(span.attr_int("http.response.status_code"), Some(200), "{context}");
    assert_eq!(span.attr_str("server.address"), Some("127.0.0.1"), "{context}");
    assert_eq!(span.attr_int("server.port"), Some(i64::from(server.port())), "{context}");
    assert_eq!(span.attr_str("network.peer.address"), Some("127.0.0.1"), "{context}");
    assert_eq!(span.attr_int("network.peer.port"), Some(i64::from(server.port())), "{context}");
    assert_eq!(span.service_name(), Some("curl"), "service.name derived from the executable; {context}");
    assert!(span.duration_ns() > 0, "{context}");
}

fn assert_curl_not_found_span(spans: &[ReceivedSpan], curl_pid: u32) {
    let span = client_span(spans, curl_pid, "/nope");
    assert_eq!(span.attr_int("http.response.status_code"), Some(404), "span:\n  {span}");
    assert!(span.status_error, ">= 400 on a CLIENT span must be ERROR; span:\n  {span}");
}

#[test]
fn client_and_server_span_durations_fit_in_client_measurement() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let client = paused_urllib_client(&server.url("/users/3"));
    let client_pid = client.pid();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&pid_args(&[client_pid, server.pid()]), Some(&receiver));

    let measured = parse_urllib_output(&client.release());
    assert_eq!(measured.status, 200, "urllib result: {measured:?}");

    let spans = receiver.wait_for(
        |spans| {
            spans.iter().any(|s| s.is(SpanKind::Client, client_pid, "/users/3"))
                && spans.iter().any(|s| s.is(SpanKind::Server, server.pid(), "/users/3"))
        },
        SPAN_TIMEOUT,
    );
    let client_span = client_span(&spans, client_pid, "/users/3");
    assert_eq!(client_span.service_name(), Some("client"), "service.name from client.py; span:\n  {client_span}");
    assert_duration_within(client_span, measured.elapsed_ns);
    let server_span = find_span(&spans, "SERVER /users/3", |s| s.is(SpanKind::Server, server.pid(), "/users/3"));
    assert_duration_within(server_span, measured.elapsed_ns);
}

fn assert_duration_within(span: &ReceivedSpan, client_measured_ns: u64) {
    let duration = span.duration_ns();
    assert!(
        duration > 0 && duration <= client_measured_ns,
        "span duration {duration} ns must be in (0, {client_measured_ns}] (measured by the client); span:\n  {span}"
    );
}
