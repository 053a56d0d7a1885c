//! A node agent in place of a kubelet and a scheduler: pods never run here, but the real
//! controllers must see them do so. It registers one Node, binds every pending pod to it
//! (`pods/binding`), gives it an address from 192.0.2.0/24 (TEST-NET-1: data only, nothing
//! ever connects to it), marks it Running and Ready, and removes terminating pods at once
//! (grace period 0). So Deployments really roll out through the deployment and ReplicaSet
//! controllers, EndpointSlices list ready endpoints, and garbage collection is real.

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::json;

/// The Node every pod runs on.
pub const NODE: &str = "testbed-node";

/// Runs until the watch ends (the API server went away).
pub async fn run(client: kube::Client) {
    if let Err(e) = register_node(&client).await {
        tracing::warn!(error = %e, "could not register the node");
    }
    let pods: Api<Pod> = Api::all(client.clone());
    let next_ip = AtomicU32::new(0);
    let mut events =
        std::pin::pin!(watcher::watcher(pods, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(Event::Apply(p) | Event::InitApply(p)) => p,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "pod watch");
                continue;
            }
        };
        if let Err(e) = handle(&client, &pod, &next_ip).await {
            tracing::debug!(error = %e, pod = ?pod.metadata.name, "node agent");
        }
    }
}

/// Creates the Node and marks it Ready (no node-lifecycle controller runs, so it stays so).
async fn register_node(client: &kube::Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let now = Utc::now().to_rfc3339();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kube-testbed node agent", "lastHeartbeatTime": now,
                        "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "192.0.2.1"},
                      {"type": "Hostname", "address": NODE}],
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "10000"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "10000"},
    }});
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Moves one pod along: delete when terminating, bind when pending, start when bound.
async fn handle(client: &kube::Client, pod: &Pod, next_ip: &AtomicU32) -> anyhow::Result<()> {
    let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
        return Ok(());
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    if pod.metadata.deletion_timestamp.is_some() {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        return match pods.delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let spec = pod.spec.as_ref();
    match spec.and_then(|s| s.node_name.as_deref()) {
        None => bind(&pods, name).await,
        Some(NODE) if !is_running(pod) => start(&pods, pod, name, next_ip).await,
        Some(_) => Ok(()),
    }
}

async fn bind(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
    });
    match pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already bound (a replayed event) or gone.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn is_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
}

/// Marks a bound pod Running and Ready, with an address and running containers.
async fn start(pods: &Api<Pod>, pod: &Pod, name: &str, next_ip: &AtomicU32) -> anyhow::Result<()> {
    let n = next_ip.fetch_add(1, Ordering::Relaxed) % 252 + 2;
    let ip = format!("192.0.2.{n}");
    let now = Utc::now().to_rfc3339();
    let containers: Vec<serde_json::Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image.clone().unwrap_or_default(),
                "imageID": format!("testbed://{}", c.image.clone().unwrap_or_default()),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    let condition = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": "192.0.2.1",
        "hostIPs": [{"ip": "192.0.2.1"}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [condition("PodScheduled"), condition("Initialized"),
                       condition("ContainersReady"), condition("Ready")],
        "containerStatuses": containers,
    }});
    match pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
