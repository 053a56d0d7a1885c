//! The values that go into and come out of [`decide`](super::decide).

use crate::analysis::MetricObservation;
pub use crate::analysis::{LookBatch, MetricLooks};
use crate::api::{CanaryStatus, EvidenceStatus};
use crate::arms::Weights;

/// What the controller observed before deciding.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    /// The new version: in workload mode the target Deployment (revision = hash of its pod
    /// template and referenced config); in traffic mode the canary backend (revision = its
    /// name, ready = it exists).
    pub canary: WorkloadState,
    /// The stable version: `<target>-primary` in workload mode (unused in traffic mode).
    pub primary: WorkloadState,
    /// The latest result of each metric, fetched when a check was due.
    pub metrics: Vec<MetricObservation>,
    /// An operator command, if one is pending.
    pub command: Option<Command>,
    /// The split the router holds now, read during a rollout (`None` when not read). The
    /// data plane is the truth: see [`super::believed_canary_weight`].
    pub weights: Option<Weights>,
    /// The sequential judge's looks since its last one, fetched when a look was due.
    pub looks: Option<LookBatch>,
    /// The sequential judge's state the controller kept in memory since the last status
    /// write (see [`Decision::evidence`]); `None` after a restart, when the looks since
    /// `status.evidence` are fetched from the provider's history instead.
    pub evidence: Option<EvidenceStatus>,
    /// The answers of the webhooks called for this decision (see [`super::hooks_due`]).
    pub hooks: Vec<super::HookAnswer>,
}

/// A workload's revision and readiness.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadState {
    /// The revision it runs or is rolling out to; `None` when it does not exist.
    pub revision: Option<String>,
    /// True when it runs `revision` and is available.
    pub ready: bool,
}

/// An operator command. The id makes it happen once: a command whose id equals
/// `status.lastCommand` is ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// What to do.
    pub kind: CommandKind,
    /// Any value unique per request, for example a timestamp.
    pub id: String,
}

/// Operator commands, written by `kubectl serin` (or by hand) into the `serin.dev/command`
/// annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    /// Skip the rest of the current step: go to the next step now (to promotion from the
    /// last one).
    Promote,
    /// Skip every remaining step and promote now.
    PromoteFull,
    /// Roll back now.
    Abort,
    /// Start the failed revision's rollout again.
    Retry,
    /// Hold the rollout where it is, as `spec.paused` does, until `resume`. Kept in
    /// status, so a GitOps sync of the spec does not undo it.
    Pause,
    /// Undo `pause`.
    Resume,
}

impl CommandKind {
    /// Every command, in the order users see them.
    pub const ALL: [CommandKind; 6] = [
        CommandKind::Promote,
        CommandKind::PromoteFull,
        CommandKind::Abort,
        CommandKind::Retry,
        CommandKind::Pause,
        CommandKind::Resume,
    ];

    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Promote => "promote",
            CommandKind::PromoteFull => "promote-full",
            CommandKind::Abort => "abort",
            CommandKind::Retry => "retry",
            CommandKind::Pause => "pause",
            CommandKind::Resume => "resume",
        }
    }

    /// Parses a command name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The outcome of a decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to write once every action succeeded.
    pub status: CanaryStatus,
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// When to look again without a watch event (a timed check, or a readiness poll).
    pub requeue_after: Option<std::time::Duration>,
    /// The sequential judge's state after this decision, for the controller to keep in
    /// memory: `status.evidence` is written only at checks, at most once per interval.
    pub evidence: Option<EvidenceStatus>,
}

/// One thing the controller must do. Every action is absolute, so repeating it is harmless.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these weights to the router.
    SetWeights(Weights),
    /// Make the primary run `revision` (copy the target's pod template to the primary).
    PromoteWorkload {
        /// The revision the primary must run.
        revision: String,
    },
    /// Scale the canary workload up to its desired replicas.
    ScaleCanaryUp,
    /// Scale the canary workload to zero.
    ScaleCanaryDown,
    /// Emit a Kubernetes Event.
    Event(Event),
}

/// A Kubernetes Event to emit about the Canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Normal or Warning.
    pub type_: EventType,
    /// A constant CamelCase reason (see [`reasons`]).
    pub reason: &'static str,
    /// What happened, for people.
    pub message: String,
}

/// Event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Routine progress.
    Normal,
    /// Something needs attention.
    Warning,
}

/// Event reasons.
pub mod reasons {
    /// The spec is invalid.
    pub const INVALID: &str = "Invalid";
    /// The stable version is set up.
    pub const INITIALIZED: &str = "Initialized";
    /// A rollout started.
    pub const ROLLOUT_STARTED: &str = "RolloutStarted";
    /// The canary weight moved to the next step.
    pub const STEP_ADVANCED: &str = "StepAdvanced";
    /// A check failed.
    pub const CHECK_FAILED: &str = "CheckFailed";
    /// A check had no usable data.
    pub const CHECK_INCONCLUSIVE: &str = "CheckInconclusive";
    /// A check found no regression but the canary has not had enough requests yet.
    pub const WAITING_FOR_EVIDENCE: &str = "WaitingForEvidence";
    /// The sequential judge found the canary worse than the primary, or above its bound.
    pub const REGRESSION: &str = "RegressionDetected";
    /// Both arms breach the bound alike: the baseline is unhealthy too.
    pub const BASELINE_UNHEALTHY: &str = "BaselineUnhealthy";
    /// Promotion started.
    pub const PROMOTING: &str = "Promoting";
    /// Promotion finished.
    pub const PROMOTED: &str = "Promoted";
    /// The rollout was rolled back or aborted.
    pub const ROLLED_BACK: &str = "RolledBack";
    /// A newer revision replaced the rollout.
    pub const SUPERSEDED: &str = "Superseded";
    /// A new revision arrived while promoting: all traffic went back to the primary.
    pub const NEW_REVISION_WHILE_PROMOTING: &str = "NewRevisionWhilePromoting";
    /// `spec.paused` or a `pause` command took effect.
    pub const PAUSED: &str = "Paused";
    /// The pause (`spec.paused` or a `pause` command) was lifted.
    pub const RESUMED: &str = "Resumed";
    /// An operator command was carried out.
    pub const COMMAND: &str = "Command";
    /// An operator command did not apply.
    pub const COMMAND_IGNORED: &str = "CommandIgnored";
    /// A gate (`confirm-rollout`, `confirm-promotion`) holds the rollout.
    pub const WAITING_FOR_WEBHOOK: &str = "WaitingForWebhook";
    /// Every gate of a kind answered 2xx: the rollout goes on.
    pub const WEBHOOK_CONFIRMED: &str = "WebhookConfirmed";
    /// A pre-rollout webhook failed, or a post-rollout delivery was given up.
    pub const WEBHOOK_FAILED: &str = "WebhookFailed";

    /// Every reason a rollout decision reports (what notifications can be asked for).
    pub const ALL: [&str; 21] = [
        INVALID,
        INITIALIZED,
        ROLLOUT_STARTED,
        STEP_ADVANCED,
        CHECK_FAILED,
        CHECK_INCONCLUSIVE,
        WAITING_FOR_EVIDENCE,
        REGRESSION,
        BASELINE_UNHEALTHY,
        PROMOTING,
        PROMOTED,
        ROLLED_BACK,
        SUPERSEDED,
        NEW_REVISION_WHILE_PROMOTING,
        PAUSED,
        RESUMED,
        COMMAND,
        COMMAND_IGNORED,
        WAITING_FOR_WEBHOOK,
        WEBHOOK_CONFIRMED,
        WEBHOOK_FAILED,
    ];
}
