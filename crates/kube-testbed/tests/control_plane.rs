//! The control plane does what the suites rely on: Deployments roll out to ready pods
//! through the real controllers and the node agent, EndpointSlices list them, the garbage
//! collector removes what a deleted owner owned, TokenRequest issues service-account tokens,
//! RBAC refuses a ServiceAccount without bindings, and the audit log records who did what.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

/// The binaries: `SERIN_KUBE_BIN` (scripts/test sets it), else what `scripts/build-kube`
/// builds or finds in its cache.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SERIN_KUBE_BIN") {
        return PathBuf::from(dir);
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = std::process::Command::new("scripts/build-kube")
        .current_dir(root)
        .output()
        .expect("run scripts/build-kube");
    assert!(
        out.status.success(),
        "scripts/build-kube failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// One control plane, exercised the way the suites use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_run_and_the_real_controllers_act() {
    let dir = tempfile::tempdir().unwrap();
    let cp = kube_testbed::ControlPlane::start(kube_testbed::Options {
        bin_dir: bin_dir(),
        dir: dir.path().to_path_buf(),
        node_agent: true,
    })
    .await
    .expect("start the control plane");
    let client = cp.client().await.unwrap();
    let ns = "testbed";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": ns}})),
        )
        .await
        .unwrap();

    // A Deployment becomes available through the deployment and ReplicaSet controllers.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "web"},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "web", "image": "web:1"}]}}}
            })),
        )
        .await
        .unwrap();
    eventually("web to be available", || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("web").await.ok()?;
            (d.status?.available_replicas? == 2).then_some(())
        }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    for p in &list.items {
        let status = p.status.clone().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.pod_ip.unwrap().starts_with("192.0.2."));
    }

    // A Service's EndpointSlice lists both ready pods.
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    services
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": "web"},
                           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})),
        )
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    eventually("two ready endpoints", || {
        let slices = slices.clone();
        async move {
            let l = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .ok()?;
            let ready = l
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .count();
            (ready == 2).then_some(())
        }
    })
    .await;

    // Deleting the Deployment lets the garbage collector remove its ReplicaSet and pods.
    deployments
        .delete("web", &DeleteParams::background())
        .await
        .unwrap();
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    eventually("the ReplicaSet and pods to be collected", || {
        let (replicasets, pods) = (replicasets.clone(), pods.clone());
        async move {
            let rs = replicasets.list(&ListParams::default()).await.ok()?;
            let p = pods.list(&ListParams::default()).await.ok()?;
            (rs.items.is_empty() && p.items.is_empty()).then_some(())
        }
    })
    .await;

    // TokenRequest issues a token for a ServiceAccount; RBAC refuses it everything.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    accounts
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": "nobody"}})),
        )
        .await
        .unwrap();
    let token: TokenRequest = accounts
        .create_token_request(
            "nobody",
            &PostParams::default(),
            &object(json!({"spec": {"audiences": [], "expirationSeconds": 600}})),
        )
        .await
        .unwrap();
    let token = token.status.unwrap().token.expect("a token");
    let kubeconfig = dir.path().join("nobody.kubeconfig");
    cp.write_token_kubeconfig(&kubeconfig, &token, ns).unwrap();
    let nobody = kube_testbed::client(&kubeconfig).await.unwrap();
    let forbidden = Api::<ConfigMap>::namespaced(nobody, ns)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&forbidden, kube::Error::Api(s) if s.code == 403),
        "{forbidden:?}"
    );

    // The audit log names the ServiceAccount and what it was refused.
    let audit = std::fs::read_to_string(&cp.audit_log).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("system:serviceaccount:testbed:nobody")
                && l.contains("\"verb\":\"list\"")
                && l.contains("\"code\":403")),
        "no audit record of the refused list"
    );
}
