//! vm tier: the controller against real VMs. libvirtd, qemu (software emulation) and
//! dnsmasq run in a network namespace the test creates ([`Sandbox`]); the API server
//! and the controller run inside it too. Leases, seeds and SSH with pinned host keys
//! are real; kubeadm is not exercised (the guest is [`ProbeOnlyGuest`]).
//!
//! One test walks one BenchCluster of 1 control plane + 2 workers through its life,
//! because booting VMs under emulation on two cores is what costs: each step says what
//! it checks and how long it took. Its first provisioning also shows two of
//! RELIABILITY.md's scenarios on these real components: a lease database full of
//! stale leases for other MACs (10), and libvirtd killed and restarted while the
//! cluster provisions (8).
//!
//! Runs only with BENCHCLUSTER_VM_TESTS=1 (root, libvirtd, qemu: `cargo xtask test vm`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vm_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use benchcluster_controller::guest::ssh::SshGuest;
use benchcluster_controller::guest::{Guest as _, GuestError, GuestNode};
use benchcluster_controller::hypervisor::{DomainState, Hypervisor as _, xml};
use benchcluster_controller::names::{ClusterNames, NodeId, Seed};
use benchcluster_controller::seed::{HostKey, key_tag};
use benchcluster_crd::{BenchCluster, NodeState};
use benchcluster_e2e::sandbox::{
    DHCP_RANGE, IMAGE_POOL, NODE_POOL, Sandbox, SandboxOptions, StatusLease, unix_now,
    vm_tests_enabled,
};
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
/// How often the outage step looks, so its times are good to a tenth of a second.
const FAST_POLL: Duration = Duration::from_millis(100);
/// Bound on each wait of the outage step (a readiness probe, a failed pass, a restart).
const OUTAGE_DEADLINE: Duration = Duration::from_secs(60);
/// How long the stale leases planted for scenario 10 stay valid: beyond the test.
const STALE_LEASE_SECONDS: i64 = 3600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchcluster_of_real_vms_boots_answers_ssh_recovers_and_leaves_nothing() {
    let test = "benchcluster_of_real_vms_boots_answers_ssh_recovers_and_leaves_nothing";
    if !vm_tests_enabled(test) {
        return;
    }
    vm_support::init_tracing();
    let started = Instant::now();
    let sandbox = Arc::new(
        Sandbox::start(SandboxOptions::default())
            .await
            .unwrap_or_else(|error| panic!("{error:#}")),
    );
    eprintln!(
        "sandbox {} up in {:.1?} ({})",
        sandbox.netns(),
        started.elapsed(),
        sandbox.uri()
    );
    let image = sandbox.image_volume().to_owned();
    let inside = Arc::clone(&sandbox);
    let result = sandbox.run_inside(move || scenario(inside, image)).await;
    // The clone moved inside is gone with the thread that ran it: this is the last.
    let sandbox = Arc::into_inner(sandbox).expect("the sandbox is no longer shared");
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
async fn scenario(sandbox: Arc<Sandbox>, image: String) -> anyhow::Result<()> {
    let state_dir = sandbox.dir().join("controller-ssh");
    let mut bed = Bed::start(sandbox.uri(), state_dir.clone()).await?;
    let result = steps(&bed, &sandbox, &image, &state_dir).await;
    bed.stop_controller().await;
    if result.is_err() {
        bed.server.dump_logs();
    }
    result
}

async fn steps(
    bed: &Bed,
    sandbox: &Arc<Sandbox>,
    image: &str,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    // 1. 1 + 2 reaches Ready: each VM got a lease on the sandbox network and answered
    //    SSH under its pinned host key with its own hostname and machine-id. On the way:
    //    - scenario 10: before any VM asks for an address, every address dnsmasq may
    //      hand out carries stale, unexpired leases for other MACs under the VMs' own
    //      hostnames, and each VM's own MAC has an expired lease elsewhere; the status
    //      never shows an address only such a lease claims;
    //    - scenario 8: libvirtd is SIGKILLed as soon as the first domain is defined,
    //      and again once every domain runs; /readyz fails while it is down, and after
    //      each restart readiness returns, provisioning resumes, and in the end exactly
    //      the desired domains and volumes exist.
    let step = Instant::now();
    let created = bed.create(NAME, WORKERS, image).await?;
    let created_at = Instant::now();
    let cluster = ClusterNames {
        namespace: bed.namespace.clone(),
        name: NAME.to_owned(),
        uid: created
            .uid()
            .context("the created BenchCluster has no UID")?,
    };
    let trap = plant_stale_leases(sandbox, &cluster)?;
    eprintln!(
        "step 1: {} stale leases for other MACs on the {} addresses of the DHCP range, {} \
         expired ones for the VMs' own MACs, written {:.1?} after the create returned \
         ({:.1?} after it was sent)",
        trap.stale.len(),
        range().count(),
        trap.expired.len(),
        created_at.elapsed(),
        step.elapsed()
    );
    let watch = LeaseWatch::start(bed.api.clone(), Arc::clone(sandbox), &cluster);
    let outages = crash_libvirtd_while_provisioning(bed, sandbox).await?;
    let restarted = Instant::now();
    let bc = bed
        .wait_for(
            "the BenchCluster to be Ready",
            NAME,
            READY_DEADLINE,
            vm_support::is_ready,
        )
        .await?;
    let watched = watch.stop().await?;
    eprintln!(
        "step 1: 1+{WORKERS} Ready in {:.1?}, {:.1?} after libvirtd's last restart",
        step.elapsed(),
        restarted.elapsed()
    );
    check_ready_cluster(bed, &bc, image).await?;
    check_exact_inventory(bed, &cluster).await?;
    check_outage_recovery(bed, sandbox, &outages).await?;
    check_leases(bed, sandbox, &bc, &cluster, &trap, &watched, state_dir).await?;
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

/// The desired nodes of the BenchCluster, in order.
fn desired_nodes() -> Vec<NodeId> {
    std::iter::once(NodeId::CONTROL_PLANE)
        .chain((0..WORKERS as u32).map(NodeId::worker))
        .collect()
}

/// Every address of the sandbox network's DHCP range.
fn range() -> impl Iterator<Item = Ipv4Addr> {
    let (first, last) = DHCP_RANGE;
    (u32::from(first)..=u32::from(last)).map(Ipv4Addr::from)
}

/// What scenario 10 planted in libvirt's lease database.
struct Trap {
    /// Unexpired leases for MACs no VM has, one per node hostname on each address of
    /// the DHCP range.
    stale: Vec<StatusLease>,
    /// One expired lease per VM for its own MAC, outside the range.
    expired: Vec<StatusLease>,
}

/// Writes the stale leases of scenario 10 into libvirt's lease database, right after
/// the BenchCluster was created: its VMs boot for many seconds before their first
/// DHCP message, so no lease event of dnsmasq's helper races this write (and the
/// database is checked to be empty still).
fn plant_stale_leases(sandbox: &Sandbox, cluster: &ClusterNames) -> anyhow::Result<Trap> {
    let before = sandbox.dhcp_status()?;
    ensure!(
        before.is_empty(),
        "the lease database has entries before any VM could ask for one: {before:?}"
    );
    let own: BTreeSet<String> = desired_nodes().iter().map(|&n| cluster.mac(n)).collect();
    let now = unix_now();
    let mut stale = Vec::new();
    for (i, ip) in range().enumerate() {
        for (k, &node) in desired_nodes().iter().enumerate() {
            // In QEMU's range like the VMs' own, and never one of theirs.
            let mac = (0x5e..=0xff)
                .map(|tag: u32| format!("52:54:00:{tag:02x}:{k:02x}:{i:02x}"))
                .find(|mac| !own.contains(mac))
                .context("no free MAC")?;
            stale.push(StatusLease {
                mac,
                ip,
                hostname: Some(cluster.node(node)),
                expiry_unix: now + STALE_LEASE_SECONDS,
            });
        }
    }
    let expired: Vec<StatusLease> = desired_nodes()
        .iter()
        .zip(50u8..)
        .map(|(&node, last)| StatusLease {
            mac: cluster.mac(node),
            ip: Ipv4Addr::new(192, 168, 222, last),
            hostname: Some(cluster.node(node)),
            expiry_unix: now - 600,
        })
        .collect();
    let all: Vec<StatusLease> = stale.iter().chain(&expired).cloned().collect();
    sandbox.append_dhcp_status(&all)?;
    let written = sandbox.dhcp_status()?;
    ensure!(
        written == all,
        "the lease database holds {} entries after the write, not the {} written",
        written.len(),
        all.len()
    );
    Ok(Trap { stale, expired })
}

/// What [`LeaseWatch`] saw while the cluster provisioned.
#[derive(Debug, Default)]
struct Watched {
    polls: u32,
    /// Node addresses in status checked against the lease database.
    samples: u32,
    /// The first address status showed for each node.
    first_ips: BTreeMap<String, Ipv4Addr>,
    /// Status addresses no unexpired lease for the node's own MAC claimed.
    violations: Vec<String>,
}

/// Polls the status and then libvirt's lease database, and records every node address
/// in status that no unexpired lease for the node's own MAC holds. Status first: a
/// VM's own lease, once there, stays for the test (an hour's lease), so a lease that
/// justified the status is still in the database when it is read.
struct LeaseWatch {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Watched>,
}

impl LeaseWatch {
    fn start(api: Api<BenchCluster>, sandbox: Arc<Sandbox>, cluster: &ClusterNames) -> Self {
        let macs: BTreeMap<String, String> = desired_nodes()
            .iter()
            .map(|&n| (cluster.node(n), cluster.mac(n)))
            .collect();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut watched = Watched::default();
            loop {
                watched.polls += 1;
                if let Ok(bc) = api.get(NAME).await
                    && let Ok(leases) = sandbox.dhcp_status()
                {
                    let now = unix_now();
                    for node in bc.status_or_default().nodes {
                        let Some(ip) = node.ip.as_deref().and_then(|ip| ip.parse().ok()) else {
                            continue;
                        };
                        watched.samples += 1;
                        watched.first_ips.entry(node.name.clone()).or_insert(ip);
                        let Some(mac) = macs.get(&node.name) else {
                            watched
                                .violations
                                .push(format!("{} is no desired node", node.name));
                            continue;
                        };
                        let own = leases
                            .iter()
                            .any(|l| &l.mac == mac && l.ip == ip && l.valid_at(now));
                        if !own {
                            let there: Vec<&StatusLease> =
                                leases.iter().filter(|l| l.ip == ip).collect();
                            watched.violations.push(format!(
                                "status shows {} at {ip}, which no valid lease for {mac} \
                                 holds; leases there: {there:?}",
                                node.name
                            ));
                        }
                    }
                }
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
            watched
        });
        Self { stop, task }
    }

    async fn stop(self) -> anyhow::Result<Watched> {
        let _ = self.stop.send(());
        Ok(self.task.await?)
    }
}

/// What one libvirtd outage found when it began.
struct Outage {
    /// When libvirtd was killed.
    when: &'static str,
    /// The BenchCluster's domains defined then, with their UUIDs.
    uuids: BTreeMap<String, String>,
    /// qemu's pid of each of those domains that was running then.
    qemu_pids: BTreeMap<String, i32>,
    dnsmasq_pid: Option<i32>,
}

/// The pid of a running domain's qemu, from libvirt's state directory.
fn qemu_pid(sandbox: &Sandbox, domain: &str) -> Option<i32> {
    let path = sandbox
        .dir()
        .join("state/run/qemu")
        .join(format!("{domain}.pid"));
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// `benchcluster_reconcile_failures_total{error="hypervisor"}` of the controller.
fn hypervisor_failures(bed: &Bed) -> anyhow::Result<f64> {
    let text = bed.ctx.metrics.encode()?;
    Ok(text
        .lines()
        .find_map(|l| {
            l.strip_prefix("benchcluster_reconcile_failures_total{error=\"hypervisor\"} ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0))
}

/// The BenchCluster's domains that exist now (by name).
async fn defined_domains(bed: &Bed) -> anyhow::Result<Vec<String>> {
    let prefix = bed.domain_prefix(NAME);
    Ok(names(&virsh(&bed.uri, &["list", "--all", "--name"]).await?)
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

/// Scenario 8, twice while the BenchCluster provisions: libvirtd killed as soon as
/// the first domain is defined (the controller is creating and starting domains, and
/// its calls in flight die with libvirtd), and again once the controller has seen
/// every domain run (it is waiting for leases and SSH).
async fn crash_libvirtd_while_provisioning(
    bed: &Bed,
    sandbox: &Sandbox,
) -> anyhow::Result<Vec<Outage>> {
    let (code, body) = bed.http_get("/readyz").await?;
    ensure!(code == 200, "/readyz before the outage: {code}\n{body}");
    wait::until(
        "the first domain of the BenchCluster to be defined",
        READY_DEADLINE,
        FAST_POLL,
        || async { anyhow::Ok((!defined_domains(bed).await?.is_empty()).then_some(())) },
    )
    .await?;
    let first = kill_and_restart_libvirtd(bed, sandbox, "the first domain defined").await?;

    wait::until(
        "the controller to see every domain run",
        READY_DEADLINE,
        POLL,
        || async {
            let bc = bed.api.get(NAME).await?;
            let nodes = bc.status_or_default().nodes;
            let booted = nodes.len() == desired_nodes().len()
                && nodes
                    .iter()
                    .all(|n| !matches!(n.state, NodeState::Creating | NodeState::Stopped));
            anyhow::Ok(booted.then_some(()))
        },
    )
    .await?;
    let second = kill_and_restart_libvirtd(bed, sandbox, "every domain running").await?;
    ensure!(
        second.qemu_pids.len() == desired_nodes().len(),
        "the controller saw every domain run, yet qemu runs for {:?} only",
        second.qemu_pids
    );
    Ok(vec![first, second])
}

/// SIGKILLs libvirtd; shows /readyz failing on libvirt and the controller's passes
/// failing on the hypervisor (retried, the controller running on) while it is down;
/// restarts it and shows /readyz passing again.
async fn kill_and_restart_libvirtd(
    bed: &Bed,
    sandbox: &Sandbox,
    when: &'static str,
) -> anyhow::Result<Outage> {
    let mut uuids = BTreeMap::new();
    for domain in defined_domains(bed).await? {
        let uuid = virsh(&bed.uri, &["domuuid", &domain]).await?;
        uuids.insert(domain, uuid.trim().to_owned());
    }
    let qemu_pids: BTreeMap<String, i32> = uuids
        .keys()
        .filter_map(|d| Some((d.clone(), qemu_pid(sandbox, d)?)))
        .collect();
    let dnsmasq_pid = sandbox.dnsmasq_pid();
    let bc = bed.api.get(NAME).await?;
    ensure!(
        !vm_support::is_ready(&bc),
        "already Ready before the outage: {}",
        vm_support::summary(&bc)
    );
    let failures_before = hypervisor_failures(bed)?;

    let killed = Instant::now();
    let pid = sandbox.kill_libvirtd().await?;
    eprintln!(
        "  outage with {when}: libvirtd {pid} SIGKILLed, {} of {} domains defined, qemu \
         running for {}; status: {}",
        uuids.len(),
        desired_nodes().len(),
        qemu_pids.len(),
        vm_support::summary(&bc)
    );
    let unreachable = virsh(&bed.uri, &["version"]).await;
    ensure!(
        unreachable.is_err(),
        "virsh still reaches libvirtd: {unreachable:?}"
    );
    let failing = wait::until(
        "/readyz to fail on libvirt",
        OUTAGE_DEADLINE,
        FAST_POLL,
        || async {
            let (code, body) = bed.http_get("/readyz").await?;
            anyhow::Ok((code == 503 && body.contains("[-]libvirt failed")).then_some(body))
        },
    )
    .await?;
    let readyz_failed_after = killed.elapsed();
    // Not one failed pass: the controller retries (with its backoff) while it is down.
    const FAILED_PASSES: f64 = 3.0;
    wait::until(
        "three reconcile passes to fail on the hypervisor",
        OUTAGE_DEADLINE,
        FAST_POLL,
        || async {
            anyhow::Ok((hypervisor_failures(bed)? >= failures_before + FAILED_PASSES).then_some(()))
        },
    )
    .await?;
    let failed_after = killed.elapsed();
    ensure!(
        bed.controller_running(),
        "the controller stopped while libvirtd was down"
    );
    let (code, body) = bed.http_get("/readyz").await?;
    ensure!(
        code == 503,
        "/readyz passed while libvirtd was down: {code}\n{body}"
    );
    let line = failing
        .lines()
        .find(|l| l.contains("[-]libvirt"))
        .unwrap_or_default()
        .to_owned();

    let restart = Instant::now();
    sandbox.restart_libvirtd().await?;
    let answered = restart.elapsed();
    let down = killed.elapsed();
    wait::until(
        "/readyz to pass again",
        OUTAGE_DEADLINE,
        FAST_POLL,
        || async {
            let (code, _) = bed.http_get("/readyz").await?;
            anyhow::Ok((code == 200).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "  /readyz 503 {readyz_failed_after:.1?} after the kill ({line}); \
         {FAILED_PASSES} passes failed on the hypervisor {failed_after:.1?} after it; \
         restarted libvirtd answered {answered:.1?} after its start (unreachable \
         {down:.1?} in all); /readyz 200 {:.1?} after the restart; {} hypervisor \
         failures counted",
        restart.elapsed(),
        hypervisor_failures(bed)? - failures_before
    );
    Ok(Outage {
        when,
        uuids,
        qemu_pids,
        dnsmasq_pid,
    })
}

/// Exactly the desired domains and volumes exist, under their deterministic names.
async fn check_exact_inventory(bed: &Bed, cluster: &ClusterNames) -> anyhow::Result<()> {
    let want_domains: BTreeSet<String> =
        desired_nodes().iter().map(|&n| cluster.domain(n)).collect();
    let domains: BTreeSet<String> = names(&virsh(&bed.uri, &["list", "--all", "--name"]).await?)
        .into_iter()
        .filter(|n| n.starts_with(&cluster.domain_prefix()))
        .collect();
    ensure!(
        domains == want_domains,
        "domains {domains:?}, want {want_domains:?}"
    );
    // Each node's overlay and the seed its domain boots from: the one named by the host
    // key pinned in its metadata, and the one its XML references.
    let mut want_volumes = BTreeSet::new();
    for &n in &desired_nodes() {
        let text = virsh(&bed.uri, &["dumpxml", &cluster.domain(n)]).await?;
        let domain = xml::parse_domain(&text)?;
        let tag = domain
            .owner
            .and_then(|o| o.host_key)
            .as_deref()
            .and_then(key_tag)
            .with_context(|| format!("{} pins no host key", cluster.domain(n)))?;
        let booted = [
            cluster.disk_volume(n),
            cluster.seed_volume(n, &Seed::Keyed(tag)),
        ];
        let referenced: BTreeSet<String> = domain.disks.into_iter().map(|d| d.volume).collect();
        ensure!(
            referenced == BTreeSet::from(booted.clone()),
            "{} references {referenced:?}, want {booted:?}",
            cluster.domain(n)
        );
        want_volumes.extend(booted);
    }
    let volumes: BTreeSet<String> = volumes(&bed.uri, NODE_POOL).await?.into_iter().collect();
    ensure!(
        volumes == want_volumes,
        "volumes {volumes:?}, want {want_volumes:?}"
    );
    eprintln!(
        "  {} domains and {} volumes, exactly the desired ones",
        domains.len(),
        volumes.len()
    );
    Ok(())
}

/// After the outages: every domain defined before one is the same one (never
/// redefined) and runs; a domain that had fully started before the last outage kept
/// its qemu process (libvirtd re-attached to it). A start that libvirtd's death
/// interrupted may have been undone by libvirtd on its restart (then the controller
/// started the domain again): counted, not failed.
async fn check_outage_recovery(
    bed: &Bed,
    sandbox: &Sandbox,
    outages: &[Outage],
) -> anyhow::Result<()> {
    for (i, outage) in outages.iter().enumerate() {
        for (domain, before) in &outage.uuids {
            let after = virsh(&bed.uri, &["domuuid", domain]).await?;
            ensure!(
                after.trim() == before,
                "{domain} was redefined: UUID {before} before the outage with {}, {} after",
                outage.when,
                after.trim()
            );
        }
        let mut kept = 0;
        for (domain, before) in &outage.qemu_pids {
            let after = qemu_pid(sandbox, domain);
            if after == Some(*before) {
                kept += 1;
            } else {
                ensure!(
                    i + 1 < outages.len(),
                    "{domain}'s qemu was {before} before the outage with {}, {after:?} after",
                    outage.when
                );
            }
        }
        eprintln!(
            "  outage with {}: the {} domains defined kept their UUIDs; {kept} of the {} \
             with a qemu kept it; dnsmasq {:?} before it, {:?} now",
            outage.when,
            outage.uuids.len(),
            outage.qemu_pids.len(),
            outage.dnsmasq_pid,
            sandbox.dnsmasq_pid()
        );
    }
    Ok(())
}

/// The addresses a guest reports for itself (`ip -4 -o addr show scope global`).
fn guest_addresses(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Scenario 10 after Ready: every address in status is the VM's own lease, which
/// replaced the stale ones on it, the VM itself reports that address, and SSH with its
/// pinned host key worked there; libvirt still reports the stale leases elsewhere.
async fn check_leases(
    bed: &Bed,
    sandbox: &Sandbox,
    bc: &BenchCluster,
    cluster: &ClusterNames,
    trap: &Trap,
    watched: &Watched,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    ensure!(
        watched.violations.is_empty(),
        "status showed addresses only stale leases claimed:\n{}",
        watched.violations.join("\n")
    );
    let keys = pinned_keys(bed).await?;
    let ssh = SshGuest::new(ssh_config(state_dir.join("addr-ssh")));
    let answers = bed.ctx.guest.answers();
    let now = unix_now();
    let leases = sandbox.dhcp_status()?;
    let mut vm_ips = BTreeSet::new();
    for &id in &desired_nodes() {
        let name = cluster.node(id);
        let mac = cluster.mac(id);
        let node = node_of(bc, &name)?;
        ensure!(
            node.mac.as_deref() == Some(mac.as_str()),
            "{name} has MAC {:?} in status",
            node.mac
        );
        let ip: Ipv4Addr = node.ip.as_deref().context("no IP")?.parse()?;
        ensure!(
            range().any(|a| a == ip),
            "{name} has {ip}, outside the DHCP range where the stale leases sit"
        );
        ensure!(
            watched.first_ips.get(&name) == Some(&ip),
            "status first showed {name} at {:?}, now at {ip}",
            watched.first_ips.get(&name)
        );
        // libvirt's own MAC filter finds exactly that lease (the expired one is gone).
        let own = sandbox.leases_of(&mac).await?;
        ensure!(
            own.len() == 1 && own[0].ip == ip,
            "libvirt's leases for {mac}: {own:?}, status says {ip}"
        );
        // In the database, the VM's lease replaced the stale ones on its address.
        let there: Vec<&StatusLease> = leases.iter().filter(|l| l.ip == ip).collect();
        ensure!(
            there.len() == 1 && there[0].mac == mac && there[0].valid_at(now),
            "the lease database holds at {ip}: {there:?}"
        );
        // The controller's SSH answered there under the pinned key...
        let pinned = keys.get(&name).context("no pinned key")?;
        let answer = answers.get(&name).context("never answered")?;
        ensure!(
            answer.ip == ip && &answer.host_key == pinned,
            "{name} answered at {} under {}, status says {ip}, pinned {pinned}",
            answer.ip,
            answer.host_key
        );
        // ...and the VM itself, asked over SSH with that key, has that address.
        let reported = ssh
            .exec(
                &guest_node(bc, &name, pinned)?,
                &bed.credentials,
                &["ip", "-4", "-o", "addr", "show", "scope", "global"],
            )
            .await?;
        let own_addresses = guest_addresses(&reported);
        ensure!(
            own_addresses == [ip],
            "{name} reports {own_addresses:?} ({reported:?}), status says {ip}"
        );
        vm_ips.insert(ip);
    }
    ensure!(
        vm_ips.len() == desired_nodes().len(),
        "shared IPs: {vm_ips:?}"
    );

    // The stale leases on the VMs' addresses went (libvirt's helper drops every entry
    // on the address of a lease it records); all the others are still there and
    // libvirt still reports them, valid, under the VMs' hostnames.
    let replaced = trap.stale.iter().filter(|l| vm_ips.contains(&l.ip)).count();
    let kept: Vec<&StatusLease> = trap
        .stale
        .iter()
        .filter(|l| !vm_ips.contains(&l.ip))
        .collect();
    let remaining = leases.iter().filter(|l| trap.stale.contains(l)).count();
    ensure!(
        remaining == kept.len() && kept.iter().all(|l| leases.contains(l)),
        "{remaining} stale leases remain, want the {} not on the VMs' addresses",
        kept.len()
    );
    let listed: BTreeSet<(String, Ipv4Addr)> = sandbox
        .leases()
        .await?
        .into_iter()
        .map(|l| (l.mac, l.ip))
        .collect();
    let unlisted = kept
        .iter()
        .filter(|l| !listed.contains(&(l.mac.clone(), l.ip)))
        .count();
    ensure!(
        unlisted == 0,
        "libvirt does not report {unlisted} of the {} stale leases left",
        kept.len()
    );
    let expired_left = leases.iter().filter(|l| trap.expired.contains(l)).count();
    eprintln!(
        "  {} status polls, {} node addresses checked, 0 taken from a stale lease; \
         {replaced} stale leases replaced by the VMs' own at {vm_ips:?}, {} left and \
         reported by libvirt; {expired_left} of {} expired own-MAC leases left in the \
         database, none reported",
        watched.polls,
        watched.samples,
        kept.len(),
        trap.expired.len()
    );
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
        .inventory(&[])
        .await?
        .domains_with_prefix(&bed.domain_prefix(NAME));
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
        .inventory(&[])
        .await?
        .domains_with_prefix(&prefix)
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
            let domains = bed
                .ctx
                .hypervisor
                .inventory(&[])
                .await?
                .domains_with_prefix(&domain);
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
