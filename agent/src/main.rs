//! zerotel's agent binary: starts the pipeline the library's stages make (see lib.rs).

use zerotel::{capture, config, discovery, export, kubernetes, probes, spans, telemetry};

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::{
    config::{Cli, Config},
    discovery::{resource::BaseResource, Discovery},
    probes::{Probes, Scope},
    spans::assemble::{self, Assembler},
    telemetry::Telemetry,
};

/// Spans are many small allocations made on one thread and freed on another: mimalloc keeps that
/// cheap where glibc malloc spent a third of the agent's CPU (measured with perf under wrk).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Batches queued between stages.
const QUEUE_BATCHES: usize = 256;
/// Event batches queued for assembly: each holds up to 256 KiB of payload, so this bounds that
/// queue to 16 MiB (the ring buffer takes the excess, and counts what it cannot hold).
const EVENT_QUEUE_BATCHES: usize = 64;
/// Pod updates queued from the Kubernetes watch to discovery.
const POD_UPDATES: usize = 1024;

fn main() -> ExitCode {
    // kube_client logs each failed request; the pod watch reports them once, with context.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,kube_client=off")).init();
    let env = |name: &str| std::env::var(name).ok();
    let config = match Config::from_cli(Cli::parse(), &env) {
        Ok(config) => config,
        Err(e) => return fail(&anyhow::Error::new(e)),
    };
    if config.check_only {
        print!("{}", config.describe());
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    match runtime.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(config, &env))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// An agent on every node must keep its footprint small: mimalloc's defaults (eager arena commit,
/// purge after 10 ms) held 50-70 MiB at 60k spans/s here; these hold ~30 MiB for ~10% more CPU.
/// It runs as an ELF constructor because the first arena is made by the first allocation, before
/// `main`.
#[used]
#[unsafe(link_section = ".init_array")]
static BOUND_ALLOCATOR_MEMORY: extern "C" fn() = bound_allocator_memory;

extern "C" fn bound_allocator_memory() {
    // Option ids from mimalloc.h (v2): mi_option_arena_eager_commit, mi_option_purge_delay.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY_MS: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting documented options; safe at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY_MS, 0);
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("zerotel: error: {e:#}");
    ExitCode::FAILURE
}

async fn run(config: Config, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    // First: a second agent must say so, not fail on the listener or attach probes twice.
    let _one_agent = probes::InstanceLock::acquire(&config.lock_file)?;
    let telemetry = Arc::new(Telemetry::default());
    let listener = telemetry::bind(config.listen).await?;
    let server = tokio::spawn(telemetry::serve(listener, telemetry.clone()));
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let scope = match &config.selection {
        selection if selection.traces_everything() => Scope::All,
        selection if selection.include.is_empty() => Scope::AllExcept,
        _ => Scope::Selected,
    };
    let (mut probes, maps) = Probes::load_and_attach(scope, config.propagation, config.sampler)?;
    telemetry.propagation.store(probes.is_attached(probes::ProbeFamily::Propagation), std::sync::atomic::Ordering::Relaxed);
    *telemetry.probes_attached.lock().unwrap_or_else(|p| p.into_inner()) =
        probes.families().into_iter().map(|(family, attached)| (family.name(), attached)).collect();
    *telemetry.kernel.lock().unwrap_or_else(|p| p.into_inner()) = Some(maps.counters);

    let programs_changed = Arc::new(tokio::sync::Notify::new());
    let kernel = discovery::KernelState {
        traced_pids: maps.traced_pids,
        conns: maps.conns,
        in_flight: maps.in_flight,
        inject_socks: maps.inject_socks,
        programs_changed: programs_changed.clone(),
    };
    let (pods_tx, pods_rx) = mpsc::channel(POD_UPDATES);
    let watching = match &config.kubernetes {
        Some(settings) => start_pod_watch(settings, pods_tx, telemetry.clone(), config.kubernetes_required).await?,
        None => false,
    };
    let discovery = Discovery::new(config.selection, watching, kernel, BaseResource::from_env(env), telemetry.clone());
    let mut assembler = Assembler::new(discovery, telemetry.clone(), config.sampler, config.query_text);
    assembler.initial_scan();
    probes.refresh_tls();

    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_BATCHES);
    let (spans_tx, spans_rx) = mpsc::channel(QUEUE_BATCHES);
    let (stop_tx, stop_rx) = watch::channel(false);
    let capture = tokio::spawn(capture::run(maps.events, events_tx, telemetry.clone(), stop_rx));
    let assemble = tokio::spawn(assemble::run(assembler, events_rx, pods_rx, spans_tx));
    let export = tokio::spawn(export::run(config.export, spans_rx, telemetry.export.clone()));

    // Loading parsed the object file and BTF: hand that memory back before settling down.
    // SAFETY: mi_collect only returns free memory to the OS.
    unsafe { libmimalloc_sys::mi_collect(true) };
    telemetry.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    log::info!("ready: {} tracepoints attached, telemetry on http://{}", probes.hook_count(), config.listen);

    let mut tls_rescan = tokio::time::interval(probes::TLS_RESCAN);
    tls_rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = tls_rescan.tick() => probes.refresh_tls(),
            // Per-process probes only: shared ones already cover a new process's known files.
            () = programs_changed.notified(), if matches!(scope, Scope::Selected) => probes.refresh_tls(),
        }
    }
    log::info!("stopping: flushing spans, then detaching probes");
    // Flush first: each stage drains into the next, capture reading what the ring buffer held.
    // Detaching comes last because the kernel takes long to do it (RCU grace periods for every
    // probe: seconds), and spans must not wait for it.
    let _ = stop_tx.send(true);
    let drained = async {
        capture.await.context("capture stage")?.context("reading the ring buffer")?;
        assemble.await.context("assemble stage")?;
        export.await.context("export stage")
    };
    if tokio::time::timeout(config.shutdown_timeout, drained).await.is_err() {
        log::warn!("shutdown timed out after {:?}; unexported spans were dropped", config.shutdown_timeout);
    }
    server.abort();
    log::info!("spans flushed; detaching probes");
    drop(probes);
    Ok(())
}

/// Start the watch of this node's pods; false (tracing without pod metadata) when the API
/// settings are missing and no rule needs them.
async fn start_pod_watch(
    settings: &kubernetes::KubeSettings,
    tx: mpsc::Sender<kubernetes::PodUpdate>,
    telemetry: Arc<Telemetry>,
    required: bool,
) -> anyhow::Result<bool> {
    match kubernetes::client(settings).await {
        Ok(client) => {
            log::info!("watching the pods of node {} for metadata", settings.node_name);
            tokio::spawn(kubernetes::watch_pods(client, settings.node_name.clone(), tx, telemetry));
            Ok(true)
        }
        Err(e) if required => Err(anyhow::Error::new(e).context("the rules need pod metadata (pass --kubeconfig, or run in a pod with a service account)")),
        Err(e) => {
            log::warn!("no pod metadata, tracing goes on without it: {e}");
            Ok(false)
        }
    }
}
