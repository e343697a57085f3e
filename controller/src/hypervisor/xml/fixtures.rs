//! Specs and host settings shared by the XML tests, and the golden-file comparison.

use benchcluster_crd::{Firmware, Role};

use super::DomainHost;
use crate::hypervisor::{DomainSpec, Owner};

pub type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

pub const HOST: DomainHost<'static> = DomainHost {
    domain_type: "qemu",
    emulator: Some("/usr/bin/qemu-system-x86_64"),
    node_pool: "benchcluster-nodes",
    ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd",
    ovmf_vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd",
};

pub fn owner(role: Role, index: u32) -> Owner {
    Owner {
        uid: "6f1c2b9e-3d4a-4e5f-8a7b-9c0d1e2f3a4b".to_owned(),
        namespace: "bench".to_owned(),
        name: "small".to_owned(),
        node: match role {
            Role::ControlPlane => crate::names::NodeId::CONTROL_PLANE,
            Role::Worker => crate::names::NodeId::worker(index),
        },
        host_key: Some(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinnedHostKeyForGoldenTests".to_owned(),
        ),
    }
}

pub fn bios_worker() -> DomainSpec {
    DomainSpec {
        name: "bench-small-w-1".to_owned(),
        owner: owner(Role::Worker, 1),
        vcpus: 2,
        memory_bytes: 2 << 30,
        disk_volume: "bench-small-w-1.qcow2".to_owned(),
        seed_volume: None,
        mac: "52:54:00:12:34:56".to_owned(),
        network: "benchnet".to_owned(),
        firmware: Firmware::Bios,
    }
}

pub fn uefi_control_plane() -> DomainSpec {
    DomainSpec {
        name: "bench-small-cp-0".to_owned(),
        owner: owner(Role::ControlPlane, 0),
        vcpus: 4,
        memory_bytes: 4 << 30,
        disk_volume: "bench-small-cp-0.qcow2".to_owned(),
        seed_volume: Some("bench-small-cp-0.6f1c2b9e.seed.img".to_owned()),
        mac: "52:54:00:ab:cd:ef".to_owned(),
        network: "benchnet".to_owned(),
        firmware: Firmware::Uefi,
    }
}

/// Compares with a golden file; `BENCHCLUSTER_BLESS=1` rewrites it instead.
pub fn assert_golden(actual: &str, golden: &str, path: &str) {
    if std::env::var("BENCHCLUSTER_BLESS").is_ok_and(|v| v == "1") {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        std::fs::write(file, actual).unwrap_or_default();
        return;
    }
    assert_eq!(
        actual, golden,
        "XML differs from the golden file; actual:\n{actual}"
    );
}
