//! What the agent needs from the host before anything loads: Linux capabilities in its effective
//! set, and on kernels before 5.11 a locked-memory limit its maps fit in. Checked up front so that
//! a missing one is named with what it is for, instead of surfacing as an EPERM from deep inside a
//! load, and so that a capability only an optional probe family uses turns that family off.

use std::fmt;

/// A Linux capability and what zerotel does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// As capabilities(7) names it.
    pub name: &'static str,
    /// Bit number in the capability sets (linux/capability.h).
    bit: u32,
    /// What the agent uses it for.
    pub purpose: &'static str,
    /// The kernel accepts CAP_SYS_ADMIN in its place for everything the agent does with it (the
    /// bpf() and perf checks fall back to CAP_SYS_ADMIN).
    sys_admin_stands_in: bool,
}

pub const BPF: Capability =
    Capability { name: "CAP_BPF", bit: 39, purpose: "load the eBPF programs and create their maps", sys_admin_stands_in: true };
pub const PERFMON: Capability = Capability {
    name: "CAP_PERFMON",
    bit: 38,
    purpose: "attach to tracepoints and uprobes, and read kernel memory from eBPF",
    sys_admin_stands_in: true,
};
pub const SYS_PTRACE: Capability = Capability {
    name: "CAP_SYS_PTRACE",
    bit: 19,
    purpose: "read other processes' /proc/PID/{exe,root,fd/*} and take up their connections open before zerotel started with pidfd_getfd",
    sys_admin_stands_in: false,
};
pub const DAC_READ_SEARCH: Capability = Capability {
    name: "CAP_DAC_READ_SEARCH",
    bit: 2,
    purpose: "read /proc/PID/{environ,fd} of other users' processes: their OTEL_SERVICE_NAME and connections open before zerotel started",
    sys_admin_stands_in: false,
};
pub const NET_ADMIN: Capability = Capability {
    name: "CAP_NET_ADMIN",
    bit: 12,
    purpose: "insert trace context into outgoing requests: the sockhash, sock_ops, sk_msg and sk_skb programs",
    sys_admin_stands_in: true,
};
pub const SYS_RESOURCE: Capability = Capability {
    name: "CAP_SYS_RESOURCE",
    bit: 24,
    purpose: "raise RLIMIT_MEMLOCK for the eBPF maps, which kernels before 5.11 charge to it",
    sys_admin_stands_in: false,
};
const SYS_ADMIN_BIT: u32 = 21;

/// Without these the agent cannot trace at all, or would make wrong spans.
pub const REQUIRED: [Capability; 4] = [BPF, PERFMON, SYS_PTRACE, DAC_READ_SEARCH];

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (to {})", self.name, self.purpose)
    }
}

/// The effective capability set of a process.
#[derive(Debug, Clone, Copy)]
pub struct Effective(u64);

impl Effective {
    /// This process's effective set, from /proc/self/status.
    pub fn of_this_process() -> std::io::Result<Self> {
        let status = procfs::process::Process::myself().and_then(|me| me.status()).map_err(std::io::Error::other)?;
        Ok(Self(status.capeff))
    }

    pub fn has(self, capability: Capability) -> bool {
        let set = |bit: u32| self.0 & (1 << bit) != 0;
        set(capability.bit) || (capability.sys_admin_stands_in && set(SYS_ADMIN_BIT))
    }

    /// Those of `wanted` this set lacks.
    pub fn missing(self, wanted: &[Capability]) -> Vec<Capability> {
        wanted.iter().copied().filter(|&capability| !self.has(capability)).collect()
    }
}

/// The capabilities this host needs besides [`REQUIRED`]: CAP_SYS_RESOURCE where the kernel
/// charges maps to RLIMIT_MEMLOCK and the limit is too low to raise without it.
pub fn required_here() -> Vec<Capability> {
    let mut required = REQUIRED.to_vec();
    if maps_charge_memlock() && !memlock_unlimited_allowed() {
        required.push(SYS_RESOURCE);
    }
    required
}

/// The message for missing capabilities: each with its purpose, then what to do.
pub fn describe_missing(missing: &[Capability]) -> String {
    let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
    let adds: Vec<String> = missing.iter().map(|c| format!("--cap-add {}", c.name.trim_start_matches("CAP_"))).collect();
    format!(
        "zerotel lacks {}. Grant {} (docker run {}; Kubernetes: securityContext.capabilities.add, as deploy/overlays/capabilities does), or run it privileged",
        list.join("; "),
        if missing.len() == 1 { "it" } else { "them" },
        adds.join(" "),
    )
}

/// Kernels before 5.11 charge eBPF maps to the creator's RLIMIT_MEMLOCK; later ones to its memory
/// cgroup. Read from the release (`uname -r`): what changed is accounting, which no feature probe
/// shows without creating maps.
pub fn maps_charge_memlock() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").is_ok_and(|release| release_before(&release, (5, 11)))
}

fn release_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut numbers = release.trim().split(['.', '-']).map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(got_major), Some(got_minor)) => (got_major, got_minor) < (major, minor),
        _ => false,
    }
}

/// Whether RLIMIT_MEMLOCK can be made unlimited without CAP_SYS_RESOURCE: only when the hard
/// limit already is.
fn memlock_unlimited_allowed() -> bool {
    memlock_limit().is_some_and(|limit| limit.rlim_max == libc::RLIM_INFINITY)
}

fn memlock_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0).then_some(limit)
}

/// On kernels that charge maps to RLIMIT_MEMLOCK, lift it: the ring buffer alone is 8 MiB, more
/// than most defaults (64 KiB to 8 MiB).
pub fn lift_memlock_limit() -> std::io::Result<()> {
    if !maps_charge_memlock() {
        return Ok(());
    }
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(capabilities: &[Capability]) -> Effective {
        Effective(capabilities.iter().fold(0, |bits, c| bits | 1 << c.bit))
    }

    #[test]
    fn names_exactly_the_missing_capabilities() {
        let effective = set(&[BPF, PERFMON, DAC_READ_SEARCH]);
        assert_eq!(effective.missing(&REQUIRED), vec![SYS_PTRACE]);
        assert_eq!(set(&REQUIRED).missing(&REQUIRED), vec![]);
        let message = describe_missing(&[SYS_PTRACE, BPF]);
        assert!(message.starts_with("zerotel lacks CAP_SYS_PTRACE (to read other processes'"), "{message}");
        assert!(message.contains("--cap-add SYS_PTRACE --cap-add BPF"), "{message}");
    }

    #[test]
    fn sys_admin_stands_in_for_the_bpf_and_perf_capabilities_only() {
        let admin = Effective(1 << SYS_ADMIN_BIT);
        assert!(admin.has(BPF) && admin.has(PERFMON) && admin.has(NET_ADMIN));
        assert_eq!(admin.missing(&REQUIRED), vec![SYS_PTRACE, DAC_READ_SEARCH]);
    }

    #[test]
    fn kernels_before_5_11_charge_maps_to_memlock() {
        assert!(release_before("5.10.0-28-amd64", (5, 11)));
        assert!(release_before("4.19.0", (5, 11)));
        assert!(!release_before("5.11.0", (5, 11)));
        assert!(!release_before("6.18.44-fc-v445\n", (5, 11)));
        assert!(!release_before("garbage", (5, 11)));
    }
}
