//! The client-side rate limit (`--kube-qps`, `--kube-burst`) on a client of this run's API
//! server (the real kube-apiserver when `SERIN_TEST_KUBECONFIG` is set, else the in-memory
//! one): requests beyond the burst wait for their turn and then succeed, answers and
//! watch streams pass through unchanged.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use serin::controller::ratelimit::{RateLimit, rate_limited_client};

use support::cluster::TestCluster;

/// Eight requests at once through a bucket of five that refills one a second: five go at
/// once, three wait (and are counted), and every one is answered as without the limit.
#[tokio::test]
async fn requests_beyond_the_burst_wait_and_succeed() {
    let Some(test) = TestCluster::start("rate-limit").await else {
        return;
    };
    let limit = Arc::new(RateLimit::new(1.0, 5).expect("limit"));
    let client = rate_limited_client(test.client.clone(), limit.clone());
    let api: Api<ConfigMap> = Api::namespaced(client, &test.namespace);
    let lp = ListParams::default();
    let answers = futures::future::join_all((0..8).map(|_| api.list(&lp))).await;
    for a in &answers {
        assert!(a.is_ok(), "a paced request failed: {a:?}");
    }
    assert_eq!(limit.throttled(), 3, "the three beyond the burst waited");
    // An error answer passes through as the server's own.
    let missing = api.get("no-such-configmap").await;
    assert!(
        matches!(&missing, Err(kube::Error::Api(s)) if s.code == 404),
        "a 404 reaches the caller as the server sent it: {missing:?}"
    );
}

/// A watch through the limited client streams events as they happen.
#[tokio::test]
async fn watches_stream_through_the_limit() {
    let Some(test) = TestCluster::start("rate-limit-watch").await else {
        return;
    };
    let limit = Arc::new(RateLimit::new(50.0, 10).expect("limit"));
    let limited: Api<ConfigMap> = Api::namespaced(
        rate_limited_client(test.client.clone(), limit),
        &test.namespace,
    );
    let mut events = watcher(limited, watcher::Config::default()).boxed();
    // The initial list of the empty namespace ends.
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
            Ok(Some(Ok(watcher::Event::InitDone))) => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("the watch did not list: {other:?}"),
        }
    }
    let direct: Api<ConfigMap> = Api::namespaced(test.client.clone(), &test.namespace);
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("seen".into());
    direct
        .create(&PostParams::default(), &cm)
        .await
        .expect("create");
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
            Ok(Some(Ok(watcher::Event::Apply(o))))
                if o.metadata.name.as_deref() == Some("seen") =>
            {
                break;
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("the created ConfigMap never came through the watch: {other:?}"),
        }
    }
}
