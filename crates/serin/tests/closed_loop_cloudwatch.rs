//! The closed loop with CloudWatch: the traffic simulator publishes what happened with
//! PutMetricData (as the CloudWatch agent publishes App Mesh Envoy metrics) to moto, and the
//! real `serin run` judges the canaries with the CloudWatch preset through the real AWS SDK
//! (via the CBOR translator in tests/support). CloudWatch has one-minute periods, so one
//! environment runs a healthy and a failing canary side by side.

mod support;

use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_sdk_cloudwatch::primitives::DateTime as AwsDateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use serin::api::{Phase, RolloutResult};
use serin::demo::traffic::{ArmTotals, Behaviour, TrafficSimulator};
use serin::router::{AppMeshKubeRouter, Routers};
use support::cbor::Translator;
use support::e2e::*;
use support::require;

const CW_SERVICE: &str = "GraniteServiceVersion20100801";
const CW_NAMESPACE: &str = "ContainerInsights/Prometheus";

async fn sdk(endpoint: &str) -> aws_sdk_cloudwatch::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .disable_request_compression(true)
        .load()
        .await;
    aws_sdk_cloudwatch::Client::new(&config)
}

fn datum(
    ns: &str,
    metric: &str,
    app: &str,
    extra: Option<(&str, &str)>,
    value: f64,
) -> MetricDatum {
    let mut dims = vec![
        Dimension::builder().name("Namespace").value(ns).build(),
        Dimension::builder().name("app").value(app).build(),
    ];
    if let Some((n, v)) = extra {
        dims.push(Dimension::builder().name(n).value(v).build());
    }
    MetricDatum::builder()
        .metric_name(metric)
        .set_dimensions(Some(dims))
        .value(value)
        .timestamp(AwsDateTime::from_millis(
            chrono::Utc::now().timestamp_millis(),
        ))
        .build()
}

/// Publishes, every few seconds, each arm's new requests and 5xx since the last publish,
/// with the pods' `app` label as the CloudWatch agent does (`<target>` for the canary's
/// pods, `<target>-primary` for the primary's).
fn publish(
    ns: String,
    sim: Arc<TrafficSimulator>,
    client: aws_sdk_cloudwatch::Client,
    targets: Vec<String>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Vec<(ArmTotals, ArmTotals)> = vec![Default::default(); targets.len()];
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut data = Vec::new();
            for (i, target) in targets.iter().enumerate() {
                let Some((p, c)) = sim.totals(i) else {
                    continue;
                };
                for (app, now, before) in [
                    (format!("{target}-primary"), p, last[i].0),
                    (target.clone(), c, last[i].1),
                ] {
                    let requests = (now.requests - before.requests) as f64;
                    let errors = (now.errors - before.errors) as f64;
                    if requests > 0.0 {
                        data.push(datum(
                            &ns,
                            "envoy_http_downstream_rq_total",
                            &app,
                            None,
                            requests,
                        ));
                        data.push(datum(
                            &ns,
                            "envoy_http_downstream_rq_xx",
                            &app,
                            Some(("envoy_response_code_class", "5")),
                            errors,
                        ));
                    }
                }
                last[i] = (p, c);
            }
            if !data.is_empty()
                && let Err(e) = client
                    .put_metric_data()
                    .namespace(CW_NAMESPACE)
                    .set_metric_data(Some(data))
                    .send()
                    .await
            {
                eprintln!("PutMetricData failed: {e}");
            }
        }
    })
}

/// With CloudWatch (moto) as the metric provider, a healthy canary is promoted and a canary
/// answering 5% errors is rolled back, each judged on what the simulator published, by the
/// sequential judge (the preset's default): one look per one-minute period, read once the
/// period is published (`ingestionDelay` 10 s here: the simulator publishes every 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudwatch_promotes_healthy_and_rolls_back_failing() {
    require("prometheus");
    let moto = support::moto::shared();
    let translator = Translator::start(&moto.url, CW_SERVICE).await;
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let bad = Behaviour {
        error_rate: 0.05,
        ..Behaviour::HEALTHY
    };
    let Some(env) = env(|c, ns| {
        vec![
            appmesh_service(c, ns, Behaviour::HEALTHY, routers(c), "good"),
            appmesh_service(c, ns, bad, routers(c), "bad"),
        ]
    })
    .await
    else {
        return;
    };
    let _publisher = publish(
        env.ns.clone(),
        env.sim.clone(),
        sdk(&translator.url).await,
        vec!["good".into(), "bad".into()],
    );
    ensure_mesh(&env.client).await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    for name in ["good", "bad"] {
        deployments
            .create(&PostParams::default(), &deployment(&env.ns, name, "app:1"))
            .await
            .unwrap();
        let mut c = workload_canary(&env.ns, name, "http://unused:9090");
        c["spec"]["steps"] = json!([50, 100]);
        c["spec"]["analysis"]["interval"] = json!("60s");
        c["spec"]["analysis"]["failureThreshold"] = json!(1);
        c["spec"]["analysis"]["ingestionDelay"] = json!("10s");
        c["spec"]["analysis"]["metrics"] = json!([{
            "name": "error-rate",
            "provider": {"cloudWatch": {"region": "us-east-1", "endpoint": translator.url}},
            "preset": "cloudwatch-appmesh-error-rate",
            "max": 1.0
        }]);
        canaries
            .create(&PostParams::default(), &serde_json::from_value(c).unwrap())
            .await
            .unwrap();
    }
    let op = Operator::start_with_env(
        &env,
        env.cluster.dir.path().join("operator.log"),
        // The Canary points Serin's AWS identity at the local moto: the operator must
        // allow that endpoint (crate::policy).
        &["--allow-aws-endpoint", "http://127.0.0.1:*"],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    for name in ["good", "bad"] {
        wait_phase(&env, &op, name, Phase::Waiting, Duration::from_secs(30)).await;
        set_image(&env, name, "app:2").await;
    }
    let good = wait_phase(
        &env,
        &op,
        "good",
        Phase::Succeeded,
        Duration::from_secs(200),
    )
    .await;
    let bad = wait_phase(&env, &op, "bad", Phase::Failed, Duration::from_secs(200)).await;
    let good = good.status.unwrap();
    let bad = bad.status.unwrap();
    assert_eq!(good.history[0].result, RolloutResult::Promoted);
    assert_eq!(bad.history[0].result, RolloutResult::RolledBack);
    assert_eq!(bad.history[0].reached_weight, 50);
    assert!(
        bad.history[0]
            .reason
            .starts_with("error-rate: the canary is"),
        "{}",
        bad.history[0].reason
    );
    let evidence = &bad.evidence.as_ref().expect("the judge's evidence").metrics[0];
    assert!(
        evidence.canary_bad / evidence.canary_requests > 0.01,
        "{evidence:?}"
    );
    // Both canaries' looks were due in the same minute: the operator's batcher sent them in
    // one GetMetricData call (4 queries each).
    let calls = translator.query_counts();
    println!("GetMetricData calls (queries per call): {calls:?}");
    assert!(!calls.is_empty(), "the operator read CloudWatch");
    assert!(
        calls.contains(&8),
        "the two canaries' checks were not batched: {calls:?}"
    );
}
