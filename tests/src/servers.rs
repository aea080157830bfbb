//! Real HTTP servers on free 127.0.0.1 ports, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{children_of, send_signal, spawn, terminate, ChildGuard, ScriptProcess};
use crate::util::{free_port, poll_until, port_is_open, TempDir};

/// How long a server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The distribution's Python, which every user may run.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// The real Python 3 executable behind `python3` on PATH (resolving pyenv
/// shims and symlinks), so the traced pid runs exactly this file.
pub fn python_interpreter() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        resolve_interpreter("python3", &["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
    })
}

/// The real node executable behind `node` on PATH.
pub fn node_interpreter() -> &'static Path {
    static NODE: OnceLock<PathBuf> = OnceLock::new();
    NODE.get_or_init(|| {
        resolve_interpreter("node", &["-e", "console.log(require('fs').realpathSync(process.execPath))"])
    })
}

fn resolve_interpreter(program: &str, args: &[&str]) -> PathBuf {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} to locate its executable: {e}"));
    assert!(output.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// Reads the `READY <port>` line a script server prints once it listens.
fn wait_for_ready_port(script: &ScriptProcess) -> u16 {
    let line = script.expect_line(START_TIMEOUT);
    line.strip_prefix("READY ")
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected \"READY <port>\", got {line:?}; stderr:\n{}", script.stderr()))
}

const PY_SERVER: &str = r#"
import concurrent.futures
import hashlib
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        parts = url.path.split("/")
        if len(parts) == 3 and parts[1] == "users" and parts[2]:
            self.reply(200, {"id": parts[2], "name": "user " + parts[2]})
        elif url.path == "/error":
            self.reply(500, {"error": "internal"})
        elif url.path in ("/chain", "/chain-pooled"):
            self.chain(parse_qs(url.query).get("to", [None])[0], pooled=url.path == "/chain-pooled")
        elif url.path == "/headers":
            self.reply(200, {"traceparent": self.headers.get_all("traceparent") or []})
        elif url.path == "/echo-upgrade":
            self.echo_upgrade()
        else:
            self.reply(404, {"error": "not found"})

    def echo_upgrade(self):
        # A WebSocket-style switch (its accept value holds "h2c" inside a token), then the raw
        # bytes echoed until the client closes.
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", "xh2cPLMBiTxaQ9kYGzzhZRbK+xOo=")
        self.end_headers()
        self.wfile.flush()
        while True:
            data = self.connection.recv(65536)
            if not data:
                break
            self.connection.sendall(data)
        self.close_connection = True

    def chain(self, to, pooled):
        if not to:
            self.reply(400, {"error": "missing ?to="})
            return
        status = POOL.submit(call, to).result() if pooled else call(to)
        self.reply(200, {"downstream_status": status})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.reply(200, {"received_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})


def call(url):
    # The tests' certificates are self-signed.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        error.read()
        return error.code


POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2)
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
if os.environ.get("ZT_TLS_CERT"):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(os.environ["ZT_TLS_CERT"], os.environ["ZT_TLS_KEY"])
    server.socket = tls.wrap_socket(server.socket, server_side=True)
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"#;

/// A Python `ThreadingHTTPServer` (HTTP/1.1, keep-alive). Routes:
/// `/users/<id>` 200 JSON, `/error` 500, `/chain?to=<url>` calls `<url>` from
/// the handling thread then 200, `/chain-pooled?to=<url>` the same from a
/// worker thread of a pool, `/headers` lists the `traceparent` values it
/// received, `/echo-upgrade` switches protocols (`101`, `Upgrade: websocket`)
/// and echoes raw bytes until the client closes, POST echoes the body length
/// and SHA-256, else 404.
pub struct PyServer {
    script: ScriptProcess,
    port: u16,
    scheme: &'static str,
}

impl PyServer {
    /// Starts `python3 <tmp>/<script_name>`, e.g. `backend.py` (service "backend").
    pub fn start(script_name: &str) -> PyServer {
        PyServer::start_with_env(script_name, &[])
    }

    /// Like [`PyServer::start`] with extra environment, e.g. `OTEL_SERVICE_NAME`.
    pub fn start_with_env(script_name: &str, env: &[(&str, &str)]) -> PyServer {
        PyServer::start_in(script_name, env, None)
    }

    /// Like [`PyServer::start_with_env`], executed inside the cgroup v2 directory `cgroup` (a
    /// container's, for Kubernetes tests).
    pub fn start_in(script_name: &str, env: &[(&str, &str)], cgroup: Option<&Path>) -> PyServer {
        let dir = TempDir::new("pyserver");
        dir.write(script_name, PY_SERVER);
        let script = ScriptProcess::spawn_in(python_interpreter(), dir, script_name, &["0".to_string()], env, cgroup);
        let port = wait_for_ready_port(&script);
        let tls = env.iter().any(|(name, _)| *name == "ZT_TLS_CERT");
        PyServer { script, port, scheme: if tls { "https" } else { "http" } }
    }

    /// Like [`PyServer::start_with_env`], as user `uid` and group `gid`, run by the system's
    /// Python (pyenv's lives under /root, which they cannot enter): a service of another user,
    /// whose /proc/PID entries a root agent reads only with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH.
    pub fn start_as_user(script_name: &str, env: &[(&str, &str)], user: (u32, u32)) -> PyServer {
        let dir = TempDir::new("pyserver");
        dir.write(script_name, PY_SERVER);
        let python = Path::new(SYSTEM_PYTHON);
        assert!(python.is_file(), "{SYSTEM_PYTHON} is missing: apt-get install python3");
        let script = ScriptProcess::spawn_as_user(python, dir, script_name, &["0".to_string()], env, user);
        let port = wait_for_ready_port(&script);
        PyServer { script, port, scheme: "http" }
    }

    pub fn pid(&self) -> u32 {
        self.script.pid()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Like [`PyServer::start`], serving HTTPS with `cert` (Python's ssl, that is OpenSSL).
    pub fn start_tls(script_name: &str, cert: &crate::tls::SelfSignedCert) -> PyServer {
        let env = cert.script_env();
        PyServer::start_in(script_name, &env.each_ref().map(|(name, value)| (*name, value.as_str())), None)
    }

    /// `http://127.0.0.1:<port><path>` (`https` when serving TLS)
    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// What the server wrote to stderr (tracebacks).
    pub fn stderr(&self) -> String {
        self.script.stderr()
    }
}

/// The start of node's test scripts: `get(url)` resolves to the status of a GET, on one keep-alive
/// agent per scheme (http, https with the tests' self-signed certificates).
pub(crate) const NODE_GET: &str = r#"
const http = require('http');
const https = require('https');

const agents = { 'http:': new http.Agent({ keepAlive: true }), 'https:': new https.Agent({ keepAlive: true, rejectUnauthorized: false }) };

function get(url) {
  const protocol = new URL(url).protocol;
  const client = protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    client.get(url, { agent: agents[protocol] }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    }).on('error', reject);
  });
}
"#;

/// Follows [`NODE_GET`] (`/chain` calls use its `get`).
const NODE_SERVER: &str = r#"
const fs = require('fs');

function handle(req, res) {
  const url = new URL(req.url, 'http://localhost');
  const path = url.pathname;
  if (path === '/hello') {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': '6' });
    res.end('hello\n');
  } else if (path === '/boom') {
    res.writeHead(500, { 'Content-Type': 'text/plain', 'Content-Length': '5' });
    res.end('boom\n');
  } else if (/^\/items\/\d+$/.test(path)) {
    // No Content-Length: node sends Transfer-Encoding: chunked.
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.write('{"item": ');
    res.write(JSON.stringify(path.split('/')[2]));
    res.end('}\n');
  } else if (path === '/chain' && url.searchParams.get('to')) {
    get(url.searchParams.get('to')).then((status) => {
      const body = JSON.stringify({ downstream_status: status });
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': String(body.length) });
      res.end(body);
    }, (error) => {
      res.writeHead(502, { 'Content-Type': 'text/plain' });
      res.end(String(error));
    });
  } else {
    res.writeHead(404, { 'Content-Type': 'text/plain', 'Content-Length': '10' });
    res.end('not found\n');
  }
}

const server = process.env.ZT_TLS_CERT
  ? https.createServer({ cert: fs.readFileSync(process.env.ZT_TLS_CERT), key: fs.readFileSync(process.env.ZT_TLS_KEY) }, handle)
  : http.createServer(handle);
server.listen(Number(process.argv[2]), '127.0.0.1', () => {
  console.log('READY ' + server.address().port);
});
"#;

/// A node `http.createServer` (`server.js`), or `https.createServer` ([`NodeServer::start_tls`]):
/// `/hello` 200, `/boom` 500, `/items/<n>` 200 chunked (two writes then end), `/chain?to=<url>`
/// calls `<url>` (keep-alive) then 200, else 404.
pub struct NodeServer(NodeScript);

impl NodeServer {
    pub fn start() -> NodeServer {
        NodeServer(NodeScript::start("server.js", &[NODE_GET, NODE_SERVER].concat(), None))
    }

    /// HTTPS with `cert` (node's own OpenSSL, inside the node binary).
    pub fn start_tls(cert: &crate::tls::SelfSignedCert) -> NodeServer {
        NodeServer(NodeScript::start("server.js", &[NODE_GET, NODE_SERVER].concat(), Some(cert)))
    }

    pub fn pid(&self) -> u32 {
        self.0.script.pid()
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.0.origin())
    }
}

/// A node script that prints `READY <port>` once it listens on a free port: plaintext, or with
/// the tests' certificate in its environment.
struct NodeScript {
    script: ScriptProcess,
    port: u16,
    scheme: &'static str,
}

impl NodeScript {
    fn start(file: &str, text: &str, cert: Option<&crate::tls::SelfSignedCert>) -> NodeScript {
        let dir = TempDir::new("node");
        dir.write(file, text);
        let env = cert.map(crate::tls::SelfSignedCert::script_env);
        let env: Vec<(&str, &str)> = env.iter().flatten().map(|(name, value)| (*name, value.as_str())).collect();
        let script = ScriptProcess::spawn(node_interpreter(), dir, file, &["0".to_string()], &env);
        let port = wait_for_ready_port(&script);
        NodeScript { script, port, scheme: if cert.is_some() { "https" } else { "http" } }
    }

    /// `scheme://127.0.0.1:port`.
    fn origin(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }
}

const NODE_GRPC_SERVER: &str = r#"
const fs = require('fs');
const http2 = require('http2');

// Unary gRPC on node's own HTTP/2 (the transport grpc-js runs on): one length-prefixed message
// back, then `grpc-status` in trailers: 5 (NOT_FOUND) for a method named Fail, else 0.
function handle(stream, headers) {
  stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
  stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': headers[':path'].endsWith('/Fail') ? '5' : '0' }));
  stream.resume();
  stream.end(Buffer.from([0, 0, 0, 0, 2, 8, 1]));
}

const server = process.env.ZT_TLS_CERT
  ? http2.createSecureServer({ cert: fs.readFileSync(process.env.ZT_TLS_CERT), key: fs.readFileSync(process.env.ZT_TLS_KEY) })
  : http2.createServer();
server.on('stream', handle);
server.listen(Number(process.argv[2]), '127.0.0.1', () => {
  console.log('READY ' + server.address().port);
});
"#;

/// Unary gRPC answered by node's `http2` module (`grpc_server.js`), h2c with prior knowledge or,
/// [`NodeGrpcServer::start_tls`], over TLS (ALPN h2): any method answers one message and status
/// 0, a method named `Fail` status 5 (NOT_FOUND).
pub struct NodeGrpcServer(NodeScript);

impl NodeGrpcServer {
    pub fn start() -> NodeGrpcServer {
        NodeGrpcServer(NodeScript::start("grpc_server.js", NODE_GRPC_SERVER, None))
    }

    pub fn start_tls(cert: &crate::tls::SelfSignedCert) -> NodeGrpcServer {
        NodeGrpcServer(NodeScript::start("grpc_server.js", NODE_GRPC_SERVER, Some(cert)))
    }

    pub fn pid(&self) -> u32 {
        self.0.script.pid()
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// The URL node's `http2.connect` takes.
    pub fn authority(&self) -> String {
        self.0.origin()
    }
}

/// Size of nginx's `/static/file.bin`.
pub const NGINX_STATIC_FILE_SIZE: usize = 64 * 1024;

/// nginx (master + 1 worker, sendfile on): `/ok` 200 "ok\n",
/// `/static/file.bin` 64 KiB, `/fail` 503.
pub struct Nginx {
    // Field order matters: the master is stopped before the dir is removed.
    master: ChildGuard,
    workers: Vec<u32>,
    port: u16,
    scheme: &'static str,
    dir: TempDir,
}

impl Nginx {
    pub fn start() -> Nginx {
        Nginx::start_with(None)
    }

    /// The same server over HTTPS with `cert` (nginx's OpenSSL: the system libssl).
    pub fn start_tls(cert: &crate::tls::SelfSignedCert) -> Nginx {
        Nginx::start_with(Some(cert))
    }

    fn start_with(cert: Option<&crate::tls::SelfSignedCert>) -> Nginx {
        let dir = TempDir::new("nginx");
        let port = free_port();
        write_nginx_files(&dir, port, cert);
        let mut command = Command::new("nginx");
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
        let scheme = if cert.is_some() { "https" } else { "http" };
        let mut nginx = Nginx { master, workers: Vec::new(), port, scheme, dir };
        nginx.wait_until_ready();
        nginx
    }

    fn wait_until_ready(&mut self) {
        let master_pid = self.master.pid();
        let ready = poll_until(START_TIMEOUT, || {
            if let Some(status) = self.master.try_exit_status() {
                panic!("nginx exited with {status}; error.log:\n{}", self.dir.read("error.log"));
            }
            port_is_open(self.port) && !children_of(master_pid).is_empty()
        });
        assert!(ready, "nginx not ready within {START_TIMEOUT:?}; error.log:\n{}", self.dir.read("error.log"));
        self.workers = children_of(master_pid);
    }

    /// The master pid followed by the worker pids.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.master.pid()).chain(self.workers.iter().copied()).collect()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        self.dir.read("error.log")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM makes the master stop its workers; kill any it left behind.
        terminate(self.master.child_mut(), Duration::from_secs(5));
        for &worker in &self.workers {
            if is_nginx_process(worker) {
                send_signal(worker, libc::SIGKILL);
            }
        }
    }
}

fn is_nginx_process(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "nginx")
}

fn write_nginx_files(dir: &TempDir, port: u16, cert: Option<&crate::tls::SelfSignedCert>) {
    let static_dir = dir.join("static");
    std::fs::create_dir(&static_dir).unwrap_or_else(|e| panic!("create {}: {e}", static_dir.display()));
    let content: Vec<u8> = (0..NGINX_STATIC_FILE_SIZE).map(|i| b'a' + (i % 26) as u8).collect();
    dir.write("static/file.bin", content);
    dir.write("nginx.conf", nginx_config(dir.path(), port, cert));
}

fn nginx_config(dir: &Path, port: u16, cert: Option<&crate::tls::SelfSignedCert>) -> String {
    let dir = dir.display();
    let tls = cert.map_or(String::new(), |cert| {
        format!(" ssl;\n        ssl_certificate {};\n        ssl_certificate_key {}", cert.cert().display(), cert.key().display())
    });
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body_temp;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 60s;

    server {{
        listen 127.0.0.1:{port}{tls};
        location = /ok {{
            default_type text/plain;
            return 200 "ok\n";
        }}
        location /static/ {{
            alias {dir}/static/;
        }}
        location = /fail {{
            return 503;
        }}
    }}
}}
"#
    )
}
