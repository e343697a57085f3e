//! The `BenchCluster` custom resource: a kubeadm cluster of one control-plane VM and
//! pools of worker VMs on a libvirt host, declared as a Kubernetes object.
//!
//! This crate holds types only (no I/O): the spec a user writes, the status the
//! controller reports, and the validation the API server enforces (OpenAPI bounds and
//! CEL rules). Doc comments become the schema descriptions shown by `kubectl explain`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod components;
pub mod conditions;
pub mod pools;
pub mod quantity;
pub mod scheduler;

pub use components::{Component, ComponentArgs};
pub use conditions::ConditionType;
pub use pools::{
    DEFAULT_POOL, KubeletSettings, NamedWorkerPool, POOL_LABEL, PoolStatus, Reservation, Taint,
    TaintEffect, WorkerPool, WorkerTemplate,
};
pub use scheduler::{KubeSchedulerConfiguration, RejectedConfig, SchedulerSpec, SchedulerStatus};

/// API group of every resource this project defines.
pub const GROUP: &str = "benchcluster.dev";
/// Finalizer the controller puts on each BenchCluster so its VMs are removed first.
pub const FINALIZER: &str = "benchcluster.dev/cleanup";
/// Upper bound on the workers of all pools together; one libvirt host cannot hold more.
pub const MAX_WORKERS: i32 = 256;
/// Longest BenchCluster name: node names are `<name>-w-<index>` and must stay DNS labels.
pub const MAX_NAME_LEN: usize = 40;

/// A disposable kubeadm cluster on a libvirt host: one control-plane VM and pools of
/// worker VMs (`workers`, the default pool, and `pools`), each VM a copy-on-write
/// overlay of its pool's base image.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "benchcluster.dev",
    version = "v1alpha1",
    kind = "BenchCluster",
    plural = "benchclusters",
    shortname = "bc",
    category = "benchcluster",
    namespaced,
    status = "BenchClusterStatus",
    derive = "PartialEq",
    doc = "A kubeadm cluster of libvirt VMs for benchmarking Kubernetes: one control plane and pools of workers.",
    scale(
        spec_replicas_path = ".spec.workers.replicas",
        status_replicas_path = ".status.defaultPoolReady"
    ),
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Workers","type":"integer","jsonPath":".status.readyWorkers"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredWorkers"}"#,
    printcolumn = r#"{"name":"Pools","type":"string","priority":1,"jsonPath":".status.poolSummary"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.controlPlaneEndpoint"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(NODE_CIDRS_RULE).field_path(".workers.replicas").message(Message::Expression(NODE_CIDRS_MESSAGE.into())))]
#[x_kube(validation = Rule::new(TOTAL_WORKERS_RULE).field_path(".pools").message(TOTAL_WORKERS_MESSAGE))]
pub struct BenchClusterSpec {
    /// The single control-plane VM, at least 2 cpus and 2Gi of memory (kubeadm init's
    /// preflight refuses fewer than 2 CPUs or less than 1700 MB seen by the guest).
    /// Immutable: a different size or image needs a new BenchCluster.
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("controlPlane is immutable; create a new BenchCluster to change it"),
        validation = Rule::new("self.cpus >= 2").field_path(".cpus").message("controlPlane.cpus must be at least 2: kubeadm init's preflight refuses a control plane with fewer CPUs"),
        validation = Rule::new("!isQuantity(self.memory) || quantity(self.memory).compareTo(quantity('2Gi')) >= 0").field_path(".memory").message("controlPlane.memory must be at least 2Gi: kubeadm init's preflight refuses a control plane whose guest sees less than 1700 MB"),
    )]
    pub control_plane: NodeTemplate,
    /// The default worker pool, named `w`: its nodes are `<name>-w-<index>`, and
    /// `kubectl scale bc/<name> --replicas=N` sets its `replicas`. `replicas` may change
    /// at any time; the rest is immutable.
    pub workers: WorkerPool,
    /// More worker pools, each of its own shape, image, labels, taints and extended
    /// resources, at most 16; nodes `<name>-<pool>-<index>`. `replicas` of each may
    /// change at any time; a pool removed from the list has its nodes drained and
    /// deleted. All pools together hold at most 256 workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub pools: Vec<NamedWorkerPool>,
    /// The libvirt network the VMs attach to. It must exist on the hypervisor and serve DHCP.
    #[x_kube(validation = Rule::new("self == oldSelf").message("network is immutable"))]
    pub network: NetworkSpec,
    /// Settings of the kubeadm cluster formed on the VMs. Single-stack IPv4: the VMs
    /// have only their IPv4 DHCP lease, which kube-apiserver advertises.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("kubernetes is immutable"))]
    pub kubernetes: KubernetesSpec,
    /// The guest cluster's scheduler, the variable of a scheduler benchmark.
    #[serde(default)]
    pub scheduler: SchedulerSpec,
    /// How the controller reaches the VMs over SSH.
    pub ssh: SshSpec,
    /// While true the controller takes no libvirt or SSH action for this cluster.
    #[serde(default)]
    pub paused: bool,
}

/// The shape of one VM: size and base image.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeTemplate {
    /// Virtual CPUs, 1 to 255 (QEMU's limit without an interrupt-remapping IOMMU); at
    /// least 2 on the control plane.
    #[schemars(range(min = 1, max = 255))]
    pub cpus: u32,
    /// Memory as a Kubernetes quantity, for example `4Gi`. At least 256Mi.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('256Mi')) >= 0 && quantity(self).compareTo(quantity('4Ti')) <= 0").message("memory must be a quantity between 256Mi and 4Ti, for example 4Gi"))]
    pub memory: String,
    /// Size of the VM's disk as a Kubernetes quantity, for example `40Gi`. The disk is a
    /// qcow2 overlay on the base image, so it must be at least the image's virtual size.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('1Gi')) >= 0 && quantity(self).compareTo(quantity('64Ti')) <= 0").message("disk must be a quantity between 1Gi and 64Ti, for example 40Gi"))]
    pub disk: String,
    /// The base image the VM's disk is an overlay of.
    pub image: ImageSpec,
}

/// A base image: a volume in the controller's image pool.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Name of a volume in the storage pool the controller is configured with
    /// (`--image-pool`). A plain file name: no path, no `..`.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9._+-]*$') && !self.contains('..')").message("image.volume must be a volume name in the image pool (letters, digits, '.', '_', '+', '-'), not a path"))]
    pub volume: String,
    /// Firmware the image boots with: `bios`, or `uefi` (q35 + OVMF, as NixOS images
    /// built with systemd-boot need).
    #[serde(default)]
    pub firmware: Firmware,
}

/// Firmware of a base image.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS).
    #[default]
    Bios,
    /// UEFI through OVMF, on a q35 machine with ACPI.
    Uefi,
}

/// The libvirt network the VMs attach to.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Name of an existing libvirt network with DHCP, for example `scheduler_benchmark_net`.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9._-]*$')").message("network.name must be a libvirt network name (letters, digits, '.', '_', '-')"))]
    pub name: String,
}

/// Settings of the kubeadm cluster.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(SUBNETS_DISJOINT_RULE).field_path(".podSubnet").message(Message::Expression(SUBNETS_DISJOINT_MESSAGE.into())))]
pub struct KubernetesSpec {
    /// Pod network CIDR (kubeadm `networking.podSubnet`): IPv4, /8 to /24.
    /// kube-controller-manager gives each node a /24 of it, so a /N holds 2^(24-N)
    /// nodes, the control plane included. It must not overlap `serviceSubnet`.
    #[serde(default = "default_pod_subnet")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("podSubnet must be a CIDR, for example 10.244.0.0/16"))]
    #[x_kube(validation = Rule::new(POD_SUBNET_RULE).message(POD_SUBNET_MESSAGE))]
    pub pod_subnet: String,
    /// Service CIDR (kubeadm `networking.serviceSubnet`): IPv4, /12 to /28.
    #[serde(default = "default_service_subnet")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("serviceSubnet must be a CIDR, for example 10.96.0.0/12"))]
    #[x_kube(validation = Rule::new(SERVICE_SUBNET_RULE).message(SERVICE_SUBNET_MESSAGE))]
    pub service_subnet: String,
    /// Feature gates of the cluster, name to on or off, at most 64, for example
    /// `SchedulerQueueingHints: false`. Every component gets all of them:
    /// kube-apiserver, kube-controller-manager and kube-scheduler as `--feature-gates`,
    /// every node's kubelet in its KubeletConfiguration (`featureGates`). Applied when
    /// the cluster forms: `kubernetes` is immutable, so other gates need a new
    /// BenchCluster. A gate a component does not know stops it from starting, and the
    /// cluster does not form.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = components::MAX_FEATURE_GATES))]
    #[x_kube(validation = Rule::new(components::FEATURE_GATE_NAMES_RULE).message(components::FEATURE_GATE_NAMES_MESSAGE))]
    pub feature_gates: BTreeMap<String, bool>,
    /// Extra command-line flags of kube-apiserver, kube-controller-manager,
    /// kube-scheduler and every node's kubelet, flag name without `--` to value, passed
    /// as kubeadm's `extraArgs` after the controller's own. Applied when the cluster
    /// forms: `kubernetes` is immutable, so other flags need a new BenchCluster. Flags
    /// the controller or kubeadm set are refused, and so is `feature-gates` (use
    /// `featureGates`). A flag a component refuses stops it from starting, and the
    /// cluster does not form.
    #[serde(default, skip_serializing_if = "ComponentArgs::is_empty")]
    pub extra_args: ComponentArgs,
}

/// kubeadm (`ValidatePodSubnetNodeMask`, with kube-controller-manager's default
/// `--node-cidr-mask-size-ipv4=24`) wants the pod subnet to hold a node's /24 and to be
/// at most 16 bits larger. IPv4 only: the node addresses are IPv4, and an IPv6 subnet
/// makes kubeadm's preflight require `net.ipv6.conf.default.forwarding=1`, which the
/// image contract does not ask for. (`isCIDR` is checked by the rule before this one.)
const POD_SUBNET_RULE: &str = "!isCIDR(self) || (cidr(self).ip().family() == 4 && cidr(self).prefixLength() >= 8 && cidr(self).prefixLength() <= 24)";
const POD_SUBNET_MESSAGE: &str = "podSubnet must be an IPv4 CIDR from /8 to /24, for example 10.244.0.0/16: the VMs have IPv4 addresses only, and kubeadm gives each node a /24 of it and allows it at most 16 bits more";

/// kube-apiserver refuses a service range whose family differs from its advertise
/// address (the control plane's IPv4 lease) and one with more than 20 host bits
/// (kubeadm's `ValidateServiceSubnetSize` too); kubeadm wants at least 10 addresses
/// (`MinimumAddressesInServiceSubnet`), so /28 at most.
const SERVICE_SUBNET_RULE: &str = "!isCIDR(self) || (cidr(self).ip().family() == 4 && cidr(self).prefixLength() >= 12 && cidr(self).prefixLength() <= 28)";
const SERVICE_SUBNET_MESSAGE: &str = "serviceSubnet must be an IPv4 CIDR from /12 to /28, for example 10.96.0.0/12: kube-apiserver needs the family of its IPv4 node address and at most 20 host bits, kubeadm at least 10 addresses";

/// Two CIDRs overlap exactly when one contains the other (CIDR blocks nest or are
/// disjoint); `containsCIDR` masks both, and is false across families. On overlap
/// kube-controller-manager hands no node a pod range inside the service range: with
/// the pod subnet inside the service subnet no node ever gets one, nor turns Ready.
const SUBNETS_DISJOINT_RULE: &str = "!isCIDR(self.podSubnet) || !isCIDR(self.serviceSubnet) || (!cidr(self.podSubnet).containsCIDR(cidr(self.serviceSubnet)) && !cidr(self.serviceSubnet).containsCIDR(cidr(self.podSubnet)))";
/// A message expression: it names the values, since one of them may be a default.
const SUBNETS_DISJOINT_MESSAGE: &str = "'podSubnet ' + self.podSubnet + ' overlaps serviceSubnet ' + self.serviceSubnet + ': they must be disjoint, since nodes get no pod range from addresses the services take; for example 10.244.0.0/16 and 10.96.0.0/12'";

/// Workers of every pool, as CEL (Kubernetes' list library has `sum`).
macro_rules! total_workers {
    () => {
        "(self.workers.replicas + (has(self.pools) ? self.pools.map(p, p.replicas).sum() : 0))"
    };
}
const TOTAL_WORKERS_RULE: &str = concat!(total_workers!(), " <= 256");
const TOTAL_WORKERS_MESSAGE: &str = "the pools (spec.workers and spec.pools together) hold more than 256 workers: one libvirt host cannot hold more";

/// Each node, the control plane included, gets a /24 of the pod subnet, and a node
/// without one never turns Ready (kube-controller-manager's range allocator has
/// 2^(24-N) of them in a /N). Only a /16 or smaller can be too small for 1 + 256 nodes.
const NODE_CIDRS_RULE: &str = concat!(
    "!isCIDR(self.kubernetes.podSubnet) || cidr(self.kubernetes.podSubnet).ip().family() != 4 || cidr(self.kubernetes.podSubnet).prefixLength() < 16 || cidr(self.kubernetes.podSubnet).prefixLength() > 24 || ",
    total_workers!(),
    " < [1, 2, 4, 8, 16, 32, 64, 128, 256][24 - cidr(self.kubernetes.podSubnet).prefixLength()]"
);
/// A message expression, evaluated only when the rule failed, so on a /16 to /24. No
/// `string(int)`: its result has no size bound, and the cost estimate then exceeds the
/// budget; the counts come from a list of literals instead.
const NODE_CIDRS_MESSAGE: &str = "'the workers of all pools are more than kubernetes.podSubnet ' + self.kubernetes.podSubnet + ' holds: each node, the control plane included, takes a /24 of it, so it holds the control plane and ' + ['0', '1', '3', '7', '15', '31', '63', '127', '255'][24 - cidr(self.kubernetes.podSubnet).prefixLength()] + ' workers; use fewer workers or a larger podSubnet'";

impl Default for KubernetesSpec {
    fn default() -> Self {
        Self {
            pod_subnet: default_pod_subnet(),
            service_subnet: default_service_subnet(),
            feature_gates: BTreeMap::new(),
            extra_args: ComponentArgs::default(),
        }
    }
}

fn default_pod_subnet() -> String {
    "10.244.0.0/16".into()
}

fn default_service_subnet() -> String {
    "10.96.0.0/12".into()
}

/// SSH access to the VMs.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SshSpec {
    /// The user the controller logs in as; it must be able to run kubeadm through sudo.
    /// Not root: the images' sshd refuses root logins (docs/image-contract.md).
    #[serde(default = "default_ssh_user")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z_][a-z0-9_-]*$')").message("ssh.user must be a POSIX user name (lowercase letters, digits, '_', '-')"))]
    #[x_kube(validation = Rule::new("self != 'root'").message("ssh.user must not be root: the images refuse SSH logins as root; use an ordinary user, which gets passwordless sudo for kubeadm, for example bench"))]
    pub user: String,
    /// Secret in the BenchCluster's namespace holding the SSH key pair: `ssh-privatekey`
    /// (OpenSSH format) and `ssh-publickey`, as in a `kubernetes.io/ssh-auth` Secret.
    /// Make it of that type: the controller watches those, so a changed key is used at
    /// once; a Secret of another type is read on every use and its changes are noticed
    /// only by the next pass.
    pub key_secret: SecretReference,
}

fn default_ssh_user() -> String {
    "bench".into()
}

/// A Secret in the BenchCluster's own namespace.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("keySecret.name must be a Secret name (DNS subdomain)"))]
    pub name: String,
}

/// What the controller observed. Written only by the controller.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BenchClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions: Ready, ControlPlaneReady, WorkersReady, SchedulerReady,
    /// Reconciling, Stalled.
    #[serde(default)]
    #[schemars(schema_with = "conditions::list_map_schema")]
    pub conditions: Vec<Condition>,
    /// One entry per VM that exists or is being created, control plane first.
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// Workers whose Node is ready for a benchmark, in every pool.
    #[serde(default)]
    pub ready_workers: i32,
    /// Workers the spec asks for, in every pool.
    #[serde(default)]
    pub desired_workers: i32,
    /// Workers of the default pool (`spec.workers`) whose Node is ready: the scale
    /// subresource's status replicas, as `kubectl scale` sets that pool.
    #[serde(default)]
    pub default_pool_ready: i32,
    /// Readiness per pool, the default pool (`w`) first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
    /// The pools at a glance, `<pool> <ready>/<desired>` each, for `kubectl get -o wide`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_summary: Option<String>,
    /// `https://<control-plane IP>:6443` once the control plane is initialised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_endpoint: Option<String>,
    /// Secret holding the guest cluster's admin kubeconfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret: Option<String>,
    /// Phase timings of the most recent provisioning, each the slowest node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_provisioning: Option<PhaseTimings>,
    /// The guest cluster's scheduler as observed, once the control plane answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerStatus>,
}

/// A VM's role in the cluster.
#[derive(
    JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// The kubeadm control plane.
    ControlPlane,
    /// A worker joined with `kubeadm join`.
    Worker,
}

/// Where a VM is in its life.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Disk and domain are being created.
    Creating,
    /// The domain runs and waits for a DHCP lease.
    Booting,
    /// It has an address; SSH is not answering yet.
    AwaitingSsh,
    /// Reachable over SSH; kubeadm has not run yet.
    Reachable,
    /// `kubeadm init` is running on this control plane.
    Initializing,
    /// `kubeadm join` is running on this worker.
    Joining,
    /// kubeadm init or join ran; the Node is not Ready yet.
    Joined,
    /// The Node is Ready.
    Ready,
    /// Being drained and removed.
    Deleting,
    /// The domain exists but is not running.
    Stopped,
    /// A worker whose VM has other vCPUs or memory than its pool: drained, removed and
    /// created again with the pool's shape.
    Replacing,
}

/// One VM of the cluster.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Node name in the guest cluster (also the VM's hostname).
    pub name: String,
    /// Control plane or worker.
    pub role: Role,
    /// The worker's pool (`w` for `spec.workers`); absent for the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Index within the pool (or the control plane's, 0).
    pub index: u32,
    /// libvirt domain name.
    pub domain: String,
    /// MAC address of the VM's interface, once its domain is defined: the first of the
    /// node's deterministic candidates that no other domain on the host holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Address from the VM's DHCP lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Life-cycle state.
    pub state: NodeState,
    /// Whether the guest cluster reports this Node Ready.
    pub ready: bool,
    /// How long each provisioning phase took for this VM.
    #[serde(default)]
    pub timings: PhaseTimings,
}

/// Durations of the provisioning phases, in milliseconds. A phase not reached or not
/// observed by this controller process is absent.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTimings {
    /// Creating the disk overlay and defining the domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub define_ms: Option<u64>,
    /// Starting the domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    /// From start until a DHCP lease for the VM's MAC appeared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// From the lease until the first SSH command succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_ms: Option<u64>,
    /// `kubeadm init` on the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_ms: Option<u64>,
    /// `kubeadm join` on a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_ms: Option<u64>,
    /// From kubeadm's end until the Node reported Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
}

impl BenchCluster {
    /// The status, or an empty one when the controller has not written any yet.
    pub fn status_or_default(&self) -> BenchClusterStatus {
        self.status.clone().unwrap_or_default()
    }
}

/// Rule on `metadata.name`: every node name is `<name>-w-<index>` and must stay a DNS label.
const NAME_RULE: &str = "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
const NAME_MESSAGE: &str = "metadata.name must be a DNS label (lowercase letters, digits, '-') of at most 40 characters: it prefixes every node and domain name";

/// The CRD: the derived one, plus a schema for `metadata.name` so the API server
/// reports a bad name on that field (the derive cannot describe `metadata`).
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        JSONSchemaProps, ValidationRule,
    };
    let mut crd = BenchCluster::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let name = JSONSchemaProps {
            type_: Some("string".into()),
            max_length: Some(MAX_NAME_LEN as i64),
            x_kubernetes_validations: Some(vec![ValidationRule {
                rule: NAME_RULE.into(),
                message: Some(NAME_MESSAGE.into()),
                ..ValidationRule::default()
            }]),
            ..JSONSchemaProps::default()
        };
        let metadata = JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some([("name".to_owned(), name)].into()),
            ..JSONSchemaProps::default()
        };
        schema
            .properties
            .get_or_insert_with(Default::default)
            .insert("metadata".into(), metadata);
    }
    crd
}

/// The CRD as YAML, exactly as committed in `manifests/crd.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let yaml = serde_yaml::to_string(&crd())?;
    Ok(format!(
        "# Generated by `cargo xtask crd` from crd/src/lib.rs. Do not edit.\n{yaml}"
    ))
}

/// The schema of the CRD at a path of property names, for the modules' tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn schema_at(
    path: &[&str],
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps {
    let mut schema = crd().spec.versions[0]
        .schema
        .clone()
        .unwrap()
        .open_api_v3_schema
        .unwrap();
    for name in path {
        schema = schema.properties.unwrap()[*name].clone();
    }
    schema
}
