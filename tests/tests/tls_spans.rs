//! TLS through the OpenSSL uprobes: curl and Python urllib (the system libssl) against nginx
//! and a Python ssl server, node's https client and server (OpenSSL inside the node binary, on
//! memory BIOs), both ends traced, and psql against PostgreSQL with `ssl=on`. The spans are those
//! the same requests give over plain HTTP, with `url.scheme=https`; the ciphertext never becomes a
//! span. Trace context goes from a traced client to a traced server in a TCP header option.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use zerotel_tests::clients::{parse_curl_output, parse_urllib_output, PausedClient};
use zerotel_tests::otlp::Value;
use zerotel_tests::postgres::Postgres;
use zerotel_tests::print::{parse_print_output, PrintedSpan};
use zerotel_tests::util::poll_until;
use zerotel_tests::servers::Nginx;
use zerotel_tests::tls::SelfSignedCert;
use zerotel_tests::{
    curl_args_many, describe, find_span, paused_asyncio_client, paused_client, paused_node_client, paused_node_grpc_client,
    paused_urllib_client, pid_args, propagating_pid_args, require_kernel, Agent, NodeGrpcServer, NodeServer, OtlpReceiver, Protocol, PyServer, ReceivedSpan, SpanKind,
    SPAN_TIMEOUT,
};

/// Attributes that differ between two runs of the same request (ports, and the scheme itself).
const PER_RUN: [&str; 5] = ["url.scheme", "url.full", "server.port", "network.peer.port", "client.address"];

/// What must be equal between the plaintext and the TLS span of a request.
fn comparable(span: &ReceivedSpan) -> (String, SpanKind, bool, BTreeMap<String, Value>) {
    let attributes = span.attributes.iter().filter(|(k, _)| !PER_RUN.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    (span.name.clone(), span.kind, span.status_error, attributes)
}

/// How long to keep listening once the expected spans arrived, so that an extra one would show.
const EXTRA_SPANS_WAIT: Duration = Duration::from_millis(1500);

/// Releases `client` once an agent run with `args` traces it, checks what it printed with `check`,
/// and returns the spans exported: exactly `expected` of them, none more after a settling wait.
fn traced_run(client: PausedClient, args: &[String], expected: usize, check: impl FnOnce(&Output)) -> Vec<ReceivedSpan> {
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(args, Some(&receiver));
    check(&client.release());
    receiver.wait_for(|spans| spans.len() >= expected, SPAN_TIMEOUT);
    std::thread::sleep(EXTRA_SPANS_WAIT);
    let spans = receiver.spans();
    drop(agent);
    assert_eq!(spans.len(), expected, "{}", describe(&spans));
    spans
}

/// `child` continues `parent`'s trace as its direct child.
fn assert_child_of(parent: &ReceivedSpan, child: &ReceivedSpan, what: &str, all: &str) {
    assert_eq!((&child.trace_id, &child.parent_span_id), (&parent.trace_id, &parent.span_id), "{what}:\n{all}");
}

/// curl fetches /ok and /fail from `nginx` on one connection, both traced: the spans of each side.
fn curl_to_nginx(nginx: &Nginx) -> Vec<ReceivedSpan> {
    let urls = [nginx.url("/ok"), nginx.url("/fail")];
    let curl = paused_client(&curl_args_many(&[urls[0].as_str(), urls[1].as_str()], &["-k"]));
    let curl_pid = curl.pid();
    let mut pids = nginx.pids();
    pids.push(curl_pid);
    let spans = traced_run(curl, &pid_args(&pids), 4, |output| {
        let statuses: Vec<u16> = parse_curl_output(output).iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 503]);
    });
    let all = describe(&spans);
    let of = |kind| spans.iter().filter(|s| s.kind == kind).count();
    assert_eq!((of(SpanKind::Client), of(SpanKind::Server)), (2, 2), "{all}");
    for span in &spans {
        let pid = span.pid().expect("process.pid");
        assert_eq!(span.kind == SpanKind::Client, pid == curl_pid, "{all}");
    }
    spans
}

#[test]
fn curl_to_nginx_over_tls_gives_the_spans_plaintext_gives() {
    if !require_kernel() {
        return;
    }
    let cert = SelfSignedCert::new();
    let (plain, tls) = (Nginx::start(), Nginx::start_tls(&cert));
    let plain_spans = curl_to_nginx(&plain);
    let tls_spans = curl_to_nginx(&tls);
    for (kind, path) in [(SpanKind::Client, "/ok"), (SpanKind::Server, "/ok"), (SpanKind::Client, "/fail"), (SpanKind::Server, "/fail")] {
        let what = format!("{kind:?} {path}");
        let find = |spans: &[ReceivedSpan]| find_span(spans, &what, |s| s.kind == kind && s.attr_str("url.path") == Some(path)).clone();
        let (plain_span, tls_span) = (find(&plain_spans), find(&tls_spans));
        assert_eq!(comparable(&tls_span), comparable(&plain_span), "{what}:\n{plain_span}\n{tls_span}");
        assert_eq!(plain_span.attr_str("url.scheme"), Some("http"), "{plain_span}");
        assert_eq!(tls_span.attr_str("url.scheme"), Some("https"), "{tls_span}");
        assert_eq!(tls_span.attr_int("server.port"), Some(i64::from(tls.port())), "{tls_span}");
        if kind == SpanKind::Client {
            assert_eq!(tls_span.attr_str("url.full"), Some(tls.url(path).as_str()), "{tls_span}");
        }
    }
}

/// With no selector the default rules still exclude kube-system and telemetry agents, so the
/// kernel asks which processes are traced, while each OpenSSL file is probed once for every
/// process. curl, started after the agent is ready, and nginx are both traced over TLS.
#[test]
fn the_default_selection_traces_tls_with_one_probe_per_file() {
    if !require_kernel() {
        return;
    }
    let cert = SelfSignedCert::new();
    let nginx = Nginx::start_tls(&cert);
    let agent = Agent::start(&["--print".to_owned()], None);
    let url = nginx.url("/ok");
    let curl = paused_client(&curl_args_many(&[url.as_str()], &["-k"]));
    assert_eq!(parse_curl_output(&curl.release()).iter().map(|r| r.status).collect::<Vec<_>>(), [200]);
    // Everything is traced, this test's own polling of the agent too: only /ok is ours.
    let found = || parse_print_output(&agent.stdout()).into_iter().filter(|s: &PrintedSpan| s.name == "GET /ok").collect::<Vec<_>>();
    poll_until(SPAN_TIMEOUT, || found().len() >= 2);
    let spans = found();
    let printed = spans.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join("\n");
    let kinds: Vec<&str> = spans.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds.len(), 2, "{printed}");
    assert!(kinds.contains(&"CLIENT") && kinds.contains(&"SERVER"), "{printed}");
    let server = spans.iter().find(|s| s.kind == "SERVER").expect("a SERVER span");
    assert_eq!(server.service, "nginx", "{printed}");
    assert!(agent.stderr().contains("TLS: OpenSSL uprobes on"), "{}", agent.stderr());
}

/// Python on every hop (`_ssl`: `SSL_read_ex`/`SSL_write_ex`): urllib calls a front that calls
/// a backend from its handling thread, all over TLS and all traced. One trace: each SERVER span
/// is the child of the CLIENT span that called it (its context came in a TCP option), and the
/// front's call is the child of the request it serves.
#[test]
fn python_over_tls_is_one_trace_through_the_tcp_option() {
    if !require_kernel() {
        return;
    }
    let cert = SelfSignedCert::new();
    let backend = PyServer::start_tls("backend.py", &cert);
    let front = PyServer::start_tls("front.py", &cert);
    let url = front.url(&format!("/chain?to={}", backend.url("/users/7")));
    let client = paused_urllib_client(&url);
    let client_pid = client.pid();
    let args = propagating_pid_args(&[client_pid, front.pid(), backend.pid()]);
    let spans = traced_run(client, &args, 4, |output| assert_eq!(parse_urllib_output(output).status, 200));
    let all = describe(&spans);
    let span = |kind, pid, path: &str| find_span(&spans, &format!("{kind:?} {path} of {pid}"), |s| s.is(kind, pid, path)).clone();
    let urllib = span(SpanKind::Client, client_pid, "/chain");
    let front_server = span(SpanKind::Server, front.pid(), "/chain");
    let front_client = span(SpanKind::Client, front.pid(), "/users/7");
    let backend_server = span(SpanKind::Server, backend.pid(), "/users/7");
    for span in [&urllib, &front_server, &front_client, &backend_server] {
        assert_eq!(span.attr_str("url.scheme"), Some("https"), "{span}");
        assert_eq!(span.attr_int("http.response.status_code"), Some(200), "{span}");
        assert_eq!(span.attr_str("network.protocol.version"), Some("1.1"), "{span}");
    }
    assert!(urllib.is_root(), "{all}");
    let links = [
        (&urllib, &front_server, "the front's SERVER span under urllib's call (TCP option)"),
        (&front_server, &front_client, "the front's call under the request it serves"),
        (&front_client, &backend_server, "the backend's SERVER span under the front's call (TCP option)"),
    ];
    for (parent, child, what) in links {
        assert_child_of(parent, child, what, &all);
    }
}

/// A node client calls `/chain` on a node front, which calls `/items/7` on a node backend, then
/// `/boom` on the front; every hop traced with propagation on. Returns the spans with the pids of
/// client, front and backend.
fn node_chain(tls: Option<&SelfSignedCert>) -> (Vec<ReceivedSpan>, [u32; 3]) {
    let start = || tls.map_or_else(NodeServer::start, NodeServer::start_tls);
    let (backend, front) = (start(), start());
    let chain = front.url(&format!("/chain?to={}", backend.url("/items/7")));
    let client = paused_node_client(&[&chain, &front.url("/boom")], false);
    let pids = [client.pid(), front.pid(), backend.pid()];
    let spans = traced_run(client, &propagating_pid_args(&pids), 6, |output| {
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "200\n500\n");
    });
    (spans, pids)
}

/// Node over HTTPS: its OpenSSL is inside the node binary and works on memory BIOs, so node moves
/// the ciphertext itself, outside the OpenSSL calls. Client, server and a server's own call give
/// the spans plain HTTP gives, and one trace per request through the TCP option.
#[test]
fn node_over_tls_gives_the_spans_plaintext_gives_in_one_trace() {
    if !require_kernel() {
        return;
    }
    let cert = SelfSignedCert::new();
    let (plain, plain_pids) = node_chain(None);
    let (tls, tls_pids) = node_chain(Some(&cert));
    // (kind, index of the process in the pids, path)
    let expected = [
        (SpanKind::Client, 0, "/chain"),
        (SpanKind::Server, 1, "/chain"),
        (SpanKind::Client, 1, "/items/7"),
        (SpanKind::Server, 2, "/items/7"),
        (SpanKind::Client, 0, "/boom"),
        (SpanKind::Server, 1, "/boom"),
    ];
    let find = |spans: &[ReceivedSpan], pids: &[u32; 3], (kind, process, path): (SpanKind, usize, &str)| {
        find_span(spans, &format!("{kind:?} {path} of {}", pids[process]), |s| s.is(kind, pids[process], path)).clone()
    };
    for (spans, pids, scheme) in [(&plain, &plain_pids, "http"), (&tls, &tls_pids, "https")] {
        let all = describe(spans);
        let [client_chain, front_chain, front_call, backend, client_boom, front_boom] = expected.map(|e| find(spans, pids, e));
        for span in [&client_chain, &front_chain, &front_call, &backend, &client_boom, &front_boom] {
            assert_eq!(span.attr_str("url.scheme"), Some(scheme), "{span}");
        }
        assert!(client_chain.is_root() && client_boom.is_root(), "{all}");
        let links = [
            (&client_chain, &front_chain, "the front's SERVER span under the client's call"),
            (&front_chain, &front_call, "the front's call under the request it serves"),
            (&front_call, &backend, "the backend's SERVER span under the front's call"),
            (&client_boom, &front_boom, "the front's /boom under the client's call"),
        ];
        for (parent, child, what) in links {
            assert_child_of(parent, child, &format!("{scheme}: {what}"), &all);
        }
        assert!(front_boom.status_error && client_boom.status_error, "{all}");
    }
    for e in expected {
        let (plain_span, tls_span) = (find(&plain, &plain_pids, e), find(&tls, &tls_pids, e));
        assert_eq!(comparable(&tls_span), comparable(&plain_span), "{e:?}:\n{plain_span}\n{tls_span}");
    }
}

/// Python asyncio's TLS also runs OpenSSL on memory BIOs (its `_ssl` module, the system libssl):
/// two requests on one connection to the Python ssl server give a CLIENT span each, parent of the
/// server's SERVER span through the TCP option.
#[test]
fn python_asyncio_over_tls_is_traced_like_blocking_sockets() {
    if !require_kernel() {
        return;
    }
    let cert = SelfSignedCert::new();
    let server = PyServer::start_tls("backend.py", &cert);
    let (first, second) = (server.url("/users/1"), server.url("/users/2"));
    let client = paused_asyncio_client(&[&first, &second]);
    let client_pid = client.pid();
    let spans = traced_run(client, &propagating_pid_args(&[client_pid, server.pid()]), 4, |output| {
        assert_eq!(String::from_utf8_lossy(&output.stdout), "200\n200\n", "{output:?}");
    });
    let all = describe(&spans);
    for path in ["/users/1", "/users/2"] {
        let client = find_span(&spans, &format!("CLIENT {path}"), |s| s.is(SpanKind::Client, client_pid, path));
        let served = find_span(&spans, &format!("SERVER {path}"), |s| s.is(SpanKind::Server, server.pid(), path));
        assert_eq!(client.attr_str("url.scheme"), Some("https"), "{client}");
        assert_eq!(client.attr_int("http.response.status_code"), Some(200), "{client}");
        assert_child_of(client, served, path, &all);
    }
}

/// A node client opens 8 TLS connections to a node server at once: node handshakes and reads
/// them interleaved on its one thread, and every request still gets the SERVER span of its own
/// connection, under its own CLIENT span.
#[test]
fn node_tls_connections_at_once_are_told_apart() {
    if !require_kernel() {
        return;
    }
    let cert = SelfSignedCert::new();
    let server = NodeServer::start_tls(&cert);
    let urls: Vec<String> = (0..8).map(|n| server.url(&format!("/items/{n}"))).collect();
    let client = paused_node_client(&urls.iter().map(String::as_str).collect::<Vec<_>>(), true);
    let client_pid = client.pid();
    let spans = traced_run(client, &propagating_pid_args(&[client_pid, server.pid()]), 16, |output| {
        assert_eq!(String::from_utf8_lossy(&output.stdout), "200\n".repeat(8), "{output:?}");
    });
    let all = describe(&spans);
    for n in 0..8 {
        let path = format!("/items/{n}");
        let client = find_span(&spans, &format!("CLIENT {path}"), |s| s.is(SpanKind::Client, client_pid, &path));
        let served = find_span(&spans, &format!("SERVER {path}"), |s| s.is(SpanKind::Server, server.pid(), &path));
        assert_child_of(client, served, &path, &all);
        assert_eq!(client.attr_int("network.peer.port"), Some(i64::from(server.port())), "{client}");
    }
}

/// gRPC over TLS on node's own HTTP/2 (the transport grpc-js runs on; ALPN h2): unary calls, one
/// answered OK and one NOT_FOUND, give the client and server spans h2c gives.
#[test]
fn grpc_over_tls_on_node_gives_the_spans_h2c_gives() {
    if !require_kernel() {
        return;
    }
    let paths = ["/demo.Echo/Say", "/demo.Echo/Fail"];
    let run = |server: &NodeGrpcServer| -> (Vec<ReceivedSpan>, u32) {
        let client = paused_node_grpc_client(&server.authority(), &paths);
        let client_pid = client.pid();
        let spans = traced_run(client, &pid_args(&[client_pid, server.pid()]), 4, |output| {
            assert_eq!(String::from_utf8_lossy(&output.stdout), "0\n5\n", "{output:?}");
        });
        (spans, client_pid)
    };
    let cert = SelfSignedCert::new();
    let (h2c, tls) = (NodeGrpcServer::start(), NodeGrpcServer::start_tls(&cert));
    let (h2c_spans, h2c_client) = run(&h2c);
    let (tls_spans, tls_client) = run(&tls);
    for (kind, method) in [(SpanKind::Client, "Say"), (SpanKind::Server, "Say"), (SpanKind::Client, "Fail"), (SpanKind::Server, "Fail")] {
        let what = format!("{kind:?} {method}");
        let find = |spans: &[ReceivedSpan], client_pid: u32, server_pid: u32| {
            let pid = if kind == SpanKind::Client { client_pid } else { server_pid };
            find_span(spans, &what, |s| s.kind == kind && s.pid() == Some(pid) && s.attr_str("rpc.method") == Some(method)).clone()
        };
        let (plain_span, tls_span) = (find(&h2c_spans, h2c_client, h2c.pid()), find(&tls_spans, tls_client, tls.pid()));
        assert_eq!(comparable(&tls_span), comparable(&plain_span), "{what}:\n{plain_span}\n{tls_span}");
        assert_eq!(tls_span.attr_str("rpc.system"), Some("grpc"), "{tls_span}");
        assert_eq!(tls_span.attr_int("rpc.grpc.status_code"), Some(if method == "Fail" { 5 } else { 0 }), "{tls_span}");
        assert_eq!(tls_span.attr_int("server.port"), Some(i64::from(tls.port())), "{tls_span}");
    }
}

/// psql (libpq, the system libssl) with `sslmode=require` against PostgreSQL with `ssl=on`: the
/// session negotiates TLS after its SSLRequest and starts over inside it; its statements give the
/// CLIENT spans they give in plaintext.
#[test]
fn psql_over_tls_gives_the_spans_plaintext_gives() {
    if !require_kernel() {
        return;
    }
    let sql = "CREATE TABLE users (id int, email text); INSERT INTO users VALUES (7, 'ann@example.com'); \
               SELECT email FROM users WHERE id = 7; SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let run = |pg: &Postgres| -> (String, Vec<ReceivedSpan>) {
        let command = pg.psql_command(sql);
        let mut args = vec![command.get_program().to_owned()];
        args.extend(command.get_args().map(ToOwned::to_owned));
        let psql = paused_client(&args);
        let pid = psql.pid();
        let mut stdout = String::new();
        let mut spans = traced_run(psql, &pid_args(&[pid]), 4, |output| {
            assert!(output.status.success(), "{output:?}");
            stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        });
        spans.sort_by_key(|s| s.start_unix_ns);
        (stdout, spans)
    };
    let (plain_out, plain) = run(&Postgres::start());
    let tls_pg = Postgres::start_tls();
    let (tls_out, tls) = run(&tls_pg);
    assert!(plain_out.contains(" f\n") && tls_out.contains(" t\n"), "pg_stat_ssl: {plain_out}\n{tls_out}");
    let names = |spans: &[ReceivedSpan]| spans.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&tls), names(&plain), "{}\n{}", describe(&plain), describe(&tls));
    assert_eq!(names(&tls), ["CREATE users", "INSERT users", "SELECT users", "SELECT pg_stat_ssl"]);
    for (plain_span, tls_span) in plain.iter().zip(&tls) {
        assert_eq!(comparable(tls_span), comparable(plain_span), "{plain_span}\n{tls_span}");
        assert_eq!(tls_span.attr_int("server.port"), Some(i64::from(tls_pg.port())), "{tls_span}");
    }
}
