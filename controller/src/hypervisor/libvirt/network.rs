//! Networks and DHCP leases: whether a network exists, is active and serves DHCP, and
//! the IPv4 leases of a cluster's running domains (with the cache of each domain's
//! interfaces that keeps this to one XML read per domain).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use parking_lot::MutexGuard;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use super::connection::Shared;
use super::domains::lookup_domain;
use super::{is, libvirt};
use crate::hypervisor::xml;
use crate::hypervisor::{Lease, NetworkInfo, Result};

/// A domain's interface on a libvirt network.
pub(super) struct Nic {
    /// Lowercase.
    mac: String,
    network: String,
}

impl Shared {
    pub(super) fn lock_nics(&self) -> MutexGuard<'_, HashMap<String, Arc<[Nic]>>> {
        self.nics.lock()
    }

    /// The network interfaces of a running domain, from the cache or its XML; `None`
    /// when the domain went away meanwhile.
    fn nics_of(&self, domain: &Domain, uuid: &str) -> Result<Option<Arc<[Nic]>>> {
        if let Some(nics) = self.lock_nics().get(uuid) {
            return Ok(Some(Arc::clone(nics)));
        }
        let xml = match domain.xml_desc(0) {
            Ok(xml) => xml,
            Err(e) if is(&e, ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => return Err(libvirt("read domain XML")(e)),
        };
        let nics: Arc<[Nic]> = xml::parse_domain(&xml)?
            .interfaces
            .into_iter()
            .filter_map(|i| {
                Some(Nic {
                    mac: i.mac?.to_ascii_lowercase(),
                    network: i.network?,
                })
            })
            .collect();
        self.lock_nics().insert(uuid.to_owned(), Arc::clone(&nics));
        Ok(Some(nics))
    }
}

pub(super) fn network(conn: &Connect, name: &str) -> Result<Option<NetworkInfo>> {
    let network = match conn.lookup_network_by_name(name) {
        Ok(network) => network,
        Err(e) if is(&e, ErrorNumber::NoNetwork) => return Ok(None),
        Err(e) => return Err(libvirt("look up network")(e)),
    };
    let active = network.is_active().map_err(libvirt("get network state"))?;
    let xml = network.xml_desc(0).map_err(libvirt("read network XML"))?;
    Ok(Some(NetworkInfo {
        active,
        dhcp: xml::network_has_ipv4_dhcp(&xml)?,
    }))
}

/// IPv4 leases of the running domains' interfaces on `network`.
///
/// virt 0.5 wraps neither `virNetworkGetDHCPLeases` nor its lease type, and this
/// workspace forbids `unsafe`, so the leases come from
/// `virDomainInterfaceAddresses(VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)`, which
/// libvirt answers from the same network lease database, per domain and per MAC.
/// That API carries no expiry: `expiry_unix` is 0.
pub(super) fn leases(
    conn: &Connect,
    shared: &Shared,
    network: &str,
    names: &[String],
) -> Result<Vec<Lease>> {
    conn.lookup_network_by_name(network)
        .map_err(libvirt("look up network"))?;
    let mut leases = Vec::new();
    for name in names {
        let Some(domain) = lookup_domain(conn, name)? else {
            continue;
        };
        if !domain.is_active().map_err(libvirt("get domain state"))? {
            continue;
        }
        let uuid = domain.uuid_string().map_err(libvirt("get domain UUID"))?;
        let Some(nics) = shared.nics_of(&domain, &uuid)? else {
            continue;
        };
        let macs: Vec<&str> = nics
            .iter()
            .filter(|nic| nic.network == network)
            .map(|nic| nic.mac.as_str())
            .collect();
        if macs.is_empty() {
            continue;
        }
        // On qemu, libvirt answers this from the network's own dnsmasq leases,
        // dropping expired ones; the MAC match below keeps another VM's stale
        // lease on a reused address out.
        let interfaces = match domain
            .interface_addresses(virt::sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
        {
            Ok(interfaces) => interfaces,
            // Stopped or undefined since the lookup.
            Err(e) if is(&e, ErrorNumber::NoDomain) || is(&e, ErrorNumber::OperationInvalid) => {
                continue;
            }
            Err(e) => return Err(libvirt("get domain interface leases")(e)),
        };
        for interface in interfaces {
            let Some(mac) = interface.hwaddr.map(|m| m.to_ascii_lowercase()) else {
                continue;
            };
            if !macs.contains(&mac.as_str()) {
                continue;
            }
            for address in interface.addrs {
                if address.typed != i64::from(virt::sys::VIR_IP_ADDR_TYPE_IPV4) {
                    continue;
                }
                if let Ok(ip) = address.addr.parse::<Ipv4Addr>() {
                    leases.push(Lease {
                        mac: mac.clone(),
                        ip,
                        expiry_unix: 0,
                    });
                }
            }
        }
    }
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::libvirt::test_support::{TestResult, hypervisor, spec};
    use crate::hypervisor::{Hypervisor, HypervisorError};

    #[tokio::test]
    async fn network_reports_dhcp_and_absence() -> TestResult {
        let hv = hypervisor();
        assert_eq!(
            hv.network("default").await?,
            Some(NetworkInfo {
                active: true,
                dhcp: true
            })
        );
        assert_eq!(hv.network("lvt-no-such-network").await?, None);
        Ok(())
    }

    /// The test driver answers interface-address queries itself (made-up addresses in
    /// the network's range): what is tested here is the mapping, not a DHCP server.
    #[tokio::test]
    async fn leases_cover_running_domains_on_the_network() -> TestResult {
        let hv = hypervisor();
        let mut spec = spec("leases", "uid-leases");
        spec.mac = "52:54:00:AB:00:02".to_owned();
        hv.define_domain(&spec).await?;
        let only = [spec.name.clone()];
        let before = hv.leases("default", &only).await?;
        assert!(before.is_empty(), "a defined, stopped domain has no lease");

        hv.start_domain(&spec.name).await?;
        let leases = hv.leases("default", &only).await?;
        assert_eq!(leases.len(), 1, "only the named domain's lease: {leases:?}");
        let absent = hv
            .leases("default", &["lvt-no-such-domain".to_owned()])
            .await?;
        assert!(absent.is_empty());
        hv.remove_domain(&spec.name).await?;
        let lease = leases
            .iter()
            .find(|l| l.mac == "52:54:00:ab:00:02")
            .ok_or("no lease for the running domain")?;
        assert!(!lease.ip.is_unspecified());

        assert!(matches!(
            hv.leases("lvt-no-such-network", &only).await,
            Err(HypervisorError::Libvirt { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn leases_keep_to_their_network() -> TestResult {
        let hv = hypervisor();
        hv.run(|conn, _| {
            if conn.lookup_network_by_name("lvt-othernet").is_err() {
                let xml = "<network><name>lvt-othernet</name><bridge name='lvtbr0'/>\
                           <ip address='10.254.0.1' netmask='255.255.255.0'>\
                           <dhcp><range start='10.254.0.2' end='10.254.0.254'/></dhcp></ip></network>";
                conn.create_network_xml(xml).map_err(libvirt("create network"))?;
            }
            Ok(())
        })
        .await?;
        let mut spec = spec("othernet", "uid-othernet");
        spec.mac = "52:54:00:ab:00:03".to_owned();
        spec.network = "lvt-othernet".to_owned();
        hv.define_domain(&spec).await?;
        hv.start_domain(&spec.name).await?;
        let only = [spec.name.clone()];
        let on_default = hv.leases("default", &only).await?;
        let on_other = hv.leases("lvt-othernet", &only).await?;
        hv.remove_domain(&spec.name).await?;
        assert!(!on_default.iter().any(|l| l.mac == spec.mac));
        assert!(on_other.iter().any(|l| l.mac == spec.mac));
        Ok(())
    }
}
