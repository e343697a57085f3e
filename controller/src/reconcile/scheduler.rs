//! The scheduler's part of the status: `status.scheduler`, the SchedulerReady
//! condition, and the configuration it refused (kept while the spec still asks for it,
//! so it is not tried again).

use benchcluster_crd::scheduler::{RejectedConfig, SchedulerStatus};
use benchcluster_crd::{BenchClusterSpec, BenchClusterStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::outcome::Outcome;
use super::world::{GuestCluster, World};

/// The configuration the scheduler refused that the spec still asks for: the one this
/// pass saw refused, else the one the previous status recorded.
pub fn rejected(
    spec: &BenchClusterSpec,
    previous: &BenchClusterStatus,
    outcome: &Outcome,
    now: &Time,
) -> Option<RejectedConfig> {
    let fresh = outcome.scheduler_rejected.as_ref().map(|r| RejectedConfig {
        config_hash: r.config_hash.clone(),
        image: r.image.clone(),
        message: r.message.clone(),
        at: now.clone(),
    });
    let kept = previous.scheduler.as_ref().and_then(|s| s.rejected.clone());
    fresh.or(kept).filter(|r| r.is_for(&spec.scheduler))
}

/// `status.scheduler`: what the guest API shows, else the last status's (the API may
/// be silent for a moment), with the refused configuration.
pub fn status(
    world: &World,
    previous: &BenchClusterStatus,
    rejected: Option<RejectedConfig>,
) -> Option<SchedulerStatus> {
    let mut status = match &world.scheduler {
        Some(s) => SchedulerStatus {
            config_hash: s.config_hash.clone(),
            image: Some(s.image.clone()).filter(|i| !i.is_empty()),
            since: s.started.clone(),
            healthy: s.healthy,
            rejected: None,
        },
        None => previous.scheduler.clone()?,
    };
    status.rejected = rejected;
    Some(status)
}

/// The SchedulerReady condition's status, reason and message.
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

/// A configuration and image as messages name them.
fn describe(config_hash: &str, image: Option<&str>) -> String {
    match image {
        None => format!("configuration {config_hash}"),
        Some(image) => format!("configuration {config_hash} with image {image}"),
    }
}

/// Whether the scheduler runs the spec's configuration and is healthy, and if not why.
pub fn readiness(
    spec: &BenchClusterSpec,
    world: &World,
    rejected: Option<&RejectedConfig>,
) -> Readiness {
    let wanted = describe(
        &spec.scheduler.config_hash(),
        spec.scheduler.image.as_deref(),
    );
    let not = |reason, message: String| Readiness {
        ready: false,
        reason,
        message,
    };
    let Some(running) = &world.scheduler else {
        return not(
            "Unknown",
            match &world.cluster {
                GuestCluster::Uninitialised => "the control plane is not initialised yet".into(),
                GuestCluster::Unreachable(_) => "the guest cluster's API does not answer".into(),
                GuestCluster::Reachable => {
                    "the scheduler's pod is not in the guest cluster's API yet".into()
                }
            },
        );
    };
    if let Some(rejected) = rejected {
        return not(
            "ConfigRejected",
            format!(
                "kube-scheduler refused {wanted}: {}; it runs {} (rolled back) until spec.scheduler changes",
                rejected.message,
                describe(&running.config_hash, running.custom_image.as_deref()),
            ),
        );
    }
    if !running.runs(&spec.scheduler) {
        return not(
            "Switching",
            format!(
                "switching from {} to {wanted}",
                describe(&running.config_hash, running.custom_image.as_deref())
            ),
        );
    }
    if !running.healthy {
        return not(
            "Unhealthy",
            format!("kube-scheduler with {wanted} is not running and ready"),
        );
    }
    Readiness {
        ready: true,
        reason: "Running",
        message: format!("kube-scheduler runs {wanted}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::reconcile::outcome::SchedulerRejection;
    use crate::reconcile::plan::tests::spec;
    use crate::reconcile::world::{NetworkState, RunningScheduler};

    fn world(running: Option<(&str, bool)>) -> World {
        World {
            network: NetworkState::Ready,
            nodes: BTreeMap::new(),
            cluster: GuestCluster::Reachable,
            operations: BTreeMap::new(),
            capacity: None,
            scheduler: running.map(|(hash, healthy)| RunningScheduler {
                config_hash: hash.into(),
                image: "registry.k8s.io/kube-scheduler:v1.35.4".into(),
                custom_image: None,
                started: None,
                healthy,
            }),
            rejected_scheduler: None,
        }
    }

    fn with_config(parallelism: i64) -> BenchClusterSpec {
        let mut spec = spec(1);
        spec.scheduler.config = Some(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "parallelism": parallelism,
            }))
            .unwrap(),
        );
        spec
    }

    fn now() -> Time {
        Time(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn ready_only_with_the_specs_configuration_running_healthy() {
        let spec = with_config(8);
        let wanted = spec.scheduler.config_hash();
        let r = readiness(&spec, &world(Some((&wanted, true))), None);
        assert!(r.ready);
        assert_eq!(r.reason, "Running");
        let r = readiness(&spec, &world(Some(("defaults", true))), None);
        assert_eq!((r.ready, r.reason), (false, "Switching"));
        assert!(r.message.contains(&wanted), "{}", r.message);
        let r = readiness(&spec, &world(Some((&wanted, false))), None);
        assert_eq!((r.ready, r.reason), (false, "Unhealthy"));
        let r = readiness(&spec, &world(None), None);
        assert_eq!((r.ready, r.reason), (false, "Unknown"));
        let mut custom = spec.clone();
        custom.scheduler.image = Some("localhost/sched:custom".into());
        let r = readiness(&custom, &world(Some((&wanted, true))), None);
        assert_eq!((r.ready, r.reason), (false, "Switching"));
        assert!(
            r.message.contains("localhost/sched:custom"),
            "{}",
            r.message
        );
    }

    #[test]
    fn a_refusal_is_kept_while_the_spec_asks_for_it_and_forgotten_after() {
        let spec = with_config(8);
        let wanted = spec.scheduler.config_hash();
        let outcome = Outcome {
            scheduler_rejected: Some(SchedulerRejection {
                config_hash: wanted.clone(),
                image: None,
                message: "\"NoSuchPlugin\" does not exist".into(),
            }),
            ..Outcome::default()
        };
        let fresh = rejected(&spec, &BenchClusterStatus::default(), &outcome, &now()).unwrap();
        assert_eq!(fresh.config_hash, wanted);

        let previous = BenchClusterStatus {
            scheduler: status(
                &world(Some(("defaults", true))),
                &BenchClusterStatus::default(),
                Some(fresh.clone()),
            ),
            ..BenchClusterStatus::default()
        };
        let kept = rejected(&spec, &previous, &Outcome::default(), &now());
        assert_eq!(kept.as_ref(), Some(&fresh));
        let r = readiness(&spec, &world(Some(("defaults", true))), kept.as_ref());
        assert_eq!((r.ready, r.reason), (false, "ConfigRejected"));
        assert!(r.message.contains("NoSuchPlugin"), "{}", r.message);

        // Another spec: the refusal goes, and the switch is due again.
        let edited = with_config(16);
        assert_eq!(
            rejected(&edited, &previous, &Outcome::default(), &now()),
            None
        );
    }

    #[test]
    fn the_last_known_scheduler_stays_in_status_while_the_api_is_silent() {
        let previous = BenchClusterStatus {
            scheduler: status(
                &world(Some(("defaults", true))),
                &BenchClusterStatus::default(),
                None,
            ),
            ..BenchClusterStatus::default()
        };
        let kept = status(&world(None), &previous, None).unwrap();
        assert_eq!(kept.config_hash, "defaults");
        assert_eq!(
            status(&world(None), &BenchClusterStatus::default(), None),
            None
        );
    }
}
