//! Long guest operations (kubeadm init and join, drains) as background tasks owned by
//! the [`Context`](crate::Context), keyed by BenchCluster UID and node.
//!
//! A pass starts an operation and returns at once; later passes see it in flight (the
//! planner starts nothing else for that node), and the first pass after it ended
//! collects its result. A finished task wakes its BenchCluster through the stream of
//! [`Operations::wakes`], which the controller merges into its triggers, so the result
//! is collected at once rather than on the next poll.
//!
//! Tasks are aborted when their node is removed or abandoned, when their BenchCluster
//! is deleted, and when the controller stops (shutdown or lost leadership): the next
//! leader's steps are idempotent and handle whatever kubeadm left half-done.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use benchcluster_crd::BenchCluster;
use futures::Stream;
use kube::runtime::reflector::ObjectRef;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

use super::world::Operation;
use crate::guest::{self, AdminKubeconfig};
use crate::names::NodeId;

/// Wakes buffered for the controller; more are dropped (lagging), and the requeue poll
/// still collects their results.
const WAKE_BUFFER: usize = 1024;

/// What a successful operation produced.
#[derive(Debug)]
pub enum Output {
    /// The admin kubeconfig of the initialised control plane.
    Initialised(AdminKubeconfig),
    Joined,
    Drained,
    /// The scheduler runs the spec's configuration.
    SchedulerSwitched(guest::RunningScheduler),
}

/// How an operation ended.
#[derive(Debug)]
pub enum Ending {
    Finished(guest::Result<Output>),
    /// The task ended without a result (it panicked).
    Lost,
}

/// An operation that ended, with its result, for the pass that collects it.
#[derive(Debug)]
pub struct Finished {
    pub node: NodeId,
    pub operation: Operation,
    pub began: Instant,
    pub ended: Instant,
    pub ending: Ending,
}

struct Running {
    operation: Operation,
    began: Instant,
    result: oneshot::Receiver<(Instant, guest::Result<Output>)>,
    task: JoinHandle<()>,
}

type Key = (String, NodeId);

/// The operations in flight of every BenchCluster, and the last failure of each node's
/// operation (shown while it is retried).
pub struct Operations {
    running: Mutex<HashMap<Key, Running>>,
    failures: Mutex<HashMap<Key, String>>,
    wake: broadcast::Sender<ObjectRef<BenchCluster>>,
    /// False once the controller stops: nothing new starts.
    open: AtomicBool,
}

impl Default for Operations {
    fn default() -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            wake: broadcast::channel(WAKE_BUFFER).0,
            open: AtomicBool::new(true),
        }
    }
}

impl Operations {
    fn running(&self) -> MutexGuard<'_, HashMap<Key, Running>> {
        self.running.lock()
    }

    fn failures(&self) -> MutexGuard<'_, HashMap<Key, String>> {
        self.failures.lock()
    }

    /// Starts `work` for the node unless an operation of the node is in flight already
    /// or the controller is stopping; returns whether it started. When it ends, `object`
    /// is woken.
    pub fn start<F>(
        &self,
        uid: &str,
        node: NodeId,
        operation: Operation,
        object: ObjectRef<BenchCluster>,
        work: F,
    ) -> bool
    where
        F: Future<Output = guest::Result<Output>> + Send + 'static,
    {
        if !self.open.load(Ordering::Acquire) {
            debug!(%node, operation = operation.as_str(), "controller stopping: not started");
            return false;
        }
        let mut running = self.running();
        let key = (uid.to_owned(), node);
        if running.contains_key(&key) {
            return false;
        }
        let (sender, result) = oneshot::channel();
        let wake = self.wake.clone();
        let task = tokio::spawn(async move {
            let outcome = work.await;
            // The result is in place before the wake, so the woken pass finds it.
            let _ = sender.send((Instant::now(), outcome));
            let _ = wake.send(object);
        });
        running.insert(
            key,
            Running {
                operation,
                began: Instant::now(),
                result,
                task,
            },
        );
        true
    }

    /// The operations of this BenchCluster that have not been collected yet.
    pub fn in_flight(&self, uid: &str) -> BTreeMap<NodeId, Operation> {
        self.running()
            .iter()
            .filter(|((u, _), _)| u == uid)
            .map(|((_, node), r)| (*node, r.operation))
            .collect()
    }

    /// Whether any operation of this BenchCluster has not been collected yet.
    pub fn any_in_flight(&self, uid: &str) -> bool {
        self.running().keys().any(|(u, _)| u == uid)
    }

    /// Takes the operations of this BenchCluster that ended.
    pub fn collect(&self, uid: &str) -> Vec<Finished> {
        let mut running = self.running();
        let mut ended = Vec::new();
        for ((u, node), r) in running.iter_mut() {
            if u != uid {
                continue;
            }
            let ending = match r.result.try_recv() {
                Ok((at, result)) => Some((at, Ending::Finished(result))),
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some((Instant::now(), Ending::Lost)),
            };
            if let Some((at, ending)) = ending {
                ended.push(Finished {
                    node: *node,
                    operation: r.operation,
                    began: r.began,
                    ended: at,
                    ending,
                });
            }
        }
        for finished in &ended {
            running.remove(&(uid.to_owned(), finished.node));
        }
        ended.sort_by_key(|f| f.node);
        ended
    }

    /// Aborts the node's operation, if one is in flight, and forgets its last failure.
    pub fn abort(&self, uid: &str, node: NodeId) -> Option<Operation> {
        let key = (uid.to_owned(), node);
        self.failures().remove(&key);
        let running = self.running().remove(&key)?;
        running.task.abort();
        Some(running.operation)
    }

    /// Aborts every operation of this BenchCluster and forgets its failures.
    pub fn abort_cluster(&self, uid: &str) {
        self.failures().retain(|(u, _), _| u != uid);
        self.running().retain(|(u, _), r| {
            if u == uid {
                r.task.abort();
            }
            u != uid
        });
    }

    /// Lets operations start (the controller runs).
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Aborts every operation and refuses new ones (the controller stops).
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
        let aborted: Vec<Running> = self.running().drain().map(|(_, r)| r).collect();
        for running in aborted {
            running.task.abort();
        }
        self.failures().clear();
    }

    /// Records how the node's last operation failed, for the status while it is retried.
    pub fn remember_failure(&self, uid: &str, node: NodeId, message: String) {
        self.failures().insert((uid.to_owned(), node), message);
    }

    /// Forgets the node's last failure (its operation succeeded).
    pub fn clear_failure(&self, uid: &str, node: NodeId) {
        self.failures().remove(&(uid.to_owned(), node));
    }

    /// The last failure of the node's operation, if it has not succeeded since.
    pub fn last_failure(&self, uid: &str, node: NodeId) -> Option<String> {
        self.failures().get(&(uid.to_owned(), node)).cloned()
    }

    /// BenchClusters whose operation just ended, for the controller's triggers.
    pub fn wakes(&self) -> impl Stream<Item = ObjectRef<BenchCluster>> + Send + 'static {
        wake_stream(self.wake.subscribe())
    }
}

/// The BenchClusters sent on a wake channel, as a stream for the controller's
/// triggers; it ends when the channel closes.
pub(super) fn wake_stream(
    receiver: broadcast::Receiver<ObjectRef<BenchCluster>>,
) -> impl Stream<Item = ObjectRef<BenchCluster>> + Send + 'static {
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(object) => return Some((object, receiver)),
                // Missed wakes are covered by the requeue poll.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

impl Drop for Operations {
    fn drop(&mut self) {
        for running in self.running().values() {
            running.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::guest::GuestError;

    fn object() -> ObjectRef<BenchCluster> {
        ObjectRef::new("c").within("ns")
    }

    #[tokio::test]
    async fn an_operation_starts_once_and_its_end_wakes_its_object() {
        let ops = Operations::default();
        let mut wakes = Box::pin(ops.wakes());
        let (release, released) = oneshot::channel::<()>();
        let node = NodeId::worker(0);
        assert!(ops.start("u", node, Operation::Join, object(), async move {
            let _ = released.await;
            Ok(Output::Joined)
        }));
        // A second start for the same node is refused while the first runs.
        assert!(!ops.start("u", node, Operation::Join, object(), async {
            Ok(Output::Joined)
        }));
        assert_eq!(
            ops.in_flight("u"),
            BTreeMap::from([(node, Operation::Join)])
        );
        assert!(ops.collect("u").is_empty());
        assert!(ops.in_flight("other").is_empty());

        release.send(()).unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(5), wakes.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(woken, object());
        let finished = ops.collect("u");
        assert_eq!(finished.len(), 1);
        assert!(matches!(
            finished[0].ending,
            Ending::Finished(Ok(Output::Joined))
        ));
        assert!(finished[0].ended >= finished[0].began);
        assert!(!ops.any_in_flight("u"));
    }

    #[tokio::test]
    async fn aborted_operations_never_report_and_a_closed_registry_starts_nothing() {
        let ops = Operations::default();
        let (keep, never) = oneshot::channel::<()>();
        let (ran_tx, ran) = oneshot::channel::<()>();
        assert!(ops.start(
            "u",
            NodeId::CONTROL_PLANE,
            Operation::Init,
            object(),
            async move {
                let _ = never.await;
                let _ = ran_tx.send(());
                Err(GuestError::Api("unreachable".into()))
            }
        ));
        ops.remember_failure("u", NodeId::CONTROL_PLANE, "earlier".into());
        ops.abort_cluster("u");
        assert!(!ops.any_in_flight("u"));
        assert_eq!(ops.last_failure("u", NodeId::CONTROL_PLANE), None);
        // Released now, the task would report; aborted, it drops its sender unsent.
        drop(keep);
        let ran = tokio::time::timeout(Duration::from_secs(5), ran)
            .await
            .unwrap();
        assert!(ran.is_err(), "the aborted task ran on");

        ops.close();
        assert!(!ops.start(
            "u",
            NodeId::CONTROL_PLANE,
            Operation::Init,
            object(),
            async { Ok(Output::Drained) }
        ));
        ops.open();
        assert!(ops.start(
            "u",
            NodeId::CONTROL_PLANE,
            Operation::Init,
            object(),
            async { Ok(Output::Drained) }
        ));
    }
}
