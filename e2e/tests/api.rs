//! api tier: the full controller loop against a real kube-apiserver + etcd, with
//! libvirt's own `test:///default` driver as hypervisor (its made-up interface
//! addresses stand in for DHCP leases) and an in-memory guest.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, ensure};
use benchcluster_controller::Context;
use benchcluster_controller::reconcile::reconcile;
use benchcluster_crd::{NodeState, NodeStatus};
use benchcluster_e2e::testbed::{self, CONVERGE, Fixture, POLL, RunningController};
use benchcluster_e2e::wait;
use benchcluster_testkit::{FakeGuest, SECRET_MARKER};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn domains(namespace: &str, name: &str) -> BTreeSet<String> {
    testbed::domains(namespace, name).expect("list domains")
}

fn volumes(namespace: &str, name: &str) -> BTreeSet<String> {
    testbed::volumes(namespace, name).expect("list volumes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_reaches_ready_with_three_owned_domains() -> Result<()> {
    let f = Fixture::new("apply").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.create("small", 2).await?;
    let bc = f.wait_ready("small", 2).await?;

    let status = bc.status.clone().unwrap_or_default();
    assert_eq!(status.nodes.len(), 3);
    assert!(
        status.nodes.iter().all(|n| n.ready && n.ip.is_some()),
        "{:?}",
        status.nodes
    );
    assert_eq!(
        status.kubeconfig_secret.as_deref(),
        Some("small-kubeconfig")
    );
    assert!(
        status
            .control_plane_endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("https://192.168.122."))
    );
    assert_eq!(
        volumes(&f.namespace, "small").len(),
        6,
        "one overlay and one seed per node"
    );
    let cp = &status.nodes[0];
    assert!(
        cp.timings.define_ms.is_some() && cp.timings.init_ms.is_some(),
        "{:?}",
        cp.timings
    );
    let kubeconfig = Api::<Secret>::namespaced(f.client.clone(), &f.namespace)
        .get("small-kubeconfig")
        .await?;
    assert_eq!(kubeconfig.owner_references()[0].uid, bc.uid().unwrap());

    let out = f
        .server
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "-n",
            &f.namespace,
            "bc/small",
            "--timeout=30s",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The steady state costs no API writes and no libvirt mutations.
    let rv = f.api.get("small").await?.resource_version();
    let mutations = controller.ctx.hypervisor.mutations.load(Ordering::Relaxed);
    let window = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < window {
        tokio::time::sleep(POLL).await;
        assert_eq!(
            f.api.get("small").await?.resource_version(),
            rv,
            "status rewritten at rest"
        );
    }
    assert_eq!(
        controller.ctx.hypervisor.mutations.load(Ordering::Relaxed),
        mutations,
        "libvirt mutated at rest"
    );

    // No secret ever reached the status or an event.
    let status_json = serde_json::to_string(&f.api.get("small").await?.status)?;
    assert!(!status_json.contains(SECRET_MARKER));
    let events = f
        .server
        .kubectl(&["get", "events", "-n", &f.namespace, "-o", "yaml"])
        .output()?;
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("ControlPlaneInitialized"),
        "lifecycle events expected"
    );
    assert!(!events.contains(SECRET_MARKER), "a secret reached an event");
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_by_edit_and_kubectl_scale_converge() -> Result<()> {
    let f = Fixture::new("scale").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.create("sc", 2).await?;
    f.wait_ready("sc", 2).await?;

    f.set_replicas("sc", 4).await?;
    f.wait_ready("sc", 4).await?;
    f.set_replicas("sc", 1).await?;
    let bc = f.wait_ready("sc", 1).await?;
    // The highest indices went; worker 0 stayed (and kept its node entry).
    let names: Vec<String> = bc
        .status
        .unwrap_or_default()
        .nodes
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, vec!["sc-cp-0".to_owned(), "sc-w-0".to_owned()]);
    assert_eq!(volumes(&f.namespace, "sc").len(), 4);
    assert_eq!(
        controller.ctx.guest.removals.load(Ordering::Relaxed),
        3,
        "each removed worker drained"
    );

    let out = f
        .server
        .kubectl(&["scale", "-n", &f.namespace, "bc/sc", "--replicas=3"])
        .output()?;
    assert!(
        out.status.success(),
        "kubectl scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bc = f.wait_ready("sc", 3).await?;
    assert_eq!(bc.spec.workers.replicas, 3);
    let scale = f
        .server
        .kubectl(&[
            "get",
            "-n",
            &f.namespace,
            "bc/sc",
            "-o",
            "jsonpath={.status.readyWorkers}",
        ])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&scale.stdout), "3");
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_leaves_nothing_behind() -> Result<()> {
    let f = Fixture::new("delete").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.create("gone", 2).await?;
    f.wait_ready("gone", 2).await?;
    f.api.delete("gone", &DeleteParams::default()).await?;
    wait::until(
        "BenchCluster gone (finalizer removed)",
        CONVERGE,
        POLL,
        || async { anyhow::Ok(f.api.get_opt("gone").await?.is_none().then_some(())) },
    )
    .await?;
    assert!(
        domains(&f.namespace, "gone").is_empty(),
        "{:?}",
        domains(&f.namespace, "gone")
    );
    assert!(
        volumes(&f.namespace, "gone").is_empty(),
        "{:?}",
        volumes(&f.namespace, "gone")
    );
    let secret = Api::<Secret>::namespaced(f.client.clone(), &f.namespace)
        .get_opt("gone-kubeconfig")
        .await?;
    assert!(secret.is_none(), "kubeconfig Secret left behind");
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cluster_never_asks_its_guest_api() -> Result<()> {
    let f = Fixture::new("noguest").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.create("ng", 2).await?;
    f.wait_ready("ng", 2).await?;
    // A graceful stop lets the passes in flight finish: every call the next
    // controller's guest records comes from the deletion.
    controller.stop().await;
    f.api.delete("ng", &DeleteParams::default()).await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    wait::until("BenchCluster gone", CONVERGE, POLL, || async {
        anyhow::Ok(f.api.get_opt("ng").await?.is_none().then_some(()))
    })
    .await?;
    assert!(domains(&f.namespace, "ng").is_empty());
    assert!(volumes(&f.namespace, "ng").is_empty());
    // The guest cluster goes away with its VMs: neither listed nor drained.
    assert_eq!(controller.ctx.guest.api_calls.load(Ordering::Relaxed), 0);
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_without_a_control_plane_skips_the_drain() -> Result<()> {
    let f = Fixture::new("nocp").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.create("nocp", 2).await?;
    f.wait_ready("nocp", 2).await?;
    // Paused, so the controller cannot recreate the control plane before it sees the
    // scale-down.
    f.api
        .patch(
            "nocp",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await?;
    wait::until("Paused reported", CONVERGE, POLL, || async {
        let status = f.api.get("nocp").await?.status.unwrap_or_default();
        anyhow::Ok(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Reconciling" && c.reason == "Paused")
                .then_some(()),
        )
    })
    .await?;
    let cp = testbed::libvirt()?.lookup_domain_by_name(&format!("{}-nocp-cp-0", f.namespace))?;
    cp.undefine()?;
    cp.destroy()?;
    // The fake guest still answers for the vanished control plane, as a real one would
    // not: a drain now would show the controller asked it.
    f.api
        .patch(
            "nocp",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false, "workers": {"replicas": 0}}})),
        )
        .await?;
    f.wait_ready("nocp", 0).await?;
    assert_eq!(controller.ctx.guest.removals.load(Ordering::Relaxed), 0);
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_mid_provisioning_leaves_nothing_behind() -> Result<()> {
    let f = Fixture::new("delmid").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    // The control plane never answers SSH, so the cluster stays mid-provisioning.
    controller.ctx.guest.set_unreachable("mid-cp-0", true);
    f.create("mid", 2).await?;
    wait::until("all three domains defined", CONVERGE, POLL, || async {
        (domains(&f.namespace, "mid").len() == 3).then_some(())
    })
    .await?;
    f.api.delete("mid", &DeleteParams::default()).await?;
    wait::until("BenchCluster gone", CONVERGE, POLL, || async {
        anyhow::Ok(f.api.get_opt("mid").await?.is_none().then_some(()))
    })
    .await?;
    assert!(domains(&f.namespace, "mid").is_empty());
    assert!(volumes(&f.namespace, "mid").is_empty());
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_queued_before_the_deletion_finished_is_not_an_error() -> Result<()> {
    let f = Fixture::new("latepass").await?;
    // Passes are run by hand here, to replay the one the controller had queued.
    let ctx = Arc::new(Context::new(
        f.client.clone(),
        testbed::hypervisor(),
        FakeGuest::default(),
        testbed::fast_settings(),
    ));
    f.create("late", 0).await?;
    reconcile(Arc::new(f.api.get("late").await?), Arc::clone(&ctx)).await?;
    f.api.delete("late", &DeleteParams::default()).await?;
    let deleting = Arc::new(f.api.get("late").await?);
    ensure!(
        deleting.metadata.deletion_timestamp.is_some() && !deleting.finalizers().is_empty(),
        "the finalizer holds the object: {:?}",
        deleting.metadata
    );
    reconcile(Arc::clone(&deleting), Arc::clone(&ctx)).await?;
    ensure!(
        f.api.get_opt("late").await?.is_none(),
        "the finalizer let go"
    );

    // The same snapshot again, as the watch still had it: the object is gone already.
    let late = reconcile(deleting, Arc::clone(&ctx)).await;
    assert!(late.is_ok(), "{late:?}");
    let metrics = ctx.metrics.encode()?;
    assert!(
        !metrics.contains("benchcluster_reconcile_failures_total{"),
        "{metrics}"
    );
    let warnings: Vec<_> = f
        .events()
        .await?
        .into_iter()
        .filter(|(type_, _, _)| type_ == "Warning")
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_controller_adopts_without_duplicates() -> Result<()> {
    let f = Fixture::new("restart").await?;
    // The first controller dies after defining two domains (a crash mid-pass).
    let mut first = testbed::hypervisor();
    first.define_gate = Some(2);
    let controller = RunningController::start(f.client.clone(), Some(&f.namespace), first);
    f.create("adopt", 3).await?;
    wait::until("two domains defined", CONVERGE, POLL, || async {
        (domains(&f.namespace, "adopt").len() == 2).then_some(())
    })
    .await?;
    controller.kill().await;
    let before = domains(&f.namespace, "adopt");
    ensure!(
        before.len() == 2,
        "expected a partial cluster, got {before:?}"
    );

    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    let bc = f.wait_ready("adopt", 3).await?;
    let after = domains(&f.namespace, "adopt");
    assert_eq!(after.len(), 4, "{after:?}");
    assert!(
        before.is_subset(&after),
        "the first domains were adopted, not replaced"
    );
    assert_eq!(
        volumes(&f.namespace, "adopt").len(),
        8,
        "no orphan or duplicate volume"
    );
    assert_eq!(bc.status.unwrap_or_default().nodes.len(), 4);
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_destroyed_behind_the_controllers_back_is_recreated() -> Result<()> {
    let f = Fixture::new("drift").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.create("drift", 2).await?;
    f.wait_ready("drift", 2).await?;
    let phases_before = phase_counts(&controller.ctx.metrics.encode()?);
    let victim = format!("{}-drift-w-1", f.namespace);
    let domain = testbed::libvirt()?.lookup_domain_by_name(&victim)?;
    let destroyed = std::time::Instant::now();
    // Undefine first: the running domain turns transient and dies with destroy, so the
    // controller never sees a stopped domain it could restart in between.
    domain.undefine()?;
    domain.destroy()?;
    // The guest cluster loses the Node with its VM.
    controller.ctx.guest.delete_node("drift-cp-0", "drift-w-1");
    wait::until("the destroyed worker recreated", CONVERGE, POLL, || async {
        domains(&f.namespace, "drift")
            .contains(&victim)
            .then_some(())
    })
    .await?;
    // The status said Ready before the drift: wait for the rejoin itself, not for it.
    wait::until("the recreated worker rejoined", CONVERGE, POLL, || async {
        controller
            .ctx
            .guest
            .nodes("drift-cp-0")
            .contains(&"drift-w-1".to_owned())
            .then_some(())
    })
    .await?;
    let bc = f.wait_ready("drift", 2).await?;
    let recreation_ms = u64::try_from(destroyed.elapsed().as_millis())?;

    // The recreated worker went through every phase again, its own timeline restarted
    // at the new definition: once more each, except init, which only the control plane has.
    let phases_after = phase_counts(&controller.ctx.metrics.encode()?);
    for (phase, count) in &phases_after {
        let again = u64::from(phase.as_str() != "init");
        assert_eq!(
            *count,
            phases_before.get(phase).copied().unwrap_or(0) + again,
            "phase {phase}: before {phases_before:?}, after {phases_after:?}"
        );
    }
    // Its status timings describe this incarnation only: together they fit in the time
    // since its first one was destroyed.
    let status = bc.status.unwrap_or_default();
    let worker = status
        .nodes
        .iter()
        .find(|n| n.name == "drift-w-1")
        .expect("the worker's status");
    let t = &worker.timings;
    let phases = [
        t.define_ms,
        t.boot_ms,
        t.lease_ms,
        t.ssh_ms,
        t.join_ms,
        t.ready_ms,
    ];
    assert!(phases.iter().all(Option::is_some), "{t:?}");
    assert!(
        phases.iter().flatten().sum::<u64>() <= recreation_ms,
        "{t:?} spans more than the {recreation_ms} ms since the first VM was destroyed"
    );
    assert_eq!(t.init_ms, None, "a worker is never initialised: {t:?}");
    controller.stop().await;
    Ok(())
}

/// Phase label -> number of completions in the provisioning phase histogram.
fn phase_counts(metrics: &str) -> BTreeMap<String, u64> {
    let prefix = "benchcluster_provisioning_phase_duration_seconds_count{phase=\"";
    metrics
        .lines()
        .filter_map(|line| {
            let (phase, count) = line.strip_prefix(prefix)?.split_once("\"} ")?;
            Some((phase.to_owned(), count.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_network_and_image_are_reported_not_retried_blindly() -> Result<()> {
    let f = Fixture::new("stall").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    let mut bc = f.cluster("nonet", 1)?;
    bc.spec.network.name = "no-such-network".into();
    f.api.create(&PostParams::default(), &bc).await?;
    let mut bc = f.cluster("noimg", 1)?;
    bc.spec.control_plane.image.volume = "missing.qcow2".into();
    f.api.create(&PostParams::default(), &bc).await?;

    for (name, reason) in [("nonet", "NetworkNotFound"), ("noimg", "ImageNotFound")] {
        wait::until(
            &format!("{name} Stalled with {reason}"),
            CONVERGE,
            POLL,
            || async {
                let bc = f.api.get(name).await?;
                let conditions = bc.status.unwrap_or_default().conditions;
                anyhow::Ok(
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == reason)
                        .then_some(()),
                )
            },
        )
        .await?;
    }
    assert!(
        domains(&f.namespace, "nonet").is_empty(),
        "nothing created without the network"
    );
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_cluster_gets_no_vm() -> Result<()> {
    let f = Fixture::new("paused").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    let mut bc = f.cluster("zz", 1)?;
    bc.spec.paused = true;
    f.api.create(&PostParams::default(), &bc).await?;
    wait::until("Paused reported", CONVERGE, POLL, || async {
        let bc = f.api.get("zz").await?;
        let status = bc.status.unwrap_or_default();
        anyhow::Ok(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Reconciling" && c.reason == "Paused")
                .then_some(()),
        )
    })
    .await?;
    assert!(domains(&f.namespace, "zz").is_empty());
    assert_eq!(
        controller.ctx.hypervisor.mutations.load(Ordering::Relaxed),
        0
    );
    f.api
        .patch(
            "zz",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await?;
    f.wait_ready("zz", 1).await?;
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_init_is_surfaced_then_retried() -> Result<()> {
    let f = Fixture::new("initfail").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    controller.ctx.guest.set_init_failing("bad-cp-0", true);
    f.create("bad", 1).await?;
    let condition = wait::until(
        "the init failure in the Ready condition",
        CONVERGE,
        POLL,
        || async {
            let bc = f.api.get("bad").await?;
            let conditions = bc.status.unwrap_or_default().conditions;
            anyhow::Ok(conditions.into_iter().find(|c| {
                c.type_ == "Ready" && c.reason == "StepFailed" && c.message.contains("kubeadm init")
            }))
        },
    )
    .await?;
    assert!(
        condition.message.contains("fake failure"),
        "kubeadm's output is shown: {}",
        condition.message
    );
    let events = f
        .server
        .kubectl(&["get", "events", "-n", &f.namespace, "-o", "yaml"])
        .output()?;
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("StepFailed"),
        "a Warning event"
    );

    // Retried with backoff, not in a hot loop: over 3 s with a 200 ms base and a 2 s cap,
    // at most a handful of attempts.
    let before = controller.ctx.guest.init_attempts.load(Ordering::Relaxed);
    let window = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < window {
        tokio::time::sleep(POLL).await;
    }
    let attempts = controller.ctx.guest.init_attempts.load(Ordering::Relaxed) - before;
    assert!(
        (1..=6).contains(&attempts),
        "{attempts} init attempts in 3 s"
    );

    controller.ctx.guest.set_init_failing("bad-cp-0", false);
    f.wait_ready("bad", 1).await?;
    assert_eq!(controller.ctx.guest.inits.load(Ordering::Relaxed), 1);
    controller.stop().await;
    Ok(())
}

/// How long the fake `kubeadm init` takes in the background-operation tests: far longer
/// than anything else a pass waits for on the test driver.
const SLOW_INIT: Duration = Duration::from_secs(4);

fn node_status(bc: &benchcluster_crd::BenchCluster, name: &str) -> Option<NodeStatus> {
    bc.status
        .as_ref()?
        .nodes
        .iter()
        .find(|n| n.name == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_nodes_progress_and_are_timed_while_kubeadm_runs() -> Result<()> {
    let f = Fixture::new("bgop").await?;
    let guest = FakeGuest::default()
        .with_init_latency(SLOW_INIT)
        .with_join_latency(Duration::from_secs(1));
    let controller = f.controller(guest);
    let created = std::time::Instant::now();
    f.create("bg", 1).await?;

    // The status is written while init runs: the worker is Reachable already.
    let seen = wait::until(
        "the control plane Initializing and the worker Reachable",
        CONVERGE,
        Duration::from_millis(50),
        || async {
            let bc = f.api.get("bg").await?;
            let cp = node_status(&bc, "bg-cp-0");
            let worker = node_status(&bc, "bg-w-0");
            anyhow::Ok(
                (cp.is_some_and(|n| n.state == NodeState::Initializing)
                    && worker.is_some_and(|n| n.state == NodeState::Reachable))
                .then(|| created.elapsed()),
            )
        },
    )
    .await?;
    assert_eq!(
        controller.ctx.guest.inits.load(Ordering::Relaxed),
        0,
        "seen while init ran"
    );
    let bc = f.wait_ready("bg", 1).await?;
    let status = bc.status.unwrap_or_default();
    let cp = &status.nodes[0].timings;
    let worker = &status.nodes[1].timings;
    eprintln!(
        "init in flight seen after {} ms; control plane {cp:?}; worker {worker:?}",
        seen.as_millis()
    );
    // The worker's lease and SSH were noticed while init ran, not after it.
    let bound = u64::try_from(SLOW_INIT.as_millis())? / 4;
    for (phase, ms) in [("lease", worker.lease_ms), ("ssh", worker.ssh_ms)] {
        let ms = ms.ok_or_else(|| anyhow::anyhow!("worker {phase} not timed: {worker:?}"))?;
        assert!(ms < bound, "worker {phase} took {ms} ms: {worker:?}");
    }
    // Init is timed from its start to its own end, and the Node was seen Ready at once.
    let init_ms = cp.init_ms.unwrap_or_default();
    assert!(
        (u64::try_from(SLOW_INIT.as_millis())?..u64::try_from(SLOW_INIT.as_millis())? + 2_000)
            .contains(&init_ms),
        "{cp:?}"
    );
    assert!(cp.ready_ms.is_some_and(|ms| ms < bound), "{cp:?}");
    assert!(worker.join_ms.is_some_and(|ms| ms >= 1_000), "{worker:?}");

    // Each operation started once, though many passes ran while it was in flight.
    let guest = &controller.ctx.guest;
    assert_eq!(guest.calls("init", "bg-cp-0"), 1);
    assert_eq!(guest.calls("join", "bg-w-0"), 1);
    assert_eq!(guest.calls("join", "bg-cp-0"), 0);
    assert_eq!(guest.inits.load(Ordering::Relaxed), 1);
    assert_eq!(guest.joins.load(Ordering::Relaxed), 1);
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_while_init_runs_aborts_it_and_leaves_nothing() -> Result<()> {
    let f = Fixture::new("delinit").await?;
    // Far longer than the test: only an abort ends it.
    let init = Duration::from_secs(120);
    let controller = f.controller(FakeGuest::default().with_init_latency(init));
    let bc = f.create("di", 1).await?;
    let uid = bc.uid().unwrap();
    wait::until("init in flight", CONVERGE, POLL, || async {
        let bc = f.api.get("di").await?;
        anyhow::Ok(
            node_status(&bc, "di-cp-0")
                .is_some_and(|n| n.state == NodeState::Initializing)
                .then_some(()),
        )
    })
    .await?;
    let deleting = std::time::Instant::now();
    f.delete_and_wait("di").await?;
    let deleted = deleting.elapsed();
    eprintln!(
        "deleted {} ms after the request, init in flight",
        deleted.as_millis()
    );
    assert!(deleted < Duration::from_secs(10), "took {deleted:?}");
    assert!(domains(&f.namespace, "di").is_empty());
    assert!(volumes(&f.namespace, "di").is_empty());
    let secret = Api::<Secret>::namespaced(f.client.clone(), &f.namespace)
        .get_opt("di-kubeconfig")
        .await?;
    assert!(secret.is_none(), "kubeconfig Secret left behind");
    assert!(!controller.ctx.operations.any_in_flight(&uid));
    let guest = &controller.ctx.guest;
    assert_eq!(guest.calls("init", "di-cp-0"), 1);
    assert_eq!(
        guest.init_attempts.load(Ordering::Relaxed),
        0,
        "the init was cut, not finished"
    );
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_controller_aborts_its_operations_and_the_next_one_finishes() -> Result<()> {
    let f = Fixture::new("stopinit").await?;
    let controller = f.controller(FakeGuest::default().with_init_latency(Duration::from_secs(120)));
    let bc = f.create("si", 1).await?;
    let uid = bc.uid().unwrap();
    wait::until("init in flight", CONVERGE, POLL, || async {
        controller.ctx.operations.any_in_flight(&uid).then_some(())
    })
    .await?;
    let ctx = Arc::clone(&controller.ctx);
    let stopping = std::time::Instant::now();
    controller.stop().await;
    let stopped = stopping.elapsed();
    eprintln!("stopped {} ms after the request", stopped.as_millis());
    assert!(stopped < Duration::from_secs(5), "took {stopped:?}");
    assert!(!ctx.operations.any_in_flight(&uid), "aborted on shutdown");
    assert_eq!(ctx.guest.init_attempts.load(Ordering::Relaxed), 0);

    // The next controller starts the init again, and it completes.
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.wait_ready("si", 1).await?;
    assert_eq!(controller.ctx.guest.calls("init", "si-cp-0"), 1);
    controller.stop().await;
    Ok(())
}
