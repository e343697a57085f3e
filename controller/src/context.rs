//! State shared by every reconcile: clients, the two edges, settings, and the
//! in-memory provisioning timelines behind the phase timings.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use benchcluster_crd::PhaseTimings;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use parking_lot::Mutex;

use crate::guest::Guest;
use crate::hypervisor::Hypervisor;
use crate::metrics::{Metrics, Phase};
use crate::names::NodeId;
use crate::operations::Operations;

/// Field manager of every server-side apply this controller makes.
pub const FIELD_MANAGER: &str = "benchcluster-controller";

/// Timeouts and limits, in one place.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a running VM may go without a DHCP lease before the status says so.
    pub lease_timeout: Duration,
    /// Requeue interval while something is on its way (boot, lease, SSH).
    pub poll_interval: Duration,
    /// Requeue interval once converged, to notice drift behind the controller's back.
    pub resync_interval: Duration,
    /// Steps of different nodes of one cluster that run at once.
    pub max_parallel_steps: usize,
    /// BenchClusters reconciled at once; the others queue.
    pub max_concurrent_reconciles: u16,
    /// Backoff after a failed reconcile: doubled per consecutive failure up to the cap.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(2),
            resync_interval: Duration::from_secs(300),
            max_parallel_steps: 64,
            max_concurrent_reconciles: 32,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(300),
        }
    }
}

/// When each provisioning phase of one node began and ended, as seen by this process.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub create_started: Option<Instant>,
    pub started: Option<Instant>,
    pub leased: Option<Instant>,
    pub reachable: Option<Instant>,
    pub kubeadm_done: Option<Instant>,
    pub timings: PhaseTimings,
    /// Phases completed since [`Context::timeline`] last took them for the metrics.
    completed: Vec<(Phase, Duration)>,
}

fn ms(duration: Duration) -> Option<u64> {
    u64::try_from(duration.as_millis()).ok()
}

impl Timeline {
    /// Records a completed phase: returns its timing for the status and keeps it for
    /// the phase histogram.
    fn complete(&mut self, phase: Phase, from: Instant, to: Instant) -> Option<u64> {
        let duration = to.saturating_duration_since(from);
        self.completed.push((phase, duration));
        ms(duration)
    }

    pub fn create_started(&mut self, now: Instant) {
        let completed = std::mem::take(&mut self.completed);
        *self = Timeline {
            create_started: Some(now),
            completed,
            ..Timeline::default()
        };
    }

    /// The domain is about to be (re)defined: a new incarnation of the node begins and
    /// its timings start over. An overlay created for it counts towards the definition;
    /// a disk kept from an earlier incarnation (whose domain was destroyed behind the
    /// controller's back) does not.
    pub fn define_started(&mut self, now: Instant) {
        let disk_just_created = self.create_started.is_some() && self.timings.define_ms.is_none();
        if !disk_just_created {
            self.create_started(now);
        }
    }

    /// Whether this process saw the node's current incarnation being created, so the
    /// timeline holds all of its timings (not only those since an adoption).
    pub fn saw_creation(&self) -> bool {
        self.create_started.is_some()
    }

    pub fn defined(&mut self, now: Instant) {
        if let Some(t) = self.create_started {
            self.timings.define_ms = self.complete(Phase::Define, t, now);
        }
    }

    pub fn booted(&mut self, boot_started: Instant, now: Instant) {
        self.timings.boot_ms = self.complete(Phase::Boot, boot_started, now);
        self.started = Some(now);
        // A new boot: its lease and SSH are awaited (and probed) again.
        self.leased = None;
        self.reachable = None;
    }

    pub fn leased(&mut self, now: Instant) {
        if self.leased.is_none() {
            self.leased = Some(now);
            if let Some(t) = self.started {
                self.timings.lease_ms = self.complete(Phase::Lease, t, now);
            }
        }
    }

    pub fn reachable(&mut self, now: Instant) {
        if self.reachable.is_none() {
            self.reachable = Some(now);
            if let Some(t) = self.leased {
                self.timings.ssh_ms = self.complete(Phase::Ssh, t, now);
            }
        }
    }

    pub fn initialised(&mut self, began: Instant, now: Instant) {
        self.timings.init_ms = self.complete(Phase::Init, began, now);
        self.kubeadm_done = Some(now);
    }

    pub fn joined(&mut self, began: Instant, now: Instant) {
        self.timings.join_ms = self.complete(Phase::Join, began, now);
        self.kubeadm_done = Some(now);
    }

    pub fn node_ready(&mut self, now: Instant) {
        if self.timings.ready_ms.is_none()
            && let Some(t) = self.kubeadm_done
        {
            self.timings.ready_ms = self.complete(Phase::NodeReady, t, now);
        }
    }

    /// How long a started VM has waited for its lease.
    pub fn lease_wait(&self, now: Instant) -> Option<Duration> {
        match (self.started, self.leased) {
            (Some(t), None) => Some(now.saturating_duration_since(t)),
            _ => None,
        }
    }
}

/// Locks `mutex`, also after a panic while it was held: every map behind these locks
/// stays consistent between statements, so a poisoned lock holds nothing half-written.
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
    failures: Mutex<HashMap<String, u32>>,
    /// Since when each BenchCluster's guest API has not answered, while it does not.
    outages: Mutex<HashMap<String, SystemTime>>,
    /// Whether the controller's watch has listed every BenchCluster once.
    synced: AtomicBool,
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
            failures: Mutex::new(HashMap::new()),
            outages: Mutex::new(HashMap::new()),
            synced: AtomicBool::new(false),
        }
    }

    /// Replaces the metrics (to share one registry with something built before).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs `f` on the node's timeline (created empty on first use). Each phase `f`
    /// completes is observed in the phase histogram here, once.
    pub fn timeline<T>(&self, uid: &str, node: NodeId, f: impl FnOnce(&mut Timeline) -> T) -> T {
        let mut map = self.timelines.lock();
        let timeline = map.entry((uid.to_owned(), node)).or_default();
        let result = f(timeline);
        for (phase, duration) in timeline.completed.drain(..) {
            self.metrics.phase(phase, duration);
        }
        result
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

    /// Drops the timelines of nodes that no longer exist.
    pub fn forget(&self, uid: &str, keep: impl Fn(NodeId) -> bool) {
        let mut map = self.timelines.lock();
        map.retain(|(u, node), _| u != uid || keep(*node));
    }

    /// Drops everything this process remembers of a deleted BenchCluster.
    pub fn forget_cluster(&self, uid: &str) {
        self.forget(uid, |_| false);
        self.outages.lock().remove(uid);
    }

    /// Records a failed reconcile and returns the backoff before the next attempt.
    pub fn backoff(&self, uid: &str) -> Duration {
        let mut map = self.failures.lock();
        let n = map.entry(uid.to_owned()).or_default();
        *n = n.saturating_add(1);
        let factor = 1u32 << (*n - 1).min(16);
        self.settings
            .backoff_base
            .saturating_mul(factor)
            .min(self.settings.backoff_cap)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn phases(t: &mut Timeline) -> Vec<Phase> {
        t.completed.drain(..).map(|(phase, _)| phase).collect()
    }

    #[test]
    fn each_phase_completes_once_per_provisioning() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Timeline::default();
        t.create_started(at(0));
        t.defined(at(10));
        t.booted(at(10), at(15));
        assert_eq!(phases(&mut t), [Phase::Define, Phase::Boot]);
        // Observe sees the lease and the Ready Node on every pass: counted once.
        t.leased(at(100));
        t.leased(at(200));
        t.reachable(at(300));
        t.reachable(at(400));
        t.joined(at(400), at(900));
        t.node_ready(at(1000));
        t.node_ready(at(2000));
        assert_eq!(
            phases(&mut t),
            [Phase::Lease, Phase::Ssh, Phase::Join, Phase::NodeReady]
        );
        assert_eq!(t.timings.lease_ms, Some(85));
        assert_eq!(t.timings.ready_ms, Some(100));
        // A recreated VM starts a new provisioning; nothing pending is lost.
        t.defined(at(2100));
        t.create_started(at(3000));
        assert_eq!(phases(&mut t), [Phase::Define]);
        assert_eq!(t.timings, PhaseTimings::default());
    }

    #[test]
    fn a_domain_redefined_on_its_kept_disk_starts_a_new_timeline() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Timeline::default();
        t.create_started(at(0));
        t.define_started(at(40));
        t.defined(at(50));
        t.booted(at(50), at(60));
        t.leased(at(100));
        t.reachable(at(200));
        t.joined(at(200), at(300));
        t.node_ready(at(400));
        // The overlay's creation is part of the first definition.
        assert_eq!(t.timings.define_ms, Some(50));
        phases(&mut t);

        // The domain vanished; the controller defines it again on the same disk.
        t.define_started(at(10_000));
        t.defined(at(10_010));
        t.booted(at(10_010), at(10_020));
        t.leased(at(10_100));
        t.reachable(at(10_200));
        t.joined(at(10_200), at(10_300));
        t.node_ready(at(10_400));
        assert_eq!(
            phases(&mut t),
            [
                Phase::Define,
                Phase::Boot,
                Phase::Lease,
                Phase::Ssh,
                Phase::Join,
                Phase::NodeReady
            ]
        );
        assert_eq!(
            t.timings,
            PhaseTimings {
                define_ms: Some(10),
                boot_ms: Some(10),
                lease_ms: Some(80),
                ssh_ms: Some(100),
                init_ms: None,
                join_ms: Some(100),
                ready_ms: Some(100),
            }
        );
    }
}
