//! Kubernetes: real servers run in kubelet-style cgroup v2 directories (systemd driver,
//! containerd naming) under the real cgroup2 mount, joined before they exec as a container
//! runtime does; their pods are served in real Kubernetes JSON by a fake API server the agent
//! reaches through a kubeconfig (no kube-apiserver runs here). Asserts the `k8s.*` attributes and
//! `service.name` on spans, that an excluded namespace yields no span and no kernel event, that a
//! pod added through the watch is picked up, and that an API outage does not stop tracing.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value as Json;
use zerotel_tests::{
    kube_api::{self, ContainerSpec, PodSpec},
    pid_args, require_kernel,
    util::{poll_until, TempDir},
    Agent, FakeKubeApi, OtlpReceiver, Protocol, PyServer, ReceivedSpan, SpanKind, SPAN_TIMEOUT,
};

const NODE: &str = "node-a";

/// A pod's cgroup with one container, created for the test and removed (leaf first) when dropped.
struct KubeletCgroup {
    dirs: Vec<PathBuf>,
}

impl KubeletCgroup {
    /// `<cgroup2>/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
    fn create(pod_uid: &str, container_id: &str) -> KubeletCgroup {
        let pod = pod_uid.replace('-', "_");
        let mut dirs = Vec::new();
        let mut path = cgroup2_root();
        for part in [
            "kubepods.slice".to_owned(),
            "kubepods-burstable.slice".to_owned(),
            format!("kubepods-burstable-pod{pod}.slice"),
            format!("cri-containerd-{container_id}.scope"),
        ] {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
                dirs.push(path.clone());
            }
        }
        KubeletCgroup { dirs }
    }

    fn container_dir(&self) -> &Path {
        self.dirs.last().expect("created at least the container scope")
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // Processes must have left: the caller kills them first.
            let _ = poll_until(Duration::from_secs(3), || std::fs::remove_dir(dir).is_ok() || !dir.exists());
        }
    }
}

fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let root = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    });
    root.expect("a cgroup v2 mount")
}

/// A pod: its API object, its cgroup, and a Python server running in its container.
struct PodUnderTest {
    server: PyServer,
    /// Dropped after the server (field order): the cgroup must be empty to go.
    _cgroup: KubeletCgroup,
    object: Json,
}

impl PodUnderTest {
    fn start(spec: &PodSpec) -> PodUnderTest {
        let container = &spec.containers[0];
        let cgroup = KubeletCgroup::create(spec.uid, container.container_id);
        let server = PyServer::start_in("app.py", &[], Some(cgroup.container_dir()));
        PodUnderTest { server, _cgroup: cgroup, object: kube_api::pod(spec) }
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }
}

/// Hex ids: unique per test run would need cleanup races; fixed ones are fine (one test binary).
const WEB_ID: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const DNS_ID: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
const JOB_ID: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";
const LONE_ID: &str = "d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4";
const WEB_UID: &str = "0a0a0a0a-1111-4222-8333-444444444444";
const DNS_UID: &str = "0b0b0b0b-1111-4222-8333-444444444444";
const JOB_UID: &str = "0c0c0c0c-1111-4222-8333-444444444444";
const LONE_UID: &str = "0d0d0d0d-1111-4222-8333-444444444444";

fn web_pod() -> PodSpec<'static> {
    PodSpec {
        namespace: "shop",
        name: "web-6f9c7d-x2k4q",
        uid: WEB_UID,
        node: NODE,
        labels: &[("app.kubernetes.io/name", "storefront"), ("pod-template-hash", "6f9c7d")],
        owner: Some(("ReplicaSet", "web-6f9c7d")),
        containers: &[ContainerSpec { name: "server", container_id: WEB_ID, env: &[] }],
    }
}

fn dns_pod() -> PodSpec<'static> {
    plain_pod("kube-system", "coredns-5d78c9869d-abcde", DNS_UID, &[ContainerSpec { name: "coredns", container_id: DNS_ID, env: &[] }])
}

fn job_pod() -> PodSpec<'static> {
    PodSpec {
        namespace: "pay-eu",
        name: "report-29000000-7fz2p",
        uid: JOB_UID,
        node: NODE,
        labels: &[],
        owner: Some(("Job", "report-29000000")),
        containers: &[ContainerSpec { name: "worker", container_id: JOB_ID, env: &[("OTEL_SERVICE_NAME", "nightly-report")] }],
    }
}

/// A pod without labels or owner.
fn plain_pod<'a>(namespace: &'a str, name: &'a str, uid: &'a str, containers: &'a [ContainerSpec<'a>]) -> PodSpec<'a> {
    PodSpec { namespace, name, uid, node: NODE, labels: &[], owner: None, containers }
}

fn kube_args(api: &FakeKubeApi, dir: &TempDir) -> Vec<String> {
    let kubeconfig = api.write_kubeconfig(dir.path());
    vec!["--node-name".into(), NODE.into(), "--kubeconfig".into(), kubeconfig.display().to_string()]
}

/// Request `path` until a SERVER span of `pid` for it arrives (the process may be selected a
/// moment after it started).
fn span_once_traced(receiver: &OtlpReceiver, server: &PyServer, path: &str) -> ReceivedSpan {
    let deadline = Instant::now() + SPAN_TIMEOUT;
    loop {
        assert_eq!(zerotel_tests::curl(&server.url(path), &[]).status, 200);
        let find = || receiver.spans().into_iter().find(|x| x.is(SpanKind::Server, server.pid(), path));
        if poll_until(Duration::from_millis(500), || find().is_some()) {
            return find().expect("found just now");
        }
        assert!(Instant::now() < deadline, "no span for {path} of pid {} within {SPAN_TIMEOUT:?}", server.pid());
    }
}

fn assert_resource(span: &ReceivedSpan, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        assert_eq!(span.resource_str(key), Some(*value), "{key} in resource {:?}", span.resource);
    }
}

#[test]
fn pods_are_selected_by_namespace_and_their_spans_carry_pod_metadata() {
    if !require_kernel() {
        return;
    }
    let api = FakeKubeApi::start();
    api.put_object(kube_api::replica_set("shop", "web-6f9c7d", &kube_api::owner_uid("ReplicaSet", "web-6f9c7d"), Some("web")));
    api.put_object(kube_api::job("pay-eu", "report-29000000", &kube_api::owner_uid("Job", "report-29000000"), Some("report")));
    let web = PodUnderTest::start(&web_pod());
    let dns = PodUnderTest::start(&dns_pod());
    api.upsert_pod(web.object.clone());
    api.upsert_pod(dns.object.clone());

    // The config file's rules: every namespace; kube-system stays out by default.
    let dir = TempDir::new("k8s-config");
    let config = dir.write("config.yaml", "include:\n  - k8s_namespace: \"*\"\n");
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend(kube_args(&api, &dir));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&args, Some(&receiver));
    assert!(poll_until(SPAN_TIMEOUT, || agent.metric_sum("zerotel_k8s_synced") == 1), "pod list never arrived");
    let watch = api.requests().into_iter().find(|r| r.contains("watch=true")).unwrap_or_default();
    assert!(watch.contains("fieldSelector=spec.nodeName%3Dnode-a"), "watch only this node's pods: {watch}");

    let span = span_once_traced(&receiver, &web.server, "/users/1");
    assert_resource(
        &span,
        &[
            ("service.name", "storefront"),
            ("service.namespace", "shop"),
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.name", "web-6f9c7d-x2k4q"),
            ("k8s.pod.uid", WEB_UID),
            ("k8s.container.name", "server"),
            ("k8s.node.name", NODE),
            ("k8s.replicaset.name", "web-6f9c7d"),
            ("k8s.deployment.name", "web"),
            ("container.id", WEB_ID),
        ],
    );

    // kube-system: requests answered, but nothing leaves the kernel for them.
    std::thread::sleep(Duration::from_millis(500)); // the web connection's close is counted too
    let events_before = agent.metric_sum("zerotel_kernel_traffic_events_total");
    for i in 0..5 {
        assert_eq!(zerotel_tests::curl(&dns.server.url(&format!("/users/{i}")), &[]).status, 200);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.metric_sum("zerotel_kernel_traffic_events_total"), events_before, "kernel events for an excluded pod");
    assert!(!receiver.spans().iter().any(|s| s.pid() == Some(dns.pid())), "spans of an excluded pod");

    // A pod that starts before the API lists it: its process waits, then is selected on the watch event.
    let job = PodUnderTest::start(&job_pod());
    std::thread::sleep(Duration::from_millis(300));
    let traced_before = agent.metric_sum("zerotel_processes_traced");
    let added = Instant::now();
    api.upsert_pod(job.object.clone());
    assert!(poll_until(SPAN_TIMEOUT, || agent.metric_sum("zerotel_processes_traced") > traced_before), "never selected");
    eprintln!("pod added through the watch: its process selected {:?} after the ADDED event", added.elapsed());
    let span = span_once_traced(&receiver, &job.server, "/users/7");
    assert_resource(
        &span,
        &[
            ("service.name", "nightly-report"),
            ("k8s.namespace.name", "pay-eu"),
            ("k8s.job.name", "report-29000000"),
            ("k8s.cronjob.name", "report"),
            ("k8s.container.name", "worker"),
        ],
    );
    assert_eq!(agent.metric_sum("zerotel_processes_pending"), 0);

    drop(agent);
    // Last created, first removed: `web` made the shared parent slices.
    drop(job);
    drop(dns);
    drop(web);
}

#[test]
fn an_api_outage_does_not_stop_tracing_and_metadata_follows_when_it_is_back() {
    if !require_kernel() {
        return;
    }
    let api = FakeKubeApi::start();
    let lone_spec = plain_pod("shop", "lone", LONE_UID, &[ContainerSpec { name: "app", container_id: LONE_ID, env: &[] }]);
    let lone = PodUnderTest::start(&lone_spec);
    api.upsert_pod(lone.object.clone());
    api.set_unavailable(true);

    let dir = TempDir::new("k8s-outage");
    let mut args = pid_args(&[lone.pid()]);
    args.extend(kube_args(&api, &dir));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&args, Some(&receiver));
    let span = span_once_traced(&receiver, &lone.server, "/users/1");
    assert_eq!(span.resource_str("k8s.namespace.name"), None, "no metadata while the API is down");
    assert_eq!(span.resource_str("k8s.pod.uid"), Some(LONE_UID), "the cgroup still names the pod");
    assert!(agent.metric_sum("zerotel_k8s_watch_errors_total") > 0);

    api.set_unavailable(false);
    assert!(poll_until(Duration::from_secs(60), || agent.metric_sum("zerotel_k8s_synced") == 1), "no list after the outage");
    let span = span_once_traced(&receiver, &lone.server, "/users/2");
    assert_resource(&span, &[("k8s.namespace.name", "shop"), ("k8s.pod.name", "lone"), ("service.name", "lone")]);

    drop(agent);
    drop(lone);
}

const SPAWNED_ID: &str = "f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6";
const SPAWNED_UID: &str = "0f0f0f0f-1111-4222-8333-555555555555";

/// A traced process starts a container as a runtime does (moves into the container's cgroup, then
/// execs): the kernel stops tracing it at that exec, and the pod, in kube-system, never sends an
/// event, though it serves requests.
#[test]
fn a_container_started_by_a_traced_process_in_an_excluded_namespace_sends_nothing() {
    if !require_kernel() {
        return;
    }
    let api = FakeKubeApi::start();
    let spec = plain_pod("kube-system", "metrics-server-abc", SPAWNED_UID, &[ContainerSpec { name: "server", container_id: SPAWNED_ID, env: &[] }]);
    api.upsert_pod(kube_api::pod(&spec));
    let cgroup = KubeletCgroup::create(SPAWNED_UID, SPAWNED_ID);
    let port = zerotel_tests::util::free_port();
    // The "runtime": traced from the start (--pid); after a second it joins the container's cgroup
    // and execs the server, which is what runc does.
    let procs = cgroup.container_dir().join("cgroup.procs");
    let python = zerotel_tests::servers::python_interpreter().display().to_string();
    let script = format!("sleep 1; echo 0 > {}; exec {python} -m http.server {port} --bind 127.0.0.1", procs.display());
    let mut runtime = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the runtime shell");
    let dir = TempDir::new("k8s-spawned");
    let mut args = pid_args(&[runtime.id()]);
    args.extend(kube_args(&api, &dir));
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let agent = Agent::start(&args, Some(&receiver));
    assert!(poll_until(SPAN_TIMEOUT, || zerotel_tests::util::port_is_open(port)), "the server never listened");
    let events_before = agent.metric_sum("zerotel_kernel_traffic_events_total");
    for i in 0..5 {
        assert_eq!(zerotel_tests::curl(&format!("http://127.0.0.1:{port}/?{i}"), &[]).status, 200);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.metric_sum("zerotel_kernel_traffic_events_total"), events_before, "kernel events for an excluded pod");
    assert!(!receiver.spans().iter().any(|s| s.pid() == Some(runtime.id())), "spans of an excluded pod");
    drop(agent);
    let _ = runtime.kill();
    let _ = runtime.wait();
    drop(cgroup);
}

const CHURN_ID: &str = "e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5";
const CHURN_UID: &str = "0e0e0e0e-1111-4222-8333-444444444444";

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// Processes and pods come and go: the agent selects each new process and forgets it on exit,
/// forgets deleted pods, and its memory does not grow with the churn.
#[test]
fn process_and_pod_churn_leaves_nothing_behind() {
    if !require_kernel() {
        return;
    }
    const PROCESSES: usize = 1500;
    const PODS: usize = 300;
    let api = FakeKubeApi::start();
    let spec = plain_pod("shop", "churn", CHURN_UID, &[ContainerSpec { name: "churn", container_id: CHURN_ID, env: &[] }]);
    api.upsert_pod(kube_api::pod(&spec));
    let cgroup = KubeletCgroup::create(CHURN_UID, CHURN_ID);
    let dir = TempDir::new("k8s-churn");
    let mut args = vec!["--k8s-namespace".to_owned(), "shop".to_owned()];
    args.extend(kube_args(&api, &dir));
    let agent = Agent::start(&args, None);
    assert!(poll_until(SPAN_TIMEOUT, || agent.metric_sum("zerotel_k8s_synced") == 1), "pod list never arrived");
    let churn = |n: usize| {
        let mut shell = std::process::Command::new("sh");
        shell.args(["-c", &format!("i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done")]);
        zerotel_tests::process::join_cgroup_before_exec(&mut shell, cgroup.container_dir());
        assert!(shell.status().expect("run the churning shell").success());
    };
    churn(200); // warm-up: caches and maps reach their working size
    let settled = || agent.metric_sum("zerotel_processes_traced") == 0 && agent.metric_sum("zerotel_processes_pending") == 0;
    assert!(poll_until(SPAN_TIMEOUT, settled), "warm-up processes not forgotten:\n{}", agent.metrics());
    let rss_before = rss_kib(agent.pid());

    churn(PROCESSES);
    for i in 0..PODS {
        let uid = format!("0f0f0f0f-1111-4222-8333-{i:012}");
        let name = format!("batch-{i}");
        let containers = [ContainerSpec { name: "job", container_id: CHURN_ID, env: &[] }];
        let pod = plain_pod("shop", &name, &uid, &containers);
        api.upsert_pod(kube_api::pod(&pod));
        api.delete_pod(&uid);
    }
    assert!(poll_until(SPAN_TIMEOUT, settled), "exited processes not forgotten:\n{}", agent.metrics());
    assert!(poll_until(SPAN_TIMEOUT, || agent.metric_sum("zerotel_k8s_pods") == 1), "deleted pods kept:\n{}", agent.metrics());
    let rss_after = rss_kib(agent.pid());
    eprintln!("agent RSS {rss_before} KiB -> {rss_after} KiB over {PROCESSES} processes and {PODS} pods");
    assert!(rss_after < rss_before + 4 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");
    drop(agent);
    drop(cgroup);
}
