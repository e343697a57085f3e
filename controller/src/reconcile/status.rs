//! Stage 4: derive the status from what was observed and done. Pure: the caller
//! passes the clock and the timelines, and writes the result only when it changed.

use std::collections::{BTreeMap, BTreeSet};

use benchcluster_crd::conditions::{self, ConditionType};
use benchcluster_crd::{
    BenchClusterSpec, BenchClusterStatus, NodeState, NodeStatus, PhaseTimings, PoolStatus, Role,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::context::Settings;
use super::outcome::{Outcome, failure_message};
use super::pools::{self, desired_nodes, fit};
use super::scheduler;
use super::timeline::Timeline;
use super::world::{GuestCluster, NetworkState, Operation, VmState, World};
use crate::names::{ClusterNames, NodeId};

/// Everything the status is computed from.
pub struct Inputs<'a> {
    pub spec: &'a BenchClusterSpec,
    pub generation: Option<i64>,
    pub names: &'a ClusterNames,
    pub world: &'a World,
    pub outcome: &'a Outcome,
    pub previous: &'a BenchClusterStatus,
    pub timelines: &'a BTreeMap<NodeId, Timeline>,
    pub settings: &'a Settings,
    /// Since when the initialised cluster's API has not answered, while it does not.
    pub api_silent_since: Option<&'a Time>,
    pub now: Time,
}

/// The current time as the API stores it: whole seconds, so a status compared with the
/// stored one differs only where something changed.
pub fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Whether two statuses say the same, conditions' transition times aside (a write that
/// would change only those says nothing new).
pub fn same(a: &BenchClusterStatus, b: &BenchClusterStatus) -> bool {
    let untimed = |s: &BenchClusterStatus| {
        let mut s = s.clone();
        for condition in &mut s.conditions {
            condition.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    a == b || untimed(a) == untimed(b)
}

/// A time as the API stores it (whole seconds), for messages.
pub fn whole_seconds(time: &Time) -> String {
    format!("{:.0}", time.0)
}

/// How a silent guest API reads in conditions: since when, and the last error.
fn silent_api_message(since: &Time, reason: &str) -> String {
    format!(
        "guest cluster API unreachable since {}: {reason}; waiting for it (nothing is reset or initialised again)",
        whole_seconds(since)
    )
}

/// The node's Node is Ready in the guest cluster and its kubeadm has returned: a Node
/// turns Ready a moment before `kubeadm join` exits, and until the operation is
/// collected its phase timings are incomplete, so the status does not call it Ready yet.
/// A worker also carries its pool's labels and extended resources: until then a
/// benchmark's pods could not find it.
/// A worker being replaced with another size is not.
fn node_ready(spec: &BenchClusterSpec, world: &World, id: NodeId) -> bool {
    world.ready(id)
        && !matches!(world.operation(id), Some(Operation::Init | Operation::Join))
        && world.node(id).is_some_and(|node| {
            pools::configured(spec, id, node)
                && !(id.role == Role::Worker && pools::drifted(spec, id, node))
        })
}

/// The status for this pass.
pub fn compute(inputs: &Inputs<'_>) -> BenchClusterStatus {
    let Inputs {
        spec,
        generation,
        names,
        world,
        previous,
        ..
    } = inputs;
    let desired: Vec<NodeId> = desired_nodes(spec).collect();

    let mut nodes = Vec::new();
    // Evaluated once per node: the counts below read this set.
    let mut ready_nodes: BTreeSet<NodeId> = BTreeSet::new();
    let mut ids: Vec<NodeId> = desired.clone();
    ids.extend(world.nodes.keys().filter(|id| !desired.contains(id)));
    for id in ids {
        let observed = world.node(id).cloned().unwrap_or_default();
        let timeline = inputs.timelines.get(&id);
        let state = if !desired.contains(&id) {
            NodeState::Deleting
        } else if id.role == Role::Worker && pools::drifted(spec, id, &observed) {
            NodeState::Replacing
        } else if let Some(operation @ (Operation::Init | Operation::Join)) = world.operation(id) {
            match operation {
                Operation::Init => NodeState::Initializing,
                _ => NodeState::Joining,
            }
        } else {
            match (observed.domain, observed.ip, observed.registered) {
                (None, _, _) => NodeState::Creating,
                (Some(VmState::Stopped), _, _) => NodeState::Stopped,
                (Some(VmState::Running), None, _) => NodeState::Booting,
                (Some(VmState::Running), Some(_), Some(true)) => NodeState::Ready,
                (Some(VmState::Running), Some(_), Some(false)) => NodeState::Joined,
                (Some(VmState::Running), Some(_), None) => {
                    if timeline.is_some_and(|t| t.reachable.is_some()) {
                        NodeState::Reachable
                    } else {
                        NodeState::AwaitingSsh
                    }
                }
            }
        };
        let previous_timings = previous
            .nodes
            .iter()
            .find(|n| status_is(n, id))
            .map(|n| n.timings.clone())
            .unwrap_or_default();
        nodes.push(NodeStatus {
            name: names.node(id),
            role: id.role,
            pool: (id.role == Role::Worker).then(|| id.pool.to_string()),
            index: id.index,
            domain: names.domain(id),
            mac: observed.mac.clone(),
            ip: observed.ip.map(|ip| ip.to_string()),
            state,
            ready: {
                let ready = node_ready(spec, world, id);
                if ready {
                    ready_nodes.insert(id);
                }
                ready
            },
            timings: match timeline {
                // Phases this incarnation has not reached yet stay empty rather than
                // showing those of a VM that no longer exists.
                Some(t) if t.saw_creation() => t.timings.clone(),
                // Adopted after a restart: what was seen since adds to the status.
                Some(t) => merge_timings(&previous_timings, &t.timings),
                None => previous_timings,
            },
        });
    }

    let ready_workers = desired
        .iter()
        .filter(|id| id.role == Role::Worker && ready_nodes.contains(*id))
        .count();
    let desired_workers = desired.len() - 1;
    let pool_statuses: Vec<PoolStatus> = pools::pools(spec)
        .map(|(name, pool)| PoolStatus {
            name: name.to_string(),
            replicas: pool.replicas,
            ready_replicas: count(
                desired
                    .iter()
                    .filter(|id| id.role == Role::Worker && id.pool == name)
                    .filter(|id| ready_nodes.contains(*id))
                    .count(),
            ),
        })
        .collect();
    let pool_summary = pool_statuses
        .iter()
        .map(|p| format!("{} {}/{}", p.name, p.ready_replicas, p.replicas))
        .collect::<Vec<_>>()
        .join(", ");
    let control_plane_ready = ready_nodes.contains(&NodeId::CONTROL_PLANE);
    let surplus = world.nodes.keys().any(|id| !desired.contains(id));
    let workers_ready = ready_workers == desired_workers && !surplus;
    // Found once, by the driver, before planning.
    let rejected = world.rejected_scheduler.clone();
    let scheduler_ready = scheduler::readiness(spec, world, rejected.as_ref());
    // A configuration the scheduler refused waits for the spec to change.
    let (stalled, stall_reason, stall_message) = match stall(inputs) {
        (false, ..) if rejected.is_some() => (
            true,
            "SchedulerConfigRejected".to_owned(),
            scheduler_ready.message.clone(),
        ),
        stall => stall,
    };
    // A spec the controller cannot meet (a control plane of another size) is not Ready,
    // however well the cluster runs: Ready and Stalled never both hold.
    let ready = control_plane_ready
        && workers_ready
        && scheduler_ready.ready
        && world.network == NetworkState::Ready
        && !stalled;
    let (progress_reason, progress_message) = match progress(inputs, &nodes) {
        // Every node is Ready: what is left is the scheduler.
        (reason, _) if reason == "Converging" && !scheduler_ready.ready => (
            format!("Scheduler{}", scheduler_ready.reason),
            scheduler_ready.message.clone(),
        ),
        progress => progress,
    };
    let now = inputs.now.clone();
    let cond = |t, status, reason: &str, message: String| {
        conditions::new(t, status, reason, message, *generation, now.clone())
    };

    let cp_ip = world.node(NodeId::CONTROL_PLANE).and_then(|n| n.ip);
    let silent_api = match (&world.cluster, inputs.api_silent_since) {
        (GuestCluster::Unreachable(reason), Some(since)) => Some(silent_api_message(since, reason)),
        _ => None,
    };
    let control_plane = if control_plane_ready {
        cond(
            ConditionType::ControlPlaneReady,
            true,
            "NodeReady",
            format!("{} is Ready", names.node(NodeId::CONTROL_PLANE)),
        )
    } else if let Some(message) = &silent_api {
        cond(
            ConditionType::ControlPlaneReady,
            false,
            "GuestApiUnreachable",
            message.clone(),
        )
    } else {
        cond(
            ConditionType::ControlPlaneReady,
            false,
            &progress_reason_for(&nodes, NodeId::CONTROL_PLANE),
            node_message(&nodes, NodeId::CONTROL_PLANE),
        )
    };
    let workers = cond(
        ConditionType::WorkersReady,
        workers_ready,
        if workers_ready {
            "AllWorkersReady"
        } else if surplus {
            "ScalingDown"
        } else {
            "WorkersNotReady"
        },
        format!("{ready_workers}/{desired_workers} workers Ready"),
    );
    let scheduler_condition = cond(
        ConditionType::SchedulerReady,
        scheduler_ready.ready,
        scheduler_ready.reason,
        scheduler_ready.message,
    );
    let paused = spec.paused;
    let ready_condition = if ready {
        cond(
            ConditionType::Ready,
            true,
            "Ready",
            format!("control plane and {desired_workers} worker(s) Ready"),
        )
    } else if stalled {
        cond(
            ConditionType::Ready,
            false,
            &stall_reason,
            stall_message.clone(),
        )
    } else if paused {
        cond(
            ConditionType::Ready,
            false,
            "Paused",
            "spec.paused is true: no VM or guest action is taken".into(),
        )
    } else {
        cond(
            ConditionType::Ready,
            false,
            &progress_reason,
            progress_message.clone(),
        )
    };
    let reconciling = if ready || stalled || paused {
        cond(
            ConditionType::Reconciling,
            false,
            if paused {
                "Paused"
            } else if ready {
                "Ready"
            } else {
                "Stalled"
            },
            String::new(),
        )
    } else {
        cond(
            ConditionType::Reconciling,
            true,
            &progress_reason,
            progress_message,
        )
    };
    let stalled_condition = if stalled {
        cond(ConditionType::Stalled, true, &stall_reason, stall_message)
    } else {
        cond(ConditionType::Stalled, false, "NotStalled", String::new())
    };
    let next: Vec<Condition> = vec![
        ready_condition,
        control_plane,
        workers,
        scheduler_condition,
        reconciling,
        stalled_condition,
    ];

    let last_provisioning = aggregate(&nodes).or_else(|| previous.last_provisioning.clone());
    let initialised = !matches!(world.cluster, GuestCluster::Uninitialised);
    BenchClusterStatus {
        observed_generation: *generation,
        conditions: conditions::merge(&previous.conditions, next),
        nodes,
        ready_workers: count(ready_workers),
        desired_workers: count(desired_workers),
        default_pool_ready: pool_statuses.first().map_or(0, |p| p.ready_replicas),
        // Only with more than the default pool: one pool says nothing the worker
        // counts do not.
        pools: if pool_statuses.len() > 1 {
            pool_statuses
        } else {
            Vec::new()
        },
        pool_summary: Some(pool_summary),
        control_plane_endpoint: match (initialised, cp_ip) {
            (true, Some(ip)) => Some(format!("https://{ip}:6443")),
            _ => previous
                .control_plane_endpoint
                .clone()
                .filter(|_| initialised),
        },
        kubeconfig_secret: initialised.then(|| names.kubeconfig_secret()),
        last_provisioning,
        scheduler: scheduler::status(world, previous, rejected),
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The node a status entry is about (an entry written before pools existed names no
/// pool: the default one's).
pub fn node_id(status: &NodeStatus) -> Option<NodeId> {
    match status.role {
        Role::ControlPlane => (status.index == 0).then_some(NodeId::CONTROL_PLANE),
        Role::Worker => {
            let pool = status.pool.as_deref().map_or(
                Some(crate::names::PoolName::DEFAULT),
                crate::names::PoolName::new,
            )?;
            Some(NodeId::pooled(pool, status.index))
        }
    }
}

/// Whether the status entry is the node's.
fn status_is(status: &NodeStatus, id: NodeId) -> bool {
    node_id(status) == Some(id)
}

fn merge_timings(previous: &PhaseTimings, current: &PhaseTimings) -> PhaseTimings {
    PhaseTimings {
        define_ms: current.define_ms.or(previous.define_ms),
        boot_ms: current.boot_ms.or(previous.boot_ms),
        lease_ms: current.lease_ms.or(previous.lease_ms),
        ssh_ms: current.ssh_ms.or(previous.ssh_ms),
        init_ms: current.init_ms.or(previous.init_ms),
        join_ms: current.join_ms.or(previous.join_ms),
        ready_ms: current.ready_ms.or(previous.ready_ms),
    }
}

/// The slowest node's duration of each phase: what bounded the cluster's provisioning.
fn aggregate(nodes: &[NodeStatus]) -> Option<PhaseTimings> {
    let max =
        |f: fn(&PhaseTimings) -> Option<u64>| nodes.iter().filter_map(|n| f(&n.timings)).max();
    let timings = PhaseTimings {
        define_ms: max(|t| t.define_ms),
        boot_ms: max(|t| t.boot_ms),
        lease_ms: max(|t| t.lease_ms),
        ssh_ms: max(|t| t.ssh_ms),
        init_ms: max(|t| t.init_ms),
        join_ms: max(|t| t.join_ms),
        ready_ms: max(|t| t.ready_ms),
    };
    (timings != PhaseTimings::default()).then_some(timings)
}

/// Whether progress is blocked on something outside the controller's reach.
fn stall(inputs: &Inputs<'_>) -> (bool, String, String) {
    let network = &inputs.spec.network.name;
    match inputs.world.network {
        NetworkState::Missing => {
            return (
                true,
                "NetworkNotFound".into(),
                format!("libvirt network {network:?} does not exist on the hypervisor"),
            );
        }
        NetworkState::Inactive => {
            return (
                true,
                "NetworkInactive".into(),
                format!("libvirt network {network:?} is not active"),
            );
        }
        NetworkState::NoDhcp => {
            return (
                true,
                "NetworkHasNoDhcp".into(),
                format!(
                    "libvirt network {network:?} has no <dhcp> element: VMs would never get an address"
                ),
            );
        }
        NetworkState::Ready => {}
    }
    if let Some((action, error)) = inputs
        .outcome
        .failures
        .iter()
        .find(|(_, e)| e.is_permanent())
    {
        return (true, error.reason().into(), failure_message(*action, error));
    }
    // Creating nothing is no progress either: the cluster waits for room on the host
    // (while it has a node to create: what exists carries on).
    let to_create = desired_nodes(inputs.spec).any(|id| {
        !inputs
            .world
            .node(id)
            .is_some_and(super::world::ObservedNode::exists)
    });
    if let Some(short) = inputs
        .world
        .capacity
        .filter(|_| to_create)
        .and_then(|c| fit(inputs.spec, &c).err())
    {
        return (
            true,
            "InsufficientCapacity".into(),
            format!(
                "{short}; no VM is created until it fits (fewer or smaller nodes, or the \
                 controller's --cpu-overcommit and --memory-overcommit)"
            ),
        );
    }
    if let Some(cp) = inputs.world.node(NodeId::CONTROL_PLANE)
        && pools::drifted(inputs.spec, NodeId::CONTROL_PLANE, cp)
        && let Some(size) = cp.size
    {
        return (
            true,
            "ControlPlaneSizeDiffers".into(),
            format!(
                "the control-plane VM has {} vCPUs and {}Mi of memory, spec.controlPlane asks \
                 for {} and {}; a control plane is never replaced (its cluster would go): set \
                 spec.controlPlane back, or delete and re-create the BenchCluster",
                size.vcpus,
                size.memory_bytes >> 20,
                inputs.spec.control_plane.cpus,
                inputs.spec.control_plane.memory
            ),
        );
    }
    let timeout = inputs.settings.dhcp_timeout;
    if let Some(id) = inputs
        .world
        .nodes
        .iter()
        .find_map(|(id, n)| n.waiting_for_lease.filter(|w| *w >= timeout).map(|_| *id))
    {
        return (
            true,
            "NoDhcpLease".into(),
            format!(
                // A fixed bound, not the growing wait, so the status does not change every pass.
                "{} has had no DHCP lease for its MAC {} for more than {}s on network {network:?}",
                inputs.names.domain(id),
                inputs
                    .world
                    .node(id)
                    .and_then(|n| n.mac.clone())
                    .unwrap_or_else(|| inputs.names.mac(id)),
                timeout.as_secs()
            ),
        );
    }
    (false, String::new(), String::new())
}

/// Reason and message of the current step towards the spec.
fn progress(inputs: &Inputs<'_>, nodes: &[NodeStatus]) -> (String, String) {
    if let Some((action, error)) = inputs.outcome.failures.first() {
        return ("StepFailed".into(), failure_message(*action, error));
    }
    // The same message as when it failed, so a retry in flight rewrites nothing.
    if let Some((_, message)) = inputs.outcome.retrying.first() {
        return ("StepFailed".into(), message.clone());
    }
    if let GuestCluster::Unreachable(reason) = &inputs.world.cluster {
        let message = match inputs.api_silent_since {
            Some(since) => silent_api_message(since, reason),
            None => format!("guest cluster API: {reason}"),
        };
        return ("GuestApiUnreachable".into(), message);
    }
    let pending: Vec<&NodeStatus> = nodes
        .iter()
        .filter(|n| n.state != NodeState::Ready)
        .collect();
    match pending.first() {
        None => ("Converging".into(), String::new()),
        Some(first) => (
            state_reason(first.state).into(),
            format!(
                "{} node(s) not Ready; {} is {:?}",
                pending.len(),
                first.name,
                first.state
            ),
        ),
    }
}

fn state_reason(state: NodeState) -> &'static str {
    match state {
        NodeState::Creating => "CreatingVMs",
        NodeState::Booting => "WaitingForLease",
        NodeState::AwaitingSsh => "WaitingForSsh",
        NodeState::Reachable => "Provisioning",
        NodeState::Initializing => "InitializingControlPlane",
        NodeState::Joining => "JoiningWorkers",
        NodeState::Replacing => "ReplacingWorkers",
        NodeState::Joined => "WaitingForNodeReady",
        NodeState::Ready => "Ready",
        NodeState::Deleting => "ScalingDown",
        NodeState::Stopped => "StartingVMs",
    }
}

fn progress_reason_for(nodes: &[NodeStatus], id: NodeId) -> String {
    nodes
        .iter()
        .find(|n| status_is(n, id))
        .map(|n| state_reason(n.state))
        .unwrap_or("CreatingVMs")
        .into()
}

fn node_message(nodes: &[NodeStatus], id: NodeId) -> String {
    nodes
        .iter()
        .find(|n| status_is(n, id))
        .map(|n| format!("{} is {:?}", n.name, n.state))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::{Duration, Instant};

    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::reconcile::plan::tests::{ready_world, spec};
    use crate::reconcile::world::ObservedNode;

    fn status(
        world: &World,
        previous: &BenchClusterStatus,
        timeline: Timeline,
    ) -> BenchClusterStatus {
        let names = ClusterNames {
            namespace: "ns".into(),
            name: "c".into(),
            uid: "uid".into(),
        };
        compute(&Inputs {
            spec: &spec(1),
            generation: Some(1),
            names: &names,
            world,
            outcome: &Outcome::default(),
            previous,
            timelines: &[(NodeId::worker(0), timeline)].into(),
            settings: &Settings::default(),
            api_silent_since: None,
            now: Time(Timestamp::now()),
        })
    }

    #[test]
    fn a_silent_api_says_since_when_in_whole_seconds_and_the_last_error() {
        let mut world = ready_world(1);
        world.cluster = GuestCluster::Unreachable("client error (Connect)".into());
        for node in world.nodes.values_mut() {
            node.registered = None;
        }
        let names = ClusterNames {
            namespace: "ns".into(),
            name: "c".into(),
            uid: "uid".into(),
        };
        let since = Time("2026-12-01T19:01:37.654321Z".parse().unwrap());
        let computed = compute(&Inputs {
            spec: &spec(1),
            generation: Some(1),
            names: &names,
            world: &world,
            outcome: &Outcome::default(),
            previous: &BenchClusterStatus::default(),
            timelines: &BTreeMap::new(),
            settings: &Settings::default(),
            api_silent_since: Some(&since),
            now: Time(Timestamp::now()),
        });
        let condition = |t: &str| {
            computed
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .cloned()
                .unwrap()
        };
        for t in ["Ready", "ControlPlaneReady"] {
            let c = condition(t);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                ("False", "GuestApiUnreachable")
            );
            assert!(
                c.message
                    .starts_with("guest cluster API unreachable since 2026-12-01T19:01:37Z: client error (Connect)"),
                "{t}: {}",
                c.message
            );
        }
        // The kubeconfig Secret stays named: the cluster is initialised, only silent.
        assert_eq!(computed.kubeconfig_secret.as_deref(), Some("c-kubeconfig"));
    }

    fn worker_timings(status: &BenchClusterStatus) -> PhaseTimings {
        status
            .nodes
            .iter()
            .find(|n| n.role == Role::Worker && n.index == 0)
            .map(|n| n.timings.clone())
            .unwrap()
    }

    #[test]
    fn a_node_is_not_ready_while_its_join_is_in_flight() {
        let mut world = ready_world(1);
        world.operations.insert(NodeId::worker(0), Operation::Join);
        let computed = status(&world, &BenchClusterStatus::default(), Timeline::default());
        let worker = computed
            .nodes
            .iter()
            .find(|n| n.role == Role::Worker)
            .unwrap();
        assert_eq!(worker.state, NodeState::Joining);
        assert!(!worker.ready);
        assert_eq!(computed.ready_workers, 0);
        let ready = computed
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "False");

        world.operations.clear();
        let computed = status(&world, &BenchClusterStatus::default(), Timeline::default());
        assert_eq!(computed.ready_workers, 1);
    }

    #[test]
    fn a_recreated_node_shows_its_own_timings_only() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut first = Timeline::default();
        first.create_started(at(0));
        first.defined(at(10));
        first.booted(at(10), at(20));
        first.leased(at(100));
        first.reachable(at(200));
        first.joined(at(200), at(300));
        first.node_ready(at(400));
        let world = ready_world(1);
        let previous = status(&world, &BenchClusterStatus::default(), first.clone());
        assert_eq!(worker_timings(&previous).ready_ms, Some(100));

        // The worker's domain was defined again on its kept disk and is not started yet.
        let mut world = ready_world(1);
        world.nodes.insert(
            NodeId::worker(0),
            ObservedNode {
                domain: Some(VmState::Stopped),
                disk: true,
                ..ObservedNode::default()
            },
        );
        let mut second = first.clone();
        second.define_started(at(10_000));
        second.defined(at(10_005));
        assert_eq!(
            worker_timings(&status(&world, &previous, second)),
            PhaseTimings {
                define_ms: Some(5),
                ..PhaseTimings::default()
            }
        );

        // After a restart the timeline starts empty: what it sees adds to the status.
        let mut adopted = Timeline::default();
        adopted.booted(at(10_000), at(10_030));
        let merged = worker_timings(&status(&world, &previous, adopted));
        assert_eq!(merged.boot_ms, Some(30));
        assert_eq!(merged.ready_ms, Some(100));
    }
}
