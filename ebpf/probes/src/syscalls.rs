//! Data syscalls on tracked connections. Entry records the arguments, exit (which knows the byte
//! count) emits the event. Non-HTTP connections are classified once and then cost one map lookup.

use core::mem::size_of;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use zerotel_abi::{
    buffer, conn_key, counters, direction, kind, protocol, role, ConnState, SEEDED_CONN_ID_BIT, DataEvent, DataMeta, InFlight, SpanIds,
    MAX_CAPTURE,
};

use crate::{
    classify::{
        is_http2_preface, is_http2_server_preface, is_http_request_start, is_http_response_start, is_http_start,
        is_tls_record,
    },
    context,
    conns::{header, ENTER_ARG0, EXIT_RET},
    kafka, postgres, stream, tls, upgrade,
    maps::{count, enter_call, exit_call, is_traced_syscall, wakeup_flags, CONNS, EVENTS},
};

const ARG1: usize = ENTER_ARG0 + 8;
/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: u32 = 24;
const ARG2: usize = ENTER_ARG0 + 16;

/// Remember the call if `fd` is a tracked connection that may carry HTTP.
#[inline(always)]
fn enter(fd: u32, buf: u64, dir: u8, buffer: u8) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_traced_syscall(tgid) {
        return Ok(());
    }
    // SAFETY: plain-old-data value.
    let conn = unsafe { CONNS.get(conn_key(tgid, fd)) }.ok_or(0i32)?;
    if conn.tls != 0 || conn.protocol == protocol::UNKNOWN {
        tls::note_socket(pid_tgid, fd, conn, dir); // an OpenSSL call in flight names its socket
    }
    if conn.protocol == protocol::OTHER || conn.tls != 0 {
        return Ok(());
    }
    // SAFETY: helper without arguments.
    let start_ns = unsafe { bpf_ktime_get_ns() };
    enter_call(pid_tgid, InFlight { buf, start_ns, fd, direction: dir, buffer, _pad: [0; 2] })
}

#[inline(always)]
fn arg(ctx: &TracePointContext, offset: usize) -> Result<u64, i32> {
    // SAFETY: offsets from the syscalls/sys_enter_* formats: 8-byte arguments from offset 16.
    unsafe { ctx.read_at::<u64>(offset) }
}

macro_rules! enter_program {
    ($(#[$doc:meta])* $name:ident, $dir:expr, $buffer:expr) => {
        $(#[$doc])*
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let run = || -> Result<(), i32> { enter(arg(&ctx, ENTER_ARG0)? as u32, arg(&ctx, ARG1)?, $dir, $buffer) };
            match run() {
                Ok(()) | Err(_) => 0,
            }
        }
    };
}

enter_program!(
    /// sys_enter_read `(unsigned int fd, char *buf, size_t count)`, sys_enter_recvfrom `(int fd, void *ubuf, size_t size, ...)`.
    zt_enter_recv, direction::INGRESS, buffer::PLAIN);
enter_program!(
    /// sys_enter_write `(unsigned int fd, const char *buf, size_t count)`, sys_enter_sendto `(int fd, void *buff, size_t len, ...)`.
    zt_enter_send, direction::EGRESS, buffer::PLAIN);
enter_program!(
    /// sys_enter_readv `(unsigned long fd, const struct iovec *vec, unsigned long vlen)`.
    zt_enter_readv, direction::INGRESS, buffer::IOVEC);
enter_program!(
    /// sys_enter_writev `(unsigned long fd, const struct iovec *vec, unsigned long vlen)`.
    zt_enter_writev, direction::EGRESS, buffer::IOVEC);
enter_program!(
    /// sys_enter_recvmsg `(int fd, struct user_msghdr *msg, unsigned int flags)`.
    zt_enter_recvmsg, direction::INGRESS, buffer::MSGHDR);
enter_program!(
    /// sys_enter_sendmsg `(int fd, struct user_msghdr *msg, unsigned int flags)`.
    zt_enter_sendmsg, direction::EGRESS, buffer::MSGHDR);

/// sys_enter_sendfile64 `(int out_fd, int in_fd, loff_t *offset, size_t count)`: body bytes, counted only.
#[tracepoint]
pub fn zt_enter_sendfile(ctx: TracePointContext) -> u32 {
    let run = || -> Result<(), i32> { enter(arg(&ctx, ENTER_ARG0)? as u32, 0, direction::EGRESS, buffer::NONE) };
    match run() {
        Ok(()) | Err(_) => 0,
    }
}

/// sys_enter_splice `(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len, unsigned int flags)`:
/// counted on whichever end is a tracked connection.
#[tracepoint]
pub fn zt_enter_splice(ctx: TracePointContext) -> u32 {
    let run = || -> Result<(), i32> {
        let fd_out = arg(&ctx, ARG2)? as u32;
        match enter(fd_out, 0, direction::EGRESS, buffer::NONE) {
            Ok(()) => Ok(()),
            Err(_) => enter(arg(&ctx, ENTER_ARG0)? as u32, 0, direction::INGRESS, buffer::NONE),
        }
    };
    match run() {
        Ok(()) | Err(_) => 0,
    }
}

/// sys_exit_{read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg,sendfile64,splice}: `long ret`.
#[tracepoint]
pub fn zt_exit_data(ctx: TracePointContext) -> u32 {
    match try_exit_data(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exit_data(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = exit_call(pid_tgid).ok_or(0i32)?;
    // SAFETY: offset from the sys_exit_* format.
    let ret: i64 = unsafe { ctx.read_at(EXIT_RET) }?;
    if ret <= 0 || call.buffer == buffer::CONNECT {
        return Ok(());
    }
    let key = conn_key((pid_tgid >> 32) as u32, call.fd);
    let conn = CONNS.get_ptr_mut(key).ok_or(0i32)?;
    // SAFETY: a live map value; concurrent use of one fd by two threads at once only skews counters.
    let conn = unsafe { &mut *conn };
    if conn.tls != 0 {
        return Ok(()); // ciphertext: the plaintext comes from the OpenSSL uprobes
    }
    on_bytes(pid_tgid, &call, key, conn, ret as u64);
    Ok(())
}

/// The `len` bytes a call moved on a tracked connection: a syscall's, or the plaintext of an
/// OpenSSL call on a TLS connection (`tls`). Classifies the connection, then reports what its
/// protocol needs.
#[inline(always)]
pub fn on_bytes(pid_tgid: u64, call: &InFlight, key: u64, conn: &mut ConnState, len: u64) {
    let (data, avail) = user_bytes(call, len);
    let prefix = read_prefix(data, avail);
    // Classify once, from enough bytes: a shorter first read ("GE") is not yet evidence either
    // way, but OpenSSL reads a record's 5-byte header alone.
    let tls_record = conn.tls == 0 && avail >= 5 && is_tls_record(&prefix);
    if conn.protocol == protocol::UNKNOWN && (avail >= 8 || is_http_start(&prefix) || tls_record) {
        if tls_record {
            tls::mark(conn, pid_tgid);
            return;
        }
        conn.protocol = classify(conn, &prefix, call.direction);
    }
    let dir = (call.direction & 1) as usize;
    let seq = conn.seq[dir];
    conn.seq[dir] = seq + len;
    if conn.protocol == protocol::POSTGRES {
        if avail < len {
            // Bytes beyond the first iovec: the message walk would lose its place.
            conn.protocol = protocol::OTHER;
            return;
        }
        postgres::walk(conn, call.direction, data, len, header(kind::PG_MESSAGE, pid_tgid), call.start_ns);
        return;
    }
    if conn.protocol == protocol::KAFKA || conn.protocol == protocol::HTTP2 {
        stream::capture(call, key, conn, len, seq, header(kind::STREAM_CHUNK, pid_tgid));
        return;
    }
    if conn.protocol != protocol::HTTP1 {
        return;
    }
    let answer = if conn.role == role::SERVER { direction::EGRESS } else { direction::INGRESS };
    if call.direction == answer && is_http_response_start(&prefix) && upgrade::is_h2c_switch(data, avail) {
        // HTTP/2 from this answer's bytes on. Its frames start mid-stream, after the answer's
        // head: the kernel does not follow them (`http2_server`), the agent does.
        conn.protocol = protocol::HTTP2;
        conn.h2_server.lost = 1;
        conn.request_outstanding = 0;
        if conn.role == role::SERVER {
            context::server_responded(pid_tgid);
        }
        stream::capture(call, key, conn, len, seq, header(kind::STREAM_CHUNK, pid_tgid));
        return;
    }
    let capture = avail > 0 && (is_http_start(&prefix) || conn.capture_next[dir] != 0);
    conn.capture_next[dir] = (capture && len <= MAX_CAPTURE as u64) as u8;
    let meta = DataMeta {
        header: header(kind::DATA_META, pid_tgid),
        conn_id: conn.conn_id,
        start_ns: call.start_ns,
        len,
        seq,
        fd: call.fd,
        direction: call.direction,
        protocol: conn.protocol,
        captured: 0,
    };
    let moment = span_moment(conn.role, call.direction, &prefix);
    if conn.role == role::CLIENT {
        if moment == Moment::ClientRequest {
            conn.request_outstanding = 1;
        } else if call.direction == direction::INGRESS && is_final_response_start(&prefix, data, avail) {
            // Only a final response ends the exchange: after "100 Continue" the body still follows.
            conn.request_outstanding = 0;
        }
    }
    if moment == Moment::ServerResponse {
        context::server_responded(pid_tgid);
    }
    // Over TLS, trace context may come in a TCP option instead of a header.
    let option_key = if conn.tls != 0 { conn.socket_key } else { 0 };
    if capture { emit_with_payload(meta, data, avail, moment, option_key) } else { emit_meta(meta) }
}

/// A connection's protocol, from its first bytes.
#[inline(always)]
fn classify(conn: &mut ConnState, prefix: &[u8; 8], dir: u8) -> u8 {
    if is_http_start(prefix) {
        protocol::HTTP1
    } else if conn.conn_id & SEEDED_CONN_ID_BIT == 0
        && (is_http2_preface(prefix)
            || (conn.role == role::SERVER && dir == direction::EGRESS && is_http2_server_preface(prefix)))
    {
        // Only from the prefaces on: HPACK state cannot be picked up mid-connection. A server's
        // first frame follows the client's preface (`http2_server` walks frames).
        conn.h2_server.frames[direction::INGRESS as usize].skip = PREFACE_LEN;
        protocol::HTTP2
    } else if conn.role != role::CLIENT {
        // A traced PostgreSQL server: its clients' spans are what users want; nothing to report.
        protocol::OTHER
    } else if postgres::is_startup(prefix) {
        conn.pg_startup = postgres::STARTUP_UNTYPED;
        protocol::POSTGRES
    } else if conn.conn_id & SEEDED_CONN_ID_BIT != 0 && dir == direction::EGRESS && postgres::is_frontend_message(prefix) {
        protocol::POSTGRES
    } else if dir == direction::EGRESS && kafka::is_request_start(prefix) {
        // Checked after PostgreSQL: a StartupMessage reads as a Kafka Metadata v0 header.
        protocol::KAFKA
    } else {
        protocol::OTHER
    }
}

/// What a segment means for trace context.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Moment {
    Nothing,
    /// A traced server read a request: decide its SERVER span ids.
    ServerRequest,
    /// A traced process sent a request: decide its CLIENT span ids.
    ClientRequest,
    /// A traced server started its response: the thread is done serving.
    ServerResponse,
}

#[inline(always)]
fn span_moment(conn_role: u8, dir: u8, prefix: &[u8; 8]) -> Moment {
    match (conn_role, dir) {
        (role::SERVER, direction::INGRESS) if is_http_request_start(prefix) => Moment::ServerRequest,
        (role::CLIENT, direction::EGRESS) if is_http_request_start(prefix) => Moment::ClientRequest,
        (role::SERVER, direction::EGRESS) if is_http_response_start(prefix) => Moment::ServerResponse,
        _ => Moment::Nothing,
    }
}

/// Where the call's first bytes are in user memory, and how many of them (at most `len`).
#[inline(always)]
fn user_bytes(call: &InFlight, len: u64) -> (u64, u64) {
    let (ptr, size) = match call.buffer {
        buffer::PLAIN => (call.buf, len),
        buffer::IOVEC => first_iovec(call.buf),
        // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
        buffer::MSGHDR => {
            // SAFETY: probe reads fault safely.
            let iov: u64 = unsafe { bpf_probe_read_user((call.buf + 16) as *const u64) }.unwrap_or(0);
            let iovlen: u64 = unsafe { bpf_probe_read_user((call.buf + 24) as *const u64) }.unwrap_or(0);
            if iov == 0 || iovlen == 0 { (0, 0) } else { first_iovec(iov) }
        }
        _ => (0, 0),
    };
    if ptr == 0 { (0, 0) } else { (ptr, size.min(len)) }
}

/// struct iovec { void *iov_base; size_t iov_len; }: the first one holds the head in practice
/// (nginx and node put the header block first).
#[inline(always)]
fn first_iovec(vec: u64) -> (u64, u64) {
    // SAFETY: probe read faults safely.
    match unsafe { bpf_probe_read_user(vec as *const [u64; 2]) } {
        Ok([base, len]) => (base, len),
        Err(_) => (0, 0),
    }
}

#[inline(always)]
fn read_prefix(data: u64, avail: u64) -> [u8; 8] {
    let mut prefix = [0u8; 8];
    if data == 0 || avail == 0 {
        return prefix;
    }
    // A head may arrive a few bytes at a time ("GET " alone): read what there is, up to 8.
    let size = if avail < 8 { avail as u32 } else { 8 };
    // SAFETY: size <= 8 = the buffer's length; the read faults safely.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(prefix.as_mut_ptr().cast(), size, data as *const _)
    };
    if rc != 0 { [0; 8] } else { prefix }
}

/// `HTTP/1.x NNN` with a status that is not 1xx (the status's first digit is byte 9).
#[inline(always)]
fn is_final_response_start(prefix: &[u8; 8], data: u64, avail: u64) -> bool {
    if !is_http_response_start(prefix) || avail < 10 {
        return false;
    }
    // SAFETY: probe read faults safely.
    let digit: u8 = unsafe { bpf_probe_read_user((data + 9) as *const u8) }.unwrap_or(b'1');
    digit != b'1'
}

#[inline(always)]
fn meta_pid_tgid(meta: &DataMeta) -> u64 {
    (u64::from(meta.header.pid) << 32) | u64::from(meta.header.tid)
}

#[inline(always)]
fn emit_meta(meta: DataMeta) {
    let flags = wakeup_flags(size_of::<DataMeta>());
    match EVENTS.reserve::<DataMeta>(0) {
        Some(mut entry) => {
            entry.write(meta);
            entry.submit(flags);
            count(counters::TRAFFIC_EVENTS);
        }
        None => count(counters::EVENTS_LOST),
    }
}

#[inline(always)]
fn emit_with_payload(mut meta: DataMeta, data: u64, avail: u64, moment: Moment, option_key: u64) {
    let flags = wakeup_flags(size_of::<DataEvent>());
    let Some(mut entry) = EVENTS.reserve::<DataEvent>(0) else {
        count(counters::EVENTS_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    let size = if avail > MAX_CAPTURE as u64 { MAX_CAPTURE as u32 } else { avail as u32 };
    // SAFETY: `event` is our reservation; size <= MAX_CAPTURE = payload's length.
    let read = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            core::ptr::addr_of_mut!((*event).payload).cast(),
            size,
            data as *const core::ffi::c_void,
        )
    };
    meta.header.kind = kind::DATA;
    // SAFETY: `event` is our reservation; ids are filled in place (the stack is too small to copy).
    let ids = unsafe {
        core::ptr::addr_of_mut!((*event).ids).write(SpanIds::default());
        &mut *core::ptr::addr_of_mut!((*event).ids)
    };
    if read == 0 {
        meta.captured = size as u16;
        // SAFETY: the first `size` bytes were just written; the scan reads no further.
        let head = unsafe { &*core::ptr::addr_of!((*event).payload) };
        match moment {
            Moment::ServerRequest => context::server_request(meta_pid_tgid(&meta), head, size as usize, option_key, ids),
            Moment::ClientRequest => context::sent_request(meta_pid_tgid(&meta), ids),
            Moment::Nothing | Moment::ServerResponse => {}
        }
    } else {
        count(counters::CAPTURE_FAILED);
    }
    // SAFETY: as above.
    unsafe { core::ptr::addr_of_mut!((*event).meta).write(meta) };
    entry.submit(flags);
    count(counters::TRAFFIC_EVENTS);
}
