//! api tier: the capacity check against everything on the host, on libvirt's
//! `test:///default` driver with the full controller loop. Alone in its binary: the
//! host it measures is this process's test driver, which no other test shares.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::{Result, ensure};
use benchcluster_controller::reconcile::Settings;
use benchcluster_e2e::testbed::{self, CONVERGE, Fixture, POLL, RunningController};
use benchcluster_e2e::wait;
use benchcluster_testkit::FakeGuest;

/// Memory the running domains of the test driver take (its own `test` domain), in
/// bytes; the controller's memory overcommit is set so that `free` more is offered.
fn overcommit_leaving(free: u64) -> Result<f64> {
    let conn = testbed::libvirt()?;
    let host = conn.node_info()?.memory * 1024;
    let taken: u64 = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?
        .iter()
        .map(|d| d.info().map(|i| i.max_mem * 1024))
        .sum::<Result<u64, _>>()?;
    Ok((taken + free) as f64 / host as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_does_not_fit_beside_the_others_waits_for_room() -> Result<()> {
    let f = Fixture::new("capacity").await?;
    // 5Gi free: one cluster of 1 + 1 (2Gi + 1Gi) fits, a second beside it does not.
    let settings = Settings {
        inventory_ttl: Duration::ZERO,
        memory_overcommit: overcommit_leaving(5 << 30)?,
        ..testbed::fast_settings()
    };
    let controller = RunningController::start_with(
        f.client.clone(),
        Some(&f.namespace),
        testbed::hypervisor(),
        FakeGuest::default(),
        settings,
    );
    f.create("first", 1).await?;
    f.wait_ready("first", 1).await?;
    f.create("second", 1).await?;
    let message = wait::until("second Stalled", CONVERGE, POLL, || async {
        let bc = f.api.get("second").await?;
        let stalled = bc
            .status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| {
                c.type_ == "Stalled" && c.status == "True" && c.reason == "InsufficientCapacity"
            });
        anyhow::Ok(stalled.map(|c| c.message))
    })
    .await?;
    println!("Stalled: InsufficientCapacity: {message}");
    // Taken: the driver's own `test` domain and the first cluster's 3Gi.
    ensure!(
        message.contains("the cluster needs 3.0Gi of memory where the host has 2.0Gi free")
            && message.contains("taken by other domains")
            && !message.contains("vCPUs"),
        "{message}"
    );
    ensure!(
        testbed::domains(&f.namespace, "second")?.is_empty(),
        "a VM was created"
    );
    ensure!(
        testbed::volumes(&f.namespace, "second")?.is_empty(),
        "a volume was created"
    );

    // Room made: the first cluster goes, the second forms.
    f.delete_and_wait("first").await?;
    f.wait_ready("second", 1).await?;
    f.delete_and_wait("second").await?;
    controller.stop().await;
    Ok(())
}
