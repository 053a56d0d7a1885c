//! HTTP front end: URL routing, request counting, discovery, verbs, watch streaming, and
//! answers in the shape `Accept` asks for (objects, Tables, metadata only).

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::counts::{self, RequestCounts};
use super::error::{ApiError, Cause};
use super::openapi;
use super::output::{self, Output};
use super::patch;
use super::protobuf;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    EventType, FieldValidation, Propagation, Proposal, Store, WatchEvent, WriteOpts, present,
};
use super::table;
use super::types::{self, ResourceType, ScalePaths};

/// Shared state of the HTTP layer.
pub struct App {
    /// The object store.
    pub store: Arc<Store>,
    /// Interval of BOOKMARK events for watches that allow them.
    pub bookmark_interval: Duration,
    /// Flips to `true` on shutdown; open watches end.
    pub shutdown: watch::Receiver<bool>,
    /// `host:port` the server listens on.
    pub address: String,
    /// Requests served, by client, verb and resource.
    pub counts: Arc<RequestCounts>,
}

type Query = HashMap<String, String>;

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        let value = format!("299 - {}", serde_json::Value::String(w.clone()));
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().append("Warning", v);
        }
    }
    resp
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status(), &[])
}

/// Entry point for every request.
pub async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: Query = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let path = uri.path().trim_end_matches('/').to_string();
    tracing::debug!(%method, %uri, "request");
    match route(&app, &method, &path, &query, &headers, &body).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(%method, %uri, code = e.code, message = %e.message, "request failed");
            error_response(&e)
        }
    }
}

/// A parsed resource URL.
struct Target {
    rt: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    /// The namespace of the URL, `""` when it has none.
    fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }
}

/// What a request path addresses.
enum Route<'a> {
    /// `/healthz`, `/readyz`, `/livez` and anything below them.
    Health,
    /// A discovery, version or OpenAPI document.
    Document(Document<'a>),
    /// A resource URL below `/api/v1` or `/apis/GROUP/VERSION`.
    Resource(ResourcePath<'a>),
}

/// A read-only document path.
enum Document<'a> {
    /// `/`: the root paths.
    Root,
    /// `/version`.
    Version,
    /// `/api`: the core API versions.
    CoreVersions,
    /// `/api/v1`: the core resources.
    CoreResources,
    /// `/apis`: every API group.
    Groups,
    /// `/openapi/v3`: the OpenAPI v3 index.
    OpenApiRoot,
    /// `/openapi/v3/api/VERSION` (group `""`) or `/openapi/v3/apis/GROUP/VERSION`.
    OpenApi { group: &'a str, version: &'a str },
    /// `/apis/GROUP`.
    Group(&'a str),
    /// `/apis/GROUP/VERSION`: the resources of a group version.
    GroupResources { group: &'a str, version: &'a str },
}

/// A resource URL split into its parts, before its type is looked up.
struct ResourcePath<'a> {
    group: &'a str,
    version: &'a str,
    namespace: Option<String>,
    plural: &'a str,
    name: Option<String>,
    sub: Option<String>,
}

/// Routes a request path: health, discovery and OpenAPI documents, or a resource URL.
async fn route(
    app: &App,
    method: &Method,
    path: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let client = counts::client(headers);
    let Some(parsed) = parse_route(&segs) else {
        app.counts
            .record(client, counts::method_verb(method), "other");
        return Err(ApiError::no_route(path));
    };
    match parsed {
        Route::Health => {
            app.counts
                .record(client, counts::method_verb(method), "health");
            Ok(health_response())
        }
        Route::Document(doc) => {
            app.counts
                .record(client, counts::method_verb(method), doc.bucket());
            let value = document(app, doc).ok_or_else(|| ApiError::no_route(path))?;
            get_only(method, value)
        }
        Route::Resource(resource) => {
            let verb = counts::resource_verb(method, resource.name.is_some(), is_watch(query));
            let target = resolve_target(&app.store, method, path, resource);
            let counted = match &target {
                Ok(Target {
                    rt, sub: Some(sub), ..
                }) => Cow::Owned(format!("{}/{sub}", rt.plural)),
                Ok(t) => Cow::Borrowed(t.rt.plural.as_str()),
                Err(_) => Cow::Borrowed("unknown"),
            };
            app.counts.record(client, verb, &counted);
            dispatch(app, method, &target?, query, headers, body).await
        }
    }
}

impl Document<'_> {
    /// The bucket a request for this document is counted in.
    fn bucket(&self) -> &'static str {
        match self {
            Document::Version => "version",
            Document::OpenApiRoot | Document::OpenApi { .. } => "openapi",
            Document::Root
            | Document::CoreVersions
            | Document::CoreResources
            | Document::Groups
            | Document::Group(_)
            | Document::GroupResources { .. } => "discovery",
        }
    }
}

/// Parses the segments of a request path into what they address; `None` for an unknown path.
fn parse_route<'a>(segs: &[&'a str]) -> Option<Route<'a>> {
    let doc = match *segs {
        [] => Document::Root,
        ["healthz" | "readyz" | "livez", ..] => return Some(Route::Health),
        ["version"] => Document::Version,
        ["api"] => Document::CoreVersions,
        ["api", "v1"] => Document::CoreResources,
        ["apis"] => Document::Groups,
        ["openapi", "v3"] => Document::OpenApiRoot,
        ["openapi", "v3", "api", version] => Document::OpenApi { group: "", version },
        ["openapi", "v3", "apis", group, version] => Document::OpenApi { group, version },
        ["apis", group] => Document::Group(group),
        ["apis", group, version] => Document::GroupResources { group, version },
        ["api", "v1", ref rest @ ..] => {
            return parse_resource_path("", "v1", rest).map(Route::Resource);
        }
        ["apis", group, version, ref rest @ ..] => {
            return parse_resource_path(group, version, rest).map(Route::Resource);
        }
        _ => return None,
    };
    Some(Route::Document(doc))
}

/// Splits the path after the group version into namespace, plural, name and subresource.
fn parse_resource_path<'a>(
    group: &'a str,
    version: &'a str,
    rest: &[&'a str],
) -> Option<ResourcePath<'a>> {
    let (namespace, rest): (Option<String>, &[&str]) = match rest {
        ["namespaces", ns, tail @ ..] if !namespace_subresource(group, tail) => {
            (Some(ns.to_string()), tail)
        }
        other => (None, other),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(ResourcePath {
        group,
        version,
        namespace,
        plural,
        name,
        sub,
    })
}

/// `/api/v1/namespaces/NAME/status` and `/finalize` address a namespace, not a namespaced kind.
fn namespace_subresource(group: &str, tail: &[&str]) -> bool {
    tail.is_empty()
        || (group.is_empty() && tail.len() == 1 && matches!(tail[0], "status" | "finalize"))
}

/// Looks up the type of a resource URL and checks that the URL fits it (scope, subresource).
fn resolve_target(
    store: &Store,
    method: &Method,
    path: &str,
    resource: ResourcePath<'_>,
) -> Result<Target, ApiError> {
    let ResourcePath {
        group,
        version,
        namespace,
        plural,
        name,
        sub,
    } = resource;
    let rt = store
        .find_type(group, version, plural)
        .ok_or_else(|| ApiError::no_route(path))?;
    if !rt.namespaced && namespace.is_some() {
        return Err(ApiError::no_route(path));
    }
    if rt.namespaced && namespace.is_none() && (name.is_some() || *method != Method::GET) {
        return Err(ApiError::no_route(path));
    }
    if let Some(s) = &sub
        && !serves_subresource(&rt, version, s)
    {
        return Err(ApiError::no_route(path));
    }
    Ok(Target {
        rt,
        version: version.to_string(),
        namespace,
        name,
        sub,
    })
}

/// Does the type serve the subresource `sub` in `version`?
fn serves_subresource(rt: &ResourceType, version: &str, sub: &str) -> bool {
    let v = rt.version(version);
    match sub {
        "status" => v.is_some_and(|v| v.status),
        "scale" => v.is_some_and(|v| v.scale.is_some()),
        "finalize" => rt.plural == "namespaces",
        _ => false,
    }
}

/// The plain-text `ok` of the health endpoints.
fn health_response() -> Response {
    let mut r = Response::new(Body::from("ok"));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Answers GET with `value`; other methods are not allowed on read-only paths.
fn get_only(method: &Method, value: Value) -> Result<Response, ApiError> {
    if method == Method::GET {
        Ok(json_response(200, &value, &[]))
    } else {
        Err(ApiError::method_not_allowed(method.as_str(), "", ""))
    }
}

/// The body of a document path; `None` when its group or version is not served.
fn document(app: &App, doc: Document<'_>) -> Option<Value> {
    let types = app.store.types();
    let type_refs: Vec<&ResourceType> = types.iter().map(|t| t.as_ref()).collect();
    let value = match doc {
        Document::Root => json!({"paths": ["/api", "/api/v1", "/apis", "/version", "/healthz"]}),
        Document::Version => json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-serin-embedded", "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64",
        }),
        Document::CoreVersions => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": app.address}]}),
        Document::CoreResources => {
            let core: Vec<&ResourceType> = type_refs
                .iter()
                .copied()
                .filter(|t| t.group.is_empty())
                .collect();
            types::resource_list(&core, "", "v1")
        }
        Document::Groups => types::group_list(&type_refs),
        Document::OpenApiRoot => openapi::root(&type_refs, app.store.revision()),
        Document::OpenApi { group, version } => openapi::group_version(&type_refs, group, version)?,
        Document::Group(group) => api_group(&type_refs, group)?,
        Document::GroupResources { group, version } => resources_in(&type_refs, group, version)?,
    };
    Some(value)
}

/// The APIGroup document of `group`; `None` when no served type is in it.
fn api_group(type_refs: &[&ResourceType], group: &str) -> Option<Value> {
    let list = types::group_list(type_refs);
    let mut g = list["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == group))
        .cloned()?;
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

/// The APIResourceList of a group version; `None` when it serves no type.
fn resources_in(type_refs: &[&ResourceType], group: &str, version: &str) -> Option<Value> {
    let in_group: Vec<&ResourceType> = type_refs
        .iter()
        .copied()
        .filter(|t| t.group == group && t.version(version).is_some())
        .collect();
    (!in_group.is_empty()).then(|| types::resource_list(&in_group, group, version))
}

fn write_opts(query: &Query, headers: &HeaderMap, status: bool) -> Result<WriteOpts, ApiError> {
    let field_validation = match query.get("fieldValidation").map(String::as_str) {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, got {other:?}"
            )));
        }
    };
    let field_manager = match query.get("fieldManager") {
        Some(m) => m.clone(),
        None => counts::user_agent_product(headers)
            .unwrap_or("unknown")
            .to_string(),
    };
    Ok(WriteOpts {
        dry_run: query.get("dryRun").is_some_and(|d| d == "All"),
        field_manager,
        field_validation,
        status,
    })
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.starts_with(b"k8s\x00") {
        return protobuf::decode(body).ok_or_else(|| {
            ApiError::unsupported_media_type(&["application/json", "application/yaml"])
        });
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    serde_json::from_slice(body)
        .or_else(|_| serde_norway::from_slice::<Value>(body))
        .map_err(|e| {
            ApiError::bad_request(format!("the body of the request could not be decoded: {e}"))
        })
}

/// Refuses a create or replace body whose `Content-Type` is neither JSON, YAML nor protobuf.
fn check_body_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = content_type(headers);
    if ct.is_empty()
        || matches!(
            ct.as_str(),
            "application/json" | "application/yaml" | "application/vnd.kubernetes.protobuf"
        )
    {
        return Ok(());
    }
    Err(ApiError::unsupported_media_type(&[
        "application/json",
        "application/yaml",
        "application/vnd.kubernetes.protobuf",
    ]))
}

/// The answer to a write: the object in the shape `Accept` asks for. As in the real server,
/// the write is done when that shape turns out to be one it cannot take (406).
fn written_response(
    t: &Target,
    obj: &Value,
    code: u16,
    warnings: &[String],
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let body = shaped_object(t, obj, output::negotiate(headers), query)?;
    Ok(json_response(code, &body, warnings))
}

/// A stored object presented in the version of the URL and in the shape `output`.
fn shaped_object(
    t: &Target,
    obj: &Value,
    output: Output,
    query: &Query,
) -> Result<Value, ApiError> {
    let (rt, v) = (&t.rt, t.version.as_str());
    Ok(match output {
        Output::Object => present(obj, rt, v),
        Output::Table => table::table(
            rt,
            v,
            &[present(obj, rt, v)],
            json!({}),
            include_object(query),
        ),
        Output::Metadata(api_version) => output::partial(obj, api_version),
        Output::MetadataList(_) => return Err(output::object_not_acceptable(rt)),
    })
}

/// Dispatches a resource request on its shape (collection, object or subresource) and method.
async fn dispatch(
    app: &App,
    method: &Method,
    t: &Target,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let store = &app.store;
    match (&t.name, t.sub.as_deref()) {
        (None, _) => collection(app, method, t, query, headers, body),
        (Some(name), None | Some("status")) => object(store, method, t, name, query, headers, body),
        (Some(name), Some("scale")) => scale(store, t, method, name, query, headers, body),
        (Some(name), Some("finalize")) => replace(store, t, name, query, headers, body, false),
        _ => Err(not_allowed(method, &t.rt)),
    }
}

/// 405 for a method the resource does not serve.
fn not_allowed(method: &Method, rt: &ResourceType) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), &rt.plural, &rt.group)
}

/// Serves a collection URL: watch, list, create, or delete the selected objects.
fn collection(
    app: &App,
    method: &Method,
    t: &Target,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    match *method {
        Method::GET if is_watch(query) => watch(app, t, query, headers),
        Method::GET => list(&app.store, t, query, headers),
        Method::POST => create(&app.store, t, query, headers, body),
        Method::DELETE => delete_collection(&app.store, t, query, headers),
        _ => Err(not_allowed(method, &t.rt)),
    }
}

/// Serves a named object or its status: get, replace, patch, or (not on status) delete.
fn object(
    store: &Store,
    method: &Method,
    t: &Target,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let status = t.sub.is_some();
    match *method {
        Method::GET => get_object(store, t, name, query, headers),
        Method::PUT => replace(store, t, name, query, headers, body, status),
        Method::PATCH => patch_object(store, t, name, query, headers, body, status),
        Method::DELETE if !status => delete(store, t, name, query, headers, body),
        _ => Err(not_allowed(method, &t.rt)),
    }
}

/// POST to a collection: creates an object from the body.
fn create(
    store: &Store,
    t: &Target,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let (rt, v) = (&t.rt, t.version.as_str());
    let opts = write_opts(query, headers, false)?;
    check_body_type(headers)?;
    let w = store.create(&rt.group, &rt.plural, v, t.ns(), parse_body(body)?, &opts)?;
    written_response(t, &w.object, 201, &w.warnings, query, headers)
}

/// DELETE on a collection: deletes every selected object and lists them.
fn delete_collection(
    store: &Store,
    t: &Target,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let rt = &t.rt;
    let (items, _) = select(store, t, query)?;
    let mut deleted = Vec::new();
    for item in items {
        let name = item
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let d = store.delete(
            &rt.group,
            &rt.plural,
            t.ns(),
            name,
            Propagation::Background,
            None,
            is_dry_run(query),
        )?;
        deleted.push(d.object);
    }
    let page = Page {
        items: deleted,
        cont: None,
        remaining: None,
    };
    list_response(t, page, store.revision(), query, headers)
}

/// GET of a named object, as JSON, a Table or its metadata.
fn get_object(
    store: &Store,
    t: &Target,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let obj = store.get(&t.rt.group, &t.rt.plural, t.ns(), name)?;
    let body = shaped_object(t, &obj, output::negotiate(headers), query)?;
    Ok(json_response(200, &body, &[]))
}

/// PUT of a named object, its status or a namespace's finalizers: replaces it with the body.
fn replace(
    store: &Store,
    t: &Target,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
    status: bool,
) -> Result<Response, ApiError> {
    let (rt, v) = (&t.rt, t.version.as_str());
    let opts = write_opts(query, headers, status)?;
    check_body_type(headers)?;
    let body = parse_body(body)?;
    let w = store.write(&rt.group, &rt.plural, v, t.ns(), name, &opts, |_, _| {
        Ok(Proposal::Object(body))
    })?;
    written_response(t, &w.object, 200, &w.warnings, query, headers)
}

/// PATCH of a named object or its status, in any of the four patch formats.
fn patch_object(
    store: &Store,
    t: &Target,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
    status: bool,
) -> Result<Response, ApiError> {
    let (rt, v) = (&t.rt, t.version.as_str());
    let opts = write_opts(query, headers, status)?;
    let content_type = content_type(headers);
    let force = query.get("force").is_some_and(|f| f == "true");
    if content_type.starts_with("application/apply-patch") && query.get("fieldManager").is_none() {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "PatchOptions",
            "",
            vec![Cause {
                reason: "FieldValueRequired",
                field: "fieldManager".into(),
                message: "Required value: is required for apply patch".into(),
            }],
        ));
    }
    let w = store.write(
        &rt.group,
        &rt.plural,
        v,
        t.ns(),
        name,
        &opts,
        |current, rt| compute_patch(rt, current, &content_type, body, force),
    )?;
    let code = if w.created { 201 } else { 200 };
    written_response(t, &w.object, code, &w.warnings, query, headers)
}

/// `includeObject` of a Table request (default `Metadata`).
fn include_object(query: &Query) -> &str {
    query
        .get("includeObject")
        .map(String::as_str)
        .unwrap_or("Metadata")
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

fn is_watch(query: &Query) -> bool {
    query.get("watch").is_some_and(|w| w == "true" || w == "1")
}

fn is_dry_run(query: &Query) -> bool {
    query.get("dryRun").is_some_and(|d| d == "All")
}

fn compute_patch(
    rt: &ResourceType,
    current: Option<&Value>,
    content_type: &str,
    body: &Bytes,
    force: bool,
) -> Result<Proposal, ApiError> {
    if content_type.starts_with("application/apply-patch") {
        let config = parse_body(body)?;
        if !config.is_object() {
            return Err(ApiError::bad_request(
                "the apply configuration must be an object",
            ));
        }
        return Ok(Proposal::Apply { config, force });
    }
    let Some(current) = current else {
        // Placeholder: `write` answers NotFound for a missing object.
        return Ok(Proposal::Object(Value::Null));
    };
    let mut obj = current.clone();
    let json_body = || {
        serde_json::from_slice::<Value>(body)
            .map_err(|_| ApiError::bad_request("invalid JSON patch"))
    };
    match content_type {
        "application/merge-patch+json" => {
            json_patch::merge(&mut obj, &json_body()?);
        }
        "application/json-patch+json" => {
            let ops: json_patch::Patch = serde_json::from_value(json_body()?)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            json_patch::patch(&mut obj, &ops).map_err(|_| ApiError::patch_failed())?;
        }
        "application/strategic-merge-patch+json" if !rt.custom => {
            patch::strategic_merge(&mut obj, &json_body()?);
        }
        // Custom resources have no strategic merge patch; the real server lists what they take.
        _ if rt.custom => {
            return Err(ApiError::unsupported_media_type(&[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/apply-patch+yaml",
            ]));
        }
        _ => return Err(ApiError::unsupported_patch_type()),
    }
    Ok(Proposal::Object(obj))
}

fn delete(
    store: &Store,
    t: &Target,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let rt = &t.rt;
    let opts: Value = if body.is_empty() {
        json!({})
    } else {
        parse_body(body)?
    };
    let policy = query
        .get("propagationPolicy")
        .cloned()
        .or_else(|| {
            opts.get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .or_else(|| {
            (opts.get("orphanDependents") == Some(&json!(true))).then(|| "Orphan".to_string())
        });
    let propagation = match policy.as_deref() {
        Some("Orphan") => Propagation::Orphan,
        Some("Foreground") => Propagation::Foreground,
        _ => Propagation::Background,
    };
    let precondition = opts
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str);
    let dry_run = is_dry_run(query)
        || opts
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.contains(&json!("All")));
    let ns = t.namespace.clone().unwrap_or_default();
    let d = store.delete(
        &rt.group,
        &rt.plural,
        &ns,
        name,
        propagation,
        precondition,
        dry_run,
    )?;
    // The real server answers 200 with the object while it waits for finalizers, and a
    // Status once it is gone (for custom resources too). 202 is reserved for an explicit
    // `orphanDependents: false`.
    if !d.removed {
        return written_response(t, &d.object, 200, &[], query, headers);
    }
    let mut details =
        json!({"name": name, "kind": rt.plural, "uid": d.object.pointer("/metadata/uid")});
    if !rt.group.is_empty() {
        details["group"] = json!(rt.group);
    }
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": details});
    Ok(json_response(200, &status, &[]))
}

fn selectors(query: &Query, t: &Target) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels =
        LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let fields =
        FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))?;
    t.rt.check_field_selector(&t.version, fields.fields())?;
    Ok((labels, fields))
}

/// Does the query select by labels or fields?
fn has_selectors(query: &Query) -> bool {
    ["labelSelector", "fieldSelector"]
        .iter()
        .any(|k| query.get(*k).is_some_and(|s| !s.is_empty()))
}

/// The selected objects and the revision they are at: the latest state, or with
/// `resourceVersionMatch=Exact` the state at `resourceVersion`.
fn select(store: &Store, t: &Target, query: &Query) -> Result<(Vec<Value>, u64), ApiError> {
    let (labels, fields) = selectors(query, t)?;
    let exact = query
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact");
    let (items, rev) = match query.get("resourceVersion").filter(|_| exact) {
        Some(rv) => {
            let rev: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?;
            let items = store.list_at(&t.rt.group, &t.rt.plural, t.namespace.as_deref(), rev)?;
            (items, rev)
        }
        None => store.list(&t.rt.group, &t.rt.plural, t.namespace.as_deref())?,
    };
    Ok((
        items
            .into_iter()
            .filter(|o| labels.matches(o) && fields.matches(o))
            .collect(),
        rev,
    ))
}

/// A list in the real server's shape: items of built-in kinds carry no `apiVersion` and
/// `kind` (only custom objects do), and a list of custom objects always has `continue`.
fn list_object(
    rt: &ResourceType,
    version: &str,
    items: Vec<Value>,
    rev: u64,
    cont: Option<String>,
    remaining: Option<usize>,
) -> Value {
    let mut meta = json!({"resourceVersion": rev.to_string()});
    match cont {
        Some(c) => meta["continue"] = json!(c),
        None if rt.custom => meta["continue"] = json!(""),
        None => {}
    }
    if let Some(n) = remaining {
        meta["remainingItemCount"] = json!(n);
    }
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut o| {
            if !rt.custom
                && let Some(m) = o.as_object_mut()
            {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(version), "metadata": meta, "items": items})
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// GET on a collection: the selected objects, one page at a time, as a list, a Table or
/// their metadata.
fn list(
    store: &Store,
    t: &Target,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (items, rev) = select(store, t, query)?;
    let mut page = paginate(items, rev, store.compacted(), query)?;
    // Like the real server, no count is given for a selection (it would count unselected objects).
    page.remaining = page.remaining.filter(|_| !has_selectors(query));
    list_response(t, page, rev, query, headers)
}

/// A page of stored objects as a list or a Table in the version of the URL, or as a
/// `PartialObjectMetadataList`.
fn list_response(
    t: &Target,
    page: Page,
    rev: u64,
    query: &Query,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let Page {
        items,
        cont,
        remaining,
    } = page;
    // The list metadata of a converted list; `continue` is left out when empty (omitempty).
    let converted_meta = |cont: Option<String>| {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if let Some(c) = cont {
            meta["continue"] = json!(c);
        }
        if let Some(n) = remaining {
            meta["remainingItemCount"] = json!(n);
        }
        meta
    };
    let presented = |items: &[Value]| -> Vec<Value> {
        items
            .iter()
            .map(|o| present(o, &t.rt, &t.version))
            .collect()
    };
    let body = match output::negotiate(headers) {
        Output::Object => list_object(&t.rt, &t.version, presented(&items), rev, cont, remaining),
        Output::Table => table::table(
            &t.rt,
            &t.version,
            &presented(&items),
            converted_meta(cont),
            include_object(query),
        ),
        Output::MetadataList(api_version) => {
            output::partial_list(&items, converted_meta(cont), api_version)
        }
        Output::Metadata(_) => return Err(output::list_not_acceptable(&t.rt)),
    };
    Ok(json_response(200, &body, &[]))
}

/// The sort key of a listed object (namespace, then name); continue tokens encode it.
fn list_key(o: &Value) -> String {
    format!(
        "{}\u{0}{}",
        o.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        o.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    )
}

/// One page of a list.
struct Page {
    items: Vec<Value>,
    /// The continue token of the next page.
    cont: Option<String>,
    /// How many items follow this page.
    remaining: Option<usize>,
}

/// One page of `items` per `continue` and `limit`. A continue token holds the revision of the
/// first page and the key of the last item; it expires (410) once the history no longer
/// reaches back to that revision, as a real server's token does after etcd compaction.
fn paginate(items: Vec<Value>, rev: u64, compacted: u64, query: &Query) -> Result<Page, ApiError> {
    let (mut items, first_rev) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let token = unhex(c).ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            let (token_rev, after) = token
                .split_once('\u{1}')
                .and_then(|(r, k)| Some((r.parse::<u64>().ok()?, k.to_string())))
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if token_rev < compacted {
                return Err(ApiError::continue_expired());
            }
            let items = items.into_iter().filter(|o| list_key(o) > after).collect();
            (items, token_rev)
        }
        None => (items, rev),
    };
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    if items.len() <= limit {
        return Ok(Page {
            items,
            cont: None,
            remaining: None,
        });
    }
    let remaining = items.len() - limit;
    items.truncate(limit);
    let cont = items
        .last()
        .map(|o| hex(&format!("{first_rev}\u{1}{}", list_key(o))));
    Ok(Page {
        items,
        cont,
        remaining: Some(remaining),
    })
}

fn replicas_path(p: &str) -> String {
    p.replace('.', "/")
}

/// Serves the scale subresource: get, replace or patch the replica count.
fn scale(
    store: &Store,
    t: &Target,
    method: &Method,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let rt = &t.rt;
    let paths = rt
        .version(&t.version)
        .and_then(|v| v.scale.clone())
        .ok_or_else(|| ApiError::no_route(&rt.plural))?;
    match *method {
        Method::GET => Ok(json_response(
            200,
            &scale_view(&paths, &store.get(&rt.group, &rt.plural, t.ns(), name)?),
            &[],
        )),
        Method::PUT | Method::PATCH => {
            let opts = write_opts(query, headers, false)?;
            let ct = content_type(headers);
            let is_put = *method == Method::PUT;
            let w = store.write(
                &rt.group,
                &rt.plural,
                &t.version,
                t.ns(),
                name,
                &opts,
                |current, rt| {
                    let current =
                        current.ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
                    let new_scale = if is_put {
                        parse_body(body)?
                    } else {
                        patched_scale(rt, &scale_view(&paths, current), &ct, body)?
                    };
                    scaled_object(rt, &paths, current, name, &new_scale).map(Proposal::Object)
                },
            )?;
            Ok(json_response(
                200,
                &scale_view(&paths, &w.object),
                &w.warnings,
            ))
        }
        _ => Err(not_allowed(method, rt)),
    }
}

/// The autoscaling/v1 Scale view of an object.
fn scale_view(paths: &ScalePaths, obj: &Value) -> Value {
    let spec = obj
        .pointer(&replicas_path(&paths.spec_replicas))
        .cloned()
        .unwrap_or(json!(0));
    let status = obj
        .pointer(&replicas_path(&paths.status_replicas))
        .cloned()
        .unwrap_or(json!(0));
    let selector = match &paths.label_selector {
        Some(p) => obj
            .pointer(&replicas_path(p))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        None => obj
            .pointer("/spec/selector/matchLabels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
    };
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"]},
        "spec": {"replicas": spec}, "status": {"replicas": status, "selector": selector}})
}

/// A Scale patched by the request body (an apply configuration is merged into it).
fn patched_scale(
    rt: &ResourceType,
    old_scale: &Value,
    content_type: &str,
    body: &Bytes,
) -> Result<Value, ApiError> {
    Ok(
        match compute_patch(rt, Some(old_scale), content_type, body, false)? {
            Proposal::Object(s) => s,
            Proposal::Apply { config, .. } => {
                let mut s = old_scale.clone();
                patch::apply_merge(&mut s, &config);
                s
            }
        },
    )
}

/// The object with the replica count of `new_scale`, after checking its resourceVersion.
fn scaled_object(
    rt: &ResourceType,
    paths: &ScalePaths,
    current: &Value,
    name: &str,
    new_scale: &Value,
) -> Result<Value, ApiError> {
    let rv = new_scale
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut obj = current.clone();
    if !rv.is_empty()
        && Some(rv)
            != current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
    {
        return Err(ApiError::conflict(&rt.group, &rt.plural, name));
    }
    let replicas = new_scale
        .pointer("/spec/replicas")
        .cloned()
        .unwrap_or(json!(0));
    if let Some(slot) = obj.pointer_mut(&replicas_path(&paths.spec_replicas)) {
        *slot = replicas;
    } else {
        let segs: Vec<String> = paths
            .spec_replicas
            .split('.')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let mut cfg = replicas;
        for s in segs.iter().rev() {
            cfg = json!({ s.clone(): cfg });
        }
        patch::apply_merge(&mut obj, &cfg);
    }
    Ok(obj)
}

fn encode_event(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

struct WatchFilter {
    rt: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    output: Output,
    include_object: String,
}

impl WatchFilter {
    fn matches(&self, o: &Value) -> bool {
        self.labels.matches(o) && self.fields.matches(o)
    }

    /// The event as this watcher sees it (selector transitions become ADDED/DELETED).
    fn render(&self, e: &WatchEvent) -> Option<Bytes> {
        if e.type_key.0 != self.rt.group || e.type_key.1 != self.rt.plural {
            return None;
        }
        if self.namespace.as_ref().is_some_and(|ns| *ns != e.namespace) {
            return None;
        }
        let now = self.matches(&e.object);
        let mut shown = e.object.clone();
        let kind = match (e.kind, &e.old) {
            (EventType::Modified, Some(old)) => match (self.matches(old), now) {
                (true, true) => EventType::Modified,
                (true, false) => {
                    // The object left the selection: the real server sends the last state
                    // that matched, at the new resourceVersion.
                    let mut last = (**old).clone();
                    last["metadata"]["resourceVersion"] =
                        e.object["metadata"]["resourceVersion"].clone();
                    shown = Arc::new(last);
                    EventType::Deleted
                }
                (false, true) => EventType::Added,
                (false, false) => return None,
            },
            (k, _) if now => k,
            _ => return None,
        };
        let obj = match self.output {
            Output::Table => table::table(
                &self.rt,
                &self.version,
                &[present(&shown, &self.rt, &self.version)],
                json!({}),
                &self.include_object,
            ),
            Output::Metadata(api_version) => output::partial(&shown, api_version),
            // A list shape asked of a watch's single objects: the real server cannot convert
            // them, falls back to the object and fails to encode it, which ends the watch.
            // This server sends the objects as they are.
            Output::Object | Output::MetadataList(_) => present(&shown, &self.rt, &self.version),
        };
        Some(encode_event(kind.as_str(), &obj))
    }

    fn bookmark(&self, rev: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = match self.output {
            Output::Metadata(api_version) => {
                output::partial(&json!({"metadata": meta}), api_version)
            }
            _ => {
                json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(&self.version), "metadata": meta})
            }
        };
        encode_event("BOOKMARK", &obj)
    }
}

/// The result of [`Store::watch`]: backlog, receiver for later events, current revision.
type Watched = Result<
    (
        Vec<Arc<WatchEvent>>,
        broadcast::Receiver<Arc<WatchEvent>>,
        u64,
    ),
    ApiError,
>;

/// How a watch stream behaves, from its query and the server options.
struct WatchPlan {
    send_initial: bool,
    bookmarks: bool,
    bookmark_interval: Duration,
    timeout: Duration,
    shutdown: watch::Receiver<bool>,
}

/// Serves a watch: a stream of JSON event lines.
fn watch(app: &App, t: &Target, query: &Query, headers: &HeaderMap) -> Result<Response, ApiError> {
    let filter = watch_filter(t, query, headers)?;
    let send_initial = query.get("sendInitialEvents").is_some_and(|s| s == "true");
    let since = watch_since(query, send_initial)?;
    let plan = WatchPlan {
        send_initial,
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true"),
        bookmark_interval: app.bookmark_interval,
        timeout: query
            .get("timeoutSeconds")
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800)),
        shutdown: app.shutdown.clone(),
    };
    let watched = app.store.watch(&t.rt.group, &t.rt.plural, since);
    let mut resp = Response::new(Body::from_stream(watch_stream(filter, watched, plan)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

/// The event filter of a watch: its selectors (a named URL selects by name) and output format.
fn watch_filter(t: &Target, query: &Query, headers: &HeaderMap) -> Result<WatchFilter, ApiError> {
    let (labels, mut fields) = selectors(query, t)?;
    if let Some(name) = &t.name {
        fields = FieldSelector::parse(&format!("metadata.name={name}"))?;
    }
    Ok(WatchFilter {
        rt: t.rt.clone(),
        version: t.version.clone(),
        namespace: t.namespace.clone(),
        labels,
        fields,
        output: output::negotiate(headers),
        include_object: query
            .get("includeObject")
            .cloned()
            .unwrap_or_else(|| "Metadata".to_string()),
    })
}

/// The revision a watch resumes after; `None` starts with the current state.
fn watch_since(query: &Query, send_initial: bool) -> Result<Option<u64>, ApiError> {
    let rv = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    if send_initial || rv.is_empty() || rv == "0" {
        return Ok(None);
    }
    rv.parse::<u64>()
        .map(Some)
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))
}

/// The event lines of a watch: backlog, initial bookmark, then live events until it ends.
fn watch_stream(
    filter: WatchFilter,
    watched: Watched,
    plan: WatchPlan,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let WatchPlan {
        send_initial,
        bookmarks,
        bookmark_interval,
        timeout,
        mut shutdown,
    } = plan;
    async_stream::stream! {
        let (backlog, mut rx, current) = match watched {
            Ok(w) => w,
            Err(e) => {
                yield Ok::<Bytes, Infallible>(encode_event("ERROR", &e.to_status()));
                return;
            }
        };
        for e in &backlog {
            if let Some(line) = filter.render(e) {
                yield Ok(line);
            }
        }
        if send_initial {
            yield Ok(filter.bookmark(current, true));
        }
        let mut progress = current;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + bookmark_interval, bookmark_interval);
        loop {
            tokio::select! {
                received = rx.recv() => match received {
                    Ok(e) => {
                        if e.rev <= progress {
                            continue;
                        }
                        progress = e.rev;
                        if let Some(line) = filter.render(&e) {
                            yield Ok(line);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let gone = ApiError::gone(progress, progress);
                        yield Ok(encode_event("ERROR", &gone.to_status()));
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = ticker.tick(), if bookmarks => {
                    yield Ok(filter.bookmark(progress, false));
                }
                _ = &mut deadline => break,
                _ = shutdown.changed() => break,
            }
        }
    }
}
