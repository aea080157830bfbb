//! `cargo xtask test [--fuzz-seconds N] [-- CARGO_TEST_ARGS [-- HARNESS_ARGS]]`: unit tests in
//! parallel, a short run of every fuzz target, then the integration tests (`zerotel-tests`)
//! serially against the built agent.

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{
    cargo_cmd, fuzz,
    run::exit_code,
    setup, signals,
    util::{display, is_root},
};

const EBPF_PKG: &str = "zerotel-ebpf";
const INTEGRATION_PKG: &str = "zerotel-tests";

pub fn run(fuzz_seconds: u64, extra: &[String]) -> Result<i32> {
    setup::run(setup::Opts { peers: true })?;
    if !is_root() {
        eprintln!("xtask: warning: not root; the integration tests load eBPF programs and will likely fail");
    }
    let agent = cargo_cmd::build_agent(false)?;
    let (cargo_extra, harness_extra) = split_args(extra);
    signals::install();

    let mut unit = test_cmd(&agent);
    unit.args([
        "--workspace",
        "--exclude",
        EBPF_PKG,
        "--exclude",
        INTEGRATION_PKG,
    ]);
    unit.args(cargo_extra);
    if !harness_extra.is_empty() {
        unit.arg("--").args(harness_extra);
    }
    let unit = run_streaming(&mut unit)?;
    signals::check()?;
    let fuzzed = fuzz_briefly(fuzz_seconds)?;
    signals::check()?;

    // Serial: the integration tests share the kernel (loaded programs) and listening ports.
    let mut integ = test_cmd(&agent);
    integ.args(["-p", INTEGRATION_PKG]).args(cargo_extra);
    integ.args(["--", "--test-threads=1"]).args(harness_extra);
    let integ = run_streaming(&mut integ)?;

    report(&[
        ("unit tests", &unit),
        ("fuzz targets", &fuzzed),
        ("integration tests", &integ),
    ])
}

/// Every fuzz target for `seconds`: a target that crashes, hangs or runs out of memory fails
/// the run (its reproducer is named); one that does not passes.
fn fuzz_briefly(seconds: u64) -> Result<Outcome> {
    if seconds == 0 {
        return Ok(Outcome::default());
    }
    match fuzz::fuzz(&fuzz::TARGETS, seconds, &[]) {
        Ok(runs) => {
            let exit = fuzz::report(&runs);
            let failed = runs.iter().filter(|r| r.failure.is_some()).count() as u64;
            Ok(Outcome {
                passed: runs.len() as u64 - failed,
                failed,
                exit,
            })
        }
        Err(e) if signals::interrupted() => Err(e),
        Err(e) => {
            eprintln!("xtask: fuzzing failed: {e:#}");
            Ok(Outcome {
                exit: 1,
                ..Outcome::default()
            })
        }
    }
}

/// `a b -- c d` -> (`a b`, `c d`): cargo test args, then libtest harness args.
fn split_args(extra: &[String]) -> (&[String], &[String]) {
    match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[]),
    }
}

fn test_cmd(agent: &Path) -> Command {
    let mut cmd = cargo_cmd::cargo();
    // CI (and the rest of the environment) is inherited as is.
    cmd.arg("test").env("ZEROTEL_BIN", agent);
    cmd
}

#[derive(Default, Debug, PartialEq)]
struct Outcome {
    passed: u64,
    failed: u64,
    exit: i32,
}

/// Runs the command, copying its stdout through as it comes while summing `test result:` lines.
fn run_streaming(cmd: &mut Command) -> Result<Outcome> {
    eprintln!("xtask: {}", display(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    signals::forward_to(child.id());
    let mut stdout = child.stdout.take().context("stdout not captured")?;
    let mut outcome = Outcome::default();
    let (mut buf, mut line) = ([0u8; 8192], Vec::new());
    loop {
        // Raw chunks, not lines, so `test foo ... ` shows while foo runs.
        let n = stdout
            .read(&mut buf)
            .context("reading cargo test's output")?;
        if n == 0 {
            break;
        }
        std::io::stdout().write_all(&buf[..n])?;
        std::io::stdout().flush()?;
        for &b in &buf[..n] {
            if b == b'\n' {
                add_result_line(&mut outcome, &String::from_utf8_lossy(&line));
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    add_result_line(&mut outcome, &String::from_utf8_lossy(&line));
    outcome.exit = exit_code(child.wait().context("waiting for cargo test")?);
    Ok(outcome)
}

/// `test result: FAILED. 3 passed; 1 failed; 0 ignored; ...`
fn add_result_line(outcome: &mut Outcome, line: &str) {
    let Some(rest) = line.trim().strip_prefix("test result:") else {
        return;
    };
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(label), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match label {
            "passed" => outcome.passed += n,
            "failed" => outcome.failed += n,
            _ => {}
        }
    }
}

fn report(runs: &[(&str, &Outcome)]) -> Result<i32> {
    let (mut passed, mut failed, mut exit) = (0, 0, 0);
    for (name, o) in runs {
        if o.exit != 0 && o.failed == 0 {
            eprintln!(
                "xtask: {name}: exited with {} and no failed test (build error?)",
                o.exit
            );
        }
        passed += o.passed;
        failed += o.failed;
        if exit == 0 {
            exit = o.exit;
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_result_lines() {
        let mut o = Outcome::default();
        add_result_line(&mut o, "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        add_result_line(
            &mut o,
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        add_result_line(&mut o, "test foo ... ok");
        assert_eq!((o.passed, o.failed), (15, 2));
    }

    #[test]
    fn splits_cargo_and_harness_args() {
        let args: Vec<String> = ["spans", "--", "--nocapture"].map(String::from).to_vec();
        let (c, h) = split_args(&args);
        assert_eq!((c, h), (&args[..1], &args[2..]));
    }
}
