//! One agent per host: a second agent refuses to start, naming the first, until the first is
//! gone, even killed with SIGKILL (the kernel drops its lock with the process).

use std::time::{Duration, Instant};

use zerotel_tests::agent::run_until_exit;
use zerotel_tests::util::{free_port, TempDir};
use zerotel_tests::{curl, pid_args, require_kernel, Agent, OtlpReceiver, Protocol, PyServer, SpanKind, SPAN_TIMEOUT};

#[test]
fn a_second_agent_refuses_to_start_until_the_first_is_gone() {
    if !require_kernel() {
        return;
    }
    // A lock of this test's own: an agent some other run left on this host must not decide it.
    let lock_dir = TempDir::new("lock");
    let lock = lock_dir.join("zerotel.lock").display().to_string();
    let server = PyServer::start("backend.py");
    let receiver = OtlpReceiver::start(Protocol::Grpc);
    let mut args = pid_args(&[server.pid()]);
    args.extend(["--lock-file".to_owned(), lock.clone()]);
    let first = Agent::start(&args, Some(&receiver));

    let mut second_args = args.clone();
    second_args.extend(["--listen".to_owned(), format!("127.0.0.1:{}", free_port())]);
    let started = Instant::now();
    let second = run_until_exit(&second_args, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second agent started beside pid {}; stderr:\n{stderr}", first.pid());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?} to refuse; stderr:\n{stderr}", started.elapsed());
    let expected = format!("another zerotel agent (pid {}) is running on this host: it holds {lock}", first.pid());
    assert!(stderr.contains(&expected), "expected {expected:?} in stderr:\n{stderr}");

    // The first one went on undisturbed.
    let pid = server.pid();
    assert_eq!(curl(&server.url("/users/1"), &[]).status, 200);
    receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, "/users/1"), SPAN_TIMEOUT);

    let killed = first.kill();
    assert!(!killed.success(), "SIGKILL should end the agent abnormally: {killed}");
    let third = Agent::start(&args, Some(&receiver));
    assert_eq!(curl(&server.url("/users/2"), &[]).status, 200);
    let span = receiver.wait_for_span(|s| s.is(SpanKind::Server, pid, "/users/2"), SPAN_TIMEOUT);
    assert_eq!(span.name, "GET /users/*", "span:\n  {span}");
    let holder = std::fs::read_to_string(&lock).expect("read the lock file");
    assert_eq!(holder.trim(), third.pid().to_string(), "the lock file names its holder");
    let exit = third.stop_with_output();
    assert!(exit.status.success(), "the agent after the killed one exited with {}", exit.status);
}
