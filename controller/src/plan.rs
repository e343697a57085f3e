//! The planner: a pure function from desired and observed state to the next actions.
//!
//! No client, no clock, no randomness. It decides creation, kubeadm init and join,
//! drain and removal, and their order: the control plane is initialised before any
//! worker joins, workers proceed in parallel, surplus workers go highest index first,
//! and the control plane is never removed while a worker exists.

use benchcluster_crd::{BenchClusterSpec, Role};

use crate::names::NodeId;
use crate::world::{GuestCluster, NetworkState, ObservedNode, VmState, World};

/// One step the act stage can take. Steps of one node run in the order planned; steps
/// of different nodes are independent and may run concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Create the node's qcow2 overlay on its role's base image.
    CreateDisk(NodeId),
    /// Generate the node's host key, write its identity seed, and define its domain
    /// (owner metadata and pinned host key in the domain XML).
    DefineDomain(NodeId),
    /// Start the node's domain.
    StartDomain(NodeId),
    /// `kubeadm init` on the control plane and store its admin kubeconfig.
    InitControlPlane,
    /// Mint a join command and `kubeadm join` the worker.
    JoinWorker(NodeId),
    /// Cordon, drain and delete the node's Node in the guest cluster.
    DrainNode(NodeId),
    /// Destroy and undefine the node's domain.
    RemoveDomain(NodeId),
    /// Delete the node's disk overlay and identity seed.
    DeleteVolumes(NodeId),
}

impl Action {
    /// The node this step acts on.
    pub fn node(self) -> NodeId {
        match self {
            Action::InitControlPlane => NodeId::CONTROL_PLANE,
            Action::CreateDisk(id)
            | Action::DefineDomain(id)
            | Action::StartDomain(id)
            | Action::JoinWorker(id)
            | Action::DrainNode(id)
            | Action::RemoveDomain(id)
            | Action::DeleteVolumes(id) => id,
        }
    }

    /// Whether the step mutates the hypervisor or a guest.
    pub fn is_removal(self) -> bool {
        matches!(
            self,
            Action::DrainNode(_) | Action::RemoveDomain(_) | Action::DeleteVolumes(_)
        )
    }
}

/// The nodes the spec asks for, control plane first.
pub fn desired_nodes(spec: &BenchClusterSpec) -> impl Iterator<Item = NodeId> {
    let workers = u32::try_from(spec.workers.replicas).unwrap_or(0);
    std::iter::once(NodeId::CONTROL_PLANE).chain((0..workers).map(NodeId::worker))
}

fn is_desired(spec: &BenchClusterSpec, id: NodeId) -> bool {
    match id.role {
        Role::ControlPlane => id.index == 0,
        Role::Worker => i64::from(id.index) < i64::from(spec.workers.replicas),
    }
}

/// Next actions to bring `world` towards `spec`.
pub fn plan(spec: &BenchClusterSpec, world: &World) -> Vec<Action> {
    let mut actions = Vec::new();
    if spec.paused {
        return actions;
    }
    let empty = ObservedNode::default();
    if world.network == NetworkState::Ready {
        for id in desired_nodes(spec) {
            create_or_progress(id, world.node(id).unwrap_or(&empty), world, &mut actions);
        }
    }
    let surplus: Vec<NodeId> = world
        .nodes
        .keys()
        .copied()
        .filter(|id| !is_desired(spec, *id))
        .collect();
    remove(&surplus, world, true, &mut actions);
    actions
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

fn create_or_progress(id: NodeId, node: &ObservedNode, world: &World, out: &mut Vec<Action>) {
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
        (Some(VmState::Stopped), true) => out.push(Action::StartDomain(id)),
        (Some(VmState::Running), true) => {
            if node.ip.is_none() {
                return; // booting: wait for the lease
            }
            match id.role {
                Role::ControlPlane => {
                    let initialised = matches!(world.cluster, GuestCluster::Reachable)
                        && node.registered.is_some();
                    if !initialised {
                        out.push(Action::InitControlPlane);
                    }
                }
                Role::Worker => {
                    let control_plane_up = matches!(world.cluster, GuestCluster::Reachable)
                        && world
                            .node(NodeId::CONTROL_PLANE)
                            .is_some_and(|cp| cp.registered.is_some());
                    if control_plane_up && node.registered.is_none() {
                        out.push(Action::JoinWorker(id));
                    }
                }
            }
        }
    }
}

/// Removal steps for `nodes`: workers highest index first, and the control plane only
/// when no worker would remain.
fn remove(nodes: &[NodeId], world: &World, drain: bool, out: &mut Vec<Action>) {
    let mut ordered: Vec<NodeId> = nodes.to_vec();
    ordered.sort_by(|a, b| b.cmp(a)); // workers before the control plane, index descending
    let workers_exist = world.worker_indices().next().is_some();
    for id in ordered {
        // Removal steps of different nodes run concurrently, so the control plane waits
        // for a pass in which no worker exists at all.
        if id.role == Role::ControlPlane && workers_exist {
            continue;
        }
        let Some(node) = world.node(id) else { continue };
        if drain && node.registered.is_some() && world.cluster == GuestCluster::Reachable {
            out.push(Action::DrainNode(id));
        }
        if node.domain.is_some() {
            out.push(Action::RemoveDomain(id));
        }
        if node.disk || node.seed {
            out.push(Action::DeleteVolumes(id));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use benchcluster_crd::{
        Firmware, ImageSpec, KubernetesSpec, NetworkSpec, NodeTemplate, SecretReference, SshSpec,
        WorkerPool, WorkerTemplate,
    };
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

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
                },
            },
            network: NetworkSpec { name: "net".into() },
            kubernetes: KubernetesSpec::default(),
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
        }
    }

    fn ready_node() -> ObservedNode {
        ObservedNode {
            domain: Some(VmState::Running),
            disk: true,
            seed: true,
            ip: Some(Ipv4Addr::new(192, 168, 222, 10)),
            waiting_for_lease: None,
            registered: Some(true),
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

    /// Applies actions the way a well-behaved hypervisor and guest would.
    fn simulate(world: &mut World, actions: &[Action]) {
        for action in actions {
            let id = action.node();
            let node = world.nodes.entry(id).or_default();
            match action {
                Action::CreateDisk(_) => node.disk = true,
                Action::DefineDomain(_) => {
                    node.seed = true;
                    node.domain = Some(VmState::Stopped);
                }
                Action::StartDomain(_) => node.domain = Some(VmState::Running),
                Action::InitControlPlane => {
                    node.registered = Some(true);
                    world.cluster = GuestCluster::Reachable;
                }
                Action::JoinWorker(_) => node.registered = Some(true),
                Action::DrainNode(_) => node.registered = None,
                Action::RemoveDomain(_) => {
                    node.domain = None;
                    node.ip = None;
                }
                Action::DeleteVolumes(_) => {
                    node.disk = false;
                    node.seed = false;
                }
            }
            let node = world.nodes.entry(id).or_default();
            if node.domain.is_none() && !node.disk && !node.seed {
                world.nodes.remove(&id);
            }
        }
        // DHCP answers between passes.
        for node in world.nodes.values_mut() {
            if node.domain == Some(VmState::Running) && node.ip.is_none() {
                node.ip = Some(Ipv4Addr::new(192, 168, 222, 20));
            }
        }
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
    fn steady_state_plans_nothing() {
        assert!(plan(&spec(3), &ready_world(3)).is_empty());
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

    fn arb_node() -> impl Strategy<Value = ObservedNode> {
        (
            prop::option::of(prop_oneof![Just(VmState::Running), Just(VmState::Stopped)]),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::option::of(any::<bool>()),
        )
            .prop_map(|(domain, disk, seed, ip, registered)| ObservedNode {
                domain,
                disk,
                seed,
                ip: (ip && domain == Some(VmState::Running)).then_some(Ipv4Addr::new(10, 0, 0, 1)),
                waiting_for_lease: None,
                registered,
            })
            .prop_filter("a node is observed through its domain or volumes", |n| {
                n.domain.is_some() || n.disk || n.seed
            })
    }

    fn arb_world() -> impl Strategy<Value = World> {
        (
            prop::option::of(arb_node()),
            prop::collection::btree_map(0u32..12, arb_node(), 0..8),
            prop_oneof![
                Just(GuestCluster::Uninitialised),
                Just(GuestCluster::Reachable),
                Just(GuestCluster::Unreachable("down".into()))
            ],
        )
            .prop_map(|(cp, workers, cluster)| {
                let mut nodes: BTreeMap<NodeId, ObservedNode> = workers
                    .into_iter()
                    .map(|(i, n)| (NodeId::worker(i), n))
                    .collect();
                if let Some(cp) = cp {
                    nodes.insert(NodeId::CONTROL_PLANE, cp);
                }
                World {
                    network: NetworkState::Ready,
                    nodes,
                    cluster,
                }
            })
    }

    proptest! {
        #[test]
        fn converges_from_any_world(world in arb_world(), replicas in 0i32..10) {
            let spec = spec(replicas);
            let mut world = world;
            for _ in 0..8 {
                let actions = plan(&spec, &world);
                if actions.is_empty() && world.nodes.values().all(|n| n.ip.is_some()) {
                    break;
                }
                simulate(&mut world, &actions);
            }
            prop_assert!(plan(&spec, &world).is_empty(), "not converged: {:?}", world);
            let expected: Vec<NodeId> = desired_nodes(&spec).collect();
            let actual: Vec<NodeId> = world.nodes.keys().copied().collect();
            prop_assert_eq!(actual, expected);
            prop_assert!(world.nodes.values().all(|n| n.registered == Some(true) || n.registered == Some(false)));
        }

        #[test]
        fn teardown_empties_any_world(world in arb_world()) {
            let mut world = world;
            for _ in 0..4 {
                let actions = plan_teardown(&world);
                prop_assert!(
                    !actions.iter().any(|a| a.node() == NodeId::CONTROL_PLANE && a.is_removal())
                        || world.worker_indices().next().is_none(),
                    "control plane removed while workers exist"
                );
                simulate(&mut world, &actions);
            }
            prop_assert!(world.nodes.is_empty(), "left: {:?}", world.nodes);
        }

        #[test]
        fn removals_touch_only_surplus_workers_highest_first(world in arb_world(), replicas in 0i32..10) {
            let spec = spec(replicas);
            let removed: Vec<u32> = plan(&spec, &world)
                .into_iter()
                .filter(|a| a.is_removal() && a.node().role == Role::Worker)
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
