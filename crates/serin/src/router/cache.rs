//! Routing objects as a watch last saw them, so that reading a Canary's weights on every
//! reconcile of a rollout costs no request.
//!
//! One watch per kind of routing object (per namespace when the operator is confined to
//! one), started the first time a router reads that kind; none for kinds no Canary uses.
//! Only objects a router has read or written are kept (whatever else the watch sees is
//! dropped as it arrives), as compact JSON without managedFields, and one no router read for
//! [`EVICT_AFTER`] is dropped: the cache is as large as the set of objects Canaries route
//! through, never as the cluster.
//!
//! What the cache answers is never older than Serin's own last read or write of the object
//! (a write puts the server's answer in; an event older than what is held, by
//! resourceVersion, is ignored), so a rollout never sees its own write undone. It may lag a
//! hand edit by the watch's latency; weight writes never decide on it (a patch built from
//! its copy carries JSON Patch `test` ops that fail on a stale copy, and a decision not to
//! write is taken again on a fresh read). An absence is never answered from the
//! cache, and neither is anything while the watch is (re)listing or failing (no RBAC to
//! watch, the CRD missing): the router then reads from the API server, as without a cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::Value;

/// An object no router has read for this long is dropped from the cache.
pub const EVICT_AFTER: Duration = Duration::from_secs(600);

/// How often dropping unread objects is considered.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The routers' shared cache of routing objects; `ObjectCache::none()` (the default) caches
/// nothing and every read goes to the API server.
#[derive(Clone, Default)]
pub struct ObjectCache {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: Client,
    /// The namespace the operator is confined to, if any: watches are then per namespace.
    namespace: Option<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    watches: HashMap<WatchKey, WatchState>,
    objects: HashMap<ObjectKey, Slot>,
    swept: Option<Instant>,
}

/// A watch: the resource (`group/version/plural`) and, for a confined operator, the
/// namespace.
type WatchKey = (String, Option<String>);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    resource: String,
    namespace: String,
    name: String,
}

struct WatchState {
    /// Listed and watching: only then is what it holds answered.
    ready: bool,
    /// Which (re)list is under way; objects not seen in it are gone.
    listing: u64,
    /// Whether a failure was already logged as a warning (later ones are debug).
    warned: bool,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Slot {
    /// The object as compact JSON; `None` once the watch saw it deleted (or did not see it
    /// in a relist).
    json: Option<Box<str>>,
    resource_version: Option<String>,
    /// The last time a router read it.
    used: Instant,
    /// The relist that last saw it.
    listed: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(state) = self.state.get_mut() {
            for w in state.watches.values_mut() {
                if let Some(t) = w.task.take() {
                    t.abort();
                }
            }
        }
    }
}

fn resource_id(ar: &ApiResource) -> String {
    format!("{}/{}", ar.api_version, ar.plural)
}

/// True when `new` is not older than `old`. Resource versions are opaque to clients in
/// general; the API server's are etcd revisions, compared as numbers when both parse, and
/// anything else counts as newer (the watch's order is then trusted).
fn not_older(new: Option<&str>, old: Option<&str>) -> bool {
    match (
        new.and_then(|n| n.parse::<u64>().ok()),
        old.and_then(|o| o.parse::<u64>().ok()),
    ) {
        (Some(n), Some(o)) => n >= o,
        _ => true,
    }
}

/// The object as the cache keeps it: compact JSON without managedFields and kubectl's
/// last-applied copy.
fn compact(mut object: Value) -> Option<Box<str>> {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    serde_json::to_string(&object)
        .ok()
        .map(String::into_boxed_str)
}

impl ObjectCache {
    /// Caches nothing: every read goes to the API server.
    pub fn none() -> Self {
        ObjectCache::default()
    }

    /// A cache whose watches use `client`, over all namespaces, or over each namespace
    /// separately when `namespace` confines the operator to one (its routing objects may
    /// still live elsewhere, where it may lack the right to watch: those are then read).
    pub fn watching(client: Client, namespace: Option<String>) -> Self {
        ObjectCache {
            inner: Some(Arc::new(Inner {
                client,
                namespace,
                state: Mutex::default(),
            })),
        }
    }

    /// How many objects the cache holds (deleted ones included until evicted).
    pub fn len(&self) -> usize {
        self.inner
            .as_ref()
            .and_then(|i| i.state.lock().ok().map(|s| s.objects.len()))
            .unwrap_or(0)
    }

    /// True when the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `namespace/name` of resource `ar` as the watch last saw it; `None` when the cache
    /// cannot answer (not cached yet, deleted, or the watch not ready): read it from the
    /// API server and [`put`](Self::put) it. Starts the kind's watch on first use.
    pub(crate) fn get(&self, ar: &ApiResource, namespace: &str, name: &str) -> Option<Value> {
        let inner = self.inner.as_ref()?;
        let watch = inner.watch_key(ar, namespace);
        let mut state = inner.state.lock().ok()?;
        if !state.watches.contains_key(&watch) {
            let task = Inner::spawn_watch(inner, ar, &watch);
            state.watches.insert(
                watch.clone(),
                WatchState {
                    ready: false,
                    listing: 0,
                    warned: false,
                    task,
                },
            );
        }
        let ready = state.watches.get(&watch).is_some_and(|w| w.ready);
        let slot = state.objects.get_mut(&ObjectKey {
            resource: watch.0,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
        slot.used = Instant::now();
        if !ready {
            return None;
        }
        serde_json::from_str(slot.json.as_deref()?).ok()
    }

    /// Keeps `object` (of resource `ar`, as just read from or written to the API server)
    /// unless the cache already holds a newer version; from now on its watch keeps it
    /// current.
    pub(crate) fn put(&self, ar: &ApiResource, object: &Value) {
        let Some(inner) = self.inner.as_ref() else {
            return;
        };
        let meta = &object["metadata"];
        let (Some(namespace), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str())
        else {
            return;
        };
        let rv = meta["resourceVersion"].as_str().map(str::to_string);
        let key = ObjectKey {
            resource: resource_id(ar),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let Ok(mut state) = inner.state.lock() else {
            return;
        };
        state.sweep();
        let now = Instant::now();
        let slot = state.objects.entry(key).or_insert(Slot {
            json: None,
            resource_version: None,
            used: now,
            listed: 0,
        });
        slot.used = now;
        if slot.json.is_none() || not_older(rv.as_deref(), slot.resource_version.as_deref()) {
            slot.json = compact(object.clone());
            slot.resource_version = rv;
        }
    }
}

impl State {
    /// Drops the objects no router read for [`EVICT_AFTER`], at most once a minute.
    fn sweep(&mut self) {
        let now = Instant::now();
        if self
            .swept
            .is_some_and(|at| now.duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.objects
            .retain(|_, s| now.duration_since(s.used) < EVICT_AFTER);
    }

    /// Whether `key` is an object of `watch`.
    fn covers(watch: &WatchKey, key: &ObjectKey) -> bool {
        key.resource == watch.0 && watch.1.as_ref().is_none_or(|ns| *ns == key.namespace)
    }

    /// Applies one watch event to the objects the routers read; others are dropped.
    fn apply(&mut self, watch: &WatchKey, event: watcher::Event<DynamicObject>) {
        let Some(w) = self.watches.get_mut(watch) else {
            return;
        };
        match event {
            watcher::Event::Init => {
                w.ready = false;
                w.listing += 1;
            }
            watcher::Event::InitDone => {
                let listing = w.listing;
                w.ready = true;
                w.warned = false;
                for (key, slot) in self.objects.iter_mut() {
                    if Self::covers(watch, key) && slot.listed != listing {
                        slot.json = None;
                    }
                }
            }
            watcher::Event::InitApply(o) => {
                let listing = w.listing;
                self.update(watch, o, Some(listing), false);
            }
            watcher::Event::Apply(o) => self.update(watch, o, None, false),
            watcher::Event::Delete(o) => self.update(watch, o, None, true),
        }
    }

    fn update(
        &mut self,
        watch: &WatchKey,
        object: DynamicObject,
        listing: Option<u64>,
        deleted: bool,
    ) {
        let key = ObjectKey {
            resource: watch.0.clone(),
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
        };
        let Some(slot) = self.objects.get_mut(&key) else {
            return;
        };
        let rv = object.metadata.resource_version.clone();
        if let Some(l) = listing {
            slot.listed = l;
        }
        if slot.json.is_some() && !not_older(rv.as_deref(), slot.resource_version.as_deref()) {
            return;
        }
        slot.resource_version = rv;
        slot.json = if deleted {
            None
        } else {
            serde_json::to_value(object).ok().and_then(compact)
        };
    }
}

impl Inner {
    fn watch_key(&self, ar: &ApiResource, namespace: &str) -> WatchKey {
        (
            resource_id(ar),
            self.namespace.as_ref().map(|_| namespace.to_string()),
        )
    }

    /// Starts the watch `key` of resource `ar` (none outside a Tokio runtime: the cache then
    /// never answers for that kind).
    fn spawn_watch(
        this: &Arc<Inner>,
        ar: &ApiResource,
        key: &WatchKey,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let api: Api<DynamicObject> = match &key.1 {
            Some(ns) => Api::namespaced_with(this.client.clone(), ns, ar),
            None => Api::all_with(this.client.clone(), ar),
        };
        let weak = Arc::downgrade(this);
        let key = key.clone();
        Some(runtime.spawn(watch(weak, api, key)))
    }
}

/// Feeds the events of one watch into the cache until the cache is dropped.
async fn watch(cache: Weak<Inner>, api: Api<DynamicObject>, key: WatchKey) {
    let config = watcher::Config::default().any_semantic();
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(item) = events.next().await {
        let Some(inner) = cache.upgrade() else {
            return;
        };
        let Ok(mut state) = inner.state.lock() else {
            return;
        };
        match item {
            Ok(event) => state.apply(&key, event),
            Err(error) => {
                // Reads go to the API server until the watch has listed again.
                let Some(w) = state.watches.get_mut(&key) else {
                    return;
                };
                w.ready = false;
                if w.warned {
                    tracing::debug!(resource = %key.0, %error, "routing object watch failed; reading from the API server");
                } else {
                    w.warned = true;
                    tracing::warn!(resource = %key.0, namespace = ?key.1, %error, "cannot watch routing objects; reading them from the API server until the watch recovers");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_resource_versions_order_and_others_trust_the_watch() {
        assert!(not_older(Some("10"), Some("9")));
        assert!(not_older(Some("10"), Some("10")));
        assert!(!not_older(Some("9"), Some("10")));
        assert!(not_older(Some("abc"), Some("10")));
        assert!(not_older(None, Some("10")));
        assert!(not_older(Some("1"), None));
    }

    #[test]
    fn compact_drops_managed_fields_and_last_applied() {
        let obj = serde_json::json!({
            "metadata": {
                "name": "a",
                "managedFields": [{"manager": "kubectl"}],
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "keep": "me"
                }
            },
            "spec": {"x": 1}
        });
        let kept: Value = serde_json::from_str(&compact(obj).expect("json")).expect("parse");
        assert_eq!(
            kept,
            serde_json::json!({
                "metadata": {"name": "a", "annotations": {"keep": "me"}},
                "spec": {"x": 1}
            })
        );
    }
}
