//! Stage 3: execute planned actions against the hypervisor and the guests.
//!
//! Steps of one node run in order; nodes run concurrently up to
//! `Settings::max_parallel_steps`. Each step is idempotent on its own, so a pass that
//! dies half-way is resumed by the next one.
//!
//! kubeadm init and join and drains only start here, as background operations (see
//! [`crate::operations`]); [`collect`] picks up their results at the start of a later
//! pass and does what follows them (the kubeconfig Secret, timings, events, failures).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use benchcluster_crd::quantity::parse_bytes;
use benchcluster_crd::{BenchCluster, Role};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::guest::{
    AdminKubeconfig, Credentials, Guest, GuestError, GuestNode, InitConfig, Sensitive,
};
use crate::hypervisor::{DomainOwner, DomainSpec, Hypervisor, HypervisorError, OverlaySpec, Owner};
use crate::names::{ClusterNames, NodeId};
use crate::observe::{KUBECONFIG_KEY, Observation};
use crate::operations::{Ending, Finished, Output};
use crate::plan::Action;
use crate::seed::{self, HostKey, Identity};

/// Keys of a `kubernetes.io/ssh-auth` Secret.
pub const SSH_PRIVATE_KEY: &str = "ssh-privatekey";
pub const SSH_PUBLIC_KEY: &str = "ssh-publickey";

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
}

impl Outcome {
    /// Adds what another part of the pass achieved; its failures come first.
    pub fn absorb(&mut self, earlier: Outcome) {
        let later = std::mem::replace(&mut self.failures, earlier.failures);
        self.failures.extend(later);
        self.waiting_for_ssh.extend(earlier.waiting_for_ssh);
        self.waiting_for_ssh.sort();
        self.retrying.extend(earlier.retrying);
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

enum StepResult {
    Done,
    WaitingForSsh,
    /// A background operation started (or runs already): the node's further steps
    /// wait for its result.
    Started,
}

/// How a node's steps of this pass ended.
enum NodeResult {
    Done,
    WaitingForSsh(NodeId),
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
        Some(step) => match ssh_credentials(bc, ctx).await {
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

    let results: Vec<NodeResult> = futures::stream::iter(per_node)
        .map(|(id, steps)| {
            let credentials = credentials.as_ref();
            async move {
                for step in steps {
                    match run_step(bc, names, observation, step, credentials, ctx).await {
                        Ok(StepResult::Done) => {}
                        Ok(StepResult::WaitingForSsh) => return NodeResult::WaitingForSsh(id),
                        Ok(StepResult::Started) => return NodeResult::Done,
                        Err(e) => return NodeResult::Failed(step, e),
                    }
                }
                NodeResult::Done
            }
        })
        .buffer_unordered(ctx.settings.max_parallel_steps.max(1))
        .collect()
        .await;

    for result in results {
        match result {
            NodeResult::Done => {}
            NodeResult::WaitingForSsh(id) => outcome.waiting_for_ssh.push(id),
            NodeResult::Failed(action, error) => {
                report_failure(bc, ctx, &mut outcome, action, error).await;
            }
        }
    }
    outcome.waiting_for_ssh.sort();
    outcome
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

/// How a failed step reads in conditions and events.
pub fn failure_message(action: Action, error: &Error) -> String {
    format!("{action:?}: {}", error.chain())
}

/// Collects the background operations of this BenchCluster that ended, and does what
/// follows each: on success what the step did once kubeadm returned (store the
/// kubeconfig, record the timing, publish the event), on failure what a failed step
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
            Ending::Finished(Err(error)) => Err(error.into()),
            Ending::Lost => Err(Error::OperationLost {
                operation: operation.as_str(),
            }),
        };
        match result {
            Ok(()) => ctx.operations.clear_failure(uid, id),
            Err(error) => {
                ctx.operations
                    .remember_failure(uid, id, failure_message(action, &error));
                report_failure(bc, ctx, &mut outcome, action, error).await;
            }
        }
    }
    outcome
}

/// What follows a successful operation.
async fn finish<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    ctx: &Context<H, G>,
    id: NodeId,
    output: Output,
    began: Instant,
    ended: Instant,
) -> Result<()> {
    let uid = names.uid.as_str();
    let node = names.node(id);
    match output {
        Output::Initialised(kubeconfig) => {
            store_kubeconfig(bc, names, &kubeconfig, ctx).await?;
            ctx.timeline(uid, id, |t| t.initialised(began, ended));
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
        }
        Output::Joined => {
            ctx.timeline(uid, id, |t| t.joined(began, ended));
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
        }
        Output::Drained => {
            publish(bc, ctx, EventType::Normal, "NodeDrained", "Drain", node).await;
        }
    }
    Ok(())
}

/// Starts a background operation of the node; one already in flight is left alone.
fn start_operation<H: Hypervisor, G: Guest, F>(
    bc: &BenchCluster,
    names: &ClusterNames,
    ctx: &Context<H, G>,
    id: NodeId,
    operation: crate::world::Operation,
    work: F,
) -> StepResult
where
    F: std::future::Future<Output = crate::guest::Result<Output>> + Send + 'static,
{
    if ctx
        .operations
        .start(&names.uid, id, operation, ObjectRef::from_obj(bc), work)
    {
        info!(node = %names.node(id), operation = operation.as_str(), "started");
    }
    StepResult::Started
}

/// Steps that need the SSH key pair: guest steps log in with the private half, and a
/// new domain's seed authorizes the public half.
fn needs_credentials(action: Action) -> bool {
    matches!(
        action,
        Action::ProbeSsh(_)
            | Action::InitControlPlane
            | Action::JoinWorker(_)
            | Action::DefineDomain(_)
    )
}

async fn ssh_credentials<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    ctx: &Context<H, G>,
) -> Result<Credentials> {
    let namespace = bc.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = bc.spec.ssh.key_secret.name.clone();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret = secrets
        .get_opt(&name)
        .await
        .map_err(Error::kube("read the SSH key Secret"))?
        .ok_or_else(|| Error::SshKeySecret {
            name: name.clone(),
            problem: "not found",
        })?;
    let mut data = secret.data.unwrap_or_default();
    let key = data
        .remove(SSH_PRIVATE_KEY)
        .ok_or_else(|| Error::SshKeySecret {
            name: name.clone(),
            problem: "has no ssh-privatekey",
        })?;
    let key = String::from_utf8(key.0).map_err(|_| Error::SshKeySecret {
        name: name.clone(),
        problem: "ssh-privatekey is not UTF-8",
    })?;
    let public_key = data
        .remove(SSH_PUBLIC_KEY)
        .and_then(|k| String::from_utf8(k.0).ok())
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty() && !k.contains(['\n', '\r']))
        .ok_or_else(|| Error::SshKeySecret {
            name,
            problem: "has no single-line UTF-8 ssh-publickey",
        })?;
    Ok(Credentials {
        user: bc.spec.ssh.user.clone(),
        private_key: Sensitive::new(key),
        public_key,
    })
}

fn guest_node(names: &ClusterNames, observation: &Observation, id: NodeId) -> Result<GuestNode> {
    let ip = observation
        .world
        .node(id)
        .and_then(|n| n.ip)
        .ok_or(Error::NotReady {
            action: "reach a node over SSH",
            requirement: "it has a DHCP lease",
        })?;
    let host_key = observation
        .host_keys
        .get(&id)
        .cloned()
        .ok_or(Error::NotReady {
            action: "trust a node's SSH host key",
            requirement: "its domain records the pinned key",
        })?;
    Ok(GuestNode {
        name: names.node(id),
        ip,
        host_key,
    })
}

async fn run_step<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    observation: &Observation,
    action: Action,
    credentials: Option<&Credentials>,
    ctx: &Context<H, G>,
) -> Result<StepResult> {
    let hv = &ctx.hypervisor;
    let uid = names.uid.as_str();
    let started = Instant::now();
    match action {
        Action::CreateDisk(id) => {
            ctx.timeline(uid, id, |t| t.create_started(started));
            let (template_disk, image) = match id.role {
                Role::ControlPlane => (&bc.spec.control_plane.disk, &bc.spec.control_plane.image),
                Role::Worker => (
                    &bc.spec.workers.template.disk,
                    &bc.spec.workers.template.image,
                ),
            };
            let capacity_bytes = parse_bytes(template_disk).map_err(|source| Error::Quantity {
                field: "disk",
                source,
            })?;
            hv.create_overlay(&OverlaySpec {
                name: names.disk_volume(id),
                base_image: image.volume.clone(),
                capacity_bytes,
            })
            .await?;
        }
        Action::DefineDomain(id) => {
            let (cpus, memory, image) = match id.role {
                Role::ControlPlane => {
                    let t = &bc.spec.control_plane;
                    (t.cpus, &t.memory, &t.image)
                }
                Role::Worker => {
                    let t = &bc.spec.workers.template;
                    (t.cpus, &t.memory, &t.image)
                }
            };
            let memory_bytes = parse_bytes(memory).map_err(|source| Error::Quantity {
                field: "memory",
                source,
            })?;
            let domain = names.domain(id);
            match hv.domain_owner(&domain).await? {
                // Defined by a pass whose status write did not land, or seen late:
                // its seed holds the host key pinned in its metadata; keep both.
                DomainOwner::Owned(owner) if owner.uid == names.uid => {
                    return Ok(StepResult::Done);
                }
                DomainOwner::Owned(_) | DomainOwner::Foreign => {
                    return Err(HypervisorError::NameConflict { name: domain }.into());
                }
                DomainOwner::Absent => {}
            }
            ctx.timeline(uid, id, |t| t.define_started(started));
            let credentials = credentials.ok_or(Error::NotReady {
                action: "write a node's identity seed",
                requirement: "the SSH key Secret is loaded",
            })?;
            // A fresh host key per VM incarnation: its private half only ever exists
            // in the seed; the public half is pinned in the domain's metadata.
            let host_key = HostKey::generate()?;
            let hostname = names.node(id);
            let instance_id = format!("{}-{id}-{}", names.uid, host_key.fingerprint());
            let seed_image = seed::build(&Identity {
                hostname: &hostname,
                instance_id: &instance_id,
                user: &credentials.user,
                authorized_key: &credentials.public_key,
                host_key: &host_key,
            })?;
            hv.create_seed(&names.seed_volume(id), &seed_image).await?;
            hv.define_domain(&DomainSpec {
                name: names.domain(id),
                owner: Owner {
                    uid: names.uid.clone(),
                    namespace: names.namespace.clone(),
                    name: names.name.clone(),
                    role: id.role,
                    index: id.index,
                    host_key: Some(host_key.public_openssh.clone()),
                },
                vcpus: cpus,
                memory_bytes,
                disk_volume: names.disk_volume(id),
                seed_volume: Some(names.seed_volume(id)),
                mac: names.mac(id),
                network: bc.spec.network.name.clone(),
                firmware: image.firmware,
            })
            .await?;
            ctx.timeline(uid, id, |t| t.defined(Instant::now()));
        }
        Action::StartDomain(id) => {
            hv.start_domain(&names.domain(id)).await?;
            ctx.timeline(uid, id, |t| t.booted(started, Instant::now()));
            info!(domain = %names.domain(id), "VM started");
            publish(
                bc,
                ctx,
                EventType::Normal,
                "VmStarted",
                "StartDomain",
                names.domain(id),
            )
            .await;
        }
        Action::ProbeSsh(id) => {
            let node = guest_node(names, observation, id)?;
            let credentials = credentials.ok_or(Error::NotReady {
                action: "probe a node over SSH",
                requirement: "SSH credentials are loaded",
            })?;
            if !probe(ctx, uid, id, &node, credentials).await? {
                return Ok(StepResult::WaitingForSsh);
            }
        }
        Action::ForgetCluster => {
            delete_kubeconfig(names, ctx).await?;
            info!(
                node = %names.node(NodeId::CONTROL_PLANE),
                "control-plane disk gone: its cluster is forgotten and initialised anew"
            );
        }
        Action::InitControlPlane => {
            let node = guest_node(names, observation, NodeId::CONTROL_PLANE)?;
            let credentials = credentials
                .ok_or(Error::NotReady {
                    action: "initialise the control plane",
                    requirement: "SSH credentials are loaded",
                })?
                .clone();
            let config = InitConfig {
                pod_subnet: bc.spec.kubernetes.pod_subnet.clone(),
                service_subnet: bc.spec.kubernetes.service_subnet.clone(),
            };
            let guest = Arc::clone(&ctx.guest);
            return Ok(start_operation(
                bc,
                names,
                ctx,
                NodeId::CONTROL_PLANE,
                crate::world::Operation::Init,
                async move {
                    guest
                        .init_control_plane(&node, &credentials, &config)
                        .await
                        .map(Output::Initialised)
                },
            ));
        }
        Action::JoinWorker(id) => {
            let control_plane = guest_node(names, observation, NodeId::CONTROL_PLANE)?;
            let worker = guest_node(names, observation, id)?;
            let kubeconfig = observation.kubeconfig.clone().ok_or(Error::NotReady {
                action: "join a worker",
                requirement: "the admin kubeconfig is stored",
            })?;
            let credentials = credentials
                .ok_or(Error::NotReady {
                    action: "join a worker",
                    requirement: "SSH credentials are loaded",
                })?
                .clone();
            let guest = Arc::clone(&ctx.guest);
            return Ok(start_operation(
                bc,
                names,
                ctx,
                id,
                crate::world::Operation::Join,
                async move {
                    guest
                        .join_worker(&control_plane, &worker, &credentials, &kubeconfig)
                        .await
                        .map(|()| Output::Joined)
                },
            ));
        }
        Action::DrainNode(id) => {
            let kubeconfig = observation.kubeconfig.clone().ok_or(Error::NotReady {
                action: "drain a Node",
                requirement: "the admin kubeconfig is stored",
            })?;
            let node = names.node(id);
            let guest = Arc::clone(&ctx.guest);
            return Ok(start_operation(
                bc,
                names,
                ctx,
                id,
                crate::world::Operation::Drain,
                async move {
                    guest
                        .remove_node(&kubeconfig, &node)
                        .await
                        .map(|()| Output::Drained)
                },
            ));
        }
        Action::Uncordon(id) => {
            let kubeconfig = observation.kubeconfig.as_ref().ok_or(Error::NotReady {
                action: "uncordon a Node",
                requirement: "the admin kubeconfig is stored",
            })?;
            ctx.guest.uncordon(kubeconfig, &names.node(id)).await?;
            info!(node = %names.node(id), "uncordoned: its removal was abandoned");
        }
        Action::Abandon(id) => {
            if let Some(operation) = ctx.operations.abort(uid, id) {
                info!(node = %names.node(id), operation = operation.as_str(), "abandoned");
            }
        }
        Action::RemoveDomain(id) => {
            // Nothing may run on a VM that is going away.
            ctx.operations.abort(uid, id);
            hv.remove_domain(&names.domain(id)).await?;
            ctx.forget(uid, |node| node != id);
            info!(domain = %names.domain(id), "VM removed");
            publish(
                bc,
                ctx,
                EventType::Normal,
                "VmRemoved",
                "RemoveDomain",
                names.domain(id),
            )
            .await;
        }
        Action::DeleteVolumes(id) => {
            hv.delete_volume(&names.disk_volume(id)).await?;
            hv.delete_volume(&names.seed_volume(id)).await?;
        }
    }
    Ok(StepResult::Done)
}

/// Proves the node answers over SSH. `Ok(false)` means "not yet": it is still booting.
async fn probe<H: Hypervisor, G: Guest>(
    ctx: &Context<H, G>,
    uid: &str,
    id: NodeId,
    node: &GuestNode,
    credentials: &Credentials,
) -> Result<bool> {
    match ctx.guest.probe(node, credentials).await {
        Ok(()) => {
            ctx.timeline(uid, id, |t| t.reachable(Instant::now()));
            Ok(true)
        }
        Err(GuestError::Unreachable { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn store_kubeconfig<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    kubeconfig: &AdminKubeconfig,
    ctx: &Context<H, G>,
) -> Result<()> {
    let owner = bc
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(names.kubeconfig_secret()),
            namespace: Some(names.namespace.clone()),
            owner_references: Some(vec![owner]),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    FIELD_MANAGER.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [(
                KUBECONFIG_KEY.to_owned(),
                ByteString(kubeconfig.0.expose().as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Secret::default()
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    secrets
        .patch(
            &names.kubeconfig_secret(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(Error::kube("store the kubeconfig Secret"))?;
    Ok(())
}

/// Deletes the `<name>-kubeconfig` Secret; one already gone is no error.
pub async fn delete_kubeconfig<H: Hypervisor, G: Guest>(
    names: &ClusterNames,
    ctx: &Context<H, G>,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    match secrets
        .delete(&names.kubeconfig_secret(), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(Error::kube("delete the kubeconfig Secret")(e)),
    }
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
