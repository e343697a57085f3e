//! Reading a libvirt network's XML: whether it serves DHCP on IPv4.

use serde::Deserialize;

use super::{Result, XmlError};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::xml::fixtures::TestResult;

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
}
