//! `bench postgres`: pgbench's read-only workload (`-S`, prepared statements) against a
//! throwaway PostgreSQL 15 on 127.0.0.1, without and with the agent tracing pgbench (the
//! client side of every query, exporting OTLP/HTTP to a local sink).
//!
//! pgbench is a new process every round and the agent must see it from its first byte (the
//! startup message, the Parse of each prepared statement), so every round starts it through a
//! launcher shell that blocks on stdin: traced rounds point the agent at the shell's pid, wait
//! for /healthz, then let the shell exec pgbench, which keeps the pid. Untraced rounds take the
//! same path without an agent.

use std::{
    fs,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    agent::{self, Agent},
    bpf_stats::{self, ProgStat, StatsEnabled},
    median,
    proc::{self, free_port, Guard, TempDir},
    sink::Sink,
    targets::{num, targets_markdown, Cmp, Target},
    BenchArgs, Ctx, Report, Scenario,
};
use crate::{
    signals,
    util::{self, display},
};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// pgbench's scale factor: 10 => 1 000 000 rows in pgbench_accounts (~150 MB, cached).
const SCALE: u32 = 10;
/// pgbench -c and -j: a few clients, so the server rather than the client box saturates.
const CLIENTS: u32 = 4;
const JOBS: u32 = 2;
const DATABASE: &str = "bench";
/// `sh -c LAUNCHER pgbench ARGS...`: waits for a line on stdin, then becomes pgbench.
const LAUNCHER: &str = r#"read go && exec "$0" "$@""#;

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
        let tracer = ctx
            .agent
            .map(|exe| Tracer::new(exe, &a.agent_args))
            .transpose()?;
        let bench = Bench {
            port: server.port,
            log_dir: server.dir.path(),
            tracer: tracer.as_ref(),
        };
        bench.warm_up(a.warmup)?;
        let mut rounds = Vec::new();
        for i in 1..=a.rounds {
            for mode in [UNTRACED, TRACED] {
                rounds.extend(bench.round(i, mode, a.duration)?);
            }
        }
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

#[derive(Debug, Default, Clone, Serialize)]
struct PgbenchResult {
    /// Transactions per second, without the initial connection time.
    tps: f64,
    /// Transactions processed; each is one SELECT with -S.
    transactions: u64,
    failed: u64,
    latency_avg_ms: f64,
}

/// pgbench held at the starting line: a shell blocked on stdin, which execs pgbench (same pid)
/// once it reads a line. Killed on drop if still running.
struct Launch {
    guard: Guard,
    stdin: ChildStdin,
    stdout: JoinHandle<std::io::Result<String>>,
    stderr_log: PathBuf,
}

impl Launch {
    fn spawn(args: &[String], stderr_log: PathBuf) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", LAUNCHER])
            .arg(Path::new(PG_BIN).join("pgbench"))
            .args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr_log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
        let stdin = child.stdin.take().context("launcher stdin not captured")?;
        let mut stdout = child.stdout.take().context("pgbench stdout not captured")?;
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            stdout.read_to_string(&mut s).map(|_| s)
        });
        Ok(Self {
            guard: Guard::new("pgbench", child),
            stdin,
            stdout,
            stderr_log,
        })
    }

    /// The launcher's pid, which pgbench keeps.
    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Lets pgbench start and waits for its report.
    fn go(mut self) -> Result<PgbenchResult> {
        self.stdin
            .write_all(b"go\n")
            .context("cannot release the pgbench launcher")?;
        // Poll so SIGTERM to xtask stops pgbench too (the guard kills it on the way out).
        let status = loop {
            if let Some(status) = self.guard.child.try_wait()? {
                break status;
            }
            signals::check()?;
            thread::sleep(Duration::from_millis(50));
        };
        let out = self
            .stdout
            .join()
            .map_err(|_| anyhow::anyhow!("pgbench output reader panicked"))?
            .context("reading pgbench's output")?;
        if !status.success() {
            bail!(
                "pgbench failed ({status}):\n{out}{}",
                proc::tail(&self.stderr_log, 30)
            );
        }
        parse_pgbench(&out).with_context(|| format!("cannot parse pgbench's output:\n{out}"))
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
    load: PgbenchResult,
    agent: Option<AgentRound>,
}

#[derive(Serialize)]
struct AgentRound {
    /// CPU used by the agent process while pgbench ran.
    cpu_s: f64,
    cpu_s_per_mquery: f64,
    /// cpu_s over pgbench's wall time, in % of one core.
    cpu_pct_of_core: f64,
    /// Wall time of pgbench, over which cpu_s and the kernel counters were taken.
    load_s: f64,
    /// Including start-up (BTF, program loading) and the post-load flush.
    cpu_s_total: f64,
    peak_rss_mib: f64,
    /// Spans the agent assembled (zerotel_spans_total).
    spans: Option<f64>,
    /// Spans the sink accepted (zerotel_spans_exported_total).
    spans_exported: Option<f64>,
    events_lost: Option<f64>,
    kernel_run_ns: u64,
    kernel_runs: u64,
    kernel_ns_per_query: f64,
    otlp_posts: u64,
    otlp_bytes: u64,
    clean_exit: bool,
    programs: Vec<ProgStat>,
}

/// What every round shares.
struct Bench<'a> {
    port: u16,
    log_dir: &'a Path,
    tracer: Option<&'a Tracer<'a>>,
}

impl Bench<'_> {
    fn pgbench_args(&self, duration_s: u64) -> Vec<String> {
        let n = |v: &dyn ToString| v.to_string();
        let (c, j, t, p) = (n(&CLIENTS), n(&JOBS), n(&duration_s), n(&self.port));
        let args = ["-n", "-S", "-M", "prepared", "-c", &c, "-j", &j, "-T", &t];
        let conn = ["-h", "127.0.0.1", "-p", &p, "-U", "postgres", DATABASE];
        args.iter().chain(&conn).map(|s| s.to_string()).collect()
    }

    fn launch(&self, duration_s: u64, tag: &str) -> Result<Launch> {
        let log = self.log_dir.join(format!("pgbench-{tag}.err"));
        Launch::spawn(&self.pgbench_args(duration_s), log)
    }

    /// Unreported untraced load before the first round, when asked (page cache, plan cache).
    fn warm_up(&self, duration_s: u64) -> Result<()> {
        if duration_s > 0 {
            self.launch(duration_s, "warmup")?
                .go()
                .context("warm-up load failed")?;
        }
        Ok(())
    }

    /// One round in `mode`; None for traced rounds without an agent (--untraced-only).
    fn round(&self, i: usize, mode: Mode, duration_s: u64) -> Result<Option<Round>> {
        signals::check()?;
        let tracer = match (mode.traced, self.tracer) {
            (true, None) => return Ok(None),
            (traced, t) => t.filter(|_| traced),
        };
        let launch = self.launch(duration_s, &format!("{}-{i}", mode.name))?;
        let (load, agent) = match tracer {
            None => (launch.go()?, None),
            Some(t) => {
                let (load, agent) =
                    t.round(launch, &self.log_dir.join(format!("agent-{i}.log")))?;
                (load, Some(agent))
            }
        };
        let round = Round {
            round: i,
            mode: mode.name,
            load,
            agent,
        };
        eprintln!("bench postgres: {}", round.summary());
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
            "round {} {}: {:.0} tps, latency avg {:.3} ms{spans}",
            self.round, self.mode, self.load.tps, self.load.latency_avg_ms
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

    /// Starts an agent on the held pgbench, lets pgbench go, and measures the agent meanwhile.
    fn round(&self, launch: Launch, log: &Path) -> Result<(PgbenchResult, AgentRound)> {
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
            eprintln!("bench postgres: warning: counting every zt_ program: {e:#}");
            Default::default()
        });
        let before = Snapshot::take(&agent, &self.sink)?;
        let started = Instant::now();
        let load = launch.go()?;
        let load_s = started.elapsed().as_secs_f64();
        let after = Snapshot::take(&agent, &self.sink)?;
        let metrics = settled_metrics(&agent);
        let (peak_rss_mib, cpu_s_total) = (agent.peak_rss_mib()?, agent.cpu_seconds()?);
        let clean_exit = agent.stop();
        if !clean_exit {
            eprintln!(
                "bench postgres: warning: the agent did not exit cleanly; see {}",
                log.display()
            );
        }
        let (posts, bytes) = self.sink.totals();
        let programs = bpf_stats::only(bpf_stats::delta(&before.progs, &after.progs), &owned);
        let queries = (load.transactions as f64).max(1.0);
        let kernel_run_ns: u64 = programs.iter().map(|p| p.run_ns).sum();
        let cpu_s = after.cpu_s - before.cpu_s;
        let agent = AgentRound {
            cpu_s,
            cpu_s_per_mquery: cpu_s / queries * 1e6,
            cpu_pct_of_core: cpu_s / load_s.max(1e-3) * 100.0,
            load_s,
            cpu_s_total,
            peak_rss_mib,
            spans: agent::metric_sum(&metrics, "zerotel_spans_total"),
            spans_exported: agent::metric_sum(&metrics, "zerotel_spans_exported_total"),
            events_lost: agent::metric_sum(&metrics, "zerotel_events_lost_total"),
            kernel_run_ns,
            kernel_runs: programs.iter().map(|p| p.runs).sum(),
            kernel_ns_per_query: kernel_run_ns as f64 / queries,
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
            eprintln!("bench postgres: warning: {e:#}");
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

fn tps(r: &Round) -> Option<f64> {
    Some(r.load.tps)
}

fn latency(r: &Round) -> Option<f64> {
    Some(r.load.latency_avg_ms)
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

fn ratio(rounds: &[Round], f: impl Fn(&Round) -> Option<f64> + Copy) -> Option<f64> {
    Some(med(rounds, "traced", f)? / med(rounds, "untraced", f)?)
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
        "cpu_s_per_mquery": med_agent(rounds, |g| Some(g.cpu_s_per_mquery)),
        "cpu_pct_of_core": med_agent(rounds, |g| Some(g.cpu_pct_of_core)),
        "peak_rss_mib": med_agent(rounds, |g| Some(g.peak_rss_mib)),
        "spans": med_agent(rounds, |g| g.spans),
        "spans_exported": med_agent(rounds, |g| g.spans_exported),
        "events_lost": med_agent(rounds, |g| g.events_lost),
        "kernel_ns_per_query": med_agent(rounds, |g| Some(g.kernel_ns_per_query)),
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
        let traced = |f: fn(&AgentRound) -> Option<f64>| {
            (mode == "traced").then(|| med_agent(rounds, f)).flatten()
        };
        md += &format!(
            "| **median** | {mode} | {} | {} | {} | {} |\n",
            num(med(rounds, mode, tps), 0),
            num(med(rounds, mode, latency), 3),
            num(med(rounds, mode, |r| Some(r.load.failed as f64)), 0),
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
        num(value(|g| Some(g.cpu_s_per_mquery)), 2),
        num(value(|g| Some(g.peak_rss_mib)), 1),
        num(value(|g| g.spans), 0),
        num(value(|g| g.spans_exported), 0),
        num(value(|g| g.events_lost), 0),
        num(value(|g| Some(g.kernel_ns_per_query)), 0),
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
            num(med_agent(rounds, |g| Some(g.cpu_s_per_mquery)), 2),
            num(med_agent(rounds, |g| Some(g.cpu_pct_of_core)), 1),
            num(med_agent(rounds, |g| Some(g.peak_rss_mib)), 1),
            num(med_agent(rounds, |g| g.spans), 0),
            num(med_agent(rounds, |g| g.spans_exported), 0),
            num(med(rounds, "traced", |r| Some(r.load.transactions as f64)), 0),
            num(med_agent(rounds, |g| g.events_lost), 0),
            num(med_agent(rounds, |g| Some(g.kernel_ns_per_query)), 0),
        );
    } else {
        s += "agent: not run (--untraced-only)\n";
    }
    s
}

// ---- targets ----

fn targets(rounds: &[Round]) -> Vec<Target> {
    vec![
        Target::new("TPS traced/untraced (median)", ratio(rounds, tps), Cmp::AtLeast, TARGET_TPS_RATIO, 3),
        Target::new("lost events (worst round)", max_agent(rounds, |g| g.events_lost), Cmp::Equals, 0.0, 0),
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
