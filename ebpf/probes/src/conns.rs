//! Connection tracking: accept/connect add a `CONNS` entry with the socket's addresses, close removes it.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};
use zerotel_abi::{
    buffer, conn_key, kind, protocol, role, InFlight, ConnCloseEvent, ConnOpenEvent, ConnState, Endpoint, EventHeader,
    KernelOffsets,
};

use crate::maps::{count, enter_call, exit_call, is_traced_syscall, offsets, wakeup_flags, CONNS, CONN_SEQ, EVENTS};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: i16 = 1;
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const EINPROGRESS: i64 = -115;
/// Offset of `long ret` in every syscalls/sys_exit_* tracepoint.
pub const EXIT_RET: usize = 16;
/// Offset of the first argument in every syscalls/sys_enter_* tracepoint; each argument takes 8 bytes.
pub const ENTER_ARG0: usize = 16;

#[inline(always)]
fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// The `struct sock *` behind the current task's `fd`, when it is a TCP stream socket.
/// Walks task->files->fdt->fd[fd]->private_data->sk with offsets from the running kernel's BTF.
#[inline(always)]
fn tcp_sock_of_fd(off: &KernelOffsets, fd: u32) -> Option<u64> {
    if off.task_files == 0 {
        return None;
    }
    // SAFETY: returns the current task pointer; only dereferenced through probe reads.
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task() };
    let files: u64 = read_kernel(task, off.task_files)?;
    let fdt: u64 = read_kernel(files, off.files_fdt)?;
    let max_fds: u32 = read_kernel(fdt, off.fdt_max_fds)?;
    if fd >= max_fds {
        return None;
    }
    let fd_array: u64 = read_kernel(fdt, off.fdt_fd)?;
    let file: u64 = read_kernel(fd_array, fd * 8)?;
    let inode: u64 = read_kernel(file, off.file_inode)?;
    let mode: u16 = read_kernel(inode, off.inode_mode)?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket: u64 = read_kernel(file, off.file_private_data)?;
    let sock_type: i16 = read_kernel(socket, off.socket_type)?;
    if sock_type != SOCK_STREAM {
        return None;
    }
    read_kernel(socket, off.socket_sk)
}

/// Local and remote endpoints of a socket (IPv4 or IPv6; others are not tracked).
#[inline(always)]
fn endpoints(off: &KernelOffsets, sk: u64) -> Option<(Endpoint, Endpoint)> {
    let family: u16 = read_kernel(sk, off.sk_family)?;
    let mut local = Endpoint { family, port: read_kernel(sk, off.sk_num)?, ..Default::default() };
    let dport: u16 = read_kernel(sk, off.sk_dport)?;
    let mut remote = Endpoint { family, port: u16::from_be(dport), ..Default::default() };
    match family {
        AF_INET => {
            let l: [u8; 4] = read_kernel(sk, off.sk_rcv_saddr)?;
            let r: [u8; 4] = read_kernel(sk, off.sk_daddr)?;
            local.addr[..4].copy_from_slice(&l);
            remote.addr[..4].copy_from_slice(&r);
        }
        AF_INET6 => {
            local.addr = read_kernel(sk, off.sk_v6_rcv_saddr)?;
            remote.addr = read_kernel(sk, off.sk_v6_daddr)?;
        }
        _ => return None,
    }
    Some((local, remote))
}

#[inline(always)]
fn next_conn_id() -> u64 {
    // SAFETY: helper without arguments.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() } as u64;
    let seq = match CONN_SEQ.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    };
    // The agent's own ids (seeded connections) have the top bit set; ours never do.
    ((cpu & 0x7f) << 48) | (seq & 0xffff_ffff_ffff)
}

/// Start tracking `fd` of the current process in `role`, and tell the agent.
#[inline(always)]
fn track(fd: u32, conn_role: u8) -> Result<(), i32> {
    let off = offsets();
    let sk = tcp_sock_of_fd(&off, fd).ok_or(0i32)?;
    let (local, remote) = endpoints(&off, sk).ok_or(0i32)?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let socket_key = zerotel_abi::socket_key(local.family, local.port, remote.port, &remote.addr);
    let state =
        ConnState { conn_id: next_conn_id(), role: conn_role, protocol: protocol::UNKNOWN, socket_key, ..Default::default() };
    CONNS.insert(conn_key(tgid, fd), state, 0)?;
    let flags = wakeup_flags(core::mem::size_of::<ConnOpenEvent>());
    let Some(mut entry) = EVENTS.reserve::<ConnOpenEvent>(0) else {
        count(zerotel_abi::counters::EVENTS_LOST);
        return Ok(());
    };
    entry.write(ConnOpenEvent {
        header: header(kind::CONN_OPEN, pid_tgid),
        conn_id: state.conn_id,
        fd,
        role: conn_role,
        _pad: [0; 3],
        local,
        remote,
    });
    entry.submit(flags);
    count(zerotel_abi::counters::TRAFFIC_EVENTS);
    Ok(())
}

#[inline(always)]
pub fn header(kind: u32, pid_tgid: u64) -> EventHeader {
    EventHeader {
        kind,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        _pad: 0,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// syscalls/sys_exit_accept and sys_exit_accept4: `long ret` = the new fd.
#[tracepoint]
pub fn zt_exit_accept(ctx: TracePointContext) -> u32 {
    match try_exit_accept(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exit_accept(ctx: &TracePointContext) -> Result<(), i32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_traced_syscall(tgid) {
        return Ok(());
    }
    // SAFETY: offset from the tracepoint format.
    let fd: i64 = unsafe { ctx.read_at(EXIT_RET) }?;
    if fd < 0 {
        return Ok(());
    }
    track(fd as u32, role::SERVER)
}

/// syscalls/sys_enter_connect: `int fd, struct sockaddr *uservaddr, int addrlen`.
#[tracepoint]
pub fn zt_enter_connect(ctx: TracePointContext) -> u32 {
    match try_enter_connect(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_enter_connect(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced_syscall((pid_tgid >> 32) as u32) {
        return Ok(());
    }
    // SAFETY: offset from the tracepoint format.
    let fd: u64 = unsafe { ctx.read_at(ENTER_ARG0) }?;
    enter_call(pid_tgid, InFlight { buf: 0, start_ns: 0, fd: fd as u32, direction: 0, buffer: buffer::CONNECT, _pad: [0; 2] })
}

/// syscalls/sys_exit_connect: 0, or -EINPROGRESS for a non-blocking socket (ports are bound by then).
#[tracepoint]
pub fn zt_exit_connect(ctx: TracePointContext) -> u32 {
    match try_exit_connect(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exit_connect(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = exit_call(pid_tgid).ok_or(0i32)?;
    if call.buffer != buffer::CONNECT {
        return Ok(());
    }
    // SAFETY: offset from the tracepoint format.
    let ret: i64 = unsafe { ctx.read_at(EXIT_RET) }?;
    if ret != 0 && ret != EINPROGRESS {
        return Ok(());
    }
    track(call.fd, role::CLIENT)
}

/// syscalls/sys_enter_close: `unsigned int fd`.
#[tracepoint]
pub fn zt_enter_close(ctx: TracePointContext) -> u32 {
    match try_enter_close(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_enter_close(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_traced_syscall(tgid) {
        return Ok(());
    }
    // SAFETY: offset from the tracepoint format.
    let fd: u64 = unsafe { ctx.read_at(ENTER_ARG0) }?;
    let key = conn_key(tgid, fd as u32);
    // SAFETY: copied out before removal.
    let state = unsafe { CONNS.get(key) }.copied().ok_or(0i32)?;
    CONNS.remove(key)?;
    // Its HTTP/2 streams end with it.
    crate::context::requests_done(tgid, state.h2_server.open);
    let flags = wakeup_flags(core::mem::size_of::<ConnCloseEvent>());
    let Some(mut entry) = EVENTS.reserve::<ConnCloseEvent>(0) else {
        count(zerotel_abi::counters::EVENTS_LOST);
        return Ok(());
    };
    entry.write(ConnCloseEvent { header: header(kind::CONN_CLOSE, pid_tgid), conn_id: state.conn_id, fd: fd as u32, _pad: 0 });
    entry.submit(flags);
    count(zerotel_abi::counters::TRAFFIC_EVENTS);
    Ok(())
}
