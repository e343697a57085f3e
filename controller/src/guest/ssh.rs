//! The real guest, `SshGuest`: SSH to the VMs and a kube client on the guest cluster's
//! admin kubeconfig. This file holds its SSH transport: sessions through the `openssh`
//! crate (which drives the system's `ssh` client), argv commands, and the lock every
//! state-changing kubeadm runs under. Its other parts live beside it: `pinning` (host
//! keys and local state files), `redact` (what of a command's output is shown),
//! `kubeadm` (kubeadm's files and configuration documents), `bootstrap` (init and join)
//! and `api` (the guest cluster's API, the drain).
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
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use kube::Client;
use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tracing::debug;

pub use super::redact::redact_tokens;
use super::redact::shown_output;
use super::{
    AdminKubeconfig, ClusterNode, Credentials, Guest, GuestError, GuestNode, InitConfig,
    NodeConfig, Registration, Result, RunningScheduler,
};

/// Every kubeadm that changes a node's state runs under this lock (`flock`, util-linux):
/// a kubeadm left running by an earlier attempt whose SSH session was cut holds it, so
/// no reset or second init can run beside it.
const KUBEADM_LOCK: &str = "/run/benchcluster-kubeadm.lock";
/// Exit status `flock` returns when the lock is held.
const LOCK_BUSY_EXIT: i32 = 75;

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
    /// How long a restarted kube-scheduler may take to turn healthy before its
    /// configuration counts as refused.
    pub scheduler_timeout: Duration,
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
            scheduler_timeout: Duration::from_secs(300),
        }
    }
}

/// The guest side over SSH and the guest cluster's API.
pub struct SshGuest {
    pub(super) config: SshConfig,
    /// Clients of guest clusters, by the SHA-256 of their admin kubeconfig (`api`).
    pub(super) clients: Mutex<HashMap<[u8; 32], Client>>,
}

impl SshGuest {
    pub fn new(config: SshConfig) -> Self {
        Self {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub(super) async fn connect(
        &self,
        node: &GuestNode,
        credentials: &Credentials,
    ) -> Result<Session> {
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
    pub(super) async fn run(
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
    pub(super) async fn succeeds(
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
    pub(super) async fn put_file(
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
        registration: &Registration,
    ) -> Result<()> {
        let worker_session = self.connect(worker, credentials).await?;
        let result = self
            .join_on(
                &worker_session,
                control_plane,
                worker,
                credentials,
                kubeconfig,
                registration,
            )
            .await;
        close(worker_session).await;
        result
    }

    async fn cluster_nodes(&self, kubeconfig: &AdminKubeconfig) -> Result<Vec<ClusterNode>> {
        self.list_nodes(kubeconfig).await
    }

    async fn configure_node(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
        config: &NodeConfig,
    ) -> Result<()> {
        self.configure(kubeconfig, node_name, config).await
    }

    async fn uncordon(&self, kubeconfig: &AdminKubeconfig, node_name: &str) -> Result<()> {
        self.uncordon_node(kubeconfig, node_name).await
    }

    async fn remove_node(&self, kubeconfig: &AdminKubeconfig, node_name: &str) -> Result<()> {
        self.cordon_drain_delete(kubeconfig, node_name).await
    }

    async fn scheduler(
        &self,
        kubeconfig: &AdminKubeconfig,
        control_plane: &str,
    ) -> Result<Option<RunningScheduler>> {
        self.observe_scheduler(kubeconfig, control_plane).await
    }

    async fn switch_scheduler(
        &self,
        control_plane: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
        config: &InitConfig,
    ) -> Result<RunningScheduler> {
        let session = self.connect(control_plane, credentials).await?;
        let result = self
            .switch_scheduler_on(&session, control_plane, kubeconfig, config)
            .await;
        close(session).await;
        result
    }

    fn node_changes(
        &self,
        kubeconfig: &AdminKubeconfig,
    ) -> impl futures::Stream<Item = String> + Send + 'static {
        super::node_watch::node_changes(kubeconfig.clone(), self.config.connect_timeout)
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

    /// Runs `kubeadm <args>` as root under [`KUBEADM_LOCK`], bounded by the kubeadm
    /// timeout; a lock held by an earlier kubeadm is [`GuestError::Busy`].
    pub(super) async fn kubeadm(
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

    /// The node's kubeadm version (`v1.35.4`), which its configuration names.
    pub(super) async fn kubeadm_version(
        &self,
        session: &Session,
        node: &GuestNode,
    ) -> Result<String> {
        let output = self
            .run(
                session,
                node,
                "kubeadm version",
                &["kubeadm", "version", "-o", "short"],
                None,
                self.config.command_timeout,
            )
            .await?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// `Ok` when no kubeadm holds [`KUBEADM_LOCK`], else [`GuestError::Busy`].
    pub(super) async fn kubeadm_idle(&self, session: &Session, node: &GuestNode) -> Result<()> {
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

    /// Whether a file exists on the node (checked as root).
    pub(super) async fn exists(
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
    pub(super) async fn mark(
        &self,
        session: &Session,
        node: &GuestNode,
        marker: &str,
    ) -> Result<()> {
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

pub(super) async fn close(session: Session) {
    if let Err(error) = session.close().await {
        debug!(%error, "closing the ssh session");
    }
}

pub(super) fn local_error(what: &str, error: &std::io::Error) -> GuestError {
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

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::Ipv4Addr;

    /// A node for the guest edge's unit tests.
    pub(crate) fn node(name: &str) -> GuestNode {
        GuestNode {
            name: name.into(),
            ip: Ipv4Addr::new(192, 168, 222, 101),
            host_key: "ssh-ed25519 AAAAC3Nza".into(),
        }
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
}
