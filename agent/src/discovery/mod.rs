//! Which processes are traced: rules (`selection`) applied at start-up, on exec, when pod
//! metadata changes and on a timer (for ports); the kernel's TRACED_PIDS kept in step;
//! connections that already existed seeded from procfs; each process's resource cached while it
//! lives.

pub mod cgroup;
pub mod resource;
pub mod selection;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process},
};
use zerotel_abi::{buffer, conn_key, direction, limits, protocol, role, ConnState, InFlight, SEEDED_CONN_ID_BIT};

use crate::{
    kubernetes::{PodMeta, PodStore, PodUpdate},
    spans::model::Resource,
    telemetry::Telemetry,
};
use cgroup::ContainerRef;
use resource::BaseResource;
use selection::{Decision, Facts, PodFacts, PodView, Selection};

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
    pub traced_pids: BpfHashMap<MapData, u32, u64>,
    pub conns: BpfHashMap<MapData, u64, ConnState>,
    pub in_flight: BpfHashMap<MapData, u64, InFlight>,
    /// Propagation's sockhash (None when propagation is off).
    pub inject_socks: Option<SockHash<MapData, u64>>,
    /// Woken when a process starts being traced or a traced one runs a new program: the OpenSSL
    /// uprobes it needs are attached then, before its first TLS call if possible.
    pub programs_changed: Arc<tokio::sync::Notify>,
}

pub struct Discovery {
    selection: Selection,
    /// No rules: the kernel traces every process but the agent by itself.
    trace_all: bool,
    /// Pod metadata is expected (a watch runs); otherwise Kubernetes keys never match.
    kubernetes: bool,
    pods: PodStore,
    kernel: KernelState,
    /// Processes the agent selected (the kernel also traces their forks).
    traced: HashSet<u32>,
    /// Processes whose decision waits for their pod's metadata, until the deadline.
    pending: HashMap<u32, Instant>,
    /// Processes in pods, with their container, so pod updates find them.
    in_pods: HashMap<u32, ContainerRef>,
    resources: HashMap<u32, Arc<Resource>>,
    base: BaseResource,
    telemetry: Arc<Telemetry>,
    agent_pid: u32,
    next_seeded_id: u64,
}

/// Whether a newly selected process's existing connections are looked up in procfs.
#[derive(Debug, Clone, Copy)]
enum Seed {
    Connections,
    /// It just exec'd: nothing of its own yet (and reading /proc/PID/net costs on busy nodes).
    Nothing,
}

/// Bound of the per-process caches (processes seen at once).
const MAX_PROCESSES: usize = 16_384;
/// Longest wait for a new pod's metadata before deciding without it.
const METADATA_WAIT: Duration = Duration::from_secs(3);

impl Discovery {
    pub fn new(selection: Selection, kubernetes: bool, kernel: KernelState, base: BaseResource, telemetry: Arc<Telemetry>) -> Self {
        Self {
            trace_all: selection.traces_everything(),
            selection,
            kubernetes,
            pods: PodStore::default(),
            kernel,
            traced: HashSet::new(),
            pending: HashMap::new(),
            in_pods: HashMap::new(),
            resources: HashMap::new(),
            base,
            telemetry,
            agent_pid: std::process::id(),
            next_seeded_id: 0,
        }
    }

    /// Decide for every running process, and seed the connections of those newly traced.
    pub fn scan(&mut self) -> Vec<SeededConn> {
        let listening = ListeningPorts::read(&self.selection.ports());
        let mut seeded = Vec::new();
        for process in procfs::process::all_processes().into_iter().flatten().flatten() {
            let pid = process.pid as u32;
            if pid == self.agent_pid {
                continue;
            }
            let ports = listening.ports_of(&process);
            let decision = self.decide(pid, &ports);
            seeded.extend(self.apply(pid, decision, Seed::Connections));
        }
        self.publish_counts();
        seeded
    }

    /// A process executed a program (reported outside trace-all mode): decide again, as it may
    /// run another program or have started a container in another cgroup (then the kernel
    /// already stopped tracing it), and refresh its resource.
    pub fn on_exec(&mut self, pid: u32, comm: &str) {
        self.resources.remove(&pid);
        self.in_pods.remove(&pid);
        if !self.kernel_traces(pid) {
            self.traced.remove(&pid);
        }
        let decision = self.decide(pid, &[]);
        // A new program has no connections of its own yet.
        self.apply(pid, decision, Seed::Nothing);
        if self.traced.contains(&pid) {
            self.resource_with_comm(pid, Some(comm));
            self.kernel.programs_changed.notify_one();
        }
        self.publish_counts();
    }

    /// The kernel already forgot the process (it may be reused by a new one by the time this runs).
    pub fn on_exit(&mut self, pid: u32) {
        self.traced.remove(&pid);
        self.pending.remove(&pid);
        self.in_pods.remove(&pid);
        self.resources.remove(&pid);
        self.publish_counts();
    }

    /// New pod metadata: redecorate and decide again for the processes of the pods it changed.
    pub fn on_pod_update(&mut self, update: PodUpdate) -> Vec<SeededConn> {
        if matches!(update, PodUpdate::Synced) {
            self.pods.apply(update);
            if self.trace_all {
                self.resources.clear(); // redecorate; nothing to decide
                return Vec::new();
            }
            return self.scan(); // a (re)list: every pod may have changed
        }
        let changed = self.pods.apply(update);
        let pids: Vec<u32> = self
            .in_pods
            .iter()
            .filter(|(_, c)| c.pod_uid.as_ref().is_some_and(|uid| changed.contains(uid)))
            .map(|(pid, _)| *pid)
            .collect();
        let mut seeded = Vec::new();
        for pid in pids {
            self.resources.remove(&pid);
            if !self.trace_all {
                let decision = self.decide(pid, &[]);
                seeded.extend(self.apply(pid, decision, Seed::Connections));
            }
        }
        self.publish_counts();
        seeded
    }

    /// Decide, without metadata, for processes that waited for it too long.
    pub fn settle_overdue(&mut self) -> Vec<SeededConn> {
        let now = Instant::now();
        let overdue: Vec<u32> = self.pending.iter().filter(|(_, deadline)| **deadline <= now).map(|(pid, _)| *pid).collect();
        if overdue.is_empty() {
            return Vec::new();
        }
        let mut seeded = Vec::new();
        for pid in overdue {
            let decision = self.settle(pid);
            seeded.extend(self.apply(pid, decision, Seed::Connections));
        }
        self.publish_counts();
        seeded
    }

    /// Forget kernel state of a connection whose process ended without closing it.
    pub fn forget_conn(&mut self, pid: u32, fd: u32) {
        let _ = self.kernel.conns.remove(&conn_key(pid, fd));
    }

    /// Whether decisions need periodic rescans (a process may start listening any time).
    pub fn needs_rescan(&self) -> bool {
        !self.selection.ports().is_empty()
    }

    /// The resource of `pid`, built once while the process lives (again when its pod changes).
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        self.resource_with_comm(pid, None)
    }

    fn resource_with_comm(&mut self, pid: u32, comm: Option<&str>) -> Arc<Resource> {
        if let Some(resource) = self.resources.get(&pid) {
            return resource.clone();
        }
        if self.resources.len() >= MAX_PROCESSES {
            // Exits keep this small; a flood of pids without exits must not grow it without end.
            self.resources.clear();
        }
        let container = self.container_of(pid);
        let pod = container.pod_uid.as_deref().and_then(|uid| self.pods.get(uid));
        let resource = Arc::new(resource::for_process(pid, &self.base, comm, &container, pod));
        self.resources.insert(pid, resource.clone());
        resource
    }

    /// The container and pod of `pid` (cached for processes in pods).
    fn container_of(&mut self, pid: u32) -> ContainerRef {
        if let Some(known) = self.in_pods.get(&pid) {
            return known.clone();
        }
        let container = cgroup::for_pid(pid);
        if container.pod_uid.is_some() {
            if self.in_pods.len() >= MAX_PROCESSES {
                self.in_pods.clear();
            }
            self.in_pods.insert(pid, container.clone());
        }
        container
    }

    /// Match `pid` against the rules; Kubernetes keys may be undecided until its pod is known.
    fn decide(&mut self, pid: u32, open_ports: &[u16]) -> Decision {
        self.with_facts(pid, open_ports, |selection, facts| selection.decide(facts))
    }

    /// Match `pid` against the rules without waiting any longer for its pod's metadata.
    fn settle(&mut self, pid: u32) -> Decision {
        self.with_facts(pid, &[], |selection, facts| selection.settle(facts))
    }

    fn with_facts(&mut self, pid: u32, open_ports: &[u16], decide: impl Fn(&Selection, &Facts) -> Decision) -> Decision {
        let exe = exe_path(pid);
        let container = if self.kubernetes { self.container_of(pid) } else { ContainerRef::default() };
        let pod = container.pod_uid.as_deref().and_then(|uid| self.pods.get(uid));
        let view = pod.map(|pod| pod_view(pod, &container));
        let pod_facts = match (&view, &container.pod_uid) {
            (Some(view), _) => PodFacts::Known(view),
            (None, Some(_)) => PodFacts::Unknown,
            (None, None) => PodFacts::NotInPod,
        };
        decide(&self.selection, &Facts { pid, exe: exe.as_deref(), open_ports, pod: pod_facts })
    }

    /// Act on a decision: trace, stop tracing, or wait for metadata.
    fn apply(&mut self, pid: u32, decision: Decision, seed: Seed) -> Vec<SeededConn> {
        if decision != Decision::Undecided {
            self.pending.remove(&pid);
        }
        match decision {
            Decision::Trace if self.traced.contains(&pid) && self.kernel_traces(pid) => Vec::new(),
            Decision::Trace => self.select(pid, seed),
            Decision::Excluded => {
                if self.traced.contains(&pid) || self.kernel_traces(pid) {
                    self.untrace_container_of(pid);
                }
                Vec::new()
            }
            // A fork of a traced process stays traced in its own cgroup (children of --pid).
            Decision::NotIncluded => {
                if !self.traced.contains(&pid) && self.kernel_traces(pid) {
                    self.traced.insert(pid);
                }
                Vec::new()
            }
            Decision::Undecided => {
                self.pending.entry(pid).or_insert_with(|| Instant::now() + METADATA_WAIT);
                Vec::new()
            }
        }
    }

    fn kernel_traces(&self, pid: u32) -> bool {
        self.trace_all || self.kernel.traced_pids.get(&pid, 0).is_ok()
    }

    /// Stop tracing `pid` and every other process of its container: forks that never exec'd
    /// (worker processes) inherited its tracing without the agent hearing of them.
    fn untrace_container_of(&mut self, pid: u32) {
        self.untrace(pid);
        let Some(container_id) = self.container_of(pid).container_id else { return };
        for process in procfs::process::all_processes().into_iter().flatten().flatten() {
            let other = process.pid as u32;
            if other != pid && self.kernel_traces(other) && cgroup::for_pid(other).container_id.as_ref() == Some(&container_id) {
                self.untrace(other);
            }
        }
    }

    fn untrace(&mut self, pid: u32) {
        let was_selected = self.traced.remove(&pid);
        let was_traced = self.kernel.traced_pids.remove(&pid).is_ok();
        if was_selected || was_traced {
            log::info!("not tracing pid {pid}: excluded");
        }
    }

    fn publish_counts(&self) {
        self.telemetry.processes_traced.store(self.traced.len() as u64, Ordering::Relaxed);
        self.telemetry.processes_pending.store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// Trace `pid`: kernel map, resource, and (`Seed::Connections`) its established TCP
    /// connections.
    fn select(&mut self, pid: u32, seed: Seed) -> Vec<SeededConn> {
        if !self.trace_all {
            // An entry the kernel has (a traced fork) keeps the cgroup it recorded.
            const BPF_NOEXIST: u64 = 1;
            match self.kernel.traced_pids.insert(pid, limits::CGROUP_UNRECORDED, BPF_NOEXIST) {
                Ok(()) => {}
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    log::warn!("cannot trace pid {pid}: {e}");
                    return Vec::new();
                }
            }
        }
        self.traced.insert(pid);
        self.kernel.programs_changed.notify_one();
        let resource = self.resource(pid);
        log::debug!("tracing pid {pid} ({})", resource.service_name());
        match seed {
            Seed::Connections => self.seed_connections(pid),
            Seed::Nothing => Vec::new(),
        }
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
        let conn_id = SEEDED_CONN_ID_BIT | self.next_seeded_id;
        let state = ConnState { conn_id, role: conn_role, protocol: protocol::UNKNOWN, ..Default::default() };
        self.kernel.conns.insert(key, state, 0).ok()?;
        if conn_role == role::CLIENT {
            self.propagate_on_existing(pid, fd);
        }
        Some(SeededConn { pid, fd, conn_id, role: conn_role, local: entry.local_address, remote: entry.remote_address })
    }
}

/// Listening sockets on the ports rules name, in the host's network namespace and in each
/// process's own (read lazily through /proc/PID/net): socket inode -> port.
struct ListeningPorts {
    ports_by_inode: HashMap<u64, u16>,
}

impl ListeningPorts {
    fn read(ports: &[u16]) -> Self {
        let mut ports_by_inode = HashMap::new();
        if ports.is_empty() {
            return Self { ports_by_inode };
        }
        let mut namespaces = HashSet::new();
        for process in procfs::process::all_processes().into_iter().flatten().flatten() {
            let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/net", process.pid)) else { continue };
            if !namespaces.insert(ns) {
                continue;
            }
            let entries = process.tcp().into_iter().chain(process.tcp6()).flatten();
            ports_by_inode.extend(
                entries
                    .filter(|e| e.state == TcpState::Listen && ports.contains(&e.local_address.port()))
                    .map(|e| (e.inode, e.local_address.port())),
            );
        }
        Self { ports_by_inode }
    }

    /// The named ports `process` listens on.
    fn ports_of(&self, process: &Process) -> Vec<u16> {
        if self.ports_by_inode.is_empty() {
            return Vec::new();
        }
        socket_inodes(process).filter_map(|(_, inode)| self.ports_by_inode.get(&inode).copied()).collect()
    }
}

/// What the rules see of a pod, with the process's container named when the status lists it.
fn pod_view<'a>(pod: &'a PodMeta, container: &ContainerRef) -> PodView<'a> {
    let name = container.container_id.as_deref().and_then(|id| pod.container_by_id(id)).map(|c| c.name.as_str());
    PodView { namespace: &pod.namespace, labels: &pod.labels, owners: &pod.owners, container: name }
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

fn exe_path(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned())
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
