//! Sampling: `OTEL_TRACES_SAMPLER=traceidratio` with `OTEL_TRACES_SAMPLER_ARG` at 0.1, 0.5 and 1,
//! across three services in three runtimes, all traced by one agent with propagation on:
//! an untraced client -> A (Python) -> B (node) -> C (Go).
//!
//! Each service decides on its own, from the trace id alone (the sampler is not parent-based), so
//! a trace must be exported whole (its five spans) or not at all. B and C answer with the
//! `traceparent` they received, so the test knows every request's trace id and sampled flag, the
//! dropped ones included, and checks that what the agent exported agrees with what it propagated
//! (an SDK downstream reads that flag), that the kept fraction fits the ratio, and that the
//! decision is TraceIdRatioBased's: the id's last 8 bytes below ratio x 2^64.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use zerotel_tests::agent::run_until_exit_with_env;
use zerotel_tests::process::{spawn, ChildGuard, LineReader, ScriptProcess};
use zerotel_tests::servers::{node_interpreter, python_interpreter};
use zerotel_tests::util::TempDir;
use zerotel_tests::{
    describe, propagating_pid_args, require_kernel, Agent, OtlpReceiver, Protocol, ReceivedSpan,
};

/// Requests (each a new trace) per ratio.
const REQUESTS: usize = 300;
/// A kept count whose two-sided binomial tail probability is below this fails: a false alarm
/// about once in 10,000 runs per ratio.
const TAIL_PROBABILITY: f64 = 1e-4;
/// Spans per trace: A.SERVER, A.CLIENT, B.SERVER, B.CLIENT, C.SERVER.
const SPANS_PER_TRACE: usize = 5;
/// How long the sampled traces may take to arrive.
const SPAN_WAIT: Duration = Duration::from_secs(30);
/// Extra wait after they arrived, so stray spans of dropped traces would be seen.
const SETTLE: Duration = Duration::from_secs(2);
const START_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A: `/a/<rest>` GETs B's `/b/<rest>` and answers B's body.
const SERVICE_A: &str = r#"
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

B = "http://127.0.0.1:%d" % int(sys.argv[1])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        with urllib.request.urlopen(B + "/b" + self.path[2:], timeout=10) as response:
            body = response.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"#;

/// B: `/b/<rest>` GETs C's `/c/<rest>`, answers `{"b": <traceparent B got>, "c": <C's answer>}`.
const SERVICE_B: &str = r#"
const http = require('http');

const cPort = Number(process.argv[2]);

const server = http.createServer((req, res) => {
  http.get({ host: '127.0.0.1', port: cPort, path: '/c' + req.url.slice(2) }, (response) => {
    let body = '';
    response.on('data', (chunk) => { body += chunk; });
    response.on('end', () => {
      const answer = JSON.stringify({ b: req.headers.traceparent || null, c: JSON.parse(body) });
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': String(Buffer.byteLength(answer)) });
      res.end(answer);
    });
  }).on('error', (error) => {
    res.writeHead(502, { 'Content-Type': 'text/plain' });
    res.end(String(error));
  });
});

server.listen(0, '127.0.0.1', () => {
  console.log('READY ' + server.address().port);
});
"#;

/// C: `/c/<rest>` answers `{"traceparent": <what C got>}`.
const SERVICE_C: &str = r#"
package main

import (
	"encoding/json"
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
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"traceparent": r.Header.Get("traceparent")})
	})
	fmt.Printf("READY %d\n", listener.Addr().(*net.TCPAddr).Port)
	fmt.Fprintln(os.Stderr, http.Serve(listener, nil))
	os.Exit(1)
}
"#;

fn ready_port(line: Result<String, String>, what: &str) -> u16 {
    let line = line.unwrap_or_else(|e| panic!("{what}: {e}"));
    line.strip_prefix("READY ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what}: got {line:?}"))
}

/// A script service: the process and its port.
fn start_script(
    interpreter: &Path,
    name: &str,
    source: &str,
    args: &[String],
) -> (ScriptProcess, u16) {
    let dir = TempDir::new("sampling");
    dir.write(name, source);
    let script = ScriptProcess::spawn(interpreter, dir, name, args, &[]);
    let port = ready_port(Ok(script.expect_line(START_TIMEOUT)), name);
    (script, port)
}

/// Service C, built with the standard library only; the process, its port and its dir.
fn start_go_service(go: &Path) -> (ChildGuard, LineReader, u16, TempDir) {
    let dir = TempDir::new("sampling-go");
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
        "go build of C failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let mut command = Command::new(&binary);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = spawn(&mut command, "service C");
    let stdout = LineReader::new(child.stdout.take().expect("piped stdout"), "service C");
    let port = ready_port(stdout.next_line(START_TIMEOUT), "service C");
    (ChildGuard::new(child, "service C"), stdout, port, dir)
}

/// `go` on PATH (Debian's golang-go).
fn go_tool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("go"))
        .find(|candidate| candidate.is_file())
}

/// What a request learnt: the trace context A sent B and B sent C.
struct Hops {
    path: String,
    to_b: String,
    to_c: String,
}

/// One GET on a fresh connection; the body of a 200.
fn get(port: u16, path: &str) -> Result<String, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .map_err(|e| format!("receive: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("bad response {raw:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("answered {head:?}"));
    }
    Ok(body.to_string())
}

fn hops(port: u16, path: &str) -> Hops {
    let body = get(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_string();
    Hops {
        path: path.to_string(),
        to_b: text(&json["b"]),
        to_c: text(&json["c"]["traceparent"]),
    }
}

/// `00-<trace>-<span>-<flags>`: (trace id, sampled).
fn parse_traceparent(value: &str) -> Option<(String, bool)> {
    let parts: Vec<&str> = value.split('-').collect();
    match parts.as_slice() {
        ["00", trace, span, flags] if trace.len() == 32 && span.len() == 16 && flags.len() == 2 => {
            let flags = u8::from_str_radix(flags, 16).ok()?;
            Some((trace.to_string(), flags & 1 == 1))
        }
        _ => None,
    }
}

/// The probability of a count at least as far into either tail as `kept`, for `n` draws at `p`:
/// `min(1, 2 * min(P(X <= kept), P(X >= kept)))`.
fn binomial_tail(n: usize, p: f64, kept: usize) -> f64 {
    let pmf: Vec<f64> = (0..=n)
        .map(|k| {
            let ln_choose: f64 = (0..k)
                .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
                .sum();
            let ln_p = if k == 0 { 0.0 } else { k as f64 * p.ln() };
            let ln_q = if k == n {
                0.0
            } else {
                (n - k) as f64 * (1.0 - p).ln()
            };
            (ln_choose + ln_p + ln_q).exp()
        })
        .collect();
    let below: f64 = pmf[..=kept].iter().sum();
    let above: f64 = pmf[kept..].iter().sum();
    (2.0 * below.min(above)).min(1.0)
}

/// TraceIdRatioBased (as the Go and Java SDKs decide): the id's last 8 bytes, big-endian, below
/// ratio x 2^64.
fn ratio_decision(trace_id: &str, ratio: f64) -> bool {
    let low = u64::from_str_radix(&trace_id[16..], 16).expect("hex trace id");
    ratio >= 1.0 || (low as f64) < ratio * 18_446_744_073_709_551_616.0
}

struct Services {
    a_port: u16,
    pids: [u32; 3],
}

/// Runs one ratio: a fresh agent and receiver, [`REQUESTS`] sequential requests; checks and
/// returns how many traces were kept.
fn run_ratio(services: &Services, ratio: f64) -> usize {
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let ratio_text = ratio.to_string();
    let env = [
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", ratio_text.as_str()),
    ];
    let agent = Agent::start_with_env(&propagating_pid_args(&services.pids), Some(&receiver), &env);

    let started = Instant::now();
    let requests: Vec<Hops> = (0..REQUESTS)
        .map(|n| hops(services.a_port, &format!("/a/{ratio}/{n}")))
        .collect();
    eprintln!(
        "ratio {ratio}: {REQUESTS} requests in {:?}",
        started.elapsed()
    );

    // Every request's trace id and decision, as propagated; both hops must agree.
    let mut decided: HashMap<String, bool> = HashMap::new();
    for hop in &requests {
        let to_b = parse_traceparent(&hop.to_b)
            .unwrap_or_else(|| panic!("{}: B got traceparent {:?}", hop.path, hop.to_b));
        let to_c = parse_traceparent(&hop.to_c)
            .unwrap_or_else(|| panic!("{}: C got traceparent {:?}", hop.path, hop.to_c));
        assert_eq!(
            to_b, to_c,
            "{}: A and B propagated different contexts ({} then {})",
            hop.path, hop.to_b, hop.to_c
        );
        assert!(
            decided.insert(to_b.0.clone(), to_b.1).is_none(),
            "{}: trace id {} reused",
            hop.path,
            to_b.0
        );
    }
    let per_trace = |spans: &[ReceivedSpan]| {
        let mut count: HashMap<String, usize> = HashMap::new();
        for span in spans {
            *count.entry(span.trace_id.clone()).or_default() += 1;
        }
        count
    };
    let complete = |spans: &[ReceivedSpan]| {
        let count = per_trace(spans);
        decided
            .iter()
            .filter(|(_, &s)| s)
            .all(|(trace, _)| count.get(trace).copied().unwrap_or(0) >= SPANS_PER_TRACE)
    };
    let waited = receiver.try_wait_for(complete, SPAN_WAIT);
    thread::sleep(SETTLE);
    let spans = receiver.spans();
    drop(agent);
    if let Err(e) = waited {
        eprintln!(
            "ratio {ratio}: not every sampled trace arrived: {}",
            e.lines().next().unwrap_or_default()
        );
    }

    let count = per_trace(&spans);
    let mut kept = 0;
    for (trace, &propagated_sampled) in &decided {
        let exported = count.get(trace).copied().unwrap_or(0);
        let trace_spans: Vec<ReceivedSpan> = spans
            .iter()
            .filter(|s| &s.trace_id == trace)
            .cloned()
            .collect();
        assert!(
            exported == 0 || exported == SPANS_PER_TRACE,
            "ratio {ratio}: trace {trace} exported in part ({exported} of {SPANS_PER_TRACE} spans):\n{}",
            describe(&trace_spans)
        );
        assert_eq!(
            exported == SPANS_PER_TRACE,
            propagated_sampled,
            "ratio {ratio}: trace {trace} propagated sampled={propagated_sampled} but {exported} spans were exported"
        );
        assert_eq!(
            propagated_sampled,
            ratio_decision(trace, ratio),
            "ratio {ratio}: trace {trace} is not TraceIdRatioBased's decision"
        );
        kept += usize::from(exported == SPANS_PER_TRACE);
    }
    let strays = spans
        .iter()
        .filter(|s| !decided.contains_key(&s.trace_id))
        .count();
    assert_eq!(
        strays,
        0,
        "ratio {ratio}: spans outside the requests' traces:\n{}",
        describe(&spans)
    );
    kept
}

#[test]
fn traces_are_kept_whole_or_dropped_whole_at_each_ratio() {
    if !require_kernel() {
        return;
    }
    let Some(go) = go_tool() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "go not found on PATH (install Debian's golang-go)"
        );
        eprintln!("skipped: go not found on PATH (install Debian's golang-go)");
        return;
    };
    let (c, _c_stdout, c_port, _c_dir) = start_go_service(&go);
    let (b, b_port) = start_script(node_interpreter(), "b.js", SERVICE_B, &[c_port.to_string()]);
    let (a, a_port) = start_script(
        python_interpreter(),
        "a.py",
        SERVICE_A,
        &[b_port.to_string()],
    );
    let services = Services {
        a_port,
        pids: [a.pid(), b.pid(), c.pid()],
    };

    for ratio in [0.1, 0.5, 1.0] {
        let kept = run_ratio(&services, ratio);
        let tail = binomial_tail(REQUESTS, ratio, kept);
        eprintln!("ratio {ratio}: {kept} of {REQUESTS} traces kept whole, the rest dropped whole (tail probability {tail:.2e})");
        assert!(
            tail >= TAIL_PROBABILITY,
            "ratio {ratio}: {kept} of {REQUESTS} kept; that far from {} has probability {tail:.2e} (< {TAIL_PROBABILITY})",
            ratio * REQUESTS as f64
        );
    }
}

#[test]
fn unsupported_samplers_stop_start_up_naming_the_variable() {
    let args = ["--check-config".to_string()];
    for (name, arg, named) in [
        ("jaeger_remote", "", "OTEL_TRACES_SAMPLER"),
        ("traceidratio", "1.5", "OTEL_TRACES_SAMPLER_ARG"),
        (
            "parentbased_traceidratio",
            "half",
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ] {
        let env = [
            ("OTEL_TRACES_SAMPLER", name),
            ("OTEL_TRACES_SAMPLER_ARG", arg),
        ];
        let output = run_until_exit_with_env(&args, &env, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{name} {arg:?} was accepted; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(named),
            "{name} {arg:?}: the error should name {named}:\n{stderr}"
        );
    }
}

#[test]
fn binomial_tail_is_two_sided() {
    // n = 4, p = 0.5: P(X = 0) = 1/16, P(X <= 1) = 5/16.
    assert!((binomial_tail(4, 0.5, 0) - 2.0 / 16.0).abs() < 1e-12);
    assert!((binomial_tail(4, 0.5, 3) - 10.0 / 16.0).abs() < 1e-12);
    assert_eq!(binomial_tail(4, 0.5, 2), 1.0);
    assert_eq!(binomial_tail(100, 1.0, 100), 1.0);
    assert_eq!(binomial_tail(100, 1.0, 99), 0.0);
}
