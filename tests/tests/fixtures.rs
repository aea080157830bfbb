//! Self-tests of the fixtures (no agent, no root needed): the servers answer
//! as the agent tests expect, clients report what they should, the OTLP
//! receiver decodes both transports, and the fake Kubernetes API lists,
//! watches and serves objects like a kube-apiserver.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use zerotel_tests::clients::{parse_curl_output, parse_urllib_output, KeepAliveClient};
use zerotel_tests::kube_api::{pod, replica_set, ContainerSpec, PodSpec};
use zerotel_tests::postgres::psycopg_python;
use zerotel_tests::util::{http_get, TempDir};
use zerotel_tests::{
    curl, curl_args, curl_args_many, paused_client, paused_urllib_client, run_curl, FakeKubeApi, Nginx, NodeServer,
    OtlpReceiver, Postgres, Protocol, PyServer, SpanKind, Value, SPAN_TIMEOUT,
};

#[test]
fn python_server_routes() {
    let backend = PyServer::start("backend.py");
    assert_eq!(curl(&backend.url("/users/42"), &[]).status, 200);
    assert_eq!(curl(&backend.url("/error"), &[]).status, 500);
    assert_eq!(curl(&backend.url("/missing"), &[]).status, 404);
    assert_eq!(curl(&backend.url("/users/7?secret=x"), &[]).status, 200);
    assert_eq!(curl(&backend.url("/users/1"), &["-X", "POST", "-d", "hello"]).status, 200);

    let frontend = PyServer::start("frontend.py");
    let chain = frontend.url(&format!("/chain?to={}", backend.url("/users/1")));
    assert_eq!(curl(&chain, &[]).status, 200, "frontend stderr:\n{}", frontend.stderr());
}

#[test]
fn python_server_keeps_connections_alive() {
    let server = PyServer::start("backend.py");
    let urls = [server.url("/users/1"), server.url("/error"), server.url("/users/2")];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let connects: Vec<u32> = run_curl(&curl_args_many(&urls, &[])).iter().map(|r| r.num_connects).collect();
    assert_eq!(connects, [1, 0, 0]);
}

#[test]
fn node_server_routes() {
    let node = NodeServer::start();
    assert_eq!(curl(&node.url("/hello"), &[]).status, 200);
    assert_eq!(curl(&node.url("/boom"), &[]).status, 500);
    assert_eq!(curl(&node.url("/items/9"), &[]).status, 200);
    let headers = curl_headers(&node.url("/items/9"));
    assert!(headers.to_lowercase().contains("transfer-encoding: chunked"), "headers:\n{headers}");
}

fn curl_headers(url: &str) -> String {
    let output = Command::new("curl").args(["-sS", "-o", "/dev/null", "-D", "-", url]).output().expect("run curl");
    assert!(output.status.success(), "curl -D - {url}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn nginx_routes_and_processes() {
    let nginx = Nginx::start();
    assert_eq!(nginx.pids().len(), 2, "master and one worker: {:?}", nginx.pids());
    assert_eq!(curl(&nginx.url("/ok"), &[]).status, 200, "error.log:\n{}", nginx.error_log());
    assert_eq!(curl(&nginx.url("/static/file.bin"), &[]).status, 200, "error.log:\n{}", nginx.error_log());
    assert_eq!(curl(&nginx.url("/fail"), &[]).status, 503);
    let urls = [nginx.url("/ok"), nginx.url("/static/file.bin"), nginx.url("/fail")];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let connects: Vec<u32> = run_curl(&curl_args_many(&urls, &[])).iter().map(|r| r.num_connects).collect();
    assert_eq!(connects, [1, 0, 0]);
}

#[test]
fn paused_client_keeps_its_pid_until_released() {
    let server = PyServer::start("backend.py");
    let client = paused_client(&curl_args(&server.url("/users/5"), &[]));
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", client.pid())).expect("read paused client comm");
    assert_eq!(comm.trim(), "sh", "the client waits in sh until released");
    let results = parse_curl_output(&client.release());
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, 200);
    assert!(!results[0].time_total.is_zero(), "{results:?}");
}

#[test]
fn urllib_client_reports_status_and_elapsed_time() {
    let server = PyServer::start("backend.py");
    let result = parse_urllib_output(&paused_urllib_client(&server.url("/missing")).release());
    assert_eq!(result.status, 404);
    assert!(result.elapsed_ns > 0, "{result:?}");
}

#[test]
fn keep_alive_client_reuses_its_connection() {
    let server = PyServer::start("backend.py");
    let (mut client, first) = KeepAliveClient::connect(server.port(), "/users/1", "/missing");
    let second = client.send_second();
    assert_eq!((first.status, second.status), (200, 404));
    assert!(first.local_port.is_some() && first.local_port == second.local_port, "{first:?} {second:?}");
}

fn sample_export() -> ExportTraceServiceRequest {
    let string_kv = |key: &str, value: &str| KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_string())) }),
        ..Default::default()
    };
    let int_kv = |key: &str, value: i64| KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::IntValue(value)) }),
        ..Default::default()
    };
    let span = Span {
        trace_id: vec![0xab; 16],
        span_id: vec![0x01; 8],
        name: "GET /users/*".to_string(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 5_000,
        attributes: vec![string_kv("url.path", "/users/1"), int_kv("http.response.status_code", 500)],
        status: Some(Status { code: status::StatusCode::Error as i32, ..Default::default() }),
        ..Default::default()
    };
    let resource = Resource { attributes: vec![int_kv("process.pid", 4242)], ..Default::default() };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    }
}

fn assert_sample_received(receiver: &OtlpReceiver) {
    let span = receiver.wait_for_span(|s| s.is(SpanKind::Server, 4242, "/users/1"), SPAN_TIMEOUT);
    assert_eq!(span.trace_id, "ab".repeat(16));
    assert_eq!(span.span_id, "01".repeat(8));
    assert!(span.is_root());
    assert_eq!(span.duration_ns(), 4_000);
    assert!(span.status_error);
    assert_eq!(span.attr_int("http.response.status_code"), Some(500));
    assert_eq!(span.attributes.get("url.path"), Some(&Value::Str("/users/1".to_string())));
}

#[test]
fn otlp_receiver_accepts_grpc() {
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let mut client = TraceServiceClient::connect(receiver.endpoint()).await.expect("connect to receiver");
        client.export(sample_export()).await.expect("gRPC export");
    });
    assert_sample_received(&receiver);
}

#[test]
fn otlp_receiver_accepts_http_protobuf() {
    let receiver = OtlpReceiver::start(Protocol::HttpProtobuf);
    let files = TempDir::new("otlp-body");
    let body = files.write("export.pb", sample_export().encode_to_vec());
    let data = format!("@{}", body.display());
    let extra = ["-H", "Content-Type: application/x-protobuf", "--data-binary", &data];
    assert_eq!(curl(&receiver.endpoint(), &extra).status, 200);
    assert_sample_received(&receiver);
}

/// A pod of namespace `shop` owned by ReplicaSet `web-5d8f7c9b4`, on `node`.
fn shop_pod(name: &str, uid: &str, node: &str) -> serde_json::Value {
    let container_id = "ab".repeat(32);
    let containers = [ContainerSpec { name: "app", container_id: &container_id, env: &[("OTEL_SERVICE_NAME", name)] }];
    pod(&PodSpec {
        namespace: "shop",
        name,
        uid,
        node,
        labels: &[("app", name)],
        owner: Some(("ReplicaSet", "web-5d8f7c9b4")),
        containers: &containers,
    })
}

/// GETs `path` from the fake API and parses the JSON body; returns (status, body).
fn kube_get(api: &FakeKubeApi, path: &str) -> (u16, serde_json::Value) {
    let response = http_get(api.addr(), path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let body = serde_json::from_str(&response.body).unwrap_or_else(|e| panic!("GET {path}: {e}: {:?}", response.body));
    (response.status, body)
}

fn item_names(list: &serde_json::Value) -> Vec<&str> {
    let items = list["items"].as_array().unwrap_or_else(|| panic!("no items in {list}"));
    items.iter().map(|item| item["metadata"]["name"].as_str().unwrap_or("<no name>")).collect()
}

/// (type, metadata.name) of each line of a watch response body.
fn watch_events(body: &str) -> Vec<(String, String)> {
    let event = |line: &str| {
        let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("watch line {line:?}: {e}"));
        let name = json["object"]["metadata"]["name"].as_str().unwrap_or("").to_string();
        (json["type"].as_str().unwrap_or("").to_string(), name)
    };
    body.lines().map(event).collect()
}

#[test]
fn fake_kube_api_lists_watches_and_gets_like_an_apiserver() {
    let api = FakeKubeApi::start();
    api.upsert_pod(shop_pod("web-1", "uid-web-1", "node-a"));
    api.upsert_pod(shop_pod("db-1", "uid-db-1", "node-b"));
    api.put_object(replica_set("shop", "web-5d8f7c9b4", "uid-rs", Some("web")));

    // What kube-rs 5's watcher sends first (ListWatch, page size 500).
    let (status, list) = kube_get(&api, "/api/v1/pods?&fieldSelector=spec.nodeName%3Dnode-a&limit=500");
    assert_eq!((status, list["kind"].as_str()), (200, Some("PodList")), "{list}");
    assert_eq!(item_names(&list), ["web-1"], "only node-a's pods: {list}");
    assert!(list["items"][0]["metadata"]["resourceVersion"].is_string(), "{list}");
    let version = list["metadata"]["resourceVersion"].as_str().unwrap_or_else(|| panic!("no resourceVersion: {list}"));

    // Then a watch from the list's version; it ends after timeoutSeconds.
    let watch_path = format!(
        "/api/v1/pods?&watch=true&timeoutSeconds=1&fieldSelector=spec.nodeName%3Dnode-a&allowWatchBookmarks=true&resourceVersion={version}"
    );
    let addr = api.addr();
    let started = Instant::now();
    let watch = thread::spawn(move || http_get(addr, &watch_path));
    api.wait_for_request("watch", |line| line.contains("watch=true"), Duration::from_secs(1));
    api.upsert_pod(shop_pod("web-2", "uid-web-2", "node-a"));
    api.upsert_pod(shop_pod("db-2", "uid-db-2", "node-b"));
    let response = watch.join().expect("watch thread").expect("watch request");
    assert!(started.elapsed() >= Duration::from_secs(1), "the watch ended before timeoutSeconds");
    assert_eq!(response.status, 200);
    assert_eq!(watch_events(&response.body), [("ADDED".to_string(), "web-2".to_string())], "{}", response.body);

    let (status, rs) = kube_get(&api, "/apis/apps/v1/namespaces/shop/replicasets/web-5d8f7c9b4");
    assert_eq!((status, rs["metadata"]["ownerReferences"][0]["name"].as_str()), (200, Some("web")), "{rs}");
    let (status, missing) = kube_get(&api, "/apis/batch/v1/namespaces/shop/jobs/nightly");
    assert_eq!((status, missing["kind"].as_str(), missing["reason"].as_str()), (404, Some("Status"), Some("NotFound")));
    assert_eq!(missing["message"], "jobs.batch \"nightly\" not found", "{missing}");
    assert!(
        api.requests().iter().any(|line| line.starts_with("GET /api/v1/pods?&fieldSelector=")),
        "{:?}",
        api.requests()
    );
}

#[test]
fn fake_kube_api_outage_closes_watches_and_answers_500() {
    let api = FakeKubeApi::start();
    let addr = api.addr();
    let watch = thread::spawn(move || http_get(addr, "/api/v1/pods?watch=1&resourceVersion=0"));
    api.wait_for_request("watch", |line| line.contains("watch=1"), Duration::from_secs(1));
    api.set_unavailable(true);
    let response = watch.join().expect("watch thread").expect("watch request");
    assert_eq!((response.status, response.body.as_str()), (200, ""), "the open watch just ends");
    let (status, body) = kube_get(&api, "/api/v1/pods");
    assert_eq!((status, body["code"].as_u64()), (500, Some(500)), "{body}");
    api.set_unavailable(false);
    assert_eq!(kube_get(&api, "/api/v1/pods").0, 200);
}

/// Prepares a parameterised query (extended protocol), runs it twice and
/// prints "<name> <server major> <prepared statements of the session>".
const PSYCOPG_PREPARED_QUERY: &str = r#"
import sys
import psycopg

with psycopg.connect(sys.argv[1]) as conn:
    for _ in range(2):
        name = conn.execute("SELECT name FROM items WHERE id = %s", (1,), prepare=True).fetchone()[0]
    prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
    print(name, conn.info.server_version // 10000, prepared)
"#;

#[test]
fn postgres_serves_psql_psycopg_and_pgbench() {
    let started = Instant::now();
    let postgres = Postgres::start();
    let (ok, stdout, stderr) = postgres.psql(
        "CREATE TABLE items (id int PRIMARY KEY, name text); \
         INSERT INTO items VALUES (1, 'one'), (2, 'two'); \
         SELECT name FROM items WHERE id = 2;",
    );
    assert!(ok, "psql failed: {stderr}\nserver log:\n{}", postgres.log());
    let rows: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(rows, ["name", "------", "two", "(1 row)", ""], "psql stdout:\n{stdout}");
    let (ok, _, stderr) = postgres.psql("SELECT * FROM missing");
    assert!(!ok && stderr.contains("relation \"missing\" does not exist"), "psql stderr: {stderr}");

    let output = Command::new(psycopg_python())
        .args(["-c", PSYCOPG_PREPARED_QUERY, &postgres.conninfo()])
        .output()
        .expect("run the psycopg script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "psycopg script failed: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.trim(), "one 15 1", "name, server major, prepared statements");

    let output = postgres.pgbench_command("prepared", 20).output().expect("run pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("query mode: prepared"), "pgbench stdout:\n{stdout}");
    assert!(stdout.contains("number of transactions actually processed: 20/20"), "pgbench stdout:\n{stdout}");
    eprintln!("postgres fixture test took {:?}", started.elapsed());
}
