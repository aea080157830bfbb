//! Least privilege: the agent runs as root with exactly the capabilities the README and
//! deploy/overlays/capabilities list, every other one dropped from its bounding set (what a
//! container runtime does with `capabilities: {drop: [ALL], add: [...]}`), and traces a service of
//! another user fully; without a required capability it refuses to start and names it; without
//! the one an optional probe family needs, it gives up that family alone.

use std::time::{Duration, Instant};

use zerotel_tests::agent::{run_with_capabilities_until_exit, LISTED_CAPABILITIES};
use zerotel_tests::clients::KeepAliveClient;
use zerotel_tests::util::free_port;
use zerotel_tests::{curl, pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer, SpanKind, SPAN_TIMEOUT};

/// nobody:nogroup, a user whose processes root may inspect only with CAP_SYS_PTRACE and
/// CAP_DAC_READ_SEARCH.
const OTHER_USER: (u32, u32) = (65534, 65534);
/// Each family `zerotel_probe_attached` reports.
const FAMILIES: [&str; 3] = ["syscalls", "tls", "propagation"];

#[test]
fn traces_another_users_service_with_exactly_the_listed_capabilities() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start_as_user("backend.py", &[("OTEL_SERVICE_NAME", "nobodys-backend")], OTHER_USER);
    // Opened before the agent: taking it up reads the server's /proc/PID/fd and borrows its socket.
    let (mut client, first) = KeepAliveClient::connect_for(server.port(), &["/users/1", "/users/2"]);
    assert_eq!(first.status, 200, "first response: {first:?}");

    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let mut args = pid_args(&[server.pid()]);
    args.extend(["--propagation".to_owned(), "on".to_owned()]);
    let agent = Agent::start_with_capabilities(&LISTED_CAPABILITIES, &args, Some(&receiver));
    assert_eq!(effective_capabilities(agent.pid()), capability_bits(&LISTED_CAPABILITIES), "the agent's CapEff");

    let second = client.send_next();
    assert_eq!(second.status, 200, "second response: {second:?}");
    assert_eq!(first.local_port, second.local_port, "both requests must use one connection");
    assert_eq!(curl(&server.url("/users/3"), &[]).status, 200);

    let pid = server.pid();
    for path in ["/users/2", "/users/3"] {
        let span = receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, path), SPAN_TIMEOUT);
        // From the server's /proc/PID/environ, which only its user (or CAP_DAC_READ_SEARCH) reads.
        assert_eq!(span.service_name(), Some("nobodys-backend"), "span:\n  {span}");
    }
    let metrics = agent.metrics();
    for family in FAMILIES {
        let attached = agent.metric_sum_with("zerotel_probe_attached", &[("probe", family)]);
        assert_eq!(attached, 1, "{family} not attached with the listed capabilities:\n{metrics}");
    }
    let stderr = agent.stderr();
    assert!(!stderr.contains("probes off"), "a probe family is off with the listed capabilities:\n{stderr}");
}

#[test]
fn without_a_required_capability_it_refuses_and_names_it() {
    if !require_kernel() {
        return;
    }
    let traced = PyServer::start("backend.py");
    let required = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];
    for missing in required {
        let granted: Vec<&str> = LISTED_CAPABILITIES.into_iter().filter(|c| *c != missing).collect();
        let mut args = pid_args(&[traced.pid()]);
        args.extend(["--listen".to_owned(), format!("127.0.0.1:{}", free_port())]);
        let started = Instant::now();
        let output = run_with_capabilities_until_exit(&granted, &args, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started without CAP_{missing}; stderr:\n{stderr}");
        // Checked before anything loads: no verifier runs, no probe attaches.
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?} to refuse; stderr:\n{stderr}", started.elapsed());
        assert!(stderr.contains(&format!("zerotel lacks CAP_{missing} (to ")), "CAP_{missing} not named with its purpose:\n{stderr}");
        assert!(stderr.contains(&format!("--cap-add {missing};")), "no way to grant CAP_{missing}:\n{stderr}");
        for granted in granted {
            assert!(!stderr.contains(&format!("CAP_{granted} (")), "CAP_{granted} was granted, yet named:\n{stderr}");
        }
    }
}

#[test]
fn without_net_admin_propagation_alone_is_off_and_tracing_goes_on() {
    if !require_kernel() {
        return;
    }
    let server = PyServer::start("backend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let granted: Vec<&str> = LISTED_CAPABILITIES.into_iter().filter(|c| *c != "NET_ADMIN").collect();
    let mut args = pid_args(&[server.pid()]);
    // Even asked for explicitly, propagation cannot work without CAP_NET_ADMIN.
    args.extend(["--propagation".to_owned(), "on".to_owned()]);
    let agent = Agent::start_with_capabilities(&granted, &args, Some(&receiver));

    assert_eq!(curl(&server.url("/users/7"), &[]).status, 200);
    let pid = server.pid();
    let span = receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, "/users/7"), SPAN_TIMEOUT);
    assert_eq!(span.name, "GET /users/*", "span:\n  {span}");

    let metrics = agent.metrics();
    let attached = |family| agent.metric_sum_with("zerotel_probe_attached", &[("probe", family)]);
    assert_eq!((attached("syscalls"), attached("tls"), attached("propagation")), (1, 1, 0), "{metrics}");
    assert_eq!(agent.metric_sum("zerotel_propagation_enabled"), 0, "{metrics}");
    let stderr = agent.stderr();
    let why = "propagation probes off, tracing goes on without them: zerotel lacks CAP_NET_ADMIN (to ";
    assert_eq!(stderr.matches(why).count(), 1, "one line must say why propagation is off:\n{stderr}");
}

/// The effective set of process `pid`, from /proc/PID/status.
fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the agent's status");
    let hex = status.lines().find_map(|line| line.strip_prefix("CapEff:")).expect("CapEff line");
    u64::from_str_radix(hex.trim(), 16).expect("CapEff is hex")
}

/// capabilities(7) numbers of the names the tests use.
fn capability_bits(names: &[&str]) -> u64 {
    names
        .iter()
        .map(|name| match *name {
            "DAC_READ_SEARCH" => 2,
            "NET_ADMIN" => 12,
            "SYS_PTRACE" => 19,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("no bit known for CAP_{other}"),
        })
        .fold(0, |bits, bit| bits | 1 << bit)
}
