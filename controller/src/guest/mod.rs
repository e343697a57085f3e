//! The guest edge: what the controller needs from inside the VMs (SSH + kubeadm) and
//! from the guest cluster's API, as a trait. It knows nothing of libvirt; the act stage
//! hands it addresses found in DHCP leases.
//!
//! The real implementation, `ssh::SshGuest`, is split by concern: `ssh` (sessions,
//! commands, the kubeadm lock), `pinning` (host keys, local state files), `redact`
//! (command output shown to users), `kubeadm` (kubeadm's files, markers and
//! configuration documents), `scheduler` (kube-scheduler's configuration file and its
//! kubeadm section), `bootstrap` (init and join), `api` (the guest cluster's API: Nodes,
//! their labels and extended resources, the drain, the wait for a Node to register) and
//! `node_watch` (which Node changed in what the controller reads of it).
//! What a pool's Nodes carry ([`Registration`], [`NodeConfig`]) is pool data
//! from the crd crate, which the planner reads too.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;

use secrecy::SecretString;

mod api;
mod bootstrap;
mod kubeadm;
pub mod node_watch;
mod pinning;
mod redact;
mod scheduler;
pub mod ssh;

pub use benchcluster_crd::KubernetesSpec;
pub use benchcluster_crd::pools::{NodeConfig, Registration};
pub use benchcluster_crd::scheduler::{RunningScheduler, SchedulerSpec};

/// How to log in to a VM.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    /// OpenSSH private key (its `Debug` prints a placeholder).
    pub private_key: SecretString,
    /// Its public key, `ssh-ed25519 AAAA... comment`: authorized in every VM's seed.
    pub public_key: String,
}

/// One VM, as the guest side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNode {
    /// Node name in the guest cluster; also the VM's hostname.
    pub name: String,
    pub ip: Ipv4Addr,
    /// The host public key the VM must present (`ssh-ed25519 AAAA...`).
    pub host_key: String,
}

/// What `kubeadm init` needs beyond the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    /// Subnets, feature gates and the components' extra flags (`spec.kubernetes`).
    pub kubernetes: KubernetesSpec,
    /// The scheduler the control plane starts with.
    pub scheduler: SchedulerSpec,
}

/// The admin kubeconfig of a guest cluster, with its server set to the control plane
/// (its `Debug` prints a placeholder).
#[derive(Debug, Clone)]
pub struct AdminKubeconfig(pub SecretString);

/// Annotation the controller puts on a Node it cordons to remove it, so that it
/// uncordons only Nodes it cordoned itself (never one a user cordoned on purpose).
pub const CORDONED_FOR_REMOVAL: &str = "benchcluster.dev/cordoned-for-removal";

/// A Node of the guest cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub ready: bool,
    /// Unschedulable with [`CORDONED_FOR_REMOVAL`]: cordoned by a drain of this
    /// controller.
    pub cordoned_for_removal: bool,
    pub labels: BTreeMap<String, String>,
    /// Extended resources in its allocatable (domain-prefixed names outside
    /// `kubernetes.io`), as whole counts.
    pub extended_resources: BTreeMap<String, i64>,
}

/// Failures of the guest edge.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// SSH did not connect or authenticate (the VM may still be booting).
    #[error("cannot reach {node} over SSH: {reason}")]
    Unreachable { node: String, reason: String },
    /// The VM presented a host key other than the one pinned for it: nothing was run.
    #[error("host key of {node} does not match the pinned key; refusing to run commands")]
    HostKeyMismatch { node: String },
    /// A command ran and failed; `output` is trimmed and free of secrets.
    #[error("{command} failed on {node} (exit {exit_code:?}): {output}")]
    CommandFailed {
        node: String,
        command: &'static str,
        exit_code: Option<i32>,
        output: String,
    },
    /// A kubeadm started by an earlier attempt (whose SSH session was cut) still runs
    /// on the node: nothing else may touch its kubeadm state until it ends.
    #[error("an earlier kubeadm still runs on {node}; waiting for it to end")]
    Busy { node: String },
    /// A step did not finish within its bound.
    #[error("{step} on {node} timed out after {seconds}s")]
    Timeout {
        node: String,
        step: &'static str,
        seconds: u64,
    },
    /// The guest cluster's API failed.
    #[error("guest cluster API: {0}")]
    Api(String),
    /// kube-scheduler did not turn healthy with a configuration; the one it ran
    /// before was put back.
    #[error("kube-scheduler refused configuration {config_hash}: {message}")]
    SchedulerRejected {
        config_hash: String,
        /// The custom image asked for with it.
        image: Option<String>,
        /// The scheduler's own error, from its log.
        message: String,
    },
}

pub type Result<T, E = GuestError> = std::result::Result<T, E>;

/// What the controller needs from the VMs and from the cluster they form. Every call is
/// safe to repeat: init on an initialised control plane returns its kubeconfig, join on a
/// joined worker is a no-op, removal of a removed Node succeeds.
pub trait Guest: Send + Sync + 'static {
    /// Runs a harmless command to prove the VM answers over SSH with its pinned host key.
    fn probe(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Initialises the control plane (`kubeadm init`) and returns the admin kubeconfig.
    /// A control plane whose init completed once is never reset nor initialised again,
    /// whatever its API answers: its kubeconfig is read back, and if the API answers
    /// without the control plane's Node, the Node is registered again.
    fn init_control_plane(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
        config: &InitConfig,
    ) -> impl Future<Output = Result<AdminKubeconfig>> + Send;

    /// Joins the worker to the cluster of `control_plane` with a join command minted
    /// just in time, and returns once its Node is registered. Called for a worker whose
    /// Node the cluster (answering through `kubeconfig`) provably lacks: a worker whose
    /// join completed into this cluster only registers its Node again; a half-done join,
    /// or one into an earlier cluster (another CA), is reset first.
    fn join_worker(
        &self,
        control_plane: &GuestNode,
        worker: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
        registration: &Registration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Puts the config on the registered Node: its labels (merged into the Node's) and
    /// its extended resources (into the Node's capacity and allocatable, through its status).
    fn configure_node(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
        config: &NodeConfig,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The Nodes of the guest cluster, through its API.
    fn cluster_nodes(
        &self,
        kubeconfig: &AdminKubeconfig,
    ) -> impl Future<Output = Result<Vec<ClusterNode>>> + Send;

    /// Makes schedulable again a Node this controller cordoned for a removal that was
    /// abandoned (the worker is wanted again).
    fn uncordon(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Cordons the Node (marked [`CORDONED_FOR_REMOVAL`]), drains it (eviction API,
    /// bounded) and deletes it.
    fn remove_node(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The scheduler the control plane `control_plane` (its Node name) runs; `None`
    /// while its static pod is not in the API.
    fn scheduler(
        &self,
        kubeconfig: &AdminKubeconfig,
        control_plane: &str,
    ) -> impl Future<Output = Result<Option<RunningScheduler>>> + Send;

    /// Makes the control plane's scheduler run `config.scheduler` and returns it once
    /// healthy. A configuration the scheduler refuses is rolled back to the one that ran
    /// before (or kube-scheduler's defaults when that one was not healthy), and the
    /// error is [`GuestError::SchedulerRejected`].
    fn switch_scheduler(
        &self,
        control_plane: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
        config: &InitConfig,
    ) -> impl Future<Output = Result<RunningScheduler>> + Send;

    /// The names of the guest cluster's Nodes as they change in what [`cluster_nodes`]
    /// reports of them, or appear or go (not at each kubelet heartbeat): a watch that
    /// retries on its own with backoff. A guest without one announces nothing, and its
    /// changes are seen at the next pass.
    ///
    /// [`cluster_nodes`]: Guest::cluster_nodes
    fn node_changes(
        &self,
        kubeconfig: &AdminKubeconfig,
    ) -> impl futures::Stream<Item = String> + Send + 'static {
        let _ = kubeconfig;
        futures::stream::pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_a_secret() {
        let credentials = Credentials {
            user: "bench".into(),
            private_key: SecretString::from("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-key"),
            public_key: "ssh-ed25519 AAAA".into(),
        };
        let kubeconfig = AdminKubeconfig(SecretString::from("client-key-data: secret-kubeconfig"));
        let shown = format!("{credentials:?} {kubeconfig:?}");
        assert!(!shown.contains("secret-key"), "{shown}");
        assert!(!shown.contains("secret-kubeconfig"), "{shown}");
        assert!(shown.contains("[REDACTED]"), "{shown}");
    }
}
