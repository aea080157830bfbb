//! PostgreSQL frontend/backend protocol (version 3): the statements one connection executes.
//!
//! The kernel reports each message of a traced connection as a [`PgMessage`] with at most the first
//! bytes of its body; bulk messages (DataRow, CopyData) are only counted. [`PgConnection`] follows the
//! simple and extended query flows (<https://www.postgresql.org/docs/current/protocol-flow.html>) and
//! emits one [`Statement`] per executed statement: text, timing, command tag, rows, error.
//!
//! The backend answers requests in the order the frontend sent them, so a queue of what the frontend
//! asked pairs each answer with its request. Each Sync (or simple Query) closes a unit the backend ends
//! with ReadyForQuery; an error skips the rest of its unit, as the server does. When messages are
//! missing or garbled the decoder prefers giving no text to giving a wrong one.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::sql;

/// Remembered prepared statements, and portals, per connection; the oldest make room for new names.
const MAX_NAMES: usize = 1024;
/// Requests awaiting the backend's answer; the oldest are dropped beyond this.
const MAX_QUEUED: usize = 1024;
/// The length field counts its own four bytes.
const LENGTH_FIELD_BYTES: u32 = 4;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// StartupMessage codes carry the protocol version: major 3 in the high 16 bits.
const PROTOCOL_MAJOR: u32 = 3;
/// Command tags whose last word counts rows.
const COUNTED_COMMANDS: [&str; 8] = ["SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE"];

/// One PostgreSQL message as the kernel reports it.
#[derive(Debug, Clone, Copy)]
pub struct PgMessage<'a> {
    /// Sent by the client (Query, Parse, Bind, ...); false: by the server.
    pub frontend: bool,
    /// Message type byte; 0 for an untyped startup-phase message (StartupMessage, SSLRequest, ...).
    pub kind: u8,
    /// The message's length field: counts itself, not the type byte.
    pub len: u32,
    /// The first bytes of the body (after type and length), possibly fewer than the length says.
    pub body: &'a [u8],
    /// Bulk messages (DataRow, CopyData) in this direction just before this one. Rows come from the
    /// command tag instead, which counts them exactly; this count only cross-checks it in tests.
    pub bulk_before: u32,
    /// When the syscall carrying the message started.
    pub start_ns: u64,
    /// When that syscall returned.
    pub end_ns: u64,
}

/// A statement the server ran (or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The SQL as sent (possibly cut by capture); None when unknown, e.g. prepared before the agent started.
    pub text: Option<String>,
    pub start_ns: u64,
    /// end_ns of the message that completed the statement.
    pub end_ns: u64,
    /// From CommandComplete, e.g. "SELECT 5", "INSERT 0 1".
    pub command_tag: Option<String>,
    /// The tag's row count (SELECT, INSERT, UPDATE, DELETE, MERGE, COPY, FETCH, MOVE).
    pub rows: Option<u64>,
    pub error: Option<PgError>,
}

/// The fields of an ErrorResponse that describe the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// SQLSTATE code ('C'), e.g. "42P01"; empty when not captured.
    pub sqlstate: String,
    /// Primary message ('M'), possibly cut by capture.
    pub message: String,
}

/// Decodes the message stream of one PostgreSQL connection, both directions.
#[derive(Debug, Default)]
pub struct PgConnection {
    database: Option<String>,
    /// An SSLRequest or GSSENCRequest awaits the server's one-byte answer.
    encryption_requested: bool,
    encrypted: bool,
    /// Prepared statement name -> text.
    statements: Registry,
    /// Portal name -> text of the statement it was bound from.
    portals: Registry,
    /// What the frontend asked that the backend has not answered yet, oldest first.
    queue: VecDeque<Request>,
    /// Messages that are not PostgreSQL: an unknown type, or a body without its required field.
    malformed: u64,
}

/// Message types of protocol 3, by direction (0 is the untyped startup packet).
const FRONTEND_TYPES: &[u8] = b"\0QPBECSFDHdcfpX";
const BACKEND_TYPES: &[u8] = b"RKSZTDCEINn123stGHWdcAVv";

impl PgConnection {
    /// The database named in the StartupMessage ("database", else "user", as the server defaults it).
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// Messages seen so far that did not parse as PostgreSQL.
    pub fn malformed_messages(&self) -> u64 {
        self.malformed
    }

    /// True once the server accepted SSL or GSS encryption: nothing more can be read (the kernel
    /// stops reporting the connection then).
    #[cfg(test)]
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    /// Feed one message; statements it completes are appended to `out`.
    pub fn push(&mut self, message: &PgMessage<'_>, out: &mut Vec<Statement>) {
        if self.encrypted {
            return;
        }
        if std::mem::take(&mut self.encryption_requested)
            && !message.frontend
            && self.read_encryption_answer(message.kind)
        {
            return;
        }
        let known = if message.frontend { FRONTEND_TYPES } else { BACKEND_TYPES };
        if !known.contains(&message.kind) {
            self.malformed += 1;
            return;
        }
        let body = Body::of(message);
        // Type bytes mean different things per direction ('C' is Close or CommandComplete, ...).
        match (message.frontend, message.kind) {
            (true, 0) => self.read_startup(body),
            (true, b'Q') => self.read_query(body, message.start_ns),
            (true, b'P') => self.read_parse(body, message.start_ns),
            (true, b'B') => self.read_bind(body),
            (true, b'E') => self.read_execute(body, message.start_ns),
            (true, b'C') => self.read_close(body),
            // A FunctionCall, like Sync, is answered by ReadyForQuery.
            (true, b'S' | b'F') => self.enqueue(Request::Sync),
            (false, b'C') => self.complete(read_tag(body), None, message.end_ns, out),
            (false, b'I') => self.complete(None, None, message.end_ns, out),
            // A portal suspended after its row limit: no tag, the DataRows before it count.
            (false, b's') => self.complete(None, Some(u64::from(message.bulk_before)), message.end_ns, out),
            (false, b'E') => self.fail(read_error(body), message.end_ns, out),
            (false, b'1') => self.acknowledge_parse(),
            (false, b'Z') => self.end_unit(),
            // Describe, Flush, copy traffic, descriptions, notices, authentication, garbage.
            _ => {}
        }
    }

    /// The server's answer to an encryption request; returns whether `kind` was that answer.
    fn read_encryption_answer(&mut self, kind: u8) -> bool {
        match kind {
            b'S' | b'G' => self.encrypted = true,
            b'N' => {}
            _ => return false,
        }
        true
    }

    fn read_startup(&mut self, body: Body<'_>) {
        let Some(code) = body.bytes.first_chunk::<4>().map(|code| u32::from_be_bytes(*code)) else { return };
        match code {
            SSL_REQUEST | GSSENC_REQUEST => self.encryption_requested = true,
            code if code >> 16 == PROTOCOL_MAJOR => {
                let parameters = Body { bytes: body.bytes.get(4..).unwrap_or_default(), cut: body.cut };
                self.database = startup_database(parameters);
            }
            // CancelRequest and anything unknown.
            _ => {}
        }
    }

    fn read_query(&mut self, body: Body<'_>, start_ns: u64) {
        let query = match body.fields().string() {
            Some(Field::Whole(text)) => SimpleQuery::new(Some(&text_of(text)), false, start_ns),
            Some(Field::Cut(text)) => SimpleQuery::new(Some(&text_of(text)), true, start_ns),
            None => {
                self.malformed += 1;
                SimpleQuery::new(None, false, start_ns)
            }
        };
        self.enqueue(Request::Query(query));
    }

    fn read_parse(&mut self, body: Body<'_>, start_ns: u64) {
        let mut fields = body.fields();
        // A name cut by capture is long, so it cannot be the unnamed statement: nothing to update.
        let name = match fields.string() {
            Some(Field::Whole(name)) => name,
            Some(Field::Cut(_)) => return,
            None => {
                self.malformed += 1;
                return;
            }
        };
        let text: Option<Arc<str>> = fields.string().map(|query| text_of(query.bytes()).into());
        self.statements.insert(name, text.clone());
        self.enqueue(Request::Parse { name: name.into(), text, start_ns });
    }

    fn read_bind(&mut self, body: Body<'_>) {
        let mut fields = body.fields();
        let Some(Field::Whole(portal)) = fields.string() else { return };
        let text = match fields.string() {
            Some(Field::Whole(statement)) => self.statements.text(statement),
            _ => None,
        };
        self.portals.insert(portal, text);
    }

    fn read_execute(&mut self, body: Body<'_>, start_ns: u64) {
        let text = match body.fields().string() {
            Some(Field::Whole(portal)) => self.portals.text(portal),
            _ => None,
        };
        self.enqueue(Request::Execute { text, start_ns });
    }

    fn read_close(&mut self, body: Body<'_>) {
        let mut fields = body.fields();
        let target = fields.byte();
        let Some(Field::Whole(name)) = fields.string() else { return };
        match target {
            Some(b'S') => self.statements.remove(name),
            Some(b'P') => self.portals.remove(name),
            _ => {}
        }
    }

    fn enqueue(&mut self, request: Request) {
        if self.queue.len() >= MAX_QUEUED {
            self.queue.pop_front();
        }
        self.queue.push_back(request);
    }

    /// CommandComplete (with its tag), EmptyQueryResponse or PortalSuspended: a statement ended.
    fn complete(&mut self, tag: Option<String>, rows_seen: Option<u64>, end_ns: u64, out: &mut Vec<Statement>) {
        if let Some(answered) = self.answered_statement(end_ns) {
            let rows = tag.as_deref().and_then(rows_in_tag).or(rows_seen);
            out.push(answered.finish(end_ns, tag, rows, None));
        }
    }

    /// ErrorResponse: the statement being run failed (else the Parse being checked), and the
    /// backend skips the rest of the unit.
    fn fail(&mut self, error: PgError, end_ns: u64, out: &mut Vec<Statement>) {
        if let Some(failed) = self.answered_statement(end_ns).or_else(|| self.unacknowledged_parse()) {
            out.push(failed.finish(end_ns, None, None, Some(error)));
        }
        self.skip_unit();
    }

    /// The statement the backend's next completion or error belongs to: the first Execute of the
    /// current unit, else the simple Query that ends it.
    fn answered_statement(&mut self, end_ns: u64) -> Option<Answered> {
        let index =
            self.current_unit().position(|request| matches!(request, Request::Execute { .. } | Request::Query(_)))?;
        if let Some(Request::Query(query)) = self.queue.get_mut(index) {
            return query.answer(end_ns);
        }
        match self.queue.remove(index)? {
            Request::Execute { text, start_ns } => {
                Some(Answered { text: text.as_deref().map(str::to_owned), start_ns })
            }
            _ => None,
        }
    }

    /// The first Parse of the current unit the backend has not acknowledged: the one an error is about.
    fn unacknowledged_parse(&self) -> Option<Answered> {
        self.current_unit().find_map(|request| match request {
            Request::Parse { text, start_ns, .. } => {
                Some(Answered { text: text.as_deref().map(str::to_owned), start_ns: *start_ns })
            }
            _ => None,
        })
    }

    /// Requests up to and including the Sync or Query that ends the oldest unit.
    fn current_unit(&self) -> impl Iterator<Item = &Request> {
        let mut ended = false;
        self.queue.iter().take_while(move |request| {
            let inside = !ended;
            ended = matches!(request, Request::Sync | Request::Query(_));
            inside
        })
    }

    /// ParseComplete: the oldest Parse awaiting it succeeded.
    fn acknowledge_parse(&mut self) {
        let parse = self.current_unit().position(|request| matches!(request, Request::Parse { .. }));
        if let Some(index) = parse {
            self.queue.remove(index);
        }
    }

    /// After an error the backend ignores everything up to Sync: Executes there never run, and Parses
    /// there (failed or skipped) made no statement, so their names no longer give their text.
    fn skip_unit(&mut self) {
        while let Some(request) = self.queue.front_mut() {
            match request {
                Request::Sync => return,
                Request::Query(query) => return query.fail(),
                _ => {}
            }
            if let Some(Request::Parse { name, text: Some(text), .. }) = self.queue.pop_front() {
                self.statements.forget(&name, &text);
            }
        }
    }

    /// ReadyForQuery: the oldest unit is over; whatever is left of it will not be answered.
    fn end_unit(&mut self) {
        while let Some(request) = self.queue.pop_front() {
            if matches!(request, Request::Sync | Request::Query(_)) {
                return;
            }
        }
    }
}

/// A frontend request the backend has yet to answer.
#[derive(Debug)]
enum Request {
    /// Until ParseComplete: an error is about this Parse when no Execute is pending.
    Parse {
        name: Box<[u8]>,
        text: Option<Arc<str>>,
        start_ns: u64,
    },
    Execute {
        text: Option<Arc<str>>,
        start_ns: u64,
    },
    /// Ends a unit: answered by ReadyForQuery.
    Sync,
    /// A simple Query: a unit of its own, answered statement by statement, then ReadyForQuery.
    Query(SimpleQuery),
}

#[derive(Debug)]
struct SimpleQuery {
    /// Texts of the statements not answered yet, in order.
    statements: VecDeque<String>,
    /// Text for answers beyond the split statements: the whole query; None when cut by capture,
    /// since the statements past the cut were never seen.
    whole: Option<String>,
    /// The next statement starts when the previous one completed.
    next_start_ns: u64,
    /// An error ended the query: no more statements run.
    failed: bool,
}

impl SimpleQuery {
    fn new(text: Option<&str>, cut: bool, start_ns: u64) -> Self {
        let statements = text.map(|text| sql::split_statements(text).into_iter().map(str::to_owned).collect());
        Self {
            statements: statements.unwrap_or_default(),
            whole: text.filter(|_| !cut).map(str::to_owned),
            next_start_ns: start_ns,
            failed: false,
        }
    }

    fn answer(&mut self, end_ns: u64) -> Option<Answered> {
        if self.failed {
            return None;
        }
        let text = self.statements.pop_front().or_else(|| self.whole.clone());
        let start_ns = std::mem::replace(&mut self.next_start_ns, end_ns);
        Some(Answered { text, start_ns })
    }

    fn fail(&mut self) {
        self.failed = true;
    }
}

/// The statement an answer is about, before its outcome is known.
struct Answered {
    text: Option<String>,
    start_ns: u64,
}

impl Answered {
    fn finish(self, end_ns: u64, command_tag: Option<String>, rows: Option<u64>, error: Option<PgError>) -> Statement {
        // Clamp so an out-of-order timestamp never puts the end before the start.
        Statement {
            text: self.text,
            start_ns: self.start_ns,
            end_ns: end_ns.max(self.start_ns),
            command_tag,
            rows,
            error,
        }
    }
}

/// Name -> statement text (None: unknown), holding at most MAX_NAMES names.
#[derive(Debug, Default)]
struct Registry {
    entries: HashMap<Box<[u8]>, Entry>,
    next_age: u64,
}

#[derive(Debug)]
struct Entry {
    text: Option<Arc<str>>,
    /// Insertion order: the smallest goes first when the registry is full.
    age: u64,
}

impl Registry {
    fn insert(&mut self, name: &[u8], text: Option<Arc<str>>) {
        if self.entries.len() >= MAX_NAMES && !self.entries.contains_key(name) {
            self.evict_oldest();
        }
        let age = self.next_age;
        self.next_age += 1;
        self.entries.insert(name.into(), Entry { text, age });
    }

    /// The text of `name`; None when the name or its text is unknown.
    fn text(&self, name: &[u8]) -> Option<Arc<str>> {
        self.entries.get(name).and_then(|entry| entry.text.clone())
    }

    fn remove(&mut self, name: &[u8]) {
        self.entries.remove(name);
    }

    /// `name` no longer gives `text` (the Parse that set it failed); a later text for it stays.
    fn forget(&mut self, name: &[u8], text: &Arc<str>) {
        if let Some(entry) = self.entries.get_mut(name) {
            if entry.text.as_ref().is_some_and(|current| Arc::ptr_eq(current, text)) {
                entry.text = None;
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn evict_oldest(&mut self) {
        let oldest = self.entries.iter().min_by_key(|(_, entry)| entry.age).map(|(name, _)| name.clone());
        if let Some(oldest) = oldest {
            self.entries.remove(&oldest);
        }
    }
}

/// The captured part of a message's body, never past its declared length.
#[derive(Debug, Clone, Copy)]
struct Body<'a> {
    bytes: &'a [u8],
    /// Capture stopped before the body's end.
    cut: bool,
}

impl<'a> Body<'a> {
    fn of(message: &PgMessage<'a>) -> Self {
        let declared = usize::try_from(message.len.saturating_sub(LENGTH_FIELD_BYTES)).unwrap_or(usize::MAX);
        // Bytes past the declared length belong to the next message.
        let bytes = message.body.get(..declared).unwrap_or(message.body);
        Body { bytes, cut: bytes.len() < declared }
    }

    fn fields(self) -> Fields<'a> {
        Fields { rest: self.bytes, cut: self.cut }
    }
}

/// Reads a body's fields in order.
struct Fields<'a> {
    rest: &'a [u8],
    cut: bool,
}

/// A NUL-terminated string field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field<'a> {
    Whole(&'a [u8]),
    /// Capture stopped inside it: these are its first bytes, and no field follows.
    Cut(&'a [u8]),
}

impl<'a> Field<'a> {
    fn bytes(self) -> &'a [u8] {
        match self {
            Field::Whole(bytes) | Field::Cut(bytes) => bytes,
        }
    }
}

impl<'a> Fields<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&byte, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(byte)
    }

    /// The next string; None when nothing of it was captured, or when the body ends without its
    /// terminator although it was not cut (malformed).
    fn string(&mut self) -> Option<Field<'a>> {
        match self.rest.iter().position(|&byte| byte == 0) {
            Some(end) => {
                let field = self.rest.get(..end).unwrap_or_default();
                self.rest = self.rest.get(end + 1..).unwrap_or_default();
                Some(Field::Whole(field))
            }
            None if self.cut && !self.rest.is_empty() => Some(Field::Cut(std::mem::take(&mut self.rest))),
            None => None,
        }
    }
}

/// Lossy UTF-8, without the partial character a cut may leave at the end.
fn text_of(bytes: &[u8]) -> String {
    let complete = bytes.get(..bytes.len() - unfinished_char_len(bytes)).unwrap_or_default();
    String::from_utf8_lossy(complete).into_owned()
}

/// How many bytes at the end start a UTF-8 character that needs more bytes than are left.
fn unfinished_char_len(bytes: &[u8]) -> usize {
    // The last byte that is not a continuation byte (10xxxxxx) starts the last character.
    let tail = bytes.len().saturating_sub(4);
    let Some(lead) = bytes.get(tail..).unwrap_or_default().iter().rposition(|&byte| byte & 0xC0 != 0x80) else {
        return 0;
    };
    let available = bytes.len() - tail - lead;
    let needed = match bytes.get(tail + lead) {
        Some(0xC0..=0xDF) => 2,
        Some(0xE0..=0xEF) => 3,
        Some(0xF0..=0xF7) => 4,
        _ => 1,
    };
    if needed > available {
        available
    } else {
        0
    }
}

/// CommandComplete's tag.
fn read_tag(body: Body<'_>) -> Option<String> {
    body.fields().string().map(|tag| text_of(tag.bytes()))
}

/// StartupMessage parameters are key/value string pairs ended by an empty key.
fn startup_database(parameters: Body<'_>) -> Option<String> {
    let mut fields = parameters.fields();
    let (mut database, mut user) = (None, None);
    while let Some(Field::Whole(key)) = fields.string().filter(|key| !key.bytes().is_empty()) {
        // A value cut by capture would be a wrong name: leave it out.
        let Some(Field::Whole(value)) = fields.string() else { break };
        match key {
            b"database" => database = Some(text_of(value)),
            b"user" => user = Some(text_of(value)),
            _ => {}
        }
    }
    database.filter(|database| !database.is_empty()).or(user)
}

/// ErrorResponse fields: a type byte then a string, until a zero type byte.
fn read_error(body: Body<'_>) -> PgError {
    let mut fields = body.fields();
    let mut error = PgError { sqlstate: String::new(), message: String::new() };
    while let Some(kind) = fields.byte().filter(|&kind| kind != 0) {
        let Some(value) = fields.string() else { break };
        match kind {
            b'C' => error.sqlstate = text_of(value.bytes()),
            b'M' => error.message = text_of(value.bytes()),
            _ => {}
        }
    }
    error
}

/// "SELECT 5" -> 5, "INSERT 0 1" -> 1; None for tags that count nothing ("CREATE TABLE").
fn rows_in_tag(tag: &str) -> Option<u64> {
    let (command, rest) = tag.split_once(' ')?;
    if !COUNTED_COMMANDS.contains(&command) {
        return None;
    }
    rest.rsplit(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::test_rng::XorShift;
    use std::collections::HashSet;

    /// An owned message for tests; `feed` stamps its times from its position.
    #[derive(Debug, Clone)]
    struct Msg {
        frontend: bool,
        kind: u8,
        len: u32,
        body: Vec<u8>,
        bulk_before: u32,
    }

    impl Msg {
        fn new(frontend: bool, kind: u8, body: Vec<u8>) -> Self {
            let len = u32::try_from(body.len()).unwrap_or(u32::MAX).saturating_add(LENGTH_FIELD_BYTES);
            Msg { frontend, kind, len, body, bulk_before: 0 }
        }

        fn after_rows(mut self, rows: u32) -> Self {
            self.bulk_before = rows;
            self
        }

        /// Capture kept only the first `kept` body bytes.
        fn cut_to(mut self, kept: usize) -> Self {
            self.body.truncate(kept);
            self
        }

        fn as_message(&self, start_ns: u64) -> PgMessage<'_> {
            PgMessage {
                frontend: self.frontend,
                kind: self.kind,
                len: self.len,
                body: &self.body,
                bulk_before: self.bulk_before,
                start_ns,
                end_ns: start_ns + 1,
            }
        }
    }

    /// Message `index` of a feed starts at `start(index)` and ends 1 ns later.
    fn start(index: usize) -> u64 {
        index as u64 * 10
    }

    fn end(index: usize) -> u64 {
        start(index) + 1
    }

    fn feed(connection: &mut PgConnection, messages: &[Msg]) -> Vec<Statement> {
        let mut out = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            connection.push(&message.as_message(start(index)), &mut out);
        }
        out
    }

    fn cstr(text: &str) -> Vec<u8> {
        [text.as_bytes(), b"\0"].concat()
    }

    // Frontend messages.

    fn query(sql: &str) -> Msg {
        Msg::new(true, b'Q', cstr(sql))
    }

    fn parse(name: &str, sql: &str) -> Msg {
        Msg::new(true, b'P', [cstr(name), cstr(sql), vec![0, 0]].concat())
    }

    fn bind(portal: &str, statement: &str) -> Msg {
        Msg::new(true, b'B', [cstr(portal), cstr(statement), vec![0, 0, 0, 0, 0, 0]].concat())
    }

    fn describe_portal(portal: &str) -> Msg {
        Msg::new(true, b'D', [vec![b'P'], cstr(portal)].concat())
    }

    fn execute(portal: &str) -> Msg {
        Msg::new(true, b'E', [cstr(portal), vec![0, 0, 0, 0]].concat())
    }

    fn close_statement(name: &str) -> Msg {
        Msg::new(true, b'C', [vec![b'S'], cstr(name)].concat())
    }

    fn sync() -> Msg {
        Msg::new(true, b'S', Vec::new())
    }

    fn copy_done() -> Msg {
        Msg::new(true, b'c', Vec::new())
    }

    fn untyped(code: u32, rest: &[u8]) -> Msg {
        Msg::new(true, 0, [&code.to_be_bytes()[..], rest].concat())
    }

    fn startup(parameters: &[(&str, &str)]) -> Msg {
        let mut body: Vec<u8> = parameters.iter().flat_map(|(key, value)| [cstr(key), cstr(value)].concat()).collect();
        body.push(0);
        untyped(196_608, &body)
    }

    // Backend messages.

    fn complete(tag: &str) -> Msg {
        Msg::new(false, b'C', cstr(tag))
    }

    fn ready() -> Msg {
        Msg::new(false, b'Z', vec![b'I'])
    }

    fn back(kind: u8) -> Msg {
        Msg::new(false, kind, Vec::new())
    }

    fn error(sqlstate: &str, message: &str) -> Msg {
        let body = [b"SERROR\0VERROR\0C".to_vec(), cstr(sqlstate), b"M".to_vec(), cstr(message), vec![0]].concat();
        Msg::new(false, b'E', body)
    }

    /// The server's one-byte answer to SSLRequest/GSSENCRequest, as the kernel reports it.
    fn encryption_answer(kind: u8) -> Msg {
        Msg { len: 0, ..back(kind) }
    }

    fn done(text: Option<&str>, start_ns: u64, end_ns: u64, tag: Option<&str>, rows: Option<u64>) -> Statement {
        Statement {
            text: text.map(str::to_owned),
            start_ns,
            end_ns,
            command_tag: tag.map(str::to_owned),
            rows,
            error: None,
        }
    }

    fn failed(text: Option<&str>, start_ns: u64, end_ns: u64, sqlstate: &str) -> Statement {
        let message = "boom".to_owned();
        Statement {
            error: Some(PgError { sqlstate: sqlstate.to_owned(), message }),
            ..done(text, start_ns, end_ns, None, None)
        }
    }

    #[test]
    fn simple_query_with_two_statements() {
        let mut connection = PgConnection::default();
        let messages = [
            query("SELECT * FROM a; UPDATE b SET x = 1"),
            back(b'T'),
            complete("SELECT 3").after_rows(3),
            complete("UPDATE 2"),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert_eq!(
            out,
            [
                done(Some("SELECT * FROM a"), start(0), end(2), Some("SELECT 3"), Some(3)),
                done(Some("UPDATE b SET x = 1"), end(2), end(3), Some("UPDATE 2"), Some(2)),
            ]
        );
        assert_eq!(out[0].rows, Some(u64::from(messages[2].bulk_before)), "the tag agrees with the DataRows seen");
        assert!(connection.queue.is_empty());
    }

    #[test]
    fn failing_statement_ends_the_simple_query() {
        let mut connection = PgConnection::default();
        let messages = [
            query("SELECT 1; SELECT * FROM missing; SELECT 2"),
            back(b'T'),
            complete("SELECT 1").after_rows(1),
            error("42P01", "boom"),
            ready(),
            query("SELECT 2"),
            complete("SELECT 1").after_rows(1),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert_eq!(
            out,
            [
                done(Some("SELECT 1"), start(0), end(2), Some("SELECT 1"), Some(1)),
                failed(Some("SELECT * FROM missing"), end(2), end(3), "42P01"),
                done(Some("SELECT 2"), start(5), end(6), Some("SELECT 1"), Some(1)),
            ]
        );
    }

    #[test]
    fn malformed_messages_are_counted_and_skipped() {
        let mut connection = PgConnection::default();
        let garbage = [
            Msg::new(true, b'~', b"not postgres".to_vec()),
            Msg::new(false, b'q', Vec::new()),
            // A Query and a Parse whose text has no terminator.
            Msg::new(true, b'Q', b"SELECT".to_vec()),
            Msg::new(true, b'P', Vec::new()),
        ];
        feed(&mut connection, &garbage);
        assert_eq!(connection.malformed_messages(), 4);
        let out = feed(&mut connection, &[ready(), query("SELECT 1"), complete("SELECT 1"), ready()]);
        assert_eq!(out.len(), 1, "a good statement after garbage still counts: {out:?}");
        assert_eq!(connection.malformed_messages(), 4);
    }

    #[test]
    fn error_fields_are_read() {
        let mut connection = PgConnection::default();
        let out =
            feed(&mut connection, &[query("SELECT * FROM nope"), error("42P01", "relation \"nope\" does not exist")]);
        let read = out[0].error.as_ref().expect("an error");
        assert_eq!(read.sqlstate, "42P01");
        assert_eq!(read.message, "relation \"nope\" does not exist");
        // Cut inside the message: its first bytes are kept.
        let cut = error("23505", "duplicate key value violates unique constraint").cut_to(30);
        assert_eq!(
            read_error(Body::of(&cut.as_message(0))),
            PgError { sqlstate: "23505".into(), message: "duplicat".into() }
        );
        assert_eq!(
            read_error(Body { bytes: b"", cut: false }),
            PgError { sqlstate: String::new(), message: String::new() }
        );
    }

    #[test]
    fn extended_protocol_unnamed_statement() {
        let mut connection = PgConnection::default();
        let sql = "SELECT name FROM users WHERE id = $1";
        let messages = [
            parse("", sql),
            bind("", ""),
            describe_portal(""),
            execute(""),
            sync(),
            back(b'1'),
            back(b'2'),
            back(b'T'),
            complete("SELECT 1").after_rows(1),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert_eq!(out, [done(Some(sql), start(3), end(8), Some("SELECT 1"), Some(1))]);
        assert!(connection.queue.is_empty());
    }

    #[test]
    fn named_prepared_statement_executed_three_times() {
        let mut connection = PgConnection::default();
        let sql = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
        let prepare = [
            parse("P0_1", sql),
            Msg::new(true, b'D', cstr("SP0_1")),
            sync(),
            back(b'1'),
            back(b't'),
            back(b'n'),
            ready(),
        ];
        assert!(feed(&mut connection, &prepare).is_empty());
        for _ in 0..3 {
            let run = [bind("", "P0_1"), execute(""), sync(), back(b'2'), complete("UPDATE 1"), ready()];
            assert_eq!(feed(&mut connection, &run), [done(Some(sql), start(1), end(4), Some("UPDATE 1"), Some(1))]);
        }
        assert!(connection.queue.is_empty());
    }

    #[test]
    fn pipelined_executes_before_one_sync() {
        let mut connection = PgConnection::default();
        let messages = [
            parse("", "INSERT INTO t VALUES ($1)"),
            bind("", ""),
            execute(""),
            parse("", "SELECT * FROM t"),
            bind("", ""),
            execute(""),
            parse("s3", "DELETE FROM t"),
            bind("p3", "s3"),
            execute("p3"),
            sync(),
            back(b'1'),
            back(b'2'),
            complete("INSERT 0 1"),
            back(b'1'),
            back(b'2'),
            complete("SELECT 4").after_rows(4),
            back(b'1'),
            back(b'2'),
            complete("DELETE 4"),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert_eq!(
            out,
            [
                done(Some("INSERT INTO t VALUES ($1)"), start(2), end(12), Some("INSERT 0 1"), Some(1)),
                done(Some("SELECT * FROM t"), start(5), end(15), Some("SELECT 4"), Some(4)),
                done(Some("DELETE FROM t"), start(8), end(18), Some("DELETE 4"), Some(4)),
            ]
        );
    }

    #[test]
    fn pipelined_units_are_answered_in_order() {
        let mut connection = PgConnection::default();
        let messages = [
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            sync(),
            parse("", "SELECT 2"),
            bind("", ""),
            execute(""),
            sync(),
            back(b'1'),
            back(b'2'),
            complete("SELECT 1"),
            ready(),
            back(b'1'),
            back(b'2'),
            complete("SELECT 1"),
            ready(),
        ];
        let texts: Vec<_> = feed(&mut connection, &messages).into_iter().map(|statement| statement.text).collect();
        assert_eq!(texts, [Some("SELECT 1".to_owned()), Some("SELECT 2".to_owned())]);
    }

    #[test]
    fn error_skips_the_rest_of_its_unit_only() {
        let mut connection = PgConnection::default();
        let messages = [
            parse("", "SELECT 1/0"),
            bind("", ""),
            execute(""),
            parse("", "SELECT 'skipped'"),
            bind("", ""),
            execute(""),
            sync(),
            parse("", "SELECT 3"),
            bind("", ""),
            execute(""),
            sync(),
            back(b'1'),
            back(b'2'),
            error("22012", "boom"),
            ready(),
            back(b'1'),
            back(b'2'),
            complete("SELECT 1"),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert_eq!(
            out,
            [
                failed(Some("SELECT 1/0"), start(2), end(13), "22012"),
                done(Some("SELECT 3"), start(9), end(17), Some("SELECT 1"), Some(1))
            ]
        );
        assert!(connection.queue.is_empty());
    }

    #[test]
    fn parse_error_without_execute_names_the_parse() {
        let mut connection = PgConnection::default();
        let messages = [parse("s1", "SELEC 1"), sync(), error("42601", "boom"), ready()];
        let out = feed(&mut connection, &messages);
        assert_eq!(out, [failed(Some("SELEC 1"), start(0), end(2), "42601")]);
        // The statement does not exist on the server: a later use of its name has no text.
        let messages = [bind("", "s1"), execute(""), sync(), error("26000", "boom"), ready()];
        assert_eq!(feed(&mut connection, &messages), [failed(None, start(1), end(3), "26000")]);
    }

    #[test]
    fn parse_error_with_execute_blames_the_execute() {
        let mut connection = PgConnection::default();
        let messages = [parse("", "SELEC 1"), bind("", ""), execute(""), sync(), error("42601", "boom"), ready()];
        assert_eq!(feed(&mut connection, &messages), [failed(Some("SELEC 1"), start(2), end(4), "42601")]);
    }

    #[test]
    fn failed_reparse_of_a_name_forgets_its_text() {
        let mut connection = PgConnection::default();
        feed(&mut connection, &[parse("s", "SELECT 1"), sync(), back(b'1'), ready()]);
        // The server refuses a second Parse of the same name and keeps the first text.
        let messages = [parse("s", "SELECT 2"), sync(), error("42P05", "boom"), ready()];
        assert_eq!(feed(&mut connection, &messages), [failed(Some("SELECT 2"), start(0), end(2), "42P05")]);
        let messages = [bind("", "s"), execute(""), sync(), back(b'2'), complete("SELECT 1"), ready()];
        assert_eq!(feed(&mut connection, &messages), [done(None, start(1), end(4), Some("SELECT 1"), Some(1))]);
    }

    #[test]
    fn bind_of_an_unknown_statement_has_no_text() {
        let mut connection = PgConnection::default();
        let messages = [bind("", "S_7"), execute(""), sync(), back(b'2'), complete("SELECT 2").after_rows(2), ready()];
        assert_eq!(feed(&mut connection, &messages), [done(None, start(1), end(4), Some("SELECT 2"), Some(2))]);
    }

    #[test]
    fn rebinding_a_portal_to_an_unknown_statement_drops_the_old_text() {
        let mut connection = PgConnection::default();
        feed(&mut connection, &[parse("a", "SELECT 1"), bind("p", "a"), sync(), back(b'1'), back(b'2'), ready()]);
        let messages = [bind("p", "unknown"), execute("p"), sync(), back(b'2'), complete("SELECT 1"), ready()];
        assert_eq!(feed(&mut connection, &messages)[0].text, None);
    }

    #[test]
    fn closed_statement_has_no_text() {
        let mut connection = PgConnection::default();
        feed(&mut connection, &[parse("s1", "SELECT 1"), sync(), back(b'1'), ready()]);
        feed(&mut connection, &[close_statement("s1"), sync(), back(b'3'), ready()]);
        let messages = [bind("", "s1"), execute(""), sync(), back(b'2'), complete("SELECT 1"), ready()];
        assert_eq!(feed(&mut connection, &messages)[0].text, None);
    }

    #[test]
    fn portal_suspended_completes_without_tag() {
        let mut connection = PgConnection::default();
        let messages = [
            parse("", "SELECT * FROM big"),
            bind("c", ""),
            execute("c"),
            execute("c"),
            sync(),
            back(b'1'),
            back(b'2'),
            back(b's').after_rows(100),
            complete("SELECT 42").after_rows(42),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert_eq!(
            out,
            [
                done(Some("SELECT * FROM big"), start(2), end(7), None, Some(100)),
                done(Some("SELECT * FROM big"), start(3), end(8), Some("SELECT 42"), Some(42)),
            ]
        );
    }

    #[test]
    fn copy_in() {
        let mut connection = PgConnection::default();
        let messages =
            [query("COPY items FROM STDIN"), back(b'G'), copy_done().after_rows(1000), complete("COPY 1000"), ready()];
        let out = feed(&mut connection, &messages);
        assert_eq!(out, [done(Some("COPY items FROM STDIN"), start(0), end(3), Some("COPY 1000"), Some(1000))]);
    }

    #[test]
    fn copy_out() {
        let mut connection = PgConnection::default();
        let messages = [
            query("COPY items TO STDOUT"),
            back(b'H'),
            Msg::new(false, b'c', Vec::new()).after_rows(5),
            complete("COPY 5"),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert_eq!(out, [done(Some("COPY items TO STDOUT"), start(0), end(3), Some("COPY 5"), Some(5))]);
    }

    #[test]
    fn copy_fail_reports_the_error() {
        let mut connection = PgConnection::default();
        let messages = [
            query("COPY t FROM STDIN"),
            back(b'G'),
            Msg::new(true, b'f', cstr("aborted")),
            error("57014", "boom"),
            ready(),
        ];
        assert_eq!(feed(&mut connection, &messages), [failed(Some("COPY t FROM STDIN"), start(0), end(3), "57014")]);
    }

    #[test]
    fn ssl_refused_then_startup() {
        let mut connection = PgConnection::default();
        let messages = [
            untyped(SSL_REQUEST, b""),
            encryption_answer(b'N'),
            startup(&[("user", "bob"), ("database", "app"), ("application_name", "psql")]),
            Msg::new(false, b'R', vec![0, 0, 0, 0]),
            Msg::new(false, b'S', [cstr("server_version"), cstr("17.2")].concat()),
            ready(),
            query("SELECT 1"),
            complete("SELECT 1"),
            ready(),
        ];
        let out = feed(&mut connection, &messages);
        assert!(!connection.is_encrypted());
        assert_eq!(connection.database(), Some("app"));
        assert_eq!(out, [done(Some("SELECT 1"), start(6), end(7), Some("SELECT 1"), Some(1))]);
    }

    #[test]
    fn database_defaults_to_user() {
        let mut connection = PgConnection::default();
        feed(&mut connection, &[startup(&[("user", "bob")])]);
        assert_eq!(connection.database(), Some("bob"));
        let mut connection = PgConnection::default();
        feed(&mut connection, &[startup(&[("database", ""), ("user", "ann")])]);
        assert_eq!(connection.database(), Some("ann"));
        // Cut inside the database name: better none than a wrong one.
        let mut connection = PgConnection::default();
        let cut = startup(&[("user", "bob"), ("database", "inventory")]);
        let kept = cut.body.len() - 5;
        feed(&mut connection, &[cut.cut_to(kept)]);
        assert_eq!(connection.database(), Some("bob"));
    }

    #[test]
    fn ssl_accepted_means_encrypted() {
        for (request, answer) in [(SSL_REQUEST, b'S'), (GSSENC_REQUEST, b'G')] {
            let mut connection = PgConnection::default();
            let messages =
                [untyped(request, b""), encryption_answer(answer), query("SELECT 1"), complete("SELECT 1"), ready()];
            assert!(feed(&mut connection, &messages).is_empty());
            assert!(connection.is_encrypted());
            assert!(connection.queue.is_empty());
        }
    }

    #[test]
    fn cancel_request_and_notices_change_nothing() {
        let mut connection = PgConnection::default();
        let messages = [untyped(80_877_102, &[0, 0, 0, 1, 0, 0, 0, 2]), Msg::new(false, b'N', b"SNOTICE\0\0".to_vec())];
        assert!(feed(&mut connection, &messages).is_empty());
        assert!(!connection.is_encrypted());
        assert!(connection.queue.is_empty());
    }

    #[test]
    fn empty_query_response() {
        let mut connection = PgConnection::default();
        let out = feed(&mut connection, &[query(""), back(b'I'), ready(), query("  ;  "), back(b'I'), ready()]);
        assert_eq!(
            out,
            [done(Some(""), start(0), end(1), None, None), done(Some("  ;  "), start(3), end(4), None, None)]
        );
    }

    #[test]
    fn extra_answers_get_the_whole_text() {
        let mut connection = PgConnection::default();
        let out = feed(&mut connection, &[query("SELECT 1"), complete("SELECT 1"), complete("SELECT 1"), ready()]);
        assert_eq!(out[1].text.as_deref(), Some("SELECT 1"));
        // When the query was cut the statements past the cut were never seen: no text.
        let cut = query("SELECT 1; SELECT 'long enough to be cut'").cut_to(14);
        let out = feed(&mut connection, &[cut, complete("SELECT 1"), complete("SELECT 1"), ready()]);
        let texts: Vec<_> = out.into_iter().map(|statement| statement.text).collect();
        assert_eq!(texts, [Some("SELECT 1".to_owned()), Some("SELE".to_owned())]);
    }

    #[test]
    fn truncated_parse_keeps_the_captured_prefix() {
        let mut connection = PgConnection::default();
        let long = format!("SELECT {} FROM t", "x, ".repeat(300));
        let messages = [parse("", &long).cut_to(512), bind("", ""), execute(""), sync(), complete("SELECT 0"), ready()];
        let text = feed(&mut connection, &messages).remove(0).text.expect("a text");
        assert_eq!(text.len(), 511);
        assert!(long.starts_with(&text));
    }

    #[test]
    fn parse_cut_before_its_query_has_no_text() {
        let mut connection = PgConnection::default();
        let messages =
            [parse("s", "SELECT 1").cut_to(2), bind("", "s"), execute(""), sync(), complete("SELECT 1"), ready()];
        assert_eq!(feed(&mut connection, &messages)[0].text, None);
    }

    #[test]
    fn cut_inside_a_character_drops_it() {
        assert_eq!(text_of("é".as_bytes().get(..1).unwrap_or_default()), "");
        assert_eq!(text_of(b"ab\xc3"), "ab");
        assert_eq!(text_of(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(text_of(b"\xff\xf0\x9f\x98"), "\u{fffd}");
        assert_eq!(text_of("✓".as_bytes()), "✓");
        assert_eq!(text_of(b"\x80\x80\x80\x80\x80"), "\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}");
    }

    #[test]
    fn body_past_the_declared_length_is_ignored() {
        let mut connection = PgConnection::default();
        // The declared length ends the body before the query's terminator: malformed, so no text.
        let short = Msg { len: 4 + 6, ..query("SELECT 1") };
        let out = feed(&mut connection, &[short, complete("SELECT 1"), ready()]);
        assert_eq!(out[0].text, None);
        let tiny = Msg { len: 2, ..parse("x", "SELECT 1") };
        feed(&mut connection, &[tiny]);
        assert_eq!(connection.statements.len(), 0);
    }

    #[test]
    fn answers_with_nothing_queued_are_ignored() {
        let mut connection = PgConnection::default();
        let messages =
            [complete("SELECT 1"), back(b'I'), back(b's'), error("XX000", "boom"), back(b'1'), ready(), ready()];
        assert!(feed(&mut connection, &messages).is_empty());
        assert!(connection.queue.is_empty());
    }

    #[test]
    fn rows_from_command_tags() {
        for (tag, rows) in [
            ("SELECT 5", Some(5)),
            ("INSERT 0 1", Some(1)),
            ("UPDATE 10", Some(10)),
            ("DELETE 0", Some(0)),
            ("MERGE 3", Some(3)),
            ("COPY 1000", Some(1000)),
            ("FETCH 7", Some(7)),
            ("MOVE 2", Some(2)),
            ("CREATE TABLE", None),
            ("BEGIN", None),
            ("SELECT", None),
            ("SELECT x", None),
            ("", None),
            ("SELECT 99999999999999999999999", None),
        ] {
            assert_eq!(rows_in_tag(tag), rows, "{tag}");
        }
    }

    #[test]
    fn names_and_queue_are_bounded() {
        let mut connection = PgConnection::default();
        let mut out = Vec::new();
        for index in 0..MAX_NAMES + 10 {
            let name = format!("s{index}");
            for message in [parse(&name, "SELECT 1"), bind(&name, &name), execute(&name)] {
                connection.push(&message.as_message(0), &mut out);
            }
        }
        assert_eq!(connection.statements.len(), MAX_NAMES);
        assert_eq!(connection.portals.len(), MAX_NAMES);
        assert!(connection.queue.len() <= MAX_QUEUED);
        assert_eq!(connection.statements.text(b"s0"), None, "the oldest name made room");
        assert!(connection.statements.text(format!("s{}", MAX_NAMES + 9).as_bytes()).is_some());
        // Replacing a known name evicts nothing.
        connection.push(&parse("s20", "SELECT 2").as_message(0), &mut out);
        assert_eq!(connection.statements.len(), MAX_NAMES);
        assert!(connection.statements.text(b"s20").is_some());
        assert!(out.is_empty());
    }


    /// One statement of a simulated conversation and how the server treats it.
    struct Planned {
        text: String,
        /// Reuses a statement prepared earlier (extended only): Bind + Execute.
        prepared: Option<String>,
        fails: bool,
        rows: u64,
    }

    /// Frontend messages of one unit and the backend's answers, with the statements expected.
    struct Unit {
        front: Vec<Msg>,
        back: Vec<Msg>,
        expected: Vec<Expected>,
    }

    /// A statement expected from a unit; its times come from the positions of its messages.
    struct Expected {
        text: String,
        /// Index in `front` of the Execute starting it; None in a simple Query, where a statement
        /// starts when the previous one ended (the first when the Query was sent).
        started_by: Option<usize>,
        /// Index in `back` of the answer ending it.
        ended_by: usize,
        /// None when it fails.
        tag: Option<String>,
    }

    fn simulate_unit(rng: &mut XorShift, prepared: &mut Vec<(String, String)>, next_name: &mut usize) -> Unit {
        let simple = rng.chance(40);
        let count = 1 + rng.below(3);
        let fail_at = if rng.chance(30) { Some(rng.below(count)) } else { None };
        let plans: Vec<Planned> = (0..count)
            .map(|index| {
                let rows = rng.next() % 50;
                let reuse = !simple && !prepared.is_empty() && rng.chance(40);
                let (text, prepared_name) = if reuse {
                    let (name, text) = prepared[rng.below(prepared.len())].clone();
                    (text, Some(name))
                } else {
                    (format!("SELECT {rows} FROM t{}", rng.below(1000)), None)
                };
                Planned { text, prepared: prepared_name, fails: fail_at == Some(index), rows }
            })
            .collect();
        let mut unit = Unit { front: Vec::new(), back: Vec::new(), expected: Vec::new() };
        if simple {
            let sql: Vec<&str> = plans.iter().map(|plan| plan.text.as_str()).collect();
            unit.front.push(query(&sql.join("; ")));
        }
        for plan in &plans {
            if simple {
                if plan.fails {
                    unit.back.push(error("42000", "boom"));
                    let ended_by = unit.back.len() - 1;
                    unit.expected.push(Expected { text: plan.text.clone(), started_by: None, ended_by, tag: None });
                    break;
                }
                let tag = format!("SELECT {}", plan.rows);
                unit.back.push(complete(&tag).after_rows(plan.rows as u32));
                let ended_by = unit.back.len() - 1;
                unit.expected.push(Expected { text: plan.text.clone(), started_by: None, ended_by, tag: Some(tag) });
                continue;
            }
            // Extended: a new named statement sometimes, else the unnamed one.
            let name = match &plan.prepared {
                Some(name) => name.clone(),
                None if rng.chance(30) => {
                    *next_name += 1;
                    format!("stmt{next_name}")
                }
                None => String::new(),
            };
            if plan.prepared.is_none() {
                unit.front.push(parse(&name, &plan.text));
            }
            unit.front.push(bind("", &name));
            unit.front.push(execute(""));
            let execute_index = unit.front.len() - 1;
            // Everything after a failure in the unit is skipped by the server, so only the parts up
            // to it get answers.
            let fails = plan.fails;
            if plan.prepared.is_none() {
                unit.back.push(back(b'1'));
                if !name.is_empty() {
                    prepared.push((name.clone(), plan.text.clone()));
                }
            }
            unit.back.push(back(b'2'));
            if fails {
                unit.back.push(error("42000", "boom"));
                let ended_by = unit.back.len() - 1;
                unit.expected.push(Expected {
                    text: plan.text.clone(),
                    started_by: Some(execute_index),
                    ended_by,
                    tag: None,
                });
                // Later frontend messages of this unit still go out; the server ignores them.
                for later in plans.iter().skip_while(|later| !later.fails).skip(1) {
                    if later.prepared.is_none() {
                        unit.front.push(parse("", &later.text));
                    }
                    unit.front.push(bind("", later.prepared.as_deref().unwrap_or("")));
                    unit.front.push(execute(""));
                }
                break;
            }
            let tag = format!("SELECT {}", plan.rows);
            unit.back.push(complete(&tag).after_rows(plan.rows as u32));
            let ended_by = unit.back.len() - 1;
            unit.expected.push(Expected {
                text: plan.text.clone(),
                started_by: Some(execute_index),
                ended_by,
                tag: Some(tag),
            });
        }
        if !simple {
            unit.front.push(sync());
        }
        unit.back.push(ready());
        unit
    }

    #[test]
    fn random_valid_conversations_decode_exactly() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut connection = PgConnection::default();
        let mut prepared = Vec::new();
        let mut next_name = 0;
        let mut now = 0u64;
        for round in 0..2_000 {
            // Several units pipelined: all their frontend messages go out before any answer.
            let units: Vec<Unit> =
                (0..1 + rng.below(3)).map(|_| simulate_unit(&mut rng, &mut prepared, &mut next_name)).collect();
            let mut out = Vec::new();
            let mut front_times = Vec::new();
            for unit in &units {
                let mut times = Vec::new();
                for message in &unit.front {
                    now += 10;
                    times.push(now);
                    connection.push(&message.as_message(now), &mut out);
                }
                front_times.push(times);
            }
            let mut expected = Vec::new();
            for (unit, times) in units.iter().zip(&front_times) {
                let mut back_times = Vec::new();
                for message in &unit.back {
                    now += 10;
                    back_times.push(now + 1);
                    connection.push(&message.as_message(now), &mut out);
                }
                let mut previous_end = times[0];
                for statement in &unit.expected {
                    let start_ns = statement.started_by.map_or(previous_end, |index| times[index]);
                    let end_ns = back_times[statement.ended_by];
                    previous_end = end_ns;
                    let tag = statement.tag.clone();
                    let rows = tag.as_deref().and_then(rows_in_tag);
                    let error = tag.is_none().then(|| PgError { sqlstate: "42000".into(), message: "boom".into() });
                    let text = Some(statement.text.clone());
                    expected.push(Statement { text, start_ns, end_ns, command_tag: tag, rows, error });
                }
            }
            assert_eq!(out, expected, "round {round}");
            assert!(connection.queue.is_empty(), "round {round}: {:?}", connection.queue);
        }
    }

    const TEXTS: [&str; 4] = ["SELECT 1", "UPDATE t SET a = $1; SELECT 2", "", "COPY t FROM STDIN"];
    const NAMES: [&str; 3] = ["", "s1", "portal"];

    fn random_message(rng: &mut XorShift) -> Msg {
        let text = TEXTS[rng.below(TEXTS.len())];
        let name = NAMES[rng.below(NAMES.len())];
        let mut message = match rng.below(22) {
            0 => query(text),
            1 => parse(name, text),
            2 => bind(NAMES[rng.below(NAMES.len())], name),
            3 => execute(name),
            4 => sync(),
            5 => close_statement(name),
            6 => describe_portal(name),
            7 => complete(["SELECT 3", "INSERT 0 1", "COPY 9", "BEGIN"][rng.below(4)]).after_rows(rng.below(5) as u32),
            8 => ready(),
            9 => error("42P01", "boom"),
            10 => back([b'1', b'2', b'3', b'I', b's', b'n', b'T', b't', b'G', b'H'][rng.below(10)]),
            11 => {
                untyped([SSL_REQUEST, GSSENC_REQUEST, 196_608, 80_877_102][rng.below(4)], b"user\0u\0database\0d\0\0")
            }
            12 => encryption_answer([b'N', b'S', b'G', b'E'][rng.below(4)]),
            13 => startup(&[("user", name), ("database", text)]),
            _ => {
                let body = (0..rng.below(40)).map(|_| rng.next() as u8).collect();
                Msg::new(rng.chance(50), rng.next() as u8, body)
            }
        };
        if rng.chance(10) {
            message.frontend = !message.frontend;
        }
        if rng.chance(15) {
            let kept = rng.below(message.body.len() + 1);
            message.body.truncate(kept);
        }
        if rng.chance(10) {
            message.len = rng.next() as u32 % 64;
        }
        message
    }

    #[test]
    fn fuzz_random_messages_never_panic_and_stay_bounded() {
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        let mut connection = PgConnection::default();
        let mut bodies: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        for round in 0..50_000u64 {
            if rng.chance(1) {
                connection = PgConnection::default();
            }
            let message = random_message(&mut rng);
            // Only Query and Parse carry statement text.
            if message.frontend && matches!(message.kind, b'Q' | b'P') {
                bodies.insert(String::from_utf8_lossy(&message.body).into_owned());
            }
            let start_ns = if rng.chance(5) { rng.next() } else { round * 10 };
            out.clear();
            connection.push(&message.as_message(start_ns), &mut out);
            for statement in &out {
                assert!(statement.end_ns >= statement.start_ns);
                if let Some(text) = &statement.text {
                    assert!(bodies.iter().any(|body| body.contains(text.as_str())), "invented text {text:?}");
                }
            }
            assert!(connection.statements.len() <= MAX_NAMES);
            assert!(connection.portals.len() <= MAX_NAMES);
            assert!(connection.queue.len() <= MAX_QUEUED);
        }
    }

    #[test]
    fn fuzz_long_pipelines_stay_bounded() {
        let mut rng = XorShift(0x0123_4567_89AB_CDEF);
        let mut connection = PgConnection::default();
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let message = match rng.below(4) {
                0 => parse(&format!("n{}", rng.next() % 5000), "SELECT 1"),
                1 => bind(&format!("p{}", rng.next() % 5000), &format!("n{}", rng.next() % 5000)),
                2 => execute(&format!("p{}", rng.next() % 5000)),
                _ => query("SELECT 1; SELECT 2"),
            };
            connection.push(&message.as_message(0), &mut out);
        }
        assert!(connection.statements.len() <= MAX_NAMES);
        assert!(connection.portals.len() <= MAX_NAMES);
        assert_eq!(connection.queue.len(), MAX_QUEUED);
        assert!(out.is_empty());
    }
}
