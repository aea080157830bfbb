//! OTLP exporter configuration: CLI flags over the standard `OTEL_EXPORTER_OTLP_*` variables.
//!
//! See <https://opentelemetry.io/docs/specs/otel/protocol/exporter/>.

use std::{fmt, time::Duration};

const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const PROTOCOL_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];
const HEADERS_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_HEADERS",
];
const TIMEOUT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
];
const FLAG: &str = "the command line";
const TRACES_PATH: &str = "/v1/traces";
const GRPC_PORT: u16 = 4317;
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// The batch span processor's variables, which every OpenTelemetry SDK reads.
const QUEUE_SIZE_VAR: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
const BATCH_SIZE_VAR: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
/// Spans held for export (queued, in flight or waiting for a retry). 8192 spans of about
/// 1 KiB each bound the export stage to roughly 8 MiB while the backend is away.
const DEFAULT_QUEUE_SIZE: usize = 8192;
const DEFAULT_BATCH_SIZE: usize = 512;

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Where and how to send spans over OTLP.
#[derive(Clone, PartialEq)]
pub struct OtlpConfig {
    /// Full URL: for http/protobuf it includes the `/v1/traces` path.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Already percent-decoded.
    pub headers: Vec<(String, String)>,
    /// Upper bound of one export call.
    pub timeout: Duration,
    /// Most spans held for export at once; more are dropped and counted.
    pub queue_size: usize,
    /// Most spans per export request.
    pub batch_size: usize,
}

// Hand-written so header values (typically API keys) never end up in logs.
impl fmt::Debug for OtlpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("OtlpConfig")
            .field("endpoint", &self.endpoint)
            .field("protocol", &self.protocol)
            .field("headers", &header_names)
            .field("timeout", &self.timeout)
            .field("queue_size", &self.queue_size)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

/// A bad OTLP exporter setting; `origin` names the flag or variable it came from.
#[derive(Debug, thiserror::Error)]
pub enum ExportConfigError {
    /// The endpoint is not an absolute `http://` or `https://` URL with a host.
    #[error("invalid OTLP endpoint {url:?} from {origin}: {reason} (expected e.g. http://localhost:4318)")]
    BadUrl {
        origin: &'static str,
        url: String,
        reason: String,
    },
    /// The protocol is neither `grpc` nor `http/protobuf`.
    #[error(
        "unsupported OTLP protocol {value:?} from {origin}: expected \"grpc\" or \"http/protobuf\""
    )]
    UnknownProtocol { origin: &'static str, value: String },
    /// The header list is not a comma-separated list of `key=value` pairs with valid names and
    /// printable ASCII values (after percent-decoding).
    #[error("invalid OTLP header list from {origin}: {reason}")]
    BadHeaders {
        origin: &'static str,
        reason: String,
    },
    /// The timeout is not a positive integer number of milliseconds.
    #[error(
        "invalid OTLP timeout {value:?} from {origin}: expected a positive number of milliseconds"
    )]
    BadTimeout { origin: &'static str, value: String },
    /// A queue or batch size is not a positive integer.
    #[error("invalid {name} {value:?}: expected a positive number of spans")]
    BadSize { name: &'static str, value: String },
}

/// How the configured endpoint URL relates to the traces URL.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EndpointKind {
    /// Base URL: http/protobuf appends `/v1/traces`.
    Base,
    /// Signal-specific URL, used verbatim.
    Traces,
}

impl OtlpConfig {
    /// Resolve from CLI flags (take precedence) and the standard environment variables.
    ///
    /// - Endpoint: `endpoint_flag`, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as-is), else
    ///   `OTEL_EXPORTER_OTLP_ENDPOINT`. The flag and the generic variable are base URLs: for
    ///   http/protobuf `/v1/traces` is appended unless the path already ends with it.
    /// - Protocol: `protocol_flag`, else `OTEL_EXPORTER_OTLP_{TRACES_,}PROTOCOL`
    ///   (`grpc` | `http/protobuf`). The spec's default is http/protobuf, but a collector's gRPC
    ///   port is 4317, so an endpoint with explicit port 4317 defaults to grpc; any other
    ///   endpoint defaults to http/protobuf.
    /// - Headers: `OTEL_EXPORTER_OTLP_{TRACES_,}HEADERS`, `k=v,k2=v2`, values percent-decoded.
    /// - Timeout: `OTEL_EXPORTER_OTLP_{TRACES_,}TIMEOUT` in milliseconds, default 10000.
    /// - Queue: `queue_flag`, else `OTEL_BSP_MAX_QUEUE_SIZE` spans, default 8192; batches of
    ///   `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default 512 (never more than the queue).
    ///
    /// The traces-specific variable wins over the generic one; empty variables count as unset.
    /// Returns `Ok(None)` when no endpoint is configured anywhere (a bad `protocol_flag` is
    /// still an error, environment settings are then ignored).
    pub fn resolve(
        endpoint_flag: Option<&str>,
        protocol_flag: Option<&str>,
        queue_flag: Option<usize>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ExportConfigError> {
        let flag_protocol = protocol_flag.map(|p| parse_protocol(p, FLAG)).transpose()?;
        let Some((origin, kind, raw)) = pick_endpoint(endpoint_flag, env) else {
            return Ok(None);
        };
        let port = parse_url(&raw).map_err(|reason| ExportConfigError::BadUrl {
            origin,
            url: raw.clone(),
            reason,
        })?;
        let protocol = match flag_protocol {
            Some(p) => p,
            None => match first_env(env, PROTOCOL_VARS) {
                Some((name, value)) => parse_protocol(&value, name)?,
                None if port == Some(GRPC_PORT) => Protocol::Grpc,
                None => Protocol::HttpProtobuf,
            },
        };
        let queue_size = match queue_flag {
            Some(0) => return Err(ExportConfigError::BadSize { name: "--export-queue-size", value: "0".into() }),
            Some(n) => n,
            None => resolve_size(env, QUEUE_SIZE_VAR, DEFAULT_QUEUE_SIZE)?,
        };
        let endpoint = match (kind, protocol) {
            (EndpointKind::Base, Protocol::HttpProtobuf) => with_traces_path(&raw),
            _ => raw,
        };
        Ok(Some(Self {
            endpoint,
            protocol,
            headers: resolve_headers(env)?,
            timeout: resolve_timeout(env)?,
            queue_size,
            batch_size: resolve_size(env, BATCH_SIZE_VAR, DEFAULT_BATCH_SIZE)?.min(queue_size),
        }))
    }
}

/// A variable's trimmed value; empty means unset, as the spec asks.
fn get_env(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The first of (traces-specific, generic) that is set, with its name.
fn first_env(
    env: &dyn Fn(&str) -> Option<String>,
    names: [&'static str; 2],
) -> Option<(&'static str, String)> {
    names
        .into_iter()
        .find_map(|name| get_env(env, name).map(|v| (name, v)))
}

fn pick_endpoint(
    flag: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(&'static str, EndpointKind, String)> {
    if let Some(flag) = flag.map(str::trim).filter(|f| !f.is_empty()) {
        return Some((FLAG, EndpointKind::Base, flag.to_owned()));
    }
    if let Some(url) = get_env(env, TRACES_ENDPOINT) {
        return Some((TRACES_ENDPOINT, EndpointKind::Traces, url));
    }
    get_env(env, ENDPOINT).map(|url| (ENDPOINT, EndpointKind::Base, url))
}

fn parse_protocol(value: &str, origin: &'static str) -> Result<Protocol, ExportConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        _ => Err(ExportConfigError::UnknownProtocol {
            origin,
            value: value.to_owned(),
        }),
    }
}

/// Checks `scheme://host[:port][/path]` and returns the explicit port, if any.
fn parse_url(url: &str) -> Result<Option<u16>, String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".into());
    }
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("missing scheme, expected http:// or https://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "unsupported scheme {scheme:?}, expected http or https"
        ));
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = split_host_port(host_port)?;
    if host.is_empty() {
        return Err("missing host".into());
    }
    port.map(|p| p.parse::<u16>().map_err(|_| format!("invalid port {p:?}")))
        .transpose()
}

fn split_host_port(host_port: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("unterminated IPv6 address")?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|port| (host, Some(port)))
                .ok_or_else(|| format!("unexpected {after:?} after IPv6 address")),
        };
    }
    Ok(match host_port.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (host_port, None),
    })
}

/// Appends `/v1/traces` to the URL's path unless it already ends with it.
fn with_traces_path(base: &str) -> String {
    let (url, suffix) = match base.find(['?', '#']) {
        Some(i) => base.split_at(i),
        None => (base, ""),
    };
    let url = url.trim_end_matches('/');
    if url.ends_with(TRACES_PATH) {
        return format!("{url}{suffix}");
    }
    format!("{url}{TRACES_PATH}{suffix}")
}

fn resolve_headers(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, ExportConfigError> {
    let Some((origin, list)) = first_env(env, HEADERS_VARS) else {
        return Ok(Vec::new());
    };
    parse_headers(&list).map_err(|reason| ExportConfigError::BadHeaders { origin, reason })
}

/// Parses `k=v,k2=v2`; empty items are skipped. Error messages never include values.
fn parse_headers(list: &str) -> Result<Vec<(String, String)>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse_header)
        .collect()
}

fn parse_header(item: &str) -> Result<(String, String), String> {
    let (key, value) = item
        .split_once('=')
        .ok_or("an entry is not of the form key=value")?;
    let key = key.trim();
    if key.is_empty() || !key.bytes().all(is_token_byte) {
        return Err(format!("invalid header name {key:?}"));
    }
    let value = percent_decode(value.trim())
        .ok_or_else(|| format!("bad percent-encoding in the value of {key:?}"))?;
    if !value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(format!("the value of {key:?} is not printable ASCII"));
    }
    Ok((key.to_owned(), value))
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Decodes `%XX` escapes; `None` on a malformed escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hi = (bytes.next()? as char).to_digit(16)?;
        let lo = (bytes.next()? as char).to_digit(16)?;
        // Two hex digits always fit a byte.
        out.push((hi * 16 + lo) as u8);
    }
    String::from_utf8(out).ok()
}

fn resolve_timeout(env: &dyn Fn(&str) -> Option<String>) -> Result<Duration, ExportConfigError> {
    let Some((origin, value)) = first_env(env, TIMEOUT_VARS) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(ExportConfigError::BadTimeout { origin, value }),
    }
}

fn resolve_size(env: &dyn Fn(&str) -> Option<String>, name: &'static str, default: usize) -> Result<usize, ExportConfigError> {
    match get_env(env, name) {
        None => Ok(default),
        Some(value) => match value.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ExportConfigError::BadSize { name, value }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve_with(
        endpoint_flag: Option<&str>,
        protocol_flag: Option<&str>,
        vars: &[(&str, &str)],
    ) -> Result<Option<OtlpConfig>, ExportConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::resolve(endpoint_flag, protocol_flag, None, &|name| {
            vars.get(name).cloned()
        })
    }

    fn ok(
        endpoint_flag: Option<&str>,
        protocol_flag: Option<&str>,
        vars: &[(&str, &str)],
    ) -> OtlpConfig {
        resolve_with(endpoint_flag, protocol_flag, vars)
            .expect("valid config")
            .expect("endpoint configured")
    }

    #[test]
    fn no_endpoint_is_none() {
        assert!(resolve_with(None, None, &[]).unwrap().is_none());
        assert!(resolve_with(Some("  "), None, &[(ENDPOINT, "")])
            .unwrap()
            .is_none());
        // Environment protocol is not validated without an endpoint...
        assert!(resolve_with(None, None, &[(PROTOCOL_VARS[1], "http/json")])
            .unwrap()
            .is_none());
        // ...but an explicit flag is.
        assert!(matches!(
            resolve_with(None, Some("bogus"), &[]),
            Err(ExportConfigError::UnknownProtocol { .. })
        ));
    }

    #[test]
    fn defaults() {
        let c = ok(Some("http://collector:4318"), None, &[]);
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert!(c.headers.is_empty());
        assert_eq!(c.timeout, Duration::from_millis(10_000));
    }

    #[test]
    fn port_4317_defaults_to_grpc() {
        let c = ok(None, None, &[(ENDPOINT, "http://collector:4317")]);
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.endpoint, "http://collector:4317");
        let c = ok(None, None, &[(ENDPOINT, "http://collector")]);
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        // An explicit protocol beats the port heuristic.
        let c = ok(
            None,
            None,
            &[
                (ENDPOINT, "http://c:4317"),
                (PROTOCOL_VARS[1], "http/protobuf"),
            ],
        );
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.endpoint, "http://c:4317/v1/traces");
    }

    #[test]
    fn flags_beat_env() {
        let vars = [
            (TRACES_ENDPOINT, "http://env-traces:4318/v1/traces"),
            (ENDPOINT, "http://env:4318"),
            (PROTOCOL_VARS[0], "http/protobuf"),
        ];
        let c = ok(Some("http://flag:4317"), Some("grpc"), &vars);
        assert_eq!(c.endpoint, "http://flag:4317");
        assert_eq!(c.protocol, Protocol::Grpc);
    }

    #[test]
    fn traces_env_beats_generic() {
        let vars = [
            (TRACES_ENDPOINT, "http://traces:9999/custom"),
            (ENDPOINT, "http://generic:4317"),
            (PROTOCOL_VARS[0], "HTTP/PROTOBUF"),
            (PROTOCOL_VARS[1], "grpc"),
            (HEADERS_VARS[0], "a=1"),
            (HEADERS_VARS[1], "b=2"),
            (TIMEOUT_VARS[0], "500"),
            (TIMEOUT_VARS[1], "700"),
        ];
        let c = ok(None, None, &vars);
        // Traces-specific endpoint is used verbatim, no /v1/traces appended.
        assert_eq!(c.endpoint, "http://traces:9999/custom");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.headers, vec![("a".to_owned(), "1".to_owned())]);
        assert_eq!(c.timeout, Duration::from_millis(500));
        let c = ok(None, None, &vars[1..]);
        assert_eq!(c.endpoint, "http://generic:4317/v1/traces");
        let c = ok(
            None,
            None,
            &[
                (ENDPOINT, "http://g:4318"),
                (PROTOCOL_VARS[1], "grpc"),
                (TIMEOUT_VARS[1], "700"),
            ],
        );
        assert_eq!(c.protocol, Protocol::Grpc);
        assert_eq!(c.timeout, Duration::from_millis(700));
    }

    #[test]
    fn traces_suffix_rule() {
        for (base, want) in [
            ("http://h:4318", "http://h:4318/v1/traces"),
            ("http://h:4318/", "http://h:4318/v1/traces"),
            ("http://h:4318/v1/traces", "http://h:4318/v1/traces"),
            ("http://h:4318/v1/traces/", "http://h:4318/v1/traces"),
            ("https://h/otlp", "https://h/otlp/v1/traces"),
            ("http://h:4318/p?x=1", "http://h:4318/p/v1/traces?x=1"),
        ] {
            assert_eq!(
                ok(Some(base), Some("http/protobuf"), &[]).endpoint,
                want,
                "{base}"
            );
            assert_eq!(
                ok(None, Some("http/protobuf"), &[(ENDPOINT, base)]).endpoint,
                want
            );
            // Never touched for gRPC or for the traces-specific variable.
            assert_eq!(ok(Some(base), Some("grpc"), &[]).endpoint, base);
            assert_eq!(
                ok(None, Some("http/protobuf"), &[(TRACES_ENDPOINT, base)]).endpoint,
                base
            );
        }
    }

    #[test]
    fn headers_are_parsed_and_decoded() {
        let c = ok(
            Some("http://h:4318"),
            None,
            &[(
                HEADERS_VARS[1],
                " api-key = s%20e%3Dc%2Cret ,, X-Tenant=a=b,empty=",
            )],
        );
        assert_eq!(
            c.headers,
            vec![
                ("api-key".to_owned(), "s e=c,ret".to_owned()),
                ("X-Tenant".to_owned(), "a=b".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
        );
        assert!(
            !format!("{c:?}").contains("ret"),
            "Debug must not print header values"
        );
    }

    #[test]
    fn bad_headers() {
        for list in [
            "novalue",
            "=v",
            "bad key=v",
            "k=%zz",
            "k=%4",
            "k=%C3",
            "k=caf%C3%A9",
            "k=a%0Ab",
        ] {
            let err = resolve_with(Some("http://h:4318"), None, &[(HEADERS_VARS[0], list)])
                .expect_err(list);
            assert!(
                matches!(err, ExportConfigError::BadHeaders { origin, .. } if origin == HEADERS_VARS[0]),
                "{list}"
            );
        }
    }

    #[test]
    fn bad_urls() {
        for url in [
            "localhost:4318",
            "ftp://h:21",
            "http://",
            "http:///v1/traces",
            "http://:4318",
            "http://h:notaport",
            "http://h:70000",
            "http://h:",
            "http://h 1:4318",
            "http://[::1",
        ] {
            let err = resolve_with(Some(url), None, &[]).expect_err(url);
            assert!(
                matches!(err, ExportConfigError::BadUrl { .. }),
                "{url}: {err}"
            );
        }
        let err = resolve_with(None, None, &[(TRACES_ENDPOINT, "collector:4317")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(TRACES_ENDPOINT) && msg.contains("scheme"),
            "{msg}"
        );
        for url in [
            "http://[::1]:4317",
            "HTTPS://user:pw@h.example:443/x",
            "http://10.0.0.1",
        ] {
            assert!(resolve_with(Some(url), None, &[]).is_ok(), "{url}");
        }
        assert_eq!(
            ok(Some("http://[::1]:4317"), None, &[]).protocol,
            Protocol::Grpc
        );
    }

    #[test]
    fn bad_protocol() {
        let err = resolve_with(Some("http://h:4318"), Some("http/json"), &[]).unwrap_err();
        assert!(matches!(
            err,
            ExportConfigError::UnknownProtocol { origin: FLAG, .. }
        ));
        let err = resolve_with(
            None,
            None,
            &[(ENDPOINT, "http://h"), (PROTOCOL_VARS[1], "udp")],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{err}"
        );
    }

    #[test]
    fn bad_timeout() {
        for t in ["0", "-1", "1.5", "10s"] {
            let err = resolve_with(Some("http://h"), None, &[(TIMEOUT_VARS[1], t)]).unwrap_err();
            assert!(matches!(err, ExportConfigError::BadTimeout { .. }), "{t}");
        }
    }

    #[test]
    fn queue_and_batch_sizes() {
        let c = ok(Some("http://h"), None, &[]);
        assert_eq!((c.queue_size, c.batch_size), (DEFAULT_QUEUE_SIZE, DEFAULT_BATCH_SIZE));
        let c = ok(Some("http://h"), None, &[(QUEUE_SIZE_VAR, "100"), (BATCH_SIZE_VAR, "50")]);
        assert_eq!((c.queue_size, c.batch_size), (100, 50));
        let c = ok(Some("http://h"), None, &[(QUEUE_SIZE_VAR, "100"), (BATCH_SIZE_VAR, "500")]);
        assert_eq!(c.batch_size, 100, "a batch never exceeds the queue");
        let env = |name: &str| (name == QUEUE_SIZE_VAR).then(|| "100".to_string());
        let c = OtlpConfig::resolve(Some("http://h"), None, Some(7), &env).unwrap().unwrap();
        assert_eq!((c.queue_size, c.batch_size), (7, 7), "the flag over the variable");
        for bad in ["0", "-1", "many"] {
            let err = resolve_with(Some("http://h"), None, &[(QUEUE_SIZE_VAR, bad)]).unwrap_err();
            assert!(matches!(err, ExportConfigError::BadSize { name: QUEUE_SIZE_VAR, .. }), "{bad}");
        }
        assert!(OtlpConfig::resolve(Some("http://h"), None, Some(0), &|_| None).is_err());
    }
}
