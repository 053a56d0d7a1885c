//! The CloudWatch provider through the real AWS SDK, against moto's server behind the CBOR
//! translator in tests/support, and against injected faults.

mod support;

use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_cloudwatch::primitives::DateTime as AwsDateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum};
use chrono::{DateTime, TimeZone, Utc};
use serin::analysis::MetricObservation;
use serin::api::{CanarySpec, CanaryStatus, MetricResult, Phase, Verdict};
use serin::metrics::{
    CanaryContext, CloudWatch, CloudWatchOptions, Evaluator, MetricEvaluation, MetricProvider,
    Prometheus, PrometheusOptions, ProviderMetrics, StaticSecrets,
};
use serin::rollout::{self, Input, Observations, WorkloadState};
use support::cbor::{Injected, Translator};

const CW_SERVICE: &str = "GraniteServiceVersion20100801";
const NS: &str = "ContainerInsights/Prometheus";

fn credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new("AKIDTEST", "secret", None, None, "test"))
}

fn options() -> CloudWatchOptions {
    CloudWatchOptions {
        credentials: Some(credentials()),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(20),
        linger: Duration::from_millis(150),
        ..Default::default()
    }
}

fn evaluator(options: CloudWatchOptions) -> Evaluator {
    let metrics = ProviderMetrics::default();
    let prometheus = Prometheus::new(
        Arc::new(StaticSecrets::none()),
        PrometheusOptions::default(),
        metrics.clone(),
    )
    .unwrap();
    let cloudwatch: Arc<dyn MetricProvider> = Arc::new(CloudWatch::new(options, metrics.clone()));
    Evaluator::with_providers(vec![Arc::new(prometheus), cloudwatch], metrics)
}

/// The evaluation time: 20 s into the current minute, so the window is the last full minute.
fn now() -> DateTime<Utc> {
    let t = Utc::now().timestamp() / 60 * 60 + 20;
    Utc.timestamp_opt(t, 0).unwrap()
}

async fn sdk(endpoint: &str) -> aws_sdk_cloudwatch::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(credentials())
        // The translator does not gunzip; PutMetricData compresses bodies over 10 KiB.
        .disable_request_compression(true)
        .load()
        .await;
    aws_sdk_cloudwatch::Client::new(&config)
}

fn datum(metric: &str, dims: &[(&str, &str)], value: f64, at: DateTime<Utc>) -> MetricDatum {
    MetricDatum::builder()
        .metric_name(metric)
        .set_dimensions(Some(
            dims.iter()
                .map(|(n, v)| Dimension::builder().name(*n).value(*v).build())
                .collect(),
        ))
        .value(value)
        .timestamp(AwsDateTime::from_millis(at.timestamp_millis()))
        .build()
}

/// Writes one minute of per-arm request and 5xx counts for Kubernetes namespace `ns`.
fn arm_data(
    ns: &str,
    arm: &str,
    requests: f64,
    errors: f64,
    at: DateTime<Utc>,
) -> Vec<MetricDatum> {
    let mut v = vec![datum(
        "envoy_http_downstream_rq_total",
        &[("Namespace", ns), ("app", arm)],
        requests,
        at,
    )];
    if errors > 0.0 {
        v.push(datum(
            "envoy_http_downstream_rq_xx",
            &[
                ("Namespace", ns),
                ("app", arm),
                ("envoy_response_code_class", "5"),
            ],
            errors,
            at,
        ));
    }
    v
}

async fn put(client: &aws_sdk_cloudwatch::Client, data: Vec<MetricDatum>) {
    for chunk in data.chunks(500) {
        client
            .put_metric_data()
            .namespace(NS)
            .set_metric_data(Some(chunk.to_vec()))
            .send()
            .await
            .expect("PutMetricData through the translator");
    }
}

fn spec(endpoint: &str, metrics: &str) -> CanarySpec {
    serde_norway::from_str(&format!(
        "targetRef: {{apiVersion: apps/v1, kind: Deployment, name: podinfo}}\n\
         service: {{port: 9898}}\n\
         router: {{appMesh: {{mesh: global}}}}\n\
         analysis:\n  interval: 1m\n  metrics:\n{}",
        metrics.replace("ENDPOINT", endpoint)
    ))
    .expect("test Canary parses")
}

const ERROR_RATE: &str = "    - name: errors\n      provider: {cloudWatch: {region: us-east-1, endpoint: ENDPOINT}}\n      preset: cloudwatch-appmesh-error-rate\n      max: 1\n";

fn user_metric(returns: &str) -> String {
    format!(
        "    - name: custom\n      provider: {{cloudWatch: {{region: us-east-1, endpoint: ENDPOINT}}}}\n      max: 1000\n      metricDataQueries:\n        - id: m1\n          returnData: false\n          metricStat:\n            period: 60\n            stat: Sum\n            metric:\n              namespace: {NS}\n              metricName: envoy_http_downstream_rq_total\n              dimensions: [{{name: Namespace, value: '{{{{ namespace }}}}'}}, {{name: app, value: '{{{{ target }}}}'}}]\n{returns}"
    )
}

const RETURN_E1: &str = "        - id: e1\n          expression: m1\n          returnData: true\n";

async fn one(e: &Evaluator, ns: &str, spec: CanarySpec, at: DateTime<Utc>) -> MetricEvaluation {
    e.evaluate_detailed(&support::canary_context(ns, "podinfo", spec), at)
        .await
        .remove(0)
}

/// The CloudWatch error-rate preset reads raw sums per arm and Serin computes the rate.
#[tokio::test]
async fn error_rate_preset_with_evidence() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let at = now();
    let minute = at - chrono::Duration::seconds(50);
    let client = sdk(&tr.url).await;
    let mut data = arm_data("cw-rate", "podinfo", 600.0, 30.0, minute);
    data.extend(arm_data("cw-rate", "podinfo-primary", 1200.0, 12.0, minute));
    put(&client, data).await;
    let e = one(
        &evaluator(options()),
        "cw-rate",
        spec(&tr.url, ERROR_RATE),
        at,
    )
    .await;
    let s = e.result.expect("a sample");
    assert!((s.value - 5.0).abs() < 1e-9, "{}", s.value);
    assert_eq!(s.sample_size, Some(600));
    let ev = s.evidence.unwrap();
    assert_eq!((ev.primary.requests, ev.primary.errors), (1200.0, 12.0));
    assert_eq!((ev.canary.requests, ev.canary.errors), (600.0, 30.0));
    assert_eq!(e.queries.len(), 4, "{:?}", e.queries);
}

/// No canary requests (the zero denominator) is no data, never 0% errors; a query whose
/// result has no datapoints is no data too.
#[tokio::test]
async fn zero_denominator_is_no_data() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let at = now();
    let client = sdk(&tr.url).await;
    put(
        &client,
        arm_data(
            "cw-idle",
            "podinfo-primary",
            100.0,
            0.0,
            at - chrono::Duration::seconds(50),
        ),
    )
    .await;
    let ev = evaluator(options());
    let e = one(&ev, "cw-idle", spec(&tr.url, ERROR_RATE), at).await;
    let err = e.result.expect_err("no canary requests");
    assert_eq!(err.category(), "no-data", "{err}");
    let e = one(&ev, "cw-idle", spec(&tr.url, &user_metric(RETURN_E1)), at).await;
    assert_eq!(e.result.expect_err("no datapoints").category(), "no-data");
}

/// A user query whose expression is another query's id works through batching's id
/// rewriting (moto resolves `c0_m1`).
#[tokio::test]
async fn user_expression_referencing_an_id() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let at = now();
    let client = sdk(&tr.url).await;
    put(
        &client,
        arm_data(
            "cw-user",
            "podinfo",
            42.0,
            0.0,
            at - chrono::Duration::seconds(50),
        ),
    )
    .await;
    let e = one(
        &evaluator(options()),
        "cw-user",
        spec(&tr.url, &user_metric(RETURN_E1)),
        at,
    )
    .await;
    assert_eq!(e.result.expect("a sample").value, 42.0);
}

/// Zero or two returnData queries are a bad query, refused before any call.
#[tokio::test]
async fn return_data_must_be_exactly_one() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let ev = evaluator(options());
    let none =
        user_metric("        - id: e1\n          expression: m1\n          returnData: false\n");
    let two = user_metric(
        "        - id: e1\n          expression: m1\n        - id: e2\n          expression: m1\n",
    );
    for q in [none, two] {
        let e = one(&ev, "cw-rd", spec(&tr.url, &q), now()).await;
        let err = e.result.expect_err("returnData");
        assert_eq!(err.category(), "bad-query");
        assert!(err.to_string().contains("returnData"), "{err}");
    }
    assert_eq!(tr.count("GetMetricData"), 0);
}

/// 100 Canaries × 2 metrics in one tick become 2 GetMetricData calls (600 queries, at most
/// 500 per call), and each Canary gets its own numbers back.
#[tokio::test]
async fn batches_one_tick_of_100_canaries() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let at = now();
    let minute = at - chrono::Duration::seconds(50);
    let client = sdk(&tr.url).await;
    let mut data = Vec::new();
    for i in 0..100 {
        let ns = format!("batch-{i}");
        data.extend(arm_data(&ns, "podinfo", 100.0 + i as f64, i as f64, minute));
        data.extend(arm_data(&ns, "podinfo-primary", 100.0, 1.0, minute));
    }
    put(&client, data).await;
    let ev = evaluator(options());
    let metrics = format!("{ERROR_RATE}{}", user_metric(RETURN_E1));
    let contexts: Vec<CanaryContext> = (0..100)
        .map(|i| support::canary_context(format!("batch-{i}"), "podinfo", spec(&tr.url, &metrics)))
        .collect();
    let results =
        futures::future::join_all(contexts.iter().map(|c| ev.evaluate_detailed(c, at))).await;
    for (i, r) in results.iter().enumerate() {
        let rate = r[0].result.as_ref().expect("error rate");
        let expected = 100.0 * i as f64 / (100.0 + i as f64);
        assert!(
            (rate.value - expected).abs() < 1e-9,
            "canary {i}: {} != {expected}",
            rate.value
        );
        assert_eq!(
            r[1].result.as_ref().expect("custom").value,
            100.0 + i as f64
        );
    }
    let counts = tr.query_counts();
    println!(
        "GetMetricData calls for 100 Canaries x 2 metrics: {} ({counts:?} queries)",
        counts.len()
    );
    assert_eq!(counts.iter().sum::<usize>(), 600);
    assert!(counts.iter().all(|&n| n <= 500), "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(ev.metrics().get("cloudwatch", "success"), 2);
}

/// Missing credentials, and an AccessDenied answer, are `auth` errors, never a pass.
#[tokio::test]
async fn credentials_errors() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let no_credentials = CloudWatchOptions {
        credentials: Some(SharedCredentialsProvider::new(
            aws_credential_types::credential_fn::provide_credentials_fn(|| async {
                Err(
                    aws_credential_types::provider::error::CredentialsError::not_loaded(
                        "no credentials in the chain",
                    ),
                )
            }),
        )),
        ..options()
    };
    let e = one(
        &evaluator(no_credentials),
        "cw-auth",
        spec(&tr.url, ERROR_RATE),
        now(),
    )
    .await;
    let err = e.result.expect_err("no credentials");
    assert_eq!(err.category(), "auth", "{err}");
    assert_eq!(tr.count("GetMetricData"), 0);

    tr.inject(
        1,
        Injected {
            status: 403,
            code: "AccessDenied".into(),
            message: "User is not authorized to perform: cloudwatch:GetMetricData".into(),
        },
    );
    let e = one(
        &evaluator(options()),
        "cw-auth",
        spec(&tr.url, ERROR_RATE),
        now(),
    )
    .await;
    let err = e.result.expect_err("access denied");
    assert_eq!(err.category(), "auth", "{err}");
    assert!(
        err.to_string().contains("cloudwatch:GetMetricData"),
        "{err}"
    );
}

/// Throttling is retried with backoff: two throttles then success gives a value; endless
/// throttling stops after max_attempts with a `throttled` error.
#[tokio::test]
async fn throttling_is_retried_and_bounded() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let at = now();
    let client = sdk(&tr.url).await;
    put(
        &client,
        arm_data(
            "cw-throttle",
            "podinfo",
            10.0,
            1.0,
            at - chrono::Duration::seconds(50),
        ),
    )
    .await;
    let throttle = Injected {
        status: 400,
        code: "Throttling".into(),
        message: "Rate exceeded".into(),
    };
    tr.inject(2, throttle.clone());
    let e = one(
        &evaluator(options()),
        "cw-throttle",
        spec(&tr.url, ERROR_RATE),
        at,
    )
    .await;
    assert!((e.result.expect("after retries").value - 10.0).abs() < 1e-9);
    assert_eq!(tr.count("GetMetricData"), 3);

    tr.inject(10, throttle);
    let started = std::time::Instant::now();
    let e = one(
        &evaluator(options()),
        "cw-throttle",
        spec(&tr.url, ERROR_RATE),
        at,
    )
    .await;
    let err = e.result.expect_err("throttled");
    assert_eq!(err.category(), "throttled", "{err}");
    assert_eq!(tr.count("GetMetricData"), 6, "3 attempts each");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// moto computes no percentiles: the p99 preset comes back as a provider error, not a pass.
#[tokio::test]
async fn moto_percentiles_are_an_error() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let at = now();
    let client = sdk(&tr.url).await;
    let minute = at - chrono::Duration::seconds(50);
    put(
        &client,
        vec![
            datum(
                "envoy_http_downstream_rq_total",
                &[("Namespace", "cw-p99"), ("app", "podinfo")],
                5.0,
                minute,
            ),
            datum(
                "envoy_http_downstream_rq_time",
                &[("Namespace", "cw-p99"), ("app", "podinfo")],
                120.0,
                minute,
            ),
        ],
    )
    .await;
    let latency = "    - name: p99\n      provider: {cloudWatch: {region: us-east-1, endpoint: ENDPOINT}}\n      preset: cloudwatch-appmesh-latency-p99\n      max: 500\n";
    let e = one(
        &evaluator(CloudWatchOptions {
            max_attempts: 1,
            ..options()
        }),
        "cw-p99",
        spec(&tr.url, latency),
        at,
    )
    .await;
    let err = e.result.expect_err("moto has no p99");
    assert_eq!(err.category(), "provider", "{err}");
}

/// Drives `rollout::decide` as the controller does: a rollout starts one interval before
/// `now` (a minute boundary, as CloudWatch checks are), and its first check, due at `now`,
/// sees `observation`. Returns that check's result for the metric.
fn first_check(
    spec: &CanarySpec,
    observation: MetricObservation,
    now: DateTime<Utc>,
) -> MetricResult {
    let interval = chrono::Duration::from_std(spec.analysis.interval.into()).unwrap();
    let ready = |revision: &str| WorkloadState {
        revision: Some(revision.into()),
        ready: true,
    };
    let mut observations = Observations {
        canary: ready("rev2"),
        primary: ready("rev1"),
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
    assert_eq!(rollout::next_check_at(spec, &started.status), Some(now));
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

/// A 30-minute window of one-minute datapoints whose newest datapoint is from 20 minutes
/// ago: the value is stamped with that datapoint's time plus its period (where its data
/// ends), and the check due now judges it stale. A datapoint in the last minute is fresh
/// and passes.
#[tokio::test]
async fn an_old_datapoint_is_stamped_with_its_time_plus_period_and_judged_stale() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let client = sdk(&tr.url).await;
    // A minute boundary: the window is the 30 whole minutes before it.
    let at = now() - chrono::Duration::seconds(20);
    let returns = "        - id: e1\n          expression: m1\n          returnData: true\n";
    let thirty_minutes = |ns: &str| {
        let mut s = spec(&tr.url, &user_metric(returns));
        s.analysis.interval = std::time::Duration::from_secs(1800).into();
        (ns.to_string(), s)
    };
    let (ns, stale) = thirty_minutes("cw-stale");
    let old = at - chrono::Duration::minutes(20) + chrono::Duration::seconds(15);
    put(&client, arm_data(&ns, "podinfo", 7.0, 0.0, old)).await;
    let ev = evaluator(options());
    let e = one(&ev, &ns, stale.clone(), at).await;
    let sample = e.result.clone().expect("a value from the old datapoint");
    assert_eq!(sample.value, 7.0);
    let period_start = at - chrono::Duration::minutes(20);
    let ends = period_start + chrono::Duration::seconds(60);
    assert_eq!(sample.timestamp, ends, "evaluated at {at}");
    let observation = e.observation();
    assert_eq!(observation.at, ends);
    let result = first_check(&stale, observation, at);
    assert_eq!(result.verdict, Verdict::Inconclusive, "{result:?}");
    assert!(
        result.message.starts_with("stale: measured at"),
        "{result:?}"
    );

    let (ns, fresh) = thirty_minutes("cw-fresh");
    put(
        &client,
        arm_data(&ns, "podinfo", 9.0, 0.0, at - chrono::Duration::seconds(40)),
    )
    .await;
    let e = one(&ev, &ns, fresh.clone(), at).await;
    assert_eq!(e.result.as_ref().expect("a value").timestamp, at);
    let result = first_check(&fresh, e.observation(), at);
    assert_eq!(result.verdict, Verdict::Pass, "{result:?}");
}
