//! The shared host inventory (reconcile::inventory) under the passes of many
//! BenchClusters: one refresh per tick for all of them, single-flight, fresh after the
//! controller's own mutations, and a failed refresh that fails its passes and is not
//! kept. On the testkit's in-memory hypervisor and API, on tokio's paused clock (a
//! delayed inventory read is a refresh in flight that costs no real time).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use benchcluster_controller::Error;
use benchcluster_controller::hypervisor::HypervisorError;
use benchcluster_controller::names::{ClusterNames, NodeId};
use benchcluster_controller::reconcile::act::act;
use benchcluster_controller::reconcile::observe::{GuestApi, Observation, observe};
use benchcluster_controller::reconcile::world::VmState;
use benchcluster_controller::reconcile::{Action, Context, Settings, reconcile};
use benchcluster_crd::{BenchCluster, FINALIZER};
use benchcluster_testkit::{Call, FakeApi, FakeGuest, FakeHypervisor};
use futures::future::join_all;
use kube::ResourceExt;
use support::{IMAGE, NAMESPACE, NETWORK, TestContext, benchcluster, settings, ssh_secret};

const CP: NodeId = NodeId::CONTROL_PLANE;

/// A host shared by `clusters` BenchClusters of one control plane and `workers`
/// workers each, named `bench-0`, `bench-1`, ...
struct Host {
    api: FakeApi,
    hv: FakeHypervisor,
    ctx: Arc<TestContext>,
    clusters: Vec<String>,
}

impl Host {
    fn new(clusters: usize, workers: i32, inventory_ttl: Duration) -> Self {
        let api = FakeApi::new();
        let hv = FakeHypervisor::new(NETWORK, &[IMAGE]);
        api.put(&ssh_secret());
        let names: Vec<String> = (0..clusters).map(|i| format!("bench-{i}")).collect();
        for name in &names {
            let mut bc = benchcluster(workers);
            bc.metadata.name = Some(name.clone());
            bc.metadata.finalizers = Some(vec![FINALIZER.into()]);
            api.put(&bc);
        }
        let settings = Settings {
            inventory_ttl,
            ..settings()
        };
        let ctx = Arc::new(Context::new(
            api.client(),
            hv.clone(),
            FakeGuest::default(),
            settings,
        ));
        Self {
            api,
            hv,
            ctx,
            clusters: names,
        }
    }

    fn bc(&self, name: &str) -> BenchCluster {
        self.api.get(NAMESPACE, name).expect("stored")
    }

    fn names(&self, name: &str) -> ClusterNames {
        ClusterNames {
            namespace: NAMESPACE.into(),
            name: name.into(),
            uid: self.bc(name).uid().unwrap(),
        }
    }

    fn refreshes(&self) -> u64 {
        self.hv.calls(Call::Inventory)
    }

    async fn observe(&self, name: &str) -> benchcluster_controller::Result<Observation> {
        observe(&self.bc(name), &self.names(name), &self.ctx, GuestApi::Ask).await
    }

    async fn pass(&self, name: &str) -> benchcluster_controller::Result<()> {
        reconcile(Arc::new(self.bc(name)), Arc::clone(&self.ctx))
            .await
            .map(drop)
    }

    /// One pass of every cluster, all at once.
    async fn round(&self) -> Vec<benchcluster_controller::Result<()>> {
        join_all(self.clusters.iter().map(|name| self.pass(name))).await
    }

    fn ready(&self, name: &str) -> bool {
        self.bc(name).status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    }

    /// Passes of `name` until it is Ready, each after its background operations ended
    /// (virtual time, bounded); returns how many it took.
    async fn converge(&self, name: &str, max: usize) -> usize {
        let uid = self.names(name).uid;
        for n in 1..=max {
            let _ = self.pass(name).await;
            for _ in 0..1000 {
                if !self.ctx.operations.any_in_flight(&uid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if self.ready(name) {
                return n;
            }
        }
        panic!("{name} not Ready after {max} passes");
    }
}

/// (a) A whole lifecycle inside one tick (an hour): without the mutations ending the
/// snapshot, the second pass would see the empty host of the first and create every
/// disk and domain again (and never converge).
#[tokio::test(start_paused = true)]
async fn a_mutation_by_act_is_seen_by_the_next_observe_of_its_cluster() {
    let host = Host::new(1, 1, Duration::from_secs(3600));
    let name = host.clusters[0].clone();
    let names = host.names(&name);

    // Single stages: what act made is in the very next observation.
    let before = host.observe(&name).await.unwrap();
    assert!(before.world.nodes.is_empty());
    let outcome = act(
        &host.bc(&name),
        &names,
        &before,
        vec![Action::CreateDisk(CP), Action::DefineDomain(CP)],
        &host.ctx,
    )
    .await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    let after = host.observe(&name).await.unwrap();
    let cp = &after.world.nodes[&CP];
    assert!(cp.disk && !cp.seeds.is_empty(), "{cp:?}");
    assert_eq!(cp.domain, Some(VmState::Stopped));
    assert_eq!(host.refreshes(), 2);

    // Whole passes to Ready: each disk, seed and domain made once.
    host.converge(&name, 20).await;
    assert_eq!(host.hv.calls(Call::CreateOverlay), 2);
    assert_eq!(host.hv.calls(Call::CreateSeed), 2);
    assert_eq!(host.hv.calls(Call::DefineDomain), 2);
    assert_eq!(
        host.hv.calls(Call::DomainOwner),
        2,
        "one direct read per define"
    );
    assert_eq!(host.hv.calls(Call::StartDomain), 2);
    assert_eq!(host.hv.domains().len(), 2);

    // At rest within the tick: a pass reads nothing from the host.
    let (refreshes, mutations) = (host.refreshes(), host.hv.mutations());
    host.pass(&name).await.unwrap();
    assert_eq!(host.refreshes(), refreshes);
    assert_eq!(host.hv.mutations(), mutations);
}

/// (b) Fifty clusters pass at once: their observes wait for the one refresh in
/// flight. The next round needs a snapshot taken after the first round's mutations:
/// again one for all. A round that changed nothing leaves the snapshot to the next
/// one within the tick.
#[tokio::test(start_paused = true)]
async fn the_passes_of_many_clusters_in_one_tick_share_one_refresh() {
    let host = Host::new(50, 0, Duration::from_secs(1));
    host.hv.delay(Call::Inventory, Duration::from_millis(50));
    let round = || async {
        let results = host.round().await;
        assert!(results.iter().all(Result::is_ok));
        host.hv.mutations()
    };

    let created = round().await;
    assert_eq!(host.refreshes(), 1, "one refresh for fifty passes");
    assert_eq!(
        created, 200,
        "a disk, a seed, a definition and a start each"
    );
    assert_eq!(host.hv.domains().len(), 50);

    let probed = round().await;
    assert_eq!(
        host.refreshes(),
        2,
        "a new one after the mutations, one for all"
    );
    assert_eq!(probed, created, "the second round only probed");

    round().await;
    assert_eq!(
        host.refreshes(),
        2,
        "nothing changed within the tick: no read"
    );
    assert_eq!(host.hv.calls(Call::DefineDomain), 50, "no duplicate define");
}

/// Without a mutation, a snapshot serves every cluster until its tick ends.
#[tokio::test(start_paused = true)]
async fn a_snapshot_serves_every_cluster_until_its_tick_ends() {
    let host = Host::new(3, 0, Duration::from_secs(1));
    for name in &host.clusters {
        host.observe(name).await.unwrap();
    }
    assert_eq!(host.refreshes(), 1);
    tokio::time::advance(Duration::from_millis(999)).await;
    host.observe(&host.clusters[0]).await.unwrap();
    assert_eq!(host.refreshes(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    host.observe(&host.clusters[1]).await.unwrap();
    assert_eq!(host.refreshes(), 2, "a tick later the host is read anew");
}

/// (c) A failed refresh is the error of every pass that waited on it (one libvirt
/// read, typed), and is not kept: the next passes read again and go on.
#[tokio::test(start_paused = true)]
async fn a_failed_refresh_fails_the_passes_waiting_on_it_and_the_next_pass_retries() {
    let host = Host::new(10, 0, Duration::from_secs(1));
    host.hv.delay(Call::Inventory, Duration::from_millis(50));
    host.hv.fail(Call::Inventory);
    let failed = host.round().await;
    assert_eq!(host.refreshes(), 1);
    for result in &failed {
        let error = result.as_ref().unwrap_err();
        let shared = match error {
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) => e,
                other => panic!("{other:?}"),
            },
            other => other,
        };
        assert!(
            matches!(
                shared,
                Error::Hypervisor(HypervisorError::Shared(inner))
                    if matches!(inner.as_ref(), HypervisorError::Libvirt { .. })
            ),
            "{shared:?}"
        );
        assert!(
            error.chain().contains("host inventory"),
            "{}",
            error.chain()
        );
    }
    assert_eq!(host.hv.mutations(), 0, "nothing acted on an unknown host");

    // Within the same tick: the failure was not kept.
    host.hv.heal(Call::Inventory);
    let healed = host.round().await;
    assert!(healed.iter().all(Result::is_ok));
    assert_eq!(host.refreshes(), 2);
    assert_eq!(host.hv.domains().len(), 10);
}

/// A refresh that began before a mutation ended does not serve the passes after it,
/// even when it is still in flight; one that began before them does (single-flight).
#[tokio::test(start_paused = true)]
async fn only_a_refresh_begun_after_a_mutation_serves_the_passes_after_it() {
    let host = Host::new(2, 0, Duration::ZERO);
    let (a, b) = (host.clusters[0].clone(), host.clusters[1].clone());
    host.hv.delay(Call::Inventory, Duration::from_millis(100));

    // Two observes at once: the second joins the first one's refresh.
    let (first, second) = tokio::join!(host.observe(&a), host.observe(&b));
    first.unwrap();
    let before = second.unwrap();
    assert_eq!(host.refreshes(), 1);

    // b's disk is made while a's refresh is in flight: b's next observe waits for a
    // refresh of its own, and sees the disk.
    let (_, after) = tokio::join!(host.observe(&a), async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let outcome = act(
            &host.bc(&b),
            &host.names(&b),
            &before,
            vec![Action::CreateDisk(CP)],
            &host.ctx,
        )
        .await;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        host.observe(&b).await
    });
    assert_eq!(host.refreshes(), 3);
    assert!(after.unwrap().world.nodes[&CP].disk);
}

/// A pass dropped while it refreshes (a cancelled pass, a dying controller) leaves
/// the passes that waited on it to refresh themselves, not to wait forever.
#[tokio::test(start_paused = true)]
async fn a_pass_dropped_mid_refresh_leaves_its_waiters_to_refresh_themselves() {
    let host = Host::new(2, 0, Duration::ZERO);
    host.hv.delay(Call::Inventory, Duration::from_millis(100));
    let (dropped, waiter) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(50), host.observe(&host.clusters[0])),
        host.observe(&host.clusters[1]),
    );
    assert!(dropped.is_err(), "the first observe was cut mid-refresh");
    waiter.unwrap();
    assert_eq!(host.refreshes(), 2);
}
