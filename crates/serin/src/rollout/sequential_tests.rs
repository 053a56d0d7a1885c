//! The rollout state machine with the sequential judge: looks that roll back at once, steps
//! that wait for evidence, state written once per interval and replayed after a restart.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;

use super::*;
use crate::analysis::sequential::{Counts, Look};
use crate::analysis::{LookBatch, MetricLooks, look_grid};
use crate::api::{CanarySpec, CanaryStatus, Phase, RolloutResult};

const SEQUENTIAL: &str = r#"
targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
service: {port: 9898}
router: {appMesh: {mesh: global}}
steps: [20, 50, 100]
analysis:
  interval: 1m
  metrics:
    - name: error-rate
      provider: {prometheus: {address: "http://prometheus:9090"}}
      preset: appmesh-error-rate
      max: 1
"#;

fn spec(yaml: &str) -> CanarySpec {
    serde_norway::from_str(yaml).unwrap()
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 2, 10, 0, 0).unwrap()
}

/// A Canary under the sequential judge, with the controller's memory of its evidence.
struct World {
    spec: CanarySpec,
    status: CanaryStatus,
    obs: Observations,
    now: DateTime<Utc>,
    /// Status writes (decisions whose status differed from the one before).
    writes: usize,
}

impl World {
    /// Stable at rev1, then rev2 rolled out to its first step (20%).
    fn at_first_step(yaml: &str) -> World {
        let mut w = World {
            spec: spec(yaml),
            status: CanaryStatus::default(),
            obs: Observations::default(),
            now: t0(),
            writes: 0,
        };
        w.workloads("rev1", "rev1");
        w.decide();
        assert_eq!(w.status.phase, Phase::Waiting);
        w.workloads("rev2", "rev1");
        w.decide();
        assert_eq!(w.status.canary_weight, 20);
        w
    }

    fn workloads(&mut self, canary: &str, primary: &str) {
        self.obs.canary = WorkloadState {
            revision: Some(canary.into()),
            ready: true,
        };
        self.obs.primary = WorkloadState {
            revision: Some(primary.into()),
            ready: true,
        };
    }

    /// Decides like the controller: the memory of the evidence is what the last decision
    /// returned, looks are consumed.
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
        if d.status != self.status {
            self.writes += 1;
        }
        self.status = d.status.clone();
        self.obs.evidence = d.evidence.clone();
        self.obs.looks = None;
        d
    }

    /// The looks since the state's last one up to now, each with these counts (primary
    /// requests, bad; canary requests, bad), as the provider would fetch them.
    fn looks(&mut self, primary: (f64, f64), canary: (f64, f64)) {
        let base = evidence_base(&self.status, self.obs.evidence.as_ref()).expect("evidence");
        let grid = look_grid(base.through, self.spec.analysis.look_interval(), self.now);
        let look = Look {
            primary: Counts {
                requests: primary.0,
                bad: primary.1,
            },
            canary: Counts {
                requests: canary.0,
                bad: canary.1,
            },
        };
        self.obs.looks = Some(LookBatch {
            from: grid[0],
            through: *grid.last().unwrap(),
            metrics: self
                .spec
                .analysis
                .metrics
                .iter()
                .map(|m| MetricLooks {
                    name: m.name.clone(),
                    result: Ok(vec![look; grid.len() - 1]),
                })
                .collect(),
        });
    }

    /// Advances 10 s and decides on one look with these counts.
    fn look_and_decide(&mut self, primary: (f64, f64), canary: (f64, f64)) -> Decision {
        self.now += Duration::seconds(10);
        self.looks(primary, canary);
        self.decide()
    }

    fn evidence(&self) -> &api::MetricEvidence {
        &self
            .obs
            .evidence
            .as_ref()
            .expect("evidence in memory")
            .metrics[0]
    }
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

fn first_weight(d: &Decision) -> Option<u8> {
    d.actions.iter().find_map(|a| match a {
        Action::SetWeights(w) => Some(w.canary()),
        _ => None,
    })
}

/// Presets are judged sequentially unless the user says otherwise.
#[test]
fn presets_default_to_the_sequential_judge() {
    let s = spec(SEQUENTIAL);
    assert!(s.analysis.metrics[0].is_sequential());
    assert_eq!(
        s.analysis.look_interval(),
        std::time::Duration::from_secs(10)
    );
    let t = spec(&SEQUENTIAL.replace("max: 1", "max: 1\n      judge: Threshold"));
    assert!(!t.analysis.metrics[0].is_sequential());
}

/// Half the canary's requests failing rolls back at the first look after it gets traffic,
/// weight 0 first, with the counts in the reason.
#[test]
fn a_hard_failure_rolls_back_at_the_first_look() {
    let mut w = World::at_first_step(SEQUENTIAL);
    let d = w.look_and_decide((800.0, 1.0), (200.0, 100.0));
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(first_weight(&d), Some(0));
    assert!(
        reasons(&d).contains(&reasons::REGRESSION),
        "{:?}",
        reasons(&d)
    );
    let h = &w.status.history[0];
    assert_eq!(h.result, RolloutResult::RolledBack);
    assert!(
        h.reason.contains("worse than the primary") && h.reason.contains("canary 50% (100 of 200)"),
        "{}",
        h.reason
    );
    assert_eq!(
        w.status.evidence.as_ref().map(|e| e.metrics[0].canary_bad),
        Some(100.0),
        "the final evidence is recorded"
    );
    let check = w
        .status
        .last_check
        .as_ref()
        .expect("the look is the last check");
    assert_eq!((check.time, check.verdict), (w.now, Verdict::Fail));
    assert_eq!(check.results[0].verdict, Verdict::Fail);
    assert!(
        check.results[0].message.contains("worse than the primary"),
        "{check:?}"
    );
    assert_eq!(check.results[0].value, Some(50.0));
    assert_eq!(w.status.failed_checks, 0, "not a threshold check");
}

/// Overwhelming evidence (an e-value beyond f64) is stored finite, so the status survives a
/// JSON round trip.
#[test]
fn overwhelming_evidence_stays_representable() {
    let mut w = World::at_first_step(SEQUENTIAL);
    w.look_and_decide((40_000.0, 4.0), (10_000.0, 5_000.0));
    assert_eq!(w.status.phase, Phase::Failed);
    let json = serde_json::to_string(&w.status).unwrap();
    let back: CanaryStatus = serde_json::from_str(&json).expect("status reads back");
    assert!(back.evidence.unwrap().e_value.is_finite());
}

/// A 5× regression that stays under max (0.1% → 0.5%, max 1%) is caught by comparing the
/// arms, long before the threshold judge could.
#[test]
fn a_regression_under_the_bound_is_caught() {
    let mut w = World::at_first_step(SEQUENTIAL);
    let mut looks = 0;
    while w.status.phase != Phase::Failed && looks < 200 {
        // 100 rps, 20% canary: per 10 s 800 primary requests at 0.1%, 200 canary at 0.5%.
        w.look_and_decide((800.0, 0.8), (200.0, 1.0));
        looks += 1;
    }
    assert_eq!(w.status.phase, Phase::Failed, "never caught");
    assert!(
        w.status.history[0]
            .reason
            .contains("worse than the primary")
    );
}

/// Equal error rates on both arms give no evidence: the step advances once it has both its
/// interval and enough canary requests, not before, and waiting counts as nothing.
#[test]
fn steps_wait_for_evidence_then_advance() {
    let yaml = SEQUENTIAL.replace("interval: 1m", "interval: 1m\n  maxInconclusiveChecks: 1");
    let mut w = World::at_first_step(&yaml);
    let mut waited = false;
    for _ in 0..60 {
        let d = w.look_and_decide((800.0, 0.8), (200.0, 0.2));
        if reasons(&d).contains(&reasons::WAITING_FOR_EVIDENCE) {
            waited = true;
            let msg = &w.status.last_check.as_ref().unwrap().results[0].message;
            assert!(msg.starts_with("waiting for evidence: "), "{msg}");
            assert!(
                msg.contains(" of ") && msg.contains("canary requests"),
                "{msg}"
            );
        }
        if w.status.step == 1 {
            break;
        }
    }
    assert!(waited, "the step never had to wait");
    assert_eq!(w.status.step, 1, "never advanced");
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.inconclusive_checks, 0);
    let e = w.evidence();
    assert!(
        e.canary_requests >= e.required_canary_requests as f64,
        "advanced with {} of {} canary requests",
        e.canary_requests,
        e.required_canary_requests
    );
}

/// A canary without traffic is held and reported at every interval, never promoted and
/// never rolled back for it.
#[test]
fn no_traffic_holds_and_reports() {
    let yaml = SEQUENTIAL.replace("interval: 1m", "interval: 1m\n  maxInconclusiveChecks: 1");
    let mut w = World::at_first_step(&yaml);
    let mut reports = 0;
    for _ in 0..60 {
        let d = w.look_and_decide((1000.0, 1.0), (0.0, 0.0));
        reports += reasons(&d)
            .iter()
            .filter(|r| **r == reasons::WAITING_FOR_EVIDENCE)
            .count();
    }
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.step, 0);
    assert_eq!(reports, 10, "one report per interval over ten minutes");
}

/// The evidence reaches status at checks only: looks between checks change the memory,
/// not the status, so there is one status write per interval.
#[test]
fn evidence_is_written_once_per_interval() {
    let yaml = SEQUENTIAL
        .replace("steps: [20, 50, 100]", "steps: [20, 100]")
        .replace("interval: 1m", "interval: 10m");
    let mut w = World::at_first_step(&yaml);
    let writes = w.writes;
    for _ in 0..59 {
        w.look_and_decide((800.0, 0.8), (200.0, 0.2));
    }
    assert_eq!(w.writes, writes, "a look wrote the status");
    assert_eq!(w.evidence().looks, 59);
    w.look_and_decide((800.0, 0.8), (200.0, 0.2));
    assert_eq!(w.writes, writes + 1);
    let stored = w.status.evidence.as_ref().unwrap();
    assert_eq!(stored.metrics[0].looks, 60);
    assert_eq!(stored.metrics[0].canary_requests, 12_000.0);
}

/// After a restart (no memory) the looks since `status.evidence` are fetched in one batch
/// and give the same state as looking all along.
#[test]
fn a_restart_replays_the_missed_looks() {
    let mut a = World::at_first_step(SEQUENTIAL);
    let mut b = World::at_first_step(SEQUENTIAL);
    for _ in 0..4 {
        a.look_and_decide((800.0, 1.0), (200.0, 1.0));
    }
    // b restarts: its memory is gone, and it looks once over the same 40 s.
    b.obs.evidence = None;
    b.now += Duration::seconds(40);
    b.looks((800.0, 1.0), (200.0, 1.0));
    b.decide();
    let (ea, eb) = (a.evidence(), b.evidence());
    assert_eq!(ea.looks, eb.looks);
    assert_eq!(ea.canary_bad, eb.canary_bad);
    for (x, y) in ea
        .log_likelihood_ratios
        .iter()
        .zip(&eb.log_likelihood_ratios)
    {
        assert!((x - y).abs() < 1e-9, "{x} != {y}");
    }
}

/// A batch fetched from another starting point (a stale memory) is ignored, so no request
/// is counted twice.
#[test]
fn a_batch_from_elsewhere_is_not_counted() {
    let mut w = World::at_first_step(SEQUENTIAL);
    w.look_and_decide((800.0, 1.0), (200.0, 1.0));
    let before = w.evidence().clone();
    w.now += Duration::seconds(10);
    w.looks((800.0, 1.0), (200.0, 1.0));
    if let Some(b) = &mut w.obs.looks {
        b.from -= Duration::seconds(10);
    }
    w.decide();
    assert_eq!(w.evidence(), &before);
}

/// A pause stops advancing, never the looks that can roll back.
#[test]
fn a_pause_keeps_looking() {
    let mut w = World::at_first_step(SEQUENTIAL);
    w.spec.paused = true;
    w.look_and_decide((800.0, 0.0), (200.0, 0.0));
    assert_eq!(w.status.phase, Phase::Paused);
    let d = w.look_and_decide((800.0, 0.0), (200.0, 120.0));
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(first_weight(&d), Some(0));
}

/// Unreadable looks are inconclusive at the check (and count toward
/// maxInconclusiveChecks); they fold nothing, so the next look reads from the same point.
#[test]
fn unreadable_looks_are_inconclusive() {
    let mut w = World::at_first_step(SEQUENTIAL);
    let through = w.obs.evidence.as_ref().unwrap().through;
    for _ in 0..6 {
        w.now += Duration::seconds(10);
        w.looks((800.0, 1.0), (200.0, 1.0));
        if let Some(b) = &mut w.obs.looks {
            b.metrics[0].result = Err(Outcome::NoData {
                reason: "no series matched".into(),
            });
        }
        w.decide();
    }
    assert_eq!(w.obs.evidence.as_ref().unwrap().through, through);
    let check = w.status.last_check.as_ref().unwrap();
    assert_eq!(check.verdict, Verdict::Inconclusive);
    assert!(check.results[0].message.contains("no series matched"));
    assert_eq!(w.status.inconclusive_checks, 1);
}

/// Both arms above max alike: rolled back by default with "the baseline is unhealthy too",
/// held with `baselineUnhealthy: Hold`.
#[test]
fn an_unhealthy_baseline() {
    let mut w = World::at_first_step(SEQUENTIAL);
    for _ in 0..30 {
        if w.status.phase == Phase::Failed {
            break;
        }
        w.look_and_decide((800.0, 40.0), (200.0, 10.0));
    }
    assert_eq!(w.status.phase, Phase::Failed);
    assert!(
        w.status.history[0]
            .reason
            .contains("the baseline is unhealthy too"),
        "{}",
        w.status.history[0].reason
    );

    let yaml = SEQUENTIAL.replace("interval: 1m", "interval: 1m\n  baselineUnhealthy: Hold");
    let mut w = World::at_first_step(&yaml);
    for _ in 0..30 {
        w.look_and_decide((800.0, 40.0), (200.0, 10.0));
    }
    assert_eq!(w.status.phase, Phase::Progressing);
    assert_eq!(w.status.step, 0, "a held step does not advance");
    let check = w.status.last_check.as_ref().unwrap();
    assert!(
        check.results[0].message.contains("baseline is unhealthy"),
        "{check:?}"
    );
}

/// A new step counts from its own start: no look spans a weight change.
#[test]
fn a_new_step_counts_from_its_start() {
    let yaml = SEQUENTIAL
        .replace("interval: 1m", "interval: 1m\n  metrics:\n    - name: x")
        .replace("\n  metrics:\n    - name: x", "");
    let mut w = World::at_first_step(&yaml);
    while w.status.step == 0 {
        w.now += Duration::seconds(7);
        w.looks((8000.0, 8.0), (2000.0, 2.0));
        w.decide();
        assert_eq!(w.status.phase, Phase::Progressing);
    }
    let step_start = w.status.step_started_at.unwrap();
    let ev = w.obs.evidence.as_ref().unwrap();
    assert_eq!(ev.through.timestamp(), step_start.timestamp());
    assert_eq!(w.status.evidence.as_ref().unwrap().through, ev.through);
}

// ---- property test ----

#[derive(Clone, Debug)]
enum Step {
    /// Seconds pass, then a look with (primary requests, primary bad, canary requests,
    /// canary bad).
    Look(i64, (u16, u16, u16, u16)),
    /// Seconds pass without a look (a reconcile woken by something else).
    Wait(i64),
    /// The looks could not be read.
    Unreadable(i64),
    /// The controller restarts: its memory is gone.
    Restart,
    Pause(bool),
    Command(usize),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (1i64..40, (0u16..2000, 0u16..20, 0u16..600, 0u16..60))
            .prop_map(|(s, (a, b, c, d))| Step::Look(s, (a, b.min(a), c, d.min(c)))),
        2 => (1i64..90).prop_map(Step::Wait),
        1 => (1i64..40).prop_map(Step::Unreadable),
        1 => Just(Step::Restart),
        1 => any::<bool>().prop_map(Step::Pause),
        1 => (0..CommandKind::ALL.len()).prop_map(Step::Command),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Over random looks, restarts, pauses and commands: a rollback sets weight 0 first, a
    /// step advances (or promotes) only with the evidence it needs, decisions are
    /// deterministic, and deciding again on the same observations (with the memory the
    /// first decision left) changes nothing.
    #[test]
    fn sequential_safety_rules_hold(steps in proptest::collection::vec(step_strategy(), 1..80)) {
        let mut w = World::at_first_step(SEQUENTIAL);
        for (n, step) in steps.iter().enumerate() {
            match step {
                Step::Look(s, (a, b, c, d)) => {
                    w.now += Duration::seconds(*s);
                    if evidence_base(&w.status, w.obs.evidence.as_ref()).is_some() {
                        w.looks((*a as f64, *b as f64), (*c as f64, *d as f64));
                    }
                }
                Step::Wait(s) => w.now += Duration::seconds(*s),
                Step::Unreadable(s) => {
                    w.now += Duration::seconds(*s);
                    if evidence_base(&w.status, w.obs.evidence.as_ref()).is_some() {
                        w.looks((0.0, 0.0), (0.0, 0.0));
                        if let Some(b) = &mut w.obs.looks {
                            b.metrics[0].result = Err(Outcome::Error { category: "timeout", message: "slow".into() });
                        }
                    }
                }
                Step::Restart => w.obs.evidence = None,
                Step::Pause(p) => w.spec.paused = *p,
                Step::Command(k) => {
                    w.obs.command = Some(Command { kind: CommandKind::ALL[*k], id: format!("c{n}") });
                }
            }
            let before = w.status.clone();
            let problems = api::validate(&w.spec);
            let input = Input { spec: &w.spec, generation: Some(1), status: &before, problems: &problems, observations: &w.obs, now: w.now };
            let d = decide(input);
            prop_assert_eq!(&d, &decide(input), "not deterministic");
            let commanded = d.actions.iter().any(|a| matches!(a, Action::Event(e) if e.reason == reasons::COMMAND));
            if before.phase.in_rollout() && d.status.phase == Phase::Failed {
                let first = d.actions.iter().find(|a| !matches!(a, Action::Event(_)));
                prop_assert_eq!(first, Some(&Action::SetWeights(Weights::STABLE)));
            }
            let same_rollout = before.rollout_started_at == d.status.rollout_started_at;
            let advanced = same_rollout && before.step_started_at.is_some()
                && (d.status.step > before.step || d.status.phase == Phase::Promoting && before.phase == Phase::Progressing);
            if advanced && !commanded {
                let ev = d.evidence.as_ref().or(d.status.evidence.as_ref()).expect("evidence");
                prop_assert!(!ev.metrics.is_empty());
                for m in &ev.metrics {
                    // Recomputed here, not read from the state, and never below the floor.
                    let required = sequential::required_canary_requests(m, &sequential::Settings::default(), 2);
                    prop_assert!(required >= sequential::DEFAULT_MIN_SAMPLE_SIZE);
                    prop_assert!(m.canary_requests >= required as f64,
                        "advanced with {} of {} canary requests", m.canary_requests, required);
                }
            }
            let mut after = w.obs.clone();
            after.evidence = d.evidence.clone();
            let again = decide(Input { status: &d.status, observations: &after, ..input });
            prop_assert!(again.actions.is_empty(), "not idempotent: {:?}", again.actions);
            prop_assert_eq!(&again.status, &d.status);
            w.status = d.status.clone();
            w.obs.evidence = d.evidence.clone();
            w.obs.looks = None;
            w.obs.command = None;
        }
    }
}

const CLOUDWATCH: &str = r#"
targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
service: {port: 9898}
router: {appMesh: {mesh: global}}
steps: [50, 100]
analysis:
  interval: 1m
  metrics:
    - name: error-rate
      provider: {cloudWatch: {region: us-east-1}}
      preset: cloudwatch-appmesh-error-rate
      max: 1
"#;

/// With CloudWatch the looks fall on whole periods and wait for the ingestion delay: the
/// first starts at the next minute boundary and is due one period plus two minutes later.
#[test]
fn cloudwatch_looks_fall_on_periods_after_the_ingestion_delay() {
    let s = spec(CLOUDWATCH);
    assert!(s.analysis.metrics[0].is_sequential());
    assert_eq!(
        s.analysis.look_interval(),
        std::time::Duration::from_secs(60)
    );
    let mut w = World {
        spec: s,
        status: CanaryStatus::default(),
        obs: Observations::default(),
        now: t0() + Duration::milliseconds(12_345),
        writes: 0,
    };
    w.workloads("rev1", "rev1");
    w.decide();
    w.workloads("rev2", "rev1");
    w.decide();
    let through = w.obs.evidence.as_ref().unwrap().through;
    assert_eq!(
        through,
        t0() + Duration::seconds(60),
        "the next minute boundary"
    );
    let due = next_look_at(&w.spec, &w.status, w.obs.evidence.as_ref(), w.now).unwrap();
    assert_eq!(due, through + Duration::seconds(180));
    let yaml = CLOUDWATCH.replace("interval: 1m", "interval: 1m\n  ingestionDelay: 10s");
    let s = spec(&yaml);
    assert_eq!(s.analysis.look_delay(), std::time::Duration::from_secs(10));
    // A hard failure in the first period is rolled back at its look.
    w.now = due;
    w.looks((3000.0, 3.0), (3000.0, 1500.0));
    let d = w.decide();
    assert_eq!(w.status.phase, Phase::Failed);
    assert_eq!(first_weight(&d), Some(0));
}

/// A check before any look has been folded (CloudWatch's first period is still being
/// published) waits: it never passes on a requirement nobody computed yet.
#[test]
fn no_promotion_before_the_first_look() {
    let mut w = World::at_first_step(&CLOUDWATCH.replace("steps: [50, 100]", "steps: [20, 100]"));
    for _ in 0..3 {
        w.now += Duration::seconds(61);
        w.decide();
    }
    assert_eq!(w.status.phase, Phase::Progressing);
    let check = w.status.last_check.as_ref().expect("a check");
    assert_eq!(check.verdict, Verdict::Waiting, "{check:?}");
    assert!(
        check.results[0]
            .message
            .contains("0 of 200 canary requests"),
        "{check:?}"
    );
}

/// A sequential latency metric is judged on the requests slower than max, but its p99 (read
/// at the check) stays the value users see.
#[test]
fn a_latency_metric_shows_its_p99() {
    let yaml = SEQUENTIAL.replace(
        "      preset: appmesh-error-rate\n      max: 1\n",
        "      preset: appmesh-latency-p99\n      max: 500\n",
    );
    let s = spec(&yaml);
    assert!(s.analysis.metrics[0].is_sequential() && s.analysis.metrics[0].is_read_at_checks());
    let mut w = World::at_first_step(&yaml);
    for _ in 0..6 {
        w.now += Duration::seconds(10);
        w.looks((800.0, 4.0), (200.0, 1.0));
        w.obs.metrics = vec![crate::analysis::MetricObservation {
            name: "error-rate".into(),
            outcome: Outcome::Value {
                value: 321.5,
                sample_size: Some(200),
            },
            at: w.now,
        }];
        w.decide();
    }
    let check = w.status.last_check.as_ref().expect("a check");
    let r = &check.results[0];
    assert_eq!(r.value, Some(321.5), "{r:?}");
    assert!(
        r.message.contains("p99 321.5 ms; slower than 500: canary"),
        "{r:?}"
    );
}
