//! Criterion micro-benchmarks of the work Serin does per Canary per check, the parts that
//! multiply by ten thousand: the rollout decision (`rollout::decide`) on a Canary whose
//! check is due and on one with nothing due, and building its queries (template rendering
//! and a preset's PromQL). Run with `cargo bench -p serin --bench hot_paths`; the figures
//! are in docs/benchmarks.md.

use std::hint::black_box;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use serin::analysis::{MetricObservation, Outcome};
use serin::api::{Canary, CanarySpec, CanaryStatus, Phase, Preset};
use serin::metrics::CanaryContext;
use serin::metrics::presets;
use serin::metrics::template::Vars;
use serin::rollout::{Input, Observations, WorkloadState, decide};

const SPEC: &str = r#"
targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
service: {port: 9898}
router: {appMesh: {mesh: global}}
steps: [20, 50, 100]
analysis:
  interval: 1m
  checksPerStep: 5
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

/// A Canary mid-rollout: the decisions from a new revision up to the first canary weight,
/// replayed through `decide` itself.
struct Rollout {
    spec: CanarySpec,
    status: CanaryStatus,
    obs: Observations,
    now: DateTime<Utc>,
}

impl Rollout {
    fn progressing() -> Rollout {
        let spec: CanarySpec = serde_norway::from_str(SPEC).expect("spec");
        let mut r = Rollout {
            spec,
            status: CanaryStatus::default(),
            obs: Observations::default(),
            now: Utc
                .with_ymd_and_hms(2026, 12, 1, 10, 0, 0)
                .single()
                .expect("time"),
        };
        r.workloads("rev1", "rev1");
        r.step();
        r.workloads("rev2", "rev1");
        for _ in 0..20 {
            if r.status.phase == Phase::Progressing && r.status.canary_weight > 0 {
                return r;
            }
            r.step();
            r.now += chrono::Duration::seconds(1);
        }
        panic!("no rollout started: {:?}", r.status.phase);
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

    fn input<'a>(&'a self, problems: &'a [serin::api::Problem]) -> Input<'a> {
        Input {
            spec: &self.spec,
            generation: Some(1),
            status: &self.status,
            problems,
            observations: &self.obs,
            now: self.now,
        }
    }

    fn step(&mut self) {
        let problems = serin::api::validate(&self.spec);
        self.status = decide(self.input(&problems)).status;
    }

    /// The check of the current step is due and every metric passed.
    fn check_due(mut self) -> Rollout {
        self.now += chrono::Duration::seconds(61);
        let at = self.now;
        self.obs.metrics = self
            .spec
            .analysis
            .metrics
            .iter()
            .map(|m| MetricObservation {
                name: m.name.clone(),
                outcome: Outcome::Value {
                    value: 0.2,
                    sample_size: Some(1200),
                },
                at,
            })
            .collect();
        self.obs.weights = None;
        self
    }
}

fn bench_decide(c: &mut Criterion) {
    let idle = Rollout::progressing();
    let due = Rollout::progressing().check_due();
    let problems = serin::api::validate(&idle.spec);
    // The scenarios are what their names say: nothing to do, and a check recorded.
    let nothing = decide(idle.input(&problems));
    assert!(
        nothing.actions.is_empty() && nothing.status.passed_checks == idle.status.passed_checks,
        "nothing should be due: {:?}",
        nothing.actions
    );
    let passed = decide(due.input(&problems));
    assert_eq!(
        passed.status.passed_checks,
        due.status.passed_checks + 1,
        "the due check should pass"
    );
    // The decision the controller makes on most reconciles: nothing is due yet.
    c.bench_function("decide/nothing_due", |b| {
        b.iter(|| decide(black_box(idle.input(&problems))))
    });
    // A check came back passing: the status records it (and the step may advance).
    c.bench_function("decide/check_passed", |b| {
        b.iter(|| decide(black_box(due.input(&problems))))
    });
    c.bench_function("validate", |b| {
        b.iter(|| serin::api::validate(black_box(&idle.spec)))
    });
}

fn context() -> CanaryContext {
    let spec: CanarySpec = serde_norway::from_str(SPEC).expect("spec");
    let mut canary = Canary::new("podinfo", spec);
    canary.metadata.namespace = Some("shop".into());
    let arms = serin::router::data_plane_arms(&canary).expect("arms");
    CanaryContext::of(&canary, arms)
}

fn bench_queries(c: &mut Criterion) {
    let ctx = context();
    let template = r#"sum(rate(http_requests_total{namespace="{{ namespace }}",app="{{ canary }}",code=~"5.."}[{{ interval }}])) / sum(rate(http_requests_total{namespace="{{ namespace }}",app="{{ canary }}"}[{{ interval }}]))"#;
    c.bench_function("template/vars_and_render", |b| {
        b.iter(|| {
            let vars = Vars::new(black_box(&ctx), Duration::from_secs(60));
            vars.render(black_box(template)).expect("render")
        })
    });
    c.bench_function("preset/appmesh_error_rate", |b| {
        b.iter(|| presets::promql_error_rate(Preset::AppmeshErrorRate, black_box(&ctx)))
    });
    c.bench_function("preset/appmesh_latency_p99", |b| {
        b.iter(|| presets::promql_latency(Preset::AppmeshLatencyP99, black_box(&ctx)))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_decide, bench_queries
}
criterion_main!(benches);
