//! Kernel-side cost of the agent: BPF program run time and run count, which the kernel only
//! accounts while `kernel.bpf_stats_enabled` is 1 (there are no hardware perf counters here).

use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, Result};
use serde::Serialize;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The agent's programs are named after their Rust fns, which all start with this.
pub const PROG_PREFIX: &str = "zt_";

/// `sysctl -w kernel.bpf_stats_enabled=1` until dropped, then the previous value again.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn enable() -> Result<Self> {
        let previous = fs::read_to_string(SYSCTL)
            .with_context(|| format!("cannot read {SYSCTL} (kernel without BPF stats?)"))?;
        fs::write(SYSCTL, "1")
            .with_context(|| format!("cannot enable BPF stats in {SYSCTL} (needs root)"))?;
        Ok(Self {
            previous: previous.trim().to_string(),
        })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = fs::write(SYSCTL, &self.previous) {
            eprintln!(
                "bench: warning: cannot restore {SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgStat {
    pub id: u32,
    pub name: String,
    pub run_ns: u64,
    pub runs: u64,
}

/// Stats of the loaded programs whose name starts with `prefix`.
pub fn snapshot(prefix: &str) -> Result<Vec<ProgStat>> {
    let mut stats = Vec::new();
    let mut first_err = None;
    for info in aya::programs::loaded_programs() {
        // A program can vanish between listing and reading it: skip such errors.
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        let name = info.name_as_str().unwrap_or_default();
        if name.starts_with(prefix) {
            stats.push(ProgStat {
                id: info.id(),
                name: name.to_string(),
                run_ns: info.run_time().as_nanos() as u64,
                runs: info.run_count(),
            });
        }
    }
    match first_err {
        Some(e) if stats.is_empty() => {
            Err(e).context("cannot list the loaded BPF programs (needs root)")
        }
        _ => Ok(stats),
    }
}

/// Per-program growth between two snapshots (programs keyed by id), costliest first.
pub fn delta(before: &[ProgStat], after: &[ProgStat]) -> Vec<ProgStat> {
    let base: BTreeMap<u32, &ProgStat> = before.iter().map(|p| (p.id, p)).collect();
    let mut out: Vec<ProgStat> = after
        .iter()
        .map(|a| {
            let (ns, runs) = base.get(&a.id).map_or((0, 0), |b| (b.run_ns, b.runs));
            ProgStat {
                run_ns: a.run_ns.saturating_sub(ns),
                runs: a.runs.saturating_sub(runs),
                ..a.clone()
            }
        })
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.run_ns));
    out
}
