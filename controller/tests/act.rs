//! Unit tests of the act stage: each planned action's effect and its failure path, on
//! the testkit's in-memory hypervisor, guest and API (tokio's paused clock).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use benchcluster_controller::Error;
use benchcluster_controller::hypervisor::Hypervisor;
use benchcluster_controller::hypervisor::{DomainSpec, HypervisorError, Owner};
use benchcluster_controller::names::VolumeKind;
use benchcluster_controller::names::{NodeId, PoolName, Seed};
use benchcluster_controller::reconcile::Action;
use benchcluster_controller::reconcile::act::act;
use benchcluster_controller::reconcile::timeline::Event;
use benchcluster_controller::seed::key_tag;
use benchcluster_crd::{Firmware, Role};
use benchcluster_testkit::{Call, FakeGuest, Method};

use k8s_openapi::api::core::v1::Secret;
use support::{Bed, IMAGE, NAMESPACE, NETWORK};

const CP: NodeId = NodeId::CONTROL_PLANE;
const W0: NodeId = NodeId {
    role: Role::Worker,
    pool: PoolName::DEFAULT,
    index: 0,
};

fn events_of(outcome: &benchcluster_controller::reconcile::Outcome) -> Vec<(NodeId, Event)> {
    outcome.stamps.iter().map(|s| (s.node, s.event)).collect()
}

#[tokio::test(start_paused = true)]
async fn create_disk_makes_the_overlay_and_stamps_the_start() {
    let bed = Bed::new(1);
    let names = bed.names();
    let outcome = bed.act(vec![Action::CreateDisk(W0)]).await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert_eq!(bed.hv.volumes(), [names.disk_volume(W0)]);
    assert_eq!(events_of(&outcome), [(W0, Event::CreateStarted)]);
    // Idempotent: a second run finds the volume and creates nothing new.
    bed.act(vec![Action::CreateDisk(W0)]).await;
    assert_eq!(bed.hv.volumes(), [names.disk_volume(W0)]);
}

#[tokio::test(start_paused = true)]
async fn a_missing_base_image_is_a_permanent_failure_named_for_the_user() {
    let bed = Bed::new(1);
    let mut bc = bed.bc();
    bc.spec.workers.template.image.volume = "absent.qcow2".into();
    bed.api.put(&bc);
    let outcome = bed.act(vec![Action::CreateDisk(W0)]).await;
    let (action, error) = &outcome.failures[0];
    assert_eq!(*action, Action::CreateDisk(W0));
    assert!(error.is_permanent());
    assert_eq!(error.reason(), "ImageNotFound");
    assert!(bed.hv.volumes().is_empty());
    assert_eq!(bed.events(), ["StepFailed"]);
}

#[tokio::test(start_paused = true)]
async fn define_domain_writes_the_seed_and_pins_a_host_key_once() {
    let bed = Bed::new(1);
    let names = bed.names();
    bed.act(vec![Action::CreateDisk(W0)]).await;
    let outcome = bed.act(vec![Action::DefineDomain(W0)]).await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    let domain = bed.hv.domain(&names.domain(W0)).expect("defined");
    assert!(!domain.running);
    assert_eq!(domain.spec.owner.uid, names.uid);
    assert_eq!(domain.spec.owner.node, W0);
    assert_eq!(domain.spec.vcpus, 1);
    assert_eq!(domain.spec.memory_bytes, 1 << 30);
    assert_eq!(domain.spec.mac, names.mac(W0));
    let key = domain
        .spec
        .owner
        .host_key
        .clone()
        .expect("a pinned host key");
    assert!(key.starts_with("ssh-ed25519 "), "{key}");
    // The domain boots from the seed named by the key it pins, and that seed holds it.
    let seed_volume = names.seed_volume(W0, &Seed::Keyed(key_tag(&key).unwrap()));
    assert_eq!(domain.spec.seed_volume.as_ref(), Some(&seed_volume));
    let seed = bed.hv.volume_content(&seed_volume).expect("a seed");
    assert!(
        contains(&seed, key.as_bytes()),
        "the seed holds the pinned key"
    );
    assert_eq!(
        bed.hv.volumes(),
        [seed_volume, names.disk_volume(W0)],
        "one seed"
    );
    assert_eq!(
        events_of(&outcome),
        [(W0, Event::DefineStarted), (W0, Event::Defined)]
    );

    // Run again (a pass whose status write was lost): the domain and its key stay.
    let defines = bed.hv.calls(Call::DefineDomain);
    let again = bed.act(vec![Action::DefineDomain(W0)]).await;
    assert!(again.failures.is_empty());
    assert!(again.stamps.is_empty());
    assert_eq!(bed.hv.calls(Call::DefineDomain), defines);
    assert_eq!(
        bed.hv
            .domain(&names.domain(W0))
            .unwrap()
            .spec
            .owner
            .host_key,
        Some(key)
    );
}

#[tokio::test(start_paused = true)]
async fn a_name_held_by_someone_else_is_never_taken_over() {
    let bed = Bed::new(1);
    let names = bed.names();
    bed.hv.add_foreign_domain(DomainSpec {
        name: names.domain(W0),
        owner: Owner {
            uid: "someone-else".into(),
            namespace: "other".into(),
            name: "other".into(),
            node: W0,
            host_key: None,
        },
        vcpus: 1,
        memory_bytes: 1 << 30,
        disk_volume: "theirs.qcow2".into(),
        seed_volume: None,
        mac: "52:54:00:00:00:01".into(),
        network: NETWORK.into(),
        firmware: Firmware::Bios,
    });
    bed.act(vec![Action::CreateDisk(W0)]).await;
    let outcome = bed.act(vec![Action::DefineDomain(W0)]).await;
    let (_, error) = &outcome.failures[0];
    assert!(
        matches!(
            error,
            Error::Hypervisor(HypervisorError::NameConflict { .. })
        ),
        "{error:?}"
    );
    assert_eq!(error.reason(), "NameConflict");
    assert_eq!(bed.hv.calls(Call::DefineDomain), 0);
    assert!(bed.hv.domain(&names.domain(W0)).unwrap().foreign);
}

#[tokio::test(start_paused = true)]
async fn a_failing_define_stops_that_node_and_not_the_others() {
    let bed = Bed::new(2);
    let names = bed.names();
    let w1 = NodeId::worker(1);
    bed.act(vec![Action::CreateDisk(W0), Action::CreateDisk(w1)])
        .await;
    bed.hv.fail(Call::DefineDomain);
    let outcome = bed
        .act(vec![
            Action::DefineDomain(W0),
            Action::StartDomain(W0),
            Action::DeleteVolumes(w1),
        ])
        .await;
    assert_eq!(outcome.failures.len(), 1, "{:?}", outcome.failures);
    let (action, error) = &outcome.failures[0];
    assert_eq!(*action, Action::DefineDomain(W0));
    assert!(
        matches!(error, Error::Hypervisor(HypervisorError::Libvirt { .. })),
        "{error:?}"
    );
    assert!(!error.is_permanent());
    // The node's later step did not run; the other node's did.
    assert_eq!(bed.hv.calls(Call::StartDomain), 0);
    assert!(!bed.hv.volumes().contains(&names.disk_volume(w1)));
    assert_eq!(bed.events(), ["StepFailed"]);
    // The seed written before the failing define stays unused: the next attempt
    // writes a seed of its own key, and the first is then a stray that goes.
    bed.hv.heal(Call::DefineDomain);
    let retried = bed.act(vec![Action::DefineDomain(W0)]).await;
    assert!(retried.failures.is_empty());
    let domain = bed.hv.domain(&names.domain(W0)).expect("defined");
    assert_eq!(seeds_of(&bed, W0).len(), 2);
    bed.act(vec![Action::DeleteStraySeeds(W0)]).await;
    assert_eq!(seeds_of(&bed, W0), Vec::from_iter(domain.spec.seed_volume));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The seed volumes of a node of the bed's cluster.
fn seeds_of(bed: &Bed, id: NodeId) -> Vec<String> {
    let names = bed.names();
    bed.hv
        .volumes()
        .into_iter()
        .filter(
            |v| matches!(names.volume_owner(v), Some((node, VolumeKind::Seed(_))) if node == id),
        )
        .collect()
}

/// Two controllers defining one node at once (no leader election, or a leader paused
/// past its Lease): the one whose define is stuck has written its seed, the other
/// writes its own and defines the domain. Neither seed is overwritten, the domain
/// boots from the seed of the key it pins, and the stuck one's seed is deleted as a
/// stray: only once the domain exists, read again directly before deleting.
#[tokio::test(start_paused = true)]
async fn racing_definitions_each_write_their_own_seed_and_the_losers_goes() {
    let bed = Bed::new(1);
    let names = bed.names();
    bed.act(vec![Action::CreateDisk(W0)]).await;
    let paused = bed.restarted();
    bed.hv.hang(Call::DefineDomain);
    let stuck = tokio::spawn(async move {
        paused.act(vec![Action::DefineDomain(W0)]).await;
    });
    wait_for(|| seeds_of(&bed, W0).len() == 1).await;
    let losers = seeds_of(&bed, W0);
    let loser_content = bed.hv.volume_content(&losers[0]).unwrap();
    bed.hv.heal(Call::DefineDomain);

    // The other pass, from a view without the domain, defines it.
    let outcome = bed.act(vec![Action::DefineDomain(W0)]).await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    let domain = bed.hv.domain(&names.domain(W0)).expect("defined");
    let key = domain.spec.owner.host_key.clone().unwrap();
    let own = names.seed_volume(W0, &Seed::Keyed(key_tag(&key).unwrap()));
    assert_eq!(domain.spec.seed_volume.as_ref(), Some(&own));
    assert!(contains(
        &bed.hv.volume_content(&own).unwrap(),
        key.as_bytes()
    ));
    assert_eq!(
        bed.hv.volume_content(&losers[0]).unwrap(),
        loser_content,
        "the stuck pass's seed is not overwritten"
    );

    // The stray is seen as such and goes; the domain's own seed stays.
    let observation = bed.observe().await;
    let node = observation.world.node(W0).unwrap();
    assert_eq!(node.stray_seeds().len(), 1);
    let outcome = bed.act(vec![Action::DeleteStraySeeds(W0)]).await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert_eq!(seeds_of(&bed, W0), [own]);
    // Again: nothing more to delete, no error.
    assert!(
        bed.act(vec![Action::DeleteStraySeeds(W0)])
            .await
            .failures
            .is_empty()
    );
    stuck.abort();
}

/// A stray seen in a view that is stale by the time it would be deleted: the domain
/// was removed since (another pass may be defining it again on the seed it just
/// wrote). The direct read before deleting sees that, and nothing goes.
#[tokio::test(start_paused = true)]
async fn a_stray_is_not_deleted_when_the_domain_is_gone_since_the_view() {
    let bed = Bed::new(1);
    let names = bed.names();
    bed.act(vec![Action::CreateDisk(W0), Action::DefineDomain(W0)])
        .await;
    // A seed some pass wrote and that no domain boots from (yet).
    let written = names.seed_volume(W0, &Seed::Keyed(key_tag(&other_key()).unwrap()));
    bed.hv.create_seed(&written, b"just written").await.unwrap();
    let observation = bed.observe().await;
    assert_eq!(observation.world.node(W0).unwrap().stray_seeds().len(), 1);

    bed.hv.remove_domain(&names.domain(W0)).await.unwrap();
    let outcome = act(
        &bed.bc(),
        &names,
        &observation,
        vec![Action::DeleteStraySeeds(W0)],
        &bed.ctx,
    )
    .await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert_eq!(seeds_of(&bed, W0).len(), 2, "nothing deleted");
    assert!(bed.hv.volumes().contains(&written));
}

/// Removal deletes every seed of the node: its own, strays, a legacy one.
#[tokio::test(start_paused = true)]
async fn delete_volumes_takes_every_seed_of_the_node() {
    let bed = Bed::new(1);
    let names = bed.names();
    bed.act(vec![Action::CreateDisk(W0), Action::DefineDomain(W0)])
        .await;
    for seed in [Seed::Legacy, Seed::Keyed(key_tag(&other_key()).unwrap())] {
        bed.hv
            .create_seed(&names.seed_volume(W0, &seed), b"seed")
            .await
            .unwrap();
    }
    assert_eq!(seeds_of(&bed, W0).len(), 3);
    let outcome = bed
        .act(vec![Action::RemoveDomain(W0), Action::DeleteVolumes(W0)])
        .await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert!(bed.hv.volumes().is_empty(), "{:?}", bed.hv.volumes());
}

fn other_key() -> String {
    benchcluster_controller::seed::HostKey::generate()
        .unwrap()
        .public_openssh
}

/// Polls (virtual time, bounded) until `done`.
async fn wait_for(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_start_leaves_the_domain_defined_and_is_retried() {
    let bed = Bed::new(1);
    let names = bed.names();
    bed.act(vec![Action::CreateDisk(W0), Action::DefineDomain(W0)])
        .await;
    bed.hv.fail(Call::StartDomain);
    let outcome = bed.act(vec![Action::StartDomain(W0)]).await;
    assert_eq!(outcome.failures[0].0, Action::StartDomain(W0));
    assert!(outcome.stamps.is_empty(), "a failed start is no boot");
    assert!(!bed.hv.domain(&names.domain(W0)).unwrap().running);

    bed.hv.heal(Call::StartDomain);
    let outcome = bed.act(vec![Action::StartDomain(W0)]).await;
    assert!(outcome.failures.is_empty());
    assert!(bed.hv.domain(&names.domain(W0)).unwrap().running);
    assert!(matches!(
        events_of(&outcome)[..],
        [(W0, Event::Booted { .. })]
    ));
    assert_eq!(bed.events(), ["StepFailed", "VmStarted"]);
}

#[tokio::test(start_paused = true)]
async fn probe_waits_for_ssh_and_stamps_the_first_answer() {
    let bed = Bed::new(1);
    for make in [
        Action::CreateDisk,
        Action::DefineDomain,
        Action::StartDomain,
    ] {
        bed.act(vec![make(W0)]).await;
    }
    bed.guest().set_unreachable(&bed.node(W0), true);
    let outcome = bed.act(vec![Action::ProbeSsh(W0)]).await;
    assert!(outcome.failures.is_empty());
    assert_eq!(outcome.waiting_for_ssh, [W0]);
    assert!(outcome.stamps.is_empty());

    bed.guest().set_unreachable(&bed.node(W0), false);
    let outcome = bed.act(vec![Action::ProbeSsh(W0)]).await;
    assert!(outcome.waiting_for_ssh.is_empty());
    assert_eq!(events_of(&outcome), [(W0, Event::Reachable)]);
    let timeline = bed.ctx.timeline_snapshot(&bed.names().uid, W0).unwrap();
    assert!(timeline.timings.ssh_ms.is_some(), "{timeline:?}");
}

#[tokio::test(start_paused = true)]
async fn a_node_without_a_lease_is_not_reached_over_ssh() {
    let bed = Bed::new(1);
    bed.hv.set_dhcp_answering(false);
    for make in [
        Action::CreateDisk,
        Action::DefineDomain,
        Action::StartDomain,
    ] {
        bed.act(vec![make(W0)]).await;
    }
    let outcome = bed.act(vec![Action::ProbeSsh(W0)]).await;
    assert!(
        matches!(
            outcome.failures[..],
            [(Action::ProbeSsh(W0), Error::NotReady { .. })]
        ),
        "{:?}",
        outcome.failures
    );
}

#[tokio::test(start_paused = true)]
async fn without_the_ssh_key_secret_only_guest_steps_wait() {
    let bed = Bed::new(2);
    let names = bed.names();
    bed.api.delete::<Secret>(NAMESPACE, support::SSH_SECRET);
    let outcome = bed
        .act(vec![
            Action::CreateDisk(W0),
            Action::DefineDomain(W0),
            Action::CreateDisk(NodeId::worker(1)),
        ])
        .await;
    let (action, error) = &outcome.failures[0];
    assert_eq!(*action, Action::DefineDomain(W0));
    assert!(matches!(error, Error::SshKeySecret { .. }), "{error:?}");
    assert_eq!(error.reason(), "SshKeySecretInvalid");
    // Both disks were still created; no domain was defined without its seed's key.
    assert_eq!(bed.hv.volumes().len(), 2);
    assert!(bed.hv.domains().is_empty());
    assert!(!bed.hv.volumes().iter().any(|v| v.ends_with(".seed.img")));
    let _ = names;
}

#[tokio::test(start_paused = true)]
async fn kubeadm_init_runs_in_the_background_and_its_success_stores_the_kubeconfig() {
    let bed = Bed::with_guest(
        0,
        FakeGuest::default().with_init_latency(Duration::from_secs(90)),
    );
    let names = bed.names();
    bed.booted(0).await;
    let outcome = bed.act(vec![Action::InitControlPlane]).await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert!(
        bed.ctx.operations.any_in_flight(&names.uid),
        "init runs in the background"
    );
    // Nothing to collect while it runs.
    assert!(bed.collect().await.stamps.is_empty());

    bed.operations_end().await;
    let collected = bed.collect().await;
    assert!(collected.failures.is_empty(), "{:?}", collected.failures);
    assert!(matches!(
        events_of(&collected)[..],
        [(CP, Event::Initialised { .. })]
    ));
    let secret: Secret = bed
        .api
        .get(NAMESPACE, &names.kubeconfig_secret())
        .expect("the kubeconfig Secret");
    assert!(secret.data.unwrap().contains_key("value"));
    let owner = &secret.metadata.owner_references.unwrap()[0];
    assert_eq!(owner.uid, names.uid);
    assert!(bed.events().contains(&"ControlPlaneInitialized".to_owned()));
    let timings = bed.ctx.timeline_snapshot(&names.uid, CP).unwrap().timings;
    assert!(timings.init_ms.is_some(), "{timings:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_kubeadm_init_is_a_failure_remembered_while_it_is_retried() {
    let bed = Bed::new(0);
    let names = bed.names();
    bed.booted(0).await;
    bed.guest().set_init_failing(&bed.node(CP), true);
    let collected = bed.operation(Action::InitControlPlane).await;
    let (action, error) = &collected.failures[0];
    assert_eq!(*action, Action::InitControlPlane);
    assert!(
        error.chain().contains("kubeadm init failed"),
        "{}",
        error.chain()
    );
    assert_eq!(bed.events(), ["VmStarted", "StepFailed"]);
    assert!(
        bed.api
            .get::<Secret>(NAMESPACE, &names.kubeconfig_secret())
            .is_none()
    );

    // Started again, the earlier failure shows while the new attempt runs.
    let again = bed.act(vec![Action::InitControlPlane]).await;
    assert_eq!(again.retrying.len(), 1, "{:?}", again.retrying);
    assert!(again.retrying[0].1.contains("[preflight] fake failure"));
    bed.guest().set_init_failing(&bed.node(CP), false);
    bed.operations_end().await;
    assert!(bed.collect().await.failures.is_empty());
    // A success clears it.
    assert!(bed.act(vec![]).await.retrying.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failing_drain_keeps_the_vm_and_a_later_one_removes_the_node() {
    let bed = Bed::new(1);
    let names = bed.names();
    bed.booted(1).await;
    bed.operation(Action::InitControlPlane).await;
    bed.operation(Action::JoinWorker(W0)).await;
    let cp = bed.node(CP);
    assert!(bed.guest().nodes(&cp).contains(&bed.node(W0)));

    bed.guest().set_drain_failing(&bed.node(W0), true);
    let collected = bed.operation(Action::DrainNode(W0)).await;
    assert_eq!(collected.failures[0].0, Action::DrainNode(W0));
    assert!(collected.failures[0].1.chain().contains("timed out"));
    assert!(
        bed.guest().cordoned(&cp, &bed.node(W0)),
        "cordoned, not deleted"
    );
    assert!(bed.hv.domain(&names.domain(W0)).is_some());

    bed.guest().set_drain_failing(&bed.node(W0), false);
    bed.act(vec![Action::DrainNode(W0)]).await;
    bed.operations_end().await;
    assert!(bed.collect().await.failures.is_empty());
    assert!(!bed.guest().nodes(&cp).contains(&bed.node(W0)));
    assert!(bed.events().contains(&"NodeDrained".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn removal_aborts_the_nodes_operation_and_leaves_nothing() {
    let bed = Bed::with_guest(
        1,
        FakeGuest::default().with_join_latency(Duration::from_secs(600)),
    );
    let names = bed.names();
    bed.booted(1).await;
    bed.operation(Action::InitControlPlane).await;
    bed.act(vec![Action::JoinWorker(W0)]).await;
    assert!(bed.ctx.operations.in_flight(&names.uid).contains_key(&W0));

    let outcome = bed
        .act(vec![Action::RemoveDomain(W0), Action::DeleteVolumes(W0)])
        .await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert_eq!(events_of(&outcome), [(W0, Event::Removed)]);
    assert!(!bed.ctx.operations.in_flight(&names.uid).contains_key(&W0));
    assert!(bed.hv.domain(&names.domain(W0)).is_none());
    assert!(
        !bed.hv
            .volumes()
            .iter()
            .any(|v| v.contains("-w-0") || *v == names.disk_volume(W0))
    );
    assert!(
        bed.ctx.timeline_snapshot(&names.uid, W0).is_none(),
        "its timeline went with it"
    );
    // Removing again is no error.
    let again = bed
        .act(vec![Action::RemoveDomain(W0), Action::DeleteVolumes(W0)])
        .await;
    assert!(again.failures.is_empty());
}

#[tokio::test(start_paused = true)]
async fn forgetting_a_cluster_deletes_its_kubeconfig_secret_once() {
    let bed = Bed::new(0);
    let names = bed.names();
    bed.booted(0).await;
    bed.operation(Action::InitControlPlane).await;
    assert!(
        bed.api
            .get::<Secret>(NAMESPACE, &names.kubeconfig_secret())
            .is_some()
    );
    let outcome = bed.act(vec![Action::ForgetCluster]).await;
    assert!(outcome.failures.is_empty());
    assert!(
        bed.api
            .get::<Secret>(NAMESPACE, &names.kubeconfig_secret())
            .is_none()
    );
    // Already gone: still no error.
    assert!(
        bed.act(vec![Action::ForgetCluster])
            .await
            .failures
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn uncordon_undoes_an_abandoned_drain() {
    let bed = Bed::with_guest(
        1,
        FakeGuest::default().with_drain_latency(Duration::from_secs(600)),
    );
    let names = bed.names();
    bed.booted(1).await;
    bed.operation(Action::InitControlPlane).await;
    bed.operation(Action::JoinWorker(W0)).await;
    bed.act(vec![Action::DrainNode(W0)]).await;
    let cp = bed.node(CP);
    // The drain cordoned the Node and is still waiting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !bed.guest().cordoned(&cp, &bed.node(W0)) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outcome = bed
        .act(vec![Action::Abandon(W0), Action::Uncordon(W0)])
        .await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert!(!bed.ctx.operations.any_in_flight(&names.uid));
    assert!(!bed.guest().cordoned(&cp, &bed.node(W0)));
    assert!(
        bed.guest().nodes(&cp).contains(&bed.node(W0)),
        "the Node stays"
    );
    assert_eq!(
        bed.guest()
            .uncordons
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_kubeconfig_secret_that_cannot_be_stored_fails_the_init_step() {
    let bed = Bed::new(0);
    let names = bed.names();
    bed.booted(0).await;
    bed.api.fail(Method::PATCH, "/secrets/", 500);
    let collected = bed.operation(Action::InitControlPlane).await;
    let (action, error) = &collected.failures[0];
    assert_eq!(*action, Action::InitControlPlane);
    assert!(matches!(error, Error::Kube { .. }), "{error:?}");
    // kubeadm itself succeeded: the next init only reads the kubeconfig back.
    bed.api.heal();
    bed.act(vec![Action::InitControlPlane]).await;
    bed.operations_end().await;
    assert!(bed.collect().await.failures.is_empty());
    assert!(
        bed.api
            .get::<Secret>(NAMESPACE, &names.kubeconfig_secret())
            .is_some()
    );
    assert_eq!(
        bed.guest().inits.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let _ = IMAGE;
}
