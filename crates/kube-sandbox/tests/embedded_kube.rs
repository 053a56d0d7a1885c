//! Conformance of the embedded API server as seen through the real `kube` client.

use std::time::Duration;

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use http_body_util::BodyExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind, PartialObjectMeta};
use kube::runtime::watcher;
use kube_sandbox::{ApiServer, Options, RequestKey};
use serde_json::{Value, json};

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.dev}
spec:
  group: example.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg], categories: [all]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
              replicas: {type: integer, default: 1}
              color: {type: string, enum: [red, blue]}
          status:
            type: object
            properties:
              replicas: {type: integer}
              phase: {type: string}
"#;

async fn server() -> ApiServer {
    let server = ApiServer::start(Options::default())
        .await
        .expect("server starts");
    let crd: Value = serde_norway::from_str(CRD).expect("crd yaml");
    server.apply_crd(crd).expect("crd registers");
    server
}

fn widgets(server: &ApiServer) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("example.dev", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    Api::namespaced_with(server.client().expect("client"), "default", &ar)
}

fn widget(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}))
        .expect("widget")
}

fn api_error(e: kube::Error) -> Box<kube::core::Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Create, get, list with label selectors, stale update (409) and delete of a ConfigMap.
#[tokio::test]
async fn configmap_crud_selectors_and_conflict() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    for (name, tier) in [("a", "front"), ("b", "back"), ("c", "front")] {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"tier": tier, "n": name}}, "data": {"k": "v"}}))
            .expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
    }
    let dup: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "a"}})).expect("cm");
    let err = api_error(
        cms.create(&PostParams::default(), &dup)
            .await
            .expect_err("duplicate"),
    );
    assert_eq!((err.code, err.reason.as_str()), (409, "AlreadyExists"));
    let names = |l: kube::core::ObjectList<ConfigMap>| {
        l.items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier=front"))
                .await
                .expect("list")
        ),
        ["a", "c"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier!=front"))
                .await
                .expect("list")
        ),
        ["b"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("n in (a,b),tier"))
                .await
                .expect("list")
        ),
        ["a", "b"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("n notin (a),!missing"))
                .await
                .expect("list")
        ),
        ["b", "c"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .expect("list")
        ),
        ["b"]
    );
    let page = cms
        .list(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    let token = page.metadata.continue_.clone().expect("continue token");
    let rest = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(
        (names(page), names(rest)),
        (
            vec!["a".to_string(), "b".to_string()],
            vec!["c".to_string()]
        )
    );

    let mut a = cms.get("a").await.expect("get");
    let stale = a.clone();
    a.data = Some([("k".to_string(), "v2".to_string())].into());
    let updated = cms
        .replace("a", &PostParams::default(), &a)
        .await
        .expect("update");
    assert!(updated.metadata.resource_version > stale.metadata.resource_version);
    let err = api_error(
        cms.replace("a", &PostParams::default(), &stale)
            .await
            .expect_err("stale"),
    );
    assert_eq!(err.code, 409, "{err:?}");
    assert!(
        err.message.contains("the object has been modified"),
        "{}",
        err.message
    );

    cms.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let err = api_error(cms.get("a").await.expect_err("gone"));
    assert_eq!(err.code, 404);
    assert_eq!(err.message, "configmaps \"a\" not found");
}

/// A custom object is defaulted, pruned, validated, and its status and spec are written separately.
#[tokio::test]
async fn custom_resource_status_generation_and_validation() {
    let server = server().await;
    let api = widgets(&server);
    let created = api
        .create(
            &PostParams::default(),
            &widget("w", json!({"size": 3, "bogus": 1})),
        )
        .await
        .expect("create");
    assert_eq!(
        created.data["spec"],
        json!({"size": 3, "replicas": 1}),
        "defaulted and pruned"
    );
    assert_eq!(created.metadata.generation, Some(1));

    let err = api_error(
        api.create(
            &PostParams::default(),
            &widget("bad", json!({"size": 11, "color": "green"})),
        )
        .await
        .expect_err("invalid"),
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        err.message,
        "Widget.example.dev \"bad\" is invalid: [spec.color: Unsupported value: \"green\": supported values: \"red\", \"blue\", spec.size: Invalid value: 11: spec.size in body should be less than or equal to 10]"
    );
    let err = api_error(
        api.create(&PostParams::default(), &widget("bad", json!({})))
            .await
            .expect_err("missing"),
    );
    assert!(
        err.message.ends_with("spec.size: Required value"),
        "{}",
        err.message
    );

    let body = serde_json::to_vec(&widget("strict", json!({"size": 1, "foo": 1}))).expect("body");
    let request = axum::http::Request::post(
        "/apis/example.dev/v1/namespaces/default/widgets?fieldValidation=Strict",
    )
    .header("content-type", "application/json")
    .body(body)
    .expect("request");
    let err = api_error(
        server
            .client()
            .expect("client")
            .request::<Value>(request)
            .await
            .expect_err("strict"),
    );
    assert_eq!(err.code, 400);
    assert!(
        err.message
            .contains("strict decoding error: unknown field \"spec.foo\""),
        "{}",
        err.message
    );

    let status = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}, "spec": {"size": 9}})),
        )
        .await
        .expect("status patch");
    assert_eq!(
        (
            status.data["spec"]["size"].clone(),
            status.data["status"]["phase"].clone()
        ),
        (json!(3), json!("Ready"))
    );
    assert_eq!(
        status.metadata.generation,
        Some(1),
        "status writes keep the generation"
    );

    let spec = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 4}, "status": {"phase": "Ignored"}})),
        )
        .await
        .expect("spec patch");
    assert_eq!(
        (
            spec.data["spec"]["size"].clone(),
            spec.data["status"]["phase"].clone()
        ),
        (json!(4), json!("Ready"))
    );
    assert_eq!(spec.metadata.generation, Some(2));

    let labelled = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("label patch");
    assert_eq!(
        labelled.metadata.generation,
        Some(2),
        "metadata changes keep the generation"
    );

    let mut no_rv = labelled.clone();
    no_rv.metadata.resource_version = None;
    let err = api_error(
        api.replace("w", &PostParams::default(), &no_rv)
            .await
            .expect_err("unconditional"),
    );
    assert_eq!(
        err.code, 422,
        "custom resources need a resourceVersion on update: {err:?}"
    );

    let scale = api.get_scale("w").await.expect("scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
    api.patch_scale(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .expect("scale patch");
    assert_eq!(
        api.get("w").await.expect("get").data["spec"]["replicas"],
        json!(5)
    );
}

/// Deleting an object with a finalizer only marks it until the finalizer is removed.
#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = server().await;
    let api = widgets(&server);
    let mut w = widget("f", json!({"size": 1}));
    w.metadata.finalizers = Some(vec!["example.dev/cleanup".to_string()]);
    api.create(&PostParams::default(), &w)
        .await
        .expect("create");
    let deleted = api
        .delete("f", &DeleteParams::default())
        .await
        .expect("delete");
    let marked = deleted.left().expect("object still present");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(
        api.get("f")
            .await
            .expect("still there")
            .metadata
            .deletion_timestamp
            .is_some()
    );
    api.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("unfinalize");
    let err = api_error(api.get("f").await.expect_err("removed"));
    assert_eq!(err.message, "widgets.example.dev \"f\" not found");
}

/// Deleting an owner removes its dependents (background cascading).
#[tokio::test]
async fn owner_references_cascade() {
    let server = server().await;
    let client = server.client().expect("client");
    let deps: Api<Deployment> = Api::default_namespaced(client.clone());
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let owner = deps
        .create(&PostParams::default(), &deployment("owner"))
        .await
        .expect("owner");
    let uid = owner.metadata.uid.clone().expect("uid");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "dep", "ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner", "uid": uid}]}}))
        .expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("dependent");
    deps.delete("owner", &DeleteParams::default())
        .await
        .expect("delete owner");
    assert_eq!(
        api_error(cms.get("dep").await.expect_err("collected")).code,
        404
    );
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}]},
                {"name": "sidecar", "image": "side:1"}]}}}
    }))
    .expect("deployment")
}

/// Deployments support strategic merge, JSON patch (a failed `test` is 422), scale and status.
#[tokio::test]
async fn deployment_patches_scale_and_status() {
    let server = server().await;
    let deps: Api<Deployment> = Api::default_namespaced(server.client().expect("client"));
    deps.create(&PostParams::default(), &deployment("web"))
        .await
        .expect("create");
    let patched = deps
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "app:2", "env": [{"name": "B", "value": "2"}]}]}}}})),
        )
        .await
        .expect("strategic");
    let patched_json = serde_json::to_value(&patched).expect("json");
    let containers = &patched_json["spec"]["template"]["spec"]["containers"];
    assert_eq!(
        containers.as_array().map(Vec::len),
        Some(2),
        "containers merge by name: {containers}"
    );
    assert_eq!(containers[0]["image"], json!("app:2"));
    assert_eq!(
        containers[0]["env"].as_array().map(Vec::len),
        Some(2),
        "env merges by name: {containers}"
    );
    assert_eq!(patched.metadata.generation, Some(2));

    let test_fails: Patch<()> = Patch::Json(
        serde_json::from_value(json!([{"op": "test", "path": "/spec/replicas", "value": 7}]))
            .expect("patch"),
    );
    let err = api_error(
        deps.patch("web", &PatchParams::default(), &test_fails)
            .await
            .expect_err("test op"),
    );
    assert_eq!(err.code, 422, "{err:?}");
    let ok: Patch<()> = Patch::Json(
        serde_json::from_value(json!([{"op": "test", "path": "/spec/replicas", "value": 1},
        {"op": "replace", "path": "/spec/replicas", "value": 2}]))
        .expect("patch"),
    );
    deps.patch("web", &PatchParams::default(), &ok)
        .await
        .expect("json patch");

    let scale = deps.get_scale("web").await.expect("scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(2));
    assert_eq!(
        scale.status.and_then(|s| s.selector).as_deref(),
        Some("app=web")
    );
    deps.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await
    .expect("scale");
    deps.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"readyReplicas": 4}})),
    )
    .await
    .expect("status");
    let d = deps.get("web").await.expect("get");
    assert_eq!(d.spec.replicas, Some(4));
    assert_eq!(d.status.and_then(|s| s.ready_replicas), Some(4));
}

/// Server-side apply creates, is idempotent, reports conflicts with another manager, and force wins.
#[tokio::test]
async fn server_side_apply_conflicts_and_force() {
    let server = server().await;
    let api = widgets(&server);
    let apply = |size: i64| {
        Patch::Apply(
            json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "ssa"}, "spec": {"size": size}}),
        )
    };
    let first = api
        .patch("ssa", &PatchParams::apply("alice"), &apply(2))
        .await
        .expect("create by apply");
    let again = api
        .patch("ssa", &PatchParams::apply("alice"), &apply(2))
        .await
        .expect("re-apply");
    assert_eq!(
        first.metadata.resource_version, again.metadata.resource_version,
        "no-op apply keeps the resourceVersion"
    );
    let err = api_error(
        api.patch("ssa", &PatchParams::apply("bob"), &apply(3))
            .await
            .expect_err("conflict"),
    );
    assert_eq!(err.code, 409);
    assert!(
        err.message.contains("conflict with \"alice\""),
        "{}",
        err.message
    );
    let forced = api
        .patch("ssa", &PatchParams::apply("bob").force(), &apply(3))
        .await
        .expect("force");
    assert_eq!(forced.data["spec"]["size"], json!(3));
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains(&"bob".to_string()), "{managers:?}");
}

/// kube-runtime's watcher sees creates, updates and deletes in list-watch and streaming-list modes.
#[tokio::test]
async fn kube_runtime_watcher_both_modes() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    let seed: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "seed", "labels": {"w": "1"}}}))
            .expect("cm");
    cms.create(&PostParams::default(), &seed)
        .await
        .expect("seed");
    for config in [
        watcher::Config::default().labels("w=1"),
        watcher::Config::default().labels("w=1").streaming_lists(),
    ] {
        let mut stream = watcher(cms.clone(), config).boxed();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let writer = cms.clone();
        let mut wrote = false;
        while !seen.iter().any(|s: &String| s == "delete:late") {
            let ev = tokio::time::timeout_at(deadline, stream.try_next())
                .await
                .unwrap_or_else(|_| panic!("timed out; saw {seen:?}"));
            match ev.expect("watch ok").expect("stream open") {
                watcher::Event::InitApply(o) => {
                    seen.push(format!("init:{}", o.metadata.name.unwrap_or_default()))
                }
                watcher::Event::InitDone => {
                    seen.push("init-done".into());
                    if !wrote {
                        wrote = true;
                        let late: ConfigMap = serde_json::from_value(
                            json!({"metadata": {"name": "late", "labels": {"w": "1"}}}),
                        )
                        .expect("cm");
                        writer
                            .create(&PostParams::default(), &late)
                            .await
                            .expect("late");
                        writer
                            .delete("late", &DeleteParams::default())
                            .await
                            .expect("delete late");
                    }
                }
                watcher::Event::Apply(o) => {
                    seen.push(format!("apply:{}", o.metadata.name.unwrap_or_default()))
                }
                watcher::Event::Delete(o) => {
                    seen.push(format!("delete:{}", o.metadata.name.unwrap_or_default()))
                }
                watcher::Event::Init => {}
            }
        }
        assert_eq!(
            seen,
            ["init:seed", "init-done", "apply:late", "delete:late"]
        );
    }
}

/// A watch from a resourceVersion older than the kept history ends with a 410 Gone ERROR event.
#[tokio::test]
async fn watch_too_old_is_gone() {
    let server = ApiServer::start(Options {
        history_limit: 5,
        ..Options::default()
    })
    .await
    .expect("server");
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client().expect("client"));
    for i in 0..10 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).expect("cm");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
    }
    let mut stream = cms
        .watch(&kube::api::WatchParams::default(), "1")
        .await
        .expect("watch")
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("event in time");
    match first {
        Some(Ok(kube::api::WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        Some(Err(kube::Error::Api(e))) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// A ConfigMap with labels, annotations and data.
fn labelled_cm(name: &str, labels: Value, annotations: Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels, "annotations": annotations},
        "data": {"secret": "not in metadata"}}),
    )
    .expect("cm")
}

/// `PartialObjectMeta`'s kind (its TypeMeta, as the server sent it).
fn meta_kind<K>(o: &PartialObjectMeta<K>) -> &str {
    o.types.as_ref().map(|t| t.kind.as_str()).unwrap_or("")
}

/// Sends a GET with an `Accept` header; the status code and the body (a watch's event lines
/// as an array).
async fn get_as(client: &kube::Client, path: &str, accept: &str) -> (u16, Value) {
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, accept)
        .body(kube::client::Body::from(Vec::new()))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), client.send(request))
        .await
        .expect("answer in time")
        .expect("answer");
    let code = response.status().as_u16();
    let bytes = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let body = if path.contains("watch=true") {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Value>(l).expect("event line"))
            .collect()
    } else {
        serde_json::from_str(&text).expect("json body")
    };
    (code, body)
}

/// kube-runtime's `metadata_watcher` (list then watch) and a watcher of
/// `Api<PartialObjectMeta<ConfigMap>>` (streaming list) see selected ConfigMaps created,
/// annotated and deleted, with their labels and annotations, as `PartialObjectMetadata`.
#[tokio::test]
async fn metadata_watchers_see_labels_and_annotations() {
    let server = server().await;
    let client = server.client().expect("client");
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let metas: Api<PartialObjectMeta<ConfigMap>> = Api::default_namespaced(client);
    let seed = labelled_cm("seed", json!({"m": "1"}), json!({"note": "seeded"}));
    cms.create(&PostParams::default(), &seed)
        .await
        .expect("seed");
    let other = labelled_cm("other", json!({"m": "2"}), json!({}));
    cms.create(&PostParams::default(), &other)
        .await
        .expect("other");
    #[allow(deprecated)] // the recommended replacement is the second stream
    let list_watch =
        kube::runtime::metadata_watcher(cms.clone(), watcher::Config::default().labels("m=1"))
            .boxed();
    let streaming = watcher(
        metas.clone(),
        watcher::Config::default().labels("m=1").streaming_lists(),
    )
    .boxed();
    let modes = [
        ("list-watch", "late-1", list_watch),
        ("streaming list", "late-2", streaming),
    ];
    for (mode, late, mut stream) in modes {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut wrote = false;
        let mut deleted = false;
        while !deleted {
            let ev = tokio::time::timeout_at(deadline, stream.try_next())
                .await
                .unwrap_or_else(|_| panic!("{mode}: timed out; saw {seen:?}"));
            let (what, o) = match ev.expect("watch ok").expect("stream open") {
                watcher::Event::InitApply(o) => ("init", o),
                watcher::Event::Apply(o) => ("apply", o),
                watcher::Event::Delete(o) => ("delete", o),
                watcher::Event::Init => continue,
                watcher::Event::InitDone => {
                    seen.push("init-done".to_string());
                    if !wrote {
                        wrote = true;
                        let cm = labelled_cm(late, json!({"m": "1"}), json!({"note": "v1"}));
                        cms.create(&PostParams::default(), &cm).await.expect("late");
                        metas
                            .patch(
                                late,
                                &PatchParams::default(),
                                &Patch::Merge(json!({"metadata": {"annotations": {"note": "v2"}}})),
                            )
                            .await
                            .expect("annotate late");
                        cms.delete(late, &DeleteParams::default())
                            .await
                            .expect("delete late");
                    }
                    continue;
                }
            };
            assert_eq!(meta_kind(&o), "PartialObjectMetadata", "{mode}: {o:?}");
            assert_eq!(
                o.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("m"))
                    .map(String::as_str),
                Some("1"),
                "{mode}: {o:?}"
            );
            let note = o
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("note"))
                .cloned()
                .unwrap_or_default();
            let name = o.metadata.name.unwrap_or_default();
            deleted = what == "delete";
            seen.push(format!("{what}:{name}:{note}"));
        }
        assert_eq!(
            seen,
            [
                "init:seed:seeded".to_string(),
                "init-done".to_string(),
                format!("apply:{late}:v1"),
                format!("apply:{late}:v2"),
                format!("delete:{late}:v2"),
            ],
            "{mode}"
        );
    }
}

/// `list_metadata` with a label selector and pages, `get_metadata` and a metadata patch answer
/// `PartialObjectMetadata` with labels and annotations.
#[tokio::test]
async fn list_get_and_patch_metadata() {
    let server = server().await;
    let client = server.client().expect("client");
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for (name, tier) in [("a", "front"), ("b", "back"), ("c", "front")] {
        let cm = labelled_cm(name, json!({"tier": tier}), json!({"owner": name}));
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
    }
    let list = cms
        .list_metadata(&ListParams::default().labels("tier=front"))
        .await
        .expect("list_metadata");
    let names: Vec<String> = list
        .items
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a", "c"]);
    assert!(
        list.items
            .iter()
            .all(|o| meta_kind(o) == "PartialObjectMetadata")
    );
    assert_eq!(
        list.items[1]
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("owner"))
            .map(String::as_str),
        Some("c")
    );
    assert!(list.metadata.resource_version.is_some());

    let first = cms
        .list_metadata(&ListParams::default().limit(2))
        .await
        .expect("page 1");
    let token = first.metadata.continue_.clone().expect("a continue token");
    let rest = cms
        .list_metadata(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    let pages: Vec<String> = first
        .items
        .iter()
        .chain(&rest.items)
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    assert_eq!(pages, ["a", "b", "c"]);
    assert_eq!(first.metadata.remaining_item_count, Some(1));

    let b = cms.get_metadata("b").await.expect("get_metadata");
    assert_eq!(meta_kind(&b), "PartialObjectMetadata");
    assert_eq!(
        b.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("tier"))
            .map(String::as_str),
        Some("back")
    );
    let missing = api_error(cms.get_metadata("nope").await.expect_err("missing"));
    assert_eq!(missing.code, 404);

    let metas: Api<PartialObjectMeta<ConfigMap>> = Api::default_namespaced(client);
    let patched = metas
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
        )
        .await
        .expect("patch_metadata");
    assert_eq!(meta_kind(&patched), "PartialObjectMetadata");
    assert_eq!(
        patched
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("tier"))
            .map(String::as_str),
        Some("front")
    );
    assert_eq!(
        cms.get("b").await.expect("get").data.map(|d| d.len()),
        Some(1)
    );
}

/// On the wire: a metadata list, get and watch (with its BOOKMARK) carry `metadata` only, no
/// `data`; a list asked for `PartialObjectMetadata` and an object asked for the list are 406.
#[tokio::test]
async fn metadata_answers_carry_no_data() {
    let server = server().await;
    let client = server.client().expect("client");
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm = labelled_cm("wire", json!({"w": "1"}), json!({"a": "b"}));
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let path = "/api/v1/namespaces/default/configmaps";
    let (code, list) = get_as(
        &client,
        &format!("{path}?labelSelector=w%3D1"),
        METADATA_LIST,
    )
    .await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["apiVersion"], "meta.k8s.io/v1");
    assert!(list["metadata"]["resourceVersion"].is_string(), "{list}");
    assert!(list["metadata"].get("continue").is_none(), "{list}");
    let item = &list["items"][0];
    assert_eq!(
        (item["kind"].as_str(), item["apiVersion"].as_str()),
        (Some("PartialObjectMetadata"), Some("meta.k8s.io/v1"))
    );
    assert_eq!(item["metadata"]["labels"], json!({"w": "1"}));
    assert_eq!(item["metadata"]["annotations"], json!({"a": "b"}));
    assert!(item["metadata"]["uid"].is_string(), "{item}");
    assert_eq!(item.as_object().map(|o| o.len()), Some(3), "{item}");

    let (code, one) = get_as(&client, &format!("{path}/wire"), METADATA).await;
    assert_eq!(code, 200, "{one}");
    assert_eq!(one, *item);

    let (code, status) = get_as(&client, path, METADATA).await;
    assert_eq!(code, 406, "{status}");
    assert_eq!(status["reason"], "NotAcceptable");
    assert_eq!(
        status["message"],
        "you requested PartialObjectMetadata, but the requested object is a list (*core.ConfigMapList)"
    );
    let (code, status) = get_as(&client, &format!("{path}/wire"), METADATA_LIST).await;
    assert_eq!(code, 406, "{status}");
    assert_eq!(
        status["message"],
        "you requested PartialObjectMetadataList, but the requested object is not a list (*core.ConfigMap)"
    );

    let watch = format!(
        "{path}?watch=true&labelSelector=w%3D1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1"
    );
    let (code, events) = get_as(&client, &watch, METADATA).await;
    assert_eq!(code, 200);
    let events = events.as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0], json!({"type": "ADDED", "object": item}));
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(events[1]["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(events[1]["object"]["apiVersion"], "meta.k8s.io/v1");
    assert_eq!(
        events[1]["object"]["metadata"]["annotations"],
        json!({"k8s.io/initial-events-end": "true"})
    );
}

/// A client whose `Config::headers` sets a User-Agent.
fn client_as(server: &ApiServer, user_agent: &'static str) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().expect("url"));
    config.default_namespace = "default".to_string();
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(user_agent),
    ));
    kube::Client::try_from(config).expect("client")
}

/// Two clients with their own User-Agent doing a get, a list, a watch, a status replace and a
/// discovery request are counted apart, by verb and resource; kube's default client sends no
/// User-Agent and counts as `unknown`.
#[tokio::test]
async fn request_counts_by_client_verb_and_resource() {
    let server = server().await;
    widgets(&server)
        .create(
            &PostParams::default(),
            &widget("counted", json!({"size": 1})),
        )
        .await
        .expect("create");
    let gvk = GroupVersionKind::gvk("example.dev", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    for user_agent in ["alpha/1.0", "beta/2.0 (linux/amd64) serin/abc"] {
        let client = client_as(&server, user_agent);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
        let mut w = api.get("counted").await.expect("get");
        api.list(&ListParams::default()).await.expect("list");
        let mut events = api
            .watch(&WatchParams::default().timeout(1), "0")
            .await
            .expect("watch")
            .boxed();
        // The watch is counted when it arrives; reading from it only shows that it is open.
        tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("the watch answers in time");
        w.data["status"] = json!({"phase": user_agent});
        api.replace_status("counted", &PostParams::default(), &w)
            .await
            .expect("replace status");
        client.apiserver_version().await.expect("version");
    }
    let key = |client: &str, verb: &str, resource: &str| RequestKey {
        client: client.to_string(),
        verb: verb.to_string(),
        resource: resource.to_string(),
    };
    let mut expected = BTreeMap::from([(key("unknown", "create", "widgets"), 1)]);
    for client in ["alpha", "beta"] {
        for (verb, resource) in [
            ("get", "widgets"),
            ("list", "widgets"),
            ("watch", "widgets"),
            ("update", "widgets/status"),
            ("get", "version"),
        ] {
            expected.insert(key(client, verb, resource), 1);
        }
    }
    assert_eq!(server.request_counts(), expected);
}
