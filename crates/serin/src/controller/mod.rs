//! The operator: one kube-runtime `Controller` for every Canary.
//!
//! Reconcile is four calls — observe → decide → act → record — each taking what the one
//! before returned:
//! 1. **observe** → `Observed`: the spec's validity (checked once), the router (resolved
//!    once), the target and primary Deployments with their revision and readiness, due
//!    metric results (only when a check is due, with series named from the router's arms),
//!    a pending command;
//! 2. **decide** → `Decision`: [`crate::rollout::decide`], pure;
//! 3. **act** → `Applied`: the routing objects prepared when the spec changed, then the
//!    decision's actions in order (weights first on rollback), through the router and the
//!    workload helpers, all idempotent, from what observe read (no second lookup);
//! 4. **record**: the new status through the status subresource, as a compare-and-swap on
//!    the Canary's resourceVersion, and only when it changed; then the decision's Events.
//!
//! If an action fails, the status is not written, so the next reconcile makes the same
//! decision again. Timed steps requeue at the time the next check is due; there is no task
//! or timer per Canary outside the controller's own queue.

pub mod checks;
pub mod cli;
pub mod compact;
pub mod deletion;
pub mod leader;
pub mod ratelimit;
pub mod shard;
pub mod sources;
pub mod telemetry;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::{Predicate as _, PredicateConfig, predicates};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument as _;

use crate::analysis::{LookBatch, MetricObservation};
use crate::api::{self, Canary, CanaryStatus, ConditionStatus, EvidenceStatus, Phase};
use crate::arms::{self, Weights};
use crate::metrics::CanaryContext;
use crate::policy::Policy;
use crate::rollout::{
    self, Action, Command, CommandKind, Decision, EventType, Input, Observations, WorkloadState,
};
use crate::router::{Router, RouterError, Routers, WriteOutcome};

use telemetry::Metrics;

/// Annotation through which operators send commands: `<promote|abort|retry>/<id>`.
pub const COMMAND_ANNOTATION: &str = "serin.dev/command";
/// Finalizer on every Canary Serin acts on: deleting one first makes the service whole
/// without Serin (see [`deletion`]).
pub const FINALIZER: &str = "serin.dev/restore-traffic";
/// How often an idle Canary is looked at without a watch event.
const RESYNC: Duration = Duration::from_secs(600);
/// Retry delay after a transient failure.
const RETRY: Duration = Duration::from_secs(5);
/// Retry delay while a user must fix something (missing target or routing object).
const USER_RETRY: Duration = Duration::from_secs(30);

/// Where metric results come from.
#[async_trait]
pub trait MetricSource: Send + Sync {
    /// Evaluates every metric of `canary` at `now`, naming series from the arms its router
    /// resolved. Failures are outcomes, not errors.
    async fn evaluate(&self, canary: &CanaryContext, now: DateTime<Utc>) -> Vec<MetricObservation>;

    /// The sequential judge's looks of `canary` from `from`, every `step`, up to `now`
    /// (see `metrics::Evaluator::looks`). Failures are outcomes, not errors.
    async fn looks(
        &self,
        canary: &CanaryContext,
        from: DateTime<Utc>,
        step: Duration,
        now: DateTime<Utc>,
    ) -> LookBatch;
}

/// `(namespace, "deployment/NAME" | "configmap/NAME" | "secret/NAME")` → the Canaries whose
/// rollout depends on that object.
type TargetIndex = HashMap<(String, String), HashSet<ObjectRef<DeserializeGuard<Canary>>>>;

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Who reports Events (`serin` and this replica).
    reporter: Reporter,
    /// The data planes.
    pub routers: Routers,
    /// The metric providers.
    pub metrics_source: Arc<dyn MetricSource>,
    /// The operator's own metrics.
    pub metrics: Arc<Metrics>,
    /// Target Deployments and the ConfigMaps and Secrets their pod templates read, so a
    /// change to one wakes the right Canaries (filled by reconcile; no per-Canary watch).
    targets: Mutex<TargetIndex>,
    /// Unparsable Canaries already reported (uid + resourceVersion).
    reported: Mutex<HashSet<String>>,
    /// The sequential judge's state of each Canary in a rollout (by uid), newer than its
    /// `status.evidence`, which is written only at checks; lost on restart, when the looks
    /// since `status.evidence` are fetched again from the provider's history.
    evidence: Mutex<HashMap<String, EvidenceStatus>>,
    /// What a Canary may make Serin do with its own identity (roles, endpoints, URLs).
    policy: Policy,
    /// The metric checks and looks in flight, off the reconcile slots.
    checks: checks::Checks,
    /// The controller's caches of the objects Canaries depend on, filled by its watches
    /// ([`run`]); a context used outside `run` reads from the API server instead.
    caches: OnceLock<Caches>,
    /// The digest of each config a target reads, by `(namespace, "configmap/NAME")`, with
    /// the resourceVersion it was read at: a config is read again only when it changed.
    digests: Mutex<HashMap<(String, String), (String, String)>>,
    /// The generation each Canary's routing objects were last prepared for in this
    /// process (by uid): while a Canary initializes, reconciles come often (its Deployments
    /// change) and its objects need creating or adopting only once per generation.
    prepared: Mutex<HashMap<String, i64>>,
    /// Where the rollout Events are also told (`--notifications`); never awaited.
    notifier: crate::notify::Notifier,
    /// Calls the Canaries' webhooks (with the policy's allow-list).
    webhooks: Arc<crate::webhook::Caller>,
}

/// Reflector stores of the dependencies: full Deployments (readiness is in their status),
/// ConfigMaps and Secrets as metadata only (their data is read, once per version, only
/// for the configs a target references), and the targets' HorizontalPodAutoscalers and
/// their primary copies. None holds managedFields or the last-applied annotation.
struct Caches {
    deployments: Store<compact::CompactDeployment>,
    autoscalers: Store<HorizontalPodAutoscaler>,
    configmaps: Store<PartialObjectMeta<ConfigMap>>,
    secrets: Store<PartialObjectMeta<Secret>>,
}

/// Keeps the caches to what Canaries depend on, so that the cluster's other objects cost
/// no memory: an object no Canary depends on (not owned by one, not in the dependency
/// index) is left out of the initial list, and any later event of it removes it from the
/// cache (as a delete), so that nothing cached is ever stale. An object a Canary comes to
/// depend on is cached from its next change; until then reads of it go to the API server
/// (a cache miss is always confirmed with a GET).
fn only_dependencies<K: Resource>(
    ctx: &Context,
    kind: &str,
    event: watcher::Event<K>,
) -> Option<watcher::Event<K>> {
    let wanted = |o: &K| {
        o.meta()
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.kind == "Canary" && r.api_version.starts_with(api::GROUP))
            || !dependents(ctx, kind, o).is_empty()
    };
    match event {
        watcher::Event::InitApply(o) if !wanted(&o) => None,
        watcher::Event::Apply(o) if !wanted(&o) => Some(watcher::Event::Delete(o)),
        other => Some(other),
    }
}

/// What a cache does not need of an object: managedFields and kubectl's copy of the
/// object in an annotation are often most of its size.
fn strip<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The webhook caller of a context: Secrets through `client`, calls counted in `metrics`.
fn webhook_caller(
    client: &kube::Client,
    metrics: &Arc<Metrics>,
    policy: Policy,
) -> crate::webhook::Caller {
    let metrics = metrics.clone();
    crate::webhook::Caller::new(
        Arc::new(sources::KubeSecrets::new(client.clone())),
        policy,
        Arc::new(move |kind, outcome| metrics.webhook_called(kind, outcome)),
    )
}

impl Context {
    /// A context for the controller.
    pub fn new(
        client: kube::Client,
        routers: Routers,
        metrics_source: Arc<dyn MetricSource>,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: api::MANAGER.into(),
            instance,
        };
        Context {
            webhooks: Arc::new(webhook_caller(&client, &metrics, Policy::default())),
            client,
            reporter,
            routers,
            metrics_source,
            metrics,
            targets: Mutex::default(),
            reported: Mutex::default(),
            evidence: Mutex::default(),
            policy: Policy::default(),
            checks: checks::Checks::new(checks::DEFAULT_CONCURRENCY),
            caches: OnceLock::new(),
            digests: Mutex::default(),
            prepared: Mutex::default(),
            notifier: crate::notify::Notifier::none(),
        }
    }

    /// The same context telling `notifier` about every rollout Event it records.
    pub fn with_notifier(mut self, notifier: crate::notify::Notifier) -> Self {
        self.notifier = notifier;
        self
    }

    /// The sequential judge's state kept for `canary` since its last status write.
    fn remembered_evidence(&self, canary: &Canary) -> Option<EvidenceStatus> {
        let uid = canary.metadata.uid.as_deref()?;
        self.evidence.lock().ok()?.get(uid).cloned()
    }

    /// Keeps (or, outside a rollout, forgets) the sequential judge's state of `canary`.
    fn remember_evidence(&self, canary: &Canary, evidence: Option<EvidenceStatus>) {
        let (Some(uid), Ok(mut map)) = (canary.metadata.uid.clone(), self.evidence.lock()) else {
            return;
        };
        match evidence {
            Some(e) => {
                map.insert(uid, e);
            }
            None => {
                map.remove(&uid);
            }
        }
    }

    /// The same context running at most `concurrency` metric fetches at once.
    pub fn with_check_concurrency(mut self, concurrency: usize) -> Self {
        self.checks = checks::Checks::new(concurrency);
        self
    }

    /// The same context with the operator's allow-lists (the default allows no role ARN
    /// and no AWS endpoint override, and every address).
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.webhooks = Arc::new(webhook_caller(&self.client, &self.metrics, policy.clone()));
        self.policy = policy;
        self
    }

    /// Whether `canary`'s routing objects were prepared for its current generation by
    /// this process.
    fn prepared_for(&self, canary: &Canary) -> bool {
        let (Some(uid), Some(generation)) = (&canary.metadata.uid, canary.metadata.generation)
        else {
            return false;
        };
        self.prepared
            .lock()
            .is_ok_and(|p| p.get(uid) == Some(&generation))
    }

    fn mark_prepared(&self, canary: &Canary) {
        if let (Some(uid), Some(generation), Ok(mut p)) = (
            &canary.metadata.uid,
            canary.metadata.generation,
            self.prepared.lock(),
        ) {
            p.insert(uid.clone(), generation);
        }
    }

    /// What is wrong with `canary`'s spec, or refused by the operator's policy; empty
    /// when Serin may act on it.
    fn problems(&self, canary: &Canary) -> Vec<api::Problem> {
        let mut problems = api::validate(&canary.spec);
        problems.extend(self.policy.check(&canary.spec));
        problems
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{operation} {kind} {name}: {source}{}", forbidden_hint(.source))]
    Kube {
        /// What was being done.
        operation: &'static str,
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The target Deployment does not exist.
    #[error("target Deployment {0} not found: create it, or fix spec.targetRef.name")]
    TargetNotFound(String),
    /// The autoscaler `spec.autoscalerRef` names does not exist.
    #[error(
        "HorizontalPodAutoscaler {0} (spec.autoscalerRef) not found: create it, or remove spec.autoscalerRef"
    )]
    AutoscalerNotFound(String),
    /// The autoscaler `spec.autoscalerRef` names scales another workload.
    #[error(
        "HorizontalPodAutoscaler {0} (spec.autoscalerRef): point its scaleTargetRef at the target, or name the target's autoscaler in spec.autoscalerRef"
    )]
    AutoscalerMismatch(String),
    /// The target changed between deciding and promoting.
    #[error("target {0} changed while promoting; deciding again")]
    TargetChanged(String),
    /// A router operation failed.
    #[error(transparent)]
    Router(#[from] RouterError),
    /// Another writer changed the Canary first.
    #[error("status of {0} was written by someone else first; deciding again")]
    StatusConflict(String),
    /// An object could not be serialized.
    #[error("serialize: {0}")]
    Serialize(String),
    /// The reconcile panicked: a bug in Serin, contained to this Canary.
    #[error(
        "Serin hit an internal error on this Canary ({0}); other Canaries are unaffected. Please report it with the Canary's spec"
    )]
    Panicked(String),
}

/// What to do about a 403: Serin's RBAC lacks what it just needed.
fn forbidden_hint(e: &kube::Error) -> &'static str {
    if is_forbidden(e) {
        "; Serin's ServiceAccount lacks this permission: install the chart's RBAC for this \
         operator version (helm upgrade), or grant the verb on this resource"
    } else {
        ""
    }
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

impl Error {
    /// A short constant category: metric label and Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } if is_forbidden(source) => "Forbidden",
            Error::Kube { .. } => "KubernetesApiError",
            Error::TargetNotFound(_) => "TargetNotFound",
            Error::AutoscalerNotFound(_) => "AutoscalerNotFound",
            Error::AutoscalerMismatch(_) => "AutoscalerMismatch",
            Error::TargetChanged(_) => "TargetChanged",
            Error::Router(e) => e.category(),
            Error::StatusConflict(_) => "StatusConflict",
            Error::Serialize(_) => "Serialize",
            Error::Panicked(_) => "ReconcilePanicked",
        }
    }

    fn needs_user(&self) -> bool {
        match self {
            // Retried at the slower pace, and shown on the Canary as Ready=False.
            Error::TargetNotFound(_)
            | Error::AutoscalerNotFound(_)
            | Error::AutoscalerMismatch(_)
            | Error::Panicked(_) => true,
            // Missing RBAC does not heal by retrying: say so on the Canary.
            Error::Kube { source, .. } => is_forbidden(source),
            Error::Router(e) => e.needs_user(),
            _ => false,
        }
    }
}

/// Options of the controller loop.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Watch one namespace only.
    pub namespace: Option<String>,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// The shard this replica leads: it watches and acts on that shard's Canaries only.
    pub shard: shard::Shard,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    options: ControllerOptions,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // Deployments are cached compact: typed metadata, the spec and status as JSON.
    let (canaries, deployments): (
        Api<DeserializeGuard<Canary>>,
        Api<compact::CompactDeployment>,
    ) = match &options.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let services: Api<Service> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let autoscalers: Api<HorizontalPodAutoscaler> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Metadata only: `Api<PartialObjectMeta<_>>` lists and watches without the data.
    type Meta<K> = PartialObjectMeta<K>;
    let (configmaps, secrets): (Api<Meta<ConfigMap>>, Api<Meta<Secret>>) = match &options.namespace
    {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let mapper_ctx = ctx.clone();
    let cm_ctx = ctx.clone();
    let secret_ctx = ctx.clone();
    let config = || watcher::Config::default().any_semantic();
    // Canaries: Serin's own status writes change neither generation, labels, annotations
    // (commands) nor finalizers, so they wake no reconcile; a deletion bumps the generation.
    // A shard watches only its own buckets' Canaries (a label selector, filtered by the
    // API server); shard 0 also labels the Canaries no shard owns.
    let canary_config = match options.shard.selector() {
        Some(selector) => config().labels(&selector),
        None => config(),
    };
    let labeller = options.shard.labels_unassigned().then(|| {
        tokio::spawn(shard::label_unassigned(
            ctx.clone(),
            options.namespace.clone(),
        ))
    });
    let (canary_store, canary_writer) = reflector::store();
    // Cached without managedFields (a third of a Canary's size) and kubectl's copy of it:
    // status is written with a PUT to the status subresource, which takes only the status.
    let canary_trigger = watcher(canaries, canary_config)
        .default_backoff()
        .modify(|c: &mut DeserializeGuard<Canary>| {
            if let Ok(c) = &mut c.0 {
                strip(c);
            }
        })
        .reflect(canary_writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::labels)
                .combine(predicates::annotations)
                .combine(predicates::finalizers),
            PredicateConfig::default(),
        );
    let (deployment_store, deployment_writer) = reflector::store();
    let (d_ctx, c_ctx, s_ctx) = (ctx.clone(), ctx.clone(), ctx.clone());
    let deployment_trigger = watcher(deployments, config())
        .default_backoff()
        .try_filter_map(move |e| std::future::ready(Ok(only_dependencies(&d_ctx, "deployment", e))))
        .reflect(deployment_writer)
        .touched_objects();
    let (autoscaler_store, autoscaler_writer) = reflector::store();
    let (a_ctx, autoscaler_ctx) = (ctx.clone(), ctx.clone());
    let autoscaler_trigger = watcher(autoscalers, config())
        .default_backoff()
        .try_filter_map(move |e| std::future::ready(Ok(only_dependencies(&a_ctx, AUTOSCALER, e))))
        .modify(strip)
        .reflect(autoscaler_writer)
        .touched_objects();
    let (configmap_store, configmap_writer) = reflector::store();
    let configmap_trigger = watcher(configmaps, config())
        .default_backoff()
        .try_filter_map(move |e| std::future::ready(Ok(only_dependencies(&c_ctx, "configmap", e))))
        .modify(strip)
        .reflect(configmap_writer)
        .touched_objects();
    // An operator that may not read Secrets (`--no-read-secrets`) does not watch them: its
    // Secret store stays empty, and no revision depends on a Secret.
    let (secret_store, secret_writer) = reflector::store();
    let secret_trigger = ctx.policy.read_secrets.then(|| {
        watcher(secrets, config())
            .default_backoff()
            .try_filter_map(move |e| std::future::ready(Ok(only_dependencies(&s_ctx, "secret", e))))
            .modify(strip)
            .reflect(secret_writer)
            .touched_objects()
    });
    let _ = ctx.caches.set(Caches {
        deployments: deployment_store,
        autoscalers: autoscaler_store,
        configmaps: configmap_store,
        secrets: secret_store,
    });
    let mut controller = Controller::for_stream(canary_trigger, canary_store);
    if let Some(wakes) = ctx.checks.wakes() {
        controller = controller.reconcile_on(wakes);
    }
    let store = controller.store();
    let pruning = tokio::spawn(prune_deleted(ctx.clone(), store));
    let mut controller = controller
        .with_config(kube::runtime::controller::Config::default().concurrency(options.concurrency))
        .owns(services, config())
        .watches_stream(deployment_trigger, move |d: compact::CompactDeployment| {
            owner_or_dependents(&mapper_ctx, "deployment", &d)
        })
        .watches_stream(autoscaler_trigger, move |h: HorizontalPodAutoscaler| {
            owner_or_dependents(&autoscaler_ctx, AUTOSCALER, &h)
        })
        .watches_stream(configmap_trigger, move |c: PartialObjectMeta<ConfigMap>| {
            dependents(&cm_ctx, "configmap", &c)
        });
    if let Some(secret_trigger) = secret_trigger {
        controller = controller
            .watches_stream(secret_trigger, move |s: PartialObjectMeta<Secret>| {
                dependents(&secret_ctx, "secret", &s)
            });
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
    pruning.abort();
    if let Some(labeller) = labeller {
        labeller.abort();
    }
}

/// How often state about deleted Canaries is dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A deleted Canary without a finalizer is never reconciled again: one shared task
/// periodically drops its metric series and its entries in the dependency index, using the
/// controller's own cache of Canaries.
async fn prune_deleted(
    ctx: Arc<Context>,
    store: kube::runtime::reflector::Store<DeserializeGuard<Canary>>,
) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if store.wait_until_ready().await.is_err() {
            return;
        }
        let alive: HashSet<(String, String)> = store
            .state()
            .iter()
            .filter_map(|c| Some((c.meta().namespace.clone()?, c.meta().name.clone()?)))
            .collect();
        ctx.metrics.retain(&alive);
        ctx.checks.retain(&alive);
        let uids: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|c| c.meta().uid.clone())
            .collect();
        if let Ok(mut reported) = ctx.reported.lock() {
            // Keys are `uid/resourceVersion`.
            reported.retain(|k| k.split('/').next().is_some_and(|uid| uids.contains(uid)));
        }
        if let Ok(mut evidence) = ctx.evidence.lock() {
            evidence.retain(|uid, _| uids.contains(uid));
        }
        if let Ok(mut prepared) = ctx.prepared.lock() {
            prepared.retain(|uid, _| uids.contains(uid));
        }
        if let Ok(mut targets) = ctx.targets.lock() {
            for refs in targets.values_mut() {
                refs.retain(|r| {
                    alive.contains(&(r.namespace.clone().unwrap_or_default(), r.name.clone()))
                });
            }
            targets.retain(|_, refs| !refs.is_empty());
            if let Ok(mut digests) = ctx.digests.lock() {
                digests.retain(|key, _| targets.contains_key(key));
            }
        }
    }
}

/// Maps an event of a Deployment or autoscaler to the Canary that owns it (the primary's)
/// or depends on it (the target's).
fn owner_or_dependents<K: Resource>(
    ctx: &Context,
    kind: &str,
    obj: &K,
) -> Vec<ObjectRef<DeserializeGuard<Canary>>> {
    let Some(ns) = obj.meta().namespace.clone() else {
        return Vec::new();
    };
    if let Some(owner) = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Canary" && o.api_version.starts_with(api::GROUP))
    {
        return vec![ObjectRef::new(&owner.name).within(&ns)];
    }
    dependents(ctx, kind, obj)
}

/// The dependency-index kind of HorizontalPodAutoscalers.
const AUTOSCALER: &str = "horizontalpodautoscaler";

/// The Canaries whose rollout depends on object `kind/name` (see [`TargetIndex`]).
fn dependents<K: Resource>(
    ctx: &Context,
    kind: &str,
    obj: &K,
) -> Vec<ObjectRef<DeserializeGuard<Canary>>> {
    let Some(ns) = obj.meta().namespace.clone() else {
        return Vec::new();
    };
    let key = (
        ns,
        format!("{kind}/{}", obj.meta().name.clone().unwrap_or_default()),
    );
    ctx.targets
        .lock()
        .ok()
        .and_then(|t| t.get(&key).map(|s| s.iter().cloned().collect()))
        .unwrap_or_default()
}

/// Records that `canary` depends on `keys` (`kind/name` in its namespace).
fn index_dependencies(ctx: &Context, canary: &Canary, keys: impl IntoIterator<Item = String>) {
    let ns = canary.namespace().unwrap_or_default();
    let me = ObjectRef::new(&canary.name_any()).within(&ns);
    if let Ok(mut targets) = ctx.targets.lock() {
        for key in keys {
            targets
                .entry((ns.clone(), key))
                .or_default()
                .insert(me.clone());
        }
    }
}

fn error_policy(obj: Arc<DeserializeGuard<Canary>>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.reconcile_failed(error.category());
    let name = match &obj.0 {
        Ok(c) => format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()),
        Err(_) => "?".into(),
    };
    if error.needs_user() {
        tracing::info!(canary = %name, error = %error, "waiting for the user");
        Requeue::requeue(USER_RETRY)
    } else {
        tracing::warn!(canary = %name, error = %error, "reconcile failed; retrying");
        Requeue::requeue(RETRY)
    }
}

async fn reconcile(
    obj: Arc<DeserializeGuard<Canary>>,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    let canary = match &obj.0 {
        Ok(c) => c,
        Err(invalid) => {
            report_unparsable(&ctx, invalid).await;
            return Ok(Requeue::await_change());
        }
    };
    let started = Instant::now();
    let span = tracing::info_span!(
        "reconcile",
        namespace = %canary.namespace().unwrap_or_default(),
        name = %canary.name_any()
    );
    let result = contain_panic(reconcile_canary(canary, &ctx).instrument(span)).await;
    ctx.metrics.reconcile_took(started.elapsed().as_secs_f64());
    if let Err(e) = &result
        && e.needs_user()
    {
        report_blocked(canary, &ctx, e).await;
    }
    result
}

/// Runs one reconcile so that a panic in it (a bug, or input nothing anticipated) fails
/// only this Canary's reconcile, as an error, instead of unwinding into kube-runtime and
/// taking every other Canary down with the process. Needs `panic = "unwind"` (the default;
/// the release profile must keep it).
async fn contain_panic(
    reconcile: impl Future<Output = Result<Requeue, Error>>,
) -> Result<Requeue, Error> {
    use futures::FutureExt as _;
    match std::panic::AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string());
            Err(Error::Panicked(message))
        }
    }
}

/// An object the watch could not parse as a Canary: one Warning Event per version.
async fn report_unparsable(ctx: &Context, invalid: &kube::core::error_boundary::InvalidObject) {
    let key = format!(
        "{}/{}",
        invalid.metadata.uid.clone().unwrap_or_default(),
        invalid
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default()
    );
    let first = ctx
        .reported
        .lock()
        .map(|mut r| r.insert(key))
        .unwrap_or(false);
    if !first {
        return;
    }
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(format!("{}/{}", api::GROUP, api::VERSION)),
        kind: Some("Canary".into()),
        name: invalid.metadata.name.clone(),
        namespace: invalid.metadata.namespace.clone(),
        uid: invalid.metadata.uid.clone(),
        ..Default::default()
    };
    let message = format!(
        "cannot be read: {}; check it with `serin validate`",
        invalid.error
    );
    ctx.notifier.send(crate::notify::Notice {
        reason: rollout::reasons::INVALID,
        warning: true,
        namespace: invalid.metadata.namespace.clone().unwrap_or_default(),
        name: invalid.metadata.name.clone().unwrap_or_default(),
        message: message.clone(),
        phase: "Invalid",
        canary_weight: 0,
        revision: None,
        time: Utc::now(),
    });
    publish(
        ctx,
        &reference,
        EventType::Warning,
        rollout::reasons::INVALID,
        message,
    )
    .await;
}

/// One Canary's reconcile: observe → decide → act → record, each step taking what the one
/// before returned.
async fn reconcile_canary(canary: &Canary, ctx: &Context) -> Result<Requeue, Error> {
    if canary.metadata.deletion_timestamp.is_some() {
        // No rollout survives the deletion: its judge's state goes with it.
        ctx.remember_evidence(canary, None);
        return deletion::finalize(canary, ctx).await;
    }
    let now = Utc::now();
    let Some(observed) = observe(canary, ctx, now).await? else {
        // Woken when the fetch is done; this requeue only covers a lost wake.
        return Ok(Requeue::requeue(checks::FETCH_TIMEOUT));
    };
    let decision = decide(&observed, now);
    let applied = act(&observed, ctx, decision).await?;
    let requeue = record(&observed, ctx, applied).await?;
    sync_autoscaler(&observed, ctx).await?;
    Ok(requeue)
}

/// Everything one reconcile saw of a Canary: what [`decide`] and [`act`] work from.
struct Observed<'a> {
    canary: &'a Canary,
    /// The status as read.
    status: CanaryStatus,
    /// What is wrong with the spec (empty when valid); an invalid Canary is not acted on.
    problems: Vec<api::Problem>,
    /// The Canary's router; `None` when the spec is invalid.
    router: Option<&'a dyn Router>,
    /// The target and `<target>-primary` Deployments (workload mode).
    workloads: Workloads,
    /// Whether the routing objects must be created or adopted first (a new spec, or the
    /// first sight of the Canary).
    needs_prepare: bool,
    /// What `rollout::decide` consumes.
    observations: Observations,
}

/// The Deployments of a Canary in workload mode, as read in this reconcile.
#[derive(Default)]
struct Workloads {
    target: Option<Deployment>,
    primary: Option<Deployment>,
    /// The target's autoscaler (`spec.autoscalerRef`) and Serin's copy of it for the
    /// primary, when the Canary names one.
    autoscaler: Option<HorizontalPodAutoscaler>,
    primary_autoscaler: Option<HorizontalPodAutoscaler>,
}

/// Reads what the decision depends on: validity, the router, due metric results, the
/// workloads and a pending command; `None` while a due check is being fetched.
#[tracing::instrument(skip_all)]
async fn observe<'a>(
    canary: &'a Canary,
    ctx: &'a Context,
    now: DateTime<Utc>,
) -> Result<Option<Observed<'a>>, Error> {
    let status = canary.status.clone().unwrap_or_default();
    let problems = ctx.problems(canary);
    let mut observed = Observed {
        canary,
        needs_prepare: (status.observed_generation != canary.metadata.generation
            || status.phase == Phase::Initializing)
            && !ctx.prepared_for(canary),
        status,
        problems,
        router: None,
        workloads: Workloads::default(),
        observations: Observations::default(),
    };
    if !observed.problems.is_empty() {
        return Ok(Some(observed));
    }
    observed.router = Some(ctx.routers.for_canary(canary)?);
    // A due check or look is fetched off the reconcile slots first: until it is done there
    // is nothing to decide, and nothing else is read.
    let memory = ctx.remembered_evidence(canary);
    let check_due =
        rollout::next_check_at(&canary.spec, &observed.status).filter(|due| *due <= now);
    let look_due = rollout::next_look_at(&canary.spec, &observed.status, memory.as_ref(), now)
        .is_some_and(|due| due <= now);
    // Webhooks ride along: those of a due check, and gates or deliveries due by now.
    let hooks: Vec<api::WebhookSpec> =
        rollout::hooks_due(&canary.spec, &observed.status, check_due.is_some(), now)
            .into_iter()
            .cloned()
            .collect();
    if check_due.is_some() || look_due || !hooks.is_empty() {
        let key = checks::CheckKey {
            generation: canary.metadata.generation,
            check: check_due,
            // (as before webhooks: with a check or a look; a webhook alone fetches none)
            looks_from: (check_due.is_some() || look_due)
                .then(|| rollout::evidence_base(&observed.status, memory.as_ref()))
                .flatten()
                .map(|b| b.through),
            hooks: hooks.iter().map(|h| h.name.clone()).collect(),
            hooks_at: rollout::next_hook_at(&canary.spec, &observed.status).filter(|at| *at <= now),
        };
        // A period CloudWatch may still be filling is not read yet.
        let range = checks::LookRange {
            step: canary.spec.analysis.look_interval(),
            until: now
                - chrono::Duration::from_std(canary.spec.analysis.look_delay()).unwrap_or_default(),
        };
        let sources = checks::Sources {
            routers: &ctx.routers,
            metrics: &ctx.metrics_source,
            webhooks: &ctx.webhooks,
        };
        match ctx.checks.poll(canary, key, range, hooks, sources, now) {
            checks::Poll::Fetching => return Ok(None),
            checks::Poll::Ready(fetched) => {
                let fetched = fetched?;
                observed.observations.metrics = fetched.metrics;
                observed.observations.looks = fetched.looks;
                observed.observations.hooks = fetched.hooks;
            }
        }
    }
    if canary.spec.is_traffic_mode() {
        observed.observations.canary = WorkloadState {
            revision: canary.spec.backends.as_ref().map(|b| b.canary.clone()),
            ready: true,
        };
    } else {
        let (workloads, canary_state, primary_state) = observe_workloads(canary, ctx).await?;
        observed.workloads = workloads;
        observed.observations.canary = canary_state;
        observed.observations.primary = primary_state;
    }
    if matches!(
        observed.status.phase,
        Phase::Progressing | Phase::Paused | Phase::Promoting
    ) {
        // During a rollout the data plane is the truth: a weight write whose status write
        // was lost is seen here, not taken from status (see rollout::believed_canary_weight).
        let router = observed.router.unwrap_or(ctx.routers.for_canary(canary)?);
        observed.observations.weights = Some(router.weights(canary).await?);
    }
    observed.observations.evidence = memory;
    observed.observations.command = command(canary);
    Ok(Some(observed))
}

/// Reads the target (the canary workload) and the primary, and remembers the target so its
/// events reach this Canary.
async fn observe_workloads(
    canary: &Canary,
    ctx: &Context,
) -> Result<(Workloads, WorkloadState, WorkloadState), Error> {
    let ns = canary.namespace().unwrap_or_default();
    let Some(target_ref) = &canary.spec.target_ref else {
        return Ok(Default::default());
    };
    index_dependencies(ctx, canary, [format!("deployment/{}", target_ref.name)]);
    let Some(target) = read_deployment(ctx, &ns, &target_ref.name).await? else {
        return Err(Error::TargetNotFound(format!("{ns}/{}", target_ref.name)));
    };
    let canary_state = WorkloadState {
        revision: Some(target_revision(ctx, canary, &target).await?),
        ready: workload::is_ready(&target),
    };
    let primary = read_deployment(ctx, &ns, &arms::primary_name(&target_ref.name)).await?;
    let primary_state = workload::primary_state(primary.as_ref());
    let (mut autoscaler, mut primary_autoscaler) = (None, None);
    if let Some(a) = &canary.spec.autoscaler_ref {
        index_dependencies(ctx, canary, [format!("{AUTOSCALER}/{}", a.name)]);
        let Some(hpa) = read_autoscaler(ctx, &ns, &a.name).await? else {
            return Err(Error::AutoscalerNotFound(format!("{ns}/{}", a.name)));
        };
        if let Some(why) = workload::autoscaler_mismatch(&hpa, &target_ref.name) {
            return Err(Error::AutoscalerMismatch(format!("{ns}/{} {why}", a.name)));
        }
        primary_autoscaler =
            read_autoscaler(ctx, &ns, &workload::primary_autoscaler_name(&a.name)).await?;
        autoscaler = Some(hpa);
    }
    let workloads = Workloads {
        target: Some(target),
        primary,
        autoscaler,
        primary_autoscaler,
    };
    Ok((workloads, canary_state, primary_state))
}

/// `ns/name` from `store`, once the store has listed everything (never waiting: a cache
/// that cannot fill, say for lack of RBAC, leaves reads to the API server).
fn cached<K>(store: &Store<K>, ns: &str, name: &str) -> Option<Arc<K>>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    use futures::FutureExt as _;
    let ready = store.wait_until_ready().now_or_never()?.is_ok();
    ready.then(|| store.get(&ObjectRef::new(name).within(ns)))?
}

/// Deployment `ns/name` from the cache; a miss (an object created a moment ago may not be
/// there yet) is confirmed with the API server before Serin acts on an absence.
async fn read_deployment(ctx: &Context, ns: &str, name: &str) -> Result<Option<Deployment>, Error> {
    if let Some(caches) = ctx.caches.get()
        && let Some(d) = cached(&caches.deployments, ns, name)
    {
        match d.to_deployment() {
            Ok(d) => return Ok(Some(d)),
            Err(e) => {
                tracing::warn!(namespace = ns, deployment = name, error = %e, "cached Deployment unreadable; reading it from the API server")
            }
        }
    }
    get_deployment(&Api::namespaced(ctx.client.clone(), ns), name).await
}

async fn read_autoscaler(
    ctx: &Context,
    ns: &str,
    name: &str,
) -> Result<Option<HorizontalPodAutoscaler>, Error> {
    if let Some(caches) = ctx.caches.get()
        && let Some(h) = cached(&caches.autoscalers, ns, name)
    {
        return Ok(Some((*h).clone()));
    }
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name).await.map_err(|source| Error::Kube {
        operation: "get",
        kind: "HorizontalPodAutoscaler",
        name: name.to_string(),
        source,
    })
}

/// Keeps `<autoscaler>-primary` the target's autoscaler scaling `<target>-primary`, once
/// the primary exists. Runs after the decision is carried out and recorded, so an
/// autoscaler write never holds back a rollback.
async fn sync_autoscaler(observed: &Observed<'_>, ctx: &Context) -> Result<(), Error> {
    let canary = observed.canary;
    let (Some(hpa), Some(target_ref)) = (&observed.workloads.autoscaler, &canary.spec.target_ref)
    else {
        return Ok(());
    };
    // A primary created by this reconcile wakes the next one (its watch event), which
    // writes the copy.
    if observed.workloads.primary.is_none() {
        return Ok(());
    }
    let desired = workload::build_primary_autoscaler(canary, hpa, &target_ref.name);
    if workload::autoscaler_in_step(observed.workloads.primary_autoscaler.as_ref(), &desired) {
        return Ok(());
    }
    let api: Api<HorizontalPodAutoscaler> =
        Api::namespaced(ctx.client.clone(), &canary.namespace().unwrap_or_default());
    workload::apply(&api, &desired, "HorizontalPodAutoscaler").await?;
    tracing::info!(
        autoscaler = desired.metadata.name.as_deref().unwrap_or_default(),
        "primary autoscaler written"
    );
    Ok(())
}

async fn get_deployment(api: &Api<Deployment>, name: &str) -> Result<Option<Deployment>, Error> {
    api.get_opt(name).await.map_err(|source| Error::Kube {
        operation: "get",
        kind: "Deployment",
        name: name.to_string(),
        source,
    })
}

/// The target's revision: its pod template and the data of the configs it reads (which
/// are indexed so their changes wake this Canary).
async fn target_revision(
    ctx: &Context,
    canary: &Canary,
    target: &Deployment,
) -> Result<String, Error> {
    let ns = canary.namespace().unwrap_or_default();
    let template = target.spec.template.clone();
    // Without Secret access the Secrets a template reads are not part of its revision.
    let refs: BTreeSet<String> = workload::referenced_configs(&template)
        .into_iter()
        .filter(|r| ctx.policy.read_secrets || !r.starts_with("secret/"))
        .collect();
    index_dependencies(ctx, canary, refs.iter().cloned());
    let digests = config_digests(ctx, &ns, &refs).await?;
    Ok(workload::revision(&template, &digests))
}

/// The digests of the configs `refs` (`configmap/NAME`, `secret/NAME`) in `ns`: a config
/// whose resourceVersion in the metadata cache is the one its digest was read at is not
/// read again; any other (changed, new, or not in the cache) is read from the API server.
async fn config_digests(
    ctx: &Context,
    ns: &str,
    refs: &BTreeSet<String>,
) -> Result<BTreeMap<String, String>, Error> {
    let Some(caches) = ctx.caches.get() else {
        return workload::config_digests(&ctx.client, ns, refs).await;
    };
    let mut out = BTreeMap::new();
    for r in refs {
        let (kind, name) = r.split_once('/').unwrap_or(("configmap", r));
        let version = if kind == "secret" {
            cached(&caches.secrets, ns, name).and_then(|m| m.metadata.resource_version.clone())
        } else {
            cached(&caches.configmaps, ns, name).and_then(|m| m.metadata.resource_version.clone())
        };
        let key = (ns.to_string(), r.clone());
        let known = version.as_ref().and_then(|v| {
            let digests = ctx.digests.lock().ok()?;
            digests
                .get(&key)
                .filter(|(at, _)| at == v)
                .map(|(_, d)| d.clone())
        });
        let digest = match known {
            Some(d) => d,
            None => {
                let one = BTreeSet::from([r.clone()]);
                let read = workload::config_digests(&ctx.client, ns, &one).await?;
                let d = read.get(r).cloned().unwrap_or_else(|| "absent".into());
                if let (Some(v), Ok(mut digests)) = (version, ctx.digests.lock()) {
                    digests.insert(key, (v, d.clone()));
                }
                d
            }
        };
        out.insert(r.clone(), digest);
    }
    Ok(out)
}

/// Parses the command annotation (`<kind>/<id>`; a bare kind uses the annotation value as id).
fn command(canary: &Canary) -> Option<Command> {
    let raw = canary.annotations().get(COMMAND_ANNOTATION)?;
    let (kind, id) = raw.split_once('/').unwrap_or((raw.as_str(), raw.as_str()));
    Some(Command {
        kind: CommandKind::parse(kind.trim())?,
        id: id.trim().to_string(),
    })
}

/// The pure decision on what was observed.
fn decide(observed: &Observed<'_>, now: DateTime<Utc>) -> Decision {
    rollout::decide(Input {
        spec: &observed.canary.spec,
        generation: observed.canary.metadata.generation,
        status: &observed.status,
        problems: &observed.problems,
        observations: &observed.observations,
        now,
    })
}

/// A decision whose actions all succeeded: only [`act`] makes one, so [`record`] writes
/// what was done, never what was merely planned.
struct Applied(Decision);

/// Prepares the routing objects when needed, then carries out the decision's actions in
/// order. Weights move from what the data plane holds (read in observe during a rollout),
/// else from what status says was written.
#[tracing::instrument(skip_all)]
async fn act(observed: &Observed<'_>, ctx: &Context, decision: Decision) -> Result<Applied, Error> {
    let Some(router) = observed.router else {
        // An invalid Canary is never acted on; its decision holds only Events.
        return Ok(Applied(decision));
    };
    if !observed.canary.finalizers().iter().any(|f| f == FINALIZER) {
        // Before Serin creates or changes anything, so that deleting the Canary always
        // restores the service first. The next reconcile (woken by this write) goes on.
        add_finalizer(observed.canary, ctx).await?;
        return Ok(Applied(Decision {
            status: observed.status.clone(),
            actions: Vec::new(),
            requeue_after: Some(Duration::from_secs(1)),
            evidence: observed.observations.evidence.clone(),
        }));
    }
    if observed.needs_prepare {
        prepare(observed, ctx, router).await?;
        ctx.mark_prepared(observed.canary);
    }
    let mut current = Weights::with_canary(rollout::believed_canary_weight(
        &observed.canary.spec,
        &observed.status,
        observed.observations.weights,
    ));
    let mut read_back = observed.status.phase == Phase::Initializing;
    let decided = Instant::now();
    for action in &decision.actions {
        match action {
            Action::SetWeights(desired) => {
                if read_back {
                    // First sight: the object's weights are whatever the user left there.
                    current = router.weights(observed.canary).await?;
                    read_back = false;
                }
                set_weights(observed.canary, router, current, *desired).await?;
                ctx.metrics.weight_written(decided.elapsed().as_secs_f64());
                current = *desired;
            }
            Action::PromoteWorkload { revision } => {
                promote_workload(observed, ctx, revision).await?
            }
            Action::ScaleCanaryUp => {
                let replicas = observed
                    .workloads
                    .primary
                    .as_ref()
                    .map(workload::replicas)
                    .unwrap_or(1)
                    .max(1);
                scale_target(observed, ctx, replicas).await?;
            }
            Action::ScaleCanaryDown => scale_target(observed, ctx, 0).await?,
            // Reported after the status is recorded (see `record`).
            Action::Event(_) => {}
        }
    }
    Ok(Applied(decision))
}

/// Creates or adopts what the Canary routes through: the Services in front of the workload
/// and the routing objects.
async fn prepare(observed: &Observed<'_>, ctx: &Context, router: &dyn Router) -> Result<(), Error> {
    let canary = observed.canary;
    if let Some(target) = &observed.workloads.target {
        let services: Api<Service> =
            Api::namespaced(ctx.client.clone(), &canary.namespace().unwrap_or_default());
        for svc in workload::build_services(canary, target) {
            workload::apply(&services, &svc, "Service").await?;
        }
    }
    router.prepare(canary).await?;
    Ok(())
}

/// Moves the weights from `current` to `desired`.
#[tracing::instrument(skip_all, fields(router = ?router.kind(), primary = desired.primary(), canary_weight = desired.canary()))]
async fn set_weights(
    canary: &Canary,
    router: &dyn Router,
    current: Weights,
    desired: Weights,
) -> Result<(), Error> {
    let outcome = match router.set_weights(canary, current, desired).await {
        Err(RouterError::WeightsChanged { .. }) if desired.canary() == 0 => {
            // Moving all traffic to the primary is always safe: take it back even from a
            // hand edit.
            let found = router.weights(canary).await?;
            router.set_weights(canary, found, desired).await?
        }
        other => other?,
    };
    if outcome == WriteOutcome::Written {
        tracing::info!("weights set");
    }
    Ok(())
}

/// Scales the target (the canary workload) to `replicas`.
async fn scale_target(observed: &Observed<'_>, ctx: &Context, replicas: i32) -> Result<(), Error> {
    let Some(target_ref) = &observed.canary.spec.target_ref else {
        return Ok(());
    };
    let deployments: Api<Deployment> = Api::namespaced(
        ctx.client.clone(),
        &observed.canary.namespace().unwrap_or_default(),
    );
    workload::scale(&deployments, &target_ref.name, replicas).await
}

/// Makes `<target>-primary` run `revision`: the pod template of the target as observed in
/// this reconcile, provided that is still the revision the decision promotes.
async fn promote_workload(
    observed: &Observed<'_>,
    ctx: &Context,
    revision: &str,
) -> Result<(), Error> {
    let canary = observed.canary;
    let ns = canary.namespace().unwrap_or_default();
    let Some(target_ref) = &canary.spec.target_ref else {
        return Ok(());
    };
    let Some(target) = &observed.workloads.target else {
        return Err(Error::TargetNotFound(format!("{ns}/{}", target_ref.name)));
    };
    if observed.observations.canary.revision.as_deref() != Some(revision) {
        return Err(Error::TargetChanged(format!("{ns}/{}", target_ref.name)));
    }
    let replicas = match &observed.workloads.primary {
        Some(p) => workload::replicas(p),
        None => workload::replicas(target).max(1),
    };
    let primary = workload::build_primary(canary, target, revision, replicas);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    workload::apply(&deployments, &primary, "Deployment").await?;
    Ok(())
}

/// Writes the new status when it changed, then publishes the decision's Events, and says
/// when to look again.
#[tracing::instrument(skip_all)]
async fn record(
    observed: &Observed<'_>,
    ctx: &Context,
    applied: Applied,
) -> Result<Requeue, Error> {
    let Applied(decision) = applied;
    let canary = observed.canary;
    if decision.status != observed.status {
        write_status(canary, ctx, &decision.status).await?;
    }
    ctx.remember_evidence(canary, decision.evidence.clone());
    if decision.status != observed.status {
        ctx.metrics.observe_status(
            &canary.namespace().unwrap_or_default(),
            &canary.name_any(),
            &observed.status,
            &decision.status,
        );
    }
    // Report only what was recorded: a reconcile that ran on a stale copy of the Canary
    // made the same decision again and lost the compare-and-swap above, so its Events
    // would be duplicates.
    let reference = canary.object_ref(&());
    for action in &decision.actions {
        if let Action::Event(e) = action {
            ctx.notifier.send(crate::notify::Notice {
                reason: e.reason,
                warning: e.type_ == EventType::Warning,
                namespace: canary.namespace().unwrap_or_default(),
                name: canary.name_any(),
                message: e.message.clone(),
                phase: decision.status.phase.as_str(),
                canary_weight: decision.status.canary_weight,
                revision: decision.status.revision.clone(),
                time: Utc::now(),
            });
            if observed.problems.is_empty() {
                let kind = match e.type_ {
                    EventType::Warning => "Warning",
                    EventType::Normal => "Normal",
                };
                ctx.webhooks
                    .tell(canary, &decision.status, kind, e.reason, &e.message);
            }
            publish(ctx, &reference, e.type_, e.reason, e.message.clone()).await;
        }
    }
    Ok(match decision.requeue_after {
        Some(d) => Requeue::requeue(d.max(Duration::from_millis(200))),
        None => Requeue::requeue(RESYNC),
    })
}

/// Writes the status as a compare-and-swap on the Canary's resourceVersion.
///
/// The body carries only what a status write reads (the server keeps everything but
/// `.status` from the stored object), and the answer is not parsed: the watch brings the
/// new object anyway. At a check per Canary per minute this is the operator's most frequent
/// write, and cloning, serializing and parsing whole Canaries for it cost about a tenth of
/// a check's CPU.
async fn write_status(canary: &Canary, ctx: &Context, status: &CanaryStatus) -> Result<(), Error> {
    let ns = canary.namespace().unwrap_or_default();
    let name = canary.name_any();
    let failed = |source| Error::Kube {
        operation: "replace status",
        kind: "Canary",
        name: name.clone(),
        source,
    };
    let request = status_write(canary, &ns, &name, status).map_err(failed)?;
    match ctx.client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::StatusConflict(name)),
        Err(source) => Err(failed(source)),
    }
}

/// The PUT of `status` to a Canary's status subresource, guarded by its resourceVersion.
fn status_write(
    canary: &Canary,
    ns: &str,
    name: &str,
    status: &CanaryStatus,
) -> Result<axum::http::Request<Vec<u8>>, kube::Error> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        api_version: std::borrow::Cow<'a, str>,
        kind: std::borrow::Cow<'a, str>,
        metadata: Metadata<'a>,
        status: &'a CanaryStatus,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Metadata<'a> {
        name: &'a str,
        namespace: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        resource_version: Option<&'a str>,
    }
    let body = serde_json::to_vec(&Body {
        api_version: Canary::api_version(&()),
        kind: Canary::kind(&()),
        metadata: Metadata {
            name,
            namespace: ns,
            resource_version: canary.metadata.resource_version.as_deref(),
        },
        status,
    })
    .map_err(kube::Error::SerdeError)?;
    let params = PostParams {
        dry_run: false,
        field_manager: Some(api::MANAGER.into()),
    };
    let mut request = kube::core::Request::new(Canary::url_path(&(), Some(ns)))
        .replace_subresource("status", name, &params, body)
        .map_err(kube::Error::BuildRequest)?;
    // As kube's own replace_status names it, for the client's tracing.
    request.extensions_mut().insert("replace_status");
    Ok(request)
}

/// Records a problem the user must fix as `Ready=False` (without touching rollout state)
/// and one Warning Event per distinct message.
async fn report_blocked(canary: &Canary, ctx: &Context, error: &Error) {
    let mut status = canary.status.clone().unwrap_or_default();
    let message = error.to_string();
    let changed = api::set_condition(
        &mut status.conditions,
        api::READY,
        ConditionStatus::False,
        error.category(),
        &message,
        canary.metadata.generation,
        Utc::now(),
    );
    if !changed {
        return;
    }
    publish(
        ctx,
        &canary.object_ref(&()),
        EventType::Warning,
        error.category(),
        message,
    )
    .await;
    if let Err(e) = write_status(canary, ctx, &status).await {
        tracing::debug!(error = %e, "could not record the blocked condition");
    }
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    // A recorder per Event: kube's Recorder merges Events that share type, reason and
    // action into one series and keeps the first message, so "canary weight 50%" would be
    // shown as a repeat of "canary weight 20%".
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let event = KubeEvent {
        type_: match type_ {
            EventType::Normal => KubeEventType::Normal,
            EventType::Warning => KubeEventType::Warning,
        },
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, reason, "could not publish event");
    }
}

async fn add_finalizer(canary: &Canary, ctx: &Context) -> Result<(), Error> {
    let mut finalizers = canary.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    set_finalizers(canary, ctx, finalizers, "add finalizer to").await
}

/// Replaces the Canary's finalizers, guarded by its resourceVersion.
async fn set_finalizers(
    canary: &Canary,
    ctx: &Context,
    finalizers: Vec<String>,
    operation: &'static str,
) -> Result<(), Error> {
    let api: Api<Canary> =
        Api::namespaced(ctx.client.clone(), &canary.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": canary.resource_version()}});
    api.patch(
        &canary.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|source| Error::Kube {
        operation,
        kind: "Canary",
        name: canary.name_any(),
        source,
    })?;
    Ok(())
}

/// Checks that the Canary CRD is installed and that Serin may list Canaries where it will
/// watch them (`namespace`, else cluster-wide); the error says how to fix either.
pub async fn check_crd(client: &kube::Client, namespace: Option<&str>) -> anyhow::Result<()> {
    let api: Api<Canary> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let scope = match namespace {
        Some(ns) => format!("in namespace {ns}"),
        None => "cluster-wide".to_string(),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "the Canary CRD (canaries.serin.dev) is not installed in this cluster; install it with:\n  serin crd | kubectl apply -f -\n(or kubectl apply -f crds/serin.dev_canaries.yaml)"
        ),
        Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
            "Serin may not list Canaries {scope}: {}; grant it the chart's RBAC (charts/serin), or run it with --namespace for the namespace it is allowed to watch",
            s.message
        ),
        Err(e) => Err(anyhow::anyhow!("cannot list Canaries {scope}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 403 is the user's to fix (missing RBAC): shown on the Canary as Forbidden, with
    /// what to do; other API errors are passing ones.
    #[test]
    fn a_forbidden_request_is_shown_to_the_user() {
        let api_error = |code: u16| Error::Kube {
            operation: "patch",
            kind: "Deployment",
            name: "shop/web-primary".into(),
            source: kube::Error::Api(
                kube::core::Status::failure(
                    "deployments.apps \"web-primary\" is forbidden",
                    "Forbidden",
                )
                .with_code(code)
                .boxed(),
            ),
        };
        let forbidden = api_error(403);
        assert_eq!(forbidden.category(), "Forbidden");
        assert!(forbidden.needs_user());
        let message = forbidden.to_string();
        assert!(
            message.starts_with("patch Deployment shop/web-primary: "),
            "{message}"
        );
        assert!(message.contains("helm upgrade"), "{message}");
        let busy = api_error(503);
        assert_eq!(busy.category(), "KubernetesApiError");
        assert!(!busy.needs_user());
        assert!(!busy.to_string().contains("helm upgrade"));
    }

    /// A reconcile that panics becomes this Canary's error (shown to the user, retried
    /// slowly); the process and every other reconcile go on.
    #[tokio::test]
    async fn a_panicking_reconcile_is_contained() {
        let panicking = async {
            if true {
                panic!("index {} out of bounds", 3);
            }
            Ok(Requeue::await_change())
        };
        let err = contain_panic(panicking).await.unwrap_err();
        assert!(
            matches!(err, Error::Panicked(ref m) if m.contains("index 3 out of bounds")),
            "{err}"
        );
        assert_eq!(err.category(), "ReconcilePanicked");
        assert!(err.needs_user());
        // The next reconcile runs normally.
        assert!(
            contain_panic(async { Ok(Requeue::await_change()) })
                .await
                .is_ok()
        );
    }
}
