//! An in-memory guest that models kubeadm state: `kubeadm init` creates a cluster,
//! `join` registers a worker in it, drains cordon and delete Nodes; failures, silent
//! APIs and unreachable nodes are set by the test.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use benchcluster_controller::guest::{
    AdminKubeconfig, ClusterNode, Credentials, Guest, GuestError, GuestNode, InitConfig,
    NodeConfig, Registration, Result, RunningScheduler,
};
use secrecy::{ExposeSecret, SecretString};

/// A plugin no scheduler has: a configuration naming it is refused, with the error
/// kube-scheduler prints.
pub const UNKNOWN_PLUGIN: &str = "NoSuchPlugin";

/// Marker in every fake kubeconfig and private key, so a scrape of logs, events and
/// status can prove none of them leaked.
pub const SECRET_MARKER: &str = "FAKE-SECRET-d41d8cd98f00";

/// A Node of a fake cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeNode {
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
    /// Extended resources in its capacity.
    pub extended_resources: BTreeMap<String, i64>,
    /// How it registered (kubeadm join's labels, taints, kubelet settings).
    pub registration: Option<Registration>,
}

#[derive(Debug, Default)]
struct Cluster {
    nodes: BTreeMap<String, FakeNode>,
    /// The configuration hash its scheduler runs, and its custom image.
    scheduler: String,
    scheduler_image: Option<String>,
    /// Nodes cordoned by a drain (`remove_node`) and not uncordoned since.
    cordoned: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Control-plane node name -> its cluster.
    clusters: BTreeMap<String, Cluster>,
    /// Nodes on which every init fails until cleared.
    fail_init: BTreeSet<String>,
    /// Nodes that do not answer SSH.
    unreachable: BTreeSet<String>,
    /// Control planes whose API does not answer (a stopped kube-apiserver): the
    /// cluster is intact, only its API is silent.
    api_down: BTreeSet<String>,
    /// Nodes whose drain fails after cordoning (its API calls time out).
    failing_drains: BTreeSet<String>,
    /// Inits and joins completed by every controller sharing this state.
    completed: Completed,
}

/// `kubeadm init` and `join` runs that completed, across controller restarts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    pub inits: u64,
    pub joins: u64,
}

/// An in-memory guest: `kubeadm init` creates a cluster keyed by the control plane's
/// node name, `join` registers a worker in it, and Nodes are Ready at once.
#[derive(Debug, Default)]
pub struct FakeGuest {
    /// Shared with [`FakeGuest::sharing`] copies: the guest clusters outlive a
    /// controller restart, as real VMs do.
    state: Arc<Mutex<State>>,
    /// (call, node) -> calls started, failed and cancelled ones included.
    calls: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Added to every SSH step, to model real latency in benchmarks.
    pub step_latency: Duration,
    /// Added to `kubeadm init` (on top of `step_latency`), to model its minutes.
    init_latency: Duration,
    /// Added to `kubeadm join` (on top of `step_latency`).
    join_latency: Duration,
    /// How long a drain runs between cordoning the Node and deleting it.
    drain_latency: Duration,
    pub inits: AtomicU64,
    /// Init calls, failed ones included.
    pub init_attempts: AtomicU64,
    /// Init calls on a control plane whose init completed: a real guest only reads its
    /// kubeconfig back (never resets it), so these must never be planned while the
    /// API is merely silent.
    pub inits_of_initialised: AtomicU64,
    pub joins: AtomicU64,
    pub removals: AtomicU64,
    pub uncordons: AtomicU64,
    /// Scheduler switches started, refused ones included.
    pub scheduler_switches: AtomicU64,
    /// Calls to a guest cluster's API (list its Nodes, remove a Node), failed ones
    /// included.
    pub api_calls: AtomicU64,
}

impl FakeGuest {
    pub fn with_latency(step_latency: Duration) -> Self {
        Self {
            step_latency,
            ..Self::default()
        }
    }

    /// A guest for the next controller after a restart: the same guest clusters (the
    /// VMs kept running), fresh call counters.
    pub fn sharing(&self) -> Self {
        Self {
            state: Arc::clone(&self.state),
            step_latency: self.step_latency,
            init_latency: self.init_latency,
            join_latency: self.join_latency,
            drain_latency: self.drain_latency,
            ..Self::default()
        }
    }

    /// Inits and joins completed by this guest and every one [`FakeGuest::sharing`] it.
    pub fn completed(&self) -> Completed {
        self.state().completed
    }

    /// A drain waits `latency` between cordoning the Node and deleting it.
    pub fn with_drain_latency(mut self, latency: Duration) -> Self {
        self.drain_latency = latency;
        self
    }

    /// Whether the Node is cordoned in the cluster of that control plane.
    pub fn cordoned(&self, control_plane: &str, node: &str) -> bool {
        self.state()
            .clusters
            .get(control_plane)
            .is_some_and(|c| c.cordoned.contains(node))
    }

    /// `kubeadm init` takes `latency` longer.
    pub fn with_init_latency(mut self, latency: Duration) -> Self {
        self.init_latency = latency;
        self
    }

    /// `kubeadm join` takes `latency` longer.
    pub fn with_join_latency(mut self, latency: Duration) -> Self {
        self.join_latency = latency;
        self
    }

    /// How many times `call` (`"init"`, `"join"`, `"remove"`) was started for `node`,
    /// failed and cancelled calls included.
    pub fn calls(&self, call: &'static str, node: &str) -> u64 {
        self.calls
            .lock()
            .get(&(call, node.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn called(&self, call: &'static str, node: &str) {
        *self
            .calls
            .lock()
            .entry((call, node.to_owned()))
            .or_default() += 1;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Makes every `kubeadm init` on this node fail, or succeed again.
    pub fn set_init_failing(&self, node: &str, failing: bool) {
        let mut state = self.state();
        if failing {
            state.fail_init.insert(node.to_owned());
        } else {
            state.fail_init.remove(node);
        }
    }

    /// Makes every drain of this Node fail after cordoning it, as when the guest API's
    /// eviction calls time out, or succeed again.
    pub fn set_drain_failing(&self, node: &str, failing: bool) {
        let mut state = self.state();
        if failing {
            state.failing_drains.insert(node.to_owned());
        } else {
            state.failing_drains.remove(node);
        }
    }

    /// Makes the node (un)reachable over SSH.
    pub fn set_unreachable(&self, node: &str, unreachable: bool) {
        let mut state = self.state();
        if unreachable {
            state.unreachable.insert(node.to_owned());
        } else {
            state.unreachable.remove(node);
        }
    }

    /// Makes the API of the cluster of `control_plane` (not) answer, its state kept.
    pub fn set_api_down(&self, control_plane: &str, down: bool) {
        let mut state = self.state();
        if down {
            state.api_down.insert(control_plane.to_owned());
        } else {
            state.api_down.remove(control_plane);
        }
    }

    /// Loses the whole cluster of `control_plane`, as when its disk is deleted: its
    /// API stops answering and nothing of it is left for a new init.
    pub fn lose_cluster(&self, control_plane: &str) {
        self.state().clusters.remove(control_plane);
    }

    /// Deletes a Node behind the controller's back.
    pub fn delete_node(&self, control_plane: &str, node: &str) {
        if let Some(cluster) = self.state().clusters.get_mut(control_plane) {
            cluster.nodes.remove(node);
        }
    }

    /// The Node as the cluster of that control plane has it.
    pub fn node(&self, control_plane: &str, node: &str) -> Option<FakeNode> {
        self.state()
            .clusters
            .get(control_plane)
            .and_then(|c| c.nodes.get(node).cloned())
    }

    /// Registers the Node again, as a kubelet does when its Node object was recreated:
    /// what the controller put on it through the API (labels beyond registration,
    /// extended resources) is gone.
    pub fn reregister(&self, control_plane: &str, node: &str) {
        if let Some(n) = self
            .state()
            .clusters
            .get_mut(control_plane)
            .and_then(|c| c.nodes.get_mut(node))
        {
            n.labels = n
                .registration
                .as_ref()
                .map(|r| r.labels.clone())
                .unwrap_or_default();
            n.extended_resources.clear();
        }
    }

    /// Node names registered in the cluster of that control plane.
    pub fn nodes(&self, control_plane: &str) -> Vec<String> {
        self.state()
            .clusters
            .get(control_plane)
            .map(|c| c.nodes.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn latency(&self) {
        self.sleep(self.step_latency).await;
    }

    async fn sleep(&self, latency: Duration) {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    fn check_reachable(&self, node: &GuestNode) -> Result<()> {
        if self.state().unreachable.contains(&node.name) {
            return Err(GuestError::Unreachable {
                node: node.name.clone(),
                reason: "connection refused (fake)".into(),
            });
        }
        Ok(())
    }
}

fn kubeconfig_for(control_plane: &str) -> AdminKubeconfig {
    AdminKubeconfig(SecretString::from(format!(
        "# {SECRET_MARKER}\ncontrol-plane: {control_plane}\n"
    )))
}

fn control_plane_of(kubeconfig: &AdminKubeconfig) -> Option<String> {
    kubeconfig
        .0
        .expose_secret()
        .lines()
        .find_map(|l| l.strip_prefix("control-plane: "))
        .map(str::to_owned)
}

impl Guest for FakeGuest {
    async fn probe(&self, node: &GuestNode, _credentials: &Credentials) -> Result<()> {
        self.check_reachable(node)
    }

    async fn init_control_plane(
        &self,
        node: &GuestNode,
        _credentials: &Credentials,
        config: &InitConfig,
    ) -> Result<AdminKubeconfig> {
        self.called("init", &node.name);
        self.check_reachable(node)?;
        self.latency().await;
        self.sleep(self.init_latency).await;
        let mut state = self.state();
        self.init_attempts.fetch_add(1, Ordering::Relaxed);
        if state.fail_init.contains(&node.name) {
            return Err(GuestError::CommandFailed {
                node: node.name.clone(),
                command: "kubeadm init",
                exit_code: Some(1),
                output: "[preflight] fake failure".into(),
            });
        }
        self.inits.fetch_add(1, Ordering::Relaxed);
        state.completed.inits += 1;
        if state.clusters.contains_key(&node.name) {
            self.inits_of_initialised.fetch_add(1, Ordering::Relaxed);
        }
        let cluster = state.clusters.entry(node.name.clone()).or_default();
        cluster.scheduler = config.scheduler.config_hash();
        cluster.scheduler_image = config.scheduler.image.clone();
        cluster.nodes.insert(
            node.name.clone(),
            FakeNode {
                ready: true,
                ..FakeNode::default()
            },
        );
        Ok(kubeconfig_for(&node.name))
    }

    async fn join_worker(
        &self,
        control_plane: &GuestNode,
        worker: &GuestNode,
        _credentials: &Credentials,
        _kubeconfig: &AdminKubeconfig,
        registration: &Registration,
    ) -> Result<()> {
        self.called("join", &worker.name);
        self.check_reachable(worker)?;
        self.latency().await;
        self.sleep(self.join_latency).await;
        let mut state = self.state();
        let cluster = state.clusters.get_mut(&control_plane.name).ok_or_else(|| {
            GuestError::CommandFailed {
                node: worker.name.clone(),
                command: "kubeadm join",
                exit_code: Some(1),
                output: "control plane not initialised (fake)".into(),
            }
        })?;
        cluster.nodes.insert(
            worker.name.clone(),
            FakeNode {
                ready: true,
                labels: registration.labels.clone(),
                extended_resources: BTreeMap::new(),
                registration: Some(registration.clone()),
            },
        );
        self.joins.fetch_add(1, Ordering::Relaxed);
        state.completed.joins += 1;
        Ok(())
    }

    async fn cluster_nodes(&self, kubeconfig: &AdminKubeconfig) -> Result<Vec<ClusterNode>> {
        self.api_calls.fetch_add(1, Ordering::Relaxed);
        let cp = control_plane_of(kubeconfig)
            .ok_or_else(|| GuestError::Api("unparsable fake kubeconfig".into()))?;
        let state = self.state();
        let cluster = state
            .clusters
            .get(&cp)
            .filter(|_| !state.api_down.contains(&cp))
            .ok_or_else(|| GuestError::Api(format!("{cp}: connection refused (fake)")))?;
        Ok(cluster
            .nodes
            .iter()
            .map(|(name, node)| ClusterNode {
                name: name.clone(),
                ready: node.ready,
                cordoned_for_removal: cluster.cordoned.contains(name),
                labels: node.labels.clone(),
                extended_resources: node.extended_resources.clone(),
            })
            .collect())
    }

    async fn configure_node(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
        config: &NodeConfig,
    ) -> Result<()> {
        self.called("configure", node_name);
        self.api_calls.fetch_add(1, Ordering::Relaxed);
        let cp = control_plane_of(kubeconfig)
            .ok_or_else(|| GuestError::Api("unparsable fake kubeconfig".into()))?;
        let mut state = self.state();
        let node = state
            .clusters
            .get_mut(&cp)
            .and_then(|c| c.nodes.get_mut(node_name))
            .ok_or_else(|| GuestError::Api(format!("nodes {node_name:?} not found (fake)")))?;
        node.labels.extend(config.labels.clone());
        node.extended_resources
            .extend(config.extended_resources.clone());
        Ok(())
    }

    async fn scheduler(
        &self,
        kubeconfig: &AdminKubeconfig,
        control_plane: &str,
    ) -> Result<Option<RunningScheduler>> {
        self.api_calls.fetch_add(1, Ordering::Relaxed);
        let cp = control_plane_of(kubeconfig)
            .ok_or_else(|| GuestError::Api("unparsable fake kubeconfig".into()))?;
        let state = self.state();
        if state.api_down.contains(&cp) {
            return Err(GuestError::Api(format!("{cp}: connection refused (fake)")));
        }
        Ok(state
            .clusters
            .get(&cp)
            .filter(|c| c.nodes.contains_key(control_plane))
            .map(|c| RunningScheduler {
                config_hash: c.scheduler.clone(),
                image: c
                    .scheduler_image
                    .clone()
                    .unwrap_or_else(|| "registry.k8s.io/kube-scheduler:v1.35.4".into()),
                custom_image: c.scheduler_image.clone(),
                started: None,
                healthy: true,
            }))
    }

    async fn switch_scheduler(
        &self,
        control_plane: &GuestNode,
        _credentials: &Credentials,
        _kubeconfig: &AdminKubeconfig,
        config: &InitConfig,
    ) -> Result<RunningScheduler> {
        self.called("switch_scheduler", &control_plane.name);
        self.scheduler_switches.fetch_add(1, Ordering::Relaxed);
        self.check_reachable(control_plane)?;
        self.latency().await;
        let wanted = config.scheduler.config_hash();
        let refused = config.scheduler.config.as_ref().is_some_and(|c| {
            serde_json::Value::Object(c.0.clone())
                .to_string()
                .contains(UNKNOWN_PLUGIN)
        });
        let mut state = self.state();
        let cluster = state
            .clusters
            .get_mut(&control_plane.name)
            .ok_or_else(|| GuestError::Api(format!("{}: no cluster (fake)", control_plane.name)))?;
        if refused {
            return Err(GuestError::SchedulerRejected {
                config_hash: wanted,
                image: config.scheduler.image.clone(),
                message: format!(
                    "\"command failed\" err=\"initializing profiles: creating profile for scheduler name default-scheduler: \\\"{UNKNOWN_PLUGIN}\\\" does not exist\""
                ),
            });
        }
        cluster.scheduler = wanted.clone();
        cluster.scheduler_image = config.scheduler.image.clone();
        Ok(RunningScheduler {
            config_hash: wanted,
            image: config
                .scheduler
                .image
                .clone()
                .unwrap_or_else(|| "registry.k8s.io/kube-scheduler:v1.35.4".into()),
            custom_image: config.scheduler.image.clone(),
            started: None,
            healthy: true,
        })
    }

    async fn uncordon(&self, kubeconfig: &AdminKubeconfig, node_name: &str) -> Result<()> {
        self.called("uncordon", node_name);
        self.api_calls.fetch_add(1, Ordering::Relaxed);
        let cp = control_plane_of(kubeconfig)
            .ok_or_else(|| GuestError::Api("unparsable fake kubeconfig".into()))?;
        if let Some(cluster) = self.state().clusters.get_mut(&cp) {
            cluster.cordoned.remove(node_name);
        }
        self.uncordons.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn remove_node(&self, kubeconfig: &AdminKubeconfig, node_name: &str) -> Result<()> {
        self.called("remove", node_name);
        self.api_calls.fetch_add(1, Ordering::Relaxed);
        self.latency().await;
        let cp = control_plane_of(kubeconfig)
            .ok_or_else(|| GuestError::Api("unparsable fake kubeconfig".into()))?;
        let cordon = |state: &mut State| {
            state.clusters.get_mut(&cp).map(|cluster| {
                cluster.cordoned.insert(node_name.to_owned());
            })
        };
        if cordon(&mut self.state()).is_some() {
            self.sleep(self.drain_latency).await;
        }
        if self.state().failing_drains.contains(node_name) {
            return Err(GuestError::Api(format!(
                "evict the pods of {node_name}: request timed out (fake)"
            )));
        }
        if let Some(cluster) = self.state().clusters.get_mut(&cp) {
            cluster.nodes.remove(node_name);
            cluster.cordoned.remove(node_name);
        }
        self.removals.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
