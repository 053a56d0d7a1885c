//! Offline checks of Canary manifests (what `serin validate` runs): YAML syntax, apiVersion
//! and kind, unknown fields (typos), types, and then the semantic rules of [`validate`].
//!
//! Unknown fields are found by walking the document against the generated CRD schema, so
//! the check always matches what the cluster would prune or reject.

use std::fmt;

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value;

use super::validate::{Problem, validate};
use super::{Canary, GROUP, VERSION};

/// A problem in one document of a manifest file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// `namespace/name` of the Canary, when it has one.
    pub object: Option<String>,
    /// The problem.
    pub problem: Problem,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(o) => write!(f, "Canary {o}: {}", self.problem),
            None => write!(f, "document {}: {}", self.document, self.problem),
        }
    }
}

/// The outcome of checking a manifest file.
#[derive(Clone, Debug, Default)]
pub struct ManifestReport {
    /// Canaries that were checked (`namespace/name`).
    pub canaries: Vec<String>,
    /// Everything wrong, in document order.
    pub problems: Vec<ManifestProblem>,
}

/// Checks every YAML document in `text`. Documents of other kinds are skipped; a file with
/// no Canary at all is a problem.
pub fn check_manifests(text: &str) -> ManifestReport {
    let mut report = ManifestReport::default();
    let schema = schema();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                report.problems.push(ManifestProblem {
                    document,
                    object: None,
                    problem: Problem::new(
                        "(yaml)",
                        format!("cannot be parsed: {e}"),
                        "fix the YAML syntax at that line",
                    ),
                });
                // A syntax error ends the stream: later documents cannot be located.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        check_document(document, &value, schema, &mut report);
    }
    if report.canaries.is_empty() && report.problems.is_empty() {
        report.problems.push(ManifestProblem {
            document: 0,
            object: None,
            problem: Problem::new(
                "(file)",
                "contains no Canary",
                format!("add a document with apiVersion: {GROUP}/{VERSION} and kind: Canary"),
            ),
        });
    }
    report
}

fn check_document(document: usize, value: &Value, schema: &Value, report: &mut ManifestReport) {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let group = api_version.split_once('/').map(|(g, _)| g).unwrap_or("");
    if kind != "Canary" && group != GROUP {
        // Another kind (a Deployment next to the Canary, say): not ours to check.
        return;
    }
    let name = value.pointer("/metadata/name").and_then(Value::as_str);
    let namespace = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let object = name.map(|n| format!("{namespace}/{n}"));
    let mut push = |problem: Problem| {
        report.problems.push(ManifestProblem {
            document,
            object: object.clone(),
            problem,
        })
    };
    let expected = format!("{GROUP}/{VERSION}");
    if kind != "Canary" {
        push(Problem::new(
            "kind",
            format!("{kind:?} is not a kind of {GROUP}"),
            "write kind: Canary",
        ));
        return;
    }
    if api_version != expected {
        push(Problem::new(
            "apiVersion",
            format!("{api_version:?} is not served"),
            format!("write apiVersion: {expected}"),
        ));
        return;
    }
    if name.is_none_or(str::is_empty) {
        push(Problem::new(
            "metadata.name",
            "is missing",
            "give the Canary a name",
        ));
    }
    let mut unknown = Vec::new();
    if let Some(spec) = value.get("spec") {
        if let Some(spec_schema) = schema.pointer("/properties/spec") {
            unknown_fields("spec", spec, spec_schema, &mut unknown);
        }
    } else {
        push(Problem::new(
            "spec",
            "is missing",
            "add a spec; see examples/ for a complete Canary",
        ));
        return;
    }
    let had_unknown = !unknown.is_empty();
    for p in unknown {
        push(p);
    }
    match serde_path_to_error::deserialize::<_, Canary>(value.clone()) {
        Ok(canary) => {
            report.canaries.push(object.clone().unwrap_or_default());
            for p in validate(&canary.spec) {
                push(p);
            }
        }
        Err(e) => {
            // Type errors hide the semantic checks; report the first one precisely.
            if !had_unknown || !e.inner().to_string().starts_with("unknown") {
                push(type_problem(&e));
            }
        }
    }
}

fn type_problem(e: &serde_path_to_error::Error<serde_json::Error>) -> Problem {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    if let Some(rest) = inner.strip_prefix("missing field `")
        && let Some(field) = rest.split('`').next()
    {
        let full = if path == "." || path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return Problem::new(
            full.clone(),
            "is required",
            format!("add it; `kubectl explain canary.{full}` describes it"),
        );
    }
    let last = path.rsplit('.').next().unwrap_or("");
    if matches!(last, "interval" | "timeout" | "window") {
        return Problem::new(
            path,
            format!("is not a duration ({inner})"),
            "write a duration such as 30s, 1m or 2m30s",
        );
    }
    let explain = path.split('[').next().unwrap_or(&path).to_string();
    let fix = format!("`kubectl explain canary.{explain}` shows the expected type");
    Problem::new(path, inner, fix)
}

/// The openAPIV3Schema of the Canary CRD.
pub fn canary_schema() -> Value {
    schema().clone()
}

/// The schema, generated once per process: building the CRD is by far the costliest part of
/// a check.
fn schema() -> &'static Value {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = Canary::crd();
        crd.spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null)
    })
}

/// Collects fields of `value` that `schema` does not declare.
fn unknown_fields(path: &str, value: &Value, schema: &Value, out: &mut Vec<Problem>) {
    if schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in map {
                    match props.get(k) {
                        Some(s) => unknown_fields(&format!("{path}.{k}"), v, s, out),
                        None => {
                            let known: Vec<&str> = props.keys().map(String::as_str).collect();
                            let fix = match closest(k, &known) {
                                Some(s) => format!(
                                    "did you mean {s}? (known fields: {})",
                                    known.join(", ")
                                ),
                                None => {
                                    format!("remove it; known fields here: {}", known.join(", "))
                                }
                            };
                            out.push(Problem::new(
                                format!("{path}.{k}"),
                                "is not a known field",
                                fix,
                            ));
                        }
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties") {
                for (k, v) in map {
                    unknown_fields(&format!("{path}.{k}"), v, extra, out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    unknown_fields(&format!("{path}[{i}]"), v, item_schema, out);
                }
            }
        }
        _ => {}
    }
}

/// The known name closest to `name`, when it is close enough to be a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (levenshtein(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A near-miss field name is suggested; an unrelated one is not.
    #[test]
    fn suggests_close_field_names() {
        assert_eq!(closest("stpes", &["steps", "service"]), Some("steps"));
        assert_eq!(
            closest("failurethreshold", &["failureThreshold"]),
            Some("failureThreshold")
        );
        assert_eq!(closest("banana", &["steps", "service"]), None);
    }
}
