//! The guest API silent on the formed cluster: kube-apiserver's static pod is stopped
//! inside the control plane for longer than any poll interval and backoff. The
//! conditions say so, the cluster is never called Ready meanwhile, nothing is reset or
//! initialised, and once it answers again the same Nodes (same uids) are Ready
//! (RELIABILITY.md 26).

use std::time::{Duration, Instant};

use anyhow::ensure;
use benchcluster_crd::BenchCluster;
use benchcluster_e2e::wait;
use futures::future::BoxFuture;

use super::Bed;
use crate::vm_support::{POLL, is_ready, summary};

pub const NAME: &str = "outage";

/// How long the guest API stays silent: far beyond the poll interval and the backoff
/// cap of `vm_support::settings`, and beyond the 30 s after which the controller once
/// reset such a control plane.
const OUTAGE: Duration = Duration::from_secs(75);
/// kubelet notices a removed static pod manifest within its 20 s file check period.
const OUTAGE_SEEN_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// kube-apiserver starting again under emulation, then the controller's next retry.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Where the test parks kube-apiserver's static pod manifest during the outage.
const API_SERVER_MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";
const PARKED_MANIFEST: &str = "/etc/kubernetes/kube-apiserver.yaml.parked-by-e2e";

pub fn run(bed: &Bed) -> BoxFuture<'_, anyhow::Result<()>> {
    Box::pin(async move {
        let cp = format!("{}-cp-0", bed.name);
        let uids = bed.node_uids().await?;
        let node = bed.guest_node(&cp).await?;
        let mv = |from: &'static str, to: &'static str| {
            let node = node.clone();
            async move { bed.exec(&node, &["sudo", "-n", "mv", from, to]).await }
        };
        mv(API_SERVER_MANIFEST, PARKED_MANIFEST).await?;
        let reason = |bc: &BenchCluster| {
            bc.status_or_default()
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| (c.reason.clone(), c.message.clone()))
                .unwrap_or_default()
        };
        let silent = wait::until(
            "the silent API in the Ready condition",
            OUTAGE_SEEN_DEADLINE,
            POLL,
            || async {
                let bc = bed.get().await?;
                anyhow::Ok((reason(&bc).0 == "GuestApiUnreachable").then_some(bc))
            },
        )
        .await;
        let silent = match silent {
            Ok(bc) => bc,
            Err(error) => {
                mv(PARKED_MANIFEST, API_SERVER_MANIFEST).await?;
                return Err(error);
            }
        };
        let seen = Instant::now();
        let (_, message) = reason(&silent);
        eprintln!("  [{}] Ready condition: {message}", wait::clock());
        let control_plane = silent
            .status_or_default()
            .conditions
            .iter()
            .find(|c| c.type_ == "ControlPlaneReady")
            .map(|c| c.reason.clone());
        let mut observed = Ok(());
        if !message.contains("unreachable since ") {
            observed = Err(anyhow::anyhow!(
                "the message does not say since when: {message}"
            ));
        } else if control_plane.as_deref() != Some("GuestApiUnreachable") {
            observed = Err(anyhow::anyhow!(
                "ControlPlaneReady reason {control_plane:?}"
            ));
        }
        // The window: the status is read at every poll, and never Ready.
        while observed.is_ok() && seen.elapsed() < OUTAGE {
            let bc = bed.get().await?;
            if is_ready(&bc) {
                observed = Err(anyhow::anyhow!(
                    "Ready while the API was stopped: {}",
                    summary(&bc)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        let outage = seen.elapsed();
        mv(PARKED_MANIFEST, API_SERVER_MANIFEST).await?;
        observed?;
        let back = Instant::now();
        bed.wait_ready("Ready after the API answers again", RECOVERY_DEADLINE)
            .await?;
        let recovered = back.elapsed();
        let after = bed.node_uids().await?;
        ensure!(after == uids, "Node uids changed: {uids:?} -> {after:?}");
        eprintln!(
            "  API silent for {outage:.1?} in status, Ready again {recovered:.1?} after it \
             answered; Node uids unchanged"
        );
        Ok(())
    })
}
