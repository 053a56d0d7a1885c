//! Metric providers: every metric of a Canary becomes a trustworthy [`Sample`] or a typed
//! [`MetricError`] that says what to check.
//!
//! One trait, [`MetricProvider`], with two implementations: [`Prometheus`] (instant queries
//! through `prometheus-http-query`) and [`CloudWatch`] (GetMetricData through
//! `aws-sdk-cloudwatch`, batched across Canaries per region and credentials).
//! [`standard_providers`] lists them, one line each: a new provider is one new file plus one
//! line there (and its field in `provider`). The [`Evaluator`] holds one of each, is shared
//! by every reconcile (`Arc<Evaluator>`), and turns a Canary's metrics at a time `now` into
//! the [`MetricObservation`]s that `rollout::decide` consumes.
//!
//! Series are named from the arms the Canary's router resolved ([`CanaryContext::data_plane`]);
//! this module does not know the routers.
//!
//! Queries are templated ([`template`]) and the built-in [`presets`] compute error rates in
//! Serin from per-arm request and error counts, which they keep as [`Evidence`].
//!
//! This module does not read the clock (callers pass `now`), does not talk to Kubernetes
//! (Secrets come through [`SecretLookup`], which the controller implements), and does not
//! judge values: `analysis::judge` does.

mod cloudwatch;
pub mod presets;
mod prometheus;
mod prometheus_batch;
mod telemetry;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::Instrument as _;

use crate::analysis::{LookBatch, MetricLooks, MetricObservation, Outcome, sequential};
use crate::api::{Canary, CanarySpec, MetricSpec, ProviderKind};
use crate::arms::{ArmNames, DataPlaneArms};

pub use cloudwatch::{
    CloudWatch, CloudWatchOptions, MAX_QUERIES_PER_CALL, QueryPlan, plan_queries, prefix_ids,
};
pub use prometheus::{Prometheus, PrometheusOptions, freshness_query, promql_selectors};
pub use telemetry::ProviderMetrics;

/// The names a Canary's queries refer to.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryContext {
    /// The Canary's namespace.
    pub namespace: String,
    /// The Canary's name.
    pub name: String,
    /// The Canary's spec.
    pub spec: CanarySpec,
    /// The arms' names from the spec: the `{{ target }}`, `{{ primary }}`, `{{ canary }}`
    /// and `{{ service }}` of hand-written queries.
    pub names: ArmNames,
    /// Where the router sends each arm's traffic: the only names presets build series
    /// selectors from.
    pub data_plane: DataPlaneArms,
}

impl CanaryContext {
    /// The context of the Canary `namespace/name` with `spec`, whose router resolved its
    /// arms as `data_plane` (the controller asks the router; see `router::data_plane_arms`).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        spec: CanarySpec,
        data_plane: DataPlaneArms,
    ) -> Self {
        let name = name.into();
        CanaryContext {
            namespace: namespace.into(),
            names: ArmNames::from_spec(&name, &spec),
            name,
            spec,
            data_plane,
        }
    }

    /// The context of a Canary object (namespace `default` when unset).
    pub fn of(canary: &Canary, data_plane: DataPlaneArms) -> Self {
        Self::new(
            canary
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            canary.metadata.name.clone().unwrap_or_default(),
            canary.spec.clone(),
            data_plane,
        )
    }

    /// The query window of `metric`: `metric.window`, else `analysis.interval`.
    pub fn window(&self, metric: &MetricSpec) -> Duration {
        let d = metric.window.unwrap_or(self.spec.analysis.interval);
        if d.is_negative() {
            return Duration::from_secs(1);
        }
        let d: Duration = d.into();
        d.max(Duration::from_secs(1))
    }
}

/// A number a provider measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The value the metric's bounds apply to.
    pub value: f64,
    /// The time the data behind the value reaches, never after the evaluation time:
    /// Prometheus, the newest sample of the judged series plus its sampling interval;
    /// CloudWatch, the newest datapoint's time plus its period.
    pub timestamp: DateTime<Utc>,
    /// How many requests (or samples) it summarises, when known.
    pub sample_size: Option<u64>,
    /// Per-arm counts behind an error rate, for comparative judges.
    pub evidence: Option<Evidence>,
}

/// Request and error counts of both arms over a metric's window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evidence {
    /// The stable arm.
    pub primary: ArmCounts,
    /// The new arm.
    pub canary: ArmCounts,
}

/// Requests and errors of one arm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArmCounts {
    /// Requests in the window (Prometheus' `increase` may make it fractional).
    pub requests: f64,
    /// Requests that failed (5xx) in the window.
    pub errors: f64,
}

/// Why a metric has no usable value. Every message is one line a user can act on.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MetricError {
    /// The query matched nothing, or the window had no requests.
    #[error("{0}")]
    NoData(String),
    /// The query returned NaN or an infinity.
    #[error("{0}")]
    NotANumber(String),
    /// Several series came back where one number was expected.
    #[error("{message}")]
    MultipleSeries {
        /// How many series came back.
        count: usize,
        /// What to do about it.
        message: String,
    },
    /// The provider did not answer within the timeout.
    #[error("{0}")]
    Timeout(String),
    /// The provider could not be reached (connection refused, DNS...).
    #[error("{0}")]
    Unreachable(String),
    /// Credentials are missing, invalid or lack permission.
    #[error("{0}")]
    Auth(String),
    /// The provider rejected the query.
    #[error("{0}")]
    BadQuery(String),
    /// The provider kept throttling after bounded retries.
    #[error("{0}")]
    Throttled(String),
    /// The query template could not be rendered.
    #[error("{0}")]
    Template(String),
    /// The metric's provider settings are unusable.
    #[error("{0}")]
    Config(String),
    /// Any other provider failure.
    #[error("{0}")]
    Provider(String),
}

impl MetricError {
    /// A short constant category, used as a metric label and in `Outcome::Error`.
    pub fn category(&self) -> &'static str {
        match self {
            MetricError::NoData(_) => "no-data",
            MetricError::NotANumber(_) => "nan",
            MetricError::MultipleSeries { .. } => "multiple-series",
            MetricError::Timeout(_) => "timeout",
            MetricError::Unreachable(_) => "unreachable",
            MetricError::Auth(_) => "auth",
            MetricError::BadQuery(_) => "bad-query",
            MetricError::Throttled(_) => "throttled",
            MetricError::Template(_) => "template",
            MetricError::Config(_) => "config",
            MetricError::Provider(_) => "provider",
        }
    }

    /// The outcome the rollout state machine sees: no data and NaN are `NoData`, the rest
    /// `Error`. Neither is ever a pass.
    pub fn outcome(&self) -> Outcome {
        match self {
            MetricError::NoData(reason) | MetricError::NotANumber(reason) => Outcome::NoData {
                reason: reason.clone(),
            },
            other => Outcome::Error {
                category: other.category(),
                message: other.to_string(),
            },
        }
    }
}

/// What a provider returns for one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// The queries as sent (rendered), for people debugging them.
    pub queries: Vec<String>,
    /// The sample, or why there is none.
    pub result: Result<Sample, MetricError>,
}

impl Measurement {
    /// A failure before any query was sent.
    pub fn failed(queries: Vec<String>, error: MetricError) -> Self {
        Measurement {
            queries,
            result: Err(error),
        }
    }
}

/// A source of metrics.
#[async_trait]
pub trait MetricProvider: Send + Sync {
    /// The provider's name, as in `serin_provider_requests_total{provider}`.
    fn name(&self) -> &'static str;

    /// The `provider` field this provider serves.
    fn kind(&self) -> ProviderKind;

    /// Runs `metric` of `canary` with evaluation time `now`.
    async fn measure(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        now: DateTime<Utc>,
    ) -> Measurement;

    /// The sequential judge's looks of `metric` (a preset) on `grid` (see
    /// [`crate::analysis::look_grid`]): one [`sequential::Look`] per interval between
    /// consecutive grid times, each the increase of the arms' cumulative counters.
    async fn looks(
        &self,
        _canary: &CanaryContext,
        metric: &MetricSpec,
        _grid: &[DateTime<Utc>],
    ) -> LookMeasurement {
        LookMeasurement {
            queries: vec![],
            result: Err(MetricError::Config(format!(
                "the {} provider does not serve the sequential judge: set judge: Threshold on metric {}",
                self.name(),
                metric.name
            ))),
        }
    }
}

/// What a provider returns for one sequential metric's looks.
#[derive(Clone, Debug, PartialEq)]
pub struct LookMeasurement {
    /// The queries as sent.
    pub queries: Vec<String>,
    /// One look per grid interval, or why there are none.
    pub result: Result<Vec<sequential::Look>, MetricError>,
}

/// A series of a range query: (unix seconds, value) points in time order.
pub type Points = Vec<(i64, f64)>;

/// The increases of the sum of cumulative counters `series` between consecutive `grid`
/// times (unix seconds), one per interval. Per series: a value lower than the one before is
/// a counter reset (the series restarted from zero, so its whole new value is new); a series
/// absent at the earlier time and present at the later one is new since then (a new pod, or
/// the first request with a new response code), so its whole value counts too; a series
/// absent at the later time contributes nothing.
pub fn increases(series: &[Points], grid: &[i64]) -> Vec<f64> {
    let mut out = vec![0.0; grid.len().saturating_sub(1)];
    for points in series {
        let at = |t: i64| {
            points
                .binary_search_by_key(&t, |p| p.0)
                .ok()
                .map(|i| points[i].1)
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        for (k, pair) in grid.windows(2).enumerate() {
            out[k] += match (at(pair[0]), at(pair[1])) {
                (Some(before), Some(after)) if after >= before => after - before,
                (_, Some(after)) => after,
                (_, None) => 0.0,
            };
        }
    }
    out
}

/// Reads a Secret's data for a provider's credentials. The controller implements it with its
/// Kubernetes client (and may cache); `serin analyze` and tests use simpler ones.
#[async_trait]
pub trait SecretLookup: Send + Sync {
    /// The data of Secret `namespace/name`; `Err` carries a message a user can act on (for
    /// example "secret not found" or "forbidden").
    async fn secret_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, String>;
}

/// A [`SecretLookup`] over a fixed map `namespace/name → data`.
#[derive(Clone, Debug, Default)]
pub struct StaticSecrets {
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl StaticSecrets {
    /// No secrets at all: every lookup fails.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds Secret `namespace/name` with `data`.
    pub fn with(
        mut self,
        namespace: &str,
        name: &str,
        data: impl IntoIterator<Item = (impl Into<String>, impl Into<Vec<u8>>)>,
    ) -> Self {
        self.secrets.insert(
            format!("{namespace}/{name}"),
            data.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }
}

#[async_trait]
impl SecretLookup for StaticSecrets {
    async fn secret_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, String> {
        self.secrets
            .get(&format!("{namespace}/{name}"))
            .cloned()
            .ok_or_else(|| format!("secret {namespace}/{name} not found"))
    }
}

/// One metric's evaluation, with what was sent.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricEvaluation {
    /// `spec.analysis.metrics[].name`.
    pub name: String,
    /// `prometheus` or `cloudwatch`.
    pub provider: &'static str,
    /// The queries as sent.
    pub queries: Vec<String>,
    /// The sample, or why there is none.
    pub result: Result<Sample, MetricError>,
    /// The evaluation time.
    pub at: DateTime<Utc>,
}

impl MetricEvaluation {
    /// The outcome for `analysis::judge`.
    pub fn outcome(&self) -> Outcome {
        match &self.result {
            Ok(s) if !s.value.is_finite() => Outcome::NoData {
                reason: format!("the value is {}", s.value),
            },
            Ok(s) => Outcome::Value {
                value: s.value,
                sample_size: s.sample_size,
            },
            Err(e) => e.outcome(),
        }
    }

    /// The observation for `rollout::decide`, stamped with the time its data reaches
    /// (the sample's timestamp), so that old data is judged stale; without a sample, the
    /// evaluation time.
    pub fn observation(&self) -> MetricObservation {
        MetricObservation {
            name: self.name.clone(),
            outcome: self.outcome(),
            at: match &self.result {
                Ok(s) => s.timestamp,
                Err(_) => self.at,
            },
        }
    }
}

/// Settings of an [`Evaluator`].
#[derive(Clone, Debug, Default)]
pub struct EvaluatorConfig {
    /// Prometheus settings.
    pub prometheus: PrometheusOptions,
    /// CloudWatch settings.
    pub cloudwatch: CloudWatchOptions,
}

/// The real providers, one line each, sharing the request counters `metrics`.
pub fn standard_providers(
    secrets: Arc<dyn SecretLookup>,
    config: EvaluatorConfig,
    metrics: &ProviderMetrics,
) -> Result<Vec<Arc<dyn MetricProvider>>, MetricError> {
    Ok(vec![
        Arc::new(Prometheus::new(
            secrets,
            config.prometheus,
            metrics.clone(),
        )?),
        Arc::new(CloudWatch::new(config.cloudwatch, metrics.clone())),
    ])
}

/// Evaluates Canaries' metrics. Build one at start-up and share it (`Arc<Evaluator>`): it
/// holds one HTTP client per Prometheus address and one CloudWatch batcher per region and
/// credentials.
pub struct Evaluator {
    providers: Vec<Arc<dyn MetricProvider>>,
    metrics: ProviderMetrics,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator").finish_non_exhaustive()
    }
}

impl Evaluator {
    /// The [`standard_providers`]. Must be called inside a Tokio runtime only when
    /// CloudWatch is first used (its batchers are spawned lazily).
    pub fn new(
        secrets: Arc<dyn SecretLookup>,
        config: EvaluatorConfig,
    ) -> Result<Self, MetricError> {
        let metrics = ProviderMetrics::default();
        let providers = standard_providers(secrets, config, &metrics)?;
        Ok(Evaluator { providers, metrics })
    }

    /// An evaluator over given providers (fakes in tests), at most one per kind.
    pub fn with_providers(
        providers: Vec<Arc<dyn MetricProvider>>,
        metrics: ProviderMetrics,
    ) -> Self {
        Evaluator { providers, metrics }
    }

    /// The request counters (`serin_provider_requests_total`), to register in the
    /// operator's registry.
    pub fn metrics(&self) -> &ProviderMetrics {
        &self.metrics
    }

    /// Every threshold-judged metric of `canary` evaluated at `now`, as `rollout::decide`
    /// wants them (sequential metrics are read by [`Evaluator::looks`]).
    pub async fn evaluate(
        &self,
        canary: &CanaryContext,
        now: DateTime<Utc>,
    ) -> Vec<MetricObservation> {
        let futures = canary
            .spec
            .analysis
            .metrics
            .iter()
            .filter(|m| m.is_read_at_checks())
            .map(|metric| self.evaluate_metric(canary, metric, now));
        futures::future::join_all(futures)
            .await
            .iter()
            .map(MetricEvaluation::observation)
            .collect()
    }

    /// Every metric of `canary` evaluated at `now`, with the queries sent and the samples.
    /// Metrics run concurrently, so a Canary's CloudWatch metrics share one batch.
    pub async fn evaluate_detailed(
        &self,
        canary: &CanaryContext,
        now: DateTime<Utc>,
    ) -> Vec<MetricEvaluation> {
        let futures = canary
            .spec
            .analysis
            .metrics
            .iter()
            .map(|metric| self.evaluate_metric(canary, metric, now));
        futures::future::join_all(futures).await
    }

    /// The looks of every sequential metric of `canary` from `from`, every `step`, up to
    /// `now` (all metrics on the same grid), run concurrently.
    pub async fn looks(
        &self,
        canary: &CanaryContext,
        from: DateTime<Utc>,
        step: Duration,
        now: DateTime<Utc>,
    ) -> LookBatch {
        let grid = crate::analysis::look_grid(from, step, now);
        let through = grid.last().copied().unwrap_or(from);
        let futures = canary
            .spec
            .analysis
            .metrics
            .iter()
            .filter(|m| m.is_sequential())
            .map(|metric| {
                let grid = &grid;
                async move {
                    let kind = metric.provider.kind();
                    let result = match self.providers.iter().find(|p| Some(p.kind()) == kind) {
                        None => Err(MetricError::Config(format!(
                            "no provider serves metric {}",
                            metric.name
                        ))),
                        Some(provider) => {
                            let span = tracing::info_span!(
                                "looks",
                                provider = provider.name(),
                                metric = %metric.name,
                                looks = grid.len().saturating_sub(1)
                            );
                            provider
                                .looks(canary, metric, grid)
                                .instrument(span)
                                .await
                                .result
                        }
                    };
                    MetricLooks {
                        name: metric.name.clone(),
                        result: result.map_err(|e| e.outcome()),
                    }
                }
            });
        LookBatch {
            from: grid.first().copied().unwrap_or(from),
            through,
            metrics: futures::future::join_all(futures).await,
        }
    }

    /// One metric of `canary` at `now`.
    pub async fn evaluate_metric(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        now: DateTime<Utc>,
    ) -> MetricEvaluation {
        let kind = metric.provider.kind();
        let Some(provider) = self.providers.iter().find(|p| Some(p.kind()) == kind) else {
            let message = match kind {
                None => "set exactly one of provider.prometheus or provider.cloudWatch".into(),
                Some(k) => format!("no {k:?} provider is configured in this operator"),
            };
            return MetricEvaluation {
                name: metric.name.clone(),
                provider: "none",
                queries: vec![],
                result: Err(MetricError::Config(message)),
                at: now,
            };
        };
        let span =
            tracing::info_span!("measure", provider = provider.name(), metric = %metric.name);
        let m = provider.measure(canary, metric, now).instrument(span).await;
        MetricEvaluation {
            name: metric.name.clone(),
            provider: provider.name(),
            queries: m.queries,
            result: m.result,
            at: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Increases between grid times count each request once: a steady counter by its
    /// differences, a reset by its new value, a series that appears by its whole value, one
    /// that disappears by nothing, and garbage (NaN, negative) not at all.
    #[test]
    fn increases_of_cumulative_counters() {
        let grid = [0, 10, 20, 30];
        let steady: Points = vec![(0, 100.0), (10, 110.0), (20, 125.0), (30, 125.0)];
        let reset: Points = vec![(0, 500.0), (10, 520.0), (20, 3.0), (30, 9.0)];
        let appears: Points = vec![(20, 2.0), (30, 4.0)];
        let vanishes: Points = vec![(0, 7.0), (10, 8.0)];
        let garbage: Points = vec![(0, f64::NAN), (10, -4.0), (20, 1.0), (30, 1.0)];
        assert_eq!(
            increases(std::slice::from_ref(&steady), &grid),
            vec![10.0, 15.0, 0.0]
        );
        assert_eq!(increases(&[reset], &grid), vec![20.0, 3.0, 6.0]);
        assert_eq!(increases(&[appears], &grid), vec![0.0, 2.0, 2.0]);
        assert_eq!(increases(&[vanishes], &grid), vec![1.0, 0.0, 0.0]);
        assert_eq!(increases(&[garbage], &grid), vec![0.0, 1.0, 0.0]);
        assert_eq!(
            increases(&[steady.clone(), steady], &grid),
            vec![20.0, 30.0, 0.0],
            "series add up"
        );
        assert!(increases(&[], &[0]).is_empty());
    }
}
