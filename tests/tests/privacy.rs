//! Privacy: secrets that traced processes exchange never leave the agent. A traced curl sends
//! secrets in an Authorization header, a Cookie, a custom header, query strings and a form body
//! to a traced Python server, which passes one on in the query of its own outgoing call; psql
//! and psycopg send secrets as SQL literals and as bound parameters to PostgreSQL. Every byte the
//! agent exported (each OTLP request body, as received), printed (`--print`, its logs) and
//! served (`/metrics`) is searched for each secret, while the spans themselves must arrive.
//!
//! Also: without `--listen`, the agent serves /metrics and /healthz on 127.0.0.1:9464 only.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use zerotel_tests::agent::agent_binary;
use zerotel_tests::clients::PausedClient;
use zerotel_tests::footprint::listening_addresses;
use zerotel_tests::postgres::{psycopg_python, Postgres};
use zerotel_tests::process::{spawn, terminate, ChildGuard};
use zerotel_tests::raw_otlp::RawOtlpReceiver;
use zerotel_tests::util::{http_get, poll_until, port_is_open};
use zerotel_tests::{
    paused_client, pid_args, propagating_pid_args, require_kernel, Agent, PyServer, ReceivedSpan,
    SpanKind, SPAN_TIMEOUT,
};

/// Where the agent serves its telemetry when not told otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// One planted secret: where it travelled, and its value (unique per run, so any sighting is a leak).
struct Secret {
    place: &'static str,
    value: String,
}

fn secret(place: &'static str) -> Secret {
    Secret {
        place,
        value: format!("zts{:016x}", rand::random::<u64>()),
    }
}

/// A secret made of digits only, as a card or account number in SQL would be.
fn numeric_secret(place: &'static str) -> Secret {
    Secret {
        place,
        value: format!("9{:014}", rand::random::<u64>() % 100_000_000_000_000),
    }
}

struct Secrets {
    authorization: Secret,
    cookie: Secret,
    api_key: Secret,
    query: Secret,
    post_query: Secret,
    body: Secret,
    outgoing_query: Secret,
    sql_text: Secret,
    sql_number: Secret,
    bound: Secret,
}

impl Secrets {
    fn new() -> Secrets {
        Secrets {
            authorization: secret("Authorization header"),
            cookie: secret("Cookie header"),
            api_key: secret("custom header"),
            query: secret("GET query string"),
            post_query: secret("POST query string"),
            body: secret("POST body"),
            outgoing_query: secret("query string of the server's own call"),
            sql_text: secret("SQL string literal"),
            sql_number: numeric_secret("SQL numeric literal"),
            bound: secret("bound SQL parameter"),
        }
    }

    fn all(&self) -> [&Secret; 10] {
        [
            &self.authorization,
            &self.cookie,
            &self.api_key,
            &self.query,
            &self.post_query,
            &self.body,
            &self.outgoing_query,
            &self.sql_text,
            &self.sql_number,
            &self.bound,
        ]
    }
}

/// curl: a GET with secret headers and query, then (`--next`) a POST with a secret body and
/// query, then a GET that makes the server call out with a secret in that call's query.
fn paused_curl(server: &PyServer, secrets: &Secrets) -> PausedClient {
    let auth = format!("Authorization: Bearer {}", secrets.authorization.value);
    let cookie = format!("Cookie: session={}", secrets.cookie.value);
    let api_key = format!("X-Api-Key: {}", secrets.api_key.value);
    let get = server.url(&format!("/users/42?token={}", secrets.query.value));
    let post = server.url(&format!("/login?api_key={}", secrets.post_query.value));
    let body = format!("user=ann&password={}", secrets.body.value);
    let outgoing = server.url(&format!("/users/7?sig={}", secrets.outgoing_query.value));
    let chain = server.url(&format!(
        "/chain?to={}",
        outgoing.replace('?', "%3F").replace('=', "%3D")
    ));
    let mut args: Vec<String> = [
        "curl",
        "-sS",
        "--fail",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["-H", &auth, "-H", &cookie, "-H", &api_key, &get].map(String::from));
    args.extend(
        [
            "--next",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-H",
            &auth,
            "--data",
            &body,
            &post,
        ]
        .map(String::from),
    );
    args.extend(["--next", "-sS", "--fail", "-o", "/dev/null", &chain].map(String::from));
    paused_client(&args)
}

fn paused_psql(pg: &Postgres, secrets: &Secrets) -> PausedClient {
    let sql = format!(
        "CREATE TABLE accounts (id int, password text, card bigint); \
         INSERT INTO accounts VALUES (1, '{}', {}); \
         SELECT id FROM accounts WHERE password = '{}' OR card = {}",
        secrets.sql_text.value,
        secrets.sql_number.value,
        secrets.sql_text.value,
        secrets.sql_number.value
    );
    let command = pg.psql_command(&sql);
    let argv: Vec<&OsStr> = std::iter::once(command.get_program())
        .chain(command.get_args())
        .collect();
    paused_client(&argv)
}

fn paused_psycopg(pg: &Postgres, secrets: &Secrets) -> PausedClient {
    let script = "import sys, psycopg\n\
                  with psycopg.connect(sys.argv[1]) as conn:\n    \
                  conn.execute('SELECT id FROM accounts WHERE password = %s', (sys.argv[2],)).fetchall()\n";
    let conninfo = pg.conninfo();
    let argv: [&OsStr; 5] = [
        psycopg_python().as_os_str(),
        OsStr::new("-c"),
        OsStr::new(script),
        OsStr::new(&conninfo),
        OsStr::new(&secrets.bound.value),
    ];
    paused_client(&argv)
}

fn release(client: PausedClient, what: &str) {
    let output = client.release();
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Picks out one expected span.
type SpanMatch = Box<dyn Fn(&ReceivedSpan) -> bool>;

/// Whether `haystack` holds `needle` anywhere.
fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn planted_secrets_never_leave_the_agent() {
    if !require_kernel() {
        return;
    }
    let secrets = Secrets::new();
    let server = PyServer::start("accounts.py");
    let pg = Postgres::start();
    let curl = paused_curl(&server, &secrets);
    let psql = paused_psql(&pg, &secrets);
    let psycopg = paused_psycopg(&pg, &secrets);
    let pids = [server.pid(), curl.pid(), psql.pid(), psycopg.pid()];
    let receiver = RawOtlpReceiver::start();
    let mut args = propagating_pid_args(&pids);
    args.extend(receiver.agent_args());
    args.push("--print".to_string());
    let agent = Agent::start(&args, None);

    release(curl, "curl");
    release(psql, "psql");
    release(psycopg, "psycopg");

    let [server_pid, curl_pid, psql_pid, psycopg_pid] = pids;
    let expected: [(&str, SpanMatch); 7] = [
        (
            "server GET /users/42",
            Box::new(move |s| s.is(SpanKind::Server, server_pid, "/users/42")),
        ),
        (
            "curl GET /users/42",
            Box::new(move |s| s.is(SpanKind::Client, curl_pid, "/users/42")),
        ),
        (
            "server POST /login",
            Box::new(move |s| s.is(SpanKind::Server, server_pid, "/login")),
        ),
        (
            "the server's own GET /users/7",
            Box::new(move |s| s.is(SpanKind::Client, server_pid, "/users/7")),
        ),
        (
            "psql INSERT",
            Box::new(move |s| s.pid() == Some(psql_pid) && s.name == "INSERT accounts"),
        ),
        (
            "psql SELECT",
            Box::new(move |s| s.pid() == Some(psql_pid) && s.name == "SELECT accounts"),
        ),
        (
            "psycopg SELECT",
            Box::new(move |s| s.pid() == Some(psycopg_pid) && s.name == "SELECT accounts"),
        ),
    ];
    let arrived = receiver.wait_for(
        |spans| expected.iter().all(|(_, found)| spans.iter().any(found)),
        SPAN_TIMEOUT,
    );
    if let Err(e) = arrived {
        let missing: Vec<&str> = expected
            .iter()
            .filter(|(_, found)| !receiver.spans().iter().any(found))
            .map(|(what, _)| *what)
            .collect();
        panic!("spans missing: {missing:?}; {e}");
    }

    let metrics = agent.metrics();
    let output = agent.stop_with_output();
    let bodies = receiver.bodies();
    assert!(
        receiver.rejected().is_empty(),
        "undecodable export requests: {:?}",
        receiver.rejected()
    );
    let mut leaks = Vec::new();
    for secret in secrets.all() {
        let places = [
            (
                "an OTLP request body",
                bodies.iter().any(|body| contains(body, &secret.value)),
            ),
            (
                "the --print output",
                contains(&output.stdout, &secret.value),
            ),
            ("the agent's log", contains(&output.stderr, &secret.value)),
            ("/metrics", metrics.contains(&secret.value)),
        ];
        leaks.extend(
            places
                .iter()
                .filter(|(_, found)| *found)
                .map(|(sink, _)| format!("{} ({}) in {sink}", secret.place, secret.value)),
        );
    }
    let exported: usize = bodies.iter().map(Vec::len).sum();
    eprintln!(
        "searched {} OTLP bodies ({exported} bytes), {} bytes printed, for {} secrets",
        bodies.len(),
        output.stdout.len(),
        secrets.all().len()
    );
    assert!(
        leaks.is_empty(),
        "secrets left the agent:\n  {}",
        leaks.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn telemetry_listens_on_loopback_only_by_default() {
    if !require_kernel() {
        return;
    }
    let default_listen: SocketAddr = DEFAULT_LISTEN.parse().expect("address");
    assert!(
        !port_is_open(default_listen.port()),
        "something already listens on {DEFAULT_LISTEN}: cannot test the default"
    );
    let traced = ChildGuard::new(spawn(Command::new("sleep").arg("120"), "sleep"), "sleep");
    let mut command = Command::new(agent_binary());
    command
        .args(pid_args(&[traced.pid()]))
        .env_remove("ZEROTEL_LISTEN")
        .env_remove("ZEROTEL_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = ChildGuard::new(spawn(&mut command, "zerotel agent"), "zerotel agent");
    let healthy = poll_until(Duration::from_secs(60), || {
        assert!(
            agent.try_exit_status().is_none(),
            "the agent exited before serving /healthz"
        );
        http_get(default_listen, "/healthz").is_ok_and(|r| r.status == 200)
    });
    assert!(healthy, "no /healthz 200 on {DEFAULT_LISTEN} within 60 s");

    let listening = listening_addresses(agent.pid());
    assert_eq!(listening, [default_listen], "the agent's listening sockets");
    // Bound to 127.0.0.1 itself, the socket does not answer other addresses, even loopback ones.
    let other_loopback = SocketAddr::from(([127, 0, 0, 2], default_listen.port()));
    assert!(
        TcpStream::connect_timeout(&other_loopback, Duration::from_secs(2)).is_err(),
        "the agent answered on {other_loopback}"
    );
    let stopped = terminate(agent.child_mut(), Duration::from_secs(10));
    assert!(
        !stopped.killed && stopped.status.success(),
        "the agent did not stop cleanly on SIGTERM: {:?}",
        stopped.status
    );
}
