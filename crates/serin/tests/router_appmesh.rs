//! The App Mesh router (Kubernetes resources) against this run's API server (the real
//! kube-apiserver when `SERIN_TEST_KUBECONFIG` is set, else the in-memory one) with the
//! genuine `appmesh.k8s.aws/v1beta2` CRDs: every object it writes is validated by the real
//! schema, written with strict field validation, and checked for unknown fields. Each test
//! has a namespace and a Mesh (cluster-scoped) of its own, as tests share the real server.

mod router_support;
mod support;

use serde_json::{Value, json};
use serin::api::Canary;
use serin::arms::Weights;
use serin::router::{AppMeshKubeRouter, MAX_ATTEMPTS, Router, RouterError, WriteOutcome};

use router_support::proxy::Proxy;
use router_support::{Cluster, canary_yaml, example_in, traffic, workload, writes};

const AM: &str = "appmesh.k8s.aws/v1beta2";
/// The namespace of the example files, replaced by the test's.
const EXAMPLE_NS: &str = "appmesh-demo";

struct Env {
    cluster: Cluster,
    proxy: Proxy,
    router: AppMeshKubeRouter,
    /// The test's Mesh.
    mesh: String,
}

impl Env {
    /// The test's namespace.
    fn ns(&self) -> &str {
        &self.cluster.ns
    }
}

/// A fresh namespace and a Mesh of the test's own, and a router that talks to the server
/// through a recording proxy. `None` when the upstream CRDs are absent.
async fn env() -> Option<Env> {
    let cluster = Cluster::start("router-appmesh").await?;
    let mesh = format!("color-mesh-{}", cluster.ns);
    cluster
        .create(
            json!({"apiVersion": AM, "kind": "Mesh", "metadata": {"name": mesh},
            "spec": {"namespaceSelector": {"matchLabels": {"mesh": mesh}}}}),
        )
        .await;
    let (proxy, client) = cluster.proxy().await;
    Some(Env {
        cluster,
        proxy,
        router: AppMeshKubeRouter::new(client),
        mesh,
    })
}

async fn workload_canary(env: &Env, name: &str) -> Canary {
    let router = format!(
        "  router:\n    appMesh:\n      mesh: {}\n      backends: [colorteller]",
        env.mesh
    );
    env.cluster
        .canary(&canary_yaml(name, env.ns(), &workload(name), &router))
        .await
}

async fn traffic_canary(env: &Env, route: Option<&str>) -> Canary {
    let route = route
        .map(|r| format!("\n      route: {r}"))
        .unwrap_or_default();
    let router = format!(
        "  router:\n    appMesh:\n      mesh: {}\n      virtualRouter: colorteller-router{route}",
        env.mesh
    );
    env.cluster
        .canary(&canary_yaml(
            "colorteller",
            env.ns(),
            &traffic("colorteller-white", "colorteller-blue"),
            &router,
        ))
        .await
}

/// The colorapp VirtualRouter of `examples/routing/appmesh-colorapp.yaml`, in the test's
/// namespace.
fn colorapp_router(env: &Env) -> Value {
    example_in(
        "examples/routing/appmesh-colorapp.yaml",
        EXAMPLE_NS,
        env.ns(),
    )
    .into_iter()
    .find(|d| d["kind"] == "VirtualRouter")
    .expect("a VirtualRouter in the example")
}

async fn get(env: &Env, kind: &str, name: &str) -> Value {
    env.cluster
        .get(AM, kind, env.ns(), name)
        .await
        .unwrap_or_else(|| panic!("{kind} {name} exists"))
}

async fn resource_version(env: &Env, kind: &str, name: &str) -> String {
    env.cluster.resource_version(AM, kind, env.ns(), name).await
}

/// Creates the Deployment `name` (no replicas) in the test's namespace and returns its uid,
/// so that an ownerReference to it names an object that exists (the real server's garbage
/// collector deletes dependents whose owner is absent).
async fn deployment(env: &Env, name: &str) -> String {
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(env.cluster.client.clone(), env.ns());
    let d = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}}}))
    .expect("Deployment");
    api.create(&kube::api::PostParams::default(), &d)
        .await
        .expect("create Deployment")
        .metadata
        .uid
        .expect("uid")
}

/// Workload mode creates both VirtualNodes, the VirtualRouter at 100/0 and the
/// VirtualService, owned by the Canary and valid against the upstream schemas; a second
/// prepare makes no write.
#[tokio::test]
async fn workload_prepare_creates_owned_objects_and_is_idempotent() {
    let Some(env) = env().await else { return };
    let canary = workload_canary(&env, "colorgateway").await;
    env.router.prepare(&canary).await.expect("prepare");

    let uid = canary.metadata.uid.clone().expect("uid");
    for (kind, name) in [
        ("VirtualNode", "colorgateway-primary"),
        ("VirtualNode", "colorgateway-canary"),
        ("VirtualRouter", "colorgateway"),
        ("VirtualService", "colorgateway"),
    ] {
        let obj = get(&env, kind, name).await;
        assert_eq!(
            env.cluster.unknown_fields(&obj),
            Vec::<String>::new(),
            "{kind} {name}"
        );
        let owner = &obj["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], uid.as_str(), "{kind} {name} owner");
        assert_eq!(owner["controller"], true);
        assert_eq!(owner["blockOwnerDeletion"], true);
        assert!(
            obj["spec"].get("meshRef").is_none(),
            "meshRef is the webhook's"
        );
    }
    let ns = env.ns();
    let primary = get(&env, "VirtualNode", "colorgateway-primary").await;
    assert_eq!(
        primary["spec"]["serviceDiscovery"]["dns"]["hostname"],
        format!("colorgateway-primary.{ns}.svc.cluster.local")
    );
    assert_eq!(
        primary["spec"]["podSelector"]["matchLabels"]["app"],
        "colorgateway-primary"
    );
    assert_eq!(primary["spec"]["listeners"][0]["portMapping"]["port"], 9080);
    assert_eq!(
        primary["spec"]["backends"][0]["virtualService"]["virtualServiceRef"]["name"],
        "colorteller"
    );
    let canary_node = get(&env, "VirtualNode", "colorgateway-canary").await;
    assert_eq!(
        canary_node["spec"]["podSelector"]["matchLabels"]["app"],
        "colorgateway"
    );
    assert_eq!(
        canary_node["spec"]["serviceDiscovery"]["dns"]["hostname"],
        format!("colorgateway-canary.{ns}.svc.cluster.local")
    );
    let vs = get(&env, "VirtualService", "colorgateway").await;
    assert_eq!(
        vs["spec"]["awsName"],
        format!("colorgateway.{ns}.svc.cluster.local")
    );
    assert_eq!(
        vs["spec"]["provider"]["virtualRouter"]["virtualRouterRef"]["name"],
        "colorgateway"
    );
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::STABLE
    );
    // Strict validation on every write.
    for w in writes(&env.proxy) {
        assert!(
            w.contains("fieldValidation=Strict") && w.contains("fieldManager=serin"),
            "{w}"
        );
    }

    let objects = [
        ("VirtualNode", "colorgateway-primary"),
        ("VirtualNode", "colorgateway-canary"),
        ("VirtualRouter", "colorgateway"),
        ("VirtualService", "colorgateway"),
    ];
    let mut versions = Vec::new();
    for (kind, name) in objects {
        versions.push(resource_version(&env, kind, name).await);
    }
    env.proxy.clear();
    env.router.prepare(&canary).await.expect("second prepare");
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
    for ((kind, name), before) in objects.into_iter().zip(versions) {
        assert_eq!(
            resource_version(&env, kind, name).await,
            before,
            "no write to {kind} {name} on the second prepare"
        );
    }
}

/// A second prepare in the middle of a rollout keeps the live weights.
#[tokio::test]
async fn workload_prepare_keeps_live_weights() {
    let Some(env) = env().await else { return };
    let canary = workload_canary(&env, "colorgateway").await;
    env.router.prepare(&canary).await.expect("prepare");
    let w50 = Weights::with_canary(50);
    env.router
        .set_weights(&canary, Weights::STABLE, w50)
        .await
        .expect("set");
    env.router.prepare(&canary).await.expect("prepare again");
    assert_eq!(env.router.weights(&canary).await.expect("weights"), w50);
}

/// Adopting an existing VirtualNode sets only the fields Serin owns: the user's logging
/// stays, the listeners are corrected, and Serin's owner reference is added.
#[tokio::test]
async fn workload_adopts_existing_node_without_clobbering_user_fields() {
    let Some(env) = env().await else { return };
    env.cluster
        .create(json!({"apiVersion": AM, "kind": "VirtualNode",
            "metadata": {"name": "colorgateway-primary", "namespace": env.ns(), "labels": {"team": "color"}},
            "spec": {
                "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                "logging": {"accessLog": {"file": {"path": "/dev/stdout"}}},
                "podSelector": {"matchLabels": {"app": "colorgateway-primary"}},
                "serviceDiscovery": {"dns": {"hostname": format!("colorgateway-primary.{}.svc.cluster.local", env.ns())}}
            }}))
        .await;
    let canary = workload_canary(&env, "colorgateway").await;
    env.router.prepare(&canary).await.expect("prepare");
    let node = get(&env, "VirtualNode", "colorgateway-primary").await;
    assert_eq!(
        node["spec"]["logging"]["accessLog"]["file"]["path"],
        "/dev/stdout"
    );
    assert_eq!(node["metadata"]["labels"]["team"], "color");
    assert_eq!(node["spec"]["listeners"][0]["portMapping"]["port"], 9080);
    assert_eq!(
        node["metadata"]["ownerReferences"][0]["uid"],
        canary.metadata.uid.clone().expect("uid").as_str()
    );
    assert_eq!(env.cluster.unknown_fields(&node), Vec::<String>::new());
}

/// A VirtualNode controlled by another object is not adopted.
#[tokio::test]
async fn workload_refuses_objects_controlled_by_someone_else() {
    let Some(env) = env().await else { return };
    let uid = deployment(&env, "other").await;
    env.cluster
        .create(json!({"apiVersion": AM, "kind": "VirtualNode",
            "metadata": {"name": "colorgateway-canary", "namespace": env.ns(), "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": "other", "uid": uid,
                "controller": true}]},
            "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}}))
        .await;
    let canary = workload_canary(&env, "colorgateway").await;
    let err = env
        .router
        .prepare(&canary)
        .await
        .expect_err("controlled by another");
    assert!(
        matches!(&err, RouterError::Unroutable { kind: "VirtualNode", reason, .. } if reason.contains("Deployment other")),
        "{err}"
    );
}

/// Workload mode needs the Mesh: a missing one is NotFound and nothing is written.
#[tokio::test]
async fn workload_missing_mesh_is_not_found() {
    let Some(env) = env().await else { return };
    let router = "  router:\n    appMesh:\n      mesh: no-such-mesh";
    let canary = env
        .cluster
        .canary(&canary_yaml(
            "colorgateway",
            env.ns(),
            &workload("colorgateway"),
            router,
        ))
        .await;
    env.proxy.clear();
    let err = env.router.prepare(&canary).await.expect_err("no mesh");
    assert!(
        matches!(err, RouterError::NotFound { kind: "Mesh", .. }),
        "{err}"
    );
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
}

/// set_weights writes once with a guarded JSON Patch; writing the same weights again makes
/// no API write (the resourceVersion does not move).
#[tokio::test]
async fn set_weights_writes_once_and_then_is_unchanged() {
    let Some(env) = env().await else { return };
    let canary = workload_canary(&env, "colorgateway").await;
    env.router.prepare(&canary).await.expect("prepare");
    let w20 = Weights::with_canary(20);
    env.proxy.clear();
    assert_eq!(
        env.router
            .set_weights(&canary, Weights::STABLE, w20)
            .await
            .expect("set"),
        WriteOutcome::Written
    );
    assert_eq!(
        env.proxy.requests(),
        vec![
            format!(
                "GET /apis/{AM}/namespaces/{}/virtualrouters/colorgateway",
                env.ns()
            ),
            format!(
                "PATCH /apis/{AM}/namespaces/{}/virtualrouters/colorgateway?&fieldManager=serin&fieldValidation=Strict",
                env.ns()
            ),
        ]
    );
    let vr = get(&env, "VirtualRouter", "colorgateway").await;
    let targets = &vr["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"];
    assert_eq!(targets[0]["weight"], 80);
    assert_eq!(targets[1]["weight"], 20);
    assert_eq!(env.router.weights(&canary).await.expect("weights"), w20);

    let rev = resource_version(&env, "VirtualRouter", "colorgateway").await;
    env.proxy.clear();
    assert_eq!(
        env.router
            .set_weights(&canary, Weights::STABLE, w20)
            .await
            .expect("again"),
        WriteOutcome::Unchanged
    );
    assert_eq!(
        resource_version(&env, "VirtualRouter", "colorgateway").await,
        rev
    );
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
}

/// Traffic mode (the colorapp): only the two weights change; matches, retry policy,
/// timeouts and the other route stay byte-for-byte.
#[tokio::test]
async fn traffic_mode_changes_only_the_two_weights() {
    let Some(env) = env().await else { return };
    let before = env.cluster.create(colorapp_router(&env)).await;
    let canary = traffic_canary(&env, Some("colorteller-route")).await;
    env.router
        .prepare(&canary)
        .await
        .expect("prepare validates");
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::STABLE
    );
    let w50 = Weights::with_canary(50);
    env.router
        .set_weights(&canary, Weights::STABLE, w50)
        .await
        .expect("set");
    let after = get(&env, "VirtualRouter", "colorteller-router").await;
    let mut expected = before["spec"].clone();
    let targets = expected["routes"][0]["httpRoute"]["action"]["weightedTargets"]
        .as_array_mut()
        .expect("targets");
    targets[0]["weight"] = json!(50);
    targets[1]["weight"] = json!(50);
    assert_eq!(after["spec"], expected);
    assert_eq!(env.cluster.unknown_fields(&after), Vec::<String>::new());
}

/// The default route is the router's only route; with two routes and none named, the
/// router is Unroutable and says to name one.
#[tokio::test]
async fn traffic_mode_needs_a_named_route_when_there_are_several() {
    let Some(env) = env().await else { return };
    env.cluster.create(colorapp_router(&env)).await;
    let canary = traffic_canary(&env, None).await;
    let err = env.router.weights(&canary).await.expect_err("two routes");
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains("spec.router.appMesh.route")),
        "{err}"
    );
}

/// A missing VirtualRouter or route is NotFound, and nothing is written.
#[tokio::test]
async fn missing_router_or_route_is_not_found_without_writes() {
    let Some(env) = env().await else { return };
    let canary = traffic_canary(&env, Some("colorteller-route")).await;
    env.proxy.clear();
    let err = env
        .router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(10))
        .await
        .expect_err("no router");
    assert!(
        matches!(
            err,
            RouterError::NotFound {
                kind: "VirtualRouter",
                ..
            }
        ),
        "{err}"
    );
    env.cluster.create(colorapp_router(&env)).await;
    let canary = traffic_canary_named(&env, "other", "no-such-route").await;
    let err = env
        .router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(10))
        .await
        .expect_err("no route");
    assert!(
        matches!(&err, RouterError::NotFound { kind: "VirtualRouter route", name, .. } if name == "colorteller-router/no-such-route"),
        "{err}"
    );
    assert!(err.needs_user());
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
}

async fn traffic_canary_named(env: &Env, name: &str, route: &str) -> Canary {
    let router = format!(
        "  router:\n    appMesh:\n      mesh: {}\n      virtualRouter: colorteller-router\n      route: {route}",
        env.mesh
    );
    env.cluster
        .canary(&canary_yaml(
            name,
            env.ns(),
            &traffic("colorteller-white", "colorteller-blue"),
            &router,
        ))
        .await
}

/// One target, three targets, or a canary that is not among the targets: Unroutable, and
/// the weights stay as they were.
#[tokio::test]
async fn wrong_target_shapes_are_unroutable() {
    let Some(env) = env().await else { return };
    let mut vr = colorapp_router(&env);
    vr["spec"]["routes"] = json!([{"name": "colorteller-route", "httpRoute": {
        "match": {"prefix": "/"},
        "action": {"weightedTargets": [{"virtualNodeRef": {"name": "colorteller-white"}, "weight": 100}]}}}]);
    env.cluster.create(vr).await;
    let canary = traffic_canary(&env, None).await;
    let cases = [
        (
            json!([{"virtualNodeRef": {"name": "colorteller-white"}, "weight": 100}]),
            "1 weighted targets",
        ),
        (
            json!([{"virtualNodeRef": {"name": "colorteller-white"}, "weight": 50},
                   {"virtualNodeRef": {"name": "colorteller-blue"}, "weight": 0},
                   {"virtualNodeRef": {"name": "colorteller-red"}, "weight": 50}]),
            "3 weighted targets",
        ),
        (
            json!([{"virtualNodeRef": {"name": "colorteller-white"}, "weight": 100},
                   {"virtualNodeRef": {"name": "colorteller-red"}, "weight": 0}]),
            "colorteller-blue is not among them",
        ),
    ];
    for (targets, message) in cases {
        let t = targets.clone();
        env.cluster
            .edit(AM, "VirtualRouter", env.ns(), "colorteller-router", |o| {
                o["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"] = t;
            })
            .await;
        let err = env
            .router
            .set_weights(&canary, Weights::STABLE, Weights::with_canary(20))
            .await
            .expect_err("unroutable");
        assert!(
            matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains(message)),
            "{message}: {err}"
        );
        let vr = get(&env, "VirtualRouter", "colorteller-router").await;
        assert_eq!(
            vr["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"],
            targets
        );
    }
}

/// Weights edited by hand (neither expected nor desired) are reported as WeightsChanged and
/// left alone.
#[tokio::test]
async fn hand_edited_weights_are_reported_not_overwritten() {
    let Some(env) = env().await else { return };
    env.cluster.create(colorapp_router(&env)).await;
    let canary = traffic_canary(&env, Some("colorteller-route")).await;
    env.cluster
        .edit(AM, "VirtualRouter", env.ns(), "colorteller-router", |o| {
            o["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"][0]["weight"] =
                json!(70);
            o["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"][1]["weight"] =
                json!(30);
        })
        .await;
    let rev = resource_version(&env, "VirtualRouter", "colorteller-router").await;
    env.proxy.clear();
    let err = env
        .router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect_err("changed");
    assert!(
        matches!(
            err,
            RouterError::WeightsChanged {
                found_primary: 70,
                found_canary: 30,
                expected_canary: 0,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(writes(&env.proxy), Vec::<String>::new());
    assert_eq!(
        resource_version(&env, "VirtualRouter", "colorteller-router").await,
        rev
    );
}

/// Someone changes the weights between Serin's read and its patch: the `test` op fails, the
/// router re-reads and reports WeightsChanged, and the other writer's weights stay.
#[tokio::test]
async fn concurrent_edit_between_read_and_patch_is_detected() {
    let Some(env) = env().await else { return };
    env.cluster.create(colorapp_router(&env)).await;
    let canary = traffic_canary(&env, Some("colorteller-route")).await;
    let direct = env.cluster.client.clone();
    let ns = env.ns().to_string();
    env.proxy.before("PATCH", move || async move {
        let ar = kube::api::ApiResource {
            group: "appmesh.k8s.aws".into(),
            version: "v1beta2".into(),
            api_version: AM.into(),
            kind: "VirtualRouter".into(),
            plural: "virtualrouters".into(),
        };
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(direct, &ns, &ar);
        let patch = json!([{"op": "replace", "path": "/spec/routes/0/httpRoute/action/weightedTargets/0/weight", "value": 60},
                           {"op": "replace", "path": "/spec/routes/0/httpRoute/action/weightedTargets/1/weight", "value": 40}]);
        let patch: json_patch::Patch = serde_json::from_value(patch).expect("patch");
        api.patch("colorteller-router", &kube::api::PatchParams::default(), &kube::api::Patch::Json::<()>(patch))
            .await
            .expect("concurrent write");
    });
    let err = env
        .router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect_err("changed under the patch");
    assert!(
        matches!(
            err,
            RouterError::WeightsChanged {
                found_canary: 40,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(env.proxy.requests_of("PATCH").len(), 1);
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::with_canary(40)
    );
}

/// A 409 is retried with fresh state: one conflict then success writes; conflicts on every
/// attempt end in RouterError::Conflict after MAX_ATTEMPTS patches, weights untouched.
#[tokio::test]
async fn conflicts_are_retried_a_bounded_number_of_times() {
    let Some(env) = env().await else { return };
    env.cluster.create(colorapp_router(&env)).await;
    let canary = traffic_canary(&env, Some("colorteller-route")).await;
    let conflict = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict","code":409,"message":"the object has been modified"}"#;
    let ct = [("content-type", "application/json")];
    env.proxy.answer("PATCH", 1, 409, &ct, conflict);
    let w20 = Weights::with_canary(20);
    assert_eq!(
        env.router
            .set_weights(&canary, Weights::STABLE, w20)
            .await
            .expect("second try wins"),
        WriteOutcome::Written
    );
    assert_eq!(env.proxy.requests_of("PATCH").len(), 2);

    env.proxy.clear();
    env.proxy.answer("PATCH", MAX_ATTEMPTS, 409, &ct, conflict);
    let err = env
        .router
        .set_weights(&canary, w20, Weights::with_canary(50))
        .await
        .expect_err("always conflicting");
    assert!(matches!(err, RouterError::Conflict { .. }), "{err}");
    assert!(!err.needs_user());
    assert_eq!(env.proxy.requests_of("PATCH").len(), MAX_ATTEMPTS);
    assert_eq!(env.router.weights(&canary).await.expect("weights"), w20);
}

/// The VirtualGateway example: its gateway objects load next to the workload-mode objects,
/// and the GatewayRoute's target is the VirtualService Serin manages.
#[tokio::test]
async fn virtual_gateway_example_targets_the_managed_virtual_service() {
    let Some(env) = env().await else { return };
    let docs = example_in("examples/appmesh-virtualgateway.yaml", EXAMPLE_NS, env.ns());
    let mut canary_doc = docs
        .iter()
        .find(|d| d["kind"] == "Canary")
        .expect("Canary")
        .clone();
    canary_doc["spec"]["router"]["appMesh"]["mesh"] = json!(env.mesh);
    let canary = env
        .cluster
        .canary(&serde_norway::to_string(&canary_doc).expect("yaml"))
        .await;
    env.router.prepare(&canary).await.expect("prepare");
    for doc in docs.iter().filter(|d| d["kind"] != "Canary") {
        let created = env.cluster.create(doc.clone()).await;
        assert_eq!(env.cluster.unknown_fields(&created), Vec::<String>::new());
    }
    let route = get(&env, "GatewayRoute", "frontend").await;
    let target = route["spec"]["httpRoute"]["action"]["target"]["virtualService"]["virtualServiceRef"]["name"]
        .as_str()
        .expect("target");
    let vs = get(&env, "VirtualService", target).await;
    assert_eq!(
        vs["metadata"]["ownerReferences"][0]["uid"],
        canary.metadata.uid.clone().expect("uid").as_str(),
        "the gateway targets the VirtualService Serin owns"
    );
    let vr_name = vs["spec"]["provider"]["virtualRouter"]["virtualRouterRef"]["name"]
        .as_str()
        .expect("router");
    assert_eq!(vr_name, "frontend");
    env.router
        .set_weights(&canary, Weights::STABLE, Weights::with_canary(10))
        .await
        .expect("set");
    assert_eq!(
        env.router.weights(&canary).await.expect("weights"),
        Weights::with_canary(10)
    );
}
