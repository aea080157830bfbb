//! PostgreSQL: walk the message headers in a syscall's bytes (type byte + big-endian int32 length)
//! with `bpf_loop`, so message boundaries survive reads of any size, and report every message but
//! the bulk ones (DataRow, CopyData: only counted) with the first bytes of its body. The stream
//! position between syscalls (rest of a message, a header split in two) lives in the connection.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_probe_read_user};
use zerotel_abi::{
    counters, direction, kind, protocol, role, ConnState, EventHeader, PgMessageEvent, PgMessageHead, PgStream, PG_BODY,
    PG_UNTYPED,
};

use crate::maps::{count, wakeup_flags, EVENTS, PG_SCRATCH, PG_WALK};

/// `pg_startup` bits: the frontend's next message is untyped (StartupMessage, SSLRequest...).
pub const STARTUP_UNTYPED: u8 = 1;
/// ... the backend owes the one-byte answer to an SSLRequest or GSSENCRequest.
const STARTUP_ANSWER: u8 = 2;

const PROTOCOL_3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Most messages one syscall's bytes are walked for (a 64 KiB read of tiny DataRows is ~6k).
const MAX_MESSAGES: u32 = 1 << 16;
/// A length field above this is not PostgreSQL (the server's own limit is 1 GiB).
const MAX_MESSAGE_LEN: u32 = 1 << 30;

/// Does a connection's first payload open a PostgreSQL session? `len` then `code`, big-endian.
#[inline(always)]
pub fn is_startup(prefix: &[u8; 8]) -> bool {
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let code = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    match code {
        PROTOCOL_3 => (8..10_000).contains(&len),
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        _ => false,
    }
}

/// Does a connection the agent found open when it started (its startup long gone) carry a
/// PostgreSQL frontend message now? A type byte clients send first in an exchange (Query, Parse,
/// Bind, Describe, Execute, Sync, Close, Flush) and a plausible length.
#[inline(always)]
pub fn is_frontend_message(prefix: &[u8; 8]) -> bool {
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    matches!(prefix[0], b'Q' | b'P' | b'B' | b'D' | b'E' | b'S' | b'C' | b'H') && (4..1 << 20).contains(&len)
}

/// What one walk of a syscall's bytes needs. It lives in a per-CPU map, not on the stack: the
/// verifier tracks no exact values in map memory, so the loop body's states converge at once
/// instead of being replayed per message.
#[repr(C)]
pub struct Walk {
    data: u64,
    len: u64,
    /// Where the next header starts in `data`.
    offset: u64,
    stream: PgStream,
    record: Record,
    /// Set when the bytes are not PostgreSQL after all.
    desync: u64,
}

/// The fields every record of this syscall shares.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Record {
    header: EventHeader,
    conn_id: u64,
    start_ns: u64,
    direction: u64,
    /// Backend direction: DataRow is bulk there (in the frontend 'D' is Describe).
    backend: u64,
}

/// Report the messages in `len` bytes at `data` (moved by one syscall) and keep the stream's place.
#[inline(always)]
pub fn walk(conn: &mut ConnState, dir: u8, data: u64, len: u64, header: EventHeader, start_ns: u64) {
    let index = (dir & 1) as usize;
    let backend = (conn.role == role::CLIENT) == (dir == direction::INGRESS);
    let Some(walk) = PG_WALK.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU value no one else uses while this program runs.
    let walk = unsafe { &mut *walk };
    *walk = Walk {
        data,
        len,
        offset: 0,
        stream: conn.pg[index],
        record: Record { header, conn_id: conn.conn_id, start_ns, direction: dir as u64, backend: backend as u64 },
        desync: 0,
    };
    walk.offset = startup(conn, walk, backend);
    if walk.offset == 0 && walk.stream.partial_len == 0 {
        // The rest of a message started in an earlier syscall comes first (maybe all of this one).
        walk.offset = walk.stream.skip as u64;
        walk.stream.skip = 0;
    }
    // SAFETY: a helper call; `step` finds its state in PG_WALK.
    unsafe {
        bpf_loop(MAX_MESSAGES, step as *mut c_void, core::ptr::null_mut(), 0);
    }
    if walk.desync != 0 {
        conn.protocol = protocol::OTHER;
        count(counters::CAPTURE_FAILED);
        return;
    }
    conn.pg[index] = walk.stream;
}

/// The untyped startup messages, and the one-byte answer to SSLRequest: the offset after them.
#[inline(always)]
fn startup(conn: &mut ConnState, walk: &mut Walk, backend: bool) -> u64 {
    if backend && conn.pg_startup & STARTUP_ANSWER != 0 {
        conn.pg_startup &= !STARTUP_ANSWER;
        // SAFETY: probe read faults safely.
        let answer: u8 = unsafe { aya_ebpf::helpers::bpf_probe_read_user(walk.data as *const u8) }.unwrap_or(0);
        emit(&walk.record, answer, 0, 0, 0, 0);
        if answer == b'S' {
            // TLS from here on: the session starts over in the plaintext the uprobes see.
            let header = walk.record.header;
            crate::tls::mark(conn, (u64::from(header.pid) << 32) | u64::from(header.tid));
        } else if answer != b'N' {
            conn.protocol = protocol::OTHER; // GSS encryption
        }
        return 1;
    }
    if backend || conn.pg_startup & STARTUP_UNTYPED == 0 || walk.len < 8 {
        return 0;
    }
    // SAFETY: probe read faults safely.
    let Ok(head) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user(walk.data as *const [u8; 8]) }) else {
        return 0;
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    match code {
        PROTOCOL_3 => conn.pg_startup &= !STARTUP_UNTYPED,
        SSL_REQUEST | GSSENC_REQUEST => conn.pg_startup |= STARTUP_ANSWER,
        _ => {
            conn.protocol = protocol::OTHER; // CancelRequest: nothing to trace
            return 0;
        }
    }
    let body = if (len as u64) < walk.len { len as u64 - 4 } else { walk.len - 4 };
    emit(&walk.record, PG_UNTYPED, len, 0, walk.data + 4, body);
    len as u64
}

/// One message: read its header (completing one split by the previous syscall), report it unless
/// bulk, move to the next. Returns 1 to stop the loop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = PG_WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: the per-CPU value `walk` filled; nothing else runs on this CPU meanwhile.
    let walk = unsafe { &mut *walk };
    if walk.offset >= walk.len {
        walk.stream.skip = (walk.offset - walk.len) as u32;
        return 1;
    }
    let have = (walk.stream.partial_len & 7) as u64;
    let Some((msg_type, len, body_at)) = header(walk, have) else {
        return 1;
    };
    walk.stream.partial_len = 0;
    if len < 4 || len > MAX_MESSAGE_LEN {
        walk.desync = 1;
        return 1;
    }
    let body_len = (len - 4) as u64;
    let backend = walk.record.backend != 0;
    let bulk = msg_type == b'd' || (backend && msg_type == b'D');
    if bulk {
        walk.stream.bulk += 1;
    } else if is_reported(msg_type, backend) {
        let in_buffer = walk.len - body_at;
        let captured = if body_len < in_buffer { body_len } else { in_buffer };
        emit(&walk.record, msg_type, len, walk.stream.bulk, walk.data + body_at, captured);
        walk.stream.bulk = 0;
    }
    walk.offset = body_at + body_len;
    0
}

/// Messages spans are made of (statements, their outcomes, unit boundaries); the others
/// (descriptions, acknowledgements of Bind/Close, parameter reports, notices, authentication)
/// would only cost the agent decoding.
#[inline(always)]
fn is_reported(msg_type: u8, backend: bool) -> bool {
    if backend {
        !matches!(msg_type, b'2' | b'3' | b'T' | b'n' | b't' | b'S' | b'K' | b'N' | b'A' | b'R' | b'v')
    } else {
        !matches!(msg_type, b'H' | b'D' | b'p')
    }
}

/// The header at `walk.offset` (its first `have` bytes came in the previous syscall): type,
/// length, and where the body starts. None when the header is cut by the buffer's end (kept for
/// the next syscall).
#[inline(always)]
fn header(walk: &mut Walk, have: u64) -> Option<(u8, u32, u64)> {
    // Room for `have` (<= 4) bytes kept plus `need` (<= 5) read, with bounds the verifier can
    // check from masks alone.
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        if (i as u64) < have {
            bytes[i] = walk.stream.partial[i];
        }
        i += 1;
    }
    let need = 5 - have;
    let left = walk.len - walk.offset;
    if left < need {
        // Keep what there is: the header completes in the next syscall.
        let mut j = 0u64;
        while j < 4 {
            if j < left {
                // SAFETY: probe read faults safely.
                let b: u8 = unsafe { aya_ebpf::helpers::bpf_probe_read_user((walk.data + walk.offset + j) as *const u8) }
                    .unwrap_or(0);
                walk.stream.partial[((have + j) & 3) as usize] = b;
            }
            j += 1;
        }
        walk.stream.partial_len = (have + left) as u8;
        walk.stream.skip = 0;
        return None;
    }
    // SAFETY: at most 7 bytes at offset at most 7 of a 16-byte buffer; the read faults safely.
    let rc = unsafe {
        bpf_probe_read_user(
            bytes.as_mut_ptr().add((have & 7) as usize).cast(),
            (need & 7) as u32,
            (walk.data + walk.offset) as *const c_void,
        )
    };
    if rc != 0 {
        walk.desync = 1;
        return None;
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Some((bytes[0], len, walk.offset + need))
}

/// Send one message record with up to `PG_BODY` bytes of body read from `body`.
#[inline(always)]
fn emit(record: &Record, msg_type: u8, len: u32, bulk_before: u32, body: u64, body_len: u64) {
    let Some(event) = PG_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU scratch value no one else uses while this program runs.
    let event = unsafe { &mut *event };
    let size = if body_len > PG_BODY as u64 { PG_BODY as u32 } else { body_len as u32 };
    let mut header = record.header;
    header.kind = kind::PG_MESSAGE;
    event.head = PgMessageHead {
        header,
        conn_id: record.conn_id,
        start_ns: record.start_ns,
        len,
        bulk_before,
        direction: record.direction as u8,
        msg_type,
        captured: 0,
        _pad: 0,
    };
    // SAFETY: size <= PG_BODY = body's length; the read faults safely.
    let rc = unsafe { bpf_probe_read_user(event.body.as_mut_ptr().cast(), size, body as *const c_void) };
    event.head.captured = if rc == 0 { size as u16 } else { 0 };
    let total = PgMessageEvent::HEAD_SIZE + (event.head.captured as usize).min(PG_BODY);
    // SAFETY: `total` <= size_of::<PgMessageEvent>(); the slice is the scratch value's bytes.
    let bytes = unsafe { core::slice::from_raw_parts((event as *const PgMessageEvent).cast::<u8>(), total) };
    match EVENTS.output::<[u8]>(bytes, wakeup_flags(total)) {
        Ok(()) => count(counters::TRAFFIC_EVENTS),
        Err(_) => count(counters::EVENTS_LOST),
    }
}
