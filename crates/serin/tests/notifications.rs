//! `serin run --notifications`: real HTTP receivers started here hear a rollout as Slack,
//! Teams and generic JSON payloads, while a receiver that hangs, one that answers 500 and
//! one that is down delay nothing: the rollout promotes, the invalid Canary is reported,
//! and every outcome is counted in `serin_notifications_total`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use serin::api::{Canary, Phase};
use support::e2e::*;
use support::{require, wait_for};

/// What the receivers got: (path, body).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// Receivers on one port: `/ok/NAME` answers 200, `/fail` 500, `/hang` never.
async fn receivers() -> (String, Received) {
    let got: Received = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{kind}/{name}",
            axum::routing::post(
                |State(got): State<Received>,
                 Path((kind, name)): Path<(String, String)>,
                 body: Bytes| async move {
                    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    got.lock().unwrap().push((format!("{kind}/{name}"), value));
                    match kind.as_str() {
                        "fail" => StatusCode::INTERNAL_SERVER_ERROR,
                        "hang" => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            StatusCode::OK
                        }
                        _ => StatusCode::OK,
                    }
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, got)
}

fn bodies(got: &Received, path: &str) -> Vec<Value> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, v)| v.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_hear_a_rollout_and_a_bad_one_delays_nothing() {
    require("prometheus");
    let env = env(|_, _| Vec::new()).await.expect("the upstream CRDs");
    let ns = env.ns.clone();
    let (base, got) = receivers().await;
    // A port nothing listens on.
    let down = support::free_port();
    let config = format!(
        r#"receivers:
- {{name: team-slack, type: slack, url: "{base}/ok/slack"}}
- {{name: team-teams, type: teams, url: "{base}/ok/teams", namespaces: ["{ns}"]}}
- {{name: audit, type: webhook, url: "{base}/ok/hook", events: [RolloutStarted, StepAdvanced, Promoted, RolledBack, Invalid, Warning]}}
- {{name: elsewhere, type: webhook, url: "{base}/ok/elsewhere", namespaces: [some-other-namespace]}}
- {{name: hangs, type: webhook, url: "{base}/hang/x", timeoutSeconds: 1}}
- {{name: fails, type: webhook, url: "{base}/fail/x"}}
- {{name: down, type: slack, url: "http://127.0.0.1:{down}/x"}}
"#
    );
    let file = env.cluster.dir.path().join("notifications.yaml");
    std::fs::write(&file, config).unwrap();

    create_upstream_group(
        &env,
        "web",
        (&format!("{ns}-web-v1-8080"), &format!("{ns}-web-v2-8080")),
    )
    .await;
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &ns);
    let canary = json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "backends": {"primary": "web-v1", "canary": "web-v2"},
            "service": {"port": 8080},
            "router": {"gloo": {"upstreamGroup": {"name": "web"}}},
            "steps": [20, 50, 100],
            "analysis": {"interval": "2s", "metrics": [{
                "name": "errors", "provider": {"prometheus": {"address": env.prometheus.url}},
                "query": "vector(0)", "max": 1.0}]}
        }
    });
    api.create(
        &PostParams::default(),
        &serde_json::from_value(canary).unwrap(),
    )
    .await
    .unwrap();
    // Invalid by the rules Serin checks (an unknown template variable), so it is reported.
    let mut bad: Canary = serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "broken", "namespace": ns},
        "spec": {
            "backends": {"primary": "web-v1", "canary": "web-v2"},
            "service": {"port": 8080},
            "router": {"gloo": {"upstreamGroup": {"name": "web"}}},
            "analysis": {"interval": "1h", "metrics": [{
                "name": "errors", "provider": {"prometheus": {"address": env.prometheus.url}},
                "query": "sum(up{job=\"{{ variables.nope }}\"})", "max": 1.0}]}
        }
    }))
    .unwrap();
    bad.metadata.namespace = Some(ns.clone());
    api.create(&PostParams::default(), &bad).await.unwrap();

    let file_arg = file.to_str().unwrap().to_string();
    let op = Operator::start(
        &env,
        env.cluster.dir.path().join("operator.log"),
        &["--notifications", &file_arg],
    );
    // The hanging, failing and absent receivers hold nothing up.
    wait_phase(&env, &op, "web", Phase::Succeeded, Duration::from_secs(60)).await;

    let reasons = |path: &str| -> Vec<String> {
        bodies(&got, path)
            .iter()
            .filter(|b| b["name"] == "web")
            .map(|b| b["reason"].as_str().unwrap_or_default().to_string())
            .filter(|r| {
                ["RolloutStarted", "StepAdvanced", "Promoted", "RolledBack"].contains(&r.as_str())
            })
            .collect()
    };
    let heard = wait_for("the Promoted notification", Duration::from_secs(20), || {
        let r = reasons("ok/hook");
        std::future::ready(r.contains(&"Promoted".to_string()).then_some(r))
    })
    .await;
    assert_eq!(
        heard,
        ["RolloutStarted", "StepAdvanced", "StepAdvanced", "Promoted"],
        "in the order they were recorded"
    );
    let hook = &bodies(&got, "ok/hook")
        .into_iter()
        .find(|b| b["reason"] == "Promoted")
        .unwrap();
    assert_eq!(hook["namespace"], ns.as_str());
    assert_eq!(hook["phase"], "Succeeded");
    assert_eq!(hook["canaryWeight"], 100);
    assert_eq!(hook["revision"], "web-v2");
    let invalid = wait_for("the Invalid notification", Duration::from_secs(20), || {
        let found = bodies(&got, "ok/hook")
            .into_iter()
            .find(|b| b["name"] == "broken" && b["reason"] == "Invalid");
        std::future::ready(found)
    })
    .await;
    assert!(
        invalid["message"]
            .as_str()
            .unwrap()
            .contains("spec.analysis.metrics[0]"),
        "{invalid}"
    );
    assert_eq!(invalid["type"], "Warning");

    // Slack and Teams payloads.
    let slack = wait_for("Slack's Promoted", Duration::from_secs(20), || {
        std::future::ready(bodies(&got, "ok/slack").into_iter().find(|b| {
            b["text"]
                .as_str()
                .is_some_and(|t| t.contains("web Promoted"))
        }))
    })
    .await;
    let text = slack["text"].as_str().unwrap();
    assert!(text.starts_with(":white_check_mark: "), "{text}");
    assert!(text.contains(&format!("{ns}/web Promoted")), "{text}");
    let teams = wait_for("Teams' Promoted", Duration::from_secs(20), || {
        std::future::ready(bodies(&got, "ok/teams").into_iter().find(|b| {
            b["attachments"][0]["content"]["body"][0]["text"] == format!("{ns}/web Promoted")
        }))
    })
    .await;
    assert_eq!(
        teams["attachments"][0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert!(
        bodies(&got, "ok/elsewhere").is_empty(),
        "a receiver for another namespace heard this one"
    );

    // Every outcome is counted: the failing receiver was tried three times per
    // notification, the hanging one timed out, the absent one could not be reached.
    let counted = wait_for(
        "failed deliveries counted",
        Duration::from_secs(40),
        || async {
            let (_, metrics) = operator_http(&op, "/metrics").await;
            let line = |receiver: &str, outcome: &str| {
                metrics.lines().any(|l| {
                    l.starts_with(&format!(
                        "serin_notifications_total{{receiver=\"{receiver}\",outcome=\"{outcome}\"}}"
                    ))
                })
            };
            (line("audit", "delivered")
                && line("fails", "failed")
                && line("hangs", "failed")
                && line("down", "failed"))
            .then_some(metrics)
        },
    )
    .await;
    assert!(counted.contains("serin_notifications_total"), "{counted}");
    let fail_attempts = bodies(&got, "fail/x").len();
    let failed_notices = counted
        .lines()
        .find(|l| l.starts_with("serin_notifications_total{receiver=\"fails\",outcome=\"failed\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap() as usize;
    assert!(
        fail_attempts >= 3 * failed_notices,
        "{fail_attempts} attempts for {failed_notices} failed notifications"
    );
    // The URLs are credentials: the log names receivers, never their URLs.
    let log = op.log();
    assert!(log.contains("receiver=down"), "the failure is logged");
    assert!(
        !log.contains(&format!("127.0.0.1:{down}")),
        "a URL in the log"
    );
}
