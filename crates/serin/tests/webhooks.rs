//! `spec.webhooks` against real HTTP receivers started here and the real `serin run`:
//! gates hold a rollout until they open, hooks run where Flagger runs them, a failing
//! pre-rollout hook and a rollback gate roll back, and receivers that hang, fail or are
//! down hold up nothing they should not.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use serin::api::{Canary, Phase, RolloutResult};
use support::e2e::*;
use support::{require, wait_for};

/// One call a receiver got.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    body: Value,
    headers: BTreeMap<String, String>,
    at: Instant,
}

#[derive(Default)]
struct Receivers {
    calls: Mutex<Vec<Call>>,
    open: Mutex<HashSet<String>>,
}

/// Receivers on one port: `/ok/NAME` answers 200, `/fail/NAME` 500, `/hang/NAME` never,
/// `/gate/NAME` 403 until the test opens it, then 200.
async fn receivers() -> (String, Arc<Receivers>) {
    let state: Arc<Receivers> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/{kind}/{name}",
            axum::routing::post(
                |State(state): State<Arc<Receivers>>,
                 Path((kind, name)): Path<(String, String)>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let call = Call {
                        path: format!("{kind}/{name}"),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), v.to_str().unwrap_or_default().to_string())
                            })
                            .collect(),
                        at: Instant::now(),
                    };
                    state.calls.lock().unwrap().push(call);
                    match kind.as_str() {
                        "fail" => (StatusCode::INTERNAL_SERVER_ERROR, "load test: 12% errors"),
                        "hang" => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            (StatusCode::OK, "")
                        }
                        "gate" if !state.open.lock().unwrap().contains(&name) => {
                            (StatusCode::FORBIDDEN, "gate closed")
                        }
                        _ => (StatusCode::OK, "ok"),
                    }
                },
            ),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, state)
}

impl Receivers {
    fn calls(&self, path: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    fn open(&self, gate: &str) {
        self.open.lock().unwrap().insert(gate.to_string());
    }
}

/// A traffic-mode Gloo Canary checked every 2 s against a passing query, with `webhooks`.
fn gloo_canary(env: &Env, name: &str, failure_threshold: u32, webhooks: Value) -> Canary {
    serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": name, "namespace": env.ns},
        "spec": {
            "backends": {"primary": format!("{name}-v1"), "canary": format!("{name}-v2")},
            "service": {"port": 8080},
            "router": {"gloo": {"upstreamGroup": {"name": name}}},
            "steps": [20, 50, 100],
            "analysis": {"interval": "2s", "failureThreshold": failure_threshold, "metrics": [{
                "name": "errors", "provider": {"prometheus": {"address": env.prometheus.url}},
                "query": "vector(0)", "max": 1.0}]},
            "webhooks": webhooks,
        }
    }))
    .unwrap()
}

async fn create_gloo(env: &Env, name: &str, failure_threshold: u32, webhooks: Value) {
    let ns = &env.ns;
    create_upstream_group(
        env,
        name,
        (
            &format!("{ns}-{name}-v1-8080"),
            &format!("{ns}-{name}-v2-8080"),
        ),
    )
    .await;
    let api: Api<Canary> = Api::namespaced(env.client.clone(), ns);
    api.create(
        &PostParams::default(),
        &gloo_canary(env, name, failure_threshold, webhooks),
    )
    .await
    .unwrap();
}

fn ready_message(c: &Canary) -> String {
    c.status
        .as_ref()
        .and_then(|s| serin::api::find_condition(&s.conditions, serin::api::READY))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn weight(c: &Canary) -> u8 {
    c.status.as_ref().map_or(0, |s| s.canary_weight)
}

/// Gates hold the rollout until they open; the pre-rollout hook runs before any traffic,
/// the rollout hook with every check; a rollback gate that hangs and event receivers
/// that are down or failing change nothing; the post-rollout hook hears the promotion
/// once; every call carries its delivery key and the documented payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_and_hooks_drive_a_rollout() {
    require("prometheus");
    let env = env(|_, _| Vec::new()).await.expect("the upstream CRDs");
    let ns = env.ns.clone();
    let (base, rx) = receivers().await;
    // A port nothing listens on.
    let down = support::free_port();
    create_gloo(
        &env,
        "web",
        2,
        json!([
            {"name": "approve", "type": "confirm-rollout", "url": format!("{base}/gate/approve")},
            {"name": "smoke", "type": "pre-rollout", "url": format!("{base}/ok/smoke"),
             "metadata": {"cmd": "curl -s http://web-canary:8080/healthz"}},
            {"name": "load", "type": "rollout", "url": format!("{base}/ok/load")},
            {"name": "release", "type": "confirm-promotion", "url": format!("{base}/gate/release")},
            {"name": "stuck", "type": "rollback", "url": format!("{base}/hang/stuck"), "timeout": "1s"},
            {"name": "report", "type": "post-rollout", "url": format!("{base}/ok/report")},
            {"name": "events", "type": "event", "url": format!("{base}/ok/events")},
            {"name": "team-slack", "type": "event", "url": format!("{base}/ok/slack"), "format": "Slack"},
            {"name": "events-failing", "type": "event", "url": format!("{base}/fail/events")},
            {"name": "events-down", "type": "event", "url": format!("http://127.0.0.1:{down}/events")},
        ]),
    )
    .await;
    let op = Operator::start(&env, env.cluster.dir.path().join("operator.log"), &[]);

    // confirm-rollout: asked once per interval while closed; no traffic meanwhile.
    wait_for(
        "the confirm-rollout gate asked twice",
        Duration::from_secs(60),
        || {
            let asked = rx.calls("gate/approve").len();
            async move { (asked >= 2).then_some(()) }
        },
    )
    .await;
    let c = canary(&env, "web").await;
    assert_eq!(c.status.as_ref().unwrap().phase, Phase::Progressing);
    assert_eq!(weight(&c), 0, "traffic before the gate opened");
    let message = ready_message(&c);
    assert!(
        message.contains("confirm-rollout") && message.contains("answered 403: gate closed"),
        "{message}"
    );
    assert!(
        rx.calls("ok/smoke").is_empty(),
        "pre-rollout before the gate opened"
    );
    let asks = rx.calls("gate/approve");
    let gap = asks[1].at - asks[0].at;
    assert!(
        gap >= Duration::from_millis(1500),
        "the gate was asked again after {gap:?}, not once per 2 s interval"
    );
    // The payload and the delivery key.
    let uid = c.metadata.uid.clone().unwrap();
    let ask = &asks[0];
    assert_eq!(ask.body["name"], "web");
    assert_eq!(ask.body["namespace"], ns.as_str());
    assert_eq!(ask.body["uid"], uid.as_str());
    assert_eq!(ask.body["webhook"], "approve");
    assert_eq!(ask.body["type"], "confirm-rollout");
    assert_eq!(ask.body["phase"], "Progressing");
    assert_eq!(ask.body["revision"], "web-v2");
    assert_eq!(ask.body["canaryWeight"], 0);
    assert_eq!(ask.body["primaryWeight"], 100);
    assert_eq!(ask.body["steps"], json!([20, 50, 100]));
    assert_eq!(
        ask.headers["serin-delivery"],
        format!("{uid}/web-v2/approve")
    );
    assert_eq!(ask.headers["content-type"], "application/json");
    assert!(ask.headers["user-agent"].starts_with("serin/"));

    // Open it: pre-rollout runs, then the first step; the rollout hook with every check.
    rx.open("approve");
    wait_for("canary weight 50", Duration::from_secs(60), || async {
        (weight(&canary(&env, "web").await) == 50).then_some(())
    })
    .await;
    let smoke = rx.calls("ok/smoke");
    assert_eq!(smoke.len(), 1, "pre-rollout is called once when it passes");
    assert_eq!(smoke[0].body["type"], "pre-rollout");
    assert_eq!(
        smoke[0].body["metadata"]["cmd"],
        "curl -s http://web-canary:8080/healthz"
    );
    let load = rx.calls("ok/load");
    assert!(!load.is_empty());
    assert!(
        smoke[0].at < load[0].at,
        "the rollout hook ran before the pre-rollout hook"
    );
    assert_eq!(
        load[0].body["canaryWeight"], 20,
        "called with the first step's check"
    );

    // confirm-promotion holds at 50% while the checks (and the rollout hook) go on.
    wait_for(
        "the promotion waiting for its gate",
        Duration::from_secs(30),
        || async {
            ready_message(&canary(&env, "web").await)
                .contains("confirm-promotion")
                .then_some(())
        },
    )
    .await;
    let loads = rx.calls("ok/load").len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = canary(&env, "web").await;
    assert_eq!(weight(&c), 50, "promoted past a closed gate");
    assert!(
        rx.calls("ok/load").len() > loads,
        "checks stopped while the gate waits"
    );
    assert!(!rx.calls("gate/release").is_empty());
    assert!(
        !rx.calls("hang/stuck").is_empty(),
        "the rollback gate is asked with checks"
    );

    rx.open("release");
    wait_phase(&env, &op, "web", Phase::Succeeded, Duration::from_secs(60)).await;

    // post-rollout: once, with the result.
    let report = wait_for("the post-rollout call", Duration::from_secs(30), || {
        let calls = rx.calls("ok/report");
        async move { (!calls.is_empty()).then_some(calls) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rx.calls("ok/report").len(),
        1,
        "a delivered post-rollout repeats"
    );
    assert_eq!(report[0].body["result"], "Promoted");
    assert_eq!(report[0].body["revision"], "web-v2");
    assert_eq!(
        report[0].headers["serin-delivery"],
        format!("{uid}/web-v2/report")
    );
    let c = canary(&env, "web").await;
    assert!(c.status.as_ref().unwrap().post_rollout.is_none());

    // event: every Event, with its reason and message, despite the failing and down ones.
    let reasons = wait_for("the Promoted event call", Duration::from_secs(30), || {
        let reasons: Vec<String> = rx
            .calls("ok/events")
            .iter()
            .map(|c| {
                c.body["event"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        async move { reasons.iter().any(|r| r == "Promoted").then_some(reasons) }
    })
    .await;
    for r in [
        "RolloutStarted",
        "WaitingForWebhook",
        "WebhookConfirmed",
        "StepAdvanced",
        "Promoted",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event call: {reasons:?}"
        );
    }
    let failing = rx.calls("fail/events");
    assert!(!failing.is_empty());
    // This Canary's own Slack channel gets Slack's message shape.
    let slack = wait_for("the Slack-shaped Promoted", Duration::from_secs(30), || {
        let found = rx.calls("ok/slack").into_iter().find(|c| {
            c.body["text"]
                .as_str()
                .is_some_and(|t| t.contains(&format!("{ns}/web Promoted")))
        });
        async move { found }
    })
    .await;
    assert!(
        slack.body["text"]
            .as_str()
            .unwrap()
            .starts_with(":white_check_mark: "),
        "{}",
        slack.body
    );

    // Every outcome is counted by type.
    let metrics = wait_for(
        "webhook outcomes counted",
        Duration::from_secs(30),
        || async {
            let (_, m) = operator_http(&op, "/metrics").await;
            let has = |t: &str, o: &str| {
                m.contains(&format!(
                    "serin_webhook_calls_total{{type=\"{t}\",outcome=\"{o}\"}}"
                ))
            };
            (has("confirm-rollout", "refused")
                && has("confirm-rollout", "ok")
                && has("rollback", "timeout")
                && has("event", "unreachable")
                && has("event", "refused")
                && has("post-rollout", "ok"))
            .then_some(m)
        },
    )
    .await;
    assert!(metrics.contains("serin_webhook_calls_total"));
    // URLs may be credentials: the log names webhooks, never their URLs.
    let log = op.log();
    assert!(log.contains("webhook=events-down"), "the failure is logged");
    assert!(
        !log.contains(&format!("127.0.0.1:{down}")),
        "a URL in the log"
    );
}

/// A pre-rollout hook that keeps failing rolls back before any traffic; a rollback gate
/// that answers 2xx rolls back at the next check; a rollout hook whose URL and header come
/// from a Secret is called with them; a Canary whose webhook URL the operator may not
/// call is Invalid, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_hooks_and_rollback_gates_roll_back() {
    require("prometheus");
    let env = env(|_, _| Vec::new()).await.expect("the upstream CRDs");
    let ns = env.ns.clone();
    let (base, rx) = receivers().await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "load-hook", "namespace": ns},
                "stringData": {"url": format!("{base}/ok/secret-load"), "X-Api-Key": "s3cr3t"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    create_gloo(
        &env,
        "pre",
        2,
        json!([{"name": "smoke", "type": "pre-rollout", "url": format!("{base}/fail/smoke")}]),
    )
    .await;
    create_gloo(
        &env,
        "kill",
        5,
        json!([
            {"name": "load", "type": "rollout", "secretRef": {"name": "load-hook"}},
            {"name": "abort-switch", "type": "rollback", "url": format!("{base}/gate/abort")},
            // Never opened: the rollout cannot promote before the test opens the switch.
            {"name": "hold", "type": "confirm-promotion", "url": format!("{base}/gate/never")},
        ]),
    )
    .await;
    create_gloo(
        &env,
        "outside",
        2,
        json!([{"name": "load", "type": "rollout", "url": "http://169.254.169.254/latest"}]),
    )
    .await;
    let allowed = format!("{base}/*");
    let op = Operator::start(
        &env,
        env.cluster.dir.path().join("operator.log"),
        &[
            "--allow-address",
            &allowed,
            "--allow-address",
            &env.prometheus.url,
        ],
    );

    // pre-rollout fails twice (failureThreshold 2): rolled back with no traffic.
    let c = wait_phase(&env, &op, "pre", Phase::Failed, Duration::from_secs(60)).await;
    let s = c.status.unwrap();
    assert_eq!(s.history[0].result, RolloutResult::RolledBack);
    assert_eq!(s.history[0].reached_weight, 0);
    assert!(
        s.history[0].reason.contains("pre-rollout")
            && s.history[0]
                .reason
                .contains("answered 500: load test: 12% errors"),
        "{}",
        s.history[0].reason
    );
    assert_eq!(rx.calls("fail/smoke").len(), 2);
    let events = event_messages(&env, "pre").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "WebhookFailed" && m.contains("1 of 2")),
        "{events:?}"
    );

    // The rollout hook from the Secret: its URL and header, marked sensitive in Serin.
    wait_for(
        "the Secret's rollout hook called",
        Duration::from_secs(60),
        || {
            let calls = rx.calls("ok/secret-load");
            async move { (!calls.is_empty()).then_some(()) }
        },
    )
    .await;
    let call = &rx.calls("ok/secret-load")[0];
    assert_eq!(call.headers["x-api-key"], "s3cr3t");
    assert_eq!(call.body["type"], "rollout");
    let w = weight(&canary(&env, "kill").await);
    assert!(w == 20 || w == 50, "canary weight {w}");
    // The rollback gate opens: rolled back at the next check.
    rx.open("abort");
    let c = wait_phase(&env, &op, "kill", Phase::Failed, Duration::from_secs(30)).await;
    let s = c.status.unwrap();
    assert_eq!(s.canary_weight, 0);
    assert!(
        s.history[0]
            .reason
            .contains("rollback webhook abort-switch answered 2xx"),
        "{}",
        s.history[0].reason
    );

    // Outside the allow-list: Invalid, naming the field and the fix; never called.
    let c = wait_for(
        "the outside Canary invalid",
        Duration::from_secs(30),
        || async {
            let c = canary(&env, "outside").await;
            c.status
                .as_ref()
                .and_then(|s| serin::api::find_condition(&s.conditions, serin::api::INVALID))
                .filter(|c| c.status == serin::api::ConditionStatus::True)
                .map(|c| c.message.clone())
        },
    )
    .await;
    assert!(c.contains("spec.webhooks[0].url"), "{c}");
    assert!(c.contains("--allow-address"), "{c}");
    assert!(
        !op.log().contains("s3cr3t"),
        "a Secret's header value in the log"
    );
}
