//! Request counters: how many requests the server has served, by client, verb and resource,
//! so that a test or the demo can see which client asks for what and how often.
//!
//! A request is counted once, when it arrives, whatever its answer (an error, a 404 or a watch
//! that stays open for minutes all count one). The key names are those of the real server's
//! audit log:
//! - `client` is the product of the `User-Agent` header, the part before the first `/`
//!   (`kubectl` for `kubectl/v1.37.2 (linux/amd64) kubernetes/abc`); `unknown` when the header
//!   is missing or empty. `kube` 5 sends no `User-Agent` unless its `Config::headers` holds one.
//! - `verb` is the Kubernetes verb of a resource request: `get`, `list`, `watch`, `create`,
//!   `update`, `patch`, `delete` or `deletecollection`. Other requests have the lower-case
//!   HTTP method (`get` for a GET).
//! - `resource` is the plural of a resource request plus `/subresource` when there is one
//!   (`deployments/scale`, `canaries/status`); `unknown` when the URL names no served type.
//!   Other requests are counted in buckets: `discovery` (`/`, `/api`, `/apis` and the group
//!   and version documents), `version`, `openapi`, `health` (`/healthz`, `/readyz`, `/livez`)
//!   and `other` for any other path.
//!
//! Buckets, not paths, keep the number of keys bounded by the clients, verbs and types that
//! exist. It keeps no timings and no history: a snapshot is the totals since start-up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::http::{HeaderMap, Method, header};

/// What one counter counts: requests of one client, with one verb, on one resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey {
    /// Product of the `User-Agent` header (`kubectl`, `serin`), or `unknown`.
    pub client: String,
    /// Kubernetes verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`), or the lower-case HTTP method of a non-resource request.
    pub verb: String,
    /// Plural resource with `/subresource` (`canaries/status`), or a bucket of non-resource
    /// paths (`discovery`, `version`, `openapi`, `health`, `other`).
    pub resource: String,
}

/// The counters of one server.
#[derive(Debug, Default)]
pub struct RequestCounts {
    counts: Mutex<HashMap<RequestKey, u64>>,
}

impl RequestCounts {
    /// Counts one request.
    pub fn record(&self, client: &str, verb: &str, resource: &str) {
        let key = RequestKey {
            client: client.to_string(),
            verb: verb.to_string(),
            resource: resource.to_string(),
        };
        // A panic elsewhere while the lock was held leaves the counts valid: keep counting.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(key).or_default() += 1;
    }

    /// The totals so far, sorted by key. The lock is held only to copy the entries.
    pub fn snapshot(&self) -> BTreeMap<RequestKey, u64> {
        let entries: Vec<(RequestKey, u64)> = {
            let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        entries.into_iter().collect()
    }
}

/// The product of the `User-Agent` header, the part before the first `/`; `None` without a
/// readable header.
pub fn user_agent_product(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::USER_AGENT)
        .and_then(|u| u.to_str().ok())
        .and_then(|u| u.split('/').next())
}

/// The client a request is counted for.
pub fn client(headers: &HeaderMap) -> &str {
    user_agent_product(headers)
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .unwrap_or("unknown")
}

/// The verb of a request on a resource URL: a collection or, with `named`, one object.
pub fn resource_verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => method_verb(method),
    }
}

/// The verb of a non-resource request: its lower-case HTTP method (`other` for an extension
/// method, which would otherwise be a key of the client's choosing).
pub fn method_verb(method: &Method) -> &'static str {
    match *method {
        Method::GET => "get",
        Method::HEAD => "head",
        Method::POST => "post",
        Method::PUT => "put",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        Method::OPTIONS => "options",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(user_agent: Option<&'static str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(ua) = user_agent {
            h.insert(header::USER_AGENT, HeaderValue::from_static(ua));
        }
        h
    }

    /// The client is the User-Agent's product, `unknown` without one.
    #[test]
    fn client_is_the_user_agent_product() {
        assert_eq!(
            client(&headers(Some(
                "kubectl/v1.37.2 (linux/amd64) kubernetes/abc"
            ))),
            "kubectl"
        );
        assert_eq!(client(&headers(Some("serin"))), "serin");
        assert_eq!(client(&headers(Some("/v1"))), "unknown");
        assert_eq!(client(&headers(None)), "unknown");
    }

    /// Methods map to the audit log's verbs on collections and objects.
    #[test]
    fn verbs_of_resource_requests() {
        let cases = [
            (Method::GET, false, true, "watch"),
            (Method::GET, true, true, "watch"),
            (Method::GET, true, false, "get"),
            (Method::GET, false, false, "list"),
            (Method::POST, false, false, "create"),
            (Method::PUT, true, false, "update"),
            (Method::PATCH, true, false, "patch"),
            (Method::DELETE, true, false, "delete"),
            (Method::DELETE, false, false, "deletecollection"),
            (Method::OPTIONS, false, false, "options"),
        ];
        for (method, named, watch, verb) in cases {
            assert_eq!(
                resource_verb(&method, named, watch),
                verb,
                "{method} {named} {watch}"
            );
        }
    }

    /// Requests with the same key add up; a snapshot is sorted and leaves the counts as they are.
    #[test]
    fn counts_add_up_per_key() {
        let counts = RequestCounts::default();
        counts.record("a", "get", "pods");
        counts.record("a", "get", "pods");
        counts.record("b", "get", "pods");
        counts.record("a", "update", "canaries/status");
        let key = |c: &str, v: &str, r: &str| RequestKey {
            client: c.into(),
            verb: v.into(),
            resource: r.into(),
        };
        let expected = BTreeMap::from([
            (key("a", "get", "pods"), 2),
            (key("a", "update", "canaries/status"), 1),
            (key("b", "get", "pods"), 1),
        ]);
        assert_eq!(counts.snapshot(), expected);
        assert_eq!(counts.snapshot(), expected);
    }
}
