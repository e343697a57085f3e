//! kstatus condition types and the merge rule that keeps `lastTransitionTime` stable.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{Schema, SchemaGenerator, json_schema};

/// The condition types a BenchCluster reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    /// The whole cluster is formed: control plane and every desired worker Ready.
    Ready,
    /// The control plane is initialised and its Node Ready.
    ControlPlaneReady,
    /// Every desired worker is joined and Ready.
    WorkersReady,
    /// The scheduler runs the spec's configuration and is healthy.
    SchedulerReady,
    /// The controller is making progress towards the spec.
    Reconciling,
    /// Progress is blocked on something the controller cannot fix by itself.
    Stalled,
}

impl ConditionType {
    pub const ALL: [ConditionType; 6] = [
        Self::Ready,
        Self::ControlPlaneReady,
        Self::WorkersReady,
        Self::SchedulerReady,
        Self::Reconciling,
        Self::Stalled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::ControlPlaneReady => "ControlPlaneReady",
            Self::WorkersReady => "WorkersReady",
            Self::SchedulerReady => "SchedulerReady",
            Self::Reconciling => "Reconciling",
            Self::Stalled => "Stalled",
        }
    }
}

/// Finds a condition by type.
pub fn find(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// True when the condition of that type is present with status "True".
pub fn is_true(conditions: &[Condition], type_: ConditionType) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Merges freshly computed conditions with the previous ones: a condition whose status
/// did not change keeps its `lastTransitionTime`, so a status with nothing new is
/// byte-identical to the previous one and costs no write.
pub fn merge(previous: &[Condition], mut next: Vec<Condition>) -> Vec<Condition> {
    for condition in &mut next {
        if let Some(old) = previous.iter().find(|c| c.type_ == condition.type_)
            && old.status == condition.status
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    next
}

/// Builds a condition; `now` is only used when the status is new (see [`merge`]).
pub fn new(
    type_: ConditionType,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.as_str().to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now,
    }
}

/// Schema of `status.conditions`: a list-map keyed by `type`, so server-side apply
/// merges conditions one by one.
pub fn list_map_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "description": "kstatus conditions: Ready, ControlPlaneReady, WorkersReady, Reconciling, Stalled.",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let old = vec![new(
            ConditionType::Ready,
            false,
            "Provisioning",
            "a",
            Some(1),
            at(10),
        )];
        let next = vec![new(
            ConditionType::Ready,
            false,
            "Provisioning",
            "b",
            Some(2),
            at(20),
        )];
        let merged = merge(&old, next);
        assert_eq!(merged[0].last_transition_time, at(10));
        assert_eq!(merged[0].message, "b");
    }

    #[test]
    fn changed_status_moves_transition_time() {
        let old = vec![new(
            ConditionType::Ready,
            false,
            "Provisioning",
            "",
            Some(1),
            at(10),
        )];
        let next = vec![new(
            ConditionType::Ready,
            true,
            "Ready",
            "",
            Some(1),
            at(20),
        )];
        assert_eq!(merge(&old, next)[0].last_transition_time, at(20));
    }
}
