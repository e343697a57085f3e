//! The vm tier's test bed, shared by its tests (`e2e/tests/vm.rs`) and its benchmark
//! (`e2e/benches/vm.rs`, which includes this file by path).
//!
//! Everything here runs inside a [`Sandbox`](benchcluster_e2e::sandbox::Sandbox)'s
//! network namespace (call it from `Sandbox::run_inside`): a [`TestApiServer`] on the
//! namespace's own loopback, the controller in-process with the real [`Libvirt`]
//! hypervisor on the sandbox's libvirtd, and [`ProbeOnlyGuest`], which is real over SSH
//! (strict, pinned host keys) but runs no kubeadm.

#![allow(dead_code)] // each of the two including crates uses a part

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use benchcluster_controller::guest::ssh::{SshConfig, SshGuest};
use benchcluster_controller::guest::{
    AdminKubeconfig, ClusterNode, Credentials, Guest, GuestError, GuestNode, InitConfig,
    NodeConfig, Registration, Result as GuestResult, RunningScheduler,
};
use benchcluster_controller::http::{self, Readiness};
use benchcluster_controller::hypervisor::libvirt::{Libvirt, LibvirtConfig};
use benchcluster_controller::{Context, Settings, reconcile};
use benchcluster_crd::BenchCluster;
use benchcluster_e2e::sandbox::{self, IMAGE_POOL, NETWORK, NODE_POOL};
use benchcluster_e2e::{TestApiServer, create_namespace, keys, wait};
use kube::Client;
use kube::api::{Api, PostParams};
use secrecy::SecretString;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The login user of every VM (the CRD's default).
pub const USER: &str = "bench";
/// Name of the SSH key Secret.
pub const SSH_SECRET: &str = "vm-ssh-key";
/// Enough for the minimal Debian guest (it idles at about 100 MiB).
pub const MEMORY: &str = "512Mi";
/// The least the schema accepts for a control plane (kubeadm's preflight minimum),
/// although this tier runs no kubeadm.
pub const CONTROL_PLANE_CPUS: u32 = 2;
pub const CONTROL_PLANE_MEMORY: &str = "2Gi";
pub const DISK: &str = "4Gi";
pub const POLL: Duration = Duration::from_millis(500);
/// Bound on one request to the controller's HTTP endpoint (its checks take at most
/// [`http::CHECK_TIMEOUT`]).
const HTTP_DEADLINE: Duration = Duration::from_secs(15);

pub type VmContext = Context<Libvirt, ProbeOnlyGuest>;

/// What a VM said about itself over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Output of `hostname`.
    pub hostname: String,
    /// Content of `/etc/machine-id`.
    pub machine_id: String,
    /// Where it answered.
    pub ip: Ipv4Addr,
    /// The host key it was pinned to.
    pub host_key: String,
    pub at: Instant,
}

/// A guest that is real over SSH and fake above it. `probe` is [`SshGuest::probe`];
/// `init_control_plane` and `join_worker` run `hostname` and `cat /etc/machine-id` on
/// the node over SSH and record the answers (instead of kubeadm); the "guest cluster"
/// is the recorded nodes, all Ready.
pub struct ProbeOnlyGuest {
    ssh: SshGuest,
    answers: Mutex<BTreeMap<String, Answer>>,
    /// What the controller put on each "Node" (no cluster exists: it is remembered).
    configured: Mutex<BTreeMap<String, NodeConfig>>,
}

impl ProbeOnlyGuest {
    pub fn new(config: SshConfig) -> Self {
        Self {
            ssh: SshGuest::new(config),
            answers: Mutex::new(BTreeMap::new()),
            configured: Mutex::new(BTreeMap::new()),
        }
    }

    /// The answers recorded so far, by node name.
    pub fn answers(&self) -> BTreeMap<String, Answer> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Answer>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn identify(&self, node: &GuestNode, credentials: &Credentials) -> GuestResult<()> {
        let hostname = self.ssh.exec(node, credentials, &["hostname"]).await?;
        let machine_id = self
            .ssh
            .exec(node, credentials, &["cat", "/etc/machine-id"])
            .await?;
        self.lock().insert(
            node.name.clone(),
            Answer {
                hostname: hostname.trim().to_owned(),
                machine_id: machine_id.trim().to_owned(),
                ip: node.ip,
                host_key: node.host_key.clone(),
                at: Instant::now(),
            },
        );
        Ok(())
    }
}

impl Guest for ProbeOnlyGuest {
    async fn probe(&self, node: &GuestNode, credentials: &Credentials) -> GuestResult<()> {
        self.ssh.probe(node, credentials).await
    }

    async fn init_control_plane(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
        _config: &InitConfig,
    ) -> GuestResult<AdminKubeconfig> {
        self.identify(node, credentials).await?;
        Ok(AdminKubeconfig(SecretString::from(format!(
            "# not a kubeconfig: the vm tier runs no kubeadm ({})\n",
            node.name
        ))))
    }

    async fn join_worker(
        &self,
        _control_plane: &GuestNode,
        worker: &GuestNode,
        credentials: &Credentials,
        _kubeconfig: &AdminKubeconfig,
        _registration: &Registration,
    ) -> GuestResult<()> {
        self.identify(worker, credentials).await
    }

    async fn configure_node(
        &self,
        _kubeconfig: &AdminKubeconfig,
        node_name: &str,
        config: &NodeConfig,
    ) -> GuestResult<()> {
        self.configured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node_name.to_owned(), config.clone());
        Ok(())
    }

    async fn scheduler(
        &self,
        _kubeconfig: &AdminKubeconfig,
        _control_plane: &str,
    ) -> GuestResult<Option<RunningScheduler>> {
        // No kubeadm, so no scheduler: reported as kube-scheduler's defaults, healthy.
        Ok(Some(RunningScheduler {
            config_hash: benchcluster_crd::scheduler::DEFAULTS.into(),
            image: String::new(),
            custom_image: None,
            started: None,
            healthy: true,
        }))
    }

    async fn switch_scheduler(
        &self,
        control_plane: &GuestNode,
        _credentials: &Credentials,
        _kubeconfig: &AdminKubeconfig,
        _config: &InitConfig,
    ) -> GuestResult<RunningScheduler> {
        Err(GuestError::Api(format!(
            "{}: the vm tier runs no kubeadm, so no scheduler to switch",
            control_plane.name
        )))
    }

    async fn cluster_nodes(&self, _kubeconfig: &AdminKubeconfig) -> GuestResult<Vec<ClusterNode>> {
        let configured = self
            .configured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(self
            .lock()
            .keys()
            .map(|name| {
                let config = configured.get(name).cloned().unwrap_or_default();
                ClusterNode {
                    name: name.clone(),
                    ready: true,
                    cordoned_for_removal: false,
                    labels: config.labels,
                    extended_resources: config.extended_resources,
                }
            })
            .collect())
    }

    /// Nothing to do: this guest's nodes are never cordoned (removal forgets them).
    async fn uncordon(&self, _kubeconfig: &AdminKubeconfig, _node_name: &str) -> GuestResult<()> {
        Ok(())
    }

    async fn remove_node(&self, _kubeconfig: &AdminKubeconfig, node_name: &str) -> GuestResult<()> {
        self.lock().remove(node_name);
        Ok(())
    }
}

/// SSH settings for guests under emulation: a state directory of the test's own.
pub fn ssh_config(state_dir: PathBuf) -> SshConfig {
    SshConfig {
        state_dir,
        connect_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(60),
        ..SshConfig::default()
    }
}

/// Controller settings for the vm tier: polls short enough to time phases to about a
/// second, and a resync short enough to notice a domain destroyed behind its back.
pub fn settings() -> Settings {
    Settings {
        poll_interval: Duration::from_millis(500),
        resync_interval: Duration::from_secs(2),
        backoff_base: Duration::from_millis(500),
        backoff_cap: Duration::from_secs(10),
        ..Settings::default()
    }
}

/// A fresh ed25519 client key pair, as the Secret's owner would make with ssh-keygen.
pub fn client_credentials() -> anyhow::Result<Credentials> {
    keys::client_credentials(USER, "benchcluster-vm-tier")
}

/// A 1 + `workers` BenchCluster of the sandbox's guest image on its network.
pub fn benchcluster(
    namespace: &str,
    name: &str,
    workers: i32,
    image_volume: &str,
) -> anyhow::Result<BenchCluster> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "benchcluster.dev/v1alpha1",
        "kind": "BenchCluster",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "controlPlane": {"cpus": CONTROL_PLANE_CPUS, "memory": CONTROL_PLANE_MEMORY, "disk": DISK,
                              "image": {"volume": image_volume, "firmware": "bios"}},
            "workers": {"replicas": workers, "cpus": 1, "memory": MEMORY, "disk": DISK,
                        "image": {"volume": image_volume, "firmware": "bios"}},
            "network": {"name": NETWORK},
            "ssh": {"user": USER, "keySecret": {"name": SSH_SECRET}}
        }
    }))?)
}

/// An API server, a namespace with the SSH key Secret, and the controller watching
/// that namespace, with its HTTP endpoint. Start and stop it inside the sandbox's
/// namespace.
pub struct Bed {
    pub server: TestApiServer,
    pub client: Client,
    pub namespace: String,
    pub api: Api<BenchCluster>,
    pub ctx: Arc<VmContext>,
    pub credentials: Credentials,
    pub uri: String,
    /// The controller's `/metrics`, `/healthz` and `/readyz`, on the namespace's own
    /// loopback.
    pub http_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    http_task: tokio::task::JoinHandle<()>,
}

impl Bed {
    /// `uri`: the sandbox's libvirt URI; `state_dir`: where the SSH guest keeps its
    /// key, known_hosts and control sockets.
    pub async fn start(uri: String, state_dir: PathBuf) -> anyhow::Result<Bed> {
        let server = TestApiServer::start().await?;
        server.install_crd().await?;
        let client = server.client().await?;
        let namespace = create_namespace(&client, "vm").await?;
        let credentials = client_credentials()?;
        keys::create_ssh_secret(&client, &namespace, SSH_SECRET, &credentials).await?;

        let hypervisor = Libvirt::new(LibvirtConfig {
            image_pool: IMAGE_POOL.to_owned(),
            node_pool: NODE_POOL.to_owned(),
            domain_type: "qemu".to_owned(),
            ..LibvirtConfig::for_uri(uri.clone())
        });
        hypervisor
            .check_connection()
            .await
            .context("the controller's libvirt connection to the sandbox")?;
        let guest = ProbeOnlyGuest::new(ssh_config(state_dir));
        let ctx = Arc::new(Context::new(client.clone(), hypervisor, guest, settings()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run_ctx = Arc::clone(&ctx);
        let watched = namespace.clone();
        let task = tokio::spawn(async move {
            reconcile::run(run_ctx, Some(&watched), async move {
                let _ = stopped.await;
            })
            .await;
        });

        // The readiness of the controller's binary (main.rs) without leader election:
        // the CRD, the watch, and a round trip on the controller's own libvirt
        // connection (the hypervisor's clones share it).
        let synced = Arc::clone(&ctx);
        let readiness = Readiness::new()
            .with("crd", http::crd_check(client.clone()))
            .with(
                "watch",
                http::flag_check("the BenchCluster watch has not synced", move || {
                    synced.watch_synced()
                }),
            )
            .with("libvirt", http::libvirt_check(ctx.hypervisor.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http_addr = listener.local_addr()?;
        let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http_task = tokio::spawn(http::serve(
            listener,
            Arc::clone(&ctx.metrics),
            readiness,
            async move {
                let _ = http_stopped.await;
            },
        ));
        Ok(Bed {
            api: Api::namespaced(client.clone(), &namespace),
            server,
            client,
            namespace,
            ctx,
            credentials,
            uri,
            http_addr,
            stop: Some(stop),
            task,
            http_stop: Some(http_stop),
            http_task,
        })
    }

    /// Stops the controller gracefully (in-flight reconciles finish, bounded), then its
    /// HTTP endpoint.
    pub async fn stop_controller(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        self.task.abort();
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.http_task).await;
        self.http_task.abort();
    }

    /// `GET path` on the controller's HTTP endpoint: the status code and the body.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let request = async {
            let mut stream = tokio::net::TcpStream::connect(self.http_addr).await?;
            let head = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.http_addr
            );
            stream.write_all(head.as_bytes()).await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            anyhow::Ok(response)
        };
        let response = tokio::time::timeout(HTTP_DEADLINE, request)
            .await
            .with_context(|| format!("GET {path} took over {HTTP_DEADLINE:?}"))??;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .with_context(|| format!("GET {path}: no end of headers in {response:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("GET {path}: no status in {head:?}"))?
            .parse()?;
        Ok((status, body.to_owned()))
    }

    /// Creates a 1 + `workers` BenchCluster; returns it as created (with its UID).
    pub async fn create(
        &self,
        name: &str,
        workers: i32,
        image: &str,
    ) -> anyhow::Result<BenchCluster> {
        self.api
            .create(
                &PostParams::default(),
                &benchcluster(&self.namespace, name, workers, image)?,
            )
            .await
            .with_context(|| format!("creating BenchCluster {name}"))
    }

    /// Whether the controller's task still runs (it did not panic or return).
    pub fn controller_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Waits for `ready(&bc)` on the current object, polling the API server.
    pub async fn wait_for(
        &self,
        what: &str,
        name: &str,
        deadline: Duration,
        ready: impl Fn(&BenchCluster) -> bool,
    ) -> anyhow::Result<BenchCluster> {
        let last: Mutex<Option<String>> = Mutex::new(None);
        let (last_ref, ready) = (&last, &ready);
        let result = wait::until(what, deadline, POLL, move || {
            let api = self.api.clone();
            async move {
                let bc = api.get(name).await?;
                *last_ref.lock().unwrap_or_else(PoisonError::into_inner) = Some(summary(&bc));
                Ok::<_, anyhow::Error>(ready(&bc).then_some(bc))
            }
        })
        .await;
        let last = last.into_inner().unwrap_or_else(PoisonError::into_inner);
        result.map_err(|error| match last {
            Some(last) => error.context(format!("last seen: {last}")),
            None => error,
        })
    }

    /// Domain name prefix of a BenchCluster of this namespace.
    pub fn domain_prefix(&self, name: &str) -> String {
        format!("{}-{name}-", self.namespace)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.task.abort();
        self.http_task.abort();
    }
}

/// Whether the status says Ready for the object's current generation.
pub fn is_ready(bc: &BenchCluster) -> bool {
    let status = bc.status_or_default();
    status.observed_generation == bc.metadata.generation
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// One line about the object's status, for timeout messages.
pub fn summary(bc: &BenchCluster) -> String {
    let status = bc.status_or_default();
    let nodes: Vec<String> = status
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{}={:?}@{}",
                n.name,
                n.state,
                n.ip.as_deref().unwrap_or("-")
            )
        })
        .collect();
    let conditions: Vec<String> = status
        .conditions
        .iter()
        .filter(|c| c.status == "True" || c.type_ == "Ready")
        .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
        .collect();
    format!("nodes [{}], {}", nodes.join(", "), conditions.join("; "))
}

/// `virsh -c <uri> args...`: the sandbox's libvirtd, reached the way an operator
/// would, behind the controller's back. Returns stdout.
pub async fn virsh(uri: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new("virsh");
    command.args(["-c", uri]).args(args);
    sandbox::output(command, Duration::from_secs(60)).await
}

/// Volume names of a pool (`virsh vol-list` has no `--name` before libvirt 9).
pub async fn volumes(uri: &str, pool: &str) -> anyhow::Result<Vec<String>> {
    virsh(uri, &["pool-refresh", pool]).await?;
    let table = virsh(uri, &["vol-list", pool]).await?;
    Ok(table
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("---"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Names printed one per line by `virsh list --name` and the like.
pub fn names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Routes the controller's logs to the test's output (`RUST_LOG` overrides).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("benchcluster_controller=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}
