//! The Kubernetes API a test talks to, chosen in one place.
//!
//! - **The real control plane** (kube-apiserver, etcd and kube-controller-manager v1.37.2 with
//!   the node agent, from `crates/kube-testbed`) when `SERIN_TEST_KUBECONFIG` names its
//!   kubeconfig. `scripts/test` starts one for the whole run and sets it, so `.ci/run` runs
//!   these suites against it. Tests share it, each in a namespace of its own.
//! - **The in-memory API server** (`kube-sandbox`) otherwise (a plain `cargo test`), with
//!   its Deployment status simulator standing in for the controllers; a notice says so.
//!
//! Either way the test gets a client, a kubeconfig for `serin run` and `kubectl`, a fresh
//! namespace, and Serin's CRD plus the genuine upstream App Mesh, Gloo and Gateway API CRDs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_sandbox::{ApiServer, Options};
use serde_json::{Value, json};

/// The environment variable that selects the real control plane.
pub const KUBECONFIG_ENV: &str = "SERIN_TEST_KUBECONFIG";

/// The kubeconfig of a real control plane: this run's shared one when [`KUBECONFIG_ENV`] is
/// set, else one started for this test process (the binaries from `scripts/build-kube`),
/// which stops when the process exits. For tests that only make sense against the real
/// server (OpenAPI for `kubectl explain`, the real CEL cost budget, garbage collection).
pub fn real_kubeconfig() -> PathBuf {
    if let Some(k) = std::env::var_os(KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(k);
    }
    static PRIVATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PRIVATE
        .get_or_init(|| {
            let bin = kube_bin_dir();
            let dir = tempfile::Builder::new()
                .prefix("serin-test-control-plane-")
                .tempdir()
                .unwrap()
                .keep();
            // Its own runtime on its own thread, alive as long as the process: the
            // children's pipes close when the process exits, and they stop.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async move {
                    let cp = kube_testbed::ControlPlane::start(kube_testbed::Options {
                        bin_dir: bin,
                        dir,
                        node_agent: true,
                    })
                    .await
                    .expect("start a real control plane");
                    tx.send(cp.kubeconfig.clone()).unwrap();
                    std::future::pending::<()>().await;
                    drop(cp);
                });
            });
            rx.recv().expect("the control plane started")
        })
        .clone()
}

/// The control plane's binaries: `SERIN_KUBE_BIN`, else `scripts/build-kube`'s cache.
pub fn kube_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SERIN_KUBE_BIN") {
        return PathBuf::from(dir);
    }
    let out = std::process::Command::new("scripts/build-kube")
        .current_dir(repo_root())
        .output()
        .expect("run scripts/build-kube");
    assert!(
        out.status.success(),
        "scripts/build-kube failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The `kubectl` built with the control plane (v1.37.2), not whatever is on PATH.
pub fn kubectl() -> PathBuf {
    kube_bin_dir().join("kubectl")
}

/// Which API server backs the tests of this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// kube-apiserver + etcd + kube-controller-manager.
    Real,
    /// The in-memory API server.
    Embedded,
}

/// The backend of this run: real when [`KUBECONFIG_ENV`] is set.
pub fn backend() -> Backend {
    match std::env::var_os(KUBECONFIG_ENV) {
        Some(v) if !v.is_empty() => Backend::Real,
        _ => Backend::Embedded,
    }
}

/// A namespace of its own on the test's API server.
pub struct TestCluster {
    /// A client with full rights (the admin on the real server).
    pub client: kube::Client,
    /// A kubeconfig for that client, for `serin run` and `kubectl`.
    pub kubeconfig: PathBuf,
    /// The test's namespace, already created.
    pub namespace: String,
    /// The in-memory server, when that is the backend.
    pub embedded: Option<ApiServer>,
    /// Scratch space (the embedded server's kubeconfig, logs).
    pub dir: tempfile::TempDir,
}

static NAMESPACES: AtomicU32 = AtomicU32::new(0);

/// A namespace name unique in this run: `prefix-<pid>-<n>`.
pub fn unique_namespace(prefix: &str) -> String {
    let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
    let mut p: String = prefix.chars().take(40).collect();
    p.retain(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    format!("{p}-{}-{n}", std::process::id())
}

/// The genuine upstream CRDs, `../shared/upstream-crds`, or `None` (with a notice) in a
/// user's clone without the team's shared folder.
pub fn upstream_crds() -> Option<PathBuf> {
    let dir = repo_root().join("../shared/upstream-crds");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "NOTICE: {} is absent (a user's clone): skipping, as this test needs the upstream App Mesh/Gloo/Gateway API CRDs",
            dir.display()
        );
        None
    }
}

/// The repository's top folder.
pub fn repo_root() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).to_path_buf()
}

/// Every CRD document under `dir` (recursively).
pub fn crd_documents(dir: &Path) -> Vec<Value> {
    let mut files = Vec::new();
    collect_yaml(dir, &mut files);
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("read CRD file");
            serde_norway::Deserializer::from_str(&text)
                .map(|d| serde::Deserialize::deserialize(d).expect("CRD YAML"))
                .filter(|v: &Value| v["kind"] == "CustomResourceDefinition")
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect_yaml(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

impl TestCluster {
    /// A fresh namespace named after `prefix` on this run's backend, with Serin's CRD and the
    /// upstream CRDs installed; `None` when the upstream CRDs are absent.
    pub async fn start(prefix: &str) -> Option<TestCluster> {
        Self::start_on(backend(), prefix).await
    }

    /// Like [`TestCluster::start`], always on a real control plane ([`real_kubeconfig`]).
    pub async fn start_real(prefix: &str) -> Option<TestCluster> {
        Self::start_on(Backend::Real, prefix).await
    }

    async fn start_on(backend: Backend, prefix: &str) -> Option<TestCluster> {
        let upstream = upstream_crds()?;
        let mut crds = crd_documents(&upstream);
        crds.push(serde_norway::from_str(&serin::api::crd_yaml().unwrap()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let (client, kubeconfig, embedded) = match backend {
            Backend::Real => {
                let kubeconfig = real_kubeconfig();
                let client = kube_testbed::client(&kubeconfig)
                    .await
                    .expect("connect to the real control plane");
                install_crds(&client, &crds).await;
                (client, kubeconfig, None)
            }
            Backend::Embedded => {
                notice_embedded();
                let server = ApiServer::start(Options::default()).await.unwrap();
                for crd in crds {
                    server.apply_crd(crd).unwrap();
                }
                let kubeconfig = dir.path().join("kubeconfig");
                server.write_kubeconfig(&kubeconfig).unwrap();
                (server.client().unwrap(), kubeconfig, Some(server))
            }
        };
        let namespace = unique_namespace(prefix);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
            )
            .await
            .expect("create the test's namespace");
        Some(TestCluster {
            client,
            kubeconfig,
            namespace,
            embedded,
            dir,
        })
    }

    /// Whether this is the real control plane.
    pub fn is_real(&self) -> bool {
        self.embedded.is_none()
    }

    /// On the in-memory server, a task that writes Deployment status as the controllers
    /// would (ready `delay` after a change); on the real one the controllers and the node
    /// agent do that, and this is `None`.
    pub fn simulate_workloads(&self, delay: Duration) -> Option<tokio::task::JoinHandle<()>> {
        self.embedded
            .as_ref()
            .map(|_| kube_sandbox::workloads::simulate_deployments(self.client.clone(), delay))
    }
}

fn notice_embedded() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "NOTICE: {KUBECONFIG_ENV} is not set: these tests use the in-memory API server; scripts/test runs them against the real control plane"
        )
    });
}

/// Creates or updates every CRD (server-side apply) and waits until each is Established.
async fn install_crds(client: &kube::Client, crds: &[Value]) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("serin-tests").force();
    for crd in crds {
        let name = crd["metadata"]["name"].as_str().expect("CRD name");
        api.patch(name, &params, &Patch::Apply(crd))
            .await
            .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
    }
    for crd in crds {
        let name = crd["metadata"]["name"].as_str().expect("CRD name");
        super::wait_for(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                async move {
                    let c = api.get(name).await.ok()?;
                    c.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }
}
