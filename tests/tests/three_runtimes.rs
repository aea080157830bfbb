//! One trace across three uninstrumented runtimes: an untraced client -> A (Python
//! `ThreadingHTTPServer`) -> B (node `http`) -> C (Go `net/http`), all three traced by one agent.
//!
//! Every request carries its own number in its path (`/a/<pass>/<n>` -> `/b/<pass>/<n>` ->
//! `/c/<pass>/<n>`), so each of the five spans of request n can be found by `url.path` and each
//! parent link checked against the span it must name, not merely against "some span".
//!
//! Expected per request: A.SERVER (root) -> A.CLIENT -> B.SERVER -> B.CLIENT -> C.SERVER, one
//! trace id, nothing else in that trace.
//!
//! B is an event loop: under concurrency the kernel links its outgoing request to the request
//! its (single) thread read last, so B.SERVER -> B.CLIENT is only measured for the concurrent
//! pass, and asserted on a sequential pass.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use zerotel_tests::process::{spawn, ChildGuard, LineReader, ScriptProcess};
use zerotel_tests::servers::{node_interpreter, python_interpreter};
use zerotel_tests::util::TempDir;
use zerotel_tests::{describe, propagating_pid_args, require_kernel, Agent, OtlpReceiver, Protocol, ReceivedSpan, SpanKind};

/// Requests of the concurrent pass, and how many client threads send them.
const CONCURRENT_REQUESTS: usize = 200;
const CONCURRENCY: usize = 4;
/// Requests of the sequential pass (one at a time).
const SEQUENTIAL_REQUESTS: usize = 50;
/// How long spans may take to reach the receiver after the last request of a pass.
const SPAN_WAIT: Duration = Duration::from_secs(30);
/// Extra time after all expected spans arrived, so late duplicates are seen too.
const SETTLE: Duration = Duration::from_millis(1500);
/// How long a server may take to print `READY <port>`.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Client timeout for one request through all three services.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Failing requests described in the output, per link.
const EXAMPLES: usize = 3;

// ---------------------------------------------------------------------------------------------
// The three services.

/// A: for `/a/<rest>` calls B's `/b/<rest>` with urllib from the handling thread, then 200
/// (502 if B did not answer 200).
const SERVICE_A: &str = r#"
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

B = "http://127.0.0.1:%d" % int(sys.argv[1])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if not self.path.startswith("/a/"):
            self.reply(404, b"not found\n")
            return
        try:
            with urllib.request.urlopen(B + "/b" + self.path[2:], timeout=10) as response:
                response.read()
                status = response.status
        except Exception as error:
            sys.stderr.write("%s -> B: %r\n" % (self.path, error))
            sys.stderr.flush()
            status = 0
        if status == 200:
            self.reply(200, b"ok\n")
        else:
            self.reply(502, b"B answered %d\n" % status)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"#;

/// B: for `/b/<rest>` GETs C's `/c/<rest>` with `http.get` and answers 200 once C answered 200
/// (502 otherwise).
const SERVICE_B: &str = r#"
const http = require('http');

const cPort = Number(process.argv[2]);

function reply(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'text/plain', 'Content-Length': String(Buffer.byteLength(body)) });
  res.end(body);
}

const server = http.createServer((req, res) => {
  if (!req.url.startsWith('/b/')) {
    reply(res, 404, 'not found\n');
    return;
  }
  const path = '/c' + req.url.slice(2);
  http
    .get({ host: '127.0.0.1', port: cPort, path }, (response) => {
      response.resume();
      response.on('end', () => reply(res, response.statusCode === 200 ? 200 : 502, 'C answered ' + response.statusCode + '\n'));
    })
    .on('error', (error) => {
      console.error(req.url + ' -> C: ' + error);
      reply(res, 502, 'C failed\n');
    });
});

server.listen(0, '127.0.0.1', () => {
  console.log('READY ' + server.address().port);
});
"#;

/// C: `/c/<rest>` answers 200 "ok". Standard library only.
const SERVICE_C: &str = r#"
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	http.HandleFunc("/c/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte("ok"))
	})
	fmt.Printf("READY %d\n", listener.Addr().(*net.TCPAddr).Port)
	fmt.Fprintln(os.Stderr, http.Serve(listener, nil))
	os.Exit(1)
}
"#;

/// Reads the `READY <port>` line a service prints once it listens.
fn ready_port(line: Result<String, String>, what: &str, stderr: impl Fn() -> String) -> u16 {
    let line = line.unwrap_or_else(|e| panic!("{what}: {e}; stderr:\n{}", stderr()));
    line.strip_prefix("READY ")
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what}: expected \"READY <port>\", got {line:?}; stderr:\n{}", stderr()))
}

/// A Python or node service run from a script.
struct ScriptService {
    script: ScriptProcess,
    port: u16,
}

impl ScriptService {
    fn start(interpreter: &std::path::Path, script_name: &str, source: &str, args: &[String]) -> ScriptService {
        let dir = TempDir::new("three-runtimes");
        dir.write(script_name, source);
        let script = ScriptProcess::spawn(interpreter, dir, script_name, args, &[]);
        let port = ready_port(Ok(script.expect_line(START_TIMEOUT)), script_name, || script.stderr());
        ScriptService { script, port }
    }

    fn pid(&self) -> u32 {
        self.script.pid()
    }
}

/// The Go service, built into its own temp dir with the standard library only.
struct GoService {
    // Field order matters: the process is stopped before its dir is removed.
    child: ChildGuard,
    _stdout: LineReader,
    port: u16,
    dir: TempDir,
}

impl GoService {
    fn start(go: &std::path::Path) -> GoService {
        let dir = TempDir::new("three-runtimes-go");
        dir.write("main.go", SERVICE_C);
        let binary = dir.join("c");
        let build = Command::new(go)
            .args(["build", "-o"])
            .arg(&binary)
            .arg("main.go")
            .current_dir(dir.path())
            .env("GOCACHE", dir.join("gocache"))
            .env("GOPATH", dir.join("gopath"))
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env_remove("GOFLAGS")
            .output()
            .unwrap_or_else(|e| panic!("run {} build: {e}", go.display()));
        assert!(
            build.status.success(),
            "go build of service C failed ({}):\n{}{}",
            build.status,
            String::from_utf8_lossy(&build.stdout),
            String::from_utf8_lossy(&build.stderr)
        );
        let stderr_path = dir.join("stderr.log");
        let stderr = File::create(&stderr_path).unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let mut command = Command::new(&binary);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = spawn(&mut command, "go service C");
        let stdout = LineReader::new(child.stdout.take().expect("piped stdout"), "go service C");
        let child = ChildGuard::new(child, "go service C");
        let port = ready_port(stdout.next_line(START_TIMEOUT), "go service C", || dir.read("stderr.log"));
        GoService { child, _stdout: stdout, port, dir }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// `go` on PATH (Debian's golang-go), or None.
fn go_tool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("go")).find(|candidate| candidate.is_file())
}

// ---------------------------------------------------------------------------------------------
// The untraced client.

/// One HTTP/1.1 GET on a fresh connection (`Connection: close`); the status code.
fn get(port: u16, path: &str) -> Result<u16, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    // One write, as curl does: `write!` on the stream would send each piece separately, and the
    // agent does not trace a request whose first read is shorter than 8 bytes.
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("receive: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).ok_or_else(|| format!("bad response {text:?}"))
}

/// Sends requests 0..count of `pass` to A from `threads` threads (request n goes to thread
/// n % threads, each thread sequential); returns the failures ("path: why").
fn run_pass(a_port: u16, pass: &str, count: usize, threads: usize) -> Vec<String> {
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let pass = pass.to_string();
            thread::spawn(move || {
                let mut failures = Vec::new();
                for n in (t..count).step_by(threads) {
                    let path = format!("/a/{pass}/{n}");
                    match get(a_port, &path) {
                        Ok(200) => {}
                        Ok(status) => failures.push(format!("{path}: status {status}")),
                        Err(e) => failures.push(format!("{path}: {e}")),
                    }
                }
                failures
            })
        })
        .collect();
    workers.into_iter().flat_map(|w| w.join().expect("client thread panicked")).collect()
}

// ---------------------------------------------------------------------------------------------
// Checking the spans of one pass.

#[derive(Clone, Copy)]
struct Pids {
    a: u32,
    b: u32,
    c: u32,
}

/// The five span roles of one request: (kind, process, path prefix).
fn roles(pids: Pids) -> [(&'static str, SpanKind, u32, &'static str); 5] {
    [
        ("A.SERVER", SpanKind::Server, pids.a, "/a"),
        ("A.CLIENT", SpanKind::Client, pids.a, "/b"),
        ("B.SERVER", SpanKind::Server, pids.b, "/b"),
        ("B.CLIENT", SpanKind::Client, pids.b, "/c"),
        ("C.SERVER", SpanKind::Server, pids.c, "/c"),
    ]
}

/// How many spans of each role of `pass` were received.
fn role_counts(spans: &[ReceivedSpan], pids: Pids, pass: &str) -> [usize; 5] {
    roles(pids).map(|(_, kind, pid, prefix)| {
        let prefix = format!("{prefix}/{pass}/");
        spans
            .iter()
            .filter(|s| s.kind == kind && s.pid() == Some(pid))
            .filter(|s| s.attr_str("url.path").is_some_and(|p| p.starts_with(&prefix)))
            .count()
    })
}

/// Polls the receiver until every role of `pass` has `count` spans or [`SPAN_WAIT`] passes, then
/// waits [`SETTLE`] more and returns everything received. Does not panic: missing spans show up
/// as failed links.
fn collect_pass(receiver: &OtlpReceiver, pids: Pids, pass: &str, count: usize) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + SPAN_WAIT;
    loop {
        let counts = role_counts(&receiver.spans(), pids, pass);
        if counts.iter().all(|&c| c >= count) {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("[{pass}] spans still missing after {SPAN_WAIT:?}: per role {counts:?}, {count} expected each");
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    thread::sleep(SETTLE);
    receiver.spans()
}

/// Per-link results of one pass; each counter is a number of requests.
#[derive(Default, Debug)]
struct Tally {
    requests: usize,
    /// A.SERVER root -> A.CLIENT (same trace, parent = A.SERVER).
    a_server_a_client: usize,
    /// A.CLIENT -> B.SERVER.
    a_client_b_server: usize,
    /// A.SERVER -> A.CLIENT -> B.SERVER both exact.
    a_to_b: usize,
    /// B.SERVER -> B.CLIENT.
    b_server_b_client: usize,
    /// B.CLIENT -> C.SERVER.
    b_client_c_server: usize,
    /// All five spans present, A.SERVER root, and every link except B.SERVER -> B.CLIENT exact.
    through_a_and_c: usize,
    /// The trace of A.SERVER holds exactly the five spans, every link exact.
    full_chain: usize,
    /// Descriptions of failing requests, per link name.
    examples: HashMap<&'static str, Vec<String>>,
}

impl Tally {
    fn example(&mut self, link: &'static str, what: impl FnOnce() -> String) {
        let list = self.examples.entry(link).or_default();
        if list.len() < EXAMPLES {
            list.push(what());
        }
    }

    fn pct(&self, count: usize) -> String {
        format!("{count}/{} = {:.1}%", self.requests, 100.0 * count as f64 / self.requests.max(1) as f64)
    }

    /// At least 99% of the requests.
    fn at_least_99(&self, count: usize) -> bool {
        count * 100 >= self.requests * 99
    }
}

/// `child` is in `parent`'s trace and names it as its parent.
fn linked(parent: Option<&ReceivedSpan>, child: Option<&ReceivedSpan>) -> bool {
    match (parent, child) {
        (Some(p), Some(c)) => c.trace_id == p.trace_id && c.parent_span_id == p.span_id,
        _ => false,
    }
}

fn analyze(spans: &[ReceivedSpan], pids: Pids, pass: &str, requests: usize) -> Tally {
    let mut by_path: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    let mut by_trace: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    for span in spans {
        if let Some(path) = span.attr_str("url.path") {
            by_path.entry(path).or_default().push(span);
        }
        by_trace.entry(span.trace_id.as_str()).or_default().push(span);
    }
    let mut tally = Tally { requests, ..Tally::default() };
    for n in 0..requests {
        // Exactly one span per role, else the role counts as missing.
        let matching: Vec<Vec<&ReceivedSpan>> = roles(pids)
            .iter()
            .map(|&(_, kind, pid, prefix)| {
                let path = format!("{prefix}/{pass}/{n}");
                by_path
                    .get(path.as_str())
                    .map(|v| v.iter().copied().filter(|s| s.kind == kind && s.pid() == Some(pid)).collect())
                    .unwrap_or_default()
            })
            .collect();
        let found: Vec<Option<&ReceivedSpan>> = matching.iter().map(|m| (m.len() == 1).then(|| m[0])).collect();
        let [a_srv, a_cli, b_srv, b_cli, c_srv] = [found[0], found[1], found[2], found[3], found[4]];
        let show = || {
            let names = roles(pids).map(|r| r.0);
            let mut text = format!("request /a/{pass}/{n}:");
            for ((name, span), all) in names.iter().zip(&found).zip(&matching) {
                match span {
                    Some(s) => text.push_str(&format!(
                        "\n    {name}: trace={} id={} parent={}",
                        s.trace_id,
                        s.span_id,
                        if s.is_root() { "-" } else { &s.parent_span_id }
                    )),
                    None => text.push_str(&format!("\n    {name}: {} spans (one expected)", all.len())),
                }
            }
            text
        };
        let root = a_srv.is_some_and(ReceivedSpan::is_root);
        let l1 = linked(a_srv, a_cli);
        let l2 = linked(a_cli, b_srv);
        let l3 = linked(b_srv, b_cli);
        let l4 = linked(b_cli, c_srv);
        let all_present = found.iter().all(Option::is_some);
        let through = all_present && root && l1 && l2 && l4;
        let full = through
            && l3
            && a_srv.and_then(|s| by_trace.get(s.trace_id.as_str())).is_some_and(|trace| trace.len() == 5);
        tally.a_server_a_client += usize::from(l1);
        tally.a_client_b_server += usize::from(l2);
        tally.a_to_b += usize::from(l1 && l2);
        tally.b_server_b_client += usize::from(l3);
        tally.b_client_c_server += usize::from(l4);
        tally.through_a_and_c += usize::from(through);
        tally.full_chain += usize::from(full);
        for (ok, link) in [
            (l1, "A.SERVER->A.CLIENT"),
            (l2, "A.CLIENT->B.SERVER"),
            (l3, "B.SERVER->B.CLIENT"),
            (l4, "B.CLIENT->C.SERVER"),
            (root, "A.SERVER is root"),
        ] {
            if !ok {
                tally.example(link, show);
            }
        }
        if through && !full {
            tally.example("full chain (extra spans in trace)", || {
                let trace = &by_trace[a_srv.expect("present").trace_id.as_str()];
                format!("{}\n  trace holds {} spans", show(), trace.len())
            });
        }
    }
    tally
}

fn report(pass: &str, tally: &Tally, counts: [usize; 5], pids: Pids) {
    let names = roles(pids).map(|r| r.0);
    let per_role: Vec<String> = names.iter().zip(counts).map(|(n, c)| format!("{n}={c}")).collect();
    eprintln!("=== {pass} pass: {} requests; spans received per role: {}", tally.requests, per_role.join(" "));
    eprintln!("  A.SERVER -> A.CLIENT              {}", tally.pct(tally.a_server_a_client));
    eprintln!("  A.CLIENT -> B.SERVER              {}", tally.pct(tally.a_client_b_server));
    eprintln!("  A.SERVER -> A.CLIENT -> B.SERVER  {}", tally.pct(tally.a_to_b));
    eprintln!("  B.SERVER -> B.CLIENT              {}", tally.pct(tally.b_server_b_client));
    eprintln!("  B.CLIENT -> C.SERVER              {}", tally.pct(tally.b_client_c_server));
    eprintln!("  complete through A and C          {}", tally.pct(tally.through_a_and_c));
    eprintln!("  full 5-span chain exact           {}", tally.pct(tally.full_chain));
    let mut links: Vec<_> = tally.examples.iter().collect();
    links.sort_by_key(|(link, _)| *link);
    for (link, examples) in links {
        eprintln!("  first failures of {link}:");
        for example in examples {
            eprintln!("  {example}");
        }
    }
}

/// The pass's spans of the first few failing requests' traces, for assertion messages.
fn failing_spans(spans: &[ReceivedSpan], tally: &Tally) -> String {
    let mut text = String::new();
    for (link, examples) in &tally.examples {
        text.push_str(&format!("{link}:\n"));
        for example in examples {
            text.push_str(&format!("  {example}\n"));
        }
    }
    text.push_str(&format!("({} spans received in total; first 10:)\n", spans.len()));
    text.push_str(&describe(&spans[..spans.len().min(10)]));
    text
}

// ---------------------------------------------------------------------------------------------

#[test]
fn one_trace_through_python_node_and_go() {
    if !require_kernel() {
        return;
    }
    let Some(go) = go_tool() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("go not found on PATH (install Debian's golang-go)");
        }
        eprintln!("skipped: go not found on PATH (install Debian's golang-go)");
        return;
    };
    let c = GoService::start(&go);
    let b = ScriptService::start(node_interpreter(), "b.js", SERVICE_B, &[c.port.to_string()]);
    let a = ScriptService::start(python_interpreter(), "a.py", SERVICE_A, &[b.port.to_string()]);
    let pids = Pids { a: a.pid(), b: b.pid(), c: c.pid() };
    eprintln!(
        "A (python) pid {} port {}, B (node) pid {} port {}, C (go) pid {} port {}",
        pids.a, a.port, pids.b, b.port, pids.c, c.port
    );
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&propagating_pid_args(&[pids.a, pids.b, pids.c]), Some(&receiver));

    let started = Instant::now();
    let concurrent_failures = run_pass(a.port, "concurrent", CONCURRENT_REQUESTS, CONCURRENCY);
    eprintln!("concurrent pass: {CONCURRENT_REQUESTS} requests in {:?}", started.elapsed());
    let spans = collect_pass(&receiver, pids, "concurrent", CONCURRENT_REQUESTS);
    let concurrent = analyze(&spans, pids, "concurrent", CONCURRENT_REQUESTS);
    report("concurrent", &concurrent, role_counts(&spans, pids, "concurrent"), pids);
    let concurrent_detail = failing_spans(&spans, &concurrent);

    let started = Instant::now();
    let sequential_failures = run_pass(a.port, "sequential", SEQUENTIAL_REQUESTS, 1);
    eprintln!("sequential pass: {SEQUENTIAL_REQUESTS} requests in {:?}", started.elapsed());
    let spans = collect_pass(&receiver, pids, "sequential", SEQUENTIAL_REQUESTS);
    let sequential = analyze(&spans, pids, "sequential", SEQUENTIAL_REQUESTS);
    report("sequential", &sequential, role_counts(&spans, pids, "sequential"), pids);
    let sequential_detail = failing_spans(&spans, &sequential);
    let metrics = agent.metrics();
    let counters: Vec<&str> = metrics.lines().filter(|line| !line.starts_with('#')).collect();
    eprintln!("agent metrics: {}", counters.join(", "));

    let stderrs = || {
        format!(
            "A stderr:\n{}\nB stderr:\n{}\nC stderr:\n{}",
            a.script.stderr(),
            b.script.stderr(),
            c.dir.read("stderr.log")
        )
    };
    assert!(
        concurrent_failures.is_empty() && sequential_failures.is_empty(),
        "requests failed: {concurrent_failures:?} {sequential_failures:?}\n{}",
        stderrs()
    );
    let checks = [
        ("concurrent: A.SERVER -> A.CLIENT", concurrent.a_server_a_client),
        ("concurrent: A.CLIENT -> B.SERVER", concurrent.a_client_b_server),
        ("concurrent: B.CLIENT -> C.SERVER", concurrent.b_client_c_server),
        ("concurrent: complete and correct through A and C", concurrent.through_a_and_c),
    ];
    for (what, count) in checks {
        assert!(
            concurrent.at_least_99(count),
            "{what}: only {} (>= 99% wanted)\n{concurrent_detail}",
            concurrent.pct(count)
        );
    }
    assert!(
        sequential.at_least_99(sequential.full_chain),
        "sequential: full 5-span chain exact only for {} (>= 99% wanted)\n{sequential_detail}",
        sequential.pct(sequential.full_chain)
    );
    drop(agent);
}
