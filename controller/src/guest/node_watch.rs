//! A watch on the guest cluster's Nodes that says which Node changed in what the
//! controller reads of it (a [`ClusterNode`]: labels, allocatable extended resources,
//! readiness, the cordon for removal), appeared or went.
//! A kubelet's heartbeats (condition times and resourceVersion, every ~10 s) change none
//! of that and pass silently.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use tracing::debug;

use super::api::{cluster_node, connect};
use super::{AdminKubeconfig, ClusterNode};

/// The names of the guest cluster's Nodes as they change, for as long as the stream is
/// polled. A failed watch is retried with kube's default backoff (up to 30 s apart); a
/// kubeconfig that yields no client ends the stream.
pub fn node_changes(
    kubeconfig: AdminKubeconfig,
    connect_timeout: Duration,
) -> impl Stream<Item = String> + Send + 'static {
    futures::stream::once(async move { connect(&kubeconfig, connect_timeout, None).await })
        .flat_map(|client| match client {
            Ok(client) => changes(
                watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff(),
            )
            .left_stream(),
            Err(error) => {
                debug!(%error, "no client for the guest Node watch");
                futures::stream::empty().right_stream()
            }
        })
}

/// The names of the Nodes whose part that matters changed, from a watch's events. The
/// first listing only records (the pass that starts a watch has just read the Nodes);
/// a later one, after the watch restarted, reports what changed or went meanwhile.
pub fn changes<S>(events: S) -> impl Stream<Item = String> + Send
where
    S: Stream<Item = Result<Event<Node>, watcher::Error>> + Send,
{
    let mut seen = Seen::default();
    events.flat_map(move |event| futures::stream::iter(seen.apply(event)))
}

#[derive(Default)]
struct Seen {
    nodes: HashMap<String, ClusterNode>,
    /// The names listed so far, while a listing is under way.
    listing: Option<HashSet<String>>,
    /// Whether the first listing completed.
    listed: bool,
}

impl Seen {
    /// The names of the Nodes this event changed.
    fn apply(&mut self, event: Result<Event<Node>, watcher::Error>) -> Vec<String> {
        match event {
            Err(error) => {
                debug!(%error, "guest Node watch failed; retrying");
                Vec::new()
            }
            Ok(Event::Init) => {
                self.listing = Some(HashSet::new());
                Vec::new()
            }
            Ok(Event::InitApply(node)) => {
                let Some(name) = node.metadata.name.clone() else {
                    return Vec::new();
                };
                if let Some(listing) = &mut self.listing {
                    listing.insert(name.clone());
                }
                let changed = self.record(&name, node);
                if changed && self.listed {
                    vec![name]
                } else {
                    Vec::new()
                }
            }
            Ok(Event::InitDone) => {
                self.listed = true;
                // Nodes the listing lacks went while the watch was down.
                let listing = self.listing.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .nodes
                    .keys()
                    .filter(|name| !listing.contains(*name))
                    .cloned()
                    .collect();
                for name in &gone {
                    self.nodes.remove(name);
                }
                gone
            }
            Ok(Event::Apply(node)) => {
                let Some(name) = node.metadata.name.clone() else {
                    return Vec::new();
                };
                if self.record(&name, node) {
                    vec![name]
                } else {
                    Vec::new()
                }
            }
            Ok(Event::Delete(node)) => {
                let Some(name) = node.metadata.name else {
                    return Vec::new();
                };
                self.nodes.remove(&name);
                vec![name]
            }
        }
    }

    /// Records what matters of the Node; returns whether it differs from before.
    fn record(&mut self, name: &str, node: Node) -> bool {
        let Some(now) = cluster_node(node) else {
            return false;
        };
        if self.nodes.get(name) == Some(&now) {
            return false;
        }
        self.nodes.insert(name.to_owned(), now);
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    /// A Ready Node with a pool label and a fake GPU, last heartbeat at `heartbeat` (s).
    pub(crate) fn node(name: &str, heartbeat: i64) -> Node {
        let resources = BTreeMap::from([
            ("cpu".to_owned(), Quantity("2".into())),
            ("example.com/fake-gpu".to_owned(), Quantity("2".into())),
        ]);
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    "benchcluster.dev/pool".to_owned(),
                    "gpu".to_owned(),
                )])),
                resource_version: Some(heartbeat.to_string()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                capacity: Some(resources.clone()),
                allocatable: Some(resources),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_heartbeat_time: Some(Time(Timestamp::from_second(heartbeat).unwrap())),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    pub(crate) fn without_label(mut node: Node) -> Node {
        node.metadata.labels = None;
        node
    }

    async fn changed(events: Vec<Result<Event<Node>, watcher::Error>>) -> Vec<String> {
        changes(futures::stream::iter(events)).collect().await
    }

    fn listed(nodes: &[Node]) -> Vec<Result<Event<Node>, watcher::Error>> {
        let mut events = vec![Ok(Event::Init)];
        events.extend(nodes.iter().cloned().map(|n| Ok(Event::InitApply(n))));
        events.push(Ok(Event::InitDone));
        events
    }

    #[tokio::test]
    async fn a_removed_label_is_a_change_a_heartbeat_is_not() {
        let mut events = listed(&[node("c-gpu-0", 10), node("c-gpu-1", 10)]);
        events.push(Ok(Event::Apply(node("c-gpu-0", 20))));
        events.push(Ok(Event::Apply(without_label(node("c-gpu-1", 20)))));
        events.push(Ok(Event::Apply(without_label(node("c-gpu-1", 30)))));
        assert_eq!(changed(events).await, ["c-gpu-1"]);
    }

    #[tokio::test]
    async fn lost_resources_readiness_arrival_and_departure_are_changes() {
        // Allocatable is what the scheduler reads: losing it there is the change.
        let mut lost = node("c-gpu-0", 20);
        let status = lost.status.as_mut().unwrap();
        status
            .allocatable
            .as_mut()
            .unwrap()
            .remove("example.com/fake-gpu");
        let mut capacity_too = lost.clone();
        capacity_too
            .status
            .as_mut()
            .unwrap()
            .capacity
            .as_mut()
            .unwrap()
            .remove("example.com/fake-gpu");
        let mut not_ready = node("c-gpu-0", 30);
        not_ready
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "False".into();

        let mut events = listed(&[node("c-gpu-0", 10)]);
        events.extend([
            Ok(Event::Apply(lost)),
            Ok(Event::Apply(capacity_too)),
            Ok(Event::Apply(not_ready)),
            Ok(Event::Apply(node("c-gpu-1", 10))),
            Ok(Event::Delete(node("c-gpu-1", 10))),
        ]);
        assert_eq!(
            changed(events).await,
            ["c-gpu-0", "c-gpu-0", "c-gpu-1", "c-gpu-1"]
        );
    }

    #[tokio::test]
    async fn a_relisting_reports_what_changed_or_went_while_the_watch_was_down() {
        let mut events = listed(&[node("a", 10), node("b", 10), node("c", 10)]);
        events.push(Err(watcher::Error::NoResourceVersion));
        events.extend(listed(&[node("a", 20), without_label(node("b", 20))]));
        let mut reported = changed(events).await;
        reported.sort();
        assert_eq!(reported, ["b", "c"]);
    }
}
