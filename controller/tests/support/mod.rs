//! A pass's world in memory: the testkit's fake API server, hypervisor and guest behind
//! a real `Context`, a BenchCluster and its SSH key Secret stored, and helpers to run
//! single stages or whole passes. Tests run on tokio's paused clock, so a wait is a
//! poll with a (virtual) deadline and never costs real time.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use benchcluster_controller::names::{ClusterNames, NodeId};
use benchcluster_controller::reconcile::act::{SSH_PRIVATE_KEY, SSH_PUBLIC_KEY, act, collect};
use benchcluster_controller::reconcile::observe::{GuestApi, Observation, observe};
use benchcluster_controller::reconcile::{Action, Context, Outcome, Settings};
use benchcluster_crd::{BenchCluster, FINALIZER};
use benchcluster_testkit::{FakeApi, FakeGuest, FakeHypervisor, SECRET_MARKER};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

pub const NAMESPACE: &str = "lab";
pub const NAME: &str = "bench";
pub const NETWORK: &str = "benchnet";
pub const IMAGE: &str = "base.qcow2";
pub const SSH_SECRET: &str = "bench-ssh";

pub type TestContext = Context<FakeHypervisor, FakeGuest>;

pub struct Bed {
    pub api: FakeApi,
    pub hv: FakeHypervisor,
    pub ctx: Arc<TestContext>,
    /// Wakes of ended operations, subscribed before any started.
    wakes: tokio::sync::Mutex<BoxStream<'static, ObjectRef<BenchCluster>>>,
}

pub fn settings() -> Settings {
    Settings {
        poll_interval: Duration::from_millis(200),
        backoff_base: Duration::from_secs(2),
        backoff_cap: Duration::from_secs(300),
        // Exact requeue intervals to assert on.
        requeue_jitter: 0.0,
        // Every observe reads the host anew, so a test that changes it behind the
        // controller's back sees the change at once (tests/inventory.rs sets a tick).
        inventory_ttl: Duration::ZERO,
        ..Settings::default()
    }
}

/// A BenchCluster of one control plane and `workers` workers, as a user writes it.
pub fn benchcluster(workers: i32) -> BenchCluster {
    serde_json::from_value(json!({
        "apiVersion": "benchcluster.dev/v1alpha1",
        "kind": "BenchCluster",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "controlPlane": {"cpus": 2, "memory": "2Gi", "disk": "10Gi",
                              "image": {"volume": IMAGE}},
            "workers": {"replicas": workers, "cpus": 1, "memory": "1Gi", "disk": "5Gi",
                        "image": {"volume": IMAGE}},
            "network": {"name": NETWORK},
            "ssh": {"keySecret": {"name": SSH_SECRET}}
        }
    }))
    .unwrap()
}

pub fn ssh_secret() -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SSH_SECRET, "namespace": NAMESPACE},
        "type": "kubernetes.io/ssh-auth",
        "data": {
            SSH_PRIVATE_KEY: b64(&format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET_MARKER}\n-----END OPENSSH PRIVATE KEY-----\n")),
            SSH_PUBLIC_KEY: b64("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake bench"),
        }
    }))
    .unwrap()
}

fn b64(text: &str) -> String {
    // The Secret's data as the API returns it; k8s-openapi's ByteString decodes it.
    let bytes = k8s_openapi::ByteString(text.as_bytes().to_vec());
    serde_json::to_value(bytes)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

impl Bed {
    /// A host with the network and base image, the SSH Secret, and the BenchCluster
    /// stored (with its finalizer, as after the first pass).
    pub fn new(workers: i32) -> Self {
        Self::with_guest(workers, FakeGuest::default())
    }

    pub fn with_guest(workers: i32, guest: FakeGuest) -> Self {
        let api = FakeApi::new();
        let hv = FakeHypervisor::new(NETWORK, &[IMAGE]);
        api.put(&ssh_secret());
        let mut bc = benchcluster(workers);
        bc.metadata.finalizers = Some(vec![FINALIZER.into()]);
        api.put(&bc);
        Self::controller(api, hv, guest)
    }

    /// A controller with fresh memory on `api` and `hv`.
    fn controller(api: FakeApi, hv: FakeHypervisor, guest: FakeGuest) -> Self {
        let ctx = Arc::new(Context::new(api.client(), hv.clone(), guest, settings()));
        let wakes = tokio::sync::Mutex::new(ctx.operations.wakes().boxed());
        Self {
            api,
            hv,
            ctx,
            wakes,
        }
    }

    /// A second controller with fresh memory on the same host, API and guest VMs: what
    /// a restart finds.
    pub fn restarted(&self) -> Self {
        Self::controller(self.api.clone(), self.hv.clone(), self.ctx.guest.sharing())
    }

    pub fn guest(&self) -> &FakeGuest {
        &self.ctx.guest
    }

    /// The BenchCluster as stored now.
    pub fn bc(&self) -> BenchCluster {
        self.api
            .get(NAMESPACE, NAME)
            .expect("the BenchCluster is stored")
    }

    pub fn names(&self) -> ClusterNames {
        let bc = self.bc();
        ClusterNames {
            namespace: NAMESPACE.into(),
            name: NAME.into(),
            uid: bc.uid().unwrap(),
        }
    }

    pub fn node(&self, id: NodeId) -> String {
        self.names().node(id)
    }

    pub fn domain(&self, id: NodeId) -> String {
        self.names().domain(id)
    }

    pub async fn observe(&self) -> Observation {
        let mut observation = observe(&self.bc(), &self.names(), &self.ctx, GuestApi::Ask)
            .await
            .unwrap();
        self.ctx
            .record(&self.names().uid, std::mem::take(&mut observation.stamps));
        observation
    }

    /// Observes, then acts on exactly `actions`; the stamps are recorded as a pass does.
    pub async fn act(&self, actions: Vec<Action>) -> Outcome {
        let observation = self.observe().await;
        let outcome = act(&self.bc(), &self.names(), &observation, actions, &self.ctx).await;
        self.ctx.record(&self.names().uid, outcome.stamps.clone());
        outcome
    }

    /// Results of the operations that ended.
    pub async fn collect(&self) -> Outcome {
        let outcome = collect(&self.bc(), &self.names(), &self.ctx).await;
        self.ctx.record(&self.names().uid, outcome.stamps.clone());
        outcome
    }

    /// Waits (virtual time, bounded) until a running background operation of the cluster
    /// has ended; returns at once when none runs. Its result waits to be collected.
    pub async fn operations_end(&self) {
        if !self.ctx.operations.any_in_flight(&self.names().uid) {
            return;
        }
        let mut wakes = self.wakes.lock().await;
        tokio::time::timeout(Duration::from_secs(3600), wakes.next())
            .await
            .expect("the operation ends within the hour")
            .expect("the wake channel stays open");
    }

    /// Starts `action`'s background operation, waits for its end and collects it.
    pub async fn operation(&self, action: Action) -> Outcome {
        let started = self.act(vec![action]).await;
        assert!(started.failures.is_empty(), "{:?}", started.failures);
        self.operations_end().await;
        self.collect().await
    }

    /// One whole pass, as the controller runs it.
    pub async fn pass(&self) -> benchcluster_controller::Result<kube::runtime::controller::Action> {
        benchcluster_controller::reconcile::reconcile(Arc::new(self.bc()), Arc::clone(&self.ctx))
            .await
    }

    /// Passes until the BenchCluster is Ready, each after the operations it started
    /// ended; returns how many it took. Fails after `max` passes.
    pub async fn converge(&self, max: usize) -> usize {
        for n in 1..=max {
            let _ = self.pass().await;
            self.operations_end().await;
            if self.ready() {
                return n;
            }
        }
        panic!(
            "not Ready after {max} passes: {:#?}",
            self.bc().status.map(|s| s.conditions)
        );
    }

    pub fn condition(
        &self,
        type_: &str,
    ) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.bc()
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
    }

    pub fn ready(&self) -> bool {
        self.condition("Ready").is_some_and(|c| c.status == "True")
    }

    pub fn events(&self) -> Vec<String> {
        self.api.event_reasons(NAMESPACE)
    }

    /// Creates, defines, starts and probes every node of a cluster of `workers` workers
    /// with single-stage calls, so a test starts where kubeadm begins.
    pub async fn booted(&self, workers: u32) {
        let ids: Vec<NodeId> = std::iter::once(NodeId::CONTROL_PLANE)
            .chain((0..workers).map(NodeId::worker))
            .collect();
        for make in [
            Action::CreateDisk,
            Action::DefineDomain,
            Action::StartDomain,
            Action::ProbeSsh,
        ] {
            let outcome = self.act(ids.iter().map(|id| make(*id)).collect()).await;
            assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        }
    }
}
