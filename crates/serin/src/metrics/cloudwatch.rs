//! The CloudWatch provider: GetMetricData over a lookback window, batched.
//!
//! Every metric becomes one batch item (its queries and window). One batcher task per
//! region, role and endpoint collects the items that arrive together (within
//! [`CloudWatchOptions::linger`], or while a call is in flight), packs items with the same
//! window into GetMetricData calls of at most [`MAX_QUERIES_PER_CALL`] queries, rewrites
//! ids to `c{n}_<id>` (and expressions' references with them) so they are unique per call,
//! and splits the results back. Windows end on a multiple of [`CloudWatchOptions::align`]
//! (a minute by default: the period of standard-resolution metrics), so Canaries checked in
//! the same minute share a call.
//!
//! The queries and the window are planned without I/O ([`plan_queries`]). A sample is
//! stamped where its data ends: the newest datapoint's time plus its period (at most the
//! window's end), so a value whose datapoints stopped long ago is judged stale. A preset's
//! period is its whole window, so a preset is fresh whenever its window has data.
//!
//! The sequential judge's looks ([`MetricProvider::looks`], error-rate preset only) are one
//! more batch item: the preset's four sums with the look interval as their period, over the
//! grid's first to last time, so the datapoint of the period starting at look time `grid[k]`
//! is look `k` and every request lands in exactly one look. CloudWatch omits empty periods,
//! so a missing datapoint is zero; but an arm whose request sum has no datapoint over the
//! whole range is no data (wrong dimensions, or pods not yet published), never zero
//! requests, as a Prometheus selector that matches nothing is. The grid must start on a
//! multiple of its step, and the step be whole minutes. This module does not hold the grid
//! back behind CloudWatch's ingestion delay: the caller must (a period still filling would
//! be folded short, and its missing requests never counted). Latency stays on the threshold
//! judge: percentile statistics cannot count the requests slower than a bound.
//!
//! Credentials come from the standard AWS chain (IRSA in clusters), optionally through an
//! assumed role (`roleArn`, via STS). Throttling and transient failures are retried with
//! exponential backoff, a bounded number of times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_cloudwatch::config::retry::RetryConfig;
use aws_sdk_cloudwatch::config::timeout::TimeoutConfig;
use aws_sdk_cloudwatch::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_cloudwatch::operation::get_metric_data::GetMetricDataError;
use aws_sdk_cloudwatch::primitives::DateTime as AwsDateTime;
use aws_sdk_cloudwatch::types as cw;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::analysis::sequential;
use crate::api::{AwsConnection, MetricDataQuery, MetricSpec, Preset, ProviderKind};
use crate::arms::Arm;
use crate::bounded::{self, Bounded};

use super::presets::{self, Kind};
use super::template::Vars;
use super::{
    ArmCounts, CanaryContext, Evidence, LookMeasurement, Measurement, MetricError, MetricProvider,
    ProviderMetrics, Sample,
};

const PROVIDER: &str = "cloudwatch";

/// GetMetricData accepts at most this many queries per call.
pub const MAX_QUERIES_PER_CALL: usize = 500;

/// A batcher stops collecting early once this many queries wait.
const COLLECT_LIMIT: usize = 20 * MAX_QUERIES_PER_CALL;

/// Settings of the CloudWatch provider.
#[derive(Clone, Debug)]
pub struct CloudWatchOptions {
    /// Credentials to use instead of the standard AWS chain (tests, or a fixed identity).
    pub credentials: Option<SharedCredentialsProvider>,
    /// Attempts per call, the first included (throttling and transient errors are retried).
    pub max_attempts: u32,
    /// First retry backoff; it doubles (with jitter) up to 20 s.
    pub initial_backoff: Duration,
    /// Time limit of one GetMetricData call, retries included.
    pub timeout: Duration,
    /// How long a batcher waits for more metrics after the first one arrives.
    pub linger: Duration,
    /// Window ends are rounded down to a multiple of this, so checks in the same period
    /// share a call.
    pub align: Duration,
}

impl Default for CloudWatchOptions {
    fn default() -> Self {
        CloudWatchOptions {
            credentials: None,
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(30),
            linger: Duration::from_millis(100),
            align: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    region: String,
    role_arn: Option<String>,
    endpoint: Option<String>,
}

impl Key {
    fn of(conn: &AwsConnection) -> Self {
        Key {
            region: conn.region.clone(),
            role_arn: conn.role_arn.clone(),
            endpoint: conn.endpoint.clone(),
        }
    }
}

/// One metric's share of a call.
struct Item {
    queries: Vec<cw::MetricDataQuery>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    reply: oneshot::Sender<Result<HashMap<String, Series>, MetricError>>,
}

/// The datapoints of one query id, newest first.
#[derive(Clone, Debug, Default, PartialEq)]
struct Series {
    points: Vec<(DateTime<Utc>, f64)>,
    status: Option<String>,
    messages: Vec<String>,
}

/// Reads CloudWatch through one batcher per region, role and endpoint.
pub struct CloudWatch {
    /// By region, role and endpoint (as users write them, so bounded). An evicted batcher
    /// finishes what it was given and ends when its last sender goes.
    batchers: Mutex<Bounded<Key, mpsc::Sender<Item>>>,
    options: CloudWatchOptions,
    metrics: ProviderMetrics,
}

impl CloudWatch {
    /// A provider with `options`; batchers start on first use (inside a Tokio runtime).
    pub fn new(options: CloudWatchOptions, metrics: ProviderMetrics) -> Self {
        CloudWatch {
            batchers: Mutex::new(Bounded::new(bounded::CLIENTS)),
            options,
            metrics,
        }
    }

    fn sender(&self, key: &Key, replace_closed: bool) -> Result<mpsc::Sender<Item>, MetricError> {
        let mut map = self
            .batchers
            .lock()
            .map_err(|_| MetricError::Provider("the CloudWatch batcher map is poisoned".into()))?;
        if let Some(s) = map.get(key)
            && !(replace_closed && s.is_closed())
        {
            return Ok(s.clone());
        }
        let (tx, rx) = mpsc::channel(4 * MAX_QUERIES_PER_CALL);
        tokio::spawn(batcher(
            key.clone(),
            self.options.clone(),
            self.metrics.clone(),
            rx,
        ));
        map.insert(key.clone(), tx.clone());
        Ok(tx)
    }

    async fn submit(
        &self,
        key: Key,
        queries: Vec<cw::MetricDataQuery>,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<HashMap<String, Series>, MetricError> {
        let (reply, rx) = oneshot::channel();
        let mut item = Item {
            queries,
            start,
            end,
            reply,
        };
        // A batcher whose runtime has gone away is replaced once.
        for replace in [false, true] {
            let tx = self.sender(&key, replace)?;
            match tx.send(item).await {
                Ok(()) => {
                    return rx.await.unwrap_or_else(|_| {
                        Err(MetricError::Provider(
                            "the CloudWatch batcher stopped before answering".into(),
                        ))
                    });
                }
                Err(mpsc::error::SendError(back)) => item = back,
            }
        }
        Err(MetricError::Provider(
            "the CloudWatch batcher is not running".into(),
        ))
    }

    async fn run(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        conn: &AwsConnection,
        now: DateTime<Utc>,
    ) -> Measurement {
        let plan = match plan_queries(canary, metric, now, self.options.align) {
            Ok(p) => p,
            Err(failed) => return failed,
        };
        let queries = plan.queries.iter().map(to_sdk).collect();
        let series = match self
            .submit(Key::of(conn), queries, plan.start, plan.end)
            .await
        {
            Ok(s) => s,
            Err(e) => return Measurement::failed(plan.shown, e),
        };
        let result = plan.sample(&series, metric);
        Measurement {
            queries: plan.shown,
            result,
        }
    }

    /// The looks of `metric` on `grid`: one batch item, so Canaries whose looks cover the
    /// same minutes share a call, with the same client, retries, request counters and error
    /// mapping as [`CloudWatch::run`].
    async fn run_looks(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        conn: &AwsConnection,
        grid: &[DateTime<Utc>],
    ) -> LookMeasurement {
        let plan = match plan_looks(canary, metric, grid) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return LookMeasurement {
                    queries: vec![],
                    result: Ok(vec![]),
                };
            }
            Err(e) => {
                return LookMeasurement {
                    queries: vec![],
                    result: Err(e),
                };
            }
        };
        let queries = plan.queries.iter().map(to_sdk).collect();
        let result = match self
            .submit(Key::of(conn), queries, plan.start, plan.end)
            .await
        {
            Ok(series) => plan.looks(&series),
            Err(e) => Err(e),
        };
        LookMeasurement {
            queries: plan.shown,
            result,
        }
    }
}

/// The period CloudWatch keeps standard-resolution metrics at (seconds): looks are whole
/// multiples of it.
const MINUTE_SECS: i64 = 60;

/// What one sequential metric asks GetMetricData for, built without I/O.
#[derive(Clone, Debug, PartialEq)]
struct LookPlan {
    /// One line per query, for people.
    shown: Vec<String>,
    /// The preset's sums, their period the look interval.
    queries: Vec<MetricDataQuery>,
    /// The first look's start (`grid[0]`).
    start: DateTime<Utc>,
    /// The last look's end (the grid's last time; GetMetricData's end is exclusive).
    end: DateTime<Utc>,
    /// The look interval in seconds.
    step: i64,
    /// How many looks: one per grid interval.
    looks: usize,
}

/// Plans the looks of `metric` (the CloudWatch error-rate preset) of `canary` on `grid`.
/// `None` when the grid holds no interval yet. Refused, as configuration errors: any other
/// metric, a step that is not a whole number of minutes (`analysis.lookInterval`), a grid
/// that does not start on a multiple of its step (CloudWatch's periods start on whole
/// minutes, so a look starting between them would share a period with its neighbour), and
/// an unevenly spaced grid.
fn plan_looks(
    canary: &CanaryContext,
    metric: &MetricSpec,
    grid: &[DateTime<Utc>],
) -> Result<Option<LookPlan>, MetricError> {
    match metric.preset {
        Some(Preset::CloudwatchAppmeshErrorRate | Preset::CloudwatchEcsAppmeshErrorRate) => {}
        Some(p) if p.is_cloudwatch() => {
            return Err(MetricError::Config(format!(
                "preset {} cannot be judged sequentially: CloudWatch's percentile statistics cannot count the requests slower than max; set judge: Threshold on metric {}",
                p.as_str(),
                metric.name
            )));
        }
        Some(p) => {
            return Err(MetricError::Config(format!(
                "preset {} reads Prometheus, not CloudWatch; fix the provider of metric {}",
                p.as_str(),
                metric.name
            )));
        }
        None => {
            return Err(MetricError::Config(format!(
                "metric {} has no preset: the sequential judge reads presets only; set judge: Threshold",
                metric.name
            )));
        }
    }
    let (Some(&start), Some(&second), Some(&end)) = (grid.first(), grid.get(1), grid.last()) else {
        return Ok(None);
    };
    let step_ms = (second - start).num_milliseconds();
    if step_ms <= 0 || step_ms % (MINUTE_SECS * 1000) != 0 {
        return Err(MetricError::Config(format!(
            "analysis.lookInterval is {}s, but CloudWatch serves whole one-minute periods: make analysis.lookInterval a whole number of minutes (1m, the default when a sequential metric reads CloudWatch)",
            step_ms as f64 / 1000.0
        )));
    }
    let step = step_ms / 1000;
    if grid
        .windows(2)
        .any(|w| (w[1] - w[0]).num_milliseconds() != step_ms)
    {
        return Err(MetricError::Config(format!(
            "the look times are not {step}s apart throughout; looks must be evenly spaced by analysis.lookInterval"
        )));
    }
    if start.timestamp_millis().rem_euclid(step_ms) != 0 {
        return Err(MetricError::Config(format!(
            "the looks start at {}, not on a multiple of analysis.lookInterval ({step}s): CloudWatch's periods start on whole minutes, so such a look would share a period with the one before it",
            start.to_rfc3339()
        )));
    }
    let Ok(period) = i32::try_from(step) else {
        return Err(MetricError::Config(format!(
            "analysis.lookInterval is {step}s, more than a GetMetricData period can be"
        )));
    };
    let vars = Vars::new(canary, Duration::from_secs(step.unsigned_abs()));
    let Some(preset) = metric.preset else {
        return Ok(None);
    };
    let queries = presets::cloudwatch_queries(preset, period, &canary.data_plane)
        .iter()
        .map(|q| render_query(q, &vars))
        .collect::<Result<Vec<_>, _>>()
        .map_err(MetricError::Template)?;
    Ok(Some(LookPlan {
        shown: queries.iter().map(describe).collect(),
        queries,
        start,
        end,
        step,
        looks: grid.len() - 1,
    }))
}

impl LookPlan {
    /// One look per grid interval from the series GetMetricData returned for this plan.
    /// An arm whose request sum has no datapoint in the whole range is no data; a period
    /// without a datapoint, and a missing 5xx sum, count zero.
    fn looks(
        &self,
        series: &HashMap<String, Series>,
    ) -> Result<Vec<sequential::Look>, MetricError> {
        let mut arms = Vec::with_capacity(2);
        for arm in Arm::BOTH {
            let name = arm.as_str();
            let requests_id = format!("{name}_requests");
            let Some(requests) = self.per_look(series, &requests_id)? else {
                let query = self
                    .queries
                    .iter()
                    .find(|q| q.id == requests_id)
                    .map(describe)
                    .unwrap_or(requests_id);
                return Err(MetricError::NoData(format!(
                    "CloudWatch has no datapoints for the {name}'s requests from {} to {} ({query}): do its pods receive traffic, and does the CloudWatch agent publish exactly these dimensions?",
                    self.start.to_rfc3339(),
                    self.end.to_rfc3339()
                )));
            };
            let bad = self
                .per_look(series, &format!("{name}_errors"))?
                .unwrap_or_else(|| vec![0.0; self.looks]);
            arms.push(
                requests
                    .into_iter()
                    .zip(bad)
                    .map(|(requests, bad)| sequential::Counts { requests, bad })
                    .collect::<Vec<_>>(),
            );
        }
        let [primary, canary] = <[Vec<sequential::Counts>; 2]>::try_from(arms)
            .map_err(|_| MetricError::Provider("expected two arms".into()))?;
        Ok(primary
            .into_iter()
            .zip(canary)
            .map(|(primary, canary)| sequential::Look { primary, canary })
            .collect())
    }

    /// Query `id`'s sum per look, `None` when it has no datapoint at all. A datapoint
    /// outside the range belongs to another fetch and is left out; one inside it but off
    /// the look times would be split between looks, so it is an error.
    fn per_look(
        &self,
        series: &HashMap<String, Series>,
        id: &str,
    ) -> Result<Option<Vec<f64>>, MetricError> {
        let Some(s) = series.get(id) else {
            return Ok(None);
        };
        if let Some(e) = result_problem(id, s) {
            return Err(e);
        }
        if s.points.is_empty() {
            return Ok(None);
        }
        let step_ms = self.step * 1000;
        let mut out = vec![0.0; self.looks];
        for &(t, v) in &s.points {
            if t < self.start || t >= self.end {
                continue;
            }
            if !v.is_finite() {
                return Err(MetricError::NotANumber(format!(
                    "CloudWatch returned {v} for {id} at {}",
                    t.to_rfc3339()
                )));
            }
            let offset = (t - self.start).num_milliseconds();
            let k = usize::try_from(offset / step_ms).unwrap_or(usize::MAX);
            if offset % step_ms != 0 || k >= self.looks {
                return Err(MetricError::Provider(format!(
                    "CloudWatch returned a datapoint of {id} at {}, which is not the start of a {}s look from {}",
                    t.to_rfc3339(),
                    self.step,
                    self.start.to_rfc3339()
                )));
            }
            out[k] += v;
        }
        Ok(Some(out))
    }
}

/// What one metric asks GetMetricData for, built without I/O: the rendered queries, how
/// they are shown, and the window.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryPlan {
    /// One line per query, for people (`serin analyze`, messages).
    pub shown: Vec<String>,
    /// The queries with their templates rendered.
    pub queries: Vec<MetricDataQuery>,
    /// The start of the window.
    pub start: DateTime<Utc>,
    /// The end of the window: the evaluation time rounded down to the alignment.
    pub end: DateTime<Utc>,
    /// The period of queries that name none (seconds): the longest one named, else the
    /// window in whole minutes.
    pub default_period: i64,
}

/// Renders `metric`'s queries for `canary` at `now`, checks them, and computes the window
/// (ending on a multiple of `align`). An unusable metric is the failed [`Measurement`] to
/// report, with the queries shown when they could be rendered.
pub fn plan_queries(
    canary: &CanaryContext,
    metric: &MetricSpec,
    now: DateTime<Utc>,
    align: Duration,
) -> Result<QueryPlan, Measurement> {
    let window = canary.window(metric);
    let vars = Vars::new(canary, window);
    let period = i32::try_from(window.as_secs().div_ceil(60).max(1).saturating_mul(60))
        .unwrap_or(i32::MAX / 60 * 60);
    let specs: Vec<MetricDataQuery> = match (metric.preset, &metric.metric_data_queries) {
        (Some(p), _) => presets::cloudwatch_queries(p, period, &canary.data_plane),
        (None, Some(q)) => q.clone(),
        (None, None) => {
            return Err(Measurement::failed(
                vec![],
                MetricError::Config("the metric has neither a preset nor metricDataQueries".into()),
            ));
        }
    };
    let rendered = specs
        .iter()
        .map(|q| render_query(q, &vars))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Measurement::failed(vec![], MetricError::Template(e)))?;
    let shown: Vec<String> = rendered.iter().map(describe).collect();
    if metric.preset.is_none() {
        let returning: Vec<&str> = rendered
            .iter()
            .filter(|q| q.return_data != Some(false))
            .map(|q| q.id.as_str())
            .collect();
        if returning.len() != 1 {
            return Err(Measurement::failed(
                shown,
                MetricError::BadQuery(format!(
                    "{} queries return data ({}); CloudWatch treats a missing returnData as true. Set returnData: true on the one query that gives the value and false on every other",
                    returning.len(),
                    returning.join(", ")
                )),
            ));
        }
    }
    if rendered.len() > MAX_QUERIES_PER_CALL {
        return Err(Measurement::failed(
            shown,
            MetricError::BadQuery(format!(
                "{} queries are more than GetMetricData accepts ({MAX_QUERIES_PER_CALL})",
                rendered.len()
            )),
        ));
    }
    let longest_period = rendered
        .iter()
        .filter_map(|q| q.metric_stat.as_ref().map(|m| m.period).or(q.period))
        .max()
        .unwrap_or(period)
        .max(1);
    // Checked: a window or period that slipped past validation must not panic.
    let align = i64::try_from(align.as_millis()).unwrap_or(i64::MAX).max(1);
    let end_ms = now.timestamp_millis().div_euclid(align) * align;
    let lookback_ms = i64::try_from(window.as_millis())
        .unwrap_or(i64::MAX)
        .max(i64::from(longest_period) * 1000);
    let (Some(end), Some(start)) = (
        DateTime::from_timestamp_millis(end_ms),
        end_ms
            .checked_sub(lookback_ms)
            .and_then(DateTime::from_timestamp_millis),
    ) else {
        return Err(Measurement::failed(
            shown,
            MetricError::Config(
                "the evaluation time or the window is out of range (at most 24h)".into(),
            ),
        ));
    };
    Ok(QueryPlan {
        shown,
        queries: rendered,
        start,
        end,
        default_period: i64::from(longest_period),
    })
}

impl QueryPlan {
    /// The queries as a batched call sends them when this metric is item `prefix` of the
    /// call: ids, and the references to them in expressions, prefixed.
    pub fn sdk_queries(&self, prefix: &str) -> Vec<cw::MetricDataQuery> {
        let queries: Vec<cw::MetricDataQuery> = self.queries.iter().map(to_sdk).collect();
        prefixed(&queries, prefix)
    }

    /// The period of query `id`'s datapoints in seconds: its own, else (an expression)
    /// the longest of the plan.
    fn period_of(&self, id: &str) -> i64 {
        self.queries
            .iter()
            .find(|q| q.id == id)
            .and_then(|q| q.metric_stat.as_ref().map(|m| m.period).or(q.period))
            .map(i64::from)
            .unwrap_or(self.default_period)
            .max(1)
    }

    /// When the data of `id`'s datapoint at `t` ends: `t` plus its period, never after the
    /// window.
    fn ends(&self, id: &str, t: DateTime<Utc>) -> DateTime<Utc> {
        t.checked_add_signed(chrono::Duration::seconds(self.period_of(id)))
            .unwrap_or(self.end)
            .min(self.end)
    }

    /// The sample of `metric` from the series GetMetricData returned for this plan.
    fn sample(
        &self,
        series: &HashMap<String, Series>,
        metric: &MetricSpec,
    ) -> Result<Sample, MetricError> {
        let window = format!("{} to {}", self.start.to_rfc3339(), self.end.to_rfc3339());
        match metric.preset.map(presets::kind) {
            Some(Kind::ErrorRate) => {
                error_rate(series, &window, |t| self.ends("canary_requests", t))
            }
            Some(Kind::LatencyP99) => latency(series, &window, |t| self.ends("canary_p99", t)),
            None => {
                let id = self
                    .queries
                    .iter()
                    .find(|q| q.return_data != Some(false))
                    .map(|q| q.id.clone())
                    .unwrap_or_default();
                latest(series, &id, &window).map(|(t, value)| Sample {
                    value,
                    timestamp: self.ends(&id, t),
                    sample_size: None,
                    evidence: None,
                })
            }
        }
    }
}

#[async_trait]
impl MetricProvider for CloudWatch {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::CloudWatch
    }

    async fn measure(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        now: DateTime<Utc>,
    ) -> Measurement {
        match &metric.provider.cloud_watch {
            Some(conn) => self.run(canary, metric, conn, now).await,
            None => Measurement::failed(
                vec![],
                MetricError::Config("the metric's provider is not cloudWatch".into()),
            ),
        }
    }

    async fn looks(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        grid: &[DateTime<Utc>],
    ) -> LookMeasurement {
        match &metric.provider.cloud_watch {
            Some(conn) => self.run_looks(canary, metric, conn, grid).await,
            None => LookMeasurement {
                queries: vec![],
                result: Err(MetricError::Config(
                    "the metric's provider is not cloudWatch".into(),
                )),
            },
        }
    }
}

fn render_query(q: &MetricDataQuery, vars: &Vars) -> Result<MetricDataQuery, String> {
    let mut q = q.clone();
    if let Some(e) = &q.expression {
        q.expression = Some(vars.render(e)?);
    }
    if let Some(ms) = &mut q.metric_stat {
        for d in &mut ms.metric.dimensions {
            d.value = vars.render(&d.value)?;
        }
    }
    Ok(q)
}

/// A one-line description of a query, for `serin analyze` and messages.
fn describe(q: &MetricDataQuery) -> String {
    let body = match (&q.metric_stat, &q.expression) {
        (Some(ms), _) => {
            let dims: Vec<String> = ms
                .metric
                .dimensions
                .iter()
                .map(|d| format!("{}={}", d.name, d.value))
                .collect();
            format!(
                "{}/{} {{{}}} {} period {}s",
                ms.metric.namespace,
                ms.metric.metric_name,
                dims.join(", "),
                ms.stat,
                ms.period
            )
        }
        (None, Some(e)) => format!("expression {e}"),
        (None, None) => "(empty)".to_string(),
    };
    let returns = if q.return_data == Some(false) {
        ""
    } else {
        " (returnData)"
    };
    format!("{}: {body}{returns}", q.id)
}

fn to_sdk(q: &MetricDataQuery) -> cw::MetricDataQuery {
    let mut b = cw::MetricDataQuery::builder()
        .id(&q.id)
        .set_expression(q.expression.clone())
        .set_label(q.label.clone())
        .set_period(q.period)
        .return_data(q.return_data != Some(false));
    if let Some(ms) = &q.metric_stat {
        let metric = cw::Metric::builder()
            .namespace(&ms.metric.namespace)
            .metric_name(&ms.metric.metric_name)
            .set_dimensions(Some(
                ms.metric
                    .dimensions
                    .iter()
                    .map(|d| {
                        cw::Dimension::builder()
                            .name(&d.name)
                            .value(&d.value)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        b = b.metric_stat(
            cw::MetricStat::builder()
                .metric(metric)
                .period(ms.period)
                .stat(&ms.stat)
                .set_unit(ms.unit.as_deref().map(cw::StandardUnit::from))
                .build(),
        );
    }
    b.build()
}

/// Rewrites the references to `ids` in a metric-math expression to `prefix` + id. Function
/// names (followed by `(`), keywords and quoted strings are left alone.
pub fn prefix_ids(expression: &str, ids: &HashSet<&str>, prefix: &str) -> String {
    let mut out = String::with_capacity(expression.len() + 16);
    let chars: Vec<char> = expression.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
            out.extend(&chars[start..i]);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let is_call = chars[i..].iter().find(|c| !c.is_whitespace()) == Some(&'(');
            if !is_call && ids.contains(word.as_str()) {
                out.push_str(prefix);
            }
            out.push_str(&word);
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prefixed(queries: &[cw::MetricDataQuery], prefix: &str) -> Vec<cw::MetricDataQuery> {
    let ids: HashSet<&str> = queries.iter().filter_map(|q| q.id()).collect();
    queries
        .iter()
        .map(|q| {
            let mut q = q.clone();
            q.id = q.id.map(|id| format!("{prefix}{id}"));
            q.expression = q.expression.map(|e| prefix_ids(&e, &ids, prefix));
            q
        })
        .collect()
}

async fn client(key: &Key, options: &CloudWatchOptions) -> aws_sdk_cloudwatch::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(key.region.clone()));
    if let Some(endpoint) = &key.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(credentials) = &options.credentials {
        loader = loader.credentials_provider(credentials.clone());
    }
    let mut sdk = loader.load().await;
    if let Some(role) = &key.role_arn {
        let provider = aws_config::sts::AssumeRoleProvider::builder(role)
            .session_name("serin")
            .configure(&sdk)
            .build()
            .await;
        sdk = sdk
            .into_builder()
            .credentials_provider(SharedCredentialsProvider::new(provider))
            .build();
    }
    let config = aws_sdk_cloudwatch::config::Builder::from(&sdk)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(options.max_attempts.max(1))
                .with_initial_backoff(options.initial_backoff),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(options.timeout)
                .build(),
        )
        .build();
    aws_sdk_cloudwatch::Client::from_conf(config)
}

async fn batcher(
    key: Key,
    options: CloudWatchOptions,
    metrics: ProviderMetrics,
    mut rx: mpsc::Receiver<Item>,
) {
    let client = client(&key, &options).await;
    while let Some(first) = rx.recv().await {
        let mut pending = vec![first];
        let mut queries = pending[0].queries.len();
        let deadline = tokio::time::Instant::now() + options.linger;
        // Collect for the whole linger (bounded), then pack: stopping at the first 500
        // queries would leave a small remainder call for every full one.
        while queries < COLLECT_LIMIT {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(item) => {
                        queries += item.queries.len();
                        pending.push(item);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let mut windows: BTreeMap<(DateTime<Utc>, DateTime<Utc>), Vec<Item>> = BTreeMap::new();
        for item in pending {
            windows
                .entry((item.start, item.end))
                .or_default()
                .push(item);
        }
        let mut calls: Vec<Vec<Item>> = Vec::new();
        for (_, items) in windows {
            calls.extend(pack(items, |i| i.queries.len()));
        }
        futures::future::join_all(
            calls
                .into_iter()
                .map(|items| call(&client, &key, &metrics, items)),
        )
        .await;
    }
}

/// Packs items into calls of at most [`MAX_QUERIES_PER_CALL`] queries, first fit: each item
/// goes into the first call with room, so few calls are made and no item is split.
fn pack<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut calls: Vec<(usize, Vec<T>)> = Vec::new();
    for item in items {
        let n = size(&item);
        match calls
            .iter_mut()
            .find(|(used, _)| used + n <= MAX_QUERIES_PER_CALL)
        {
            Some((used, call)) => {
                *used += n;
                call.push(item);
            }
            None => calls.push((n, vec![item])),
        }
    }
    calls.into_iter().map(|(_, c)| c).collect()
}

/// One GetMetricData call (all pages) for `items`, which share a window.
async fn call(
    client: &aws_sdk_cloudwatch::Client,
    key: &Key,
    metrics: &ProviderMetrics,
    items: Vec<Item>,
) {
    let (Some(start), Some(end)) = (items.first().map(|i| i.start), items.first().map(|i| i.end))
    else {
        return;
    };
    let mut queries = Vec::new();
    for (n, item) in items.iter().enumerate() {
        queries.extend(prefixed(&item.queries, &format!("c{n}_")));
    }
    let mut by_id: HashMap<String, Series> = HashMap::new();
    let mut next_token: Option<String> = None;
    let mut failure = None;
    // Pages are bounded: 500 queries never need many.
    for _ in 0..50 {
        let result = client
            .get_metric_data()
            .set_metric_data_queries(Some(queries.clone()))
            .start_time(AwsDateTime::from_millis(start.timestamp_millis()))
            .end_time(AwsDateTime::from_millis(end.timestamp_millis()))
            .scan_by(cw::ScanBy::TimestampDescending)
            .set_next_token(next_token.take())
            .send()
            .await;
        match result {
            Ok(out) => {
                metrics.inc(PROVIDER, "success");
                for r in out.metric_data_results() {
                    let id = r.id().unwrap_or_default().to_string();
                    let s = by_id.entry(id).or_default();
                    for (t, v) in r.timestamps().iter().zip(r.values()) {
                        if let Ok(ms) = t.to_millis()
                            && let Some(t) = DateTime::from_timestamp_millis(ms)
                        {
                            s.points.push((t, *v));
                        }
                    }
                    s.status = r.status_code().map(|c| c.as_str().to_string());
                    s.messages.extend(
                        r.messages()
                            .iter()
                            .filter_map(|m| m.value().map(str::to_string)),
                    );
                }
                next_token = out.next_token().map(str::to_string);
                if next_token.is_none() {
                    break;
                }
            }
            Err(e) => {
                let err = map_error(key, &e);
                metrics.inc(PROVIDER, err.category());
                failure = Some(err);
                break;
            }
        }
    }
    for (n, item) in items.into_iter().enumerate() {
        let reply = match &failure {
            Some(e) => Err(e.clone()),
            None => {
                let prefix = format!("c{n}_");
                let mut mine = HashMap::new();
                for q in &item.queries {
                    let id = q.id().unwrap_or_default();
                    let mut s = by_id.remove(&format!("{prefix}{id}")).unwrap_or_default();
                    s.points.sort_by_key(|p| std::cmp::Reverse(p.0));
                    mine.insert(id.to_string(), s);
                }
                Ok(mine)
            }
        };
        // The metric's evaluation may have been dropped (a cancelled reconcile): fine.
        let _ = item.reply.send(reply);
    }
}

fn map_error(key: &Key, e: &SdkError<GetMetricDataError>) -> MetricError {
    let detail = DisplayErrorContext(e).to_string();
    let region = &key.region;
    match e {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("");
            let message = se.err().message().unwrap_or("");
            let status = se.raw().status().as_u16();
            match code {
                "Throttling"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                | "TooManyRequestsException" => MetricError::Throttled(format!(
                    "CloudWatch in {region} kept throttling GetMetricData after retries ({code}: {message}); the next check tries again"
                )),
                "AccessDenied"
                | "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "ExpiredToken"
                | "ExpiredTokenException"
                | "SignatureDoesNotMatch"
                | "MissingAuthenticationToken"
                | "IncompleteSignature"
                | "InvalidSignatureException"
                | "NotAuthorized" => MetricError::Auth(format!(
                    "CloudWatch in {region} refused the credentials ({code}: {message}); check the IAM role (IRSA or roleArn) allows cloudwatch:GetMetricData"
                )),
                _ if status == 401 || status == 403 => MetricError::Auth(format!(
                    "CloudWatch in {region} answered HTTP {status} ({code}: {message}); check the IAM role allows cloudwatch:GetMetricData"
                )),
                _ if status == 400 => MetricError::BadQuery(format!(
                    "CloudWatch rejected the queries ({code}: {message})"
                )),
                _ => MetricError::Provider(format!(
                    "CloudWatch in {region} failed GetMetricData (HTTP {status}, {}: {})",
                    if code.is_empty() {
                        "no error code"
                    } else {
                        code
                    },
                    if message.is_empty() {
                        detail.as_str()
                    } else {
                        message
                    }
                )),
            }
        }
        SdkError::TimeoutError(_) => MetricError::Timeout(format!(
            "CloudWatch in {region} did not answer in time: {detail}"
        )),
        SdkError::DispatchFailure(d) if d.is_timeout() => MetricError::Timeout(format!(
            "CloudWatch in {region} did not answer in time: {detail}"
        )),
        _ if detail.contains("credentials") || detail.contains("identity") => {
            MetricError::Auth(format!(
                "no usable AWS credentials for CloudWatch in {region}: {detail}. In a cluster, give Serin's ServiceAccount an IAM role (IRSA)"
            ))
        }
        SdkError::DispatchFailure(_) => MetricError::Unreachable(format!(
            "cannot reach CloudWatch in {region}{}: {detail}",
            key.endpoint
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default()
        )),
        _ => MetricError::Provider(format!("CloudWatch in {region}: {detail}")),
    }
}

fn result_problem(id: &str, s: &Series) -> Option<MetricError> {
    match s.status.as_deref() {
        Some("Forbidden") => Some(MetricError::Auth(format!(
            "CloudWatch refused query {id}: {}",
            s.messages.join("; ")
        ))),
        Some("InternalError") => Some(MetricError::Provider(format!(
            "CloudWatch failed query {id}: {}",
            s.messages.join("; ")
        ))),
        _ => None,
    }
}

fn sum(series: &HashMap<String, Series>, id: &str) -> Result<Option<f64>, MetricError> {
    let Some(s) = series.get(id) else {
        return Ok(None);
    };
    if let Some(e) = result_problem(id, s) {
        return Err(e);
    }
    if s.points.is_empty() {
        return Ok(None);
    }
    Ok(Some(s.points.iter().map(|(_, v)| v).sum()))
}

fn latest(
    series: &HashMap<String, Series>,
    id: &str,
    window: &str,
) -> Result<(DateTime<Utc>, f64), MetricError> {
    let s = series.get(id).cloned().unwrap_or_default();
    if let Some(e) = result_problem(id, &s) {
        return Err(e);
    }
    match s.points.first() {
        None => Err(MetricError::NoData(format!(
            "CloudWatch returned no datapoints for {id} from {window}: are the namespace, metric name and every dimension exactly as published? (metric math also drops points whose denominator is zero)"
        ))),
        Some(&(t, v)) if !v.is_finite() => Err(MetricError::NotANumber(format!(
            "CloudWatch returned {v} for {id} at {}",
            t.to_rfc3339()
        ))),
        Some(&(t, v)) => Ok((t, v)),
    }
}

/// The canary's error rate from both arms' sums, stamped where the canary's request data
/// ends (`ends` of its newest datapoint).
fn error_rate(
    series: &HashMap<String, Series>,
    window: &str,
    ends: impl Fn(DateTime<Utc>) -> DateTime<Utc>,
) -> Result<Sample, MetricError> {
    let arm = |name: &str| -> Result<(Option<f64>, ArmCounts), MetricError> {
        let requests = sum(series, &format!("{name}_requests"))?;
        let errors = sum(series, &format!("{name}_errors"))?;
        Ok((
            requests,
            ArmCounts {
                requests: requests.unwrap_or(0.0),
                errors: errors.unwrap_or(0.0),
            },
        ))
    };
    let (_, primary) = arm("primary")?;
    let (canary_requests, canary) = arm("canary")?;
    let newest = series
        .get("canary_requests")
        .and_then(|s| s.points.first())
        .map(|&(t, _)| t);
    match (canary_requests, newest) {
        (Some(r), Some(t)) if r > 0.0 => Ok(Sample {
            value: 100.0 * canary.errors / r,
            timestamp: ends(t),
            sample_size: Some(r.round() as u64),
            evidence: Some(Evidence { primary, canary }),
        }),
        _ => Err(MetricError::NoData(format!(
            "no requests reached the canary from {window} (CloudWatch has no envoy_http_downstream_rq_total datapoints for it): is it receiving traffic, and does the CloudWatch agent publish the dimensions Namespace and app?"
        ))),
    }
}

fn latency(
    series: &HashMap<String, Series>,
    window: &str,
    ends: impl Fn(DateTime<Utc>) -> DateTime<Utc>,
) -> Result<Sample, MetricError> {
    let requests = sum(series, "canary_requests")?.unwrap_or(0.0);
    if requests <= 0.0 {
        return Err(MetricError::NoData(format!(
            "no requests reached the canary from {window}: is it receiving traffic?"
        )));
    }
    let (t, value) = latest(series, "canary_p99", window)?;
    Ok(Sample {
        value,
        timestamp: ends(t),
        sample_size: Some(requests.round() as u64),
        evidence: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arms::{DataPlaneArm, DataPlaneArms, PerArm};

    /// A Canary in namespace `test` whose only metric is CloudWatch preset `preset`.
    fn ctx(preset: &str) -> (CanaryContext, MetricSpec) {
        let spec: crate::api::CanarySpec = serde_norway::from_str(&format!(
            r#"
targetRef: {{apiVersion: apps/v1, kind: Deployment, name: podinfo}}
service: {{port: 9898}}
router: {{appMesh: {{mesh: global}}}}
analysis:
  interval: 5m
  metrics:
    - name: e
      provider: {{cloudWatch: {{region: us-east-1}}}}
      preset: {preset}
      max: 1
"#
        ))
        .unwrap();
        let arm = |name: &str| DataPlaneArm {
            name: name.into(),
            namespace: "test".into(),
        };
        let data_plane = DataPlaneArms {
            kind: "VirtualNode",
            primary: arm("podinfo-primary"),
            canary: arm("podinfo-canary"),
            pod_apps: PerArm {
                primary: "podinfo-primary".into(),
                canary: "podinfo".into(),
            },
        };
        let metric = spec.analysis.metrics[0].clone();
        (
            CanaryContext::new("test", "podinfo", spec, data_plane),
            metric,
        )
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    /// `n + 1` grid times `step` seconds apart from `start`.
    fn grid(start: i64, step: i64, n: i64) -> Vec<DateTime<Utc>> {
        (0..=n).map(|k| at(start + k * step)).collect()
    }

    fn series(points: &[(i64, f64)]) -> Series {
        Series {
            points: points.iter().rev().map(|&(t, v)| (at(t), v)).collect(),
            status: Some("Complete".into()),
            messages: vec![],
        }
    }

    /// A multiple of two minutes (so `T0 + 60` is a whole minute but not a multiple of 120 s).
    const T0: i64 = 1_700_000_040;

    /// The plan asks for the preset's four sums with the look interval as period, from the
    /// first grid time to the last, in the Canary's namespace.
    #[test]
    fn plans_the_four_sums_per_look() {
        let (c, m) = ctx("cloudwatch-appmesh-error-rate");
        let plan = plan_looks(&c, &m, &grid(T0, 120, 3)).unwrap().unwrap();
        assert_eq!((plan.start, plan.end), (at(T0), at(T0 + 360)));
        assert_eq!((plan.step, plan.looks), (120, 3));
        let ids: Vec<&str> = plan.queries.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "primary_requests",
                "primary_errors",
                "canary_requests",
                "canary_errors"
            ]
        );
        for q in &plan.queries {
            let ms = q.metric_stat.as_ref().unwrap();
            assert_eq!((ms.period, ms.stat.as_str()), (120, "Sum"));
            assert!(
                ms.metric
                    .dimensions
                    .iter()
                    .any(|d| d.name == "Namespace" && d.value == "test")
            );
        }
        assert_eq!(plan_looks(&c, &m, &grid(T0, 60, 0)), Ok(None));
    }

    /// A look interval that is not a whole number of minutes is a configuration error that
    /// names analysis.lookInterval.
    #[test]
    fn steps_off_whole_minutes_are_refused() {
        let (c, m) = ctx("cloudwatch-appmesh-error-rate");
        for step in [10, 30, 90] {
            let err = plan_looks(&c, &m, &grid(T0, step, 4)).unwrap_err();
            assert_eq!(err.category(), "config", "{err}");
            assert!(err.to_string().contains("analysis.lookInterval"), "{err}");
        }
    }

    /// Looks that start between two minutes (or off a multiple of a longer step) are
    /// refused: CloudWatch cannot split a period between two looks.
    #[test]
    fn grids_off_period_starts_are_refused() {
        let (c, m) = ctx("cloudwatch-appmesh-error-rate");
        for (start, step) in [(T0 + 17, 60), (T0 + 60, 120)] {
            let err = plan_looks(&c, &m, &grid(start, step, 3)).unwrap_err();
            assert_eq!(err.category(), "config", "{err}");
        }
    }

    /// The latency preset stays on the threshold judge.
    #[test]
    fn latency_is_not_sequential() {
        let (c, m) = ctx("cloudwatch-appmesh-latency-p99");
        let err = plan_looks(&c, &m, &grid(T0, 60, 2)).unwrap_err();
        assert_eq!(err.category(), "config", "{err}");
        assert!(err.to_string().contains("judge: Threshold"), "{err}");
    }

    /// Each datapoint is the look that starts at its time; a period without a datapoint
    /// and a missing 5xx sum count zero; datapoints outside the range are left out.
    #[test]
    fn datapoints_map_to_looks() {
        let (c, m) = ctx("cloudwatch-appmesh-error-rate");
        let plan = plan_looks(&c, &m, &grid(T0, 60, 3)).unwrap().unwrap();
        let got: HashMap<String, Series> = [
            (
                "primary_requests",
                series(&[
                    (T0 - 60, 999.0),
                    (T0, 100.0),
                    (T0 + 60, 110.0),
                    (T0 + 120, 120.0),
                ]),
            ),
            ("primary_errors", series(&[(T0 + 60, 2.0)])),
            (
                "canary_requests",
                series(&[(T0, 10.0), (T0 + 120, 12.0), (T0 + 180, 999.0)]),
            ),
        ]
        .into_iter()
        .map(|(id, s)| (id.to_string(), s))
        .collect();
        let looks = plan.looks(&got).unwrap();
        let c = |requests, bad| sequential::Counts { requests, bad };
        assert_eq!(
            looks,
            vec![
                sequential::Look {
                    primary: c(100.0, 0.0),
                    canary: c(10.0, 0.0)
                },
                sequential::Look {
                    primary: c(110.0, 2.0),
                    canary: c(0.0, 0.0)
                },
                sequential::Look {
                    primary: c(120.0, 0.0),
                    canary: c(12.0, 0.0)
                },
            ]
        );
    }

    /// An arm whose request sum has no datapoint in the whole range is no data, naming the
    /// arm; so is the case where neither arm has any.
    #[test]
    fn an_arm_without_datapoints_is_no_data() {
        let (c, m) = ctx("cloudwatch-appmesh-error-rate");
        let plan = plan_looks(&c, &m, &grid(T0, 60, 2)).unwrap().unwrap();
        let only_primary: HashMap<String, Series> =
            [("primary_requests".to_string(), series(&[(T0, 5.0)]))]
                .into_iter()
                .collect();
        let err = plan.looks(&only_primary).unwrap_err();
        assert_eq!(err.category(), "no-data", "{err}");
        assert!(err.to_string().contains("canary's requests"), "{err}");
        assert!(err.to_string().contains("app=podinfo}"), "{err}");
        let err = plan.looks(&HashMap::new()).unwrap_err();
        assert_eq!(err.category(), "no-data", "{err}");
    }

    /// A datapoint inside the range but off the look times is an error, never split or
    /// moved to a neighbouring look.
    #[test]
    fn off_grid_datapoints_are_an_error() {
        let (c, m) = ctx("cloudwatch-appmesh-error-rate");
        let plan = plan_looks(&c, &m, &grid(T0, 120, 2)).unwrap().unwrap();
        let got: HashMap<String, Series> = ["primary_requests", "canary_requests"]
            .into_iter()
            .map(|id| (id.to_string(), series(&[(T0 + 60, 1.0)])))
            .collect();
        assert_eq!(plan.looks(&got).unwrap_err().category(), "provider");
    }

    /// Ids in expressions get the prefix; functions, other words and strings do not.
    #[test]
    fn prefixes_references() {
        let ids: HashSet<&str> = ["errors", "requests", "m1"].into_iter().collect();
        assert_eq!(
            prefix_ids("100 * errors / requests", &ids, "c3_"),
            "100 * c3_errors / c3_requests"
        );
        assert_eq!(
            prefix_ids("SUM(METRICS()) + FILL(m1, 0) + m10", &ids, "c0_"),
            "SUM(METRICS()) + FILL(c0_m1, 0) + m10"
        );
        assert_eq!(
            prefix_ids(r#"SEARCH('{AWS/EC2} m1', 'Sum', 60)"#, &ids, "c0_"),
            r#"SEARCH('{AWS/EC2} m1', 'Sum', 60)"#
        );
        assert_eq!(prefix_ids("m1", &ids, "c9_"), "c9_m1");
    }

    /// First-fit packing fills calls to 500 queries and never splits an item.
    #[test]
    fn packs_first_fit() {
        let items: Vec<usize> = (0..100).flat_map(|_| [4, 2]).collect();
        let calls = pack(items, |n| *n);
        let sizes: Vec<usize> = calls.iter().map(|c| c.iter().sum()).collect();
        assert_eq!(sizes, vec![500, 100]);
        assert_eq!(pack(vec![600usize], |n| *n).len(), 1);
    }

    /// Prefixing a batch item rewrites ids and the references between them.
    #[test]
    fn prefixes_queries() {
        let qs = vec![
            cw::MetricDataQuery::builder()
                .id("a")
                .return_data(false)
                .build(),
            cw::MetricDataQuery::builder()
                .id("b")
                .expression("a * 2")
                .build(),
        ];
        let p = prefixed(&qs, "c1_");
        assert_eq!(p[0].id(), Some("c1_a"));
        assert_eq!(p[1].id(), Some("c1_b"));
        assert_eq!(p[1].expression(), Some("c1_a * 2"));
    }
}
