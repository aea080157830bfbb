//! `cargo xtask fuzz [TARGET...] [--seconds N]`: builds the cargo-fuzz targets (fuzz/) with the
//! nightly, then runs them one at a time, each from its committed seeds (fuzz/seeds/TARGET) and
//! the corpus earlier runs grew (fuzz/corpus/TARGET, not committed). A crash, a hang or running
//! out of memory fails the run and names the input that reproduces it.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cargo_cmd, setup, signals,
    util::{display, workspace_root},
};

/// Every target (fuzz/fuzz_targets/NAME.rs).
pub const TARGETS: [&str; 5] = ["http1", "http2", "kafka", "postgres", "event_decode"];
/// Seconds per target when none are given.
pub const DEFAULT_SECONDS: u64 = 20;
/// Seconds per target in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 15;
/// An input slower than this is a hang (libFuzzer's default waits 20 minutes).
const UNIT_TIMEOUT_SECONDS: u64 = 10;
/// The parsers are safe Rust; the few `unsafe` reads are bounds-checked. Without AddressSanitizer
/// the build takes a fraction of the time and inputs run about twice as fast; overflow checks and
/// debug assertions stay on (cargo-fuzz's default).
const SANITIZER: &str = "none";

#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Targets to run (default: all): http1, http2, kafka, postgres, event_decode.
    pub targets: Vec<String>,
    /// How long to run each target.
    #[arg(long, default_value_t = DEFAULT_SECONDS)]
    pub seconds: u64,
    /// More libFuzzer options, after `--` (`-max_len=65536`, `-dict=FILE`, ...).
    #[arg(last = true)]
    pub libfuzzer_args: Vec<String>,
}

/// How one target's run went.
#[derive(Debug, Default, PartialEq)]
pub struct TargetRun {
    pub target: String,
    pub stats: Stats,
    /// The input that crashed, hung or ran out of memory, when it did.
    pub failure: Option<Failure>,
    pub log: PathBuf,
}

#[derive(Debug, Default, PartialEq)]
pub struct Failure {
    /// libFuzzer's words for it (`deadly signal`, `timeout`, `out-of-memory`...).
    pub kind: String,
    pub reproducer: Option<PathBuf>,
}

/// What libFuzzer reported last.
#[derive(Debug, Default, PartialEq)]
pub struct Stats {
    pub execs: u64,
    pub execs_per_second: u64,
    /// Coverage: edges (`cov`) and features (`ft`) reached, inputs in the corpus.
    pub edges: u64,
    pub features: u64,
    pub corpus: u64,
    pub seconds: f64,
}

pub fn run(args: &FuzzArgs) -> Result<i32> {
    let targets = select(&args.targets)?;
    signals::install();
    let runs = fuzz(&targets, args.seconds, &args.libfuzzer_args)?;
    Ok(report(&runs))
}

fn select(names: &[String]) -> Result<Vec<&'static str>> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            TARGETS
                .iter()
                .copied()
                .find(|t| t == name)
                .with_context(|| {
                    format!("no fuzz target `{name}`; there are: {}", TARGETS.join(", "))
                })
        })
        .collect()
}

/// Builds, then runs each target for `seconds`, one after the other (each takes a CPU).
pub fn fuzz(targets: &[&str], seconds: u64, libfuzzer_args: &[String]) -> Result<Vec<TargetRun>> {
    setup::ensure_cargo_fuzz()?;
    build()?;
    let mut runs = Vec::new();
    for target in targets {
        signals::check()?;
        runs.push(run_target(target, seconds, libfuzzer_args)?);
    }
    Ok(runs)
}

/// `cargo +nightly fuzz ...` from the workspace root, without the eBPF build (see agent/build.rs).
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["+nightly", "fuzz", subcommand, "--sanitizer", SANITIZER])
        .env("AYA_BUILD_SKIP", "1");
    // What `cargo xtask` (stable, package xtask) set for us must not reach the nightly build:
    // build scripts that watch these variables would rerun, and the build would differ from one
    // started by hand.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if is_set_by_cargo_run(&name) {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

fn is_set_by_cargo_run(name: &str) -> bool {
    matches!(
        name,
        "CARGO"
            | "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
            | "RUSTUP_TOOLCHAIN"
    ) || name.starts_with("CARGO_PKG_")
}

fn build() -> Result<()> {
    let mut cmd = cargo_fuzz("build");
    eprintln!("xtask: AYA_BUILD_SKIP=1 {}", display(&cmd));
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status}); see the compiler errors above");
    }
    eprintln!(
        "xtask: fuzz targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_target(target: &str, seconds: u64, libfuzzer_args: &[String]) -> Result<TargetRun> {
    let root = workspace_root();
    let corpus = root.join("fuzz/corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    let log = cargo_cmd::target_dir()?
        .join("fuzz")
        .join(format!("{target}.log"));
    fs::create_dir_all(log.parent().unwrap_or(&root))?;
    let mut cmd = cargo_fuzz("run");
    // New inputs go to the first directory: the seeds stay as committed.
    cmd.arg(target).arg(&corpus).arg(&seeds).arg("--").args([
        format!("-max_total_time={seconds}"),
        format!("-timeout={UNIT_TIMEOUT_SECONDS}"),
        "-print_final_stats=1".to_string(),
    ]);
    cmd.args(libfuzzer_args);
    eprintln!(
        "xtask: fuzz {target} for {seconds} s (log: {})",
        log.display()
    );
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    signals::forward_to(child.id());
    let stderr = child.stderr.take().context("stderr not captured")?;
    let mut log_file =
        File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut reader = OutputReader::default();
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading libFuzzer's output")?;
        writeln!(log_file, "{line}")?;
        if reader.read(&line) {
            eprintln!("  {line}");
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    let mut run = reader.finish(target, log);
    run.stats.seconds = started.elapsed().as_secs_f64();
    if !status.success() && run.failure.is_none() {
        run.failure = Some(Failure {
            kind: format!("cargo fuzz exited with {status}"),
            reproducer: None,
        });
    }
    print_run(&run);
    Ok(run)
}

/// Follows libFuzzer's output: the latest stats, and from the first sign of a failure, every line.
#[derive(Default)]
struct OutputReader {
    stats: Stats,
    failure: Option<Failure>,
}

impl OutputReader {
    /// Takes one line; true when it should be shown (it tells of a failure).
    fn read(&mut self, line: &str) -> bool {
        if let Some(kind) = failure_kind(line) {
            self.failure.get_or_insert(Failure {
                kind,
                reproducer: None,
            });
        }
        if let Some(path) = line
            .split_once("Test unit written to ")
            .map(|(_, p)| p.trim())
        {
            if let Some(failure) = self.failure.as_mut() {
                failure.reproducer = Some(PathBuf::from(path));
            }
        }
        if line.starts_with('#') && line.contains("cov: ") {
            self.stats.edges = field(line, "cov:").unwrap_or(self.stats.edges);
            self.stats.features = field(line, "ft:").unwrap_or(self.stats.features);
            self.stats.corpus = field(line, "corp:").unwrap_or(self.stats.corpus);
        }
        if let Some(value) = stat(line, "stat::number_of_executed_units:") {
            self.stats.execs = value;
        }
        if let Some(value) = stat(line, "stat::average_exec_per_sec:") {
            self.stats.execs_per_second = value;
        }
        self.failure.is_some()
    }

    fn finish(self, target: &str, log: PathBuf) -> TargetRun {
        TargetRun {
            target: target.to_string(),
            stats: self.stats,
            failure: self.failure,
            log,
        }
    }
}

/// `==123== ERROR: libFuzzer: timeout after 10 seconds` -> `timeout after 10 seconds`; a Rust
/// panic's first line counts too (its abort follows as `deadly signal`).
fn failure_kind(line: &str) -> Option<String> {
    if let Some((_, kind)) = line.split_once("ERROR: libFuzzer: ") {
        return Some(kind.trim().to_string());
    }
    if line.contains("panicked at ") {
        return Some("panic".to_string());
    }
    None
}

/// The number after `name` in a stats line (`corp: 12/3456b` -> 12).
fn field(line: &str, name: &str) -> Option<u64> {
    let rest = line.split_once(name)?.1.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `stat::name:   123`.
fn stat(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?.trim().parse().ok()
}

fn print_run(run: &TargetRun) {
    let s = &run.stats;
    match &run.failure {
        None => eprintln!(
            "xtask: fuzz {}: ok, {} execs in {:.0} s ({}/s), coverage {} edges {} features, corpus {}",
            run.target, s.execs, s.seconds, s.execs_per_second, s.edges, s.features, s.corpus
        ),
        Some(failure) => {
            eprintln!(
                "xtask: fuzz {}: FAILED ({}); full output in {}",
                run.target,
                failure.kind,
                run.log.display()
            );
            if let Some(path) = &failure.reproducer {
                eprintln!(
                    "xtask: reproducer: {}\nxtask: replay it: AYA_BUILD_SKIP=1 cargo +nightly fuzz run --sanitizer {SANITIZER} {} {}",
                    path.display(),
                    run.target,
                    path.display()
                );
            }
        }
    }
}

/// Prints the summary; the exit code (1 when a target failed).
pub fn report(runs: &[TargetRun]) -> i32 {
    println!("| target | execs | execs/s | edges | features | corpus | result |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for run in runs {
        let s = &run.stats;
        let result = match &run.failure {
            None => "ok".to_string(),
            Some(f) => format!(
                "FAILED: {} ({})",
                f.kind,
                f.reproducer
                    .as_deref()
                    .map_or("no reproducer".into(), |p| p.display().to_string())
            ),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {result} |",
            run.target, s.execs, s.execs_per_second, s.edges, s.features, s.corpus
        );
    }
    i32::from(runs.iter().any(|r| r.failure.is_some()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The directory the seeds of `target` are committed in.
    fn seeds_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds")
            .join(target)
    }

    #[test]
    fn reads_stats_and_failures() {
        let mut reader = OutputReader::default();
        assert!(!reader.read("INFO: Seed: 1234"));
        assert!(!reader.read(
            "#4096\tpulse  cov: 812 ft: 2301 corp: 95/21Kb lim: 4096 exec/s: 2048 rss: 61Mb"
        ));
        assert!(!reader.read("stat::number_of_executed_units: 40960"));
        assert!(!reader.read("stat::average_exec_per_sec:     2048"));
        assert!(reader.read("thread '<unnamed>' panicked at agent/src/protocols/http1.rs:1:1:"));
        assert!(reader.read("==7== ERROR: libFuzzer: deadly signal"));
        assert!(reader.read(
            "artifact_prefix='/w/fuzz/artifacts/http1/'; Test unit written to /w/fuzz/artifacts/http1/crash-ab"
        ));
        let run = reader.finish("http1", PathBuf::from("/l"));
        assert_eq!(
            run.stats,
            Stats {
                execs: 40960,
                execs_per_second: 2048,
                edges: 812,
                features: 2301,
                corpus: 95,
                seconds: 0.0
            }
        );
        let failure = run.failure.unwrap();
        assert_eq!(failure.kind, "panic");
        assert_eq!(
            failure.reproducer,
            Some(PathBuf::from("/w/fuzz/artifacts/http1/crash-ab"))
        );
    }

    #[test]
    fn selects_known_targets() {
        assert_eq!(select(&[]).unwrap(), TARGETS);
        assert_eq!(select(&["kafka".into()]).unwrap(), ["kafka"]);
        assert!(select(&["http3".into()]).is_err());
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        for target in TARGETS {
            let source = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/fuzz_targets")
                .join(format!("{target}.rs"));
            assert!(source.is_file(), "{} is missing", source.display());
            assert!(seeds_dir(target)
                .read_dir()
                .is_ok_and(|mut d| d.next().is_some()));
        }
    }
}
