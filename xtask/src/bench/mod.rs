//! `cargo xtask bench [NAME...]`: traced-vs-untraced benchmarks against real peers.
//! A scenario is a `Scenario` in `scenarios()`; each writes target/bench/NAME.{md,json}, and every
//! run rewrites target/bench/summary.{md,json}, the targets of the latest report of each.

mod agent;
mod bpf_stats;
mod client_rounds;
mod grpc;
mod http;
mod http1;
mod kafka;
mod nginx;
mod postgres;
mod proc;
mod rate;
mod sdk;
mod sink;
mod startup;
mod summary;
mod targets;
mod wrk;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::{cargo_cmd, setup, signals, util};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Scenarios to run (all when none given). Available: http, http-close, https, sweep,
    /// postgres, kafka, grpc, startup, sdk.
    pub names: Vec<String>,
    /// Rounds per mode; modes alternate untraced, traced, untraced, ... (saturation, then
    /// fixed rate).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Load duration of each round, seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Concurrent connections (wrk -c; also the fixed-rate rounds' keep-alive connections).
    #[arg(long, default_value_t = 50)]
    pub connections: u32,
    /// Load generator threads (wrk -t).
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Unreported warm-up load before the first round, seconds (0: none).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Offered load of the fixed-rate rounds, total requests per second over --connections.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// Offered loads of `sweep`'s fixed-rate steps, req/s (comma-separated); saturation follows.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 5_000, 10_000, 20_000])]
    pub sweep_rates: Vec<u32>,
    /// Duration of each fixed-rate round, seconds [default: --duration].
    #[arg(long, value_name = "SECS")]
    pub rate_duration: Option<u64>,
    /// Request path (`/` answers from nginx config, `/static/1k.bin` serves a 1 KiB file).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// http: price trace context propagation instead. wrk -> nginx A (reverse proxy) ->
    /// nginx B, both traced; modes untraced, traced with --no-propagation, traced with
    /// propagation. Writes http-propagation.{md,json}.
    #[arg(long)]
    pub propagation: bool,
    /// Only the untraced rounds: no agent build, no root needed (to check the harness itself).
    #[arg(long, hide = true)]
    pub untraced_only: bool,
    /// Benchmark this agent binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// Extra arguments for the agent in traced rounds.
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

/// What a scenario sees.
pub struct Ctx<'a> {
    pub args: &'a BenchArgs,
    /// The release agent; None with --untraced-only.
    pub agent: Option<&'a Path>,
}

pub struct Report {
    pub markdown: String,
    pub json: serde_json::Value,
}

pub trait Scenario {
    fn name(&self) -> &'static str;
    /// Name of the report files (target/bench/NAME.{md,json}).
    fn output_name(&self, _args: &BenchArgs) -> String {
        self.name().into()
    }
    fn run(&self, ctx: &Ctx) -> Result<Report>;
}

fn scenarios() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(http::Http { close: false }),
        Box::new(http::Http { close: true }),
        Box::new(http::Https),
        Box::new(http::Sweep),
        Box::new(postgres::Postgres),
        Box::new(kafka::Kafka),
        Box::new(grpc::Grpc),
        Box::new(startup::Startup),
        Box::new(sdk::Sdk),
    ]
}

pub fn run(args: BenchArgs) -> Result<()> {
    let selected = select(&args.names)?;
    check_args(&args)?;
    setup::run(setup::Opts { peers: true })?;
    let agent = if args.untraced_only {
        None
    } else {
        if !util::is_root() {
            bail!("bench loads the agent's eBPF programs and enables kernel.bpf_stats_enabled: run it as root (e.g. `sudo -E cargo xtask bench`)");
        }
        match &args.agent_bin {
            Some(exe) => Some(
                fs::canonicalize(exe).with_context(|| format!("--agent-bin {}", exe.display()))?,
            ),
            None => Some(
                cargo_cmd::build_agent(true)
                    .context("bench needs the release agent, and building it failed")?,
            ),
        }
    };
    signals::install();
    let out_dir = cargo_cmd::target_dir()?.join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let machine = Machine::collect(args.agent_bin.as_deref());
    let ctx = Ctx {
        args: &args,
        agent: agent.as_deref(),
    };
    for scenario in selected {
        eprintln!("bench: scenario {}", scenario.name());
        let report = scenario
            .run(&ctx)
            .with_context(|| format!("bench {} failed", scenario.name()))?;
        write_report(&out_dir, &scenario.output_name(&args), &machine, report)?;
    }
    summary::write(&out_dir)
}

fn select(names: &[String]) -> Result<Vec<Box<dyn Scenario>>> {
    let all = scenarios();
    if names.is_empty() {
        return Ok(all);
    }
    let known: Vec<&str> = all.iter().map(|s| s.name()).collect();
    if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_str())) {
        bail!(
            "unknown bench scenario `{bad}`; available: {}",
            known.join(", ")
        );
    }
    Ok(all
        .into_iter()
        .filter(|s| names.iter().any(|n| n == s.name()))
        .collect())
}

fn check_args(a: &BenchArgs) -> Result<()> {
    if a.rounds == 0 || a.duration == 0 {
        bail!("--rounds and --duration must be at least 1");
    }
    if a.rate == 0 || a.rate_duration == Some(0) || a.sweep_rates.contains(&0) {
        bail!("--rate, --sweep-rates and --rate-duration must be at least 1");
    }
    if a.threads == 0 || a.connections < a.threads {
        bail!("wrk needs --connections >= --threads >= 1");
    }
    if !a.path.starts_with('/') {
        bail!("--path must start with /");
    }
    if a.propagation && a.agent_args.iter().any(|x| x == "--no-propagation") {
        bail!("--propagation compares the agent with and without --no-propagation: do not pass it");
    }
    Ok(())
}

impl BenchArgs {
    pub fn rate_duration(&self) -> u64 {
        self.rate_duration.unwrap_or(self.duration)
    }
}

fn write_report(dir: &Path, name: &str, machine: &Machine, report: Report) -> Result<()> {
    let markdown = format!("{}\n{}", report.markdown, machine.markdown());
    println!("{markdown}");
    let mut json = report.json;
    json["machine"] = serde_json::to_value(machine)?;
    let (md_path, json_path) = (
        dir.join(format!("{name}.md")),
        dir.join(format!("{name}.json")),
    );
    fs::write(&md_path, markdown).with_context(|| format!("cannot write {}", md_path.display()))?;
    fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    eprintln!(
        "bench: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    kernel: String,
    nginx: String,
    wrk: String,
    /// The source tree's revision: the agent's, unless `agent_bin` says which binary ran.
    agent_rev: String,
    /// `--agent-bin`, when the agent measured was not built from this tree.
    agent_bin: Option<String>,
    unix_time: u64,
}

impl Machine {
    fn collect(agent_bin: Option<&Path>) -> Self {
        let wrk = util::find_cmd("wrk")
            .map(|w| wrk::version(&w))
            .unwrap_or_else(|| "missing".into());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            nginx: nginx::version(),
            wrk,
            agent_rev: git_rev(),
            agent_bin: agent_bin.map(|path| path.display().to_string()),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn markdown(&self) -> String {
        let agent = match &self.agent_bin {
            Some(path) => format!("agent {path} (tree {})", self.agent_rev),
            None => format!("zerotel {}", self.agent_rev),
        };
        format!(
            "Machine: {} CPUs, Linux {}, {}, {}, {agent}\n",
            self.nproc, self.kernel, self.nginx, self.wrk
        )
    }
}

fn git_rev() -> String {
    let mut cmd = Command::new("git");
    cmd.current_dir(util::workspace_root())
        .args(["rev-parse", "--short", "HEAD"]);
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Median of the values (mean of the middle two for an even count); None when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([]), None);
    }

    #[test]
    fn selects_scenarios() {
        assert_eq!(select(&[]).unwrap().len(), scenarios().len());
        assert!(select(&["nope".into()]).is_err());
    }
}
