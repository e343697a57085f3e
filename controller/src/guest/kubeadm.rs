//! kubeadm's side of a node: where its files and the controller's completion markers
//! live, the Init/Join configuration documents sent to it on stdin (JSON, so no value
//! can change a document's structure), the join command `kubeadm token create` prints,
//! and the cluster CA an admin kubeconfig names.

use std::collections::BTreeMap;
use std::time::Duration;

use benchcluster_crd::components::{Component, feature_gates_arg};
use kube::config::Kubeconfig;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

#[cfg(doc)]
use super::scheduler;
use super::{AdminKubeconfig, GuestNode, InitConfig, KubernetesSpec, Registration};

pub(super) const INIT_CONFIG: &str = "/etc/benchcluster/kubeadm-init.yaml";
pub(super) const JOIN_CONFIG: &str = "/etc/benchcluster/kubeadm-join.yaml";
/// kubeadm's patches directory on a worker: the pool's kubelet settings, as a patch of
/// the cluster-wide KubeletConfiguration.
pub(super) const PATCHES_DIR: &str = "/etc/benchcluster/kubeadm-patches";
/// The one patch in it: a JSON merge patch of the target `kubeletconfiguration`.
pub(super) const KUBELET_PATCH: &str =
    "/etc/benchcluster/kubeadm-patches/kubeletconfiguration+merge.json";
pub(super) const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
pub(super) const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
/// The cluster CA a joined node trusts (written by kubeadm).
pub(super) const NODE_CA: &str = "/etc/kubernetes/pki/ca.crt";
/// Files kubeadm writes from its first phases on (certificates, kubeconfigs, the
/// kubelet's configuration); a clean image has none of them.
pub(super) const KUBEADM_STATE: [&str; 5] = [
    NODE_CA,
    ADMIN_CONF,
    KUBELET_CONF,
    "/etc/kubernetes/bootstrap-kubelet.conf",
    "/var/lib/kubelet/config.yaml",
];
/// Completion markers, written by the controller right after `kubeadm init` or `kubeadm
/// join` returned success (kubeadm leaves no such record itself). They tell an init or
/// join that completed, which is never reset, from one that died half-way, which is.
pub(super) const INIT_DONE: &str = "/var/lib/benchcluster/kubeadm-init.done";
pub(super) const JOIN_DONE: &str = "/var/lib/benchcluster/kubeadm-join.done";
pub(super) const CRI_SOCKET: &str = "unix:///run/containerd/containerd.sock";
/// kubeadm init phases not run: the kube-proxy and CoreDNS addons.
pub(super) const SKIPPED_INIT_PHASES: [&str; 2] = ["addon/coredns", "addon/kube-proxy"];

/// A freshly minted join credential.
pub(super) struct JoinTicket {
    pub(super) endpoint: String,
    pub(super) token: SecretString,
    pub(super) ca_cert_hash: String,
}

/// The PEM of the CA the kubeconfig's (first) cluster is verified with.
pub(super) fn cluster_ca(kubeconfig: &AdminKubeconfig) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let parsed = Kubeconfig::from_yaml(kubeconfig.0.expose_secret()).ok()?;
    let data = parsed
        .clusters
        .into_iter()
        .find_map(|c| c.cluster?.certificate_authority_data)?;
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .ok()
}

/// Parses `kubeadm join <endpoint> --token <t> --discovery-token-ca-cert-hash sha256:<h>`.
pub(super) fn parse_join_command(text: &str) -> Option<JoinTicket> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("kubeadm join"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let endpoint = (*words.get(2)?).to_owned();
    let after = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .map(|w| (*w).to_owned())
    };
    let token = after("--token")?;
    let ca_cert_hash = after("--discovery-token-ca-cert-hash")?;
    let valid_token = token.len() == 23
        && token.as_bytes()[6] == b'.'
        && token
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 6 || b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid_token || !ca_cert_hash.starts_with("sha256:") || !endpoint.ends_with(":6443") {
        return None;
    }
    Some(JoinTicket {
        endpoint,
        token: SecretString::from(token),
        ca_cert_hash,
    })
}

/// One kubeadm v1beta4 `extraArgs` entry.
pub(super) fn arg(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

/// A component's kubeadm `extraArgs`: the controller's own (`managed`), then the user's
/// flags of `args` (`spec.kubernetes.extraArgs`) without those the controller or
/// kubeadm set, in name order.
pub(super) fn extra_args(
    managed: Vec<Value>,
    component: Component,
    args: &BTreeMap<String, String>,
) -> Vec<Value> {
    let mut all = managed;
    all.extend(
        component
            .user_args(args)
            .map(|(name, value)| arg(name, value)),
    );
    all
}

/// A control-plane component's kubeadm `extraArgs`: [`extra_args`], then the cluster's
/// feature gates as `--feature-gates`.
pub(super) fn control_plane_args(
    managed: Vec<Value>,
    component: Component,
    kubernetes: &KubernetesSpec,
) -> Value {
    let mut all = extra_args(managed, component, kubernetes.extra_args.of(component));
    if let Some(gates) = feature_gates_arg(&kubernetes.feature_gates) {
        all.push(arg("feature-gates", &gates));
    }
    Value::Array(all)
}

/// kubeadm's InitConfiguration + ClusterConfiguration + KubeletConfiguration, as JSON
/// documents (JSON is YAML), so no value can change the document's structure.
/// `scheduler` is the ClusterConfiguration's scheduler section
/// ([`scheduler::component`]).
pub(super) fn init_configuration(
    node: &GuestNode,
    config: &InitConfig,
    version: &str,
    token_ttl: Duration,
    scheduler: Value,
    patches: Option<&str>,
) -> String {
    let kubernetes = &config.kubernetes;
    let ip = node.ip.to_string();
    let timeouts = serde_json::json!({
        "controlPlaneComponentHealthCheck": "15m0s",
        "kubeletHealthCheck": "15m0s",
        "kubernetesAPICall": "5m0s",
        "tlsBootstrap": "15m0s",
    });
    let mut init = serde_json::json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "InitConfiguration",
        // The default token lives 24 h; ours only until the first joins are done.
        "bootstrapTokens": [{
            "ttl": format!("{}s", token_ttl.as_secs()),
            "groups": ["system:bootstrappers:kubeadm:default-node-token"],
            "usages": ["signing", "authentication"],
        }],
        "localAPIEndpoint": {"advertiseAddress": ip, "bindPort": 6443},
        // A scheduler benchmark cluster needs neither a service proxy nor cluster DNS,
        // and images carry neither (docs/image-contract.md); Nodes turn Ready without
        // them. kubeadm then also leaves their images out of its preflight pull check.
        "skipPhases": SKIPPED_INIT_PHASES,
        "nodeRegistration": {
            "name": node.name,
            "criSocket": CRI_SOCKET,
            "kubeletExtraArgs": extra_args(
                vec![arg("node-ip", &ip)],
                Component::Kubelet,
                &kubernetes.extra_args.kubelet,
            ),
        },
        "timeouts": timeouts,
    });
    // kubeadm reads its patches (a custom scheduler image) only from here when given a
    // --config.
    if let Some(directory) = patches {
        init["patches"] = serde_json::json!({"directory": directory});
    }
    let cluster = serde_json::json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "kubernetesVersion": version,
        "networking": {
            "podSubnet": kubernetes.pod_subnet,
            "serviceSubnet": kubernetes.service_subnet,
        },
        "apiServer": {
            "certSANs": [ip],
            "extraArgs": control_plane_args(Vec::new(), Component::ApiServer, kubernetes),
        },
        // One control-plane node, so no one to elect. With leader election on, a
        // slow control plane (software emulation, a busy host) misses the 5 s lease
        // renewals, and kube-controller-manager and kube-scheduler exit and restart
        // over and over: no podCIDR gets allocated, no Node turns Ready.
        "controllerManager": {
            "extraArgs": control_plane_args(
                vec![arg("leader-elect", "false")],
                Component::ControllerManager,
                kubernetes,
            ),
        },
        "scheduler": scheduler,
    });
    let mut kubelet = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "systemd",
    });
    // kubeadm uploads this document (the kubelet-config ConfigMap), and every join
    // writes its kubelet's configuration from it: the gates reach every node.
    if !kubernetes.feature_gates.is_empty() {
        kubelet["featureGates"] = json!(kubernetes.feature_gates);
    }
    format!("{init}\n---\n{cluster}\n---\n{kubelet}\n")
}

pub(super) fn join_configuration(
    worker: &GuestNode,
    ticket: &JoinTicket,
    registration: &Registration,
) -> SecretString {
    let ip = worker.ip.to_string();
    let mut managed = vec![arg("node-ip", &ip)];
    if !registration.labels.is_empty() {
        // Label keys and values hold neither ',' nor '=' (the CRD's patterns).
        let labels: Vec<String> = registration
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        managed.push(arg("node-labels", &labels.join(",")));
    }
    // Feature gates need no flag: they come with the cluster's KubeletConfiguration,
    // which kubeadm join reads (see `init_configuration`).
    let kubelet_args = extra_args(managed, Component::Kubelet, &registration.kubelet_args);
    let taints: Vec<serde_json::Value> = registration
        .taints
        .iter()
        .map(|t| {
            let mut taint = serde_json::json!({"key": t.key, "effect": t.effect.as_str()});
            if !t.value.is_empty() {
                taint["value"] = serde_json::json!(t.value);
            }
            taint
        })
        .collect();
    let mut join = serde_json::json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "JoinConfiguration",
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": ticket.endpoint,
                "token": ticket.token.expose_secret(),
                // Discovery always pins the CA: never unsafeSkipCAVerification.
                "caCertHashes": [ticket.ca_cert_hash],
            },
        },
        "nodeRegistration": {
            "name": worker.name,
            "criSocket": CRI_SOCKET,
            "kubeletExtraArgs": kubelet_args,
            // Set when the kubelet registers the Node, so it never exists untainted
            // (an empty list: none, where absent would mean kubeadm's default).
            "taints": taints,
        },
        "timeouts": {
            // Discovery against a control plane that just minted the token takes
            // seconds; kubeadm retries a token it cannot find (deleted, expired)
            // until this bound, and the next attempt mints a fresh one.
            "discovery": "1m30s",
            "tlsBootstrap": "15m0s",
            "kubernetesAPICall": "5m0s",
        },
    });
    if kubelet_patch(registration).is_some() {
        join["patches"] = serde_json::json!({"directory": PATCHES_DIR});
    }
    SecretString::from(format!("{join}\n"))
}

/// The pool's kubelet settings as a JSON merge patch of the KubeletConfiguration
/// kubeadm writes on the node; `None` when the pool sets none.
pub(super) fn kubelet_patch(registration: &Registration) -> Option<String> {
    let settings = &registration.kubelet;
    let mut patch = serde_json::Map::new();
    if let Some(max_pods) = settings.max_pods {
        patch.insert("maxPods".into(), serde_json::json!(max_pods));
    }
    for (field, reservation) in [
        ("systemReserved", &settings.system_reserved),
        ("kubeReserved", &settings.kube_reserved),
    ] {
        let mut resources = serde_json::Map::new();
        if let Some(cpu) = &reservation.cpu {
            resources.insert("cpu".into(), serde_json::json!(cpu));
        }
        if let Some(memory) = &reservation.memory {
            resources.insert("memory".into(), serde_json::json!(memory));
        }
        if !resources.is_empty() {
            patch.insert(field.into(), serde_json::Value::Object(resources));
        }
    }
    (!patch.is_empty()).then(|| serde_json::Value::Object(patch).to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::guest::SchedulerSpec;
    use crate::guest::scheduler;
    use crate::guest::ssh::tests::node;

    /// `init_configuration` for `config` on x-cp-0 with kubeadm v1.35.4, its scheduler
    /// reading `scheduler_file` (none: the defaults) and kubeadm's patches in `patches`.
    fn init_text(
        config: &InitConfig,
        scheduler_file: Option<&str>,
        patches: Option<&str>,
    ) -> String {
        init_configuration(
            &node("x-cp-0"),
            config,
            "v1.35.4",
            Duration::from_secs(600),
            scheduler::component(scheduler_file, None, None, &config.kubernetes),
            patches,
        )
    }

    /// Its three documents: InitConfiguration, ClusterConfiguration, KubeletConfiguration.
    fn documents(text: &str) -> Vec<serde_json::Value> {
        let documents: Vec<serde_json::Value> = text
            .split("\n---\n")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(documents.len(), 3);
        documents
    }

    #[test]
    fn parses_the_join_command() {
        let text = "kubeadm join 192.168.222.101:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:1234abcd \n";
        let ticket = parse_join_command(text).unwrap();
        assert_eq!(ticket.endpoint, "192.168.222.101:6443");
        assert_eq!(ticket.token.expose_secret(), "abcdef.0123456789abcdef");
        assert_eq!(ticket.ca_cert_hash, "sha256:1234abcd");
        assert!(
            parse_join_command(
                "kubeadm join x:6443 --token bad --discovery-token-ca-cert-hash sha256:1"
            )
            .is_none()
        );
        assert!(parse_join_command("error: something").is_none());
    }

    #[test]
    fn kubeadm_documents_keep_hostile_values_as_strings() {
        let config = InitConfig {
            kubernetes: KubernetesSpec {
                pod_subnet: "10.244.0.0/16\"\n---\nkind: Evil".into(),
                ..KubernetesSpec::default()
            },
            scheduler: SchedulerSpec::default(),
        };
        let text = init_text(&config, None, None);
        let documents = documents(&text);
        let cluster = &documents[1];
        assert_eq!(
            cluster["networking"]["podSubnet"],
            "10.244.0.0/16\"\n---\nkind: Evil"
        );
        assert_eq!(cluster["kubernetesVersion"], "v1.35.4");
        for component in ["controllerManager", "scheduler"] {
            assert_eq!(
                cluster[component]["extraArgs"],
                serde_json::json!([{"name": "leader-elect", "value": "false"}])
            );
        }
        // Without a scheduler config, kubeadm's scheduler is left as it is.
        assert!(cluster["scheduler"].get("extraVolumes").is_none());
        let init = &documents[0];
        assert_eq!(init["nodeRegistration"]["name"], "x-cp-0");
        assert_eq!(
            init["localAPIEndpoint"]["advertiseAddress"],
            "192.168.222.101"
        );
        assert_eq!(
            init["skipPhases"],
            serde_json::json!(["addon/coredns", "addon/kube-proxy"])
        );
    }

    #[test]
    fn a_scheduler_config_is_read_by_kubeadms_scheduler_from_a_read_only_mount() {
        let scheduler = SchedulerSpec {
            config: Some(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "profiles": [{"schedulerName": "default-scheduler"}],
                }))
                .unwrap(),
            ),
            image: None,
        };
        let config = InitConfig {
            kubernetes: KubernetesSpec::default(),
            scheduler,
        };
        let path = scheduler::config_path(&config.scheduler.config_hash());
        let text = init_text(&config, Some(&path), None);
        let documents = documents(&text);
        let cluster = &documents[1];
        assert_eq!(
            cluster["scheduler"],
            serde_json::json!({
                "extraArgs": [
                    {"name": "leader-elect", "value": "false"},
                    {"name": "config", "value": path},
                ],
                "extraVolumes": [{
                    "name": "benchcluster-scheduler-config",
                    "hostPath": "/etc/kubernetes/benchcluster/scheduler",
                    "mountPath": "/etc/kubernetes/benchcluster/scheduler",
                    "readOnly": true,
                    "pathType": "Directory",
                }],
            })
        );
        // Only the scheduler changes.
        assert_eq!(
            cluster["controllerManager"]["extraArgs"],
            serde_json::json!([{"name": "leader-elect", "value": "false"}])
        );
        // The config itself travels in its own file, not in kubeadm's documents.
        assert!(!text.contains("kubescheduler.config.k8s.io"));
    }

    #[test]
    fn kubeadm_reads_patches_from_the_init_configuration_only_when_asked() {
        let config = InitConfig {
            kubernetes: KubernetesSpec::default(),
            scheduler: SchedulerSpec::default(),
        };
        let first = |patches| {
            let text = init_text(&config, None, patches);
            documents(&text).swap_remove(0)
        };
        assert_eq!(
            first(Some("/etc/benchcluster/scheduler-patches"))["patches"],
            serde_json::json!({"directory": "/etc/benchcluster/scheduler-patches"})
        );
        assert!(first(None).get("patches").is_none());
    }

    #[test]
    fn join_configuration_pins_the_ca() {
        let ticket = JoinTicket {
            endpoint: "192.168.222.101:6443".into(),
            token: SecretString::from("abcdef.0123456789abcdef"),
            ca_cert_hash: "sha256:ff".into(),
        };
        let text = join_configuration(&node("x-w-0"), &ticket, &Registration::default());
        let doc: serde_json::Value = serde_json::from_str(text.expose_secret()).unwrap();
        assert_eq!(
            doc["discovery"]["bootstrapToken"]["caCertHashes"][0],
            "sha256:ff"
        );
        assert!(
            doc["discovery"]["bootstrapToken"]
                .get("unsafeSkipCAVerification")
                .is_none()
        );
        assert_eq!(format!("{text:?}"), "SecretBox<str>([REDACTED])");
        assert_eq!(doc["nodeRegistration"]["taints"], serde_json::json!([]));
        assert!(doc.get("patches").is_none());
    }

    #[test]
    fn a_pool_registers_with_its_labels_taints_and_kubelet_settings() {
        use benchcluster_crd::{KubeletSettings, Reservation, Taint, TaintEffect};
        let ticket = JoinTicket {
            endpoint: "192.168.222.101:6443".into(),
            token: SecretString::from("abcdef.0123456789abcdef"),
            ca_cert_hash: "sha256:ff".into(),
        };
        let registration = Registration {
            labels: [
                ("benchcluster.dev/pool".to_owned(), "gpu".to_owned()),
                ("example.com/rack".to_owned(), "r1".to_owned()),
            ]
            .into(),
            taints: vec![Taint {
                key: "example.com/accelerator".into(),
                value: String::new(),
                effect: TaintEffect::NoSchedule,
            }],
            kubelet: KubeletSettings {
                max_pods: Some(30),
                system_reserved: Reservation {
                    cpu: Some("250m".into()),
                    memory: None,
                },
                kube_reserved: Reservation::default(),
            },
            kubelet_args: BTreeMap::new(),
        };
        let text = join_configuration(&node("x-gpu-0"), &ticket, &registration);
        let doc: serde_json::Value = serde_json::from_str(text.expose_secret()).unwrap();
        let registration_doc = &doc["nodeRegistration"];
        assert_eq!(
            registration_doc["kubeletExtraArgs"][1],
            serde_json::json!({"name": "node-labels", "value": "benchcluster.dev/pool=gpu,example.com/rack=r1"})
        );
        assert_eq!(
            registration_doc["taints"],
            serde_json::json!([{"key": "example.com/accelerator", "effect": "NoSchedule"}])
        );
        assert_eq!(doc["patches"]["directory"], PATCHES_DIR);
        let patch: serde_json::Value =
            serde_json::from_str(&kubelet_patch(&registration).unwrap()).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({"maxPods": 30, "systemReserved": {"cpu": "250m"}})
        );
    }

    /// A spec with gates and flags for every component, managed flags among them.
    fn with_gates_and_flags() -> KubernetesSpec {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        KubernetesSpec {
            feature_gates: [
                ("SchedulerQueueingHints".to_owned(), false),
                ("Alpha".to_owned(), true),
            ]
            .into(),
            extra_args: benchcluster_crd::ComponentArgs {
                api_server: map(&[("v", "2"), ("audit-log-maxage", "7")]),
                controller_manager: map(&[("v", "3"), ("leader-elect", "true")]),
                scheduler: map(&[("v", "4"), ("config", "/elsewhere")]),
                kubelet: map(&[("v", "5"), ("max-pods", "500")]),
            },
            ..KubernetesSpec::default()
        }
    }

    fn names(args: &serde_json::Value) -> Vec<&str> {
        args.as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn users_flags_and_gates_follow_the_managed_flags_of_each_component() {
        let config = InitConfig {
            kubernetes: with_gates_and_flags(),
            scheduler: SchedulerSpec::default(),
        };
        let path = scheduler::config_path("sha256-0123456789abcdef");
        let text = init_text(&config, Some(&path), None);
        let documents = documents(&text);
        let (init, cluster, kubelet) = (&documents[0], &documents[1], &documents[2]);
        let gates = serde_json::json!({"name": "feature-gates", "value": "Alpha=true,SchedulerQueueingHints=false"});
        assert_eq!(
            cluster["apiServer"]["extraArgs"],
            serde_json::json!([
                {"name": "audit-log-maxage", "value": "7"},
                {"name": "v", "value": "2"},
                gates,
            ])
        );
        assert_eq!(
            cluster["controllerManager"]["extraArgs"],
            serde_json::json!([
                {"name": "leader-elect", "value": "false"},
                {"name": "v", "value": "3"},
                gates,
            ])
        );
        assert_eq!(
            cluster["scheduler"]["extraArgs"],
            serde_json::json!([
                {"name": "leader-elect", "value": "false"},
                {"name": "config", "value": path},
                {"name": "v", "value": "4"},
                gates,
            ])
        );
        assert_eq!(
            init["nodeRegistration"]["kubeletExtraArgs"],
            serde_json::json!([
                {"name": "node-ip", "value": "192.168.222.101"},
                {"name": "v", "value": "5"},
            ])
        );
        // The kubelet's gates are in its configuration, which joins read too.
        assert_eq!(
            kubelet["featureGates"],
            serde_json::json!({"Alpha": true, "SchedulerQueueingHints": false})
        );
        assert_eq!(kubelet["cgroupDriver"], "systemd");
        for args in [
            &cluster["apiServer"]["extraArgs"],
            &cluster["controllerManager"]["extraArgs"],
            &cluster["scheduler"]["extraArgs"],
            &init["nodeRegistration"]["kubeletExtraArgs"],
        ] {
            let mut seen = names(args);
            seen.sort_unstable();
            let count = seen.len();
            seen.dedup();
            assert_eq!(seen.len(), count, "a flag twice in {args}");
        }
    }

    #[test]
    fn without_gates_no_component_gets_any() {
        let config = InitConfig {
            kubernetes: KubernetesSpec::default(),
            scheduler: SchedulerSpec::default(),
        };
        let text = init_text(&config, None, None);
        assert!(!text.contains("feature-gates"));
        assert!(!text.contains("featureGates"));
    }

    #[test]
    fn hostile_flag_values_stay_strings() {
        let evil = "2\"\n---\nkind: Evil\n- name: kubeconfig";
        let mut kubernetes = KubernetesSpec::default();
        kubernetes
            .extra_args
            .api_server
            .insert("v".into(), evil.into());
        kubernetes
            .extra_args
            .kubelet
            .insert("v".into(), evil.into());
        let config = InitConfig {
            kubernetes,
            scheduler: SchedulerSpec::default(),
        };
        let text = init_text(&config, None, None);
        let documents = documents(&text);
        let cluster = &documents[1];
        assert_eq!(
            cluster["apiServer"]["extraArgs"],
            serde_json::json!([{"name": "v", "value": evil}])
        );
        let ticket = JoinTicket {
            endpoint: "192.168.222.101:6443".into(),
            token: SecretString::from("abcdef.0123456789abcdef"),
            ca_cert_hash: "sha256:ff".into(),
        };
        let registration = Registration {
            kubelet_args: config.kubernetes.extra_args.kubelet.clone(),
            ..Registration::default()
        };
        let text = join_configuration(&node("x-w-0"), &ticket, &registration);
        let doc: serde_json::Value = serde_json::from_str(text.expose_secret()).unwrap();
        assert_eq!(
            doc["nodeRegistration"]["kubeletExtraArgs"][1]["value"],
            evil
        );
    }

    #[test]
    fn a_join_passes_the_users_kubelet_flags_after_the_controllers() {
        let ticket = JoinTicket {
            endpoint: "192.168.222.101:6443".into(),
            token: SecretString::from("abcdef.0123456789abcdef"),
            ca_cert_hash: "sha256:ff".into(),
        };
        let registration = Registration {
            labels: [("benchcluster.dev/pool".to_owned(), "w".to_owned())].into(),
            kubelet_args: with_gates_and_flags().extra_args.kubelet,
            ..Registration::default()
        };
        let text = join_configuration(&node("x-w-0"), &ticket, &registration);
        let doc: serde_json::Value = serde_json::from_str(text.expose_secret()).unwrap();
        assert_eq!(
            doc["nodeRegistration"]["kubeletExtraArgs"],
            serde_json::json!([
                {"name": "node-ip", "value": "192.168.222.101"},
                {"name": "node-labels", "value": "benchcluster.dev/pool=w"},
                {"name": "v", "value": "5"},
            ])
        );
        // max-pods is a pool's setting; the user's flag is left out.
        assert!(!text.expose_secret().contains("max-pods"));
    }

    #[test]
    fn the_cluster_ca_is_read_from_the_kubeconfig() {
        use base64::Engine as _;
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let data = base64::engine::general_purpose::STANDARD.encode(pem);
        let kubeconfig = |cluster: &str| {
            AdminKubeconfig(SecretString::from(format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kubernetes\n  cluster:\n{cluster}\n\
                 contexts: []\nusers: []\n"
            )))
        };
        let with_ca = kubeconfig(&format!(
            "    server: https://192.168.222.10:6443\n    certificate-authority-data: {data}"
        ));
        assert_eq!(cluster_ca(&with_ca).as_deref(), Some(pem.as_bytes()));
        let without = kubeconfig("    server: https://192.168.222.10:6443");
        assert_eq!(cluster_ca(&without), None);
        assert_eq!(cluster_ca(&AdminKubeconfig(SecretString::from("{"))), None);
    }
}
