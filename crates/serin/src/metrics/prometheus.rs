//! The Prometheus provider: instant queries at the evaluation time, with a timeout, optional
//! bearer or basic auth from a Secret, and custom headers.
//!
//! Prometheus stamps every instant-query result with the evaluation time, whatever the age
//! of the samples behind it: `sum(increase(x[5m]))` still has a value three minutes after
//! `x` stopped being scraped. So each metric also sends one freshness query, at the same
//! time as its value queries: the newest sample time of the series the judged query reads
//! (`max(timestamp(selector))`, [`freshness_query`]), as a range query over the window. Its
//! last value is the newest sample `T`; the step before it changed gives the series'
//! sampling interval `S`. The sample is stamped `min(T + S, now)`: a scraped value stands
//! for its series until the next scrape is due, as a CloudWatch datapoint stands for its
//! period. The selectors are found by [`promql_selectors`], a small PromQL scanner that
//! never fails: what it cannot read it skips.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use prometheus_http_query::Client;
use prometheus_http_query::response::Data;
use reqwest::header::{HeaderName, HeaderValue};

use crate::api::{MetricSpec, Preset, PrometheusProvider, ProviderKind};
use crate::bounded::{self, Bounded};

use super::presets::{self, Counters, Kind};
use super::prometheus_batch::{self, ArmPattern, BatchKey, Batches};
use super::template::Vars;
use super::{
    ArmCounts, CanaryContext, Evidence, Measurement, MetricError, MetricProvider, ProviderMetrics,
    Sample, SecretLookup,
};
use crate::analysis::sequential;
use crate::arms::Arm;

pub(super) const PROVIDER: &str = "prometheus";

/// Settings of the Prometheus provider.
#[derive(Clone, Debug)]
pub struct PrometheusOptions {
    /// Query timeout when `provider.prometheus.timeout` is not set.
    pub default_timeout: Duration,
    /// Timeout for opening a TCP connection.
    pub connect_timeout: Duration,
    /// How long a preset check waits for others to share its queries
    /// ([`super::prometheus_batch`]); zero sends every check's queries alone.
    pub linger: Duration,
}

impl Default for PrometheusOptions {
    fn default() -> Self {
        PrometheusOptions {
            default_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            linger: Duration::from_millis(50),
        }
    }
}

/// Runs PromQL instant queries. One HTTP connection pool is shared by every address.
pub struct Prometheus {
    http: reqwest::Client,
    /// By address (as users write it in Canaries, so bounded).
    clients: Mutex<Bounded<String, Client>>,
    secrets: Arc<dyn SecretLookup>,
    options: PrometheusOptions,
    metrics: ProviderMetrics,
    /// Preset checks waiting to share their queries.
    batches: Batches,
}

/// One value of an instant query, or nothing when no series matched.
pub(super) type Instant = Option<(f64, DateTime<Utc>)>;

impl Prometheus {
    /// A provider that reads credentials through `secrets`.
    pub fn new(
        secrets: Arc<dyn SecretLookup>,
        options: PrometheusOptions,
        metrics: ProviderMetrics,
    ) -> Result<Self, MetricError> {
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| MetricError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Prometheus {
            http,
            clients: Mutex::new(Bounded::new(bounded::CLIENTS)),
            secrets,
            options,
            metrics,
            batches: Batches::default(),
        })
    }

    fn client(&self, address: &str) -> Result<Client, MetricError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| MetricError::Provider("the Prometheus client cache is poisoned".into()))?;
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let c = Client::from(self.http.clone(), address).map_err(|e| {
            MetricError::Config(format!(
                "provider.prometheus.address {address:?} is not a usable URL: {e}"
            ))
        })?;
        clients.insert(address.to_string(), c.clone());
        Ok(c)
    }

    async fn headers(
        &self,
        namespace: &str,
        p: &PrometheusProvider,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, MetricError> {
        let mut out = Vec::new();
        for h in &p.headers {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                MetricError::Config(format!(
                    "header name {:?} in provider.prometheus.headers is not valid",
                    h.name
                ))
            })?;
            let value = HeaderValue::from_str(&h.value).map_err(|_| {
                MetricError::Config(format!(
                    "the value of header {} in provider.prometheus.headers is not valid",
                    h.name
                ))
            })?;
            out.push((name, value));
        }
        if let Some(secret) = &p.secret_ref {
            let data = self
                .secrets
                .secret_data(namespace, &secret.name)
                .await
                .map_err(|e| {
                    MetricError::Auth(format!(
                        "cannot read provider.prometheus.secretRef {}: {e}",
                        secret.name
                    ))
                })?;
            let text = |key: &str| {
                data.get(key)
                    .map(|v| String::from_utf8_lossy(v).trim().to_string())
            };
            let value = if let Some(token) = text("token") {
                format!("Bearer {token}")
            } else if let (Some(user), Some(pass)) = (text("username"), text("password")) {
                format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
            } else {
                return Err(MetricError::Auth(format!(
                    "secret {namespace}/{} has neither `token` nor `username` and `password`",
                    secret.name
                )));
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                MetricError::Auth(format!(
                    "secret {namespace}/{} holds characters that cannot go in an HTTP header",
                    secret.name
                ))
            })?;
            value.set_sensitive(true);
            out.push((reqwest::header::AUTHORIZATION, value));
        }
        Ok(out)
    }

    /// Runs one instant query at `at`.
    async fn instant(
        &self,
        client: &Client,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
        query: &str,
        at: DateTime<Utc>,
    ) -> Result<Instant, MetricError> {
        let mut q = client
            .query(query)
            .query(
                "time",
                format!("{:.3}", at.timestamp_millis() as f64 / 1000.0),
            )
            .timeout(timeout.as_millis() as i64);
        for (name, value) in headers {
            q = q.header(name.clone(), value.clone());
        }
        let result = match tokio::time::timeout(timeout, q.get()).await {
            Err(_) => Err(MetricError::Timeout(format!(
                "Prometheus at {} did not answer within {}s; is it overloaded, or is provider.prometheus.timeout too short? query was {query}",
                client.base_url(),
                timeout.as_secs_f64()
            ))),
            Ok(Err(e)) => Err(map_error(client, query, e)),
            Ok(Ok(r)) => interpret(query, r.data()),
        };
        self.metrics.inc(
            PROVIDER,
            match &result {
                Ok(_) => "success",
                Err(e) => e.category(),
            },
        );
        result
    }

    async fn run(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        provider: &PrometheusProvider,
        now: DateTime<Utc>,
    ) -> Measurement {
        let window = canary.window(metric);
        let vars = Vars::new(canary, window);
        let timeout = provider
            .timeout
            .filter(|t| !t.is_negative())
            .map(Duration::from)
            .unwrap_or(self.options.default_timeout);
        // Render first, so that the queries can be shown even when the provider fails.
        let rendered: Result<Vec<String>, String> = match (metric.preset, &metric.query) {
            (Some(preset), _) => match presets::kind(preset) {
                Kind::ErrorRate => presets::promql_error_rate(preset, canary)
                    .iter()
                    .flat_map(|(_, r, e)| [r, e])
                    .map(|t| vars.render(t))
                    .collect(),
                Kind::LatencyP99 => {
                    let (p99, count) = presets::promql_latency(preset, canary);
                    [p99, count].iter().map(|t| vars.render(t)).collect()
                }
            },
            (None, Some(q)) => vars.render(q).map(|q| vec![q]),
            (None, None) => Err("the metric has neither a preset nor a query".into()),
        };
        let queries = match rendered {
            Ok(q) => q,
            Err(e) => return Measurement::failed(vec![], MetricError::Template(e)),
        };
        let client = match self.client(&provider.address) {
            Ok(c) => c,
            Err(e) => return Measurement::failed(queries, e),
        };
        let headers = match self.headers(&canary.namespace, provider).await {
            Ok(h) => h,
            Err(e) => return Measurement::failed(queries, e),
        };
        // The judged query's data: the canary's requests for an error rate, its request
        // count for a latency, the user's query itself.
        let judged = match metric.preset.map(presets::kind) {
            Some(Kind::ErrorRate) => queries.get(2),
            Some(Kind::LatencyP99) => queries.get(1),
            None => queries.first(),
        };
        let freshness = judged.and_then(|q| freshness_query(q));
        let (results, newest, at) = match self
            .batched(
                canary, metric, provider, &headers, &client, timeout, window, now,
            )
            .await
        {
            Some(Ok(answer)) => (
                answer.values.into_iter().map(Ok).collect(),
                Some(Ok(answer.newest)),
                answer.at,
            ),
            // A batch Prometheus cannot parse is retried as this Canary's own queries,
            // so that the message names them.
            None | Some(Err(MetricError::BadQuery(_))) => {
                let values = futures::future::join_all(
                    queries
                        .iter()
                        .map(|q| self.instant(&client, &headers, timeout, q, now)),
                );
                let newest = async {
                    match &freshness {
                        Some(f) => Some(
                            self.newest_sample(&client, &headers, timeout, f, window, now)
                                .await,
                        ),
                        None => None,
                    }
                };
                // One round trip: the freshness query goes out with the value queries.
                let (results, newest) = futures::join!(values, newest);
                (results, newest, now)
            }
            Some(Err(e)) => {
                let mut queries = queries;
                queries.extend(freshness);
                return Measurement::failed(queries, e);
            }
        };
        let result = match metric.preset.map(presets::kind) {
            Some(Kind::ErrorRate) => error_rate(&queries, results, at),
            Some(Kind::LatencyP99) => latency(&queries, results),
            None => results
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(MetricError::Provider("no query was run".into())))
                .and_then(|v| single(&queries[0], v)),
        };
        let result = result.and_then(|mut sample| {
            sample.timestamp = match newest {
                // Nothing read from series (`vector(1)`), or none of them has a sample
                // near the window (`sum(rate(errors[1m])) or vector(0)` without errors):
                // the value is computed at the evaluation time.
                None | Some(Ok(None)) => at,
                Some(Ok(Some(t))) => t,
                Some(Err(e)) => return Err(e),
            };
            Ok(sample)
        });
        let mut queries = queries;
        queries.extend(freshness);
        Measurement { queries, result }
    }

    /// A preset check's values from a batch shared with the other Canaries' checks
    /// ([`super::prometheus_batch`]); `None` for a user query, or when batching is off.
    #[allow(clippy::too_many_arguments)]
    async fn batched(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        provider: &PrometheusProvider,
        headers: &[(HeaderName, HeaderValue)],
        client: &Client,
        timeout: Duration,
        window: Duration,
        now: DateTime<Utc>,
    ) -> Option<Result<prometheus_batch::Answer, MetricError>> {
        let preset = metric.preset?;
        if self.options.linger.is_zero() {
            return None;
        }
        let kind = presets::kind(preset);
        let arms: &[Arm] = match kind {
            Kind::ErrorRate => &Arm::BOTH,
            Kind::LatencyP99 => &[Arm::Canary],
        };
        let arms = arms
            .iter()
            .map(|&arm| arm_pattern(preset, canary, arm))
            .collect();
        let key = BatchKey {
            address: provider.address.clone(),
            headers: headers.to_vec(),
            timeout,
            window,
            kind,
        };
        Some(
            self.batches
                .submit(
                    key,
                    client.clone(),
                    self.metrics.clone(),
                    self.options.linger,
                    arms,
                    now,
                )
                .await,
        )
    }

    /// When the data behind a value ends ([`fresh_until`]): `freshness` (from
    /// [`freshness_query`]) as a range query over `window` up to `now`, `None` when no
    /// series has a sample in it.
    async fn newest_sample(
        &self,
        client: &Client,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
        freshness: &str,
        window: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, MetricError> {
        // The API takes whole seconds: the range covers the window, rounded outwards.
        let end = now.timestamp() + i64::from(now.timestamp_subsec_millis() > 0);
        let start = now
            .timestamp()
            .saturating_sub(i64::try_from(window.as_secs()).unwrap_or(i64::MAX));
        // Sixty steps: the sampling interval is measured to a sixtieth of the window.
        let step = ((end.saturating_sub(start)) as f64 / 60.0).max(0.001);
        let mut q = client
            .query_range(freshness, start, end, step)
            .timeout(timeout.as_millis().min(i64::MAX as u128) as i64);
        for (name, value) in headers {
            q = q.header(name.clone(), value.clone());
        }
        let context = |e: MetricError| match e {
            MetricError::BadQuery(m) => MetricError::BadQuery(format!(
                "cannot tell how fresh the data is: {m}. Serin asks for the newest sample time of the query's series; report this query to Serin's maintainers"
            )),
            other => other,
        };
        let result = match tokio::time::timeout(timeout, q.get()).await {
            Err(_) => Err(MetricError::Timeout(format!(
                "Prometheus at {} did not answer within {}s; is it overloaded, or is provider.prometheus.timeout too short? query was {freshness}",
                client.base_url(),
                timeout.as_secs_f64()
            ))),
            Ok(Err(e)) => Err(context(map_error(client, freshness, e))),
            Ok(Ok(r)) => match r.data() {
                Data::Matrix(series) => Ok(newest_two(
                    series
                        .iter()
                        .flat_map(|s| s.samples().iter().map(|p| p.value())),
                )
                .map(|(newest, previous)| fresh_until(newest, previous, window, now))),
                _ => Err(MetricError::Provider(format!(
                    "Prometheus answered a range query without a range result; is the address a Prometheus API? Query was {freshness}"
                ))),
            },
        };
        self.metrics.inc(
            PROVIDER,
            match &result {
                Ok(_) => "success",
                Err(e) => e.category(),
            },
        );
        result
    }
}

/// A range query's series: labels and (unix seconds, value) points.
type Matrix = Vec<(HashMap<String, String>, super::Points)>;

impl Prometheus {
    /// Runs one range query on the look grid (whole seconds).
    async fn range(
        &self,
        client: &Client,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
        query: &str,
        grid: &[i64],
    ) -> Result<Matrix, MetricError> {
        let (Some(&start), Some(&end)) = (grid.first(), grid.last()) else {
            return Ok(vec![]);
        };
        let step = grid.get(1).map(|t| t - start).unwrap_or(1).max(1) as f64;
        let mut q = client
            .query_range(query, start, end, step)
            .timeout(timeout.as_millis().min(i64::MAX as u128) as i64);
        for (name, value) in headers {
            q = q.header(name.clone(), value.clone());
        }
        let result = match tokio::time::timeout(timeout, q.get()).await {
            Err(_) => Err(MetricError::Timeout(format!(
                "Prometheus at {} did not answer within {}s; is it overloaded, or is provider.prometheus.timeout too short? query was {query}",
                client.base_url(),
                timeout.as_secs_f64()
            ))),
            Ok(Err(e)) => Err(map_error(client, query, e)),
            Ok(Ok(r)) => match r.data() {
                Data::Matrix(series) => Ok(series
                    .iter()
                    .map(|s| {
                        let points = s
                            .samples()
                            .iter()
                            .map(|p| (p.timestamp().round() as i64, p.value()))
                            .collect();
                        (s.metric().clone(), points)
                    })
                    .collect()),
                _ => Err(MetricError::Provider(format!(
                    "Prometheus answered a range query without a range result; is the address a Prometheus API? Query was {query}"
                ))),
            },
        };
        self.metrics.inc(
            PROVIDER,
            match &result {
                Ok(_) => "success",
                Err(e) => e.category(),
            },
        );
        result
    }

    /// The sequential judge's looks of a preset on `grid`.
    async fn run_looks(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        provider: &PrometheusProvider,
        grid: &[DateTime<Utc>],
    ) -> super::LookMeasurement {
        let Some(preset) = metric.preset else {
            return super::LookMeasurement {
                queries: vec![],
                result: Err(MetricError::Config(format!(
                    "metric {} has no preset: the sequential judge reads presets only; set judge: Threshold",
                    metric.name
                ))),
            };
        };
        let counters = presets::promql_counters(preset, canary);
        let queries: Vec<String> = counters.iter().flat_map(|(_, c)| c.queries()).collect();
        let fail = |queries: Vec<String>, e| super::LookMeasurement {
            queries,
            result: Err(e),
        };
        let client = match self.client(&provider.address) {
            Ok(c) => c,
            Err(e) => return fail(queries, e),
        };
        let headers = match self.headers(&canary.namespace, provider).await {
            Ok(h) => h,
            Err(e) => return fail(queries, e),
        };
        let timeout = provider
            .timeout
            .filter(|t| !t.is_negative())
            .map(Duration::from)
            .unwrap_or(self.options.default_timeout);
        let seconds: Vec<i64> = grid.iter().map(|t| t.timestamp()).collect();
        let batched =
            if self.options.linger.is_zero() || !prometheus_batch::batchable_grid(&seconds) {
                None
            } else {
                let key = BatchKey {
                    address: provider.address.clone(),
                    headers: headers.clone(),
                    timeout,
                    window: Duration::ZERO,
                    kind: presets::kind(preset),
                };
                let arms = Arm::BOTH
                    .iter()
                    .map(|&arm| arm_pattern(preset, canary, arm))
                    .collect();
                let answer = self
                    .batches
                    .looks(
                        key,
                        client.clone(),
                        self.metrics.clone(),
                        self.options.linger,
                        arms,
                        seconds.clone(),
                    )
                    .await;
                match answer {
                    Ok(matrices) => Some(
                        matrices
                            .into_iter()
                            .map(|m| {
                                Ok(m.into_iter()
                                    .map(|(labels, points)| {
                                        let points = points
                                            .into_iter()
                                            .map(|(t, v)| (t.round() as i64, v))
                                            .collect();
                                        (labels, points)
                                    })
                                    .collect())
                            })
                            .collect(),
                    ),
                    // Retried as this Canary's own queries, so that the message names them.
                    Err(MetricError::BadQuery(_)) => None,
                    Err(e) => return fail(queries, e),
                }
            };
        let answers: Vec<Result<Matrix, MetricError>> = match batched {
            Some(a) => a,
            None => {
                futures::future::join_all(
                    queries
                        .iter()
                        .map(|q| self.range(&client, &headers, timeout, q, &seconds)),
                )
                .await
            }
        };
        let mut answers = answers.into_iter();
        let mut arms = Vec::new();
        for (_, c) in &counters {
            let looks = match c {
                Counters::Responses(q) => answers
                    .next()
                    .unwrap_or_else(|| Err(MetricError::Provider("no answer".into())))
                    .and_then(|m| nonempty(q, m))
                    .map(|m| responses(&m, &seconds)),
                Counters::Latency { count, buckets } => {
                    let (c, b) = (
                        answers
                            .next()
                            .unwrap_or_else(|| Err(MetricError::Provider("no answer".into()))),
                        answers
                            .next()
                            .unwrap_or_else(|| Err(MetricError::Provider("no answer".into()))),
                    );
                    c.and_then(|c| nonempty(count, c)).and_then(|c| {
                        b.and_then(|b| slower_than(buckets, &c, &b, metric.max, &seconds))
                    })
                }
            };
            match looks {
                Ok(l) => arms.push(l),
                Err(e) => return fail(queries, e),
            }
        }
        let (primary, canary_arm) = match arms.as_slice() {
            [p, c] => (p, c),
            _ => return fail(queries, MetricError::Provider("expected two arms".into())),
        };
        let result = primary
            .iter()
            .zip(canary_arm)
            .map(|(p, c)| sequential::Look {
                primary: *p,
                canary: *c,
            })
            .collect();
        super::LookMeasurement {
            queries,
            result: Ok(result),
        }
    }
}

/// How a batch matches one arm's clusters.
fn arm_pattern(preset: Preset, canary: &CanaryContext, arm: Arm) -> ArmPattern {
    ArmPattern {
        regex: presets::cluster_regex(preset, &canary.data_plane, arm),
        token: presets::cluster_token(&canary.data_plane, arm),
    }
}

/// A selector that matched nothing over the whole range is a configuration problem the
/// user must see, never zero requests.
fn nonempty(query: &str, m: Matrix) -> Result<Matrix, MetricError> {
    if m.is_empty() {
        return Err(MetricError::NoData(format!(
            "no series matched: do the router's arms have traffic, and do the label matchers fit the data plane's series? query was {query}"
        )));
    }
    Ok(m)
}

/// Requests and 5xx responses per look from `envoy_cluster_upstream_rq` series.
fn responses(m: &Matrix, grid: &[i64]) -> Vec<sequential::Counts> {
    let all: Vec<super::Points> = m.iter().map(|(_, p)| p.clone()).collect();
    let bad: Vec<super::Points> = m
        .iter()
        .filter(|(labels, _)| {
            labels
                .get("envoy_response_code")
                .is_some_and(|c| presets::is_server_error(c))
        })
        .map(|(_, p)| p.clone())
        .collect();
    super::increases(&all, grid)
        .into_iter()
        .zip(super::increases(&bad, grid))
        .map(|(requests, bad)| sequential::Counts { requests, bad })
        .collect()
}

/// Requests and requests slower than `max` ms per look, from the histogram's count and the
/// bucket whose `le` is `max`.
fn slower_than(
    query: &str,
    count: &Matrix,
    buckets: &Matrix,
    max: Option<f64>,
    grid: &[i64],
) -> Result<Vec<sequential::Counts>, MetricError> {
    let Some(max) = max else {
        return Err(MetricError::Config(
            "the sequential latency judge needs max (a bucket edge in milliseconds)".into(),
        ));
    };
    let at_most: Vec<super::Points> = buckets
        .iter()
        .filter(|(labels, _)| {
            labels
                .get("le")
                .and_then(|le| le.parse::<f64>().ok())
                .is_some_and(|le| (le - max).abs() <= 1e-9 * max.abs().max(1.0))
        })
        .map(|(_, p)| p.clone())
        .collect();
    if at_most.is_empty() {
        return Err(MetricError::NoData(format!(
            "no histogram bucket has le={max}: the data plane's buckets differ from Envoy's defaults; use one of its bucket edges as max, or set judge: Threshold. Query was {query}"
        )));
    }
    let counts: Vec<super::Points> = count.iter().map(|(_, p)| p.clone()).collect();
    Ok(super::increases(&counts, grid)
        .into_iter()
        .zip(super::increases(&at_most, grid))
        .map(|(requests, fast)| sequential::Counts {
            requests,
            bad: (requests - fast).max(0.0),
        })
        .collect())
}

#[async_trait]
impl MetricProvider for Prometheus {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Prometheus
    }

    async fn measure(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        now: DateTime<Utc>,
    ) -> Measurement {
        match &metric.provider.prometheus {
            Some(p) => self.run(canary, metric, p, now).await,
            None => Measurement::failed(
                vec![],
                MetricError::Config("the metric's provider is not prometheus".into()),
            ),
        }
    }

    async fn looks(
        &self,
        canary: &CanaryContext,
        metric: &MetricSpec,
        grid: &[DateTime<Utc>],
    ) -> super::LookMeasurement {
        match &metric.provider.prometheus {
            Some(p) => self.run_looks(canary, metric, p, grid).await,
            None => super::LookMeasurement {
                queries: vec![],
                result: Err(MetricError::Config(
                    "the metric's provider is not prometheus".into(),
                )),
            },
        }
    }
}

fn single(query: &str, v: Instant) -> Result<Sample, MetricError> {
    match v {
        None => Err(MetricError::NoData(format!(
            "no series matched: is the canary receiving traffic, and do the label matchers fit? query was {query}"
        ))),
        Some((value, timestamp)) => finite(query, value).map(|value| Sample {
            value,
            timestamp,
            sample_size: None,
            evidence: None,
        }),
    }
}

fn finite(query: &str, value: f64) -> Result<f64, MetricError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(MetricError::NotANumber(format!(
            "the query returned {value} (a division by zero, or a quantile over no observations?); query was {query}"
        )))
    }
}

/// Requests and errors of both arms (queries in `presets::promql_error_rate` order) into the
/// canary's error rate in percent.
fn error_rate(
    queries: &[String],
    results: Vec<Result<Instant, MetricError>>,
    now: DateTime<Utc>,
) -> Result<Sample, MetricError> {
    let mut values = Vec::with_capacity(4);
    for r in results {
        values.push(r?);
    }
    let count = |i: usize| -> Result<f64, MetricError> {
        match values.get(i).copied().flatten() {
            // An error counter appears only after the first 5xx: no series is no errors.
            None => Ok(0.0),
            Some((v, _)) => finite(&queries[i], v),
        }
    };
    let evidence = Evidence {
        primary: ArmCounts {
            requests: count(0)?,
            errors: count(1)?,
        },
        canary: ArmCounts {
            requests: count(2)?,
            errors: count(3)?,
        },
    };
    let requests = evidence.canary.requests;
    if values.get(2).copied().flatten().is_none() || requests <= 0.0 {
        return Err(MetricError::NoData(format!(
            "no requests reached the canary in the window: is it receiving traffic? query was {}",
            queries.get(2).map(String::as_str).unwrap_or("")
        )));
    }
    let timestamp = values
        .get(2)
        .copied()
        .flatten()
        .map(|(_, t)| t)
        .unwrap_or(now);
    Ok(Sample {
        value: 100.0 * evidence.canary.errors / requests,
        timestamp,
        sample_size: Some(requests.round() as u64),
        evidence: Some(evidence),
    })
}

fn latency(
    queries: &[String],
    mut results: Vec<Result<Instant, MetricError>>,
) -> Result<Sample, MetricError> {
    if results.len() != 2 {
        return Err(MetricError::Provider(
            "the latency preset runs two queries".into(),
        ));
    }
    let count = results.pop().unwrap_or(Ok(None))?;
    let p99 = results.pop().unwrap_or(Ok(None))?;
    let requests = count
        .map(|(v, _)| v)
        .filter(|v| v.is_finite())
        .unwrap_or(0.0);
    if requests <= 0.0 {
        return Err(MetricError::NoData(format!(
            "no requests reached the canary in the window: is it receiving traffic? query was {}",
            queries[1]
        )));
    }
    let mut sample = single(&queries[0], p99)?;
    sample.sample_size = Some(requests.round() as u64);
    Ok(sample)
}

fn interpret(query: &str, data: &Data) -> Result<Instant, MetricError> {
    match data {
        Data::Scalar(s) => Ok(Some((s.value(), time(s.timestamp())))),
        Data::Vector(v) => match v.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((one.sample().value(), time(one.sample().timestamp())))),
            many => {
                let shown: Vec<String> = many.iter().take(3).map(|s| labels(s.metric())).collect();
                Err(MetricError::MultipleSeries {
                    count: many.len(),
                    message: format!(
                        "the query returned {} series where one number was expected (for example {}); aggregate them with sum(...) or add label matchers. Query was {query}",
                        many.len(),
                        shown.join(", ")
                    ),
                })
            }
        },
        Data::Matrix(_) => Err(MetricError::BadQuery(format!(
            "the query returned a range vector, not one number: drop the trailing [range] or wrap it in a function such as rate(...) and sum(...). Query was {query}"
        ))),
    }
}

fn labels(m: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    pairs.sort();
    format!("{{{}}}", pairs.join(","))
}

fn time(ts: f64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt((ts * 1000.0).round() as i64)
        .single()
        .unwrap_or_default()
}

pub(super) fn map_error(
    client: &Client,
    query: &str,
    e: prometheus_http_query::Error,
) -> MetricError {
    use prometheus_http_query::Error as E;
    use prometheus_http_query::error::PrometheusErrorType as T;
    let base = client.base_url();
    match e {
        E::Prometheus(p) => match p.error_type() {
            T::BadData => MetricError::BadQuery(format!(
                "Prometheus rejected the query: {}; query was {query}",
                p.message()
            )),
            T::Timeout | T::Canceled => MetricError::Timeout(format!(
                "Prometheus gave up on the query: {}; simplify it or raise provider.prometheus.timeout. Query was {query}",
                p.message()
            )),
            _ => MetricError::Provider(format!(
                "Prometheus failed the query ({}): {}; query was {query}",
                p.error_type(),
                p.message()
            )),
        },
        E::Client(c) => match c.inner() {
            Some(r) if r.is_timeout() => MetricError::Timeout(format!(
                "Prometheus at {base} did not answer in time; query was {query}"
            )),
            Some(r) if r.is_connect() => MetricError::Unreachable(format!(
                "cannot connect to Prometheus at {base}: {}; check provider.prometheus.address and that the server is up",
                source_chain(r)
            )),
            Some(r) => match r.status().map(|s| s.as_u16()) {
                Some(401) | Some(403) => MetricError::Auth(format!(
                    "Prometheus at {base} refused the credentials (HTTP {}); check provider.prometheus.secretRef",
                    r.status().map(|s| s.as_u16()).unwrap_or_default()
                )),
                Some(code) => MetricError::Provider(format!(
                    "Prometheus at {base} answered HTTP {code} without a Prometheus API response; is the address a Prometheus API (a proxy's path prefix missing?)"
                )),
                None => MetricError::Unreachable(format!(
                    "request to Prometheus at {base} failed: {}",
                    source_chain(r)
                )),
            },
            None => MetricError::Provider(format!(
                "unexpected answer from Prometheus at {base}: {c}; is the address a Prometheus API?"
            )),
        },
        other => MetricError::Provider(format!("Prometheus at {base}: {other}")),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The label that keeps the selectors of a freshness query apart (see [`freshness_query`]).
const SELECTOR_LABEL: &str = "serin_selector";

/// The PromQL whose value is the newest sample time, in seconds, of the series `query`
/// reads: `max(timestamp(selector))` over every vector selector of `query` (their ranges
/// dropped, their `offset` and `@` modifiers kept, so that the time is that of the data
/// the query really uses). `None` when `query` reads no series (`vector(1)`, `time()`):
/// its value is computed at the evaluation time.
pub fn freshness_query(query: &str) -> Option<String> {
    let selectors = promql_selectors(query);
    match selectors.as_slice() {
        [] => None,
        [one] => Some(format!("max(timestamp({one}))")),
        many => {
            // `timestamp` drops metric names: without a label of their own, two selectors'
            // series with the same labels would collide in `or`.
            let parts: Vec<String> = many
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    format!(r#"label_replace(timestamp({s}), "{SELECTOR_LABEL}", "{i}", "", "")"#)
                })
                .collect();
            Some(format!("max({})", parts.join(" or ")))
        }
    }
}

/// Keywords after which a parenthesised list holds label names, not expressions.
const LABEL_LIST_KEYWORDS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Keywords that are never metric names where they stand (PromQL keywords are
/// case-insensitive).
const KEYWORDS: [&str; 22] = [
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "avg",
    "count",
    "min",
    "max",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "count_values",
    "quantile",
    "limitk",
    "limit_ratio",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenKind {
    Ident,
    Number,
    Str,
    /// `{...}`, to its closing brace (or the end).
    Matchers,
    /// `[...]`: a range or a subquery's range and resolution.
    Range,
    LParen,
    RParen,
    At,
    Sign,
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: TokenKind,
    start: usize,
    end: usize,
}

/// Splits PromQL into tokens. Every position it stops at is an ASCII byte or the end, so
/// every `start..end` is a valid `str` range.
fn tokens(q: &str) -> Vec<Token> {
    let b = q.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_start = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c == b':';
    let ident_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    // Skips a quoted string starting at `i`; returns the index after its closing quote.
    let skip_string = |mut i: usize| -> usize {
        let quote = b[i];
        i += 1;
        while i < b.len() && b[i] != quote {
            if b[i] == b'\\' && quote != b'`' {
                i += 1;
            }
            i += 1;
        }
        (i + 1).min(b.len())
    };
    while i < b.len() {
        let c = b[i];
        let start = i;
        let kind = match c {
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' | b'`' => {
                i = skip_string(i);
                TokenKind::Str
            }
            b'{' | b'[' => {
                let close = if c == b'{' { b'}' } else { b']' };
                i += 1;
                while i < b.len() && b[i] != close {
                    if matches!(b[i], b'"' | b'\'' | b'`') {
                        i = skip_string(i);
                    } else {
                        i += 1;
                    }
                }
                i = (i + 1).min(b.len());
                if c == b'{' {
                    TokenKind::Matchers
                } else {
                    TokenKind::Range
                }
            }
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                // Numbers and durations: 1, 0.5, 1e-3, 0x1f, 5m, 1h30m.
                i += 1;
                while i < b.len() {
                    let d = b[i];
                    let exponent_sign = matches!(d, b'+' | b'-')
                        && matches!(b[i - 1], b'e' | b'E')
                        && !q[start..i].starts_with("0x");
                    if d.is_ascii_alphanumeric() || d == b'.' || d == b'_' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                TokenKind::Number
            }
            c if ident_start(c) => {
                while i < b.len() && ident_char(b[i]) {
                    i += 1;
                }
                TokenKind::Ident
            }
            b'(' => {
                i += 1;
                TokenKind::LParen
            }
            b')' => {
                i += 1;
                TokenKind::RParen
            }
            b'@' => {
                i += 1;
                TokenKind::At
            }
            b'+' | b'-' => {
                i += 1;
                TokenKind::Sign
            }
            _ => {
                // Operators and anything else; a multi-byte character is skipped whole.
                i += 1;
                while i < b.len() && !b[i].is_ascii() && (b[i] & 0xC0) == 0x80 {
                    i += 1;
                }
                TokenKind::Other
            }
        };
        out.push(Token {
            kind,
            start,
            end: i,
        });
    }
    out
}

/// The vector selectors of a PromQL expression, each as an instant selector with its
/// `offset` and `@` modifiers (`x{a="b"}[5m] offset 1h` gives `x{a="b"} offset 1h`), in
/// order of appearance and without repeats. Function names, keywords, label lists (`by`,
/// `on`...), strings and numbers are not selectors. Never fails: text it cannot make sense
/// of is skipped (Prometheus reports the errors of the query itself).
pub fn promql_selectors(query: &str) -> Vec<String> {
    let toks = tokens(query);
    let text = |t: &Token| &query[t.start..t.end];
    let kind = |i: usize| toks.get(i).map(|t| t.kind);
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let selector_end = match t.kind {
            TokenKind::Ident => {
                let word = text(&t).to_ascii_lowercase();
                if kind(i + 1) == Some(TokenKind::LParen) {
                    if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                        // Skip the label names up to the closing parenthesis.
                        i += 2;
                        while i < toks.len() && toks[i].kind != TokenKind::RParen {
                            i += 1;
                        }
                    }
                    // A function call or an aggregation: its arguments are scanned next.
                    i += 1;
                    continue;
                }
                if LABEL_LIST_KEYWORDS.contains(&word.as_str()) || KEYWORDS.contains(&word.as_str())
                {
                    i += 1;
                    continue;
                }
                if kind(i + 1) == Some(TokenKind::Matchers) {
                    i += 2;
                    toks[i - 1].end
                } else {
                    i += 1;
                    t.end
                }
            }
            TokenKind::Matchers => {
                i += 1;
                t.end
            }
            _ => {
                i += 1;
                continue;
            }
        };
        let mut selector = query[t.start..selector_end].to_string();
        // Modifiers: a range (dropped), `offset [+-]duration`, `@ time|start()|end()`.
        loop {
            match kind(i) {
                Some(TokenKind::Range) => i += 1,
                Some(TokenKind::Ident) if text(&toks[i]).eq_ignore_ascii_case("offset") => {
                    let from = toks[i].start;
                    let mut j = i + 1;
                    if kind(j) == Some(TokenKind::Sign) {
                        j += 1;
                    }
                    if kind(j) != Some(TokenKind::Number) {
                        break;
                    }
                    selector.push(' ');
                    selector.push_str(&query[from..toks[j].end]);
                    i = j + 1;
                }
                Some(TokenKind::At) => {
                    let from = toks[i].start;
                    let mut j = i + 1;
                    if kind(j) == Some(TokenKind::Sign) {
                        j += 1;
                    }
                    let end = match kind(j) {
                        Some(TokenKind::Number) => toks[j].end,
                        Some(TokenKind::Ident)
                            if kind(j + 1) == Some(TokenKind::LParen)
                                && kind(j + 2) == Some(TokenKind::RParen) =>
                        {
                            j += 2;
                            toks[j].end
                        }
                        _ => break,
                    };
                    selector.push(' ');
                    selector.push_str(&query[from..end]);
                    i = j + 1;
                }
                _ => break,
            }
        }
        if !out.contains(&selector) {
            out.push(selector);
        }
    }
    out
}

/// The newest sample time and the one before it, from a freshness range query's values
/// (each step's newest sample time).
pub(super) fn newest_two(values: impl IntoIterator<Item = f64>) -> Option<(f64, Option<f64>)> {
    let mut newest: Option<f64> = None;
    let mut previous: Option<f64> = None;
    for v in values.into_iter().filter(|v| v.is_finite()) {
        match newest {
            Some(n) if v == n => {}
            Some(n) if v > n => {
                previous = Some(n);
                newest = Some(v);
            }
            Some(_) => {
                if previous.is_none_or(|p| v > p) {
                    previous = Some(v);
                }
            }
            None => newest = Some(v),
        }
    }
    newest.map(|n| (n, previous))
}

/// The time a sample whose newest data is at `newest` (seconds) stands for: until the next
/// sample is due, one sampling interval later (the gap to the sample before, at most the
/// window), never after `now`. A lone sample stands for its own time only.
pub(super) fn fresh_until(
    newest: f64,
    previous: Option<f64>,
    window: Duration,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let gap = previous
        .map(|p| (newest - p).clamp(0.0, window.as_secs_f64()))
        .unwrap_or(0.0);
    time(newest + gap).min(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Selectors are found inside functions and aggregations, their ranges dropped;
    /// functions, keywords, label lists, strings and numbers are not selectors.
    #[test]
    fn finds_the_selectors_a_query_reads() {
        let cases: [(&str, &[&str]); 12] = [
            (
                r#"sum(increase(envoy_cluster_upstream_rq{envoy_cluster_name=~"a_.+"}[1m]))"#,
                &[r#"envoy_cluster_upstream_rq{envoy_cluster_name=~"a_.+"}"#],
            ),
            (
                "histogram_quantile(0.99, sum by (le) (rate(rq_time_bucket{c=\"x\"}[90s])))",
                &["rq_time_bucket{c=\"x\"}"],
            ),
            ("up", &["up"]),
            ("vector(0) / vector(0)", &[]),
            ("time() - 5", &[]),
            (
                "sum(rate(errors[5m])) / sum(rate(requests[5m])) * 100",
                &["errors", "requests"],
            ),
            (
                "SUM BY (job) (rate(x[1m])) AND ON (job) GROUP_LEFT (team) y",
                &["x", "y"],
            ),
            (
                "rate(x[5m] offset -1h) / rate(x[5m] @ end()) + x @ 1700000000.5 offset 1w",
                &["x offset -1h", "x @ end()", "x @ 1700000000.5 offset 1w"],
            ),
            (
                r#"max_over_time(rate({__name__="a:b:c", x="}[5m]"}[1m])[10m:30s])"#,
                &[r#"{__name__="a:b:c", x="}[5m]"}"#],
            ),
            (
                "count_values(\"le\", x) # a comment with y{z=\"1\"}\n + inf + NaN",
                &["x"],
            ),
            ("x == bool 1e-3 unless topk(3, y)", &["x", "y"]),
            ("sum(x) + sum(x)", &["x"]),
        ];
        for (query, expected) in cases {
            assert_eq!(promql_selectors(query), expected, "{query}");
        }
    }

    /// One selector is `max(timestamp(...))`; several are kept apart by a label so that
    /// `or` keeps them all.
    #[test]
    fn freshness_queries() {
        assert_eq!(
            freshness_query("sum(rate(x{a=\"b\"}[1m]))").as_deref(),
            Some("max(timestamp(x{a=\"b\"}))")
        );
        assert_eq!(
            freshness_query("rate(x[1m]) / rate(y[1m] offset 1h)").as_deref(),
            Some(
                r#"max(label_replace(timestamp(x), "serin_selector", "0", "", "") or label_replace(timestamp(y offset 1h), "serin_selector", "1", "", ""))"#
            )
        );
        assert_eq!(freshness_query("vector(1)"), None);
    }

    /// A sample stands for its series for one sampling interval (at most the window), and
    /// never past the evaluation time.
    #[test]
    fn fresh_until_the_next_sample_is_due() {
        let now = Utc.timestamp_opt(1_000, 0).unwrap();
        let w = Duration::from_secs(300);
        assert_eq!(
            newest_two([700.0, 700.0, 710.0, 720.0, 720.0]),
            Some((720.0, Some(710.0)))
        );
        assert_eq!(newest_two([f64::NAN, 5.0, 5.0]), Some((5.0, None)));
        assert_eq!(newest_two([]), None);
        assert_eq!(
            fresh_until(720.0, Some(710.0), w, now),
            Utc.timestamp_opt(730, 0).unwrap()
        );
        assert_eq!(fresh_until(995.0, Some(985.0), w, now), now);
        assert_eq!(
            fresh_until(720.0, None, w, now),
            Utc.timestamp_opt(720, 0).unwrap()
        );
        assert_eq!(
            fresh_until(720.0, Some(0.0), w, now),
            Utc.timestamp_opt(1_000, 0).unwrap()
        );
        assert_eq!(
            fresh_until(720.0, Some(0.0), Duration::from_secs(60), now),
            Utc.timestamp_opt(780, 0).unwrap()
        );
    }

    /// Basic auth is standard base64 with padding.
    #[test]
    fn base64_encodes_like_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }
}
