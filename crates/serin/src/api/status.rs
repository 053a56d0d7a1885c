//! `Canary.status`: everything Serin knows about a rollout. All rollout state lives here, so
//! the operator can be killed at any instant and resume from it.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Observed state of a Canary.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    /// Where the Canary is in its lifecycle.
    #[serde(default)]
    pub phase: Phase,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The revision under analysis, or the last one analysed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The revision that receives traffic as the stable (primary) version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<String>,
    /// Index into `spec.steps` of the current step.
    #[serde(default)]
    pub step: u32,
    /// Percent of traffic on the canary, as last written to the router.
    #[serde(default)]
    pub canary_weight: u8,
    /// Successful checks at the current step.
    #[serde(default)]
    pub passed_checks: u32,
    /// Failed checks in this rollout.
    #[serde(default)]
    pub failed_checks: u32,
    /// Consecutive inconclusive checks.
    #[serde(default)]
    pub inconclusive_checks: u32,
    /// When the current rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_at: Option<DateTime<Utc>>,
    /// When the current step's weight was set; checks at this step use data from after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<DateTime<Utc>>,
    /// The last counted check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckRecord>,
    /// Id of the last operator command handled (see the `serin.dev/command` annotation), so
    /// a command is carried out once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_command: Option<String>,
    /// Set by a `pause` command and cleared by `resume`: the rollout holds as with
    /// `spec.paused`, which a GitOps sync could revert.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused_by_command: bool,
    /// Standard conditions: `Ready`, `Promoted`, `Invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The current rollout's weight changes and the last check at each weight; moved into
    /// its `history` entry when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Timeline>,
    /// Finished rollouts, newest first, bounded by `spec.historyLimit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// The sequential judge's evidence in the current rollout, written at most once per
    /// `analysis.interval`; the looks since `through` are recomputed from the provider's
    /// history after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<EvidenceStatus>,
    /// The current rollout's webhooks (`spec.webhooks`): what the rollout waits on and the
    /// last answer. Reset when a rollout starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhooksStatus>,
    /// The post-rollout delivery still owed for the last finished rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_rollout: Option<PostRolloutStatus>,
}

/// Where a rollout stands with its gates and hooks.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WebhooksStatus {
    /// Every `confirm-rollout` gate answered 2xx (or there is none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollout_confirmed: bool,
    /// When the rollout was confirmed: the progress deadline runs from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<DateTime<Utc>>,
    /// Every `pre-rollout` hook answered 2xx (or there is none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_rollout_done: bool,
    /// The gate or hook the rollout waits on now (`confirm-rollout`, `pre-rollout`,
    /// `confirm-promotion`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// When the waited-on webhooks were last called (they are called once per
    /// `analysis.interval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub called_at: Option<DateTime<Utc>>,
    /// Failed `pre-rollout` calls in this rollout.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pre_rollout_failures: u32,
    /// The last answer that held or failed the rollout, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A post-rollout delivery owed for a finished rollout.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostRolloutStatus {
    /// The finished rollout's revision.
    pub revision: String,
    /// How it ended.
    pub result: RolloutResult,
    /// When the rollout ended: only calls made after it count.
    pub owed_at: DateTime<Utc>,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// When the last attempt was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub called_at: Option<DateTime<Utc>>,
}

/// The sequential judge's state of a rollout (see `docs/analysis.md`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceStatus {
    /// The revision this evidence is about.
    #[serde(default)]
    pub revision: String,
    /// When its rollout started (`rolloutStartedAt`): evidence never crosses rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_at: Option<DateTime<Utc>>,
    /// The time of the last look folded in: the next look counts requests after it.
    pub through: DateTime<Utc>,
    /// The end of the warm-up (`analysis.warmup` after the first step started): looks that
    /// end by then feed only the warm-up test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_until: Option<DateTime<Utc>>,
    /// The combined e-value (the average over every test); the rollout is rolled back when
    /// it reaches 1/α.
    #[serde(default)]
    pub e_value: f64,
    /// One entry per metric judged sequentially.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricEvidence>,
}

/// One metric's counts and tests over the rollout.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MetricEvidence {
    /// `spec.analysis.metrics[].name`.
    pub metric: String,
    /// Looks folded in.
    #[serde(default)]
    pub looks: u32,
    /// Canary requests counted.
    #[serde(default)]
    pub canary_requests: f64,
    /// Canary requests that were bad (5xx, or slower than the bound).
    #[serde(default)]
    pub canary_bad: f64,
    /// Primary requests counted.
    #[serde(default)]
    pub primary_requests: f64,
    /// Primary requests that were bad.
    #[serde(default)]
    pub primary_bad: f64,
    /// Canary requests needed before a step may advance (see `analysis.minDetectableRatio`).
    #[serde(default)]
    pub required_canary_requests: u64,
    /// Cumulative log-likelihood ratio of "canary worse by ×δ" for each δ of the grid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_likelihood_ratios: Vec<f64>,
    /// Cumulative log-likelihood ratio of "canary above the bound" for each alternative.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guard_log_likelihood_ratios: Vec<f64>,
    /// The same for the primary (to tell an unhealthy baseline from a bad canary).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub primary_guard_log_likelihood_ratios: Vec<f64>,
    /// Looks folded into the warm-up test (`analysis.warmup`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup_looks: u32,
    /// Cumulative log-likelihood ratios of the warm-up test ("canary many times worse").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warmup_log_likelihood_ratios: Vec<f64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Lifecycle phase.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    /// First sight: the stable version is being set up.
    #[default]
    Initializing,
    /// Stable; waiting for a new revision.
    Waiting,
    /// Shifting traffic step by step and checking SLOs.
    Progressing,
    /// Paused by `spec.paused` in the middle of a rollout.
    Paused,
    /// All checks passed; the new version is becoming the stable one.
    Promoting,
    /// The last rollout was promoted.
    Succeeded,
    /// The last rollout was rolled back or aborted.
    Failed,
}

impl Phase {
    /// Every phase, for metrics that export one series per phase.
    pub const ALL: [Phase; 7] = [
        Phase::Initializing,
        Phase::Waiting,
        Phase::Progressing,
        Phase::Paused,
        Phase::Promoting,
        Phase::Succeeded,
        Phase::Failed,
    ];

    /// The name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Initializing => "Initializing",
            Phase::Waiting => "Waiting",
            Phase::Progressing => "Progressing",
            Phase::Paused => "Paused",
            Phase::Promoting => "Promoting",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    /// True while a rollout is under way (traffic may be on the canary).
    pub fn in_rollout(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused | Phase::Promoting)
    }
}

/// A counted check: when, and each metric's result.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckRecord {
    /// When the check was counted.
    pub time: DateTime<Utc>,
    /// The verdict of the check as a whole.
    pub verdict: Verdict,
    /// One result per metric.
    #[serde(default)]
    pub results: Vec<MetricResult>,
}

/// One metric's result in a check.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricResult {
    /// `spec.analysis.metrics[].name`.
    pub metric: String,
    /// The value, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Pass, Fail or Inconclusive.
    pub verdict: Verdict,
    /// Why, in one line (bounds, or what was missing).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A verdict on a metric or a check.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within bounds.
    Pass,
    /// Out of bounds.
    Fail,
    /// No usable value: no data, NaN, stale, too few samples, or a provider error.
    Inconclusive,
    /// The sequential judge found no regression but the canary has not yet had enough
    /// requests for one to be caught: the step holds without counting an inconclusive check.
    Waiting,
}

impl Verdict {
    /// The name as written in status and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "Pass",
            Verdict::Fail => "Fail",
            Verdict::Inconclusive => "Inconclusive",
            Verdict::Waiting => "Waiting",
        }
    }
}

/// A finished rollout.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The canary revision.
    pub revision: String,
    /// When the rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// How it ended.
    pub result: RolloutResult,
    /// The highest canary weight it reached.
    pub reached_weight: u8,
    /// Why it ended, in one line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Its weight changes and the last check at each weight. Kept on the newest entries
    /// only, within [`TIMELINE_BUDGET`] bytes of the history: older entries keep the fields
    /// above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Timeline>,
}

/// Bytes (as JSON) the timelines of `status.history` may take together. Entries past the
/// budget, oldest first, lose their timeline, so a Canary's status grows by at most this
/// much however long its `historyLimit` and its steps.
pub const TIMELINE_BUDGET: usize = 8 * 1024;

/// Points a timeline keeps: every step of the longest `spec.steps` (20), the promotion and
/// the return to 0, with room to spare. A rollout that changes weight more often (commands
/// moving it back and forth) keeps its first points and its latest one.
pub const TIMELINE_POINTS: usize = 32;

/// A rollout's weight over time: each weight written to the router, when, and the last check
/// counted at it. Compact on purpose: it lives in every Canary's status.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    /// The metrics the checks' values are about (`spec.analysis.metrics[].name` when the
    /// rollout started), in the order of `points[].values`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    /// Weight changes, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<TimelinePoint>,
}

/// One weight the rollout wrote, and what the checks said at it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TimelinePoint {
    /// Seconds after the rollout started (`startedAt`) that the weight was written.
    pub at: u32,
    /// The canary's weight from then on.
    pub weight: u8,
    /// Checks counted at this weight.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checks: u32,
    /// The verdict of the last check counted at this weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Seconds after the start of that last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<u32>,
    /// That check's value of each metric (`null`: no value), in the order of `metrics`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<Option<f64>>,
}

/// How a rollout ended.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutResult {
    /// The canary became the stable version.
    Promoted,
    /// A failed SLO rolled it back.
    RolledBack,
    /// A user aborted it.
    Aborted,
    /// A newer revision replaced it mid-rollout.
    Superseded,
}

impl RolloutResult {
    /// Every result.
    pub const ALL: [RolloutResult; 4] = [
        RolloutResult::Promoted,
        RolloutResult::RolledBack,
        RolloutResult::Aborted,
        RolloutResult::Superseded,
    ];

    /// The name as written in status and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutResult::Promoted => "Promoted",
            RolloutResult::RolledBack => "RolledBack",
            RolloutResult::Aborted => "Aborted",
            RolloutResult::Superseded => "Superseded",
        }
    }
}
