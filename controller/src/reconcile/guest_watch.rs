//! One watch of the guest cluster's Nodes per BenchCluster whose guest API answered.
//! A change of one of its Nodes that a pass acts on (labels, extended resources,
//! readiness, a Node appearing or going; not a heartbeat) wakes the BenchCluster
//! through [`GuestWatches::wakes`], which the controller merges into its triggers: a
//! Node that re-registered without its pool's labels or resources is put right within
//! seconds, not at the resync.
//!
//! A pass that finds the guest API answering starts its cluster's watch unless it runs
//! already; a changed kubeconfig replaces it; a pass that finds no kubeconfig, and the
//! cleanup of the BenchCluster, stop it; the controller stopping ends them all. While
//! the API does not answer, the watch retries on its own (the guest edge backs off).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use benchcluster_crd::BenchCluster;
use futures::{Stream, StreamExt};
use kube::runtime::reflector::ObjectRef;
use parking_lot::{Mutex, MutexGuard};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span};

use super::observe::Observation;
use super::world::GuestCluster;
use crate::guest::{AdminKubeconfig, Guest};
use crate::names::ClusterNames;

/// Wakes buffered for the controller; more are dropped (lagging): a pass woken by any
/// of them reads every Node anyway, and the resync covers the rest.
const WAKE_BUFFER: usize = 1024;

struct Running {
    /// SHA-256 of the kubeconfig the watch uses (the kubeconfig itself is not kept).
    kubeconfig: [u8; 32],
    task: JoinHandle<()>,
}

/// The Node watches of every BenchCluster, by UID.
pub struct GuestWatches {
    running: Mutex<HashMap<String, Running>>,
    wake: broadcast::Sender<ObjectRef<BenchCluster>>,
    /// False once the controller stops: nothing new starts.
    open: AtomicBool,
}

impl Default for GuestWatches {
    fn default() -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            wake: broadcast::channel(WAKE_BUFFER).0,
            open: AtomicBool::new(true),
        }
    }
}

fn digest(kubeconfig: &AdminKubeconfig) -> [u8; 32] {
    Sha256::digest(kubeconfig.0.expose_secret().as_bytes()).into()
}

impl GuestWatches {
    fn running(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock()
    }

    /// Starts, keeps, replaces or stops the cluster's watch after what the pass
    /// observed of its guest cluster.
    pub fn follow<G: Guest>(&self, names: &ClusterNames, observation: &Observation, guest: &G) {
        let Some(kubeconfig) = &observation.kubeconfig else {
            self.stop(&names.uid);
            return;
        };
        match observation.world.cluster {
            GuestCluster::Reachable => {
                self.watch(names, kubeconfig, || guest.node_changes(kubeconfig));
            }
            // A silent API keeps its watch (it retries), unless the kubeconfig changed.
            _ => {
                let mut running = self.running();
                if running
                    .get(&names.uid)
                    .is_some_and(|r| r.kubeconfig != digest(kubeconfig))
                    && let Some(old) = running.remove(&names.uid)
                {
                    old.task.abort();
                }
            }
        }
    }

    /// Watches `changes` (names of Nodes that changed) for the cluster, unless a watch
    /// on this kubeconfig runs already; one on another kubeconfig is replaced. A change
    /// of one of the cluster's Nodes wakes it; other Nodes (added by hand) do not.
    pub fn watch<S>(
        &self,
        names: &ClusterNames,
        kubeconfig: &AdminKubeconfig,
        changes: impl FnOnce() -> S,
    ) where
        S: Stream<Item = String> + Send + 'static,
    {
        if !self.open.load(Ordering::Acquire) {
            return;
        }
        let key = digest(kubeconfig);
        let mut running = self.running();
        if let Some(old) = running.get(&names.uid) {
            if old.kubeconfig == key && !old.task.is_finished() {
                return;
            }
            old.task.abort();
        }
        let object = ObjectRef::<BenchCluster>::new(&names.name).within(&names.namespace);
        let prefix = format!("{}-", names.name);
        let wake = self.wake.clone();
        let changes = changes();
        let span =
            info_span!("guest_watch", namespace = %names.namespace, benchcluster = %names.name);
        let task = tokio::spawn(
            async move {
                debug!("watching the guest cluster's Nodes");
                futures::pin_mut!(changes);
                while let Some(node) = changes.next().await {
                    if node.starts_with(&prefix) {
                        debug!(%node, "guest Node changed");
                        let _ = wake.send(object.clone());
                    }
                }
                debug!("guest Node watch ended");
            }
            .instrument(span),
        );
        running.insert(
            names.uid.clone(),
            Running {
                kubeconfig: key,
                task,
            },
        );
    }

    /// Stops the cluster's watch (its BenchCluster is deleted, or lost its kubeconfig).
    pub fn stop(&self, uid: &str) {
        if let Some(old) = self.running().remove(uid) {
            old.task.abort();
        }
    }

    /// Lets watches start (the controller runs).
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Stops every watch and refuses new ones (the controller stops).
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
        for (_, old) in self.running().drain() {
            old.task.abort();
        }
    }

    /// BenchClusters one of whose Nodes changed, for the controller's triggers.
    pub fn wakes(&self) -> impl Stream<Item = ObjectRef<BenchCluster>> + Send + 'static {
        super::operations::wake_stream(self.wake.subscribe())
    }
}

impl Drop for GuestWatches {
    fn drop(&mut self) {
        for running in self.running().values() {
            running.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use futures::channel::mpsc;
    use k8s_openapi::api::core::v1::Node;
    use kube::runtime::watcher::{self, Event};
    use secrecy::SecretString;

    use super::*;
    use crate::guest::node_watch::changes;
    use crate::guest::node_watch::tests::{node, without_label};

    fn names() -> ClusterNames {
        ClusterNames {
            namespace: "ns".into(),
            name: "c".into(),
            uid: "u".into(),
        }
    }

    fn kubeconfig(text: &str) -> AdminKubeconfig {
        AdminKubeconfig(SecretString::from(text.to_owned()))
    }

    /// Long enough for any wake to arrive; the paused clock skips it at once.
    const QUIET: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_removed_label_wakes_its_cluster_a_heartbeat_does_not() {
        let watches = GuestWatches::default();
        let mut wakes = Box::pin(watches.wakes());
        let (events, stream) = mpsc::unbounded::<Result<Event<Node>, watcher::Error>>();
        watches.watch(&names(), &kubeconfig("a"), || changes(stream));
        for event in [
            Event::Init,
            Event::InitApply(node("c-gpu-0", 10)),
            Event::InitApply(node("someone-else", 10)),
            Event::InitDone,
        ] {
            events.unbounded_send(Ok(event)).unwrap();
        }
        assert!(
            tokio::time::timeout(QUIET, wakes.next()).await.is_err(),
            "the first listing"
        );

        events
            .unbounded_send(Ok(Event::Apply(node("c-gpu-0", 20))))
            .unwrap();
        assert!(
            tokio::time::timeout(QUIET, wakes.next()).await.is_err(),
            "a heartbeat"
        );

        events
            .unbounded_send(Ok(Event::Apply(without_label(node("someone-else", 20)))))
            .unwrap();
        assert!(
            tokio::time::timeout(QUIET, wakes.next()).await.is_err(),
            "a Node not of this cluster"
        );

        events
            .unbounded_send(Ok(Event::Apply(without_label(node("c-gpu-0", 30)))))
            .unwrap();
        let woken = tokio::time::timeout(QUIET, wakes.next())
            .await
            .expect("a removed label wakes")
            .unwrap();
        assert_eq!(woken, ObjectRef::new("c").within("ns"));
    }

    /// Lets aborted tasks be dropped.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_watch_per_cluster_replaced_by_a_new_kubeconfig_stopped_by_cleanup() {
        let watches = GuestWatches::default();
        let started = AtomicUsize::new(0);
        let start = |kc: &str| {
            let (sender, stream) = mpsc::unbounded::<String>();
            watches.watch(&names(), &kubeconfig(kc), || {
                started.fetch_add(1, Ordering::SeqCst);
                stream
            });
            sender
        };
        let first = start("a");
        let again = start("a");
        settle().await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "one watch, not one per pass"
        );
        assert!(!first.is_closed());
        assert!(again.is_closed(), "the second stream was never polled");

        let second = start("b");
        settle().await;
        assert_eq!(started.load(Ordering::SeqCst), 2);
        assert!(first.is_closed(), "a new kubeconfig replaces the watch");
        assert!(!second.is_closed());

        watches.stop("u");
        settle().await;
        assert!(second.is_closed(), "stopped when the cluster is deleted");

        watches.close();
        let refused = start("b");
        assert_eq!(started.load(Ordering::SeqCst), 2, "closed: nothing starts");
        assert!(refused.is_closed());
        watches.open();
        let third = start("b");
        settle().await;
        assert!(!third.is_closed());
        watches.close();
        settle().await;
        assert!(third.is_closed(), "closing stops every watch");
    }
}
