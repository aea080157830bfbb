//! The span as zerotel assembles it: explicit ids and times, semantic-convention attributes,
//! and the resource of the process that produced it. Export turns it into OTLP.

use std::{borrow::Cow, sync::Arc};

/// W3C trace id (16 bytes) and span id (8 bytes).
pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpanKind {
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    pub const ALL: [SpanKind; 4] = [SpanKind::Server, SpanKind::Client, SpanKind::Producer, SpanKind::Consumer];

    pub fn label(self) -> &'static str {
        match self {
            SpanKind::Server => "server",
            SpanKind::Client => "client",
            SpanKind::Producer => "producer",
            SpanKind::Consumer => "consumer",
        }
    }
}

/// The protocol a span was made from, as its semantic-convention attributes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireProtocol {
    Http,
    Http2,
    Grpc,
    Postgresql,
    Kafka,
}

impl WireProtocol {
    pub const ALL: [WireProtocol; 5] =
        [WireProtocol::Http, WireProtocol::Http2, WireProtocol::Grpc, WireProtocol::Postgresql, WireProtocol::Kafka];

    pub fn of(attributes: &Attributes) -> WireProtocol {
        let value = |key: &str| attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        if value("rpc.system").is_some() {
            WireProtocol::Grpc
        } else if value("db.system.name").is_some() {
            WireProtocol::Postgresql
        } else if value("messaging.system").is_some() {
            WireProtocol::Kafka
        } else if value("network.protocol.version") == Some(&AttrValue::from("2")) {
            WireProtocol::Http2
        } else {
            WireProtocol::Http
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            WireProtocol::Http => "http",
            WireProtocol::Http2 => "http2",
            WireProtocol::Grpc => "grpc",
            WireProtocol::Postgresql => "postgresql",
            WireProtocol::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AttrValue {
    Str(Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

impl From<&'static str> for AttrValue {
    fn from(s: &'static str) -> Self {
        Self::Str(Cow::Borrowed(s))
    }
}
impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        Self::Str(Cow::Owned(s))
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

/// Key/value pairs, keys are semantic-convention names.
pub type Attributes = Vec<(Cow<'static, str>, AttrValue)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Error,
}

/// The process a span came from, as OTLP resource attributes (`service.name` always present).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resource {
    pub attributes: Attributes,
}

impl Resource {
    pub fn service_name(&self) -> &str {
        self.attributes
            .iter()
            .find_map(|(k, v)| match (k.as_ref(), v) {
                ("service.name", AttrValue::Str(s)) => Some(s.as_ref()),
                _ => None,
            })
            .unwrap_or("unknown_service")
    }
}

/// Another span this one is causally related to without being its child (a consumed message's
/// producer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanLink {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// W3C trace flags of the linked context.
    pub trace_flags: u8,
}

#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// None for a root span.
    pub parent_span_id: Option<SpanId>,
    /// W3C trace flags (bit 0 = sampled).
    pub trace_flags: u8,
    /// W3C tracestate, passed through as received ("" when none).
    pub trace_state: String,
    pub kind: SpanKind,
    pub name: String,
    /// Wall-clock times, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub attributes: Attributes,
    pub status: SpanStatus,
    pub links: Vec<SpanLink>,
    /// Shared by every span of the same process.
    pub resource: Arc<Resource>,
}
