//! End-to-end: the real `serin run` binary against the embedded API server (upstream App
//! Mesh, Gloo and Gateway API CRDs loaded), a real Prometheus scraping the traffic
//! simulator, and the simulator reading the weights Serin writes — the closed loop.
//!
//! Each test gets its own API server, Prometheus and operator, waits on conditions with
//! deadlines, and prints the objects and the operator's log when it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::watcher;
use serde_json::{Value, json};
use serin::api::{Canary, Phase};
use serin::embedded::traffic::{Behaviour, RouterWeights, ServiceConfig, TrafficSimulator};
use serin::embedded::{ApiServer, Options};
use serin::router::{AppMeshKubeRouter, GlooEdgeRouter, Routers};
use support::{Guarded, free_port, listening, require, wait_for, wait_for_blocking};

const NS: &str = "e2e";
const INTERVAL_SECS: u64 = 3;

fn upstream_crds() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/upstream-crds");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "NOTICE: {} is absent (a user's clone): skipping, as these tests need the upstream App Mesh/Gloo CRDs",
            dir.display()
        );
        None
    }
}

/// A real Prometheus scraping one target every second.
struct ScrapingPrometheus {
    url: String,
    _process: Guarded,
    _dir: tempfile::TempDir,
}

impl ScrapingPrometheus {
    fn start(target: &str) -> Self {
        require("prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1h\nscrape_configs:\n  - job_name: envoy\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let process = Guarded::spawn(
            "prometheus",
            &[
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn".into(),
            ],
            &dir.path().join("prometheus.log"),
        );
        wait_for_blocking("prometheus to listen", Duration::from_secs(20), || {
            listening(port)
        });
        ScrapingPrometheus {
            url: format!("http://127.0.0.1:{port}"),
            _process: process,
            _dir: dir,
        }
    }
}

/// The operator as a child process; killed (SIGKILL) on drop.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn start(kubeconfig: &Path, log: PathBuf, extra: &[&str]) -> Self {
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
            .args(extra)
            .env("RUST_LOG", "info,serin=debug")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start serin run");
        Operator { child, log }
    }

    /// kill -9: no chance to clean up.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Env {
    server: ApiServer,
    client: kube::Client,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    prometheus: ScrapingPrometheus,
    sim: Arc<TrafficSimulator>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn gvk(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn virtual_routers() -> ApiResource {
    gvk(
        "appmesh.k8s.aws",
        "v1beta2",
        "VirtualRouter",
        "virtualrouters",
    )
}

async fn create(client: &kube::Client, ar: &ApiResource, namespace: Option<&str>, obj: Value) {
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    };
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

/// The traffic simulator's clusters follow the App Mesh preset's naming:
/// `cds_egress_<mesh>_<virtual node>_<namespace>_http_<port>`.
fn appmesh_service(
    client: &kube::Client,
    canary: Behaviour,
    routers: Routers,
    name: &str,
) -> ServiceConfig {
    ServiceConfig {
        primary_cluster: format!("cds_egress_global_{name}-primary_{NS}_http_9898"),
        canary_cluster: format!("cds_egress_global_{name}-canary_{NS}_http_9898"),
        rps: 200.0,
        primary: Behaviour::HEALTHY,
        canary: vec![(Duration::ZERO, canary)],
        weights: Arc::new(RouterWeights::new(client.clone(), routers, NS, name)),
    }
}

async fn env(services: impl FnOnce(&kube::Client) -> Vec<ServiceConfig>) -> Option<Env> {
    let crds = upstream_crds()?;
    let server = ApiServer::start(Options::default()).await.unwrap();
    let crd: Value = serde_norway::from_str(&serin::api::crd_yaml().unwrap()).unwrap();
    server.apply_crd(crd).unwrap();
    for sub in ["appmesh", "gloo", "gateway-api"] {
        server.load_crd_dir(&crds.join(sub)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let client = server.client().unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await
        .unwrap();
    let sim = TrafficSimulator::new(services(&client), 11);
    let (addr, serve_task) = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let prometheus = ScrapingPrometheus::start(&addr.to_string());
    let tasks = vec![
        serve_task,
        sim.run(Duration::from_millis(100)),
        serin::embedded::workloads::simulate_deployments(
            client.clone(),
            Duration::from_millis(300),
        ),
    ];
    Some(Env {
        server,
        client,
        kubeconfig,
        dir,
        prometheus,
        sim,
        tasks,
    })
}

fn deployment(name: &str, image: &str) -> Deployment {
    let mut d = deployment_value(name, image);
    d["spec"]["template"]["spec"]["containers"][0]["envFrom"] =
        json!([{"configMapRef": {"name": format!("{name}-config"), "optional": true}}]);
    serde_json::from_value(d).unwrap()
}

fn deployment_value(name: &str, image: &str) -> Value {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS},
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
async fn operator_http(op: &Operator, path: &str) -> (u16, String) {
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

fn workload_canary(name: &str, prometheus: &str) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": name, "namespace": NS},
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

async fn setup_appmesh(env: &Env, name: &str) {
    create(
        &env.client,
        &gvk("appmesh.k8s.aws", "v1beta2", "Mesh", "meshes"),
        None,
        json!({"apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "Mesh", "metadata": {"name": "global"},
               "spec": {"namespaceSelector": {"matchLabels": {"mesh": "global"}}}}),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    deployments
        .create(&PostParams::default(), &deployment(name, "podinfo:1"))
        .await
        .unwrap();
    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        NS,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    let obj: DynamicObject =
        serde_json::from_value(workload_canary(name, &env.prometheus.url)).unwrap();
    canaries.create(&PostParams::default(), &obj).await.unwrap();
}

/// Every distinct (primary, canary) weight pair, in order.
type WeightLog = Arc<Mutex<Vec<(i64, i64)>>>;

/// Records every distinct (primary, canary) weight pair the VirtualRouter goes through.
fn record_weights(client: &kube::Client, name: &str) -> (WeightLog, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &virtual_routers());
    let name = name.to_string();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(Ok(ev)) = stream.next().await {
            let objs = match ev {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                _ => vec![],
            };
            for o in objs
                .into_iter()
                .filter(|o| o.metadata.name.as_deref() == Some(&name))
            {
                let targets = o
                    .data
                    .pointer("/spec/routes/0/httpRoute/action/weightedTargets")
                    .cloned();
                if let Some(Value::Array(t)) = targets {
                    let w = |i: usize| t.get(i).and_then(|x| x["weight"].as_i64()).unwrap_or(-1);
                    let pair = (w(0), w(1));
                    let mut seen = out.lock().unwrap();
                    if seen.last() != Some(&pair) {
                        seen.push(pair);
                    }
                }
            }
        }
    });
    (seen, task)
}

async fn canary(env: &Env, name: &str) -> Canary {
    let api: Api<Canary> = Api::namespaced(env.client.clone(), NS);
    api.get(name).await.unwrap()
}

async fn wait_phase(
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

async fn dump(env: &Env, op: &Operator, name: &str) {
    let c = canary(env, name).await;
    eprintln!(
        "--- Canary\n{}",
        serde_norway::to_string(&c).unwrap_or_default()
    );
    let vr: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), NS, &virtual_routers());
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

async fn set_image(env: &Env, name: &str, image: &str) {
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let patch =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}});
    deployments
        .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
}

async fn events(env: &Env, name: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), NS);
    let list = api.list(&Default::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

/// Workload mode with App Mesh: on first sight Serin creates the primary, the Services
/// and the mesh objects; a new image is promoted 20 → 50 → 100 with every weight written
/// in that order, then traffic returns to the updated primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appmesh_workload_promotes_healthy_canary() {
    require("prometheus");
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let Some(env) = env(|c| {
        vec![appmesh_service(
            c,
            Behaviour::HEALTHY,
            routers(c),
            "podinfo",
        )]
    })
    .await
    else {
        return;
    };
    setup_appmesh(&env, "podinfo").await;
    let (weights, _rec) = record_weights(&env.client, "podinfo");
    let op = Operator::start(&env.kubeconfig, env.dir.path().join("operator.log"), &[]);
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    let stable = c.status.unwrap().stable_revision.unwrap();

    set_image(&env, "podinfo", "podinfo:2").await;
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    let status = c.status.unwrap();
    assert_ne!(status.stable_revision.as_deref(), Some(stable.as_str()));
    assert_eq!(
        status.history[0].result,
        serin::api::RolloutResult::Promoted
    );
    assert_eq!(status.canary_weight, 0);
    let seen = weights.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)],
        "weight writes"
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let primary = deployments.get("podinfo-primary").await.unwrap();
    let image = primary.spec.template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("podinfo:2"));
    assert_eq!(
        deployments.get("podinfo").await.unwrap().spec.replicas,
        Some(0),
        "canary scaled down"
    );
    let reasons = events(&env, "podinfo").await;
    for r in [
        "Initialized",
        "RolloutStarted",
        "StepAdvanced",
        "Promoting",
        "Promoted",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
    let (_, canary_totals) = env.sim.totals(0).unwrap();
    assert!(canary_totals.requests > 0, "the canary received traffic");

    // The operator's own endpoints.
    assert_eq!(operator_http(&op, "/healthz").await.0, 200);
    assert_eq!(operator_http(&op, "/readyz").await.0, 200);
    let (code, metrics) = operator_http(&op, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        r#"serin_canary_weight{namespace="e2e",name="podinfo"} 0"#,
        r#"serin_canary_phase{namespace="e2e",name="podinfo",phase="Succeeded"} 1"#,
        r#"serin_rollouts_total{namespace="e2e",name="podinfo",result="Promoted"} 1"#,
        r#"serin_metric_check_total{metric="error-rate",verdict="Pass"}"#,
        r#"serin_provider_requests_total{provider="prometheus",outcome="success"}"#,
        "serin_reconcile_duration_seconds_count",
        r#"serin_rollout_duration_seconds_count{result="Promoted"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

/// A canary answering 5% errors against a 1% bound is rolled back after failureThreshold
/// (2) failed checks: the canary weight returns to 0 and the rollout is recorded as
/// RolledBack; the time from the first failed check to weight 0 is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appmesh_workload_rolls_back_failing_canary() {
    require("prometheus");
    let bad = Behaviour {
        error_rate: 0.05,
        ..Behaviour::HEALTHY
    };
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let Some(env) = env(|c| vec![appmesh_service(c, bad, routers(c), "podinfo")]).await else {
        return;
    };
    setup_appmesh(&env, "podinfo").await;
    let (weights, _rec) = record_weights(&env.client, "podinfo");
    let op = Operator::start(&env.kubeconfig, env.dir.path().join("operator.log"), &[]);
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    set_image(&env, "podinfo", "podinfo:2").await;
    let c = wait_phase(&env, &op, "podinfo", Phase::Failed, Duration::from_secs(90)).await;
    let status = c.status.unwrap();
    assert_eq!(
        status.history[0].result,
        serin::api::RolloutResult::RolledBack
    );
    assert_eq!(status.history[0].reached_weight, 20);
    assert_eq!(status.failed_checks, 2);
    assert_eq!(
        weights.lock().unwrap().clone(),
        vec![(100, 0), (80, 20), (100, 0)]
    );
    let reasons = events(&env, "podinfo").await;
    assert!(reasons.iter().any(|r| r == "CheckFailed"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "RolledBack"), "{reasons:?}");
}

/// An invalid Canary is never acted on: it gets an Invalid condition naming the field
/// and a Warning Event, and no routing object or primary is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_canary_is_never_acted_on() {
    let Some(env) = env(|_| vec![]).await else {
        return;
    };
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    deployments
        .create(&PostParams::default(), &deployment("podinfo", "podinfo:1"))
        .await
        .unwrap();
    let mut obj = workload_canary("podinfo", &env.prometheus.url);
    // Valid for the CRD's schema and CEL rules; only Serin's own checks catch it.
    obj["spec"]["analysis"]["metrics"][0]["preset"] = json!("cloudwatch-appmesh-error-rate");
    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        NS,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    canaries
        .create(
            &PostParams::default(),
            &serde_json::from_value(obj).unwrap(),
        )
        .await
        .unwrap();
    let op = Operator::start(&env.kubeconfig, env.dir.path().join("operator.log"), &[]);
    let api: Api<Canary> = Api::namespaced(env.client.clone(), NS);
    let message = wait_for("the Invalid condition", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let c = api.get("podinfo").await.ok()?;
            let cond =
                serin::api::find_condition(&c.status?.conditions, serin::api::INVALID)?.clone();
            (cond.status == serin::api::ConditionStatus::True).then_some(cond.message)
        }
    })
    .await;
    assert!(
        message.contains("spec.analysis.metrics[0].preset"),
        "{message}"
    );
    let reasons = events(&env, "podinfo").await;
    assert!(reasons.iter().any(|r| r == "Invalid"), "{reasons:?}");
    // Give the operator time to (wrongly) act, then check it did not.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        deployments
            .get_opt("podinfo-primary")
            .await
            .unwrap()
            .is_none(),
        "{}",
        op.log()
    );
    let vr: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), NS, &virtual_routers());
    assert!(vr.list(&Default::default()).await.unwrap().items.is_empty());
    let _ = env.server.revision();
}

/// Traffic mode with a Gloo UpstreamGroup (the seed's upstreamgroup-gateway): only the
/// destination weights move, from all-primary to all-canary, and the canary backend becomes
/// the stable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gloo_upstreamgroup_traffic_mode_promotes() {
    require("prometheus");
    let routers = |c: &kube::Client| Routers::new(vec![Arc::new(GlooEdgeRouter::new(c.clone()))]);
    let Some(env) = env(|c| {
        vec![ServiceConfig {
            primary_cluster: format!("{NS}-colorgateway-9080_{NS}"),
            canary_cluster: format!("{NS}-colorgatewayv2-9080_{NS}"),
            rps: 200.0,
            primary: Behaviour::HEALTHY,
            canary: vec![(Duration::ZERO, Behaviour::HEALTHY)],
            weights: Arc::new(RouterWeights::new(
                c.clone(),
                routers(c),
                NS,
                "colorgateway",
            )),
        }]
    })
    .await
    else {
        return;
    };
    let ug = gvk("gloo.solo.io", "v1", "UpstreamGroup", "upstreamgroups");
    create(
        &env.client,
        &ug,
        Some(NS),
        json!({"apiVersion": "gloo.solo.io/v1", "kind": "UpstreamGroup",
               "metadata": {"name": "upstreamgroup-gateway", "namespace": NS},
               "spec": {"destinations": [
                   {"destination": {"upstream": {"name": format!("{NS}-colorgateway-9080"), "namespace": NS}}, "weight": 1},
                   {"destination": {"upstream": {"name": format!("{NS}-colorgatewayv2-9080"), "namespace": NS}}, "weight": 0}
               ]}}),
    )
    .await;
    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        NS,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    let obj = json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "colorgateway", "namespace": NS},
        "spec": {
            "backends": {"primary": "colorgateway", "canary": "colorgatewayv2"},
            "service": {"port": 9080},
            "router": {"gloo": {"upstreamGroup": {"name": "upstreamgroup-gateway", "namespace": NS}}},
            "steps": [20, 50, 100],
            "analysis": {"interval": format!("{INTERVAL_SECS}s"), "metrics": [{
                "name": "error-rate", "provider": {"prometheus": {"address": env.prometheus.url}},
                "preset": "gloo-error-rate", "max": 1.0}]}
        }
    });
    canaries
        .create(
            &PostParams::default(),
            &serde_json::from_value(obj).unwrap(),
        )
        .await
        .unwrap();
    let op = Operator::start(&env.kubeconfig, env.dir.path().join("operator.log"), &[]);
    let c = wait_phase(
        &env,
        &op,
        "colorgateway",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    let status = c.status.unwrap();
    assert_eq!(status.stable_revision.as_deref(), Some("colorgatewayv2"));
    assert_eq!(status.canary_weight, 100);
    let ug_api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), NS, &ug);
    let obj = ug_api.get("upstreamgroup-gateway").await.unwrap();
    let d = obj.data["spec"]["destinations"].clone();
    assert_eq!(
        (d[0]["weight"].as_i64(), d[1]["weight"].as_i64()),
        (Some(0), Some(100)),
        "{d}"
    );
    // The data plane follows: the simulator reads the same object on its next tick.
    wait_for(
        "the simulator to send all traffic to the canary",
        Duration::from_secs(5),
        || async { (env.sim.weights(0).map(|w| w.canary()) == Some(100)).then_some(()) },
    )
    .await;
    drop(op);
}

/// Waits until the recorded weights reach `len` entries, with a deadline.
async fn wait_weights(env: &Env, op: &Operator, seen: &WeightLog, len: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < len {
        if std::time::Instant::now() > deadline {
            dump(env, op, "podinfo").await;
            panic!(
                "timed out waiting for weight change {len}: {:?}",
                seen.lock().unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new image in the middle of a rollout sets the canary weight back to 0, records the
/// old rollout as superseded, and starts the analysis again from the first step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_revision_mid_rollout_restarts_analysis() {
    require("prometheus");
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let Some(env) = env(|c| {
        vec![appmesh_service(
            c,
            Behaviour::HEALTHY,
            routers(c),
            "podinfo",
        )]
    })
    .await
    else {
        return;
    };
    setup_appmesh(&env, "podinfo").await;
    let (weights, _rec) = record_weights(&env.client, "podinfo");
    let op = Operator::start(&env.kubeconfig, env.dir.path().join("operator.log"), &[]);
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_weights(&env, &op, &weights, 2).await; // (80, 20)
    let rev2 = canary(&env, "podinfo").await.status.unwrap().revision;
    set_image(&env, "podinfo", "podinfo:3").await;
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    let status = c.status.unwrap();
    assert_ne!(status.revision, rev2);
    let results: Vec<_> = status.history.iter().map(|h| h.result).collect();
    use serin::api::RolloutResult::*;
    assert_eq!(results, vec![Promoted, Superseded], "{:?}", status.history);
    assert_eq!(
        weights.lock().unwrap().clone(),
        vec![
            (100, 0),
            (80, 20),
            (100, 0),
            (80, 20),
            (50, 50),
            (0, 100),
            (100, 0)
        ]
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), NS);
    let primary = deployments.get("podinfo-primary").await.unwrap();
    assert_eq!(
        primary.spec.template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("podinfo:3")
    );
}

/// kill -9 of the operator right after each weight change (so often between the weight
/// write and the status write), then a restart: the rollout ends exactly as an
/// uninterrupted one, with no step skipped or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_at_every_step_resumes_exactly() {
    require("prometheus");
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let Some(env) = env(|c| {
        vec![appmesh_service(
            c,
            Behaviour::HEALTHY,
            routers(c),
            "podinfo",
        )]
    })
    .await
    else {
        return;
    };
    setup_appmesh(&env, "podinfo").await;
    let (weights, _rec) = record_weights(&env.client, "podinfo");
    let log = env.dir.path().join("operator.log");
    let mut op = Operator::start(&env.kubeconfig, log.clone(), &[]);
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    set_image(&env, "podinfo", "podinfo:2").await;
    for len in 2..=4 {
        wait_weights(&env, &op, &weights, len).await;
        op.kill();
        op = Operator::start(&env.kubeconfig, log.clone(), &[]);
    }
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        weights.lock().unwrap().clone(),
        vec![(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)]
    );
    let status = c.status.unwrap();
    assert_eq!(status.history.len(), 1, "{:?}", status.history);
    assert_eq!(
        status.history[0].result,
        serin::api::RolloutResult::Promoted
    );
    // Each step lasted at least one analysis interval: none was skipped by a restart.
    let started = status.history[0].started_at.unwrap();
    let took = (status.history[0].finished_at - started).num_milliseconds();
    assert!(
        took >= 2 * INTERVAL_SECS as i64 * 1000,
        "rollout took only {took} ms"
    );
}

/// Two replicas with leader election: only the leader writes; when it is killed the
/// standby takes over within the lease duration and the rollout continues with no step
/// written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_hands_over_without_double_steps() {
    require("prometheus");
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let Some(env) = env(|c| {
        vec![appmesh_service(
            c,
            Behaviour::HEALTHY,
            routers(c),
            "podinfo",
        )]
    })
    .await
    else {
        return;
    };
    setup_appmesh(&env, "podinfo").await;
    let (weights, _rec) = record_weights(&env.client, "podinfo");
    let args = |id: &'static str| {
        [
            "--leader-elect",
            "--lease-duration-secs",
            "3",
            "--identity",
            id,
        ]
    };
    let mut a = Operator::start(
        &env.kubeconfig,
        env.dir.path().join("a.log"),
        &args("replica-a"),
    );
    // Let replica-a take the lease before replica-b starts.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), "default");
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("serin-leader")
                .await
                .ok()
                .flatten()?
                .spec?
                .holder_identity
        }
    };
    wait_for("replica-a to lead", Duration::from_secs(20), || async {
        holder().await.filter(|h| h == "replica-a")
    })
    .await;
    let b = Operator::start(
        &env.kubeconfig,
        env.dir.path().join("b.log"),
        &args("replica-b"),
    );
    wait_phase(&env, &a, "podinfo", Phase::Waiting, Duration::from_secs(30)).await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_weights(&env, &a, &weights, 2).await;
    a.kill();
    wait_for(
        "replica-b to take over",
        Duration::from_secs(20),
        || async { holder().await.filter(|h| h == "replica-b") },
    )
    .await;
    let c = wait_phase(
        &env,
        &b,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        weights.lock().unwrap().clone(),
        vec![(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)]
    );
    assert_eq!(c.status.unwrap().history.len(), 1);
    assert!(b.log().contains("acquired leadership"), "{}", b.log());
}

/// A change to a ConfigMap the pod template reads starts a rollout, as a new image does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_starts_a_rollout() {
    require("prometheus");
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let Some(env) = env(|c| {
        vec![appmesh_service(
            c,
            Behaviour::HEALTHY,
            routers(c),
            "podinfo",
        )]
    })
    .await
    else {
        return;
    };
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.client.clone(), NS);
    let cm = |v: &str| {
        serde_json::from_value(
            json!({"metadata": {"name": "podinfo-config", "namespace": NS}, "data": {"COLOR": v}}),
        )
        .unwrap()
    };
    configmaps
        .create(&PostParams::default(), &cm("blue"))
        .await
        .unwrap();
    setup_appmesh(&env, "podinfo").await;
    let op = Operator::start(&env.kubeconfig, env.dir.path().join("operator.log"), &[]);
    let before = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    let stable = before.status.unwrap().stable_revision;
    configmaps
        .replace("podinfo-config", &PostParams::default(), &{
            let mut c: k8s_openapi::api::core::v1::ConfigMap = cm("green");
            c.metadata.resource_version = configmaps
                .get("podinfo-config")
                .await
                .unwrap()
                .metadata
                .resource_version;
            c
        })
        .await
        .unwrap();
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let status = c.status.unwrap();
    assert_ne!(status.stable_revision, stable);
    assert_eq!(
        status.history[0].result,
        serin::api::RolloutResult::Promoted
    );
}
