//! HTTP/2 servers: which requests a traced server is serving, and their SERVER span ids.
//!
//! grpc-go and grpcio read a request on one thread, run its handler on another and send the
//! handler's own calls from a third, so the per-thread context HTTP/1 servers get says nothing
//! here. Instead the kernel follows the frames of a traced server's connections in the stream
//! chunks, as they are captured: a HEADERS frame opening a client stream starts a request; the
//! server ending the stream (END_STREAM) or either side resetting it ends it. The process's count
//! of requests includes these, so a request it sends while it serves exactly one of them is that
//! one's child (`context::client_request`).
//!
//! The ids are decided here, when the HEADERS frame is read, and reported to the agent
//! (`H2_SERVED`) ahead of the chunk. They continue the `traceparent` zerotel's own injection
//! appended to the end of the header block (a plain literal); one the caller's HPACK encoder
//! coded (Huffman, dynamic table) only the agent can read.
//!
//! Only while propagation is on: without injection the agent links a process's calls to what it
//! serves by itself, and this walk (about 1 us per request, mostly the per-stream map) is saved.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_loop;
use zerotel_abi::{
    counters, direction, kind, ConnState, FrameCursor, H2StreamIdsEvent, StreamChunkHead, STREAM_CHUNK_BYTES,
};

use crate::{
    conns::header,
    context,
    maps::{count, wakeup_flags, H2StreamKey, CONNS, EVENTS, H2_FRAMES, H2_SERVER_STREAMS, STREAM_SCRATCH},
};

const FRAME_HEADER: u64 = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Loop steps per chunk: each frame takes 9 bytes or more, plus a held header and the stop.
const MAX_STEPS: u32 = (STREAM_CHUNK_BYTES as u64 / FRAME_HEADER) as u32 + 2;
/// The field `propagation_h2` appends: 0x00, 11, `traceparent`, 55, the value.
const FIELD_LEN: u64 = 69;
const VALUE_LEN: u64 = 55;
/// The chunk buffer's size (`stream::Scratch::data`), a power of two: indexes are masked with it.
const BUFFER: usize = 2 * STREAM_CHUNK_BYTES;

/// Where the walk over one chunk stands. In a per-CPU map: the loop body finds it there. The
/// connection's fields the walk needs are copied in and out, so that a frame costs no hash lookup.
#[repr(C)]
pub struct Walk {
    /// The connection's `CONNS` key and id.
    key: u64,
    conn_id: u64,
    pid_tgid: u64,
    /// Chunk offset of the next frame header.
    at: u64,
    /// Bytes in the chunk.
    size: u64,
    /// [`direction`] of the chunk.
    direction: u64,
    /// Set when the walk reached the chunk's end.
    done: u64,
    /// Set when a stream could not be remembered: its end would go uncounted.
    lost: u64,
    /// The connection's `h2_server.last_stream` and this direction's cursor.
    last_stream: u32,
    _pad: u32,
    cursor: FrameCursor,
    /// The report of the stream being opened (too big for the stack).
    event: H2StreamIdsEvent,
}

/// Follow the frames in the chunk `STREAM_SCRATCH` holds (`size` bytes of the connection `key`).
#[inline(always)]
pub fn on_chunk(key: u64, head: &StreamChunkHead, size: u64) {
    let Some(conn) = CONNS.get_ptr_mut(&key) else { return };
    // SAFETY: a live map value. The connection's other direction may be walked at once on
    // another CPU: it has its own cursor, and shared counts change atomically.
    let conn = unsafe { &mut *conn };
    let dir = (head.direction & 1) as usize;
    if conn.h2_server.lost != 0 {
        return;
    }
    if conn.h2_server.frames[dir].next != head.offset {
        give_up(conn); // bytes this walk never saw
        return;
    }
    let Some(walk) = H2_FRAMES.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU value no one else uses while this program runs.
    let walk = unsafe { &mut *walk };
    walk.key = key;
    walk.conn_id = conn.conn_id;
    walk.pid_tgid = (u64::from(head.header.pid) << 32) | u64::from(head.header.tid);
    walk.at = u64::from(conn.h2_server.frames[dir].skip);
    walk.size = size;
    walk.direction = dir as u64;
    walk.done = 0;
    walk.lost = 0;
    walk.last_stream = conn.h2_server.last_stream;
    walk.cursor = conn.h2_server.frames[dir];
    // SAFETY: a helper call; `step` finds its state in H2_FRAMES.
    unsafe { bpf_loop(MAX_STEPS, step as *mut c_void, core::ptr::null_mut(), 0) };
    walk.cursor.next = head.offset + size;
    conn.h2_server.frames[dir] = walk.cursor;
    if dir == direction::INGRESS as usize {
        conn.h2_server.last_stream = walk.last_stream;
    }
    if walk.done == 0 || walk.lost != 0 {
        give_up(conn);
    }
}

/// The frames of this connection cannot be followed any more. Its open streams stay counted
/// until it closes: their ends will not be seen, and a count too high only keeps the fallback
/// off, where one too low could name a wrong parent.
#[inline(always)]
fn give_up(conn: &mut ConnState) {
    conn.h2_server.lost = 1;
}

/// A frame header as read.
#[derive(Clone, Copy)]
struct Frame {
    len: u64,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Frame {
    #[inline(always)]
    fn parse(h: &[u8; 9]) -> Self {
        Frame {
            len: u64::from(u32::from_be_bytes([0, h[0], h[1], h[2]])),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]),
        }
    }
}

/// Read the next frame header (completing one split off the previous chunk first), act on it and
/// move past its payload. Returns 1 to stop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = H2_FRAMES.get_ptr_mut(0) else { return 1 };
    let Some(scratch) = STREAM_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: per-CPU values `on_chunk` and `stream::flush` filled; nothing else runs here meanwhile.
    let (walk, data) = unsafe { (&mut *walk, &(*scratch).data) };
    let (frame, payload_at) = if walk.cursor.held_len > 0 {
        // Only at the chunk's start (`at` is 0): the header's first bytes came last time.
        let held = u64::from(walk.cursor.held_len);
        let mut k = 0;
        while k < FRAME_HEADER {
            if k >= held && k - held < walk.size {
                walk.cursor.held[k as usize] = data[((k - held) & (BUFFER as u64 - 1)) as usize];
            }
            k += 1;
        }
        let need = FRAME_HEADER - held;
        if walk.size < need {
            walk.cursor.held_len += walk.size as u8;
            walk.cursor.skip = 0;
            walk.done = 1;
            return 1;
        }
        walk.cursor.held_len = 0;
        (Frame::parse(&walk.cursor.held), need)
    } else if walk.at + FRAME_HEADER <= walk.size {
        let at = (walk.at & (STREAM_CHUNK_BYTES as u64 - 1)) as usize;
        // SAFETY: at < STREAM_CHUNK_BYTES and the buffer holds twice that.
        let h = unsafe { core::ptr::read_unaligned(data.as_ptr().add(at).cast::<[u8; 9]>()) };
        (Frame::parse(&h), walk.at + FRAME_HEADER)
    } else {
        end_of_chunk(walk, data);
        return 1;
    };
    walk.at = payload_at + frame.len;
    on_frame(walk, &frame, payload_at, data);
    0
}

/// Keep the first bytes of a header the chunk splits, or how much of a frame is still to come.
#[inline(always)]
fn end_of_chunk(walk: &mut Walk, data: &[u8; BUFFER]) {
    if walk.at >= walk.size {
        walk.cursor.skip = (walk.at - walk.size) as u32;
    } else {
        let partial = walk.size - walk.at;
        let mut k = 0;
        while k < FRAME_HEADER - 1 {
            if k < partial {
                walk.cursor.held[k as usize] = data[((walk.at + k) & (BUFFER as u64 - 1)) as usize];
            }
            k += 1;
        }
        walk.cursor.held_len = partial as u8;
        walk.cursor.skip = 0;
    }
    walk.done = 1;
}

#[inline(always)]
fn on_frame(walk: &mut Walk, frame: &Frame, payload_at: u64, data: &[u8; BUFFER]) {
    match (walk.direction as u8, frame.kind) {
        (direction::INGRESS, HEADERS) if frame.stream & 1 == 1 && frame.stream > walk.last_stream => {
            walk.last_stream = frame.stream;
            open_stream(walk, frame, payload_at, data);
        }
        (_, RST_STREAM) => end_stream(walk, frame.stream),
        (direction::EGRESS, HEADERS | DATA) if frame.flags & END_STREAM != 0 => end_stream(walk, frame.stream),
        _ => {}
    }
}

/// A request starts: decide its ids, count it, and report them.
#[inline(always)]
fn open_stream(walk: &mut Walk, frame: &Frame, payload_at: u64, data: &[u8; BUFFER]) {
    let Some(conn) = CONNS.get_ptr_mut(&walk.key) else { return };
    let tgid = (walk.pid_tgid >> 32) as u32;
    let ids = &mut walk.event.ids;
    let continued = injected_traceparent(frame, payload_at, walk.size, data, ids);
    context::server_ids(ids, continued);
    context::stream_served(tgid, ids);
    // SAFETY: a live map value's field, changed atomically (see `on_chunk`).
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            &raw mut (*conn).h2_server.open,
            1,
        );
    }
    let key = H2StreamKey { conn_id: walk.conn_id, stream_id: u64::from(frame.stream) };
    if H2_SERVER_STREAMS.insert(&key, &1, 0).is_err() {
        walk.lost = 1; // counted, but its end could not be matched
    }
    walk.event.header = header(kind::H2_SERVED, walk.pid_tgid);
    walk.event.conn_id = walk.conn_id;
    walk.event.stream_id = frame.stream;
    match EVENTS.output::<H2StreamIdsEvent>(&walk.event, wakeup_flags(core::mem::size_of::<H2StreamIdsEvent>())) {
        Ok(()) => count(counters::TRAFFIC_EVENTS),
        Err(_) => count(counters::EVENTS_LOST),
    }
}

/// The stream ended (or was reset): uncount it, once.
#[inline(always)]
fn end_stream(walk: &Walk, stream: u32) {
    let key = H2StreamKey { conn_id: walk.conn_id, stream_id: u64::from(stream) };
    if H2_SERVER_STREAMS.remove(&key).is_err() {
        return;
    }
    let Some(conn) = CONNS.get_ptr_mut(&walk.key) else { return };
    // SAFETY: as in `open_stream`; the entry just removed was counted, so `open` is at least 1.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            &raw mut (*conn).h2_server.open,
            u64::MAX,
        );
    }
    context::requests_done((walk.pid_tgid >> 32) as u32, 1);
}

/// Parse the `traceparent` zerotel appends to a header block, when the whole HEADERS frame is
/// in the chunk and its block ends with one: `0x00|0x10|0x40, 11, traceparent, 55, value`.
#[inline(always)]
fn injected_traceparent(frame: &Frame, payload_at: u64, size: u64, data: &[u8; BUFFER], ids: &mut zerotel_abi::SpanIds) -> bool {
    if frame.flags & END_HEADERS == 0 || payload_at + frame.len > size || size > STREAM_CHUNK_BYTES as u64 {
        return false;
    }
    let byte = |at: u64| data[(at & (BUFFER as u64 - 1)) as usize];
    let mut start = payload_at;
    let mut end = payload_at + frame.len;
    if frame.flags & PADDED != 0 {
        let pad = u64::from(byte(payload_at));
        start += 1;
        if pad > end {
            return false;
        }
        end -= pad;
    }
    if frame.flags & PRIORITY != 0 {
        start += 5;
    }
    if end < start + FIELD_LEN {
        return false;
    }
    let field = end - FIELD_LEN;
    let name = field + 2;
    // Without indexing, never indexed, or with incremental indexing; a new (literal) name.
    matches!(byte(field), 0x00 | 0x10 | 0x40)
        && byte(field + 1) == 11
        && byte(field + 13) == VALUE_LEN as u8
        && load_u64(data, name) == u64::from_le_bytes(*b"tracepar")
        && byte(name + 8) == b'e'
        && byte(name + 9) == b'n'
        && byte(name + 10) == b't'
        && context::parse_value(data, (end - VALUE_LEN) as usize, ids)
}

#[inline(always)]
fn load_u64(data: &[u8; BUFFER], at: u64) -> u64 {
    let at = (at & (STREAM_CHUNK_BYTES as u64 - 1)) as usize;
    // SAFETY: at < STREAM_CHUNK_BYTES and the buffer holds twice that.
    unsafe { core::ptr::read_unaligned(data.as_ptr().add(at).cast::<u64>()) }
}
