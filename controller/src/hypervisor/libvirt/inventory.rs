//! The host-wide read: every domain with our owner metadata (owner, state, MAC), the
//! node pool's volumes, and each requested network with the leases on it, in a number
//! of libvirt calls that does not follow the size of the host:
//!
//! - domains: two listings, all of them and the running ones (`VIR_CONNECT_LIST_DOMAINS_RUNNING`,
//!   so no state call per domain; a paused domain reads as stopped, as before); a
//!   domain's name, UUID and ID are local. Its XML (owner, MAC, interfaces) is read once
//!   per domain, cached by UUID: libvirt gives a domain defined anew a new UUID, and the
//!   controller never changes the metadata of a domain it defined.
//! - volumes: one pool lookup, one listing.
//! - each network: a lookup, its state and its XML (for `<dhcp>`).
//! - leases: virt 0.5 wraps neither `virNetworkGetDHCPLeases` nor its lease type, and
//!   this workspace forbids `unsafe`, so leases come per domain from
//!   `virDomainInterfaceAddresses(VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)`, which
//!   libvirt answers from the same network lease database (dropping expired leases).
//!   Only owned running domains are asked, and each run (domain ID) only until it has
//!   an address on every requested network it is attached to: dnsmasq renews the
//!   address of a MAC, and the pinned host key proves a VM's identity on every SSH
//!   connection anyway. So at rest no lease call is made at all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use super::connection::Shared;
use super::{LibvirtConfig, is, libvirt, network, storage};
use crate::hypervisor::xml;
use crate::hypervisor::{
    DomainInfo, DomainState, Footprint, ForeignDomain, HostCapacity, Inventory, Lease,
    NetworkInventory, Owner, Result,
};

/// What the inventory remembers of domains between reads, by UUID.
#[derive(Default)]
pub(super) struct DomainCache {
    known: HashMap<String, Arc<Known>>,
    leased: HashMap<String, RunLeases>,
}

/// A domain's XML as far as the inventory needs it.
struct Known {
    /// `None`: not ours (no owner metadata, or metadata that cannot be read).
    owner: Option<Owner>,
    name: String,
    /// MAC of the cluster interface, lowercase.
    mac: Option<String>,
    /// MACs of every interface, lowercase.
    macs: Vec<String>,
    nics: Vec<Nic>,
    footprint: Option<Footprint>,
}

/// A domain's interface on a libvirt network.
struct Nic {
    /// Lowercase.
    mac: String,
    network: String,
}

/// The leases found for one run of a domain (libvirt gives each start a new ID).
struct RunLeases {
    run: u32,
    /// With the network each is on.
    leases: Vec<(String, Lease)>,
}

impl Shared {
    /// Drops what the cache holds of a domain (it is being removed).
    pub(super) fn forget_domain(&self, uuid: &str) {
        let mut cache = self.domains.lock();
        cache.known.remove(uuid);
        cache.leased.remove(uuid);
    }

    /// What the domain's XML says, from the cache or read now; `None` when the domain
    /// went away since it was listed.
    fn known(&self, domain: &Domain, uuid: &str) -> Result<Option<Arc<Known>>> {
        if let Some(known) = self.domains.lock().known.get(uuid) {
            return Ok(Some(Arc::clone(known)));
        }
        let xml = match domain.xml_desc(0) {
            Ok(xml) => xml,
            Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => return Err(libvirt("read domain XML")(e)),
        };
        let known = Arc::new(parse(domain, &xml));
        self.domains
            .lock()
            .known
            .insert(uuid.to_owned(), Arc::clone(&known));
        Ok(Some(known))
    }

    /// Leases of a running domain's interfaces on `networks`, from the cache while its
    /// run has one on each of them, else asked now.
    fn leases_of(
        &self,
        domain: &Domain,
        uuid: &str,
        known: &Known,
        networks: &[&str],
    ) -> Result<Vec<(String, Lease)>> {
        let run = domain.id();
        if let Some(run) = run
            && let Some(cached) = self.domains.lock().leased.get(uuid)
            && cached.run == run
            && networks
                .iter()
                .all(|n| cached.leases.iter().any(|(on, _)| on == n))
        {
            return Ok(cached.leases.clone());
        }
        // On qemu, libvirt answers this from the networks' own dnsmasq leases,
        // dropping expired ones; the MAC match keeps another VM's stale lease on a
        // reused address out.
        let interfaces = match domain
            .interface_addresses(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
        {
            Ok(interfaces) => interfaces,
            // Stopped or undefined since the listing.
            Err(e) if is(&e, ErrorNumber::NoDomain) || is(&e, ErrorNumber::OperationInvalid) => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(libvirt("get domain interface leases")(e)),
        };
        let mut leases = Vec::new();
        for interface in interfaces {
            let Some(mac) = interface.hwaddr.map(|m| m.to_ascii_lowercase()) else {
                continue;
            };
            let Some(nic) = known.nics.iter().find(|nic| nic.mac == mac) else {
                continue;
            };
            for address in interface.addrs {
                if address.typed != i64::from(virt::sys::VIR_IP_ADDR_TYPE_IPV4) {
                    continue;
                }
                if let Ok(ip) = address.addr.parse::<Ipv4Addr>() {
                    let lease = Lease {
                        mac: mac.clone(),
                        ip,
                        expiry_unix: 0,
                    };
                    leases.push((nic.network.clone(), lease));
                }
            }
        }
        if let Some(run) = run {
            self.domains.lock().leased.insert(
                uuid.to_owned(),
                RunLeases {
                    run,
                    leases: leases.clone(),
                },
            );
        }
        Ok(leases)
    }

    /// Keeps only the domains of the last complete listing.
    fn retain_domains(&self, listed: &HashSet<String>) {
        let mut cache = self.domains.lock();
        cache.known.retain(|uuid, _| listed.contains(uuid));
        cache.leased.retain(|uuid, _| listed.contains(uuid));
    }
}

fn parse(domain: &Domain, xml: &str) -> Known {
    let name = || domain.name().unwrap_or_default();
    // Every domain's XML is read: one without our metadata still holds MACs and room.
    let readback = match xml::parse_domain(xml) {
        Ok(readback) => readback,
        Err(error) => {
            tracing::warn!(domain = %name(), error = %error, "a domain whose XML cannot be read counts as foreign, without MACs or size");
            return foreign(name());
        }
    };
    let footprint = match (readback.vcpus, readback.memory_bytes) {
        (Some(vcpus), Some(memory_bytes)) => Some(Footprint {
            vcpus,
            memory_bytes,
        }),
        _ => None,
    };
    Known {
        mac: readback.primary_mac(),
        macs: readback
            .interfaces
            .iter()
            .filter_map(|i| Some(i.mac.as_deref()?.to_ascii_lowercase()))
            .collect(),
        nics: readback
            .interfaces
            .iter()
            .filter_map(|i| {
                Some(Nic {
                    mac: i.mac.as_deref()?.to_ascii_lowercase(),
                    network: i.network.clone()?,
                })
            })
            .collect(),
        owner: readback.owner,
        name: readback.name,
        footprint,
    }
}

fn foreign(name: String) -> Known {
    Known {
        owner: None,
        name,
        mac: None,
        macs: Vec::new(),
        nics: Vec::new(),
        footprint: None,
    }
}

pub(super) fn read(
    conn: &Connect,
    config: &LibvirtConfig,
    shared: &Shared,
    networks: &[String],
) -> Result<Inventory> {
    // Flags 0: active and inactive, persistent and transient: every domain, once.
    let all = conn.list_all_domains(0).map_err(libvirt("list domains"))?;
    let running: HashSet<String> = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_RUNNING)
        .map_err(libvirt("list running domains"))?
        .iter()
        .filter_map(|d| d.uuid_string().ok())
        .collect();
    let mut listed = HashSet::with_capacity(all.len());
    let mut domains = Vec::new();
    let mut foreign = Vec::new();
    let mut leasable = Vec::new();
    for domain in all {
        let Ok(uuid) = domain.uuid_string() else {
            continue;
        };
        listed.insert(uuid.clone());
        let Some(known) = shared.known(&domain, &uuid)? else {
            continue;
        };
        let state = if running.contains(&uuid) {
            DomainState::Running
        } else {
            DomainState::Stopped
        };
        let Some(owner) = known.owner.clone() else {
            foreign.push(ForeignDomain {
                name: known.name.clone(),
                state,
                macs: known.macs.clone(),
                footprint: known.footprint,
            });
            continue;
        };
        domains.push(DomainInfo {
            name: known.name.clone(),
            owner,
            state,
            mac: known.mac.clone(),
            footprint: known.footprint,
        });
        if state == DomainState::Running {
            leasable.push((domain, uuid, known));
        }
    }
    shared.retain_domains(&listed);
    domains.sort_by(|a, b| a.name.cmp(&b.name));
    foreign.sort_by(|a, b| a.name.cmp(&b.name));

    let volumes = storage::list_volumes(conn, config)?;

    let mut read: BTreeMap<String, NetworkInventory> = BTreeMap::new();
    for name in networks {
        if !read.contains_key(name) {
            let info = network::network(conn, name)?;
            read.insert(
                name.clone(),
                NetworkInventory {
                    info,
                    leases: Vec::new(),
                },
            );
        }
    }
    // Where a lease can be: an active network with DHCP.
    let serving = |name: &str| {
        read.get(name)
            .and_then(|n| n.info.as_ref())
            .is_some_and(|info| info.active && info.dhcp)
    };
    let mut leases = Vec::new();
    for (domain, uuid, known) in &leasable {
        let mut on: Vec<&str> = known
            .nics
            .iter()
            .map(|nic| nic.network.as_str())
            .filter(|n| serving(n))
            .collect();
        on.sort_unstable();
        on.dedup();
        if on.is_empty() {
            continue;
        }
        leases.extend(
            shared
                .leases_of(domain, uuid, known, &on)?
                .into_iter()
                .filter(|(network, _)| on.contains(&network.as_str())),
        );
    }
    for (network, lease) in leases {
        if let Some(entry) = read.get_mut(&network) {
            entry.leases.push(lease);
        }
    }

    // What the host offers: for the fit check, before anything is created. A driver
    // that cannot say leaves it out (no check) rather than failing the read.
    let host = conn.node_info().ok().map(|info| HostCapacity {
        cpus: info.cpus,
        memory_bytes: info.memory.saturating_mul(1024),
    });

    Ok(Inventory {
        domains,
        foreign,
        volumes,
        networks: read,
        host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::libvirt::test_support::{TestResult, hypervisor, listed, spec};
    use crate::hypervisor::{Hypervisor, NetworkInfo};

    #[tokio::test]
    async fn networks_report_dhcp_and_absence() -> TestResult {
        let hv = hypervisor();
        let inventory = hv
            .inventory(&["default".to_owned(), "lvt-no-such-network".to_owned()])
            .await?;
        assert_eq!(
            inventory
                .networks
                .get("default")
                .and_then(|n| n.info.clone()),
            Some(NetworkInfo {
                active: true,
                dhcp: true
            })
        );
        assert_eq!(
            inventory.networks.get("lvt-no-such-network"),
            Some(&NetworkInventory::default()),
            "a missing network is reported, with no leases"
        );
        Ok(())
    }

    /// The state flags of `virConnectListAllDomains` are what tells running from
    /// defined, started from paused: the test driver supports them as qemu's does.
    #[tokio::test]
    async fn states_come_from_the_running_listing_and_paused_counts_as_stopped() -> TestResult {
        let hv = hypervisor();
        let spec = spec("invstate", "uid-invstate");
        hv.define_domain(&spec).await?;
        let state = |hv| async move {
            Ok::<_, crate::hypervisor::HypervisorError>(
                listed(hv, "lvt-invstate-w-0").await?.map(|d| d.state),
            )
        };
        assert_eq!(state(&hv).await?, Some(DomainState::Stopped));
        hv.start_domain(&spec.name).await?;
        assert_eq!(state(&hv).await?, Some(DomainState::Running));
        let name = spec.name.clone();
        hv.run(move |conn, _| {
            let domain = conn
                .lookup_domain_by_name(&name)
                .map_err(libvirt("look up domain"))?;
            domain.suspend().map_err(libvirt("suspend domain"))
        })
        .await?;
        assert_eq!(state(&hv).await?, Some(DomainState::Stopped), "paused");
        // Starting resumes a paused domain.
        hv.start_domain(&spec.name).await?;
        assert_eq!(state(&hv).await?, Some(DomainState::Running));
        hv.remove_domain(&spec.name).await?;
        assert_eq!(state(&hv).await?, None);
        Ok(())
    }

    /// The owner is read from the XML once per domain: a domain defined anew (a new
    /// UUID) is read again, a known one is not.
    #[tokio::test]
    async fn owner_metadata_is_read_once_per_domain() -> TestResult {
        let hv = hypervisor();
        let first = spec("invonce", "uid-invonce-1");
        hv.define_domain(&first).await?;
        let uuid = {
            let name = first.name.clone();
            hv.run(move |conn, _| {
                let domain = conn
                    .lookup_domain_by_name(&name)
                    .map_err(libvirt("look up domain"))?;
                domain.uuid_string().map_err(libvirt("get domain UUID"))
            })
            .await?
        };
        let seen = listed(&hv, &first.name).await?.ok_or("not listed")?;
        assert_eq!(seen.owner.uid, "uid-invonce-1");
        assert!(hv.shared.domains.lock().known.contains_key(&uuid));

        // The cached entry is what answers: the test makes it say something the XML
        // does not, which no later read of the XML would.
        if let Some(known) = hv.shared.domains.lock().known.get_mut(&uuid) {
            let mut changed = foreign(known.name.clone());
            changed.owner = known.owner.clone().map(|mut o| {
                o.node.index = 7;
                o
            });
            changed.mac = known.mac.clone();
            *known = Arc::new(changed);
        }
        let cached = listed(&hv, &first.name).await?.ok_or("not listed")?;
        assert_eq!(cached.owner.node.index, 7, "answered from the cache");

        hv.remove_domain(&first.name).await?;
        assert!(!hv.shared.domains.lock().known.contains_key(&uuid));
        let second = spec("invonce", "uid-invonce-2");
        hv.define_domain(&second).await?;
        let seen = listed(&hv, &second.name).await?.ok_or("not listed")?;
        hv.remove_domain(&second.name).await?;
        assert_eq!(seen.owner.uid, "uid-invonce-2", "a new domain is read anew");
        assert_eq!(seen.owner.node.index, 0);
        Ok(())
    }

    #[tokio::test]
    async fn foreign_domains_are_listed_apart_with_their_macs_and_size() -> TestResult {
        let hv = hypervisor();
        hv.run(|conn, _| {
            let xml = "<domain type='test'><name>lvt-invforeign-w-0</name>\
                       <memory unit='KiB'>262144</memory><vcpu>3</vcpu><os><type>hvm</type></os>\
                       <devices><interface type='network'><mac address='52:54:00:AB:CD:EF'/>\
                       <source network='default'/></interface></devices></domain>";
            conn.define_domain_xml(xml).map_err(libvirt("define"))?;
            Ok(())
        })
        .await?;
        let inventory = hv.inventory(&[]).await?;
        hv.remove_domain("lvt-invforeign-w-0").await?;
        assert!(
            !inventory
                .domains
                .iter()
                .any(|d| d.name == "lvt-invforeign-w-0")
        );
        let foreign = inventory
            .foreign
            .iter()
            .find(|d| d.name == "lvt-invforeign-w-0")
            .ok_or("foreign domain not listed")?;
        assert_eq!(foreign.macs, ["52:54:00:ab:cd:ef"]);
        assert_eq!(
            foreign.footprint,
            Some(Footprint {
                vcpus: 3,
                memory_bytes: 256 << 20
            })
        );
        assert!(inventory.networks.is_empty(), "none asked for");
        let mut sorted = inventory.volumes.clone();
        sorted.sort();
        assert_eq!(inventory.volumes, sorted);
        Ok(())
    }

    /// The test driver answers interface-address queries itself (made-up addresses in
    /// the network's range): what is tested here is the mapping, not a DHCP server.
    #[tokio::test]
    async fn leases_cover_running_domains_on_their_own_network() -> TestResult {
        let hv = hypervisor();
        hv.run(|conn, _| {
            if conn.lookup_network_by_name("lvt-othernet").is_err() {
                let xml = "<network><name>lvt-othernet</name><bridge name='lvtbr0'/>\
                           <ip address='10.254.0.1' netmask='255.255.255.0'>\
                           <dhcp><range start='10.254.0.2' end='10.254.0.254'/></dhcp></ip></network>";
                conn.create_network_xml(xml).map_err(libvirt("create network"))?;
            }
            Ok(())
        })
        .await?;
        let both = ["default".to_owned(), "lvt-othernet".to_owned()];
        let leases_of = |inventory: &Inventory, network: &str, mac: &str| {
            inventory
                .networks
                .get(network)
                .map(|n| n.leases.iter().filter(|l| l.mac == mac).count())
                .unwrap_or_default()
        };

        let mut on_default = spec("invleases", "uid-invleases");
        on_default.mac = "52:54:00:AB:00:02".to_owned();
        let mut on_other = spec("invother", "uid-invother");
        on_other.mac = "52:54:00:ab:00:03".to_owned();
        on_other.network = "lvt-othernet".to_owned();
        hv.define_domain(&on_default).await?;
        hv.define_domain(&on_other).await?;
        let stopped = hv.inventory(&both).await?;
        assert_eq!(leases_of(&stopped, "default", "52:54:00:ab:00:02"), 0);

        hv.start_domain(&on_default.name).await?;
        hv.start_domain(&on_other.name).await?;
        let running = hv.inventory(&both).await?;
        // A second read of the same runs is answered from the lease cache, the same.
        let again = hv.inventory(&both).await?;
        let only_default = hv.inventory(&["default".to_owned()]).await?;
        hv.remove_domain(&on_default.name).await?;
        hv.remove_domain(&on_other.name).await?;
        let removed = hv.inventory(&both).await?;

        assert_eq!(leases_of(&running, "default", "52:54:00:ab:00:02"), 1);
        assert_eq!(leases_of(&running, "lvt-othernet", "52:54:00:ab:00:02"), 0);
        assert_eq!(leases_of(&running, "lvt-othernet", "52:54:00:ab:00:03"), 1);
        assert_eq!(leases_of(&running, "default", "52:54:00:ab:00:03"), 0);
        assert_eq!(running.networks, again.networks);
        assert!(!only_default.networks.contains_key("lvt-othernet"));
        assert_eq!(leases_of(&only_default, "default", "52:54:00:ab:00:02"), 1);
        assert_eq!(leases_of(&removed, "default", "52:54:00:ab:00:02"), 0);
        let lease = running.networks["default"]
            .leases
            .iter()
            .find(|l| l.mac == "52:54:00:ab:00:02")
            .ok_or("no lease")?;
        assert!(!lease.ip.is_unspecified());
        Ok(())
    }

    /// A run's lease is asked for until found, then kept for that run: a restart (a
    /// new domain ID) asks again.
    #[tokio::test]
    async fn a_lease_is_asked_for_once_per_run() -> TestResult {
        let hv = hypervisor();
        let mut spec = spec("invrun", "uid-invrun");
        spec.mac = "52:54:00:ab:00:04".to_owned();
        hv.define_domain(&spec).await?;
        hv.start_domain(&spec.name).await?;
        let network = ["default".to_owned()];
        let address = |inventory: Inventory| {
            inventory.networks["default"]
                .leases
                .iter()
                .find(|l| l.mac == "52:54:00:ab:00:04")
                .map(|l| l.ip)
        };
        let real = address(hv.inventory(&network).await?).ok_or("no lease")?;
        let name = spec.name.clone();
        let uuid = hv
            .run(move |conn, _| {
                let domain = conn
                    .lookup_domain_by_name(&name)
                    .map_err(libvirt("look up domain"))?;
                domain.uuid_string().map_err(libvirt("get domain UUID"))
            })
            .await?;
        // Mark the cached lease: a read answered from the cache shows the mark.
        let marked = Ipv4Addr::new(192, 0, 2, 1);
        if let Some(cached) = hv.shared.domains.lock().leased.get_mut(&uuid) {
            for (_, lease) in &mut cached.leases {
                lease.ip = marked;
            }
        }
        assert_eq!(address(hv.inventory(&network).await?), Some(marked));

        let name = spec.name.clone();
        hv.run(move |conn, _| {
            let domain = conn
                .lookup_domain_by_name(&name)
                .map_err(libvirt("look up domain"))?;
            domain.destroy().map_err(libvirt("destroy domain"))
        })
        .await?;
        assert_eq!(address(hv.inventory(&network).await?), None, "stopped");
        hv.start_domain(&spec.name).await?;
        let restarted = address(hv.inventory(&network).await?);
        hv.remove_domain(&spec.name).await?;
        assert!(
            restarted.is_some_and(|ip| ip != marked),
            "{restarted:?} vs {real}"
        );
        Ok(())
    }

    /// virt 0.5's `StoragePool::list_volumes` stops at 1024 names: at 1000 clusters the
    /// old listing hid half the disks, and the planner rebuilt their clusters. The
    /// inventory lists them all.
    #[tokio::test]
    async fn more_than_1024_volumes_are_all_listed() -> TestResult {
        const MANY: usize = 1100;
        let hv = hypervisor();
        let create = hv.run(|conn, config| {
            let pool = storage::lookup_pool(conn, &config.node_pool)?;
            for i in 0..MANY {
                let name = format!("lvt-many-{i:04}.img");
                if storage::lookup_volume(&pool, &name)?.is_none() {
                    let xml = xml::raw_volume_xml(&name, 1)?;
                    virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0)
                        .map_err(libvirt("create volume"))?;
                }
            }
            Ok(())
        });
        create.await?;
        let listed = hv.inventory(&[]).await?.volumes;
        for i in 0..MANY {
            hv.delete_volume(&format!("lvt-many-{i:04}.img")).await?;
        }
        let many = listed.iter().filter(|v| v.starts_with("lvt-many-")).count();
        assert_eq!(many, MANY);
        Ok(())
    }
}
