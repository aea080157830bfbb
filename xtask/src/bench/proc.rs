//! Child processes and /proc readings for the benches.

use std::{
    fs,
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{signals, util::display};

/// A child that is terminated (SIGTERM, then SIGKILL after a grace period) when dropped,
/// so an error anywhere in a bench does not leave servers running.
pub struct Guard {
    pub name: &'static str,
    pub child: Child,
    /// Extra pids to SIGKILL if the child had to be killed (nginx workers).
    pub also_kill: Vec<u32>,
}

impl Guard {
    pub fn new(name: &'static str, child: Child) -> Self {
        Self {
            name,
            child,
            also_kill: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running? Errors with `log` attached if it exited.
    pub fn ensure_running(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); its log {}:\n{}",
                self.name,
                log.display(),
                tail(log, 30)
            );
        }
        Ok(())
    }

    /// SIGTERM and wait up to `grace`; SIGKILL after that. Returns true on a clean exit.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.success();
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: {} did not stop within {grace:?} of SIGTERM: killing it",
            self.name
        );
        for pid in &self.also_kill {
            signal(*pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid we started; a stale pid at worst gets ESRCH.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Runs a load generator (wrk, h2load) to its end and returns its exit status and stdout
/// (stderr is left as set). Polls, so SIGTERM to xtask stops it too instead of waiting out
/// its duration.
pub fn run_polled(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    cmd.stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    let mut stdout = child.stdout.take().context("stdout not captured")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if signals::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            signals::check()?;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let out = reader
        .join()
        .map_err(|_| anyhow!("output reader of `{}` panicked", display(cmd)))?
        .with_context(|| format!("reading the output of `{}`", display(cmd)))?;
    Ok((status, out))
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A port that was free a moment ago (bind :0, read it, close).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// Polls until something accepts on `addr`, while `alive` says the server still runs.
pub fn wait_listening(
    addr: SocketAddr,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        alive()?;
        crate::signals::check()?;
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Pids whose parent is `ppid` (scans /proc: /proc/PID/task/*/children needs CONFIG_PROC_CHILDREN).
pub fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat_fields(*pid).ok().and_then(|f| f.get(1)?.parse().ok()) == Some(ppid))
        .collect()
}

/// Fields of /proc/PID/stat after `(comm)`: index 0 is state (field 3), 1 is ppid (field 4) ...
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // comm may contain spaces and parens: split after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    Ok(rest.split_whitespace().map(String::from).collect())
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let f = stat_fields(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after `(comm)`.
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .context("short /proc/PID/stat")?
            .parse::<f64>()
            .context("bad tick count")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// Peak resident set size (VmHWM), MiB.
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    status_mib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS), MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    status_mib(pid, "VmRSS:")
}

/// A `kB` field of /proc/PID/status, in MiB.
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/PID/status"))?;
    Ok(kib / 1024.0)
}

/// A scratch directory removed on drop; world-readable so nginx workers (user nobody) can
/// serve from it.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "zerotel-bench-{tag}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_stats() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        // Now first: it can only grow before the peak is read.
        let now = rss_mib(me).unwrap();
        assert!(now > 0.0 && peak_rss_mib(me).unwrap() >= now);
        let ppid = stat_fields(me).unwrap()[1].parse::<u32>().unwrap();
        assert!(children_of(ppid).contains(&me));
    }
}
