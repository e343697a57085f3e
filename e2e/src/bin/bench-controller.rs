//! `bench-controller`: the controller loop as a process of its own, for the scale bench
//! (`e2e/benches/scale.rs`), so that what the bench reads of a process (resident memory,
//! CPU time) is the controller's alone, not the harness's.
//!
//! It is the api tier's test bed in a process: libvirt's `test:///default` driver (its
//! state lives in this process; the base image is created at start) metered as the real
//! binary meters libvirt, and the in-memory `FakeGuest`, against the API server that
//! `--kubeconfig` names. The in-memory doubles count in its memory: they stand for
//! libvirtd and the guests, which a real controller does not hold.
//!
//! It serves `/metrics`, `/healthz` and `/readyz` (the real binary's endpoint) on
//! `--http-addr`, a free loopback port by default, and prints `listening on
//! http://<addr>` on stdout once bound. It stops gracefully when its stdin closes (the
//! bench holds the other end, so it cannot outlive the bench however the bench ends) or
//! on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use benchcluster_controller::http::{self, Readiness};
use benchcluster_controller::hypervisor::metered::Metered;
use benchcluster_controller::metrics::Metrics;
use benchcluster_controller::telemetry::{self, LogFormat};
use benchcluster_controller::{Context, Settings, reconcile};
use benchcluster_e2e::testbed;
use benchcluster_testkit::FakeGuest;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::AsyncReadExt;

/// The controller on libvirt's test driver and an in-memory guest, for benchmarks.
#[derive(Debug, Parser)]
#[command(name = "bench-controller")]
struct Args {
    /// Kubeconfig of the API server to reconcile against.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Watch only this namespace [default: all namespaces].
    #[arg(long)]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz (port 0: any free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    http_addr: SocketAddr,
    /// Requeue interval while something is on its way [default: the controller's].
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Requeue interval once converged [default: the controller's].
    #[arg(long)]
    resync_interval_ms: Option<u64>,
    /// BenchClusters reconciled at once [default: the controller's].
    #[arg(long)]
    max_concurrent_reconciles: Option<u16>,
    /// Latency added to every mutating hypervisor call.
    #[arg(long, default_value_t = 0)]
    hypervisor_step_latency_ms: u64,
    /// Latency added to every guest step.
    #[arg(long, default_value_t = 0)]
    guest_step_latency_ms: u64,
    /// Log level or RUST_LOG-style directives.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

impl Args {
    fn settings(&self) -> Settings {
        let default = Settings::default();
        let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
        Settings {
            poll_interval: ms(self.poll_interval_ms, default.poll_interval),
            resync_interval: ms(self.resync_interval_ms, default.resync_interval),
            max_concurrent_reconciles: self
                .max_concurrent_reconciles
                .unwrap_or(default.max_concurrent_reconciles),
            cpu_overcommit: testbed::TEST_DRIVER_OVERCOMMIT,
            memory_overcommit: testbed::TEST_DRIVER_OVERCOMMIT,
            ..default
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init(LogFormat::Text, Some(&args.log_level)) {
        eprintln!("bench-controller: {:#}", anyhow::Error::new(e));
        return ExitCode::from(2);
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-controller: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Opens the test driver for the life of the process and creates the base image.
    testbed::libvirt()?;
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = kube::Client::try_from(config)?;

    let settings = args.settings();
    let mut hypervisor = testbed::hypervisor();
    hypervisor.step_latency = Duration::from_millis(args.hypervisor_step_latency_ms);
    let guest = FakeGuest::with_latency(Duration::from_millis(args.guest_step_latency_ms));
    // Wired as the real binary wires libvirt, so the same series appear.
    let metrics = Arc::new(Metrics::new());
    let counted = Arc::clone(&metrics);
    let hypervisor = Metered::new(hypervisor, move |operation, kind| {
        counted.libvirt_call(operation, kind)
    });

    let ctx = Arc::new(
        Context::new(client.clone(), hypervisor, guest, settings)
            .with_metrics(Arc::clone(&metrics)),
    );

    let synced = Arc::clone(&ctx);
    let readiness = Readiness::new().with("crd", http::crd_check(client)).with(
        "watch",
        http::flag_check("the BenchCluster watch has not synced", move || {
            synced.watch_synced()
        }),
    );
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.http_addr))?;
    println!("listening on http://{}", listener.local_addr()?);
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, metrics, readiness, async {
        let _ = http_stopped.await;
    }));

    // The controller's shutdown future must be Sync; the wait runs as a task of its own.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        stdin_closed_or_sigterm().await;
        let _ = stop.send(());
    });
    reconcile::run(ctx, args.namespace.as_deref(), async move {
        let _ = stopped.await;
    })
    .await;
    let _ = http_stop.send(());
    let _ = server.await;
    Ok(())
}

/// Resolves when stdin reaches its end (the parent closed it, or died) or on SIGTERM.
async fn stdin_closed_or_sigterm() {
    let closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buffer = [0u8; 256];
        while matches!(stdin.read(&mut buffer).await, Ok(n) if n > 0) {}
    };
    let term = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = closed => {}
        () = term => {}
    }
}
