//! The agent under test: started per traced round, polled over its HTTP endpoint, measured
//! through /proc, stopped with SIGTERM.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    http1,
    proc::{self, free_port, Guard},
};
use crate::{signals, util::display};

const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often /healthz is asked: fine enough for `bench startup` to time a start well under a second.
const HEALTH_POLL: Duration = Duration::from_millis(5);

pub struct Agent {
    guard: Guard,
    pub listen: SocketAddr,
    pub log: PathBuf,
    /// From spawn to the first 200 on /healthz.
    pub ready_after: Duration,
}

pub struct Spec<'a> {
    pub exe: &'a Path,
    pub pids: &'a [u32],
    pub otlp_endpoint: &'a str,
    pub extra_args: &'a [String],
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent and waits until /healthz answers 200.
    pub fn start(spec: Spec) -> Result<Self> {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = Command::new(spec.exe);
        for pid in spec.pids {
            cmd.arg("--pid").arg(pid.to_string());
        }
        cmd.arg("--listen").arg(listen.to_string());
        cmd.args([
            "--otlp-endpoint",
            spec.otlp_endpoint,
            "--otlp-protocol",
            "http/protobuf",
        ]);
        cmd.args(spec.extra_args);
        let out = fs::File::create(&spec.log)
            .with_context(|| format!("cannot create {}", spec.log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
        eprintln!("bench: started `{}` (pid {})", display(&cmd), child.id());
        let mut agent = Self {
            guard: Guard::new("zerotel", child),
            listen,
            log: spec.log,
            ready_after: Duration::ZERO,
        };
        agent.ready_after = agent.wait_healthy(spawned)?;
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// How long after `spawned` /healthz first answered 200.
    fn wait_healthy(&mut self, spawned: Instant) -> Result<Duration> {
        loop {
            if let Ok((200, _)) = http1::get(self.listen, "/healthz", HTTP_TIMEOUT) {
                let ready_after = spawned.elapsed();
                eprintln!("bench: agent healthy after {:.3} s", ready_after.as_secs_f64());
                return Ok(ready_after);
            }
            self.guard.ensure_running(&self.log)?;
            signals::check()?;
            if spawned.elapsed() > HEALTH_TIMEOUT {
                bail!(
                    "the agent did not answer 200 on http://{}/healthz within {HEALTH_TIMEOUT:?}; its log {}:\n{}",
                    self.listen,
                    self.log.display(),
                    proc::tail(&self.log, 30)
                );
            }
            thread::sleep(HEALTH_POLL);
        }
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        proc::cpu_seconds(self.pid())
    }

    pub fn peak_rss_mib(&self) -> Result<f64> {
        proc::peak_rss_mib(self.pid())
    }

    /// The Prometheus text of GET /metrics.
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = http1::get(self.listen, "/metrics", HTTP_TIMEOUT)
            .with_context(|| format!("GET http://{}/metrics", self.listen))?;
        if status != 200 {
            bail!("GET http://{}/metrics answered {status}", self.listen);
        }
        Ok(body)
    }

    /// SIGTERM; true if it exited 0 within 10 s.
    pub fn stop(&mut self) -> bool {
        self.stop_within(Duration::from_secs(10))
    }

    /// SIGTERM; true if it exited 0 within `grace` (SIGKILL after that).
    pub fn stop_within(&mut self, grace: Duration) -> bool {
        self.guard.stop(grace)
    }
}

/// Sum of a metric over all its label sets; None if the agent does not export it.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(labels) = rest.strip_prefix('{') {
            labels.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest) // no labels
        } else {
            None // a longer metric name sharing the prefix
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_label_sets() {
        let text = "# TYPE zerotel_spans_total counter\n\
            zerotel_spans_total{protocol=\"http\"} 10\n\
            zerotel_spans_total{protocol=\"grpc\"} 5 1700000000\n\
            zerotel_spans_total_bytes 99\n\
            zerotel_events_lost_total 0\n";
        assert_eq!(metric_sum(text, "zerotel_spans_total"), Some(15.0));
        assert_eq!(metric_sum(text, "zerotel_events_lost_total"), Some(0.0));
        assert_eq!(metric_sum(text, "zerotel_missing"), None);
    }
}
