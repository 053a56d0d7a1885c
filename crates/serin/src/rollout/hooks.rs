//! The rollout's webhooks (`spec.webhooks`): which are due, and what their answers do.
//!
//! Like metric checks, webhooks are called by the controller's shared fetch pool, never by
//! [`decide`](super::decide): the controller asks [`hooks_due`] which to call, calls them,
//! and hands the answers to the next decision in [`Observations::hooks`]. All that a
//! webhook changes lives in `status.webhooks` and `status.postRollout`, so an operator that
//! restarts calls again what it had not recorded (delivery is at least once; the
//! `Serin-Delivery` header carries the key `uid/revision/webhook` for receivers that must
//! act once).
//!
//! - `confirm-rollout`: the rollout holds before the canary is scaled up until every one
//!   answers 2xx, called once per `analysis.interval`.
//! - `pre-rollout`: once the canary is ready, before its first step; every one must answer
//!   2xx. A failed call is retried at the next interval and counts toward
//!   `failureThreshold`, which rolls back.
//! - `rollout`: with every check; a failed call fails the check like a failing metric.
//! - `confirm-promotion`: with every check of the last analysed step; the rollout does not
//!   promote until every one answered 2xx in the same round.
//! - `rollback`: with every check and every gate call; a 2xx answer rolls back.
//! - `post-rollout`: after a promotion or rollback, until every one answered 2xx or
//!   [`POST_ROLLOUT_ATTEMPTS`] were made.
//! - `event`: not here; the controller tells them every Event it records.

use chrono::{DateTime, Utc};

use super::{EventType, Machine, Observations, reasons};
use crate::api::{
    CanarySpec, CanaryStatus, MetricResult, Phase, PostRolloutStatus, RolloutResult, Verdict,
    WebhookSpec, WebhookType, WebhooksStatus,
};

/// Attempts at a post-rollout delivery before Serin gives up on it.
pub const POST_ROLLOUT_ATTEMPTS: u32 = 5;

/// The pause before post-rollout attempt `n + 1` after `n` attempts: 5 s, doubling.
fn post_rollout_backoff(attempts: u32) -> chrono::Duration {
    chrono::Duration::seconds(5i64 << attempts.saturating_sub(1).min(6))
}

/// A webhook's answer, as the controller observed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookAnswer {
    /// `spec.webhooks[].name`.
    pub name: String,
    /// `Ok` for a 2xx answer; else why not, in one line (the status and the start of the
    /// body, a timeout, a refused connection, a URL the operator may not call).
    pub outcome: Result<(), String>,
    /// When the call was made: an answer counts once, so a decision repeated on the same
    /// answers (after a lost status write) counts nothing twice.
    pub at: DateTime<Utc>,
}

/// The metric name under which a `rollout` webhook's answer appears in a check.
pub fn check_name(hook: &str) -> String {
    format!("webhook/{hook}")
}

fn interval(spec: &CanarySpec) -> chrono::Duration {
    chrono::Duration::from_std(spec.analysis.interval.into()).unwrap_or(chrono::Duration::MAX)
}

/// The gate or hook a rollout waits on outside its checks (`confirm-rollout` or
/// `pre-rollout`), if it is called outside checks.
fn waiting_outside_checks(status: &CanaryStatus) -> Option<WebhookType> {
    if status.phase != Phase::Progressing {
        return None;
    }
    match status.webhooks.as_ref()?.waiting_for.as_deref()? {
        "confirm-rollout" => Some(WebhookType::ConfirmRollout),
        "pre-rollout" => Some(WebhookType::PreRollout),
        _ => None,
    }
}

/// When webhooks are next due outside checks (a gate waiting before the first step, or an
/// owed post-rollout delivery); the controller calls [`hooks_due`] once it has passed.
pub fn next_hook_at(spec: &CanarySpec, status: &CanaryStatus) -> Option<DateTime<Utc>> {
    let gate = waiting_outside_checks(status).map(|_| {
        let called = status.webhooks.as_ref().and_then(|w| w.called_at);
        called.map_or(DateTime::<Utc>::MIN_UTC, |t| {
            t.checked_add_signed(interval(spec))
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        })
    });
    let post = status
        .post_rollout
        .as_ref()
        .filter(|_| spec.has_webhook(WebhookType::PostRollout))
        .map(|p| {
            p.called_at.map_or(DateTime::<Utc>::MIN_UTC, |t| {
                t.checked_add_signed(post_rollout_backoff(p.attempts))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            })
        });
    match (gate, post) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The webhooks to call now: with a check that is due (`check_due`), and those due outside
/// checks at `now`. Each at most once, in spec order.
pub fn hooks_due<'a>(
    spec: &'a CanarySpec,
    status: &CanaryStatus,
    check_due: bool,
    now: DateTime<Utc>,
) -> Vec<&'a WebhookSpec> {
    let mut types = Vec::new();
    if check_due && status.phase == Phase::Progressing {
        types.push(WebhookType::Rollout);
        types.push(WebhookType::Rollback);
        if status.step as usize + 2 >= spec.steps.len() {
            types.push(WebhookType::ConfirmPromotion);
        }
    }
    let due = next_hook_at(spec, status).is_some_and(|at| at <= now);
    if due {
        if let Some(t) = waiting_outside_checks(status) {
            types.push(t);
            types.push(WebhookType::Rollback);
        }
        if status.post_rollout.is_some() {
            types.push(WebhookType::PostRollout);
        }
    }
    spec.webhooks
        .iter()
        .filter(|w| types.contains(&w.type_))
        .collect()
}

impl Machine<'_> {
    /// Takes the answers of every webhook of type `t` made after `counted` (the last
    /// round already acted on): `None` unless there is one and each answered; else when
    /// the calls were made, and `Ok` when all answered 2xx, or the first refusal
    /// (`name: why`).
    fn take_answers(
        &mut self,
        t: WebhookType,
        counted: Option<DateTime<Utc>>,
    ) -> Option<(DateTime<Utc>, Result<(), String>)> {
        let names: Vec<&str> = self.spec.webhooks_of(t).map(|w| w.name.as_str()).collect();
        // An answer made before this rollout started (or this delivery was owed) is about
        // another one: a call is made by a reconcile after the one that started it.
        let counted = match t {
            WebhookType::PostRollout => counted,
            _ => counted.max(self.status.rollout_started_at),
        };
        let fresh = |a: &HookAnswer| counted.is_none_or(|c| a.at > c);
        if names.is_empty()
            || !names
                .iter()
                .all(|n| self.answers.iter().any(|a| a.name == *n && fresh(a)))
        {
            return None;
        }
        let mut first_refusal = None;
        let mut at = DateTime::<Utc>::MIN_UTC;
        self.answers.retain(|a| {
            if !names.contains(&a.name.as_str()) {
                return true;
            }
            at = at.max(a.at);
            if let (Err(why), None) = (&a.outcome, &first_refusal) {
                first_refusal = Some(format!("{}: {why}", a.name));
            }
            false
        });
        Some((at, first_refusal.map_or(Ok(()), Err)))
    }

    fn called_at(&self) -> Option<DateTime<Utc>> {
        self.status.webhooks.as_ref().and_then(|w| w.called_at)
    }

    fn hooks_mut(&mut self) -> &mut WebhooksStatus {
        self.status.webhooks.get_or_insert_with(|| WebhooksStatus {
            rollout_confirmed: true,
            pre_rollout_done: true,
            ..WebhooksStatus::default()
        })
    }

    /// The webhooks' state for a new rollout.
    pub(super) fn start_hooks(&mut self) {
        self.status.webhooks = (!self.spec.webhooks.is_empty()).then(|| {
            let confirm = self.spec.has_webhook(WebhookType::ConfirmRollout);
            WebhooksStatus {
                rollout_confirmed: !confirm,
                pre_rollout_done: !self.spec.has_webhook(WebhookType::PreRollout),
                waiting_for: confirm.then(|| WebhookType::ConfirmRollout.as_str().into()),
                ..WebhooksStatus::default()
            }
        });
    }

    /// Whether the rollout waits for its `confirm-rollout` gates (the canary is then not
    /// scaled up).
    pub(super) fn awaiting_rollout_confirmation(&self) -> bool {
        self.status
            .webhooks
            .as_ref()
            .is_some_and(|w| !w.rollout_confirmed)
            && self.spec.has_webhook(WebhookType::ConfirmRollout)
    }

    /// The name of a `rollback` gate that answered 2xx in this observation.
    pub(super) fn rollback_requested(&mut self) -> Option<String> {
        let names: Vec<String> = self
            .spec
            .webhooks_of(WebhookType::Rollback)
            .map(|w| w.name.clone())
            .collect();
        let started = self.status.rollout_started_at;
        let hit = self
            .answers
            .iter()
            .find(|a| {
                names.contains(&a.name) && a.outcome.is_ok() && started.is_none_or(|s| a.at > s)
            })
            .map(|a| a.name.clone());
        self.answers.retain(|a| !names.contains(&a.name));
        hit
    }

    /// Before the first step: the `confirm-rollout` gates. Returns whether the rollout may
    /// go on (confirmed now or before).
    pub(super) fn confirm_rollout(&mut self) -> bool {
        if !self.awaiting_rollout_confirmation() {
            return true;
        }
        match self.take_answers(WebhookType::ConfirmRollout, self.called_at()) {
            Some((_, Ok(()))) => {
                let now = self.now;
                let w = self.hooks_mut();
                w.rollout_confirmed = true;
                w.confirmed_at = Some(now);
                w.waiting_for = None;
                w.called_at = None;
                w.message.clear();
                if !self.spec.is_traffic_mode() {
                    self.actions.push(super::Action::ScaleCanaryUp);
                }
                self.event(
                    EventType::Normal,
                    reasons::WEBHOOK_CONFIRMED,
                    "every confirm-rollout webhook answered 2xx: the rollout starts".into(),
                );
                true
            }
            Some((at, Err(why))) => {
                let w = self.hooks_mut();
                w.called_at = Some(at);
                let first = w.message.is_empty();
                w.message = format!("waiting for confirm-rollout: {why}");
                if first {
                    self.event(
                        EventType::Normal,
                        reasons::WAITING_FOR_WEBHOOK,
                        format!("the rollout waits for confirm-rollout ({why})"),
                    );
                }
                self.wait_for_hooks();
                false
            }
            None => {
                self.wait_for_hooks();
                false
            }
        }
    }

    /// Once the canary is ready, before its first step: the `pre-rollout` hooks. Returns
    /// whether the first step may start; a rollback may have been decided instead.
    pub(super) fn pre_rollout(&mut self) -> bool {
        let done = self
            .status
            .webhooks
            .as_ref()
            .is_none_or(|w| w.pre_rollout_done)
            || !self.spec.has_webhook(WebhookType::PreRollout);
        if done {
            return true;
        }
        let pre = WebhookType::PreRollout.as_str();
        if self.hooks_mut().waiting_for.as_deref() != Some(pre) {
            // Called from the next reconcile on (the canary is ready now).
            let w = self.hooks_mut();
            w.waiting_for = Some(pre.into());
            w.called_at = None;
            self.wait(std::time::Duration::from_millis(200));
            return false;
        }
        match self.take_answers(WebhookType::PreRollout, self.called_at()) {
            Some((_, Ok(()))) => {
                let w = self.hooks_mut();
                w.pre_rollout_done = true;
                w.waiting_for = None;
                w.called_at = None;
                w.message.clear();
                true
            }
            Some((at, Err(why))) => {
                let threshold = self.spec.analysis.failure_threshold;
                let w = self.hooks_mut();
                w.called_at = Some(at);
                w.pre_rollout_failures += 1;
                let failures = w.pre_rollout_failures;
                w.message = format!("pre-rollout failed ({failures} of {threshold}): {why}");
                self.event(
                    EventType::Warning,
                    reasons::WEBHOOK_FAILED,
                    format!("pre-rollout webhook failed ({failures} of {threshold}): {why}"),
                );
                if failures >= threshold {
                    self.rollback(
                        RolloutResult::RolledBack,
                        format!("pre-rollout webhook failed {failures} times: {why}"),
                    );
                } else {
                    self.wait_for_hooks();
                }
                false
            }
            None => {
                self.wait_for_hooks();
                false
            }
        }
    }

    /// At a promotion the analysis earned: the `confirm-promotion` gates. Returns whether
    /// the rollout may promote now; else it holds at its step and checks go on.
    pub(super) fn confirm_promotion(&mut self) -> bool {
        if !self.spec.has_webhook(WebhookType::ConfirmPromotion) {
            return true;
        }
        let promotion = WebhookType::ConfirmPromotion.as_str();
        // Called with this check: the answers are this round's.
        match self.take_answers(WebhookType::ConfirmPromotion, None) {
            Some((_, Ok(()))) => {
                if self.status.webhooks.is_some() {
                    let w = self.hooks_mut();
                    w.waiting_for = None;
                    w.message.clear();
                }
                self.event(
                    EventType::Normal,
                    reasons::WEBHOOK_CONFIRMED,
                    "every confirm-promotion webhook answered 2xx: promoting".into(),
                );
                true
            }
            answer => {
                let why = match answer {
                    Some((_, Err(why))) => why,
                    _ => "not called yet".to_string(),
                };
                let w = self.hooks_mut();
                let first = w.waiting_for.as_deref() != Some(promotion);
                w.waiting_for = Some(promotion.into());
                w.message = format!("waiting for confirm-promotion: {why}");
                if first {
                    self.event(
                        EventType::Normal,
                        reasons::WAITING_FOR_WEBHOOK,
                        format!(
                            "analysis passed; the promotion waits for confirm-promotion ({why}); checks go on meanwhile"
                        ),
                    );
                }
                self.wait(self.spec.analysis.interval.into());
                false
            }
        }
    }

    /// The `rollout` webhooks' answers as check results: a refusal fails the check, a
    /// missing answer makes it inconclusive.
    pub(super) fn rollout_hook_results(&mut self) -> Vec<MetricResult> {
        let hooks: Vec<String> = self
            .spec
            .webhooks_of(WebhookType::Rollout)
            .map(|w| w.name.clone())
            .collect();
        hooks
            .into_iter()
            .map(|name| {
                let started = self.status.rollout_started_at;
                let answer = self
                    .answers
                    .iter()
                    .position(|a| a.name == name && started.is_none_or(|s| a.at > s))
                    .map(|i| self.answers.remove(i).outcome);
                let (verdict, message) = match answer {
                    Some(Ok(())) => (Verdict::Pass, String::new()),
                    Some(Err(why)) => (Verdict::Fail, format!("rollout webhook failed: {why}")),
                    None => (
                        Verdict::Inconclusive,
                        "rollout webhook was not called for this check".into(),
                    ),
                };
                MetricResult {
                    metric: check_name(&name),
                    value: None,
                    verdict,
                    message,
                }
            })
            .collect()
    }

    /// A finished rollout owes its post-rollout webhooks a delivery.
    pub(super) fn owe_post_rollout(&mut self, result: RolloutResult) {
        if result == RolloutResult::Superseded || !self.spec.has_webhook(WebhookType::PostRollout) {
            return;
        }
        if let Some(old) = &self.status.post_rollout {
            tracing::warn!(revision = %old.revision, "a post-rollout delivery was still owed when the next rollout finished; it is replaced");
        }
        self.status.post_rollout = Some(PostRolloutStatus {
            revision: self.status.revision.clone().unwrap_or_default(),
            result,
            owed_at: self.now,
            attempts: 0,
            called_at: None,
        });
    }

    /// The post-rollout webhooks' answers, in any phase.
    pub(super) fn post_rollout(&mut self) {
        if self.status.post_rollout.is_none() {
            return;
        }
        if !self.spec.has_webhook(WebhookType::PostRollout) {
            self.status.post_rollout = None;
            return;
        }
        let counted = self
            .status
            .post_rollout
            .as_ref()
            .map(|p| p.called_at.map_or(p.owed_at, |c| c.max(p.owed_at)));
        let Some((at, answer)) = self.take_answers(WebhookType::PostRollout, counted) else {
            if let Some(at) = next_hook_at(self.spec, &self.status) {
                self.wait((at - self.now).to_std().unwrap_or_default());
            }
            return;
        };
        let Some(p) = self.status.post_rollout.as_mut() else {
            return;
        };
        p.attempts += 1;
        p.called_at = Some(at);
        let (revision, attempts) = (p.revision.clone(), p.attempts);
        match answer {
            Ok(()) => {
                self.status.post_rollout = None;
            }
            Err(why) if attempts >= POST_ROLLOUT_ATTEMPTS => {
                self.status.post_rollout = None;
                self.event(
                    EventType::Warning,
                    reasons::WEBHOOK_FAILED,
                    format!(
                        "post-rollout webhook for revision {revision} not delivered after {attempts} attempts; giving up: {why}"
                    ),
                );
            }
            Err(_) => {
                if let Some(at) = next_hook_at(self.spec, &self.status) {
                    self.wait((at - self.now).to_std().unwrap_or_default());
                }
            }
        }
    }

    /// Asks to be called again when the webhooks are next due.
    fn wait_for_hooks(&mut self) {
        match next_hook_at(self.spec, &self.status) {
            Some(at) if at > self.now => self.wait((at - self.now).to_std().unwrap_or_default()),
            _ => self.wait(std::time::Duration::from_millis(200)),
        }
    }

    /// When the progress deadline's clock started: the confirmation, else the rollout's
    /// start.
    pub(super) fn deadline_anchor(&self) -> Option<DateTime<Utc>> {
        self.status
            .webhooks
            .as_ref()
            .and_then(|w| w.confirmed_at)
            .or(self.status.rollout_started_at)
    }
}

/// The answers in `obs`, for the machine to take.
pub(super) fn answers(obs: &Observations) -> Vec<HookAnswer> {
    obs.hooks.clone()
}
