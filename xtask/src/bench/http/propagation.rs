//! `bench http --propagation`: what inserting `traceparent` into outgoing requests costs on top
//! of tracing. wrk -> nginx A (reverse proxy) -> nginx B (`return 200 "ok\n"`), A keeping an
//! HTTP/1.1 keep-alive pool to B; the agent traces both nginx (the deployment propagation is
//! for: B parses the header A's requests now carry). Three modes alternate: untraced, traced
//! with --no-propagation, traced with propagation (the agent's default).
//!
//! The agent only injects on connections it saw being opened (sock_ops at connect), so A's
//! upstream pool is emptied before every round's load (idle upstream connections close after
//! UPSTREAM_IDLE_S): each round opens its own, under that round's agent, in every mode alike.
//! After each load, with the agent still attached, a few requests go through A to a location
//! where B logs the `traceparent` it received: the report says whether injection happened.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    max_agent, med, med_agent_in, num, p50, p99, rate, ratio_of, requests_of, round, rps, table_of,
    wrk, AgentRound, Cmp, Hooks, LoadStats, Mode, RateResult, Round, Target, Tracer,
    WrkResult, UNTRACED,
};
use crate::{
    bench::{
        http1,
        nginx::{Nginx, Site, VERIFY_LOG, VERIFY_PREFIX},
        proc::TempDir,
        BenchArgs, Ctx, Report,
    },
    util::find_cmd,
};

pub const NAME: &str = "http-propagation";

/// The target: propagation costs at most 2% of traced throughput.
const TARGET_PROPAGATED_OVER_TRACED: f64 = 0.98;
/// Idle connections nginx A keeps to B, at least: raised to --connections, as A has up to one
/// request per client connection in flight to B, and every one beyond the pool would open a
/// connection to B and close it after its response (thousands per second under wrk), which
/// prices connection churn instead of requests on kept-alive connections.
const UPSTREAM_KEEPALIVE_MIN: u32 = 32;
/// An idle upstream connection is closed after this long, which is how the pool is emptied.
const UPSTREAM_IDLE_S: u32 = 1;
/// Requests sent through A after each load to see what B receives.
const VERIFY_REQUESTS: u32 = 8;
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Traced with --no-propagation: the baseline propagation is priced against.
const NO_PROPAGATION: Mode = Mode {
    name: "traced",
    agent_args: Some(&["--no-propagation"]),
};
const PROPAGATED: Mode = Mode {
    name: "propagated",
    agent_args: Some(&[]),
};
const MODES: [Mode; 3] = [UNTRACED, NO_PROPAGATION, PROPAGATED];
const MODE_NAMES: [&str; 3] = ["untraced", "traced", "propagated"];
/// (numerator, denominator) of the reported ratios; the last is the one the issue asks about.
const RATIOS: [(&str, &str); 3] = [
    ("traced", "untraced"),
    ("propagated", "untraced"),
    ("propagated", "traced"),
];

/// What nginx B received from the verify requests of one round.
#[derive(Debug, Clone, Serialize)]
pub struct Injection {
    /// Verify requests sent through nginx A after the load.
    pub requests: u32,
    /// How many reached nginx B with a well-formed `traceparent`.
    pub with_traceparent: u32,
    /// One traceparent B received.
    pub sample: Option<String>,
}

pub fn run(ctx: &Ctx) -> Result<Report> {
    let a = ctx.args;
    let wrk_bin = find_cmd("wrk").context("wrk is not installed: run `cargo xtask setup`")?;
    // Declared before the servers: dropped after them, so their files outlive them.
    let tmp = TempDir::new("http-propagation")?;
    let (dir_a, dir_b) = (tmp.path().join("nginx-a"), tmp.path().join("nginx-b"));
    for dir in [&dir_a, &dir_b] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let backend = Nginx::start_site(&dir_b, &Site::Backend)?;
    let proxy = Nginx::start_site(
        &dir_a,
        &Site::Proxy {
            upstream: backend.port,
            keepalive: upstream_keepalive(a),
            idle_s: UPSTREAM_IDLE_S,
        },
    )?;
    let url = format!("http://127.0.0.1:{}{}", proxy.port, a.path);
    eprintln!(
        "bench http --propagation: nginx A (proxy) master {} workers {:?} on {url} -> nginx B master {} workers {:?} on port {}",
        proxy.master, proxy.workers, backend.master, backend.workers, backend.port
    );
    let loads = super::Loads { args: a, url: &url, port: proxy.port, close: false };
    let saturate = |duration_s| loads.saturate(duration_s);
    let fixed_rate = loads.fixed_rate();
    loads.warm_up(&wrk_bin)?;
    let pids: Vec<u32> = proxy.pids().into_iter().chain(backend.pids()).collect();
    let tracer = match ctx.agent {
        Some(exe) => Some(Tracer::new(exe, pids, &a.agent_args, tmp.path().into())?),
        None => None,
    };
    let tracer = tracer.as_ref();
    let hooks = Upstream {
        proxy: SocketAddr::from(([127, 0, 0, 1], proxy.port)),
        backend_port: backend.port,
        verify_log: dir_b.join(VERIFY_LOG),
    };
    let (mut saturation, mut rated) = (Vec::new(), Vec::new());
    for i in 1..=a.rounds {
        for mode in &MODES {
            let load = || wrk::run(&wrk_bin, &saturate(a.duration));
            saturation.extend(round(tracer, mode, i, "saturation", &hooks, load)?);
        }
        for mode in &MODES {
            let load = || rate::run(&fixed_rate);
            rated.extend(round(tracer, mode, i, "rate", &hooks, load)?);
        }
    }
    Ok(report(ctx, &saturation, &rated))
}

fn upstream_keepalive(a: &BenchArgs) -> u32 {
    UPSTREAM_KEEPALIVE_MIN.max(a.connections)
}

/// Empties A's upstream pool before a load, asks B what arrived after it.
struct Upstream {
    proxy: SocketAddr,
    backend_port: u16,
    verify_log: PathBuf,
}

impl Hooks for Upstream {
    fn before_load(&self) -> Result<()> {
        let timeout = Duration::from_secs(u64::from(UPSTREAM_IDLE_S) + 5);
        let deadline = Instant::now() + timeout;
        loop {
            let open = established_with(self.backend_port)?;
            if open == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                eprintln!(
                    "bench http --propagation: warning: {open} connection ends to nginx B still open {timeout:?} after the last load: the round reuses connections opened before it"
                );
                return Ok(());
            }
            crate::signals::check()?;
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn check(&self, round: usize, kind: &str, mode: &str) -> Result<Option<Injection>> {
        let prefix = format!("{VERIFY_PREFIX}{kind}-{mode}-{round}-");
        for k in 0..VERIFY_REQUESTS {
            let path = format!("{prefix}{k}");
            let (status, _) = http1::get(self.proxy, &path, HTTP_TIMEOUT)
                .with_context(|| format!("verify request GET {path} through nginx A"))?;
            if status != 200 {
                bail!("verify request GET {path} through nginx A answered {status}");
            }
        }
        // B writes its log line around the time it answers: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let received = received(&self.verify_log, &prefix)?;
            if received.len() >= VERIFY_REQUESTS as usize || Instant::now() > deadline {
                let good: Vec<&String> = received.iter().flatten().collect();
                return Ok(Some(Injection {
                    requests: VERIFY_REQUESTS,
                    with_traceparent: good.len() as u32,
                    sample: good.first().map(|s| s.to_string()),
                }));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Per logged request under `prefix`: the well-formed traceparent it arrived with, if any.
fn received(log: &std::path::Path, prefix: &str) -> Result<Vec<Option<String>>> {
    let text = match fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", log.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(uri, _)| uri.starts_with(prefix))
        .map(|(_, tp)| Some(tp.trim().to_string()).filter(|tp| is_traceparent(tp)))
        .collect())
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, span, flags]
        if *version == "00" && hex(trace, 32) && hex(span, 16) && hex(flags, 2)
            && nonzero(trace) && nonzero(span))
}

/// Established TCP connection ends on 127.0.0.1 with `port` as either end (IPv4).
fn established_with(port: u16) -> Result<usize> {
    let text = fs::read_to_string("/proc/net/tcp").context("cannot read /proc/net/tcp")?;
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    Ok(text
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; st 01 is ESTABLISHED.
            f.len() > 3
                && f[3] == "01"
                && (port_of(f[1]) == Some(port) || port_of(f[2]) == Some(port))
        })
        .count())
}

// ---- report ----

/// zt_sk_msg program runs during the load per completed request: about 1 when every request
/// A sends to B went through the injection program, 0 when it is not attached.
fn sk_msg_runs_per_req<L: LoadStats>(r: &Round<L>) -> Option<f64> {
    let g = r.agent.as_ref()?;
    let runs: u64 = g
        .programs
        .iter()
        .filter(|p| p.name == "zt_sk_msg")
        .map(|p| p.runs)
        .sum();
    Some(runs as f64 / requests_of(&r.load, g.load_s))
}

/// Of the propagated rounds: the worst fraction of verify requests B got a traceparent on.
fn worst_injected_fraction<L>(rounds: &[Round<L>]) -> Option<f64> {
    rounds
        .iter()
        .filter(|r| r.mode == PROPAGATED.name)
        .filter_map(|r| r.injection.as_ref())
        .map(|j| f64::from(j.with_traceparent) / f64::from(j.requests.max(1)))
        .reduce(f64::min)
}

/// Verify requests with a traceparent in the rounds that must not inject.
fn control_leaks<L>(rounds: &[Round<L>]) -> u32 {
    rounds
        .iter()
        .filter(|r| r.mode != PROPAGATED.name)
        .filter_map(|r| r.injection.as_ref())
        .map(|j| j.with_traceparent)
        .sum()
}

fn report(ctx: &Ctx, saturation: &[Round<WrkResult>], rated: &[Round<RateResult>]) -> Report {
    let a = ctx.args;
    let injected = injected_verdict(saturation, rated);
    let targets = targets(saturation, rated);
    let json = json!({
        "scenario": NAME,
        "config": {
            "rounds": a.rounds, "duration_s": a.duration, "connections": a.connections,
            "threads": a.threads, "warmup_s": a.warmup, "path": a.path,
            "untraced_only": ctx.agent.is_none(), "agent_args": a.agent_args,
            "topology": "wrk -> nginx A (reverse proxy) -> nginx B (return 200 \"ok\\n\")",
            "traced": ["nginx A", "nginx B"],
            "modes": {
                "untraced": "no agent",
                "traced": "agent with --no-propagation",
                "propagated": "agent with propagation (its default)",
            },
            "upstream_keepalive": upstream_keepalive(a), "upstream_idle_s": UPSTREAM_IDLE_S,
            "verify_requests_per_round": VERIFY_REQUESTS,
        },
        "rounds": saturation,
        "medians": medians_json(saturation),
        "ratios": ratios_json(saturation),
        "rate": {
            "config": {
                "rate_per_s": a.rate, "duration_s": a.rate_duration(), "connections": a.connections,
            },
            "rounds": rated,
            "medians": medians_json(rated),
            "ratios": ratios_json(rated),
        },
        "injected": injected.0,
        "targets": targets,
    });
    let markdown = [
        intro(a),
        saturation_markdown(a, saturation),
        rate_markdown(a, rated),
        injection_markdown(saturation, rated, &injected.1),
        super::targets_markdown(&targets),
    ]
    .concat();
    Report { markdown, json }
}

fn medians_json<L: LoadStats>(rounds: &[Round<L>]) -> Value {
    let mut out = serde_json::Map::new();
    for mode in MODE_NAMES {
        let agent = (mode != "untraced").then(|| {
            json!({
                "cpu_s_per_mreq": med_agent_in(rounds, mode, |g| Some(g.cpu_s_per_mreq)),
                "cpu_pct_of_core": med_agent_in(rounds, mode, |g| Some(g.cpu_pct_of_core)),
                "peak_rss_mib": med_agent_in(rounds, mode, |g| Some(g.peak_rss_mib)),
                "events_lost": med_agent_in(rounds, mode, |g| g.events_lost),
                "spans": med_agent_in(rounds, mode, |g| g.spans),
                "kernel_ns_per_req": med_agent_in(rounds, mode, |g| Some(g.kernel_ns_per_req)),
                "kernel_ns_per_run": med_agent_in(rounds, mode, |g| Some(g.kernel_ns_per_run)),
                "sk_msg_runs_per_req": med(rounds, mode, sk_msg_runs_per_req),
            })
        });
        out.insert(
            mode.into(),
            json!({
                "requests_per_s": med(rounds, mode, rps),
                "p50_us": med(rounds, mode, p50),
                "p99_us": med(rounds, mode, p99),
                "agent": agent,
            }),
        );
    }
    Value::Object(out)
}

fn ratios_json<L: LoadStats>(rounds: &[Round<L>]) -> Value {
    let mut out = serde_json::Map::new();
    for (num, den) in RATIOS {
        out.insert(
            format!("{num}_over_{den}"),
            json!({
                "requests_per_s": ratio_of(rounds, num, den, rps),
                "p50": ratio_of(rounds, num, den, p50),
                "p99": ratio_of(rounds, num, den, p99),
            }),
        );
    }
    Value::Object(out)
}

fn intro(a: &BenchArgs) -> String {
    format!(
        "# bench http --propagation\n\n\
         wrk -> nginx A (reverse proxy, `proxy_http_version 1.1`, upstream `keepalive {}`: \
         at least --connections, so requests reuse connections to B instead of opening and closing some) -> \
         nginx B (`return 200 \"ok\\n\"`), `GET {}`. The agent traces both nginx.\n\
         Modes, alternated in each round: **untraced** (no agent), **traced** (agent with `--no-propagation`), \
         **propagated** (agent injecting `traceparent`, its default). Before every load A's idle upstream \
         connections are left to close ({UPSTREAM_IDLE_S} s idle timeout), so each round opens its own under \
         that round's agent (the agent injects only on connections it saw open).\n\n",
        upstream_keepalive(a),
        a.path
    )
}

fn saturation_markdown(a: &BenchArgs, rounds: &[Round<WrkResult>]) -> String {
    format!(
        "## saturation: `wrk -t{} -c{} -d{}s` on nginx A, {} rounds per mode\n\n{}{}",
        a.threads,
        a.connections,
        a.duration,
        a.rounds,
        table_of(rounds, &MODE_NAMES),
        summary(rounds)
    )
}

fn rate_markdown(a: &BenchArgs, rounds: &[Round<RateResult>]) -> String {
    let mut md = format!(
        "\n## fixed rate: {} req/s offered to nginx A over {} keep-alive connections for {} s, {} rounds per mode\n\n\
         Open loop: latency counts from each request's scheduled send time.\n\n{}{}",
        a.rate,
        a.connections,
        a.rate_duration(),
        a.rounds,
        table_of(rounds, &MODE_NAMES),
        summary(rounds)
    );
    // Below the offered rate a round measures saturation (and open-loop queueing), not the load.
    let short: Vec<&str> = MODE_NAMES
        .into_iter()
        .filter(|&m| med(rounds, m, rps).is_some_and(|r| r < 0.95 * f64::from(a.rate)))
        .collect();
    if !short.is_empty() {
        md += &format!(
            "note: {} rounds did not reach the offered rate: saturated at this --rate, their latencies include queueing\n",
            short.join(", ")
        );
    }
    md
}

fn summary<L: LoadStats>(rounds: &[Round<L>]) -> String {
    let x = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("x{v:.3}"));
    let mut s = String::from("\n");
    for (num, den) in RATIOS {
        let line = format!(
            "{num} / {den} (medians): req/s {}, p50 {}, p99 {}",
            x(ratio_of(rounds, num, den, rps)),
            x(ratio_of(rounds, num, den, p50)),
            x(ratio_of(rounds, num, den, p99)),
        );
        // The cost of propagation itself: what the target is about.
        s += &if (num, den) == ("propagated", "traced") {
            format!("**{line}** (the cost of propagation)\n")
        } else {
            format!("{line}\n")
        };
    }
    if !rounds.iter().any(|r| r.agent.is_some()) {
        return s + "agent: not run (--untraced-only)\n";
    }
    for mode in ["traced", "propagated"] {
        let m = |f: fn(&AgentRound) -> Option<f64>, d| num(med_agent_in(rounds, mode, f), d);
        s += &format!(
            "agent, {mode} (medians): {} CPU s per million requests ({} % of one core), peak RSS {} MiB, {} events lost, {} spans, kernel {} ns/request ({} ns/program run), sk_msg runs/request {}\n",
            m(|g| Some(g.cpu_s_per_mreq), 2),
            m(|g| Some(g.cpu_pct_of_core), 1),
            m(|g| Some(g.peak_rss_mib), 1),
            m(|g| g.events_lost, 0),
            m(|g| g.spans, 0),
            m(|g| Some(g.kernel_ns_per_req), 0),
            m(|g| Some(g.kernel_ns_per_run), 0),
            num(med(rounds, mode, sk_msg_runs_per_req), 2),
        );
    }
    s
}

/// (JSON value, markdown line) of whether the propagated rounds' requests reached B with a
/// traceparent, and the other rounds' without.
/// The lowest injected fraction of any round of either load.
fn worst_injected_overall(saturation: &[Round<WrkResult>], rated: &[Round<RateResult>]) -> Option<f64> {
    [worst_injected_fraction(saturation), worst_injected_fraction(rated)].into_iter().flatten().reduce(f64::min)
}

fn injected_verdict(
    saturation: &[Round<WrkResult>],
    rated: &[Round<RateResult>],
) -> (Value, String) {
    let worst = worst_injected_overall(saturation, rated);
    let leaks = control_leaks(saturation) + control_leaks(rated);
    let verdict = match worst {
        None => "n/a",
        Some(w) if w >= 1.0 => "yes",
        Some(w) if w > 0.0 => "partly",
        Some(_) => "no",
    };
    let mut line = match worst {
        None => "injected: n/a (no propagated round ran)\n".to_string(),
        Some(w) => format!(
            "injected: {verdict} (worst propagated round: {:.0}% of its verify requests reached nginx B with a traceparent)\n",
            w * 100.0
        ),
    };
    line += &format!(
        "control: {leaks} verify requests of untraced and --no-propagation rounds carried a traceparent (expected 0)\n"
    );
    let value = json!({
        "verdict": verdict,
        "worst_propagated_round_fraction": worst,
        "control_rounds_with_traceparent": leaks,
    });
    (value, line)
}

fn injection_markdown(
    saturation: &[Round<WrkResult>],
    rated: &[Round<RateResult>],
    verdict: &str,
) -> String {
    let mut md = format!(
        "\n## injection check\n\n\
         After each load, agent still attached: {VERIFY_REQUESTS} requests through nginx A to a location where \
         nginx B logs the `traceparent` it received. sk_msg runs/req: runs of the injection program \
         during the load per request (1: every request A sent B went through it).\n\n\
         | load | round | mode | verify requests with traceparent | sk_msg runs/req | sample received by B |\n\
         |---|---:|---|---:|---:|---|\n"
    );
    md += &injection_rows("saturation", saturation);
    md += &injection_rows("rate", rated);
    md + "\n" + verdict
}

fn injection_rows<L: LoadStats>(kind: &str, rounds: &[Round<L>]) -> String {
    rounds
        .iter()
        .map(|r| {
            let (got, sample) = r.injection.as_ref().map_or(("n/a".into(), "".into()), |j| {
                (
                    format!("{}/{}", j.with_traceparent, j.requests),
                    j.sample
                        .as_ref()
                        .map_or(String::new(), |s| format!("`{s}`")),
                )
            });
            format!(
                "| {kind} | {} | {} | {got} | {} | {sample} |\n",
                r.round,
                r.mode,
                num(sk_msg_runs_per_req(r), 2)
            )
        })
        .collect()
}

fn targets(saturation: &[Round<WrkResult>], rated: &[Round<RateResult>]) -> Vec<Target> {
    let worst = worst_injected_overall(saturation, rated);
    vec![
        Target::new(
            "saturation req/s propagated/traced (median)",
            ratio_of(saturation, "propagated", "traced", rps),
            Cmp::AtLeast,
            TARGET_PROPAGATED_OVER_TRACED,
            3,
        ),
        Target::new(
            "verify requests reaching B with a traceparent (worst propagated round, fraction)",
            worst,
            Cmp::Equals,
            1.0,
            2,
        ),
        Target::new(
            "rate-mode lost events (worst traced or propagated round)",
            max_agent(rated, |g| g.events_lost),
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
    fn recognises_traceparents() {
        assert!(is_traceparent(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        ));
        assert!(!is_traceparent("-"));
        assert!(!is_traceparent(
            "00-00000000000000000000000000000000-b7ad6b7169203331-01"
        ));
        assert!(!is_traceparent(
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"
        ));
    }

    #[test]
    fn reads_the_verify_log() {
        let dir = TempDir::new("verify-log-test").unwrap();
        let log = dir.path().join(VERIFY_LOG);
        fs::write(
            &log,
            "/zt-verify/rate-propagated-1-0 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n\
             /zt-verify/rate-propagated-1-1 -\n\
             /zt-verify/rate-traced-1-0 -\n",
        )
        .unwrap();
        let got = received(&log, "/zt-verify/rate-propagated-1-").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got.iter().flatten().count(), 1);
        assert!(received(&dir.path().join("missing"), "/")
            .unwrap()
            .is_empty());
    }
}
