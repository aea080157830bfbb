//! Clock readings in nanoseconds. Kernel events carry CLOCK_MONOTONIC (bpf_ktime_get_ns); spans
//! need wall-clock times.

/// Nanoseconds on `clock` (CLOCK_MONOTONIC, CLOCK_REALTIME).
pub fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}
