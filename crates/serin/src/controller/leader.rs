//! Leader election with a `coordination.k8s.io/v1` Lease, and the fence that keeps a
//! leader's writes inside its lease.
//!
//! **Expiry is judged on this replica's monotonic clock**, the way client-go judges it: a
//! replica records when it *observed* the holder's record (holder, renew time, resource
//! version) change, and takes the Lease only when that observation is older than the
//! record's `leaseDurationSeconds`. The `renewTime` written by another replica is never
//! compared with the local wall clock, so clocks that are minutes apart cannot make two
//! replicas lead. Every write to the Lease is a compare-and-swap on its resourceVersion.
//!
//! **A leader renews within a deadline** ([`LeaseTiming::renew_deadline`], shorter than the
//! lease): each renew call runs under a timeout that ends at the last successful renew's
//! send time plus the renew deadline. A leader that misses it, or finds another holder,
//! reports the loss; `serin run` then exits non-zero.
//!
//! **Every write is fenced** ([`Fence`], [`fenced_client`]): a client timeout does not
//! recall a request already sent, so before each mutating request the leader checks that
//! its lease outlives that request's timeout, counted from when the last successful renew
//! was *sent* (others cannot observe that record earlier), and the request gets exactly
//! that timeout. With the write timeout equal to `lease duration − renew deadline`, writes
//! stop at the renew deadline, before the lease can expire for anyone else.
//!
//! **With shards** ([`super::shard`]) a replica leads one shard's Lease and, with every
//! other leader of the same shard count, the shard-count Lease; its fence counts from the
//! earlier of the two renewals, so a change of the shard count cannot let replicas of the
//! old and the new count write at once ([`LeaderElector`]).
//!
//! It does not fence writes that do not go through the Kubernetes client (the App Mesh
//! AWS API router), and it does not release the Lease on shutdown: a standby takes over
//! one lease duration after the leader's last renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body as HttpBody;
use axum::http::{Method, Request, Response, StatusCode, header};
use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};

use super::shard::Shard;

/// Lease timing, validated by [`LeaseTiming::new`]: retry period < renew deadline < lease
/// duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long others wait, after they last saw the record change, before taking the
    /// Lease. Stored in the Lease in whole seconds (rounded up).
    pub duration: Duration,
    /// How long after its last successful renew was sent a leader may go on without
    /// another; after that it stops writing and gives up.
    pub renew_deadline: Duration,
    /// Pause between renewals, and between attempts to acquire.
    pub retry_period: Duration,
}

/// Why a [`LeaseTiming`] is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// A duration is zero.
    #[error("must be more than zero")]
    Zero,
    /// The renew deadline is not shorter than the lease.
    #[error("the renew deadline must be shorter than the lease duration")]
    RenewDeadlineNotShorter,
    /// The retry period is not shorter than the renew deadline.
    #[error("the retry period must be shorter than the renew deadline")]
    RetryPeriodNotShorter,
    /// The lease duration does not fit the Lease's 32-bit field.
    #[error("the lease duration is too long")]
    TooLong,
}

impl LeaseTiming {
    /// Longest lease accepted: a day (the Lease field is an `int32` of seconds).
    pub const MAX_DURATION: Duration = Duration::from_secs(86_400);

    /// Timing with `retry_period < renew_deadline < duration`, all more than zero.
    pub fn new(
        duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, TimingError> {
        if duration.is_zero() || renew_deadline.is_zero() || retry_period.is_zero() {
            return Err(TimingError::Zero);
        }
        if duration > Self::MAX_DURATION {
            return Err(TimingError::TooLong);
        }
        if renew_deadline >= duration {
            return Err(TimingError::RenewDeadlineNotShorter);
        }
        if retry_period >= renew_deadline {
            return Err(TimingError::RetryPeriodNotShorter);
        }
        Ok(LeaseTiming {
            duration,
            renew_deadline,
            retry_period,
        })
    }

    /// The timeout of each fenced write: `duration − renew_deadline`, so that a write
    /// sent before the renew deadline has ended (answered or abandoned) before the lease
    /// can expire for others.
    pub fn write_timeout(&self) -> Duration {
        self.duration.saturating_sub(self.renew_deadline)
    }

    /// `leaseDurationSeconds` as written to the Lease: whole seconds, rounded up so that
    /// others never wait less than this replica assumes.
    fn lease_seconds(&self) -> i32 {
        let secs = self.duration.as_secs() + u64::from(self.duration.subsec_nanos() > 0);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }
}

/// Lease identity and timing.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Lease timing.
    pub timing: LeaseTiming,
    /// How many shards share the Canaries (1: one leader for all).
    pub shards: u16,
}

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another replica holds the lease now.
    #[error("lease {name} was taken over by {holder}")]
    TakenOver {
        /// Lease name.
        name: String,
        /// Who holds it now, as far as this replica saw.
        holder: String,
    },
    /// No renewal succeeded within the renew deadline.
    #[error("could not renew lease {name} within its renew deadline of {deadline:?}: {cause}")]
    RenewFailed {
        /// Lease name.
        name: String,
        /// The renew deadline.
        deadline: Duration,
        /// What the last attempt ran into.
        #[source]
        cause: RenewFailure,
    },
}

/// What the last renew attempt of a leader that gave up ran into.
#[derive(Debug, thiserror::Error)]
pub enum RenewFailure {
    /// The API server answered with an error.
    #[error("the API server refused: {0}")]
    Api(#[source] kube::Error),
    /// The API server did not answer before the deadline.
    #[error("no answer from the API server in time")]
    NoAnswer,
}

/// Converts between chrono and the Lease's `MicroTime` (jiff inside k8s-openapi): the one
/// place this boundary is crossed. The times written are for people reading the Lease;
/// no replica judges expiry by them.
fn micro_time(t: DateTime<Utc>) -> MicroTime {
    let ts = k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(t.timestamp_micros()) * 1000)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    MicroTime(ts)
}

/// The parts of a Lease whose change shows that its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    transitions: Option<i32>,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.as_ref();
        Record {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default(),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            acquire_time: spec.and_then(|s| s.acquire_time.clone()),
            transitions: spec.and_then(|s| s.lease_transitions),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// What this replica last saw of the Lease, and when on its monotonic clock it first saw
/// that record: the client-go `observedTime`.
#[derive(Clone, Debug, Default)]
pub struct Observer {
    last: Option<(Record, Duration, Instant)>,
}

impl Observer {
    /// Notes `lease` as read at `now`. The observation time moves only when the record
    /// changed; `fallback` is the lease duration assumed when the Lease states none.
    pub fn observe(&mut self, lease: &Lease, fallback: Duration, now: Instant) {
        let record = Record::of(lease);
        let duration = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(fallback);
        match &mut self.last {
            Some((seen, d, _)) if *seen == record => *d = duration,
            _ => self.last = Some((record, duration, now)),
        }
    }

    /// Whether the Lease last observed is free for `identity` at `now`: unheld, held by
    /// `identity`, or unchanged for longer than its lease duration since this replica
    /// first saw that record. Nothing observed yet: not free (read the Lease first).
    pub fn is_free(&self, identity: &str, now: Instant) -> bool {
        let Some((record, duration, seen_at)) = &self.last else {
            return false;
        };
        if record.holder.is_empty() || record.holder == identity {
            return true;
        }
        now.saturating_duration_since(*seen_at) > *duration
    }

    /// The holder last observed ("" when unheld or nothing was observed).
    pub fn holder(&self) -> &str {
        self.last
            .as_ref()
            .map(|(r, _, _)| r.holder.as_str())
            .unwrap_or("")
    }
}

/// Whether a leader whose last successful renew was sent at `last_renew_sent` may send a
/// write with `write_timeout` at `now`: the write must be over (answered or abandoned)
/// while the lease still holds for every other replica.
pub fn write_permitted(
    last_renew_sent: Option<Instant>,
    lease_duration: Duration,
    write_timeout: Duration,
    now: Instant,
) -> bool {
    let Some(sent) = last_renew_sent else {
        return false;
    };
    match (
        sent.checked_add(lease_duration),
        now.checked_add(write_timeout),
    ) {
        (Some(expires), Some(write_over)) => write_over < expires,
        _ => false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FenceState {
    /// No leader election: every write goes out, with no timeout of the fence's.
    Open,
    /// Leader election: writes only inside the lease.
    Leading {
        lease_duration: Duration,
        write_timeout: Duration,
        last_renew_sent: Option<Instant>,
    },
    /// Leadership ended: no write goes out again.
    Closed,
}

/// What the fence says about a write about to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceVerdict {
    /// Send it, without a timeout of the fence's (no leader election).
    Open,
    /// Send it, and abandon it after this long.
    Within(Duration),
    /// Do not send it: this replica does not hold the lease long enough.
    Refused,
}

/// Decides, before each write, whether this replica's lease outlives it. Starts open (no
/// leader election); [`Fence::arm`] makes every write wait for a held lease.
#[derive(Debug)]
pub struct Fence {
    state: Mutex<FenceState>,
}

impl Default for Fence {
    fn default() -> Self {
        Fence::open()
    }
}

impl Fence {
    /// A fence that lets every write through (until armed).
    pub const fn open() -> Fence {
        Fence {
            state: Mutex::new(FenceState::Open),
        }
    }

    fn set(&self, f: impl FnOnce(FenceState) -> FenceState) {
        // A poisoned lock still holds a valid state: a panic elsewhere must not open it.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state = f(*state);
    }

    /// From now on writes need a lease renewed within `timing`: refused until
    /// [`Fence::renewed`] is first called.
    pub fn arm(&self, timing: &LeaseTiming) {
        let (lease_duration, write_timeout) = (timing.duration, timing.write_timeout());
        self.set(|_| FenceState::Leading {
            lease_duration,
            write_timeout,
            last_renew_sent: None,
        });
    }

    /// A renewal (or the acquisition) sent at `sent` succeeded.
    pub fn renewed(&self, sent: Instant) {
        self.set(|s| match s {
            FenceState::Leading {
                lease_duration,
                write_timeout,
                last_renew_sent,
            } => FenceState::Leading {
                lease_duration,
                write_timeout,
                last_renew_sent: Some(last_renew_sent.map_or(sent, |t| t.max(sent))),
            },
            other => other,
        });
    }

    /// Leadership ended: refuse every write from now on.
    pub fn close(&self) {
        self.set(|_| FenceState::Closed);
    }

    /// The verdict on a write about to be sent at `now`.
    pub fn check(&self, now: Instant) -> FenceVerdict {
        let state = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state {
            FenceState::Open => FenceVerdict::Open,
            FenceState::Closed => FenceVerdict::Refused,
            FenceState::Leading {
                lease_duration,
                write_timeout,
                last_renew_sent,
            } => {
                if write_permitted(last_renew_sent, lease_duration, write_timeout, now) {
                    FenceVerdict::Within(write_timeout)
                } else {
                    FenceVerdict::Refused
                }
            }
        }
    }
}

/// The fence also guards the writes that do not go through the Kubernetes client (the App
/// Mesh AWS API).
impl crate::router::WriteGuard for Fence {
    fn admit(&self) -> Result<Option<Duration>, String> {
        match self.check(Instant::now()) {
            FenceVerdict::Open => Ok(None),
            FenceVerdict::Within(limit) => Ok(Some(limit)),
            FenceVerdict::Refused => {
                Err("this replica does not hold the leader lease long enough to write".into())
            }
        }
    }
}

/// A client that sends everything through `inner`, except that each mutating request
/// (POST, PUT, PATCH, DELETE) first asks `fence`: refused ones never leave the process
/// (the caller gets a 503 `Status` saying why), the others are abandoned after the
/// fence's write timeout (a 504 `Status`). Reads and watches pass untouched.
///
/// The middleware is an axum `Router` with one fallback handler: it is a tower `Service`,
/// which is all `kube::Client::new` needs, without another dependency. A transport error
/// of `inner` reaches the caller as a 502 `Status` carrying its message.
pub fn fenced_client(inner: kube::Client, fence: Arc<Fence>) -> kube::Client {
    let namespace = inner.default_namespace().to_string();
    let app = axum::Router::new().fallback(move |req: Request<HttpBody>| {
        let (inner, fence) = (inner.clone(), fence.clone());
        async move { fenced_send(&inner, &fence, req).await }
    });
    kube::Client::new(app, namespace)
}

fn is_mutating(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

async fn fenced_send(
    inner: &kube::Client,
    fence: &Fence,
    req: Request<HttpBody>,
) -> Response<HttpBody> {
    let (parts, body) = req.into_parts();
    // kube sends whole bodies; collecting is free.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return status_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &format!("serin: cannot read the request body: {e}"),
            );
        }
    };
    let what = format!("{} {}", parts.method, parts.uri.path());
    let mutating = is_mutating(&parts.method);
    let req = Request::from_parts(parts, kube::client::Body::from(bytes));
    if !mutating {
        return match inner.send(req).await {
            Ok(resp) => resp.map(HttpBody::new),
            Err(e) => unreachable_response(&e),
        };
    }
    let timeout = match fence.check(Instant::now()) {
        FenceVerdict::Open => None,
        FenceVerdict::Within(t) => Some(t),
        FenceVerdict::Refused => {
            tracing::warn!(request = %what, "write refused: this replica does not hold the leader lease long enough for it");
            return status_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "serin: write refused: this replica does not hold the leader lease long enough for the write to finish inside it",
            );
        }
    };
    // The whole exchange, response body included, inside the timeout: a write the fence
    // let through is over, one way or the other, before the lease can expire for others.
    let exchange = async {
        let resp = inner.send(req).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect_bytes().await?;
        Ok::<_, kube::Error>(Response::from_parts(parts, HttpBody::from(bytes)))
    };
    let answered = match timeout {
        None => exchange.await,
        Some(t) => match tokio::time::timeout(t, exchange).await {
            Ok(answered) => answered,
            Err(_) => {
                tracing::warn!(request = %what, timeout = ?t, "write abandoned at its timeout");
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!(
                        "serin: write abandoned after {t:?}, the most the leader lease allows"
                    ),
                );
            }
        },
    };
    match answered {
        Ok(resp) => resp,
        Err(e) => unreachable_response(&e),
    }
}

pub(super) fn unreachable_response(e: &kube::Error) -> Response<HttpBody> {
    status_response(
        StatusCode::BAD_GATEWAY,
        "ServiceUnavailable",
        &format!("serin: the API server could not be reached: {e}"),
    )
}

/// A `metav1.Status` response, which kube turns into `kube::Error::Api`.
fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<HttpBody> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    let mut resp = Response::new(HttpBody::from(body.to_string()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Holds and renews this replica's two Leases: the **shard-count Lease**
/// (`<name>-shards`, held by `shards=<N>` and renewed by every leader of that shard count)
/// and the Lease of one shard (`<name>` with one shard, `<name>-<i>-of-<N>` with more).
///
/// A replica acts only while it holds both. A replica of another shard count waits until
/// the shard-count Lease has gone unrenewed for a lease duration, that is until every
/// leader of the old count has stopped, and takes it with a compare-and-swap; the old
/// leaders' renewals are JSON Patches that test the holder, so they fail from then on. So
/// a change of the shard count never lets two replicas act on one Canary: the buckets move
/// between shards only while no shard of the old count can write. The cost is a pause of
/// about one lease duration at the change.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    fence: Arc<Fence>,
    observers: Mutex<HashMap<String, Observer>>,
    /// When the last successful acquisition or renewal of both Leases was sent (the
    /// earlier of the two).
    last_renew_sent: Mutex<Option<Instant>>,
    /// The shard whose Lease this replica holds, or last took.
    shard: Mutex<Option<u16>>,
}

enum RenewError {
    /// Lease `lease` is held by `holder` now.
    Lost {
        lease: String,
        holder: String,
    },
    Api(kube::Error),
}

/// What an attempt on a Lease found.
enum Take {
    /// Held by someone else, and alive.
    Busy,
    /// Already held by this holder; nothing was written.
    Ours,
    /// Written with this holder; the write was sent then.
    Taken(Instant),
}

impl LeaseConfig {
    /// The shard-count Lease.
    pub fn count_lease(&self) -> String {
        format!("{}-shards", self.name)
    }

    /// The holder of the shard-count Lease for this replica's shard count.
    fn count_holder(&self) -> String {
        format!("shards={}", self.shards)
    }

    /// The Lease of shard `index`.
    pub fn shard_lease(&self, index: u16) -> String {
        if self.shards <= 1 {
            self.name.clone()
        } else {
            format!("{}-{index}-of-{}", self.name, self.shards)
        }
    }
}

impl LeaderElector {
    /// An elector for `config`. `client` must not be fenced by `fence` (the Lease writes
    /// are what open it); every success is reported to `fence`.
    pub fn new(client: kube::Client, config: LeaseConfig, fence: Arc<Fence>) -> Self {
        let api = Api::namespaced(client, &config.namespace);
        LeaderElector {
            api,
            config,
            fence,
            observers: Mutex::default(),
            last_renew_sent: Mutex::new(None),
            shard: Mutex::new(None),
        }
    }

    fn timing(&self) -> &LeaseTiming {
        &self.config.timing
    }

    fn succeeded(&self, sent: Instant) {
        if let Ok(mut last) = self.last_renew_sent.lock() {
            *last = Some(last.map_or(sent, |t| t.max(sent)));
        }
        self.fence.renewed(sent);
    }

    fn held_shard(&self) -> Option<u16> {
        self.shard.lock().ok().and_then(|s| *s)
    }

    fn held_lease(&self) -> String {
        self.config.shard_lease(self.held_shard().unwrap_or(0))
    }

    /// The holder last observed of Lease `name` ("" when none).
    fn observed_holder(&self, name: &str) -> String {
        self.observers
            .lock()
            .ok()
            .and_then(|o| o.get(name).map(|o| o.holder().to_string()))
            .unwrap_or_default()
    }

    /// Waits until this replica holds the shard-count Lease's count and one shard's
    /// Lease; returns the shard. Meanwhile it is a standby: healthy, and writing nothing
    /// but its attempts on the Leases.
    pub async fn acquire(&self) -> Shard {
        let mut standing_by_for = String::new();
        loop {
            let attempt = tokio::time::timeout(self.timing().renew_deadline, self.try_acquire());
            match attempt.await {
                Ok(Ok(Some(index))) => {
                    tracing::info!(lease = %self.config.shard_lease(index), identity = %self.config.identity, shard = index, shards = self.config.shards, "acquired leadership");
                    return Shard {
                        index,
                        count: self.config.shards,
                    };
                }
                Ok(Ok(None)) => {
                    let count = self.observed_holder(&self.config.count_lease());
                    let why = if !count.is_empty() && count != self.config.count_holder() {
                        format!("replicas with {count} still lead; waiting for them to stop")
                    } else {
                        let holders: Vec<String> = (0..self.config.shards)
                            .map(|i| self.observed_holder(&self.config.shard_lease(i)))
                            .collect();
                        format!("every shard is led: {}", holders.join(", "))
                    };
                    if why != standing_by_for {
                        tracing::info!(lease = %self.config.name, "standing by: {why}");
                        standing_by_for = why;
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "lease acquisition failed; retrying"),
                Err(_) => tracing::warn!("lease acquisition got no answer in time; retrying"),
            }
            tokio::time::sleep(self.timing().retry_period).await;
        }
    }

    async fn try_acquire(&self) -> Result<Option<u16>, kube::Error> {
        let (count_lease, count_holder) = (self.config.count_lease(), self.config.count_holder());
        if matches!(
            self.take(&count_lease, &count_holder, false).await?,
            Take::Busy
        ) {
            return Ok(None);
        }
        // The shard last held first, then from a place that spreads replicas over the
        // shards (so they do not all try shard 0 first).
        let shards = self.config.shards.max(1);
        let first = self
            .held_shard()
            .unwrap_or_else(|| super::shard::bucket_of(&self.config.identity) % shards);
        for i in 0..shards {
            let index = (first + i) % shards;
            let Take::Taken(shard_sent) = self
                .take(&self.config.shard_lease(index), &self.config.identity, true)
                .await?
            else {
                continue;
            };
            if let Ok(mut s) = self.shard.lock() {
                *s = Some(index);
            }
            // The shard count is confirmed after the shard is taken: the count's holder
            // may have changed in between, and the fence counts from the earlier write.
            return match self.renew_count().await {
                Ok(count_sent) => {
                    self.succeeded(count_sent.min(shard_sent));
                    Ok(Some(index))
                }
                Err(RenewError::Lost { .. }) => Ok(None),
                Err(RenewError::Api(e)) => Err(e),
            };
        }
        Ok(None)
    }

    /// Takes Lease `name` for `holder` if it is unheld, expired, or (with `write_if_ours`)
    /// already ours; every write is a compare-and-swap on the resourceVersion read.
    async fn take(
        &self,
        name: &str,
        holder: &str,
        write_if_ours: bool,
    ) -> Result<Take, kube::Error> {
        let wall = Utc::now();
        let spec = |transitions: i32| LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(self.timing().lease_seconds()),
            acquire_time: Some(micro_time(wall)),
            renew_time: Some(micro_time(wall)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let written = |sent| Take::Taken(sent);
        match self.api.get_opt(name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: Some(self.config.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(0)),
                };
                let sent = Instant::now();
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(written(sent)),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Take::Busy),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let free = {
                    let mut observers = self.observers.lock().unwrap_or_else(|p| p.into_inner());
                    let observer = observers.entry(name.to_string()).or_default();
                    let now = Instant::now();
                    observer.observe(&lease, self.timing().duration, now);
                    observer.is_free(holder, now)
                };
                if !free {
                    return Ok(Take::Busy);
                }
                let old = lease.spec.clone().unwrap_or_default();
                let ours = old.holder_identity.as_deref() == Some(holder);
                if ours && !write_if_ours {
                    return Ok(Take::Ours);
                }
                let transitions = old.lease_transitions.unwrap_or(0);
                let mut new = spec(if ours {
                    transitions
                } else {
                    transitions.saturating_add(1)
                });
                if ours {
                    new.acquire_time = old.acquire_time.or(new.acquire_time);
                }
                lease.spec = Some(new);
                let sent = Instant::now();
                match self.api.replace(name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(written(sent)),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Take::Busy),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Renews the Leases until leadership is lost; returns why, after closing the fence.
    /// Never returns while leading.
    pub async fn hold(&self) -> LeaseError {
        let err = self.renew_until_lost().await;
        self.fence.close();
        tracing::warn!(error = %err, "leadership lost: stopped writing");
        err
    }

    async fn renew_until_lost(&self) -> LeaseError {
        let timing = *self.timing();
        let mut last_error = RenewFailure::NoAnswer;
        loop {
            tokio::time::sleep(timing.retry_period).await;
            let last = self
                .last_renew_sent
                .lock()
                .ok()
                .and_then(|l| *l)
                .unwrap_or_else(Instant::now);
            let deadline = last.checked_add(timing.renew_deadline).unwrap_or(last);
            let failed = |cause| LeaseError::RenewFailed {
                name: self.held_lease(),
                deadline: timing.renew_deadline,
                cause,
            };
            if Instant::now() >= deadline {
                return failed(last_error);
            }
            let attempt =
                tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), self.renew());
            match attempt.await {
                Ok(Ok(sent)) => self.succeeded(sent),
                Ok(Err(RenewError::Lost { lease, holder })) => {
                    return LeaseError::TakenOver {
                        name: lease,
                        holder,
                    };
                }
                Ok(Err(RenewError::Api(source))) => {
                    tracing::warn!(error = %source, "lease renewal failed; retrying until the renew deadline");
                    last_error = RenewFailure::Api(source);
                }
                Err(_) => return failed(RenewFailure::NoAnswer),
            }
        }
    }

    /// Gives the shard's Lease up on a clean shutdown, so a standby takes over within its
    /// retry period instead of a lease duration. Call it once the writes already sent have
    /// ended (answered, or abandoned at the write timeout), so that the two replicas'
    /// writes cannot overlap; the fence is closed here too. A Lease no longer ours, or an
    /// API error, is left alone: the standby then waits out the lease. The shard-count
    /// Lease is left to the other leaders of this count (it expires when the last stops).
    pub async fn release(&self) {
        self.fence.close();
        let name = self.held_lease();
        let Ok(Some(mut lease)) = self.api.get_opt(&name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(micro_time(Utc::now()));
        // Guarded by the resourceVersion read above: a takeover in between wins.
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %name, "released leadership"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the lease; a standby waits it out")
            }
        }
    }

    /// One renewal of both Leases; returns when the earlier write was sent.
    async fn renew(&self) -> Result<Instant, RenewError> {
        let count_sent = self.renew_count().await?;
        let shard_sent = self.renew_shard().await?;
        Ok(count_sent.min(shard_sent))
    }

    /// Renews the shard-count Lease with a JSON Patch that tests its holder: the leaders of
    /// one count renew it side by side without conflicts, and none of them can renew it
    /// once a replica of another count has taken it.
    async fn renew_count(&self) -> Result<Instant, RenewError> {
        let (name, holder) = (self.config.count_lease(), self.config.count_holder());
        let renew_time = serde_json::to_value(micro_time(Utc::now()))
            .map_err(|e| RenewError::Api(kube::Error::SerdeError(e)))?;
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/spec/holderIdentity", "value": holder},
            {"op": "add", "path": "/spec/renewTime", "value": renew_time},
            {"op": "add", "path": "/spec/leaseDurationSeconds", "value": self.timing().lease_seconds()},
        ]))
        .map_err(|e| RenewError::Api(kube::Error::SerdeError(e)))?;
        let sent = Instant::now();
        match self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => Ok(sent),
            Err(e) => {
                // A failed test, or no Lease at all: whose is it now?
                let now = match self.api.get_opt(&name).await {
                    Ok(Some(l)) => l.spec.and_then(|s| s.holder_identity).unwrap_or_default(),
                    Ok(None) => String::new(),
                    Err(_) => return Err(RenewError::Api(e)),
                };
                if now == holder {
                    Err(RenewError::Api(e))
                } else {
                    Err(RenewError::Lost {
                        lease: name,
                        holder: now,
                    })
                }
            }
        }
    }

    async fn renew_shard(&self) -> Result<Instant, RenewError> {
        let name = self.held_lease();
        let mut lease = self.api.get(&name).await.map_err(RenewError::Api)?;
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        if holder != self.config.identity {
            return Err(RenewError::Lost {
                lease: name,
                holder,
            });
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(micro_time(Utc::now()));
            spec.lease_duration_seconds = Some(self.timing().lease_seconds());
        }
        let sent = Instant::now();
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(sent),
            // Someone else wrote the Lease between our read and write: it is no longer ours.
            Err(kube::Error::Api(s)) if s.code == 409 => Err(RenewError::Lost {
                lease: name,
                holder: "another replica".into(),
            }),
            Err(e) => Err(RenewError::Api(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AWS writes ask the same fence: open without leader election, refused when not
    /// leading or not renewed, and bounded by the write timeout when leading.
    #[test]
    fn the_fence_guards_writes_outside_kubernetes_too() {
        use crate::router::WriteGuard as _;
        let fence = Fence::open();
        assert_eq!(fence.admit(), Ok(None));
        let timing = LeaseTiming::new(
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .unwrap();
        fence.arm(&timing);
        assert!(fence.admit().is_err(), "armed but never renewed");
        fence.renewed(Instant::now());
        assert_eq!(fence.admit(), Ok(Some(Duration::from_secs(5))));
        fence.close();
        assert!(fence.admit().unwrap_err().contains("leader lease"));
    }
    use chrono::TimeZone;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn lease(holder: &str, renewed: DateTime<Utc>, secs: i32, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(secs),
                renew_time: Some(micro_time(renewed)),
                ..Default::default()
            }),
        }
    }

    /// A lease is free when unheld or held by us, whatever its times say.
    #[test]
    fn unheld_or_own_lease_is_free() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let now = Instant::now();
        let mut o = Observer::default();
        assert!(!o.is_free("b", now), "nothing observed yet");
        o.observe(&lease("", t, 15, "1"), S(15), now);
        assert!(o.is_free("b", now));
        o.observe(&lease("b", t, 15, "2"), S(15), now);
        assert!(o.is_free("b", now));
        assert!(!o.is_free("c", now));
    }

    /// A renewTime minutes in the past by this replica's clock (clock skew, or a holder
    /// that just renewed with a slow clock) does not make the lease free: only an
    /// unchanged record, watched for longer than the lease duration here, does.
    #[test]
    fn expiry_ignores_the_holders_clock() {
        let long_ago = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
        let t0 = Instant::now();
        let mut o = Observer::default();
        o.observe(&lease("a", long_ago, 15, "7"), S(15), t0);
        assert!(!o.is_free("b", t0));
        assert!(!o.is_free("b", t0 + S(15)));
        // Seen again unchanged: still timed from the first sight.
        o.observe(&lease("a", long_ago, 15, "7"), S(15), t0 + S(10));
        assert!(o.is_free("b", t0 + S(16)));
    }

    /// Any change of the holder's record restarts the wait, even one whose renewTime
    /// goes backwards.
    #[test]
    fn a_changed_record_restarts_the_wait() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t0 = Instant::now();
        let mut o = Observer::default();
        o.observe(&lease("a", t, 15, "7"), S(15), t0);
        o.observe(
            &lease("a", t - chrono::Duration::minutes(5), 15, "8"),
            S(15),
            t0 + S(14),
        );
        assert!(!o.is_free("b", t0 + S(16)));
        assert!(o.is_free("b", t0 + S(30)));
        // A new holder is a change too.
        o.observe(&lease("c", t, 15, "9"), S(15), t0 + S(30));
        assert!(!o.is_free("b", t0 + S(31)));
        assert_eq!(o.holder(), "c");
    }

    /// The wait uses the lease duration the holder wrote, else the local one.
    #[test]
    fn the_holders_duration_counts() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t0 = Instant::now();
        let mut o = Observer::default();
        o.observe(&lease("a", t, 60, "1"), S(15), t0);
        assert!(!o.is_free("b", t0 + S(30)));
        assert!(o.is_free("b", t0 + S(61)));
        let mut unstated = lease("a", t, 0, "2");
        unstated.spec.as_mut().unwrap().lease_duration_seconds = None;
        o.observe(&unstated, S(15), t0 + S(61));
        assert!(!o.is_free("b", t0 + S(70)));
        assert!(o.is_free("b", t0 + S(77)));
    }

    /// A write is permitted only when it ends (at its timeout) before the lease, counted
    /// from when the last successful renew was sent, could expire for others.
    #[test]
    fn writes_must_end_inside_the_lease() {
        let sent = Instant::now();
        let (lease, timeout) = (S(15), S(5));
        assert!(!write_permitted(None, lease, timeout, sent));
        assert!(write_permitted(Some(sent), lease, timeout, sent));
        assert!(write_permitted(Some(sent), lease, timeout, sent + S(9)));
        assert!(!write_permitted(Some(sent), lease, timeout, sent + S(10)));
        assert!(!write_permitted(Some(sent), lease, timeout, sent + S(60)));
        // A timeout as long as the lease never fits.
        assert!(!write_permitted(Some(sent), lease, lease, sent));
    }

    /// The fence is open without leader election, refuses before the first renewal and
    /// after leadership ends, and gives permitted writes the write timeout.
    #[test]
    fn fence_states() {
        let timing = LeaseTiming::new(S(15), S(10), S(2)).unwrap();
        let fence = Fence::open();
        let t0 = Instant::now();
        assert_eq!(fence.check(t0), FenceVerdict::Open);
        fence.arm(&timing);
        assert_eq!(fence.check(t0), FenceVerdict::Refused);
        fence.renewed(t0);
        assert_eq!(fence.check(t0 + S(1)), FenceVerdict::Within(S(5)));
        assert_eq!(fence.check(t0 + S(10)), FenceVerdict::Refused);
        // An older renewal reported late does not move the fence back.
        fence.renewed(t0 + S(8));
        fence.renewed(t0 + S(3));
        assert_eq!(fence.check(t0 + S(17)), FenceVerdict::Within(S(5)));
        assert_eq!(fence.check(t0 + S(18)), FenceVerdict::Refused);
        fence.close();
        fence.renewed(t0 + S(20));
        assert_eq!(fence.check(t0 + S(20)), FenceVerdict::Refused);
    }

    /// Timing must be retry < renew deadline < lease, and the Lease stores whole seconds
    /// rounded up.
    #[test]
    fn timing_rules() {
        assert!(LeaseTiming::new(S(15), S(10), S(2)).is_ok());
        assert_eq!(
            LeaseTiming::new(S(15), S(15), S(2)),
            Err(TimingError::RenewDeadlineNotShorter)
        );
        assert_eq!(
            LeaseTiming::new(S(15), S(10), S(10)),
            Err(TimingError::RetryPeriodNotShorter)
        );
        assert_eq!(
            LeaseTiming::new(S(15), S(10), Duration::ZERO),
            Err(TimingError::Zero)
        );
        assert_eq!(
            LeaseTiming::new(S(100_000), S(10), S(2)),
            Err(TimingError::TooLong)
        );
        let t = LeaseTiming::new(Duration::from_millis(2500), S(2), S(1)).unwrap();
        assert_eq!(t.lease_seconds(), 3);
        assert_eq!(t.write_timeout(), Duration::from_millis(500));
    }

    /// Through a fenced client, reads always go out; writes go out only while the fence
    /// permits them, and a refused write never reaches the server.
    #[tokio::test]
    async fn fenced_client_refuses_writes_outside_the_lease() {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request<HttpBody>| {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap()
                    .push(format!("{} {}", req.method(), req.uri().path()));
                let lease = serde_json::json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "1"}
                });
                axum::Json(lease)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let inner = kube::Client::try_from(config).unwrap();
        let fence = Arc::new(Fence::open());
        let leases: Api<Lease> = Api::namespaced(fenced_client(inner, fence.clone()), "ns");
        let l = Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                ..Default::default()
            },
            spec: None,
        };

        leases.create(&PostParams::default(), &l).await.unwrap();
        fence.arm(&LeaseTiming::new(S(15), S(10), S(2)).unwrap());
        leases.get("l").await.unwrap();
        let refused = leases.create(&PostParams::default(), &l).await.unwrap_err();
        assert!(
            matches!(&refused, kube::Error::Api(s) if s.code == 503 && s.message.contains("lease")),
            "{refused:?}"
        );
        fence.renewed(Instant::now());
        leases.create(&PostParams::default(), &l).await.unwrap();
        fence.close();
        assert!(leases.delete("l", &Default::default()).await.is_err());
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "POST /apis/coordination.k8s.io/v1/namespaces/ns/leases",
                "GET /apis/coordination.k8s.io/v1/namespaces/ns/leases/l",
                "POST /apis/coordination.k8s.io/v1/namespaces/ns/leases",
            ]
        );
        server.abort();
    }
}
