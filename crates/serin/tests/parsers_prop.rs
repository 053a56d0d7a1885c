//! Property tests of the parsers users feed Serin, in the ordinary test run (the fuzz
//! targets in `fuzz/` explore the same code for longer, see `scripts/fuzz`): the PromQL
//! scanner behind the freshness query against generated PromQL, query templating against
//! validation, and the CloudWatch query builder over any window, time and alignment.

use std::time::Duration;

use chrono::DateTime;
use proptest::prelude::*;
use serin::api::{Canary, CanarySpec, TEMPLATE_VARIABLES, check_manifests, template_variables};
use serin::metrics::template::Vars;
use serin::metrics::{CanaryContext, freshness_query, plan_queries, promql_selectors};

/// A generated PromQL expression and the selectors it reads, in order.
#[derive(Clone, Debug)]
struct Expr {
    text: String,
    selectors: Vec<String>,
}

fn metric_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z_][a-z0-9_]{0,8}", "[a-z]{1,4}:[a-z_]{1,6}:[a-z]{1,4}",]
        // PromQL keywords are not metric names.
        .prop_filter("not a keyword", |n| {
            ![
                "and",
                "or",
                "unless",
                "atan2",
                "bool",
                "offset",
                "inf",
                "nan",
                "sum",
                "avg",
                "count",
                "min",
                "max",
                "group",
                "stddev",
                "stdvar",
                "topk",
                "bottomk",
                "count_values",
                "quantile",
                "limitk",
                "limit_ratio",
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&n.as_str())
        })
}

fn matchers() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            "[a-z_]{1,6}",
            prop_oneof![Just("="), Just("!="), Just("=~"), Just("!~")],
            // Values may hold PromQL's own punctuation.
            r#"[a-z0-9 (){}\[\],.:_#-]{0,10}"#,
        ),
        0..3,
    )
    .prop_map(|ms| {
        let inner: Vec<String> = ms
            .into_iter()
            .map(|(l, op, v)| format!("{l}{op}\"{v}\""))
            .collect();
        if inner.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", inner.join(", "))
        }
    })
}

fn selector() -> impl Strategy<Value = Expr> {
    (
        metric_name(),
        matchers(),
        prop::option::of(prop_oneof![
            Just("[5m]"),
            Just("[1h30m]"),
            Just("[90s:15s]")
        ]),
        prop::option::of(prop_oneof![
            Just(" offset 1h"),
            Just(" offset -5m"),
            Just(" @ 1700000000"),
            Just(" @ end()")
        ]),
    )
        .prop_map(|(name, m, range, modifier)| {
            let modifier = modifier.unwrap_or("");
            Expr {
                text: format!("{name}{m}{}{modifier}", range.unwrap_or("")),
                selectors: vec![format!("{name}{m}{modifier}")],
            }
        })
}

fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        4 => selector(),
        1 => prop_oneof![Just("1"), Just("0.5"), Just("1e-3"), Just("Inf"), Just("time()")]
            .prop_map(|t| Expr { text: t.to_string(), selectors: vec![] }),
    ];
    leaf.prop_recursive(4, 16, 3, |inner| {
        prop_oneof![
            (
                prop_oneof![
                    Just("rate"),
                    Just("increase"),
                    Just("abs"),
                    Just("timestamp")
                ],
                inner.clone()
            )
                .prop_map(|(f, e)| Expr {
                    text: format!("{f}({})", e.text),
                    selectors: e.selectors,
                }),
            (
                prop_oneof![Just("sum"), Just("MAX"), Just("count")],
                prop::option::of(prop_oneof![
                    Just(" by (le, job)"),
                    Just(" without (instance)")
                ]),
                inner.clone()
            )
                .prop_map(|(a, by, e)| Expr {
                    text: format!("{a}{} ({})", by.unwrap_or(""), e.text),
                    selectors: e.selectors,
                }),
            (
                inner.clone(),
                prop_oneof![
                    Just(" / "),
                    Just(" and on (job) "),
                    Just(" * ignoring (x) group_left (team) "),
                    Just(" > bool "),
                    Just(" unless ")
                ],
                inner
            )
                .prop_map(|(l, op, r)| {
                    let mut selectors = l.selectors;
                    selectors.extend(r.selectors);
                    Expr {
                        text: format!("({}){op}({})", l.text, r.text),
                        selectors,
                    }
                }),
        ]
    })
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

fn spec() -> CanarySpec {
    serde_norway::from_str(
        r#"
targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
service: {port: 9898}
router: {appMesh: {mesh: global}}
analysis:
  interval: 1m
  metrics:
    - name: m
      provider: {cloudWatch: {region: us-east-1}}
      max: 1
      metricDataQueries:
        - id: m1
          returnData: false
          metricStat:
            period: 60
            stat: Sum
            metric: {namespace: ns, metricName: rq, dimensions: [{name: app, value: '{{ target }}'}]}
        - id: e1
          expression: m1 * 2
          returnData: true
"#,
    )
    .expect("the test spec parses")
}

fn context(spec: CanarySpec) -> CanaryContext {
    let mut canary = Canary::new("podinfo", spec.clone());
    canary.metadata.namespace = Some("test".into());
    let arms = serin::router::data_plane_arms(&canary).expect("arms");
    CanaryContext::new("test", "podinfo", spec, arms)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The scanner finds exactly the selectors of generated PromQL (with their offset and
    /// @ modifiers, without their ranges), and the freshness query is built from them.
    #[test]
    fn scanner_finds_the_selectors_of_generated_promql(e in expr()) {
        let expected = dedup(e.selectors.clone());
        prop_assert_eq!(promql_selectors(&e.text), expected.clone(), "{}", e.text);
        let fq = freshness_query(&e.text);
        prop_assert_eq!(fq.is_some(), !expected.is_empty());
        if let Some(fq) = fq {
            for s in &expected {
                let wrapped = format!("timestamp({s})");
                prop_assert!(fq.contains(&wrapped), "{}", fq);
            }
        }
    }

    /// Neither the scanner nor the freshness query panics on any text.
    #[test]
    fn scanner_never_panics(q in any::<String>(), p in r#"[a-z{}\[\]()"'`#@:=~!,.0-9 +-]{0,40}"#) {
        for q in [q, p] {
            let selectors = promql_selectors(&q);
            prop_assert_eq!(freshness_query(&q).is_some(), !selectors.is_empty());
        }
    }

    /// A template that validation accepts always renders; one it rejects never does.
    #[test]
    fn templates_render_as_validation_says(
        template in r"([a-z ]{0,3}(\{\{|\}\}|\{\{ ?(namespace|name|target|canary|nope|variables\.(a|b|c)) ?\}\}))*[a-z{} ]{0,3}",
        vars in prop::collection::btree_map("[a-c]", "[a-z{}]{0,4}", 0..3),
    ) {
        let mut spec = spec();
        spec.analysis.variables = vars.clone();
        let ctx = context(spec);
        let rendered = Vars::new(&ctx, Duration::from_secs(60)).render(&template);
        match template_variables(&template) {
            Ok(names) => {
                let known = names.iter().all(|n| {
                    TEMPLATE_VARIABLES.contains(&n.as_str())
                        || n.strip_prefix("variables.").is_some_and(|k| vars.contains_key(k))
                });
                prop_assert_eq!(known, rendered.is_ok(), "{:?}", rendered);
            }
            Err(_) => prop_assert!(rendered.is_err()),
        }
    }

    /// The CloudWatch builder gives a window that ends at or before the evaluation time and
    /// ids the batch can rewrite, or a clear failure, for any window, time and alignment.
    #[test]
    fn cloudwatch_plans_never_panic(
        window_ms in prop_oneof![0..200_000u64, any::<u64>()],
        now_ms in prop_oneof![-10_000_000_000_000i64..10_000_000_000_000, any::<i64>()],
        align_ms in prop_oneof![0..120_000u64, any::<u64>()],
    ) {
        let ctx = context(spec());
        let mut metric = ctx.spec.analysis.metrics[0].clone();
        metric.window = Some(Duration::from_millis(window_ms).into());
        let now = DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
        match plan_queries(&ctx, &metric, now, Duration::from_millis(align_ms)) {
            Ok(plan) => {
                prop_assert!(plan.start <= plan.end && plan.end <= now, "{:?}", plan);
                let sent = plan.sdk_queries("c7_");
                prop_assert_eq!(sent[1].expression(), Some("c7_m1 * 2"));
            }
            Err(m) => prop_assert!(m.result.is_err()),
        }
    }
}

/// `serin validate` on a duration kube-core cannot represent (a negative component, or
/// more seconds than fit) reports a problem instead of panicking. It panics today inside
/// kube-core 5's `Duration::from_str` (`std::time::Duration::mul_f64`), which the spec's
/// duration fields deserialize with; the fix belongs in `api/spec.rs` (a checked parser),
/// and the fuzz targets skip these inputs until it lands (`fuzz/fuzz_targets/common.rs`).
#[test]
fn absurd_durations_are_problems_not_panics() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/appmesh-workload.yaml"
    ))
    .expect("the example");
    for bad in ["1m-1s", "99999999999999999999h", "5124095576030431h1h"] {
        let text = example.replace("interval: 1m", &format!("interval: {bad}"));
        assert!(text.contains(bad));
        let report = check_manifests(&text);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.to_string().contains("spec.analysis.interval")),
            "{bad}: {:?}",
            report.problems
        );
    }
}
