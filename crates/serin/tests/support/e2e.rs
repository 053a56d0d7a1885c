//! The closed-loop harness of the end-to-end tests: a namespace of its own on this run's
//! API server ([`super::cluster`]: the real control plane under `scripts/test`, else the
//! in-memory one with its Deployment status simulator) with Serin's and the upstream CRDs,
//! the traffic simulator reading the weights Serin writes, a real Prometheus scraping it,
//! and the real `serin run` binary as a child process, scoped to that namespace.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cluster::TestCluster;
use super::{Guarded, free_port, listening, require, wait_for_blocking};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};
use serin::api::{Canary, Phase};
use serin::demo::traffic::{Behaviour, RouterWeights, ServiceConfig, TrafficSimulator};
use serin::router::{AppMeshKubeRouter, Routers};
use std::time::Instant;

pub const INTERVAL_SECS: u64 = 3;

/// A real Prometheus scraping one target every second; it can be stopped and started
/// again on the same port and data directory (an outage).
pub struct ScrapingPrometheus {
    pub url: String,
    port: u16,
    process: Option<Guarded>,
    dir: tempfile::TempDir,
}

impl ScrapingPrometheus {
    pub fn start(target: &str) -> Self {
        require("prometheus");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1h\nscrape_configs:\n  - job_name: envoy\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut p = ScrapingPrometheus {
            url: format!("http://127.0.0.1:{port}"),
            port,
            process: None,
            dir,
        };
        p.resume();
        p
    }

    /// Stops the server (the data directory stays).
    pub fn stop(&mut self) {
        self.process = None;
        wait_for_blocking("prometheus to stop", Duration::from_secs(10), || {
            !listening(self.port)
        });
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        let d = self.dir.path();
        self.process = Some(Guarded::spawn(
            "prometheus",
            &[
                format!("--config.file={}", d.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", d.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{}", self.port),
                "--log.level=warn".into(),
            ],
            &d.join("prometheus.log"),
        ));
        let port = self.port;
        wait_for_blocking("prometheus to listen", Duration::from_secs(20), || {
            listening(port)
        });
        // Its first scrape comes a few seconds after start-up; checks before it would see
        // no data at all.
        wait_for_blocking(
            "prometheus to scrape its target",
            Duration::from_secs(30),
            || http_get(port, "/api/v1/query?query=up%3D%3D1").contains("\"value\""),
        );
    }
}

/// A blocking HTTP/1.0 GET on 127.0.0.1:`port`; the whole response, or "" on failure.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return String::new();
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf
}

/// The operator as a child process; killed (SIGKILL) on drop.
pub struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    /// `serin run` for the test's namespace (and its leader-election Lease there), logging
    /// to `log`.
    pub fn start(env: &Env, log: PathBuf, extra: &[&str]) -> Self {
        Self::start_with_env(env, log, extra, &[])
    }

    /// Like [`Operator::start`], with extra environment variables (AWS credentials).
    pub fn start_with_env(env: &Env, log: PathBuf, extra: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_via(env, &env.operator_kubeconfig, log, extra, envs)
    }

    /// Like [`Operator::start_with_env`], reaching the API server through `kubeconfig`
    /// (a fault proxy's, for example).
    pub fn start_via(
        env: &Env,
        kubeconfig: &std::path::Path,
        log: PathBuf,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_serin"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--namespace", &env.ns, "--lease-namespace", &env.ns])
            .args(extra)
            .env("RUST_LOG", "info,serin=debug")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start serin run");
        Operator { child, log }
    }

    /// kill -9: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Env {
    /// The test's namespace on this run's API server.
    pub cluster: TestCluster,
    pub client: kube::Client,
    /// The admin's kubeconfig.
    pub kubeconfig: PathBuf,
    /// Serin's: on the real control plane its chart's ServiceAccount and RBAC
    /// ([`super::rbac`]); on the in-memory server (no authorization) the admin's.
    pub operator_kubeconfig: PathBuf,
    /// The test's namespace.
    pub ns: String,
    pub prometheus: ScrapingPrometheus,
    pub sim: Arc<TrafficSimulator>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn gvk(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

pub fn virtual_routers() -> ApiResource {
    gvk(
        "appmesh.k8s.aws",
        "v1beta2",
        "VirtualRouter",
        "virtualrouters",
    )
}

pub async fn create(client: &kube::Client, ar: &ApiResource, namespace: Option<&str>, obj: Value) {
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    };
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

/// The traffic simulator's clusters follow the App Mesh preset's naming:
/// `cds_egress_<mesh>_<virtual node>_<namespace>_http_<port>`.
pub fn appmesh_service(
    client: &kube::Client,
    ns: &str,
    canary: Behaviour,
    routers: Routers,
    name: &str,
) -> ServiceConfig {
    ServiceConfig {
        primary_cluster: format!("cds_egress_global_{name}-primary_{ns}_http_9898"),
        canary_cluster: format!("cds_egress_global_{name}-canary_{ns}_http_9898"),
        rps: 200.0,
        primary: Behaviour::HEALTHY,
        canary: vec![(Duration::ZERO, canary)],
        weights: Arc::new(RouterWeights::new(client.clone(), routers, ns, name)),
    }
}

/// A namespace of its own with the CRDs, the traffic simulator serving `services` (given the
/// client and the namespace) to a scraping Prometheus, and, on the in-memory server, the
/// Deployment status simulator. `None` when the upstream CRDs are absent.
pub async fn env(services: impl FnOnce(&kube::Client, &str) -> Vec<ServiceConfig>) -> Option<Env> {
    env_on(TestCluster::start("e2e").await?, services).await
}

/// [`env`], always on a real control plane (for what only a real server shows).
pub async fn env_real(
    prefix: &str,
    services: impl FnOnce(&kube::Client, &str) -> Vec<ServiceConfig>,
) -> Option<Env> {
    env_on(TestCluster::start_real(prefix).await?, services).await
}

async fn env_on(
    cluster: TestCluster,
    services: impl FnOnce(&kube::Client, &str) -> Vec<ServiceConfig>,
) -> Option<Env> {
    let client = cluster.client.clone();
    let ns = cluster.namespace.clone();
    let sim = TrafficSimulator::new(services(&client, &ns), 11);
    let (addr, serve_task) = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let prometheus = ScrapingPrometheus::start(&addr.to_string());
    let mut tasks = vec![serve_task, sim.run(Duration::from_millis(100))];
    tasks.extend(cluster.simulate_workloads(Duration::from_millis(300)));
    let operator_kubeconfig = if cluster.is_real() {
        super::rbac::operator_kubeconfig(&cluster).await
    } else {
        cluster.kubeconfig.clone()
    };
    Some(Env {
        kubeconfig: cluster.kubeconfig.clone(),
        operator_kubeconfig,
        cluster,
        client,
        ns,
        prometheus,
        sim,
        tasks,
    })
}

pub fn deployment(ns: &str, name: &str, image: &str) -> Deployment {
    let mut d = deployment_value(ns, name, image);
    d["spec"]["template"]["spec"]["containers"][0]["envFrom"] =
        json!([{"configMapRef": {"name": format!("{name}-config"), "optional": true}}]);
    serde_json::from_value(d).unwrap()
}

pub fn deployment_value(ns: &str, name: &str, image: &str) -> Value {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image, "ports": [{"containerPort": 9898}]}]}
            }
        }
    }))
    .unwrap()
}

/// GETs `path` from the operator's metrics/health server, whose address it logs.
pub async fn operator_http(op: &Operator, path: &str) -> (u16, String) {
    let log = op.log();
    let addr = log
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .expect("the operator logs its metrics address")
        .to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

pub fn workload_canary(ns: &str, name: &str, prometheus: &str) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "service": {"port": 9898},
            "router": {"appMesh": {"mesh": "global"}},
            "steps": [20, 50, 100],
            "analysis": {
                "interval": format!("{INTERVAL_SECS}s"),
                "failureThreshold": 2,
                "metrics": [{
                    "name": "error-rate",
                    "provider": {"prometheus": {"address": prometheus}},
                    "preset": "appmesh-error-rate",
                    "max": 1.0
                }]
            }
        }
    })
}

/// The Mesh `global` (cluster-scoped: shared by the tests of a run, so created once).
pub async fn ensure_mesh(client: &kube::Client) {
    let meshes: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &gvk("appmesh.k8s.aws", "v1beta2", "Mesh", "meshes"),
    );
    let mesh: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "Mesh", "metadata": {"name": "global"},
        "spec": {"namespaceSelector": {"matchLabels": {"mesh": "global"}}}
    }))
    .unwrap();
    match meshes.create(&PostParams::default(), &mesh).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create Mesh global: {e}"),
    }
}

pub async fn setup_appmesh(env: &Env, name: &str) {
    setup_appmesh_with(
        env,
        name,
        workload_canary(&env.ns, name, &env.prometheus.url),
    )
    .await;
}

/// [`setup_appmesh`] with the Canary `canary` (say, [`workload_canary`] with labels).
pub async fn setup_appmesh_with(env: &Env, name: &str, canary: Value) {
    ensure_mesh(&env.client).await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment(&env.ns, name, "podinfo:1"),
        )
        .await
        .unwrap();
    create_canary(env, canary).await;
}

/// Creates UpstreamGroup `name` in the test's namespace, all traffic on the first of the
/// `(primary, canary)` Upstreams (named as Gloo's discovery names them).
pub async fn create_upstream_group(env: &Env, name: &str, upstreams: (&str, &str)) {
    let destination = |upstream: &str, weight: u32| json!({"destination": {"upstream": {"name": upstream, "namespace": env.ns}}, "weight": weight});
    create(
        &env.client,
        &gvk("gloo.solo.io", "v1", "UpstreamGroup", "upstreamgroups"),
        Some(&env.ns),
        json!({"apiVersion": "gloo.solo.io/v1", "kind": "UpstreamGroup",
               "metadata": {"name": name, "namespace": env.ns},
               "spec": {"destinations": [destination(upstreams.0, 1), destination(upstreams.1, 0)]}}),
    )
    .await;
}

/// Creates Canary `canary` in the test's namespace.
pub async fn create_canary(env: &Env, canary: Value) {
    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    let obj: DynamicObject = serde_json::from_value(canary).unwrap();
    canaries.create(&PostParams::default(), &obj).await.unwrap();
}

/// Every distinct (primary, canary) weight pair, in order.
/// Every distinct (primary, canary) weight pair a routing object goes through, in order,
/// with when it was seen.
#[derive(Clone, Default)]
pub struct WeightLog(Arc<Mutex<Vec<(Pair, Instant)>>>);

/// (primary, canary) weights.
pub type Pair = (i64, i64);

impl WeightLog {
    /// The pairs, in order.
    pub fn pairs(&self) -> Vec<(i64, i64)> {
        self.0.lock().unwrap().iter().map(|(p, _)| *p).collect()
    }

    /// How many pairs were seen.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// When the `i`-th pair was seen.
    pub fn seen_at(&self, i: usize) -> Option<Instant> {
        self.0.lock().unwrap().get(i).map(|(_, t)| *t)
    }

    fn push(&self, pair: (i64, i64)) {
        let mut v = self.0.lock().unwrap();
        if v.last().map(|(p, _)| *p) != Some(pair) {
            v.push((pair, Instant::now()));
        }
    }
}

/// Records the weights of the VirtualRouter `ns/name`'s first route.
pub async fn record_weights(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> (WeightLog, tokio::task::JoinHandle<()>) {
    record_weights_of(
        client,
        ns,
        virtual_routers(),
        name,
        "/spec/routes/0/httpRoute/action/weightedTargets",
    )
    .await
}

/// Records the weights of object `name` of kind `ar`, from the weight list at `pointer`.
/// Returns once the watch's first list has succeeded, so a test that asserts the whole
/// sequence cannot lose a pair written while the watch was still retrying that list (the
/// real server may refuse it while a CRD is fresh).
pub async fn record_weights_of(
    client: &kube::Client,
    ns: &str,
    ar: ApiResource,
    name: &str,
    pointer: &'static str,
) -> (WeightLog, tokio::task::JoinHandle<()>) {
    let seen = WeightLog::default();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let name = name.to_string();
    let out = seen.clone();
    let (listed_tx, listed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut listed_tx = Some(listed_tx);
        // A watch error must not end the recording: the watcher retries with backoff.
        // A streaming list takes the initial state from the watch itself: a list followed
        // by a watch from the list's resourceVersion can be refused (410 Expired) when the
        // server's watch cache starts after that version, and the relist then misses the
        // writes made meanwhile (the object's first weights, typically).
        let config = watcher::Config::default().streaming_lists();
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    // Said, so that a sequence missing a pair explains itself: states
                    // between a failed watch and its relist are not seen.
                    eprintln!("weight recorder of {name}: watch error (retrying): {e}");
                    continue;
                }
            };
            let objs = match ev {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                watcher::Event::Init if listed_tx.is_none() => {
                    eprintln!(
                        "weight recorder of {name}: the watch relisted; pairs written meanwhile are lost"
                    );
                    vec![]
                }
                watcher::Event::InitDone => {
                    if let Some(tx) = listed_tx.take() {
                        let _ = tx.send(());
                    }
                    vec![]
                }
                _ => vec![],
            };
            for o in objs
                .into_iter()
                .filter(|o| o.metadata.name.as_deref() == Some(&name))
            {
                if let Some(Value::Array(t)) = o.data.pointer(pointer).cloned() {
                    let w = |i: usize| t.get(i).and_then(|x| x["weight"].as_i64()).unwrap_or(-1);
                    out.push((w(0), w(1)));
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), listed)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the watch of {} in {ns} did not list within 30 s",
                ar.plural
            )
        })
        .expect("the weight recorder ended before its first list");
    (seen, task)
}

pub async fn canary(env: &Env, name: &str) -> Canary {
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    api.get(name).await.unwrap()
}

pub async fn wait_phase(
    env: &Env,
    op: &Operator,
    name: &str,
    phase: Phase,
    timeout: Duration,
) -> Canary {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let c = canary(env, name).await;
        if c.status.as_ref().is_some_and(|s| s.phase == phase) {
            return c;
        }
        if std::time::Instant::now() > deadline {
            dump(env, op, name).await;
            panic!("timed out after {timeout:?} waiting for phase {phase:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn dump(env: &Env, op: &Operator, name: &str) {
    let c = canary(env, name).await;
    eprintln!(
        "--- Canary\n{}",
        serde_norway::to_string(&c).unwrap_or_default()
    );
    let vr: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.ns, &virtual_routers());
    if let Ok(Some(v)) = vr.get_opt(name).await {
        eprintln!(
            "--- VirtualRouter\n{}",
            serde_norway::to_string(&v.data).unwrap_or_default()
        );
    }
    eprintln!("--- simulator totals {:?}", env.sim.totals(0));
    let log = op.log();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    eprintln!(
        "--- operator log (last 60 lines)\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// Sets the judge of every metric of Canary `name` (`Sequential` or `Threshold`).
pub async fn set_judge(env: &Env, name: &str, judge: &str) {
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    let c = api.get(name).await.unwrap();
    let mut metrics = serde_json::to_value(&c.spec.analysis.metrics).unwrap();
    for m in metrics.as_array_mut().unwrap() {
        m["judge"] = json!(judge);
    }
    let patch = json!({"spec": {"analysis": {"metrics": metrics}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

pub async fn set_image(env: &Env, name: &str, image: &str) {
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let patch =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}});
    deployments
        .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
}

/// (reason, message) of the core/v1 Events about Canary `name`, oldest first (on the real
/// control plane the deployment controller also reports about the Deployment of that name).
pub async fn event_messages(env: &Env, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let mut list: Vec<Event> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && e.involved_object.kind.as_deref() == Some("Canary")
        })
        .collect();
    list.sort_by_key(|e| {
        e.metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
    });
    list.into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Waits until the recorded weights reach `len` entries, with a deadline.
pub async fn wait_weights(env: &Env, op: &Operator, seen: &WeightLog, len: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < len {
        if std::time::Instant::now() > deadline {
            dump(env, op, "podinfo").await;
            panic!(
                "timed out waiting for weight change {len}: {:?}",
                seen.pairs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The common start of the App Mesh tests: an environment with the workload Canary
/// `podinfo` (its canary behaving as `canary`) and its VirtualRouter's weights recorded
/// from the beginning.
pub async fn podinfo_env(canary: Behaviour) -> Option<(Env, WeightLog)> {
    podinfo_setup(env(podinfo_services(canary)).await?).await
}

/// [`podinfo_env`], always on a real control plane.
pub async fn podinfo_env_real(prefix: &str, canary: Behaviour) -> Option<(Env, WeightLog)> {
    podinfo_setup(env_real(prefix, podinfo_services(canary)).await?).await
}

pub fn podinfo_services(
    canary: Behaviour,
) -> impl FnOnce(&kube::Client, &str) -> Vec<ServiceConfig> {
    move |c, ns| {
        let routers = Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
        vec![appmesh_service(c, ns, canary, routers, "podinfo")]
    }
}

async fn podinfo_setup(mut env: Env) -> Option<(Env, WeightLog)> {
    setup_appmesh(&env, "podinfo").await;
    let (weights, recorder) = record_weights(&env.client, &env.ns, "podinfo").await;
    env.tasks.push(recorder);
    Some((env, weights))
}

/// Starts the operator and waits until Canary `name` is initialised (`Waiting`).
pub async fn ready_operator(env: &Env, name: &str) -> Operator {
    let op = Operator::start(env, env.cluster.dir.path().join("operator.log"), &[]);
    wait_phase(env, &op, name, Phase::Waiting, Duration::from_secs(30)).await;
    op
}

/// Waits (with a deadline) until an Event with `reason` about `name` exists, then returns
/// all of them. The operator publishes Events after it records the status, so a test that
/// has seen the new phase may be a moment ahead of the Events.
pub async fn events_after(env: &Env, name: &str, reason: &str) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = event_messages(env, name).await;
        if events.iter().any(|(r, _)| r == reason) {
            return events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {reason} Event about {name}: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ready endpoints in the EndpointSlices of Service `ns/svc` (`kubernetes.io/service-name`).
pub async fn ready_endpoints(client: &kube::Client, ns: &str, svc: &str) -> usize {
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(client.clone(), ns);
    let lp = kube::api::ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
    slices
        .list(&lp)
        .await
        .unwrap()
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        // An unknown readiness counts as ready, as the API documents for consumers.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .count()
}
