//! api tier: the guest cluster's scheduler driven by `spec.scheduler.config`, on
//! libvirt's `test:///default` driver with the full controller loop and the in-memory
//! guest. A live change is switched once and reported (status.scheduler,
//! SchedulerReady, an Event), then reverted to kube-scheduler's defaults; a
//! configuration the scheduler refuses is reported and rolled back, not tried again
//! while the spec asks for it, and cleared when the spec changes; a new cluster is
//! initialised with the defaults and switched to its configuration before it is Ready.
//! Ready is never True while SchedulerReady is not. The CRD's rules on the
//! configuration are crd.rs's (`bad_scheduler_configs_are_rejected_naming_the_field`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use benchcluster_crd::conditions::{self, ConditionType};
use benchcluster_crd::scheduler::{API_VERSION, DEFAULTS, KIND};
use benchcluster_crd::{BenchCluster, SchedulerSpec, SchedulerStatus};
use benchcluster_e2e::measure::{Scrape, StatusWatch};
use benchcluster_e2e::testbed::{self, CONVERGE, Fixture, POLL, RunningController, TestContext};
use benchcluster_e2e::wait;
use benchcluster_testkit::{FakeGuest, UNKNOWN_PLUGIN};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// Valid by the CRD's rules, refused by kube-scheduler: a score plugin it does not have.
fn unknown_plugin() -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "profiles": [{
            "schedulerName": "default-scheduler",
            "plugins": {"score": {"enabled": [{"name": UNKNOWN_PLUGIN, "weight": 1}]}},
        }],
    })
}

/// The hash status reports for `config` (`null`: the defaults).
fn hash(config: &Value) -> Result<String> {
    let spec: SchedulerSpec = serde_json::from_value(json!({"config": config}))?;
    Ok(spec.config_hash())
}

/// Sets `spec.scheduler.config` with a merge patch (`null` removes it).
async fn set_config(f: &Fixture, name: &str, config: &Value) -> Result<()> {
    f.api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scheduler": {"config": config}}})),
        )
        .await?;
    Ok(())
}

fn scheduler(bc: &BenchCluster) -> SchedulerStatus {
    bc.status
        .as_ref()
        .and_then(|s| s.scheduler.clone())
        .unwrap_or_default()
}

/// (status, reason, message) of a condition, empty strings when absent.
fn condition(bc: &BenchCluster, type_: ConditionType) -> (String, String, String) {
    bc.status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Polls the BenchCluster until `done` holds for a status of its current generation;
/// prints the last status seen if it never does.
async fn until_status(
    f: &Fixture,
    name: &str,
    what: &str,
    done: impl Fn(&BenchCluster) -> bool,
) -> Result<BenchCluster> {
    let result = wait::until(&format!("{name}: {what}"), CONVERGE, POLL, || async {
        let bc = f.api.get(name).await?;
        let current =
            bc.status.as_ref().and_then(|s| s.observed_generation) == bc.metadata.generation;
        anyhow::Ok((current && done(&bc)).then_some(bc))
    })
    .await;
    if result.is_err()
        && let Ok(bc) = f.api.get(name).await
    {
        eprintln!("last status: {:#?}", bc.status);
    }
    result
}

/// Waits until the cluster is Ready with a healthy scheduler running `hash`, nothing
/// refused.
async fn wait_running(f: &Fixture, name: &str, hash: &str) -> Result<BenchCluster> {
    until_status(
        f,
        name,
        &format!("Ready, the scheduler running {hash}"),
        |bc| {
            let s = scheduler(bc);
            testbed::is_ready(bc)
                && s.config_hash == hash
                && s.healthy
                && s.rejected.is_none()
                && condition(bc, ConditionType::SchedulerReady).0 == "True"
        },
    )
    .await
}

/// Events of that type and reason in the namespace: how many, repeats (a series)
/// included, and their notes. A repeat keeps the note of the first (kube-runtime's
/// recorder folds Events of one type, reason and action into a series).
async fn events(f: &Fixture, type_: &str, reason: &str) -> Result<(u64, Vec<String>)> {
    let api: Api<Event> = Api::namespaced(f.client.clone(), &f.namespace);
    let mut count = 0;
    let mut notes = Vec::new();
    for e in api.list(&ListParams::default()).await?.items {
        if e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason) {
            count += e
                .series
                .as_ref()
                .map_or(1, |s| u64::try_from(s.count).unwrap_or(1));
            notes.extend(e.note);
        }
    }
    Ok((count, notes))
}

/// Waits until `count` Events of that type and reason are recorded, and returns their
/// notes.
async fn wait_events(f: &Fixture, type_: &str, reason: &str, count: u64) -> Result<Vec<String>> {
    let result = wait::until(
        &format!("{count} {type_} Event(s) {reason}"),
        CONVERGE,
        POLL,
        || async {
            let (seen, notes) = events(f, type_, reason).await?;
            anyhow::Ok((seen >= count).then_some(notes))
        },
    )
    .await;
    if result.is_err() {
        eprintln!("events: {:#?}", f.events().await);
    }
    result
}

fn reconciles(ctx: &TestContext) -> u64 {
    Scrape::parse(&ctx.metrics.encode().unwrap())
        .unwrap()
        .count("benchcluster_reconciles_total", &[])
}

/// Waits until the controller has run `passes` more passes and `intervals` resync
/// intervals have gone by (as writes.rs's `passes_at_rest`).
async fn more_passes(ctx: &TestContext, passes: u64, intervals: u32) -> Result<u64> {
    let resync = testbed::fast_settings().resync_interval;
    let base = reconciles(ctx);
    let start = Instant::now();
    wait::until(
        &format!("{passes} more passes and {intervals} resync intervals"),
        CONVERGE + resync * intervals,
        POLL,
        || async {
            let done = reconciles(ctx) - base;
            (done >= passes && start.elapsed() >= resync * intervals).then_some(done)
        },
    )
    .await
}

/// Every status the watch saw of `name` that says Ready also says SchedulerReady, and
/// none is both Ready and Stalled.
fn never_ready_without_the_scheduler(watch: &StatusWatch, name: &str) -> Result<()> {
    let statuses = watch.with(|h| {
        h.objects
            .get(name)
            .map(|o| o.statuses.clone())
            .unwrap_or_default()
    });
    ensure!(!statuses.is_empty(), "the watch saw no status of {name}");
    let is = |status: &Value, type_: &str| {
        status["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == type_ && c["status"] == "True")
        })
    };
    for (i, status) in statuses.iter().enumerate() {
        if is(status, "Ready") {
            ensure!(
                is(status, "SchedulerReady"),
                "status {i} of {name} is Ready without SchedulerReady: {status:#}"
            );
            ensure!(
                !is(status, "Stalled"),
                "status {i} of {name} is Ready and Stalled: {status:#}"
            );
        }
    }
    Ok(())
}

fn switches(guest: &FakeGuest) -> u64 {
    guest.scheduler_switches.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scheduler_change_is_switched_reported_and_reverted() -> Result<()> {
    let f = Fixture::new("sched-live").await?;
    let watch = StatusWatch::start(f.api.clone(), true).await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    let guest = &controller.ctx.guest;
    f.create("live", 1).await?;
    let bc = f.wait_ready("live", 1).await?;
    let formed = testbed::domains(&f.namespace, "live")?;

    // A fresh cluster runs kube-scheduler's defaults, nothing switched.
    let s = scheduler(&bc);
    assert_eq!(s.config_hash, DEFAULTS);
    assert!(s.healthy, "{s:?}");
    assert!(s.image.is_some(), "{s:?}");
    assert_eq!(s.rejected, None);
    let (status, reason, _) = condition(&bc, ConditionType::SchedulerReady);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Running"));
    assert_eq!(switches(guest), 0);

    // A MostAllocated profile: switched once, on the running cluster.
    let packing = hash(&testbed::most_allocated())?;
    set_config(&f, "live", &testbed::most_allocated()).await?;
    let bc = wait_running(&f, "live", &packing).await?;
    let (_, reason, message) = condition(&bc, ConditionType::SchedulerReady);
    assert_eq!(reason, "Running");
    assert!(message.contains(&packing), "{message}");
    assert_eq!(switches(guest), 1, "one switch");
    assert_eq!(guest.calls("switch_scheduler", "live-cp-0"), 1);
    assert_eq!(guest.inits.load(Ordering::Relaxed), 1, "no init again");
    assert_eq!(guest.completed().inits, 1);
    assert_eq!(guest.completed().joins, 1, "no join again");
    assert_eq!(testbed::domains(&f.namespace, "live")?, formed, "same VMs");
    let notes = wait_events(&f, "Normal", "SchedulerSwitched", 1).await?;
    ensure!(notes.iter().any(|n| n.contains(&packing)), "{notes:?}");

    // Back to the defaults: a second switch.
    set_config(&f, "live", &Value::Null).await?;
    wait_running(&f, "live", DEFAULTS).await?;
    assert_eq!(switches(guest), 2, "one more switch");
    assert_eq!(guest.completed().inits, 1);
    assert_eq!(guest.completed().joins, 1);
    assert_eq!(testbed::domains(&f.namespace, "live")?, formed, "same VMs");
    // The Event's series counts it (its note still names the first switch's).
    wait_events(&f, "Normal", "SchedulerSwitched", 2).await?;

    never_ready_without_the_scheduler(&watch, "live")?;
    f.delete_and_wait("live").await?;
    controller.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_configuration_is_reported_rolled_back_and_not_retried() -> Result<()> {
    let f = Fixture::new("sched-refused").await?;
    let watch = StatusWatch::start(f.api.clone(), true).await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    let guest = &controller.ctx.guest;
    f.create("refused", 1).await?;
    f.wait_ready("refused", 1).await?;

    let bad = hash(&unknown_plugin())?;
    let refused = |bc: &BenchCluster| {
        let s = scheduler(bc);
        let (sched, sched_reason, sched_message) = condition(bc, ConditionType::SchedulerReady);
        let (stalled, stalled_reason, _) = condition(bc, ConditionType::Stalled);
        let (ready, ..) = condition(bc, ConditionType::Ready);
        sched == "False"
            && sched_reason == "ConfigRejected"
            && sched_message.contains(UNKNOWN_PLUGIN)
            && stalled == "True"
            && stalled_reason == "SchedulerConfigRejected"
            && ready == "False"
            && s.config_hash == DEFAULTS
            && s.rejected
                .as_ref()
                .is_some_and(|r| r.config_hash == bad && r.message.contains(UNKNOWN_PLUGIN))
    };
    set_config(&f, "refused", &unknown_plugin()).await?;
    let bc = until_status(&f, "refused", "the configuration refused", refused).await?;
    assert_eq!(switches(guest), 1, "tried once");
    let at = scheduler(&bc).rejected.context("rejected")?.at;
    let notes = wait_events(&f, "Warning", "SchedulerConfigRejected", 1).await?;
    ensure!(
        notes
            .iter()
            .any(|n| n.contains(&bad) && n.contains(UNKNOWN_PLUGIN)),
        "{notes:?}"
    );

    // Many passes later (resyncs and a metadata change), still refused, not tried again.
    f.api
        .patch(
            "refused",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/poke": "1"}}})),
        )
        .await?;
    let passes = more_passes(&controller.ctx, 5, 3).await?;
    let bc = f.api.get("refused").await?;
    ensure!(refused(&bc), "no longer refused: {:#?}", bc.status);
    assert_eq!(
        scheduler(&bc).rejected.map(|r| r.at),
        Some(at),
        "the same refusal"
    );
    assert_eq!(switches(guest), 1, "not tried again in {passes} passes");
    eprintln!("refused: {passes} passes over 3 resync intervals, one switch");

    // The spec changes: the refusal goes, the defaults never stopped running.
    set_config(&f, "refused", &Value::Null).await?;
    let bc = wait_running(&f, "refused", DEFAULTS).await?;
    let (stalled, ..) = condition(&bc, ConditionType::Stalled);
    assert_eq!(stalled, "False");
    assert_eq!(switches(guest), 1, "nothing to switch back to");

    // Asked for again, it is tried again.
    set_config(&f, "refused", &unknown_plugin()).await?;
    until_status(&f, "refused", "the configuration refused again", |bc| {
        refused(bc) && switches(guest) == 2
    })
    .await?;
    set_config(&f, "refused", &Value::Null).await?;
    wait_running(&f, "refused", DEFAULTS).await?;
    assert_eq!(switches(guest), 2);
    assert_eq!(guest.completed().inits, 1, "no init again");
    wait_events(&f, "Warning", "SchedulerConfigRejected", 2).await?;
    assert_eq!(
        events(&f, "Normal", "SchedulerSwitched").await?.0,
        0,
        "no switch succeeded"
    );

    never_ready_without_the_scheduler(&watch, "refused")?;
    f.delete_and_wait("refused").await?;
    controller.stop().await;
    Ok(())
}

/// A new cluster's control plane is initialised with kube-scheduler's defaults and then
/// switched to the spec's configuration, before the cluster reports Ready; one the
/// scheduler refuses leaves the formed cluster on the defaults, Stalled, until the spec
/// changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_is_switched_to_its_configuration_before_ready() -> Result<()> {
    let f = Fixture::new("sched-new").await?;
    let watch = StatusWatch::start(f.api.clone(), true).await?;
    let controller =
        RunningController::start(f.client.clone(), Some(&f.namespace), testbed::hypervisor());
    let guest = &controller.ctx.guest;
    for (name, config) in [
        ("packed", testbed::most_allocated()),
        ("broken", unknown_plugin()),
    ] {
        let mut bc = f.cluster(name, 1)?;
        bc.spec.scheduler.config = Some(serde_json::from_value(config)?);
        f.api.create(&PostParams::default(), &bc).await?;
    }

    let packing = hash(&testbed::most_allocated())?;
    f.wait_ready("packed", 1).await?;
    let bc = wait_running(&f, "packed", &packing).await?;
    assert_eq!(scheduler(&bc).config_hash, packing);
    assert_eq!(guest.calls("switch_scheduler", "packed-cp-0"), 1);
    assert_eq!(guest.calls("init", "packed-cp-0"), 1);

    let bad = hash(&unknown_plugin())?;
    let bc = until_status(&f, "broken", "the configuration refused", |bc| {
        let s = scheduler(bc);
        let (sched, reason, _) = condition(bc, ConditionType::SchedulerReady);
        (sched.as_str(), reason.as_str()) == ("False", "ConfigRejected")
            && condition(bc, ConditionType::Stalled).1 == "SchedulerConfigRejected"
            && s.config_hash == DEFAULTS
            && s.rejected.is_some_and(|r| r.config_hash == bad)
    })
    .await?;
    // Formed all the same: its nodes are Ready, only the scheduler holds Ready back.
    let status = bc.status.clone().unwrap_or_default();
    assert_eq!(status.ready_workers, 1);
    assert_eq!(condition(&bc, ConditionType::ControlPlaneReady).0, "True");
    assert_eq!(condition(&bc, ConditionType::WorkersReady).0, "True");
    assert_eq!(condition(&bc, ConditionType::Ready).0, "False");
    assert_eq!(guest.calls("switch_scheduler", "broken-cp-0"), 1);
    assert_eq!(guest.calls("init", "broken-cp-0"), 1, "no init again");

    set_config(&f, "broken", &Value::Null).await?;
    f.wait_ready("broken", 1).await?;
    wait_running(&f, "broken", DEFAULTS).await?;
    assert_eq!(guest.calls("switch_scheduler", "broken-cp-0"), 1);
    assert_eq!(guest.completed().inits, 2, "one init per cluster");

    never_ready_without_the_scheduler(&watch, "packed")?;
    never_ready_without_the_scheduler(&watch, "broken")?;
    for name in ["packed", "broken"] {
        f.delete_and_wait(name).await?;
    }
    controller.stop().await;
    Ok(())
}
