//! SERVER spans from servers other than Python: nginx (master/worker,
//! sendfile, keep-alive) and node (chunked responses).

use std::thread;
use std::time::Duration;

use zerotel_tests::servers::NGINX_STATIC_FILE_SIZE;
use zerotel_tests::{
    curl, curl_args_many, describe, find_span, pid_args, require_kernel, run_curl, Agent, Nginx, NodeServer,
    OtlpReceiver, Protocol, ReceivedSpan, SpanKind, SPAN_TIMEOUT,
};

fn is_server_span_of(span: &ReceivedSpan, pids: &[u32], path: &str) -> bool {
    span.kind == SpanKind::Server
        && span.pid().is_some_and(|pid| pids.contains(&pid))
        && span.attr_str("url.path") == Some(path)
}

/// Waits until a SERVER span from `pids` exists for each of `paths`.
fn wait_for_server_spans(receiver: &OtlpReceiver, pids: &[u32], paths: &[&str]) -> Vec<ReceivedSpan> {
    receiver
        .wait_for(|spans| paths.iter().all(|path| spans.iter().any(|s| is_server_span_of(s, pids, path))), SPAN_TIMEOUT)
}

fn server_span<'a>(spans: &'a [ReceivedSpan], pids: &[u32], path: &str) -> &'a ReceivedSpan {
    find_span(spans, &format!("SERVER {path} of pids {pids:?}"), |s| is_server_span_of(s, pids, path))
}

/// Asserts name, status code and ERROR status of the SERVER span for `path`.
fn assert_server_span(spans: &[ReceivedSpan], pids: &[u32], path: &str, name: &str, status: i64, error: bool) {
    let span = server_span(spans, pids, path);
    assert_eq!(span.name, name, "span:\n  {span}");
    assert_eq!(span.attr_int("http.response.status_code"), Some(status), "span:\n  {span}");
    assert_eq!(span.status_error, error, "status ERROR expected: {error}; span:\n  {span}");
}

#[test]
fn nginx_requests_yield_server_spans() {
    if !require_kernel() {
        return;
    }
    let nginx = Nginx::start();
    let pids = nginx.pids();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&pid_args(&pids), Some(&receiver));

    assert_eq!(curl(&nginx.url("/ok"), &[]).status, 200);
    let static_fetch = curl(&nginx.url("/static/file.bin"), &[]);
    assert_eq!(static_fetch.status, 200);
    assert_eq!(curl(&nginx.url("/fail"), &[]).status, 503);

    let spans = wait_for_server_spans(&receiver, &pids, &["/ok", "/static/file.bin", "/fail"]);
    assert_server_span(&spans, &pids, "/ok", "GET /ok", 200, false);
    let ok_span = server_span(&spans, &pids, "/ok");
    assert_eq!(ok_span.attr_str("http.route"), Some("/ok"), "span:\n  {ok_span}");
    assert_eq!(ok_span.service_name(), Some("nginx"), "span:\n  {ok_span}");
    assert_eq!(ok_span.attr_int("server.port"), Some(i64::from(nginx.port())), "span:\n  {ok_span}");
    assert_server_span(&spans, &pids, "/static/file.bin", "GET /static/file.bin", 200, false);
    assert_server_span(&spans, &pids, "/fail", "GET /fail", 503, true);
    assert_sendfile_duration_sane(server_span(&spans, &pids, "/static/file.bin"), static_fetch.time_total);
}

/// The 64 KiB sendfile response must end when it is sent, not later.
fn assert_sendfile_duration_sane(span: &ReceivedSpan, client_total: Duration) {
    let duration = Duration::from_nanos(span.duration_ns());
    assert!(
        !duration.is_zero() && duration <= client_total,
        "{NGINX_STATIC_FILE_SIZE}-byte sendfile span lasted {duration:?}, curl's whole transfer {client_total:?}; \
         span:\n  {span}"
    );
}

#[test]
fn nginx_keep_alive_requests_yield_one_span_each() {
    if !require_kernel() {
        return;
    }
    let nginx = Nginx::start();
    let pids = nginx.pids();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&pid_args(&pids), Some(&receiver));

    let paths = ["/ok", "/static/file.bin", "/fail"];
    let urls: Vec<String> = paths.iter().map(|p| nginx.url(p)).collect();
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let results = run_curl(&curl_args_many(&url_refs, &[]));
    let connects: Vec<u32> = results.iter().map(|r| r.num_connects).collect();
    assert_eq!(connects, [1, 0, 0], "curl must reuse one connection; results: {results:?}");

    wait_for_server_spans(&receiver, &pids, &paths);
    // Let any duplicate span arrive before counting.
    thread::sleep(Duration::from_secs(2));
    let spans: Vec<ReceivedSpan> =
        receiver.spans().into_iter().filter(|s| paths.iter().any(|p| is_server_span_of(s, &pids, p))).collect();
    assert_eq!(spans.len(), 3, "one SERVER span per request on the connection:\n{}", describe(&spans));
}

#[test]
fn node_requests_yield_server_spans() {
    if !require_kernel() {
        return;
    }
    let node = NodeServer::start();
    let pids = [node.pid()];
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&pid_args(&pids), Some(&receiver));

    assert_eq!(curl(&node.url("/hello"), &[]).status, 200);
    assert_eq!(curl(&node.url("/boom"), &[]).status, 500);
    assert_eq!(curl(&node.url("/items/9"), &[]).status, 200);

    let spans = wait_for_server_spans(&receiver, &pids, &["/hello", "/boom", "/items/9"]);
    assert_server_span(&spans, &pids, "/hello", "GET /hello", 200, false);
    assert_server_span(&spans, &pids, "/boom", "GET /boom", 500, true);
    assert_server_span(&spans, &pids, "/items/9", "GET /items/*", 200, false);
    let hello_span = server_span(&spans, &pids, "/hello");
    assert_eq!(hello_span.service_name(), Some("server"), "service.name from server.js; span:\n  {hello_span}");
}
