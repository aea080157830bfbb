//! Trace context propagation for plaintext HTTP/1 (HTTP/2: `propagation_h2`): a traced process's outgoing request gets a
//! `traceparent` header inserted after its request line, before TCP sees the bytes (sk_msg runs
//! ahead of segmentation, so no sequence numbers need fixing). Never corrupts, never drops: any
//! failure after the insertion removes it again and the bytes go out untouched.
//!
//! Which sockets: `sock_ops` sees connect() in the connecting thread (TCP_CONNECT_CB, where the pid
//! is reliable) and remembers traced ones; once established (ACTIVE_ESTABLISHED_CB, the first
//! point where the kernel accepts a sockhash insert) they join INJECT_SOCKS, whose sends sk_msg sees.

use aya_ebpf::{
    bindings::{bpf_sock_ops, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_socket_cookie, bpf_msg_pull_data},
    },
    macros::{sk_msg, sock_ops, stream_verdict},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};
use zerotel_abi::{buffer, conn_key, direction, protocol, role, ConnState, SpanIds};

use crate::{
    context, propagation_h2, tcp_option,
    maps::{call_in_flight, is_traced, CONNECTING, CONNS, INJECTED, INJECT_SOCKS, PROPAGATE, SCRATCH},
};

const TCP_CONNECT_CB: u32 = 3;
const ACTIVE_ESTABLISHED_CB: u32 = 4;
const SK_PASS: u32 = 1;
/// `traceparent: 00-` + 32 hex + `-` + 16 hex + `-` + 2 hex + CRLF.
const HEADER_LEN: usize = 70;
/// How far into a message the request line and an existing traceparent are looked for.
const HEAD_WINDOW: u32 = 1024;
/// A request line longer than this is left alone.
const MAX_REQUEST_LINE: usize = 512;
/// After the insertion the whole send is pulled into one linear piece; larger sends are left
/// alone. Why: pushing data splits the message into pieces that TCP sends one by one, and with
/// Nagle on (no TCP_NODELAY, e.g. nginx upstreams) the pieces after the first wait for the peer's
/// delayed ACK: a 40 ms stall per request, measured through an nginx proxy.
const MAX_LINEAR: u32 = 32 * 1024;

/// Whether `traceparent` is injected (`--no-propagation` turns it off).
#[inline(always)]
pub fn enabled() -> bool {
    // SAFETY: read-only global set before load.
    unsafe { core::ptr::read_volatile(&PROPAGATE) != 0 }
}

/// cgroup sock_ops on the cgroup v2 root: `struct bpf_sock_ops`.
#[sock_ops]
pub fn zt_sock_ops(ctx: SockOpsContext) -> u32 {
    if !enabled() {
        return 1;
    }
    let op = ctx.op();
    if tcp_option::on_sock_ops(&ctx, op) {
        return 1;
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    match op {
        TCP_CONNECT_CB if is_traced((bpf_get_current_pid_tgid() >> 32) as u32) => {
            let _ = CONNECTING.insert(cookie, 1, 0);
        }
        // SAFETY: lookups only compare against None.
        ACTIVE_ESTABLISHED_CB if unsafe { CONNECTING.get(&cookie) }.is_some() => {
            let _ = CONNECTING.remove(&cookie);
            // SAFETY: the context's own socket.
            let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
            let _ = INJECT_SOCKS.update(cookie, ops, u64::from(BPF_NOEXIST));
            tcp_option::writing(&ctx); // for TLS, where sk_msg sees ciphertext
        }
        _ => {}
    }
    1
}

/// sk_skb verdict on INJECT_SOCKS: everything received passes, into the socket's own psock queue.
/// Why: once a socket is in a sockhash, some kernels answer FIONREAD from that queue only; with
/// this program received bytes land there, so FIONREAD counts them again (the agent's start-up
/// self-test checks it). Nothing is dropped or redirected.
#[stream_verdict]
pub fn zt_skb_verdict(_ctx: SkBuffContext) -> u32 {
    SK_PASS
}

/// sk_msg on INJECT_SOCKS: every sendmsg/write of those sockets, in the sending thread.
#[sk_msg]
pub fn zt_sk_msg(ctx: SkMsgContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !enabled() || !is_traced((pid_tgid >> 32) as u32) {
        return SK_PASS;
    }
    let Some(conn) = sending_client(pid_tgid) else { return SK_PASS };
    // SAFETY: a live map value; only this thread's send updates these fields meanwhile.
    let conn = unsafe { &mut *conn };
    if propagation_h2::is_h2_send(&ctx, conn) {
        propagation_h2::on_send(&ctx, pid_tgid, conn);
    } else if sends_http_request(conn) {
        inject(&ctx, pid_tgid);
    }
    SK_PASS
}

/// The client connection of the send in progress (recorded by the syscall's entry program).
#[inline(always)]
fn sending_client(pid_tgid: u64) -> Option<*mut ConnState> {
    let call = call_in_flight(pid_tgid)?;
    if call.direction != direction::EGRESS || call.buffer == buffer::NONE {
        return None;
    }
    let conn = CONNS.get_ptr_mut(&conn_key((pid_tgid >> 32) as u32, call.fd))?;
    // SAFETY: a live map value, only read here. A TLS connection's sends are ciphertext.
    (unsafe { (*conn).role == role::CLIENT && (*conn).tls == 0 }).then_some(conn)
}

/// The send speaks HTTP/1 (or the connection has sent nothing yet) and starts a new exchange: a
/// connection classified as anything else, or a request body, is never touched, whatever its
/// bytes look like.
#[inline(always)]
fn sends_http_request(conn: &ConnState) -> bool {
    // A send while a request is outstanding is that request's body (or a pipelined request):
    // only a send that starts a new exchange may carry the header.
    matches!(conn.protocol, protocol::UNKNOWN | protocol::HTTP1) && conn.request_outstanding == 0
}

fn inject(ctx: &SkMsgContext, pid_tgid: u64) {
    let size = ctx.size();
    let window = if size < HEAD_WINDOW { size } else { HEAD_WINDOW };
    if window < 16 || size + HEADER_LEN as u32 > MAX_LINEAR || !pull(ctx, 0, window) || !starts_request(ctx) {
        return;
    }
    if scan_head(ctx) != Scan::LineEnd {
        return; // no request line, or a traceparent already there (SDK, proxy): one header only
    }
    // Pulling again resets what the verifier knows of the data pointers, so the code below is
    // checked once rather than once per place the scan could have stopped.
    if !pull(ctx, 0, window) {
        return;
    }
    let Some(line_end) = request_line_end(ctx) else { return };
    let mut ids = SpanIds::default();
    context::client_request(pid_tgid, &mut ids);
    let at = (line_end + 2) as u32;
    if ctx.push_data(at, HEADER_LEN as u32, 0).is_err() {
        return;
    }
    // One linear piece again, so TCP sends the request as the application wrote it.
    if write_header(ctx, at, &ids) && pull(ctx, 0, size + HEADER_LEN as u32) {
        let _ = INJECTED.insert(pid_tgid, ids, 0);
    } else {
        let _ = ctx.pop_data(at, HEADER_LEN as u32, 0);
    }
}

#[inline(always)]
fn pull(ctx: &SkMsgContext, start: u32, end: u32) -> bool {
    // SAFETY: the context's own message.
    unsafe { bpf_msg_pull_data(ctx.msg, start, end, 0) == 0 }
}

#[inline(always)]
fn starts_request(ctx: &SkMsgContext) -> bool {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 8 > end {
        return false;
    }
    // SAFETY: bounds checked.
    crate::classify::is_http_request_start(&unsafe { core::ptr::read_unaligned(data as *const [u8; 8]) })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    NoLineEnd,
    /// The first CRLF's offset is in SCRATCH.
    LineEnd,
    HasTraceparent,
}

/// One pass over the head: where the request line ends (kept in map memory, so the verifier's
/// states do not multiply by it) and whether a `traceparent:` name appears (any case).
#[inline(always)]
fn scan_head(ctx: &SkMsgContext) -> Scan {
    const TRACEPAR: u64 = u64::from_le_bytes(*b"tracepar");
    let Some(slot) = SCRATCH.get_ptr_mut(0) else { return Scan::NoLineEnd };
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut line_end_seen = false;
    let mut i = 0;
    // Needs 8 bytes at each offset: a request line that ends its send ("GET / HTTP/1.1\r\n" with
    // the headers in later sends) is not found and gets no header (a separate bound for the CRLF
    // check doubles the verifier's states past its budget).
    while i < HEAD_WINDOW as usize {
        if data + i + 8 > end {
            break;
        }
        // SAFETY: bounds checked above.
        let word = unsafe { core::ptr::read_unaligned((data + i) as *const u64) };
        if word | 0x2020_2020_2020_2020 == TRACEPAR {
            return Scan::HasTraceparent;
        }
        if !line_end_seen && word & 0xffff == 0x0a0d {
            // SAFETY: this CPU's slot.
            unsafe { core::ptr::write_volatile(slot, i as u64) };
            line_end_seen = true;
        }
        i += 1;
    }
    if line_end_seen { Scan::LineEnd } else { Scan::NoLineEnd }
}

/// The request line's CRLF offset (from SCRATCH), if it ends `HTTP/1.x` and is not too long.
#[inline(always)]
fn request_line_end(ctx: &SkMsgContext) -> Option<usize> {
    let slot = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, written by scan_head.
    let line_end = unsafe { core::ptr::read_volatile(slot) } as usize;
    if !(9..MAX_REQUEST_LINE).contains(&line_end) {
        return None;
    }
    // The verifier allows no negative offsets from a packet pointer: read forward from the start.
    let version_at = ctx.data() + (line_end - 9);
    if version_at + 8 > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above.
    let version = unsafe { core::ptr::read_unaligned(version_at as *const [u8; 8]) };
    (version[..7] == *b" HTTP/1").then_some(line_end)
}

/// Write `traceparent: 00-<trace>-<span>-<flags>\r\n` into the room made at `at`.
#[inline(always)]
fn write_header(ctx: &SkMsgContext, at: u32, ids: &SpanIds) -> bool {
    // SAFETY: pulling the inserted range makes it directly writable.
    if unsafe { bpf_msg_pull_data(ctx.msg, at, at + HEADER_LEN as u32, 0) } != 0 {
        return false;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + HEADER_LEN > end {
        return false;
    }
    let header = format_header(ids);
    let mut i = 0;
    while i < HEADER_LEN {
        // SAFETY: data + HEADER_LEN <= end.
        unsafe { *((data + i) as *mut u8) = header[i] };
        i += 1;
    }
    true
}

#[inline(always)]
fn format_header(ids: &SpanIds) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..13].copy_from_slice(b"traceparent: ");
    context::format_value(ids, &mut out, 13);
    out[68] = b'\r';
    out[69] = b'\n';
    out
}
