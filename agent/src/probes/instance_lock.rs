//! One agent per host. A second one would attach every probe again and insert a second
//! `traceparent` into each outgoing request, so it refuses to start. The lock is an exclusive
//! `flock` on a file (holding the holder's pid for the message): the kernel releases it when the
//! holder's process ends, however it ends, so a killed agent leaves no stale lock behind.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
};

/// Where the lock lives unless `--lock-file` says otherwise (on Kubernetes, a hostPath mount of
/// the node's file, so agents in different containers see each other).
pub const DEFAULT_PATH: &str = "/run/zerotel.lock";

/// Why this agent may not run.
#[derive(Debug, thiserror::Error)]
pub enum InstanceLockError {
    /// Another agent holds the lock.
    #[error("another zerotel agent (pid {holder}) is running on this host: it holds {path}. Two agents would attach every probe twice and insert traceparent twice: stop that one first (or give a deliberately separate instance its own --lock-file)")]
    Held { path: PathBuf, holder: String },
    /// The lock file cannot be opened or locked.
    #[error("cannot take the one-agent-per-host lock {path}: {error}. Pass --lock-file with a path this agent can write, the same for every agent of this host")]
    Io { path: PathBuf, error: std::io::Error },
}

/// Held while the agent runs; released by the kernel when the process ends.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Take the lock at `path` (created if missing) without waiting, and write our pid into it.
    pub fn acquire(path: &Path) -> Result<Self, InstanceLockError> {
        let io = |error| InstanceLockError::Io { path: path.to_owned(), error };
        // Not truncated on open: the holder's pid must survive until we hold the lock.
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(InstanceLockError::Held { path: path.to_owned(), holder: holder_pid(&mut file) });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id())).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// The pid the holder wrote, or why it is not known (it may be between locking and writing).
fn holder_pid(file: &mut File) -> String {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) if !text.trim().is_empty() => text.trim().to_owned(),
        _ => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_pid_until_the_first_lets_go() {
        let path = std::env::temp_dir().join(format!("zerotel-lock-test-{}", std::process::id()));
        let first = InstanceLock::acquire(&path).expect("first lock");
        // flock locks belong to open files: a second open in the same process conflicts too.
        let refused = InstanceLock::acquire(&path).expect_err("second lock refused");
        let message = refused.to_string();
        assert!(message.contains(&format!("(pid {})", std::process::id())), "{message}");
        drop(first);
        let again = InstanceLock::acquire(&path).expect("free again once the holder is gone");
        drop(again);
        let _ = std::fs::remove_file(&path);
    }
}
