//! Every map and global the programs share. All are bounded (see `zerotel_abi::limits`).

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::bpf_get_current_cgroup_id,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use zerotel_abi::{
    buffer, limits, ConnState, InFlight, KernelOffsets, PgMessageEvent, Sampler, SpanIds, ThreadContext,
};

/// Events for the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

/// Wake the agent when this much is queued; it also drains on a short timer.
const WAKEUP_BYTES: u64 = 64 * 1024;

/// Ring buffer flags for a record of `bytes` about to be queued: wake the agent when the record
/// takes what is queued past `WAKEUP_BYTES`, once per crossing. Waking it at every record while it
/// catches up costs an inter-processor interrupt each (a VM exit under virtualization), more than
/// the rest of the program.
#[inline(always)]
pub fn wakeup_flags(bytes: usize) -> u64 {
    let queued = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    // Each record also takes an 8-byte ring buffer header.
    if queued < WAKEUP_BYTES && queued + bytes as u64 + 8 >= WAKEUP_BYTES {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Processes (tgid) to trace, with the cgroup v2 id they run in (recorded by their first traced
/// syscall). The agent fills it, fork inherits it, exec in another cgroup drops it.
#[map]
pub static TRACED_PIDS: HashMap<u32, u64> = HashMap::with_max_entries(limits::TRACED_PIDS, 0);

/// LRU maps keep per-CPU LRU lists: no lock shared between CPUs on the hot path.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Tracked TCP connections by `conn_key(tgid, fd)`. LRU: a process killed mid-connection cannot leak.
#[map]
pub static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(limits::CONNS, BPF_F_NO_COMMON_LRU);

/// Arguments of data/connect syscalls in flight, by pid_tgid, from entry to exit (see `enter_call`).
#[map]
pub static IN_FLIGHT: LruHashMap<u64, InFlight> =
    LruHashMap::with_max_entries(limits::IN_FLIGHT_SYSCALLS, BPF_F_NO_COMMON_LRU);

/// The request each traced thread is serving (`context`; kept, not `serving`, between requests).
/// LRU: a thread killed mid-request cannot leak an entry; sched_process_exit also removes it.
#[map]
pub static THREAD_CONTEXT: LruHashMap<u64, ThreadContext> =
    LruHashMap::with_max_entries(limits::THREAD_CONTEXTS, BPF_F_NO_COMMON_LRU);

/// What a process serves: how many requests now, and the one that started when it served none.
/// While that one is all it serves, a request the process sends from another thread (client
/// libraries with their own I/O threads, thread pools, HTTP/2 servers) is that request's child.
#[repr(C)]
pub struct ProcessServing {
    /// Threads serving a THREAD_CONTEXT request plus open HTTP/2 server streams; updated atomically,
    /// never trusted beyond "is it 1".
    pub requests: u64,
    /// 1 while `context` has been the only request since it started.
    pub alone: u64,
    pub context: ThreadContext,
}

/// `ProcessServing` by tgid. LRU: a process killed mid-request cannot leak an entry.
#[map]
pub static PROCESS_SERVING: LruHashMap<u32, ProcessServing> =
    LruHashMap::with_max_entries(limits::SERVING_PROCESSES, BPF_F_NO_COMMON_LRU);

/// OpenSSL reads and writes in flight, by pid_tgid, from the uprobe to the uretprobe (`tls`).
#[map]
pub static TLS_CALLS: LruHashMap<u64, crate::tls::TlsCall> =
    LruHashMap::with_max_entries(limits::TLS_CALLS, BPF_F_NO_COMMON_LRU);

/// The socket (fd and connection) of each `SSL*` a traced process used (`tls`). LRU: freed `SSL`s are never
/// announced.
#[map]
pub static TLS_SOCKETS: LruHashMap<crate::tls::TlsSocketKey, crate::tls::TlsSocket> =
    LruHashMap::with_max_entries(limits::TLS_SOCKETS, BPF_F_NO_COMMON_LRU);

/// Each thread's last read of TLS ciphertext outside an OpenSSL call, until an OpenSSL call on its
/// socket (`tls`): the socket of a memory-BIO program's next call on an `SSL*` not yet tied to one.
#[map]
pub static TLS_LAST_READS: LruHashMap<u64, crate::tls::LastRead> =
    LruHashMap::with_max_entries(limits::TLS_CALLS, BPF_F_NO_COMMON_LRU);

/// Trace context a traced client's TLS connection sends in a TCP option, by `socket_key`
/// (`tcp_option`). LRU: closed connections are never announced to sock_ops.
#[map]
pub static TCP_OPTION_OUT: LruHashMap<u64, crate::tcp_option::TcpOption> =
    LruHashMap::with_max_entries(limits::TCP_OPTION_CONTEXTS, 0);

/// Trace context a connection's segments brought in a TCP option, by `socket_key`, until the
/// request they carried is read.
#[map]
pub static TCP_OPTION_IN: LruHashMap<u64, crate::tcp_option::TcpOption> =
    LruHashMap::with_max_entries(limits::TCP_OPTION_CONTEXTS, 0);

/// Key of `H2_SERVER_STREAMS`.
#[repr(C)]
pub struct H2StreamKey {
    pub conn_id: u64,
    pub stream_id: u64,
}

/// HTTP/2 streams traced servers are serving (`http2_server`), so each ends, and is uncounted,
/// once. LRU: a forgotten stream only keeps its process from counting as serving one.
#[map]
pub static H2_SERVER_STREAMS: LruHashMap<H2StreamKey, u8> =
    LruHashMap::with_max_entries(limits::H2_SERVER_STREAMS, BPF_F_NO_COMMON_LRU);

/// Per-CPU state of the HTTP/2 server frame walk (`http2_server`).
#[map]
pub static H2_FRAMES: PerCpuArray<crate::http2_server::Walk> = PerCpuArray::with_max_entries(1, 0);

/// Connections traced processes are opening, by socket cookie, until established (`propagation`).
#[map]
pub static CONNECTING: LruHashMap<u64, u8> = LruHashMap::with_max_entries(limits::CONNS, BPF_F_NO_COMMON_LRU);

/// Sockets whose requests get a `traceparent` (sk_msg runs on their sends). Closed sockets leave
/// a sockhash by themselves.
#[map]
pub static INJECT_SOCKS: SockHash<u64> = SockHash::with_max_entries(limits::CONNS, 0);

/// Ids sk_msg injected into the thread's current send, for that syscall's exit to report.
#[map]
pub static INJECTED: LruHashMap<u64, SpanIds> =
    LruHashMap::with_max_entries(limits::THREAD_CONTEXTS, BPF_F_NO_COMMON_LRU);

/// Drop counters (`zerotel_abi::counters`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(zerotel_abi::counters::COUNT, 0);

/// Per-CPU room to build a PostgreSQL message record (too big for the stack).
#[map]
pub static PG_SCRATCH: PerCpuArray<PgMessageEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU state of the PostgreSQL message walk (`postgres::walk`).
#[map]
pub static PG_WALK: PerCpuArray<crate::postgres::Walk> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room to build a stream chunk record (`stream`).
#[map]
pub static STREAM_SCRATCH: PerCpuArray<crate::stream::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU state of the stream copy loop (`stream::capture`).
#[map]
pub static STREAM_WALK: PerCpuArray<crate::stream::Walk> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU state of the HTTP/2 frame walk in sk_msg (`propagation_h2`).
#[map]
pub static H2_WALK: PerCpuArray<crate::propagation_h2::Walk> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU copy of an HTTP/2 header block being scanned (`propagation_h2`).
#[map]
pub static H2_BLOCK: PerCpuArray<crate::propagation_h2::BlockCopy> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU copy of a `101` answer's head (`upgrade`).
#[map]
pub static UPGRADE_HEAD: PerCpuArray<crate::upgrade::Head> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch word: where `propagation::scan_head` found the request line's end.
#[map]
pub static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU sequence for connection ids.
#[map]
pub static CONN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Set by the agent: trace every process but the agent (no selector given).
#[unsafe(no_mangle)]
pub static TRACE_ALL: u8 = 0;
#[unsafe(no_mangle)]
pub static AGENT_PID: u32 = 0;
/// Set by the agent from OTEL_TRACES_SAMPLER(_ARG).
#[unsafe(no_mangle)]
pub static SAMPLER: Sampler = Sampler::ALWAYS_ON;

#[inline(always)]
pub fn sampler() -> Sampler {
    // SAFETY: a read-only global the agent set before load.
    unsafe { core::ptr::read_volatile(&SAMPLER) }
}

/// Set by the agent: insert `traceparent` into outgoing requests.
#[unsafe(no_mangle)]
pub static PROPAGATE: u8 = 0;
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_inode: 0,
    file_private_data: 0,
    inode_mode: 0,
    socket_type: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: a read-only global the agent set before load; volatile so the compiler cannot fold it.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// No rules: every process but the agent is traced, and process events are not needed.
#[inline(always)]
pub fn trace_all() -> bool {
    // SAFETY: a read-only global set before load.
    unsafe { core::ptr::read_volatile(&TRACE_ALL) != 0 }
}

#[inline(always)]
fn agent_pid() -> u32 {
    // SAFETY: a read-only global set before load.
    unsafe { core::ptr::read_volatile(&AGENT_PID) }
}

/// True when the current process is traced (read-only: for programs outside syscall context).
#[inline(always)]
pub fn is_traced(tgid: u32) -> bool {
    if trace_all() {
        return tgid != agent_pid();
    }
    // SAFETY: the value is a plain u64 and only compared against None.
    unsafe { TRACED_PIDS.get(tgid).is_some() }
}

/// True when the current process is traced: the first check of every syscall program. Its first
/// traced syscall records the cgroup it runs in (see `zt_sched_exec`).
#[inline(always)]
pub fn is_traced_syscall(tgid: u32) -> bool {
    if trace_all() {
        return tgid != agent_pid();
    }
    let Some(cgroup) = TRACED_PIDS.get_ptr_mut(tgid) else {
        return false;
    };
    // SAFETY: an aligned u64 in the map's value; a racing writer stores the same id.
    unsafe {
        if *cgroup == limits::CGROUP_UNRECORDED {
            *cgroup = bpf_get_current_cgroup_id();
        }
    }
    true
}

/// Record the syscall the thread `pid_tgid` entered. Its entry is reused in place: an LRU insert
/// takes a fresh element (and a delete gives it back) at every call, which costs more than the
/// rest of the entry program. A thread that exits leaves its entry to the LRU.
#[inline(always)]
pub fn enter_call(pid_tgid: u64, call: InFlight) -> Result<(), i32> {
    match IN_FLIGHT.get_ptr_mut(&pid_tgid) {
        // SAFETY: a live map value of this thread, which is in this very syscall.
        Some(entry) => unsafe { entry.write(call) },
        None => IN_FLIGHT.insert(&pid_tgid, &call, 0).map_err(|e| e as i32)?,
    }
    Ok(())
}

/// The call the thread `pid_tgid` is in, recorded by its entry program (`None` when idle).
#[inline(always)]
pub fn call_in_flight(pid_tgid: u64) -> Option<InFlight> {
    // SAFETY: plain-old-data value, copied out.
    let call = unsafe { *IN_FLIGHT.get_ptr(&pid_tgid)? };
    (call.buffer != buffer::IDLE).then_some(call)
}

/// The call the thread `pid_tgid` is leaving, if its entry was recorded; the entry turns idle.
#[inline(always)]
pub fn exit_call(pid_tgid: u64) -> Option<InFlight> {
    let entry = IN_FLIGHT.get_ptr_mut(&pid_tgid)?;
    // SAFETY: a live map value of this thread, which is leaving this very syscall.
    unsafe {
        let call = *entry;
        if call.buffer == buffer::IDLE {
            return None;
        }
        (*entry).buffer = buffer::IDLE;
        Some(call)
    }
}
