//! The Prometheus provider: instant queries at the evaluation time, with a timeout, optional
//! bearer or basic auth from a Secret, and custom headers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use prometheus_http_query::Client;
use prometheus_http_query::response::Data;
use reqwest::header::{HeaderName, HeaderValue};

use crate::api::{MetricSpec, PrometheusProvider, ProviderKind};

use super::presets::{self, Kind};
use super::template::Vars;
use super::{
    ArmCounts, CanaryContext, Evidence, Measurement, MetricError, MetricProvider, ProviderMetrics,
    Sample, SecretLookup,
};

const PROVIDER: &str = "prometheus";

/// Settings of the Prometheus provider.
#[derive(Clone, Debug)]
pub struct PrometheusOptions {
    /// Query timeout when `provider.prometheus.timeout` is not set.
    pub default_timeout: Duration,
    /// Timeout for opening a TCP connection.
    pub connect_timeout: Duration,
}

impl Default for PrometheusOptions {
    fn default() -> Self {
        PrometheusOptions {
            default_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Runs PromQL instant queries. One HTTP connection pool is shared by every address.
pub struct Prometheus {
    http: reqwest::Client,
    clients: Mutex<HashMap<String, Client>>,
    secrets: Arc<dyn SecretLookup>,
    options: PrometheusOptions,
    metrics: ProviderMetrics,
}

/// One value of an instant query, or nothing when no series matched.
type Instant = Option<(f64, DateTime<Utc>)>;

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
            clients: Mutex::new(HashMap::new()),
            secrets,
            options,
            metrics,
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
        let results = futures::future::join_all(
            queries
                .iter()
                .map(|q| self.instant(&client, &headers, timeout, q, now)),
        )
        .await;
        let result = match metric.preset.map(presets::kind) {
            Some(Kind::ErrorRate) => error_rate(&queries, results, now),
            Some(Kind::LatencyP99) => latency(&queries, results),
            None => results
                .into_iter()
                .next()
                .unwrap_or_else(|| Err(MetricError::Provider("no query was run".into())))
                .and_then(|v| single(&queries[0], v)),
        };
        Measurement { queries, result }
    }
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

fn map_error(client: &Client, query: &str, e: prometheus_http_query::Error) -> MetricError {
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

#[cfg(test)]
mod tests {
    use super::*;

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
