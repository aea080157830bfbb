//! Which container and pod a process belongs to, from its cgroup path (/proc/PID/cgroup): the key
//! that joins a traced process to Kubernetes metadata. Pure parsing; the naming schemes differ by
//! runtime (containerd, CRI-O, Docker) and by cgroup driver (systemd slices or cgroupfs paths),
//! on cgroup v1 and v2.

use std::sync::LazyLock;

use regex::Regex;

/// What a cgroup path says about the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerRef {
    /// The runtime's 64-hex container id.
    pub container_id: Option<String>,
    /// The pod's UID (dashed form), for pods run by a kubelet.
    pub pod_uid: Option<String>,
}

/// A container id as runtimes name it in cgroup paths: `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`, `:cri-containerd:<id>`, or a bare `/<id>` segment.
static CONTAINER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:^|[/:-])(?:cri-containerd|crio|docker|containerd)?[-:]?([0-9a-f]{64})(?:\.scope)?(?:/|$)")
        .expect("static regex")
});

/// `pod<uid>` with dashes (cgroupfs) or underscores (systemd escapes '-' in slice names).
static POD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
        .expect("static regex")
});

/// Parse the contents of /proc/PID/cgroup. The v2 line (`0::`) wins; v1 lines are the fallback.
pub fn parse(contents: &str) -> ContainerRef {
    let paths = contents.lines().filter_map(|line| line.splitn(3, ':').nth(2));
    let mut best = ContainerRef::default();
    for path in paths {
        let found = parse_path(path);
        if found.container_id.is_some() {
            return found;
        }
        if best.pod_uid.is_none() {
            best = found;
        }
    }
    best
}

/// One cgroup path.
pub fn parse_path(path: &str) -> ContainerRef {
    // CRI-O's conmon runs beside the container in a scope of its own: it is not the container.
    let container_id = if path.contains("crio-conmon-") {
        None
    } else {
        CONTAINER.captures_iter(path).last().map(|c| c[1].to_owned())
    };
    let pod_uid = POD.captures(path).map(|c| c[1].replace('_', "-"));
    ContainerRef { container_id, pod_uid }
}

/// The container of `pid`, if it runs in one.
pub fn for_pid(pid: u32) -> ContainerRef {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|c| parse(&c)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4ffd5b6a0d5e8b3c7e5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";
    const UID: &str = "5b9c3f0e-1a2b-4c3d-8e9f-0a1b2c3d4e5f";

    fn expect(path: &str, container: Option<&str>, pod: Option<&str>) {
        let found = parse_path(path);
        assert_eq!(found.container_id.as_deref(), container, "container id of {path}");
        assert_eq!(found.pod_uid.as_deref(), pod, "pod uid of {path}");
    }

    #[test]
    fn containerd_with_systemd_slices() {
        let uid = UID.replace('-', "_");
        expect(
            &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{ID}.scope"),
            Some(ID),
            Some(UID),
        );
        expect(&format!("/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{ID}.scope"), Some(ID), Some(UID));
        // containerd's own systemd cgroup naming (`systemd_cgroup = true` with cgroupfs-style paths).
        expect(
            &format!("/system.slice/containerd.service/kubepods-besteffort-pod{uid}.slice:cri-containerd:{ID}"),
            Some(ID),
            Some(UID),
        );
    }

    #[test]
    fn cgroupfs_driver() {
        expect(&format!("/kubepods/burstable/pod{UID}/{ID}"), Some(ID), Some(UID));
        expect(&format!("/kubepods/pod{UID}/{ID}"), Some(ID), Some(UID));
        expect(&format!("/kubepods/besteffort/pod{UID}/{ID}"), Some(ID), Some(UID));
    }

    #[test]
    fn cri_o_and_its_conmon() {
        let uid = UID.replace('-', "_");
        expect(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/crio-{ID}.scope"), Some(ID), Some(UID));
        expect(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/crio-conmon-{ID}.scope"), None, Some(UID));
    }

    #[test]
    fn docker_without_kubernetes() {
        expect(&format!("/system.slice/docker-{ID}.scope"), Some(ID), None);
        expect(&format!("/docker/{ID}"), Some(ID), None);
    }

    #[test]
    fn not_in_a_container() {
        expect("/user.slice/user-0.slice/session-1.scope", None, None);
        expect("/", None, None);
        expect("/system.slice/nginx.service", None, None);
        // A 64-hex string inside a longer name is not a container id.
        expect(&format!("/system.slice/x{ID}y.service"), None, None);
    }

    #[test]
    fn v2_line_wins_and_v1_lines_work() {
        let v1 = format!("12:pids:/kubepods/burstable/pod{UID}/{ID}\n11:memory:/kubepods/burstable/pod{UID}/{ID}\n");
        assert_eq!(parse(&v1), ContainerRef { container_id: Some(ID.into()), pod_uid: Some(UID.into()) });
        let hybrid = format!("1:name=systemd:/user.slice\n0::/kubepods/pod{UID}/{ID}\n");
        assert_eq!(parse(&hybrid).container_id.as_deref(), Some(ID));
        assert_eq!(parse("0::/\n"), ContainerRef::default());
        assert_eq!(parse("garbage without colons\n::\n"), ContainerRef::default());
    }
}
