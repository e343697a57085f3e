//! What a pass did: the act stage's result, read by the status and the driver.

use super::plan::Action;
use super::timeline::Stamp;
use crate::error::Error;
use crate::names::NodeId;

/// A scheduler configuration (and image) refused, and the scheduler's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerRejection {
    pub config_hash: String,
    pub image: Option<String>,
    pub message: String,
}

/// What one pass achieved.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Steps that failed, with the step that failed.
    pub failures: Vec<(Action, Error)>,
    /// Nodes whose SSH did not answer yet: not a failure, a reason to poll again.
    pub waiting_for_ssh: Vec<NodeId>,
    /// Operations in flight again after an earlier attempt failed, with that failure:
    /// the status keeps showing it until an attempt succeeds.
    pub retrying: Vec<(Action, String)>,
    /// What happened to the nodes, in order, for their timelines.
    pub stamps: Vec<Stamp>,
    /// A scheduler configuration refused (and rolled back) in this pass.
    pub scheduler_rejected: Option<SchedulerRejection>,
}

impl Outcome {
    /// Adds what another part of the pass achieved; its failures come first.
    pub fn absorb(&mut self, earlier: Outcome) {
        let later = std::mem::replace(&mut self.failures, earlier.failures);
        self.failures.extend(later);
        self.waiting_for_ssh.extend(earlier.waiting_for_ssh);
        self.waiting_for_ssh.sort();
        self.retrying.extend(earlier.retrying);
        let later = std::mem::replace(&mut self.stamps, earlier.stamps);
        self.stamps.extend(later);
        self.scheduler_rejected = self
            .scheduler_rejected
            .take()
            .or(earlier.scheduler_rejected);
    }

    /// The first failure as the pass's error, for the backoff policy.
    pub fn into_error(mut self) -> Option<Error> {
        if self.failures.is_empty() {
            return None;
        }
        let failed = self.failures.len();
        let (action, first) = self.failures.swap_remove(0);
        Some(Error::Steps {
            failed,
            step: format!("{action:?}"),
            first: Box::new(first),
        })
    }
}

/// How a failed step reads in conditions and events.
pub fn failure_message(action: Action, error: &Error) -> String {
    format!("{action:?}: {}", error.chain())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Instant;

    use super::*;
    use crate::reconcile::timeline::Event;

    fn failed(requirement: &'static str) -> Error {
        Error::NotReady {
            action: "test",
            requirement,
        }
    }

    #[test]
    fn what_happened_earlier_comes_first() {
        let t0 = Instant::now();
        let node = NodeId::worker(0);
        let mut later = Outcome {
            failures: vec![(Action::StartDomain(node), failed("later"))],
            waiting_for_ssh: vec![NodeId::worker(3)],
            stamps: vec![Stamp::new(node, t0, Event::Leased)],
            ..Outcome::default()
        };
        let earlier = Outcome {
            failures: vec![(Action::JoinWorker(node), failed("earlier"))],
            waiting_for_ssh: vec![NodeId::worker(1)],
            stamps: vec![Stamp::new(node, t0, Event::Joined { began: t0 })],
            ..Outcome::default()
        };
        later.absorb(earlier);
        assert_eq!(later.failures[0].0, Action::JoinWorker(node));
        assert_eq!(later.failures[1].0, Action::StartDomain(node));
        assert_eq!(
            later.waiting_for_ssh,
            [NodeId::worker(1), NodeId::worker(3)]
        );
        assert_eq!(later.stamps[0].event, Event::Joined { began: t0 });
        assert_eq!(later.stamps[1].event, Event::Leased);
        let error = later.into_error().unwrap();
        assert!(matches!(error, Error::Steps { failed: 2, .. }), "{error:?}");
        assert!(error.chain().contains("earlier"), "{}", error.chain());
    }

    #[test]
    fn no_failure_is_no_error() {
        assert!(Outcome::default().into_error().is_none());
    }
}
