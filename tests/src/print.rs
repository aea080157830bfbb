//! Parser for the agent's `--print` output:
//! `span trace=<32hex> id=<16hex> parent=<16hex|-> kind=<SERVER|CLIENT> name="<name>"
//!  duration_us=<n> status=<UNSET|ERROR> service=<name>`

use std::collections::BTreeMap;

use crate::util::is_valid_hex_id;

/// One `--print` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrintedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for `parent=-`.
    pub parent_span_id: Option<String>,
    /// `SERVER` or `CLIENT`.
    pub kind: String,
    pub name: String,
    pub duration_us: u64,
    /// `UNSET` or `ERROR`.
    pub status: String,
    pub service: String,
}

/// Parses every line starting with `span `; panics on a malformed one.
/// Other lines (if any) are ignored.
pub fn parse_print_output(stdout: &str) -> Vec<PrintedSpan> {
    stdout
        .lines()
        .filter(|line| line.starts_with("span "))
        .map(|line| parse_print_line(line).unwrap_or_else(|e| panic!("malformed --print line {line:?}: {e}")))
        .collect()
}

/// Parses and validates one `span ...` line.
pub fn parse_print_line(line: &str) -> Result<PrintedSpan, String> {
    let rest = line.strip_prefix("span ").ok_or("line does not start with \"span \"")?;
    let mut fields = parse_fields(rest)?;
    let mut take = |key: &str| fields.remove(key).ok_or_else(|| format!("missing field {key}"));
    let span = PrintedSpan {
        trace_id: take("trace")?,
        span_id: take("id")?,
        parent_span_id: Some(take("parent")?).filter(|p| p != "-"),
        kind: take("kind")?,
        name: take("name")?,
        duration_us: take("duration_us")?.parse().map_err(|e| format!("duration_us: {e}"))?,
        status: take("status")?,
        service: take("service")?,
    };
    if !fields.is_empty() {
        return Err(format!("unexpected fields {:?}", fields.keys().collect::<Vec<_>>()));
    }
    validate(&span)?;
    Ok(span)
}

fn validate(span: &PrintedSpan) -> Result<(), String> {
    if !is_valid_hex_id(&span.trace_id, 32) {
        return Err(format!("trace {:?} is not 32 lowercase hex digits", span.trace_id));
    }
    if !is_valid_hex_id(&span.span_id, 16) {
        return Err(format!("id {:?} is not 16 lowercase hex digits", span.span_id));
    }
    if let Some(parent) = &span.parent_span_id {
        if !is_valid_hex_id(parent, 16) {
            return Err(format!("parent {parent:?} is neither - nor 16 lowercase hex digits"));
        }
    }
    if !matches!(span.kind.as_str(), "SERVER" | "CLIENT") {
        return Err(format!("kind {:?} is not SERVER or CLIENT", span.kind));
    }
    if !matches!(span.status.as_str(), "UNSET" | "ERROR") {
        return Err(format!("status {:?} is not UNSET or ERROR", span.status));
    }
    Ok(())
}

/// Splits `key=value key="quoted value" ...` (quoted values may contain
/// spaces and `\"` / `\\` escapes).
fn parse_fields(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut fields = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if_eq(&' ').is_some() {}
        if chars.peek().is_none() {
            return Ok(fields);
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|&c| c != '=' && c != ' ')).collect();
        if chars.next() != Some('=') {
            return Err(format!("field {key:?} has no '='"));
        }
        let value = if chars.next_if_eq(&'"').is_some() {
            quoted_value(&mut chars).ok_or_else(|| format!("unterminated quote in field {key}"))?
        } else {
            std::iter::from_fn(|| chars.next_if(|&c| c != ' ')).collect()
        };
        if fields.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate field {key}"));
        }
    }
}

fn quoted_value(chars: &mut impl Iterator<Item = char>) -> Option<String> {
    let mut value = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(value),
            '\\' => value.push(chars.next()?),
            c => value.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "span trace=4bf92f3577b34da6a3ce929d0e0e4736 id=00f067aa0ba902b7 parent=- kind=SERVER \
                        name=\"GET /users/*\" duration_us=1234 status=UNSET service=backend";

    #[test]
    fn parses_a_root_server_span() {
        let span = parse_print_line(LINE).unwrap();
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.span_id, "00f067aa0ba902b7");
        assert_eq!(span.parent_span_id, None);
        assert_eq!(span.kind, "SERVER");
        assert_eq!(span.name, "GET /users/*");
        assert_eq!(span.duration_us, 1234);
        assert_eq!(span.status, "UNSET");
        assert_eq!(span.service, "backend");
    }

    #[test]
    fn parses_parent_and_escapes() {
        let line = LINE.replace("parent=-", "parent=00f067aa0ba902b8").replace("GET /users/*", "GET /a\\\"b");
        let span = parse_print_line(&line).unwrap();
        assert_eq!(span.parent_span_id.as_deref(), Some("00f067aa0ba902b8"));
        assert_eq!(span.name, "GET /a\"b");
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(parse_print_line(&LINE.replace("kind=SERVER", "kind=INTERNAL")).is_err());
        assert!(parse_print_line(&LINE.replace("id=00f067aa0ba902b7", "id=xyz")).is_err());
        assert!(parse_print_line(&LINE.replace(" service=backend", "")).is_err());
        assert!(parse_print_line(&LINE.replace("\"GET /users/*\"", "\"GET /users/*")).is_err());
    }

    #[test]
    fn ignores_other_lines() {
        let output = format!("starting\n{LINE}\n");
        assert_eq!(parse_print_output(&output).len(), 1);
    }
}
