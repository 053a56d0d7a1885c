//! The Gateway API router against this run's API server (the real kube-apiserver, which
//! evaluates the CRD's CEL rules, when `SERIN_TEST_KUBECONFIG` is set, else the in-memory
//! one) with the genuine HTTPRoute CRD (standard channel v1.6.1). Each test has a
//! namespace of its own.

mod router_support;
mod support;

use serde_json::{Value, json};
use serin::api::Canary;
use serin::arms::Weights;
use serin::router::{HttpRouteRouter, Router, RouterError, WriteOutcome};

use router_support::proxy::Proxy;
use router_support::{Cluster, canary_yaml, example_in, traffic, workload, writes};

const GW: &str = "gateway.networking.k8s.io/v1";
/// The namespace of the example files, replaced by the test's.
const EXAMPLE_NS: &str = "appmesh-demo";

struct Env {
    cluster: Cluster,
    proxy: Proxy,
    router: HttpRouteRouter,
}

impl Env {
    /// The test's namespace.
    fn ns(&self) -> &str {
        &self.cluster.ns
    }
}

async fn env() -> Option<Env> {
    let cluster = Cluster::start("router-gateway-api").await?;
    let (proxy, client) = cluster.proxy().await;
    Some(Env {
        cluster,
        proxy,
        router: HttpRouteRouter::new(client),
    })
}

/// The documents of an example file, moved into the test's namespace.
fn example(env: &Env, path: &str) -> Vec<Value> {
    example_in(path, EXAMPLE_NS, env.ns())
}

/// The Canary of examples/gateway-api.yaml (workload mode, colorgateway).
async fn example_canary(env: &Env) -> Canary {
    let doc = example(env, "examples/gateway-api.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Canary")
        .expect("Canary");
    env.cluster
        .canary(&serde_norway::to_string(&doc).expect("yaml"))
        .await
}

async fn route(env: &Env, name: &str) -> Value {
    env.cluster
        .get(GW, "HTTPRoute", env.ns(), name)
        .await
        .expect("route")
}

fn http_route(env: &Env, rules: Value) -> Value {
    json!({"apiVersion": GW, "kind": "HTTPRoute",
        "metadata": {"name": "colorteller", "namespace": env.ns()},
        "spec": {"parentRefs": [{"name": "public-gateway", "namespace": "gateway-system"}], "rules": rules}})
}

fn backend(name: &str, weight: Option<u32>) -> Value {
    let mut b = json!({"name": name, "port": 9080});
    if let Some(w) = weight {
        b["weight"] = json!(w);
    }
    b
}

async fn traffic_canary(env: &Env, rule: Option<&str>) -> Canary {
    let rule = rule
        .map(|r| format!("\n        rule: {r}"))
        .unwrap_or_default();
    let router =
        format!("  router:\n    gatewayApi:\n      httpRoute:\n        name: colorteller{rule}");
    env.cluster
        .canary(&canary_yaml(
            "colorteller",
            env.ns(),
            &traffic("colorteller-white", "colorteller-blue"),
            &router,
        ))
        .await
}

/// The example HTTPRoute (workload mode): the rule with both Services is shifted, the
/// testers' header rule is untouched, the result is valid against the schema, and a
/// repeated write makes no API call.
#[tokio::test]
async fn example_http_route_shifts_the_split_rule() {
    let Some(env) = env().await else { return };
    for doc in example(&env, "examples/routing/gateway-api-httproute.yaml") {
        env.cluster.create(doc).await;
    }
    let before = route(&env, "colorgateway").await;
    let canary = example_canary(&env).await;
    env.router.prepare(&canary).await.expect("prepare");
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::STABLE
    );
    let w20 = Weights::with_canary(20);
    assert_eq!(
        env.router
            .set_weights(&canary, Weights::STABLE, w20)
            .await
            .expect("set"),
        WriteOutcome::Written
    );
    let after = route(&env, "colorgateway").await;
    let mut expected = before["spec"].clone();
    expected["rules"][1]["backendRefs"][0]["weight"] = json!(80);
    expected["rules"][1]["backendRefs"][1]["weight"] = json!(20);
    assert_eq!(after["spec"], expected);
    assert_eq!(env.cluster.unknown_fields(&after), Vec::<String>::new());

    let rev = after["metadata"]["resourceVersion"].clone();
    env.proxy.clear();
    assert_eq!(
        env.router
            .set_weights(&canary, Weights::STABLE, w20)
            .await
            .expect("again"),
        WriteOutcome::Unchanged
    );
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
    assert_eq!(
        route(&env, "colorgateway").await["metadata"]["resourceVersion"],
        rev
    );
}

/// Serin does not create HTTPRoutes: a missing one is NotFound with the YAML to apply, and
/// prepare writes nothing.
#[tokio::test]
async fn missing_http_route_is_not_found_with_a_hint() {
    let Some(env) = env().await else { return };
    let canary = example_canary(&env).await;
    let err = env.router.prepare(&canary).await.expect_err("missing");
    assert!(
        matches!(&err, RouterError::NotFound { kind: "HTTPRoute", hint, .. }
            if hint.contains("parentRefs") && hint.contains("colorgateway-canary")),
        "{err}"
    );
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
}

/// Weights that the server defaulted (1 each) read as 50/50, and traffic mode matches
/// `spec.backends` as Service names.
#[tokio::test]
async fn default_weights_and_traffic_mode() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(http_route(
            &env,
            json!([{"backendRefs": [
                backend("colorteller-white", None),
                backend("colorteller-blue", None)
            ]}]),
        ))
        .await;
    let canary = traffic_canary(&env, None).await;
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::with_canary(50)
    );
    env.router
        .set_weights(&canary, Weights::with_canary(50), Weights::with_canary(100))
        .await
        .expect("set");
    let r = route(&env, "colorteller").await;
    assert_eq!(r["spec"]["rules"][0]["backendRefs"][0]["weight"], 0);
    assert_eq!(r["spec"]["rules"][0]["backendRefs"][1]["weight"], 100);
}

/// A named rule that does not exist is NotFound; a named rule without the canary is
/// Unroutable; a backend in another namespace is not the canary.
#[tokio::test]
async fn named_rules_and_foreign_backends() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(http_route(
            &env,
            json!([{"name": "main", "backendRefs": [
                backend("colorteller-white", Some(100)),
                {"name": "colorteller-blue", "namespace": "elsewhere", "port": 9080, "weight": 0}
            ]}]),
        ))
        .await;
    let canary = traffic_canary(&env, Some("nope")).await;
    let err = env.router.weights(&canary).await.expect_err("no such rule");
    assert!(
        matches!(&err, RouterError::NotFound { kind: "HTTPRoute rule", name, .. } if name == "colorteller/nope"),
        "{err}"
    );
    let api: kube::Api<Canary> = kube::Api::namespaced(env.cluster.client.clone(), env.ns());
    api.delete("colorteller", &Default::default())
        .await
        .expect("delete");
    let canary = traffic_canary(&env, Some("main")).await;
    let err = env
        .router
        .weights(&canary)
        .await
        .expect_err("foreign canary");
    let missing = format!(
        "colorteller-blue (namespace {}) is not among them",
        env.ns()
    );
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains(&missing)),
        "{err}"
    );
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
}

/// A backend Serin does not know that carries traffic makes the rule Unroutable; hand
/// edits are reported as WeightsChanged.
#[tokio::test]
async fn strangers_and_hand_edits() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(http_route(
            &env,
            json!([{"backendRefs": [
                backend("colorteller-white", Some(70)),
                backend("colorteller-blue", Some(30)),
                backend("colorteller-red", Some(0))
            ]}]),
        ))
        .await;
    let canary = traffic_canary(&env, None).await;
    let err = env
        .router
        .set_weights(&canary, Weights::with_canary(20), Weights::with_canary(50))
        .await
        .expect_err("changed");
    assert!(
        matches!(
            err,
            RouterError::WeightsChanged {
                found_canary: 30,
                expected_canary: 20,
                ..
            }
        ),
        "{err}"
    );
    env.cluster
        .edit(GW, "HTTPRoute", env.ns(), "colorteller", |o| {
            o["spec"]["rules"][0]["backendRefs"][2]["weight"] = json!(10);
        })
        .await;
    let err = env.router.weights(&canary).await.expect_err("stranger");
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains("Service colorteller-red")),
        "{err}"
    );
}

/// Every rule that references both Services gets the same split in one patch.
#[tokio::test]
async fn several_rules_move_together() {
    let Some(env) = env().await else { return };
    let pair = |w: u32| {
        json!([
            backend("colorgateway-primary", Some(100 - w)),
            backend("colorgateway-canary", Some(w))
        ])
    };
    let mut r = http_route(
        &env,
        json!([
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}], "backendRefs": pair(0)},
            {"backendRefs": pair(0)}
        ]),
    );
    r["metadata"]["name"] = json!("colorgateway");
    env.cluster.create(r).await;
    let canary = env
        .cluster
        .canary(&canary_yaml(
            "colorgateway",
            env.ns(),
            &workload("colorgateway"),
            "  router:\n    gatewayApi:\n      httpRoute:\n        name: colorgateway",
        ))
        .await;
    env.proxy.clear();
    env.router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect("set");
    assert_eq!(env.proxy.requests_of("PATCH").len(), 1);
    let r = route(&env, "colorgateway").await;
    for rule in 0..2 {
        let refs = &r["spec"]["rules"][rule]["backendRefs"];
        assert_eq!(
            (refs[0]["weight"].clone(), refs[1]["weight"].clone()),
            (json!(80), json!(20))
        );
    }
}
