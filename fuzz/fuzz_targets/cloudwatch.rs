//! The CloudWatch query builder: arbitrary GetMetricData queries (ids, metric math,
//! dimensions with templates, periods), windows, evaluation times and alignments through
//! `plan_queries`, and the id rewriting of batched calls.
#![no_main]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use serin::api::{Canary, CanarySpec, MetricSpec};
use serin::metrics::{CanaryContext, plan_queries, prefix_ids};

#[derive(Arbitrary, Debug)]
struct Query<'a> {
    id: &'a str,
    expression: Option<&'a str>,
    stat: Option<Stat<'a>>,
    label: Option<&'a str>,
    return_data: Option<bool>,
    period: Option<i32>,
}

#[derive(Arbitrary, Debug)]
struct Stat<'a> {
    namespace: &'a str,
    metric_name: &'a str,
    dimensions: Vec<(&'a str, &'a str)>,
    period: i32,
    stat: &'a str,
    unit: Option<&'a str>,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    queries: Vec<Query<'a>>,
    /// Use the CloudWatch preset instead of the queries.
    preset: Option<bool>,
    window_ms: u64,
    now_ms: i64,
    align_ms: u64,
    prefix: &'a str,
    expression: &'a str,
}

fn query(q: &Query<'_>) -> Value {
    let mut v = json!({"id": q.id});
    if let Some(e) = q.expression {
        v["expression"] = e.into();
    }
    if let Some(s) = &q.stat {
        v["metricStat"] = json!({
            "metric": {
                "namespace": s.namespace,
                "metricName": s.metric_name,
                "dimensions": s.dimensions.iter()
                    .map(|(n, v)| json!({"name": n, "value": v}))
                    .collect::<Vec<_>>(),
            },
            "period": s.period,
            "stat": s.stat,
        });
        if let Some(u) = s.unit {
            v["metricStat"]["unit"] = u.into();
        }
    }
    if let Some(l) = q.label {
        v["label"] = l.into();
    }
    if let Some(r) = q.return_data {
        v["returnData"] = r.into();
    }
    if let Some(p) = q.period {
        v["period"] = p.into();
    }
    v
}

fuzz_target!(|input: Input<'_>| {
    let ids: HashSet<&str> = input.queries.iter().map(|q| q.id).collect();
    let rewritten = prefix_ids(input.expression, &ids, input.prefix);
    assert!(rewritten.len() >= input.expression.len());

    let Ok(spec) = serde_json::from_value::<CanarySpec>(common::base_spec()) else {
        return;
    };
    let mut metric = json!({
        "name": "m", "provider": {"cloudWatch": {"region": "us-east-1"}}, "max": 1.0,
    });
    match input.preset {
        Some(true) => metric["preset"] = "cloudwatch-appmesh-error-rate".into(),
        Some(false) => metric["preset"] = "cloudwatch-appmesh-latency-p99".into(),
        None => {
            metric["metricDataQueries"] = input.queries.iter().map(query).collect::<Vec<_>>().into()
        }
    }
    let Ok(mut metric) = serde_json::from_value::<MetricSpec>(metric) else {
        return;
    };
    metric.window = Some(Duration::from_millis(input.window_ms).into());
    let mut canary = Canary::new("podinfo", spec);
    canary.metadata.namespace = Some("test".into());
    let Ok(arms) = serin::router::data_plane_arms(&canary) else {
        return;
    };
    let ctx = CanaryContext::of(&canary, arms);
    let now = common::time(input.now_ms);
    let align = Duration::from_millis(input.align_ms);
    if let Ok(plan) = plan_queries(&ctx, &metric, now, align) {
        assert!(plan.start <= plan.end, "{plan:?}");
        assert!(plan.end <= now, "{plan:?}");
        assert_eq!(plan.shown.len(), plan.queries.len());
        let sent = plan.sdk_queries(input.prefix);
        assert_eq!(sent.len(), plan.queries.len());
        for (q, s) in plan.queries.iter().zip(&sent) {
            assert_eq!(s.id(), Some(format!("{}{}", input.prefix, q.id).as_str()));
        }
    }
});
