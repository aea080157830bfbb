//! One line per span on stdout, for `--print` and for tests that parse it.

use std::io::{self, BufWriter, Write};

use crate::spans::model::{Span, SpanKind, SpanStatus};

/// Prints batches to stdout; turns itself off after the first write error (e.g. a closed
/// pipe) instead of failing every batch.
#[derive(Debug, Default)]
pub(super) struct Printer {
    broken: bool,
}

impl Printer {
    pub(super) fn print(&mut self, spans: &[Span]) {
        if self.broken || spans.is_empty() {
            return;
        }
        let stdout = io::stdout();
        if let Err(e) = write_batch(&mut BufWriter::new(stdout.lock()), spans) {
            log::warn!("printing spans to stdout failed, printing disabled: {e}");
            self.broken = true;
        }
    }
}

fn write_batch(out: &mut impl Write, spans: &[Span]) -> io::Result<()> {
    for span in spans {
        write_line(out, span)?;
    }
    out.flush()
}

/// `span trace=<32 hex> id=<16 hex> parent=<16 hex|-> kind=<KIND> name="<name>"
/// duration_us=<u64> status=<UNSET|ERROR> service=<service.name>`
///
/// `name` is Rust-escaped inside the quotes and `service` is escaped, so a line never breaks.
pub(super) fn write_line(out: &mut impl Write, span: &Span) -> io::Result<()> {
    out.write_all(b"span trace=")?;
    write_hex(out, &span.trace_id)?;
    out.write_all(b" id=")?;
    write_hex(out, &span.span_id)?;
    out.write_all(b" parent=")?;
    match &span.parent_span_id {
        Some(parent) => write_hex(out, parent)?,
        None => out.write_all(b"-")?,
    }
    writeln!(
        out,
        " kind={} name={:?} duration_us={} status={} service={}",
        kind(span.kind),
        span.name,
        span.end_unix_ns.saturating_sub(span.start_unix_ns) / 1_000,
        status(&span.status),
        span.resource.service_name().escape_debug(),
    )
}

fn write_hex(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    bytes.iter().try_for_each(|b| write!(out, "{b:02x}"))
}

fn kind(kind: SpanKind) -> &'static str {
    match kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Producer => "PRODUCER",
        SpanKind::Consumer => "CONSUMER",
    }
}

fn status(status: &SpanStatus) -> &'static str {
    match status {
        SpanStatus::Unset => "UNSET",
        SpanStatus::Error => "ERROR",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::model::Resource;
    use std::sync::Arc;

    fn span() -> Span {
        Span {
            trace_id: [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            parent_span_id: Some([1, 2, 3, 4, 5, 6, 7, 8]),
            trace_flags: 1,
            trace_state: String::new(),
            kind: SpanKind::Server,
            name: "GET /api".into(),
            start_unix_ns: 1_000_000,
            end_unix_ns: 3_500_999,
            attributes: Vec::new(),
            status: SpanStatus::Error,
            links: Vec::new(),
            resource: Arc::new(Resource {
                attributes: vec![("service.name".into(), "checkout api".into())],
            }),
        }
    }

    fn line(span: &Span) -> String {
        let mut buf = Vec::new();
        write_line(&mut buf, span).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn exact_format() {
        assert_eq!(
            line(&span()),
            "span trace=4bf92f3577b34da6a3ce929d0e0e4736 id=00f067aa0ba902b7 \
             parent=0102030405060708 kind=SERVER name=\"GET /api\" duration_us=2500 \
             status=ERROR service=checkout api\n"
        );
    }

    #[test]
    fn root_client_and_escaping() {
        let mut s = span();
        s.parent_span_id = None;
        s.kind = SpanKind::Client;
        s.status = SpanStatus::Unset;
        s.name = "say \"hi\"\n".into();
        s.end_unix_ns = 0; // clock skew must not underflow
        s.resource = Arc::new(Resource {
            attributes: Vec::new(),
        });
        assert_eq!(
            line(&s),
            "span trace=4bf92f3577b34da6a3ce929d0e0e4736 id=00f067aa0ba902b7 parent=- \
             kind=CLIENT name=\"say \\\"hi\\\"\\n\" duration_us=0 status=UNSET \
             service=unknown_service\n"
        );
        for (k, want) in [
            (SpanKind::Producer, "PRODUCER"),
            (SpanKind::Consumer, "CONSUMER"),
        ] {
            s.kind = k;
            assert!(line(&s).contains(&format!(" kind={want} ")));
        }
    }

    #[test]
    fn batch_is_one_line_per_span() {
        let mut buf = Vec::new();
        write_batch(&mut buf, &[span(), span(), span()]).unwrap();
        assert_eq!(String::from_utf8(buf).unwrap().lines().count(), 3);
    }
}
