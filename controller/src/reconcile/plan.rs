//! The planner: a pure function from desired and observed state to the next actions.
//!
//! No client, no clock, no randomness. It decides creation, kubeadm init and join,
//! drain and removal, and their order: the control plane is initialised before any
//! worker joins, workers proceed in parallel, surplus workers go highest index first,
//! and the control plane is never removed while a worker exists.
//!
//! Init, join and drain run in the background: the planner starts nothing more for a
//! node whose operation is in flight, and abandons an operation whose node is no longer
//! wanted or no longer running.
//!
//! Each VM incarnation boots from a seed of its own, named by its host key: the planner
//! deletes a node's other seeds only beside a domain that boots from a seed of its own
//! key (never a seed without its domain: another controller's define may be on its
//! way), and all of them with the node.

use benchcluster_crd::{BenchClusterSpec, Role};

use super::world::{GuestCluster, NetworkState, ObservedNode, Operation, VmState, World};
use crate::names::NodeId;

/// One step the act stage can take. Steps of one node run in the order planned; steps
/// of different nodes are independent and may run concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Create the node's qcow2 overlay on its role's base image.
    CreateDisk(NodeId),
    /// Generate the node's host key, write its identity seed (named by that key), and
    /// define its domain booting from it (owner metadata and pinned host key in the
    /// domain XML).
    DefineDomain(NodeId),
    /// Start the node's domain.
    StartDomain(NodeId),
    /// Prove the node answers over SSH with its pinned host key; the node's later steps
    /// of the pass wait until it does.
    ProbeSsh(NodeId),
    /// Forget the guest cluster whose control-plane disk is gone (delete its kubeconfig
    /// Secret): the cluster went with the disk, and the control plane built on a fresh
    /// one is initialised anew.
    ForgetCluster,
    /// Start `kubeadm init` on the control plane in the background; the pass that
    /// collects its success stores the admin kubeconfig. On a control plane whose init
    /// completed once it only reads the kubeconfig (and re-registers a deleted Node):
    /// the guest never resets a node whose kubeadm finished.
    InitControlPlane,
    /// Start minting a join command and `kubeadm join` of the worker in the background.
    JoinWorker(NodeId),
    /// Start cordoning, draining and deleting the node's Node in the background.
    DrainNode(NodeId),
    /// Make schedulable again a wanted node that a drain of ours cordoned (the drain
    /// was abandoned: scaled back up, or the controller restarted mid-drain).
    Uncordon(NodeId),
    /// Put its pool's labels (those the kubelet may not set itself, and any removed
    /// since) and extended resources on a registered worker's Node.
    ConfigureNode(NodeId),
    /// Start switching the control plane's scheduler to the spec's configuration in
    /// the background (rolled back if the scheduler refuses it).
    SwitchScheduler,
    /// Abort the node's operation in flight: its node is no longer wanted or running.
    Abandon(NodeId),
    /// Destroy and undefine the node's domain.
    RemoveDomain(NodeId),
    /// Delete the node's disk overlay and every identity seed of it.
    DeleteVolumes(NodeId),
    /// Delete the node's stray seeds ([`ObservedNode::stray_seeds`]), once its domain is
    /// read again directly and still boots from another one.
    DeleteStraySeeds(NodeId),
}

impl Action {
    /// The node this step acts on.
    pub fn node(self) -> NodeId {
        match self {
            Action::InitControlPlane | Action::ForgetCluster | Action::SwitchScheduler => {
                NodeId::CONTROL_PLANE
            }
            Action::CreateDisk(id)
            | Action::DefineDomain(id)
            | Action::StartDomain(id)
            | Action::ProbeSsh(id)
            | Action::JoinWorker(id)
            | Action::DrainNode(id)
            | Action::Uncordon(id)
            | Action::ConfigureNode(id)
            | Action::Abandon(id)
            | Action::RemoveDomain(id)
            | Action::DeleteVolumes(id)
            | Action::DeleteStraySeeds(id) => id,
        }
    }

    /// The step that starts `operation` on `node`.
    pub fn starting(operation: Operation, node: NodeId) -> Action {
        match operation {
            Operation::Init => Action::InitControlPlane,
            Operation::Join => Action::JoinWorker(node),
            Operation::Drain => Action::DrainNode(node),
            Operation::Scheduler => Action::SwitchScheduler,
        }
    }

    /// Whether the step takes away something of the node: its Node, VM or volumes.
    /// Deleting stray seeds is not: it takes nothing the node uses.
    pub fn is_removal(self) -> bool {
        matches!(
            self,
            Action::DrainNode(_) | Action::RemoveDomain(_) | Action::DeleteVolumes(_)
        )
    }
}

pub use super::pools::desired_nodes;
use super::pools::{configured, drifted, fit, is_desired};

/// Next actions to bring `world` towards `spec`.
pub fn plan(spec: &BenchClusterSpec, world: &World) -> Vec<Action> {
    let mut actions = Vec::new();
    if spec.paused {
        return actions;
    }
    // Abandoned first: the node's other steps of this pass replace its operation.
    for (&id, &operation) in &world.operations {
        if !operation_still_useful(spec, world, id, operation) {
            actions.push(Action::Abandon(id));
        }
    }
    let empty = ObservedNode::default();
    if world.network == NetworkState::Ready {
        let cp = world.node(NodeId::CONTROL_PLANE).unwrap_or(&empty);
        if !cp.disk && world.cluster != GuestCluster::Uninitialised {
            actions.push(Action::ForgetCluster);
        }
    }
    // A cluster that does not fit on the host gets no new VM (the status says what is
    // short); what exists carries on, and surplus still goes.
    let fits = world.capacity.is_none_or(|c| fit(spec, &c).is_ok());
    for id in desired_nodes(spec) {
        let node = world.node(id).unwrap_or(&empty);
        // First: whatever else the node waits for, its strays can go.
        if !node.stray_seeds().is_empty() {
            actions.push(Action::DeleteStraySeeds(id));
        }
        if replaced(spec, id, node) {
            continue;
        }
        if world.network == NetworkState::Ready && (fits || node.exists()) {
            create_or_progress(spec, id, node, world, &mut actions);
        }
    }
    // Surplus nodes go; so do workers of another size than their pool's, which later
    // passes create again with the pool's shape.
    let leaving: Vec<NodeId> = world
        .nodes
        .iter()
        .filter(|(id, node)| !is_desired(spec, **id) || replaced(spec, **id, node))
        .map(|(id, _)| *id)
        .collect();
    remove(&leaving, world, true, &mut actions);
    actions
}

/// `actions` without the operations that would start again on `failed` nodes, whose
/// operation failed in this very pass: they start again after the backoff, not at once
/// (a failure wakes its BenchCluster, so an immediate restart would be a hot loop).
pub fn defer_retries(actions: Vec<Action>, failed: &[NodeId]) -> Vec<Action> {
    actions
        .into_iter()
        .filter(|a| {
            let starts = matches!(
                a,
                Action::InitControlPlane
                    | Action::JoinWorker(_)
                    | Action::DrainNode(_)
                    | Action::SwitchScheduler
            );
            !(starts && failed.contains(&a.node()))
        })
        .collect()
}

/// Whether the worker's VM is replaced: its vCPUs or memory differ from its pool's. A
/// control plane of another size stays (replacing it would lose the cluster); the
/// status says so.
fn replaced(spec: &BenchClusterSpec, id: NodeId, node: &ObservedNode) -> bool {
    id.role == Role::Worker && drifted(spec, id, node)
}

/// Whether the operation in flight can still achieve something: kubeadm on a desired
/// node that runs with its address, a drain of a node that goes whose domain exists.
fn operation_still_useful(
    spec: &BenchClusterSpec,
    world: &World,
    id: NodeId,
    operation: Operation,
) -> bool {
    let Some(node) = world.node(id) else {
        return false;
    };
    match operation {
        Operation::Init | Operation::Join => {
            is_desired(spec, id)
                && !replaced(spec, id, node)
                && node.domain == Some(VmState::Running)
                && node.disk
                && node.ip.is_some()
        }
        Operation::Drain => {
            (!is_desired(spec, id) || replaced(spec, id, node)) && node.domain.is_some()
        }
        // Not abandoned for a newer spec: a switch cut half-way could leave the
        // scheduler down; the next one follows it.
        Operation::Scheduler => node.domain == Some(VmState::Running) && node.ip.is_some(),
    }
}

/// Whether the control plane's scheduler should be switched: it runs another
/// configuration than the spec's, one it has not refused.
fn scheduler_to_switch(spec: &BenchClusterSpec, world: &World) -> bool {
    world
        .scheduler
        .as_ref()
        .is_some_and(|running| !running.runs(&spec.scheduler))
        && !world
            .rejected_scheduler
            .as_ref()
            .is_some_and(|r| r.is_for(&spec.scheduler))
}

/// Actions that remove everything the cluster owns: workers (highest index first),
/// then, once no worker is left, the control plane.
pub fn plan_teardown(world: &World) -> Vec<Action> {
    let mut actions = Vec::new();
    let all: Vec<NodeId> = world.nodes.keys().copied().collect();
    // A whole cluster goes away: draining its Nodes would only slow the deletion.
    remove(&all, world, false, &mut actions);
    actions
}

fn create_or_progress(
    spec: &BenchClusterSpec,
    id: NodeId,
    node: &ObservedNode,
    world: &World,
    out: &mut Vec<Action>,
) {
    match (node.domain, node.disk) {
        (None, disk) => {
            if !disk {
                out.push(Action::CreateDisk(id));
            }
            out.push(Action::DefineDomain(id));
            out.push(Action::StartDomain(id));
        }
        (Some(_), false) => {
            // The disk vanished under a defined domain: rebuild the VM from scratch.
            out.extend([
                Action::RemoveDomain(id),
                Action::CreateDisk(id),
                Action::DefineDomain(id),
                Action::StartDomain(id),
            ]);
        }
        (Some(VmState::Stopped), true) if node.seed_missing() => {
            // Its seed went (deleted behind our back, or by a racing controller that
            // took it for a stray): it cannot start; define it again on its disk.
            out.extend([
                Action::RemoveDomain(id),
                Action::DefineDomain(id),
                Action::StartDomain(id),
            ]);
        }
        (Some(VmState::Stopped), true) => out.push(Action::StartDomain(id)),
        (Some(VmState::Running), true) => {
            if node.ip.is_none() {
                return; // booting: wait for the lease
            }
            if matches!(world.operation(id), Some(Operation::Init | Operation::Join)) {
                return; // kubeadm runs: wait for its result
            }
            // Probed as soon as it has an address, so its SSH timing is its own, not
            // the time it waited for the control plane.
            let probe = (!node.reachable).then_some(Action::ProbeSsh(id));
            match id.role {
                Role::ControlPlane => {
                    // Unreachable is not uninitialised: a control plane whose API does
                    // not answer (emulation, a restarting static pod, a benchmark
                    // loading it) waits; init is for a cluster never stored, or for a
                    // reachable one that provably lacks the control plane's Node.
                    let init = match world.cluster {
                        GuestCluster::Uninitialised => true,
                        GuestCluster::Reachable => node.registered.is_none(),
                        GuestCluster::Unreachable(_) => false,
                    };
                    if init {
                        out.extend(probe);
                        out.push(Action::InitControlPlane);
                    } else if world.cluster == GuestCluster::Reachable
                        && node.registered == Some(true)
                        && world.operation(id).is_none()
                        && scheduler_to_switch(spec, world)
                    {
                        out.extend(probe);
                        out.push(Action::SwitchScheduler);
                    }
                }
                Role::Worker => {
                    let control_plane_up = matches!(world.cluster, GuestCluster::Reachable)
                        && world
                            .node(NodeId::CONTROL_PLANE)
                            .is_some_and(|cp| cp.registered.is_some());
                    if node.registered.is_none() {
                        out.extend(probe);
                        if control_plane_up {
                            out.push(Action::JoinWorker(id));
                        }
                    }
                }
            }
            // A drain of a wanted node is abandoned earlier in this pass, so its
            // cordon can go in the same pass.
            if node.cordoned
                && node.registered.is_some()
                && world.cluster == GuestCluster::Reachable
            {
                out.push(Action::Uncordon(id));
            }
            // Registered with what the kubelet may set; the rest (and whatever went
            // missing since, such as resources a re-registered Node lost) is put on.
            if id.role == Role::Worker
                && node.registered.is_some()
                && world.cluster == GuestCluster::Reachable
                && !configured(spec, id, node)
            {
                out.push(Action::ConfigureNode(id));
            }
        }
    }
}

/// Removal steps for `nodes`: workers highest index first, and the control plane only
/// when no worker would remain.
fn remove(nodes: &[NodeId], world: &World, drain: bool, out: &mut Vec<Action>) {
    let mut ordered: Vec<NodeId> = nodes.to_vec();
    ordered.sort_by(|a, b| b.cmp(a)); // workers before the control plane, index descending
    let workers_exist = world.has_workers();
    for id in ordered {
        // Removal steps of different nodes run concurrently, so the control plane waits
        // for a pass in which no worker exists at all.
        if id.role == Role::ControlPlane && workers_exist {
            continue;
        }
        let Some(node) = world.node(id) else { continue };
        if drain && world.operation(id) == Some(Operation::Drain) && node.domain.is_some() {
            continue; // draining: removed once the drain ended
        }
        if drain && node.registered.is_some() && world.cluster == GuestCluster::Reachable {
            out.push(Action::DrainNode(id));
        }
        if node.domain.is_some() {
            out.push(Action::RemoveDomain(id));
        }
        if node.disk || !node.seeds.is_empty() {
            out.push(Action::DeleteVolumes(id));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::names::{KeyTag, Seed};
    use crate::reconcile::world::RunningScheduler;
    use crate::reconcile::world::VmSize;
    use benchcluster_crd::{
        Firmware, ImageSpec, KubernetesSpec, NetworkSpec, NodeTemplate, SecretReference, SshSpec,
        WorkerPool, WorkerTemplate,
    };
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicU64, Ordering};

    pub(crate) fn spec(replicas: i32) -> BenchClusterSpec {
        let image = ImageSpec {
            volume: "base.qcow2".into(),
            firmware: Firmware::Bios,
        };
        BenchClusterSpec {
            control_plane: NodeTemplate {
                cpus: 2,
                memory: "2Gi".into(),
                disk: "10Gi".into(),
                image: image.clone(),
            },
            workers: WorkerPool {
                replicas,
                template: WorkerTemplate {
                    cpus: 2,
                    memory: "2Gi".into(),
                    disk: "10Gi".into(),
                    image,
                    node_labels: BTreeMap::new(),
                    taints: Vec::new(),
                    extended_resources: BTreeMap::new(),
                    kubelet: Default::default(),
                },
            },
            pools: Vec::new(),
            network: NetworkSpec { name: "net".into() },
            kubernetes: KubernetesSpec::default(),
            scheduler: Default::default(),
            ssh: SshSpec {
                user: "bench".into(),
                key_secret: SecretReference { name: "key".into() },
            },
            paused: false,
        }
    }

    fn empty_world() -> World {
        World {
            network: NetworkState::Ready,
            nodes: BTreeMap::new(),
            cluster: GuestCluster::Uninitialised,
            operations: BTreeMap::new(),
            capacity: None,
            scheduler: None,
            rejected_scheduler: None,
        }
    }

    fn tag(n: u64) -> KeyTag {
        KeyTag::from_sha256(&n.to_be_bytes()).unwrap()
    }

    /// A host key that no node of any world pinned before (arbitrary worlds use small
    /// numbers).
    fn fresh_tag() -> KeyTag {
        static NEXT: AtomicU64 = AtomicU64::new(1 << 32);
        tag(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn ready_node() -> ObservedNode {
        ObservedNode {
            domain: Some(VmState::Running),
            mac: None,
            size: None,
            disk: true,
            seeds: BTreeSet::from([Seed::Keyed(tag(1))]),
            pinned_key: Some(tag(1)),
            ip: Some(Ipv4Addr::new(192, 168, 222, 10)),
            waiting_for_lease: None,
            registered: Some(true),
            reachable: true,
            cordoned: false,
            labels: [(
                benchcluster_crd::POOL_LABEL.to_owned(),
                benchcluster_crd::DEFAULT_POOL.to_owned(),
            )]
            .into(),
            extended_resources: BTreeMap::new(),
        }
    }

    pub(crate) fn ready_world(workers: u32) -> World {
        let mut world = empty_world();
        world.cluster = GuestCluster::Reachable;
        world.nodes.insert(NodeId::CONTROL_PLANE, ready_node());
        for i in 0..workers {
            world.nodes.insert(NodeId::worker(i), ready_node());
        }
        world
    }

    fn running_scheduler(config_hash: &str) -> RunningScheduler {
        RunningScheduler {
            config_hash: config_hash.into(),
            image: "registry.k8s.io/kube-scheduler:v1.35.4".into(),
            custom_image: None,
            started: None,
            healthy: true,
        }
    }

    /// Applies actions the way a well-behaved hypervisor and guest would: steps at
    /// once, background operations between passes.
    fn simulate(spec: &BenchClusterSpec, world: &mut World, actions: &[Action]) {
        for action in actions {
            let id = action.node();
            if let Action::Abandon(_) = action {
                world.operations.remove(&id);
                continue;
            }
            let node = world.nodes.entry(id).or_default();
            match action {
                Action::CreateDisk(_) => node.disk = true,
                Action::DefineDomain(_) => {
                    let key = fresh_tag();
                    node.seeds.insert(Seed::Keyed(key.clone()));
                    node.pinned_key = Some(key);
                    node.domain = Some(VmState::Stopped);
                    node.reachable = false;
                    node.size = super::super::pools::shape(spec, id).map(|s| VmSize {
                        vcpus: s.cpus,
                        memory_bytes: benchcluster_crd::quantity::parse_bytes(s.memory).unwrap(),
                    });
                }
                Action::StartDomain(_) => node.domain = Some(VmState::Running),
                Action::ProbeSsh(_) => node.reachable = true,
                Action::ForgetCluster => {
                    world.cluster = GuestCluster::Uninitialised;
                    for node in world.nodes.values_mut() {
                        node.registered = None;
                    }
                    continue;
                }
                Action::InitControlPlane => {
                    assert!(world.operations.insert(id, Operation::Init).is_none());
                }
                Action::JoinWorker(_) => {
                    assert!(world.operations.insert(id, Operation::Join).is_none());
                }
                Action::SwitchScheduler => {
                    assert!(world.operations.insert(id, Operation::Scheduler).is_none());
                }
                Action::DrainNode(_) => {
                    assert!(world.operations.insert(id, Operation::Drain).is_none());
                    node.cordoned = true;
                }
                Action::Uncordon(_) => node.cordoned = false,
                Action::ConfigureNode(_) => {
                    node.labels
                        .insert(benchcluster_crd::POOL_LABEL.to_owned(), id.pool.to_string());
                }
                Action::Abandon(_) => {}
                Action::RemoveDomain(_) => {
                    node.domain = None;
                    node.size = None;
                    node.pinned_key = None;
                    node.ip = None;
                    node.reachable = false;
                }
                Action::DeleteVolumes(_) => {
                    node.disk = false;
                    node.seeds.clear();
                }
                Action::DeleteStraySeeds(_) => {
                    for stray in node.stray_seeds() {
                        node.seeds.remove(&stray);
                    }
                }
            }
            let node = world.nodes.entry(id).or_default();
            if !node.exists() {
                world.nodes.remove(&id);
            }
        }
        // Operations in flight end between passes; kubeadm succeeds only on a running VM.
        for (id, operation) in std::mem::take(&mut world.operations) {
            let Some(node) = world.nodes.get_mut(&id) else {
                continue;
            };
            match operation {
                Operation::Init | Operation::Join if node.ip.is_some() => {
                    node.registered = Some(true);
                    // The kubelet registers with its pool label.
                    if operation == Operation::Join {
                        node.labels
                            .insert(benchcluster_crd::POOL_LABEL.to_owned(), id.pool.to_string());
                    }
                    if operation == Operation::Init {
                        world.cluster = GuestCluster::Reachable;
                        world.scheduler =
                            Some(running_scheduler(benchcluster_crd::scheduler::DEFAULTS));
                    }
                }
                Operation::Init | Operation::Join => {}
                Operation::Scheduler => {
                    world.scheduler = Some(RunningScheduler {
                        custom_image: spec.scheduler.image.clone(),
                        ..running_scheduler(&spec.scheduler.config_hash())
                    });
                }
                Operation::Drain => {
                    node.registered = None;
                    node.cordoned = false;
                }
            }
        }
        // An API that did not answer answers again between passes.
        if let GuestCluster::Unreachable(_) = world.cluster {
            world.cluster = GuestCluster::Reachable;
        }
        // DHCP answers between passes.
        for node in world.nodes.values_mut() {
            if node.domain == Some(VmState::Running) && node.ip.is_none() {
                node.ip = Some(Ipv4Addr::new(192, 168, 222, 20));
            }
        }
    }

    #[test]
    fn the_scheduler_is_switched_once_to_what_the_spec_asks_unless_refused() {
        let mut spec = spec(1);
        let mut world = ready_world(1);
        world.scheduler = Some(running_scheduler(benchcluster_crd::scheduler::DEFAULTS));
        assert!(
            plan(&spec, &world).is_empty(),
            "defaults run: nothing to do"
        );

        spec.scheduler.image = Some("localhost/sched:custom".into());
        assert_eq!(plan(&spec, &world), vec![Action::SwitchScheduler]);
        spec.scheduler.image = None;
        spec.scheduler.config = Some(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
            }))
            .unwrap(),
        );
        assert_eq!(plan(&spec, &world), vec![Action::SwitchScheduler]);

        // In flight: not started twice.
        world
            .operations
            .insert(NodeId::CONTROL_PLANE, Operation::Scheduler);
        assert!(plan(&spec, &world).is_empty());
        world.operations.clear();

        // Refused: not tried again while the spec asks for it.
        world.rejected_scheduler = Some(benchcluster_crd::RejectedConfig {
            config_hash: spec.scheduler.config_hash(),
            image: None,
            message: "refused".into(),
            at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
        });
        assert!(plan(&spec, &world).is_empty());
        // The same configuration with another image is another thing to try.
        spec.scheduler.image = Some("localhost/sched:custom".into());
        assert_eq!(plan(&spec, &world), vec![Action::SwitchScheduler]);

        // Not while the guest API is silent.
        world.cluster = GuestCluster::Unreachable("timeout".into());
        assert!(!plan(&spec, &world).contains(&Action::SwitchScheduler));
    }

    #[test]
    fn fresh_cluster_creates_every_vm_and_waits_for_leases() {
        let actions = plan(&spec(2), &empty_world());
        assert_eq!(
            actions,
            vec![
                Action::CreateDisk(NodeId::CONTROL_PLANE),
                Action::DefineDomain(NodeId::CONTROL_PLANE),
                Action::StartDomain(NodeId::CONTROL_PLANE),
                Action::CreateDisk(NodeId::worker(0)),
                Action::DefineDomain(NodeId::worker(0)),
                Action::StartDomain(NodeId::worker(0)),
                Action::CreateDisk(NodeId::worker(1)),
                Action::DefineDomain(NodeId::worker(1)),
                Action::StartDomain(NodeId::worker(1)),
            ]
        );
    }

    #[test]
    fn workers_join_only_after_the_control_plane() {
        let mut world = ready_world(2);
        world.cluster = GuestCluster::Uninitialised;
        for node in world.nodes.values_mut() {
            node.registered = None;
        }
        assert_eq!(plan(&spec(2), &world), vec![Action::InitControlPlane]);

        world.cluster = GuestCluster::Reachable;
        world.nodes.insert(NodeId::CONTROL_PLANE, ready_node());
        assert_eq!(
            plan(&spec(2), &world),
            vec![
                Action::JoinWorker(NodeId::worker(0)),
                Action::JoinWorker(NodeId::worker(1))
            ]
        );
    }

    #[test]
    fn an_unreachable_api_is_waited_for_never_initialised_again() {
        // Formed, then the API stops answering (a restarting static pod, a benchmark
        // loading it): nothing is initialised, joined or reset; the nodes wait.
        let mut world = ready_world(2);
        world.cluster = GuestCluster::Unreachable("connection refused".into());
        for node in world.nodes.values_mut() {
            node.registered = None;
        }
        assert!(plan(&spec(2), &world).is_empty());
        // Still so after a controller restart (nothing probed yet) and with a worker
        // still to join: it waits for the API too.
        for node in world.nodes.values_mut() {
            node.reachable = false;
        }
        world.nodes.insert(
            NodeId::worker(2),
            ObservedNode {
                registered: None,
                ..ready_node()
            },
        );
        let actions = plan(&spec(3), &world);
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::InitControlPlane | Action::JoinWorker(_))),
            "{actions:?}"
        );
    }

    #[test]
    fn a_control_plane_rebuilt_on_a_fresh_disk_forgets_the_old_cluster_first() {
        let mut world = ready_world(1);
        world.cluster = GuestCluster::Unreachable("the control-plane VM does not exist".into());
        world.nodes.remove(&NodeId::CONTROL_PLANE);
        assert_eq!(
            plan(&spec(1), &world)[..2],
            [
                Action::ForgetCluster,
                Action::CreateDisk(NodeId::CONTROL_PLANE)
            ]
        );
        // A control plane whose disk survived keeps its cluster: it is only redefined.
        world.nodes.insert(
            NodeId::CONTROL_PLANE,
            ObservedNode {
                disk: true,
                ..ObservedNode::default()
            },
        );
        assert!(!plan(&spec(1), &world).contains(&Action::ForgetCluster));
    }

    #[test]
    fn steady_state_plans_nothing() {
        assert!(plan(&spec(3), &ready_world(3)).is_empty());
    }

    /// A fresh 1+`workers` cluster whose VMs all run with an address; nothing is
    /// registered in the guest cluster yet and nothing was probed.
    fn booted_world(workers: u32) -> World {
        let mut world = ready_world(workers);
        world.cluster = GuestCluster::Uninitialised;
        for node in world.nodes.values_mut() {
            node.registered = None;
            node.reachable = false;
        }
        world
    }

    #[test]
    fn every_node_is_probed_as_soon_as_it_has_an_address() {
        assert_eq!(
            plan(&spec(2), &booted_world(2)),
            vec![
                Action::ProbeSsh(NodeId::CONTROL_PLANE),
                Action::InitControlPlane,
                Action::ProbeSsh(NodeId::worker(0)),
                Action::ProbeSsh(NodeId::worker(1)),
            ]
        );
    }

    #[test]
    fn an_operation_in_flight_is_never_started_again() {
        let mut world = booted_world(2);
        world
            .operations
            .insert(NodeId::CONTROL_PLANE, Operation::Init);
        // Workers are still probed while the control plane initialises.
        assert_eq!(
            plan(&spec(2), &world),
            vec![
                Action::ProbeSsh(NodeId::worker(0)),
                Action::ProbeSsh(NodeId::worker(1)),
            ]
        );
        for node in world.nodes.values_mut() {
            node.reachable = true;
        }
        assert!(plan(&spec(2), &world).is_empty());

        // Init done; one join in flight, one to start.
        world.operations.clear();
        world.cluster = GuestCluster::Reachable;
        world.nodes.insert(NodeId::CONTROL_PLANE, ready_node());
        world.operations.insert(NodeId::worker(0), Operation::Join);
        assert_eq!(
            plan(&spec(2), &world),
            vec![Action::JoinWorker(NodeId::worker(1))]
        );
        // A Node registered while its join still runs is left to the join.
        world.nodes.get_mut(&NodeId::worker(0)).unwrap().registered = Some(false);
        assert_eq!(
            plan(&spec(2), &world),
            vec![Action::JoinWorker(NodeId::worker(1))]
        );
    }

    #[test]
    fn operations_of_nodes_no_longer_wanted_or_running_are_abandoned() {
        let mut world = booted_world(2);
        for node in world.nodes.values_mut() {
            node.reachable = true;
        }
        world.cluster = GuestCluster::Reachable;
        world.nodes.insert(NodeId::CONTROL_PLANE, ready_node());
        world.operations.insert(NodeId::worker(0), Operation::Join);
        world.operations.insert(NodeId::worker(1), Operation::Join);
        // Scaled down to one worker: worker 1's join is abandoned and the VM removed.
        assert_eq!(
            plan(&spec(1), &world),
            vec![
                Action::Abandon(NodeId::worker(1)),
                Action::RemoveDomain(NodeId::worker(1)),
                Action::DeleteVolumes(NodeId::worker(1)),
            ]
        );
        // Worker 0's domain vanished: its join is abandoned and the VM rebuilt.
        let w0 = world.nodes.get_mut(&NodeId::worker(0)).unwrap();
        w0.domain = None;
        w0.ip = None;
        let actions = plan(&spec(2), &world);
        assert_eq!(actions.first(), Some(&Action::Abandon(NodeId::worker(0))));
        assert!(actions.contains(&Action::DefineDomain(NodeId::worker(0))));
        // An operation whose node is gone altogether is abandoned too.
        world.nodes.remove(&NodeId::worker(0));
        assert!(plan(&spec(2), &world).contains(&Action::Abandon(NodeId::worker(0))));
    }

    #[test]
    fn an_operation_that_just_failed_waits_for_the_backoff() {
        let actions = plan(&spec(2), &booted_world(2));
        assert_eq!(
            defer_retries(actions, &[NodeId::CONTROL_PLANE]),
            vec![
                Action::ProbeSsh(NodeId::CONTROL_PLANE),
                Action::ProbeSsh(NodeId::worker(0)),
                Action::ProbeSsh(NodeId::worker(1)),
            ]
        );
    }

    #[test]
    fn a_draining_node_is_removed_only_after_its_drain() {
        let mut world = ready_world(2);
        world.operations.insert(NodeId::worker(1), Operation::Drain);
        assert!(plan(&spec(1), &world).is_empty());
        // Scaled up again meanwhile: the drain is abandoned, the worker kept and, once
        // its cordon shows, made schedulable again.
        assert_eq!(
            plan(&spec(2), &world),
            vec![Action::Abandon(NodeId::worker(1))]
        );
        world.nodes.get_mut(&NodeId::worker(1)).unwrap().cordoned = true;
        assert_eq!(
            plan(&spec(2), &world),
            vec![
                Action::Abandon(NodeId::worker(1)),
                Action::Uncordon(NodeId::worker(1))
            ]
        );
        world.cluster = GuestCluster::Unreachable("down".into());
        assert!(!plan(&spec(2), &world).contains(&Action::Uncordon(NodeId::worker(1))));
        world.cluster = GuestCluster::Reachable;
        world.operations.clear();
        world.nodes.get_mut(&NodeId::worker(1)).unwrap().registered = None;
        assert_eq!(
            plan(&spec(1), &world),
            vec![
                Action::RemoveDomain(NodeId::worker(1)),
                Action::DeleteVolumes(NodeId::worker(1)),
            ]
        );
    }

    #[test]
    fn scale_down_drains_then_removes_highest_index_first() {
        let actions = plan(&spec(1), &ready_world(3));
        assert_eq!(
            actions,
            vec![
                Action::DrainNode(NodeId::worker(2)),
                Action::RemoveDomain(NodeId::worker(2)),
                Action::DeleteVolumes(NodeId::worker(2)),
                Action::DrainNode(NodeId::worker(1)),
                Action::RemoveDomain(NodeId::worker(1)),
                Action::DeleteVolumes(NodeId::worker(1)),
            ]
        );
    }

    fn gpu() -> crate::names::PoolName {
        crate::names::PoolName::new("gpu").unwrap()
    }

    /// `spec(workers)` with a pool `gpu` of `replicas`, labelled and with a resource.
    fn pooled_spec(workers: i32, replicas: i32) -> BenchClusterSpec {
        let mut s = spec(workers);
        let mut pool = s.workers.clone();
        pool.replicas = replicas;
        pool.template.node_labels =
            [("node-role.kubernetes.io/gpu".to_owned(), String::new())].into();
        pool.template.extended_resources = [("example.com/fake-gpu".to_owned(), 2)].into();
        s.pools.push(benchcluster_crd::NamedWorkerPool {
            name: "gpu".into(),
            pool,
        });
        s
    }

    /// A ready node of the gpu pool, configured as `pooled_spec` asks.
    fn ready_gpu_node() -> ObservedNode {
        let mut node = ready_node();
        node.labels = [
            (benchcluster_crd::POOL_LABEL.to_owned(), "gpu".to_owned()),
            ("node-role.kubernetes.io/gpu".to_owned(), String::new()),
        ]
        .into();
        node.extended_resources = [("example.com/fake-gpu".to_owned(), 2)].into();
        node
    }

    #[test]
    fn every_pool_is_created_and_scaling_one_touches_no_other() {
        let actions = plan(&pooled_spec(1, 2), &empty_world());
        for id in [
            NodeId::worker(0),
            NodeId::pooled(gpu(), 0),
            NodeId::pooled(gpu(), 1),
        ] {
            assert!(
                actions.contains(&Action::DefineDomain(id)),
                "{id} not defined"
            );
        }
        // gpu 2 -> 1: only gpu-1 goes, the default pool's worker is left alone.
        let mut world = ready_world(1);
        world
            .nodes
            .insert(NodeId::pooled(gpu(), 0), ready_gpu_node());
        world
            .nodes
            .insert(NodeId::pooled(gpu(), 1), ready_gpu_node());
        assert_eq!(plan(&pooled_spec(1, 2), &world), vec![]);
        let actions = plan(&pooled_spec(1, 1), &world);
        assert_eq!(
            actions,
            vec![
                Action::DrainNode(NodeId::pooled(gpu(), 1)),
                Action::RemoveDomain(NodeId::pooled(gpu(), 1)),
                Action::DeleteVolumes(NodeId::pooled(gpu(), 1)),
            ]
        );
        // A pool gone from the list: its nodes are drained and removed.
        let actions = plan(&spec(1), &world);
        for index in [0, 1] {
            let id = NodeId::pooled(gpu(), index);
            assert!(actions.contains(&Action::DrainNode(id)), "{id} not drained");
            assert!(
                actions.contains(&Action::RemoveDomain(id)),
                "{id} not removed"
            );
        }
        assert!(!actions.iter().any(|a| a.node() == NodeId::worker(0)));
    }

    #[test]
    fn a_registered_worker_gets_what_its_pool_asks_for_and_then_nothing() {
        let mut world = ready_world(0);
        let id = NodeId::pooled(gpu(), 0);
        // Registered with the labels the kubelet may set: the pool label only.
        let mut node = ready_node();
        node.labels = [(benchcluster_crd::POOL_LABEL.to_owned(), "gpu".to_owned())].into();
        world.nodes.insert(id, node);
        assert_eq!(
            plan(&pooled_spec(0, 1), &world),
            vec![Action::ConfigureNode(id)]
        );
        world.nodes.insert(id, ready_gpu_node());
        assert_eq!(plan(&pooled_spec(0, 1), &world), vec![]);
        // A re-registered Node lost its resources: they are put back.
        world.nodes.get_mut(&id).unwrap().extended_resources.clear();
        assert_eq!(
            plan(&pooled_spec(0, 1), &world),
            vec![Action::ConfigureNode(id)]
        );
        // Not while the guest API does not answer.
        world.cluster = GuestCluster::Unreachable("timeout".into());
        assert!(!plan(&pooled_spec(0, 1), &world).contains(&Action::ConfigureNode(id)));
    }

    #[test]
    fn a_cluster_that_does_not_fit_creates_nothing_but_keeps_what_exists() {
        use super::super::pools::Capacity;
        let small = Capacity {
            cpus: 2,
            memory_bytes: 4 << 30,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            taken: super::super::world::VmSize::default(),
        };
        // 1 + 2 at 2 cpus and 2Gi each: 6Gi of memory on a 4Gi host.
        let mut world = empty_world();
        world.capacity = Some(small);
        assert_eq!(plan(&spec(2), &world), vec![]);
        // Fits: everything is created.
        world.capacity = Some(Capacity {
            memory_bytes: 6 << 30,
            ..small
        });
        assert!(plan(&spec(2), &world).contains(&Action::DefineDomain(NodeId::worker(1))));
        // Scaled beyond the host: no new node, the existing ones carry on.
        let mut world = ready_world(1);
        world.capacity = Some(small);
        world.nodes.get_mut(&NodeId::worker(0)).unwrap().registered = None;
        let actions = plan(&spec(3), &world);
        assert!(actions.contains(&Action::JoinWorker(NodeId::worker(0))));
        assert!(!actions.iter().any(|a| a.node().index >= 1));
    }

    #[test]
    fn orphan_disk_from_a_crash_is_reused_not_duplicated() {
        let mut world = empty_world();
        world.nodes.insert(
            NodeId::worker(0),
            ObservedNode {
                disk: true,
                ..ObservedNode::default()
            },
        );
        let actions = plan(&spec(1), &world);
        assert!(!actions.contains(&Action::CreateDisk(NodeId::worker(0))));
        assert!(actions.contains(&Action::DefineDomain(NodeId::worker(0))));
    }

    #[test]
    fn teardown_keeps_the_control_plane_until_workers_are_gone() {
        let world = ready_world(2);
        let actions = plan_teardown(&world);
        assert!(!actions.iter().any(|a| a.node() == NodeId::CONTROL_PLANE));
        assert_eq!(
            actions.first(),
            Some(&Action::RemoveDomain(NodeId::worker(1)))
        );
        assert!(
            plan_teardown(&ready_world(0)).contains(&Action::RemoveDomain(NodeId::CONTROL_PLANE))
        );
    }

    #[test]
    fn missing_network_blocks_creation_but_not_removal() {
        let mut world = ready_world(2);
        world.network = NetworkState::Missing;
        world.nodes.remove(&NodeId::worker(0));
        let actions = plan(&spec(1), &world);
        assert!(actions.iter().all(|a| a.is_removal()), "{actions:?}");
        assert!(actions.contains(&Action::RemoveDomain(NodeId::worker(1))));
    }

    #[test]
    fn paused_plans_nothing() {
        let mut s = spec(3);
        s.paused = true;
        assert!(plan(&s, &empty_world()).is_empty());
    }

    /// A node whose domain pins key 1, with these seeds.
    fn with_seeds(domain: Option<VmState>, seeds: &[Seed]) -> ObservedNode {
        ObservedNode {
            domain,
            pinned_key: domain.map(|_| tag(1)),
            seeds: seeds.iter().cloned().collect(),
            ip: (domain == Some(VmState::Running)).then_some(Ipv4Addr::new(10, 0, 0, 2)),
            ..ready_node()
        }
    }

    #[test]
    fn a_racing_losers_seed_goes_once_the_domain_boots_from_its_own() {
        let own = Seed::Keyed(tag(1));
        let loser = Seed::Keyed(tag(2));
        let mut world = ready_world(1);
        let w0 = NodeId::worker(0);
        world.nodes.insert(
            w0,
            with_seeds(Some(VmState::Running), &[own.clone(), loser.clone()]),
        );
        assert_eq!(world.node(w0).unwrap().stray_seeds(), [loser]);
        assert_eq!(plan(&spec(1), &world), vec![Action::DeleteStraySeeds(w0)]);
        // Also while the node waits for everything else, and before its other steps.
        world.network = NetworkState::Missing;
        assert_eq!(plan(&spec(1), &world), vec![Action::DeleteStraySeeds(w0)]);
        world.network = NetworkState::Ready;
        world.nodes.get_mut(&w0).unwrap().domain = Some(VmState::Stopped);
        assert_eq!(
            plan(&spec(1), &world),
            vec![Action::DeleteStraySeeds(w0), Action::StartDomain(w0)]
        );
        // A legacy seed beside a domain that boots from its keyed one is stray too.
        world
            .nodes
            .insert(w0, with_seeds(Some(VmState::Running), &[own, Seed::Legacy]));
        assert_eq!(world.node(w0).unwrap().stray_seeds(), [Seed::Legacy]);
    }

    #[test]
    fn a_seed_without_its_domain_is_never_stray() {
        // A pass that died after writing the seed, or another controller's pass about
        // to define the domain on it: the seed stays, the domain is defined (on a seed
        // of its own), and only then is the other one stray.
        let mut world = empty_world();
        let cp = NodeId::CONTROL_PLANE;
        let written = Seed::Keyed(tag(2));
        world.nodes.insert(
            cp,
            ObservedNode {
                disk: true,
                seeds: BTreeSet::from([written.clone()]),
                ..ObservedNode::default()
            },
        );
        assert!(world.node(cp).unwrap().stray_seeds().is_empty());
        let actions = plan(&spec(0), &world);
        assert_eq!(
            actions,
            vec![Action::DefineDomain(cp), Action::StartDomain(cp)]
        );
        simulate(&spec(0), &mut world, &actions);
        let node = world.node(cp).unwrap();
        assert_eq!(node.seeds.len(), 2);
        assert_eq!(node.stray_seeds(), [written]);
        assert_eq!(plan(&spec(0), &world)[0], Action::DeleteStraySeeds(cp));
    }

    #[test]
    fn a_domain_of_the_previous_naming_keeps_its_legacy_seed() {
        // A cluster formed by a controller that named one seed per node without a key:
        // upgraded, this controller leaves it alone.
        let mut world = ready_world(2);
        for node in world.nodes.values_mut() {
            node.seeds = BTreeSet::from([Seed::Legacy]);
        }
        assert!(plan(&spec(2), &world).is_empty());
        let w1 = world.node(NodeId::worker(1)).unwrap().clone();
        assert_eq!(w1.booted_seed(), Some(Seed::Legacy));
        assert!(!w1.seed_missing());
        assert!(w1.stray_seeds().is_empty());
        // Stopped, it is started, not rebuilt.
        world.nodes.get_mut(&NodeId::worker(1)).unwrap().domain = Some(VmState::Stopped);
        assert_eq!(
            plan(&spec(2), &world),
            vec![Action::StartDomain(NodeId::worker(1))]
        );
        // Scaled down, its legacy seed goes with it.
        let actions = plan(&spec(1), &world);
        assert_eq!(
            actions,
            vec![
                Action::DrainNode(NodeId::worker(1)),
                Action::RemoveDomain(NodeId::worker(1)),
                Action::DeleteVolumes(NodeId::worker(1)),
            ]
        );
        simulate(&spec(1), &mut world, &actions);
        assert!(world.node(NodeId::worker(1)).is_none());
        // Rebuilt (its disk vanished), it boots from a keyed seed; the legacy one is
        // then stray.
        world.nodes.get_mut(&NodeId::worker(0)).unwrap().disk = false;
        let actions = plan(&spec(1), &world);
        simulate(&spec(1), &mut world, &actions);
        let w0 = world.node(NodeId::worker(0)).unwrap();
        assert!(matches!(w0.booted_seed(), Some(Seed::Keyed(_))));
        assert_eq!(w0.stray_seeds(), [Seed::Legacy]);
    }

    #[test]
    fn a_stopped_domain_whose_seed_is_gone_is_defined_again() {
        let mut world = ready_world(1);
        let w0 = NodeId::worker(0);
        world.nodes.insert(
            w0,
            with_seeds(Some(VmState::Stopped), &[Seed::Keyed(tag(2))]),
        );
        assert!(world.node(w0).unwrap().seed_missing());
        assert_eq!(
            plan(&spec(1), &world),
            vec![
                Action::RemoveDomain(w0),
                Action::DefineDomain(w0),
                Action::StartDomain(w0),
            ]
        );
        // Running, it booted already: it is left alone (no seed is stray beside it).
        world.nodes.insert(
            w0,
            with_seeds(Some(VmState::Running), &[Seed::Keyed(tag(2))]),
        );
        assert!(plan(&spec(1), &world).is_empty());
        // A domain pinning no key tells nothing: it is started as before.
        let node = world.nodes.get_mut(&w0).unwrap();
        node.domain = Some(VmState::Stopped);
        node.pinned_key = None;
        assert_eq!(plan(&spec(1), &world), vec![Action::StartDomain(w0)]);
    }

    #[test]
    fn removal_takes_every_seed_of_the_node() {
        let mut world = ready_world(2);
        let w1 = NodeId::worker(1);
        let seeds = [Seed::Keyed(tag(1)), Seed::Keyed(tag(2)), Seed::Legacy];
        world.nodes.insert(
            w1,
            ObservedNode {
                disk: false,
                registered: None,
                ..with_seeds(None, &seeds)
            },
        );
        // Seeds alone are enough for the node to exist, and to be removed.
        assert_eq!(plan(&spec(1), &world), vec![Action::DeleteVolumes(w1)]);
        let actions = plan_teardown(&world);
        simulate(&spec(1), &mut world, &actions);
        assert!(world.node(w1).is_none());
    }

    /// A VM's size: the default pool's and control plane's shape (2 vCPUs, 2Gi), the
    /// gpu pool's (4, 4Gi), another one, or unknown.
    fn arb_size() -> impl Strategy<Value = Option<VmSize>> {
        prop_oneof![
            Just(Some(VmSize {
                vcpus: 2,
                memory_bytes: 2 << 30
            })),
            Just(Some(VmSize {
                vcpus: 4,
                memory_bytes: 4 << 30
            })),
            Just(Some(VmSize {
                vcpus: 8,
                memory_bytes: 2 << 30
            })),
            Just(None),
        ]
    }

    fn arb_node() -> impl Strategy<Value = ObservedNode> {
        (
            prop::option::of(prop_oneof![Just(VmState::Running), Just(VmState::Stopped)]),
            any::<bool>(),
            any::<bool>(),
            prop::option::of(any::<bool>()),
            any::<bool>(),
            any::<bool>(),
            arb_seeds(),
            arb_size(),
        )
            .prop_map(
                |(domain, disk, ip, registered, reachable, cordoned, (seeds, pinned_key), size)| {
                    ObservedNode {
                        domain,
                        mac: None,
                        size: size.filter(|_| domain.is_some()),
                        disk,
                        seeds,
                        // Only a domain pins a key.
                        pinned_key: pinned_key.filter(|_| domain.is_some()),
                        ip: (ip && domain == Some(VmState::Running))
                            .then_some(Ipv4Addr::new(10, 0, 0, 1)),
                        waiting_for_lease: None,
                        registered,
                        reachable,
                        cordoned: cordoned && registered.is_some(),
                        // Labelled as the default pool asks: a gpu worker is labelled
                        // by ConfigureNode.
                        labels: [(
                            benchcluster_crd::POOL_LABEL.to_owned(),
                            benchcluster_crd::DEFAULT_POOL.to_owned(),
                        )]
                        .into(),
                        extended_resources: BTreeMap::new(),
                    }
                },
            )
            .prop_filter("a node is observed through its domain or volumes", |n| {
                n.exists()
            })
    }

    /// `spec(replicas)` with a second pool `gpu` of 4 vCPUs and 4Gi.
    fn sized_spec(replicas: i32, gpu: i32) -> BenchClusterSpec {
        let mut s = spec(replicas);
        let mut pool = s.workers.clone();
        pool.replicas = gpu;
        pool.template.cpus = 4;
        pool.template.memory = "4Gi".into();
        s.pools.push(benchcluster_crd::NamedWorkerPool {
            name: "gpu".into(),
            pool,
        });
        s
    }

    /// The pools a generated worker may be in: the default one, `gpu`, and one the spec
    /// does not declare.
    fn pool_of(n: u8) -> crate::names::PoolName {
        let name = ["w", "gpu", "gone"][usize::from(n % 3)];
        crate::names::PoolName::new(name).unwrap()
    }

    /// Seeds of one node (keyed by keys 0 to 3, and the legacy one) and the key its
    /// domain pins: its own seed, a racing loser's, a dead pass's, an upgraded
    /// controller's, or none.
    fn arb_seeds() -> impl Strategy<Value = (BTreeSet<Seed>, Option<KeyTag>)> {
        (
            prop::collection::btree_set(
                prop_oneof![
                    Just(Seed::Legacy),
                    (0u64..4).prop_map(|n| Seed::Keyed(tag(n)))
                ],
                0..4,
            ),
            prop::option::of((0u64..4).prop_map(tag)),
        )
    }

    fn arb_world() -> impl Strategy<Value = World> {
        (
            prop::option::of(arb_node()),
            prop::collection::btree_map((0u8..3, 0u32..12), arb_node(), 0..8),
            prop_oneof![
                Just(GuestCluster::Uninitialised),
                Just(GuestCluster::Reachable),
                Just(GuestCluster::Unreachable("down".into()))
            ],
            // Operations in flight, for nodes that may or may not exist (index 12 is
            // the control plane).
            prop::collection::btree_map(
                (0u8..3, 0u32..13),
                prop_oneof![
                    Just(Operation::Init),
                    Just(Operation::Join),
                    Just(Operation::Drain)
                ],
                0..4,
            ),
        )
            .prop_map(|(cp, workers, cluster, operations)| {
                let mut nodes: BTreeMap<NodeId, ObservedNode> = workers
                    .into_iter()
                    .map(|((p, i), n)| (NodeId::pooled(pool_of(p), i), n))
                    .collect();
                if let Some(cp) = cp {
                    nodes.insert(NodeId::CONTROL_PLANE, cp);
                }
                let operations = operations
                    .into_iter()
                    .map(|((p, i), op)| {
                        let id = if i == 12 {
                            NodeId::CONTROL_PLANE
                        } else {
                            NodeId::pooled(pool_of(p), i)
                        };
                        (id, op)
                    })
                    .collect();
                World {
                    network: NetworkState::Ready,
                    nodes,
                    cluster,
                    operations,
                    capacity: None,
                    scheduler: None,
                    rejected_scheduler: None,
                }
            })
    }

    proptest! {
        #[test]
        fn converges_from_any_world(world in arb_world(), replicas in 0i32..10, gpu in 0i32..4) {
            let spec = sized_spec(replicas, gpu);
            let mut world = world;
            // A worker of another size is drained and removed, then created anew.
            for _ in 0..12 {
                let actions = plan(&spec, &world);
                if actions.is_empty()
                    && world.operations.is_empty()
                    && world.nodes.values().all(|n| n.ip.is_some())
                {
                    break;
                }
                simulate(&spec, &mut world, &actions);
            }
            prop_assert!(plan(&spec, &world).is_empty(), "not converged: {:?}", world);
            for (&id, node) in &world.nodes {
                if id.role == Role::Worker {
                    prop_assert!(!drifted(&spec, id, node), "{id} keeps another size: {node:?}");
                    prop_assert!(configured(&spec, id, node), "{id} lacks its pool's labels");
                }
            }
            let expected: BTreeSet<NodeId> = desired_nodes(&spec).collect();
            let actual: BTreeSet<NodeId> = world.nodes.keys().copied().collect();
            prop_assert_eq!(actual, expected);
            prop_assert!(world.nodes.values().all(|n| n.registered == Some(true) || n.registered == Some(false)));
            prop_assert!(world.nodes.values().all(|n| !n.cordoned), "a wanted node left cordoned: {:?}", world);
            // No stray seed leaks: a domain booting from a seed named by its key keeps
            // that one seed only.
            for node in world.nodes.values() {
                if let Some(own @ Seed::Keyed(_)) = node.booted_seed()
                    && node.seeds.contains(&own)
                {
                    prop_assert_eq!(&node.seeds, &BTreeSet::from([own]), "{:?}", node);
                }
            }
        }

        #[test]
        fn no_plan_deletes_the_seed_a_domain_boots_from(world in arb_world(), replicas in 0i32..10, gpu in 0i32..4) {
            let spec = sized_spec(replicas, gpu);
            for actions in [plan(&spec, &world), plan_teardown(&world)] {
                for (&id, node) in &world.nodes {
                    let of_node: Vec<Action> = actions.iter().copied().filter(|a| a.node() == id).collect();
                    let position = |wanted: Action| of_node.iter().position(|a| *a == wanted);
                    if let Some(deleted) = position(Action::DeleteVolumes(id)) {
                        // All its seeds go only with the node, after its domain.
                        prop_assert!(!is_desired(&spec, id) || replaced(&spec, id, node) || actions == plan_teardown(&world), "{:?}", of_node);
                        if node.domain.is_some() {
                            prop_assert!(position(Action::RemoveDomain(id)).is_some_and(|r| r < deleted), "{:?}", of_node);
                        }
                    }
                    if of_node.contains(&Action::DeleteStraySeeds(id)) {
                        // Strays only beside a domain, never the seed it boots from.
                        let strays = node.stray_seeds();
                        prop_assert!(node.domain.is_some());
                        prop_assert!(!strays.is_empty());
                        let booted = node.booted_seed();
                        prop_assert!(booted.as_ref().is_some_and(|b| node.seeds.contains(b) && !strays.contains(b)), "{:?}", node);
                    }
                }
            }
        }

        #[test]
        fn kubeadm_starts_only_where_the_cluster_answered_or_never_existed(world in arb_world(), replicas in 0i32..10, gpu in 0i32..4) {
            let spec = sized_spec(replicas, gpu);
            let actions = plan(&spec, &world);
            // Never on a VM that is being replaced, nor on one no pool wants.
            for action in &actions {
                if matches!(action, Action::JoinWorker(_) | Action::InitControlPlane) {
                    let id = action.node();
                    prop_assert!(is_desired(&spec, id), "{:?}", actions);
                    prop_assert!(!world.node(id).is_some_and(|n| replaced(&spec, id, n)), "{:?}", actions);
                }
            }
            let unreachable = matches!(world.cluster, GuestCluster::Unreachable(_));
            if unreachable {
                prop_assert!(!actions.contains(&Action::InitControlPlane), "{:?}", actions);
            }
            if world.cluster != GuestCluster::Reachable {
                prop_assert!(!actions.iter().any(|a| matches!(a, Action::JoinWorker(_))), "{:?}", actions);
            }
        }

        #[test]
        fn teardown_empties_any_world(world in arb_world()) {
            let mut world = world;
            for _ in 0..4 {
                let actions = plan_teardown(&world);
                prop_assert!(
                    !actions.iter().any(|a| a.node() == NodeId::CONTROL_PLANE && a.is_removal())
                        || !world.has_workers(),
                    "control plane removed while workers exist"
                );
                simulate(&spec(0), &mut world, &actions);
            }
            prop_assert!(world.nodes.is_empty(), "left: {:?}", world.nodes);
        }

        #[test]
        fn removals_touch_only_surplus_or_resized_workers_highest_first(world in arb_world(), replicas in 0i32..10, gpu in 0i32..4) {
            let spec = sized_spec(replicas, gpu);
            let actions = plan(&spec, &world);
            // (A domain is also removed to rebuild a wanted node: disk or seed gone.)
            for action in actions.iter().filter(|a| matches!(a, Action::DrainNode(_) | Action::DeleteVolumes(_))) {
                let id = action.node();
                let node = world.node(id);
                prop_assert!(
                    !is_desired(&spec, id) || node.is_some_and(|n| replaced(&spec, id, n)),
                    "{id} removed: {:?}", node
                );
            }
            let removed: Vec<u32> = actions
                .into_iter()
                .filter(|a| a.is_removal() && a.node().role == Role::Worker)
                .filter(|a| a.node().pool == crate::names::PoolName::DEFAULT)
                .map(|a| a.node().index)
                .filter(|i| i64::from(*i) >= i64::from(replicas))
                .collect();
            let mut sorted = removed.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            prop_assert_eq!(removed, sorted);
            prop_assert!(!plan(&spec, &world).iter().any(|a| a.is_removal() && a.node() == NodeId::CONTROL_PLANE && !matches!(a, Action::RemoveDomain(_))));
        }
    }
}
