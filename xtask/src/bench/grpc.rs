//! `bench grpc`: HTTP/2 cleartext (h2c) requests to nghttpd serving a small file, without and
//! with the agent tracing nghttpd (server side, exporting OTLP/HTTP to a local sink), under
//! h2load as fast as it goes: a few connections, many concurrent streams on each. h2load is not
//! traced, like wrk in `bench http`.
//!
//! This prices the HTTP/2 machinery gRPC runs on (frames, HPACK, multiplexed streams), not
//! gRPC's own framing: nghttpd answers plain GETs. A gRPC load would be h2load POSTing one
//! length-prefixed message (`-d FILE -H 'content-type: application/grpc' -H 'te: trailers'`)
//! to a gRPC server, e.g. the Go echo server of tests/grpc/echo.go.
//!
//! Two phases, each alternating untraced and traced rounds: saturation (h2load as fast as it
//! goes, where the agent competes with nghttpd and h2load for this machine's CPUs) and a fixed
//! rate (`--rate` requests per second in all, h2load `--rps` per connection), the load a
//! production service runs at, where the cost shows as latency and CPU instead.
//!
//! nghttpd runs for the whole bench, h2load once per round: every round's connections are new,
//! so the agent (healthy before h2load starts) sees each from its first byte, HPACK tables
//! included.

use std::{
    fmt, fs,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    client_rounds::{self, max_agent, med, med_agent, ratio, AgentUse, Bench, ServerLoad},
    proc::{self, free_port, wait_listening, Guard, TempDir},
    targets::{fmt_us, num, targets_markdown, Cmp, Target},
    wrk::parse_duration_us,
    BenchArgs, Ctx, Report, Scenario,
};
use crate::util::{self, display, find_cmd};

/// h2load -c, -m and -t: a few connections with many streams each, as HTTP/2 clients (gRPC
/// channels) multiplex; one h2load thread, so nghttpd (one thread) and h2load get a CPU each
/// on a 2-CPU machine.
const CONNECTIONS: u32 = 4;
const STREAMS: u32 = 10;
const THREADS: u32 = 1;
/// What every request gets.
const PATH: &str = "/index.html";
const BODY: &str = "hello over h2c\n";

// Like the issue says: tracing may cost at most 5 % of the server's throughput.
const TARGET_RPS_RATIO: f64 = 0.95;

pub struct Grpc;

impl Scenario for Grpc {
    fn name(&self) -> &'static str {
        "grpc"
    }

    fn run(&self, ctx: &Ctx) -> Result<Report> {
        let a = ctx.args;
        let h2load_bin =
            find_cmd("h2load").context("h2load is not installed: run `cargo xtask setup`")?;
        // Declared before nghttpd: dropped after it, so nghttpd's files outlive nghttpd.
        let dir = TempDir::new("grpc")?;
        let server = Nghttpd::start(dir.path())?;
        let url = format!("http://127.0.0.1:{}{PATH}", server.port);
        eprintln!("bench grpc: nghttpd {} on {url}", server.pid());
        let bench = Bench::new("grpc", ctx, dir.path())?;
        let h2load = |duration_s, rps_per_connection| H2load {
            bin: &h2load_bin,
            url: &url,
            duration_s,
            rps_per_connection,
        };
        if a.warmup > 0 {
            h2load(a.warmup, None).run().context("warm-up load failed")?;
        }
        let saturated = bench.server_rounds(&[server.pid()], &h2load(a.duration, None), a.rounds)?;
        let per_connection = a.rate.div_ceil(CONNECTIONS);
        eprintln!("bench grpc: fixed rate, {} req/s", per_connection * CONNECTIONS);
        let fixed = h2load(a.rate_duration(), Some(per_connection));
        let fixed_rounds = bench.server_rounds(&[server.pid()], &fixed, a.rounds)?;
        let versions = Versions {
            h2load: version(&h2load_bin),
            nghttpd: version(&server.bin),
        };
        Ok(report(ctx, &saturated, &fixed_rounds, per_connection * CONNECTIONS, &versions))
    }
}

// ---- the server ----

/// nghttpd, h2c with prior knowledge (`--no-tls`), one thread, serving
/// `dir`/htdocs; stopped on drop.
struct Nghttpd {
    bin: std::path::PathBuf,
    port: u16,
    guard: Guard,
}

impl Nghttpd {
    fn start(dir: &Path) -> Result<Self> {
        // In /usr/sbin, which find_cmd also searches.
        let bin = find_cmd("nghttpd")
            .context("nghttpd is not installed (nghttp2-server): run `cargo xtask setup`")?;
        let htdocs = dir.join("htdocs");
        fs::create_dir_all(&htdocs)?;
        fs::write(htdocs.join(PATH.trim_start_matches('/')), BODY)?;
        let port = free_port()?;
        let log = dir.join("nghttpd.log");
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--no-tls", "--address=127.0.0.1"])
            .arg(format!("--htdocs={}", htdocs.display()))
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
        let mut guard = Guard::new("nghttpd", child);
        // One TCP connect that sends nothing: nghttpd just sees it close.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, Duration::from_secs(10), || guard.ensure_running(&log))
            .context("nghttpd did not start listening")?;
        Ok(Self { bin, port, guard })
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

// ---- h2load ----

/// `h2load -D duration_s` of GETs of `url`, h2c with prior knowledge; at most
/// `rps_per_connection` requests per second on each connection when set.
struct H2load<'a> {
    bin: &'a Path,
    url: &'a str,
    duration_s: u64,
    rps_per_connection: Option<u32>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
struct H2loadResult {
    /// h2load's own rate, over its measurement window (`finished in`).
    requests_per_s: f64,
    /// Requests done in the window.
    requests: u64,
    succeeded: u64,
    /// failed + errored + timeout.
    errors: u64,
    /// Requests answered with anything but 2xx.
    non_2xx: u64,
    /// `time for request` (from HEADERS sent to the response's end): h2load prints no
    /// percentiles, only min, max, mean and standard deviation.
    mean_us: f64,
    sd_us: f64,
    max_us: f64,
}

impl H2load<'_> {
    fn args(&self) -> Vec<String> {
        let n = |v: u32| v.to_string();
        let rate = self.rps_per_connection.map(|r| format!("--rps={r}"));
        let mut args: Vec<String> = vec![
            "-D".into(),
            self.duration_s.to_string(),
            "-c".into(),
            n(CONNECTIONS),
            "-m".into(),
            n(STREAMS),
            "-t".into(),
            n(THREADS),
        ];
        args.extend(rate);
        args.push(self.url.into());
        args
    }
}

impl ServerLoad for H2load<'_> {
    type Load = H2loadResult;
    type PerLoad = PerRequest;

    fn run(&self) -> Result<(H2loadResult, f64)> {
        let mut cmd = Command::new(self.bin);
        cmd.args(self.args());
        let started = Instant::now();
        let (status, out) = proc::run_polled(&mut cmd)?;
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("`{}` failed ({status}):\n{out}", display(&cmd));
        }
        let result =
            parse(&out).with_context(|| format!("cannot parse h2load's output:\n{out}"))?;
        if result.succeeded == 0 {
            bail!("h2load had no successful request:\n{out}");
        }
        Ok((result, seconds))
    }

    fn per_load(load: &H2loadResult, agent: &AgentUse) -> PerRequest {
        let requests = (load.requests as f64).max(1.0);
        PerRequest {
            cpu_s_per_mreq: agent.cpu_s / requests * 1e6,
            spans_per_s: agent.spans.map(|s| s / agent.load_s.max(1e-3)),
            spans_per_req: agent.spans.map(|s| s / requests),
            kernel_ns_per_req: agent.kernel_run_ns as f64 / requests,
            load_s: agent.load_s,
        }
    }
}

/// Reads h2load's summary:
/// ```text
/// finished in 3.00s, 365586.67 req/s, 15.34MB/s
/// requests: 1096760 total, 1096800 started, 1096760 done, 1096760 succeeded, 0 failed, 0 errored, 0 timeout
/// status codes: 1096760 2xx, 0 3xx, 0 4xx, 0 5xx
/// ...
///                      min         max         mean         sd        +/- sd
/// time for request:       34us      2.55ms       102us        38us    92.16%
/// ```
fn parse(out: &str) -> Result<H2loadResult> {
    let mut r = H2loadResult::default();
    let (mut rps, mut requests, mut codes, mut latency) = (None, None, None, None);
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            rps = rest
                .split(", ")
                .find_map(|p| p.strip_suffix(" req/s")?.parse::<f64>().ok());
        } else if let Some(rest) = line.strip_prefix("requests:") {
            requests = Some(counts(rest));
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            codes = Some(counts(rest));
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            latency = Some(
                rest.split_whitespace()
                    .take(4)
                    .map(parse_duration_us)
                    .collect::<Option<Vec<f64>>>()
                    .context("bad `time for request` line")?,
            );
        }
    }
    r.requests_per_s = rps.context("no `finished in ..., N req/s` line")?;
    let count = |counts: &[(String, u64)], name: &str| {
        counts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .with_context(|| format!("no `{name}` count"))
    };
    let requests = requests.context("no `requests:` line")?;
    r.requests = count(&requests, "done")?;
    r.succeeded = count(&requests, "succeeded")?;
    r.errors =
        count(&requests, "failed")? + count(&requests, "errored")? + count(&requests, "timeout")?;
    let codes = codes.context("no `status codes:` line")?;
    r.non_2xx = count(&codes, "3xx")? + count(&codes, "4xx")? + count(&codes, "5xx")?;
    match latency.as_deref() {
        Some(&[_min, max, mean, sd]) => (r.max_us, r.mean_us, r.sd_us) = (max, mean, sd),
        _ => bail!("no `time for request:` line"),
    }
    Ok(r)
}

/// ` 20 total, 20 started, 19 done` -> [("total", 20), ("started", 20), ("done", 19)].
fn counts(text: &str) -> Vec<(String, u64)> {
    text.split(',')
        .filter_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse().ok()?;
            Some((words.next()?.to_string(), n))
        })
        .collect()
}

/// `h2load nghttp2/1.52.0`.
fn version(bin: &Path) -> String {
    let name = bin.file_name().map_or("".into(), |n| n.to_string_lossy());
    util::any_output_of(bin, &["--version"])
        .and_then(|v| v.lines().next().map(|l| l.trim().to_string()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("{name} unknown"))
}

impl fmt::Display for H2loadResult {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{:.0} req/s, mean {}, max {}, {} errors",
            self.requests_per_s,
            fmt_us(self.mean_us),
            fmt_us(self.max_us),
            self.errors + self.non_2xx
        )
    }
}

/// The agent's figures relative to h2load's requests.
#[derive(Serialize)]
struct PerRequest {
    cpu_s_per_mreq: f64,
    /// spans over h2load's wall time.
    spans_per_s: Option<f64>,
    spans_per_req: Option<f64>,
    kernel_ns_per_req: f64,
    /// h2load's wall time (its -D window, plus connecting and stopping).
    load_s: f64,
}

type Round = client_rounds::Round<H2loadResult, PerRequest>;
type AgentRound = client_rounds::AgentRound<PerRequest>;

// ---- report ----

struct Versions {
    h2load: String,
    nghttpd: String,
}

fn rps(r: &Round) -> Option<f64> {
    Some(r.load.requests_per_s)
}

fn mean(r: &Round) -> Option<f64> {
    Some(r.load.mean_us)
}

fn report(ctx: &Ctx, rounds: &[Round], fixed: &[Round], rate: u32, versions: &Versions) -> Report {
    let a = ctx.args;
    let targets = targets(rounds, fixed);
    let json = json!({
        "scenario": "grpc",
        "config": {
            "rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup,
            "connections": CONNECTIONS, "streams_per_connection": STREAMS, "threads": THREADS,
            "path": PATH, "body_bytes": BODY.len(),
            "h2load": versions.h2load, "nghttpd": versions.nghttpd,
            "untraced_only": ctx.agent.is_none(), "agent_args": a.agent_args,
        },
        "rounds": rounds,
        "medians": medians_json(rounds),
        "ratios_traced_over_untraced": {
            "requests_per_s": ratio(rounds, rps), "mean_latency": ratio(rounds, mean),
        },
        "fixed_rate": {
            "requests_per_s_offered": rate, "duration_s": a.rate_duration(),
            "rounds": fixed,
            "medians": medians_json(fixed),
            "ratios_traced_over_untraced": {
                "requests_per_s": ratio(fixed, rps), "mean_latency": ratio(fixed, mean),
            },
        },
        "targets": targets,
    });
    let markdown = [
        heading(a, versions),
        format!("### Saturation: as fast as h2load goes ({}s rounds)\n\n", a.duration),
        table(rounds),
        summary(rounds),
        format!("\n### Fixed rate: {rate} req/s offered (h2load `--rps={}` on each connection, {}s rounds)\n\n", rate / CONNECTIONS, a.rate_duration()),
        table(fixed),
        summary(fixed),
        targets_markdown(&targets),
    ]
    .concat();
    Report { markdown, json }
}

fn medians_json(rounds: &[Round]) -> Value {
    let mode_medians = |mode| {
        json!({
            "requests_per_s": med(rounds, mode, rps),
            "mean_us": med(rounds, mode, mean),
            "max_us": med(rounds, mode, |r| Some(r.load.max_us)),
        })
    };
    let agent = json!({
        "cpu_s_per_mreq": med_agent(rounds, |g| Some(g.per_load.cpu_s_per_mreq)),
        "cpu_pct_of_core": med_agent(rounds, |g| Some(g.usage.cpu_pct_of_core)),
        "peak_rss_mib": med_agent(rounds, |g| Some(g.usage.peak_rss_mib)),
        "spans": med_agent(rounds, |g| g.usage.spans),
        "spans_per_s": med_agent(rounds, |g| g.per_load.spans_per_s),
        "spans_per_req": med_agent(rounds, |g| g.per_load.spans_per_req),
        "spans_exported": med_agent(rounds, |g| g.usage.spans_exported),
        "events_lost": med_agent(rounds, |g| g.usage.events_lost),
        "kernel_ns_per_req": med_agent(rounds, |g| Some(g.per_load.kernel_ns_per_req)),
    });
    json!({ "untraced": mode_medians("untraced"), "traced": mode_medians("traced"), "agent": agent })
}

fn heading(a: &BenchArgs, v: &Versions) -> String {
    format!(
        "## bench grpc: {} (h2c, one thread) `GET {PATH}` ({} B) under `h2load -D {} -c {CONNECTIONS} -m {STREAMS} -t {THREADS}` ({}), {} rounds per mode\n\n\
         Traced: the agent traces nghttpd (server side), exporting OTLP/HTTP to a local sink; h2load is not traced. \
         Latency is h2load's `time for request` (no percentiles: mean and max).\n\n",
        v.nghttpd,
        BODY.len(),
        a.duration,
        v.h2load,
        a.rounds
    )
}

fn table(rounds: &[Round]) -> String {
    let mut md = String::from(
        "| round | mode | req/s | mean | max | errors | agent CPU s | CPU % of core | CPU s / Mreq | peak RSS MiB | spans | spans/s | exported | lost | kernel ns/req |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rounds {
        let g = r.agent.as_ref();
        md += &format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} |\n",
            r.round,
            r.mode,
            r.load.requests_per_s,
            fmt_us(r.load.mean_us),
            fmt_us(r.load.max_us),
            r.load.errors + r.load.non_2xx,
            agent_cells(|f| g.and_then(f)),
        );
    }
    for mode in ["untraced", "traced"] {
        md += &format!(
            "| **median** | {mode} | {} | {} | {} | {} | {} |\n",
            num(med(rounds, mode, rps), 0),
            med(rounds, mode, mean).map_or("n/a".into(), fmt_us),
            med(rounds, mode, |r| Some(r.load.max_us)).map_or("n/a".into(), fmt_us),
            num(
                med(rounds, mode, |r| Some(
                    (r.load.errors + r.load.non_2xx) as f64
                )),
                0
            ),
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
        num(value(|g| Some(g.per_load.cpu_s_per_mreq)), 2),
        num(value(|g| Some(g.usage.peak_rss_mib)), 1),
        num(value(|g| g.usage.spans), 0),
        num(value(|g| g.per_load.spans_per_s), 0),
        num(value(|g| g.usage.spans_exported), 0),
        num(value(|g| g.usage.events_lost), 0),
        num(value(|g| Some(g.per_load.kernel_ns_per_req)), 0),
    ]
    .join(" | ")
}

fn summary(rounds: &[Round]) -> String {
    let x = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("x{v:.3}"));
    let mut s = format!(
        "\ntraced / untraced (medians): req/s {}, mean latency {}\n",
        x(ratio(rounds, rps)),
        x(ratio(rounds, mean)),
    );
    if rounds.iter().any(|r| r.agent.is_some()) {
        s += &format!(
            "agent (medians): {} CPU s per million requests ({} % of one core), peak RSS {} MiB, {} spans ({} per second, {} per request, {} exported), {} events lost, kernel {} ns/request\n",
            num(med_agent(rounds, |g| Some(g.per_load.cpu_s_per_mreq)), 2),
            num(med_agent(rounds, |g| Some(g.usage.cpu_pct_of_core)), 1),
            num(med_agent(rounds, |g| Some(g.usage.peak_rss_mib)), 1),
            num(med_agent(rounds, |g| g.usage.spans), 0),
            num(med_agent(rounds, |g| g.per_load.spans_per_s), 0),
            num(med_agent(rounds, |g| g.per_load.spans_per_req), 3),
            num(med_agent(rounds, |g| g.usage.spans_exported), 0),
            num(med_agent(rounds, |g| g.usage.events_lost), 0),
            num(med_agent(rounds, |g| Some(g.per_load.kernel_ns_per_req)), 0),
        );
    } else {
        s += "agent: not run (--untraced-only)\n";
    }
    s
}

// ---- targets ----

fn targets(saturated: &[Round], fixed: &[Round]) -> Vec<Target> {
    let lost = |rounds: &[Round]| max_agent(rounds, |g| g.usage.events_lost);
    vec![
        Target::new(
            "saturated req/s traced/untraced (median)",
            ratio(saturated, rps),
            Cmp::AtLeast,
            TARGET_RPS_RATIO,
            3,
        ),
        Target::new(
            "fixed-rate req/s traced/untraced (median)",
            ratio(fixed, rps),
            Cmp::AtLeast,
            TARGET_RPS_RATIO,
            3,
        ),
        Target::new(
            "lost events (worst round)",
            match (lost(saturated), lost(fixed)) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            Cmp::Equals,
            0.0,
            0,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 3s of main duration for measurements.
Application protocol: h2c

finished in 3.00s, 365586.67 req/s, 15.34MB/s
requests: 1096760 total, 1096800 started, 1096760 done, 1096750 succeeded, 7 failed, 2 errored, 1 timeout
status codes: 1096750 2xx, 0 3xx, 4 4xx, 1 5xx
traffic: 46.02MB (48258136) total, 11.51MB (12064960) headers (space savings 93.71%), 15.69MB (16451400) data
                     min         max         mean         sd        +/- sd
time for request:       34us      2.55ms       102us        38us    92.16%
time for connect:       70us       127us       105us        25us    75.00%
time to 1st byte:      415us       518us       469us        45us    50.00%
req/s           :   91338.91    91459.30    91392.65       59.94    75.00%
";

    #[test]
    fn parses_summary() {
        let r = parse(OUT).unwrap();
        assert_eq!(
            r,
            H2loadResult {
                requests_per_s: 365586.67,
                requests: 1096760,
                succeeded: 1096750,
                errors: 10,
                non_2xx: 5,
                mean_us: 102.0,
                sd_us: 38.0,
                max_us: 2550.0,
            }
        );
        assert!(parse("finished in 1s, 10.00 req/s, 1MB/s\n").is_err());
    }

    #[test]
    fn h2load_command_line() {
        let load = H2load {
            bin: Path::new("h2load"),
            url: "http://127.0.0.1:1/index.html",
            duration_s: 7,
            rps_per_connection: None,
        };
        assert_eq!(
            load.args().join(" "),
            "-D 7 -c 4 -m 10 -t 1 http://127.0.0.1:1/index.html"
        );
        let fixed = H2load { rps_per_connection: Some(2500), ..load };
        assert_eq!(
            fixed.args().join(" "),
            "-D 7 -c 4 -m 10 -t 1 --rps=2500 http://127.0.0.1:1/index.html"
        );
    }

    fn round(mode: &'static str, requests_per_s: f64) -> Round {
        Round {
            round: 1,
            mode,
            load: H2loadResult {
                requests_per_s,
                ..Default::default()
            },
            agent: None,
        }
    }

    #[test]
    fn ratio_and_targets() {
        let rounds = [
            round("untraced", 100.0),
            round("traced", 96.0),
            round("untraced", 100.0),
            round("traced", 94.0),
        ];
        assert_eq!(ratio(&rounds, rps), Some(0.95));
        assert_eq!(
            targets_markdown(&targets(&rounds, &rounds[..2])),
            "\ntargets: saturated req/s traced/untraced (median) 0.950 >= 0.95: met; fixed-rate req/s traced/untraced (median) 0.960 >= 0.95: met; lost events (worst round) n/a == 0: n/a\n"
        );
    }
}
