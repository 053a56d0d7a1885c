//! A traffic simulator: a small data-plane stand-in for tests and `serin demo`.
//!
//! For each simulated service it reads the current weights from the routing object Serin
//! writes (through a [`WeightSource`], normally the router itself), sends requests at a
//! fixed rate split by those weights to a primary and a canary "version" whose error rate
//! and latency can change over time, and publishes what happened the way Envoy does:
//! `envoy_cluster_upstream_rq{envoy_cluster_name, envoy_response_code}` counters and
//! `envoy_cluster_upstream_rq_time` histograms (milliseconds, Envoy's default buckets) on a
//! Prometheus `/metrics` endpoint that a real Prometheus scrapes.
//!
//! Request outcomes are deterministic by default: errors are spread evenly (an exact
//! fraction of each arm's requests) and latencies come from a seeded generator, so a test
//! can compute the expected error rate exactly. [`TrafficSimulator::random_errors`] makes
//! each request fail independently instead (seeded), as real failures do, for tests that
//! count how often a judge is fooled by chance. It is not a load generator: no real
//! requests are sent.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::arms::Weights;

/// Envoy's default histogram buckets for request times, in milliseconds.
pub const ENVOY_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// How one version behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Behaviour {
    /// Fraction of requests answered 503, in 0..=1.
    pub error_rate: f64,
    /// Median latency in milliseconds.
    pub median_ms: f64,
    /// 99th percentile latency in milliseconds (≥ median).
    pub p99_ms: f64,
}

impl Behaviour {
    /// A healthy version: no errors, 20 ms median, 80 ms p99.
    pub const HEALTHY: Behaviour = Behaviour {
        error_rate: 0.0,
        median_ms: 20.0,
        p99_ms: 80.0,
    };
}

/// Where a simulated service reads its current weights.
#[async_trait]
pub trait WeightSource: Send + Sync {
    /// The weights now; an error keeps the previous weights.
    async fn weights(&self) -> Result<Weights, String>;
}

/// Fixed weights, changed by the test.
#[derive(Clone)]
pub struct FixedWeights(pub Arc<Mutex<Weights>>);

#[async_trait]
impl WeightSource for FixedWeights {
    async fn weights(&self) -> Result<Weights, String> {
        self.0.lock().map(|w| *w).map_err(|e| e.to_string())
    }
}

/// The weights on the routing object of a Canary, read through its router each time:
/// exactly what the data plane would apply.
pub struct RouterWeights {
    routers: crate::router::Routers,
    canaries: kube::Api<crate::api::Canary>,
    name: String,
}

impl RouterWeights {
    /// Weights of Canary `namespace/name` as its router reads them.
    pub fn new(
        client: kube::Client,
        routers: crate::router::Routers,
        namespace: &str,
        name: &str,
    ) -> Self {
        RouterWeights {
            routers,
            canaries: kube::Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }
}

#[async_trait]
impl WeightSource for RouterWeights {
    async fn weights(&self) -> Result<Weights, String> {
        let canary = self
            .canaries
            .get(&self.name)
            .await
            .map_err(|e| e.to_string())?;
        let router = self
            .routers
            .for_canary(&canary)
            .map_err(|e| e.to_string())?;
        router.weights(&canary).await.map_err(|e| e.to_string())
    }
}

/// One simulated service: two Envoy clusters and their traffic.
pub struct ServiceConfig {
    /// Envoy cluster name of the primary arm.
    pub primary_cluster: String,
    /// Envoy cluster name of the canary arm.
    pub canary_cluster: String,
    /// Requests per second across both arms.
    pub rps: f64,
    /// The primary's behaviour.
    pub primary: Behaviour,
    /// The canary's behaviour over time: `(since start, behaviour)`, sorted; the last entry
    /// whose time has passed applies.
    pub canary: Vec<(Duration, Behaviour)>,
    /// Where the weights come from.
    pub weights: Arc<dyn WeightSource>,
}

#[derive(Default, Clone)]
struct ArmCounters {
    ok: u64,
    errors: u64,
    buckets: Vec<u64>,
    sum_ms: f64,
    /// Fractional requests and errors carried to the next tick.
    carry_requests: f64,
    carry_errors: f64,
}

impl ArmCounters {
    fn total(&self) -> u64 {
        self.ok + self.errors
    }
}

struct ServiceState {
    config: ServiceConfig,
    /// The canary's behaviour once it carries at least this share of traffic.
    under_load: Option<(u8, Behaviour)>,
    weights: Weights,
    primary: ArmCounters,
    canary: ArmCounters,
}

/// The simulator: a set of services ticking together, and their exposition.
pub struct TrafficSimulator {
    services: Mutex<Vec<ServiceState>>,
    rng: Mutex<u64>,
    elapsed: Mutex<Duration>,
    random_errors: std::sync::atomic::AtomicBool,
}

/// A snapshot of one arm's counters, for tests and the demo's view.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ArmTotals {
    /// Requests sent.
    pub requests: u64,
    /// Requests answered 5xx.
    pub errors: u64,
}

impl TrafficSimulator {
    /// A simulator for `services`; `seed` fixes the latency samples.
    pub fn new(services: Vec<ServiceConfig>, seed: u64) -> Arc<Self> {
        let states = services
            .into_iter()
            .map(|config| ServiceState {
                config,
                under_load: None,
                weights: Weights::STABLE,
                primary: ArmCounters {
                    buckets: vec![0; ENVOY_BUCKETS_MS.len()],
                    ..Default::default()
                },
                canary: ArmCounters {
                    buckets: vec![0; ENVOY_BUCKETS_MS.len()],
                    ..Default::default()
                },
            })
            .collect();
        Arc::new(TrafficSimulator {
            services: Mutex::new(states),
            rng: Mutex::new(seed | 1),
            elapsed: Mutex::new(Duration::ZERO),
            random_errors: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads every service's weights, then sends `dt` worth of requests.
    pub async fn tick(&self, dt: Duration) {
        let sources: Vec<Arc<dyn WeightSource>> = match self.services.lock() {
            Ok(s) => s.iter().map(|s| s.config.weights.clone()).collect(),
            Err(_) => return,
        };
        let mut weights = Vec::with_capacity(sources.len());
        for s in &sources {
            weights.push(s.weights().await.ok());
        }
        let elapsed = match self.elapsed.lock() {
            Ok(mut e) => {
                *e += dt;
                *e
            }
            Err(_) => return,
        };
        let (Ok(mut services), Ok(mut rng)) = (self.services.lock(), self.rng.lock()) else {
            return;
        };
        for (state, w) in services.iter_mut().zip(weights) {
            if let Some(w) = w {
                state.weights = w;
            }
            let total = state.config.rps * dt.as_secs_f64();
            let canary_behaviour = state
                .config
                .canary
                .iter()
                .rev()
                .find(|(at, _)| *at <= elapsed)
                .map(|(_, b)| *b)
                .unwrap_or(Behaviour::HEALTHY);
            let canary_behaviour = match state.under_load {
                Some((min, b)) if state.weights.canary() >= min => b,
                _ => canary_behaviour,
            };
            let primary_share = total * f64::from(state.weights.primary()) / 100.0;
            let canary_share = total * f64::from(state.weights.canary()) / 100.0;
            let random = self
                .random_errors
                .load(std::sync::atomic::Ordering::Relaxed);
            send(
                &mut state.primary,
                primary_share,
                state.config.primary,
                random,
                &mut rng,
            );
            send(
                &mut state.canary,
                canary_share,
                canary_behaviour,
                random,
                &mut rng,
            );
        }
    }

    /// With `on`, each request fails independently with its arm's error rate (a seeded
    /// Bernoulli draw) instead of an exact, evenly spread fraction.
    pub fn random_errors(&self, on: bool) {
        self.random_errors
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes service `index`'s canary behave as `behaviour` whenever it carries at least
    /// `min_weight` percent of the traffic (a version that fails only under load).
    pub fn degrade_under_load(&self, index: usize, min_weight: u8, behaviour: Behaviour) {
        if let Ok(mut services) = self.services.lock()
            && let Some(s) = services.get_mut(index)
        {
            s.under_load = Some((min_weight, behaviour));
        }
    }

    /// Ticks every `every` until the returned task is aborted.
    pub fn run(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let sim = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                sim.tick(every).await;
            }
        })
    }

    /// Totals of service `index`: (primary, canary).
    pub fn totals(&self, index: usize) -> Option<(ArmTotals, ArmTotals)> {
        let services = self.services.lock().ok()?;
        let s = services.get(index)?;
        let t = |a: &ArmCounters| ArmTotals {
            requests: a.total(),
            errors: a.errors,
        };
        Some((t(&s.primary), t(&s.canary)))
    }

    /// Cumulative latency histogram of service `index` (primary, canary): counts per bucket
    /// of [`ENVOY_BUCKETS_MS`], not cumulative across buckets.
    pub fn histograms(&self, index: usize) -> Option<(Vec<u64>, Vec<u64>)> {
        let services = self.services.lock().ok()?;
        let s = services.get(index)?;
        Some((s.primary.buckets.clone(), s.canary.buckets.clone()))
    }

    /// The weights service `index` last read.
    pub fn weights(&self, index: usize) -> Option<Weights> {
        self.services.lock().ok()?.get(index).map(|s| s.weights)
    }

    /// The Prometheus text exposition of every counter and histogram.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(services) = self.services.lock() else {
            return out;
        };
        let _ = writeln!(out, "# TYPE envoy_cluster_upstream_rq counter");
        for s in services.iter() {
            for (cluster, arm) in [
                (&s.config.primary_cluster, &s.primary),
                (&s.config.canary_cluster, &s.canary),
            ] {
                for (code, n) in [("200", arm.ok), ("503", arm.errors)] {
                    let _ = writeln!(
                        out,
                        "envoy_cluster_upstream_rq{{envoy_cluster_name=\"{cluster}\",envoy_response_code=\"{code}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(out, "# TYPE envoy_cluster_upstream_rq_time histogram");
        for s in services.iter() {
            for (cluster, arm) in [
                (&s.config.primary_cluster, &s.primary),
                (&s.config.canary_cluster, &s.canary),
            ] {
                let mut cumulative = 0;
                for (le, n) in ENVOY_BUCKETS_MS.iter().zip(&arm.buckets) {
                    cumulative += n;
                    let _ = writeln!(
                        out,
                        "envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"{cluster}\",le=\"{le}\"}} {cumulative}"
                    );
                }
                let _ = writeln!(
                    out,
                    "envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=\"{cluster}\",le=\"+Inf\"}} {}",
                    arm.total()
                );
                let _ = writeln!(
                    out,
                    "envoy_cluster_upstream_rq_time_sum{{envoy_cluster_name=\"{cluster}\"}} {}",
                    arm.sum_ms
                );
                let _ = writeln!(
                    out,
                    "envoy_cluster_upstream_rq_time_count{{envoy_cluster_name=\"{cluster}\"}} {}",
                    arm.total()
                );
            }
        }
        out
    }

    /// Serves `/metrics` on `addr` (127.0.0.1); returns the bound address.
    pub async fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let sim = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let sim = sim.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        sim.render(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((bound, task))
    }
}

fn send(arm: &mut ArmCounters, requests: f64, behaviour: Behaviour, random: bool, rng: &mut u64) {
    // The epsilon keeps sums of tenths from landing just under a whole number.
    arm.carry_requests += requests;
    let n = (arm.carry_requests + 1e-9).floor();
    arm.carry_requests -= n;
    let n = n as u64;
    let p = behaviour.error_rate.clamp(0.0, 1.0);
    let errors = if random {
        (0..n)
            .filter(|_| ((next(rng) >> 11) as f64 / (1u64 << 53) as f64) < p)
            .count() as u64
    } else {
        arm.carry_errors += n as f64 * p;
        let errors = ((arm.carry_errors + 1e-9).floor() as u64).min(n);
        arm.carry_errors -= errors as f64;
        errors
    };
    arm.errors += errors;
    arm.ok += n - errors;
    for _ in 0..n {
        let ms = latency(behaviour, rng);
        arm.sum_ms += ms;
        let bucket = ENVOY_BUCKETS_MS
            .iter()
            .position(|le| ms <= *le)
            .unwrap_or(ENVOY_BUCKETS_MS.len() - 1);
        arm.buckets[bucket] += 1;
    }
}

/// A log-normal latency with the given median and 99th percentile.
fn latency(b: Behaviour, rng: &mut u64) -> f64 {
    let median = b.median_ms.max(0.01);
    let sigma = ((b.p99_ms.max(median) / median).ln() / 2.326).max(0.0);
    median * (sigma * standard_normal(rng)).exp()
}

/// Box–Muller over splitmix64.
fn standard_normal(state: &mut u64) -> f64 {
    let u1 = (next(state) >> 11) as f64 / (1u64 << 53) as f64;
    let u2 = (next(state) >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.max(f64::MIN_POSITIVE).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Parses the simulator's own exposition back into `name{labels} → value` (tests).
pub fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(weights: Weights, canary: Behaviour) -> (Arc<TrafficSimulator>, Arc<Mutex<Weights>>) {
        let w = Arc::new(Mutex::new(weights));
        let s = TrafficSimulator::new(
            vec![ServiceConfig {
                primary_cluster: "p".into(),
                canary_cluster: "c".into(),
                rps: 100.0,
                primary: Behaviour::HEALTHY,
                canary: vec![(Duration::ZERO, canary)],
                weights: Arc::new(FixedWeights(w.clone())),
            }],
            7,
        );
        (s, w)
    }

    /// Traffic splits by the weights it reads, and errors are the exact configured fraction.
    #[tokio::test]
    async fn splits_by_weight_with_exact_error_fraction() {
        let bad = Behaviour {
            error_rate: 0.05,
            ..Behaviour::HEALTHY
        };
        let (s, w) = sim(Weights::with_canary(20), bad);
        for _ in 0..100 {
            s.tick(Duration::from_millis(100)).await;
        }
        let (p, c) = s.totals(0).unwrap();
        assert_eq!((p.requests, c.requests), (800, 200));
        assert_eq!((p.errors, c.errors), (0, 10));
        *w.lock().unwrap() = Weights::with_canary(50);
        for _ in 0..10 {
            s.tick(Duration::from_millis(100)).await;
        }
        let (p, c) = s.totals(0).unwrap();
        assert_eq!((p.requests, c.requests), (850, 250));
    }

    /// The exposition has Envoy's names and a cumulative histogram whose count matches.
    #[tokio::test]
    async fn exposition_is_envoy_shaped() {
        let (s, _) = sim(Weights::with_canary(50), Behaviour::HEALTHY);
        s.tick(Duration::from_secs(1)).await;
        let m = parse_exposition(&s.render());
        assert_eq!(
            m[r#"envoy_cluster_upstream_rq{envoy_cluster_name="c",envoy_response_code="200"}"#],
            50.0
        );
        assert_eq!(
            m[r#"envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="c",le="+Inf"}"#],
            50.0
        );
        assert_eq!(
            m[r#"envoy_cluster_upstream_rq_time_count{envoy_cluster_name="p"}"#],
            50.0
        );
        let below_100 =
            m[r#"envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name="c",le="100"}"#];
        assert!(
            below_100 >= 49.0,
            "p99 is 80 ms, so nearly all requests are under 100 ms: {below_100}"
        );
    }

    /// Latencies follow the configured median and p99.
    #[test]
    fn latency_distribution() {
        let mut rng = 42;
        let b = Behaviour {
            error_rate: 0.0,
            median_ms: 50.0,
            p99_ms: 400.0,
        };
        let mut v: Vec<f64> = (0..20_000).map(|_| latency(b, &mut rng)).collect();
        v.sort_by(f64::total_cmp);
        let median = v[10_000];
        let p99 = v[19_800];
        assert!((45.0..55.0).contains(&median), "median {median}");
        assert!((340.0..470.0).contains(&p99), "p99 {p99}");
    }
}
