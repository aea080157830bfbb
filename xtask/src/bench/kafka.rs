//! `bench kafka`: producer throughput against librdkafka's mock cluster (a real Kafka-protocol
//! broker on 127.0.0.1, held by an untraced Python process), without and with the agent tracing
//! the producer (its Produce requests become PRODUCER spans, exported OTLP/HTTP to a local sink).
//!
//! The producer is kcat (C, on the system librdkafka) sending the lines of a file as messages
//! to one partition, batched as librdkafka does by default: it is limited by librdkafka's
//! sending, where the agent's probes run, not by an interpreter. kcat is a new process every
//! round and the agent must see it from its first byte: the rounds hold it at the starting line
//! until the agent is ready (see `client_rounds`).

use std::{
    fmt, fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    client_rounds::{self, max_agent, med, med_agent, ratio, AgentUse, Bench, Client, Exit},
    proc::{self, Guard, TempDir},
    targets::{num, targets_markdown, Cmp, Target},
    BenchArgs, Ctx, Report, Scenario,
};
use crate::util;

/// Messages per round, and their size: about 1.3 s of kcat untraced on 2 CPUs.
const MESSAGES: usize = 2_000_000;
const MESSAGE_BYTES: usize = 100;
/// Created by the mock on first use (4 partitions); every message goes to partition 0.
const TOPIC: &str = "bench";
const CLIENT_ID: &str = "zerotel-bench";
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
        let bench = Bench::new("kafka", ctx, dir.path())?;
        let kcat = Kcat {
            bootstrap: &broker.bootstrap,
            messages: write_messages(dir.path())?,
        };
        if a.warmup > 0 {
            bench
                .untraced(&kcat, "warmup")
                .context("warm-up round failed")?;
        }
        let rounds = bench.rounds(&kcat, a.rounds)?;
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

/// kcat producing every line of `messages` to partition 0 of the topic.
struct Kcat<'a> {
    bootstrap: &'a str,
    messages: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
struct ProduceResult {
    messages: usize,
    /// Wall time from the release of kcat to its exit (connecting and the final flush included).
    seconds: f64,
    msgs_per_s: f64,
    mib_per_s: f64,
}

/// The agent's figures relative to kcat's messages.
#[derive(Serialize)]
struct PerMessage {
    cpu_s_per_mmsg: f64,
    /// spans over kcat's wall time.
    spans_per_s: Option<f64>,
    kernel_ns_per_msg: f64,
}

type Round = client_rounds::Round<ProduceResult, PerMessage>;
type AgentRound = client_rounds::AgentRound<PerMessage>;

impl Client for Kcat<'_> {
    const NAME: &'static str = "kcat";
    /// Fine: kcat's wall time is the throughput's denominator.
    const POLL: Duration = Duration::from_millis(5);
    type Load = ProduceResult;
    type PerLoad = PerMessage;

    fn program(&self) -> PathBuf {
        "kcat".into()
    }

    fn args(&self) -> Vec<String> {
        let messages = self.messages.display().to_string();
        let client_id = format!("client.id={CLIENT_ID}");
        ["-P", "-b", self.bootstrap, "-t", TOPIC, "-p", "0"]
            .into_iter()
            .chain(["-X", &client_id, "-l", &messages])
            .map(String::from)
            .collect()
    }

    /// A clean exit is not enough: an ERROR that librdkafka logged fails the run too.
    fn load(exit: Exit) -> Result<ProduceResult> {
        let errors = fs::read_to_string(&exit.stderr_log).unwrap_or_default();
        if errors.contains("ERROR") {
            bail!(
                "kcat failed ({}):\n{}",
                exit.status,
                proc::tail(&exit.stderr_log, 30)
            );
        }
        Ok(ProduceResult {
            messages: MESSAGES,
            seconds: exit.seconds,
            msgs_per_s: MESSAGES as f64 / exit.seconds,
            mib_per_s: (MESSAGES * MESSAGE_BYTES) as f64 / exit.seconds / (1024.0 * 1024.0),
        })
    }

    fn per_load(load: &ProduceResult, agent: &AgentUse) -> PerMessage {
        let messages = load.messages as f64;
        PerMessage {
            cpu_s_per_mmsg: agent.cpu_s / messages * 1e6,
            spans_per_s: agent.spans.map(|s| s / load.seconds.max(1e-3)),
            kernel_ns_per_msg: agent.kernel_run_ns as f64 / messages,
        }
    }
}

impl fmt::Display for ProduceResult {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{:.0} msg/s ({:.1} MiB/s) in {:.2} s",
            self.msgs_per_s, self.mib_per_s, self.seconds
        )
    }
}

// ---- report ----

fn throughput(r: &Round) -> Option<f64> {
    Some(r.load.msgs_per_s)
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
        "ratios_traced_over_untraced": { "msgs_per_s": ratio(rounds, throughput) },
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
        "cpu_s_per_mmsg": med_agent(rounds, |g| Some(g.per_load.cpu_s_per_mmsg)),
        "cpu_pct_of_core": med_agent(rounds, |g| Some(g.usage.cpu_pct_of_core)),
        "peak_rss_mib": med_agent(rounds, |g| Some(g.usage.peak_rss_mib)),
        "spans": med_agent(rounds, |g| g.usage.spans),
        "spans_per_s": med_agent(rounds, |g| g.per_load.spans_per_s),
        "spans_exported": med_agent(rounds, |g| g.usage.spans_exported),
        "events_lost": med_agent(rounds, |g| g.usage.events_lost),
        "kernel_ns_per_msg": med_agent(rounds, |g| Some(g.per_load.kernel_ns_per_msg)),
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
        md += &format!(
            "| **median** | {mode} | {} | {} | {} | {} |\n",
            num(med(rounds, mode, throughput), 0),
            num(med(rounds, mode, |r| Some(r.load.mib_per_s)), 1),
            num(med(rounds, mode, |r| Some(r.load.seconds)), 2),
            agent_cells(|f| med(rounds, mode, |r| r.agent.as_ref().and_then(f))),
        );
    }
    md
}

/// The agent columns of a table row; `value` reads one field (None: n/a).
fn agent_cells(value: impl Fn(fn(&AgentRound) -> Option<f64>) -> Option<f64>) -> String {
    [
        num(value(|g| Some(g.usage.cpu_s)), 2),
        num(value(|g| Some(g.usage.cpu_pct_of_core)), 1),
        num(value(|g| Some(g.per_load.cpu_s_per_mmsg)), 2),
        num(value(|g| Some(g.usage.peak_rss_mib)), 1),
        num(value(|g| g.usage.spans), 0),
        num(value(|g| g.per_load.spans_per_s), 0),
        num(value(|g| g.usage.spans_exported), 0),
        num(value(|g| g.usage.events_lost), 0),
        num(value(|g| Some(g.per_load.kernel_ns_per_msg)), 1),
    ]
    .join(" | ")
}

fn summary(rounds: &[Round]) -> String {
    let x = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("x{v:.3}"));
    let mut s = format!(
        "\ntraced / untraced (medians): throughput {}\n",
        x(ratio(rounds, throughput))
    );
    if rounds.iter().any(|r| r.agent.is_some()) {
        s += &format!(
            "agent (medians): {} CPU s per million messages ({} % of one core), peak RSS {} MiB, {} spans ({} per second, {} exported), {} events lost, kernel {} ns/message\n",
            num(med_agent(rounds, |g| Some(g.per_load.cpu_s_per_mmsg)), 2),
            num(med_agent(rounds, |g| Some(g.usage.cpu_pct_of_core)), 1),
            num(med_agent(rounds, |g| Some(g.usage.peak_rss_mib)), 1),
            num(med_agent(rounds, |g| g.usage.spans), 0),
            num(med_agent(rounds, |g| g.per_load.spans_per_s), 0),
            num(med_agent(rounds, |g| g.usage.spans_exported), 0),
            num(med_agent(rounds, |g| g.usage.events_lost), 0),
            num(med_agent(rounds, |g| Some(g.per_load.kernel_ns_per_msg)), 1),
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
            ratio(rounds, throughput),
            Cmp::AtLeast,
            TARGET_THROUGHPUT_RATIO,
            3,
        ),
        Target::new(
            "lost events (worst round)",
            max_agent(rounds, |g| g.usage.events_lost),
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
        assert_eq!(ratio(&rounds, throughput), Some(95.0 / 110.0));
        assert_eq!(ratio(&rounds[..1], throughput), None);
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
