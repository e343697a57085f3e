//! A worker's Node deleted behind the controller's back: its join completed into this
//! cluster, so its kubelet registers it again (same VM, new Node uid), nothing reset
//! (RELIABILITY.md 7).

use std::time::Instant;

use anyhow::ensure;
use benchcluster_e2e::wait;
use futures::future::BoxFuture;

use super::{Bed, SCALE_UP_DEADLINE};
use crate::vm_support::POLL;

pub const NAME: &str = "rejoin";

pub fn run(bed: &Bed) -> BoxFuture<'_, anyhow::Result<()>> {
    Box::pin(async move {
        let start = Instant::now();
        let cp = format!("{}-cp-0", bed.name);
        let worker = format!("{}-small-0", bed.name);
        let before = bed.node_uids().await?;
        let domains = bed.domains().await?;
        let restarts_before = bed
            .log
            .count(&["restarting kubelet to register it again", &worker]);
        bed.guest_kubectl(&["delete", "node", &worker]).await?;
        let reregistered = wait::until(
            "the deleted Node registered again",
            SCALE_UP_DEADLINE,
            POLL,
            || async {
                let uids = bed.node_uids().await?;
                anyhow::Ok(
                    uids.get(&worker)
                        .is_some_and(|uid| Some(uid) != before.get(&worker))
                        .then_some(uids),
                )
            },
        )
        .await?;
        bed.wait_ready("Ready with the Node back", SCALE_UP_DEADLINE)
            .await?;
        ensure!(
            reregistered.get(&cp) == before.get(&cp),
            "the control plane's Node changed: {before:?} -> {reregistered:?}"
        );
        ensure!(bed.domains().await? == domains, "the VMs changed");
        // The controller restarts the kubelet unless the kubelet re-registered by itself
        // before the controller's join step looked; at most once either way.
        let restarts = bed
            .log
            .count(&["restarting kubelet to register it again", &worker])
            - restarts_before;
        ensure!(
            restarts <= 1,
            "kubelet restarted {restarts} times:\n{}",
            bed.log.matching(&worker)
        );
        eprintln!(
            "  {worker} deleted, registered again and Ready in {:.1?}; kubelet restarted by \
             the controller {restarts} time(s)",
            start.elapsed()
        );
        Ok(())
    })
}
