//! Deterministic identity: every name and MAC derives from the BenchCluster and the
//! node's role and index, so a restarted controller computes the same ones and finds
//! what it created before.

use std::fmt;

use benchcluster_crd::Role;
use sha2::{Digest, Sha256};

/// A node of a BenchCluster: its role and index within the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub role: Role,
    pub index: u32,
}

impl NodeId {
    pub const CONTROL_PLANE: NodeId = NodeId {
        role: Role::ControlPlane,
        index: 0,
    };

    pub fn worker(index: u32) -> Self {
        Self {
            role: Role::Worker,
            index,
        }
    }

    fn role_tag(self) -> &'static str {
        match self.role {
            Role::ControlPlane => "cp",
            Role::Worker => "w",
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.role_tag(), self.index)
    }
}

/// The two volumes of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// The root disk overlay.
    Disk,
    /// The identity seed.
    Seed,
}

/// The names of one BenchCluster's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNames {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl ClusterNames {
    /// libvirt domain name: `<namespace>-<name>-cp-0`, `<namespace>-<name>-w-<i>`.
    pub fn domain(&self, node: NodeId) -> String {
        format!("{}-{}-{node}", self.namespace, self.name)
    }

    /// Prefix shared by every domain name of this cluster (also matched by other
    /// clusters whose names extend it: ownership is decided by the metadata).
    pub fn domain_prefix(&self) -> String {
        format!("{}-{}-", self.namespace, self.name)
    }

    /// Node name and hostname inside the guest cluster: `<name>-cp-0`, `<name>-w-<i>`.
    pub fn node(&self, node: NodeId) -> String {
        format!("{}-{node}", self.name)
    }

    /// Short, stable tag of the owner UID that marks this cluster's volumes.
    fn uid_tag(&self) -> String {
        self.uid.chars().filter(|c| *c != '-').take(8).collect()
    }

    fn disk_suffix(&self) -> String {
        format!(".{}.qcow2", self.uid_tag())
    }

    fn seed_suffix(&self) -> String {
        format!(".{}.seed.img", self.uid_tag())
    }

    /// The node's root-disk overlay. Volumes carry no metadata, so the UID tag in the
    /// name is what ties a volume to its owner (two clusters whose domain names collide
    /// still own distinct volumes).
    pub fn disk_volume(&self, node: NodeId) -> String {
        format!("{}{}", self.domain(node), self.disk_suffix())
    }

    /// The node's identity seed (docs/image-contract.md), tagged like its disk.
    pub fn seed_volume(&self, node: NodeId) -> String {
        format!("{}{}", self.domain(node), self.seed_suffix())
    }

    /// Secret holding the guest cluster's admin kubeconfig.
    pub fn kubeconfig_secret(&self) -> String {
        format!("{}-kubeconfig", self.name)
    }

    /// Parses a volume name back into the node it belongs to and what it is, if this
    /// cluster owns it.
    pub fn volume_owner(&self, volume: &str) -> Option<(NodeId, VolumeKind)> {
        let (stem, kind) = match volume.strip_suffix(&self.disk_suffix()) {
            Some(stem) => (stem, VolumeKind::Disk),
            None => (volume.strip_suffix(&self.seed_suffix())?, VolumeKind::Seed),
        };
        let rest = stem.strip_prefix(&self.domain_prefix())?;
        Some((parse_node_tag(rest)?, kind))
    }

    /// Deterministic MAC in QEMU's 52:54:00 range: a 24-bit hash of the UID plus the
    /// node's slot (control plane 0, worker i at i + 1), so MACs within one cluster never
    /// collide and clusters start at unrelated points of the range.
    pub fn mac(&self, node: NodeId) -> String {
        let digest = Sha256::digest(self.uid.as_bytes());
        let base = u32::from_be_bytes([0, digest[0], digest[1], digest[2]]);
        let slot = match node.role {
            Role::ControlPlane => 0,
            Role::Worker => node.index.wrapping_add(1),
        };
        let [_, a, b, c] = base.wrapping_add(slot).to_be_bytes();
        format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
    }
}

fn parse_node_tag(tag: &str) -> Option<NodeId> {
    let (role, index) = tag.split_once('-')?;
    let role = match role {
        "cp" => Role::ControlPlane,
        "w" => Role::Worker,
        _ => return None,
    };
    if index.is_empty()
        || !index.bytes().all(|b| b.is_ascii_digit())
        || index.starts_with('0') && index.len() > 1
    {
        return None;
    }
    Some(NodeId {
        role,
        index: index.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names() -> ClusterNames {
        ClusterNames {
            namespace: "bench".into(),
            name: "small".into(),
            uid: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
        }
    }

    #[test]
    fn names_follow_the_design() {
        let n = names();
        assert_eq!(n.domain(NodeId::CONTROL_PLANE), "bench-small-cp-0");
        assert_eq!(n.domain(NodeId::worker(3)), "bench-small-w-3");
        assert_eq!(n.node(NodeId::worker(3)), "small-w-3");
        assert_eq!(
            n.disk_volume(NodeId::worker(3)),
            "bench-small-w-3.0f8fad5b.qcow2"
        );
        assert_eq!(n.kubeconfig_secret(), "small-kubeconfig");
    }

    #[test]
    fn volume_owner_parses_only_our_volumes() {
        let n = names();
        assert_eq!(
            n.volume_owner("bench-small-w-12.0f8fad5b.qcow2"),
            Some((NodeId::worker(12), VolumeKind::Disk))
        );
        assert_eq!(
            n.volume_owner("bench-small-cp-0.0f8fad5b.seed.img"),
            Some((NodeId::CONTROL_PLANE, VolumeKind::Seed))
        );
        for foreign in [
            "bench-small-w-1.aaaaaaaa.qcow2",
            "bench-smaller-w-1.0f8fad5b.qcow2",
            "bench-small-w-01.0f8fad5b.qcow2",
            "bench-small-x-1.0f8fad5b.qcow2",
            "bench-small-w-.0f8fad5b.qcow2",
            "bench-small-w-1.0f8fad5b.img",
            "base.qcow2",
        ] {
            assert_eq!(n.volume_owner(foreign), None, "{foreign}");
        }
    }

    proptest! {
        #[test]
        fn macs_are_valid_deterministic_and_distinct_within_a_cluster(uid in "[0-9a-f-]{36}") {
            let n = ClusterNames { uid, ..names() };
            let mut seen = std::collections::HashSet::new();
            for node in std::iter::once(NodeId::CONTROL_PLANE).chain((0..64).map(NodeId::worker)) {
                let mac = n.mac(node);
                prop_assert!(mac.starts_with("52:54:00:"));
                prop_assert_eq!(mac.len(), 17);
                prop_assert_eq!(&mac, &n.mac(node));
                seen.insert(mac);
            }
            prop_assert_eq!(seen.len(), 65);
        }

        #[test]
        fn volume_names_round_trip(index in 0u32..10_000) {
            let n = names();
            let id = NodeId::worker(index);
            prop_assert_eq!(n.volume_owner(&n.disk_volume(id)), Some((id, VolumeKind::Disk)));
            prop_assert_eq!(n.volume_owner(&n.seed_volume(id)), Some((id, VolumeKind::Seed)));
        }
    }
}
