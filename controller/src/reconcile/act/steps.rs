//! One function per planned action. Each is idempotent: run again after a pass died
//! half-way, it finds what it did and goes on.

use std::sync::Arc;
use std::time::Instant;

use benchcluster_crd::BenchCluster;
use benchcluster_crd::quantity::parse_bytes;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use tracing::info;

use super::super::context::Context;
use super::super::observe::Observation;
use super::super::operations::Output;
use super::super::plan::Action;
use super::super::pools;
use super::super::timeline::{Event, Stamp};
use super::super::world::Operation;
use super::{publish, secrets};
use crate::error::{Error, Result};
use crate::guest::{Credentials, Guest, GuestError, GuestNode, InitConfig, SchedulerSpec};
use crate::hypervisor::{DomainOwner, DomainSpec, Hypervisor, HypervisorError, OverlaySpec, Owner};
use crate::names::{ClusterNames, MAC_CANDIDATES, NodeId, Seed};
use crate::seed::{self, HostKey, Identity};

pub(super) enum StepResult {
    Done,
    WaitingForSsh,
    /// A background operation started (or runs already): the node's further steps
    /// wait for its result.
    Started,
}

/// What every step of one pass reads.
pub(super) struct Steps<'a, H, G> {
    pub bc: &'a BenchCluster,
    pub names: &'a ClusterNames,
    pub observation: &'a Observation,
    /// Loaded when a step of the pass needs them.
    pub credentials: Option<&'a Credentials>,
    pub ctx: &'a Context<H, G>,
}

impl<H: Hypervisor, G: Guest> Steps<'_, H, G> {
    /// Runs one action; what it did to the node's timeline goes into `stamps`.
    pub async fn run(&self, action: Action, stamps: &mut Vec<Stamp>) -> Result<StepResult> {
        match action {
            Action::CreateDisk(id) => self.create_disk(id, stamps).await,
            Action::DefineDomain(id) => self.define_domain(id, stamps).await,
            Action::StartDomain(id) => self.start_domain(id, stamps).await,
            Action::ProbeSsh(id) => self.probe_ssh(id, stamps).await,
            Action::ForgetCluster => self.forget_cluster().await,
            Action::InitControlPlane => self.init_control_plane(),
            Action::JoinWorker(id) => self.join_worker(id),
            Action::DrainNode(id) => self.drain_node(id),
            Action::Uncordon(id) => self.uncordon(id).await,
            Action::ConfigureNode(id) => self.configure_node(id).await,
            Action::SwitchScheduler => self.switch_scheduler(),
            Action::Abandon(id) => Ok(self.abandon(id)),
            Action::RemoveDomain(id) => self.remove_domain(id, stamps).await,
            Action::DeleteVolumes(id) => self.delete_volumes(id).await,
            Action::DeleteStraySeeds(id) => self.delete_stray_seeds(id).await,
        }
    }

    async fn create_disk(&self, id: NodeId, stamps: &mut Vec<Stamp>) -> Result<StepResult> {
        let spec = &self.bc.spec;
        stamps.push(Stamp::new(id, Instant::now(), Event::CreateStarted));
        let shape = pools::shape(spec, id).ok_or(Error::NotReady {
            action: "create a node's disk",
            requirement: "its pool is in the spec",
        })?;
        let image = shape.image;
        let capacity_bytes = parse_bytes(shape.disk).map_err(|source| Error::Quantity {
            field: "disk",
            source,
        })?;
        self.ctx
            .hypervisor
            .create_overlay(&OverlaySpec {
                name: self.names.disk_volume(id),
                base_image: image.volume.clone(),
                capacity_bytes,
            })
            .await?;
        Ok(StepResult::Done)
    }

    async fn define_domain(&self, id: NodeId, stamps: &mut Vec<Stamp>) -> Result<StepResult> {
        let (names, hv) = (self.names, &self.ctx.hypervisor);
        let started = Instant::now();
        let shape = pools::shape(&self.bc.spec, id).ok_or(Error::NotReady {
            action: "define a node's domain",
            requirement: "its pool is in the spec",
        })?;
        let (cpus, memory, image) = (shape.cpus, shape.memory, shape.image);
        let memory_bytes = parse_bytes(memory).map_err(|source| Error::Quantity {
            field: "memory",
            source,
        })?;
        let domain = names.domain(id);
        match hv.domain_owner(&domain).await? {
            // Defined by a pass whose status write did not land, or seen late: its
            // seed holds the host key pinned in its metadata; keep both.
            DomainOwner::Owned(owner) if owner.uid == names.uid => {
                return Ok(StepResult::Done);
            }
            DomainOwner::Owned(_) | DomainOwner::Foreign => {
                return Err(HypervisorError::NameConflict { name: domain }.into());
            }
            DomainOwner::Absent => {}
        }
        stamps.push(Stamp::new(id, started, Event::DefineStarted));
        let credentials = self.credentials.ok_or(Error::NotReady {
            action: "write a node's identity seed",
            requirement: "the SSH key Secret is loaded",
        })?;
        // A fresh host key per VM incarnation: its private half only ever exists in
        // the seed; the public half is pinned in the domain's metadata.
        let host_key = HostKey::generate()?;
        // The seed is named by the key, so no other pass ever writes this name: a pass
        // racing this one (another controller, a paused leader) writes its own, and
        // whichever definition wins boots from the seed of the key it pins. Written
        // before the domain that references it exists; the loser's is a stray.
        let seed_volume = names.seed_volume(id, &Seed::Keyed(host_key.tag().clone()));
        let hostname = names.node(id);
        let instance_id = format!("{}-{id}-{}", names.uid, host_key.fingerprint());
        let seed_image = seed::build(&Identity {
            hostname: &hostname,
            instance_id: &instance_id,
            user: &credentials.user,
            authorized_key: &credentials.public_key,
            host_key: &host_key,
        })?;
        // Claimed before the seed: a define that cannot get a MAC leaves nothing behind.
        let mac = self
            .ctx
            .inventory
            .claim_mac(names.mac_candidates(id))
            .ok_or_else(|| HypervisorError::NoFreeMac {
                domain: domain.clone(),
                tried: MAC_CANDIDATES,
            })?;
        hv.create_seed(&seed_volume, &seed_image).await?;
        hv.define_domain(&DomainSpec {
            name: domain,
            owner: Owner {
                uid: names.uid.clone(),
                namespace: names.namespace.clone(),
                name: names.name.clone(),
                node: id,
                host_key: Some(host_key.public_openssh.clone()),
            },
            vcpus: cpus,
            memory_bytes,
            disk_volume: names.disk_volume(id),
            seed_volume: Some(seed_volume),
            mac: mac.mac().to_owned(),
            network: self.bc.spec.network.name.clone(),
            firmware: image.firmware,
        })
        .await?;
        drop(mac);
        stamps.push(Stamp::new(id, Instant::now(), Event::Defined));
        Ok(StepResult::Done)
    }

    async fn start_domain(&self, id: NodeId, stamps: &mut Vec<Stamp>) -> Result<StepResult> {
        let started = Instant::now();
        let domain = self.names.domain(id);
        self.ctx.hypervisor.start_domain(&domain).await?;
        stamps.push(Stamp::new(id, Instant::now(), Event::Booted { started }));
        info!(%domain, "VM started");
        publish(
            self.bc,
            self.ctx,
            EventType::Normal,
            "VmStarted",
            "StartDomain",
            domain,
        )
        .await;
        Ok(StepResult::Done)
    }

    /// Proves the node answers over SSH; one that does not yet is still booting.
    async fn probe_ssh(&self, id: NodeId, stamps: &mut Vec<Stamp>) -> Result<StepResult> {
        let node = self.guest_node(id)?;
        let credentials = self.credentials("probe a node over SSH")?;
        match self.ctx.guest.probe(&node, credentials).await {
            Ok(()) => {
                stamps.push(Stamp::new(id, Instant::now(), Event::Reachable));
                Ok(StepResult::Done)
            }
            Err(GuestError::Unreachable { .. }) => Ok(StepResult::WaitingForSsh),
            Err(e) => Err(e.into()),
        }
    }

    async fn forget_cluster(&self) -> Result<StepResult> {
        secrets::delete_kubeconfig(self.names, self.ctx).await?;
        info!(
            node = %self.names.node(NodeId::CONTROL_PLANE),
            "control-plane disk gone: its cluster is forgotten and initialised anew"
        );
        Ok(StepResult::Done)
    }

    fn init_control_plane(&self) -> Result<StepResult> {
        let node = self.guest_node(NodeId::CONTROL_PLANE)?;
        let credentials = self.credentials("initialise the control plane")?.clone();
        // kube-scheduler's defaults first: the spec's configuration follows as a switch
        // (SwitchScheduler) once the control plane is up, so a configuration the
        // scheduler refuses is rolled back instead of failing kubeadm's health check.
        let config = InitConfig {
            scheduler: SchedulerSpec::default(),
            ..self.init_config()
        };
        let guest = Arc::clone(&self.ctx.guest);
        Ok(
            self.start_operation(NodeId::CONTROL_PLANE, Operation::Init, async move {
                guest
                    .init_control_plane(&node, &credentials, &config)
                    .await
                    .map(Output::Initialised)
            }),
        )
    }

    /// The kubeadm configuration the spec asks for.
    fn init_config(&self) -> InitConfig {
        InitConfig {
            kubernetes: self.bc.spec.kubernetes.clone(),
            scheduler: self.bc.spec.scheduler.clone(),
        }
    }

    fn switch_scheduler(&self) -> Result<StepResult> {
        let node = self.guest_node(NodeId::CONTROL_PLANE)?;
        let kubeconfig = self.kubeconfig("switch the scheduler")?;
        let credentials = self.credentials("switch the scheduler")?.clone();
        let config = self.init_config();
        let guest = Arc::clone(&self.ctx.guest);
        Ok(
            self.start_operation(NodeId::CONTROL_PLANE, Operation::Scheduler, async move {
                guest
                    .switch_scheduler(&node, &credentials, &kubeconfig, &config)
                    .await
                    .map(Output::SchedulerSwitched)
            }),
        )
    }

    fn join_worker(&self, id: NodeId) -> Result<StepResult> {
        let control_plane = self.guest_node(NodeId::CONTROL_PLANE)?;
        let worker = self.guest_node(id)?;
        let kubeconfig = self.kubeconfig("join a worker")?;
        let credentials = self.credentials("join a worker")?.clone();
        let registration = pools::registration(&self.bc.spec, id);
        let guest = Arc::clone(&self.ctx.guest);
        Ok(self.start_operation(id, Operation::Join, async move {
            guest
                .join_worker(
                    &control_plane,
                    &worker,
                    &credentials,
                    &kubeconfig,
                    &registration,
                )
                .await
                .map(|()| Output::Joined)
        }))
    }

    /// Puts its pool's labels and extended resources on the node's Node.
    async fn configure_node(&self, id: NodeId) -> Result<StepResult> {
        let kubeconfig = self.kubeconfig("configure a Node")?;
        let node = self.names.node(id);
        let config = pools::node_config(&self.bc.spec, id);
        self.ctx
            .guest
            .configure_node(&kubeconfig, &node, &config)
            .await?;
        info!(%node, labels = config.labels.len(), extended_resources = config.extended_resources.len(), "Node configured");
        Ok(StepResult::Done)
    }

    fn drain_node(&self, id: NodeId) -> Result<StepResult> {
        let kubeconfig = self.kubeconfig("drain a Node")?;
        let node = self.names.node(id);
        let guest = Arc::clone(&self.ctx.guest);
        Ok(self.start_operation(id, Operation::Drain, async move {
            guest
                .remove_node(&kubeconfig, &node)
                .await
                .map(|()| Output::Drained)
        }))
    }

    async fn uncordon(&self, id: NodeId) -> Result<StepResult> {
        let kubeconfig = self.kubeconfig("uncordon a Node")?;
        let node = self.names.node(id);
        self.ctx.guest.uncordon(&kubeconfig, &node).await?;
        info!(%node, "uncordoned: its removal was abandoned");
        Ok(StepResult::Done)
    }

    fn abandon(&self, id: NodeId) -> StepResult {
        if let Some(operation) = self.ctx.operations.abort(&self.names.uid, id) {
            info!(node = %self.names.node(id), operation = operation.as_str(), "abandoned");
        }
        StepResult::Done
    }

    async fn remove_domain(&self, id: NodeId, stamps: &mut Vec<Stamp>) -> Result<StepResult> {
        // Nothing may run on a VM that is going away.
        self.ctx.operations.abort(&self.names.uid, id);
        let domain = self.names.domain(id);
        self.ctx.hypervisor.remove_domain(&domain).await?;
        stamps.push(Stamp::new(id, Instant::now(), Event::Removed));
        info!(%domain, "VM removed");
        publish(
            self.bc,
            self.ctx,
            EventType::Normal,
            "VmRemoved",
            "RemoveDomain",
            domain,
        )
        .await;
        Ok(StepResult::Done)
    }

    async fn delete_volumes(&self, id: NodeId) -> Result<StepResult> {
        let hv = &self.ctx.hypervisor;
        hv.delete_volume(&self.names.disk_volume(id)).await?;
        // Every seed observed; one written since is seen, and deleted, by the next pass.
        for seed in self.observed_seeds(id) {
            hv.delete_volume(&self.names.seed_volume(id, &seed)).await?;
        }
        Ok(StepResult::Done)
    }

    /// Deletes the seeds observed as strays, once a direct read shows the domain still
    /// boots from another one. The observation may be stale: another pass may have
    /// removed the domain since and be about to define it again on a seed it just wrote,
    /// which must not go. Without the domain, nothing is deleted; the next pass decides.
    async fn delete_stray_seeds(&self, id: NodeId) -> Result<StepResult> {
        let strays = self
            .observation
            .world
            .node(id)
            .map(|node| node.stray_seeds())
            .unwrap_or_default();
        if strays.is_empty() {
            return Ok(StepResult::Done);
        }
        let (names, hv) = (self.names, &self.ctx.hypervisor);
        let booted = match hv.domain_owner(&names.domain(id)).await? {
            DomainOwner::Owned(owner) if owner.uid == names.uid => {
                owner.host_key.as_deref().and_then(seed::key_tag)
            }
            DomainOwner::Owned(_) | DomainOwner::Foreign | DomainOwner::Absent => None,
        };
        let Some(booted) = booted.map(Seed::Keyed) else {
            return Ok(StepResult::Done);
        };
        let mut deleted = 0;
        for stray in strays.iter().filter(|s| **s != booted) {
            hv.delete_volume(&names.seed_volume(id, stray)).await?;
            deleted += 1;
        }
        info!(node = %names.node(id), deleted, "stray seeds deleted");
        Ok(StepResult::Done)
    }

    fn observed_seeds(&self, id: NodeId) -> Vec<Seed> {
        self.observation
            .world
            .node(id)
            .map(|node| node.seeds.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Starts a background operation of the node; one already in flight is left alone.
    fn start_operation<F>(&self, id: NodeId, operation: Operation, work: F) -> StepResult
    where
        F: std::future::Future<Output = crate::guest::Result<Output>> + Send + 'static,
    {
        let started = self.ctx.operations.start(
            &self.names.uid,
            id,
            operation,
            ObjectRef::from_obj(self.bc),
            work,
        );
        if started {
            info!(node = %self.names.node(id), operation = operation.as_str(), "started");
        }
        StepResult::Started
    }

    /// The SSH credentials a guest step logs in with.
    fn credentials(&self, action: &'static str) -> Result<&Credentials> {
        self.credentials.ok_or(Error::NotReady {
            action,
            requirement: "SSH credentials are loaded",
        })
    }

    fn kubeconfig(&self, action: &'static str) -> Result<crate::guest::AdminKubeconfig> {
        self.observation.kubeconfig.clone().ok_or(Error::NotReady {
            action,
            requirement: "the admin kubeconfig is stored",
        })
    }

    fn guest_node(&self, id: NodeId) -> Result<GuestNode> {
        let observation = self.observation;
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
            name: self.names.node(id),
            ip,
            host_key,
        })
    }
}
