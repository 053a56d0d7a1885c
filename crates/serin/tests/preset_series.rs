//! Every example Canary under `examples/`, in the topology the example documents, against a
//! real Prometheus holding series shaped like its own data plane's Envoy metrics: the router
//! resolves the arms (`router::data_plane_arms`), the presets name series from them only, and
//! both judges (the sequential looks over raw counters and the threshold check over
//! `increase()`) must read exactly the arms' series. Every history has decoys that must not
//! count: other services of the mesh or gateway, the same Service in another namespace, and the
//! callee's own Envoy reporting the same requests again.
//!
//! Series names follow each data plane's real naming (sources in docs/presets-data-planes.md):
//! App Mesh callers' egress clusters, Gloo Edge upstream clusters (with and without the
//! Kubernetes Gateway integration's stats names), and, for Gateway API, Contour, kgateway and
//! Envoy Gateway. Envoy Gateway names a cluster per HTTPRoute rule, so it cannot separate the
//! two backends of one rule: there the presets must report no data. The CloudWatch example's
//! queries are checked without a server.
//!
//! What this file does not test: the routers' writes (router_*.rs) and the judges' verdicts
//! (analysis unit tests, closed_loop.rs).

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use serin::analysis::sequential::{Counts, Look};
use serin::analysis::{LookBatch, Outcome};
use serin::api::{Canary, MetricSpec, Preset};
use serin::arms::{Arm, DataPlaneArms};
use serin::metrics::presets::{self, Kind};
use serin::metrics::template::Vars;
use serin::metrics::{
    CanaryContext, Evaluator, EvaluatorConfig, MetricError, MetricEvaluation, StaticSecrets,
};
use support::prometheus::TestPrometheus;

/// Seconds between two scrapes of the Envoys.
const SCRAPE: i64 = 15;
/// Scrapes after the first (20 minutes of history).
const SCRAPES: i64 = 80;
/// The first look starts this long after the first scrape.
const LOOKS_FROM: i64 = 300;
/// Seconds between looks.
const LOOK_STEP: i64 = 60;
/// Looks in the batch.
const LOOKS: i64 = 5;
/// The check runs this long after the last look's end, between two scrapes.
const CHECK_AFTER: i64 = 5;
/// Prometheus' lookback: an instant selector sees a sample at most this old.
const LOOKBACK: i64 = 300;
/// Envoy's default bucket edges (ms) of `upstream_rq_time`, as its Prometheus output spells
/// them.
const LE: [&str; 20] = [
    "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
    "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf",
];

/// What one Envoy reports for one cluster per scrape (times the scrape's multiplier):
/// responses by code, and the cumulative latency histogram, one count per [`LE`] edge.
struct Traffic {
    codes: &'static [(&'static str, f64)],
    buckets: [f64; 20],
}

/// The stable arm: fast, 0.5% 5xx (the 404s are not errors).
const PRIMARY: Traffic = Traffic {
    codes: &[("200", 392.0), ("404", 6.0), ("500", 2.0)],
    buckets: [
        1.0, 10.0, 80.0, 200.0, 300.0, 370.0, 390.0, 398.0, 400.0, 400.0, 400.0, 400.0, 400.0,
        400.0, 400.0, 400.0, 400.0, 400.0, 400.0, 400.0,
    ],
};

/// The new arm: 2% 5xx, p99 ≈ 472 ms, one request in 200 slower than 500 ms.
const CANARY: Traffic = Traffic {
    codes: &[("200", 196.0), ("503", 4.0)],
    buckets: [
        0.0, 2.0, 20.0, 60.0, 110.0, 150.0, 175.0, 190.0, 199.0, 200.0, 200.0, 200.0, 200.0, 200.0,
        200.0, 200.0, 200.0, 200.0, 200.0, 200.0,
    ],
};

/// Someone else's service: 60% 5xx and seconds slow, so counting it shows in every number.
const OTHER: Traffic = Traffic {
    codes: &[("200", 20.0), ("503", 30.0)],
    buckets: [
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 50.0, 50.0, 50.0, 50.0, 50.0, 50.0,
        50.0, 50.0, 50.0,
    ],
};

/// Both arms in one cluster (Envoy Gateway's split rule): [`PRIMARY`] and [`CANARY`] added.
const SPLIT: Traffic = Traffic {
    codes: &[("200", 588.0), ("404", 6.0), ("500", 2.0), ("503", 4.0)],
    buckets: [
        1.0, 12.0, 100.0, 260.0, 410.0, 520.0, 565.0, 588.0, 599.0, 600.0, 600.0, 600.0, 600.0,
        600.0, 600.0, 600.0, 600.0, 600.0, 600.0, 600.0,
    ],
};

/// The requests of scrape `k` are this many times a profile's: counters grow unevenly.
fn multiplier(k: i64) -> f64 {
    (1 + k % 3) as f64
}

/// One series as scraped: cumulative values, and which arm's traffic it counts (`None` for
/// a decoy, or for traffic that mixes both arms).
struct Series {
    metric: &'static str,
    labels: String,
    arm: Option<Arm>,
    code: Option<&'static str>,
    le: Option<&'static str>,
    points: Vec<(i64, f64)>,
}

/// The Envoys' series of one data plane, scraped every [`SCRAPE`] seconds from `base`.
struct Envoys {
    base: i64,
    series: Vec<Series>,
}

impl Envoys {
    fn new() -> Self {
        Envoys {
            base: (Utc::now().timestamp() - 2 * 3600) / 60 * 60,
            series: Vec::new(),
        }
    }

    fn counter(
        &mut self,
        metric: &'static str,
        labels: String,
        arm: Option<Arm>,
        (code, le): (Option<&'static str>, Option<&'static str>),
        per_scrape: f64,
    ) {
        // Counters have history before the first scrape kept here.
        let mut value = 40.0 * per_scrape;
        let mut points = Vec::new();
        for k in 0..=SCRAPES {
            if k > 0 {
                value += per_scrape * multiplier(k);
            }
            points.push((self.base + k * SCRAPE, value));
        }
        self.series.push(Series {
            metric,
            labels,
            arm,
            code,
            le,
            points,
        });
    }

    /// What the Envoy of pod `namespace/pod` reports for its cluster `cluster`, which
    /// carries `arm`'s traffic (`None`: not one arm's): `scale` times `traffic`.
    fn cluster(
        &mut self,
        arm: Option<Arm>,
        cluster: &str,
        (namespace, pod): (&str, &str),
        traffic: &Traffic,
        scale: f64,
    ) -> &mut Self {
        let scrape = format!(r#"kubernetes_namespace="{namespace}",kubernetes_pod_name="{pod}""#);
        let name = format!(r#"envoy_cluster_name="{}""#, escape(cluster));
        let total: f64 = traffic.codes.iter().map(|(_, n)| n).sum();
        for (code, n) in traffic.codes {
            self.counter(
                "envoy_cluster_upstream_rq",
                format!(r#"envoy_response_code="{code}",{name},{scrape}"#),
                arm,
                (Some(code), None),
                n * scale,
            );
        }
        for class in ["2", "4", "5"] {
            let n: f64 = traffic
                .codes
                .iter()
                .filter(|(c, _)| c.starts_with(class))
                .map(|(_, n)| n)
                .sum();
            if n > 0.0 {
                self.counter(
                    "envoy_cluster_upstream_rq_xx",
                    format!(r#"envoy_response_code_class="{class}",{name},{scrape}"#),
                    arm,
                    (None, None),
                    n * scale,
                );
            }
        }
        self.counter(
            "envoy_cluster_upstream_rq_completed",
            format!("{name},{scrape}"),
            arm,
            (None, None),
            total * scale,
        );
        for (le, n) in LE.iter().zip(traffic.buckets) {
            self.counter(
                "envoy_cluster_upstream_rq_time_bucket",
                format!(r#"{name},{scrape},le="{le}""#),
                arm,
                (None, Some(le)),
                n * scale,
            );
        }
        self.counter(
            "envoy_cluster_upstream_rq_time_count",
            format!("{name},{scrape}"),
            arm,
            (None, None),
            traffic.buckets[19] * scale,
        );
        self.counter(
            "envoy_cluster_upstream_rq_time_sum",
            format!("{name},{scrape}"),
            arm,
            (None, None),
            traffic.buckets[19] * scale * 120.0,
        );
        self
    }

    /// The history as OpenMetrics text for promtool.
    fn openmetrics(&self) -> String {
        let mut metrics: Vec<&str> = Vec::new();
        for s in &self.series {
            if !metrics.contains(&s.metric) {
                metrics.push(s.metric);
            }
        }
        let mut out = String::new();
        for metric in metrics {
            let _ = writeln!(out, "# TYPE {metric} unknown");
            for s in self.series.iter().filter(|s| s.metric == metric) {
                for (t, v) in &s.points {
                    let _ = writeln!(out, "{metric}{{{}}} {v} {t}", s.labels);
                }
            }
        }
        out.push_str("# EOF\n");
        out
    }

    fn from(&self) -> i64 {
        self.base + LOOKS_FROM
    }

    /// The look grid the test asks for: `from`, then one time per look.
    fn grid(&self) -> Vec<i64> {
        (0..=LOOKS).map(|k| self.from() + k * LOOK_STEP).collect()
    }

    /// The check time.
    fn at(&self) -> i64 {
        self.from() + LOOKS * LOOK_STEP + CHECK_AFTER
    }

    /// `arm`'s series of `metric`.
    fn of<'a>(
        &'a self,
        arm: Arm,
        metric: &'a str,
    ) -> impl Iterator<Item = &'a Series> + Clone + 'a {
        self.series
            .iter()
            .filter(move |s| s.arm == Some(arm) && s.metric == metric)
    }

    /// What the sequential judge must read for `arm` between two grid times: the counters'
    /// increases as written (a series absent at the earlier time counts whole, as a new
    /// series does).
    fn counts(&self, arm: Arm, kind: Kind, max: Option<f64>, from: i64, to: i64) -> Counts {
        match kind {
            Kind::ErrorRate => {
                let all = self.of(arm, "envoy_cluster_upstream_rq");
                Counts {
                    requests: total(all.clone(), from, to),
                    bad: total(all.filter(|s| is_5xx(s.code)), from, to),
                }
            }
            Kind::LatencyP99 => {
                let requests = total(
                    self.of(arm, "envoy_cluster_upstream_rq_time_count"),
                    from,
                    to,
                );
                let edge = max.expect("latency presets have max");
                let at_most = self
                    .of(arm, "envoy_cluster_upstream_rq_time_bucket")
                    .filter(|s| s.le.and_then(|l| l.parse::<f64>().ok()) == Some(edge));
                Counts {
                    requests,
                    bad: requests - total(at_most, from, to),
                }
            }
        }
    }

    /// The looks the sequential judge must see.
    fn looks(&self, kind: Kind, max: Option<f64>) -> Vec<Look> {
        self.grid()
            .windows(2)
            .map(|w| Look {
                primary: self.counts(Arm::Primary, kind, max, w[0], w[1]),
                canary: self.counts(Arm::Canary, kind, max, w[0], w[1]),
            })
            .collect()
    }

    /// `arm`'s percent of 5xx over the `window` before the check, as written (Prometheus'
    /// extrapolation scales every series of a scrape alike, so the ratio is exact).
    fn error_percent(&self, arm: Arm, window: i64) -> f64 {
        let delta = |bad: bool| -> f64 {
            self.of(arm, "envoy_cluster_upstream_rq")
                .filter(|s| !bad || is_5xx(s.code))
                .map(|s| window_delta(&s.points, self.at(), window))
                .sum()
        };
        100.0 * delta(true) / delta(false)
    }

    /// The canary's p99 (ms) over the `window` before the check, interpolated within its
    /// bucket as `histogram_quantile` does.
    fn canary_p99(&self, window: i64) -> f64 {
        let cumulative: Vec<f64> = LE
            .iter()
            .map(|le| {
                self.of(Arm::Canary, "envoy_cluster_upstream_rq_time_bucket")
                    .filter(|s| s.le == Some(le))
                    .map(|s| window_delta(&s.points, self.at(), window))
                    .sum()
            })
            .collect();
        let rank = 0.99 * cumulative[LE.len() - 1];
        let mut lower = (0.0, 0.0);
        for (le, count) in LE.iter().zip(&cumulative) {
            let upper: f64 = le.parse().unwrap_or(f64::INFINITY);
            if *count >= rank {
                if upper.is_infinite() {
                    return lower.0;
                }
                return lower.0 + (upper - lower.0) * (rank - lower.1) / (count - lower.1);
            }
            lower = (upper, *count);
        }
        unreachable!("the +Inf bucket holds every request")
    }
}

/// The sum of the series' increases between two grid times.
fn total<'a>(series: impl Iterator<Item = &'a Series>, from: i64, to: i64) -> f64 {
    series.map(|s| increase(&s.points, from, to)).sum()
}

fn is_5xx(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with('5'))
}

/// An OpenMetrics label value.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"")
}

/// The value an instant selector sees at `t`: the newest sample at most [`LOOKBACK`] old.
fn value_at(points: &[(i64, f64)], t: i64) -> Option<f64> {
    points
        .iter()
        .rev()
        .find(|(ts, _)| *ts <= t && *ts > t - LOOKBACK)
        .map(|(_, v)| *v)
}

/// A counter's increase between two grid times, by the rule of `metrics::increases`.
fn increase(points: &[(i64, f64)], from: i64, to: i64) -> f64 {
    match (value_at(points, from), value_at(points, to)) {
        (Some(before), Some(after)) if after >= before => after - before,
        (_, Some(after)) => after,
        (_, None) => 0.0,
    }
}

/// A counter's growth between its first and last samples in the `window` before `at`.
fn window_delta(points: &[(i64, f64)], at: i64, window: i64) -> f64 {
    let inside: Vec<f64> = points
        .iter()
        .filter(|(t, _)| *t <= at && *t > at - window)
        .map(|(_, v)| *v)
        .collect();
    match (inside.first(), inside.last()) {
        (Some(first), Some(last)) => last - first,
        _ => 0.0,
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(path)
}

/// The documents of a YAML file of the repository.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The one Canary of an example file (which may hold other objects too).
fn example(name: &str) -> Canary {
    let canaries: Vec<Value> = documents(&format!("examples/{name}"))
        .into_iter()
        .filter(|d| d["kind"] == "Canary")
        .collect();
    assert_eq!(canaries.len(), 1, "examples/{name} holds one Canary");
    serde_json::from_value(canaries[0].clone()).expect("the example Canary parses")
}

/// The arms as the controller resolves them: from the routing object for a router that
/// reads it (Gloo: the UpstreamGroup of examples/routing/gloo-upstreamgroup.yaml), else from
/// the Canary alone.
fn resolved_arms(canary: &Canary) -> DataPlaneArms {
    if let Some(group) = canary
        .spec
        .router
        .gloo
        .as_ref()
        .and_then(|g| g.upstream_group.as_ref())
    {
        let obj = routing("gloo-upstreamgroup.yaml", "UpstreamGroup", &group.name);
        return serin::router::data_plane_arms_in(canary, &obj).expect("arms in the object");
    }
    serin::router::data_plane_arms(canary).expect("the example names a router")
}

/// The routing object `kind`/`name` of a file under examples/routing.
fn routing(file: &str, kind: &str, name: &str) -> Value {
    documents(&format!("examples/routing/{file}"))
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("examples/routing/{file} has no {kind} {name}"))
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The entries of a weighted list as (primary, canary): before a rollout the primary
/// carries all the traffic (weight 100) and the canary none.
fn by_weight<'a>(entries: &'a [Value], weight: &str) -> (&'a Value, &'a Value) {
    let with = |w: u64| {
        entries
            .iter()
            .find(|e| e.pointer(weight).and_then(Value::as_u64) == Some(w))
            .unwrap_or_else(|| panic!("no entry of weight {w} in {entries:?}"))
    };
    (with(100), with(0))
}

/// The App Mesh caller-side cluster of VirtualNode `node` (in namespace `ns`, so
/// `<node>_<ns>` in AWS) on `port` of mesh `color-mesh`.
fn egress(node: &str, ns: &str, port: u16) -> String {
    format!("cds_egress_color-mesh_{node}_{ns}_http_{port}")
}

/// The same VirtualNode's cluster on its own Envoy (the callee's view of the same requests).
fn ingress(node: &str, ns: &str, port: u16) -> String {
    format!("cds_ingress_color-mesh_{node}_{ns}_http_{port}")
}

/// The VirtualNodes of the colorteller route in examples/routing/appmesh-colorapp.yaml.
fn colorapp_nodes() -> (String, String, String) {
    let router = routing(
        "appmesh-colorapp.yaml",
        "VirtualRouter",
        "colorteller-router",
    );
    let routes = router["spec"]["routes"].as_array().expect("routes");
    let route = routes
        .iter()
        .find(|r| r["name"] == "colorteller-route")
        .expect("colorteller-route");
    let targets = route["httpRoute"]["action"]["weightedTargets"]
        .as_array()
        .expect("weighted targets");
    let (p, c) = by_weight(targets, "/weight");
    (
        text(p, "/virtualNodeRef/name").to_string(),
        text(c, "/virtualNodeRef/name").to_string(),
        text(&router, "/metadata/namespace").to_string(),
    )
}

/// The upstreams (name, namespace) of the UpstreamGroup in
/// examples/routing/gloo-upstreamgroup.yaml.
fn gloo_upstreams() -> ((String, String), (String, String)) {
    let group = routing(
        "gloo-upstreamgroup.yaml",
        "UpstreamGroup",
        "upstreamgroup-gateway",
    );
    let destinations = group["spec"]["destinations"]
        .as_array()
        .expect("destinations");
    let (p, c) = by_weight(destinations, "/weight");
    let upstream = |d: &Value| {
        (
            text(d, "/destination/upstream/name").to_string(),
            text(d, "/destination/upstream/namespace").to_string(),
        )
    };
    (upstream(p), upstream(c))
}

/// The backend Services of the weighted rule of examples/routing/gateway-api-httproute.yaml,
/// their namespace (the route's) and port.
fn httproute_backends() -> (String, String, String, u64) {
    let route = routing("gateway-api-httproute.yaml", "HTTPRoute", "colorgateway");
    let rule = route["spec"]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["name"] == "split")
        .expect("the split rule")
        .clone();
    let refs = rule["backendRefs"].as_array().expect("backendRefs");
    let (p, c) = by_weight(refs, "/weight");
    (
        text(p, "/name").to_string(),
        text(c, "/name").to_string(),
        text(&route, "/metadata/namespace").to_string(),
        p["port"].as_u64().expect("port"),
    )
}

/// One example evaluated against its history on both paths.
struct Run {
    canary: Canary,
    context: CanaryContext,
    batch: LookBatch,
    evaluations: Vec<MetricEvaluation>,
    _prometheus: TestPrometheus,
}

impl Run {
    async fn start(name: &str, envoys: &Envoys) -> Run {
        Run::of(example(name), envoys).await
    }

    /// `canary` (an example's, perhaps changed) evaluated against `envoys`.
    async fn of(mut canary: Canary, envoys: &Envoys) -> Run {
        let prometheus = TestPrometheus::start(&envoys.openmetrics());
        for m in &mut canary.spec.analysis.metrics {
            if let Some(p) = &mut m.provider.prometheus {
                p.address = prometheus.url.clone();
            }
        }
        let arms = resolved_arms(&canary);
        let context = CanaryContext::of(&canary, arms);
        let evaluator = Evaluator::new(Arc::new(StaticSecrets::none()), EvaluatorConfig::default())
            .expect("an evaluator");
        let time = |t: i64| Utc.timestamp_opt(t, 0).unwrap();
        let batch = evaluator
            .looks(
                &context,
                time(envoys.from()),
                Duration::from_secs(LOOK_STEP as u64),
                time(envoys.at()),
            )
            .await;
        let evaluations = evaluator
            .evaluate_detailed(&context, time(envoys.at()))
            .await;
        let grid: Vec<DateTime<Utc>> = envoys.grid().into_iter().map(time).collect();
        assert_eq!(
            (batch.from, batch.through),
            (grid[0], grid[grid.len() - 1]),
            "the batch covers the grid asked for"
        );
        Run {
            canary,
            context,
            batch,
            evaluations,
            _prometheus: prometheus,
        }
    }

    /// The Prometheus preset metrics of the example (at least one).
    fn presets(&self) -> Vec<(&MetricSpec, Preset)> {
        let found: Vec<_> = self
            .canary
            .spec
            .analysis
            .metrics
            .iter()
            .filter_map(|m| m.preset.filter(|p| !p.is_cloudwatch()).map(|p| (m, p)))
            .collect();
        assert!(!found.is_empty(), "the example has Prometheus presets");
        found
    }

    fn looks(&self, metric: &MetricSpec) -> &Result<Vec<Look>, Outcome> {
        assert!(
            metric.is_sequential(),
            "{} is judged sequentially by default",
            metric.name
        );
        &self
            .batch
            .metrics
            .iter()
            .find(|l| l.name == metric.name)
            .unwrap_or_else(|| panic!("no looks for {}", metric.name))
            .result
    }

    fn evaluation(&self, metric: &str) -> &MetricEvaluation {
        self.evaluations
            .iter()
            .find(|e| e.name == metric)
            .unwrap_or_else(|| panic!("no evaluation of {metric}"))
    }

    fn window(&self, metric: &MetricSpec) -> i64 {
        self.context.window(metric).as_secs() as i64
    }

    /// What went wrong, with the arms and the queries sent, for a failure message.
    fn report(&self, name: &str, plane: &str, problems: &[String]) -> String {
        let queries: Vec<&String> = self.evaluations.iter().flat_map(|e| &e.queries).collect();
        format!(
            "examples/{name} on {plane}:\n  {}\narms resolved by the router: {:?}\nthreshold queries sent: {queries:#?}",
            problems.join("\n  "),
            self.context.data_plane
        )
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn same_counts(a: Counts, b: Counts) -> bool {
    close(a.requests, b.requests) && close(a.bad, b.bad)
}

/// Both judges of every Prometheus preset of example `name` read exactly the arms' series
/// of `envoys`: the looks equal the written counters' increases per arm, and the threshold
/// check gives the canary's error rate or p99 (the primary's error rate as evidence).
async fn assert_presets_read_the_arms(name: &str, plane: &str, envoys: &Envoys) {
    let run = Run::start(name, envoys).await;
    let mut problems = Vec::new();
    for (metric, preset) in run.presets() {
        let kind = presets::kind(preset);
        let expected = envoys.looks(kind, metric.max);
        match run.looks(metric) {
            Ok(looks) => {
                let same = looks.len() == expected.len()
                    && looks.iter().zip(&expected).all(|(l, e)| {
                        same_counts(l.primary, e.primary) && same_counts(l.canary, e.canary)
                    });
                if !same {
                    problems.push(format!(
                        "{}: the looks are {looks:?}, the arms' counters say {expected:?}",
                        metric.name
                    ));
                }
            }
            Err(o) => problems.push(format!("{}: the looks are {o:?}", metric.name)),
        }
        let window = run.window(metric);
        match (&run.evaluation(&metric.name).result, kind) {
            (Ok(s), Kind::ErrorRate) => {
                let canary = envoys.error_percent(Arm::Canary, window);
                let primary = envoys.error_percent(Arm::Primary, window);
                let evidence = s.evidence.expect("error-rate presets keep evidence");
                let primary_seen = 100.0 * evidence.primary.errors / evidence.primary.requests;
                if !close(s.value, canary) || !close(primary_seen, primary) {
                    problems.push(format!(
                        "{}: the check gives {}% for the canary and {primary_seen}% for the primary, the arms' series {canary}% and {primary}%",
                        metric.name, s.value
                    ));
                }
            }
            (Ok(s), Kind::LatencyP99) => {
                let p99 = envoys.canary_p99(window);
                if !close(s.value, p99) || s.sample_size.is_none_or(|n| n == 0) {
                    problems.push(format!(
                        "{}: the check gives p99 {} ms over {:?} requests, the canary's series {p99} ms",
                        metric.name, s.value, s.sample_size
                    ));
                }
            }
            (Err(e), _) => problems.push(format!("{}: the check gives {e:?}", metric.name)),
        }
    }
    assert!(
        problems.is_empty(),
        "{}",
        run.report(name, plane, &problems)
    );
}

/// Every Prometheus preset of example `name` reports no data on both paths for `envoys`,
/// whose series cannot be told apart per arm: never a value from the wrong series.
async fn assert_presets_report_no_data(name: &str, plane: &str, envoys: &Envoys) {
    let run = Run::start(name, envoys).await;
    let mut problems = Vec::new();
    for (metric, _) in run.presets() {
        match run.looks(metric) {
            Err(Outcome::NoData { .. }) => {}
            other => problems.push(format!("{}: the looks are {other:?}", metric.name)),
        }
        match &run.evaluation(&metric.name).result {
            Err(MetricError::NoData(_)) => {}
            other => problems.push(format!("{}: the check gives {other:?}", metric.name)),
        }
    }
    assert!(
        problems.is_empty(),
        "{}",
        run.report(name, plane, &problems)
    );
}

/// Every example's router resolves its arms to the objects its routing documents weigh (the
/// VirtualNodes, upstreams or backend Services at weight 100 and 0, or the ones Serin
/// creates), and every example under examples/ is covered here.
#[test]
fn each_examples_arms_are_the_objects_its_routing_weighs() {
    let (white, blue, colorapp_ns) = colorapp_nodes();
    let ((up_p, up_p_ns), (up_c, _)) = gloo_upstreams();
    let (svc_p, svc_c, route_ns, _) = httproute_backends();
    let workload = |target: &str| (format!("{target}-primary"), format!("{target}-canary"));
    // (example, primary, canary, namespace of both)
    let expected: Vec<(&str, String, String, String)> = vec![
        // Workload mode: Serin creates VirtualNodes <target>-primary and <target>-canary
        // (docs/routers.md).
        {
            let (p, c) = workload("colorgateway");
            ("appmesh-workload.yaml", p, c, "appmesh-demo".into())
        },
        {
            let (p, c) = workload("frontend");
            ("appmesh-virtualgateway.yaml", p, c, "appmesh-demo".into())
        },
        ("appmesh-colorapp-traffic.yaml", white, blue, colorapp_ns),
        // The route lives in AWS; its weighted targets are the backends' VirtualNodes.
        (
            "appmesh-api-cloudwatch.yaml",
            "colorteller-white".into(),
            "colorteller-blue".into(),
            "delivery".into(),
        ),
        ("gloo-upstreamgroup.yaml", up_p, up_c, up_p_ns),
        ("gateway-api.yaml", svc_p, svc_c, route_ns),
        // Workload mode behind an HTTPRoute: the Services Serin creates for both arms.
        {
            let (p, c) = workload("podinfo");
            ("gateway-api-webhooks.yaml", p, c, "test".into())
        },
    ];
    let on_disk: BTreeSet<String> = std::fs::read_dir(repo("examples"))
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let covered: BTreeSet<String> = expected.iter().map(|e| e.0.to_string()).collect();
    assert_eq!(on_disk, covered, "every example is tested here");
    let mut wrong = Vec::new();
    for (name, primary, canary, namespace) in &expected {
        let arms = resolved_arms(&example(name));
        let got = (
            arms.primary.name.as_str(),
            arms.canary.name.as_str(),
            arms.primary.namespace.as_str(),
            arms.canary.namespace.as_str(),
        );
        let want = (
            primary.as_str(),
            canary.as_str(),
            namespace.as_str(),
            namespace.as_str(),
        );
        if got != want {
            wrong.push(format!(
                "examples/{name}: the router resolves {} arms {got:?}, the routing documents weigh {want:?}",
                arms.kind
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// examples/appmesh-workload.yaml: the callers' Envoys count colorgateway-primary and
/// colorgateway-canary's requests on their egress clusters, apart from colorgateway's own
/// calls to colorteller, the canary pods' ingress view and a staging copy.
#[tokio::test]
async fn appmesh_workload_reads_the_callers_egress_clusters() {
    let ns = "appmesh-demo";
    let mut e = Envoys::new();
    // Two pods of a mesh client whose backend is the colorgateway VirtualService.
    for (pod, scale) in [
        ("client-6d8f9b7c4-2xkqp", 1.0),
        ("client-6d8f9b7c4-9wz7m", 2.0),
    ] {
        e.cluster(
            Some(Arm::Primary),
            &egress("colorgateway-primary", ns, 9080),
            (ns, pod),
            &PRIMARY,
            scale,
        )
        .cluster(
            Some(Arm::Canary),
            &egress("colorgateway-canary", ns, 9080),
            (ns, pod),
            &CANARY,
            scale,
        );
    }
    for pod in [
        "colorgateway-primary-7f6d5c8b9-k2m4x",
        "colorgateway-5c9d8f7b6-p8q2r",
    ] {
        for teller in ["colorteller-white", "colorteller-blue"] {
            e.cluster(None, &egress(teller, ns, 9080), (ns, pod), &OTHER, 1.0);
        }
    }
    e.cluster(
        None,
        &ingress("colorgateway-canary", ns, 9080),
        (ns, "colorgateway-5c9d8f7b6-p8q2r"),
        &CANARY,
        3.0,
    )
    .cluster(
        None,
        &egress("colorgateway-canary", "staging", 9080),
        ("staging", "client-5b7c9d6f8-h3j5k"),
        &OTHER,
        1.0,
    );
    assert_presets_read_the_arms("appmesh-workload.yaml", "App Mesh", &e).await;
}

/// examples/appmesh-colorapp-traffic.yaml: colorgateway's Envoys count the colorteller-white
/// and colorteller-blue VirtualNodes of the route on their egress clusters, apart from the
/// header-routed colorteller-red, the blue pods' ingress view and a staging copy.
#[tokio::test]
async fn appmesh_traffic_mode_reads_the_routes_virtual_nodes() {
    let (white, blue, ns) = colorapp_nodes();
    let mut e = Envoys::new();
    for (pod, scale) in [
        ("colorgateway-7d9f8c6b5-4hx2k", 1.0),
        ("colorgateway-7d9f8c6b5-t9n3w", 2.0),
    ] {
        e.cluster(
            Some(Arm::Primary),
            &egress(&white, &ns, 9080),
            (&ns, pod),
            &PRIMARY,
            scale,
        )
        .cluster(
            Some(Arm::Canary),
            &egress(&blue, &ns, 9080),
            (&ns, pod),
            &CANARY,
            scale,
        )
        .cluster(
            None,
            &egress("colorteller-red", &ns, 9080),
            (&ns, pod),
            &OTHER,
            scale,
        );
    }
    e.cluster(
        None,
        &ingress(&blue, &ns, 9080),
        (&ns, "colorteller-blue-6b8c7d9f5-m4k7p"),
        &CANARY,
        3.0,
    )
    .cluster(
        None,
        &egress(&blue, "staging", 9080),
        ("staging", "colorgateway-6c7d8e9f1-z8x6v"),
        &OTHER,
        1.0,
    );
    assert_presets_read_the_arms("appmesh-colorapp-traffic.yaml", "App Mesh", &e).await;
}

/// examples/appmesh-virtualgateway.yaml: the ingress-gw VirtualGateway's Envoys count
/// frontend-primary and frontend-canary on their egress clusters, apart from frontend's own
/// calls to colorteller and the canary pods' ingress view.
#[tokio::test]
async fn appmesh_virtual_gateway_reads_the_gateways_egress_clusters() {
    let ns = "appmesh-demo";
    let mut e = Envoys::new();
    for (pod, scale) in [
        ("ingress-gw-5d6c7b8a9-q2w3e", 1.0),
        ("ingress-gw-5d6c7b8a9-r4t5y", 2.0),
    ] {
        e.cluster(
            Some(Arm::Primary),
            &egress("frontend-primary", ns, 8080),
            (ns, pod),
            &PRIMARY,
            scale,
        )
        .cluster(
            Some(Arm::Canary),
            &egress("frontend-canary", ns, 8080),
            (ns, pod),
            &CANARY,
            scale,
        );
    }
    for pod in [
        "frontend-primary-8b7c6d5e4-a1s2d",
        "frontend-9c8b7a6d5-f3g4h",
    ] {
        for teller in ["colorteller-white", "colorteller-blue"] {
            e.cluster(None, &egress(teller, ns, 9080), (ns, pod), &OTHER, 1.0);
        }
    }
    e.cluster(
        None,
        &ingress("frontend-canary", ns, 8080),
        (ns, "frontend-9c8b7a6d5-f3g4h"),
        &CANARY,
        3.0,
    );
    assert_presets_read_the_arms("appmesh-virtualgateway.yaml", "App Mesh", &e).await;
}

/// The gateway-proxy pods of Gloo Edge in gloo-system: both arms' upstream clusters named by
/// `cluster`, and two decoys, the colorteller upstream and a staging copy of the canary's.
fn gloo_envoys(cluster: impl Fn(&str, &str, &str, &str) -> String) -> Envoys {
    let ((up_p, up_ns), (up_c, _)) = gloo_upstreams();
    // The upstreams were discovered from the colorgateway and colorgatewayv2 Services of
    // appmesh-demo (examples/routing/gloo-upstreamgroup.yaml).
    let arms = [
        (
            Some(Arm::Primary),
            up_p,
            "appmesh-demo",
            "colorgateway",
            &PRIMARY,
        ),
        (
            Some(Arm::Canary),
            up_c,
            "appmesh-demo",
            "colorgatewayv2",
            &CANARY,
        ),
        (
            None,
            "appmesh-demo-colorteller-9080".to_string(),
            "appmesh-demo",
            "colorteller",
            &OTHER,
        ),
        (
            None,
            "staging-colorgatewayv2-9080".to_string(),
            "staging",
            "colorgatewayv2",
            &OTHER,
        ),
    ];
    let mut e = Envoys::new();
    for (pod, scale) in [
        ("gateway-proxy-7b9c8d6f5-x2k4p", 1.0),
        ("gateway-proxy-7b9c8d6f5-w8m3n", 2.0),
    ] {
        for (arm, upstream, svc_ns, svc, traffic) in &arms {
            e.cluster(
                *arm,
                &cluster(upstream, &up_ns, svc_ns, svc),
                ("gloo-system", pod),
                traffic,
                scale,
            );
        }
    }
    e
}

/// examples/gloo-upstreamgroup.yaml (Canary in gloo-system, upstreams discovered as
/// `appmesh-demo-colorgateway-9080`): the gateway proxy counts each upstream on cluster
/// `<upstream>_<upstream namespace>`, and the gloo preset reads those two upstreams.
#[tokio::test]
async fn gloo_reads_the_upstream_group_destinations() {
    let e = gloo_envoys(|upstream, ns, _, _| format!("{upstream}_{ns}"));
    assert_presets_read_the_arms("gloo-upstreamgroup.yaml", "Gloo Edge", &e).await;
}

/// examples/gloo-upstreamgroup.yaml with Gloo's Kubernetes Gateway integration enabled
/// (`kubeGateway.enabled=true`), where kube upstreams' stats are named
/// `kube-upstream_<upstream>_<upstream ns>_<service ns>_<service>_<port>`: the gloo preset
/// still reads the two upstreams.
#[tokio::test]
async fn gloo_reads_the_upstreams_under_kube_gateway_stats_names() {
    let e = gloo_envoys(|upstream, ns, svc_ns, svc| {
        format!("kube-upstream_{upstream}_{ns}_{svc_ns}_{svc}_9080")
    });
    assert_presets_read_the_arms("gloo-upstreamgroup.yaml", "Gloo Edge (kube gateway)", &e).await;
}

/// examples/gloo-upstreamgroup.yaml's hand-written `success-rate-custom` query gives the
/// canary upstream's percent of non-5xx responses from the gateway proxy's series.
#[tokio::test]
async fn gloo_custom_query_reads_the_canary_upstream() {
    let e = gloo_envoys(|upstream, ns, _, _| format!("{upstream}_{ns}"));
    let run = Run::start("gloo-upstreamgroup.yaml", &e).await;
    let metric = run
        .canary
        .spec
        .analysis
        .metrics
        .iter()
        .find(|m| m.name == "success-rate-custom")
        .expect("the custom metric");
    let expected = 100.0 - e.error_percent(Arm::Canary, run.window(metric));
    let evaluation = run.evaluation(&metric.name);
    let problems = match &evaluation.result {
        Ok(s) if close(s.value, expected) => vec![],
        other => vec![format!(
            "success-rate-custom: the check gives {other:?}, the canary upstream's series {expected}%"
        )],
    };
    assert!(
        problems.is_empty(),
        "{}",
        run.report("gloo-upstreamgroup.yaml", "Gloo Edge", &problems)
    );
}

/// Gateway API proxies in `namespace`: the two backend Services of the split rule on clusters
/// named by `cluster(namespace, service, port)`, and decoys: colorteller, and a staging copy
/// of the canary Service.
fn gateway_envoys(
    namespace: &str,
    pods: [&str; 2],
    cluster: fn(&str, &str, u64) -> String,
) -> Envoys {
    let (svc_p, svc_c, ns, port) = httproute_backends();
    let mut e = Envoys::new();
    for (pod, scale) in pods.into_iter().zip([1.0, 2.0]) {
        e.cluster(
            Some(Arm::Primary),
            &cluster(&ns, &svc_p, port),
            (namespace, pod),
            &PRIMARY,
            scale,
        )
        .cluster(
            Some(Arm::Canary),
            &cluster(&ns, &svc_c, port),
            (namespace, pod),
            &CANARY,
            scale,
        )
        .cluster(
            None,
            &cluster(&ns, "colorteller", 9080),
            (namespace, pod),
            &OTHER,
            scale,
        )
        .cluster(
            None,
            &cluster("staging", &svc_c, port),
            (namespace, pod),
            &OTHER,
            scale,
        );
    }
    e
}

/// examples/gateway-api.yaml on Contour, whose clusters' stats carry the alt_stat_name
/// `<namespace>_<service>_<port>`: the gateway presets read the split rule's two Services.
#[tokio::test]
async fn gateway_api_on_contour_reads_the_backend_services() {
    let e = gateway_envoys(
        "projectcontour",
        ["envoy-6f8d9c7b5-j4k8l", "envoy-6f8d9c7b5-n2b6v"],
        |ns, svc, port| format!("{ns}_{svc}_{port}"),
    );
    assert_presets_read_the_arms("gateway-api.yaml", "Contour", &e).await;
}

/// examples/gateway-api.yaml on kgateway, which names a Service's cluster
/// `kube_<namespace>_<service>_<port>`: the gateway presets read the split rule's two
/// Services.
#[tokio::test]
async fn gateway_api_on_kgateway_reads_the_backend_services() {
    let e = gateway_envoys(
        "kgateway-system",
        [
            "public-gateway-7c8d9e6f5-h7j2k",
            "public-gateway-7c8d9e6f5-q5w9e",
        ],
        |ns, svc, port| format!("kube_{ns}_{svc}_{port}"),
    );
    assert_presets_read_the_arms("gateway-api.yaml", "kgateway", &e).await;
}

/// examples/gateway-api.yaml on Envoy Gateway, which names one cluster per HTTPRoute rule
/// (default `httproute/<ns>/<route>/rule/<index>`, or with `%BACKEND_REFS%` in
/// EnvoyProxy's clusterStatName) and weights the backends inside it: no series is one arm's,
/// so the gateway presets report no data rather than judge a mix.
#[tokio::test]
async fn gateway_api_on_envoy_gateway_reports_no_data() {
    let (svc_p, svc_c, ns, _) = httproute_backends();
    let namings: [(&str, [String; 3]); 2] = [
        (
            "Envoy Gateway (default cluster stat names)",
            [
                format!("httproute/{ns}/colorgateway/rule/0"),
                format!("httproute/{ns}/colorgateway/rule/1"),
                format!("httproute/{ns}/colorteller/rule/0"),
            ],
        ),
        (
            "Envoy Gateway (clusterStatName with %BACKEND_REFS%)",
            [
                format!("httproute/{ns}/colorgateway/testers/0/{ns}/{svc_c}"),
                format!("httproute/{ns}/colorgateway/split/1/{ns}/{svc_p}|{ns}/{svc_c}"),
                format!("httproute/{ns}/colorteller/rule/0/{ns}/colorteller"),
            ],
        ),
    ];
    for (plane, [testers, split, other]) in &namings {
        let mut e = Envoys::new();
        for (pod, scale) in [
            ("envoy-gateway-system-public-gateway-5b6c7d-k9l2", 1.0),
            ("envoy-gateway-system-public-gateway-5b6c7d-m3n4", 2.0),
        ] {
            let at = ("envoy-gateway-system", pod);
            // The testers' rule reaches only the canary; the split rule both arms at once.
            e.cluster(None, testers, at, &CANARY, scale * 0.5)
                .cluster(None, split, at, &SPLIT, scale)
                .cluster(None, other, at, &OTHER, scale);
        }
        assert_presets_report_no_data("gateway-api.yaml", plane, &e).await;
    }
}

/// A CloudWatch preset query as sent.
struct CloudWatchQuery {
    /// The arm it selects (from its id).
    arm: Arm,
    id: String,
    namespace: String,
    /// Rendered (name, value) pairs.
    dimensions: Vec<(String, String)>,
}

/// The rendered GetMetricData queries of the CloudWatch presets of
/// examples/appmesh-api-cloudwatch.yaml, and the Canary's arms.
fn cloudwatch_queries() -> (Vec<CloudWatchQuery>, DataPlaneArms) {
    cloudwatch_queries_of(example("appmesh-api-cloudwatch.yaml"))
}

/// The rendered GetMetricData queries of `canary`'s CloudWatch presets, and its arms.
fn cloudwatch_queries_of(canary: Canary) -> (Vec<CloudWatchQuery>, DataPlaneArms) {
    let arms = serin::router::data_plane_arms(&canary).expect("arms");
    let context = CanaryContext::of(&canary, arms.clone());
    let mut out = Vec::new();
    for m in &canary.spec.analysis.metrics {
        let Some(preset) = m.preset.filter(|p| p.is_cloudwatch()) else {
            continue;
        };
        let vars = Vars::new(&context, context.window(m));
        let period = context.window(m).as_secs().div_ceil(60) as i32 * 60;
        for q in presets::cloudwatch_queries(preset, period, &context.data_plane) {
            let stat = q.metric_stat.expect("preset queries are metric stats");
            let arm = if q.id.starts_with("primary") {
                Arm::Primary
            } else {
                Arm::Canary
            };
            let dimensions = stat
                .metric
                .dimensions
                .iter()
                .map(|d| (d.name.clone(), vars.render(&d.value).expect("renders")))
                .collect();
            out.push(CloudWatchQuery {
                arm,
                id: q.id,
                namespace: stat.metric.namespace,
                dimensions,
            });
        }
    }
    assert!(!out.is_empty(), "the example has CloudWatch presets");
    (out, arms)
}

/// The same Canary on EKS (the preset cloudwatch-appmesh-error-rate): every query selects
/// its arm by the `app` label of that arm's workload (the backends colorteller-white and
/// colorteller-blue), in the Canary's namespace.
#[test]
fn cloudwatch_presets_select_each_arms_workload() {
    let mut canary = example("appmesh-api-cloudwatch.yaml");
    for m in &mut canary.spec.analysis.metrics {
        if m.preset == Some(Preset::CloudwatchEcsAppmeshErrorRate) {
            m.preset = Some(Preset::CloudwatchAppmeshErrorRate);
        }
    }
    let (queries, arms) = cloudwatch_queries_of(canary.clone());
    let backends = canary.spec.backends.expect("traffic mode");
    let mut wrong = Vec::new();
    for CloudWatchQuery {
        arm,
        id,
        dimensions,
        ..
    } in &queries
    {
        let workload = match arm {
            Arm::Primary => &backends.primary,
            Arm::Canary => &backends.canary,
        };
        let app = dimensions.iter().find(|(n, _)| n == "app").map(|(_, v)| v);
        let namespace = dimensions
            .iter()
            .find(|(n, _)| n == "Namespace")
            .map(|(_, v)| v);
        if app != Some(workload) || namespace.map(String::as_str) != Some("delivery") {
            wrong.push(format!(
                "{id}: dimensions {dimensions:?}, the {} arm's workload is {workload}",
                arm.as_str()
            ));
        }
    }
    assert_eq!(arms.pod_apps.primary, backends.primary);
    assert_eq!(arms.pod_apps.canary, backends.canary);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// examples/appmesh-api-cloudwatch.yaml documents App Mesh on ECS, where the CloudWatch agent
/// publishes the Envoys' metrics by ClusterName and TaskDefinitionFamily (to
/// ECS/ContainerInsights/Prometheus by default; the example's own query reads CWAgent and
/// names the canary's family `{{ canary }}`), with no Kubernetes `Namespace` or pod `app`:
/// every CloudWatch preset query must select its arm's task definition family there.
#[test]
fn cloudwatch_presets_select_what_the_ecs_agent_publishes() {
    let (queries, _) = cloudwatch_queries();
    let canary = example("appmesh-api-cloudwatch.yaml");
    let backends = canary.spec.backends.expect("traffic mode");
    let mut wrong = Vec::new();
    for CloudWatchQuery {
        arm,
        id,
        namespace,
        dimensions,
    } in &queries
    {
        let family = match arm {
            Arm::Primary => &backends.primary,
            Arm::Canary => &backends.canary,
        };
        let names: BTreeSet<&str> = dimensions.iter().map(|(n, _)| n.as_str()).collect();
        let ecs_namespace =
            ["ECS/ContainerInsights/Prometheus", "CWAgent"].contains(&namespace.as_str());
        let selects_family = dimensions
            .iter()
            .any(|(n, v)| n == "TaskDefinitionFamily" && v == family);
        let kubernetes_only = names.contains("app") || names.contains("Namespace");
        if !ecs_namespace || !selects_family || kubernetes_only {
            wrong.push(format!(
                "{id}: namespace {namespace}, dimensions {dimensions:?}; the ECS agent publishes the {} arm as TaskDefinitionFamily={family} (with ClusterName)",
                arm.as_str()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
