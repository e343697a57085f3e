//! The driver: the finalizer, then a pass (observe, plan, act, status) or the cleanup;
//! and the controller's run loop.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benchcluster_crd::{BenchCluster, FINALIZER, NodeState};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Error as FinalizerError, Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::utils::PredicateConfig;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use super::act::{act, collect, delete_kubeconfig, publish};
use super::context::{Context, FIELD_MANAGER};
use super::observe::{GuestApi, observe};
use super::plan::{Action as PlannedAction, defer_retries, plan, plan_teardown};
use super::secret_index::{MANAGED_BY, SSH_AUTH_TYPE, Stores};
use super::timeline::Timeline;
use super::world::GuestCluster;
use super::{scheduler, status};
use crate::error::{Error, Result};
use crate::guest::Guest;
use crate::hypervisor::Hypervisor;
use crate::names::{ClusterNames, NodeId};

/// Reconciles one BenchCluster. The only top-level call is the finalizer, which
/// dispatches to `apply` or `cleanup`.
pub async fn reconcile<H: Hypervisor, G: Guest>(
    bc: Arc<BenchCluster>,
    ctx: Arc<Context<H, G>>,
) -> Result<Action> {
    let started = Instant::now();
    let namespace = bc.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    // `benchcluster`, not `name`: JSON logs put the span's own name under "name".
    let span = info_span!("reconcile", namespace = %namespace, benchcluster = %bc.name_any());
    let api: Api<BenchCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let uid = bc.uid().unwrap_or_default();
    let object = Arc::clone(&bc);
    let result = finalizer(&api, FINALIZER, bc, |event| async {
        match event {
            Finalizer::Apply(bc) => apply(&bc, &api, &ctx).await,
            Finalizer::Cleanup(bc) => cleanup(&bc, &ctx).await,
        }
    })
    .instrument(span.clone())
    .await
    .or_else(|error| match error {
        // A pass queued before the watch saw the deletion cleaned up again, then found
        // the object gone with its finalizer: nothing is left to do.
        FinalizerError::RemoveFinalizer(kube::Error::Api(status)) if status.is_not_found() => {
            debug!(parent: &span, "already deleted");
            Ok(Action::await_change())
        }
        error => Err(Error::Finalizer(Box::new(error))),
    });
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err());
    match &result {
        // A pass that started an operation has not succeeded yet: its operation may
        // still fail, and consecutive failures must keep growing the backoff.
        Ok(_) if ctx.operations.any_in_flight(&uid) => {}
        Ok(_) => ctx.succeeded(&uid),
        // Failed steps were published one by one where they failed; anything else
        // (observe, status, finalizer) is published here, so every failure is an Event.
        Err(error) if !steps_failed(error) => {
            publish(
                &object,
                &ctx,
                EventType::Warning,
                "ReconcileFailed",
                "Reconcile",
                error.chain(),
            )
            .instrument(span)
            .await;
        }
        Err(_) => {}
    }
    result
}

/// Whether the error is failed steps, whose Events the act stage published already.
fn steps_failed(error: &Error) -> bool {
    match error {
        Error::Steps { .. } => true,
        Error::Finalizer(inner) => matches!(
            inner.as_ref(),
            kube::runtime::finalizer::Error::ApplyFailed(Error::Steps { .. })
                | kube::runtime::finalizer::Error::CleanupFailed(Error::Steps { .. })
        ),
        _ => false,
    }
}

/// Requeue policy after a failed reconcile: exponential backoff per object.
pub fn error_policy<H: Hypervisor, G: Guest>(
    bc: Arc<BenchCluster>,
    error: &Error,
    ctx: Arc<Context<H, G>>,
) -> Action {
    let delay = ctx.backoff(&bc.uid().unwrap_or_default());
    warn!(
        namespace = bc.namespace().unwrap_or_default(),
        benchcluster = %bc.name_any(),
        error = %error.chain(),
        retry_in_s = delay.as_secs(),
        "reconcile failed"
    );
    Action::requeue(delay)
}

fn cluster_names(bc: &BenchCluster) -> Result<ClusterNames> {
    Ok(ClusterNames {
        namespace: bc.namespace().ok_or(Error::MissingMetadata("namespace"))?,
        name: bc.name_any(),
        uid: bc.uid().ok_or(Error::MissingMetadata("uid"))?,
    })
}

async fn apply<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    api: &Api<BenchCluster>,
    ctx: &Context<H, G>,
) -> Result<Action> {
    let names = cluster_names(bc)?;
    // Results of operations that ended first, so observe sees what they did.
    let mut collected = collect(bc, &names, ctx).await;
    ctx.record(&names.uid, std::mem::take(&mut collected.stamps));
    let mut observation = observe(bc, &names, ctx, GuestApi::Ask).await?;
    ctx.record(&names.uid, std::mem::take(&mut observation.stamps));
    ctx.guest_watches
        .follow(&names, &observation, ctx.guest.as_ref());
    let previous = ctx.last_status(bc);
    // A configuration the scheduler refused is not tried again until the spec changes.
    observation.world.rejected_scheduler =
        scheduler::rejected(&bc.spec, &previous, &collected, &status::now());
    let failed: Vec<NodeId> = collected.failures.iter().map(|(a, _)| a.node()).collect();
    let actions = defer_retries(plan(&bc.spec, &observation.world), &failed);
    debug!(?actions, "planned");
    let mut outcome = act(bc, &names, &observation, actions.clone(), ctx).await;
    ctx.record(&names.uid, std::mem::take(&mut outcome.stamps));
    outcome.absorb(collected);

    // A cluster that was initialised (its kubeconfig is stored) but whose API does not
    // answer is waited for, never initialised again; the status says since when.
    let silent_api = match &observation.world.cluster {
        GuestCluster::Unreachable(reason) if observation.kubeconfig.is_some() => Some(reason),
        _ => None,
    };
    let api_silent_since = ctx
        .guest_api_outage(&names.uid, silent_api.is_none())
        .map(|since| Time(Timestamp::try_from(since).unwrap_or_else(|_| Timestamp::now())));

    let timelines: BTreeMap<NodeId, Timeline> = observation
        .world
        .nodes
        .keys()
        .chain(
            super::plan::desired_nodes(&bc.spec)
                .collect::<Vec<_>>()
                .iter(),
        )
        .filter_map(|id| ctx.timeline_snapshot(&names.uid, *id).map(|t| (*id, t)))
        .collect();
    let next = status::compute(&status::Inputs {
        spec: &bc.spec,
        generation: bc.metadata.generation,
        names: &names,
        world: &observation.world,
        outcome: &outcome,
        previous: &previous,
        timelines: &timelines,
        settings: &ctx.settings,
        api_silent_since: api_silent_since.as_ref(),
        now: status::now(),
    });
    ctx.metrics.set_cluster_vms(
        &names.uid,
        next.nodes.iter().map(|node| (node.role, node.state)),
    );
    let became_ready = next
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
        && !previous
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
    if !status::same(&next, &previous) {
        let patched = patch_status(api, &names.name, &next).await;
        ctx.metrics.status_patched(patched.is_ok());
        ctx.applied_status(&patched?);
    }
    if became_ready {
        info!("cluster Ready");
        publish(
            bc,
            ctx,
            EventType::Normal,
            "Ready",
            "Reconcile",
            "all nodes Ready".into(),
        )
        .await;
    }

    if let Some(error) = outcome.into_error() {
        return Err(error);
    }
    if let (Some(reason), Some(since)) = (silent_api, &api_silent_since) {
        // Retried with the error backoff, so a long outage is not polled every pass.
        return Err(Error::GuestApiSilent {
            since: status::whole_seconds(since),
            reason: reason.clone(),
        });
    }
    let converged = actions.is_empty()
        && next
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
    let in_flight = ctx.operations.in_flight(&names.uid);
    Ok(
        if actions.iter().any(|a| {
            super::inventory::changes_host(*a) && !matches!(a, PlannedAction::StartDomain(_))
        }) {
            // This pass changed the host (made a disk, defined a VM, removed one): the
            // next pass has news to act on and follows at once, without waiting for a
            // poll. Not after a start alone: a VM that dies as it starts is restarted
            // at the poll's pace, not in a loop.
            Action::requeue(ctx.settings.settle_interval)
        } else if converged || bc.spec.paused || only_operations_pending(&next, &in_flight) {
            // Nothing to poll for: a change of the object, its Secrets or its VMs, or
            // the end of an operation, wakes the cluster; the resync is a safety net.
            Action::requeue(jittered(
                ctx.settings.resync_interval,
                ctx.settings.requeue_jitter,
            ))
        } else {
            // Waiting on something nothing announces: a boot, a DHCP lease, SSH, a Node
            // turning Ready, or the next step after this pass's own changes.
            Action::requeue(jittered(
                ctx.settings.poll_interval,
                ctx.settings.requeue_jitter,
            ))
        },
    )
}

/// Whether every node short of Ready waits on an operation in flight, whose end wakes
/// the cluster: then polling would only repeat the same pass.
fn only_operations_pending(
    status: &benchcluster_crd::BenchClusterStatus,
    in_flight: &BTreeMap<NodeId, super::world::Operation>,
) -> bool {
    !in_flight.is_empty()
        && status
            .nodes
            .iter()
            .filter(|n| !n.ready)
            .all(|n| status::node_id(n).is_some_and(|id| in_flight.contains_key(&id)))
}

/// `interval` plus a random part of up to `jitter` times more.
fn jittered(interval: Duration, jitter: f64) -> Duration {
    interval.mul_f64(1.0 + fastrand::f64() * jitter.clamp(0.0, 1.0))
}

/// Applies the status; returns the object as the API server stored it.
async fn patch_status(
    api: &Api<BenchCluster>,
    name: &str,
    status: &benchcluster_crd::BenchClusterStatus,
) -> Result<BenchCluster> {
    let patch = serde_json::json!({
        "apiVersion": "benchcluster.dev/v1alpha1",
        "kind": "BenchCluster",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("patch the status"))
}

/// Removes everything the cluster owns: workers, then the control plane, their disks,
/// and the kubeconfig Secret. Returns only when nothing is left, so the finalizer is
/// removed only then.
async fn cleanup<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    ctx: &Context<H, G>,
) -> Result<Action> {
    if bc.spec.paused {
        return Ok(Action::requeue(ctx.settings.resync_interval));
    }
    let names = cluster_names(bc)?;
    // Nothing may keep running on VMs about to go; their results are of no use.
    ctx.operations.abort_cluster(&names.uid);
    ctx.guest_watches.stop(&names.uid);
    // Workers go in the first pass, the control plane in the second; a third finds
    // nothing unless something failed or appeared meanwhile.
    for _ in 0..3 {
        let mut observation = observe(bc, &names, ctx, GuestApi::Skip).await?;
        ctx.record(&names.uid, std::mem::take(&mut observation.stamps));
        ctx.metrics.set_cluster_vms(
            &names.uid,
            observation
                .world
                .nodes
                .keys()
                .map(|id| (id.role, NodeState::Deleting)),
        );
        let actions = plan_teardown(&observation.world);
        if actions.is_empty() && observation.world.nodes.is_empty() {
            delete_kubeconfig(&names, ctx).await?;
            ctx.forget_cluster(&names.uid);
            ctx.metrics.forget_cluster(&names.uid);
            info!("deleted");
            publish(
                bc,
                ctx,
                EventType::Normal,
                "Deleted",
                "Cleanup",
                "every VM, disk and the kubeconfig Secret removed".into(),
            )
            .await;
            return Ok(Action::await_change());
        }
        let mut outcome = act(bc, &names, &observation, actions, ctx).await;
        ctx.record(&names.uid, std::mem::take(&mut outcome.stamps));
        if let Some(error) = outcome.into_error() {
            return Err(error);
        }
    }
    let remaining = observe(bc, &names, ctx, GuestApi::Skip)
        .await?
        .world
        .nodes
        .len();
    Err(Error::CleanupIncomplete { remaining })
}

/// Runs the controller until `shutdown` resolves, over every namespace or only `namespace`.
///
/// In-flight reconciles finish before this returns (kube's graceful shutdown): a step is
/// never cut between creating something and recording its owner. Background guest
/// operations are aborted as soon as `shutdown` resolves, and when this returns or is
/// dropped: the next leader's idempotent steps take over whatever kubeadm left.
/// [`Context::watch_synced`] turns true once the watch has listed every BenchCluster,
/// and false again when this returns.
pub async fn run<H: Hypervisor, G: Guest>(
    ctx: Arc<Context<H, G>>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<BenchCluster> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    ctx.operations.open();
    ctx.guest_watches.open();
    let _close = CloseOperations(Arc::clone(&ctx));
    let stopping = Arc::clone(&ctx);
    let shutdown = async move {
        shutdown.await;
        stopping.operations.close();
        stopping.guest_watches.close();
    };
    // The watch feeds the store every event, but only changes of what a pass acts on
    // trigger one: the controller's own status writes do not.
    let (store, writer) = reflector::store();
    let triggers = reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic()),
    )
    .applied_objects()
    .predicate_filter(acted_on, PredicateConfig::default());
    // The Secrets passes read, watched: the kubeconfigs this controller owns (a change
    // wakes their owner) and the SSH key Secrets (a changed key wakes every
    // BenchCluster naming it).
    let secrets: Api<Secret> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (kubeconfigs, kubeconfig_writer) = reflector::store();
    let kubeconfig_watch = reflector(
        kubeconfig_writer,
        watcher(
            secrets.clone(),
            watcher::Config::default()
                .labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"))
                .any_semantic(),
        ),
    )
    .applied_objects();
    let (ssh_keys, ssh_writer) = reflector::store();
    let ssh_watch = reflector(
        ssh_writer,
        watcher(
            secrets,
            watcher::Config::default()
                .fields(SSH_AUTH_TYPE)
                .any_semantic(),
        ),
    )
    .applied_objects();
    let naming = store.clone();
    let controller = Controller::for_stream(triggers, store.clone())
        .owns_stream(kubeconfig_watch)
        .watches_stream(ssh_watch, move |secret: Secret| {
            let namespace = secret.namespace();
            let name = secret.name_any();
            naming
                .state()
                .into_iter()
                .filter(|bc| bc.namespace() == namespace && bc.spec.ssh.key_secret.name == name)
                .map(|bc| ObjectRef::from_obj(bc.as_ref()))
                .collect::<Vec<_>>()
        })
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(ctx.settings.max_concurrent_reconciles),
        )
        // A finished guest operation wakes its BenchCluster at once.
        .reconcile_on(ctx.operations.wakes())
        // So does a change of one of its guest Nodes that a pass acts on.
        .reconcile_on(ctx.guest_watches.wakes());
    let sync_ctx = Arc::clone(&ctx);
    let synced = async move {
        let listed = async {
            if store.wait_until_ready().await.is_ok() {
                info!("watch synced");
                sync_ctx.set_watch_synced(true);
            }
        };
        // Independent of the readiness above: until the Secrets are listed, passes read
        // them from the API.
        let secrets_listed = async {
            let (kubeconfigs_listed, ssh_keys_listed) =
                futures::join!(kubeconfigs.wait_until_ready(), ssh_keys.wait_until_ready());
            if kubeconfigs_listed.is_ok() && ssh_keys_listed.is_ok() {
                debug!("Secret watches synced");
                sync_ctx.secrets.install(Stores {
                    kubeconfigs,
                    ssh_keys,
                });
            }
        };
        futures::join!(listed, secrets_listed);
        // Keep the join below waiting on the controller alone.
        std::future::pending::<()>().await;
    };
    let controller = controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => {
                    debug!(namespace = ?object.namespace, benchcluster = %object.name, "reconciled")
                }
                Err(error) => debug!(%error, "reconcile error"),
            }
        });
    futures::pin_mut!(synced, controller);
    futures::future::select(controller, synced).await;
    ctx.secrets.uninstall();
    ctx.set_watch_synced(false);
    info!("controller stopped");
}

/// What a pass acts on, hashed: the spec (generation), deletion, finalizers, and the
/// object's identity. Status, managed fields and resourceVersion are left out, so a
/// status write (the controller's own, mostly) triggers nothing.
fn acted_on(bc: &BenchCluster) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    bc.metadata.uid.hash(&mut hasher);
    bc.metadata.generation.hash(&mut hasher);
    bc.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    bc.metadata.finalizers.hash(&mut hasher);
    Some(hasher.finish())
}

/// Aborts every background operation and guest Node watch when the controller's run
/// ends, however it ends (returned, or its task aborted as a crash would).
struct CloseOperations<H: Hypervisor, G: Guest>(Arc<Context<H, G>>);

impl<H: Hypervisor, G: Guest> Drop for CloseOperations<H, G> {
    fn drop(&mut self) {
        self.0.operations.close();
        self.0.guest_watches.close();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use benchcluster_crd::{BenchClusterStatus, NodeStatus, Role};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::reconcile::world::Operation;

    #[test]
    fn a_status_write_triggers_no_pass_a_spec_change_or_deletion_does() {
        let mut bc = BenchCluster::new("c", crate::reconcile::plan::tests::spec(1));
        bc.metadata.namespace = Some("ns".into());
        bc.metadata.uid = Some("u".into());
        bc.metadata.generation = Some(1);
        bc.metadata.resource_version = Some("10".into());
        let before = acted_on(&bc);
        bc.status = Some(BenchClusterStatus {
            ready_workers: 1,
            ..BenchClusterStatus::default()
        });
        bc.metadata.resource_version = Some("11".into());
        assert_eq!(acted_on(&bc), before, "status and resourceVersion");
        let mut edited = bc.clone();
        edited.metadata.generation = Some(2);
        assert_ne!(acted_on(&edited), before, "spec");
        let mut finalized = bc.clone();
        finalized.metadata.finalizers = Some(vec![FINALIZER.into()]);
        assert_ne!(acted_on(&finalized), before, "finalizer added");
        let mut deleted = bc.clone();
        deleted.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        assert_ne!(acted_on(&deleted), before, "deletion");
    }

    #[test]
    fn only_nodes_waiting_on_their_own_operation_need_no_poll() {
        let node = |role, index, ready| NodeStatus {
            name: format!("n{index}"),
            role,
            pool: None,
            index,
            domain: format!("d{index}"),
            mac: None,
            ip: None,
            state: NodeState::Joining,
            ready,
            timings: Default::default(),
        };
        let status = BenchClusterStatus {
            nodes: vec![
                node(Role::ControlPlane, 0, true),
                node(Role::Worker, 0, false),
                node(Role::Worker, 1, false),
            ],
            ..BenchClusterStatus::default()
        };
        let joining = |indexes: &[u32]| {
            indexes
                .iter()
                .map(|i| (NodeId::worker(*i), Operation::Join))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(only_operations_pending(&status, &joining(&[0, 1])));
        assert!(
            !only_operations_pending(&status, &joining(&[0])),
            "w1 boots"
        );
        assert!(!only_operations_pending(&status, &joining(&[])));
    }

    #[test]
    fn requeues_are_spread_over_a_quarter_more_at_most() {
        let base = Duration::from_secs(2);
        let delays: Vec<Duration> = (0..200).map(|_| jittered(base, 0.25)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= base && *d <= base.mul_f64(1.25))
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "spread, not one value");
        assert_eq!(jittered(base, 0.0), base);
    }
}
