//! The api tier's test bed: libvirt's `test:///default` driver, the controller run
//! in-process against a real API server, and BenchClusters to feed it.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use benchcluster_controller::guest::Credentials;
use benchcluster_controller::hypervisor::libvirt::{Libvirt, LibvirtConfig};
use benchcluster_controller::{Context, Settings, reconcile};
use benchcluster_crd::BenchCluster;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use secrecy::SecretString;
use serde_json::json;

use crate::{TestApiServer, create_namespace, keys, wait};
use benchcluster_testkit::{FakeGuest, Instrumented, RecordedSeeds, SECRET_MARKER};

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
    // `list_all_volumes`: virt 0.5's `list_volumes` stops at 1024 names.
    Ok(pool
        .list_all_volumes(0)
        .context("list volumes")?
        .iter()
        .filter_map(|v| v.name().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

/// The test driver behind the instrumentation the tests read.
/// A KubeSchedulerConfiguration whose one profile packs pods (`NodeResourcesFit`
/// scoring with `MostAllocated`), as a benchmark would compare with the default
/// spreading.
pub fn most_allocated() -> serde_json::Value {
    json!({
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "profiles": [{
            "schedulerName": "default-scheduler",
            "pluginConfig": [{
                "name": "NodeResourcesFit",
                "args": {
                    "scoringStrategy": {
                        "type": "MostAllocated",
                        "resources": [{"name": "cpu", "weight": 1}, {"name": "memory", "weight": 1}],
                    },
                },
            }],
        }],
    })
}

pub fn hypervisor() -> Instrumented<Libvirt> {
    let mut hypervisor = Instrumented::new(Libvirt::new(LibvirtConfig::for_uri(URI)));
    hypervisor.recorded_seeds = Some(RecordedSeeds::new(URI, POOL));
    hypervisor
}

/// Overcommit for the test driver's host, a fixed 16 CPUs and 3 GiB that the tier's
/// clusters (sized like real ones, and a thousand of them at once) would not fit in:
/// what the fit check is given, on both ratios.
pub const TEST_DRIVER_OVERCOMMIT: f64 = 4096.0;

/// Settings that make the tier fast: short polls and backoff.
pub fn fast_settings() -> Settings {
    Settings {
        poll_interval: Duration::from_millis(200),
        resync_interval: Duration::from_secs(1),
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(2),
        cpu_overcommit: TEST_DRIVER_OVERCOMMIT,
        memory_overcommit: TEST_DRIVER_OVERCOMMIT,
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
        // Tests change the host behind the controller's back and expect its next pass
        // to see it: every observe reads the host (concurrent ones still share a read).
        // The tick itself is the stage tests' (controller/tests/inventory.rs); benches
        // use `start_with` and keep it.
        let settings = Settings {
            inventory_ttl: Duration::ZERO,
            ..fast_settings()
        };
        Self::start_with(
            client,
            namespace,
            hypervisor,
            FakeGuest::default(),
            settings,
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

    /// Stops the controller as a crash would: the task and every operation it started
    /// are aborted wherever they are, and nothing of it runs once this returns (a
    /// killed process's `kubeadm join` does not finish behind the next one's back).
    pub async fn kill(self) {
        self.task.abort();
        self.ctx.operations.close();
        let _ = self.task.await;
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
    let credentials = Credentials {
        user: "bench".into(),
        private_key: SecretString::from(format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET_MARKER}\n-----END OPENSSH PRIVATE KEY-----\n"
        )),
        public_key:
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFakeFake bench"
                .into(),
    };
    keys::create_ssh_secret(client, namespace, SSH_SECRET, &credentials).await
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

/// How long a test waits for the controller to converge.
pub const CONVERGE: Duration = Duration::from_secs(60);
/// How often tests poll.
pub const POLL: Duration = Duration::from_millis(200);

/// One test's world: the shared API server with the CRD, a client, and a namespace of
/// its own holding the SSH key Secret.
pub struct Fixture {
    pub server: &'static TestApiServer,
    pub client: Client,
    pub namespace: String,
    pub api: Api<BenchCluster>,
}

impl Fixture {
    pub async fn new(prefix: &str) -> anyhow::Result<Self> {
        let server = TestApiServer::shared().await?;
        server.install_crd().await?;
        libvirt()?;
        let client = server.client().await?;
        let namespace = create_namespace(&client, prefix).await?;
        create_ssh_secret(&client, &namespace).await?;
        let api = Api::namespaced(client.clone(), &namespace);
        Ok(Self {
            server,
            client,
            namespace,
            api,
        })
    }

    /// A controller watching this fixture's namespace with `guest`, on the test
    /// hypervisor with [`fast_settings`].
    pub fn controller(&self, guest: FakeGuest) -> RunningController {
        RunningController::start_with(
            self.client.clone(),
            Some(&self.namespace),
            hypervisor(),
            guest,
            fast_settings(),
        )
    }

    pub fn cluster(&self, name: &str, workers: i32) -> anyhow::Result<BenchCluster> {
        benchcluster(&self.namespace, name, workers)
    }

    pub async fn create(&self, name: &str, workers: i32) -> anyhow::Result<BenchCluster> {
        Ok(self
            .api
            .create(&PostParams::default(), &self.cluster(name, workers)?)
            .await?)
    }

    pub async fn set_replicas(&self, name: &str, replicas: i32) -> anyhow::Result<()> {
        self.api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"workers": {"replicas": replicas}}})),
            )
            .await?;
        Ok(())
    }

    /// Waits until the cluster is Ready for its current generation with exactly the
    /// desired domains, and returns it; dumps the server's logs and the status if not.
    pub async fn wait_ready(&self, name: &str, workers: usize) -> anyhow::Result<BenchCluster> {
        let expected: BTreeSet<String> = std::iter::once(format!("{}-{name}-cp-0", self.namespace))
            .chain((0..workers).map(|i| format!("{}-{name}-w-{i}", self.namespace)))
            .collect();
        let result = wait::until(
            &format!("{name} Ready with {workers} worker(s)"),
            CONVERGE,
            POLL,
            || async {
                let bc = self.api.get(name).await?;
                let ready_workers = bc.status.as_ref().map_or(0, |s| s.ready_workers);
                let exact = domains(&self.namespace, name)? == expected;
                anyhow::Ok(
                    (is_ready(&bc) && exact && usize::try_from(ready_workers) == Ok(workers))
                        .then_some(bc),
                )
            },
        )
        .await;
        if result.is_err() {
            self.server.dump_logs();
            if let Ok(bc) = self.api.get(name).await {
                eprintln!("status: {:#?}", bc.status);
            }
            eprintln!("domains: {:?}", domains(&self.namespace, name));
        }
        result
    }

    /// Deletes the BenchCluster and waits until its finalizer let it go.
    pub async fn delete_and_wait(&self, name: &str) -> anyhow::Result<()> {
        self.api.delete(name, &DeleteParams::default()).await?;
        wait::until(
            &format!("{name} gone (finalizer removed)"),
            CONVERGE,
            POLL,
            || async { anyhow::Ok(self.api.get_opt(name).await?.is_none().then_some(())) },
        )
        .await
    }

    /// The Events of the namespace as `kubectl get events -o yaml` prints them.
    pub fn events_yaml(&self) -> anyhow::Result<String> {
        let out = self
            .server
            .kubectl(&["get", "events", "-n", &self.namespace, "-o", "yaml"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl get events: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// (type, reason, note) of every Event in the namespace.
    pub async fn events(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.namespace);
        Ok(api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect())
    }
}
