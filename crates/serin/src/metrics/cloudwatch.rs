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

use crate::api::{AwsConnection, MetricDataQuery, MetricSpec, ProviderKind};

use super::presets::{self, Kind};
use super::template::Vars;
use super::{
    ArmCounts, CanaryContext, Evidence, Measurement, MetricError, MetricProvider, ProviderMetrics,
    Sample,
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
    batchers: Mutex<HashMap<Key, mpsc::Sender<Item>>>,
    options: CloudWatchOptions,
    metrics: ProviderMetrics,
}

impl CloudWatch {
    /// A provider with `options`; batchers start on first use (inside a Tokio runtime).
    pub fn new(options: CloudWatchOptions, metrics: ProviderMetrics) -> Self {
        CloudWatch {
            batchers: Mutex::new(HashMap::new()),
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
        let key = Key {
            region: conn.region.clone(),
            role_arn: conn.role_arn.clone(),
            endpoint: conn.endpoint.clone(),
        };
        let queries = plan.queries.iter().map(to_sdk).collect();
        let series = match self.submit(key, queries, plan.start, plan.end).await {
            Ok(s) => s,
            Err(e) => return Measurement::failed(plan.shown, e),
        };
        let result = plan.sample(&series, metric);
        Measurement {
            queries: plan.shown,
            result,
        }
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
