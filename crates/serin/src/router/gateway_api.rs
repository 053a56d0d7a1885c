//! Gateway API: `spec.rules[].backendRefs[].weight` of an HTTPRoute
//! (`gateway.networking.k8s.io/v1`).
//!
//! Serin writes the weights of the rule named in `spec.router.gatewayApi.httpRoute.rule`, or
//! of every rule that references both the primary and the canary Service
//! (`<service>-primary`/`<service>-canary` in workload mode, `spec.backends` in traffic
//! mode). It does not create the HTTPRoute, even in workload mode: attaching a route to a
//! Gateway (`parentRefs`, `hostnames`) is a decision of the platform team that the Canary
//! does not describe, so a missing HTTPRoute is [`RouterError::NotFound`] with the YAML to
//! apply. Weights are relative (default 1); Serin writes percentages.

use async_trait::async_trait;
use kube::Client;
use kube::api::ApiResource;
use serde_json::Value;

use crate::api::{Canary, RouterKind};
use crate::arms::{ArmNames, DataPlaneArm, DataPlaneArms, Weights};

use super::cache::ObjectCache;
use super::k8s::{self, Arm, Located, Objects, Scan, scan_list, str_at};
use super::split::Subject;
use super::{Registration, Router, RouterError, WriteOutcome};

/// The registry's line for this router.
pub(super) const ENTRY: Registration = Registration {
    kind: RouterKind::GatewayApi,
    build: |client, cache| {
        std::sync::Arc::new(HttpRouteRouter::new(client.clone()).with_cache(cache.clone()))
    },
    arms,
};

/// The arms are the backend Services of the route, in the Canary's namespace.
fn arms(canary: &Canary) -> Result<DataPlaneArms, RouterError> {
    let t = Target::of(canary)?;
    let service = |name: &str| DataPlaneArm {
        name: name.to_string(),
        namespace: t.namespace.clone(),
    };
    Ok(DataPlaneArms {
        kind: "Service",
        primary: service(&t.services.0),
        canary: service(&t.services.1),
        pod_apps: ArmNames::of(canary).pod_apps(),
    })
}

/// Routes traffic by writing Gateway API HTTPRoute backendRef weights.
#[derive(Clone)]
pub struct HttpRouteRouter {
    client: Client,
    cache: ObjectCache,
}

fn http_route_resource() -> ApiResource {
    k8s::resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")
}

struct Target {
    subject: Subject,
    rule: Option<String>,
    services: (String, String),
    /// Where the Services live: the Canary's namespace.
    namespace: String,
    port: i32,
}

impl Target {
    fn of(canary: &Canary) -> Result<Target, RouterError> {
        let namespace = canary.metadata.namespace.clone().unwrap_or_default();
        let Some(spec) = canary.spec.router.gateway_api.as_ref() else {
            return Err(RouterError::NotConfigured {
                kind: canary.spec.router.kinds().first().copied(),
            });
        };
        let route = &spec.http_route;
        let route_ns = route.namespace.clone().unwrap_or_else(|| namespace.clone());
        Ok(Target {
            subject: Subject::new("HTTPRoute", &route_ns, &route.name),
            rule: route.rule.clone(),
            services: ArmNames::of(canary).services().into(),
            namespace,
            port: canary.spec.service.port,
        })
    }

    fn not_found_hint(&self) -> String {
        let ns_line = if self.subject.namespace == self.namespace {
            String::new()
        } else {
            format!(", namespace: {}", self.namespace)
        };
        format!(
            "Serin does not create HTTPRoutes (it cannot choose their Gateway); apply one that attaches to your Gateway, e.g. spec: {{parentRefs: [{{name: <gateway>}}], rules: [{{backendRefs: [{{name: {p}, port: {port}, weight: 100{ns_line}}}, {{name: {c}, port: {port}, weight: 0{ns_line}}}]}}]}}, or fix spec.router.gatewayApi.httpRoute",
            p = self.services.0,
            c = self.services.1,
            port = self.port,
        )
    }
}

fn describe(backend: &Value) -> String {
    let kind = str_at(backend, "/kind");
    let ns = str_at(backend, "/namespace");
    let name = str_at(backend, "/name");
    let kind = if kind.is_empty() { "Service" } else { kind };
    if ns.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {ns}/{name}")
    }
}

fn locate(t: &Target, obj: &Value) -> Result<Located, RouterError> {
    let rules = obj
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let arm_of = |b: &Value| -> Option<Arm> {
        let group = str_at(b, "/group");
        let kind = str_at(b, "/kind");
        let ns = str_at(b, "/namespace");
        let ns = if ns.is_empty() {
            t.subject.namespace.as_str()
        } else {
            ns
        };
        if !group.is_empty() || !(kind.is_empty() || kind == "Service") || ns != t.namespace {
            return None;
        }
        let name = str_at(b, "/name");
        if name == t.services.0 {
            Some(Arm::Primary)
        } else if name == t.services.1 {
            Some(Arm::Canary)
        } else {
            None
        }
    };
    let rule_names: Vec<&str> = rules.iter().map(|r| str_at(r, "/name")).collect();
    let selected: Vec<usize> = match &t.rule {
        Some(want) => {
            let i = rule_names.iter().position(|n| n == want).ok_or_else(|| {
                RouterError::NotFound {
                    kind: "HTTPRoute rule",
                    namespace: t.subject.namespace.clone(),
                    name: format!("{}/{want}", t.subject.name),
                    hint: format!(
                        "the HTTPRoute's rules are named {rule_names:?}; fix spec.router.gatewayApi.httpRoute.rule"
                    ),
                }
            })?;
            vec![i]
        }
        None => (0..rules.len()).collect(),
    };
    let mut pairs = Vec::new();
    for i in selected {
        let label = if rule_names[i].is_empty() {
            format!("rule {i}")
        } else {
            format!("rule {:?}", rule_names[i])
        };
        let ptr = format!("/spec/rules/{i}/backendRefs");
        let list = obj
            .pointer(&ptr)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match scan_list(&t.subject, &label, &ptr, &list, 1, arm_of, describe)? {
            Scan::Pair(p) => pairs.push(p),
            Scan::Missing { primary, canary } if t.rule.is_some() => {
                let found: Vec<String> = list.iter().map(describe).collect();
                let missing = match (primary, canary) {
                    (true, true) => format!(
                        "the Services {} and {} (namespace {}) are",
                        t.services.0, t.services.1, t.namespace
                    ),
                    (true, false) => format!(
                        "the Service {} (namespace {}) is",
                        t.services.0, t.namespace
                    ),
                    _ => format!(
                        "the Service {} (namespace {}) is",
                        t.services.1, t.namespace
                    ),
                };
                return Err(t.subject.unroutable(format!(
                    "{label} has the backendRefs {found:?}; {missing} not among them"
                )));
            }
            Scan::Missing { .. } => {}
        }
    }
    if pairs.is_empty() {
        return Err(t.subject.unroutable(format!(
            "no rule has backendRefs for both Services {} and {} (namespace {}); add them to the rule that should be shifted",
            t.services.0, t.services.1, t.namespace
        )));
    }
    Ok(Located {
        pairs,
        default_weight: 1,
    })
}

impl HttpRouteRouter {
    /// A router that reads and writes HTTPRoutes through `client`.
    pub fn new(client: Client) -> Self {
        HttpRouteRouter {
            client,
            cache: ObjectCache::none(),
        }
    }

    /// The same router reading its objects through `cache` (see [`ObjectCache`]).
    pub fn with_cache(mut self, cache: ObjectCache) -> Self {
        self.cache = cache;
        self
    }

    fn objects(&self, t: &Target) -> Objects<'_> {
        Objects::new(
            &self.client,
            &self.cache,
            http_route_resource(),
            &t.subject.namespace,
        )
    }
}

#[async_trait]
impl Router for HttpRouteRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::GatewayApi
    }

    /// Checks that the HTTPRoute exists and has a rule for both Services; writes nothing.
    async fn prepare(&self, canary: &Canary) -> Result<(), RouterError> {
        self.weights(canary).await.map(|_| ())
    }

    async fn weights(&self, canary: &Canary) -> Result<Weights, RouterError> {
        let t = Target::of(canary)?;
        k8s::read_weights(&self.objects(&t), &t.subject, &t.not_found_hint(), |o| {
            locate(&t, o)
        })
        .await
    }

    async fn set_weights(
        &self,
        canary: &Canary,
        expected: Weights,
        desired: Weights,
    ) -> Result<WriteOutcome, RouterError> {
        let t = Target::of(canary)?;
        k8s::write_weights(
            &self.objects(&t),
            &t.subject,
            &t.not_found_hint(),
            |o| locate(&t, o),
            Some(expected),
            desired,
        )
        .await
    }
}
