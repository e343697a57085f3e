//! Feature gates and extra command-line flags of the guest cluster's components:
//! `spec.kubernetes.featureGates` and `spec.kubernetes.extraArgs`. Both apply when the
//! cluster forms (`spec.kubernetes` is immutable).
//!
//! Flags the controller or kubeadm set themselves are refused by CEL rules, one per
//! flag, each naming the field and saying why ([`Component::managed_flags`]); rendering
//! leaves them out too ([`Component::user_args`]), so it does not rely on the rules.

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Most feature gates `featureGates` may set.
pub const MAX_FEATURE_GATES: usize = 64;
/// Most flags `extraArgs` may set per component.
pub const MAX_ARGS: usize = 32;
/// Longest value of a flag.
pub const MAX_VALUE_LEN: usize = 1024;

/// Feature gate names: Kubernetes spells them in upper camel case.
pub(crate) const FEATURE_GATE_NAMES_RULE: &str =
    "self.all(k, k.size() <= 64 && k.matches('^[A-Z][A-Za-z0-9]*$'))";
pub(crate) const FEATURE_GATE_NAMES_MESSAGE: &str = "spec.kubernetes.featureGates keys must be feature gate names of at most 64 letters and digits, starting with an upper-case letter, for example SchedulerQueueingHints";

/// Flag names without the leading `--`; no `=`, so a name cannot carry a value.
const FLAG_NAMES_RULE: &str = "self.all(k, k.size() <= 63 && k.matches('^[a-z0-9][a-z0-9-]*$'))";
/// Printable ASCII without space, `"`, `$`, `'` or `\`: kubeadm passes the kubelet's
/// flags through a systemd environment file, which splits values at spaces and reads
/// quotes, backslashes and `$`. The same for every component keeps one rule to learn.
const FLAG_VALUES_RULE: &str = r"self.all(k, self[k].matches('^[!#%&(-\\[\\]-~]*$'))";

/// A component whose flags `extraArgs` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    ApiServer,
    ControllerManager,
    Scheduler,
    Kubelet,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::ApiServer,
        Component::ControllerManager,
        Component::Scheduler,
        Component::Kubelet,
    ];

    /// Its field in `spec.kubernetes.extraArgs`.
    pub fn field(self) -> &'static str {
        match self {
            Component::ApiServer => "apiServer",
            Component::ControllerManager => "controllerManager",
            Component::Scheduler => "scheduler",
            Component::Kubelet => "kubelet",
        }
    }

    /// The flags the controller or kubeadm set for this component, each with why.
    pub fn managed_flags(self) -> &'static [(&'static str, &'static str)] {
        const GATES: (&str, &str) = (
            "feature-gates",
            "use spec.kubernetes.featureGates, which the controller passes to every component",
        );
        const LEADER_ELECT: (&str, &str) = (
            "leader-elect",
            "the controller manages it (off: the cluster has one control plane)",
        );
        const SERVICE_RANGE: (&str, &str) = (
            "service-cluster-ip-range",
            "kubeadm sets it from spec.kubernetes.serviceSubnet",
        );
        match self {
            Component::ApiServer => &[
                GATES,
                (
                    "advertise-address",
                    "kubeadm sets it to the control plane's address, which the nodes and the controller reach",
                ),
                SERVICE_RANGE,
                (
                    "etcd-servers",
                    "kubeadm sets it to the control plane's own etcd",
                ),
                (
                    "secure-port",
                    "the controller and the nodes reach the API server on port 6443",
                ),
            ],
            Component::ControllerManager => &[
                GATES,
                LEADER_ELECT,
                (
                    "cluster-cidr",
                    "kubeadm sets it from spec.kubernetes.podSubnet",
                ),
                SERVICE_RANGE,
                (
                    "allocate-node-cidrs",
                    "kubeadm turns it on so each node gets a pod range of spec.kubernetes.podSubnet",
                ),
                (
                    "node-cidr-mask-size",
                    "each node's pod range is a /24, which the bounds of podSubnet and maxPods rely on",
                ),
                (
                    "node-cidr-mask-size-ipv4",
                    "each node's pod range is a /24, which the bounds of podSubnet and maxPods rely on",
                ),
                (
                    "kubeconfig",
                    "kubeadm manages it (/etc/kubernetes/controller-manager.conf)",
                ),
            ],
            Component::Scheduler => &[
                GATES,
                LEADER_ELECT,
                (
                    "config",
                    "the controller manages it; set spec.scheduler.config to configure the scheduler",
                ),
                (
                    "kubeconfig",
                    "kubeadm manages it (/etc/kubernetes/scheduler.conf)",
                ),
                (
                    "authentication-kubeconfig",
                    "kubeadm manages it (/etc/kubernetes/scheduler.conf)",
                ),
                (
                    "authorization-kubeconfig",
                    "kubeadm manages it (/etc/kubernetes/scheduler.conf)",
                ),
            ],
            Component::Kubelet => &[
                GATES,
                (
                    "node-ip",
                    "the controller sets it to the node's DHCP address",
                ),
                (
                    "hostname-override",
                    "the controller names each Node after its VM",
                ),
                (
                    "node-labels",
                    "the controller sets it from the pool's nodeLabels",
                ),
                (
                    "register-with-taints",
                    "the controller sets it from the pool's taints",
                ),
                (
                    "config",
                    "kubeadm manages it (/var/lib/kubelet/config.yaml)",
                ),
                (
                    "kubeconfig",
                    "kubeadm manages it (/etc/kubernetes/kubelet.conf)",
                ),
                (
                    "bootstrap-kubeconfig",
                    "kubeadm manages it (/etc/kubernetes/bootstrap-kubelet.conf)",
                ),
                (
                    "container-runtime-endpoint",
                    "kubeadm sets it to containerd's socket",
                ),
                (
                    "cgroup-driver",
                    "the controller sets it to systemd, the images' cgroup manager",
                ),
                ("max-pods", "set it per pool with kubelet.maxPods"),
                (
                    "system-reserved",
                    "set it per pool with kubelet.systemReserved",
                ),
                ("kube-reserved", "set it per pool with kubelet.kubeReserved"),
            ],
        }
    }

    /// Whether the controller or kubeadm set `flag` for this component.
    pub fn manages(self, flag: &str) -> bool {
        self.managed_flags().iter().any(|(f, _)| *f == flag)
    }

    /// The user's flags of `args` (this component's), in name order, without those
    /// the controller or kubeadm set.
    pub fn user_args(
        self,
        args: &BTreeMap<String, String>,
    ) -> impl Iterator<Item = (&str, &str)> + '_ {
        args.iter()
            .filter(move |(flag, _)| !self.manages(flag))
            .map(|(flag, value)| (flag.as_str(), value.as_str()))
    }

    /// The schema of its `extraArgs` map: bounds, names, values, and one rule per
    /// managed flag.
    fn args_schema(self) -> Schema {
        let field = format!("spec.kubernetes.extraArgs.{}", self.field());
        let mut rules = vec![
            serde_json::json!({
                "rule": FLAG_NAMES_RULE,
                "message": format!("{field} keys must be flag names without the leading '--': at most 63 lowercase letters, digits and '-', starting with a letter or digit, for example v"),
            }),
            serde_json::json!({
                "rule": FLAG_VALUES_RULE,
                "message": format!("{field} values must be printable ASCII without spaces, quotes, backslashes or '$' (one rule for every component: the kubelet's flags pass through a systemd environment file, which would split or expand them)"),
            }),
        ];
        for (flag, why) in self.managed_flags() {
            rules.push(serde_json::json!({
                "rule": format!("!('{flag}' in self)"),
                "message": format!("{field} must not set {flag}: {why}"),
            }));
        }
        json_schema!({
            "type": "object",
            "maxProperties": MAX_ARGS,
            "additionalProperties": {"type": "string", "maxLength": MAX_VALUE_LEN},
            "x-kubernetes-validations": rules,
        })
    }
}

/// Extra command-line flags of the guest cluster's components, flag name (without
/// `--`) to value.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ComponentArgs {
    /// Flags of kube-apiserver, at most 32 (kubeadm's `apiServer.extraArgs`), for
    /// example `v: "2"`. Not `feature-gates` (see featureGates), `advertise-address`,
    /// `service-cluster-ip-range`, `etcd-servers` nor `secure-port`: kubeadm and the
    /// controller set those.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "api_server_schema")]
    pub api_server: BTreeMap<String, String>,
    /// Flags of kube-controller-manager, at most 32 (kubeadm's
    /// `controllerManager.extraArgs`, after the controller's own `leader-elect=false`).
    /// Not `feature-gates`, `leader-elect`, `cluster-cidr`, `service-cluster-ip-range`,
    /// `allocate-node-cidrs`, `node-cidr-mask-size`, `node-cidr-mask-size-ipv4` nor
    /// `kubeconfig`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "controller_manager_schema")]
    pub controller_manager: BTreeMap<String, String>,
    /// Flags of kube-scheduler, at most 32 (kubeadm's `scheduler.extraArgs`, after the
    /// controller's own), kept across live scheduler switches. Not `feature-gates`,
    /// `leader-elect`, `config` (set spec.scheduler.config instead), `kubeconfig`,
    /// `authentication-kubeconfig` nor `authorization-kubeconfig`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "scheduler_schema")]
    pub scheduler: BTreeMap<String, String>,
    /// Flags of every node's kubelet, at most 32 (kubeadm's
    /// `nodeRegistration.kubeletExtraArgs`, after the controller's own). Not
    /// `feature-gates`, `node-ip`, `hostname-override`, `node-labels`,
    /// `register-with-taints`, `config`, `kubeconfig`, `bootstrap-kubeconfig`,
    /// `container-runtime-endpoint`, `cgroup-driver`, `max-pods`, `system-reserved`
    /// nor `kube-reserved` (the last three are a pool's `kubelet` settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "kubelet_schema")]
    pub kubelet: BTreeMap<String, String>,
}

impl ComponentArgs {
    pub fn is_empty(&self) -> bool {
        Component::ALL.into_iter().all(|c| self.of(c).is_empty())
    }

    /// The flags set for `component`, managed ones included.
    pub fn of(&self, component: Component) -> &BTreeMap<String, String> {
        match component {
            Component::ApiServer => &self.api_server,
            Component::ControllerManager => &self.controller_manager,
            Component::Scheduler => &self.scheduler,
            Component::Kubelet => &self.kubelet,
        }
    }
}

fn api_server_schema(_: &mut SchemaGenerator) -> Schema {
    Component::ApiServer.args_schema()
}

fn controller_manager_schema(_: &mut SchemaGenerator) -> Schema {
    Component::ControllerManager.args_schema()
}

fn scheduler_schema(_: &mut SchemaGenerator) -> Schema {
    Component::Scheduler.args_schema()
}

fn kubelet_schema(_: &mut SchemaGenerator) -> Schema {
    Component::Kubelet.args_schema()
}

/// The value of `--feature-gates`: `A=true,B=false`, in name order; `None` without
/// gates. Names hold neither `,` nor `=` (the CRD's pattern).
pub fn feature_gates_arg(gates: &BTreeMap<String, bool>) -> Option<String> {
    (!gates.is_empty()).then(|| {
        gates
            .iter()
            .map(|(name, on)| format!("{name}={on}"))
            .collect::<Vec<_>>()
            .join(",")
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_managed_flag_is_refused_by_a_rule_naming_the_field() {
        let kubernetes = crate::schema_at(&["spec", "kubernetes"]);
        let extra_args = kubernetes.properties.as_ref().unwrap()["extraArgs"].clone();
        let properties = extra_args.properties.unwrap();
        assert_eq!(properties.len(), Component::ALL.len());
        for component in Component::ALL {
            let schema = &properties[component.field()];
            assert_eq!(schema.max_properties, Some(MAX_ARGS as i64));
            // kubectl explain lists what is refused.
            let description = schema.description.clone().unwrap();
            for (flag, _) in component.managed_flags() {
                assert!(
                    description.contains(&format!("`{flag}`")),
                    "{}: {flag} missing from {description}",
                    component.field()
                );
            }
            let rules = schema.x_kubernetes_validations.clone().unwrap();
            assert_eq!(rules.len(), 2 + component.managed_flags().len());
            let field = format!("spec.kubernetes.extraArgs.{}", component.field());
            for rule in &rules {
                let message = rule.message.as_deref().unwrap();
                assert!(message.starts_with(&field), "{message}");
            }
            for (flag, _) in component.managed_flags() {
                let rule = format!("!('{flag}' in self)");
                assert!(
                    rules.iter().any(|r| r.rule == rule),
                    "{field}: no rule for {flag}"
                );
            }
            assert!(component.manages("feature-gates"));
        }
        let gates = &kubernetes.properties.as_ref().unwrap()["featureGates"];
        assert_eq!(gates.max_properties, Some(MAX_FEATURE_GATES as i64));
        let rules = gates.x_kubernetes_validations.clone().unwrap();
        assert!(rules.iter().all(|r| {
            r.message
                .as_deref()
                .unwrap()
                .starts_with("spec.kubernetes.featureGates")
        }));
    }

    #[test]
    fn leader_election_is_managed_where_the_controller_turns_it_off() {
        assert!(Component::ControllerManager.manages("leader-elect"));
        assert!(Component::Scheduler.manages("leader-elect"));
        assert!(!Component::ApiServer.manages("leader-elect"));
        assert!(Component::Kubelet.manages("max-pods"));
        assert!(!Component::Kubelet.manages("v"));
    }

    #[test]
    fn user_args_leave_out_the_managed_flags_in_name_order() {
        let args: BTreeMap<String, String> = [
            ("v", "4"),
            ("leader-elect", "true"),
            ("feature-gates", "A=true"),
            ("bind-address", "0.0.0.0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let kept: Vec<_> = Component::Scheduler.user_args(&args).collect();
        assert_eq!(kept, [("bind-address", "0.0.0.0"), ("v", "4")]);
    }

    #[test]
    fn feature_gates_are_one_sorted_flag_value() {
        let gates: BTreeMap<String, bool> = [("SchedulerQueueingHints", false), ("A", true)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(
            feature_gates_arg(&gates).as_deref(),
            Some("A=true,SchedulerQueueingHints=false")
        );
        assert_eq!(feature_gates_arg(&BTreeMap::new()), None);
    }

    #[test]
    fn empty_args_are_left_out_of_the_stored_object() {
        let args = ComponentArgs {
            scheduler: [("v".to_owned(), "4".to_owned())].into(),
            ..ComponentArgs::default()
        };
        assert_eq!(
            serde_json::to_value(&args).unwrap(),
            serde_json::json!({"scheduler": {"v": "4"}})
        );
        assert!(ComponentArgs::default().is_empty());
        assert!(!args.is_empty());
        assert_eq!(
            serde_json::from_value::<ComponentArgs>(serde_json::json!({})).unwrap(),
            ComponentArgs::default()
        );
    }
}
