//! `bench http`: nginx answering HTTP/1.1 keep-alive requests under wrk, without and with the
//! agent tracing nginx (exporting OTLP/HTTP to a local sink).

use std::{path::Path, thread, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::json;

use super::{
    agent::{self, Agent},
    bpf_stats::{self, ProgStat, StatsEnabled},
    median,
    nginx::Nginx,
    proc::TempDir,
    sink::Sink,
    wrk::{self, Load, WrkResult},
    Ctx, Report, Scenario,
};
use crate::{signals, util::find_cmd};

pub struct Http;

impl Scenario for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let a = ctx.args;
        let wrk_bin = find_cmd("wrk").context("wrk is not installed: run `cargo xtask setup`")?;
        // Declared before nginx: dropped after it, so nginx's files outlive nginx.
        let tmp = TempDir::new("http")?;
        let nginx = Nginx::start(tmp.path())?;
        let url = format!("http://127.0.0.1:{}{}", nginx.port, a.path);
        eprintln!(
            "bench http: nginx master {} workers {:?} on {url}",
            nginx.master, nginx.workers
        );
        let load = |duration_s| Load {
            threads: a.threads,
            connections: a.connections,
            duration_s,
            url: &url,
        };
        if a.warmup > 0 {
            wrk::run(&wrk_bin, &load(a.warmup)).context("warm-up load failed")?;
        }
        let tracer = match ctx.agent {
            Some(exe) => Some(Tracer::new(exe, &nginx, &a.agent_args)?),
            None => None,
        };
        let mut rounds = Vec::new();
        for i in 1..=a.rounds {
            for traced in [false, true] {
                signals::check()?;
                let round = match (&tracer, traced) {
                    (_, false) => untraced_round(i, &wrk_bin, &load(a.duration))?,
                    (Some(t), true) => t.round(i, &wrk_bin, &load(a.duration), tmp.path())?,
                    (None, true) => continue,
                };
                eprintln!("bench http: {}", round.summary());
                rounds.push(round);
            }
        }
        Ok(report(ctx, &rounds))
    }
}

#[derive(Serialize)]
struct Round {
    round: usize,
    mode: &'static str,
    #[serde(flatten)]
    wrk: WrkResult,
    agent: Option<AgentRound>,
}

impl Round {
    fn summary(&self) -> String {
        format!(
            "round {} {}: {:.0} req/s, p50 {}, p99 {}",
            self.round,
            self.mode,
            self.wrk.requests_per_s,
            fmt_us(self.wrk.p50_us),
            fmt_us(self.wrk.p99_us)
        )
    }
}

#[derive(Serialize)]
struct AgentRound {
    /// CPU used by the agent process during the load.
    cpu_s: f64,
    cpu_s_per_mreq: f64,
    /// Including start-up (BTF, program loading) and the post-load flush.
    cpu_s_total: f64,
    peak_rss_mib: f64,
    spans: Option<f64>,
    events_lost: Option<f64>,
    kernel_run_ns: u64,
    kernel_runs: u64,
    kernel_ns_per_req: f64,
    kernel_ns_per_run: f64,
    otlp_posts: u64,
    otlp_bytes: u64,
    clean_exit: bool,
    programs: Vec<ProgStat>,
}

fn untraced_round(i: usize, wrk_bin: &Path, load: &Load) -> Result<Round> {
    let wrk = wrk::run(wrk_bin, load)?;
    Ok(Round {
        round: i,
        mode: "untraced",
        wrk,
        agent: None,
    })
}

/// What the traced rounds share: the OTLP sink and kernel BPF stats (on for the whole bench).
struct Tracer<'a> {
    exe: &'a Path,
    pids: Vec<u32>,
    extra_args: &'a [String],
    sink: Sink,
    _stats: StatsEnabled,
}

impl<'a> Tracer<'a> {
    fn new(exe: &'a Path, nginx: &Nginx, extra_args: &'a [String]) -> Result<Self> {
        Ok(Self {
            exe,
            pids: nginx.pids(),
            extra_args,
            sink: Sink::start()?,
            _stats: StatsEnabled::enable()?,
        })
    }

    fn round(&self, i: usize, wrk_bin: &Path, load: &Load, tmp: &Path) -> Result<Round> {
        let endpoint = self.sink.endpoint();
        let mut agent = Agent::start(agent::Spec {
            exe: self.exe,
            pids: &self.pids,
            otlp_endpoint: &endpoint,
            extra_args: self.extra_args,
            log: tmp.join(format!("agent-{i}.log")),
        })?;
        let (cpu0, progs0) = (
            agent.cpu_seconds()?,
            bpf_stats::snapshot(bpf_stats::PROG_PREFIX)?,
        );
        let (posts0, bytes0) = self.sink.totals();
        let wrk = wrk::run(wrk_bin, load)?;
        let (cpu1, progs1) = (
            agent.cpu_seconds()?,
            bpf_stats::snapshot(bpf_stats::PROG_PREFIX)?,
        );
        // Give the agent a moment to turn the last events into spans before reading counters.
        thread::sleep(Duration::from_secs(1));
        let metrics = agent.metrics().unwrap_or_else(|e| {
            eprintln!("bench http: warning: {e:#}");
            String::new()
        });
        let (peak_rss_mib, cpu_s_total) = (agent.peak_rss_mib()?, agent.cpu_seconds()?);
        let clean_exit = agent.stop();
        if !clean_exit {
            eprintln!(
                "bench http: warning: the agent did not exit cleanly; see {}",
                agent.log.display()
            );
        }
        let (posts1, bytes1) = self.sink.totals();
        let programs = bpf_stats::delta(&progs0, &progs1);
        let requests = requests_of(&wrk, load.duration_s);
        let kernel_run_ns: u64 = programs.iter().map(|p| p.run_ns).sum();
        let kernel_runs: u64 = programs.iter().map(|p| p.runs).sum();
        let agent = AgentRound {
            cpu_s: cpu1 - cpu0,
            cpu_s_per_mreq: (cpu1 - cpu0) / requests * 1e6,
            cpu_s_total,
            peak_rss_mib,
            spans: agent::metric_sum(&metrics, "zerotel_spans_total"),
            events_lost: agent::metric_sum(&metrics, "zerotel_events_lost_total"),
            kernel_run_ns,
            kernel_runs,
            kernel_ns_per_req: kernel_run_ns as f64 / requests,
            kernel_ns_per_run: kernel_run_ns as f64 / kernel_runs.max(1) as f64,
            otlp_posts: posts1 - posts0,
            otlp_bytes: bytes1 - bytes0,
            clean_exit,
            programs,
        };
        Ok(Round {
            round: i,
            mode: "traced",
            wrk,
            agent: Some(agent),
        })
    }
}

/// Completed requests: wrk's count, else rate x duration.
fn requests_of(wrk: &WrkResult, duration_s: u64) -> f64 {
    let n = if wrk.requests > 0 {
        wrk.requests as f64
    } else {
        wrk.requests_per_s * duration_s as f64
    };
    n.max(1.0)
}

// ---- report ----

fn med(rounds: &[Round], mode: &str, f: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter(|r| r.mode == mode).filter_map(f))
}

fn med_agent(rounds: &[Round], f: impl Fn(&AgentRound) -> Option<f64>) -> Option<f64> {
    med(rounds, "traced", |r| r.agent.as_ref().and_then(&f))
}

fn ratio(rounds: &[Round], f: impl Fn(&Round) -> Option<f64> + Copy) -> Option<f64> {
    Some(med(rounds, "traced", f)? / med(rounds, "untraced", f)?)
}

fn report(ctx: &Ctx, rounds: &[Round]) -> Report {
    let a = ctx.args;
    let rps = |r: &Round| Some(r.wrk.requests_per_s);
    let p50 = |r: &Round| Some(r.wrk.p50_us);
    let p99 = |r: &Round| Some(r.wrk.p99_us);
    let mode_medians = |mode| json!({"requests_per_s": med(rounds, mode, rps), "p50_us": med(rounds, mode, p50), "p99_us": med(rounds, mode, p99)});
    let agent_medians = json!({
        "cpu_s_per_mreq": med_agent(rounds, |g| Some(g.cpu_s_per_mreq)),
        "peak_rss_mib": med_agent(rounds, |g| Some(g.peak_rss_mib)),
        "events_lost": med_agent(rounds, |g| g.events_lost),
        "spans": med_agent(rounds, |g| g.spans),
        "kernel_ns_per_req": med_agent(rounds, |g| Some(g.kernel_ns_per_req)),
        "kernel_ns_per_run": med_agent(rounds, |g| Some(g.kernel_ns_per_run)),
    });
    let json = json!({
        "scenario": "http",
        "config": {
            "rounds": a.rounds, "duration_s": a.duration, "connections": a.connections,
            "threads": a.threads, "warmup_s": a.warmup, "path": a.path,
            "untraced_only": ctx.agent.is_none(), "agent_args": a.agent_args,
        },
        "rounds": rounds,
        "medians": { "untraced": mode_medians("untraced"), "traced": mode_medians("traced"), "agent": agent_medians },
        "ratios_traced_over_untraced": {
            "requests_per_s": ratio(rounds, rps), "p50": ratio(rounds, p50), "p99": ratio(rounds, p99),
        },
    });
    Report {
        markdown: markdown(a, rounds),
        json,
    }
}

fn markdown(a: &super::BenchArgs, rounds: &[Round]) -> String {
    let mut md = format!(
        "## bench http: nginx `GET {}` under `wrk -t{} -c{} -d{}s`, {} rounds per mode\n\n",
        a.path, a.threads, a.connections, a.duration, a.rounds
    );
    md += "| round | mode | req/s | p50 | p99 | errors | agent CPU s | CPU s / Mreq | peak RSS MiB | spans | lost | kernel ns/req | ns/run |\n";
    md += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in rounds {
        let g = r.agent.as_ref();
        let w = &r.wrk;
        md += &format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.round,
            r.mode,
            w.requests_per_s,
            fmt_us(w.p50_us),
            fmt_us(w.p99_us),
            w.socket_errors + w.non_2xx,
            num(g.map(|g| g.cpu_s), 2),
            num(g.map(|g| g.cpu_s_per_mreq), 2),
            num(g.map(|g| g.peak_rss_mib), 1),
            num(g.and_then(|g| g.spans), 0),
            num(g.and_then(|g| g.events_lost), 0),
            num(g.map(|g| g.kernel_ns_per_req), 0),
            num(g.map(|g| g.kernel_ns_per_run), 0),
        );
    }
    for mode in ["untraced", "traced"] {
        let m = |f: fn(&Round) -> Option<f64>| med(rounds, mode, f);
        let ma = |f: fn(&AgentRound) -> Option<f64>| {
            if mode == "traced" {
                med_agent(rounds, f)
            } else {
                None
            }
        };
        md += &format!(
            "| **median** | {mode} | {} | {} | {} | | | {} | {} | {} | {} | {} | {} |\n",
            num(m(|r| Some(r.wrk.requests_per_s)), 0),
            m(|r| Some(r.wrk.p50_us)).map_or("n/a".into(), fmt_us),
            m(|r| Some(r.wrk.p99_us)).map_or("n/a".into(), fmt_us),
            num(ma(|g| Some(g.cpu_s_per_mreq)), 2),
            num(ma(|g| Some(g.peak_rss_mib)), 1),
            num(ma(|g| g.spans), 0),
            num(ma(|g| g.events_lost), 0),
            num(ma(|g| Some(g.kernel_ns_per_req)), 0),
            num(ma(|g| Some(g.kernel_ns_per_run)), 0),
        );
    }
    md += &summary(rounds);
    md
}

fn summary(rounds: &[Round]) -> String {
    let x = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("x{v:.3}"));
    let mut s = format!(
        "\ntraced / untraced (medians): req/s {}, p50 {}, p99 {}\n",
        x(ratio(rounds, |r| Some(r.wrk.requests_per_s))),
        x(ratio(rounds, |r| Some(r.wrk.p50_us))),
        x(ratio(rounds, |r| Some(r.wrk.p99_us))),
    );
    if rounds.iter().any(|r| r.agent.is_some()) {
        s += &format!(
            "agent (medians): {} CPU s per million requests, peak RSS {} MiB, {} events lost, {} spans, kernel {} ns/request ({} ns/program run)\n",
            num(med_agent(rounds, |g| Some(g.cpu_s_per_mreq)), 2),
            num(med_agent(rounds, |g| Some(g.peak_rss_mib)), 1),
            num(med_agent(rounds, |g| g.events_lost), 0),
            num(med_agent(rounds, |g| g.spans), 0),
            num(med_agent(rounds, |g| Some(g.kernel_ns_per_req)), 0),
            num(med_agent(rounds, |g| Some(g.kernel_ns_per_run)), 0),
        );
    } else {
        s += "agent: not run (--untraced-only)\n";
    }
    s
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.decimals$}"))
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.0}us")
    }
}
