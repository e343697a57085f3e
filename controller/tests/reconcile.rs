//! Unit tests of whole passes (the driver: finalizer, apply, cleanup, error policy) on
//! the testkit's in-memory hypervisor, guest and API, on tokio's paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use benchcluster_controller::hypervisor::Hypervisor;
use benchcluster_controller::names::{NodeId, Seed, VolumeKind};
use benchcluster_controller::reconcile::error_policy;
use benchcluster_controller::seed::key_tag;
use benchcluster_crd::{BenchCluster, FINALIZER, NodeState};
use benchcluster_testkit::{Call, Method};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action as Requeue;
use support::{Bed, NAME, NAMESPACE, benchcluster, settings};

fn status_patches(bed: &Bed) -> usize {
    bed.api.count(&Method::PATCH, "/benchclusters/bench/status")
}

#[tokio::test(start_paused = true)]
async fn the_first_pass_adds_the_finalizer_and_creates_nothing() {
    let bed = Bed::new(1);
    bed.api.put(&benchcluster(1));
    let requeue = bed.pass().await.unwrap();
    assert_eq!(requeue, Requeue::await_change());
    assert_eq!(
        bed.bc().metadata.finalizers,
        Some(vec![FINALIZER.to_owned()])
    );
    assert_eq!(bed.hv.mutations(), 0);
}

#[tokio::test(start_paused = true)]
async fn passes_converge_to_ready_then_rest_without_writes() {
    let bed = Bed::new(2);
    let passes = bed.converge(30).await;
    let status = bed.bc().status.unwrap();
    assert_eq!(status.nodes.len(), 3);
    assert!(
        status.nodes.iter().all(|n| n.state == NodeState::Ready),
        "{:?}",
        status.nodes
    );
    assert_eq!(bed.hv.domains().len(), 3);
    assert_eq!(bed.hv.volumes().len(), 6, "a disk and a seed per node");
    assert_eq!(bed.guest().inits.load(Ordering::Relaxed), 1);
    assert_eq!(bed.guest().joins.load(Ordering::Relaxed), 2);
    assert!(
        bed.api
            .get::<Secret>(NAMESPACE, "bench-kubeconfig")
            .is_some()
    );
    let ready_events = bed.events().iter().filter(|r| *r == "Ready").count();
    assert_eq!(ready_events, 1);
    assert!(passes <= 12, "{passes} passes");

    // At rest: a pass writes nothing anywhere and waits for the resync.
    let (patches, mutations) = (status_patches(&bed), bed.hv.mutations());
    let requeue = bed.pass().await.unwrap();
    assert_eq!(requeue, Requeue::requeue(settings().resync_interval));
    assert_eq!(status_patches(&bed), patches);
    assert_eq!(bed.hv.mutations(), mutations);
}

#[tokio::test(start_paused = true)]
async fn a_pass_on_a_copy_older_than_its_own_write_writes_nothing_again() {
    let bed = Bed::new(1);
    bed.converge(30).await;
    // The watch has not delivered the last writes yet: the next pass is given a copy
    // from before them (an older revision, an older status).
    let mut stale = bed.bc();
    let current = stale.status.clone().unwrap();
    stale.metadata.resource_version = Some("1".into());
    stale.status = Some(Default::default());
    let (patches, events) = (status_patches(&bed), bed.events().len());
    benchcluster_controller::reconcile::reconcile(Arc::new(stale.clone()), Arc::clone(&bed.ctx))
        .await
        .unwrap();
    assert_eq!(
        status_patches(&bed),
        patches,
        "compared with its own last write"
    );
    assert_eq!(bed.events().len(), events, "no second Ready event");
    assert_eq!(bed.bc().status.unwrap(), current);

    // Someone else rewrote the status since (a newer revision): that copy is compared.
    let mut edited = bed.bc();
    edited.status = Some(Default::default());
    bed.api.put(&edited);
    bed.pass().await.unwrap();
    assert_eq!(
        status_patches(&bed),
        patches + 1,
        "the edited status is repaired"
    );
    assert!(benchcluster_controller::reconcile::status::same(
        &bed.bc().status.unwrap(),
        &current
    ));
}

#[tokio::test(start_paused = true)]
async fn a_pass_that_dies_half_way_is_resumed_without_duplicates() {
    let bed = Bed::new(1);
    bed.hv.hang(Call::DefineDomain);
    // The pass hangs in the middle of defining domains; dropping it is the process dying.
    let died = tokio::time::timeout(Duration::from_secs(30), bed.pass()).await;
    assert!(died.is_err(), "the pass was cut");
    assert_eq!(bed.hv.calls(Call::CreateOverlay), 2, "both disks were made");
    assert!(bed.hv.domains().is_empty());

    bed.hv.heal(Call::DefineDomain);
    bed.converge(30).await;
    assert_eq!(bed.hv.calls(Call::CreateOverlay), 2, "no disk made twice");
    assert_eq!(bed.hv.domains().len(), 2);
    assert_eq!(bed.hv.volumes().len(), 4);
    assert_eq!(bed.guest().inits.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_controller_restarted_mid_provisioning_adopts_what_exists() {
    let bed = Bed::new(1);
    bed.hv.hang(Call::StartDomain);
    let _ = tokio::time::timeout(Duration::from_secs(30), bed.pass()).await;
    assert_eq!(bed.hv.domains().len(), 2);
    bed.hv.heal(Call::StartDomain);
    let keys: Vec<_> = bed
        .hv
        .domains()
        .values()
        .map(|d| d.spec.owner.host_key.clone())
        .collect();

    // A new controller (fresh memory) on the same host and API.
    let restarted = bed.restarted();
    restarted.converge(30).await;
    assert_eq!(
        restarted.hv.calls(Call::DefineDomain),
        2,
        "defined once each, before"
    );
    let after: Vec<_> = restarted
        .hv
        .domains()
        .values()
        .map(|d| d.spec.owner.host_key.clone())
        .collect();
    assert_eq!(after, keys, "the pinned host keys are kept");
}

#[tokio::test(start_paused = true)]
async fn cleanup_when_apply_never_ran_only_removes_the_finalizer() {
    let bed = Bed::new(2);
    let mut bc: BenchCluster = bed.bc();
    bc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    bed.api.put(&bc);
    let requeue = bed.pass().await.unwrap();
    assert_eq!(requeue, Requeue::await_change());
    assert!(
        bed.api.get::<BenchCluster>(NAMESPACE, NAME).is_none(),
        "deleted"
    );
    assert_eq!(bed.hv.mutations(), 0);
    assert!(bed.events().contains(&"Deleted".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn cleanup_of_a_formed_cluster_leaves_nothing() {
    let bed = Bed::new(1);
    bed.converge(30).await;
    let mut bc = bed.bc();
    bc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    bed.api.put(&bc);
    bed.pass().await.unwrap();
    assert!(bed.hv.domains().is_empty());
    assert!(bed.hv.volumes().is_empty());
    assert!(
        bed.api
            .get::<Secret>(NAMESPACE, "bench-kubeconfig")
            .is_none()
    );
    assert!(bed.api.get::<BenchCluster>(NAMESPACE, NAME).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_cleanup_that_cannot_remove_a_vm_keeps_the_finalizer() {
    let bed = Bed::new(0);
    bed.converge(30).await;
    bed.hv.fail(Call::RemoveDomain);
    let mut bc = bed.bc();
    bc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    bed.api.put(&bc);
    let error = bed.pass().await.unwrap_err();
    assert!(
        error.chain().contains("undefine domain"),
        "{}",
        error.chain()
    );
    let bc = bed.api.get::<BenchCluster>(NAMESPACE, NAME).expect("kept");
    assert_eq!(bc.metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
    bed.hv.heal(Call::RemoveDomain);
    bed.pass().await.unwrap();
    assert!(bed.api.get::<BenchCluster>(NAMESPACE, NAME).is_none());
    assert!(bed.hv.domains().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failing_start_shows_in_the_status_and_recovers() {
    let bed = Bed::new(0);
    bed.hv.fail(Call::StartDomain);
    let mut error = None;
    for _ in 0..3 {
        if let Err(e) = bed.pass().await {
            error = Some(e);
        }
    }
    let error = error.expect("a failed pass");
    assert!(error.chain().contains("StartDomain"), "{}", error.chain());
    let ready = bed.condition("Ready").unwrap();
    assert_eq!(ready.status, "False");
    assert!(bed.events().contains(&"StepFailed".to_owned()));
    bed.hv.heal(Call::StartDomain);
    bed.converge(30).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_kubeadm_init_is_reported_and_retried_until_it_succeeds() {
    let bed = Bed::new(1);
    let cp = bed.node(NodeId::CONTROL_PLANE);
    bed.guest().set_init_failing(&cp, true);
    for _ in 0..12 {
        let _ = bed.pass().await;
        bed.operations_end().await;
        if bed.guest().init_attempts.load(Ordering::Relaxed) >= 2 {
            break;
        }
    }
    assert!(
        bed.guest().init_attempts.load(Ordering::Relaxed) >= 2,
        "retried"
    );
    let _ = bed.pass().await;
    let status = bed.bc().status.unwrap();
    let text = format!("{:?}", status.conditions);
    assert!(text.contains("kubeadm init"), "{text}");
    assert!(!bed.ready());
    assert_eq!(
        bed.guest().joins.load(Ordering::Relaxed),
        0,
        "no join before init"
    );

    bed.guest().set_init_failing(&cp, false);
    bed.converge(30).await;
    assert_eq!(bed.guest().inits.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_status_write_that_fails_is_made_by_the_next_pass() {
    let bed = Bed::new(0);
    bed.api.fail(Method::PATCH, "/status", 500);
    let error = bed.pass().await.unwrap_err();
    assert!(
        error.chain().contains("patch the status"),
        "{}",
        error.chain()
    );
    assert!(bed.bc().status.is_none());
    bed.api.heal();
    bed.pass().await.unwrap();
    assert!(bed.bc().status.is_some());
}

#[tokio::test(start_paused = true)]
async fn failed_passes_back_off_exponentially_with_jitter_to_the_cap_and_a_success_resets_it() {
    let bed = Bed::new(0);
    let uid = bed.names().uid;
    let (base, cap) = (settings().backoff_base, settings().backoff_cap);
    bed.hv.fail(Call::Inventory);
    let error = bed.pass().await.unwrap_err();
    // The policy requeues the failed object (it never waits for a change).
    let requeue = error_policy(Arc::new(bed.bc()), &error, Arc::clone(&bed.ctx));
    assert_ne!(requeue, Requeue::await_change());
    // Its delays: each failure's in [base * 2^n, base * 2^(n+1)], never beyond the cap.
    let mut delays = Vec::new();
    for n in 1..13u32 {
        let d = bed.ctx.backoff(&uid);
        let floor = (base * 2u32.pow(n)).min(cap);
        let ceiling = (base * 2u32.pow(n + 1)).min(cap);
        assert!(
            d >= floor && d <= ceiling,
            "failure {n}: {d:?} outside {floor:?}..={ceiling:?}"
        );
        delays.push(d);
    }
    assert_eq!(delays.last(), Some(&cap), "the cap holds with jitter");
    assert!(
        delays[..5]
            .iter()
            .zip(1..)
            .any(|(d, n)| *d != base * 2u32.pow(n)),
        "jittered: {delays:?}"
    );

    // A successful pass starts the backoff over.
    bed.hv.heal(Call::Inventory);
    bed.pass().await.unwrap();
    let d = bed.ctx.backoff(&uid);
    assert!(d >= base && d <= base * 2, "{d:?}");
}

/// A cluster formed by a controller that named one seed per node without its key
/// (`<domain>.<uid>.seed.img`): this controller, restarted on it, adopts it without
/// touching anything, and its cleanup takes those seeds too.
#[tokio::test(start_paused = true)]
async fn a_cluster_seeded_under_the_previous_naming_is_adopted_undisturbed() {
    let bed = Bed::new(2);
    bed.converge(30).await;
    let names = bed.names();
    // Every seed under the previous name, as that controller left them.
    for volume in bed.hv.volumes() {
        if let Some((id, VolumeKind::Seed(_))) = names.volume_owner(&volume) {
            let content = bed.hv.volume_content(&volume).unwrap();
            bed.hv.delete_volume(&volume).await.unwrap();
            bed.hv
                .create_seed(&names.seed_volume(id, &Seed::Legacy), &content)
                .await
                .unwrap();
        }
    }
    let volumes = bed.hv.volumes();
    assert_eq!(
        volumes.iter().filter(|v| v.ends_with(".seed.img")).count(),
        3
    );

    let restarted = bed.restarted();
    let (mutations, defines) = (
        restarted.hv.mutations(),
        restarted.hv.calls(Call::DefineDomain),
    );
    for _ in 0..3 {
        restarted.pass().await.unwrap();
        restarted.operations_end().await;
    }
    assert!(restarted.ready());
    assert_eq!(restarted.hv.mutations(), mutations, "nothing touched");
    assert_eq!(restarted.hv.calls(Call::DefineDomain), defines);
    assert_eq!(restarted.hv.volumes(), volumes, "the legacy seeds are kept");

    let mut bc = restarted.bc();
    bc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    restarted.api.put(&bc);
    restarted.pass().await.unwrap();
    assert!(
        restarted.hv.volumes().is_empty(),
        "{:?}",
        restarted.hv.volumes()
    );
}

/// A stopped VM whose seed was deleted (behind the controller's back, or by a racing
/// controller) cannot start: it is defined again on its disk with a fresh key and a
/// seed of that key, and the cluster is Ready again.
#[tokio::test(start_paused = true)]
async fn a_stopped_vm_whose_seed_is_gone_is_defined_again_on_its_disk() {
    let bed = Bed::new(1);
    bed.converge(30).await;
    let names = bed.names();
    let w0 = NodeId::worker(0);
    let before = bed.hv.domain(&names.domain(w0)).unwrap();
    let seed = before.spec.seed_volume.clone().unwrap();
    bed.hv.stop(&names.domain(w0));
    bed.hv.delete_volume(&seed).await.unwrap();

    bed.converge(30).await;
    let after = bed.hv.domain(&names.domain(w0)).unwrap();
    assert!(after.running);
    assert_ne!(after.spec.owner.host_key, before.spec.owner.host_key);
    let key = after.spec.owner.host_key.clone().unwrap();
    let own = names.seed_volume(w0, &Seed::Keyed(key_tag(&key).unwrap()));
    assert_eq!(after.spec.seed_volume.as_ref(), Some(&own));
    assert!(bed.hv.volumes().contains(&own));
    assert_eq!(bed.hv.volumes().len(), 4, "{:?}", bed.hv.volumes());
    assert_eq!(
        bed.guest().joins.load(Ordering::Relaxed),
        1,
        "its disk kept its join"
    );
}
