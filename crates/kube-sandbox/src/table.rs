//! `meta.k8s.io/v1` Table output for `kubectl get`, using a CRD's `additionalPrinterColumns`
//! (NAME and AGE for everything else) and a small JSONPath subset.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::output;
use super::types::ResourceType;

/// Formats an age like `k8s.io/apimachinery/pkg/util/duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".to_string();
    }
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        format!("{}y{}d", d / 365, d % 365)
    } else {
        format!("{}y", d / 365)
    }
}

fn age(ts: Option<&str>, now: DateTime<Utc>) -> String {
    match ts.and_then(|t| DateTime::parse_from_rfc3339(t).ok()) {
        Some(t) => human_duration((now - t.with_timezone(&Utc)).num_seconds()),
        None => "<unknown>".to_string(),
    }
}

/// Evaluates `.a.b[0].c` and `.a[?(@.k=="v")].c` (first match) against an object.
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    let mut cur = obj;
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            cur = cur.get(&r[..end])?;
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            rest = &r[end + 1..];
            if let Some(filter) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (key, want) = filter.split_once("==")?;
                let want = want.trim().trim_matches(|c| c == '"' || c == '\'');
                cur = cur.as_array()?.iter().find(|item| {
                    item.get(key.trim()).is_some_and(|v| {
                        v.as_str().map_or_else(|| v.to_string(), str::to_string) == want
                    })
                })?;
            } else {
                let i: usize = inner.trim().parse().ok()?;
                cur = cur.get(i)?;
            }
        } else {
            return None;
        }
    }
    Some(cur)
}

fn columns(rt: &ResourceType, version: &str) -> Vec<Value> {
    rt.version(version)
        .map(|v| v.printer_columns.clone())
        .unwrap_or_default()
}

/// Column definitions of the table.
fn column_definitions(rt: &ResourceType, version: &str) -> Vec<Value> {
    let mut defs = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    let cols = columns(rt, version);
    if cols.is_empty() {
        defs.push(json!({"name": "Age", "type": "date", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0}));
    }
    for c in cols {
        defs.push(json!({
            "name": c.get("name").cloned().unwrap_or(json!("")),
            "type": c.get("type").cloned().unwrap_or(json!("string")),
            "format": c.get("format").cloned().unwrap_or(json!("")),
            "description": c.get("description").cloned().unwrap_or(json!("")),
            "priority": c.get("priority").cloned().unwrap_or(json!(0)),
        }));
    }
    defs
}

fn row(
    rt: &ResourceType,
    version: &str,
    obj: &Value,
    include_object: &str,
    now: DateTime<Utc>,
) -> Value {
    let meta = obj.get("metadata").unwrap_or(&Value::Null);
    let mut cells = vec![meta.get("name").cloned().unwrap_or(json!(""))];
    let cols = columns(rt, version);
    if cols.is_empty() {
        cells.push(json!(age(
            meta.get("creationTimestamp").and_then(Value::as_str),
            now
        )));
    }
    for c in cols {
        let path = c.get("jsonPath").and_then(Value::as_str).unwrap_or("");
        let ty = c.get("type").and_then(Value::as_str).unwrap_or("string");
        let cell = match (json_path(obj, path), ty) {
            (None, _) => Value::Null,
            (Some(v), "date") => json!(age(v.as_str(), now)),
            (Some(v @ (Value::Number(_) | Value::Bool(_))), _) => v.clone(),
            (Some(Value::String(s)), _) => json!(s),
            (Some(v), _) => json!(v.to_string()),
        };
        cells.push(cell);
    }
    let object = match include_object {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => output::partial(obj, "meta.k8s.io/v1"),
    };
    json!({"cells": cells, "object": object})
}

/// A Table of the given objects (already presented in `version`).
pub fn table(
    rt: &ResourceType,
    version: &str,
    objs: &[Value],
    list_meta: Value,
    include_object: &str,
) -> Value {
    let now = Utc::now();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": column_definitions(rt, version),
        "rows": objs.iter().map(|o| row(rt, version, o, include_object, now)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ages print like kubectl's.
    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(3 * 86400), "3d");
    }

    /// The JSONPath subset handles indexes and equality filters.
    #[test]
    fn json_path_subset() {
        let obj = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}, "spec": {"l": [1, 2]}});
        assert_eq!(
            json_path(&obj, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(json_path(&obj, ".spec.l[1]"), Some(&json!(2)));
        assert_eq!(json_path(&obj, ".spec.x"), None);
    }
}
