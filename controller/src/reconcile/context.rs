//! State shared by every reconcile: clients, the two edges, settings, the background
//! operations, and what this process remembers between passes (timelines, failure
//! counts, guest API outages).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use benchcluster_crd::{BenchCluster, BenchClusterStatus};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, ResourceExt};
use parking_lot::Mutex;

use super::guest_watch::GuestWatches;
use super::inventory::HostInventory;
use super::operations::Operations;
use super::secret_index::SecretIndex;
use super::timeline::{Event, Stamp, Timeline};
use crate::guest::Guest;
use crate::hypervisor::Hypervisor;
use crate::metrics::Metrics;
use crate::names::NodeId;

pub use crate::FIELD_MANAGER;

/// A status this process wrote, at the object's revision the write produced.
struct Applied {
    revision: u64,
    status: BenchClusterStatus,
}

/// The object's resourceVersion as etcd's revision, which only grows. Opaque by
/// contract; an API server whose versions do not parse gets no memory (the watched
/// copy is used, as before).
fn revision(bc: &BenchCluster) -> Option<u64> {
    bc.resource_version()?.parse().ok()
}

/// Timeouts and limits, in one place.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a running VM may go without a DHCP lease before the status says so.
    pub dhcp_timeout: Duration,
    /// Requeue interval while something is on its way (boot, lease, SSH).
    pub poll_interval: Duration,
    /// Delay before the pass after one that changed the host (its changes are news).
    pub settle_interval: Duration,
    /// Requeue interval once converged, to notice drift behind the controller's back.
    pub resync_interval: Duration,
    /// Up to this fraction of a requeue interval is added at random, so clusters created
    /// together do not poll (or resync) in lockstep.
    pub requeue_jitter: f64,
    /// Steps of different nodes of one cluster that run at once.
    pub max_parallel_steps: usize,
    /// BenchClusters reconciled at once; the others queue.
    pub max_concurrent_reconciles: u16,
    /// Backoff after a failed reconcile: doubled per consecutive failure (plus jitter)
    /// up to the cap.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long one read of the host inventory serves the passes of every cluster (a
    /// tick); a host mutation of this process ends it early.
    pub inventory_ttl: Duration,
    /// vCPUs the host's domains may have per host CPU: the fit check before anything is
    /// created compares the sum of a cluster's nodes' vCPUs and those of the other
    /// domains on the host with the host's CPUs times this.
    pub cpu_overcommit: f64,
    /// Memory the host's domains may have per byte of host memory, likewise.
    pub memory_overcommit: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            dhcp_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(2),
            settle_interval: Duration::from_millis(50),
            resync_interval: Duration::from_secs(300),
            requeue_jitter: 0.25,
            max_parallel_steps: 64,
            max_concurrent_reconciles: 32,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(300),
            inventory_ttl: Duration::from_secs(1),
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
        }
    }
}

pub struct Context<H, G> {
    pub client: Client,
    pub hypervisor: H,
    /// Shared with the background operations that run guest steps.
    pub guest: Arc<G>,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    timelines: Mutex<HashMap<(String, NodeId), Timeline>>,
    /// Long guest operations in flight (kubeadm init and join, drains).
    pub operations: Operations,
    /// The watch of each reachable guest cluster's Nodes.
    pub guest_watches: GuestWatches,
    /// The kubeconfig and SSH key Secrets, from watches once the run loop syncs them.
    pub secrets: SecretIndex,
    /// Backoff of each BenchCluster whose last pass failed.
    failures: Mutex<HashMap<String, ExponentialBackoff>>,
    /// Since when each BenchCluster's guest API has not answered, while it does not.
    outages: Mutex<HashMap<String, SystemTime>>,
    /// The status this process last applied to each BenchCluster, as the API server
    /// returned it: what the next pass compares with while the watch has not caught up.
    applied: Mutex<HashMap<String, Applied>>,
    /// Whether the controller's watch has listed every BenchCluster once.
    synced: AtomicBool,
    /// The libvirt host as observe reads it, shared by every cluster.
    pub inventory: HostInventory,
}

impl<H: Hypervisor, G: Guest> Context<H, G> {
    pub fn new(client: Client, hypervisor: H, guest: G, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            hypervisor,
            guest: Arc::new(guest),
            settings,
            metrics: Arc::new(Metrics::new()),
            timelines: Mutex::new(HashMap::new()),
            operations: Operations::default(),
            guest_watches: GuestWatches::default(),
            secrets: SecretIndex::default(),
            failures: Mutex::new(HashMap::new()),
            outages: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            synced: AtomicBool::new(false),
            inventory: HostInventory::default(),
        }
    }

    /// Replaces the metrics (to share one registry with something built before).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Applies a pass's stamps to the cluster's timelines, in order, and observes each
    /// phase they complete in the phase histogram, once: the one place timelines change.
    pub fn record(&self, uid: &str, stamps: impl IntoIterator<Item = Stamp>) {
        let mut map = self.timelines.lock();
        for stamp in stamps {
            let key = (uid.to_owned(), stamp.node);
            if stamp.event == Event::Removed {
                map.remove(&key);
                continue;
            }
            let timeline = map.entry(key).or_default();
            timeline.apply(&stamp);
            for (phase, duration) in timeline.take_completed() {
                self.metrics.phase(phase, duration);
            }
        }
    }

    /// Whether the controller's watch has synced (for readiness).
    pub fn watch_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub(crate) fn set_watch_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Release);
    }

    /// A copy of the node's timeline, if this process has one.
    pub fn timeline_snapshot(&self, uid: &str, node: NodeId) -> Option<Timeline> {
        let map = self.timelines.lock();
        map.get(&(uid.to_owned(), node)).cloned()
    }

    /// Drops everything this process remembers of a deleted BenchCluster.
    pub fn forget_cluster(&self, uid: &str) {
        self.timelines.lock().retain(|(u, _), _| u != uid);
        self.outages.lock().remove(uid);
        self.applied.lock().remove(uid);
    }

    /// The status the next write is compared with: the one this process last applied,
    /// unless the object at hand is newer (someone else wrote since, or this process
    /// restarted); the watched copy alone lags the controller's own writes, and a pass
    /// that outran the watch would write the same status again.
    pub fn last_status(&self, bc: &BenchCluster) -> BenchClusterStatus {
        let uid = bc.uid().unwrap_or_default();
        let seen = revision(bc);
        match self.applied.lock().get(&uid) {
            Some(applied) if seen.is_some_and(|seen| applied.revision >= seen) => {
                applied.status.clone()
            }
            _ => bc.status.clone().unwrap_or_default(),
        }
    }

    /// Remembers the status the API server returned for this process's write.
    pub fn applied_status(&self, written: &BenchCluster) {
        let (Some(uid), Some(revision)) = (written.uid(), revision(written)) else {
            return;
        };
        self.applied.lock().insert(
            uid,
            Applied {
                revision,
                status: written.status.clone().unwrap_or_default(),
            },
        );
    }

    /// Records a failed reconcile and returns the backoff before the next attempt:
    /// `backoff_base` doubled per consecutive failure, with up to as much again of random
    /// jitter (so clusters that failed together do not retry together), never beyond
    /// `backoff_cap`.
    pub fn backoff(&self, uid: &str) -> Duration {
        let (base, cap) = (self.settings.backoff_base, self.settings.backoff_cap);
        let mut map = self.failures.lock();
        let backoff = map.entry(uid.to_owned()).or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(base)
                .with_max_delay(cap)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build()
        });
        backoff.next().unwrap_or(cap).min(cap)
    }

    /// Records whether the BenchCluster's guest API answered in this pass, and returns
    /// since when it has not (the first pass that found it silent), while it does not.
    pub fn guest_api_outage(&self, uid: &str, answering: bool) -> Option<SystemTime> {
        let mut map = self.outages.lock();
        if answering {
            map.remove(uid);
            None
        } else {
            Some(*map.entry(uid.to_owned()).or_insert_with(SystemTime::now))
        }
    }

    /// Clears the failure count after a successful reconcile.
    pub fn succeeded(&self, uid: &str) {
        let mut map = self.failures.lock();
        map.remove(uid);
    }
}
