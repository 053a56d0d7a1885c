//! Helpers of the router tests: an embedded API server with the genuine upstream CRDs (and
//! Serin's own), Canary fixtures, a schema walk that finds fields the CRD does not know, and
//! an HTTP proxy ([`proxy`]) that records requests, injects faults and (for moto) normalises
//! the two App Mesh protocol differences.
#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube_sandbox::{ApiServer, Options};
use serde_json::{Value, json};
use serin::api::Canary;

/// `../shared/upstream-crds`, or `None` (with a notice) when this clone has no shared folder.
pub fn upstream_crds() -> Option<PathBuf> {
    let dir =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("../shared/upstream-crds");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "NOTICE: {} is absent; skipping this router test (it needs the upstream CRDs)",
            dir.display()
        );
        None
    }
}

/// An embedded API server with the upstream CRDs and Serin's Canary CRD.
pub struct Cluster {
    pub server: ApiServer,
    /// A client straight to the server (tests use it to arrange and inspect state).
    pub client: Client,
    /// openAPIV3Schema by (apiVersion, kind).
    schemas: HashMap<(String, String), Value>,
    /// plural by (apiVersion, kind).
    plurals: HashMap<(String, String), String>,
}

impl Cluster {
    /// Starts the server and registers the CRDs; `None` when the upstream CRDs are absent.
    pub async fn start() -> Option<Cluster> {
        let dir = upstream_crds()?;
        let server = ApiServer::start(Options::default())
            .await
            .expect("start server");
        server.load_crd_dir(&dir).expect("load upstream CRDs");
        let serin_crds = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("crds");
        server.load_crd_dir(&serin_crds).expect("load Serin's CRD");
        let client = server.client().expect("client");
        let mut schemas = HashMap::new();
        let mut plurals = HashMap::new();
        for file in yaml_files(&dir).into_iter().chain(yaml_files(&serin_crds)) {
            let text = std::fs::read_to_string(&file).expect("read CRD");
            for doc in serde_norway::Deserializer::from_str(&text) {
                let crd: Value = serde::Deserialize::deserialize(doc).expect("CRD YAML");
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
        }
        Some(Cluster {
            server,
            client,
            schemas,
            plurals,
        })
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

    /// Creates a namespace.
    pub async fn namespace(&self, name: &str) {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
    }

    /// Creates a custom object (namespaced unless it has no namespace) and returns it as stored.
    pub async fn create(&self, obj: Value) -> Value {
        let av = obj["apiVersion"].as_str().expect("apiVersion");
        let kind = obj["kind"].as_str().expect("kind");
        let ns = obj["metadata"]["namespace"].as_str();
        let dynobj: DynamicObject = serde_json::from_value(obj.clone()).expect("object");
        let created = self
            .api(av, kind, ns)
            .create(&PostParams::default(), &dynobj)
            .await
            .unwrap_or_else(|e| panic!("create {kind}: {e}"));
        serde_json::to_value(created).expect("json")
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

    /// Replaces a custom object's spec (as a user with kubectl edit would).
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
        let dynobj: DynamicObject = serde_json::from_value(obj).expect("object");
        self.api(api_version, kind, Some(ns))
            .replace(name, &PostParams::default(), &dynobj)
            .await
            .expect("replace");
    }

    /// Creates the Canary described by `yaml` and returns it as the server stored it.
    pub async fn canary(&self, yaml: &str) -> Canary {
        let canary: Canary = serde_norway::from_str(yaml).expect("Canary YAML");
        let ns = canary.metadata.namespace.clone().expect("namespace");
        let api: Api<Canary> = Api::namespaced(self.client.clone(), &ns);
        api.create(&PostParams::default(), &canary)
            .await
            .expect("create Canary")
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

    /// The current global resourceVersion of the server (it moves on every write).
    pub fn revision(&self) -> u64 {
        self.server.revision()
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

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
    out.sort();
    out
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
