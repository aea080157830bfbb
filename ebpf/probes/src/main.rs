//! zerotel's kernel programs.
//!
//! Only tracepoints, uprobes (OpenSSL) and socket programs: they exist on every kernel and keep
//! working where kprobes, fentry and `bpf_probe_write_user` are unavailable (locked-down kernels,
//! CONFIG_KPROBES=n).
//! Every program returns at its first map lookup for processes that are not traced.
#![no_std]
#![no_main]
// Atomic add on map values (BPF_ATOMIC): core's atomic types lack fetch_add on this target.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod classify;
mod conns;
mod http2_server;
mod kafka;
mod context;
mod maps;
mod postgres;
mod process;
mod propagation;
mod propagation_h2;
mod stream;
mod syscalls;
mod tcp_option;
mod tls;
mod upgrade;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only satisfies no_std.
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";
