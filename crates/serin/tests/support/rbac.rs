//! Serin's identity in the end-to-end tests on the real control plane: the ServiceAccount
//! of `charts/serin`, bound to exactly the RBAC objects the chart renders for the
//! namespace-scoped mode (`watchNamespace` = the test's namespace), authenticated with a
//! TokenRequest token. A verb the chart forgets makes the operator fail the test; the audit
//! log then shows what the ServiceAccount really used (`scripts/rbac-report`).

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

use super::cluster::{TestCluster, repo_root};

/// The chart's objects for a release named after the test's namespace, in that namespace,
/// watching only it.
pub fn render_chart(namespace: &str) -> Vec<Value> {
    render_chart_with(namespace, json!({}))
}

/// [`render_chart`] with more chart `values` (merged over `watchNamespace`).
pub fn render_chart_with(namespace: &str, mut values: Value) -> Vec<Value> {
    values["watchNamespace"] = json!(namespace);
    let values = values.to_string();
    let out = Command::new("python3")
        .arg("scripts/render-chart")
        .args(["--release", namespace, "--namespace", namespace])
        .args(["--values-json", &values])
        .current_dir(repo_root())
        .output()
        .expect("run scripts/render-chart");
    assert!(
        out.status.success(),
        "scripts/render-chart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The API resource of an RBAC or core kind the chart renders; `None` for other kinds.
fn resource(kind: &str) -> Option<(ApiResource, bool)> {
    let (group, version, plural, namespaced) = match kind {
        "ServiceAccount" => ("", "v1", "serviceaccounts", true),
        "Role" => ("rbac.authorization.k8s.io", "v1", "roles", true),
        "RoleBinding" => ("rbac.authorization.k8s.io", "v1", "rolebindings", true),
        "ClusterRole" => ("rbac.authorization.k8s.io", "v1", "clusterroles", false),
        "ClusterRoleBinding" => (
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            false,
        ),
        _ => return None,
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Some((ApiResource::from_gvk_with_plural(&gvk, plural), namespaced))
}

/// Applies the chart's ServiceAccount and RBAC objects and returns a kubeconfig that
/// authenticates as that ServiceAccount.
pub async fn operator_kubeconfig(cluster: &TestCluster) -> PathBuf {
    operator_kubeconfig_with(cluster, json!({})).await
}

/// [`operator_kubeconfig`] for the chart rendered with more `values` (for example
/// `readSecrets: false`); applied again, the chart's objects replace the earlier ones.
pub async fn operator_kubeconfig_with(cluster: &TestCluster, values: Value) -> PathBuf {
    let ns = &cluster.namespace;
    let mut account = None;
    for doc in render_chart_with(ns, values) {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let Some((ar, namespaced)) = resource(kind) else {
            continue;
        };
        // Rules for people (aggregated into the built-in view/edit/admin roles), not Serin's.
        let labels = doc["metadata"]["labels"].as_object();
        if labels.is_some_and(|l| {
            l.keys()
                .any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-"))
        }) {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        if kind == "ServiceAccount" {
            account = Some(name.clone());
        }
        let api: Api<DynamicObject> = if namespaced {
            let obj_ns = doc["metadata"]["namespace"].as_str().unwrap_or(ns);
            Api::namespaced_with(cluster.client.clone(), obj_ns, &ar)
        } else {
            Api::all_with(cluster.client.clone(), &ar)
        };
        api.patch(
            &name,
            &PatchParams::apply("serin-tests").force(),
            &Patch::Apply(&doc),
        )
        .await
        .unwrap_or_else(|e| panic!("apply the chart's {kind} {name}: {e}"));
    }
    let account = account.expect("the chart renders a ServiceAccount");
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client.clone(), ns);
    let request = serde_json::from_value(json!({"spec": {"expirationSeconds": 7200}})).unwrap();
    let token = accounts
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .expect("TokenRequest for Serin's ServiceAccount")
        .status
        .expect("a TokenRequest status")
        .token
        .expect("a token");
    let path = cluster.dir.path().join("serin-sa.kubeconfig");
    write_token_kubeconfig(&cluster.kubeconfig, &path, &token, ns);
    path
}

/// A copy of the admin kubeconfig `admin` (its server and CA) that authenticates with a
/// bearer `token` instead.
fn write_token_kubeconfig(admin: &Path, path: &Path, token: &str, namespace: &str) {
    let kc: Value = serde_norway::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    let cluster = &kc["clusters"][0]["cluster"];
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: serin\n  user:\n    token: {token}\ncontexts:\n- name: serin\n  context:\n    cluster: c\n    user: serin\n    namespace: {namespace}\ncurrent-context: serin\n",
        cluster["server"].as_str().unwrap(),
        cluster["certificate-authority"].as_str().unwrap(),
    );
    std::fs::write(path, text).unwrap();
}
