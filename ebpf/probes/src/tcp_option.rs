//! Trace context across TLS in a TCP header option: the bytes are ciphertext, so sk_msg cannot
//! insert a header, and lockdown forbids writing the application's memory. A traced client's
//! HTTP/1 request over TLS puts its CLIENT span's context in a TCP option on its connection's
//! data segments; the receiving host's sock_ops reads it as they arrive, and the request its
//! traced server then reads continues that trace. Agent to agent only: both ends traced by
//! zerotel, and nothing between them that ends TCP (an L7 proxy, a TLS-terminating balancer) or
//! strips unknown options.
//!
//! The option: kind 25 (unassigned), length 27, trace id, span id, trace flags. 27 bytes fit
//! beside timestamps in the 40 TCP allows; when they do not (SACK blocks), the segment goes
//! without, and the request is not linked.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::generated::{bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_store_hdr_opt},
    programs::SockOpsContext,
};
use zerotel_abi::{socket_key, SpanIds};

use crate::maps::{TCP_OPTION_IN, TCP_OPTION_OUT};

const KIND: u8 = 25;
const LEN: usize = 27;
const AF_INET6: u32 = 10;

/// An option as it goes on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpOption {
    bytes: [u8; LEN],
}

/// A traced client's request is going out on the connection `key`: its segments carry `ids`.
#[inline(always)]
pub fn send(key: u64, ids: &SpanIds) {
    let mut bytes = [0u8; LEN];
    bytes[0] = KIND;
    bytes[1] = LEN as u8;
    bytes[2..18].copy_from_slice(&ids.trace_id);
    bytes[18..26].copy_from_slice(&ids.span_id);
    bytes[26] = ids.flags;
    let _ = TCP_OPTION_OUT.insert(&key, &TcpOption { bytes }, 0);
}

/// The context the last segments of connection `key` brought, as the parent in `ids`; consumed.
#[inline(always)]
pub fn received(key: u64, ids: &mut SpanIds) -> bool {
    // SAFETY: a plain value, copied out before removal.
    let Some(option) = (unsafe { TCP_OPTION_IN.get(&key) }).copied() else { return false };
    let _ = TCP_OPTION_IN.remove(&key);
    ids.trace_id.copy_from_slice(&option.bytes[2..18]);
    ids.parent_id.copy_from_slice(&option.bytes[18..26]);
    ids.flags = option.bytes[26];
    ids.trace_id != [0; 16] && ids.parent_id != [0; 8]
}

/// A traced process's connection is established: its segments may carry an option.
#[inline(always)]
pub fn writing(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
}

/// The header-option callbacks of sock_ops; true when `op` was one.
#[inline(always)]
pub fn on_sock_ops(ctx: &SockOpsContext, op: u32) -> bool {
    match op {
        // Any host's server may be a traced one's: read unknown options on every accepted
        // connection (the callback runs only for segments that carry one).
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG) as i32);
            false
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => {
            // Data segments only: acknowledgements carry nothing.
            // SAFETY: the context's own fields.
            let payload = unsafe { (*ctx.ops).skb_len } > 0;
            // SAFETY: only compared against None.
            if payload && unsafe { TCP_OPTION_OUT.get(&key_of(ctx)) }.is_some() {
                // SAFETY: the context's own socket.
                unsafe { bpf_reserve_hdr_opt(ctx.ops, LEN as u32, 0) };
            }
            true
        }
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => {
            // SAFETY: the context's own fields.
            let payload = unsafe { (*ctx.ops).skb_len } > 0;
            // SAFETY: a plain value, read in place.
            if let Some(option) = payload.then(|| unsafe { TCP_OPTION_OUT.get(&key_of(ctx)) }).flatten() {
                // SAFETY: LEN bytes of map memory; the helper fails (and writes nothing) without room.
                unsafe { bpf_store_hdr_opt(ctx.ops, option.bytes.as_ptr().cast(), LEN as u32, 0) };
            }
            true
        }
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => {
            let mut option = TcpOption { bytes: [0; LEN] };
            option.bytes[0] = KIND;
            // SAFETY: LEN bytes of stack; the first names the kind searched for.
            let found = unsafe { bpf_load_hdr_opt(ctx.ops, option.bytes.as_mut_ptr().cast(), LEN as u32, 0) };
            if found == LEN as i64 && option.bytes[1] == LEN as u8 {
                let _ = TCP_OPTION_IN.insert(&key_of(ctx), &option, 0);
            }
            true
        }
        _ => false,
    }
}

/// [`socket_key`] of the context's socket, as its own end sees it.
#[inline(always)]
fn key_of(ctx: &SockOpsContext) -> u64 {
    // Whole 32-bit loads: the verifier refuses narrower ones of these context fields.
    let field = |at: *const u32| -> u32 {
        // SAFETY: a field of the kernel's bpf_sock_ops context.
        unsafe { core::ptr::read_volatile(at) }
    };
    let ops = ctx.ops;
    // SAFETY: field addresses only, read above.
    let (family, local_port, raw_port) =
        unsafe { (field(&raw const (*ops).family), field(&raw const (*ops).local_port), field(&raw const (*ops).remote_port)) };
    let mut remote = [0u8; 16];
    if family == AF_INET6 {
        let mut i = 0;
        while i < 4 {
            // SAFETY: as above.
            let word = field(unsafe { &raw const (*ops).remote_ip6[i] });
            remote[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            i += 1;
        }
    } else {
        // SAFETY: as above.
        remote[..4].copy_from_slice(&field(unsafe { &raw const (*ops).remote_ip4 }).to_ne_bytes());
    }
    // remote_port holds the port in network order, shifted up 16 bits on little-endian hosts.
    let remote_port = u16::from_be(if raw_port > 0xffff { (raw_port >> 16) as u16 } else { raw_port as u16 });
    socket_key(family as u16, local_port as u16, remote_port, &remote)
}
