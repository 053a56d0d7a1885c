//! `serin bench scale`: the real operator (`serin run`, as its own process) managing N
//! Canaries on the embedded API server, with a real Prometheus answering every check, next
//! to a background of objects no Canary uses; it prints, as Markdown, what the operator
//! costs (memory, CPU, API and metric requests) and how fast it moves traffic.
//!
//! Per N, against a fresh API server and operator:
//! 1. the operator starts on an empty cluster (RSS "empty"), then the background is created
//!    (10,000 ConfigMaps and 5,000 Secrets of about 2 KiB, 5,000 Deployments with Services at
//!    `--background 1`) and the operator's RSS is read again once it settled;
//! 2. N Canaries are created, 100 per namespace, half App Mesh workload mode (a Deployment
//!    each, rolled out by a new image once the Canary is initialized) and half Gloo traffic
//!    mode (an UpstreamGroup each, rolled out from creation); every Canary has one
//!    threshold metric, a PromQL query the Prometheus answers with 0;
//! 3. `--rollback-share` of them are aborted (`serin.dev/command: abort/...`) once traffic
//!    reached them, so some rollouts are rolled back and the rest promoted;
//! 4. when every rollout finished, the operator idles for `--steady` seconds.
//!
//! The embedded server counts requests by client, so the operator's own requests are told
//! from the benchmark's; Serin's own `/metrics` gives reconciles, checks and the time from a
//! decision to the router's acknowledgement of the weight write.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube_sandbox::{ApiServer, Options};
use serde_json::{Value, json};

use crate::api::{Canary, Phase};

/// Canaries per namespace.
const PER_NAMESPACE: usize = 100;
/// Requests the benchmark keeps in flight while it creates or patches objects.
const IN_FLIGHT: usize = 32;
/// The product name in the benchmark's own User-Agent header: every other request the
/// server counts is the operator's (an operator built before Serin named itself sends none).
const BENCH_CLIENT: &str = "serin-bench";

/// Arguments of `serin bench scale`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct ScaleBenchArgs {
    /// Canary counts, run one after another (comma-separated), each against a fresh API
    /// server and operator.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub canaries: Vec<usize>,
    /// Every Canary's analysis interval, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub interval: u64,
    /// Every Canary's `analysis.checksPerStep`: more checks per step keep the Canaries in
    /// analysis longer, so that the figures are mostly those of steady checks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub checks_per_step: u32,
    /// What every Canary's metric is: `preset` (the data plane's error-rate preset, judged
    /// by threshold at each check, over Envoy counters the benchmark serves to Prometheus;
    /// these checks are batched across Canaries) or `query` (a user query that reads no
    /// series, `sum(rate(...)) or vector(0)`; never batched).
    #[arg(long, value_enum, default_value_t = BenchMetric::Preset)]
    pub metric: BenchMetric,
    /// Share of the full background (10,000 ConfigMaps, 5,000 Secrets, 5,000 Deployments
    /// with Services) to create next to the Canaries; 0 for none.
    #[arg(long, default_value_t = 1.0)]
    pub background: f64,
    /// Share of the Canaries aborted once traffic reached their canary (rolled back).
    #[arg(long, default_value_t = 0.1)]
    pub rollback_share: f64,
    /// Seconds the operator is measured idle after every rollout finished.
    #[arg(long, default_value_t = 30)]
    pub steady: u64,
    /// The operator binary to measure (default: this one), run as `BIN run`.
    #[arg(long, value_name = "BIN")]
    pub operator: Option<PathBuf>,
    /// An extra argument for the operator's `run` (repeat for more), for example
    /// `--operator-arg=--kube-qps=0` to lift the client-side rate limit; by default the
    /// operator runs with the defaults it ships with.
    #[arg(long = "operator-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub operator_args: Vec<String>,
    /// The Prometheus binary that answers the checks.
    #[arg(long, default_value = "prometheus", value_name = "BIN")]
    pub prometheus: PathBuf,
    /// Run against the cluster of this kubeconfig (a real kube-apiserver, say from
    /// `scripts/kube-up`) instead of the embedded server: the CRDs are installed when
    /// missing, its controllers make the Deployments ready, and the benchmark's namespaces
    /// are deleted after each N.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// With --kubeconfig: the API server's audit log (JSON lines), from which the operator's
    /// requests (User-Agent `serin/...`) are counted (without it, they are not).
    #[arg(long, value_name = "FILE", requires = "kubeconfig")]
    pub audit_log: Option<PathBuf>,
    /// Fail unless every rollout finished as driven: the aborted ones rolled back, all
    /// others promoted (for a smoke test; no figure is asserted).
    #[arg(long)]
    pub strict: bool,
}

/// What the benchmark's Canaries are judged on (see [`ScaleBenchArgs::metric`]).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMetric {
    /// The data plane's error-rate preset, judged by threshold.
    Preset,
    /// A user query over no series.
    Query,
}

impl ScaleBenchArgs {
    /// The command line that reproduces the report.
    pub fn command(&self) -> String {
        let counts: Vec<String> = self.canaries.iter().map(|n| n.to_string()).collect();
        format!(
            "serin bench scale --canaries {} --interval {}{}{} --background {} --rollback-share {} --steady {}{}",
            counts.join(","),
            self.interval,
            if self.checks_per_step == 1 {
                String::new()
            } else {
                format!(" --checks-per-step {}", self.checks_per_step)
            },
            match self.metric {
                BenchMetric::Preset => "",
                BenchMetric::Query => " --metric query",
            },
            self.background,
            self.rollback_share,
            self.steady,
            if self.strict { " --strict" } else { "" }
        ) + &self
            .operator_args
            .iter()
            .map(|a| format!(" --operator-arg={a}"))
            .collect::<String>()
            + &match (&self.kubeconfig, &self.audit_log) {
                (Some(k), Some(a)) => {
                    format!(" --kubeconfig {} --audit-log {}", k.display(), a.display())
                }
                (Some(k), None) => format!(" --kubeconfig {}", k.display()),
                _ => String::new(),
            }
    }
}

/// Runs the benchmark for every N and returns the Markdown report.
pub async fn run(args: &ScaleBenchArgs, progress: &mut dyn FnMut(&str)) -> anyhow::Result<String> {
    if args.canaries.is_empty() {
        bail!("--canaries needs at least one count, for example --canaries 100");
    }
    if !(0.0..=1.0).contains(&args.rollback_share) || args.background < 0.0 {
        bail!("--rollback-share must be between 0 and 1, and --background at least 0");
    }
    let operator = match &args.operator {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding this binary to run as the operator")?,
    };
    let dir = TempDir::new()?;
    let envoy = Envoy::start().await?;
    // At least three scrapes per analysis interval, so that every window has data.
    let scrape = (args.interval / 3).clamp(1, 15);
    let prometheus = Prometheus::start(
        &args.prometheus,
        &dir.0.join("prometheus"),
        &envoy.address,
        scrape,
    )
    .await?;
    let mut results = Vec::new();
    for &n in &args.canaries {
        progress(&format!("N = {n}: starting"));
        let r = run_one(
            args,
            n,
            &operator,
            &prometheus,
            &envoy,
            &dir.0.join(format!("n{n}")),
            progress,
        )
        .await
        .with_context(|| format!("at N = {n}"))?;
        progress(&format!(
            "N = {n}: {} promoted, {} rolled back, {} unfinished",
            r.promoted, r.rolled_back, r.unfinished
        ));
        let aborted = (0..n).filter(|i| aborts(*i, args.rollback_share)).count();
        if args.strict && (r.unfinished > 0 || r.rolled_back != aborted) {
            bail!(
                "at N = {n}: {} rollouts unfinished, {} rolled back where {aborted} were aborted (operator log: kept in {})",
                r.unfinished,
                r.rolled_back,
                dir.keep().display()
            );
        }
        results.push(r);
    }
    Ok(report(args, &operator, &results))
}

/// What one N measured.
#[derive(Debug, Default)]
struct Result1 {
    n: usize,
    background_objects: usize,
    rss_empty_kib: u64,
    rss_background_kib: u64,
    rss_peak_kib: u64,
    rss_steady_kib: u64,
    /// RSS once a minute during the rollouts: (seconds since the first creation, KiB).
    rss_minutes: Vec<(f64, u64)>,
    rollout_seconds: f64,
    cpu_rollout_seconds: f64,
    cpu_steady_seconds: f64,
    steady_seconds: f64,
    checks: f64,
    /// The operator's CPU seconds, checks and wall seconds while every Canary was in
    /// analysis: from the last Canary's first canary weight to the first promotion.
    mid_rollout: Option<(f64, f64, f64)>,
    reconciles: f64,
    /// The operator's requests during the rollouts, by verb and resource.
    requests: BTreeMap<(String, String), u64>,
    /// The operator's requests while idle, all verbs.
    steady_requests: u64,
    prometheus_queries: f64,
    /// Requests the operator's client-side rate limit held back, and the seconds they
    /// waited in all.
    throttled: f64,
    throttled_seconds: f64,
    init_ms: Vec<f64>,
    first_weight_traffic_ms: Vec<f64>,
    first_weight_workload_ms: Vec<f64>,
    weight_write_buckets: Vec<(f64, f64)>,
    promoted: usize,
    rolled_back: usize,
    unfinished: usize,
}

/// Where the benchmark runs: a fresh embedded API server, or a real cluster.
enum Cluster {
    Embedded {
        server: ApiServer,
        /// Makes Deployments ready, as the real controllers would.
        deployments: tokio::task::JoinHandle<()>,
    },
    Real {
        audit: Option<Mutex<AuditCounts>>,
    },
}

impl Cluster {
    /// The server's request counts so far (empty on a real cluster without an audit log).
    fn request_counts(&self) -> BTreeMap<kube_sandbox::RequestKey, u64> {
        match self {
            Cluster::Embedded { server, .. } => server.request_counts(),
            Cluster::Real { audit: Some(a) } => a
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read()
                .unwrap_or_default(),
            Cluster::Real { audit: None } => BTreeMap::new(),
        }
    }
}

/// Request counts from an audit log, read on from where the last reading stopped.
struct AuditCounts {
    path: PathBuf,
    offset: u64,
    counts: BTreeMap<kube_sandbox::RequestKey, u64>,
}

impl AuditCounts {
    fn read(&mut self) -> anyhow::Result<BTreeMap<kube_sandbox::RequestKey, u64>> {
        use std::io::{BufRead as _, Seek as _};
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening the audit log {}", self.path.display()))?;
        file.seek(std::io::SeekFrom::Start(self.offset))?;
        let mut reader = std::io::BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                // A line still being written is read next time.
                break;
            }
            self.offset += read as u64;
            let Ok(e) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let verb = e["verb"].as_str().unwrap_or_default();
            // One event per request: a watch when it starts, anything else when it ends.
            let counted = match e["stage"].as_str() {
                Some("ResponseStarted") => verb == "watch",
                Some("ResponseComplete") => verb != "watch",
                _ => false,
            };
            if !counted {
                continue;
            }
            let client = e["userAgent"]
                .as_str()
                .and_then(|u| u.split('/').next())
                .filter(|u| !u.is_empty())
                .unwrap_or("unknown");
            // A real cluster's own controllers send requests too: count only the operator's
            // (a Serin that names itself in User-Agent).
            if client != "serin" {
                continue;
            }
            let resource = match (
                e["objectRef"]["resource"].as_str(),
                e["objectRef"]["subresource"].as_str(),
            ) {
                (Some(r), Some(sub)) => format!("{r}/{sub}"),
                (Some(r), None) => r.to_string(),
                (None, _) => "other".to_string(),
            };
            *self
                .counts
                .entry(kube_sandbox::RequestKey {
                    client: client.to_string(),
                    verb: verb.to_string(),
                    resource,
                })
                .or_default() += 1;
        }
        Ok(self.counts.clone())
    }
}

/// Installs the CRDs the benchmark's objects need where they are missing, and waits until
/// they are served.
async fn install_crds(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut crds: Vec<CustomResourceDefinition> = crate::demo::kinds::crds();
    crds.push(serde_norway::from_str(&crate::api::crd_yaml()?)?);
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        if api.get_opt(&name).await?.is_none() {
            api.create(&PostParams::default(), crd)
                .await
                .with_context(|| format!("installing CRD {name}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let established = api.get(&name).await?.status.is_some_and(|s| {
                s.conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                break;
            }
            if Instant::now() > deadline {
                bail!("CRD {name} was not established within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Names of one N's objects, unique per run, so runs on a real cluster do not collide with
/// namespaces of an earlier run that are still terminating.
#[derive(Clone, Debug)]
struct Layout {
    tag: String,
}

impl Layout {
    fn new(n: usize) -> Self {
        Layout {
            tag: format!("{}n{n}", std::process::id() % 100_000),
        }
    }

    fn namespace(&self, i: usize) -> String {
        format!("bench{}-{}", self.tag, i / PER_NAMESPACE)
    }

    fn background_namespace(&self, k: usize) -> String {
        format!("bg{}-{}", self.tag, k / 1000)
    }

    fn mesh(&self) -> String {
        format!("bench{}", self.tag)
    }

    fn is_ours(&self, namespace: &str) -> bool {
        namespace.starts_with(&format!("bench{}-", self.tag))
            || namespace.starts_with(&format!("bg{}-", self.tag))
    }
}

/// Deletes what one N created on a real cluster (without waiting for the namespaces to go).
async fn clean_up(client: &kube::Client, layout: &Layout) -> anyhow::Result<()> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for ns in namespaces.list(&Default::default()).await? {
        let name = ns.metadata.name.unwrap_or_default();
        if layout.is_ours(&name) {
            let _ = namespaces.delete(&name, &Default::default()).await;
        }
    }
    let mesh = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("appmesh.k8s.aws", "v1beta2", "Mesh"),
        "meshes",
    );
    let meshes: Api<DynamicObject> = Api::all_with(client.clone(), &mesh);
    let _ = meshes.delete(&layout.mesh(), &Default::default()).await;
    Ok(())
}

async fn run_one(
    args: &ScaleBenchArgs,
    n: usize,
    operator_bin: &Path,
    prometheus: &Prometheus,
    envoy: &Envoy,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Result1> {
    std::fs::create_dir_all(dir)?;
    let layout = Layout::new(n);
    // The data plane's counters exist before the Canaries do, as traffic does.
    envoy.serve((0..n).flat_map(|i| clusters(&layout, i)).collect());
    let kubeconfig = dir.join("kubeconfig");
    let (cluster, client) = match &args.kubeconfig {
        None => {
            let server = ApiServer::start(Options {
                history_limit: 50_000,
                ..Options::default()
            })
            .await?;
            crate::demo::kinds::register(&server)?;
            server.write_kubeconfig(&kubeconfig)?;
            let client = bench_client(&server.kubeconfig_yaml()).await?;
            let deployments = kube_sandbox::workloads::simulate_deployments(
                client.clone(),
                Duration::from_millis(300),
            );
            (
                Cluster::Embedded {
                    server,
                    deployments,
                },
                client,
            )
        }
        Some(path) => {
            std::fs::copy(path, &kubeconfig)
                .with_context(|| format!("reading {}", path.display()))?;
            let client = bench_client(&std::fs::read_to_string(path)?).await?;
            install_crds(&client).await?;
            let audit = match &args.audit_log {
                Some(p) => {
                    let mut a = AuditCounts {
                        path: p.clone(),
                        offset: 0,
                        counts: BTreeMap::new(),
                    };
                    a.read()?;
                    Some(Mutex::new(a))
                }
                None => None,
            };
            (Cluster::Real { audit }, client)
        }
    };
    let operator = Operator::start(operator_bin, &kubeconfig, dir, &args.operator_args).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut r = Result1 {
        n,
        rss_empty_kib: operator.memory()?.0,
        ..Result1::default()
    };

    let creator = Creator::new(client.clone());
    let background = background(&layout, args.background);
    r.background_objects = background.len();
    if !background.is_empty() {
        progress(&format!(
            "N = {n}: creating {} background objects",
            background.len()
        ));
        creator.create_all(background).await?;
        // The operator's watches receive and cache what was created; give them time.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    r.rss_background_kib = operator.memory()?.0;

    let tracks: Tracks = Arc::default();
    let watch = tokio::spawn(track_canaries(client.clone(), tracks.clone()));
    progress(&format!("N = {n}: creating {n} Canaries"));
    let cpu_start = operator.cpu_seconds()?;
    let metrics_start = scrape(&operator.metrics_url).await?;
    let prom_start = scrape(&prometheus.metrics_url()).await?;
    let requests_start = cluster.request_counts();
    let started = Instant::now();
    create_canaries(&creator, &layout, n, &prometheus.url, args, &tracks).await?;
    let deadline = started
        + Duration::from_secs(args.interval * (3 * u64::from(args.checks_per_step) + 9) + 120)
        + Duration::from_millis(30 * n as u64);
    let mut last_report = Instant::now();
    let mut last_rss = Instant::now();
    let mut mid_start: Option<(f64, Scrape, Instant)> = None;
    loop {
        if last_rss.elapsed() >= Duration::from_secs(60) {
            r.rss_minutes
                .push((started.elapsed().as_secs_f64(), operator.memory()?.0));
            last_rss = Instant::now();
        }
        let (to_trigger, to_abort, finished, all_weighted, promoted_any) = {
            let t = tracks.lock().unwrap_or_else(|e| e.into_inner());
            let all_weighted = t.len() == n && t.values().all(|x| x.first_weight.is_some());
            let promoted_any = t.values().any(|x| x.done == Some(Phase::Succeeded));
            let to_trigger: Vec<usize> = t
                .iter()
                .filter(|(_, x)| x.workload && x.initialized.is_some() && x.triggered.is_none())
                .map(|(i, _)| *i)
                .collect();
            let to_abort: Vec<usize> = t
                .iter()
                .filter(|(i, x)| {
                    x.first_weight.is_some() && !x.aborted && aborts(**i, args.rollback_share)
                })
                .map(|(i, _)| *i)
                .collect();
            (
                to_trigger,
                to_abort,
                t.values().filter(|x| x.done.is_some()).count(),
                all_weighted,
                promoted_any,
            )
        };
        // The window of steady checks: every Canary in analysis, none promoted yet.
        if mid_start.is_none() && all_weighted && !promoted_any {
            mid_start = Some((
                operator.cpu_seconds()?,
                scrape(&operator.metrics_url).await?,
                Instant::now(),
            ));
        }
        if r.mid_rollout.is_none()
            && promoted_any
            && let Some((cpu, metrics, at)) = &mid_start
        {
            let now = scrape(&operator.metrics_url).await?;
            r.mid_rollout = Some((
                operator.cpu_seconds()? - cpu,
                delta(metrics, &now, "serin_metric_check_total", |_| true),
                at.elapsed().as_secs_f64(),
            ));
        }
        trigger(&creator.client, &layout, &to_trigger, &tracks).await?;
        abort(&creator.client, &layout, &to_abort, &tracks).await?;
        if finished == n {
            break;
        }
        if Instant::now() > deadline {
            progress(&format!(
                "N = {n}: {finished} of {n} rollouts finished by the deadline"
            ));
            break;
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            progress(&format!("N = {n}: {finished} of {n} rollouts finished"));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    r.rollout_seconds = started.elapsed().as_secs_f64();
    r.cpu_rollout_seconds = operator.cpu_seconds()? - cpu_start;
    r.rss_peak_kib = operator.memory()?.1;
    let metrics_end = scrape(&operator.metrics_url).await?;
    let prom_end = scrape(&prometheus.metrics_url()).await?;
    let requests_end = cluster.request_counts();
    r.checks = delta(
        &metrics_start,
        &metrics_end,
        "serin_metric_check_total",
        |_| true,
    );
    r.reconciles = delta(
        &metrics_start,
        &metrics_end,
        "serin_reconcile_duration_seconds_count",
        |_| true,
    );
    r.prometheus_queries = delta(
        &prom_start,
        &prom_end,
        "prometheus_http_requests_total",
        |l| {
            l.contains("handler=\"/api/v1/query\"") || l.contains("handler=\"/api/v1/query_range\"")
        },
    );
    r.throttled = delta(
        &metrics_start,
        &metrics_end,
        "serin_kube_requests_throttled_total",
        |_| true,
    );
    r.throttled_seconds = delta(
        &metrics_start,
        &metrics_end,
        "serin_kube_throttled_seconds_total",
        |_| true,
    );
    r.weight_write_buckets = buckets(&metrics_start, &metrics_end, "serin_weight_write_seconds");
    r.requests = operator_requests(&requests_start, &requests_end);

    // Idle: every rollout has finished.
    let cpu_idle = operator.cpu_seconds()?;
    let idle_start = Instant::now();
    let requests_idle = cluster.request_counts();
    tokio::time::sleep(Duration::from_secs(args.steady)).await;
    r.steady_seconds = idle_start.elapsed().as_secs_f64();
    r.cpu_steady_seconds = operator.cpu_seconds()? - cpu_idle;
    r.rss_steady_kib = operator.memory()?.0;
    r.steady_requests = operator_requests(&requests_idle, &cluster.request_counts())
        .values()
        .sum();

    watch.abort();
    let t: Vec<Track> = tracks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for x in &t {
        let Some(created) = x.created else { continue };
        if let Some(i) = x.initialized {
            r.init_ms.push(ms(i - created));
        }
        match (x.workload, x.triggered, x.first_weight) {
            (false, _, Some(w)) => r.first_weight_traffic_ms.push(ms(w - created)),
            (true, Some(tr), Some(w)) if w > tr => r.first_weight_workload_ms.push(ms(w - tr)),
            _ => {}
        }
        match x.done {
            Some(Phase::Succeeded) => r.promoted += 1,
            Some(_) => r.rolled_back += 1,
            None => r.unfinished += 1,
        }
    }
    r.unfinished += n.saturating_sub(t.len());
    drop(operator);
    match cluster {
        Cluster::Embedded {
            server,
            deployments,
        } => {
            deployments.abort();
            server.shutdown().await;
        }
        Cluster::Real { .. } => clean_up(&client, &layout).await?,
    }
    Ok(r)
}

/// A client of the cluster of `kubeconfig` whose requests say they are the benchmark's.
async fn bench_client(kubeconfig: &str) -> anyhow::Result<kube::Client> {
    let kubeconfig: kube::config::Kubeconfig = serde_norway::from_str(kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(concat!("serin-bench/", env!("CARGO_PKG_VERSION"))),
    ));
    Ok(kube::Client::try_from(config)?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Whether Canary `i` is one of the aborted share (spread evenly over the indices).
fn aborts(i: usize, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

/// What the benchmark saw of one Canary (by index), from its watch.
#[derive(Debug, Default, Clone)]
struct Track {
    workload: bool,
    created: Option<Instant>,
    initialized: Option<Instant>,
    triggered: Option<Instant>,
    first_weight: Option<Instant>,
    aborted: bool,
    done: Option<Phase>,
}

type Tracks = Arc<Mutex<HashMap<usize, Track>>>;

/// Follows every Canary through one watch and stamps when each reached a stage.
async fn track_canaries(client: kube::Client, tracks: Tracks) {
    let api: Api<Canary> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(c) = event else { continue };
        let Some(i) = c
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix("app-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let status = c.status.unwrap_or_default();
        let now = Instant::now();
        let mut t = tracks.lock().unwrap_or_else(|e| e.into_inner());
        let x = t.entry(i).or_default();
        if status.phase != Phase::Initializing {
            x.initialized.get_or_insert(now);
        }
        if status.canary_weight > 0 {
            x.first_weight.get_or_insert(now);
        }
        if x.first_weight.is_some() && matches!(status.phase, Phase::Succeeded | Phase::Failed) {
            x.done.get_or_insert(status.phase);
        }
    }
}

fn name_of(i: usize) -> String {
    format!("app-{i}")
}

/// Even Canaries are App Mesh workload mode, odd ones Gloo traffic mode.
fn is_workload(i: usize) -> bool {
    i.is_multiple_of(2)
}

const PORT: u16 = 8080;

fn deployment(ns: &str, name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image,
                                         "ports": [{"containerPort": PORT}]}]}
            }
        }
    })
}

fn canary_objects(
    layout: &Layout,
    i: usize,
    prometheus: &str,
    interval: u64,
    checks_per_step: u32,
    metric: BenchMetric,
) -> Vec<Value> {
    let (ns, name) = (layout.namespace(i), name_of(i));
    let provider = json!({"prometheus": {"address": prometheus}});
    let metric = match metric {
        BenchMetric::Preset => json!({
            "name": "errors",
            "provider": provider,
            "preset": if is_workload(i) { "appmesh-error-rate" } else { "gloo-error-rate" },
            "judge": "Threshold",
            "max": 1
        }),
        BenchMetric::Query => json!({
            "name": "errors",
            "provider": provider,
            "query": "sum(rate(bench_errors_total{app=\"{{ canary }}\"}[{{ interval }}])) or vector(0)",
            "max": 1
        }),
    };
    let analysis = json!({
        "interval": format!("{interval}s"), "checksPerStep": checks_per_step, "failureThreshold": 2,
        "metrics": [metric]
    });
    let canary = |spec: Value| {
        json!({"apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    };
    if is_workload(i) {
        vec![
            deployment(&ns, &name, "app:1"),
            canary(json!({
                "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "service": {"port": PORT},
                "router": {"appMesh": {"mesh": layout.mesh()}},
                "steps": [20, 50, 100],
                "analysis": analysis
            })),
        ]
    } else {
        let group = format!("{name}-split");
        let upstream = |arm: &str| format!("{ns}-{arm}-{PORT}");
        vec![
            json!({
                "apiVersion": "gloo.solo.io/v1", "kind": "UpstreamGroup",
                "metadata": {"name": group, "namespace": ns},
                "spec": {"destinations": [
                    {"destination": {"upstream": {"name": upstream(&name), "namespace": ns}}, "weight": 100},
                    {"destination": {"upstream": {"name": upstream(&format!("{name}v2")), "namespace": ns}}, "weight": 0}
                ]}
            }),
            canary(json!({
                "backends": {"primary": name, "canary": format!("{name}v2")},
                "service": {"port": PORT},
                "router": {"gloo": {"upstreamGroup": {"name": group, "namespace": ns}}},
                "steps": [20, 50, 100],
                "analysis": analysis
            })),
        ]
    }
}

/// Creates the namespaces and the mesh, then every Canary's objects (the routing object or
/// Deployment first, then the Canary, whose creation time is stamped).
async fn create_canaries(
    creator: &Creator,
    layout: &Layout,
    n: usize,
    prometheus: &str,
    args: &ScaleBenchArgs,
    tracks: &Tracks,
) -> anyhow::Result<()> {
    let mesh = layout.mesh();
    let mut first = vec![json!({
        "apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "Mesh", "metadata": {"name": mesh},
        "spec": {"namespaceSelector": {"matchLabels": {"mesh": mesh}}}
    })];
    for k in 0..n.div_ceil(PER_NAMESPACE) {
        first.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": layout.namespace(k * PER_NAMESPACE), "labels": {"mesh": mesh}}}));
    }
    creator.create_all(first).await?;
    stream::iter(0..n)
        .map(|i| async move {
            let mut objects = canary_objects(
                layout,
                i,
                prometheus,
                args.interval,
                args.checks_per_step,
                args.metric,
            );
            let canary = objects.pop().unwrap_or_default();
            for o in objects {
                creator.create(&o).await?;
            }
            {
                let mut t = tracks.lock().unwrap_or_else(|e| e.into_inner());
                let x = t.entry(i).or_default();
                x.workload = is_workload(i);
                x.created = Some(Instant::now());
                if !x.workload {
                    // Traffic mode starts its rollout from creation.
                    x.triggered = x.created;
                }
            }
            creator.create(&canary).await
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Starts the rollouts of initialized workload-mode Canaries: a new image on the target.
async fn trigger(
    client: &kube::Client,
    layout: &Layout,
    which: &[usize],
    tracks: &Tracks,
) -> anyhow::Result<()> {
    stream::iter(which.iter().copied())
        .map(|i| async move {
            let api: Api<k8s_openapi::api::apps::v1::Deployment> =
                Api::namespaced(client.clone(), &layout.namespace(i));
            let patch = json!({"spec": {"template": {"spec": {"containers": [
                {"name": "app", "image": "app:2"}]}}}});
            api.patch(
                &name_of(i),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .with_context(|| format!("new image on Deployment {}", name_of(i)))?;
            let mut t = tracks.lock().unwrap_or_else(|e| e.into_inner());
            t.entry(i).or_default().triggered = Some(Instant::now());
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Aborts the rollouts of `which` through the command annotation.
async fn abort(
    client: &kube::Client,
    layout: &Layout,
    which: &[usize],
    tracks: &Tracks,
) -> anyhow::Result<()> {
    stream::iter(which.iter().copied())
        .map(|i| async move {
            let api: Api<Canary> = Api::namespaced(client.clone(), &layout.namespace(i));
            let patch = json!({"metadata": {"annotations": {
                crate::controller::COMMAND_ANNOTATION: format!("abort/bench-{i}")}}});
            api.patch(&name_of(i), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("aborting Canary {}", name_of(i)))?;
            let mut t = tracks.lock().unwrap_or_else(|e| e.into_inner());
            t.entry(i).or_default().aborted = true;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The background at `share` of full size: objects in namespaces of their own that no
/// Canary reads, which the operator must not pay for.
fn background(layout: &Layout, share: f64) -> Vec<Value> {
    let count = |full: usize| (full as f64 * share).round() as usize;
    let (configmaps, secrets, deployments) = (count(10_000), count(5_000), count(5_000));
    let payload: String = "x".repeat(2048);
    let ns = |k: usize| layout.background_namespace(k);
    let largest = configmaps.max(secrets).max(deployments);
    let mut out: Vec<Value> = (0..largest.div_ceil(1000))
        .map(|k| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns(k * 1000)}}))
        .collect();
    for k in 0..configmaps {
        out.push(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("config-{k}"), "namespace": ns(k), "labels": {"team": "other"}},
            "data": {"settings.yaml": payload}}));
    }
    for k in 0..secrets {
        out.push(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("secret-{k}"), "namespace": ns(k)},
            "stringData": {"token": payload}}));
    }
    for k in 0..deployments {
        let name = format!("service-{k}");
        out.push(deployment(&ns(k), &name, "other:1"));
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns(k)},
            "spec": {"selector": {"app": name}, "ports": [{"port": PORT}]}}));
    }
    out
}

/// Creates objects of any kind the server serves, discovering each kind once.
struct Creator {
    client: kube::Client,
    kinds: tokio::sync::Mutex<HashMap<(String, String), (ApiResource, bool)>>,
}

impl Creator {
    fn new(client: kube::Client) -> Self {
        Creator {
            client,
            kinds: tokio::sync::Mutex::default(),
        }
    }

    async fn resource(&self, api_version: &str, kind: &str) -> anyhow::Result<(ApiResource, bool)> {
        let key = (api_version.to_string(), kind.to_string());
        let mut kinds = self.kinds.lock().await;
        if let Some(found) = kinds.get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (ar, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .with_context(|| format!("discovering {kind}"))?;
        let found = (ar, caps.scope == kube::discovery::Scope::Namespaced);
        kinds.insert(key, found.clone());
        Ok(found)
    }

    async fn create(&self, obj: &Value) -> anyhow::Result<()> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        let (ar, namespaced) = self.resource(api_version, kind).await?;
        let api: Api<DynamicObject> = match (namespaced, obj["metadata"]["namespace"].as_str()) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &ar),
            _ => Api::all_with(self.client.clone(), &ar),
        };
        let dynamic: DynamicObject = serde_json::from_value(obj.clone())?;
        api.create(&PostParams::default(), &dynamic)
            .await
            .with_context(|| {
                format!(
                    "creating {kind} {}",
                    obj["metadata"]["name"].as_str().unwrap_or_default()
                )
            })?;
        Ok(())
    }

    /// Creates `objects`, namespaces first, a few at a time.
    async fn create_all(&self, objects: Vec<Value>) -> anyhow::Result<()> {
        let (namespaces, rest): (Vec<Value>, Vec<Value>) = objects
            .into_iter()
            .partition(|o| o["kind"] == "Namespace" || o["kind"] == "Mesh");
        for batch in [namespaces, rest] {
            stream::iter(batch.iter())
                .map(|o| self.create(o))
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<()>>()
                .await?;
        }
        Ok(())
    }
}

/// The operator's requests between two readings of the server's counters, by verb and
/// resource.
fn operator_requests(
    before: &BTreeMap<kube_sandbox::RequestKey, u64>,
    after: &BTreeMap<kube_sandbox::RequestKey, u64>,
) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for (k, v) in after {
        if k.client == BENCH_CLIENT {
            continue;
        }
        let d = v - before.get(k).copied().unwrap_or(0);
        if d > 0 {
            *out.entry((k.verb.clone(), k.resource.clone())).or_default() += d;
        }
    }
    out
}

/// A child process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until `url` answers 200.
async fn wait_ready(
    url: &str,
    what: &str,
    process: &mut Process,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = process.0.try_wait() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} exited ({status}) before it was ready; its log:\n{tail}");
        }
        if Instant::now() > deadline {
            bail!(
                "{what} was not ready at {url} within 60 s (log: {})",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real Prometheus scraping the benchmark's Envoy counters ([`Envoy`]) every `scrape`
/// seconds.
struct Prometheus {
    url: String,
    _process: Process,
}

impl Prometheus {
    async fn start(bin: &Path, dir: &Path, envoy: &str, scrape: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {scrape}s\n  scrape_timeout: {scrape}s\nscrape_configs:\n  - job_name: envoy\n    static_configs:\n      - targets: ['{envoy}']\n"
            ),
        )?;
        let port = free_port()?;
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}: install Prometheus (scripts/install-deps installs Debian's) or pass --prometheus BIN",
                    bin.display()
                )
            })?;
        let mut process = Process(child);
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(&format!("{url}/-/ready"), "Prometheus", &mut process, &log).await?;
        Ok(Prometheus {
            url,
            _process: process,
        })
    }

    fn metrics_url(&self) -> String {
        format!("{}/metrics", self.url)
    }
}

/// The Envoy request counters of the Canaries' arms, served for Prometheus to scrape, as
/// the callers' Envoys would export them: every arm answers 10 requests a second, all 200s
/// (the rolled-back share is aborted by command, not by errors).
struct Envoy {
    /// `host:port` of the scrape target.
    address: String,
    clusters: Arc<Mutex<Arc<Vec<String>>>>,
    _server: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Envoy {
    async fn start() -> anyhow::Result<Self> {
        let clusters: Arc<Mutex<Arc<Vec<String>>>> = Arc::default();
        let started = Instant::now();
        let served = clusters.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let clusters = served.lock().map(|c| c.clone()).unwrap_or_default();
                async move {
                    let count = (started.elapsed().as_secs_f64() * 10.0).floor();
                    let mut text = String::with_capacity(clusters.len() * 100 + 64);
                    text.push_str("# TYPE envoy_cluster_upstream_rq counter\n");
                    for c in clusters.iter() {
                        text.push_str(&format!(
                            "envoy_cluster_upstream_rq{{envoy_cluster_name=\"{c}\",envoy_response_code=\"200\"}} {count}\n"
                        ));
                    }
                    text
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Envoy {
            address,
            clusters,
            _server: AbortOnDrop(server),
        })
    }

    /// Serves the counters of `clusters` from now on (those of the N before go).
    fn serve(&self, clusters: Vec<String>) {
        if let Ok(mut c) = self.clusters.lock() {
            *c = Arc::new(clusters);
        }
    }
}

/// The Envoy cluster names of Canary `i`'s two arms, as its data plane names them: App Mesh
/// callers' egress clusters of the arms' virtual nodes, Gloo's clusters of the arms'
/// discovered upstreams.
fn clusters(layout: &Layout, i: usize) -> [String; 2] {
    let (ns, name) = (layout.namespace(i), name_of(i));
    if is_workload(i) {
        let mesh = layout.mesh();
        ["primary", "canary"].map(|arm| format!("cds_egress_{mesh}_{name}-{arm}_{ns}_http_{PORT}"))
    } else {
        [name.clone(), format!("{name}v2")].map(|svc| format!("{ns}-{svc}-{PORT}_{ns}"))
    }
}

/// `serin run` as its own process, so that its memory and CPU are its own.
struct Operator {
    pid: u32,
    metrics_url: String,
    _process: Process,
}

impl Operator {
    async fn start(
        bin: &Path,
        kubeconfig: &Path,
        dir: &Path,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let log = dir.join("operator.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(["run", "--log-format", "json", "--metrics-addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("cannot start the operator {}", bin.display()))?;
        let pid = child.id();
        let mut process = Process(child);
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(
            &format!("{base}/readyz"),
            "the operator",
            &mut process,
            &log,
        )
        .await?;
        Ok(Operator {
            pid,
            metrics_url: format!("{base}/metrics"),
            _process: process,
        })
    }

    /// Resident set size and its peak, in KiB.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("reading the operator's /proc status (Linux only)")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// User plus system CPU time so far, in seconds.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .context("reading the operator's /proc stat (Linux only)")?;
        // Fields after the command name (which may hold spaces) start at field 3, state.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
        Ok((ticks(11) + ticks(12)) / 100.0)
    }
}

/// A directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("serin-bench-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl TempDir {
    /// Keeps the directory (for its logs) under another name, and says where.
    fn keep(&self) -> PathBuf {
        let kept =
            std::env::temp_dir().join(format!("serin-bench-scale-{}-kept", std::process::id()));
        match std::fs::rename(&self.0, &kept) {
            Ok(()) => kept,
            Err(_) => self.0.clone(),
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One scrape of a Prometheus text exposition: series (name with labels) → value.
type Scrape = Vec<(String, f64)>;

async fn scrape(url: &str) -> anyhow::Result<Scrape> {
    let text = reqwest::get(url)
        .await
        .with_context(|| format!("scraping {url}"))?
        .text()
        .await?;
    Ok(parse_exposition(&text))
}

fn parse_exposition(text: &str) -> Scrape {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.trim().parse::<f64>().ok()?))
        })
        .collect()
}

/// The increase of the series named `name` whose labels pass `labels`, summed.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: impl Fn(&str) -> bool) -> f64 {
    let total = |s: &Scrape| -> f64 {
        s.iter()
            .filter(|(series, _)| {
                let (n, l) = series.split_once('{').unwrap_or((series, ""));
                n == name && labels(l)
            })
            .map(|(_, v)| v)
            .sum()
    };
    total(after) - total(before)
}

/// The increase of a histogram's cumulative buckets: `(upper bound, count)`, ascending.
fn buckets(before: &Scrape, after: &Scrape, name: &str) -> Vec<(f64, f64)> {
    let bucket_name = format!("{name}_bucket");
    let read = |s: &Scrape| -> Vec<(f64, f64)> {
        s.iter()
            .filter_map(|(series, v)| {
                let (n, l) = series.split_once('{')?;
                if n != bucket_name {
                    return None;
                }
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect()
    };
    let b = read(before);
    let mut out: Vec<(f64, f64)> = read(after)
        .into_iter()
        .map(|(le, v)| {
            let was = b
                .iter()
                .find(|(x, _)| *x == le)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (le, v - was)
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The bucket bound under which `q` of the observations fall, in ms; `None` without any.
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| le * 1000.0)
}

fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[idx])
}

/// The least-squares slope of (seconds, KiB) samples, in KiB per second.
fn slope(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let mean_m = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, m) in samples {
        num += (t - mean_t) * (m as f64 - mean_m);
        den += (t - mean_t) * (t - mean_t);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn duration_ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(ms) if ms.is_infinite() => "> 16 s".into(),
        Some(ms) if ms >= 10_000.0 => format!("{:.0} s", ms / 1000.0),
        Some(ms) if ms >= 1000.0 => format!("{:.1} s", ms / 1000.0),
        Some(ms) => format!("{ms:.0} ms"),
    }
}

fn p50_p99(values: &[f64]) -> String {
    format!(
        "{} / {}",
        duration_ms(quantile(values, 0.5)),
        duration_ms(quantile(values, 0.99))
    )
}

fn report(args: &ScaleBenchArgs, operator: &Path, results: &[Result1]) -> String {
    let mut out = format!(
        "# Serin at scale\n\n`{}` — operator `{}`, {}, on {} CPUs.\n\n",
        args.command(),
        operator.display(),
        match &args.kubeconfig {
            None => "on the embedded API server".to_string(),
            Some(p) => format!("on the cluster of {}", p.display()),
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    out.push_str(
        "## Memory (operator RSS, MiB)\n\n\
         | Canaries | empty cluster | + background (objects) | peak | idle after the rollouts |\n\
         |---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} ({}) | {} | {} |\n",
            r.n,
            mib(r.rss_empty_kib),
            mib(r.rss_background_kib),
            r.background_objects,
            mib(r.rss_peak_kib),
            mib(r.rss_steady_kib)
        ));
    }
    for r in results.iter().filter(|r| r.rss_minutes.len() >= 4) {
        let samples: Vec<String> = r.rss_minutes.iter().map(|(_, kib)| mib(*kib)).collect();
        let half = &r.rss_minutes[r.rss_minutes.len() / 2..];
        out.push_str(&format!(
            "\nN = {}: RSS during the rollouts, once a minute (MiB): {}. Slope over the second half (least squares): {:+.2} MiB/hour.\n",
            r.n,
            samples.join(", "),
            slope(half) * 3600.0 / 1024.0
        ));
    }
    out.push_str(
        "\n## Work during the rollouts\n\n\
         Per Canary per interval: divided by N and by the rollout time in analysis intervals.\n\n\
         | Canaries | rollout time | CPU (cores) | CPU per check | checks/s | reconciles/s | API requests per Canary per interval | Prometheus queries per Canary per interval | idle: CPU (cores), API requests/s |\n\
         |---:|---:|---:|---:|---:|---:|---|---:|---|\n",
    );
    for r in results {
        let intervals = (r.rollout_seconds / args.interval as f64).max(1e-9);
        let per = |x: f64| x / r.n.max(1) as f64 / intervals;
        let mut by_verb: BTreeMap<&str, u64> = BTreeMap::new();
        for ((verb, _), count) in &r.requests {
            *by_verb.entry(verb).or_default() += count;
        }
        let verbs: Vec<String> = by_verb
            .iter()
            .map(|(verb, count)| format!("{verb} {:.2}", per(*count as f64)))
            .collect();
        out.push_str(&format!(
            "| {} | {:.0} s | {:.3} | {} | {:.1} | {:.1} | {} | {:.2} | {:.3}, {:.1} |\n",
            r.n,
            r.rollout_seconds,
            r.cpu_rollout_seconds / r.rollout_seconds.max(1e-9),
            if r.checks > 0.0 {
                format!("{:.2} ms", r.cpu_rollout_seconds * 1000.0 / r.checks)
            } else {
                "–".into()
            },
            r.checks / r.rollout_seconds.max(1e-9),
            r.reconciles / r.rollout_seconds.max(1e-9),
            verbs.join(", "),
            per(r.prometheus_queries),
            r.cpu_steady_seconds / r.steady_seconds.max(1e-9),
            r.steady_requests as f64 / r.steady_seconds.max(1e-9)
        ));
    }
    out.push_str(
        "\n## Steady checks\n\n\
         While every Canary was in analysis: from the last one's first canary weight to the first \
         promotion (weight changes of the later steps included). The last column scales the CPU \
         per check to one check per Canary per minute at 10,000 Canaries (167 checks/s).\n\n\
         | Canaries | window | CPU (cores) | checks/s | CPU per check | 10,000 Canaries, a check a minute |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        match r.mid_rollout {
            Some((cpu, checks, secs)) if checks > 0.0 => out.push_str(&format!(
                "| {} | {secs:.0} s | {:.3} | {:.1} | {:.2} ms | {:.3} cores |\n",
                r.n,
                cpu / secs.max(1e-9),
                checks / secs.max(1e-9),
                cpu * 1000.0 / checks,
                cpu / checks * 10_000.0 / 60.0,
            )),
            _ => out.push_str(&format!(
                "| {} | – | – | – | – | – (no window: a Canary was promoted before the last one reached its first weight) |\n",
                r.n
            )),
        }
    }
    out.push_str(
        "\n## API requests by verb and resource\n\n\
         Per Canary per interval, during the rollouts; those under 0.01 are left out. *Held*: \
         the requests the operator's client-side rate limit (`--kube-qps`) made wait, and \
         their mean wait.\n\n\
         | Canaries | requests | held |\n\
         |---:|---|---|\n",
    );
    for r in results {
        let intervals = (r.rollout_seconds / args.interval as f64).max(1e-9);
        let per = |x: u64| x as f64 / r.n.max(1) as f64 / intervals;
        let mut rows: Vec<(&(String, String), &u64)> = r
            .requests
            .iter()
            .filter(|(_, c)| per(**c) >= 0.01)
            .collect();
        rows.sort_by(|a, b| b.1.cmp(a.1));
        let cells: Vec<String> = rows
            .iter()
            .map(|((verb, resource), count)| format!("{verb} {resource} {:.2}", per(**count)))
            .collect();
        let total: u64 = r.requests.values().sum();
        let held = if r.throttled > 0.0 {
            format!(
                "{:.0}% ({:.0} ms mean)",
                100.0 * r.throttled / (total.max(1) as f64),
                1000.0 * r.throttled_seconds / r.throttled
            )
        } else {
            "none".to_string()
        };
        out.push_str(&format!("| {} | {} | {held} |\n", r.n, cells.join(", ")));
    }
    out.push_str(
        "\n## Latency and outcomes (p50 / p99)\n\n\
         | Canaries | created → initialized | created → first canary weight (Gloo) | new image → first canary weight (App Mesh) | decision → weight write acknowledged | promoted | rolled back | unfinished |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {} | ≤ {} / ≤ {} | {} | {} | {} |\n",
            r.n,
            p50_p99(&r.init_ms),
            p50_p99(&r.first_weight_traffic_ms),
            p50_p99(&r.first_weight_workload_ms),
            duration_ms(bucket_quantile(&r.weight_write_buckets, 0.5)),
            duration_ms(bucket_quantile(&r.weight_write_buckets, 0.99)),
            r.promoted,
            r.rolled_back,
            r.unfinished
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The aborted share is spread over the indices and has the asked size.
    #[test]
    fn aborted_share() {
        let n = (0..1000).filter(|i| aborts(*i, 0.1)).count();
        assert_eq!(n, 100);
        assert_eq!((0..1000).filter(|i| aborts(*i, 0.0)).count(), 0);
        assert_eq!((0..10).filter(|i| aborts(*i, 1.0)).count(), 10);
    }

    /// Counters, histograms and labels are read from the text exposition.
    #[test]
    fn exposition() {
        let before = parse_exposition(
            "# HELP x\nserin_metric_check_total{metric=\"a\",verdict=\"Pass\"} 2\n\
             serin_weight_write_seconds_bucket{le=\"0.001\"} 1\n\
             serin_weight_write_seconds_bucket{le=\"+Inf\"} 1\n",
        );
        let after = parse_exposition(
            "serin_metric_check_total{metric=\"a\",verdict=\"Pass\"} 7\n\
             serin_metric_check_total{metric=\"a\",verdict=\"Fail\"} 1\n\
             serin_weight_write_seconds_bucket{le=\"0.001\"} 5\n\
             serin_weight_write_seconds_bucket{le=\"0.002\"} 9\n\
             serin_weight_write_seconds_bucket{le=\"+Inf\"} 11\n",
        );
        assert_eq!(
            delta(&before, &after, "serin_metric_check_total", |_| true),
            6.0
        );
        assert_eq!(
            delta(&before, &after, "serin_metric_check_total", |l| l
                .contains("Fail")),
            1.0
        );
        let b = buckets(&before, &after, "serin_weight_write_seconds");
        assert_eq!(b, vec![(0.001, 4.0), (0.002, 9.0), (f64::INFINITY, 10.0)]);
        assert_eq!(bucket_quantile(&b, 0.4), Some(1.0));
        assert_eq!(bucket_quantile(&b, 0.5), Some(2.0));
        assert_eq!(bucket_quantile(&b, 0.99), Some(f64::INFINITY));
        assert_eq!(bucket_quantile(&[], 0.5), None);
    }

    /// The counters the benchmark serves are the ones each Canary's preset selects: every
    /// arm's cluster regex (from the router's own naming of the arms) matches its cluster,
    /// and no other Canary's.
    #[test]
    fn served_clusters_are_the_presets_own() {
        let layout = Layout::new(4);
        let all: Vec<String> = (0..4).flat_map(|i| clusters(&layout, i)).collect();
        for i in 0..4 {
            let objects = canary_objects(&layout, i, "http://x", 10, 1, BenchMetric::Preset);
            let canary: Canary = serde_json::from_value(objects.last().unwrap().clone()).unwrap();
            let preset = canary.spec.analysis.metrics[0].preset.unwrap();
            let arms = crate::router::data_plane_arms(&canary).unwrap();
            for (arm, cluster) in crate::arms::Arm::BOTH.iter().zip(clusters(&layout, i)) {
                let re = crate::metrics::presets::cluster_regex(preset, &arms, *arm);
                let re = regex_lite::Regex::new(&format!("^(?:{re})$")).unwrap();
                let matched: Vec<&String> = all.iter().filter(|c| re.is_match(c)).collect();
                assert_eq!(matched, vec![&cluster], "Canary {i} {arm:?}");
            }
        }
    }

    /// The slope of a straight line is its rise per second; flat or single samples are 0.
    #[test]
    fn rss_slope() {
        let line: Vec<(f64, u64)> = (0..5).map(|k| (60.0 * k as f64, 1000 + 120 * k)).collect();
        assert!((slope(&line) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(0.0, 5), (60.0, 5)]), 0.0);
        assert_eq!(slope(&[(0.0, 5)]), 0.0);
    }

    /// Every Canary and background object the benchmark creates is valid for Serin.
    #[test]
    fn objects() {
        for i in 0..4 {
            for metric in [BenchMetric::Preset, BenchMetric::Query] {
                let objects =
                    canary_objects(&Layout::new(4), i, "http://127.0.0.1:9090", 10, 1, metric);
                let canary: Canary =
                    serde_json::from_value(objects.last().unwrap().clone()).unwrap();
                assert!(crate::api::validate(&canary.spec).is_empty(), "{i}");
                assert_eq!(canary.spec.is_traffic_mode(), !is_workload(i));
            }
        }
        let bg = background(&Layout::new(4), 0.01);
        assert_eq!(bg.iter().filter(|o| o["kind"] == "ConfigMap").count(), 100);
        assert_eq!(bg.iter().filter(|o| o["kind"] == "Secret").count(), 50);
        assert_eq!(bg.iter().filter(|o| o["kind"] == "Deployment").count(), 50);
        assert!(background(&Layout::new(4), 0.0).is_empty());
    }
}
