//! No credential ever leaves Serin except in the request it authenticates.
//!
//! A workload Canary whose Prometheus provider authenticates with a bearer token from a
//! Secret (and a basic-auth Secret after that) rolls out with the real operator (the
//! chart's ServiceAccount) and the real Prometheus; the token is also broken once, so the
//! error paths run too. Afterwards the token and the password are searched for in
//! everything Serin writes or shows: its log (at debug level), every Event in the
//! namespace, the Canary as stored (status included), and its /metrics.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use serin::api::{Canary, Phase};
use serin::demo::traffic::Behaviour;
use support::e2e::*;

const TOKEN: &str = "tok-3f9c1e7d-never-shown";
const PASSWORD: &str = "pw-81b2a6c4-never-shown";

async fn put_secret(env: &Env, name: &str, data: &[(&str, &str)]) {
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let secret = Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    };
    let _ = api.delete(name, &Default::default()).await;
    support::wait_for("the old Secret to go", Duration::from_secs(10), || {
        let api = api.clone();
        async move { api.get_opt(name).await.unwrap().is_none().then_some(()) }
    })
    .await;
    api.create(&PostParams::default(), &secret).await.unwrap();
}

/// Points the Canary's metric at Secret `secret` and adds a header.
async fn use_secret(env: &Env, secret: &str) {
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    let mut c = api.get("podinfo").await.unwrap();
    let mut metrics = serde_json::to_value(&c.spec.analysis.metrics).unwrap();
    for m in metrics.as_array_mut().unwrap() {
        m["provider"]["prometheus"]["secretRef"] = json!({"name": secret});
        m["provider"]["prometheus"]["headers"] =
            json!([{"name": "X-Scope-OrgID", "value": "team-a"}]);
    }
    c.spec.analysis.metrics = serde_json::from_value(metrics).unwrap();
    c.metadata.managed_fields = None;
    api.replace("podinfo", &PostParams::default(), &c)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_logs_events_status_or_metrics() {
    let Some((env, _weights)) = podinfo_env_real("no-leaks", Behaviour::HEALTHY).await else {
        return;
    };
    // A broken Secret first (no `token` or `username` key): the checks fail on auth.
    put_secret(&env, "prom-auth", &[("tokn", TOKEN)]).await;
    use_secret(&env, "prom-auth").await;
    let op = ready_operator(&env, "podinfo").await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Failed,
        Duration::from_secs(120),
    )
    .await;
    // Then a bearer token that works, and a promotion.
    put_secret(&env, "prom-auth", &[("token", TOKEN)]).await;
    set_image(&env, "podinfo", "podinfo:3").await;
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    // Then basic auth, and another promotion.
    put_secret(
        &env,
        "prom-basic",
        &[("username", "serin"), ("password", PASSWORD)],
    )
    .await;
    use_secret(&env, "prom-basic").await;
    set_image(&env, "podinfo", "podinfo:4").await;
    let canaries: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    let third = support::wait_for(
        "the third rollout to be promoted",
        Duration::from_secs(120),
        || {
            let canaries = canaries.clone();
            async move {
                let status = canaries.get("podinfo").await.ok()?.status?;
                (status.history.len() == 3 && status.phase == Phase::Succeeded).then_some(status)
            }
        },
    )
    .await;
    let results: Vec<String> = third
        .history
        .iter()
        .map(|h| h.result.as_str().to_string())
        .collect();
    assert_eq!(
        results,
        vec!["Promoted", "Promoted", "RolledBack"],
        "{:#?}",
        third.history
    );

    let mut seen: Vec<(String, String)> = Vec::new();
    seen.push(("operator log".into(), op.log()));
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    for e in events.list(&ListParams::default()).await.unwrap() {
        seen.push((
            format!("Event {}", e.metadata.name.clone().unwrap_or_default()),
            serde_json::to_string(&e).unwrap(),
        ));
    }
    seen.push((
        "Canary podinfo".into(),
        serde_json::to_string(&canaries.get("podinfo").await.unwrap()).unwrap(),
    ));
    let (code, metrics) = operator_http(&op, "/metrics").await;
    assert_eq!(code, 200);
    seen.push(("operator /metrics".into(), metrics));

    // The run did use the Secrets: the auth failure is visible, without the value.
    assert!(
        seen.iter()
            .any(|(_, text)| text.contains("prom-auth") && text.contains("token")),
        "no trace of the auth failure anywhere"
    );
    for (what, text) in &seen {
        for secret in [TOKEN, PASSWORD] {
            assert!(
                !text.contains(secret),
                "{what} shows a credential: {secret}"
            );
        }
    }
}
