//! Checks of preset metrics batched across Canaries: the checks that arrive within
//! [`PrometheusOptions::linger`](super::PrometheusOptions::linger) and share a Prometheus
//! (address, headers and credentials, timeout), a window and a preset kind go out as one
//! set of queries, whatever their data plane: two instant queries `sum by
//! (envoy_cluster_name) (...)` over the union of every arm's cluster regex, and one
//! freshness range query `max by (envoy_cluster_name) (timestamp(...))`. Each Canary's
//! arms are then summed from the series their own regex matches, so every Canary gets
//! exactly what its own queries would have answered (the latency preset's
//! `histogram_quantile` is computed here, as Prometheus computes it, from the summed
//! buckets). Three requests serve up to [`MAX_BATCH`] Canaries instead of five (error
//! rate) or three (latency) each.
//!
//! The batch is evaluated at the latest evaluation time of its checks: never before a
//! check was due, so a result is never judged stale for the batching; at most the linger
//! later than the earliest.
//!
//! The sequential judge's looks are batched the same way ([`Batches::looks`]): one range
//! query per counter over the union of the arms' regexes, from the earliest grid start to
//! the latest grid end, at a step that hits every Canary's grid (the greatest common divisor
//! of the grids' steps and offsets, one second at worst). A range query's value at a time
//! does not depend on the step, so each Canary keeps its arms' series at its own grid
//! times and gets what its own range queries return. Grids longer than [`MAX_LOOK_SPAN`]
//! (a Canary catching up) are fetched alone, so a batch stays a few hundred points per
//! series.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_http_query::Client;
use prometheus_http_query::response::Data;
use reqwest::header::{HeaderName, HeaderValue};
use tokio::sync::oneshot;

use super::presets::{self, Kind};
use super::prometheus::{Instant, PROVIDER, fresh_until, map_error, newest_two};
use super::template::promql_duration;
use super::{MetricError, ProviderMetrics};

/// Checks at most in one batch: the union regex of their arms stays a few tens of KiB.
pub const MAX_BATCH: usize = 100;
/// Seconds a look grid may span and still be batched.
pub const MAX_LOOK_SPAN: i64 = 300;

/// What the checks of one batch share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// `provider.prometheus.address`.
    pub address: String,
    /// The headers sent, credentials included: only checks that may read the same data
    /// share a query.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The query timeout.
    pub timeout: Duration,
    /// The metric's window (`{{ interval }}`).
    pub window: Duration,
    /// The preset's kind.
    pub kind: Kind,
}

/// What a batch answers one check: the values its own queries would have returned, in
/// the order of `presets::promql_error_rate` (requests and errors of the primary, then of
/// the canary) or `presets::promql_latency` (p99, request count), and the newest sample
/// time of its judged series.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The instant values, each `None` when no series matched.
    pub values: Vec<Instant>,
    /// Until when the judged series' data stands ([`fresh_until`]); `None` when no series
    /// has a sample in the window.
    pub newest: Option<DateTime<Utc>>,
    /// The evaluation time of the batch.
    pub at: DateTime<Utc>,
}

struct Item {
    /// The arms: primary then canary for an error rate, the canary alone for a latency.
    /// The last one's freshness is judged.
    arms: Vec<ArmPattern>,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<Answer, MetricError>>,
}

/// Items waiting for their batch to go out, by what they share. An entry lives for one
/// linger at most, so the map holds only keys in use.
struct Collector<I> {
    pending: Arc<Mutex<HashMap<BatchKey, Pending<I>>>>,
}

/// A batch being collected: its id (its timer's) and its items.
type Pending<I> = (u64, Vec<I>);

impl<I> Default for Collector<I> {
    fn default() -> Self {
        Collector {
            pending: Arc::default(),
        }
    }
}

impl<I: Send + 'static> Collector<I> {
    /// Adds `item` to the batch of `key`, which `send` sends: after `linger` from its first
    /// item, or at once when it holds [`MAX_BATCH`] items.
    fn add<F, Fut>(&self, id: u64, key: &BatchKey, item: I, linger: Duration, send: F)
    where
        F: FnOnce(Vec<I>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let first = !pending.contains_key(key);
        let (id, items) = pending
            .entry(key.clone())
            .or_insert_with(|| (id, Vec::new()));
        items.push(item);
        if items.len() >= MAX_BATCH {
            let items = pending.remove(key).map(|p| p.1).unwrap_or_default();
            tokio::spawn(send(items));
        } else if first {
            let (map, key, id) = (self.pending.clone(), key.clone(), *id);
            tokio::spawn(async move {
                tokio::time::sleep(linger).await;
                // Unless it went out full meanwhile (and a new batch took its key).
                let due = {
                    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                    match map.get(&key) {
                        Some((i, _)) if *i == id => map.remove(&key).map(|p| p.1),
                        _ => None,
                    }
                };
                if let Some(items) = due {
                    send(items).await;
                }
            });
        }
    }
}

/// The batches being collected.
#[derive(Default)]
pub struct Batches {
    checks: Collector<Item>,
    looks: Collector<LookItem>,
    next: AtomicU64,
}

/// One Canary's looks in a batch.
struct LookItem {
    /// The arms, primary then canary.
    arms: Vec<ArmPattern>,
    /// The grid (unix seconds).
    grid: Vec<i64>,
    reply: oneshot::Sender<Result<Vec<Matrix>, MetricError>>,
}

/// Whether a grid is short enough to share a batch ([`MAX_LOOK_SPAN`]).
pub fn batchable_grid(grid: &[i64]) -> bool {
    match (grid.first(), grid.last()) {
        (Some(a), Some(b)) => b - a <= MAX_LOOK_SPAN && grid.len() >= 2,
        _ => false,
    }
}

impl Batches {
    /// Adds a check to the batch of `key` (starting one, which goes out after `linger` or
    /// once it holds [`MAX_BATCH`] checks) and waits for its answer.
    pub async fn submit(
        &self,
        key: BatchKey,
        client: Client,
        metrics: ProviderMetrics,
        linger: Duration,
        arms: Vec<ArmPattern>,
        now: DateTime<Utc>,
    ) -> Result<Answer, MetricError> {
        let (reply, rx) = oneshot::channel();
        let item = Item { arms, now, reply };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let batch = key.clone();
        self.checks
            .add(id, &key, item, linger, move |items| async move {
                run(&client, &batch, &metrics, items).await
            });
        rx.await.unwrap_or_else(|_| {
            Err(MetricError::Provider(
                "the batch of Prometheus queries stopped before answering".into(),
            ))
        })
    }
}

impl Batches {
    /// Adds a Canary's looks on `grid` (see [`batchable_grid`]) to the batch of `key`
    /// (whose window is unused) and waits for its answer: for each arm, primary then
    /// canary, the series of each of the kind's counters
    /// ([`presets::promql_counters_batched`]) at the grid's times, as that arm's own
    /// range queries return them.
    pub async fn looks(
        &self,
        key: BatchKey,
        client: Client,
        metrics: ProviderMetrics,
        linger: Duration,
        arms: Vec<ArmPattern>,
        grid: Vec<i64>,
    ) -> Result<Vec<Matrix>, MetricError> {
        let (reply, rx) = oneshot::channel();
        let item = LookItem { arms, grid, reply };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let batch = key.clone();
        self.looks
            .add(id, &key, item, linger, move |items| async move {
                run_looks(&client, &batch, &metrics, items).await
            });
        rx.await.unwrap_or_else(|_| {
            Err(MetricError::Provider(
                "the batch of Prometheus range queries stopped before answering".into(),
            ))
        })
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The range every grid of a batch falls on: (start, end, step) in seconds.
fn look_range(grids: &[&[i64]]) -> Option<(i64, i64, i64)> {
    let start = grids.iter().filter_map(|g| g.first()).min().copied()?;
    let end = grids.iter().filter_map(|g| g.last()).max().copied()?;
    let mut step = 0;
    for g in grids {
        for t in g.iter() {
            step = gcd(step, t - start);
        }
    }
    Some((start, end, step.max(1)))
}

async fn run_looks(
    client: &Client,
    key: &BatchKey,
    metrics: &ProviderMetrics,
    items: Vec<LookItem>,
) {
    let grids: Vec<&[i64]> = items.iter().map(|i| i.grid.as_slice()).collect();
    let Some((start, end, step)) = look_range(&grids) else {
        return;
    };
    let all = union(
        items
            .iter()
            .flat_map(|i| i.arms.iter().map(|a| a.regex.as_str())),
    );
    let queries = presets::promql_counters_batched(key.kind, &all);
    let n = items.len();
    let answers = futures::future::join_all(
        queries
            .iter()
            .map(|q| range_on(client, key, metrics, q, (start, end, step), n)),
    )
    .await;
    let answers: Result<Vec<Matrix>, MetricError> = answers.into_iter().collect();
    let answers = match answers {
        Ok(a) => a,
        Err(e) => {
            for item in items {
                let _ = item.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let indexes: Vec<Index<'_>> = answers
        .iter()
        .map(|m| Index::new(m.iter().map(|(l, _)| cluster_of(l)).collect()))
        .collect();
    for item in items {
        let reply = Matcher::all(&item.arms).map(|matchers| {
            let times: BTreeSet<i64> = item.grid.iter().copied().collect();
            let mut out = Vec::new();
            for m in &matchers {
                for (answer, index) in answers.iter().zip(&indexes) {
                    out.push(
                        index
                            .matching(m)
                            .into_iter()
                            .map(|i| {
                                let (labels, points) = &answer[i];
                                let mine: Vec<(f64, f64)> = points
                                    .iter()
                                    .copied()
                                    .filter(|(t, _)| times.contains(&(t.round() as i64)))
                                    .collect();
                                (labels.clone(), mine)
                            })
                            .filter(|(_, points)| !points.is_empty())
                            .collect(),
                    );
                }
            }
            out
        });
        let _ = item.reply.send(reply);
    }
}

/// One range query of a look batch, on `(start, end, step)` seconds.
async fn range_on(
    client: &Client,
    key: &BatchKey,
    metrics: &ProviderMetrics,
    query: &str,
    (start, end, step): (i64, i64, i64),
    checks: usize,
) -> Result<Matrix, MetricError> {
    let mut q = client
        .query_range(query, start, end, step as f64)
        .timeout(key.timeout.as_millis().min(i64::MAX as u128) as i64);
    for (name, value) in &key.headers {
        q = q.header(name.clone(), value.clone());
    }
    let result = match tokio::time::timeout(key.timeout, q.post()).await {
        Err(_) => Err(timed_out(client, key, query, checks)),
        Ok(Err(e)) => Err(map_error(client, &shown(query, checks), e)),
        Ok(Ok(r)) => matrix(r.into_inner().0, query, checks),
    };
    count(metrics, &result);
    result
}

fn matrix(data: Data, query: &str, checks: usize) -> Result<Matrix, MetricError> {
    match data {
        Data::Matrix(series) => Ok(series
            .into_iter()
            .map(|s| {
                let (labels, samples) = s.into_inner();
                (
                    labels,
                    samples.iter().map(|p| (p.timestamp(), p.value())).collect(),
                )
            })
            .collect()),
        _ => Err(MetricError::Provider(format!(
            "Prometheus answered a range query without a range result; is the address a Prometheus API? Query was {}",
            shown(query, checks)
        ))),
    }
}

/// The union of cluster regexes, each kept whole.
fn union<'a>(regexes: impl IntoIterator<Item = &'a str>) -> String {
    let set: BTreeSet<&str> = regexes.into_iter().collect();
    set.iter()
        .map(|r| format!("(?:{r})"))
        .collect::<Vec<_>>()
        .join("|")
}

/// A long batched query shortened for a message.
fn shown(query: &str, checks: usize) -> String {
    const KEEP: usize = 300;
    if query.len() <= KEEP {
        return query.to_string();
    }
    let mut end = KEEP;
    while !query.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… (the preset queries of {checks} Canaries in one)",
        &query[..end]
    )
}

/// An instant query's series: labels and value.
type Vector = Vec<(HashMap<String, String>, f64)>;
/// A range query's series: labels and (unix seconds, value) points.
pub type Matrix = Vec<(HashMap<String, String>, Vec<(f64, f64)>)>;

async fn instant(
    client: &Client,
    key: &BatchKey,
    metrics: &ProviderMetrics,
    query: &str,
    at: DateTime<Utc>,
    checks: usize,
) -> Result<Vector, MetricError> {
    let mut q = client
        .query(query)
        .query(
            "time",
            format!("{:.3}", at.timestamp_millis() as f64 / 1000.0),
        )
        .timeout(key.timeout.as_millis().min(i64::MAX as u128) as i64);
    for (name, value) in &key.headers {
        q = q.header(name.clone(), value.clone());
    }
    // POST: the union regex can be longer than proxies allow in a URL.
    let result = match tokio::time::timeout(key.timeout, q.post()).await {
        Err(_) => Err(timed_out(client, key, query, checks)),
        Ok(Err(e)) => Err(map_error(client, &shown(query, checks), e)),
        Ok(Ok(r)) => match r.into_inner().0 {
            Data::Vector(v) => Ok(v
                .into_iter()
                .map(|s| {
                    let (labels, sample) = s.into_inner();
                    (labels, sample.value())
                })
                .collect()),
            _ => Err(MetricError::Provider(format!(
                "Prometheus answered an instant query without an instant vector; is the address a Prometheus API? Query was {}",
                shown(query, checks)
            ))),
        },
    };
    count(metrics, &result);
    result
}

async fn range(
    client: &Client,
    key: &BatchKey,
    metrics: &ProviderMetrics,
    query: &str,
    at: DateTime<Utc>,
    checks: usize,
) -> Result<Matrix, MetricError> {
    // As for one Canary: the window rounded outwards to whole seconds, in sixty steps.
    let end = at.timestamp() + i64::from(at.timestamp_subsec_millis() > 0);
    let start = at
        .timestamp()
        .saturating_sub(i64::try_from(key.window.as_secs()).unwrap_or(i64::MAX));
    let step = ((end.saturating_sub(start)) as f64 / 60.0).max(0.001);
    let mut q = client
        .query_range(query, start, end, step)
        .timeout(key.timeout.as_millis().min(i64::MAX as u128) as i64);
    for (name, value) in &key.headers {
        q = q.header(name.clone(), value.clone());
    }
    let result = match tokio::time::timeout(key.timeout, q.post()).await {
        Err(_) => Err(timed_out(client, key, query, checks)),
        Ok(Err(e)) => Err(match map_error(client, &shown(query, checks), e) {
            MetricError::BadQuery(m) => MetricError::BadQuery(format!(
                "cannot tell how fresh the data is: {m}. Report this query to Serin's maintainers"
            )),
            other => other,
        }),
        Ok(Ok(r)) => matrix(r.into_inner().0, query, checks),
    };
    count(metrics, &result);
    result
}

fn timed_out(client: &Client, key: &BatchKey, query: &str, checks: usize) -> MetricError {
    MetricError::Timeout(format!(
        "Prometheus at {} did not answer within {}s; is it overloaded, or is provider.prometheus.timeout too short? query was {}",
        client.base_url(),
        key.timeout.as_secs_f64(),
        shown(query, checks)
    ))
}

fn count<T>(metrics: &ProviderMetrics, result: &Result<T, MetricError>) {
    metrics.inc(
        PROVIDER,
        match result {
            Ok(_) => "success",
            Err(e) => e.category(),
        },
    );
}

/// Sends a batch's queries and answers each of its checks.
async fn run(client: &Client, key: &BatchKey, metrics: &ProviderMetrics, items: Vec<Item>) {
    let Some(at) = items.iter().map(|i| i.now).max() else {
        return;
    };
    let all = union(
        items
            .iter()
            .flat_map(|i| i.arms.iter().map(|a| a.regex.as_str())),
    );
    let fresh = union(
        items
            .iter()
            .filter_map(|i| i.arms.last().map(|a| a.regex.as_str())),
    );
    let q = presets::promql_batched(key.kind, &all, &fresh, &promql_duration(key.window));
    let n = items.len();
    let (first, second, newest) = futures::join!(
        instant(client, key, metrics, &q.instant[0], at, n),
        instant(client, key, metrics, &q.instant[1], at, n),
        range(client, key, metrics, &q.freshness, at, n),
    );
    let answers = match (first, second, newest) {
        (Ok(first), Ok(second), Ok(newest)) => Ok((first, second, newest)),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
    };
    let (first, second, newest) = match answers {
        Ok(a) => a,
        Err(e) => {
            for item in items {
                let _ = item.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let series = Series::new(&first, &second, &newest);
    for item in items {
        let answer = series.answer(key, &item.arms, at);
        // The check may have been dropped meanwhile (a cancelled fetch): fine.
        let _ = item.reply.send(answer);
    }
}

const CLUSTER: &str = "envoy_cluster_name";

/// One arm as a batch matches it: its cluster regex, and the name that every cluster it
/// matches holds as a whole `_`- or `/`-separated part (see [`presets::cluster_token`]),
/// which finds its few candidate series without running the regex on every series.
#[derive(Clone, Debug, PartialEq)]
pub struct ArmPattern {
    /// [`presets::cluster_regex`].
    pub regex: String,
    /// [`presets::cluster_token`].
    pub token: Option<String>,
}

struct Matcher<'p> {
    re: regex_lite::Regex,
    token: Option<&'p str>,
}

impl<'p> Matcher<'p> {
    fn all(arms: &'p [ArmPattern]) -> Result<Vec<Self>, MetricError> {
        arms.iter()
            .map(|a| {
                let re = regex_lite::Regex::new(&format!("^(?:{})$", a.regex)).map_err(|e| {
                    MetricError::Provider(format!(
                        "the cluster pattern {:?} of a preset is not a regular expression: {e}",
                        a.regex
                    ))
                })?;
                Ok(Matcher {
                    re,
                    token: a.token.as_deref(),
                })
            })
            .collect()
    }
}

/// Series of one answer, by the parts of their cluster names.
struct Index<'a> {
    clusters: Vec<&'a str>,
    by_token: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Index<'a> {
    fn new(clusters: Vec<&'a str>) -> Self {
        let mut by_token: HashMap<&'a str, Vec<usize>> = HashMap::new();
        for (i, c) in clusters.iter().enumerate() {
            for part in c.split(['_', '/']) {
                let at = by_token.entry(part).or_default();
                if at.last() != Some(&i) {
                    at.push(i);
                }
            }
        }
        Index { clusters, by_token }
    }

    /// The positions of the series whose cluster `m` matches.
    fn matching(&self, m: &Matcher<'_>) -> Vec<usize> {
        let is = |i: &usize| m.re.is_match(self.clusters[*i]);
        match m.token {
            Some(t) => self
                .by_token
                .get(t)
                .map(|v| v.iter().copied().filter(is).collect())
                .unwrap_or_default(),
            None => (0..self.clusters.len()).filter(is).collect(),
        }
    }
}

fn cluster_of(labels: &HashMap<String, String>) -> &str {
    labels.get(CLUSTER).map(String::as_str).unwrap_or("")
}

/// A batch's answers, indexed by cluster name.
struct Series<'a> {
    first: &'a Vector,
    second: &'a Vector,
    newest: &'a Matrix,
    first_index: Index<'a>,
    second_index: Index<'a>,
    newest_index: Index<'a>,
}

impl<'a> Series<'a> {
    fn new(first: &'a Vector, second: &'a Vector, newest: &'a Matrix) -> Self {
        Series {
            first_index: Index::new(first.iter().map(|(l, _)| cluster_of(l)).collect()),
            second_index: Index::new(second.iter().map(|(l, _)| cluster_of(l)).collect()),
            newest_index: Index::new(newest.iter().map(|(l, _)| cluster_of(l)).collect()),
            first,
            second,
            newest,
        }
    }

    fn answer(
        &self,
        key: &BatchKey,
        arms: &[ArmPattern],
        at: DateTime<Utc>,
    ) -> Result<Answer, MetricError> {
        let matchers = Matcher::all(arms)?;
        let Some(judged) = matchers.last() else {
            return Err(MetricError::Provider("a preset check without arms".into()));
        };
        let sum = |v: &Vector, index: &Index<'_>, m: &Matcher<'_>| {
            index
                .matching(m)
                .into_iter()
                .map(|i| v[i].1)
                .reduce(|a, b| a + b)
                .map(|v| (v, at))
        };
        let values = match key.kind {
            Kind::ErrorRate => matchers
                .iter()
                .flat_map(|m| {
                    [
                        sum(self.first, &self.first_index, m),
                        sum(self.second, &self.second_index, m),
                    ]
                })
                .collect(),
            Kind::LatencyP99 => {
                let mut buckets: BTreeMap<&str, f64> = BTreeMap::new();
                for i in self.first_index.matching(judged) {
                    let (labels, v) = &self.first[i];
                    if let Some(le) = labels.get("le") {
                        *buckets.entry(le.as_str()).or_default() += v;
                    }
                }
                let p99 = (!buckets.is_empty()).then(|| {
                    let buckets = buckets
                        .into_iter()
                        .filter_map(|(le, count)| Some((le.parse::<f64>().ok()?, count)))
                        .collect();
                    (histogram_quantile(0.99, buckets), at)
                });
                vec![p99, sum(self.second, &self.second_index, judged)]
            }
        };
        // The newest sample time across the judged arm's clusters at each step (what
        // `max(timestamp(...))` over them gives), then as for one Canary.
        let mut steps: BTreeMap<i64, f64> = BTreeMap::new();
        for i in self.newest_index.matching(judged) {
            for &(t, v) in &self.newest[i].1 {
                let e = steps
                    .entry((t * 1000.0).round() as i64)
                    .or_insert(f64::NEG_INFINITY);
                *e = e.max(v);
            }
        }
        let newest = newest_two(steps.into_values())
            .map(|(newest, previous)| fresh_until(newest, previous, key.window, at));
        Ok(Answer { values, newest, at })
    }
}

/// `histogram_quantile(q, ...)` of classic buckets (upper bound, cumulative count), as
/// Prometheus computes it: buckets sorted by bound and merged when equal, counts made
/// monotonic (differences within a relative 1e-12 are float noise), linear interpolation
/// inside the bucket the rank falls in, the first bucket starting at zero, the highest
/// finite bound when the rank falls in `+Inf`; NaN without `+Inf`, with fewer than two
/// buckets or no observations.
pub fn histogram_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
        return f64::NAN;
    }
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for (bound, count) in buckets {
        match merged.last_mut() {
            Some(last) if last.0 == bound => last.1 += count,
            _ => merged.push((bound, count)),
        }
    }
    let mut previous = merged[0].1;
    for b in merged.iter_mut().skip(1) {
        if b.1 == previous {
            continue;
        }
        if almost_equal(previous, b.1, 1e-12) || b.1 < previous {
            b.1 = previous;
            continue;
        }
        previous = b.1;
    }
    if merged.len() < 2 {
        return f64::NAN;
    }
    let observations = merged[merged.len() - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let last = merged.len() - 1;
    let b = merged[..last]
        .iter()
        .position(|b| b.1 >= rank)
        .unwrap_or(last);
    if b == last {
        return merged[last - 1].0;
    }
    if b == 0 && merged[0].0 <= 0.0 {
        return merged[0].0;
    }
    let (mut start, end, mut count) = (0.0, merged[b].0, merged[b].1);
    if b > 0 {
        start = merged[b - 1].0;
        count -= merged[b - 1].1;
        rank -= merged[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

/// Whether `a` and `b` are equal within the relative tolerance `epsilon`.
fn almost_equal(a: f64, b: f64, epsilon: f64) -> bool {
    if a == b {
        return true;
    }
    let (sum, diff) = (a.abs() + b.abs(), (a - b).abs());
    if a == 0.0 || b == 0.0 || sum < f64::MIN_POSITIVE {
        return diff < epsilon * f64::MIN_POSITIVE;
    }
    diff / sum.min(f64::MAX) < epsilon
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
        points.to_vec()
    }

    /// Linear interpolation in the bucket the rank falls in; the first bucket starts at 0.
    #[test]
    fn interpolates_inside_the_bucket() {
        let buckets = b(&[(10.0, 50.0), (20.0, 90.0), (f64::INFINITY, 100.0)]);
        assert_eq!(histogram_quantile(0.5, buckets.clone()), 10.0);
        assert!((histogram_quantile(0.7, buckets.clone()) - 15.0).abs() < 1e-9);
        assert!((histogram_quantile(0.25, buckets) - 5.0).abs() < 1e-9);
    }

    /// A rank in +Inf gives the highest finite bound; no +Inf, too few buckets or no
    /// observations give NaN; q outside [0, 1] gives ±Inf.
    #[test]
    fn edges() {
        let buckets = b(&[(10.0, 50.0), (f64::INFINITY, 100.0)]);
        assert_eq!(histogram_quantile(0.99, buckets.clone()), 10.0);
        assert!(histogram_quantile(0.5, b(&[(10.0, 5.0), (20.0, 9.0)])).is_nan());
        assert!(histogram_quantile(0.5, b(&[(f64::INFINITY, 9.0)])).is_nan());
        assert!(histogram_quantile(0.5, b(&[(1.0, 0.0), (f64::INFINITY, 0.0)])).is_nan());
        assert_eq!(histogram_quantile(-0.1, buckets.clone()), f64::NEG_INFINITY);
        assert_eq!(histogram_quantile(1.1, buckets), f64::INFINITY);
    }

    /// Unsorted, duplicated and non-monotonic buckets are sorted, merged and made monotonic.
    #[test]
    fn repairs_buckets() {
        let messy = b(&[
            (f64::INFINITY, 100.0),
            (20.0, 40.0),
            (10.0, 30.0),
            (10.0, 20.0),
            (30.0, 35.0),
        ]);
        // Sorted and merged: 10 → 50, 20 → 40 (raised to 50), 30 → 35 (raised to 50),
        // +Inf → 100; the median's rank 50 is reached in the first bucket.
        assert_eq!(histogram_quantile(0.5, messy.clone()), 10.0);
        // Rank 75 falls in +Inf: the highest finite bound.
        assert_eq!(histogram_quantile(0.75, messy), 30.0);
    }

    /// The batch range starts at the earliest grid, ends at the latest, and steps on every
    /// grid's times.
    #[test]
    fn look_ranges_hit_every_grid() {
        let (a, b, c) = ([100, 110, 120], [103, 113], [100, 120]);
        assert_eq!(look_range(&[&a, &c]), Some((100, 120, 10)));
        assert_eq!(look_range(&[&a, &b]), Some((100, 120, 1)));
        assert_eq!(look_range(&[&[100, 106], &[104, 110]]), Some((100, 110, 2)));
        assert_eq!(look_range(&[&c]), Some((100, 120, 20)));
        assert_eq!(look_range(&[]), None);
        assert!(batchable_grid(&[0, 10]) && !batchable_grid(&[0, 301]) && !batchable_grid(&[5]));
    }

    use crate::api::Preset;
    use crate::arms::{Arm, DataPlaneArm, DataPlaneArms, PerArm};
    use proptest::prelude::*;

    fn arms_named(name: &str, namespace: &str) -> DataPlaneArms {
        let arm = DataPlaneArm {
            name: name.into(),
            namespace: namespace.into(),
        };
        DataPlaneArms {
            kind: "Service",
            primary: arm.clone(),
            canary: arm,
            pod_apps: PerArm {
                primary: String::new(),
                canary: String::new(),
            },
        }
    }

    proptest! {
        /// Every cluster name a preset's regex matches holds the arm's token as a whole
        /// part, so looking series up by token finds all the regex would: cluster names
        /// are built from pieces a data plane puts in them (names, separators, words,
        /// digits), in any order.
        #[test]
        fn tokens_find_every_match(
            name in "[a-z0-9][a-z0-9-]{0,8}",
            namespace in "[a-z][a-z0-9-]{0,6}",
            pieces in proptest::collection::vec(0usize..9, 1..10),
            preset in 0usize..3,
        ) {
            let preset = [Preset::AppmeshErrorRate, Preset::GlooErrorRate, Preset::GatewayErrorRate][preset];
            let arms = arms_named(&name, &namespace);
            let token = crate::metrics::presets::cluster_token(&arms, Arm::Canary);
            prop_assert_eq!(token.as_deref(), Some(name.as_str()));
            let parts = ["cds_egress_", "mesh", "_", "/", "http", "8080", "kube-upstream_", "x-", "-y"];
            let mut cluster = String::new();
            for p in &pieces {
                cluster.push_str(match p {
                    7 => &name,
                    8 => &namespace,
                    _ => parts[*p],
                });
            }
            for wrap in [false, true] {
                let c = if wrap { format!("cds_egress_m_{cluster}_{namespace}_http_1") } else { cluster.clone() };
                let pattern = ArmPattern {
                    regex: crate::metrics::presets::cluster_regex(preset, &arms, Arm::Canary),
                    token: token.clone(),
                };
                let m = &Matcher::all(std::slice::from_ref(&pattern)).unwrap()[0];
                let index = Index::new(vec![c.as_str()]);
                let by_regex = m.re.is_match(&c);
                prop_assert_eq!(!index.matching(m).is_empty(), by_regex, "{} {:?}", c, preset);
            }
        }
    }

    /// Names that are not plain Kubernetes names have no token: all series are searched.
    #[test]
    fn odd_names_search_everything() {
        let arms = arms_named("a.b", "ns");
        assert_eq!(
            crate::metrics::presets::cluster_token(&arms, Arm::Canary),
            None
        );
        let pattern = ArmPattern {
            regex: crate::metrics::presets::cluster_regex(
                Preset::GlooErrorRate,
                &arms,
                Arm::Canary,
            ),
            token: None,
        };
        let m = &Matcher::all(std::slice::from_ref(&pattern)).unwrap()[0];
        let index = Index::new(vec!["aXb_ns", "other_ns", "a.b_ns"]);
        assert_eq!(index.matching(m), vec![0, 2]);
    }

    /// Every regex is kept whole in the union, once.
    #[test]
    fn union_of_regexes() {
        assert_eq!(union(["b|c", "a", "b|c"]), "(?:a)|(?:b|c)");
    }

    /// Long queries are cut on a character boundary in messages.
    #[test]
    fn long_queries_are_shortened() {
        let q = "é".repeat(400);
        let s = shown(&q, 7);
        assert!(
            s.ends_with("(the preset queries of 7 Canaries in one)"),
            "{s}"
        );
        assert!(s.len() < 400);
        assert_eq!(shown("up", 7), "up");
    }
}
