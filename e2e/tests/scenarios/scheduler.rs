//! The guest cluster's scheduler switched live by `spec.scheduler.config`, seen in
//! where pods of the preloaded pause image land: with kube-scheduler's defaults four
//! identical pods spread over the two workers; with a MostAllocated profile they pack on
//! one, and a pod of a second profile only the new scheduler knows is bound; back to the
//! defaults they spread again. A configuration naming an unknown plugin is refused and
//! rolled back: SchedulerReady says ConfigRejected with the scheduler's error, the
//! previous scheduler keeps binding pods, and removing the configuration clears it.
//! Ready is never True while SchedulerReady is not.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use benchcluster_crd::conditions::{self, ConditionType};
use benchcluster_crd::scheduler::{API_VERSION, DEFAULTS, KIND};
use benchcluster_crd::{BenchCluster, KubeSchedulerConfiguration, POOL_LABEL, Role};
use benchcluster_e2e::wait;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{Bed, node_of_pool, pause_image};
use crate::vm_support::POLL;

pub const NAME: &str = "scheduler";

const PODS_NAMESPACE: &str = "default";
/// On every pod of the scenario, to list and delete them.
const LABEL_KEY: &str = "e2e.benchcluster.dev/scenario";
const LABEL_VALUE: &str = "scheduler";
const FAKE_GPU: &str = "example.com/fake-gpu";
/// Each pod's requests: four fit on either worker.
const CPU: &str = "250m";
const MEMORY: &str = "64Mi";
/// Identical pods per placement check.
const PODS: usize = 4;
/// The second profile of the MostAllocated configuration.
const PROBE_PROFILE: &str = "switch-probe";
const BAD_PLUGIN: &str = "NoSuchPlugin";
/// The custom scheduler image preloaded in the e2e image (e2e/hack/build-kube-image.sh).
const CUSTOM_IMAGE: &str = "localhost/benchcluster/kube-scheduler:e2e";
/// A scheduler restart under emulation (30-90 s) and the controller's steps around it.
const SWITCH_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// A refused configuration: the scheduler started with it, its failure seen, the
/// previous one started again.
const REJECT_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// A pod bound by a running scheduler, or gone.
const POD_DEADLINE: Duration = Duration::from_secs(5 * 60);

pub fn run(bed: &Bed) -> BoxFuture<'_, anyhow::Result<()>> {
    Box::pin(async move {
        let bc = bed.get().await?;
        let client = bed.guest_client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let small = node_of_pool(&bc, "small")?;
        let gpu = node_of_pool(&bc, "gpu")?;
        let image = pause_image(&nodes.get(&small).await?)?;
        eprintln!("  pods run {image}");
        let run = Run {
            bed,
            pods: Api::namespaced(client, PODS_NAMESPACE),
            small,
            gpu,
            image,
        };
        // Left by an earlier run.
        run.delete_pods().await?;
        let result = run.steps().await;
        if result.is_err() {
            run.clean_up().await;
        }
        result
    })
}

/// What the steps share.
struct Run<'a> {
    bed: &'a Bed,
    pods: Api<Pod>,
    small: String,
    gpu: String,
    image: String,
}

/// A wait on the BenchCluster: the object that ended it, the time since the edit, and
/// the SchedulerReady status and reason as they changed meanwhile.
struct Seen {
    bc: BenchCluster,
    after: Duration,
    reasons: String,
}

impl Run<'_> {
    async fn steps(&self) -> anyhow::Result<()> {
        // 1. kube-scheduler's defaults: spread.
        let seen = self
            .wait_scheduler(
                "the default scheduler running",
                Instant::now(),
                SWITCH_DEADLINE,
                |bc| running(bc, DEFAULTS),
            )
            .await?;
        check_reason(&seen.bc, "Running")?;
        let placed = self.place("defaults").await?;
        self.spread("defaults", &placed)?;
        self.delete_pods().await?;

        // 2. MostAllocated, switched live: the probe profile binds, then packed.
        let config = most_allocated()?;
        let hash = config_hash(&config);
        let edit = self.set_config(Some(&config)).await?;
        self.create(self.pod("sched-probe", Some(PROBE_PROFILE))?)
            .await?;
        let (seen, (probe_node, probed)) = tokio::try_join!(
            self.wait_scheduler(
                "the MostAllocated scheduler running",
                edit,
                SWITCH_DEADLINE,
                |bc| running(bc, &hash)
            ),
            self.wait_bound("sched-probe", edit, SWITCH_DEADLINE),
        )?;
        check_reason(&seen.bc, "Running")?;
        ensure!(
            self.is_worker(&probe_node),
            "sched-probe on {probe_node}, not a worker"
        );
        eprintln!(
            "  MostAllocated ({hash}): running and healthy in status {:.1?} after the edit; \
             sched-probe (profile {PROBE_PROFILE}) bound to {probe_node} {probed:.1?} after \
             the edit; SchedulerReady {}",
            seen.after, seen.reasons
        );
        let placed = self.place("packed").await?;
        let on: BTreeSet<&String> = placed.iter().collect();
        ensure!(
            on.len() == 1,
            "MostAllocated: the pods are not on one worker: {placed:?}"
        );
        self.delete_pods().await?;

        // 3. Back to the defaults: spread again.
        let edit = self.set_config(None).await?;
        let seen = self
            .wait_scheduler("the default scheduler back", edit, SWITCH_DEADLINE, |bc| {
                running(bc, DEFAULTS)
            })
            .await?;
        check_reason(&seen.bc, "Running")?;
        eprintln!(
            "  configuration removed: defaults running and healthy {:.1?} after the edit; \
             SchedulerReady {}",
            seen.after, seen.reasons
        );
        let placed = self.place("reverted").await?;
        self.spread("reverted", &placed)?;
        self.delete_pods().await?;

        // 4. A configuration the scheduler refuses: rolled back, pods still bound.
        let bad = unknown_plugin()?;
        let bad_hash = config_hash(&bad);
        let edit = self.set_config(Some(&bad)).await?;
        self.create(self.pod("sched-while-rejected", None)?).await?;
        let (refused, (node, bound)) = tokio::try_join!(
            self.wait_scheduler("the configuration rejected", edit, REJECT_DEADLINE, |bc| {
                current(bc) && reason(bc) == Some(("False", "ConfigRejected"))
            }),
            self.wait_bound("sched-while-rejected", edit, REJECT_DEADLINE),
        )?;
        let seen = self
            .wait_scheduler(
                "the defaults healthy after the rollback",
                edit,
                REJECT_DEADLINE,
                |bc| rolled_back(bc, &bad_hash),
            )
            .await?;
        check_reason(&seen.bc, "ConfigRejected")?;
        let status = seen.bc.status_or_default();
        let message = conditions::find(&status.conditions, ConditionType::SchedulerReady)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ensure!(
            message.contains(BAD_PLUGIN),
            "SchedulerReady's message does not name {BAD_PLUGIN}: {message}"
        );
        let rejected = status
            .scheduler
            .and_then(|s| s.rejected)
            .context("no rejected configuration in status")?;
        ensure!(
            rejected.message.contains(BAD_PLUGIN),
            "status.scheduler.rejected.message does not name {BAD_PLUGIN}: {}",
            rejected.message
        );
        ensure!(self.is_worker(&node), "sched-while-rejected on {node}");
        // The scheduler put back schedules: a pod created after the rollback is bound.
        let after_rollback = Instant::now();
        self.create(self.pod("sched-after-rollback", None)?).await?;
        let (rolled_node, rolled_bound) = self
            .wait_bound("sched-after-rollback", after_rollback, POD_DEADLINE)
            .await?;
        ensure!(
            self.is_worker(&rolled_node),
            "sched-after-rollback on {rolled_node}"
        );
        eprintln!(
            "  {BAD_PLUGIN} ({bad_hash}): ConfigRejected {:.1?} after the edit, defaults \
             healthy {:.1?} after; sched-while-rejected bound to {node} {bound:.1?} after the \
             edit; sched-after-rollback bound to {rolled_node} {rolled_bound:.1?} after it was \
             created; SchedulerReady {}\n  message: {message}",
            refused.after, seen.after, refused.reasons
        );
        let edit = self.set_config(None).await?;
        let seen = self
            .wait_scheduler("the rejection cleared", edit, SWITCH_DEADLINE, |bc| {
                running(bc, DEFAULTS)
            })
            .await?;
        check_reason(&seen.bc, "Running")?;
        eprintln!(
            "  configuration removed: SchedulerReady True, nothing rejected {:.1?} after the \
             edit",
            seen.after
        );
        self.delete_pods().await?;

        // 5. A custom image, preloaded in the control plane's image: it runs and binds.
        let edit = self.set_image(Some(CUSTOM_IMAGE)).await?;
        let seen = self
            .wait_scheduler("the custom image running", edit, SWITCH_DEADLINE, |bc| {
                running(bc, DEFAULTS) && image_of(bc).as_deref() == Some(CUSTOM_IMAGE)
            })
            .await?;
        check_reason(&seen.bc, "Running")?;
        let created = Instant::now();
        self.create(self.pod("sched-custom-image", None)?).await?;
        let (node, bound) = self
            .wait_bound("sched-custom-image", created, POD_DEADLINE)
            .await?;
        ensure!(self.is_worker(&node), "sched-custom-image on {node}");
        let client = self.bed.guest_client().await?;
        let pod: Pod = Api::namespaced(client, "kube-system")
            .get(&format!(
                "kube-scheduler-{}",
                node_of_control_plane(&seen.bc)?
            ))
            .await?;
        let running_image = pod
            .spec
            .and_then(|s| s.containers.into_iter().next())
            .and_then(|c| c.image);
        ensure!(
            running_image.as_deref() == Some(CUSTOM_IMAGE),
            "the scheduler's pod runs {running_image:?}, not {CUSTOM_IMAGE}"
        );
        eprintln!(
            "  image {CUSTOM_IMAGE}: running and healthy {:.1?} after the edit; \
             sched-custom-image bound to {node} {bound:.1?} after it was created",
            seen.after
        );
        let edit = self.set_image(None).await?;
        let seen = self
            .wait_scheduler("kubeadm's image back", edit, SWITCH_DEADLINE, |bc| {
                running(bc, DEFAULTS)
                    && image_of(bc)
                        .is_some_and(|i| i.starts_with("registry.k8s.io/kube-scheduler:"))
            })
            .await?;
        eprintln!(
            "  image removed: kubeadm's {} back {:.1?} after the edit",
            image_of(&seen.bc).unwrap_or_default(),
            seen.after
        );
        self.delete_pods().await?;

        // 6. As found.
        let bc = self
            .bed
            .wait_ready("Ready with the default scheduler", SWITCH_DEADLINE)
            .await?;
        ensure!(
            bc.spec.scheduler.config.is_none() && bc.spec.scheduler.image.is_none(),
            "spec.scheduler still set"
        );
        Ok(())
    }

    /// Sets or removes `spec.scheduler.config` (a merge patch: only ever from none to
    /// one, or to none); the instant the edit was accepted.
    async fn set_config(
        &self,
        config: Option<&KubeSchedulerConfiguration>,
    ) -> anyhow::Result<Instant> {
        self.edit_scheduler(json!({"config": serde_json::to_value(config)?}))
            .await
    }

    /// Sets or removes `spec.scheduler.image`; the instant the edit was accepted.
    async fn set_image(&self, image: Option<&str>) -> anyhow::Result<Instant> {
        self.edit_scheduler(json!({"image": image})).await
    }

    /// Merges `fields` into `spec.scheduler`; the instant the edit was accepted.
    async fn edit_scheduler(&self, fields: Value) -> anyhow::Result<Instant> {
        let patch = json!({"spec": {"scheduler": fields}});
        self.bed
            .api
            .patch(
                &self.bed.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .with_context(|| format!("editing spec.scheduler: {fields}"))?;
        Ok(Instant::now())
    }

    /// Polls the BenchCluster until `done`, printing each new scheduler line; fails if
    /// Ready was True while SchedulerReady was not.
    async fn wait_scheduler(
        &self,
        what: &str,
        since: Instant,
        deadline: Duration,
        done: impl Fn(&BenchCluster) -> bool,
    ) -> anyhow::Result<Seen> {
        let last: Mutex<Option<String>> = Mutex::new(None);
        let reasons: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let broken: Mutex<Option<String>> = Mutex::new(None);
        let result = wait::until(what, deadline, POLL, || async {
            let bc = self.bed.get().await?;
            let line = scheduler_line(&bc);
            let mut seen = last.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.as_deref() != Some(line.as_str()) {
                eprintln!("  [{}] {line}", wait::clock());
                *seen = Some(line.clone());
            }
            if let Some((status, why)) = reason(&bc) {
                let now = format!("{status}/{why}");
                let mut reasons = reasons.lock().unwrap_or_else(PoisonError::into_inner);
                if reasons.last() != Some(&now) {
                    reasons.push(now);
                }
            }
            let status = bc.status_or_default();
            if conditions::is_true(&status.conditions, ConditionType::Ready)
                && !conditions::is_true(&status.conditions, ConditionType::SchedulerReady)
            {
                broken
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(line);
            }
            anyhow::Ok(done(&bc).then_some(bc))
        })
        .await;
        let after = since.elapsed();
        let last = last.into_inner().unwrap_or_else(PoisonError::into_inner);
        let bc = result.map_err(|error| match last {
            Some(last) => error.context(format!("last seen: {last}")),
            None => error,
        })?;
        if let Some(line) = broken.into_inner().unwrap_or_else(PoisonError::into_inner) {
            anyhow::bail!("Ready while SchedulerReady was not True: {line}");
        }
        let reasons = reasons.into_inner().unwrap_or_else(PoisonError::into_inner);
        Ok(Seen {
            bc,
            after,
            reasons: reasons.join(" -> "),
        })
    }

    fn is_worker(&self, node: &str) -> bool {
        node == self.small || node == self.gpu
    }

    /// A bare pod of the pause image that tolerates the fake GPU and may only run on the
    /// two workers; `scheduler` names its profile.
    fn pod(&self, name: &str, scheduler: Option<&str>) -> anyhow::Result<Pod> {
        let mut spec = json!({
            "containers": [{
                "name": "pause",
                "image": self.image,
                "imagePullPolicy": "Never",
                "resources": {"requests": {"cpu": CPU, "memory": MEMORY}}
            }],
            "terminationGracePeriodSeconds": 0,
            "tolerations": [
                {"key": FAKE_GPU, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
            ],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": POOL_LABEL, "operator": "In", "values": ["small", "gpu"]}
                ]}]
            }}}
        });
        if let Some(scheduler) = scheduler {
            spec["schedulerName"] = json!(scheduler);
        }
        Ok(serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": PODS_NAMESPACE,
                "labels": {LABEL_KEY: LABEL_VALUE}
            },
            "spec": spec
        }))?)
    }

    async fn create(&self, pod: Pod) -> anyhow::Result<()> {
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating {}", pod.metadata.name.unwrap_or_default()))?;
        Ok(())
    }

    /// Waits until `name` has a node; the node and the time since `since`.
    async fn wait_bound(
        &self,
        name: &str,
        since: Instant,
        deadline: Duration,
    ) -> anyhow::Result<(String, Duration)> {
        wait::until(&format!("{name} bound"), deadline, POLL, || async {
            let pod = self.pods.get(name).await?;
            anyhow::Ok(
                pod.spec
                    .and_then(|s| s.node_name)
                    .map(|node| (node, since.elapsed())),
            )
        })
        .await
    }

    /// Creates `PODS` identical pods one at a time, each bound before the next; their
    /// nodes in order.
    async fn place(&self, what: &str) -> anyhow::Result<Vec<String>> {
        let mut placed = Vec::new();
        for i in 0..PODS {
            let name = format!("sched-{what}-{i}");
            self.create(self.pod(&name, None)?).await?;
            let (node, _) = self.wait_bound(&name, Instant::now(), POD_DEADLINE).await?;
            ensure!(self.is_worker(&node), "{name} on {node}, not a worker");
            placed.push(node);
        }
        eprintln!("  {what}: {PODS} pods on {placed:?}");
        Ok(placed)
    }

    fn spread(&self, what: &str, placed: &[String]) -> anyhow::Result<()> {
        ensure!(
            placed.contains(&self.small) && placed.contains(&self.gpu),
            "{what}: the pods are not spread over {} and {}: {placed:?}",
            self.small,
            self.gpu
        );
        Ok(())
    }

    /// Deletes the scenario's pods and waits until they are gone.
    async fn delete_pods(&self) -> anyhow::Result<()> {
        let ours = ListParams::default().labels(&format!("{LABEL_KEY}={LABEL_VALUE}"));
        self.pods
            .delete_collection(&DeleteParams::default(), &ours)
            .await
            .context("deleting the scenario's pods")?;
        wait::until("the scenario's pods gone", POD_DEADLINE, POLL, || async {
            anyhow::Ok(self.pods.list(&ours).await?.items.is_empty().then_some(()))
        })
        .await
    }

    /// After a failure: the pods and the configuration go (not waited for), so that the
    /// next run starts from the defaults.
    async fn clean_up(&self) {
        let ours = ListParams::default().labels(&format!("{LABEL_KEY}={LABEL_VALUE}"));
        if let Err(error) = self
            .pods
            .delete_collection(&DeleteParams::default(), &ours)
            .await
        {
            eprintln!("  deleting the scenario's pods after the failure: {error}");
        }
        match self
            .edit_scheduler(json!({"config": null, "image": null}))
            .await
        {
            Ok(_) => eprintln!("  removed spec.scheduler's config and image after the failure"),
            Err(error) => eprintln!("  removing spec.scheduler's config and image: {error:#}"),
        }
    }
}

/// The status describes the current spec.
fn current(bc: &BenchCluster) -> bool {
    bc.status
        .as_ref()
        .is_some_and(|s| s.observed_generation == bc.metadata.generation)
}

/// SchedulerReady's status and reason.
fn reason(bc: &BenchCluster) -> Option<(&str, &str)> {
    let status = bc.status.as_ref()?;
    conditions::find(&status.conditions, ConditionType::SchedulerReady)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

fn check_reason(bc: &BenchCluster, want: &str) -> anyhow::Result<()> {
    let got = reason(bc).map(|(_, r)| r);
    ensure!(
        got == Some(want),
        "SchedulerReady reason {got:?}, want {want}"
    );
    Ok(())
}

/// The scheduler's image as status reports it.
fn image_of(bc: &BenchCluster) -> Option<String> {
    bc.status.as_ref()?.scheduler.as_ref()?.image.clone()
}

/// The control plane's node name.
fn node_of_control_plane(bc: &BenchCluster) -> anyhow::Result<String> {
    bc.status_or_default()
        .nodes
        .into_iter()
        .find(|n| n.role == Role::ControlPlane)
        .map(|n| n.name)
        .context("no control-plane node in status")
}

/// The scheduler runs the configuration of `hash`, healthy, nothing rejected, and
/// SchedulerReady is True, for the current spec.
fn running(bc: &BenchCluster, hash: &str) -> bool {
    let Some(status) = bc.status.as_ref() else {
        return false;
    };
    current(bc)
        && status
            .scheduler
            .as_ref()
            .is_some_and(|s| s.config_hash == hash && s.healthy && s.rejected.is_none())
        && conditions::is_true(&status.conditions, ConditionType::SchedulerReady)
}

/// The defaults run healthy again and the configuration of `bad` is the rejected one.
fn rolled_back(bc: &BenchCluster, bad: &str) -> bool {
    current(bc)
        && bc
            .status
            .as_ref()
            .and_then(|s| s.scheduler.as_ref())
            .is_some_and(|s| {
                s.config_hash == DEFAULTS
                    && s.healthy
                    && s.rejected.as_ref().is_some_and(|r| r.config_hash == bad)
            })
}

/// Generations, the scheduler's status and the SchedulerReady and Ready conditions.
fn scheduler_line(bc: &BenchCluster) -> String {
    let status = bc.status_or_default();
    let condition = |type_| {
        conditions::find(&status.conditions, type_).map_or_else(
            || "-".to_owned(),
            |c| format!("{} ({}: {})", c.status, c.reason, c.message),
        )
    };
    let scheduler = status.scheduler.as_ref().map_or_else(
        || "-".to_owned(),
        |s| {
            format!(
                "{} healthy={} image={} rejected={}",
                s.config_hash,
                s.healthy,
                s.image.as_deref().unwrap_or("-"),
                s.rejected.as_ref().map_or("-", |r| r.config_hash.as_str())
            )
        },
    );
    format!(
        "generation {:?} observed {:?}; scheduler {scheduler}; SchedulerReady {}; Ready {}",
        bc.metadata.generation,
        status.observed_generation,
        condition(ConditionType::SchedulerReady),
        condition(ConditionType::Ready)
    )
}

fn config_hash(config: &KubeSchedulerConfiguration) -> String {
    config.hash()
}

/// Scores by MostAllocated, without the plugins that spread; the same profile as
/// `default-scheduler` and as `PROBE_PROFILE`.
fn most_allocated() -> anyhow::Result<KubeSchedulerConfiguration> {
    let profile = |name: &str| {
        json!({
            "schedulerName": name,
            "pluginConfig": [{
                "name": "NodeResourcesFit",
                "args": {"scoringStrategy": {"type": "MostAllocated"}}
            }],
            "plugins": {"score": {"disabled": [
                {"name": "NodeResourcesBalancedAllocation"},
                {"name": "PodTopologySpread"}
            ]}}
        })
    };
    configuration(json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "percentageOfNodesToScore": 100,
        "profiles": [profile("default-scheduler"), profile(PROBE_PROFILE)]
    }))
}

/// A score plugin kube-scheduler does not have.
fn unknown_plugin() -> anyhow::Result<KubeSchedulerConfiguration> {
    configuration(json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "profiles": [{
            "schedulerName": "default-scheduler",
            "plugins": {"score": {"enabled": [{"name": BAD_PLUGIN, "weight": 1}]}}
        }]
    }))
}

fn configuration(value: Value) -> anyhow::Result<KubeSchedulerConfiguration> {
    Ok(serde_json::from_value(value)?)
}
