//! `bench kafka`: producer throughput against librdkafka's mock cluster (a real Kafka-protocol
//! broker on 127.0.0.1, held by an untraced Python process), without and with the agent tracing
//! the producer (its Produce requests become PRODUCER spans, exported OTLP/HTTP to a local sink).
//!
//! The producer is kcat (C, on the system librdkafka) sending the lines of a file as messages
//! to one partition, batched as librdkafka does by default: it is limited by librdkafka's
//! sending, where the agent's probes run, not by an interpreter. kcat is a new process every
//! round and the agent must see it from its first byte, so it starts through a launcher shell
//! that blocks on stdin: traced rounds point the agent at the shell's pid, wait for /healthz,
//! then let the shell exec kcat, which keeps the pid. Untraced rounds take the same path.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    agent::{self, Agent},
    bpf_stats::{self, ProgStat, StatsEnabled},
    median,
    proc::{self, Guard, TempDir},
    sink::Sink,
    targets::{num, targets_markdown, Cmp, Target},
    BenchArgs, Ctx, Report, Scenario,
};
use crate::{signals, util};

/// Messages per round, and their size: about 1.3 s of kcat untraced on 2 CPUs.
const MESSAGES: usize = 2_000_000;
const MESSAGE_BYTES: usize = 100;
/// Created by the mock on first use (4 partitions); every message goes to partition 0.
const TOPIC: &str = "bench";
const CLIENT_ID: &str = "zerotel-bench";
/// `sh -c LAUNCHER kcat ARGS...`: waits for a line on stdin, then becomes kcat.
const LAUNCHER: &str = r#"read go && exec "$0" "$@""#;
/// Holds a one-broker mock cluster, prints its bootstrap address, lives until stdin closes.
const BROKER: &str = r#"
import sys
from confluent_kafka import Producer

holder = Producer({"test.mock.num.brokers": 1, "log_level": 3})
broker = next(iter(holder.list_topics(timeout=10).brokers.values()))
print(f"{broker.host}:{broker.port}", flush=True)
sys.stdin.read()
"#;

// Like the other client-side benches: tracing may cost at most 5 % of throughput.
const TARGET_THROUGHPUT_RATIO: f64 = 0.95;

pub struct Kafka;

impl Scenario for Kafka {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let a = ctx.args;
        let dir = TempDir::new("kafka")?;
        let broker = Broker::start(dir.path())?;
        eprintln!("bench kafka: mock broker on {}", broker.bootstrap);
        let tracer = ctx
            .agent
            .map(|exe| Tracer::new(exe, &a.agent_args))
            .transpose()?;
        let bench = Bench {
            bootstrap: &broker.bootstrap,
            messages: write_messages(dir.path())?,
            log_dir: dir.path(),
            tracer: tracer.as_ref(),
        };
        if a.warmup > 0 {
            bench
                .launch("warmup")?
                .go()
                .context("warm-up round failed")?;
        }
        let mut rounds = Vec::new();
        for i in 1..=a.rounds {
            for mode in [UNTRACED, TRACED] {
                rounds.extend(bench.round(i, mode)?);
            }
        }
        Ok(report(ctx, &rounds, &kcat_version()))
    }
}

// ---- the broker ----

/// The Python process holding the mock cluster; killed on drop.
struct Broker {
    bootstrap: String,
    _guard: Guard,
}

impl Broker {
    fn start(dir: &Path) -> Result<Self> {
        let log = dir.join("broker.log");
        let mut cmd = Command::new("python3");
        cmd.args(["-c", BROKER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log)?);
        let mut child = cmd
            .spawn()
            .context("cannot start python3 for the mock Kafka broker")?;
        let stdout = child.stdout.take().context("broker stdout not captured")?;
        let guard = Guard::new("mock kafka broker", child);
        let mut bootstrap = String::new();
        BufReader::new(stdout).read_line(&mut bootstrap)?;
        if !bootstrap.trim().contains(':') {
            bail!(
                "the mock Kafka broker did not start (`cargo xtask setup` installs confluent-kafka); its log:\n{}",
                proc::tail(&log, 30)
            );
        }
        Ok(Self {
            bootstrap: bootstrap.trim().to_string(),
            _guard: guard,
        })
    }
}

/// The file kcat sends, one message per line.
fn write_messages(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("messages.txt");
    let line = format!("{}\n", "x".repeat(MESSAGE_BYTES));
    fs::write(&path, line.repeat(MESSAGES))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `kcat 1.7.1, librdkafka 2.0.2`, from the `Version` line of `kcat -V`.
fn kcat_version() -> String {
    parse_kcat_version(&util::any_output_of("kcat", &["-V"]).unwrap_or_default())
}

fn parse_kcat_version(text: &str) -> String {
    let words: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("Version "))
        .unwrap_or("")
        .split([' ', '(', ','])
        .filter(|w| !w.is_empty())
        .collect();
    let after = |word: &str| words.iter().skip_while(|w| **w != word).nth(1).copied();
    format!(
        "kcat {}, librdkafka {}",
        words.first().copied().unwrap_or("unknown"),
        after("librdkafka").unwrap_or("unknown")
    )
}

// ---- kcat ----

#[derive(Debug, Clone, Serialize)]
struct ProduceResult {
    messages: usize,
    /// Wall time from the release of kcat to its exit (connecting and the final flush included).
    seconds: f64,
    msgs_per_s: f64,
    mib_per_s: f64,
}

/// kcat held at the starting line: a shell blocked on stdin, which execs kcat (same pid) once
/// it reads a line. Killed on drop if still running.
struct Launch {
    guard: Guard,
    stdin: ChildStdin,
    log: PathBuf,
}

impl Launch {
    fn spawn(args: &[String], log: PathBuf) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", LAUNCHER, "kcat"]).args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", util::display(&cmd)))?;
        let stdin = child.stdin.take().context("launcher stdin not captured")?;
        Ok(Self {
            guard: Guard::new("kcat", child),
            stdin,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Lets kcat go and waits until it has sent every message.
    fn go(mut self) -> Result<ProduceResult> {
        self.stdin
            .write_all(b"go\n")
            .context("cannot release the kcat launcher")?;
        let started = Instant::now();
        // Poll so SIGTERM to xtask stops kcat too (the guard kills it on the way out).
        let status = loop {
            if let Some(status) = self.guard.child.try_wait()? {
                break status;
            }
            signals::check()?;
            thread::sleep(Duration::from_millis(5));
        };
        let seconds = started.elapsed().as_secs_f64();
        let errors = fs::read_to_string(&self.log).unwrap_or_default();
        if !status.success() || errors.contains("ERROR") {
            bail!("kcat failed ({status}):\n{}", proc::tail(&self.log, 30));
        }
        Ok(ProduceResult {
            messages: MESSAGES,
            seconds,
            msgs_per_s: MESSAGES as f64 / seconds,
            mib_per_s: (MESSAGES * MESSAGE_BYTES) as f64 / seconds / (1024.0 * 1024.0),
        })
    }
}

// ---- rounds ----

/// How a round runs.
#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    traced: bool,
}

const UNTRACED: Mode = Mode {
    name: "untraced",
    traced: false,
};
const TRACED: Mode = Mode {
    name: "traced",
    traced: true,
};

#[derive(Serialize)]
struct Round {
    round: usize,
    mode: &'static str,
    #[serde(flatten)]
    load: ProduceResult,
    agent: Option<AgentRound>,
}

#[derive(Serialize)]
struct AgentRound {
    /// CPU used by the agent process while kcat ran.
    cpu_s: f64,
    cpu_s_per_mmsg: f64,
    /// cpu_s over kcat's wall time, in % of one core.
    cpu_pct_of_core: f64,
    /// Including start-up (BTF, program loading) and the post-load flush.
    cpu_s_total: f64,
    peak_rss_mib: f64,
    /// Spans the agent assembled (zerotel_spans_total): one per Produce request.
    spans: Option<f64>,
    /// Spans the sink accepted (zerotel_spans_exported_total).
    spans_exported: Option<f64>,
    /// spans over kcat's wall time.
    spans_per_s: Option<f64>,
    events_lost: Option<f64>,
    kernel_run_ns: u64,
    kernel_runs: u64,
    kernel_ns_per_msg: f64,
    otlp_posts: u64,
    otlp_bytes: u64,
    clean_exit: bool,
    programs: Vec<ProgStat>,
}

/// What every round shares.
struct Bench<'a> {
    bootstrap: &'a str,
    messages: PathBuf,
    log_dir: &'a Path,
    tracer: Option<&'a Tracer<'a>>,
}

impl Bench<'_> {
    fn kcat_args(&self) -> Vec<String> {
        let messages = self.messages.display().to_string();
        let client_id = format!("client.id={CLIENT_ID}");
        ["-P", "-b", self.bootstrap, "-t", TOPIC, "-p", "0"]
            .into_iter()
            .chain(["-X", &client_id, "-l", &messages])
            .map(String::from)
            .collect()
    }

    fn launch(&self, tag: &str) -> Result<Launch> {
        Launch::spawn(
            &self.kcat_args(),
            self.log_dir.join(format!("kcat-{tag}.log")),
        )
    }

    /// One round in `mode`; None for traced rounds without an agent (--untraced-only).
    fn round(&self, i: usize, mode: Mode) -> Result<Option<Round>> {
        signals::check()?;
        let tracer = match (mode.traced, self.tracer) {
            (true, None) => return Ok(None),
            (traced, t) => t.filter(|_| traced),
        };
        let launch = self.launch(&format!("{}-{i}", mode.name))?;
        let (load, agent) = match tracer {
            None => (launch.go()?, None),
            Some(t) => {
                let log = self.log_dir.join(format!("agent-{i}.log"));
                let (load, agent) = t.round(launch, &log)?;
                (load, Some(agent))
            }
        };
        let round = Round {
            round: i,
            mode: mode.name,
            load,
            agent,
        };
        eprintln!("bench kafka: {}", round.summary());
        Ok(Some(round))
    }
}

impl Round {
    fn summary(&self) -> String {
        let spans = self.agent.as_ref().map_or(String::new(), |g| {
            format!(
                ", {} spans, {} lost",
                num(g.spans, 0),
                num(g.events_lost, 0)
            )
        });
        format!(
            "round {} {}: {:.0} msg/s ({:.1} MiB/s) in {:.2} s{spans}",
            self.round, self.mode, self.load.msgs_per_s, self.load.mib_per_s, self.load.seconds
        )
    }
}

/// What the traced rounds share: the OTLP sink and kernel BPF stats (on for the whole bench).
struct Tracer<'a> {
    exe: &'a Path,
    extra_args: &'a [String],
    sink: Sink,
    _stats: StatsEnabled,
}

impl<'a> Tracer<'a> {
    fn new(exe: &'a Path, extra_args: &'a [String]) -> Result<Self> {
        Ok(Self {
            exe,
            extra_args,
            sink: Sink::start()?,
            _stats: StatsEnabled::enable()?,
        })
    }

    /// Starts an agent on the held kcat, lets kcat go, and measures the agent meanwhile.
    fn round(&self, launch: Launch, log: &Path) -> Result<(ProduceResult, AgentRound)> {
        let endpoint = self.sink.endpoint();
        let mut agent = Agent::start(agent::Spec {
            exe: self.exe,
            pids: &[launch.pid()],
            otlp_endpoint: &endpoint,
            extra_args: self.extra_args,
            log: log.into(),
        })?;
        // Only this agent's programs count (another zerotel may run same-named ones).
        let owned = bpf_stats::prog_ids_of(agent.pid()).unwrap_or_else(|e| {
            eprintln!("bench kafka: warning: counting every zt_ program: {e:#}");
            Default::default()
        });
        let before = Snapshot::take(&agent, &self.sink)?;
        let load = launch.go()?;
        let after = Snapshot::take(&agent, &self.sink)?;
        let metrics = settled_metrics(&agent);
        let (peak_rss_mib, cpu_s_total) = (agent.peak_rss_mib()?, agent.cpu_seconds()?);
        let clean_exit = agent.stop();
        if !clean_exit {
            eprintln!(
                "bench kafka: warning: the agent did not exit cleanly; see {}",
                log.display()
            );
        }
        let programs = bpf_stats::only(bpf_stats::delta(&before.progs, &after.progs), &owned);
        let (posts, bytes) = self.sink.totals();
        let messages = load.messages as f64;
        let kernel_run_ns: u64 = programs.iter().map(|p| p.run_ns).sum();
        let cpu_s = after.cpu_s - before.cpu_s;
        let spans = agent::metric_sum(&metrics, "zerotel_spans_total");
        let agent = AgentRound {
            cpu_s,
            cpu_s_per_mmsg: cpu_s / messages * 1e6,
            cpu_pct_of_core: cpu_s / load.seconds.max(1e-3) * 100.0,
            cpu_s_total,
            peak_rss_mib,
            spans,
            spans_exported: agent::metric_sum(&metrics, "zerotel_spans_exported_total"),
            spans_per_s: spans.map(|s| s / load.seconds.max(1e-3)),
            events_lost: agent::metric_sum(&metrics, "zerotel_events_lost_total"),
            kernel_run_ns,
            kernel_runs: programs.iter().map(|p| p.runs).sum(),
            kernel_ns_per_msg: kernel_run_ns as f64 / messages,
            otlp_posts: posts - before.posts,
            otlp_bytes: bytes - before.bytes,
            clean_exit,
            programs,
        };
        Ok((load, agent))
    }
}

/// The agent's CPU, its programs' kernel counters and the sink's totals at one instant.
struct Snapshot {
    cpu_s: f64,
    progs: Vec<ProgStat>,
    posts: u64,
    bytes: u64,
}

impl Snapshot {
    fn take(agent: &Agent, sink: &Sink) -> Result<Self> {
        let (posts, bytes) = sink.totals();
        Ok(Self {
            cpu_s: agent.cpu_seconds()?,
            progs: bpf_stats::snapshot(bpf_stats::PROG_PREFIX)?,
            posts,
            bytes,
        })
    }
}

/// /metrics once the agent has turned the last events into spans and exported them: after its
/// 1 s flush interval, when two reads 500 ms apart agree on spans made and exported (10 s max).
fn settled_metrics(agent: &Agent) -> String {
    let read = || {
        agent.metrics().unwrap_or_else(|e| {
            eprintln!("bench kafka: warning: {e:#}");
            String::new()
        })
    };
    let counts = |m: &str| {
        ["zerotel_spans_total", "zerotel_spans_exported_total"].map(|n| agent::metric_sum(m, n))
    };
    thread::sleep(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = read();
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = read();
        if counts(&now) == counts(&last) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

// ---- report ----

fn med(rounds: &[Round], mode: &str, f: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter(|r| r.mode == mode).filter_map(f))
}

fn throughput(r: &Round) -> Option<f64> {
    Some(r.load.msgs_per_s)
}

/// Median of `f` over the traced rounds' agents.
fn med_agent(rounds: &[Round], f: impl Fn(&AgentRound) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter_map(|r| r.agent.as_ref().and_then(&f)))
}

/// The worst traced round, for targets that every round must meet.
fn max_agent(rounds: &[Round], f: impl Fn(&AgentRound) -> Option<f64>) -> Option<f64> {
    rounds
        .iter()
        .filter_map(|r| r.agent.as_ref().and_then(&f))
        .reduce(f64::max)
}

fn ratio(rounds: &[Round]) -> Option<f64> {
    Some(med(rounds, "traced", throughput)? / med(rounds, "untraced", throughput)?)
}

fn report(ctx: &Ctx, rounds: &[Round], version: &str) -> Report {
    let a = ctx.args;
    let targets = targets(rounds);
    let json = json!({
        "scenario": "kafka",
        "config": {
            "rounds": a.rounds, "warmup": a.warmup > 0, "messages": MESSAGES,
            "message_bytes": MESSAGE_BYTES, "kcat": version,
            "untraced_only": ctx.agent.is_none(), "agent_args": a.agent_args,
        },
        "rounds": rounds,
        "medians": medians_json(rounds),
        "ratios_traced_over_untraced": { "msgs_per_s": ratio(rounds) },
        "targets": targets,
    });
    let markdown = [
        heading(a, version),
        table(rounds),
        summary(rounds),
        targets_markdown(&targets),
    ]
    .concat();
    Report { markdown, json }
}

fn medians_json(rounds: &[Round]) -> Value {
    let mode_medians = |mode| json!({ "msgs_per_s": med(rounds, mode, throughput) });
    let agent = json!({
        "cpu_s_per_mmsg": med_agent(rounds, |g| Some(g.cpu_s_per_mmsg)),
        "cpu_pct_of_core": med_agent(rounds, |g| Some(g.cpu_pct_of_core)),
        "peak_rss_mib": med_agent(rounds, |g| Some(g.peak_rss_mib)),
        "spans": med_agent(rounds, |g| g.spans),
        "spans_per_s": med_agent(rounds, |g| g.spans_per_s),
        "spans_exported": med_agent(rounds, |g| g.spans_exported),
        "events_lost": med_agent(rounds, |g| g.events_lost),
        "kernel_ns_per_msg": med_agent(rounds, |g| Some(g.kernel_ns_per_msg)),
    });
    json!({ "untraced": mode_medians("untraced"), "traced": mode_medians("traced"), "agent": agent })
}

fn heading(a: &BenchArgs, version: &str) -> String {
    format!(
        "## bench kafka: `kcat -P` of {MESSAGES} messages of {MESSAGE_BYTES} B to one partition ({version}), librdkafka mock broker on 127.0.0.1, {} rounds per mode\n\n\
         Traced: the agent traces kcat (PRODUCER spans, one per Produce request), exporting OTLP/HTTP to a local sink.\n\n",
        a.rounds
    )
}

fn table(rounds: &[Round]) -> String {
    let mut md = String::from(
        "| round | mode | msg/s | MiB/s | s | agent CPU s | CPU % of core | CPU s / Mmsg | peak RSS MiB | spans | spans/s | exported | lost | kernel ns/msg |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rounds {
        let g = r.agent.as_ref();
        md += &format!(
            "| {} | {} | {:.0} | {:.1} | {:.2} | {} |\n",
            r.round,
            r.mode,
            r.load.msgs_per_s,
            r.load.mib_per_s,
            r.load.seconds,
            agent_cells(|f| g.and_then(f)),
        );
    }
    for mode in ["untraced", "traced"] {
        let traced = |f: fn(&AgentRound) -> Option<f64>| {
            (mode == "traced").then(|| med_agent(rounds, f)).flatten()
        };
        md += &format!(
            "| **median** | {mode} | {} | {} | {} | {} |\n",
            num(med(rounds, mode, throughput), 0),
            num(med(rounds, mode, |r| Some(r.load.mib_per_s)), 1),
            num(med(rounds, mode, |r| Some(r.load.seconds)), 2),
            agent_cells(traced),
        );
    }
    md
}

/// The agent columns of a table row; `value` reads one field (None: n/a).
fn agent_cells(value: impl Fn(fn(&AgentRound) -> Option<f64>) -> Option<f64>) -> String {
    [
        num(value(|g| Some(g.cpu_s)), 2),
        num(value(|g| Some(g.cpu_pct_of_core)), 1),
        num(value(|g| Some(g.cpu_s_per_mmsg)), 2),
        num(value(|g| Some(g.peak_rss_mib)), 1),
        num(value(|g| g.spans), 0),
        num(value(|g| g.spans_per_s), 0),
        num(value(|g| g.spans_exported), 0),
        num(value(|g| g.events_lost), 0),
        num(value(|g| Some(g.kernel_ns_per_msg)), 1),
    ]
    .join(" | ")
}

fn summary(rounds: &[Round]) -> String {
    let x = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("x{v:.3}"));
    let mut s = format!(
        "\ntraced / untraced (medians): throughput {}\n",
        x(ratio(rounds))
    );
    if rounds.iter().any(|r| r.agent.is_some()) {
        s += &format!(
            "agent (medians): {} CPU s per million messages ({} % of one core), peak RSS {} MiB, {} spans ({} per second, {} exported), {} events lost, kernel {} ns/message\n",
            num(med_agent(rounds, |g| Some(g.cpu_s_per_mmsg)), 2),
            num(med_agent(rounds, |g| Some(g.cpu_pct_of_core)), 1),
            num(med_agent(rounds, |g| Some(g.peak_rss_mib)), 1),
            num(med_agent(rounds, |g| g.spans), 0),
            num(med_agent(rounds, |g| g.spans_per_s), 0),
            num(med_agent(rounds, |g| g.spans_exported), 0),
            num(med_agent(rounds, |g| g.events_lost), 0),
            num(med_agent(rounds, |g| Some(g.kernel_ns_per_msg)), 1),
        );
    } else {
        s += "agent: not run (--untraced-only)\n";
    }
    s
}

// ---- targets ----

fn targets(rounds: &[Round]) -> Vec<Target> {
    vec![
        Target::new(
            "throughput traced/untraced (median)",
            ratio(rounds),
            Cmp::AtLeast,
            TARGET_THROUGHPUT_RATIO,
            3,
        ),
        Target::new(
            "lost events (worst round)",
            max_agent(rounds, |g| g.events_lost),
            Cmp::Equals,
            0.0,
            0,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(mode: &'static str, msgs_per_s: f64) -> Round {
        Round {
            round: 1,
            mode,
            load: ProduceResult {
                messages: MESSAGES,
                seconds: MESSAGES as f64 / msgs_per_s,
                msgs_per_s,
                mib_per_s: 0.0,
            },
            agent: None,
        }
    }

    #[test]
    fn ratio_of_medians() {
        let rounds = [
            round("untraced", 100.0),
            round("traced", 90.0),
            round("untraced", 200.0),
            round("traced", 95.0),
            round("untraced", 110.0),
            round("traced", 99.0),
        ];
        assert_eq!(ratio(&rounds), Some(95.0 / 110.0));
        assert_eq!(ratio(&rounds[..1]), None);
    }

    #[test]
    fn reads_kcat_version() {
        let text = "kcat - Apache Kafka producer and consumer tool\n\
            Version 1.7.1 (JSON, Transactions, IncrementalAssign, librdkafka 2.0.2 builtin.features=gzip,snappy)\n";
        assert_eq!(parse_kcat_version(text), "kcat 1.7.1, librdkafka 2.0.2");
        assert_eq!(parse_kcat_version(""), "kcat unknown, librdkafka unknown");
    }

    #[test]
    fn judges_targets() {
        assert_eq!(
            targets_markdown(&targets(&[])),
            "\ntargets: throughput traced/untraced (median) n/a >= 0.95: n/a; lost events (worst round) n/a == 0: n/a\n"
        );
    }
}
