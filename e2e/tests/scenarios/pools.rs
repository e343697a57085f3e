//! Two pools on real VMs, through the guest cluster's API, with pods of the preloaded
//! pause image: each Node's capacity follows its pool's shape; labels, the taint (on the
//! Node's first version: set at registration), `pods` and the fake accelerator in
//! allocatable; pods land where their selector says and never on the tainted node
//! without the toleration; two of three pods asking for one fake GPU each run on the
//! gpu node and the third stays Pending, Unschedulable; the kubelet restarted over SSH
//! and the extended resource back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use benchcluster_crd::BenchCluster;
use benchcluster_crd::quantity::parse_bytes;
use benchcluster_e2e::wait;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use super::{Bed, node_of_pool, pause_image};
use crate::vm_support::POLL;

pub const NAME: &str = "pools";

const POOL_LABEL: &str = "benchcluster.dev/pool";
const FAKE_GPU: &str = "example.com/fake-gpu";
/// Where the scenario's pods go, deleted at its end.
const PODS_NAMESPACE: &str = "e2e-pools";
/// Pods of the pause image start in seconds even under emulation; scheduling is the
/// scheduler's next cycle.
const POD_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// Where kubeadm writes the kubelet's flags, registration taints among them.
const KUBELET_FLAGS: &str = "/var/lib/kubelet/kubeadm-flags.env";
const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";
/// The kubelet's start and its node status update under emulation.
const KUBELET_DEADLINE: Duration = Duration::from_secs(5 * 60);

pub fn run(bed: &Bed) -> BoxFuture<'_, anyhow::Result<()>> {
    Box::pin(async move {
        let bc = bed.get().await?;
        let client = bed.guest_client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let gpu = node_of_pool(&bc, "gpu")?;
        let small = node_of_pool(&bc, "small")?;

        check_nodes(bed, &bc, &nodes).await?;
        let pause = pause_image(&nodes.get(&small).await?)?;
        eprintln!("  pods run {pause}");

        let namespaces: Api<Namespace> = Api::all(client.clone());
        let _ = namespaces
            .delete(PODS_NAMESPACE, &DeleteParams::default())
            .await;
        wait::until("no leftover pods namespace", POD_DEADLINE, POLL, || async {
            anyhow::Ok(
                namespaces
                    .get_opt(PODS_NAMESPACE)
                    .await?
                    .is_none()
                    .then_some(()),
            )
        })
        .await?;
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": PODS_NAMESPACE}}))?,
            )
            .await?;
        let result = pods(&client, &pause, &small, &gpu).await;
        let _ = namespaces
            .delete(PODS_NAMESPACE, &DeleteParams::default())
            .await;
        result?;

        kubelet_restart(bed, &nodes, &gpu).await?;
        bed.wait_ready("Ready after the kubelet restart", super::SCALE_UP_DEADLINE)
            .await?;
        Ok(())
    })
}

fn quantity(node: &Node, of: &str, name: &str) -> anyhow::Result<String> {
    let status = node.status.as_ref().context("no status")?;
    let map = match of {
        "capacity" => status.capacity.as_ref(),
        _ => status.allocatable.as_ref(),
    };
    map.and_then(|m| m.get(name))
        .map(|q| q.0.clone())
        .with_context(|| format!("{}: no {name} in {of}", node_name(node)))
}

fn node_name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or("?")
}

/// Capacity against the pool's shape, labels, the taint as registered, allocatable.
async fn check_nodes(bed: &Bed, bc: &BenchCluster, nodes: &Api<Node>) -> anyhow::Result<()> {
    let status = bc.status_or_default();
    for pool in &bc.spec.pools {
        let template = &pool.pool.template;
        for name in status
            .nodes
            .iter()
            .filter(|n| n.pool.as_deref() == Some(&pool.name))
            .map(|n| &n.name)
        {
            let node = nodes.get(name).await?;
            let cpus = quantity(&node, "capacity", "cpu")?;
            let memory = parse_bytes(&quantity(&node, "capacity", "memory")?)?;
            let storage = parse_bytes(&quantity(&node, "capacity", "ephemeral-storage")?)?;
            let (want_memory, want_disk) =
                (parse_bytes(&template.memory)?, parse_bytes(&template.disk)?);
            eprintln!(
                "  {name} (pool {}): cpu {cpus}, memory {:.2}Gi of {}, ephemeral-storage \
                 {:.2}Gi of {}",
                pool.name,
                memory as f64 / f64::from(1u32 << 30),
                template.memory,
                storage as f64 / f64::from(1u32 << 30),
                template.disk
            );
            ensure!(
                cpus == template.cpus.to_string(),
                "{name}: {cpus} CPUs, pool {} has {}",
                pool.name,
                template.cpus
            );
            // The guest kernel keeps some memory; ext4 its metadata.
            ensure!(
                memory <= want_memory && memory * 100 >= want_memory * 90,
                "{name}: memory {memory} against the pool's {want_memory}"
            );
            ensure!(
                storage <= want_disk && storage * 100 >= want_disk * 90,
                "{name}: ephemeral-storage {storage} against the pool's disk {want_disk}"
            );
            let labels = node.metadata.labels.clone().unwrap_or_default();
            ensure!(
                labels.get(POOL_LABEL) == Some(&pool.name),
                "{name}: pool label {:?}",
                labels.get(POOL_LABEL)
            );
            for (key, value) in &template.node_labels {
                ensure!(
                    labels.get(key) == Some(value),
                    "{name}: label {key}={:?}, want {value}",
                    labels.get(key)
                );
            }
            for taint in &template.taints {
                let on = node.spec.as_ref().and_then(|s| s.taints.as_ref());
                ensure!(
                    on.is_some_and(|t| t.iter().any(|t| t.key == taint.key)),
                    "{name}: no taint {}",
                    taint.key
                );
                // Never patched on by the controller: the kubelet registered the Node with
                // it (kubeadm's --register-with-taints, checked below).
                let writers: Vec<String> = node
                    .metadata
                    .managed_fields
                    .iter()
                    .flatten()
                    .filter(|m| {
                        m.fields_v1
                            .as_ref()
                            .is_some_and(|f| f.0.pointer("/f:spec/f:taints").is_some())
                    })
                    .filter_map(|m| m.manager.clone())
                    .collect();
                ensure!(
                    !writers
                        .iter()
                        .any(|w| w == benchcluster_controller::FIELD_MANAGER),
                    "{name}: the controller wrote taints ({writers:?})"
                );
                let guest = bed.guest_node(name).await?;
                // kubeadm hands nodeRegistration.taints to the kubelet as a flag (or, in
                // some versions, as registerWithTaints in its configuration).
                let flags = bed
                    .exec(
                        &guest,
                        &["sudo", "-n", "cat", KUBELET_FLAGS, KUBELET_CONFIG],
                    )
                    .await?;
                let registered = format!("{}={}:{:?}", taint.key, taint.value, taint.effect);
                let in_config = flags.contains("registerWithTaints")
                    && flags.contains(&format!("key: {}", taint.key));
                ensure!(
                    (flags.contains("--register-with-taints") && flags.contains(&registered))
                        || in_config,
                    "{name}: the kubelet registers without {registered}: {flags}"
                );
                eprintln!(
                    "  {name}: taint {registered} at registration (taints written by {writers:?})"
                );
            }
            for (resource, count) in &template.extended_resources {
                let allocatable = quantity(&node, "allocatable", resource)?;
                ensure!(
                    allocatable == count.to_string(),
                    "{name}: {resource} {allocatable}, want {count}"
                );
            }
            if let Some(max_pods) = template.kubelet.max_pods {
                let pods = quantity(&node, "allocatable", "pods")?;
                ensure!(
                    pods == max_pods.to_string(),
                    "{name}: pods {pods}, want {max_pods}"
                );
            }
        }
    }
    Ok(())
}

fn pod(name: &str, image: &str, extra: serde_json::Value) -> anyhow::Result<Pod> {
    let mut spec = json!({
        "containers": [{"name": "pause", "image": image, "imagePullPolicy": "Never"}],
        "terminationGracePeriodSeconds": 0
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": PODS_NAMESPACE},
        "spec": spec
    }))?)
}

fn toleration() -> serde_json::Value {
    json!([{"key": FAKE_GPU, "operator": "Equal", "value": "true", "effect": "NoSchedule"}])
}

/// Pod name -> (node, phase, PodScheduled reason) once every pod is Running, or
/// Pending and marked Unschedulable.
async fn settled(pods: &Api<Pod>) -> anyhow::Result<BTreeMap<String, (String, String, String)>> {
    wait::until("the pods to settle", POD_DEADLINE, POLL, || async {
        let list = pods.list(&ListParams::default()).await?.items;
        let mut out = BTreeMap::new();
        for pod in list {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let status = pod.status.unwrap_or_default();
            let phase = status.phase.unwrap_or_default();
            let unschedulable = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .and_then(|c| c.reason.clone())
                .unwrap_or_default();
            if phase != "Running" && unschedulable != "Unschedulable" {
                return Ok(None);
            }
            let node = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
            out.insert(name, (node, phase, unschedulable));
        }
        anyhow::Ok(Some(out))
    })
    .await
}

async fn pods(client: &Client, image: &str, small: &str, gpu: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), PODS_NAMESPACE);
    let create = |pod: Pod| {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &pod)
                .await
                .context("creating a pod")
        }
    };
    // A selector per pool, and pods with neither selector nor toleration.
    let selected = |pool: &str| json!({"nodeSelector": {POOL_LABEL: pool}});
    create(pod("on-small", image, selected("small"))?).await?;
    let mut on_gpu = selected("gpu");
    on_gpu["tolerations"] = toleration();
    create(pod("on-gpu", image, on_gpu)?).await?;
    for i in 0..3 {
        create(pod(&format!("anywhere-{i}"), image, json!({}))?).await?;
    }
    let placed = settled(&pods).await?;
    eprintln!("  placed: {placed:?}");
    ensure!(
        placed.get("on-small").map(|p| p.0.as_str()) == Some(small),
        "on-small: {:?}",
        placed.get("on-small")
    );
    ensure!(
        placed.get("on-gpu").map(|p| p.0.as_str()) == Some(gpu),
        "on-gpu: {:?}",
        placed.get("on-gpu")
    );
    for (name, (node, phase, _)) in placed.iter().filter(|(n, _)| n.starts_with("anywhere-")) {
        ensure!(
            phase == "Running" && node != gpu,
            "{name} without the toleration: {phase} on {node}"
        );
    }
    for name in placed.keys() {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    wait::until("the first pods gone", POD_DEADLINE, POLL, || async {
        anyhow::Ok(
            pods.list(&ListParams::default())
                .await?
                .items
                .is_empty()
                .then_some(()),
        )
    })
    .await?;

    // Three pods of one fake GPU each on a node that has two.
    for i in 0..3 {
        let extra = json!({
            "tolerations": toleration(),
            "containers": [{"name": "pause", "image": image, "imagePullPolicy": "Never",
                            "resources": {"limits": {FAKE_GPU: "1"}}}]
        });
        create(pod(&format!("gpu-{i}"), image, extra)?).await?;
    }
    let placed = settled(&pods).await?;
    eprintln!("  fake GPU pods: {placed:?}");
    let running: Vec<&String> = placed
        .iter()
        .filter(|(_, (node, phase, _))| phase == "Running" && node == gpu)
        .map(|(name, _)| name)
        .collect();
    let pending: Vec<&String> = placed
        .iter()
        .filter(|(_, (_, phase, reason))| phase == "Pending" && reason == "Unschedulable")
        .map(|(name, _)| name)
        .collect();
    ensure!(
        running.len() == 2 && pending.len() == 1,
        "want two Running on {gpu} and one Pending Unschedulable: {placed:?}"
    );
    Ok(())
}

/// Restarts the kubelet on the gpu node; the fake GPUs are in allocatable again (the
/// controller puts them back if the kubelet's status update dropped them). Prints how
/// long from the restart.
async fn kubelet_restart(bed: &Bed, nodes: &Api<Node>, gpu: &str) -> anyhow::Result<()> {
    let node = bed.guest_node(gpu).await?;
    // A new invocation of the unit: the restart happened.
    let invocation = || {
        let node = node.clone();
        async move {
            let argv = [
                "systemctl",
                "show",
                "kubelet",
                "--property=InvocationID",
                "--value",
            ];
            bed.exec(&node, &argv).await
        }
    };
    let before = invocation().await?;
    let start = Instant::now();
    bed.exec(&node, &["sudo", "-n", "systemctl", "restart", "kubelet"])
        .await?;
    let after = invocation().await?;
    ensure!(
        before.trim() != after.trim(),
        "the kubelet did not restart ({before:?})"
    );
    let missing = std::sync::atomic::AtomicBool::new(false);
    wait::until(
        "the fake GPUs in allocatable after the kubelet restart",
        KUBELET_DEADLINE,
        POLL,
        || async {
            let node = nodes.get(gpu).await?;
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let back = quantity(&node, "allocatable", FAKE_GPU).ok().as_deref() == Some("2");
            if !back {
                missing.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok((ready && back).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "  kubelet restarted on {gpu}: {FAKE_GPU} 2 in allocatable and Ready {:.1?} after \
         the restart ({})",
        start.elapsed(),
        if missing.load(std::sync::atomic::Ordering::Relaxed) {
            "it was missing meanwhile"
        } else {
            "never seen missing"
        }
    );
    Ok(())
}
