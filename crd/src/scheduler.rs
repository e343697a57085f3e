//! The guest cluster's scheduler as the experiment variable: `spec.scheduler`.
//!
//! `config` is a KubeSchedulerConfiguration kept as the user wrote it (an object the
//! API server stores with its unknown fields), so any field kube-scheduler knows can be
//! set without this crate knowing it. The schema declares only what the CEL rules
//! read (CEL cannot see undeclared fields of such an object): the version and kind,
//! the fields the controller manages, and the profiles' names.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The KubeSchedulerConfiguration version kube-scheduler reads.
macro_rules! api_version {
    () => {
        "kubescheduler.config.k8s.io/v1"
    };
}
pub const API_VERSION: &str = api_version!();
pub const KIND: &str = "KubeSchedulerConfiguration";
/// Top-level fields the controller writes itself: the scheduler's kubeconfig and its
/// leader election both follow from kubeadm's layout on the control plane.
pub const MANAGED_FIELDS: [&str; 2] = ["clientConnection", "leaderElection"];
/// Most profiles a configuration may list (kube-scheduler sets no limit; a bound keeps
/// the CEL cost estimate small).
pub const MAX_PROFILES: usize = 16;

const API_VERSION_RULE: &str = concat!(
    "has(self.apiVersion) && self.apiVersion == '",
    api_version!(),
    "'"
);
const API_VERSION_MESSAGE: &str = concat!(
    "spec.scheduler.config.apiVersion must be ",
    api_version!(),
    ", the KubeSchedulerConfiguration version kube-scheduler reads"
);
const KIND_RULE: &str = "has(self.kind) && self.kind == 'KubeSchedulerConfiguration'";
const KIND_MESSAGE: &str = "spec.scheduler.config.kind must be KubeSchedulerConfiguration";
const CLIENT_CONNECTION_MESSAGE: &str = "spec.scheduler.config.clientConnection must not be set: the controller manages it (the scheduler's kubeconfig, /etc/kubernetes/scheduler.conf, written by kubeadm)";
const LEADER_ELECTION_MESSAGE: &str = "spec.scheduler.config.leaderElection must not be set: the controller manages it (off: the cluster has one control plane)";
const SCHEDULER_NAME_MESSAGE: &str = "spec.scheduler.config.profiles entries must have a schedulerName, for example default-scheduler: a pod picks its profile by spec.schedulerName";
const UNIQUE_NAMES_RULE: &str = "self.all(p, !has(p.schedulerName) || self.exists_one(q, has(q.schedulerName) && q.schedulerName == p.schedulerName))";
const UNIQUE_NAMES_MESSAGE: &str = "spec.scheduler.config.profiles must not repeat a schedulerName: a pod picks its profile by spec.schedulerName";

/// An image reference: registry/path components, an optional tag, an optional digest.
const IMAGE_RULE: &str = r"self.matches('^[a-z0-9]([-a-z0-9._]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]([-a-z0-9._]*[a-z0-9])?)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$')";
const IMAGE_MESSAGE: &str = "spec.scheduler.image must be an image reference such as registry.example/kube-scheduler:v1.35.4: lower-case registry and path, optional :tag and @sha256: digest";

/// The guest cluster's scheduler.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerSpec {
    /// The KubeSchedulerConfiguration kube-scheduler runs with
    /// (`apiVersion: kubescheduler.config.k8s.io/v1`, `kind: KubeSchedulerConfiguration`),
    /// for example profiles with other plugins or plugin weights. Without it the
    /// scheduler runs with kube-scheduler's defaults. Applied live: when it changes, the
    /// controller writes it to the control plane, has kubeadm regenerate the scheduler's
    /// static pod to read it (`--config`), and waits for the new scheduler to turn
    /// healthy; one it rejects is rolled back to the last configuration that ran, and
    /// the SchedulerReady condition carries its error until this field changes again.
    /// A new cluster's scheduler is switched to it right after `kubeadm init`, before
    /// the cluster reports Ready. `clientConnection` and `leaderElection` are the
    /// controller's and must not be set: it points the scheduler at kubeadm's
    /// `/etc/kubernetes/scheduler.conf` and turns leader election off (one control
    /// plane). Each entry of `profiles` needs a `schedulerName`, unique in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<KubeSchedulerConfiguration>,
    /// A kube-scheduler image to run instead of kubeadm's, for example a build with
    /// out-of-tree plugins (kubernetes-sigs/scheduler-plugins). It must be present on
    /// the control plane (preloaded in its base image): it is never pulled. Switched
    /// live like `config`; one that does not start is rolled back the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(IMAGE_RULE).message(IMAGE_MESSAGE))]
    pub image: Option<String>,
}

impl SchedulerSpec {
    /// What names the configuration in status and on the control plane:
    /// [`DEFAULTS`] without one, else `sha256-` and 16 hex digits of its JSON (keys in
    /// order, so equal documents hash alike).
    pub fn config_hash(&self) -> String {
        match &self.config {
            None => DEFAULTS.to_owned(),
            Some(config) => config.hash(),
        }
    }
}

/// The config hash of kube-scheduler's built-in defaults (no `--config`).
pub const DEFAULTS: &str = "defaults";

/// The scheduler a control plane runs, from its static pod as the guest cluster's API
/// shows it: what the controller observes and its planner compares with the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningScheduler {
    /// [`SchedulerSpec::config_hash`] of the configuration it reads.
    pub config_hash: String,
    /// The container's image.
    pub image: String,
    /// `spec.scheduler.image` it was switched to, if any (else kubeadm's image).
    pub custom_image: Option<String>,
    /// When its container started.
    pub started: Option<Time>,
    /// Running and ready (its readiness probe asks `/readyz`).
    pub healthy: bool,
}

impl RunningScheduler {
    /// Whether it runs what `spec` asks for.
    pub fn runs(&self, spec: &SchedulerSpec) -> bool {
        self.config_hash == spec.config_hash() && self.custom_image == spec.image
    }
}

/// What the guest cluster's scheduler runs, and the last configuration it refused.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerStatus {
    /// The configuration the running scheduler reads: `defaults`, or the hash of
    /// `spec.scheduler.config` it was started with.
    pub config_hash: String,
    /// The scheduler's container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When the running scheduler's container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Whether it is running and answers its readiness check.
    pub healthy: bool,
    /// A configuration the scheduler refused and that was rolled back, kept while the
    /// spec still asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<RejectedConfig>,
}

/// A scheduler configuration (and image) that did not start, and why.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RejectedConfig {
    pub config_hash: String,
    /// The custom image asked for with it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The scheduler's own error, from its log.
    pub message: String,
    pub at: Time,
}

impl RejectedConfig {
    /// Whether `spec` asks for what was refused.
    pub fn is_for(&self, spec: &SchedulerSpec) -> bool {
        self.config_hash == spec.config_hash() && self.image == spec.image
    }
}

/// A KubeSchedulerConfiguration document, every field kept as written.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct KubeSchedulerConfiguration(pub serde_json::Map<String, serde_json::Value>);

impl KubeSchedulerConfiguration {
    /// `sha256-` and the first 16 hex digits of the document's JSON.
    pub fn hash(&self) -> String {
        let json = serde_json::Value::Object(self.0.clone()).to_string();
        let digest = Sha256::digest(json.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256-{hex}")
    }
}

impl JsonSchema for KubeSchedulerConfiguration {
    fn schema_name() -> Cow<'static, str> {
        "KubeSchedulerConfiguration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Strings bounded so the API server's CEL cost estimate stays small.
        json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "properties": {
                "apiVersion": {
                    "description": concat!("Must be ", api_version!(), "."),
                    "type": "string",
                    "maxLength": 64,
                },
                "kind": {
                    "description": "Must be KubeSchedulerConfiguration.",
                    "type": "string",
                    "maxLength": 64,
                },
                "clientConnection": {
                    "description": "Set by the controller; must not be set here.",
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                },
                "leaderElection": {
                    "description": "Set by the controller (off); must not be set here.",
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                },
                "profiles": {
                    "description": "Scheduling profiles, at most 16, each named by a unique schedulerName.",
                    "type": "array",
                    "maxItems": MAX_PROFILES,
                    "items": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": true,
                        "properties": {
                            "schedulerName": {
                                "description": "The name pods ask for in spec.schedulerName (default-scheduler for pods that name none).",
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 253,
                            },
                        },
                        "x-kubernetes-validations": [{
                            "rule": "has(self.schedulerName)",
                            "fieldPath": ".schedulerName",
                            "message": SCHEDULER_NAME_MESSAGE,
                        }],
                    },
                    "x-kubernetes-validations": [{
                        "rule": UNIQUE_NAMES_RULE,
                        "message": UNIQUE_NAMES_MESSAGE,
                    }],
                },
            },
            "x-kubernetes-validations": [
                {"rule": API_VERSION_RULE, "fieldPath": ".apiVersion", "message": API_VERSION_MESSAGE},
                {"rule": KIND_RULE, "fieldPath": ".kind", "message": KIND_MESSAGE},
                {"rule": "!has(self.clientConnection)", "fieldPath": ".clientConnection", "message": CLIENT_CONNECTION_MESSAGE},
                {"rule": "!has(self.leaderElection)", "fieldPath": ".leaderElection", "message": LEADER_ELECTION_MESSAGE},
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray;

    #[test]
    fn the_config_keeps_unknown_fields_and_every_rule_names_its_field() {
        let schema = crate::schema_at(&["spec", "scheduler", "config"]);
        assert_eq!(schema.type_.as_deref(), Some("object"));
        assert_eq!(schema.x_kubernetes_preserve_unknown_fields, Some(true));
        let profiles = &schema.properties.as_ref().unwrap()["profiles"];
        let items = match profiles.items.as_ref().unwrap() {
            JSONSchemaPropsOrArray::Schema(s) => s,
            other => panic!("profiles items {other:?}"),
        };
        let rules: Vec<_> = [&schema, profiles, items]
            .into_iter()
            .flat_map(|s| s.x_kubernetes_validations.clone().unwrap_or_default())
            .collect();
        assert_eq!(rules.len(), 6);
        for rule in rules {
            let message = rule.message.unwrap_or_default();
            assert!(
                message.starts_with("spec.scheduler.config."),
                "{}: {message}",
                rule.rule
            );
        }
        for field in MANAGED_FIELDS {
            assert!(
                schema.properties.as_ref().unwrap().contains_key(field),
                "{field} must be declared for CEL to see it"
            );
        }
    }

    #[test]
    fn the_hash_names_the_document_not_its_key_order() {
        let a: SchedulerSpec = serde_json::from_str(
            r#"{"config": {"apiVersion": "x", "kind": "y", "parallelism": 8}}"#,
        )
        .unwrap();
        let b: SchedulerSpec = serde_json::from_str(
            r#"{"config": {"parallelism": 8, "kind": "y", "apiVersion": "x"}}"#,
        )
        .unwrap();
        let c: SchedulerSpec = serde_json::from_str(
            r#"{"config": {"parallelism": 16, "kind": "y", "apiVersion": "x"}}"#,
        )
        .unwrap();
        assert_eq!(a.config_hash(), b.config_hash());
        assert_ne!(a.config_hash(), c.config_hash());
        assert!(a.config_hash().starts_with("sha256-"));
        assert_eq!(a.config_hash().len(), "sha256-".len() + 16);
        assert_eq!(SchedulerSpec::default().config_hash(), DEFAULTS);
    }

    #[test]
    fn a_config_is_an_object_kept_as_written() {
        let spec: SchedulerSpec = serde_json::from_value(serde_json::json!({
            "config": {"apiVersion": API_VERSION, "kind": KIND, "parallelism": 8},
        }))
        .unwrap();
        let config = spec.config.unwrap();
        assert_eq!(config.0["parallelism"], 8);
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            serde_json::json!({"apiVersion": API_VERSION, "kind": KIND, "parallelism": 8})
        );
        assert!(
            serde_json::from_value::<SchedulerSpec>(serde_json::json!({"config": "x"})).is_err()
        );
        assert_eq!(
            serde_json::from_value::<SchedulerSpec>(serde_json::json!({})).unwrap(),
            SchedulerSpec::default()
        );
    }
}
