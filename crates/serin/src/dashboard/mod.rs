//! `kubectl serin dashboard`: a local web page of the Canaries. It lists every Canary with
//! its live phase and weights and, per Canary, the timeline of each rollout (the weight over
//! time as a step chart with the last check at each weight, the outcome and the reason),
//! read from `status.timeline` and `status.history[].timeline`; its buttons write the same
//! commands as `kubectl serin promote|abort|retry|pause|resume`.
//!
//! The page and its script are embedded in the binary. The server listens on 127.0.0.1 only
//! and answers only requests whose path starts with a token made for this start and whose
//! `Host` header is the loopback address it listens on (so a DNS-rebinding page cannot reach
//! it); a command must be a POST of JSON from the dashboard's own origin, so another site's
//! page cannot press its buttons.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use chrono::Utc;
use futures::StreamExt as _;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};

use crate::api::Canary;
use crate::plugin::{Wait, api_error, steer};
use crate::rollout::CommandKind;

/// The port `kubectl serin dashboard` listens on unless `--port` says otherwise.
pub const DEFAULT_PORT: u16 = 3190;

/// How long a button waits for Serin to carry its command out.
const COMMAND_WAIT: Wait = Wait { seconds: 15 };

/// The largest request body accepted (a command needs none).
const MAX_BODY: usize = 4 * 1024;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// What the handler needs: the client for commands, the watched Canaries, the token and
/// the address the page is served from.
struct State {
    client: Client,
    canaries: Store<Canary>,
    scope: Option<String>,
    token: String,
    port: u16,
}

/// Serves the dashboard of the Canaries in `scope` (every namespace when `None`) on
/// 127.0.0.1:`port` until the process is stopped; `ready` gets the URL to open.
pub async fn serve(
    client: Client,
    scope: Option<String>,
    port: u16,
    ready: impl FnOnce(&str),
) -> anyhow::Result<()> {
    let api: Api<Canary> = match &scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // One list first, so a missing permission or CRD gets the plugin's message.
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(|e| api_error(e, scope.as_deref().unwrap_or("*"), None, "list"))
        .map_err(|e| match &scope {
            None => e.context(
                "the dashboard shows every namespace's Canaries unless -n NAMESPACE narrows it",
            ),
            Some(_) => e,
        })?;
    let (store, writer) = reflector::store();
    let watch = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(|_| async {});
    tokio::spawn(watch);

    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .with_context(|| {
            format!("listening on 127.0.0.1:{port}: pass --port with a free port, or --port 0")
        })?;
    let port = listener.local_addr()?.port();
    let state = Arc::new(State {
        client,
        canaries: store.clone(),
        scope,
        token: new_token()?,
        port,
    });
    tokio::time::timeout(Duration::from_secs(30), store.wait_until_ready())
        .await
        .map_err(|_| anyhow!("the Canaries could not be listed and watched within 30s"))?
        .map_err(|e| anyhow!("watching the Canaries: {e}"))?;
    ready(&format!("http://127.0.0.1:{port}/{}/", state.token));
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let state = state.clone();
        async move { handle(&state, req).await }
    });
    axum::serve(listener, app)
        .await
        .context("serving the dashboard")
}

/// A token of 128 random bits, in hex.
fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow!("no random numbers for the token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether two strings are equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The origins the page is served from.
fn own_origins(port: u16) -> [String; 3] {
    [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ]
}

/// Why a request is refused before it is routed, if it is.
fn refusal(port: u16, method: &Method, headers: &HeaderMap) -> Option<(StatusCode, String)> {
    let own = own_origins(port);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !own.iter().any(|o| o == host) {
        return Some((
            StatusCode::FORBIDDEN,
            format!(
                "Host {host:?} is not this dashboard's: open the http://127.0.0.1:{port}/ URL kubectl serin dashboard printed"
            ),
        ));
    }
    if method == Method::GET {
        return None;
    }
    // A command: from the dashboard's own page only.
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let from_own = own.iter().any(|o| origin == format!("http://{o}"));
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("same-origin");
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !from_own || fetch_site != "same-origin" || !json {
        return Some((
            StatusCode::FORBIDDEN,
            "commands are accepted only from the dashboard's own page".into(),
        ));
    }
    None
}

async fn handle(state: &State, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if let Some((status, message)) = refusal(state.port, &parts.method, &parts.headers) {
        return text(status, &message);
    }
    let path = parts.uri.path();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let token = segments.next().unwrap_or("");
    let rest = segments.next();
    if !same(token, &state.token) {
        return text(
            StatusCode::NOT_FOUND,
            "not found: open the URL kubectl serin dashboard printed (its token changes at every start)",
        );
    }
    let Some(rest) = rest else {
        // The page's relative URLs need the trailing slash.
        let mut r = text(StatusCode::PERMANENT_REDIRECT, "");
        if let Ok(v) = HeaderValue::from_str(&format!("/{}/", state.token)) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return r;
    };
    match (&parts.method, rest) {
        (&Method::GET, "") => asset("text/html; charset=utf-8", INDEX_HTML),
        (&Method::GET, "app.js") => asset("text/javascript; charset=utf-8", APP_JS),
        (&Method::GET, "style.css") => asset("text/css; charset=utf-8", STYLE_CSS),
        (&Method::GET, "api/canaries") => json_response(StatusCode::OK, &canaries_json(state)),
        (&Method::POST, command) if command.starts_with("api/canaries/") => {
            if axum::body::to_bytes(body, MAX_BODY).await.is_err() {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is too large",
                );
            }
            let parts: Vec<&str> = command["api/canaries/".len()..].split('/').collect();
            match parts.as_slice() {
                [ns, name, verb] => run_command(state, ns, name, verb).await,
                _ => text(StatusCode::NOT_FOUND, "not found"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Carries out a button's command and says what happened.
async fn run_command(state: &State, ns: &str, name: &str, verb: &str) -> Response<Body> {
    let kind = match verb {
        "promote" => CommandKind::Promote,
        "promote-full" => CommandKind::PromoteFull,
        "abort" => CommandKind::Abort,
        "retry" => CommandKind::Retry,
        "pause" => CommandKind::Pause,
        "resume" => CommandKind::Resume,
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({"ok": false, "message": format!("unknown command {verb:?}: use promote, promote-full, abort, retry, pause or resume")}),
            );
        }
    };
    if state.scope.as_deref().is_some_and(|s| s != ns) {
        return json_response(
            StatusCode::FORBIDDEN,
            &json!({"ok": false, "message": format!("this dashboard shows namespace {:?} only", state.scope.as_deref().unwrap_or_default())}),
        );
    }
    match steer(&state.client, ns, name, kind, COMMAND_WAIT).await {
        Ok(message) => json_response(StatusCode::OK, &json!({"ok": true, "message": message})),
        Err(e) => json_response(
            StatusCode::CONFLICT,
            &json!({"ok": false, "message": format!("{e:#}")}),
        ),
    }
}

/// The page's data: every watched Canary, sorted by namespace and name.
fn canaries_json(state: &State) -> Value {
    let mut canaries = state.canaries.state();
    canaries.sort_by_key(|c| (c.namespace(), c.name_any()));
    let items: Vec<Value> = canaries.iter().map(|c| canary_json(c)).collect();
    json!({
        "now": Utc::now(),
        "scope": state.scope,
        "canaries": items,
    })
}

/// What the page shows of one Canary.
pub fn canary_json(c: &Canary) -> Value {
    let status = c.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .find(|k| k.type_ == crate::api::READY)
        .map(|k| json!({"status": k.status, "reason": k.reason, "message": k.message}));
    json!({
        "namespace": c.namespace().unwrap_or_default(),
        "name": c.name_any(),
        "mode": if c.spec.is_traffic_mode() { "traffic" } else { "workload" },
        "steps": c.spec.steps,
        "interval": c.spec.analysis.interval,
        "checksPerStep": c.spec.analysis.checks_per_step,
        "failureThreshold": c.spec.analysis.failure_threshold,
        "metrics": c.spec.analysis.metrics.iter().map(|m| json!({
            "name": m.name,
            "min": m.min,
            "max": m.max,
        })).collect::<Vec<_>>(),
        "paused": c.spec.paused || status.paused_by_command,
        "ready": ready,
        "status": status,
    })
}

fn security_headers(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    security_headers(&mut r);
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response<Body> {
    response(StatusCode::OK, content_type, body.to_string())
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    response(status, "application/json", value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    type Headers = Vec<(&'static str, &'static str)>;

    /// The refusals that keep other sites and rebinding hosts away from the buttons.
    #[test]
    fn only_the_own_page_may_send_commands() {
        let own_post = [
            ("host", "127.0.0.1:4000"),
            ("origin", "http://127.0.0.1:4000"),
            ("content-type", "application/json"),
            ("sec-fetch-site", "same-origin"),
        ];
        let but = |key: &'static str, value: &'static str| {
            own_post
                .iter()
                .map(|&(k, v)| (k, if k == key { value } else { v }))
                .filter(|(_, v)| !v.is_empty())
                .collect::<Vec<_>>()
        };
        let cases: Vec<(Method, Headers, bool)> = vec![
            (Method::GET, vec![("host", "127.0.0.1:4000")], true),
            (Method::GET, vec![("host", "localhost:4000")], true),
            (Method::GET, vec![("host", "evil.example:4000")], false),
            (Method::GET, vec![("host", "127.0.0.1:4001")], false),
            (Method::GET, vec![], false),
            (Method::POST, own_post.to_vec(), true),
            (Method::POST, but("origin", "http://evil.example"), false),
            (Method::POST, but("origin", ""), false),
            (Method::POST, but("content-type", "text/plain"), false),
            (Method::POST, but("sec-fetch-site", "cross-site"), false),
            (Method::POST, but("host", "evil.example:4000"), false),
        ];
        for (method, h, allowed) in cases {
            let refused = refusal(4000, &method, &headers(&h));
            assert_eq!(refused.is_none(), allowed, "{method} {h:?}: {refused:?}");
        }
    }

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &b));
        assert!(!same(&a, &a[..31]));
    }
}
