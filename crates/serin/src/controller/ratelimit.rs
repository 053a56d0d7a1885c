//! The client-side rate limit of the operator's Kubernetes requests: a token bucket of
//! `--kube-qps` requests per second that holds at most `--kube-burst`, so that a burst of
//! work (ten thousand Canaries created at once, a restart that finds them all) is spread out
//! instead of flooding the API server.
//!
//! Every request through the limited client takes a token; a request that finds none waits
//! for its turn (callers are served in the order they asked, each reserving the next free
//! slot), so the rate over any window of `t` seconds is at most `burst + qps · t`. A watch
//! counts once, when it starts. The leader election's Lease has a client of its own,
//! outside the limit, so a queue of requests never delays a renewal.
//!
//! What it implies: work waits in the controller's queue rather than in the API server's.
//! The defaults (300/s, burst 600) leave room for 10,000 Canaries at one check a minute
//! (about 170 status writes a second, plus weight writes and Events). The first weight
//! write of each of 10,000 Canaries created at once needs about eight requests before it
//! (finalizer, status, Services and routing objects, Events): some 80,000 requests, about
//! 4½ minutes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body as HttpBody;
use axum::http::Request;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// A token bucket: `qps` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub struct RateLimit {
    qps: f64,
    burst: f64,
    /// Tokens at the instant (negative: slots already reserved by waiting requests).
    state: Mutex<(f64, Instant)>,
    /// Requests that had to wait.
    throttled: Counter,
    /// Seconds they waited, in all.
    throttled_seconds: Counter<f64>,
}

impl RateLimit {
    /// A bucket of `qps` requests a second with room for `burst` at once (at least one);
    /// `None` (no limit) when `qps` is zero or not a number above zero.
    pub fn new(qps: f64, burst: u32) -> Option<Self> {
        (qps.is_finite() && qps > 0.0).then(|| {
            let burst = f64::from(burst.max(1));
            RateLimit {
                qps,
                burst,
                state: Mutex::new((burst, Instant::now())),
                throttled: Counter::default(),
                throttled_seconds: Counter::default(),
            }
        })
    }

    /// Takes a token for a request made at `now`: how long it must wait before it is sent.
    pub fn reserve(&self, now: Instant) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = *state;
        let refilled = tokens + now.saturating_duration_since(at).as_secs_f64() * self.qps;
        let left = refilled.min(self.burst) - 1.0;
        *state = (left, now.max(at));
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.qps)
        }
    }

    /// Registers the count of requests that waited for a token and the seconds they
    /// waited: a rate above zero says the limit is pacing Serin.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "serin_kube_requests_throttled",
            "Kubernetes requests that waited for the client-side rate limit (--kube-qps)",
            self.throttled.clone(),
        );
        registry.register(
            "serin_kube_throttled_seconds",
            "Seconds Kubernetes requests waited for the client-side rate limit, in all",
            self.throttled_seconds.clone(),
        );
    }

    /// Requests that waited for a token so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.get()
    }

    fn record_wait(&self, wait: Duration) {
        self.throttled.inc();
        self.throttled_seconds.inc_by(wait.as_secs_f64());
    }
}

/// `inner` behind `limit`: every request waits for its token, then goes through `inner`
/// unchanged (responses, watches included, stream back as they come).
pub fn rate_limited_client(inner: kube::Client, limit: Arc<RateLimit>) -> kube::Client {
    let namespace = inner.default_namespace().to_string();
    let app = axum::Router::new().fallback(move |req: Request<HttpBody>| {
        let (inner, limit) = (inner.clone(), limit.clone());
        async move {
            let wait = limit.reserve(Instant::now());
            if !wait.is_zero() {
                limit.record_wait(wait);
                tokio::time::sleep(wait).await;
            }
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let req = Request::from_parts(parts, kube::client::Body::from(bytes));
            match inner.send(req).await {
                Ok(resp) => resp.map(HttpBody::new),
                Err(e) => super::leader::unreachable_response(&e),
            }
        }
    });
    kube::Client::new(app, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When the requests of a burst are sent: the reservation's wait added to the time of
    /// the request.
    fn send_times(limit: &RateLimit, asked: &[Duration], t0: Instant) -> Vec<Duration> {
        asked.iter().map(|a| *a + limit.reserve(t0 + *a)).collect()
    }

    #[test]
    fn a_burst_is_spread_at_the_rate_after_the_first_burst() {
        let limit = RateLimit::new(100.0, 200).expect("limit");
        let t0 = Instant::now();
        let sent = send_times(&limit, &[Duration::ZERO; 1000], t0);
        // The first 200 go at once; then one every 10 ms.
        assert!(sent[..200].iter().all(|s| s.is_zero()));
        let after = |k: usize| Duration::from_secs_f64((k + 1 - 200) as f64 / 100.0);
        for (k, s) in sent.iter().enumerate().skip(200) {
            assert!(
                (s.as_secs_f64() - after(k).as_secs_f64()).abs() < 1e-6,
                "request {k} sent at {s:?}, expected {:?}",
                after(k)
            );
        }
        assert!((sent[999].as_secs_f64() - 8.0).abs() < 1e-6);
    }

    #[test]
    fn no_window_carries_more_than_burst_plus_rate() {
        // Requests at irregular times: bursts, gaps, trickles.
        let limit = RateLimit::new(50.0, 20).expect("limit");
        let t0 = Instant::now();
        let mut asked = Vec::new();
        let mut t = 0.0f64;
        for i in 0..2000u32 {
            t += match i % 7 {
                0 => 0.0,
                1 => 0.001,
                2 => 0.05,
                3 => 0.0,
                4 => 0.3,
                5 => 0.0,
                _ => 0.002,
            };
            asked.push(Duration::from_secs_f64(t));
        }
        let mut sent: Vec<f64> = send_times(&limit, &asked, t0)
            .iter()
            .map(Duration::as_secs_f64)
            .collect();
        sent.sort_by(f64::total_cmp);
        for window in [0.1, 0.5, 1.0, 3.0] {
            let mut j = 0;
            for i in 0..sent.len() {
                while sent[i] - sent[j] > window {
                    j += 1;
                }
                let count = (i - j + 1) as f64;
                assert!(
                    count <= 20.0 + 50.0 * window + 1e-6,
                    "{count} requests within {window} s"
                );
            }
        }
    }

    #[test]
    fn tokens_refill_up_to_the_burst_only() {
        let limit = RateLimit::new(10.0, 5).expect("limit");
        let t0 = Instant::now();
        // An hour idle fills the bucket to 5, not 36,000.
        let later = t0 + Duration::from_secs(3600);
        let waits: Vec<Duration> = (0..7).map(|_| limit.reserve(later)).collect();
        assert_eq!(waits[..5], [Duration::ZERO; 5]);
        assert!((waits[5].as_secs_f64() - 0.1).abs() < 1e-9);
        assert!((waits[6].as_secs_f64() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(RateLimit::new(0.0, 10).is_none());
        assert!(RateLimit::new(f64::NAN, 10).is_none());
        assert!(RateLimit::new(-1.0, 10).is_none());
    }
}
