//! The spec's pools, as the stages read them: which nodes a BenchCluster asks for, what
//! each of them looks like, and whether they all fit on the host.

use benchcluster_crd::pools::{NodeConfig, Registration, kubelet_may_set};
use benchcluster_crd::quantity::parse_bytes;
use benchcluster_crd::{BenchClusterSpec, ImageSpec, POOL_LABEL, Role, WorkerPool, WorkerTemplate};

use std::collections::BTreeMap;

use super::world::{ObservedNode, VmSize};
use crate::names::{NodeId, PoolName};

/// The worker pools of the spec: the default one (`spec.workers`, named `w`), then
/// `spec.pools` in order. A pool whose name the API server would have refused is left
/// out (the CRD's rules keep such names out of the spec).
pub fn pools(spec: &BenchClusterSpec) -> impl Iterator<Item = (PoolName, &WorkerPool)> {
    std::iter::once((PoolName::DEFAULT, &spec.workers)).chain(spec.pools.iter().filter_map(|p| {
        PoolName::new(&p.name)
            .filter(|n| *n != PoolName::DEFAULT && *n != PoolName::CONTROL_PLANE)
            .map(|n| (n, &p.pool))
    }))
}

/// The pool of that name, if the spec declares it.
pub fn pool(spec: &BenchClusterSpec, name: PoolName) -> Option<&WorkerPool> {
    pools(spec).find(|(n, _)| *n == name).map(|(_, p)| p)
}

/// Replicas of a pool as a count (the schema bounds them to 0..=256).
pub fn replicas(pool: &WorkerPool) -> u32 {
    u32::try_from(pool.replicas).unwrap_or(0)
}

/// The nodes the spec asks for: the control plane, then each pool's workers in order.
pub fn desired_nodes(spec: &BenchClusterSpec) -> impl Iterator<Item = NodeId> + '_ {
    std::iter::once(NodeId::CONTROL_PLANE).chain(
        pools(spec)
            .flat_map(|(name, pool)| (0..replicas(pool)).map(move |i| NodeId::pooled(name, i))),
    )
}

/// Whether the spec asks for the node.
pub fn is_desired(spec: &BenchClusterSpec, id: NodeId) -> bool {
    match id.role {
        Role::ControlPlane => id == NodeId::CONTROL_PLANE,
        Role::Worker => pool(spec, id.pool).is_some_and(|p| id.index < replicas(p)),
    }
}

/// Workers the spec asks for, in every pool.
pub fn desired_workers(spec: &BenchClusterSpec) -> u32 {
    pools(spec).map(|(_, p)| replicas(p)).sum()
}

/// What one VM is made of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape<'a> {
    pub cpus: u32,
    pub memory: &'a str,
    pub disk: &'a str,
    pub image: &'a ImageSpec,
}

/// The shape the spec gives the node: the control plane's, or its pool's. `None` for a
/// worker of a pool the spec no longer declares.
pub fn shape(spec: &BenchClusterSpec, id: NodeId) -> Option<Shape<'_>> {
    match id.role {
        Role::ControlPlane => {
            let t = &spec.control_plane;
            Some(Shape {
                cpus: t.cpus,
                memory: &t.memory,
                disk: &t.disk,
                image: &t.image,
            })
        }
        Role::Worker => template(spec, id).map(|t| Shape {
            cpus: t.cpus,
            memory: &t.memory,
            disk: &t.disk,
            image: &t.image,
        }),
    }
}

/// The worker's pool template (labels, taints, extended resources, kubelet settings).
pub fn template(spec: &BenchClusterSpec, id: NodeId) -> Option<&WorkerTemplate> {
    (id.role == Role::Worker)
        .then(|| pool(spec, id.pool))
        .flatten()
        .map(|p| &p.template)
}

/// How the worker registers its Node: the pool label and the pool's labels the kubelet
/// may set, its taints and kubelet settings, and the cluster's kubelet flags. Nothing
/// for the control plane (`kubeadm init` has its own).
pub fn registration(spec: &BenchClusterSpec, id: NodeId) -> Registration {
    let Some(t) = template(spec, id) else {
        return Registration::default();
    };
    let mut labels: BTreeMap<String, String> = t
        .node_labels
        .iter()
        .filter(|(k, _)| kubelet_may_set(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(POOL_LABEL.to_owned(), id.pool.to_string());
    Registration {
        labels,
        taints: t.taints.clone(),
        kubelet: t.kubelet.clone(),
        kubelet_args: spec.kubernetes.extra_args.kubelet.clone(),
    }
}

/// What the worker's Node must carry: every label of its pool (the pool label
/// included) and its extended resources. Nothing for the control plane.
pub fn node_config(spec: &BenchClusterSpec, id: NodeId) -> NodeConfig {
    let Some(t) = template(spec, id) else {
        return NodeConfig::default();
    };
    let mut labels = t.node_labels.clone();
    labels.insert(POOL_LABEL.to_owned(), id.pool.to_string());
    NodeConfig {
        labels,
        extended_resources: t.extended_resources.clone(),
    }
}

/// Whether the node's Node carries what its pool asks for.
pub fn configured(spec: &BenchClusterSpec, id: NodeId, node: &ObservedNode) -> bool {
    node_config(spec, id).satisfied_by(&node.labels, &node.extended_resources)
}

/// What the host offers VMs: its CPUs and memory, each times the overcommit ratio the
/// operator allows (`--cpu-overcommit`, `--memory-overcommit`), and what the other
/// domains on it take already.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    /// Taken by every domain on the host but the cluster's own.
    pub taken: VmSize,
}

impl Capacity {
    fn vcpus(&self) -> f64 {
        f64::from(self.cpus) * self.cpu_overcommit
    }

    fn memory(&self) -> f64 {
        self.memory_bytes as f64 * self.memory_overcommit
    }

    fn free_vcpus(&self) -> f64 {
        (self.vcpus() - f64::from(self.taken.vcpus)).max(0.0)
    }

    fn free_memory(&self) -> f64 {
        (self.memory() - self.taken.memory_bytes as f64).max(0.0)
    }
}

/// Why a BenchCluster does not fit on the host: what it needs against what is free.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    pub vcpus: u64,
    pub memory_bytes: u64,
    pub capacity: Capacity,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.capacity;
        let gib = |bytes: f64| bytes / f64::from(1u32 << 30);
        let mut short = Vec::new();
        if self.vcpus as f64 > c.free_vcpus() {
            short.push(format!(
                "{} vCPUs where the host has {:.0} free ({} CPUs x {} overcommit, {} taken by \
                 other domains)",
                self.vcpus,
                c.free_vcpus().floor(),
                c.cpus,
                ratio(c.cpu_overcommit),
                c.taken.vcpus
            ));
        }
        if self.memory_bytes as f64 > c.free_memory() {
            short.push(format!(
                "{:.1}Gi of memory where the host has {:.1}Gi free ({:.1}Gi x {} overcommit, \
                 {:.1}Gi taken by other domains)",
                gib(self.memory_bytes as f64),
                gib(c.free_memory()),
                gib(c.memory_bytes as f64),
                ratio(c.memory_overcommit),
                gib(c.taken.memory_bytes as f64)
            ));
        }
        write!(f, "the cluster needs {}", short.join(" and "))
    }
}

/// An overcommit ratio as the operator would write it: `4`, `1.5`, `4.33`.
fn ratio(r: f64) -> String {
    let text = format!("{r:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Whether every node the spec asks for fits on the host at once, beside the other
/// domains there: the sum of their vCPUs and memory against the host's capacity times
/// the overcommit ratios, less what the others take. A size that does not parse counts
/// as nothing here (creating that node fails, naming it).
pub fn fit(spec: &BenchClusterSpec, capacity: &Capacity) -> Result<(), Shortfall> {
    let (mut vcpus, mut memory_bytes) = (0u64, 0u64);
    for id in desired_nodes(spec) {
        if let Some(shape) = shape(spec, id) {
            vcpus += u64::from(shape.cpus);
            memory_bytes = memory_bytes.saturating_add(parse_bytes(shape.memory).unwrap_or(0));
        }
    }
    if vcpus as f64 > capacity.free_vcpus() || memory_bytes as f64 > capacity.free_memory() {
        return Err(Shortfall {
            vcpus,
            memory_bytes,
            capacity: *capacity,
        });
    }
    Ok(())
}

/// Whether the node's VM was defined with other vCPUs or memory than the spec now
/// gives it (its pool was declared again with another shape). libvirt keeps memory
/// rounded up to a MiB, so a difference below that is none.
pub fn drifted(spec: &BenchClusterSpec, id: NodeId, node: &ObservedNode) -> bool {
    let (Some(size), Some(shape)) = (node.size, shape(spec, id)) else {
        return false;
    };
    let Ok(memory_bytes) = parse_bytes(shape.memory) else {
        return false;
    };
    node.domain.is_some()
        && (size.vcpus != shape.cpus || size.memory_bytes.abs_diff(memory_bytes) >= 1 << 20)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::reconcile::plan::tests::spec;
    use benchcluster_crd::NamedWorkerPool;

    fn with_pool(
        mut s: BenchClusterSpec,
        name: &str,
        replicas: i32,
        cpus: u32,
    ) -> BenchClusterSpec {
        let mut pool = s.workers.clone();
        pool.replicas = replicas;
        pool.template.cpus = cpus;
        s.pools.push(NamedWorkerPool {
            name: name.into(),
            pool,
        });
        s
    }

    #[test]
    fn nodes_of_every_pool_are_desired_and_no_others() {
        let s = with_pool(spec(2), "gpu", 1, 4);
        let gpu = PoolName::new("gpu").unwrap();
        let nodes: Vec<NodeId> = desired_nodes(&s).collect();
        assert_eq!(
            nodes,
            [
                NodeId::CONTROL_PLANE,
                NodeId::worker(0),
                NodeId::worker(1),
                NodeId::pooled(gpu, 0)
            ]
        );
        assert!(is_desired(&s, NodeId::pooled(gpu, 0)));
        assert!(!is_desired(&s, NodeId::pooled(gpu, 1)));
        assert!(!is_desired(&s, NodeId::worker(2)));
        assert!(!is_desired(
            &s,
            NodeId::pooled(PoolName::new("gone").unwrap(), 0)
        ));
        assert_eq!(desired_workers(&s), 3);
        assert_eq!(shape(&s, NodeId::pooled(gpu, 0)).unwrap().cpus, 4);
        assert_eq!(shape(&s, NodeId::worker(0)).unwrap().cpus, 2);
        assert_eq!(shape(&s, NodeId::pooled(gpu, 5)).map(|s| s.cpus), Some(4));
        assert!(shape(&s, NodeId::pooled(PoolName::new("gone").unwrap(), 0)).is_none());
    }

    #[test]
    fn every_worker_registers_with_the_clusters_kubelet_flags() {
        let mut s = with_pool(spec(1), "gpu", 1, 4);
        s.kubernetes
            .extra_args
            .kubelet
            .insert("v".into(), "4".into());
        let gpu = PoolName::new("gpu").unwrap();
        for id in [NodeId::worker(0), NodeId::pooled(gpu, 0)] {
            assert_eq!(
                registration(&s, id).kubelet_args,
                s.kubernetes.extra_args.kubelet
            );
        }
        // The control plane's come with kubeadm init.
        assert_eq!(
            registration(&s, NodeId::CONTROL_PLANE),
            Registration::default()
        );
    }

    #[test]
    fn a_pool_named_like_the_default_or_the_control_plane_is_ignored() {
        let s = with_pool(with_pool(spec(1), "w", 5, 4), "cp", 5, 4);
        assert_eq!(desired_nodes(&s).count(), 2);
    }

    #[test]
    fn the_fit_names_what_is_short() {
        // 1 control plane (2 cpus, 2Gi) + 3 workers (2 cpus, 2Gi): 8 vCPUs, 8Gi.
        let s = spec(3);
        let host = Capacity {
            cpus: 2,
            memory_bytes: 8 << 30,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            taken: VmSize::default(),
        };
        assert_eq!(fit(&s, &host), Ok(()));
        let short = fit(&spec(4), &host).unwrap_err();
        assert_eq!((short.vcpus, short.memory_bytes), (10, 10 << 30));
        assert_eq!(
            short.to_string(),
            "the cluster needs 10 vCPUs where the host has 8 free (2 CPUs x 4 overcommit, 0 \
             taken by other domains) and 10.0Gi of memory where the host has 8.0Gi free \
             (8.0Gi x 1 overcommit, 0.0Gi taken by other domains)"
        );
        let roomy = Capacity {
            memory_overcommit: 1.5,
            cpu_overcommit: 8.0,
            ..host
        };
        assert_eq!(fit(&spec(4), &roomy), Ok(()));

        // What other domains take counts: 8 vCPUs and 8Gi free less 2 and 1Gi taken.
        let shared = Capacity {
            taken: VmSize {
                vcpus: 2,
                memory_bytes: 1 << 30,
            },
            ..host
        };
        assert_eq!(fit(&spec(2), &shared), Ok(()));
        let short = fit(&spec(3), &shared).unwrap_err();
        assert_eq!(
            short.to_string(),
            "the cluster needs 8 vCPUs where the host has 6 free (2 CPUs x 4 overcommit, 2 \
             taken by other domains) and 8.0Gi of memory where the host has 7.0Gi free \
             (8.0Gi x 1 overcommit, 1.0Gi taken by other domains)"
        );
        // Taken beyond what is offered leaves nothing free, not less than nothing.
        let full = Capacity {
            taken: VmSize {
                vcpus: 100,
                memory_bytes: 100 << 30,
            },
            ..host
        };
        assert!(
            fit(&spec(0), &full)
                .unwrap_err()
                .to_string()
                .contains("host has 0 free")
        );
    }

    #[test]
    fn a_vm_of_another_size_than_its_pool_has_drifted() {
        let s = with_pool(spec(1), "gpu", 1, 4);
        let gpu = NodeId::pooled(PoolName::new("gpu").unwrap(), 0);
        let node = |vcpus, memory_bytes| ObservedNode {
            domain: Some(crate::reconcile::world::VmState::Running),
            size: Some(VmSize {
                vcpus,
                memory_bytes,
            }),
            ..ObservedNode::default()
        };
        assert!(!drifted(&s, gpu, &node(4, 2 << 30)));
        assert!(drifted(&s, gpu, &node(2, 2 << 30)), "vCPUs");
        assert!(drifted(&s, gpu, &node(4, 3 << 30)), "memory");
        // libvirt's rounding to a MiB is not drift.
        assert!(!drifted(&s, gpu, &node(4, (2 << 30) + 1024)));
        // Unknown size, no domain, or a pool gone: nothing to compare.
        assert!(!drifted(
            &s,
            gpu,
            &ObservedNode {
                size: None,
                ..node(2, 1)
            }
        ));
        assert!(!drifted(
            &s,
            gpu,
            &ObservedNode {
                domain: None,
                ..node(2, 1)
            }
        ));
        let gone = NodeId::pooled(PoolName::new("gone").unwrap(), 0);
        assert!(!drifted(&s, gone, &node(2, 1)));
    }
}
