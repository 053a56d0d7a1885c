//! What the targets share: a valid Canary to vary, and the operator's derived values of a
//! spec (what reconcile computes before any I/O), which must never panic.
#![allow(dead_code)]

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use serin::api::{Canary, CanarySpec, CanaryStatus, CheckRecord, Phase, Verdict};
use serin::metrics::{CanaryContext, freshness_query, plan_queries, template::Vars};

/// A valid workload-mode Canary's spec, as JSON, with one Prometheus and one CloudWatch
/// metric.
pub fn base_spec() -> Value {
    json!({
        "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "podinfo"},
        "service": {"port": 9898},
        "router": {"appMesh": {"mesh": "global"}},
        "steps": [20, 50, 100],
        "analysis": {
            "interval": "1m",
            "metrics": [
                {"name": "error-rate", "provider": {"prometheus": {"address": "http://p:9090"}},
                 "preset": "appmesh-error-rate", "max": 1.0},
                {"name": "custom", "provider": {"cloudWatch": {"region": "us-east-1"}},
                 "max": 1.0, "metricDataQueries": [{
                    "id": "m1", "returnData": true,
                    "metricStat": {"period": 60, "stat": "Sum", "metric": {
                        "namespace": "ns", "metricName": "requests",
                        "dimensions": [{"name": "app", "value": "{{ target }}"}]}}}]}
            ]
        }
    })
}

/// A time from arbitrary milliseconds, anywhere chrono can represent.
pub fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Everything reconcile derives from a spec before I/O: validation, the next check time
/// at several points of a rollout, and each metric's rendered queries, PromQL freshness
/// query and CloudWatch plan. None of it may panic, however absurd the spec.
pub fn derive_everything(spec: &CanarySpec, now: DateTime<Utc>) {
    let problems = serin::api::validate(spec);
    for p in &problems {
        let _ = p.to_string();
    }
    for phase in [Phase::Progressing, Phase::Paused] {
        for last_check in [None, Some(now)] {
            let status = CanaryStatus {
                phase,
                step_started_at: Some(now),
                last_check: last_check.map(|time| CheckRecord {
                    time,
                    verdict: Verdict::Pass,
                    results: vec![],
                }),
                ..Default::default()
            };
            let _ = serin::rollout::next_check_at(spec, &status);
        }
    }
    let mut canary = Canary::new("podinfo", spec.clone());
    canary.metadata.namespace = Some("test".into());
    let Ok(arms) = serin::router::data_plane_arms(&canary) else {
        return;
    };
    let ctx = CanaryContext::of(&canary, arms);
    for metric in &spec.analysis.metrics {
        let window = ctx.window(metric);
        let vars = Vars::new(&ctx, window);
        if let Some(q) = &metric.query
            && let Ok(rendered) = vars.render(q)
        {
            let _ = freshness_query(&rendered);
        }
        for align in [Duration::from_secs(60), Duration::ZERO, Duration::MAX] {
            if let Ok(plan) = plan_queries(&ctx, metric, now, align) {
                let _ = plan.sdk_queries("c0_");
            }
        }
    }
}
