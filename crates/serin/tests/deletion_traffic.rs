//! Deleting a traffic-mode Canary (`spec.backends`) with the real `serin run`, for every
//! router whose weights live in a Kubernetes object: the App Mesh VirtualRouter
//! (`router.appMesh.virtualRouter`), the Gloo UpstreamGroup (`router.gloo.upstreamGroup`) and
//! the Gateway API HTTPRoute (`router.gatewayApi.httpRoute`). (App Mesh through the AWS API:
//! finalizer_e2e.rs; workload mode: real_cluster.rs.)
//!
//! The routing objects are the ones of `examples/routing/`, moved into the test's namespace.
//! The operator runs on this run's API server (under `scripts/test` the real control plane,
//! as the chart's ServiceAccount with the chart's RBAC). Each Canary is caught mid-rollout:
//! Serin has put its finalizer on, initialised it and written the first step (80/20), and
//! then the weights are set to 50/50 by hand (a JSON Patch), as a later step would leave
//! them. Then the Canary is deleted, and the file proves that:
//!
//! - with `deletionPolicy: Revert` (the default) the Canary goes away only after all traffic
//!   is on `backends.primary` again (100/0), with a `Reverted` Event, on every router, and
//!   nothing else in the routing object changes;
//! - with `deletionPolicy: Orphan` the Canary goes away and the weights stay 50/50, with an
//!   `Orphaned` Event;
//! - when the routing object was deleted before the Canary, the deletion does not wedge: the
//!   Canary goes away with a Warning `RevertImpossible` Event that says why, on every router.
//!
//! One operator per test serves all of its Canaries (one per router, in the test's namespace).
//! The analysis interval is long (10m) and the metric is Prometheus' `vector(0)`, so no check
//! is ever due: nothing but the deletion moves the weights after the first step.

mod router_support;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};
use serin::api::{Canary, Phase};
use serin::controller::FINALIZER;

use router_support::example_in;
use support::e2e::*;
use support::wait_for;

/// The routers whose weights live in a Kubernetes object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AppMesh,
    Gloo,
    GatewayApi,
}

const ALL: [Kind; 3] = [Kind::AppMesh, Kind::Gloo, Kind::GatewayApi];

impl Kind {
    /// The Canary's name (one Canary per router in a test's namespace).
    fn canary(self) -> &'static str {
        match self {
            Kind::AppMesh => "colorteller",
            Kind::Gloo => "colorgateway-gloo",
            Kind::GatewayApi => "colorgateway-gateway-api",
        }
    }

    /// `spec.backends`: (primary, canary).
    fn backends(self) -> (&'static str, &'static str) {
        match self {
            Kind::AppMesh => ("colorteller-white", "colorteller-blue"),
            // Gloo discovery's upstreams `appmesh-demo-<service>-9080` of the example, found
            // by their `-<service>-<port>` suffix.
            Kind::Gloo => ("colorgateway", "colorgatewayv2"),
            Kind::GatewayApi => ("colorgateway-primary", "colorgateway-canary"),
        }
    }

    /// `spec.router`.
    fn router(self) -> Value {
        match self {
            Kind::AppMesh => json!({"appMesh": {
                "mesh": "color-mesh",
                "virtualRouter": "colorteller-router",
                "route": "colorteller-route"
            }}),
            Kind::Gloo => json!({"gloo": {"upstreamGroup": {"name": "upstreamgroup-gateway"}}}),
            Kind::GatewayApi => json!({"gatewayApi": {"httpRoute": {"name": "colorgateway"}}}),
        }
    }

    /// The example file with the routing object, its kind and the namespace it names.
    fn example(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::AppMesh => (
                "examples/routing/appmesh-colorapp.yaml",
                "VirtualRouter",
                "appmesh-demo",
            ),
            Kind::Gloo => (
                "examples/routing/gloo-upstreamgroup.yaml",
                "UpstreamGroup",
                "gloo-system",
            ),
            Kind::GatewayApi => (
                "examples/routing/gateway-api-httproute.yaml",
                "HTTPRoute",
                "appmesh-demo",
            ),
        }
    }

    /// The routing object's name.
    fn object(self) -> &'static str {
        match self {
            Kind::AppMesh => "colorteller-router",
            Kind::Gloo => "upstreamgroup-gateway",
            Kind::GatewayApi => "colorgateway",
        }
    }

    fn resource(self) -> ApiResource {
        match self {
            Kind::AppMesh => virtual_routers(),
            Kind::Gloo => gvk("gloo.solo.io", "v1", "UpstreamGroup", "upstreamgroups"),
            Kind::GatewayApi => gvk("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
        }
    }

    /// The list whose entries 0 (primary) and 1 (canary) carry the weights Serin shifts.
    fn weights_at(self) -> &'static str {
        match self {
            // The route "colorteller-route" (the other route, "colorteller-red", stays).
            Kind::AppMesh => "/spec/routes/0/httpRoute/action/weightedTargets",
            Kind::Gloo => "/spec/destinations",
            // The rule "split" (the testers' header rule, 0, stays).
            Kind::GatewayApi => "/spec/rules/1/backendRefs",
        }
    }
}

fn objects(env: &Env, kind: Kind) -> Api<DynamicObject> {
    Api::namespaced_with(env.client.clone(), &env.ns, &kind.resource())
}

fn canaries(env: &Env) -> Api<Canary> {
    Api::namespaced(env.client.clone(), &env.ns)
}

/// The routing object of `kind` from its example file, in the test's namespace.
fn example_object(env: &Env, kind: Kind) -> Value {
    let (path, object_kind, example_ns) = kind.example();
    let obj = example_in(path, example_ns, &env.ns)
        .into_iter()
        .find(|d| d["kind"] == object_kind)
        .unwrap_or_else(|| panic!("a {object_kind} in {path}"));
    assert_eq!(obj["metadata"]["name"], kind.object(), "{path}");
    obj
}

/// The routing object as stored now; `None` when it does not exist.
async fn stored(env: &Env, kind: Kind) -> Option<Value> {
    objects(env, kind)
        .get_opt(kind.object())
        .await
        .unwrap()
        .map(|o| serde_json::to_value(o).unwrap())
}

/// The (primary, canary) weights of the routing object of `kind`.
async fn weights(env: &Env, kind: Kind) -> (i64, i64) {
    let obj = stored(env, kind)
        .await
        .unwrap_or_else(|| panic!("the {kind:?} routing object exists"));
    let list = obj
        .pointer(kind.weights_at())
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{kind:?}: a list at {}: {obj}", kind.weights_at()));
    let w = |i: usize| list.get(i).and_then(|x| x["weight"].as_i64()).unwrap_or(-1);
    (w(0), w(1))
}

/// A traffic-mode Canary for `kind` with `policy` (None: the default, Revert).
fn traffic_canary(env: &Env, kind: Kind, policy: Option<&str>) -> Value {
    let (primary, canary) = kind.backends();
    let mut c = json!({
        "apiVersion": "serin.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": kind.canary(), "namespace": env.ns},
        "spec": {
            "backends": {"primary": primary, "canary": canary},
            "service": {"port": 9080},
            "router": kind.router(),
            "steps": [20, 50, 100],
            "analysis": {
                // No check falls due while the test runs: only the deletion moves weights
                // after the first step.
                "interval": "10m",
                "metrics": [{
                    "name": "always-fine",
                    "provider": {"prometheus": {"address": env.prometheus.url}},
                    "query": "vector(0)",
                    "max": 1
                }]
            }
        }
    });
    if let Some(p) = policy {
        c["spec"]["deletionPolicy"] = json!(p);
    }
    c
}

/// Creates the routing object of `kind` and its Canary; returns the object as stored.
async fn arrange(env: &Env, kind: Kind, policy: Option<&str>) -> Value {
    create(
        &env.client,
        &kind.resource(),
        Some(&env.ns),
        example_object(env, kind),
    )
    .await;
    let canary: Canary = serde_json::from_value(traffic_canary(env, kind, policy)).unwrap();
    canaries(env)
        .create(&Default::default(), &canary)
        .await
        .unwrap_or_else(|e| panic!("create the {kind:?} Canary: {e}"));
    let before = stored(env, kind).await.unwrap();
    assert_eq!(weights(env, kind).await, (100, 0), "{kind:?}: the example");
    before
}

/// Fails the test with what the operator and the Canaries were doing.
async fn fail(env: &Env, op: &Operator, why: String) -> ! {
    for kind in ALL {
        if let Ok(Some(c)) = canaries(env).get_opt(kind.canary()).await {
            eprintln!(
                "--- Canary {}\n{}",
                kind.canary(),
                serde_norway::to_string(&c).unwrap_or_default()
            );
        }
        if let Some(o) = stored(env, kind).await {
            eprintln!(
                "--- {kind:?} routing object\n{}",
                serde_norway::to_string(&o["spec"]).unwrap_or_default()
            );
        }
    }
    let log = op.log();
    let tail: Vec<&str> = log.lines().rev().take(80).collect();
    eprintln!(
        "--- operator log (last 80 lines)\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    panic!("{why}");
}

/// Waits until Serin has put its finalizer on the Canary of `kind`, initialised it and
/// written the rollout's first step (canary 20%) to the routing object.
async fn wait_first_step(env: &Env, op: &Operator, kind: Kind) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = canaries(env).get(kind.canary()).await.unwrap();
        let status = c.status.clone().unwrap_or_default();
        if status.phase == Phase::Progressing && status.canary_weight == 20 {
            assert!(
                c.metadata
                    .finalizers
                    .unwrap_or_default()
                    .iter()
                    .any(|f| f == FINALIZER),
                "{kind:?}: a Canary Serin acts on carries {FINALIZER}"
            );
            assert_eq!(
                status.stable_revision.as_deref(),
                Some(kind.backends().0),
                "{kind:?}: initialised with the primary as the stable version"
            );
            let w = weights(env, kind).await;
            if w != (80, 20) {
                fail(
                    env,
                    op,
                    format!("{kind:?}: status says canary 20% but the object holds {w:?}"),
                )
                .await;
            }
            return;
        }
        if Instant::now() > deadline {
            fail(
                env,
                op,
                format!("{kind:?}: the rollout did not reach its first step (20%) in 60s"),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sets the weights of the routing object of `kind` to 50/50 by hand (a JSON Patch that
/// first tests they are the 80/20 Serin wrote); returns the object's resourceVersion.
async fn set_fifty_fifty(env: &Env, kind: Kind) -> u64 {
    let at = kind.weights_at();
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("{at}/0/weight"), "value": 80},
        {"op": "test", "path": format!("{at}/1/weight"), "value": 20},
        {"op": "replace", "path": format!("{at}/0/weight"), "value": 50},
        {"op": "replace", "path": format!("{at}/1/weight"), "value": 50},
    ]))
    .unwrap();
    objects(env, kind)
        .patch(
            kind.object(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: set 50/50 by hand: {e}"));
    assert_eq!(weights(env, kind).await, (50, 50));
    object_version(env, kind).await
}

/// The routing object's resourceVersion. Both API servers count one revision for all
/// objects, so versions order writes across objects.
async fn object_version(env: &Env, kind: Kind) -> u64 {
    let obj = stored(env, kind).await.expect("the routing object exists");
    version(&obj["metadata"]["resourceVersion"])
}

fn version(v: &Value) -> u64 {
    v.as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a numeric resourceVersion: {v}"))
}

/// The resourceVersion at which each Canary of the test's namespace went away, by name, as
/// a watch sees it from now on.
fn record_deletions(env: &mut Env) -> Arc<Mutex<HashMap<String, u64>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let out = seen.clone();
    let api = canaries(env);
    env.tasks.push(tokio::spawn(async move {
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Delete(c)) = ev {
                let rv = version(&json!(c.metadata.resource_version));
                out.lock()
                    .unwrap()
                    .insert(c.metadata.name.unwrap_or_default(), rv);
            }
        }
    }));
    seen
}

/// The resourceVersion at which the Canary of `kind` was deleted (waiting briefly for the
/// watch to report it).
async fn deleted_at(deletions: &Arc<Mutex<HashMap<String, u64>>>, kind: Kind) -> u64 {
    wait_for(
        &format!("the watch to see the {kind:?} Canary deleted"),
        Duration::from_secs(10),
        || {
            let rv = deletions.lock().unwrap().get(kind.canary()).copied();
            async move { rv }
        },
    )
    .await
}

/// The resourceVersion of the Event with `reason` about Canary `name`.
async fn event_version(env: &Env, name: &str, reason: &str) -> u64 {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.client.clone(), &env.ns);
    let event = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && e.involved_object.kind.as_deref() == Some("Canary")
                && e.reason.as_deref() == Some(reason)
        })
        .unwrap_or_else(|| panic!("a {reason} Event about {name}"));
    version(&json!(event.metadata.resource_version))
}

async fn delete_canary(env: &Env, kind: Kind) {
    canaries(env)
        .delete(kind.canary(), &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete the {kind:?} Canary: {e}"));
}

/// Waits until the Canary of `kind` is gone (its finalizer removed).
async fn wait_gone(env: &Env, op: &Operator, kind: Kind) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while canaries(env)
        .get_opt(kind.canary())
        .await
        .unwrap()
        .is_some()
    {
        if Instant::now() > deadline {
            fail(
                env,
                op,
                format!("{kind:?}: the deleted Canary was still there after 30s"),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reasons of the Events about the Canary of `kind`, waiting (briefly) for `reason`,
/// and the message of the `reason` Event.
async fn event(env: &Env, kind: Kind, reason: &str) -> (Vec<String>, String) {
    let events = events_after(env, kind.canary(), reason).await;
    let message = events
        .iter()
        .find(|(r, _)| r == reason)
        .map(|(_, m)| m.clone())
        .unwrap();
    (events.into_iter().map(|(r, _)| r).collect(), message)
}

fn start_operator(env: &Env) -> Operator {
    Operator::start(env, env.cluster.dir.path().join("operator.log"), &[])
}

/// `deletionPolicy: Revert` (the default), mid-rollout at 50/50 on each router: the Canary
/// goes away only after all traffic is on `backends.primary`; the routing object is then
/// exactly as before the rollout (only the two weights were ever changed), and a `Reverted`
/// Event names the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_moves_all_traffic_to_the_primary_on_every_router() {
    let Some(mut env) = env(|_, _| vec![]).await else {
        return;
    };
    let deletions = record_deletions(&mut env);
    let mut before = Vec::new();
    for kind in ALL {
        before.push(arrange(&env, kind, None).await);
    }
    let op = start_operator(&env);
    for kind in ALL {
        wait_first_step(&env, &op, kind).await;
        set_fifty_fifty(&env, kind).await;
    }
    for kind in ALL {
        delete_canary(&env, kind).await;
    }
    for (kind, before) in ALL.into_iter().zip(before) {
        wait_gone(&env, &op, kind).await;
        let w = weights(&env, kind).await;
        if w != (100, 0) {
            fail(
                &env,
                &op,
                format!("{kind:?}: the Canary is gone but the object holds {w:?}, not 100/0"),
            )
            .await;
        }
        let after = stored(&env, kind).await.unwrap();
        assert_eq!(
            after["spec"], before["spec"],
            "{kind:?}: the deletion changed only the two weights, back to 100/0"
        );
        let (reasons, message) = event(&env, kind, "Reverted").await;
        // First the service is whole, then the Event, then the finalizer goes.
        let reverted = version(&after["metadata"]["resourceVersion"]);
        let reported = event_version(&env, kind.canary(), "Reverted").await;
        let gone = deleted_at(&deletions, kind).await;
        assert!(
            reverted < reported && reported < gone,
            "{kind:?}: the weights were reverted (version {reverted}) and reported (Event at version {reported}) before the Canary went away (version {gone})"
        );
        let primary = kind.backends().0;
        assert!(
            message.contains(primary),
            "{kind:?}: the Reverted Event names the primary {primary}: {message:?}"
        );
        assert!(
            !reasons
                .iter()
                .any(|r| r == "RevertImpossible" || r == "Orphaned"),
            "{kind:?}: {reasons:?}"
        );
    }
}

/// `deletionPolicy: Orphan` (Gateway API), mid-rollout at 50/50: the Canary goes away and
/// the weights stay where they were, with an `Orphaned` Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_leaves_the_weights_where_they_are() {
    let Some(env) = env(|_, _| vec![]).await else {
        return;
    };
    let kind = Kind::GatewayApi;
    let before = arrange(&env, kind, Some("Orphan")).await;
    let op = start_operator(&env);
    wait_first_step(&env, &op, kind).await;
    let edited = set_fifty_fifty(&env, kind).await;
    delete_canary(&env, kind).await;
    wait_gone(&env, &op, kind).await;
    assert_eq!(
        object_version(&env, kind).await,
        edited,
        "Orphan: Serin did not write to the routing object"
    );
    let w = weights(&env, kind).await;
    if w != (50, 50) {
        fail(
            &env,
            &op,
            format!("Orphan: the Canary is gone and the object holds {w:?}, not 50/50"),
        )
        .await;
    }
    let mut expected = before["spec"].clone();
    let at = kind.weights_at().trim_start_matches("/spec");
    for i in 0..2 {
        *expected
            .pointer_mut(&format!("{at}/{i}/weight"))
            .expect("weight") = json!(50);
    }
    assert_eq!(
        stored(&env, kind).await.unwrap()["spec"],
        expected,
        "Orphan: the object is as the hand edit left it"
    );
    let (reasons, message) = event(&env, kind, "Orphaned").await;
    assert!(
        message.contains("deletionPolicy Orphan"),
        "the Orphaned Event says why: {message:?}"
    );
    assert!(
        !reasons
            .iter()
            .any(|r| r == "Reverted" || r == "RevertImpossible"),
        "{reasons:?}"
    );
}

/// The routing object was deleted before the Canary (each router): the deletion cannot
/// revert, and does not wedge: the Canary goes away with a Warning `RevertImpossible` Event
/// that says the object was not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_routing_object_does_not_wedge_the_deletion() {
    let Some(env) = env(|_, _| vec![]).await else {
        return;
    };
    for kind in ALL {
        arrange(&env, kind, None).await;
    }
    let op = start_operator(&env);
    for kind in ALL {
        wait_first_step(&env, &op, kind).await;
    }
    for kind in ALL {
        objects(&env, kind)
            .delete(kind.object(), &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete the {kind:?} routing object: {e}"));
        assert!(stored(&env, kind).await.is_none(), "{kind:?}: deleted");
        delete_canary(&env, kind).await;
    }
    for kind in ALL {
        wait_gone(&env, &op, kind).await;
        let (reasons, message) = event(&env, kind, "RevertImpossible").await;
        assert!(
            message.contains("not found") && message.contains(kind.object()),
            "{kind:?}: the RevertImpossible Event says the object {} was not found: {message:?}",
            kind.object()
        );
        assert!(
            !reasons.iter().any(|r| r == "Reverted"),
            "{kind:?}: {reasons:?}"
        );
        let warning = warning_types(&env, kind.canary(), "RevertImpossible").await;
        assert!(warning, "{kind:?}: RevertImpossible is a Warning Event");
        assert!(
            stored(&env, kind).await.is_none(),
            "{kind:?}: Serin does not recreate the routing object"
        );
    }
}

/// Whether every Event with `reason` about Canary `name` is of type Warning (and there is
/// one).
async fn warning_types(env: &Env, name: &str, reason: &str) -> bool {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.client.clone(), &env.ns);
    let types: Vec<String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && e.involved_object.kind.as_deref() == Some("Canary")
                && e.reason.as_deref() == Some(reason)
        })
        .map(|e| e.type_.unwrap_or_default())
        .collect();
    !types.is_empty() && types.iter().all(|t| t == "Warning")
}

/// A Canary that became invalid after Serin acted on it (here: a query with an unknown
/// template variable, which the CRD accepts and Serin's validation refuses) still goes away
/// when deleted: Serin changes no traffic for an invalid spec, says so in a Warning
/// `RevertImpossible` Event, and releases the finalizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_canary_does_not_wedge_the_deletion() {
    let Some(env) = env(|_, _| vec![]).await else {
        return;
    };
    let kind = Kind::GatewayApi;
    arrange(&env, kind, None).await;
    let op = start_operator(&env);
    wait_first_step(&env, &op, kind).await;
    canaries(&env)
        .patch(
            kind.canary(),
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{
                    "op": "replace",
                    "path": "/spec/analysis/metrics/0/query",
                    "value": "vector({{ variables.nope }})"
                }]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    wait_for(
        "the Canary to be Invalid",
        Duration::from_secs(30),
        || async {
            let c = canaries(&env).get(kind.canary()).await.ok()?;
            serin::api::find_condition(&c.status?.conditions, serin::api::INVALID)
                .filter(|c| c.status == serin::api::ConditionStatus::True)
                .map(|_| ())
        },
    )
    .await;
    let before = weights(&env, kind).await;
    delete_canary(&env, kind).await;
    wait_gone(&env, &op, kind).await;
    let (reasons, message) = event(&env, kind, "RevertImpossible").await;
    assert!(message.contains("invalid"), "{message:?}");
    assert!(!reasons.iter().any(|r| r == "Reverted"), "{reasons:?}");
    assert_eq!(
        weights(&env, kind).await,
        before,
        "no traffic change for an invalid Canary"
    );
}
