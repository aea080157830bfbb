//! Our span model to OTLP's wire types (the OpenTelemetry project's generated protobuf).
//!
//! One request carries every resource of a batch: spans are grouped by resource content,
//! since pointers are not stable (a new process may get an `Arc` at the address of a dead one).

use std::{collections::HashMap, sync::Arc};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource as ProtoResource,
    trace::v1::{self as proto, span, status, ResourceSpans, ScopeSpans},
};

use crate::spans::model::{AttrValue, Attributes, Resource, Span, SpanKind, SpanLink, SpanStatus};

/// W3C trace flags: bit 0 is "sampled". OTLP keeps them in the low byte of `flags`, and bits
/// 8 and 9 say whether the parent is known to be remote.
const CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const CONTEXT_IS_REMOTE: u32 = 0x200;

/// One export request for `spans`: a `ResourceSpans` per distinct resource, in first-seen order.
pub(super) fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    let mut groups: Vec<(Arc<Resource>, Vec<proto::Span>)> = Vec::new();
    let mut index: HashMap<Arc<Resource>, usize> = HashMap::new();
    for span in spans {
        let slot = match groups.last() {
            // Runs of one process are the common case: no hashing for them.
            Some((last, _)) if Arc::ptr_eq(last, &span.resource) => groups.len() - 1,
            _ => *index.entry(Arc::clone(&span.resource)).or_insert_with(|| {
                groups.push((Arc::clone(&span.resource), Vec::new()));
                groups.len() - 1
            }),
        };
        groups[slot].1.push(proto_span(span));
    }
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(resource, spans)| ResourceSpans {
                resource: Some(proto_resource(&resource)),
                scope_spans: vec![ScopeSpans { scope: Some(scope()), spans, schema_url: String::new() }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

/// The scope every exported span carries.
fn scope() -> InstrumentationScope {
    InstrumentationScope { name: "zerotel".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }
}

fn proto_resource(resource: &Resource) -> ProtoResource {
    ProtoResource { attributes: key_values(resource.attributes.clone()), ..Default::default() }
}

fn proto_span(span: Span) -> proto::Span {
    let remote_bits = match span.parent_span_id {
        Some(_) if parent_is_remote(span.kind) => CONTEXT_HAS_IS_REMOTE | CONTEXT_IS_REMOTE,
        _ => CONTEXT_HAS_IS_REMOTE,
    };
    proto::Span {
        trace_id: span.trace_id.to_vec(),
        span_id: span.span_id.to_vec(),
        // A malformed tracestate from the wire must not cost us the span.
        trace_state: if valid_tracestate(&span.trace_state) { span.trace_state } else { String::new() },
        parent_span_id: span.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(span.trace_flags) | remote_bits,
        name: span.name,
        kind: kind(span.kind) as i32,
        start_time_unix_nano: span.start_unix_ns,
        end_time_unix_nano: span.end_unix_ns,
        attributes: key_values(span.attributes),
        links: span.links.iter().map(link).collect(),
        status: Some(proto::Status {
            code: match span.status {
                SpanStatus::Unset => status::StatusCode::Unset,
                SpanStatus::Error => status::StatusCode::Error,
            } as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}

fn link(link: &SpanLink) -> span::Link {
    span::Link {
        trace_id: link.trace_id.to_vec(),
        span_id: link.span_id.to_vec(),
        flags: u32::from(link.trace_flags) | CONTEXT_HAS_IS_REMOTE | CONTEXT_IS_REMOTE,
        ..Default::default()
    }
}

/// Server/consumer spans continue a context received from another process; client/producer
/// spans are children of a span in the same process.
fn parent_is_remote(kind: SpanKind) -> bool {
    matches!(kind, SpanKind::Server | SpanKind::Consumer)
}

fn kind(kind: SpanKind) -> span::SpanKind {
    match kind {
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Producer => span::SpanKind::Producer,
        SpanKind::Consumer => span::SpanKind::Consumer,
    }
}

fn key_values(attributes: Attributes) -> Vec<KeyValue> {
    attributes
        .into_iter()
        .map(|(k, v)| KeyValue { key: k.into_owned(), value: Some(AnyValue { value: Some(value(v)) }), ..Default::default() })
        .collect()
}

fn value(v: AttrValue) -> any_value::Value {
    match v {
        AttrValue::Str(s) => any_value::Value::StringValue(s.into_owned()),
        AttrValue::Int(i) => any_value::Value::IntValue(i),
        AttrValue::Bool(b) => any_value::Value::BoolValue(b),
    }
}

/// W3C tracestate: at most 32 `key=value` members; keys are lowercase `a-z0-9_-*/@`, values
/// printable ASCII without `,` and `=`, not ending in a space.
fn valid_tracestate(state: &str) -> bool {
    if state.is_empty() {
        return true;
    }
    let members: Vec<&str> = state.split(',').map(|m| m.trim_matches([' ', '\t'])).filter(|m| !m.is_empty()).collect();
    members.len() <= 32
        && members.iter().all(|member| {
            let Some((key, value)) = member.split_once('=') else { return false };
            let key_ok = (1..=256).contains(&key.len())
                && key.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/' | b'@'));
            let value_ok = (1..=256).contains(&value.len())
                && !value.ends_with(' ')
                && value.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=');
            key_ok && value_ok
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_span() -> Span {
        Span {
            trace_id: [0x11; 16],
            span_id: [0x22; 8],
            parent_span_id: Some([0x33; 8]),
            trace_flags: 1,
            trace_state: "vendor=abc,other=1".into(),
            kind: SpanKind::Server,
            name: "GET /users/{id}".into(),
            start_unix_ns: 1_700_000_000_123_456_789,
            end_unix_ns: 1_700_000_000_125_456_789,
            attributes: vec![
                ("http.request.method".into(), "GET".into()),
                ("http.response.status_code".into(), 500i64.into()),
                ("network.peer.cached".into(), true.into()),
            ],
            status: SpanStatus::Error,
            links: vec![SpanLink { trace_id: [0x44; 16], span_id: [0x55; 8], trace_flags: 1 }],
            resource: Arc::new(Resource { attributes: vec![("service.name".into(), "svc".into())] }),
        }
    }

    fn only_span(request: &ExportTraceServiceRequest) -> &proto::Span {
        &request.resource_spans[0].scope_spans[0].spans[0]
    }

    #[test]
    fn converts_ids_kind_times_attributes_status() {
        let request = request(vec![sample_span()]);
        let d = only_span(&request);
        assert_eq!((d.trace_id.as_slice(), d.span_id.as_slice()), ([0x11; 16].as_slice(), [0x22; 8].as_slice()));
        assert_eq!(d.parent_span_id, vec![0x33; 8]);
        assert_eq!(d.flags, 1 | CONTEXT_HAS_IS_REMOTE | CONTEXT_IS_REMOTE, "sampled, remote parent");
        assert_eq!(d.trace_state, "vendor=abc,other=1");
        assert_eq!(d.links[0].trace_id, vec![0x44; 16]);
        assert_eq!(d.links[0].flags, 1 | CONTEXT_HAS_IS_REMOTE | CONTEXT_IS_REMOTE);
        assert_eq!(d.kind, span::SpanKind::Server as i32);
        assert_eq!(d.name, "GET /users/{id}");
        assert_eq!(d.end_time_unix_nano - d.start_time_unix_nano, 2_000_000);
        let attrs: Vec<(&str, &Option<any_value::Value>)> =
            d.attributes.iter().map(|kv| (kv.key.as_str(), &kv.value.as_ref().unwrap().value)).collect();
        assert_eq!(
            attrs,
            vec![
                ("http.request.method", &Some(any_value::Value::StringValue("GET".into()))),
                ("http.response.status_code", &Some(any_value::Value::IntValue(500))),
                ("network.peer.cached", &Some(any_value::Value::BoolValue(true))),
            ]
        );
        assert_eq!(d.status.as_ref().unwrap().code, status::StatusCode::Error as i32);
        let scope = request.resource_spans[0].scope_spans[0].scope.as_ref().unwrap();
        assert_eq!((scope.name.as_str(), scope.version.as_str()), ("zerotel", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn root_client_unset_and_bad_tracestate() {
        let mut s = sample_span();
        s.parent_span_id = None;
        s.kind = SpanKind::Client;
        s.status = SpanStatus::Unset;
        s.trace_flags = 0;
        s.trace_state = "not a valid=tracestate===".into();
        let request = request(vec![s]);
        let d = only_span(&request);
        assert!(d.parent_span_id.is_empty());
        assert_eq!(d.flags, CONTEXT_HAS_IS_REMOTE, "not sampled, parent not remote");
        assert_eq!(d.kind, span::SpanKind::Client as i32);
        assert_eq!(d.status.as_ref().unwrap().code, status::StatusCode::Unset as i32);
        assert_eq!(d.trace_state, "");

        let mut c = sample_span();
        c.kind = SpanKind::Client;
        assert_eq!(only_span(&super::request(vec![c])).flags, 1 | CONTEXT_HAS_IS_REMOTE, "local parent");
    }

    #[test]
    fn spans_are_grouped_by_resource_content() {
        let resource = |service: &'static str| Arc::new(Resource { attributes: vec![("service.name".into(), service.into())] });
        let (a, b) = (resource("a"), resource("b"));
        // Same content, another allocation: the same resource.
        let a_again = resource("a");
        let mut spans = Vec::new();
        for r in [&a, &b, &a_again, &a] {
            let mut s = sample_span();
            s.resource = Arc::clone(r);
            spans.push(s);
        }
        let request = request(spans);
        let sizes: Vec<(String, usize)> = request
            .resource_spans
            .iter()
            .map(|rs| {
                let name = match &rs.resource.as_ref().unwrap().attributes[0].value.as_ref().unwrap().value {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("{other:?}"),
                };
                (name, rs.scope_spans[0].spans.len())
            })
            .collect();
        assert_eq!(sizes, vec![("a".to_string(), 3), ("b".to_string(), 1)]);
    }

    #[test]
    fn tracestate_validation() {
        for good in ["", "a=1", "vendor=abc,other=1", "k@t=v v", "a=1, b=2"] {
            assert!(valid_tracestate(good), "{good:?}");
        }
        let too_many = (0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        for bad in ["x", "A=1", "a=", "a=b=c", "a=\u{e9}", too_many.as_str()] {
            assert!(!valid_tracestate(bad), "{bad:?}");
        }
    }
}
