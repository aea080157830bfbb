//! SERVER spans for requests accepted by a traced Python server, exported
//! over both OTLP protocols.

use zerotel_tests::{
    curl, describe, find_span, pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer, ReceivedSpan,
    SpanKind, SPAN_TIMEOUT,
};

#[test]
fn server_spans_exported_over_grpc() {
    if require_kernel() {
        server_spans_scenario(Protocol::Grpc);
    }
}

#[test]
fn server_spans_exported_over_http_protobuf() {
    if require_kernel() {
        server_spans_scenario(Protocol::HttpProtobuf);
    }
}

/// Requests sent to the backend: (path, expected HTTP status).
const BACKEND_REQUESTS: [(&str, u16); 4] =
    [("/users/42", 200), ("/error", 500), ("/missing", 404), ("/users/7?secret=x", 200)];

fn server_spans_scenario(protocol: Protocol) {
    let backend = PyServer::start("backend.py");
    let checkout = PyServer::start_with_env("checkout_service.py", &[("OTEL_SERVICE_NAME", "checkout")]);
    let receiver = OtlpReceiver::start(protocol);
    let _agent = Agent::start(&pid_args(&[backend.pid(), checkout.pid()]), Some(&receiver));

    for (path, status) in BACKEND_REQUESTS {
        assert_eq!(curl(&backend.url(path), &[]).status, status, "GET {path}");
    }
    assert_eq!(curl(&checkout.url("/users/1"), &[]).status, 200);

    let spans = receiver.wait_for(
        |spans| {
            ["/users/42", "/error", "/missing", "/users/7"].iter().all(|p| has_server_span(spans, &backend, p))
                && spans.iter().any(|s| s.is(SpanKind::Server, checkout.pid(), "/users/1"))
        },
        SPAN_TIMEOUT,
    );

    assert_users_span_attributes(&spans, &backend);
    assert_error_status(&spans, &backend);
    assert_not_found_is_unset(&spans, &backend);
    assert_query_string_dropped(&spans, &backend);
    assert_backend_resource(&spans, &backend);
    assert_service_name_from_env(&spans, &checkout);
}

fn has_server_span(spans: &[ReceivedSpan], server: &PyServer, path: &str) -> bool {
    spans.iter().any(|s| s.is(SpanKind::Server, server.pid(), path))
}

fn server_span<'a>(spans: &'a [ReceivedSpan], server: &PyServer, path: &str) -> &'a ReceivedSpan {
    find_span(spans, &format!("SERVER {path} of pid {}", server.pid()), |s| s.is(SpanKind::Server, server.pid(), path))
}

fn assert_users_span_attributes(spans: &[ReceivedSpan], backend: &PyServer) {
    let span = server_span(spans, backend, "/users/42");
    let context = format!("span:\n  {span}");
    assert_eq!(span.name, "GET /users/*", "{context}");
    assert!(!span.status_error, "200 must leave the status UNSET; {context}");
    assert_eq!(span.attr_str("http.request.method"), Some("GET"), "{context}");
    assert_eq!(span.attr_str("url.path"), Some("/users/42"), "{context}");
    assert_eq!(span.attr_str("url.scheme"), Some("http"), "{context}");
    assert_eq!(span.attr_str("http.route"), Some("/users/*"), "{context}");
    assert_eq!(span.attr_int("http.response.status_code"), Some(200), "{context}");
    assert_eq!(span.attr_str("network.protocol.version"), Some("1.1"), "{context}");
    assert_eq!(span.attr_str("server.address"), Some("127.0.0.1"), "{context}");
    assert_eq!(span.attr_int("server.port"), Some(i64::from(backend.port())), "{context}");
    assert_eq!(span.attr_str("client.address"), Some("127.0.0.1"), "{context}");
    assert_eq!(span.attr_str("network.peer.address"), Some("127.0.0.1"), "{context}");
    let peer_port = span.attr_int("network.peer.port");
    assert!(
        peer_port.is_some_and(|p| p > 0 && p <= 65535 && p != i64::from(backend.port())),
        "network.peer.port must be the client's port as an int; {context}"
    );
    assert!(span.duration_ns() > 0, "duration must be positive; {context}");
    assert!(span.is_root(), "a request without trace headers starts a trace; {context}");
}

fn assert_error_status(spans: &[ReceivedSpan], backend: &PyServer) {
    let span = server_span(spans, backend, "/error");
    assert_eq!(span.name, "GET /error", "span:\n  {span}");
    assert_eq!(span.attr_int("http.response.status_code"), Some(500), "span:\n  {span}");
    assert!(span.status_error, "5xx on a SERVER span must be ERROR; span:\n  {span}");
}

fn assert_not_found_is_unset(spans: &[ReceivedSpan], backend: &PyServer) {
    let span = server_span(spans, backend, "/missing");
    assert_eq!(span.attr_int("http.response.status_code"), Some(404), "span:\n  {span}");
    assert!(!span.status_error, "4xx on a SERVER span must stay UNSET; span:\n  {span}");
}

fn assert_query_string_dropped(spans: &[ReceivedSpan], backend: &PyServer) {
    let span = server_span(spans, backend, "/users/7");
    assert_eq!(span.name, "GET /users/*", "span:\n  {span}");
    let leaks: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name.contains("secret") || s.attr_str("url.path").is_some_and(|p| p.contains('?')))
        .cloned()
        .collect();
    assert!(leaks.is_empty(), "query string leaked into name or url.path:\n{}", describe(&leaks));
}

fn assert_backend_resource(spans: &[ReceivedSpan], backend: &PyServer) {
    let span = server_span(spans, backend, "/users/42");
    assert_eq!(span.service_name(), Some("backend"), "service.name from backend.py; span:\n  {span}");
    assert_eq!(span.resource_int("process.pid"), Some(i64::from(backend.pid())), "span:\n  {span}");
    assert_eq!(span.resource_str("telemetry.sdk.name"), Some("zerotel"), "span:\n  {span}");
    assert!(span.resource_str("process.executable.name").is_some_and(|n| n.starts_with("python")), "span:\n  {span}");
    assert!(span.resource_str("host.name").is_some_and(|n| !n.is_empty()), "span:\n  {span}");
}

fn assert_service_name_from_env(spans: &[ReceivedSpan], checkout: &PyServer) {
    let span = server_span(spans, checkout, "/users/1");
    assert_eq!(span.service_name(), Some("checkout"), "OTEL_SERVICE_NAME wins; span:\n  {span}");
    assert_eq!(span.resource_int("process.pid"), Some(i64::from(checkout.pid())), "span:\n  {span}");
}
