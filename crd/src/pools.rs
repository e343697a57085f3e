//! Worker pools: groups of identical worker VMs, each with its own size, image, Node
//! labels, taints, extended resources and kubelet settings, so one cluster can hold
//! nodes of several shapes (a scheduler benchmark's heterogeneous topology).
//!
//! `spec.workers` is the default pool, named [`DEFAULT_POOL`] (its nodes are
//! `<name>-w-<index>`, as before pools existed, and `kubectl scale` sets its replicas);
//! `spec.pools` lists more, each named (nodes `<name>-<pool>-<index>`). Of a pool only
//! `replicas` changes on a live cluster: another shape is another pool (add it, then
//! scale the old one to 0 or remove it from the list, which drains and deletes its nodes).
//!
//! What makes a worker's Node the one its pool describes is here too: how it registers
//! ([`Registration`]: labels the kubelet may set on itself, taints, kubelet settings, all
//! in place before the Node exists, so no pod lands on it unlabelled or untainted), and
//! what the controller keeps on it through the guest API afterwards ([`NodeConfig`]: the
//! labels only an administrator may set, and extended resources).

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ImageSpec;

/// Name of the pool `spec.workers` declares.
pub const DEFAULT_POOL: &str = "w";
/// Label every worker Node carries, naming its pool.
pub const POOL_LABEL: &str = "benchcluster.dev/pool";
/// Most pools `spec.pools` may list.
pub const MAX_POOLS: usize = 16;
/// Longest pool name: node names are `<name>-<pool>-<index>`, at most 63 characters, with
/// a 40-character name and a 3-digit index.
pub const MAX_POOL_NAME_LEN: usize = 18;

// The patterns of the CEL rules below (RE2, with CEL's string escaping: `\\.` is a
// literal dot), as macros so each is spelled once.

/// A label key or a taint key: an optional DNS-subdomain prefix and `/`, then a name of
/// at most 63 characters (alphanumerics at both ends, `-`, `_`, `.` inside).
macro_rules! qualified_name {
    () => {
        r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    };
}
/// A label value (or a taint value): empty, or at most 63 characters, alphanumerics at
/// both ends.
macro_rules! label_value {
    () => {
        r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
    };
}
/// An extended resource name: a DNS-subdomain prefix (required) and a name.
macro_rules! resource_name {
    () => {
        r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    };
}

/// A pool of identical worker VMs and how many of them to run.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPool {
    /// Number of worker VMs of the pool, 0 to 256 (all pools together at most 256).
    /// The only field of a pool that may change: surplus workers go highest index
    /// first, drained, within this pool only.
    #[schemars(range(min = 0, max = 256))]
    pub replicas: i32,
    /// Shape, image and scheduling properties of every worker of the pool. Immutable.
    #[serde(flatten)]
    pub template: WorkerTemplate,
}

/// The immutable part of a worker pool.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTemplate {
    /// Virtual CPUs of each worker, 1 to 255 (QEMU's limit without an interrupt-remapping
    /// IOMMU). Immutable.
    #[schemars(range(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("cpus of a worker pool is immutable: declare a new pool of the new shape and scale this one to 0"))]
    pub cpus: u32,
    /// Memory of each worker as a Kubernetes quantity, at least 256Mi. Immutable.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('256Mi')) >= 0 && quantity(self).compareTo(quantity('4Ti')) <= 0").message("memory must be a quantity between 256Mi and 4Ti, for example 4Gi"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("memory of a worker pool is immutable: declare a new pool of the new shape and scale this one to 0"))]
    pub memory: String,
    /// Disk of each worker as a Kubernetes quantity, at least 1Gi. Immutable.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1Gi')) >= 0 && quantity(self).compareTo(quantity('64Ti')) <= 0").message("disk must be a quantity between 1Gi and 64Ti, for example 40Gi"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("disk of a worker pool is immutable: declare a new pool of the new shape and scale this one to 0"))]
    pub disk: String,
    /// Base image of every worker of the pool. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("image of a worker pool is immutable: declare a new pool with the new image and scale this one to 0"))]
    pub image: ImageSpec,
    /// Labels of every Node of the pool, besides `benchcluster.dev/pool: <pool>`, at most
    /// 32. The kubelet registers its Node with the ones it may set itself; the
    /// controller adds the others (`node-role.kubernetes.io/...` and the rest of the
    /// `kubernetes.io` and `k8s.io` namespaces) through the guest cluster's API before
    /// the node counts as ready. Immutable.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = Rule::new(LABEL_KEYS_RULE).message(LABEL_KEYS_MESSAGE))]
    #[x_kube(validation = Rule::new(LABEL_VALUES_RULE).message(LABEL_VALUES_MESSAGE))]
    #[x_kube(validation = Rule::new(OWN_LABELS_RULE).message(OWN_LABELS_MESSAGE))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeLabels of a worker pool are immutable: declare a new pool with the new labels and scale this one to 0"))]
    pub node_labels: BTreeMap<String, String>,
    /// Taints of every Node of the pool, at most 16, set when the Node registers
    /// (kubeadm's `nodeRegistration.taints`), so no pod without the toleration lands on
    /// it even for a moment. Immutable.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u.key == t.key && u.effect == t.effect))").message("taints must not repeat a key with the same effect"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("taints of a worker pool are immutable: declare a new pool with the new taints and scale this one to 0"))]
    pub taints: Vec<Taint>,
    /// Extended resources every Node of the pool advertises, name to count, at most 16,
    /// for example `example.com/fake-gpu: 2`: added to the Node's capacity the
    /// documented way (a patch of its status) by the controller, and put back whenever
    /// the Node has lost them (a re-registered Node starts without). Names are
    /// domain-prefixed, outside the `kubernetes.io` domain. Immutable.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new(RESOURCE_NAMES_RULE).message(RESOURCE_NAMES_MESSAGE))]
    #[x_kube(validation = Rule::new("self.all(k, self[k] >= 1 && self[k] <= 1000000)").message("extendedResources counts must be from 1 to 1000000"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("extendedResources of a worker pool are immutable: declare a new pool with the new resources and scale this one to 0"))]
    pub extended_resources: BTreeMap<String, i64>,
    /// kubelet settings that shape scheduling, for every Node of the pool. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("kubelet settings of a worker pool are immutable: declare a new pool with the new settings and scale this one to 0"))]
    pub kubelet: KubeletSettings,
}

const LABEL_KEYS_RULE: &str = concat!(
    "self.all(k, k.size() <= 317 && k.indexOf('/') <= 253 && k.matches('",
    qualified_name!(),
    "'))"
);
const LABEL_KEYS_MESSAGE: &str = "nodeLabels keys must be label keys: an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, for example example.com/rack";
const LABEL_VALUES_RULE: &str = concat!("self.all(k, self[k].matches('", label_value!(), "'))");
const LABEL_VALUES_MESSAGE: &str = "nodeLabels values must be label values: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, or empty";
/// The pool label is the controller's, and the kubelet's own labels describe the
/// machine: a pool setting them would lie about its nodes.
const OWN_LABELS_RULE: &str = "self.all(k, !k.startsWith('benchcluster.dev/') && !(k in ['kubernetes.io/hostname', 'kubernetes.io/os', 'kubernetes.io/arch']))";
const OWN_LABELS_MESSAGE: &str = "nodeLabels must not set benchcluster.dev/ labels (benchcluster.dev/pool is set by the controller) nor kubernetes.io/hostname, kubernetes.io/os or kubernetes.io/arch (the kubelet's own)";
const RESOURCE_NAMES_RULE: &str = concat!(
    "self.all(k, k.size() <= 317 && k.indexOf('/') <= 253 && k.matches('",
    resource_name!(),
    "') && !k.startsWith('kubernetes.io/') && !k.split('/')[0].endsWith('.kubernetes.io') && !k.startsWith('requests.'))"
);
const RESOURCE_NAMES_MESSAGE: &str = "extendedResources names must be domain-prefixed resource names outside the kubernetes.io domain, for example example.com/fake-gpu: Kubernetes reserves unprefixed and kubernetes.io names for its own resources";

/// A Node taint.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    /// Taint key, a label key, for example `example.com/accelerator`.
    #[schemars(length(min = 1, max = 317))]
    #[x_kube(validation = Rule::new(TAINT_KEY_RULE).message("taints key must be a label key: an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"))]
    pub key: String,
    /// Taint value, a label value; may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new(TAINT_VALUE_RULE).message("taints value must be a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, or empty"))]
    pub value: String,
    /// What the taint does to pods that do not tolerate it.
    pub effect: TaintEffect,
}

const TAINT_KEY_RULE: &str = concat!(
    "self.indexOf('/') <= 253 && self.matches('",
    qualified_name!(),
    "')"
);
const TAINT_VALUE_RULE: &str = concat!("self.matches('", label_value!(), "')");

/// A taint's effect, as Kubernetes spells it.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    /// New pods without the toleration are not scheduled on the Node.
    NoSchedule,
    /// The scheduler tries not to place pods without the toleration on the Node.
    PreferNoSchedule,
    /// Pods without the toleration are not scheduled there, and running ones are evicted.
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// kubelet settings that change what the scheduler sees of a Node (its allocatable
/// resources and pod count), set in the node's KubeletConfiguration.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KubeletSettings {
    /// Most pods the kubelet runs (`maxPods`), 1 to 250: each node's pod range is a /24,
    /// which holds 254 addresses. The kubelet's default is 110.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 250))]
    pub max_pods: Option<i32>,
    /// Resources kept from pods for the operating system (`systemReserved`).
    #[serde(default)]
    pub system_reserved: Reservation,
    /// Resources kept from pods for Kubernetes' own daemons (`kubeReserved`).
    #[serde(default)]
    pub kube_reserved: Reservation,
}

/// CPU and memory taken out of a Node's allocatable resources.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// CPU as a quantity, for example `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('0')) >= 0 && quantity(self).compareTo(quantity('255')) <= 0").message("cpu must be a non-negative quantity of at most 255 cpus, for example 500m"))]
    pub cpu: Option<String>,
    /// Memory as a quantity, for example `512Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('0')) >= 0 && quantity(self).compareTo(quantity('4Ti')) <= 0").message("memory must be a non-negative quantity of at most 4Ti, for example 512Mi"))]
    pub memory: Option<String>,
}

impl Reservation {
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none()
    }
}

/// A pool of `spec.pools`: a name and a pool.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamedWorkerPool {
    /// Name of the pool, unique in the cluster: 1 to 18 lowercase letters and digits,
    /// not `w` (the default pool's) nor `cp`. It names the pool's nodes,
    /// `<name>-<pool>-<index>`, and their `benchcluster.dev/pool` label. No '-': with
    /// one, two clusters' node names could collide (cluster `a` pool `b-c` and
    /// cluster `a-b` pool `c`).
    #[schemars(length(min = 1, max = 18))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]+$')").message("pools name must be 1 to 18 lowercase letters and digits (no '-': node names are <name>-<pool>-<index>, and a dash could make two clusters' node names collide)"))]
    #[x_kube(validation = Rule::new("self != 'w' && self != 'cp'").message("pools name must not be w (the name of the pool spec.workers declares) nor cp (the control plane's)"))]
    pub name: String,
    /// The pool.
    #[serde(flatten)]
    pub pool: WorkerPool,
}

/// Readiness of one pool.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Name of the pool (`w` for `spec.workers`).
    pub name: String,
    /// Workers the spec asks for.
    pub replicas: i32,
    /// Workers whose Node is ready for a benchmark (Ready, labelled, resources advertised).
    pub ready_replicas: i32,
}

/// How a worker registers its Node (`kubeadm join`'s `nodeRegistration` and kubelet
/// configuration patch).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registration {
    /// Labels the kubelet registers its Node with (`--node-labels`): only those the
    /// NodeRestriction admission lets a kubelet set on its own Node.
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub kubelet: KubeletSettings,
    /// The cluster's extra kubelet flags (`spec.kubernetes.extraArgs.kubelet`).
    pub kubelet_args: BTreeMap<String, String>,
}

/// What the controller keeps on a registered Node through the guest API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Labels the Node must carry (all of them, those the kubelet set included, so a
    /// label removed behind the controller's back is put back).
    pub labels: BTreeMap<String, String>,
    /// Extended resources the Node must advertise in its capacity, name to count.
    pub extended_resources: BTreeMap<String, i64>,
}

impl NodeConfig {
    /// Whether a Node with these labels and extended resources carries the config
    /// (other labels and resources of its own are left alone).
    pub fn satisfied_by(
        &self,
        labels: &BTreeMap<String, String>,
        extended_resources: &BTreeMap<String, i64>,
    ) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self
                .extended_resources
                .iter()
                .all(|(k, v)| extended_resources.get(k) == Some(v))
    }
}

/// Labels of the `kubernetes.io` and `k8s.io` namespaces a kubelet may still set on its
/// own Node (NodeRestriction's list: the machine's own description).
const KUBELET_SETTABLE: [&str; 11] = [
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
];

/// Whether the NodeRestriction admission plugin lets a kubelet set this label on its
/// own Node: any label outside the `kubernetes.io` and `k8s.io` namespaces, and inside
/// them only [`KUBELET_SETTABLE`] and the `kubelet.kubernetes.io` and
/// `node.kubernetes.io` namespaces. The others (`node-role.kubernetes.io/...` among
/// them) only an administrator may set.
pub fn kubelet_may_set(key: &str) -> bool {
    let Some((prefix, _)) = key.split_once('/') else {
        return true;
    };
    let within = |domain: &str| prefix == domain || prefix.ends_with(&format!(".{domain}"));
    if !within("kubernetes.io") && !within("k8s.io") {
        return true;
    }
    KUBELET_SETTABLE.contains(&key)
        || within("kubelet.kubernetes.io")
        || within("node.kubernetes.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelet_may_set_only_what_node_restriction_allows() {
        for key in [
            "rack",
            "example.com/rack",
            "benchcluster.dev/pool",
            "node.kubernetes.io/instance-type",
            "node.kubernetes.io/anything",
            "kubelet.kubernetes.io/x",
            "topology.kubernetes.io/zone",
            "kubernetes.io.example.com/x",
        ] {
            assert!(kubelet_may_set(key), "{key}");
        }
        for key in [
            "node-role.kubernetes.io/worker",
            "kubernetes.io/role",
            "k8s.io/x",
            "sub.k8s.io/x",
            "topology.kubernetes.io/rack",
        ] {
            assert!(!kubelet_may_set(key), "{key}");
        }
    }

    #[test]
    fn a_node_satisfies_the_config_when_it_carries_all_of_it() {
        let config = NodeConfig {
            labels: [("a".to_owned(), "1".to_owned())].into(),
            extended_resources: [("example.com/gpu".to_owned(), 2)].into(),
        };
        let labels: BTreeMap<String, String> = [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]
        .into();
        let resources: BTreeMap<String, i64> = [("example.com/gpu".to_owned(), 2)].into();
        assert!(config.satisfied_by(&labels, &resources));
        assert!(!config.satisfied_by(&labels, &BTreeMap::new()));
        let fewer: BTreeMap<String, i64> = [("example.com/gpu".to_owned(), 1)].into();
        assert!(!config.satisfied_by(&labels, &fewer));
        assert!(!config.satisfied_by(&BTreeMap::new(), &resources));
    }
}
