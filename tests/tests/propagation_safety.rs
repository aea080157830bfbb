//! Propagation safety: the `traceparent` the agent inserts into outgoing HTTP/1 requests must
//! never corrupt, stall or break real traffic. Big bodies through a traced nginx reverse proxy,
//! many concurrent keep-alive requests from epoll clients, pipelined requests, requests written
//! in pieces or with writev, and `Expect: 100-continue` uploads.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use zerotel_tests::process::{children_of, send_signal, spawn, terminate, ChildGuard, ScriptProcess};
use zerotel_tests::servers::{node_interpreter, python_interpreter, START_TIMEOUT};
use zerotel_tests::util::{free_port, is_valid_hex_id, poll_until, port_is_open, TempDir};
use zerotel_tests::{paused_client, pid_args, propagating_pid_args, require_kernel, Agent, PyServer};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Runs `interpreter <tmp>/<script_name> args...` as a process the agent traces from its first
/// instruction (propagation forced on), and returns what it printed.
fn run_traced_script(interpreter: &Path, script_name: &str, script: &str, args: &[String]) -> Output {
    run_traced_script_with(interpreter, script_name, script, args, propagating_pid_args)
}

/// As [`run_traced_script`], with the agent's arguments made by `agent_args` from the pid.
fn run_traced_script_with(
    interpreter: &Path,
    script_name: &str,
    script: &str,
    args: &[String],
    agent_args: fn(&[u32]) -> Vec<String>,
) -> Output {
    let files = TempDir::new("safety-client");
    let path = files.write(script_name, script);
    let mut cmd: Vec<&OsStr> = vec![interpreter.as_os_str(), path.as_os_str()];
    cmd.extend(args.iter().map(OsStr::new));
    let client = paused_client(&cmd);
    let _agent = Agent::start(&agent_args(&[client.pid()]), None);
    let output = client.release();
    assert!(
        output.status.success(),
        "traced {script_name} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The last stdout line of a client, as JSON.
fn json_output(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}):\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The `traceparent` list of a `/headers` JSON body.
fn traceparents(body: &serde_json::Value) -> Vec<String> {
    body["traceparent"]
        .as_array()
        .unwrap_or_else(|| panic!("no traceparent list in {body}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Whether `value` is what the agent inserts: `00-<32 hex>-<16 hex>-01`.
fn is_agent_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && is_valid_hex_id(parts[1], 32)
        && is_valid_hex_id(parts[2], 16)
        && parts[3] == "01"
}

/// Asserts `values` is exactly one agent-made traceparent.
fn assert_one_traceparent(values: &[String], what: &str) {
    assert_eq!(values.len(), 1, "{what}: exactly one traceparent expected, got {values:?}");
    assert!(is_agent_traceparent(&values[0]), "{what}: malformed traceparent {:?}", values[0]);
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let digest = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(digest.len(), 64, "sha256sum output for {}", path.display());
    digest
}

/// Deterministic pseudo-random bytes (xorshift), so a failure is reproducible.
fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An untraced curl: `curl -sS --http1.1 ... -o <out> -w '%{http_code} %{time_total}' extra... url`.
/// Returns (status, seconds). Untraced, each transfer here takes well under a second: a curl
/// that hits its 10 s limit is a stall (its error says how many bytes had arrived).
fn timed_curl(url: &str, out: &Path, extra: &[&str]) -> (u16, f64) {
    let output = Command::new("curl")
        .args(["-sS", "--http1.1", "--noproxy", "*", "--max-time", "10", "-w", "%{http_code} %{time_total}", "-o"])
        .arg(out)
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "curl {url} {extra:?} failed ({}): {stdout} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut fields = stdout.split_whitespace();
    let status = fields.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad curl -w output {stdout:?}"));
    let secs = fields.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad curl -w output {stdout:?}"));
    (status, secs)
}

fn read_json_file(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// 1. nginx reverse proxy, 10 MB each way
// ---------------------------------------------------------------------------------------------

const TRANSFER_SIZE: usize = 10 << 20;

/// Backend behind nginx: `GET /download` sends `argv[2]` random bytes (digest printed at start),
/// `GET /headers` lists the traceparents received, `POST` (Content-Length or chunked) answers the
/// body's length, SHA-256 and the request's traceparents.
const PROXY_BACKEND: &str = r#"
import hashlib, json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SIZE = int(sys.argv[2])
PAYLOAD = os.urandom(SIZE)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def reply_json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def traceparents(self):
        return self.headers.get_all("traceparent") or []

    def do_GET(self):
        if self.path == "/download":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(SIZE))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/headers":
            self.reply_json(200, {"traceparent": self.traceparents()})
        else:
            self.reply_json(404, {"error": "not found", "path": self.path})

    def do_POST(self):
        digest = hashlib.sha256()
        received = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(size)
                digest.update(data)
                received += len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                digest.update(data)
                received += len(data)
                left -= len(data)
        self.reply_json(200, {
            "path": self.path,
            "received_bytes": received,
            "sha256": digest.hexdigest(),
            "traceparent": self.traceparents(),
        })


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("READY", server.server_address[1], DIGEST, flush=True)
server.serve_forever()
"#;

struct ProxyBackend {
    /// Keeps the backend running (terminated on drop).
    _script: ScriptProcess,
    port: u16,
    download_sha256: String,
}

impl ProxyBackend {
    fn start() -> ProxyBackend {
        let dir = TempDir::new("safety-backend");
        dir.write("backend.py", PROXY_BACKEND);
        let args = ["0".to_string(), TRANSFER_SIZE.to_string()];
        let script = ScriptProcess::spawn(python_interpreter(), dir, "backend.py", &args, &[]);
        let line = script.expect_line(START_TIMEOUT);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (port, digest) = match fields.as_slice() {
            ["READY", port, digest] => (port.parse().ok(), digest.to_string()),
            _ => (None, String::new()),
        };
        let port = port.unwrap_or_else(|| {
            panic!("expected \"READY <port> <sha256>\", got {line:?}; stderr:\n{}", script.stderr())
        });
        ProxyBackend { _script: script, port, download_sha256: digest }
    }
}

/// nginx (master + 1 worker) reverse-proxying everything to one backend over kept-alive
/// HTTP/1.1 upstream connections. `/streamed/...` is proxied with `proxy_request_buffering off`
/// (the body streams through); everything else with the default buffering (the body is spooled
/// to a temp file first, then sent upstream).
struct ProxyNginx {
    master: ChildGuard,
    workers: Vec<u32>,
    port: u16,
    dir: TempDir,
}

impl ProxyNginx {
    fn start(backend_port: u16) -> ProxyNginx {
        let dir = TempDir::new("safety-nginx");
        let port = free_port();
        dir.write("nginx.conf", proxy_config(dir.path(), port, backend_port));
        let mut command = Command::new("/usr/sbin/nginx");
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let master = ChildGuard::new(spawn(&mut command, "nginx"), "nginx master");
        let mut nginx = ProxyNginx { master, workers: Vec::new(), port, dir };
        let master_pid = nginx.master.pid();
        let ready = poll_until(START_TIMEOUT, || {
            if let Some(status) = nginx.master.try_exit_status() {
                panic!("nginx exited with {status}; error.log:\n{}", nginx.dir.read("error.log"));
            }
            port_is_open(port) && !children_of(master_pid).is_empty()
        });
        assert!(ready, "nginx not ready within {START_TIMEOUT:?}; error.log:\n{}", nginx.dir.read("error.log"));
        nginx.workers = children_of(master_pid);
        nginx
    }

    fn pids(&self) -> Vec<u32> {
        std::iter::once(self.master.pid()).chain(self.workers.iter().copied()).collect()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn error_log(&self) -> String {
        self.dir.read("error.log")
    }
}

impl Drop for ProxyNginx {
    fn drop(&mut self) {
        terminate(self.master.child_mut(), Duration::from_secs(5));
        for &worker in &self.workers {
            let comm = std::fs::read_to_string(format!("/proc/{worker}/comm")).unwrap_or_default();
            if comm.trim() == "nginx" {
                send_signal(worker, libc::SIGKILL);
            }
        }
    }
}

fn proxy_config(dir: &Path, port: u16, backend_port: u16) -> String {
    let dir = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body_temp;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    default_type application/octet-stream;
    sendfile on;
    client_max_body_size 20m;

    # Upstream keep-alive needs an upstream block with `keepalive`; the short idle timeout makes
    # connections opened before the agent started expire before the traced measurements.
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 8;
        keepalive_timeout 1s;
    }}

    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 20s;
        proxy_send_timeout 20s;

        location /streamed/ {{
            proxy_request_buffering off;
            proxy_pass http://backend/;
        }}
        location / {{
            proxy_pass http://backend;
        }}
    }}
}}
"#
    )
}

/// Timings of the three 10 MB transfers through nginx.
#[derive(Debug, Clone, Copy)]
struct Transfers {
    download: f64,
    upload_buffered: f64,
    upload_streamed: f64,
}

/// Download and both uploads through nginx, asserting every body arrives intact and each
/// proxied request carried `expected_traceparents` traceparents.
/// Both uploads, then the download, through nginx, asserting every body arrives intact and
/// each proxied POST carried `expected_traceparents` traceparents.
fn transfer_through(
    nginx: &ProxyNginx,
    backend: &ProxyBackend,
    work: &TempDir,
    upload: &Path,
    upload_sha: &str,
    expected_traceparents: usize,
    phase: &str,
) -> Transfers {
    let data = format!("@{}", upload.display());
    let upload_extra = ["--data-binary", data.as_str(), "-H", "Content-Type: application/octet-stream"];
    let mut times = Vec::new();
    for path in ["/upload", "/streamed/upload"] {
        let response = work.join(&format!("upload-{phase}.json"));
        let (status, secs) = timed_curl(&nginx.url(path), &response, &upload_extra);
        assert_eq!(status, 200, "{phase} upload {path} status; nginx error.log:\n{}", nginx.error_log());
        let json = read_json_file(&response);
        assert_eq!(json["path"], "/upload", "{phase} {path}: backend saw {json}");
        assert_eq!(json["received_bytes"], TRANSFER_SIZE, "{phase} upload {path}: {json}");
        assert_eq!(json["sha256"], upload_sha, "{phase} upload {path} altered in flight: {json}");
        let seen = traceparents(&json);
        if expected_traceparents == 1 {
            assert_one_traceparent(&seen, &format!("{phase} proxied POST {path}"));
        } else {
            assert_eq!(seen.len(), expected_traceparents, "{phase} proxied POST {path}: {seen:?}");
        }
        times.push(secs);
    }

    let download_path = work.join(&format!("download-{phase}.bin"));
    let (status, download) = timed_curl(&nginx.url("/download"), &download_path, &[]);
    assert_eq!(status, 200, "{phase} download status; nginx error.log:\n{}", nginx.error_log());
    let size = std::fs::metadata(&download_path).map(|m| m.len()).unwrap_or(0);
    assert_eq!(size, TRANSFER_SIZE as u64, "{phase} download truncated or padded");
    assert_eq!(sha256_file(&download_path), backend.download_sha256, "{phase} download altered in flight");
    std::fs::remove_file(&download_path).ok();

    Transfers { download, upload_buffered: times[0], upload_streamed: times[1] }
}

fn proxied_headers(nginx: &ProxyNginx, work: &TempDir) -> Vec<String> {
    let out = work.join("headers.json");
    let (status, _) = timed_curl(&nginx.url("/headers"), &out, &[]);
    assert_eq!(status, 200, "GET /headers through nginx; error.log:\n{}", nginx.error_log());
    traceparents(&read_json_file(&out))
}

#[test]
fn nginx_reverse_proxy_moves_10_mb_each_way_intact_and_without_stalling() {
    if !require_kernel() {
        return;
    }
    let backend = ProxyBackend::start();
    let nginx = ProxyNginx::start(backend.port);
    let work = TempDir::new("safety-transfers");
    let upload = work.write("upload.bin", pseudo_random_bytes(TRANSFER_SIZE, 0x5eed_cafe));
    let upload_sha = sha256_file(&upload);

    // Untraced baseline (also warms nginx, the page cache and the backend).
    assert!(proxied_headers(&nginx, &work).is_empty(), "nothing injects before the agent runs");
    let untraced = transfer_through(&nginx, &backend, &work, &upload, &upload_sha, 0, "untraced");

    // Default (auto) propagation: nginx sizes upstream reads with FIONREAD, so on kernels whose
    // sockmap breaks FIONREAD the agent must keep propagation off, and elsewhere it is on; either
    // way nothing may stall or change.
    let agent = Agent::start(&pid_args(&nginx.pids()), None);
    let propagating = agent.metric_sum("zerotel_propagation_enabled") == 1;
    eprintln!("propagation enabled by the agent's self-test: {propagating}");
    // Let upstream connections nginx opened before the agent attached expire (keepalive_timeout
    // 1s), so every traced request goes over a connection the agent saw being made.
    std::thread::sleep(Duration::from_millis(1500));

    let expected_headers = usize::from(propagating);
    let first = proxied_headers(&nginx, &work);
    assert_eq!(first.len(), expected_headers, "proxied GET /headers before the transfers: {first:?}");
    let traced = transfer_through(&nginx, &backend, &work, &upload, &upload_sha, expected_headers, "traced");
    // The kept-alive upstream connection that just carried 30 MB still works.
    let last = proxied_headers(&nginx, &work);
    assert_eq!(last.len(), expected_headers, "proxied GET /headers after the transfers: {last:?}");

    eprintln!("untraced {untraced:?}\ntraced   {traced:?}");
    for (what, before, after) in [
        ("download", untraced.download, traced.download),
        ("buffered upload", untraced.upload_buffered, traced.upload_buffered),
        ("streamed upload", untraced.upload_streamed, traced.upload_streamed),
    ] {
        assert!(
            after <= 2.0 * before + 1.0,
            "traced 10 MB {what} took {after:.3}s, untraced {before:.3}s (limit 2x + 1s); nginx error.log:\n{}",
            nginx.error_log()
        );
    }
    let log = nginx.error_log();
    assert!(!log.contains("upstream prematurely closed") && !log.contains("[error]"), "nginx reported errors:\n{log}");
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrent epoll clients (Python asyncio, node), keep-alive
// ---------------------------------------------------------------------------------------------

const REQUESTS: usize = 200;
const IN_FLIGHT: usize = 50;
/// `/headers` requests sampled at the end, concurrently (so over several pooled sockets).
const HEADER_SAMPLES: usize = 10;

/// Python asyncio client: aiohttp when importable, else a raw asyncio-streams HTTP/1.1 client
/// with a pool of keep-alive connections. Prints one JSON line.
///
/// PyServer listens with a backlog of 5: 50 simultaneous connects overflow its accept queue
/// (dropped SYNs, multi-second stalls, resets) with or without the agent. So the pool's
/// connections are opened one after another first (warm-up), then the requests run 50 at a time
/// over them.
const ASYNCIO_CLIENT: &str = r#"
import asyncio, json, sys

PORT, N, CONC, SAMPLES = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

try:
    import aiohttp
except ImportError:
    aiohttp = None


def check(i, status, text, failures):
    body = json.loads(text)
    if status == 200 and body.get("id") == str(i) and body.get("name") == f"user {i}":
        return True
    failures.append(f"{i}: {status} {text}")
    return False


async def with_aiohttp():
    conn = aiohttp.TCPConnector(limit=CONC)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def get(path):
            async with session.get(f"http://127.0.0.1:{PORT}{path}") as resp:
                port = resp.connection.transport.get_extra_info("sockname")[1]
                return resp.status, await resp.text(), port

        async def warm_up(failures):
            held = []  # responses not yet read keep their connection busy: the next one is new
            for k in range(CONC):
                held.append((k, await session.get(f"http://127.0.0.1:{PORT}/users/w{k}")))
            for k, resp in held:
                check(f"w{k}", resp.status, await resp.text(), failures)
                resp.release()

        return await run(get, warm_up)


class Conn:
    def __init__(self):
        self.reader = self.writer = None

    async def connect(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", PORT)

    async def get(self, path):
        if self.writer is None:
            await self.connect()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nAccept: */*\r\n\r\n".encode())
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = None
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None:
            raise RuntimeError(f"no Content-Length in response to {path}: {status_line!r}")
        body = await self.reader.readexactly(length)
        return status, body.decode(), self.writer.get_extra_info("sockname")[1]


async def with_streams():
    conns = [Conn() for _ in range(CONC)]
    pool = asyncio.Queue()
    for conn in conns:
        pool.put_nowait(conn)

    async def get(path):
        conn = await pool.get()
        try:
            return await asyncio.wait_for(conn.get(path), 15)
        except BaseException:
            conn.writer = None  # drop a broken connection
            raise
        finally:
            pool.put_nowait(conn)

    async def warm_up(failures):
        for k, conn in enumerate(conns):
            await conn.connect()
            check(f"w{k}", *(await conn.get(f"/users/w{k}"))[:2], failures)

    return await run(get, warm_up)


async def run(get, warm_up):
    ok, failures, ports = 0, [], set()
    await warm_up(failures)
    warm_failures = len(failures)
    ids = iter(range(N))
    in_flight = peak = 0

    async def worker():
        nonlocal ok, in_flight, peak
        for i in ids:
            try:
                in_flight += 1
                peak = max(peak, in_flight)
                status, text, port = await get(f"/users/{i}")
                ports.add(port)
                ok += check(i, status, text, failures)
            except Exception as e:
                failures.append(f"{i}: {type(e).__name__}: {e}")
            finally:
                in_flight -= 1

    await asyncio.gather(*(worker() for _ in range(CONC)))
    samples = []
    for result in await asyncio.gather(*(get("/headers") for _ in range(SAMPLES)), return_exceptions=True):
        if isinstance(result, BaseException):
            failures.append(f"/headers: {type(result).__name__}: {result}")
        else:
            status, text, _ = result
            samples.append({"status": status, "traceparent": json.loads(text)["traceparent"]})
    return {"ok": ok, "failed": len(failures), "warm_up_failed": warm_failures, "failures": failures[:20],
            "connections": len(ports), "peak_in_flight": peak, "headers": samples}


result = asyncio.run(with_aiohttp() if aiohttp else with_streams())
result["impl"] = "aiohttp" if aiohttp else "asyncio-streams"
print(json.dumps(result), flush=True)
"#;

/// node client: http.Agent keep-alive, maxSockets = CONC; the pool's sockets are opened one after
/// another first (see [`ASYNCIO_CLIENT`]), then the requests run 50 at a time. Prints one JSON line.
const NODE_CLIENT: &str = r#"
const http = require('http');
const [PORT, N, CONC, SAMPLES] = process.argv.slice(2).map(Number);
const agent = new http.Agent({ keepAlive: true, maxSockets: CONC });

// Resolves with the response once its head arrived, body not read yet (socket still busy).
function start(path) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port: PORT, path, agent }, (res) => {
      res.pause();
      resolve(res);
    });
    req.on('error', reject);
    req.setTimeout(15000, () => req.destroy(new Error('timeout')));
  });
}

function finish(res) {
  const port = res.socket.localPort;
  return new Promise((resolve, reject) => {
    let body = '';
    res.setEncoding('utf8');
    res.on('data', (chunk) => { body += chunk; });
    res.on('end', () => resolve({ status: res.statusCode, body, port }));
    res.on('error', reject);
    res.resume();
  });
}

const get = async (path) => finish(await start(path));

function check(i, r, failures) {
  const body = JSON.parse(r.body);
  if (r.status === 200 && body.id === String(i) && body.name === 'user ' + i) return true;
  failures.push(`${i}: ${r.status} ${r.body}`);
  return false;
}

async function main() {
  const failures = [], ports = new Set();
  const held = [];
  for (let k = 0; k < CONC; k++) held.push(await start('/users/w' + k));
  for (let k = 0; k < CONC; k++) check('w' + k, await finish(held[k]), failures);
  const warmUpFailed = failures.length;

  let next = 0, ok = 0, inFlight = 0, peak = 0;
  async function worker() {
    while (next < N) {
      const i = next++;
      inFlight++;
      peak = Math.max(peak, inFlight);
      try {
        const r = await get('/users/' + i);
        ports.add(r.port);
        if (check(i, r, failures)) ok++;
      } catch (e) {
        failures.push(`${i}: ${e}`);
      } finally {
        inFlight--;
      }
    }
  }
  await Promise.all(Array.from({ length: CONC }, worker));
  const headers = [];
  const results = await Promise.allSettled(Array.from({ length: SAMPLES }, () => get('/headers')));
  for (const r of results) {
    if (r.status === 'fulfilled') {
      headers.push({ status: r.value.status, traceparent: JSON.parse(r.value.body).traceparent });
    } else {
      failures.push(`/headers: ${r.reason}`);
    }
  }
  agent.destroy();
  console.log(JSON.stringify({ impl: 'node ' + process.version, ok, failed: failures.length,
    warm_up_failed: warmUpFailed, failures: failures.slice(0, 20), connections: ports.size,
    peak_in_flight: peak, headers }));
}

main().catch((e) => { console.error(e); process.exit(1); });
"#;

fn assert_concurrent_run(result: &serde_json::Value) {
    eprintln!(
        "client result: impl={} ok={} failed={} connections={} peak_in_flight={}",
        result["impl"], result["ok"], result["failed"], result["connections"], result["peak_in_flight"]
    );
    assert_eq!(result["failed"], 0, "failed requests: {result}");
    assert_eq!(result["ok"], REQUESTS, "every /users/<n> answered with its own id: {result}");
    let connections = result["connections"].as_u64().unwrap_or(0);
    assert!(connections >= 2 && connections < REQUESTS as u64, "requests spread over kept-alive connections: {result}");
    assert_eq!(result["peak_in_flight"], IN_FLIGHT, "{IN_FLIGHT} requests in flight at once: {result}");
    let samples = result["headers"].as_array().unwrap_or_else(|| panic!("no header samples: {result}"));
    assert_eq!(samples.len(), HEADER_SAMPLES, "every /headers sample answered: {result}");
    for sample in samples {
        assert_eq!(sample["status"], 200, "{result}");
        assert_one_traceparent(
            &traceparents(sample),
            &format!("/headers sample over a used keep-alive connection ({result})"),
        );
    }
}

fn concurrency_args(server: &PyServer) -> Vec<String> {
    [server.port() as usize, REQUESTS, IN_FLIGHT, HEADER_SAMPLES].iter().map(ToString::to_string).collect()
}

#[test]
fn concurrent_python_asyncio_client_keeps_working() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("users.py"); // not traced
    let output = run_traced_script(python_interpreter(), "client.py", ASYNCIO_CLIENT, &concurrency_args(&server));
    assert_concurrent_run(&json_output(&output));
    assert!(server.stderr().trim().is_empty(), "server errors:\n{}", server.stderr());
}

#[test]
fn concurrent_node_client_keeps_working() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("users.py");
    let output = run_traced_script(node_interpreter(), "client.js", NODE_CLIENT, &concurrency_args(&server));
    assert_concurrent_run(&json_output(&output));
    assert!(server.stderr().trim().is_empty(), "server errors:\n{}", server.stderr());
}

// ---------------------------------------------------------------------------------------------
// 3-5. Raw-socket clients: pipelining, a head written in pieces, writev
// ---------------------------------------------------------------------------------------------

/// `python3 raw.py <mode> <port>`: sends requests as `mode` says, reads every response
/// (Content-Length framed) and prints them as one JSON list.
const RAW_CLIENT: &str = r#"
import json, socket, sys, time

mode, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port), timeout=10)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

def request(path):
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n".encode()

if mode == "pipeline":
    paths = ["/headers", "/users/2", "/headers"]
    payload = b"".join(request(p) for p in paths)
    sent = sock.send(payload)  # one send(2) carrying all three requests
    if sent != len(payload):
        sock.sendall(payload[sent:])
    sends = 1 if sent == len(payload) else 2
elif mode == "split":
    paths = ["/headers"]
    pieces = [b"GET /headers HTTP/1.1\r\n", f"Host: 127.0.0.1:{port}\r\n".encode(),
              b"Accept: */*\r\n", b"X-Piece: 4\r\n", b"\r\n"]
    for piece in pieces:
        sock.sendall(piece)
        time.sleep(0.05)
    sends = len(pieces)
elif mode == "writev":
    paths = ["/headers"]
    buffers = [b"GET /headers HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"]
    sent = sock.sendmsg(buffers)  # one sendmsg(2), three iovecs
    if sent != sum(map(len, buffers)):
        raise SystemExit(f"short sendmsg: {sent}")
    sends = 1
else:
    raise SystemExit(f"unknown mode {mode}")

reader = sock.makefile("rb")
responses = []
for path in paths:
    status_line = reader.readline()
    headers = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    responses.append({"path": path, "status_line": status_line.decode("latin-1").strip(),
                      "headers": headers, "body": body.decode("latin-1")})
sock.close()
print(json.dumps({"sends": sends, "responses": responses}), flush=True)
"#;

fn raw_client(mode: &str, server: &PyServer) -> Vec<serde_json::Value> {
    let output =
        run_traced_script(python_interpreter(), "raw.py", RAW_CLIENT, &[mode.to_string(), server.port().to_string()]);
    let result = json_output(&output);
    eprintln!("{mode}: {result}");
    result["responses"].as_array().unwrap_or_else(|| panic!("no responses: {result}")).clone()
}

fn response_body(response: &serde_json::Value) -> serde_json::Value {
    assert_eq!(response["status_line"], "HTTP/1.1 200 OK", "response: {response}");
    let body = response["body"].as_str().unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("incomplete or corrupt response body ({e}): {response}"))
}

#[test]
fn pipelined_requests_in_one_send_all_get_correct_responses() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("pipeline.py");
    let responses = raw_client("pipeline", &server);
    assert_eq!(responses.len(), 3, "three responses: {responses:?}");
    let first = response_body(&responses[0]);
    let second = response_body(&responses[1]);
    let third = response_body(&responses[2]);
    assert_one_traceparent(&traceparents(&first), "first pipelined request (the one the send starts with)");
    assert_eq!(second, serde_json::json!({"id": "2", "name": "user 2"}), "second pipelined request intact");
    // The third request is not where the send starts: the agent leaves it alone (at most one,
    // never a duplicate or a malformed value).
    let third = traceparents(&third);
    assert!(third.len() <= 1 && third.iter().all(|v| is_agent_traceparent(v)), "third pipelined request: {third:?}");
    assert!(server.stderr().trim().is_empty(), "server errors:\n{}", server.stderr());
}

#[test]
fn request_head_written_in_several_sends_is_never_corrupted() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("split.py");
    let responses = raw_client("split", &server);
    assert_eq!(responses.len(), 1, "{responses:?}");
    let body = response_body(&responses[0]);
    // The request line went out alone: the agent cannot see where its headers end, so it leaves
    // the request untouched (a missed header, never a wrong or second one).
    let received = traceparents(&body);
    assert!(received.len() <= 1, "request whose line and headers went out in 5 sends: {received:?}");
    assert!(received.iter().all(|v| is_agent_traceparent(v)), "malformed: {received:?}");
    assert!(server.stderr().trim().is_empty(), "server errors:\n{}", server.stderr());
}

#[test]
fn request_written_with_sendmsg_iovecs_gets_one_traceparent() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("writev.py");
    let responses = raw_client("writev", &server);
    assert_eq!(responses.len(), 1, "{responses:?}");
    let body = response_body(&responses[0]);
    assert_one_traceparent(&traceparents(&body), "request sent as one sendmsg with three iovecs");
    assert!(server.stderr().trim().is_empty(), "server errors:\n{}", server.stderr());
}

// ---------------------------------------------------------------------------------------------
// 6. Expect: 100-continue
// ---------------------------------------------------------------------------------------------

const EXPECT_UPLOAD_SIZE: usize = 2 << 20;

/// A traced `curl -v` POSTing `data` with `Expect: 100-continue`; returns (response JSON, curl stderr).
fn traced_expect_upload(server: &PyServer, data: &[u8]) -> (serde_json::Value, String) {
    let files = TempDir::new("safety-expect");
    let path = files.write("upload.bin", data);
    let expected = sha256_file(&path);
    let upload = format!("@{}", path.display());
    let url = server.url("/upload");
    let client = paused_client(&[
        "curl",
        "-sS",
        "-v",
        "--http1.1",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "-H",
        "Expect: 100-continue",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        upload.as_str(),
        url.as_str(),
    ]);
    let _agent = Agent::start(&propagating_pid_args(&[client.pid()]), None);
    let output = client.release();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "traced curl failed ({}): {stdout}\n{stderr}", output.status);
    let json: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("response is not JSON ({e}): {stdout}\n{stderr}"));
    let size = data.len();
    assert_eq!(json["received_bytes"], size, "{size}-byte body: length: {json}");
    assert_eq!(json["sha256"], expected.as_str(), "{size}-byte body altered in flight: {json}");
    (json, stderr)
}

#[test]
fn expect_100_continue_upload_arrives_intact() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("expect.py");
    let data = pseudo_random_bytes(EXPECT_UPLOAD_SIZE, 0x1000_c0de);
    let (_json, stderr) = traced_expect_upload(&server, &data);
    assert!(stderr.contains("HTTP/1.1 100 Continue"), "the server answered 100 Continue first:\n{stderr}");
}

#[test]
fn expect_100_continue_body_that_starts_like_a_request_is_not_altered() {
    if !require_kernel() {
        return;
    }
    // After 100 Continue the body goes out in its own sends on an HTTP client connection. A body
    // that is itself an HTTP request (a `message/http` payload, a saved request, a batch item)
    // must not get a header inserted into it. Two sizes: a small body goes out in one send, a
    // large one in many (curl writes up to 64 KiB at a time).
    let server = PyServer::start("expect.py");
    let request = b"GET /inner HTTP/1.1\r\nHost: inner.example\r\nAccept: */*\r\n\r\n";
    for (size, seed) in [(8 << 10, 0x3000_c0de), (EXPECT_UPLOAD_SIZE, 0x2000_c0de)] {
        let mut data = request.to_vec();
        data.extend(pseudo_random_bytes(size - data.len(), seed));
        let (_json, stderr) = traced_expect_upload(&server, &data);
        assert!(stderr.contains("HTTP/1.1 100 Continue"), "the server answered 100 Continue first:\n{stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// What the nginx stall comes down to: FIONREAD on a traced client socket
// ---------------------------------------------------------------------------------------------

/// A traced process connects to its own listener (only the connecting side is a client socket
/// the agent takes over), the server side sends 32 KiB, and the client compares
/// `ioctl(FIONREAD)` with what it can then read without blocking. nginx (and others) size their
/// reads by FIONREAD under edge-triggered epoll: a 0 there while bytes are queued means waiting
/// for an edge that never comes.
const FIONREAD_CLIENT: &str = r#"
import fcntl, json, select, socket, struct, termios, threading, time

SIZE = 32 * 1024
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
sent = threading.Event()

def serve():
    conn, _ = srv.accept()
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE + b"x" * SIZE)
    sent.set()
    time.sleep(5)

threading.Thread(target=serve, daemon=True).start()
cli = socket.create_connection(srv.getsockname(), timeout=10)
cli.sendall(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
sent.wait(10)
select.select([cli], [], [], 10)
time.sleep(0.2)  # loopback: everything sent is queued by now
fionread = struct.unpack("i", fcntl.ioctl(cli.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
readable = 0
while True:
    try:
        chunk = cli.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        break
    if not chunk:
        break
    readable += len(chunk)
print(json.dumps({"fionread": fionread, "readable": readable}), flush=True)
"#;

#[test]
fn fionread_on_a_traced_client_socket_counts_the_queued_bytes() {
    if !require_kernel() {
        return;
    }
    // Default (auto) propagation: the agent must not take over sockets where that breaks FIONREAD.
    let output = run_traced_script_with(python_interpreter(), "fionread.py", FIONREAD_CLIENT, &[], pid_args);
    let result = json_output(&output);
    let readable = result["readable"].as_u64().unwrap_or(0);
    assert!(readable > 32 * 1024, "the whole response was queued: {result}");
    assert_eq!(
        result["fionread"], readable,
        "ioctl(FIONREAD) on a traced client socket must report the {readable} queued bytes: {result}"
    );
}
