//! Reading a domain back: the facts the controller checks in a domain's XML
//! (`virDomainGetXMLDesc`), whether or not the domain is running: name, owner, vCPUs,
//! memory, firmware, interfaces and volume-backed disks.

use serde::Deserialize;

use super::{Result, XmlError, owner::parse_owner};
use crate::hypervisor::Owner;

/// What the controller reads back from a domain's XML (`virDomainGetXMLDesc`),
/// independent of whether the domain is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainReadback {
    pub name: String,
    /// The owner element, if the domain carries one.
    pub owner: Option<Owner>,
    pub vcpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Whether the domain boots UEFI firmware from pflash.
    pub uefi: bool,
    pub interfaces: Vec<InterfaceReadback>,
    /// Disks backed by storage volumes.
    pub disks: Vec<DiskReadback>,
}

impl DomainReadback {
    /// MAC of the first interface on `network`, lowercase.
    pub fn mac_on(&self, network: &str) -> Option<String> {
        self.interfaces
            .iter()
            .filter(|i| i.network.as_deref() == Some(network))
            .find_map(|i| i.mac.as_deref())
            .map(str::to_ascii_lowercase)
    }

    /// MAC of the first interface on a libvirt network (else of the first interface),
    /// lowercase: the cluster interface of the domains we define, which have one.
    pub fn primary_mac(&self) -> Option<String> {
        self.interfaces
            .iter()
            .filter(|i| i.network.is_some())
            .chain(&self.interfaces)
            .find_map(|i| i.mac.as_deref())
            .map(str::to_ascii_lowercase)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceReadback {
    pub mac: Option<String>,
    /// The libvirt network, for interfaces of type `network`.
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskReadback {
    /// `disk` or `cdrom`.
    pub device: String,
    pub pool: String,
    pub volume: String,
}

#[derive(Deserialize)]
struct DomainDe {
    name: String,
    vcpu: Option<TextDe<u32>>,
    memory: Option<ScaledDe>,
    os: Option<OsDe>,
    devices: Option<DevicesDe>,
}

#[derive(Deserialize)]
struct TextDe<T> {
    #[serde(rename = "$text")]
    value: T,
}

#[derive(Deserialize)]
struct ScaledDe {
    #[serde(rename = "@unit")]
    unit: Option<String>,
    #[serde(rename = "$text")]
    value: u64,
}

impl ScaledDe {
    /// Bytes, for the units libvirt writes and the common ones it accepts.
    fn bytes(&self) -> Option<u64> {
        let factor: u64 = match self.unit.as_deref().unwrap_or("KiB") {
            "b" | "bytes" => 1,
            "KiB" | "k" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        self.value.checked_mul(factor)
    }
}

#[derive(Deserialize)]
struct OsDe {
    loader: Option<LoaderDe>,
}

#[derive(Deserialize)]
struct LoaderDe {
    #[serde(rename = "@type")]
    loader_type: Option<String>,
}

#[derive(Deserialize)]
struct DevicesDe {
    #[serde(rename = "disk", default)]
    disks: Vec<DiskDe>,
    #[serde(rename = "interface", default)]
    interfaces: Vec<InterfaceDe>,
}

#[derive(Deserialize)]
struct DiskDe {
    #[serde(rename = "@type")]
    disk_type: Option<String>,
    #[serde(rename = "@device")]
    device: Option<String>,
    source: Option<DiskSourceDe>,
}

#[derive(Deserialize)]
struct DiskSourceDe {
    #[serde(rename = "@pool")]
    pool: Option<String>,
    #[serde(rename = "@volume")]
    volume: Option<String>,
}

#[derive(Deserialize)]
struct InterfaceDe {
    #[serde(rename = "@type")]
    interface_type: Option<String>,
    mac: Option<MacDe>,
    source: Option<InterfaceSourceDe>,
}

#[derive(Deserialize)]
struct MacDe {
    #[serde(rename = "@address")]
    address: String,
}

#[derive(Deserialize)]
struct InterfaceSourceDe {
    #[serde(rename = "@network")]
    network: Option<String>,
}

/// Reads back a domain's XML: owner metadata and the facts the controller checks.
pub fn parse_domain(xml: &str) -> Result<DomainReadback> {
    let owner = parse_owner(xml)?;
    let de: DomainDe = quick_xml::de::from_str(xml).map_err(|source| XmlError::Deserialize {
        what: "domain",
        source,
    })?;
    let devices = de.devices.unwrap_or(DevicesDe {
        disks: Vec::new(),
        interfaces: Vec::new(),
    });
    Ok(DomainReadback {
        name: de.name,
        owner,
        vcpus: de.vcpu.map(|v| v.value),
        memory_bytes: de.memory.and_then(|m| m.bytes()),
        uefi: de
            .os
            .and_then(|os| os.loader)
            .is_some_and(|l| l.loader_type.as_deref() == Some("pflash")),
        interfaces: devices
            .interfaces
            .into_iter()
            .map(|i| InterfaceReadback {
                mac: i.mac.map(|m| m.address),
                network: i
                    .source
                    .and_then(|s| s.network)
                    .filter(|_| i.interface_type.as_deref() == Some("network")),
            })
            .collect(),
        disks: devices
            .disks
            .into_iter()
            .filter(|d| d.disk_type.as_deref() == Some("volume"))
            .filter_map(|d| {
                let source = d.source?;
                Some(DiskReadback {
                    device: d.device.unwrap_or_else(|| "disk".to_owned()),
                    pool: source.pool?,
                    volume: source.volume?,
                })
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use benchcluster_crd::Firmware;
    use proptest::prelude::*;
    use quick_xml::events::Event;

    use super::*;
    use crate::hypervisor::xml::fixtures::{HOST, TestResult, bios_worker, uefi_control_plane};
    use crate::hypervisor::xml::{check_text, domain_xml};

    #[test]
    fn written_domain_reads_back() -> TestResult {
        for spec in [bios_worker(), uefi_control_plane()] {
            let readback = parse_domain(&domain_xml(&spec, &HOST)?)?;
            assert_eq!(readback.name, spec.name);
            assert_eq!(readback.owner.as_ref(), Some(&spec.owner));
            assert_eq!(readback.vcpus, Some(spec.vcpus));
            assert_eq!(readback.memory_bytes, Some(spec.memory_bytes));
            assert_eq!(readback.uefi, spec.firmware == Firmware::Uefi);
            assert_eq!(readback.mac_on(&spec.network), Some(spec.mac.clone()));
            assert_eq!(readback.disks[0].volume, spec.disk_volume);
            assert_eq!(
                readback.disks.get(1).map(|d| d.volume.clone()),
                spec.seed_volume
            );
        }
        Ok(())
    }

    /// Shaped like `virsh dumpxml` output of a domain libvirt has reformatted, with
    /// another application's metadata beside ours and our namespace under another prefix.
    const LIBVIRT_DUMP: &str = r#"<domain type='kvm' id='3'>
  <name>bench-small-w-1</name>
  <uuid>33a33c5c-13e2-4de4-a4f8-7c13628fa74e</uuid>
  <metadata>
    <other:owner xmlns:other="https://example.com/other">
      <other:uid>not-ours</other:uid>
    </other:owner>
    <x:owner xmlns:x="https://benchcluster.dev/xmlns/owner/v1">
      <x:uid>u-1</x:uid>
      <x:namespace>ns</x:namespace>
      <x:name>a&amp;b &#60;c&#x3E; <![CDATA[<d>]]></x:name>
      <x:role>worker</x:role>
      <x:index>7</x:index>
      <x:future>ignored</x:future>
    </x:owner>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='benchcluster-nodes' volume='bench-small-w-1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' index='0'/>
    <interface type='network'>
      <mac address='52:54:00:AB:CD:EF'/>
      <source network='benchnet' bridge='virbr1'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
  </devices>
</domain>
"#;

    #[test]
    fn reads_owner_by_namespace_not_prefix() -> TestResult {
        let readback = parse_domain(LIBVIRT_DUMP)?;
        assert_eq!(
            readback.owner,
            Some(Owner {
                uid: "u-1".to_owned(),
                namespace: "ns".to_owned(),
                name: "a&b <c> <d>".to_owned(),
                node: crate::names::NodeId::worker(7),
                host_key: None,
            })
        );
        assert_eq!(readback.primary_mac().as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(readback.memory_bytes, Some(2 << 30));
        assert!(!readback.uefi);
        Ok(())
    }

    /// Strings XML can carry unchanged, weighted towards markup, quotes and line breaks.
    fn awkward_string() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                3 => prop::sample::select(vec!['<', '>', '&', '"', '\'', '\n', '\t', ' ', ';', '#', ']']),
                2 => prop::char::range('a', 'z'),
                1 => any::<char>().prop_filter("XML-representable", |c| {
                    check_text("probe", &c.to_string()).is_ok()
                }),
            ],
            0..24,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    /// As [`awkward_string`], without the tabs and line feeds attributes cannot keep.
    fn awkward_attribute() -> impl Strategy<Value = String> {
        awkward_string().prop_map(|s| s.replace(['\n', '\t'], "_"))
    }

    proptest! {
        #[test]
        fn owner_round_trips_whatever_its_characters(
            uid in awkward_string(),
            namespace in awkward_string(),
            name in awkward_string(),
            worker in any::<bool>(),
            index in any::<u32>(),
            volume in awkward_attribute(),
            network in awkward_attribute(),
        ) {
            let mut spec = bios_worker();
            spec.disk_volume = volume;
            spec.network = network;
            spec.owner = Owner {
                uid,
                namespace,
                name,
                node: if worker { crate::names::NodeId::worker(index) } else { crate::names::NodeId::CONTROL_PLANE },
                host_key: None,
            };
            let xml = domain_xml(&spec, &HOST).map_err(|e| TestCaseError::fail(e.to_string()))?;

            // Well-formed from start to end...
            let mut reader = quick_xml::Reader::from_str(&xml);
            loop {
                match reader.read_event() {
                    Ok(Event::Eof) => break,
                    Ok(_) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("{e}: {xml}"))),
                }
            }
            // ...with the structure intact and the owner unchanged.
            let readback = parse_domain(&xml).map_err(|e| TestCaseError::fail(format!("{e}: {xml}")))?;
            prop_assert_eq!(readback.mac_on(&spec.network), Some(spec.mac));
            prop_assert_eq!(&readback.disks[0].volume, &spec.disk_volume);
            prop_assert_eq!(readback.owner, Some(spec.owner));
            prop_assert_eq!(readback.name, spec.name);
        }
    }
}
