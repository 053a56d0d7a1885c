//! The operator's own Prometheus metrics and its HTTP endpoints (`/metrics`, `/healthz`,
//! `/readyz`) on one port.
//!
//! Labels are bounded: a Canary's namespace and name (what users filter on), phases,
//! verdicts, results and error categories — never messages.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{CanaryStatus, Phase, Verdict};

type Labels = Vec<(&'static str, String)>;

/// Every metric Serin exports about itself and the Canaries it manages.
pub struct Metrics {
    registry: Registry,
    weight: Family<Labels, Gauge>,
    phase: Family<Labels, Gauge>,
    step: Family<Labels, Gauge>,
    rollouts: Family<Labels, Counter>,
    rollout_duration: Family<Labels, Histogram>,
    checks: Family<Labels, Counter>,
    value: Family<Labels, Gauge<f64, AtomicU64>>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<Labels, Counter>,
    weight_write: Histogram,
    shard: Family<Labels, Gauge>,
    /// Canaries with series, with their phase series and the metric names of their
    /// `serin_metric_value` series, so that a phase change and a deleted Canary remove theirs.
    canaries: Mutex<HashMap<(String, String), Series>>,
}

/// The label values of one Canary's series that change over its life.
#[derive(Default)]
struct Series {
    /// The phase of its one `serin_canary_phase` series.
    phase: Option<Phase>,
    /// Metrics with a `serin_metric_value` series.
    metrics: BTreeSet<String>,
}

fn duration_histogram() -> Histogram {
    // 10 s .. ~3 h: rollouts take minutes to hours.
    Histogram::new(exponential_buckets(10.0, 2.0, 11))
}

impl Metrics {
    /// Records the shard this replica leads.
    pub fn set_shard(&self, shard: super::shard::Shard) {
        self.shard
            .get_or_create(&vec![
                ("shard", shard.index.to_string()),
                ("shards", shard.count.to_string()),
            ])
            .set(1);
    }

    /// Creates the metrics; `extra` registers other modules' metrics (the metric providers'
    /// request counters) into the same registry.
    pub fn new(extra: impl FnOnce(&mut Registry)) -> Self {
        // No registry prefix: every name carries `serin_` itself, as do the providers' metrics.
        let mut registry = Registry::default();
        let weight = Family::<Labels, Gauge>::default();
        let phase = Family::<Labels, Gauge>::default();
        let step = Family::<Labels, Gauge>::default();
        let rollouts = Family::<Labels, Counter>::default();
        let rollout_duration = Family::<Labels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let checks = Family::<Labels, Counter>::default();
        let value = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let reconcile_errors = Family::<Labels, Counter>::default();
        // 0.5 ms .. 16 s.
        let weight_write = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "serin_canary_weight",
            "Percent of traffic on the canary",
            weight.clone(),
        );
        registry.register(
            "serin_canary_phase",
            "Always 1: one series per Canary, whose phase label is the Canary's current phase",
            phase.clone(),
        );
        registry.register(
            "serin_canary_step",
            "Index of the current step in spec.steps",
            step.clone(),
        );
        registry.register(
            "serin_rollouts",
            "Finished rollouts by result",
            rollouts.clone(),
        );
        registry.register(
            "serin_rollout_duration_seconds",
            "Duration of finished rollouts by result",
            rollout_duration.clone(),
        );
        registry.register(
            "serin_metric_check",
            "Metric verdicts in counted checks",
            checks.clone(),
        );
        registry.register(
            "serin_metric_value",
            "Last value of each Canary metric",
            value.clone(),
        );
        registry.register(
            "serin_reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        registry.register(
            "serin_reconcile_errors",
            "Failed reconciles by error category",
            reconcile_errors.clone(),
        );
        registry.register(
            "serin_weight_write_seconds",
            "Time from a decision to move traffic until the router acknowledged the weight write",
            weight_write.clone(),
        );
        let shard = Family::<Labels, Gauge>::default();
        registry.register(
            "serin_shard",
            "Always 1 on a leader: the shard it leads, of how many (shard 0 of 1 without shards)",
            shard.clone(),
        );
        extra(&mut registry);
        Metrics {
            shard,
            registry,
            weight,
            phase,
            step,
            rollouts,
            rollout_duration,
            checks,
            value,
            reconcile_duration,
            reconcile_errors,
            weight_write,
            canaries: Mutex::default(),
        }
    }

    /// Records a reconcile's duration.
    pub fn reconcile_took(&self, seconds: f64) {
        self.reconcile_duration.observe(seconds);
    }

    /// Records how long a weight write took to be acknowledged, from the decision.
    pub fn weight_written(&self, seconds: f64) {
        self.weight_write.observe(seconds);
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, category: &str) {
        self.reconcile_errors
            .get_or_create(&vec![("category", category.to_string())])
            .inc();
    }

    /// Updates the per-Canary series from a status that was just written, counting what
    /// changed since `before`.
    pub fn observe_status(
        &self,
        namespace: &str,
        name: &str,
        before: &CanaryStatus,
        after: &CanaryStatus,
    ) {
        let id = || {
            vec![
                ("namespace", namespace.to_string()),
                ("name", name.to_string()),
            ]
        };
        let mut canaries = self.canaries.lock().unwrap_or_else(|e| e.into_inner());
        let series = canaries
            .entry((namespace.to_string(), name.to_string()))
            .or_default();
        self.weight
            .get_or_create(&id())
            .set(i64::from(after.canary_weight));
        self.step.get_or_create(&id()).set(i64::from(after.step));
        let with_phase = |p: Phase| {
            let mut l = id();
            l.push(("phase", p.as_str().to_string()));
            l
        };
        if let Some(old) = series.phase.filter(|p| *p != after.phase) {
            self.phase.remove(&with_phase(old));
        }
        self.phase.get_or_create(&with_phase(after.phase)).set(1);
        series.phase = Some(after.phase);
        // History entries newer than the newest one before are rollouts that just finished.
        let newest_before = before.history.first().map(|h| h.finished_at);
        for h in after
            .history
            .iter()
            .filter(|h| newest_before.is_none_or(|t| h.finished_at > t))
        {
            let mut l = id();
            l.push(("result", h.result.as_str().to_string()));
            self.rollouts.get_or_create(&l).inc();
            if let Some(start) = h.started_at {
                let secs = (h.finished_at - start).num_milliseconds() as f64 / 1000.0;
                self.rollout_duration
                    .get_or_create(&vec![("result", h.result.as_str().to_string())])
                    .observe(secs.max(0.0));
            }
        }
        if let Some(check) = &after.last_check
            && before.last_check.as_ref().map(|c| c.time) != Some(check.time)
        {
            for r in &check.results {
                self.checks
                    .get_or_create(&vec![
                        ("metric", r.metric.clone()),
                        ("verdict", r.verdict.as_str().to_string()),
                    ])
                    .inc();
                if let Some(v) = r.value {
                    let mut l = id();
                    l.push(("metric", r.metric.clone()));
                    self.value.get_or_create(&l).set(v);
                    series.metrics.insert(r.metric.clone());
                }
            }
        }
    }

    /// Forgets a deleted Canary's series.
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let series = self
            .canaries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
            .unwrap_or_default();
        let id = vec![("namespace", key.0), ("name", key.1)];
        self.weight.remove(&id);
        self.step.remove(&id);
        if let Some(p) = series.phase {
            let mut l = id.clone();
            l.push(("phase", p.as_str().to_string()));
            self.phase.remove(&l);
        }
        for m in series.metrics {
            let mut l = id.clone();
            l.push(("metric", m));
            self.value.remove(&l);
        }
    }

    /// Forgets the series of every Canary not in `alive` (`(namespace, name)`).
    pub fn retain(&self, alive: &HashSet<(String, String)>) {
        let gone: Vec<(String, String)> = self
            .canaries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|k| !alive.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.forget(&ns, &name);
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Verdict label values, for tests and dashboards.
    pub fn verdicts() -> [&'static str; 3] {
        [
            Verdict::Pass.as_str(),
            Verdict::Fail.as_str(),
            Verdict::Inconclusive.as_str(),
        ]
    }
}

/// Readiness shared by the controller and the HTTP server.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Marks the operator ready (watches started, CRD present).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the operator is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` resolves.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(Shared { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(bound)
}

async fn metrics_handler(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn ready_handler(State(s): State<Shared>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(weight: u8) -> CanaryStatus {
        serde_json::from_value(serde_json::json!({
            "phase": "Progressing",
            "canaryWeight": weight,
            "lastCheck": {"time": "2026-11-22T10:05:00Z", "verdict": "Pass",
                          "results": [{"metric": "error-rate", "value": 0.5, "verdict": "Pass"}]}
        }))
        .unwrap()
    }

    /// Series of Canaries that no longer exist are dropped; the others stay.
    #[test]
    fn retain_drops_deleted_canaries() {
        let m = Metrics::new(|_| {});
        m.observe_status("shop", "web", &CanaryStatus::default(), &status(20));
        m.observe_status("shop", "api", &CanaryStatus::default(), &status(50));
        let text = m.encode();
        assert!(
            text.contains(r#"serin_canary_weight{namespace="shop",name="api"} 50"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"serin_metric_value{namespace="shop",name="api",metric="error-rate"} 0.5"#
            ),
            "{text}"
        );
        m.retain(&HashSet::from([("shop".to_string(), "web".to_string())]));
        let text = m.encode();
        assert!(
            text.contains(r#"serin_canary_weight{namespace="shop",name="web"} 20"#),
            "{text}"
        );
        assert!(!text.contains(r#"name="api""#), "{text}");
    }

    /// A Canary has one phase series, labelled with its current phase: a change of phase
    /// replaces it, and deleting the Canary removes it.
    #[test]
    fn one_phase_series_per_canary() {
        let m = Metrics::new(|_| {});
        let phases = |m: &Metrics| -> Vec<String> {
            m.encode()
                .lines()
                .filter(|l| l.starts_with("serin_canary_phase{"))
                .map(str::to_string)
                .collect()
        };
        let progressing = status(20);
        m.observe_status("shop", "web", &CanaryStatus::default(), &progressing);
        assert_eq!(
            phases(&m),
            [r#"serin_canary_phase{namespace="shop",name="web",phase="Progressing"} 1"#]
        );
        let mut done = progressing.clone();
        done.phase = Phase::Succeeded;
        m.observe_status("shop", "web", &progressing, &done);
        m.observe_status("shop", "web", &done, &done);
        assert_eq!(
            phases(&m),
            [r#"serin_canary_phase{namespace="shop",name="web",phase="Succeeded"} 1"#]
        );
        m.forget("shop", "web");
        assert!(phases(&m).is_empty(), "{:?}", phases(&m));
    }
}
