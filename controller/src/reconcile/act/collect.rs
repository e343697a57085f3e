//! Results of background operations that ended, and what follows each.

use std::time::Instant;

use benchcluster_crd::BenchCluster;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::super::context::Context;
use super::super::operations::{Ending, Finished, Output};
use super::super::outcome::{Outcome, SchedulerRejection, failure_message};
use super::super::plan::Action;
use super::super::timeline::{Event, Stamp};
use super::{publish, report_failure, secrets};
use crate::error::{Error, Result};
use crate::guest::{Guest, GuestError};
use crate::hypervisor::Hypervisor;
use crate::names::{ClusterNames, NodeId};

/// Collects the background operations of this BenchCluster that ended, and does what
/// follows each: on success what the step did once kubeadm returned (store the
/// kubeconfig, stamp the timing, publish the event), on failure what a failed step
/// does (Warning event, a failure in the outcome, so the pass backs off).
pub async fn collect<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    ctx: &Context<H, G>,
) -> Outcome {
    let uid = names.uid.as_str();
    let mut outcome = Outcome::default();
    for Finished {
        node: id,
        operation,
        began,
        ended,
        ending,
    } in ctx.operations.collect(uid)
    {
        let action = Action::starting(operation, id);
        let result = match ending {
            Ending::Finished(Ok(output)) => finish(bc, names, ctx, id, output, began, ended).await,
            // Rolled back: not a failure to retry, the spec has to change.
            Ending::Finished(Err(GuestError::SchedulerRejected {
                config_hash,
                image,
                message,
            })) => {
                warn!(config = %config_hash, error = %message, "kube-scheduler refused its configuration; rolled back");
                publish(
                    bc,
                    ctx,
                    EventType::Warning,
                    "SchedulerConfigRejected",
                    "SwitchScheduler",
                    format!("kube-scheduler refused configuration {config_hash} and was rolled back: {message}"),
                )
                .await;
                ctx.operations.clear_failure(uid, id);
                outcome.scheduler_rejected = Some(SchedulerRejection {
                    config_hash,
                    image,
                    message,
                });
                continue;
            }
            Ending::Finished(Err(error)) => Err(error.into()),
            Ending::Lost => Err(Error::OperationLost {
                operation: operation.as_str(),
            }),
        };
        match result {
            Ok(stamp) => {
                ctx.operations.clear_failure(uid, id);
                outcome.stamps.extend(stamp);
            }
            Err(error) => {
                ctx.operations
                    .remember_failure(uid, id, failure_message(action, &error));
                report_failure(bc, ctx, &mut outcome, action, error).await;
            }
        }
    }
    outcome
}

/// What follows a successful operation; the stamp it leaves on the node's timeline.
async fn finish<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    ctx: &Context<H, G>,
    id: NodeId,
    output: Output,
    began: Instant,
    ended: Instant,
) -> Result<Option<Stamp>> {
    let node = names.node(id);
    Ok(match output {
        Output::Initialised(kubeconfig) => {
            secrets::store_kubeconfig(bc, names, &kubeconfig, ctx).await?;
            info!(%node, "control plane initialised");
            publish(
                bc,
                ctx,
                EventType::Normal,
                "ControlPlaneInitialized",
                "KubeadmInit",
                node,
            )
            .await;
            Some(Stamp::new(id, ended, Event::Initialised { began }))
        }
        Output::Joined => {
            info!(%node, "worker joined");
            publish(
                bc,
                ctx,
                EventType::Normal,
                "WorkerJoined",
                "KubeadmJoin",
                node,
            )
            .await;
            Some(Stamp::new(id, ended, Event::Joined { began }))
        }
        Output::Drained => {
            publish(bc, ctx, EventType::Normal, "NodeDrained", "Drain", node).await;
            None
        }
        Output::SchedulerSwitched(running) => {
            let took = ended.saturating_duration_since(began);
            info!(config = %running.config_hash, image = %running.image, ?took, "scheduler switched");
            publish(
                bc,
                ctx,
                EventType::Normal,
                "SchedulerSwitched",
                "SwitchScheduler",
                format!(
                    "kube-scheduler runs configuration {} (healthy {:.1}s after the switch began)",
                    running.config_hash,
                    took.as_secs_f64()
                ),
            )
            .await;
            None
        }
    })
}
