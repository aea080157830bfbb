//! The kernel side's lifecycle: check what this kernel and these privileges allow, load, attach,
//! detach. Dropping [`Probes`] detaches every program (aya owns the links). The probes come in
//! families ([`ProbeFamily`]) that attach on their own: the syscall tracepoints are the capture
//! itself and must attach; TLS and propagation are given up, with a log line, when they cannot.

mod instance_lock;
mod object;
mod offsets;
pub mod privileges;
mod tls;

pub use instance_lock::{InstanceLock, DEFAULT_PATH as DEFAULT_LOCK_FILE};
pub use tls::RESCAN as TLS_RESCAN;

use std::{ffi::CString, path::Path};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, Program, ProgramError, SkMsg, SkSkb, SockOps, TracePoint},
    Ebpf, EbpfLoader,
};
use zerotel_abi::{names, ConnState, InFlight, Sampler};

/// Why the probes could not run here, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The agent's effective set lacks capabilities it needs.
    #[error("{}", privileges::describe_missing(.0))]
    MissingCapabilities(Vec<privileges::Capability>),
    /// /proc/self/status could not be read for the capability sets.
    #[error("reading this process's capabilities from /proc/self/status: {0}")]
    ReadCapabilities(std::io::Error),
    /// The capabilities are there, yet the kernel refused to create the maps.
    #[error("the kernel refused to create the eBPF maps ({0}) although zerotel has CAP_BPF: a seccomp profile or LSM that blocks bpf(2) (container runtimes' defaults do: run with seccomp Unconfined), or on kernels before 5.11 a RLIMIT_MEMLOCK too low for the maps")]
    MapsRefused(std::io::Error),
    /// RLIMIT_MEMLOCK could not be lifted on a kernel that charges maps to it.
    #[error("raising RLIMIT_MEMLOCK for the eBPF maps (kernels before 5.11 charge maps to it): {0}")]
    Memlock(std::io::Error),
    /// The kernel's BTF is missing or lacks a field the programs read.
    #[error("kernel BTF: {0} (zerotel needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)")]
    Btf(String),
    /// Tracepoints are unreachable because tracefs could not be mounted.
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed: {0}. Mount it (`mount -t tracefs tracefs {TRACEFS}`; on Kubernetes the DaemonSet's hostPath volume does), or give zerotel CAP_SYS_ADMIN to mount it itself")]
    Tracefs(std::io::Error),
    /// The kernel rejected the object file.
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {program} ({tracepoint}): {source}")]
    Program { program: &'static str, tracepoint: String, source: aya::programs::ProgramError },
    /// A map the agent needs is missing or of the wrong type.
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    /// No cgroup v2 hierarchy to attach sock_ops to (needed for propagation only).
    #[error("no cgroup v2 mount in /proc/mounts (propagation needs one)")]
    NoCgroup2,
    /// This kernel's sockmap breaks FIONREAD on the sockets it holds (see `fionread_survives`).
    #[error("this kernel's sockmap makes FIONREAD report 0 bytes on sockets it holds, which stalls applications that size reads with it (nginx upstreams): propagation stays off; `--propagation on` forces it for applications that do not use FIONREAD")]
    UnsafeSockmap,
    /// The cgroup v2 root could not be opened.
    #[error("opening {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Every hook: (program, tracepoint category, tracepoint name).
const HOOKS: &[(&str, &str, &str)] = &[
    ("zt_sched_fork", "sched", "sched_process_fork"),
    ("zt_sched_exec", "sched", "sched_process_exec"),
    ("zt_sched_exit", "sched", "sched_process_exit"),
    ("zt_exit_accept", "syscalls", "sys_exit_accept"),
    ("zt_exit_accept", "syscalls", "sys_exit_accept4"),
    ("zt_enter_connect", "syscalls", "sys_enter_connect"),
    ("zt_exit_connect", "syscalls", "sys_exit_connect"),
    ("zt_enter_close", "syscalls", "sys_enter_close"),
    ("zt_enter_recv", "syscalls", "sys_enter_read"),
    ("zt_enter_recv", "syscalls", "sys_enter_recvfrom"),
    ("zt_enter_send", "syscalls", "sys_enter_write"),
    ("zt_enter_send", "syscalls", "sys_enter_sendto"),
    ("zt_enter_readv", "syscalls", "sys_enter_readv"),
    ("zt_enter_writev", "syscalls", "sys_enter_writev"),
    ("zt_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("zt_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("zt_enter_sendfile", "syscalls", "sys_enter_sendfile64"),
    ("zt_enter_splice", "syscalls", "sys_enter_splice"),
    ("zt_exit_data", "syscalls", "sys_exit_read"),
    ("zt_exit_data", "syscalls", "sys_exit_recvfrom"),
    ("zt_exit_data", "syscalls", "sys_exit_write"),
    ("zt_exit_data", "syscalls", "sys_exit_sendto"),
    ("zt_exit_data", "syscalls", "sys_exit_readv"),
    ("zt_exit_data", "syscalls", "sys_exit_writev"),
    ("zt_exit_data", "syscalls", "sys_exit_recvmsg"),
    ("zt_exit_data", "syscalls", "sys_exit_sendmsg"),
    ("zt_exit_data", "syscalls", "sys_exit_sendfile64"),
    ("zt_exit_data", "syscalls", "sys_exit_splice"),
];

/// Whether outgoing requests get a `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Propagation {
    /// On where this kernel passes the safety self-test (default).
    Auto,
    /// On even where the self-test fails.
    On,
    Off,
}

/// Which processes the kernel traces.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Only pids in TRACED_PIDS (and their forks), which include rules chose: usually a few.
    Selected,
    /// Pids in TRACED_PIDS, which exclude rules alone decide (the default: all but kube-system
    /// and telemetry agents): nearly every process. The kernel still asks TRACED_PIDS, but each
    /// OpenSSL file is probed once for all processes, not once per process (hundreds of probes,
    /// a minute to detach).
    AllExcept,
    /// Every process but the agent.
    All,
}

/// Probes that load and attach together, and fail together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFamily {
    /// Syscall and scheduler tracepoints: the capture itself (required).
    Syscalls,
    /// OpenSSL uprobes: the plaintext of TLS connections.
    Tls,
    /// sock_ops, sk_msg and sk_skb: trace context into outgoing requests and TCP options.
    Propagation,
}

impl ProbeFamily {
    pub const ALL: [Self; 3] = [Self::Syscalls, Self::Tls, Self::Propagation];

    /// Its name in logs and in `zerotel_probe_attached{probe}`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Syscalls => "syscalls",
            Self::Tls => "tls",
            Self::Propagation => "propagation",
        }
    }
}

/// Loaded and attached kernel programs.
pub struct Probes {
    /// Taken on drop so the programs detach before tracefs is unmounted.
    ebpf: Option<Ebpf>,
    /// Set when the agent mounted tracefs itself, to unmount it on exit.
    mounted_tracefs: bool,
    /// OpenSSL uprobes; None when they cannot load here (tracing goes on without TLS).
    tls: Option<tls::TlsProbes>,
    /// The traced tasks, read for the TLS rescan (another handle on TRACED_PIDS); None when
    /// every process is traced.
    traced_tasks: Option<BpfHashMap<MapData, u32, u64>>,
    /// The propagation programs are attached.
    propagating: bool,
}

/// The maps userspace works with, taken out of the object.
pub struct KernelMaps {
    pub events: RingBuf<MapData>,
    pub traced_pids: BpfHashMap<MapData, u32, u64>,
    pub conns: BpfHashMap<MapData, u64, ConnState>,
    pub in_flight: BpfHashMap<MapData, u64, InFlight>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Sockets whose requests get a traceparent; None when propagation is off.
    pub inject_socks: Option<SockHash<MapData, u64>>,
}

impl Probes {
    /// Can the probes run here? Returns why not: the capabilities missing from the effective set
    /// (being root is neither needed nor enough: a container's root may lack them), or BTF.
    pub fn check() -> Result<privileges::Effective, ProbeError> {
        let effective = privileges::Effective::of_this_process().map_err(ProbeError::ReadCapabilities)?;
        let missing = effective.missing(&privileges::required_here());
        if !missing.is_empty() {
            return Err(ProbeError::MissingCapabilities(missing));
        }
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(ProbeError::Btf("/sys/kernel/btf/vmlinux not found".into()));
        }
        Ok(effective)
    }

    /// Load the object with the kernel offsets and scope baked in, attach every hook. Propagation
    /// and TLS are attached when asked and possible; when not, tracing goes on without them (one
    /// log line each says why, and [`Probes::families`] reports them).
    pub fn load_and_attach(scope: Scope, propagation: Propagation, sampler: Sampler) -> Result<(Self, KernelMaps), ProbeError> {
        let effective = Self::check()?;
        privileges::lift_memlock_limit().map_err(ProbeError::Memlock)?;
        let (propagate, mut propagation_error) = propagation_allowed(propagation, effective);
        let mounted_tracefs = mount_tracefs()?;
        let offsets = offsets::resolve()?;
        let trace_all = u8::from(matches!(scope, Scope::All));
        let agent_pid = std::process::id();
        // No CO-RE relocations in our programs: skip aya's parse of the kernel BTF (tens of MiB).
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(names::OFFSETS, &offsets, true)
            .override_global(names::TRACE_ALL, &trace_all, true)
            .override_global(names::AGENT_PID, &agent_pid, true)
            .override_global(names::PROPAGATE, &u8::from(propagate), true)
            .override_global(names::SAMPLER, &sampler, true)
            .load(object::with_propagation(propagate).bytes())
            .map_err(|e| match e {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EPERM) =>
                {
                    ProbeError::MapsRefused(io_error)
                }
                other => ProbeError::Load(other),
            })?;
        verify_in_parallel(&mut ebpf, propagate);
        attach_all(&mut ebpf)?;
        if propagate {
            propagation_error = attach_propagation(&mut ebpf, propagation).err();
        }
        let propagating = propagate && propagation_error.is_none();
        if let Some(e) = &propagation_error {
            log_family_off(ProbeFamily::Propagation, e);
        }
        let tls = tls::TlsProbes::load(&mut ebpf).inspect_err(|e| log_family_off(ProbeFamily::Tls, e)).ok();
        let traced_tasks = match scope {
            Scope::Selected => Some(second_handle(&ebpf, names::TRACED_PIDS)?),
            Scope::AllExcept | Scope::All => None,
        };
        let mut maps = take_maps(&mut ebpf)?;
        if propagating {
            maps.inject_socks = Some(take(&mut ebpf, names::INJECT_SOCKS)?);
        }
        Ok((Self { ebpf: Some(ebpf), mounted_tracefs, tls, traced_tasks, propagating }, maps))
    }

    /// Each probe family and whether it is attached.
    pub fn families(&self) -> Vec<(ProbeFamily, bool)> {
        ProbeFamily::ALL.into_iter().map(|family| (family, self.is_attached(family))).collect()
    }

    pub fn is_attached(&self, family: ProbeFamily) -> bool {
        match family {
            // Loading fails as a whole when the tracepoints do not attach.
            ProbeFamily::Syscalls => self.ebpf.is_some(),
            ProbeFamily::Tls => self.tls.is_some(),
            ProbeFamily::Propagation => self.propagating,
        }
    }

    /// Attach the OpenSSL uprobes to what traced processes map now (see `tls`): once the traced
    /// processes are known, before the agent says it is ready, then every `TLS_RESCAN` and whenever
    /// discovery says a process started being traced or ran a new program.
    pub fn refresh_tls(&mut self) {
        let (Some(tls), Some(ebpf)) = (self.tls.as_mut(), self.ebpf.as_mut()) else { return };
        let tasks = self.traced_tasks.as_ref().map(|map| map.keys().filter_map(Result::ok).collect());
        tls.refresh(ebpf, tasks.as_ref());
    }

    /// How many tracepoints are attached, for the start-up log.
    pub fn hook_count(&self) -> usize {
        HOOKS.len()
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        // Detach first: programs and links go with the Ebpf value.
        drop(self.ebpf.take());
        if self.mounted_tracefs {
            if let Ok(path) = CString::new(TRACEFS) {
                // SAFETY: valid C string; MNT_DETACH never blocks.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

fn log_family_off(family: ProbeFamily, error: &ProbeError) {
    log::warn!("{} probes off, tracing goes on without them: {error}", family.name());
}

/// Whether to try propagation: asked for, and CAP_NET_ADMIN there (without it the sockhash cannot
/// even be created; the error says so, to log).
fn propagation_allowed(mode: Propagation, effective: privileges::Effective) -> (bool, Option<ProbeError>) {
    match mode {
        Propagation::Off => (false, None),
        _ if effective.has(privileges::NET_ADMIN) => (true, None),
        _ => (false, Some(ProbeError::MissingCapabilities(vec![privileges::NET_ADMIN]))),
    }
}

/// The programs the verifier takes longest over (0.2 to 0.5 s each here), started first so that
/// no CPU is left with one of them at the end.
const SLOWEST_TO_VERIFY: [&str; 3] = ["zt_ssl_return", "zt_sk_msg", "zt_exit_data"];
const PROPAGATION_PROGRAMS: [&str; 3] = ["zt_skb_verdict", "zt_sk_msg", "zt_sock_ops"];

/// Load (verify) the programs on every CPU at once: verification is most of the start-up time,
/// and programs verify independently. An error here is ignored: the load that follows, in
/// order, retries and reports it where it matters (a propagation program failing only turns
/// propagation off).
fn verify_in_parallel(ebpf: &mut Ebpf, propagate: bool) {
    let mut queue: Vec<(&str, &mut Program)> =
        ebpf.programs_mut().filter(|(name, _)| propagate || !PROPAGATION_PROGRAMS.contains(name)).collect();
    // Popped from the end: the slowest go last in the vector.
    queue.sort_by_key(|(name, _)| SLOWEST_TO_VERIFY.iter().rev().position(|slow| slow == name).map_or(0, |at| at + 1));
    let queue = std::sync::Mutex::new(queue);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                // The guard goes before the load: the loads are what runs in parallel.
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some((_, program)) = next else { break };
                let _ = load(program);
            });
        }
    });
}

fn load(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::TracePoint(p) => p.load(),
        Program::UProbe(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => Ok(()),
    }
}

/// A load's result, where "already loaded" (by `verify_in_parallel`) is success.
fn load_once(result: Result<(), ProgramError>) -> Result<(), ProgramError> {
    match result {
        Err(ProgramError::AlreadyLoaded) => Ok(()),
        other => other,
    }
}

fn attach_all(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let mut loaded: Vec<&str> = Vec::new();
    for &(program, category, name) in HOOKS {
        let err = |source| ProbeError::Program { program, tracepoint: format!("{category}/{name}"), source };
        let tp: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| err(aya::programs::ProgramError::NotLoaded))?
            .try_into()
            .map_err(err)?;
        if !loaded.contains(&program) {
            load_once(tp.load()).map_err(err)?;
            loaded.push(program);
        }
        tp.attach(category, name).map_err(err)?;
    }
    Ok(())
}

fn inject_socks(ebpf: &mut Ebpf) -> Result<SockHash<&mut MapData, u64>, ProbeError> {
    let name = names::INJECT_SOCKS;
    let map = ebpf
        .map_mut(name)
        .ok_or(ProbeError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
    SockHash::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

/// sk_skb verdict and sk_msg on the injection sockhash, sock_ops on the cgroup v2 root. The links are owned by the
/// programs, so dropping the object (or the agent dying) detaches both: nothing keeps altering
/// traffic without the agent.
fn attach_propagation(ebpf: &mut Ebpf, mode: Propagation) -> Result<(), ProbeError> {
    let err = |program, tracepoint: &str| {
        let tracepoint = tracepoint.to_owned();
        move |source| ProbeError::Program { program, tracepoint, source }
    };
    let socks_fd = inject_socks(ebpf)?
        .fd()
        .try_clone()
        .map_err(|e| ProbeError::Cgroup { path: names::INJECT_SOCKS.into(), source: e })?;
    // Before the self-test: the verdict program is what keeps FIONREAD right on kernels that
    // answer it from the sockmap's queue.
    let verdict: &mut SkSkb = program(ebpf, "zt_skb_verdict")?.try_into().map_err(err("zt_skb_verdict", "sockhash"))?;
    load_once(verdict.load()).map_err(err("zt_skb_verdict", "sockhash"))?;
    verdict.attach(&socks_fd).map_err(err("zt_skb_verdict", "sockhash"))?;
    let mut socks = inject_socks(ebpf)?;
    match fionread_survives(&mut socks) {
        Ok(true) => {}
        Ok(false) if mode == Propagation::On => log::warn!("{}: forced on", ProbeError::UnsafeSockmap),
        Ok(false) => return Err(ProbeError::UnsafeSockmap),
        Err(e) => return Err(ProbeError::Cgroup { path: "FIONREAD self-test".into(), source: e }),
    }
    let sk_msg: &mut SkMsg = program(ebpf, "zt_sk_msg")?.try_into().map_err(err("zt_sk_msg", "sockhash"))?;
    load_once(sk_msg.load()).map_err(err("zt_sk_msg", "sockhash"))?;
    sk_msg.attach(&socks_fd).map_err(err("zt_sk_msg", "sockhash"))?;
    let root = cgroup2_root()?;
    let cgroup = std::fs::File::open(&root).map_err(|source| ProbeError::Cgroup { path: root.clone(), source })?;
    let sock_ops: &mut SockOps = program(ebpf, "zt_sock_ops")?.try_into().map_err(err("zt_sock_ops", &root))?;
    load_once(sock_ops.load()).map_err(err("zt_sock_ops", &root))?;
    // Attached as a bpf_link, which coexists with other programs on the cgroup (links take no
    // ALLOW_MULTI flag: the kernel rejects it) and goes away with the agent.
    sock_ops.attach(cgroup, CgroupAttachMode::Single).map_err(err("zt_sock_ops", &root))?;
    log::info!("propagation: sock_ops on {root}, sk_msg on outgoing requests of traced processes");
    Ok(())
}

/// Does a socket held by the sockhash still report its queued bytes through FIONREAD? On some
/// kernels the sockmap's ioctl counts only its own ingress queue, which is empty for us, so it says
/// 0: programs that size their reads with FIONREAD (nginx reading an upstream) then wait forever.
/// Checked on a loopback pair of the agent's own before any application socket is touched.
fn fionread_survives(socks: &mut SockHash<&mut MapData, u64>) -> std::io::Result<bool> {
    use std::{io::Write as _, os::fd::AsRawFd as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (mut server, _) = listener.accept()?;
    let cookie = socket_cookie(client.as_raw_fd())?;
    socks.insert(cookie, client.as_raw_fd(), 0).map_err(std::io::Error::other)?;
    server.write_all(&[0u8; 100])?;
    let mut poll = libc::pollfd { fd: client.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; bounded wait.
    unsafe { libc::poll(&mut poll, 1, 1000) };
    let mut queued: libc::c_int = 0;
    // SAFETY: valid fd and out-pointer.
    let rc = unsafe { libc::ioctl(client.as_raw_fd(), libc::FIONREAD, &mut queued) };
    let _ = socks.remove(&cookie);
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(queued == 100)
}

/// SO_COOKIE: the id sock_ops and sk_msg see for the same socket.
pub fn socket_cookie(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size; a bad fd is an error, not UB.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &mut len) };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::programs::Program, ProbeError> {
    ebpf.program_mut(name).ok_or(ProbeError::Program {
        program: name,
        tracepoint: String::new(),
        source: aya::programs::ProgramError::NotLoaded,
    })
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones): never assume, read /proc/mounts.
pub fn cgroup2_root() -> Result<String, ProbeError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|_| ProbeError::NoCgroup2)?;
    cgroup2_in(&mounts).ok_or(ProbeError::NoCgroup2)
}

fn cgroup2_in(mounts: &str) -> Option<String> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| path.replace("\\040", " "))
    })
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
    T::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

/// A handle of our own on a map the object keeps (or hands to another part of the agent): a
/// duplicate of its fd, not a look-up by id, which the kernel allows only with CAP_SYS_ADMIN.
fn second_handle<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &Ebpf, name: &'static str) -> Result<T, ProbeError> {
    use std::os::fd::AsFd as _;
    let missing = || ProbeError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } };
    let fd = match ebpf.map(name).ok_or_else(missing)? {
        aya::maps::Map::HashMap(data) => data.fd().as_fd().try_clone_to_owned(),
        _ => return Err(missing()),
    };
    let fd = fd.map_err(|e| ProbeError::Map { name, source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error: e }) })?;
    let data = MapData::from_fd(fd).map_err(|source| ProbeError::Map { name, source })?;
    T::try_from(aya::maps::Map::HashMap(data)).map_err(|source| ProbeError::Map { name, source })
}

fn take_maps(ebpf: &mut Ebpf) -> Result<KernelMaps, ProbeError> {
    Ok(KernelMaps {
        events: take(ebpf, names::EVENTS)?,
        traced_pids: take(ebpf, names::TRACED_PIDS)?,
        conns: take(ebpf, names::CONNS)?,
        in_flight: take(ebpf, names::IN_FLIGHT)?,
        counters: take(ebpf, names::COUNTERS)?,
        inject_socks: None,
    })
}

/// Mount tracefs where aya looks for it, if nothing is there. Returns whether we mounted it.
fn mount_tracefs() -> Result<bool, ProbeError> {
    if Path::new(TRACEFS).join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(false);
    }
    let c = |s: &str| CString::new(s).expect("static strings have no NUL");
    let (src, target, fstype) = (c("tracefs"), c(TRACEFS), c("tracefs"));
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(ProbeError::Tracefs(std::io::Error::last_os_error()));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_in(hybrid).as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(cgroup2_in("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0").as_deref(), Some("/sys/fs/cgroup"));
        assert_eq!(cgroup2_in("proc /proc proc rw 0 0"), None);
    }
}
