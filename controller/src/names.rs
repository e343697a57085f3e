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

/// Bytes of a host key's SHA-256 fingerprint that name its seed: 64 bits, so no two
/// host keys ever generated for one node share a seed name.
const KEY_TAG_BYTES: usize = 8;

/// A VM incarnation's SSH host key, short enough for a volume name: the first 8 bytes
/// of its SHA-256 fingerprint (the digest `ssh-keygen -l` prints in base64) as 16
/// lowercase hex digits, which any storage pool accepts in a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyTag(String);

impl KeyTag {
    /// The tag of a SHA-256 fingerprint digest; `None` for a shorter one.
    pub fn from_sha256(digest: &[u8]) -> Option<Self> {
        let prefix = digest.get(..KEY_TAG_BYTES)?;
        Some(Self(prefix.iter().map(|b| format!("{b:02x}")).collect()))
    }

    fn parse(text: &str) -> Option<Self> {
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        (text.len() == 2 * KEY_TAG_BYTES && text.bytes().all(hex)).then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One of a node's identity seeds, by how its volume is named.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Seed {
    /// Named by the host key it carries: one per VM incarnation, written before the
    /// domain that boots from it is defined and never written again, so two passes
    /// defining the same node at once each write their own seed and the domain that
    /// wins boots from the seed of the key it pins.
    Keyed(KeyTag),
    /// Named without a key (`<domain>.<uid>.seed.img`), as controllers wrote seeds
    /// before they were per incarnation: the domains those defined boot from it.
    Legacy,
}

/// The volumes of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeKind {
    /// The root disk overlay.
    Disk,
    /// An identity seed.
    Seed(Seed),
}

/// Every seed volume name ends so, keyed or not.
const SEED_SUFFIX: &str = ".seed.img";

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

    /// The node's root-disk overlay. Volumes carry no metadata, so the UID tag in the
    /// name is what ties a volume to its owner (two clusters whose domain names collide
    /// still own distinct volumes).
    pub fn disk_volume(&self, node: NodeId) -> String {
        format!("{}{}", self.domain(node), self.disk_suffix())
    }

    /// A seed of the node (docs/image-contract.md), tagged like its disk:
    /// `<domain>.<uid tag>.<key tag>.seed.img` for a keyed seed,
    /// `<domain>.<uid tag>.seed.img` for the legacy one. At most 152 bytes (a
    /// 63-character namespace, a 40-character name, worker index `u32::MAX`): a file
    /// name in a directory pool, and within libvirt's limits for a volume name.
    pub fn seed_volume(&self, node: NodeId, seed: &Seed) -> String {
        match seed {
            Seed::Keyed(tag) => format!(
                "{}.{}.{tag}{SEED_SUFFIX}",
                self.domain(node),
                self.uid_tag()
            ),
            Seed::Legacy => format!("{}.{}{SEED_SUFFIX}", self.domain(node), self.uid_tag()),
        }
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
            None => {
                // `<domain>.<uid tag>` or `<domain>.<uid tag>.<key tag>`; domain names
                // hold no dot (namespace and name are DNS labels).
                let stem = volume.strip_suffix(SEED_SUFFIX)?;
                let uid = format!(".{}", self.uid_tag());
                match stem.strip_suffix(&uid) {
                    Some(domain) => (domain, VolumeKind::Seed(Seed::Legacy)),
                    None => {
                        let (rest, tag) = stem.rsplit_once('.')?;
                        let tag = KeyTag::parse(tag)?;
                        (rest.strip_suffix(&uid)?, VolumeKind::Seed(Seed::Keyed(tag)))
                    }
                }
            }
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]
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
        let tag = KeyTag::from_sha256(&[0x5c, 0x1e, 0x0a, 0x9d, 0x3f, 0x2b, 0x4e, 0x71, 0xff])
            .expect("8 bytes or more");
        assert_eq!(
            n.seed_volume(NodeId::worker(3), &Seed::Keyed(tag)),
            "bench-small-w-3.0f8fad5b.5c1e0a9d3f2b4e71.seed.img"
        );
        // The name controllers gave the one seed per node before seeds were keyed: a
        // domain they defined boots from it, so it is still recognised.
        assert_eq!(
            n.seed_volume(NodeId::worker(3), &Seed::Legacy),
            "bench-small-w-3.0f8fad5b.seed.img"
        );
        assert_eq!(KeyTag::from_sha256(&[0; 7]), None);
    }

    #[test]
    fn the_longest_seed_name_fits_a_pool() {
        let n = ClusterNames {
            namespace: "n".repeat(63),
            name: "c".repeat(40),
            ..names()
        };
        let tag = KeyTag::from_sha256(&[0xab; 32]).unwrap();
        let longest = n.seed_volume(NodeId::worker(u32::MAX), &Seed::Keyed(tag.clone()));
        assert_eq!(longest.len(), 152);
        assert_eq!(
            n.volume_owner(&longest),
            Some((NodeId::worker(u32::MAX), VolumeKind::Seed(Seed::Keyed(tag))))
        );
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
            Some((NodeId::CONTROL_PLANE, VolumeKind::Seed(Seed::Legacy)))
        );
        assert_eq!(
            n.volume_owner("bench-small-w-2.0f8fad5b.5c1e0a9d3f2b4e71.seed.img"),
            Some((
                NodeId::worker(2),
                VolumeKind::Seed(Seed::Keyed(KeyTag("5c1e0a9d3f2b4e71".into())))
            ))
        );
        for foreign in [
            "bench-small-w-1.aaaaaaaa.seed.img",
            "bench-small-w-1.aaaaaaaa.5c1e0a9d3f2b4e71.seed.img",
            "bench-small-w-1.0f8fad5b.5c1e0a9d3f2b4e7.seed.img",
            "bench-small-w-1.0f8fad5b.5C1E0A9D3F2B4E71.seed.img",
            "bench-small-w-1.0f8fad5b.5c1e0a9d3f2b4e71x.seed.img",
            "bench-small-w-1.0f8fad5b.zc1e0a9d3f2b4e71.seed.img",
            "bench-small-w-1.5c1e0a9d3f2b4e71.0f8fad5b.seed.img",
            "bench-small-w-1.0f8fad5b..seed.img",
            "bench-smaller-w-1.0f8fad5b.5c1e0a9d3f2b4e71.seed.img",
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
        fn volume_names_round_trip(index in 0u32..10_000, digest in prop::array::uniform32(any::<u8>()), cp in any::<bool>()) {
            let n = names();
            let id = if cp { NodeId::CONTROL_PLANE } else { NodeId::worker(index) };
            prop_assert_eq!(n.volume_owner(&n.disk_volume(id)), Some((id, VolumeKind::Disk)));
            let keyed = Seed::Keyed(KeyTag::from_sha256(&digest).unwrap());
            for seed in [keyed, Seed::Legacy] {
                let name = n.seed_volume(id, &seed);
                prop_assert_eq!(n.volume_owner(&name), Some((id, VolumeKind::Seed(seed))));
                // Another cluster's names never claim it.
                let other = ClusterNames { uid: "aaaaaaaa-0000-0000-0000-000000000000".into(), ..names() };
                prop_assert_eq!(other.volume_owner(&name), None);
            }
        }
    }
}
