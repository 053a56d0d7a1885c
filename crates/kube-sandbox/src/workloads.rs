//! A stand-in for the Deployment controller and the kubelet of a real cluster, for the
//! embedded API server: it watches Deployments and, after a short delay, writes a status
//! saying the current generation is rolled out and every desired replica is available.
//!
//! One watch serves every Deployment. It is a test and demo component: it runs no pods,
//! and it never reports a failure (tests that need an unready workload stop it or write
//! the status themselves).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;

/// Whether a Deployment's status already reflects its spec.
fn settled(d: &Deployment) -> bool {
    let want = d.spec.replicas.unwrap_or(1);
    let Some(s) = &d.status else { return false };
    s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && s.replicas.unwrap_or(0) == want
        && s.updated_replicas.unwrap_or(0) == want
        && s.available_replicas.unwrap_or(0) == want
}

/// Marks every Deployment's desired replicas ready `delay` after each spec change, until
/// the returned task is aborted or the watch ends.
pub fn simulate_deployments(client: kube::Client, delay: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<Deployment> = Api::all(client.clone());
        let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
        loop {
            match stream.try_next().await {
                Ok(Some(Event::Apply(d) | Event::InitApply(d))) if !settled(&d) => {
                    let client = client.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        mark_ready(client, &d).await;
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "deployment simulator watch error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
}

async fn mark_ready(client: kube::Client, d: &Deployment) {
    let ns = d.namespace().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(client, &ns);
    // Re-read: the spec may have moved on during the delay.
    let Ok(current) = api.get(&d.name_any()).await else {
        return;
    };
    let n = current.spec.replicas.unwrap_or(1);
    let status = json!({"status": {
        "observedGeneration": current.metadata.generation.unwrap_or(0),
        "replicas": n,
        "updatedReplicas": n,
        "readyReplicas": n,
        "availableReplicas": n,
        "unavailableReplicas": 0,
        "conditions": [{"type": "Available", "status": if n > 0 { "True" } else { "False" }, "reason": "Simulated"}]
    }});
    if let Err(e) = api
        .patch_status(
            &current.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
    {
        tracing::debug!(error = %e, "deployment simulator could not write status");
    }
}
