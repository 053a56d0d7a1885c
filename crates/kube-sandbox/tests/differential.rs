//! Keeps the embedded API server honest. One scripted sequence of requests goes to the
//! in-memory server and to a real kube-apiserver v1.37.2 (with etcd and the controller
//! manager, started by this test alone because it compacts etcd), and the answers are
//! compared: HTTP status codes, `Status` reasons, messages and details, `Warning` headers, and
//! the objects, lists and watch events with only uids, timestamps, resourceVersion values,
//! continue tokens and `managedFields` masked.
//!
//! A step named in [`known_differences`] must show exactly the recorded answer on each side
//! (docs/embedded-apiserver.md says why each one is acceptable), so the test fails when either
//! server changes; any other difference fails the test too. On failure the report shows both
//! answers of every differing step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use kube_sandbox::{ApiServer, Options};
use serde_json::{Map, Value, json};

const NS: &str = "diff";
const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const CRD_NAME: &str = "gadgets.diff.example.com";
const CM: &str = "/api/v1/namespaces/diff/configmaps";
const GD: &str = "/apis/diff.example.com/v1/namespaces/diff/gadgets";
/// Watch events the embedded server keeps; the filler writes below outnumber it.
const HISTORY_LIMIT: usize = 60;
const FILLER_WRITES: usize = 70;
/// How long a step may wait for the real controllers (garbage collector, CRD establishment).
const EVENTUALLY: Duration = Duration::from_secs(90);

/// The binaries: `SERIN_KUBE_BIN` (scripts/test sets it), else what `scripts/build-kube`
/// builds or finds in its cache.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SERIN_KUBE_BIN") {
        return PathBuf::from(dir);
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = std::process::Command::new("scripts/build-kube")
        .current_dir(root)
        .output()
        .expect("run scripts/build-kube");
    assert!(
        out.status.success(),
        "scripts/build-kube failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The test's own CRD: namespaced, a status subresource and a structural schema.
fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": "diff.example.com",
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "required": ["size"], "properties": {
                            "size": {"type": "integer", "minimum": 1, "maximum": 10},
                            "color": {"type": "string", "enum": ["red", "blue"]},
                            "tags": {"type": "array", "items": {"type": "string"}}
                        }},
                        "status": {"type": "object", "properties": {
                            "phase": {"type": "string"},
                            "count": {"type": "integer"}
                        }}
                    }
                }}
            }]
        }
    })
}

/// One request of the script. `${var}` in the path or body is replaced by the value that
/// side captured earlier (resourceVersions and uids differ between the servers).
#[derive(Clone)]
struct Req {
    method: http::Method,
    path: String,
    content_type: &'static str,
    body: Option<String>,
    /// The `Accept` header, when the request asks for a conversion.
    accept: Option<&'static str>,
}

impl Req {
    /// The request with an `Accept` header.
    fn accepting(mut self, accept: &'static str) -> Self {
        self.accept = Some(accept);
        self
    }
}

fn req(method: http::Method, path: &str, content_type: &'static str, body: Option<String>) -> Req {
    Req {
        method,
        path: path.to_string(),
        content_type,
        body,
        accept: None,
    }
}

fn get(path: &str) -> Req {
    req(http::Method::GET, path, "", None)
}

fn post(path: &str, body: Value) -> Req {
    req(
        http::Method::POST,
        path,
        "application/json",
        Some(body.to_string()),
    )
}

fn put(path: &str, body: Value) -> Req {
    req(
        http::Method::PUT,
        path,
        "application/json",
        Some(body.to_string()),
    )
}

fn patch(path: &str, content_type: &'static str, body: Value) -> Req {
    req(
        http::Method::PATCH,
        path,
        content_type,
        Some(body.to_string()),
    )
}

fn merge(path: &str, body: Value) -> Req {
    patch(path, "application/merge-patch+json", body)
}

fn apply(path: &str, body: Value) -> Req {
    patch(path, "application/apply-patch+yaml", body)
}

fn delete(path: &str) -> Req {
    req(http::Method::DELETE, path, "", None)
}

/// An answer: status code, body (for a watch, the array of its events) and `Warning` headers.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    body: Value,
    warnings: Vec<String>,
}

/// One of the two servers, with the values captured from its answers.
struct Side {
    name: &'static str,
    client: kube::Client,
    vars: BTreeMap<String, String>,
}

impl Side {
    fn subst(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (k, v) in &self.vars {
            out = out.replace(&format!("${{{k}}}"), v);
        }
        assert!(
            !out.contains("${"),
            "{}: unbound variable in {out}",
            self.name
        );
        out
    }

    async fn send(&self, r: &Req) -> Reply {
        let path = self.subst(&r.path);
        let mut builder = http::Request::builder()
            .method(r.method.clone())
            .uri(path.as_str());
        if let Some(accept) = r.accept {
            builder = builder.header(http::header::ACCEPT, accept);
        }
        let body = match &r.body {
            Some(b) => {
                builder = builder.header(http::header::CONTENT_TYPE, r.content_type);
                self.subst(b).into_bytes()
            }
            None => Vec::new(),
        };
        let request = builder
            .body(kube::client::Body::from(body))
            .expect("a request");
        let response = tokio::time::timeout(Duration::from_secs(60), self.client.send(request))
            .await
            .unwrap_or_else(|_| panic!("{}: {} {path} timed out", self.name, r.method))
            .unwrap_or_else(|e| panic!("{}: {} {path}: {e}", self.name, r.method));
        let code = response.status().as_u16();
        let warnings = response
            .headers()
            .get_all("warning")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        let bytes = tokio::time::timeout(Duration::from_secs(60), response.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("{}: reading {path} timed out", self.name))
            .unwrap_or_else(|e| panic!("{}: reading {path}: {e}", self.name))
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let parse = |t: &str| serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.into()));
        let body = if path.contains("watch=true") {
            Value::Array(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(parse)
                    .collect(),
            )
        } else {
            parse(&text)
        };
        Reply {
            code,
            body,
            warnings,
        }
    }

    /// Sends `r` until `done` holds for the answer or [`EVENTUALLY`] has passed.
    async fn send_until(&self, r: &Req, done: fn(&Reply) -> bool) -> Reply {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let reply = self.send(r).await;
            if done(&reply) || Instant::now() > deadline {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Both answers of a known difference, as the comparison sees them.
struct Known {
    embedded: Value,
    real: Value,
}

/// Runs the script against both servers and collects the differences.
struct Diff {
    embedded: Side,
    real: Side,
    known: BTreeMap<&'static str, Known>,
    seen_known: BTreeSet<String>,
    failures: Vec<String>,
    steps: usize,
}

impl Diff {
    /// Sends `r` to both servers at once and compares the answers.
    async fn step(&mut self, name: &str, r: Req) -> [Reply; 2] {
        self.step_with(name, r, |v| v).await
    }

    /// Like [`Diff::step`], comparing only `project` of each answer.
    async fn step_with(&mut self, name: &str, r: Req, project: fn(Value) -> Value) -> [Reply; 2] {
        let (e, re) = tokio::join!(self.embedded.send(&r), self.real.send(&r));
        self.compare(name, &e, &re, project);
        [e, re]
    }

    /// Repeats `r` on each server until `done` holds (the real controllers act
    /// asynchronously), then compares the last answers.
    async fn step_until(&mut self, name: &str, r: Req, done: fn(&Reply) -> bool) -> [Reply; 2] {
        let (e, re) = tokio::join!(
            self.embedded.send_until(&r, done),
            self.real.send_until(&r, done)
        );
        self.compare(name, &e, &re, |v| v);
        [e, re]
    }

    fn compare(&mut self, name: &str, e: &Reply, r: &Reply, project: fn(Value) -> Value) {
        self.steps += 1;
        let (ev, rv) = (project(view(e)), project(view(r)));
        match self.known.get(name) {
            Some(k) => {
                self.seen_known.insert(name.to_string());
                if ev != k.embedded || rv != k.real {
                    self.failures.push(format!(
                        "step {name:?}: a known difference changed\n--- embedded (expected)\n{:#}\n--- embedded (got)\n{ev:#}\n--- real (expected)\n{:#}\n--- real (got)\n{rv:#}",
                        k.embedded, k.real
                    ));
                }
            }
            None if ev != rv => {
                let mut lines = Vec::new();
                json_diff(&ev, &rv, "", &mut lines);
                self.failures.push(format!(
                    "step {name:?}: the servers differ\n{}\n--- embedded: {ev}\n--- real: {rv}",
                    lines.join("\n")
                ))
            }
            None => {}
        }
    }

    /// Stores the string at `pointer` of each side's answer as `${var}` for later requests.
    fn capture(&mut self, var: &str, replies: &[Reply; 2], pointer: &str) {
        for (side, reply) in [&mut self.embedded, &mut self.real]
            .into_iter()
            .zip(replies)
        {
            let value = reply
                .body
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{}: no {pointer} in {:#}", side.name, reply.body));
            side.vars.insert(var.to_string(), value.to_string());
        }
    }
}

/// The paths where two answers differ, one line each with both values.
fn json_diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(a), Some(b)) => json_diff(a, b, &p, out),
                    (a, b) => out.push(format!(
                        "  {p}: embedded {} | real {}",
                        a.map_or("<absent>".to_string(), Value::to_string),
                        b.map_or("<absent>".to_string(), Value::to_string)
                    )),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (a, b)) in x.iter().zip(y).enumerate() {
                json_diff(a, b, &format!("{path}/{i}"), out);
            }
        }
        _ if a != b => out.push(format!("  {path}: embedded {a} | real {b}")),
        _ => {}
    }
}

/// What is compared of an answer.
fn view(reply: &Reply) -> Value {
    let mut v = json!({"code": reply.code, "body": normalize(&reply.body)});
    if !reply.warnings.is_empty() {
        v["warnings"] = json!(reply.warnings);
    }
    v
}

fn normalize(body: &Value) -> Value {
    match body {
        Value::Array(events) => Value::Array(
            events
                .iter()
                .map(|e| json!({"type": e["type"], "object": normalize(&e["object"])}))
                .collect(),
        ),
        Value::Object(m) if m.get("kind").and_then(Value::as_str) == Some("Status") => status(m),
        Value::Object(m) if m.contains_key("items") => {
            let mut list = mask(body);
            if let Some(meta) = list.get_mut("metadata").and_then(Value::as_object_mut) {
                for (k, token) in [("continue", "<token>"), ("resourceVersion", "<set>")] {
                    if meta
                        .get(k)
                        .and_then(Value::as_str)
                        .is_some_and(|c| !c.is_empty())
                    {
                        meta.insert(k.into(), json!(token));
                    }
                }
            }
            list
        }
        other => mask(other),
    }
}

/// A Status without its (empty) metadata; an empty `details` counts as none.
fn status(m: &Map<String, Value>) -> Value {
    let mut out = m.clone();
    out.remove("metadata");
    if let Some(msg) = m.get("message").and_then(Value::as_str) {
        out.insert("message".into(), json!(mask_message(msg)));
    }
    match out.get_mut("details").and_then(Value::as_object_mut) {
        Some(d) if d.is_empty() => {
            out.remove("details");
        }
        Some(d) if d.contains_key("uid") => {
            d.insert("uid".into(), json!("<uid>"));
        }
        _ => {}
    }
    sort_causes(&mut out);
    Value::Object(out)
}

/// Puts several causes (and the message that lists them) in one order: the real server's
/// order follows Go map iteration and changes from one request to the next.
fn sort_causes(status: &mut Map<String, Value>) {
    let Some(causes) = status
        .get_mut("details")
        .and_then(|d| d.get_mut("causes"))
        .and_then(Value::as_array_mut)
        .filter(|c| c.len() > 1)
    else {
        return;
    };
    let render = |c: &Value| {
        let field = c["field"].as_str().unwrap_or("");
        let message = c["message"].as_str().unwrap_or("");
        if field.is_empty() {
            message.to_string()
        } else {
            format!("{field}: {message}")
        }
    };
    let listed = causes.iter().map(render).collect::<Vec<_>>().join(", ");
    causes.sort_by_key(|c| (render(c), c.to_string()));
    let sorted = causes.iter().map(render).collect::<Vec<_>>().join(", ");
    if let Some(message) = status.get("message").and_then(Value::as_str)
        && let Some((prefix, rest)) = message.split_once(" is invalid: [")
        && rest.strip_suffix(']') == Some(listed.as_str())
    {
        let message = format!("{prefix} is invalid: [{sorted}]");
        status.insert("message".into(), json!(message));
    }
}

fn mask_message(msg: &str) -> String {
    let too_old = regex::Regex::new(r"too old resource version: \d+ \(\d+\)").unwrap();
    too_old
        .replace_all(msg, "too old resource version: <rv> (<rv>)")
        .into_owned()
}

/// An object with uids, timestamps and resourceVersions masked and `managedFields` dropped.
fn mask(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "managedFields")
                .map(|(k, v)| {
                    let masked = match k.as_str() {
                        "uid" | "resourceVersion" | "creationTimestamp" | "deletionTimestamp"
                        | "lastTransitionTime"
                            if v.is_string() =>
                        {
                            json!("<set>")
                        }
                        _ => mask(v),
                    };
                    (k.clone(), masked)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(mask).collect()),
        other => other.clone(),
    }
}

/// Only the status code, for answers that race with the real server's controllers.
fn code_only(v: Value) -> Value {
    json!({"code": v["code"]})
}

fn is_gone(r: &Reply) -> bool {
    r.code == 404
}

fn is_ok(r: &Reply) -> bool {
    r.code == 200
}

fn is_expired(r: &Reply) -> bool {
    r.code == 410
}

fn is_established(r: &Reply) -> bool {
    r.body
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
}

fn has_deletion_timestamp(r: &Reply) -> bool {
    r.body.pointer("/metadata/deletionTimestamp").is_some()
}

fn has_no_owner(r: &Reply) -> bool {
    r.code == 200 && r.body.pointer("/metadata/ownerReferences").is_none()
}

/// A ConfigMap body.
fn cm(name: &str, labels: Value, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": data})
}

/// A Gadget body.
fn gadget(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "diff.example.com/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": spec})
}

/// An ownerReference to a ConfigMap whose uid was captured as `${var}`.
fn owned_by(owner: &str, var: &str, block: bool) -> Value {
    json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": format!("${{{var}}}"), "blockOwnerDeletion": block}])
}

/// Compacts the real server's etcd as kube-apiserver's own compactor does: it records the
/// revision under `compact_rev_key` (the API server watches that key to learn of
/// compactions) and compacts etcd to it, both through etcd's JSON gateway.
async fn compact_real(etcd_url: &str) {
    let uri: http::Uri = etcd_url.parse().expect("etcd url");
    let etcd = kube::Client::try_from(kube::Config::new(uri)).expect("etcd client");
    let call = |path: &'static str, body: Value| {
        let etcd = etcd.clone();
        async move {
            let request = http::Request::post(path)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string().into_bytes())
                .expect("request");
            let text = etcd
                .request_text(request)
                .await
                .unwrap_or_else(|e| panic!("etcd {path}: {e}"));
            serde_json::from_str::<Value>(&text).expect("etcd answers JSON")
        }
    };
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let key = b64("compact_rev_key");
    let range = call("/v3/kv/range", json!({"key": key})).await;
    let revision = range["header"]["revision"]
        .as_str()
        .expect("etcd revision")
        .to_string();
    call("/v3/kv/put", json!({"key": key, "value": b64(&revision)})).await;
    let compacted = call("/v3/kv/compaction", json!({"revision": revision})).await;
    assert!(
        compacted.get("header").is_some(),
        "etcd compaction failed: {compacted}"
    );
}

/// The known differences, each with both answers as compared. docs/embedded-apiserver.md
/// ("Known differences from kube-apiserver v1.37.2") explains why each is acceptable.
fn known_differences() -> BTreeMap<&'static str, Known> {
    let watched = |name: &str, data: Option<Value>| {
        let mut o = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "creationTimestamp": "<set>", "labels": {"watch": "yes"}, "name": name,
            "namespace": NS, "resourceVersion": "<set>", "uid": "<set>"}});
        if let Some(d) = data {
            o["data"] = d;
        }
        o
    };
    BTreeMap::from([
        // Built-in kinds are stored as sent: no pruning, so no strict field validation.
        (
            "cm create strict with an unknown field",
            Known {
                embedded: json!({"code": 201, "body": {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"creationTimestamp": "<set>", "labels": {"app": "strict"}, "name": "strict",
                        "namespace": NS, "resourceVersion": "<set>", "uid": "<set>"},
                    "spec": {"bogus": true}}}),
                real: json!({"code": 400, "body": {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                    "code": 400, "reason": "BadRequest",
                    "message": "ConfigMap in version \"v1\" cannot be handled as a ConfigMap: strict decoding error: unknown field \"spec\""}}),
            },
        ),
        // The embedded history holds `history_limit` events; the real watch cache keeps
        // recent events whatever etcd compacted.
        (
            "watch from a resourceVersion the embedded history no longer holds",
            Known {
                embedded: json!({"code": 200, "body": [{"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": "too old resource version: <rv> (<rv>)"}}]}),
                real: json!({"code": 200, "body": [
                    {"type": "MODIFIED", "object": watched("w1", Some(json!({"n": "1"})))},
                    {"type": "ADDED", "object": watched("w2", None)},
                    {"type": "DELETED", "object": watched("w2", None)},
                    {"type": "DELETED", "object": watched("w1", Some(json!({"n": "1"})))},
                ]}),
            },
        ),
    ])
}

/// One scripted sequence of requests, sent to the embedded server and to a real
/// kube-apiserver, gets the same answers from both apart from the listed known differences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_server_answers_like_kube_apiserver() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let cp = kube_testbed::ControlPlane::start(kube_testbed::Options {
        bin_dir: bin_dir(),
        dir: dir.path().to_path_buf(),
        node_agent: false,
    })
    .await
    .expect("start the control plane");
    let server = ApiServer::start(Options {
        history_limit: HISTORY_LIMIT,
        ..Options::default()
    })
    .await
    .expect("start the embedded server");
    let mut d = Diff {
        embedded: Side {
            name: "embedded",
            client: server.client().expect("embedded client"),
            vars: BTreeMap::new(),
        },
        real: Side {
            name: "real",
            client: cp.client().await.expect("real client"),
            vars: BTreeMap::new(),
        },
        known: known_differences(),
        seen_known: BTreeSet::new(),
        failures: Vec::new(),
        steps: 0,
    };
    let ready = started.elapsed();
    script(&mut d, cp.etcd_url()).await;
    let unseen: Vec<&str> = d
        .known
        .keys()
        .copied()
        .filter(|k| !d.seen_known.contains(*k))
        .collect();
    eprintln!(
        "differential: {} steps, {} known differences, control plane ready after {ready:?}, {:?} in all",
        d.steps,
        d.known.len(),
        started.elapsed()
    );
    assert!(
        unseen.is_empty(),
        "known differences without a step: {unseen:?}"
    );
    assert!(
        d.failures.is_empty(),
        "{} difference(s) between the embedded server and kube-apiserver:\n\n{}",
        d.failures.len(),
        d.failures.join("\n\n")
    );
}

async fn script(d: &mut Diff, etcd_url: &str) {
    // A namespace; its resourceVersion predates the CRD, so it is older than the real
    // server's watch cache of the custom resource.
    let r = d
        .step(
            "namespace create",
            post("/api/v1/namespaces", json!({"metadata": {"name": NS}})),
        )
        .await;
    d.capture("rv_before_crd", &r, "/metadata/resourceVersion");
    d.step_with("crd create", post(CRDS, crd()), code_only)
        .await;
    d.step_until(
        "crd established",
        get(&format!("{CRDS}/{CRD_NAME}")),
        is_established,
    )
    .await;
    d.step_until("gadgets served", get(GD), is_ok).await;

    configmaps(d).await;
    gadgets(d).await;
    metadata_only(d).await;
    finalizers(d).await;
    cascading(d).await;
    watches_and_compaction(d, etcd_url).await;
    teardown(d).await;
}

/// Create, get and list with selectors, updates and every patch format on a built-in kind.
async fn configmaps(d: &mut Diff) {
    let alpha = cm(
        "alpha",
        json!({"app": "diff", "tier": "a"}),
        json!({"k": "v"}),
    );
    let r = d.step("cm create", post(CM, alpha.clone())).await;
    d.capture("alpha_rv1", &r, "/metadata/resourceVersion");
    d.step(
        "cm create beta",
        post(
            CM,
            cm("beta", json!({"app": "diff", "tier": "b"}), json!({})),
        ),
    )
    .await;
    d.step(
        "cm create gamma",
        post(CM, cm("gamma", json!({"app": "other"}), json!({"g": "1"}))),
    )
    .await;
    d.step("cm create duplicate", post(CM, alpha.clone())).await;
    d.step(
        "cm create in a missing namespace",
        post("/api/v1/namespaces/nowhere/configmaps", alpha.clone()),
    )
    .await;
    d.step(
        "cm create without a name",
        post(CM, json!({"data": {"a": "1"}})),
    )
    .await;
    d.step(
        "cm create with an invalid name",
        post(CM, json!({"metadata": {"name": "Not_Valid"}})),
    )
    .await;
    d.step(
        "cm create dry run",
        post(
            &format!("{CM}?dryRun=All"),
            cm("ghost", json!({"app": "diff"}), json!({})),
        ),
    )
    .await;
    d.step("cm get the dry-run object", get(&format!("{CM}/ghost")))
        .await;
    d.step(
        "cm create with an unsupported content type",
        req(
            http::Method::POST,
            CM,
            "text/plain",
            Some(cm("plain", json!({}), json!({})).to_string()),
        ),
    )
    .await;
    let mut unknown = cm("strict", json!({"app": "strict"}), json!({}));
    unknown["spec"] = json!({"bogus": true});
    d.step(
        "cm create strict with an unknown field",
        post(&format!("{CM}?fieldValidation=Strict"), unknown),
    )
    .await;
    d.step("cm get", get(&format!("{CM}/alpha"))).await;
    d.step("cm get missing", get(&format!("{CM}/nope"))).await;

    for (name, query) in [
        ("cm list app=diff", "labelSelector=app%3Ddiff"),
        (
            "cm list tier in (a,b),app!=other",
            "labelSelector=tier+in+(a%2Cb)%2Capp!%3Dother",
        ),
        ("cm list tier,!missing", "labelSelector=tier%2C!missing"),
        (
            "cm list app==diff,tier notin (a)",
            "labelSelector=app%3D%3Ddiff%2Ctier+notin+(a)",
        ),
        (
            "cm list metadata.name=beta",
            "fieldSelector=metadata.name%3Dbeta",
        ),
        (
            "cm list app=diff,metadata.name!=alpha",
            "labelSelector=app%3Ddiff&fieldSelector=metadata.name!%3Dalpha",
        ),
        (
            "cm list an unsupported field selector",
            "fieldSelector=data.k%3Dv",
        ),
        (
            "cm list a malformed field selector",
            "fieldSelector=metadata.name",
        ),
        ("cm list page 1", "labelSelector=app%3Ddiff&limit=1"),
    ] {
        d.step(name, get(&format!("{CM}?{query}"))).await;
    }
    d.step(
        "cm list across namespaces by namespace and name",
        get("/api/v1/configmaps?fieldSelector=metadata.namespace%3Ddiff%2Cmetadata.name%3Dgamma"),
    )
    .await;

    let mut update = alpha.clone();
    update["metadata"]["resourceVersion"] = json!("${alpha_rv1}");
    update["data"] = json!({"k": "v2"});
    d.step("cm update", put(&format!("{CM}/alpha"), update.clone()))
        .await;
    update["data"] = json!({"k": "stale"});
    d.step(
        "cm update with a stale resourceVersion",
        put(&format!("{CM}/alpha"), update),
    )
    .await;
    d.step(
        "cm update without resourceVersion",
        put(
            &format!("{CM}/beta"),
            cm(
                "beta",
                json!({"app": "diff", "tier": "b"}),
                json!({"u": "1"}),
            ),
        ),
    )
    .await;
    d.step(
        "cm update with a mismatched name",
        put(&format!("{CM}/alpha"), cm("other", json!({}), json!({}))),
    )
    .await;
    d.step(
        "cm update of a missing object",
        put(&format!("{CM}/nope"), cm("nope", json!({}), json!({}))),
    )
    .await;

    let alpha_url = format!("{CM}/alpha");
    d.step(
        "cm json patch",
        patch(
            &alpha_url,
            "application/json-patch+json",
            json!([{"op": "add", "path": "/data/j", "value": "1"}]),
        ),
    )
    .await;
    d.step(
        "cm json patch with a failing test",
        patch(
            &alpha_url,
            "application/json-patch+json",
            json!([{"op": "test", "path": "/data/k", "value": "nope"}, {"op": "remove", "path": "/data/k"}]),
        ),
    )
    .await;
    d.step(
        "cm json patch removing a missing path",
        patch(
            &alpha_url,
            "application/json-patch+json",
            json!([{"op": "remove", "path": "/data/missing"}]),
        ),
    )
    .await;
    d.step(
        "cm merge patch",
        merge(&alpha_url, json!({"data": {"m": "1", "j": null}})),
    )
    .await;
    d.step(
        "cm merge patch with a body that is not JSON",
        req(
            http::Method::PATCH,
            &alpha_url,
            "application/merge-patch+json",
            Some("not json".into()),
        ),
    )
    .await;
    d.step(
        "cm strategic merge patch",
        patch(
            &alpha_url,
            "application/strategic-merge-patch+json",
            json!({"metadata": {"labels": {"smp": "yes"}}, "data": {"s": "1"}}),
        ),
    )
    .await;
    d.step(
        "cm patch with an unsupported content type",
        req(
            http::Method::PATCH,
            &alpha_url,
            "text/plain",
            Some("{}".into()),
        ),
    )
    .await;
    d.step(
        "cm patch of a missing object",
        merge(&format!("{CM}/nope"), json!({"data": {"a": "1"}})),
    )
    .await;

    // Server-side apply: create, a conflicting manager, force, and a conflict with an updater.
    let delta = |owner: &str| cm("delta", json!({"app": "ssa"}), json!({"owner": owner}));
    d.step(
        "cm apply creates",
        apply(&format!("{CM}/delta?fieldManager=alice"), delta("alice")),
    )
    .await;
    d.step(
        "cm apply without a field manager",
        apply(&format!("{CM}/delta"), delta("alice")),
    )
    .await;
    d.step(
        "cm apply again unchanged",
        apply(&format!("{CM}/delta?fieldManager=alice"), delta("alice")),
    )
    .await;
    d.step(
        "cm apply by another manager conflicts",
        apply(&format!("{CM}/delta?fieldManager=bob"), delta("bob")),
    )
    .await;
    d.step(
        "cm apply forced",
        apply(
            &format!("{CM}/delta?fieldManager=bob&force=true"),
            delta("bob"),
        ),
    )
    .await;
    d.step(
        "cm apply by the previous owner conflicts",
        apply(&format!("{CM}/delta?fieldManager=alice"), delta("alice")),
    )
    .await;
    d.step(
        "cm apply conflicts with an update manager",
        apply(
            &format!("{CM}/alpha?fieldManager=bob"),
            cm("alpha", json!({}), json!({"k": "bob"})),
        ),
    )
    .await;
}

/// A custom resource: schema validation, field validation, status subresource, patches, apply.
async fn gadgets(d: &mut Diff) {
    let g1 = format!("{GD}/g1");
    let mut body = gadget("g1", json!({"size": 3, "color": "red"}));
    body["status"] = json!({"phase": "set on create"});
    let r = d.step("gadget create", post(GD, body)).await;
    d.capture("g1_rv1", &r, "/metadata/resourceVersion");
    d.step(
        "gadget create invalid",
        post(GD, gadget("bad", json!({"size": 30, "color": "green"}))),
    )
    .await;
    d.step(
        "gadget create without a required field",
        post(GD, gadget("bad", json!({"color": "red"}))),
    )
    .await;
    d.step(
        "gadget create with a wrong type",
        post(GD, gadget("bad", json!({"size": "three", "tags": "x"}))),
    )
    .await;
    d.step(
        "gadget create strict with an unknown field",
        post(
            &format!("{GD}?fieldValidation=Strict"),
            gadget("bad", json!({"size": 1, "bogus": true})),
        ),
    )
    .await;
    d.step(
        "gadget create warns of an unknown field",
        post(GD, gadget("warned", json!({"size": 1, "bogus": true}))),
    )
    .await;
    d.step(
        "gadget create ignores an unknown field",
        post(
            &format!("{GD}?fieldValidation=Ignore"),
            gadget("ignored", json!({"size": 1, "bogus": true})),
        ),
    )
    .await;
    d.step(
        "gadget create with a mismatched kind",
        post(
            GD,
            json!({"apiVersion": "diff.example.com/v1", "kind": "Widget", "metadata": {"name": "bad"}, "spec": {"size": 1}}),
        ),
    )
    .await;
    d.step("gadget get", get(&g1)).await;
    d.step(
        "gadget list metadata.name=g1",
        get(&format!("{GD}?fieldSelector=metadata.name%3Dg1")),
    )
    .await;
    d.step(
        "gadget list an unsupported field selector",
        get(&format!("{GD}?fieldSelector=spec.size%3D3")),
    )
    .await;

    d.step(
        "gadget update without resourceVersion",
        put(&g1, gadget("g1", json!({"size": 4}))),
    )
    .await;
    let mut body = gadget("g1", json!({"size": 4, "color": "red"}));
    body["metadata"]["resourceVersion"] = json!("${g1_rv1}");
    body["status"] = json!({"phase": "set on update"});
    let r = d
        .step("gadget update ignores status", put(&g1, body.clone()))
        .await;
    d.capture("g1_rv2", &r, "/metadata/resourceVersion");
    d.step("gadget update with a stale resourceVersion", put(&g1, body))
        .await;
    d.step(
        "gadget merge patch ignores status",
        merge(
            &g1,
            json!({"spec": {"size": 5}, "status": {"phase": "main"}}),
        ),
    )
    .await;
    let r = d
        .step(
            "gadget status patch ignores spec",
            merge(
                &format!("{g1}/status"),
                json!({"spec": {"size": 9}, "status": {"phase": "Ready", "count": 1}}),
            ),
        )
        .await;
    d.capture("g1_rv3", &r, "/metadata/resourceVersion");
    let mut body = gadget("g1", json!({"size": 8, "color": "blue"}));
    body["metadata"]["resourceVersion"] = json!("${g1_rv3}");
    body["status"] = json!({"phase": "Done"});
    d.step(
        "gadget status update ignores spec",
        put(&format!("{g1}/status"), body.clone()),
    )
    .await;
    body["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("resourceVersion");
    d.step(
        "gadget status update without resourceVersion",
        put(&format!("{g1}/status"), body),
    )
    .await;
    d.step(
        "gadget status patch invalid",
        merge(
            &format!("{g1}/status"),
            json!({"status": {"count": "many"}}),
        ),
    )
    .await;
    d.step(
        "gadget json patch",
        patch(
            &g1,
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/spec/size", "value": 6}]),
        ),
    )
    .await;
    d.step(
        "gadget json patch with a failing test",
        patch(
            &g1,
            "application/json-patch+json",
            json!([{"op": "test", "path": "/spec/size", "value": 1}, {"op": "replace", "path": "/spec/size", "value": 2}]),
        ),
    )
    .await;
    d.step(
        "gadget merge patch invalid",
        merge(&g1, json!({"spec": {"size": 0}})),
    )
    .await;
    d.step(
        "gadget strategic merge patch",
        patch(
            &g1,
            "application/strategic-merge-patch+json",
            json!({"spec": {"size": 7}}),
        ),
    )
    .await;
    d.step(
        "gadget patch with an unsupported content type",
        req(http::Method::PATCH, &g1, "text/plain", Some("{}".into())),
    )
    .await;

    let g2 = format!("{GD}/g2");
    let r = d
        .step(
            "gadget apply creates",
            apply(
                &format!("{g2}?fieldManager=alice"),
                gadget("g2", json!({"size": 2, "color": "blue"})),
            ),
        )
        .await;
    d.capture("g2_rv1", &r, "/metadata/resourceVersion");
    d.step(
        "gadget apply conflicts on one field",
        apply(
            &format!("{g2}?fieldManager=bob"),
            gadget("g2", json!({"size": 3})),
        ),
    )
    .await;
    d.step(
        "gadget apply conflicts on two fields",
        apply(
            &format!("{g2}?fieldManager=bob"),
            gadget("g2", json!({"size": 3, "color": "red"})),
        ),
    )
    .await;
    d.step(
        "gadget apply of the same values does not conflict",
        apply(
            &format!("{g2}?fieldManager=bob"),
            gadget("g2", json!({"size": 2})),
        ),
    )
    .await;
    d.step(
        "gadget apply forced",
        apply(
            &format!("{g2}?fieldManager=bob&force=true"),
            gadget("g2", json!({"size": 3, "color": "red"})),
        ),
    )
    .await;
    let mut status = gadget("g2", json!({}));
    status.as_object_mut().expect("object").remove("spec");
    status["status"] = json!({"phase": "Applied"});
    d.step(
        "gadget apply to status",
        apply(&format!("{g2}/status?fieldManager=alice"), status),
    )
    .await;
    d.step(
        "gadget watch from a resourceVersion",
        get(&format!(
            "{GD}?watch=true&fieldSelector=metadata.name%3Dg2&resourceVersion=${{g2_rv1}}&timeoutSeconds=1"
        )),
    )
    .await;
}

/// What `kube`'s `get_metadata`, `watch_metadata` and metadata patches ask for.
const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
/// What `kube`'s `list_metadata` asks for.
const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// Metadata-only answers (PartialObjectMetadata) to lists, gets, writes and watches, and 406
/// for a shape that does not fit the answer.
async fn metadata_only(d: &mut Diff) {
    d.step(
        "cm list metadata app=diff",
        get(&format!("{CM}?labelSelector=app%3Ddiff")).accepting(METADATA_LIST),
    )
    .await;
    d.step(
        "cm list metadata page 1",
        get(&format!("{CM}?labelSelector=app%3Ddiff&limit=1")).accepting(METADATA_LIST),
    )
    .await;
    d.step(
        "cm list metadata of no object",
        get(&format!("{CM}?labelSelector=app%3Dnone")).accepting(METADATA_LIST),
    )
    .await;
    d.step(
        "cm get metadata",
        get(&format!("{CM}/alpha")).accepting(METADATA),
    )
    .await;
    d.step(
        "cm get metadata of a missing object",
        get(&format!("{CM}/nope")).accepting(METADATA),
    )
    .await;
    d.step(
        "cm list asking for one object's metadata",
        get(&format!("{CM}?labelSelector=app%3Ddiff")).accepting(METADATA),
    )
    .await;
    d.step(
        "cm get asking for a metadata list",
        get(&format!("{CM}/alpha")).accepting(METADATA_LIST),
    )
    .await;
    let r = d
        .step(
            "cm merge patch answering metadata",
            merge(
                &format!("{CM}/beta"),
                json!({"metadata": {"annotations": {"meta": "only"}}}),
            )
            .accepting(METADATA),
        )
        .await;
    d.capture("rv_meta", &r, "/metadata/resourceVersion");
    d.step(
        "cm create answering metadata",
        post(CM, cm("epsilon", json!({"app": "diff"}), json!({"e": "1"}))).accepting(METADATA),
    )
    .await;
    d.step(
        "cm delete answering metadata",
        delete(&format!("{CM}/epsilon")).accepting(METADATA),
    )
    .await;
    d.step(
        "cm watch metadata from a resourceVersion",
        get(&format!(
            "{CM}?watch=true&labelSelector=app%3Ddiff&resourceVersion=${{rv_meta}}&timeoutSeconds=1"
        ))
        .accepting(METADATA),
    )
    .await;
    d.step(
        "cm watch metadata with initial events",
        get(&format!(
            "{CM}?watch=true&labelSelector=app%3Ddiff&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1"
        ))
        .accepting(METADATA),
    )
    .await;
    d.step(
        "gadget list metadata",
        get(&format!("{GD}?fieldSelector=metadata.name%3Dg1")).accepting(METADATA_LIST),
    )
    .await;
    d.step(
        "gadget get metadata",
        get(&format!("{GD}/g1")).accepting(METADATA),
    )
    .await;
    d.step(
        "gadget list asking for one object's metadata",
        get(&format!("{GD}?fieldSelector=metadata.name%3Dg1")).accepting(METADATA),
    )
    .await;
    d.step(
        "gadget get asking for a metadata list",
        get(&format!("{GD}/g1")).accepting(METADATA_LIST),
    )
    .await;
}

/// Deletion with finalizers: marked first, removed when the last finalizer goes.
async fn finalizers(d: &mut Diff) {
    let held = format!("{CM}/held");
    let mut body = cm("held", json!({}), json!({"a": "1"}));
    body["metadata"]["finalizers"] = json!(["diff.example.com/hold"]);
    d.step("cm create with a finalizer", post(CM, body)).await;
    d.step("cm delete with a finalizer", delete(&held)).await;
    d.step("cm get while finalizing", get(&held)).await;
    d.step("cm delete again while finalizing", delete(&held))
        .await;
    d.step(
        "cm update while finalizing",
        merge(&held, json!({"data": {"b": "2"}})),
    )
    .await;
    d.step(
        "cm add a finalizer while finalizing",
        merge(
            &held,
            json!({"metadata": {"finalizers": ["diff.example.com/hold", "diff.example.com/more"]}}),
        ),
    )
    .await;
    d.step(
        "cm remove the finalizer",
        merge(&held, json!({"metadata": {"finalizers": null}})),
    )
    .await;
    d.step("cm get after finalizing", get(&held)).await;

    let gf = format!("{GD}/gf");
    let mut body = gadget("gf", json!({"size": 1}));
    body["metadata"]["finalizers"] = json!(["diff.example.com/hold"]);
    d.step("gadget create with a finalizer", post(GD, body))
        .await;
    d.step("gadget delete with a finalizer", delete(&gf)).await;
    d.step(
        "gadget remove the finalizer",
        patch(
            &gf,
            "application/json-patch+json",
            json!([{"op": "remove", "path": "/metadata/finalizers"}]),
        ),
    )
    .await;
    d.step("gadget get after finalizing", get(&gf)).await;
    d.step("gadget delete", delete(&format!("{GD}/warned")))
        .await;
    d.step("gadget delete missing", delete(&format!("{GD}/nope")))
        .await;
    d.step("cm delete", delete(&format!("{CM}/gamma"))).await;
    d.step(
        "cm delete collection",
        delete(&format!("{CM}?labelSelector=app%3Dssa")),
    )
    .await;
}

/// Owner references: background, foreground (also with a dependent held by a finalizer) and
/// orphan propagation. The real garbage collector acts asynchronously, so the results are
/// compared once they have happened.
async fn cascading(d: &mut Diff) {
    let owner = |name: &str| post(CM, cm(name, json!({}), json!({})));
    let dependent = |name: &str, owner: &str, var: &str, block: bool| {
        let mut body = cm(name, json!({}), json!({}));
        body["metadata"]["ownerReferences"] = owned_by(owner, var, block);
        body
    };

    let r = d
        .step("cm create owner (background)", owner("parent-bg"))
        .await;
    d.capture("uid_bg", &r, "/metadata/uid");
    d.step(
        "cm create dependent (background)",
        post(CM, dependent("child-bg", "parent-bg", "uid_bg", false)),
    )
    .await;
    d.step(
        "cm delete owner (background)",
        delete(&format!("{CM}/parent-bg?propagationPolicy=Background")),
    )
    .await;
    d.step_until(
        "dependent collected (background)",
        get(&format!("{CM}/child-bg")),
        is_gone,
    )
    .await;

    let r = d
        .step("cm create owner (foreground)", owner("parent-fg"))
        .await;
    d.capture("uid_fg", &r, "/metadata/uid");
    d.step(
        "cm create dependent (foreground)",
        post(CM, dependent("child-fg", "parent-fg", "uid_fg", true)),
    )
    .await;
    d.step(
        "cm delete owner (foreground)",
        delete(&format!("{CM}/parent-fg?propagationPolicy=Foreground")),
    )
    .await;
    d.step_until(
        "dependent collected (foreground)",
        get(&format!("{CM}/child-fg")),
        is_gone,
    )
    .await;
    d.step_until(
        "owner collected (foreground)",
        get(&format!("{CM}/parent-fg")),
        is_gone,
    )
    .await;

    let r = d
        .step(
            "cm create owner (foreground, held dependent)",
            owner("parent-fh"),
        )
        .await;
    d.capture("uid_fh", &r, "/metadata/uid");
    let mut held = dependent("child-fh", "parent-fh", "uid_fh", true);
    held["metadata"]["finalizers"] = json!(["diff.example.com/hold"]);
    d.step("cm create held dependent", post(CM, held)).await;
    d.step(
        "cm delete owner (foreground, held dependent)",
        delete(&format!("{CM}/parent-fh?propagationPolicy=Foreground")),
    )
    .await;
    d.step_until(
        "held dependent marked for deletion",
        get(&format!("{CM}/child-fh")),
        has_deletion_timestamp,
    )
    .await;
    d.step(
        "owner waits for its held dependent",
        get(&format!("{CM}/parent-fh")),
    )
    .await;
    d.step(
        "cm release the held dependent",
        merge(
            &format!("{CM}/child-fh"),
            json!({"metadata": {"finalizers": null}}),
        ),
    )
    .await;
    d.step_until(
        "owner collected after its dependent",
        get(&format!("{CM}/parent-fh")),
        is_gone,
    )
    .await;

    let r = d.step("cm create owner (orphan)", owner("parent-or")).await;
    d.capture("uid_or", &r, "/metadata/uid");
    d.step(
        "cm create dependent (orphan)",
        post(CM, dependent("child-or", "parent-or", "uid_or", false)),
    )
    .await;
    d.step(
        "cm delete owner (orphan)",
        delete(&format!("{CM}/parent-or?propagationPolicy=Orphan")),
    )
    .await;
    d.step_until(
        "owner removed (orphan)",
        get(&format!("{CM}/parent-or")),
        is_gone,
    )
    .await;
    d.step_until(
        "dependent orphaned",
        get(&format!("{CM}/child-or")),
        has_no_owner,
    )
    .await;
}

/// Watches that resume from a resourceVersion, etcd compaction, and resourceVersions that are
/// too old: the embedded server's history limit against the real server's watch cache.
async fn watches_and_compaction(d: &mut Diff, etcd_url: &str) {
    let r = d
        .step(
            "cm create watched",
            post(CM, cm("w1", json!({"watch": "yes"}), json!({"n": "0"}))),
        )
        .await;
    d.capture("rv_w", &r, "/metadata/resourceVersion");
    let w1 = format!("{CM}/w1");
    d.step("cm modify watched", merge(&w1, json!({"data": {"n": "1"}})))
        .await;
    d.step(
        "cm create second watched",
        post(CM, cm("w2", json!({"watch": "yes"}), json!({}))),
    )
    .await;
    d.step(
        "cm unlabel second watched",
        merge(
            &format!("{CM}/w2"),
            json!({"metadata": {"labels": {"watch": null}}}),
        ),
    )
    .await;
    d.step("cm delete watched", delete(&w1)).await;

    let by_label = format!(
        "{CM}?watch=true&labelSelector=watch%3Dyes&resourceVersion=${{rv_w}}&timeoutSeconds=1"
    );
    let by_name = format!(
        "{CM}?watch=true&fieldSelector=metadata.name%3Dw1&resourceVersion=${{rv_w}}&timeoutSeconds=1"
    );
    d.step(
        "watch from a resourceVersion (label selector)",
        get(&by_label),
    )
    .await;
    d.step(
        "watch from a resourceVersion (field selector)",
        get(&by_name),
    )
    .await;
    d.step(
        "watch from resourceVersion 0",
        get(&format!(
            "{CM}?watch=true&labelSelector=app%3Ddiff&resourceVersion=0&timeoutSeconds=1"
        )),
    )
    .await;
    let r = d
        .step(
            "cm list page 1 before compaction",
            get(&format!("{CM}?labelSelector=app%3Ddiff&limit=1")),
        )
        .await;
    d.capture("token", &r, "/metadata/continue");
    // A write, so that the compaction below lies beyond the page's revision.
    let filler = format!("{CM}/filler");
    d.step_with(
        "cm create filler",
        post(CM, cm("filler", json!({}), json!({"n": "0"}))),
        code_only,
    )
    .await;

    compact_real(etcd_url).await;
    d.step("watch from a compacted resourceVersion", get(&by_label))
        .await;

    // More writes than the embedded server keeps events. They are ConfigMap writes because
    // the real server's watch cache drops its list snapshots older than the compaction only
    // as newer ConfigMap events arrive (and its cache compactor polls).
    for i in 1..FILLER_WRITES {
        d.step_with(
            "cm filler write",
            merge(&filler, json!({"data": {"n": i.to_string()}})),
            code_only,
        )
        .await;
    }

    d.step_until(
        "cm list continue after compaction",
        get(&format!(
            "{CM}?labelSelector=app%3Ddiff&limit=1&continue=${{token}}"
        )),
        is_expired,
    )
    .await;
    d.step(
        "cm list at a compacted resourceVersion",
        get(&format!(
            "{CM}?labelSelector=app%3Ddiff&resourceVersion=${{rv_w}}&resourceVersionMatch=Exact"
        )),
    )
    .await;
    d.step(
        "gadget watch from before the CRD existed",
        get(&format!(
            "{GD}?watch=true&resourceVersion=${{rv_before_crd}}&timeoutSeconds=1"
        )),
    )
    .await;
    d.step(
        "watch from a resourceVersion the embedded history no longer holds",
        get(&by_label),
    )
    .await;
}

/// Deleting a CRD (with objects left) and the namespace.
async fn teardown(d: &mut Diff) {
    d.step("crd delete", delete(&format!("{CRDS}/{CRD_NAME}")))
        .await;
    d.step_until("crd gone", get(&format!("{CRDS}/{CRD_NAME}")), is_gone)
        .await;
    d.step(
        "namespace delete",
        delete(&format!("/api/v1/namespaces/{NS}")),
    )
    .await;
    d.step_until(
        "namespace gone",
        get(&format!("/api/v1/namespaces/{NS}")),
        is_gone,
    )
    .await;
}
