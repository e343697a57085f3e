//! api tier: what the controller writes, counted, not timed. Over one cluster's
//! lifecycle every status patch is a real transition: a watch sees each one change the
//! status (conditions' `lastTransitionTime` aside), the controller sends no more of them
//! than the watch saw, and one Ready Event goes with each transition to Ready; this
//! holds when a pass outruns the watch (it runs again from the copy the previous pass
//! started from, as a loaded controller's does). At rest, with 50 clusters each
//! reconciled again and again, nothing is written at all (no object, no status patch,
//! no Event, no libvirt mutation, by the controller's count and the API server's) and
//! the API server is read only through watches. On the same test bed as api.rs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use benchcluster_controller::reconcile::reconcile;
use benchcluster_controller::{Context, Settings};
use benchcluster_e2e::measure::{ApiRequests, History, Scrape, StatusWatch};
use benchcluster_e2e::testbed::{self, CONVERGE, Fixture, POLL, RunningController, TestContext};
use benchcluster_e2e::{TestApiServer, create_namespace, wait};
use benchcluster_testkit::FakeGuest;
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

/// Converged clusters are reconciled this often, so "at rest" comes soon.
const RESYNC: Duration = Duration::from_secs(1);

fn settings() -> Settings {
    Settings {
        resync_interval: RESYNC,
        ..testbed::fast_settings()
    }
}

fn controller(f: &Fixture) -> RunningController {
    RunningController::start_with(
        f.client.clone(),
        Some(&f.namespace),
        testbed::hypervisor(),
        FakeGuest::default(),
        settings(),
    )
}

fn counter(ctx: &TestContext, name: &str) -> u64 {
    Scrape::parse(&ctx.metrics.encode().unwrap())
        .unwrap()
        .count(name, &[])
}

fn reconciles(ctx: &TestContext) -> u64 {
    counter(ctx, "benchcluster_reconciles_total")
}

/// Status patches sent (answered with success or not).
fn status_patches(ctx: &TestContext) -> u64 {
    counter(ctx, "benchcluster_status_patches_total")
}

/// Waits until the controller has run `passes` more passes and `intervals` resync
/// intervals have gone by: with every cluster converged, each has been reconciled
/// again about `passes / clusters` times.
async fn passes_at_rest(ctx: &TestContext, passes: u64, intervals: u32) -> anyhow::Result<()> {
    let base = reconciles(ctx);
    let start = Instant::now();
    wait::until(
        &format!("{passes} more passes and {intervals} resync intervals"),
        Duration::from_secs(60) + RESYNC * intervals,
        Duration::from_millis(100),
        || async {
            let done = reconciles(ctx) - base;
            (done >= passes && start.elapsed() >= RESYNC * intervals).then_some(done)
        },
    )
    .await
    .map(drop)
}

/// The distinct statuses in order, for a failure message.
fn summary(statuses: &[serde_json::Value]) -> String {
    statuses
        .iter()
        .enumerate()
        .map(|(i, s)| format!("  {i}: {s}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ready(status: &serde_json::Value) -> bool {
    status["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Transitions of the Ready condition to True among the distinct statuses.
fn became_ready(statuses: &[serde_json::Value]) -> u64 {
    let mut was = false;
    let mut count = 0;
    for status in statuses {
        let is = ready(status);
        count += u64::from(is && !was);
        was = is;
    }
    count
}

/// Ready Events recorded for the namespace, repeats of one Event (its series) included.
async fn ready_events(f: &Fixture) -> anyhow::Result<u64> {
    let api: Api<Event> = Api::namespaced(f.client.clone(), &f.namespace);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Ready"))
        .map(|e| {
            e.series
                .as_ref()
                .map_or(1, |s| u64::try_from(s.count).unwrap_or(1))
        })
        .sum())
}

/// The watch's history of `name` once it has seen the object's current version.
async fn history(f: &Fixture, watch: &StatusWatch, name: &str) -> anyhow::Result<History> {
    let version = f.api.get(name).await?.resource_version().unwrap();
    watch.seen(name, &version).await?;
    Ok(watch.snapshot().objects.remove(name).unwrap())
}

/// The checks both lifecycle tests make: `sent` patches for the history's transitions,
/// none of them only moving a timestamp, and one Ready Event per transition to Ready.
async fn assert_patches_are_transitions(
    f: &Fixture,
    sent: u64,
    history: &History,
    notes: &str,
) -> anyhow::Result<()> {
    assert!(
        history.transitions >= 2,
        "a lifecycle has transitions: {history:?}"
    );
    assert_eq!(
        history.timestamp_only,
        0,
        "{} status writes changed only a lastTransitionTime (distinct statuses in order:\n{}){notes}",
        history.timestamp_only,
        summary(&history.statuses)
    );
    assert_eq!(
        sent,
        history.transitions,
        "the controller sent {sent} status patches over a lifecycle of {} real transitions \
         (the watch saw {} versions of the object){notes}; distinct statuses in order:\n{}",
        history.transitions,
        history.events,
        summary(&history.statuses)
    );
    let events = ready_events(f).await?;
    let transitions = became_ready(&history.statuses);
    assert_eq!(
        events, transitions,
        "{events} Ready Events for {transitions} transitions to Ready{notes}"
    );
    Ok(())
}

/// Whether the cluster is Ready with `workers` Ready workers and no other node.
fn ready_with(bc: &benchcluster_crd::BenchCluster, workers: i32) -> bool {
    let status = bc.status.clone().unwrap_or_default();
    testbed::is_ready(bc)
        && status.ready_workers == workers
        && status.nodes.len() == usize::try_from(workers).unwrap() + 1
}

/// Passes by hand until the cluster is Ready with `workers` workers, then `rest` more
/// rounds. Every round runs a pass from a fresh copy and then another from the same
/// copy, as a pass does that outruns the watch: it cannot see the first one's write.
/// Returns the errors of the second passes (for the failure message).
async fn rounds(
    f: &Fixture,
    ctx: &Arc<TestContext>,
    workers: i32,
    rest: u32,
) -> anyhow::Result<Vec<String>> {
    let errors = std::sync::Mutex::new(Vec::new());
    let round = || async {
        let snapshot = Arc::new(f.api.get("life").await?);
        let done = ready_with(&snapshot, workers);
        // The first pass adds the finalizer; replaying it from a copy without one
        // would only fail kube's finalizer patch.
        let replay = !snapshot.finalizers().is_empty();
        let _ = reconcile(Arc::clone(&snapshot), Arc::clone(ctx)).await;
        if replay && let Err(error) = reconcile(snapshot, Arc::clone(ctx)).await {
            errors.lock().unwrap().push(error.chain());
        }
        anyhow::Ok(done.then_some(()))
    };
    wait::until(
        &format!("life Ready with {workers} workers through passes by hand"),
        CONVERGE,
        POLL,
        round,
    )
    .await?;
    for _ in 0..rest {
        round().await?;
    }
    Ok(errors.into_inner().unwrap())
}

#[tokio::test]
async fn every_status_patch_is_a_real_transition_even_when_passes_outrun_the_watch()
-> anyhow::Result<()> {
    let f = Fixture::new("writes-stale").await?;
    let watch = StatusWatch::start(f.api.clone(), true).await?;
    // Passes are run by hand (no run loop), so which copy each one sees is decided here.
    let ctx = Arc::new(Context::new(
        f.client.clone(),
        testbed::hypervisor(),
        FakeGuest::default(),
        settings(),
    ));

    // 1+0 to Ready, scaled to 1+3, Ready again; a few rounds at rest after each.
    f.create("life", 0).await?;
    let mut errors = rounds(&f, &ctx, 0, 3).await?;
    f.set_replicas("life", 3).await?;
    errors.extend(rounds(&f, &ctx, 3, 3).await?);

    let sent = status_patches(&ctx);
    let history = history(&f, &watch, "life").await?;
    let notes = format!(
        " ({} passes, half of them from the copy the pass before started from; their errors: {errors:?})",
        reconciles(&ctx)
    );
    assert_patches_are_transitions(&f, sent, &history, &notes).await
}

#[tokio::test]
async fn every_status_patch_of_the_running_controller_is_a_real_transition() -> anyhow::Result<()> {
    let f = Fixture::new("writes-life").await?;
    let watch = StatusWatch::start(f.api.clone(), true).await?;
    let controller = controller(&f);
    let ctx = controller.ctx.clone();

    // 1+0 to Ready, a few passes at rest, scaled to 1+3, Ready again, at rest again.
    f.create("life", 0).await?;
    f.wait_ready("life", 0).await?;
    passes_at_rest(&ctx, 3, 3).await?;
    f.set_replicas("life", 3).await?;
    f.wait_ready("life", 3).await?;
    passes_at_rest(&ctx, 3, 3).await?;
    controller.stop().await;

    let sent = status_patches(&ctx);
    let history = history(&f, &watch, "life").await?;
    let notes = format!(" ({} passes)", reconciles(&ctx));
    assert_patches_are_transitions(&f, sent, &history, &notes).await
}

/// Each BenchCluster's resourceVersion.
async fn versions(f: &Fixture) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(f.api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|bc| {
            let version = bc.resource_version().unwrap_or_default();
            (bc.name_any(), version)
        })
        .collect())
}

/// Each Event's resourceVersion (an Event the recorder updates, as a series, moves).
async fn event_versions(f: &Fixture) -> anyhow::Result<BTreeMap<String, String>> {
    let api: Api<Event> = Api::namespaced(f.client.clone(), &f.namespace);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|e| {
            let version = e.resource_version().unwrap_or_default();
            (e.name_any(), version)
        })
        .collect())
}

#[tokio::test]
async fn nothing_is_written_at_rest_with_50_clusters() -> anyhow::Result<()> {
    const CLUSTERS: usize = 50;
    // An API server of its own, so its request counters count this controller alone.
    let server: &'static TestApiServer = Box::leak(Box::new(TestApiServer::start().await?));
    server.install_crd().await?;
    testbed::libvirt()?;
    let client = server.client().await?;
    let namespace = create_namespace(&client, "writes-rest").await?;
    testbed::create_ssh_secret(&client, &namespace).await?;
    let f = Fixture {
        server,
        api: Api::namespaced(client.clone(), &namespace),
        client,
        namespace,
    };
    let controller = controller(&f);
    let ctx = controller.ctx.clone();
    let fixture = &f;
    futures::stream::iter(0..CLUSTERS)
        .map(|i| async move { fixture.create(&format!("c{i}"), 0).await })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait::until(
        &format!("{CLUSTERS} BenchClusters Ready"),
        Duration::from_secs(180),
        Duration::from_millis(500),
        || async {
            let list = f.api.list(&ListParams::default()).await?;
            let ready = list.items.iter().filter(|bc| testbed::is_ready(bc)).count();
            anyhow::Ok((ready == CLUSTERS).then_some(()))
        },
    )
    .await?;

    let objects = versions(&f).await?;
    let events = event_versions(&f).await?;
    let patches = status_patches(&ctx);
    let mutations = ctx.hypervisor.mutations.load(Ordering::Relaxed);
    // From here to the second reading this test sends the API server nothing but the
    // scrapes of /metrics (not a resource request): what it counts is the controller's.
    let requests = ApiRequests::scrape(&f.client).await?;
    // Every cluster reconciled at least twice more (on average; each is requeued once
    // per resync interval once converged).
    passes_at_rest(&ctx, 2 * CLUSTERS as u64, 2).await?;
    let requests = ApiRequests::scrape(&f.client)
        .await?
        .since(&requests)
        .controller_share();
    let passes = reconciles(&ctx);
    let objects_after = versions(&f).await?;
    let events_after = event_versions(&f).await?;
    let patches_after = status_patches(&ctx);
    let mutations_after = ctx.hypervisor.mutations.load(Ordering::Relaxed);
    controller.stop().await;

    let rewritten: Vec<&String> = objects
        .iter()
        .filter(|(name, version)| objects_after.get(*name) != Some(*version))
        .map(|(name, _)| name)
        .collect();
    let new_or_updated_events: Vec<&String> = events_after
        .iter()
        .filter(|(name, version)| events.get(*name) != Some(*version))
        .map(|(name, _)| name)
        .collect();
    assert!(
        rewritten.is_empty(),
        "{} of {CLUSTERS} BenchClusters were rewritten at rest: {rewritten:?}",
        rewritten.len()
    );
    assert_eq!(
        patches_after - patches,
        0,
        "status patches sent at rest ({patches_after} in all for {CLUSTERS} clusters)"
    );
    assert!(
        new_or_updated_events.is_empty(),
        "Events written at rest: {new_or_updated_events:?}"
    );
    assert_eq!(mutations_after - mutations, 0, "libvirt mutations at rest");
    assert_eq!(
        requests.writes(),
        0,
        "the API server counted writes at rest: {:?}",
        requests.0
    );
    assert_eq!(
        requests.polling_reads(),
        0,
        "at rest the controller reads only through watches, but the API server counted \
         GET or LIST requests over {passes} passes in all: {:?}",
        requests.0
    );
    Ok(())
}
