//! The api tier's test bed: libvirt's `test:///default` driver, the controller run
//! in-process against a real API server, and BenchClusters to feed it.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use benchcluster_controller::hypervisor::libvirt::{Libvirt, LibvirtConfig};
use benchcluster_controller::{Context, Settings, reconcile};
use benchcluster_crd::BenchCluster;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::fakes::{FakeGuest, Instrumented, RecordedSeeds, SECRET_MARKER};

pub const URI: &str = "test:///default";
pub const POOL: &str = "default-pool";
pub const NETWORK: &str = "default";
/// Base image of every test BenchCluster (created on first use).
pub const BASE_IMAGE: &str = "benchcluster-api-base.qcow2";
const BASE_IMAGE_BYTES: u64 = 1 << 20;
/// Name of the SSH key Secret [`create_ssh_secret`] makes.
pub const SSH_SECRET: &str = "ssh-key";

pub type TestContext = Context<Instrumented<Libvirt>, FakeGuest>;

/// libvirt's test driver keeps its state only while a connection is open in this
/// process: this one stays open for the whole test binary, so controller restarts
/// (which drop theirs) see the domains they left.
pub fn libvirt() -> anyhow::Result<&'static virt::connect::Connect> {
    static CONN: OnceLock<Result<virt::connect::Connect, String>> = OnceLock::new();
    CONN.get_or_init(|| open_with_base_image().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("libvirt test driver: {e}"))
}

fn open_with_base_image() -> anyhow::Result<virt::connect::Connect> {
    let conn = virt::connect::Connect::open(Some(URI)).context("open test:///default")?;
    let pool = conn.lookup_storage_pool_by_name(POOL).context("pool")?;
    if pool.lookup_storage_vol_by_name(BASE_IMAGE).is_err() {
        let xml = format!(
            "<volume><name>{BASE_IMAGE}</name><capacity unit='bytes'>{BASE_IMAGE_BYTES}</capacity>\
             <target><format type='qcow2'/></target></volume>"
        );
        virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0).context("base image")?;
    }
    Ok(conn)
}

/// Names of the domains whose names start with `<namespace>-<name>-`.
pub fn domains(namespace: &str, name: &str) -> anyhow::Result<BTreeSet<String>> {
    let prefix = format!("{namespace}-{name}-");
    Ok(libvirt()?
        .list_all_domains(0)
        .context("list domains")?
        .iter()
        .filter_map(|d| d.name().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

/// Names of the pool's volumes whose names start with `<namespace>-<name>-`.
pub fn volumes(namespace: &str, name: &str) -> anyhow::Result<BTreeSet<String>> {
    let prefix = format!("{namespace}-{name}-");
    let pool = libvirt()?.lookup_storage_pool_by_name(POOL)?;
    pool.refresh(0).ok();
    Ok(pool
        .list_volumes()
        .context("list volumes")?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

/// The test driver behind the instrumentation the tests read.
pub fn hypervisor() -> Instrumented<Libvirt> {
    let mut hypervisor = Instrumented::new(Libvirt::new(LibvirtConfig::for_uri(URI)));
    hypervisor.recorded_seeds = Some(RecordedSeeds::new(URI, POOL));
    hypervisor
}

/// Settings that make the tier fast: short polls and backoff.
pub fn fast_settings() -> Settings {
    Settings {
        poll_interval: Duration::from_millis(200),
        resync_interval: Duration::from_secs(1),
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(2),
        ..Settings::default()
    }
}

/// A controller running in this process, watching one namespace (or all).
pub struct RunningController {
    pub ctx: Arc<TestContext>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningController {
    pub fn start(
        client: Client,
        namespace: Option<&str>,
        hypervisor: Instrumented<Libvirt>,
    ) -> Self {
        Self::start_with(
            client,
            namespace,
            hypervisor,
            FakeGuest::default(),
            fast_settings(),
        )
    }

    pub fn start_with(
        client: Client,
        namespace: Option<&str>,
        hypervisor: Instrumented<Libvirt>,
        guest: FakeGuest,
        settings: Settings,
    ) -> Self {
        let ctx = Arc::new(Context::new(client, hypervisor, guest, settings));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let namespace = namespace.map(str::to_owned);
        let run_ctx = ctx.clone();
        let task = tokio::spawn(async move {
            reconcile::run(run_ctx, namespace.as_deref(), async move {
                let _ = stopped.await;
            })
            .await;
        });
        Self {
            ctx,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the controller as a crash would: the task is aborted wherever it is.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Stops the controller gracefully (in-flight reconciles finish).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        self.task.abort();
    }
}

/// Creates the `kubernetes.io/ssh-auth` Secret every test BenchCluster names. Its private
/// key carries [`SECRET_MARKER`], so leak checks can find it.
pub async fn create_ssh_secret(client: &Client, namespace: &str) -> anyhow::Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SSH_SECRET, "namespace": namespace},
        "type": "kubernetes.io/ssh-auth",
        "stringData": {
            "ssh-privatekey": format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET_MARKER}\n-----END OPENSSH PRIVATE KEY-----\n"),
            "ssh-publickey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake bench"
        }
    }))?;
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// A BenchCluster of one control plane and `workers` workers on the test driver.
pub fn benchcluster(namespace: &str, name: &str, workers: i32) -> anyhow::Result<BenchCluster> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "benchcluster.dev/v1alpha1",
        "kind": "BenchCluster",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "controlPlane": {"cpus": 2, "memory": "2Gi", "disk": "1Gi",
                              "image": {"volume": BASE_IMAGE}},
            "workers": {"replicas": workers, "cpus": 1, "memory": "1Gi", "disk": "1Gi",
                        "image": {"volume": BASE_IMAGE}},
            "network": {"name": NETWORK},
            "ssh": {"keySecret": {"name": SSH_SECRET}}
        }
    }))?)
}

/// Whether the status says Ready for the object's current generation.
pub fn is_ready(bc: &BenchCluster) -> bool {
    let status = bc.status.clone().unwrap_or_default();
    status.observed_generation == bc.metadata.generation
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}
