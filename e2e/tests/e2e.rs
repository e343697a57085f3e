//! e2e tier: nothing is a test double. libvirtd, qemu (software emulation) and dnsmasq
//! run in a network namespace the test creates ([`Sandbox`]); the API server and the
//! controller run inside it, with the real [`SshGuest`]: `kubeadm init` on the control
//! plane and `kubeadm join` on the workers, over SSH with pinned host keys, in VMs booted
//! from the e2e image (`e2e/hack/build-kube-image.sh`: containerd, kubelet, kubeadm and
//! the control-plane images preloaded, so nothing is pulled).
//!
//! One test walks one BenchCluster through its life, because every step costs minutes
//! of emulated CPU on two shared cores:
//!
//! 1. 1 + 1 becomes Ready; `kubectl --kubeconfig <the Secret's kubeconfig>` (run inside
//!    the namespace) says both Nodes are Ready.
//! 2. The guest API goes silent on the formed cluster (kube-apiserver's static pod is
//!    stopped inside the control plane for more than a minute, many poll intervals and
//!    backoffs): the conditions say so, nothing is reset or initialised, and once it
//!    answers again the same Nodes (same uids) are Ready (RELIABILITY.md 26).
//!    Then the worker's Node is deleted behind the controller's back: its join
//!    completed into this cluster, so its kubelet is restarted and registers it again
//!    (same VM, new Node uid), nothing reset (RELIABILITY.md 7).
//! 3. `spec.workers.replicas` edited to 2: the new worker joins, three Nodes Ready. The
//!    first join token the controller mints is deleted on the control plane before the
//!    worker can use it: a fresh one is minted and the worker joins (RELIABILITY.md 14).
//! 4. edited back to 1: the removed worker's Node and domain (and its disks) are gone.
//! 5. the BenchCluster is deleted: no domain, overlay, seed or kubeconfig Secret remains.
//!
//! Over the whole life the controller's log shows one `kubeadm init` and no reset.
//!
//! Each step prints its wall time and the per-node phase timings from status.
//!
//! Runs only with BENCHCLUSTER_E2E_TESTS=1 (root, libvirtd, qemu: `cargo xtask test e2e`).
//! The image is BENCHCLUSTER_KUBE_IMAGE if set, else what build-kube-image.sh prints
//! (built on first use, about 5 minutes, then cached).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vm_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use benchcluster_controller::guest::ssh::{SshConfig, SshGuest};
use benchcluster_controller::guest::{Credentials, GuestNode};
use benchcluster_controller::hypervisor::Hypervisor as _;
use benchcluster_controller::hypervisor::libvirt::{Libvirt, LibvirtConfig};
use benchcluster_controller::{Context, reconcile};
use benchcluster_crd::{BenchCluster, PhaseTimings};
use benchcluster_e2e::logs::LogCapture;
use benchcluster_e2e::sandbox::{
    self, GuestImage, IMAGE_POOL, NETWORK, NODE_POOL, Sandbox, SandboxOptions,
};
use benchcluster_e2e::{TestApiServer, create_namespace, keys, wait};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use serde_json::json;
use vm_support::{POLL, USER, is_ready, names, summary, virsh, volumes};

/// Set to `1` to run this tier.
const E2E_TESTS_ENV: &str = "BENCHCLUSTER_E2E_TESTS";

/// Name of the BenchCluster.
const NAME: &str = "e2e";
const SSH_SECRET: &str = "e2e-ssh-key";
/// kubeadm's preflight wants 2 CPUs and 1700 MB on a control plane; the API server,
/// etcd and the controllers under emulation want room besides.
const CONTROL_PLANE_CPUS: u32 = 2;
const CONTROL_PLANE_MEMORY: &str = "3Gi";
const WORKER_CPUS: u32 = 1;
const WORKER_MEMORY: &str = "1536Mi";
/// The image's own size (node overlays are never smaller than their base).
const DISK: &str = "8Gi";

/// How long the guest API stays silent: far beyond the poll interval and the backoff
/// cap of [`vm_support::settings`], and beyond the 30 s after which the controller once
/// reset such a control plane.
const OUTAGE: Duration = Duration::from_secs(75);
/// kubelet notices a removed static pod manifest within its 20 s file check period.
const OUTAGE_SEEN_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// kube-apiserver starting again under emulation, then the controller's next retry.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Where the test parks kube-apiserver's static pod manifest during the outage.
const API_SERVER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";
const PARKED_MANIFEST: &str = "/etc/kubernetes/kube-apiserver.yaml.parked-by-e2e";

/// Boot, `kubeadm init` (minutes under emulation, more on a busy host), join, Ready.
const FORM_DEADLINE: Duration = Duration::from_secs(60 * 60);
const SCALE_UP_DEADLINE: Duration = Duration::from_secs(30 * 60);
const SCALE_DOWN_DEADLINE: Duration = Duration::from_secs(15 * 60);
const DELETE_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// Bounds of the SSH guest's steps under emulation.
const KUBEADM_TIMEOUT: Duration = Duration::from_secs(45 * 60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
const KUBECTL_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchcluster_forms_scales_by_edit_and_is_deleted_with_nothing_left() {
    let test = "benchcluster_forms_scales_by_edit_and_is_deleted_with_nothing_left";
    if std::env::var(E2E_TESTS_ENV).as_deref() != Ok("1") {
        eprintln!(
            "skipping {test}: the e2e tier runs only with {E2E_TESTS_ENV}=1 \
             (as root, with libvirtd and qemu installed; `cargo xtask test e2e`)"
        );
        return;
    }
    let log = install_log_capture();
    let started = Instant::now();
    let image = sandbox::kube_image()
        .await
        .unwrap_or_else(|error| panic!("{error:#}"));
    let sandbox = Sandbox::start(SandboxOptions {
        image: GuestImage::Path(image),
        ..SandboxOptions::default()
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));
    eprintln!(
        "sandbox {} up in {:.1?} ({})",
        sandbox.netns(),
        started.elapsed(),
        sandbox.uri()
    );
    let uri = sandbox.uri();
    let volume = sandbox.image_volume().to_owned();
    let dir = sandbox.dir().to_owned();
    let scenario_log = log.clone();
    let result = sandbox
        .run_inside(move || scenario(uri, volume, dir, scenario_log))
        .await;
    if let Err(error) = result {
        eprintln!("{}", sandbox.diagnostics());
        drop(sandbox);
        panic!("{error:#}");
    }
    let teardown = Instant::now();
    drop(sandbox);
    eprintln!(
        "sandbox torn down in {:.1?}; whole test {:.1?}",
        teardown.elapsed(),
        started.elapsed()
    );
}

/// The API server, the controller with the real guest, and what the steps share. Lives
/// on the thread inside the sandbox's namespace.
struct Bed {
    server: TestApiServer,
    client: Client,
    namespace: String,
    api: Api<BenchCluster>,
    uri: String,
    image_volume: String,
    dir: PathBuf,
    ctx: Arc<Context<Libvirt, SshGuest>>,
    credentials: Credentials,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bed {
    async fn start(uri: String, image_volume: String, dir: PathBuf) -> anyhow::Result<Bed> {
        let server = TestApiServer::start().await?;
        server.install_crd().await?;
        let client = server.client().await?;
        let namespace = create_namespace(&client, "e2e").await?;
        let credentials = vm_support::client_credentials()?;
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
        let guest = SshGuest::new(SshConfig {
            // In the sandbox's temporary directory, removed with it.
            state_dir: dir.join("controller-ssh"),
            kubeadm_timeout: KUBEADM_TIMEOUT,
            command_timeout: COMMAND_TIMEOUT,
            ..SshConfig::default()
        });
        let ctx: Arc<Context<Libvirt, SshGuest>> = Arc::new(Context::new(
            client.clone(),
            hypervisor,
            guest,
            vm_support::settings(),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run_ctx = Arc::clone(&ctx);
        let watched = namespace.clone();
        let task = tokio::spawn(async move {
            reconcile::run(run_ctx, Some(&watched), async move {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Bed {
            api: Api::namespaced(client.clone(), &namespace),
            server,
            client,
            namespace,
            uri,
            image_volume,
            dir,
            ctx,
            credentials,
            stop: Some(stop),
            task,
        })
    }

    async fn stop_controller(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        self.task.abort();
    }

    fn benchcluster(&self, workers: i32) -> anyhow::Result<BenchCluster> {
        let image = json!({"volume": self.image_volume, "firmware": "bios"});
        Ok(serde_json::from_value(json!({
            "apiVersion": "benchcluster.dev/v1alpha1",
            "kind": "BenchCluster",
            "metadata": {"name": NAME, "namespace": self.namespace},
            "spec": {
                "controlPlane": {"cpus": CONTROL_PLANE_CPUS, "memory": CONTROL_PLANE_MEMORY,
                                  "disk": DISK, "image": image},
                "workers": {"replicas": workers, "cpus": WORKER_CPUS, "memory": WORKER_MEMORY,
                            "disk": DISK, "image": image},
                "network": {"name": NETWORK},
                "ssh": {"user": USER, "keySecret": {"name": SSH_SECRET}}
            }
        }))?)
    }

    /// Edits `spec.workers.replicas`, as `kubectl edit` or `kubectl scale` would.
    async fn scale(&self, workers: i32) -> anyhow::Result<()> {
        let patch = json!({"spec": {"workers": {"replicas": workers}}});
        self.api
            .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("setting replicas to {workers}"))?;
        Ok(())
    }

    /// Waits for Ready at the current generation with `workers` workers in status.
    async fn wait_ready(
        &self,
        what: &str,
        workers: usize,
        deadline: Duration,
    ) -> anyhow::Result<BenchCluster> {
        let last: Mutex<Option<String>> = Mutex::new(None);
        let last_ref = &last;
        let result = wait::until(what, deadline, POLL, move || {
            let api = self.api.clone();
            async move {
                let bc = api.get(NAME).await?;
                let line = summary(&bc);
                let mut seen = last_ref.lock().unwrap_or_else(PoisonError::into_inner);
                if seen.as_deref() != Some(line.as_str()) {
                    eprintln!("  [{}] {line}", wait::clock());
                    *seen = Some(line);
                }
                let status = bc.status_or_default();
                let done = is_ready(&bc)
                    && status.nodes.len() == 1 + workers
                    && status.ready_workers == i32::try_from(workers)?;
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
    /// to a 0600 file in the sandbox's directory.
    async fn guest_kubeconfig(&self, bc: &BenchCluster) -> anyhow::Result<PathBuf> {
        let status = bc.status_or_default();
        let name = status
            .kubeconfig_secret
            .context("status names no kubeconfig Secret")?;
        ensure!(
            name == format!("{NAME}-kubeconfig"),
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

    /// `kubectl --kubeconfig <guest> args...` from inside the namespace; stdout.
    async fn guest_kubectl(&self, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
        let mut command = tokio::process::Command::new(self.server.bin_dir().join("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .env_remove("KUBECONFIG");
        sandbox::output(command, KUBECTL_DEADLINE).await
    }

    /// Node name -> Ready, as `kubectl get nodes -o json` reports them.
    async fn guest_nodes(&self, kubeconfig: &Path) -> anyhow::Result<BTreeMap<String, bool>> {
        let text = self
            .guest_kubectl(kubeconfig, &["get", "nodes", "-o", "json"])
            .await?;
        let list: serde_json::Value = serde_json::from_str(&text)?;
        let items = list["items"].as_array().context("no items")?;
        Ok(items
            .iter()
            .filter_map(|node| {
                let name = node["metadata"]["name"].as_str()?.to_owned();
                let ready = node["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                Some((name, ready))
            })
            .collect())
    }

    /// Checks with kubectl that exactly `expected` Nodes exist, all Ready, and prints
    /// `kubectl get nodes -o wide`.
    async fn check_guest_nodes(
        &self,
        bc: &BenchCluster,
        expected: &[String],
    ) -> anyhow::Result<()> {
        let kubeconfig = self.guest_kubeconfig(bc).await?;
        let nodes = self.guest_nodes(&kubeconfig).await?;
        let want: BTreeMap<String, bool> = expected.iter().map(|n| (n.clone(), true)).collect();
        ensure!(
            nodes == want,
            "kubectl get nodes: {nodes:?}, want {want:?} (name -> Ready)"
        );
        let wide = self
            .guest_kubectl(&kubeconfig, &["get", "nodes", "-o", "wide"])
            .await?;
        eprintln!("{}", indent(&wide));
        Ok(())
    }

    /// Names of this BenchCluster's domains (defined or running), by libvirt.
    async fn domains(&self) -> anyhow::Result<Vec<String>> {
        let prefix = format!("{}-{NAME}-", self.namespace);
        Ok(
            names(&virsh(&self.uri, &["list", "--all", "--name"]).await?)
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect(),
        )
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs inside the sandbox's namespace.
async fn scenario(
    uri: String,
    image_volume: String,
    dir: PathBuf,
    log: LogCapture,
) -> anyhow::Result<()> {
    let mut bed = Bed::start(uri, image_volume, dir).await?;
    let result = steps(&bed, &log).await;
    if let Err(error) = &result {
        eprintln!("failed: {error:#}");
        if let Ok(bc) = bed.api.get(NAME).await {
            eprintln!(
                "last status:\n{}",
                serde_yaml::to_string(&bc.status).unwrap_or_default()
            );
        }
    }
    bed.stop_controller().await;
    if result.is_err() {
        bed.server.dump_logs();
    }
    result
}

async fn steps(bed: &Bed, log: &LogCapture) -> anyhow::Result<()> {
    let cp = format!("{NAME}-cp-0");
    let w = |i: u32| format!("{NAME}-w-{i}");
    let mut report = Vec::new();

    // 1. 1 + 1 forms: the control plane is initialised, the worker joins, both Ready.
    let step = Instant::now();
    bed.api
        .create(&PostParams::default(), &bed.benchcluster(1)?)
        .await
        .context("creating the BenchCluster")?;
    let bc = bed.wait_ready("1+1 to be Ready", 1, FORM_DEADLINE).await?;
    let formed = step.elapsed();
    eprintln!("step 1: 1+1 Ready in {formed:.1?}");
    print_timings(&bc);
    let overhead = bed.overhead(&bc, formed).await?;
    bed.check_guest_nodes(&bc, &[cp.clone(), w(0)]).await?;
    report.push(("time to Ready, 1+1", formed));

    // 2. The guest API goes silent for longer than any poll or backoff: waited for.
    let step = Instant::now();
    let (outage, recovered) = bed.silent_api(&bc, &cp).await?;
    eprintln!(
        "step 2: API silent for {outage:.1?} in status, Ready again {recovered:.1?} after it answered \
         (step {:.1?})",
        step.elapsed()
    );
    report.push(("API outage (in status)", outage));
    report.push(("Ready after the API", recovered));

    // 2b. The worker's Node deleted behind the controller's back: its join completed
    // into this cluster, so its kubelet registers it again; nothing is reset.
    let step = Instant::now();
    let bc = bed.api.get(NAME).await?;
    let kubeconfig = bed.guest_kubeconfig(&bc).await?;
    let before = bed.node_uids(&kubeconfig).await?;
    let domains = bed.domains().await?;
    bed.guest_kubectl(&kubeconfig, &["delete", "node", &w(0)])
        .await?;
    let reregistered = wait::until(
        "the deleted Node registered again",
        SCALE_UP_DEADLINE,
        POLL,
        || async {
            let uids = bed.node_uids(&kubeconfig).await?;
            Ok::<_, anyhow::Error>(
                uids.get(&w(0))
                    .is_some_and(|uid| Some(uid) != before.get(&w(0)))
                    .then_some(uids),
            )
        },
    )
    .await?;
    bed.wait_ready("Ready with the Node back", 1, SCALE_UP_DEADLINE)
        .await?;
    let back = step.elapsed();
    eprintln!(
        "step 2b: {} deleted, registered again and Ready in {back:.1?}",
        w(0)
    );
    ensure!(
        reregistered.get(&cp) == before.get(&cp),
        "the control plane's Node changed: {before:?} -> {reregistered:?}"
    );
    ensure!(bed.domains().await? == domains, "the VMs changed");
    // The controller restarts the kubelet unless the kubelet re-registered by itself
    // before the controller's join step looked; at most once either way.
    let restarts = log.count(&["restarting kubelet to register it again", &w(0)]);
    ensure!(
        restarts <= 1,
        "kubelet restarted {restarts} times:\n{}",
        log.matching(&w(0))
    );
    eprintln!("  kubelet restarted by the controller: {restarts} time(s)");
    report.push(("deleted Node back", back));

    // 3. replicas 1 -> 2: one more VM, joined, Ready; its first join token deleted.
    let step = Instant::now();
    let kubeconfig = bed.guest_kubeconfig(&bc).await?;
    let tokens = TokenThief::start(&kubeconfig).await?;
    bed.scale(2).await?;
    let bc = bed
        .wait_ready("1+2 to be Ready", 2, SCALE_UP_DEADLINE)
        .await?;
    let grown = step.elapsed();
    let (minted, stolen) = tokens.stop();
    eprintln!(
        "step 3: 1+2 Ready in {grown:.1?}; join tokens minted {minted}, deleted by the test {stolen}"
    );
    ensure!(stolen == 1, "the test deleted {stolen} join tokens, want 1");
    ensure!(
        minted >= 2,
        "only {minted} join token(s) minted: the deleted one was not replaced"
    );
    ensure!(
        log.count(&["started", "operation=\"kubeadm join\""]) >= 3,
        "the deleted token's join was not followed by a fresh one:\n{}",
        log.matching("kubeadm join")
    );
    print_timings(&bc);
    bed.check_guest_nodes(&bc, &[cp.clone(), w(0), w(1)])
        .await?;
    ensure!(
        bed.domains().await?.len() == 3,
        "domains: {:?}",
        bed.domains().await?
    );
    report.push(("+1 worker (token deleted)", grown));

    // 4. replicas 2 -> 1: the highest index is drained, its Node deleted, its VM gone.
    let step = Instant::now();
    bed.scale(1).await?;
    let bc = bed
        .wait_ready("1+1 after scaling down", 1, SCALE_DOWN_DEADLINE)
        .await?;
    let shrunk = step.elapsed();
    eprintln!("step 4: back to 1+1 in {shrunk:.1?}");
    ensure!(
        bc.status_or_default().nodes.iter().all(|n| n.name != w(1)),
        "{} still in status",
        w(1)
    );
    bed.check_guest_nodes(&bc, &[cp.clone(), w(0)]).await?;
    let removed = format!("{}-{}", bed.namespace, w(1));
    let domains = bed.domains().await?;
    ensure!(
        !domains.contains(&removed) && domains.len() == 2,
        "{removed} still defined: {domains:?}"
    );
    let left = volumes(&bed.uri, NODE_POOL).await?;
    ensure!(
        !left.iter().any(|v| v.starts_with(&removed)) && left.len() == 4,
        "{removed}'s disks left, or others gone: {left:?}"
    );
    report.push(("-1 worker", shrunk));

    // 5. Deleted: nothing of it remains.
    let step = Instant::now();
    bed.api.delete(NAME, &DeleteParams::default()).await?;
    wait::until(
        "the BenchCluster to be gone",
        DELETE_DEADLINE,
        POLL,
        || async { Ok::<_, anyhow::Error>(bed.api.get_opt(NAME).await?.is_none().then_some(())) },
    )
    .await?;
    let deleted = step.elapsed();
    eprintln!("step 5: deleted in {deleted:.1?}");
    let domains = bed.domains().await?;
    ensure!(domains.is_empty(), "domains left: {domains:?}");
    let left = volumes(&bed.uri, NODE_POOL).await?;
    ensure!(left.is_empty(), "volumes left in {NODE_POOL}: {left:?}");
    let images = volumes(&bed.uri, IMAGE_POOL).await?;
    ensure!(images.len() == 1, "the image pool changed: {images:?}");
    let kubeconfig = format!("{NAME}-kubeconfig");
    ensure!(
        Api::<Secret>::namespaced(bed.client.clone(), &bed.namespace)
            .get_opt(&kubeconfig)
            .await?
            .is_none(),
        "{kubeconfig} left behind"
    );
    report.push(("delete", deleted));

    // Over the whole life: one init, no reset of a node whose kubeadm completed.
    let inits = log.count(&["started", "operation=\"kubeadm init\""]);
    ensure!(
        inits == 1,
        "kubeadm init started {inits} times:\n{}",
        log.matching("kubeadm init")
    );
    ensure!(
        log.count(&["resetting"]) == 0,
        "the controller reset a node:\n{}",
        log.matching("resetting")
    );

    eprintln!("e2e summary (Kubernetes {}):", kubernetes_version());
    for (what, took) in report {
        eprintln!("  {what:<20} {took:>10.1?}");
    }
    eprintln!("  {overhead}");
    Ok(())
}

/// Routes the controller's logs (info and up; `RUST_LOG` overrides) to the test's
/// output and to the returned capture, for the checks at the end.
fn install_log_capture() -> LogCapture {
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

/// A kube client on the guest cluster's admin kubeconfig.
async fn guest_client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let parsed = Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Deletes the first bootstrap token minted after it started, as soon as it appears
/// (a watch on kube-system, well before the worker's kubeadm join can use it), and
/// counts the tokens minted meanwhile.
struct TokenThief {
    minted: Arc<Mutex<BTreeSet<String>>>,
    stolen: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenThief {
    async fn start(kubeconfig: &Path) -> anyhow::Result<TokenThief> {
        let client = guest_client(kubeconfig).await?;
        let secrets: Api<Secret> = Api::namespaced(client, "kube-system");
        let tokens = ListParams::default().fields("type=bootstrap.kubernetes.io/token");
        let existing: BTreeSet<String> = secrets
            .list(&tokens)
            .await
            .context("listing the bootstrap tokens")?
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect();
        let minted = Arc::new(Mutex::new(BTreeSet::new()));
        let stolen = Arc::new(Mutex::new(BTreeSet::new()));
        let (seen, taken) = (Arc::clone(&minted), Arc::clone(&stolen));
        let config = watcher::Config::default().fields("type=bootstrap.kubernetes.io/token");
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(secrets.clone(), config));
            while let Some(event) = events.next().await {
                let (watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) =
                    (match event {
                        Ok(event) => event,
                        Err(error) => {
                            eprintln!("  token watch: {error}");
                            continue;
                        }
                    })
                else {
                    continue;
                };
                let Some(name) = secret.metadata.name else {
                    continue;
                };
                if existing.contains(&name) {
                    continue;
                }
                let first = {
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    seen.insert(name.clone()) && seen.len() == 1
                };
                if first {
                    match secrets.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            eprintln!("  [{}] deleted the new join token {name}", wait::clock());
                            taken
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(name);
                        }
                        Err(error) => eprintln!("  deleting {name}: {error}"),
                    }
                }
            }
        });
        Ok(TokenThief {
            minted,
            stolen,
            task,
        })
    }

    /// Tokens minted and tokens deleted since the start.
    fn stop(self) -> (usize, usize) {
        self.task.abort();
        let count = |set: &Mutex<BTreeSet<String>>| {
            set.lock().unwrap_or_else(PoisonError::into_inner).len()
        };
        (count(&self.minted), count(&self.stolen))
    }
}

impl Bed {
    /// How to reach a node of the BenchCluster over SSH: its IP from status, the host
    /// key pinned in its domain.
    async fn guest_node(&self, bc: &BenchCluster, node: &str) -> anyhow::Result<GuestNode> {
        let status = bc.status_or_default();
        let ip = status
            .nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.ip.as_deref())
            .with_context(|| format!("no IP of {node} in status"))?
            .parse()?;
        let domain = format!("{}-{node}", self.namespace);
        let host_key = self
            .ctx
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

    /// Node name -> uid in the guest cluster.
    async fn node_uids(&self, kubeconfig: &Path) -> anyhow::Result<BTreeMap<String, String>> {
        let text = self
            .guest_kubectl(kubeconfig, &["get", "nodes", "-o", "json"])
            .await?;
        let list: serde_json::Value = serde_json::from_str(&text)?;
        Ok(list["items"]
            .as_array()
            .context("no items")?
            .iter()
            .filter_map(|node| {
                let meta = &node["metadata"];
                Some((
                    meta["name"].as_str()?.to_owned(),
                    meta["uid"].as_str()?.to_owned(),
                ))
            })
            .collect())
    }

    /// Stops kube-apiserver's static pod on the control plane for [`OUTAGE`] past the
    /// moment the status shows the outage, checking all along that the cluster is not
    /// called Ready, then starts it again and waits for Ready. The Nodes keep their
    /// uids (a reset and init would make new ones). Returns how long the outage showed
    /// in status, and how long Ready took once the manifest was back.
    async fn silent_api(
        &self,
        bc: &BenchCluster,
        cp: &str,
    ) -> anyhow::Result<(Duration, Duration)> {
        let kubeconfig = self.guest_kubeconfig(bc).await?;
        let uids = self.node_uids(&kubeconfig).await?;
        let node = self.guest_node(bc, cp).await?;
        let mv = |from: &'static str, to: &'static str| {
            let node = node.clone();
            async move {
                self.ctx
                    .guest
                    .exec(&node, &self.credentials, &["sudo", "-n", "mv", from, to])
                    .await
                    .with_context(|| format!("mv {from} {to} on {}", node.name))
            }
        };
        mv(API_SERVER_MANIFEST, PARKED_MANIFEST).await?;
        let reason = |bc: &BenchCluster| {
            bc.status_or_default()
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| (c.reason.clone(), c.message.clone()))
                .unwrap_or_default()
        };
        let silent = wait::until(
            "the silent API in the Ready condition",
            OUTAGE_SEEN_DEADLINE,
            POLL,
            || async {
                let bc = self.api.get(NAME).await?;
                Ok::<_, anyhow::Error>((reason(&bc).0 == "GuestApiUnreachable").then_some(bc))
            },
        )
        .await;
        let silent = match silent {
            Ok(bc) => bc,
            Err(error) => {
                mv(PARKED_MANIFEST, API_SERVER_MANIFEST).await?;
                return Err(error);
            }
        };
        let seen = Instant::now();
        let (_, message) = reason(&silent);
        eprintln!("  [{}] Ready condition: {message}", wait::clock());
        let control_plane = silent
            .status_or_default()
            .conditions
            .iter()
            .find(|c| c.type_ == "ControlPlaneReady")
            .map(|c| c.reason.clone());
        let mut observed = Ok(());
        if !message.contains("unreachable since ") {
            observed = Err(anyhow::anyhow!(
                "the message does not say since when: {message}"
            ));
        } else if control_plane.as_deref() != Some("GuestApiUnreachable") {
            observed = Err(anyhow::anyhow!(
                "ControlPlaneReady reason {control_plane:?}"
            ));
        }
        // The window: the status is read at every poll, and never Ready.
        while observed.is_ok() && seen.elapsed() < OUTAGE {
            let bc = self.api.get(NAME).await?;
            if is_ready(&bc) {
                observed = Err(anyhow::anyhow!(
                    "Ready while the API was stopped: {}",
                    summary(&bc)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        let outage = seen.elapsed();
        mv(PARKED_MANIFEST, API_SERVER_MANIFEST).await?;
        observed?;
        let back = Instant::now();
        self.wait_ready("Ready after the API answers again", 1, RECOVERY_DEADLINE)
            .await?;
        let recovered = back.elapsed();
        let after = self.node_uids(&kubeconfig).await?;
        ensure!(after == uids, "Node uids changed: {uids:?} -> {after:?}");
        Ok((outage, recovered))
    }
}

/// The controller's share of the time to Ready of 1 + 1: the time to Ready minus the
/// guests' own work on the critical path. A guest's boot is measured in the guest
/// (kernel start to sshd active, from systemd); kubeadm init and join are the SSH
/// commands' durations; Node readiness after kubeadm as the controller saw it (so its
/// polling counts as guest time, up to one poll interval). Firmware and boot loader are
/// measured from qemu's start to the guest kernel's (`Bed::firmware`). What is left is
/// defining, waiting between steps (DHCP and SSH probe spacing) and writing status.
struct Overhead {
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
        let keys: BTreeMap<String, String> = self
            .ctx
            .hypervisor
            .inventory(&[])
            .await?
            .domains_with_prefix(&format!("{}-{NAME}-", self.namespace))
            .into_iter()
            .filter_map(|d| Some((d.name, d.owner.host_key?)))
            .collect();
        let ms = |v: Option<u64>, what: &str, node: &str| {
            v.map(Duration::from_millis)
                .with_context(|| format!("no {what} timing for {node} in status"))
        };
        let mut control_plane = None;
        let mut worker = None;
        for node in &status.nodes {
            let domain = format!("{}-{}", self.namespace, node.name);
            let guest = GuestNode {
                name: node.name.clone(),
                ip: node.ip.as_deref().context("no IP in status")?.parse()?,
                host_key: keys
                    .get(&domain)
                    .with_context(|| format!("no pinned host key on {domain}"))?
                    .clone(),
            };
            let usec = self
                .ctx
                .guest
                .exec(
                    &guest,
                    &self.credentials,
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
            ) + self.firmware(&guest, &domain).await?;
            let t = &node.timings;
            let ready = ms(t.ready_ms, "ready", &node.name)?;
            if node.name.contains("-cp-") {
                control_plane = Some((boot, ms(t.init_ms, "init", &node.name)?, ready));
            } else {
                worker = Some((boot, ms(t.join_ms, "join", &node.name)?, ready));
            }
        }
        let (cp_boot, init, cp_ready) = control_plane.context("no control plane in status")?;
        let (w_boot, join, w_ready) = worker.context("no worker in status")?;
        let initialised = cp_boot + init;
        let guests = (initialised + cp_ready).max(w_boot.max(initialised) + join + w_ready);
        Ok(Overhead { ready, guests })
    }
}

impl Bed {
    /// Firmware and boot loader: from qemu's start (the process libvirt spawned for
    /// the domain, from its pid file and /proc) to the guest kernel's, which is the
    /// host's uptime less the guest's, read together over SSH. Both clocks are the
    /// host's (TCG's virtual clock follows it), at the kernel's tick resolution.
    async fn firmware(&self, guest: &GuestNode, domain: &str) -> anyhow::Result<Duration> {
        let pid_file = self
            .dir
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
        let guest_uptime = self
            .ctx
            .guest
            .exec(guest, &self.credentials, &["cat", "/proc/uptime"])
            .await?;
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
fn print_timings(bc: &BenchCluster) {
    let status = bc.status_or_default();
    eprintln!(
        "  {:<12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "node", "define", "boot", "lease", "ssh", "init", "join", "ready"
    );
    for node in &status.nodes {
        eprintln!("  {:<12} {}", node.name, timing_row(&node.timings));
    }
    if let Some(last) = &status.last_provisioning {
        eprintln!("  {:<12} {}", "(slowest)", timing_row(last));
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
    let text = include_str!("../versions.env");
    text.lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .unwrap_or("?")
        .trim()
        .to_owned()
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
