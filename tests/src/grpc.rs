//! gRPC and plain HTTP/2 (h2c) peers to trace: the service `demo.Echo` on grpcio (Python) and on
//! grpc-go 1.33 (Debian's golang-google-grpc-dev, built once per test process in GOPATH mode),
//! clients of it on both that run paused (traced from their first byte), nghttpd with curl,
//! nghttp and h2load as clients, and a chain curl -> HTTP/1 service -> Go gRPC -> Python gRPC.
//!
//! No generated code and no protoc: both runtimes pass messages through as raw bytes (grpcio
//! generic handlers without (de)serializers; a grpc-go codec registered as "proto"), so the
//! wire form is that of real services: `content-type: application/grpc`, the usual 5-byte
//! message prefix, HEADERS/DATA/trailers. The sources are in `tests/grpc/`:
//! `echo_server.py`, `echo_client.py`, `http_front.py` and `echo.go` (server and client).
//!
//! `demo.Echo` (same behaviour on both runtimes; directives are `key=value&...` payloads):
//! - `Unary` echoes its request (after calling the downstream, if the server has one);
//! - `ServerStream` `count=N[&status=S]`: N replies "reply <i>", then status S in trailers;
//! - `ClientStream` reads every request, then one reply `{"messages": n, "bytes": m}`;
//! - `BidiStream` echoes each request as it arrives (the clients wait for each echo);
//! - `Fail` `status=N[&message=M][&sleep_ms=T]`: status N in a trailers-only response (one
//!   HEADERS frame with END_STREAM), an empty reply for 0;
//! - any other method: UNIMPLEMENTED, trailers-only.
//!
//! Every RPC first sleeps for its `delay-ms` metadata (to overlap concurrent calls). Servers
//! log each finished RPC (method, `traceparent` metadata, peer, final code): see
//! [`GrpcServer::received`]; with [`ServerOptions::echo_metadata`] the `traceparent` values
//! that arrived also come back as `echo-traceparent` trailing metadata.
//!
//! Nothing here connects before its first request: servers print `READY <port>` once they
//! listen (no probe connection), and the processes that call downstream (gRPC servers with a
//! downstream, the HTTP/1 front) open their channel on the first call. Servers can therefore be
//! started before the agent, which then sees every connection from its first byte (the HPACK
//! dynamic tables included). nghttpd is the exception: its readiness is probed with one TCP
//! connect that sends nothing.
//!
//! HPACK, as seen on the wire (client -> server HEADERS), for a `traceparent` header:
//! - grpcio (C core): literal *without* indexing, new name, raw (no Huffman) name and value,
//!   on every call, even when the value repeats;
//! - grpc-go 1.33 (x/net/http2/hpack): literal *with incremental indexing*, new name, Huffman
//!   name and value (55 -> 39 bytes); the same value again is one indexed byte (dynamic index
//!   62), a new value is incremental indexing with the indexed name and a Huffman value;
//! - curl, nghttp and h2load (nghttp2's deflater): as grpc-go: incremental indexing with a
//!   Huffman name and value, then indexed while it repeats.
//!
//! And in the other direction: from the second response on a connection, both servers send
//! `grpc-status: 0` as one indexed byte (dynamic table), `content-type` too, and `:path` is
//! indexed in requests from the second call: the status and method of a call can only be read
//! with the connection's HPACK tables followed from its first byte. Both servers answer `Fail`
//! and unknown methods trailers-only (`:status`, `content-type`, `grpc-status`, `grpc-message`
//! in one HEADERS frame with END_STREAM); grpcio adds `grpc-accept-encoding` to the response
//! headers, grpc-go does not.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value as Json};

use crate::clients::{paused_client, CurlResult, PausedClient};
use crate::process::{spawn, ChildGuard, LineReader};
use crate::servers::{python_interpreter, START_TIMEOUT};
use crate::util::{free_port, poll_until, port_is_open, TempDir};

/// The service every server here implements.
pub const SERVICE: &str = "demo.Echo";

const GO_SOURCE: &str = include_str!("../grpc/echo.go");
const PY_SERVER: &str = include_str!("../grpc/echo_server.py");
const PY_CLIENT: &str = include_str!("../grpc/echo_client.py");
const HTTP_FRONT: &str = include_str!("../grpc/http_front.py");

const INSTALL_HINT: &str = "run `cargo xtask setup`, or `python3 -m pip install grpcio` and \
                            `apt-get install golang-go golang-google-grpc-dev nghttp2-client nghttp2-server curl`";

/// How long to wait for a server to log the requests it finished.
const LOG_TIMEOUT: Duration = Duration::from_secs(30);

// ---- status codes ----

/// A gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    pub fn value(self) -> i64 {
        self as i64
    }

    pub fn from_value(value: i64) -> Option<Code> {
        Code::ALL.into_iter().find(|code| code.value() == value)
    }

    /// Whether a SERVER span with this status is an error (OpenTelemetry's gRPC conventions):
    /// UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. A CLIENT
    /// span is an error for every code but OK.
    pub fn is_server_error(self) -> bool {
        matches!(
            self,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        )
    }
}

// ---- calls ----

/// One request message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Text(String),
    /// This many bytes of "abc...zabc..." (generated by the client: argv cannot hold MiBs).
    Filler(usize),
}

impl Payload {
    pub fn text(text: &str) -> Payload {
        Payload::Text(text.to_string())
    }

    pub fn len(&self) -> usize {
        match self {
            Payload::Text(text) => text.len(),
            Payload::Filler(size) => *size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn to_json(&self) -> Json {
        match self {
            Payload::Text(text) => json!({ "text": text }),
            Payload::Filler(size) => json!({ "size": size }),
        }
    }
}

/// The shape of a call: how many messages go each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

impl CallKind {
    fn name(self) -> &'static str {
        match self {
            CallKind::Unary => "unary",
            CallKind::ServerStream => "server_stream",
            CallKind::ClientStream => "client_stream",
            CallKind::Bidi => "bidi",
        }
    }
}

/// One RPC a client makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    pub service: String,
    pub method: String,
    pub kind: CallKind,
    pub messages: Vec<Payload>,
    /// Request metadata, in order (keys lowercase).
    pub metadata: Vec<(String, String)>,
    /// The call's deadline (sent as `grpc-timeout`).
    pub timeout: Option<Duration>,
}

impl GrpcCall {
    fn new(method: &str, kind: CallKind, messages: Vec<Payload>) -> GrpcCall {
        GrpcCall {
            service: SERVICE.to_string(),
            method: method.to_string(),
            kind,
            messages,
            metadata: Vec::new(),
            timeout: None,
        }
    }

    /// `Unary`: the reply is the request.
    pub fn unary(payload: Payload) -> GrpcCall {
        GrpcCall::new("Unary", CallKind::Unary, vec![payload])
    }

    /// `ServerStream`: `replies` replies, then OK.
    pub fn server_stream(replies: usize) -> GrpcCall {
        GrpcCall::new("ServerStream", CallKind::ServerStream, vec![Payload::Text(format!("count={replies}"))])
    }

    /// `ServerStream`: `replies` replies, then `code` in the trailers (not trailers-only when
    /// `replies` > 0).
    pub fn server_stream_failing(replies: usize, code: Code) -> GrpcCall {
        let directives = format!("count={replies}&status={}", code.value());
        GrpcCall::new("ServerStream", CallKind::ServerStream, vec![Payload::Text(directives)])
    }

    /// `ClientStream`: `messages`, then one reply.
    pub fn client_stream(messages: Vec<Payload>) -> GrpcCall {
        GrpcCall::new("ClientStream", CallKind::ClientStream, messages)
    }

    /// `BidiStream`: each message is echoed before the next is sent.
    pub fn bidi(messages: Vec<Payload>) -> GrpcCall {
        GrpcCall::new("BidiStream", CallKind::Bidi, messages)
    }

    /// `Fail`: the server answers `code` (trailers-only), with the message "failed with status N".
    pub fn fail(code: Code) -> GrpcCall {
        GrpcCall::new("Fail", CallKind::Unary, vec![Payload::Text(format!("status={}", code.value()))])
    }

    /// `Fail` with status OK after `sleep` in the handler: with a shorter [`GrpcCall::with_timeout`]
    /// the client gives up with DEADLINE_EXCEEDED (and sends RST_STREAM), no status is sent.
    pub fn slow(sleep: Duration) -> GrpcCall {
        let directives = format!("status=0&sleep_ms={}", sleep.as_millis());
        GrpcCall::new("Fail", CallKind::Unary, vec![Payload::Text(directives)])
    }

    /// A unary call of `demo.Echo/<method>`, which the servers do not implement: UNIMPLEMENTED.
    pub fn unimplemented(method: &str) -> GrpcCall {
        GrpcCall::new(method, CallKind::Unary, vec![Payload::text("x")])
    }

    pub fn with_metadata(mut self, key: &str, value: &str) -> GrpcCall {
        self.metadata.push((key.to_string(), value.to_string()));
        self
    }

    pub fn with_traceparent(self, traceparent: &str) -> GrpcCall {
        self.with_metadata("traceparent", traceparent)
    }

    /// The server handler sleeps this long first (`delay-ms` metadata).
    pub fn delayed(self, delay: Duration) -> GrpcCall {
        let millis = delay.as_millis().to_string();
        self.with_metadata("delay-ms", &millis)
    }

    pub fn with_timeout(mut self, timeout: Duration) -> GrpcCall {
        self.timeout = Some(timeout);
        self
    }

    /// `/demo.Echo/Unary`: the HTTP/2 `:path`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.method)
    }

    /// `demo.Echo/Unary`: the span name the agent gives the call.
    pub fn span_name(&self) -> String {
        format!("{}/{}", self.service, self.method)
    }

    fn to_json(&self) -> Json {
        json!({
            "service": self.service,
            "method": self.method,
            "kind": self.kind.name(),
            "messages": self.messages.iter().map(Payload::to_json).collect::<Vec<_>>(),
            "metadata": self.metadata.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>(),
            "timeout_ms": self.timeout.map(|t| t.as_millis() as u64),
        })
    }
}

/// Whether a client makes its calls one after the other or all at once. Either way every call
/// goes over one channel, i.e. one HTTP/2 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    Sequential,
    /// All calls start together (threads or goroutines behind a barrier): multiplexed streams.
    /// Add [`GrpcCall::delayed`] to make them overlap for sure.
    Concurrent,
}

/// What a client reports for one call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallResult {
    /// Index of the call in the list given to the client.
    pub call: usize,
    /// The status the client saw (its own DEADLINE_EXCEEDED included).
    pub code: i64,
    pub details: String,
    /// Number of reply messages.
    pub replies: usize,
    pub reply_bytes: usize,
    /// Whether the replies, concatenated, equal the requests, concatenated.
    pub echoed: bool,
    /// The first reply when it is short text.
    pub first_reply: Option<String>,
    /// The `echo-traceparent` trailing metadata (servers with [`ServerOptions::echo_metadata`]).
    pub echo_traceparent: Vec<String>,
    pub elapsed: Duration,
}

impl CallResult {
    pub fn code(&self) -> Option<Code> {
        Code::from_value(self.code)
    }
}

/// The result lines of a client's stdout, sorted by call index.
pub fn parse_call_results(stdout: &str) -> Vec<CallResult> {
    let mut results: Vec<CallResult> = json_lines(stdout, "gRPC client").iter().map(call_result).collect();
    results.sort_by_key(|result| result.call);
    results
}

fn call_result(json: &Json) -> CallResult {
    let int = |key: &str| json[key].as_u64().unwrap_or_else(|| panic!("no integer {key:?} in {json}"));
    CallResult {
        call: int("call") as usize,
        code: int("code") as i64,
        details: json["details"].as_str().unwrap_or_default().to_string(),
        replies: int("replies") as usize,
        reply_bytes: int("reply_bytes") as usize,
        echoed: json["echoed"].as_bool().unwrap_or(false),
        first_reply: json["first_reply"].as_str().map(String::from),
        echo_traceparent: strings(&json["echo_traceparent"]),
        elapsed: Duration::from_secs_f64(json["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0),
    }
}

fn strings(json: &Json) -> Vec<String> {
    json.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect()
}

fn json_lines(stdout: &str, what: &str) -> Vec<Json> {
    let parse = |line: &str| serde_json::from_str(line).unwrap_or_else(|e| panic!("{what} line {line:?}: {e}"));
    stdout.lines().filter(|line| !line.trim().is_empty()).map(parse).collect()
}

// ---- runtimes ----

/// A gRPC implementation, for servers and clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// grpcio (gRPC C core) on the machine's python3.
    Python,
    /// grpc-go 1.33 on Go 1.19.
    Go,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::Python, Runtime::Go];

    /// Starts a `demo.Echo` server on a free 127.0.0.1 port, untraced.
    pub fn server(self, options: &ServerOptions) -> GrpcServer {
        GrpcServer::start(self, options)
    }

    /// A paused client (its pid can be given to the agent before it runs) making `calls` to
    /// `target` (`127.0.0.1:<port>`) on one channel, printing one [`CallResult`] per call.
    pub fn client(self, target: &str, calls: &[GrpcCall], concurrency: Concurrency) -> PausedGrpcClient {
        let spec = json!({
            "target": target,
            "concurrent": concurrency == Concurrency::Concurrent,
            "calls": calls.iter().map(GrpcCall::to_json).collect::<Vec<_>>(),
        })
        .to_string();
        match self {
            Runtime::Python => {
                let files = TempDir::new("grpc-client");
                let script = files.write("echo_client.py", PY_CLIENT);
                let cmd = [grpc_python().as_os_str(), script.as_os_str(), OsStr::new(&spec)];
                PausedGrpcClient { client: paused_client(&cmd), _files: Some(files) }
            }
            Runtime::Go => {
                let cmd = [go_echo_binary().as_os_str(), OsStr::new("client"), OsStr::new(&spec)];
                PausedGrpcClient { client: paused_client(&cmd), _files: None }
            }
        }
    }

    /// Makes `calls` with an untraced client and returns the results (one per call).
    pub fn call(self, target: &str, calls: &[GrpcCall], concurrency: Concurrency) -> Vec<CallResult> {
        let results = parse_call_results(&self.client(target, calls, concurrency).run());
        assert_eq!(results.len(), calls.len(), "{self:?} client: one result per call: {results:?}");
        results
    }
}

/// A paused gRPC client (see [`paused_client`]) and the files it reads.
pub struct PausedGrpcClient {
    client: PausedClient,
    _files: Option<TempDir>,
}

impl PausedGrpcClient {
    /// The pid the client will run under.
    pub fn pid(&self) -> u32 {
        self.client.pid()
    }

    /// Lets the client run to its end, whatever its exit status.
    pub fn release(self) -> Output {
        self.client.release()
    }

    /// Lets the client run to its end; its stdout (panics with stderr unless it succeeded).
    /// Calls that end with a non-OK status do not fail the client.
    pub fn run(self) -> String {
        let output = self.release();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        assert!(
            output.status.success(),
            "gRPC client failed ({}):\n{}\n{}",
            output.status,
            text(&output.stdout),
            text(&output.stderr)
        );
        text(&output.stdout)
    }

    /// [`PausedGrpcClient::run`], parsed.
    pub fn results(self) -> Vec<CallResult> {
        parse_call_results(&self.run())
    }
}

// ---- servers ----

/// Where a server's `Unary` handler calls before it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downstream {
    /// `demo.Echo/Unary` with the same payload at `127.0.0.1:<port>`, on a channel made by the
    /// first call. A failure becomes the server's status ("downstream: ...").
    Grpc(String),
    /// An HTTP/1.1 GET of the URL; a non-2xx answer is UNAVAILABLE.
    Http(String),
}

/// How a server behaves beyond the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Return the `traceparent` values that arrived as `echo-traceparent` trailing metadata.
    pub echo_metadata: bool,
    pub downstream: Option<Downstream>,
}

impl ServerOptions {
    pub fn new() -> ServerOptions {
        ServerOptions::default()
    }

    pub fn echoing_metadata(mut self) -> ServerOptions {
        self.echo_metadata = true;
        self
    }

    pub fn calling(mut self, downstream: Downstream) -> ServerOptions {
        self.downstream = Some(downstream);
        self
    }

    fn to_json(&self, log: &Path) -> String {
        let downstream = match &self.downstream {
            None => String::new(),
            Some(Downstream::Grpc(target)) => format!("grpc://{target}"),
            Some(Downstream::Http(url)) => url.clone(),
        };
        json!({ "echo_metadata": self.echo_metadata, "downstream": downstream, "log": log }).to_string()
    }
}

/// A request a server finished, from its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRequest {
    /// `/demo.Echo/Unary` (gRPC), or `GET /call` (the HTTP/1 front).
    pub method: String,
    /// The `traceparent` metadata (or headers) that arrived, in order.
    pub traceparent: Vec<String>,
    /// The client's `127.0.0.1:<port>`: one value per connection.
    pub peer: String,
    /// The final gRPC status code as the server saw it, or the HTTP status (the front). When
    /// the client's deadline passed first it is DEADLINE_EXCEEDED or CANCELLED, whichever of
    /// the server's own timer and the client's RST_STREAM came first.
    pub code: i64,
}

/// A server process started from a program and arguments, its stdout read line by line, its
/// stderr and request log in its own directory. Stopped on drop.
struct ServiceProcess {
    // Field order matters: the process is stopped before its dir is removed.
    child: ChildGuard,
    /// Keeps draining stdout, so the process never blocks on it.
    _stdout: LineReader,
    port: u16,
    dir: TempDir,
    what: String,
}

impl ServiceProcess {
    /// Runs `program args...` (without OTEL_SERVICE_NAME) and waits for its `READY <port>`.
    fn start(program: &Path, args: &[&OsStr], dir: TempDir, what: &str) -> ServiceProcess {
        let stderr_path = dir.join("stderr.log");
        let stderr = File::create(&stderr_path).unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let mut command = Command::new(program);
        command.args(args).env_remove("OTEL_SERVICE_NAME").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = spawn(&mut command, what);
        let stdout = LineReader::new(child.stdout.take().expect("piped stdout"), what);
        let child = ChildGuard::new(child, what);
        let line =
            stdout.next_line(START_TIMEOUT).unwrap_or_else(|e| panic!("{e}; stderr:\n{}", dir.read("stderr.log")));
        let port = line.strip_prefix("READY ").and_then(|port| port.trim().parse().ok()).unwrap_or_else(|| {
            panic!("{what}: expected \"READY <port>\", got {line:?}; stderr:\n{}", dir.read("stderr.log"))
        });
        ServiceProcess { child, _stdout: stdout, port, dir, what: what.to_string() }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("requests.jsonl")
    }

    fn received(&self) -> Vec<ReceivedRequest> {
        let text = self.dir.read("requests.jsonl");
        json_lines(&text, &format!("{} log", self.what)).iter().map(received_request).collect()
    }

    /// Waits until the log holds `count` requests (they are logged as they finish).
    fn wait_received(&self, count: usize, timeout: Duration) -> Vec<ReceivedRequest> {
        let done = poll_until(timeout, || self.received().len() >= count);
        let received = self.received();
        assert!(done, "{}: {count} requests expected within {timeout:?}, got {received:?}", self.what);
        received
    }
}

fn received_request(json: &Json) -> ReceivedRequest {
    ReceivedRequest {
        method: json["method"].as_str().unwrap_or_default().to_string(),
        traceparent: strings(&json["traceparent"]),
        peer: json["peer"].as_str().unwrap_or_default().to_string(),
        code: json["code"].as_i64().unwrap_or(-1),
    }
}

/// A `demo.Echo` server (plaintext h2c) on 127.0.0.1:<free port>, untraced, stopped on drop.
pub struct GrpcServer {
    process: ServiceProcess,
    runtime: Runtime,
}

impl GrpcServer {
    pub fn start(runtime: Runtime, options: &ServerOptions) -> GrpcServer {
        let dir = TempDir::new("grpc-server");
        let log = dir.join("requests.jsonl");
        let options = options.to_json(&log);
        let process = match runtime {
            Runtime::Python => {
                let script = dir.write("echo_server.py", PY_SERVER);
                let args = [script.as_os_str(), OsStr::new(&options)];
                ServiceProcess::start(grpc_python(), &args, dir, "Python gRPC server")
            }
            Runtime::Go => {
                let args = [OsStr::new("server"), OsStr::new(&options)];
                ServiceProcess::start(go_echo_binary(), &args, dir, "Go gRPC server")
            }
        };
        debug_assert_eq!(process.log_path(), log);
        GrpcServer { process, runtime }
    }

    /// A Python server with the default options.
    pub fn python() -> GrpcServer {
        GrpcServer::start(Runtime::Python, &ServerOptions::new())
    }

    /// A Go server with the default options.
    pub fn go() -> GrpcServer {
        GrpcServer::start(Runtime::Go, &ServerOptions::new())
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    pub fn pid(&self) -> u32 {
        self.process.child.pid()
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `127.0.0.1:<port>`: the clients' target.
    pub fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The RPCs finished so far, in the order they finished.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.process.received()
    }

    /// Waits until `count` RPCs finished and returns them.
    pub fn wait_received(&self, count: usize) -> Vec<ReceivedRequest> {
        self.process.wait_received(count, LOG_TIMEOUT)
    }

    /// What the server wrote to stderr (tracebacks, gRPC logs).
    pub fn stderr(&self) -> String {
        self.process.dir.read("stderr.log")
    }
}

/// The Python HTTP/1.1 service (ThreadingHTTPServer) whose `GET /call?payload=<text>` handler
/// calls `demo.Echo/Unary` at its target from the handling thread, on a channel shared by all
/// requests and made by the first. Answers 200 (502 when the call failed) with a
/// [`FrontResponse`] as JSON; logs each request (`GET /call`, its `traceparent` headers, the
/// HTTP status).
pub struct HttpFront {
    process: ServiceProcess,
}

impl HttpFront {
    pub fn start(target: &str) -> HttpFront {
        let dir = TempDir::new("grpc-front");
        let script = dir.write("http_front.py", HTTP_FRONT);
        let options = json!({ "target": target, "log": dir.join("requests.jsonl") }).to_string();
        let args = [script.as_os_str(), OsStr::new(&options)];
        HttpFront { process: ServiceProcess::start(grpc_python(), &args, dir, "HTTP/1 front") }
    }

    pub fn pid(&self) -> u32 {
        self.process.child.pid()
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `http://127.0.0.1:<port>/call?payload=<payload>` (`payload` must be URL-safe).
    pub fn call_url(&self, payload: &str) -> String {
        format!("http://127.0.0.1:{}/call?payload={payload}", self.port())
    }

    /// The requests answered so far.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.process.received()
    }

    /// Waits until `count` requests were answered and returns them.
    pub fn wait_received(&self, count: usize) -> Vec<ReceivedRequest> {
        self.process.wait_received(count, LOG_TIMEOUT)
    }

    pub fn stderr(&self) -> String {
        self.process.dir.read("stderr.log")
    }
}

/// The front's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontResponse {
    /// The gRPC status of its call.
    pub code: i64,
    pub details: String,
    /// The reply, when the call succeeded.
    pub reply: Option<String>,
    /// The `echo-traceparent` trailing metadata of the reply.
    pub echo_traceparent: Vec<String>,
}

/// Parses the body a `curl` of [`HttpFront::call_url`] printed; panics if curl failed.
pub fn parse_front_response(output: &Output) -> FrontResponse {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "curl of the front failed ({}): {stdout} {stderr}", output.status);
    let json: Json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("front answered {stdout:?}: {e}"));
    FrontResponse {
        code: json["code"].as_i64().unwrap_or_else(|| panic!("no code in {json}")),
        details: json["details"].as_str().unwrap_or_default().to_string(),
        reply: json["reply"].as_str().map(String::from),
        echo_traceparent: strings(&json["echo_traceparent"]),
    }
}

/// The chain of the trace tests, each hop its own untraced process:
/// curl -> [`HttpFront`] (Python, HTTP/1.1; the handler makes a gRPC call) -> Go gRPC server
/// (its `Unary` handler calls downstream) -> Python gRPC server. Both gRPC servers echo the
/// `traceparent` metadata that reached them.
///
/// Every hop opens its downstream connection on its first request, so the chain can be started
/// before the agent: given the three pids, the agent sees every connection of the chain from
/// its first byte (see `propagation.rs`, which starts its HTTP/1 chains the same way).
pub struct GrpcChain {
    pub front: HttpFront,
    pub go: GrpcServer,
    pub python: GrpcServer,
}

impl GrpcChain {
    pub fn start() -> GrpcChain {
        let python = GrpcServer::start(Runtime::Python, &ServerOptions::new().echoing_metadata());
        let go = GrpcServer::start(
            Runtime::Go,
            &ServerOptions::new().echoing_metadata().calling(Downstream::Grpc(python.target())),
        );
        let front = HttpFront::start(&go.target());
        GrpcChain { front, go, python }
    }

    /// The pids in request order: front, Go server, Python server.
    pub fn pids(&self) -> [u32; 3] {
        [self.front.pid(), self.go.pid(), self.python.pid()]
    }

    /// `curl -sS --max-time 20 <front>/call?payload=<payload>`, which prints the
    /// [`FrontResponse`]; run it paused ([`paused_client`]) to trace curl too.
    pub fn curl_cmd(&self, payload: &str) -> Vec<String> {
        ["curl", "-sS", "--noproxy", "*", "--max-time", "20", &self.front.call_url(payload)].map(String::from).to_vec()
    }

    /// Sends one request through the chain with an untraced curl.
    pub fn request(&self, payload: &str) -> FrontResponse {
        let cmd = self.curl_cmd(payload);
        let output = Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
        parse_front_response(&output)
    }

    /// What each hop wrote to stderr, for assertion messages.
    pub fn stderr(&self) -> String {
        format!(
            "front stderr:\n{}\nGo server stderr:\n{}\nPython server stderr:\n{}",
            self.front.stderr(),
            self.go.stderr(),
            self.python.stderr()
        )
    }
}

// ---- plain HTTP/2: nghttpd and its clients ----

/// A Go HTTP service (net/http with golang.org/x/net/http2/h2c, no gRPC) on 127.0.0.1:<free
/// port) that speaks HTTP/1.1, h2c with prior knowledge and h2c after an HTTP/1.1
/// `Upgrade: h2c`. Any path gets 200 `hello <path> over HTTP/<major>`; each request is logged
/// (`GET <path>`, its `traceparent` headers, the peer, 200). Untraced, stopped on drop.
pub struct GoH2cServer {
    process: ServiceProcess,
}

impl GoH2cServer {
    pub fn start() -> GoH2cServer {
        let dir = TempDir::new("go-h2c");
        let options = ServerOptions::new().to_json(&dir.join("requests.jsonl"));
        let args = [OsStr::new("h2c"), OsStr::new(&options)];
        GoH2cServer { process: ServiceProcess::start(go_echo_binary(), &args, dir, "Go h2c server") }
    }

    pub fn pid(&self) -> u32 {
        self.process.child.pid()
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port())
    }

    /// Waits until `count` requests were answered and returns them, in that order.
    pub fn wait_received(&self, count: usize) -> Vec<ReceivedRequest> {
        self.process.wait_received(count, LOG_TIMEOUT)
    }
}

/// Size of nghttpd's `/large.bin` (more than the 64 KiB initial flow-control window).
pub const NGHTTPD_LARGE_FILE_SIZE: usize = 1 << 20;
/// Body of nghttpd's `/index.html`.
pub const NGHTTPD_INDEX: &str = "hello over h2c\n";

/// nghttpd (nghttp2-server), h2c with prior knowledge only (`--no-tls`; it does not answer an
/// HTTP/1.1 Upgrade: [`GoH2cServer`] does), one thread,
/// serving a directory: `/index.html` ([`NGHTTPD_INDEX`]), `/large.bin`
/// ([`NGHTTPD_LARGE_FILE_SIZE`] bytes), 404 for anything else. Stopped on drop.
pub struct Nghttpd {
    // Field order matters: the server is stopped before its dir is removed.
    child: ChildGuard,
    port: u16,
    dir: TempDir,
}

impl Nghttpd {
    pub fn start() -> Nghttpd {
        let dir = TempDir::new("nghttpd");
        let htdocs = dir.join("htdocs");
        std::fs::create_dir(&htdocs).unwrap_or_else(|e| panic!("create {}: {e}", htdocs.display()));
        dir.write("htdocs/index.html", NGHTTPD_INDEX);
        dir.write("htdocs/large.bin", (0..NGHTTPD_LARGE_FILE_SIZE).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>());
        let port = free_port();
        let log = File::create(dir.join("nghttpd.log")).unwrap_or_else(|e| panic!("create nghttpd.log: {e}"));
        let mut command = Command::new(tool("nghttpd"));
        command
            .args(["--no-tls", "--address=127.0.0.1"])
            .arg(format!("--htdocs={}", htdocs.display()))
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        let mut child = ChildGuard::new(spawn(&mut command, "nghttpd"), "nghttpd");
        let ready = poll_until(START_TIMEOUT, || {
            if let Some(status) = child.try_exit_status() {
                panic!("nghttpd exited with {status}:\n{}", dir.read("nghttpd.log"));
            }
            port_is_open(port)
        });
        assert!(ready, "nghttpd not listening within {START_TIMEOUT:?}:\n{}", dir.read("nghttpd.log"));
        Nghttpd { child, port, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What nghttpd printed.
    pub fn log(&self) -> String {
        self.dir.read("nghttpd.log")
    }
}

/// The path of `name` (nghttpd is in /usr/sbin, which may not be on PATH), or a panic saying
/// how to install it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: {INSTALL_HINT}"))
}

const H2C_CURL_WRITE_OUT: &str = "%{http_code} %{time_total} %{num_connects} %{http_version}\n";

/// `curl --http2-prior-knowledge` of ONE URL (body discarded), printing the `-w` line that
/// [`crate::clients::parse_curl_output`] reads, plus the HTTP version. One URL because Debian's
/// curl 7.88.1 fails a second request on a reused h2c prior-knowledge connection ("(16) Error
/// in the HTTP2 framing layer", curl issue #10634, fixed in 8.0): use [`nghttp_args`] for
/// several streams on one connection.
pub fn h2c_curl_args(url: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> =
        ["curl", "-sS", "--http2-prior-knowledge", "--noproxy", "*", "--max-time", "10", "-w", H2C_CURL_WRITE_OUT]
            .map(String::from)
            .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-o", "/dev/null", url].map(String::from));
    args
}

/// Fetches `url` with an untraced `curl --http2-prior-knowledge`; panics unless it spoke HTTP/2.
pub fn h2c_curl(url: &str, extra: &[&str]) -> CurlResult {
    let args = h2c_curl_args(url, extra);
    let output = Command::new(&args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert_h2c_curl_spoke_http2(&output);
    let results = crate::clients::parse_curl_output(&output);
    assert_eq!(results.len(), 1, "one -w line expected for {url}: {results:?}");
    results[0]
}

/// Panics unless a finished [`h2c_curl_args`] curl reports HTTP version 2.
pub fn assert_h2c_curl_spoke_http2(output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = stdout.lines().next().and_then(|line| line.split_whitespace().nth(3));
    assert_eq!(version, Some("2"), "curl did not speak HTTP/2: {stdout:?} {}", String::from_utf8_lossy(&output.stderr));
}

/// `nghttp -n -s <urls>`: every URL as a stream of ONE connection (h2c prior knowledge),
/// bodies discarded, then a statistics table ([`parse_nghttp_stats`]). Identical URLs are
/// fetched once; add `-m N` to `extra` to repeat every URL N times. Note: nghttp also sends
/// PRIORITY frames that create idle streams 3, 5, 7, 9 and 11 first, so the first request is
/// stream 13 (`--no-dep` turns that off).
pub fn nghttp_args(urls: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["nghttp", "-n", "-s"].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(urls.iter().map(|s| s.to_string()));
    args
}

/// One response in nghttp's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NghttpResponse {
    pub stream_id: u32,
    pub status: u16,
    pub path: String,
}

/// The responses in the statistics table of a finished [`nghttp_args`] nghttp, in the order
/// they completed; panics if nghttp failed.
pub fn parse_nghttp_stats(output: &Output) -> Vec<NghttpResponse> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "nghttp failed ({}): {stdout} {stderr}", output.status);
    // "id  responseEnd requestStart  process code size request path", then one row per stream.
    let rows = stdout.lines().skip_while(|line| !line.starts_with("id ")).skip(1);
    rows.filter_map(|row| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        let stream_id = fields.first()?.parse().ok()?;
        Some(NghttpResponse { stream_id, status: fields.get(4)?.parse().ok()?, path: fields.get(6)?.to_string() })
    })
    .collect()
}

/// Runs nghttp untraced.
pub fn run_nghttp(urls: &[&str], extra: &[&str]) -> Vec<NghttpResponse> {
    let args = nghttp_args(urls, extra);
    let output = Command::new(&args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    parse_nghttp_stats(&output)
}

/// `h2load -n <requests> -c <clients> -m <streams> <url>` (h2c prior knowledge): `clients`
/// connections, each with up to `streams` concurrent streams, `requests` in all.
pub fn h2load_args(url: &str, requests: usize, clients: usize, streams: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "h2load".to_string(),
        "-n".to_string(),
        requests.to_string(),
        "-c".to_string(),
        clients.to_string(),
        "-m".to_string(),
        streams.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(url.to_string());
    args
}

/// h2load's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct H2loadResult {
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
}

/// Reads the `requests:` and `status codes:` lines of a finished h2load; panics if h2load
/// failed or printed neither.
pub fn parse_h2load_output(output: &Output) -> H2loadResult {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "h2load failed ({}): {stdout} {stderr}", output.status);
    let numbers = |prefix: &str| -> Vec<u64> {
        let line = stdout.lines().find(|line| line.starts_with(prefix));
        let line = line.unwrap_or_else(|| panic!("no {prefix:?} line in h2load output:\n{stdout}\n{stderr}"));
        line[prefix.len()..].split(',').filter_map(|part| part.split_whitespace().next()?.parse().ok()).collect()
    };
    let requests = numbers("requests:");
    let codes = numbers("status codes:");
    assert!(requests.len() >= 7 && codes.len() >= 4, "unexpected h2load summary:\n{stdout}");
    H2loadResult {
        total: requests[0],
        started: requests[1],
        done: requests[2],
        succeeded: requests[3],
        failed: requests[4],
        errored: requests[5],
        timeout: requests[6],
        status_2xx: codes[0],
        status_3xx: codes[1],
        status_4xx: codes[2],
        status_5xx: codes[3],
    }
}

/// Runs an [`h2load_args`] command line untraced.
pub fn run_h2load(args: &[String]) -> H2loadResult {
    let output = Command::new(&args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    parse_h2load_output(&output)
}

// ---- toolchains ----

/// The Python interpreter, checked once to import grpc.
fn grpc_python() -> &'static Path {
    static CHECKED: OnceLock<()> = OnceLock::new();
    let python = python_interpreter();
    CHECKED.get_or_init(|| {
        let output = Command::new(python)
            .args(["-c", "import grpc; print(grpc.__version__)"])
            .output()
            .unwrap_or_else(|e| panic!("run {} to check for grpcio: {e}", python.display()));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{} cannot import grpc: {}\n{INSTALL_HINT}", python.display(), stderr.trim());
    });
    python
}

/// Where Debian's golang-google-grpc-dev puts grpc-go and its dependencies (a GOPATH entry).
const DEBIAN_GOCODE: &str = "/usr/share/gocode";

/// The Go program of `echo.go`, built once per test process (and kept across processes): the
/// binary is cached under `<target>/zerotel-tests/go/` by a hash of the source, with a shared
/// GOCACHE, so only the first build pays (about 10 s cold on 2 CPUs).
pub fn go_echo_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_go_echo)
}

fn go_cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("zerotel-tests/go")
}

fn build_go_echo() -> PathBuf {
    let go = tool("go");
    let grpc = Path::new(DEBIAN_GOCODE).join("src/google.golang.org/grpc");
    assert!(grpc.is_dir(), "{} is missing (grpc-go 1.33): {INSTALL_HINT}", grpc.display());
    let cache = go_cache_dir();
    let final_dir = cache.join(format!("echo-{:016x}", fnv1a(GO_SOURCE.as_bytes())));
    let binary = final_dir.join("go_echo");
    if binary.is_file() {
        return binary;
    }
    // Build in a directory of our own, then rename it into place: concurrent test processes
    // never see a half-written binary.
    let build_dir = cache.join(format!("build-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&build_dir).unwrap_or_else(|e| panic!("create {}: {e}", build_dir.display()));
    std::fs::write(build_dir.join("main.go"), GO_SOURCE).unwrap_or_else(|e| panic!("write main.go: {e}"));
    let gopath = std::env::join_paths([build_dir.join("gopath"), PathBuf::from(DEBIAN_GOCODE)]).expect("GOPATH");
    let output = Command::new(&go)
        .args(["build", "-o", "go_echo", "main.go"])
        .current_dir(&build_dir)
        .env("GOCACHE", cache.join("gocache"))
        .env("GOPATH", gopath)
        .env("GO111MODULE", "off")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "")
        .output()
        .unwrap_or_else(|e| panic!("run {} build: {e}", go.display()));
    assert!(
        output.status.success(),
        "go build of tests/grpc/echo.go failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if std::fs::rename(&build_dir, &final_dir).is_err() {
        // Another process put the same build in place first.
        let _ = std::fs::remove_dir_all(&build_dir);
    }
    assert!(binary.is_file(), "{} missing after the build", binary.display());
    binary
}

/// 64-bit FNV-1a: a hash that is the same in every build, for cache keys.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_call_results_in_call_order() {
        let stdout = "{\"call\": 1, \"code\": 14, \"details\": \"failed\", \"replies\": 0, \"reply_bytes\": 0, \
                      \"echoed\": false, \"first_reply\": null, \"echo_traceparent\": [], \"elapsed_ms\": 1.5}\n\
                      {\"call\":0,\"code\":0,\"details\":\"\",\"replies\":1,\"reply_bytes\":5,\"echoed\":true,\
                      \"first_reply\":\"hello\",\"echo_traceparent\":[\"00-ab-cd-01\"],\"elapsed_ms\":0.2}\n";
        let results = parse_call_results(stdout);
        assert_eq!(results[0].first_reply.as_deref(), Some("hello"));
        assert_eq!(results[0].echo_traceparent, ["00-ab-cd-01"]);
        assert_eq!(results[1].code(), Some(Code::Unavailable));
        assert_eq!(results[1].elapsed, Duration::from_micros(1500));
    }

    #[test]
    fn parses_h2load_and_nghttp_summaries() {
        use std::os::unix::process::ExitStatusExt;
        let h2load = "finished in 693us, 28860.03 req/s, 1.14MB/s\n\
                      requests: 20 total, 20 started, 20 done, 19 succeeded, 1 failed, 0 errored, 0 timeout\n\
                      status codes: 19 2xx, 0 3xx, 1 4xx, 0 5xx\n";
        let output = |stdout: &str| Output {
            status: std::process::ExitStatus::from_raw(0),
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
        };
        let result = parse_h2load_output(&output(h2load));
        assert_eq!((result.total, result.succeeded, result.failed, result.status_4xx), (20, 19, 1, 1));
        let nghttp = "sorted by 'complete'\n\nid  responseEnd requestStart  process code size request path\n \
                      13      +199us        +78us    121us  200    3 /index.html\n \
                      15      +200us        +80us    120us  404  148 /missing\n";
        let responses = parse_nghttp_stats(&output(nghttp));
        assert_eq!(responses[1], NghttpResponse { stream_id: 15, status: 404, path: "/missing".to_string() });
    }

    #[test]
    fn server_error_codes_follow_the_conventions() {
        let errors: Vec<i64> = Code::ALL.iter().filter(|c| c.is_server_error()).map(|c| c.value()).collect();
        assert_eq!(errors, [2, 4, 12, 13, 14, 15]);
        assert_eq!(GrpcCall::fail(Code::DataLoss).span_name(), "demo.Echo/Fail");
    }
}
