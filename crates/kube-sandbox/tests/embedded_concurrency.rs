//! Concurrent writers and watchers against the embedded API server.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube_sandbox::{ApiServer, Options};
use serde_json::json;

const WRITERS: usize = 8;
const UPDATES: usize = 50;

/// 8 writers × 50 updates while 3 watchers stream: each watcher sees every revision once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_sees_every_revision_once_in_order() {
    let server = ApiServer::start(Options::default()).await.expect("server");
    let client = server.client().expect("client");
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let start = server.revision();
    let mut watchers = Vec::new();
    for _ in 0..3 {
        let stream = cms
            .watch(&WatchParams::default(), &start.to_string())
            .await
            .expect("watch")
            .boxed();
        watchers.push(tokio::spawn(async move {
            let mut stream = stream;
            let mut revisions = Vec::new();
            let expected = WRITERS * (UPDATES + 1);
            while revisions.len() < expected {
                match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
                    Ok(Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)))) => {
                        let rv: u64 = o
                            .metadata
                            .resource_version
                            .unwrap_or_default()
                            .parse()
                            .unwrap_or(0);
                        revisions.push(rv);
                    }
                    Ok(Some(Ok(WatchEvent::Bookmark(_)))) => {}
                    other => panic!(
                        "unexpected watch item after {} events: {other:?}",
                        revisions.len()
                    ),
                }
            }
            revisions
        }));
    }
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let cms = cms.clone();
        writers.push(tokio::spawn(async move {
            let name = format!("w{w}");
            let cm: ConfigMap =
                serde_json::from_value(json!({"metadata": {"name": name}, "data": {"n": "0"}}))
                    .expect("cm");
            cms.create(&PostParams::default(), &cm)
                .await
                .expect("create");
            for i in 1..=UPDATES {
                let patch = Patch::Merge(json!({"data": {"n": i.to_string()}}));
                cms.patch(&name, &PatchParams::default(), &patch)
                    .await
                    .expect("patch");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let end = server.revision();
    let all: Vec<u64> = ((start + 1)..=end).collect();
    assert_eq!(
        all.len(),
        WRITERS * (UPDATES + 1),
        "every write got its own revision"
    );
    for w in watchers {
        let seen = w.await.expect("watcher");
        assert_eq!(
            seen, all,
            "watcher saw revisions out of order, twice or not at all"
        );
    }
}
