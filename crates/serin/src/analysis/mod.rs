//! Turns metric samples into verdicts: pass, fail or inconclusive against a metric's bounds.
//!
//! Threshold judging only, for now; comparative (primary versus canary) and statistical
//! judges come later and will use the per-arm evidence a sample may carry. This module does
//! no I/O: providers in `metrics` produce [`Outcome`]s, and the rollout state machine asks
//! [`judge`] what they mean.

pub mod sequential;
pub mod simulate;

use chrono::{DateTime, Utc};

use crate::api::{MetricSpec, Verdict};

/// What a metric provider returned for one metric.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A number, with the sample size behind it when known (for example canary requests in
    /// the window).
    Value {
        /// The value the bounds apply to.
        value: f64,
        /// How many samples it summarises, when known.
        sample_size: Option<u64>,
    },
    /// The query ran but returned nothing usable. The reason says what to check.
    NoData {
        /// One line a user can act on.
        reason: String,
    },
    /// The provider failed (unreachable, timeout, bad query, permissions...).
    Error {
        /// A short constant category, used as a metric label.
        category: &'static str,
        /// One line a user can act on.
        message: String,
    },
}

/// A metric's outcome and the time its data reaches.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricObservation {
    /// `spec.analysis.metrics[].name`.
    pub name: String,
    /// What the provider returned.
    pub outcome: Outcome,
    /// The time the data reaches (`metrics::Sample::timestamp`): the newest sample plus
    /// its sampling interval, or the newest CloudWatch datapoint plus its period; the
    /// evaluation time when there is no value. `rollout` judges an observation older than
    /// the check's due time stale.
    pub at: DateTime<Utc>,
}

/// The looks of every sequential metric on one grid: `from`, `from + lookInterval`, ...,
/// `through`.
#[derive(Clone, Debug, PartialEq)]
pub struct LookBatch {
    /// The time the first look's window starts (the state's `through`).
    pub from: DateTime<Utc>,
    /// The end of the last look's window.
    pub through: DateTime<Utc>,
    /// One entry per sequential metric.
    pub metrics: Vec<MetricLooks>,
}

/// One sequential metric's looks, in time order, or why there are none (an `Outcome`
/// that is `NoData` or `Error`).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricLooks {
    /// `spec.analysis.metrics[].name`.
    pub name: String,
    /// Each look's per-arm increases, or why they could not be read.
    pub result: Result<Vec<sequential::Look>, Outcome>,
}

/// The grid of look times from `from` (its whole second) by `step` (whole seconds, at
/// least one) up to `now`, at most [`MAX_LOOKS`] looks: `from` first, then one time per look.
pub fn look_grid(
    from: DateTime<Utc>,
    step: std::time::Duration,
    now: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let step = step.as_secs().max(1) as i64;
    let start = from.timestamp();
    let looks = (now.timestamp() - start)
        .div_euclid(step)
        .clamp(0, MAX_LOOKS as i64);
    (0..=looks)
        .filter_map(|k| DateTime::from_timestamp(start + k * step, 0))
        .collect()
}

/// The most looks one fetch covers (a Prometheus range query answers at most 11,000
/// points); a longer gap is caught up over several reconciles.
pub const MAX_LOOKS: usize = 5_000;

/// The verdict on one outcome, with a one-line explanation.
pub fn judge(metric: &MetricSpec, outcome: &Outcome) -> (Verdict, String) {
    match outcome {
        Outcome::NoData { reason } => (Verdict::Inconclusive, format!("no data: {reason}")),
        Outcome::Error { message, .. } => {
            (Verdict::Inconclusive, format!("provider error: {message}"))
        }
        Outcome::Value { value, sample_size } => {
            if !value.is_finite() {
                return (
                    Verdict::Inconclusive,
                    format!(
                        "value is {value}, not a number a bound can judge (is the denominator zero?)"
                    ),
                );
            }
            let shown = display_value(*value);
            if let (Some(min), Some(n)) = (metric.min_sample_size, sample_size)
                && *n < min
            {
                return (
                    Verdict::Inconclusive,
                    format!("{shown} from {n} samples, fewer than minSampleSize {min}"),
                );
            }
            if let Some(max) = metric.max
                && *value > max
            {
                return (Verdict::Fail, format!("{shown} is above max {max}"));
            }
            if let Some(min) = metric.min
                && *value < min
            {
                return (Verdict::Fail, format!("{shown} is below min {min}"));
            }
            (
                Verdict::Pass,
                format!("{shown} is within bounds{}", bounds_text(metric)),
            )
        }
    }
}

/// A value as people read it: at most three decimals, no trailing zeros (`891.304`, `8`).
pub fn display_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

fn bounds_text(metric: &MetricSpec) -> String {
    match (metric.min, metric.max) {
        (Some(lo), Some(hi)) => format!(" [{lo}, {hi}]"),
        (None, Some(hi)) => format!(" (max {hi})"),
        (Some(lo), None) => format!(" (min {lo})"),
        (None, None) => String::new(),
    }
}

/// The verdict of a whole check: any failure fails it; any inconclusive metric makes it
/// inconclusive; otherwise a metric still waiting for evidence makes it wait; it passes only
/// when every metric passed (and there was at least one).
pub fn combine(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
    let (mut any, mut inconclusive, mut waiting) = (false, false, false);
    for v in verdicts {
        any = true;
        match v {
            Verdict::Fail => return Verdict::Fail,
            Verdict::Inconclusive => inconclusive = true,
            Verdict::Waiting => waiting = true,
            Verdict::Pass => {}
        }
    }
    if !any || inconclusive {
        Verdict::Inconclusive
    } else if waiting {
        Verdict::Waiting
    } else {
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PrometheusProvider, ProviderSpec};

    fn metric(min: Option<f64>, max: Option<f64>, min_samples: Option<u64>) -> MetricSpec {
        MetricSpec {
            name: "m".into(),
            provider: ProviderSpec {
                prometheus: Some(PrometheusProvider {
                    address: "http://p:9090".into(),
                    timeout: None,
                    secret_ref: None,
                    headers: vec![],
                }),
                cloud_watch: None,
            },
            preset: None,
            query: Some("x".into()),
            metric_data_queries: None,
            judge: None,
            min,
            max,
            min_sample_size: min_samples,
            window: None,
        }
    }

    fn value(v: f64, n: Option<u64>) -> Outcome {
        Outcome::Value {
            value: v,
            sample_size: n,
        }
    }

    /// Values are judged against max and min; the bound itself passes.
    #[test]
    fn bounds() {
        let m = metric(Some(1.0), Some(5.0), None);
        assert_eq!(judge(&m, &value(5.0, None)).0, Verdict::Pass);
        assert_eq!(judge(&m, &value(1.0, None)).0, Verdict::Pass);
        assert_eq!(judge(&m, &value(5.01, None)).0, Verdict::Fail);
        assert_eq!(judge(&m, &value(0.99, None)).0, Verdict::Fail);
    }

    /// NaN, infinity, no data and errors are never a pass (nor a fail).
    #[test]
    fn unusable_values_are_inconclusive() {
        let m = metric(None, Some(1.0), None);
        for o in [
            value(f64::NAN, None),
            value(f64::INFINITY, None),
            Outcome::NoData {
                reason: "empty".into(),
            },
            Outcome::Error {
                category: "timeout",
                message: "slow".into(),
            },
        ] {
            assert_eq!(judge(&m, &o).0, Verdict::Inconclusive, "{o:?}");
        }
    }

    /// Below minSampleSize even a clear breach is inconclusive; at it, the bound applies.
    #[test]
    fn min_sample_size() {
        let m = metric(None, Some(1.0), Some(100));
        assert_eq!(judge(&m, &value(50.0, Some(99))).0, Verdict::Inconclusive);
        assert_eq!(judge(&m, &value(50.0, Some(100))).0, Verdict::Fail);
        assert_eq!(judge(&m, &value(0.5, None)).0, Verdict::Pass);
    }

    /// Values in messages are rounded to three decimals without trailing zeros.
    #[test]
    fn values_display_briefly() {
        assert_eq!(display_value(891.304347826087), "891.304");
        assert_eq!(display_value(8.0), "8");
        assert_eq!(display_value(0.1), "0.1");
        assert_eq!(display_value(-0.0001), "0");
        let m = metric(None, Some(500.0), None);
        assert_eq!(
            judge(&m, &value(891.304347826087, None)).1,
            "891.304 is above max 500"
        );
    }

    /// One failure fails a check; one inconclusive keeps it from passing; none is not a pass.
    #[test]
    fn combining() {
        use Verdict::*;
        assert_eq!(combine([Pass, Pass]), Pass);
        assert_eq!(combine([Pass, Inconclusive]), Inconclusive);
        assert_eq!(combine([Inconclusive, Fail]), Fail);
        assert_eq!(combine([]), Inconclusive);
        assert_eq!(combine([Pass, Waiting]), Waiting);
        assert_eq!(combine([Waiting, Inconclusive]), Inconclusive);
    }
}
