//! The App Mesh AWS API router against moto's server, through the normalising proxy of
//! `router_support::proxy` (moto's timestamps and not-found errors made AWS-shaped), which
//! also records the requests and injects throttling and errors.

mod router_support;
#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_appmesh::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_sdk_appmesh::types::{
    Duration as AwsDuration, DurationUnit, HeaderMatchMethod, HttpRetryPolicy, HttpRoute,
    HttpRouteAction, HttpRouteHeader, HttpRouteMatch, HttpTimeout, RouteSpec, WeightedTarget,
};
use serin::api::Canary;
use serin::arms::Weights;
use serin::router::{AppMeshAwsRouter, AwsOptions, Router, RouterError, WriteOutcome};

use router_support::proxy::{Proxy, normalise_moto};

const REGION: &str = "us-west-2";

struct Env {
    proxy: Proxy,
    router: AppMeshAwsRouter,
    /// A client for arranging and inspecting state (through the same proxy).
    aws: aws_sdk_appmesh::Client,
    mesh: String,
}

fn credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new(
        "AKIDSERINTEST",
        "secret",
        None,
        None,
        "test",
    ))
}

/// A mesh named `mesh` in moto with the router `vr` and the route `route` (white 100, blue 0,
/// with a header match, a retry policy and a timeout).
async fn env(mesh: &str) -> Env {
    let moto = support::moto::shared();
    let proxy = Proxy::start(&moto.url, Some(Arc::new(normalise_moto))).await;
    let router = AppMeshAwsRouter::with_options(AwsOptions {
        credentials: Some(credentials()),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    });
    let conf = aws_sdk_appmesh::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(credentials())
        .endpoint_url(&proxy.url)
        .build();
    let aws = aws_sdk_appmesh::Client::from_conf(conf);
    aws.create_mesh()
        .mesh_name(mesh)
        .send()
        .await
        .expect("create mesh");
    aws.create_virtual_router()
        .mesh_name(mesh)
        .virtual_router_name("vr")
        .spec(
            aws_sdk_appmesh::types::VirtualRouterSpec::builder()
                .listeners(
                    aws_sdk_appmesh::types::VirtualRouterListener::builder()
                        .port_mapping(
                            aws_sdk_appmesh::types::PortMapping::builder()
                                .port(9080)
                                .protocol(aws_sdk_appmesh::types::PortProtocol::Http)
                                .build()
                                .expect("port mapping"),
                        )
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("create router");
    aws.create_route()
        .mesh_name(mesh)
        .virtual_router_name("vr")
        .route_name("route")
        .spec(route_spec(&[
            ("colorteller-white", 100),
            ("colorteller-blue", 0),
        ]))
        .send()
        .await
        .expect("create route");
    proxy.clear();
    Env {
        proxy,
        router,
        aws,
        mesh: mesh.to_string(),
    }
}

fn target(node: &str, weight: i32) -> WeightedTarget {
    WeightedTarget::builder()
        .virtual_node(node)
        .weight(weight)
        .build()
        .expect("target")
}

fn route_spec(targets: &[(&str, i32)]) -> RouteSpec {
    let action = HttpRouteAction::builder()
        .set_weighted_targets(Some(targets.iter().map(|(n, w)| target(n, *w)).collect()))
        .build()
        .expect("action");
    let retry = HttpRetryPolicy::builder()
        .max_retries(3)
        .per_retry_timeout(
            AwsDuration::builder()
                .unit(DurationUnit::Ms)
                .value(250)
                .build(),
        )
        .http_retry_events("server-error")
        .http_retry_events("gateway-error")
        .build()
        .expect("retry");
    let matcher = HttpRouteMatch::builder()
        .prefix("/")
        .headers(
            HttpRouteHeader::builder()
                .name("x-canary-tenant")
                .r#match(HeaderMatchMethod::Exact("beta".into()))
                .build()
                .expect("header"),
        )
        .build();
    let timeout = HttpTimeout::builder()
        .per_request(
            AwsDuration::builder()
                .unit(DurationUnit::S)
                .value(15)
                .build(),
        )
        .build();
    RouteSpec::builder()
        .priority(7)
        .http_route(
            HttpRoute::builder()
                .r#match(matcher)
                .action(action)
                .retry_policy(retry)
                .timeout(timeout)
                .build(),
        )
        .build()
}

fn canary(env: &Env, extra: &str) -> Canary {
    let yaml = router_support::canary_yaml(
        "colorteller",
        "delivery",
        &router_support::traffic("colorteller-white", "colorteller-blue"),
        &format!(
            "  router:\n    appMeshApi:\n      mesh: {}\n      virtualRouter: vr\n      route: route\n      region: {REGION}\n      endpoint: {}{extra}",
            env.mesh, env.proxy.url
        ),
    );
    serde_norway::from_str(&yaml).expect("Canary")
}

async fn described(env: &Env) -> RouteSpec {
    env.aws
        .describe_route()
        .mesh_name(&env.mesh)
        .virtual_router_name("vr")
        .route_name("route")
        .send()
        .await
        .expect("describe")
        .route
        .and_then(|r| r.spec)
        .expect("spec")
}

async fn set_route(env: &Env, targets: &[(&str, i32)]) {
    env.aws
        .update_route()
        .mesh_name(&env.mesh)
        .virtual_router_name("vr")
        .route_name("route")
        .spec(route_spec(targets))
        .send()
        .await
        .expect("update");
    env.proxy.clear();
}

/// UpdateRoute carries match, retry policy, timeout and priority over unchanged; only the
/// weights move. The second identical call is one DescribeRoute and no UpdateRoute.
#[tokio::test]
async fn update_keeps_the_rest_of_the_route() {
    let env = env("mesh-update").await;
    let c = canary(&env, "");
    env.router.prepare(&c).await.expect("prepare");
    assert_eq!(
        env.router.weights(&c).await.expect("weights"),
        Weights::STABLE
    );
    env.proxy.clear();
    let w20 = Weights::with_canary(20);
    assert_eq!(
        env.router
            .set_weights(&c, Weights::STABLE, w20)
            .await
            .expect("set"),
        WriteOutcome::Written
    );
    let path = format!(
        "/v20190125/meshes/{}/virtualRouter/vr/routes/route",
        env.mesh
    );
    assert_eq!(
        env.proxy.requests(),
        vec![format!("GET {path}"), format!("PUT {path}")]
    );
    assert_eq!(
        described(&env).await,
        route_spec(&[("colorteller-white", 80), ("colorteller-blue", 20)])
    );
    env.proxy.clear();
    assert_eq!(
        env.router
            .set_weights(&c, Weights::STABLE, w20)
            .await
            .expect("again"),
        WriteOutcome::Unchanged
    );
    assert_eq!(env.proxy.requests(), vec![format!("GET {path}")]);
}

/// One SDK client per (region, endpoint, role): Canaries that share them share a client.
#[tokio::test]
async fn clients_are_cached_per_connection() {
    let env = env("mesh-cache").await;
    env.router.weights(&canary(&env, "")).await.expect("first");
    env.router.weights(&canary(&env, "")).await.expect("second");
    assert_eq!(env.router.cached_clients().await, 1);
    let other = Proxy::start(&support::moto::shared().url, Some(Arc::new(normalise_moto))).await;
    let mut c = canary(&env, "");
    if let Some(api) = c.spec.router.app_mesh_api.as_mut() {
        api.aws.endpoint = Some(other.url.clone());
    }
    env.router.weights(&c).await.expect("other endpoint");
    assert_eq!(env.router.cached_clients().await, 2);
}

/// A missing route or mesh is NotFound (moto's RouteNotFound/MeshNotFound, normalised to
/// AWS's 404 NotFoundException), and nothing is written.
#[tokio::test]
async fn missing_route_or_mesh_is_not_found() {
    let env = env("mesh-missing").await;
    let mut c = canary(&env, "");
    if let Some(api) = c.spec.router.app_mesh_api.as_mut() {
        api.route = "nope".into();
    }
    let err = env
        .router
        .set_weights(&c, Weights::STABLE, Weights::with_canary(10))
        .await
        .expect_err("no route");
    assert!(
        matches!(
            err,
            RouterError::NotFound {
                kind: "App Mesh route",
                ..
            }
        ),
        "{err}"
    );
    if let Some(api) = c.spec.router.app_mesh_api.as_mut() {
        api.mesh = "no-such-mesh".into();
    }
    let err = env.router.prepare(&c).await.expect_err("no mesh");
    assert!(matches!(err, RouterError::NotFound { .. }), "{err}");
    assert_eq!(env.proxy.requests_of("PUT"), Vec::<String>::new());
    // A deletion finds nothing to restore on a route that is gone, and says so.
    let err = serin::router::move_all(&env.router, &c, Weights::STABLE)
        .await
        .expect_err("restore on a missing route");
    assert!(matches!(err, RouterError::NotFound { .. }), "{err}");
}

/// Three targets, or a canary that is not among them: Unroutable, no UpdateRoute.
#[tokio::test]
async fn wrong_targets_are_unroutable() {
    let env = env("mesh-shapes").await;
    let c = canary(&env, "");
    set_route(
        &env,
        &[
            ("colorteller-white", 50),
            ("colorteller-blue", 0),
            ("colorteller-red", 50),
        ],
    )
    .await;
    let err = env
        .router
        .set_weights(&c, Weights::STABLE, Weights::with_canary(10))
        .await
        .expect_err("three");
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains("3 weighted targets")),
        "{err}"
    );
    set_route(&env, &[("colorteller-white", 100), ("colorteller-red", 0)]).await;
    let err = env.router.prepare(&c).await.expect_err("no canary");
    assert!(
        matches!(&err, RouterError::Unroutable { reason, .. } if reason.contains("colorteller-blue is not among them")),
        "{err}"
    );
    assert_eq!(env.proxy.requests_of("PUT"), Vec::<String>::new());
}

/// Weights changed outside Serin are reported and left; the deletion's restore moves all
/// traffic to the primary whatever is there.
#[tokio::test]
async fn hand_edits_are_reported_and_finalize_restores_the_primary() {
    let env = env("mesh-edits").await;
    let c = canary(&env, "");
    set_route(&env, &[("colorteller-white", 70), ("colorteller-blue", 30)]).await;
    let err = env
        .router
        .set_weights(&c, Weights::with_canary(20), Weights::with_canary(50))
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
    assert_eq!(env.proxy.requests_of("PUT"), Vec::<String>::new());
    serin::router::move_all(&env.router, &c, Weights::STABLE)
        .await
        .expect("restore");
    assert_eq!(
        described(&env).await,
        route_spec(&[("colorteller-white", 100), ("colorteller-blue", 0)])
    );
}

/// Throttling is retried with backoff: two TooManyRequestsException answers, then success.
/// When every attempt is throttled the error is retryable and nothing was written.
#[tokio::test]
async fn throttling_is_retried_a_bounded_number_of_times() {
    let env = env("mesh-throttle").await;
    let c = canary(&env, "");
    let throttle = |n| {
        env.proxy.answer(
            "GET",
            n,
            429,
            &[
                ("content-type", "application/json"),
                ("x-amzn-errortype", "TooManyRequestsException"),
            ],
            r#"{"__type":"TooManyRequestsException","message":"Rate exceeded"}"#,
        )
    };
    throttle(2);
    env.router
        .set_weights(&c, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect("succeeds after throttling");
    assert_eq!(env.proxy.requests_of("GET").len(), 3);
    assert_eq!(env.proxy.requests_of("PUT").len(), 1);

    env.proxy.clear();
    throttle(3);
    let err = env
        .router
        .set_weights(&c, Weights::with_canary(20), Weights::with_canary(50))
        .await
        .expect_err("throttled out");
    assert!(
        matches!(
            &err,
            RouterError::Aws {
                operation: "DescribeRoute",
                retryable: true,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        env.proxy.requests_of("GET").len(),
        3,
        "bounded by max_attempts"
    );
    assert_eq!(env.proxy.requests_of("PUT"), Vec::<String>::new());
    assert_eq!(
        env.router.weights(&c).await.expect("weights"),
        Weights::with_canary(20)
    );
}

/// A rejected UpdateRoute is a non-retryable AWS error and the route keeps its weights.
#[tokio::test]
async fn rejected_update_is_reported() {
    let env = env("mesh-reject").await;
    let c = canary(&env, "");
    env.proxy.answer(
        "PUT",
        1,
        400,
        &[
            ("content-type", "application/json"),
            ("x-amzn-errortype", "BadRequestException"),
        ],
        r#"{"__type":"BadRequestException","message":"weights are off"}"#,
    );
    let err = env
        .router
        .set_weights(&c, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect_err("rejected");
    assert!(
        matches!(&err, RouterError::Aws { operation: "UpdateRoute", retryable: false, message, .. } if message.contains("weights are off")),
        "{err}"
    );
    assert_eq!(
        env.router.weights(&c).await.expect("weights"),
        Weights::STABLE
    );
}

/// The mesh owner, when set, is sent on DescribeRoute and UpdateRoute.
#[tokio::test]
async fn mesh_owner_is_passed() {
    let env = env("mesh-owner").await;
    let owner = env
        .aws
        .describe_route()
        .mesh_name(&env.mesh)
        .virtual_router_name("vr")
        .route_name("route")
        .send()
        .await
        .expect("describe")
        .route
        .and_then(|r| r.metadata)
        .map(|m| m.mesh_owner)
        .expect("owner");
    env.proxy.clear();
    let c = canary(&env, &format!("\n      meshOwner: \"{owner}\""));
    env.router
        .set_weights(&c, Weights::STABLE, Weights::with_canary(50))
        .await
        .expect("set");
    let requests = env.proxy.requests();
    assert_eq!(requests.len(), 2);
    for r in requests {
        assert!(r.contains(&format!("meshOwner={owner}")), "{r}");
    }
}
