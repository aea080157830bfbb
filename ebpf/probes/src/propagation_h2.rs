//! Trace context propagation for HTTP/2 (h2c, gRPC): the HEADERS frame that opens a traced
//! client's stream gets `traceparent` appended to its header block as a literal field without
//! indexing (it never enters the peer's HPACK table), and its length grows to match.
//!
//! sk_msg sees every send of the connection in order, so it follows the outgoing frames from the
//! preface on (`H2Outgoing`). Appending at the end of the block keeps a leading table-size update
//! first and pseudo-headers before regular ones, as HPACK and HTTP/2 require. Left alone, for
//! good: a connection whose frames cannot be followed, and one whose application sends
//! `traceparent` itself (a header name reaches the peer's table only as a literal first, so
//! scanning every opening block for the literal name, plain or Huffman-coded, sees it first).
//! Up to 32 streams opened in one send each get theirs. Left alone once: blocks split into
//! CONTINUATION frames, frames that would outgrow the peer's minimum frame size, long blocks,
//! large sends.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_msg_pull_data, bpf_probe_read_kernel},
    programs::SkMsgContext,
};
use zerotel_abi::{counters, h2_out, kind, ConnState, H2StreamIdsEvent, H2Outgoing, SpanIds};

use crate::{
    context,
    conns::header,
    maps::{count, wakeup_flags, EVENTS, H2_BLOCK, H2_WALK},
};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: u32 = 9;
const HEADERS: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames followed per send; a send of more turns injection off for the connection.
const MAX_FRAMES: u32 = 128;
/// Streams one send may open and get a `traceparent`; further ones in the same send go without.
const MAX_OPENINGS: u32 = 32;
/// SETTINGS_MAX_FRAME_SIZE's initial value: a grown frame must fit whatever the peer allows.
const MAX_FRAME_SIZE: u32 = 16_384;
/// Header blocks longer than this are not scanned, and so not touched.
const MAX_BLOCK: u32 = 1024;
/// After the insertion the send is pulled into one linear piece (see `propagation::MAX_LINEAR`).
const MAX_LINEAR: u32 = 32 * 1024;
/// 0x00 (literal without indexing, new name), 11, `traceparent`, 55, `00-<trace>-<span>-<flags>`.
const FIELD_LEN: u32 = 69;
/// The name's first 8 bytes, plain and Huffman-coded (RFC 7541 appendix B; the whole name
/// codes to exactly these 8 bytes).
const NAME_PLAIN: u64 = u64::from_le_bytes(*b"tracepar");
const NAME_HUFFMAN: u64 = u64::from_le_bytes([0x4d, 0x83, 0x21, 0x6b, 0x1d, 0x85, 0xa9, 0x3f]);

/// A send on a traced HTTP/2 client connection (or its first, carrying the preface).
#[inline(always)]
pub fn is_h2_send(ctx: &SkMsgContext, conn: &ConnState) -> bool {
    match conn.protocol {
        zerotel_abi::protocol::HTTP2 => true,
        zerotel_abi::protocol::UNKNOWN => starts_with_preface(ctx),
        _ => false,
    }
}

/// Where the walk of one send's frames stands, and the HEADERS frames it found opening streams
/// (concurrent calls batched into one write). In a per-CPU map, not on the stack: the verifier
/// tracks no exact values in map memory, so every way out of the walk reaches the injection in
/// one state.
#[repr(C)]
pub struct Walk {
    /// Offset of the next frame header in the send.
    at: u32,
    /// Entries of `openings` in use.
    found: u32,
    openings: [Opening; MAX_OPENINGS as usize],
}

/// A HEADERS frame opening a stream.
#[repr(C)]
#[derive(Clone, Copy)]
struct Opening {
    at: u32,
    len: u32,
    flags: u32,
    stream: u32,
}

/// Follow the frames of one send and give the first stream it opens a `traceparent`.
#[inline(always)]
pub fn on_send(ctx: &SkMsgContext, pid_tgid: u64, conn: &mut ConnState) {
    let Some(walk) = H2_WALK.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU value no one else uses while this program runs.
    let walk = unsafe { &mut *walk };
    if conn.h2_out.state & h2_out::OFF != 0 {
        return;
    }
    let size = ctx.size();
    walk.at = conn.h2_out.skip;
    walk.found = 0;
    if conn.h2_out.state & h2_out::PREFACE_SENT == 0 {
        if !starts_with_preface(ctx) {
            conn.h2_out.state |= h2_out::OFF;
            return;
        }
        conn.h2_out.state |= h2_out::PREFACE_SENT;
        walk.at = PREFACE.len() as u32;
    }
    let mut i = 0;
    while i < MAX_FRAMES && step(ctx, walk, &mut conn.h2_out, size) {
        i += 1;
    }
    if conn.h2_out.state & h2_out::OFF != 0 {
        return;
    }
    if walk.at < size {
        conn.h2_out.state |= h2_out::OFF; // more frames than followed per send
        return;
    }
    conn.h2_out.skip = walk.at - size;
    // Last first: an insertion moves only what follows it, so earlier offsets stay right.
    let mut k = 0;
    while k < MAX_OPENINGS {
        if k < walk.found {
            let opening = walk.openings[((walk.found - 1 - k) & (MAX_OPENINGS - 1)) as usize];
            let frame = Frame {
                at: opening.at,
                len: opening.len,
                kind: HEADERS,
                flags: opening.flags as u8,
                stream: opening.stream,
            };
            if frame.flags & END_HEADERS != 0 && !inject(ctx, pid_tgid, conn, &frame, ctx.size()) {
                break;
            }
        }
        k += 1;
    }
}

/// Read the frame header at `walk.at` and move past the frame; false when the send is done or
/// its frames cannot be followed (then `OFF` is set).
#[inline(always)]
fn step(ctx: &SkMsgContext, walk: &mut Walk, out: &mut H2Outgoing, size: u32) -> bool {
    let at = walk.at;
    if at >= size {
        return false;
    }
    // A frame header split between two sends cannot be read: stop following.
    let frame = if at + FRAME_HEADER <= size { frame_at(ctx, at) } else { None };
    // Defence in depth: a frame header that does not look like one means the walk lost its
    // place, and nothing may be written on a guess.
    let Some(frame) = frame.filter(|f| plausible(f, out.last_stream)) else {
        out.state |= h2_out::OFF;
        return false;
    };
    if frame.kind == HEADERS && frame.stream & 1 == 1 && frame.stream > out.last_stream {
        out.last_stream = frame.stream;
        if walk.found < MAX_OPENINGS {
            let opening = Opening { at: frame.at, len: frame.len, flags: u32::from(frame.flags), stream: frame.stream };
            walk.openings[(walk.found & (MAX_OPENINGS - 1)) as usize] = opening;
            walk.found += 1;
        }
    }
    walk.at = at + FRAME_HEADER + frame.len;
    true
}

/// Frame types a client sends (RFC 9113: DATA through CONTINUATION).
const MAX_FRAME_TYPE: u8 = 0x9;
/// How far past the last stream id a new HEADERS frame may jump (ids grow by 2 per stream).
const MAX_STREAM_JUMP: u32 = 2 * MAX_FRAMES;

/// Whether a frame header read at the walk's position looks like one a client sends next.
#[inline(always)]
fn plausible(frame: &Frame, last_stream: u32) -> bool {
    frame.kind <= MAX_FRAME_TYPE
        && (frame.kind != HEADERS || frame.stream <= last_stream.saturating_add(MAX_STREAM_JUMP))
}

#[derive(Clone, Copy)]
struct Frame {
    /// Offset of the frame header in the send.
    at: u32,
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

#[inline(always)]
fn frame_at(ctx: &SkMsgContext, at: u32) -> Option<Frame> {
    if !pull(ctx, at, at + FRAME_HEADER) {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + FRAME_HEADER as usize > end {
        return None;
    }
    // SAFETY: bounds checked above.
    let h = unsafe { core::ptr::read_unaligned(data as *const [u8; 9]) };
    Some(Frame {
        at,
        len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
        kind: h[3],
        flags: h[4],
        stream: u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]),
    })
}

/// Append the field to the frame's header block; undone if anything after the insertion fails.
/// False when the send's other streams must be left alone too.
#[inline(always)]
fn inject(ctx: &SkMsgContext, pid_tgid: u64, conn: &mut ConnState, frame: &Frame, size: u32) -> bool {
    if size + FIELD_LEN > MAX_LINEAR || frame.len + FIELD_LEN > MAX_FRAME_SIZE {
        return size + FIELD_LEN <= MAX_LINEAR;
    }
    let Some((start, end)) = header_block(ctx, frame) else { return true };
    if end > size || end - start > MAX_BLOCK {
        return true;
    }
    if names_traceparent(ctx, start, end) {
        conn.h2_out.state |= h2_out::OFF; // the application propagates itself
        return false;
    }
    let mut ids = SpanIds::default();
    context::client_request(pid_tgid, &mut ids);
    if ctx.push_data(end, FIELD_LEN, 0).is_err() {
        return false;
    }
    // One linear piece again, so TCP sends the frames as the application wrote them.
    if !(write_field(ctx, end, &ids) && pull(ctx, 0, size + FIELD_LEN) && write_length(ctx, frame, frame.len + FIELD_LEN)) {
        let _ = ctx.pop_data(end, FIELD_LEN, 0);
        count(counters::CAPTURE_FAILED);
        return false;
    }
    report(pid_tgid, conn.conn_id, frame.stream, ids);
    true
}

/// Where the header block of a HEADERS frame starts and ends (after its padding length and
/// priority fields, before its padding).
#[inline(always)]
fn header_block(ctx: &SkMsgContext, frame: &Frame) -> Option<(u32, u32)> {
    let mut start = frame.at + FRAME_HEADER;
    let mut end = start + frame.len;
    if frame.flags & PADDED != 0 {
        let pad = u32::from(byte_at(ctx, start)?);
        start += 1;
        end = end.checked_sub(pad)?;
    }
    if frame.flags & PRIORITY != 0 {
        start += 5;
    }
    (start <= end).then_some((start, end))
}

#[inline(always)]
fn byte_at(ctx: &SkMsgContext, at: u32) -> Option<u8> {
    if !pull(ctx, at, at + 1) || ctx.data() + 1 > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above.
    Some(unsafe { *(ctx.data() as *const u8) })
}

/// A header block copied out of the message, to be scanned in `bpf_loop` (a scan unrolled over
/// the message itself costs the verifier too much once per opening stream).
#[repr(C)]
pub struct BlockCopy {
    /// The block's length (read back masked, for the verifier).
    len: u64,
    /// Set by `scan_step` when the name is found.
    found: u64,
    /// The block, and room for the last 8-byte compare.
    bytes: [u8; MAX_BLOCK as usize + 8],
}

/// Whether the block holds the name `traceparent`, plain or Huffman-coded (a false match in a
/// value only costs this request its header).
#[inline(always)]
fn names_traceparent(ctx: &SkMsgContext, start: u32, end: u32) -> bool {
    let len = end - start;
    if len < 8 {
        return false;
    }
    let Some(copy) = H2_BLOCK.get_ptr_mut(0) else { return true };
    // SAFETY: a per-CPU value no one else uses while this program runs.
    let copy = unsafe { &mut *copy };
    if !pull(ctx, start, end) || ctx.data() + len as usize > ctx.data_end() {
        return true; // cannot look: behave as if it were there
    }
    // Through map memory and a mask, so the verifier bounds the size from these alone.
    // SAFETY: a plain u64 of this CPU's value.
    unsafe { core::ptr::write_volatile(&raw mut copy.len, u64::from(len)) };
    let size = unsafe { core::ptr::read_volatile(&raw const copy.len) } & (2 * MAX_BLOCK as u64 - 1);
    if size > MAX_BLOCK as u64 {
        return true;
    }
    // SAFETY: size <= MAX_BLOCK < bytes.len(); the source is the pulled block in kernel memory.
    let rc = unsafe { bpf_probe_read_kernel(copy.bytes.as_mut_ptr().cast(), size as u32, ctx.data() as *const c_void) };
    if rc != 0 {
        return true;
    }
    let size = size as u32;
    copy.found = 0;
    // SAFETY: a helper call; `scan_step` finds its state in H2_BLOCK.
    unsafe { bpf_loop(size - 7, scan_step as *mut c_void, core::ptr::null_mut(), 0) };
    copy.found != 0
}

/// Compare the 8 bytes at `index` with the name's start. Returns 1 to stop.
extern "C" fn scan_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(copy) = H2_BLOCK.get_ptr_mut(0) else { return 1 };
    // SAFETY: the per-CPU value `names_traceparent` filled.
    let copy = unsafe { &mut *copy };
    let at = (index & (MAX_BLOCK as u64 - 1)) as usize;
    // SAFETY: at < MAX_BLOCK and bytes holds MAX_BLOCK + 8.
    let word = unsafe { core::ptr::read_unaligned(copy.bytes.as_ptr().add(at).cast::<u64>()) };
    if word == NAME_PLAIN || word == NAME_HUFFMAN {
        copy.found = 1;
        return 1;
    }
    0
}

/// Write the field into the room made at `at`.
#[inline(always)]
fn write_field(ctx: &SkMsgContext, at: u32, ids: &SpanIds) -> bool {
    if !pull(ctx, at, at + FIELD_LEN) {
        return false;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + FIELD_LEN as usize > end {
        return false;
    }
    let field = format_field(ids);
    let mut i = 0;
    while i < FIELD_LEN as usize {
        // SAFETY: data + FIELD_LEN <= end.
        unsafe { *((data + i) as *mut u8) = field[i] };
        i += 1;
    }
    true
}

/// Set the 24-bit length of the frame at `frame.at` (the message is linear from offset 0).
#[inline(always)]
fn write_length(ctx: &SkMsgContext, frame: &Frame, len: u32) -> bool {
    let at = (frame.at & (MAX_LINEAR - 1)) as usize;
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + at + 3 > end {
        return false;
    }
    // SAFETY: bounds checked above.
    unsafe {
        *((data + at) as *mut u8) = (len >> 16) as u8;
        *((data + at + 1) as *mut u8) = (len >> 8) as u8;
        *((data + at + 2) as *mut u8) = len as u8;
    }
    true
}

#[inline(always)]
fn format_field(ids: &SpanIds) -> [u8; FIELD_LEN as usize] {
    let mut out = [0u8; FIELD_LEN as usize];
    out[0] = 0x00;
    out[1] = 11;
    out[2..13].copy_from_slice(b"traceparent");
    out[13] = 55;
    context::format_value(ids, &mut out, 14);
    out
}

#[inline(always)]
fn starts_with_preface(ctx: &SkMsgContext) -> bool {
    if ctx.size() < PREFACE.len() as u32 || !pull(ctx, 0, PREFACE.len() as u32) {
        return false;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + PREFACE.len() > end {
        return false;
    }
    // SAFETY: bounds checked above.
    let head = unsafe { core::ptr::read_unaligned(data as *const [u8; 24]) };
    head == *PREFACE
}

#[inline(always)]
fn pull(ctx: &SkMsgContext, start: u32, end: u32) -> bool {
    // SAFETY: the context's own message.
    unsafe { bpf_msg_pull_data(ctx.msg, start, end, 0) == 0 }
}

/// Tell the agent which ids the stream's CLIENT span has.
#[inline(always)]
fn report(pid_tgid: u64, conn_id: u64, stream_id: u32, ids: SpanIds) {
    let event =
        H2StreamIdsEvent { header: header(kind::H2_INJECTED, pid_tgid), conn_id, stream_id, _pad: 0, ids };
    match EVENTS.output::<H2StreamIdsEvent>(&event, wakeup_flags(core::mem::size_of::<H2StreamIdsEvent>())) {
        Ok(()) => count(counters::TRAFFIC_EVENTS),
        Err(_) => count(counters::EVENTS_LOST),
    }
}
