//! api tier: operating the controller against a real kube-apiserver + etcd, with
//! libvirt's `test:///default` driver and an in-memory guest: the metrics and probe
//! endpoint, Events, leader election with a handover, no secret in logs, events or
//! status, and the real binary's flags, probes and SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use benchcluster_controller::guest::{
    AdminKubeconfig, ClusterNode, Credentials, Guest, GuestNode, InitConfig, NodeConfig,
    Registration, RunningScheduler,
};
use benchcluster_controller::http::{self, Readiness};
use benchcluster_controller::hypervisor::libvirt::{Libvirt, LibvirtConfig};
use benchcluster_controller::leader::{self, Elector, LeaseConfig, Stopped};
use benchcluster_controller::telemetry::{self, LogFormat};
use benchcluster_controller::{Context, Settings};
use benchcluster_crd::BenchCluster;
use benchcluster_e2e::logs::LogCapture;
use benchcluster_e2e::testbed::{CONVERGE, Fixture, POLL};
use benchcluster_e2e::{testbed, wait};
use benchcluster_testkit::{FakeGuest, Instrumented, SECRET_MARKER};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::time::Instant;

/// One in-memory guest shared by several controller replicas: the guest clusters are
/// the world's, not a replica's.
#[derive(Clone, Default)]
struct SharedGuest(Arc<FakeGuest>);

impl Guest for SharedGuest {
    async fn probe(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
    ) -> benchcluster_controller::guest::Result<()> {
        self.0.probe(node, credentials).await
    }

    async fn init_control_plane(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
        config: &InitConfig,
    ) -> benchcluster_controller::guest::Result<AdminKubeconfig> {
        self.0.init_control_plane(node, credentials, config).await
    }

    async fn join_worker(
        &self,
        control_plane: &GuestNode,
        worker: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
        registration: &Registration,
    ) -> benchcluster_controller::guest::Result<()> {
        self.0
            .join_worker(control_plane, worker, credentials, kubeconfig, registration)
            .await
    }

    async fn configure_node(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
        config: &NodeConfig,
    ) -> benchcluster_controller::guest::Result<()> {
        self.0.configure_node(kubeconfig, node_name, config).await
    }

    async fn cluster_nodes(
        &self,
        kubeconfig: &AdminKubeconfig,
    ) -> benchcluster_controller::guest::Result<Vec<ClusterNode>> {
        self.0.cluster_nodes(kubeconfig).await
    }

    async fn scheduler(
        &self,
        kubeconfig: &AdminKubeconfig,
        control_plane: &str,
    ) -> benchcluster_controller::guest::Result<Option<RunningScheduler>> {
        self.0.scheduler(kubeconfig, control_plane).await
    }

    async fn switch_scheduler(
        &self,
        control_plane: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
        config: &InitConfig,
    ) -> benchcluster_controller::guest::Result<RunningScheduler> {
        self.0
            .switch_scheduler(control_plane, credentials, kubeconfig, config)
            .await
    }

    async fn uncordon(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
    ) -> benchcluster_controller::guest::Result<()> {
        self.0.uncordon(kubeconfig, node_name).await
    }

    async fn remove_node(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
    ) -> benchcluster_controller::guest::Result<()> {
        self.0.remove_node(kubeconfig, node_name).await
    }
}

type TestContext = Context<Instrumented<Libvirt>, SharedGuest>;

fn context(client: Client, guest: SharedGuest) -> Arc<TestContext> {
    Arc::new(Context::new(
        client,
        testbed::hypervisor(),
        guest,
        testbed::fast_settings(),
    ))
}

/// A controller replica running in this process: `run_controller` on its own task.
struct Replica {
    ctx: Arc<TestContext>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Stopped, leader::LeaderError>>,
}

impl Replica {
    fn start(ctx: Arc<TestContext>, namespace: &str, elector: Option<Elector>) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(leader::run_controller(
            Arc::clone(&ctx),
            Some(namespace.to_owned()),
            elector,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            ctx,
            stop: Some(stop),
            task,
        }
    }

    fn mutations(&self) -> u64 {
        self.ctx.hypervisor.mutations.load(Ordering::Relaxed)
    }

    /// As a crash would: the task is aborted wherever it is, the Lease left to expire.
    fn kill(self) {
        self.task.abort();
    }

    /// As SIGTERM would: in-flight reconciles finish, the Lease is released.
    async fn stop(mut self) -> Result<Stopped> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        Ok(tokio::time::timeout(Duration::from_secs(20), self.task).await???)
    }
}

/// GET `path` on `addr`: (status code, Content-Type, body). Plain HTTP/1.1 on a
/// blocking socket, off the async workers.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> Result<(u16, String, String)> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no end of headers")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default();
        Ok((status, content_type, body.to_owned()))
    })
    .await?
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Serves the context's metrics and a readiness made of `hypervisor_check` (plus the
/// CRD and the watch) on 127.0.0.1:0, until the returned sender fires.
async fn start_http(
    ctx: &Arc<TestContext>,
    client: Client,
    hypervisor_check: http::Check,
) -> Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let synced = Arc::clone(ctx);
    let readiness = Readiness::new()
        .with("crd", http::crd_check(client))
        .with(
            "watch",
            http::flag_check("watch not synced", move || synced.watch_synced()),
        )
        .with("libvirt", hypervisor_check);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(http::serve(
        listener,
        Arc::clone(&ctx.metrics),
        readiness,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_after_a_cluster_is_ready() -> Result<()> {
    let f = Fixture::new("metrics").await?;
    let ctx = context(f.client.clone(), SharedGuest::default());
    let (addr, http_stop) = start_http(
        &ctx,
        f.client.clone(),
        http::libvirt_check(ctx.hypervisor.inner.clone()),
    )
    .await?;
    let (status, _, _) = get(addr, "/healthz").await?;
    assert_eq!(status, 200);
    let (status, _, body) = get(addr, "/readyz").await?;
    assert_eq!(status, 503, "not ready before the watch synced: {body}");
    assert!(body.contains("[-]watch"), "{body}");

    let replica = Replica::start(Arc::clone(&ctx), &f.namespace, None);
    wait::until("/readyz 200", CONVERGE, POLL, || async {
        let (status, _, _) = get(addr, "/readyz").await?;
        anyhow::Ok((status == 200).then_some(()))
    })
    .await?;
    f.create("m", 1).await?;
    f.wait_ready("m", 1).await?;

    let (status, content_type, metrics) = get(addr, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    let value = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert!(value("benchcluster_reconciles_total") >= 3.0);
    assert!(value("benchcluster_reconcile_duration_seconds_count") >= 3.0);
    assert!(value("benchcluster_reconcile_duration_seconds_sum") > 0.0);
    assert_eq!(
        value("benchcluster_vms{role=\"control_plane\",state=\"Ready\"}"),
        1.0
    );
    assert_eq!(
        value("benchcluster_vms{role=\"worker\",state=\"Ready\"}"),
        1.0
    );
    // Each phase of each node observed exactly once: both nodes define, boot, get a
    // lease, answer SSH and become Ready; one init, one join.
    for (phase, count) in [
        ("define", 2.0),
        ("boot", 2.0),
        ("lease", 2.0),
        ("ssh", 2.0),
        ("init", 1.0),
        ("join", 1.0),
        ("node_ready", 2.0),
    ] {
        assert_eq!(
            value(&format!(
                "benchcluster_provisioning_phase_duration_seconds_count{{phase=\"{phase}\"}}"
            )),
            count,
            "phase {phase}"
        );
    }
    assert!(value("benchcluster_status_patches_total{result=\"ok\"}") >= 1.0);
    assert_eq!(value("benchcluster_leader"), 1.0);
    assert!(
        !metrics.contains(&f.namespace),
        "no per-object label on any series"
    );

    // The gauge follows the cluster away.
    f.delete_and_wait("m").await?;
    let (_, _, metrics) = get(addr, "/metrics").await?;
    assert_eq!(
        sample(
            &metrics,
            "benchcluster_vms{role=\"worker\",state=\"Ready\"}"
        ),
        Some(0.0)
    );

    assert_eq!(replica.stop().await?, Stopped::Shutdown);
    assert!(!ctx.watch_synced());
    let _ = http_stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_libvirt_is_unreachable() -> Result<()> {
    let f = Fixture::new("readyz").await?;
    let ctx = context(f.client.clone(), SharedGuest::default());
    // A test-driver URI naming a file that does not exist: the connection fails.
    let down = Libvirt::new(LibvirtConfig::for_uri("test:///no/such/driver-state.xml"));
    let (addr, http_stop) = start_http(&ctx, f.client.clone(), http::libvirt_check(down)).await?;
    let replica = Replica::start(Arc::clone(&ctx), &f.namespace, None);
    wait::until("the watch synced", CONVERGE, POLL, || async {
        ctx.watch_synced().then_some(())
    })
    .await?;
    let (status, _, body) = get(addr, "/readyz").await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("[+]crd ok"), "{body}");
    assert!(body.contains("[+]watch ok"), "{body}");
    assert!(
        body.contains("[-]libvirt failed") && body.contains("cannot connect to libvirt"),
        "{body}"
    );
    let (status, _, _) = get(addr, "/healthz").await?;
    assert_eq!(status, 200, "alive even when not ready");
    replica.stop().await?;
    let _ = http_stop.send(());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_failures_are_events() -> Result<()> {
    let f = Fixture::new("events").await?;
    let guest = SharedGuest::default();
    let ctx = context(f.client.clone(), guest.clone());
    let replica = Replica::start(Arc::clone(&ctx), &f.namespace, None);
    guest.0.set_init_failing("ev-cp-0", true);
    f.create("ev", 1).await?;
    wait::until("a StepFailed Warning", CONVERGE, POLL, || async {
        let events = f.events().await?;
        anyhow::Ok(
            events
                .into_iter()
                .find(|(type_, reason, _)| type_ == "Warning" && reason == "StepFailed"),
        )
    })
    .await
    .map(|(_, _, note)| {
        assert!(
            note.contains("kubeadm init") && note.contains("fake failure"),
            "the Warning carries the error chain: {note}"
        );
    })?;
    guest.0.set_init_failing("ev-cp-0", false);
    f.wait_ready("ev", 1).await?;
    f.set_replicas("ev", 0).await?;
    f.wait_ready("ev", 0).await?;
    f.delete_and_wait("ev").await?;

    let expected = [
        "VmStarted",
        "ControlPlaneInitialized",
        "WorkerJoined",
        "Ready",
        "NodeDrained",
        "VmRemoved",
        "Deleted",
    ];
    let events = wait::until("every lifecycle Event", CONVERGE, POLL, || async {
        let events = f.events().await?;
        let reasons: BTreeSet<&str> = events.iter().map(|(_, r, _)| r.as_str()).collect();
        anyhow::Ok(
            expected
                .iter()
                .all(|r| reasons.contains(r))
                .then_some(events.clone()),
        )
    })
    .await?;
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for (type_, reason, _) in &events {
        *by_reason.entry(reason.as_str()).or_default() += 1;
        if expected.contains(&reason.as_str()) {
            assert_eq!(type_, "Normal", "{reason}");
        }
    }
    eprintln!("events by reason: {by_reason:?}");
    replica.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_acts_and_a_follower_takes_over() -> Result<()> {
    let f = Fixture::new("leader").await?;
    let guest = SharedGuest::default();
    let lease = |identity: &str| LeaseConfig {
        identity: identity.to_owned(),
        ..LeaseConfig::new(&f.namespace, leader::DEFAULT_LEASE_NAME)
    };

    let a_ctx = context(f.client.clone(), guest.clone());
    let a_elector = Elector::start(
        f.client.clone(),
        lease("replica-a"),
        Arc::clone(&a_ctx.metrics),
    )
    .await?;
    let mut a_status = a_elector.status();
    let a = Replica::start(a_ctx, &f.namespace, Some(a_elector));
    tokio::time::timeout(CONVERGE, a_status.leading()).await??;

    let b_ctx = context(f.client.clone(), guest.clone());
    let b_elector = Elector::start(
        f.client.clone(),
        lease("replica-b"),
        Arc::clone(&b_ctx.metrics),
    )
    .await?;
    let mut b_status = b_elector.status();
    let b = Replica::start(b_ctx, &f.namespace, Some(b_elector));

    f.create("lead", 1).await?;
    f.wait_ready("lead", 1).await?;
    assert!(a.mutations() > 0, "the leader built the cluster");
    assert_eq!(b.mutations(), 0, "the follower touched nothing");
    assert!(!b_status.is_leader());
    assert!(!b.ctx.watch_synced(), "a follower does not even watch");
    let holder = Api::<Lease>::namespaced(f.client.clone(), &f.namespace)
        .get(leader::DEFAULT_LEASE_NAME)
        .await?
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("replica-a"));

    // The leader dies without releasing the Lease; work arrives meanwhile.
    let a_mutations = a.mutations();
    let a_ctx = Arc::clone(&a.ctx);
    a.kill();
    let killed = Instant::now();
    f.set_replicas("lead", 2).await?;
    tokio::time::timeout(
        leader::LEASE_DURATION + Duration::from_secs(10),
        b_status.leading(),
    )
    .await
    .context("no takeover")??;
    let handover = killed.elapsed();
    eprintln!(
        "handover after the leader died: {:.1} s (lease {} s, renewed every {} s)",
        handover.as_secs_f64(),
        leader::LEASE_DURATION.as_secs(),
        leader::RENEW_INTERVAL.as_secs()
    );
    assert!(
        handover <= leader::LEASE_DURATION + Duration::from_secs(3),
        "handover took {handover:?}"
    );
    f.wait_ready("lead", 2).await?;
    assert!(b.mutations() > 0, "the new leader scaled the cluster");
    assert_eq!(
        a_ctx.hypervisor.mutations.load(Ordering::Relaxed),
        a_mutations,
        "the dead leader did nothing more"
    );

    // A leader that stops on SIGTERM releases the Lease: the next takes over at once.
    let c_ctx = context(f.client.clone(), guest.clone());
    let c_elector = Elector::start(
        f.client.clone(),
        lease("replica-c"),
        Arc::clone(&c_ctx.metrics),
    )
    .await?;
    let mut c_status = c_elector.status();
    let c = Replica::start(c_ctx, &f.namespace, Some(c_elector));
    // Let C settle as a standing follower (its watch on the Lease past the first list),
    // so the measure is the follower's, not a start-up's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!c_status.is_leader());
    let stopping = Instant::now();
    assert_eq!(b.stop().await?, Stopped::Shutdown);
    tokio::time::timeout(CONVERGE, c_status.leading()).await??;
    let graceful = stopping.elapsed();
    eprintln!(
        "handover after the leader stopped: {:.1} s",
        graceful.as_secs_f64()
    );
    assert!(
        // As when a 2 s poller looked for the release (2 s + 2 s); the watch takes ~0.1 s.
        graceful < Duration::from_secs(4),
        "took {graceful:?}"
    );
    f.set_replicas("lead", 1).await?;
    f.wait_ready("lead", 1).await?;
    assert!(c.mutations() > 0);
    c.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_is_taken_stops_reconciling() -> Result<()> {
    let f = Fixture::new("deposed").await?;
    let ctx = context(f.client.clone(), SharedGuest::default());
    let config = LeaseConfig {
        identity: "replica-a".into(),
        ..LeaseConfig::new(&f.namespace, "deposed")
    };
    let elector = Elector::start(f.client.clone(), config, Arc::clone(&ctx.metrics)).await?;
    let mut status = elector.status();
    let replica = Replica::start(Arc::clone(&ctx), &f.namespace, Some(elector));
    tokio::time::timeout(CONVERGE, status.leading()).await??;
    wait::until("the leader's watch synced", CONVERGE, POLL, || async {
        ctx.watch_synced().then_some(())
    })
    .await?;

    // Someone else writes itself into the Lease (as after a partition healed).
    let now = k8s_openapi::jiff::Timestamp::now();
    Api::<Lease>::namespaced(f.client.clone(), &f.namespace)
        .patch(
            "deposed",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "spec": {
                    "holderIdentity": "intruder",
                    "acquireTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
                    "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
                    "leaseDurationSeconds": 60
                }
            })),
        )
        .await?;
    let taken = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(15), replica.task)
        .await
        .context("the deposed leader kept running")???;
    eprintln!(
        "deposed leader stopped after {:.1} s",
        taken.elapsed().as_secs_f64()
    );
    assert_eq!(stopped, Stopped::LeadershipLost);
    assert!(!ctx.watch_synced(), "the controller stream is shut down");
    assert!(!status.is_leader());
    let metrics = ctx.metrics.encode()?;
    assert_eq!(sample(&metrics, "benchcluster_leader"), Some(0.0));
    Ok(())
}

/// Installs (once) a JSON subscriber at debug level for the whole test binary.
fn capture_logs() -> &'static LogCapture {
    static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = LogCapture::default();
        let filter = telemetry::filter(Some(
            "debug,hyper=info,hyper_util=info,h2=info,rustls=info,tower=info",
        ))
        .expect("filter");
        let subscriber = telemetry::subscriber(LogFormat::Json, filter, capture.clone());
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        capture
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_events_or_status_after_a_full_lifecycle() -> Result<()> {
    let logs = capture_logs();
    let f = Fixture::new("secrets").await?;
    let guest = SharedGuest::default();
    let ctx = context(f.client.clone(), guest.clone());
    let replica = Replica::start(Arc::clone(&ctx), &f.namespace, None);

    // A failure on the way, so error paths are logged too.
    guest.0.set_init_failing("sec-cp-0", true);
    f.create("sec", 2).await?;
    wait::until("a failed init", CONVERGE, POLL, || async {
        (guest.0.init_attempts.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await?;
    guest.0.set_init_failing("sec-cp-0", false);
    f.wait_ready("sec", 2).await?;
    f.set_replicas("sec", 3).await?;
    f.wait_ready("sec", 3).await?;
    f.set_replicas("sec", 1).await?;
    let bc = f.wait_ready("sec", 1).await?;
    let status = serde_json::to_string(&bc.status)?;
    let status_yaml = f
        .server
        .kubectl(&["get", "bc", "-n", &f.namespace, "sec", "-o", "yaml"])
        .output()?;
    let status_yaml = String::from_utf8(status_yaml.stdout)?;

    // The secrets were really there to leak: the kubeconfig Secret holds the marker.
    let kubeconfig = Api::<Secret>::namespaced(f.client.clone(), &f.namespace)
        .get("sec-kubeconfig")
        .await?;
    let stored = kubeconfig.data.unwrap_or_default();
    assert!(
        stored
            .values()
            .any(|v| String::from_utf8_lossy(&v.0).contains(SECRET_MARKER)),
        "the fake kubeconfig carries the marker"
    );

    f.delete_and_wait("sec").await?;
    replica.stop().await?;

    let logs = logs.text();
    let events = f.events_yaml()?;
    assert!(
        logs.contains(&f.namespace) && logs.contains("\"reconcile\""),
        "the capture saw this test's reconciles"
    );
    assert!(events.contains("ControlPlaneInitialized") && events.contains("StepFailed"));
    for (what, text) in [
        ("logs", logs.as_str()),
        ("events", events.as_str()),
        ("status", status.as_str()),
        ("kubectl get bc", status_yaml.as_str()),
    ] {
        assert!(
            !text.contains(SECRET_MARKER),
            "a secret reached the {what}:\n{}",
            text.lines()
                .filter(|l| l.contains(SECRET_MARKER))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
        for needle in ["BEGIN OPENSSH PRIVATE KEY", "client-key-data", "--token"] {
            assert!(!text.contains(needle), "{needle:?} in the {what}");
        }
    }
    eprintln!(
        "scanned {} bytes of logs, {} of events",
        logs.len(),
        events.len()
    );
    Ok(())
}

/// The `benchcluster-controller` binary, built by the cargo running these tests in the
/// same profile and target directory.
fn controller_binary() -> Result<std::path::PathBuf> {
    // This test runs as <target>/<profile>/deps/operate-<hash>.
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("no target directory")?;
    let mut build = std::process::Command::new(env!("CARGO"));
    build.args([
        "build",
        "--quiet",
        "-p",
        "benchcluster-controller",
        "--bin",
        "benchcluster-controller",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let out = build.output()?;
    ensure!(
        out.status.success(),
        "cargo build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let binary = dir.join("benchcluster-controller");
    ensure!(binary.exists(), "{} not built", binary.display());
    Ok(binary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_probes_leads_and_exits_zero_on_sigterm() -> Result<()> {
    let f = Fixture::new("binary").await?;
    let binary = tokio::task::spawn_blocking(controller_binary).await??;
    let state = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log_path = state.path().join("controller.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = tokio::process::Command::new(&binary)
        .env("KUBECONFIG", f.server.kubeconfig_path())
        .env_remove("RUST_LOG")
        .args([
            "--libvirt-uri=test:///default",
            &format!("--namespace={}", f.namespace),
            &format!("--http-addr={addr}"),
            "--log-format=json",
            "--log-level=info",
            "--leader-election",
            &format!("--lease-namespace={}", f.namespace),
            &format!("--state-dir={}", state.path().display()),
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;

    let ready = wait::until("the binary's /readyz 200", CONVERGE, POLL, || async {
        let (status, _, body) = get(addr, "/readyz").await?;
        anyhow::Ok((status == 200).then_some(body))
    })
    .await;
    if ready.is_err() {
        eprintln!("{}", std::fs::read_to_string(&log_path).unwrap_or_default());
    }
    ready?;
    let (status, _, _) = get(addr, "/healthz").await?;
    assert_eq!(status, 200);
    let (_, _, metrics) = get(addr, "/metrics").await?;
    assert_eq!(sample(&metrics, "benchcluster_leader"), Some(1.0));
    let leases = Api::<Lease>::namespaced(f.client.clone(), &f.namespace);
    let holder = leases
        .get(leader::DEFAULT_LEASE_NAME)
        .await?
        .spec
        .and_then(|s| s.holder_identity);
    assert!(holder.is_some(), "the binary holds the Lease");

    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM failed");
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .context("no exit within 20 s of SIGTERM")??;
    let log = std::fs::read_to_string(&log_path)?;
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}; log:\n{log}");
    let holder = leases
        .get(leader::DEFAULT_LEASE_NAME)
        .await?
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the Lease was released");
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("a log line that is not JSON: {line}"))?;
        assert!(value.get("level").is_some(), "{line}");
    }
    assert!(log.contains("became leader") && log.contains("HTTP server stopped"));
    Ok(())
}

/// Reads this process's resident set size from /proc/self/status, in KiB.
fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("no VmRSS value")?
        .parse()?)
}

/// Benchmark, not a check: `cargo test -p benchcluster-e2e --test operate -- --ignored
/// --nocapture rss`. Prints this process's resident memory with 100 BenchClusters
/// (1+1 each) Ready on the test hypervisor. The process also holds the harness and
/// libvirt's test driver (its domains and volumes live in this process's memory), so
/// the figure bounds the controller's own from above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn rss_with_100_benchclusters() -> Result<()> {
    const CLUSTERS: usize = 100;
    let f = Fixture::new("rss").await?;
    let ctx = Arc::new(Context::new(
        f.client.clone(),
        testbed::hypervisor(),
        SharedGuest::default(),
        Settings {
            poll_interval: Duration::from_millis(500),
            cpu_overcommit: testbed::TEST_DRIVER_OVERCOMMIT,
            memory_overcommit: testbed::TEST_DRIVER_OVERCOMMIT,
            ..Settings::default()
        },
    ));
    let before = rss_kib()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let replica = tokio::spawn(leader::run_controller(
        Arc::clone(&ctx),
        Some(f.namespace.clone()),
        None,
        async move {
            let _ = stopped.await;
        },
    ));
    let started = Instant::now();
    for i in 0..CLUSTERS {
        f.create(&format!("c{i:03}"), 1).await?;
    }
    let is_ready = |bc: &BenchCluster| {
        bc.status.as_ref().is_some_and(|s| {
            s.ready_workers == 1
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    };
    let converged = wait::until(
        "100 BenchClusters Ready",
        Duration::from_secs(300),
        Duration::from_secs(1),
        || async {
            let list = f.api.list(&Default::default()).await?;
            let ready = list.items.iter().filter(|bc| is_ready(bc)).count();
            anyhow::Ok((ready == CLUSTERS).then_some(()))
        },
    )
    .await;
    if converged.is_err() {
        let list = f.api.list(&Default::default()).await?;
        let waiting: Vec<&BenchCluster> = list.items.iter().filter(|bc| !is_ready(bc)).collect();
        eprintln!("{} of {CLUSTERS} not Ready", waiting.len());
        if let Some(bc) = waiting.first() {
            eprintln!("{}: {:#?}", bc.name_any(), bc.status);
        }
    }
    converged?;
    let converged = started.elapsed();
    let after = rss_kib()?;
    // And at rest, a little later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rest = rss_kib()?;
    let metrics = ctx.metrics.encode()?;
    eprintln!(
        "{CLUSTERS} BenchClusters (1+1) Ready in {:.1} s; VmRSS before {:.1} MiB, \
         at Ready {:.1} MiB, 5 s later {:.1} MiB; vms Ready: cp {:?}, workers {:?}",
        converged.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        rest as f64 / 1024.0,
        sample(
            &metrics,
            "benchcluster_vms{role=\"control_plane\",state=\"Ready\"}"
        ),
        sample(
            &metrics,
            "benchcluster_vms{role=\"worker\",state=\"Ready\"}"
        ),
    );
    let names: Vec<String> = f
        .api
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|bc| bc.name_any())
        .collect();
    for name in &names {
        f.api.delete(name, &DeleteParams::default()).await?;
    }
    wait::until(
        "every BenchCluster gone",
        Duration::from_secs(600),
        Duration::from_secs(1),
        || async {
            anyhow::Ok(
                f.api
                    .list(&Default::default())
                    .await?
                    .items
                    .is_empty()
                    .then_some(()),
            )
        },
    )
    .await?;
    let _ = stop.send(());
    assert_eq!(replica.await??, Stopped::Shutdown);
    Ok(())
}

/// The SSH key Secrets are watched: a BenchCluster waiting for its key, in a backoff
/// far longer than the test, proceeds as soon as the Secret appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_key_secret_that_appears_wakes_the_clusters_naming_it() -> Result<()> {
    let f = Fixture::new("sshwake").await?;
    let settings = Settings {
        backoff_base: Duration::from_secs(600),
        backoff_cap: Duration::from_secs(600),
        resync_interval: Duration::from_secs(600),
        ..testbed::fast_settings()
    };
    let controller = testbed::RunningController::start_with(
        f.client.clone(),
        Some(&f.namespace),
        testbed::hypervisor(),
        FakeGuest::default(),
        settings,
    );
    let mut bc = f.cluster("late", 0)?;
    bc.spec.ssh.key_secret.name = "late-key".into();
    f.api.create(&Default::default(), &bc).await?;
    wait::until(
        "a failure naming the missing Secret",
        CONVERGE,
        POLL,
        || async {
            let status = f.api.get("late").await?.status.unwrap_or_default();
            anyhow::Ok(
                status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.message.contains("late-key"))
                    .then_some(()),
            )
        },
    )
    .await?;
    let credentials = benchcluster_controller::guest::Credentials {
        user: "bench".into(),
        private_key: secrecy::SecretString::from("-----BEGIN OPENSSH PRIVATE KEY-----\n-----END OPENSSH PRIVATE KEY-----\n"),
        public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILateLateLateLateLateLateLateLateLateLateLate bench".into(),
    };
    benchcluster_e2e::keys::create_ssh_secret(&f.client, &f.namespace, "late-key", &credentials)
        .await?;
    // Ready within CONVERGE (60 s), with the next retry 600 s away: the watch woke it.
    f.wait_ready("late", 0).await?;
    controller.stop().await;
    Ok(())
}
