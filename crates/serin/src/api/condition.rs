//! Status conditions in the Kubernetes convention: constant type and reason strings, and a
//! `lastTransitionTime` that changes only when the status flips.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the Canary is valid and reconciled.
pub const READY: &str = "Ready";
/// Condition type: the last rollout was promoted.
pub const PROMOTED: &str = "Promoted";
/// Condition type: the spec is invalid; the message says what to fix.
pub const INVALID: &str = "Invalid";

/// One condition, as in `metav1.Condition`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Promoted` or `Invalid`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// A CamelCase reason.
    pub reason: String,
    /// A human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Condition status.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// Sets condition `type_` in `conditions`, keeping `lastTransitionTime` unless the status
/// flips. Returns true when anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let before = existing.clone();
            if existing.status != status {
                existing.last_transition_time = now;
            }
            existing.status = status;
            existing.reason = reason.to_string();
            existing.message = message.to_string();
            existing.observed_generation = generation;
            *existing != before
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition_time: now,
                observed_generation: generation,
            });
            true
        }
    }
}

/// The condition of type `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).single().unwrap()
    }

    /// Re-setting a condition with the same status keeps its transition time.
    #[test]
    fn keeps_transition_time_when_status_unchanged() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            READY,
            ConditionStatus::True,
            "A",
            "m",
            None,
            t(0)
        ));
        assert!(!set_condition(
            &mut c,
            READY,
            ConditionStatus::True,
            "A",
            "m",
            None,
            t(5)
        ));
        assert!(set_condition(
            &mut c,
            READY,
            ConditionStatus::True,
            "B",
            "m2",
            None,
            t(6)
        ));
        assert_eq!(c[0].last_transition_time, t(0));
        assert!(set_condition(
            &mut c,
            READY,
            ConditionStatus::False,
            "C",
            "m",
            None,
            t(9)
        ));
        assert_eq!(c[0].last_transition_time, t(9));
        assert_eq!(c.len(), 1);
    }
}
