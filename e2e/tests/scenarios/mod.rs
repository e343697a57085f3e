//! The e2e tier's scenarios and the bed they share: one formed cluster of a control
//! plane and two pools (`e2e/cluster.yaml`), the management API, the guest cluster's
//! API, SSH to the nodes and libvirt, and the controller's log.
//!
//! A scenario is a module with `NAME` and `run(&Bed)`; it leaves the cluster Ready with
//! its shape as in `e2e/cluster.yaml`, or says what it changed (`delete` removes it).
//! The bed either runs its own API server and controller in the sandbox this process
//! started ([`Bed::own`]), or attaches to what `cargo xtask up` runs ([`Bed::attach`]).

mod delete;
mod outage;
mod pools;
mod rejoin;
mod scale;
mod scheduler;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use benchcluster_controller::guest::ssh::{SshConfig, SshGuest};
use benchcluster_controller::guest::{Credentials, GuestNode};
use benchcluster_controller::hypervisor::Hypervisor as _;
use benchcluster_controller::hypervisor::libvirt::{Libvirt, LibvirtConfig};
use benchcluster_controller::{Context, reconcile};
use benchcluster_crd::{BenchCluster, PhaseTimings};
use benchcluster_e2e::logs::{ControllerLog, LogCapture};
use benchcluster_e2e::sandbox::{self, IMAGE_POOL, NETWORK, NODE_POOL};
use benchcluster_e2e::{TestApiServer, create_namespace, keys, wait};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::vm_support::{self, POLL, USER, is_ready, names, summary, virsh};

/// The cluster every scenario runs on.
const CLUSTER: &str = include_str!("../../cluster.yaml");
/// The SSH key Secret of a sandbox of our own.
const SSH_SECRET: &str = "e2e-ssh-key";

/// Boot, `kubeadm init` (minutes under emulation, more on a busy host), joins, Ready.
const FORM_DEADLINE: Duration = Duration::from_secs(60 * 60);
pub const SCALE_UP_DEADLINE: Duration = Duration::from_secs(30 * 60);
pub const SCALE_DOWN_DEADLINE: Duration = Duration::from_secs(15 * 60);
pub const DELETE_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// The cluster's peak is 9 vCPUs (2 + 2 x 2 + 3) on CI's 2 cores, more than the
/// default 4 per CPU; the guests idle most of theirs (as `cargo xtask up`'s sandbox,
/// which passes the same ratio).
const CPU_OVERCOMMIT: f64 = 8.0;
/// Bounds of the SSH guest's steps under emulation.
const KUBEADM_TIMEOUT: Duration = Duration::from_secs(45 * 60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
const KUBECTL_DEADLINE: Duration = Duration::from_secs(120);

/// One scenario: its name (for `--scenario`) and what it runs.
pub struct Scenario {
    pub name: &'static str,
    run: for<'a> fn(&'a Bed) -> BoxFuture<'a, anyhow::Result<()>>,
    /// Whether it runs against an `up` cluster without being named.
    on_up_by_default: bool,
}

/// In the order they run; each leaves the cluster as the next expects.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: pools::NAME,
        run: pools::run,
        on_up_by_default: true,
    },
    Scenario {
        name: scheduler::NAME,
        run: scheduler::run,
        on_up_by_default: true,
    },
    Scenario {
        name: outage::NAME,
        run: outage::run,
        on_up_by_default: true,
    },
    Scenario {
        name: rejoin::NAME,
        run: rejoin::run,
        on_up_by_default: true,
    },
    Scenario {
        name: scale::NAME,
        run: scale::run,
        on_up_by_default: true,
    },
    Scenario {
        name: delete::NAME,
        run: delete::run,
        on_up_by_default: false,
    },
];

/// Which scenarios to run.
pub struct Selection(Option<BTreeSet<String>>);

impl Selection {
    /// From a comma-separated list of names (`None`: all).
    pub fn from_env(names: Option<&str>) -> anyhow::Result<Self> {
        let Some(names) = names.filter(|n| !n.trim().is_empty()) else {
            return Ok(Self(None));
        };
        let names: BTreeSet<String> = names.split(',').map(|n| n.trim().to_owned()).collect();
        for name in &names {
            if !ALL.iter().any(|s| s.name == name) {
                let known: Vec<&str> = ALL.iter().map(|s| s.name).collect();
                bail!("no scenario {name:?} (there are {})", known.join(", "));
            }
        }
        Ok(Self(Some(names)))
    }

    fn includes(&self, scenario: &Scenario, own: bool) -> bool {
        match &self.0 {
            Some(names) => names.contains(scenario.name),
            None => own || scenario.on_up_by_default,
        }
    }
}

/// Forms the cluster (when the bed is our own), then runs the selected scenarios in
/// order, each timed and followed by the log check.
pub async fn run(bed: &Bed, selection: &Selection, own: bool) -> anyhow::Result<()> {
    let mut report: Vec<(String, Duration)> = Vec::new();
    let mut overhead = None;
    if own {
        let start = Instant::now();
        let bc = bed.form().await?;
        let formed = start.elapsed();
        eprintln!("== formed: {} Ready in {formed:.1?}", bed.name);
        print_timings(&bc);
        overhead = Some(bed.overhead(&bc, formed).await?);
        bed.check_log()?;
        report.push(("form".into(), formed));
    } else {
        let bc = bed
            .wait_ready("the up cluster Ready", SCALE_UP_DEADLINE)
            .await?;
        ensure!(
            bc.spec.pools.iter().any(|p| p.name == "gpu")
                && bc.spec.pools.iter().any(|p| p.name == "small"),
            "the up cluster is not e2e/cluster.yaml's shape: run `cargo xtask up e2e/cluster.yaml`"
        );
    }
    for scenario in ALL.iter().filter(|s| selection.includes(s, own)) {
        eprintln!("== scenario {}", scenario.name);
        let start = Instant::now();
        (scenario.run)(bed)
            .await
            .with_context(|| format!("scenario {}", scenario.name))?;
        let took = start.elapsed();
        bed.check_log()
            .with_context(|| format!("after scenario {}", scenario.name))?;
        eprintln!("== scenario {} passed in {took:.1?}", scenario.name);
        report.push((scenario.name.into(), took));
    }
    eprintln!("e2e summary (Kubernetes {}):", kubernetes_version());
    for (what, took) in &report {
        eprintln!("  {what:<10} {took:>10.1?}");
    }
    if let Some(overhead) = overhead {
        eprintln!("  {overhead}");
    }
    Ok(())
}

/// What a `cargo xtask up` sandbox says of itself in its `env` file.
pub struct UpSandbox {
    pub netns: String,
    pub uri: String,
    pub kubeconfig: PathBuf,
    pub k8s_bin: PathBuf,
    pub namespace: String,
    pub name: String,
    pub ssh_secret: (String, String),
    pub controller_log: PathBuf,
}

impl UpSandbox {
    pub fn read(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("env");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is `cargo xtask up e2e/cluster.yaml` running?)",
                path.display()
            )
        })?;
        let vars: BTreeMap<&str, &str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.trim_start_matches("export ").split_once('='))
            .collect();
        let var = |name: &str| {
            vars.get(name)
                .map(|v| (*v).to_owned())
                .with_context(|| format!("{} has no {name}", path.display()))
        };
        let pair = |name: &str| -> anyhow::Result<(String, String)> {
            let value = var(name)?;
            let (a, b) = value
                .split_once('/')
                .with_context(|| format!("{name}={value} is not <namespace>/<name>"))?;
            Ok((a.to_owned(), b.to_owned()))
        };
        let (namespace, name) = pair("BENCHCLUSTER_EXAMPLE")?;
        Ok(Self {
            netns: var("BENCHCLUSTER_NETNS")?,
            uri: var("BENCHCLUSTER_LIBVIRT_URI")?,
            kubeconfig: var("BENCHCLUSTER_INSIDE_KUBECONFIG")?.into(),
            k8s_bin: var("BENCHCLUSTER_K8S_BIN")?.into(),
            namespace,
            name,
            ssh_secret: pair("BENCHCLUSTER_SSH_SECRET")?,
            controller_log: var("BENCHCLUSTER_CONTROLLER_LOG")?.into(),
        })
    }
}

/// The management API server and the controller this process runs.
struct Own {
    server: TestApiServer,
    image_volume: String,
    /// The sandbox's directory (libvirtd's state: qemu's pid files).
    sandbox_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the scenarios share. Lives on a thread inside the sandbox's namespace.
pub struct Bed {
    pub client: Client,
    pub namespace: String,
    /// The BenchCluster's name.
    pub name: String,
    pub api: Api<BenchCluster>,
    /// The sandbox's libvirt.
    pub uri: String,
    /// Scratch files (kubeconfig, kubectl's cache, the test's SSH state).
    pub dir: PathBuf,
    pub log: ControllerLog,
    kubectl: PathBuf,
    /// The test's own connections, behind the controller's back.
    hypervisor: Libvirt,
    guest: SshGuest,
    credentials: Credentials,
    own: Option<Own>,
    _scratch: Option<tempfile::TempDir>,
}

fn libvirt(uri: &str) -> Libvirt {
    Libvirt::new(LibvirtConfig {
        image_pool: IMAGE_POOL.to_owned(),
        node_pool: NODE_POOL.to_owned(),
        domain_type: "qemu".to_owned(),
        ..LibvirtConfig::for_uri(uri.to_owned())
    })
}

fn ssh(state_dir: PathBuf) -> SshGuest {
    SshGuest::new(SshConfig {
        state_dir,
        kubeadm_timeout: KUBEADM_TIMEOUT,
        command_timeout: COMMAND_TIMEOUT,
        ..SshConfig::default()
    })
}

impl Bed {
    /// An API server and the controller with the real guest, in this process, on the
    /// sandbox at `uri` whose image volume is `image_volume`.
    pub async fn own(
        uri: String,
        image_volume: String,
        dir: PathBuf,
        log: LogCapture,
    ) -> anyhow::Result<Bed> {
        let server = TestApiServer::start().await?;
        server.install_crd().await?;
        let client = server.client().await?;
        let namespace = create_namespace(&client, "e2e").await?;
        let credentials = vm_support::client_credentials()?;
        keys::create_ssh_secret(&client, &namespace, SSH_SECRET, &credentials).await?;
        let hypervisor = libvirt(&uri);
        hypervisor
            .check_connection()
            .await
            .context("the controller's libvirt connection to the sandbox")?;
        let ctx: Arc<Context<Libvirt, SshGuest>> = Arc::new(Context::new(
            client.clone(),
            hypervisor,
            // In the sandbox's temporary directory, removed with it.
            ssh(dir.join("controller-ssh")),
            benchcluster_controller::Settings {
                cpu_overcommit: CPU_OVERCOMMIT,
                ..vm_support::settings()
            },
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watched = namespace.clone();
        let task = tokio::spawn(async move {
            reconcile::run(ctx, Some(&watched), async move {
                let _ = stopped.await;
            })
            .await;
        });
        let name = cluster_template()?.metadata.name.context("no name")?;
        Ok(Bed {
            api: Api::namespaced(client.clone(), &namespace),
            kubectl: server.bin_dir().join("kubectl"),
            client,
            namespace,
            name,
            hypervisor: libvirt(&uri),
            guest: ssh(dir.join("test-ssh")),
            uri,
            dir: dir.clone(),
            log: ControllerLog::Captured(log),
            credentials,
            own: Some(Own {
                server,
                image_volume,
                sandbox_dir: dir,
                stop: Some(stop),
                task,
            }),
            _scratch: None,
        })
    }

    /// The management API, libvirt and controller log of a running `cargo xtask up`.
    pub async fn attach(up: UpSandbox) -> anyhow::Result<Bed> {
        let parsed = Kubeconfig::read_from(&up.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(config)?;
        let api: Api<BenchCluster> = Api::namespaced(client.clone(), &up.namespace);
        let bc = api
            .get(&up.name)
            .await
            .with_context(|| format!("BenchCluster {}/{}", up.namespace, up.name))?;
        let (secret_namespace, secret) = &up.ssh_secret;
        let credentials =
            keys::read_ssh_secret(&client, secret_namespace, secret, &bc.spec.ssh.user).await?;
        let scratch = tempfile::tempdir()?;
        let dir = scratch.path().to_owned();
        Ok(Bed {
            client,
            namespace: up.namespace,
            name: up.name,
            api,
            hypervisor: libvirt(&up.uri),
            uri: up.uri,
            guest: ssh(dir.join("test-ssh")),
            dir,
            log: ControllerLog::File(up.controller_log),
            kubectl: up.k8s_bin.join("kubectl"),
            credentials,
            own: None,
            _scratch: Some(scratch),
        })
    }

    /// Stops the controller we run (if any); dumps the API server's logs on failure.
    pub async fn finish(&mut self, failed: bool) {
        if failed && let Ok(bc) = self.api.get(&self.name).await {
            eprintln!(
                "last status:\n{}",
                serde_yaml::to_string(&bc.status).unwrap_or_default()
            );
        }
        let Some(own) = self.own.as_mut() else {
            return;
        };
        if let Some(stop) = own.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut own.task).await;
        own.task.abort();
        if failed {
            own.server.dump_logs();
        }
    }

    /// Creates the cluster of `e2e/cluster.yaml` with our sandbox's image, network and
    /// key, and waits until it is Ready.
    async fn form(&self) -> anyhow::Result<BenchCluster> {
        let own = self
            .own
            .as_ref()
            .context("forming needs a sandbox of our own")?;
        let mut bc = cluster_template()?;
        bc.metadata.namespace = Some(self.namespace.clone());
        let spec = &mut bc.spec;
        spec.control_plane.image.volume = own.image_volume.clone();
        spec.workers.template.image.volume = own.image_volume.clone();
        for pool in &mut spec.pools {
            pool.pool.template.image.volume = own.image_volume.clone();
        }
        spec.network.name = NETWORK.to_owned();
        spec.ssh.user = USER.to_owned();
        spec.ssh.key_secret.name = SSH_SECRET.to_owned();
        self.api
            .create(&PostParams::default(), &bc)
            .await
            .context("creating the BenchCluster")?;
        self.wait_ready("the cluster to be Ready", FORM_DEADLINE)
            .await
    }

    /// The current BenchCluster.
    pub async fn get(&self) -> anyhow::Result<BenchCluster> {
        Ok(self.api.get(&self.name).await?)
    }

    /// Sets a pool's replicas (by name; `w` is `spec.workers`), as `kubectl patch` would.
    pub async fn scale_pool(&self, pool: &str, replicas: i32) -> anyhow::Result<()> {
        let bc = self.get().await?;
        let path = if pool == "w" {
            "/spec/workers/replicas".to_owned()
        } else {
            let index = bc
                .spec
                .pools
                .iter()
                .position(|p| p.name == pool)
                .with_context(|| format!("no pool {pool}"))?;
            format!("/spec/pools/{index}/replicas")
        };
        let patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/metadata/uid", "value": bc.metadata.uid},
            {"op": "replace", "path": path, "value": replicas}
        ]))?;
        self.api
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await
            .with_context(|| format!("setting pool {pool}'s replicas to {replicas}"))?;
        Ok(())
    }

    /// Waits for Ready at the current generation with every desired worker Ready.
    pub async fn wait_ready(&self, what: &str, deadline: Duration) -> anyhow::Result<BenchCluster> {
        let last: Mutex<Option<String>> = Mutex::new(None);
        let last_ref = &last;
        let result = wait::until(what, deadline, POLL, move || {
            let api = self.api.clone();
            let name = self.name.clone();
            async move {
                let bc = api.get(&name).await?;
                let line = summary(&bc);
                let mut seen = last_ref.lock().unwrap_or_else(PoisonError::into_inner);
                if seen.as_deref() != Some(line.as_str()) {
                    eprintln!("  [{}] {line}", wait::clock());
                    *seen = Some(line);
                }
                let status = bc.status_or_default();
                let done = is_ready(&bc)
                    && status.ready_workers == status.desired_workers
                    && status.nodes.len() == 1 + usize::try_from(status.desired_workers)?;
                Ok::<_, anyhow::Error>(done.then_some(bc))
            }
        })
        .await;
        let last = last.into_inner().unwrap_or_else(PoisonError::into_inner);
        result.map_err(|error| match last {
            Some(last) => error.context(format!("last seen: {last}")),
            None => error,
        })
    }

    /// The guest cluster's admin kubeconfig, from the Secret the status names, written
    /// to a 0600 file in the scratch directory.
    pub async fn guest_kubeconfig(&self) -> anyhow::Result<PathBuf> {
        let status = self.get().await?.status_or_default();
        let name = status
            .kubeconfig_secret
            .context("status names no kubeconfig Secret")?;
        ensure!(
            name == format!("{}-kubeconfig", self.name),
            "the kubeconfig Secret is {name}"
        );
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
            .get(&name)
            .await?;
        let data = secret
            .data
            .unwrap_or_default()
            .into_values()
            .next()
            .context("the kubeconfig Secret is empty")?;
        let text = String::from_utf8(data.0)?;
        let endpoint = status
            .control_plane_endpoint
            .context("no control-plane endpoint in status")?;
        ensure!(
            text.contains(&format!("server: {endpoint}")),
            "the kubeconfig's server is not {endpoint}"
        );
        let path = self.dir.join("guest-admin.kubeconfig");
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(path)
    }

    /// A kube client on the guest cluster.
    pub async fn guest_client(&self) -> anyhow::Result<Client> {
        let parsed = Kubeconfig::read_from(self.guest_kubeconfig().await?)?;
        let config =
            kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// `kubectl --kubeconfig <guest> args...`; stdout.
    pub async fn guest_kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let kubeconfig = self.guest_kubeconfig().await?;
        let mut command = tokio::process::Command::new(&self.kubectl);
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG");
        sandbox::output(command, KUBECTL_DEADLINE).await
    }

    /// Node name -> uid in the guest cluster.
    pub async fn node_uids(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.guest_client().await?);
        Ok(nodes
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| Some((n.metadata.name?, n.metadata.uid?)))
            .collect())
    }

    /// Checks that exactly the Nodes of the status exist, all Ready, and prints
    /// `kubectl get nodes -o wide`.
    pub async fn check_guest_nodes(&self) -> anyhow::Result<()> {
        let bc = self.get().await?;
        let want: BTreeSet<String> = bc
            .status_or_default()
            .nodes
            .into_iter()
            .map(|n| n.name)
            .collect();
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.guest_client().await?);
        let have: BTreeMap<String, bool> = nodes
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| {
                let ready = n
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                Some((n.metadata.name?, ready))
            })
            .collect();
        let expected: BTreeMap<String, bool> = want.into_iter().map(|n| (n, true)).collect();
        ensure!(
            have == expected,
            "guest Nodes (name -> Ready): {have:?}, want {expected:?}"
        );
        eprintln!(
            "{}",
            indent(&self.guest_kubectl(&["get", "nodes", "-o", "wide"]).await?)
        );
        Ok(())
    }

    /// Names of this BenchCluster's domains (defined or running), by libvirt.
    pub async fn domains(&self) -> anyhow::Result<Vec<String>> {
        let prefix = self.domain_prefix();
        Ok(
            names(&virsh(&self.uri, &["list", "--all", "--name"]).await?)
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect(),
        )
    }

    /// `<namespace>-<name>-`: what this cluster's domain and volume names start with.
    pub fn domain_prefix(&self) -> String {
        format!("{}-{}-", self.namespace, self.name)
    }

    /// The libvirt UUID of a node's domain.
    pub async fn domain_uuid(&self, node: &str) -> anyhow::Result<String> {
        let domain = format!("{}-{node}", self.namespace);
        Ok(virsh(&self.uri, &["domuuid", &domain])
            .await?
            .trim()
            .to_owned())
    }

    /// How to reach a node over SSH: its IP from status, the host key pinned in its
    /// domain.
    pub async fn guest_node(&self, node: &str) -> anyhow::Result<GuestNode> {
        let status = self.get().await?.status_or_default();
        let ip = status
            .nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.ip.as_deref())
            .with_context(|| format!("no IP of {node} in status"))?
            .parse()?;
        let domain = format!("{}-{node}", self.namespace);
        let host_key = self
            .hypervisor
            .inventory(&[])
            .await?
            .domains_with_prefix(&domain)
            .into_iter()
            .find(|d| d.name == domain)
            .and_then(|d| d.owner.host_key)
            .with_context(|| format!("no pinned host key on {domain}"))?;
        Ok(GuestNode {
            name: node.to_owned(),
            ip,
            host_key,
        })
    }

    /// Runs `argv` on a node over SSH (pinned host key); stdout.
    pub async fn exec(&self, node: &GuestNode, argv: &[&str]) -> anyhow::Result<String> {
        self.guest
            .exec(node, &self.credentials, argv)
            .await
            .with_context(|| format!("`{}` on {}", argv.join(" "), node.name))
    }

    /// The controller never reset a node nor initialised a cluster twice.
    fn check_log(&self) -> anyhow::Result<()> {
        let inits = self.log.count(&["started", "operation=\"kubeadm init\""]);
        ensure!(
            inits == 1,
            "kubeadm init started {inits} times:\n{}",
            self.log.matching("kubeadm init")
        );
        ensure!(
            self.log.count(&["resetting"]) == 0,
            "the controller reset a node:\n{}",
            self.log.matching("resetting")
        );
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(own) = &self.own {
            own.task.abort();
        }
    }
}

/// `e2e/cluster.yaml` as typed.
fn cluster_template() -> anyhow::Result<BenchCluster> {
    serde_yaml::from_str(CLUSTER).context("e2e/cluster.yaml")
}

/// The controller's log to the test's output and to the returned capture, for the
/// checks after each scenario (info and up; `RUST_LOG` overrides).
pub fn install_log_capture() -> LogCapture {
    let capture = LogCapture::echoing();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("benchcluster_controller=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(capture.clone())
        .try_init();
    capture
}

/// The controller's share of the time to Ready: the time to Ready minus the guests'
/// own work on the critical path. A guest's boot is measured in the guest (kernel start
/// to sshd active, from systemd) plus firmware and boot loader (qemu's start to the
/// guest kernel's); kubeadm init and join are the SSH commands' durations; Node
/// readiness after kubeadm as the controller saw it (its polling counts as guest time,
/// up to one poll interval). What is left is defining, waiting between steps (DHCP and
/// SSH probe spacing) and writing status.
pub struct Overhead {
    ready: Duration,
    guests: Duration,
}

impl std::fmt::Display for Overhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let overhead = self.ready.saturating_sub(self.guests);
        write!(
            f,
            "controller overhead {overhead:.1?} of {:.1?} to Ready ({:.1} %; guests' \
             critical path {:.1?})",
            self.ready,
            100.0 * overhead.as_secs_f64() / self.ready.as_secs_f64(),
            self.guests
        )
    }
}

impl Bed {
    async fn overhead(&self, bc: &BenchCluster, ready: Duration) -> anyhow::Result<Overhead> {
        let status = bc.status_or_default();
        let ms = |v: Option<u64>, what: &str, node: &str| {
            v.map(Duration::from_millis)
                .with_context(|| format!("no {what} timing for {node} in status"))
        };
        let mut control_plane = None;
        let mut workers = Vec::new();
        for node in &status.nodes {
            let guest = self.guest_node(&node.name).await?;
            let usec = self
                .exec(
                    &guest,
                    &[
                        "systemctl",
                        "show",
                        "ssh.service",
                        "--property=ActiveEnterTimestampMonotonic",
                        "--value",
                    ],
                )
                .await?;
            let boot = Duration::from_micros(
                usec.trim()
                    .parse()
                    .with_context(|| format!("sshd's start on {}: {usec:?}", node.name))?,
            ) + self.firmware(&guest).await?;
            let t = &node.timings;
            let ready = ms(t.ready_ms, "ready", &node.name)?;
            if node.name.contains("-cp-") {
                control_plane = Some((boot, ms(t.init_ms, "init", &node.name)?, ready));
            } else {
                workers.push((boot, ms(t.join_ms, "join", &node.name)?, ready));
            }
        }
        let (cp_boot, init, cp_ready) = control_plane.context("no control plane in status")?;
        let initialised = cp_boot + init;
        let guests = workers
            .iter()
            .map(|(boot, join, ready)| (*boot).max(initialised) + *join + *ready)
            .fold(initialised + cp_ready, Duration::max);
        Ok(Overhead { ready, guests })
    }

    /// Firmware and boot loader: from qemu's start (the process libvirt spawned for
    /// the domain, from its pid file and /proc) to the guest kernel's, which is the
    /// host's uptime less the guest's, read together over SSH. Both clocks are the
    /// host's (TCG's virtual clock follows it), at the kernel's tick resolution.
    async fn firmware(&self, guest: &GuestNode) -> anyhow::Result<Duration> {
        let own = self
            .own
            .as_ref()
            .context("qemu's pid files are in our sandbox")?;
        let domain = format!("{}-{}", self.namespace, guest.name);
        let pid_file = own
            .sandbox_dir
            .join("state/run/qemu")
            .join(format!("{domain}.pid"));
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .with_context(|| format!("qemu of {domain} (pid {})", pid.trim()))?;
        // Field 22, counted after the parenthesised command name (which may hold spaces).
        let started_ticks: f64 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no start time in /proc/{}/stat", pid.trim()))?;
        let qemu_started = started_ticks / rustix::param::clock_ticks_per_second() as f64;
        let before = host_uptime()?;
        let guest_uptime = self.exec(guest, &["cat", "/proc/uptime"]).await?;
        let after = host_uptime()?;
        let guest_uptime: f64 = guest_uptime
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{}'s /proc/uptime: {guest_uptime:?}", guest.name))?;
        let kernel_started = (before + after) / 2.0 - guest_uptime;
        let firmware = kernel_started - qemu_started;
        ensure!(
            (0.0..600.0).contains(&firmware),
            "{domain}: firmware and loader took {firmware:.2} s by the clocks, which cannot be"
        );
        eprintln!("  {}: firmware and boot loader {firmware:.1} s", guest.name);
        Ok(Duration::from_secs_f64(firmware))
    }
}

fn host_uptime() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("/proc/uptime: {text:?}"))
}

/// Per-node phase timings from status, and the last provisioning's.
pub fn print_timings(bc: &BenchCluster) {
    let status = bc.status_or_default();
    eprintln!(
        "  {:<14} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "node", "define", "boot", "lease", "ssh", "init", "join", "ready"
    );
    for node in &status.nodes {
        eprintln!("  {:<14} {}", node.name, timing_row(&node.timings));
    }
    if let Some(last) = &status.last_provisioning {
        eprintln!("  {:<14} {}", "(slowest)", timing_row(last));
    }
}

fn timing_row(t: &PhaseTimings) -> String {
    let s = |ms: Option<u64>| {
        ms.map_or_else(
            || "-".to_owned(),
            |ms| format!("{:.1}s", ms as f64 / 1000.0),
        )
    };
    format!(
        "{:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
        s(t.define_ms),
        s(t.boot_ms),
        s(t.lease_ms),
        s(t.ssh_ms),
        s(t.init_ms),
        s(t.join_ms),
        s(t.ready_ms)
    )
}

/// KUBERNETES_VERSION from e2e/versions.env.
fn kubernetes_version() -> String {
    let text = include_str!("../../versions.env");
    text.lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .unwrap_or("?")
        .trim()
        .to_owned()
}

pub fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The name of the one worker of `pool`.
pub fn node_of_pool(bc: &BenchCluster, pool: &str) -> anyhow::Result<String> {
    let nodes: Vec<String> = bc
        .status_or_default()
        .nodes
        .into_iter()
        .filter(|n| n.pool.as_deref() == Some(pool))
        .map(|n| n.name)
        .collect();
    match nodes.as_slice() {
        [one] => Ok(one.clone()),
        _ => anyhow::bail!("pool {pool} has nodes {nodes:?}, want one"),
    }
}

/// The pause image the kubelet has (preloaded in the image), from the Node's status.
pub fn pause_image(node: &Node) -> anyhow::Result<String> {
    node.status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|i| i.names.iter().flatten())
        .find(|n| n.contains("/pause:"))
        .cloned()
        .context("no pause image on the Node")
}
