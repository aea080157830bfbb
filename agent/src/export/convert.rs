//! Our span model to the OpenTelemetry SDK's export types.
//!
//! The SDK's span builder cannot take explicit ids and timestamps, so `SpanData` is built by hand.

use std::{
    borrow::Cow,
    fmt::Write as _,
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    trace::{self as otel, SpanContext, TraceFlags, TraceState},
    InstrumentationScope, KeyValue, Value,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::spans::model::{AttrValue, Attributes, Resource, Span, SpanKind, SpanLink, SpanStatus};

/// The scope every exported span carries.
pub(super) fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("zerotel")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

pub(super) fn span_data(span: Span, scope: &InstrumentationScope) -> SpanData {
    // A malformed tracestate from the wire must not cost us the span.
    let trace_state = TraceState::from_str(&span.trace_state).unwrap_or_default();
    SpanData {
        span_context: SpanContext::new(
            otel::TraceId::from_bytes(span.trace_id),
            otel::SpanId::from_bytes(span.span_id),
            TraceFlags::new(span.trace_flags),
            false,
            trace_state,
        ),
        parent_span_id: span
            .parent_span_id
            .map_or(otel::SpanId::INVALID, otel::SpanId::from_bytes),
        parent_span_is_remote: parent_is_remote(&span),
        span_kind: kind(span.kind),
        name: Cow::Owned(span.name),
        start_time: unix_time(span.start_unix_ns),
        end_time: unix_time(span.end_unix_ns),
        attributes: key_values(span.attributes),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: links(&span.links),
        status: match span.status {
            SpanStatus::Unset => otel::Status::Unset,
            SpanStatus::Error => otel::Status::error(""),
        },
        instrumentation_scope: scope.clone(),
    }
}

fn links(links: &[SpanLink]) -> SpanLinks {
    let links = links
        .iter()
        .map(|l| {
            let context = SpanContext::new(
                otel::TraceId::from_bytes(l.trace_id),
                otel::SpanId::from_bytes(l.span_id),
                TraceFlags::new(l.trace_flags),
                true,
                TraceState::default(),
            );
            otel::Link::with_context(context)
        })
        .collect();
    let mut span_links = SpanLinks::default();
    span_links.links = links;
    span_links
}

/// Server/consumer spans continue a context received from another process; client/producer
/// spans are children of a span in the same process.
fn parent_is_remote(span: &Span) -> bool {
    span.parent_span_id.is_some() && matches!(span.kind, SpanKind::Server | SpanKind::Consumer)
}

fn kind(kind: SpanKind) -> otel::SpanKind {
    match kind {
        SpanKind::Server => otel::SpanKind::Server,
        SpanKind::Client => otel::SpanKind::Client,
        SpanKind::Producer => otel::SpanKind::Producer,
        SpanKind::Consumer => otel::SpanKind::Consumer,
    }
}

fn unix_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn key_values(attributes: Attributes) -> Vec<KeyValue> {
    attributes
        .into_iter()
        .map(|(k, v)| KeyValue::new(k, value(v)))
        .collect()
}

fn value(v: AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => Value::from(s),
        AttrValue::Int(i) => Value::I64(i),
        AttrValue::Bool(b) => Value::Bool(b),
    }
}

/// The SDK resource, with exactly our attributes (no SDK detectors).
pub(super) fn resource(resource: &Resource) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(key_values(resource.attributes.clone()))
        .build()
}

/// Identity of a resource by content: pointers are not stable (a new process may get an
/// `Arc` at the address of a dead one). Length prefixes keep the encoding unambiguous.
pub(super) fn resource_key(resource: &Resource) -> String {
    let mut key = String::new();
    for (k, v) in &resource.attributes {
        // Writing to a String cannot fail.
        let _ = match v {
            AttrValue::Str(s) => write!(key, "{}:{k}s{}:{s};", k.len(), s.len()),
            AttrValue::Int(i) => write!(key, "{}:{k}i{i};", k.len()),
            AttrValue::Bool(b) => write!(key, "{}:{k}b{b};", k.len()),
        };
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
            resource: Arc::new(Resource {
                attributes: vec![("service.name".into(), "svc".into())],
            }),
        }
    }

    #[test]
    fn converts_ids_kind_times_attributes_status() {
        let d = span_data(sample_span(), &scope());
        assert_eq!(
            d.span_context.trace_id(),
            otel::TraceId::from_bytes([0x11; 16])
        );
        assert_eq!(
            d.span_context.span_id(),
            otel::SpanId::from_bytes([0x22; 8])
        );
        assert!(d.span_context.is_sampled());
        assert!(!d.span_context.is_remote());
        assert_eq!(d.span_context.trace_state().header(), "vendor=abc,other=1");
        assert_eq!(d.parent_span_id, otel::SpanId::from_bytes([0x33; 8]));
        assert!(d.parent_span_is_remote);
        let link = &d.links.links[0].span_context;
        assert_eq!((link.trace_id(), link.span_id()), (otel::TraceId::from_bytes([0x44; 16]), otel::SpanId::from_bytes([0x55; 8])));
        assert!(link.is_sampled() && link.is_remote());
        assert_eq!(d.span_kind, otel::SpanKind::Server);
        assert_eq!(d.name, "GET /users/{id}");
        let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos();
        assert_eq!(ns(d.start_time), 1_700_000_000_123_456_789);
        assert_eq!(ns(d.end_time), 1_700_000_000_125_456_789);
        assert_eq!(
            d.attributes,
            vec![
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("http.response.status_code", 500i64),
                KeyValue::new("network.peer.cached", true),
            ]
        );
        assert_eq!(d.status, otel::Status::error(""));
        assert_eq!(d.instrumentation_scope.name(), "zerotel");
        assert_eq!(
            d.instrumentation_scope.version(),
            Some(env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn root_client_unset_and_bad_tracestate() {
        let mut s = sample_span();
        s.parent_span_id = None;
        s.kind = SpanKind::Client;
        s.status = SpanStatus::Unset;
        s.trace_flags = 0;
        s.trace_state = "not a valid=tracestate===".into();
        let d = span_data(s, &scope());
        assert_eq!(d.parent_span_id, otel::SpanId::INVALID);
        assert!(!d.parent_span_is_remote);
        assert_eq!(d.span_kind, otel::SpanKind::Client);
        assert_eq!(d.status, otel::Status::Unset);
        assert!(!d.span_context.is_sampled());
        assert_eq!(d.span_context.trace_state(), &TraceState::default());

        let mut c = sample_span();
        c.kind = SpanKind::Client;
        assert!(!span_data(c, &scope()).parent_span_is_remote);
    }

    #[test]
    fn resource_conversion_and_key() {
        let r = Resource {
            attributes: vec![
                ("service.name".into(), "svc".into()),
                ("process.pid".into(), 42i64.into()),
            ],
        };
        let sdk = resource(&r);
        assert_eq!(sdk.len(), 2);
        assert_eq!(sdk.get(&"service.name".into()), Some(Value::from("svc")));
        assert_eq!(sdk.get(&"process.pid".into()), Some(Value::I64(42)));
        assert_eq!(resource_key(&r), resource_key(&r.clone()));
        // Same text, different split between key and value or type: different keys.
        let a = Resource {
            attributes: vec![("ab".into(), "c".into())],
        };
        let b = Resource {
            attributes: vec![("a".into(), "bc".into())],
        };
        let c = Resource {
            attributes: vec![("ab".into(), 1i64.into())],
        };
        let d = Resource {
            attributes: vec![("ab".into(), "1".into())],
        };
        assert_ne!(resource_key(&a), resource_key(&b));
        assert_ne!(resource_key(&c), resource_key(&d));
    }
}
