//! The part of libvirt's XML formats that the controller writes and reads back, one
//! file per concern: `domain` writes a domain definition, `owner` writes and reads the
//! owner metadata inside it, `readback` reads a domain's XML back, `volume` writes
//! storage volumes and reads their format, `network` reads whether a network serves DHCP.
//!
//! Everything written goes through quick-xml's serde serializer, which escapes every
//! value; no XML is assembled with `format!`. This module holds what they share: the
//! error type, the check that a value reads back as written, and the serializer set-up.

use std::borrow::Cow;

use serde::Serialize;

mod domain;
mod network;
mod owner;
mod readback;
mod volume;

#[cfg(test)]
mod fixtures;

pub use domain::{DomainHost, TEST_DOMAIN_TYPE, domain_xml};
pub use network::network_has_ipv4_dhcp;
pub use owner::{OWNER_NAMESPACE, OWNER_PREFIX, parse_owner, role_name};
pub use readback::{DiskReadback, DomainReadback, InterfaceReadback, parse_domain};
pub use volume::{overlay_volume_xml, raw_volume_xml, volume_format};

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

/// A number with its unit attribute (`<memory unit='KiB'>`, `<capacity unit='bytes'>`).
#[derive(Serialize)]
struct ScaledXml {
    #[serde(rename = "@unit")]
    unit: &'static str,
    #[serde(rename = "$text")]
    value: u64,
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
