//! What makes a worker's Node the one its pool describes: how it registers (labels the
//! kubelet may set on itself, taints, kubelet settings: all in place before the Node
//! exists, so no pod lands on it unlabelled or untainted), and what the controller keeps
//! on it through the guest API afterwards (the labels only an administrator may set,
//! and extended resources).

use std::collections::BTreeMap;

use benchcluster_crd::{KubeletSettings, Taint};

/// How a worker registers its Node (`kubeadm join`'s `nodeRegistration` and kubelet
/// configuration patch).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registration {
    /// Labels the kubelet registers its Node with (`--node-labels`): only those the
    /// NodeRestriction admission lets a kubelet set on its own Node.
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub kubelet: KubeletSettings,
}

/// What the controller keeps on a registered Node through the guest API.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Labels the Node must carry (all of them, those the kubelet set included, so a
    /// label removed behind the controller's back is put back).
    pub labels: BTreeMap<String, String>,
    /// Extended resources the Node must advertise in its capacity, name to count.
    pub extended_resources: BTreeMap<String, i64>,
}

impl NodeConfig {
    /// Whether a Node with these labels and extended resources carries the config
    /// (other labels and resources of its own are left alone).
    pub fn satisfied_by(
        &self,
        labels: &BTreeMap<String, String>,
        extended_resources: &BTreeMap<String, i64>,
    ) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self
                .extended_resources
                .iter()
                .all(|(k, v)| extended_resources.get(k) == Some(v))
    }
}

/// Labels of the `kubernetes.io` and `k8s.io` namespaces a kubelet may still set on its
/// own Node (NodeRestriction's list: the machine's own description).
const KUBELET_SETTABLE: [&str; 11] = [
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
];

/// Whether the NodeRestriction admission plugin lets a kubelet set this label on its
/// own Node: any label outside the `kubernetes.io` and `k8s.io` namespaces, and inside
/// them only [`KUBELET_SETTABLE`] and the `kubelet.kubernetes.io` and
/// `node.kubernetes.io` namespaces. The others (`node-role.kubernetes.io/...` among
/// them) only an administrator may set.
pub fn kubelet_may_set(key: &str) -> bool {
    let Some((prefix, _)) = key.split_once('/') else {
        return true;
    };
    let within = |domain: &str| prefix == domain || prefix.ends_with(&format!(".{domain}"));
    if !within("kubernetes.io") && !within("k8s.io") {
        return true;
    }
    KUBELET_SETTABLE.contains(&key)
        || within("kubelet.kubernetes.io")
        || within("node.kubernetes.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelet_may_set_only_what_node_restriction_allows() {
        for key in [
            "rack",
            "example.com/rack",
            "benchcluster.dev/pool",
            "node.kubernetes.io/instance-type",
            "node.kubernetes.io/anything",
            "kubelet.kubernetes.io/x",
            "topology.kubernetes.io/zone",
            "kubernetes.io.example.com/x",
        ] {
            assert!(kubelet_may_set(key), "{key}");
        }
        for key in [
            "node-role.kubernetes.io/worker",
            "kubernetes.io/role",
            "k8s.io/x",
            "sub.k8s.io/x",
            "topology.kubernetes.io/rack",
        ] {
            assert!(!kubelet_may_set(key), "{key}");
        }
    }

    #[test]
    fn a_node_satisfies_the_config_when_it_carries_all_of_it() {
        let config = NodeConfig {
            labels: [("a".to_owned(), "1".to_owned())].into(),
            extended_resources: [("example.com/gpu".to_owned(), 2)].into(),
        };
        let labels: BTreeMap<String, String> = [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]
        .into();
        let resources: BTreeMap<String, i64> = [("example.com/gpu".to_owned(), 2)].into();
        assert!(config.satisfied_by(&labels, &resources));
        assert!(!config.satisfied_by(&labels, &BTreeMap::new()));
        let fewer: BTreeMap<String, i64> = [("example.com/gpu".to_owned(), 1)].into();
        assert!(!config.satisfied_by(&labels, &fewer));
        assert!(!config.satisfied_by(&BTreeMap::new(), &resources));
    }
}
