//! The Gloo Edge router against this run's API server (the real kube-apiserver when
//! `SERIN_TEST_KUBECONFIG` is set, else the in-memory one) with the genuine Gloo CRDs:
//! UpstreamGroup destinations and VirtualService/RouteTable multi destinations. Each test
//! has a namespace of its own; the Gloo objects and the Canary live there, and the
//! discovered upstream names embed it (`<namespace>-<service>-<port>`).

mod router_support;
mod support;

use serde_json::{Value, json};
use serin::api::Canary;
use serin::arms::Weights;
use serin::router::{GlooEdgeRouter, Router, RouterError, WriteOutcome};

use router_support::proxy::Proxy;
use router_support::{Cluster, canary_yaml, example_in, traffic, writes};

const GLOO: &str = "gloo.solo.io/v1";
const GW: &str = "gateway.solo.io/v1";
/// The namespace of the example files, replaced by the test's.
const EXAMPLE_NS: &str = "gloo-system";

struct Env {
    cluster: Cluster,
    proxy: Proxy,
    router: GlooEdgeRouter,
}

impl Env {
    /// The test's namespace.
    fn ns(&self) -> &str {
        &self.cluster.ns
    }

    /// Gloo discovery's name for the upstream of Service `service` (port 9080) in the
    /// test's namespace.
    fn discovered(&self, service: &str) -> String {
        format!("{}-{service}-9080", self.ns())
    }
}

async fn env() -> Option<Env> {
    let cluster = Cluster::start("router-gloo").await?;
    let (proxy, client) = cluster.proxy().await;
    Some(Env {
        cluster,
        proxy,
        router: GlooEdgeRouter::new(client),
    })
}

/// The documents of an example file, moved into the test's namespace.
fn example(env: &Env, path: &str) -> Vec<Value> {
    example_in(path, EXAMPLE_NS, env.ns())
}

/// The Canary of examples/gloo-upstreamgroup.yaml.
async fn example_canary(env: &Env) -> Canary {
    let doc = example(env, "examples/gloo-upstreamgroup.yaml")
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
            env.ns(),
            &traffic("colorgateway", "colorgatewayv2"),
            &router,
        ))
        .await
}

fn group(env: &Env, destinations: Value) -> Value {
    json!({"apiVersion": GLOO, "kind": "UpstreamGroup",
        "metadata": {"name": "upstreamgroup-gateway", "namespace": env.ns()},
        "spec": {"destinations": destinations}})
}

fn upstream(env: &Env, name: &str, weight: u32) -> Value {
    json!({"destination": {"upstream": {"name": name, "namespace": env.ns()}}, "weight": weight})
}

async fn destinations(env: &Env) -> Value {
    env.cluster
        .get(GLOO, "UpstreamGroup", env.ns(), "upstreamgroup-gateway")
        .await
        .expect("group")["spec"]["destinations"]
        .clone()
}

/// The seed's UpstreamGroup: upstreams discovered in another namespace are found by their
/// `-<service>-<port>` suffix, weights are written as percentages, valid against the schema,
/// and a repeated write makes no API call.
#[tokio::test]
async fn upstream_group_example_shifts_weights() {
    let Some(env) = env().await else { return };
    for doc in example(&env, "examples/routing/gloo-upstreamgroup.yaml") {
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
        .get(GLOO, "UpstreamGroup", env.ns(), "upstreamgroup-gateway")
        .await
        .expect("group");
    assert_eq!(env.cluster.unknown_fields(&group), Vec::<String>::new());
    let rev = group["metadata"]["resourceVersion"].clone();
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
        json!(
            env.cluster
                .resource_version(GLOO, "UpstreamGroup", env.ns(), "upstreamgroup-gateway")
                .await
        ),
        rev
    );
}

/// Relative weights read back as rounded percentages (3:1 is 25%, 2:1 is 33%), and a
/// write from them replaces both with percentages.
#[tokio::test]
async fn relative_weights_are_normalised() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(group(
            &env,
            json!([
                upstream(&env, &env.discovered("colorgateway"), 3),
                upstream(&env, &env.discovered("colorgatewayv2"), 1)
            ]),
        ))
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
        .edit(
            GLOO,
            "UpstreamGroup",
            env.ns(),
            "upstreamgroup-gateway",
            |o| {
                o["spec"]["destinations"][0]["weight"] = json!(2);
                o["spec"]["destinations"][1]["weight"] = json!(1);
            },
        )
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
        .create(group(
            &env,
            json!([
                upstream(&env, "white", 100),
                {"destination": {"upstream": {"name": "blue", "namespace": env.ns()}}},
                upstream(&env, "parked", 0)
            ]),
        ))
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
        .edit(
            GLOO,
            "UpstreamGroup",
            env.ns(),
            "upstreamgroup-gateway",
            |o| {
                o["spec"]["destinations"][2]["weight"] = json!(5);
            },
        )
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
        .create(group(
            &env,
            json!([upstream(&env, &env.discovered("colorgateway"), 100)]),
        ))
        .await;
    let err = env.router.prepare(&canary).await.expect_err("no canary");
    let missing = format!("{} is not among them", env.discovered("colorgatewayv2"));
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains(&missing)),
        "{err}"
    );
    env.cluster
        .edit(
            GLOO,
            "UpstreamGroup",
            env.ns(),
            "upstreamgroup-gateway",
            |o| {
                o["spec"]["destinations"] = json!([
                    upstream(&env, "a-colorgateway-9080", 50),
                    upstream(&env, "b-colorgateway-9080", 50),
                    upstream(&env, "a-colorgatewayv2-9080", 0)
                ]);
            },
        )
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
        .create(group(
            &env,
            json!([
                upstream(&env, &env.discovered("colorgateway"), 70),
                upstream(&env, &env.discovered("colorgatewayv2"), 30)
            ]),
        ))
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
    let ns = env.ns();
    let (primary, canary) = (
        env.discovered("colorgateway"),
        env.discovered("colorgatewayv2"),
    );
    let multi = |w1: u32, w2: u32| {
        json!({"destinations": [
            {"destination": {"upstream": {"name": primary, "namespace": ns}}, "weight": w1},
            {"destination": {"upstream": {"name": canary, "namespace": ns}}, "weight": w2}
        ]})
    };
    let before = env
        .cluster
        .create(json!({"apiVersion": GW, "kind": "VirtualService",
            "metadata": {"name": "colorgateway", "namespace": ns},
            "spec": {"virtualHost": {"domains": ["*"], "routes": [
                {"matchers": [{"prefix": "/", "headers": [{"name": "x-canary", "value": "always"}]}],
                 "routeAction": {"single": {"upstream": {"name": canary, "namespace": ns}}}},
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
        .get(GW, "VirtualService", ns, "colorgateway")
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
            "metadata": {"name": "colorgateway-routes", "namespace": env.ns()},
            "spec": {"routes": [
                {"matchers": [{"prefix": "/api"}], "routeAction": {"multi": {"destinations": [
                    {"destination": {"kube": {"ref": {"name": "colorgateway", "namespace": env.ns()}, "port": 9080}}, "weight": 1},
                    {"destination": {"kube": {"ref": {"name": "colorgatewayv2", "namespace": env.ns()}, "port": 9080}}, "weight": 1}
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
        .get(GW, "RouteTable", env.ns(), "colorgateway-routes")
        .await
        .expect("rt");
    let d = &rt["spec"]["routes"][0]["routeAction"]["multi"]["destinations"];
    assert_eq!(
        (d[0]["weight"].clone(), d[1]["weight"].clone()),
        (json!(0), json!(100))
    );
    assert_eq!(env.cluster.unknown_fields(&rt), Vec::<String>::new());

    env.cluster
        .edit(GW, "RouteTable", env.ns(), "colorgateway-routes", |o| {
            o["spec"]["routes"][0]["routeAction"] =
                json!({"single": {"upstream": {"name": "x", "namespace": env.ns()}}});
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
