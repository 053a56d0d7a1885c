//! `serin demo`: Serin's whole closed loop in one process, with nothing installed.
//!
//! It starts the embedded API server, registers the Canary CRD and Serin's own definitions
//! of the App Mesh and Gloo kinds ([`kinds`]), creates the colorapp (namespace
//! `appmesh-demo`, Mesh `color-mesh`, the `colorgateway` node behind a VirtualGateway, and
//! the `colorteller` Deployment with its Canary), and runs the real controller against it.
//! The Deployment simulator marks workloads ready, the traffic simulator sends requests split
//! by the weights Serin writes (on the VirtualRouter, or with `--router gateway-api` on the
//! HTTPRoute `colorteller`: the same Canary with only `spec.router` changed), and
//! [`source::InProcessSource`]
//! computes the Canary's presets from the simulator's counters, as Prometheus would.
//!
//! Scenarios: a healthy build (`colorteller:v2`) promoted 20 → 50 → 100, then a faulty one
//! (`colorteller:v3`: healthy at 20%, 8% errors and a 900 ms p99 once it carries 50% of the
//! traffic) rolled back from 50%. Each starts by changing the
//! target's image, as a user's deploy would. `--speed` compresses time: `analysis.interval`
//! is 60s / speed.
//!
//! It is a demonstration, not a test harness and not a way to run Serin for real: real users
//! run `serin run` against a cluster.

pub mod kinds;
pub mod source;
pub mod traffic;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::api::{Canary, Phase, RolloutResult};
use crate::arms::{PerArm, Weights};
use crate::controller::telemetry::Metrics;
use crate::controller::{Context, ControllerOptions};
use crate::router::{AppMeshKubeRouter, HttpRouteRouter, Routers};
use kube_sandbox::{ApiServer, Options};
use traffic::{Behaviour, RouterWeights, ServiceConfig, TrafficSimulator};

use crate::view::{self, EventLine, Observed, Served, View};
use source::{History, InProcessSource, Sample};

/// The demo's namespace, mesh, target and Canary.
pub const NAMESPACE: &str = "appmesh-demo";
/// The Mesh.
pub const MESH: &str = "color-mesh";
/// The Canary and its target Deployment.
pub const TARGET: &str = "colorteller";
/// The service port.
const PORT: i64 = 9080;
/// Simulated requests per second from colorgateway to colorteller.
const RPS: f64 = 200.0;
/// The simulator's tick.
const TICK: Duration = Duration::from_millis(100);
/// How often the view polls the API server.
const POLL: Duration = Duration::from_millis(100);
/// How long the simulated Deployment controller takes to make a workload ready.
const READY_DELAY: Duration = Duration::from_millis(400);

/// Which rollouts `serin demo` shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScenarioChoice {
    /// A healthy build promoted 20 → 50 → 100.
    Promote,
    /// A build that fails under load, rolled back.
    Rollback,
    /// Both, one after the other.
    Both,
}

/// The data plane `serin demo` routes with.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RouterChoice {
    /// AWS App Mesh: Serin creates colorteller's VirtualNodes, VirtualRouter and
    /// VirtualService and writes the route's weights.
    #[default]
    Appmesh,
    /// The Gateway API: the same Canary with only `spec.router` (and its presets) changed,
    /// writing the weights of the rule `split` of the HTTPRoute `colorteller` that the
    /// platform team owns. The migration path off App Mesh.
    GatewayApi,
}

impl RouterChoice {
    fn router_spec(self) -> Value {
        match self {
            RouterChoice::Appmesh => json!({"appMesh": {"mesh": MESH}}),
            RouterChoice::GatewayApi => json!({"gatewayApi": {"httpRoute": {"name": TARGET}}}),
        }
    }

    /// The error-rate and latency presets of this data plane.
    fn presets(self) -> (&'static str, &'static str) {
        match self {
            RouterChoice::Appmesh => ("appmesh-error-rate", "appmesh-latency-p99"),
            RouterChoice::GatewayApi => ("gateway-error-rate", "gateway-latency-p99"),
        }
    }

    /// The object whose weights Serin writes.
    fn routing_object(self) -> String {
        match self {
            RouterChoice::Appmesh => format!("VirtualRouter {TARGET}"),
            RouterChoice::GatewayApi => format!("HTTPRoute {TARGET}"),
        }
    }

    /// The Envoy cluster of an arm, as this data plane names it (shown, not queried: the
    /// demo's metric source reads the simulator directly).
    fn cluster(self, arm: &str) -> String {
        match self {
            RouterChoice::Appmesh => {
                format!("cds_egress_{MESH}_{TARGET}-{arm}_{NAMESPACE}_http_{PORT}")
            }
            RouterChoice::GatewayApi => format!("{NAMESPACE}_{TARGET}-{arm}_{PORT}"),
        }
    }
}

/// Arguments of `serin demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Which rollouts to show.
    #[arg(long, value_enum, default_value_t = ScenarioChoice::Both)]
    pub scenario: ScenarioChoice,
    /// The data plane whose weights Serin writes.
    #[arg(long, value_enum, default_value_t = RouterChoice::Appmesh)]
    pub router: RouterChoice,
    /// Time compression: the Canary's analysis.interval is 60s / speed (at least 1s). The
    /// default runs both scenarios in about a minute.
    #[arg(long, default_value_t = 5.0)]
    pub speed: f64,
    /// Write a kubeconfig for the embedded API server here, to watch with
    /// `kubectl --kubeconfig FILE get canaries -A -w` while the demo runs.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig_out: Option<PathBuf>,
    /// Keep the API server (and Serin) running after the demo, until Ctrl-C.
    #[arg(long)]
    pub hold: bool,
    /// Write Serin's logs here (level from RUST_LOG, default info). Without it, warnings go
    /// to standard error, or to serin-demo.log in the temp directory when standard output is
    /// a terminal, so they do not garble the live view.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// Installs the demo's logging (see [`DemoArgs::log_file`]); call before the runtime starts.
/// On a terminal, warnings go to a file so they do not break the live view.
pub fn init_logging(args: &DemoArgs) {
    let (path, level) = match &args.log_file {
        Some(p) => (Some(p.clone()), "info"),
        None if std::io::stdout().is_terminal() => {
            (Some(std::env::temp_dir().join("serin-demo.log")), "warn")
        }
        None => (None, "warn"),
    };
    let file = path.and_then(|p| std::fs::File::create(p).ok());
    crate::logging::init(crate::logging::LogFormat::Text, level, file);
}

/// One rollout of the demo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Promote,
    Rollback,
}

impl Scenario {
    fn image(self) -> &'static str {
        match self {
            Scenario::Promote => "colorteller:v2",
            Scenario::Rollback => "colorteller:v3",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Promote => "promote",
            Scenario::Rollback => "rollback",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Scenario::Promote => "a healthy build, promoted step by step",
            Scenario::Rollback => {
                "a build that fails under load (from 50% of traffic), rolled back"
            }
        }
    }

    /// How the new build behaves when it carries at least the given share of the traffic
    /// (below it, it is healthy).
    fn under_load(self) -> Option<(u8, Behaviour)> {
        match self {
            Scenario::Promote => None,
            Scenario::Rollback => Some((
                50,
                Behaviour {
                    error_rate: 0.08,
                    median_ms: 40.0,
                    p99_ms: 900.0,
                },
            )),
        }
    }

    fn expected(self) -> (Phase, RolloutResult) {
        match self {
            Scenario::Promote => (Phase::Succeeded, RolloutResult::Promoted),
            Scenario::Rollback => (Phase::Failed, RolloutResult::RolledBack),
        }
    }
}

/// What one scenario did.
struct Report {
    scenario: Scenario,
    phase: Phase,
    result: Option<RolloutResult>,
    reached: Option<u8>,
    took: Duration,
    canary_weights: Vec<u8>,
    /// When the VirtualRouter first gave the canary the weight it fails at.
    failing_from: Option<DateTime<Utc>>,
    weight_zero: Option<DateTime<Utc>>,
    traffic: Option<PerArm<Served>>,
    timed_out: bool,
}

impl Report {
    fn ok(&self) -> bool {
        let (phase, result) = self.scenario.expected();
        !self.timed_out && self.phase == phase && self.result == Some(result)
    }
}

/// The analysis interval for `speed`: 60s / speed, at least 1s, in whole milliseconds.
pub fn interval_for(speed: f64) -> Duration {
    let ms = (60_000.0 / speed).round().max(1000.0);
    Duration::from_millis(ms as u64)
}

fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The demo's Canary: workload mode on the colorteller Deployment, App Mesh router, both
/// presets computed in-process.
pub fn canary_manifest(interval: Duration) -> Value {
    canary_manifest_for(interval, RouterChoice::Appmesh)
}

/// [`canary_manifest`] routed by `router`: only `spec.router` and the presets differ.
pub fn canary_manifest_for(interval: Duration, router: RouterChoice) -> Value {
    let (errors, latency) = router.presets();
    // The provider is required by the API; the demo's metric source answers instead.
    let provider = json!({"prometheus": {"address": "http://in-process.serin-demo"}});
    json!({
        "apiVersion": "serin.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": TARGET, "namespace": NAMESPACE},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": TARGET},
            "service": {"port": PORT},
            "router": router.router_spec(),
            "steps": [20, 50, 100],
            "analysis": {
                "interval": duration_text(interval),
                "checksPerStep": 1,
                "failureThreshold": 2,
                "metrics": [
                    {"name": "error-rate", "provider": provider, "preset": errors,
                     "max": 1, "minSampleSize": 20},
                    {"name": "p99-latency", "provider": provider, "preset": latency,
                     "max": 500}
                ]
            }
        }
    })
}

fn deployment(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "image": image,
                                         "ports": [{"containerPort": PORT}]}]}
            }
        }
    })
}

/// The colorapp around the Canary: everything but what Serin creates itself; with the
/// Gateway API also the HTTPRoute whose rule `split` sends to colorteller's two arms.
fn colorapp(router: RouterChoice) -> Vec<Value> {
    let am = "appmesh.k8s.aws/v1beta2";
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE,
               "labels": {"mesh": MESH, "gateway": "ingress-gw"}}}),
        json!({"apiVersion": am, "kind": "Mesh", "metadata": {"name": MESH},
               "spec": {"namespaceSelector": {"matchLabels": {"mesh": MESH}}}}),
        json!({"apiVersion": am, "kind": "VirtualGateway",
               "metadata": {"name": "ingress-gw", "namespace": NAMESPACE},
               "spec": {"namespaceSelector": {"matchLabels": {"gateway": "ingress-gw"}},
                        "podSelector": {"matchLabels": {"app": "ingress-gw"}},
                        "listeners": [{"portMapping": {"port": 8088, "protocol": "http"}}]}}),
        json!({"apiVersion": am, "kind": "GatewayRoute",
               "metadata": {"name": "colorgateway", "namespace": NAMESPACE},
               "spec": {"httpRoute": {"match": {"prefix": "/color"},
                        "action": {"target": {"virtualService":
                                   {"virtualServiceRef": {"name": "colorgateway"}}}}}}}),
        json!({"apiVersion": am, "kind": "VirtualNode",
               "metadata": {"name": "colorgateway", "namespace": NAMESPACE},
               "spec": {"podSelector": {"matchLabels": {"app": "colorgateway"}},
                        "listeners": [{"portMapping": {"port": PORT, "protocol": "http"}}],
                        "serviceDiscovery": {"dns": {"hostname":
                            format!("colorgateway.{NAMESPACE}.svc.cluster.local")}},
                        "backends": [{"virtualService": {"virtualServiceRef": {"name": TARGET}}}]}}),
        json!({"apiVersion": am, "kind": "VirtualService",
               "metadata": {"name": "colorgateway", "namespace": NAMESPACE},
               "spec": {"awsName": format!("colorgateway.{NAMESPACE}.svc.cluster.local"),
                        "provider": {"virtualNode": {"virtualNodeRef": {"name": "colorgateway"}}}}}),
        deployment("colorgateway", "colorgateway:v1"),
        deployment(TARGET, "colorteller:v1"),
    ];
    if router == RouterChoice::GatewayApi {
        let backend = |arm: &str, weight: i64| json!({"name": format!("{TARGET}-{arm}"), "port": PORT, "weight": weight});
        objects.push(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": TARGET, "namespace": NAMESPACE},
            "spec": {"parentRefs": [{"name": "public-gateway", "namespace": "gateway-system"}],
                     "rules": [{"name": "split",
                                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                "backendRefs": [backend("primary", 100), backend("canary", 0)]}]}
        }));
    }
    objects
}

/// Creates `obj` (any kind the server serves) through the API, as `kubectl create` would.
pub async fn create(client: &kube::Client, obj: &Value) -> anyhow::Result<()> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::core::GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {kind}"))?;
    let dynamic: kube::api::DynamicObject = serde_json::from_value(obj.clone())?;
    let api: Api<kube::api::DynamicObject> =
        match (caps.scope, obj["metadata"]["namespace"].as_str()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &ar)
            }
            _ => Api::all_with(client.clone(), &ar),
        };
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    api.create(&PostParams::default(), &dynamic)
        .await
        .with_context(|| format!("creating {kind} {name}"))?;
    Ok(())
}

/// The traffic of one scenario: a simulator whose canary behaves like the scenario's build,
/// ticking in its own task and recording samples for the metric source.
struct Traffic {
    sim: Arc<TrafficSimulator>,
    history: Arc<History>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Traffic {
    fn start(
        client: &kube::Client,
        routers: &Routers,
        router: RouterChoice,
        source: &InProcessSource,
        under_load: Option<(u8, Behaviour)>,
        retention: Duration,
    ) -> Traffic {
        let cluster = |arm: &str| router.cluster(arm);
        let sim = TrafficSimulator::new(
            vec![ServiceConfig {
                primary_cluster: cluster("primary"),
                canary_cluster: cluster("canary"),
                rps: RPS,
                primary: Behaviour::HEALTHY,
                canary: vec![(Duration::ZERO, Behaviour::HEALTHY)],
                weights: Arc::new(RouterWeights::new(
                    client.clone(),
                    routers.clone(),
                    NAMESPACE,
                    TARGET,
                )),
            }],
            7,
        );
        if let Some((min_weight, behaviour)) = under_load {
            sim.degrade_under_load(0, min_weight, behaviour);
        }
        let history = Arc::new(History::new(Sample::zero(Utc::now()), retention));
        source.attach(NAMESPACE, TARGET, history.clone());
        let (s, h) = (sim.clone(), history.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                s.tick(TICK).await;
                if let Some(sample) = Sample::read(&s, 0, Utc::now()) {
                    h.record(sample);
                }
            }
        });
        Traffic { sim, history, task }
    }
}

/// Every canary weight the routing object went through, with when it was seen.
type WeightLog = Arc<Mutex<Vec<(DateTime<Utc>, Weights)>>>;

/// Reads the split through the Canary's own router every half poll and logs each change:
/// the weights the data plane holds, whichever data plane it is.
fn record_weights(
    client: &kube::Client,
    routers: Routers,
) -> (WeightLog, tokio::task::JoinHandle<()>) {
    let log: WeightLog = Arc::default();
    let api: Api<Canary> = Api::namespaced(client.clone(), NAMESPACE);
    let out = log.clone();
    let task = tokio::spawn(async move {
        loop {
            // Until Serin has set up the routing, there is no split to read.
            if let Ok(Some(canary)) = api.get_opt(TARGET).await
                && let Ok(router) = routers.for_canary(&canary)
                && let Ok(w) = router.weights(&canary).await
                && let Ok(mut log) = out.lock()
                && log.last().map(|(_, last)| *last) != Some(w)
            {
                log.push((Utc::now(), w));
            }
            tokio::time::sleep(POLL / 2).await;
        }
    });
    (log, task)
}

/// The running demo.
struct Demo {
    client: kube::Client,
    routers: Routers,
    router: RouterChoice,
    source: Arc<InProcessSource>,
    interval: Duration,
    weights: WeightLog,
    started: Instant,
}

impl Demo {
    async fn canary(&self) -> anyhow::Result<Canary> {
        let api: Api<Canary> = Api::namespaced(self.client.clone(), NAMESPACE);
        api.get(TARGET).await.context("reading the Canary")
    }

    fn current_weights(&self) -> Option<Weights> {
        self.weights.lock().ok()?.last().map(|(_, w)| *w)
    }

    async fn events(&self) -> Vec<EventLine> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), NAMESPACE);
        let params = ListParams::default().fields("involvedObject.kind=Canary");
        match api.list(&params).await {
            Ok(list) => view::event_lines(list.items, TARGET),
            Err(_) => Vec::new(),
        }
    }

    /// Polls the Canary and its Events into the view once; returns the Canary.
    async fn observe(&self, view: &mut View, traffic: Option<&Traffic>) -> anyhow::Result<Canary> {
        let canary = self.canary().await?;
        let mut observed = Observed::of_canary(&canary, self.current_weights());
        observed.traffic = traffic.and_then(|t| t.history.latest()).map(|s| s.served());
        let events = self.events().await;
        view.update(observed, events);
        Ok(canary)
    }

    async fn set_image(&self, image: &str) -> anyhow::Result<()> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": TARGET, "image": image}]}}}});
        api.patch(TARGET, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .with_context(|| format!("setting the image of Deployment {TARGET}"))?;
        Ok(())
    }

    fn start_traffic(&self, under_load: Option<(u8, Behaviour)>) -> Traffic {
        Traffic::start(
            &self.client,
            &self.routers,
            self.router,
            &self.source,
            under_load,
            self.interval * 4,
        )
    }

    /// Waits until the Canary is initialised (phase Waiting).
    async fn initialise(&self, view: &mut View) -> anyhow::Result<Traffic> {
        let traffic = self.start_traffic(None);
        let deadline = Instant::now() + Duration::from_secs(30) + self.interval;
        loop {
            let c = self.observe(view, Some(&traffic)).await?;
            if c.status.as_ref().is_some_and(|s| s.phase == Phase::Waiting) {
                return Ok(traffic);
            }
            if Instant::now() > deadline {
                bail!(
                    "the Canary was not initialised within {:?}: {}",
                    deadline.duration_since(self.started),
                    serde_json::to_string(&c.status).unwrap_or_default()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs one scenario: starts its traffic, changes the image, follows the rollout to its end.
    async fn run(&self, scenario: Scenario, view: &mut View) -> anyhow::Result<Report> {
        let traffic = self.start_traffic(scenario.under_load());
        let started = Utc::now();
        let clock = Instant::now();
        let log_from = self.weights.lock().map(|l| l.len()).unwrap_or(0);
        self.set_image(scenario.image()).await?;
        view.note(&format!(
            "deploy: Deployment {TARGET} image → {}",
            scenario.image()
        ));
        let deadline = clock + self.interval * 8 + Duration::from_secs(30);
        let (canary, timed_out) = loop {
            let c = self.observe(view, Some(&traffic)).await?;
            let status = c.status.clone().unwrap_or_default();
            let finished = status
                .history
                .first()
                .is_some_and(|h| h.finished_at >= started);
            let settled = matches!(status.phase, Phase::Succeeded | Phase::Failed)
                && self.current_weights() == Some(Weights::STABLE);
            if finished && settled {
                break (c, false);
            }
            if Instant::now() > deadline {
                break (c, true);
            }
            tokio::time::sleep(POLL).await;
        };
        if !timed_out {
            self.await_result_event(&canary, started, view, &traffic)
                .await?;
        }
        let status = canary.status.clone().unwrap_or_default();
        let entry = status.history.first().filter(|h| h.finished_at >= started);
        let log: Vec<(DateTime<Utc>, Weights)> = self
            .weights
            .lock()
            .map(|l| l.iter().skip(log_from.saturating_sub(1)).copied().collect())
            .unwrap_or_default();
        // The canary starts failing when the VirtualRouter gives it the weight it fails at.
        let failing_from = scenario.under_load().and_then(|(min_weight, _)| {
            log.iter()
                .find(|(_, w)| w.canary() >= min_weight)
                .map(|(at, _)| *at)
        });
        let weight_zero = failing_from.and_then(|from| {
            log.iter()
                .find(|(at, w)| *at >= from && w.canary() == 0)
                .map(|(at, _)| *at)
        });
        Ok(Report {
            scenario,
            phase: status.phase,
            result: entry.map(|h| h.result),
            reached: entry.map(|h| h.reached_weight),
            took: clock.elapsed(),
            canary_weights: log.iter().map(|(_, w)| w.canary()).collect(),
            failing_from,
            weight_zero,
            traffic: traffic.sim.totals(0).map(|(primary, canary)| PerArm {
                primary: source::served(primary),
                canary: source::served(canary),
            }),
            timed_out,
        })
    }
}

impl Demo {
    /// Serin publishes a rollout's Events just after it records the status: shows the
    /// Event that ends the rollout (its history entry's reason) before the scenario ends.
    async fn await_result_event(
        &self,
        canary: &Canary,
        started: DateTime<Utc>,
        view: &mut View,
        traffic: &Traffic,
    ) -> anyhow::Result<()> {
        let Some(reason) = canary
            .status
            .as_ref()
            .and_then(|s| s.history.first())
            .filter(|h| h.finished_at >= started)
            .map(|h| match h.result {
                crate::api::RolloutResult::Promoted => crate::rollout::reasons::PROMOTED,
                _ => crate::rollout::reasons::ROLLED_BACK,
            })
        else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.events().await.iter().any(|e| e.reason == reason) {
                self.observe(view, Some(traffic)).await?;
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }
    /// Initialises the Canary, then runs each scenario in turn.
    async fn play(&self, scenarios: &[Scenario], view: &mut View) -> anyhow::Result<Vec<Report>> {
        view.title(&match self.router {
            RouterChoice::Appmesh => {
                "initialising: Serin creates colorteller-primary and the App Mesh routing".into()
            }
            RouterChoice::GatewayApi => format!(
                "initialising: Serin creates colorteller-primary and its Services; it writes the weights of the {}",
                self.router.routing_object()
            ),
        });
        self.initialise(view).await?;
        view.note("initialised: all traffic on colorteller-primary (colorteller:v1)");
        let mut reports = Vec::new();
        for (i, s) in scenarios.iter().enumerate() {
            view.title(&format!(
                "scenario {}/{}: {} — {}",
                i + 1,
                scenarios.len(),
                s.name(),
                s.description()
            ));
            let report = self.run(*s, view).await?;
            let verdict = if report.ok() {
                "as expected"
            } else {
                "NOT as expected"
            };
            view.note(&format!("{}: {verdict}", s.name()));
            reports.push(report);
        }
        Ok(reports)
    }
}

fn summary(reports: &[Report], total: Duration, router: RouterChoice) -> String {
    let mut out = format!("\nSummary ({:.1}s)\n", total.as_secs_f64());
    for r in reports {
        let (phase, result) = r.scenario.expected();
        let weights: Vec<String> = r.canary_weights.iter().map(|w| format!("{w}%")).collect();
        let actual = match (r.result, r.timed_out) {
            (_, true) => format!("timed out in phase {}", r.phase.as_str()),
            (Some(res), _) => format!(
                "{}, {} (reached {}%)",
                r.phase.as_str(),
                res.as_str(),
                r.reached.unwrap_or(0)
            ),
            (None, _) => format!("{}, no rollout recorded", r.phase.as_str()),
        };
        out.push_str(&format!(
            "  {} {:<8} {}: expected {}, {}; got {} in {:.1}s\n",
            if r.ok() { "✓" } else { "✗" },
            r.scenario.name(),
            r.scenario.image(),
            phase.as_str(),
            result.as_str(),
            actual,
            r.took.as_secs_f64(),
        ));
        out.push_str(&format!(
            "             canary weight on the {}: {}\n",
            router.routing_object(),
            weights.join(" → ")
        ));
        if let Some(t) = &r.traffic {
            out.push_str(&format!(
                "             traffic: primary {} requests / {} errors, canary {} requests / {} errors\n",
                t.primary.requests, t.primary.errors, t.canary.requests, t.canary.errors
            ));
        }
        if r.scenario == Scenario::Rollback {
            match (r.failing_from, r.weight_zero) {
                (Some(failing), Some(zero)) => out.push_str(&format!(
                    "             canary failing from {} → canary weight 0 at {}: {:.1}s\n",
                    failing.format("%H:%M:%S%.3f"),
                    zero.format("%H:%M:%S%.3f"),
                    (zero - failing).num_milliseconds() as f64 / 1000.0
                )),
                _ => out.push_str("             the failing canary never went back to weight 0\n"),
            }
        }
    }
    out
}

/// Runs `serin demo`; an error when the demo did not behave as expected.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !(args.speed.is_finite() && args.speed > 0.0) {
        bail!("--speed must be a positive number, got {}", args.speed);
    }
    let interval = interval_for(args.speed);
    let started = Instant::now();
    let server = start_sandbox(&args, interval).await?;
    let client = server.client()?;
    let operator = Operator::start(&client);
    create(&client, &canary_manifest_for(interval, args.router)).await?;
    let demo = Demo {
        client,
        routers: operator.routers.clone(),
        router: args.router,
        source: operator.source.clone(),
        interval,
        weights: operator.weights.clone(),
        started,
    };
    let mut view = View::new(std::io::stdout().is_terminal());
    let scenarios = scenarios(args.scenario);
    let outcome = tokio::select! {
        r = demo.play(&scenarios, &mut view) => r,
        () = crate::controller::cli::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    view.finish();
    let result = outcome.and_then(|reports| conclude(&reports, started.elapsed(), args.router));
    if args.hold {
        println!("holding: the API server and Serin keep running; Ctrl-C to stop");
        crate::controller::cli::shutdown_signal().await;
    }
    operator.stop().await;
    server.shutdown().await;
    result
}

/// The scenarios `choice` runs, in order.
fn scenarios(choice: ScenarioChoice) -> Vec<Scenario> {
    match choice {
        ScenarioChoice::Promote => vec![Scenario::Promote],
        ScenarioChoice::Rollback => vec![Scenario::Rollback],
        ScenarioChoice::Both => vec![Scenario::Promote, Scenario::Rollback],
    }
}

/// Starts the in-memory API server with the demo's kinds and the colorapp, and says how to
/// watch it.
async fn start_sandbox(args: &DemoArgs, interval: Duration) -> anyhow::Result<ApiServer> {
    let server = ApiServer::start(Options::default()).await?;
    kinds::register(&server)?;
    println!(
        "Serin demo: an in-memory Kubernetes API server at {}",
        server.url()
    );
    match &args.kubeconfig_out {
        Some(path) => {
            server.write_kubeconfig(path)?;
            println!(
                "watch it with:  kubectl --kubeconfig {} get canaries -A -w",
                path.display()
            );
        }
        None => println!("(add --kubeconfig-out FILE to watch it with kubectl)"),
    }
    if args.log_file.is_none() && std::io::stdout().is_terminal() {
        println!(
            "Serin's warnings go to {}",
            std::env::temp_dir().join("serin-demo.log").display()
        );
    }
    println!(
        "analysis interval {} (speed {}), {} requests/s from colorgateway to colorteller",
        duration_text(interval),
        args.speed,
        RPS
    );
    let client = server.client()?;
    for obj in colorapp(args.router) {
        create(&client, &obj).await?;
    }
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces.get(NAMESPACE).await?;
    Ok(server)
}

/// The real controller with the App Mesh and Gateway API routers and the in-process metric source, plus the
/// Deployment simulator and the weight recorder.
struct Operator {
    routers: Routers,
    source: Arc<InProcessSource>,
    weights: WeightLog,
    stop: tokio::sync::watch::Sender<bool>,
    controller: tokio::task::JoinHandle<()>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Operator {
    fn start(client: &kube::Client) -> Self {
        let routers = Routers::new(vec![
            Arc::new(AppMeshKubeRouter::new(client.clone())),
            Arc::new(HttpRouteRouter::new(client.clone())),
        ]);
        let source = Arc::new(InProcessSource::new());
        let (weights, weights_task) = record_weights(client, routers.clone());
        let tasks = [
            weights_task,
            kube_sandbox::workloads::simulate_deployments(client.clone(), READY_DELAY),
        ];
        let ctx = Arc::new(Context::new(
            client.clone(),
            routers.clone(),
            source.clone(),
            Arc::new(Metrics::new(|_| {})),
            Some("serin-demo".into()),
        ));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut stopped = stop_rx;
        let controller = tokio::spawn(crate::controller::run(
            ctx,
            ControllerOptions {
                namespace: None,
                concurrency: 4,
                shard: crate::controller::shard::Shard::ALL,
            },
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        Operator {
            routers,
            source,
            weights,
            stop,
            controller,
            tasks,
        }
    }

    /// Stops the controller (waiting briefly for it) and the helper tasks.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.controller).await;
        self.tasks.iter_mut().for_each(|t| t.abort());
    }
}

/// Prints the summary; an error naming the scenarios that did not end as expected.
fn conclude(reports: &[Report], took: Duration, router: RouterChoice) -> anyhow::Result<()> {
    println!("{}", summary(reports, took, router));
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.scenario.name())
        .collect();
    if failed.is_empty() {
        println!("The demo behaved as expected.");
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "the demo did not behave as expected: {}",
            failed.join(", ")
        ))
    }
}
