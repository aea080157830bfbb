//! Running wrk and reading its report.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::proc;
use crate::util::display;

pub struct Load<'a> {
    pub threads: u32,
    pub connections: u32,
    pub duration_s: u64,
    pub url: &'a str,
    /// `Connection: close`: a new connection per request.
    pub close: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct WrkResult {
    pub requests_per_s: f64,
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    pub non_2xx: u64,
}

pub fn run(wrk: &Path, load: &Load) -> Result<WrkResult> {
    let mut cmd = Command::new(wrk);
    cmd.args([
        "-t",
        &load.threads.to_string(),
        "-c",
        &load.connections.to_string(),
    ])
    .args(["-d", &format!("{}s", load.duration_s), "--latency"]);
    if load.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(load.url);
    let (status, out) = proc::run_polled(&mut cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status}):\n{out}", display(&cmd));
    }
    parse(&out).with_context(|| format!("cannot parse wrk's output:\n{out}"))
}

pub fn parse(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut rps, mut p50, mut p99) = (None, None, None);
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = parse_duration_us(v),
            ["99%", v] => p99 = parse_duration_us(v),
            [n, "requests", "in", ..] => r.requests = n.parse().context("requests count")?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => r.socket_errors = sum_socket_errors(rest),
            _ => {}
        }
    }
    r.requests_per_s = rps.context("no `Requests/sec:` line")?;
    r.p50_us = p50.context("no `50%` latency line (was --latency passed?)")?;
    r.p99_us = p99.context("no `99%` latency line")?;
    Ok(r)
}

/// `connect 0, read 3, write 0, timeout 12` -> 15.
fn sum_socket_errors(words: &[&str]) -> u64 {
    words
        .iter()
        .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
        .sum()
}

/// wrk prints latencies as `812.00us`, `1.25ms`, `2.00s`, `1.50m`.
pub fn parse_duration_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(num * scale)
}

/// `wrk -v` prints `wrk 4.1.0 [epoll] Copyright ...` and exits 1.
pub fn version(wrk: &Path) -> String {
    crate::util::any_output_of(wrk, &["-v"])
        .and_then(|o| {
            o.lines()
                .next()
                .map(|l| l.split(" Copyright").next().unwrap_or(l).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "Running 10s test @ http://127.0.0.1:8080/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   538.21us  301.10us  14.33ms   93.12%
    Req/Sec    45.01k     2.10k   50.12k    71.00%
  Latency Distribution
     50%  480.00us
     75%  600.00us
     90%  750.00us
     99%    1.52ms
  895432 requests in 10.00s, 140.04MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  89543.20
Transfer/sec:     14.00MB
";

    #[test]
    fn parses_report() {
        let r = parse(OUT).unwrap();
        assert_eq!(r.requests, 895432);
        assert_eq!(r.requests_per_s, 89543.20);
        assert_eq!(r.p50_us, 480.0);
        assert_eq!(r.p99_us, 1520.0);
        assert_eq!(r.socket_errors, 3);
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration_us("2.00s"), Some(2e6));
        assert_eq!(parse_duration_us("1.5m"), Some(90e6));
        assert_eq!(parse_duration_us("x"), None);
    }
}
