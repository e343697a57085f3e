//! Prometheus metrics, served as OpenMetrics text on `/metrics` by the `http` module.
//!
//! Every series has a small, fixed label set (error kind, role, state, phase,
//! operation): no namespace, name or UID labels, so the cost of a scrape does not grow
//! with the number of BenchClusters.

use std::collections::{BTreeMap, HashMap};

use std::time::Duration;

use benchcluster_crd::{NodeState, Role};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::error::Error;
use crate::hypervisor::metered::CallKind;
use parking_lot::Mutex;

/// Prefix of every metric name.
pub const PREFIX: &str = "benchcluster";

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of the reconcile duration, in seconds: a pass on the test hypervisor takes
/// milliseconds, one that runs `kubeadm init` under emulation minutes.
const RECONCILE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets of the provisioning phases, in seconds: from a domain definition
/// (milliseconds) to a control-plane initialisation under software emulation (minutes).
const PHASE_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
];

/// A provisioning phase of one node, as in the status's `timings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Creating the disk overlay and defining the domain.
    Define,
    /// Starting the domain.
    Boot,
    /// From start until a DHCP lease for the VM's MAC appeared.
    Lease,
    /// From the lease until the first SSH command succeeded.
    Ssh,
    /// `kubeadm init` on the control plane.
    Init,
    /// `kubeadm join` on a worker.
    Join,
    /// From the end of kubeadm until the Node reported Ready.
    NodeReady,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Define,
        Phase::Boot,
        Phase::Lease,
        Phase::Ssh,
        Phase::Init,
        Phase::Join,
        Phase::NodeReady,
    ];

    /// The value of the `phase` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Define => "define",
            Phase::Boot => "boot",
            Phase::Lease => "lease",
            Phase::Ssh => "ssh",
            Phase::Init => "init",
            Phase::Join => "join",
            Phase::NodeReady => "node_ready",
        }
    }
}

/// Value of the `role` label.
pub fn role_label(role: Role) -> &'static str {
    match role {
        Role::ControlPlane => "control_plane",
        Role::Worker => "worker",
    }
}

/// Value of the `state` label: the status's node state, as written there.
pub fn state_label(state: NodeState) -> &'static str {
    match state {
        NodeState::Creating => "Creating",
        NodeState::Booting => "Booting",
        NodeState::AwaitingSsh => "AwaitingSsh",
        NodeState::Reachable => "Reachable",
        NodeState::Initializing => "Initializing",
        NodeState::Joining => "Joining",
        NodeState::Joined => "Joined",
        NodeState::Ready => "Ready",
        NodeState::Deleting => "Deleting",
        NodeState::Stopped => "Stopped",
        NodeState::Replacing => "Replacing",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    role: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    Histogram::new(RECONCILE_BUCKETS)
}

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

/// VMs counted per (role, state) label values.
type VmCounts = BTreeMap<(&'static str, &'static str), i64>;

/// The controller's metrics and the registry that serves them. One per [`crate::Context`].
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    vms: Family<VmLabels, Gauge>,
    phases: HistogramFamily<PhaseLabels>,
    status_patches: Family<ResultLabels, Counter>,
    libvirt_calls: Family<OperationLabels, Counter>,
    libvirt_mutations: Family<OperationLabels, Counter>,
    leader: Gauge,
    /// Each cluster's contribution to `vms`, by UID, so an update replaces it exactly.
    vm_counts: Mutex<HashMap<String, VmCounts>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "Reconcile passes run (success or failure)",
            reconciles.clone(),
        );
        let failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconcile passes that failed, by error kind",
            failures.clone(),
        );
        let reconcile_duration = reconcile_histogram();
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of one reconcile pass",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let vms = Family::<VmLabels, Gauge>::default();
        registry.register(
            "vms",
            "VMs of the BenchClusters this replica reconciles, by role and state (from status)",
            vms.clone(),
        );
        let phases = HistogramFamily::<PhaseLabels>::new_with_constructor(phase_histogram);
        registry.register_with_unit(
            "provisioning_phase_duration",
            "Duration of each provisioning phase of a VM (define, boot, lease, ssh, init, \
             join, node_ready), as measured by this process",
            Unit::Seconds,
            phases.clone(),
        );
        let status_patches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "status_patches",
            "Server-side-apply patches of the status subresource, by result",
            status_patches.clone(),
        );
        let libvirt_calls = Family::<OperationLabels, Counter>::default();
        registry.register(
            "libvirt_calls",
            "Hypervisor calls made, reads included, by operation",
            libvirt_calls.clone(),
        );
        let libvirt_mutations = Family::<OperationLabels, Counter>::default();
        registry.register(
            "libvirt_mutations",
            "Mutating libvirt calls made, by operation (zero at rest)",
            libvirt_mutations.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (or runs without leader election)",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            reconcile_duration,
            vms,
            phases,
            status_patches,
            libvirt_calls,
            libvirt_mutations,
            leader,
            vm_counts: Mutex::new(HashMap::new()),
        }
    }

    /// The metrics as OpenMetrics text (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Records one reconcile pass.
    pub fn reconciled(&self, duration: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(duration.as_secs_f64());
        if let Some(error) = error {
            self.failures
                .get_or_create(&ErrorLabels {
                    error: error.metric_label(),
                })
                .inc();
        }
    }

    /// Records one completed provisioning phase of one node.
    pub fn phase(&self, phase: Phase, duration: Duration) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Records a status patch.
    pub fn status_patched(&self, ok: bool) {
        self.status_patches
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Records a hypervisor call (and, for a mutation, a mutation).
    pub fn libvirt_call(&self, operation: &'static str, kind: CallKind) {
        let labels = OperationLabels { operation };
        self.libvirt_calls.get_or_create(&labels).inc();
        if kind == CallKind::Mutation {
            self.libvirt_mutations.get_or_create(&labels).inc();
        }
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Replaces the cluster's contribution to the VM gauge with `nodes`.
    pub fn set_cluster_vms(&self, uid: &str, nodes: impl IntoIterator<Item = (Role, NodeState)>) {
        let mut next = VmCounts::new();
        for (role, state) in nodes {
            *next
                .entry((role_label(role), state_label(state)))
                .or_default() += 1;
        }
        let mut all = self.vm_counts.lock();
        let previous = if next.is_empty() {
            all.remove(uid).unwrap_or_default()
        } else {
            all.insert(uid.to_owned(), next.clone()).unwrap_or_default()
        };
        // Applied under the lock, so concurrent updates of two clusters cannot
        // interleave their read-modify-write of the shared gauges.
        self.apply_vm_delta(&previous, &next);
    }

    /// Removes the cluster's contribution to the VM gauge (it is gone).
    pub fn forget_cluster(&self, uid: &str) {
        self.set_cluster_vms(uid, std::iter::empty());
    }

    fn apply_vm_delta(&self, previous: &VmCounts, next: &VmCounts) {
        let keys: std::collections::BTreeSet<&(&'static str, &'static str)> =
            previous.keys().chain(next.keys()).collect();
        for key @ (role, state) in keys {
            let before = previous.get(key).copied().unwrap_or(0);
            let after = next.get(key).copied().unwrap_or(0);
            if before != after {
                let labels = VmLabels { role, state };
                self.vms.get_or_create(&labels).inc_by(after - before);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn series_names_and_types() {
        let m = Metrics::new();
        m.reconciled(Duration::from_millis(3), None);
        m.reconciled(
            Duration::from_millis(3),
            Some(&Error::MissingMetadata("uid")),
        );
        m.phase(Phase::NodeReady, Duration::from_millis(1500));
        m.status_patched(true);
        m.libvirt_call("define_domain", CallKind::Mutation);
        m.libvirt_call("inventory", CallKind::Read);
        m.set_leader(true);
        let text = m.encode().unwrap();
        for expected in [
            "benchcluster_reconciles_total 2",
            "benchcluster_reconcile_failures_total{error=\"metadata\"} 1",
            "benchcluster_reconcile_duration_seconds_count 2",
            "benchcluster_provisioning_phase_duration_seconds_count{phase=\"node_ready\"} 1",
            "benchcluster_status_patches_total{result=\"ok\"} 1",
            "benchcluster_libvirt_mutations_total{operation=\"define_domain\"} 1",
            "benchcluster_libvirt_calls_total{operation=\"define_domain\"} 1",
            "benchcluster_libvirt_calls_total{operation=\"inventory\"} 1",
            "benchcluster_leader 1",
            "# EOF",
        ] {
            assert!(line(&text, expected).is_some(), "{expected:?} in\n{text}");
        }
        let read_as_mutation = "benchcluster_libvirt_mutations_total{operation=\"inventory\"}";
        assert!(line(&text, read_as_mutation).is_none(), "{text}");
    }

    #[test]
    fn vm_gauge_follows_each_clusters_latest_status() {
        let m = Metrics::new();
        let gauge = |role, state| {
            m.vms
                .get(&VmLabels {
                    role: role_label(role),
                    state: state_label(state),
                })
                .map(|g| g.get())
                .unwrap_or(0)
        };
        m.set_cluster_vms(
            "a",
            [
                (Role::ControlPlane, NodeState::Booting),
                (Role::Worker, NodeState::Booting),
                (Role::Worker, NodeState::Booting),
            ],
        );
        m.set_cluster_vms("b", [(Role::Worker, NodeState::Booting)]);
        assert_eq!(gauge(Role::Worker, NodeState::Booting), 3);
        m.set_cluster_vms(
            "a",
            [
                (Role::ControlPlane, NodeState::Ready),
                (Role::Worker, NodeState::Ready),
                (Role::Worker, NodeState::Booting),
            ],
        );
        assert_eq!(gauge(Role::Worker, NodeState::Booting), 2);
        assert_eq!(gauge(Role::Worker, NodeState::Ready), 1);
        assert_eq!(gauge(Role::ControlPlane, NodeState::Booting), 0);
        assert_eq!(gauge(Role::ControlPlane, NodeState::Ready), 1);
        m.forget_cluster("a");
        m.forget_cluster("b");
        m.forget_cluster("never-seen");
        for role in [Role::ControlPlane, Role::Worker] {
            for state in [NodeState::Booting, NodeState::Ready] {
                assert_eq!(gauge(role, state), 0);
            }
        }
    }
}
