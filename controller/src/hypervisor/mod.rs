//! The hypervisor edge: what the controller needs from libvirt, as a trait.
//!
//! The planner never sees this module; the act stage calls it. [`libvirt::Libvirt`]
//! implements it on the `virt` crate for any libvirt URI (`test:///default` in the api
//! tier, `qemu:///system` or `qemu+ssh://...` for real VMs).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;

use benchcluster_crd::Firmware;

use crate::names::NodeId;

pub mod libvirt;
pub mod metered;
pub mod xml;

/// Who owns a domain: written into the domain XML's metadata in our own namespace,
/// read back to find and adopt domains after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `metadata.uid` of the BenchCluster.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Which node of the BenchCluster the domain is.
    pub node: NodeId,
    /// The VM's pinned SSH host public key (`ssh-ed25519 AAAA...`), recorded with the
    /// domain so a restarted controller still knows which key to expect.
    pub host_key: Option<String>,
}

/// Run state of a domain, as far as the controller cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    Running,
    /// Defined but not running (shut off, crashed, paused...).
    Stopped,
}

/// A domain that carries owner metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub owner: Owner,
    pub state: DomainState,
    /// MAC of the interface on the cluster network, lowercase.
    pub mac: Option<String>,
    /// What it is defined with, when its XML says.
    pub footprint: Option<Footprint>,
}

/// The vCPUs and memory a domain is defined with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

impl Footprint {
    pub fn plus(self, other: Footprint) -> Footprint {
        Footprint {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }
}

/// A domain without our owner metadata: someone else's VM, which still holds MACs and,
/// while it runs, CPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignDomain {
    pub name: String,
    pub state: DomainState,
    /// MACs of all its interfaces, lowercase.
    pub macs: Vec<String>,
    pub footprint: Option<Footprint>,
}

/// Who holds a domain name, read directly from the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainOwner {
    Absent,
    /// A domain with our owner metadata.
    Owned(Owner),
    /// A domain without (readable) owner metadata.
    Foreign,
}

/// A libvirt network as seen by the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub active: bool,
    /// Whether the network's XML has a `<dhcp>` element; without it VMs get no address.
    pub dhcp: bool,
}

/// A DHCP lease from the network's dnsmasq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
    /// Expiry as seconds since the Unix epoch; 0 for an infinite lease.
    pub expiry_unix: i64,
}

/// A requested network in an [`Inventory`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkInventory {
    /// `None` when the network does not exist.
    pub info: Option<NetworkInfo>,
    /// Current DHCP leases on the network of the domains in [`Inventory::domains`]
    /// (none while the network is missing or inactive).
    pub leases: Vec<Lease>,
}

/// The host as one read sees it: everything observe needs of every BenchCluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Every domain that carries owner metadata, whoever owns it, sorted by name.
    pub domains: Vec<DomainInfo>,
    /// Every other domain on the host.
    pub foreign: Vec<ForeignDomain>,
    /// Names of the volumes in the node pool, sorted.
    pub volumes: Vec<String>,
    /// Each requested network, by name.
    pub networks: BTreeMap<String, NetworkInventory>,
    /// The host's CPUs and memory, when the hypervisor said.
    pub host: Option<HostCapacity>,
}

/// A host's physical capacity (libvirt's node info).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    /// Active CPUs.
    pub cpus: u32,
    pub memory_bytes: u64,
}

impl Inventory {
    /// The domains whose names start with `prefix` (for tests and tools that look at
    /// one cluster: ownership is still decided by the metadata).
    pub fn domains_with_prefix(self, prefix: &str) -> Vec<DomainInfo> {
        self.domains
            .into_iter()
            .filter(|d| d.name.starts_with(prefix))
            .collect()
    }
}

/// A qcow2 overlay to create in the node pool, backed by a base image in the image pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySpec {
    pub name: String,
    /// Volume name of the base image in the image pool.
    pub base_image: String,
    pub capacity_bytes: u64,
}

/// Everything needed to define one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub name: String,
    pub owner: Owner,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Overlay volume (in the node pool) holding the root disk.
    pub disk_volume: String,
    /// NoCloud seed volume (in the node pool), when per-VM identity is injected.
    pub seed_volume: Option<String>,
    pub mac: String,
    pub network: String,
    pub firmware: Firmware,
}

/// Failures of the hypervisor edge.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt {operation} failed")]
    Libvirt {
        operation: &'static str,
        #[source]
        source: virt::error::Error,
    },
    #[error("cannot connect to libvirt at {uri}")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("storage pool {pool:?} does not exist")]
    PoolMissing { pool: String },
    #[error("base image {volume:?} is not in storage pool {pool:?}")]
    ImageMissing { pool: String, volume: String },
    #[error("domain name {name:?} is taken by a domain this BenchCluster does not own")]
    NameConflict { name: String },
    #[error(
        "every one of the {tried} MACs domain {domain:?} may get is held by another domain on the host"
    )]
    NoFreeMac { domain: String, tried: u32 },
    #[error("upload to volume {volume:?} stopped making progress")]
    UploadStalled { volume: String },
    #[error("domain XML")]
    Xml(#[from] xml::XmlError),
    #[error("a blocking libvirt task died")]
    Join(#[from] tokio::task::JoinError),
    /// A read that several passes waited on failed; each of them reports the one error.
    #[error("the shared host inventory read failed")]
    Shared(#[source] Arc<HypervisorError>),
}

impl HypervisorError {
    /// True when retrying the same call cannot help until something outside changes.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.root(),
            Self::PoolMissing { .. } | Self::ImageMissing { .. } | Self::NameConflict { .. }
        )
    }

    /// The error itself, or the one a shared read failed with.
    pub fn root(&self) -> &HypervisorError {
        match self {
            Self::Shared(inner) => inner.root(),
            other => other,
        }
    }
}

pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;

/// What the controller needs from a hypervisor. Every mutation is idempotent: creating
/// what already exists (as specified) and removing what is gone both succeed, so a pass
/// that died half-way can simply run again.
pub trait Hypervisor: Send + Sync + 'static {
    /// The whole host in one read: every domain carrying owner metadata (its owner,
    /// state and MAC), the node pool's volumes, and each of `networks` with its
    /// leases. Its cost does not follow the number of clusters: observe reads it once
    /// per tick for all of them (see `reconcile::inventory`).
    fn inventory(&self, networks: &[String]) -> impl Future<Output = Result<Inventory>> + Send;
    /// Who holds the domain name now, read from the hypervisor itself.
    fn domain_owner(&self, name: &str) -> impl Future<Output = Result<DomainOwner>> + Send;
    /// Creates the overlay unless a volume of that name exists.
    fn create_overlay(&self, spec: &OverlaySpec) -> impl Future<Output = Result<()>> + Send;
    /// Defines the domain unless a domain of that name exists with the same owner.
    fn define_domain(&self, spec: &DomainSpec) -> impl Future<Output = Result<()>> + Send;
    /// Starts the domain unless it is running.
    fn start_domain(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Stops (hard) and undefines the domain; succeeds if it does not exist.
    fn remove_domain(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Creates a raw volume in the node pool holding exactly `content`, unless a volume
    /// of that name exists: a seed's name is its host key's, so whatever holds the name
    /// is that seed, and a seed a domain may boot from is never overwritten.
    fn create_seed(&self, name: &str, content: &[u8]) -> impl Future<Output = Result<()>> + Send;
    /// Deletes a volume of the node pool; succeeds if it does not exist.
    fn delete_volume(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
}
