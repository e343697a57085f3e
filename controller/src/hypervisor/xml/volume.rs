//! Storage volumes: writing the XML of a qcow2 overlay and of a raw seed volume, and
//! reading back the format of an existing one (the base image).

use serde::{Deserialize, Serialize};

use super::{Result, ScaledXml, XmlError, check_attribute, check_text, to_xml};

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
    use super::*;
    use crate::hypervisor::xml::fixtures::{TestResult, assert_golden};

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
            include_str!("../../../tests/golden/volume-overlay.xml"),
            "tests/golden/volume-overlay.xml",
        );
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
}
