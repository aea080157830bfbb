//! Rounds of a bench, alternating untraced and traced, where the agent traces either
//! - the load itself: one client process per round (pgbench, kcat), see [`Client`]; or
//! - a long-lived server under an untraced load generator (nghttpd under h2load), see
//!   [`ServerLoad`].
//!
//! The agent must see the client from its first byte, so every round starts the client through
//! a launcher shell that blocks on stdin: traced rounds point the agent at the shell's pid, wait
//! for /healthz, then let the shell exec the client, which keeps the pid. Untraced rounds take
//! the same path without an agent, so both modes pay the same start-up. A server is traced from
//! before the load generator's first connection: the agent is healthy before the load starts.

use std::{
    collections::BTreeSet,
    fmt::Display,
    fs,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;

use super::{
    agent::{self, Agent},
    bpf_stats::{self, ProgStat, StatsEnabled},
    median,
    proc::{self, Guard},
    sink::Sink,
    targets::num,
    Ctx,
};
use crate::{signals, util::display};

/// `sh -c LAUNCHER CLIENT ARGS...`: waits for a line on stdin, then becomes the client.
const LAUNCHER: &str = r#"read go && exec "$0" "$@""#;

/// What a scenario says about its client; the rounds do the rest.
pub trait Client {
    /// Names the client's process, logs and errors.
    const NAME: &'static str;
    /// How often to look for the client's exit: as fine as the scenario needs its wall time.
    const POLL: Duration;
    /// The client's figures for one run (pgbench's TPS, kcat's throughput), also the load's
    /// part of a round's progress line.
    type Load: Serialize + Display;
    /// The agent's figures relative to the load (CPU per million queries, ...).
    type PerLoad: Serialize;

    fn program(&self) -> PathBuf;
    fn args(&self) -> Vec<String>;
    /// The figures of a run that exited successfully.
    fn load(exit: Exit) -> Result<Self::Load>;
    fn per_load(load: &Self::Load, agent: &AgentUse) -> Self::PerLoad;
}

/// What a scenario says about a load generator run against a long-lived server: traced rounds
/// trace the server, never the load generator.
pub trait ServerLoad {
    /// The load's figures for one run (h2load's req/s, ...), also its part of a round's
    /// progress line.
    type Load: Serialize + Display;
    /// The agent's figures relative to the load.
    type PerLoad: Serialize;

    /// Runs the load to its end: its figures, and the wall time over which the agent is
    /// measured (the load generator's whole run).
    fn run(&self) -> Result<(Self::Load, f64)>;
    fn per_load(load: &Self::Load, agent: &AgentUse) -> Self::PerLoad;
}

// ---- the client ----

/// A client held at the starting line: a shell blocked on stdin, which execs the client (same
/// pid) once it reads a line. Killed on drop if still running.
struct Launch {
    name: &'static str,
    poll: Duration,
    guard: Guard,
    stdin: ChildStdin,
    stdout: JoinHandle<std::io::Result<String>>,
    stderr_log: PathBuf,
}

/// How a released client ended.
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    /// Wall time from the client's release to its exit.
    pub seconds: f64,
    pub stderr_log: PathBuf,
}

impl Launch {
    fn spawn<C: Client>(client: &C, stderr_log: PathBuf) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", LAUNCHER])
            .arg(client.program())
            .args(client.args());
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr_log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
        let stdin = child.stdin.take().context("launcher stdin not captured")?;
        let stdout = child
            .stdout
            .take()
            .context("launcher stdout not captured")?;
        Ok(Self {
            name: C::NAME,
            poll: C::POLL,
            guard: Guard::new(C::NAME, child),
            stdin,
            stdout: read_in_background(stdout),
            stderr_log,
        })
    }

    /// The launcher's pid, which the client keeps.
    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Lets the client start and waits for it to exit; an error if it failed.
    fn go(mut self) -> Result<Exit> {
        self.stdin
            .write_all(b"go\n")
            .with_context(|| format!("cannot release the {} launcher", self.name))?;
        let started = Instant::now();
        let status = self.wait()?;
        let seconds = started.elapsed().as_secs_f64();
        let stdout = self
            .stdout
            .join()
            .map_err(|_| anyhow!("{} output reader panicked", self.name))?
            .with_context(|| format!("reading {}'s output", self.name))?;
        if !status.success() {
            bail!(
                "{} failed ({status}):\n{stdout}{}",
                self.name,
                proc::tail(&self.stderr_log, 30)
            );
        }
        Ok(Exit {
            status,
            stdout,
            seconds,
            stderr_log: self.stderr_log,
        })
    }

    /// Polls, so SIGTERM to xtask stops the client too (the guard kills it on the way out).
    fn wait(&mut self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.guard.child.try_wait()? {
                return Ok(status);
            }
            signals::check()?;
            thread::sleep(self.poll);
        }
    }
}

/// Drains the client's stdout while it runs, so a full pipe never blocks it.
fn read_in_background(mut stdout: ChildStdout) -> JoinHandle<std::io::Result<String>> {
    thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    })
}

// ---- rounds ----

/// One round: the client's figures, and the agent's when traced.
#[derive(Serialize)]
pub struct Round<L, X> {
    pub round: usize,
    pub mode: &'static str,
    #[serde(flatten)]
    pub load: L,
    pub agent: Option<AgentRound<X>>,
}

/// The agent's figures of one traced round: those of every bench, then the scenario's own.
#[derive(Serialize)]
pub struct AgentRound<X> {
    #[serde(flatten)]
    pub usage: AgentUse,
    #[serde(flatten)]
    pub per_load: X,
}

/// What the agent used and made while one load ran.
#[derive(Serialize)]
pub struct AgentUse {
    /// CPU used by the agent process while the load ran.
    pub cpu_s: f64,
    /// cpu_s over the load's wall time, in % of one core.
    pub cpu_pct_of_core: f64,
    /// The load's wall time, over which cpu_s and the kernel counters were taken; a
    /// scenario reports it with its load or its per-load figures.
    #[serde(skip)]
    pub load_s: f64,
    /// Including start-up (BTF, program loading) and the post-load flush.
    pub cpu_s_total: f64,
    pub peak_rss_mib: f64,
    /// Spans the agent assembled (zerotel_spans_total).
    pub spans: Option<f64>,
    /// Spans the sink accepted (zerotel_spans_exported_total).
    pub spans_exported: Option<f64>,
    pub events_lost: Option<f64>,
    pub kernel_run_ns: u64,
    pub kernel_runs: u64,
    pub otlp_posts: u64,
    pub otlp_bytes: u64,
    pub clean_exit: bool,
    pub programs: Vec<ProgStat>,
}

/// What every round of a bench shares.
pub struct Bench<'a> {
    name: &'static str,
    log_dir: &'a Path,
    /// None with --untraced-only.
    tracer: Option<Tracer<'a>>,
}

impl<'a> Bench<'a> {
    /// Starts what the traced rounds need, when there is an agent.
    pub fn new(name: &'static str, ctx: &Ctx<'a>, log_dir: &'a Path) -> Result<Self> {
        let tracer = ctx
            .agent
            .map(|exe| Tracer::new(name, exe, &ctx.args.agent_args))
            .transpose()?;
        Ok(Self {
            name,
            log_dir,
            tracer,
        })
    }

    /// An unreported untraced run, as a warm-up.
    pub fn untraced<C: Client>(&self, client: &C, tag: &str) -> Result<C::Load> {
        C::load(self.launch(client, tag)?.go()?)
    }

    /// `count` rounds per mode, untraced and traced alternating; no traced ones without an
    /// agent.
    pub fn rounds<C: Client>(
        &self,
        client: &C,
        count: usize,
    ) -> Result<Vec<Round<C::Load, C::PerLoad>>> {
        let mut rounds = Vec::new();
        for i in 1..=count {
            rounds.push(self.round(client, i, None)?);
            if let Some(tracer) = &self.tracer {
                rounds.push(self.round(client, i, Some(tracer))?);
            }
        }
        Ok(rounds)
    }

    /// Round `i`, traced when given a tracer.
    fn round<C: Client>(
        &self,
        client: &C,
        i: usize,
        tracer: Option<&Tracer>,
    ) -> Result<Round<C::Load, C::PerLoad>> {
        signals::check()?;
        let mode = if tracer.is_some() {
            "traced"
        } else {
            "untraced"
        };
        let launch = self.launch(client, &format!("{mode}-{i}"))?;
        let (load, agent) = match tracer {
            None => (C::load(launch.go()?)?, None),
            Some(t) => {
                let pid = launch.pid();
                let (exit, usage) = t.measure(&[pid], &self.agent_log(i), || {
                    let exit = launch.go()?;
                    let seconds = exit.seconds;
                    Ok((exit, seconds))
                })?;
                let load = C::load(exit)?;
                let per_load = C::per_load(&load, &usage);
                (load, Some(AgentRound { usage, per_load }))
            }
        };
        Ok(self.done(Round {
            round: i,
            mode,
            load,
            agent,
        }))
    }

    /// `count` rounds per mode of `load` against the server of `server_pids` (already
    /// running), untraced and traced alternating; no traced ones without an agent.
    pub fn server_rounds<S: ServerLoad>(
        &self,
        server_pids: &[u32],
        load: &S,
        count: usize,
    ) -> Result<Vec<Round<S::Load, S::PerLoad>>> {
        let mut rounds = Vec::new();
        for i in 1..=count {
            signals::check()?;
            let (untraced, _) = load.run()?;
            rounds.push(self.done(Round {
                round: i,
                mode: "untraced",
                load: untraced,
                agent: None,
            }));
            if let Some(tracer) = &self.tracer {
                signals::check()?;
                let (traced, usage) =
                    tracer.measure(server_pids, &self.agent_log(i), || load.run())?;
                let per_load = S::per_load(&traced, &usage);
                rounds.push(self.done(Round {
                    round: i,
                    mode: "traced",
                    load: traced,
                    agent: Some(AgentRound { usage, per_load }),
                }));
            }
        }
        Ok(rounds)
    }

    fn agent_log(&self, round: usize) -> PathBuf {
        self.log_dir.join(format!("agent-{round}.log"))
    }

    /// Prints a finished round's progress line.
    fn done<L: Display, X>(&self, round: Round<L, X>) -> Round<L, X> {
        eprintln!("bench {}: {}", self.name, round.summary());
        round
    }

    fn launch<C: Client>(&self, client: &C, tag: &str) -> Result<Launch> {
        Launch::spawn(client, self.log_dir.join(format!("{}-{tag}.log", C::NAME)))
    }
}

impl<L: Display, X> Round<L, X> {
    fn summary(&self) -> String {
        let spans = self.agent.as_ref().map_or(String::new(), |g| {
            format!(
                ", {} spans, {} lost",
                num(g.usage.spans, 0),
                num(g.usage.events_lost, 0)
            )
        });
        format!("round {} {}: {}{spans}", self.round, self.mode, self.load)
    }
}

// ---- the agent ----

/// What the traced rounds share: the OTLP sink and kernel BPF stats (on for the whole bench).
struct Tracer<'a> {
    bench: &'static str,
    exe: &'a Path,
    extra_args: &'a [String],
    sink: Sink,
    _stats: StatsEnabled,
}

impl<'a> Tracer<'a> {
    fn new(bench: &'static str, exe: &'a Path, extra_args: &'a [String]) -> Result<Self> {
        Ok(Self {
            bench,
            exe,
            extra_args,
            sink: Sink::start()?,
            _stats: StatsEnabled::enable()?,
        })
    }

    /// Starts an agent tracing `pids`, runs `load` once it is healthy, and measures the agent
    /// meanwhile. `load` returns its result and its wall time (the denominator of the agent's
    /// share of a core).
    fn measure<T>(
        &self,
        pids: &[u32],
        log: &Path,
        load: impl FnOnce() -> Result<(T, f64)>,
    ) -> Result<(T, AgentUse)> {
        let mut agent = self.start_agent(pids, log)?;
        let owned = self.programs_of(&agent);
        let before = Snapshot::take(&agent, &self.sink)?;
        let (result, load_s) = load()?;
        let after = Snapshot::take(&agent, &self.sink)?;
        let metrics = self.settled_metrics(&agent);
        let (peak_rss_mib, cpu_s_total) = (agent.peak_rss_mib()?, agent.cpu_seconds()?);
        let clean_exit = self.stop(&mut agent);
        let (posts, bytes) = self.sink.totals();
        let programs = bpf_stats::only(bpf_stats::delta(&before.progs, &after.progs), &owned);
        let cpu_s = after.cpu_s - before.cpu_s;
        let usage = AgentUse {
            cpu_s,
            cpu_pct_of_core: cpu_s / load_s.max(1e-3) * 100.0,
            load_s,
            cpu_s_total,
            peak_rss_mib,
            spans: agent::metric_sum(&metrics, "zerotel_spans_total"),
            spans_exported: agent::metric_sum(&metrics, "zerotel_spans_exported_total"),
            events_lost: agent::metric_sum(&metrics, "zerotel_events_lost_total"),
            kernel_run_ns: programs.iter().map(|p| p.run_ns).sum(),
            kernel_runs: programs.iter().map(|p| p.runs).sum(),
            otlp_posts: posts - before.posts,
            otlp_bytes: bytes - before.bytes,
            clean_exit,
            programs,
        };
        Ok((result, usage))
    }

    fn start_agent(&self, pids: &[u32], log: &Path) -> Result<Agent> {
        Agent::start(agent::Spec {
            exe: self.exe,
            pids,
            otlp_endpoint: &self.sink.endpoint(),
            extra_args: self.extra_args,
            log: log.into(),
        })
    }

    /// Only this agent's programs count (another zerotel may run same-named ones).
    fn programs_of(&self, agent: &Agent) -> BTreeSet<u32> {
        bpf_stats::prog_ids_of(agent.pid()).unwrap_or_else(|e| {
            eprintln!(
                "bench {}: warning: counting every zt_ program: {e:#}",
                self.bench
            );
            Default::default()
        })
    }

    /// SIGTERM; true on a clean exit.
    fn stop(&self, agent: &mut Agent) -> bool {
        let clean = agent.stop();
        if !clean {
            eprintln!(
                "bench {}: warning: the agent did not exit cleanly; see {}",
                self.bench,
                agent.log.display()
            );
        }
        clean
    }

    /// /metrics once the agent has turned the last events into spans and exported them: after
    /// its 1 s flush interval, when two reads 500 ms apart agree on spans made and exported
    /// (10 s max).
    fn settled_metrics(&self, agent: &Agent) -> String {
        let read = || {
            agent.metrics().unwrap_or_else(|e| {
                eprintln!("bench {}: warning: {e:#}", self.bench);
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

// ---- report ----

/// Median of `f` over the rounds in `mode`.
pub fn med<L, X>(
    rounds: &[Round<L, X>],
    mode: &str,
    f: impl Fn(&Round<L, X>) -> Option<f64>,
) -> Option<f64> {
    median(rounds.iter().filter(|r| r.mode == mode).filter_map(f))
}

/// Median of `f` over the traced rounds' agents.
pub fn med_agent<L, X>(
    rounds: &[Round<L, X>],
    f: impl Fn(&AgentRound<X>) -> Option<f64>,
) -> Option<f64> {
    median(rounds.iter().filter_map(|r| r.agent.as_ref().and_then(&f)))
}

/// The worst traced round, for targets that every round must meet.
pub fn max_agent<L, X>(
    rounds: &[Round<L, X>],
    f: impl Fn(&AgentRound<X>) -> Option<f64>,
) -> Option<f64> {
    rounds
        .iter()
        .filter_map(|r| r.agent.as_ref().and_then(&f))
        .reduce(f64::max)
}

/// Traced over untraced, of the medians of `f`.
pub fn ratio<L, X>(
    rounds: &[Round<L, X>],
    f: impl Fn(&Round<L, X>) -> Option<f64> + Copy,
) -> Option<f64> {
    Some(med(rounds, "traced", f)? / med(rounds, "untraced", f)?)
}
