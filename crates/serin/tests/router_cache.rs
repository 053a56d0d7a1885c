//! The routers' cache of routing objects (`ObjectCache`) against this run's API server (the
//! real kube-apiserver when `SERIN_TEST_KUBECONFIG` is set, else the in-memory one): reads
//! of a Canary's weights cost no request once the watch holds the object, follow a hand
//! edit, never hide Serin's own write, never answer an absence, and fall back to the API
//! server when the watch cannot run. The router talks through a recording proxy; the cache
//! watches with its own client, so the proxy sees only the router's reads and writes.

mod router_support;
mod support;

use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject};
use serde_json::json;
use serin::api::Canary;
use serin::arms::Weights;
use serin::router::{GlooEdgeRouter, ObjectCache, Router, RouterError};

use router_support::proxy::Proxy;
use router_support::{Cluster, canary_yaml, traffic};

const GLOO: &str = "gloo.solo.io/v1";
const GROUP: &str = "upstreamgroup-gateway";
/// How long a watch may take to deliver an event in these tests.
const PATIENCE: Duration = Duration::from_secs(20);

struct Env {
    cluster: Cluster,
    proxy: Proxy,
    router: GlooEdgeRouter,
    cache: ObjectCache,
    canary: Canary,
}

/// An UpstreamGroup sending everything to the primary, a Canary routing through it, and a
/// Gloo router whose cache watches with `cache_client` (the test's own client when `None`).
async fn env(prefix: &str, cache_client: Option<kube::Client>) -> Option<Env> {
    let cluster = Cluster::start(prefix).await?;
    let (proxy, client) = cluster.proxy().await;
    let ns = cluster.ns.clone();
    let upstream = |name: &str, weight: u32| json!({"destination": {"upstream": {"name": format!("{ns}-{name}-9080"), "namespace": ns}}, "weight": weight});
    cluster
        .create(json!({"apiVersion": GLOO, "kind": "UpstreamGroup",
            "metadata": {"name": GROUP, "namespace": ns},
            "spec": {"destinations": [upstream("colorgateway", 100), upstream("colorgatewayv2", 0)]}}))
        .await;
    let canary = cluster
        .canary(&canary_yaml(
            "colorgateway",
            &ns,
            &traffic("colorgateway", "colorgatewayv2"),
            &format!("  router:\n    gloo:\n      upstreamGroup:\n        name: {GROUP}"),
        ))
        .await;
    let cache = ObjectCache::watching(
        cache_client.unwrap_or_else(|| cluster.client.clone()),
        Some(ns.clone()),
    );
    Some(Env {
        router: GlooEdgeRouter::new(client).with_cache(cache.clone()),
        cache,
        cluster,
        proxy,
        canary,
    })
}

fn gets(env: &Env) -> usize {
    env.proxy.requests_of("GET").len()
}

/// Reads the weights until `done` holds for them (or the error), at most [`PATIENCE`].
async fn read_until(
    env: &Env,
    what: &str,
    done: impl Fn(&Result<Weights, RouterError>) -> bool,
) -> Result<Weights, RouterError> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let read = env.router.weights(&env.canary).await;
        if done(&read) {
            return read;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {read:?} after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the cache answers: five reads in a row without a GET.
async fn until_cached(env: &Env) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        env.proxy.clear();
        for _ in 0..5 {
            env.router.weights(&env.canary).await.expect("weights");
        }
        if gets(env) == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never answered: {} GETs in 5 reads",
            gets(env)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Once the watch holds the UpstreamGroup, reading weights costs no request; Serin's own
/// write is read back at once; a hand edit is seen without a request once the watch
/// delivers it; and a deleted object is reported missing (an absence comes from the API
/// server, never from the cache).
#[tokio::test]
async fn cached_reads_follow_writes_edits_and_deletion() {
    let Some(env) = env("router-cache", None).await else {
        return;
    };
    assert_eq!(
        env.router.weights(&env.canary).await.expect("first read"),
        Weights::STABLE
    );
    until_cached(&env).await;

    env.proxy.clear();
    env.router
        .set_weights(&env.canary, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect("write 20");
    assert_eq!(
        (gets(&env), env.proxy.requests_of("PATCH").len()),
        (0, 1),
        "a write on a cached object is one guarded PATCH"
    );
    env.proxy.clear();
    assert_eq!(
        env.router.weights(&env.canary).await.expect("after write"),
        Weights::with_canary(20),
        "the cache must never be older than Serin's own write"
    );
    assert_eq!(gets(&env), 0, "read back from the cache");

    env.cluster
        .edit(GLOO, "UpstreamGroup", &env.cluster.ns, GROUP, |o| {
            o["spec"]["destinations"][0]["weight"] = json!(50);
            o["spec"]["destinations"][1]["weight"] = json!(50);
        })
        .await;
    env.proxy.clear();
    let seen = read_until(&env, "hand edit", |r| {
        r.as_ref().is_ok_and(|w| *w == Weights::with_canary(50))
    })
    .await;
    assert_eq!(seen.expect("edit"), Weights::with_canary(50));
    assert_eq!(gets(&env), 0, "the edit came from the watch");

    // A write from a split that is no longer there is refused, whatever the cache holds
    // (its copy leads to a patch whose `test` ops fail, or is confirmed by a fresh read).
    let stale = env
        .router
        .set_weights(
            &env.canary,
            Weights::with_canary(20),
            Weights::with_canary(100),
        )
        .await;
    assert!(
        matches!(stale, Err(RouterError::WeightsChanged { .. })),
        "a hand edit is never overwritten: {stale:?}"
    );
    // And the edit is the base of the next write.
    env.router
        .set_weights(
            &env.canary,
            Weights::with_canary(50),
            Weights::with_canary(100),
        )
        .await
        .expect("write 100");

    // An edit and, at once, a write from the split before it: refused even if the watch has
    // not delivered the edit yet.
    env.cluster
        .edit(GLOO, "UpstreamGroup", &env.cluster.ns, GROUP, |o| {
            o["spec"]["destinations"][0]["weight"] = json!(70);
            o["spec"]["destinations"][1]["weight"] = json!(30);
        })
        .await;
    let raced = env
        .router
        .set_weights(&env.canary, Weights::with_canary(100), Weights::STABLE)
        .await;
    assert!(
        matches!(raced, Err(RouterError::WeightsChanged { .. })),
        "an edit the cache may not hold yet is never overwritten: {raced:?}"
    );

    let ar = env.cluster.resource(GLOO, "UpstreamGroup");
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.cluster.client.clone(), &env.cluster.ns, &ar);
    api.delete(GROUP, &DeleteParams::default())
        .await
        .expect("delete");
    let gone = read_until(&env, "deletion", |r| r.is_err()).await;
    assert!(
        matches!(gone, Err(RouterError::NotFound { .. })),
        "a deleted object is reported missing, got {gone:?}"
    );
}

/// A cache whose watch cannot run (here: its client points at a closed port) answers
/// nothing: every read goes to the API server and is right.
#[tokio::test]
async fn without_a_watch_every_read_goes_to_the_api_server() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dead = kube::Client::try_from(kube::Config::new(
        format!("http://127.0.0.1:{closed}").parse().expect("url"),
    ))
    .expect("client");
    let Some(env) = env("router-cache-down", Some(dead)).await else {
        return;
    };
    env.router
        .set_weights(&env.canary, Weights::STABLE, Weights::with_canary(20))
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.proxy.clear();
    for _ in 0..3 {
        assert_eq!(
            env.router.weights(&env.canary).await.expect("weights"),
            Weights::with_canary(20)
        );
    }
    assert_eq!(gets(&env), 3, "each read went to the API server");
}

/// The watch sees every UpstreamGroup of the namespace; the cache keeps only the one a
/// router read.
#[tokio::test]
async fn only_read_objects_are_kept() {
    let Some(env) = env("router-cache-size", None).await else {
        return;
    };
    let ns = env.cluster.ns.clone();
    for i in 0..5 {
        env.cluster
            .create(json!({"apiVersion": GLOO, "kind": "UpstreamGroup",
                "metadata": {"name": format!("unrelated-{i}"), "namespace": ns},
                "spec": {"destinations": [{"destination": {"upstream": {"name": "x", "namespace": ns}}, "weight": 1}]}}))
            .await;
    }
    env.router.weights(&env.canary).await.expect("weights");
    until_cached(&env).await;
    assert_eq!(
        env.cache.len(),
        1,
        "only the Canary's UpstreamGroup is kept"
    );
}
