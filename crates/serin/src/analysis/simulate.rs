//! A Monte-Carlo benchmark of the canary judges on simulated Poisson traffic: how often each
//! rolls back identical versions, how fast it catches a regression, and how many failed
//! canary requests are served meanwhile.
//!
//! # Model
//! Traffic is `rps` requests/s from the canary's first request (time 0) to a 30-minute
//! horizon, a fixed share of it on the canary (the steps of a rollout collapsed to one
//! weight). Requests fail independently: with probability `baseline` on the primary and
//! `ratio × baseline` on the canary. By Poisson thinning, an arm's failures and successes in a
//! window are independent Poisson counts of mean `rate × share × p × seconds` (and
//! `× (1 − p)`), drawn once per window when the rates are constant over it and once per run of
//! equal rates otherwise (the bursty and cold-start cells change rates by the second).
//!
//! Both judges run the real code on the same simulated traffic:
//! - **sequential**: [`sequential::update`] at every look and [`sequential::judge`] on one
//!   guarded error-rate metric (`max: 1`, so a bound of 1%) with α = 0.01; a `Regression` or
//!   `BaselineUnhealthy` finding rolls back (the default policy). Every 60 s from 120 s on (two
//!   one-minute steps) the step gate promotes once the canary requests reach
//!   [`sequential::required_canary_requests`] for two tests (relative and bound).
//! - **threshold**: every 60 s, [`judge`] on the canary's error rate (in percent) over the
//!   last 60 s; two failed checks roll back, two passing checks promote, five inconclusive
//!   checks in a row roll back (the `Threshold` defaults).
//!
//! A judge keeps watching to the horizon after promotion, so "rolled back" measures what it
//! can detect in 30 minutes at this share; "caught before promotion" and "bad requests
//! served" follow the rollout, which ends at the first rollback or promotion.
//!
//! This module does no I/O and reads no clock: every figure follows from the cell, the number
//! of runs and the seed. It does not model ingestion delay, weight changes between steps, or
//! latency metrics.

use crate::analysis::sequential::{self, Counts, Finding, Judged, Look, Settings};
use crate::analysis::{Outcome, display_value, judge};
use crate::api::{MetricSpec, Verdict};

/// Seconds of canary traffic simulated per run.
pub const HORIZON_SECONDS: u32 = 30 * 60;

/// Seconds between step checks (`analysis.interval`, the threshold judge's window too).
pub const CHECK_INTERVAL_SECONDS: u32 = 60;

/// Steps before promotion (the default `steps` 20/50, collapsed to one share).
pub const STEPS: u32 = 2;

/// The error-rate bound, in percent (`max` of the metric).
pub const MAX_ERROR_PERCENT: f64 = 1.0;

/// Failed checks that roll the threshold judge back (`failureThreshold`).
pub const FAILURE_THRESHOLD: u32 = 2;

/// Inconclusive threshold checks in a row that roll back (`maxInconclusiveChecks`).
pub const MAX_INCONCLUSIVE_CHECKS: u32 = 5;

/// Canary error probability of a hard failure.
pub const HARD_FAILURE_RATE: f64 = 0.5;

/// The threshold metric benchmarked: Serin's `Threshold` judge on the App Mesh error-rate
/// preset with `max: 1` and no `minSampleSize`.
pub const THRESHOLD_METRIC_YAML: &str = r#"{name: error-rate, provider: {prometheus: {address: "http://p:9090"}}, preset: appmesh-error-rate, max: 1, judge: Threshold}"#;

/// [`THRESHOLD_METRIC_YAML`] parsed.
pub fn threshold_metric() -> Result<MetricSpec, serde_norway::Error> {
    serde_norway::from_str(THRESHOLD_METRIC_YAML)
}

// ---------------------------------------------------------------------------------------
// Random numbers

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64: small, fast and good enough
/// for simulation; not for secrets.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose state is expanded from `seed` by SplitMix64 (never all zero).
    pub fn seeded(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { s }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), on a grid of 2⁻⁵³.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// An exact Poisson draw of mean `mean` (0 for a mean that is not positive and finite):
    /// Knuth's multiplication method below 10, Hörmann's transformed rejection with squeeze
    /// (PTRS, 1993) from 10 on.
    pub fn poisson(&mut self, mean: f64) -> u64 {
        if !mean.is_finite() || mean <= 0.0 {
            0
        } else if mean < 10.0 {
            self.poisson_knuth(mean)
        } else {
            self.poisson_ptrs(mean)
        }
    }

    fn poisson_knuth(&mut self, mean: f64) -> u64 {
        let limit = (-mean).exp();
        let mut k = 0;
        let mut product = self.uniform();
        while product > limit {
            k += 1;
            product *= self.uniform();
        }
        k
    }

    /// W. Hörmann, "The transformed rejection method for generating Poisson random
    /// variables", Insurance: Mathematics and Economics 12 (1993), algorithm PTRS.
    fn poisson_ptrs(&mut self, mean: f64) -> u64 {
        let sqrt_mean = mean.sqrt();
        let ln_mean = mean.ln();
        let b = 0.931 + 2.53 * sqrt_mean;
        let a = -0.059 + 0.02483 * b;
        let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
        let v_r = 0.9277 - 3.6224 / (b - 2.0);
        loop {
            let u = self.uniform() - 0.5;
            let v = self.uniform();
            let us = 0.5 - u.abs();
            let k = ((2.0 * a / us + b) * u + mean + 0.43).floor();
            if us >= 0.07 && v <= v_r {
                return k as u64;
            }
            if !k.is_finite() || k < 0.0 || (us < 0.013 && v > us) {
                continue;
            }
            let lhs = v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln();
            let rhs = -mean + k * ln_mean - ln_gamma(k + 1.0);
            if lhs <= rhs {
                return k as u64;
            }
        }
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine terms; about 15 significant digits). NaN for
/// x ≤ 0.
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x.is_nan() || x <= 0.0 {
        return f64::NAN;
    }
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

// ---------------------------------------------------------------------------------------
// Confidence intervals

/// P(X ≤ k) for X ~ Binomial(n, p), summed term by term in log space.
pub fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let (ln_p, ln_q) = (p.ln(), (-p).ln_1p());
    let nf = n as f64;
    let ln_n_factorial = ln_gamma(nf + 1.0);
    let sum: f64 = (0..=k)
        .map(|i| {
            let i = i as f64;
            (ln_n_factorial - ln_gamma(i + 1.0) - ln_gamma(nf - i + 1.0)
                + i * ln_p
                + (nf - i) * ln_q)
                .exp()
        })
        .sum();
    sum.min(1.0)
}

/// The Clopper–Pearson ("exact") two-sided interval for a proportion after `successes` of
/// `trials`, at `confidence` (0.95 for 95%): each end leaves `(1 − confidence)/2` in its
/// tail. Found by bisection on [`binomial_cdf`]; (0, 1) without trials.
pub fn clopper_pearson(successes: u64, trials: u64, confidence: f64) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let x = successes.min(trials);
    let tail = (1.0 - confidence.clamp(0.0, 1.0)) / 2.0;
    // The upper end: P(X ≤ x; p) = tail, which falls as p grows.
    let upper = if x == trials {
        1.0
    } else {
        bisect(|p| binomial_cdf(x, trials, p) > tail)
    };
    // The lower end: P(X ≥ x; p) = tail, which grows with p.
    let lower = if x == 0 {
        0.0
    } else {
        bisect(|p| 1.0 - binomial_cdf(x - 1, trials, p) < tail)
    };
    (lower, upper)
}

/// The point in (0, 1) where `below` turns from true to false.
fn bisect(below: impl Fn(f64) -> bool) -> f64 {
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if below(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

// ---------------------------------------------------------------------------------------
// Cells

/// How the canary's errors relate to the primary's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    /// The canary's error probability is `ratio × baseline` (1: identical versions, A/A).
    Ratio(f64),
    /// Half of the canary's requests fail.
    HardFailure,
    /// Identical versions, with errors in bursts both arms share: each second starts a burst
    /// with probability 1/120; for 10 s both arms fail at 20 × baseline (at most 50%).
    Bursty,
    /// Identical versions, but the canary fails at 5 × baseline during its first 30 s (a cold
    /// start: caches, connections, JIT).
    ColdStart,
}

impl Behaviour {
    /// True for identical versions (A/A): a rollback is a false alarm, unless both arms are
    /// above the bound (`BaselineUnhealthy`).
    pub fn is_identical(self) -> bool {
        match self {
            Behaviour::Ratio(r) => r <= 1.0,
            Behaviour::HardFailure => false,
            Behaviour::Bursty | Behaviour::ColdStart => true,
        }
    }

    /// Short label: `A/A`, `×5`, `50% errors`, `A/A, bursts`, `A/A, cold start`.
    pub fn label(self) -> String {
        match self {
            Behaviour::Ratio(1.0) => "A/A".into(),
            Behaviour::Ratio(r) => format!("×{}", display_value(r)),
            Behaviour::HardFailure => {
                format!("{}% errors", display_value(HARD_FAILURE_RATE * 100.0))
            }
            Behaviour::Bursty => "A/A, shared bursts".into(),
            Behaviour::ColdStart => "A/A, cold start".into(),
        }
    }
}

/// One scenario of the benchmark grid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cell {
    /// Requests per second, both arms together.
    pub rps: f64,
    /// The canary's share of the requests, in (0, 1).
    pub canary_share: f64,
    /// The primary's error probability.
    pub baseline: f64,
    /// The canary's errors.
    pub behaviour: Behaviour,
    /// Seconds between the sequential judge's looks (at least 1).
    pub look_seconds: u32,
    /// The sequential judge's options (`analysis.warmup`, `analysis.baselineUnhealthy`).
    pub options: Options,
}

/// Options of the sequential judge a cell runs with (the defaults: no warm-up, roll back on
/// an unhealthy baseline).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Options {
    /// `analysis.warmup` in seconds (0: none).
    pub warmup_seconds: u32,
    /// `analysis.baselineUnhealthy: Hold` instead of `RollBack`.
    pub hold_unhealthy: bool,
}

impl Options {
    fn label(self) -> String {
        let mut out = String::new();
        if self.warmup_seconds > 0 {
            out.push_str(&format!(", warmup {}", seconds(self.warmup_seconds)));
        }
        if self.hold_unhealthy {
            out.push_str(", baselineUnhealthy: Hold");
        }
        out
    }
}

impl Cell {
    /// `100 rps, 20% canary, baseline 0.1%, ×5, 10 s looks`.
    pub fn label(&self) -> String {
        format!(
            "{}, {}{}, {} looks",
            self.traffic_label(),
            self.behaviour.label(),
            self.options.label(),
            seconds(self.look_seconds)
        )
    }

    fn traffic_label(&self) -> String {
        format!(
            "{} rps, {}% canary, baseline {}%",
            display_value(self.rps),
            display_value(self.canary_share * 100.0),
            display_value(self.baseline * 100.0)
        )
    }

    /// A stable number for the cell (FNV-1a of its label), mixed into the seed so that a
    /// cell's figures do not depend on which other cells run.
    fn key(&self) -> u64 {
        self.label().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    fn look(&self) -> u32 {
        self.look_seconds.max(1)
    }

    /// Error probabilities (primary, canary) at each second of one run.
    fn error_rates(&self, rng: &mut Rng) -> Rates {
        let p0 = self.baseline.clamp(0.0, 1.0);
        match self.behaviour {
            Behaviour::Ratio(r) => Rates::Constant(p0, (r * p0).clamp(0.0, 1.0)),
            Behaviour::HardFailure => Rates::Constant(p0, HARD_FAILURE_RATE),
            Behaviour::Bursty => {
                let burst = (20.0 * p0).min(0.5);
                let mut until = 0;
                let per_second = (0..HORIZON_SECONDS)
                    .map(|s| {
                        if rng.uniform() < 1.0 / 120.0 {
                            until = s + 10;
                        }
                        if s < until { (burst, burst) } else { (p0, p0) }
                    })
                    .collect();
                Rates::PerSecond(per_second)
            }
            Behaviour::ColdStart => {
                let cold = (5.0 * p0).min(1.0);
                Rates::PerSecond(
                    (0..HORIZON_SECONDS)
                        .map(|s| if s < 30 { (p0, cold) } else { (p0, p0) })
                        .collect(),
                )
            }
        }
    }
}

/// Error probabilities of (primary, canary) over a run.
enum Rates {
    Constant(f64, f64),
    PerSecond(Vec<(f64, f64)>),
}

impl Rates {
    fn at(&self, second: u32) -> (f64, f64) {
        match self {
            Rates::Constant(p0, p1) => (*p0, *p1),
            Rates::PerSecond(v) => v.get(second as usize).copied().unwrap_or((0.0, 0.0)),
        }
    }
}

/// The benchmark grid: total rps {10, 100, 1000} × canary share {20%, 50%} × baseline {0.1%,
/// 1%} × canary {A/A, ×2, ×5, ×10, 50% errors} × looks {10 s, 60 s}, then A/A with shared
/// bursts and with a cold start at 100 rps, 20%. `full: false` gives six cells at 100 rps,
/// 20%, 10 s looks, for a smoke test.
pub fn cells(full: bool) -> Vec<Cell> {
    let cell = |rps, canary_share, baseline, behaviour, look_seconds| Cell {
        rps,
        canary_share,
        baseline,
        behaviour,
        look_seconds,
        options: Options::default(),
    };
    let with = |c: Cell, options: Options| Cell { options, ..c };
    let warmup = Options {
        warmup_seconds: 30,
        hold_unhealthy: false,
    };
    let hold = Options {
        warmup_seconds: 0,
        hold_unhealthy: true,
    };
    if !full {
        return vec![
            cell(100.0, 0.2, 0.001, Behaviour::Ratio(1.0), 10),
            cell(100.0, 0.2, 0.001, Behaviour::Ratio(5.0), 10),
            cell(100.0, 0.2, 0.001, Behaviour::HardFailure, 10),
            cell(100.0, 0.2, 0.01, Behaviour::Ratio(1.0), 10),
            cell(100.0, 0.2, 0.001, Behaviour::Bursty, 10),
            cell(100.0, 0.2, 0.01, Behaviour::ColdStart, 10),
            with(cell(100.0, 0.2, 0.01, Behaviour::ColdStart, 10), warmup),
            with(cell(100.0, 0.2, 0.01, Behaviour::Bursty, 10), hold),
        ];
    }
    let behaviours = [
        Behaviour::Ratio(1.0),
        Behaviour::Ratio(2.0),
        Behaviour::Ratio(5.0),
        Behaviour::Ratio(10.0),
        Behaviour::HardFailure,
    ];
    let mut out = Vec::new();
    for rps in [10.0, 100.0, 1000.0] {
        for share in [0.2, 0.5] {
            for baseline in [0.001, 0.01] {
                for behaviour in behaviours {
                    for look in [10, 60] {
                        out.push(cell(rps, share, baseline, behaviour, look));
                    }
                }
            }
        }
    }
    for behaviour in [Behaviour::Bursty, Behaviour::ColdStart] {
        for baseline in [0.001, 0.01] {
            for look in [10, 60] {
                out.push(cell(100.0, 0.2, baseline, behaviour, look));
            }
        }
    }
    // The options that answer those cases, and what they cost on real regressions.
    for baseline in [0.001, 0.01] {
        out.push(with(
            cell(100.0, 0.2, baseline, Behaviour::Bursty, 10),
            hold,
        ));
        out.push(with(
            cell(100.0, 0.2, baseline, Behaviour::ColdStart, 10),
            warmup,
        ));
        for behaviour in [
            Behaviour::Ratio(1.0),
            Behaviour::Ratio(5.0),
            Behaviour::Ratio(10.0),
            Behaviour::HardFailure,
        ] {
            out.push(with(cell(100.0, 0.2, baseline, behaviour, 10), warmup));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Traffic

/// One run's traffic in ticks of `tick` seconds (a divisor of both the look interval and the
/// check interval), each tick both arms' requests and errors.
struct Traffic {
    tick: u32,
    ticks: Vec<Look>,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One arm over `seconds` at `rps` with error probability `p`.
fn arm(rng: &mut Rng, rps: f64, p: f64, seconds: f64) -> Counts {
    let bad = rng.poisson(rps * p * seconds) as f64;
    let good = rng.poisson(rps * (1.0 - p) * seconds) as f64;
    Counts {
        requests: bad + good,
        bad,
    }
}

fn simulate_traffic(cell: &Cell, rng: &mut Rng) -> Traffic {
    let rates = cell.error_rates(rng);
    let tick = gcd(cell.look(), CHECK_INTERVAL_SECONDS);
    let share = cell.canary_share.clamp(0.0, 1.0);
    let (canary_rps, primary_rps) = (cell.rps * share, cell.rps * (1.0 - share));
    let ticks = (0..HORIZON_SECONDS / tick)
        .map(|i| {
            let (start, end) = (i * tick, (i + 1) * tick);
            let mut look = Look::default();
            // One draw per run of seconds with equal rates: a sum of Poissons is Poisson.
            let mut from = start;
            while from < end {
                let (p0, p1) = rates.at(from);
                let mut to = from + 1;
                while to < end && rates.at(to) == (p0, p1) {
                    to += 1;
                }
                let secs = f64::from(to - from);
                let p = arm(rng, primary_rps, p0, secs);
                let c = arm(rng, canary_rps, p1, secs);
                look.primary.requests += p.requests;
                look.primary.bad += p.bad;
                look.canary.requests += c.requests;
                look.canary.bad += c.bad;
                from = to;
            }
            look
        })
        .collect();
    Traffic { tick, ticks }
}

// ---------------------------------------------------------------------------------------
// Judges

/// What one judge did in one run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunOutcome {
    /// Seconds from the canary's first request to the rollback, if any within the horizon.
    pub rolled_back_at: Option<u32>,
    /// The rollback was the sequential judge's "baseline unhealthy" (both arms above max).
    pub baseline_unhealthy: bool,
    /// Seconds to promotion, if the rollout would have promoted within the horizon.
    pub promoted_at: Option<u32>,
    /// Failed canary requests until the rollout ended (rollback, promotion or horizon).
    pub bad_served: f64,
}

impl RunOutcome {
    /// Rolled back, and not after promotion.
    pub fn caught_before_promotion(&self) -> bool {
        match (self.rolled_back_at, self.promoted_at) {
            (Some(r), Some(p)) => r < p,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Neither rolled back nor promoted within the horizon.
    pub fn held(&self) -> bool {
        self.rolled_back_at.is_none() && self.promoted_at.is_none()
    }
}

fn accumulate(total: &mut Look, l: &Look) {
    total.primary.requests += l.primary.requests;
    total.primary.bad += l.primary.bad;
    total.canary.requests += l.canary.requests;
    total.canary.bad += l.canary.bad;
}

/// The sequential judge with its step gate on one run's traffic.
fn run_sequential(traffic: &Traffic, look_seconds: u32, options: Options) -> RunOutcome {
    let settings = Settings::default();
    let bound = Some(MAX_ERROR_PERCENT / 100.0);
    let mut state = sequential::start("error-rate");
    let mut out = RunOutcome::default();
    let mut pending = Look::default();
    for (i, tick) in traffic.ticks.iter().enumerate() {
        let t = (i as u32 + 1) * traffic.tick;
        accumulate(&mut pending, tick);
        if out.promoted_at.is_none() {
            out.bad_served += tick.canary.bad;
        }
        let mut held = false;
        if t.is_multiple_of(look_seconds) {
            if t <= options.warmup_seconds {
                sequential::update_warmup(&mut state, &pending);
            } else {
                sequential::update(&mut state, &pending, bound);
            }
            pending = Look::default();
            let judged = [Judged {
                state: &state,
                guarded: true,
            }];
            match sequential::judge(&judged, settings.alpha, options.warmup_seconds > 0) {
                Finding::NoRegression { .. } => {}
                Finding::Regression { .. } => {
                    out.rolled_back_at = Some(t);
                    return out;
                }
                Finding::BaselineUnhealthy { .. } if options.hold_unhealthy => held = true,
                Finding::BaselineUnhealthy { .. } => {
                    out.rolled_back_at = Some(t);
                    out.baseline_unhealthy = true;
                    return out;
                }
            }
        }
        if !held
            && out.promoted_at.is_none()
            && t.is_multiple_of(CHECK_INTERVAL_SECONDS)
            && t >= STEPS * CHECK_INTERVAL_SECONDS
            && state.canary_requests
                >= sequential::required_canary_requests(&state, &settings, 2) as f64
        {
            out.promoted_at = Some(t);
        }
    }
    out
}

/// The threshold judge (a check every 60 s on the last 60 s) on one run's traffic.
fn run_threshold(traffic: &Traffic, metric: &MetricSpec) -> RunOutcome {
    let mut out = RunOutcome::default();
    let (mut passed, mut failed, mut inconclusive) = (0, 0, 0);
    let mut window = Look::default();
    for (i, tick) in traffic.ticks.iter().enumerate() {
        let t = (i as u32 + 1) * traffic.tick;
        accumulate(&mut window, tick);
        if out.promoted_at.is_none() {
            out.bad_served += tick.canary.bad;
        }
        if !t.is_multiple_of(CHECK_INTERVAL_SECONDS) {
            continue;
        }
        let c = window.canary;
        window = Look::default();
        let outcome = if c.requests > 0.0 {
            Outcome::Value {
                value: 100.0 * c.bad / c.requests,
                sample_size: Some(c.requests as u64),
            }
        } else {
            Outcome::NoData {
                reason: "no canary requests".into(),
            }
        };
        match judge(metric, &outcome).0 {
            Verdict::Pass => {
                inconclusive = 0;
                passed += 1;
                if passed >= STEPS && out.promoted_at.is_none() {
                    out.promoted_at = Some(t);
                }
            }
            Verdict::Fail => {
                inconclusive = 0;
                failed += 1;
            }
            _ => inconclusive += 1,
        }
        if failed >= FAILURE_THRESHOLD || inconclusive >= MAX_INCONCLUSIVE_CHECKS {
            out.rolled_back_at = Some(t);
            return out;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Results

/// One judge's figures over the runs of a cell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Runs.
    pub runs: u32,
    /// Runs rolled back within the horizon.
    pub rolled_back: u32,
    /// Of those, rolled back because both arms were above the bound (sequential only).
    pub baseline_unhealthy: u32,
    /// Seconds to each rollback, sorted.
    pub rollback_seconds: Vec<u32>,
    /// Failed canary requests served until the rollout ended, summed over the runs.
    pub bad_served: f64,
    /// Runs rolled back before they promoted.
    pub caught_before_promotion: u32,
    /// Runs neither rolled back nor promoted within the horizon.
    pub held: u32,
}

impl Summary {
    fn add(&mut self, r: &RunOutcome) {
        self.runs += 1;
        if let Some(t) = r.rolled_back_at {
            self.rolled_back += 1;
            self.rollback_seconds.push(t);
        }
        self.baseline_unhealthy += u32::from(r.baseline_unhealthy);
        self.bad_served += r.bad_served;
        self.caught_before_promotion += u32::from(r.caught_before_promotion());
        self.held += u32::from(r.held());
    }

    /// Share of runs rolled back.
    pub fn rolled_back_share(&self) -> f64 {
        share(self.rolled_back, self.runs)
    }

    /// The Clopper–Pearson 95% upper bound on the rollback probability.
    pub fn rolled_back_upper_95(&self) -> f64 {
        clopper_pearson(u64::from(self.rolled_back), u64::from(self.runs), 0.95).1
    }

    /// The `q`-quantile (nearest rank) of the time to rollback, over rolled-back runs.
    pub fn rollback_quantile(&self, q: f64) -> Option<u32> {
        let n = self.rollback_seconds.len();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
        self.rollback_seconds.get(rank - 1).copied()
    }

    /// Mean failed canary requests served until the rollout ended.
    pub fn mean_bad_served(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.bad_served / f64::from(self.runs)
        }
    }
}

fn share(k: u32, n: u32) -> f64 {
    if n == 0 {
        0.0
    } else {
        f64::from(k) / f64::from(n)
    }
}

/// Both judges' figures for one cell.
#[derive(Clone, Debug, PartialEq)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// The sequential judge (looks every `cell.look_seconds`).
    pub sequential: Summary,
    /// The threshold judge (checks every 60 s), on the same traffic.
    pub threshold: Summary,
}

/// Simulates `runs` rollouts of `cell` and judges each with both judges (the threshold judge
/// with `threshold`, see [`threshold_metric`]). The same `seed` gives the same figures.
pub fn run_cell(cell: &Cell, threshold: &MetricSpec, runs: u32, seed: u64) -> CellResult {
    let mut mix = seed ^ cell.key();
    let mut rng = Rng::seeded(splitmix64(&mut mix));
    let mut result = CellResult {
        cell: *cell,
        sequential: Summary::default(),
        threshold: Summary::default(),
    };
    for _ in 0..runs {
        let traffic = simulate_traffic(cell, &mut rng);
        result
            .sequential
            .add(&run_sequential(&traffic, cell.look(), cell.options));
        result.threshold.add(&run_threshold(&traffic, threshold));
    }
    result.sequential.rollback_seconds.sort_unstable();
    result.threshold.rollback_seconds.sort_unstable();
    result
}

// ---------------------------------------------------------------------------------------
// Report

fn seconds(s: u32) -> String {
    if s < 120 {
        format!("{s} s")
    } else {
        format!("{:.1} min", f64::from(s) / 60.0)
    }
}

fn percent(x: f64) -> String {
    let p = 100.0 * x;
    if p == 0.0 || p == 100.0 {
        format!("{p:.0}%")
    } else if !(10.0..=90.0).contains(&p) {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// A count with thousands separators, rounded to an integer from 10 on.
fn count(x: f64) -> String {
    if x < 10.0 {
        return format!("{x:.1}");
    }
    let digits = format!("{:.0}", x.round());
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn rolled_back(s: &Summary, identical: bool) -> String {
    let shown = percent(s.rolled_back_share());
    let mut text = if identical {
        format!("{shown} (≤ {})", percent(s.rolled_back_upper_95()))
    } else {
        shown
    };
    if s.baseline_unhealthy > 0 {
        text.push_str(" †");
    }
    text
}

fn times(s: &Summary) -> String {
    match (s.rollback_quantile(0.5), s.rollback_quantile(0.9)) {
        (Some(m), Some(p)) => format!("{} / {}", seconds(m), seconds(p)),
        _ => "—".into(),
    }
}

/// A Markdown table, one row per cell, the two judges side by side, then notes.
pub fn table(results: &[CellResult]) -> String {
    let mut out = String::new();
    out.push_str(
        "| traffic | baseline | canary | looks | **sequential**: rolled back | to rollback (median / p90) | bad served | caught before promotion | held | **threshold**: rolled back | to rollback (median / p90) | bad served | caught before promotion |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let c = &r.cell;
        let identical = c.behaviour.is_identical();
        let (s, t) = (&r.sequential, &r.threshold);
        let scenario = format!("{}{}", c.behaviour.label(), c.options.label());
        out.push_str(&format!(
            "| {} rps, {}% | {}% | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            display_value(c.rps),
            display_value(c.canary_share * 100.0),
            display_value(c.baseline * 100.0),
            scenario,
            seconds(c.look()),
            rolled_back(s, identical),
            times(s),
            count(s.mean_bad_served()),
            percent(share(s.caught_before_promotion, s.runs)),
            percent(share(s.held, s.runs)),
            rolled_back(t, identical),
            times(t),
            count(t.mean_bad_served()),
            percent(share(t.caught_before_promotion, t.runs)),
        ));
    }
    out.push('\n');
    out.push_str(
        "- *rolled back*: share of runs rolled back within 30 minutes of canary traffic (the judge keeps watching after promotion); for identical versions (A/A) it is the false-rollback rate, with its Clopper–Pearson 95% upper bound in parentheses.\n\
         - *to rollback*: seconds from the canary's first request to the rollback, over rolled-back runs (— when none).\n\
         - *bad served*: mean failed canary requests until the rollout ended (rollback, promotion or the horizon).\n\
         - *caught before promotion*: share of runs rolled back before the step gate promoted them. *held*: neither rolled back nor promoted in 30 minutes (not enough evidence).\n\
         - The threshold judge checks every 60 s whatever the look interval; in each row it judges the same simulated traffic as the sequential judge, so its two rows per scenario are two estimates of one thing.\n",
    );
    let unhealthy: Vec<String> = results
        .iter()
        .filter(|r| r.sequential.baseline_unhealthy > 0)
        .map(|r| {
            format!(
                "{} ({} of {} runs)",
                r.cell.label(),
                r.sequential.baseline_unhealthy,
                r.sequential.runs
            )
        })
        .collect();
    if !unhealthy.is_empty() {
        out.push_str(&format!(
            "- † includes `BaselineUnhealthy` rollbacks (both arms surely above max, the default policy rolls back): {}.\n",
            unhealthy.join("; ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(mean: f64, n: usize, seed: u64) -> (f64, f64) {
        let mut rng = Rng::seeded(seed);
        let draws: Vec<f64> = (0..n).map(|_| rng.poisson(mean) as f64).collect();
        let m = draws.iter().sum::<f64>() / n as f64;
        let v = draws.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n as f64 - 1.0);
        (m, v)
    }

    /// xoshiro256** from the state [1, 2, 3, 4] gives the reference outputs.
    #[test]
    fn xoshiro_reference_outputs() {
        let mut rng = Rng { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
    }

    /// ln Γ matches known values, both sides of the reflection point.
    #[test]
    fn ln_gamma_known_values() {
        let cases = [
            (0.5, 0.572_364_942_924_700_1),
            (0.1, 2.252_712_651_734_206),
            (1.0, 0.0),
            (2.0, 0.0),
            (10.0, 12.801_827_480_081_469),
            (101.0, 363.739_375_555_563_47),
            (1e6, 12_815_504.569_147_612),
        ];
        for (x, want) in cases {
            let got = ln_gamma(x);
            assert!(
                (got - want).abs() <= 1e-10 * want.abs().max(1.0),
                "lnΓ({x}) = {got}, want {want}"
            );
        }
        assert!(ln_gamma(0.0).is_nan());
    }

    /// The Poisson sampler's mean and variance match the mean, on both sides of the switch
    /// from Knuth's method to PTRS.
    #[test]
    fn poisson_moments() {
        for (mean, seed) in [(0.3, 1), (5.0, 2), (10.0, 3), (50.0, 4), (5000.0, 5)] {
            let n = 100_000;
            let (m, v) = moments(mean, n, seed);
            let se_mean = (mean / n as f64).sqrt();
            let se_var = ((2.0 * mean * mean + mean) / n as f64).sqrt();
            assert!((m - mean).abs() < 5.0 * se_mean, "mean {mean}: got {m}");
            assert!((v - mean).abs() < 6.0 * se_var, "mean {mean}: variance {v}");
        }
    }

    /// PTRS puts the right mass on single values, not just the right moments.
    #[test]
    fn poisson_probabilities() {
        let mut rng = Rng::seeded(9);
        let n = 100_000;
        let (mean, at): (f64, [u64; 3]) = (50.0, [40, 50, 60]);
        let mut hits = [0u32; 3];
        for _ in 0..n {
            let k = rng.poisson(mean);
            for (h, a) in hits.iter_mut().zip(at) {
                *h += u32::from(k == a);
            }
        }
        for (h, a) in hits.iter().zip(at) {
            let a = a as f64;
            let pmf = (-mean + a * mean.ln() - ln_gamma(a + 1.0)).exp();
            let freq = f64::from(*h) / n as f64;
            let se = (pmf * (1.0 - pmf) / n as f64).sqrt();
            assert!((freq - pmf).abs() < 5.0 * se, "P(X = {a}): {freq} vs {pmf}");
        }
        assert_eq!(rng.poisson(0.0), 0);
        assert_eq!(rng.poisson(f64::NAN), 0);
        assert_eq!(rng.poisson(-1.0), 0);
    }

    /// Clopper–Pearson intervals agree with published values.
    #[test]
    fn clopper_pearson_known_values() {
        let close = |a: f64, b: f64| (a - b).abs() < 5e-5;
        let (lo, hi) = clopper_pearson(0, 100, 0.95);
        assert_eq!(lo, 0.0);
        assert!(close(hi, 0.036_217), "{hi}");
        assert!(close(hi, 1.0 - 0.025_f64.powf(0.01)), "{hi}");
        let (lo, hi) = clopper_pearson(5, 100, 0.95);
        assert!(close(lo, 0.016_432) && close(hi, 0.112_835), "{lo} {hi}");
        let (lo, hi) = clopper_pearson(100, 100, 0.95);
        assert!(close(lo, 0.963_783) && hi == 1.0, "{lo} {hi}");
        assert_eq!(clopper_pearson(0, 0, 0.95), (0.0, 1.0));
        assert!((binomial_cdf(2, 4, 0.5) - 11.0 / 16.0).abs() < 1e-12);
    }

    /// The benchmark's threshold metric parses as a Threshold metric with max 1.
    #[test]
    fn threshold_metric_parses() {
        let m = threshold_metric().unwrap();
        assert_eq!(m.max, Some(MAX_ERROR_PERCENT));
        assert_eq!(m.judge, Some(crate::api::Judge::Threshold));
        assert_eq!(m.min_sample_size, None);
    }

    /// The full grid has every combination plus the bursty and cold-start cells, each label
    /// once.
    #[test]
    fn grid_shape() {
        let full = cells(true);
        // The grid, the bursty and cold-start cells, and the option cells (per baseline:
        // bursts with Hold, and a 30 s warm-up on cold start, A/A, ×5, ×10, hard failure).
        assert_eq!(full.len(), 3 * 2 * 2 * 5 * 2 + 2 * 2 * 2 + 2 * 6);
        let mut labels: Vec<String> = full.iter().map(Cell::label).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), full.len());
        assert!(cells(false).len() < 10);
    }

    /// The simulated traffic has the requested rate and share, and a 5× canary five times
    /// the errors.
    #[test]
    fn traffic_has_the_requested_rates() {
        let cell = Cell {
            rps: 100.0,
            canary_share: 0.2,
            baseline: 0.01,
            behaviour: Behaviour::Ratio(5.0),
            look_seconds: 10,
            options: Options::default(),
        };
        let mut rng = Rng::seeded(3);
        let mut total = Look::default();
        let traffic = simulate_traffic(&cell, &mut rng);
        assert_eq!(traffic.ticks.len(), 180);
        for t in &traffic.ticks {
            accumulate(&mut total, t);
        }
        let near = |x: f64, want: f64| (x - want).abs() < 5.0 * want.sqrt();
        assert!(near(total.canary.requests, 36_000.0), "{total:?}");
        assert!(near(total.primary.requests, 144_000.0), "{total:?}");
        assert!(near(total.canary.bad, 1_800.0), "{total:?}");
        assert!(near(total.primary.bad, 1_440.0), "{total:?}");
    }

    /// Shared bursts raise both arms' errors alike; a cold start only the canary's, early.
    #[test]
    fn varying_rates() {
        let cell = |behaviour| Cell {
            rps: 100.0,
            canary_share: 0.5,
            baseline: 0.001,
            behaviour,
            look_seconds: 10,
            options: Options::default(),
        };
        let mut rng = Rng::seeded(5);
        let bursty = simulate_traffic(&cell(Behaviour::Bursty), &mut rng);
        let mut total = Look::default();
        for t in &bursty.ticks {
            accumulate(&mut total, t);
        }
        // 8% of the time at 20×: about 2.5× the baseline's 90 errors per arm.
        assert!(
            total.primary.bad > 150.0 && total.canary.bad > 150.0,
            "{total:?}"
        );
        // The first 30 s of 200 cold starts: about 5× the primary's errors.
        let (mut canary, mut primary) = (0.0, 0.0);
        for _ in 0..200 {
            let cold = simulate_traffic(&cell(Behaviour::ColdStart), &mut rng);
            canary += cold.ticks.iter().take(3).map(|t| t.canary.bad).sum::<f64>();
            primary += cold
                .ticks
                .iter()
                .take(3)
                .map(|t| t.primary.bad)
                .sum::<f64>();
        }
        assert!(
            (4.0..6.0).contains(&(canary / primary)),
            "{canary} {primary}"
        );
    }

    /// The same seed gives the same figures; another seed, others.
    #[test]
    fn deterministic() {
        let metric = threshold_metric().unwrap();
        let cell = cells(false)[1];
        let a = run_cell(&cell, &metric, 30, 7);
        assert_eq!(a, run_cell(&cell, &metric, 30, 7));
        assert_ne!(a, run_cell(&cell, &metric, 30, 8));
    }

    /// The quick grid runs; the sequential judge rolls back every hard failure at 100 rps at
    /// its first look, before promotion, having served about 100 failed requests.
    #[test]
    fn quick_grid_and_hard_failure() {
        let metric = threshold_metric().unwrap();
        let results: Vec<CellResult> = cells(false)
            .iter()
            .map(|c| run_cell(c, &metric, 20, 1))
            .collect();
        let hard = results
            .iter()
            .find(|r| r.cell.behaviour == Behaviour::HardFailure)
            .unwrap();
        let s = &hard.sequential;
        assert_eq!(s.rolled_back, 20);
        assert_eq!(s.caught_before_promotion, 20);
        assert_eq!(s.rollback_seconds.last(), Some(&10));
        assert!((50.0..150.0).contains(&s.mean_bad_served()), "{s:?}");
        // The threshold judge needs two failed checks: two minutes.
        assert_eq!(hard.threshold.rollback_quantile(0.5), Some(120));
        let text = table(&results);
        assert_eq!(
            text.lines().filter(|l| l.starts_with("| 100 rps")).count(),
            8
        );
        assert!(text.contains("50% errors"), "{text}");
    }

    /// Identical versions at 100 rps, 20%, 0.1%: the sequential judge rolls back few runs,
    /// and a 5× regression is caught in most.
    #[test]
    fn few_false_rollbacks_at_a_low_baseline() {
        let metric = threshold_metric().unwrap();
        let cell = cells(false)[0];
        assert_eq!(cell.behaviour, Behaviour::Ratio(1.0));
        let r = run_cell(&cell, &metric, 200, 11);
        assert!(r.sequential.rolled_back <= 10, "{:?}", r.sequential);
        let worse = run_cell(&cells(false)[1], &metric, 200, 11);
        assert!(
            worse.sequential.rolled_back >= 150,
            "{:?}",
            worse.sequential
        );
    }

    /// At a 1% baseline against max 1, the threshold judge rolls back most identical
    /// canaries; the sequential judge, whose guard tests the rate and not each window's
    /// value, almost none.
    #[test]
    fn threshold_judge_false_alarms_at_the_bound() {
        let metric = threshold_metric().unwrap();
        let cell = cells(false)[3];
        assert_eq!(
            (cell.baseline, cell.behaviour),
            (0.01, Behaviour::Ratio(1.0))
        );
        let r = run_cell(&cell, &metric, 200, 13);
        assert!(r.threshold.rolled_back_share() > 0.5, "{:?}", r.threshold);
        assert!(
            r.sequential.rolled_back_share() < 0.05,
            "{:?}",
            r.sequential
        );
    }

    /// Quantiles are nearest-rank; figures without runs are empty, not NaN.
    #[test]
    fn summary_quantiles() {
        let s = Summary {
            runs: 10,
            rolled_back: 4,
            rollback_seconds: vec![10, 20, 30, 40],
            ..Summary::default()
        };
        assert_eq!(s.rollback_quantile(0.5), Some(20));
        assert_eq!(s.rollback_quantile(0.9), Some(40));
        assert_eq!(Summary::default().rollback_quantile(0.5), None);
        assert_eq!(Summary::default().mean_bad_served(), 0.0);
        assert_eq!(count(4200.4), "4,200");
        assert_eq!(count(123_456.0), "123,456");
        assert_eq!(count(3.25), "3.2");
    }
}
