//! SQL summaries for database spans: the operation (`SELECT`, `INSERT`, ...), the main table, and the
//! statement with every literal replaced by `?`.
//!
//! Span names and attributes must stay low-cardinality and must not carry the values a query holds,
//! yet the agent often sees only the first bytes of a query. sqlparser (PostgreSQL dialect) finds the
//! operation and table when the text parses; when it does not (vendor syntax, text cut by capture),
//! keyword heuristics over a small PostgreSQL lexer take over. Sanitising always uses that lexer: it
//! accepts any text, and a literal cut short by truncation still becomes `?`.

use sqlparser::ast::{
    CopySource, FromTable, ObjectName, ObjectType, Query, SetExpr, Statement, TableFactor, TableObject, TableWithJoins,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// Only this many leading bytes are summarised: bounds the work per statement.
const MAX_SUMMARY_BYTES: usize = 4096;

/// First keywords that name an operation. Any other first word gives none, so garbage cannot mint
/// new span names.
const OPERATIONS: &str = "ABORT ALTER ANALYSE ANALYZE BEGIN CALL CHECKPOINT CLOSE CLUSTER COMMENT COMMIT COPY CREATE \
    DEALLOCATE DECLARE DELETE DISCARD DO DROP END EXECUTE EXPLAIN FETCH GRANT IMPORT INSERT LISTEN LOAD LOCK MERGE \
    MOVE NOTIFY PREPARE REASSIGN REFRESH REINDEX RELEASE RESET REVOKE ROLLBACK SAVEPOINT SECURITY SELECT SET SHOW \
    START TABLE TRUNCATE UNLISTEN UPDATE VACUUM VALUES WITH";
/// What can follow a WITH clause as the statement it serves.
const MAIN_OPERATIONS: [&str; 7] = ["SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE"];
/// Modifiers between CREATE and TABLE.
const CREATE_TABLE_MODIFIERS: [&str; 7] = ["OR", "REPLACE", "GLOBAL", "LOCAL", "TEMP", "TEMPORARY", "UNLOGGED"];
const IF_EXISTS: [&str; 3] = ["IF", "NOT", "EXISTS"];

/// What a statement does, to what, in words safe to export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqlSummary {
    /// Upper-case first keyword of the first statement (for WITH: of the statement it serves, when
    /// known); None when the text does not start with a statement keyword.
    pub operation: Option<String>,
    /// The main table as written (`public.users`), quotes removed; None when there is none.
    pub collection: Option<String>,
    /// The text with every literal replaced by `?`, comments dropped, whitespace runs collapsed.
    pub sanitized: String,
}

/// Summarises `sql` (at most its first 4096 bytes): operation, main table and sanitized text.
pub fn summarize(sql: &str) -> SqlSummary {
    let sql = leading_bytes(sql, MAX_SUMMARY_BYTES);
    let shape = split_statements(sql).first().map(|first| shape_of(first)).unwrap_or_default();
    SqlSummary { operation: shape.operation, collection: shape.collection, sanitized: sanitize(sql) }
}

/// Splits a simple-query string into its statements at top-level `;` (not inside quotes, dollar quotes,
/// comments, parentheses or a `BEGIN ATOMIC` body). Statements are trimmed; empty ones are dropped.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut statements = Vec::new();
    let mut nesting = Nesting::default();
    let mut start = 0;
    let mut has_content = false;
    for token in Lexer::new(sql).filter(|token| token.kind != TokenKind::Space) {
        let ends_statement = token.is_symbol(";") && nesting.is_top_level();
        nesting.track(&token);
        if ends_statement {
            push_statement(&mut statements, sql, start, token.start, has_content);
            start = token.end();
            has_content = false;
        } else {
            has_content = true;
        }
    }
    push_statement(&mut statements, sql, start, sql.len(), has_content);
    statements
}

/// Replaces literals by `?` and drops comments; whitespace runs become one space.
fn sanitize(sql: &str) -> String {
    let mut sanitized = String::with_capacity(sql.len());
    let mut space_pending = false;
    for token in Lexer::new(sql) {
        if token.kind == TokenKind::Space {
            space_pending = !sanitized.is_empty();
            continue;
        }
        if space_pending {
            sanitized.push(' ');
            space_pending = false;
        }
        sanitized.push_str(if token.kind == TokenKind::Literal { "?" } else { token.text });
    }
    sanitized
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn leading_bytes(text: &str, max: usize) -> &str {
    text.get(..text.floor_char_boundary(max)).unwrap_or_default()
}

fn push_statement<'a>(statements: &mut Vec<&'a str>, sql: &'a str, start: usize, end: usize, has_content: bool) {
    if let Some(statement) = sql.get(start..end).filter(|_| has_content) {
        statements.push(statement.trim());
    }
}

/// Tracks what makes a `;` part of the statement rather than its end.
#[derive(Default)]
struct Nesting {
    parentheses: usize,
    /// `BEGIN ATOMIC ... END` bodies of SQL functions hold `;`; CASE ... END pairs nest inside them.
    atomic_blocks: usize,
    after_begin: bool,
}

impl Nesting {
    fn is_top_level(&self) -> bool {
        self.parentheses == 0 && self.atomic_blocks == 0
    }

    fn track(&mut self, token: &Token<'_>) {
        if token.is_symbol("(") {
            self.parentheses += 1;
        } else if token.is_symbol(")") {
            self.parentheses = self.parentheses.saturating_sub(1);
        } else if (self.after_begin && token.is_word("ATOMIC")) || (self.atomic_blocks > 0 && token.is_word("CASE")) {
            self.atomic_blocks += 1;
        } else if self.atomic_blocks > 0 && token.is_word("END") {
            self.atomic_blocks -= 1;
        }
        self.after_begin = token.is_word("BEGIN");
    }
}

/// Operation and main table of one statement.
#[derive(Debug, Default, PartialEq, Eq)]
struct Shape {
    operation: Option<String>,
    collection: Option<String>,
}

fn shape_of(statement: &str) -> Shape {
    let tokens: Vec<Token<'_>> = Lexer::new(statement).filter(|token| token.kind != TokenKind::Space).collect();
    let tokens = skip_leading_parentheses(&tokens);
    let operation =
        tokens.first().filter(|token| token.kind == TokenKind::Word).and_then(|token| operation_of(token.text));
    parsed_shape(statement, operation).unwrap_or_else(|| guessed_shape(tokens, operation))
}

fn operation_of(word: &str) -> Option<&'static str> {
    OPERATIONS.split_ascii_whitespace().find(|operation| operation.eq_ignore_ascii_case(word))
}

fn skip_leading_parentheses<'t, 'a>(tokens: &'t [Token<'a>]) -> &'t [Token<'a>] {
    let opening = tokens.iter().take_while(|token| token.is_symbol("(")).count();
    tokens.get(opening..).unwrap_or_default()
}

// ---- sqlparser: the statement parsed ----

/// The shape read from sqlparser's syntax tree; None when the statement does not parse.
fn parsed_shape(statement: &str, operation: Option<&str>) -> Option<Shape> {
    let parsed = Parser::parse_sql(&PostgreSqlDialect {}, statement).ok()?;
    let first = parsed.first()?;
    let operation = match (operation, first) {
        (Some("WITH"), Statement::Query(query)) => Some(query_operation(&query.body)),
        _ => operation,
    };
    let collection = statement_collection(first);
    // sqlparser reads `FROM ONLY t` as a table named ONLY: leave those statements to the heuristics.
    if collection.as_deref().is_some_and(|name| name.eq_ignore_ascii_case("ONLY")) {
        return None;
    }
    Some(Shape { operation: operation.map(str::to_owned), collection })
}

/// The operation of the statement a WITH clause serves.
fn query_operation(body: &SetExpr) -> &'static str {
    match body {
        SetExpr::Select(_) => "SELECT",
        SetExpr::Query(query) => query_operation(&query.body),
        SetExpr::SetOperation { left, .. } => query_operation(left),
        SetExpr::Values(_) => "VALUES",
        SetExpr::Insert(_) => "INSERT",
        SetExpr::Update(_) => "UPDATE",
        SetExpr::Delete(_) => "DELETE",
        SetExpr::Merge(_) => "MERGE",
        SetExpr::Table(_) => "TABLE",
    }
}

fn statement_collection(statement: &Statement) -> Option<String> {
    match statement {
        Statement::Query(query) => query_collection(query),
        Statement::Insert(insert) => match &insert.table {
            TableObject::TableName(name) => object_name(name),
            _ => None,
        },
        Statement::Update(update) => relation_name(&update.table),
        Statement::Delete(delete) => match &delete.from {
            FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables) => {
                tables.first().and_then(relation_name)
            }
        },
        Statement::Merge(merge) => table_factor_name(&merge.table),
        Statement::Copy { source: CopySource::Table { table_name, .. }, .. } => object_name(table_name),
        Statement::CreateTable(create) => object_name(&create.name),
        Statement::AlterTable(alter) => object_name(&alter.name),
        Statement::Drop { object_type: ObjectType::Table, names, .. } => names.first().and_then(object_name),
        Statement::Truncate(truncate) => truncate.table_names.first().and_then(|target| object_name(&target.name)),
        _ => None,
    }
}

fn query_collection(query: &Query) -> Option<String> {
    set_expr_collection(&query.body)
}

fn set_expr_collection(body: &SetExpr) -> Option<String> {
    match body {
        SetExpr::Select(select) => select.from.first().and_then(relation_name),
        SetExpr::Query(query) => query_collection(query),
        SetExpr::SetOperation { left, .. } => set_expr_collection(left),
        SetExpr::Insert(statement)
        | SetExpr::Update(statement)
        | SetExpr::Delete(statement)
        | SetExpr::Merge(statement) => statement_collection(statement),
        SetExpr::Table(table) => {
            let name = table.table_name.as_deref()?;
            Some(table.schema_name.as_deref().map_or_else(|| name.to_owned(), |schema| format!("{schema}.{name}")))
        }
        SetExpr::Values(_) => None,
    }
}

/// The first relation of a FROM item, when it is a plain table (not a subquery or function).
fn relation_name(table: &TableWithJoins) -> Option<String> {
    table_factor_name(&table.relation)
}

fn table_factor_name(factor: &TableFactor) -> Option<String> {
    match factor {
        TableFactor::Table { name, args: None, .. } => object_name(name),
        _ => None,
    }
}

/// `schema.table` with quotes removed.
fn object_name(name: &ObjectName) -> Option<String> {
    let parts: Option<Vec<&str>> =
        name.0.iter().map(|part| part.as_ident().map(|ident| ident.value.as_str())).collect();
    parts.filter(|parts| !parts.is_empty()).map(|parts| parts.join("."))
}

// ---- heuristics: the statement does not parse ----

fn guessed_shape(tokens: &[Token<'_>], operation: Option<&'static str>) -> Shape {
    let Some(operation) = operation else { return Shape::default() };
    if operation != "WITH" {
        return Shape { operation: Some(operation.to_owned()), collection: guessed_collection(operation, tokens) };
    }
    // The served statement is the first of its keywords outside the WITH clause's parentheses.
    let main = top_level(tokens)
        .find_map(|(index, token)| MAIN_OPERATIONS.iter().find(|main| token.is_word(main)).map(|main| (index, *main)));
    match main {
        Some((index, main)) => Shape {
            operation: Some(main.to_owned()),
            collection: guessed_collection(main, tokens.get(index..).unwrap_or_default()),
        },
        None => Shape { operation: Some(operation.to_owned()), collection: None },
    }
}

/// The main table of a statement whose tokens start with `operation`'s keyword.
fn guessed_collection(operation: &str, tokens: &[Token<'_>]) -> Option<String> {
    let rest = tokens.get(1..).unwrap_or_default();
    match operation {
        "SELECT" => {
            let from = top_level(rest).find(|(_, token)| token.is_word("FROM")).map(|(index, _)| index + 1)?;
            relation_at(skip_words(rest.get(from..)?, &["ONLY"]))
        }
        "INSERT" | "MERGE" => name_at(after_word(rest, "INTO")?),
        "UPDATE" | "TABLE" => name_at(skip_words(rest, &["ONLY"])),
        "DELETE" => name_at(skip_words(after_word(rest, "FROM")?, &["ONLY"])),
        "COPY" => name_at(skip_words(rest, &["BINARY"])),
        "TRUNCATE" => name_at(skip_words(rest, &["TABLE", "ONLY"])),
        "CREATE" => name_at(skip_words(after_word(skip_words(rest, &CREATE_TABLE_MODIFIERS), "TABLE")?, &IF_EXISTS)),
        "DROP" => name_at(skip_words(after_word(rest, "TABLE")?, &IF_EXISTS)),
        "ALTER" => name_at(skip_words(skip_words(after_word(rest, "TABLE")?, &IF_EXISTS), &["ONLY"])),
        _ => None,
    }
}

/// Tokens (with their index) outside any parentheses opened within `tokens`.
fn top_level<'t, 'a>(tokens: &'t [Token<'a>]) -> impl Iterator<Item = (usize, &'t Token<'a>)> {
    let mut depth = 0usize;
    tokens.iter().enumerate().filter(move |(_, token)| {
        if token.is_symbol("(") {
            depth += 1;
        } else if token.is_symbol(")") {
            depth = depth.saturating_sub(1);
            return false;
        }
        depth == 0
    })
}

fn skip_words<'t, 'a>(tokens: &'t [Token<'a>], words: &[&str]) -> &'t [Token<'a>] {
    let skipped = tokens.iter().take_while(|token| words.iter().any(|word| token.is_word(word))).count();
    tokens.get(skipped..).unwrap_or_default()
}

/// The tokens after `word` when the tokens start with it.
fn after_word<'t, 'a>(tokens: &'t [Token<'a>], word: &str) -> Option<&'t [Token<'a>]> {
    tokens.first().filter(|token| token.is_word(word))?;
    tokens.get(1..)
}

/// A FROM item's table name; None for a function call (`generate_series(1, 3)`).
fn relation_at(tokens: &[Token<'_>]) -> Option<String> {
    let (name, rest) = name_and_rest(tokens)?;
    (!rest.first().is_some_and(|token| token.is_symbol("("))).then_some(name)
}

/// A possibly schema-qualified name at the start of `tokens`; None for a name cut after its dot.
fn name_at(tokens: &[Token<'_>]) -> Option<String> {
    name_and_rest(tokens).map(|(name, _)| name)
}

fn name_and_rest<'t, 'a>(tokens: &'t [Token<'a>]) -> Option<(String, &'t [Token<'a>])> {
    let mut parts = vec![name_part(tokens.first()?)?];
    let mut rest = tokens.get(1..).unwrap_or_default();
    while rest.first().is_some_and(|token| token.is_symbol(".")) {
        parts.push(name_part(rest.get(1)?)?);
        rest = rest.get(2..).unwrap_or_default();
    }
    Some((parts.join("."), rest))
}

fn name_part(token: &Token<'_>) -> Option<String> {
    match token.kind {
        TokenKind::Word => Some(token.text.to_owned()),
        TokenKind::QuotedName => Some(unquote(token.text)),
        _ => None,
    }
}

/// `"My ""Table"""` -> `My "Table"`; also `U&"..."` and a name cut short by capture.
fn unquote(quoted: &str) -> String {
    let inner = quoted.split_once('"').map_or(quoted, |(_, inner)| inner);
    let mut name = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(char) = chars.next() {
        if char != '"' {
            name.push(char);
        } else if chars.next() == Some('"') {
            name.push('"');
        } else {
            break;
        }
    }
    name
}

// ---- lexer ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// Keyword or bare identifier.
    Word,
    /// `"identifier"`.
    QuotedName,
    /// String (all PostgreSQL forms), dollar-quoted string or number.
    Literal,
    /// `$1`.
    Parameter,
    /// One punctuation or operator character.
    Symbol,
    /// Whitespace or comment.
    Space,
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    kind: TokenKind,
    text: &'a str,
    /// Byte offset in the lexed text.
    start: usize,
}

impl Token<'_> {
    fn end(&self) -> usize {
        self.start + self.text.len()
    }

    fn is_symbol(&self, symbol: &str) -> bool {
        self.kind == TokenKind::Symbol && self.text == symbol
    }

    fn is_word(&self, word: &str) -> bool {
        self.kind == TokenKind::Word && self.text.eq_ignore_ascii_case(word)
    }
}

/// PostgreSQL lexical rules (standard_conforming_strings on, the default since 9.1), tolerant of
/// anything: an unterminated string, quoted name or comment runs to the end of the text.
struct Lexer<'a> {
    sql: &'a str,
    position: usize,
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str) -> Self {
        Self { sql, position: 0 }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let start = self.position;
        let rest = self.sql.get(start..).filter(|rest| !rest.is_empty())?;
        let (kind, len) = token_at(rest);
        let mut end = (start + len.max(1)).min(self.sql.len());
        // Every token ends before an ASCII byte or at the end; stay on a boundary regardless.
        while !self.sql.is_char_boundary(end) {
            end += 1;
        }
        self.position = end;
        Some(Token { kind, text: self.sql.get(start..end).unwrap_or_default(), start })
    }
}

/// Kind and byte length of the token at the start of `rest` (not empty).
fn token_at(rest: &str) -> (TokenKind, usize) {
    let bytes = rest.as_bytes();
    match bytes {
        [b'-', b'-', ..] => (TokenKind::Space, bytes.iter().position(|&byte| byte == b'\n').unwrap_or(bytes.len())),
        [b'/', b'*', ..] => (TokenKind::Space, block_comment_len(bytes)),
        [b'\'', ..] => (TokenKind::Literal, quoted_len(bytes, 0, b'\'', false)),
        // E'...' strings take backslash escapes: \' does not end them.
        [b'e' | b'E', b'\'', ..] => (TokenKind::Literal, quoted_len(bytes, 1, b'\'', true)),
        [b'b' | b'B' | b'x' | b'X' | b'n' | b'N', b'\'', ..] => {
            (TokenKind::Literal, quoted_len(bytes, 1, b'\'', false))
        }
        [b'u' | b'U', b'&', b'\'', ..] => (TokenKind::Literal, quoted_len(bytes, 2, b'\'', false)),
        [b'u' | b'U', b'&', b'"', ..] => (TokenKind::QuotedName, quoted_len(bytes, 2, b'"', false)),
        [b'"', ..] => (TokenKind::QuotedName, quoted_len(bytes, 0, b'"', false)),
        [b'$', b'0'..=b'9', ..] => {
            (TokenKind::Parameter, 1 + count_while(bytes.get(1..).unwrap_or_default(), |byte| byte.is_ascii_digit()))
        }
        [b'$', ..] => dollar_quoted_len(rest).map_or((TokenKind::Symbol, 1), |len| (TokenKind::Literal, len)),
        [b'0'..=b'9', ..] | [b'.', b'0'..=b'9', ..] => (TokenKind::Literal, number_len(bytes)),
        [first, ..] if is_space(*first) => (TokenKind::Space, count_while(bytes, is_space)),
        // Digits and `$` were taken above: here a word byte starts a word.
        [first, ..] if is_word_byte(*first) => (TokenKind::Word, count_while(bytes, is_word_byte)),
        _ => (TokenKind::Symbol, 1),
    }
}

/// Whitespace, and control characters that can only come from garbage.
fn is_space(byte: u8) -> bool {
    byte == b' ' || byte.is_ascii_control()
}

/// Identifier bytes; non-ASCII ones are letters to PostgreSQL.
fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$' || !byte.is_ascii()
}

fn count_while(bytes: &[u8], keep: impl Fn(u8) -> bool) -> usize {
    bytes.iter().take_while(|&&byte| keep(byte)).count()
}

/// `/* ... */`, nesting as PostgreSQL does.
fn block_comment_len(bytes: &[u8]) -> usize {
    let mut depth = 0usize;
    let mut index = 0;
    while let Some(pair) = bytes.get(index..index + 2) {
        match pair {
            b"/*" => depth += 1,
            b"*/" => depth -= 1,
            _ => {
                index += 1;
                continue;
            }
        }
        index += 2;
        if depth == 0 {
            return index;
        }
    }
    bytes.len()
}

/// A quoted token after `prefix` bytes: a doubled quote stays inside, as does an escaped one when
/// `backslash_escapes`.
fn quoted_len(bytes: &[u8], prefix: usize, quote: u8, backslash_escapes: bool) -> usize {
    let mut index = prefix + 1;
    while let Some(&byte) = bytes.get(index) {
        let escaped = backslash_escapes && byte == b'\\';
        let doubled = byte == quote && bytes.get(index + 1) == Some(&quote);
        if escaped || doubled {
            index += 2;
        } else if byte == quote {
            return index + 1;
        } else {
            index += 1;
        }
    }
    bytes.len()
}

/// `$tag$ ... $tag$` (the tag may be empty); None when `$` does not open a dollar quote.
fn dollar_quoted_len(rest: &str) -> Option<usize> {
    let bytes = rest.as_bytes();
    let tag_len = 2 + count_while(bytes.get(1..)?, |byte| is_word_byte(byte) && byte != b'$');
    if bytes.get(tag_len - 1) != Some(&b'$') {
        return None;
    }
    let tag = rest.get(..tag_len)?;
    let body = rest.get(tag_len..)?;
    Some(body.find(tag).map_or(rest.len(), |end| tag_len + end + tag_len))
}

/// Digits with any letters, dots, underscores and exponent signs glued to them (`1_000`, `0x1F`,
/// `1.5e-3`): all of it is the literal.
fn number_len(bytes: &[u8]) -> usize {
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        let exponent_sign = matches!(byte, b'+' | b'-')
            && index > 0
            && matches!(bytes.get(index - 1), Some(b'e' | b'E'))
            && bytes.get(index + 1).is_some_and(u8::is_ascii_digit);
        if !(byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'.' || exponent_sign) {
            break;
        }
        index += 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::test_rng::XorShift;

    fn summary(operation: Option<&str>, collection: Option<&str>, sanitized: &str) -> SqlSummary {
        SqlSummary {
            operation: operation.map(str::to_owned),
            collection: collection.map(str::to_owned),
            sanitized: sanitized.to_owned(),
        }
    }

    fn shape(operation: &str, collection: Option<&str>) -> Shape {
        Shape { operation: Some(operation.to_owned()), collection: collection.map(str::to_owned) }
    }

    /// The heuristics alone, as used when sqlparser gives up.
    fn guessed(statement: &str) -> Shape {
        let tokens: Vec<Token<'_>> = Lexer::new(statement).filter(|token| token.kind != TokenKind::Space).collect();
        let tokens = skip_leading_parentheses(&tokens);
        let operation = tokens.first().and_then(|token| operation_of(token.text));
        guessed_shape(tokens, operation)
    }

    fn assert_hidden(sanitized: &str, secrets: &[&str]) {
        for secret in secrets {
            assert!(!sanitized.contains(secret), "{secret:?} leaked into {sanitized:?}");
        }
    }

    #[test]
    fn select_with_literals() {
        let sql = "SELECT id, name FROM users WHERE email = 'alice@example.com' AND age > 42 LIMIT 10";
        assert_eq!(
            summarize(sql),
            summary(Some("SELECT"), Some("users"), "SELECT id, name FROM users WHERE email = ? AND age > ? LIMIT ?")
        );
    }

    #[test]
    fn dml_tables() {
        let cases = [
            ("INSERT INTO public.orders (id, total) VALUES ($1, $2)", "INSERT", "public.orders"),
            ("UPDATE accounts SET balance = balance - 100.50 WHERE id = 7", "UPDATE", "accounts"),
            ("DELETE FROM sessions WHERE expires < now()", "DELETE", "sessions"),
            ("COPY items (a, b) FROM STDIN WITH (FORMAT csv)", "COPY", "items"),
            ("CREATE TABLE IF NOT EXISTS audit.log (id bigint)", "CREATE", "audit.log"),
            ("TRUNCATE TABLE pgbench_history", "TRUNCATE", "pgbench_history"),
            ("DROP TABLE IF EXISTS tmp_x", "DROP", "tmp_x"),
            ("ALTER TABLE users ADD COLUMN age int", "ALTER", "users"),
            ("select * from \"Public\".\"My Users\" u join b on true", "SELECT", "Public.My Users"),
            ("SELECT a FROM t1, t2 WHERE t1.x = t2.y", "SELECT", "t1"),
            ("(SELECT a FROM t1) UNION (SELECT a FROM t2)", "SELECT", "t1"),
        ];
        for (sql, operation, table) in cases {
            let summary = summarize(sql);
            assert_eq!(summary.operation.as_deref(), Some(operation), "{sql}");
            assert_eq!(summary.collection.as_deref(), Some(table), "{sql}");
        }
    }

    #[test]
    fn statements_without_a_table() {
        for (sql, operation) in [
            ("BEGIN", "BEGIN"),
            ("commit", "COMMIT"),
            ("ROLLBACK TO SAVEPOINT s1", "ROLLBACK"),
            ("SET search_path TO app, public", "SET"),
            ("SHOW server_version", "SHOW"),
            ("SELECT 1", "SELECT"),
            ("SELECT * FROM generate_series(1, 10)", "SELECT"),
            ("SELECT * FROM (SELECT 1) AS sub", "SELECT"),
            ("CALL refresh_stats(3)", "CALL"),
            ("EXPLAIN ANALYZE SELECT * FROM t", "EXPLAIN"),
            ("VACUUM", "VACUUM"),
            ("CREATE INDEX i ON t (a)", "CREATE"),
        ] {
            let summary = summarize(sql);
            assert_eq!(summary.operation.as_deref(), Some(operation), "{sql}");
            assert_eq!(summary.collection, None, "{sql}");
        }
    }

    #[test]
    fn with_takes_the_served_statement() {
        let sql = "WITH recent AS (SELECT * FROM orders WHERE ts > now() - interval '1 day') \
                   SELECT count(*) FROM recent";
        let summary = summarize(sql);
        assert_eq!(summary.operation.as_deref(), Some("SELECT"));
        assert_eq!(summary.collection.as_deref(), Some("recent"));
        let sql = "WITH moved AS (DELETE FROM a RETURNING *) INSERT INTO archive SELECT * FROM moved";
        assert_eq!(summarize(sql).operation.as_deref(), Some("INSERT"));
        assert_eq!(summarize(sql).collection.as_deref(), Some("archive"));
    }

    #[test]
    fn unknown_first_word_has_no_operation() {
        assert_eq!(summarize("hello world 'x'"), summary(None, None, "hello world ?"));
        assert_eq!(summarize(""), summary(None, None, ""));
        assert_eq!(summarize("  -- only a comment\n"), summary(None, None, ""));
    }

    #[test]
    fn every_literal_form_is_replaced() {
        let sql = "SELECT 'it''s', E'a\\'secret1', $$secret2$$, $fn$secret3 $$ $fn$, B'1010', X'FF', \
                   N'secret4', U&'secret5', 4242, 1.5e-3, .25, 0x1F, 1_000, -7 FROM t WHERE a = $1";
        let summary = summarize(sql);
        assert_eq!(summary.sanitized, "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, -? FROM t WHERE a = $1");
        assert_hidden(&summary.sanitized, &["it", "secret", "1010", "FF", "4242", "1_000", "0x"]);
    }

    #[test]
    fn keywords_identifiers_and_casts_are_kept() {
        assert_eq!(
            summarize("SELECT NULL, TRUE, false, t1.col2, \"Quoted 9\" FROM t1 WHERE x = '5'::int").sanitized,
            "SELECT NULL, TRUE, false, t1.col2, \"Quoted 9\" FROM t1 WHERE x = ?::int"
        );
    }

    #[test]
    fn comments_are_dropped_and_whitespace_collapsed() {
        let sql = "  /* app='billing' /* nested */ still */ SELECT\n\t a -- user 'bob'\n  FROM\r\n t  ";
        assert_eq!(summarize(sql).sanitized, "SELECT a FROM t");
        assert_hidden(&summarize(sql).sanitized, &["billing", "bob", "nested"]);
    }

    #[test]
    fn truncated_literals_never_leak() {
        for (sql, sanitized) in [
            ("SELECT * FROM users WHERE password = 'hunter2", "SELECT * FROM users WHERE password = ?"),
            ("SELECT * FROM users WHERE password = E'hunter2\\'", "SELECT * FROM users WHERE password = ?"),
            ("SELECT $body$hunter2", "SELECT ?"),
            ("SELECT $$hunter2", "SELECT ?"),
            ("INSERT INTO t VALUES (1, 'hunter2''s", "INSERT INTO t VALUES (?, ?"),
            ("SELECT * FROM t /* hunter2", "SELECT * FROM t"),
            ("SELECT * FROM t WHERE a = 12345", "SELECT * FROM t WHERE a = ?"),
        ] {
            let summary = summarize(sql);
            assert_eq!(summary.sanitized, sanitized, "{sql}");
            assert_hidden(&summary.sanitized, &["hunter2", "12345"]);
        }
        assert_eq!(
            summarize("SELECT * FROM users WHERE password = 'hunter2"),
            summary(Some("SELECT"), Some("users"), "SELECT * FROM users WHERE password = ?")
        );
    }

    #[test]
    fn truncated_statements_fall_back_to_heuristics() {
        let cases = [
            ("SELECT a, b FROM inventory.items WHERE id IN (1, 2", "SELECT", Some("inventory.items")),
            ("INSERT INTO events (kind, payload) VALUES ('click', '{\"x\":", "INSERT", Some("events")),
            ("UPDATE ONLY stock SET qty = qty - ", "UPDATE", Some("stock")),
            ("DELETE FROM queue WHERE id = (SELECT", "DELETE", Some("queue")),
            ("WITH x AS (SELECT * FROM a) SELECT * FROM x WHERE", "SELECT", Some("x")),
            ("WITH x AS (SELECT * FROM a WHERE b = ", "WITH", None),
            ("SELECT extract(year FROM d) FROM calendar WHERE", "SELECT", Some("calendar")),
            ("SELECT * FROM public.", "SELECT", None),
            ("COPY (SELECT 1) TO STDOUT", "COPY", None),
        ];
        for (sql, operation, table) in cases {
            let summary = summarize(sql);
            assert_eq!(summary.operation.as_deref(), Some(operation), "{sql}");
            assert_eq!(summary.collection.as_deref(), table, "{sql}");
        }
    }

    #[test]
    fn vendor_syntax_uses_heuristics() {
        let sql = "SELECT * FROM ONLY parent_table TABLESAMPLE SYSTEM (10) REPEATABLE (42) WHERE x @@ 'q'";
        assert_eq!(summarize(sql).collection.as_deref(), Some("parent_table"));
        assert_hidden(&summarize(sql).sanitized, &["42", "'q'"]);
    }

    #[test]
    fn heuristics_agree_with_the_parser() {
        for sql in [
            "SELECT id FROM users WHERE id = 1",
            "SELECT * FROM s.t AS x JOIN u ON x.a = u.a",
            "select * from \"Mixed\".\"Case\"",
            "SELECT 1",
            "SELECT * FROM f(1)",
            "SELECT * FROM (SELECT 1) q",
            "(SELECT a FROM t1) UNION SELECT a FROM t2",
            "INSERT INTO a.b (x) VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t WHERE a = 1",
            "COPY t FROM STDIN",
            "CREATE TEMP TABLE t (a int)",
            "CREATE TABLE IF NOT EXISTS t (a int)",
            "DROP TABLE IF EXISTS t, u",
            "ALTER TABLE IF EXISTS t ADD COLUMN a int",
            "TRUNCATE t",
            "WITH w AS (SELECT 1) SELECT * FROM w",
            "WITH w AS (SELECT 1) INSERT INTO t SELECT * FROM w",
            "WITH w AS (SELECT 1) UPDATE t SET a = 1",
            "WITH w AS (SELECT 1) DELETE FROM t",
            "BEGIN",
            "SET x = 1",
        ] {
            let parsed = Parser::parse_sql(&PostgreSqlDialect {}, sql);
            assert!(parsed.is_ok(), "{sql}: {parsed:?}");
            let first_word = sql.trim_start_matches('(').split_whitespace().next().unwrap_or_default();
            let operation = operation_of(first_word);
            assert_eq!(parsed_shape(sql, operation), Some(guessed(sql)), "{sql}");
        }
    }

    #[test]
    fn table_statement_names_its_table() {
        // sqlparser does not parse TABLE in the PostgreSQL dialect: the heuristics do.
        assert_eq!(summarize("TABLE ONLY public.t"), summary(Some("TABLE"), Some("public.t"), "TABLE ONLY public.t"));
    }

    #[test]
    fn heuristics_find_the_served_statement() {
        assert_eq!(guessed("WITH w AS (SELECT 1) UPDATE t SET a = 1"), shape("UPDATE", Some("t")));
        assert_eq!(
            guessed("WITH RECURSIVE r(n) AS (SELECT 1 UNION SELECT n + 1 FROM r) SELECT n FROM r"),
            shape("SELECT", Some("r"))
        );
        assert_eq!(guessed("MERGE INTO tgt USING src ON tgt.id = src.id"), shape("MERGE", Some("tgt")));
    }

    #[test]
    fn quoted_names_are_unquoted() {
        assert_eq!(unquote("\"a\""), "a");
        assert_eq!(unquote("\"say \"\"hi\"\"\""), "say \"hi\"");
        assert_eq!(unquote("\"cut"), "cut");
        assert_eq!(unquote("U&\"x\""), "x");
        assert_eq!(unquote("\"\""), "");
    }

    #[test]
    fn long_text_is_capped() {
        let mut sql = "SELECT * FROM big WHERE v IN (".to_owned();
        while sql.len() < 100_000 {
            sql.push_str("'secret', ");
        }
        let summary = summarize(&sql);
        assert!(summary.sanitized.len() <= MAX_SUMMARY_BYTES);
        assert_eq!(summary.collection.as_deref(), Some("big"));
        assert_hidden(&summary.sanitized, &["secret"]);
        // The cap falls inside a multi-byte character: the cut moves back to a boundary.
        let sql = format!("SELECT '{}'", "é".repeat(3000));
        assert_eq!(summarize(&sql).sanitized, "SELECT ?");
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let sql = format!("SELECT {}1{} FROM t", "(".repeat(3000), ")".repeat(3000));
        let summary = summarize(&sql);
        assert_eq!(summary.operation.as_deref(), Some("SELECT"));
        let sql = format!("SELECT * FROM t WHERE {}", "NOT ".repeat(1000));
        assert_eq!(summarize(&sql).collection.as_deref(), Some("t"));
    }

    #[test]
    fn non_ascii_text() {
        let summary = summarize("SELECT «ключ» FROM таблица WHERE имя = 'Дмитрий' -- ✓");
        assert_eq!(summary.sanitized, "SELECT «ключ» FROM таблица WHERE имя = ?");
        assert_eq!(summary.collection.as_deref(), Some("таблица"));
        let lossy = String::from_utf8_lossy(b"SELECT \xff\xfe FROM t WHERE a = '\xc3");
        assert_eq!(summarize(&lossy).sanitized, "SELECT \u{fffd}\u{fffd} FROM t WHERE a = ?");
    }

    #[test]
    fn split_on_top_level_semicolons() {
        assert_eq!(split_statements("SELECT 1; SELECT 2;"), ["SELECT 1", "SELECT 2"]);
        assert_eq!(split_statements(" ; ;;\n"), Vec::<&str>::new());
        assert_eq!(split_statements(""), Vec::<&str>::new());
        assert_eq!(split_statements("SELECT ';'; SELECT \";\""), ["SELECT ';'", "SELECT \";\""]);
        assert_eq!(split_statements("SELECT $$a;b$$; SELECT $x$;$x$"), ["SELECT $$a;b$$", "SELECT $x$;$x$"]);
        assert_eq!(split_statements("SELECT 1 -- a; b\n; /* ; */ SELECT 2"), ["SELECT 1 -- a; b", "/* ; */ SELECT 2"]);
        assert_eq!(split_statements("SELECT 1; -- trailing comment"), ["SELECT 1"]);
        assert_eq!(split_statements("SELECT E'\\';'; SELECT 2"), ["SELECT E'\\';'", "SELECT 2"]);
        assert_eq!(
            split_statements("CREATE RULE r AS ON INSERT TO t DO (DELETE FROM a; DELETE FROM b); SELECT 1").len(),
            2
        );
        assert_eq!(split_statements("SELECT 'cut; here"), ["SELECT 'cut; here"]);
    }

    #[test]
    fn split_keeps_atomic_bodies_whole() {
        let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; \
                   SELECT 2; END; SELECT f(); BEGIN; COMMIT";
        let statements = split_statements(sql);
        assert_eq!(statements.len(), 4, "{statements:?}");
        assert!(statements[0].ends_with("SELECT 2; END"));
        assert_eq!(statements[1..], ["SELECT f()", "BEGIN", "COMMIT"]);
    }

    #[test]
    fn lexer_covers_the_text() {
        let sql = "SELECT a.b, 'x''y', E'\\\\', $1, $t$ $ $t$, \"q\"\"r\", 1e+5, x'0f' /* c */ -- d\n;";
        let rebuilt: String = Lexer::new(sql).map(|token| token.text).collect();
        assert_eq!(rebuilt, sql);
        let kinds: Vec<TokenKind> =
            Lexer::new(sql).filter(|token| token.kind != TokenKind::Space).map(|token| token.kind).collect();
        use TokenKind::*;
        assert_eq!(
            kinds,
            [
                Word, Word, Symbol, Word, Symbol, Literal, Symbol, Literal, Symbol, Parameter, Symbol, Literal, Symbol,
                QuotedName, Symbol, Literal, Symbol, Literal, Symbol
            ]
        );
    }

    /// Statement pieces; `{}` marks where a secret literal goes. No piece contains "zq" or "4242".
    const TEMPLATES: [&str; 12] = [
        "SELECT * FROM users WHERE email = {} AND id > {}",
        "INSERT INTO public.t (a, b) VALUES ({}, {}) RETURNING id",
        "UPDATE \"Acc\" SET v = {} WHERE k = {} -- note {}\n",
        "DELETE FROM q WHERE id IN ({}, {}, $1)",
        "WITH x AS (SELECT {} AS v) SELECT * FROM x /* {} */",
        "COPY t FROM STDIN; SELECT {}",
        "SELECT CASE WHEN a = {} THEN {} END FROM t1 JOIN t2 USING (id)",
        "CREATE TABLE z (d text DEFAULT {})",
        "select f({}, {})::text, ARRAY[{}]",
        "SELECT $x$ {} $x$; SET app.v = {}",
        "PREPARE p AS SELECT {} + $1; EXECUTE p({})",
        "SELECT * FROM ONLY t WHERE v ~ {} ORDER BY 1 LIMIT {}",
    ];

    fn secret_literal(rng: &mut XorShift) -> String {
        let n = rng.next() % 1000;
        match rng.below(9) {
            0 => format!("'zq{n} with ''quotes'''"),
            1 => format!("E'zq\\'{n}\\n'"),
            2 => format!("$$zq {n} ' \" $$"),
            3 => format!("$tag$zq{n}$tag$"),
            4 => format!("4242{n}"),
            5 => format!("4242.{n}e-4"),
            6 => format!("X'4242{n}'"),
            7 => format!("U&'zq{n}'"),
            _ => format!("'zq;{n}'"),
        }
    }

    fn secret_query(rng: &mut XorShift) -> String {
        let mut sql = String::new();
        for _ in 0..1 + rng.below(3) {
            let template = rng.pick(&TEMPLATES);
            let mut pieces = template.split("{}");
            sql.push_str(pieces.next().unwrap_or_default());
            for piece in pieces {
                sql.push_str(&secret_literal(rng));
                sql.push_str(piece);
            }
            sql.push_str(["; ", ";\n", " ;", ";"][rng.below(4)]);
        }
        sql
    }

    #[test]
    fn fuzz_truncated_queries_never_leak_literals() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..5_000 {
            let sql = secret_query(&mut rng);
            let cut = sql.floor_char_boundary(rng.below(sql.len() + 1));
            let sql = &sql[..cut];
            let summary = summarize(sql);
            assert_hidden(&summary.sanitized, &["zq", "4242"]);
            assert!(!summary.sanitized.contains("  "), "round {round}: {summary:?}");
            assert_eq!(summary.sanitized.trim(), summary.sanitized);
            for statement in split_statements(sql) {
                assert!(!statement.is_empty());
                assert_eq!(statement.trim(), statement);
            }
        }
    }

    #[test]
    fn fuzz_random_text_never_panics() {
        const FRAGMENTS: [&str; 24] = [
            "'",
            "\"",
            "$",
            "$$",
            "$a$",
            "--",
            "/*",
            "*/",
            "(",
            ")",
            ";",
            "E'",
            "U&'",
            "\\",
            ".",
            "1",
            "e+",
            "SELECT",
            "FROM",
            "WITH",
            "BEGIN ATOMIC",
            "END",
            " ",
            "é",
        ];
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        for _ in 0..5_000 {
            let sql: String = match rng.below(3) {
                0 => {
                    let bytes: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                1 => (0..rng.below(60)).map(|_| rng.pick(&FRAGMENTS)).collect(),
                _ => {
                    let mut sql = secret_query(&mut rng);
                    let at = sql.floor_char_boundary(rng.below(sql.len() + 1));
                    sql.insert_str(at, rng.pick(&FRAGMENTS));
                    sql
                }
            };
            let summary = summarize(&sql);
            assert!(summary.sanitized.len() <= sql.len());
            let rebuilt: String = Lexer::new(&sql).map(|token| token.text).collect();
            assert_eq!(rebuilt, sql);
            for statement in split_statements(&sql) {
                assert!(sql.contains(statement));
            }
        }
    }
}
