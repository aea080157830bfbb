//! PostgreSQL CLIENT spans from the wire protocol, against a real PostgreSQL 15 and its real
//! clients: psql (simple query protocol), psycopg 3 with server-side parameters and prepared
//! statements (extended protocol), pgbench in its three query modes, and an HTTP service whose
//! handler queries (SERVER -> CLIENT parentage).

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use zerotel_tests::{
    pid_args,
    postgres::{psycopg_python, Postgres},
    require_kernel, Agent, OtlpReceiver, Protocol, ReceivedSpan, SpanKind, SPAN_TIMEOUT,
};

/// A client started before the agent (so it is traced from its first byte): a shell that waits
/// for a line on stdin, then execs the command in the same process.
struct Launcher {
    child: std::process::Child,
}

impl Launcher {
    fn new(command: &Command) -> Launcher {
        let mut shell = Command::new("sh");
        shell.args(["-c", r#"read go && exec "$0" "$@""#]).arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => shell.env(key, value),
                None => shell.env_remove(key),
            };
        }
        shell.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Launcher { child: shell.spawn().expect("spawn the launcher shell") }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run the command to its end; its stdout (panics with stderr when it fails).
    fn run(self) -> String {
        let (success, stdout, stderr) = self.run_to_end();
        assert!(success, "client failed: {stdout}\n{stderr}");
        stdout
    }

    /// Run the command to its end: (exit success, stdout, stderr).
    fn run_to_end(self) -> (bool, String, String) {
        self.run_with_input("")
    }

    /// Run the command to its end with `input` on its stdin: (exit success, stdout, stderr).
    fn run_with_input(mut self, input: &str) -> (bool, String, String) {
        let mut stdin = self.child.stdin.take().expect("piped stdin");
        stdin.write_all(format!("go\n{input}").as_bytes()).expect("release the launcher");
        drop(stdin);
        let output = self.child.wait_with_output().expect("wait for the client");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status.success(), text(&output.stdout), text(&output.stderr))
    }
}

fn psycopg(script: &str, pg: &Postgres) -> Command {
    let mut command = Command::new(psycopg_python());
    command.args(["-c", script, &pg.conninfo()]);
    command
}

fn client_spans(receiver: &OtlpReceiver, pid: u32, name: &str, count: usize) -> Vec<ReceivedSpan> {
    let matching = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        spans.iter().filter(|s| s.kind == SpanKind::Client && s.pid() == Some(pid) && s.name == name).cloned().collect()
    };
    let spans = receiver.wait_for(|s| matching(s).len() >= count, SPAN_TIMEOUT);
    matching(&spans)
}

#[test]
fn psql_simple_queries_errors_and_sanitised_text() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    let sql = "CREATE TABLE users (id int, email text); \
               INSERT INTO users VALUES (7, 'ann@example.com'); \
               SELECT email FROM users WHERE id = 7; \
               SELECT 1 FROM missing_table; SELECT 2";
    let launcher = Launcher::new(&pg.psql_command(sql));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[launcher.pid()]), Some(&receiver));
    let pid = launcher.pid();
    let (_, output, errors) = launcher.run_to_end();
    assert!(output.contains("ann@example.com"), "{output}");
    assert!(errors.contains("missing_table"), "the failing statement failed: {errors}");

    let insert = &client_spans(&receiver, pid, "INSERT users", 1)[0];
    assert_eq!(insert.attr_str("db.system.name"), Some("postgresql"));
    assert_eq!(insert.attr_str("db.namespace"), Some("app"));
    assert_eq!(insert.attr_str("db.collection.name"), Some("users"));
    assert_eq!(insert.attr_int("db.response.returned_rows"), Some(1));
    assert_eq!(insert.attr_int("server.port"), Some(i64::from(pg.port())));
    let select = &client_spans(&receiver, pid, "SELECT users", 1)[0];
    let text = select.attr_str("db.query.text").expect("query text");
    assert!(text.contains("users") && !text.contains('7'), "literals must not leave the host: {text}");
    for span in receiver.spans() {
        let text = span.attr_str("db.query.text").unwrap_or_default();
        assert!(!text.contains("ann@example.com"), "a literal left the host: {text}");
    }
    let failed = &client_spans(&receiver, pid, "SELECT missing_table", 1)[0];
    assert_eq!(failed.attr_str("db.response.status_code"), Some("42P01"));
    assert!(failed.status_error, "status ERROR: {failed:?}");
    // psql sends the string as one Query: the backend stops at the error, "SELECT 2" never runs.
    assert!(client_spans(&receiver, pid, "SELECT", 0).is_empty());
    drop(agent);
}

#[test]
fn psycopg_extended_protocol_and_prepared_statements() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    assert!(pg.psql("CREATE TABLE users (id int, email text); INSERT INTO users SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 100) g").0);
    let script = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    for user_id in (3, 4, 5):
        conn.execute("SELECT email FROM users WHERE id = %s", (user_id,), prepare=True).fetchall()
    conn.execute("UPDATE users SET email = %s WHERE id > %s", ("x@example.com", 90))
    print("done")
"#;
    let launcher = Launcher::new(&psycopg(script, &pg));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[launcher.pid()]), Some(&receiver));
    let pid = launcher.pid();
    launcher.run();
    let selects = client_spans(&receiver, pid, "SELECT users", 3);
    assert_eq!(selects.len(), 3, "one span per execution of the prepared statement");
    for span in &selects {
        assert_eq!(span.attr_int("db.response.returned_rows"), Some(1));
        let text = span.attr_str("db.query.text").expect("text");
        assert!(text.contains("$1"), "server-side parameter: {text}");
    }
    let update = &client_spans(&receiver, pid, "UPDATE users", 1)[0];
    assert_eq!(update.attr_int("db.response.returned_rows"), Some(10));
    drop(agent);
}

#[test]
fn pgbench_every_query_mode_gives_one_span_per_transaction() {
    if !require_kernel() {
        return;
    }
    const TRANSACTIONS: usize = 200;
    let pg = Postgres::start();
    pg.pgbench_init();
    for mode in ["simple", "extended", "prepared"] {
        let launcher = Launcher::new(&pg.pgbench_command(mode, TRANSACTIONS as u32));
        let receiver = OtlpReceiver::start(Protocol::Grpc);
        let agent = Agent::start(&pid_args(&[launcher.pid()]), Some(&receiver));
        let pid = launcher.pid();
        let output = launcher.run();
        assert!(output.contains(&format!("processed: {TRANSACTIONS}/{TRANSACTIONS}")), "{output}");
        let spans = client_spans(&receiver, pid, "SELECT pgbench_accounts", TRANSACTIONS);
        std::thread::sleep(Duration::from_millis(300));
        let all = client_spans(&receiver, pid, "SELECT pgbench_accounts", TRANSACTIONS);
        assert_eq!((mode, spans.len().max(all.len())), (mode, TRANSACTIONS), "exactly one span per transaction");
        assert_eq!(agent.metric_sum("zerotel_events_lost_total"), 0);
        drop(agent);
    }
}

#[test]
fn an_http_handler_query_is_a_child_of_the_request() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    assert!(pg.psql("CREATE TABLE users (id int, email text); INSERT INTO users VALUES (1, 'a@example.com')").0);
    let server = r#"
import sys, psycopg
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        with psycopg.connect(sys.argv[1]) as conn:
            row = conn.execute("SELECT email FROM users WHERE id = %s", (1,)).fetchone()
        body = row[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
    let mut child = psycopg(server, &pg).stdout(Stdio::piped()).spawn().expect("start the HTTP service");
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut port)
        .expect("read the port");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[child.id()]), Some(&receiver));
    let response = zerotel_tests::curl(&format!("http://127.0.0.1:{}/users/1", port.trim()), &[]);
    assert_eq!(response.status, 200);
    let query = &client_spans(&receiver, child.id(), "SELECT users", 1)[0];
    let spans = receiver.wait_for(|s| s.iter().any(|x| x.is(SpanKind::Server, child.id(), "/users/1")), SPAN_TIMEOUT);
    let request = spans.iter().find(|x| x.is(SpanKind::Server, child.id(), "/users/1")).expect("server span");
    assert_eq!(query.trace_id, request.trace_id, "same trace");
    assert_eq!(query.parent_span_id, request.span_id, "the query is a child of the request");
    drop(agent);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_large_result_set_is_one_span_ending_at_its_last_byte() {
    if !require_kernel() {
        return;
    }
    const ROWS: i64 = 100_000;
    let pg = Postgres::start();
    let sql = format!("SELECT g, repeat('x', 100) FROM generate_series(1, {ROWS}) g");
    let launcher = Launcher::new(&pg.psql_command(&sql));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[launcher.pid()]), Some(&receiver));
    let pid = launcher.pid();
    let output = launcher.run();
    assert!(output.len() > 10_000_000, "a result of {} bytes", output.len());
    // generate_series is a function, not a collection: the span is named by the operation alone.
    let span = &client_spans(&receiver, pid, "SELECT", 1)[0];
    assert_eq!(span.attr_int("db.response.returned_rows"), Some(ROWS));
    assert_eq!(agent.metric_sum("zerotel_capture_failed_total"), 0, "no message boundary lost");
    assert!(span.end_unix_ns > span.start_unix_ns, "{span:?}");
    drop(agent);
}

#[test]
fn a_statement_prepared_before_the_agent_started_still_gets_spans() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    assert!(pg.psql("CREATE TABLE users (id int, email text); INSERT INTO users VALUES (1, 'a@example.com')").0);
    // Prepares (Parse) on its connection, waits for a line, then only Binds and Executes it.
    let script = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    conn.execute("SELECT email FROM users WHERE id = %s", (1,), prepare=True).fetchall()
    print("prepared", flush=True)
    sys.stdin.readline()
    for _ in range(3):
        conn.execute("SELECT email FROM users WHERE id = %s", (1,), prepare=True).fetchall()
    print("done", flush=True)
"#;
    let mut client = psycopg(script, &pg).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start the client");
    let mut stdout = std::io::BufReader::new(client.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("prepared");
    assert_eq!(line.trim(), "prepared");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[client.id()]), Some(&receiver));
    client.stdin.take().expect("stdin").write_all(b"go\n").expect("release the client");
    assert!(client.wait().expect("client exit").success());
    let spans = client_spans(&receiver, client.id(), "EXECUTE", 3);
    assert_eq!(spans.len(), 3, "one span per execution, named by what is known");
    for span in &spans {
        assert_eq!(span.attr_str("db.query.text"), None, "never a wrong text");
        assert_eq!(span.attr_int("db.response.returned_rows"), Some(1));
    }
    drop(agent);
}

#[test]
fn copy_in_and_out_are_one_span_each() {
    if !require_kernel() {
        return;
    }
    let pg = Postgres::start();
    assert!(pg.psql("CREATE TABLE items (id int, name text)").0);
    let rows: String = (1..=500).map(|i| format!("{i}\titem {i}\n")).collect();
    let copy_in = Launcher::new(&pg.psql_command("COPY items FROM STDIN"));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[copy_in.pid()]), Some(&receiver));
    let pid = copy_in.pid();
    let (ok, _, errors) = copy_in.run_with_input(&rows);
    assert!(ok, "{errors}");
    let span = &client_spans(&receiver, pid, "COPY items", 1)[0];
    assert_eq!(span.attr_int("db.response.returned_rows"), Some(500));
    drop(agent);

    let copy_out = Launcher::new(&pg.psql_command("COPY items TO STDOUT"));
    let agent = Agent::start(&pid_args(&[copy_out.pid()]), Some(&receiver));
    let pid = copy_out.pid();
    let output = copy_out.run();
    assert_eq!(output.lines().count(), 500);
    let span = &client_spans(&receiver, pid, "COPY items", 1)[0];
    assert_eq!(span.attr_int("db.response.returned_rows"), Some(500));
    drop(agent);
}
