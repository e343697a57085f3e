//! When each node of a BenchCluster got how far, as seen by this process: the source of
//! the phase timings in the status and of the phase histogram.
//!
//! The stages never write timelines. They say what happened as [`Stamp`]s (observe: a
//! lease or a Ready Node seen; act: a disk created, a domain defined and started, SSH
//! answering, kubeadm done, a domain removed), carried in the pass's
//! [`Outcome`](super::Outcome), and the driver applies them once per pass, in the order
//! they happened, through [`Context::record`](super::Context::record): the one place a
//! timeline changes and a phase is observed in the histogram.

use std::time::{Duration, Instant};

use benchcluster_crd::PhaseTimings;

use crate::metrics::Phase;
use crate::names::NodeId;

/// Something that happened to a node in a pass, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub node: NodeId,
    pub at: Instant,
    pub event: Event,
}

/// What a [`Stamp`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Its disk is about to be created: a new node begins.
    CreateStarted,
    /// Its domain is about to be (re)defined.
    DefineStarted,
    Defined,
    /// Its domain was started; `at` is when it was running.
    Booted {
        started: Instant,
    },
    /// Observe found its lease.
    Leased,
    /// It answered over SSH.
    Reachable,
    /// `kubeadm init` returned on it.
    Initialised {
        began: Instant,
    },
    /// `kubeadm join` returned on it.
    Joined {
        began: Instant,
    },
    /// Observe found its Node Ready.
    NodeReady,
    /// Its domain was removed: its timeline goes with it.
    Removed,
}

impl Stamp {
    pub fn new(node: NodeId, at: Instant, event: Event) -> Self {
        Self { node, at, event }
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
    /// Phases completed since [`Timeline::take_completed`] last took them.
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

impl Timeline {
    /// Applies one stamp (not [`Event::Removed`], which drops the whole timeline).
    pub fn apply(&mut self, stamp: &Stamp) {
        let now = stamp.at;
        match stamp.event {
            Event::CreateStarted => self.create_started(now),
            Event::DefineStarted => self.define_started(now),
            Event::Defined => self.defined(now),
            Event::Booted { started } => self.booted(started, now),
            Event::Leased => self.leased(now),
            Event::Reachable => self.reachable(now),
            Event::Initialised { began } => self.initialised(began, now),
            Event::Joined { began } => self.joined(began, now),
            Event::NodeReady => self.node_ready(now),
            Event::Removed => {}
        }
    }

    /// Phases completed since the last call, for the phase histogram.
    pub fn take_completed(&mut self) -> Vec<(Phase, Duration)> {
        std::mem::take(&mut self.completed)
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
