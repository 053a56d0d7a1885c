//! The demo's in-process metric source: the presets computed from the traffic simulator's
//! counters instead of from Prometheus.
//!
//! The demo's tick loop records a timestamped [`Sample`] of the simulator's counters after
//! every tick into a bounded [`History`]. A check over a window `[now − window, now]` takes
//! the increase between the last sample at or before `now − window` and the last sample at or
//! before `now`, which is what the Prometheus presets compute with `increase()` over scrapes
//! (without Prometheus's extrapolation to the window's edges):
//!
//! - error-rate presets: `100 × canary 5xx / canary requests`, sample size the canary's
//!   requests; no canary requests in the window is no data, never 0%;
//! - latency presets: the canary's p99 in milliseconds by [`histogram_quantile`] over the
//!   increase of each bucket, interpolating linearly inside a bucket as Prometheus does;
//!   sample size the canary's requests.
//!
//! It only knows presets: a PromQL `query` or CloudWatch queries get a `config` error (the
//! demo's Canary uses presets only). It does no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::traffic::{ArmTotals, ENVOY_BUCKETS_MS, TrafficSimulator};
use crate::analysis::sequential::{Counts, Look};
use crate::analysis::{LookBatch, MetricLooks, MetricObservation, Outcome};
use crate::arms::PerArm;
use crate::controller::MetricSource;
use crate::metrics::CanaryContext;
use crate::metrics::presets::{self, Kind};
use crate::view::Served;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

/// The simulator's counters of one service at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// When they were read.
    pub at: DateTime<Utc>,
    /// Primary totals.
    pub primary: ArmTotals,
    /// Canary totals.
    pub canary: ArmTotals,
    /// Canary latency histogram: requests per bucket of [`ENVOY_BUCKETS_MS`] (not cumulative).
    pub canary_buckets: Vec<u64>,
    /// Primary latency histogram, the same way.
    pub primary_buckets: Vec<u64>,
}

/// An arm's simulator totals as the view shows them.
pub fn served(t: ArmTotals) -> Served {
    Served {
        requests: t.requests,
        errors: t.errors,
    }
}

impl Sample {
    /// Each arm's totals as the view shows them.
    pub fn served(&self) -> PerArm<Served> {
        PerArm {
            primary: served(self.primary),
            canary: served(self.canary),
        }
    }

    /// All counters at zero: a simulator before its first tick.
    pub fn zero(at: DateTime<Utc>) -> Sample {
        Sample {
            at,
            primary: ArmTotals::default(),
            canary: ArmTotals::default(),
            canary_buckets: vec![0; ENVOY_BUCKETS_MS.len()],
            primary_buckets: vec![0; ENVOY_BUCKETS_MS.len()],
        }
    }

    /// Reads service `index` of `sim`.
    pub fn read(sim: &TrafficSimulator, index: usize, at: DateTime<Utc>) -> Option<Sample> {
        let (primary, canary) = sim.totals(index)?;
        let (primary_buckets, canary_buckets) = sim.histograms(index)?;
        Some(Sample {
            at,
            primary,
            canary,
            canary_buckets,
            primary_buckets,
        })
    }
}

/// Timestamped samples of one service, oldest first, kept for `retention`.
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
    retention: chrono::Duration,
}

impl History {
    /// A history that starts with `first` and keeps samples for `retention` (at least the
    /// longest metric window).
    pub fn new(first: Sample, retention: Duration) -> Self {
        History {
            samples: Mutex::new(VecDeque::from([first])),
            retention: chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX),
        }
    }

    /// Appends a sample (samples must come in time order) and forgets those older than the
    /// retention, always keeping one at or before the retention's start.
    pub fn record(&self, sample: Sample) {
        let Ok(mut samples) = self.samples.lock() else {
            return;
        };
        let horizon = sample.at - self.retention;
        samples.push_back(sample);
        while samples.len() > 2 && samples.get(1).is_some_and(|s| s.at <= horizon) {
            samples.pop_front();
        }
    }

    /// The last sample at or before `t`.
    pub fn at(&self, t: DateTime<Utc>) -> Option<Sample> {
        let samples = self.samples.lock().ok()?;
        samples.iter().rev().find(|s| s.at <= t).cloned()
    }

    /// The oldest sample kept.
    pub fn oldest(&self) -> Option<Sample> {
        self.samples.lock().ok()?.front().cloned()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.lock().ok()?.back().cloned()
    }

    /// The samples bounding `[end − window, end]`: the last at or before the start (else the
    /// oldest), and the last at or before the end. `None` when there is no sample at or
    /// before `end`.
    pub fn window(&self, end: DateTime<Utc>, window: Duration) -> Option<(Sample, Sample)> {
        let samples = self.samples.lock().ok()?;
        let start = end - chrono::Duration::from_std(window).ok()?;
        let last = samples.iter().rev().find(|s| s.at <= end)?.clone();
        let first = samples
            .iter()
            .rev()
            .find(|s| s.at <= start)
            .or_else(|| samples.front())?
            .clone();
        Some((first, last))
    }
}

/// The error-rate preset over the samples `from` → `to`.
pub fn error_rate(from: &Sample, to: &Sample) -> Outcome {
    let requests = to.canary.requests.saturating_sub(from.canary.requests);
    let errors = to.canary.errors.saturating_sub(from.canary.errors);
    if requests == 0 {
        return Outcome::NoData {
            reason: "no requests reached the canary in the window".into(),
        };
    }
    Outcome::Value {
        value: 100.0 * errors as f64 / requests as f64,
        sample_size: Some(requests),
    }
}

/// The p99 latency preset over the samples `from` → `to`.
pub fn latency_p99(from: &Sample, to: &Sample) -> Outcome {
    let increase: Vec<u64> = to
        .canary_buckets
        .iter()
        .zip(from.canary_buckets.iter().chain(std::iter::repeat(&0)))
        .map(|(b, a)| b.saturating_sub(*a))
        .collect();
    let requests: u64 = increase.iter().sum();
    match histogram_quantile(0.99, &ENVOY_BUCKETS_MS, &increase) {
        Some(value) => Outcome::Value {
            value,
            sample_size: Some(requests),
        },
        None => Outcome::NoData {
            reason: "no requests reached the canary in the window".into(),
        },
    }
}

/// Prometheus's `histogram_quantile(q, ...)` over per-bucket counts (not cumulative) whose
/// upper bounds are `bounds`, followed by an implicit `+Inf` bucket that holds nothing more
/// (the simulator files slower requests in the last finite bucket). `None` when there are no
/// observations (Prometheus returns NaN).
pub fn histogram_quantile(q: f64, bounds: &[f64], counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || bounds.is_empty() || q.is_nan() {
        return None;
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, (&upper, &count)) in bounds.iter().zip(counts).enumerate() {
        let cumulative = below + count;
        if cumulative as f64 >= rank {
            if i == 0 && upper <= 0.0 {
                return Some(upper);
            }
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let within = rank - below as f64;
            return Some(lower + (upper - lower) * within / count as f64);
        }
        below = cumulative;
    }
    // The rank falls in the +Inf bucket: the highest finite bound, as Prometheus answers.
    bounds.last().copied()
}

/// The sequential judge's counts of one arm between two samples: requests and errors, or
/// requests and requests slower than `max` ms (for latency presets).
fn arm_counts(
    kind: Kind,
    max: Option<f64>,
    from: (&ArmTotals, &[u64]),
    to: (&ArmTotals, &[u64]),
) -> Counts {
    match kind {
        Kind::ErrorRate => Counts {
            requests: to.0.requests.saturating_sub(from.0.requests) as f64,
            bad: to.0.errors.saturating_sub(from.0.errors) as f64,
        },
        Kind::LatencyP99 => {
            let increase: Vec<u64> =
                to.1.iter()
                    .zip(from.1.iter().chain(std::iter::repeat(&0)))
                    .map(|(b, a)| b.saturating_sub(*a))
                    .collect();
            let requests: u64 = increase.iter().sum();
            let fast: u64 = ENVOY_BUCKETS_MS
                .iter()
                .zip(&increase)
                .filter(|(edge, _)| max.is_some_and(|m| **edge <= m))
                .map(|(_, n)| *n)
                .sum();
            Counts {
                requests: requests as f64,
                bad: requests.saturating_sub(fast) as f64,
            }
        }
    }
}

/// The looks between consecutive `grid` times of `history`, as the Prometheus provider
/// computes them from cumulative counters.
pub fn looks(
    history: &History,
    kind: Kind,
    max: Option<f64>,
    grid: &[DateTime<Utc>],
) -> Result<Vec<Look>, Outcome> {
    let samples: Vec<Sample> = grid
        .iter()
        // Before the history's first sample (zero counters when the traffic started)
        // nothing had been served: that sample stands for those times.
        .map(|t| history.at(*t).or_else(|| history.oldest().filter(|o| o.at > *t)))
        .collect::<Option<_>>()
        .ok_or_else(|| Outcome::NoData {
            reason: format!(
                "no simulated traffic samples at the look times {} to {} (the oldest kept is from {})",
                grid.first().map(|t| t.to_rfc3339()).unwrap_or_default(),
                grid.last().map(|t| t.to_rfc3339()).unwrap_or_default(),
                history.oldest().map(|s| s.at.to_rfc3339()).unwrap_or_default()
            ),
        })?;
    Ok(samples
        .windows(2)
        .map(|w| Look {
            primary: arm_counts(
                kind,
                max,
                (&w[0].primary, &w[0].primary_buckets),
                (&w[1].primary, &w[1].primary_buckets),
            ),
            canary: arm_counts(
                kind,
                max,
                (&w[0].canary, &w[0].canary_buckets),
                (&w[1].canary, &w[1].canary_buckets),
            ),
        })
        .collect())
}

/// The metric source the demo's controller uses: one [`History`] per Canary.
#[derive(Default)]
pub struct InProcessSource {
    histories: RwLock<HashMap<(String, String), Arc<History>>>,
}

impl InProcessSource {
    /// An empty source.
    pub fn new() -> Self {
        InProcessSource::default()
    }

    /// Makes `history` the traffic of Canary `namespace/name` (replacing any before).
    pub fn attach(&self, namespace: &str, name: &str, history: Arc<History>) {
        if let Ok(mut h) = self.histories.write() {
            h.insert((namespace.to_string(), name.to_string()), history);
        }
    }

    fn history(&self, canary: &CanaryContext) -> Option<Arc<History>> {
        let key = (canary.namespace.clone(), canary.name.clone());
        self.histories.read().ok()?.get(&key).cloned()
    }

    /// Evaluates one Canary's metrics at `now` (what the controller calls).
    pub fn evaluate_at(
        &self,
        canary: &CanaryContext,
        now: DateTime<Utc>,
    ) -> Vec<MetricObservation> {
        let history = self.history(canary);
        canary
            .spec
            .analysis
            .metrics
            .iter()
            .map(|metric| {
                let window: Duration = metric
                    .window
                    .unwrap_or(canary.spec.analysis.interval)
                    .into();
                let outcome = match (metric.preset, &history) {
                    (None, _) => Outcome::Error {
                        category: "config",
                        message: "the demo's in-process source computes presets only".into(),
                    },
                    (Some(_), None) => Outcome::NoData {
                        reason: "no simulated traffic for this Canary".into(),
                    },
                    (Some(preset), Some(history)) => match history.window(now, window) {
                        None => Outcome::NoData {
                            reason: "no samples in the window".into(),
                        },
                        Some((from, to)) => match presets::kind(preset) {
                            Kind::ErrorRate => error_rate(&from, &to),
                            Kind::LatencyP99 => latency_p99(&from, &to),
                        },
                    },
                };
                MetricObservation {
                    name: metric.name.clone(),
                    outcome,
                    at: now,
                }
            })
            .collect()
    }
}

#[async_trait]
impl MetricSource for InProcessSource {
    async fn evaluate(&self, canary: &CanaryContext, now: DateTime<Utc>) -> Vec<MetricObservation> {
        self.evaluate_at(canary, now)
            .into_iter()
            .filter(|o| {
                canary
                    .spec
                    .analysis
                    .metrics
                    .iter()
                    .any(|m| m.name == o.name && m.is_read_at_checks())
            })
            .collect()
    }

    async fn looks(
        &self,
        canary: &CanaryContext,
        from: DateTime<Utc>,
        step: Duration,
        now: DateTime<Utc>,
    ) -> LookBatch {
        let grid = crate::analysis::look_grid(from, step, now);
        let history = self.history(canary);
        let metrics = canary
            .spec
            .analysis
            .metrics
            .iter()
            .filter(|m| m.is_sequential())
            .map(|m| MetricLooks {
                name: m.name.clone(),
                result: match (m.preset, &history) {
                    (Some(preset), Some(h)) => looks(h, presets::kind(preset), m.max, &grid),
                    _ => Err(Outcome::NoData {
                        reason: "no simulated traffic for this Canary".into(),
                    }),
                },
            })
            .collect();
        LookBatch {
            from: grid.first().copied().unwrap_or(from),
            through: grid.last().copied().unwrap_or(from),
            metrics,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Canary;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn sample(secs: i64, canary: (u64, u64), buckets: &[(usize, u64)]) -> Sample {
        let mut s = Sample::zero(at(secs));
        s.canary = ArmTotals {
            requests: canary.0,
            errors: canary.1,
        };
        for &(i, n) in buckets {
            s.canary_buckets[i] = n;
        }
        s
    }

    /// Error rate is 100 × canary 5xx / canary requests over the window: 8 errors in 200
    /// requests is 4%, and no canary requests is no data.
    #[test]
    fn error_rate_over_the_window() {
        let h = History::new(Sample::zero(at(0)), Duration::from_secs(600));
        h.record(sample(10, (100, 2), &[]));
        h.record(sample(20, (300, 10), &[]));
        h.record(sample(30, (300, 10), &[]));
        let (from, to) = h.window(at(20), Duration::from_secs(10)).unwrap();
        assert_eq!((from.at, to.at), (at(10), at(20)));
        assert_eq!(
            error_rate(&from, &to),
            Outcome::Value {
                value: 4.0,
                sample_size: Some(200)
            }
        );
        let (from, to) = h.window(at(30), Duration::from_secs(10)).unwrap();
        assert!(matches!(error_rate(&from, &to), Outcome::NoData { .. }));
        // A window reaching before the first sample starts at the first sample.
        let (from, _) = h.window(at(20), Duration::from_secs(60)).unwrap();
        assert_eq!(from.at, at(0));
    }

    /// p99 interpolates linearly in the bucket holding the 99th percentile, as
    /// histogram_quantile does: with 10/80/5/5 requests in the 10/25/50/100 ms buckets, rank
    /// 99 lies 4/5 into (50, 100], so p99 = 90 ms.
    #[test]
    fn p99_by_linear_interpolation() {
        let bounds = &ENVOY_BUCKETS_MS;
        // Indexes 3..=6 are the buckets le=10, 25, 50 and 100.
        let from = sample(0, (50, 0), &[(3, 5), (4, 40)]);
        let to = sample(60, (150, 0), &[(3, 15), (4, 120), (5, 5), (6, 5)]);
        assert_eq!(
            latency_p99(&from, &to),
            Outcome::Value {
                value: 90.0,
                sample_size: Some(100)
            }
        );
        // Median: rank 50 lies 40/80 into (10, 25].
        let mut counts = vec![0; bounds.len()];
        counts[3..=6].copy_from_slice(&[10, 80, 5, 5]);
        assert_eq!(histogram_quantile(0.5, bounds, &counts), Some(17.5));
        // Everything in the first bucket: interpolated from 0.
        assert_eq!(histogram_quantile(0.5, &[0.5, 1.0], &[4, 0]), Some(0.25));
        assert_eq!(
            histogram_quantile(0.99, bounds, &vec![0; bounds.len()]),
            None
        );
    }

    /// Evaluated as the controller calls it, the demo's Canary gets both presets over its
    /// interval from the attached history, no data for a Canary with no traffic, and a config
    /// error for a PromQL query.
    #[test]
    fn evaluates_the_demo_canary() {
        let canary: Canary =
            serde_json::from_value(crate::demo::canary_manifest(Duration::from_secs(10))).unwrap();
        let arms = crate::router::data_plane_arms(&canary).unwrap();
        let mut canary = CanaryContext::of(&canary, arms);
        let source = InProcessSource::new();
        let none = source.evaluate_at(&canary, at(10));
        assert!(
            none.iter()
                .all(|o| matches!(o.outcome, Outcome::NoData { .. }))
        );

        let h = Arc::new(History::new(Sample::zero(at(0)), Duration::from_secs(60)));
        h.record(sample(5, (100, 0), &[(4, 100)]));
        h.record(sample(15, (300, 5), &[(4, 200), (7, 100)]));
        source.attach("appmesh-demo", "colorteller", h);
        let obs = source.evaluate_at(&canary, at(15));
        assert_eq!(obs[0].name, "error-rate");
        assert_eq!(
            obs[0].outcome,
            Outcome::Value {
                value: 2.5,
                sample_size: Some(200)
            }
        );
        // 100 in (10, 25] and 100 in (100, 250]: rank 198 is 98/100 into (100, 250].
        assert_eq!(obs[1].name, "p99-latency");
        assert_eq!(
            obs[1].outcome,
            Outcome::Value {
                value: 247.0,
                sample_size: Some(200)
            }
        );
        assert_eq!(obs[1].at, at(15));

        canary.spec.analysis.metrics[0].preset = None;
        canary.spec.analysis.metrics[0].query = Some("up".into());
        let obs = source.evaluate_at(&canary, at(15));
        assert!(matches!(
            obs[0].outcome,
            Outcome::Error {
                category: "config",
                ..
            }
        ));
    }

    /// The history forgets samples older than its retention but keeps one at or before the
    /// retention's start, so the longest window still has a base.
    #[test]
    fn history_is_bounded() {
        let h = History::new(Sample::zero(at(0)), Duration::from_secs(10));
        for s in 1..=100 {
            h.record(sample(s, (s as u64, 0), &[]));
        }
        let (from, to) = h.window(at(100), Duration::from_secs(10)).unwrap();
        assert_eq!((from.at, to.at), (at(90), at(100)));
        assert!(h.samples.lock().unwrap().len() <= 12);
    }
}
