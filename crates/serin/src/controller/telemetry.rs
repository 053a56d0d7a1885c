//! The operator's own Prometheus metrics and its HTTP endpoints (`/metrics`, `/healthz`,
//! `/readyz`) on one port.
//!
//! Labels are bounded: a Canary's namespace and name (what users filter on), phases,
//! verdicts, results and error categories — never messages.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{CanaryStatus, Phase, RolloutResult, Verdict};

type Labels = Vec<(&'static str, String)>;

/// Every metric Serin exports about itself and the Canaries it manages.
pub struct Metrics {
    registry: Registry,
    /// The per-Canary series (weight, step, phase, finished rollouts, metric values).
    canaries: Arc<CanaryTable>,
    rollout_duration: Family<Labels, Histogram>,
    checks: Family<Labels, Counter>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<Labels, Counter>,
    weight_write: Histogram,
    shard: Family<Labels, Gauge>,
    notifications: Family<Labels, Counter>,
    webhooks: Family<Labels, Counter>,
}

/// The per-Canary series as one compact row per Canary, written out at scrape time. Kept
/// as metric families, each series would own its label strings and a map entry: about
/// 1.4 KB per Canary over five families (14 MB at 10,000 Canaries); a row is about 100
/// bytes, plus about 50 per rollout in its history. Namespaces, then names, in order: the
/// exposition is sorted.
#[derive(Debug, Default)]
struct CanaryTable(Mutex<Rows>);

/// Rows by namespace, then name.
type Rows = BTreeMap<Box<str>, BTreeMap<Box<str>, Row>>;

/// What one Canary's series say.
#[derive(Debug, Default)]
struct Row {
    weight: u8,
    step: u32,
    /// The phase label of its one `serin_canary_phase` series.
    phase: Phase,
    /// Finished rollouts by result (in [`RESULTS`] order) since this replica first saw it;
    /// a result has a series from its first rollout on.
    rollouts: [u64; RESULTS.len()],
    /// The last value of each metric that had one.
    values: Vec<(Box<str>, f64)>,
    /// The rollouts in its `status.history` (so at most `historyLimit`), newest first: one
    /// `serin_rollout_finished_timestamp_seconds` series each, dropped as they age out.
    records: Vec<Record>,
}

/// One finished rollout, as its series says it.
#[derive(Debug, PartialEq)]
struct Record {
    revision: Box<str>,
    result: RolloutResult,
    reached_weight: u8,
    /// Unix seconds; `None` for entries written before Serin recorded the start.
    started: Option<i64>,
    finished: i64,
}

impl Record {
    fn of(h: &crate::api::HistoryEntry) -> Self {
        Record {
            revision: h.revision.as_str().into(),
            result: h.result,
            reached_weight: h.reached_weight,
            started: h.started_at.map(|t| t.timestamp()),
            finished: h.finished_at.timestamp(),
        }
    }
}

const RESULTS: [RolloutResult; 4] = RolloutResult::ALL;

impl CanaryTable {
    fn rows(&self) -> std::sync::MutexGuard<'_, Rows> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one family: `value` gives each Canary's samples as (extra label, value).
    fn family<V: EncodeGaugeValue>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        extra: &'static str,
        samples: impl Fn(&Row, &mut dyn FnMut(Option<&str>, V) -> fmt::Result) -> fmt::Result,
    ) -> fmt::Result {
        let rows = self.rows();
        let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (ns, names) in rows.iter() {
            for (name, row) in names {
                samples(row, &mut |label, v| match label {
                    None => family
                        .encode_family(&[("namespace", &**ns), ("name", &**name)])?
                        .encode_gauge(&v),
                    Some(l) => family
                        .encode_family(&[("namespace", &**ns), ("name", &**name), (extra, l)])?
                        .encode_gauge(&v),
                })?;
            }
        }
        Ok(())
    }
}

impl Collector for CanaryTable {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.family(
            &mut enc,
            "serin_canary_weight",
            "Percent of traffic on the canary",
            "",
            |row, out| out(None, i64::from(row.weight)),
        )?;
        self.family(
            &mut enc,
            "serin_canary_phase",
            "Always 1: one series per Canary, whose phase label is the Canary's current phase",
            "phase",
            |row, out| out(Some(row.phase.as_str()), 1i64),
        )?;
        self.family(
            &mut enc,
            "serin_canary_step",
            "Index of the current step in spec.steps",
            "",
            |row, out| out(None, i64::from(row.step)),
        )?;
        self.family(
            &mut enc,
            "serin_metric_value",
            "Last value of each Canary metric",
            "metric",
            |row, out| {
                row.values
                    .iter()
                    .try_for_each(|(metric, v)| out(Some(metric), *v))
            },
        )?;
        // Per-rollout records: their labels differ from the helper's, so written by hand.
        let rows = self.rows();
        let mut family = enc.encode_descriptor(
            "serin_rollout_finished_timestamp_seconds",
            "When each rollout in a Canary's status.history finished (Unix seconds), labelled with its revision, result, reached weight and start (RFC 3339); one series per history entry, gone when the entry ages out",
            None,
            MetricType::Gauge,
        )?;
        for (ns, names) in rows.iter() {
            for (name, row) in names {
                for r in &row.records {
                    let started = r
                        .started
                        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                        .unwrap_or_default();
                    family
                        .encode_family(&[
                            ("namespace", &**ns),
                            ("name", &**name),
                            ("revision", &*r.revision),
                            ("result", r.result.as_str()),
                            ("reached_weight", &r.reached_weight.to_string()),
                            ("started", &started),
                        ])?
                        .encode_gauge(&r.finished)?;
                }
            }
        }
        drop(rows);
        // A counter, so written out by hand (the helper writes gauges).
        let rows = self.rows();
        let mut family = enc.encode_descriptor(
            "serin_rollouts",
            "Finished rollouts by result",
            None,
            MetricType::Counter,
        )?;
        for (ns, names) in rows.iter() {
            for (name, row) in names {
                for (result, n) in RESULTS.iter().zip(row.rollouts).filter(|(_, n)| *n > 0) {
                    family
                        .encode_family(&[
                            ("namespace", &**ns),
                            ("name", &**name),
                            ("result", result.as_str()),
                        ])?
                        .encode_counter::<NoLabelSet, u64, u64>(&n, None)?;
                }
            }
        }
        Ok(())
    }
}

/// The bucket bounds of `serin_weight_write_seconds`.
fn weight_write_buckets() -> Vec<f64> {
    let mut b: Vec<f64> = exponential_buckets(0.0005, 2.0, 16)
        .chain([0.025, 0.05, 0.1])
        .collect();
    b.sort_by(f64::total_cmp);
    b
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
        let canaries = Arc::new(CanaryTable::default());
        let rollout_duration = Family::<Labels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let checks = Family::<Labels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let reconcile_errors = Family::<Labels, Counter>::default();
        // 0.5 ms .. 16 s, doubling, with 25, 50 and 100 ms between: the 50 ms goal of a
        // decision's weight write is a bucket bound.
        let weight_write = Histogram::new(weight_write_buckets());
        registry.register_collector(Box::new(canaries.clone()));
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
        let notifications = Family::<Labels, Counter>::default();
        registry.register(
            "serin_notifications",
            "Notifications by receiver (--notifications) and outcome: delivered, failed (after retries), rate_limited, dropped (queue full; receiver *)",
            notifications.clone(),
        );
        let webhooks = Family::<Labels, Counter>::default();
        registry.register(
            "serin_webhook_calls",
            "Webhook calls (spec.webhooks) by type and outcome: ok (2xx), refused (another status), timeout, unreachable, not_allowed (URL or Secret refused), dropped (event deliveries over the in-flight bound)",
            webhooks.clone(),
        );
        extra(&mut registry);
        Metrics {
            webhooks,
            notifications,
            shard,
            registry,
            canaries,
            rollout_duration,
            checks,
            reconcile_duration,
            reconcile_errors,
            weight_write,
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

    /// Counts a notification's outcome at `receiver`.
    pub fn notification(&self, receiver: &str, outcome: &'static str) {
        self.notifications
            .get_or_create(&vec![
                ("receiver", receiver.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Counts a webhook call's outcome.
    pub fn webhook_called(&self, kind: &str, outcome: &'static str) {
        self.webhooks
            .get_or_create(&vec![
                ("type", kind.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }

    /// Counts a failed reconcile by error category.
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
        // History entries newer than the newest one before are rollouts that just finished.
        let newest_before = before.history.first().map(|h| h.finished_at);
        let finished: Vec<_> = after
            .history
            .iter()
            .filter(|h| newest_before.is_none_or(|t| h.finished_at > t))
            .collect();
        for h in &finished {
            if let Some(start) = h.started_at {
                let secs = (h.finished_at - start).num_milliseconds() as f64 / 1000.0;
                self.rollout_duration
                    .get_or_create(&vec![("result", h.result.as_str().to_string())])
                    .observe(secs.max(0.0));
            }
        }
        let new_check = after
            .last_check
            .as_ref()
            .filter(|c| before.last_check.as_ref().map(|b| b.time) != Some(c.time));
        if let Some(check) = new_check {
            for r in &check.results {
                self.checks
                    .get_or_create(&vec![
                        ("metric", r.metric.clone()),
                        ("verdict", r.verdict.as_str().to_string()),
                    ])
                    .inc();
            }
        }

        let mut rows = self.canaries.rows();
        let names = match rows.get_mut(namespace) {
            Some(names) => names,
            None => rows.entry(namespace.into()).or_default(),
        };
        let row = match names.get_mut(name) {
            Some(row) => row,
            None => names.entry(name.into()).or_default(),
        };
        row.weight = after.canary_weight;
        row.step = after.step;
        row.phase = after.phase;
        for h in &finished {
            if let Some(i) = RESULTS.iter().position(|r| *r == h.result) {
                row.rollouts[i] += 1;
            }
        }
        if !finished.is_empty() || row.records.len() != after.history.len() {
            row.records = after.history.iter().map(Record::of).collect();
        }
        for r in new_check.iter().flat_map(|c| &c.results) {
            let Some(v) = r.value else { continue };
            match row.values.iter_mut().find(|(m, _)| **m == *r.metric) {
                Some((_, old)) => *old = v,
                None => row.values.push((r.metric.as_str().into(), v)),
            }
        }
    }

    /// Forgets a deleted Canary's series.
    pub fn forget(&self, namespace: &str, name: &str) {
        let mut rows = self.canaries.rows();
        if let Some(names) = rows.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                rows.remove(namespace);
            }
        }
    }

    /// Forgets the series of every Canary not in `alive` (`(namespace, name)`).
    pub fn retain(&self, alive: &HashSet<(String, String)>) {
        let mut rows = self.canaries.rows();
        rows.retain(|ns, names| {
            names.retain(|name, _| alive.contains(&(ns.to_string(), name.to_string())));
            !names.is_empty()
        });
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

    /// Each rollout in the history has one record series, with its revision, result, reached
    /// weight and start as labels and its end as the value; entries that age out of the
    /// history lose theirs, and a deleted Canary loses all.
    #[test]
    fn one_record_series_per_rollout_in_the_history() {
        let m = Metrics::new(|_| {});
        let records = |m: &Metrics| -> Vec<String> {
            m.encode()
                .lines()
                .filter(|l| l.starts_with("serin_rollout_finished_timestamp_seconds{"))
                .map(str::to_string)
                .collect()
        };
        let entry = |rev: &str, result: &str, minute: u32| {
            serde_json::json!({"revision": rev, "startedAt": format!("2026-11-22T10:{minute:02}:00Z"),
                "finishedAt": format!("2026-11-22T10:{:02}:30Z", minute + 5), "result": result,
                "reachedWeight": 50})
        };
        let with = |h: Vec<serde_json::Value>| -> CanaryStatus {
            serde_json::from_value(serde_json::json!({"phase": "Failed", "history": h})).unwrap()
        };
        let one = with(vec![entry("r1", "RolledBack", 0)]);
        m.observe_status("shop", "web", &CanaryStatus::default(), &one);
        assert_eq!(
            records(&m),
            [
                r#"serin_rollout_finished_timestamp_seconds{namespace="shop",name="web",revision="r1",result="RolledBack",reached_weight="50",started="2026-11-22T10:00:00Z"} 1795341930"#
            ]
        );
        // historyLimit 1: the next rollout replaces it.
        let two = with(vec![entry("r2", "Promoted", 10)]);
        m.observe_status("shop", "web", &one, &two);
        let r = records(&m);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].contains(r#"revision="r2",result="Promoted""#), "{r:?}");
        m.forget("shop", "web");
        assert!(records(&m).is_empty());
    }

    /// Finished rollouts are counted per result from their first one on, a metric's value
    /// is replaced by its next one, and the exposition stays valid OpenMetrics.
    #[test]
    fn rollouts_counted_and_values_replaced() {
        let m = Metrics::new(|_| {});
        let first = status(20);
        m.observe_status("shop", "web", &CanaryStatus::default(), &first);
        let text = m.encode();
        assert!(!text.contains("serin_rollouts_total{"), "{text}");
        let mut done: CanaryStatus = serde_json::from_value(serde_json::json!({
            "phase": "Failed",
            "lastCheck": {"time": "2026-11-22T10:06:00Z", "verdict": "Fail",
                          "results": [{"metric": "error-rate", "value": 7.5, "verdict": "Fail"}]},
            "history": [{"revision": "r1", "startedAt": "2026-11-22T10:00:00Z",
                         "finishedAt": "2026-11-22T10:06:00Z", "result": "RolledBack",
                         "reachedWeight": 20}]
        }))
        .unwrap();
        m.observe_status("shop", "web", &first, &done);
        // The same status again counts nothing more.
        m.observe_status("shop", "web", &done, &done);
        let text = m.encode();
        for line in [
            r#"serin_rollouts_total{namespace="shop",name="web",result="RolledBack"} 1"#,
            r#"serin_metric_value{namespace="shop",name="web",metric="error-rate"} 7.5"#,
            r#"serin_canary_weight{namespace="shop",name="web"} 0"#,
            r#"serin_canary_phase{namespace="shop",name="web",phase="Failed"} 1"#,
            "# TYPE serin_rollouts counter",
            "# TYPE serin_canary_weight gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(!text.contains(r#"result="Promoted""#), "{text}");
        assert_eq!(text.matches("serin_metric_value{").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        // A second rollout of another result gets its own series.
        let before = done.clone();
        done.history.insert(0, {
            let mut h = done.history[0].clone();
            h.result = RolloutResult::Promoted;
            h.finished_at += chrono::Duration::minutes(10);
            h
        });
        m.observe_status("shop", "web", &before, &done);
        let text = m.encode();
        assert!(
            text.contains(
                r#"serin_rollouts_total{namespace="shop",name="web",result="Promoted"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"serin_rollouts_total{namespace="shop",name="web",result="RolledBack"} 1"#
            ),
            "{text}"
        );
    }
}
