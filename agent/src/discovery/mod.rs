//! Which processes are traced: selectors applied at start-up, on exec and on a timer (for ports),
//! the kernel's TRACED_PIDS kept in step, connections that already existed seeded from procfs, and
//! each process's resource cached while it lives.

pub mod resource;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process},
};
use regex::Regex;
use zerotel_abi::{conn_key, protocol, role, ConnState};

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

pub struct Discovery {
    selector: Selector,
    trace_all: bool,
    traced_pids: BpfHashMap<MapData, u32, u8>,
    conns: BpfHashMap<MapData, u64, ConnState>,
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
    pub fn new(
        selector: Selector,
        traced_pids: BpfHashMap<MapData, u32, u8>,
        conns: BpfHashMap<MapData, u64, ConnState>,
        base: BaseResource,
    ) -> Self {
        Self {
            trace_all: selector.is_empty(),
            selector,
            traced_pids,
            conns,
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
        let _ = self.traced_pids.remove(&pid);
    }

    /// Forget kernel state of a connection whose process ended without closing it.
    pub fn forget_conn(&mut self, pid: u32, fd: u32) {
        let _ = self.conns.remove(&conn_key(pid, fd));
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
            if let Err(e) = self.traced_pids.insert(pid, 1, 0) {
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
        seeded
    }

    fn seed(&mut self, pid: u32, fd: u32, conn_role: u8, entry: &TcpNetEntry) -> Option<SeededConn> {
        let key = conn_key(pid, fd);
        if self.conns.get(&key, 0).is_ok() {
            return None; // the kernel saw it open
        }
        self.next_seeded_id += 1;
        let conn_id = SEEDED_ID_BIT | self.next_seeded_id;
        let state = ConnState { conn_id, role: conn_role, protocol: protocol::UNKNOWN, ..Default::default() };
        self.conns.insert(key, state, 0).ok()?;
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

fn exe_path(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}
