//! App Mesh through its Kubernetes resources (`appmesh.k8s.aws/v1beta2`).
//!
//! Workload mode: Serin creates (or adopts) the VirtualNodes `<target>-primary` and
//! `<target>-canary`, a VirtualRouter with one route whose weighted targets are those nodes,
//! and the VirtualService in front, all owned by the Canary. Traffic mode: the VirtualRouter
//! and its route already exist and Serin changes only the two weights.
//!
//! It never sets `meshRef`: the App Mesh admission webhook fills it in from the Mesh's
//! namespace selector and rejects writes that set it. It never touches a route's match,
//! retry policy or timeouts, nor other routes.

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use serde_json::{Value, json};

use crate::api::{Canary, RouterKind};
use crate::arms::{ArmNames, DataPlaneArm, DataPlaneArms, Weights};

use super::cache::ObjectCache;
use super::k8s::{self, Entry, Located, Objects, Pair, str_at};
use super::split::Subject;
use super::{Registration, Router, RouterError, WriteOutcome};

const GROUP: &str = "appmesh.k8s.aws";
const VERSION: &str = "v1beta2";
/// The four route types of a VirtualRouter route, in the CRD's field names.
const ROUTE_TYPES: [&str; 4] = ["httpRoute", "http2Route", "grpcRoute", "tcpRoute"];

fn virtual_router_resource() -> ApiResource {
    k8s::resource(GROUP, VERSION, "VirtualRouter", "virtualrouters")
}
fn virtual_node_resource() -> ApiResource {
    k8s::resource(GROUP, VERSION, "VirtualNode", "virtualnodes")
}
fn virtual_service_resource() -> ApiResource {
    k8s::resource(GROUP, VERSION, "VirtualService", "virtualservices")
}
fn mesh_resource() -> ApiResource {
    k8s::resource(GROUP, VERSION, "Mesh", "meshes")
}

/// The registry's line for this router.
pub(super) const ENTRY: Registration = Registration {
    kind: RouterKind::AppMesh,
    build: |client, cache| {
        std::sync::Arc::new(AppMeshKubeRouter::new(client.clone()).with_cache(cache.clone()))
    },
    arms,
};

/// The arms are VirtualNodes named after them, in the Canary's namespace.
fn arms(canary: &Canary) -> Result<DataPlaneArms, RouterError> {
    let t = Target::of(canary)?;
    let node = |name: &str| DataPlaneArm {
        name: name.to_string(),
        namespace: t.namespace.clone(),
    };
    Ok(DataPlaneArms {
        kind: "VirtualNode",
        primary: node(&t.arms.primary),
        canary: node(&t.arms.canary),
        pod_apps: t.arms.pod_apps(),
    })
}

/// Routes traffic by writing App Mesh VirtualRouter route weights.
#[derive(Clone)]
pub struct AppMeshKubeRouter {
    client: Client,
    cache: ObjectCache,
}

/// What the router needs from a Canary, resolved once per call.
struct Target {
    namespace: String,
    /// `<target>` (workload mode) or the Canary's name.
    base: String,
    arms: ArmNames,
    mesh: String,
    router: String,
    route: Option<String>,
    backends: Vec<String>,
    port: i32,
    traffic_mode: bool,
}

impl Target {
    fn of(canary: &Canary) -> Result<Target, RouterError> {
        let namespace = canary.metadata.namespace.clone().unwrap_or_default();
        let base = canary
            .spec
            .target_ref
            .as_ref()
            .map(|t| t.name.clone())
            .or_else(|| canary.metadata.name.clone())
            .unwrap_or_default();
        let Some(spec) = canary.spec.router.app_mesh.as_ref() else {
            return Err(RouterError::NotConfigured {
                kind: canary.spec.router.kinds().first().copied(),
            });
        };
        Ok(Target {
            router: spec.virtual_router.clone().unwrap_or_else(|| base.clone()),
            route: spec.route.clone(),
            mesh: spec.mesh.clone(),
            backends: spec.backends.clone(),
            arms: ArmNames::of(canary),
            port: canary.spec.service.port,
            traffic_mode: canary.spec.is_traffic_mode(),
            namespace,
            base,
        })
    }

    fn subject(&self) -> Subject {
        Subject::new("VirtualRouter", &self.namespace, &self.router)
    }

    /// The route Serin creates in workload mode.
    fn default_route(&self) -> String {
        self.route
            .clone()
            .unwrap_or_else(|| format!("{}-route", self.base))
    }

    fn not_found_hint(&self) -> String {
        if self.traffic_mode {
            format!(
                "create the VirtualRouter with a route whose weighted targets are the VirtualNodes {} and {}, or fix spec.router.appMesh.virtualRouter",
                self.arms.primary, self.arms.canary
            )
        } else {
            "Serin creates it when the Canary is initialised; it was deleted since".to_string()
        }
    }
}

/// Finds the route and its two weighted targets in a VirtualRouter.
fn locate(t: &Target, vr: &Value) -> Result<Located, RouterError> {
    let routes = vr
        .pointer("/spec/routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = routes
        .iter()
        .map(|r| r.get("name").and_then(Value::as_str).unwrap_or(""))
        .collect();
    let index = route_index(t, &names)?;
    let label = format!("route {:?}", names[index]);
    let base = format!(
        "/spec/routes/{index}/{}/action/weightedTargets",
        route_type(t, &label, &routes[index])?
    );
    let targets = vr
        .pointer(&base)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (p, c) = arm_targets(t, &label, &targets)?;
    Ok(Located {
        pairs: vec![Pair {
            label,
            primary: Entry::new(format!("{base}/{p}"), &targets[p]),
            canary: Entry::new(format!("{base}/{c}"), &targets[c]),
        }],
        default_weight: 0,
    })
}

/// Which route Serin shifts: `spec.router.appMesh.route`, else the only one.
fn route_index(t: &Target, names: &[&str]) -> Result<usize, RouterError> {
    match &t.route {
        Some(want) => names
            .iter()
            .position(|n| n == want)
            .ok_or_else(|| RouterError::NotFound {
                kind: "VirtualRouter route",
                namespace: t.namespace.clone(),
                name: format!("{}/{}", t.router, want),
                hint: format!(
                    "the VirtualRouter has the routes {names:?}; fix spec.router.appMesh.route"
                ),
            }),
        None if names.len() == 1 => Ok(0),
        None if names.is_empty() => Err(t.subject().unroutable(
            "it has no routes; add one whose weighted targets are the primary and canary VirtualNodes",
        )),
        None => Err(t.subject().unroutable(format!(
            "it has {} routes {names:?}; name the one to shift in spec.router.appMesh.route",
            names.len()
        ))),
    }
}

/// The route's one protocol field (`httpRoute`, `grpcRoute`, ...).
fn route_type(t: &Target, label: &str, route: &Value) -> Result<&'static str, RouterError> {
    let types: Vec<&str> = ROUTE_TYPES
        .iter()
        .copied()
        .filter(|k| route.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    match types.as_slice() {
        [rtype] => Ok(rtype),
        _ => Err(t.subject().unroutable(format!(
            "{label} must have exactly one of {ROUTE_TYPES:?}, found {types:?}"
        ))),
    }
}

/// The VirtualNode a weighted target names, when it is in the Canary's namespace.
fn target_node(t: &Target, w: &Value) -> Option<String> {
    let ns = str_at(w, "/virtualNodeRef/namespace");
    if !ns.is_empty() && ns != t.namespace {
        return None;
    }
    w.pointer("/virtualNodeRef/name")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// A weighted target as a person reads it: the node, `namespace/name`, or its ARN.
fn describe_target(t: &Target, w: &Value) -> String {
    target_node(t, w).unwrap_or_else(|| {
        let arn = str_at(w, "/virtualNodeARN");
        if arn.is_empty() {
            format!(
                "{}/{}",
                str_at(w, "/virtualNodeRef/namespace"),
                str_at(w, "/virtualNodeRef/name")
            )
        } else {
            arn.to_string()
        }
    })
}

/// The indexes of the primary's and the canary's VirtualNodes among exactly two targets.
fn arm_targets(t: &Target, label: &str, targets: &[Value]) -> Result<(usize, usize), RouterError> {
    let subject = t.subject();
    let described: Vec<String> = targets.iter().map(|w| describe_target(t, w)).collect();
    if targets.len() != 2 {
        return Err(subject.unroutable(format!(
            "{label} has {} weighted targets {described:?}; Serin needs exactly two, the VirtualNodes {} and {}",
            targets.len(),
            t.arms.primary,
            t.arms.canary
        )));
    }
    let find = |arm: &str| -> Result<usize, RouterError> {
        targets
            .iter()
            .position(|w| target_node(t, w).as_deref() == Some(arm))
            .ok_or_else(|| {
                subject.unroutable(format!(
                    "{label} has the weighted targets {described:?}; the VirtualNode {arm} is not among them"
                ))
            })
    };
    let (p, c) = (find(&t.arms.primary)?, find(&t.arms.canary)?);
    if p == c {
        return Err(subject.unroutable(format!(
            "the primary and canary are the same VirtualNode {}",
            t.arms.primary
        )));
    }
    Ok((p, c))
}

impl AppMeshKubeRouter {
    /// A router that reads and writes App Mesh objects through `client`.
    pub fn new(client: Client) -> Self {
        AppMeshKubeRouter {
            client,
            cache: ObjectCache::none(),
        }
    }

    /// The same router reading its objects through `cache` (see [`ObjectCache`]).
    pub fn with_cache(mut self, cache: ObjectCache) -> Self {
        self.cache = cache;
        self
    }

    fn router_objects(&self, namespace: &str) -> Objects<'_> {
        Objects::new(
            &self.client,
            &self.cache,
            virtual_router_resource(),
            namespace,
        )
    }

    fn routers(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &virtual_router_resource())
    }

    /// Workload mode: the VirtualNode of one arm.
    fn virtual_node(t: &Target, name: &str, hostname_service: &str, app_label: &str) -> Value {
        let mut spec = json!({
            "podSelector": {"matchLabels": {"app": app_label}},
            "listeners": [{"portMapping": {"port": t.port, "protocol": "http"}}],
            "serviceDiscovery": {"dns": {"hostname": format!("{hostname_service}.{}.svc.cluster.local", t.namespace)}},
        });
        if !t.backends.is_empty() {
            spec["backends"] = Value::Array(
                t.backends
                    .iter()
                    .map(|b| json!({"virtualService": {"virtualServiceRef": {"name": b}}}))
                    .collect(),
            );
        }
        json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": "VirtualNode",
            "metadata": {"name": name, "namespace": t.namespace},
            "spec": spec,
        })
    }

    /// Workload mode: creates or adopts, owned by the Canary, the arms' VirtualNodes, the
    /// VirtualRouter between them and the VirtualService clients call, inside a Mesh that
    /// must exist.
    async fn prepare_workload(&self, canary: &Canary, t: &Target) -> Result<(), RouterError> {
        let owner = k8s::owner_of(canary)?;
        self.require_mesh(t).await?;
        self.ensure_virtual_nodes(t, &owner).await?;
        self.ensure_virtual_router(t, &owner).await?;
        self.ensure_virtual_service(t, &owner).await
    }

    /// The Mesh must exist: the App Mesh webhook puts every object into it.
    async fn require_mesh(&self, t: &Target) -> Result<(), RouterError> {
        let meshes: Api<DynamicObject> = Api::all_with(self.client.clone(), &mesh_resource());
        let mesh_subject = Subject::new("Mesh", "", &t.mesh);
        if k8s::get(&meshes, &mesh_subject).await?.is_none() {
            return Err(mesh_subject.not_found(
                "create the Mesh (with a namespaceSelector that selects this namespace) or fix spec.router.appMesh.mesh",
            ));
        }
        Ok(())
    }

    /// One VirtualNode per arm, selecting the arm's pods and reached through its Service.
    async fn ensure_virtual_nodes(
        &self,
        t: &Target,
        owner: &OwnerReference,
    ) -> Result<(), RouterError> {
        let vn_owned = |_: &Value| {
            vec![
                "/spec/podSelector",
                "/spec/listeners",
                "/spec/serviceDiscovery",
                "/spec/backends",
            ]
        };
        let (primary_host, canary_host) = t.arms.services().into();
        let apps = t.arms.pod_apps();
        for (node, host, app) in [
            (&t.arms.primary, primary_host, apps.primary),
            (&t.arms.canary, canary_host, apps.canary),
        ] {
            let desired = Self::virtual_node(t, node, &host, &app);
            let subject = Subject::new("VirtualNode", &t.namespace, node);
            k8s::ensure(
                &self.client,
                &virtual_node_resource(),
                &subject,
                &desired,
                &vn_owned,
                owner,
            )
            .await?;
        }
        Ok(())
    }

    /// The VirtualRouter: an existing route is validated and kept (it holds the live
    /// weights); a router without routes gets the initial 100/0 route.
    async fn ensure_virtual_router(
        &self,
        t: &Target,
        owner: &OwnerReference,
    ) -> Result<(), RouterError> {
        let subject = t.subject();
        if let Some(current) = k8s::get(&self.routers(&t.namespace), &subject).await? {
            check_adoptable(t, &current)?;
        }
        let vr_owned = |current: &Value| {
            if has_routes(current) {
                vec!["/spec/listeners"]
            } else {
                vec!["/spec/listeners", "/spec/routes"]
            }
        };
        k8s::ensure(
            &self.client,
            &virtual_router_resource(),
            &subject,
            &Self::virtual_router(t),
            &vr_owned,
            owner,
        )
        .await?;
        Ok(())
    }

    /// The VirtualRouter Serin creates: a listener on the Service port and one route, all
    /// traffic on the primary.
    fn virtual_router(t: &Target) -> Value {
        json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": "VirtualRouter",
            "metadata": {"name": t.router, "namespace": t.namespace},
            "spec": {
                "listeners": [{"portMapping": {"port": t.port, "protocol": "http"}}],
                "routes": [{
                    "name": t.default_route(),
                    "httpRoute": {
                        "match": {"prefix": "/"},
                        "action": {"weightedTargets": [
                            {"virtualNodeRef": {"name": t.arms.primary}, "weight": Weights::STABLE.primary()},
                            {"virtualNodeRef": {"name": t.arms.canary}, "weight": Weights::STABLE.canary()},
                        ]},
                    },
                }],
            },
        })
    }

    /// The VirtualService clients call: its App Mesh name is the Service's cluster DNS name.
    async fn ensure_virtual_service(
        &self,
        t: &Target,
        owner: &OwnerReference,
    ) -> Result<(), RouterError> {
        let desired = json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": "VirtualService",
            "metadata": {"name": t.base, "namespace": t.namespace},
            "spec": {
                "awsName": format!("{}.{}.svc.cluster.local", t.arms.service, t.namespace),
                "provider": {"virtualRouter": {"virtualRouterRef": {"name": t.router}}},
            },
        });
        let subject = Subject::new("VirtualService", &t.namespace, &t.base);
        k8s::ensure(
            &self.client,
            &virtual_service_resource(),
            &subject,
            &desired,
            &|_: &Value| vec!["/spec/awsName", "/spec/provider"],
            owner,
        )
        .await?;
        Ok(())
    }
}

/// Whether a VirtualRouter already has routes.
fn has_routes(vr: &Value) -> bool {
    vr.pointer("/spec/routes")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
}

/// An existing VirtualRouter can be adopted when it is in the Canary's mesh and, if it has
/// routes, the route Serin uses has the two arms as its weighted targets.
fn check_adoptable(t: &Target, current: &Value) -> Result<(), RouterError> {
    let subject = t.subject();
    let mesh = str_at(current, "/spec/meshRef/name");
    if !mesh.is_empty() && mesh != t.mesh {
        return Err(subject.unroutable(format!(
            "it belongs to the mesh {mesh}, not {}; fix spec.router.appMesh.mesh",
            t.mesh
        )));
    }
    if has_routes(current) {
        locate(t, current)?;
    }
    Ok(())
}

#[async_trait]
impl Router for AppMeshKubeRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::AppMesh
    }

    async fn prepare(&self, canary: &Canary) -> Result<(), RouterError> {
        let t = Target::of(canary)?;
        if t.traffic_mode {
            let obj = k8s::get(&self.routers(&t.namespace), &t.subject())
                .await?
                .ok_or_else(|| t.subject().not_found(t.not_found_hint()))?;
            locate(&t, &obj).map(|_| ())
        } else {
            self.prepare_workload(canary, &t).await
        }
    }

    async fn weights(&self, canary: &Canary) -> Result<Weights, RouterError> {
        let t = Target::of(canary)?;
        k8s::read_weights(
            &self.router_objects(&t.namespace),
            &t.subject(),
            &t.not_found_hint(),
            |o| locate(&t, o),
        )
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
            &self.router_objects(&t.namespace),
            &t.subject(),
            &t.not_found_hint(),
            |o| locate(&t, o),
            Some(expected),
            desired,
        )
        .await
    }

    fn created(&self, canary: &Canary) -> Vec<(ApiResource, String, String)> {
        let Ok(t) = Target::of(canary) else {
            return Vec::new();
        };
        if t.traffic_mode {
            return Vec::new();
        }
        vec![
            (
                virtual_node_resource(),
                t.namespace.clone(),
                t.arms.primary.clone(),
            ),
            (
                virtual_node_resource(),
                t.namespace.clone(),
                t.arms.canary.clone(),
            ),
            (
                virtual_router_resource(),
                t.namespace.clone(),
                t.router.clone(),
            ),
            (
                virtual_service_resource(),
                t.namespace.clone(),
                t.base.clone(),
            ),
        ]
    }
}
