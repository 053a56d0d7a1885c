//! Helpers of the router tests: a namespace of the test's own on this run's API server
//! (the real kube-apiserver when `SERIN_TEST_KUBECONFIG` is set, else the in-memory one;
//! `support::cluster` chooses) with the genuine upstream CRDs and Serin's own, Canary
//! fixtures, a schema walk that finds fields the CRD does not know, and an HTTP proxy
//! ([`proxy`]) that records requests, injects faults and (for moto) normalises the two App
//! Mesh protocol differences.
#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::Value;
use serin::api::Canary;

use crate::support::cluster::{TestCluster, crd_documents, upstream_crds};

use proxy::Proxy;

/// The test's API server and namespace, with the upstream CRDs and Serin's Canary CRD.
pub struct Cluster {
    /// The backend (real or in-memory) and the test's namespace.
    pub test: TestCluster,
    /// A client with full rights straight to the server (tests use it to arrange and
    /// inspect state; the router under test goes through a [`Proxy`]).
    pub client: Client,
    /// The test's namespace, already created.
    pub ns: String,
    /// openAPIV3Schema by (apiVersion, kind).
    schemas: HashMap<(String, String), Value>,
    /// plural by (apiVersion, kind).
    plurals: HashMap<(String, String), String>,
}

impl Cluster {
    /// A fresh namespace named after `prefix` on this run's API server, with the CRDs
    /// installed; `None` when the upstream CRDs are absent.
    pub async fn start(prefix: &str) -> Option<Cluster> {
        let test = TestCluster::start(prefix).await?;
        let mut crds = crd_documents(&upstream_crds()?);
        crds.push(
            serde_norway::from_str(&serin::api::crd_yaml().expect("Serin's CRD"))
                .expect("Serin's CRD YAML"),
        );
        let mut schemas = HashMap::new();
        let mut plurals = HashMap::new();
        for crd in crds {
            let group = crd["spec"]["group"].as_str().unwrap_or("").to_string();
            let kind = crd["spec"]["names"]["kind"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let plural = crd["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or("")
                .to_string();
            for v in crd["spec"]["versions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let api_version = format!("{group}/{}", v["name"].as_str().unwrap_or(""));
                let key = (api_version, kind.clone());
                schemas.insert(key.clone(), v["schema"]["openAPIV3Schema"].clone());
                plurals.insert(key, plural.clone());
            }
        }
        Some(Cluster {
            client: test.client.clone(),
            ns: test.namespace.clone(),
            test,
            schemas,
            plurals,
        })
    }

    /// Whether this is the real control plane.
    pub fn is_real(&self) -> bool {
        self.test.is_real()
    }

    /// A recording proxy to this server that forwards with the admin's credentials, and a
    /// client for the router under test that talks plain HTTP to it, with none of its own.
    pub async fn proxy(&self) -> (Proxy, Client) {
        let proxy = Proxy::kube(self.client.clone()).await;
        let client =
            Client::try_from(kube::Config::new(proxy.url.parse().expect("url"))).expect("client");
        (proxy, client)
    }

    /// The API resource of a registered kind.
    pub fn resource(&self, api_version: &str, kind: &str) -> ApiResource {
        let plural = self
            .plurals
            .get(&(api_version.to_string(), kind.to_string()))
            .unwrap_or_else(|| panic!("no CRD for {api_version} {kind}"));
        let (group, version) = api_version.split_once('/').expect("group/version");
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.clone(),
        }
    }

    fn api(&self, api_version: &str, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let ar = self.resource(api_version, kind);
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Creates a custom object (namespaced unless it has no namespace) with strict field
    /// validation (a fixture field the CRD does not know is an error, not silently pruned)
    /// and returns it as stored.
    pub async fn create(&self, obj: Value) -> Value {
        let av = obj["apiVersion"].as_str().expect("apiVersion");
        let kind = obj["kind"].as_str().expect("kind");
        let ns = obj["metadata"]["namespace"].as_str();
        let url = format!(
            "{}?fieldValidation=Strict",
            self.api(av, kind, ns).resource_url()
        );
        self.strict_write("POST", url, &obj)
            .await
            .unwrap_or_else(|e| panic!("create {kind}: {e}"))
    }

    /// Sends `obj` with `method` to `url` and returns the object the server answers with.
    async fn strict_write(&self, method: &str, url: String, obj: &Value) -> kube::Result<Value> {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(obj).expect("json"))
            .expect("request");
        self.client.request::<Value>(req).await
    }

    /// Reads a custom object; `None` when it does not exist.
    pub async fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let ns = (!ns.is_empty()).then_some(ns);
        self.api(api_version, kind, ns)
            .get_opt(name)
            .await
            .expect("get")
            .map(|o| serde_json::to_value(o).expect("json"))
    }

    /// Replaces a custom object's spec (as a user with kubectl edit would), with strict
    /// field validation.
    pub async fn edit(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) {
        let mut obj = self
            .get(api_version, kind, ns, name)
            .await
            .expect("object to edit");
        edit(&mut obj);
        let url = format!(
            "{}/{name}?fieldValidation=Strict",
            self.api(api_version, kind, Some(ns)).resource_url()
        );
        self.strict_write("PUT", url, &obj)
            .await
            .unwrap_or_else(|e| panic!("replace {kind} {name}: {e}"));
    }

    /// Creates the Canary described by `yaml` and returns it as the server stored it.
    pub async fn canary(&self, yaml: &str) -> Canary {
        let canary: Canary = serde_norway::from_str(yaml).expect("Canary YAML");
        let ns = canary.metadata.namespace.clone().expect("namespace");
        let api: Api<Canary> = Api::namespaced(self.client.clone(), &ns);
        api.create(&PostParams::default(), &canary)
            .await
            .unwrap_or_else(|e| panic!("create Canary: {e}"))
    }

    /// Paths of fields in `obj` that its CRD's schema does not declare (ignoring
    /// `metadata`, `status` and subtrees marked `x-kubernetes-preserve-unknown-fields`).
    pub fn unknown_fields(&self, obj: &Value) -> Vec<String> {
        let key = (
            obj["apiVersion"].as_str().unwrap_or("").to_string(),
            obj["kind"].as_str().unwrap_or("").to_string(),
        );
        let schema = self
            .schemas
            .get(&key)
            .unwrap_or_else(|| panic!("no schema for {key:?}"));
        let mut out = Vec::new();
        if let Some(spec) = obj.get("spec") {
            walk(&schema["properties"]["spec"], spec, "spec", &mut out);
        }
        out
    }

    /// The resourceVersion of an object as stored now (it moves on every write to it).
    pub async fn resource_version(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> String {
        let obj = self
            .get(api_version, kind, ns, name)
            .await
            .unwrap_or_else(|| panic!("{kind} {name} exists"));
        obj["metadata"]["resourceVersion"]
            .as_str()
            .expect("resourceVersion")
            .to_string()
    }
}

fn walk(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (k, v) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => walk(s, v, &format!("{path}.{k}"), out),
                    None => match additional {
                        Some(s) if s.is_object() => walk(s, v, &format!("{path}.{k}"), out),
                        Some(Value::Bool(true)) => {}
                        _ => out.push(format!("{path}.{k}")),
                    },
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    walk(s, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// A Canary document: `mode` is the `targetRef:`/`backends:` block and `router` the
/// `router:` block, both as YAML indented by two spaces.
pub fn canary_yaml(name: &str, ns: &str, mode: &str, router: &str) -> String {
    format!(
        "apiVersion: serin.dev/v1alpha1
kind: Canary
metadata:
  name: {name}
  namespace: {ns}
spec:
{mode}
  service:
    port: 9080
{router}
  analysis:
    metrics:
      - name: error-rate
        provider:
          prometheus:
            address: http://prometheus.monitoring:9090
        query: 'sum(up)'
        max: 1
"
    )
}

/// The workload-mode block for target `name`.
pub fn workload(name: &str) -> String {
    format!("  targetRef:\n    apiVersion: apps/v1\n    kind: Deployment\n    name: {name}")
}

/// The traffic-mode block.
pub fn traffic(primary: &str, canary: &str) -> String {
    format!("  backends:\n    primary: {primary}\n    canary: {canary}")
}

/// Reads every document of a YAML file.
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read YAML");
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The requests of `proxy` that are not reads (every PATCH, PUT, POST and DELETE), in order.
pub fn writes(proxy: &Proxy) -> Vec<String> {
    proxy
        .requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET "))
        .collect()
}

/// Moves a document (an example file's) from namespace `from` to `to`: every `namespace`
/// field whose value is `from` (the object's own and its references') becomes `to`.
pub fn in_namespace(doc: &mut Value, from: &str, to: &str) {
    match doc {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "namespace" && v.as_str() == Some(from) {
                    *v = Value::String(to.to_string());
                } else {
                    in_namespace(v, from, to);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| in_namespace(v, from, to)),
        _ => {}
    }
}

/// The documents of the example file `path` (relative to the repository), moved from
/// namespace `from` to `to` (see [`in_namespace`]).
pub fn example_in(path: &str, from: &str, to: &str) -> Vec<Value> {
    let mut docs = yaml_docs(&repo_file(path));
    for d in &mut docs {
        in_namespace(d, from, to);
    }
    docs
}

/// A file of the repository.
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(path)
}
