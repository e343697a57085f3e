//! The real guest: OpenSSH to the VMs (through the `openssh` crate, which drives the
//! system's `ssh` client) and a kube client on the guest cluster's admin kubeconfig.
//!
//! - Host keys are pinned: each connection uses a known_hosts file holding only the key
//!   the controller generated for that VM, with strict checking. An unknown or different
//!   key refuses the connection before any command runs.
//! - Commands are argv: the `openssh` crate quotes every argument for the remote shell,
//!   and no argument is built by pasting user fields into a command line. Files (kubeadm
//!   configurations) travel on stdin, never in argv.
//! - Secrets (the private key, join tokens, kubeconfigs) are written only to files mode
//!   0600 under the state directory or inside the guest, and never logged: command
//!   output shown to users is trimmed and has bootstrap tokens redacted.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use parking_lot::{Mutex, MutexGuard};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::{
    AdminKubeconfig, CORDONED_FOR_REMOVAL, ClusterNode, Credentials, Guest, GuestError, GuestNode,
    InitConfig, Result, Sensitive,
};

const INIT_CONFIG: &str = "/etc/benchcluster/kubeadm-init.yaml";
const JOIN_CONFIG: &str = "/etc/benchcluster/kubeadm-join.yaml";
const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
/// The cluster CA a joined node trusts (written by kubeadm).
const NODE_CA: &str = "/etc/kubernetes/pki/ca.crt";
/// Files kubeadm writes from its first phases on (certificates, kubeconfigs, the
/// kubelet's configuration); a clean image has none of them.
const KUBEADM_STATE: [&str; 5] = [
    NODE_CA,
    ADMIN_CONF,
    KUBELET_CONF,
    "/etc/kubernetes/bootstrap-kubelet.conf",
    "/var/lib/kubelet/config.yaml",
];
/// Completion markers, written by the controller right after `kubeadm init` or `kubeadm
/// join` returned success (kubeadm leaves no such record itself). They tell an init or
/// join that completed, which is never reset, from one that died half-way, which is.
const INIT_DONE: &str = "/var/lib/benchcluster/kubeadm-init.done";
const JOIN_DONE: &str = "/var/lib/benchcluster/kubeadm-join.done";
/// Every kubeadm that changes a node's state runs under this lock (`flock`, util-linux):
/// a kubeadm left running by an earlier attempt whose SSH session was cut holds it, so
/// no reset or second init can run beside it.
const KUBEADM_LOCK: &str = "/run/benchcluster-kubeadm.lock";
/// Exit status `flock` returns when the lock is held.
const LOCK_BUSY_EXIT: i32 = 75;
/// How often a registration is polled while a kubelet registers its Node.
const REGISTRATION_POLL: Duration = Duration::from_secs(2);
const CRI_SOCKET: &str = "unix:///run/containerd/containerd.sock";
/// kubeadm init phases not run: the kube-proxy and CoreDNS addons.
const SKIPPED_INIT_PHASES: [&str; 2] = ["addon/coredns", "addon/kube-proxy"];
/// Lines of failing command output kept for conditions and events.
const OUTPUT_TAIL_LINES: usize = 12;

/// Timeouts and places of the SSH guest.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Private key files, known_hosts files and ssh control sockets (mode 0700).
    pub state_dir: PathBuf,
    /// `user@host` to reach the VMs through, when they sit on a network only the
    /// hypervisor host can reach (`qemu+ssh://` setups).
    pub jump_host: Option<String>,
    pub connect_timeout: Duration,
    /// Bound of short commands (probes, file writes, token minting).
    pub command_timeout: Duration,
    /// Bound of `kubeadm init` and `kubeadm join` (slow under software emulation).
    pub kubeadm_timeout: Duration,
    /// Bound of one request to the guest cluster's API (its client's read timeout).
    /// Kept short: when the control-plane VM is gone (deleted, destroyed), a pooled
    /// connection to it gets no answer and no reset, and only this ends the request.
    pub api_timeout: Duration,
    /// How long a drain may wait for evicted pods before the Node is deleted anyway.
    pub drain_timeout: Duration,
    /// How long a kubelet may take to register its Node after kubeadm returned (or
    /// after it was restarted to register a deleted Node again).
    pub registration_timeout: Duration,
    /// Lifetime of a join token; minted just before each join.
    pub join_token_ttl: Duration,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/benchcluster"),
            jump_host: None,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
            kubeadm_timeout: Duration::from_secs(900),
            api_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(120),
            registration_timeout: Duration::from_secs(300),
            join_token_ttl: Duration::from_secs(600),
        }
    }
}

/// The guest side over SSH and the guest cluster's API.
pub struct SshGuest {
    config: SshConfig,
    clients: Mutex<HashMap<[u8; 32], Client>>,
}

impl SshGuest {
    pub fn new(config: SshConfig) -> Self {
        Self {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.config.state_dir.join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| local_error("create state directory", &e))?;
        Ok(dir)
    }

    /// Writes the private key to a 0600 file named by its hash (written once).
    fn key_file(&self, credentials: &Credentials) -> Result<PathBuf> {
        let digest = Sha256::digest(credentials.private_key.expose().as_bytes());
        let path = self.dir("keys")?.join(hex(&digest[..12]));
        let mut key = credentials.private_key.expose().to_owned();
        if !key.ends_with('\n') {
            key.push('\n'); // ssh refuses a key without its final newline
        }
        write_once(&path, key.as_bytes())?;
        Ok(path)
    }

    /// An ssh_config pinning exactly the node's host key.
    ///
    /// Both files are named by the node and a hash of their content, and never
    /// rewritten: connections to one node run concurrently (two workers joining both
    /// mint a token on the control plane), and one pinning another key (a recreated
    /// VM, a stale pass) must not swap the file under another's feet.
    fn ssh_config(&self, node: &GuestNode, key: &Path) -> Result<PathBuf> {
        let pinned = format!("{} {}\n", node.name, node.host_key);
        let known_hosts = self
            .dir("known_hosts")?
            .join(content_named(&node.name, &pinned));
        write_once(&known_hosts, pinned.as_bytes())?;
        let text = format!(
            "Host *\n  HostKeyAlias {alias}\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  \
             StrictHostKeyChecking yes\n  CheckHostIP no\n  UpdateHostKeys no\n  HostKeyAlgorithms ssh-ed25519\n  \
             IdentityFile {key}\n  IdentitiesOnly yes\n  PasswordAuthentication no\n  \
             KbdInteractiveAuthentication no\n  BatchMode yes\n  LogLevel ERROR\n  ServerAliveInterval 15\n",
            alias = node.name,
            kh = known_hosts.display(),
            key = key.display(),
        );
        let config = self
            .dir("ssh_config")?
            .join(content_named(&node.name, &text));
        write_once(&config, text.as_bytes())?;
        Ok(config)
    }

    async fn connect(&self, node: &GuestNode, credentials: &Credentials) -> Result<Session> {
        let key = self.key_file(credentials)?;
        let config = self.ssh_config(node, &key)?;
        let mut builder = SessionBuilder::default();
        builder
            .user(credentials.user.clone())
            .config_file(&config)
            .keyfile(&key)
            .known_hosts_check(KnownHosts::Strict)
            .connect_timeout(self.config.connect_timeout)
            .control_directory(self.dir("control")?);
        if let Some(jump) = &self.config.jump_host {
            builder.jump_hosts([jump]);
        }
        let bound = self.config.connect_timeout + Duration::from_secs(5);
        match tokio::time::timeout(bound, builder.connect(node.ip.to_string())).await {
            Err(_) => Err(GuestError::Unreachable {
                node: node.name.clone(),
                reason: format!("no SSH session within {}s", bound.as_secs()),
            }),
            Ok(Ok(session)) => Ok(session),
            Ok(Err(error)) => Err(classify_connect_error(&node.name, &error)),
        }
    }

    /// Runs one argv command; non-zero exit is an error carrying the redacted output.
    async fn run(
        &self,
        session: &Session,
        node: &GuestNode,
        label: &'static str,
        argv: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output> {
        let output = tokio::time::timeout(timeout, async {
            let Some((program, args)) = argv.split_first() else {
                return Err(local_error("run", &std::io::Error::other("empty argv")));
            };
            let mut command = session.command(*program);
            command.args(args.iter().copied());
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
            command.stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            let mut child = command.spawn().await.map_err(|e| remote_error(node, &e))?;
            if let (Some(input), Some(mut pipe)) = (stdin, child.stdin().take()) {
                pipe.write_all(input)
                    .await
                    .map_err(|e| local_error("write to remote stdin", &e))?;
                pipe.shutdown()
                    .await
                    .map_err(|e| local_error("close remote stdin", &e))?;
            }
            child
                .wait_with_output()
                .await
                .map_err(|e| remote_error(node, &e))
        })
        .await
        .map_err(|_| GuestError::Timeout {
            node: node.name.clone(),
            step: label,
            seconds: timeout.as_secs(),
        })??;
        if output.status.success() {
            Ok(output)
        } else {
            Err(GuestError::CommandFailed {
                node: node.name.clone(),
                command: label,
                exit_code: output.status.code(),
                output: shown_output(&output),
            })
        }
    }

    /// Whether a command succeeds (exit 0), for checks like `test -f`.
    async fn succeeds(
        &self,
        session: &Session,
        node: &GuestNode,
        label: &'static str,
        argv: &[&str],
    ) -> Result<bool> {
        match self
            .run(
                session,
                node,
                label,
                argv,
                None,
                self.config.command_timeout,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(GuestError::CommandFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes a file inside the guest (mode 0600, root-owned) from stdin.
    async fn put_file(
        &self,
        session: &Session,
        node: &GuestNode,
        path: &str,
        content: &[u8],
    ) -> Result<()> {
        self.run(
            session,
            node,
            "install config file",
            &[
                "sudo",
                "-n",
                "install",
                "-D",
                "-m",
                "0600",
                "/dev/stdin",
                path,
            ],
            Some(content),
            self.config.command_timeout,
        )
        .await
        .map(drop)
    }

    async fn client(&self, kubeconfig: &AdminKubeconfig) -> Result<Client> {
        let digest: [u8; 32] = Sha256::digest(kubeconfig.0.expose().as_bytes()).into();
        if let Some(client) = self.lock_clients().get(&digest) {
            return Ok(client.clone());
        }
        let parsed = Kubeconfig::from_yaml(kubeconfig.0.expose())
            .map_err(|_| GuestError::Api("the stored admin kubeconfig does not parse".into()))?;
        let mut config = Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
            .await
            .map_err(|_| GuestError::Api("the stored admin kubeconfig is unusable".into()))?;
        config.connect_timeout = Some(self.config.connect_timeout);
        config.read_timeout = Some(self.config.api_timeout);
        let client = Client::try_from(config).map_err(|e| GuestError::Api(e.to_string()))?;
        self.lock_clients().insert(digest, client.clone());
        Ok(client)
    }

    /// Maps a failed request to the guest cluster. A failure below HTTP (timeout,
    /// refused or reset connection) also drops the cached client, so the next request
    /// opens a fresh connection instead of waiting on a dead pooled one.
    fn api_error(&self, kubeconfig: &AdminKubeconfig, error: kube::Error) -> GuestError {
        if !matches!(error, kube::Error::Api(_)) {
            let digest: [u8; 32] = Sha256::digest(kubeconfig.0.expose().as_bytes()).into();
            self.lock_clients().remove(&digest);
        }
        GuestError::Api(error.to_string())
    }

    fn lock_clients(&self) -> MutexGuard<'_, HashMap<[u8; 32], Client>> {
        self.clients.lock()
    }
}

impl Guest for SshGuest {
    async fn probe(&self, node: &GuestNode, credentials: &Credentials) -> Result<()> {
        let session = self.connect(node, credentials).await?;
        let result = self
            .run(
                &session,
                node,
                "probe",
                &["true"],
                None,
                self.config.command_timeout,
            )
            .await;
        close(session).await;
        result.map(drop)
    }

    async fn init_control_plane(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
        config: &InitConfig,
    ) -> Result<AdminKubeconfig> {
        let session = self.connect(node, credentials).await?;
        let result = self.init_on(&session, node, config).await;
        close(session).await;
        result
    }

    async fn join_worker(
        &self,
        control_plane: &GuestNode,
        worker: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
    ) -> Result<()> {
        let worker_session = self.connect(worker, credentials).await?;
        let result = self
            .join_on(
                &worker_session,
                control_plane,
                worker,
                credentials,
                kubeconfig,
            )
            .await;
        close(worker_session).await;
        result
    }

    async fn cluster_nodes(&self, kubeconfig: &AdminKubeconfig) -> Result<Vec<ClusterNode>> {
        let client = self.client(kubeconfig).await?;
        let nodes = Api::<Node>::all(client)
            .list(&ListParams::default())
            .await
            .map_err(|e| self.api_error(kubeconfig, e))?;
        Ok(nodes
            .items
            .into_iter()
            .filter_map(|node| {
                let cordoned_for_removal = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
                    && node
                        .metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(CORDONED_FOR_REMOVAL));
                let name = node.metadata.name?;
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                Some(ClusterNode {
                    name,
                    ready,
                    cordoned_for_removal,
                })
            })
            .collect())
    }

    async fn uncordon(&self, kubeconfig: &AdminKubeconfig, node_name: &str) -> Result<()> {
        let client = self.client(kubeconfig).await?;
        let uncordon = serde_json::json!({
            "metadata": {"annotations": {CORDONED_FOR_REMOVAL: null}},
            "spec": {"unschedulable": false},
        });
        match Api::<Node>::all(client)
            .patch(node_name, &PatchParams::default(), &Patch::Merge(&uncordon))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(self.api_error(kubeconfig, e)),
        }
    }

    async fn remove_node(&self, kubeconfig: &AdminKubeconfig, node_name: &str) -> Result<()> {
        let client = self.client(kubeconfig).await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let api_error = |e: kube::Error| self.api_error(kubeconfig, e);
        let cordon = serde_json::json!({
            "metadata": {"annotations": {CORDONED_FOR_REMOVAL: "true"}},
            "spec": {"unschedulable": true},
        });
        match nodes
            .patch(node_name, &PatchParams::default(), &Patch::Merge(&cordon))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(()),
            Err(e) => return Err(api_error(e)),
        }
        drain(&client, node_name, self.config.drain_timeout)
            .await
            .map_err(&api_error)?;
        match nodes.delete(node_name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(api_error(e)),
        }
    }
}

impl SshGuest {
    /// Runs one argv command on a node and returns its standard output. For
    /// diagnostics and tests; the controller's own steps use the trait methods.
    pub async fn exec(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
        argv: &[&str],
    ) -> Result<String> {
        let session = self.connect(node, credentials).await?;
        let result = self
            .run(
                &session,
                node,
                "exec",
                argv,
                None,
                self.config.command_timeout,
            )
            .await;
        close(session).await;
        Ok(String::from_utf8_lossy(&result?.stdout).into_owned())
    }

    async fn init_on(
        &self,
        session: &Session,
        node: &GuestNode,
        config: &InitConfig,
    ) -> Result<AdminKubeconfig> {
        let short = self.config.command_timeout;
        if self
            .exists(session, node, "test init marker", INIT_DONE)
            .await?
        {
            // Initialised once: whatever its API answers now, nothing is reset or
            // initialised again. The Node is registered again only when the API
            // answers without it.
            let kubeconfig = self.read_admin_conf(session, node).await?;
            if matches!(
                self.node_registered(&kubeconfig, &node.name).await,
                Ok(false)
            ) {
                self.register_again(session, node, &kubeconfig).await?;
            }
            return Ok(kubeconfig);
        }
        if self.kubeadm_state_present(session, node).await? {
            // No marker: no init returned success here, unless this controller died
            // right after it did and before it wrote the marker. A serving API tells
            // that case apart; anything else is an init that died half-way (at any
            // phase: certificates, manifests, kubelet), whose files make the next one
            // fail its preflight. An init still running (its session cut) serves an
            // API too, but is neither: it is waited for.
            self.kubeadm_idle(session, node).await?;
            let healthy = self
                .succeeds(
                    session,
                    node,
                    "check API server health",
                    &[
                        "sudo",
                        "-n",
                        "kubectl",
                        "--kubeconfig",
                        ADMIN_CONF,
                        "get",
                        "--raw",
                        "/readyz",
                    ],
                )
                .await?;
            if healthy {
                debug!(node = %node.name, "control plane initialised before its marker was written");
                self.mark(session, node, INIT_DONE).await?;
                return self.read_admin_conf(session, node).await;
            }
            warn!(node = %node.name, "resetting a control plane whose kubeadm init died half-way");
            self.kubeadm(session, node, "kubeadm reset", &["reset", "-f"])
                .await?;
        }
        let version = self
            .run(
                session,
                node,
                "kubeadm version",
                &["kubeadm", "version", "-o", "short"],
                None,
                short,
            )
            .await?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        let document = init_configuration(node, config, &version, self.config.join_token_ttl);
        self.put_file(session, node, INIT_CONFIG, document.as_bytes())
            .await?;
        self.kubeadm(
            session,
            node,
            "kubeadm init",
            &["init", "--config", INIT_CONFIG, "--skip-token-print"],
        )
        .await?;
        self.mark(session, node, INIT_DONE).await?;
        self.read_admin_conf(session, node).await
    }

    /// Runs `kubeadm <args>` as root under [`KUBEADM_LOCK`], bounded by the kubeadm
    /// timeout; a lock held by an earlier kubeadm is [`GuestError::Busy`].
    async fn kubeadm(
        &self,
        session: &Session,
        node: &GuestNode,
        label: &'static str,
        args: &[&str],
    ) -> Result<Output> {
        let mut command = vec!["kubeadm"];
        command.extend_from_slice(args);
        self.run_locked(session, node, label, &command, self.config.kubeadm_timeout)
            .await
    }

    /// `Ok` when no kubeadm holds [`KUBEADM_LOCK`], else [`GuestError::Busy`].
    async fn kubeadm_idle(&self, session: &Session, node: &GuestNode) -> Result<()> {
        self.run_locked(
            session,
            node,
            "check for a running kubeadm",
            &["true"],
            self.config.command_timeout,
        )
        .await
        .map(drop)
    }

    /// Runs `command` as root while holding [`KUBEADM_LOCK`], without waiting for it.
    async fn run_locked(
        &self,
        session: &Session,
        node: &GuestNode,
        label: &'static str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let busy = LOCK_BUSY_EXIT.to_string();
        let mut argv = vec!["sudo", "-n", "flock", "-n", "-E", &busy, KUBEADM_LOCK];
        argv.extend_from_slice(command);
        self.run(session, node, label, &argv, None, timeout)
            .await
            .map_err(|error| busy_if_locked(node, error))
    }

    /// Whether any file kubeadm init or join writes exists on the node: a node without
    /// a completion marker but with one of them is an init or join that died half-way.
    async fn kubeadm_state_present(&self, session: &Session, node: &GuestNode) -> Result<bool> {
        let mut argv = vec!["sudo", "-n", "test"];
        for (i, path) in KUBEADM_STATE.iter().enumerate() {
            if i > 0 {
                argv.push("-o");
            }
            argv.extend(["-e", path]);
        }
        self.succeeds(session, node, "look for kubeadm's files", &argv)
            .await
    }

    /// Whether a file exists on the node (checked as root).
    async fn exists(
        &self,
        session: &Session,
        node: &GuestNode,
        label: &'static str,
        path: &str,
    ) -> Result<bool> {
        self.succeeds(session, node, label, &["sudo", "-n", "test", "-e", path])
            .await
    }

    /// Writes a completion marker (an empty root-owned file).
    async fn mark(&self, session: &Session, node: &GuestNode, marker: &str) -> Result<()> {
        self.run(
            session,
            node,
            "write completion marker",
            &[
                "sudo",
                "-n",
                "install",
                "-D",
                "-m",
                "0644",
                "/dev/null",
                marker,
            ],
            None,
            self.config.command_timeout,
        )
        .await
        .map(drop)
    }

    /// Whether the guest cluster has the Node; an API error is returned as such, never
    /// read as "absent".
    async fn node_registered(&self, kubeconfig: &AdminKubeconfig, name: &str) -> Result<bool> {
        let client = self.client(kubeconfig).await?;
        Api::<Node>::all(client)
            .get_opt(name)
            .await
            .map(|node| node.is_some())
            .map_err(|e| self.api_error(kubeconfig, e))
    }

    /// Waits, bounded, until the node's kubelet has registered its Node. Requests that
    /// fail on the way (a busy API) are retried until the bound.
    async fn await_registration(
        &self,
        node: &GuestNode,
        kubeconfig: &AdminKubeconfig,
    ) -> Result<()> {
        let bound = self.config.registration_timeout;
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            match self.node_registered(kubeconfig, &node.name).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(error) => debug!(node = %node.name, %error, "waiting for the Node"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GuestError::Timeout {
                    node: node.name.clone(),
                    step: "Node registration",
                    seconds: bound.as_secs(),
                });
            }
            tokio::time::sleep(REGISTRATION_POLL).await;
        }
    }

    /// A node whose kubeadm completed, whose Node the answering API lacks (deleted
    /// behind our back): its kubelet registers the Node again when it restarts, with
    /// the credentials it already has. Nothing is reset.
    async fn register_again(
        &self,
        session: &Session,
        node: &GuestNode,
        kubeconfig: &AdminKubeconfig,
    ) -> Result<()> {
        info!(node = %node.name, "Node missing from its cluster: restarting kubelet to register it again");
        self.run(
            session,
            node,
            "restart kubelet",
            &["sudo", "-n", "systemctl", "restart", "kubelet"],
            None,
            self.config.command_timeout,
        )
        .await?;
        self.await_registration(node, kubeconfig).await
    }

    /// Whether the worker trusts the CA of the cluster `kubeconfig` belongs to: a node
    /// that joined an earlier cluster (a control plane rebuilt on a fresh disk) does not.
    async fn trusts_cluster_ca(
        &self,
        session: &Session,
        node: &GuestNode,
        kubeconfig: &AdminKubeconfig,
    ) -> Result<bool> {
        let cluster_ca = cluster_ca(kubeconfig)
            .ok_or_else(|| GuestError::Api("the admin kubeconfig carries no cluster CA".into()))?;
        let output = self
            .run(
                session,
                node,
                "read the node's cluster CA",
                &["sudo", "-n", "cat", NODE_CA],
                None,
                self.config.command_timeout,
            )
            .await;
        match output {
            Ok(output) => Ok(output.stdout.trim_ascii() == cluster_ca.trim_ascii()),
            Err(GuestError::CommandFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn read_admin_conf(
        &self,
        session: &Session,
        node: &GuestNode,
    ) -> Result<AdminKubeconfig> {
        let output = self
            .run(
                session,
                node,
                "read admin.conf",
                &["sudo", "-n", "cat", ADMIN_CONF],
                None,
                self.config.command_timeout,
            )
            .await?;
        let text = String::from_utf8(output.stdout).map_err(|_| GuestError::CommandFailed {
            node: node.name.clone(),
            command: "read admin.conf",
            exit_code: Some(0),
            output: "admin.conf is not UTF-8".into(),
        })?;
        Ok(AdminKubeconfig(Sensitive::new(text)))
    }

    async fn join_on(
        &self,
        worker_session: &Session,
        control_plane: &GuestNode,
        worker: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
    ) -> Result<()> {
        // The planner joins only workers whose Node the answering API lacks.
        let joined = self
            .exists(worker_session, worker, "test join marker", JOIN_DONE)
            .await?;
        // Only a completed join's kubelet.conf matters on its own; without a marker any
        // of kubeadm's files (kubelet.conf among them) means a join that died half-way.
        let kubelet_conf = joined
            && self
                .exists(worker_session, worker, "test kubelet.conf", KUBELET_CONF)
                .await?;
        if kubelet_conf {
            if self
                .trusts_cluster_ca(worker_session, worker, kubeconfig)
                .await?
            {
                // Joined into this very cluster: its Node was deleted or is still on
                // its way. Registering it again is all there is to do.
                if self.node_registered(kubeconfig, &worker.name).await? {
                    return Ok(());
                }
                return self
                    .register_again(worker_session, worker, kubeconfig)
                    .await;
            }
            warn!(node = %worker.name, "resetting a worker joined to an earlier cluster (its CA is not the control plane's)");
        } else if joined {
            warn!(node = %worker.name, "resetting a worker whose kubelet.conf is gone since its join (reset by hand?)");
        }
        let half_joined = !joined && self.kubeadm_state_present(worker_session, worker).await?;
        if half_joined {
            warn!(node = %worker.name, "resetting a worker whose kubeadm join died half-way");
        }
        if joined || half_joined {
            // The marker goes first: a reset cut short must not look like a join done.
            self.run(
                worker_session,
                worker,
                "remove join marker",
                &["sudo", "-n", "rm", "-f", JOIN_DONE],
                None,
                self.config.command_timeout,
            )
            .await?;
            self.kubeadm(worker_session, worker, "kubeadm reset", &["reset", "-f"])
                .await?;
        }
        // Minted just in time, so an expired or deleted token is never reused.
        let ticket = self.mint_join_ticket(control_plane, credentials).await?;
        let document = join_configuration(control_plane, worker, &ticket);
        let result = async {
            self.put_file(
                worker_session,
                worker,
                JOIN_CONFIG,
                document.expose().as_bytes(),
            )
            .await?;
            self.kubeadm(
                worker_session,
                worker,
                "kubeadm join",
                &["join", "--config", JOIN_CONFIG],
            )
            .await?;
            self.mark(worker_session, worker, JOIN_DONE).await
        }
        .await;
        let _ = self
            .run(
                worker_session,
                worker,
                "remove join config",
                &["sudo", "-n", "rm", "-f", JOIN_CONFIG],
                None,
                self.config.command_timeout,
            )
            .await;
        self.revoke(control_plane, credentials, &ticket).await;
        result?;
        self.await_registration(worker, kubeconfig).await
    }

    async fn mint_join_ticket(
        &self,
        control_plane: &GuestNode,
        credentials: &Credentials,
    ) -> Result<JoinTicket> {
        let session = self.connect(control_plane, credentials).await?;
        let ttl = format!("{}s", self.config.join_token_ttl.as_secs());
        let result = self
            .run(
                &session,
                control_plane,
                "kubeadm token create",
                &[
                    "sudo",
                    "-n",
                    "kubeadm",
                    "token",
                    "create",
                    "--ttl",
                    &ttl,
                    "--print-join-command",
                ],
                None,
                self.config.command_timeout,
            )
            .await;
        close(session).await;
        let output = result?;
        parse_join_command(&String::from_utf8_lossy(&output.stdout)).ok_or_else(|| {
            GuestError::CommandFailed {
                node: control_plane.name.clone(),
                command: "kubeadm token create",
                exit_code: Some(0),
                output: "unexpected output (no token and CA hash)".into(),
            }
        })
    }

    /// Deletes a used token; failure only shortens nothing (it expires by itself).
    async fn revoke(
        &self,
        control_plane: &GuestNode,
        credentials: &Credentials,
        ticket: &JoinTicket,
    ) {
        let Ok(session) = self.connect(control_plane, credentials).await else {
            return;
        };
        let token_id = ticket
            .token
            .expose()
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        if let Err(error) = self
            .run(
                &session,
                control_plane,
                "kubeadm token delete",
                &["sudo", "-n", "kubeadm", "token", "delete", &token_id],
                None,
                self.config.command_timeout,
            )
            .await
        {
            debug!(%error, "join token not deleted; it expires by itself");
        }
        close(session).await;
    }
}

/// A freshly minted join credential.
struct JoinTicket {
    endpoint: String,
    token: Sensitive,
    ca_cert_hash: String,
}

/// A command that failed because `flock` found [`KUBEADM_LOCK`] held.
fn busy_if_locked(node: &GuestNode, error: GuestError) -> GuestError {
    match error {
        GuestError::CommandFailed {
            exit_code: Some(LOCK_BUSY_EXIT),
            ..
        } => GuestError::Busy {
            node: node.name.clone(),
        },
        other => other,
    }
}

/// The PEM of the CA the kubeconfig's (first) cluster is verified with.
fn cluster_ca(kubeconfig: &AdminKubeconfig) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let parsed = Kubeconfig::from_yaml(kubeconfig.0.expose()).ok()?;
    let data = parsed
        .clusters
        .into_iter()
        .find_map(|c| c.cluster?.certificate_authority_data)?;
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .ok()
}

/// Parses `kubeadm join <endpoint> --token <t> --discovery-token-ca-cert-hash sha256:<h>`.
fn parse_join_command(text: &str) -> Option<JoinTicket> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("kubeadm join"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let endpoint = (*words.get(2)?).to_owned();
    let after = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .map(|w| (*w).to_owned())
    };
    let token = after("--token")?;
    let ca_cert_hash = after("--discovery-token-ca-cert-hash")?;
    let valid_token = token.len() == 23
        && token.as_bytes()[6] == b'.'
        && token
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 6 || b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid_token || !ca_cert_hash.starts_with("sha256:") || !endpoint.ends_with(":6443") {
        return None;
    }
    Some(JoinTicket {
        endpoint,
        token: Sensitive::new(token),
        ca_cert_hash,
    })
}

/// kubeadm's InitConfiguration + ClusterConfiguration + KubeletConfiguration, as JSON
/// documents (JSON is YAML), so no value can change the document's structure.
fn init_configuration(
    node: &GuestNode,
    config: &InitConfig,
    version: &str,
    token_ttl: Duration,
) -> String {
    let ip = node.ip.to_string();
    let timeouts = serde_json::json!({
        "controlPlaneComponentHealthCheck": "15m0s",
        "kubeletHealthCheck": "15m0s",
        "kubernetesAPICall": "5m0s",
        "tlsBootstrap": "15m0s",
    });
    let init = serde_json::json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "InitConfiguration",
        // The default token lives 24 h; ours only until the first joins are done.
        "bootstrapTokens": [{
            "ttl": format!("{}s", token_ttl.as_secs()),
            "groups": ["system:bootstrappers:kubeadm:default-node-token"],
            "usages": ["signing", "authentication"],
        }],
        "localAPIEndpoint": {"advertiseAddress": ip, "bindPort": 6443},
        // A scheduler benchmark cluster needs neither a service proxy nor cluster DNS,
        // and images carry neither (docs/image-contract.md); Nodes turn Ready without
        // them. kubeadm then also leaves their images out of its preflight pull check.
        "skipPhases": SKIPPED_INIT_PHASES,
        "nodeRegistration": {
            "name": node.name,
            "criSocket": CRI_SOCKET,
            "kubeletExtraArgs": [{"name": "node-ip", "value": ip}],
        },
        "timeouts": timeouts,
    });
    let cluster = serde_json::json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "kubernetesVersion": version,
        "networking": {"podSubnet": config.pod_subnet, "serviceSubnet": config.service_subnet},
        "apiServer": {"certSANs": [ip]},
        // One control-plane node, so no one to elect. With leader election on, a
        // slow control plane (software emulation, a busy host) misses the 5 s lease
        // renewals, and kube-controller-manager and kube-scheduler exit and restart
        // over and over: no podCIDR gets allocated, no Node turns Ready.
        "controllerManager": {"extraArgs": [{"name": "leader-elect", "value": "false"}]},
        "scheduler": {"extraArgs": [{"name": "leader-elect", "value": "false"}]},
    });
    let kubelet = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "systemd",
    });
    format!("{init}\n---\n{cluster}\n---\n{kubelet}\n")
}

fn join_configuration(
    control_plane: &GuestNode,
    worker: &GuestNode,
    ticket: &JoinTicket,
) -> Sensitive {
    let ip = worker.ip.to_string();
    let join = serde_json::json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "JoinConfiguration",
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": ticket.endpoint,
                "token": ticket.token.expose(),
                // Discovery always pins the CA: never unsafeSkipCAVerification.
                "caCertHashes": [ticket.ca_cert_hash],
            },
        },
        "nodeRegistration": {
            "name": worker.name,
            "criSocket": CRI_SOCKET,
            "kubeletExtraArgs": [{"name": "node-ip", "value": ip}],
        },
        "timeouts": {
            // Discovery against a control plane that just minted the token takes
            // seconds; kubeadm retries a token it cannot find (deleted, expired)
            // until this bound, and the next attempt mints a fresh one.
            "discovery": "1m30s",
            "tlsBootstrap": "15m0s",
            "kubernetesAPICall": "5m0s",
        },
    });
    let _ = control_plane;
    Sensitive::new(format!("{join}\n"))
}

/// Evicts every pod but DaemonSet and mirror pods, then waits (bounded) for them to go.
async fn drain(client: &Client, node_name: &str, bound: Duration) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node_name}"));
    let evictable = |pod: &Pod| {
        let daemon = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "DaemonSet");
        let mirror = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        !daemon && !mirror
    };
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let list = pods.list(&on_node).await?;
        let remaining: Vec<&Pod> = list.items.iter().filter(|p| evictable(p)).collect();
        if remaining.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                node = node_name,
                pods = remaining.len(),
                "drain bound reached; deleting the Node anyway"
            );
            return Ok(());
        }
        for pod in remaining {
            let (Some(name), Some(namespace)) = (&pod.metadata.name, &pod.metadata.namespace)
            else {
                continue;
            };
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            // 429 means a PodDisruptionBudget says "not now": the loop retries.
            if let Err(error) = api.evict(name, &EvictParams::default()).await {
                debug!(%error, pod = %name, "eviction refused for now");
            }
        }
        tokio::time::sleep(Duration::from_secs(2).min(bound)).await;
    }
}

async fn close(session: Session) {
    if let Err(error) = session.close().await {
        debug!(%error, "closing the ssh session");
    }
}

/// `<name>.<16 hex digits of the content's SHA-256>`.
fn content_named(name: &str, content: &str) -> String {
    format!("{name}.{}", hex(&Sha256::digest(content.as_bytes())[..8]))
}

/// Writes a file whose name determines its content, unless it exists already.
fn write_once(path: &Path, content: &[u8]) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    write_private(path, content)
}

/// Writes `content` to `path` (mode 0600) through a temporary file of this call's own,
/// renamed into place: concurrent writers of one path never see a partial file, and
/// never rename each other's temporary file away.
fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| local_error("write state file", &e))?;
    let written = file
        .write_all(content)
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| local_error("write state file", &e))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn local_error(what: &str, error: &std::io::Error) -> GuestError {
    GuestError::Api(format!("{what}: {error}"))
}

fn remote_error(node: &GuestNode, error: &openssh::Error) -> GuestError {
    GuestError::Unreachable {
        node: node.name.clone(),
        reason: crate::util::chain(error),
    }
}

/// A refused host key is a different failure from "not up yet": it must stop the
/// controller from running anything and say so. ssh reports it only as text.
fn classify_connect_error(node: &str, error: &openssh::Error) -> GuestError {
    let text = crate::util::chain(error);
    if text.contains("Host key verification failed")
        || text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("No ED25519 host key is known")
    {
        GuestError::HostKeyMismatch {
            node: node.to_owned(),
        }
    } else {
        GuestError::Unreachable {
            node: node.to_owned(),
            reason: text,
        }
    }
}

/// The last lines of stderr (else stdout), with bootstrap tokens redacted.
fn shown_output(output: &Output) -> String {
    let stream = if output.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        &output.stderr
    } else {
        &output.stdout
    };
    let text = String::from_utf8_lossy(stream);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(OUTPUT_TAIL_LINES)..].join("\n");
    redact_tokens(&tail)
}

/// Replaces anything shaped like a bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`).
pub fn redact_tokens(text: &str) -> String {
    let bytes = text.as_bytes();
    let token_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let candidate = i + 23 <= bytes.len()
            && (i == 0 || !token_char(bytes[i - 1]))
            && bytes[i..i + 6].iter().all(|b| token_char(*b))
            && bytes[i + 6] == b'.'
            && bytes[i + 7..i + 23].iter().all(|b| token_char(*b))
            && (i + 23 == bytes.len() || !token_char(bytes[i + 23]));
        if candidate {
            out.push_str("<redacted-token>");
            i += 23;
        } else {
            let ch = text[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(ch);
            i += ch.len_utf8().max(1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn node(name: &str) -> GuestNode {
        GuestNode {
            name: name.into(),
            ip: Ipv4Addr::new(192, 168, 222, 101),
            host_key: "ssh-ed25519 AAAAC3Nza".into(),
        }
    }

    #[test]
    fn concurrent_pins_of_one_node_never_fail_nor_mix_keys() {
        let dir = std::env::temp_dir().join(format!(
            "benchcluster-ssh-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let guest = SshGuest::new(SshConfig {
            state_dir: dir.clone(),
            ..SshConfig::default()
        });
        let keys = ["ssh-ed25519 AAAAC3NzaKeyA", "ssh-ed25519 AAAAC3NzaKeyB"];
        let configs: Vec<(usize, PathBuf)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    let guest = &guest;
                    scope.spawn(move || {
                        (0..25)
                            .map(|_| {
                                let mut pinned = node("x-cp-0");
                                pinned.host_key = keys[t % 2].to_owned();
                                let config =
                                    guest.ssh_config(&pinned, Path::new("/keys/k")).unwrap();
                                (t % 2, config)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        for (key, config) in configs {
            let text = std::fs::read_to_string(&config).unwrap();
            let known_hosts = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("UserKnownHostsFile "))
                .unwrap();
            let pinned = std::fs::read_to_string(known_hosts).unwrap();
            assert_eq!(pinned, format!("x-cp-0 {}\n", keys[key]));
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("known_hosts"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_the_join_command() {
        let text = "kubeadm join 192.168.222.101:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:1234abcd \n";
        let ticket = parse_join_command(text).unwrap();
        assert_eq!(ticket.endpoint, "192.168.222.101:6443");
        assert_eq!(ticket.token.expose(), "abcdef.0123456789abcdef");
        assert_eq!(ticket.ca_cert_hash, "sha256:1234abcd");
        assert!(
            parse_join_command(
                "kubeadm join x:6443 --token bad --discovery-token-ca-cert-hash sha256:1"
            )
            .is_none()
        );
        assert!(parse_join_command("error: something").is_none());
    }

    #[test]
    fn tokens_are_redacted_from_output() {
        let text = "[bootstrap-token] Using token: abcdef.0123456789abcdef\nnot-a-token: abcdefg.0123456789abcdef";
        let redacted = redact_tokens(text);
        assert!(!redacted.contains("abcdef.0123456789abcdef\n"));
        assert!(redacted.contains("Using token: <redacted-token>"));
        assert!(
            redacted.contains("abcdefg.0123456789abcdef"),
            "7-char prefix is no token"
        );
    }

    #[test]
    fn kubeadm_documents_keep_hostile_values_as_strings() {
        let config = InitConfig {
            pod_subnet: "10.244.0.0/16\"\n---\nkind: Evil".into(),
            service_subnet: "10.96.0.0/12".into(),
        };
        let text = init_configuration(
            &node("x-cp-0"),
            &config,
            "v1.35.4",
            Duration::from_secs(600),
        );
        let documents: Vec<&str> = text.split("\n---\n").collect();
        assert_eq!(documents.len(), 3);
        let cluster: serde_json::Value = serde_json::from_str(documents[1]).unwrap();
        assert_eq!(
            cluster["networking"]["podSubnet"],
            "10.244.0.0/16\"\n---\nkind: Evil"
        );
        assert_eq!(cluster["kubernetesVersion"], "v1.35.4");
        for component in ["controllerManager", "scheduler"] {
            assert_eq!(
                cluster[component]["extraArgs"],
                serde_json::json!([{"name": "leader-elect", "value": "false"}])
            );
        }
        let init: serde_json::Value = serde_json::from_str(documents[0]).unwrap();
        assert_eq!(init["nodeRegistration"]["name"], "x-cp-0");
        assert_eq!(
            init["localAPIEndpoint"]["advertiseAddress"],
            "192.168.222.101"
        );
        assert_eq!(
            init["skipPhases"],
            serde_json::json!(["addon/coredns", "addon/kube-proxy"])
        );
    }

    #[test]
    fn join_configuration_pins_the_ca() {
        let ticket = JoinTicket {
            endpoint: "192.168.222.101:6443".into(),
            token: Sensitive::new("abcdef.0123456789abcdef"),
            ca_cert_hash: "sha256:ff".into(),
        };
        let text = join_configuration(&node("x-cp-0"), &node("x-w-0"), &ticket);
        let doc: serde_json::Value = serde_json::from_str(text.expose()).unwrap();
        assert_eq!(
            doc["discovery"]["bootstrapToken"]["caCertHashes"][0],
            "sha256:ff"
        );
        assert!(
            doc["discovery"]["bootstrapToken"]
                .get("unsafeSkipCAVerification")
                .is_none()
        );
        assert_eq!(format!("{text:?}"), "Sensitive(<redacted>)");
    }

    #[test]
    fn the_cluster_ca_is_read_from_the_kubeconfig() {
        use base64::Engine as _;
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let data = base64::engine::general_purpose::STANDARD.encode(pem);
        let kubeconfig = |cluster: &str| {
            AdminKubeconfig(Sensitive::new(format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kubernetes\n  cluster:\n{cluster}\n\
                 contexts: []\nusers: []\n"
            )))
        };
        let with_ca = kubeconfig(&format!(
            "    server: https://192.168.222.10:6443\n    certificate-authority-data: {data}"
        ));
        assert_eq!(cluster_ca(&with_ca).as_deref(), Some(pem.as_bytes()));
        let without = kubeconfig("    server: https://192.168.222.10:6443");
        assert_eq!(cluster_ca(&without), None);
        assert_eq!(cluster_ca(&AdminKubeconfig(Sensitive::new("{"))), None);
    }

    #[test]
    fn only_flocks_busy_exit_means_an_earlier_kubeadm_runs() {
        let failed = |code| GuestError::CommandFailed {
            node: "x-cp-0".into(),
            command: "kubeadm init",
            exit_code: Some(code),
            output: String::new(),
        };
        assert!(matches!(
            busy_if_locked(&node("x-cp-0"), failed(LOCK_BUSY_EXIT)),
            GuestError::Busy { .. }
        ));
        assert!(matches!(
            busy_if_locked(&node("x-cp-0"), failed(1)),
            GuestError::CommandFailed {
                exit_code: Some(1),
                ..
            }
        ));
    }

    proptest! {
        #[test]
        fn redaction_never_panics_and_removes_tokens(prefix in "\\PC{0,20}", token in "[a-z0-9]{6}\\.[a-z0-9]{16}") {
            let text = format!("{prefix} {token} end");
            let redacted = redact_tokens(&text);
            prop_assert!(!redacted.contains(&token));
        }
    }
}
