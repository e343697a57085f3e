//! The guest cluster's API, through a kube client on its admin kubeconfig (cached by
//! the kubeconfig's hash): listing Nodes, cordon and uncordon, the drain (eviction API,
//! bounded) and Node deletion, and the bounded wait for a kubelet to register its Node.
//! Every write carries the controller's field manager, so a Node's managed fields say
//! who set its pool's labels and resources.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use parking_lot::MutexGuard;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::ssh::SshGuest;
use super::{
    AdminKubeconfig, CORDONED_FOR_REMOVAL, ClusterNode, GuestError, GuestNode, NodeConfig, Result,
};

/// How often a registration is polled while a kubelet registers its Node.
const REGISTRATION_POLL: Duration = Duration::from_secs(2);

/// A client of the guest cluster on its admin kubeconfig. `read_timeout` bounds each
/// request; a watch has none (kube's watcher bounds its idle time itself).
pub(super) async fn connect(
    kubeconfig: &AdminKubeconfig,
    connect_timeout: Duration,
    read_timeout: Option<Duration>,
) -> Result<Client> {
    // The errors say what is wrong, never what the kubeconfig holds.
    let parsed = Kubeconfig::from_yaml(kubeconfig.0.expose_secret())
        .map_err(|_| GuestError::Api("the stored admin kubeconfig does not parse".into()))?;
    let mut config = Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
        .await
        .map_err(|_| GuestError::Api("the stored admin kubeconfig is unusable".into()))?;
    config.connect_timeout = Some(connect_timeout);
    config.read_timeout = read_timeout;
    Client::try_from(config).map_err(|e| GuestError::Api(e.to_string()))
}

/// Parameters of every patch to the guest cluster: the field manager names this
/// controller as the writer of the labels, resources and cordons it sets.
fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Parameters of every eviction (a create), likewise.
fn evict_params() -> EvictParams {
    EvictParams {
        post_options: PostParams {
            field_manager: Some(crate::FIELD_MANAGER.into()),
            ..PostParams::default()
        },
        ..EvictParams::default()
    }
}

/// What the controller reads of a Node; `None` for a Node without a name.
pub(super) fn cluster_node(node: Node) -> Option<ClusterNode> {
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
    let labels = node.metadata.labels.unwrap_or_default();
    let status = node.status.unwrap_or_default();
    let ready = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    // Allocatable, not capacity: what the scheduler reads.
    let extended_resources = status
        .allocatable
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| is_extended_resource(name))
        .filter_map(|(name, quantity)| Some((name, quantity.0.parse().ok()?)))
        .collect();
    Some(ClusterNode {
        name,
        ready,
        cordoned_for_removal,
        labels,
        extended_resources,
    })
}

impl SshGuest {
    pub(super) async fn client(&self, kubeconfig: &AdminKubeconfig) -> Result<Client> {
        let digest: [u8; 32] = Sha256::digest(kubeconfig.0.expose_secret().as_bytes()).into();
        if let Some(client) = self.lock_clients().get(&digest) {
            return Ok(client.clone());
        }
        let client = connect(
            kubeconfig,
            self.config.connect_timeout,
            Some(self.config.api_timeout),
        )
        .await?;
        self.lock_clients().insert(digest, client.clone());
        Ok(client)
    }

    /// Maps a failed request to the guest cluster. A failure below HTTP (timeout,
    /// refused or reset connection) also drops the cached client, so the next request
    /// opens a fresh connection instead of waiting on a dead pooled one.
    pub(super) fn api_error(&self, kubeconfig: &AdminKubeconfig, error: kube::Error) -> GuestError {
        if !matches!(error, kube::Error::Api(_)) {
            let digest: [u8; 32] = Sha256::digest(kubeconfig.0.expose_secret().as_bytes()).into();
            self.lock_clients().remove(&digest);
        }
        GuestError::Api(error.to_string())
    }

    fn lock_clients(&self) -> MutexGuard<'_, HashMap<[u8; 32], Client>> {
        self.clients.lock()
    }

    /// The Nodes of the guest cluster (see [`Guest::cluster_nodes`](super::Guest::cluster_nodes)).
    pub(super) async fn list_nodes(
        &self,
        kubeconfig: &AdminKubeconfig,
    ) -> Result<Vec<ClusterNode>> {
        let client = self.client(kubeconfig).await?;
        let nodes = Api::<Node>::all(client)
            .list(&ListParams::default())
            .await
            .map_err(|e| self.api_error(kubeconfig, e))?;
        Ok(nodes.items.into_iter().filter_map(cluster_node).collect())
    }

    /// Merges the config's labels into the Node's and its extended resources into the
    /// Node's capacity and allocatable (the status subresource). The kubelet would derive
    /// allocatable at its next status update; written here, pods can use them at once.
    pub(super) async fn configure(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
        config: &NodeConfig,
    ) -> Result<()> {
        let nodes = Api::<Node>::all(self.client(kubeconfig).await?);
        let params = patch_params();
        if !config.labels.is_empty() {
            let patch = serde_json::json!({"metadata": {"labels": config.labels}});
            nodes
                .patch(node_name, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| self.api_error(kubeconfig, e))?;
        }
        if !config.extended_resources.is_empty() {
            let capacity: BTreeMap<&str, String> = config
                .extended_resources
                .iter()
                .map(|(name, count)| (name.as_str(), count.to_string()))
                .collect();
            let patch =
                serde_json::json!({"status": {"capacity": capacity, "allocatable": capacity}});
            nodes
                .patch_status(node_name, &params, &Patch::Merge(&patch))
                .await
                .map_err(|e| self.api_error(kubeconfig, e))?;
        }
        Ok(())
    }

    /// Uncordons a Node this controller cordoned (see [`Guest::uncordon`](super::Guest::uncordon)).
    pub(super) async fn uncordon_node(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
    ) -> Result<()> {
        let client = self.client(kubeconfig).await?;
        let uncordon = serde_json::json!({
            "metadata": {"annotations": {CORDONED_FOR_REMOVAL: null}},
            "spec": {"unschedulable": false},
        });
        match Api::<Node>::all(client)
            .patch(node_name, &patch_params(), &Patch::Merge(&uncordon))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(self.api_error(kubeconfig, e)),
        }
    }

    /// Cordons, drains and deletes a Node (see [`Guest::remove_node`](super::Guest::remove_node)).
    pub(super) async fn cordon_drain_delete(
        &self,
        kubeconfig: &AdminKubeconfig,
        node_name: &str,
    ) -> Result<()> {
        let client = self.client(kubeconfig).await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let api_error = |e: kube::Error| self.api_error(kubeconfig, e);
        let cordon = serde_json::json!({
            "metadata": {"annotations": {CORDONED_FOR_REMOVAL: "true"}},
            "spec": {"unschedulable": true},
        });
        match nodes
            .patch(node_name, &patch_params(), &Patch::Merge(&cordon))
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

    /// Whether the guest cluster has the Node; an API error is returned as such, never
    /// read as "absent".
    pub(super) async fn node_registered(
        &self,
        kubeconfig: &AdminKubeconfig,
        name: &str,
    ) -> Result<bool> {
        let client = self.client(kubeconfig).await?;
        Api::<Node>::all(client)
            .get_opt(name)
            .await
            .map(|node| node.is_some())
            .map_err(|e| self.api_error(kubeconfig, e))
    }

    /// Waits, bounded, until the node's kubelet has registered its Node. Requests that
    /// fail on the way (a busy API) are retried until the bound.
    pub(super) async fn await_registration(
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
}

/// An extended resource's name: domain-prefixed, outside the `kubernetes.io` domain
/// (the kubelet's own resources, `hugepages-*` and the like, carry no domain).
fn is_extended_resource(name: &str) -> bool {
    name.split_once('/')
        .is_some_and(|(domain, _)| domain != "kubernetes.io" && !domain.ends_with(".kubernetes.io"))
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
            if let Err(error) = api.evict(name, &evict_params()).await {
                debug!(%error, pod = %name, "eviction refused for now");
            }
        }
        tokio::time::sleep(Duration::from_secs(2).min(bound)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Arc;

    use http::{Method, Request, Response};
    use kube::client::Body;
    use parking_lot::Mutex;
    use secrecy::SecretString;

    use super::*;
    use crate::guest::Guest;
    use crate::guest::ssh::SshConfig;

    /// The requests the stand-in API server received, method and URI.
    type Requests = Arc<Mutex<Vec<(Method, String)>>>;

    /// A guest whose client of `kubeconfig` answers from a stand-in API server that
    /// records each request (method and URI) and answers what the calls expect: one
    /// pod to evict on the first list of a drain, none after.
    fn guest(kubeconfig: &AdminKubeconfig) -> (SshGuest, Requests) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let service = tower::service_fn(move |request: Request<Body>| {
            let log = Arc::clone(&log);
            async move {
                let uri = request.uri().to_string();
                let lists = {
                    let mut log = log.lock();
                    log.push((request.method().clone(), uri.clone()));
                    log.iter()
                        .filter(|(_, u)| u.starts_with("/api/v1/pods"))
                        .count()
                };
                let body = if uri.starts_with("/api/v1/pods") {
                    let items = if lists == 1 {
                        serde_json::json!([{"metadata": {"name": "p", "namespace": "ns"}}])
                    } else {
                        serde_json::json!([])
                    };
                    serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                } else if uri.contains("/eviction") {
                    serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Success"})
                } else {
                    serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}})
                };
                Ok::<_, std::convert::Infallible>(Response::new(Body::from(
                    serde_json::to_vec(&body).unwrap(),
                )))
            }
        });
        let guest = SshGuest::new(SshConfig::default());
        let digest: [u8; 32] = Sha256::digest(kubeconfig.0.expose_secret().as_bytes()).into();
        guest
            .lock_clients()
            .insert(digest, Client::new(service, "default"));
        (guest, seen)
    }

    #[tokio::test(start_paused = true)]
    async fn every_write_to_a_guest_node_names_the_controller_as_its_field_manager() {
        let kubeconfig = AdminKubeconfig(SecretString::from("kubeconfig"));
        let (guest, seen) = guest(&kubeconfig);
        let config = NodeConfig {
            labels: BTreeMap::from([("benchcluster.dev/pool".into(), "gpu".into())]),
            extended_resources: BTreeMap::from([("example.com/fake-gpu".into(), 2)]),
        };
        guest
            .configure_node(&kubeconfig, "n", &config)
            .await
            .unwrap();
        guest.uncordon(&kubeconfig, "n").await.unwrap();
        guest.remove_node(&kubeconfig, "n").await.unwrap();

        let seen = seen.lock();
        let writes: Vec<&(Method, String)> = seen
            .iter()
            .filter(|(method, _)| *method == Method::PATCH || *method == Method::POST)
            .collect();
        // Labels, capacity, uncordon, cordon, one eviction.
        assert_eq!(writes.len(), 5, "{seen:#?}");
        for (method, uri) in writes {
            assert!(
                uri.contains("fieldManager=benchcluster-controller"),
                "{method} {uri}"
            );
        }
        assert!(seen.iter().any(|(m, _)| *m == Method::DELETE), "{seen:#?}");
    }
}
