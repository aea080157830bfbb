//! Export under faults: a backend that is away for a while, then back; a backend that never
//! answers. The agent's memory stays within its queue bound, the traced application does not
//! notice, export resumes, and every span is either received or counted as dropped.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use zerotel_tests::util::{free_port, poll_until};
use zerotel_tests::{curl_args_many, pid_args, require_kernel, run_curl, Agent, Nginx, OtlpReceiver, Protocol, SpanKind, SPAN_TIMEOUT};

const QUEUE: u64 = 300;

/// `n` requests on one keep-alive connection; each one is a SERVER span of `server`.
fn requests(server: &Nginx, n: usize) -> Duration {
    let url = server.url("/ok");
    let urls = vec![url.as_str(); n];
    let started = Instant::now();
    let results = run_curl(&curl_args_many(&urls, &[]));
    let took = started.elapsed();
    assert_eq!(results.len(), n);
    assert!(results.iter().all(|r| r.status == 200), "the application must not notice the backend");
    took
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

fn agent_args(server: &Nginx, endpoint: &str) -> Vec<String> {
    let mut args = pid_args(&server.pids());
    args.extend(["--otlp-endpoint", endpoint, "--otlp-protocol", "grpc", "--export-queue-size"].map(String::from));
    args.push(QUEUE.to_string());
    args
}

/// spans made == spans received + spans dropped, and the agent's count of exported spans is
/// what the backend got.
fn assert_every_span_accounted(agent: &Agent, received: u64) {
    let made = agent.metric_sum("zerotel_spans_total");
    let exported = agent.metric_sum("zerotel_spans_exported_total");
    let dropped = agent.metric_sum("zerotel_spans_dropped_total");
    assert_eq!(exported, received, "exported as counted by the agent vs received:\n{}", agent.metrics());
    assert_eq!(made, received + dropped, "every span is received or counted as dropped:\n{}", agent.metrics());
}

#[test]
fn backend_away_then_back_bounded_memory_exact_drops_and_resumed_export() {
    if !require_kernel() {
        return;
    }
    let server = Nginx::start();
    let backend = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = Agent::start(&agent_args(&server, &format!("http://{backend}")), None);
    let rss_before = rss_mib(agent.pid());

    // 40 s without a backend: past the point where the backoff reaches its 30 s cap
    // (1 + 2 + 4 + 8 + 16 s), with four times the queue's worth of requests meanwhile.
    let outage = Instant::now();
    let mut made = 0;
    let mut peak_rss = rss_before;
    for _ in 0..4 {
        requests(&server, 300);
        made += 300;
        thread::sleep(Duration::from_secs(2));
        let queued = agent.metric_sum("zerotel_export_queue_spans");
        assert!(queued <= QUEUE, "the queue holds at most {QUEUE} spans, holds {queued}");
        peak_rss = peak_rss.max(rss_mib(agent.pid()));
    }
    while outage.elapsed() < Duration::from_secs(40) {
        thread::sleep(Duration::from_secs(2));
        peak_rss = peak_rss.max(rss_mib(agent.pid()));
    }
    assert!(poll_until(SPAN_TIMEOUT, || agent.metric_sum("zerotel_spans_total") >= made), "{}", agent.metrics());
    assert_eq!(agent.metric_sum("zerotel_spans_exported_total"), 0);
    assert!(agent.metric_sum("zerotel_export_retries_total") >= 4, "retried with backoff:\n{}", agent.metrics());
    // The last spans may still be on their way from assembly to the queue: wait for them.
    let dropped_what_did_not_fit = poll_until(SPAN_TIMEOUT, || agent.metric_sum("zerotel_spans_dropped_total") == made - QUEUE);
    assert!(dropped_what_did_not_fit, "exactly what did not fit the queue is dropped:\n{}", agent.metrics());
    assert!(peak_rss - rss_before < 16.0, "RSS grew from {rss_before:.1} to {peak_rss:.1} MiB while the backend was away");

    // The backend comes back where the agent sends: the held spans go out at the next retry
    // (at most 36 s away: the 30 s cap plus jitter).
    let receiver = OtlpReceiver::start_at(Protocol::Grpc, backend);
    let held = receiver.wait_for(|spans| spans.len() as u64 >= QUEUE, Duration::from_secs(45));
    assert_eq!(held.len() as u64, QUEUE, "the queue's worth, once each");
    assert_every_span_accounted(&agent, receiver.spans().len() as u64);
    assert_eq!(agent.metric_sum("zerotel_export_queue_spans"), 0);

    // And new spans flow again, promptly.
    let url = server.url("/static/file.bin");
    assert_eq!(run_curl(&curl_args_many(&[url.as_str()], &[]))[0].status, 200);
    let worker = server.pids()[1];
    receiver.wait_for_span(|s| s.is(SpanKind::Server, worker, "/static/file.bin"), SPAN_TIMEOUT);
    assert_every_span_accounted(&agent, receiver.spans().len() as u64);
}

/// Accepts connections and never answers: the worst backend, one that hangs.
fn silent_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            let mut reader = stream.try_clone().expect("clone");
            // Read and discard so the client's writes never block on a full window.
            thread::spawn(move || while reader.read(&mut [0; 4096]).is_ok_and(|n| n > 0) {});
            held.push(stream);
        }
    });
    addr
}

#[test]
fn a_hanging_backend_slows_neither_the_application_nor_event_reading() {
    if !require_kernel() {
        return;
    }
    let server = Nginx::start();
    // Untraced first: the application's own time for the same work.
    requests(&server, 100);
    let untraced = requests(&server, 600);

    let backend = silent_backend();
    let agent = Agent::start_with_env(
        &agent_args(&server, &format!("http://{backend}")),
        None,
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "2000")],
    );
    let traced = requests(&server, 600);
    // The traced run pays the tracing itself, never the backend: a blocked pipeline would stall
    // the application (it does not here: the kernel never waits for the agent) or stop the
    // reading of events, which the next assertion would catch.
    assert!(
        traced < untraced * 3 + Duration::from_secs(2),
        "600 requests took {traced:?} traced with a hanging backend, {untraced:?} untraced"
    );
    assert!(
        poll_until(SPAN_TIMEOUT, || agent.metric_sum("zerotel_spans_total") >= 600),
        "every request still became a span while export hung:\n{}",
        agent.metrics()
    );
    assert_eq!(agent.metric_sum("zerotel_events_lost_total"), 0, "{}", agent.metrics());
    assert!(agent.metric_sum("zerotel_export_queue_spans") <= QUEUE, "{}", agent.metrics());
    assert_eq!(agent.metric_sum("zerotel_spans_exported_total"), 0);
    // Every span is held or counted as dropped, once the last ones reached the queue.
    let accounted = || agent.metric_sum("zerotel_spans_dropped_total") + agent.metric_sum("zerotel_export_queue_spans");
    assert!(poll_until(SPAN_TIMEOUT, || accounted() == 600), "{}", agent.metrics());

    // SIGTERM with a hanging backend: the agent still exits within its shutdown timeout.
    let stopping = Instant::now();
    let status = agent.stop();
    assert!(status.success(), "{status}");
    assert!(stopping.elapsed() < Duration::from_secs(15), "stopping took {:?}", stopping.elapsed());
}
