//! A minimal OpenAPI v3 surface: enough for kubectl to learn that every PATCH accepts
//! `fieldValidation` (so it validates on the server rather than downloading schemas).
//!
//! It carries no schemas (so `kubectl explain` does not work) and does not declare strategic
//! merge patch bodies, so kubectl computes strategic patches for built-ins from its compiled-in
//! types, as it does against servers without OpenAPI.

use serde_json::{Map, Value, json};

use super::types::ResourceType;

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: one entry per served group/version.
pub fn root(types: &[&ResourceType], revision: u64) -> Value {
    let mut paths = Map::new();
    for t in types {
        for v in &t.versions {
            let p = gv_path(&t.group, &v.name);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={revision:016X}")}),
            );
        }
    }
    json!({"paths": paths})
}

/// `/openapi/v3/<gv>`: a document with a PATCH operation per resource.
pub fn group_version(types: &[&ResourceType], group: &str, version: &str) -> Option<Value> {
    let mut paths = Map::new();
    let params = json!([
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}},
    ]);
    for t in types
        .iter()
        .filter(|t| t.group == group && t.version(version).is_some())
    {
        let gvk = json!({"group": group, "version": version, "kind": t.kind});
        let op = |action: &str| {
            json!({"operationId": format!("{action}{}", t.kind), "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {"200": {"description": "OK"}}})
        };
        let base = format!("/{}", gv_path(group, version));
        let item = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{base}/{}/{{name}}", t.plural)
        };
        paths.insert(item, json!({"patch": op("patch"), "put": op("put"), "get": op("get"), "delete": op("delete")}));
        let collection = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("{base}/{}", t.plural)
        };
        paths.insert(collection, json!({"post": op("post"), "get": op("list")}));
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}
