//! Trace context propagation: `traceparent` inserted into outgoing HTTP/1 requests of traced
//! processes, so a request crossing services is one trace; and proof that nothing else changes.

use zerotel_tests::{
    util::TempDir,
    describe, paused_client, propagating_pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer, SpanKind,
    SPAN_TIMEOUT,
};

/// Body of a traced `curl -s URL [extra]`, run as a process the agent traces from its start.
fn traced_curl(agent_args: &[&str], url: &str, extra: &[&str]) -> (String, OtlpReceiver, u32) {
    let mut cmd = vec!["curl", "-s", "--max-time", "20"];
    cmd.extend_from_slice(extra);
    cmd.push(url);
    let client = paused_client(&cmd);
    let pid = client.pid();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let mut args = propagating_pid_args(&[pid]);
    args.extend(agent_args.iter().map(|a| a.to_string()));
    let _agent = Agent::start(&args, Some(&receiver));
    let output = client.release();
    assert!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    let body = String::from_utf8_lossy(&output.stdout).into_owned();
    if !agent_args.contains(&"--no-propagation") {
        receiver.wait_for(|spans| spans.iter().any(|s| s.kind == SpanKind::Client && s.pid() == Some(pid)), SPAN_TIMEOUT);
    }
    (body, receiver, pid)
}

fn traceparents(body: &str) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    json["traceparent"].as_array().expect("traceparent list").iter().map(|v| v.as_str().unwrap_or("").to_owned()).collect()
}

#[test]
fn one_trace_across_two_services() {
    if require_kernel() {
        chain_is_one_trace("/chain");
    }
}

/// The call leaves from a pool's worker thread, which serves nothing itself: the kernel falls back
/// to the one request its process serves.
#[test]
fn one_trace_when_a_worker_thread_makes_the_call() {
    if require_kernel() {
        chain_is_one_trace("/chain-pooled");
    }
}

/// curl -> frontend `route` (which calls the backend) -> backend: one trace, exact parents.
fn chain_is_one_trace(route: &str) {
    let backend = PyServer::start("backend.py");
    let frontend = PyServer::start("frontend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let _agent = Agent::start(&propagating_pid_args(&[frontend.pid(), backend.pid()]), Some(&receiver));
    let url = frontend.url(&format!("{route}?to={}", backend.url("/users/1")));
    let result = zerotel_tests::curl(&url, &[]);
    assert_eq!(result.status, 200);

    let spans = receiver.wait_for(
        |s| s.iter().any(|x| x.is(SpanKind::Server, backend.pid(), "/users/1"))
            && s.iter().any(|x| x.is(SpanKind::Server, frontend.pid(), route))
            && s.iter().any(|x| x.kind == SpanKind::Client && x.pid() == Some(frontend.pid())),
        SPAN_TIMEOUT,
    );
    let server_a = spans.iter().find(|x| x.is(SpanKind::Server, frontend.pid(), route)).expect("frontend SERVER");
    let client_a = spans.iter().find(|x| x.kind == SpanKind::Client && x.pid() == Some(frontend.pid())).expect("frontend CLIENT");
    let server_b = spans.iter().find(|x| x.is(SpanKind::Server, backend.pid(), "/users/1")).expect("backend SERVER");
    let all = describe(&spans);
    assert_eq!(client_a.parent_span_id, server_a.span_id, "CLIENT under its SERVER:\n{all}");
    assert_eq!(server_b.parent_span_id, client_a.span_id, "downstream SERVER under the CLIENT that called it:\n{all}");
    assert!(server_a.is_root(), "curl sent no context, so the frontend starts the trace:\n{all}");
    for span in [client_a, server_b] {
        assert_eq!(span.trace_id, server_a.trace_id, "one trace:\n{all}");
    }
}

#[test]
fn downstream_sees_exactly_one_traceparent_naming_the_client_span() {
    if !require_kernel() {
        return;
    }
    let echo = PyServer::start("echo.py"); // not traced: it only reports what arrived
    let (body, receiver, pid) = traced_curl(&[], &echo.url("/headers"), &[]);
    let received = traceparents(&body);
    assert_eq!(received.len(), 1, "exactly one traceparent, got {received:?}");
    let spans = receiver.spans();
    let client = spans.iter().find(|s| s.kind == SpanKind::Client && s.pid() == Some(pid)).expect("CLIENT span");
    assert_eq!(received[0], format!("00-{}-{}-01", client.trace_id, client.span_id), "header names the CLIENT span");
}

#[test]
fn an_existing_traceparent_is_left_alone() {
    if !require_kernel() {
        return;
    }
    let echo = PyServer::start("echo.py");
    let sdk = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (body, _receiver, _) = traced_curl(&[], &echo.url("/headers"), &["-H", &format!("traceparent: {sdk}")]);
    assert_eq!(traceparents(&body), vec![sdk.to_owned()], "no second header, the SDK's untouched");
}

#[test]
fn no_propagation_flag_sends_requests_untouched() {
    if !require_kernel() {
        return;
    }
    let echo = PyServer::start("echo.py");
    let (body, _receiver, _) = traced_curl(&["--no-propagation"], &echo.url("/headers"), &[]);
    assert!(traceparents(&body).is_empty(), "nothing injected with --no-propagation: {body}");
}

#[test]
fn a_10_mb_upload_arrives_byte_for_byte() {
    if !require_kernel() {
        return;
    }
    let sink = PyServer::start("sink.py");
    let dir = TempDir::new("upload");
    let data: Vec<u8> = (0..10 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let path = dir.write("upload.bin", &data);
    let expected = sha256_hex(&path);
    let upload = format!("@{}", path.display());
    let (body, _receiver, _) = traced_curl(&[], &sink.url("/upload"), &["--data-binary", &upload]);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(json["received_bytes"], data.len(), "{body}");
    assert_eq!(json["sha256"], expected.as_str(), "upload altered in flight");
}

#[test]
fn non_http_traffic_passes_unchanged() {
    if !require_kernel() {
        return;
    }
    // A traced process talks a binary protocol to itself (both ends traced): 1 MiB of random
    // bytes, whose later messages start exactly like HTTP requests, must come back identical.
    let script = r#"
import os, socket, threading, hashlib
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def echo():
    c, _ = srv.accept()
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.close()
threading.Thread(target=echo, daemon=True).start()
cli = socket.create_connection(srv.getsockname())
chunks = [b"\x00\x01binary" + os.urandom(4000)]
chunks += [b"GET / HTTP/1.1\r\nbinary\r\n\r\n" + os.urandom(4000) for _ in range(255)]
sent = b"".join(chunks)
got = bytearray()
for chunk in chunks:
    cli.sendall(chunk)
    while len(got) < sum(len(c) for c in chunks[:chunks.index(chunk) + 1]):
        got += cli.recv(65536)
print("EQUAL" if bytes(got) == sent else "DIFFERENT", len(sent), len(got))
"#;
    let client = paused_client(&["python3", "-c", script]);
    let _agent = Agent::start(&propagating_pid_args(&[client.pid()]), None);
    let output = client.release();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("EQUAL"), "bytes changed in flight: {stdout} {}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn after_sigkill_nothing_alters_traffic() {
    if !require_kernel() {
        return;
    }
    let echo = PyServer::start("echo.py");
    let client = paused_client(&["curl", "-s", "--max-time", "20", &echo.url("/headers")]);
    let agent = Agent::start(&propagating_pid_args(&[client.pid()]), None);
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let output = client.release();
    assert!(output.status.success(), "the application keeps working after SIGKILL");
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(traceparents(&body).is_empty(), "no program left attached altering traffic: {body}");
    drop(agent);

    // Restarting the agent resumes tracing and propagation.
    let (body, receiver, pid) = traced_curl(&[], &echo.url("/headers"), &[]);
    assert_eq!(traceparents(&body).len(), 1, "propagation resumes after a restart: {body}");
    assert!(receiver.spans().iter().any(|s| s.kind == SpanKind::Client && s.pid() == Some(pid)), "tracing resumes");
}

#[test]
fn postgresql_wire_traffic_passes_unchanged() {
    if !require_kernel() {
        return;
    }
    let Some(pg) = Postgres::start() else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "PostgreSQL 15 is needed in CI (apt postgresql)");
        return;
    };
    // A traced psql runs queries whose text and results start like HTTP requests: the wire
    // protocol must pass byte for byte (the connection is classified as not HTTP).
    let sql = "SELECT 'GET / HTTP/1.1' || chr(13) || chr(10) || repeat('x', 5000) AS r; SELECT sum(g) FROM generate_series(1, 100000) g;";
    let port = pg.port.to_string();
    let client = paused_client(&["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-c", sql]);
    let _agent = Agent::start(&propagating_pid_args(&[client.pid()]), None);
    let output = client.release();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "psql failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("GET / HTTP/1.1\r\n{}", "x".repeat(5000))), "query result altered: {stdout:.200}");
    assert!(stdout.contains("5000050000"), "second result: {stdout:.200}");
}

/// A throwaway PostgreSQL 15 cluster on 127.0.0.1 (apt's binaries, run as the postgres user).
struct Postgres {
    port: u16,
    dir: TempDir,
}

impl Postgres {
    fn start() -> Option<Postgres> {
        let bin = std::path::Path::new("/usr/lib/postgresql/15/bin");
        if !bin.join("initdb").exists() {
            return None;
        }
        let dir = TempDir::new("pg");
        let data = dir.join("data");
        let port = zerotel_tests::util::free_port();
        let as_postgres = |args: &str| {
            let status = std::process::Command::new("su")
                .args(["postgres", "-s", "/bin/sh", "-c", args])
                .status()
                .expect("run su postgres");
            assert!(status.success(), "postgres command failed: {args}");
        };
        std::process::Command::new("chown").args(["-R", "postgres", &dir.path().display().to_string()]).status().ok();
        as_postgres(&format!("{}/initdb -D {} -U postgres --auth=trust >/dev/null", bin.display(), data.display()));
        as_postgres(&format!(
            "{}/pg_ctl -D {} -o \"-c listen_addresses=127.0.0.1 -p {port} -k {}\" -w -l {}/log start >/dev/null",
            bin.display(),
            data.display(),
            data.display(),
            dir.path().display()
        ));
        Some(Postgres { port, dir })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let stop = format!("/usr/lib/postgresql/15/bin/pg_ctl -D {} -m immediate -w stop >/dev/null", data.display());
        let _ = std::process::Command::new("su").args(["postgres", "-s", "/bin/sh", "-c", &stop]).status();
    }
}

#[test]
fn the_injected_sampled_flag_matches_what_is_exported() {
    if !require_kernel() {
        return;
    }
    let echo = PyServer::start("echo.py");
    let client = paused_client(&["curl", "-s", "--max-time", "20", &echo.url("/headers")]);
    let pid = client.pid();
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start_with_env(&propagating_pid_args(&[pid]), Some(&receiver), &[("OTEL_TRACES_SAMPLER", "always_off")]);
    let output = client.release();
    let received = traceparents(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(received.len(), 1, "context still propagates when not sampled: {received:?}");
    assert!(received[0].ends_with("-00"), "not-sampled flag injected: {received:?}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(receiver.spans().iter().all(|s| s.pid() != Some(pid)), "an unsampled trace exported spans");
    assert!(agent.metric_sum("zerotel_spans_unsampled_total") >= 1, "unsampled spans are counted");
}

#[test]
fn connections_opened_before_the_agent_get_the_header_too() {
    if !require_kernel() {
        return;
    }
    let echo = PyServer::start("echo.py");
    let dir = TempDir::new("early-client");
    let script = dir.write(
        "early.py",
        r#"
import http.client, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
def get():
    conn.request("GET", "/headers")
    print(conn.getresponse().read().decode(), flush=True)
get()
sys.stdin.readline()
get()
"#,
    );
    let port = echo.url("/").rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse::<u16>().ok()).expect("port");
    let mut client = std::process::Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut stdout = std::io::BufReader::new(client.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("first response");
    assert!(traceparents(&line).is_empty(), "no agent yet: {line}");
    let _agent = Agent::start(&propagating_pid_args(&[client.id()]), None);
    std::io::Write::write_all(client.stdin.as_mut().expect("stdin"), b"go\n").expect("release");
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("second response");
    let _ = client.wait();
    assert_eq!(traceparents(&line).len(), 1, "the existing keep-alive connection is propagated on: {line}");
}

fn sha256_hex(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}
