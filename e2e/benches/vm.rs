//! Benchmark of the vm tier's real VMs. Not a test: it prints figures, measured side
//! by side in one run, in the sandbox of the vm tier (libvirtd, qemu under software
//! emulation, dnsmasq, all in a network namespace of its own).
//!
//! `cargo xtask bench` (or, as root, `BENCHCLUSTER_VM_TESTS=1 cargo bench -p
//! benchcluster-e2e --bench vm`) prints:
//! - for a 1+2 BenchCluster, the time from apply to each VM's first SSH command, split
//!   by the phases the controller records in `status.nodes[].timings`: define (overlay,
//!   seed, domain), boot (the start call), lease (start to an unexpired lease for the
//!   VM's MAC), ssh (lease to the first command over SSH with the pinned key);
//! - the time to create a node disk as a qcow2 overlay of the image, against a full
//!   copy of the image (`virsh vol-clone`, `cp` from the page cache, and `dd` with
//!   O_DIRECT as an uncached copy costs), each repeated, medians shown.
//!
//! Skipped, with a message, unless BENCHCLUSTER_VM_TESTS=1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/vm_support/mod.rs"]
mod vm_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use benchcluster_controller::hypervisor::{Hypervisor as _, OverlaySpec};
use benchcluster_crd::BenchCluster;
use benchcluster_e2e::sandbox::{IMAGE_POOL, NODE_POOL, Sandbox, SandboxOptions, vm_tests_enabled};
use benchcluster_e2e::wait;
use kube::api::DeleteParams;
use vm_support::{Bed, POLL, virsh};

const NAME: &str = "bench";
const WORKERS: i32 = 2;
const SSH_DEADLINE: Duration = Duration::from_secs(600);
const DELETE_DEADLINE: Duration = Duration::from_secs(180);
/// Repetitions of each disk creation method.
const OVERLAYS: usize = 9;
const COPIES: usize = 3;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !vm_tests_enabled("the vm benchmark") {
        return Ok(());
    }
    vm_support::init_tracing();
    let started = Instant::now();
    let sandbox = Sandbox::start(SandboxOptions::default()).await?;
    eprintln!(
        "sandbox {} up in {:.1?}",
        sandbox.netns(),
        started.elapsed()
    );
    let uri = sandbox.uri();
    let image = sandbox.image_volume().to_owned();
    let state_dir = sandbox.dir().join("controller-ssh");
    let scratch = sandbox.dir().to_owned();
    let result = sandbox
        .run_inside(move || async move {
            let mut bed = Bed::start(uri, state_dir).await?;
            let result = async {
                phases(&bed, &image).await?;
                disks(&bed, &image, &scratch).await
            }
            .await;
            bed.stop_controller().await;
            result
        })
        .await;
    if result.is_err() {
        eprintln!("{}", sandbox.diagnostics());
    }
    drop(sandbox);
    result
}

/// Applies a 1+2 BenchCluster and reports, per VM, the phases up to its first SSH
/// command, from the controller's own status.
async fn phases(bed: &Bed, image: &str) -> Result<()> {
    let applied = Instant::now();
    bed.create(NAME, WORKERS, image).await?;
    // When each node's sshMs first shows up in status, from apply (status is polled
    // every POLL, so this is late by up to POLL plus the status write).
    let seen: Mutex<BTreeMap<String, Duration>> = Mutex::new(BTreeMap::new());
    let seen_ref = &seen;
    let bc: BenchCluster = wait::until(
        "every VM's first SSH command",
        SSH_DEADLINE,
        Duration::from_millis(200),
        move || {
            let api = bed.api.clone();
            async move {
                let bc = api.get(NAME).await?;
                let mut seen = seen_ref.lock().unwrap_or_else(PoisonError::into_inner);
                let nodes = bc.status_or_default().nodes;
                for node in &nodes {
                    if node.timings.ssh_ms.is_some() {
                        seen.entry(node.name.clone())
                            .or_insert_with(|| applied.elapsed());
                    }
                }
                let done = nodes.len() == 1 + WORKERS as usize
                    && nodes.iter().all(|n| n.timings.ssh_ms.is_some());
                Ok::<_, anyhow::Error>(done.then_some(bc))
            }
        },
    )
    .await?;
    let seen = seen.into_inner().unwrap_or_else(PoisonError::into_inner);
    let status = bc.status_or_default();

    println!();
    println!("vm: 1+{WORKERS} BenchCluster, time from apply to each VM's first SSH command");
    println!(
        "  (qemu TCG on {} host cores; control plane {} vCPUs and {}, workers 1 vCPU and {}; \
         controller polls every {:?})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        vm_support::CONTROL_PLANE_CPUS,
        vm_support::CONTROL_PLANE_MEMORY,
        vm_support::MEMORY,
        vm_support::settings().poll_interval,
    );
    println!(
        "  {:<12} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>15}",
        "node", "define", "boot", "lease", "ssh", "sum", "apply->ssh seen"
    );
    let ms = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{v} ms"));
    for node in &status.nodes {
        let t = &node.timings;
        let sum: u64 = [t.define_ms, t.boot_ms, t.lease_ms, t.ssh_ms]
            .iter()
            .map(|v| v.unwrap_or_default())
            .sum();
        println!(
            "  {:<12} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>15}",
            node.name,
            ms(t.define_ms),
            ms(t.boot_ms),
            ms(t.lease_ms),
            ms(t.ssh_ms),
            ms(Some(sum)),
            seen.get(&node.name)
                .map_or("-".to_owned(), |d| format!("{} ms", d.as_millis())),
        );
    }
    // Seen in the status, at the controller's poll: workers are probed as soon as they
    // have an address (their SSH time is their own), not when they are about to join.
    println!(
        "  apply -> all VMs answered SSH (seen in the status): {:.1?}",
        seen.values().max().copied().unwrap_or_default()
    );

    bed.api.delete(NAME, &DeleteParams::default()).await?;
    let deleting = Instant::now();
    wait::until(
        "the BenchCluster to be deleted",
        DELETE_DEADLINE,
        POLL,
        || async { Ok::<_, anyhow::Error>(bed.api.get_opt(NAME).await?.is_none().then_some(())) },
    )
    .await?;
    println!(
        "  delete -> gone (3 VMs, 6 volumes): {:.1?}",
        deleting.elapsed()
    );
    Ok(())
}

/// Overlay creation against a full copy of the image, side by side, no VM running.
async fn disks(bed: &Bed, image: &str, scratch: &std::path::Path) -> Result<()> {
    let image_path = PathBuf::from(
        virsh(&bed.uri, &["vol-path", "--pool", IMAGE_POOL, image])
            .await?
            .trim(),
    );
    let image_bytes = std::fs::metadata(&image_path)?.len();
    let capacity = virsh(
        &bed.uri,
        &["vol-info", "--pool", IMAGE_POOL, image, "--bytes"],
    )
    .await?;
    let capacity = capacity
        .lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no capacity in vol-info")?
        .to_owned();
    // Warm the page cache, so copies read memory as the overlays do: what is compared
    // is the method, not the disk.
    std::fs::read(&image_path)?;

    let mut controller_overlay = Vec::new();
    let mut virsh_overlay = Vec::new();
    for i in 0..OVERLAYS {
        let name = format!("bench-overlay-{i}.qcow2");
        let start = Instant::now();
        bed.ctx
            .hypervisor
            .create_overlay(&OverlaySpec {
                name: name.clone(),
                base_image: image.to_owned(),
                capacity_bytes: 4 << 30,
            })
            .await?;
        controller_overlay.push(start.elapsed());
        bed.ctx.hypervisor.delete_volume(&name).await?;

        let name = format!("bench-virsh-overlay-{i}.qcow2");
        let start = Instant::now();
        virsh(
            &bed.uri,
            &[
                "vol-create-as",
                NODE_POOL,
                &name,
                &capacity,
                "--format",
                "qcow2",
                "--backing-vol",
                &image_path.to_string_lossy(),
                "--backing-vol-format",
                "qcow2",
            ],
        )
        .await?;
        virsh_overlay.push(start.elapsed());
        virsh(&bed.uri, &["vol-delete", "--pool", NODE_POOL, &name]).await?;
    }

    let mut clone = Vec::new();
    let mut cp = Vec::new();
    let mut direct = Vec::new();
    for i in 0..COPIES {
        let name = format!("bench-clone-{i}.qcow2");
        let start = Instant::now();
        virsh(&bed.uri, &["vol-clone", "--pool", IMAGE_POOL, image, &name]).await?;
        clone.push(start.elapsed());
        virsh(&bed.uri, &["vol-delete", "--pool", IMAGE_POOL, &name]).await?;

        let target = scratch.join(format!("bench-copy-{i}.qcow2"));
        let start = Instant::now();
        let status = tokio::process::Command::new("cp")
            .arg(&image_path)
            .arg(&target)
            .status()
            .await?;
        // Until the bytes are on disk, as a volume the next VM boots from must be.
        let synced = tokio::process::Command::new("sync")
            .arg(&target)
            .status()
            .await?;
        cp.push(start.elapsed());
        anyhow::ensure!(status.success() && synced.success(), "cp failed");
        std::fs::remove_file(&target)?;

        // The same bytes read from and written to the disk itself (O_DIRECT), as a
        // copy of an image that is not in the page cache costs.
        let start = Instant::now();
        let status = tokio::process::Command::new("dd")
            .arg(format!("if={}", image_path.display()))
            .arg(format!("of={}", target.display()))
            .args(["bs=4M", "iflag=direct", "oflag=direct", "status=none"])
            .status()
            .await?;
        direct.push(start.elapsed());
        anyhow::ensure!(status.success(), "dd failed");
        std::fs::remove_file(&target)?;
    }

    let overlay = median(&mut controller_overlay);
    println!();
    println!(
        "vm: node disk creation, overlay vs full copy of the image ({:.0} MiB allocated)",
        image_bytes as f64 / f64::from(1 << 20)
    );
    println!(
        "  qcow2 overlay, controller (Libvirt::create_overlay)  median {:>9.1?} of {OVERLAYS}",
        overlay
    );
    println!(
        "  qcow2 overlay, virsh vol-create-as --backing-vol     median {:>9.1?} of {OVERLAYS}",
        median(&mut virsh_overlay)
    );
    let clone = median(&mut clone);
    let cp = median(&mut cp);
    println!(
        "  full copy, virsh vol-clone                          median {clone:>9.1?} of {COPIES}"
    );
    println!("  full copy, cp + sync                                median {cp:>9.1?} of {COPIES}");
    let direct = median(&mut direct);
    println!(
        "  full copy, dd O_DIRECT (no page cache)              median {direct:>9.1?} of {COPIES}"
    );
    println!(
        "  copy / overlay: {:.0}x (vol-clone), {:.0}x (cp), {:.0}x (uncached); \
         target: overlay under 50 ms",
        clone.as_secs_f64() / overlay.as_secs_f64(),
        cp.as_secs_f64() / overlay.as_secs_f64(),
        direct.as_secs_f64() / overlay.as_secs_f64(),
    );
    println!(
        "  (a copy grows with the image: this test image holds {:.0} MiB, a Kubernetes node \
         image several GiB; an overlay does not)",
        image_bytes as f64 / f64::from(1 << 20)
    );
    Ok(())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}
