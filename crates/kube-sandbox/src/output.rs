//! The shape of an answer as the `Accept` header asks for it: the object itself, a
//! `meta.k8s.io` Table, or only its metadata (`PartialObjectMetadata` and
//! `PartialObjectMetadataList`, what `kube`'s `get_metadata`, `list_metadata` and
//! `watch_metadata` ask for).
//!
//! As in the real server, the first clause of `Accept` that the server can serve wins, and
//! asking a list for `PartialObjectMetadata` (or an object for the list) is 406 NotAcceptable
//! (after the write, for a write). A watch converts each event's object, BOOKMARKs included.
//! It does not negotiate encodings: every answer is JSON, whatever media type a clause names.

use axum::http::{HeaderMap, header};
use serde_json::{Value, json};

use super::error::ApiError;
use super::types::ResourceType;

/// What a request asks to get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The object or list itself.
    Object,
    /// A `meta.k8s.io` Table.
    Table,
    /// `PartialObjectMetadata` in the group version given (`meta.k8s.io/v1` or `/v1beta1`).
    Metadata(&'static str),
    /// `PartialObjectMetadataList` in the group version given.
    MetadataList(&'static str),
}

/// The shape the `Accept` header asks for; [`Output::Object`] when it names none.
pub fn negotiate(headers: &HeaderMap) -> Output {
    headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .and_then(|accept| accept.split(',').find_map(clause))
        .unwrap_or(Output::Object)
}

/// One clause of `Accept`, e.g. `application/json;as=Table;g=meta.k8s.io;v=v1`; `None` when
/// it asks for a conversion the server does not make (the next clause is tried).
fn clause(clause: &str) -> Option<Output> {
    let mut parts = clause.split(';');
    let media_type = parts.next().unwrap_or("").trim();
    let (mut as_kind, mut group, mut version) = (None, None, None);
    for param in parts {
        match param.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
            Some(("as", v)) => as_kind = Some(v),
            Some(("g", v)) => group = Some(v),
            Some(("v", v)) => version = Some(v),
            _ => {}
        }
    }
    if (as_kind, group, version) == (None, None, None) {
        return Some(Output::Object);
    }
    let api_version = match (group, version) {
        (Some("meta.k8s.io"), Some("v1")) => "meta.k8s.io/v1",
        (Some("meta.k8s.io"), Some("v1beta1")) => "meta.k8s.io/v1beta1",
        _ => return None,
    };
    match as_kind? {
        // Tables are served as JSON or YAML only (not protobuf), as in the real server.
        "Table" if matches!(media_type, "application/json" | "application/yaml") => {
            Some(Output::Table)
        }
        "PartialObjectMetadata" => Some(Output::Metadata(api_version)),
        "PartialObjectMetadataList" => Some(Output::MetadataList(api_version)),
        _ => None,
    }
}

/// The `PartialObjectMetadata` of an object: its whole `metadata`, nothing else.
pub fn partial(obj: &Value, api_version: &str) -> Value {
    let meta = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
    json!({"kind": "PartialObjectMetadata", "apiVersion": api_version, "metadata": meta})
}

/// A `PartialObjectMetadataList` of the objects, with the list's `metadata` as given. An
/// empty one has `"items": null`, as the real server's (a nil Go slice) has.
pub fn partial_list(objs: &[Value], list_meta: Value, api_version: &str) -> Value {
    let items = if objs.is_empty() {
        Value::Null
    } else {
        objs.iter().map(|o| partial(o, api_version)).collect()
    };
    json!({"kind": "PartialObjectMetadataList", "apiVersion": api_version, "metadata": list_meta, "items": items})
}

/// 406 for `PartialObjectMetadata` asked of a list.
pub fn list_not_acceptable(rt: &ResourceType) -> ApiError {
    ApiError::not_acceptable(format!(
        "you requested PartialObjectMetadata, but the requested object is a list ({})",
        go_type(rt, true)
    ))
}

/// 406 for `PartialObjectMetadataList` asked of one object of a built-in kind. A custom object
/// passes the real server's check for a list and fails when its items are read: 500 with the
/// bare message of that error.
pub fn object_not_acceptable(rt: &ResourceType) -> ApiError {
    if rt.custom {
        return ApiError::unclassified("content is not a list");
    }
    ApiError::not_acceptable(format!(
        "you requested PartialObjectMetadataList, but the requested object is not a list ({})",
        go_type(rt, false)
    ))
}

/// The Go type the real server's 406 message prints: the internal type of a built-in kind
/// (`*core.ConfigMapList`), `unstructured` for custom resources.
fn go_type(rt: &ResourceType, list: bool) -> String {
    let suffix = if list { "List" } else { "" };
    if rt.custom {
        return format!("*unstructured.Unstructured{suffix}");
    }
    let package = match rt.group.as_str() {
        "" | "events.k8s.io" => "core",
        "internal.apiserver.k8s.io" => "apiserverinternal",
        group => group.split('.').next().unwrap_or(group),
    };
    format!("*{package}.{}{suffix}", rt.kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept(value: &'static str) -> Output {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(value));
        negotiate(&headers)
    }

    /// The Accept headers of kube's metadata calls, kubectl's Table request and plain JSON.
    #[test]
    fn negotiates_the_shapes_clients_ask_for() {
        assert_eq!(
            accept("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
            Output::MetadataList("meta.k8s.io/v1")
        );
        assert_eq!(
            accept("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"),
            Output::Metadata("meta.k8s.io/v1")
        );
        assert_eq!(
            accept(
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
            ),
            Output::Table
        );
        assert_eq!(accept("application/json"), Output::Object);
        assert_eq!(negotiate(&HeaderMap::new()), Output::Object);
    }

    /// A clause naming an unknown conversion is skipped for the next one.
    #[test]
    fn unknown_conversions_fall_through() {
        assert_eq!(
            accept("application/json;as=Foo;g=meta.k8s.io;v=v1, application/json"),
            Output::Object
        );
        assert_eq!(
            accept(
                "application/json;as=PartialObjectMetadata;g=example.com;v=v1,application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1beta1"
            ),
            Output::Metadata("meta.k8s.io/v1beta1")
        );
        assert_eq!(
            accept(
                "application/vnd.kubernetes.protobuf;as=Table;g=meta.k8s.io;v=v1,application/json;g=meta.k8s.io;v=v1,application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
            ),
            Output::MetadataList("meta.k8s.io/v1")
        );
    }
}
