//! Invoking cargo for the workspace: building the agent, locating the target dir.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{display, stdout_of, workspace_root};

/// The agent package and its binary.
pub const AGENT_PKG: &str = "zerotel";
pub const AGENT_BIN: &str = "zerotel";

/// The cargo that runs us (cargo sets $CARGO), so `cargo +toolchain xtask` stays consistent.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo build -p zerotel [--release]`; returns the absolute path of the agent binary.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", AGENT_PKG, "--bin", AGENT_BIN])
        // JSON on stdout tells us where the binary went (honours CARGO_TARGET_DIR and config);
        // the human-readable diagnostics still go to stderr.
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    if release {
        cmd.arg("--release");
    }
    eprintln!("xtask: {}", display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
    let stdout = child.stdout.take().context("cargo stdout not captured")?;
    let mut exe = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        exe = exe.or_else(|| agent_executable(&line));
    }
    let status = child.wait().context("waiting for cargo build")?;
    if !status.success() {
        bail!(
            "building the agent failed ({status}); see the compiler errors above. \
             Reproduce with: cargo build -p {AGENT_PKG}{}",
            if release { " --release" } else { "" }
        );
    }
    let exe = exe.context("cargo build succeeded but reported no `zerotel` executable")?;
    eprintln!("xtask: agent binary: {}", exe.display());
    Ok(exe)
}

/// The `executable` of a compiler-artifact message for the agent binary.
fn agent_executable(json_line: &str) -> Option<PathBuf> {
    let msg: serde_json::Value = serde_json::from_str(json_line).ok()?;
    if msg.get("reason")?.as_str()? != "compiler-artifact"
        || msg.pointer("/target/name")?.as_str()? != AGENT_BIN
    {
        return None;
    }
    msg.get("executable")?.as_str().map(PathBuf::from)
}

/// The workspace target directory as cargo resolves it.
pub fn target_dir() -> Result<PathBuf> {
    let json = stdout_of(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))
        .context("cannot locate the target directory (cargo metadata)")?;
    let meta: serde_json::Value = serde_json::from_str(&json).context("parsing cargo metadata")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_agent_executable() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"zerotel","kind":["bin"]},"executable":"/t/debug/zerotel"}"#;
        assert_eq!(
            agent_executable(line),
            Some(PathBuf::from("/t/debug/zerotel"))
        );
        let lib =
            r#"{"reason":"compiler-artifact","target":{"name":"zerotel_abi"},"executable":null}"#;
        assert_eq!(agent_executable(lib), None);
    }
}
