//! The observed state of one BenchCluster: a plain value the planner reads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use benchcluster_crd::RejectedConfig;
pub use benchcluster_crd::scheduler::RunningScheduler;

use super::pools::Capacity;
use crate::names::{KeyTag, NodeId, Seed};

/// What the hypervisor says about the cluster's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkState {
    Ready,
    Missing,
    Inactive,
    /// The network exists but has no `<dhcp>` element: VMs would never get an address.
    NoDhcp,
}

/// Run state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Running,
    /// Defined but not running.
    Stopped,
}

/// The vCPUs and memory a VM is defined with (or others' VMs take).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

/// One node as observed: any of domain, disk and lease may be missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedNode {
    /// Run state of the owned domain, if one exists.
    pub domain: Option<VmState>,
    /// Its domain's MAC on the cluster network.
    pub mac: Option<String>,
    /// What its domain is defined with, when its XML says.
    pub size: Option<VmSize>,
    /// Whether the node's disk overlay exists.
    pub disk: bool,
    /// The node's identity seed volumes that exist: the one its domain boots from, and
    /// strays (a racing pass's whose definition lost, or one written by a pass that
    /// died before defining its domain).
    pub seeds: BTreeSet<Seed>,
    /// The tag of the host key pinned in its domain's metadata, which names the seed
    /// the domain boots from.
    pub pinned_key: Option<KeyTag>,
    /// Address from an unexpired lease for the node's own MAC.
    pub ip: Option<Ipv4Addr>,
    /// How long the domain has been running without a lease, when known.
    pub waiting_for_lease: Option<Duration>,
    /// The guest cluster's Node of this name: `None` when absent, else its readiness.
    pub registered: Option<bool>,
    /// Whether this process has seen the node's current incarnation answer over SSH.
    pub reachable: bool,
    /// Whether its Node is cordoned by a drain of this controller (one that may have
    /// been abandoned since).
    pub cordoned: bool,
    /// Its Node's labels, when registered.
    pub labels: BTreeMap<String, String>,
    /// Extended resources in its Node's capacity, when registered.
    pub extended_resources: BTreeMap<String, i64>,
}

impl ObservedNode {
    /// Whether anything of the node exists on the hypervisor.
    pub fn exists(&self) -> bool {
        self.domain.is_some() || self.disk || !self.seeds.is_empty()
    }

    /// The seed its domain boots from, as far as the names tell: the one named by the
    /// host key it pins (every domain this controller defines), else the legacy one
    /// (a domain defined before seeds were keyed). `None` without a domain or without
    /// a pinned key, when nothing tells.
    pub fn booted_seed(&self) -> Option<Seed> {
        self.domain?;
        let own = Seed::Keyed(self.pinned_key.clone()?);
        if !self.seeds.contains(&own) && self.seeds.contains(&Seed::Legacy) {
            return Some(Seed::Legacy);
        }
        Some(own)
    }

    /// Whether the seed its domain boots from is gone: it cannot start any more.
    pub fn seed_missing(&self) -> bool {
        self.booted_seed()
            .is_some_and(|seed| !self.seeds.contains(&seed))
    }

    /// The seeds that can go now: only beside a domain that boots from a seed named by
    /// its own key, all the others. Without a domain, a seed may be the one a pass of
    /// another controller just wrote for the domain it is about to define, so none is
    /// stray; beside a domain that boots from the legacy seed or whose seed is gone,
    /// which seed it uses is not proven by its name, so none is stray either.
    pub fn stray_seeds(&self) -> Vec<Seed> {
        let Some(own @ Seed::Keyed(_)) = self.booted_seed() else {
            return Vec::new();
        };
        if !self.seeds.contains(&own) {
            return Vec::new();
        }
        self.seeds.iter().filter(|s| **s != own).cloned().collect()
    }
}

/// A long guest operation running in the background for one node: a pass starts it and
/// a later pass collects its result, so no pass waits for kubeadm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `kubeadm init` on the control plane.
    Init,
    /// `kubeadm join` of a worker.
    Join,
    /// Cordon, drain and delete of a surplus worker's Node.
    Drain,
    /// The control plane's scheduler switched to the spec's configuration.
    Scheduler,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Init => "kubeadm init",
            Operation::Join => "kubeadm join",
            Operation::Drain => "drain",
            Operation::Scheduler => "scheduler switch",
        }
    }
}

/// The guest cluster as seen through its API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestCluster {
    /// No admin kubeconfig stored yet: the control plane was never initialised.
    Uninitialised,
    /// A kubeconfig exists but the API did not answer, or was not asked because it
    /// could not (its control-plane VM is down) or need not (the cluster is being
    /// deleted); the reason is for the status.
    Unreachable(String),
    /// The API answered; each node's `registered` says what it reported.
    Reachable,
}

/// Everything observe found, the only input of the planner besides the spec.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    pub network: NetworkState,
    pub nodes: BTreeMap<NodeId, ObservedNode>,
    pub cluster: GuestCluster,
    /// Operations in flight, started by earlier passes of this process.
    pub operations: BTreeMap<NodeId, Operation>,
    /// What the host offers VMs, when the hypervisor said.
    pub capacity: Option<Capacity>,
    /// The scheduler, when the guest API showed it.
    pub scheduler: Option<RunningScheduler>,
    /// The configuration the scheduler refused (this pass, else as the last status
    /// says), while the spec still asks for it: not tried again until the spec changes.
    /// Set by the driver ([`super::scheduler::rejected`]); the status reports it.
    pub rejected_scheduler: Option<RejectedConfig>,
}

impl World {
    pub fn node(&self, id: NodeId) -> Option<&ObservedNode> {
        self.nodes.get(&id)
    }

    /// The operation in flight for the node, if any.
    pub fn operation(&self, id: NodeId) -> Option<Operation> {
        self.operations.get(&id).copied()
    }

    /// Whether the node's Node exists in the guest cluster and is Ready.
    pub fn ready(&self, id: NodeId) -> bool {
        self.node(id).and_then(|n| n.registered).unwrap_or(false)
    }

    /// Whether any worker has something on the host.
    pub fn has_workers(&self) -> bool {
        self.nodes
            .keys()
            .any(|id| id.role == benchcluster_crd::Role::Worker)
    }
}
