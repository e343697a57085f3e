//! vm tier: the controller against real VMs. libvirtd, qemu (software emulation) and
//! dnsmasq run in a network namespace the test creates ([`Sandbox`]); the API server
//! and the controller run inside it too. Leases, seeds and SSH with pinned host keys
//! are real; kubeadm is not exercised (the guest is [`ProbeOnlyGuest`]).
//!
//! One test walks one BenchCluster of 1 control plane + 2 workers through its life,
//! because booting VMs under emulation on two cores is what costs: each step says what
//! it checks and how long it took.
//!
//! Runs only with BENCHCLUSTER_VM_TESTS=1 (root, libvirtd, qemu: `cargo xtask test vm`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vm_support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use benchcluster_controller::guest::ssh::SshGuest;
use benchcluster_controller::guest::{Guest as _, GuestError, GuestNode};
use benchcluster_controller::hypervisor::{DomainState, Hypervisor as _};
use benchcluster_controller::seed::HostKey;
use benchcluster_crd::{BenchCluster, NodeState};
use benchcluster_e2e::sandbox::{IMAGE_POOL, NODE_POOL, Sandbox, SandboxOptions, vm_tests_enabled};
use benchcluster_e2e::wait;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use vm_support::{Bed, POLL, names, ssh_config, virsh, volumes};

/// Name of the BenchCluster.
const NAME: &str = "vm";
const WORKERS: i32 = 2;
/// Three guests booting at once under emulation on two cores reach SSH in about a
/// minute and a half; the bound leaves room for a loaded machine.
const READY_DEADLINE: Duration = Duration::from_secs(600);
/// One guest rebooting from its overlay while two others idle.
const RECREATE_DEADLINE: Duration = Duration::from_secs(300);
const DELETE_DEADLINE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchcluster_of_real_vms_boots_answers_ssh_recovers_and_leaves_nothing() {
    let test = "benchcluster_of_real_vms_boots_answers_ssh_recovers_and_leaves_nothing";
    if !vm_tests_enabled(test) {
        return;
    }
    vm_support::init_tracing();
    let started = Instant::now();
    let sandbox = Sandbox::start(SandboxOptions::default())
        .await
        .unwrap_or_else(|error| panic!("{error:#}"));
    eprintln!(
        "sandbox {} up in {:.1?} ({})",
        sandbox.netns(),
        started.elapsed(),
        sandbox.uri()
    );
    let uri = sandbox.uri();
    let image = sandbox.image_volume().to_owned();
    let state_dir = sandbox.dir().join("controller-ssh");
    let result = sandbox
        .run_inside(move || scenario(uri, image, state_dir))
        .await;
    if let Err(error) = result {
        eprintln!("{}", sandbox.diagnostics());
        let teardown = Instant::now();
        drop(sandbox);
        eprintln!("sandbox torn down in {:.1?}", teardown.elapsed());
        panic!("{error:#}");
    }
    let teardown = Instant::now();
    drop(sandbox);
    eprintln!(
        "sandbox torn down in {:.1?}; whole test {:.1?}",
        teardown.elapsed(),
        started.elapsed()
    );
}

/// Runs inside the sandbox's namespace.
async fn scenario(uri: String, image: String, state_dir: PathBuf) -> anyhow::Result<()> {
    let mut bed = Bed::start(uri, state_dir.clone()).await?;
    let result = steps(&bed, &image, &state_dir).await;
    bed.stop_controller().await;
    if result.is_err() {
        bed.server.dump_logs();
    }
    result
}

async fn steps(bed: &Bed, image: &str, state_dir: &std::path::Path) -> anyhow::Result<()> {
    // 1. 1 + 2 reaches Ready: each VM got a lease on the sandbox network and answered
    //    SSH under its pinned host key with its own hostname and machine-id.
    let step = Instant::now();
    bed.create(NAME, WORKERS, image).await?;
    let bc = bed
        .wait_for(
            "the BenchCluster to be Ready",
            NAME,
            READY_DEADLINE,
            vm_support::is_ready,
        )
        .await?;
    eprintln!("step 1: 1+{WORKERS} Ready in {:.1?}", step.elapsed());
    check_ready_cluster(bed, &bc, image).await?;
    eprintln!("step 1: ok");

    // 2. A host key other than the pinned one is refused.
    let step = Instant::now();
    check_host_key_refusal(bed, &bc, &state_dir.join("impostor-ssh")).await?;
    eprintln!("step 2: wrong host keys refused ({:.1?})", step.elapsed());

    // 3. A worker destroyed and undefined behind the controller's back is recreated and
    //    answers SSH again, under a new pinned host key.
    let step = Instant::now();
    check_recreation(bed, &state_dir.join("checker-ssh")).await?;
    eprintln!(
        "step 3: worker recreated and reachable in {:.1?}",
        step.elapsed()
    );

    // 4. Deleting the BenchCluster leaves no domain, overlay or seed.
    let step = Instant::now();
    check_deletion(bed, &bc).await?;
    eprintln!("step 4: deleted, nothing left, in {:.1?}", step.elapsed());
    Ok(())
}

fn in_sandbox_network(ip: Ipv4Addr) -> bool {
    ip.octets()[..3] == [192, 168, 222]
}

async fn check_ready_cluster(bed: &Bed, bc: &BenchCluster, image: &str) -> anyhow::Result<()> {
    let status = bc.status_or_default();
    ensure!(
        status.nodes.len() == 1 + WORKERS as usize,
        "status has {} nodes: {:?}",
        status.nodes.len(),
        status.nodes
    );
    ensure!(
        status.ready_workers == WORKERS,
        "readyWorkers {}",
        status.ready_workers
    );
    let answers = bed.ctx.guest.answers();
    let mut ips = BTreeSet::new();
    let mut machine_ids = BTreeSet::new();
    for node in &status.nodes {
        let ip: Ipv4Addr = node
            .ip
            .as_deref()
            .with_context(|| format!("{} has no IP in status", node.name))?
            .parse()?;
        ensure!(
            in_sandbox_network(ip),
            "{} has {ip}, outside 192.168.222.0/24",
            node.name
        );
        ensure!(
            node.state == NodeState::Ready && node.ready,
            "{} is {:?}",
            node.name,
            node.state
        );
        let t = &node.timings;
        ensure!(
            t.define_ms.is_some()
                && t.boot_ms.is_some()
                && t.lease_ms.is_some()
                && t.ssh_ms.is_some(),
            "{} lacks phase timings: {t:?}",
            node.name
        );
        let answer = answers
            .get(&node.name)
            .with_context(|| format!("{} never answered over SSH", node.name))?;
        ensure!(
            answer.hostname == node.name,
            "the VM of {} calls itself {:?}",
            node.name,
            answer.hostname
        );
        ensure!(
            answer.ip == ip,
            "{} answered at {}, status says {ip}",
            node.name,
            answer.ip
        );
        ensure!(
            answer.machine_id.len() == 32
                && answer.machine_id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{} has machine-id {:?}",
            node.name,
            answer.machine_id
        );
        eprintln!(
            "  {:<10} {:<15} machine-id {} define {}ms boot {}ms lease {}ms ssh {}ms",
            node.name,
            ip,
            answer.machine_id,
            t.define_ms.unwrap_or_default(),
            t.boot_ms.unwrap_or_default(),
            t.lease_ms.unwrap_or_default(),
            t.ssh_ms.unwrap_or_default(),
        );
        ips.insert(ip);
        machine_ids.insert(answer.machine_id.clone());
    }
    ensure!(ips.len() == status.nodes.len(), "IPs are shared: {ips:?}");
    ensure!(
        machine_ids.len() == status.nodes.len(),
        "machine-ids are shared: {machine_ids:?}"
    );

    // The domains carry owner metadata with a pinned key each, and they run.
    let domains = bed
        .ctx
        .hypervisor
        .list_domains(&bed.domain_prefix(NAME))
        .await?;
    let uid = bc.uid().unwrap_or_default();
    ensure!(domains.len() == status.nodes.len(), "domains: {domains:?}");
    let keys: BTreeSet<_> = domains
        .iter()
        .filter_map(|d| d.owner.host_key.clone())
        .collect();
    ensure!(
        keys.len() == domains.len(),
        "host keys not distinct: {domains:?}"
    );
    for domain in &domains {
        ensure!(
            domain.owner.uid == uid,
            "{} owned by {:?}",
            domain.name,
            domain.owner
        );
        ensure!(
            domain.state == DomainState::Running,
            "{} not running",
            domain.name
        );
    }
    // Each node's disk is a qcow2 overlay backed by the image, not a copy of it.
    let image_path = virsh(&bed.uri, &["vol-path", "--pool", IMAGE_POOL, image])
        .await?
        .trim()
        .to_owned();
    let volumes = volumes(&bed.uri, NODE_POOL).await?;
    let overlays: Vec<&String> = volumes.iter().filter(|v| v.ends_with(".qcow2")).collect();
    ensure!(
        overlays.len() == status.nodes.len() && volumes.len() == 2 * status.nodes.len(),
        "node pool holds {volumes:?}: want an overlay and a seed per node"
    );
    for overlay in overlays {
        let xml = virsh(&bed.uri, &["vol-dumpxml", "--pool", NODE_POOL, overlay]).await?;
        ensure!(
            xml.contains("<backingStore>") && xml.contains(&format!("<path>{image_path}</path>")),
            "{overlay} is not an overlay of {image_path}:\n{xml}"
        );
    }
    Ok(())
}

fn node_of<'a>(
    bc: &'a BenchCluster,
    name: &str,
) -> anyhow::Result<&'a benchcluster_crd::NodeStatus> {
    bc.status
        .as_ref()
        .and_then(|s| s.nodes.iter().find(|n| n.name == name))
        .with_context(|| format!("no node {name} in status"))
}

fn guest_node(bc: &BenchCluster, name: &str, host_key: &str) -> anyhow::Result<GuestNode> {
    let node = node_of(bc, name)?;
    Ok(GuestNode {
        name: node.name.clone(),
        ip: node.ip.as_deref().context("no IP")?.parse()?,
        host_key: host_key.to_owned(),
    })
}

/// Pinned host key of each node, from its domain's owner metadata.
async fn pinned_keys(bed: &Bed) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let prefix = bed.domain_prefix(NAME);
    Ok(bed
        .ctx
        .hypervisor
        .list_domains(&prefix)
        .await?
        .into_iter()
        .filter_map(|d| {
            let node = d
                .name
                .strip_prefix(&bed.namespace)?
                .strip_prefix('-')?
                .to_owned();
            Some((node, d.owner.host_key?))
        })
        .collect())
}

async fn check_host_key_refusal(
    bed: &Bed,
    bc: &BenchCluster,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    // An SshGuest of its own, so the controller's pinned files are never touched.
    let ssh = SshGuest::new(ssh_config(state_dir.to_owned()));
    let keys = pinned_keys(bed).await?;
    let worker = format!("{NAME}-w-0");
    let sibling = format!("{NAME}-w-1");
    let right = keys.get(&worker).context("no pinned key for w-0")?;
    let sibling_key = keys.get(&sibling).context("no pinned key for w-1")?;

    // The pinned key works: a refusal below is the key's doing, nothing else.
    ssh.probe(&guest_node(bc, &worker, right)?, &bed.credentials)
        .await
        .context("probe with the pinned key")?;

    let impostor = HostKey::generate()?.public_openssh;
    for (what, key) in [
        ("a fresh key", impostor.as_str()),
        ("w-1's key", sibling_key),
    ] {
        let node = guest_node(bc, &worker, key)?;
        match ssh.probe(&node, &bed.credentials).await {
            Err(GuestError::HostKeyMismatch { node }) => {
                eprintln!("  {node} pinned to {what}: HostKeyMismatch, nothing run");
            }
            Ok(()) => bail!("{worker} pinned to {what}: the probe ran"),
            Err(other) => bail!("{worker} pinned to {what}: expected HostKeyMismatch, got {other}"),
        }
        match ssh
            .exec(&node, &bed.credentials, &["touch", "/tmp/impostor-ran"])
            .await
        {
            Err(GuestError::HostKeyMismatch { .. }) => {}
            other => bail!("exec on {worker} pinned to {what}: {other:?}"),
        }
    }
    // No command reached the VM through the refused connections.
    let marker = ssh
        .exec(
            &guest_node(bc, &worker, right)?,
            &bed.credentials,
            &["ls", "/tmp"],
        )
        .await?;
    ensure!(
        !marker.contains("impostor-ran"),
        "a refused connection ran a command"
    );
    Ok(())
}

async fn check_recreation(bed: &Bed, state_dir: &std::path::Path) -> anyhow::Result<()> {
    let worker = format!("{NAME}-w-1");
    let domain = format!("{}-{worker}", bed.namespace);
    let before = bed
        .ctx
        .guest
        .answers()
        .get(&worker)
        .cloned()
        .context("w-1 never answered")?;
    let old_key = pinned_keys(bed)
        .await?
        .remove(&worker)
        .context("no pinned key")?;

    // Undefined first (a running domain then lives on as a transient one), destroyed
    // second: destroying first would leave a stopped domain for a moment, which the
    // controller would simply start again.
    virsh(&bed.uri, &["undefine", &domain]).await?;
    virsh(&bed.uri, &["destroy", &domain]).await?;
    let gone = Instant::now();
    eprintln!("  {domain} undefined and destroyed by hand");

    // The controller notices at its next resync, defines the domain anew (a fresh seed
    // and host key, the same overlay) and starts it.
    let new_key = wait::until(
        "the controller to redefine and start w-1 with a new host key",
        RECREATE_DEADLINE,
        POLL,
        || async {
            let domains = bed.ctx.hypervisor.list_domains(&domain).await?;
            Ok::<_, anyhow::Error>(domains.into_iter().find_map(|d| {
                let key = d.owner.host_key?;
                (d.name == domain && d.state == DomainState::Running && key != old_key)
                    .then_some(key)
            }))
        },
    )
    .await?;
    eprintln!("  {domain} running again after {:.1?}", gone.elapsed());

    let recovered = bed
        .wait_for(
            "w-1 back in status with an address",
            NAME,
            RECREATE_DEADLINE,
            |bc| {
                node_of(bc, &worker).is_ok_and(|n| n.ip.is_some() && n.state == NodeState::Ready)
                    && vm_support::is_ready(bc)
            },
        )
        .await?;

    eprintln!(
        "  {worker} in status again: {:?}",
        node_of(&recovered, &worker)?.timings
    );

    // Reachable again: SSH under the newly pinned key answers with the node's name.
    let ssh = SshGuest::new(ssh_config(state_dir.to_owned()));
    let node = guest_node(&recovered, &worker, &new_key)?;
    let credentials = bed.credentials.clone();
    let hostname = wait::until(
        "the recreated w-1 to answer SSH under its new key",
        RECREATE_DEADLINE,
        Duration::from_secs(1),
        || async {
            match ssh.exec(&node, &credentials, &["hostname"]).await {
                Ok(out) => Ok(Some(out.trim().to_owned())),
                Err(GuestError::Unreachable { .. } | GuestError::Timeout { .. }) => Ok(None),
                Err(other) => Err(anyhow::Error::from(other)),
            }
        },
    )
    .await?;
    ensure!(
        hostname == worker,
        "the recreated VM calls itself {hostname:?}"
    );
    let machine_id = ssh
        .exec(&node, &credentials, &["cat", "/etc/machine-id"])
        .await?;
    eprintln!(
        "  {worker} answered SSH {:.1?} after the domain vanished; machine-id {} ({} the \
         overlay's first boot)",
        gone.elapsed(),
        machine_id.trim(),
        if machine_id.trim() == before.machine_id {
            "kept from"
        } else {
            "changed since"
        }
    );
    // The old pinned key no longer opens the recreated VM.
    let stale = GuestNode {
        host_key: old_key,
        ..node
    };
    ensure!(
        matches!(
            ssh.probe(&stale, &credentials).await,
            Err(GuestError::HostKeyMismatch { .. })
        ),
        "the previous incarnation's host key still opens w-1"
    );
    Ok(())
}

async fn check_deletion(bed: &Bed, bc: &BenchCluster) -> anyhow::Result<()> {
    let prefix = bed.domain_prefix(NAME);
    bed.api.delete(NAME, &DeleteParams::default()).await?;
    wait::until(
        "the BenchCluster to be gone",
        DELETE_DEADLINE,
        POLL,
        || async { Ok::<_, anyhow::Error>(bed.api.get_opt(NAME).await?.is_none().then_some(())) },
    )
    .await?;

    let domains: Vec<String> = names(&virsh(&bed.uri, &["list", "--all", "--name"]).await?)
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(domains.is_empty(), "domains left: {domains:?}");
    let left = volumes(&bed.uri, NODE_POOL).await?;
    ensure!(left.is_empty(), "volumes left in {NODE_POOL}: {left:?}");
    let images = volumes(&bed.uri, IMAGE_POOL).await?;
    ensure!(images.len() == 1, "the image pool changed: {images:?}");
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), &bed.namespace);
    let kubeconfig = format!("{}-kubeconfig", bc.name_any());
    ensure!(
        secrets.get_opt(&kubeconfig).await?.is_none(),
        "{kubeconfig} left behind"
    );
    Ok(())
}
