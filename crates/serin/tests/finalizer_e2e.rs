//! Traffic mode with weights outside Kubernetes (App Mesh through the AWS API, moto here):
//! the Canary holds Serin's finalizer (as every Canary does), and deleting it mid-rollout
//! with the default `deletionPolicy: Revert` makes the real operator move all traffic to the
//! primary before the Canary goes away. (Workload-mode deletion: real_cluster.rs.)

mod router_support;
mod support;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_appmesh::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_appmesh::types::{
    HttpRoute, HttpRouteAction, HttpRouteMatch, PortMapping, PortProtocol, RouteSpec,
    VirtualRouterListener, VirtualRouterSpec, WeightedTarget,
};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::json;
use serin::api::Canary;
use serin::controller::FINALIZER;

use router_support::proxy::{Proxy, normalise_moto};
use support::e2e::*;
use support::{require, wait_for};

const REGION: &str = "us-west-2";

fn target(node: &str, weight: i32) -> WeightedTarget {
    WeightedTarget::builder()
        .virtual_node(node)
        .weight(weight)
        .build()
        .unwrap()
}

async fn weights(aws: &aws_sdk_appmesh::Client) -> Vec<(String, i32)> {
    let out = aws
        .describe_route()
        .mesh_name("fin-mesh")
        .virtual_router_name("vr")
        .route_name("route")
        .send()
        .await
        .unwrap();
    let spec = out.route().unwrap().spec().unwrap();
    spec.http_route()
        .unwrap()
        .action()
        .unwrap()
        .weighted_targets()
        .iter()
        .map(|t| (t.virtual_node().to_string(), t.weight()))
        .collect()
}

/// Deleting a Canary mid-rollout restores 100% primary on the App Mesh route (through the
/// AWS API) and only then lets the Canary go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_canary_mid_rollout_restores_the_primary() {
    require("moto_server");
    let Some(env) = env(|_, _| vec![]).await else {
        return;
    };
    let moto = support::moto::shared();
    let proxy = Proxy::start(&moto.url, Some(Arc::new(normalise_moto))).await;
    let conf = aws_sdk_appmesh::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "AKIDTEST", "secret", None, None, "test",
        )))
        .endpoint_url(&proxy.url)
        .build();
    let aws = aws_sdk_appmesh::Client::from_conf(conf);
    aws.create_mesh()
        .mesh_name("fin-mesh")
        .send()
        .await
        .unwrap();
    let listener = VirtualRouterListener::builder()
        .port_mapping(
            PortMapping::builder()
                .port(9080)
                .protocol(PortProtocol::Http)
                .build()
                .unwrap(),
        )
        .build();
    aws.create_virtual_router()
        .mesh_name("fin-mesh")
        .virtual_router_name("vr")
        .spec(VirtualRouterSpec::builder().listeners(listener).build())
        .send()
        .await
        .unwrap();
    let action = HttpRouteAction::builder()
        .weighted_targets(target("colorteller-white", 100))
        .weighted_targets(target("colorteller-blue", 0))
        .build()
        .unwrap();
    let route = HttpRoute::builder()
        .r#match(HttpRouteMatch::builder().prefix("/").build())
        .action(action)
        .build();
    aws.create_route()
        .mesh_name("fin-mesh")
        .virtual_router_name("vr")
        .route_name("route")
        .spec(RouteSpec::builder().http_route(route).build())
        .send()
        .await
        .unwrap();

    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    let obj = json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "colorteller", "namespace": env.ns},
        "spec": {
            "backends": {"primary": "colorteller-white", "canary": "colorteller-blue"},
            "service": {"name": "colorteller", "port": 9080},
            "router": {"appMeshApi": {"mesh": "fin-mesh", "virtualRouter": "vr", "route": "route",
                                      "region": REGION, "endpoint": proxy.url}},
            "steps": [20, 50, 100],
            "analysis": {"interval": "1m", "metrics": [{
                "name": "always-fine", "provider": {"prometheus": {"address": env.prometheus.url}},
                "query": "vector(0)", "max": 1}]}
        }
    });
    canaries
        .create(
            &PostParams::default(),
            &serde_json::from_value(obj).unwrap(),
        )
        .await
        .unwrap();
    // An operator that does not allow the endpoint refuses the Canary: Invalid, naming the
    // field and the setting, and not one AWS call is made with Serin's identity.
    let typed: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    proxy.clear();
    let mut strict = Operator::start_with_env(
        &env,
        env.cluster.dir.path().join("strict-operator.log"),
        &[],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_REGION", REGION),
        ],
    );
    let invalid = wait_for("the Canary to be Invalid", Duration::from_secs(30), || {
        let typed = typed.clone();
        async move {
            let c = typed.get("colorteller").await.ok()?;
            let status = c.status?;
            serin::api::find_condition(&status.conditions, serin::api::INVALID)
                .filter(|c| c.status == serin::api::ConditionStatus::True)
                .map(|c| c.message.clone())
        }
    })
    .await;
    assert!(
        invalid.contains("spec.router.appMeshApi.endpoint")
            && invalid.contains("--allow-aws-endpoint")
            && invalid.contains("aws.allowedEndpoints"),
        "{invalid}"
    );
    // The Event follows the status write: wait for it.
    let events = events_after(&env, "colorteller", "Invalid").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Invalid" && m.contains("spec.router.appMeshApi.endpoint")),
        "{events:?}"
    );
    strict.kill();
    assert_eq!(proxy.requests(), Vec::<String>::new(), "{}", strict.log());

    let op = Operator::start_with_env(
        &env,
        env.cluster.dir.path().join("operator.log"),
        // The Canary points Serin's AWS identity at the local moto: the operator must
        // allow that endpoint (crate::policy).
        &["--allow-aws-endpoint", "http://127.0.0.1:*"],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_REGION", REGION),
        ],
    );
    let twenty = vec![
        ("colorteller-white".to_string(), 80),
        ("colorteller-blue".to_string(), 20),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while weights(&aws).await != twenty {
        if std::time::Instant::now() > deadline {
            dump(&env, &op, "colorteller").await;
            panic!("the rollout did not reach 20%: {:?}", weights(&aws).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = typed.get("colorteller").await.unwrap();
    assert!(
        c.metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == FINALIZER)
    );

    typed
        .delete("colorteller", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the Canary to be gone", Duration::from_secs(30), || {
        let typed = typed.clone();
        async move {
            typed
                .get_opt("colorteller")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        weights(&aws).await,
        vec![
            ("colorteller-white".to_string(), 100),
            ("colorteller-blue".to_string(), 0)
        ],
        "{}",
        op.log()
    );
}
