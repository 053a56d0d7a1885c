//! Transition tests and property tests of the safety rules.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::analysis::{MetricObservation, Outcome};
use crate::api::{
    CanarySpec, CanaryStatus, ConditionStatus, Phase, RolloutResult, WebhookSpec, WebhookType,
    find_condition,
};

const WORKLOAD: &str = r#"
targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
service: {port: 9898}
router: {appMesh: {mesh: global}}
steps: [20, 50, 100]
analysis:
  interval: 1m
  checksPerStep: 1
  failureThreshold: 2
  metrics:
    - name: error-rate
      provider: {prometheus: {address: "http://prometheus:9090"}}
      preset: appmesh-error-rate
      judge: Threshold
      max: 1
    - name: latency
      provider: {prometheus: {address: "http://prometheus:9090"}}
      preset: appmesh-latency-p99
      judge: Threshold
      max: 500
"#;

const TRAFFIC: &str = r#"
backends: {primary: colorgateway, canary: colorgatewayv2}
service: {port: 9080}
router: {gloo: {upstreamGroup: {name: upstreamgroup-gateway, namespace: gloo-system}}}
analysis:
  interval: 30s
  metrics:
    - name: error-rate
      provider: {prometheus: {address: "http://prometheus:9090"}}
      preset: gloo-error-rate
      judge: Threshold
      max: 1
"#;

fn spec(yaml: &str) -> CanarySpec {
    serde_norway::from_str(yaml).unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap()
}

/// A Canary, its status and the world around it, advanced one decision at a time.
struct World {
    spec: CanarySpec,
    status: CanaryStatus,
    obs: Observations,
    now: DateTime<Utc>,
}

impl World {
    fn new(spec: CanarySpec) -> Self {
        World {
            spec,
            status: CanaryStatus::default(),
            obs: Observations::default(),
            now: t0(),
        }
    }

    /// Workload mode, initialised with `rev1` as the stable revision.
    fn stable_workload() -> Self {
        let mut w = World::new(spec(WORKLOAD));
        w.canary("rev1", false);
        w.primary("rev1", true);
        w.decide();
        assert_eq!(w.status.phase, Phase::Waiting);
        w
    }

    fn canary(&mut self, rev: &str, ready: bool) {
        self.obs.canary = WorkloadState {
            revision: Some(rev.into()),
            ready,
        };
    }

    fn primary(&mut self, rev: &str, ready: bool) {
        self.obs.primary = WorkloadState {
            revision: Some(rev.into()),
            ready,
        };
    }

    fn decide(&mut self) -> Decision {
        let problems = api::validate(&self.spec);
        let d = decide(Input {
            spec: &self.spec,
            generation: Some(1),
            status: &self.status,
            problems: &problems,
            observations: &self.obs,
            now: self.now,
        });
        self.status = d.status.clone();
        d
    }

    fn advance(&mut self, secs: i64) {
        self.now += Duration::seconds(secs);
    }

    /// Every metric reports `value` measured now.
    fn metrics(&mut self, value: f64) {
        let at = self.now;
        self.obs.metrics = self
            .spec
            .analysis
            .metrics
            .iter()
            .map(|m| MetricObservation {
                name: m.name.clone(),
                outcome: Outcome::Value {
                    value,
                    sample_size: None,
                },
                at,
            })
            .collect();
    }

    fn outcome(&mut self, outcome: Outcome) {
        let at = self.now;
        self.obs.metrics = self
            .spec
            .analysis
            .metrics
            .iter()
            .map(|m| MetricObservation {
                name: m.name.clone(),
                outcome: outcome.clone(),
                at,
            })
            .collect();
    }

    /// Waits one interval and reports passing metrics.
    fn pass_interval(&mut self) -> Decision {
        self.advance(self.interval_secs());
        self.metrics(0.1);
        self.decide()
    }

    fn interval_secs(&self) -> i64 {
        std::time::Duration::from(self.spec.analysis.interval).as_secs() as i64
    }

    /// Starts a rollout of `rev` with the canary ready; returns after the first weight.
    /// Every webhook due now answers `ok` (2xx) or not.
    fn answer_due(&mut self, ok: bool) {
        let check_due = next_check_at(&self.spec, &self.status).is_some_and(|d| d <= self.now);
        let at = self.now;
        self.obs.hooks = hooks_due(&self.spec, &self.status, check_due, self.now)
            .into_iter()
            .map(|h| HookAnswer {
                name: h.name.clone(),
                outcome: if ok {
                    Ok(())
                } else {
                    Err("answered 500".into())
                },
                at,
            })
            .collect();
    }

    /// The names of the webhooks due now.
    fn due(&self) -> Vec<String> {
        let check_due = next_check_at(&self.spec, &self.status).is_some_and(|d| d <= self.now);
        hooks_due(&self.spec, &self.status, check_due, self.now)
            .into_iter()
            .map(|h| h.name.clone())
            .collect()
    }

    /// Webhook `name` answers `outcome` now (the others' answers are dropped).
    fn answer(&mut self, answers: &[(&str, Result<(), &str>)]) {
        let at = self.now;
        self.obs.hooks = answers
            .iter()
            .map(|(name, outcome)| HookAnswer {
                name: name.to_string(),
                outcome: outcome.map_err(|e| e.to_string()),
                at,
            })
            .collect();
    }

    fn start(&mut self, rev: &str) -> Decision {
        self.canary(rev, false);
        self.decide();
        self.canary(rev, true);
        self.decide()
    }
}

fn weights(d: &Decision) -> Vec<u8> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::SetWeights(w) => Some(w.canary()),
            _ => None,
        })
        .collect()
}

fn reasons(d: &Decision) -> Vec<&'static str> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e.reason),
            _ => None,
        })
        .collect()
}

/// On first sight in workload mode the primary is created from the target, and traffic
/// goes to it only once it is ready.
#[test]
fn workload_initialisation_waits_for_primary() {
    let mut w = World::new(spec(WORKLOAD));
    w.canary("rev1", false);
    let d = w.decide();
    assert_eq!(
        d.actions,
        vec![Action::PromoteWorkload {
            revision: "rev1".into()
        }]
    );
    assert_eq!(w.status.phase, Phase::Initializing);
    assert_eq!(d.requeue_after, Some(READINESS_POLL));

    w.primary("rev1", false);
    assert!(w.decide().actions.is_empty());

    w.primary("rev1", true);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0]);
    assert!(d.actions.contains(&Action::ScaleCanaryDown));
    assert_eq!(w.status.phase, Phase::Waiting);
    assert_eq!(w.status.stable_revision.as_deref(), Some("rev1"));
    let ready = find_condition(&w.status.conditions, api::READY).unwrap();
    assert_eq!(ready.status, ConditionStatus::True);
}

/// A new pod template starts a rollout: the canary scales up, and its first weight is set
/// once it is ready.
#[test]
fn new_revision_starts_rollout() {
    let mut w = World::stable_workload();
    w.canary("rev2", false);
    let d = w.decide();
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.revision.as_deref(), Some("rev2"));
    assert!(d.actions.contains(&Action::ScaleCanaryUp));
    assert_eq!(reasons(&d), vec![reasons::ROLLOUT_STARTED]);
    assert!(
        weights(&d).is_empty(),
        "no traffic before the canary is ready"
    );

    w.canary("rev2", true);
    let d = w.decide();
    assert_eq!(weights(&d), vec![20]);
    assert_eq!(w.status.canary_weight, 20);
    assert_eq!(w.status.step_started_at, Some(w.now));
    assert_eq!(d.requeue_after, Some(std::time::Duration::from_secs(60)));
}

/// Before a check is due nothing happens; the requeue says when it is due.
#[test]
fn waits_for_the_interval() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.advance(20);
    w.metrics(0.1);
    let d = w.decide();
    assert!(d.actions.is_empty());
    assert_eq!(d.requeue_after, Some(std::time::Duration::from_secs(40)));
    assert_eq!(w.status.passed_checks, 0);
}

/// A step advances after checksPerStep fresh passing checks, one step per decision.
#[test]
fn advances_after_checks_per_step() {
    let mut w = World::stable_workload();
    w.spec.analysis.checks_per_step = 2;
    w.start("rev2");
    let d = w.pass_interval();
    assert!(weights(&d).is_empty());
    assert_eq!(w.status.passed_checks, 1);
    let d = w.pass_interval();
    assert_eq!(weights(&d), vec![50]);
    assert_eq!(w.status.step, 1);
    assert_eq!(w.status.passed_checks, 0);
    assert_eq!(reasons(&d), vec![reasons::STEP_ADVANCED]);
}

/// Results measured before the check was due are stale: they never pass a check.
#[test]
fn stale_results_do_not_count() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.metrics(0.1); // measured when the step started, before the check is due
    w.advance(60);
    let d = w.decide();
    assert!(weights(&d).is_empty());
    assert_eq!(w.status.inconclusive_checks, 1);
    let check = w.status.last_check.as_ref().unwrap();
    assert_eq!(check.verdict, Verdict::Inconclusive);
    assert!(
        check.results[0].message.contains("stale"),
        "{:?}",
        check.results
    );
}

/// failureThreshold failed checks roll back: canary weight 0 is the first action.
#[test]
fn rolls_back_at_failure_threshold() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.advance(60);
    w.metrics(5.0);
    let d = w.decide();
    assert_eq!(w.status.failed_checks, 1);
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(reasons(&d), vec![reasons::CHECK_FAILED]);
    w.advance(60);
    w.metrics(5.0);
    let d = w.decide();
    let first = d.actions.iter().find(|a| !matches!(a, Action::Event(_)));
    assert_eq!(
        first,
        Some(&Action::SetWeights(Weights::STABLE)),
        "{:?}",
        d.actions
    );
    assert!(d.actions.contains(&Action::ScaleCanaryDown));
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(w.status.canary_weight, 0);
    let h = &w.status.history[0];
    assert_eq!(
        (h.result, h.reached_weight, h.revision.as_str()),
        (RolloutResult::RolledBack, 20, "rev2")
    );
    let promoted = find_condition(&w.status.conditions, api::PROMOTED).unwrap();
    assert_eq!(promoted.status, ConditionStatus::False);
    assert_eq!(w.status.stable_revision.as_deref(), Some("rev1"));

    // The failed revision is not retried by itself...
    w.advance(600);
    assert!(w.decide().actions.is_empty());
    // ...but a newer one starts again.
    w.canary("rev3", false);
    w.decide();
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.failed_checks, 0);
}

/// No data, NaN and provider errors never advance; with Hold they only count toward
/// maxInconclusiveChecks, which then rolls back.
#[test]
fn inconclusive_checks_hold_then_roll_back() {
    let mut w = World::stable_workload();
    w.spec.analysis.max_inconclusive_checks = 3;
    w.start("rev2");
    let outcomes = [
        Outcome::NoData {
            reason: "no series".into(),
        },
        Outcome::Value {
            value: f64::NAN,
            sample_size: None,
        },
        Outcome::Error {
            category: "timeout",
            message: "timed out".into(),
        },
    ];
    for (i, o) in outcomes.into_iter().enumerate() {
        w.advance(60);
        w.outcome(o);
        let d = w.decide();
        assert_eq!(w.status.inconclusive_checks, i as u32 + 1);
        assert_eq!(w.status.failed_checks, 0);
        if i < 2 {
            assert!(weights(&d).is_empty());
            assert_eq!(w.status.step, 0);
        } else {
            assert_eq!(weights(&d), vec![0]);
            assert_eq!(w.status.phase, Phase::Failed);
        }
    }
}

/// With inconclusivePolicy Fail, an inconclusive check counts toward failureThreshold.
#[test]
fn inconclusive_policy_fail_counts_as_failure() {
    let mut w = World::stable_workload();
    w.spec.analysis.inconclusive_policy = InconclusivePolicy::Fail;
    w.start("rev2");
    for _ in 0..2 {
        w.advance(60);
        w.outcome(Outcome::NoData {
            reason: "none".into(),
        });
        w.decide();
    }
    assert_eq!(w.status.failed_checks, 2);
    assert_eq!(w.status.phase, Phase::Failed);
}

/// A passing check does not reset failures: failureThreshold counts per rollout.
#[test]
fn failures_accumulate_across_steps() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.advance(60);
    w.metrics(5.0);
    w.decide();
    w.pass_interval();
    assert_eq!(w.status.canary_weight, 50);
    w.advance(60);
    w.metrics(5.0);
    w.decide();
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(w.status.history[0].reached_weight, 50);
}

/// A full workload rollout: 20 → 50 → 100, the primary is updated, then traffic returns
/// to it and the canary scales down.
#[test]
fn workload_promotion() {
    let mut w = World::stable_workload();
    let mut seen = weights(&w.start("rev2"));
    seen.extend(weights(&w.pass_interval()));
    let d = w.pass_interval();
    seen.extend(weights(&d));
    assert_eq!(seen, vec![20, 50, 100]);
    assert_eq!(w.status.phase, Phase::Promoting);
    assert!(d.actions.contains(&Action::PromoteWorkload {
        revision: "rev2".into()
    }));

    w.primary("rev2", false);
    assert!(w.decide().actions.is_empty());
    w.primary("rev2", true);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0]);
    assert!(d.actions.contains(&Action::ScaleCanaryDown));
    assert_eq!(w.status.phase, Phase::Succeeded);
    assert_eq!(w.status.stable_revision.as_deref(), Some("rev2"));
    assert_eq!(w.status.history[0].result, RolloutResult::Promoted);
    assert_eq!(w.status.history[0].reached_weight, 100);
    let promoted = find_condition(&w.status.conditions, api::PROMOTED).unwrap();
    assert_eq!(promoted.status, ConditionStatus::True);
    // Idle afterwards.
    w.advance(3600);
    assert!(w.decide().actions.is_empty());
}

/// Traffic mode: the rollout starts at once, weights go 0 → 20 → 50 → 100 on the canary
/// backend, which then becomes the stable one.
#[test]
fn traffic_mode_promotion() {
    let mut w = World::new(spec(TRAFFIC));
    w.canary("colorgatewayv2", true);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0, 20]);
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.stable_revision.as_deref(), Some("colorgateway"));
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::ScaleCanaryUp | Action::ScaleCanaryDown))
    );
    assert_eq!(weights(&w.pass_interval()), vec![50]);
    assert_eq!(weights(&w.pass_interval()), vec![100]);
    assert_eq!(w.status.phase, Phase::Succeeded);
    assert_eq!(w.status.stable_revision.as_deref(), Some("colorgatewayv2"));
    assert_eq!(w.status.canary_weight, 100);

    // Swapping the backends for the next release starts from all traffic on the new primary.
    w.spec.backends = Some(api::Backends {
        primary: "colorgatewayv2".into(),
        canary: "colorgatewayv3".into(),
    });
    w.canary("colorgatewayv3", true);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0, 20]);
}

/// A new revision mid-rollout sets the canary weight to 0, records the old rollout as
/// superseded and restarts the analysis.
#[test]
fn new_revision_restarts_analysis() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.pass_interval();
    assert_eq!(w.status.canary_weight, 50);
    w.canary("rev3", false);
    let d = w.decide();
    assert_eq!(d.actions[0], Action::SetWeights(Weights::STABLE));
    assert_eq!(w.status.revision.as_deref(), Some("rev3"));
    assert_eq!(
        (
            w.status.step,
            w.status.passed_checks,
            w.status.failed_checks
        ),
        (0, 0, 0)
    );
    assert_eq!(w.status.history[0].result, RolloutResult::Superseded);
    assert_eq!(w.status.history[0].reached_weight, 50);
    assert!(reasons(&d).contains(&reasons::SUPERSEDED));
    w.canary("rev3", true);
    assert_eq!(weights(&w.decide()), vec![20]);
}

/// Reverting the target to the stable revision mid-rollout ends the rollout.
#[test]
fn revert_to_stable_ends_rollout() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.canary("rev1", false);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0]);
    assert!(d.actions.contains(&Action::ScaleCanaryDown));
    assert_eq!(w.status.phase, Phase::Waiting);
}

/// spec.paused freezes the rollout: due checks are not counted; resuming continues.
#[test]
fn pause_and_resume() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.spec.paused = true;
    let d = w.decide();
    assert_eq!(w.status.phase, Phase::Paused);
    assert_eq!(reasons(&d), vec![reasons::PAUSED]);
    w.advance(600);
    w.metrics(0.1);
    let d = w.decide();
    assert!(d.actions.is_empty());
    assert_eq!(w.status.passed_checks, 0);
    w.spec.paused = false;
    let d = w.decide();
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(reasons(&d), vec![reasons::RESUMED, reasons::STEP_ADVANCED]);
    assert_eq!(w.status.canary_weight, 50);
}

/// A paused Canary does not start a new rollout.
#[test]
fn paused_does_not_start() {
    let mut w = World::stable_workload();
    w.spec.paused = true;
    w.canary("rev2", true);
    assert!(w.decide().actions.is_empty());
    assert_eq!(w.status.phase, Phase::Waiting);
}

/// Abort rolls back at once, and the same command id is not carried out twice.
#[test]
fn abort_command() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.obs.command = Some(Command {
        kind: CommandKind::Abort,
        id: "1".into(),
    });
    let d = w.decide();
    assert_eq!(weights(&d), vec![0]);
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(w.status.history[0].result, RolloutResult::Aborted);
    assert_eq!(w.status.last_command.as_deref(), Some("1"));
    assert!(w.decide().actions.is_empty());
}

fn command(w: &mut World, kind: CommandKind, id: &str) -> Decision {
    w.obs.command = Some(Command {
        kind,
        id: id.into(),
    });
    w.decide()
}

/// Promote skips the rest of the current step: one step per command, promotion from the
/// last analysed step.
#[test]
fn promote_command_goes_one_step() {
    let mut w = World::stable_workload();
    assert_eq!(weights(&w.start("rev2")), vec![20]);
    let d = command(&mut w, CommandKind::Promote, "p1");
    assert_eq!(weights(&d), vec![50]);
    assert_eq!((w.status.phase, w.status.step), (Phase::Progressing, 1));
    assert!(
        w.decide().actions.is_empty(),
        "a command is carried out once"
    );
    let d = command(&mut w, CommandKind::Promote, "p2");
    assert_eq!(weights(&d), vec![100]);
    assert!(d.actions.contains(&Action::PromoteWorkload {
        revision: "rev2".into()
    }));
    assert_eq!(w.status.phase, Phase::Promoting);
}

/// Promote sends no traffic to a canary workload that is not ready yet.
#[test]
fn promote_command_waits_for_a_ready_canary() {
    let mut w = World::stable_workload();
    w.canary("rev2", false);
    w.decide();
    assert_eq!(w.status.phase, Phase::Progressing);
    let d = command(&mut w, CommandKind::Promote, "p");
    assert_eq!(reasons(&d), vec![reasons::COMMAND_IGNORED]);
    assert!(weights(&d).is_empty());
}

/// Promote-full skips every remaining step and check.
#[test]
fn promote_full_command() {
    let mut w = World::stable_workload();
    w.start("rev2");
    let d = command(&mut w, CommandKind::PromoteFull, "p");
    assert_eq!(weights(&d), vec![100]);
    assert!(d.actions.contains(&Action::PromoteWorkload {
        revision: "rev2".into()
    }));
    assert_eq!(w.status.phase, Phase::Promoting);
}

/// Pause holds the rollout (passing checks do not advance it) until resume, and survives a
/// spec that says `paused: false`; resume does not override `spec.paused`.
#[test]
fn pause_and_resume_commands() {
    let mut w = World::stable_workload();
    w.start("rev2");
    let d = command(&mut w, CommandKind::Pause, "1");
    assert_eq!(reasons(&d), vec![reasons::COMMAND, reasons::PAUSED]);
    assert!(w.status.paused_by_command);
    assert_eq!(w.status.phase, Phase::Paused);
    for _ in 0..3 {
        let d = w.pass_interval();
        assert!(weights(&d).is_empty(), "advanced while paused");
    }
    assert_eq!((w.status.phase, w.status.step), (Phase::Paused, 0));
    let d = command(&mut w, CommandKind::Pause, "2");
    assert_eq!(reasons(&d), vec![reasons::COMMAND_IGNORED]);

    let d = command(&mut w, CommandKind::Resume, "3");
    assert!(!w.status.paused_by_command);
    assert_eq!(w.status.phase, Phase::Progressing);
    assert!(reasons(&d).contains(&reasons::RESUMED), "{:?}", reasons(&d));
    // The check that came due during the pause counts now, with the passing results.
    assert_eq!(weights(&d), vec![50]);

    // Resume lifts only the command's pause.
    w.spec.paused = true;
    command(&mut w, CommandKind::Pause, "4");
    let d = command(&mut w, CommandKind::Resume, "5");
    assert_eq!(reasons(&d), vec![reasons::COMMAND_IGNORED]);
    assert!(!w.status.paused_by_command);
    assert_eq!(w.status.phase, Phase::Paused);
    let d = command(&mut w, CommandKind::Resume, "6");
    assert_eq!(reasons(&d), vec![reasons::COMMAND_IGNORED]);
}

/// Every command name parses back to its kind.
#[test]
fn command_names_round_trip() {
    for kind in CommandKind::ALL {
        assert_eq!(CommandKind::parse(kind.as_str()), Some(kind));
    }
    assert_eq!(CommandKind::parse("promote-all"), None);
}

/// Retry restarts the failed revision; commands that do not apply are reported, not run.
#[test]
fn retry_command() {
    let mut w = World::stable_workload();
    w.obs.command = Some(Command {
        kind: CommandKind::Retry,
        id: "r0".into(),
    });
    let d = w.decide();
    assert_eq!(reasons(&d), vec![reasons::COMMAND_IGNORED]);
    w.obs.command = None;
    w.start("rev2");
    w.obs.command = Some(Command {
        kind: CommandKind::Abort,
        id: "a".into(),
    });
    w.decide();
    assert_eq!(w.status.phase, Phase::Failed);
    w.obs.command = Some(Command {
        kind: CommandKind::Retry,
        id: "r1".into(),
    });
    let d = w.decide();
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.revision.as_deref(), Some("rev2"));
    assert_eq!(weights(&d), vec![20]);
}

/// An invalid spec is never acted on: one Warning Event, an Invalid condition naming the
/// field, and no router or workload action.
#[test]
fn invalid_spec_is_reported_once_and_not_acted_on() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.spec.steps = vec![50, 20, 100];
    w.advance(60);
    w.metrics(0.1);
    let d = w.decide();
    assert_eq!(d.actions.len(), 1);
    match &d.actions[0] {
        Action::Event(e) => {
            assert_eq!((e.type_, e.reason), (EventType::Warning, reasons::INVALID));
            assert!(e.message.contains("spec.steps[1]"), "{}", e.message);
        }
        a => panic!("unexpected action {a:?}"),
    }
    let invalid = find_condition(&w.status.conditions, api::INVALID).unwrap();
    assert_eq!(invalid.status, ConditionStatus::True);
    assert!(w.decide().actions.is_empty(), "the Event is emitted once");
    w.spec.steps = vec![20, 50, 100];
    w.decide();
    let invalid = find_condition(&w.status.conditions, api::INVALID).unwrap();
    assert_eq!(invalid.status, ConditionStatus::False);
}

/// A canary workload that is not ready at a check fails the check.
#[test]
fn unready_canary_fails_check() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.canary("rev2", false);
    w.advance(60);
    w.metrics(0.1);
    w.decide();
    assert_eq!(w.status.failed_checks, 1);
    assert_eq!(w.status.last_check.as_ref().unwrap().verdict, Verdict::Fail);
}

/// A canary workload that never becomes ready holds the first step only until
/// spec.progressDeadline (default 10m), then the rollout fails; before, it waited forever.
#[test]
fn canary_never_ready_fails_after_the_progress_deadline() {
    let mut w = World::stable_workload();
    w.canary("rev2", false);
    w.decide();
    assert_eq!(w.status.phase, Phase::Progressing);
    w.advance(599);
    let d = w.decide();
    assert!(weights(&d).is_empty(), "{d:?}");
    assert_eq!(w.status.phase, Phase::Progressing);
    w.advance(2);
    let d = w.decide();
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(weights(&d), vec![0]);
    assert!(d.actions.contains(&Action::ScaleCanaryDown));
    assert!(reasons(&d).contains(&reasons::ROLLED_BACK), "{d:?}");
    assert!(
        w.status.history[0].reason.contains("spec.progressDeadline"),
        "{:?}",
        w.status.history[0]
    );
    // A shorter deadline applies as written.
    let mut w = World::stable_workload();
    w.spec.progress_deadline = Some(kube::core::Duration::from(std::time::Duration::from_secs(
        30,
    )));
    w.canary("rev2", false);
    w.decide();
    w.advance(31);
    w.decide();
    assert_eq!(w.status.phase, Phase::Failed);
}

/// A new revision arriving while Promoting (all traffic on the canary workload, which now
/// rolls to a template nobody analysed) sends all traffic back to the primary at once; the
/// promotion finishes, then the new revision is rolled out from step 0. Before, the new
/// template served 100% until the promotion finished.
#[test]
fn new_revision_while_promoting_takes_traffic_off_the_canary() {
    let mut w = World::stable_workload();
    w.start("rev2");
    w.pass_interval();
    let d = w.pass_interval();
    assert_eq!(weights(&d), vec![100]);
    assert_eq!(w.status.phase, Phase::Promoting);
    w.primary("rev1", true);
    w.canary("rev3", false);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0], "{d:?}");
    assert!(reasons(&d).contains(&reasons::NEW_REVISION_WHILE_PROMOTING));
    assert_eq!(w.status.phase, Phase::Promoting);
    assert_eq!(w.status.canary_weight, 0);
    // Nothing more while the primary updates.
    assert!(weights(&w.decide()).is_empty());
    // The promotion finishes, and in the same decision rev3 starts its own rollout.
    w.primary("rev2", true);
    let d = w.decide();
    assert_eq!(w.status.stable_revision.as_deref(), Some("rev2"));
    assert_eq!(w.status.history[0].result, RolloutResult::Promoted);
    assert_eq!(w.status.history[0].revision, "rev2");
    assert!(reasons(&d).contains(&reasons::PROMOTED), "{d:?}");
    assert_eq!(w.status.revision.as_deref(), Some("rev3"));
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.canary_weight, 0);
}

/// The data plane is the truth: a weight write whose status write was lost (status still
/// says 20 while the route holds 50) is adopted, so the rollout goes on from 50 and status
/// shows it; a split Serin never writes (a hand edit) is not adopted.
#[test]
fn weights_read_from_the_data_plane_override_a_stale_status() {
    let mut w = World::stable_workload();
    w.start("rev2");
    let stale = w.status.clone();
    assert_eq!(stale.canary_weight, 20);
    let d = w.pass_interval();
    assert_eq!(weights(&d), vec![50]);
    // The status write after that weight write failed: the next decision starts from the
    // old status, with the route at 50.
    w.status = stale.clone();
    w.obs.weights = Some(Weights::with_canary(50));
    let d = w.decide();
    assert_eq!(w.status.canary_weight, 50);
    assert_eq!(w.status.step, 1, "{d:?}");
    assert_eq!(
        believed_canary_weight(&w.spec, &stale, Some(Weights::with_canary(50))),
        50
    );
    // A hand edit to a split Serin never writes is not taken for Serin's own.
    assert_eq!(
        believed_canary_weight(&w.spec, &stale, Some(Weights::with_canary(30))),
        20
    );
    assert_eq!(believed_canary_weight(&w.spec, &stale, None), 20);
}

/// The weights of a timeline, each with its checks and last verdict.
fn points(t: &crate::api::Timeline) -> Vec<(u32, u8, u32, Option<Verdict>)> {
    t.points
        .iter()
        .map(|p| (p.at, p.weight, p.checks, p.verdict))
        .collect()
}

/// A promoted rollout's history entry keeps its weight over time with the last check at each
/// weight: 20 → 50 → 100 while analysed, then 0 once the primary runs the new revision.
#[test]
fn history_keeps_the_weight_timeline_of_a_promotion() {
    let mut w = World::stable_workload();
    w.start("rev2");
    let live = w.status.timeline.clone().expect("a rollout has a timeline");
    assert_eq!(live.metrics, vec!["error-rate", "latency"]);
    assert_eq!(points(&live), vec![(0, 20, 0, None)]);
    w.pass_interval();
    w.pass_interval();
    w.advance(5);
    w.primary("rev2", true);
    w.decide();
    assert_eq!(w.status.phase, Phase::Succeeded);
    assert_eq!(w.status.timeline, None, "moved into the history entry");
    let t = w.status.history[0].timeline.as_ref().expect("kept");
    assert_eq!(
        points(t),
        vec![
            (0, 20, 1, Some(Verdict::Pass)),
            (60, 50, 1, Some(Verdict::Pass)),
            (120, 100, 0, None),
            (125, 0, 0, None),
        ]
    );
    assert_eq!(t.points[0].checked_at, Some(60));
    assert_eq!(t.points[0].values, vec![Some(0.1), Some(0.1)]);
}

/// A rolled-back rollout's timeline ends at 0 after the failed check, which it keeps.
#[test]
fn history_keeps_the_failed_check_of_a_rollback() {
    let mut w = World::stable_workload();
    w.start("rev2");
    for _ in 0..2 {
        w.advance(60);
        w.metrics(5.0);
        w.decide();
    }
    assert_eq!(w.status.phase, Phase::Failed);
    let t = w.status.history[0].timeline.as_ref().expect("kept");
    assert_eq!(
        points(t),
        vec![(0, 20, 2, Some(Verdict::Fail)), (120, 0, 0, None)]
    );
    assert_eq!(t.points[0].checked_at, Some(120));
    assert_eq!(t.points[0].values, vec![Some(5.0), Some(5.0)]);
}

/// However long the history, its timelines stay within the status budget: the newest keep
/// theirs, the oldest lose them and keep their summary.
#[test]
fn history_timelines_fit_the_budget() {
    let mut w = World::stable_workload();
    w.spec.history_limit = Some(100);
    w.spec.steps = (1..=20).map(|i| i * 5).collect();
    for i in 2..60 {
        w.start(&format!("rev{i}"));
        for _ in 0..18 {
            w.pass_interval();
        }
        w.obs.command = Some(Command {
            kind: CommandKind::Abort,
            id: format!("a{i}"),
        });
        w.decide();
        w.obs.command = None;
    }
    let h = &w.status.history;
    assert_eq!(h.len(), 58);
    let kept = h.iter().take_while(|e| e.timeline.is_some()).count();
    assert!(kept >= 1, "the newest entry keeps its timeline");
    assert!(h[kept..].iter().all(|e| e.timeline.is_none()));
    let bytes: usize = h[..kept]
        .iter()
        .map(|e| {
            serde_json::to_vec(e.timeline.as_ref().unwrap())
                .unwrap()
                .len()
        })
        .sum();
    assert!(bytes <= crate::api::TIMELINE_BUDGET, "{bytes} bytes kept");
    assert_eq!(h[0].timeline.as_ref().unwrap().points.len(), 20);
}

/// History is newest first and bounded by spec.historyLimit.
#[test]
fn history_is_bounded() {
    let mut w = World::stable_workload();
    w.spec.history_limit = Some(2);
    for i in 2..6 {
        w.start(&format!("rev{i}"));
        w.obs.command = Some(Command {
            kind: CommandKind::Abort,
            id: format!("a{i}"),
        });
        w.decide();
        w.obs.command = None;
    }
    let revs: Vec<&str> = w
        .status
        .history
        .iter()
        .map(|h| h.revision.as_str())
        .collect();
    assert_eq!(revs, vec!["rev5", "rev4"]);
}

/// next_check_at anchors on the later of the step start and the last check.
#[test]
fn next_check_is_anchored_in_status() {
    let mut w = World::stable_workload();
    w.spec.analysis.checks_per_step = 3;
    w.start("rev2");
    assert_eq!(
        next_check_at(&w.spec, &w.status),
        Some(t0() + Duration::seconds(60))
    );
    w.pass_interval();
    assert_eq!(
        next_check_at(&w.spec, &w.status),
        Some(t0() + Duration::seconds(120))
    );
}

/// With a CloudWatch metric, checks fall on minute boundaries, so the provider's
/// whole-minute window lies after the step started.
#[test]
fn cloudwatch_checks_fall_on_minute_boundaries() {
    let mut w = World::stable_workload();
    w.spec.analysis.metrics[1].provider = api::ProviderSpec {
        prometheus: None,
        cloud_watch: Some(api::AwsConnection {
            region: "us-west-2".into(),
            role_arn: None,
            endpoint: None,
        }),
    };
    w.spec.analysis.metrics[1].preset = Some(api::Preset::CloudwatchAppmeshLatencyP99);
    w.advance(25); // 10:00:25
    w.start("rev2");
    let due = next_check_at(&w.spec, &w.status).unwrap();
    assert_eq!(
        due,
        t0() + Duration::seconds(120),
        "10:01:25 rounds up to 10:02:00"
    );
    w.advance(60); // 10:01:25: the interval has passed, but not the boundary
    w.metrics(0.1);
    let d = w.decide();
    assert!(d.actions.is_empty());
    assert_eq!(w.status.passed_checks, 0);
    assert_eq!(d.requeue_after, Some(std::time::Duration::from_secs(35)));
}

// ---- property tests of the safety rules ----

#[derive(Clone, Debug)]
enum Step {
    Wait(i64),
    Metrics {
        value: f64,
        fresh: bool,
    },
    NoData,
    ProviderError,
    CanaryRevision(u8, bool),
    PrimaryFollows(bool),
    Command(usize),
    Pause(bool),
    /// Every webhook due now answers: 2xx or not.
    Hooks(bool),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1i64..200).prop_map(Step::Wait),
        4 => (prop_oneof![Just(0.1), Just(0.9), Just(2.0), Just(f64::NAN), Just(700.0)], any::<bool>())
            .prop_map(|(value, fresh)| Step::Metrics { value, fresh }),
        1 => Just(Step::NoData),
        1 => Just(Step::ProviderError),
        2 => (1u8..4, any::<bool>()).prop_map(|(r, ready)| Step::CanaryRevision(r, ready)),
        2 => any::<bool>().prop_map(Step::PrimaryFollows),
        1 => (0..CommandKind::ALL.len()).prop_map(Step::Command),
        1 => any::<bool>().prop_map(Step::Pause),
        2 => any::<bool>().prop_map(Step::Hooks),
    ]
}

fn apply(w: &mut World, step: &Step, n: usize) {
    match step {
        Step::Wait(s) => w.advance(*s),
        Step::Metrics { value, fresh } => {
            w.metrics(*value);
            if !fresh {
                for m in &mut w.obs.metrics {
                    m.at -= Duration::seconds(90);
                }
            }
        }
        Step::NoData => w.outcome(Outcome::NoData {
            reason: "none".into(),
        }),
        Step::ProviderError => w.outcome(Outcome::Error {
            category: "unreachable",
            message: "refused".into(),
        }),
        Step::CanaryRevision(r, ready) => w.canary(&format!("rev{r}"), *ready),
        Step::PrimaryFollows(ready) => {
            // The primary runs whatever was last promoted to it.
            if let Some(rev) = w.status.revision.clone() {
                w.primary(&rev, *ready);
            }
        }
        Step::Command(k) => {
            w.obs.command = Some(Command {
                kind: CommandKind::ALL[*k],
                id: format!("c{n}"),
            });
        }
        Step::Pause(p) => w.spec.paused = *p,
        Step::Hooks(ok) => w.answer_due(*ok),
    }
}

fn check_invariants(w: &World, before: &CanaryStatus, d: &Decision) -> Result<(), TestCaseError> {
    // Weights always sum to 100, each within 0..=100; status records the last one written.
    let set: Vec<Weights> = d
        .actions
        .iter()
        .filter_map(|a| {
            if let Action::SetWeights(w) = a {
                Some(*w)
            } else {
                None
            }
        })
        .collect();
    for ws in &set {
        prop_assert_eq!(ws.primary() as u32 + ws.canary() as u32, 100);
        prop_assert!(ws.canary() <= 100);
    }
    if let Some(last) = set.last() {
        prop_assert_eq!(last.canary(), d.status.canary_weight);
    } else {
        prop_assert_eq!(before.canary_weight, d.status.canary_weight);
    }

    let same_rollout = before.revision == d.status.revision
        && before.rollout_started_at == d.status.rollout_started_at;
    let commanded = d
        .actions
        .iter()
        .any(|a| matches!(a, Action::Event(e) if e.reason == reasons::COMMAND));
    let full_promotion = commanded
        && w.obs
            .command
            .as_ref()
            .is_some_and(|c| c.kind == CommandKind::PromoteFull);

    // Never two steps in one decision (promote-full is the user's explicit jump).
    if same_rollout && d.status.step > before.step && !full_promotion {
        prop_assert_eq!(d.status.step, before.step + 1, "two steps in one decision");
    }

    // A paused rollout (spec.paused or a pause command) never advances by itself.
    let paused = w.spec.paused || (before.paused_by_command && d.status.paused_by_command);
    if paused && same_rollout && !commanded {
        prop_assert!(d.status.step <= before.step, "advanced while paused");
        prop_assert!(
            !(before.phase.in_rollout()
                && before.phase != Phase::Promoting
                && matches!(d.status.phase, Phase::Promoting | Phase::Succeeded)),
            "promoted while paused"
        );
    }

    // No advance without a fresh passing check of every metric.
    let advanced = before.step_started_at.is_some()
        && same_rollout
        && (d.status.step > before.step
            || (before.phase == Phase::Progressing && d.status.phase == Phase::Promoting))
        || (before.phase == Phase::Progressing && d.status.phase == Phase::Succeeded);
    if advanced && !commanded {
        let check = d.status.last_check.as_ref();
        prop_assert!(
            check.is_some_and(|c| c.time == w.now && c.verdict == Verdict::Pass),
            "advanced without a passing check now"
        );
        let due = next_check_at(&w.spec, before).expect("a step was under analysis");
        for m in &w.spec.analysis.metrics {
            let o = w.obs.metrics.iter().find(|o| o.name == m.name);
            prop_assert!(
                o.is_some_and(|o| o.at >= due && o.at <= w.now),
                "metric {} not fresh",
                m.name
            );
            let (verdict, _) = crate::analysis::judge(m, &o.unwrap().outcome);
            prop_assert_eq!(verdict, Verdict::Pass);
        }
    }

    // Rollback sets the canary weight to 0 first, in the same decision.
    let rolled_back = before.phase.in_rollout() && d.status.phase == Phase::Failed;
    if rolled_back {
        let first = d.actions.iter().find(|a| !matches!(a, Action::Event(_)));
        prop_assert_eq!(first, Some(&Action::SetWeights(Weights::STABLE)));
        prop_assert_eq!(d.status.canary_weight, 0);
    }

    // No traffic and no scale-up while the confirm-rollout gates hold the rollout.
    if d.status
        .webhooks
        .as_ref()
        .is_some_and(|h| !h.rollout_confirmed)
        && w.spec.has_webhook(WebhookType::ConfirmRollout)
    {
        prop_assert_eq!(d.status.canary_weight, 0);
        prop_assert!(!d.actions.contains(&Action::ScaleCanaryUp));
    }
    // The first step starts only after every pre-rollout hook answered 2xx.
    if same_rollout
        && before.step_started_at.is_none()
        && d.status.step_started_at.is_some()
        && !full_promotion
        && w.spec.has_webhook(WebhookType::PreRollout)
    {
        prop_assert!(
            d.status
                .webhooks
                .as_ref()
                .is_none_or(|h| h.pre_rollout_done),
            "traffic before the pre-rollout hooks passed"
        );
    }
    // The analysis promotes only when every confirm-promotion gate answered 2xx now.
    let promoted_by_analysis = same_rollout
        && before.phase == Phase::Progressing
        && matches!(d.status.phase, Phase::Promoting | Phase::Succeeded)
        && !commanded;
    if promoted_by_analysis {
        for gate in w.spec.webhooks_of(WebhookType::ConfirmPromotion) {
            prop_assert!(
                w.obs
                    .hooks
                    .iter()
                    .any(|a| a.name == gate.name && a.outcome.is_ok()),
                "promoted without confirm-promotion {}",
                gate.name
            );
        }
    }

    // History is bounded, and so are the timelines in it.
    prop_assert!(d.status.history.len() <= w.spec.history_limit());
    let timelines: usize = d
        .status
        .history
        .iter()
        .filter_map(|h| h.timeline.as_ref())
        .map(|t| serde_json::to_vec(t).unwrap().len())
        .sum();
    prop_assert!(timelines <= crate::api::TIMELINE_BUDGET);
    for t in d
        .status
        .timeline
        .iter()
        .chain(d.status.history.iter().filter_map(|h| h.timeline.as_ref()))
    {
        prop_assert!(t.points.len() <= crate::api::TIMELINE_POINTS);
        prop_assert!(
            t.points
                .windows(2)
                .all(|p| p[0].at <= p[1].at && p[0].weight != p[1].weight)
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Over random sequences of time, metric results, revisions, readiness, commands and
    /// pauses, every decision keeps the safety rules, is deterministic, and is idempotent:
    /// deciding again on the same observations changes nothing and acts on nothing.
    #[test]
    fn safety_rules_hold(traffic in any::<bool>(), hooks in any::<bool>(), steps in proptest::collection::vec(step_strategy(), 1..60)) {
        let mut w = World::new(spec(if traffic { TRAFFIC } else { WORKLOAD }));
        w.spec.history_limit = Some(3);
        if hooks {
            w.spec.webhooks = every_webhook();
        }
        w.canary("rev1", true);
        w.primary("rev1", true);
        for (n, step) in steps.iter().enumerate() {
            apply(&mut w, step, n);
            let before = w.status.clone();
            let problems = api::validate(&w.spec);
            let input = Input { spec: &w.spec, generation: Some(1), status: &before, problems: &problems, observations: &w.obs, now: w.now };
            let d = decide(input);
            prop_assert_eq!(&d, &decide(input), "not deterministic");
            check_invariants(&w, &before, &d)?;
            let again = decide(Input { status: &d.status, ..input });
            prop_assert!(again.actions.is_empty(), "not idempotent: {:?}", again.actions);
            prop_assert_eq!(&again.status, &d.status);
            w.status = d.status;
        }
    }
}

/// An interval too long for time arithmetic (3,000,000,000 hours) is refused by validation
/// with the field and the limit, and a spec that slipped past validation gets no check time
/// instead of a panic inside reconcile.
#[test]
fn absurd_interval_is_refused_and_never_panics() {
    let s = spec(&TRAFFIC.replace("interval: 30s", "interval: 3000000000h"));
    let problems = api::validate(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.to_string().contains("spec.analysis.interval")
                && p.to_string().contains("24h")),
        "{problems:?}"
    );
    let status = CanaryStatus {
        phase: Phase::Progressing,
        step_started_at: Some(t0()),
        ..Default::default()
    };
    assert_eq!(next_check_at(&s, &status), None);
}

// ---- webhooks ----

fn webhook(name: &str, type_: WebhookType) -> WebhookSpec {
    WebhookSpec {
        name: name.into(),
        type_,
        url: Some(format!("http://hooks.test/{name}")),
        secret_ref: None,
        headers: vec![],
        timeout: None,
        metadata: Default::default(),
        format: None,
    }
}

/// One webhook of every type, named after it.
fn every_webhook() -> Vec<WebhookSpec> {
    WebhookType::ALL
        .iter()
        .map(|t| webhook(t.as_str(), *t))
        .collect()
}

fn with_hooks(hooks: &[(&str, WebhookType)]) -> World {
    let mut w = World::stable_workload();
    w.spec.webhooks = hooks.iter().map(|(n, t)| webhook(n, *t)).collect();
    w
}

/// A confirm-rollout gate holds the rollout before anything happens (no scale-up, no
/// traffic), is asked once per interval, and lets it start once it answers 2xx.
#[test]
fn confirm_rollout_holds_the_rollout_until_the_gate_answers_2xx() {
    let mut w = with_hooks(&[("approve", WebhookType::ConfirmRollout)]);
    w.canary("rev2", true);
    let d = w.decide();
    assert_eq!(w.status.phase, Phase::Progressing);
    assert!(
        !d.actions.contains(&Action::ScaleCanaryUp),
        "scaled up before the gate"
    );
    assert!(weights(&d).is_empty());
    assert_eq!(w.due(), vec!["approve"]);

    // An answer made at the instant the rollout started is about another rollout.
    w.answer(&[("approve", Ok(()))]);
    assert!(!w.decide().actions.contains(&Action::ScaleCanaryUp));
    w.advance(1);
    w.answer(&[("approve", Err("answered 403: not yet"))]);
    let d = w.decide();
    assert!(weights(&d).is_empty());
    assert!(!d.actions.contains(&Action::ScaleCanaryUp));
    assert_eq!(reasons(&d), vec![reasons::WAITING_FOR_WEBHOOK]);
    assert_eq!(d.requeue_after, Some(std::time::Duration::from_secs(60)));
    let ready = find_condition(&w.status.conditions, api::READY).unwrap();
    assert!(
        ready.message.contains("confirm-rollout"),
        "{}",
        ready.message
    );
    assert!(ready.message.contains("not yet"), "{}", ready.message);
    // Deciding again on the same answer changes nothing; the gate is asked again only
    // after an interval.
    let again = w.decide();
    assert!(again.actions.is_empty());
    assert!(w.due().is_empty());
    w.advance(60);
    assert_eq!(w.due(), vec!["approve"]);

    w.answer(&[("approve", Ok(()))]);
    let d = w.decide();
    assert!(d.actions.contains(&Action::ScaleCanaryUp));
    assert!(reasons(&d).contains(&reasons::WEBHOOK_CONFIRMED));
    assert_eq!(
        weights(&d),
        vec![20],
        "the canary was ready: its first step starts"
    );
    assert!(w.due().is_empty());
}

/// Pre-rollout hooks run once the canary is ready and before it gets traffic; each failure
/// counts toward failureThreshold, which rolls back.
#[test]
fn pre_rollout_hooks_gate_the_first_step_and_their_failures_roll_back() {
    let mut w = with_hooks(&[("smoke", WebhookType::PreRollout)]);
    w.canary("rev2", false);
    let d = w.decide();
    assert!(d.actions.contains(&Action::ScaleCanaryUp));
    assert!(w.due().is_empty(), "called before the canary is ready");
    w.canary("rev2", true);
    let d = w.decide();
    assert!(
        weights(&d).is_empty(),
        "traffic before the pre-rollout hook"
    );
    assert_eq!(w.due(), vec!["smoke"]);

    w.advance(1);
    w.answer(&[("smoke", Err("answered 500: smoke test failed"))]);
    let d = w.decide();
    assert_eq!(reasons(&d), vec![reasons::WEBHOOK_FAILED]);
    assert_eq!(w.status.webhooks.as_ref().unwrap().pre_rollout_failures, 1);
    assert!(w.decide().actions.is_empty(), "an answer counts once");
    assert_eq!(w.status.webhooks.as_ref().unwrap().pre_rollout_failures, 1);

    w.advance(60);
    assert_eq!(w.due(), vec!["smoke"]);
    w.answer(&[("smoke", Err("answered 500: smoke test failed"))]);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0]);
    assert_eq!(w.status.phase, Phase::Failed);
    let h = &w.status.history[0];
    assert_eq!(h.result, RolloutResult::RolledBack);
    assert!(h.reason.contains("pre-rollout"), "{}", h.reason);
    assert!(h.reason.contains("smoke test failed"), "{}", h.reason);

    // A passing pre-rollout hook lets the first step start.
    let mut w = with_hooks(&[("smoke", WebhookType::PreRollout)]);
    w.start("rev2");
    w.advance(1);
    w.answer(&[("smoke", Ok(()))]);
    let d = w.decide();
    assert_eq!(weights(&d), vec![20]);
}

/// A rollout hook is called with each check; its failure fails the check like a metric.
#[test]
fn a_failing_rollout_hook_fails_its_check() {
    let mut w = with_hooks(&[("load", WebhookType::Rollout)]);
    w.start("rev2");
    w.advance(60);
    assert_eq!(w.due(), vec!["load"]);
    w.metrics(0.1);
    w.answer(&[("load", Err("answered 500: 12% errors"))]);
    let d = w.decide();
    assert_eq!(reasons(&d), vec![reasons::CHECK_FAILED]);
    let check = w.status.last_check.as_ref().unwrap();
    let hook = check
        .results
        .iter()
        .find(|r| r.metric == "webhook/load")
        .unwrap();
    assert_eq!(hook.verdict, Verdict::Fail);
    assert!(hook.message.contains("12% errors"), "{}", hook.message);

    // With a 2xx answer and passing metrics, the step advances.
    w.advance(60);
    w.metrics(0.1);
    w.answer(&[("load", Ok(()))]);
    let d = w.decide();
    assert_eq!(weights(&d), vec![50]);
}

/// At the last analysed step a confirm-promotion gate holds the promotion the checks
/// earned; checks go on meanwhile, and the promotion follows the first 2xx.
#[test]
fn confirm_promotion_holds_the_promotion_while_checks_go_on() {
    let mut w = with_hooks(&[("approve", WebhookType::ConfirmPromotion)]);
    w.start("rev2");
    w.advance(60);
    assert!(w.due().is_empty(), "asked at a step that does not promote");
    w.metrics(0.1);
    assert_eq!(weights(&w.decide()), vec![50]);

    w.advance(60);
    assert_eq!(w.due(), vec!["approve"]);
    w.metrics(0.1);
    w.answer(&[("approve", Err("answered 409: change freeze"))]);
    let d = w.decide();
    assert!(weights(&d).is_empty());
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.canary_weight, 50);
    assert_eq!(reasons(&d), vec![reasons::WAITING_FOR_WEBHOOK]);
    let ready = find_condition(&w.status.conditions, api::READY).unwrap();
    assert!(ready.message.contains("change freeze"), "{}", ready.message);

    // A failing check while it waits still counts.
    w.advance(60);
    w.metrics(5.0);
    w.answer(&[("approve", Ok(()))]);
    let d = w.decide();
    assert_eq!(reasons(&d), vec![reasons::CHECK_FAILED]);
    assert_eq!(w.status.phase, Phase::Progressing);

    w.advance(60);
    w.metrics(0.1);
    w.answer(&[("approve", Ok(()))]);
    let d = w.decide();
    assert_eq!(weights(&d), vec![100]);
    assert_eq!(w.status.phase, Phase::Promoting);
    assert!(reasons(&d).contains(&reasons::WEBHOOK_CONFIRMED));
}

/// A rollback gate that answers 2xx rolls back; any other answer changes nothing.
#[test]
fn a_rollback_gate_answering_2xx_rolls_back() {
    let mut w = with_hooks(&[("kill", WebhookType::Rollback)]);
    w.start("rev2");
    w.advance(60);
    assert_eq!(w.due(), vec!["kill"]);
    w.metrics(0.1);
    w.answer(&[("kill", Err("answered 404"))]);
    assert_eq!(weights(&w.decide()), vec![50]);

    w.advance(60);
    w.metrics(0.1);
    w.answer(&[("kill", Ok(()))]);
    let d = w.decide();
    assert_eq!(weights(&d), vec![0]);
    assert_eq!(w.status.phase, Phase::Failed);
    assert!(w.status.history[0].reason.contains("rollback webhook kill"));
}

/// A finished rollout owes its post-rollout hooks one delivery: retried with backoff
/// until 2xx, and given up (with a Warning) after the last attempt; never changing the
/// outcome.
#[test]
fn post_rollout_is_retried_then_given_up_and_never_changes_the_outcome() {
    let mut w = World::new(spec(TRAFFIC));
    w.spec.webhooks = vec![webhook("report", WebhookType::PostRollout)];
    w.spec.analysis.checks_per_step = 1;
    w.decide();
    w.canary("colorgatewayv2", true);
    w.decide();
    assert!(w.due().is_empty());
    w.pass_interval();
    w.pass_interval();
    assert_eq!(w.status.phase, Phase::Succeeded);
    let owed = w.status.post_rollout.clone().unwrap();
    assert_eq!(owed.result, RolloutResult::Promoted);
    assert_eq!(owed.revision, "colorgatewayv2");
    assert_eq!(w.due(), vec!["report"]);

    w.advance(1);
    let mut pauses = Vec::new();
    for attempt in 1..=POST_ROLLOUT_ATTEMPTS {
        assert_eq!(w.due(), vec!["report"], "attempt {attempt}");
        w.answer(&[("report", Err("could not be reached: connection refused"))]);
        let d = w.decide();
        assert_eq!(w.status.phase, Phase::Succeeded);
        if attempt < POST_ROLLOUT_ATTEMPTS {
            assert!(reasons(&d).is_empty());
            let pause = d.requeue_after.unwrap();
            assert!(w.due().is_empty(), "asked again before the backoff");
            pauses.push(pause.as_secs());
            w.advance(pause.as_secs() as i64);
        } else {
            assert_eq!(reasons(&d), vec![reasons::WEBHOOK_FAILED]);
        }
    }
    assert_eq!(pauses, vec![5, 10, 20, 40]);
    assert!(w.status.post_rollout.is_none());
    assert!(w.due().is_empty());
}

/// A delivered post-rollout hook is owed no more.
#[test]
fn a_delivered_post_rollout_is_owed_no_more() {
    let mut w = with_hooks(&[("report", WebhookType::PostRollout)]);
    w.start("rev2");
    w.obs.command = Some(Command {
        kind: CommandKind::Abort,
        id: "a".into(),
    });
    w.decide();
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(
        w.status.post_rollout.as_ref().unwrap().result,
        RolloutResult::Aborted
    );
    w.advance(1);
    w.answer(&[("report", Ok(()))]);
    let d = w.decide();
    assert!(d.actions.is_empty());
    assert!(w.status.post_rollout.is_none());
    assert!(w.due().is_empty());
}
