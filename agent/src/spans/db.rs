//! CLIENT spans of database statements, named and attributed as the OpenTelemetry database
//! conventions say: `{db.operation.name} {db.collection.name}`, the statement's text with its
//! literals replaced by `?` (they may be personal data), rows returned, SQLSTATE on errors.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::{
    protocols::{
        postgres::Statement,
        sql::{self, SqlSummary},
    },
    spans::{
        http::Endpoint,
        model::{Attributes, SpanStatus},
    },
};

/// Span name of a statement whose text is unknown (prepared before the agent started).
const UNKNOWN_STATEMENT: &str = "EXECUTE";

pub struct DbSpan {
    pub name: String,
    pub attributes: Attributes,
    pub status: SpanStatus,
}

/// How much of a statement's text leaves the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryText {
    /// Literals replaced by `?` (the default).
    Sanitized,
    /// As sent, literals included.
    Raw,
}

/// Summaries of recent statement texts: parsing SQL costs microseconds, and applications run the
/// same few statements (prepared ones above all) over and over.
#[derive(Default)]
pub struct SummaryCache {
    summaries: FxHashMap<String, Arc<SqlSummary>>,
}

/// Distinct texts remembered; beyond, the cache starts over (texts with inlined literals).
const MAX_CACHED_SUMMARIES: usize = 1024;

impl SummaryCache {
    pub fn summarize(&mut self, text: &str) -> Arc<SqlSummary> {
        if let Some(summary) = self.summaries.get(text) {
            return summary.clone();
        }
        if self.summaries.len() >= MAX_CACHED_SUMMARIES {
            self.summaries.clear();
        }
        let summary = Arc::new(sql::summarize(text));
        self.summaries.insert(text.to_owned(), summary.clone());
        summary
    }
}

pub fn describe_postgres(
    statement: &Statement,
    database: Option<&str>,
    server: &Endpoint<'_>,
    text: QueryText,
    cache: &mut SummaryCache,
) -> DbSpan {
    let mut attributes: Attributes = vec![("db.system.name".into(), "postgresql".into())];
    if let Some(database) = database {
        attributes.push(("db.namespace".into(), database.to_owned().into()));
    }
    let name = match &statement.text {
        Some(sql_text) => {
            let summary = cache.summarize(sql_text);
            let query_text = match text {
                QueryText::Sanitized => summary.sanitized.clone(),
                QueryText::Raw => sql_text.clone(),
            };
            attributes.push(("db.query.text".into(), query_text.into()));
            if let Some(operation) = &summary.operation {
                attributes.push(("db.operation.name".into(), operation.clone().into()));
            }
            if let Some(collection) = &summary.collection {
                attributes.push(("db.collection.name".into(), collection.clone().into()));
            }
            span_name(summary.operation.as_deref(), summary.collection.as_deref())
        }
        None => UNKNOWN_STATEMENT.to_owned(),
    };
    if let Some(rows) = statement.rows {
        attributes.push(("db.response.returned_rows".into(), i64::try_from(rows).unwrap_or(i64::MAX).into()));
    }
    attributes.push(("server.address".into(), server.ip.to_owned().into()));
    attributes.push(("server.port".into(), i64::from(server.addr.port()).into()));
    attributes.push(("network.peer.address".into(), server.ip.to_owned().into()));
    attributes.push(("network.peer.port".into(), i64::from(server.addr.port()).into()));
    let status = match &statement.error {
        Some(error) => {
            attributes.push(("db.response.status_code".into(), error.sqlstate.clone().into()));
            attributes.push(("error.type".into(), error.sqlstate.clone().into()));
            SpanStatus::Error
        }
        None => SpanStatus::Unset,
    };
    DbSpan { name, attributes, status }
}

fn span_name(operation: Option<&str>, collection: Option<&str>) -> String {
    match (operation, collection) {
        (Some(op), Some(table)) => format!("{op} {table}"),
        (Some(op), None) => op.to_owned(),
        (None, _) => "postgresql".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{protocols::postgres::PgError, spans::model::AttrValue};

    fn statement(text: Option<&str>) -> Statement {
        Statement {
            text: text.map(str::to_owned),
            start_ns: 1,
            end_ns: 2,
            command_tag: Some("SELECT 2".into()),
            rows: Some(2),
            error: None,
        }
    }

    fn get<'a>(span: &'a DbSpan, key: &str) -> Option<&'a AttrValue> {
        span.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn server() -> Endpoint<'static> {
        Endpoint { addr: "127.0.0.1:5432".parse().expect("address"), ip: "127.0.0.1" }
    }

    #[test]
    fn names_and_sanitises() {
        let stmt = statement(Some("SELECT name FROM users WHERE email = 'ann@example.com' AND id = 42"));
        let span = describe_postgres(&stmt, Some("app"), &server(), QueryText::Sanitized, &mut SummaryCache::default());
        assert_eq!(span.name, "SELECT users");
        let AttrValue::Str(text) = get(&span, "db.query.text").expect("text") else { panic!("a string") };
        assert!(!text.contains("ann@example.com") && !text.contains("42"), "{text}");
        assert_eq!(get(&span, "db.namespace"), Some(&AttrValue::from("app")));
        assert_eq!(get(&span, "db.response.returned_rows"), Some(&AttrValue::Int(2)));
        assert_eq!(get(&span, "server.port"), Some(&AttrValue::Int(5432)));
        assert_eq!(span.status, SpanStatus::Unset);
        let raw = describe_postgres(&stmt, None, &server(), QueryText::Raw, &mut SummaryCache::default());
        assert!(matches!(get(&raw, "db.query.text"), Some(AttrValue::Str(t)) if t.contains("ann@example.com")));
    }

    #[test]
    fn errors_and_unknown_statements() {
        let mut stmt = statement(None);
        stmt.error = Some(PgError { sqlstate: "42P01".into(), message: "relation \"x\" does not exist".into() });
        let span = describe_postgres(&stmt, None, &server(), QueryText::Sanitized, &mut SummaryCache::default());
        assert_eq!(span.name, UNKNOWN_STATEMENT);
        assert_eq!(span.status, SpanStatus::Error);
        assert_eq!(get(&span, "db.response.status_code"), Some(&AttrValue::from("42P01")));
        assert!(get(&span, "db.query.text").is_none(), "never a wrong text");
    }
}
