//! The rollout state machine: a pure function of (spec, status, observations, now) that
//! returns the next status and the actions that get there.
//!
//! No I/O, no clock, no Kubernetes client: the controller observes, calls [`decide`],
//! carries out the actions in order, and writes the status only when every action
//! succeeded. Because all rollout state lives in `status` and every action is absolute
//! (set these weights, promote this revision), calling [`decide`] again after a crash
//! repeats nothing and skips nothing.
//!
//! # Rules
//! - A rollout starts when the observed canary revision differs from the stable one (and is
//!   not the revision that just failed, unless a `retry` command asks for it).
//! - A check is due `analysis.interval` after the later of the step's start and the last
//!   check (for Canaries with CloudWatch metrics, on the next minute boundary from then, as
//!   CloudWatch's windows are whole minutes). Only metric results measured at or after that moment count (fresh); the rest
//!   are stale. A step advances after `checksPerStep` passing checks; at most one step
//!   advances per decision, because a step's first check is due one interval after it.
//! - Any failing metric fails the check. A check without a failure but with any
//!   inconclusive metric (no data, NaN, stale, too few samples, provider error) is
//!   inconclusive: it never advances a step. With `inconclusivePolicy: Hold` (default) it
//!   only counts toward `maxInconclusiveChecks` in a row; with `Fail` it also counts as a
//!   failed check. A canary workload that is not ready at a check fails that check.
//! - `failureThreshold` failed checks in one rollout roll back. Rollback sets the canary
//!   weight to 0 as its first action, in the same decision.
//! - Reaching the last step (100) promotes: the canary takes all traffic; in workload mode
//!   the primary is updated to the new revision and, once it is ready, all traffic returns
//!   to the primary and the canary is scaled to zero. In traffic mode the canary backend
//!   keeps 100% and becomes the stable one.
//! - A new revision mid-rollout resets the canary weight to 0, records the old rollout as
//!   superseded, and starts the analysis again. During `Promoting` a new revision waits
//!   until the promotion finishes.
//! - `spec.paused`, or a `pause` command until `resume`, freezes everything except explicit
//!   commands and the looks that can roll back; an invalid spec freezes everything and is
//!   reported.

mod hooks;
mod types;

pub use hooks::{HookAnswer, POST_ROLLOUT_ATTEMPTS, check_name, hooks_due, next_hook_at};
pub use types::*;

use chrono::{DateTime, Utc};

use crate::analysis::{self, Outcome, sequential};
use crate::api::{
    self, BaselineUnhealthyPolicy, CanarySpec, CanaryStatus, CheckRecord, ConditionStatus,
    EvidenceStatus, HistoryEntry, InconclusivePolicy, MetricEvidence, MetricResult, MetricSpec,
    Phase, RolloutResult, TIMELINE_BUDGET, TIMELINE_POINTS, Timeline, TimelinePoint, Verdict,
};
use crate::arms::Weights;

/// How long to wait before looking again while waiting for a workload to become ready.
pub const READINESS_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Upper bound on transitions in one decision (a decision runs transitions until none
/// applies; this only guards against a bug looping forever).
const MAX_TRANSITIONS: usize = 8;

/// Everything [`decide`] needs.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The Canary's spec.
    pub spec: &'a CanarySpec,
    /// The Canary's `metadata.generation`.
    pub generation: Option<i64>,
    /// The Canary's current status.
    pub status: &'a CanaryStatus,
    /// What is wrong with the spec (`api::validate`, computed once by the caller); a
    /// non-empty list freezes the rollout and is reported.
    pub problems: &'a [api::Problem],
    /// What the controller observed.
    pub observations: &'a Observations,
    /// The time of the decision.
    pub now: DateTime<Utc>,
}

/// Computes the next status and the actions that lead to it.
pub fn decide(input: Input<'_>) -> Decision {
    let mut m = Machine {
        spec: input.spec,
        obs: input.observations,
        now: input.now,
        generation: input.generation,
        status: input.status.clone(),
        actions: Vec::new(),
        requeue: None,
        evidence: evidence_base(input.status, input.observations.evidence.as_ref()),
        look_failures: Vec::new(),
        answers: hooks::answers(input.observations),
    };
    m.status.observed_generation = input.generation;
    m.status.canary_weight =
        believed_canary_weight(input.spec, input.status, input.observations.weights);
    if !input.problems.is_empty() {
        m.invalid(input.problems);
        return m.finish();
    }
    m.condition(api::INVALID, ConditionStatus::False, "SpecValid", "");
    m.command();
    // The answers to an owed post-rollout delivery, before a rollout that ends now owes
    // a new one.
    m.post_rollout();
    let mut settled = false;
    for _ in 0..MAX_TRANSITIONS {
        if !m.transition() {
            settled = true;
            break;
        }
    }
    if !settled {
        // Serin's own status write wakes no reconcile: come back for the rest.
        m.wait(std::time::Duration::from_secs(1));
    }
    // When a delivery owed (perhaps since this decision) is due.
    m.post_rollout();
    m.ready_condition();
    m.finish()
}

/// The canary weight Serin holds to be on the data plane: what the router reports when
/// that is a split Serin itself writes for this Canary (0, a step's weight, or 100) — for
/// example after a weight write whose status write was lost — else what status says. Any
/// other split is a hand edit, which the weight write then reports and does not overwrite.
pub fn believed_canary_weight(
    spec: &CanarySpec,
    status: &CanaryStatus,
    observed: Option<Weights>,
) -> u8 {
    match observed.map(|w| w.canary()) {
        Some(found) if found == 0 || found == 100 || spec.steps.contains(&i32::from(found)) => {
            found
        }
        _ => status.canary_weight,
    }
}

/// When the next check of the current step is due, if a step is under analysis (while
/// paused: when it will be due on resuming). The controller fetches metrics once this time
/// has passed, so that [`decide`] sees fresh results.
pub fn next_check_at(spec: &CanarySpec, status: &CanaryStatus) -> Option<DateTime<Utc>> {
    if !matches!(status.phase, Phase::Progressing | Phase::Paused) {
        return None;
    }
    let started = status.step_started_at?;
    let interval = chrono::Duration::from_std(spec.analysis.interval.into()).ok()?;
    let anchor = match &status.last_check {
        // Waiting for evidence: checked again at every look until the evidence is there.
        Some(c) if c.time > started && c.verdict == Verdict::Waiting => return Some(c.time),
        Some(c) if c.time > started => c.time,
        _ => started,
    };
    // Checked: a spec that slipped past validation must not panic the operator.
    let due = anchor.checked_add_signed(interval)?;
    let uses_cloudwatch = spec
        .analysis
        .metrics
        .iter()
        .any(|m| m.provider.cloud_watch.is_some());
    if uses_cloudwatch {
        // CloudWatch serves whole one-minute periods, and the provider's window ends on the
        // last minute boundary before the query. Checking on a boundary at or after the due
        // time keeps that window entirely after the step started.
        Some(ceil_to_minute(due))
    } else {
        Some(due)
    }
}

fn ceil_to_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    let ms = t.timestamp_millis();
    let up = ms.div_euclid(60_000) * 60_000
        + if ms.rem_euclid(60_000) == 0 {
            0
        } else {
            60_000
        };
    DateTime::from_timestamp_millis(up).unwrap_or(t)
}

struct Machine<'a> {
    spec: &'a CanarySpec,
    obs: &'a Observations,
    now: DateTime<Utc>,
    generation: Option<i64>,
    status: CanaryStatus,
    actions: Vec<Action>,
    requeue: Option<std::time::Duration>,
    /// The sequential judge's state (kept in memory by the controller between checks).
    evidence: Option<EvidenceStatus>,
    /// Sequential metrics whose looks could not be read in this decision: (name, why).
    look_failures: Vec<(String, String)>,
    /// The webhooks' answers not yet acted on in this decision (each is taken once).
    answers: Vec<HookAnswer>,
}

/// The sequential judge's state to continue from: the newer of the controller's memory and
/// `status.evidence`, when it belongs to the rollout under way.
pub fn evidence_base(
    status: &CanaryStatus,
    memory: Option<&EvidenceStatus>,
) -> Option<EvidenceStatus> {
    let rev = status.revision.as_deref()?;
    let ours = |e: &&EvidenceStatus| {
        e.revision == rev && e.rollout_started_at == status.rollout_started_at
    };
    let stored = status.evidence.as_ref().filter(ours);
    match (memory.filter(ours), stored) {
        (Some(m), Some(s)) if m.through < s.through => Some(s.clone()),
        (Some(m), _) => Some(m.clone()),
        (None, s) => s.cloned(),
    }
}

/// When the sequential judge's next look is due: `lookInterval` after the last look folded
/// in, while a step is under analysis (also while paused: a pause stops advancing, never the
/// looks that can roll back). `None` without sequential metrics; the decision time itself
/// when a step runs without any state yet.
pub fn next_look_at(
    spec: &CanarySpec,
    status: &CanaryStatus,
    memory: Option<&EvidenceStatus>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if !matches!(status.phase, Phase::Progressing | Phase::Paused)
        || status.step_started_at.is_none()
        || !spec.analysis.has_sequential()
    {
        return None;
    }
    let Some(base) = evidence_base(status, memory) else {
        return Some(now);
    };
    // CloudWatch looks wait for the period to be published completely.
    let look =
        chrono::Duration::from_std(spec.analysis.look_interval() + spec.analysis.look_delay())
            .ok()?;
    base.through.checked_add_signed(look)
}

/// `t` without its fraction of a second: looks fall on whole seconds, as Prometheus range
/// queries do.
fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

fn thousands(n: f64) -> String {
    let n = n.max(0.0).round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percent(bad: f64, requests: f64) -> String {
    if requests <= 0.0 {
        return "no requests".into();
    }
    format!(
        "{}% ({} of {})",
        analysis::display_value(100.0 * bad / requests),
        thousands(bad),
        thousands(requests)
    )
}

/// One line on a metric's counts: "canary 0.6% (12 of 2,000), primary 0.04% (3 of 8,000)".
fn counts_text(m: &MetricEvidence) -> String {
    format!(
        "canary {}, primary {}",
        percent(m.canary_bad, m.canary_requests),
        percent(m.primary_bad, m.primary_requests)
    )
}

fn e_text(e: f64) -> String {
    if e >= 1e6 {
        format!("{e:.1e}")
    } else {
        analysis::display_value(e)
    }
}

impl Machine<'_> {
    fn finish(self) -> Decision {
        let in_rollout = matches!(self.status.phase, Phase::Progressing | Phase::Paused);
        Decision {
            status: self.status,
            actions: self.actions,
            requeue_after: self.requeue,
            evidence: if in_rollout { self.evidence } else { None },
        }
    }

    fn sequential_metrics(&self) -> impl Iterator<Item = &MetricSpec> {
        self.spec
            .analysis
            .metrics
            .iter()
            .filter(|m| m.is_sequential())
    }

    /// Where looks start from now: the whole second, or for CloudWatch the next multiple of
    /// the look interval (its periods start on whole minutes; the requests before are left
    /// out, never counted twice).
    fn look_start(&self) -> DateTime<Utc> {
        if !self.spec.analysis.sequential_cloudwatch() {
            return whole_second(self.now);
        }
        let step = self.spec.analysis.look_interval().as_secs().max(1) as i64;
        let s = self.now.timestamp() + i64::from(self.now.timestamp_subsec_nanos() > 0);
        let up = s.div_euclid(step) * step + if s.rem_euclid(step) == 0 { 0 } else { step };
        DateTime::from_timestamp(up, 0).unwrap_or(self.now)
    }

    /// A fresh state for the rollout under way, starting now.
    fn fresh_evidence(&self) -> EvidenceStatus {
        EvidenceStatus {
            revision: self.status.revision.clone().unwrap_or_default(),
            rollout_started_at: self.status.rollout_started_at,
            through: self.look_start(),
            warmup_until: self.spec.analysis.warmup.and_then(|w| {
                let w = chrono::Duration::from_std(w.into()).ok()?;
                whole_second(self.now).checked_add_signed(w)
            }),
            e_value: 1.0,
            metrics: self
                .sequential_metrics()
                .map(|m| {
                    let mut state = sequential::start(&m.name);
                    state.required_canary_requests = self.settings(m).min_sample_size;
                    state
                })
                .collect(),
        }
    }

    fn settings(&self, metric: &MetricSpec) -> sequential::Settings {
        sequential::Settings::of(&self.spec.analysis, metric)
    }

    fn test_count(&self) -> usize {
        self.spec.analysis.sequential_tests()
    }

    /// Folds the looks the controller fetched into the state and judges it. Returns true
    /// when that rolled the canary back.
    fn look(&mut self) -> bool {
        if !self.spec.analysis.has_sequential() || self.status.step_started_at.is_none() {
            return false;
        }
        if self.evidence.is_none() {
            // A rollout without state (written by an older Serin, or lost): count from now.
            self.evidence = Some(self.fresh_evidence());
            return false;
        }
        let Some(batch) = self.obs.looks.as_ref() else {
            return false;
        };
        let mut ev = self
            .evidence
            .take()
            .unwrap_or_else(|| self.fresh_evidence());
        if batch.from != ev.through || batch.through <= ev.through {
            // Fetched for another starting point (a race with a newer state): ignore.
            self.evidence = Some(ev);
            return false;
        }
        for m in &batch.metrics {
            if let Err(outcome) = &m.result {
                let why = match outcome {
                    Outcome::NoData { reason } => format!("no data: {reason}"),
                    Outcome::Error { message, .. } => format!("provider error: {message}"),
                    Outcome::Value { .. } => "no looks".into(),
                };
                self.look_failures.push((m.name.clone(), why));
            }
        }
        if !self.look_failures.is_empty() {
            // Fold nothing: the next look reads again from the same point, so no request is
            // lost or counted twice.
            self.evidence = Some(ev);
            return false;
        }
        for metric in self
            .spec
            .analysis
            .metrics
            .iter()
            .filter(|m| m.is_sequential())
        {
            let Some(looks) = batch
                .metrics
                .iter()
                .find(|m| m.name == metric.name)
                .and_then(|m| m.result.as_ref().ok())
            else {
                continue;
            };
            let bound = metric.guard_bound();
            let settings = self.settings(metric);
            let tests = self.test_count();
            let warmup_until = ev.warmup_until;
            let step = chrono::Duration::from_std(self.spec.analysis.look_interval())
                .unwrap_or(chrono::Duration::seconds(10));
            let state = match ev.metrics.iter().position(|s| s.metric == metric.name) {
                Some(i) => &mut ev.metrics[i],
                None => {
                    ev.metrics.push(sequential::start(&metric.name));
                    let last = ev.metrics.len() - 1;
                    &mut ev.metrics[last]
                }
            };
            for (k, look) in looks.iter().enumerate() {
                let end = batch.from + step * (k as i32 + 1);
                if warmup_until.is_some_and(|w| end <= w) {
                    sequential::update_warmup(state, look);
                } else {
                    sequential::update(state, look, bound);
                }
            }
            state.required_canary_requests =
                sequential::required_canary_requests(state, &settings, tests);
        }
        ev.through = batch.through;
        let finding = self.finding(&ev);
        // Kept finite: JSON has no infinity, and status must read back.
        ev.e_value = match &finding {
            sequential::Finding::NoRegression { e } => *e,
            sequential::Finding::Regression { combined, .. }
            | sequential::Finding::BaselineUnhealthy { combined, .. } => *combined,
        }
        .clamp(0.0, f64::MAX);
        self.evidence = Some(ev);
        self.act_on(finding)
    }

    fn finding(&self, ev: &EvidenceStatus) -> sequential::Finding {
        let judged: Vec<sequential::Judged<'_>> = self
            .sequential_metrics()
            .filter_map(|m| {
                ev.metrics
                    .iter()
                    .find(|s| s.metric == m.name)
                    .map(|state| sequential::Judged {
                        state,
                        guarded: m.guard_bound().is_some(),
                    })
            })
            .collect();
        sequential::judge(
            &judged,
            self.spec.analysis.alpha(),
            self.spec.analysis.warmup.is_some(),
        )
    }

    fn evidence_of(&self, metric: &str) -> Option<&MetricEvidence> {
        self.evidence
            .as_ref()
            .and_then(|e| e.metrics.iter().find(|m| m.metric == metric))
    }

    /// Rolls back on a regression (and on an unhealthy baseline when the policy says so).
    fn act_on(&mut self, finding: sequential::Finding) -> bool {
        let threshold = 1.0 / self.spec.analysis.alpha();
        match finding {
            sequential::Finding::NoRegression { .. } => false,
            sequential::Finding::Regression {
                metric,
                e,
                combined,
                test,
            } => {
                let counts = self
                    .evidence_of(&metric)
                    .map(counts_text)
                    .unwrap_or_default();
                let what = match test {
                    "bound" => "the canary is above max",
                    "warm-up" => "the canary is many times worse than the primary while warming up",
                    _ => "the canary is worse than the primary",
                };
                let reason = format!(
                    "{metric}: {what} (e-value {} of this test, combined {} >= {} = 1/alpha): {counts}",
                    e_text(e),
                    e_text(combined),
                    e_text(threshold)
                );
                self.event(EventType::Warning, reasons::REGRESSION, reason.clone());
                self.record_failed_look(&metric, &reason);
                self.rollback(RolloutResult::RolledBack, reason);
                true
            }
            sequential::Finding::BaselineUnhealthy { metric, combined } => {
                let counts = self
                    .evidence_of(&metric)
                    .map(counts_text)
                    .unwrap_or_default();
                let reason = format!(
                    "{metric}: the baseline is unhealthy too: both arms are above max and the canary is no worse than the primary (combined e-value {}): {counts}",
                    e_text(combined)
                );
                match self.spec.analysis.baseline_unhealthy {
                    BaselineUnhealthyPolicy::RollBack => {
                        self.event(
                            EventType::Warning,
                            reasons::BASELINE_UNHEALTHY,
                            reason.clone(),
                        );
                        self.record_failed_look(&metric, &reason);
                        self.rollback(RolloutResult::RolledBack, reason);
                        true
                    }
                    BaselineUnhealthyPolicy::Hold => false,
                }
            }
        }
    }

    /// Records the look that rolled back as the last check, so `status.lastCheck` says why:
    /// `metric` failed with `reason`; the other sequential metrics as they stand.
    fn record_failed_look(&mut self, metric: &str, reason: &str) {
        let results = self
            .sequential_metrics()
            .map(|m| {
                let mut r = self.sequential_result(m);
                if m.name == metric {
                    r.verdict = Verdict::Fail;
                    r.message = reason.to_string();
                }
                r
            })
            .collect();
        self.count_check(CheckRecord {
            time: self.now,
            verdict: Verdict::Fail,
            results,
        });
    }

    /// The result of a sequential metric at a check.
    fn sequential_result(&self, metric: &MetricSpec) -> MetricResult {
        let result = |verdict, message: String, value| MetricResult {
            metric: metric.name.clone(),
            value,
            verdict,
            message,
        };
        if let Some((_, why)) = self.look_failures.iter().find(|(n, _)| *n == metric.name) {
            return result(Verdict::Inconclusive, why.clone(), None);
        }
        let Some(state) = self.evidence_of(&metric.name) else {
            return result(Verdict::Inconclusive, "no looks yet".into(), None);
        };
        // The value users see: an error rate's canary percent; a latency's p99 as read at
        // this check (the judge counts the requests slower than max).
        let p99 = self
            .obs
            .metrics
            .iter()
            .find(|o| o.name == metric.name)
            .and_then(|o| match o.outcome {
                Outcome::Value { value, .. } if value.is_finite() => Some(value),
                _ => None,
            });
        let latency = metric.preset.is_some_and(api::Preset::is_latency);
        let value = if latency {
            p99
        } else {
            (state.canary_requests > 0.0).then(|| 100.0 * state.canary_bad / state.canary_requests)
        };
        // Computed now, never taken from the state: a state no look has reached yet (for
        // example CloudWatch's first period, still being published) must not pass on a
        // requirement of zero.
        let required =
            sequential::required_canary_requests(state, &self.settings(metric), self.test_count());
        let e = sequential::e_values(state, metric.guard_bound().is_some());
        let counts = match (latency, p99) {
            (true, Some(v)) => format!(
                "p99 {} ms; slower than {}: {}",
                analysis::display_value(v),
                metric.max.map(analysis::display_value).unwrap_or_default(),
                counts_text(state)
            ),
            (true, None) => format!(
                "slower than {}: {}",
                metric.max.map(analysis::display_value).unwrap_or_default(),
                counts_text(state)
            ),
            _ => counts_text(state),
        };
        if let Some(ev) = &self.evidence
            && let sequential::Finding::BaselineUnhealthy { .. } = self.finding(ev)
        {
            return result(
                Verdict::Waiting,
                format!("held: the baseline is unhealthy too (both arms above max): {counts}"),
                value,
            );
        }
        if state.canary_requests < required as f64 {
            return result(
                Verdict::Waiting,
                format!(
                    "waiting for evidence: {} of {} canary requests (e-value {}): {counts}",
                    thousands(state.canary_requests),
                    thousands(required as f64),
                    e_text(e.relative)
                ),
                value,
            );
        }
        result(
            Verdict::Pass,
            format!(
                "no regression (e-value {} < {}): {counts}",
                e_text(e.relative.max(e.guard.unwrap_or(0.0))),
                e_text(1.0 / self.spec.analysis.alpha())
            ),
            value,
        )
    }

    fn event(&mut self, type_: EventType, reason: &'static str, message: String) {
        self.actions.push(Action::Event(Event {
            type_,
            reason,
            message,
        }));
    }

    fn condition(
        &mut self,
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: &str,
    ) -> bool {
        api::set_condition(
            &mut self.status.conditions,
            type_,
            status,
            reason,
            message,
            self.generation,
            self.now,
        )
    }

    fn set_weights(&mut self, canary: u8) {
        let w = Weights::with_canary(canary);
        self.status.canary_weight = w.canary();
        self.actions.push(Action::SetWeights(w));
        self.timeline_weight(w.canary());
    }

    /// Seconds since the rollout started, for the timeline.
    fn rollout_seconds(&self, t: DateTime<Utc>) -> u32 {
        self.status
            .rollout_started_at
            .map(|s| (t - s).num_seconds().clamp(0, i64::from(u32::MAX)) as u32)
            .unwrap_or(0)
    }

    /// Adds a weight change to the current rollout's timeline (none outside a rollout).
    fn timeline_weight(&mut self, weight: u8) {
        let at = self.rollout_seconds(self.now);
        let Some(t) = self.status.timeline.as_mut() else {
            return;
        };
        // Before its first point a rollout's canary weight is 0 (the safety rules).
        if t.points.last().map_or(0, |p| p.weight) == weight {
            return;
        }
        let point = TimelinePoint {
            at,
            weight,
            ..Default::default()
        };
        if t.points.len() >= TIMELINE_POINTS {
            // Bounded: the latest weight replaces the last kept one.
            if let Some(last) = t.points.last_mut() {
                *last = point;
            }
        } else {
            t.points.push(point);
        }
    }

    /// Records a counted check: `status.lastCheck`, and the last check at the current
    /// weight in the timeline.
    fn count_check(&mut self, check: CheckRecord) {
        let checked_at = self.rollout_seconds(check.time);
        if let Some(t) = self.status.timeline.as_mut()
            && let Some(p) = t.points.last_mut()
        {
            p.checks = p.checks.saturating_add(1);
            p.verdict = Some(check.verdict);
            p.checked_at = Some(checked_at);
            p.values = t
                .metrics
                .iter()
                .map(|m| {
                    check
                        .results
                        .iter()
                        .find(|r| &r.metric == m)
                        .and_then(|r| r.value)
                        .filter(|v| v.is_finite())
                })
                .collect();
        }
        self.status.last_check = Some(check);
    }

    fn wait(&mut self, after: std::time::Duration) {
        self.requeue = Some(match self.requeue {
            Some(r) => r.min(after),
            None => after,
        });
    }

    fn steps(&self) -> &[i32] {
        &self.spec.steps
    }

    fn step_weight(&self, step: usize) -> u8 {
        self.steps()
            .get(step)
            .map(|w| (*w).clamp(0, 100) as u8)
            .unwrap_or(100)
    }

    fn invalid(&mut self, problems: &[api::Problem]) {
        let message = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        let changed = self.condition(api::INVALID, ConditionStatus::True, "InvalidSpec", &message);
        self.condition(
            api::READY,
            ConditionStatus::False,
            "InvalidSpec",
            "the spec is invalid; see the Invalid condition. Nothing is changed until it is fixed",
        );
        if changed {
            self.event(EventType::Warning, reasons::INVALID, message);
        }
    }

    /// Handles an operator command once (by its id).
    fn command(&mut self) {
        let Some(cmd) = &self.obs.command else { return };
        if self.status.last_command.as_deref() == Some(cmd.id.as_str()) {
            return;
        }
        self.status.last_command = Some(cmd.id.clone());
        let phase = self.status.phase;
        let active = matches!(phase, Phase::Progressing | Phase::Paused);
        match cmd.kind {
            CommandKind::Abort if active => {
                self.event(
                    EventType::Normal,
                    reasons::COMMAND,
                    "abort requested".into(),
                );
                self.rollback(RolloutResult::Aborted, "aborted by user".into());
            }
            CommandKind::Promote if active && self.status.step_started_at.is_none() => {
                self.event(
                    EventType::Warning,
                    reasons::COMMAND_IGNORED,
                    "promote ignored: the canary workload is not ready yet, and no traffic \
                     goes to it before it is (promote-full skips the analysis instead)"
                        .into(),
                );
            }
            CommandKind::Promote if active => {
                let step = self.status.step as usize;
                self.event(
                    EventType::Normal,
                    reasons::COMMAND,
                    format!(
                        "promotion to the next step requested: skipping the rest of step {} of {}",
                        step + 1,
                        self.steps().len()
                    ),
                );
                self.advance("promoted by user");
            }
            CommandKind::PromoteFull if active => {
                self.event(
                    EventType::Normal,
                    reasons::COMMAND,
                    "full promotion requested: skipping the remaining steps and checks".into(),
                );
                self.promote("promoted by user".into());
            }
            CommandKind::Pause if !self.status.paused_by_command => {
                self.status.paused_by_command = true;
                self.event(
                    EventType::Normal,
                    reasons::COMMAND,
                    "pause requested: the rollout holds until a resume command".into(),
                );
            }
            CommandKind::Resume if self.status.paused_by_command => {
                self.status.paused_by_command = false;
                if self.spec.paused {
                    self.event(
                        EventType::Warning,
                        reasons::COMMAND_IGNORED,
                        "resume: the pause command is lifted, but spec.paused is still true; \
                         set spec.paused to false to resume"
                            .into(),
                    );
                } else {
                    self.event(
                        EventType::Normal,
                        reasons::COMMAND,
                        "resume requested".into(),
                    );
                }
            }
            CommandKind::Pause => self.event(
                EventType::Warning,
                reasons::COMMAND_IGNORED,
                "pause ignored: already paused by a pause command".into(),
            ),
            CommandKind::Resume => self.event(
                EventType::Warning,
                reasons::COMMAND_IGNORED,
                if self.spec.paused {
                    "resume ignored: the pause is spec.paused; set spec.paused to false".into()
                } else {
                    "resume ignored: nothing is paused".into()
                },
            ),
            CommandKind::Retry if phase == Phase::Failed => {
                if let Some(rev) = self.obs.canary.revision.clone() {
                    self.event(
                        EventType::Normal,
                        reasons::COMMAND,
                        format!("retry requested for revision {rev}"),
                    );
                    self.start(rev);
                } else {
                    self.event(
                        EventType::Warning,
                        reasons::COMMAND_IGNORED,
                        "retry ignored: the canary revision is unknown".into(),
                    );
                }
            }
            kind => self.event(
                EventType::Warning,
                reasons::COMMAND_IGNORED,
                format!(
                    "{} ignored: it does not apply in phase {}",
                    kind.as_str(),
                    phase.as_str()
                ),
            ),
        }
    }

    /// Applies at most one transition; returns whether anything changed.
    fn transition(&mut self) -> bool {
        let before = (self.status.clone(), self.actions.len());
        match self.status.phase {
            Phase::Initializing => self.initializing(),
            Phase::Waiting | Phase::Succeeded | Phase::Failed => self.idle(),
            Phase::Progressing | Phase::Paused => self.progressing(),
            Phase::Promoting => self.promoting(),
        }
        (self.status.clone(), self.actions.len()) != before
    }

    fn initializing(&mut self) {
        if let Some(b) = &self.spec.backends {
            // Traffic mode: the primary backend is the stable version as it stands.
            self.status.stable_revision = Some(b.primary.clone());
            self.set_weights(0);
            self.status.phase = Phase::Waiting;
            self.event(
                EventType::Normal,
                reasons::INITIALIZED,
                format!("all traffic on {}", b.primary),
            );
            return;
        }
        let Some(rev) = self.obs.canary.revision.clone() else {
            self.wait(READINESS_POLL);
            return;
        };
        if self.obs.primary.revision.as_deref() != Some(rev.as_str()) {
            if self.status.revision.as_deref() != Some(rev.as_str()) {
                self.status.revision = Some(rev.clone());
                self.actions.push(Action::PromoteWorkload { revision: rev });
            }
            self.wait(READINESS_POLL);
            return;
        }
        if !self.obs.primary.ready {
            self.status.revision = Some(rev);
            self.wait(READINESS_POLL);
            return;
        }
        self.status.revision = Some(rev.clone());
        self.status.stable_revision = Some(rev.clone());
        self.set_weights(0);
        self.actions.push(Action::ScaleCanaryDown);
        self.status.phase = Phase::Waiting;
        self.event(
            EventType::Normal,
            reasons::INITIALIZED,
            format!("primary ready at revision {rev}; all traffic on the primary"),
        );
    }

    /// Whether the rollout holds: `spec.paused` or a `pause` command.
    fn paused(&self) -> bool {
        self.spec.paused || self.status.paused_by_command
    }

    fn idle(&mut self) {
        if self.paused() {
            return;
        }
        let Some(rev) = self.obs.canary.revision.clone() else {
            return;
        };
        if self.status.stable_revision.as_deref() == Some(rev.as_str()) {
            return;
        }
        if self.status.phase == Phase::Failed
            && self.status.revision.as_deref() == Some(rev.as_str())
        {
            return;
        }
        self.start(rev);
    }

    fn start(&mut self, rev: String) {
        let s = &mut self.status;
        s.phase = Phase::Progressing;
        s.revision = Some(rev.clone());
        s.step = 0;
        s.passed_checks = 0;
        s.failed_checks = 0;
        s.inconclusive_checks = 0;
        s.rollout_started_at = Some(self.now);
        s.step_started_at = None;
        s.last_check = None;
        s.evidence = None;
        s.timeline = Some(Timeline {
            metrics: self
                .spec
                .analysis
                .metrics
                .iter()
                .map(|m| m.name.clone())
                .collect(),
            points: Vec::new(),
        });
        self.evidence = None;
        if s.canary_weight != 0 {
            self.set_weights(0);
        }
        self.start_hooks();
        if !self.spec.is_traffic_mode() && !self.awaiting_rollout_confirmation() {
            self.actions.push(Action::ScaleCanaryUp);
        }
        self.condition(
            api::PROMOTED,
            ConditionStatus::Unknown,
            "Progressing",
            &format!("revision {rev} is under analysis"),
        );
        self.event(
            EventType::Normal,
            reasons::ROLLOUT_STARTED,
            format!("new revision {rev}: starting analysis"),
        );
    }

    fn progressing(&mut self) {
        // A new revision (or a revert to the stable one) replaces this rollout.
        if let Some(rev) = self.obs.canary.revision.clone()
            && self.status.revision.as_deref() != Some(rev.as_str())
        {
            self.supersede(rev);
            return;
        }
        // Looks run paused or not: a pause stops advancing, never the looks that can roll
        // back.
        if self.look() {
            return;
        }
        if let Some(gate) = self.rollback_requested() {
            self.rollback(
                RolloutResult::RolledBack,
                format!("rollback webhook {gate} answered 2xx"),
            );
            return;
        }
        self.wait_for_look();
        if self.paused() {
            if self.status.phase != Phase::Paused {
                self.status.phase = Phase::Paused;
                self.event(
                    EventType::Normal,
                    reasons::PAUSED,
                    format!("paused at canary weight {}%", self.status.canary_weight),
                );
            }
            return;
        }
        if self.status.phase == Phase::Paused {
            self.status.phase = Phase::Progressing;
            self.event(
                EventType::Normal,
                reasons::RESUMED,
                format!("resumed at canary weight {}%", self.status.canary_weight),
            );
        }
        if self.status.step_started_at.is_none() {
            // The confirm-rollout gates hold everything, the canary's scale-up included.
            if !self.confirm_rollout() {
                return;
            }
            // The first step waits for the canary workload, up to spec.progressDeadline.
            if !self.obs.canary.ready {
                if self.past_progress_deadline() {
                    let deadline = self.spec.progress_deadline().as_secs();
                    self.rollback(
                        RolloutResult::RolledBack,
                        format!(
                            "the canary workload was not ready within spec.progressDeadline ({deadline}s)"
                        ),
                    );
                    return;
                }
                self.wait(READINESS_POLL);
                return;
            }
            if !self.pre_rollout() {
                return;
            }
            self.enter_step(0);
            return;
        }
        let Some(due) = next_check_at(self.spec, &self.status) else {
            return;
        };
        if self.now < due {
            self.wait((due - self.now).to_std().unwrap_or(READINESS_POLL));
            return;
        }
        self.check(due);
    }

    /// Asks to be called again when the sequential judge's next look is due.
    fn wait_for_look(&mut self) {
        if let Some(at) = next_look_at(self.spec, &self.status, self.evidence.as_ref(), self.now) {
            self.wait((at - self.now).to_std().unwrap_or_default());
        }
    }

    fn enter_step(&mut self, step: usize) {
        let weight = self.step_weight(step);
        self.status.step = step as u32;
        self.status.passed_checks = 0;
        self.status.step_started_at = Some(self.now);
        if self.spec.analysis.has_sequential() {
            // No look spans a weight change: the new step counts requests from now (the
            // short tail since the last look is dropped, never counted twice).
            let start = self.look_start();
            match (&mut self.evidence, step) {
                (Some(ev), s) if s > 0 => ev.through = start,
                _ => self.evidence = Some(self.fresh_evidence()),
            }
            self.status.evidence = self.evidence.clone();
        }
        self.set_weights(weight);
        self.event(
            EventType::Normal,
            reasons::STEP_ADVANCED,
            format!(
                "canary weight {weight}% (step {} of {})",
                step + 1,
                self.steps().len()
            ),
        );
        self.wait(self.spec.analysis.interval.into());
    }

    /// Counts a check due at `due`: judges every metric, records the check, and passes,
    /// fails or holds the step accordingly.
    fn check(&mut self, due: DateTime<Utc>) {
        let mut results = self.judge_metrics(due);
        results.extend(self.rollout_hook_results());
        let verdict = analysis::combine(results.iter().map(|r| r.verdict));
        let summary = results
            .iter()
            .filter(|r| r.verdict != Verdict::Pass)
            .map(|r| format!("{}: {}", r.metric, r.message))
            .collect::<Vec<_>>()
            .join("; ");
        let interval = chrono::Duration::from_std(self.spec.analysis.interval.into())
            .unwrap_or(chrono::Duration::MAX);
        if verdict == Verdict::Waiting
            && self
                .status
                .last_check
                .as_ref()
                .is_some_and(|c| c.verdict == Verdict::Waiting && self.now - c.time < interval)
        {
            // Still waiting: checked again at every look, recorded once per interval.
            return;
        }
        self.count_check(CheckRecord {
            time: self.now,
            verdict,
            results,
        });
        if self.evidence.is_some() {
            self.status.evidence = self.evidence.clone();
        }
        match verdict {
            Verdict::Pass => self.check_passed(),
            Verdict::Fail => self.check_failed(&summary),
            Verdict::Inconclusive => self.check_inconclusive(&summary),
            Verdict::Waiting => self.event(
                EventType::Normal,
                reasons::WAITING_FOR_EVIDENCE,
                format!("step {} holds: {summary}", self.status.step + 1),
            ),
        }
    }

    /// One result per metric (fresh results judged, missing or stale ones inconclusive),
    /// plus a failed `canary-ready` result when the canary workload is not ready.
    fn judge_metrics(&self, due: DateTime<Utc>) -> Vec<MetricResult> {
        let mut results: Vec<MetricResult> = self
            .spec
            .analysis
            .metrics
            .iter()
            .map(|metric| {
                if metric.is_sequential() {
                    return self.sequential_result(metric);
                }
                let obs = self.obs.metrics.iter().find(|o| o.name == metric.name);
                let (verdict, message, value) = self.judge_metric(metric, obs, due);
                MetricResult {
                    metric: metric.name.clone(),
                    value,
                    verdict,
                    message,
                }
            })
            .collect();
        if !self.obs.canary.ready && !self.spec.is_traffic_mode() {
            results.push(MetricResult {
                metric: "canary-ready".into(),
                value: None,
                verdict: Verdict::Fail,
                message: "the canary workload is not ready".into(),
            });
        }
        results
    }

    /// The verdict, message and value of one metric's observation for a check due at `due`.
    fn judge_metric(
        &self,
        metric: &api::MetricSpec,
        obs: Option<&analysis::MetricObservation>,
        due: DateTime<Utc>,
    ) -> (Verdict, String, Option<f64>) {
        match obs {
            None => (
                Verdict::Inconclusive,
                "no result for this metric".to_string(),
                None,
            ),
            Some(o) if o.at < due => (
                Verdict::Inconclusive,
                format!(
                    "stale: measured at {}, before the check was due at {}",
                    o.at.to_rfc3339(),
                    due.to_rfc3339()
                ),
                None,
            ),
            Some(o) if o.at > self.now => (
                Verdict::Inconclusive,
                format!(
                    "measured at {}, after the decision time: clock skew?",
                    o.at.to_rfc3339()
                ),
                None,
            ),
            Some(o) => {
                let (v, msg) = analysis::judge(metric, &o.outcome);
                let value = match o.outcome {
                    Outcome::Value { value, .. } if value.is_finite() => Some(value),
                    _ => None,
                };
                (v, msg, value)
            }
        }
    }

    /// A passing check: the step advances once it has `checksPerStep` of them.
    fn check_passed(&mut self) {
        let a = &self.spec.analysis;
        self.status.inconclusive_checks = 0;
        self.status.passed_checks += 1;
        if self.status.passed_checks >= a.checks_per_step {
            if self.status.step as usize + 2 >= self.steps().len() && !self.confirm_promotion() {
                // The analysis earned the promotion; a gate holds it.
                return;
            }
            self.advance("all checks passed");
        } else {
            self.wait(a.interval.into());
        }
    }

    /// A failed check: reported, and counted toward `failureThreshold`.
    fn check_failed(&mut self, summary: &str) {
        self.status.inconclusive_checks = 0;
        self.status.failed_checks += 1;
        self.event(
            EventType::Warning,
            reasons::CHECK_FAILED,
            format!(
                "check failed ({} of {}): {summary}",
                self.status.failed_checks, self.spec.analysis.failure_threshold
            ),
        );
        self.after_failure(format!(
            "{} failed checks: {summary}",
            self.status.failed_checks
        ));
    }

    /// An inconclusive check: reported and counted toward `maxInconclusiveChecks` (and, with
    /// `inconclusivePolicy: Fail`, toward `failureThreshold`).
    fn check_inconclusive(&mut self, summary: &str) {
        let a = &self.spec.analysis;
        self.status.inconclusive_checks += 1;
        self.event(
            EventType::Warning,
            reasons::CHECK_INCONCLUSIVE,
            format!(
                "check inconclusive ({} in a row): {summary}",
                self.status.inconclusive_checks
            ),
        );
        if a.inconclusive_policy == InconclusivePolicy::Fail {
            self.status.failed_checks += 1;
        }
        if a.max_inconclusive_checks > 0
            && self.status.inconclusive_checks >= a.max_inconclusive_checks
        {
            self.rollback(
                RolloutResult::RolledBack,
                format!(
                    "{} inconclusive checks in a row: {summary}",
                    self.status.inconclusive_checks
                ),
            );
        } else {
            self.after_failure(format!(
                "{} failed checks, the last inconclusive: {summary}",
                self.status.failed_checks
            ));
        }
    }

    fn after_failure(&mut self, reason: String) {
        if self.status.failed_checks >= self.spec.analysis.failure_threshold {
            self.rollback(RolloutResult::RolledBack, reason);
        } else {
            self.wait(self.spec.analysis.interval.into());
        }
    }

    /// The next step, or promotion from the last analysed one; `reason` says why.
    fn advance(&mut self, reason: &str) {
        let next = self.status.step as usize + 1;
        if next + 1 >= self.steps().len() {
            self.promote(reason.into());
        } else {
            self.enter_step(next);
        }
    }

    fn promote(&mut self, reason: String) {
        if let Some(w) = &mut self.status.webhooks {
            // Whatever the gates still held (promote-full skips them, as it skips checks).
            w.rollout_confirmed = true;
            w.pre_rollout_done = true;
            w.waiting_for = None;
            w.message.clear();
        }
        let rev = self.status.revision.clone().unwrap_or_default();
        let last = self.steps().len().saturating_sub(1);
        self.status.step = last as u32;
        self.status.passed_checks = 0;
        self.status.step_started_at = Some(self.now);
        if self.obs.canary.ready || self.spec.is_traffic_mode() {
            self.set_weights(100);
        }
        if self.spec.is_traffic_mode() {
            self.succeed(reason);
            return;
        }
        self.status.phase = Phase::Promoting;
        self.actions.push(Action::PromoteWorkload {
            revision: rev.clone(),
        });
        self.event(
            EventType::Normal,
            reasons::PROMOTING,
            format!("{reason}: promoting revision {rev} to the primary"),
        );
        self.wait(READINESS_POLL);
    }

    /// Whether the rollout started longer than `spec.progressDeadline` ago.
    fn past_progress_deadline(&self) -> bool {
        let Some(started) = self.deadline_anchor() else {
            return false;
        };
        chrono::Duration::from_std(self.spec.progress_deadline())
            .ok()
            .and_then(|d| started.checked_add_signed(d))
            .is_some_and(|deadline| self.now > deadline)
    }

    fn promoting(&mut self) {
        let rev = self.status.revision.clone().unwrap_or_default();
        let canary_rev = self.obs.canary.revision.as_deref();
        if self.status.canary_weight != 0 && canary_rev.is_some_and(|c| c != rev) {
            // The canary workload now runs a revision nobody analysed: it must not keep
            // the traffic. The primary (old pods, or the promoted revision) takes it all while
            // the promotion finishes; the new revision's rollout starts after it.
            self.set_weights(0);
            self.event(
                EventType::Warning,
                reasons::NEW_REVISION_WHILE_PROMOTING,
                format!(
                    "revision {} arrived while promoting {rev}: all traffic is back on the primary until the promotion finishes, then {0} is rolled out",
                    canary_rev.unwrap_or_default()
                ),
            );
        }
        if self.obs.primary.revision.as_deref() == Some(rev.as_str()) && self.obs.primary.ready {
            self.set_weights(0);
            self.actions.push(Action::ScaleCanaryDown);
            self.succeed("primary updated".into());
            return;
        }
        // PromoteWorkload was carried out before this status was written (the controller
        // writes status only after every action succeeded), so there is nothing to repeat.
        self.wait(READINESS_POLL);
    }

    fn succeed(&mut self, reason: String) {
        let rev = self.status.revision.clone().unwrap_or_default();
        self.record(RolloutResult::Promoted, 100, reason);
        self.status.stable_revision = Some(rev.clone());
        self.status.phase = Phase::Succeeded;
        self.condition(
            api::PROMOTED,
            ConditionStatus::True,
            "Promoted",
            &format!("revision {rev} is the stable version"),
        );
        self.event(
            EventType::Normal,
            reasons::PROMOTED,
            format!("revision {rev} promoted"),
        );
    }

    fn rollback(&mut self, result: RolloutResult, reason: String) {
        let reached = self.reached_weight();
        // Safety rule: the canary weight goes to 0 before anything else.
        self.set_weights(0);
        if !self.spec.is_traffic_mode() {
            self.actions.push(Action::ScaleCanaryDown);
        }
        self.record(result, reached, reason.clone());
        if self.evidence.is_some() {
            self.status.evidence = self.evidence.clone();
        }
        self.status.phase = Phase::Failed;
        let rev = self.status.revision.clone().unwrap_or_default();
        self.condition(
            api::PROMOTED,
            ConditionStatus::False,
            result.as_str(),
            &format!("revision {rev}: {reason}"),
        );
        self.event(
            EventType::Warning,
            reasons::ROLLED_BACK,
            format!("revision {rev} rolled back: {reason}"),
        );
    }

    fn supersede(&mut self, rev: String) {
        let reached = self.reached_weight();
        let old = self.status.revision.clone().unwrap_or_default();
        if self.status.canary_weight != 0 {
            self.set_weights(0);
        }
        self.record(
            RolloutResult::Superseded,
            reached,
            format!("replaced by revision {rev}"),
        );
        self.event(
            EventType::Normal,
            reasons::SUPERSEDED,
            format!("revision {old} replaced by {rev}: restarting analysis"),
        );
        if self.status.stable_revision.as_deref() == Some(rev.as_str()) {
            // Reverted to the stable version: nothing left to roll out.
            if !self.spec.is_traffic_mode() {
                self.actions.push(Action::ScaleCanaryDown);
            }
            self.status.revision = Some(rev);
            self.status.phase = Phase::Waiting;
            return;
        }
        self.start(rev);
    }

    fn reached_weight(&self) -> u8 {
        if self.status.step_started_at.is_none() {
            return 0;
        }
        self.step_weight(self.status.step as usize)
    }

    fn record(&mut self, result: RolloutResult, reached_weight: u8, reason: String) {
        let limit = self.spec.history_limit();
        let entry = HistoryEntry {
            revision: self.status.revision.clone().unwrap_or_default(),
            started_at: self.status.rollout_started_at,
            finished_at: self.now,
            result,
            reached_weight,
            reason,
            timeline: self.status.timeline.take(),
        };
        self.owe_post_rollout(result);
        self.status.webhooks = None;
        self.status.history.insert(0, entry);
        self.status.history.truncate(limit);
        keep_timelines_within_budget(&mut self.status.history);
        self.status.rollout_started_at = None;
    }

    fn ready_condition(&mut self) {
        let phase = self.status.phase;
        let (status, reason, message) = match phase {
            Phase::Initializing => (
                ConditionStatus::False,
                "Initializing",
                "waiting for the primary to be ready".to_string(),
            ),
            _ => (
                ConditionStatus::True,
                phase.as_str(),
                ready_message(&self.status),
            ),
        };
        self.condition(api::READY, status, reason, &message);
    }
}

/// Drops the timelines of the oldest history entries until the rest fit in
/// [`TIMELINE_BUDGET`] bytes.
fn keep_timelines_within_budget(history: &mut [HistoryEntry]) {
    let mut used = 0usize;
    for entry in history.iter_mut() {
        let Some(t) = &entry.timeline else { continue };
        used = used.saturating_add(serde_json::to_vec(t).map_or(usize::MAX, |b| b.len()));
        if used > TIMELINE_BUDGET {
            entry.timeline = None;
        }
    }
}

fn ready_message(s: &CanaryStatus) -> String {
    if let Some(w) = &s.webhooks
        && w.waiting_for.is_some()
        && matches!(s.phase, Phase::Progressing)
    {
        let waiting = if w.message.is_empty() {
            format!(
                "waiting for {}",
                w.waiting_for.as_deref().unwrap_or_default()
            )
        } else {
            w.message.clone()
        };
        return format!(
            "revision {} at canary weight {}%: {waiting}",
            s.revision.as_deref().unwrap_or("?"),
            s.canary_weight
        );
    }
    match s.phase {
        Phase::Progressing | Phase::Paused | Phase::Promoting => format!(
            "revision {} at canary weight {}%",
            s.revision.as_deref().unwrap_or("?"),
            s.canary_weight
        ),
        _ => format!(
            "stable revision {}",
            s.stable_revision.as_deref().unwrap_or("?")
        ),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sequential_tests;
