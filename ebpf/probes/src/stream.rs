//! Whole-stream capture for protocols the agent frames itself (Kafka): a syscall's bytes, up to
//! `STREAM_SYSCALL_CAP`, go to the agent in `StreamChunk` records, across every iovec. The copy
//! loop runs in `bpf_loop` with its state in a per-CPU map, so the verifier checks one iteration.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_probe_read_user};
use zerotel_abi::{
    buffer, counters, kind, EventHeader, InFlight, StreamChunk, StreamChunkHead, STREAM_CHUNK_BYTES, STREAM_SYSCALL_CAP,
};

use crate::maps::{count, EVENTS, STREAM_SCRATCH, STREAM_WALK};

/// Loop iterations per syscall: the 64 chunks of `STREAM_SYSCALL_CAP` plus as many iovecs.
const MAX_STEPS: u32 = 128;

/// Where the copy of one syscall's bytes stands.
#[repr(C)]
pub struct Walk {
    head: StreamChunkHead,
    /// The next `struct iovec` to read (0 for a plain buffer or after the last one).
    next_iovec: u64,
    /// The part of the current buffer not copied yet.
    base: u64,
    left: u64,
    /// Bytes still to copy (at most the cap).
    remaining: u64,
    /// Ring-buffer flags of the syscall's last record (earlier ones never wake the agent).
    wakeup: u64,
}

/// Send the bytes `call` moved (`len` of them, the first at stream offset `offset`).
#[inline(always)]
pub fn capture(call: &InFlight, conn_id: u64, len: u64, offset: u64, header: EventHeader, wakeup: u64) {
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
            conn_id,
            start_ns: call.start_ns,
            offset,
            syscall_end: offset + len,
            direction: call.direction,
            _pad: 0,
            captured: 0,
            _pad2: 0,
        },
        next_iovec,
        base,
        left,
        remaining: if len < STREAM_SYSCALL_CAP { len } else { STREAM_SYSCALL_CAP },
        wakeup,
    };
    // SAFETY: a helper call; `step` finds its state in STREAM_WALK.
    unsafe {
        bpf_loop(MAX_STEPS, step as *mut c_void, core::ptr::null_mut(), 0);
    }
}

/// Move to the next iovec, or copy one chunk of the current buffer. Returns 1 to stop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = STREAM_WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: the per-CPU value `capture` filled; nothing else runs on this CPU meanwhile.
    let walk = unsafe { &mut *walk };
    if walk.remaining == 0 {
        return 1;
    }
    if walk.left == 0 {
        // The bytes fill the iovecs in order: those holding `len` bytes are all inside the array.
        if walk.next_iovec == 0 {
            return 1;
        }
        // SAFETY: probe read faults safely. struct iovec { void *iov_base; size_t iov_len; }.
        let Ok([base, left]) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user(walk.next_iovec as *const [u64; 2]) })
        else {
            count(counters::CAPTURE_FAILED);
            return 1;
        };
        walk.next_iovec += 16;
        walk.base = base;
        walk.left = left;
        return 0;
    }
    let mut size = if walk.left < walk.remaining { walk.left } else { walk.remaining };
    if size > STREAM_CHUNK_BYTES as u64 {
        size = STREAM_CHUNK_BYTES as u64;
    }
    if !emit(walk, size as u32) {
        return 1;
    }
    walk.base += size;
    walk.left -= size;
    walk.remaining -= size;
    walk.head.offset += size;
    0
}

/// Send `size` bytes at `walk.base` as one record.
#[inline(always)]
fn emit(walk: &Walk, size: u32) -> bool {
    let Some(record) = STREAM_SCRATCH.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU scratch value no one else uses while this program runs.
    let record = unsafe { &mut *record };
    let size = size & (2 * STREAM_CHUNK_BYTES as u32 - 1);
    let size = if size > STREAM_CHUNK_BYTES as u32 { STREAM_CHUNK_BYTES as u32 } else { size };
    // SAFETY: size <= STREAM_CHUNK_BYTES = data's length; the read faults safely.
    let rc = unsafe { bpf_probe_read_user(record.data.as_mut_ptr().cast(), size, walk.base as *const c_void) };
    if rc != 0 {
        count(counters::CAPTURE_FAILED);
        return false;
    }
    record.head = walk.head;
    record.head.captured = size as u16;
    let last = u64::from(size) == walk.remaining;
    let flags = if last { walk.wakeup } else { aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64 };
    let total = StreamChunk::HEAD_SIZE + size as usize;
    // SAFETY: `total` <= size_of::<StreamChunk>(); the slice is the scratch value's bytes.
    let bytes = unsafe { core::slice::from_raw_parts((record as *const StreamChunk).cast::<u8>(), total) };
    match EVENTS.output::<[u8]>(bytes, flags) {
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
