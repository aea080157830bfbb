//! HTTP/2 streams as spans: gRPC calls by the OpenTelemetry RPC conventions
//! (`{rpc.service}/{rpc.method}`, `rpc.grpc.status_code`), other streams as HTTP spans with
//! `network.protocol.version=2`.

use crate::{
    context,
    protocols::{
        http1::{RequestHead, ResponseHead},
        http2::{H2Stream, Headers, StreamOutcome},
    },
    spans::{
        http::{self, Endpoint},
        model::{AttrValue, Attributes, SpanKind, SpanStatus},
    },
};

pub struct RpcSpan {
    pub name: String,
    pub attributes: Attributes,
    pub status: SpanStatus,
}

/// Status codes that make a SERVER span an error (the conventions: the server's fault); a CLIENT
/// span is an error for any code but OK.
const SERVER_ERROR_CODES: [i64; 6] = [2, 4, 12, 13, 14, 15];

/// Whether a request is a gRPC call (`content-type: application/grpc`, `+proto`, `+json`...).
pub fn is_grpc(request: &Headers) -> bool {
    request.get("content-type").is_some_and(|t| t.starts_with("application/grpc"))
}

/// The trace context a request's headers carry (W3C first, B3 as fallback).
pub fn remote_parent(request: &Headers) -> Option<context::RemoteParent> {
    context::extract(&trace_headers(request))
}

/// Trace-context headers, as the HTTP/1 parser keeps them.
const TRACE_HEADERS: [&str; 8] =
    ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"];

fn trace_headers(request: &Headers) -> Vec<(String, String)> {
    request.fields.iter().filter(|(name, _)| TRACE_HEADERS.contains(&name.as_str())).cloned().collect()
}

/// Whether spans read a header field of this name: pseudo-headers, the content type, the gRPC
/// status, trace context. The HTTP/2 decoder keeps only these.
pub fn field_used(name: &[u8]) -> bool {
    name.first() == Some(&b':')
        || matches!(name, b"content-type" | b"grpc-status")
        || TRACE_HEADERS.iter().any(|known| known.as_bytes() == name)
}

pub fn describe(kind: SpanKind, stream: &H2Stream, local: Endpoint<'_>, remote: Endpoint<'_>, tls: bool) -> RpcSpan {
    if is_grpc(&stream.request) {
        describe_grpc(kind, stream, if kind == SpanKind::Server { local } else { remote })
    } else {
        describe_http(kind, stream, local, remote, tls)
    }
}

fn describe_grpc(kind: SpanKind, stream: &H2Stream, server: Endpoint<'_>) -> RpcSpan {
    let path = stream.request.get(":path").unwrap_or_default();
    let (service, method) = split_grpc_path(path);
    let name = if service.is_empty() { path.to_owned() } else { format!("{service}/{method}") };
    let mut attributes: Attributes = vec![
        ("rpc.system".into(), "grpc".into()),
        ("rpc.service".into(), service.to_owned().into()),
        ("rpc.method".into(), method.to_owned().into()),
        ("network.protocol.name".into(), "http".into()),
        ("network.protocol.version".into(), "2".into()),
        ("server.address".into(), server_address(&stream.request, server.ip).into()),
        ("server.port".into(), AttrValue::Int(server.addr.port().into())),
    ];
    let status = match stream.grpc_status().map(i64::from) {
        Some(code) => {
            attributes.push(("rpc.grpc.status_code".into(), AttrValue::Int(code)));
            let error = if kind == SpanKind::Server { SERVER_ERROR_CODES.contains(&code) } else { code != 0 };
            if error {
                attributes.push(("error.type".into(), code.to_string().into()));
            }
            if error { SpanStatus::Error } else { SpanStatus::Unset }
        }
        None => {
            attributes.push(("error.type".into(), unfinished(stream.outcome).into()));
            SpanStatus::Error
        }
    };
    RpcSpan { name, attributes, status }
}

/// `/package.Service/Method` -> (`package.Service`, `Method`); anything else -> ("", "").
fn split_grpc_path(path: &str) -> (&str, &str) {
    path.strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .filter(|(service, method)| !service.is_empty() && !method.is_empty() && !method.contains('/'))
        .unwrap_or(("", ""))
}

/// Why a stream ended without its outcome.
fn unfinished(outcome: StreamOutcome) -> &'static str {
    match outcome {
        StreamOutcome::Reset { .. } => "stream_reset",
        StreamOutcome::GoAway { .. } => "goaway",
        StreamOutcome::ConnectionClosed | StreamOutcome::Complete => "connection_closed",
    }
}

fn server_address(request: &Headers, fallback: &str) -> String {
    request.get(":authority").map(http::host_only).filter(|h| !h.is_empty()).unwrap_or(fallback).to_owned()
}

fn describe_http(kind: SpanKind, stream: &H2Stream, local: Endpoint<'_>, remote: Endpoint<'_>, tls: bool) -> RpcSpan {
    let request = RequestHead {
        method: stream.request.get(":method").unwrap_or_default().to_owned(),
        target: stream.request.get(":path").unwrap_or_default().to_owned(),
        version_minor: 1,
        host: stream.request.get(":authority").map(str::to_owned),
        context: Vec::new(),
        truncated: false,
    };
    let status = stream.response.as_ref().and_then(|r| r.get(":status")).and_then(|s| s.parse::<u16>().ok());
    let response = status.map(|status| ResponseHead { status, version_minor: 1 });
    let exchange = http::Exchange { kind, request: &request, response: response.as_ref(), version: "2", local, remote, tls };
    let span = http::describe(&exchange);
    RpcSpan { name: span.name, attributes: span.attributes, status: span.status }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn headers(fields: &[(&str, &str)]) -> Headers {
        Headers { fields: fields.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect() }
    }

    #[test]
    fn the_decoder_keeps_the_fields_spans_read() {
        for used in [":path", ":status", "content-type", "grpc-status", "traceparent", "tracestate", "b3", "x-b3-sampled"] {
            assert!(field_used(used.as_bytes()), "{used}");
        }
        for unused in ["user-agent", "grpc-message", "te", "date", "content-length", "x-api-key", "authorization"] {
            assert!(!field_used(unused.as_bytes()), "{unused}");
        }
    }

    fn stream(request: Headers, response: Option<Headers>, trailers: Option<Headers>) -> H2Stream {
        H2Stream {
            stream_id: 1,
            request,
            response,
            trailers,
            start_ns: 1,
            end_ns: 2,
            request_body_bytes: 0,
            response_body_bytes: 0,
            outcome: StreamOutcome::Complete,
        }
    }

    fn grpc_call(status: &str, trailers_only: bool) -> H2Stream {
        let request = headers(&[
            (":method", "POST"),
            (":path", "/demo.Echo/Unary"),
            (":authority", "localhost:50051"),
            ("content-type", "application/grpc"),
        ]);
        let status = headers(&[(":status", "200"), ("grpc-status", status)]);
        if trailers_only {
            stream(request, Some(status), None)
        } else {
            stream(request, Some(headers(&[(":status", "200")])), Some(status))
        }
    }

    fn attr<'a>(span: &'a RpcSpan, key: &str) -> Option<&'a AttrValue> {
        span.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn run(kind: SpanKind, stream: &H2Stream) -> RpcSpan {
        let addr: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let endpoint = Endpoint { addr, ip: "127.0.0.1" };
        describe(kind, stream, endpoint, endpoint, false)
    }

    #[test]
    fn grpc_calls_are_named_by_service_and_method() {
        let span = run(SpanKind::Server, &grpc_call("0", false));
        assert_eq!(span.name, "demo.Echo/Unary");
        assert_eq!(attr(&span, "rpc.system"), Some(&AttrValue::from("grpc")));
        assert_eq!(attr(&span, "rpc.service"), Some(&AttrValue::from("demo.Echo")));
        assert_eq!(attr(&span, "rpc.method"), Some(&AttrValue::from("Unary")));
        assert_eq!(attr(&span, "rpc.grpc.status_code"), Some(&AttrValue::Int(0)));
        assert_eq!(attr(&span, "server.address"), Some(&AttrValue::from("localhost".to_owned())));
        assert_eq!(span.status, SpanStatus::Unset);
    }

    #[test]
    fn server_errors_are_the_servers_fault_only_client_errors_any_non_ok() {
        for (code, server_error) in [("2", true), ("3", false), ("5", false), ("13", true), ("14", true), ("16", false)] {
            let server = run(SpanKind::Server, &grpc_call(code, true));
            assert_eq!(server.status == SpanStatus::Error, server_error, "server, code {code}");
            let client = run(SpanKind::Client, &grpc_call(code, false));
            assert_eq!(client.status, SpanStatus::Error, "client, code {code}");
            assert_eq!(attr(&client, "rpc.grpc.status_code"), Some(&AttrValue::Int(code.parse().unwrap())));
        }
    }

    #[test]
    fn a_call_without_status_is_an_error_saying_why() {
        let mut call = grpc_call("0", false);
        call.trailers = None;
        call.response = None;
        call.outcome = StreamOutcome::Reset { error_code: 8 };
        let span = run(SpanKind::Client, &call);
        assert_eq!(span.status, SpanStatus::Error);
        assert_eq!(attr(&span, "error.type"), Some(&AttrValue::from("stream_reset")));
    }

    #[test]
    fn plain_http2_streams_are_http_spans_of_version_2() {
        let request = headers(&[(":method", "GET"), (":path", "/files/42?x=1"), (":authority", "example:8080")]);
        let span = run(SpanKind::Server, &stream(request, Some(headers(&[(":status", "404")])), None));
        assert_eq!(span.name, "GET /files/*");
        assert_eq!(attr(&span, "network.protocol.version"), Some(&AttrValue::from("2")));
        assert_eq!(attr(&span, "http.response.status_code"), Some(&AttrValue::Int(404)));
        assert_eq!(attr(&span, "url.path"), Some(&AttrValue::from("/files/42".to_owned())));
    }

    #[test]
    fn grpc_paths_split_only_when_well_formed() {
        assert_eq!(split_grpc_path("/a.B/C"), ("a.B", "C"));
        for bad in ["", "/", "/a.B", "/a.B/", "//C", "/a/b/c", "a.B/C"] {
            assert_eq!(split_grpc_path(bad), ("", ""), "{bad}");
        }
    }

    #[test]
    fn trace_context_comes_from_request_headers() {
        let request = headers(&[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]);
        let parent = remote_parent(&request).expect("a parent");
        assert_eq!(parent.span_id, [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]);
        assert!(remote_parent(&headers(&[])).is_none());
    }
}
