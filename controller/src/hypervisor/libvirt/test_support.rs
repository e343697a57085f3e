//! What the libvirt tests share: a hypervisor on `test:///default` and specs whose
//! names do not collide between tests (every connection in the process sees one state).

use benchcluster_crd::Firmware;

use super::{Libvirt, LibvirtConfig};
use crate::hypervisor::{DomainInfo, DomainSpec, Hypervisor, Owner, Result};

pub type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

pub const TEST_URI: &str = "test:///default";

pub fn hypervisor() -> Libvirt {
    Libvirt::new(LibvirtConfig::for_uri(TEST_URI))
}

/// A domain spec whose names all derive from `tag`, unique per test: every
/// connection to test:///default in this process sees the same state.
pub fn spec(tag: &str, uid: &str) -> DomainSpec {
    DomainSpec {
        name: format!("lvt-{tag}-w-0"),
        owner: Owner {
            uid: uid.to_owned(),
            namespace: "lvt".to_owned(),
            name: tag.to_owned(),
            node: crate::names::NodeId::worker(0),
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

/// The domain of that name, as the inventory lists it.
pub async fn listed(hv: &Libvirt, name: &str) -> Result<Option<DomainInfo>> {
    Ok(hv
        .inventory(&[])
        .await?
        .domains
        .into_iter()
        .find(|d| d.name == name))
}
