//! Which processes are traced: selectors applied at start-up, on exec and on a timer (for ports),
//! the kernel's TRACED_PIDS kept in step, connections that already existed seeded from procfs, and
//! each process's resource cached while it lives.

pub mod cgroup;
pub mod resource;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process},
};
use regex::Regex;
use zerotel_abi::{buffer, conn_key, direction, protocol, role, ConnState, InFlight};

use crate::spans::model::Resource;
use resource::BaseResource;

/// What the user asked to trace. Empty = every process but the agent.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub exes: Vec<Regex>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.ports.is_empty() && self.exes.is_empty()
    }

    fn matches_exe(&self, exe: &str) -> bool {
        self.exes.iter().any(|re| re.is_match(exe))
    }
}

/// A connection found in procfs at selection time.
#[derive(Debug, Clone)]
pub struct SeededConn {
    pub pid: u32,
    pub fd: u32,
    pub conn_id: u64,
    pub role: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// The kernel maps discovery keeps in step with what it selects.
pub struct KernelState {
    pub traced_pids: BpfHashMap<MapData, u32, u8>,
    pub conns: BpfHashMap<MapData, u64, ConnState>,
    pub in_flight: BpfHashMap<MapData, u64, InFlight>,
    /// Propagation's sockhash (None when propagation is off).
    pub inject_socks: Option<SockHash<MapData, u64>>,
}

pub struct Discovery {
    selector: Selector,
    trace_all: bool,
    kernel: KernelState,
    traced: HashSet<u32>,
    resources: HashMap<u32, Arc<Resource>>,
    base: BaseResource,
    agent_pid: u32,
    next_seeded_id: u64,
}

/// Connection ids the agent makes have the top bit set, so they never collide with the kernel's.
const SEEDED_ID_BIT: u64 = 1 << 63;
/// Bound of the resource cache (processes seen at once).
const MAX_RESOURCES: usize = 16_384;

impl Discovery {
    pub fn new(selector: Selector, kernel: KernelState, base: BaseResource) -> Self {
        Self {
            trace_all: selector.is_empty(),
            selector,
            kernel,
            traced: HashSet::new(),
            resources: HashMap::new(),
            base,
            agent_pid: std::process::id(),
            next_seeded_id: 0,
        }
    }

    /// Select every running process that matches, and seed its existing connections.
    pub fn scan(&mut self) -> Vec<SeededConn> {
        let listening = ListeningPorts::read(&self.selector.ports);
        let mut seeded = Vec::new();
        for process in procfs::process::all_processes().into_iter().flatten().flatten() {
            let pid = process.pid as u32;
            if pid == self.agent_pid || self.traced.contains(&pid) || !self.matches(&process, &listening) {
                continue;
            }
            seeded.extend(self.select(pid));
        }
        seeded
    }

    /// A process executed a program: trace it if it matches, and refresh its resource.
    pub fn on_exec(&mut self, pid: u32, comm: &str) -> Vec<SeededConn> {
        self.resources.remove(&pid);
        if self.trace_all || self.traced.contains(&pid) {
            self.resource_with_comm(pid, Some(comm));
            return Vec::new();
        }
        let exe = exe_path(pid).unwrap_or_default();
        if self.selector.matches_exe(&exe.to_string_lossy()) || self.selector.pids.contains(&pid) {
            return self.select(pid);
        }
        Vec::new()
    }

    pub fn on_exit(&mut self, pid: u32) {
        self.traced.remove(&pid);
        self.resources.remove(&pid);
        let _ = self.kernel.traced_pids.remove(&pid);
    }

    /// Forget kernel state of a connection whose process ended without closing it.
    pub fn forget_conn(&mut self, pid: u32, fd: u32) {
        let _ = self.kernel.conns.remove(&conn_key(pid, fd));
    }

    /// Whether port selectors need periodic rescans (a process may start listening any time).
    pub fn needs_rescan(&self) -> bool {
        !self.selector.ports.is_empty()
    }

    /// The resource of `pid`, built once while the process lives.
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        self.resource_with_comm(pid, None)
    }

    fn resource_with_comm(&mut self, pid: u32, comm: Option<&str>) -> Arc<Resource> {
        if self.resources.len() >= MAX_RESOURCES && !self.resources.contains_key(&pid) {
            // Exits keep this small; a flood of pids without exits must not grow it without end.
            self.resources.clear();
        }
        let base = &self.base;
        self.resources.entry(pid).or_insert_with(|| Arc::new(resource::for_process(pid, base, comm))).clone()
    }

    fn matches(&self, process: &Process, listening: &ListeningPorts) -> bool {
        let pid = process.pid as u32;
        if self.selector.pids.contains(&pid) {
            return true;
        }
        if !self.selector.exes.is_empty() {
            if let Ok(exe) = process.exe() {
                if self.selector.matches_exe(&exe.to_string_lossy()) {
                    return true;
                }
            }
        }
        !listening.inodes.is_empty() && socket_inodes(process).any(|(_, inode)| listening.inodes.contains(&inode))
    }

    /// Trace `pid`: kernel map, resource, and its established TCP connections.
    fn select(&mut self, pid: u32) -> Vec<SeededConn> {
        if !self.trace_all {
            if let Err(e) = self.kernel.traced_pids.insert(pid, 1, 0) {
                log::warn!("cannot trace pid {pid}: {e}");
                return Vec::new();
            }
        }
        self.traced.insert(pid);
        self.resource(pid);
        log::info!("tracing pid {pid} ({})", self.resource(pid).service_name());
        self.seed_connections(pid)
    }

    fn seed_connections(&mut self, pid: u32) -> Vec<SeededConn> {
        let Ok(process) = Process::new(pid as i32) else { return Vec::new() };
        let table: Vec<TcpNetEntry> =
            process.tcp().into_iter().chain(process.tcp6()).flatten().collect();
        let listening: HashSet<u16> =
            table.iter().filter(|e| e.state == TcpState::Listen).map(|e| e.local_address.port()).collect();
        let by_inode: HashMap<u64, &TcpNetEntry> =
            table.iter().filter(|e| e.state == TcpState::Established).map(|e| (e.inode, e)).collect();
        let mut seeded = Vec::new();
        for (fd, inode) in socket_inodes(&process) {
            let Some(entry) = by_inode.get(&inode) else { continue };
            let conn_role = if listening.contains(&entry.local_address.port()) { role::SERVER } else { role::CLIENT };
            if let Some(conn) = self.seed(pid, fd, conn_role, entry) {
                seeded.push(conn);
            }
        }
        let fds: HashSet<u32> = seeded.iter().map(|c| c.fd).collect();
        if !fds.is_empty() {
            self.seed_blocked_calls(pid, &fds);
        }
        seeded
    }

    /// A client connection opened before the agent never passed sock_ops: put it in the
    /// propagation sockhash now, through a duplicate of the process's fd (pidfd_getfd), keyed by
    /// its socket cookie like sock_ops does.
    fn propagate_on_existing(&mut self, pid: u32, fd: u32) {
        let Some(socks) = self.kernel.inject_socks.as_mut() else { return };
        let added = borrow_socket(pid, fd).and_then(|socket| {
            let cookie = crate::probes::socket_cookie(socket.as_raw_fd())?;
            const BPF_NOEXIST: u64 = 1;
            socks.insert(cookie, socket.as_raw_fd(), BPF_NOEXIST).map_err(std::io::Error::other)
        });
        if let Err(e) = added {
            log::debug!("no propagation on existing connection fd {fd} of pid {pid}: {e}");
        }
    }

    /// Threads already blocked in a read or write on a seeded socket when the probes attached (a
    /// keep-alive server waiting for the next request): the kernel never saw that call's entry,
    /// so record it from /proc/PID/task/TID/syscall, as the entry program would have.
    fn seed_blocked_calls(&mut self, pid: u32, fds: &HashSet<u32>) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let path = task.path().join("syscall");
            let Ok(before) = std::fs::read_to_string(&path) else { continue };
            let Some(call) = blocked_call(&before).filter(|c| fds.contains(&c.fd)) else { continue };
            let key = (u64::from(pid) << 32) | u64::from(tid);
            if self.kernel.in_flight.insert(key, call, 0).is_err() {
                continue;
            }
            // The call may have returned meanwhile: then the record would be stale.
            if std::fs::read_to_string(&path).ok().as_deref() != Some(before.as_str()) {
                let _ = self.kernel.in_flight.remove(&key);
            }
        }
    }

    fn seed(&mut self, pid: u32, fd: u32, conn_role: u8, entry: &TcpNetEntry) -> Option<SeededConn> {
        let key = conn_key(pid, fd);
        if self.kernel.conns.get(&key, 0).is_ok() {
            return None; // the kernel saw it open
        }
        self.next_seeded_id += 1;
        let conn_id = SEEDED_ID_BIT | self.next_seeded_id;
        let state = ConnState { conn_id, role: conn_role, protocol: protocol::UNKNOWN, ..Default::default() };
        self.kernel.conns.insert(key, state, 0).ok()?;
        if conn_role == role::CLIENT {
            self.propagate_on_existing(pid, fd);
        }
        Some(SeededConn { pid, fd, conn_id, role: conn_role, local: entry.local_address, remote: entry.remote_address })
    }
}

/// Socket inodes of the ports selected with `--port`, in the host's network namespace and in each
/// process's own (read lazily through /proc/PID/net).
struct ListeningPorts {
    inodes: HashSet<u64>,
}

impl ListeningPorts {
    fn read(ports: &[u16]) -> Self {
        if ports.is_empty() {
            return Self { inodes: HashSet::new() };
        }
        let mut namespaces = HashSet::new();
        let mut inodes = HashSet::new();
        for process in procfs::process::all_processes().into_iter().flatten().flatten() {
            let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/net", process.pid)) else { continue };
            if !namespaces.insert(ns) {
                continue;
            }
            let entries = process.tcp().into_iter().chain(process.tcp6()).flatten();
            inodes.extend(
                entries
                    .filter(|e| e.state == TcpState::Listen && ports.contains(&e.local_address.port()))
                    .map(|e| e.inode),
            );
        }
        Self { inodes }
    }
}

fn socket_inodes(process: &Process) -> impl Iterator<Item = (u32, u64)> {
    process.fd().into_iter().flatten().flatten().filter_map(|fd| match fd.target {
        FDTarget::Socket(inode) => Some((fd.fd as u32, inode)),
        _ => None,
    })
}

/// Parse `/proc/PID/task/TID/syscall` ("nr arg0 arg1 ... sp pc", arguments in hex) into the
/// record the entry program makes, for the data syscalls the probes handle.
pub fn blocked_call(text: &str) -> Option<InFlight> {
    let mut fields = text.split_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    let mut arg = || fields.next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
    let (fd, buf) = (arg()?, arg()?);
    let (dir, kind) = match nr {
        libc::SYS_read | libc::SYS_recvfrom => (direction::INGRESS, buffer::PLAIN),
        libc::SYS_readv => (direction::INGRESS, buffer::IOVEC),
        libc::SYS_recvmsg => (direction::INGRESS, buffer::MSGHDR),
        libc::SYS_write | libc::SYS_sendto => (direction::EGRESS, buffer::PLAIN),
        libc::SYS_writev => (direction::EGRESS, buffer::IOVEC),
        libc::SYS_sendmsg => (direction::EGRESS, buffer::MSGHDR),
        _ => return None,
    };
    let fd = u32::try_from(fd).ok()?;
    Some(InFlight { buf, start_ns: u64::try_from(crate::clock::now_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0), fd, direction: dir, buffer: kind, _pad: [0; 2] })
}

/// A duplicate of `fd` of process `pid` (needs ptrace rights over it: root has them).
fn borrow_socket(pid: u32, fd: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; every returned fd is owned right away.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let socket = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if socket < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(socket as i32))
    }
}

fn exe_path(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blocked_calls() {
        let line = format!("{} 0x5 0x7f00aa 0x2000 0x0 0x0 0x0 0x7ffd 0x7f01", libc::SYS_recvfrom);
        let call = blocked_call(&line).expect("recvfrom is a data call");
        assert_eq!((call.fd, call.buf, call.direction, call.buffer), (5, 0x7f00aa, direction::INGRESS, buffer::PLAIN));
        let line = format!("{} 0x7 0x10 0x2 0x0 0x0 0x0 0x1 0x2", libc::SYS_writev);
        assert_eq!(blocked_call(&line).map(|c| c.buffer), Some(buffer::IOVEC));
        for other in ["running", "-1 0x7ffd 0x7f01", "", &format!("{} 0x1 0x2", libc::SYS_futex)] {
            assert_eq!(blocked_call(other), None, "{other}");
        }
    }
}
