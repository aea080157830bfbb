//! `bench postgres`: pgbench's read-only workload (`-S`, prepared statements) against a
//! throwaway PostgreSQL 15 on 127.0.0.1, without and with the agent tracing pgbench (the
//! client side of every query, exporting OTLP/HTTP to a local sink).
//!
//! pgbench is a new process every round and the agent must see it from its first byte (the
//! startup message, the Parse of each prepared statement): the rounds hold it at the starting
//! line until the agent is ready (see `client_rounds`).

use std::{
    fmt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    client_rounds::{self, max_agent, med, med_agent, ratio, AgentUse, Bench, Client, Exit},
    proc::{self, free_port, TempDir},
    targets::{num, targets_markdown, Cmp, Target},
    BenchArgs, Ctx, Report, Scenario,
};
use crate::util::{self, display};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// pgbench's scale factor: 10 => 1 000 000 rows in pgbench_accounts (~150 MB, cached).
const SCALE: u32 = 10;
/// pgbench -c and -j: a few clients, so the server rather than the client box saturates.
const CLIENTS: u32 = 4;
const JOBS: u32 = 2;
const DATABASE: &str = "bench";

// What the issue asks of the agent; the report says whether each is met.
const TARGET_TPS_RATIO: f64 = 0.95;

pub struct Postgres;

impl Scenario for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let a = ctx.args;
        let server = Server::start()?;
        eprintln!(
            "bench postgres: PostgreSQL on 127.0.0.1:{}, data in {}",
            server.port,
            server.data.display()
        );
        let bench = Bench::new("postgres", ctx, server.dir.path())?;
        let pgbench = |duration_s| Pgbench {
            port: server.port,
            duration_s,
        };
        if a.warmup > 0 {
            // Unreported, so the rounds start with warm caches (pages, plans).
            bench
                .untraced(&pgbench(a.warmup), "warmup")
                .context("warm-up load failed")?;
        }
        let rounds = bench.rounds(&pgbench(a.duration), a.rounds)?;
        Ok(report(ctx, &rounds, &pgbench_version()))
    }
}

// ---- the server ----

/// A throwaway cluster under a scratch directory, run as the `postgres` user when we are
/// root (initdb refuses root). Stopped (immediate) and removed on drop, also on error.
struct Server {
    port: u16,
    data: PathBuf,
    /// Dropped after `Drop::drop` stopped the server.
    dir: TempDir,
}

impl Server {
    /// initdb, start, create the `bench` database and fill it with `pgbench -i`.
    fn start() -> Result<Self> {
        if !Path::new(PG_BIN).join("postgres").exists() {
            bail!("PostgreSQL 15 is not installed in {PG_BIN}: run `cargo xtask setup`");
        }
        let dir = TempDir::new("postgres")?;
        if util::is_root() {
            quiet(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.path()),
            )?;
        }
        let server = Self {
            port: free_port()?,
            data: dir.path().join("data"),
            dir,
        };
        server.initdb()?;
        server.pg_ctl_start()?;
        server.create_database()?;
        server.populate()?;
        Ok(server)
    }

    /// A PostgreSQL program, run as `postgres` when we are root, from the scratch directory
    /// (postgres may not enter ours).
    fn cmd(&self, program: &str) -> Command {
        let bin = Path::new(PG_BIN).join(program);
        let mut cmd = if util::is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn initdb(&self) -> Result<()> {
        let mut cmd = self.cmd("initdb");
        cmd.arg("-D").arg(&self.data);
        cmd.args(["-U", "postgres", "--auth=trust", "--no-sync"]);
        quiet(&mut cmd)
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let mut cmd = self.cmd("pg_ctl");
        cmd.arg("-D").arg(&self.data).arg("-l").arg(self.log());
        cmd.args(["-o", &options, "-w", "start"]);
        quiet(&mut cmd).with_context(|| {
            format!(
                "PostgreSQL did not start; its log:\n{}",
                proc::tail(&self.log(), 30)
            )
        })
    }

    fn create_database(&self) -> Result<()> {
        let mut cmd = self.cmd("psql");
        cmd.args(self.conn_args())
            .args(["-X", "-q", "-d", "postgres"]);
        cmd.args(["-c", &format!("CREATE DATABASE {DATABASE}")]);
        quiet(&mut cmd)
    }

    fn populate(&self) -> Result<()> {
        eprintln!("bench postgres: pgbench -i -s {SCALE}");
        let mut cmd = self.cmd("pgbench");
        cmd.args(["-i", "-s", &SCALE.to_string(), "-q"])
            .args(self.conn_args())
            .arg(DATABASE);
        quiet(&mut cmd)
    }

    fn conn_args(&self) -> Vec<String> {
        let port = self.port.to_string();
        ["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]
            .map(String::from)
            .into()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.data.join("postmaster.pid").exists() {
            return;
        }
        let mut cmd = self.cmd("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"]);
        if let Err(e) = quiet(&mut cmd) {
            eprintln!("bench postgres: warning: cannot stop PostgreSQL: {e:#}");
        }
    }
}

/// Runs `cmd` with its output captured; on failure the error carries that output.
fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}{}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `pgbench (PostgreSQL) 15.14`.
fn pgbench_version() -> String {
    util::any_output_of(Path::new(PG_BIN).join("pgbench"), &["--version"])
        .unwrap_or_else(|| "pgbench unknown".into())
}

// ---- pgbench ----

/// pgbench's read-only workload against the server, for `duration_s`.
struct Pgbench {
    port: u16,
    duration_s: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
struct PgbenchResult {
    /// Transactions per second, without the initial connection time.
    tps: f64,
    /// Transactions processed; each is one SELECT with -S.
    transactions: u64,
    failed: u64,
    latency_avg_ms: f64,
}

/// The agent's figures relative to pgbench's queries.
#[derive(Serialize)]
struct PerQuery {
    cpu_s_per_mquery: f64,
    /// Wall time of pgbench, over which cpu_s and the kernel counters were taken.
    load_s: f64,
    kernel_ns_per_query: f64,
}

type Round = client_rounds::Round<PgbenchResult, PerQuery>;
type AgentRound = client_rounds::AgentRound<PerQuery>;

impl Client for Pgbench {
    const NAME: &'static str = "pgbench";
    const POLL: Duration = Duration::from_millis(50);
    type Load = PgbenchResult;
    type PerLoad = PerQuery;

    fn program(&self) -> PathBuf {
        Path::new(PG_BIN).join("pgbench")
    }

    fn args(&self) -> Vec<String> {
        let n = |v: &dyn ToString| v.to_string();
        let (c, j, t, p) = (n(&CLIENTS), n(&JOBS), n(&self.duration_s), n(&self.port));
        let args = ["-n", "-S", "-M", "prepared", "-c", &c, "-j", &j, "-T", &t];
        let conn = ["-h", "127.0.0.1", "-p", &p, "-U", "postgres", DATABASE];
        args.iter().chain(&conn).map(|s| s.to_string()).collect()
    }

    fn load(exit: Exit) -> Result<PgbenchResult> {
        let out = exit.stdout;
        parse_pgbench(&out).with_context(|| format!("cannot parse pgbench's output:\n{out}"))
    }

    fn per_load(load: &PgbenchResult, agent: &AgentUse) -> PerQuery {
        let queries = (load.transactions as f64).max(1.0);
        PerQuery {
            cpu_s_per_mquery: agent.cpu_s / queries * 1e6,
            load_s: agent.load_s,
            kernel_ns_per_query: agent.kernel_run_ns as f64 / queries,
        }
    }
}

impl fmt::Display for PgbenchResult {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{:.0} tps, latency avg {:.3} ms",
            self.tps, self.latency_avg_ms
        )
    }
}

fn parse_pgbench(out: &str) -> Result<PgbenchResult> {
    let mut r = PgbenchResult::default();
    let (mut tps_any, mut tps_net) = (None, None);
    for line in out.lines().map(str::trim) {
        let first_number = |s: &str| s.split(['/', ' ']).next().unwrap_or("").trim().to_string();
        if let Some(v) = line.strip_prefix("number of transactions actually processed:") {
            r.transactions = first_number(v.trim()).parse()?;
        } else if let Some(v) = line.strip_prefix("number of failed transactions:") {
            r.failed = first_number(v.trim()).parse()?;
        } else if let Some(v) = line.strip_prefix("latency average =") {
            r.latency_avg_ms = first_number(v.trim()).parse()?;
        } else if let Some(v) = line.strip_prefix("tps =") {
            let tps: f64 = first_number(v.trim()).parse()?;
            tps_any.get_or_insert(tps);
            // 14+: "without initial connection time"; before: "excluding connections establishing".
            if v.contains("without initial connection") || v.contains("excluding") {
                tps_net = Some(tps);
            }
        }
    }
    r.tps = tps_net.or(tps_any).context("no `tps =` line")?;
    if r.transactions == 0 {
        bail!("pgbench processed no transaction");
    }
    Ok(r)
}

// ---- report ----

fn tps(r: &Round) -> Option<f64> {
    Some(r.load.tps)
}

fn latency(r: &Round) -> Option<f64> {
    Some(r.load.latency_avg_ms)
}

fn report(ctx: &Ctx, rounds: &[Round], version: &str) -> Report {
    let a = ctx.args;
    let targets = targets(rounds);
    let json = json!({
        "scenario": "postgres",
        "config": {
            "rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup,
            "clients": CLIENTS, "jobs": JOBS, "scale": SCALE, "pgbench": version,
            "untraced_only": ctx.agent.is_none(), "agent_args": a.agent_args,
        },
        "rounds": rounds,
        "medians": medians_json(rounds),
        "ratios_traced_over_untraced": {
            "tps": ratio(rounds, tps), "latency_avg": ratio(rounds, latency),
        },
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
    let mode_medians = |mode| json!({ "tps": med(rounds, mode, tps), "latency_avg_ms": med(rounds, mode, latency) });
    let agent = json!({
        "cpu_s_per_mquery": med_agent(rounds, |g| Some(g.per_load.cpu_s_per_mquery)),
        "cpu_pct_of_core": med_agent(rounds, |g| Some(g.usage.cpu_pct_of_core)),
        "peak_rss_mib": med_agent(rounds, |g| Some(g.usage.peak_rss_mib)),
        "spans": med_agent(rounds, |g| g.usage.spans),
        "spans_exported": med_agent(rounds, |g| g.usage.spans_exported),
        "events_lost": med_agent(rounds, |g| g.usage.events_lost),
        "kernel_ns_per_query": med_agent(rounds, |g| Some(g.per_load.kernel_ns_per_query)),
    });
    json!({ "untraced": mode_medians("untraced"), "traced": mode_medians("traced"), "agent": agent })
}

fn heading(a: &BenchArgs, version: &str) -> String {
    format!(
        "## bench postgres: `pgbench -n -S -M prepared -c{CLIENTS} -j{JOBS} -T{}` (scale {SCALE}, {version}) over TCP 127.0.0.1, {} rounds per mode\n\n\
         Traced: the agent traces pgbench (client spans), exporting OTLP/HTTP to a local sink. One query per transaction.\n\n",
        a.duration, a.rounds
    )
}

fn table(rounds: &[Round]) -> String {
    let mut md = String::from(
        "| round | mode | TPS | latency avg ms | failed | agent CPU s | CPU % of core | CPU s / Mquery | peak RSS MiB | spans | exported | lost | kernel ns/query |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rounds {
        let g = r.agent.as_ref();
        md += &format!(
            "| {} | {} | {:.0} | {:.3} | {} | {} |\n",
            r.round,
            r.mode,
            r.load.tps,
            r.load.latency_avg_ms,
            r.load.failed,
            agent_cells(|f| g.and_then(f)),
        );
    }
    for mode in ["untraced", "traced"] {
        md += &format!(
            "| **median** | {mode} | {} | {} | {} | {} |\n",
            num(med(rounds, mode, tps), 0),
            num(med(rounds, mode, latency), 3),
            num(med(rounds, mode, |r| Some(r.load.failed as f64)), 0),
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
        num(value(|g| Some(g.per_load.cpu_s_per_mquery)), 2),
        num(value(|g| Some(g.usage.peak_rss_mib)), 1),
        num(value(|g| g.usage.spans), 0),
        num(value(|g| g.usage.spans_exported), 0),
        num(value(|g| g.usage.events_lost), 0),
        num(value(|g| Some(g.per_load.kernel_ns_per_query)), 0),
    ]
    .join(" | ")
}

fn summary(rounds: &[Round]) -> String {
    let x = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("x{v:.3}"));
    let mut s = format!(
        "\ntraced / untraced (medians): TPS {}, latency avg {}\n",
        x(ratio(rounds, tps)),
        x(ratio(rounds, latency)),
    );
    if rounds.iter().any(|r| r.agent.is_some()) {
        s += &format!(
            "agent (medians): {} CPU s per million queries ({} % of one core), peak RSS {} MiB, {} spans ({} exported) for {} queries, {} events lost, kernel {} ns/query\n",
            num(med_agent(rounds, |g| Some(g.per_load.cpu_s_per_mquery)), 2),
            num(med_agent(rounds, |g| Some(g.usage.cpu_pct_of_core)), 1),
            num(med_agent(rounds, |g| Some(g.usage.peak_rss_mib)), 1),
            num(med_agent(rounds, |g| g.usage.spans), 0),
            num(med_agent(rounds, |g| g.usage.spans_exported), 0),
            num(med(rounds, "traced", |r| Some(r.load.transactions as f64)), 0),
            num(med_agent(rounds, |g| g.usage.events_lost), 0),
            num(med_agent(rounds, |g| Some(g.per_load.kernel_ns_per_query)), 0),
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
            "TPS traced/untraced (median)",
            ratio(rounds, tps),
            Cmp::AtLeast,
            TARGET_TPS_RATIO,
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

    #[test]
    fn parses_pgbench_15() {
        let out = "pgbench (15.14 (Debian 15.14-0+deb12u1))\n\
            transaction type: <builtin: select only>\n\
            scaling factor: 10\n\
            query mode: prepared\n\
            number of clients: 4\n\
            number of threads: 2\n\
            maximum number of tries: 1\n\
            duration: 5 s\n\
            number of transactions actually processed: 123456\n\
            number of failed transactions: 0 (0.000%)\n\
            latency average = 0.162 ms\n\
            initial connection time = 4.321 ms\n\
            tps = 24691.200000 (without initial connection time)\n";
        let r = parse_pgbench(out).unwrap();
        assert_eq!((r.transactions, r.failed), (123456, 0));
        assert_eq!((r.tps, r.latency_avg_ms), (24691.2, 0.162));
    }

    #[test]
    fn prefers_tps_without_connections() {
        let out = "number of transactions actually processed: 10/10\n\
            tps = 90.0 (including connections establishing)\n\
            tps = 100.0 (excluding connections establishing)\n";
        assert_eq!(parse_pgbench(out).unwrap().tps, 100.0);
        assert!(parse_pgbench("tps = 1\n").is_err());
    }

    #[test]
    fn judges_targets() {
        let md = targets_markdown(&targets(&[]));
        assert_eq!(
            md,
            "\ntargets: TPS traced/untraced (median) n/a >= 0.95: n/a; lost events (worst round) n/a == 0: n/a\n"
        );
    }
}
