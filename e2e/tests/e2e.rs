//! e2e tier: nothing is a test double. libvirtd, qemu (software emulation) and dnsmasq
//! run in a network namespace the test creates (`Sandbox`); the API server and the
//! controller run inside it, with the real `SshGuest`: `kubeadm init` on the control
//! plane and `kubeadm join` on the workers, over SSH with pinned host keys, in VMs booted
//! from the e2e image (`e2e/hack/build-kube-image.sh`: containerd, kubelet, kubeadm and
//! the control-plane images preloaded, so nothing is pulled).
//!
//! Forming a cluster costs minutes of emulated CPU on two shared cores, so one cluster
//! (`e2e/cluster.yaml`: a control plane, pool `small` and pool `gpu` with a taint and a
//! fake accelerator) is formed once and the scenarios of [`scenarios::ALL`] run on it
//! in sequence, each printing its name and time and leaving the cluster as the next
//! expects: `pools`, `outage`, `rejoin`, `scale`, then `delete`. After each, the
//! controller's log must show one `kubeadm init` and no reset.
//!
//! Runs only with BENCHCLUSTER_E2E_TESTS=1 (root, libvirtd, qemu: `cargo xtask test e2e`).
//! `BENCHCLUSTER_E2E_SCENARIOS=a,b` runs only those. With `BENCHCLUSTER_E2E_ON_UP=<dir>`
//! (`cargo xtask test e2e --scenario pools --on-up`) nothing is formed: the scenarios run
//! against the cluster `cargo xtask up e2e/cluster.yaml` left running, whose state
//! directory that is (`delete` only when named). The image is BENCHCLUSTER_KUBE_IMAGE
//! if set, else what build-kube-image.sh prints (built on first use, then cached).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod scenarios;
mod vm_support;

use std::time::Instant;

use benchcluster_e2e::sandbox::{self, GuestImage, Sandbox, SandboxOptions};
use scenarios::{Bed, Selection};

/// Set to `1` to run this tier.
const E2E_TESTS_ENV: &str = "BENCHCLUSTER_E2E_TESTS";
/// Comma-separated names of the scenarios to run (all when unset).
const SCENARIOS_ENV: &str = "BENCHCLUSTER_E2E_SCENARIOS";
/// The state directory of a running `cargo xtask up`: run against its cluster.
const ON_UP_ENV: &str = "BENCHCLUSTER_E2E_ON_UP";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cluster_with_pools_through_every_scenario() {
    let test = "one_cluster_with_pools_through_every_scenario";
    if std::env::var(E2E_TESTS_ENV).as_deref() != Ok("1") {
        eprintln!(
            "skipping {test}: the e2e tier runs only with {E2E_TESTS_ENV}=1 \
             (as root, with libvirtd and qemu installed; `cargo xtask test e2e`)"
        );
        return;
    }
    let selection = Selection::from_env(std::env::var(SCENARIOS_ENV).ok().as_deref())
        .unwrap_or_else(|error| panic!("{SCENARIOS_ENV}: {error:#}"));
    let result = match std::env::var_os(ON_UP_ENV) {
        Some(state_dir) => on_up(state_dir.into(), selection).await,
        None => own_sandbox(selection).await,
    };
    if let Err(error) = result {
        panic!("{error:#}");
    }
}

/// The whole tier: a sandbox of its own, the cluster formed in it, every scenario.
async fn own_sandbox(selection: Selection) -> anyhow::Result<()> {
    let log = scenarios::install_log_capture();
    let started = Instant::now();
    let image = sandbox::kube_image().await?;
    let sandbox = Sandbox::start(SandboxOptions {
        image: GuestImage::Path(image),
        ..SandboxOptions::default()
    })
    .await?;
    eprintln!(
        "sandbox {} up in {:.1?} ({})",
        sandbox.netns(),
        started.elapsed(),
        sandbox.uri()
    );
    let uri = sandbox.uri();
    let volume = sandbox.image_volume().to_owned();
    let dir = sandbox.dir().to_owned();
    let result = sandbox
        .run_inside(move || async move {
            let mut bed = Bed::own(uri, volume, dir, log).await?;
            let result = scenarios::run(&bed, &selection, true).await;
            bed.finish(result.is_err()).await;
            result
        })
        .await;
    if result.is_err() {
        eprintln!("{}", sandbox.diagnostics());
    }
    let teardown = Instant::now();
    drop(sandbox);
    eprintln!(
        "sandbox torn down in {:.1?}; whole test {:.1?}",
        teardown.elapsed(),
        started.elapsed()
    );
    result
}

/// The selected scenarios against the cluster of a running `cargo xtask up`.
async fn on_up(state_dir: std::path::PathBuf, selection: Selection) -> anyhow::Result<()> {
    let up = scenarios::UpSandbox::read(&state_dir)?;
    eprintln!(
        "on the `cargo xtask up` sandbox in {} (namespace {}): {}/{}",
        state_dir.display(),
        up.netns,
        up.namespace,
        up.name
    );
    let netns = up.netns.clone();
    sandbox::run_in_netns(&netns, move || async move {
        let mut bed = Bed::attach(up).await?;
        let result = scenarios::run(&bed, &selection, false).await;
        bed.finish(result.is_err()).await;
        result
    })
    .await
}
