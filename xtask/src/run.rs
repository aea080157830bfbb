//! `cargo xtask run [--release] -- ARGS`: build the agent and run it as root.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, ExitStatus},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cargo_cmd, setup, signals,
    util::{display, find_cmd, is_root},
};

pub fn run(release: bool, args: &[String]) -> Result<i32> {
    setup::run(setup::Opts { peers: false })?;
    let exe = cargo_cmd::build_agent(release)?;
    let mut cmd = root_command(&exe)?;
    cmd.args(args);
    eprintln!("xtask: {}", display(&cmd));
    signals::install();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    signals::forward_to(child.id());
    let status = child.wait().context("waiting for the agent")?;
    Ok(exit_code(status))
}

/// The agent loads eBPF programs: run it directly as root, else through `sudo -E`.
fn root_command(exe: &Path) -> Result<Command> {
    if is_root() {
        return Ok(Command::new(exe));
    }
    let Some(sudo) = find_cmd("sudo") else {
        bail!("zerotel needs CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and, for propagation, CAP_NET_ADMIN (root has them): run as root or with sudo");
    };
    let mut cmd = Command::new(sudo);
    cmd.arg("-E").arg(exe);
    Ok(cmd)
}

/// The shell convention: the exit code, or 128 + signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}
