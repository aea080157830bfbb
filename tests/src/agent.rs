//! Runs the zerotel agent binary under test.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::otlp::OtlpReceiver;
use crate::process::{collect_pipe, send_signal, spawn, terminate, wait_with_timeout};
use crate::util::{free_port, http_get, TempDir};

/// How long the agent may take to attach its probes (/healthz 200).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment the agent reads as settings; removed so each test controls
/// the agent through its command line only.
const INHERITED_SETTINGS: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "ZEROTEL_LISTEN",
    "ZEROTEL_CONFIG",
    "ZEROTEL_K8S_NAMESPACE",
    "NODE_NAME",
    "KUBECONFIG",
];

/// The agent binary: `$ZEROTEL_BIN`, else `<workspace>/target/debug/zerotel`.
pub fn agent_binary() -> PathBuf {
    let path = match std::env::var_os("ZEROTEL_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/zerotel"),
    };
    assert!(
        path.is_file(),
        "agent binary {} not found: build it (cargo build -p <agent package>) or set ZEROTEL_BIN to its absolute path",
        path.display()
    );
    path
}

/// The agent binary with `args` and none of [`INHERITED_SETTINGS`] in its environment.
fn agent_command(args: &[String]) -> Command {
    let mut command = Command::new(agent_binary());
    command.args(args);
    remove_inherited_settings(&mut command);
    command
}

fn remove_inherited_settings(command: &mut Command) {
    for var in INHERITED_SETTINGS {
        command.env_remove(var);
    }
}

/// The capabilities the README and deploy/overlays/capabilities list, as capabilities(7) names
/// them without `CAP_`: with exactly these the agent traces everything it can as root.
pub const LISTED_CAPABILITIES: [&str; 5] = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN"];

/// The agent binary with `args`, run as root with exactly `capabilities` (names as in
/// [`LISTED_CAPABILITIES`]): `setpriv` empties the bounding and inheritable sets of all others
/// before it executes the agent, as a container runtime does with `capabilities.drop: [ALL]`.
fn agent_command_with_capabilities(capabilities: &[&str], args: &[String]) -> Command {
    let set: Vec<String> = std::iter::once("-all".to_owned()).chain(capabilities.iter().map(|c| format!("+{}", c.to_lowercase()))).collect();
    let set = set.join(",");
    let mut command = Command::new("setpriv");
    command.args(["--inh-caps", &set, "--bounding-set", &set, "--"]).arg(agent_binary()).args(args);
    remove_inherited_settings(&mut command);
    command
}

/// `--pid` args plus `--propagation on`: for tests of the injection itself, whose applications do
/// not size reads with FIONREAD (the agent keeps propagation off by default on kernels whose
/// sockmap breaks it, this one included).
pub fn propagating_pid_args(pids: &[u32]) -> Vec<String> {
    let mut args = pid_args(pids);
    args.extend(["--propagation".to_owned(), "on".to_owned()]);
    args
}

/// `--pid P` for each pid.
pub fn pid_args(pids: &[u32]) -> Vec<String> {
    pids.iter().flat_map(|pid| ["--pid".to_string(), pid.to_string()]).collect()
}

/// A running agent, stopped with SIGTERM (then SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    listen: SocketAddr,
    logs: TempDir,
}

impl Agent {
    /// Starts the agent with `args` plus `--listen` (and the OTLP flags when a
    /// receiver is given) and waits for /healthz to answer 200.
    pub fn start(args: &[String], otlp: Option<&OtlpReceiver>) -> Agent {
        Agent::start_with_env(args, otlp, &[])
    }

    /// As [`Agent::start`], with extra environment variables for the agent (e.g. the sampler).
    pub fn start_with_env(args: &[String], otlp: Option<&OtlpReceiver>, env: &[(&str, &str)]) -> Agent {
        let mut command = agent_command(args);
        command.envs(env.iter().copied());
        Agent::launch(command, otlp)
    }

    /// As [`Agent::start`], as root with exactly `capabilities` (see [`LISTED_CAPABILITIES`]).
    pub fn start_with_capabilities(capabilities: &[&str], args: &[String], otlp: Option<&OtlpReceiver>) -> Agent {
        Agent::launch(agent_command_with_capabilities(capabilities, args), otlp)
    }

    fn launch(mut command: Command, otlp: Option<&OtlpReceiver>) -> Agent {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let logs = TempDir::new("agent");
        command.arg("--listen").arg(listen.to_string());
        if let Some(otlp) = otlp {
            command.args(["--otlp-endpoint", &otlp.endpoint(), "--otlp-protocol", otlp.protocol_flag()]);
        }
        command.stdin(Stdio::null()).stdout(create_log(&logs, "stdout")).stderr(create_log(&logs, "stderr"));
        let child = spawn(&mut command, "zerotel agent");
        let mut agent = Agent { child: Some(child), listen, logs };
        agent.wait_until_healthy();
        agent
    }

    fn wait_until_healthy(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait on agent") {
                panic!("agent exited with {status} before becoming healthy; stderr:\n{}", self.stderr());
            }
            if matches!(http_get(self.listen, "/healthz"), Ok(r) if r.status == 200) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("agent not healthy within {READY_TIMEOUT:?}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent already stopped").id()
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("agent already stopped")
    }

    /// Everything the agent printed to stdout so far.
    pub fn stdout(&self) -> String {
        self.logs.read("stdout")
    }

    /// Everything the agent printed to stderr so far.
    pub fn stderr(&self) -> String {
        self.logs.read("stderr")
    }

    /// The body of GET /metrics (panics unless 200).
    pub fn metrics(&self) -> String {
        let response = http_get(self.listen, "/metrics").unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(response.status, 200, "GET /metrics answered {}: {}", response.status, response.body);
        response.body
    }

    /// Sum of every sample of metric `name` (all label sets).
    pub fn metric_sum(&self, name: &str) -> u64 {
        self.metric_sum_with(name, &[])
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    pub fn metric_sum_with(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        sum_samples(&parse_metrics(&self.metrics()), name, labels)
    }

    /// SIGKILL, as the OOM killer or a node's eviction would: no chance to clean up.
    pub fn kill(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        send_signal(child.id(), libc::SIGKILL);
        child.wait().expect("wait for the killed agent")
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`]; panics if the agent had to be killed.
    pub fn stop(self) -> ExitStatus {
        self.stop_with_output().status
    }

    /// Like [`Agent::stop`], also returning what the agent printed.
    pub fn stop_with_output(mut self) -> Output {
        let mut child = self.child.take().expect("agent already stopped");
        let termination = terminate(&mut child, STOP_TIMEOUT);
        assert!(
            !termination.killed,
            "agent ignored SIGTERM for {STOP_TIMEOUT:?} and was killed; stderr:\n{}",
            self.stderr()
        );
        Output { status: termination.status, stdout: self.stdout().into_bytes(), stderr: self.stderr().into_bytes() }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        terminate(&mut child, STOP_TIMEOUT);
        if std::thread::panicking() {
            eprintln!("--- zerotel agent stderr ---\n{}", tail(&self.stderr(), 8192));
        }
    }
}

fn create_log(logs: &TempDir, name: &str) -> File {
    let path = logs.join(name);
    File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

fn tail(text: &str, max_bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(max_bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Runs the agent with `args` (no --listen added) and waits up to `timeout`
/// for it to exit on its own, e.g. on invalid arguments. Panics if it is
/// still running then.
pub fn run_until_exit(args: &[String], timeout: Duration) -> Output {
    run_until_exit_with_env(args, &[], timeout)
}

/// As [`run_until_exit`], with extra environment variables.
pub fn run_until_exit_with_env(args: &[String], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut command = agent_command(args);
    command.envs(env.iter().copied());
    run_command_until_exit(command, args, timeout)
}

/// As [`run_until_exit`], as root with exactly `capabilities` (see [`LISTED_CAPABILITIES`]).
pub fn run_with_capabilities_until_exit(capabilities: &[&str], args: &[String], timeout: Duration) -> Output {
    run_command_until_exit(agent_command_with_capabilities(capabilities, args), args, timeout)
}

fn run_command_until_exit(mut command: Command, args: &[String], timeout: Duration) -> Output {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn(&mut command, "zerotel agent");
    let stdout = collect_pipe(child.stdout.take().expect("piped stdout"));
    let stderr = collect_pipe(child.stderr.take().expect("piped stderr"));
    let status = wait_with_timeout(&mut child, timeout);
    if status.is_none() {
        terminate(&mut child, Duration::from_secs(2));
    }
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    let Some(status) = status else {
        panic!("agent {args:?} still running after {timeout:?}; stdout:\n{stdout}\nstderr:\n{stderr}");
    };
    Output { status, stdout: stdout.into_bytes(), stderr: stderr.into_bytes() }
}

/// One Prometheus text-format sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus text exposition (comments skipped; panics on a malformed sample).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_sample(line).unwrap_or_else(|e| panic!("malformed metrics line {line:?}: {e}")))
        .collect()
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let (series, rest) = if line.contains('{') {
        let close = line.rfind('}').ok_or("unclosed label set")?;
        (&line[..close + 1], &line[close + 1..])
    } else {
        line.split_once(' ').ok_or("no value")?
    };
    let value_text = rest.split_whitespace().next().ok_or("no value")?;
    let value = value_text.parse().map_err(|e| format!("value {value_text:?}: {e}"))?;
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))?),
        None => (series, BTreeMap::new()),
    };
    Ok(Sample { name: name.to_string(), labels, value })
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after_key) = rest.split_once("=\"").ok_or_else(|| format!("bad labels {text:?}"))?;
        let end = closing_quote(after_key).ok_or_else(|| format!("unterminated label value in {text:?}"))?;
        labels.insert(key.trim().to_string(), after_key[..end].replace("\\\"", "\""));
        rest = after_key[end + 1..].trim_start_matches(',').trim();
    }
    Ok(labels)
}

fn closing_quote(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some(i),
            _ => escaped = false,
        }
    }
    None
}

/// Sum of the samples of `name` whose labels include all of `labels`.
pub fn sum_samples(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    let total: f64 = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum();
    // Counters are non-negative integers; truncation is exact for them.
    total as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP zerotel_spans_total Spans built.\n\
                           # TYPE zerotel_spans_total counter\n\
                           zerotel_spans_total{kind=\"server\"} 7\n\
                           zerotel_spans_total{kind=\"client\",note=\"a \\\"q\\\"\"} 2\n\
                           zerotel_events_lost_total 0\n\
                           zerotel_events_read_total 12 1700000000000\n";

    #[test]
    fn parses_prometheus_text() {
        let samples = parse_metrics(METRICS);
        assert_eq!(samples.len(), 4);
        assert_eq!(sum_samples(&samples, "zerotel_spans_total", &[]), 9);
        assert_eq!(sum_samples(&samples, "zerotel_spans_total", &[("kind", "server")]), 7);
        assert_eq!(sum_samples(&samples, "zerotel_events_read_total", &[]), 12);
        assert_eq!(samples[1].labels["note"], "a \"q\"");
    }
}
