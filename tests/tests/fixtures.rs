//! Self-tests of the fixtures (no agent, no root needed): the servers answer
//! as the agent tests expect, clients report what they should, and the OTLP
//! receiver decodes both transports.

use std::process::Command;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use zerotel_tests::clients::{parse_curl_output, parse_urllib_output, KeepAliveClient};
use zerotel_tests::util::TempDir;
use zerotel_tests::{
    curl, curl_args, curl_args_many, paused_client, paused_urllib_client, run_curl, Nginx, NodeServer, OtlpReceiver,
    Protocol, PyServer, SpanKind, Value, SPAN_TIMEOUT,
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
