//! `bench sweep`: what the agent costs across offered loads, up to saturation. nginx `GET /` at
//! each of `--sweep-rates` (the open-loop fixed-rate client) and then as fast as wrk goes,
//! untraced and traced rounds alternating at each load. Per load: throughput ratio, latency, the
//! agent's CPU (% of a core, CPU s per million spans), peak RSS, lost events, kernel ns per request.

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{
    med, med_agent_in, ratio, round, rps, AgentRound, LoadStats, Loads, NoHooks, Round, Tracer, TRACED, UNTRACED,
};
use crate::{
    bench::{
        nginx::Nginx,
        proc::TempDir,
        rate::{self, RateLoad},
        targets::{fmt_us, num, targets_markdown, Cmp, Target},
        wrk, Ctx, Report, Scenario,
    },
    util::find_cmd,
};

// What the issue asks of the agent.
const TARGET_CPU_PCT_AT_5K: f64 = 5.0;
/// 100k spans per second per core.
const TARGET_CPU_S_PER_MSPANS: f64 = 10.0;
const TARGET_RSS_MIB_AT_20K: f64 = 60.0;

pub struct Sweep;

impl Scenario for Sweep {
    fn name(&self) -> &'static str {
        "sweep"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let a = ctx.args;
        let wrk_bin = find_cmd("wrk").context("wrk is not installed: run `cargo xtask setup`")?;
        let tmp = TempDir::new("sweep")?;
        let nginx = Nginx::start(tmp.path())?;
        let url = format!("http://127.0.0.1:{}{}", nginx.port, a.path);
        let loads = Loads { args: a, url: &url, port: nginx.port, close: false };
        loads.warm_up(&wrk_bin)?;
        let tracer = match ctx.agent {
            Some(exe) => Some(Tracer::new(exe, nginx.pids(), &a.agent_args, tmp.path().into())?),
            None => None,
        };
        let mut steps = Vec::new();
        for &rate in &a.sweep_rates {
            let fixed = RateLoad { rate, ..loads.fixed_rate() };
            let mut rounds = Vec::new();
            for i in 1..=a.rounds {
                for mode in [UNTRACED, TRACED] {
                    let load = || rate::run(&fixed);
                    rounds.extend(round(tracer.as_ref(), &mode, i, &format!("rate{rate}"), &NoHooks, load)?);
                }
            }
            steps.push(step(&format!("{rate} req/s"), Some(rate), &rounds));
        }
        let mut rounds = Vec::new();
        for i in 1..=a.rounds {
            for mode in [UNTRACED, TRACED] {
                let load = || wrk::run(&wrk_bin, &loads.saturate(a.duration));
                rounds.extend(round(tracer.as_ref(), &mode, i, "saturation", &NoHooks, load)?);
            }
        }
        steps.push(step("saturation", None, &rounds));
        Ok(report(ctx, &steps))
    }
}

/// The agent's CPU per million spans it produced in a round.
fn cpu_s_per_mspans<L>(r: &Round<L>) -> Option<f64> {
    let agent = r.agent.as_ref()?;
    agent.spans.filter(|&spans| spans > 0.0).map(|spans| agent.cpu_s / spans * 1e6)
}

/// One offered load: its rounds and their medians.
fn step<L: LoadStats>(load: &str, rate: Option<u32>, rounds: &[Round<L>]) -> Value {
    let agent = |f: fn(&AgentRound) -> Option<f64>| med_agent_in(rounds, TRACED.name, f);
    let both = |f: fn(&Round<L>) -> Option<f64>| json!({ "untraced": med(rounds, UNTRACED.name, f), "traced": med(rounds, TRACED.name, f) });
    json!({
        "load": load,
        "rate_per_s": rate,
        "rounds": rounds,
        "requests_per_s": both(rps),
        "requests_per_s_ratio": ratio(rounds, rps),
        "p50_us": both(|r| Some(r.load.p50_us())),
        "p99_us": both(|r| Some(r.load.p99_us())),
        "agent_cpu_pct_of_core": agent(|g| Some(g.cpu_pct_of_core)),
        "agent_cpu_s_per_mspans": med(rounds, TRACED.name, cpu_s_per_mspans),
        "agent_peak_rss_mib": agent(|g| Some(g.peak_rss_mib)),
        "events_lost": agent(|g| g.events_lost),
        "kernel_ns_per_req": agent(|g| Some(g.kernel_ns_per_req)),
    })
}

fn report(ctx: &Ctx, steps: &[Value]) -> Report {
    let a = ctx.args;
    let targets = targets(steps);
    let json = json!({
        "scenario": "sweep",
        "config": {
            "rates": a.sweep_rates, "rounds": a.rounds, "duration_s": a.duration, "rate_duration_s": a.rate_duration(),
            "connections": a.connections, "threads": a.threads, "path": a.path, "agent_args": a.agent_args,
        },
        "steps": steps,
        "targets": targets,
    });
    let mut md = format!(
        "## bench sweep: nginx `GET {}` at fixed rates ({} keep-alive connections, {} s rounds) then at saturation (`wrk -t{} -c{} -d{}s`), {} rounds per mode and load\n\n\
         Medians per load; agent figures from the traced rounds.\n\n\
         | load | req/s untraced / traced | ratio | p50 untraced / traced | p99 untraced / traced | agent CPU % of core | CPU s / M spans | peak RSS MiB | lost | kernel ns/req |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        a.path, a.connections, a.rate_duration(), a.threads, a.connections, a.duration, a.rounds
    );
    for step in steps {
        let f = |key: &str, decimals| num(step[key].as_f64(), decimals);
        let pair = |key: &str, show: fn(Option<f64>) -> String| format!("{} / {}", show(step[key]["untraced"].as_f64()), show(step[key]["traced"].as_f64()));
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            step["load"].as_str().unwrap_or("?"),
            pair("requests_per_s", |v| num(v, 0)),
            f("requests_per_s_ratio", 3),
            pair("p50_us", us),
            pair("p99_us", us),
            f("agent_cpu_pct_of_core", 1),
            f("agent_cpu_s_per_mspans", 2),
            f("agent_peak_rss_mib", 1),
            f("events_lost", 0),
            f("kernel_ns_per_req", 0),
        );
    }
    md += "\n";
    md += &targets_markdown(&targets);
    Report { markdown: md, json }
}

fn us(v: Option<f64>) -> String {
    v.map_or("n/a".into(), fmt_us)
}

fn targets(steps: &[Value]) -> Vec<Target> {
    let rate = |step: &Value| step["rate_per_s"].as_u64();
    let at = |r: u64, key: &str| steps.iter().find(|s| rate(s) == Some(r)).and_then(|s| s[key].as_f64());
    let busiest = steps.iter().filter(|s| rate(s).is_some()).max_by_key(|s| rate(s));
    let lost = steps
        .iter()
        .filter(|s| rate(s).is_some_and(|r| r <= 20_000))
        .filter_map(|s| s["events_lost"].as_f64())
        .reduce(f64::max);
    vec![
        Target::new("agent CPU % of a core at 5000 req/s (median)", at(5000, "agent_cpu_pct_of_core"), Cmp::AtMost, TARGET_CPU_PCT_AT_5K, 1),
        Target::new(
            "agent CPU s per million spans at the highest fixed rate (median)",
            busiest.and_then(|s| s["agent_cpu_s_per_mspans"].as_f64()),
            Cmp::AtMost,
            TARGET_CPU_S_PER_MSPANS,
            2,
        ),
        Target::new("agent peak RSS MiB at 20000 req/s (median)", at(20_000, "agent_peak_rss_mib"), Cmp::AtMost, TARGET_RSS_MIB_AT_20K, 1),
        Target::new("lost events at fixed rates up to 20000 req/s (worst load)", lost, Cmp::Equals, 0.0, 0),
    ]
}
