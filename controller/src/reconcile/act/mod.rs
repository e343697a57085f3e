//! Stage 3: execute planned actions against the hypervisor and the guests.
//!
//! Steps of one node run in order; nodes run concurrently up to
//! `Settings::max_parallel_steps`. Each step is idempotent on its own, so a pass that
//! dies half-way is resumed by the next one. One function per action is in `steps`.
//!
//! kubeadm init and join and drains only start here, as background operations (see
//! [`super::operations`]); [`collect`] picks up their results at the start of a later
//! pass and does what follows them (the kubeconfig Secret, timings, events, failures).
//!
//! Nothing here writes a timeline: what happened travels back in the [`Outcome`]'s
//! stamps.

mod collect;
mod secrets;
mod steps;

use std::collections::BTreeMap;

use benchcluster_crd::BenchCluster;
use futures::StreamExt;
use kube::Resource;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use super::context::Context;
use super::observe::Observation;
use super::outcome::{Outcome, failure_message};
use super::plan::Action;
use super::timeline::Stamp;
use crate::error::Error;
use crate::guest::Guest;
use crate::hypervisor::Hypervisor;
use crate::names::{ClusterNames, NodeId};

pub use collect::collect;
pub use secrets::{SSH_PRIVATE_KEY, SSH_PUBLIC_KEY, delete_kubeconfig};
use steps::{StepResult, Steps};

/// How a node's steps of this pass ended.
enum NodeResult {
    Done,
    WaitingForSsh,
    Failed(Action, Error),
}

/// Runs the actions: per node in order, nodes concurrently.
pub async fn act<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    observation: &Observation,
    actions: Vec<Action>,
    ctx: &Context<H, G>,
) -> Outcome {
    let mut per_node: BTreeMap<NodeId, Vec<Action>> = BTreeMap::new();
    for action in actions {
        per_node.entry(action.node()).or_default().push(action);
    }
    let mut outcome = Outcome::default();
    let first_guest_step = per_node
        .values()
        .flatten()
        .copied()
        .find(|a| needs_credentials(*a));
    let credentials = match first_guest_step {
        None => None,
        Some(step) => match secrets::ssh_credentials(bc, ctx).await {
            Ok(credentials) => Some(credentials),
            Err(error) => {
                // Without the key no guest step can run; the others still can.
                for steps in per_node.values_mut() {
                    if let Some(pos) = steps.iter().position(|a| needs_credentials(*a)) {
                        steps.truncate(pos);
                    }
                }
                outcome.failures.push((step, error));
                None
            }
        },
    };

    let steps = Steps {
        bc,
        names,
        observation,
        credentials: credentials.as_ref(),
        ctx,
    };
    let results: Vec<(NodeId, NodeResult, Vec<Stamp>)> = futures::stream::iter(per_node)
        .map(|(id, actions)| {
            let steps = &steps;
            async move {
                let mut stamps = Vec::new();
                for action in actions {
                    // When a host step ends, the next observe reads the host anew.
                    let _changing = ctx.inventory.changing(action);
                    match steps.run(action, &mut stamps).await {
                        Ok(StepResult::Done) => {}
                        Ok(StepResult::WaitingForSsh) => {
                            return (id, NodeResult::WaitingForSsh, stamps);
                        }
                        Ok(StepResult::Started) => return (id, NodeResult::Done, stamps),
                        Err(e) => return (id, NodeResult::Failed(action, e), stamps),
                    }
                }
                (id, NodeResult::Done, stamps)
            }
        })
        .buffer_unordered(ctx.settings.max_parallel_steps.max(1))
        .collect()
        .await;

    for (id, result, stamps) in results {
        outcome.stamps.extend(stamps);
        match result {
            NodeResult::Done => {}
            NodeResult::WaitingForSsh => outcome.waiting_for_ssh.push(id),
            NodeResult::Failed(action, error) => {
                report_failure(bc, ctx, &mut outcome, action, error).await;
            }
        }
    }
    outcome.waiting_for_ssh.sort();
    outcome.retrying = retrying(names, ctx);
    outcome
}

/// Operations in flight again after an earlier attempt failed, with that failure.
fn retrying<H: Hypervisor, G: Guest>(
    names: &ClusterNames,
    ctx: &Context<H, G>,
) -> Vec<(Action, String)> {
    ctx.operations
        .in_flight(&names.uid)
        .into_iter()
        .filter_map(|(id, operation)| {
            let message = ctx.operations.last_failure(&names.uid, id)?;
            Some((Action::starting(operation, id), message))
        })
        .collect()
}

/// Logs a failed step, publishes its Warning event and adds it to the outcome.
async fn report_failure<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    ctx: &Context<H, G>,
    outcome: &mut Outcome,
    action: Action,
    error: Error,
) {
    warn!(?action, error = %error.chain(), "step failed");
    publish(
        bc,
        ctx,
        EventType::Warning,
        "StepFailed",
        "Reconcile",
        failure_message(action, &error),
    )
    .await;
    outcome.failures.push((action, error));
}

/// Steps that need the SSH key pair: guest steps log in with the private half, and a
/// new domain's seed authorizes the public half.
fn needs_credentials(action: Action) -> bool {
    matches!(
        action,
        Action::ProbeSsh(_)
            | Action::InitControlPlane
            | Action::JoinWorker(_)
            | Action::SwitchScheduler
            | Action::DefineDomain(_)
    )
}

/// Publishes an Event on the BenchCluster; failing to publish is logged, never fatal.
pub async fn publish<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    ctx: &Context<H, G>,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &bc.object_ref(&())).await {
        warn!(%error, reason, "cannot publish event");
    }
}
