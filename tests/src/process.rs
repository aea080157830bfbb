//! Child-process plumbing: kill-on-drop guards, waits with timeouts, and
//! line readers for piped stdout.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    let err = std::io::Error::last_os_error();
    if rc != 0 && err.raw_os_error() != Some(libc::ESRCH) {
        panic!("kill({pid}, {signal}): {err}");
    }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// How a [`terminate`] ended.
#[derive(Debug, Clone, Copy)]
pub struct Termination {
    pub status: ExitStatus,
    /// True when the child ignored SIGTERM for the grace period and got SIGKILL.
    pub killed: bool,
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
pub fn terminate(child: &mut Child, grace: Duration) -> Termination {
    if let Some(status) = child.try_wait().expect("try_wait on child") {
        return Termination { status, killed: false };
    }
    send_signal(child.id(), libc::SIGTERM);
    if let Some(status) = wait_with_timeout(child, grace) {
        return Termination { status, killed: false };
    }
    send_signal(child.id(), libc::SIGKILL);
    let status = child.wait().expect("wait for SIGKILLed child");
    Termination { status, killed: true }
}

/// Spawns `command`, panicking with `what` on failure.
pub fn spawn(command: &mut Command, what: &str) -> Child {
    command.spawn().unwrap_or_else(|e| panic!("spawn {what} ({command:?}): {e}"))
}

/// A child process that is terminated (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: &str) -> ChildGuard {
        ChildGuard { child, what: what.to_string() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child already exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap_or_else(|e| panic!("try_wait on {}: {e}", self.what))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(3));
    }
}

/// Reads a child's stdout line by line on a background thread, so callers can
/// wait for a line with a timeout. Keeps draining until EOF, so the child
/// never blocks or gets EPIPE on its stdout.
#[derive(Debug)]
pub struct LineReader {
    lines: Receiver<String>,
    what: String,
}

impl LineReader {
    pub fn new(stdout: ChildStdout, what: &str) -> LineReader {
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LineReader { lines, what: what.to_string() }
    }

    /// The next line, or `Err` with a description on EOF or timeout.
    pub fn next_line(&self, timeout: Duration) -> Result<String, String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => Err(format!("no output line from {} within {timeout:?}", self.what)),
            Err(RecvTimeoutError::Disconnected) => Err(format!("{} closed its stdout", self.what)),
        }
    }
}

/// Collects everything a pipe produces on a background thread.
pub fn collect_pipe(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let result = pipe.read_to_end(&mut bytes);
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if let Err(e) = result {
            text.push_str(&format!("\n<error reading pipe: {e}>"));
        }
        text
    })
}

/// An interpreter running a script written into its own temp dir, with
/// piped stdin, stdout read line by line and stderr captured to a file.
/// Terminated on drop; the temp dir lives as long as the process.
pub struct ScriptProcess {
    // Field order matters: the child is terminated before its dir is removed.
    child: ChildGuard,
    stdin: Option<std::process::ChildStdin>,
    stdout: LineReader,
    dir: crate::util::TempDir,
    what: String,
}

impl ScriptProcess {
    /// Runs `interpreter <dir>/<script_name> args...` with `env` added and
    /// `OTEL_SERVICE_NAME` removed unless `env` sets it.
    pub fn spawn(
        interpreter: &std::path::Path,
        dir: crate::util::TempDir,
        script_name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> ScriptProcess {
        ScriptProcess::spawn_in(interpreter, dir, script_name, args, env, None)
    }

    /// As [`ScriptProcess::spawn`], in the cgroup v2 directory `cgroup` when given: the child
    /// joins it before it executes the interpreter, as container runtimes do.
    pub fn spawn_in(
        interpreter: &std::path::Path,
        dir: crate::util::TempDir,
        script_name: &str,
        args: &[String],
        env: &[(&str, &str)],
        cgroup: Option<&std::path::Path>,
    ) -> ScriptProcess {
        ScriptProcess::spawn_with(interpreter, dir, script_name, args, env, |command| {
            if let Some(cgroup) = cgroup {
                join_cgroup_before_exec(command, cgroup);
            }
        })
    }

    /// As [`ScriptProcess::spawn`], as user `uid` and group `gid` (no supplementary groups):
    /// `interpreter` and the script's dir must be theirs to read.
    pub fn spawn_as_user(
        interpreter: &std::path::Path,
        dir: crate::util::TempDir,
        script_name: &str,
        args: &[String],
        env: &[(&str, &str)],
        (uid, gid): (u32, u32),
    ) -> ScriptProcess {
        use std::os::unix::process::CommandExt;
        ScriptProcess::spawn_with(interpreter, dir, script_name, args, env, |command| {
            // Command drops supplementary groups itself when root sets a uid.
            command.uid(uid).gid(gid);
        })
    }

    fn spawn_with(
        interpreter: &std::path::Path,
        dir: crate::util::TempDir,
        script_name: &str,
        args: &[String],
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut Command),
    ) -> ScriptProcess {
        let what = format!("{} {script_name}", interpreter.display());
        let stderr_path = dir.join("stderr.log");
        let stderr =
            std::fs::File::create(&stderr_path).unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let mut command = Command::new(interpreter);
        command
            .arg(dir.join(script_name))
            .args(args)
            .env_remove("OTEL_SERVICE_NAME")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr);
        prepare(&mut command);
        let mut child = spawn(&mut command, &what);
        let stdin = child.stdin.take();
        let stdout = LineReader::new(child.stdout.take().expect("piped stdout"), &what);
        ScriptProcess { child: ChildGuard::new(child, &what), stdin, stdout, dir, what }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn dir(&self) -> &crate::util::TempDir {
        &self.dir
    }

    /// What the script wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.dir.read("stderr.log")
    }

    /// The next stdout line; panics (with the script's stderr) on timeout or exit.
    pub fn expect_line(&self, timeout: Duration) -> String {
        self.stdout.next_line(timeout).unwrap_or_else(|e| panic!("{e}; stderr of {}:\n{}", self.what, self.stderr()))
    }

    /// Writes one line to the script's stdin.
    pub fn send_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("write to stdin of {}: {e}; stderr:\n{}", self.what, self.stderr()));
    }
}

/// Reads `/proc/<pid>/stat` and returns the parent pid, if the process exists.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Format: "pid (comm) state ppid ..."; comm may contain spaces and parens.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Pids of the current children of `pid` (scans /proc).
pub fn children_of(pid: u32) -> Vec<u32> {
    let entries = std::fs::read_dir("/proc").expect("read /proc");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| parent_pid(candidate) == Some(pid))
        .collect()
}

/// Make the child write itself ("0") into `<cgroup>/cgroup.procs` between fork and exec.
pub fn join_cgroup_before_exec(command: &mut Command, cgroup: &std::path::Path) {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: only async-signal-safe calls (open, write, close) on memory allocated before fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written == 1 { Ok(()) } else { Err(error) }
        });
    }
}
