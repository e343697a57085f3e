//! Storage volumes: the node pool's volumes, the qcow2 overlay on a role's base
//! image, the raw identity seed (uploaded through libvirt's stream), and deletion.

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::{LibvirtConfig, is, libvirt};
use crate::hypervisor::xml;
use crate::hypervisor::{HypervisorError, OverlaySpec, Result};

pub(super) fn lookup_pool(conn: &Connect, pool: &str) -> Result<StoragePool> {
    conn.lookup_storage_pool_by_name(pool).map_err(|e| {
        if is(&e, ErrorNumber::NoStoragePool) {
            HypervisorError::PoolMissing {
                pool: pool.to_owned(),
            }
        } else {
            libvirt("look up storage pool")(e)
        }
    })
}

pub(super) fn lookup_volume(pool: &StoragePool, name: &str) -> Result<Option<StorageVol>> {
    match pool.lookup_storage_vol_by_name(name) {
        Ok(volume) => Ok(Some(volume)),
        Err(e) if is(&e, ErrorNumber::NoStorageVolume) => Ok(None),
        Err(e) => Err(libvirt("look up storage volume")(e)),
    }
}

pub(super) fn list_volumes(conn: &Connect, config: &LibvirtConfig) -> Result<Vec<String>> {
    let pool = lookup_pool(conn, &config.node_pool)?;
    // One call (`list_volumes` makes two, a count and a listing); names are local.
    let volumes = pool.list_all_volumes(0).map_err(libvirt("list volumes"))?;
    let mut names: Vec<String> = volumes.iter().filter_map(|v| v.name().ok()).collect();
    names.sort();
    Ok(names)
}

pub(super) fn create_overlay(
    conn: &Connect,
    config: &LibvirtConfig,
    spec: &OverlaySpec,
) -> Result<()> {
    let images = lookup_pool(conn, &config.image_pool)?;
    let nodes = lookup_pool(conn, &config.node_pool)?;
    if lookup_volume(&nodes, &spec.name)?.is_some() {
        return Ok(());
    }
    let base = match lookup_volume(&images, &spec.base_image)? {
        Some(base) => Some(base),
        None => {
            // An image copied into the pool's directory stays unknown to
            // libvirt until the pool is refreshed; only done on a miss.
            images.refresh(0).map_err(libvirt("refresh image pool"))?;
            lookup_volume(&images, &spec.base_image)?
        }
    };
    let Some(base) = base else {
        return Err(HypervisorError::ImageMissing {
            pool: config.image_pool.clone(),
            volume: spec.base_image.clone(),
        });
    };
    let base_path = base.path().map_err(libvirt("get base image path"))?;
    let base_xml = base.xml_desc(0).map_err(libvirt("read base image XML"))?;
    let base_format = xml::volume_format(&base_xml)?.unwrap_or_else(|| "qcow2".to_owned());
    // An overlay smaller than its base would cut the guest's disk short.
    let base_capacity = base
        .info()
        .map_err(libvirt("get base image size"))?
        .capacity;
    let xml = xml::overlay_volume_xml(
        &spec.name,
        spec.capacity_bytes.max(base_capacity),
        &base_path,
        &base_format,
    )?;
    match StorageVol::create_xml(&nodes, &xml, 0) {
        Ok(_) => Ok(()),
        // Created concurrently by someone else: that is the same overlay.
        Err(e) => match lookup_volume(&nodes, &spec.name) {
            Ok(Some(_)) => Ok(()),
            _ => Err(libvirt("create overlay volume")(e)),
        },
    }
}

pub(super) fn create_seed(
    conn: &Connect,
    config: &LibvirtConfig,
    name: &str,
    content: &[u8],
) -> Result<()> {
    let pool = lookup_pool(conn, &config.node_pool)?;
    // Seeds are named by their host key and written once: never overwritten.
    if lookup_volume(&pool, name)?.is_some() {
        return Ok(());
    }
    let length = content.len() as u64;
    let xml = xml::raw_volume_xml(name, length)?;
    let volume = StorageVol::create_xml(&pool, &xml, 0).map_err(libvirt("create seed volume"))?;
    // Uploaded through libvirt's stream, so this works for remote hypervisors too.
    let stream = virt::stream::Stream::new(conn, 0).map_err(libvirt("open upload stream"))?;
    volume
        .upload(&stream, 0, length, 0)
        .map_err(libvirt("upload seed"))?;
    let mut sent = 0;
    while sent < content.len() {
        let n = stream
            .send(&content[sent..])
            .map_err(libvirt("send seed data"))?;
        match usize::try_from(n) {
            Ok(n) if n > 0 => sent += n,
            _ => {
                return Err(HypervisorError::UploadStalled {
                    volume: name.to_owned(),
                });
            }
        }
    }
    stream.finish().map_err(libvirt("finish seed upload"))
}

pub(super) fn delete_volume(conn: &Connect, config: &LibvirtConfig, name: &str) -> Result<()> {
    let pool = lookup_pool(conn, &config.node_pool)?;
    let Some(volume) = lookup_volume(&pool, name)? else {
        return Ok(());
    };
    match volume.delete(0) {
        Ok(()) => Ok(()),
        Err(e) if is(&e, ErrorNumber::NoStorageVolume) => Ok(()),
        Err(e) => Err(libvirt("delete volume")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Hypervisor;
    use crate::hypervisor::libvirt::test_support::{TEST_URI, TestResult, hypervisor};
    use crate::hypervisor::libvirt::{Libvirt, LibvirtConfig};

    /// Creates a base image volume in the test driver's pool (test set-up, constant XML).
    async fn create_base(hv: &Libvirt, name: &'static str) -> Result<()> {
        hv.run(move |conn, config| {
            let pool = lookup_pool(conn, &config.image_pool)?;
            if lookup_volume(&pool, name)?.is_none() {
                let xml = quick_xml::se::to_string_with_root(
                    "volume",
                    &BaseVolume {
                        name,
                        capacity: 1 << 20,
                    },
                )
                .map_err(|source| xml::XmlError::Serialize {
                    what: "volume",
                    source,
                })?;
                StorageVol::create_xml(&pool, &xml, 0).map_err(libvirt("create base"))?;
            }
            Ok(())
        })
        .await
    }

    #[derive(serde::Serialize)]
    struct BaseVolume {
        name: &'static str,
        capacity: u64,
    }

    #[tokio::test]
    async fn overlay_and_volume_deletion_are_idempotent() -> TestResult {
        let hv = hypervisor();
        create_base(&hv, "lvt-overlay-base").await?;
        let overlay = OverlaySpec {
            name: "lvt-overlay-w-0.qcow2".to_owned(),
            base_image: "lvt-overlay-base".to_owned(),
            capacity_bytes: 8 << 20,
        };
        hv.create_overlay(&overlay).await?;
        hv.create_overlay(&overlay).await?;
        assert!(hv.inventory(&[]).await?.volumes.contains(&overlay.name));

        let name = overlay.name.clone();
        let xml = hv
            .run(move |conn, config| {
                let pool = lookup_pool(conn, &config.node_pool)?;
                let volume = lookup_volume(&pool, &name)?.ok_or(HypervisorError::ImageMissing {
                    pool: config.node_pool.clone(),
                    volume: name.clone(),
                })?;
                volume.xml_desc(0).map_err(libvirt("read volume XML"))
            })
            .await?;
        assert!(
            xml.contains("<backingStore>\n    <path>/default-pool/lvt-overlay-base</path>"),
            "{xml}"
        );
        assert!(
            xml.contains("<capacity unit='bytes'>8388608</capacity>"),
            "{xml}"
        );

        hv.delete_volume(&overlay.name).await?;
        assert!(!hv.inventory(&[]).await?.volumes.contains(&overlay.name));
        hv.delete_volume(&overlay.name).await?;
        Ok(())
    }

    #[tokio::test]
    async fn missing_image_and_pool_are_reported() -> TestResult {
        let hv = hypervisor();
        let overlay = OverlaySpec {
            name: "lvt-noimage-w-0.qcow2".to_owned(),
            base_image: "lvt-no-such-image".to_owned(),
            capacity_bytes: 1 << 20,
        };
        let result = hv.create_overlay(&overlay).await;
        assert!(
            matches!(&result, Err(HypervisorError::ImageMissing { volume, .. }) if *volume == overlay.base_image),
            "{result:?}"
        );
        assert!(!hv.inventory(&[]).await?.volumes.contains(&overlay.name));

        let mut config = LibvirtConfig::for_uri(TEST_URI);
        config.node_pool = "lvt-no-such-pool".to_owned();
        let nopool = Libvirt::new(config);
        assert!(matches!(
            nopool.create_overlay(&overlay).await,
            Err(HypervisorError::PoolMissing { pool }) if pool == "lvt-no-such-pool"
        ));
        assert!(matches!(
            nopool.inventory(&[]).await,
            Err(HypervisorError::PoolMissing { .. })
        ));
        assert!(matches!(
            nopool.delete_volume("x").await,
            Err(HypervisorError::PoolMissing { .. })
        ));
        Ok(())
    }
}
