//! The part of libvirt's XML formats that the controller writes and reads back.
//!
//! Everything written goes through quick-xml's serde serializer, which escapes every
//! value; no XML is assembled with `format!`. Owner metadata is read back with a
//! namespace-aware reader, so only the element in [`OWNER_NAMESPACE`] counts, and its
//! text is taken verbatim (no trimming), so what was written is what is read.

use std::borrow::Cow;

use benchcluster_crd::{Firmware, Role};
use quick_xml::NsReader;
use quick_xml::events::Event;
use quick_xml::name::{Namespace, ResolveResult};
use serde::{Deserialize, Serialize};

use super::{DomainSpec, Owner};

/// XML namespace of the owner element in a domain's `<metadata>`.
pub const OWNER_NAMESPACE: &str = "https://benchcluster.dev/xmlns/owner/v1";
/// Prefix bound to [`OWNER_NAMESPACE`] in the XML we write. Readers resolve the
/// namespace, so the prefix carries no meaning of its own.
pub const OWNER_PREFIX: &str = "bc";

/// Failures to write or read libvirt XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("cannot write {what} XML")]
    Serialize {
        what: &'static str,
        #[source]
        source: quick_xml::SeError,
    },
    #[error("cannot parse {what} XML")]
    Deserialize {
        what: &'static str,
        #[source]
        source: quick_xml::DeError,
    },
    #[error("malformed {what} XML")]
    Malformed {
        what: &'static str,
        #[source]
        source: quick_xml::Error,
    },
    /// XML 1.0 cannot carry control characters, and a carriage return would come back
    /// as a line feed: refuse both rather than write something that reads back differently.
    #[error(
        "{field} contains a character XML cannot carry unchanged (control character or carriage return)"
    )]
    UnrepresentableCharacter { field: &'static str },
    #[error("owner metadata is invalid: {reason}")]
    InvalidOwner { reason: Cow<'static, str> },
}

type Result<T, E = XmlError> = std::result::Result<T, E>;

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

// ---------------------------------------------------------------------------------------
// Writing: domain
// ---------------------------------------------------------------------------------------

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
struct MetadataXml<'a> {
    #[serde(rename = "bc:owner")]
    owner: OwnerXml<'a>,
}

#[derive(Serialize)]
struct OwnerXml<'a> {
    #[serde(rename = "@xmlns:bc")]
    xmlns: &'static str,
    #[serde(rename = "bc:uid")]
    uid: &'a str,
    #[serde(rename = "bc:namespace")]
    namespace: &'a str,
    #[serde(rename = "bc:name")]
    name: &'a str,
    #[serde(rename = "bc:role")]
    role: &'static str,
    #[serde(rename = "bc:index")]
    index: u32,
    #[serde(rename = "bc:hostKey", skip_serializing_if = "Option::is_none")]
    host_key: Option<&'a str>,
}

#[derive(Serialize)]
struct ScaledXml {
    #[serde(rename = "@unit")]
    unit: &'static str,
    #[serde(rename = "$text")]
    value: u64,
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

/// The role as written in owner metadata: the CRD's own spelling.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::ControlPlane => "controlPlane",
        Role::Worker => "worker",
    }
}

fn parse_role(value: &str) -> Option<Role> {
    match value {
        "controlPlane" => Some(Role::ControlPlane),
        "worker" => Some(Role::Worker),
        _ => None,
    }
}

/// Rejects characters that XML 1.0 cannot carry or that a parser would change
/// (carriage returns become line feeds), so every accepted value reads back as written.
fn check_text(field: &'static str, value: &str) -> Result<()> {
    let representable = value.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
            || c >= '\u{10000}'
    });
    if representable {
        Ok(())
    } else {
        Err(XmlError::UnrepresentableCharacter { field })
    }
}

/// As [`check_text`], for attribute values, where parsers also turn tabs and line
/// feeds into spaces.
fn check_attribute(field: &'static str, value: &str) -> Result<()> {
    if value.contains(['\t', '\n']) {
        return Err(XmlError::UnrepresentableCharacter { field });
    }
    check_text(field, value)
}

fn to_xml<T: Serialize>(what: &'static str, value: &T) -> Result<String> {
    let mut out = String::new();
    let mut serializer = quick_xml::se::Serializer::new(&mut out);
    serializer.indent(' ', 2);
    value
        .serialize(serializer)
        .map_err(|source| XmlError::Serialize { what, source })?;
    out.push('\n');
    Ok(out)
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
        metadata: MetadataXml {
            owner: OwnerXml {
                xmlns: OWNER_NAMESPACE,
                uid: &spec.owner.uid,
                namespace: &spec.owner.namespace,
                name: &spec.owner.name,
                role: role_name(spec.owner.role),
                index: spec.owner.index,
                host_key: spec.owner.host_key.as_deref(),
            },
        },
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

// ---------------------------------------------------------------------------------------
// Writing: storage volume
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename = "volume")]
struct VolumeXml<'a> {
    name: &'a str,
    capacity: ScaledXml,
    /// Nothing is preallocated: an overlay starts empty and grows as the guest writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    allocation: Option<ScaledXml>,
    target: VolumeTargetXml<'a>,
    #[serde(rename = "backingStore", skip_serializing_if = "Option::is_none")]
    backing_store: Option<BackingStoreXml<'a>>,
}

#[derive(Serialize)]
struct VolumeTargetXml<'a> {
    format: FormatXml<'a>,
}

#[derive(Serialize)]
struct BackingStoreXml<'a> {
    path: &'a str,
    format: FormatXml<'a>,
}

#[derive(Serialize)]
struct FormatXml<'a> {
    #[serde(rename = "@type")]
    format: &'a str,
}

/// The storage volume XML of a qcow2 overlay on `backing_path`, whose format is
/// `backing_format` (stated, so nothing probes the base image).
pub fn overlay_volume_xml(
    name: &str,
    capacity_bytes: u64,
    backing_path: &str,
    backing_format: &str,
) -> Result<String> {
    check_text("volume name", name)?;
    check_text("backing path", backing_path)?;
    check_attribute("backing format", backing_format)?;
    to_xml(
        "volume",
        &VolumeXml {
            name,
            capacity: ScaledXml {
                unit: "bytes",
                value: capacity_bytes,
            },
            allocation: Some(ScaledXml {
                unit: "bytes",
                value: 0,
            }),
            target: VolumeTargetXml {
                format: FormatXml { format: "qcow2" },
            },
            backing_store: Some(BackingStoreXml {
                path: backing_path,
                format: FormatXml {
                    format: backing_format,
                },
            }),
        },
    )
}

/// Storage volume XML for a raw volume of exactly `capacity_bytes` (the identity seed).
pub fn raw_volume_xml(name: &str, capacity_bytes: u64) -> Result<String> {
    check_text("volume name", name)?;
    to_xml(
        "volume",
        &VolumeXml {
            name,
            capacity: ScaledXml {
                unit: "bytes",
                value: capacity_bytes,
            },
            allocation: None,
            target: VolumeTargetXml {
                format: FormatXml { format: "raw" },
            },
            backing_store: None,
        },
    )
}

// ---------------------------------------------------------------------------------------
// Reading: owner metadata
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum OwnerField {
    Uid,
    Namespace,
    Name,
    Role,
    Index,
    HostKey,
}

impl OwnerField {
    fn from_local_name(name: &str) -> Option<Self> {
        match name {
            "uid" => Some(Self::Uid),
            "namespace" => Some(Self::Namespace),
            "name" => Some(Self::Name),
            "role" => Some(Self::Role),
            "index" => Some(Self::Index),
            "hostKey" => Some(Self::HostKey),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Frame {
    Domain,
    Metadata,
    Owner,
    Field(OwnerField),
    Other,
}

#[derive(Default)]
struct OwnerFields {
    uid: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    role: Option<String>,
    index: Option<String>,
    host_key: Option<String>,
}

impl OwnerFields {
    fn set(&mut self, field: OwnerField, value: String) {
        let slot = match field {
            OwnerField::Uid => &mut self.uid,
            OwnerField::Namespace => &mut self.namespace,
            OwnerField::Name => &mut self.name,
            OwnerField::Role => &mut self.role,
            OwnerField::Index => &mut self.index,
            OwnerField::HostKey => &mut self.host_key,
        };
        slot.get_or_insert(value);
    }

    fn into_owner(self) -> Result<Owner> {
        fn missing(field: &'static str) -> XmlError {
            XmlError::InvalidOwner {
                reason: Cow::Owned(format!("missing {field}")),
            }
        }
        let role = self.role.ok_or_else(|| missing("role"))?;
        let index = self.index.ok_or_else(|| missing("index"))?;
        Ok(Owner {
            uid: self.uid.ok_or_else(|| missing("uid"))?,
            namespace: self.namespace.ok_or_else(|| missing("namespace"))?,
            name: self.name.ok_or_else(|| missing("name"))?,
            role: parse_role(&role).ok_or_else(|| XmlError::InvalidOwner {
                reason: Cow::Owned(format!("unknown role {role:?}")),
            })?,
            index: index.parse().map_err(|_| XmlError::InvalidOwner {
                reason: Cow::Owned(format!("index {index:?} is not a number")),
            })?,
            host_key: self.host_key,
        })
    }
}

/// The owner recorded in a domain's XML (`/domain/metadata/owner` in
/// [`OWNER_NAMESPACE`]), or `None` when the domain carries no such element.
pub fn parse_owner(xml: &str) -> Result<Option<Owner>> {
    let malformed = |source: quick_xml::Error| XmlError::Malformed {
        what: "domain",
        source,
    };
    let mut reader = NsReader::from_str(xml);
    let mut path: Vec<Frame> = Vec::new();
    let mut fields = OwnerFields::default();
    let mut text = String::new();
    let mut found = false;

    loop {
        let (ns, event) = reader.read_resolved_event().map_err(malformed)?;
        let ours = matches!(ns, ResolveResult::Bound(Namespace(uri)) if uri == OWNER_NAMESPACE);
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                let local = start.local_name();
                let frame = match (path.last(), local.as_ref()) {
                    (None, "domain") if !ours => Frame::Domain,
                    (Some(Frame::Domain), "metadata") if !ours => Frame::Metadata,
                    // libvirt keeps one metadata element per namespace; take the first.
                    (Some(Frame::Metadata), "owner") if ours && !found => {
                        found = true;
                        Frame::Owner
                    }
                    (Some(Frame::Owner), name) if ours => {
                        text.clear();
                        OwnerField::from_local_name(name).map_or(Frame::Other, Frame::Field)
                    }
                    (Some(Frame::Field(_)), _) => {
                        return Err(XmlError::InvalidOwner {
                            reason: Cow::Borrowed("an owner field contains an element"),
                        });
                    }
                    _ => Frame::Other,
                };
                if matches!(event, Event::Empty(_)) {
                    match frame {
                        Frame::Field(field) => fields.set(field, String::new()),
                        Frame::Owner => return fields.into_owner().map(Some),
                        _ => {}
                    }
                } else {
                    path.push(frame);
                }
            }
            Event::End(_) => match path.pop() {
                Some(Frame::Field(field)) => fields.set(field, std::mem::take(&mut text)),
                Some(Frame::Owner) => return fields.into_owner().map(Some),
                _ => {}
            },
            Event::Text(ref content) if matches!(path.last(), Some(Frame::Field(_))) => {
                text.push_str(&content.xml10_content());
            }
            Event::CData(ref content) if matches!(path.last(), Some(Frame::Field(_))) => {
                text.push_str(&content.xml10_content());
            }
            Event::GeneralRef(ref reference) if matches!(path.last(), Some(Frame::Field(_))) => {
                if let Some(c) = reference.resolve_char_ref().map_err(malformed)? {
                    text.push(c);
                } else if let Some(s) =
                    quick_xml::escape::resolve_predefined_entity(&reference.xml10_content())
                {
                    text.push_str(s);
                } else {
                    return Err(XmlError::InvalidOwner {
                        reason: Cow::Borrowed("an owner field uses an undefined entity"),
                    });
                }
            }
            Event::Eof => return Ok(None),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading: domain, network, volume facts
// ---------------------------------------------------------------------------------------

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

#[derive(Deserialize)]
struct NetworkDe {
    #[serde(rename = "ip", default)]
    ips: Vec<NetworkIpDe>,
}

#[derive(Deserialize)]
struct NetworkIpDe {
    #[serde(rename = "@family")]
    family: Option<String>,
    dhcp: Option<serde::de::IgnoredAny>,
}

/// Whether a network's XML serves DHCP on IPv4 (an `<ip>` of family ipv4, the
/// default, with a `<dhcp>` element). Without it VMs get no address.
pub fn network_has_ipv4_dhcp(xml: &str) -> Result<bool> {
    let de: NetworkDe = quick_xml::de::from_str(xml).map_err(|source| XmlError::Deserialize {
        what: "network",
        source,
    })?;
    Ok(de
        .ips
        .iter()
        .any(|ip| ip.dhcp.is_some() && ip.family.as_deref().is_none_or(|f| f == "ipv4")))
}

#[derive(Deserialize)]
struct VolumeDe {
    target: Option<VolumeTargetDe>,
}

#[derive(Deserialize)]
struct VolumeTargetDe {
    format: Option<FormatDe>,
}

#[derive(Deserialize)]
struct FormatDe {
    #[serde(rename = "@type")]
    format: Option<String>,
}

/// The format (`qcow2`, `raw`, ...) libvirt reports for a storage volume, if any.
pub fn volume_format(xml: &str) -> Result<Option<String>> {
    let de: VolumeDe = quick_xml::de::from_str(xml).map_err(|source| XmlError::Deserialize {
        what: "volume",
        source,
    })?;
    Ok(de
        .target
        .and_then(|t| t.format)
        .and_then(|f| f.format)
        .filter(|f| !f.is_empty()))
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use proptest::prelude::*;

    use super::*;

    type TestResult = std::result::Result<(), Box<dyn Error>>;

    const HOST: DomainHost<'static> = DomainHost {
        domain_type: "qemu",
        emulator: Some("/usr/bin/qemu-system-x86_64"),
        node_pool: "benchcluster-nodes",
        ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd",
        ovmf_vars_template: "/usr/share/OVMF/OVMF_VARS_4M.fd",
    };

    fn owner(role: Role, index: u32) -> Owner {
        Owner {
            uid: "6f1c2b9e-3d4a-4e5f-8a7b-9c0d1e2f3a4b".to_owned(),
            namespace: "bench".to_owned(),
            name: "small".to_owned(),
            role,
            index,
            host_key: Some(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinnedHostKeyForGoldenTests".to_owned(),
            ),
        }
    }

    fn bios_worker() -> DomainSpec {
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

    fn uefi_control_plane() -> DomainSpec {
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
    fn assert_golden(actual: &str, golden: &str, path: &str) {
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

    #[test]
    fn bios_worker_domain_matches_golden() -> TestResult {
        let xml = domain_xml(&bios_worker(), &HOST)?;
        assert_golden(
            &xml,
            include_str!("../../tests/golden/domain-bios-worker.xml"),
            "tests/golden/domain-bios-worker.xml",
        );
        Ok(())
    }

    #[test]
    fn uefi_control_plane_domain_matches_golden() -> TestResult {
        let xml = domain_xml(&uefi_control_plane(), &HOST)?;
        assert_golden(
            &xml,
            include_str!("../../tests/golden/domain-uefi-control-plane.xml"),
            "tests/golden/domain-uefi-control-plane.xml",
        );
        Ok(())
    }

    #[test]
    fn overlay_volume_matches_golden() -> TestResult {
        let xml = overlay_volume_xml(
            "bench-small-w-1.qcow2",
            20 << 30,
            "/var/lib/benchcluster/images/worker.qcow2",
            "qcow2",
        )?;
        assert_golden(
            &xml,
            include_str!("../../tests/golden/volume-overlay.xml"),
            "tests/golden/volume-overlay.xml",
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
                role: Role::Worker,
                index: 7,
                host_key: None,
            })
        );
        assert_eq!(readback.primary_mac().as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(readback.memory_bytes, Some(2 << 30));
        assert!(!readback.uefi);
        Ok(())
    }

    #[test]
    fn domain_without_owner_reads_none() -> TestResult {
        let xml = "<domain type='test'><name>foreign</name><metadata>\
                   <bc:owner xmlns:bc='https://example.com/not-ours'><bc:uid>x</bc:uid></bc:owner>\
                   </metadata></domain>";
        assert_eq!(parse_owner(xml)?, None);
        assert_eq!(parse_owner("<domain><name>plain</name></domain>")?, None);
        Ok(())
    }

    #[test]
    fn invalid_owner_is_an_error() {
        let xml = "<domain><metadata><bc:owner xmlns:bc='https://benchcluster.dev/xmlns/owner/v1'>\
                   <bc:uid>u</bc:uid><bc:namespace>n</bc:namespace><bc:name>m</bc:name>\
                   <bc:role>boss</bc:role><bc:index>0</bc:index></bc:owner></metadata></domain>";
        assert!(matches!(
            parse_owner(xml),
            Err(XmlError::InvalidOwner { .. })
        ));
        let missing = "<domain><metadata><bc:owner xmlns:bc='https://benchcluster.dev/xmlns/owner/v1'/>\
                       </metadata></domain>";
        assert!(matches!(
            parse_owner(missing),
            Err(XmlError::InvalidOwner { .. })
        ));
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

    #[test]
    fn network_dhcp_detection() -> TestResult {
        let with = "<network><name>n</name><ip address='192.168.122.1' netmask='255.255.255.0'>\
                    <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>";
        let without = "<network><name>n</name><ip address='192.168.122.1' netmask='255.255.255.0'/></network>";
        let v6_only = "<network><name>n</name><ip address='192.168.122.1' prefix='24'/>\
                       <ip family='ipv6' address='fd00::1' prefix='64'><dhcp/></ip></network>";
        let no_ip = "<network><name>n</name><bridge name='br0'/></network>";
        assert!(network_has_ipv4_dhcp(with)?);
        assert!(!network_has_ipv4_dhcp(without)?);
        assert!(!network_has_ipv4_dhcp(v6_only)?);
        assert!(!network_has_ipv4_dhcp(no_ip)?);
        Ok(())
    }

    #[test]
    fn volume_format_readback() -> TestResult {
        let xml = "<volume type='file'><name>base</name><capacity unit='bytes'>1</capacity>\
                   <target><path>/p/base</path><format type='raw'/></target></volume>";
        assert_eq!(volume_format(xml)?.as_deref(), Some("raw"));
        assert_eq!(volume_format("<volume><name>v</name></volume>")?, None);
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
                role: if worker { Role::Worker } else { Role::ControlPlane },
                index,
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
