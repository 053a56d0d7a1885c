//! The in-memory object store: one lock over all objects, a global revision counter and a
//! bounded event history. Every write assigns its revision and publishes its watch event while
//! holding the lock, so watchers see each revision exactly once and in order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::error::{ApiError, Cause};
use super::patch::{self, FieldPath};
use super::schema;
use super::types::{self, ResourceType};

/// `(group, plural)`.
pub type TypeKey = (String, String);
/// `(namespace, name)`; namespace is `""` for cluster-scoped objects.
pub type ObjKey = (String, String);

/// Kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Object created (or started matching a selector).
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct WatchEvent {
    /// Revision of this change.
    pub rev: u64,
    /// `(group, plural)` of the object.
    pub type_key: TypeKey,
    /// Namespace of the object.
    pub namespace: String,
    /// Event type.
    pub kind: EventType,
    /// The object after the change (for deletions: its last state).
    pub object: Arc<Value>,
    /// The object before the change, for modifications.
    pub old: Option<Arc<Value>>,
}

/// How unknown fields are treated (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Drop silently.
    Ignore,
    /// Drop and return a `Warning` header (server default).
    #[default]
    Warn,
    /// Reject with 400.
    Strict,
}

/// Options common to writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
    /// `fieldManager` (or a name derived from the user agent).
    pub field_manager: String,
    /// `fieldValidation`.
    pub field_validation: FieldValidation,
    /// The write targets the status subresource.
    pub status: bool,
}

/// Result of a write.
#[derive(Debug, Clone)]
pub struct Written {
    /// Stored object (storage version).
    pub object: Value,
    /// Created rather than updated.
    pub created: bool,
    /// Messages for `Warning` headers.
    pub warnings: Vec<String>,
}

/// A proposed object for [`Store::write`], computed from the current one.
pub enum Proposal {
    /// A full object in the request's version; `apply` holds the server-side-apply config.
    Object(Value),
    /// Server-side apply of a configuration with `force`.
    Apply {
        /// The applied configuration.
        config: Value,
        /// `force=true`.
        force: bool,
    },
}

/// Propagation policy for deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// Delete dependents after the owner (default for most kinds).
    #[default]
    Background,
    /// The owner gets the `foregroundDeletion` finalizer and goes when no dependent that
    /// blocks owner deletion is left; dependents are deleted before the call returns.
    Foreground,
    /// The owner gets the `orphan` finalizer; dependents lose their owner reference, then
    /// the owner goes.
    Orphan,
}

/// Result of a delete.
#[derive(Debug, Clone)]
pub struct Deleted {
    /// Last state of the object.
    pub object: Value,
    /// Removed now (`false`: finalizers pending, only `deletionTimestamp` set).
    pub removed: bool,
}

struct Inner {
    rev: u64,
    types: BTreeMap<TypeKey, Arc<ResourceType>>,
    objects: BTreeMap<TypeKey, BTreeMap<ObjKey, Value>>,
    history: VecDeque<Arc<WatchEvent>>,
    history_limit: usize,
    /// Every event with a revision above this one is still in `history`.
    compacted: u64,
    uid_seed: u64,
    next_ip: u32,
}

/// The shared store.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<WatchEvent>>,
}

/// The finalizer of an object whose dependents are deleted before it (foreground deletion).
const FOREGROUND_DELETION: &str = "foregroundDeletion";
/// The finalizer of an object whose dependents are orphaned before it goes.
const ORPHAN: &str = "orphan";

fn finalizers(obj: &Value) -> Vec<&str> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn owner_refs(obj: &Value) -> impl Iterator<Item = &Value> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn ref_uid(owner_ref: &Value) -> Option<&str> {
    owner_ref.get("uid").and_then(Value::as_str)
}

fn blocks(owner_ref: &Value) -> bool {
    owner_ref.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true)
}

/// The finalizer the real server puts on a CRD being deleted until its objects are gone.
const CRD_CLEANUP: &str = "customresourcecleanup.apiextensions.k8s.io";

/// A namespace or CRD marked for deletion as the real server marks it (no grace period, no
/// new generation): a namespace gets phase `Terminating`, a CRD the cleanup finalizer and a
/// `Terminating` condition. `None` for other kinds.
fn terminating(rt: &ResourceType, current: &Value) -> Option<Value> {
    let namespace = rt.group.is_empty() && rt.plural == "namespaces";
    let crd = rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions";
    if !namespace && !crd {
        return None;
    }
    let mut marked = current.clone();
    let now = now_rfc3339();
    meta_mut(&mut marked).insert("deletionTimestamp".into(), json!(now));
    if namespace {
        marked["status"]["phase"] = json!("Terminating");
    } else {
        let meta = meta_mut(&mut marked);
        let list = meta.entry("finalizers").or_insert_with(|| json!([]));
        if let Some(list) = list.as_array_mut() {
            list.push(json!(CRD_CLEANUP));
        }
        if let Some(conditions) = marked
            .pointer_mut("/status/conditions")
            .and_then(Value::as_array_mut)
        {
            conditions.push(json!({"type": "Terminating", "status": "True", "lastTransitionTime": now,
                "reason": "InstanceDeletionPending",
                "message": "CustomResourceDefinition marked for deletion; CustomResource deletion will begin soon"}));
        }
    }
    Some(marked)
}

/// Marks an object as being deleted, as the real server's delete does: `deletionTimestamp`,
/// a zero grace period, and the next `generation` when the kind tracks it.
fn mark_deleted(obj: &mut Value) {
    let meta = meta_mut(obj);
    meta.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
    meta.insert("deletionGracePeriodSeconds".into(), json!(0));
    if let Some(g) = meta.get("generation").and_then(Value::as_i64)
        && g > 0
    {
        meta.insert("generation".into(), json!(g + 1));
    }
}

/// Drops empty `labels`, `annotations`, `finalizers` and `ownerReferences`, which the real
/// server does not store (they are `omitempty` in ObjectMeta).
fn drop_empty_metadata(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, v| {
            !(matches!(
                k.as_str(),
                "labels" | "annotations" | "finalizers" | "ownerReferences"
            ) && (v.as_object().is_some_and(Map::is_empty)
                || v.as_array().is_some_and(Vec::is_empty)
                || v.is_null()))
        });
    }
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata").and_then(Value::as_object_mut) {
        Some(m) => m,
        None => unreachable_meta(),
    }
}

#[allow(clippy::panic)]
fn unreachable_meta() -> ! {
    // `metadata` was made an object on the line before; this cannot happen.
    panic!("metadata is an object")
}

/// Is `s` an RFC 1123 subdomain (the rule for most object names)?
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Presents a stored object in the requested version (relabels `apiVersion`).
pub fn present(obj: &Value, rt: &ResourceType, version: &str) -> Value {
    let mut out = obj.clone();
    if let Some(m) = out.as_object_mut() {
        m.insert(
            "apiVersion".to_string(),
            Value::String(rt.api_version(version)),
        );
        m.insert("kind".to_string(), Value::String(rt.kind.clone()));
    }
    out
}

fn without_volatile(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    o
}

fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

impl Store {
    /// A store with the built-in types and the usual namespaces.
    pub fn new(history_limit: usize) -> Arc<Self> {
        let (tx, _) = broadcast::channel(history_limit.max(1024));
        let mut types = BTreeMap::new();
        for t in types::builtins() {
            types.insert((t.group.clone(), t.plural.clone()), Arc::new(t));
        }
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(Utc::now().timestamp_nanos_opt().unwrap_or(0) as u128);
            h.finish()
        };
        let store = Arc::new(Self {
            inner: Mutex::new(Inner {
                rev: 0,
                types,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit,
                compacted: 0,
                uid_seed: seed,
                next_ip: 1,
            }),
            tx,
        });
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            // Start-up: the built-in namespace type exists and the names are valid.
            let _ = store.create("", "namespaces", "v1", "", body, &WriteOpts::default());
        }
        store
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, ApiError> {
        self.inner
            .lock()
            .map_err(|_| ApiError::internal("store lock poisoned"))
    }

    /// Current global revision.
    pub fn revision(&self) -> u64 {
        self.inner.lock().map(|i| i.rev).unwrap_or(0)
    }

    /// All served types.
    pub fn types(&self) -> Vec<Arc<ResourceType>> {
        self.inner
            .lock()
            .map(|i| i.types.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Finds a served type by group, version and plural (or singular/short name when `loose`).
    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        let inner = self.inner.lock().ok()?;
        inner
            .types
            .get(&(group.to_string(), plural.to_string()))
            .filter(|t| t.version(version).is_some())
            .cloned()
    }

    /// Reads one object.
    pub fn get(&self, group: &str, plural: &str, ns: &str, name: &str) -> Result<Value, ApiError> {
        let inner = self.lock()?;
        inner
            .objects
            .get(&(group.to_string(), plural.to_string()))
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(group, plural, name))
    }

    /// Lists objects (all namespaces when `ns` is `None`) and the revision of the snapshot.
    pub fn list(
        &self,
        group: &str,
        plural: &str,
        ns: Option<&str>,
    ) -> Result<(Vec<Value>, u64), ApiError> {
        let inner = self.lock()?;
        let items = inner
            .objects
            .get(&(group.to_string(), plural.to_string()))
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default();
        Ok((items, inner.rev))
    }

    /// The newest revision whose events the history no longer holds.
    pub fn compacted(&self) -> u64 {
        self.inner.lock().map(|i| i.compacted).unwrap_or(0)
    }

    /// Lists objects as they were at revision `rev` (`resourceVersionMatch=Exact`), rebuilt
    /// from the current state and the history; 410 when the history no longer reaches back
    /// to `rev`.
    pub fn list_at(
        &self,
        group: &str,
        plural: &str,
        ns: Option<&str>,
        rev: u64,
    ) -> Result<Vec<Value>, ApiError> {
        let inner = self.lock()?;
        if rev < inner.compacted {
            return Err(ApiError::list_expired());
        }
        let key = (group.to_string(), plural.to_string());
        let mut objects: BTreeMap<ObjKey, Value> =
            inner.objects.get(&key).cloned().unwrap_or_default();
        for e in inner
            .history
            .iter()
            .rev()
            .filter(|e| e.rev > rev && e.type_key == key)
        {
            let okey = (e.namespace.clone(), meta_str(&e.object, "name").to_string());
            match (&e.kind, &e.old) {
                (EventType::Added, _) => {
                    objects.remove(&okey);
                }
                (_, Some(old)) => {
                    objects.insert(okey, (**old).clone());
                }
                (_, None) => {}
            }
        }
        Ok(objects
            .into_iter()
            .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .collect())
    }

    /// Starts a watch: the events after `since` (or synthetic ADDED events for the current
    /// state when `since` is `None`) plus a receiver for everything later, taken atomically.
    #[allow(clippy::type_complexity)]
    pub fn watch(
        &self,
        group: &str,
        plural: &str,
        since: Option<u64>,
    ) -> Result<
        (
            Vec<Arc<WatchEvent>>,
            broadcast::Receiver<Arc<WatchEvent>>,
            u64,
        ),
        ApiError,
    > {
        let inner = self.lock()?;
        let key = (group.to_string(), plural.to_string());
        let rx = self.tx.subscribe();
        let backlog = match since {
            None => inner
                .objects
                .get(&key)
                .map(|m| {
                    m.iter()
                        .map(|((ns, _), v)| {
                            Arc::new(WatchEvent {
                                rev: meta_str(v, "resourceVersion").parse().unwrap_or(0),
                                type_key: key.clone(),
                                namespace: ns.clone(),
                                kind: EventType::Added,
                                object: Arc::new(v.clone()),
                                old: None,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Some(rv) => {
                if rv < inner.compacted {
                    return Err(ApiError::gone(rv, inner.compacted));
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rev > rv && e.type_key == key)
                    .cloned()
                    .collect()
            }
        };
        Ok((backlog, rx, inner.rev))
    }

    /// Creates an object from a request body in `version`.
    pub fn create(
        &self,
        group: &str,
        plural: &str,
        version: &str,
        ns: &str,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let mut inner = self.lock()?;
        let rt = inner.type_of(group, plural)?;
        let (obj, warnings) = self.prepare_create(&mut inner, &rt, version, ns, body, opts)?;
        let name = meta_str(&obj, "name").to_string();
        if inner.find(&rt, ns, &name).is_some() {
            return Err(ApiError::already_exists(group, plural, &name));
        }
        let object = self.store_new(&mut inner, &rt, obj, opts.dry_run);
        Ok(Written {
            object,
            created: true,
            warnings,
        })
    }

    /// Updates (or, for server-side apply, possibly creates) an object from a proposal
    /// computed from the current state under the store lock.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        group: &str,
        plural: &str,
        version: &str,
        ns: &str,
        name: &str,
        opts: &WriteOpts,
        propose: impl FnOnce(Option<&Value>, &ResourceType) -> Result<Proposal, ApiError>,
    ) -> Result<Written, ApiError> {
        let mut inner = self.lock()?;
        let rt = inner.type_of(group, plural)?;
        let current = inner.find(&rt, ns, name).cloned();
        let presented = current.as_ref().map(|c| present(c, &rt, version));
        let proposal = propose(presented.as_ref(), &rt)?;
        let Some(old) = current else {
            return match proposal {
                Proposal::Apply { config, .. } if !opts.status => {
                    self.create_by_apply(&mut inner, &rt, version, ns, name, &config, opts)
                }
                _ => Err(ApiError::not_found(group, plural, name)),
            };
        };
        let (new, apply_fields) = match proposal {
            Proposal::Object(v) => (v, None),
            Proposal::Apply { config, force } => {
                let (merged, fields) = apply_config(
                    &rt,
                    presented.as_ref().unwrap_or(&old),
                    &config,
                    force,
                    opts,
                )?;
                (merged, Some(fields))
            }
        };
        let (obj, warnings) = prepare_update(&rt, version, &old, new, opts, apply_fields)?;
        let object = match obj {
            None => old,
            Some(obj) => self.store_update(&mut inner, &rt, ns, name, old, obj, opts.dry_run),
        };
        Ok(Written {
            object,
            created: false,
            warnings,
        })
    }

    /// Creates a missing object from a server-side apply configuration.
    #[allow(clippy::too_many_arguments)]
    fn create_by_apply(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        version: &str,
        ns: &str,
        name: &str,
        config: &Value,
        opts: &WriteOpts,
    ) -> Result<Written, ApiError> {
        let mut body = config.clone();
        let meta = meta_mut(&mut body);
        meta.insert("name".into(), Value::String(name.to_string()));
        let (mut obj, warnings) = self.prepare_create(inner, rt, version, ns, body, opts)?;
        let fields = patch::leaf_paths(config);
        // The applier owns its fields through its Apply entry only.
        meta_mut(&mut obj).remove("managedFields");
        set_managed(
            &mut obj,
            &opts.field_manager,
            "Apply",
            &rt.api_version(version),
            false,
            &fields,
        );
        let object = self.store_new(inner, rt, obj, opts.dry_run);
        Ok(Written {
            object,
            created: true,
            warnings,
        })
    }

    /// Stores a new object (or, for a dry run, only returns it).
    fn store_new(&self, inner: &mut Inner, rt: &ResourceType, obj: Value, dry_run: bool) -> Value {
        if dry_run {
            obj
        } else {
            self.commit(inner, rt, obj, EventType::Added, None)
        }
    }

    /// Stores an updated object, or removes it once deleted and finalized; a dry run only returns it.
    #[allow(clippy::too_many_arguments)]
    fn store_update(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        old: Value,
        obj: Value,
        dry_run: bool,
    ) -> Value {
        if dry_run {
            return obj;
        }
        let finalized = obj.pointer("/metadata/deletionTimestamp").is_some()
            && obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        if finalized {
            return self.remove(inner, rt, ns, name, Some(obj), Propagation::Background);
        }
        self.commit(inner, rt, obj, EventType::Modified, Some(old))
    }

    /// Deletes an object. Without finalizers and with background propagation it is removed
    /// and its dependents collected. Otherwise it gets a `deletionTimestamp` (and, for
    /// foreground or orphan propagation, the `foregroundDeletion` or `orphan` finalizer, which
    /// the garbage collection below removes once it has dealt with the dependents), and the
    /// marked object is returned.
    #[allow(clippy::too_many_arguments)]
    pub fn delete(
        &self,
        group: &str,
        plural: &str,
        ns: &str,
        name: &str,
        propagation: Propagation,
        precondition_rv: Option<&str>,
        dry_run: bool,
    ) -> Result<Deleted, ApiError> {
        let mut inner = self.lock()?;
        let rt = inner.type_of(group, plural)?;
        let current = inner
            .find(&rt, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(group, plural, name))?;
        check_delete_precondition(group, plural, name, &current, precondition_rv)?;
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(Deleted {
                object: current,
                removed: false,
            });
        }
        if let Some(marked) = terminating(&rt, &current) {
            // A namespace or CRD is marked Terminating, and its controller's work (deleting
            // what it holds) is done before the answer, which is the marked object.
            if dry_run {
                return Ok(Deleted {
                    object: marked,
                    removed: false,
                });
            }
            let object = self.commit(&mut inner, &rt, marked, EventType::Modified, Some(current));
            let held = finalizers(&object).iter().any(|f| *f != CRD_CLEANUP);
            if !held {
                self.remove(&mut inner, &rt, ns, name, None, Propagation::Background);
            }
            return Ok(Deleted {
                object,
                removed: false,
            });
        }
        let gc_finalizer = match propagation {
            Propagation::Background => None,
            Propagation::Foreground => Some(FOREGROUND_DELETION),
            Propagation::Orphan => Some(ORPHAN),
        };
        if finalizers(&current).is_empty() && gc_finalizer.is_none() {
            if dry_run {
                return Ok(Deleted {
                    object: current,
                    removed: true,
                });
            }
            let object = self.remove(&mut inner, &rt, ns, name, None, Propagation::Background);
            return Ok(Deleted {
                object,
                removed: true,
            });
        }
        let mut marked = current.clone();
        mark_deleted(&mut marked);
        if let Some(f) = gc_finalizer {
            let meta = meta_mut(&mut marked);
            let list = meta.entry("finalizers").or_insert_with(|| json!([]));
            if let Some(list) = list.as_array_mut() {
                list.push(json!(f));
            }
        }
        if dry_run {
            return Ok(Deleted {
                object: marked,
                removed: false,
            });
        }
        let object = self.commit(&mut inner, &rt, marked, EventType::Modified, Some(current));
        // The garbage collector's part, done at once: the answer above is the marked object,
        // as the real server answers before its collector acts.
        let uid = meta_str(&object, "uid").to_string();
        match propagation {
            Propagation::Background => {}
            Propagation::Orphan => {
                self.collect_dependents(&mut inner, &uid, Propagation::Orphan);
                self.drop_finalizer(&mut inner, &rt, ns, name, ORPHAN);
            }
            Propagation::Foreground => {
                self.collect_dependents(&mut inner, &uid, Propagation::Foreground);
                self.finish_foreground(&mut inner, &rt, ns, name);
            }
        }
        Ok(Deleted {
            object,
            removed: false,
        })
    }

    /// Removes finalizer `f` from an object, which removes the object when it was the last
    /// one of an object being deleted.
    fn drop_finalizer(&self, inner: &mut Inner, rt: &ResourceType, ns: &str, name: &str, f: &str) {
        let Some(current) = inner.find(rt, ns, name).cloned() else {
            return;
        };
        let mut next = current.clone();
        let meta = meta_mut(&mut next);
        if let Some(list) = meta.get_mut("finalizers").and_then(Value::as_array_mut) {
            list.retain(|x| x.as_str() != Some(f));
            if list.is_empty() {
                meta.remove("finalizers");
            }
        }
        if next == current {
            return;
        }
        if finalizers(&next).is_empty() && next.pointer("/metadata/deletionTimestamp").is_some() {
            self.remove(inner, rt, ns, name, Some(next), Propagation::Background);
        } else {
            self.commit(inner, rt, next, EventType::Modified, Some(current));
        }
    }

    /// Ends the foreground deletion of an object once no dependent that blocks its deletion
    /// (`blockOwnerDeletion: true`) is left.
    fn finish_foreground(&self, inner: &mut Inner, rt: &ResourceType, ns: &str, name: &str) {
        let Some(owner) = inner.find(rt, ns, name) else {
            return;
        };
        if !finalizers(owner).contains(&FOREGROUND_DELETION) {
            return;
        }
        let uid = meta_str(owner, "uid").to_string();
        let blocked = inner
            .objects
            .values()
            .flat_map(|m| m.values())
            .any(|o| owner_refs(o).any(|r| ref_uid(r) == Some(&uid) && blocks(r)));
        if !blocked {
            self.drop_finalizer(inner, rt, ns, name, FOREGROUND_DELETION);
        }
    }

    /// After `removed` is gone: the owners it blocked in foreground deletion may finish.
    fn unblock_owners(&self, inner: &mut Inner, removed: &Value) {
        let uids: Vec<String> = owner_refs(removed)
            .filter(|r| blocks(r))
            .filter_map(|r| ref_uid(r).map(str::to_string))
            .collect();
        for uid in uids {
            let found = inner.objects.iter().find_map(|(key, objs)| {
                objs.iter()
                    .find(|(_, o)| meta_str(o, "uid") == uid)
                    .map(|(okey, _)| (key.clone(), okey.clone()))
            });
            if let Some((key, (ons, oname))) = found
                && let Some(t) = inner.types.get(&key).cloned()
            {
                self.finish_foreground(inner, &t, &ons, &oname);
            }
        }
    }

    /// Builds the object to store for a create: checks, server metadata, validation, kind defaults.
    fn prepare_create(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        version: &str,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> Result<(Value, Vec<String>), ApiError> {
        require_object(&obj)?;
        check_type_meta(rt, version, &obj)?;
        if rt.namespaced {
            check_create_namespace(inner, rt, ns, &obj)?;
        }
        let name = create_name(inner, rt, &obj)?;
        let v = rt
            .version(version)
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, &name))?;
        init_server_metadata(inner, rt, ns, &name, &mut obj);
        if v.status
            && !opts.status
            && rt.plural != "namespaces"
            && let Some(m) = obj.as_object_mut()
        {
            // With a status subresource, a create cannot set `.status`.
            m.remove("status");
        }
        let warnings = validate_for_storage(rt, version, &mut obj, opts)?;
        apply_kind_defaults(inner, rt, &name, &mut obj)?;
        if !opts.field_manager.is_empty() {
            let fields = patch::leaf_paths(&obj);
            set_update_manager(&mut obj, rt, version, opts, &fields);
        }
        Ok((obj, warnings))
    }

    /// Assigns the next revision, stores or replaces the object and publishes the event.
    fn commit(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        mut obj: Value,
        kind: EventType,
        old: Option<Value>,
    ) -> Value {
        inner.rev += 1;
        let rev = inner.rev;
        meta_mut(&mut obj).insert("resourceVersion".into(), Value::String(rev.to_string()));
        let ns = meta_str(&obj, "namespace").to_string();
        let name = meta_str(&obj, "name").to_string();
        let key = (rt.group.clone(), rt.plural.clone());
        let bucket = inner.objects.entry(key.clone()).or_default();
        if kind == EventType::Deleted {
            bucket.remove(&(ns.clone(), name));
        } else {
            bucket.insert((ns.clone(), name), obj.clone());
        }
        if rt.group == "apiextensions.k8s.io"
            && rt.plural == "customresourcedefinitions"
            && kind != EventType::Deleted
            && let Ok(served) = types::from_crd(&obj)
        {
            inner.types.insert(
                (served.group.clone(), served.plural.clone()),
                Arc::new(served),
            );
        }
        let event = Arc::new(WatchEvent {
            rev,
            type_key: key,
            namespace: ns,
            kind,
            object: Arc::new(obj.clone()),
            old: old.map(Arc::new),
        });
        inner.history.push_back(event.clone());
        while inner.history.len() > inner.history_limit {
            if let Some(e) = inner.history.pop_front() {
                inner.compacted = e.rev;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(event);
        if rt.group == "events.k8s.io"
            && let Ok(core) = inner.type_of("", "events")
        {
            // One storage, two APIs, as in a real server: `kubectl get events` and
            // `kubectl describe` read core/v1 Events, controllers write events.k8s.io/v1.
            let old_core = inner
                .find(&core, meta_str(&obj, "namespace"), meta_str(&obj, "name"))
                .cloned();
            self.commit(inner, &core, core_event(&obj), kind, old_core);
        }
        obj
    }

    /// Removes an object now, then what it owned and what lived inside it.
    fn remove(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        last: Option<Value>,
        propagation: Propagation,
    ) -> Value {
        let stored = inner.find(rt, ns, name).cloned();
        let Some(current) = last.or_else(|| stored.clone()) else {
            return Value::Null;
        };
        let uid = meta_str(&current, "uid").to_string();
        // The DELETED event keeps the stored state as `old`: lists at an earlier revision
        // restore it.
        let removed = self.commit(inner, rt, current, EventType::Deleted, stored);
        if rt.group.is_empty() && rt.plural == "namespaces" {
            let keys: Vec<TypeKey> = inner.objects.keys().cloned().collect();
            for key in keys {
                let Some(t) = inner.types.get(&key).cloned() else {
                    continue;
                };
                if !t.namespaced {
                    continue;
                }
                let names: Vec<String> = inner
                    .objects
                    .get(&key)
                    .map(|m| {
                        m.keys()
                            .filter(|(n, _)| n == name)
                            .map(|(_, n)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for n in names {
                    self.remove(inner, &t, name, &n, None, Propagation::Background);
                }
            }
        }
        if rt.group == "apiextensions.k8s.io"
            && rt.plural == "customresourcedefinitions"
            && let Ok(served) = types::from_crd(&removed)
        {
            let key = (served.group.clone(), served.plural.clone());
            if let Some(t) = inner.types.get(&key).cloned().filter(|t| t.custom) {
                let keys: Vec<ObjKey> = inner
                    .objects
                    .get(&key)
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                for (ons, oname) in keys {
                    self.remove(inner, &t, &ons, &oname, None, Propagation::Background);
                }
                inner.types.remove(&key);
            }
        }
        self.collect_dependents(inner, &uid, propagation);
        self.unblock_owners(inner, &removed);
        removed
    }

    /// Garbage-collects (or orphans) objects whose owner with `uid` is gone.
    fn collect_dependents(&self, inner: &mut Inner, uid: &str, propagation: Propagation) {
        let mut dependents = Vec::new();
        for (key, objs) in &inner.objects {
            for (okey, obj) in objs {
                let refs = obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array);
                if refs.is_some_and(|r| {
                    r.iter()
                        .any(|o| o.get("uid").and_then(Value::as_str) == Some(uid))
                }) {
                    dependents.push((key.clone(), okey.clone(), obj.clone()));
                }
            }
        }
        let live: BTreeSet<String> = inner
            .objects
            .values()
            .flat_map(|m| m.values().map(|o| meta_str(o, "uid").to_string()))
            .collect();
        for (key, (ns, name), obj) in dependents {
            let Some(t) = inner.types.get(&key).cloned() else {
                continue;
            };
            let other_owner_alive = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|r| {
                    r.iter()
                        .filter_map(|o| o.get("uid").and_then(Value::as_str))
                        .any(|u| u != uid && live.contains(u))
                });
            if propagation == Propagation::Orphan || other_owner_alive {
                let mut updated = obj.clone();
                if let Some(refs) = updated
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|o| o.get("uid").and_then(Value::as_str) != Some(uid));
                }
                drop_empty_metadata(&mut updated);
                self.commit(inner, &t, updated, EventType::Modified, Some(obj));
                continue;
            }
            let has_finalizers = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            if has_finalizers {
                if obj.pointer("/metadata/deletionTimestamp").is_none() {
                    let mut marked = obj.clone();
                    mark_deleted(&mut marked);
                    self.commit(inner, &t, marked, EventType::Modified, Some(obj));
                }
            } else {
                self.remove(inner, &t, &ns, &name, None, Propagation::Background);
            }
        }
    }

    /// A JSON snapshot of every object, for `--state-file`.
    pub fn snapshot(&self) -> Result<Value, ApiError> {
        let inner = self.lock()?;
        let mut items = Vec::new();
        // CRDs first so that their kinds exist when the snapshot is restored.
        let crd_key = (
            "apiextensions.k8s.io".to_string(),
            "customresourcedefinitions".to_string(),
        );
        if let Some(m) = inner.objects.get(&crd_key) {
            items.extend(
                m.values()
                    .map(|o| json!({"group": crd_key.0, "plural": crd_key.1, "object": o})),
            );
        }
        for (key, objs) in inner.objects.iter().filter(|(k, _)| **k != crd_key) {
            items.extend(
                objs.values()
                    .map(|o| json!({"group": key.0, "plural": key.1, "object": o})),
            );
        }
        Ok(json!({"revision": inner.rev, "items": items}))
    }

    /// Restores a [`Store::snapshot`]; objects keep their uids and revisions.
    pub fn restore(&self, snapshot: &Value) -> Result<(), ApiError> {
        let mut inner = self.lock()?;
        let rev = snapshot
            .get("revision")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        for item in snapshot
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let group = item
                .get("group")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let plural = item
                .get("plural")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let Some(obj) = item.get("object").cloned() else {
                continue;
            };
            if group == "apiextensions.k8s.io" && plural == "customresourcedefinitions" {
                let served = types::from_crd(&obj)?;
                inner.types.insert(
                    (served.group.clone(), served.plural.clone()),
                    Arc::new(served),
                );
            }
            let okey = (
                meta_str(&obj, "namespace").to_string(),
                meta_str(&obj, "name").to_string(),
            );
            inner
                .objects
                .entry((group, plural))
                .or_default()
                .insert(okey, obj);
        }
        inner.rev = inner.rev.max(rev);
        inner.compacted = inner.rev;
        inner.history.clear();
        Ok(())
    }
}

impl Inner {
    fn type_of(&self, group: &str, plural: &str) -> Result<Arc<ResourceType>, ApiError> {
        self.types
            .get(&(group.to_string(), plural.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::no_route(&format!("{group}/{plural}")))
    }

    fn find(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<&Value> {
        self.find_key(&rt.group, &rt.plural, ns, name)
    }

    fn find_key(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(group.to_string(), plural.to_string()))
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
    }

    fn next_random(&mut self) -> u64 {
        // splitmix64: unique, well-spread identifiers without a `rand` dependency.
        self.uid_seed = self.uid_seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.uid_seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn new_uid(&mut self) -> String {
        let a = self.next_random();
        let b = self.next_random();
        let hex = format!("{a:016x}{b:016x}");
        format!(
            "{}-{}-4{}-a{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[13..16],
            &hex[17..20],
            &hex[20..32]
        )
    }

    fn random_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut n = self.next_random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }
}

fn check_type_meta(rt: &ResourceType, version: &str, obj: &Value) -> Result<(), ApiError> {
    let expected = rt.api_version(version);
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && av != expected
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({expected})"
        )));
    }
    if let Some(kind) = obj.get("kind").and_then(Value::as_str)
        && kind != rt.kind
    {
        if rt.custom {
            return Err(ApiError::invalid(
                &rt.group,
                kind,
                meta_str(obj, "name"),
                vec![Cause {
                    reason: "FieldValueInvalid",
                    field: "kind".into(),
                    message: format!("Invalid value: {kind:?}: must be {}", rt.kind),
                }],
            ));
        }
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            rt.kind
        )));
    }
    Ok(())
}

/// Checks a delete's resourceVersion precondition, when given, against the stored object.
fn check_delete_precondition(
    group: &str,
    plural: &str,
    name: &str,
    current: &Value,
    precondition_rv: Option<&str>,
) -> Result<(), ApiError> {
    if let Some(rv) = precondition_rv
        && rv != meta_str(current, "resourceVersion")
    {
        return Err(ApiError::conflict_message(
            group,
            plural,
            name,
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({}). The object might have been modified",
                super::error::qualified(plural, group),
                meta_str(current, "resourceVersion")
            ),
        ));
    }
    Ok(())
}

/// Rejects a request body that is not a JSON object.
fn require_object(obj: &Value) -> Result<(), ApiError> {
    if obj.is_object() {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "the body of the request was not a JSON object",
        ))
    }
}

/// Checks a namespaced create's namespace: matches the body, exists, is not terminating.
fn check_create_namespace(
    inner: &Inner,
    rt: &ResourceType,
    ns: &str,
    obj: &Value,
) -> Result<(), ApiError> {
    let body_ns = meta_str(obj, "namespace");
    if !body_ns.is_empty() && body_ns != ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if inner.find_key("", "namespaces", "", ns).is_none() {
        return Err(ApiError::not_found("", "namespaces", ns));
    }
    if inner
        .find_key("", "namespaces", "", ns)
        .is_some_and(|n| n.pointer("/metadata/deletionTimestamp").is_some())
    {
        return Err(ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                rt.plural
            ),
            details: Value::Null,
        });
    }
    Ok(())
}

/// The name of a new object: `metadata.name`, or `generateName` plus a random suffix.
fn create_name(inner: &mut Inner, rt: &ResourceType, obj: &Value) -> Result<String, ApiError> {
    let name = meta_str(obj, "name");
    if !name.is_empty() {
        return Ok(name.to_string());
    }
    let prefix = meta_str(obj, "generateName");
    if prefix.is_empty() {
        return Err(ApiError::invalid(
            &rt.group,
            &rt.kind,
            "",
            vec![Cause {
                reason: "FieldValueRequired",
                field: "metadata.name".into(),
                message: "Required value: name or generateName is required".into(),
            }],
        ));
    }
    Ok(format!("{prefix}{}", inner.random_suffix()))
}

/// Sets the server-owned metadata of a new object (name, namespace, uid, creation, generation).
fn init_server_metadata(
    inner: &mut Inner,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    obj: &mut Value,
) {
    let meta = meta_mut(obj);
    meta.insert("name".into(), Value::String(name.to_string()));
    if rt.namespaced {
        meta.insert("namespace".into(), Value::String(ns.to_string()));
    } else {
        meta.remove("namespace");
    }
    for f in [
        "uid",
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    ] {
        meta.remove(f);
    }
    meta.insert("uid".into(), Value::String(inner.new_uid()));
    meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    if rt.tracks_generation {
        meta.insert("generation".into(), json!(1));
    } else {
        meta.remove("generation");
    }
}

/// Defaults, prunes and validates an object, then labels it with the storage version (create and update).
fn validate_for_storage(
    rt: &ResourceType,
    version: &str,
    obj: &mut Value,
    opts: &WriteOpts,
) -> Result<Vec<String>, ApiError> {
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        default_crd(obj);
    }
    let warnings = validate_custom(rt, version, obj, opts)?;
    validate_meta(rt, obj)?;
    drop_empty_metadata(obj);
    if !rt.custom
        && rt.group.is_empty()
        && matches!(rt.plural.as_str(), "configmaps" | "secrets")
        && let Some(m) = obj.as_object_mut()
    {
        // Empty maps are `omitempty` in the typed objects, so the real server drops them.
        m.retain(|k, v| {
            !(matches!(k.as_str(), "data" | "binaryData" | "stringData")
                && v.as_object().is_some_and(Map::is_empty))
        });
    }
    obj["apiVersion"] = Value::String(rt.api_version(&rt.storage_version));
    obj["kind"] = Value::String(rt.kind.clone());
    Ok(warnings)
}

/// The defaults of a CustomResourceDefinition's spec: singular name, list kind, conversion.
fn default_crd(crd: &mut Value) {
    let Some(spec) = crd.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(names) = spec.get_mut("names").and_then(Value::as_object_mut)
        && let Some(kind) = names
            .get("kind")
            .and_then(Value::as_str)
            .map(str::to_string)
    {
        names
            .entry("singular")
            .or_insert_with(|| json!(kind.to_lowercase()));
        names
            .entry("listKind")
            .or_insert_with(|| json!(format!("{kind}List")));
    }
    spec.entry("conversion")
        .or_insert_with(|| json!({"strategy": "None"}));
}

/// Fills in what the server sets on a new namespace, service or CRD.
fn apply_kind_defaults(
    inner: &mut Inner,
    rt: &ResourceType,
    name: &str,
    obj: &mut Value,
) -> Result<(), ApiError> {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => default_namespace(name, obj),
        ("", "services") => default_service(inner, obj),
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            init_crd_status(inner, rt, name, obj)?;
        }
        _ => {}
    }
    Ok(())
}

/// A new namespace gets its name label, the `kubernetes` finalizer and phase Active.
fn default_namespace(name: &str, obj: &mut Value) {
    let meta = meta_mut(obj);
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    labels["kubernetes.io/metadata.name"] = Value::String(name.to_string());
    obj["spec"] = json!({"finalizers": ["kubernetes"]});
    obj["status"] = json!({"phase": "Active"});
}

/// A new service gets a cluster IP (unless set or ExternalName) and type ClusterIP when missing.
fn default_service(inner: &mut Inner, obj: &mut Value) {
    let no_ip = obj
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    let external = obj.pointer("/spec/type").and_then(Value::as_str) == Some("ExternalName");
    if no_ip && !external {
        let n = inner.next_ip;
        inner.next_ip += 1;
        let ip = format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff);
        obj["spec"]["clusterIP"] = Value::String(ip.clone());
        obj["spec"]["clusterIPs"] = json!([ip]);
    }
    if obj.pointer("/spec/type").is_none() && obj.get("spec").is_some_and(Value::is_object) {
        obj["spec"]["type"] = json!("ClusterIP");
    }
}

/// A new CRD: rejects names of built-in resources and sets the accepted/established status.
fn init_crd_status(
    inner: &Inner,
    rt: &ResourceType,
    name: &str,
    obj: &mut Value,
) -> Result<(), ApiError> {
    let served = types::from_crd(obj)?;
    let key = (served.group.clone(), served.plural.clone());
    if inner.types.get(&key).is_some_and(|t| !t.custom) {
        return Err(ApiError::invalid(
            &rt.group,
            &rt.kind,
            name,
            vec![Cause {
                reason: "FieldValueInvalid",
                field: "spec.names.plural".into(),
                message: "Invalid value: the name conflicts with a built-in resource".into(),
            }],
        ));
    }
    obj["status"] = crd_status(obj, &served);
    Ok(())
}

/// Records `fields` as the request's field manager's (operation `Update`; create and update).
fn set_update_manager(
    obj: &mut Value,
    rt: &ResourceType,
    version: &str,
    opts: &WriteOpts,
    fields: &BTreeSet<FieldPath>,
) {
    set_managed(
        obj,
        &opts.field_manager,
        "Update",
        &rt.api_version(version),
        opts.status,
        fields,
    );
}

/// The core/v1 view of an events.k8s.io/v1 Event.
fn core_event(e: &Value) -> Value {
    let first = e
        .get("deprecatedFirstTimestamp")
        .or_else(|| e.get("eventTime"))
        .cloned()
        .unwrap_or(Value::Null);
    let last = e
        .get("deprecatedLastTimestamp")
        .or_else(|| e.pointer("/series/lastObservedTime"))
        .or_else(|| e.get("eventTime"))
        .cloned()
        .unwrap_or(Value::Null);
    let count = e
        .pointer("/series/count")
        .or_else(|| e.get("deprecatedCount"))
        .cloned()
        .unwrap_or(json!(1));
    let mut meta = e.get("metadata").cloned().unwrap_or(json!({}));
    if let Some(m) = meta.as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": meta,
        "involvedObject": e.get("regarding").cloned().unwrap_or(json!({})),
        "related": e.get("related").cloned().unwrap_or(Value::Null),
        "reason": e.get("reason").cloned().unwrap_or(Value::Null),
        "message": e.get("note").cloned().unwrap_or(Value::Null),
        "type": e.get("type").cloned().unwrap_or(Value::Null),
        "action": e.get("action").cloned().unwrap_or(Value::Null),
        "source": {"component": e.get("reportingController").cloned().unwrap_or(Value::Null)},
        "reportingComponent": e.get("reportingController").cloned().unwrap_or(Value::Null),
        "reportingInstance": e.get("reportingInstance").cloned().unwrap_or(Value::Null),
        "eventTime": e.get("eventTime").cloned().unwrap_or(Value::Null),
        "firstTimestamp": first,
        "lastTimestamp": last,
        "count": count,
    })
}

/// Defaults, prunes and validates a custom object; returns `Warning` messages.
fn validate_custom(
    rt: &ResourceType,
    version: &str,
    obj: &mut Value,
    opts: &WriteOpts,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = rt
        .version(version)
        .and_then(|v| v.schema.as_ref())
        .filter(|_| rt.custom)
    else {
        return Ok(Vec::new());
    };
    let unknown = schema::default_and_prune_object(schema, obj);
    let name = meta_str(obj, "name").to_string();
    let mut warnings = Vec::new();
    if !unknown.is_empty() {
        match opts.field_validation {
            FieldValidation::Strict => {
                let fields: Vec<String> = unknown
                    .iter()
                    .map(|f| format!("unknown field \"{f}\""))
                    .collect();
                return Err(ApiError::bad_request(format!(
                    "{} in version \"{version}\" cannot be handled as a {}: strict decoding error: {}",
                    rt.kind,
                    rt.kind,
                    fields.join(", ")
                )));
            }
            FieldValidation::Warn => {
                warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")))
            }
            FieldValidation::Ignore => {}
        }
    }
    let mut causes = if opts.status {
        schema::validate_status(schema, obj)
    } else {
        schema::validate_object(schema, obj)
    };
    if causes.is_empty() {
        causes = schema::validate_cel(schema, obj);
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(&rt.group, &rt.kind, &name, causes));
    }
    Ok(warnings)
}

fn validate_meta(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    let name = meta_str(obj, "name");
    let mut causes = Vec::new();
    if !is_dns_subdomain(name) {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            field: "metadata.name".into(),
            message: format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            ),
        });
    }
    let annotations_size: usize = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    if annotations_size > 262_144 {
        causes.push(Cause {
            reason: "FieldValueTooLong",
            field: "metadata.annotations".into(),
            message: "Too long: must have at most 262144 bytes".into(),
        });
    }
    for (field, map) in [
        ("metadata.labels", "/metadata/labels"),
        ("metadata.annotations", "/metadata/annotations"),
    ] {
        if let Some(m) = obj.pointer(map).and_then(Value::as_object) {
            for (k, v) in m {
                if !v.is_string() {
                    causes.push(Cause {
                        reason: "FieldValueTypeInvalid",
                        field: format!("{field}.{k}"),
                        message: format!(
                            "Invalid value: {}: must be a string",
                            schema::render_value(v)
                        ),
                    });
                }
            }
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&rt.group, &rt.kind, name, causes))
    }
}

fn crd_status(crd: &Value, served: &ResourceType) -> Value {
    let now = now_rfc3339();
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let mut accepted = names.clone();
    if accepted.get("singular").is_none() {
        accepted["singular"] = Value::String(served.singular.clone());
    }
    if accepted.get("listKind").is_none() {
        accepted["listKind"] = Value::String(format!("{}List", served.kind));
    }
    json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
        "storedVersions": [served.storage_version],
    })
}

fn set_managed(
    obj: &mut Value,
    manager: &str,
    operation: &str,
    api_version: &str,
    status: bool,
    fields: &BTreeSet<FieldPath>,
) {
    let meta = meta_mut(obj);
    let mut entries: Vec<Value> = meta
        .get("managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let sub = if status { "status" } else { "" };
    entries.retain(|e| {
        !(e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some(operation)
            && e.get("subresource").and_then(Value::as_str).unwrap_or("") == sub)
    });
    if !fields.is_empty() {
        let mut entry = json!({
            "manager": manager,
            "operation": operation,
            "apiVersion": api_version,
            "time": now_rfc3339(),
            "fieldsType": "FieldsV1",
            "fieldsV1": patch::to_fields_v1(fields),
        });
        if status {
            entry["subresource"] = json!("status");
        }
        entries.push(entry);
    }
    meta.insert("managedFields".into(), Value::Array(entries));
}

fn managers(obj: &Value) -> Vec<(String, String, BTreeSet<FieldPath>)> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e.get("manager")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        e.get("operation")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        e.get("fieldsV1")
                            .map(patch::from_fields_v1)
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Removes `paths` from every manager except `keep` (ownership moved to `keep`).
fn take_ownership(obj: &mut Value, keep: &str, paths: &BTreeSet<FieldPath>) {
    let Some(entries) = obj
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for e in entries.iter_mut() {
        if e.get("manager").and_then(Value::as_str) == Some(keep) {
            continue;
        }
        let mut owned = e
            .get("fieldsV1")
            .map(patch::from_fields_v1)
            .unwrap_or_default();
        owned.retain(|p| !paths.iter().any(|q| patch::overlaps(p, q)));
        e["fieldsV1"] = patch::to_fields_v1(&owned);
    }
    entries.retain(|e| {
        e.get("fieldsV1")
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    });
}

/// Server-side apply merge: conflicts, removal of fields the manager stopped applying, merge.
fn apply_config(
    rt: &ResourceType,
    current: &Value,
    config: &Value,
    force: bool,
    opts: &WriteOpts,
) -> Result<(Value, BTreeSet<FieldPath>), ApiError> {
    let config = scope_apply_config(rt, config, opts);
    let fields = patch::leaf_paths(&config);
    let manager = opts.field_manager.as_str();
    let others = managers(current);
    let conflicts = apply_conflicts(current, &config, &fields, manager);
    if !conflicts.is_empty() && !force {
        return Err(apply_conflict_error(&conflicts));
    }
    let mut merged = current.clone();
    remove_unapplied(&mut merged, &others, manager, &fields);
    patch::apply_merge(&mut merged, &apply_body(&config));
    if force {
        let contested: BTreeSet<FieldPath> = conflicts.into_iter().map(|(_, p)| p).collect();
        take_ownership(&mut merged, manager, &contested);
    }
    set_managed(
        &mut merged,
        manager,
        "Apply",
        current["apiVersion"].as_str().unwrap_or(""),
        opts.status,
        &fields,
    );
    Ok((merged, fields))
}

/// Limits an apply configuration to what the request may set (status or not status).
fn scope_apply_config(rt: &ResourceType, config: &Value, opts: &WriteOpts) -> Value {
    let mut config = config.clone();
    if let Some(m) = config.as_object_mut() {
        if opts.status {
            m.retain(|k, _| matches!(k.as_str(), "status" | "apiVersion" | "kind" | "metadata"));
        } else if rt.version(&rt.storage_version).is_some_and(|v| v.status) {
            m.remove("status");
        }
    }
    config
}

/// The applied fields that would change a value owned by another manager: each with that
/// manager as conflict messages name it, sorted by manager and path, as the real server does.
fn apply_conflicts(
    current: &Value,
    config: &Value,
    fields: &BTreeSet<FieldPath>,
    manager: &str,
) -> Vec<(String, FieldPath)> {
    let entries: Vec<(String, BTreeSet<FieldPath>)> = current
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("manager").and_then(Value::as_str) != Some(manager))
        .map(|e| {
            let owned = e
                .get("fieldsV1")
                .map(patch::from_fields_v1)
                .unwrap_or_default();
            (manager_label(e), owned)
        })
        .collect();
    let mut conflicts: BTreeSet<(String, FieldPath)> = BTreeSet::new();
    for path in fields {
        let applied = patch::get_path(config, path);
        // An empty map sets nothing, so it cannot conflict.
        if applied
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
            || patch::get_path(current, path) == applied
        {
            continue;
        }
        for (label, owned) in &entries {
            if owned.iter().any(|o| patch::overlaps(o, path)) {
                conflicts.insert((label.clone(), path.clone()));
            }
        }
    }
    conflicts.into_iter().collect()
}

/// A field manager as conflict messages print it: `"name"`, plus `with subresource "status"`,
/// plus `using API_VERSION` for an Update manager.
fn manager_label(entry: &Value) -> String {
    let field = |k: &str| entry.get(k).and_then(Value::as_str).unwrap_or("");
    let mut label = format!("{:?}", field("manager"));
    if !field("subresource").is_empty() {
        label.push_str(&format!(" with subresource {:?}", field("subresource")));
    }
    if field("operation") == "Update" {
        label.push_str(&format!(" using {}", field("apiVersion")));
    }
    label
}

/// The 409 answer to an apply with conflicts and without `force`, worded as the real server's.
fn apply_conflict_error(conflicts: &[(String, FieldPath)]) -> ApiError {
    let causes: Vec<Cause> = conflicts
        .iter()
        .map(|(m, p)| Cause {
            reason: "FieldManagerConflict",
            field: patch::render_path(p),
            message: format!("conflict with {m}"),
        })
        .collect();
    let message = match conflicts {
        [(m, p)] => format!(
            "Apply failed with 1 conflict: conflict with {m}: {}",
            patch::render_path(p)
        ),
        _ => {
            let mut lines = Vec::new();
            let mut last: Option<&str> = None;
            for (m, p) in conflicts {
                if last != Some(m.as_str()) {
                    lines.push(format!("conflicts with {m}:"));
                    last = Some(m.as_str());
                }
                lines.push(format!("- {}", patch::render_path(p)));
            }
            format!(
                "Apply failed with {} conflicts: {}",
                conflicts.len(),
                lines.join("\n")
            )
        }
    };
    ApiError::apply_conflict(message, causes)
}

/// Removes the fields the manager applied before but no longer applies and nobody else owns.
fn remove_unapplied(
    merged: &mut Value,
    others: &[(String, String, BTreeSet<FieldPath>)],
    manager: &str,
    fields: &BTreeSet<FieldPath>,
) {
    let previously: BTreeSet<FieldPath> = others
        .iter()
        .filter(|(m, op, _)| m == manager && op == "Apply")
        .flat_map(|(_, _, f)| f.iter().cloned())
        .collect();
    for stale in previously.difference(fields) {
        let shared = others
            .iter()
            .filter(|(m, _, _)| m != manager)
            .any(|(_, _, owned)| owned.iter().any(|o| patch::overlaps(o, stale)));
        if !shared {
            patch::remove_path(merged, stale);
        }
    }
}

/// The configuration to merge: of metadata only labels, annotations, finalizers, owner references.
fn apply_body(config: &Value) -> Value {
    let mut body = config.clone();
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, _| {
            matches!(
                k.as_str(),
                "labels" | "annotations" | "finalizers" | "ownerReferences"
            )
        });
    }
    body
}

/// Builds the object to store for an update, or `None` when nothing changes.
fn prepare_update(
    rt: &ResourceType,
    version: &str,
    old: &Value,
    new: Value,
    opts: &WriteOpts,
    apply_fields: Option<BTreeSet<FieldPath>>,
) -> Result<(Option<Value>, Vec<String>), ApiError> {
    require_object(&new)?;
    check_type_meta(rt, version, &new)?;
    let name = check_update_target(rt, old, &new, apply_fields.is_some())?;
    let mut new = merge_status(rt, version, old, new, opts);
    carry_server_metadata(old, &name, &mut new);
    check_no_new_finalizers(rt, old, &new, &name)?;
    let warnings = validate_for_storage(rt, version, &mut new, opts)?;
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        refresh_crd_status(old, &mut new)?;
    }
    if unchanged(&new, old) && apply_fields.is_none() {
        return Ok((None, warnings));
    }
    bump_generation(rt, old, &mut new);
    if apply_fields.is_some() {
        // Re-applying the same configuration: nothing to store, keep the old timestamps.
        if unchanged(&new, old) && managers(&new) == managers(old) {
            return Ok((None, warnings));
        }
    } else {
        if !opts.field_manager.is_empty() {
            record_update_fields(rt, version, old, &mut new, opts);
        }
        if unchanged(&new, old) {
            return Ok((None, warnings));
        }
    }
    Ok((Some(new), warnings))
}

/// Rejects finalizers added to an object that is being deleted.
fn check_no_new_finalizers(
    rt: &ResourceType,
    old: &Value,
    new: &Value,
    name: &str,
) -> Result<(), ApiError> {
    if old.pointer("/metadata/deletionTimestamp").is_none() {
        return Ok(());
    }
    let before = finalizers(old);
    let added: Vec<String> = finalizers(new)
        .into_iter()
        .filter(|f| !before.contains(f))
        .map(|f| format!("{f:?}"))
        .collect();
    if added.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        &rt.group,
        &rt.kind,
        name,
        vec![Cause {
            reason: "FieldValueForbidden",
            field: "metadata.finalizers".into(),
            message: format!(
                "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                added.join(", ")
            ),
        }],
    ))
}

/// Checks an update's name and resourceVersion against the stored object; returns the name.
fn check_update_target(
    rt: &ResourceType,
    old: &Value,
    new: &Value,
    applied: bool,
) -> Result<String, ApiError> {
    let name = meta_str(old, "name").to_string();
    let body_name = meta_str(new, "name");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let body_rv = meta_str(new, "resourceVersion");
    if !body_rv.is_empty() {
        if body_rv != meta_str(old, "resourceVersion") {
            return Err(ApiError::conflict(&rt.group, &rt.plural, &name));
        }
    } else if rt.custom && !applied {
        // This check names the resource, not the kind, on the real server.
        return Err(ApiError::invalid(
            &rt.group,
            &rt.plural,
            &name,
            vec![Cause {
                reason: "FieldValueInvalid",
                field: "metadata.resourceVersion".into(),
                message: "Invalid value: 0: must be specified for an update".into(),
            }],
        ));
    }
    Ok(name)
}

/// Keeps only `.status` of a status write, or the stored `.status` for a main-resource write.
fn merge_status(
    rt: &ResourceType,
    version: &str,
    old: &Value,
    mut new: Value,
    opts: &WriteOpts,
) -> Value {
    let has_status = rt.version(version).is_some_and(|v| v.status);
    if opts.status {
        // Status writes change only `.status` (and nothing of metadata but the managers).
        let mut merged = old.clone();
        match new.get("status") {
            Some(s) => merged["status"] = s.clone(),
            None => {
                if let Some(m) = merged.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        return merged;
    }
    if has_status {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    new
}

/// Copies the server-owned metadata (uid, timestamps, generation, resourceVersion) from the stored object.
fn carry_server_metadata(old: &Value, name: &str, new: &mut Value) {
    let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
    let meta = meta_mut(new);
    meta.insert("name".into(), Value::String(name.to_string()));
    for f in [
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old_meta.get(f) {
            Some(v) => meta.insert(f.into(), v.clone()),
            None => meta.remove(f),
        };
    }
    if !meta.contains_key("managedFields")
        && let Some(mf) = old_meta.get("managedFields")
    {
        meta.insert("managedFields".into(), mf.clone());
    }
    meta.remove("resourceVersion");
    if let Some(rv) = old_meta.get("resourceVersion") {
        meta.insert("resourceVersion".into(), rv.clone());
    }
}

/// Recomputes an updated CRD's status, keeping the stored one when only times would differ.
fn refresh_crd_status(old: &Value, new: &mut Value) -> Result<(), ApiError> {
    let served = types::from_crd(new)?;
    new["status"] = crd_status(new, &served);
    if let Some(old_status) = old.get("status")
        && without_time(old_status) == without_time(&new["status"])
    {
        new["status"] = old_status.clone();
    }
    Ok(())
}

/// Is `new` the same object as `old`, ignoring managedFields and resourceVersion?
fn unchanged(new: &Value, old: &Value) -> bool {
    without_volatile(new) == without_volatile(old)
}

/// Increments `metadata.generation` when the spec (everything but metadata and status) changed.
fn bump_generation(rt: &ResourceType, old: &Value, new: &mut Value) {
    if rt.tracks_generation && spec_part(new) != spec_part(old) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        meta_mut(new).insert("generation".into(), json!(generation));
    }
}

/// Gives the request's manager the fields it changed (operation `Update`), taking them from others.
fn record_update_fields(
    rt: &ResourceType,
    version: &str,
    old: &Value,
    new: &mut Value,
    opts: &WriteOpts,
) {
    let (changed, removed) = patch::changed_paths(old, new);
    let mut owned: BTreeSet<FieldPath> = managers(old)
        .into_iter()
        .filter(|(m, op, _)| m == &opts.field_manager && op == "Update")
        .flat_map(|(_, _, f)| f)
        .collect();
    owned.extend(changed.iter().cloned());
    owned.retain(|p| !removed.contains(p));
    take_ownership(new, &opts.field_manager, &changed);
    set_update_manager(new, rt, version, opts, &owned);
}

fn without_time(status: &Value) -> Value {
    let mut s = status.clone();
    if let Some(conds) = s.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            if let Some(m) = c.as_object_mut() {
                m.remove("lastTransitionTime");
            }
        }
    }
    s
}
