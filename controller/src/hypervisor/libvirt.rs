//! [`Hypervisor`] on libvirt, through the `virt` crate.
//!
//! One connection is opened lazily and shared; every call runs on tokio's blocking
//! pool because `virt` calls block. A call that fails at the connection level (or
//! finds the connection dead) drops it, and the next call opens a new one.
//!
//! `virt` 0.5's `Connect` has no `close()`: its `Drop` calls `virConnectClose`, so
//! dropping the last clone is what closes the connection.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::xml::{self, DomainHost};
use super::{
    DomainInfo, DomainOwner, DomainSpec, DomainState, Hypervisor, HypervisorError, Lease,
    NetworkInfo, OverlaySpec, Result,
};

/// How to reach libvirt and where things live there. Comes from the controller's own
/// configuration (flags), never from a BenchCluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtConfig {
    /// Connection URI: `test:///default`, `qemu:///system`, `qemu+ssh://user@host/system`...
    pub uri: String,
    /// Pool holding the base images (one per role).
    pub image_pool: String,
    /// Pool where overlays and seeds of the nodes are created.
    pub node_pool: String,
    /// libvirt domain type: `test` for the test driver, `qemu` for TCG, `kvm`.
    pub domain_type: String,
    /// OVMF code image for UEFI domains.
    pub ovmf_code: String,
    /// OVMF variable store template for UEFI domains.
    pub ovmf_vars_template: String,
    /// Emulator binary to name in the domain XML; libvirt's default when `None`.
    pub emulator: Option<String>,
}

impl LibvirtConfig {
    /// Defaults for a URI: the test driver's own pool and domain type for
    /// `test:///default`, TCG and the benchcluster pools otherwise, Debian's OVMF paths.
    pub fn for_uri(uri: impl Into<String>) -> Self {
        let uri = uri.into();
        let test_driver = uri.starts_with("test://");
        let (image_pool, node_pool) = if uri == "test:///default" {
            ("default-pool", "default-pool")
        } else {
            ("benchcluster-images", "benchcluster-nodes")
        };
        Self {
            image_pool: image_pool.to_owned(),
            node_pool: node_pool.to_owned(),
            domain_type: if test_driver { "test" } else { "qemu" }.to_owned(),
            ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".to_owned(),
            ovmf_vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd".to_owned(),
            emulator: None,
            uri,
        }
    }

    fn domain_host(&self) -> DomainHost<'_> {
        DomainHost {
            domain_type: &self.domain_type,
            emulator: self.emulator.as_deref(),
            node_pool: &self.node_pool,
            ovmf_code: &self.ovmf_code,
            ovmf_vars_template: &self.ovmf_vars_template,
        }
    }
}

/// The [`Hypervisor`] on a libvirt connection.
#[derive(Clone)]
pub struct Libvirt {
    shared: Arc<Shared>,
}

/// Calls in flight at once. libvirt serialises most of them per connection anyway;
/// the bound keeps a thousand reconciles from parking a thousand blocking threads.
const MAX_CONCURRENT_CALLS: usize = 8;

struct Shared {
    config: LibvirtConfig,
    calls: tokio::sync::Semaphore,
    slot: Mutex<Slot>,
    /// Network interfaces of domains, by domain UUID, so [`Hypervisor::leases`] reads
    /// each domain's XML once instead of once per call. Entries leave with their domain
    /// ([`Hypervisor::remove_domain`]); a domain removed behind our back leaves one
    /// small entry until the process restarts.
    nics: Mutex<HashMap<String, Arc<[Nic]>>>,
}

/// A domain's interface on a libvirt network.
struct Nic {
    /// Lowercase.
    mac: String,
    network: String,
}

/// The cached connection. `generation` counts connections opened, so a call that saw
/// its connection fail drops that one and never a newer one opened meanwhile.
#[derive(Default)]
struct Slot {
    connection: Option<Connect>,
    generation: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock()
    }

    /// The shared connection (a new reference to it) and its generation, opening one
    /// if there is none or the cached one is dead.
    fn connection(&self) -> Result<(Connect, u64)> {
        let mut slot = self.lock();
        if let Some(connection) = &slot.connection {
            if matches!(connection.is_alive(), Ok(true)) {
                return Ok((connection.clone(), slot.generation));
            }
            let dead = slot.connection.take();
            drop(dead);
        }
        // libvirt's default handler prints every error, expected ones included, to
        // stderr; errors reach us as values anyway.
        virt::error::clear_error_callback();
        // Opening under the lock: concurrent callers wait for this one connection
        // rather than each opening their own.
        let connection =
            Connect::open(Some(&self.config.uri)).map_err(|source| HypervisorError::Connect {
                uri: self.config.uri.clone(),
                source,
            })?;
        slot.generation += 1;
        slot.connection = Some(connection.clone());
        Ok((connection, slot.generation))
    }

    fn lock_nics(&self) -> MutexGuard<'_, HashMap<String, Arc<[Nic]>>> {
        self.nics.lock()
    }

    /// The network interfaces of a running domain, from the cache or its XML; `None`
    /// when the domain went away meanwhile.
    fn nics_of(&self, domain: &Domain, uuid: &str) -> Result<Option<Arc<[Nic]>>> {
        if let Some(nics) = self.lock_nics().get(uuid) {
            return Ok(Some(Arc::clone(nics)));
        }
        let xml = match domain.xml_desc(0) {
            Ok(xml) => xml,
            Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => return Err(libvirt("read domain XML")(e)),
        };
        let nics: Arc<[Nic]> = xml::parse_domain(&xml)?
            .interfaces
            .into_iter()
            .filter_map(|i| {
                Some(Nic {
                    mac: i.mac?.to_ascii_lowercase(),
                    network: i.network?,
                })
            })
            .collect();
        self.lock_nics().insert(uuid.to_owned(), Arc::clone(&nics));
        Ok(Some(nics))
    }

    /// Drops the cached connection if it is still the one of `generation`.
    fn forget(&self, generation: u64) {
        let stale = {
            let mut slot = self.lock();
            if slot.generation == generation {
                slot.connection.take()
            } else {
                None
            }
        };
        // Closed outside the lock: closing a remote connection is a round trip.
        drop(stale);
    }
}

impl Libvirt {
    /// A hypervisor for `config`; nothing is opened until the first call.
    pub fn new(config: LibvirtConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                calls: tokio::sync::Semaphore::new(MAX_CONCURRENT_CALLS),
                slot: Mutex::new(Slot::default()),
                nics: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &LibvirtConfig {
        &self.shared.config
    }

    /// Opens the connection if needed and makes one round trip on it (readiness).
    pub async fn check_connection(&self) -> Result<()> {
        self.run(|conn, _| {
            conn.lib_version()
                .map(drop)
                .map_err(libvirt("get library version"))
        })
        .await
    }

    /// Closes the connection now (for a clean shutdown); a later call reopens one.
    pub async fn disconnect(&self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            let connection = shared.lock().connection.take();
            drop(connection);
        })
        .await?;
        Ok(())
    }

    /// Runs `f` with the connection on the blocking pool, dropping the connection
    /// when `f` fails at the connection level.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect, &LibvirtConfig) -> Result<T> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self.shared.calls.acquire().await.ok();
        tokio::task::spawn_blocking(move || {
            let (connection, generation) = shared.connection()?;
            let result = f(&connection, &shared.config);
            if let Err(HypervisorError::Libvirt { source, .. }) = &result
                && is_connection_error(source)
            {
                shared.forget(generation);
            }
            result
        })
        .await?
    }
}

/// Whether an error means the connection itself is unusable.
fn is_connection_error(error: &VirtError) -> bool {
    let transport = matches!(
        error.domain().known(),
        Some(ErrorDomain::Rpc | ErrorDomain::Remote | ErrorDomain::Ssh | ErrorDomain::Libssh)
    );
    match error.code().known() {
        Some(
            ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
            | ErrorNumber::SystemError
            | ErrorNumber::Rpc
            | ErrorNumber::Ssh
            | ErrorNumber::Libssh,
        ) => true,
        Some(ErrorNumber::InternalError) => transport,
        _ => false,
    }
}

fn is(error: &VirtError, number: ErrorNumber) -> bool {
    error.code().is(number)
}

fn libvirt(operation: &'static str) -> impl FnOnce(VirtError) -> HypervisorError {
    move |source| HypervisorError::Libvirt { operation, source }
}

fn lookup_pool(conn: &Connect, pool: &str) -> Result<StoragePool> {
    conn.lookup_storage_pool_by_name(pool).map_err(|e| {
        if is(&e, ErrorNumber::NoStoragePool) {
            HypervisorError::PoolMissing {
                pool: pool.to_owned(),
            }
        } else {
            libvirt("look up storage pool")(e)
        }
    })
}

fn lookup_volume(pool: &StoragePool, name: &str) -> Result<Option<StorageVol>> {
    match pool.lookup_storage_vol_by_name(name) {
        Ok(volume) => Ok(Some(volume)),
        Err(e) if is(&e, ErrorNumber::NoStorageVolume) => Ok(None),
        Err(e) => Err(libvirt("look up storage volume")(e)),
    }
}

fn lookup_domain(conn: &Connect, name: &str) -> Result<Option<Domain>> {
    match conn.lookup_domain_by_name(name) {
        Ok(domain) => Ok(Some(domain)),
        Err(e) if is(&e, ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(libvirt("look up domain")(e)),
    }
}

fn domain_state(domain: &Domain) -> std::result::Result<DomainState, VirtError> {
    use virt::domain::DomainState as Libvirt;
    // `info()`, not `state()`: virt 0.5's `state()` discards the call's error.
    Ok(match domain.info()?.state.known() {
        Some(Libvirt::Running | Libvirt::Blocked) => DomainState::Running,
        _ => DomainState::Stopped,
    })
}

/// `Ok` when `domain` carries the owner uid of `spec`, `NameConflict` otherwise.
fn check_same_owner(domain: &Domain, spec: &DomainSpec) -> Result<()> {
    let xml = domain.xml_desc(0).map_err(libvirt("read domain XML"))?;
    match xml::parse_owner(&xml) {
        Ok(Some(owner)) if owner.uid == spec.owner.uid => Ok(()),
        _ => Err(HypervisorError::NameConflict {
            name: spec.name.clone(),
        }),
    }
}

/// Undefine flags, most thorough first: drivers reject flags they do not know
/// (VIR_ERR_INVALID_ARG from their flag check), so fall back step by step.
const UNDEFINE_FLAGS: [u32; 3] = [
    virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM
        | virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | virt::sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
    virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA,
    0,
];

fn undefine(domain: &Domain) -> Result<()> {
    let mut last = None;
    for flags in UNDEFINE_FLAGS {
        match domain.undefine_flags(flags) {
            Ok(()) => return Ok(()),
            // A transient domain is gone once destroyed.
            Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(()),
            Err(e)
                if is(&e, ErrorNumber::InvalidArg)
                    || is(&e, ErrorNumber::NoSupport)
                    || is(&e, ErrorNumber::ArgumentUnsupported) =>
            {
                last = Some(e);
            }
            Err(e) => return Err(libvirt("undefine domain")(e)),
        }
    }
    match last {
        Some(e) => Err(libvirt("undefine domain")(e)),
        None => Ok(()),
    }
}

impl Hypervisor for Libvirt {
    async fn list_domains(&self, name_prefix: &str) -> Result<Vec<DomainInfo>> {
        let name_prefix = name_prefix.to_owned();
        self.run(move |conn, _| {
            // Flags 0: active and inactive, persistent and transient. One round trip;
            // a domain's name is then known locally.
            let domains = conn.list_all_domains(0).map_err(libvirt("list domains"))?;
            let mut owned = Vec::new();
            for domain in domains {
                match domain.name() {
                    Ok(name) if name.starts_with(&name_prefix) => {}
                    _ => continue,
                }
                let xml = match domain.xml_desc(0) {
                    Ok(xml) => xml,
                    // Undefined since the listing.
                    Err(e) if is(&e, ErrorNumber::NoDomain) => continue,
                    Err(e) => return Err(libvirt("read domain XML")(e)),
                };
                let readback = match xml::parse_owner(&xml) {
                    Ok(None) => continue,
                    Ok(Some(_)) => xml::parse_domain(&xml),
                    Err(e) => Err(e),
                };
                let readback = match readback {
                    Ok(readback) => readback,
                    Err(error) => {
                        let name = domain.name().unwrap_or_default();
                        tracing::warn!(domain = %name, error = %error, "ignoring a domain whose owner metadata cannot be read");
                        continue;
                    }
                };
                let Some(owner) = readback.owner.clone() else {
                    continue;
                };
                let state = match domain_state(&domain) {
                    Ok(state) => state,
                    Err(e) if is(&e, ErrorNumber::NoDomain) => continue,
                    Err(e) => return Err(libvirt("get domain state")(e)),
                };
                owned.push(DomainInfo {
                    mac: readback.primary_mac(),
                    name: readback.name,
                    owner,
                    state,
                });
            }
            owned.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(owned)
        })
        .await
    }

    async fn list_volumes(&self) -> Result<Vec<String>> {
        self.run(|conn, config| {
            let pool = lookup_pool(conn, &config.node_pool)?;
            let mut names = pool.list_volumes().map_err(libvirt("list volumes"))?;
            names.sort();
            Ok(names)
        })
        .await
    }

    async fn network(&self, name: &str) -> Result<Option<NetworkInfo>> {
        let name = name.to_owned();
        self.run(move |conn, _| {
            let network = match conn.lookup_network_by_name(&name) {
                Ok(network) => network,
                Err(e) if is(&e, ErrorNumber::NoNetwork) => return Ok(None),
                Err(e) => return Err(libvirt("look up network")(e)),
            };
            let active = network.is_active().map_err(libvirt("get network state"))?;
            let xml = network.xml_desc(0).map_err(libvirt("read network XML"))?;
            Ok(Some(NetworkInfo {
                active,
                dhcp: xml::network_has_ipv4_dhcp(&xml)?,
            }))
        })
        .await
    }

    /// IPv4 leases of the running domains' interfaces on `network`.
    ///
    /// virt 0.5 wraps neither `virNetworkGetDHCPLeases` nor its lease type, and this
    /// workspace forbids `unsafe`, so the leases come from
    /// `virDomainInterfaceAddresses(VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)`, which
    /// libvirt answers from the same network lease database, per domain and per MAC.
    /// That API carries no expiry: `expiry_unix` is 0.
    async fn leases(&self, network: &str, domains: &[String]) -> Result<Vec<Lease>> {
        let network = network.to_owned();
        let names = domains.to_vec();
        let shared = Arc::clone(&self.shared);
        self.run(move |conn, _| {
            conn.lookup_network_by_name(&network)
                .map_err(libvirt("look up network"))?;
            let mut leases = Vec::new();
            for name in names {
                let Some(domain) = lookup_domain(conn, &name)? else {
                    continue;
                };
                if !domain.is_active().map_err(libvirt("get domain state"))? {
                    continue;
                }
                let uuid = domain.uuid_string().map_err(libvirt("get domain UUID"))?;
                let Some(nics) = shared.nics_of(&domain, &uuid)? else {
                    continue;
                };
                let macs: Vec<&str> = nics
                    .iter()
                    .filter(|nic| nic.network == network)
                    .map(|nic| nic.mac.as_str())
                    .collect();
                if macs.is_empty() {
                    continue;
                }
                // On qemu, libvirt answers this from the network's own dnsmasq leases,
                // dropping expired ones; the MAC match below keeps another VM's stale
                // lease on a reused address out.
                let interfaces = match domain
                    .interface_addresses(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
                {
                    Ok(interfaces) => interfaces,
                    // Stopped or undefined since the lookup.
                    Err(e)
                        if is(&e, ErrorNumber::NoDomain)
                            || is(&e, ErrorNumber::OperationInvalid) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(libvirt("get domain interface leases")(e)),
                };
                for interface in interfaces {
                    let Some(mac) = interface.hwaddr.map(|m| m.to_ascii_lowercase()) else {
                        continue;
                    };
                    if !macs.contains(&mac.as_str()) {
                        continue;
                    }
                    for address in interface.addrs {
                        if address.typed != i64::from(virt::sys::VIR_IP_ADDR_TYPE_IPV4) {
                            continue;
                        }
                        if let Ok(ip) = address.addr.parse::<Ipv4Addr>() {
                            leases.push(Lease {
                                mac: mac.clone(),
                                ip,
                                expiry_unix: 0,
                            });
                        }
                    }
                }
            }
            Ok(leases)
        })
        .await
    }

    async fn domain_owner(&self, name: &str) -> Result<DomainOwner> {
        let name = name.to_owned();
        self.run(move |conn, _| {
            let Some(domain) = lookup_domain(conn, &name)? else {
                return Ok(DomainOwner::Absent);
            };
            let xml = match domain.xml_desc(0) {
                Ok(xml) => xml,
                Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(DomainOwner::Absent),
                Err(e) => return Err(libvirt("read domain XML")(e)),
            };
            Ok(match xml::parse_owner(&xml) {
                Ok(Some(owner)) => DomainOwner::Owned(owner),
                // No metadata of ours, or metadata we cannot read: not ours to touch.
                Ok(None) | Err(_) => DomainOwner::Foreign,
            })
        })
        .await
    }

    async fn create_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        let spec = spec.clone();
        self.run(move |conn, config| {
            let images = lookup_pool(conn, &config.image_pool)?;
            let nodes = lookup_pool(conn, &config.node_pool)?;
            if lookup_volume(&nodes, &spec.name)?.is_some() {
                return Ok(());
            }
            let base = match lookup_volume(&images, &spec.base_image)? {
                Some(base) => Some(base),
                None => {
                    // An image copied into the pool's directory stays unknown to
                    // libvirt until the pool is refreshed; only done on a miss.
                    images.refresh(0).map_err(libvirt("refresh image pool"))?;
                    lookup_volume(&images, &spec.base_image)?
                }
            };
            let Some(base) = base else {
                return Err(HypervisorError::ImageMissing {
                    pool: config.image_pool.clone(),
                    volume: spec.base_image.clone(),
                });
            };
            let base_path = base.path().map_err(libvirt("get base image path"))?;
            let base_xml = base.xml_desc(0).map_err(libvirt("read base image XML"))?;
            let base_format = xml::volume_format(&base_xml)?.unwrap_or_else(|| "qcow2".to_owned());
            // An overlay smaller than its base would cut the guest's disk short.
            let base_capacity = base
                .info()
                .map_err(libvirt("get base image size"))?
                .capacity;
            let xml = xml::overlay_volume_xml(
                &spec.name,
                spec.capacity_bytes.max(base_capacity),
                &base_path,
                &base_format,
            )?;
            match StorageVol::create_xml(&nodes, &xml, 0) {
                Ok(_) => Ok(()),
                // Created concurrently by someone else: that is the same overlay.
                Err(e) => match lookup_volume(&nodes, &spec.name) {
                    Ok(Some(_)) => Ok(()),
                    _ => Err(libvirt("create overlay volume")(e)),
                },
            }
        })
        .await
    }

    async fn define_domain(&self, spec: &DomainSpec) -> Result<()> {
        let spec = spec.clone();
        self.run(move |conn, config| {
            if let Some(domain) = lookup_domain(conn, &spec.name)? {
                return check_same_owner(&domain, &spec);
            }
            let xml = xml::domain_xml(&spec, &config.domain_host())?;
            match conn.define_domain_xml(&xml) {
                Ok(_) => Ok(()),
                // Lost a race for the name: fine if the winner is the same owner.
                Err(e) => match lookup_domain(conn, &spec.name)? {
                    Some(domain) => check_same_owner(&domain, &spec),
                    None => Err(libvirt("define domain")(e)),
                },
            }
        })
        .await
    }

    async fn start_domain(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.run(move |conn, _| {
            let domain = conn
                .lookup_domain_by_name(&name)
                .map_err(libvirt("look up domain"))?;
            let active = domain.is_active().map_err(libvirt("get domain state"))?;
            if active {
                // Paused reads as Stopped; resuming is what makes it run.
                let paused = domain
                    .info()
                    .map_err(libvirt("get domain state"))?
                    .state
                    .is(virt::domain::DomainState::Paused);
                if paused {
                    domain.resume().map_err(libvirt("resume domain"))?;
                }
                return Ok(());
            }
            match domain.create() {
                Ok(()) => Ok(()),
                // Started concurrently.
                Err(_) if matches!(domain.is_active(), Ok(true)) => Ok(()),
                Err(e) => Err(libvirt("start domain")(e)),
            }
        })
        .await
    }

    async fn remove_domain(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        let shared = Arc::clone(&self.shared);
        self.run(move |conn, _| {
            let Some(domain) = lookup_domain(conn, &name)? else {
                return Ok(());
            };
            if let Ok(uuid) = domain.uuid_string() {
                shared.lock_nics().remove(&uuid);
            }
            let active = match domain.is_active() {
                Ok(active) => active,
                Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(()),
                Err(e) => return Err(libvirt("get domain state")(e)),
            };
            if active {
                match domain.destroy() {
                    Ok(()) => {}
                    // Stopped or gone meanwhile.
                    Err(e)
                        if is(&e, ErrorNumber::OperationInvalid)
                            || is(&e, ErrorNumber::NoDomain) => {}
                    Err(e) => return Err(libvirt("destroy domain")(e)),
                }
            }
            undefine(&domain)
        })
        .await
    }

    async fn create_seed(&self, name: &str, content: &[u8]) -> Result<()> {
        let name = name.to_owned();
        let content = content.to_vec();
        self.run(move |conn, config| {
            let pool = lookup_pool(conn, &config.node_pool)?;
            // A seed left by an interrupted pass holds another host key: replace it.
            if let Some(old) = lookup_volume(&pool, &name)? {
                old.delete(0).map_err(libvirt("delete stale seed volume"))?;
            }
            let length = content.len() as u64;
            let xml = xml::raw_volume_xml(&name, length)?;
            let volume =
                StorageVol::create_xml(&pool, &xml, 0).map_err(libvirt("create seed volume"))?;
            // Uploaded through libvirt's stream, so this works for remote hypervisors too.
            let stream =
                virt::stream::Stream::new(conn, 0).map_err(libvirt("open upload stream"))?;
            volume
                .upload(&stream, 0, length, 0)
                .map_err(libvirt("upload seed"))?;
            let mut sent = 0;
            while sent < content.len() {
                let n = stream
                    .send(&content[sent..])
                    .map_err(libvirt("send seed data"))?;
                match usize::try_from(n) {
                    Ok(n) if n > 0 => sent += n,
                    _ => return Err(HypervisorError::UploadStalled { volume: name }),
                }
            }
            stream.finish().map_err(libvirt("finish seed upload"))
        })
        .await
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.run(move |conn, config| {
            let pool = lookup_pool(conn, &config.node_pool)?;
            let Some(volume) = lookup_volume(&pool, &name)? else {
                return Ok(());
            };
            match volume.delete(0) {
                Ok(()) => Ok(()),
                Err(e) if is(&e, ErrorNumber::NoStorageVolume) => Ok(()),
                Err(e) => Err(libvirt("delete volume")(e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use benchcluster_crd::{Firmware, Role};

    use super::*;
    use crate::hypervisor::Owner;

    type TestResult = std::result::Result<(), Box<dyn Error>>;

    const TEST_URI: &str = "test:///default";

    fn hypervisor() -> Libvirt {
        Libvirt::new(LibvirtConfig::for_uri(TEST_URI))
    }

    /// A domain spec whose names all derive from `tag`, unique per test: every
    /// connection to test:///default in this process sees the same state.
    fn spec(tag: &str, uid: &str) -> DomainSpec {
        DomainSpec {
            name: format!("lvt-{tag}-w-0"),
            owner: Owner {
                uid: uid.to_owned(),
                namespace: "lvt".to_owned(),
                name: tag.to_owned(),
                role: Role::Worker,
                index: 0,
                host_key: Some(
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheTestDomain".to_owned(),
                ),
            },
            vcpus: 1,
            memory_bytes: 256 << 20,
            disk_volume: format!("lvt-{tag}-w-0.qcow2"),
            seed_volume: None,
            mac: "52:54:00:00:00:01".to_owned(),
            network: "default".to_owned(),
            firmware: Firmware::Bios,
        }
    }

    async fn listed(hv: &Libvirt, name: &str) -> Result<Option<DomainInfo>> {
        Ok(hv
            .list_domains(name)
            .await?
            .into_iter()
            .find(|d| d.name == name))
    }

    /// Creates a base image volume in the test driver's pool (test set-up, constant XML).
    async fn create_base(hv: &Libvirt, name: &'static str) -> Result<()> {
        hv.run(move |conn, config| {
            let pool = lookup_pool(conn, &config.image_pool)?;
            if lookup_volume(&pool, name)?.is_none() {
                let xml = quick_xml::se::to_string_with_root(
                    "volume",
                    &BaseVolume {
                        name,
                        capacity: 1 << 20,
                    },
                )
                .map_err(|source| xml::XmlError::Serialize {
                    what: "volume",
                    source,
                })?;
                StorageVol::create_xml(&pool, &xml, 0).map_err(libvirt("create base"))?;
            }
            Ok(())
        })
        .await
    }

    #[derive(serde::Serialize)]
    struct BaseVolume {
        name: &'static str,
        capacity: u64,
    }

    #[test]
    fn config_defaults_follow_the_uri() {
        let test = LibvirtConfig::for_uri("test:///default");
        assert_eq!(test.domain_type, "test");
        assert_eq!(test.image_pool, "default-pool");
        assert_eq!(test.node_pool, "default-pool");

        let remote = LibvirtConfig::for_uri("qemu+ssh://bench@hv/system");
        assert_eq!(remote.domain_type, "qemu");
        assert_eq!(remote.image_pool, "benchcluster-images");
        assert_eq!(remote.node_pool, "benchcluster-nodes");
        assert_eq!(remote.ovmf_code, "/usr/share/OVMF/OVMF_CODE_4M.fd");
        assert_eq!(remote.ovmf_vars_template, "/usr/share/OVMF/OVMF_VARS_4M.fd");
        assert_eq!(remote.emulator, None);

        let custom_test = LibvirtConfig::for_uri("test:///tmp/host.xml");
        assert_eq!(custom_test.domain_type, "test");
        assert_eq!(custom_test.node_pool, "benchcluster-nodes");
    }

    #[tokio::test]
    async fn check_connection_works_and_reports_bad_uris() -> TestResult {
        hypervisor().check_connection().await?;
        let bad = Libvirt::new(LibvirtConfig::for_uri(
            "test:///nonexistent/benchcluster.xml",
        ));
        assert!(matches!(
            bad.check_connection().await,
            Err(HypervisorError::Connect { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn forgetting_a_connection_reopens_only_that_one() -> TestResult {
        let hv = hypervisor();
        hv.check_connection().await?;
        let shared = Arc::clone(&hv.shared);
        let (first, second, third) = tokio::task::spawn_blocking(move || {
            let (_, first) = shared.connection()?;
            shared.forget(first);
            let (_, second) = shared.connection()?;
            // A stale generation leaves the newer connection alone.
            shared.forget(first);
            let (_, third) = shared.connection()?;
            Ok::<_, HypervisorError>((first, second, third))
        })
        .await??;
        assert!(second > first);
        assert_eq!(third, second);
        hv.disconnect().await?;
        hv.check_connection().await?;
        Ok(())
    }

    #[tokio::test]
    async fn domain_lifecycle_is_idempotent() -> TestResult {
        let hv = hypervisor();
        let mut spec = spec("lifecycle", "uid-lifecycle");
        spec.firmware = Firmware::Uefi;
        spec.seed_volume = Some("lvt-lifecycle-seed.iso".to_owned());
        spec.owner.role = Role::ControlPlane;

        hv.define_domain(&spec).await?;
        hv.define_domain(&spec).await?;
        let info = listed(&hv, &spec.name)
            .await?
            .ok_or("defined domain not listed")?;
        assert_eq!(info.owner, spec.owner);
        assert_eq!(info.state, DomainState::Stopped);
        assert_eq!(info.mac.as_deref(), Some("52:54:00:00:00:01"));

        hv.start_domain(&spec.name).await?;
        hv.start_domain(&spec.name).await?;
        let info = listed(&hv, &spec.name)
            .await?
            .ok_or("started domain not listed")?;
        assert_eq!(info.state, DomainState::Running);

        hv.remove_domain(&spec.name).await?;
        assert_eq!(listed(&hv, &spec.name).await?, None);
        hv.remove_domain(&spec.name).await?;
        Ok(())
    }

    #[tokio::test]
    async fn stopped_domain_is_removed_too() -> TestResult {
        let hv = hypervisor();
        let spec = spec("stopped", "uid-stopped");
        hv.define_domain(&spec).await?;
        hv.remove_domain(&spec.name).await?;
        assert_eq!(listed(&hv, &spec.name).await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn starting_a_missing_domain_fails() -> TestResult {
        let hv = hypervisor();
        let result = hv.start_domain("lvt-missing-w-0").await;
        match result {
            Err(HypervisorError::Libvirt { source, .. }) => {
                assert!(is(&source, ErrorNumber::NoDomain));
            }
            other => return Err(format!("expected NoDomain, got {other:?}").into()),
        }
        hv.remove_domain("lvt-missing-w-0").await?;
        Ok(())
    }

    #[tokio::test]
    async fn names_taken_by_others_are_conflicts() -> TestResult {
        let hv = hypervisor();
        let ours = spec("conflict", "uid-conflict");
        hv.define_domain(&ours).await?;
        let mut theirs = ours.clone();
        theirs.owner.uid = "uid-someone-else".to_owned();
        let result = hv.define_domain(&theirs).await;
        assert!(
            matches!(&result, Err(HypervisorError::NameConflict { name }) if *name == ours.name),
            "{result:?}"
        );
        assert!(result.is_err_and(|e| e.is_permanent()));
        hv.remove_domain(&ours.name).await?;

        // A domain without owner metadata: not listed, and its name is not ours.
        let foreign = spec("foreign", "uid-foreign");
        hv.run(|conn, _| {
            let xml = "<domain type='test'><name>lvt-foreign-w-0</name>\
                       <memory unit='KiB'>262144</memory><os><type>hvm</type></os></domain>";
            conn.define_domain_xml(xml).map_err(libvirt("define"))?;
            Ok(())
        })
        .await?;
        assert_eq!(listed(&hv, &foreign.name).await?, None);
        assert!(matches!(
            hv.define_domain(&foreign).await,
            Err(HypervisorError::NameConflict { .. })
        ));
        hv.remove_domain(&foreign.name).await?;
        Ok(())
    }

    #[tokio::test]
    async fn owner_with_markup_survives_libvirt() -> TestResult {
        let hv = hypervisor();
        let mut spec = spec("markup", "uid-markup");
        spec.owner.name = "a<b>&\"c'\nd\te ]]> &amp;".to_owned();
        hv.define_domain(&spec).await?;
        let info = listed(&hv, &spec.name).await?.ok_or("domain not listed")?;
        assert_eq!(info.owner, spec.owner);
        hv.remove_domain(&spec.name).await?;
        Ok(())
    }

    #[tokio::test]
    async fn overlay_and_volume_deletion_are_idempotent() -> TestResult {
        let hv = hypervisor();
        create_base(&hv, "lvt-overlay-base").await?;
        let overlay = OverlaySpec {
            name: "lvt-overlay-w-0.qcow2".to_owned(),
            base_image: "lvt-overlay-base".to_owned(),
            capacity_bytes: 8 << 20,
        };
        hv.create_overlay(&overlay).await?;
        hv.create_overlay(&overlay).await?;
        assert!(hv.list_volumes().await?.contains(&overlay.name));

        let name = overlay.name.clone();
        let xml = hv
            .run(move |conn, config| {
                let pool = lookup_pool(conn, &config.node_pool)?;
                let volume = lookup_volume(&pool, &name)?.ok_or(HypervisorError::ImageMissing {
                    pool: config.node_pool.clone(),
                    volume: name.clone(),
                })?;
                volume.xml_desc(0).map_err(libvirt("read volume XML"))
            })
            .await?;
        assert!(
            xml.contains("<backingStore>\n    <path>/default-pool/lvt-overlay-base</path>"),
            "{xml}"
        );
        assert!(
            xml.contains("<capacity unit='bytes'>8388608</capacity>"),
            "{xml}"
        );

        hv.delete_volume(&overlay.name).await?;
        assert!(!hv.list_volumes().await?.contains(&overlay.name));
        hv.delete_volume(&overlay.name).await?;
        Ok(())
    }

    #[tokio::test]
    async fn missing_image_and_pool_are_reported() -> TestResult {
        let hv = hypervisor();
        let overlay = OverlaySpec {
            name: "lvt-noimage-w-0.qcow2".to_owned(),
            base_image: "lvt-no-such-image".to_owned(),
            capacity_bytes: 1 << 20,
        };
        let result = hv.create_overlay(&overlay).await;
        assert!(
            matches!(&result, Err(HypervisorError::ImageMissing { volume, .. }) if *volume == overlay.base_image),
            "{result:?}"
        );
        assert!(!hv.list_volumes().await?.contains(&overlay.name));

        let mut config = LibvirtConfig::for_uri(TEST_URI);
        config.node_pool = "lvt-no-such-pool".to_owned();
        let nopool = Libvirt::new(config);
        assert!(matches!(
            nopool.create_overlay(&overlay).await,
            Err(HypervisorError::PoolMissing { pool }) if pool == "lvt-no-such-pool"
        ));
        assert!(matches!(
            nopool.list_volumes().await,
            Err(HypervisorError::PoolMissing { .. })
        ));
        assert!(matches!(
            nopool.delete_volume("x").await,
            Err(HypervisorError::PoolMissing { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn network_reports_dhcp_and_absence() -> TestResult {
        let hv = hypervisor();
        assert_eq!(
            hv.network("default").await?,
            Some(NetworkInfo {
                active: true,
                dhcp: true
            })
        );
        assert_eq!(hv.network("lvt-no-such-network").await?, None);
        Ok(())
    }

    /// The test driver answers interface-address queries itself (made-up addresses in
    /// the network's range): what is tested here is the mapping, not a DHCP server.
    #[tokio::test]
    async fn leases_cover_running_domains_on_the_network() -> TestResult {
        let hv = hypervisor();
        let mut spec = spec("leases", "uid-leases");
        spec.mac = "52:54:00:AB:00:02".to_owned();
        hv.define_domain(&spec).await?;
        let only = [spec.name.clone()];
        let before = hv.leases("default", &only).await?;
        assert!(before.is_empty(), "a defined, stopped domain has no lease");

        hv.start_domain(&spec.name).await?;
        let leases = hv.leases("default", &only).await?;
        assert_eq!(leases.len(), 1, "only the named domain's lease: {leases:?}");
        let absent = hv
            .leases("default", &["lvt-no-such-domain".to_owned()])
            .await?;
        assert!(absent.is_empty());
        hv.remove_domain(&spec.name).await?;
        let lease = leases
            .iter()
            .find(|l| l.mac == "52:54:00:ab:00:02")
            .ok_or("no lease for the running domain")?;
        assert!(!lease.ip.is_unspecified());

        assert!(matches!(
            hv.leases("lvt-no-such-network", &only).await,
            Err(HypervisorError::Libvirt { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn leases_keep_to_their_network() -> TestResult {
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
        let mut spec = spec("othernet", "uid-othernet");
        spec.mac = "52:54:00:ab:00:03".to_owned();
        spec.network = "lvt-othernet".to_owned();
        hv.define_domain(&spec).await?;
        hv.start_domain(&spec.name).await?;
        let only = [spec.name.clone()];
        let on_default = hv.leases("default", &only).await?;
        let on_other = hv.leases("lvt-othernet", &only).await?;
        hv.remove_domain(&spec.name).await?;
        assert!(!on_default.iter().any(|l| l.mac == spec.mac));
        assert!(on_other.iter().any(|l| l.mac == spec.mac));
        Ok(())
    }
}
