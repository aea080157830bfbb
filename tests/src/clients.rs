//! HTTP clients: paused processes (so their pid can be traced before they
//! run), curl helpers, a Python urllib client and a keep-alive client.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{ChildStdin, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::process::{collect_pipe, spawn, terminate, wait_with_timeout, ChildGuard, ScriptProcess};
use crate::servers::{node_interpreter, python_interpreter, NODE_GET};
use crate::util::{poll_until, TempDir};

/// How long a released client may run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A `sh` waiting for a line on stdin before it `exec`s the real command, so
/// the pid (which the command keeps) can be given to the agent first.
pub struct PausedClient {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    _files: Option<TempDir>,
}

/// Spawns `sh -c 'read _; exec "$@"' sh cmd...`, paused until [`PausedClient::release`].
pub fn paused_client<S: AsRef<OsStr>>(cmd: &[S]) -> PausedClient {
    paused_client_with_files(cmd, None)
}

fn paused_client_with_files<S: AsRef<OsStr>>(cmd: &[S], files: Option<TempDir>) -> PausedClient {
    assert!(!cmd.is_empty(), "paused_client needs a command");
    let mut command = Command::new("sh");
    command
        .args(["-c", "read _; exec \"$@\"", "sh"])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(&mut command, "paused client");
    let stdin = child.stdin.take();
    let stdout = Some(collect_pipe(child.stdout.take().expect("piped stdout")));
    let stderr = Some(collect_pipe(child.stderr.take().expect("piped stderr")));
    let client = PausedClient { child: ChildGuard::new(child, "paused client"), stdin, stdout, stderr, _files: files };
    client.wait_until_paused();
    client
}

impl PausedClient {
    /// The pid the command will run under.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Waits until the forked child has exec'd `sh` (so the pid handed to the
    /// agent no longer runs the test binary).
    fn wait_until_paused(&self) {
        let comm_path = format!("/proc/{}/comm", self.pid());
        let is_sh = || std::fs::read_to_string(&comm_path).is_ok_and(|comm| comm.trim() == "sh");
        assert!(poll_until(Duration::from_secs(5), is_sh), "paused client {} did not exec sh", self.pid());
    }

    /// Lets the command run and waits up to [`CLIENT_TIMEOUT`] for it.
    pub fn release(mut self) -> Output {
        let mut stdin = self.stdin.take().expect("client already released");
        stdin.write_all(b"\n").expect("write to paused client's stdin");
        drop(stdin);
        let status = wait_with_timeout(self.child.child_mut(), CLIENT_TIMEOUT);
        if status.is_none() {
            terminate(self.child.child_mut(), Duration::from_secs(2));
        }
        let stdout = self.stdout.take().expect("stdout reader").join().expect("stdout reader thread");
        let stderr = self.stderr.take().expect("stderr reader").join().expect("stderr reader thread");
        let Some(status) = status else {
            panic!("client did not finish within {CLIENT_TIMEOUT:?}; stdout:\n{stdout}\nstderr:\n{stderr}");
        };
        Output { status, stdout: stdout.into_bytes(), stderr: stderr.into_bytes() }
    }
}

/// What curl reports for one URL via `-w`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurlResult {
    pub status: u16,
    pub time_total: Duration,
    /// New connections made for this URL (0 = reused a kept-alive one).
    pub num_connects: u32,
}

const CURL_WRITE_OUT: &str = "%{http_code} %{time_total} %{num_connects}\n";

/// curl command line (including `curl`) fetching `url`, body discarded, one
/// `-w` line of `%{http_code} %{time_total} %{num_connects}`.
pub fn curl_args(url: &str, extra: &[&str]) -> Vec<String> {
    curl_args_many(&[url], extra)
}

/// Like [`curl_args`] for several URLs, fetched in order on one reused connection.
pub fn curl_args_many(urls: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        ["curl", "-sS", "--http1.1", "--noproxy", "*", "--max-time", "10", "-w", CURL_WRITE_OUT]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    for url in urls {
        args.extend(["-o".to_string(), "/dev/null".to_string(), url.to_string()]);
    }
    args
}

/// Runs a curl command line (from [`curl_args`]) untraced and parses its `-w` lines.
pub fn run_curl(args: &[String]) -> Vec<CurlResult> {
    let output = Command::new(&args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_curl_output(&output)
}

/// Fetches `url` with an untraced curl.
pub fn curl(url: &str, extra: &[&str]) -> CurlResult {
    let results = run_curl(&curl_args(url, extra));
    assert_eq!(results.len(), 1, "one -w line expected for {url}: {results:?}");
    results[0]
}

/// Parses the `-w` lines of a finished curl; panics if curl failed.
pub fn parse_curl_output(output: &Output) -> Vec<CurlResult> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "curl failed ({}): stdout {stdout:?}, stderr {stderr:?}", output.status);
    stdout
        .lines()
        .map(|line| parse_curl_line(line).unwrap_or_else(|| panic!("bad curl -w line {line:?}; stderr {stderr:?}")))
        .collect()
}

fn parse_curl_line(line: &str) -> Option<CurlResult> {
    let mut fields = line.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let seconds: f64 = fields.next()?.parse().ok()?;
    let num_connects = fields.next()?.parse().ok()?;
    Some(CurlResult { status, time_total: Duration::from_secs_f64(seconds), num_connects })
}

const URLLIB_CLIENT: &str = r#"
import json
import ssl
import sys
import time
import urllib.error
import urllib.request

# The tests' certificates are self-signed.
context = ssl._create_unverified_context() if sys.argv[1].startswith("https:") else None
start = time.monotonic_ns()
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10, context=context) as response:
        response.read()
        status = response.status
except urllib.error.HTTPError as error:
    error.read()
    status = error.code
elapsed_ns = time.monotonic_ns() - start
print(json.dumps({"status": status, "elapsed_ns": elapsed_ns}), flush=True)
"#;

/// A paused `python3 client.py <url>` doing one urllib GET; it prints
/// `{"status": .., "elapsed_ns": ..}` measured around `urlopen` + read.
pub fn paused_urllib_client(url: &str) -> PausedClient {
    let files = TempDir::new("urllib-client");
    let script = files.write("client.py", URLLIB_CLIENT);
    let cmd = [python_interpreter().as_os_str(), script.as_os_str(), OsStr::new(url)];
    paused_client_with_files(&cmd, Some(files))
}

/// Follows [`NODE_GET`].
const NODE_CLIENT: &str = r#"
(async () => {
  const parallel = process.argv[2] === '--parallel';
  const urls = process.argv.slice(parallel ? 3 : 2);
  if (parallel) {
    (await Promise.all(urls.map(get))).forEach((status) => console.log(status));
  } else {
    for (const url of urls) {
      console.log(await get(url));
    }
  }
  Object.values(agents).forEach((agent) => agent.destroy());
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
"#;

/// A paused `node client.js [--parallel] <url>...`: GETs each URL in turn (or all at once, each on
/// a connection of its own) on keep-alive connections (http or https, node's own OpenSSL) and
/// prints each status on a line of its own.
pub fn paused_node_client(urls: &[&str], parallel: bool) -> PausedClient {
    let files = TempDir::new("node-client");
    let script = files.write("client.js", [NODE_GET, NODE_CLIENT].concat());
    let mut cmd = vec![node_interpreter().as_os_str(), script.as_os_str()];
    if parallel {
        cmd.push(OsStr::new("--parallel"));
    }
    cmd.extend(urls.iter().map(OsStr::new));
    paused_client_with_files(&cmd, Some(files))
}

const NODE_GRPC_CLIENT: &str = r#"
const http2 = require('http2');

// Unary gRPC calls in turn on one HTTP/2 connection (node's own http2, as grpc-js); prints each
// call's grpc-status. The tests' certificates are self-signed.
const session = http2.connect(process.argv[2], { rejectUnauthorized: false });

function call(path) {
  return new Promise((resolve, reject) => {
    const req = session.request({ ':method': 'POST', ':path': path, 'content-type': 'application/grpc', 'te': 'trailers' });
    let status = 'none';
    req.on('trailers', (trailers) => { status = trailers['grpc-status']; });
    req.on('error', reject);
    req.resume();
    req.on('end', () => resolve(status));
    req.end(Buffer.from([0, 0, 0, 0, 2, 8, 1]));
  });
}

(async () => {
  for (const path of process.argv.slice(3)) {
    console.log(await call(path));
  }
  session.close();
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
"#;

/// A paused `node grpc_client.js <authority> <path>...`: unary gRPC calls to each path in turn on
/// one HTTP/2 connection (h2c for `http://`, TLS for `https://`), each `grpc-status` on a line.
pub fn paused_node_grpc_client(authority: &str, paths: &[&str]) -> PausedClient {
    let files = TempDir::new("node-grpc-client");
    let script = files.write("grpc_client.js", NODE_GRPC_CLIENT);
    let mut cmd = vec![node_interpreter().as_os_str(), script.as_os_str(), OsStr::new(authority)];
    cmd.extend(paths.iter().map(OsStr::new));
    paused_client_with_files(&cmd, Some(files))
}

const ASYNCIO_CLIENT: &str = r#"
import asyncio
import ssl
import sys
from urllib.parse import urlsplit


async def main(urls):
    # asyncio's TLS runs OpenSSL on memory BIOs: the event loop moves the ciphertext itself.
    first = urlsplit(urls[0])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the tests' certificates are self-signed
    reader, writer = await asyncio.open_connection(first.hostname, first.port, ssl=context)
    for url in urls:
        path = urlsplit(url).path
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {first.netloc}\r\n\r\n".encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.lower().startswith("content-length:"))
        await reader.readexactly(length)
        print(head.split(" ", 2)[1], flush=True)
    writer.close()
    await writer.wait_closed()


asyncio.run(main(sys.argv[1:]))
"#;

/// A paused `python3 asyncio_client.py <url>...`: GETs each path in turn on one keep-alive HTTPS
/// connection to the first URL's host (asyncio streams: OpenSSL on memory BIOs), printing each
/// status. The server must answer with `Content-Length`.
pub fn paused_asyncio_client(urls: &[&str]) -> PausedClient {
    let files = TempDir::new("asyncio-client");
    let script = files.write("asyncio_client.py", ASYNCIO_CLIENT);
    let mut cmd = vec![python_interpreter().as_os_str(), script.as_os_str()];
    cmd.extend(urls.iter().map(OsStr::new));
    paused_client_with_files(&cmd, Some(files))
}

/// Result line of the urllib client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrllibResult {
    pub status: u16,
    pub elapsed_ns: u64,
}

/// Parses the urllib client's output; panics if it failed.
pub fn parse_urllib_output(output: &Output) -> UrllibResult {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "urllib client failed ({}): {stderr}", output.status);
    let json: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("urllib client output {stdout:?}: {e}"));
    let field = |key: &str| json[key].as_u64().unwrap_or_else(|| panic!("no integer {key:?} in {json}"));
    UrllibResult { status: u16::try_from(field("status")).expect("status fits u16"), elapsed_ns: field("elapsed_ns") }
}

const KEEP_ALIVE_CLIENT: &str = r#"
import http.client
import json
import sys

connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)


def get(path):
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    sock = connection.sock
    local_port = sock.getsockname()[1] if sock else None
    print(json.dumps({"status": response.status, "local_port": local_port}), flush=True)


get(sys.argv[2])
for path in sys.argv[3:]:
    sys.stdin.readline()
    get(path)
"#;

/// One response on a [`KeepAliveClient`]'s connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAliveResponse {
    pub status: u16,
    /// Local port of the connection after the response (None if it was closed).
    pub local_port: Option<u16>,
}

/// A Python `http.client` connection: one GET right away, each next GET on the same connection
/// when asked.
pub struct KeepAliveClient {
    script: ScriptProcess,
}

impl KeepAliveClient {
    /// Connects to 127.0.0.1:`port`, GETs `first_path`, and returns its response.
    pub fn connect(port: u16, first_path: &str, second_path: &str) -> (KeepAliveClient, KeepAliveResponse) {
        KeepAliveClient::connect_for(port, &[first_path, second_path])
    }

    /// Connects to 127.0.0.1:`port`, GETs `paths[0]`, and returns its response; the other paths
    /// are sent in order by [`KeepAliveClient::send_next`].
    pub fn connect_for(port: u16, paths: &[&str]) -> (KeepAliveClient, KeepAliveResponse) {
        let dir = TempDir::new("keepalive-client");
        dir.write("keepalive.py", KEEP_ALIVE_CLIENT);
        let args: Vec<String> = std::iter::once(port.to_string()).chain(paths.iter().map(|p| p.to_string())).collect();
        let script = ScriptProcess::spawn(python_interpreter(), dir, "keepalive.py", &args, &[]);
        let client = KeepAliveClient { script };
        let first = client.read_response();
        (client, first)
    }

    /// Sends the second GET on the same connection and returns its response.
    pub fn send_second(&mut self) -> KeepAliveResponse {
        self.send_next()
    }

    /// Sends the next GET on the same connection and returns its response.
    pub fn send_next(&mut self) -> KeepAliveResponse {
        self.script.send_line("go");
        self.read_response()
    }

    pub fn pid(&self) -> u32 {
        self.script.pid()
    }

    fn read_response(&self) -> KeepAliveResponse {
        let line = self.script.expect_line(CLIENT_TIMEOUT);
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("keep-alive client output {line:?}: {e}"));
        let status = json["status"].as_u64().and_then(|s| u16::try_from(s).ok());
        let local_port = json["local_port"].as_u64().and_then(|p| u16::try_from(p).ok());
        KeepAliveResponse { status: status.unwrap_or_else(|| panic!("no status in {line}")), local_port }
    }
}
