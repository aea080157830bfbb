//! Process lifecycle: forks of traced processes are traced, exits are cleaned up, execs are reported
//! so the agent can match new programs against its selectors.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, generated::bpf_get_current_cgroup_id},
    macros::tracepoint,
    programs::TracePointContext,
};
use zerotel_abi::{kind, limits::CGROUP_UNRECORDED, ProcessEvent};

use crate::{
    conns::header,
    maps::{count, is_traced, trace_all, EVENTS, INJECTED, IN_FLIGHT, PROCESS_SERVING, TLS_CALLS, TLS_LAST_READS, TRACED_PIDS},
};

/// sched/sched_process_fork: `pid_t parent_pid` at 12, `pid_t child_pid` at 20. The child of a traced
/// process is traced from its first instruction, in the cgroup the parent runs in now (a fork does not
/// change cgroups). Threads get an entry too (the tracepoint cannot tell them apart);
/// sched_process_exit removes it when the thread ends.
#[tracepoint]
pub fn zt_sched_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a plain u64 copied out at once.
    let Some(mut cgroup) = (unsafe { TRACED_PIDS.get(tgid) }).copied() else {
        return 0;
    };
    if cgroup == CGROUP_UNRECORDED {
        // SAFETY: a helper without arguments; this runs in the parent.
        cgroup = unsafe { bpf_get_current_cgroup_id() };
    }
    // SAFETY: offset from the tracepoint format.
    if let Ok(child) = unsafe { ctx.read_at::<i32>(20) } {
        let _ = TRACED_PIDS.insert(child as u32, cgroup, 0);
    }
    0
}

/// sched/sched_process_exec: `pid_t pid` at 12, `pid_t old_pid` at 16. Reported for every process so
/// the agent can match the new program. A traced process that runs a program in another cgroup than
/// the one it was traced in (a container runtime starting a container: it moves into the
/// container's cgroup, then execs) stops being traced here, before the program's first
/// instruction: only the agent may select it again, so a pod its rules exclude never sends an event.
#[tracepoint]
pub fn zt_sched_exec(ctx: TracePointContext) -> u32 {
    if trace_all() {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A thread other than the leader exec'd: it took the leader's pid; its own entry is stale.
    // SAFETY: offset from the tracepoint format.
    if let Ok(old_pid) = unsafe { ctx.read_at::<i32>(16) } {
        if old_pid as u32 != tgid {
            let _ = TRACED_PIDS.remove(old_pid as u32);
        }
    }
    // SAFETY: a plain u64 copied out at once.
    if let Some(cgroup) = unsafe { TRACED_PIDS.get(tgid) }.copied() {
        // SAFETY: a helper without arguments.
        if cgroup != CGROUP_UNRECORDED && cgroup != unsafe { bpf_get_current_cgroup_id() } {
            let _ = TRACED_PIDS.remove(tgid);
        }
    }
    emit(kind::PROCESS_EXEC);
    0
}

/// sched/sched_process_exit: `pid_t pid` at 24, `bool group_dead` at 32. The last thread of a
/// process reports its exit: every process outside trace-all mode (so the agent also forgets
/// processes it waited on or excluded), only traced ones in it.
#[tracepoint]
pub fn zt_sched_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    crate::context::thread_ended(pid_tgid);
    forget_thread(pid_tgid);
    if tid != tgid {
        let _ = TRACED_PIDS.remove(tid);
    }
    // SAFETY: offset from the tracepoint format.
    let group_dead = unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0) != 0;
    if !group_dead {
        return 0;
    }
    let traced = is_traced(tgid);
    let _ = TRACED_PIDS.remove(tgid);
    // A later process with this pid starts serving nothing.
    let _ = PROCESS_SERVING.remove(&tgid);
    if traced || !trace_all() {
        emit(kind::PROCESS_EXIT);
    }
    0
}

/// Per-thread state outlives single calls (entries are updated in place), so a thread's exit
/// is what frees it; the LRU bound is only the backstop for exits this probe missed.
#[inline(always)]
fn forget_thread(pid_tgid: u64) {
    let _ = IN_FLIGHT.remove(&pid_tgid);
    let _ = INJECTED.remove(&pid_tgid);
    let _ = TLS_CALLS.remove(&pid_tgid);
    let _ = TLS_LAST_READS.remove(&pid_tgid);
}

fn emit(event_kind: u32) {
    match EVENTS.reserve::<ProcessEvent>(0) {
        Some(mut entry) => {
            entry.write(ProcessEvent {
                header: header(event_kind, bpf_get_current_pid_tgid()),
                comm: bpf_get_current_comm().unwrap_or_default(),
            });
            entry.submit(0);
        }
        None => count(zerotel_abi::counters::EVENTS_LOST),
    }
}
