//! Gloo Edge: weights of an UpstreamGroup's destinations, or of the
//! `routeAction.multi.destinations` of the routes of a VirtualService or RouteTable (what
//! Flagger writes, so header-matching routes stay possible).
//!
//! Arms map to upstreams by name: `spec.router.gloo.upstreams` when set; otherwise Gloo
//! discovery's `<namespace>-<service>-<port>` with the Canary's namespace, and, when no
//! destination has that exact name, the one destination whose name ends in
//! `-<service>-<port>` (the same Service discovered in another namespace). A `kube`
//! destination matches by Service name and port. Gloo weights are relative; Serin writes
//! percentages and reads them back rounded (see [`to_percent`](super::split::to_percent)).
//! It creates nothing: the Gloo objects belong to the user.

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
    kind: RouterKind::Gloo,
    build: |client, cache| {
        std::sync::Arc::new(GlooEdgeRouter::new(client.clone()).with_cache(cache.clone()))
    },
    arms,
};

/// The arms are Gloo upstreams: `spec.router.gloo.upstreams`, else the discovery names of
/// the arms' Services. (When neither name is in the object, [`locate`] falls back to the
/// destination whose name ends in `-<service>-<port>`; that name is only known from the
/// object itself.)
fn arms(canary: &Canary) -> Result<DataPlaneArms, RouterError> {
    let t = Target::of(canary)?;
    let upstream = |name: &str| DataPlaneArm {
        name: name.to_string(),
        namespace: t.subject.namespace.clone(),
    };
    Ok(DataPlaneArms {
        kind: "Upstream",
        primary: upstream(&t.upstreams.0),
        canary: upstream(&t.upstreams.1),
        pod_apps: ArmNames::of(canary).pod_apps(),
    })
}

/// The arms as the routing object `obj` holds them: the upstream names (and namespaces) of
/// the destinations [`locate`] finds, the ones the weights move; `kube` destinations keep
/// the names [`arms`] gives.
pub(super) fn arms_in(canary: &Canary, obj: &Value) -> Result<DataPlaneArms, RouterError> {
    let t = Target::of(canary)?;
    let mut found = arms(canary)?;
    let located = locate(&t, obj)?;
    if let Some(pair) = located.pairs.first() {
        for (entry, arm) in [
            (&pair.primary, &mut found.primary),
            (&pair.canary, &mut found.canary),
        ] {
            let name = str_at(&entry.value, "/destination/upstream/name");
            if !name.is_empty() {
                arm.name = name.to_string();
                let ns = str_at(&entry.value, "/destination/upstream/namespace");
                if !ns.is_empty() {
                    arm.namespace = ns.to_string();
                }
            }
        }
    }
    Ok(found)
}

/// Routes traffic by writing Gloo Edge destination weights.
#[derive(Clone)]
pub struct GlooEdgeRouter {
    client: Client,
    cache: ObjectCache,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ObjectKind {
    UpstreamGroup,
    VirtualService,
    RouteTable,
}

struct Target {
    kind: ObjectKind,
    subject: Subject,
    /// Upstream names, exact.
    upstreams: (String, String),
    /// Service names (for `kube` destinations and the suffix fallback).
    services: (String, String),
    namespace: String,
    port: i32,
    /// Whether the discovery-name suffix fallback may be used (not with explicit upstreams).
    suffix_ok: bool,
}

impl Target {
    fn of(canary: &Canary) -> Result<Target, RouterError> {
        let namespace = canary.metadata.namespace.clone().unwrap_or_default();
        let Some(spec) = canary.spec.router.gloo.as_ref() else {
            return Err(RouterError::NotConfigured {
                kind: canary.spec.router.kinds().first().copied(),
            });
        };
        let (kind, obj, kind_name) = if let Some(r) = &spec.upstream_group {
            (ObjectKind::UpstreamGroup, r, "UpstreamGroup")
        } else if let Some(r) = &spec.virtual_service {
            (ObjectKind::VirtualService, r, "VirtualService")
        } else if let Some(r) = &spec.route_table {
            (ObjectKind::RouteTable, r, "RouteTable")
        } else {
            return Err(RouterError::Unroutable {
                kind: "Canary",
                namespace,
                name: canary.metadata.name.clone().unwrap_or_default(),
                reason: "spec.router.gloo names no upstreamGroup, virtualService or routeTable"
                    .into(),
            });
        };
        let obj_ns = obj.namespace.clone().unwrap_or_else(|| namespace.clone());
        let names = ArmNames::of(canary);
        let services: (String, String) = names.services().into();
        let port = canary.spec.service.port;
        let (upstreams, suffix_ok) = match &spec.upstreams {
            Some(u) => ((u.primary.clone(), u.canary.clone()), false),
            None => (
                (
                    format!("{namespace}-{}-{port}", services.0),
                    format!("{namespace}-{}-{port}", services.1),
                ),
                true,
            ),
        };
        Ok(Target {
            kind,
            subject: Subject::new(kind_name, &obj_ns, &obj.name),
            upstreams,
            services,
            namespace,
            port,
            suffix_ok,
        })
    }

    fn resource(&self) -> ApiResource {
        match self.kind {
            ObjectKind::UpstreamGroup => {
                k8s::resource("gloo.solo.io", "v1", "UpstreamGroup", "upstreamgroups")
            }
            ObjectKind::VirtualService => {
                k8s::resource("gateway.solo.io", "v1", "VirtualService", "virtualservices")
            }
            ObjectKind::RouteTable => {
                k8s::resource("gateway.solo.io", "v1", "RouteTable", "routetables")
            }
        }
    }

    fn not_found_hint(&self) -> String {
        let (kind, field) = match self.kind {
            ObjectKind::UpstreamGroup => ("UpstreamGroup", "upstreamGroup"),
            ObjectKind::VirtualService => ("VirtualService", "virtualService"),
            ObjectKind::RouteTable => ("RouteTable", "routeTable"),
        };
        format!(
            "create the {kind} with destinations for the upstreams {} and {}, or fix spec.router.gloo.{field}",
            self.upstreams.0, self.upstreams.1
        )
    }
}

/// How one destination entry (`{destination: {upstream|kube: ...}, weight}`) is named.
fn describe(entry: &Value) -> String {
    let up = str_at(entry, "/destination/upstream/name");
    if !up.is_empty() {
        return format!("upstream {up}");
    }
    let kube = str_at(entry, "/destination/kube/ref/name");
    if !kube.is_empty() {
        return format!("kube service {kube}");
    }
    "a destination Serin cannot name".to_string()
}

/// Finds the primary and canary destinations in the object.
fn locate(t: &Target, obj: &Value) -> Result<Located, RouterError> {
    // (label, pointer of the destination list)
    let lists: Vec<(String, String)> = match t.kind {
        ObjectKind::UpstreamGroup => vec![("destinations".into(), "/spec/destinations".into())],
        ObjectKind::VirtualService | ObjectKind::RouteTable => {
            let routes_ptr = if t.kind == ObjectKind::VirtualService {
                "/spec/virtualHost/routes"
            } else {
                "/spec/routes"
            };
            let routes = obj
                .pointer(routes_ptr)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            routes
                .iter()
                .enumerate()
                .filter(|(_, r)| r.pointer("/routeAction/multi/destinations").is_some())
                .map(|(i, r)| {
                    let name = str_at(r, "/name");
                    let label = if name.is_empty() {
                        format!("route {i}")
                    } else {
                        format!("route {name:?}")
                    };
                    (
                        label,
                        format!("{routes_ptr}/{i}/routeAction/multi/destinations"),
                    )
                })
                .collect()
        }
    };
    let entries = |ptr: &str| -> Vec<Value> {
        obj.pointer(ptr)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    // The discovery-name suffix fallback applies to an arm only when no destination anywhere
    // in the object has its exact name.
    let all: Vec<Value> = lists.iter().flat_map(|(_, p)| entries(p)).collect();
    let exact = |name: &str| {
        all.iter()
            .any(|e| str_at(e, "/destination/upstream/name") == name)
    };
    let suffix = (
        t.suffix_ok && !exact(&t.upstreams.0),
        t.suffix_ok && !exact(&t.upstreams.1),
    );
    let matches = |entry: &Value, upstream: &str, service: &str, use_suffix: bool| -> bool {
        let up = str_at(entry, "/destination/upstream/name");
        if !up.is_empty() {
            return up == upstream
                || (use_suffix && up.ends_with(&format!("-{service}-{}", t.port)));
        }
        let kube = str_at(entry, "/destination/kube/ref/name");
        let kube_ns = str_at(entry, "/destination/kube/ref/namespace");
        let kube_port = entry
            .pointer("/destination/kube/port")
            .and_then(Value::as_i64);
        !kube.is_empty()
            && kube == service
            && (kube_ns.is_empty() || kube_ns == t.namespace)
            && kube_port.is_none_or(|p| p == i64::from(t.port))
    };
    let arm_of = |entry: &Value| -> Option<Arm> {
        if matches(entry, &t.upstreams.0, &t.services.0, suffix.0) {
            Some(Arm::Primary)
        } else if matches(entry, &t.upstreams.1, &t.services.1, suffix.1) {
            Some(Arm::Canary)
        } else {
            None
        }
    };
    let mut pairs = Vec::new();
    for (label, ptr) in &lists {
        match scan_list(&t.subject, label, ptr, &entries(ptr), 0, arm_of, describe)? {
            Scan::Pair(p) => pairs.push(p),
            Scan::Missing { primary, canary } if t.kind == ObjectKind::UpstreamGroup => {
                let found: Vec<String> = entries(ptr).iter().map(describe).collect();
                let missing = match (primary, canary) {
                    (true, true) => {
                        format!("the upstreams {} and {} are", t.upstreams.0, t.upstreams.1)
                    }
                    (true, false) => format!("the upstream {} is", t.upstreams.0),
                    _ => format!("the upstream {} is", t.upstreams.1),
                };
                return Err(t.subject.unroutable(format!(
                    "its destinations are {found:?}; {missing} not among them (set spec.router.gloo.upstreams when the upstreams are not named <namespace>-<service>-<port>)"
                )));
            }
            Scan::Missing { .. } => {}
        }
    }
    if pairs.is_empty() {
        return Err(t.subject.unroutable(format!(
            "no route has routeAction.multi.destinations with both upstreams {} and {}",
            t.upstreams.0, t.upstreams.1
        )));
    }
    Ok(Located {
        pairs,
        default_weight: 0,
    })
}

impl GlooEdgeRouter {
    /// A router that reads and writes Gloo Edge objects through `client`.
    pub fn new(client: Client) -> Self {
        GlooEdgeRouter {
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
            t.resource(),
            &t.subject.namespace,
        )
    }
}

#[async_trait]
impl Router for GlooEdgeRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::Gloo
    }

    /// Checks that the object exists and routes between the two upstreams; writes nothing.
    async fn prepare(&self, canary: &Canary) -> Result<(), RouterError> {
        self.weights(canary).await.map(|_| ())
    }

    async fn data_plane_arms(&self, canary: &Canary) -> Result<DataPlaneArms, RouterError> {
        let t = Target::of(canary)?;
        let obj = self
            .objects(&t)
            .get_cached(&t.subject)
            .await?
            .ok_or_else(|| t.subject.not_found(t.not_found_hint()))?;
        arms_in(canary, &obj)
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
