//! An in-memory hypervisor: base images, overlay and seed volumes, domains with their
//! owner metadata, networks, and a DHCP server that leases an address to each started
//! domain's MAC. Tests make any call fail ([`FakeHypervisor::fail`]), take time
//! ([`FakeHypervisor::delay`]) or hang forever ([`FakeHypervisor::hang`], a controller
//! dying mid-pass), and read back what exists.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use benchcluster_controller::hypervisor::{
    DomainInfo, DomainOwner, DomainSpec, DomainState, Footprint, ForeignDomain, HostCapacity,
    Hypervisor, HypervisorError, Inventory, Lease, NetworkInfo, NetworkInventory, OverlaySpec,
    Result,
};
use parking_lot::{Mutex, MutexGuard};

/// A call of the [`Hypervisor`] trait, for fault injection and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    /// The host-wide read (domains, volumes, networks and leases).
    Inventory,
    DomainOwner,
    CreateOverlay,
    DefineDomain,
    StartDomain,
    RemoveDomain,
    CreateSeed,
    DeleteVolume,
}

impl Call {
    /// Whether the call changes something.
    pub fn mutates(self) -> bool {
        matches!(
            self,
            Call::CreateOverlay
                | Call::DefineDomain
                | Call::StartDomain
                | Call::RemoveDomain
                | Call::CreateSeed
                | Call::DeleteVolume
        )
    }
}

/// A defined domain.
#[derive(Debug, Clone)]
pub struct FakeDomain {
    pub spec: DomainSpec,
    pub running: bool,
    /// Defined without owner metadata (someone else's VM).
    pub foreign: bool,
}

#[derive(Debug, Default)]
struct State {
    images: BTreeSet<String>,
    /// Node-pool volumes, with the content of seeds.
    volumes: BTreeMap<String, Vec<u8>>,
    domains: BTreeMap<String, FakeDomain>,
    networks: BTreeMap<String, NetworkInfo>,
    /// MAC -> leased address.
    leases: BTreeMap<String, Ipv4Addr>,
    next_host: u32,
    /// Calls that fail until healed.
    failing: BTreeSet<Call>,
    /// Calls that never return until healed (only calls started after `hang`).
    hanging: BTreeSet<Call>,
    /// How long calls take before they answer.
    delays: BTreeMap<Call, Duration>,
    /// What the host offers; `None` answers no capacity (no fit check).
    host: Option<HostCapacity>,
    /// Whether a started domain gets a lease at once.
    no_dhcp_answers: bool,
    calls: BTreeMap<Call, u64>,
    /// Every mutating call, with the domain or volume it named, in order.
    touched: Vec<(Call, String)>,
}

/// The in-memory hypervisor. Clones share one host (a restarted controller sees the
/// same VMs).
#[derive(Debug, Clone, Default)]
pub struct FakeHypervisor {
    state: Arc<Mutex<State>>,
}

/// Name of the storage pool that [`HypervisorError::ImageMissing`] names.
pub const IMAGE_POOL: &str = "fake-images";

impl FakeHypervisor {
    /// A host with the named network (active, with DHCP) and base images.
    pub fn new(network: &str, images: &[&str]) -> Self {
        let hv = Self::default();
        {
            let mut state = hv.state();
            state.networks.insert(
                network.to_owned(),
                NetworkInfo {
                    active: true,
                    dhcp: true,
                },
            );
            state.images = images.iter().map(|i| (*i).to_owned()).collect();
            state.host = Some(HostCapacity {
                cpus: 64,
                memory_bytes: 256 << 30,
            });
        }
        hv
    }

    /// Makes the host offer this capacity (`None`: it does not say).
    pub fn set_host(&self, host: Option<HostCapacity>) {
        self.state().host = host;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Makes every `call` fail as libvirt would, until [`FakeHypervisor::heal`].
    pub fn fail(&self, call: Call) {
        self.state().failing.insert(call);
    }

    /// Makes every `call` started from now on hang forever, until healed.
    pub fn hang(&self, call: Call) {
        self.state().hanging.insert(call);
    }

    /// Lets `call` succeed again.
    pub fn heal(&self, call: Call) {
        let mut state = self.state();
        state.failing.remove(&call);
        state.hanging.remove(&call);
    }

    /// Whether started domains get a DHCP lease (they do by default).
    pub fn set_dhcp_answering(&self, answering: bool) {
        self.state().no_dhcp_answers = !answering;
    }

    /// Replaces (or removes) a network.
    pub fn set_network(&self, name: &str, network: Option<NetworkInfo>) {
        let mut state = self.state();
        match network {
            Some(n) => state.networks.insert(name.to_owned(), n),
            None => state.networks.remove(name),
        };
    }

    /// Defines a domain without owner metadata under `name`, as another tool would.
    pub fn add_foreign_domain(&self, spec: DomainSpec) {
        self.insert_foreign(spec, false);
    }

    /// Defines a running domain without owner metadata, as another tool would: it
    /// holds its MAC and, running, its vCPUs and memory on the host.
    pub fn add_running_foreign_domain(&self, spec: DomainSpec) {
        self.insert_foreign(spec, true);
    }

    fn insert_foreign(&self, spec: DomainSpec, running: bool) {
        self.state().domains.insert(
            spec.name.clone(),
            FakeDomain {
                spec,
                running,
                foreign: true,
            },
        );
    }

    /// Undefines a domain behind the controller's back (another tool's `virsh
    /// undefine`): no call of the trait is counted.
    pub fn remove_domain_behind(&self, name: &str) {
        let mut state = self.state();
        if let Some(domain) = state.domains.remove(name) {
            state.leases.remove(&domain.spec.mac.to_ascii_lowercase());
        }
    }

    /// Every mutating call made so far, with the domain or volume it named, in order.
    pub fn touched(&self) -> Vec<(Call, String)> {
        self.state().touched.clone()
    }

    fn touch(&self, call: Call, name: &str) {
        self.state().touched.push((call, name.to_owned()));
    }

    /// Stops a domain behind the controller's back.
    pub fn stop(&self, name: &str) {
        if let Some(domain) = self.state().domains.get_mut(name) {
            domain.running = false;
        }
    }

    /// Every defined domain, by name.
    pub fn domains(&self) -> BTreeMap<String, FakeDomain> {
        self.state().domains.clone()
    }

    pub fn domain(&self, name: &str) -> Option<FakeDomain> {
        self.state().domains.get(name).cloned()
    }

    /// Names of the node pool's volumes.
    pub fn volumes(&self) -> Vec<String> {
        self.state().volumes.keys().cloned().collect()
    }

    /// What a seed volume holds.
    pub fn volume_content(&self, name: &str) -> Option<Vec<u8>> {
        self.state().volumes.get(name).cloned()
    }

    /// How many times `call` was made, failed and hanging ones included.
    pub fn calls(&self, call: Call) -> u64 {
        self.state().calls.get(&call).copied().unwrap_or(0)
    }

    /// Calls that changed (or tried to change) something.
    pub fn mutations(&self) -> u64 {
        self.state()
            .calls
            .iter()
            .filter(|(call, _)| call.mutates())
            .map(|(_, n)| n)
            .sum()
    }

    /// Makes every `call` take `by` (of tokio's clock, so a paused one costs no real
    /// time) before it answers, as a real host's calls take their time.
    pub fn delay(&self, call: Call, by: Duration) {
        self.state().delays.insert(call, by);
    }

    /// Counts the call, then delays, fails or hangs it when told to.
    async fn enter(&self, call: Call, operation: &'static str) -> Result<()> {
        let (fail, hang, delay) = {
            let mut state = self.state();
            *state.calls.entry(call).or_default() += 1;
            (
                state.failing.contains(&call),
                state.hanging.contains(&call),
                state.delays.get(&call).copied(),
            )
        };
        if hang {
            std::future::pending::<()>().await;
        }
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if fail {
            return Err(libvirt_error(operation));
        }
        Ok(())
    }
}

/// A libvirt error as the `virt` crate returns them, built through its one safe
/// constructor (no libvirt call is made): what a failing call on a real host gives.
pub fn libvirt_error(operation: &'static str) -> HypervisorError {
    match std::ffi::CString::new(b"injected\0failure".to_vec()) {
        Err(nul) => HypervisorError::Libvirt {
            operation,
            source: virt::error::Error::from(nul),
        },
        // Not reached: the string has an interior NUL.
        Ok(_) => HypervisorError::UploadStalled {
            volume: format!("{operation} (injected failure)"),
        },
    }
}

fn footprint(spec: &DomainSpec) -> Footprint {
    Footprint {
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_bytes,
    }
}

impl Hypervisor for FakeHypervisor {
    async fn inventory(&self, networks: &[String]) -> Result<Inventory> {
        self.enter(Call::Inventory, "list domains").await?;
        let state = self.state();
        let domains = state
            .domains
            .iter()
            .filter(|(_, d)| !d.foreign)
            .map(|(name, d)| DomainInfo {
                name: name.clone(),
                owner: d.spec.owner.clone(),
                state: if d.running {
                    DomainState::Running
                } else {
                    DomainState::Stopped
                },
                mac: Some(d.spec.mac.to_ascii_lowercase()),
                footprint: Some(footprint(&d.spec)),
            })
            .collect();
        let foreign = state
            .domains
            .iter()
            .filter(|(_, d)| d.foreign)
            .map(|(name, d)| ForeignDomain {
                name: name.clone(),
                state: if d.running {
                    DomainState::Running
                } else {
                    DomainState::Stopped
                },
                macs: vec![d.spec.mac.to_ascii_lowercase()],
                footprint: Some(footprint(&d.spec)),
            })
            .collect();
        let networks = networks
            .iter()
            .map(|network| {
                let info = state.networks.get(network).cloned();
                let leases = match &info {
                    Some(n) if n.active => state
                        .domains
                        .values()
                        .filter(|d| !d.foreign && d.spec.network == *network)
                        .filter_map(|d| {
                            let mac = d.spec.mac.to_ascii_lowercase();
                            state.leases.get(&mac).map(|ip| Lease {
                                mac,
                                ip: *ip,
                                expiry_unix: 0,
                            })
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                (network.clone(), NetworkInventory { info, leases })
            })
            .collect();
        Ok(Inventory {
            domains,
            foreign,
            volumes: state.volumes.keys().cloned().collect(),
            networks,
            host: state.host,
        })
    }

    async fn domain_owner(&self, name: &str) -> Result<DomainOwner> {
        self.enter(Call::DomainOwner, "look up domain").await?;
        Ok(match self.state().domains.get(name) {
            None => DomainOwner::Absent,
            Some(d) if d.foreign => DomainOwner::Foreign,
            Some(d) => DomainOwner::Owned(d.spec.owner.clone()),
        })
    }

    async fn create_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        self.touch(Call::CreateOverlay, &spec.name);
        self.enter(Call::CreateOverlay, "create volume").await?;
        let mut state = self.state();
        if !state.images.contains(&spec.base_image) {
            return Err(HypervisorError::ImageMissing {
                pool: IMAGE_POOL.into(),
                volume: spec.base_image.clone(),
            });
        }
        state.volumes.entry(spec.name.clone()).or_default();
        Ok(())
    }

    async fn define_domain(&self, spec: &DomainSpec) -> Result<()> {
        self.touch(Call::DefineDomain, &spec.name);
        self.enter(Call::DefineDomain, "define domain").await?;
        let mut state = self.state();
        match state.domains.get(&spec.name) {
            Some(d) if !d.foreign && d.spec.owner == spec.owner => Ok(()),
            Some(_) => Err(HypervisorError::NameConflict {
                name: spec.name.clone(),
            }),
            None => {
                state.domains.insert(
                    spec.name.clone(),
                    FakeDomain {
                        spec: spec.clone(),
                        running: false,
                        foreign: false,
                    },
                );
                Ok(())
            }
        }
    }

    async fn start_domain(&self, name: &str) -> Result<()> {
        self.touch(Call::StartDomain, name);
        self.enter(Call::StartDomain, "start domain").await?;
        let mut guard = self.state();
        let state = &mut *guard;
        let Some(domain) = state.domains.get_mut(name) else {
            return Err(libvirt_error("start domain (no such domain)"));
        };
        domain.running = true;
        let mac = domain.spec.mac.to_ascii_lowercase();
        if !state.no_dhcp_answers && !state.leases.contains_key(&mac) {
            // Addresses are data only here: nothing is ever sent to them.
            state.next_host += 1;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + state.next_host);
            state.leases.insert(mac, ip);
        }
        Ok(())
    }

    async fn remove_domain(&self, name: &str) -> Result<()> {
        self.touch(Call::RemoveDomain, name);
        self.enter(Call::RemoveDomain, "undefine domain").await?;
        let mut state = self.state();
        if let Some(domain) = state.domains.remove(name) {
            state.leases.remove(&domain.spec.mac.to_ascii_lowercase());
        }
        Ok(())
    }

    async fn create_seed(&self, name: &str, content: &[u8]) -> Result<()> {
        self.touch(Call::CreateSeed, name);
        self.enter(Call::CreateSeed, "upload volume").await?;
        // Never overwritten, as the trait says.
        self.state()
            .volumes
            .entry(name.to_owned())
            .or_insert_with(|| content.to_vec());
        Ok(())
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        self.touch(Call::DeleteVolume, name);
        self.enter(Call::DeleteVolume, "delete volume").await?;
        self.state().volumes.remove(name);
        Ok(())
    }
}
