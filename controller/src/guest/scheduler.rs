//! kube-scheduler's side of the control plane: the configuration file it reads (the
//! spec's KubeSchedulerConfiguration plus the fields the controller manages), the
//! ClusterConfiguration's `scheduler` section that makes kubeadm's static pod read it,
//! and the live switch: kubeadm regenerates the static pod's manifest
//! (`kubeadm init phase control-plane scheduler`, so kubeadm's own layout is kept), the
//! kubelet replaces the pod, and the new scheduler is watched until healthy or rolled
//! back.
//!
//! Each configuration is a file of its own, named by its hash, so the manifest says
//! which one runs and the one to roll back to is still on disk.

use std::time::Duration;

use benchcluster_crd::KubeSchedulerConfiguration;
use benchcluster_crd::components::Component;
use benchcluster_crd::scheduler::DEFAULTS;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use kube::api::LogParams;
use openssh::Session;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use super::kubeadm::{arg, control_plane_args, init_configuration};
use super::redact::redact_tokens;
use super::ssh::SshGuest;
use super::{
    AdminKubeconfig, GuestError, GuestNode, InitConfig, KubernetesSpec, Result, RunningScheduler,
};

/// Directory of the scheduler's configurations, mounted read-only into its pod. It holds
/// nothing else: the kubeadm documents in /etc/benchcluster carry a bootstrap token.
pub(super) const CONFIG_DIR: &str = "/etc/kubernetes/benchcluster/scheduler";
/// The kubeconfig kubeadm writes for the scheduler and mounts into its pod.
const KUBECONFIG: &str = "/etc/kubernetes/scheduler.conf";
/// Name of the pod volume holding [`CONFIG_DIR`] (kubeadm's own are `kubeconfig`).
const VOLUME: &str = "benchcluster-scheduler-config";
/// The kubeadm documents a switch regenerates the scheduler's manifest from.
const PHASE_CONFIG: &str = "/etc/benchcluster/kubeadm-scheduler.yaml";
/// kube-scheduler's container in kubeadm's static pod.
const CONTAINER: &str = "kube-scheduler";
/// How often a switch looks at the scheduler's pod.
const POLL: Duration = Duration::from_secs(1);
/// Most characters of the scheduler's error carried into status.
const MAX_MESSAGE: usize = 600;
/// Environment variable naming the switch that wrote the scheduler's manifest. Each
/// switch's manifest differs by it, so its pod is a new one (a new UID) even when it
/// returns to a configuration that ran before: the statuses it shows are all its own.
const SWITCH_ENV: &str = "BENCHCLUSTER_SCHEDULER_SWITCH";
/// Environment variable naming the custom image a switch asked for (absent: kubeadm's).
const IMAGE_ENV: &str = "BENCHCLUSTER_SCHEDULER_IMAGE";
/// kubeadm patches a switch to a custom image applies to the scheduler's manifest.
const PATCHES_DIR: &str = "/etc/benchcluster/scheduler-patches";
/// Waiting reasons of a container that will not start by itself.
const FAILED_WAITING: [&str; 8] = [
    "CrashLoopBackOff",
    "Error",
    "CreateContainerError",
    "CreateContainerConfigError",
    "RunContainerError",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
];

/// The file of the configuration with this hash.
pub(super) fn config_path(hash: &str) -> String {
    format!("{CONFIG_DIR}/config-{hash}.yaml")
}

/// The configuration hash a `--config` path names; [`DEFAULTS`] without one. A file
/// not written by the controller is named by its path.
fn hash_of(config_arg: Option<&str>) -> String {
    let Some(path) = config_arg else {
        return DEFAULTS.to_owned();
    };
    path.strip_prefix(CONFIG_DIR)
        .and_then(|name| name.strip_prefix("/config-"))
        .and_then(|name| name.strip_suffix(".yaml"))
        .map_or_else(|| path.to_owned(), str::to_owned)
}

/// The file kube-scheduler reads with `--config`, as JSON (JSON is YAML): the user's
/// fields as written, with the managed ones set. With `--config` kube-scheduler
/// ignores its `--kubeconfig` flag, so the file must name the kubeconfig itself.
pub(super) fn config_file(config: &KubeSchedulerConfiguration) -> String {
    let mut document = config.0.clone();
    document.insert("clientConnection".into(), json!({"kubeconfig": KUBECONFIG}));
    // Agrees with the `leader-elect` flag of [`component`].
    document.insert("leaderElection".into(), json!({"leaderElect": false}));
    format!("{:#}\n", Value::Object(document))
}

/// The ClusterConfiguration's `scheduler` section (kubeadm v1beta4); `config_file` is
/// the configuration the scheduler reads, if any; `switch` names the switch writing it,
/// and `image` the custom image it asks for. The user's flags and the feature gates of
/// `kubernetes` follow the controller's, at init and at every switch alike.
pub(super) fn component(
    config_file: Option<&str>,
    switch: Option<&str>,
    image: Option<&str>,
    kubernetes: &KubernetesSpec,
) -> Value {
    // Leader election off, as for kube-controller-manager (one control plane; see
    // `init_configuration`). The flag stays with a config file too: kubeadm always
    // passes `--leader-elect=true`, and kube-scheduler lets leader-election flags
    // override its `--config` file.
    let mut args = vec![arg("leader-elect", "false")];
    let mut section = serde_json::Map::new();
    if let Some(path) = config_file {
        args.push(arg("config", path));
        section.insert(
            "extraVolumes".into(),
            json!([{
                "name": VOLUME,
                "hostPath": CONFIG_DIR,
                "mountPath": CONFIG_DIR,
                "readOnly": true,
                "pathType": "Directory",
            }]),
        );
    }
    let mut envs = Vec::new();
    if let Some(switch) = switch {
        envs.push(json!({"name": SWITCH_ENV, "value": switch}));
    }
    if let Some(image) = image {
        envs.push(json!({"name": IMAGE_ENV, "value": image}));
    }
    if !envs.is_empty() {
        section.insert("extraEnvs".into(), Value::Array(envs));
    }
    section.insert(
        "extraArgs".into(),
        control_plane_args(args, Component::Scheduler, kubernetes),
    );
    Value::Object(section)
}

/// The name of the control plane's scheduler pod (kubeadm's static pod, mirrored).
fn pod_name(control_plane: &str) -> String {
    format!("{CONTAINER}-{control_plane}")
}

fn container_status(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)
}

/// What the pod says of the scheduler: the configuration its command names, its
/// image, and whether its container runs and is ready.
pub(super) fn running(pod: &Pod) -> Option<RunningScheduler> {
    let container = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)?;
    let config_arg = container
        .command
        .iter()
        .chain(&container.args)
        .flatten()
        .find_map(|arg| arg.strip_prefix("--config="));
    let status = container_status(pod);
    let started = status
        .and_then(|s| s.state.as_ref())
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.clone());
    Some(RunningScheduler {
        config_hash: hash_of(config_arg),
        image: container.image.clone().unwrap_or_default(),
        custom_image: env_of(pod, IMAGE_ENV).map(str::to_owned),
        healthy: started.is_some() && status.is_some_and(|s| s.ready),
        started,
    })
}

/// The kubeadm patch (JSON patch) that runs `image` in the scheduler's pod, never
/// pulled.
pub(super) fn image_patch(image: &str) -> String {
    let patch = json!([
        {"op": "replace", "path": "/spec/containers/0/image", "value": image},
        {"op": "replace", "path": "/spec/containers/0/imagePullPolicy", "value": "Never"},
    ]);
    format!("{patch}\n")
}

/// The switch that wrote the pod's manifest ([`SWITCH_ENV`]).
fn switch_of(pod: &Pod) -> Option<&str> {
    env_of(pod, SWITCH_ENV)
}

/// The value of an environment variable of the scheduler's container.
fn env_of<'a>(pod: &'a Pod, name: &str) -> Option<&'a str> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

/// Whether the scheduler's container has failed since its pod began (each switch's pod
/// is new): it exited, the kubelet restarted it, or it cannot start.
fn failed(pod: &Pod) -> bool {
    container_status(pod).is_some_and(|s| {
        let state = s.state.as_ref();
        s.restart_count > 0
            || s.last_state
                .as_ref()
                .is_some_and(|l| l.terminated.is_some())
            || state.is_some_and(|st| st.terminated.is_some())
            || state
                .and_then(|st| st.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                .is_some_and(|reason| FAILED_WAITING.contains(&reason))
    })
}

/// The scheduler's own error from its log: the last klog error or fatal line (`E1207
/// 12:00:00.000000 1 run.go:72] "command failed" err="..."`) without its header, else
/// the last line.
pub(super) fn error_line(log: &str) -> Option<String> {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let is_error = |line: &str| {
        let mut chars = line.chars();
        matches!(chars.next(), Some('E' | 'F')) && chars.take(4).all(|c| c.is_ascii_digit())
    };
    let line = lines
        .iter()
        .rev()
        .find(|l| is_error(l))
        .or_else(|| lines.iter().rev().find(|l| l.contains("err=")))
        .or(lines.last())?;
    let body = if is_error(line) {
        line.split_once("] ").map_or(*line, |(_, rest)| rest)
    } else {
        line
    };
    Some(redact_tokens(body).chars().take(MAX_MESSAGE).collect())
}

/// A name for one switch: the host's clock in milliseconds.
fn switch_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_millis().to_string()
}

/// What a switch makes the scheduler run.
struct Target<'a> {
    /// The configuration file; none: kube-scheduler's defaults.
    config_file: Option<&'a str>,
    /// A custom image; none: kubeadm's.
    image: Option<&'a str>,
    /// Names the switch ([`SWITCH_ENV`]).
    switch: String,
}

/// How waiting for a scheduler ended, short of success.
enum NotHealthy {
    /// Its container failed; the error from its log.
    Refused(String),
    TimedOut,
}

impl SshGuest {
    /// The control plane's scheduler pod, if the API shows it.
    async fn scheduler_pod(
        &self,
        kubeconfig: &AdminKubeconfig,
        control_plane: &str,
    ) -> Result<Option<Pod>> {
        let client = self.client(kubeconfig).await?;
        Api::<Pod>::namespaced(client, "kube-system")
            .get_opt(&pod_name(control_plane))
            .await
            .map_err(|e| self.api_error(kubeconfig, e))
    }

    /// See [`Guest::scheduler`](super::Guest::scheduler).
    pub(super) async fn observe_scheduler(
        &self,
        kubeconfig: &AdminKubeconfig,
        control_plane: &str,
    ) -> Result<Option<RunningScheduler>> {
        Ok(self
            .scheduler_pod(kubeconfig, control_plane)
            .await?
            .as_ref()
            .and_then(running))
    }

    /// See [`Guest::switch_scheduler`](super::Guest::switch_scheduler).
    pub(super) async fn switch_scheduler_on(
        &self,
        session: &Session,
        node: &GuestNode,
        kubeconfig: &AdminKubeconfig,
        config: &InitConfig,
    ) -> Result<RunningScheduler> {
        let wanted = config.scheduler.config_hash();
        let image = config.scheduler.image.clone();
        let before = self.observe_scheduler(kubeconfig, &node.name).await?;
        if let Some(running) = before
            .as_ref()
            .filter(|r| r.runs(&config.scheduler) && r.healthy)
        {
            return Ok(running.clone());
        }
        // Back to what ran before when it was healthy, else to kube-scheduler's defaults
        // with kubeadm's image.
        let healthy_before = before.as_ref().filter(|r| r.healthy);
        let fallback = healthy_before
            .map(|r| r.config_hash.clone())
            .filter(|hash| hash.starts_with("sha256-"));
        let fallback_image = healthy_before.and_then(|r| r.custom_image.clone());
        let wanted_path = config
            .scheduler
            .config
            .as_ref()
            .map(|_| config_path(&wanted));
        if let (Some(document), Some(path)) = (&config.scheduler.config, &wanted_path) {
            self.put_file(session, node, path, config_file(document).as_bytes())
                .await?;
        }
        // Asked once: the switch and its rollback render the same cluster.
        let version = self.kubeadm_version(session, node).await?;
        let target = Target {
            config_file: wanted_path.as_deref(),
            image: image.as_deref(),
            switch: switch_id(),
        };
        info!(node = %node.name, config = %wanted, image = ?image, switch = %target.switch, "switching the scheduler");
        self.regenerate_scheduler(session, node, config, &version, &target)
            .await?;
        let error = match self
            .await_scheduler(kubeconfig, node, &wanted, &target.switch)
            .await?
        {
            Ok(running) => {
                // kubeadm's record of the cluster (kube-system/kubeadm-config) follows,
                // so a later kubeadm run keeps this scheduler.
                let upload = [
                    "init",
                    "phase",
                    "upload-config",
                    "kubeadm",
                    "--config",
                    PHASE_CONFIG,
                ];
                if let Err(error) = self
                    .kubeadm(session, node, "kubeadm upload-config", &upload)
                    .await
                {
                    warn!(node = %node.name, %error, "kubeadm-config not updated");
                }
                return Ok(running);
            }
            Err(NotHealthy::Refused(message)) => message,
            Err(NotHealthy::TimedOut) => format!(
                "not healthy within {}s",
                self.config.scheduler_timeout.as_secs()
            ),
        };
        warn!(node = %node.name, config = %wanted, %error, "scheduler refused its configuration; rolling back");
        let back = fallback.as_deref().unwrap_or(DEFAULTS);
        let back_path = fallback.as_deref().map(config_path);
        let target = Target {
            config_file: back_path.as_deref(),
            image: fallback_image.as_deref(),
            switch: switch_id(),
        };
        self.regenerate_scheduler(session, node, config, &version, &target)
            .await?;
        let message = match self
            .await_scheduler(kubeconfig, node, back, &target.switch)
            .await?
        {
            Ok(_) => error,
            Err(NotHealthy::Refused(again)) => {
                format!("{error}; the rollback to {back} failed too: {again}")
            }
            Err(NotHealthy::TimedOut) => {
                format!("{error}; the rollback to {back} is not healthy yet")
            }
        };
        Err(GuestError::SchedulerRejected {
            config_hash: wanted,
            image,
            message,
        })
    }

    /// Has kubeadm (`version`) write the scheduler's manifest for `target` from the
    /// cluster's own kubeadm configuration (a custom image through a kubeadm patch); the kubelet then
    /// replaces the pod.
    async fn regenerate_scheduler(
        &self,
        session: &Session,
        node: &GuestNode,
        config: &InitConfig,
        version: &str,
        target: &Target<'_>,
    ) -> Result<()> {
        let document = init_configuration(
            node,
            config,
            version,
            self.config.join_token_ttl,
            component(
                target.config_file,
                Some(&target.switch),
                target.image,
                &config.kubernetes,
            ),
            target.image.map(|_| PATCHES_DIR),
        );
        self.put_file(session, node, PHASE_CONFIG, document.as_bytes())
            .await?;
        // Only this switch's patch in the directory kubeadm reads.
        self.run(
            session,
            node,
            "clear scheduler patches",
            &["sudo", "-n", "rm", "-rf", PATCHES_DIR],
            None,
            self.config.command_timeout,
        )
        .await?;
        if let Some(image) = target.image {
            let patch = format!("{PATCHES_DIR}/kube-scheduler+json.json");
            self.put_file(session, node, &patch, image_patch(image).as_bytes())
                .await?;
        }
        let args = [
            "init",
            "phase",
            "control-plane",
            "scheduler",
            "--config",
            PHASE_CONFIG,
        ];
        self.kubeadm(session, node, "kubeadm control-plane scheduler", &args)
            .await
            .map(drop)
    }

    /// Waits, bounded, until the pod of `switch` runs configuration `hash` and is ready,
    /// or its container fails. API errors on the way (the API server is busy while the
    /// scheduler restarts) are retried until the bound.
    async fn await_scheduler(
        &self,
        kubeconfig: &AdminKubeconfig,
        node: &GuestNode,
        hash: &str,
        switch: &str,
    ) -> Result<std::result::Result<RunningScheduler, NotHealthy>> {
        let deadline = tokio::time::Instant::now() + self.config.scheduler_timeout;
        loop {
            match self.scheduler_pod(kubeconfig, &node.name).await {
                Ok(Some(pod)) if switch_of(&pod) == Some(switch) => {
                    if let Some(running) = running(&pod).filter(|r| r.config_hash == hash) {
                        if failed(&pod) {
                            let message = self.scheduler_error(kubeconfig, &pod).await;
                            return Ok(Err(NotHealthy::Refused(message)));
                        }
                        if running.healthy {
                            return Ok(Ok(running));
                        }
                    }
                }
                // Not the new pod yet: the kubelet reads its manifests every few seconds.
                Ok(_) => {}
                Err(error) => debug!(node = %node.name, %error, "waiting for the scheduler"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Err(NotHealthy::TimedOut));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The failed scheduler's error, from the log of its last ended container (or the
    /// running one's, when it has not ended yet), else its exit status.
    async fn scheduler_error(&self, kubeconfig: &AdminKubeconfig, pod: &Pod) -> String {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let exit = container_status(pod)
            .and_then(|s| {
                let state = s.state.as_ref()?.terminated.as_ref();
                state.or(s.last_state.as_ref()?.terminated.as_ref())
            })
            .map(|t| format!("kube-scheduler exited with code {}", t.exit_code));
        if let Ok(client) = self.client(kubeconfig).await {
            let pods = Api::<Pod>::namespaced(client, "kube-system");
            for previous in [true, false] {
                let params = LogParams {
                    container: Some(CONTAINER.into()),
                    previous,
                    tail_lines: Some(40),
                    ..LogParams::default()
                };
                match pods.logs(&name, &params).await {
                    Ok(log) => {
                        if let Some(line) = error_line(&log) {
                            return line;
                        }
                    }
                    Err(error) => debug!(pod = %name, previous, %error, "no scheduler log"),
                }
            }
        }
        exit.unwrap_or_else(|| "kube-scheduler failed and left no log".into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn most_allocated() -> KubeSchedulerConfiguration {
        serde_json::from_value(json!({
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "percentageOfNodesToScore": 100,
            "profiles": [{
                "schedulerName": "default-scheduler",
                "pluginConfig": [{
                    "name": "NodeResourcesFit",
                    "args": {"scoringStrategy": {"type": "MostAllocated"}},
                }],
            }],
        }))
        .unwrap()
    }

    #[test]
    fn the_config_file_keeps_the_users_fields_and_sets_the_managed_ones() {
        let config = most_allocated();
        let file: Value = serde_json::from_str(&config_file(&config)).unwrap();
        for (field, value) in &config.0 {
            assert_eq!(&file[field], value, "{field}");
        }
        assert_eq!(
            file["clientConnection"],
            json!({"kubeconfig": "/etc/kubernetes/scheduler.conf"})
        );
        assert_eq!(file["leaderElection"], json!({"leaderElect": false}));
        assert_eq!(
            file.as_object().unwrap().len(),
            config.0.len() + benchcluster_crd::scheduler::MANAGED_FIELDS.len()
        );
    }

    #[test]
    fn the_managed_fields_win_over_any_in_the_spec() {
        // The CRD refuses them; the file does not rely on that.
        let mut config = most_allocated();
        config.0.insert(
            "clientConnection".into(),
            json!({"kubeconfig": "/elsewhere", "qps": 5}),
        );
        config
            .0
            .insert("leaderElection".into(), json!({"leaderElect": true}));
        let file: Value = serde_json::from_str(&config_file(&config)).unwrap();
        assert_eq!(
            file["clientConnection"],
            json!({"kubeconfig": "/etc/kubernetes/scheduler.conf"})
        );
        assert_eq!(file["leaderElection"], json!({"leaderElect": false}));
    }

    #[test]
    fn each_config_file_is_inside_the_mounted_directory_and_names_its_hash() {
        let hash = most_allocated().hash();
        let path = config_path(&hash);
        let mounted = component(
            Some(&path),
            Some("17"),
            Some("localhost/sched:custom"),
            &KubernetesSpec::default(),
        );
        let volume = &mounted["extraVolumes"][0];
        assert_eq!(volume["hostPath"], CONFIG_DIR);
        assert_eq!(volume["mountPath"], CONFIG_DIR);
        assert_eq!(volume["readOnly"], true);
        assert_eq!(
            std::path::Path::new(&path).parent(),
            Some(std::path::Path::new(CONFIG_DIR))
        );
        assert_eq!(
            mounted["extraEnvs"],
            json!([
                {"name": SWITCH_ENV, "value": "17"},
                {"name": IMAGE_ENV, "value": "localhost/sched:custom"},
            ])
        );
        assert!(
            component(None, None, None, &KubernetesSpec::default())
                .get("extraVolumes")
                .is_none()
        );
        assert!(
            component(None, None, None, &KubernetesSpec::default())
                .get("extraEnvs")
                .is_none()
        );
        assert_eq!(hash_of(Some(&path)), hash);
        assert_eq!(hash_of(None), DEFAULTS);
        assert_eq!(hash_of(Some("/etc/other.yaml")), "/etc/other.yaml");
    }

    #[test]
    fn a_switch_keeps_the_users_flags_and_gates_after_its_own() {
        let mut kubernetes = KubernetesSpec::default();
        kubernetes
            .feature_gates
            .insert("SchedulerQueueingHints".into(), false);
        for (flag, value) in [("v", "4"), ("leader-elect", "true"), ("config", "/x")] {
            kubernetes
                .extra_args
                .scheduler
                .insert(flag.into(), value.into());
        }
        let path = config_path(&most_allocated().hash());
        let expected = json!([
            {"name": "leader-elect", "value": "false"},
            {"name": "config", "value": path},
            {"name": "v", "value": "4"},
            {"name": "feature-gates", "value": "SchedulerQueueingHints=false"},
        ]);
        // At init and at a switch to a custom image alike.
        let at_init = component(Some(&path), None, None, &kubernetes);
        let at_switch = component(Some(&path), Some("17"), Some("localhost/s:1"), &kubernetes);
        assert_eq!(at_init["extraArgs"], expected);
        assert_eq!(at_switch["extraArgs"], expected);
        let defaults = component(None, Some("18"), None, &kubernetes);
        assert_eq!(
            defaults["extraArgs"],
            json!([
                {"name": "leader-elect", "value": "false"},
                {"name": "v", "value": "4"},
                {"name": "feature-gates", "value": "SchedulerQueueingHints=false"},
            ])
        );
    }

    fn pod(command: &[&str], ready: bool, restarts: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "kube-scheduler-c-cp-0", "namespace": "kube-system"},
            "spec": {"containers": [{
                "name": "kube-scheduler",
                "image": "registry.k8s.io/kube-scheduler:v1.35.4",
                "command": command,
                "env": [{"name": SWITCH_ENV, "value": "17"}],
            }]},
            "status": {"containerStatuses": [{
                "name": "kube-scheduler",
                "image": "registry.k8s.io/kube-scheduler:v1.35.4",
                "imageID": "",
                "ready": ready,
                "restartCount": restarts,
                "state": {"running": {"startedAt": "2026-12-07T18:00:00Z"}},
            }]},
        }))
        .unwrap()
    }

    #[test]
    fn the_pod_says_which_configuration_runs_and_whether_it_is_healthy() {
        let path = config_path("sha256-0123456789abcdef");
        let arg = format!("--config={path}");
        let with_config = pod(&["kube-scheduler", "--leader-elect=false", &arg], true, 0);
        let running = running(&with_config).unwrap();
        assert_eq!(running.config_hash, "sha256-0123456789abcdef");
        assert!(running.healthy);
        assert_eq!(running.image, "registry.k8s.io/kube-scheduler:v1.35.4");
        assert!(running.started.is_some());
        assert!(!failed(&with_config));

        let defaults = pod(&["kube-scheduler"], false, 0);
        let running = super::running(&defaults).unwrap();
        assert_eq!(running.config_hash, DEFAULTS);
        assert!(!running.healthy, "not ready yet");

        assert!(failed(&pod(&["kube-scheduler", &arg], false, 1)));
        assert_eq!(switch_of(&with_config), Some("17"));
        let waiting = |reason: &str| {
            let mut pod = pod(&["kube-scheduler", &arg], false, 0);
            pod.status
                .as_mut()
                .unwrap()
                .container_statuses
                .as_mut()
                .unwrap()[0]
                .state =
                Some(serde_json::from_value(json!({"waiting": {"reason": reason}})).unwrap());
            pod
        };
        assert!(failed(&waiting("CrashLoopBackOff")));
        assert!(!failed(&waiting("ContainerCreating")));
    }

    #[test]
    fn a_custom_image_is_patched_in_never_pulled_and_read_back() {
        let patch: Value = serde_json::from_str(&image_patch("localhost/sched:custom")).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "replace", "path": "/spec/containers/0/image", "value": "localhost/sched:custom"},
                {"op": "replace", "path": "/spec/containers/0/imagePullPolicy", "value": "Never"},
            ])
        );
        let mut custom = pod(&["kube-scheduler"], true, 0);
        custom.spec.as_mut().unwrap().containers[0]
            .env
            .as_mut()
            .unwrap()
            .push(
                serde_json::from_value(
                    json!({"name": IMAGE_ENV, "value": "localhost/sched:custom"}),
                )
                .unwrap(),
            );
        assert_eq!(
            running(&custom).unwrap().custom_image.as_deref(),
            Some("localhost/sched:custom")
        );
        assert_eq!(
            running(&pod(&["kube-scheduler"], true, 0))
                .unwrap()
                .custom_image,
            None
        );
    }

    #[test]
    fn the_schedulers_error_is_its_last_error_line_without_the_klog_header() {
        let log = "I1207 18:35:15.000000       1 serving.go:386] Generated self-signed cert\n\
                   E1207 18:35:16.921000       1 run.go:72] \"command failed\" err=\"initializing profiles: creating profile for scheduler name default-scheduler: \\\"NoSuchPlugin\\\" does not exist\"\n";
        let line = error_line(log).unwrap();
        assert!(line.starts_with("\"command failed\""), "{line}");
        assert!(line.contains("NoSuchPlugin"), "{line}");
        assert_eq!(error_line("just a line\n").as_deref(), Some("just a line"));
        assert_eq!(error_line(""), None);
        let long = format!("E1207 x] {}", "y".repeat(5000));
        assert_eq!(error_line(&long).unwrap().len(), MAX_MESSAGE);
    }
}
