//! Process lifecycle: forks of traced processes are traced, exits are cleaned up, execs are reported
//! so the agent can match new programs against its selectors.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};
use zerotel_abi::{kind, ProcessEvent};

use crate::{
    conns::header,
    maps::{count, is_traced, EVENTS, THREAD_CONTEXT, TRACED_PIDS, TRACE_ALL},
};

/// sched/sched_process_fork: `pid_t parent_pid` at 12, `pid_t child_pid` at 20. The child of a traced
/// process is traced from its first instruction. Threads get an entry too (the tracepoint cannot tell
/// them apart); sched_process_exit removes it when the thread ends.
#[tracepoint]
pub fn zt_sched_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: TRACED_PIDS lookups only compare against None.
    if unsafe { TRACED_PIDS.get(tgid) }.is_none() {
        return 0;
    }
    // SAFETY: offset from the tracepoint format.
    if let Ok(child) = unsafe { ctx.read_at::<i32>(20) } {
        let _ = TRACED_PIDS.insert(child as u32, 1, 0);
    }
    0
}

/// sched/sched_process_exec: reported for every process so the agent can apply `--exe` at once.
#[tracepoint]
pub fn zt_sched_exec(_ctx: TracePointContext) -> u32 {
    // SAFETY: read-only global.
    if unsafe { core::ptr::read_volatile(&TRACE_ALL) } != 0 {
        return 0;
    }
    emit(kind::PROCESS_EXEC);
    0
}

/// sched/sched_process_exit: `pid_t pid` at 24, `bool group_dead` at 32.
#[tracepoint]
pub fn zt_sched_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let _ = THREAD_CONTEXT.remove(pid_tgid);
    if tid != tgid {
        let _ = TRACED_PIDS.remove(tid);
        return 0;
    }
    // SAFETY: offset from the tracepoint format.
    let group_dead = unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0) != 0;
    if group_dead && is_traced(tgid) {
        let _ = TRACED_PIDS.remove(tgid);
        emit(kind::PROCESS_EXIT);
    }
    0
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
