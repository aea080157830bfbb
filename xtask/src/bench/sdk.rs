//! `bench sdk`: zerotel next to what a user would pick instead, OpenTelemetry's own
//! auto-instrumentation, on the same app, the same load and the same OTLP receiver:
//! - a Flask app under gunicorn, against `opentelemetry-instrument` (OpenTelemetry Python);
//! - a Node app on the `http` module, against `@opentelemetry/auto-instrumentations-node`.
//!
//! Each round runs three variants of an app one after the other: untraced, traced by zerotel
//! (the agent tracing the app's processes), and under the SDK. wrk loads the app at saturation,
//! so whatever tracing costs comes out of throughput: the SDK's inside the app's own thread,
//! zerotel's in the kernel probes and in the agent next to it (on a 2-CPU machine both compete
//! with the app and wrk). The figure that matters is each one's throughput overhead, 1 - traced
//! / untraced req/s (each round's ratio, median over the rounds), and zerotel's over the SDK's.
//! The apps serve one route, so --path is not used.
//!
//! Every variant gets a fresh app process and the same unreported warm-up (Node's JIT, Python's
//! imports), then the measured load. zerotel's agent starts after the warm-up and is healthy
//! before the load's first connection. Both exporters send OTLP/HTTP protobuf to one local sink,
//! which counts the spans it receives, so a traced variant that exported nothing fails the
//! bench instead of looking free. BPF program stats stay off: they time every program run, a
//! cost the SDK side would not carry.
//!
//! The Python and Node packages are installed once, on first use, under target/bench (see
//! `apps`); installing is timed and never part of a round.

mod apps;
mod otlp;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use self::apps::{App, Install, Kind, Server, PATH};
use super::{
    agent::{self, Agent},
    median,
    proc::{self, TempDir},
    sink::Sink,
    targets::{fmt_us, num, targets_markdown, Cmp, Target},
    wrk::{self, Load, WrkResult},
    BenchArgs, Ctx, Report, Scenario,
};
use crate::{cargo_cmd, signals, util::find_cmd};

/// What the issue asks: zerotel's throughput overhead at most a fifth of the SDK's.
const TARGET_OVERHEAD_SHARE: f64 = 0.2;
/// The agent exports every second; after a load, spans stop arriving within about that.
const FLUSH: Duration = Duration::from_secs(1);
/// Longest wait for the sink's span count to settle after a load.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Sdk;

impl Scenario for Sdk {
    fn name(&self) -> &'static str {
        "sdk"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let wrk_bin = find_cmd("wrk").context("wrk is not installed: run `cargo xtask setup`")?;
        let bench_dir = cargo_cmd::target_dir()?.join("bench");
        // Declared before the apps' servers: dropped after them, so their files outlive them.
        let tmp = TempDir::new("sdk")?;
        let apps = [Kind::Flask, Kind::Node]
            .map(|kind| App::new(kind, &bench_dir, tmp.path()))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let installs = apps.iter().map(App::install).collect::<Result<Vec<_>>>()?;
        warn_if_bpf_stats_on();
        let sink = Sink::start_counting(otlp::spans)?;
        let bench = Bench {
            ctx,
            wrk: &wrk_bin,
            sink: &sink,
            log_dir: tmp.path(),
        };
        let mut rounds = Vec::new();
        for app in &apps {
            for i in 1..=ctx.args.rounds {
                for variant in Variant::ALL {
                    if variant == Variant::Zerotel && ctx.agent.is_none() {
                        continue; // --untraced-only: no agent, but the SDK needs no root
                    }
                    rounds.push(bench.round(app, variant, i)?);
                }
            }
        }
        Ok(report(ctx, &apps, &installs, &rounds))
    }
}

/// BPF program stats add to every program run: left on (by another bench still running, or by
/// hand) they would price zerotel higher than it is.
fn warn_if_bpf_stats_on() {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() != "0") {
        eprintln!("bench sdk: warning: {path} is on: zerotel's rounds pay for BPF program stats");
    }
}

/// How an app runs in a round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Untraced,
    Zerotel,
    Sdk,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Untraced, Variant::Zerotel, Variant::Sdk];
    const TRACED: [Variant; 2] = [Variant::Zerotel, Variant::Sdk];

    fn name(self) -> &'static str {
        match self {
            Variant::Untraced => "untraced",
            Variant::Zerotel => "zerotel",
            Variant::Sdk => "sdk",
        }
    }
}

/// One variant's round.
#[derive(Serialize)]
struct Round {
    app: &'static str,
    round: usize,
    variant: &'static str,
    #[serde(flatten)]
    load: WrkResult,
    /// Requests of the unreported warm-up (traced by the SDK, not by zerotel, whose agent
    /// starts after it).
    warmup_requests: u64,
    /// Spans the sink received from the app's start to its exit.
    spans: u64,
    /// spans over the requests the variant traced; about 1 when every request made its span.
    spans_per_request: f64,
    /// CPU the app's processes used during the load, per request: what the SDK costs in the
    /// app, and what zerotel's probes cost in the app's syscalls (kernel time).
    app_cpu_us_per_request: f64,
    app_clean_exit: bool,
    agent: Option<AgentFigures>,
}

/// zerotel's agent during one round.
#[derive(Serialize)]
struct AgentFigures {
    /// CPU used by the agent while the load ran.
    cpu_s: f64,
    cpu_pct_of_core: f64,
    peak_rss_mib: f64,
    /// zerotel_spans_total, zerotel_spans_exported_total, zerotel_events_lost_total.
    spans: Option<f64>,
    spans_exported: Option<f64>,
    events_lost: Option<f64>,
    clean_exit: bool,
}

/// What every round shares.
struct Bench<'a> {
    ctx: &'a Ctx<'a>,
    wrk: &'a Path,
    sink: &'a Sink,
    log_dir: &'a Path,
}

impl Bench<'_> {
    /// Round `i` of `app` in `variant`: a fresh app, warm-up, the measured load, then the app
    /// (and agent) stopped and the sink settled, so the next round starts from quiet.
    fn round(&self, app: &App, variant: Variant, i: usize) -> Result<Round> {
        signals::check()?;
        let tag = format!("{}-{}-{i}", app.name(), variant.name());
        let spans_before = self.sink.spans();
        let endpoint = self.sink.endpoint();
        let sdk = (variant == Variant::Sdk).then_some(endpoint.as_str());
        let mut server = app.start(sdk, self.log_dir.join(format!("{tag}.log")))?;
        let url = server.url();
        let warmup = self.warm_up(&url)?;
        let agent_log = self.log_dir.join(format!("agent-{tag}.log"));
        let mut agent = match variant {
            Variant::Zerotel => Some(self.start_agent(&server, agent_log.clone())?),
            _ => None,
        };
        let cpu_before = agent.as_ref().map(Agent::cpu_seconds).transpose()?;
        let app_cpu_before = server.cpu_seconds()?;
        let started = Instant::now();
        let load = wrk::run(self.wrk, &self.load(&url, self.ctx.args.duration))?;
        let load_s = started.elapsed().as_secs_f64();
        let app_cpu_s = server.cpu_seconds()? - app_cpu_before;
        let agent = match (agent.as_mut(), cpu_before) {
            (Some(a), Some(cpu)) => Some(self.finish_agent(a, cpu, load_s)?),
            _ => None,
        };
        let app_clean_exit = server.stop();
        self.settle();
        let spans = self.sink.spans() - spans_before;
        let traced_requests = match variant {
            Variant::Sdk => warmup + load.requests,
            _ => load.requests,
        };
        let round = Round {
            app: app.name(),
            round: i,
            variant: variant.name(),
            warmup_requests: warmup,
            spans,
            spans_per_request: spans as f64 / traced_requests.max(1) as f64,
            app_cpu_us_per_request: app_cpu_s / load.requests.max(1) as f64 * 1e6,
            app_clean_exit,
            agent,
            load,
        };
        check(&round, variant, &server, &agent_log)?;
        eprintln!("bench sdk: {}", round.summary());
        Ok(round)
    }

    fn load<'u>(&self, url: &'u str, duration_s: u64) -> Load<'u> {
        let a = self.ctx.args;
        Load {
            threads: a.threads,
            connections: a.connections,
            duration_s,
            url,
            close: false,
        }
    }

    /// The unreported warm-up load; its request count (0 with --warmup 0).
    fn warm_up(&self, url: &str) -> Result<u64> {
        let seconds = self.ctx.args.warmup;
        if seconds == 0 {
            return Ok(0);
        }
        let r = wrk::run(self.wrk, &self.load(url, seconds)).context("warm-up load failed")?;
        Ok(r.requests)
    }

    fn start_agent(&self, server: &Server, log: PathBuf) -> Result<Agent> {
        let exe = self
            .ctx
            .agent
            .context("the zerotel variant needs the agent")?;
        Agent::start(agent::Spec {
            exe,
            pids: &server.pids(),
            otlp_endpoint: &self.sink.endpoint(),
            extra_args: &self.ctx.args.agent_args,
            log,
        })
    }

    /// The agent's figures once its last spans reached the sink; then stops it.
    fn finish_agent(
        &self,
        agent: &mut Agent,
        cpu_before: f64,
        load_s: f64,
    ) -> Result<AgentFigures> {
        let cpu_s = agent.cpu_seconds()? - cpu_before;
        self.settle();
        let metrics = agent.metrics().unwrap_or_else(|e| {
            eprintln!("bench sdk: warning: {e:#}");
            String::new()
        });
        let peak_rss_mib = agent.peak_rss_mib()?;
        let clean_exit = agent.stop();
        if !clean_exit {
            eprintln!(
                "bench sdk: warning: the agent did not exit cleanly; see {}",
                agent.log.display()
            );
        }
        Ok(AgentFigures {
            cpu_s,
            cpu_pct_of_core: cpu_s / load_s.max(1e-3) * 100.0,
            peak_rss_mib,
            spans: agent::metric_sum(&metrics, "zerotel_spans_total"),
            spans_exported: agent::metric_sum(&metrics, "zerotel_spans_exported_total"),
            events_lost: agent::metric_sum(&metrics, "zerotel_events_lost_total"),
            clean_exit,
        })
    }

    /// Waits until spans stop arriving: after the agent's flush interval, two counts 500 ms
    /// apart agree. The SDKs export their last batch before their process exits.
    fn settle(&self) {
        thread::sleep(FLUSH);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut last = self.sink.spans();
        loop {
            thread::sleep(Duration::from_millis(500));
            let now = self.sink.spans();
            if now == last || Instant::now() > deadline {
                return;
            }
            last = now;
        }
    }
}

/// A round is only worth reporting if the app answered and a traced variant really traced.
fn check(round: &Round, variant: Variant, server: &Server, agent_log: &Path) -> Result<()> {
    let what = format!("{} round {} ({})", round.app, round.round, round.variant);
    if round.load.requests == 0 || round.load.non_2xx > 0 {
        bail!(
            "{what}: wrk got {} requests, {} answered non-2xx; the app's log {}:\n{}",
            round.load.requests,
            round.load.non_2xx,
            server.log.display(),
            proc::tail(&server.log, 20)
        );
    }
    let log = match variant {
        Variant::Untraced => return Ok(()),
        Variant::Zerotel => agent_log,
        Variant::Sdk => &server.log,
    };
    if round.spans == 0 {
        bail!(
            "{what}: the OTLP sink received no span, so this variant did not trace; its log {}:\n{}",
            log.display(),
            proc::tail(log, 30)
        );
    }
    Ok(())
}

impl Round {
    fn summary(&self) -> String {
        let agent = self.agent.as_ref().map_or(String::new(), |g| {
            format!(
                ", agent {:.1} % of a core, {} events lost",
                g.cpu_pct_of_core,
                num(g.events_lost, 0)
            )
        });
        format!(
            "{} round {} {}: {:.0} req/s, p50 {}, p99 {}, {} spans ({:.3} per request){agent}",
            self.app,
            self.round,
            self.variant,
            self.load.requests_per_s,
            fmt_us(self.load.p50_us),
            fmt_us(self.load.p99_us),
            self.spans,
            self.spans_per_request
        )
    }
}

// ---- report ----

/// Median of `f` over `app`'s rounds in `variant`.
fn med(
    rounds: &[Round],
    app: &str,
    variant: Variant,
    f: impl Fn(&Round) -> Option<f64>,
) -> Option<f64> {
    median(
        rounds
            .iter()
            .filter(|r| r.app == app && r.variant == variant.name())
            .filter_map(f),
    )
}

fn rps(r: &Round) -> Option<f64> {
    Some(r.load.requests_per_s)
}

fn p50(r: &Round) -> Option<f64> {
    Some(r.load.p50_us)
}

fn p99(r: &Round) -> Option<f64> {
    Some(r.load.p99_us)
}

/// `variant` over untraced, of `f`: the median over the rounds of each round's ratio. A round
/// runs its variants back to back, so pairing them cancels the machine's drift between rounds,
/// which on a small VM is larger than the differences measured (see `range`).
fn ratio(
    rounds: &[Round],
    app: &str,
    variant: Variant,
    f: impl Fn(&Round) -> Option<f64> + Copy,
) -> Option<f64> {
    let of = |v: Variant, i: usize| {
        rounds
            .iter()
            .find(|r| r.app == app && r.variant == v.name() && r.round == i)
            .and_then(f)
    };
    let numbers: BTreeSet<usize> = rounds
        .iter()
        .filter(|r| r.app == app)
        .map(|r| r.round)
        .collect();
    median(
        numbers
            .into_iter()
            .filter_map(|i| Some(of(variant, i)? / of(Variant::Untraced, i)?)),
    )
}

/// Lowest and highest req/s of `variant`'s rounds.
fn range(rounds: &[Round], app: &str, variant: Variant) -> Option<(f64, f64)> {
    let values: Vec<f64> = rounds
        .iter()
        .filter(|r| r.app == app && r.variant == variant.name())
        .map(|r| r.load.requests_per_s)
        .collect();
    let lowest = values.iter().copied().reduce(f64::min)?;
    let highest = values.iter().copied().reduce(f64::max)?;
    Some((lowest, highest))
}

/// Share of throughput a variant costs: 1 - its req/s over untraced (see `ratio`).
fn overhead(rounds: &[Round], app: &str, variant: Variant) -> Option<f64> {
    ratio(rounds, app, variant, rps).map(|r| 1.0 - r)
}

/// zerotel's overhead over the SDK's; None when the SDK cost nothing measurable, which leaves
/// nothing to compare with.
fn overhead_share(zerotel: Option<f64>, sdk: Option<f64>) -> Option<f64> {
    match (zerotel, sdk) {
        (Some(z), Some(s)) if s > 0.0 => Some(z / s),
        _ => None,
    }
}

fn share(rounds: &[Round], app: &str) -> Option<f64> {
    overhead_share(
        overhead(rounds, app, Variant::Zerotel),
        overhead(rounds, app, Variant::Sdk),
    )
}

fn report(ctx: &Ctx, apps: &[App], installs: &[Install], rounds: &[Round]) -> Report {
    let a = ctx.args;
    let targets: Vec<Target> = apps
        .iter()
        .map(|app| {
            Target::new(
                match app.kind {
                    Kind::Flask => "flask: zerotel's throughput overhead / the SDK's",
                    Kind::Node => "node: zerotel's throughput overhead / the SDK's",
                },
                share(rounds, app.name()),
                Cmp::AtMost,
                TARGET_OVERHEAD_SHARE,
                2,
            )
        })
        .collect();
    let per_app: serde_json::Map<String, Value> = apps
        .iter()
        .map(|app| (app.name().to_string(), app_json(rounds, app)))
        .collect();
    let json = json!({
        "scenario": "sdk",
        "config": {
            "rounds": a.rounds, "duration_s": a.duration, "connections": a.connections,
            "threads": a.threads, "warmup_s": a.warmup, "path": PATH,
            "untraced_only": ctx.agent.is_none(), "agent_args": a.agent_args,
        },
        "installs": installs,
        "rounds": rounds,
        "apps": per_app,
        "targets": targets,
    });
    let mut markdown = heading(a, installs);
    for app in apps {
        markdown += &app_markdown(rounds, app);
    }
    markdown += &targets_markdown(&targets);
    Report { markdown, json }
}

fn app_json(rounds: &[Round], app: &App) -> Value {
    let name = app.name();
    let medians: serde_json::Map<String, Value> = Variant::ALL
        .iter()
        .map(|&v| {
            let m = |f: fn(&Round) -> Option<f64>| med(rounds, name, v, f);
            let value = json!({
                "requests_per_s": m(rps), "p50_us": m(p50), "p99_us": m(p99),
                "spans": m(|r| Some(r.spans as f64)),
                "spans_per_request": m(|r| Some(r.spans_per_request)),
                "app_cpu_us_per_request": m(|r| Some(r.app_cpu_us_per_request)),
                "requests_per_s_range": range(rounds, name, v).map(|(lo, hi)| [lo, hi]),
            });
            (v.name().to_string(), value)
        })
        .collect();
    let vs_untraced: serde_json::Map<String, Value> = Variant::TRACED
        .iter()
        .map(|&v| {
            let value = json!({
                "requests_per_s": ratio(rounds, name, v, rps),
                "p50": ratio(rounds, name, v, p50),
                "p99": ratio(rounds, name, v, p99),
                "overhead": overhead(rounds, name, v),
                // As the other benches compute it, for comparison.
                "requests_per_s_ratio_of_medians": med(rounds, name, v, rps)
                    .zip(med(rounds, name, Variant::Untraced, rps))
                    .map(|(t, u)| t / u),
            });
            (v.name().to_string(), value)
        })
        .collect();
    json!({
        "server": app.server_name(),
        "sdk": app.sdk_name(),
        "medians": medians,
        "over_untraced": vs_untraced,
        "agent": {
            "cpu_pct_of_core": med(rounds, name, Variant::Zerotel, |r| Some(r.agent.as_ref()?.cpu_pct_of_core)),
            "peak_rss_mib": med(rounds, name, Variant::Zerotel, |r| Some(r.agent.as_ref()?.peak_rss_mib)),
            "events_lost": med(rounds, name, Variant::Zerotel, |r| r.agent.as_ref()?.events_lost),
        },
        "zerotel_overhead_over_sdk_overhead": share(rounds, name),
    })
}

fn heading(a: &BenchArgs, installs: &[Install]) -> String {
    let installs: Vec<String> = installs
        .iter()
        .map(|i| {
            let took = i.seconds.map_or("already installed".into(), |s| {
                format!("installed in {s:.1} s")
            });
            format!(
                "{} ({}; {took}): {}",
                i.app,
                i.runtime,
                i.packages.join(", ")
            )
        })
        .collect();
    format!(
        "## bench sdk: zerotel next to OpenTelemetry auto-instrumentation, `GET {PATH}` under `wrk -t{} -c{} -d{}s`, {} rounds\n\n\
         Each round runs the app untraced, traced by zerotel (agent on the app's processes) and under the SDK \
         (OTLP/HTTP protobuf, batch span processor defaults), each a fresh process after {} s of unreported warm-up; \
         both export to the same local OTLP sink, which counts the spans it receives. \
         Ratios are traced over untraced within each round, median over the rounds; overhead is 1 - the req/s ratio.\n\n\
         Packages, under target/bench: {}\n",
        a.threads,
        a.connections,
        a.duration,
        a.rounds,
        a.warmup,
        installs.join("; ")
    )
}

fn app_markdown(rounds: &[Round], app: &App) -> String {
    let name = app.name();
    let mut md = format!(
        "\n### {}: {} vs {}\n\n\
         | round | variant | req/s | p50 | p99 | errors | spans | spans/req | app CPU us/req | agent CPU % of core | agent peak RSS MiB | lost |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        name,
        app.server_name(),
        app.sdk_name()
    );
    for r in rounds.iter().filter(|r| r.app == name) {
        let g = r.agent.as_ref();
        md += &format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.3} | {:.0} | {} | {} | {} |\n",
            r.round,
            r.variant,
            r.load.requests_per_s,
            fmt_us(r.load.p50_us),
            fmt_us(r.load.p99_us),
            r.load.socket_errors + r.load.non_2xx,
            r.spans,
            r.spans_per_request,
            r.app_cpu_us_per_request,
            num(g.map(|g| g.cpu_pct_of_core), 1),
            num(g.map(|g| g.peak_rss_mib), 1),
            num(g.and_then(|g| g.events_lost), 0),
        );
    }
    for v in Variant::ALL {
        let m = |f: fn(&Round) -> Option<f64>| med(rounds, name, v, f);
        md += &format!(
            "| **median** | {} | {} | {} | {} | | {} | {} | {} | {} | | |\n",
            v.name(),
            num(m(rps), 0),
            m(p50).map_or("n/a".into(), fmt_us),
            m(p99).map_or("n/a".into(), fmt_us),
            num(m(|r| Some(r.spans as f64)), 0),
            num(m(|r| Some(r.spans_per_request)), 3),
            num(m(|r| Some(r.app_cpu_us_per_request)), 0),
            num(m(|r| Some(r.agent.as_ref()?.cpu_pct_of_core)), 1),
        );
    }
    let ranges: Vec<String> = Variant::ALL
        .iter()
        .filter_map(|&v| {
            let (lo, hi) = range(rounds, name, v)?;
            Some(format!("{} {lo:.0}-{hi:.0}", v.name()))
        })
        .collect();
    md += &format!("\nreq/s over the rounds: {}\n\n", ranges.join(", "));
    for v in Variant::TRACED {
        let x = |f: fn(&Round) -> Option<f64>| {
            ratio(rounds, name, v, f).map_or("n/a".into(), |r| format!("x{r:.3}"))
        };
        md += &format!(
            "- {}: req/s {} of untraced, overhead {}; p50 {}, p99 {}\n",
            match v {
                Variant::Zerotel => "zerotel",
                _ => app.sdk_name(),
            },
            x(rps),
            pct(overhead(rounds, name, v)),
            x(p50),
            x(p99),
        );
    }
    md += &format!(
        "- zerotel's overhead is {} of the SDK's (target <= {TARGET_OVERHEAD_SHARE})\n",
        num(share(rounds, name), 2)
    );
    md
}

fn pct(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{:.1} %", v * 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(app: &'static str, i: usize, variant: Variant, requests_per_s: f64) -> Round {
        Round {
            app,
            round: i,
            variant: variant.name(),
            load: WrkResult {
                requests_per_s,
                p50_us: 100.0,
                ..Default::default()
            },
            warmup_requests: 0,
            spans: 0,
            spans_per_request: 0.0,
            app_cpu_us_per_request: 0.0,
            app_clean_exit: true,
            agent: None,
        }
    }

    #[test]
    fn overheads_and_their_share() {
        let rounds = [
            round("flask", 1, Variant::Untraced, 1000.0),
            round("flask", 1, Variant::Zerotel, 950.0),
            round("flask", 1, Variant::Sdk, 500.0),
            round("flask", 2, Variant::Untraced, 2000.0),
            round("flask", 2, Variant::Zerotel, 1940.0),
            round("flask", 2, Variant::Sdk, 1200.0),
            round("flask", 3, Variant::Untraced, 1500.0),
            round("flask", 3, Variant::Zerotel, 1500.0),
            round("flask", 3, Variant::Sdk, 600.0),
            round("node", 1, Variant::Untraced, 10.0),
        ];
        // Per-round ratios 0.95, 0.97, 1.0 and 0.5, 0.6, 0.4: medians 0.97 and 0.5.
        assert_eq!(ratio(&rounds, "flask", Variant::Zerotel, rps), Some(0.97));
        assert_eq!(ratio(&rounds, "flask", Variant::Sdk, rps), Some(0.5));
        assert_eq!(ratio(&rounds, "flask", Variant::Sdk, p50), Some(1.0));
        let z = share(&rounds, "flask").unwrap();
        assert!((z - 0.03 / 0.5).abs() < 1e-9);
        assert_eq!(range(&rounds, "flask", Variant::Sdk), Some((500.0, 1200.0)));
        // No SDK rounds for node: nothing to compare with.
        assert_eq!(share(&rounds, "node"), None);
    }

    #[test]
    fn share_needs_a_costly_sdk() {
        assert_eq!(overhead_share(Some(0.125), Some(0.5)), Some(0.25));
        assert_eq!(overhead_share(Some(-0.125), Some(0.5)), Some(-0.25));
        assert_eq!(overhead_share(Some(0.02), Some(0.0)), None);
        assert_eq!(overhead_share(None, Some(0.3)), None);
    }
}
