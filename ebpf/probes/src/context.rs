//! Trace context decided in the kernel, when the bytes move: a traced server's request gets its
//! SERVER span ids (continuing an incoming `traceparent`), kept per thread while it serves; a
//! request the thread sends gets a CLIENT span id in that trace. The agent exports exactly these.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::generated::bpf_get_prandom_u32;
use zerotel_abi::{SpanIds, ThreadContext, MAX_CAPTURE};

use crate::{
    maps::{sampler, ProcessServing, INJECTED, PROCESS_SERVING, THREAD_CONTEXT},
    tcp_option,
};

/// The header name; its value `00-` + 32 + `-` + 16 + `-` + 2 hex is VALUE_LEN long.
const HEADER: &[u8; 12] = b"traceparent:";
const VALUE_LEN: usize = 55;
/// Scan no further than this into a head (bounded loop; heads are captured up to MAX_CAPTURE).
const SCAN_LIMIT: usize = MAX_CAPTURE - HEADER.len() - VALUE_LEN - 2;

/// Decide the ids of a request a traced server just read, into `ids` (the event's own memory:
/// the BPF stack is too small for copies); the thread now serves it. The caller's context is its
/// `traceparent` header, else (over TLS, `option_key` not 0) what a TCP option brought.
#[inline(always)]
pub fn server_request(pid_tgid: u64, head: &[u8; MAX_CAPTURE], len: usize, option_key: u64, ids: &mut SpanIds) {
    let continued = parse_traceparent(head, len, ids) || (option_key != 0 && tcp_option::received(option_key, ids));
    server_ids(ids, continued);
    let context = thread_context(ids);
    let was_serving = match THREAD_CONTEXT.get_ptr_mut(&pid_tgid) {
        // SAFETY: a live map value of this thread, which is the only one to write it.
        Some(entry) => unsafe {
            let was_serving = (*entry).serving != 0;
            entry.write(context);
            was_serving
        },
        None if THREAD_CONTEXT.insert(&pid_tgid, &context, 0).is_ok() => false,
        None => return,
    };
    process_serves((pid_tgid >> 32) as u32, context, !was_serving);
}

/// Complete a SERVER span's `ids`: a child of the caller when `continued` (trace id, parent and
/// flags parsed into `ids`), else the root of a new trace.
#[inline(always)]
pub fn server_ids(ids: &mut SpanIds, continued: bool) {
    ids.span_id = random_span_id();
    ids.valid = 1;
    if continued {
        ids.flags = sampler().flags(&ids.trace_id, Some(ids.flags));
    } else {
        ids.trace_id = random_trace_id();
        ids.parent_id = [0; 8];
        ids.flags = sampler().flags(&ids.trace_id, None);
    }
}

#[inline(always)]
fn thread_context(ids: &SpanIds) -> ThreadContext {
    ThreadContext { trace_id: ids.trace_id, span_id: ids.span_id, flags: ids.flags, serving: 1, _pad: [0; 6] }
}

/// A traced process started serving the HTTP/2 request with these SERVER span ids (no thread
/// of its own serves it: see `http2_server`).
#[inline(always)]
pub fn stream_served(tgid: u32, ids: &SpanIds) {
    process_serves(tgid, thread_context(ids), true);
}

/// Note the request a thread of `tgid` now serves (`one_more`: false when a thread already
/// serving one moved on to the next without answering).
///
/// The context is kept only while it is the only request: when another one starts meanwhile,
/// the process is not "alone" again until its count drops to zero, so the fallback never
/// names a request that already ended. (Two requests starting within the same few instructions
/// on two CPUs can still race here; both then count, which turns the fallback off.)
#[inline(always)]
fn process_serves(tgid: u32, context: ThreadContext, one_more: bool) {
    if let Some(serving) = PROCESS_SERVING.get_ptr_mut(&tgid) {
        // SAFETY: a live map value; the count is only ever changed atomically.
        unsafe {
            if one_more {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*serving).requests, 1);
            }
            if core::ptr::read_volatile(&raw const (*serving).requests) == 1 {
                (*serving).context = context;
            } else {
                (*serving).alone = 0;
            }
            if one_more && core::ptr::read_volatile(&raw const (*serving).requests) == 1 {
                (*serving).alone = 1;
            }
        }
        return;
    }
    let serving = ProcessServing { requests: u64::from(one_more), alone: 1, context };
    let _ = PROCESS_SERVING.insert(&tgid, &serving, 0);
}

/// `count` requests `tgid` served ended (their threads answered, their streams ended).
#[inline(always)]
pub fn requests_done(tgid: u32, count: u64) {
    if count == 0 {
        return;
    }
    if let Some(serving) = PROCESS_SERVING.get_ptr_mut(&tgid) {
        // SAFETY: a live map value; the count is only ever changed atomically (adding the two's
        // complement subtracts). A race at the bound can wrap it, which only turns the fallback
        // off for that process, never gives a wrong parent.
        unsafe {
            if (*serving).requests >= count {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*serving).requests, count.wrapping_neg());
            }
        }
    }
}

/// Decide the ids of a request a traced thread sends: a child of what it serves, else a new trace.
#[inline(always)]
pub fn client_request(pid_tgid: u64, ids: &mut SpanIds) {
    ids.span_id = random_span_id();
    ids.valid = 1;
    // SAFETY: a live map value, read field by field.
    match unsafe { THREAD_CONTEXT.get(&pid_tgid) }
        .filter(|served| served.serving != 0)
        .or_else(|| only_request_of((pid_tgid >> 32) as u32))
    {
        Some(serving) => {
            ids.trace_id = serving.trace_id;
            ids.parent_id = serving.span_id;
            ids.flags = serving.flags;
        }
        None => {
            ids.trace_id = random_trace_id();
            ids.parent_id = [0; 8];
            ids.flags = sampler().flags(&ids.trace_id, None);
        }
    }
}

/// Ids of a request the thread just sent: the ones sk_msg injected into it, else decided now.
#[inline(always)]
pub fn sent_request(pid_tgid: u64, ids: &mut SpanIds) {
    // SAFETY: plain-old-data value, copied out before removal.
    match unsafe { INJECTED.get(&pid_tgid) } {
        Some(injected) => {
            *ids = *injected;
            let _ = INJECTED.remove(&pid_tgid);
        }
        None => client_request(pid_tgid, ids),
    }
}

/// The request a process serves when exactly one of its threads serves one.
#[inline(always)]
fn only_request_of(tgid: u32) -> Option<&'static ThreadContext> {
    // SAFETY: a live map value, read field by field.
    let serving = unsafe { PROCESS_SERVING.get(&tgid) }?;
    (serving.requests == 1 && serving.alone == 1).then_some(&serving.context)
}

/// The thread answered its request (or ended): what it sends next is no longer part of that trace.
#[inline(always)]
pub fn server_responded(pid_tgid: u64) {
    let Some(entry) = THREAD_CONTEXT.get_ptr_mut(&pid_tgid) else { return };
    // SAFETY: a live map value of this thread, which is the only one to write it.
    let was_serving = unsafe { core::mem::replace(&mut (*entry).serving, 0) != 0 };
    if was_serving {
        requests_done((pid_tgid >> 32) as u32, 1);
    }
}

/// The thread ended: what it served ended with it, and its entry goes.
#[inline(always)]
pub fn thread_ended(pid_tgid: u64) {
    server_responded(pid_tgid);
    let _ = THREAD_CONTEXT.remove(&pid_tgid);
}

/// Find `\ntraceparent:` (any case) in the head and parse a version-00 value into `ids`.
/// The loop holds a single compare per offset: the verifier walks every iteration and allows a
/// few thousand branches in all, so everything else is checked once, after it.
#[inline(always)]
fn parse_traceparent(head: &[u8; MAX_CAPTURE], len: usize, ids: &mut SpanIds) -> bool {
    const TRACEPAR: u64 = u64::from_le_bytes(*b"tracepar");
    let end = if len > SCAN_LIMIT { SCAN_LIMIT } else { len };
    let mut found = 0;
    let mut at = 1;
    while at < SCAN_LIMIT && at < end {
        // `| 0x20` lowercases ASCII letters.
        if load_u64(head, at) | 0x2020_2020_2020_2020 == TRACEPAR {
            found = at;
            break;
        }
        at += 1;
    }
    // Pass the offset through the event's memory: the verifier then checks what follows once for
    // an unknown offset, not once per offset the loop could stop at.
    ids.parent_id = (found as u64).to_le_bytes();
    // SAFETY: reading back the field just written.
    let name = u64::from_le_bytes(unsafe { core::ptr::read_volatile(&ids.parent_id) }) as usize;
    if name == 0 || name > SCAN_LIMIT || name + HEADER.len() + VALUE_LEN > end {
        return false;
    }
    let line_start = head[(name - 1) % MAX_CAPTURE] == b'\n';
    let name_end = load_u32(head, name + 8) | 0x2020_2020 == u32::from_le_bytes(*b"ent:");
    line_start && name_end && parse_value(head, name + HEADER.len(), ids)
}

#[inline(always)]
fn load_u64(head: &[u8; MAX_CAPTURE], at: usize) -> u64 {
    if at > MAX_CAPTURE - 8 {
        return 0;
    }
    // SAFETY: at + 8 <= MAX_CAPTURE; unaligned loads are fine here.
    unsafe { core::ptr::read_unaligned(head.as_ptr().add(at).cast::<u64>()) }
}

#[inline(always)]
fn load_u32(head: &[u8; MAX_CAPTURE], at: usize) -> u32 {
    if at > MAX_CAPTURE - 4 {
        return 0;
    }
    // SAFETY: at + 4 <= MAX_CAPTURE.
    unsafe { core::ptr::read_unaligned(head.as_ptr().add(at).cast::<u32>()) }
}

/// `[ ]00-<32 hex>-<16 hex>-<2 hex>` at `at` into `ids`; false (ids half-written) when invalid.
/// `N` is a power of two: indexes are masked with it, for the verifier.
#[inline(always)]
pub fn parse_value<const N: usize>(head: &[u8; N], mut at: usize, ids: &mut SpanIds) -> bool {
    if head[at % N] == b' ' {
        at += 1;
    }
    let byte = |pos: usize| hex_byte(head[pos % N], head[(pos + 1) % N]);
    let dash = |pos: usize| head[pos % N] == b'-';
    if byte(at) != Some(0) || !dash(at + 2) || !dash(at + 35) || !dash(at + 52) {
        return false;
    }
    let mut any = 0u8;
    let mut k = 0;
    while k < 16 {
        let Some(b) = byte(at + 3 + 2 * k) else { return false };
        ids.trace_id[k] = b;
        any |= b;
        k += 1;
    }
    // All-zero ids are invalid: start a new trace instead.
    if any == 0 {
        return false;
    }
    any = 0;
    k = 0;
    while k < 8 {
        let Some(b) = byte(at + 36 + 2 * k) else { return false };
        ids.parent_id[k] = b;
        any |= b;
        k += 1;
    }
    match byte(at + 53) {
        Some(flags) if any != 0 => {
            ids.flags = flags;
            true
        }
        _ => false,
    }
}

/// Write the W3C value `00-<32 hex>-<16 hex>-<2 hex>` (VALUE_LEN bytes) of `ids` at `at`.
#[inline(always)]
pub fn format_value<const N: usize>(ids: &SpanIds, out: &mut [u8; N], at: usize) {
    if at + VALUE_LEN > N {
        return;
    }
    out[at] = b'0';
    out[at + 1] = b'0';
    out[at + 2] = b'-';
    let mut k = 0;
    while k < 16 {
        hex_pair(ids.trace_id[k], out, at + 3 + 2 * k);
        k += 1;
    }
    out[at + 35] = b'-';
    k = 0;
    while k < 8 {
        hex_pair(ids.span_id[k], out, at + 36 + 2 * k);
        k += 1;
    }
    out[at + 52] = b'-';
    hex_pair(ids.flags, out, at + 53);
}

#[inline(always)]
fn hex_pair<const N: usize>(byte: u8, out: &mut [u8; N], at: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    if at + 1 < N {
        out[at] = DIGITS[(byte >> 4) as usize];
        out[at + 1] = DIGITS[(byte & 0xf) as usize];
    }
}

#[inline(always)]
fn hex_byte(high: u8, low: u8) -> Option<u8> {
    Some((nibble(high)? << 4) | nibble(low)?)
}

#[inline(always)]
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[inline(always)]
fn random_u64() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { (u64::from(bpf_get_prandom_u32()) << 32) | u64::from(bpf_get_prandom_u32()) }
}

#[inline(always)]
fn random_span_id() -> [u8; 8] {
    (random_u64() | 1).to_be_bytes()
}

#[inline(always)]
fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&(random_u64() | 1).to_be_bytes());
    id
}
