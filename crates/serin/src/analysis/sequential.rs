//! The comparative, anytime-valid judge: is the canary worse than the primary, and is it
//! worse than the bound the user wrote, decided at every look without inflating false alarms.
//!
//! # Model
//! A look gives, per arm, the requests `n` and the "bad" requests `b` (5xx for error rates,
//! slower than the bound for latency) since the previous look: increases of cumulative
//! counters, so every request is counted once however often Serin looks.
//!
//! - **Relative test.** Condition on the look's bad requests `k = b_c + b_p`. If the canary
//!   is no worse, `b_c ~ Binomial(k, ρ)` with `ρ = n_c / (n_c + n_p)`, the canary's *observed*
//!   share of the look's requests: the common rate cancels, so load that rises and falls and
//!   an incident both arms share do not move it. Under "the canary is worse by ×δ" the
//!   success probability is `θ = ρδ / (ρδ + 1 − ρ)`. Serin keeps, for every δ of [`RATIOS`],
//!   the sum over looks of the log-likelihood ratios; the average of their exponentials (a
//!   mixture over δ) is an e-process. By Ville's inequality the chance that it ever reaches
//!   `1/α` when the canary is no worse is at most α, however often one looks, across steps,
//!   pauses and restarts, because ρ may change at every look and each look multiplies in its
//!   own ratio.
//! - **Absolute guard.** A sequential test of "the canary's bad rate is at most `p₀`" (the
//!   metric's `max` as a fraction; for latency 1%, since p99 ≤ max means at most 1% slower):
//!   the binomial likelihood ratio of `κ·p₀` against `p₀` for every κ of [`GUARD_RATIOS`],
//!   mixed the same way. For any true rate at or below `p₀` each factor has expectation at
//!   most 1, so this too is an e-process. Comparing each window with `max` instead would
//!   roll back about half of all good releases whose baseline sits at the bound.
//! - **Several metrics.** The e-values of every test (relative per metric, guard per metric
//!   with a `max`) are averaged, and Serin rolls back when the average reaches `1/α`. The
//!   average of e-values is an e-value whatever the dependence between them (error rate and
//!   latency are read from the same requests), and it is never less powerful than splitting
//!   α evenly (Bonferroni): a single test at `T/α` already lifts the average to `1/α`.
//!
//! This module does no I/O and keeps no clock: the state it updates is
//! [`MetricEvidence`](crate::api::MetricEvidence), persisted in `status.evidence`.

use crate::api::MetricEvidence;

/// The "canary is worse by ×δ" alternatives of the relative test (a uniform mixture).
pub const RATIOS: [f64; 8] = [1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0];

/// The "canary's rate is κ × the bound" alternatives of the absolute guard.
pub const GUARD_RATIOS: [f64; 6] = [1.1, 1.25, 1.5, 2.0, 3.0, 5.0];

/// The warm-up test (`analysis.warmup`) asks whether the canary is more than this many
/// times worse than the primary: while a new canary warms up (cold caches, JIT, connection
/// pools) only a canary failing far more often is rolled back, and its looks are kept out of
/// the main tests. Its null hypothesis is "at most ×10 worse", so a cold start a few times
/// worse is (with probability 1 − α·share) never rolled back, however much traffic it gets.
pub const WARMUP_NULL_RATIO: f64 = 10.0;

/// The alternatives of the warm-up test.
pub const WARMUP_RATIOS: [f64; 3] = [20.0, 50.0, 200.0];

/// The share of α the warm-up test spends when a warm-up is set; the main tests spend the
/// rest, so the chance of any false rollback stays at most α.
pub const WARMUP_ALPHA_SHARE: f64 = 0.1;

/// Default α: the chance, per rollout, of rolling back a canary that is no worse.
pub const DEFAULT_ALPHA: f64 = 0.01;

/// Default regression the step gate waits to be able to see (×3 the baseline rate).
pub const DEFAULT_MIN_DETECTABLE_RATIO: f64 = 3.0;

/// Default floor on canary requests before a step may advance, used alone when the baseline
/// shows no bad requests at all.
pub const DEFAULT_MIN_SAMPLE_SIZE: u64 = 200;

/// Requests and bad requests of one arm.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    /// Requests.
    pub requests: f64,
    /// Requests that failed (errors) or were slower than the bound (latency).
    pub bad: f64,
}

impl Counts {
    /// `bad / requests`, `None` without requests.
    pub fn rate(self) -> Option<f64> {
        (self.requests > 0.0).then(|| self.bad / self.requests)
    }
}

/// One look: both arms' increases since the previous look.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Look {
    /// The stable arm.
    pub primary: Counts,
    /// The new arm.
    pub canary: Counts,
}

/// How a metric's counts are judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// The chance per rollout of rolling back a canary that is no worse.
    pub alpha: f64,
    /// The regression (× the baseline rate) a step waits to be able to detect.
    pub min_detectable_ratio: f64,
    /// The floor on canary requests before a step advances.
    pub min_sample_size: u64,
}

impl Settings {
    /// The settings of `metric` in `analysis`: `alpha`, `minDetectableRatio` and the
    /// metric's `minSampleSize`, or their defaults.
    pub fn of(analysis: &crate::api::AnalysisSpec, metric: &crate::api::MetricSpec) -> Self {
        Settings {
            alpha: analysis.alpha(),
            min_detectable_ratio: analysis.min_detectable_ratio(),
            min_sample_size: metric.min_sample_size.unwrap_or(DEFAULT_MIN_SAMPLE_SIZE),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            alpha: DEFAULT_ALPHA,
            min_detectable_ratio: DEFAULT_MIN_DETECTABLE_RATIO,
            min_sample_size: DEFAULT_MIN_SAMPLE_SIZE,
        }
    }
}

/// A fresh state for `metric`.
pub fn start(metric: &str) -> MetricEvidence {
    MetricEvidence {
        metric: metric.into(),
        log_likelihood_ratios: vec![0.0; RATIOS.len()],
        guard_log_likelihood_ratios: vec![0.0; GUARD_RATIOS.len()],
        primary_guard_log_likelihood_ratios: vec![0.0; GUARD_RATIOS.len()],
        ..MetricEvidence::default()
    }
}

/// Folds one look of the warm-up into `state`: only the warm-up test sees it (its requests
/// count neither as evidence nor toward the main tests).
pub fn update_warmup(state: &mut MetricEvidence, look: &Look) {
    if state.warmup_log_likelihood_ratios.len() != WARMUP_RATIOS.len()
        || !state
            .warmup_log_likelihood_ratios
            .iter()
            .all(|x| x.is_finite())
    {
        state.warmup_log_likelihood_ratios = vec![0.0; WARMUP_RATIOS.len()];
    }
    state.warmup_looks += 1;
    relative_update(
        &mut state.warmup_log_likelihood_ratios,
        WARMUP_NULL_RATIO,
        &WARMUP_RATIOS,
        sane(look.primary),
        sane(look.canary),
    );
}

/// The canary's share of a look's bad requests when it is `delta` times worse, at canary
/// request share `rho`.
fn theta(rho: f64, delta: f64) -> f64 {
    rho * delta / (rho * delta + 1.0 - rho)
}

/// Adds one look's log-likelihood ratios of "×δ worse" against "×`null` worse" (1: no
/// worse). For δ > null, the ratio's expectation is at most 1 whenever the canary is at most
/// `null` times worse (the binomial family has a monotone likelihood ratio).
fn relative_update(llrs: &mut [f64], null: f64, ratios: &[f64], p: Counts, c: Counts) {
    let total = p.requests + c.requests;
    if total <= 0.0 || p.bad + c.bad <= 0.0 {
        return;
    }
    let rho = c.requests / total;
    if rho <= 0.0 || rho >= 1.0 {
        return;
    }
    let theta0 = theta(rho, null);
    for (llr, delta) in llrs.iter_mut().zip(ratios) {
        let theta1 = theta(rho, *delta);
        *llr += c.bad * (theta1 / theta0).ln() + p.bad * ((1.0 - theta1) / (1.0 - theta0)).ln();
    }
}

/// Makes `state` usable: vectors of the wrong length (a status written by another version,
/// or edited) restart from zero, which can only delay a rollback, never cause one.
fn repair(state: &mut MetricEvidence) {
    let ok = |v: &Vec<f64>, n: usize| v.len() == n && v.iter().all(|x| x.is_finite());
    if !ok(&state.log_likelihood_ratios, RATIOS.len()) {
        state.log_likelihood_ratios = vec![0.0; RATIOS.len()];
    }
    if !ok(&state.guard_log_likelihood_ratios, GUARD_RATIOS.len()) {
        state.guard_log_likelihood_ratios = vec![0.0; GUARD_RATIOS.len()];
    }
    if !ok(
        &state.primary_guard_log_likelihood_ratios,
        GUARD_RATIOS.len(),
    ) {
        state.primary_guard_log_likelihood_ratios = vec![0.0; GUARD_RATIOS.len()];
    }
}

/// Counts that cannot be a look's increase (negative, NaN, more bad than requests) are
/// clamped: a counter reset is the provider's business, a garbage number must not move the
/// test.
fn sane(c: Counts) -> Counts {
    let requests = if c.requests.is_finite() {
        c.requests.max(0.0)
    } else {
        0.0
    };
    let bad = if c.bad.is_finite() {
        c.bad.clamp(0.0, requests)
    } else {
        0.0
    };
    Counts { requests, bad }
}

/// Folds one look into `state`. `bound` is the guard's `p₀` (a fraction in (0, 1)), `None`
/// without a guard.
pub fn update(state: &mut MetricEvidence, look: &Look, bound: Option<f64>) {
    repair(state);
    let (p, c) = (sane(look.primary), sane(look.canary));
    state.looks += 1;
    state.primary_requests += p.requests;
    state.primary_bad += p.bad;
    state.canary_requests += c.requests;
    state.canary_bad += c.bad;
    relative_update(&mut state.log_likelihood_ratios, 1.0, &RATIOS, p, c);
    if let Some(p0) = bound.map(guard_bound) {
        guard_update(&mut state.guard_log_likelihood_ratios, c, p0);
        guard_update(&mut state.primary_guard_log_likelihood_ratios, p, p0);
    }
}

/// The guard's `p₀`, kept inside (0, 1) so that `max: 0` (any error is a breach) and
/// `max: 100` stay computable.
fn guard_bound(p0: f64) -> f64 {
    p0.clamp(1e-6, 0.5)
}

fn guard_update(llrs: &mut [f64], c: Counts, p0: f64) {
    if c.requests <= 0.0 {
        return;
    }
    for (llr, kappa) in llrs.iter_mut().zip(GUARD_RATIOS) {
        let p1 = (kappa * p0).min(0.999);
        *llr += c.bad * (p1 / p0).ln() + (c.requests - c.bad) * ((1.0 - p1) / (1.0 - p0)).ln();
    }
}

/// The mixture e-value of log-likelihood ratios (their exponentials averaged), computed
/// without overflow; 1 for an empty list.
pub fn e_value(llrs: &[f64]) -> f64 {
    if llrs.is_empty() {
        return 1.0;
    }
    let top = llrs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !top.is_finite() {
        return if top > 0.0 { f64::INFINITY } else { 0.0 };
    }
    let sum: f64 = llrs.iter().map(|l| (l - top).exp()).sum();
    (top + (sum / llrs.len() as f64).ln()).exp()
}

/// The e-values of one metric's tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EValues {
    /// Canary worse than primary.
    pub relative: f64,
    /// Canary's rate above the bound (`None` without a bound).
    pub guard: Option<f64>,
    /// Primary's rate above the bound (`None` without a bound).
    pub primary_guard: Option<f64>,
}

/// The e-values of `state`; the guards only when `guarded`.
pub fn e_values(state: &MetricEvidence, guarded: bool) -> EValues {
    EValues {
        relative: e_value(&state.log_likelihood_ratios),
        guard: guarded.then(|| e_value(&state.guard_log_likelihood_ratios)),
        primary_guard: guarded.then(|| e_value(&state.primary_guard_log_likelihood_ratios)),
    }
}

/// One metric's state as the combined judgement needs it.
#[derive(Clone, Copy, Debug)]
pub struct Judged<'a> {
    /// The state.
    pub state: &'a MetricEvidence,
    /// Whether the metric has a bound (and so a guard test).
    pub guarded: bool,
}

/// What the tests say about the rollout as a whole.
#[derive(Clone, Debug, PartialEq)]
pub enum Finding {
    /// Nothing rejected yet.
    NoRegression {
        /// The combined e-value (the average over every test).
        e: f64,
    },
    /// The canary is worse than the primary (relative test), or above the bound while the
    /// primary is not.
    Regression {
        /// The metric whose test weighs most.
        metric: String,
        /// That test's e-value.
        e: f64,
        /// The combined e-value.
        combined: f64,
        /// Which test: `relative`, `bound` or `warm-up`.
        test: &'static str,
    },
    /// The canary is above the bound, and so is the primary, with no relative difference:
    /// the baseline is unhealthy too.
    BaselineUnhealthy {
        /// The metric.
        metric: String,
        /// The combined e-value.
        combined: f64,
    },
}

/// Judges every metric's state together: the average of all tests' e-values against `1/α`.
/// With a `warmup`, the warm-up tests' average is judged against `1/(α·share)` first and the
/// main tests get the rest of α.
pub fn judge(metrics: &[Judged<'_>], alpha: f64, warmup: bool) -> Finding {
    let alpha = alpha.clamp(1e-9, 1.0);
    if warmup && !metrics.is_empty() {
        let threshold = 1.0 / (alpha * WARMUP_ALPHA_SHARE);
        let es: Vec<(&str, f64)> = metrics
            .iter()
            .map(|m| {
                (
                    m.state.metric.as_str(),
                    e_value(&m.state.warmup_log_likelihood_ratios),
                )
            })
            .collect();
        let combined = es.iter().map(|e| e.1).sum::<f64>() / es.len() as f64;
        if combined >= threshold {
            let (metric, e) =
                es.iter().copied().fold(
                    ("", f64::NEG_INFINITY),
                    |b, t| if t.1 > b.1 { t } else { b },
                );
            return Finding::Regression {
                metric: metric.into(),
                e,
                combined,
                test: "warm-up",
            };
        }
    }
    let alpha = if warmup {
        alpha * (1.0 - WARMUP_ALPHA_SHARE)
    } else {
        alpha
    };
    let threshold = 1.0 / alpha;
    let mut tests: Vec<(&str, &'static str, f64)> = Vec::new();
    for m in metrics {
        let e = e_values(m.state, m.guarded);
        tests.push((&m.state.metric, "relative", e.relative));
        if let Some(g) = e.guard {
            tests.push((&m.state.metric, "bound", g));
        }
    }
    if tests.is_empty() {
        return Finding::NoRegression { e: 1.0 };
    }
    let combined = tests.iter().map(|t| t.2).sum::<f64>() / tests.len() as f64;
    if combined < threshold {
        return Finding::NoRegression { e: combined };
    }
    // Name the test that weighs most, preferring a relative test that rejects on its own
    // ("worse than the primary" says more than "above max").
    let per_test = threshold * tests.len() as f64;
    let (metric, test, e) = tests
        .iter()
        .copied()
        .filter(|t| t.1 == "relative" && t.2 >= per_test)
        .chain(tests.iter().copied())
        .fold(("", "relative", f64::NEG_INFINITY), |best, t| {
            if best.1 == "relative" && best.2 >= per_test {
                best
            } else if t.2 > best.2 {
                t
            } else {
                best
            }
        });
    if test == "bound" {
        let m = metrics.iter().find(|m| m.state.metric == metric);
        if let Some(m) = m {
            let ev = e_values(m.state, true);
            // The primary breaches the bound as surely, and the relative test sees nothing.
            if ev.primary_guard.is_some_and(|p| p >= per_test) && ev.relative < per_test {
                return Finding::BaselineUnhealthy {
                    metric: metric.into(),
                    combined,
                };
            }
        }
    }
    Finding::Regression {
        metric: metric.into(),
        e,
        combined,
        test,
    }
}

/// Kullback–Leibler divergence of Bernoulli(θ) from Bernoulli(ρ).
fn kl(theta: f64, rho: f64) -> f64 {
    theta * (theta / rho).ln() + (1.0 - theta) * ((1.0 - theta) / (1.0 - rho)).ln()
}

/// The canary requests after which a `min_detectable_ratio` regression would have been
/// caught, on average, by the relative test at level α/`tests` (the share of one test in
/// the average), at the baseline rate and canary share observed so far; never below
/// `min_sample_size`. With no bad request on the primary yet the baseline rate is unknown
/// and the floor alone applies.
///
/// Derivation: under the alternative each bad request moves the log-likelihood ratio of
/// δ = ratio by KL(θ‖ρ) on average; the mixture pays ln |RATIOS| for not knowing δ; and each
/// canary request brings `p₀·(δ + (1 − ρ)/ρ)` bad requests across both arms.
pub fn required_canary_requests(state: &MetricEvidence, settings: &Settings, tests: usize) -> u64 {
    let floor = settings.min_sample_size;
    let total = state.canary_requests + state.primary_requests;
    if state.primary_bad <= 0.0 || state.primary_requests <= 0.0 || total <= 0.0 {
        return floor;
    }
    let p0 = state.primary_bad / state.primary_requests;
    let rho = (state.canary_requests / total).clamp(0.01, 0.99);
    let delta = settings.min_detectable_ratio.max(1.01);
    let theta = rho * delta / (rho * delta + 1.0 - rho);
    let per_bad = kl(theta, rho);
    let needed_log =
        (tests.max(1) as f64 / settings.alpha.clamp(1e-9, 1.0)).ln() + (RATIOS.len() as f64).ln();
    let bad_per_canary_request = p0 * (delta + (1.0 - rho) / rho);
    let n = needed_log / (per_bad * bad_per_canary_request);
    if !n.is_finite() {
        return floor;
    }
    (n.ceil() as u64).max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(np: f64, bp: f64, nc: f64, bc: f64) -> Look {
        Look {
            primary: Counts {
                requests: np,
                bad: bp,
            },
            canary: Counts {
                requests: nc,
                bad: bc,
            },
        }
    }

    fn e_after(looks: &[Look], bound: Option<f64>) -> (MetricEvidence, EValues) {
        let mut s = start("m");
        for l in looks {
            update(&mut s, l, bound);
        }
        let e = e_values(&s, bound.is_some());
        (s, e)
    }

    /// At a 20% canary share four canary errors and none on the primary reject at α = 0.01;
    /// three do not. At a 50% share nine are needed.
    #[test]
    fn minimum_evidence() {
        let e = |np: f64, nc: f64, bc: f64| e_after(&[look(np, 0.0, nc, bc)], None).1.relative;
        assert!(e(800.0, 200.0, 3.0) < 100.0);
        assert!(e(800.0, 200.0, 4.0) >= 100.0);
        assert!(e(500.0, 500.0, 8.0) < 100.0);
        assert!(e(500.0, 500.0, 9.0) >= 100.0);
    }

    /// Errors split as the requests are give no evidence at all: the e-value falls below 1.
    #[test]
    fn proportional_errors_are_no_evidence() {
        let (_, e) = e_after(&[look(800.0, 8.0, 200.0, 2.0); 20], None);
        assert!(e.relative < 1.0, "{e:?}");
    }

    /// Splitting the same counts into more looks at the same share gives the same evidence:
    /// looking often costs nothing.
    #[test]
    fn looking_more_often_changes_nothing_at_a_fixed_share() {
        let (_, once) = e_after(&[look(8000.0, 4.0, 2000.0, 6.0)], None);
        let (_, often) = e_after(&[look(4000.0, 2.0, 1000.0, 3.0); 2], None);
        assert!((once.relative - often.relative).abs() < 1e-9 * once.relative);
    }

    /// A shared incident (both arms at 30% errors) is not the canary's fault.
    #[test]
    fn a_shared_incident_is_not_a_regression() {
        let (_, e) = e_after(&[look(800.0, 240.0, 200.0, 60.0); 5], None);
        assert!(e.relative < 1.0, "{e:?}");
    }

    /// The guard rejects a canary clearly above the bound, and says nothing at the bound.
    #[test]
    fn guard_at_and_above_the_bound() {
        let (_, above) = e_after(&[look(0.0, 0.0, 10_000.0, 300.0)], Some(0.01));
        assert!(above.guard.unwrap() > 100.0, "{above:?}");
        let (_, at) = e_after(&[look(0.0, 0.0, 10_000.0, 100.0)], Some(0.01));
        assert!(at.guard.unwrap() < 1.0, "{at:?}");
    }

    /// Both arms above the bound with no relative difference: the baseline is unhealthy.
    #[test]
    fn baseline_unhealthy() {
        let (s, _) = e_after(&[look(40_000.0, 1200.0, 10_000.0, 300.0)], Some(0.01));
        let f = judge(
            &[Judged {
                state: &s,
                guarded: true,
            }],
            0.01,
            false,
        );
        assert!(matches!(f, Finding::BaselineUnhealthy { .. }), "{f:?}");
        let (s, _) = e_after(&[look(40_000.0, 40.0, 10_000.0, 300.0)], Some(0.01));
        let f = judge(
            &[Judged {
                state: &s,
                guarded: true,
            }],
            0.01,
            false,
        );
        assert!(matches!(f, Finding::Regression { .. }), "{f:?}");
    }

    /// During a warm-up a canary a few times worse (a cold start) is not rolled back and
    /// its looks stay out of the main test, while a hard failure still is.
    #[test]
    fn warmup_tolerates_a_cold_start_not_a_hard_failure() {
        let mut cold = start("m");
        for _ in 0..3 {
            update_warmup(&mut cold, &look(8000.0, 80.0, 2000.0, 100.0));
        }
        let judged = [Judged {
            state: &cold,
            guarded: true,
        }];
        assert!(matches!(
            judge(&judged, 0.01, true),
            Finding::NoRegression { .. }
        ));
        assert_eq!((cold.canary_requests, cold.looks), (0.0, 0), "kept out");
        let mut hard = start("m");
        update_warmup(&mut hard, &look(800.0, 1.0, 200.0, 100.0));
        let judged = [Judged {
            state: &hard,
            guarded: true,
        }];
        assert!(
            matches!(
                judge(&judged, 0.01, true),
                Finding::Regression {
                    test: "warm-up",
                    ..
                }
            ),
            "{:?}",
            judge(&judged, 0.01, true)
        );
    }

    /// Garbage counts (negative, NaN, more errors than requests) never move the test.
    #[test]
    fn garbage_is_clamped() {
        let (s, e) = e_after(
            &[
                look(-5.0, 3.0, f64::NAN, 2.0),
                look(10.0, f64::INFINITY, 10.0, -1.0),
            ],
            Some(0.01),
        );
        assert!(e.relative <= 1.0 && e.guard.unwrap() <= 1.0, "{e:?} {s:?}");
        assert!(s.log_likelihood_ratios.iter().all(|x| x.is_finite()));
    }

    /// A stored state of the wrong shape restarts from zero instead of panicking.
    #[test]
    fn repairs_foreign_state() {
        let mut s = start("m");
        s.log_likelihood_ratios = vec![1.0];
        update(&mut s, &look(10.0, 0.0, 10.0, 0.0), None);
        assert_eq!(s.log_likelihood_ratios.len(), RATIOS.len());
    }

    /// The evidence needed grows as the baseline rate falls, and the floor applies without
    /// errors on the primary.
    #[test]
    fn required_requests() {
        let settings = Settings::default();
        let (none, _) = e_after(&[look(1000.0, 0.0, 250.0, 0.0)], None);
        assert_eq!(required_canary_requests(&none, &settings, 1), 200);
        let (low, _) = e_after(&[look(100_000.0, 100.0, 25_000.0, 25.0)], None);
        let (high, _) = e_after(&[look(100_000.0, 1000.0, 25_000.0, 250.0)], None);
        let (nl, nh) = (
            required_canary_requests(&low, &settings, 1),
            required_canary_requests(&high, &settings, 1),
        );
        assert!(nl > 5 * nh && nh >= 200, "{nl} {nh}");
        // At 0.1% and a 20% share, a 3× regression needs a few thousand canary requests.
        assert!((1_000..20_000).contains(&nl), "{nl}");
    }

    /// The e-value of huge log-likelihood ratios does not overflow to NaN.
    #[test]
    fn e_value_is_stable() {
        assert!(e_value(&[800.0, 0.0]).is_infinite());
        assert!((e_value(&[0.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(e_value(&[-1e6, -1e6]) < 1e-100);
    }
}
