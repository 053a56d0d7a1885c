//! The Prometheus provider against a real Prometheus filled with known history, plus
//! servers that refuse, hang or check headers.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serin::analysis::Outcome;
use serin::api::CanarySpec;
use serin::metrics::{Evaluator, EvaluatorConfig, MetricError, MetricEvaluation, StaticSecrets};
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

struct Fixture {
    prometheus: TestPrometheus,
    /// Evaluation time: inside the history, between two samples.
    at: DateTime<Utc>,
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
        let prometheus = TestPrometheus::start(&h.render(base, base + 1800, 10));
        let at = Utc.timestamp_opt(base + 1200 + 5, 0).unwrap();
        Fixture { prometheus, at }
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
    assert_eq!(e.queries.len(), 4);
    assert!(
        e.queries[3].contains("cds_egress_.+_podinfo-canary_test_"),
        "{:?}",
        e.queries
    );
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
            r#"sum(rate(envoy_cluster_upstream_rq{envoy_cluster_name=~"cds_egress_.+_podinfo-canary_test_http_.+"}[1m]))"#
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
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let record = record.clone();
        async move {
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
                    r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.5"]}]}}"#,
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

/// Each query counts in serin_provider_requests_total, exposed through a registry.
#[tokio::test]
async fn requests_are_counted() {
    let f = fixture();
    let evaluator =
        Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default()).unwrap();
    let ctx = support::canary_context(
        "test",
        "podinfo",
        spec(
            appmesh(),
            &metric(&f.prometheus.url, "preset: appmesh-error-rate", ""),
        ),
    );
    evaluator.evaluate(&ctx, f.at).await;
    let mut registry = prometheus_client::registry::Registry::default();
    evaluator.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(
            r#"serin_provider_requests_total{provider="prometheus",outcome="success"} 4"#
        ),
        "{text}"
    );
}
