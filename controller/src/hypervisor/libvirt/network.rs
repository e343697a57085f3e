//! Networks: whether a network exists, is active and serves DHCP. Their leases are
//! read with the inventory.

use virt::connect::Connect;
use virt::error::ErrorNumber;

use super::{is, libvirt};
use crate::hypervisor::xml;
use crate::hypervisor::{NetworkInfo, Result};

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
