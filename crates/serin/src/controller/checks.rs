//! The metric checks and looks of every Canary run here, on one shared, bounded pool,
//! not inside the reconcile that found them due: a slow provider then holds a fetch slot,
//! never a reconcile slot, and the other Canaries' rollouts (and rollbacks) go on.
//!
//! A reconcile that finds a check or look due asks [`Checks::poll`]: the first time, the
//! fetch starts and the reconcile ends (nothing to decide yet); when the fetch is done, the
//! Canary is woken ([`Checks::wakes`], fed to the controller's `reconcile_on`), and the
//! next reconcile takes the result and decides. A result is used only for the check it was
//! fetched for: the key holds the Canary's generation, the due check and the evidence base,
//! so a spec change, a step or a rollback in between discards it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Semaphore, mpsc};

use super::MetricSource;
use crate::analysis::{LookBatch, MetricObservation};
use crate::api::{Canary, WebhookSpec};
use crate::metrics::CanaryContext;
use crate::rollout::HookAnswer;
use crate::router::{RouterError, Routers};
use crate::webhook::{Caller, Occasion};

/// Fetches running at once, by default.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// A fetch that has not finished after this long is started again (it may have been lost
/// to a panic); it is also how long a reconcile waits for a wake before it looks again.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// What a check or look was fetched for.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckKey {
    /// The Canary's generation.
    pub generation: Option<i64>,
    /// The due time of the check, when a check is due.
    pub check: Option<DateTime<Utc>>,
    /// Where the looks start (the evidence's `through`), when looks are due.
    pub looks_from: Option<DateTime<Utc>>,
    /// The webhooks to call (`rollout::hooks_due`), by name.
    pub hooks: Vec<String>,
    /// When the webhooks due outside checks became due (`rollout::next_hook_at`), if they
    /// are: a new round of calls has a new time.
    pub hooks_at: Option<DateTime<Utc>>,
}

/// What a fetch reads from: the routers and metric source (checks and looks) and the
/// webhook caller.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    /// The routers (a check reads the data plane's arms).
    pub routers: &'a Routers,
    /// The metric source.
    pub metrics: &'a Arc<dyn MetricSource>,
    /// The webhook caller.
    pub webhooks: &'a Arc<Caller>,
}

/// Which looks to fetch: the grid's step and the time the looks end.
#[derive(Clone, Copy, Debug)]
pub struct LookRange {
    /// The look interval.
    pub step: Duration,
    /// The last look ends at or before this.
    pub until: DateTime<Utc>,
}

/// What a fetch found.
pub struct Fetched {
    /// The check's metric results, when a check was due.
    pub metrics: Vec<MetricObservation>,
    /// The looks, when looks were due.
    pub looks: Option<LookBatch>,
    /// The webhooks' answers, when webhooks were due.
    pub hooks: Vec<HookAnswer>,
}

/// A poll's answer.
pub enum Poll {
    /// The fetch for this key is done: decide on it.
    Ready(Result<Fetched, RouterError>),
    /// The fetch is running; the Canary is woken when it is done.
    Fetching,
}

struct Entry {
    key: CheckKey,
    namespace: String,
    name: String,
    started: Instant,
    result: Option<Result<Fetched, RouterError>>,
}

/// The shared pool of fetches, by Canary uid.
pub struct Checks {
    limit: Arc<Semaphore>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    wake: mpsc::UnboundedSender<ObjectRef<DeserializeGuard<Canary>>>,
    wakes: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<DeserializeGuard<Canary>>>>>,
}

impl Checks {
    /// A pool running at most `concurrency` fetches at once.
    pub fn new(concurrency: usize) -> Self {
        let (wake, wakes) = mpsc::unbounded_channel();
        Checks {
            limit: Arc::new(Semaphore::new(concurrency.max(1))),
            entries: Arc::default(),
            wake,
            wakes: Mutex::new(Some(wakes)),
        }
    }

    /// The Canaries whose fetch finished, to reconcile; once (the controller takes it).
    pub fn wakes(
        &self,
    ) -> Option<impl futures::Stream<Item = ObjectRef<DeserializeGuard<Canary>>> + Send + 'static>
    {
        let rx = self.wakes.lock().ok()?.take()?;
        Some(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
    }

    /// The result of the fetch for `key`, or [`Poll::Fetching`] after starting it (unless it
    /// already runs); `range` says which looks to fetch from `key.looks_from`, `hooks` are
    /// the webhooks `key.hooks` names.
    pub fn poll(
        &self,
        canary: &Canary,
        key: CheckKey,
        range: LookRange,
        hooks: Vec<WebhookSpec>,
        sources: Sources<'_>,
        now: DateTime<Utc>,
    ) -> Poll {
        let Some(uid) = canary.metadata.uid.clone() else {
            return Poll::Fetching;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get_mut(&uid)
            && e.key == key
        {
            if e.result.is_some() {
                let result = entries.remove(&uid).and_then(|e| e.result);
                return Poll::Ready(result.unwrap_or(Ok(Fetched {
                    metrics: Vec::new(),
                    looks: None,
                    hooks: Vec::new(),
                })));
            }
            if e.started.elapsed() < FETCH_TIMEOUT {
                return Poll::Fetching;
            }
        }
        entries.insert(
            uid.clone(),
            Entry {
                key: key.clone(),
                namespace: canary.namespace().unwrap_or_default(),
                name: canary.name_any(),
                started: Instant::now(),
                result: None,
            },
        );
        drop(entries);
        let task = Fetch {
            canary: canary.clone(),
            key,
            range,
            uid,
            routers: sources.routers.clone(),
            source: sources.metrics.clone(),
            webhooks: sources.webhooks.clone(),
            hooks,
            now,
        };
        let (limit, entries, wake) = (self.limit.clone(), self.entries.clone(), self.wake.clone());
        tokio::spawn(async move {
            let Ok(_permit) = limit.acquire_owned().await else {
                return;
            };
            let me = ObjectRef::new(&task.canary.name_any())
                .within(&task.canary.namespace().unwrap_or_default());
            let (uid, key) = (task.uid.clone(), task.key.clone());
            let result = task.run().await;
            let mut entries = entries.lock().unwrap_or_else(|e| e.into_inner());
            // Only for the fetch still asked for: a newer key replaced this one meanwhile.
            if let Some(e) = entries.get_mut(&uid)
                && e.key == key
            {
                e.result = Some(result);
                drop(entries);
                let _ = wake.send(me);
            }
        });
        Poll::Fetching
    }

    /// Drops the fetches of Canaries not in `alive` (`(namespace, name)`).
    pub fn retain(&self, alive: &HashSet<(String, String)>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, e| alive.contains(&(e.namespace.clone(), e.name.clone())));
    }

    /// Fetches held (running or waiting to be taken).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// Whether no fetch is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One fetch: everything it needs, owned.
struct Fetch {
    canary: Canary,
    key: CheckKey,
    range: LookRange,
    uid: String,
    routers: Routers,
    source: Arc<dyn MetricSource>,
    webhooks: Arc<Caller>,
    hooks: Vec<WebhookSpec>,
    now: DateTime<Utc>,
}

impl Fetch {
    async fn run(self) -> Result<Fetched, RouterError> {
        // The webhooks are called while the metrics are read: a slow one delays the
        // decision by its own timeout, not by the metrics' time plus its own.
        let occasion = Occasion::default();
        let hooks = self
            .webhooks
            .call_all(&self.canary, &self.hooks, &occasion, self.now);
        let readings = async {
            if self.key.check.is_none() && self.key.looks_from.is_none() {
                return Ok((Vec::new(), None));
            }
            let router = self.routers.for_canary(&self.canary)?;
            // The router names the arms as its weights see them (Gloo reads its object).
            let context =
                CanaryContext::of(&self.canary, router.data_plane_arms(&self.canary).await?);
            let metrics = match self.key.check {
                Some(_) => self.source.evaluate(&context, self.now).await,
                None => Vec::new(),
            };
            let looks = match self.key.looks_from {
                Some(from) => Some(
                    self.source
                        .looks(&context, from, self.range.step, self.range.until)
                        .await,
                ),
                None => None,
            };
            Ok::<_, RouterError>((metrics, looks))
        };
        let (hooks, readings) = futures::join!(hooks, readings);
        let (metrics, looks) = readings?;
        Ok(Fetched {
            metrics,
            looks,
            hooks,
        })
    }
}
