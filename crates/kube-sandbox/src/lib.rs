//! An in-memory Kubernetes API server for `serin demo` and fast API-level tests.
//!
//! It knows nothing of Serin: any CRD can be registered (`load_crd_dir`, or by creating the
//! CustomResourceDefinition), and the operator's production build does not link it.
//!
//! It serves plain HTTP on 127.0.0.1 and speaks enough of the Kubernetes API for `kube::Client`
//! and `kubectl`: discovery, CRUD with optimistic concurrency, the four patch formats
//! (server-side apply approximated), status and scale subresources, finalizers and
//! owner-reference garbage collection, watches with bookmarks and `410 Gone`, Tables and
//! metadata-only answers (`PartialObjectMetadata`), and CRDs whose objects are defaulted,
//! pruned and validated against their structural schema. It counts the requests it serves by
//! client, verb and resource ([`ApiServer::request_counts`]).
//!
//! It is deliberately not a cluster: no controllers run (a Deployment never gets Pods), there is
//! no authentication or admission, and built-in kinds are stored without schema validation. CEL
//! rules (`x-kubernetes-validations`) are evaluated as on create (no `oldSelf`). `docs/embedded-apiserver.md` lists
//! every difference from a real kube-apiserver.

#![forbid(unsafe_code)]

mod counts;
mod error;
mod http;
mod openapi;
mod output;
mod patch;
mod protobuf;
mod schema;
mod selector;
mod store;
mod table;
mod types;
pub mod workloads;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::sync::watch;

pub use counts::RequestKey;
pub use error::{ApiError, Cause};
pub use store::{FieldValidation, WriteOpts};

/// Arguments of `serin apiserver`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiServerArgs {
    /// Port to listen on (127.0.0.1 only); a free port is chosen when omitted.
    #[arg(long)]
    pub port: Option<u16>,
    /// Write a kubeconfig that points at this server to FILE.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig_out: Option<PathBuf>,
    /// Register every CRD found in the YAML files of DIR (repeatable) at start-up.
    #[arg(long, value_name = "DIR")]
    pub load_crds: Vec<PathBuf>,
    /// Load state from FILE at start-up (when it exists) and save it there on Ctrl-C.
    #[arg(long, value_name = "FILE")]
    pub state_file: Option<PathBuf>,
}

/// Runs `serin apiserver` until Ctrl-C.
pub async fn run_apiserver(args: ApiServerArgs) -> anyhow::Result<()> {
    let server = ApiServer::start(Options {
        port: args.port.unwrap_or(0),
        ..Options::default()
    })
    .await?;
    if let Some(state) = &args.state_file
        && state.exists()
    {
        server
            .load_state(state)
            .with_context(|| format!("loading state from {}", state.display()))?;
    }
    for dir in &args.load_crds {
        let n = server
            .load_crd_dir(dir)
            .with_context(|| format!("loading CRDs from {}", dir.display()))?;
        println!("registered {n} CRD(s) from {}", dir.display());
    }
    println!("serin embedded API server listening on {}", server.url());
    if let Some(path) = &args.kubeconfig_out {
        server.write_kubeconfig(path)?;
        println!("kubeconfig written to {}", path.display());
        println!(
            "try: kubectl --kubeconfig {} get namespaces",
            path.display()
        );
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    if let Some(state) = &args.state_file {
        server.save_state(state)?;
        println!("state saved to {}", state.display());
    }
    server.shutdown().await;
    Ok(())
}

/// Start-up options of [`ApiServer`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Port on 127.0.0.1; `0` picks a free one.
    pub port: u16,
    /// Number of events kept for watches that resume from a resourceVersion.
    pub history_limit: usize,
    /// Interval between BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            port: 0,
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// A running embedded API server. Dropping it stops the server.
pub struct ApiServer {
    addr: SocketAddr,
    store: Arc<store::Store>,
    counts: Arc<counts::RequestCounts>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ApiServer {
    /// Binds 127.0.0.1 and starts serving on the current tokio runtime.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port))
            .await
            .with_context(|| format!("binding 127.0.0.1:{}", options.port))?;
        let addr = listener.local_addr()?;
        let store = store::Store::new(options.history_limit);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let counts = Arc::new(counts::RequestCounts::default());
        let app = Arc::new(http::App {
            store: store.clone(),
            bookmark_interval: options.bookmark_interval,
            shutdown: shutdown_rx.clone(),
            address: addr.to_string(),
            counts: counts.clone(),
        });
        let router = axum::Router::new().fallback(http::handle).with_state(app);
        let mut stop = shutdown_rx;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                // Either the flag flips or the sender is gone: both mean stop.
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "embedded API server stopped");
            }
        });
        tracing::info!(%addr, "embedded API server started");
        Ok(Self {
            addr,
            store,
            counts,
            shutdown,
            task: Some(task),
        })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `kube::Client` for this server (default namespace `default`).
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let uri: axum::http::Uri = self.url().parse()?;
        let config = kube::Config::new(uri);
        Ok(kube::Client::try_from(config)?)
    }

    /// A kubeconfig (YAML) with one context, `serin-embedded`, pointing at this server.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: serin-embedded\n  cluster:\n    server: {url}\nusers:\n- name: serin-embedded\n  user: {{}}\ncontexts:\n- name: serin-embedded\n  context:\n    cluster: serin-embedded\n    user: serin-embedded\n    namespace: default\ncurrent-context: serin-embedded\n",
            url = self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Registers (creates or replaces) a CustomResourceDefinition given as JSON.
    pub fn apply_crd(&self, crd: Value) -> Result<Value, ApiError> {
        let name = crd
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let opts = WriteOpts {
            field_manager: "serin-embedded".to_string(),
            ..WriteOpts::default()
        };
        let (group, plural) = ("apiextensions.k8s.io", "customresourcedefinitions");
        match self.store.get(group, plural, "", &name) {
            Ok(current) => {
                let mut body = crd;
                body["metadata"]["resourceVersion"] =
                    current["metadata"]["resourceVersion"].clone();
                self.store
                    .write(group, plural, "v1", "", &name, &opts, |_, _| {
                        Ok(store::Proposal::Object(body))
                    })
                    .map(|w| w.object)
            }
            Err(_) => self
                .store
                .create(group, plural, "v1", "", crd, &opts)
                .map(|w| w.object),
        }
    }

    /// Registers every CustomResourceDefinition in a (multi-document) YAML file; returns how many.
    pub fn load_crd_file(&self, path: &Path) -> anyhow::Result<usize> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut n = 0;
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing {}", path.display()))?;
            if value.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition") {
                self.apply_crd(value)
                    .with_context(|| format!("registering a CRD from {}", path.display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Registers the CRDs of every `.yaml`/`.yml` file in a directory tree; returns how many.
    pub fn load_crd_dir(&self, dir: &Path) -> anyhow::Result<usize> {
        let mut n = 0;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                n += self.load_crd_dir(&path)?;
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                n += self.load_crd_file(&path)?;
            }
        }
        Ok(n)
    }

    /// Current global resourceVersion.
    pub fn revision(&self) -> u64 {
        self.store.revision()
    }

    /// How many requests the server has served since start-up, by client (the `User-Agent`
    /// product), Kubernetes verb and resource (`canaries/status`); a request counts once when it
    /// arrives, whatever its answer. Non-resource requests have the lower-case HTTP method as
    /// verb and a bucket as resource: `discovery`, `version`, `openapi`, `health` or `other`.
    /// Cheap enough to call every second: it copies one entry per key under a short lock.
    pub fn request_counts(&self) -> BTreeMap<RequestKey, u64> {
        self.counts.snapshot()
    }

    /// Saves every object to a JSON file.
    pub fn save_state(&self, path: &Path) -> anyhow::Result<()> {
        let snapshot = self.store.snapshot()?;
        std::fs::write(path, serde_json::to_vec_pretty(&snapshot)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Loads objects saved by [`ApiServer::save_state`].
    pub fn load_state(&self, path: &Path) -> anyhow::Result<()> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let snapshot: Value = serde_json::from_slice(&text)?;
        self.store.restore(&snapshot)?;
        Ok(())
    }

    /// Stops accepting requests, ends open watches and waits for the server task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
