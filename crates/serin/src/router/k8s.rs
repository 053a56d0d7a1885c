//! Kubernetes plumbing shared by the routers whose data plane is a custom resource: reading
//! objects, the guarded weight write (JSON Patch with `test` ops, retried on conflict), and
//! create-or-adopt for the objects Serin owns in workload mode.
//!
//! Objects are handled as JSON (`DynamicObject`), never round-tripped through typed structs:
//! a typed struct would drop every field it does not know, and Serin must leave the fields it
//! does not own exactly as they are.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective,
};
use kube::{Client, Resource};
use serde_json::{Map, Value, json};

use crate::arms::Weights;

use super::cache::ObjectCache;
use super::split::{Plan, Subject, plan, to_percent};
use super::{RouterError, WriteOutcome};

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "serin";

/// Attempts of one guarded write before [`RouterError::Conflict`].
pub const MAX_ATTEMPTS: usize = 3;

/// The API resource of a custom kind.
pub(crate) fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: format!("{group}/{version}"),
        kind: kind.to_string(),
        plural: plural.to_string(),
    }
}

/// Patch parameters: Serin's field manager and strict field validation, so that a field the
/// installed CRD does not know fails loudly instead of being pruned.
pub(crate) fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        field_validation: Some(ValidationDirective::Strict),
        ..PatchParams::default()
    }
}

/// Reads an object as JSON; `None` when it does not exist.
pub(crate) async fn get(
    api: &Api<DynamicObject>,
    subject: &Subject,
) -> Result<Option<Value>, RouterError> {
    let obj = api
        .get_opt(&subject.name)
        .await
        .map_err(|e| subject.kube("get", e))?;
    match obj {
        None => Ok(None),
        Some(o) => serde_json::to_value(o)
            .map(Some)
            .map_err(|e| subject.kube("decode", kube::Error::SerdeError(e))),
    }
}

/// One kind of routing object in one namespace: read from the API server or, where a read
/// may be a moment behind a hand edit, from the routers' [`ObjectCache`].
pub(crate) struct Objects<'a> {
    pub api: Api<DynamicObject>,
    pub resource: ApiResource,
    pub cache: &'a ObjectCache,
}

impl<'a> Objects<'a> {
    pub fn new(
        client: &Client,
        cache: &'a ObjectCache,
        resource: ApiResource,
        namespace: &str,
    ) -> Self {
        Objects {
            api: Api::namespaced_with(client.clone(), namespace, &resource),
            resource,
            cache,
        }
    }

    /// Reads the object from the API server (and keeps the cache as fresh).
    pub async fn get(&self, subject: &Subject) -> Result<Option<Value>, RouterError> {
        let obj = get(&self.api, subject).await?;
        if let Some(o) = &obj {
            self.cache.put(&self.resource, o);
        }
        Ok(obj)
    }

    /// The object as the cache holds it, else as the API server has it: for reads that
    /// decide nothing on their own (weights are written only after a fresh read).
    pub async fn get_cached(&self, subject: &Subject) -> Result<Option<Value>, RouterError> {
        match self
            .cache
            .get(&self.resource, &subject.namespace, &subject.name)
        {
            Some(obj) => Ok(Some(obj)),
            None => self.get(subject).await,
        }
    }
}

/// Creates an object with strict field validation (kube's `PostParams` cannot ask for it).
pub(crate) async fn create_strict(
    client: &Client,
    ar: &ApiResource,
    subject: &Subject,
    object: &Value,
) -> Result<(), kube::Error> {
    let path = DynamicObject::url_path(ar, Some(&subject.namespace));
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    let body = serde_json::to_vec(object).map_err(kube::Error::SerdeError)?;
    let mut req = kube::core::Request::new(path)
        .create(&pp, body)
        .map_err(kube::Error::BuildRequest)?;
    let uri = format!("{}&fieldValidation=Strict", req.uri());
    *req.uri_mut() = uri
        .parse()
        .map_err(|e| kube::Error::Service(format!("request URI {uri}: {e}").into()))?;
    client.request::<DynamicObject>(req).await.map(|_| ())
}

/// One weighted entry of a list (a weighted target, destination or backendRef).
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// JSON pointer to the entry object.
    pub pointer: String,
    /// The entry as read; the write tests that it is still exactly this.
    pub value: Value,
}

impl Entry {
    pub fn new(pointer: String, value: &Value) -> Self {
        Entry {
            pointer,
            value: value.clone(),
        }
    }

    /// The entry's relative weight; a missing or null weight counts as `default`.
    pub fn weight(&self, default: u64) -> u64 {
        self.value
            .get("weight")
            .and_then(Value::as_u64)
            .unwrap_or(default)
    }
}

/// The primary and canary entries of one route (or rule, or group).
#[derive(Clone, Debug)]
pub(crate) struct Pair {
    /// What the pair is, for messages: `route "x"`, `rule 0`.
    pub label: String,
    pub primary: Entry,
    pub canary: Entry,
}

/// Where the weights of a Canary are in an object: one or more pairs that carry the same
/// split (for example every Gloo route that splits between the two upstreams).
#[derive(Clone, Debug)]
pub(crate) struct Located {
    pub pairs: Vec<Pair>,
    /// Weight of an entry without one (Gateway API defaults to 1; the server fills it in).
    pub default_weight: u64,
}

impl Located {
    fn pair_weights(&self, subject: &Subject, pair: &Pair) -> Result<Weights, RouterError> {
        let (p, c) = (
            pair.primary.weight(self.default_weight),
            pair.canary.weight(self.default_weight),
        );
        to_percent(p, c).ok_or_else(|| {
            subject.unroutable(format!(
                "{}: both the primary and the canary have weight 0, so it routes no traffic; give the primary a weight",
                pair.label
            ))
        })
    }

    /// The current split. Pairs that disagree make the object unroutable.
    pub fn weights(&self, subject: &Subject) -> Result<Weights, RouterError> {
        let mut found: Option<(Weights, &str)> = None;
        for pair in &self.pairs {
            let w = self.pair_weights(subject, pair)?;
            match found {
                None => found = Some((w, &pair.label)),
                Some((f, label)) if f != w => {
                    return Err(subject.unroutable(format!(
                        "{label} sends {}% to the canary but {} sends {}%; make them equal",
                        f.canary(),
                        pair.label,
                        w.canary()
                    )));
                }
                Some(_) => {}
            }
        }
        found
            .map(|(w, _)| w)
            .ok_or_else(|| subject.unroutable("no route references the primary and the canary"))
    }

    /// The split as `set_weights` sees it: pairs that disagree count as changed by someone
    /// else (the first pair that does not hold `expected` is reported).
    fn weights_for_write(
        &self,
        subject: &Subject,
        expected: Option<Weights>,
        desired: Weights,
    ) -> Result<Weights, RouterError> {
        let all: Vec<Weights> = self
            .pairs
            .iter()
            .map(|p| self.pair_weights(subject, p))
            .collect::<Result<_, _>>()?;
        if all.iter().all(|w| *w == desired) {
            return Ok(desired);
        }
        match expected {
            // A mix of expected and desired (only a hand edit can make one) is finished by
            // the write; anything else was changed by someone else.
            Some(exp) => Ok(all
                .iter()
                .find(|w| **w != exp && **w != desired)
                .copied()
                .unwrap_or(exp)),
            None => Ok(all
                .iter()
                .find(|w| **w != desired)
                .copied()
                .unwrap_or(desired)),
        }
    }

    /// A JSON Patch that checks every entry is unchanged and then sets the new weights.
    fn patch(&self, desired: Weights) -> Result<json_patch::Patch, serde_json::Error> {
        let mut ops = Vec::new();
        for pair in &self.pairs {
            for (entry, weight) in [
                (&pair.primary, desired.primary()),
                (&pair.canary, desired.canary()),
            ] {
                ops.push(json!({"op": "test", "path": entry.pointer, "value": entry.value}));
                ops.push(json!({"op": "add", "path": format!("{}/weight", entry.pointer), "value": weight}));
            }
        }
        serde_json::from_value(Value::Array(ops))
    }

    /// True when `object` still holds every entry exactly as located.
    fn unchanged_in(&self, object: &Value) -> bool {
        self.pairs.iter().all(|p| {
            [&p.primary, &p.canary]
                .iter()
                .all(|e| object.pointer(&e.pointer) == Some(&e.value))
        })
    }
}

/// Reads an object (from the cache when it holds it) and locates the Canary's weights in it.
pub(crate) async fn read_weights(
    objects: &Objects<'_>,
    subject: &Subject,
    not_found_hint: &str,
    locate: impl Fn(&Value) -> Result<Located, RouterError>,
) -> Result<Weights, RouterError> {
    let obj = objects
        .get_cached(subject)
        .await?
        .ok_or_else(|| subject.not_found(not_found_hint))?;
    locate(&obj)?.weights(subject)
}

/// The guarded weight write: read, decide, JSON Patch with `test` ops on every entry it
/// changes, and on a conflict (409, or a failed `test`) start again from a fresh read, at
/// most [`MAX_ATTEMPTS`] times. The first read may be the cache's copy (see above); it only
/// ever leads to a patch, never to a decision. The patch changes both weights at once, so the object never
/// holds a split that does not sum to 100.
pub(crate) async fn write_weights(
    objects: &Objects<'_>,
    subject: &Subject,
    not_found_hint: &str,
    locate: impl Fn(&Value) -> Result<Located, RouterError>,
    expected: Option<Weights>,
    desired: Weights,
) -> Result<WriteOutcome, RouterError> {
    let api = &objects.api;
    // A first try on the cached copy, when there is one: its patch's `test` ops fail on a
    // stale copy, and any decision not to write is taken again on a fresh read.
    let mut cached = objects
        .cache
        .get(&objects.resource, &subject.namespace, &subject.name);
    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS {
        let copy = cached.take();
        let from_cache = copy.is_some();
        let obj = match copy {
            Some(o) => o,
            None => {
                attempt += 1;
                objects
                    .get(subject)
                    .await?
                    .ok_or_else(|| subject.not_found(not_found_hint))?
            }
        };
        let decided = locate(&obj).and_then(|located| {
            let found = located.weights_for_write(subject, expected, desired)?;
            Ok((plan(subject, found, expected, desired)?, located))
        });
        let located = match decided {
            Ok((Plan::Write, located)) => located,
            _ if from_cache => continue,
            Ok((Plan::Nothing, _)) => return Ok(WriteOutcome::Unchanged),
            Err(e) => return Err(e),
        };
        let patch = located
            .patch(desired)
            .map_err(|e| subject.kube("encode patch", kube::Error::SerdeError(e)))?;
        match api
            .patch(&subject.name, &patch_params(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(written) => {
                // The cache holds at least this write from now on.
                if let Ok(v) = serde_json::to_value(&written) {
                    objects.cache.put(&objects.resource, &v);
                }
                return Ok(WriteOutcome::Written);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(attempt, kind = subject.kind, name = %subject.name, "weight write conflicted; retrying");
            }
            Err(kube::Error::Api(s)) if s.code == 422 => {
                // A failed `test` op and a schema violation both answer 422: if the entries
                // are still as tested, the server rejected the new weights themselves.
                let now = objects.get(subject).await?;
                if now.as_ref().is_some_and(|o| located.unchanged_in(o)) {
                    return Err(subject.kube("patch", kube::Error::Api(s)));
                }
                tracing::debug!(attempt, kind = subject.kind, name = %subject.name, "weights moved under the patch; retrying");
            }
            Err(e) => return Err(subject.kube("patch", e)),
        }
    }
    Err(subject.conflict())
}

/// Sets `value` at a simple JSON pointer (object keys only), creating objects on the way.
fn set_at(root: &mut Value, pointer: &str, value: Value) {
    let mut cur = root;
    let keys: Vec<&str> = pointer.split('/').skip(1).collect();
    for (i, key) in keys.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        if i + 1 == keys.len() {
            map.insert((*key).to_string(), value);
            return;
        }
        cur = map
            .entry((*key).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// The Canary as the controlling owner of the objects Serin creates.
pub(crate) fn owner_of(canary: &crate::api::Canary) -> Result<OwnerReference, RouterError> {
    let mut owner = canary
        .controller_owner_ref(&())
        .ok_or_else(|| RouterError::Unroutable {
            kind: "Canary",
            namespace: canary.metadata.namespace.clone().unwrap_or_default(),
            name: canary.metadata.name.clone().unwrap_or_default(),
            reason: "the Canary has no uid; routers need the object as read from the API server"
                .to_string(),
        })?;
    // Deleting the Canary in the foreground waits for the objects it owns.
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

/// Creates `desired` if it is missing, or adopts the existing object: only the fields at the
/// pointers `owned` returns for the current object (and Serin's owner reference) are brought to the desired values, with a
/// JSON merge patch guarded by the object's resourceVersion; every other field stays. An
/// object controlled by something else is not adopted. Returns whether it wrote.
pub(crate) async fn ensure(
    client: &Client,
    ar: &ApiResource,
    subject: &Subject,
    desired: &Value,
    owned: &(dyn Fn(&Value) -> Vec<&'static str> + Sync),
    owner: &OwnerReference,
) -> Result<bool, RouterError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &subject.namespace, ar);
    let owner_json = serde_json::to_value(owner)
        .map_err(|e| subject.kube("encode", kube::Error::SerdeError(e)))?;
    for _ in 0..MAX_ATTEMPTS {
        let Some(current) = get(&api, subject).await? else {
            let mut obj = desired.clone();
            set_at(&mut obj, "/metadata/ownerReferences", json!([owner_json]));
            match create_strict(client, ar, subject, &obj).await {
                Ok(()) => return Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(subject.kube("create", e)),
            }
        };
        let refs: Vec<Value> = current
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(other) = refs.iter().find(|r| {
            r.get("controller").and_then(Value::as_bool) == Some(true)
                && r.get("uid").and_then(Value::as_str) != Some(owner.uid.as_str())
        }) {
            return Err(subject.unroutable(format!(
                "it is controlled by {} {}; Serin adopts only objects without a controller. Delete it or name another object",
                other.get("kind").and_then(Value::as_str).unwrap_or("?"),
                other.get("name").and_then(Value::as_str).unwrap_or("?"),
            )));
        }
        let mut patch = json!({});
        for ptr in owned(&current) {
            let want = desired.pointer(ptr);
            if want != current.pointer(ptr) {
                set_at(&mut patch, ptr, want.cloned().unwrap_or(Value::Null));
            }
        }
        let ours = refs
            .iter()
            .find(|r| r.get("uid").and_then(Value::as_str) == Some(owner.uid.as_str()));
        if ours != Some(&owner_json) {
            let mut new_refs: Vec<Value> = refs
                .iter()
                .filter(|r| r.get("uid").and_then(Value::as_str) != Some(owner.uid.as_str()))
                .cloned()
                .collect();
            new_refs.push(owner_json.clone());
            set_at(
                &mut patch,
                "/metadata/ownerReferences",
                Value::Array(new_refs),
            );
        }
        if patch.as_object().is_some_and(Map::is_empty) {
            return Ok(false);
        }
        let rv = current
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null);
        set_at(&mut patch, "/metadata/resourceVersion", rv);
        match api
            .patch(&subject.name, &patch_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(subject.kube("patch", e)),
        }
    }
    Err(subject.conflict())
}

/// Removes the ownerReference to the object with `uid` from `namespace/name` (of resource
/// `ar`), keeping every other field: a merge patch guarded by the resourceVersion.
/// Returns whether it wrote; a missing object is nothing to release.
pub async fn release_owner(
    client: &Client,
    ar: &ApiResource,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<bool, kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, ar);
    for _ in 0..MAX_ATTEMPTS {
        let Some(current) = api.get_opt(name).await? else {
            return Ok(false);
        };
        let refs = current
            .metadata
            .owner_references
            .clone()
            .unwrap_or_default();
        if !refs.iter().any(|r| r.uid == uid) {
            return Ok(false);
        }
        let rest: Vec<&OwnerReference> = refs.iter().filter(|r| r.uid != uid).collect();
        let patch = json!({"metadata": {
            "ownerReferences": rest,
            "resourceVersion": current.metadata.resource_version,
        }});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(kube::Error::Api(
        kube::core::Status::failure(
            &format!("{namespace}/{name} kept changing while Serin released it"),
            "Conflict",
        )
        .with_code(409)
        .boxed(),
    ))
}

/// The string at `pointer`, or "".
pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// What a weighted list holds for the Canary.
pub(crate) enum Scan {
    /// Exactly one primary and one canary entry; every other entry has weight 0.
    Pair(Pair),
    /// The primary or the canary (or both) is not in the list.
    Missing { primary: bool, canary: bool },
}

/// Looks for the primary and canary entries in one weighted list (Gloo destinations,
/// HTTPRoute backendRefs). Other entries are tolerated only with weight 0: they receive no
/// traffic, so the percentages Serin writes stay exact.
pub(crate) fn scan_list(
    subject: &Subject,
    label: &str,
    base: &str,
    list: &[Value],
    default_weight: u64,
    arm_of: impl Fn(&Value) -> Option<Arm>,
    describe: impl Fn(&Value) -> String,
) -> Result<Scan, RouterError> {
    let mut primary = Vec::new();
    let mut canary = Vec::new();
    let mut others = Vec::new();
    for (i, v) in list.iter().enumerate() {
        match arm_of(v) {
            Some(Arm::Primary) => primary.push(i),
            Some(Arm::Canary) => canary.push(i),
            None => others.push(i),
        }
    }
    if primary.len() > 1 || canary.len() > 1 {
        return Err(subject.unroutable(format!(
            "{label} lists the primary {} times and the canary {} times; each must appear once",
            primary.len(),
            canary.len()
        )));
    }
    let (Some(&p), Some(&c)) = (primary.first(), canary.first()) else {
        return Ok(Scan::Missing {
            primary: primary.is_empty(),
            canary: canary.is_empty(),
        });
    };
    let busy: Vec<String> = others
        .iter()
        .filter(|&&i| Entry::new(String::new(), &list[i]).weight(default_weight) > 0)
        .map(|&i| describe(&list[i]))
        .collect();
    if !busy.is_empty() {
        return Err(subject.unroutable(format!(
            "{label} also sends traffic to {busy:?}, which Serin does not know; remove them or set their weight to 0"
        )));
    }
    Ok(Scan::Pair(Pair {
        label: label.to_string(),
        primary: Entry::new(format!("{base}/{p}"), &list[p]),
        canary: Entry::new(format!("{base}/{c}"), &list[c]),
    }))
}

/// Which arm an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arm {
    Primary,
    Canary,
}
