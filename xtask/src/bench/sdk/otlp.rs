//! Counting the spans of an OTLP/HTTP protobuf body without a protobuf library: the sink needs
//! only how many `Span` messages an `ExportTraceServiceRequest` holds, not what they say.

/// Spans in an `ExportTraceServiceRequest`: `resource_spans` (field 1), each `ResourceSpans`'
/// `scope_spans` (field 2), each `ScopeSpans`' `spans` (field 2). A malformed body counts what
/// was read before the damage.
pub fn spans(body: &[u8]) -> u64 {
    fields(body, 1)
        .flat_map(|resource| fields(resource, 2))
        .map(|scope| fields(scope, 2).count() as u64)
        .sum()
}

/// The length-delimited fields numbered `number` of a protobuf message, in order; the others
/// are skipped. Stops at the first malformed byte.
fn fields(message: &[u8], number: u64) -> impl Iterator<Item = &[u8]> {
    let mut rest = message;
    std::iter::from_fn(move || loop {
        let key = varint(&mut rest)?;
        let value = match key & 7 {
            0 => varint(&mut rest).map(|_| None)?,
            1 => skip(&mut rest, 8).map(|_| None)?,
            2 => {
                let len = usize::try_from(varint(&mut rest)?).ok()?;
                Some(skip(&mut rest, len)?)
            }
            5 => skip(&mut rest, 4).map(|_| None)?,
            _ => return None, // groups (3, 4) are not used by OTLP
        };
        if key >> 3 == number {
            if let Some(v) = value {
                return Some(v);
            }
        }
    })
}

/// Takes `n` bytes off the front of `buf`.
fn skip<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (taken, rest) = buf.split_at(n);
    *buf = rest;
    Some(taken)
}

/// Reads a base-128 varint off the front of `buf`.
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-delimited field (lengths of 128 and more take a multi-byte varint).
    fn ld(number: u8, payload: &[u8]) -> Vec<u8> {
        assert!(number < 16);
        let mut v = vec![number << 3 | 2];
        let mut len = payload.len();
        while len >= 0x80 {
            v.push(len as u8 | 0x80);
            len >>= 7;
        }
        v.push(len as u8);
        v.extend_from_slice(payload);
        v
    }

    fn span(name: &str) -> Vec<u8> {
        // name (5), kind (6, varint 2), start time (7, fixed64).
        let mut s = ld(5, name.as_bytes());
        s.extend([6 << 3, 2, 7 << 3 | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        s
    }

    fn scope_spans(n: usize) -> Vec<u8> {
        let mut s = ld(1, &ld(1, b"scope")); // InstrumentationScope { name }
        for i in 0..n {
            s.extend(ld(2, &span(&format!("GET /users/{i}"))));
        }
        s.extend(ld(3, b"https://opentelemetry.io/schemas/1.21.0"));
        s
    }

    fn request() -> Vec<u8> {
        let resource = ld(1, &ld(1, b"attrs")); // Resource
        let mut first = resource.clone();
        first.extend(ld(2, &scope_spans(2)));
        first.extend(ld(2, &scope_spans(1)));
        let mut second = resource;
        second.extend(ld(2, &scope_spans(3)));
        [ld(1, &first), ld(1, &second)].concat()
    }

    #[test]
    fn counts_spans_of_every_scope() {
        assert_eq!(spans(&request()), 6);
        assert_eq!(spans(&[]), 0);
    }

    #[test]
    fn stops_at_damage() {
        let body = request();
        // Cut inside the second ResourceSpans: the first one's 3 spans still count.
        assert_eq!(spans(&body[..body.len() - 3]), 3);
        assert_eq!(spans(&[0x0a, 0xff]), 0);
    }

    #[test]
    fn reads_varints() {
        let mut buf: &[u8] = &[0xac, 0x02, 0x01];
        assert_eq!(varint(&mut buf), Some(300));
        assert_eq!(buf, &[0x01]);
        assert_eq!(varint(&mut &[0x80u8][..]), None);
    }
}
