//! api tier: worker pools and MACs on libvirt's `test:///default` driver with the full
//! controller loop: per-pool status, and MACs unique on the host when the hashes of two
//! clusters (or someone else's VM) collide.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, ensure};
use benchcluster_controller::hypervisor::xml::parse_domain;
use benchcluster_controller::hypervisor::{DomainSpec, Hypervisor, Owner};
use benchcluster_controller::names::{ClusterNames, NodeId, PoolName};
use benchcluster_crd::{BenchCluster, Firmware};
use benchcluster_e2e::testbed::{self, CONVERGE, Fixture, POLL, RunningController};
use benchcluster_e2e::wait;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// A cluster of the default pool (`workers`) and a pool `gpu` of `gpu` replicas.
fn pooled(f: &Fixture, name: &str, workers: i32, gpu: i32) -> Result<BenchCluster> {
    let mut bc = f.cluster(name, workers)?;
    bc.spec.pools = serde_json::from_value(json!([{
        "name": "gpu", "replicas": gpu, "cpus": 2, "memory": "1Gi", "disk": "1Gi",
        "image": {"volume": testbed::BASE_IMAGE},
        "nodeLabels": {"example.com/accel": "fake"},
        "taints": [{"key": "example.com/fake-gpu", "value": "true", "effect": "NoSchedule"}],
        "extendedResources": {"example.com/fake-gpu": 2}
    }]))?;
    Ok(bc)
}

/// Domain name -> MAC of the domains whose names start with `<namespace>-<name>-`.
fn macs(namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
    let conn = testbed::libvirt()?;
    let mut out = BTreeMap::new();
    for domain in testbed::domains(namespace, name)? {
        let xml = conn
            .lookup_domain_by_name(&domain)
            .and_then(|d| d.xml_desc(0))
            .context("domain XML")?;
        let mac = parse_domain(&xml)?.primary_mac().context("no MAC")?;
        out.insert(domain, mac);
    }
    Ok(out)
}

async fn wait_pools_ready(f: &Fixture, name: &str) -> Result<BenchCluster> {
    wait::until(&format!("{name} Ready"), CONVERGE, POLL, || async {
        let bc = f.api.get(name).await?;
        anyhow::Ok(testbed::is_ready(&bc).then_some(bc))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pool_reports_its_replicas_and_scales_alone() -> Result<()> {
    let f = Fixture::new("pools").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    f.api
        .create(&PostParams::default(), &pooled(&f, "mixed", 1, 2)?)
        .await?;
    let bc = wait_pools_ready(&f, "mixed").await?;
    let status = bc.status.unwrap_or_default();
    let pools: Vec<(String, i32, i32)> = status
        .pools
        .iter()
        .map(|p| (p.name.clone(), p.replicas, p.ready_replicas))
        .collect();
    assert_eq!(pools, [("w".into(), 1, 1), ("gpu".into(), 2, 2)]);
    assert_eq!(status.pool_summary.as_deref(), Some("w 1/1, gpu 2/2"));
    assert_eq!(status.ready_workers, 3);
    let gpu_nodes: Vec<&str> = status
        .nodes
        .iter()
        .filter(|n| n.pool.as_deref() == Some("gpu"))
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(gpu_nodes, ["mixed-gpu-0", "mixed-gpu-1"]);
    // The vCPUs each pool asks for.
    let conn = testbed::libvirt()?;
    let vcpus = |domain: &str| -> Result<u32> {
        let xml = conn.lookup_domain_by_name(domain)?.xml_desc(0)?;
        parse_domain(&xml)?.vcpus.context("no vcpus")
    };
    assert_eq!(vcpus(&format!("{}-mixed-gpu-0", f.namespace))?, 2);
    assert_eq!(vcpus(&format!("{}-mixed-w-0", f.namespace))?, 1);

    // Scaling gpu down leaves the default pool's VM as it was (same MAC, same domain).
    let before = macs(&f.namespace, "mixed")?;
    f.api
        .patch(
            "mixed",
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(json!([
                {"op": "replace", "path": "/spec/pools/0/replicas", "value": 0}
            ]))?),
        )
        .await?;
    wait::until("gpu scaled to 0", CONVERGE, POLL, || async {
        let bc = f.api.get("mixed").await?;
        let done = testbed::is_ready(&bc)
            && testbed::domains(&f.namespace, "mixed")?.len() == 2
            && bc.status.as_ref().is_some_and(|s| {
                s.pools
                    .iter()
                    .any(|p| p.name == "gpu" && p.replicas == 0 && p.ready_replicas == 0)
            });
        anyhow::Ok(done.then_some(()))
    })
    .await?;
    let after = macs(&f.namespace, "mixed")?;
    let kept: BTreeMap<String, String> = before
        .into_iter()
        .filter(|(d, _)| !d.contains("-gpu-"))
        .collect();
    assert_eq!(after, kept, "the default pool and control plane untouched");
    controller.stop().await;
    Ok(())
}

/// Another cluster's VM and someone else's VM hold the MACs this cluster's control
/// plane and gpu worker would hash to: both get other MACs, distinct on the host, and
/// the status shows the MACs the domains have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macs_held_on_the_host_are_never_given_again() -> Result<()> {
    let f = Fixture::new("macs").await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    // Created paused: its UID decides its MACs, and the colliding VMs go in first.
    let mut bc = pooled(&f, "late", 1, 1)?;
    bc.spec.paused = true;
    let bc = f.api.create(&PostParams::default(), &bc).await?;
    let names = ClusterNames {
        namespace: f.namespace.clone(),
        name: "late".into(),
        uid: bc.uid().context("uid")?,
    };
    let gpu0 = NodeId::pooled(PoolName::new("gpu").context("pool name")?, 0);
    let (cp_mac, gpu_mac) = (names.mac(NodeId::CONTROL_PLANE), names.mac(gpu0));

    // Someone else's VM (no owner metadata), on the cluster's network.
    let foreign = format!("{}-theirs", f.namespace);
    let xml = format!(
        "<domain type='test'><name>{foreign}</name><memory unit='KiB'>262144</memory>\
         <os><type>hvm</type></os><devices><interface type='network'>\
         <mac address='{cp_mac}'/><source network='{}'/></interface></devices></domain>",
        testbed::NETWORK
    );
    testbed::libvirt()?.define_domain_xml(&xml)?;
    // Another BenchCluster's VM, defined the way the controller defines its own.
    let other = format!("{}-other-w-0", f.namespace);
    let hv = testbed::hypervisor();
    hv.define_domain(&DomainSpec {
        name: other.clone(),
        owner: Owner {
            uid: "00000000-0000-4000-8000-0000000000aa".into(),
            namespace: f.namespace.clone(),
            name: "other".into(),
            node: NodeId::worker(0),
            host_key: None,
        },
        vcpus: 1,
        memory_bytes: 256 << 20,
        disk_volume: format!("{other}.qcow2"),
        seed_volume: None,
        mac: gpu_mac.clone(),
        network: testbed::NETWORK.into(),
        firmware: Firmware::Bios,
    })
    .await?;

    f.api
        .patch(
            "late",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await?;
    let bc = wait_pools_ready(&f, "late").await?;
    let own = macs(&f.namespace, "late")?;
    let held = [cp_mac.clone(), gpu_mac.clone()];
    println!("held on the host: {held:?}; given: {own:?}");
    ensure!(own.len() == 3, "{own:?}");
    for (domain, mac) in &own {
        ensure!(
            !held.contains(mac),
            "{domain} got {mac}, which another VM holds"
        );
    }
    let distinct: std::collections::BTreeSet<&String> = own.values().collect();
    ensure!(distinct.len() == 3, "MACs repeat: {own:?}");
    // The next candidate, the same on every run.
    assert_eq!(
        own.get(&names.domain(NodeId::CONTROL_PLANE)),
        names.mac_candidates(NodeId::CONTROL_PLANE).nth(1).as_ref()
    );
    // The worker of the default pool kept its first candidate.
    assert_eq!(
        own.get(&names.domain(NodeId::worker(0))),
        Some(&names.mac(NodeId::worker(0)))
    );
    for node in bc.status.unwrap_or_default().nodes {
        assert_eq!(node.mac.as_ref(), own.get(&node.domain), "{}", node.name);
    }

    f.delete_and_wait("late").await?;
    hv.remove_domain(&other).await?;
    hv.remove_domain(&foreign).await?;
    controller.stop().await;
    Ok(())
}
