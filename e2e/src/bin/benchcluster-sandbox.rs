//! `benchcluster-sandbox`: the long-lived process behind `cargo xtask up`.
//!
//! It brings up, on this machine, what a user of benchcluster has on a libvirt host:
//!
//! - a [`Sandbox`]: libvirtd, the `scheduler_benchmark_net` network and the storage
//!   pools in a network namespace of its own (`--netns`), with the e2e image in the
//!   image pool under the names the BenchCluster asks for (`--volume`);
//! - inside that namespace, a kube-apiserver + etcd (the management cluster), the CRD,
//!   the SSH key Secret the BenchCluster names (`--ssh-secret`), and the
//!   `benchcluster-controller` binary against the sandbox's libvirtd (restarted with a
//!   backoff if it dies);
//! - a forward from 127.0.0.1 outside the namespace to the management API, so plain
//!   `kubectl` works from the host with `<state-dir>/kubeconfig`;
//! - the manifests given with `--apply` (the BenchCluster `--example` names), applied
//!   once.
//!
//! Then it writes `<state-dir>/env`: what `kubectl` needs from the host, and what a test
//! needs to attach from inside the namespace (`BENCHCLUSTER_*` lines). Then it waits
//! for SIGTERM or SIGINT (`cargo xtask down`), on which it stops the controller and
//! tears everything down: VMs, libvirtd, the namespace and their files. Nothing listens
//! outside loopback; the VMs' network exists only inside the namespace.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use benchcluster_e2e::sandbox::{self, GuestImage, IMAGE_POOL, NODE_POOL, Sandbox, SandboxOptions};
use benchcluster_e2e::{TestApiServer, keys, wait};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// Runs a local benchcluster sandbox until SIGTERM (driven by `cargo xtask up`/`down`).
#[derive(Debug, Parser)]
#[command(name = "benchcluster-sandbox")]
struct Args {
    /// Where the kubeconfig, the logs and the `env` file go (created, mode 0700).
    #[arg(long)]
    state_dir: PathBuf,
    /// The `benchcluster-controller` binary to run.
    #[arg(long)]
    controller: PathBuf,
    /// A manifest to `kubectl apply` once everything is up (repeatable).
    #[arg(long = "apply")]
    manifests: Vec<PathBuf>,
    /// Name of the network namespace.
    #[arg(long, default_value = "benchcluster-up")]
    netns: String,
    /// Names the image gets in the image pool (repeatable) [default: the volumes of the
    /// example BenchCluster].
    #[arg(long = "volume")]
    volumes: Vec<String>,
    /// Namespace and name of the `kubernetes.io/ssh-auth` Secret to create with a fresh
    /// key pair (the example's `spec.ssh.keySecret`).
    #[arg(long, default_value = "default/benchcluster-ssh")]
    ssh_secret: String,
    /// Namespace and name of the BenchCluster the `--apply` manifests create, written to
    /// the env file for tests that attach to it.
    #[arg(long, default_value = "default/example")]
    example: String,
}

/// The example's image volumes: one per role, both the e2e image here.
const DEFAULT_VOLUMES: [&str; 2] = ["benchcluster-master.qcow2", "benchcluster-worker.qcow2"];
/// The login user of the e2e image (and the CRD's default `spec.ssh.user`).
const USER: &str = "bench";
/// Inside the namespace; reach it with `ip netns exec <netns> curl`.
const CONTROLLER_HTTP: &str = "127.0.0.1:8080";
/// `kubeadm init` under software emulation takes minutes, more on a busy host.
const KUBEADM_TIMEOUT_SECONDS: u32 = 45 * 60;
const SSH_COMMAND_TIMEOUT_SECONDS: u32 = 180;
/// vCPUs per host CPU: the e2e cluster (`e2e/cluster.yaml`) peaks at 9 vCPUs, and this
/// machine may have 2 cores; emulated guests idle most of theirs.
const CPU_OVERCOMMIT: &str = "8";
const CONTROLLER_STOP_DEADLINE: Duration = Duration::from_secs(30);
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A controller that ran this long before dying starts again without backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
const APPLY_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => {
            log("stopped; everything torn down");
            ExitCode::SUCCESS
        }
        Err(error) => {
            log(&format!("failed: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

fn log(message: &str) {
    eprintln!("[{}] benchcluster-sandbox: {message}", wait::clock());
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    std::fs::set_permissions(&args.state_dir, std::fs::Permissions::from_mode(0o700))?;
    let state_dir = std::path::absolute(&args.state_dir)?;
    let controller = std::path::absolute(&args.controller)?;
    if !controller.is_file() {
        bail!("--controller {} is not a file", controller.display());
    }
    let (secret_namespace, secret_name) = args
        .ssh_secret
        .split_once('/')
        .context("--ssh-secret wants <namespace>/<name>")?;
    let (secret_namespace, secret_name) = (secret_namespace.to_owned(), secret_name.to_owned());
    if !args.example.contains('/') {
        bail!("--example wants <namespace>/<name>, not {:?}", args.example);
    }
    // Signals are caught from the start, so a `down` during start-up also cleans up.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let image = sandbox::kube_image().await?;
    let volumes = if args.volumes.is_empty() {
        DEFAULT_VOLUMES.iter().map(|v| (*v).to_owned()).collect()
    } else {
        args.volumes.clone()
    };
    let started = Instant::now();
    let sandbox = Sandbox::start(SandboxOptions {
        image: GuestImage::Path(image),
        image_volumes: volumes,
        netns: Some(args.netns.clone()),
    })
    .await?;
    log(&format!(
        "sandbox up in {:.1?}: namespace {}, libvirt {}",
        started.elapsed(),
        sandbox.netns(),
        sandbox.uri()
    ));

    // Bound here, outside the namespace: the management API's address for the host.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("listening on 127.0.0.1 for the management API forward")?;
    listener.set_nonblocking(true)?;
    let inside = Inside {
        state_dir,
        controller,
        manifests: args.manifests.clone(),
        uri: sandbox.uri(),
        netns: sandbox.netns().to_owned(),
        listener,
        secret_namespace,
        secret_name,
        example: args.example.clone(),
    };
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => log("SIGTERM: shutting down"),
            _ = interrupt.recv() => log("SIGINT: shutting down"),
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let result = {
        let work = sandbox.run_inside(move || inside.run(stop_rx));
        tokio::pin!(work);
        tokio::select! {
            result = &mut work => result,
            () = shutdown => {
                let _ = stop_tx.send(());
                work.await
            }
        }
    };
    if let Err(error) = &result {
        log(&format!("{error:#}\n{}", sandbox.diagnostics()));
    }
    let teardown = Instant::now();
    drop(sandbox);
    log(&format!("sandbox torn down in {:.1?}", teardown.elapsed()));
    result
}

/// What runs on the thread inside the namespace.
struct Inside {
    state_dir: PathBuf,
    controller: PathBuf,
    manifests: Vec<PathBuf>,
    uri: String,
    netns: String,
    listener: std::net::TcpListener,
    secret_namespace: String,
    secret_name: String,
    /// `<namespace>/<name>` of the applied BenchCluster.
    example: String,
}

impl Inside {
    async fn run(self, stop: tokio::sync::oneshot::Receiver<()>) -> anyhow::Result<()> {
        let server = TestApiServer::start().await?;
        server.install_crd().await?;
        let client = server.client().await?;
        let credentials = keys::client_credentials(USER, "benchcluster-sandbox")?;
        // A BenchCluster (and so its key Secret) may live outside `default`.
        ensure_namespace(&client, &self.secret_namespace).await?;
        keys::create_ssh_secret(
            &client,
            &self.secret_namespace,
            &self.secret_name,
            &credentials,
        )
        .await?;
        let local = forward_address(server.url())?;
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        let outside = listener.local_addr()?;
        tokio::spawn(forward(listener, local));
        let kubeconfig = self.state_dir.join("kubeconfig");
        let text = std::fs::read_to_string(server.kubeconfig_path())?;
        write_private(
            &kubeconfig,
            &text.replace(server.url(), &format!("https://{outside}")),
        )?;
        log(&format!(
            "management API {} inside, https://{outside} outside ({})",
            server.url(),
            kubeconfig.display()
        ));

        let controller_state = self.state_dir.join("controller");
        std::fs::create_dir_all(&controller_state)?;
        std::fs::set_permissions(&controller_state, std::fs::Permissions::from_mode(0o700))?;
        let controller_log = self.state_dir.join("controller.log");
        let mut command = tokio::process::Command::new(&self.controller);
        command
            .args(["--libvirt-uri", &self.uri])
            .args(["--image-pool", IMAGE_POOL, "--node-pool", NODE_POOL])
            .args(["--domain-type", "qemu", "--http-addr", CONTROLLER_HTTP])
            .args(["--cpu-overcommit", CPU_OVERCOMMIT])
            .arg("--state-dir")
            .arg(&controller_state)
            .args([
                format!("--kubeadm-timeout-seconds={KUBEADM_TIMEOUT_SECONDS}"),
                format!("--ssh-command-timeout-seconds={SSH_COMMAND_TIMEOUT_SECONDS}"),
            ])
            .env("KUBECONFIG", server.kubeconfig_path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let mut controller = Controller::new(command, controller_log.clone());
        controller.start()?;

        for manifest in &self.manifests {
            let mut apply = tokio::process::Command::from(server.kubectl(&["apply", "-f"]));
            apply.arg(manifest).kill_on_drop(true);
            let output = tokio::time::timeout(APPLY_DEADLINE, apply.output())
                .await
                .with_context(|| format!("kubectl apply -f {} hung", manifest.display()))??;
            if !output.status.success() {
                bail!(
                    "kubectl apply -f {} failed: {}",
                    manifest.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            log(String::from_utf8_lossy(&output.stdout).trim());
        }

        let env = format!(
            "# Written by benchcluster-sandbox: `source` it for kubectl against the sandbox.\n\
             export KUBECONFIG={kubeconfig}\n\
             export PATH={bin}:$PATH\n\
             BENCHCLUSTER_NETNS={netns}\n\
             BENCHCLUSTER_CONTROLLER_LOG={log}\n\
             # For a test attaching from inside the namespace (`cargo xtask test e2e --on-up`).\n\
             BENCHCLUSTER_LIBVIRT_URI={uri}\n\
             BENCHCLUSTER_INSIDE_KUBECONFIG={inside}\n\
             BENCHCLUSTER_SSH_SECRET={secret_namespace}/{secret_name}\n\
             BENCHCLUSTER_K8S_BIN={bin}\n\
             BENCHCLUSTER_EXAMPLE={example}\n",
            kubeconfig = kubeconfig.display(),
            bin = server.bin_dir().display(),
            netns = self.netns,
            log = controller_log.display(),
            uri = self.uri,
            inside = server.kubeconfig_path().display(),
            secret_namespace = self.secret_namespace,
            secret_name = self.secret_name,
            example = self.example,
        );
        write_private(&self.state_dir.join("env"), &env)?;
        log("ready");

        controller.supervise(stop).await;
        Ok(())
    }
}

/// The controller process, restarted with a backoff when it dies.
struct Controller {
    command: tokio::process::Command,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    started: Instant,
    backoff: Duration,
}

impl Controller {
    fn new(command: tokio::process::Command, log: PathBuf) -> Self {
        Self {
            command,
            log,
            child: None,
            started: Instant::now(),
            backoff: Duration::from_secs(1),
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = out.try_clone()?;
        self.command.stdout(out).stderr(err);
        let child = self.command.spawn().context("starting the controller")?;
        log(&format!(
            "controller started (pid {}), logging to {}",
            child.id().unwrap_or_default(),
            self.log.display()
        ));
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// Keeps the controller running until `stop`, then stops it with SIGTERM (SIGKILL
    /// after a deadline).
    async fn supervise(&mut self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        loop {
            let exited = match self.child.as_mut() {
                Some(child) => tokio::select! {
                    status = child.wait() => Some(status),
                    _ = &mut stop => None,
                },
                None => tokio::select! {
                    () = tokio::time::sleep(self.backoff) => {
                        if let Err(error) = self.start() {
                            log(&format!("{error:#}"));
                        }
                        continue;
                    }
                    _ = &mut stop => None,
                },
            };
            let Some(status) = exited else {
                self.stop().await;
                return;
            };
            self.child = None;
            self.backoff = if self.started.elapsed() > HEALTHY_RUN {
                Duration::from_secs(1)
            } else {
                (self.backoff * 2).min(RESTART_BACKOFF_CAP)
            };
            log(&format!(
                "the controller exited ({}); restarting in {:?} (see {})",
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                self.backoff,
                self.log.display()
            ));
        }
    }

    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::time::timeout(CONTROLLER_STOP_DEADLINE, child.wait()).await {
            Ok(status) => log(&format!("controller stopped ({status:?})")),
            Err(_) => {
                log("controller still running after SIGTERM; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

/// Creates `namespace` unless it exists (server-side apply, so a second run is a no-op).
async fn ensure_namespace(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, Patch, PatchParams};
    let object = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace},
    });
    Api::<Namespace>::all(client.clone())
        .patch(
            namespace,
            &PatchParams::apply("benchcluster-sandbox"),
            &Patch::Apply(&object),
        )
        .await
        .with_context(|| format!("creating the namespace {namespace}"))?;
    Ok(())
}

/// `https://127.0.0.1:<port>` -> `127.0.0.1:<port>`.
fn forward_address(url: &str) -> anyhow::Result<SocketAddr> {
    url.strip_prefix("https://")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("the API server's URL {url} is not https://<ip>:<port>"))
}

/// Accepts on `listener` (bound outside the namespace) and connects each connection to
/// `target` from inside it.
async fn forward(listener: tokio::net::TcpListener, target: SocketAddr) {
    loop {
        let mut inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                log(&format!("management API forward: accept: {error}"));
                continue;
            }
        };
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(target).await {
                Ok(mut outbound) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Err(error) => log(&format!("management API forward: {target}: {error}")),
            }
        });
    }
}

/// Writes `text` to `path`, readable by its owner only (kubeconfigs name key files).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
