//! Patch formats and field ownership.
//!
//! * JSON merge patch (RFC 7386) and JSON patch (RFC 6902) use the `json-patch` crate.
//! * Strategic merge patch knows only the common merge keys of built-in types (see
//!   [`merge_key`]); other lists are replaced, as for types without patch metadata.
//! * Server-side apply is an approximation: field sets are leaf paths with lists treated as
//!   atomic, ownership follows the applied fields, and conflicts are fields whose value an
//!   applier would change while another manager owns them.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A field path from the object root: `["spec", "replicas"]`.
pub type FieldPath = Vec<String>;

/// The merge key of a list, chosen by its field name and where it sits.
fn merge_key(path: &[String], field: &str) -> Option<&'static str> {
    let in_container = path.iter().any(|p| p.ends_with("ontainers"));
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => Some("name"),
        "ports" if in_container => Some("containerPort"),
        "ports" => Some("port"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "conditions" => Some("type"),
        "ownerReferences" => Some("uid"),
        "hostAliases" => Some("ip"),
        _ => None,
    }
}

/// Primitive lists whose strategy is `merge` (union) rather than replace.
fn merges_primitives(path: &[String], field: &str) -> bool {
    field == "finalizers" && path.last().map(String::as_str) == Some("metadata")
}

/// Applies a strategic merge patch to `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    smp(target, patch, &mut Vec::new());
}

fn smp(target: &mut Value, patch: &Value, path: &mut Vec<String>) {
    let Some(pmap) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if pmap.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        if let Some(m) = replaced.as_object_mut() {
            m.remove("$patch");
        }
        *target = replaced;
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(tmap) = target.as_object_mut() else {
        return;
    };
    for (key, pval) in pmap {
        if key.starts_with("$setElementOrder/") || key == "$retainKeys" || key == "$patch" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (tmap.get_mut(field), pval.as_array())
            {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if pval.is_null() {
            tmap.remove(key);
            continue;
        }
        match (tmap.get_mut(key), pval) {
            (Some(Value::Array(tlist)), Value::Array(plist)) => {
                if let Some(mk) = merge_key(path, key) {
                    path.push(key.clone());
                    merge_keyed_list(tlist, plist, mk, path);
                    path.pop();
                } else if merges_primitives(path, key) {
                    for v in plist {
                        if !tlist.contains(v) {
                            tlist.push(v.clone());
                        }
                    }
                } else {
                    *tlist = plist.clone();
                }
            }
            (Some(tval @ Value::Object(_)), Value::Object(_)) => {
                path.push(key.clone());
                smp(tval, pval, path);
                path.pop();
            }
            _ => {
                let mut fresh = Value::Null;
                path.push(key.clone());
                smp(&mut fresh, pval, path);
                path.pop();
                if let Value::Array(items) = &mut fresh {
                    items.retain(|i| i.get("$patch").is_none());
                }
                tmap.insert(key.clone(), strip_directives(fresh));
            }
        }
    }
}

fn strip_directives(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.retain(|k, _| !k.starts_with('$'));
        for child in m.values_mut() {
            *child = strip_directives(std::mem::take(child));
        }
    } else if let Some(a) = v.as_array_mut() {
        for child in a.iter_mut() {
            *child = strip_directives(std::mem::take(child));
        }
    }
    v
}

fn merge_keyed_list(target: &mut Vec<Value>, patch: &[Value], key: &str, path: &mut Vec<String>) {
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace") && p.get(key).is_none())
    {
        *target = patch
            .iter()
            .filter(|p| p.get("$patch").is_none())
            .cloned()
            .map(strip_directives)
            .collect();
        return;
    }
    for p in patch {
        let Some(k) = p.get(key) else {
            target.push(strip_directives(p.clone()));
            continue;
        };
        let pos = target.iter().position(|t| t.get(key) == Some(k));
        if p.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(pos) = pos {
                target.remove(pos);
            }
            continue;
        }
        match pos {
            Some(pos) => smp(&mut target[pos], p, path),
            None => target.push(strip_directives(p.clone())),
        }
    }
}

/// Metadata fields that are part of a manager's field set.
const OWNED_METADATA: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

/// Leaf paths of an object as a field manager would own them (lists are atomic).
pub fn leaf_paths(obj: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    if let Some(map) = obj.as_object() {
        for (k, v) in map {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    if let Some(meta) = v.as_object() {
                        for f in OWNED_METADATA {
                            if let Some(fv) = meta.get(*f) {
                                collect(
                                    fv,
                                    &mut vec!["metadata".to_string(), f.to_string()],
                                    &mut out,
                                );
                            }
                        }
                    }
                }
                _ => collect(v, &mut vec![k.clone()], &mut out),
            }
        }
    }
    out
}

fn collect(v: &Value, path: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(k.clone());
                collect(child, path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at a field path, if any.
pub fn get_path<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |v, k| v.get(k))
}

/// Removes the value at a field path and any maps left empty above it.
pub fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = &mut *obj;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
    for depth in (1..parents.len() + 1).rev() {
        let prefix = &path[..depth];
        let empty = get_path(obj, prefix)
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty);
        if !empty || (prefix.len() == 1 && prefix[0] == "metadata") {
            break;
        }
        let (l, p) = prefix.split_at(depth - 1);
        let mut cur = &mut *obj;
        for k in l {
            match cur.get_mut(k) {
                Some(next) => cur = next,
                None => return,
            }
        }
        if let Some(m) = cur.as_object_mut() {
            m.remove(&p[0]);
        }
    }
}

/// Deep-merges an applied configuration into an object: maps merge, everything else replaces.
pub fn apply_merge(target: &mut Value, config: &Value) {
    match (target.as_object_mut(), config.as_object()) {
        (Some(t), Some(c)) => {
            for (k, v) in c {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        apply_merge(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *target = config.clone(),
    }
}

/// Paths whose values differ between two objects (added, changed or removed leaves).
pub fn changed_paths(old: &Value, new: &Value) -> (BTreeSet<FieldPath>, BTreeSet<FieldPath>) {
    let old_leaves = leaf_paths(old);
    let new_leaves = leaf_paths(new);
    let changed = new_leaves
        .iter()
        .filter(|p| get_path(old, p) != get_path(new, p))
        .cloned()
        .collect();
    let removed = old_leaves.difference(&new_leaves).cloned().collect();
    (changed, removed)
}

/// Encodes a field set as `fieldsV1`.
pub fn to_fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in paths {
        let mut cur = &mut root;
        for seg in path {
            let entry = cur.entry(format!("f:{seg}")).or_insert_with(|| json!({}));
            match entry.as_object_mut() {
                Some(m) => cur = m,
                None => break,
            }
        }
    }
    Value::Object(root)
}

/// Decodes `fieldsV1` into leaf paths (only `f:` entries; `.` and `k:`/`v:` entries end a path).
pub fn from_fields_v1(fields: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
        let children: Vec<(&String, &Value)> = v
            .as_object()
            .map(|m| m.iter().filter(|(k, _)| k.starts_with("f:")).collect())
            .unwrap_or_default();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, child) in children {
            path.push(k[2..].to_string());
            walk(child, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    walk(fields, &mut Vec::new(), &mut out);
    out
}

/// True when `a` is `b` or lies inside it (or the other way round).
pub fn overlaps(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// Renders a path like the server's conflict messages: `.spec.replicas`.
pub fn render_path(path: &[String]) -> String {
    path.iter().map(|s| format!(".{s}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Containers merge by name and env by name; other lists are replaced.
    #[test]
    fn strategic_merge_by_name() {
        let mut dep = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}]}}}});
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]}]}}}});
        strategic_merge(&mut dep, &patch);
        assert_eq!(
            dep,
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "b", "image": "b:1"}]}}}})
        );
    }

    /// A `$patch: delete` element removes the keyed entry.
    #[test]
    fn strategic_merge_delete_directive() {
        let mut obj = json!({"spec": {"volumes": [{"name": "a"}, {"name": "b"}]}});
        strategic_merge(
            &mut obj,
            &json!({"spec": {"volumes": [{"name": "a", "$patch": "delete"}]}}),
        );
        assert_eq!(obj, json!({"spec": {"volumes": [{"name": "b"}]}}));
    }

    /// Field sets round-trip through the fieldsV1 encoding.
    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({"metadata": {"name": "x", "labels": {"a": "1"}}, "spec": {"r": 1, "t": {"u": [1]}}});
        let paths = leaf_paths(&obj);
        assert_eq!(from_fields_v1(&to_fields_v1(&paths)), paths);
        assert_eq!(paths.len(), 3);
    }
}
