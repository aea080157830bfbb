//! HTTP span semantics (OpenTelemetry stable HTTP conventions): name, low-cardinality route,
//! attributes and status. Query strings never leave this module.

use std::net::SocketAddr;

use crate::{
    protocols::http1::{RequestHead, ResponseHead},
    spans::model::{AttrValue, Attributes, SpanKind, SpanStatus},
};

/// What a span needs to know about one exchange.
pub struct Exchange<'a> {
    pub kind: SpanKind,
    pub request: &'a RequestHead,
    pub response: Option<&'a ResponseHead>,
    /// `network.protocol.version`: "1.0", "1.1" or "2".
    pub version: &'static str,
    /// Our end and the peer's end of the connection.
    pub local: Endpoint<'a>,
    pub remote: Endpoint<'a>,
    /// Over TLS (`https`).
    pub tls: bool,
}

/// A socket address with its IP already formatted (once per connection, not per span).
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub addr: SocketAddr,
    pub ip: &'a str,
}

pub struct HttpSpan {
    pub name: String,
    pub attributes: Attributes,
    pub status: SpanStatus,
}

pub fn describe(x: &Exchange<'_>) -> HttpSpan {
    let method = known_method(&x.request.method);
    let path = url_path(&x.request.target);
    let route = route(path);
    // The spec names spans of unknown methods "HTTP", not "_OTHER".
    let shown = if method == "_OTHER" { "HTTP" } else { method };
    let name = if route.is_empty() { shown.to_owned() } else { format!("{shown} {route}") };
    let scheme = if x.tls { "https" } else { "http" };
    let mut attributes: Attributes = vec![
        ("http.request.method".into(), method.to_owned().into()),
        ("url.path".into(), path.to_owned().into()),
        ("url.scheme".into(), scheme.into()),
        ("network.protocol.version".into(), x.version.into()),
        ("network.peer.address".into(), x.remote.ip.to_owned().into()),
        ("network.peer.port".into(), AttrValue::Int(x.remote.addr.port().into())),
    ];
    if !route.is_empty() {
        attributes.push(("http.route".into(), route.into()));
    }
    if method == "_OTHER" {
        attributes.push(("http.request.method_original".into(), x.request.method.clone().into()));
    }
    let server = if x.kind == SpanKind::Server { x.local } else { x.remote };
    let server_port = server.addr.port();
    let host = x.request.host.as_deref().map(host_only).filter(|h| !h.is_empty());
    let server_address = host.unwrap_or(server.ip).to_owned();
    attributes.push(("server.port".into(), AttrValue::Int(server_port.into())));
    if x.kind == SpanKind::Server {
        attributes.push(("client.address".into(), x.remote.ip.to_owned().into()));
    } else {
        attributes.push(("url.full".into(), format!("{scheme}://{server_address}:{server_port}{path}").into()));
    }
    attributes.push(("server.address".into(), server_address.into()));
    let status = status_of(x, &mut attributes);
    HttpSpan { name, attributes, status }
}

fn status_of(x: &Exchange<'_>, attributes: &mut Attributes) -> SpanStatus {
    let Some(response) = x.response else {
        attributes.push(("error.type".into(), "connection_closed".into()));
        return SpanStatus::Error;
    };
    attributes.push(("http.response.status_code".into(), AttrValue::Int(response.status.into())));
    let threshold = if x.kind == SpanKind::Server { 500 } else { 400 };
    if response.status >= threshold {
        attributes.push(("error.type".into(), response.status.to_string().into()));
        SpanStatus::Error
    } else {
        SpanStatus::Unset
    }
}

/// `network.protocol.version` of an HTTP/1 request.
pub fn http1_version(request: &RequestHead) -> &'static str {
    if request.version_minor == 0 { "1.0" } else { "1.1" }
}

/// Methods outside the spec's list are reported as `_OTHER` (cardinality guard).
fn known_method(method: &str) -> &str {
    const KNOWN: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
    KNOWN.iter().find(|m| **m == method).copied().unwrap_or("_OTHER")
}

/// The path of a request target, without query or fragment (origin- or absolute-form).
pub fn url_path(target: &str) -> &str {
    // Absolute form (`http://host/path`, sent to proxies) is the only one not starting with '/'.
    let absolute = (!target.starts_with('/')).then(|| target.split_once("://")).flatten();
    let path = absolute.map_or(target, |(_, rest)| rest.find(['/', '?', '#']).map_or("/", |i| &rest[i..]));
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

/// Low-cardinality route: numeric, UUID and long hex segments become `*`. Empty for `*` targets.
pub fn route(path: &str) -> String {
    if !path.starts_with('/') {
        return String::new();
    }
    path.split('/').map(|segment| if is_identifier(segment) { "*" } else { segment }).collect::<Vec<_>>().join("/")
}

fn is_identifier(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    let all_digits = segment.bytes().all(|b| b.is_ascii_digit());
    let long_hex = segment.len() >= 16 && segment.bytes().all(|b| b.is_ascii_hexdigit());
    all_digits || long_hex || is_uuid(segment)
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { *c == b'-' } else { c.is_ascii_hexdigit() })
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `::1`.
pub fn host_only(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, target: &str, host: Option<&str>) -> RequestHead {
        RequestHead {
            method: method.into(),
            target: target.into(),
            version_minor: 1,
            host: host.map(Into::into),
            context: vec![],
            truncated: false,
        }
    }

    fn describe_at(kind: SpanKind, request: &RequestHead, response: Option<&ResponseHead>, local: &str, remote: &str) -> HttpSpan {
        let (local, remote): (SocketAddr, SocketAddr) = (local.parse().unwrap(), remote.parse().unwrap());
        let (local_ip, remote_ip) = (local.ip().to_canonical().to_string(), remote.ip().to_canonical().to_string());
        describe(&Exchange {
            kind,
            request,
            response,
            version: http1_version(request),
            local: Endpoint { addr: local, ip: &local_ip },
            remote: Endpoint { addr: remote, ip: &remote_ip },
            tls: false,
        })
    }

    fn attr<'a>(span: &'a HttpSpan, key: &str) -> Option<&'a AttrValue> {
        span.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    #[test]
    fn tls_makes_the_scheme_https() {
        let request = head("GET", "/users/7?token=secret", Some("api.example:8443"));
        let (local, remote): (SocketAddr, SocketAddr) = ("10.0.0.1:40000".parse().unwrap(), "10.0.0.2:8443".parse().unwrap());
        let span = describe(&Exchange {
            kind: SpanKind::Client,
            request: &request,
            response: Some(&ResponseHead { status: 200, version_minor: 1 }),
            version: "1.1",
            local: Endpoint { addr: local, ip: "10.0.0.1" },
            remote: Endpoint { addr: remote, ip: "10.0.0.2" },
            tls: true,
        });
        assert_eq!(attr(&span, "url.scheme"), Some(&AttrValue::from("https")));
        assert_eq!(attr(&span, "url.full"), Some(&AttrValue::from("https://api.example:8443/users/7")));
    }

    #[test]
    fn routes_have_low_cardinality() {
        assert_eq!(route("/users/42"), "/users/*");
        assert_eq!(route("/orders/3fa85f64-5717-4562-b3fc-2c963f66afa6/items"), "/orders/*/items");
        assert_eq!(route("/blobs/deadbeefdeadbeefdeadbeef"), "/blobs/*");
        assert_eq!(route("/v1/users"), "/v1/users");
        assert_eq!(route("/"), "/");
        assert_eq!(route("*"), "");
    }

    #[test]
    fn query_strings_never_appear() {
        assert_eq!(url_path("/users/7?secret=x#frag"), "/users/7");
        assert_eq!(url_path("http://example.com/a/b?q=1"), "/a/b");
        assert_eq!(url_path("http://example.com"), "/");
        assert_eq!(url_path("/chain?to=http://127.0.0.1:1/users/7"), "/chain");
        let request = head("GET", "/users/7?secret=x", Some("localhost:8080"));
        let response = ResponseHead { status: 200, version_minor: 1 };
        let span = describe_at(SpanKind::Client, &request, Some(&response), "127.0.0.1:50000", "127.0.0.1:8080");
        assert!(span.attributes.iter().all(|(_, v)| !format!("{v:?}").contains("secret")));
    }

    #[test]
    fn server_span_attributes_and_status() {
        let (local, remote) = ("127.0.0.1:8080", "[::ffff:127.0.0.1]:50000");
        let request = head("GET", "/users/42", Some("localhost:8080"));
        let ok = ResponseHead { status: 404, version_minor: 1 };
        let span = describe_at(SpanKind::Server, &request, Some(&ok), local, remote);
        assert_eq!(span.name, "GET /users/*");
        assert_eq!(span.status, SpanStatus::Unset, "404 is not a server error");
        assert_eq!(attr(&span, "client.address"), Some(&AttrValue::from("127.0.0.1")));
        assert_eq!(attr(&span, "server.address"), Some(&AttrValue::from("localhost")));
        assert_eq!(attr(&span, "server.port"), Some(&AttrValue::Int(8080)));
        assert_eq!(attr(&span, "http.response.status_code"), Some(&AttrValue::Int(404)));
        let failed = ResponseHead { status: 500, version_minor: 1 };
        let span = describe_at(SpanKind::Server, &request, Some(&failed), local, remote);
        assert_eq!(span.status, SpanStatus::Error);
    }

    #[test]
    fn client_errors_and_odd_methods() {
        let request = head("BREW", "/pot", None);
        let response = ResponseHead { status: 418, version_minor: 1 };
        let span = describe_at(SpanKind::Client, &request, Some(&response), "10.0.0.2:5000", "10.0.0.1:80");
        assert_eq!(span.name, "HTTP /pot");
        assert_eq!(span.status, SpanStatus::Error);
        assert_eq!(attr(&span, "server.address"), Some(&AttrValue::from("10.0.0.1")));
        assert_eq!(attr(&span, "url.full"), Some(&AttrValue::from("http://10.0.0.1:80/pot")));
    }

    #[test]
    fn hosts() {
        assert_eq!(host_only("[::1]:80"), "::1");
        assert_eq!(host_only("example.com:8080"), "example.com");
        assert_eq!(host_only("example.com"), "example.com");
    }
}
