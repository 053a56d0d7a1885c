//! The sequential judge's looks from CloudWatch: the error-rate preset's per-minute sums
//! through the real AWS SDK, against moto's server behind the CBOR translator in
//! tests/support.

mod support;

use std::time::Duration;

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_cloudwatch::primitives::DateTime as AwsDateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum};
use chrono::{DateTime, Utc};
use serin::analysis::sequential::{Counts, Look};
use serin::api::MetricSpec;
use serin::metrics::{
    CanaryContext, CloudWatch, CloudWatchOptions, LookMeasurement, MetricProvider, ProviderMetrics,
};
use support::cbor::Translator;

const CW_SERVICE: &str = "GraniteServiceVersion20100801";
const NS: &str = "ContainerInsights/Prometheus";
const CANARY_APP: &str = "podinfo";
const PRIMARY_APP: &str = "podinfo-primary";

fn credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new("AKIDTEST", "secret", None, None, "test"))
}

fn provider() -> (CloudWatch, ProviderMetrics) {
    let metrics = ProviderMetrics::default();
    let options = CloudWatchOptions {
        credentials: Some(credentials()),
        max_attempts: 1,
        timeout: Duration::from_secs(20),
        linger: Duration::from_millis(20),
        ..Default::default()
    };
    (CloudWatch::new(options, metrics.clone()), metrics)
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

/// A whole minute half an hour ago: the first look's start.
fn base() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp() / 60 * 60 - 1800, 0).unwrap()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

/// `n + 1` look times `step` seconds apart from `from`.
fn grid(from: DateTime<Utc>, step: i64, n: i64) -> Vec<DateTime<Utc>> {
    (0..=n).map(|k| from + secs(k * step)).collect()
}

/// A datum of Kubernetes namespace `ns`'s arm `app`: its requests, or its 5xx responses.
fn datum(ns: &str, app: &str, errors: bool, value: f64, at: DateTime<Utc>) -> MetricDatum {
    let mut dims = vec![("Namespace", ns), ("app", app)];
    if errors {
        dims.push(("envoy_response_code_class", "5"));
    }
    MetricDatum::builder()
        .metric_name(if errors {
            "envoy_http_downstream_rq_xx"
        } else {
            "envoy_http_downstream_rq_total"
        })
        .set_dimensions(Some(
            dims.iter()
                .map(|(n, v)| Dimension::builder().name(*n).value(*v).build())
                .collect(),
        ))
        .value(value)
        .timestamp(AwsDateTime::from_millis(at.timestamp_millis()))
        .build()
}

async fn put(client: &aws_sdk_cloudwatch::Client, data: Vec<MetricDatum>) {
    client
        .put_metric_data()
        .namespace(NS)
        .set_metric_data(Some(data))
        .send()
        .await
        .expect("PutMetricData through the translator");
}

const ERROR_RATE: &str = "targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
service: {port: 9898}
router: {appMesh: {mesh: global}}
analysis:
  interval: 5m
  metrics:
    - name: errors
      provider: {cloudWatch: {region: us-east-1, endpoint: ENDPOINT}}
      preset: cloudwatch-appmesh-error-rate
      max: 1
";

/// The Canary `podinfo` in Kubernetes namespace `ns` with the CloudWatch error-rate preset
/// at `endpoint`, and that metric.
fn canary(ns: &str, endpoint: &str) -> (CanaryContext, MetricSpec) {
    let spec = serde_norway::from_str(&ERROR_RATE.replace("ENDPOINT", endpoint))
        .expect("test Canary parses");
    let ctx = support::canary_context(ns, "podinfo", spec);
    let metric = ctx.spec.analysis.metrics[0].clone();
    (ctx, metric)
}

/// Writes four minutes of both arms' sums from `m0` (the canary's third minute has no
/// datapoint, 5xx sums only where there were 5xx, one minute of two datapoints) and
/// datapoints just outside those minutes; returns the four looks they must give.
async fn four_minutes(
    client: &aws_sdk_cloudwatch::Client,
    ns: &str,
    m0: DateTime<Utc>,
) -> Vec<Look> {
    let m = |k: i64, s: i64| m0 + secs(60 * k + s);
    put(
        client,
        vec![
            datum(ns, CANARY_APP, false, 100.0, m(0, 10)),
            datum(ns, CANARY_APP, true, 5.0, m(0, 10)),
            datum(ns, CANARY_APP, false, 120.0, m(1, 30)),
            datum(ns, CANARY_APP, false, 40.0, m(3, 5)),
            datum(ns, CANARY_APP, false, 50.0, m(3, 55)),
            datum(ns, CANARY_APP, true, 3.0, m(3, 55)),
            datum(ns, PRIMARY_APP, false, 1000.0, m(0, 0)),
            datum(ns, PRIMARY_APP, false, 1100.0, m(1, 0)),
            datum(ns, PRIMARY_APP, true, 7.0, m(1, 0)),
            datum(ns, PRIMARY_APP, false, 1050.0, m(2, 59)),
            datum(ns, PRIMARY_APP, true, 2.0, m(2, 59)),
            datum(ns, PRIMARY_APP, false, 980.0, m(3, 20)),
            // Outside [m0, m0 + 4 min): before the first look, and at or after the last
            // look's end (GetMetricData's end is exclusive).
            datum(ns, CANARY_APP, false, 777.0, m(0, -30)),
            datum(ns, PRIMARY_APP, false, 666.0, m(4, 0)),
            datum(ns, CANARY_APP, true, 88.0, m(4, 10)),
        ],
    )
    .await;
    let c = |requests, bad| Counts { requests, bad };
    vec![
        Look {
            primary: c(1000.0, 0.0),
            canary: c(100.0, 5.0),
        },
        Look {
            primary: c(1100.0, 7.0),
            canary: c(120.0, 0.0),
        },
        Look {
            primary: c(1050.0, 2.0),
            canary: c(0.0, 0.0),
        },
        Look {
            primary: c(980.0, 0.0),
            canary: c(90.0, 3.0),
        },
    ]
}

fn looks_of(m: LookMeasurement) -> Vec<Look> {
    m.result
        .unwrap_or_else(|e| panic!("looks ({:?}): {e}", m.queries))
}

/// Per-minute sums of both arms become one look per minute with exactly those counts (a
/// minute without a datapoint is zero), from one GetMetricData call of the four sums.
#[tokio::test]
async fn one_look_per_minute_with_each_arms_counts() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let client = sdk(&tr.url).await;
    let m0 = base();
    let expected = four_minutes(&client, "cwl-counts", m0).await;
    let (cw, metrics) = provider();
    let (ctx, metric) = canary("cwl-counts", &tr.url);
    let m = cw.looks(&ctx, &metric, &grid(m0, 60, 4)).await;
    assert_eq!(m.queries.len(), 4, "{:?}", m.queries);
    assert!(
        m.queries
            .iter()
            .all(|q| q.contains("Sum period 60s") && q.contains("Namespace=cwl-counts")),
        "{:?}",
        m.queries
    );
    assert_eq!(looks_of(m), expected);
    assert_eq!(tr.count("GetMetricData"), 1);
    assert_eq!(tr.query_counts(), vec![4]);
    assert_eq!(metrics.get("cloudwatch", "success"), 1);
}

/// Two consecutive fetches that meet at a look time give the same looks as one fetch over
/// both, so every request is counted in exactly one look.
#[tokio::test]
async fn consecutive_fetches_count_each_request_once() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let client = sdk(&tr.url).await;
    let m0 = base();
    let expected = four_minutes(&client, "cwl-split", m0).await;
    let (cw, _) = provider();
    let (ctx, metric) = canary("cwl-split", &tr.url);
    let mut looks = looks_of(cw.looks(&ctx, &metric, &grid(m0, 60, 2)).await);
    looks.extend(looks_of(
        cw.looks(&ctx, &metric, &grid(m0 + secs(120), 60, 2)).await,
    ));
    assert_eq!(looks, expected);
}

/// A two-minute look interval sums two one-minute datapoints into each look.
#[tokio::test]
async fn a_two_minute_interval_sums_two_minutes_per_look() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let client = sdk(&tr.url).await;
    // Periods start on multiples of the look interval.
    let m0 = DateTime::from_timestamp(base().timestamp() / 120 * 120, 0).unwrap();
    let four = four_minutes(&client, "cwl-two", m0).await;
    let (cw, _) = provider();
    let (ctx, metric) = canary("cwl-two", &tr.url);
    let looks = looks_of(cw.looks(&ctx, &metric, &grid(m0, 120, 2)).await);
    let add = |a: Counts, b: Counts| Counts {
        requests: a.requests + b.requests,
        bad: a.bad + b.bad,
    };
    let expected: Vec<Look> = four
        .chunks(2)
        .map(|p| Look {
            primary: add(p[0].primary, p[1].primary),
            canary: add(p[0].canary, p[1].canary),
        })
        .collect();
    assert_eq!(looks, expected);
}

/// Dimensions that match nothing, for both arms or for the canary alone, are no data,
/// never zero requests.
#[tokio::test]
async fn dimensions_matching_nothing_are_no_data() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let client = sdk(&tr.url).await;
    let m0 = base();
    put(
        &client,
        vec![
            datum("cwl-primary-only", PRIMARY_APP, false, 500.0, m0 + secs(10)),
            datum("cwl-primary-only", PRIMARY_APP, true, 1.0, m0 + secs(10)),
        ],
    )
    .await;
    let (cw, _) = provider();
    for (ns, arm) in [("cwl-nothing", "primary"), ("cwl-primary-only", "canary")] {
        let (ctx, metric) = canary(ns, &tr.url);
        let m = cw.looks(&ctx, &metric, &grid(m0, 60, 3)).await;
        let err = m.result.expect_err("no datapoints");
        assert_eq!(err.category(), "no-data", "{ns}: {err}");
        assert!(
            err.to_string().contains(&format!("the {arm}'s requests")),
            "{ns}: {err}"
        );
        assert_eq!(m.queries.len(), 4, "{ns}");
    }
}

/// A look interval that is not a whole number of minutes is a configuration error naming
/// analysis.lookInterval, refused before any call.
#[tokio::test]
async fn steps_off_whole_minutes_are_a_config_error() {
    let moto = support::moto::shared();
    let tr = Translator::start(&moto.url, CW_SERVICE).await;
    let (cw, _) = provider();
    let (ctx, metric) = canary("cwl-step", &tr.url);
    for step in [10, 30, 90] {
        let err = cw
            .looks(&ctx, &metric, &grid(base(), step, 4))
            .await
            .result
            .expect_err("not whole minutes");
        assert_eq!(err.category(), "config", "{step}s: {err}");
        assert!(
            err.to_string().contains("analysis.lookInterval"),
            "{step}s: {err}"
        );
    }
    assert_eq!(tr.count("GetMetricData"), 0);
}
