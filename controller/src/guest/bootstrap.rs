//! kubeadm init and join over SSH, safe to repeat: the completion markers and
//! kubeadm's own files tell a node that completed (never reset, at most registered
//! again) from one that died half-way (reset first) or one still running (waited for),
//! and join tokens are minted just in time and revoked after use.

use openssh::Session;
use secrecy::{ExposeSecret, SecretString};
use tracing::{debug, info, warn};

use super::kubeadm::{
    ADMIN_CONF, INIT_CONFIG, INIT_DONE, JOIN_CONFIG, JOIN_DONE, JoinTicket, KUBEADM_STATE,
    KUBELET_CONF, KUBELET_PATCH, NODE_CA, cluster_ca, init_configuration, join_configuration,
    kubelet_patch, parse_join_command,
};
use super::scheduler;
use super::ssh::{SshGuest, close};
use super::{
    AdminKubeconfig, Credentials, GuestError, GuestNode, InitConfig, Registration, Result,
};

impl SshGuest {
    pub(super) async fn init_on(
        &self,
        session: &Session,
        node: &GuestNode,
        config: &InitConfig,
    ) -> Result<AdminKubeconfig> {
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
        let version = self.kubeadm_version(session, node).await?;
        // Written first: the ClusterConfiguration points the scheduler at it.
        let scheduler_file = match &config.scheduler.config {
            Some(document) => {
                let path = scheduler::config_path(&config.scheduler.config_hash());
                self.put_file(
                    session,
                    node,
                    &path,
                    scheduler::config_file(document).as_bytes(),
                )
                .await?;
                Some(path)
            }
            None => None,
        };
        let document = init_configuration(
            node,
            config,
            &version,
            self.config.join_token_ttl,
            scheduler::component(scheduler_file.as_deref(), None, None, &config.kubernetes),
            None,
        );
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
        Ok(AdminKubeconfig(SecretString::from(text)))
    }

    pub(super) async fn join_on(
        &self,
        worker_session: &Session,
        control_plane: &GuestNode,
        worker: &GuestNode,
        credentials: &Credentials,
        kubeconfig: &AdminKubeconfig,
        registration: &Registration,
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
        let document = join_configuration(worker, &ticket, registration);
        let result = async {
            // The pool's kubelet settings, as a patch kubeadm applies to the kubelet's
            // configuration (written first: the join configuration names its directory).
            if let Some(patch) = kubelet_patch(registration) {
                self.put_file(worker_session, worker, KUBELET_PATCH, patch.as_bytes())
                    .await?;
            }
            self.put_file(
                worker_session,
                worker,
                JOIN_CONFIG,
                document.expose_secret().as_bytes(),
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
            .expose_secret()
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
