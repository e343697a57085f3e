//! The host inventory that observe reads: one snapshot of the whole libvirt host
//! ([`Hypervisor::inventory`]) shared by the passes of every BenchCluster, indexed by
//! owner UID so a pass projects its cluster's slice in the time of its own nodes.
//!
//! - At most one refresh per tick (`Settings::inventory_ttl`): a snapshot taken less
//!   than a tick before a pass asks serves it.
//! - Single-flight: a pass that asks while a refresh runs waits for that one (when it
//!   can serve it) instead of starting another.
//! - Fresh after our own changes: every host mutation of the act stage bumps a
//!   generation when it ends ([`HostInventory::changing`]); a snapshot serves only the
//!   passes that asked at or below the generation it was started at, so the next
//!   observe after a mutation reads a snapshot begun after the mutation ended. Changes
//!   made behind the controller's back are seen within a tick.
//! - A failed refresh is the error of every pass that waited on it, and is not kept:
//!   the next pass refreshes again.
//!
//! - MACs: a define claims its MAC here ([`HostInventory::claim_mac`]): the first
//!   candidate that no domain of the newest snapshot holds and no other define of this
//!   process has claimed since that snapshot began.
//!
//! The direct read before creating a domain (`Hypervisor::domain_owner`, the guard
//! against duplicates after a restart or a stale view) does not go through here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::plan::Action;
use crate::hypervisor::{
    DomainInfo, DomainState, Footprint, HostCapacity, Hypervisor, HypervisorError, Inventory,
    Lease, NetworkInfo,
};

/// A network no pass asked for in this long is no longer read (its clusters are gone
/// or moved); longer than any resync interval in use.
const NETWORK_IDLE: Duration = Duration::from_secs(30 * 60);

/// The shared inventory: the latest snapshot, the refresh in flight, and the count of
/// host mutations made by this process.
#[derive(Default)]
pub struct HostInventory {
    /// Host mutations of this process that have ended.
    generation: AtomicU64,
    state: Mutex<State>,
    /// Held by the one refresh running; passes that need a newer snapshot queue here.
    turn: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The latest successful snapshot.
    current: Option<Arc<Snapshot>>,
    /// The latest failed refresh, by number, until a later one succeeds.
    failed: Option<(u64, Arc<HypervisorError>)>,
    flight: Option<Flight>,
    /// Refreshes started so far (the number of the latest).
    started: u64,
    /// The networks passes ask for, with when each was last asked for.
    networks: HashMap<String, Instant>,
    /// MACs claimed by defines of this process: `None` while the define runs, then the
    /// generation from which a snapshot shows its domain.
    claims: HashMap<String, Option<u64>>,
}

/// The refresh running now.
struct Flight {
    number: u64,
    generation: u64,
    networks: BTreeSet<String>,
}

/// One read of the whole host, indexed for observe.
#[derive(Debug)]
pub struct Snapshot {
    number: u64,
    generation: u64,
    /// When its read began.
    taken: Instant,
    /// Domains with owner metadata, by owner UID.
    domains: HashMap<String, Vec<DomainInfo>>,
    /// Node-pool volume names, sorted (a cluster's share by name prefix).
    volumes: BTreeSet<String>,
    networks: HashMap<String, NetworkSlice>,
    host: Option<HostCapacity>,
    /// Every MAC a domain on the host holds, lowercase.
    macs: HashSet<String>,
    /// What the domains that count take of the host: ours, by owner UID...
    taken_by: HashMap<String, Footprint>,
    /// ...and all of them.
    taken_by_all: Footprint,
}

#[derive(Debug)]
struct NetworkSlice {
    info: Option<NetworkInfo>,
    /// By lowercase MAC.
    leases: HashMap<String, Vec<Lease>>,
}

impl Snapshot {
    fn new(inventory: Inventory, number: u64, generation: u64, taken: Instant) -> Self {
        let mut macs = HashSet::new();
        let mut taken_by: HashMap<String, Footprint> = HashMap::new();
        let mut total = Footprint::default();
        // A BenchCluster's domain counts whatever its state (its controller starts it);
        // someone else's only while it runs.
        for domain in &inventory.domains {
            macs.extend(domain.mac.clone());
            if let Some(footprint) = domain.footprint {
                let own = taken_by.entry(domain.owner.uid.clone()).or_default();
                *own = own.plus(footprint);
                total = total.plus(footprint);
            }
        }
        for domain in &inventory.foreign {
            macs.extend(domain.macs.iter().cloned());
            if domain.state == DomainState::Running
                && let Some(footprint) = domain.footprint
            {
                total = total.plus(footprint);
            }
        }
        let mut domains: HashMap<String, Vec<DomainInfo>> = HashMap::new();
        for domain in inventory.domains {
            domains
                .entry(domain.owner.uid.clone())
                .or_default()
                .push(domain);
        }
        let networks = inventory
            .networks
            .into_iter()
            .map(|(name, network)| {
                let mut leases: HashMap<String, Vec<Lease>> = HashMap::new();
                for lease in network.leases {
                    leases
                        .entry(lease.mac.to_ascii_lowercase())
                        .or_default()
                        .push(lease);
                }
                let slice = NetworkSlice {
                    info: network.info,
                    leases,
                };
                (name, slice)
            })
            .collect();
        Self {
            number,
            generation,
            taken,
            domains,
            volumes: inventory.volumes.into_iter().collect(),
            networks,
            host: inventory.host,
            macs,
            taken_by,
            taken_by_all: total,
        }
    }

    /// What every domain on the host but this cluster's takes: other BenchClusters'
    /// domains whatever their state, someone else's while they run.
    pub fn taken_by_others(&self, uid: &str) -> Footprint {
        let own = self.taken_by.get(uid).copied().unwrap_or_default();
        Footprint {
            vcpus: self.taken_by_all.vcpus.saturating_sub(own.vcpus),
            memory_bytes: self
                .taken_by_all
                .memory_bytes
                .saturating_sub(own.memory_bytes),
        }
    }

    /// The host's capacity, when the hypervisor said.
    pub fn host(&self) -> Option<HostCapacity> {
        self.host
    }

    /// The domains carrying this owner UID, by name.
    pub fn domains_of(&self, uid: &str) -> &[DomainInfo] {
        self.domains.get(uid).map(Vec::as_slice).unwrap_or_default()
    }

    /// Node-pool volumes whose names start with `prefix`.
    pub fn volumes_starting_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> {
        self.volumes
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .map(String::as_str)
            .take_while(move |name| name.starts_with(prefix))
    }

    /// The network, `None` when it does not exist (or was not read).
    pub fn network(&self, name: &str) -> Option<&NetworkInfo> {
        self.networks.get(name)?.info.as_ref()
    }

    /// Leases on `network` for `mac` (any case).
    pub fn leases(&self, network: &str, mac: &str) -> &[Lease] {
        self.networks
            .get(network)
            .and_then(|n| n.leases.get(&mac.to_ascii_lowercase()))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Whether it shows every mutation up to `generation` and covers `network`.
    fn serves(&self, generation: u64, network: &str) -> bool {
        self.generation >= generation && self.networks.contains_key(network)
    }

    fn fresh_at(&self, asked: Instant, ttl: Duration) -> bool {
        asked < self.taken + ttl
    }
}

impl HostInventory {
    /// A snapshot for a pass of a cluster on `network`: the current one while it is
    /// fresh (less than `ttl` old, no mutation of ours since it began), else the
    /// refresh in flight, else a new refresh.
    pub async fn snapshot<H: Hypervisor>(
        &self,
        hypervisor: &H,
        network: &str,
        ttl: Duration,
    ) -> Result<Arc<Snapshot>, HypervisorError> {
        let asked = Instant::now();
        let wanted = self.generation.load(Ordering::Acquire);
        // The first refresh whose result may serve this pass: the one in flight if it
        // began after our last mutation and reads our network, else the next.
        let first = {
            let mut state = self.state.lock();
            state.networks.insert(network.to_owned(), asked);
            if let Some(current) = &state.current
                && current.serves(wanted, network)
                && current.fresh_at(asked, ttl)
            {
                return Ok(Arc::clone(current));
            }
            match &state.flight {
                Some(f) if f.generation >= wanted && f.networks.contains(network) => f.number,
                _ => state.started + 1,
            }
        };
        let _turn = self.turn.lock().await;
        {
            let state = self.state.lock();
            if let Some(current) = &state.current
                && current.serves(wanted, network)
                && (current.number >= first || current.fresh_at(asked, ttl))
            {
                return Ok(Arc::clone(current));
            }
            if let Some((number, error)) = &state.failed
                && *number >= first
            {
                return Err(HypervisorError::Shared(Arc::clone(error)));
            }
        }
        self.refresh(hypervisor).await
    }

    /// Reads the host; called holding the turn.
    async fn refresh<H: Hypervisor>(
        &self,
        hypervisor: &H,
    ) -> Result<Arc<Snapshot>, HypervisorError> {
        let taken = Instant::now();
        let (number, generation, networks) = {
            let mut state = self.state.lock();
            state.started += 1;
            state
                .networks
                .retain(|_, asked| taken.saturating_duration_since(*asked) < NETWORK_IDLE);
            let networks: BTreeSet<String> = state.networks.keys().cloned().collect();
            let generation = self.generation.load(Ordering::Acquire);
            let number = state.started;
            state.flight = Some(Flight {
                number,
                generation,
                networks: networks.clone(),
            });
            (number, generation, networks)
        };
        // Clears the flight however the read ends, also when this pass is dropped
        // mid-read: the passes that waited on it then refresh themselves.
        let landing = Landing {
            inventory: self,
            number,
        };
        let names: Vec<String> = networks.into_iter().collect();
        let result = hypervisor.inventory(&names).await;
        let outcome = {
            let mut state = self.state.lock();
            match result {
                Ok(inventory) => {
                    let snapshot = Arc::new(Snapshot::new(inventory, number, generation, taken));
                    state.current = Some(Arc::clone(&snapshot));
                    state.failed = None;
                    Ok(snapshot)
                }
                Err(error) => {
                    let error = Arc::new(error);
                    state.failed = Some((number, Arc::clone(&error)));
                    Err(HypervisorError::Shared(error))
                }
            }
        };
        drop(landing);
        outcome
    }

    /// Records that a host mutation ended: no snapshot begun before serves the passes
    /// after it.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Claims the first of `candidates` (lowercase MACs) that no domain of the newest
    /// snapshot holds and no define of this process claimed since that snapshot began;
    /// `None` when every candidate is taken. Hold the claim until the define ends.
    pub fn claim_mac(&self, candidates: impl IntoIterator<Item = String>) -> Option<MacClaim<'_>> {
        let mut state = self.state.lock();
        let state = &mut *state;
        let shown = state.current.as_ref().map_or(0, |s| s.generation);
        // A snapshot begun at or after a claim's generation lists its domain.
        state
            .claims
            .retain(|_, from| from.is_none_or(|g| shown < g));
        let held = |mac: &str| {
            state.claims.contains_key(mac)
                || state.current.as_ref().is_some_and(|s| s.macs.contains(mac))
        };
        let mac = candidates.into_iter().find(|mac| !held(mac))?;
        state.claims.insert(mac.clone(), None);
        Some(MacClaim {
            inventory: self,
            mac,
        })
    }

    /// A guard held while the act stage runs `action`: dropped (the step ended, failed
    /// or was cancelled), it records the change if the action touches the host.
    pub fn changing(&self, action: Action) -> Changing<'_> {
        Changing(changes_host(action).then_some(self))
    }
}

/// See [`HostInventory::changing`].
#[must_use = "the change is recorded when the guard is dropped"]
pub struct Changing<'a>(Option<&'a HostInventory>);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        if let Some(inventory) = self.0 {
            inventory.changed();
        }
    }
}

/// A MAC claimed for a define ([`HostInventory::claim_mac`]). Dropped when the define
/// ended (or failed), it stays claimed until a snapshot begun after that lists the host.
#[must_use = "the MAC is free again once the claim is dropped and a snapshot is taken"]
pub struct MacClaim<'a> {
    inventory: &'a HostInventory,
    mac: String,
}

impl MacClaim<'_> {
    pub fn mac(&self) -> &str {
        &self.mac
    }
}

impl Drop for MacClaim<'_> {
    fn drop(&mut self) {
        // Any snapshot begun after the generation moves past the one read now began
        // after this define ended, so it lists the domain.
        let from = self.inventory.generation.load(Ordering::Acquire) + 1;
        let mut state = self.inventory.state.lock();
        if let Some(claim) = state.claims.get_mut(&self.mac) {
            *claim = Some(from);
        }
    }
}

struct Landing<'a> {
    inventory: &'a HostInventory,
    number: u64,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let mut state = self.inventory.state.lock();
        if state
            .flight
            .as_ref()
            .is_some_and(|f| f.number == self.number)
        {
            state.flight = None;
        }
    }
}

/// Whether the step changes domains or volumes on the host.
pub(crate) fn changes_host(action: Action) -> bool {
    match action {
        Action::CreateDisk(_)
        | Action::DefineDomain(_)
        | Action::StartDomain(_)
        | Action::RemoveDomain(_)
        | Action::DeleteVolumes(_)
        | Action::DeleteStraySeeds(_) => true,
        Action::ProbeSsh(_)
        | Action::ForgetCluster
        | Action::InitControlPlane
        | Action::JoinWorker(_)
        | Action::DrainNode(_)
        | Action::Uncordon(_)
        | Action::ConfigureNode(_)
        | Action::SwitchScheduler
        | Action::Abandon(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::hypervisor::{DomainState, NetworkInventory, Owner};
    use crate::names::{ClusterNames, NodeId, VolumeKind};
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    fn domain(uid: &str, name: &str) -> DomainInfo {
        DomainInfo {
            name: name.to_owned(),
            owner: Owner {
                uid: uid.to_owned(),
                namespace: "lab".to_owned(),
                name: "x".to_owned(),
                node: crate::names::NodeId::worker(0),
                host_key: None,
            },
            state: DomainState::Running,
            mac: Some("52:54:00:00:00:01".to_owned()),
            footprint: None,
        }
    }

    #[test]
    fn a_snapshot_indexes_domains_by_owner_volumes_by_name_and_leases_by_mac() {
        let names = ClusterNames {
            namespace: "lab".into(),
            name: "bench".into(),
            uid: "11111111-aaaa".into(),
        };
        let other = ClusterNames {
            name: "bench-2".into(),
            uid: "22222222-bbbb".into(),
            ..names.clone()
        };
        let id = NodeId::worker(3);
        let lease = |mac: &str, ip| Lease {
            mac: mac.to_owned(),
            ip: Ipv4Addr::new(10, 0, 0, ip),
            expiry_unix: 0,
        };
        let inventory = Inventory {
            domains: vec![
                domain(&names.uid, &names.domain(id)),
                domain(&other.uid, &other.domain(id)),
            ],
            foreign: Vec::new(),
            volumes: vec![
                "aaa-unrelated".into(),
                names.disk_volume(id),
                other.disk_volume(id),
                names.disk_volume(NodeId::CONTROL_PLANE),
                "zzz".into(),
            ],
            networks: BTreeMap::from([(
                "net".to_owned(),
                NetworkInventory {
                    info: Some(NetworkInfo {
                        active: true,
                        dhcp: true,
                    }),
                    leases: vec![lease("52:54:00:AA:00:01", 7), lease("52:54:00:bb:00:01", 8)],
                },
            )]),
            host: None,
        };
        let snapshot = Snapshot::new(inventory, 1, 0, Instant::now());

        let ours = snapshot.domains_of(&names.uid);
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].name, names.domain(id));
        assert!(snapshot.domains_of("nobody").is_empty());

        // Every volume of a cluster starts with its domain prefix, so the prefix range
        // holds them all (and those of clusters whose names extend it, which
        // `volume_owner` then tells apart).
        let prefix = names.domain_prefix();
        let owned: Vec<_> = snapshot
            .volumes_starting_with(&prefix)
            .filter_map(|v| names.volume_owner(v))
            .collect();
        assert_eq!(
            owned,
            [
                (NodeId::CONTROL_PLANE, VolumeKind::Disk),
                (id, VolumeKind::Disk)
            ]
        );
        assert_eq!(snapshot.volumes_starting_with(&prefix).count(), 3);

        assert_eq!(
            snapshot.leases("net", "52:54:00:aa:00:01")[0].ip.octets()[3],
            7
        );
        assert_eq!(snapshot.leases("net", "52:54:00:BB:00:01").len(), 1);
        assert!(snapshot.leases("net", "52:54:00:cc:00:01").is_empty());
        assert!(snapshot.leases("other", "52:54:00:aa:00:01").is_empty());
        assert!(snapshot.network("net").is_some_and(|n| n.dhcp));
        assert!(snapshot.network("other").is_none());
    }

    /// Makes `inventory` the newest snapshot, as a refresh begun now would.
    fn show(host: &HostInventory, inventory: Inventory) {
        let generation = host.generation.load(Ordering::Acquire);
        let mut state = host.state.lock();
        state.started += 1;
        let number = state.started;
        state.current = Some(Arc::new(Snapshot::new(
            inventory,
            number,
            generation,
            Instant::now(),
        )));
    }

    #[test]
    fn macs_are_unique_on_a_host_of_a_thousand_clusters_with_pools() {
        use sha2::Digest as _;
        let host = HostInventory::default();
        show(&host, Inventory::default());
        let pools = [("w", 3), ("gpu", 2), ("big", 2)];
        let (mut clusters, mut nodes, mut first_taken) = (0, 0, 0);
        let mut first_only = std::collections::HashSet::new();
        let mut first_collisions = 0;
        let mut given = std::collections::HashSet::new();
        let mut claims = Vec::new();
        for c in 0..1000u32 {
            // UIDs as the API server makes them: random, here from a fixed seed.
            let digest = sha2::Sha256::digest(format!("cluster {c}").as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            let names = ClusterNames {
                namespace: "lab".into(),
                name: format!("c{c}"),
                uid: format!(
                    "{}-{}-{}-{}-{}",
                    &hex[..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..32]
                ),
            };
            clusters += 1;
            let ids =
                std::iter::once(NodeId::CONTROL_PLANE).chain(pools.iter().flat_map(|(p, n)| {
                    let pool = crate::names::PoolName::new(p).unwrap();
                    (0..*n).map(move |i| NodeId::pooled(pool, i))
                }));
            for id in ids {
                nodes += 1;
                if !first_only.insert(names.mac(id)) {
                    first_collisions += 1;
                }
                let claim = host
                    .claim_mac(names.mac_candidates(id))
                    .expect("a free MAC");
                if claim.mac() != names.mac(id) {
                    first_taken += 1;
                }
                assert!(
                    given.insert(claim.mac().to_owned()),
                    "{} given twice",
                    claim.mac()
                );
                claims.push(claim);
            }
        }
        println!(
            "{clusters} clusters, {nodes} nodes: {first_collisions} first candidates collided, \
             {first_taken} nodes took a later one, {} distinct MACs",
            given.len()
        );
        assert_eq!(given.len(), nodes);
        assert!(first_taken >= first_collisions);
    }

    #[test]
    fn two_clusters_whose_hashes_collide_get_distinct_macs() {
        // Search UIDs until two control planes' first candidates collide (a birthday
        // search over 24 bits: a few thousand UIDs).
        let names = |uid: String| ClusterNames {
            namespace: "lab".into(),
            name: uid.clone(),
            uid,
        };
        let mut seen: HashMap<String, String> = HashMap::new();
        let (a, b) = (0u32..)
            .find_map(|i| {
                let uid = format!("00000000-0000-4000-8000-{i:012x}");
                let mac = names(uid.clone()).mac(NodeId::CONTROL_PLANE);
                seen.insert(mac, uid.clone()).map(|other| (other, uid))
            })
            .unwrap();
        let (a, b) = (names(a), names(b));
        println!(
            "{} and {} both hash to {}",
            a.uid,
            b.uid,
            a.mac(NodeId::CONTROL_PLANE)
        );
        assert_eq!(a.mac(NodeId::CONTROL_PLANE), b.mac(NodeId::CONTROL_PLANE));
        let host = HostInventory::default();
        show(&host, Inventory::default());
        let first = host
            .claim_mac(a.mac_candidates(NodeId::CONTROL_PLANE))
            .unwrap();
        let second = host
            .claim_mac(b.mac_candidates(NodeId::CONTROL_PLANE))
            .unwrap();
        assert_eq!(first.mac(), a.mac(NodeId::CONTROL_PLANE));
        assert_ne!(second.mac(), first.mac());
        // Deterministic: the same candidate on every run.
        assert_eq!(
            Some(second.mac()),
            b.mac_candidates(NodeId::CONTROL_PLANE).nth(1).as_deref()
        );
    }

    #[test]
    fn a_claimed_mac_is_free_again_only_once_a_later_snapshot_shows_it_free() {
        let host = HostInventory::default();
        let candidates = || {
            [
                "52:54:00:00:00:01".to_owned(),
                "52:54:00:00:00:02".to_owned(),
            ]
        };
        // Held by someone else's VM: the next candidate.
        let foreign_vm = || Inventory {
            foreign: vec![crate::hypervisor::ForeignDomain {
                name: "theirs".into(),
                state: DomainState::Stopped,
                macs: vec!["52:54:00:00:00:01".into()],
                footprint: None,
            }],
            ..Inventory::default()
        };
        show(&host, foreign_vm());
        let first = host.claim_mac(candidates()).unwrap();
        assert_eq!(first.mac(), "52:54:00:00:00:02");
        // Both held: by the VM, and by the define in flight.
        assert!(host.claim_mac(candidates()).is_none());
        // The define ended (its domain failed to define, say); a snapshot begun before
        // that does not free its MAC...
        let stale = host.generation.load(Ordering::Acquire);
        drop(first);
        {
            let mut state = host.state.lock();
            let current = Snapshot::new(foreign_vm(), 99, stale, Instant::now());
            state.current = Some(Arc::new(current));
        }
        assert!(host.claim_mac(candidates()).is_none());
        // ...one begun after it does.
        host.changed();
        show(&host, foreign_vm());
        assert_eq!(
            host.claim_mac(candidates()).unwrap().mac(),
            "52:54:00:00:00:02"
        );
    }

    #[test]
    fn others_take_what_their_domains_are_defined_with() {
        let size = |vcpus, gib: u64| {
            Some(Footprint {
                vcpus,
                memory_bytes: gib << 30,
            })
        };
        let mut ours = domain("ours", "lab-x-cp-0");
        ours.footprint = size(2, 2);
        let mut other = domain("other", "lab-y-cp-0");
        other.footprint = size(4, 8);
        other.state = DomainState::Stopped;
        let foreign = |state, vcpus| crate::hypervisor::ForeignDomain {
            name: format!("vm-{vcpus}"),
            state,
            macs: Vec::new(),
            footprint: size(vcpus, 1),
        };
        let inventory = Inventory {
            domains: vec![ours, other],
            foreign: vec![
                foreign(DomainState::Running, 3),
                foreign(DomainState::Stopped, 16),
            ],
            ..Inventory::default()
        };
        let snapshot = Snapshot::new(inventory, 1, 0, Instant::now());
        // Another cluster's stopped domain counts (its controller starts it); someone
        // else's stopped VM does not.
        assert_eq!(
            snapshot.taken_by_others("ours"),
            Footprint {
                vcpus: 7,
                memory_bytes: 9 << 30
            }
        );
        assert_eq!(
            snapshot.taken_by_others("other"),
            Footprint {
                vcpus: 5,
                memory_bytes: 3 << 30
            }
        );
    }

    #[test]
    fn only_host_steps_end_a_snapshot() {
        let inventory = HostInventory::default();
        drop(inventory.changing(Action::ProbeSsh(NodeId::CONTROL_PLANE)));
        drop(inventory.changing(Action::JoinWorker(NodeId::worker(0))));
        assert_eq!(inventory.generation.load(Ordering::Acquire), 0);
        for action in [
            Action::CreateDisk(NodeId::CONTROL_PLANE),
            Action::DefineDomain(NodeId::CONTROL_PLANE),
            Action::StartDomain(NodeId::CONTROL_PLANE),
            Action::RemoveDomain(NodeId::CONTROL_PLANE),
            Action::DeleteVolumes(NodeId::CONTROL_PLANE),
        ] {
            let guard = inventory.changing(action);
            let before = inventory.generation.load(Ordering::Acquire);
            drop(guard);
            assert_eq!(
                inventory.generation.load(Ordering::Acquire),
                before + 1,
                "{action:?} is recorded when it ends"
            );
        }
    }
}
