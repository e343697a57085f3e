//! Whole passes over clusters of more than the default pool, on the testkit's in-memory
//! hypervisor, guest and API, on tokio's paused clock: registration and configuration
//! of a pool's Nodes, scaling one pool, the capacity check against the other domains on
//! the host, MACs unique on the host, shape drift, and lost extended resources.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use benchcluster_controller::hypervisor::{DomainSpec, HostCapacity, Owner};
use benchcluster_controller::names::{NodeId, PoolName};
use benchcluster_crd::{
    BenchCluster, Firmware, NamedWorkerPool, NodeState, NodeStatus, POOL_LABEL, PoolStatus, Taint,
    TaintEffect,
};
use benchcluster_testkit::{Call, FakeGuest};
use serde_json::json;
use support::{Bed, IMAGE, NETWORK};

const GIB: u64 = 1 << 30;
/// A label the kubelet may set on its own Node (outside `kubernetes.io`).
const ACCEL_LABEL: &str = "example.com/accel";
/// A label only an administrator may set (NodeRestriction).
const ROLE_LABEL: &str = "node-role.kubernetes.io/gpu";
const FAKE_GPU: &str = "example.com/fake-gpu";

fn gpu() -> PoolName {
    PoolName::new("gpu").unwrap()
}

fn gpu_node(index: u32) -> NodeId {
    NodeId::pooled(gpu(), index)
}

/// Pool `gpu`: `replicas` workers of `cpus` vCPUs and 3Gi, a label of each kind, a
/// taint, two fake GPUs each and a pod limit.
fn gpu_pool(replicas: i32, cpus: u32) -> NamedWorkerPool {
    serde_json::from_value(json!({
        "name": "gpu",
        "replicas": replicas,
        "cpus": cpus,
        "memory": "3Gi",
        "disk": "20Gi",
        "image": {"volume": IMAGE},
        "nodeLabels": {ACCEL_LABEL: "fake", ROLE_LABEL: ""},
        "taints": [{"key": ACCEL_LABEL, "value": "fake", "effect": "NoSchedule"}],
        "extendedResources": {FAKE_GPU: 2},
        "kubelet": {"maxPods": 30}
    }))
    .unwrap()
}

/// Changes the stored spec as a user's edit does (the API server bumps the generation).
fn edit(bed: &Bed, change: impl FnOnce(&mut BenchCluster)) {
    let mut bc = bed.bc();
    change(&mut bc);
    bc.metadata.generation = Some(bc.metadata.generation.unwrap_or(1) + 1);
    bed.api.put(&bc);
}

fn set_gpu_pool(bed: &Bed, pool: NamedWorkerPool) {
    edit(bed, |bc| bc.spec.pools = vec![pool]);
}

/// A bed of the default pool (1 worker) and pool `gpu` (`gpu_replicas` workers of 4
/// vCPUs), nothing created yet.
fn bed_with_gpu(gpu_replicas: i32, guest: FakeGuest) -> Bed {
    let bed = Bed::with_guest(1, guest);
    set_gpu_pool(&bed, gpu_pool(gpu_replicas, 4));
    bed
}

fn cp_node(bed: &Bed) -> String {
    bed.node(NodeId::CONTROL_PLANE)
}

fn status_node(bed: &Bed, id: NodeId) -> NodeStatus {
    let name = bed.node(id);
    bed.bc()
        .status
        .unwrap()
        .nodes
        .into_iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} in the status"))
}

fn pool_status(name: &str, replicas: i32, ready: i32) -> PoolStatus {
    PoolStatus {
        name: name.into(),
        replicas,
        ready_replicas: ready,
    }
}

/// (vCPUs, memory) of the node's domain.
fn size(bed: &Bed, id: NodeId) -> (u32, u64) {
    let domain = bed.hv.domain(&bed.domain(id)).expect("its domain");
    (domain.spec.vcpus, domain.spec.memory_bytes)
}

/// A domain of someone else's, `vcpus` and `memory_gib` big, holding `mac`.
fn foreign(name: &str, mac: &str, vcpus: u32, memory_gib: u64) -> DomainSpec {
    DomainSpec {
        name: name.into(),
        owner: Owner {
            uid: String::new(),
            namespace: String::new(),
            name: String::new(),
            node: NodeId::CONTROL_PLANE,
            host_key: None,
        },
        vcpus,
        memory_bytes: memory_gib * GIB,
        disk_volume: format!("{name}.qcow2"),
        seed_volume: None,
        mac: mac.into(),
        network: NETWORK.into(),
        firmware: Firmware::Bios,
    }
}

/// Mutating hypervisor calls made since `mark` (an index into the touched list).
fn touched_since(bed: &Bed, mark: usize) -> Vec<(Call, String)> {
    bed.hv.touched()[mark..].to_vec()
}

/// Runs `n` whole passes, each after the operations the previous one started ended.
async fn passes(bed: &Bed, n: usize) {
    for _ in 0..n {
        let _ = bed.pass().await;
        bed.operations_end().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_second_pool_forms_with_its_shape_registration_and_configuration() {
    let bed = bed_with_gpu(1, FakeGuest::default());
    bed.converge(30).await;
    let (cp, w0, g0) = (NodeId::CONTROL_PLANE, NodeId::worker(0), gpu_node(0));

    // Each domain has its pool's shape.
    assert_eq!(size(&bed, cp), (2, 2 * GIB));
    assert_eq!(size(&bed, w0), (1, GIB));
    assert_eq!(size(&bed, g0), (4, 3 * GIB));
    assert_eq!(bed.hv.domains().len(), 3);

    // The gpu worker registered with what its kubelet may set, and was configured
    // with the rest.
    let guest = bed.guest();
    let node = guest.node(&cp_node(&bed), &bed.node(g0)).unwrap();
    let registration = node.registration.clone().unwrap();
    let registered: BTreeMap<String, String> = [
        (ACCEL_LABEL.to_owned(), "fake".to_owned()),
        (POOL_LABEL.to_owned(), "gpu".to_owned()),
    ]
    .into();
    assert_eq!(
        registration.labels, registered,
        "no label the kubelet may not set"
    );
    assert_eq!(
        registration.taints,
        vec![Taint {
            key: ACCEL_LABEL.into(),
            value: "fake".into(),
            effect: TaintEffect::NoSchedule,
        }]
    );
    assert_eq!(registration.kubelet.max_pods, Some(30));
    assert_eq!(node.labels.get(ROLE_LABEL).map(String::as_str), Some(""));
    assert_eq!(
        node.labels.get(ACCEL_LABEL).map(String::as_str),
        Some("fake")
    );
    assert_eq!(node.extended_resources, [(FAKE_GPU.to_owned(), 2)].into());
    assert_eq!(guest.calls("configure", &bed.node(g0)), 1);

    // The default worker registered with its pool label only, and needs no configure.
    let default = guest.node(&cp_node(&bed), &bed.node(w0)).unwrap();
    let registration = default.registration.unwrap();
    assert_eq!(
        registration.labels,
        [(POOL_LABEL.to_owned(), "w".to_owned())].into()
    );
    assert!(registration.taints.is_empty());
    assert_eq!(registration.kubelet.max_pods, None);
    assert!(default.extended_resources.is_empty());
    assert_eq!(guest.calls("configure", &bed.node(w0)), 0);
    assert_eq!(guest.calls("configure", &cp_node(&bed)), 0);

    let status = bed.bc().status.unwrap();
    assert_eq!(
        status.pools,
        vec![pool_status("w", 1, 1), pool_status("gpu", 1, 1)]
    );
    assert_eq!(status.pool_summary.as_deref(), Some("w 1/1, gpu 1/1"));
    assert_eq!((status.ready_workers, status.desired_workers), (2, 2));
    assert_eq!(status.default_pool_ready, 1);
    let g = status_node(&bed, g0);
    assert_eq!(
        (g.pool.as_deref(), g.state, g.ready),
        (Some("gpu"), NodeState::Ready, true)
    );
}

#[tokio::test(start_paused = true)]
async fn scaling_one_pool_touches_no_domain_of_another() {
    let bed = bed_with_gpu(1, FakeGuest::default());
    bed.converge(30).await;
    let (w0, cp) = (NodeId::worker(0), NodeId::CONTROL_PLANE);
    let default_before = bed.hv.domain(&bed.domain(w0)).unwrap().spec;
    let cp_before = bed.hv.domain(&bed.domain(cp)).unwrap().spec;
    let gpu_prefix = format!("{}gpu-", bed.names().domain_prefix());

    // 1 -> 2
    let mark = bed.hv.touched().len();
    set_gpu_pool(&bed, gpu_pool(2, 4));
    bed.converge(30).await;
    let touched = touched_since(&bed, mark);
    assert!(!touched.is_empty());
    assert!(
        touched
            .iter()
            .all(|(_, name)| name.starts_with(&gpu_prefix)),
        "{touched:?}"
    );
    assert!(
        touched
            .iter()
            .all(|(_, name)| !name.starts_with(&bed.domain(gpu_node(0)))),
        "gpu-0 untouched: {touched:?}"
    );
    assert_eq!(size(&bed, gpu_node(1)), (4, 3 * GIB));
    assert_eq!(
        bed.bc().status.unwrap().pools,
        vec![pool_status("w", 1, 1), pool_status("gpu", 2, 2)]
    );

    // 2 -> 0
    let mark = bed.hv.touched().len();
    set_gpu_pool(&bed, gpu_pool(0, 4));
    bed.converge(30).await;
    let touched = touched_since(&bed, mark);
    assert!(
        touched
            .iter()
            .any(|(call, name)| *call == Call::RemoveDomain && *name == bed.domain(gpu_node(0)))
    );
    assert!(
        touched
            .iter()
            .all(|(_, name)| name.starts_with(&gpu_prefix)),
        "{touched:?}"
    );
    let domains: Vec<String> = bed.hv.domains().into_keys().collect();
    assert_eq!(domains, vec![bed.domain(cp), bed.domain(w0)]);
    for i in 0..2 {
        assert_eq!(
            bed.guest().calls("remove", &bed.node(gpu_node(i))),
            1,
            "drained"
        );
    }
    assert_eq!(
        bed.guest().nodes(&cp_node(&bed)),
        vec![bed.node(cp), bed.node(w0)]
    );

    // The default worker's VM and Node are as they were.
    let default_after = bed.hv.domain(&bed.domain(w0)).unwrap();
    assert_eq!(default_after.spec, default_before);
    assert!(default_after.running);
    assert_eq!(bed.hv.domain(&bed.domain(cp)).unwrap().spec, cp_before);
    assert_eq!(bed.guest().calls("join", &bed.node(w0)), 1);
    assert_eq!(bed.guest().calls("remove", &bed.node(w0)), 0);
    let status = bed.bc().status.unwrap();
    assert_eq!(
        status.pools,
        vec![pool_status("w", 1, 1), pool_status("gpu", 0, 0)]
    );
    assert_eq!(status.pool_summary.as_deref(), Some("w 1/1, gpu 0/0"));
}

#[tokio::test(start_paused = true)]
async fn a_cluster_that_does_not_fit_beside_other_domains_stalls_and_creates_nothing() {
    let bed = bed_with_gpu(1, FakeGuest::default());
    // 2 CPUs x 4 overcommit = 8 vCPUs; the cluster needs 2 + 1 + 4 = 7 and 6Gi; a
    // running foreign VM takes 4 vCPUs and 1Gi, a stopped one takes nothing.
    bed.hv.set_host(Some(HostCapacity {
        cpus: 2,
        memory_bytes: 8 * GIB,
    }));
    bed.hv
        .add_running_foreign_domain(foreign("other-vm", "52:54:00:fe:00:01", 4, 1));
    bed.hv
        .add_foreign_domain(foreign("parked-vm", "52:54:00:fe:00:02", 64, 64));

    passes(&bed, 3).await;
    let stalled = bed.condition("Stalled").unwrap();
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "InsufficientCapacity")
    );
    assert!(
        stalled.message.starts_with(
            "the cluster needs 7 vCPUs where the host has 4 free (2 CPUs x 4 overcommit, 4 \
             taken by other domains)"
        ),
        "{}",
        stalled.message
    );
    assert!(
        !stalled.message.contains("of memory"),
        "{}",
        stalled.message
    );
    let ready = bed.condition("Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InsufficientCapacity")
    );
    for call in [Call::CreateOverlay, Call::CreateSeed, Call::DefineDomain] {
        assert_eq!(bed.hv.calls(call), 0, "{call:?}");
    }
    assert!(bed.hv.touched().is_empty());

    // Room made: the cluster forms.
    bed.hv.remove_domain_behind("other-vm");
    bed.converge(30).await;
    assert_eq!(bed.condition("Stalled").unwrap().status, "False");
    assert_eq!(bed.hv.calls(Call::DefineDomain), 3);

    // Formed, it does not stall on a host that fills up again: nothing is left to create.
    bed.hv
        .add_running_foreign_domain(foreign("other-vm", "52:54:00:fe:00:01", 4, 1));
    passes(&bed, 2).await;
    assert!(bed.ready());
    assert_eq!(bed.condition("Stalled").unwrap().status, "False");
}

#[tokio::test(start_paused = true)]
async fn macs_held_by_other_domains_are_skipped_and_reported() {
    let bed = bed_with_gpu(1, FakeGuest::default());
    let names = bed.names();
    let (cp, w0, g0) = (NodeId::CONTROL_PLANE, NodeId::worker(0), gpu_node(0));
    let held: BTreeSet<String> = [names.mac(cp), names.mac(g0)].into();
    bed.hv
        .add_foreign_domain(foreign("other-a", &names.mac(cp), 1, 1));
    bed.hv
        .add_running_foreign_domain(foreign("other-b", &names.mac(g0), 1, 1));

    bed.converge(30).await;
    let macs: BTreeMap<NodeId, String> = [cp, w0, g0]
        .into_iter()
        .map(|id| (id, bed.hv.domain(&bed.domain(id)).unwrap().spec.mac))
        .collect();
    let distinct: BTreeSet<&String> = macs.values().collect();
    assert_eq!(distinct.len(), 3, "{macs:?}");
    assert!(distinct.iter().all(|m| !held.contains(*m)), "{macs:?}");
    // Deterministic: the first candidate no other domain holds.
    for (id, mac) in &macs {
        let expected = names
            .mac_candidates(*id)
            .find(|m| !held.contains(m))
            .unwrap();
        assert_eq!(*mac, expected, "{id}");
    }
    assert_ne!(macs[&cp], names.mac(cp));
    assert_eq!(macs[&w0], names.mac(w0), "a free first candidate is kept");
    for (id, mac) in &macs {
        assert_eq!(
            status_node(&bed, *id).mac.as_deref(),
            Some(mac.to_ascii_lowercase().as_str()),
            "{id}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_worker_of_another_shape_than_its_pool_is_drained_and_replaced() {
    let guest = FakeGuest::default().with_drain_latency(Duration::from_secs(5));
    let bed = bed_with_gpu(1, guest);
    bed.converge(30).await;
    let (cp, w0, g0) = (NodeId::CONTROL_PLANE, NodeId::worker(0), gpu_node(0));
    let cp_before = bed.hv.domain(&bed.domain(cp)).unwrap().spec;
    let w0_before = bed.hv.domain(&bed.domain(w0)).unwrap().spec;
    let mark = bed.hv.touched().len();

    // The pool declared again with 2 vCPUs (removed and re-added before its VM went).
    set_gpu_pool(&bed, gpu_pool(1, 2));
    bed.pass().await.unwrap();
    let g = status_node(&bed, g0);
    assert_eq!((g.state, g.ready), (NodeState::Replacing, false));
    assert!(!bed.ready());
    assert_eq!(
        bed.bc().status.unwrap().pools,
        vec![pool_status("w", 1, 1), pool_status("gpu", 1, 0)]
    );
    // Drained first: cordoned while its VM still exists.
    assert!(bed.guest().cordoned(&cp_node(&bed), &bed.node(g0)));
    assert_eq!(size(&bed, g0), (4, 3 * GIB));

    bed.converge(30).await;
    assert_eq!(size(&bed, g0), (2, 3 * GIB));
    assert_eq!(
        bed.guest().calls("remove", &bed.node(g0)),
        1,
        "drained once"
    );
    assert_eq!(bed.guest().removals.load(Ordering::Relaxed), 1);
    assert_eq!(bed.guest().calls("join", &bed.node(g0)), 2);
    let touched = touched_since(&bed, mark);
    let on = |call: Call, id: NodeId| {
        touched
            .iter()
            .filter(|(c, name)| *c == call && *name == bed.domain(id))
            .count()
    };
    assert_eq!(
        (on(Call::RemoveDomain, g0), on(Call::DefineDomain, g0)),
        (1, 1)
    );
    let removed_at = touched
        .iter()
        .position(|(c, n)| *c == Call::RemoveDomain && *n == bed.domain(g0));
    let defined_at = touched
        .iter()
        .position(|(c, n)| *c == Call::DefineDomain && *n == bed.domain(g0));
    assert!(removed_at < defined_at, "{touched:?}");
    let gpu_prefix = format!("{}gpu-", bed.names().domain_prefix());
    assert!(
        touched
            .iter()
            .all(|(_, name)| name.starts_with(&gpu_prefix)),
        "{touched:?}"
    );

    // The control plane and the default worker are untouched.
    assert_eq!(bed.hv.domain(&bed.domain(cp)).unwrap().spec, cp_before);
    assert_eq!(bed.hv.domain(&bed.domain(w0)).unwrap().spec, w0_before);
    assert_eq!(bed.guest().inits.load(Ordering::Relaxed), 1);
    assert_eq!(bed.guest().calls("join", &bed.node(w0)), 1);
    let status = bed.bc().status.unwrap();
    assert_eq!(
        status.pools,
        vec![pool_status("w", 1, 1), pool_status("gpu", 1, 1)]
    );
    assert!(status.nodes.iter().all(|n| n.state == NodeState::Ready));
}

#[tokio::test(start_paused = true)]
async fn a_control_plane_of_another_size_stalls_and_is_never_replaced() {
    let bed = bed_with_gpu(1, FakeGuest::default());
    bed.converge(30).await;
    let (defines, mutations) = (bed.hv.calls(Call::DefineDomain), bed.hv.mutations());

    edit(&bed, |bc| bc.spec.control_plane.cpus = 4);
    passes(&bed, 3).await;
    let stalled = bed.condition("Stalled").unwrap();
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "ControlPlaneSizeDiffers"),
        "{:#?}",
        bed.bc().status.map(|s| s.conditions)
    );
    assert!(
        stalled
            .message
            .starts_with("the control-plane VM has 2 vCPUs and 2048Mi of memory"),
        "{}",
        stalled.message
    );
    let ready = bed.condition("Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ControlPlaneSizeDiffers"),
        "Ready and Stalled never both hold"
    );
    assert_eq!(bed.hv.calls(Call::RemoveDomain), 0);
    assert_eq!(bed.hv.calls(Call::DefineDomain), defines);
    assert_eq!(bed.hv.mutations(), mutations, "nothing touched");
    assert_eq!(bed.guest().calls("init", &cp_node(&bed)), 1);
    assert_eq!(bed.guest().inits.load(Ordering::Relaxed), 1);
    assert_eq!(bed.guest().removals.load(Ordering::Relaxed), 0);
    assert_eq!(size(&bed, NodeId::CONTROL_PLANE), (2, 2 * GIB));
}

#[tokio::test(start_paused = true)]
async fn a_node_that_lost_its_extended_resources_is_configured_again_and_not_ready_meanwhile() {
    let bed = bed_with_gpu(1, FakeGuest::default());
    bed.converge(30).await;
    let (cp, g0) = (cp_node(&bed), bed.node(gpu_node(0)));
    assert_eq!(bed.guest().calls("configure", &g0), 1);

    // The kubelet re-registered its Node: what the controller put on it is gone.
    bed.guest().reregister(&cp, &g0);
    assert!(
        bed.guest()
            .node(&cp, &g0)
            .unwrap()
            .extended_resources
            .is_empty()
    );

    bed.pass().await.unwrap();
    // Put right in the pass that saw it...
    assert_eq!(bed.guest().calls("configure", &g0), 2);
    let node = bed.guest().node(&cp, &g0).unwrap();
    assert_eq!(node.extended_resources, [(FAKE_GPU.to_owned(), 2)].into());
    assert_eq!(node.labels.get(ROLE_LABEL).map(String::as_str), Some(""));
    // ...whose status does not count it ready.
    let status = bed.bc().status.unwrap();
    assert_eq!(
        status.pools,
        vec![pool_status("w", 1, 1), pool_status("gpu", 1, 0)]
    );
    assert_eq!(status.ready_workers, 1);
    assert!(!status_node(&bed, gpu_node(0)).ready);
    assert_eq!(bed.condition("Ready").unwrap().status, "False");

    // The next pass finds it configured: Ready, and no configure again.
    bed.pass().await.unwrap();
    assert!(bed.ready());
    assert_eq!(bed.guest().calls("configure", &g0), 2);
    assert_eq!(
        bed.bc().status.unwrap().pools,
        vec![pool_status("w", 1, 1), pool_status("gpu", 1, 1)]
    );
}
