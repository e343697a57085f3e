//! [`Hypervisor`] on libvirt, through the `virt` crate: the trait's methods here, each
//! one call of the file that holds its concern. `connection` opens, shares and drops
//! the connection and runs every call on the blocking pool; `inventory` reads the
//! whole host (domains, volumes, networks and leases); `domains` defines, starts and
//! removes domains and reads who holds a name; `storage` creates, lists and deletes
//! the overlay and seed volumes; `network` reads a network's state.

use std::sync::Arc;

use virt::error::{Error as VirtError, ErrorNumber};

use super::xml::DomainHost;
use super::{DomainOwner, DomainSpec, Hypervisor, HypervisorError, Inventory, OverlaySpec, Result};

mod connection;
mod domains;
mod inventory;
mod network;
mod storage;

#[cfg(test)]
mod test_support;

use connection::Shared;

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

fn is(error: &VirtError, number: ErrorNumber) -> bool {
    error.code().is(number)
}

fn libvirt(operation: &'static str) -> impl FnOnce(VirtError) -> HypervisorError {
    move |source| HypervisorError::Libvirt { operation, source }
}

impl Hypervisor for Libvirt {
    async fn inventory(&self, networks: &[String]) -> Result<Inventory> {
        let networks = networks.to_vec();
        let shared = Arc::clone(&self.shared);
        self.run(move |conn, config| inventory::read(conn, config, &shared, &networks))
            .await
    }

    async fn domain_owner(&self, name: &str) -> Result<DomainOwner> {
        let name = name.to_owned();
        self.run(move |conn, _| domains::owner(conn, &name)).await
    }

    async fn create_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        let spec = spec.clone();
        self.run(move |conn, config| storage::create_overlay(conn, config, &spec))
            .await
    }

    async fn define_domain(&self, spec: &DomainSpec) -> Result<()> {
        let spec = spec.clone();
        self.run(move |conn, config| domains::define(conn, config, &spec))
            .await
    }

    async fn start_domain(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.run(move |conn, _| domains::start(conn, &name)).await
    }

    async fn remove_domain(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        let shared = Arc::clone(&self.shared);
        self.run(move |conn, _| domains::remove(conn, &shared, &name))
            .await
    }

    async fn create_seed(&self, name: &str, content: &[u8]) -> Result<()> {
        let name = name.to_owned();
        let content = content.to_vec();
        self.run(move |conn, config| storage::create_seed(conn, config, &name, &content))
            .await
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.run(move |conn, config| storage::delete_volume(conn, config, &name))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
