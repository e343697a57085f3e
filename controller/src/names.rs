//! Deterministic identity: every name and MAC derives from the BenchCluster and the
//! node's pool and index, so a restarted controller computes the same ones and finds
//! what it created before.

use std::fmt;

use benchcluster_crd::{DEFAULT_POOL, Role};
use sha2::{Digest, Sha256};

/// Longest pool name ([`benchcluster_crd::pools::MAX_POOL_NAME_LEN`]).
const POOL_NAME_CAP: usize = benchcluster_crd::pools::MAX_POOL_NAME_LEN;

/// The pool a node belongs to, `cp` for the control plane: a short name held inline, so
/// node identities stay `Copy` (they key every map of a pass). Only names the CRD
/// accepts for a pool (lowercase letters and digits, at most 18) are representable.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolName {
    len: u8,
    bytes: [u8; POOL_NAME_CAP],
}

impl PoolName {
    /// The control plane's.
    pub const CONTROL_PLANE: PoolName = PoolName::literal("cp");
    /// The default pool's, `spec.workers`.
    pub const DEFAULT: PoolName = PoolName::literal(DEFAULT_POOL);

    /// A name known to be valid (a constant); longer input is cut, which no caller has.
    const fn literal(name: &str) -> Self {
        let src = name.as_bytes();
        let mut bytes = [0u8; POOL_NAME_CAP];
        let mut i = 0;
        while i < src.len() && i < POOL_NAME_CAP {
            bytes[i] = src[i];
            i += 1;
        }
        Self {
            len: i as u8,
            bytes,
        }
    }

    /// The pool of that name, if it is one the CRD accepts (or `w`, `cp`).
    pub fn new(name: &str) -> Option<Self> {
        let valid = !name.is_empty()
            && name.len() <= POOL_NAME_CAP
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        valid.then(|| Self::literal(name))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl PartialOrd for PoolName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PoolName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node of a BenchCluster: its role, its pool and its index within the pool. Ordered
/// by role first (the control plane before workers), then pool and index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub role: Role,
    pub pool: PoolName,
    pub index: u32,
}

impl NodeId {
    pub const CONTROL_PLANE: NodeId = NodeId {
        role: Role::ControlPlane,
        pool: PoolName::CONTROL_PLANE,
        index: 0,
    };

    /// Worker `index` of the default pool.
    pub fn worker(index: u32) -> Self {
        Self::pooled(PoolName::DEFAULT, index)
    }

    /// Worker `index` of `pool`.
    pub fn pooled(pool: PoolName, index: u32) -> Self {
        Self {
            role: Role::Worker,
            pool,
            index,
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.pool, self.index)
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
    /// libvirt domain name: `<namespace>-<name>-cp-0`, `<namespace>-<name>-<pool>-<i>`.
    pub fn domain(&self, node: NodeId) -> String {
        format!("{}-{}-{node}", self.namespace, self.name)
    }

    /// Prefix shared by every domain name of this cluster (also matched by other
    /// clusters whose names extend it: ownership is decided by the metadata).
    pub fn domain_prefix(&self) -> String {
        format!("{}-{}-", self.namespace, self.name)
    }

    /// Node name and hostname inside the guest cluster: `<name>-cp-0`, `<name>-<pool>-<i>`.
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
    /// `<domain>.<uid tag>.seed.img` for the legacy one. At most 169 bytes (a
    /// 63-character namespace, a 40-character name, an 18-character pool, worker index
    /// `u32::MAX`): a file
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

    /// The node's first MAC candidate, in QEMU's 52:54:00 range: a 24-bit hash plus
    /// the node's slot. The control plane and the default pool hash the UID (control
    /// plane at slot 0, worker i at i + 1, as before pools existed, so their nodes keep
    /// their MACs); another pool hashes the UID and its name, worker i at slot i.
    pub fn mac(&self, node: NodeId) -> String {
        let value = match node.role {
            Role::ControlPlane => hash24(&self.uid),
            Role::Worker if node.pool == PoolName::DEFAULT => {
                hash24(&self.uid).wrapping_add(node.index.wrapping_add(1))
            }
            Role::Worker => hash24(&format!("{}/{}", self.uid, node.pool)).wrapping_add(node.index),
        };
        mac_of(value)
    }

    /// The MACs the node may get, in order: [`ClusterNames::mac`], then rehashes of
    /// the node's identity. The act stage gives a new domain the first one no domain
    /// on the host holds, so hashes that collide (two pools, two clusters, someone
    /// else's VM) still give distinct MACs, the same ones on every run.
    pub fn mac_candidates(&self, node: NodeId) -> impl Iterator<Item = String> + '_ {
        std::iter::once(self.mac(node)).chain(
            (1..MAC_CANDIDATES)
                .map(move |k| mac_of(hash24(&format!("{}/{}/{}", self.uid, node, k)))),
        )
    }
}

/// How many MACs [`ClusterNames::mac_candidates`] offers a node. Each is taken with
/// probability under 1e-3 even with 16k domains on the host: 32 are never all taken.
pub const MAC_CANDIDATES: u32 = 32;

fn hash24(text: &str) -> u32 {
    let digest = Sha256::digest(text.as_bytes());
    u32::from_be_bytes([0, digest[0], digest[1], digest[2]])
}

fn mac_of(value: u32) -> String {
    let [_, a, b, c] = value.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// `<pool>-<index>`: `cp-0` for the control plane, else a worker of the pool.
fn parse_node_tag(tag: &str) -> Option<NodeId> {
    let (pool, index) = tag.split_once('-')?;
    let pool = PoolName::new(pool)?;
    if index.is_empty()
        || !index.bytes().all(|b| b.is_ascii_digit())
        || index.starts_with('0') && index.len() > 1
    {
        return None;
    }
    let index = index.parse().ok()?;
    if pool == PoolName::CONTROL_PLANE {
        return (index == 0).then_some(NodeId::CONTROL_PLANE);
    }
    Some(NodeId::pooled(pool, index))
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
        let gpu = NodeId::pooled(PoolName::new("gpu").unwrap(), 1);
        assert_eq!(n.domain(gpu), "bench-small-gpu-1");
        assert_eq!(n.node(gpu), "small-gpu-1");
        assert_eq!(n.disk_volume(gpu), "bench-small-gpu-1.0f8fad5b.qcow2");
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
        let id = NodeId::pooled(PoolName::new(&"p".repeat(18)).unwrap(), u32::MAX);
        let longest = n.seed_volume(id, &Seed::Keyed(tag.clone()));
        assert_eq!(longest.len(), 169);
        assert_eq!(
            n.volume_owner(&longest),
            Some((id, VolumeKind::Seed(Seed::Keyed(tag))))
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
            n.volume_owner("bench-small-gpu-12.0f8fad5b.qcow2"),
            Some((
                NodeId::pooled(PoolName::new("gpu").unwrap(), 12),
                VolumeKind::Disk
            ))
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
            "bench-small-x-y-1.0f8fad5b.qcow2",
            "bench-small-cp-1.0f8fad5b.qcow2",
            "bench-small-Gpu-1.0f8fad5b.qcow2",
            "bench-small-pppppppppppppppppppp-1.0f8fad5b.qcow2",
            "bench-small-w-.0f8fad5b.qcow2",
            "bench-small-w-1.0f8fad5b.img",
            "base.qcow2",
        ] {
            assert_eq!(n.volume_owner(foreign), None, "{foreign}");
        }
    }

    proptest! {
        #[test]
        fn macs_are_valid_deterministic_and_distinct_within_a_pool(uid in "[0-9a-f-]{36}", pool in "[a-z0-9]{1,18}") {
            let n = ClusterNames { uid, ..names() };
            let pool = PoolName::new(&pool).unwrap();
            prop_assume!(pool != PoolName::CONTROL_PLANE && pool != PoolName::DEFAULT);
            // The control plane and the default pool share one range, without overlap;
            // another pool has a range of its own (two pools' ranges meet by chance, 1
            // in 130,000 for pools of 64).
            let default: Vec<NodeId> = std::iter::once(NodeId::CONTROL_PLANE).chain((0..64).map(NodeId::worker)).collect();
            let other: Vec<NodeId> = (0..64).map(|i| NodeId::pooled(pool, i)).collect();
            for nodes in [default, other] {
                let mut seen = std::collections::HashSet::new();
                for &node in &nodes {
                    let mac = n.mac(node);
                    prop_assert!(mac.starts_with("52:54:00:"));
                    prop_assert_eq!(mac.len(), 17);
                    prop_assert_eq!(&mac, &n.mac(node));
                    seen.insert(mac);
                }
                prop_assert_eq!(seen.len(), nodes.len());
            }
        }

        #[test]
        fn volume_names_round_trip(index in 0u32..10_000, digest in prop::array::uniform32(any::<u8>()), cp in any::<bool>(), pool in "[a-z0-9]{1,18}") {
            let n = names();
            let pool = PoolName::new(&pool).unwrap();
            let id = if cp || pool == PoolName::CONTROL_PLANE { NodeId::CONTROL_PLANE } else { NodeId::pooled(pool, index) };
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
