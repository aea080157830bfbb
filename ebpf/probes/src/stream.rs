//! Whole-stream capture for protocols the agent frames itself (Kafka, HTTP/2): a syscall's bytes, up to
//! `STREAM_SYSCALL_CAP`, go to the agent in stream chunk records, across every iovec. Pieces of
//! iovecs are packed into chunks of `STREAM_CHUNK_BYTES` (librdkafka sends one iovec per message
//! value: a thousand tiny pieces per request). The copy loop runs in `bpf_loop` with its state in
//! per-CPU maps, so the verifier checks one iteration.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_probe_read_user};
use zerotel_abi::{buffer, counters, kind, protocol, role, ConnState, EventHeader, InFlight, StreamChunkHead, STREAM_CHUNK_BYTES, STREAM_SYSCALL_CAP};

use crate::{
    http2_server, propagation,
    maps::{count, wakeup_flags, EVENTS, STREAM_SCRATCH, STREAM_WALK},
};

/// Loop iterations per syscall: one per iovec piece. Sends hold at most 1024 iovecs (UIO_MAXIOV)
/// and a piece ends at a chunk boundary at most once per chunk of the cap.
const MAX_STEPS: u32 = 1024 + 2 * (STREAM_SYSCALL_CAP / STREAM_CHUNK_BYTES as u64) as u32;

const CHUNK: u64 = STREAM_CHUNK_BYTES as u64;

/// A chunk record being filled. Twice the room a chunk needs, so the verifier can check a copy
/// of up to a chunk at any fill level below a chunk from the two ranges alone.
#[repr(C)]
pub struct Scratch {
    head: StreamChunkHead,
    pub data: [u8; 2 * STREAM_CHUNK_BYTES],
}

/// Where the copy of one syscall's bytes stands.
#[repr(C)]
pub struct Walk {
    /// The head of the chunk being filled (`offset` = stream offset of its first byte).
    head: StreamChunkHead,
    /// Bytes in the chunk being filled (always below a chunk between steps).
    fill: u64,
    /// The next `struct iovec` to read (0 for a plain buffer or after the last one).
    next_iovec: u64,
    /// The part of the current buffer not copied yet.
    base: u64,
    left: u64,
    /// Bytes still to copy (at most the cap).
    remaining: u64,
    /// The connection's `CONNS` key, and 1 when it is a traced HTTP/2 server's whose frames
    /// `http2_server` follows.
    conn_key: u64,
    h2_server: u64,
}

/// Send the bytes `call` moved (`len` of them, the first at stream offset `offset`).
#[inline(always)]
pub fn capture(call: &InFlight, key: u64, conn: &ConnState, len: u64, offset: u64, header: EventHeader) {
    let Some(walk) = STREAM_WALK.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU value no one else uses while this program runs.
    let walk = unsafe { &mut *walk };
    let (base, left, next_iovec) = match call.buffer {
        buffer::PLAIN => (call.buf, len, 0),
        buffer::IOVEC => (0, 0, call.buf),
        // struct user_msghdr: msg_iov at 16.
        buffer::MSGHDR => {
            // SAFETY: probe read faults safely.
            let iov: u64 = unsafe { aya_ebpf::helpers::bpf_probe_read_user((call.buf + 16) as *const u64) }.unwrap_or(0);
            (0, 0, iov)
        }
        _ => return,
    };
    let mut header = header;
    header.kind = kind::STREAM_CHUNK;
    *walk = Walk {
        head: StreamChunkHead {
            header,
            conn_id: conn.conn_id,
            start_ns: call.start_ns,
            offset,
            syscall_end: offset + len,
            direction: call.direction,
            protocol: conn.protocol,
            captured: 0,
            _pad2: 0,
        },
        fill: 0,
        next_iovec,
        base,
        left,
        remaining: if len < STREAM_SYSCALL_CAP { len } else { STREAM_SYSCALL_CAP },
        conn_key: key,
        // Only what propagation injects needs the kernel's ids (`http2_server`).
        h2_server: u64::from(conn.protocol == protocol::HTTP2 && conn.role == role::SERVER && propagation::enabled()),
    };
    // SAFETY: a helper call; `step` finds its state in STREAM_WALK.
    unsafe {
        bpf_loop(MAX_STEPS, step as *mut c_void, core::ptr::null_mut(), 0);
    }
    if walk.fill > 0 {
        flush(walk);
    }
}

/// Copy the next piece of the current iovec (moving to the next iovec first if this one is
/// done) into the chunk, and send the chunk once full. Returns 1 to stop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = STREAM_WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: the per-CPU value `capture` filled; nothing else runs on this CPU meanwhile.
    let walk = unsafe { &mut *walk };
    if walk.remaining == 0 || (walk.left == 0 && !next_iovec(walk)) {
        return 1;
    }
    let room = CHUNK - walk.fill;
    let mut size = if walk.left < walk.remaining { walk.left } else { walk.remaining };
    if size > room {
        size = room;
    }
    if !copy(walk, size) {
        return 1;
    }
    walk.base += size;
    walk.left -= size;
    walk.remaining -= size;
    if walk.fill >= CHUNK && !flush(walk) {
        return 1;
    }
    0
}

/// Make the next iovec current. The bytes fill the iovecs in order, so those holding the
/// syscall's bytes are all inside the caller's array.
#[inline(always)]
fn next_iovec(walk: &mut Walk) -> bool {
    if walk.next_iovec == 0 {
        return false;
    }
    // SAFETY: probe read faults safely. struct iovec { void *iov_base; size_t iov_len; }.
    let Ok([base, left]) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user(walk.next_iovec as *const [u64; 2]) }) else {
        count(counters::CAPTURE_FAILED);
        return false;
    };
    walk.next_iovec += 16;
    walk.base = base;
    walk.left = left;
    true
}

/// Append `size` (at most the room left in the chunk) bytes at `walk.base` to the chunk.
#[inline(always)]
fn copy(walk: &mut Walk, size: u64) -> bool {
    let Some(scratch) = STREAM_SCRATCH.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU scratch value no one else uses while this program runs.
    let scratch = unsafe { &mut *scratch };
    let at = (walk.fill & (CHUNK - 1)) as usize;
    let size = if size > CHUNK { CHUNK as u32 } else { size as u32 };
    // SAFETY: at < CHUNK and size <= CHUNK: inside `data` (2 * CHUNK); the read faults safely.
    let rc = unsafe { bpf_probe_read_user(scratch.data.as_mut_ptr().add(at).cast(), size, walk.base as *const c_void) };
    if rc != 0 {
        count(counters::CAPTURE_FAILED);
        return false;
    }
    walk.fill += u64::from(size);
    true
}

/// Send the chunk and start the next one where it ends.
#[inline(always)]
fn flush(walk: &mut Walk) -> bool {
    let Some(scratch) = STREAM_SCRATCH.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU scratch value no one else uses while this program runs.
    let scratch = unsafe { &mut *scratch };
    let size = if walk.fill > CHUNK { CHUNK } else { walk.fill };
    scratch.head = walk.head;
    scratch.head.captured = size as u16;
    if walk.h2_server != 0 {
        http2_server::on_chunk(walk.conn_key, &walk.head, size);
    }
    walk.head.offset += size;
    walk.fill = 0;
    let total = core::mem::size_of::<StreamChunkHead>() + size as usize;
    // SAFETY: `total` <= size_of::<Scratch>(); the slice is the scratch value's bytes.
    let bytes = unsafe { core::slice::from_raw_parts((scratch as *const Scratch).cast::<u8>(), total) };
    match EVENTS.output::<[u8]>(bytes, wakeup_flags(total)) {
        Ok(()) => {
            count(counters::TRAFFIC_EVENTS);
            true
        }
        Err(_) => {
            count(counters::EVENTS_LOST);
            false
        }
    }
}
