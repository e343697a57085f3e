//! Benchmarks of the controller loop on a real API server and libvirt's test driver.
//! Not tests: they print figures, measured side by side in one run.
//!
//! `cargo xtask bench` (or `cargo bench -p benchcluster-e2e --bench scale`) prints:
//! - time to Ready of 1+32 over 1+1 with a fixed latency injected in every hypervisor
//!   and guest step (target: under 1.15, workers provision and join in parallel);
//! - time for N BenchClusters (default 1000, `BENCH_CLUSTERS`) to converge, the
//!   process's resident memory then, and the API writes and libvirt mutations over a
//!   window at rest (target: zero).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use benchcluster_controller::Settings;
use benchcluster_crd::BenchCluster;
use benchcluster_e2e::testbed::{self, RunningController};
use benchcluster_e2e::{TestApiServer, create_namespace, wait};
use benchcluster_testkit::FakeGuest;
use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

const HYPERVISOR_STEP: Duration = Duration::from_millis(50);
const GUEST_STEP: Duration = Duration::from_millis(500);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let server = TestApiServer::start().await?;
    server.install_crd().await?;
    let client = server.client().await?;
    testbed::libvirt()?;

    parallel_provisioning(&client).await?;
    let clusters = std::env::var("BENCH_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    many_clusters(&client, clusters).await?;
    Ok(())
}

/// Time from create to Ready of one BenchCluster with `workers` workers.
async fn time_to_ready(client: &Client, workers: i32) -> Result<Duration> {
    let namespace = create_namespace(client, &format!("bench-par{workers}")).await?;
    testbed::create_ssh_secret(client, &namespace).await?;
    let mut hypervisor = testbed::hypervisor();
    hypervisor.step_latency = HYPERVISOR_STEP;
    let settings = Settings {
        poll_interval: Duration::from_millis(100),
        ..testbed::fast_settings()
    };
    let controller = RunningController::start_with(
        client.clone(),
        Some(&namespace),
        hypervisor,
        FakeGuest::with_latency(GUEST_STEP),
        settings,
    );
    let api: Api<BenchCluster> = Api::namespaced(client.clone(), &namespace);
    let start = Instant::now();
    api.create(
        &PostParams::default(),
        &testbed::benchcluster(&namespace, "par", workers)?,
    )
    .await?;
    wait::until(
        "Ready",
        Duration::from_secs(300),
        Duration::from_millis(20),
        || async { anyhow::Ok(testbed::is_ready(&api.get("par").await?).then_some(())) },
    )
    .await?;
    let took = start.elapsed();
    controller.stop().await;
    Ok(took)
}

async fn parallel_provisioning(client: &Client) -> Result<()> {
    // The first run pays for warming up (watches, connections): not measured.
    time_to_ready(client, 1).await?;
    let one = time_to_ready(client, 1).await?;
    let many = time_to_ready(client, 32).await?;
    println!(
        "parallel provisioning ({}ms per hypervisor step, {}ms per guest step):",
        HYPERVISOR_STEP.as_millis(),
        GUEST_STEP.as_millis()
    );
    println!("  1+1  Ready in {:>8.2?}", one);
    println!("  1+32 Ready in {:>8.2?}", many);
    println!(
        "  ratio 1+32 / 1+1 = {:.3} (target < 1.15)",
        many.as_secs_f64() / one.as_secs_f64()
    );
    Ok(())
}

fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn many_clusters(client: &Client, count: usize) -> Result<()> {
    let namespace = create_namespace(client, "bench-many").await?;
    testbed::create_ssh_secret(client, &namespace).await?;
    let hypervisor = testbed::hypervisor();
    // Production polling (2 s while provisioning): a thousand clusters polled every
    // 200 ms would measure the test driver, not the controller.
    let settings = Settings::default();
    let rss_before = resident_kib();
    let controller = RunningController::start_with(
        client.clone(),
        Some(&namespace),
        hypervisor,
        FakeGuest::default(),
        settings,
    );
    let api: Api<BenchCluster> = Api::namespaced(client.clone(), &namespace);
    let start = Instant::now();
    let created = futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let namespace = namespace.clone();
            async move {
                let bc = testbed::benchcluster(&namespace, &format!("c{i}"), 0)?;
                api.create(&PostParams::default(), &bc)
                    .await
                    .context("create")
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    created.into_iter().collect::<Result<Vec<_>>>()?;
    let created_in = start.elapsed();
    wait::until(
        &format!("{count} BenchClusters Ready"),
        Duration::from_secs(600),
        Duration::from_secs(1),
        || async {
            let list = api.list(&ListParams::default()).await?;
            let ready = list.items.iter().filter(|bc| testbed::is_ready(bc)).count();
            anyhow::Ok((ready == count).then_some(()))
        },
    )
    .await?;
    let converged = start.elapsed();
    let rss = resident_kib();

    // At rest: nothing changes, so nothing may be written.
    let versions = |list: &[BenchCluster]| {
        list.iter()
            .map(|bc| (bc.name_any(), bc.resource_version()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = versions(&api.list(&ListParams::default()).await?.items);
    let mutations_before = controller
        .ctx
        .hypervisor
        .mutations
        .load(std::sync::atomic::Ordering::Relaxed);
    let window = Duration::from_secs(30);
    let rest_start = Instant::now();
    while rest_start.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let after = versions(&api.list(&ListParams::default()).await?.items);
    let writes = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .count();
    let mutations = controller
        .ctx
        .hypervisor
        .mutations
        .load(std::sync::atomic::Ordering::Relaxed)
        - mutations_before;

    println!("{count} BenchClusters (1+0 each) on the test hypervisor:");
    println!(
        "  created in {created_in:.2?}, all Ready {converged:.2?} after the first create (target < 60 s)"
    );
    println!(
        "  resident memory of this process (controller + bench client): {} MiB (before the controller started: {} MiB; target < 64 MiB)",
        rss.unwrap_or(0) / 1024,
        rss_before.unwrap_or(0) / 1024
    );
    println!(
        "  at rest over {}s: {writes} objects rewritten, {mutations} libvirt mutations (target 0)",
        window.as_secs()
    );
    controller.stop().await;
    Ok(())
}
