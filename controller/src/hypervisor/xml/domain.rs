//! Writing a domain definition: the domain XML of one VM (firmware, disks, the NIC on
//! the cluster network, console, RNG), with the owner metadata written by `owner`.

use benchcluster_crd::Firmware;
use serde::Serialize;

use super::owner::{self, MetadataXml};
use super::{Result, ScaledXml, check_attribute, check_text, to_xml};
use crate::hypervisor::DomainSpec;

/// Host-side settings that shape a domain's XML; they come from the controller's
/// configuration, never from the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainHost<'a> {
    /// libvirt domain type: `test`, `qemu` (TCG) or `kvm`.
    pub domain_type: &'a str,
    /// Emulator binary; written only for non-`test` domain types.
    pub emulator: Option<&'a str>,
    /// Storage pool holding the overlay and seed volumes.
    pub node_pool: &'a str,
    /// OVMF code image, read-only pflash, for UEFI domains.
    pub ovmf_code: &'a str,
    /// OVMF variable store template, copied by libvirt into the domain's own nvram.
    pub ovmf_vars_template: &'a str,
}

/// The libvirt domain type of the test driver, which accepts no other.
pub const TEST_DOMAIN_TYPE: &str = "test";

#[derive(Serialize)]
#[serde(rename = "domain")]
struct DomainXml<'a> {
    #[serde(rename = "@type")]
    domain_type: &'a str,
    name: &'a str,
    metadata: MetadataXml<'a>,
    memory: ScaledXml,
    vcpu: u32,
    os: OsXml<'a>,
    features: FeaturesXml,
    devices: DevicesXml<'a>,
}

#[derive(Serialize)]
struct OsXml<'a> {
    #[serde(rename = "type")]
    os_type: OsTypeXml,
    #[serde(skip_serializing_if = "Option::is_none")]
    loader: Option<LoaderXml<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nvram: Option<NvramXml<'a>>,
    boot: BootXml,
}

#[derive(Serialize)]
struct OsTypeXml {
    #[serde(rename = "@arch")]
    arch: &'static str,
    #[serde(rename = "@machine")]
    machine: &'static str,
    #[serde(rename = "$text")]
    value: &'static str,
}

#[derive(Serialize)]
struct LoaderXml<'a> {
    #[serde(rename = "@readonly")]
    readonly: &'static str,
    #[serde(rename = "@type")]
    loader_type: &'static str,
    #[serde(rename = "$text")]
    path: &'a str,
}

#[derive(Serialize)]
struct NvramXml<'a> {
    /// libvirt copies the template into a per-domain file on first start, and
    /// removes it again with `VIR_DOMAIN_UNDEFINE_NVRAM`.
    #[serde(rename = "@template")]
    template: &'a str,
}

#[derive(Serialize)]
struct BootXml {
    #[serde(rename = "@dev")]
    dev: &'static str,
}

#[derive(Serialize)]
struct FeaturesXml {
    acpi: (),
    apic: (),
}

#[derive(Serialize)]
struct DevicesXml<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    emulator: Option<&'a str>,
    disk: Vec<DiskXml<'a>>,
    interface: InterfaceXml<'a>,
    serial: SerialXml,
    console: ConsoleXml,
    rng: RngXml,
}

#[derive(Serialize)]
struct DiskXml<'a> {
    #[serde(rename = "@type")]
    disk_type: &'static str,
    #[serde(rename = "@device")]
    device: &'static str,
    driver: DriverXml,
    source: VolumeSourceXml<'a>,
    target: DiskTargetXml,
    #[serde(skip_serializing_if = "Option::is_none")]
    readonly: Option<()>,
}

#[derive(Serialize)]
struct DriverXml {
    #[serde(rename = "@name")]
    name: &'static str,
    #[serde(rename = "@type")]
    format: &'static str,
}

#[derive(Serialize)]
struct VolumeSourceXml<'a> {
    #[serde(rename = "@pool")]
    pool: &'a str,
    #[serde(rename = "@volume")]
    volume: &'a str,
}

#[derive(Serialize)]
struct DiskTargetXml {
    #[serde(rename = "@dev")]
    dev: &'static str,
    #[serde(rename = "@bus")]
    bus: &'static str,
}

#[derive(Serialize)]
struct InterfaceXml<'a> {
    #[serde(rename = "@type")]
    interface_type: &'static str,
    mac: MacXml<'a>,
    source: NetworkSourceXml<'a>,
    model: ModelXml,
}

#[derive(Serialize)]
struct MacXml<'a> {
    #[serde(rename = "@address")]
    address: &'a str,
}

#[derive(Serialize)]
struct NetworkSourceXml<'a> {
    #[serde(rename = "@network")]
    network: &'a str,
}

#[derive(Serialize)]
struct ModelXml {
    #[serde(rename = "@type")]
    model_type: &'static str,
}

#[derive(Serialize)]
struct SerialXml {
    #[serde(rename = "@type")]
    serial_type: &'static str,
    target: SerialTargetXml,
}

#[derive(Serialize)]
struct SerialTargetXml {
    #[serde(rename = "@port")]
    port: u32,
}

#[derive(Serialize)]
struct ConsoleXml {
    #[serde(rename = "@type")]
    console_type: &'static str,
    target: ConsoleTargetXml,
}

#[derive(Serialize)]
struct ConsoleTargetXml {
    #[serde(rename = "@type")]
    target_type: &'static str,
    #[serde(rename = "@port")]
    port: u32,
}

/// A virtio RNG fed from the host: under software emulation a guest otherwise waits
/// for entropy early in boot.
#[derive(Serialize)]
struct RngXml {
    #[serde(rename = "@model")]
    model: &'static str,
    backend: RngBackendXml,
}

#[derive(Serialize)]
struct RngBackendXml {
    #[serde(rename = "@model")]
    model: &'static str,
    #[serde(rename = "$text")]
    path: &'static str,
}

/// The domain XML for one VM: owner metadata, firmware, the overlay as `vda`, the
/// optional identity seed as a read-only virtio disk, one virtio NIC on the cluster
/// network with the given MAC, and a serial console.
pub fn domain_xml(spec: &DomainSpec, host: &DomainHost<'_>) -> Result<String> {
    let text = [
        ("domain name", spec.name.as_str()),
        ("owner uid", &spec.owner.uid),
        ("owner namespace", &spec.owner.namespace),
        ("owner name", &spec.owner.name),
        (
            "host key",
            spec.owner.host_key.as_deref().unwrap_or_default(),
        ),
        ("emulator", host.emulator.unwrap_or_default()),
        ("OVMF code path", host.ovmf_code),
    ];
    let attributes = [
        ("disk volume", spec.disk_volume.as_str()),
        (
            "seed volume",
            spec.seed_volume.as_deref().unwrap_or_default(),
        ),
        ("MAC address", &spec.mac),
        ("network", &spec.network),
        ("domain type", host.domain_type),
        ("node pool", host.node_pool),
        ("OVMF variables template", host.ovmf_vars_template),
    ];
    for (field, value) in text {
        check_text(field, value)?;
    }
    for (field, value) in attributes {
        check_attribute(field, value)?;
    }

    let uefi = spec.firmware == Firmware::Uefi;
    let mut disks = vec![DiskXml {
        disk_type: "volume",
        device: "disk",
        driver: DriverXml {
            name: "qemu",
            format: "qcow2",
        },
        source: VolumeSourceXml {
            pool: host.node_pool,
            volume: &spec.disk_volume,
        },
        target: DiskTargetXml {
            dev: "vda",
            bus: "virtio",
        },
        readonly: None,
    }];
    if let Some(seed) = &spec.seed_volume {
        // A read-only virtio disk holding a FAT file system (docs/image-contract.md).
        disks.push(DiskXml {
            disk_type: "volume",
            device: "disk",
            driver: DriverXml {
                name: "qemu",
                format: "raw",
            },
            source: VolumeSourceXml {
                pool: host.node_pool,
                volume: seed,
            },
            target: DiskTargetXml {
                dev: "vdb",
                bus: "virtio",
            },
            readonly: Some(()),
        });
    }

    let domain = DomainXml {
        domain_type: host.domain_type,
        name: &spec.name,
        metadata: owner::metadata(&spec.owner),
        memory: ScaledXml {
            unit: "KiB",
            value: spec.memory_bytes.div_ceil(1024),
        },
        vcpu: spec.vcpus,
        os: OsXml {
            os_type: OsTypeXml {
                arch: "x86_64",
                // UEFI images (systemd-boot) need q35 with OVMF; BIOS images boot on pc.
                machine: if uefi { "q35" } else { "pc" },
                value: "hvm",
            },
            loader: uefi.then_some(LoaderXml {
                readonly: "yes",
                loader_type: "pflash",
                path: host.ovmf_code,
            }),
            nvram: uefi.then_some(NvramXml {
                template: host.ovmf_vars_template,
            }),
            boot: BootXml { dev: "hd" },
        },
        features: FeaturesXml { acpi: (), apic: () },
        devices: DevicesXml {
            emulator: host
                .emulator
                .filter(|_| host.domain_type != TEST_DOMAIN_TYPE),
            disk: disks,
            interface: InterfaceXml {
                interface_type: "network",
                mac: MacXml { address: &spec.mac },
                source: NetworkSourceXml {
                    network: &spec.network,
                },
                model: ModelXml {
                    model_type: "virtio",
                },
            },
            serial: SerialXml {
                serial_type: "pty",
                target: SerialTargetXml { port: 0 },
            },
            console: ConsoleXml {
                console_type: "pty",
                target: ConsoleTargetXml {
                    target_type: "serial",
                    port: 0,
                },
            },
            rng: RngXml {
                model: "virtio",
                backend: RngBackendXml {
                    model: "random",
                    path: "/dev/urandom",
                },
            },
        },
    };
    to_xml("domain", &domain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::xml::XmlError;
    use crate::hypervisor::xml::fixtures::{
        HOST, TestResult, assert_golden, bios_worker, uefi_control_plane,
    };

    #[test]
    fn bios_worker_domain_matches_golden() -> TestResult {
        let xml = domain_xml(&bios_worker(), &HOST)?;
        assert_golden(
            &xml,
            include_str!("../../../tests/golden/domain-bios-worker.xml"),
            "tests/golden/domain-bios-worker.xml",
        );
        Ok(())
    }

    #[test]
    fn uefi_control_plane_domain_matches_golden() -> TestResult {
        let xml = domain_xml(&uefi_control_plane(), &HOST)?;
        assert_golden(
            &xml,
            include_str!("../../../tests/golden/domain-uefi-control-plane.xml"),
            "tests/golden/domain-uefi-control-plane.xml",
        );
        Ok(())
    }

    #[test]
    fn test_domain_type_omits_emulator() -> TestResult {
        let host = DomainHost {
            domain_type: TEST_DOMAIN_TYPE,
            ..HOST
        };
        let xml = domain_xml(&bios_worker(), &host)?;
        assert!(xml.starts_with("<domain type=\"test\">"), "{xml}");
        assert!(!xml.contains("<emulator>"), "{xml}");
        Ok(())
    }

    #[test]
    fn refuses_characters_xml_cannot_carry() {
        for bad in ["a\rb", "a\u{0}b", "a\u{1b}b", "a\u{FFFE}"] {
            let mut spec = bios_worker();
            spec.owner.name = bad.to_owned();
            assert!(matches!(
                domain_xml(&spec, &HOST),
                Err(XmlError::UnrepresentableCharacter {
                    field: "owner name"
                })
            ));
        }
        // Attribute values also lose tabs and line feeds to normalization.
        let mut spec = bios_worker();
        spec.network = "bench\nnet".to_owned();
        assert!(matches!(
            domain_xml(&spec, &HOST),
            Err(XmlError::UnrepresentableCharacter { field: "network" })
        ));
        spec.owner.name = "line\nbreak\tand tab".to_owned();
        spec.network = "benchnet".to_owned();
        assert!(domain_xml(&spec, &HOST).is_ok());
    }
}
