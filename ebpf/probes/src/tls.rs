//! TLS through OpenSSL: uprobes on `SSL_read`, `SSL_write`, `SSL_read_ex` and `SSL_write_ex` see
//! the plaintext a traced process reads and writes; it then takes the path a plaintext syscall's
//! bytes take (`syscalls::on_bytes`), so every protocol parses it alike.
//!
//! Which socket: the read or write syscall the thread makes inside the call names it
//! (`note_socket`), remembered per `SSL*` for calls OpenSSL answers from its own buffer without a
//! syscall. Programs that give OpenSSL memory BIOs (node, Python asyncio) move the ciphertext
//! themselves, outside the call, on the same thread, and call OpenSSL right after reading it: an
//! `SSL*` not tied to a socket yet takes the one the thread last read ciphertext from
//! (`socket_of`). The ciphertext is never parsed: a connection whose first
//! bytes are a TLS record, or that an OpenSSL call used, is marked `tls`, and its syscalls are
//! left alone from then on.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use zerotel_abi::{buffer, conn_key, counters, direction, kind, protocol, role, ConnState, ConnTlsEvent, InFlight, SpanIds};

use crate::{
    classify::is_http_request_start,
    conns::header,
    context,
    maps::{count, is_traced, CONNS, EVENTS, INJECTED, TLS_CALLS, TLS_LAST_READS, TLS_SOCKETS},
    propagation, syscalls, tcp_option,
};

/// [`TlsCall::fd`] before a syscall inside the call named the socket.
const NO_FD: u32 = u32::MAX;
/// How long a memory-BIO program's ciphertext read can name the socket of its next OpenSSL call:
/// the call follows within microseconds; an older read is from a flow this cannot follow (a
/// reader paused with ciphertext unread).
const PAIRING_WINDOW_NS: u64 = 20_000_000;

/// An OpenSSL read or write in flight on a thread (`TLS_CALLS`, by pid_tgid).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    ssl: u64,
    buf: u64,
    /// `SSL_*_ex`: where OpenSSL writes the byte count; 0 when the return value is the count.
    moved: u64,
    start_ns: u64,
    fd: u32,
    /// [`direction`].
    direction: u8,
    /// Set once the call's first syscall decided whether it sends a request (`note_socket`).
    decided: u8,
    _pad: [u8; 2],
}

/// `TLS_SOCKETS` key: an `SSL*` of a process.
#[repr(C)]
pub struct TlsSocketKey {
    tgid: u64,
    ssl: u64,
}

/// `TLS_SOCKETS` value: the socket, and the connection it was (an fd is reused after a close).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsSocket {
    conn_id: u64,
    fd: u32,
    _pad: u32,
}

/// `TLS_LAST_READS` value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LastRead {
    socket: TlsSocket,
    at_ns: u64,
}

#[inline(always)]
fn enter(ctx: &ProbeContext, dir: u8, ex: bool) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return None;
    }
    let moved = if ex { ctx.arg::<u64>(3)? } else { 0 };
    // SAFETY: helper without arguments.
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let call = TlsCall {
        ssl: ctx.arg(0)?,
        buf: ctx.arg(1)?,
        moved,
        start_ns,
        fd: NO_FD,
        direction: dir,
        decided: 0,
        _pad: [0; 2],
    };
    TLS_CALLS.insert(&pid_tgid, &call, 0).ok()
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)`.
#[uprobe]
pub fn zt_ssl_write(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, direction::EGRESS, false);
    0
}

/// `int SSL_read(SSL *ssl, void *buf, int num)`.
#[uprobe]
pub fn zt_ssl_read(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, direction::INGRESS, false);
    0
}

/// `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`.
#[uprobe]
pub fn zt_ssl_write_ex(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, direction::EGRESS, true);
    0
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)`.
#[uprobe]
pub fn zt_ssl_read_ex(ctx: ProbeContext) -> u32 {
    let _ = enter(&ctx, direction::INGRESS, true);
    0
}

/// The return of any of the four: `int`, the byte count (plain) or 1 on success (`_ex`).
#[uretprobe]
pub fn zt_ssl_return(ctx: RetProbeContext) -> u32 {
    let _ = try_ssl_return(&ctx);
    0
}

fn try_ssl_return(ctx: &RetProbeContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: plain-old-data value, copied out before removal.
    let call = unsafe { TLS_CALLS.get(&pid_tgid) }.copied()?;
    let _ = TLS_CALLS.remove(&pid_tgid);
    // The socket a syscall inside the call used, else the one learnt before. Learnt whatever the
    // call returns: a memory-BIO client's handshake ends in a call that returns no data.
    let fd = match call.fd {
        NO_FD => socket_of(pid_tgid, call.ssl, call.start_ns)?.fd,
        fd => fd,
    };
    let len = moved(ctx, &call)?;
    let key = conn_key((pid_tgid >> 32) as u32, fd);
    // SAFETY: a live map value (see `syscalls::try_exit_data`).
    let conn = unsafe { &mut *CONNS.get_ptr_mut(&key)? };
    if conn.tls == 0 {
        mark(conn, pid_tgid); // a connection OpenSSL reads or writes carries TLS
    }
    if call.fd == NO_FD && call.direction == direction::EGRESS && conn.role == role::CLIENT {
        propagate(pid_tgid, call.buf, conn); // memory BIOs: the ciphertext leaves after the call
    }
    let flight = InFlight { buf: call.buf, start_ns: call.start_ns, fd, direction: call.direction, buffer: buffer::PLAIN, _pad: [0; 2] };
    syscalls::on_bytes(pid_tgid, &flight, key, conn, len);
    Some(())
}

/// The plaintext bytes a call moved, if any: the `int` it returns, or for `_ex` (which returns 1
/// on success) the count it stored.
#[inline(always)]
fn moved(ctx: &RetProbeContext, call: &TlsCall) -> Option<u64> {
    // An `int`: the register's upper half is not part of it.
    let ret = ctx.ret::<u64>() as u32 as i32;
    let len = if call.moved != 0 {
        if ret != 1 {
            return None;
        }
        // SAFETY: probe read faults safely.
        unsafe { bpf_probe_read_user(call.moved as *const u64) }.ok()?
    } else {
        u64::try_from(ret).ok()?
    };
    (len != 0).then_some(len)
}

/// The open socket of `ssl`, for a call that made no syscall: the one it used last; else (memory
/// BIOs) the one the thread just read ciphertext from, unless a call on that socket came first.
#[inline(always)]
fn socket_of(pid_tgid: u64, ssl: u64, start_ns: u64) -> Option<TlsSocket> {
    let key = TlsSocketKey { tgid: pid_tgid >> 32, ssl };
    // SAFETY: plain values, copied.
    let last = unsafe { TLS_LAST_READS.get(&pid_tgid) }.copied();
    // SAFETY: as above.
    let bound = unsafe { TLS_SOCKETS.get(&key) }.copied().filter(|socket| is_open(pid_tgid, socket));
    let socket = match (bound, last) {
        (Some(bound), Some(last)) if bound.conn_id != last.socket.conn_id => return Some(bound),
        (Some(bound), _) => bound,
        (None, Some(last)) if start_ns.saturating_sub(last.at_ns) <= PAIRING_WINDOW_NS && is_open(pid_tgid, &last.socket) => {
            let _ = TLS_SOCKETS.insert(&key, &last.socket, 0);
            last.socket
        }
        (None, _) => return None,
    };
    if last.is_some() {
        let _ = TLS_LAST_READS.remove(&pid_tgid); // that read was this call's: it names no other `SSL*`
    }
    Some(socket)
}

/// Whether the connection `socket` names is still the one open on its fd.
#[inline(always)]
fn is_open(pid_tgid: u64, socket: &TlsSocket) -> bool {
    // SAFETY: plain-old-data value.
    unsafe { CONNS.get(&conn_key((pid_tgid >> 32) as u32, socket.fd)) }.is_some_and(|conn| conn.conn_id == socket.conn_id)
}

/// A syscall (`dir`) on socket `fd` (connection `conn`): when an OpenSSL call is in flight on the
/// thread, that is its socket; else a read of ciphertext may name the socket of the next call.
#[inline(always)]
pub fn note_socket(pid_tgid: u64, fd: u32, conn: &ConnState, dir: u8) {
    let Some(call) = TLS_CALLS.get_ptr_mut(&pid_tgid) else {
        if conn.tls != 0 && dir == direction::INGRESS {
            // Memory BIOs: the thread reads ciphertext itself, then calls OpenSSL (`socket_of`).
            // SAFETY: helper without arguments.
            let at_ns = unsafe { bpf_ktime_get_ns() };
            let last = LastRead { socket: TlsSocket { conn_id: conn.conn_id, fd, _pad: 0 }, at_ns };
            let _ = TLS_LAST_READS.insert(&pid_tgid, &last, 0);
        }
        return;
    };
    // SAFETY: a live map value of this thread's.
    let call = unsafe { &mut *call };
    call.fd = fd;
    let key = TlsSocketKey { tgid: pid_tgid >> 32, ssl: call.ssl };
    // SAFETY: plain values, copied. An update costs more than this look-up, and is rarely needed.
    let known = unsafe { TLS_SOCKETS.get(&key) }.is_some_and(|socket| socket.conn_id == conn.conn_id && socket.fd == fd);
    if !known {
        let _ = TLS_SOCKETS.insert(&key, &TlsSocket { conn_id: conn.conn_id, fd, _pad: 0 }, 0);
    }
    if call.decided == 0 && call.direction == direction::EGRESS && conn.role == role::CLIENT {
        call.decided = 1;
        propagate(pid_tgid, call.buf, conn);
    }
}

/// A traced client's TLS write is about to leave: when it starts an HTTP/1 request, decide the
/// request's ids now, before TCP builds the segments, so they carry its context (`tcp_option`).
/// The plaintext's event then reports the same ids (`context::sent_request`).
#[inline(always)]
fn propagate(pid_tgid: u64, buf: u64, conn: &ConnState) {
    if !propagation::enabled() || !matches!(conn.protocol, protocol::UNKNOWN | protocol::HTTP1) {
        return;
    }
    // SAFETY: probe read faults safely.
    let Ok(prefix) = (unsafe { bpf_probe_read_user(buf as *const [u8; 8]) }) else { return };
    if !is_http_request_start(&prefix) {
        return;
    }
    let mut ids = SpanIds::default();
    context::client_request(pid_tgid, &mut ids);
    if INJECTED.insert(&pid_tgid, &ids, 0).is_ok() {
        tcp_option::send(conn.socket_key, &ids);
    }
}

/// The connection carries TLS: its syscalls move ciphertext from now on, and its plaintext
/// starts its own stream (protocol, offsets).
#[inline(always)]
pub fn mark(conn: &mut ConnState, pid_tgid: u64) {
    conn.tls = 1;
    conn.protocol = protocol::UNKNOWN;
    conn.seq = [0, 0];
    conn.capture_next = [0, 0];
    conn.request_outstanding = 0;
    conn.pg_startup = 0;
    conn.pg = Default::default();
    let event = ConnTlsEvent { header: header(kind::CONN_TLS, pid_tgid), conn_id: conn.conn_id };
    match EVENTS.output::<ConnTlsEvent>(&event, 0) {
        Ok(()) => count(counters::TRAFFIC_EVENTS),
        Err(_) => count(counters::EVENTS_LOST),
    }
}
