//! Kernel-side cost of the agent: BPF program run time and run count, which the kernel only
//! accounts while `kernel.bpf_stats_enabled` is 1 (there are no hardware perf counters here).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

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

/// Ids of the BPF programs process `pid` holds (program and link fds, per /proc/PID/fdinfo):
/// the ones it loaded, as opposed to same-named programs of another agent on the machine.
pub fn prog_ids_of(pid: u32) -> Result<BTreeSet<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        // An fd can close between listing and reading it.
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(text.lines().filter_map(|l| {
            l.strip_prefix("prog_id:")
                .and_then(|v| v.trim().parse::<u32>().ok())
        }));
    }
    Ok(ids)
}

/// Keeps the programs in `ids`; all of them when `ids` is empty (ownership unknown).
pub fn only(mut stats: Vec<ProgStat>, ids: &BTreeSet<u32>) -> Vec<ProgStat> {
    if !ids.is_empty() {
        stats.retain(|p| ids.contains(&p.id));
    }
    stats
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(id: u32) -> ProgStat {
        ProgStat {
            id,
            name: "zt_x".into(),
            run_ns: 1,
            runs: 1,
        }
    }

    #[test]
    fn keeps_owned_programs() {
        // This test process holds no BPF program.
        let none = prog_ids_of(std::process::id()).unwrap();
        assert!(none.is_empty());
        assert_eq!(only(vec![stat(1), stat(2)], &none).len(), 2);
        let kept = only(vec![stat(1), stat(2)], &BTreeSet::from([2]));
        assert_eq!(kept.iter().map(|p| p.id).collect::<Vec<_>>(), [2]);
    }
}
