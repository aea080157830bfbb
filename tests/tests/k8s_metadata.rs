//! Kubernetes metadata from real cgroups: a server placed in a kubelet-style cgroup v2 hierarchy
//! (systemd driver, containerd naming) gets `container.id` and `k8s.pod.uid` on its spans.

use std::path::{Path, PathBuf};

use zerotel_tests::{pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer, SpanKind, SPAN_TIMEOUT};

const CONTAINER_ID: &str = "9a3f1c0e5b7d2a4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d";
const POD_UID: &str = "3c2b1a09-8f7e-4d6c-b5a4-9382716f5e4d";

/// A cgroup directory tree created for the test and removed (leaf first) when dropped.
struct KubeletCgroup {
    dirs: Vec<PathBuf>,
}

impl KubeletCgroup {
    /// `<cgroup2>/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
    fn create(root: &Path) -> KubeletCgroup {
        let pod = POD_UID.replace('-', "_");
        let mut dirs = Vec::new();
        let mut path = root.to_path_buf();
        for part in [
            "kubepods.slice".to_owned(),
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{pod}.slice"),
            format!("cri-containerd-{CONTAINER_ID}.scope"),
        ] {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
                dirs.push(path.clone());
            }
        }
        KubeletCgroup { dirs }
    }

    fn leaf(&self) -> &Path {
        self.dirs.last().expect("created at least the container scope")
    }

    fn adopt(&self, pid: u32) {
        std::fs::write(self.leaf().join("cgroup.procs"), pid.to_string()).expect("move the server into its cgroup");
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // Processes must have left: the caller kills them first (see field order in the test).
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

#[test]
fn spans_of_a_containerized_server_carry_container_and_pod_ids() {
    if !require_kernel() {
        return;
    }
    let root = cgroup2_root().expect("a cgroup v2 mount");
    let cgroup = KubeletCgroup::create(&root);
    let server = PyServer::start("checkout.py");
    cgroup.adopt(server.pid());
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&pid_args(&[server.pid()]), Some(&receiver));
    assert_eq!(zerotel_tests::curl(&server.url("/users/3"), &[]).status, 200);
    let spans = receiver.wait_for(|s| s.iter().any(|x| x.is(SpanKind::Server, server.pid(), "/users/3")), SPAN_TIMEOUT);
    let span = spans.iter().find(|x| x.is(SpanKind::Server, server.pid(), "/users/3")).expect("server span");
    assert_eq!(span.resource_str("container.id"), Some(CONTAINER_ID), "resource: {:?}", span.resource);
    assert_eq!(span.resource_str("k8s.pod.uid"), Some(POD_UID), "resource: {:?}", span.resource);
    // Leave the cgroup empty before it is removed: agent, then server, then the directories.
    drop(agent);
    drop(server);
    drop(cgroup);
}
