//! `bench startup`: how long the agent takes from launch to ready, what it holds at idle, and how
//! long SIGTERM takes, in the two ways it is run: tracing one selected process (`--pid`), and
//! tracing everything (no selector: every process is scanned at start). Each round launches a
//! fresh agent per mode, polls `/healthz` every few milliseconds until it answers 200, leaves it
//! idle, then stops it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::json;

use super::{
    agent::{self, Agent},
    proc::{self, Guard, TempDir},
    sink::Sink,
    targets::{num, targets_markdown, Cmp, Target},
    Ctx, Report, Scenario,
};
use crate::signals;

/// Idle time after ready, before RSS and CPU are read: start-up work (BTF, object parsing) is done.
const IDLE: Duration = Duration::from_secs(5);
/// How long SIGTERM may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);

// What the issue asks of the agent.
const TARGET_READY_S: f64 = 1.0;
const TARGET_IDLE_RSS_MIB: f64 = 30.0;

const SELECTED: &str = "one process (--pid)";
const EVERYTHING: &str = "everything (no selector)";

pub struct Startup;

impl Scenario for Startup {
    fn name(&self) -> &'static str {
        "startup"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let Some(exe) = ctx.agent else {
            bail!("bench startup measures the agent itself: it has no untraced rounds");
        };
        let tmp = TempDir::new("startup")?;
        let sink = Sink::start()?;
        let endpoint = format!("http://{}", sink.addr);
        // The selected process: a sleeper that lives as long as the bench.
        let sleeper = Command::new("sleep").arg("3600").stdin(Stdio::null()).spawn().context("cannot start `sleep`")?;
        let sleeper = Guard::new("sleep", sleeper);
        let selected = [sleeper.pid()];
        let mut rounds = Vec::new();
        for i in 1..=ctx.args.rounds {
            for (mode, pids) in [(SELECTED, &selected[..]), (EVERYTHING, &[][..])] {
                let log = tmp.path().join(format!("agent-{i}-{}.log", rounds.len()));
                let round = launch(exe, pids, &ctx.args.agent_args, &endpoint, log)
                    .with_context(|| format!("round {i}, {mode}"))?;
                eprintln!(
                    "bench startup: round {i}, {mode}: ready in {:.3} s, idle RSS {:.1} MiB, stopped in {:.2} s",
                    round.ready_s, round.idle_rss_mib, round.stop_s
                );
                rounds.push(Round { round: i, mode, ..round });
            }
        }
        Ok(report(ctx, &rounds))
    }
}

#[derive(Serialize, Clone)]
struct Round {
    round: usize,
    mode: &'static str,
    /// From spawn to the first 200 on /healthz.
    ready_s: f64,
    /// Resident set after `IDLE` seconds of idling.
    idle_rss_mib: f64,
    /// VmHWM at that point: the start-up's peak.
    peak_rss_mib: f64,
    /// CPU the agent used while idle, % of one core.
    idle_cpu_pct: f64,
    /// From SIGTERM to exit (detaching every probe).
    stop_s: f64,
    clean_exit: bool,
}

/// One agent run: spawn, time /healthz, idle, read /proc, SIGTERM.
fn launch(exe: &Path, pids: &[u32], user_args: &[String], endpoint: &str, log: PathBuf) -> Result<Round> {
    let mut agent = Agent::start(agent::Spec { exe, pids, otlp_endpoint: endpoint, extra_args: user_args, log })?;
    let cpu_before = agent.cpu_seconds()?;
    thread::sleep(IDLE);
    signals::check()?;
    let idle_cpu_pct = (agent.cpu_seconds()? - cpu_before) / IDLE.as_secs_f64() * 100.0;
    let idle_rss_mib = proc::rss_mib(agent.pid())?;
    let peak_rss_mib = agent.peak_rss_mib()?;
    let stopping = Instant::now();
    let clean_exit = agent.stop_within(STOP_GRACE);
    let stop_s = stopping.elapsed().as_secs_f64();
    let ready_s = agent.ready_after.as_secs_f64();
    Ok(Round { round: 0, mode: "", ready_s, idle_rss_mib, peak_rss_mib, idle_cpu_pct, stop_s, clean_exit })
}

fn median(rounds: &[Round], mode: &str, value: impl Fn(&Round) -> f64) -> Option<f64> {
    let mut values: Vec<f64> = rounds.iter().filter(|r| r.mode == mode).map(value).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

fn worst(rounds: &[Round], value: impl Fn(&Round) -> f64) -> Option<f64> {
    rounds.iter().map(value).max_by(f64::total_cmp)
}

fn report(ctx: &Ctx, rounds: &[Round]) -> Report {
    let targets = vec![
        Target::new("ready after launch, s (worst round)", worst(rounds, |r| r.ready_s), Cmp::AtMost, TARGET_READY_S, 3),
        Target::new("idle RSS MiB (worst round)", worst(rounds, |r| r.idle_rss_mib), Cmp::AtMost, TARGET_IDLE_RSS_MIB, 1),
    ];
    let medians: Vec<_> = [SELECTED, EVERYTHING]
        .iter()
        .map(|mode| {
            json!({
                "mode": mode,
                "ready_s": median(rounds, mode, |r| r.ready_s),
                "idle_rss_mib": median(rounds, mode, |r| r.idle_rss_mib),
                "peak_rss_mib": median(rounds, mode, |r| r.peak_rss_mib),
                "idle_cpu_pct": median(rounds, mode, |r| r.idle_cpu_pct),
                "stop_s": median(rounds, mode, |r| r.stop_s),
            })
        })
        .collect();
    let json = json!({
        "scenario": "startup",
        "config": { "rounds": ctx.args.rounds, "idle_s": IDLE.as_secs(), "agent_args": ctx.args.agent_args },
        "rounds": rounds,
        "medians": medians,
        "targets": targets,
    });
    let markdown = [table(ctx, rounds), targets_markdown(&targets)].concat();
    Report { markdown, json }
}

fn table(ctx: &Ctx, rounds: &[Round]) -> String {
    let mut md = format!(
        "## bench startup: launch to `/healthz` 200, {} s idle, SIGTERM to exit; {} rounds per mode\n\n\
         | round | mode | ready s | idle RSS MiB | peak RSS MiB | idle CPU % of core | stop s | clean exit |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n",
        IDLE.as_secs(),
        ctx.args.rounds
    );
    let row = |round: &str, mode: &str, values: [Option<f64>; 5], clean: &str| {
        let [ready, idle, peak, cpu, stop] = values;
        format!(
            "| {round} | {mode} | {} | {} | {} | {} | {} | {clean} |\n",
            num(ready, 3),
            num(idle, 1),
            num(peak, 1),
            num(cpu, 2),
            num(stop, 2)
        )
    };
    for r in rounds {
        let values = [Some(r.ready_s), Some(r.idle_rss_mib), Some(r.peak_rss_mib), Some(r.idle_cpu_pct), Some(r.stop_s)];
        md += &row(&r.round.to_string(), r.mode, values, if r.clean_exit { "yes" } else { "no" });
    }
    for mode in [SELECTED, EVERYTHING] {
        let med = |value: fn(&Round) -> f64| median(rounds, mode, value);
        let values = [med(|r| r.ready_s), med(|r| r.idle_rss_mib), med(|r| r.peak_rss_mib), med(|r| r.idle_cpu_pct), med(|r| r.stop_s)];
        md += &row("**median**", mode, values, "");
    }
    md + "\n"
}
