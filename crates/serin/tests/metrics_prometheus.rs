//! The Prometheus provider against a real Prometheus filled with known history, plus
//! servers that refuse, hang or check headers.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serin::analysis::{MetricObservation, Outcome};
use serin::api::{CanarySpec, CanaryStatus, MetricResult, Phase, Verdict};
use serin::metrics::{
    Evaluator, EvaluatorConfig, MetricError, MetricEvaluation, PrometheusOptions, StaticSecrets,
};
use serin::rollout::{self, Input, Observations, WorkloadState};
use support::prometheus::{History, TestPrometheus};

/// Canary request rates (per second) written into the history.
const CANARY_OK: f64 = 9.5;
const CANARY_5XX: f64 = 0.5;
const PRIMARY_OK: f64 = 19.8;
const PRIMARY_5XX: f64 = 0.2;
/// Cumulative histogram bucket rates of the canary's upstream request time (ms).
const BUCKETS: [(&str, f64); 9] = [
    ("5", 1.0),
    ("10", 3.0),
    ("25", 6.0),
    ("50", 8.0),
    ("100", 9.0),
    ("250", 9.8),
    ("500", 9.95),
    ("1000", 10.0),
    ("+Inf", 10.0),
];

/// The `stale` canary's series have no samples after base + this many seconds.
const STALE_AFTER: i64 = 1025;

struct Fixture {
    prometheus: TestPrometheus,
    /// Evaluation time: inside the history, between two samples.
    at: DateTime<Utc>,
    /// The first sample's time (Unix seconds); samples every 10 s.
    base: i64,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let now = Utc::now().timestamp();
        let base = (now - 2 * 3600) / 60 * 60;
        let mut h = History::default();
        let am = |arm: &str| format!("cds_egress_global_{arm}_test_http_9898");
        for (arm, ok, bad) in [("podinfo-canary", CANARY_OK, CANARY_5XX), ("podinfo-primary", PRIMARY_OK, PRIMARY_5XX)] {
            h.counter(
                "envoy_cluster_upstream_rq",
                &format!(r#"envoy_cluster_name="{}",envoy_response_code="200""#, am(arm)),
                ok,
            );
            h.counter(
                "envoy_cluster_upstream_rq",
                &format!(r#"envoy_cluster_name="{}",envoy_response_code="503""#, am(arm)),
                bad,
            );
        }
        // Gloo: canary 2% errors; Gateway API (Contour names): no 5xx series at all.
        h.counter("envoy_cluster_upstream_rq", r#"envoy_cluster_name="test-podinfo-canary-9898_gloo-system",envoy_response_code="200""#, 4.9);
        h.counter("envoy_cluster_upstream_rq", r#"envoy_cluster_name="test-podinfo-canary-9898_gloo-system",envoy_response_code="500""#, 0.1);
        h.counter("envoy_cluster_upstream_rq", r#"envoy_cluster_name="test-podinfo-primary-9898_gloo-system",envoy_response_code="200""#, 5.0);
        h.counter("envoy_cluster_upstream_rq", r#"envoy_cluster_name="test/podinfo-canary/9898/da39a3ee5e",envoy_response_code="200""#, 3.0);
        h.counter("envoy_cluster_upstream_rq", r#"envoy_cluster_name="test/podinfo-primary/9898/da39a3ee5e",envoy_response_code="200""#, 3.0);
        for (le, rate) in BUCKETS {
            h.counter(
                "envoy_cluster_upstream_rq_time_bucket",
                &format!(r#"envoy_cluster_name="{}",le="{le}""#, am("podinfo-canary")),
                rate,
            );
        }
        h.counter(
            "envoy_cluster_upstream_rq_time_count",
            &format!(r#"envoy_cluster_name="{}""#, am("podinfo-canary")),
            10.0,
        );
        // Canary `multi`: each arm has two clusters (two listeners), whose counts and
        // latency buckets a check sums before it judges.
        for (arm, listener, ok, bad) in [
            ("multi-canary", "http_9898", 4.0, 1.0),
            ("multi-canary", "grpc_9090", 6.0, 0.0),
            ("multi-primary", "http_9898", 10.0, 0.1),
            ("multi-primary", "grpc_9090", 10.0, 0.3),
        ] {
            let cluster = format!("cds_egress_global_{arm}_test_{listener}");
            for (code, rate) in [("200", ok), ("503", bad)] {
                h.counter(
                    "envoy_cluster_upstream_rq",
                    &format!(r#"envoy_cluster_name="{cluster}",envoy_response_code="{code}""#),
                    rate,
                );
            }
            if arm == "multi-canary" {
                // The gRPC listener answers every request within 5 ms: the p99 of the sum
                // is neither listener's own.
                let fast = listener == "grpc_9090";
                for (le, rate) in BUCKETS {
                    h.counter(
                        "envoy_cluster_upstream_rq_time_bucket",
                        &format!(r#"envoy_cluster_name="{cluster}",le="{le}""#),
                        if fast { 2.0 } else { rate },
                    );
                }
                h.counter(
                    "envoy_cluster_upstream_rq_time_count",
                    &format!(r#"envoy_cluster_name="{cluster}""#),
                    if fast { 2.0 } else { 10.0 },
                );
            }
        }
        // Canary `stale` (arms stale-primary and stale-canary): its series stopped being
        // scraped three minutes before the evaluation time; the last sample is at
        // base + 1020.
        for arm in ["stale-canary", "stale-primary"] {
            h.counter(
                "envoy_cluster_upstream_rq",
                &format!(r#"envoy_cluster_name="{}",envoy_response_code="200""#, am(arm)),
                10.0,
            );
        }
        let history: String = h
            .render(base, base + 1800, 10)
            .lines()
            .filter(|line| {
                !line.contains("_stale-")
                    || line
                        .rsplit(' ')
                        .next()
                        .and_then(|t| t.parse::<i64>().ok())
                        .is_some_and(|t| t <= base + STALE_AFTER)
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let prometheus = TestPrometheus::start(&history);
        let at = Utc.timestamp_opt(base + 1200 + 5, 0).unwrap();
        Fixture {
            prometheus,
            at,
            base,
        }
    })
}

fn spec(router: &str, metric: &str) -> CanarySpec {
    serde_norway::from_str(&format!(
        "targetRef: {{apiVersion: apps/v1, kind: Deployment, name: podinfo}}\n\
         service: {{port: 9898}}\n\
         router: {router}\n\
         analysis:\n  interval: 1m\n  metrics:\n{metric}"
    ))
    .expect("test Canary parses")
}

fn metric(address: &str, source: &str, extra: &str) -> String {
    format!(
        "    - name: m\n      provider: {{prometheus: {{address: \"{address}\"{extra}}}}}\n      {source}\n      max: 1000\n"
    )
}

async fn evaluate(spec: CanarySpec, at: DateTime<Utc>) -> MetricEvaluation {
    let evaluator =
        Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default()).unwrap();
    let ctx = support::canary_context("test", "podinfo", spec);
    evaluator.evaluate_detailed(&ctx, at).await.remove(0)
}

fn appmesh() -> &'static str {
    "{appMesh: {mesh: global}}"
}

/// The App Mesh error-rate preset gives the canary's 5xx percent and both arms' counts.
#[tokio::test]
async fn appmesh_error_rate_with_evidence() {
    let f = fixture();
    let e = evaluate(
        spec(
            appmesh(),
            &metric(&f.prometheus.url, "preset: appmesh-error-rate", ""),
        ),
        f.at,
    )
    .await;
    let s = e.result.expect("a sample");
    let expected = 100.0 * CANARY_5XX / (CANARY_OK + CANARY_5XX);
    assert!(
        (s.value - expected).abs() < 1e-9,
        "{} != {expected}",
        s.value
    );
    assert_eq!(s.sample_size, Some(600));
    let ev = s.evidence.expect("evidence");
    assert!((ev.canary.requests - 600.0).abs() < 1e-6);
    assert!((ev.canary.errors - 30.0).abs() < 1e-6);
    assert!((ev.primary.requests - 1200.0).abs() < 1e-6);
    assert!((ev.primary.errors - 12.0).abs() < 1e-6);
    assert_eq!(e.queries.len(), 5, "four counts and the freshness query");
    assert!(
        e.queries[3].contains("cds_egress_.+_podinfo-canary_test_"),
        "{:?}",
        e.queries
    );
    assert!(
        e.queries[4].starts_with("max(timestamp(envoy_cluster_upstream_rq{")
            && e.queries[4].contains("_podinfo-canary_test_"),
        "{:?}",
        e.queries
    );
    // The newest sample (at - 5 s) stands until the next scrape, after `at`.
    assert_eq!(s.timestamp, f.at);
}

/// histogram_quantile's linear interpolation, computed by hand from the bucket rates.
fn expected_p99() -> f64 {
    let total = BUCKETS[BUCKETS.len() - 1].1;
    let rank = 0.99 * total;
    let mut prev = (0.0, 0.0);
    for (le, cum) in BUCKETS {
        let upper: f64 = le.parse().unwrap_or(f64::INFINITY);
        if cum >= rank {
            return prev.0 + (upper - prev.0) * (rank - prev.1) / (cum - prev.1);
        }
        prev = (upper, cum);
    }
    unreachable!()
}

/// The App Mesh p99 preset matches histogram_quantile computed by hand (≈416.7 ms).
#[tokio::test]
async fn appmesh_latency_p99() {
    let f = fixture();
    let e = evaluate(
        spec(
            appmesh(),
            &metric(&f.prometheus.url, "preset: appmesh-latency-p99", ""),
        ),
        f.at,
    )
    .await;
    let s = e.result.expect("a sample");
    assert!(
        (s.value - expected_p99()).abs() < 1e-6,
        "{} vs {}",
        s.value,
        expected_p99()
    );
    assert_eq!(s.sample_size, Some(600));
}

/// The Gloo preset finds discovery-named upstream clusters; Gateway API finds Contour names
/// and counts a missing 5xx series as zero errors.
#[tokio::test]
async fn gloo_and_gateway_presets() {
    let f = fixture();
    let gloo = "{gloo: {upstreamGroup: {name: ug}}}";
    let e = evaluate(
        spec(
            gloo,
            &metric(&f.prometheus.url, "preset: gloo-error-rate", ""),
        ),
        f.at,
    )
    .await;
    let s = e.result.expect("gloo sample");
    assert!((s.value - 2.0).abs() < 1e-9, "{}", s.value);
    assert!((s.evidence.unwrap().primary.requests - 300.0).abs() < 1e-6);
    let gw = "{gatewayApi: {httpRoute: {name: podinfo}}}";
    let e = evaluate(
        spec(
            gw,
            &metric(&f.prometheus.url, "preset: gateway-error-rate", ""),
        ),
        f.at,
    )
    .await;
    let s = e.result.expect("gateway sample");
    assert_eq!(s.value, 0.0);
    assert_eq!(s.sample_size, Some(180));
}

/// A user query with templates renders and returns its single value.
#[tokio::test]
async fn user_query_renders_templates() {
    let f = fixture();
    let q = r#"query: 'sum(rate(envoy_cluster_upstream_rq{envoy_cluster_name=~"cds_egress_.+_{{ canary }}_{{ namespace }}_http_.+"}[{{ interval }}]))'"#;
    let e = evaluate(spec(appmesh(), &metric(&f.prometheus.url, q, "")), f.at).await;
    assert_eq!(
        e.queries,
        vec![
            r#"sum(rate(envoy_cluster_upstream_rq{envoy_cluster_name=~"cds_egress_.+_podinfo-canary_test_http_.+"}[1m]))"#,
            r#"max(timestamp(envoy_cluster_upstream_rq{envoy_cluster_name=~"cds_egress_.+_podinfo-canary_test_http_.+"}))"#,
        ]
    );
    assert!((e.result.expect("a sample").value - 10.0).abs() < 1e-9);
}

/// Empty results, NaN, several series and a range vector are never a value, and say why.
#[tokio::test]
async fn unusable_results() {
    let f = fixture();
    let cases = [
        (
            r#"query: 'sum(envoy_cluster_upstream_rq{envoy_cluster_name="nothing"})'"#,
            "no-data",
            "no series matched",
        ),
        ("query: 'vector(0) / vector(0)'", "nan", "NaN"),
        (
            "query: 'envoy_cluster_upstream_rq'",
            "multiple-series",
            "sum(...)",
        ),
        (
            "query: 'envoy_cluster_upstream_rq[1m]'",
            "bad-query",
            "range vector",
        ),
    ];
    for (source, category, hint) in cases {
        let e = evaluate(
            spec(appmesh(), &metric(&f.prometheus.url, source, "")),
            f.at,
        )
        .await;
        let err = e.result.clone().expect_err(source);
        assert_eq!(err.category(), category, "{source}: {err}");
        assert!(err.to_string().contains(hint), "{source}: {err}");
        assert!(!matches!(e.outcome(), Outcome::Value { .. }), "{source}");
    }
    // No canary traffic at all is no data, not 0% errors.
    let mut s = spec(
        appmesh(),
        &metric(&f.prometheus.url, "preset: appmesh-error-rate", ""),
    );
    s.target_ref.as_mut().unwrap().name = "ghost".into();
    let e = evaluate(s, f.at).await;
    assert!(
        matches!(e.result, Err(MetricError::NoData(_))),
        "{:?}",
        e.result
    );
}

/// Invalid PromQL is a bad query whose message quotes Prometheus's parser.
#[tokio::test]
async fn invalid_promql_quotes_prometheus() {
    let f = fixture();
    let e = evaluate(
        spec(
            appmesh(),
            &metric(&f.prometheus.url, "query: 'sum(rate(x[1m])'", ""),
        ),
        f.at,
    )
    .await;
    let err = e.result.expect_err("parse error");
    assert_eq!(err.category(), "bad-query");
    assert!(err.to_string().contains("parse error"), "{err}");
}

/// A refused connection is `unreachable`; a server that never answers is a `timeout` within
/// the configured timeout.
#[tokio::test]
async fn refused_and_hanging_servers() {
    let port = support::free_port();
    let e = evaluate(
        spec(
            appmesh(),
            &metric(&format!("http://127.0.0.1:{port}"), "query: up", ""),
        ),
        Utc::now(),
    )
    .await;
    assert_eq!(e.result.expect_err("refused").category(), "unreachable");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            keep.lock().unwrap().push(socket);
        }
    });
    let started = std::time::Instant::now();
    let e = evaluate(
        spec(
            appmesh(),
            &metric(&format!("http://{addr}"), "query: up", ", timeout: 1s"),
        ),
        Utc::now(),
    )
    .await;
    assert_eq!(e.result.expect_err("hang").category(), "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Bearer tokens from the Secret and custom headers reach the server; a 401 is `auth`.
#[tokio::test]
async fn credentials_and_headers() {
    let seen: Arc<Mutex<Vec<HashMap<String, String>>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
        let record = record.clone();
        async move {
            // The value query, and the freshness (range) query sent with it.
            let body = if uri.path().ends_with("query_range") {
                r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1699999990,"1699999990"],[1700000000,"1700000000"]]}]}}"#
            } else {
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.5"]}]}}"#
            };
            let h: HashMap<String, String> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let authorized = h.get("authorization").map(String::as_str) == Some("Bearer s3cret");
            record.lock().unwrap().push(h);
            if authorized {
                (
                    axum::http::StatusCode::OK,
                    [("content-type", "application/json")],
                    body,
                )
            } else {
                (axum::http::StatusCode::UNAUTHORIZED, [("content-type", "text/plain")], "unauthorized")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let extra = ", secretRef: {name: prom}, headers: [{name: X-Scope-OrgID, value: team-a}]";
    let s = spec(
        appmesh(),
        &metric(&format!("http://{addr}"), "query: up", extra),
    );
    let ctx = support::canary_context("test", "podinfo", s.clone());
    let secrets = StaticSecrets::none().with("test", "prom", [("token", "s3cret\n")]);
    let evaluator = Evaluator::new(Arc::new(secrets), EvaluatorConfig::default()).unwrap();
    let e = evaluator
        .evaluate_detailed(&ctx, Utc::now())
        .await
        .remove(0);
    assert_eq!(e.result.expect("authorized").value, 0.5);
    let h = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(h.get("x-scope-orgid").map(String::as_str), Some("team-a"));

    let wrong = StaticSecrets::none().with("test", "prom", [("token", "nope")]);
    let evaluator = Evaluator::new(Arc::new(wrong), EvaluatorConfig::default()).unwrap();
    let e = evaluator
        .evaluate_detailed(&ctx, Utc::now())
        .await
        .remove(0);
    assert_eq!(e.result.expect_err("401").category(), "auth");
    let missing =
        Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default()).unwrap();
    let e = missing.evaluate_detailed(&ctx, Utc::now()).await.remove(0);
    assert_eq!(e.result.expect_err("no secret").category(), "auth");
}

/// An unknown template variable that slipped past validation fails cleanly, sending nothing.
#[tokio::test]
async fn unknown_template_variable() {
    let e = evaluate(
        spec(
            appmesh(),
            &metric("http://127.0.0.1:9", "query: 'up{x=\"{{ nope }}\"}'", ""),
        ),
        Utc::now(),
    )
    .await;
    let err = e.result.expect_err("template");
    assert_eq!(err.category(), "template");
    assert!(err.to_string().contains("{{ nope }}"), "{err}");
    assert!(e.queries.is_empty());
}

/// The request counter `serin_provider_requests_total` of an evaluator, as exposed.
fn requests_counted(evaluator: &Evaluator) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    evaluator.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// An evaluator that sends every check's queries alone (no batching).
fn unbatched() -> Evaluator {
    let config = EvaluatorConfig {
        prometheus: PrometheusOptions {
            linger: Duration::ZERO,
            ..Default::default()
        },
        ..Default::default()
    };
    Evaluator::new(Arc::new(StaticSecrets::none()), config).unwrap()
}

/// Each query counts in serin_provider_requests_total, exposed through a registry: a
/// preset check alone sends its four counts and the freshness query, or, batched (the
/// default), the two counts by cluster and the freshness query.
#[tokio::test]
async fn requests_are_counted() {
    let f = fixture();
    let ctx = support::canary_context(
        "test",
        "podinfo",
        spec(
            appmesh(),
            &metric(
                &f.prometheus.url,
                "preset: appmesh-error-rate\n      judge: Threshold",
                "",
            ),
        ),
    );
    let alone = unbatched();
    alone.evaluate(&ctx, f.at).await;
    let text = requests_counted(&alone);
    assert!(
        text.contains(
            r#"serin_provider_requests_total{provider="prometheus",outcome="success"} 5"#
        ),
        "{text}"
    );
    let batched =
        Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default()).unwrap();
    batched.evaluate(&ctx, f.at).await;
    let text = requests_counted(&batched);
    assert!(
        text.contains(
            r#"serin_provider_requests_total{provider="prometheus",outcome="success"} 3"#
        ),
        "{text}"
    );
}

/// Preset checks of many Canaries due together go out as one batch per preset kind (three
/// requests each), and every Canary gets exactly what its own queries answer alone:
/// values, evidence, sample sizes, timestamps and the no-data messages of Canaries
/// without series. Arms of different data planes share the batch.
#[tokio::test]
async fn checks_of_many_canaries_share_queries_and_answer_as_alone() {
    let f = fixture();
    let threshold = |preset: &str| format!("preset: {preset}\n      judge: Threshold");
    let canaries: Vec<(&str, String)> = vec![
        ("podinfo", appmesh().to_string()),
        ("stale", appmesh().to_string()),
        ("multi", appmesh().to_string()),
        ("absent", appmesh().to_string()),
        ("podinfo", "{gloo: {upstreamGroup: {name: ug}}}".to_string()),
        (
            "podinfo",
            "{gatewayApi: {httpRoute: {name: podinfo}}}".to_string(),
        ),
    ];
    let mut contexts = Vec::new();
    for (target, router) in &canaries {
        let preset = match router.split(':').next() {
            Some("{gloo") => "gloo",
            Some("{gatewayApi") => "gateway",
            _ => "appmesh",
        };
        for kind in ["error-rate", "latency-p99"] {
            let mut s = spec(
                router,
                &metric(
                    &f.prometheus.url,
                    &threshold(&format!("{preset}-{kind}")),
                    "",
                ),
            );
            s.target_ref.as_mut().unwrap().name = (*target).into();
            contexts.push(support::canary_context("test", target, s));
        }
    }
    let alone = unbatched();
    let mut expected = Vec::new();
    for ctx in &contexts {
        expected.push(alone.evaluate_detailed(ctx, f.at).await.remove(0));
    }
    let batched =
        Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default()).unwrap();
    let got = futures::future::join_all(
        contexts
            .iter()
            .map(|ctx| batched.evaluate_detailed(ctx, f.at)),
    )
    .await;
    let mut passed = 0;
    for ((ctx, want), mut got) in contexts.iter().zip(&expected).zip(got) {
        let got = got.remove(0);
        let what = format!("{} {:?}", ctx.name, ctx.data_plane);
        assert_eq!(got.queries, want.queries, "{what}");
        match (&got.result, &want.result) {
            (Ok(g), Ok(w)) => {
                passed += 1;
                assert!((g.value - w.value).abs() < 1e-9, "{what}: {g:?} vs {w:?}");
                assert_eq!(g.timestamp, w.timestamp, "{what}");
                assert_eq!(g.sample_size, w.sample_size, "{what}");
                let (ge, we) = (g.evidence.as_ref(), w.evidence.as_ref());
                assert_eq!(ge.is_some(), we.is_some(), "{what}");
                if let (Some(ge), Some(we)) = (ge, we) {
                    for (a, b) in [
                        (ge.primary.requests, we.primary.requests),
                        (ge.primary.errors, we.primary.errors),
                        (ge.canary.requests, we.canary.requests),
                        (ge.canary.errors, we.canary.errors),
                    ] {
                        assert!((a - b).abs() < 1e-9, "{what}: {ge:?} vs {we:?}");
                    }
                }
            }
            (g, w) => assert_eq!(g, w, "{what}"),
        }
    }
    // podinfo's and multi's App Mesh error rates and p99s, and the Gloo and Gateway API
    // error rates.
    assert_eq!(passed, 6, "{expected:?}");
    let text = requests_counted(&batched);
    assert!(
        text.contains(
            r#"serin_provider_requests_total{provider="prometheus",outcome="success"} 6"#
        ),
        "two batches of three requests: {text}"
    );
}

/// Drives `rollout::decide` as the controller does: a rollout starts one interval before
/// `now`, and its first check, due at `now`, sees `observation`. Returns that check's
/// result for the metric.
fn first_check(
    spec: &CanarySpec,
    observation: MetricObservation,
    now: DateTime<Utc>,
) -> MetricResult {
    let interval = chrono::Duration::from_std(spec.analysis.interval.into()).unwrap();
    let mut observations = Observations {
        canary: WorkloadState {
            revision: Some("rev2".into()),
            ready: true,
        },
        primary: WorkloadState {
            revision: Some("rev1".into()),
            ready: true,
        },
        metrics: vec![],
        command: None,
        weights: None,
        looks: None,
        evidence: None,
        hooks: vec![],
    };
    let waiting = CanaryStatus {
        phase: Phase::Waiting,
        revision: Some("rev1".into()),
        stable_revision: Some("rev1".into()),
        ..Default::default()
    };
    let started = rollout::decide(Input {
        spec,
        generation: Some(1),
        status: &waiting,
        problems: &[],
        observations: &observations,
        now: now - interval,
    });
    assert_eq!(
        started.status.phase,
        Phase::Progressing,
        "{:?}",
        started.status
    );
    assert_eq!(
        rollout::next_check_at(spec, &started.status),
        Some(now),
        "the first check is due at `now`"
    );
    observations.metrics = vec![observation];
    let checked = rollout::decide(Input {
        spec,
        generation: Some(1),
        status: &started.status,
        problems: &[],
        observations: &observations,
        now,
    });
    let check = checked.status.last_check.expect("a check at its due time");
    check
        .results
        .into_iter()
        .next()
        .expect("the metric's result")
}

/// A canary whose series stopped being scraped three minutes ago still has a value over a
/// 5-minute window (Prometheus stamps it with the evaluation time), but the observation is
/// stamped where its data ends (the last sample plus the 10 s scrape interval), so the
/// check due now judges it stale, never a pass. The same check on live series passes.
#[tokio::test]
async fn a_series_that_stopped_is_stamped_with_its_last_sample_and_judged_stale() {
    let f = fixture();
    let five_minutes = |target: &str| {
        // The threshold judge: its instant queries are the ones stamped with their data.
        let mut s = spec(
            appmesh(),
            &metric(
                &f.prometheus.url,
                "preset: appmesh-error-rate\n      judge: Threshold",
                "",
            ),
        );
        s.target_ref.as_mut().unwrap().name = target.into();
        s.analysis.interval = std::time::Duration::from_secs(300).into();
        s
    };
    let stale = five_minutes("stale");
    let e = evaluate(stale.clone(), f.at).await;
    let sample = e
        .result
        .clone()
        .expect("a value from the old samples in the window");
    assert_eq!(sample.value, 0.0);
    let last_sample = Utc.timestamp_opt(f.base + 1020, 0).unwrap();
    let ends = last_sample + chrono::Duration::seconds(10);
    assert_eq!(sample.timestamp, ends, "evaluated at {}", f.at);
    let observation = e.observation();
    assert_eq!(observation.at, ends);
    let result = first_check(&stale, observation, f.at);
    assert_eq!(result.verdict, Verdict::Inconclusive, "{result:?}");
    assert!(
        result.message.starts_with("stale: measured at"),
        "{result:?}"
    );

    let live = five_minutes("podinfo");
    let e = evaluate(live.clone(), f.at).await;
    assert_eq!(e.result.as_ref().expect("a value").timestamp, f.at);
    let result = first_check(&live, e.observation(), f.at);
    assert_eq!(result.verdict, Verdict::Pass, "{result:?}");
}

/// The freshness query Serin derives from each shape of user query is valid PromQL to a
/// real Prometheus, and the value comes back stamped where the live series' data ends.
#[tokio::test]
async fn freshness_queries_of_user_queries_are_valid_promql() {
    let f = fixture();
    let rq = r#"envoy_cluster_upstream_rq{envoy_cluster_name=~"cds_egress_.+_podinfo-canary_test_http_.+"}"#;
    let queries = [
        format!("sum(rate({rq}[{{{{ interval }}}}]))"),
        format!(r#"sum(rate({rq}[1m])) / sum(rate({{__name__="envoy_cluster_upstream_rq"}}[1m]))"#),
        format!(
            "sum(sum by (envoy_response_code) (rate({rq}[1m])) * on (envoy_response_code) group_left sum by (envoy_response_code) (rate({rq}[1m] offset 1m)) > bool 0)"
        ),
        format!("max_over_time(sum(rate({rq}[1m]))[5m:30s])"),
        format!("count(count_values(\"v\", {rq} @ {}))", f.at.timestamp()),
        format!("scalar(sum(rate({rq}[1m])))"),
        format!("sum(rate({rq}[1m])) or vector(0)"),
    ];
    for q in queries {
        let source = format!("query: '{}'", q.replace('\'', "''"));
        let e = evaluate(
            spec(appmesh(), &metric(&f.prometheus.url, &source, "")),
            f.at,
        )
        .await;
        assert_eq!(e.queries.len(), 2, "{:?}", e.queries);
        let s = e
            .result
            .unwrap_or_else(|err| panic!("{q}: {err}; sent {:?}", e.queries));
        assert!(s.timestamp <= f.at, "{q}: {}", s.timestamp);
        assert!(
            s.timestamp > f.at - chrono::Duration::seconds(10),
            "{q}: {}",
            s.timestamp
        );
    }
    // A query that reads no series is as fresh as its evaluation.
    let e = evaluate(
        spec(
            appmesh(),
            &metric(&f.prometheus.url, "query: 'vector(3)'", ""),
        ),
        f.at,
    )
    .await;
    assert_eq!(e.queries.len(), 1);
    assert_eq!(e.result.expect("a value").timestamp, f.at);
}

/// The sequential judge's looks of many Canaries due together go out as one range query
/// per counter and preset kind, whatever the grids' offsets, and every Canary gets exactly
/// the looks its own range queries give; a long grid (a Canary catching up) is fetched
/// alone.
#[tokio::test]
async fn looks_of_many_canaries_share_range_queries_and_answer_as_alone() {
    let f = fixture();
    let sequential = |preset: &str| format!("preset: {preset}\n      judge: Sequential");
    let canaries = [
        ("podinfo", appmesh(), "appmesh", 63),
        ("multi", appmesh(), "appmesh", 57),
        ("absent", appmesh(), "appmesh", 60),
        ("stale", appmesh(), "appmesh", 41),
        ("podinfo", "{gloo: {upstreamGroup: {name: ug}}}", "gloo", 60),
        (
            "podinfo",
            "{gatewayApi: {httpRoute: {name: podinfo}}}",
            "gateway",
            35,
        ),
        // Twenty minutes behind: fetched alone.
        ("podinfo", appmesh(), "appmesh", 1200),
    ];
    let mut cases = Vec::new();
    for (target, router, preset, behind) in canaries {
        for kind in ["error-rate", "latency-p99"] {
            let mut s = spec(
                router,
                &metric(
                    &f.prometheus.url,
                    &sequential(&format!("{preset}-{kind}")),
                    "",
                ),
            );
            s.target_ref.as_mut().unwrap().name = target.into();
            let from = f.at - chrono::Duration::seconds(behind);
            cases.push((support::canary_context("test", target, s), from));
        }
    }
    let step = Duration::from_secs(10);
    let alone = unbatched();
    let mut expected = Vec::new();
    for (ctx, from) in &cases {
        expected.push(alone.looks(ctx, *from, step, f.at).await);
    }
    let batched =
        Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default()).unwrap();
    let got = futures::future::join_all(
        cases
            .iter()
            .map(|(ctx, from)| batched.looks(ctx, *from, step, f.at)),
    )
    .await;
    let mut with_looks = 0;
    for (((ctx, _), want), got) in cases.iter().zip(&expected).zip(&got) {
        assert_eq!(got, want, "{} {:?}", ctx.name, ctx.data_plane);
        with_looks += usize::from(got.metrics[0].result.as_ref().is_ok_and(|l| !l.is_empty()));
    }
    // The error rates of podinfo (twice), multi, stale (zero requests: its series stopped),
    // Gloo and Gateway API; no latency has looks, since the fixture has no primary
    // histogram, and the sequential latency judge compares both arms.
    assert_eq!(with_looks, 6);
    // Batched: one range query for the error rates, two (counts, buckets) for the
    // latencies; the long grids' own: two and four.
    let text = requests_counted(&batched);
    assert!(
        text.contains(
            r#"serin_provider_requests_total{provider="prometheus",outcome="success"} 9"#
        ),
        "{text}"
    );
}
