//! Fixtures for zerotel's end-to-end tests: an in-process OTLP receiver, a
//! wrapper around the agent binary, real servers (Python, nginx, node, PostgreSQL, a
//! Kafka mock cluster, gRPC on Python and Go, nghttpd) and clients (curl, Python, kcat,
//! gRPC, nghttp, h2load) to trace.
//!
//! The tests need root, BTF (/sys/kernel/btf/vmlinux) and the agent binary
//! (`$ZEROTEL_BIN`, else `<workspace>/target/debug/zerotel`). Run them with
//! `cargo test -p zerotel-tests -- --test-threads=1`.

pub mod agent;
pub mod clients;
pub mod footprint;
pub mod grpc;
pub mod kafka;
pub mod kube_api;
pub mod otlp;
pub mod postgres;
pub mod print;
pub mod process;
pub mod raw_otlp;
pub mod servers;
pub mod tls;
pub mod util;

use std::path::Path;
use std::time::Duration;

pub use agent::{pid_args, propagating_pid_args, Agent};
pub use clients::{curl, curl_args, curl_args_many, paused_asyncio_client, paused_client, paused_node_client, paused_node_grpc_client, paused_urllib_client, run_curl, CurlResult};
pub use grpc::{GrpcCall, GrpcChain, GrpcServer, Nghttpd};
pub use kafka::{Consume, KafkaHttpService, Library, MockKafka, Produce};
pub use kube_api::FakeKubeApi;
pub use otlp::{describe, find_span, OtlpReceiver, Protocol, ReceivedLink, ReceivedSpan, SpanKind, Value};
pub use postgres::Postgres;
pub use servers::{Nginx, NodeGrpcServer, NodeServer, PyServer};

/// How long to wait for spans to reach the receiver (the agent batches for ~1-2 s).
pub const SPAN_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this machine can run the agent (root and kernel BTF). When it
/// cannot: panics if `CI=true`, else prints "skipped: <reason>" and returns
/// false so the test can return early.
pub fn require_kernel() -> bool {
    let Some(reason) = missing_requirement() else { return true };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("cannot run eBPF tests in CI: {reason}");
    }
    eprintln!("skipped: {reason}");
    false
}

fn missing_requirement() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("not running as root (euid {euid})"));
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        return Some(format!("{} is missing (kernel without BTF)", btf.display()));
    }
    None
}
