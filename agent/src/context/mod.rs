//! Trace context from request headers: W3C `traceparent`/`tracestate` first, B3 (single and
//! multi-header) as the fallback. Invalid values are ignored as the W3C spec says; never a panic.

use std::cell::RefCell;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::spans::model::{SpanId, TraceId};

/// The parent a SERVER span joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
    pub trace_state: String,
}

/// The W3C sampled flag: one definition, shared with the kernel.
pub use zerotel_abi::SAMPLED;

/// Pick the parent from lowercased header (name, value) pairs.
pub fn extract(headers: &[(String, String)]) -> Option<RemoteParent> {
    let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    if let Some(value) = get("traceparent") {
        // A traceparent that is present but invalid means "start a new trace": do not fall back to B3.
        return parse_traceparent(value).map(|mut p| {
            p.trace_state = get("tracestate").unwrap_or_default().to_owned();
            p
        });
    }
    if let Some(value) = get("b3") {
        return parse_b3_single(value);
    }
    parse_b3_multi(get("x-b3-traceid")?, get("x-b3-spanid")?, get("x-b3-sampled"), get("x-b3-flags"))
}

/// W3C Trace Context level 1: `version-traceid-parentid-flags`, lowercase hex.
pub fn parse_traceparent(value: &str) -> Option<RemoteParent> {
    let value = value.trim();
    let mut parts = value.splitn(5, '-');
    let version = hex_exact::<1>(parts.next()?)?[0];
    let trace_id = hex_exact::<16>(parts.next()?)?;
    let span_id = hex_exact::<8>(parts.next()?)?;
    let flags = hex_exact::<1>(parts.next()?)?[0];
    // Version ff is invalid; version 00 has exactly four fields; later versions may append fields.
    let extra = parts.next();
    if version == 0xff || (version == 0 && extra.is_some()) {
        return None;
    }
    valid_ids(trace_id, span_id).then_some(RemoteParent { trace_id, span_id, flags, trace_state: String::new() })
}

/// B3 single header: `{traceid}-{spanid}[-{sampled}[-{parentspanid}]]`; a 64-bit trace id is left-padded.
fn parse_b3_single(value: &str) -> Option<RemoteParent> {
    let mut parts = value.trim().split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex_exact::<8>(parts.next()?)?;
    let flags = b3_flags(parts.next(), None)?;
    valid_ids(trace_id, span_id).then_some(RemoteParent { trace_id, span_id, flags, trace_state: String::new() })
}

fn parse_b3_multi(trace: &str, span: &str, sampled: Option<&str>, debug: Option<&str>) -> Option<RemoteParent> {
    let trace_id = b3_trace_id(trace.trim())?;
    let span_id = hex_exact::<8>(span.trim())?;
    let flags = b3_flags(sampled, debug)?;
    valid_ids(trace_id, span_id).then_some(RemoteParent { trace_id, span_id, flags, trace_state: String::new() })
}

fn b3_trace_id(s: &str) -> Option<TraceId> {
    match s.len() {
        32 => hex_exact::<16>(s),
        16 => {
            let low = hex_exact::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// B3 sampling state to W3C flags; None for an unknown value.
fn b3_flags(sampled: Option<&str>, debug: Option<&str>) -> Option<u8> {
    if debug.map(str::trim) == Some("1") {
        return Some(SAMPLED);
    }
    match sampled.map(str::trim) {
        None => Some(SAMPLED),
        Some("1" | "true" | "d") => Some(SAMPLED),
        Some("0" | "false") => Some(0),
        Some(_) => None,
    }
}

fn valid_ids(trace_id: TraceId, span_id: SpanId) -> bool {
    trace_id != [0; 16] && span_id != [0; 8]
}

/// Exactly `N` bytes of lowercase hex.
fn hex_exact<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

thread_local! {
    /// Ids must be unique and unpredictable enough to avoid collisions, not secret: a fast
    /// generator seeded from the OS is what OpenTelemetry SDKs use too.
    static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

/// Fresh random ids (never all zero).
pub fn new_trace_id() -> TraceId {
    IDS.with_borrow_mut(|rng| loop {
        let id: TraceId = rng.random();
        if id != [0; 16] {
            return id;
        }
    })
}

pub fn new_span_id() -> SpanId {
    IDS.with_borrow_mut(|rng| loop {
        let id: SpanId = rng.random();
        if id != [0; 8] {
            return id;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lowercase hex of an id.
    fn hex(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        bytes.iter().flat_map(|b| [DIGITS[(b >> 4) as usize] as char, DIGITS[(b & 0xf) as usize] as char]).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_valid_traceparent_with_state() {
        let p = extract(&headers(&[("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE")])).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert_eq!(p.flags, 1);
        assert_eq!(p.trace_state, "congo=t61rcWkgMzE");
    }

    #[test]
    fn rejects_invalid_traceparents() {
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
            "",
            "-",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A future version may append fields.
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_some());
    }

    #[test]
    fn invalid_traceparent_does_not_fall_back_to_b3() {
        let h = headers(&[("traceparent", "garbage"), ("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")]);
        assert_eq!(extract(&h), None);
    }

    #[test]
    fn b3_single_and_multi() {
        let p = extract(&headers(&[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0")])).unwrap();
        assert_eq!((hex(&p.trace_id).as_str(), p.flags), ("4bf92f3577b34da6a3ce929d0e0e4736", 0));
        let p = extract(&headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7")])).unwrap();
        assert_eq!(hex(&p.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(p.flags, SAMPLED);
        assert_eq!(extract(&headers(&[("b3", "0")])), None);
    }

    #[test]
    fn new_ids_are_valid() {
        assert_ne!(new_trace_id(), [0; 16]);
        assert_ne!(new_span_id(), new_span_id());
    }
}
