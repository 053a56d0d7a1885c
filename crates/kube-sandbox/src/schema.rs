//! Structural-schema handling for custom resources: defaulting, pruning and validation.
//!
//! This follows what `apiextensions-apiserver` does with a CRD's `openAPIV3Schema`, in the
//! same order: drop `null`s that the schema does not allow, apply `default`s, prune unknown
//! fields (collecting their paths for `fieldValidation=Strict|Warn`), then validate. Error
//! messages copy the real server's wording (kube-openapi's `validate` package converted to
//! `field.Error`s), e.g. `spec.x: Invalid value: 101: spec.x in body should be less than or
//! equal to 100`.
//!
//! `x-kubernetes-validations` (CEL) rules are evaluated by [`validate_cel`] with the
//! `kube-cel` crate (as on create: no `oldSelf`). It does not check
//! that a schema is structural, and checks only the string formats listed in [`check_format`].

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use serde_json::{Map, Value};

use super::error::Cause;

/// ObjectMeta fields that survive pruning of `metadata`.
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// Appends `.key` to a field path.
pub fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

/// Defaults and prunes a whole custom object in place against its version's schema.
///
/// Returns the paths of pruned (unknown) fields, e.g. `spec.foo`.
pub fn default_and_prune_object(schema: &Value, obj: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    let Some(map) = obj.as_object_mut() else {
        return unknown;
    };
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        let keys: Vec<String> = meta.keys().cloned().collect();
        for key in keys {
            if !OBJECT_META_FIELDS.contains(&key.as_str()) {
                meta.remove(&key);
                unknown.push(child("metadata", &key));
            }
        }
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&key)) {
            Some(sub) => {
                if let Some(value) = map.get_mut(&key) {
                    if value.is_null() && !flag(sub, "nullable") {
                        map.remove(&key);
                    } else {
                        walk(sub, value, &key, &mut unknown);
                    }
                }
            }
            None if preserve => {}
            None => {
                map.remove(&key);
                unknown.push(key);
            }
        }
    }
    apply_defaults(schema, map, "", &mut unknown);
    unknown
}

fn apply_defaults(
    schema: &Value,
    map: &mut Map<String, Value>,
    path: &str,
    unknown: &mut Vec<String>,
) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (key, sub) in props {
        if map.contains_key(key)
            || (path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"))
        {
            continue;
        }
        if let Some(default) = sub.get("default") {
            let mut value = default.clone();
            walk(sub, &mut value, &child(path, key), unknown);
            map.insert(key.clone(), value);
        }
    }
}

/// Drops disallowed nulls, applies defaults and prunes unknown fields below `path`.
fn walk(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = flag(schema, "x-kubernetes-embedded-resource");
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let sub = props.and_then(|p| p.get(&key)).or(additional);
                match sub {
                    Some(sub) => {
                        if let Some(v) = map.get_mut(&key) {
                            if v.is_null() && !flag(sub, "nullable") {
                                map.remove(&key);
                            } else {
                                walk(sub, v, &child(path, &key), unknown);
                            }
                        }
                    }
                    None => {
                        let keep = preserve
                            || schema.get("additionalProperties") == Some(&Value::Bool(true))
                            || (embedded
                                && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"));
                        if !keep {
                            map.remove(&key);
                            unknown.push(child(path, &key));
                        }
                    }
                }
            }
            apply_defaults(schema, map, path, unknown);
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item_schema, item, &index(path, i), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Validates a defaulted, pruned custom object; `apiVersion`, `kind` and `metadata` are
/// checked elsewhere.
pub fn validate_object(schema: &Value, obj: &Value) -> Vec<Cause> {
    let mut errs = Vec::new();
    let Some(map) = obj.as_object() else {
        return errs;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    for (key, value) in map {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(sub) = props.and_then(|p| p.get(key)) {
            validate(sub, value, key, &mut errs);
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errs.push(required_cause(&child("", r)));
            }
        }
    }
    errs
}

/// Validates only `.status` of a custom object, as a write to the status subresource is
/// validated: paths in the messages start below `status` (`count in body ...`), while each
/// cause's field is the full path (`status.count`).
pub fn validate_status(schema: &Value, obj: &Value) -> Vec<Cause> {
    let (Some(sub), Some(status)) = (schema.pointer("/properties/status"), obj.get("status"))
    else {
        return Vec::new();
    };
    let mut errs = Vec::new();
    validate(sub, status, "", &mut errs);
    for e in &mut errs {
        e.field = if e.field.is_empty() {
            "status".to_string()
        } else {
            child("status", &e.field)
        };
    }
    errs
}

fn required_cause(path: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        field: path.to_string(),
        message: "Required value".to_string(),
    }
}

/// Evaluates the schema's `x-kubernetes-validations` (CEL) rules, as the API server does
/// after structural validation. Rules are evaluated as on create (transition rules that
/// use `oldSelf` do not run). A rule this build cannot compile or evaluate (a CEL function
/// the `kube-cel` crate lacks) is skipped with a warning rather than rejecting the object.
pub fn validate_cel(schema: &Value, obj: &Value) -> Vec<Cause> {
    use kube::core::cel::{ErrorKind, Validator};
    thread_local! {
        static VALIDATOR: Validator = Validator::new();
    }
    let Err(errors) = VALIDATOR.with(|v| v.validate(schema, obj, None)) else {
        return Vec::new();
    };
    let mut causes = Vec::new();
    for e in errors.into_vec() {
        match e.kind {
            ErrorKind::ValidationFailure
            | ErrorKind::InvalidResult
            | ErrorKind::EvaluationError => {
                let value = lookup(obj, &e.field_path).unwrap_or(&Value::Null);
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    field: e.field_path.clone(),
                    message: format!("Invalid value: {}: {}", render_value(value), e.message),
                });
            }
            _ => {
                tracing::warn!(rule = %e.rule, error = %e.message, "CEL rule skipped: not evaluable here")
            }
        }
    }
    causes
}

/// The value at a field path in the API server's notation (`spec.rules[0].name`).
fn lookup<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        for idx in indices.split('[').filter(|x| !x.is_empty()) {
            let idx = idx.trim_end_matches(']');
            cur = match idx.parse::<usize>() {
                Ok(n) => cur.get(n)?,
                Err(_) => cur.get(idx.trim_matches('"'))?,
            };
        }
    }
    Some(cur)
}

/// Renders a value the way Go's `field.Error` prints it.
pub fn render_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "\"null\"".to_string(),
        Value::Object(_) => "\"object\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
        other => other.to_string(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn invalid(errs: &mut Vec<Cause>, path: &str, value: &Value, detail: String) {
    errs.push(Cause {
        reason: "FieldValueInvalid",
        field: path.to_string(),
        message: format!(
            "Invalid value: {}: {path} in body {detail}",
            render_value(value)
        ),
    });
}

fn type_ok(expected: &str, value: &Value) -> bool {
    let actual = type_name(value);
    match expected {
        "number" => matches!(actual, "number" | "integer"),
        other => other == actual,
    }
}

fn num(schema: &Value, key: &str) -> Option<f64> {
    schema.get(key).and_then(Value::as_f64)
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn regex_matches(pattern: &str, s: &str) -> bool {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<regex::Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let Ok(mut cache) = cache.lock() else {
        return true;
    };
    let re = cache
        .entry(pattern.to_string())
        .or_insert_with(|| regex::Regex::new(pattern).ok());
    // A pattern Rust's regex cannot compile (lookaround) is skipped rather than rejecting data.
    re.as_ref().is_none_or(|re| re.is_match(s))
}

/// Checks the string formats the real server checks most often.
fn check_format(format: &str, s: &str) -> bool {
    match format {
        "date-time" => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
        "date" => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
        "uuid" => {
            let parts: Vec<&str> = s.split('-').collect();
            parts.len() == 5
                && [8, 4, 4, 4, 12]
                    .iter()
                    .zip(&parts)
                    .all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_hexdigit()))
        }
        "ipv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
        _ => true,
    }
}

/// Validates `value` at `path` against `schema`, appending causes.
pub fn validate(schema: &Value, value: &Value, path: &str, errs: &mut Vec<Cause>) {
    if value.is_null() {
        if flag(schema, "nullable") {
            return;
        }
        if let Some(t) = schema.get("type").and_then(Value::as_str) {
            errs.push(Cause {
                reason: "FieldValueTypeInvalid",
                field: path.to_string(),
                message: format!(
                    "Invalid value: \"null\": {path} in body must be of type {t}: \"null\""
                ),
            });
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !matches!(type_name(value), "integer" | "string") {
            errs.push(Cause {
                reason: "FieldValueTypeInvalid",
                field: path.to_string(),
                // The real server prints the value's type where the value would be.
                message: format!(
                    "Invalid value: {:?}: {path} in body must be of type integer,string: {:?}",
                    type_name(value),
                    type_name(value)
                ),
            });
            return;
        }
    } else if let Some(t) = schema.get("type").and_then(Value::as_str)
        && !type_ok(t, value)
    {
        errs.push(Cause {
            reason: "FieldValueTypeInvalid",
            field: path.to_string(),
            message: format!(
                "Invalid value: {:?}: {path} in body must be of type {t}: {:?}",
                type_name(value),
                type_name(value)
            ),
        });
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let supported: Vec<String> = options.iter().map(render_value).collect();
        errs.push(Cause {
            reason: "FieldValueNotSupported",
            field: path.to_string(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                render_value(value),
                supported.join(", ")
            ),
        });
    }
    match value {
        Value::String(s) => validate_string(schema, value, s, path, errs),
        Value::Number(n) => validate_number(schema, value, n.as_f64().unwrap_or(0.0), path, errs),
        Value::Array(items) => validate_array(schema, value, items, path, errs),
        Value::Object(map) => validate_map(schema, value, map, path, errs),
        _ => {}
    }
    validate_combinators(schema, value, path, errs);
}

fn validate_string(schema: &Value, value: &Value, s: &str, path: &str, errs: &mut Vec<Cause>) {
    let len = s.chars().count() as f64;
    if let Some(max) = num(schema, "maxLength")
        && len > max
    {
        errs.push(Cause {
            reason: "FieldValueTooLong",
            field: path.to_string(),
            message: format!("Too long: may not be more than {} bytes", fmt_num(max)),
        });
    }
    if let Some(min) = num(schema, "minLength")
        && len < min
    {
        invalid(
            errs,
            path,
            value,
            format!("should be at least {} chars long", fmt_num(min)),
        );
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
        && !regex_matches(pattern, s)
    {
        invalid(errs, path, value, format!("should match '{pattern}'"));
    }
    if let Some(format) = schema.get("format").and_then(Value::as_str)
        && !check_format(format, s)
    {
        invalid(
            errs,
            path,
            value,
            format!("must be of type {format}: {s:?}"),
        );
    }
}

fn validate_number(schema: &Value, value: &Value, n: f64, path: &str, errs: &mut Vec<Cause>) {
    if let Some(max) = num(schema, "maximum") {
        if flag(schema, "exclusiveMaximum") && n >= max {
            invalid(
                errs,
                path,
                value,
                format!("should be less than {}", fmt_num(max)),
            );
        } else if n > max {
            invalid(
                errs,
                path,
                value,
                format!("should be less than or equal to {}", fmt_num(max)),
            );
        }
    }
    if let Some(min) = num(schema, "minimum") {
        if flag(schema, "exclusiveMinimum") && n <= min {
            invalid(
                errs,
                path,
                value,
                format!("should be greater than {}", fmt_num(min)),
            );
        } else if n < min {
            invalid(
                errs,
                path,
                value,
                format!("should be greater than or equal to {}", fmt_num(min)),
            );
        }
    }
    if let Some(m) = num(schema, "multipleOf")
        && m != 0.0
        && (n / m).fract() != 0.0
    {
        invalid(
            errs,
            path,
            value,
            format!("should be a multiple of {}", fmt_num(m)),
        );
    }
}

fn validate_array(
    schema: &Value,
    value: &Value,
    items: &[Value],
    path: &str,
    errs: &mut Vec<Cause>,
) {
    let len = items.len() as f64;
    if let Some(max) = num(schema, "maxItems")
        && len > max
    {
        errs.push(Cause {
            reason: "FieldValueTooMany",
            field: path.to_string(),
            message: format!(
                "Too many: {}: must have at most {} items",
                items.len(),
                fmt_num(max)
            ),
        });
    }
    if let Some(min) = num(schema, "minItems")
        && len < min
    {
        invalid(
            errs,
            path,
            value,
            format!("should have at least {} items", fmt_num(min)),
        );
    }
    let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
    if flag(schema, "uniqueItems") || list_type == Some("set") {
        for (i, item) in items.iter().enumerate() {
            if items[..i].contains(item) {
                errs.push(Cause {
                    reason: "FieldValueDuplicate",
                    field: index(path, i),
                    message: format!("Duplicate value: {}", render_value(item)),
                });
            }
        }
    }
    if list_type == Some("map")
        && let Some(keys) = schema
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
    {
        let key_of = |item: &Value| -> Vec<Value> {
            keys.iter()
                .filter_map(Value::as_str)
                .map(|k| item.get(k).cloned().unwrap_or(Value::Null))
                .collect()
        };
        let all: Vec<Vec<Value>> = items.iter().map(key_of).collect();
        for (i, k) in all.iter().enumerate() {
            if all[..i].contains(k) {
                let rendered: Vec<String> = keys
                    .iter()
                    .filter_map(Value::as_str)
                    .zip(k)
                    .map(|(name, v)| format!("\"{name}\":{v}"))
                    .collect();
                errs.push(Cause {
                    reason: "FieldValueDuplicate",
                    field: index(path, i),
                    message: format!(
                        "Duplicate value: map[string]interface {{}}{{{}}}",
                        rendered.join(", ")
                    ),
                });
            }
        }
    }
    if let Some(item_schema) = schema.get("items").filter(|s| s.is_object()) {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &index(path, i), errs);
        }
    }
}

fn validate_map(
    schema: &Value,
    value: &Value,
    map: &Map<String, Value>,
    path: &str,
    errs: &mut Vec<Cause>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errs.push(required_cause(&child(path, r)));
            }
        }
    }
    let len = map.len() as f64;
    if let Some(max) = num(schema, "maxProperties")
        && len > max
    {
        errs.push(Cause {
            reason: "FieldValueTooMany",
            field: path.to_string(),
            message: format!(
                "Too many: {}: must have at most {} items",
                map.len(),
                fmt_num(max)
            ),
        });
    }
    if let Some(min) = num(schema, "minProperties")
        && len < min
    {
        invalid(
            errs,
            path,
            value,
            format!("should have at least {} properties", fmt_num(min)),
        );
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (key, v) in map {
        if let Some(sub) = props.and_then(|p| p.get(key)).or(additional) {
            validate(sub, v, &child(path, key), errs);
        }
    }
}

fn validate_combinators(schema: &Value, value: &Value, path: &str, errs: &mut Vec<Cause>) {
    let passes = |sub: &Value| {
        let mut tmp = Vec::new();
        validate(sub, value, path, &mut tmp);
        tmp.is_empty()
    };
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for sub in all {
            validate(sub, value, path, errs);
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
        && !any.iter().any(passes)
    {
        invalid(
            errs,
            path,
            value,
            "must validate at least one schema (anyOf)".to_string(),
        );
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array)
        && one.iter().filter(|s| passes(s)).count() != 1
    {
        invalid(
            errs,
            path,
            value,
            "must validate one and only one schema (oneOf)".to_string(),
        );
    }
    if let Some(not) = schema.get("not")
        && not.is_object()
        && passes(not)
    {
        invalid(
            errs,
            path,
            value,
            "must not validate the schema (not)".to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A value above `maximum` yields the real server's message with the full field path.
    #[test]
    fn maximum_message_names_field() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "w": {"type": "array", "items": {"type": "object", "properties": {"weight": {"type": "integer", "maximum": 100}}}}}}}});
        let obj = json!({"spec": {"w": [{"weight": 101}]}});
        let errs = validate_object(&schema, &obj);
        assert_eq!(
            errs[0].render(),
            "spec.w[0].weight: Invalid value: 101: spec.w[0].weight in body should be less than or equal to 100"
        );
    }

    /// Unknown fields are pruned and reported unless the schema preserves them; defaults fill gaps.
    #[test]
    fn prunes_and_defaults() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "a": {"type": "integer", "default": 3},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}});
        let mut obj = json!({"spec": {"foo": 1, "free": {"x": 1}}, "extra": true, "metadata": {"name": "n", "bogus": 1}});
        let unknown = default_and_prune_object(&schema, &mut obj);
        assert_eq!(
            obj,
            json!({"spec": {"a": 3, "free": {"x": 1}}, "metadata": {"name": "n"}})
        );
        assert_eq!(unknown, vec!["metadata.bogus", "extra", "spec.foo"]);
    }
}
