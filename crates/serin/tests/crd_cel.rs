//! The CEL rules in Serin's generated CRD, evaluated as a cluster would: through the
//! embedded API server (which runs `x-kubernetes-validations` with kube-cel) over HTTP.

use std::path::Path;

use kube::api::{Api, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube_sandbox::{ApiServer, Options};
use serde_json::{Value, json};

fn example(name: &str) -> Value {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("examples")
        .join(name);
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::from_str(&text).unwrap()
}

async fn server() -> (ApiServer, Api<DynamicObject>) {
    let server = ApiServer::start(Options::default()).await.unwrap();
    let crd: Value = serde_norway::from_str(&serin::api::crd_yaml().unwrap()).unwrap();
    server.apply_crd(crd).unwrap();
    let client = server.client().unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "cel"}})).unwrap(),
        )
        .await
        .unwrap();
    let gvk = GroupVersionKind::gvk("serin.dev", "v1alpha1", "Canary");
    let ar = kube::core::ApiResource::from_gvk_with_plural(&gvk, "canaries");
    (server, Api::namespaced_with(client, "cel", &ar))
}

async fn create(api: &Api<DynamicObject>, mut obj: Value, name: &str) -> Result<(), String> {
    obj["metadata"] = json!({"name": name, "namespace": "cel"});
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(format!("{} {}", s.code, s.message)),
        Err(e) => Err(e.to_string()),
    }
}

/// A change to a valid Canary.
type Mutation = Box<dyn Fn(&mut Value)>;

/// Every example Canary is accepted by the CRD's schema and CEL rules.
#[tokio::test]
async fn examples_pass_the_crd_rules() {
    let (_server, api) = server().await;
    for (i, name) in [
        "appmesh-workload.yaml",
        "appmesh-colorapp-traffic.yaml",
        "gloo-upstreamgroup.yaml",
        "gateway-api.yaml",
        "appmesh-api-cloudwatch.yaml",
        "gateway-api-webhooks.yaml",
    ]
    .iter()
    .enumerate()
    {
        create(&api, example(name), &format!("ok-{i}"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Each cross-field mistake is rejected by its CEL rule with a 422 naming the field.
#[tokio::test]
async fn cel_rules_reject_cross_field_mistakes() {
    let (_server, api) = server().await;
    let base = example("appmesh-workload.yaml");
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "steps-order",
            Box::new(|v| v["spec"]["steps"] = json!([50, 20, 100])),
            "steps must be strictly increasing",
        ),
        (
            "steps-dup",
            Box::new(|v| v["spec"]["steps"] = json!([50, 50, 100])),
            "steps must be strictly increasing",
        ),
        (
            "steps-last",
            Box::new(|v| v["spec"]["steps"] = json!([20, 50])),
            "the last step must be 100",
        ),
        (
            "steps-range",
            Box::new(|v| v["spec"]["steps"] = json!([0, 50, 100])),
            "each step must be between 1 and 100",
        ),
        (
            "both-modes",
            Box::new(|v| v["spec"]["backends"] = json!({"primary": "a", "canary": "b"})),
            "set exactly one of spec.targetRef",
        ),
        (
            "two-routers",
            Box::new(|v| v["spec"]["router"]["gatewayApi"] = json!({"httpRoute": {"name": "x"}})),
            "set exactly one of router.appMesh",
        ),
        (
            "no-bound",
            Box::new(|v| {
                v["spec"]["analysis"]["metrics"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("max");
            }),
            "set min, max or both",
        ),
        (
            "preset-and-query",
            Box::new(|v| v["spec"]["analysis"]["metrics"][0]["query"] = json!("sum(up)")),
            "set exactly one of preset, query",
        ),
        (
            "two-providers",
            Box::new(|v| {
                v["spec"]["analysis"]["metrics"][0]["provider"]["cloudWatch"] =
                    json!({"region": "us-west-2"})
            }),
            "set exactly one of provider.prometheus or provider.cloudWatch",
        ),
    ];
    for (name, mutate, expected) in cases {
        let mut obj = base.clone();
        mutate(&mut obj);
        let err = create(&api, obj, name).await.expect_err(name);
        assert!(err.starts_with("422"), "{name}: {err}");
        assert!(
            err.contains(expected),
            "{name}: expected {expected:?} in {err}"
        );
    }
}
