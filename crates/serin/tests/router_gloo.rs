//! The Gloo Edge router against the embedded API server with the genuine Gloo CRDs:
//! UpstreamGroup destinations and VirtualService/RouteTable multi destinations.

mod router_support;

use std::path::Path;

use kube::Client;
use serde_json::{Value, json};
use serin::api::Canary;
use serin::arms::Weights;
use serin::router::{GlooEdgeRouter, Router, RouterError, WriteOutcome};

use router_support::proxy::Proxy;
use router_support::{Cluster, canary_yaml, traffic, yaml_docs};

const GLOO: &str = "gloo.solo.io/v1";
const GW: &str = "gateway.solo.io/v1";
const NS: &str = "gloo-system";

struct Env {
    cluster: Cluster,
    proxy: Proxy,
    router: GlooEdgeRouter,
}

async fn env() -> Option<Env> {
    let cluster = Cluster::start().await?;
    cluster.namespace(NS).await;
    let proxy = Proxy::start(&cluster.server.url(), None).await;
    let client =
        Client::try_from(kube::Config::new(proxy.url.parse().expect("url"))).expect("client");
    Some(Env {
        cluster,
        proxy,
        router: GlooEdgeRouter::new(client),
    })
}

fn example(path: &str) -> Vec<Value> {
    yaml_docs(&Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(path))
}

/// The Canary of examples/gloo-upstreamgroup.yaml.
async fn example_canary(env: &Env) -> Canary {
    let doc = example("examples/gloo-upstreamgroup.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Canary")
        .expect("Canary");
    env.cluster
        .canary(&serde_norway::to_string(&doc).expect("yaml"))
        .await
}

async fn canary_with(env: &Env, name: &str, gloo: &str) -> Canary {
    let router = format!("  router:\n    gloo:\n{gloo}");
    env.cluster
        .canary(&canary_yaml(
            name,
            NS,
            &traffic("colorgateway", "colorgatewayv2"),
            &router,
        ))
        .await
}

fn group(destinations: Value) -> Value {
    json!({"apiVersion": GLOO, "kind": "UpstreamGroup",
        "metadata": {"name": "upstreamgroup-gateway", "namespace": NS},
        "spec": {"destinations": destinations}})
}

fn upstream(name: &str, weight: u32) -> Value {
    json!({"destination": {"upstream": {"name": name, "namespace": NS}}, "weight": weight})
}

async fn destinations(env: &Env) -> Value {
    env.cluster
        .get(GLOO, "UpstreamGroup", NS, "upstreamgroup-gateway")
        .await
        .expect("group")["spec"]["destinations"]
        .clone()
}

fn writes(proxy: &Proxy) -> Vec<String> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET "))
        .collect()
}

/// The seed's UpstreamGroup: upstreams discovered in another namespace are found by their
/// `-<service>-<port>` suffix, weights are written as percentages, valid against the schema,
/// and a repeated write makes no API call.
#[tokio::test]
async fn upstream_group_example_shifts_weights() {
    let Some(env) = env().await else { return };
    for doc in example("examples/routing/gloo-upstreamgroup.yaml") {
        env.cluster.create(doc).await;
    }
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
    let d = destinations(&env).await;
    assert_eq!(
        (d[0]["weight"].clone(), d[1]["weight"].clone()),
        (json!(80), json!(20))
    );
    assert_eq!(
        d[0]["destination"]["upstream"]["name"],
        "appmesh-demo-colorgateway-9080"
    );
    let group = env
        .cluster
        .get(GLOO, "UpstreamGroup", NS, "upstreamgroup-gateway")
        .await
        .expect("group");
    assert_eq!(env.cluster.unknown_fields(&group), Vec::<String>::new());
    let rev = env.cluster.revision();
    env.proxy.clear();
    assert_eq!(
        env.router
            .set_weights(&canary, Weights::STABLE, w20)
            .await
            .expect("again"),
        WriteOutcome::Unchanged
    );
    assert_eq!(env.cluster.revision(), rev);
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
}

/// Relative weights read back as rounded percentages (3:1 is 25%, 2:1 is 33%), and a
/// write from them replaces both with percentages.
#[tokio::test]
async fn relative_weights_are_normalised() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(group(json!([
            upstream("gloo-system-colorgateway-9080", 3),
            upstream("gloo-system-colorgatewayv2-9080", 1)
        ])))
        .await;
    let canary = canary_with(
        &env,
        "colorgateway",
        "      upstreamGroup:\n        name: upstreamgroup-gateway",
    )
    .await;
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::with_canary(25)
    );
    env.router
        .set_weights(&canary, Weights::with_canary(25), Weights::with_canary(50))
        .await
        .expect("set");
    let d = destinations(&env).await;
    assert_eq!(
        (d[0]["weight"].clone(), d[1]["weight"].clone()),
        (json!(50), json!(50))
    );
    env.cluster
        .edit(GLOO, "UpstreamGroup", NS, "upstreamgroup-gateway", |o| {
            o["spec"]["destinations"][0]["weight"] = json!(2);
            o["spec"]["destinations"][1]["weight"] = json!(1);
        })
        .await;
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::with_canary(33)
    );
}

/// `upstreams` names the upstreams exactly; a missing weight counts as 0, and a destination
/// Serin does not know is tolerated only with weight 0.
#[tokio::test]
async fn explicit_upstreams_and_unknown_destinations() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(group(json!([
            upstream("white", 100),
            {"destination": {"upstream": {"name": "blue", "namespace": NS}}},
            upstream("parked", 0)
        ])))
        .await;
    let canary = canary_with(
        &env,
        "colorgateway",
        "      upstreamGroup:\n        name: upstreamgroup-gateway\n      upstreams:\n        primary: white\n        canary: blue",
    )
    .await;
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::STABLE
    );
    env.router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(10))
        .await
        .expect("set");
    let d = destinations(&env).await;
    assert_eq!(d[1]["weight"], 10);
    assert_eq!(d[2]["weight"], 0, "the parked destination is untouched");

    env.cluster
        .edit(GLOO, "UpstreamGroup", NS, "upstreamgroup-gateway", |o| {
            o["spec"]["destinations"][2]["weight"] = json!(5);
        })
        .await;
    let err = env
        .router
        .weights(&canary)
        .await
        .expect_err("busy stranger");
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains("upstream parked")),
        "{err}"
    );
}

/// A missing UpstreamGroup is NotFound; an upstream that is not among the destinations,
/// and two destinations matching the same arm, are Unroutable; nothing is written.
#[tokio::test]
async fn missing_and_ambiguous_upstreams() {
    let Some(env) = env().await else { return };
    let canary = canary_with(
        &env,
        "colorgateway",
        "      upstreamGroup:\n        name: upstreamgroup-gateway",
    )
    .await;
    let err = env
        .router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect_err("missing");
    assert!(
        matches!(
            err,
            RouterError::NotFound {
                kind: "UpstreamGroup",
                ..
            }
        ),
        "{err}"
    );
    env.cluster
        .create(group(json!([upstream(
            "gloo-system-colorgateway-9080",
            100
        )])))
        .await;
    let err = env.router.prepare(&canary).await.expect_err("no canary");
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains("gloo-system-colorgatewayv2-9080 is not among them")),
        "{err}"
    );
    env.cluster
        .edit(GLOO, "UpstreamGroup", NS, "upstreamgroup-gateway", |o| {
            o["spec"]["destinations"] = json!([
                upstream("a-colorgateway-9080", 50),
                upstream("b-colorgateway-9080", 50),
                upstream("a-colorgatewayv2-9080", 0)
            ]);
        })
        .await;
    let err = env.router.weights(&canary).await.expect_err("ambiguous");
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains("primary 2 times")),
        "{err}"
    );
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
}

/// Hand-edited weights are reported as WeightsChanged and left alone.
#[tokio::test]
async fn hand_edited_weights_are_reported() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(group(json!([
            upstream("gloo-system-colorgateway-9080", 70),
            upstream("gloo-system-colorgatewayv2-9080", 30)
        ])))
        .await;
    let canary = canary_with(
        &env,
        "colorgateway",
        "      upstreamGroup:\n        name: upstreamgroup-gateway",
    )
    .await;
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
    let d = destinations(&env).await;
    assert_eq!(d[1]["weight"], 30);
}

/// A VirtualService route with `routeAction.multi.destinations` is shifted; the header
/// route that pins testers to the canary and the route matchers stay as they were.
#[tokio::test]
async fn virtual_service_multi_destinations() {
    let Some(env) = env().await else { return };
    let multi = |w1: u32, w2: u32| {
        json!({"destinations": [
            {"destination": {"upstream": {"name": "gloo-system-colorgateway-9080", "namespace": NS}}, "weight": w1},
            {"destination": {"upstream": {"name": "gloo-system-colorgatewayv2-9080", "namespace": NS}}, "weight": w2}
        ]})
    };
    let before = env
        .cluster
        .create(json!({"apiVersion": GW, "kind": "VirtualService",
            "metadata": {"name": "colorgateway", "namespace": NS},
            "spec": {"virtualHost": {"domains": ["*"], "routes": [
                {"matchers": [{"prefix": "/", "headers": [{"name": "x-canary", "value": "always"}]}],
                 "routeAction": {"single": {"upstream": {"name": "gloo-system-colorgatewayv2-9080", "namespace": NS}}}},
                {"name": "split", "matchers": [{"prefix": "/"}], "routeAction": {"multi": multi(100, 0)}}
            ]}}}))
        .await;
    let canary = canary_with(
        &env,
        "colorgateway",
        "      virtualService:\n        name: colorgateway",
    )
    .await;
    env.router.prepare(&canary).await.expect("prepare");
    env.router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(50))
        .await
        .expect("set");
    let after = env
        .cluster
        .get(GW, "VirtualService", NS, "colorgateway")
        .await
        .expect("vs");
    let mut expected = before["spec"].clone();
    expected["virtualHost"]["routes"][1]["routeAction"]["multi"] = multi(50, 50);
    assert_eq!(after["spec"], expected);
    assert_eq!(env.cluster.unknown_fields(&after), Vec::<String>::new());
}

/// A RouteTable route with multi destinations is shifted the same way; a RouteTable with
/// no such route is Unroutable.
#[tokio::test]
async fn route_table_multi_destinations() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(json!({"apiVersion": GW, "kind": "RouteTable",
            "metadata": {"name": "colorgateway-routes", "namespace": NS},
            "spec": {"routes": [
                {"matchers": [{"prefix": "/api"}], "routeAction": {"multi": {"destinations": [
                    {"destination": {"kube": {"ref": {"name": "colorgateway", "namespace": NS}, "port": 9080}}, "weight": 1},
                    {"destination": {"kube": {"ref": {"name": "colorgatewayv2", "namespace": NS}, "port": 9080}}, "weight": 1}
                ]}}}
            ]}}))
        .await;
    let canary = canary_with(
        &env,
        "colorgateway",
        "      routeTable:\n        name: colorgateway-routes",
    )
    .await;
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::with_canary(50)
    );
    env.router
        .set_weights(&canary, Weights::with_canary(50), Weights::with_canary(100))
        .await
        .expect("set");
    let rt = env
        .cluster
        .get(GW, "RouteTable", NS, "colorgateway-routes")
        .await
        .expect("rt");
    let d = &rt["spec"]["routes"][0]["routeAction"]["multi"]["destinations"];
    assert_eq!(
        (d[0]["weight"].clone(), d[1]["weight"].clone()),
        (json!(0), json!(100))
    );
    assert_eq!(env.cluster.unknown_fields(&rt), Vec::<String>::new());

    env.cluster
        .edit(GW, "RouteTable", NS, "colorgateway-routes", |o| {
            o["spec"]["routes"][0]["routeAction"] =
                json!({"single": {"upstream": {"name": "x", "namespace": NS}}});
        })
        .await;
    let err = env.router.weights(&canary).await.expect_err("no multi");
    assert!(
        matches!(
            err,
            RouterError::Unroutable {
                kind: "RouteTable",
                ..
            }
        ),
        "{err}"
    );
}
