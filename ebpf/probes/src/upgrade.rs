//! HTTP/1.1 Upgrade to h2c (RFC 7540 §3.2): a `101 Switching Protocols` answer whose
//! Upgrade header names `h2c` makes the rest of the connection HTTP/2, from that answer's bytes on.
//! Other upgrades (WebSocket) stay HTTP/1 connections whose later bytes are only counted.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_loop, bpf_probe_read_user};

use crate::maps::UPGRADE_HEAD;

/// Bytes of a 101 answer searched for the token: its head is a status line and a few fields.
const HEAD: usize = 256;

/// A copy of a 101 answer's first bytes, scanned in `bpf_loop`.
#[repr(C)]
pub struct Head {
    /// Set by `scan_step` when the token is found.
    found: u64,
    /// The bytes, and room for the last compare.
    bytes: [u8; HEAD + 8],
}

/// Whether the response starting at `data` (`avail` bytes readable) is `101` switching to h2c.
#[inline(always)]
pub fn is_h2c_switch(data: u64, avail: u64) -> bool {
    // `HTTP/1.1 101 `: the status is bytes 9 to 11.
    // SAFETY: probe read faults safely.
    let status: [u8; 3] = unsafe { aya_ebpf::helpers::bpf_probe_read_user((data + 9) as *const [u8; 3]) }.unwrap_or([0; 3]);
    if avail < 16 || status != *b"101" {
        return false;
    }
    let Some(head) = UPGRADE_HEAD.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU value no one else uses while this program runs.
    let head = unsafe { &mut *head };
    let size = if avail < HEAD as u64 { avail as u32 } else { HEAD as u32 };
    // SAFETY: size <= HEAD < bytes.len(); the read faults safely.
    if unsafe { bpf_probe_read_user(head.bytes.as_mut_ptr().cast(), size, data as *const c_void) } != 0 {
        return false;
    }
    head.found = 0;
    // SAFETY: a helper call; `scan_step` finds its state in UPGRADE_HEAD.
    unsafe { bpf_loop(size - 5, scan_step as *mut c_void, core::ptr::null_mut(), 0) };
    head.found != 0
}

/// Whether ` h2c\r` (or `:h2c\r`, any case) starts at `index`: the Upgrade field's whole value.
/// Returns 1 to stop.
extern "C" fn scan_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(head) = UPGRADE_HEAD.get_ptr_mut(0) else { return 1 };
    // SAFETY: the per-CPU value `is_h2c_switch` filled.
    let head = unsafe { &mut *head };
    let at = (index & (HEAD as u64 - 1)) as usize;
    // SAFETY: at < HEAD and bytes holds HEAD + 8.
    let word = unsafe { core::ptr::read_unaligned(head.bytes.as_ptr().add(at).cast::<[u8; 5]>()) };
    // `| 0x20` lowercases ASCII letters.
    if (word[0] == b' ' || word[0] == b':') && word[1] | 0x20 == b'h' && word[2] == b'2' && word[3] | 0x20 == b'c' && word[4] == b'\r' {
        head.found = 1;
        return 1;
    }
    0
}
