//! The genuine upstream CRDs (App Mesh, Gloo, Gateway API) load into the embedded API server
//! and their schemas validate objects the way a real API server does.

use std::path::{Path, PathBuf};

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube_sandbox::{ApiServer, Options};
use serde_json::{Value, json};

fn upstream_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/upstream-crds");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "NOTICE: {} is absent; skipping the upstream CRD tests",
            dir.display()
        );
        None
    }
}

fn api(
    server: &ApiServer,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(server.client().expect("client"), "default", &ar)
}

fn object(value: Value) -> DynamicObject {
    serde_json::from_value(value).expect("object")
}

async fn expect_invalid(api: &Api<DynamicObject>, obj: Value, field: &str, fragment: &str) {
    match api.create(&PostParams::default(), &object(obj)).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");
            assert!(
                s.message.contains(field) && s.message.contains(fragment),
                "message does not name {field}: {}",
                s.message
            );
        }
        other => panic!("expected 422 naming {field}, got {other:?}"),
    }
}

/// Every upstream CRD registers; valid objects are accepted and pruned, invalid ones get 422 naming the field.
#[tokio::test]
async fn upstream_crds_validate_like_the_real_server() {
    let Some(dir) = upstream_dir() else { return };
    let server = ApiServer::start(Options::default()).await.expect("server");
    let n = server.load_crd_dir(&dir).expect("upstream CRDs load");
    assert_eq!(n, 11, "six App Mesh, four Gloo and one Gateway API CRD");

    let routers = api(
        &server,
        "appmesh.k8s.aws",
        "v1beta2",
        "VirtualRouter",
        "virtualrouters",
    );
    let router = |weight: i64| {
        json!({"apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualRouter", "metadata": {"name": "colorteller-router"},
            "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}],
                "routes": [{"name": "route", "httpRoute": {"match": {"prefix": "/"}, "action": {"weightedTargets": [
                    {"virtualNodeRef": {"name": "blue"}, "weight": weight}, {"virtualNodeRef": {"name": "red"}, "weight": 20}]}}}],
                "typoField": true}})
    };
    expect_invalid(
        &routers,
        router(101),
        "spec.routes[0].httpRoute.action.weightedTargets[0].weight: Invalid value: 101",
        "should be less than or equal to 100",
    )
    .await;
    let created = routers
        .create(&PostParams::default(), &object(router(80)))
        .await
        .expect("valid VirtualRouter");
    assert!(
        created.data["spec"].get("typoField").is_none(),
        "unknown field pruned: {}",
        created.data
    );
    assert_eq!(
        created.data["spec"]["routes"][0]["httpRoute"]["action"]["weightedTargets"][0]["weight"],
        json!(80)
    );

    let groups = api(
        &server,
        "gloo.solo.io",
        "v1",
        "UpstreamGroup",
        "upstreamgroups",
    );
    let group = |weight: Value| {
        json!({"apiVersion": "gloo.solo.io/v1", "kind": "UpstreamGroup", "metadata": {"name": "upstreamgroup-gateway"},
            "spec": {"destinations": [
                {"destination": {"upstream": {"name": "blue", "namespace": "gloo-system"}}, "weight": weight},
                {"destination": {"upstream": {"name": "green", "namespace": "gloo-system"}}, "weight": 20, "bogus": 1}]}})
    };
    expect_invalid(
        &groups,
        group(json!(-5)),
        "spec.destinations[0].weight",
        "should be greater than or equal to 0",
    )
    .await;
    expect_invalid(
        &groups,
        group(json!("eighty")),
        "spec.destinations[0].weight",
        "must be of type integer",
    )
    .await;
    let created = groups
        .create(&PostParams::default(), &object(group(json!(80))))
        .await
        .expect("valid UpstreamGroup");
    assert!(
        created.data["spec"]["destinations"][1]
            .get("bogus")
            .is_none(),
        "pruned: {}",
        created.data
    );

    let routes = api(
        &server,
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
    );
    let route = |weight: i64| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "colorgateway"},
            "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [
                {"name": "colorgateway-primary", "port": 9080, "weight": weight},
                {"name": "colorgateway-canary", "port": 9080, "weight": 0}]}], "extra": "x"}})
    };
    expect_invalid(
        &routes,
        route(1_000_001),
        "spec.rules[0].backendRefs[0].weight",
        "should be less than or equal to 1000000",
    )
    .await;
    let created = routes
        .create(&PostParams::default(), &object(route(100)))
        .await
        .expect("valid HTTPRoute");
    assert!(
        created.data["spec"].get("extra").is_none(),
        "pruned: {}",
        created.data
    );
    assert_eq!(
        created.data["spec"]["rules"][0]["matches"][0]["path"]["type"],
        json!("PathPrefix"),
        "schema defaults applied: {}",
        created.data
    );

    let beta = api(
        &server,
        "gateway.networking.k8s.io",
        "v1beta1",
        "HTTPRoute",
        "httproutes",
    );
    let same = beta.get("colorgateway").await.expect("served as v1beta1");
    assert_eq!(
        same.types.map(|t| t.api_version).as_deref(),
        Some("gateway.networking.k8s.io/v1beta1")
    );
}
