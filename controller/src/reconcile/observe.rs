//! Stage 1: read the hypervisor (the cluster's slice of the shared host inventory) and
//! the guest cluster into a [`World`].

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use benchcluster_crd::BenchCluster;
use secrecy::SecretString;
use tracing::debug;

use super::context::Context;
use super::pools::Capacity;
use super::timeline::{Event, Stamp};
use super::world::{
    GuestCluster, NetworkState, ObservedNode, RunningScheduler, VmSize, VmState, World,
};
use crate::error::{Error, Result};
use crate::guest::{AdminKubeconfig, Guest};
use crate::hypervisor::{DomainState, Hypervisor, Lease};
use crate::names::{ClusterNames, NodeId, VolumeKind};
use crate::seed;

/// Key of the admin kubeconfig in the `<name>-kubeconfig` Secret.
pub const KUBECONFIG_KEY: &str = "value";

/// What observe found: the world for the planner, and what the act stage needs
/// besides (the kubeconfig is a secret and stays out of the world).
pub struct Observation {
    pub world: World,
    pub kubeconfig: Option<AdminKubeconfig>,
    /// Pinned SSH host public key of each domain, from its metadata.
    pub host_keys: BTreeMap<NodeId, String>,
    /// Leases and Ready Nodes seen, for the nodes' timelines.
    pub stamps: Vec<Stamp>,
}

/// Whether a pass reads the guest cluster through its API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestApi {
    /// When its control-plane VM can answer: its Nodes decide init, join and drain.
    Ask,
    /// Never: the whole cluster is being deleted and goes away with its VMs.
    Skip,
}

pub async fn observe<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    ctx: &Context<H, G>,
    guest_api: GuestApi,
) -> Result<Observation> {
    let network_name = &bc.spec.network.name;
    let host = ctx
        .inventory
        .snapshot(&ctx.hypervisor, network_name, ctx.settings.inventory_ttl)
        .await?;
    let network = match host.network(network_name) {
        None => NetworkState::Missing,
        Some(n) if !n.active => NetworkState::Inactive,
        Some(n) if !n.dhcp => NetworkState::NoDhcp,
        Some(_) => NetworkState::Ready,
    };

    let mut nodes: BTreeMap<NodeId, ObservedNode> = BTreeMap::new();
    let mut host_keys: BTreeMap<NodeId, String> = BTreeMap::new();
    let prefix = names.domain_prefix();
    for domain in host.domains_of(&names.uid) {
        if !domain.name.starts_with(&prefix) {
            continue;
        }
        let id = domain.owner.node;
        let entry = nodes.entry(id).or_default();
        entry.domain = Some(match domain.state {
            DomainState::Running => VmState::Running,
            DomainState::Stopped => VmState::Stopped,
        });
        entry.mac = domain.mac.clone();
        entry.size = domain.footprint.map(|f| VmSize {
            vcpus: f.vcpus,
            memory_bytes: f.memory_bytes,
        });
        if let Some(key) = &domain.owner.host_key {
            host_keys.insert(id, key.clone());
        }
    }
    // A cluster's volumes are named after its domains, so they share its prefix. The
    // inventory lists volumes after domains: a seed is written before the domain booting
    // from it is defined, so a domain listed has its seed in the listing unless the seed
    // was deleted (a stopped domain whose seed is gone is defined again).
    for volume in host.volumes_starting_with(&prefix) {
        match names.volume_owner(volume) {
            Some((id, VolumeKind::Disk)) => nodes.entry(id).or_default().disk = true,
            Some((id, VolumeKind::Seed(seed))) => {
                nodes.entry(id).or_default().seeds.insert(seed);
            }
            None => {}
        }
    }
    // The seed a domain boots from is named by the host key it pins.
    for (id, key) in &host_keys {
        if let Some(node) = nodes.get_mut(id) {
            node.pinned_key = seed::key_tag(key);
        }
    }

    if network == NetworkState::Ready {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        for (id, node) in nodes.iter_mut() {
            if node.domain != Some(VmState::Running) {
                continue;
            }
            // The MAC the domain really has, else the one it most likely got.
            let mac = node.mac.clone().unwrap_or_else(|| names.mac(*id));
            node.ip = lease_for(host.leases(network_name, &mac), &mac, now_unix);
        }
    }

    let (cluster, kubeconfig, scheduler) = match guest_api {
        GuestApi::Ask => observe_guest_cluster(names, ctx, &mut nodes).await?,
        GuestApi::Skip => (
            GuestCluster::Unreachable("not asked: the BenchCluster is being deleted".into()),
            None,
            None,
        ),
    };

    // What this process saw of each node's progress is read here and stamped for the
    // driver to record: observe writes nothing.
    let now = Instant::now();
    let mut stamps = Vec::new();
    for (id, node) in nodes.iter_mut() {
        let timeline = ctx.timeline_snapshot(&names.uid, *id).unwrap_or_default();
        if node.ip.is_some() {
            stamps.push(Stamp::new(*id, now, Event::Leased));
        } else if node.domain == Some(VmState::Running) {
            node.waiting_for_lease = timeline.lease_wait(now);
        }
        if node.registered == Some(true) {
            stamps.push(Stamp::new(*id, now, Event::NodeReady));
        }
        node.reachable = timeline.reachable.is_some();
    }

    Ok(Observation {
        world: World {
            network,
            nodes,
            cluster,
            operations: ctx.operations.in_flight(&names.uid),
            capacity: host.host().map(|h| {
                let others = host.taken_by_others(&names.uid);
                Capacity {
                    cpus: h.cpus,
                    memory_bytes: h.memory_bytes,
                    cpu_overcommit: ctx.settings.cpu_overcommit,
                    memory_overcommit: ctx.settings.memory_overcommit,
                    taken: VmSize {
                        vcpus: others.vcpus,
                        memory_bytes: others.memory_bytes,
                    },
                }
            }),
            scheduler,
            // The driver's to set: it holds the last status and this pass's results.
            rejected_scheduler: None,
        },
        kubeconfig,
        host_keys,
        stamps,
    })
}

/// The address of an unexpired lease for exactly this MAC. A stale lease for another
/// MAC on the same address, or an expired one for ours, is never taken.
pub fn lease_for(leases: &[Lease], mac: &str, now_unix: i64) -> Option<std::net::Ipv4Addr> {
    leases
        .iter()
        .filter(|l| l.mac.eq_ignore_ascii_case(mac))
        .filter(|l| l.expiry_unix == 0 || l.expiry_unix > now_unix)
        .max_by_key(|l| {
            if l.expiry_unix == 0 {
                i64::MAX
            } else {
                l.expiry_unix
            }
        })
        .map(|l| l.ip)
}

async fn observe_guest_cluster<H: Hypervisor, G: Guest>(
    names: &ClusterNames,
    ctx: &Context<H, G>,
    nodes: &mut BTreeMap<NodeId, ObservedNode>,
) -> Result<(
    GuestCluster,
    Option<AdminKubeconfig>,
    Option<RunningScheduler>,
)> {
    let secret = ctx
        .secrets
        .kubeconfig(&ctx.client, &names.namespace, &names.kubeconfig_secret())
        .await
        .map_err(Error::kube("read the kubeconfig Secret"))?;
    let Some(kubeconfig) = secret
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(KUBECONFIG_KEY))
        .and_then(|bytes| std::str::from_utf8(&bytes.0).ok())
        .map(|text| AdminKubeconfig(SecretString::from(text.to_owned())))
    else {
        return Ok((GuestCluster::Uninitialised, None, None));
    };
    if let Some(reason) = control_plane_unavailable(nodes) {
        return Ok((
            GuestCluster::Unreachable(reason.into()),
            Some(kubeconfig),
            None,
        ));
    }
    match ctx.guest.cluster_nodes(&kubeconfig).await {
        Ok(cluster_nodes) => {
            for cluster_node in cluster_nodes {
                if let Some((_, node)) = nodes
                    .iter_mut()
                    .find(|(id, _)| names.node(**id) == cluster_node.name)
                {
                    node.registered = Some(cluster_node.ready);
                    node.cordoned = cluster_node.cordoned_for_removal;
                    node.labels = cluster_node.labels;
                    node.extended_resources = cluster_node.extended_resources;
                }
            }
            let control_plane = names.node(NodeId::CONTROL_PLANE);
            let scheduler = match ctx.guest.scheduler(&kubeconfig, &control_plane).await {
                Ok(scheduler) => scheduler,
                Err(error) => {
                    debug!(%error, "cannot read the scheduler's pod");
                    None
                }
            };
            Ok((GuestCluster::Reachable, Some(kubeconfig), scheduler))
        }
        Err(e) => Ok((
            GuestCluster::Unreachable(e.to_string()),
            Some(kubeconfig),
            None,
        )),
    }
}

/// Why the guest cluster's API cannot answer, when its control-plane VM says so
/// already: asking it anyway costs a client timeout on every pass.
fn control_plane_unavailable(nodes: &BTreeMap<NodeId, ObservedNode>) -> Option<&'static str> {
    match nodes.get(&NodeId::CONTROL_PLANE) {
        None | Some(ObservedNode { domain: None, .. }) => {
            Some("the control-plane VM does not exist")
        }
        Some(ObservedNode {
            domain: Some(VmState::Stopped),
            ..
        }) => Some("the control-plane VM is not running"),
        Some(ObservedNode { ip: None, .. }) => Some("the control-plane VM has no address yet"),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lease(mac: &str, ip: u8, expiry: i64) -> Lease {
        Lease {
            mac: mac.into(),
            ip: Ipv4Addr::new(192, 168, 222, ip),
            expiry_unix: expiry,
        }
    }

    #[test]
    fn the_guest_api_is_asked_only_while_its_control_plane_vm_can_answer() {
        let node = |domain, ip: Option<Ipv4Addr>| ObservedNode {
            domain,
            disk: true,
            ip,
            ..ObservedNode::default()
        };
        let ip = Some(Ipv4Addr::new(192, 168, 222, 10));
        let worker = (NodeId::worker(0), node(Some(VmState::Running), ip));
        let with_control_plane =
            |cp: ObservedNode| BTreeMap::from([(NodeId::CONTROL_PLANE, cp), worker.clone()]);
        assert!(control_plane_unavailable(&BTreeMap::from([worker.clone()])).is_some());
        for cp in [
            node(None, None),
            node(Some(VmState::Stopped), None),
            node(Some(VmState::Running), None),
        ] {
            assert!(
                control_plane_unavailable(&with_control_plane(cp.clone())).is_some(),
                "{cp:?}"
            );
        }
        assert_eq!(
            control_plane_unavailable(&with_control_plane(node(Some(VmState::Running), ip))),
            None
        );
    }

    #[test]
    fn only_an_unexpired_lease_for_our_own_mac_counts() {
        let ours = "52:54:00:aa:bb:cc";
        let leases = [
            lease("52:54:00:11:22:33", 10, 2_000), // another VM, same network
            lease(ours, 11, 500),                  // ours, expired
            lease("52:54:00:AA:BB:CC", 12, 2_000), // ours, upper case from dnsmasq
        ];
        assert_eq!(
            lease_for(&leases, ours, 1_000),
            Some(Ipv4Addr::new(192, 168, 222, 12))
        );
        assert_eq!(lease_for(&leases[..2], ours, 1_000), None);
        assert_eq!(
            lease_for(&[lease(ours, 13, 0)], ours, 1_000),
            Some(Ipv4Addr::new(192, 168, 222, 13))
        );
    }
}
