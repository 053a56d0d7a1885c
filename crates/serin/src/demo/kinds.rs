//! Serin's own definitions of the third-party kinds the demo needs: the App Mesh objects of
//! the colorapp (`appmesh.k8s.aws/v1beta2` Mesh, VirtualNode, VirtualRouter, VirtualService,
//! VirtualGateway, GatewayRoute), Gloo's UpstreamGroup (`gloo.solo.io/v1`) and the Gateway
//! API's HTTPRoute (`gateway.networking.k8s.io/v1`).
//!
//! The CRDs are generated from these typed structs, so the demo needs no upstream CRD files.
//! They model the fields the colorapp and Serin's routers use, with their real names and
//! bounds (a route weight is 0..=100); the parts they do not model (health checks, TLS,
//! retry policies, header matches, ...) keep `x-kubernetes-preserve-unknown-fields`, so a
//! write that carries them is stored as sent instead of being pruned or refused. They are not
//! the upstream schemas: tests that check Serin's writes against the real CRDs load those
//! from `../shared/upstream-crds`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Schema of a sub-object the demo does not model: any object, kept as sent.
fn preserved(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// A reference to an object by name (and namespace, defaulting to the referrer's).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct NamedRef {
    /// Object name.
    pub name: String,
    /// Object namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The Mesh an object belongs to; the App Mesh webhook fills it in.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct MeshRef {
    /// Mesh name.
    pub name: String,
    /// Mesh uid.
    pub uid: String,
}

/// A Mesh: the boundary of the service mesh; its namespace selector says which namespaces'
/// objects belong to it.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "appmesh.k8s.aws",
    version = "v1beta2",
    kind = "Mesh",
    plural = "meshes",
    category = "all"
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// Namespaces whose App Mesh objects join this mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// `DROP_ALL` or `ALLOW_ALL` egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved")]
    pub egress_filter: Option<Value>,
}

/// A port and protocol.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PortMapping {
    /// Port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i64,
    /// `http`, `http2`, `grpc` or `tcp`.
    pub protocol: String,
}

/// A listener of a VirtualNode, VirtualRouter or VirtualGateway.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Where it listens.
    pub port_mapping: PortMapping,
}

/// How a VirtualNode's instances are found.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ServiceDiscovery {
    /// DNS discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDiscovery>,
}

/// DNS service discovery.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct DnsDiscovery {
    /// The host name the node's instances answer on.
    pub hostname: String,
}

/// A VirtualService a VirtualNode calls.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceBackend {
    /// The VirtualService.
    pub virtual_service_ref: NamedRef,
}

/// A backend of a VirtualNode.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// The VirtualService it calls.
    pub virtual_service: VirtualServiceBackend,
}

/// A VirtualNode: one version of a service (its pods), as the mesh sees it.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "appmesh.k8s.aws",
    version = "v1beta2",
    kind = "VirtualNode",
    plural = "virtualnodes",
    namespaced,
    category = "all"
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct VirtualNodeSpec {
    /// The pods of this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Where the node listens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    /// How its instances are found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_discovery: Option<ServiceDiscovery>,
    /// The VirtualServices it calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// Set by the App Mesh webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<MeshRef>,
}

/// A listener of a VirtualRouter.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouterListener {
    /// Where it listens.
    pub port_mapping: PortMapping,
}

/// One weighted target of a route.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WeightedTarget {
    /// The VirtualNode, by Kubernetes name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node_ref: Option<NamedRef>,
    /// The VirtualNode, by ARN.
    #[serde(
        default,
        rename = "virtualNodeARN",
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_node_arn: Option<String>,
    /// Relative weight.
    #[schemars(range(min = 0, max = 100))]
    pub weight: i64,
    /// Target port, when the node listens on several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
}

/// Where a route sends traffic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteAction {
    /// The split.
    #[schemars(length(min = 1, max = 10))]
    pub weighted_targets: Vec<WeightedTarget>,
}

/// An HTTP (or HTTP/2) route.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Which requests it matches (prefix, path, headers, method, ...).
    #[serde(rename = "match")]
    #[schemars(schema_with = "preserved")]
    pub match_: Value,
    /// Where they go.
    pub action: RouteAction,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved")]
    pub retry_policy: Option<Value>,
    /// Timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved")]
    pub timeout: Option<Value>,
}

/// A route of a VirtualRouter; exactly one of the route types is set.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Route name, unique in the router.
    pub name: String,
    /// Lower is matched first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: Option<i64>,
    /// HTTP/1 route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<HttpRoute>,
    /// HTTP/2 route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_route: Option<HttpRoute>,
    /// gRPC route (not modelled: the colorapp speaks HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved")]
    pub grpc_route: Option<Value>,
    /// TCP route (not modelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved")]
    pub tcp_route: Option<Value>,
}

/// A VirtualRouter: splits a VirtualService's traffic between VirtualNodes by weight. This is
/// the object Serin's App Mesh router writes.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "appmesh.k8s.aws",
    version = "v1beta2",
    kind = "VirtualRouter",
    plural = "virtualrouters",
    namespaced,
    category = "all"
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct VirtualRouterSpec {
    /// Where the router listens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<RouterListener>,
    /// Its routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Set by the App Mesh webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<MeshRef>,
}

/// What provides a VirtualService: a VirtualNode or a VirtualRouter.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceProvider {
    /// One node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node: Option<NodeProvider>,
    /// A router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_router: Option<RouterProvider>,
}

/// A VirtualNode providing a VirtualService.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeProvider {
    /// The node.
    pub virtual_node_ref: NamedRef,
}

/// A VirtualRouter providing a VirtualService.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouterProvider {
    /// The router.
    pub virtual_router_ref: NamedRef,
}

/// A VirtualService: the name clients call.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "appmesh.k8s.aws",
    version = "v1beta2",
    kind = "VirtualService",
    plural = "virtualservices",
    namespaced,
    category = "all"
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Its name in App Mesh: the DNS name clients call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_name: Option<String>,
    /// What serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<VirtualServiceProvider>,
    /// Set by the App Mesh webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<MeshRef>,
}

/// A VirtualGateway: the mesh's ingress Envoy.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "appmesh.k8s.aws",
    version = "v1beta2",
    kind = "VirtualGateway",
    plural = "virtualgateways",
    namespaced,
    category = "all"
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct VirtualGatewaySpec {
    /// Namespaces whose GatewayRoutes attach to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// The gateway's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Where it listens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    /// Set by the App Mesh webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<MeshRef>,
}

/// A GatewayRoute's target VirtualService.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTarget {
    /// The VirtualService.
    pub virtual_service: VirtualServiceBackend,
}

/// Where a GatewayRoute sends traffic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct GatewayRouteAction {
    /// The target.
    pub target: GatewayTarget,
}

/// An HTTP GatewayRoute.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayHttpRoute {
    /// Which requests it matches.
    #[serde(rename = "match")]
    #[schemars(schema_with = "preserved")]
    pub match_: Value,
    /// Where they go.
    pub action: GatewayRouteAction,
}

/// A GatewayRoute: sends a VirtualGateway's traffic to a VirtualService.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "appmesh.k8s.aws",
    version = "v1beta2",
    kind = "GatewayRoute",
    plural = "gatewayroutes",
    namespaced,
    category = "all"
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct GatewayRouteSpec {
    /// HTTP route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<GatewayHttpRoute>,
    /// Set by the App Mesh webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_ref: Option<MeshRef>,
}

/// A Gloo destination: an Upstream (or a Kubernetes Service, kept as sent).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Destination {
    /// A Gloo Upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<NamedRef>,
    /// A Kubernetes Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved")]
    pub kube: Option<Value>,
}

/// A weighted Gloo destination.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct WeightedDestination {
    /// Where.
    pub destination: Destination,
    /// Relative weight; missing means 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub weight: Option<i64>,
}

/// A Gloo UpstreamGroup: a weighted split between upstreams, which Serin's Gloo router writes.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "gloo.solo.io",
    version = "v1",
    kind = "UpstreamGroup",
    plural = "upstreamgroups",
    shortname = "ug",
    namespaced
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct UpstreamGroupSpec {
    /// The split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<WeightedDestination>,
}

/// A Gateway API backend of an HTTPRoute rule: a Service (by default) and its weight.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct GatewayBackendRef {
    /// The backend's name (a Service unless `kind` says otherwise).
    pub name: String,
    /// Its namespace; defaults to the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The Service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Relative weight, 0..=1,000,000; missing means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: Option<i32>,
}

/// One rule of an HTTPRoute: what it matches (kept as sent) and where it sends.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct GatewayHttpRouteRule {
    /// The rule's name, which `spec.router.gatewayApi.httpRoute.rule` may pick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The backends and their weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<GatewayBackendRef>,
}

/// A Gateway API HTTPRoute, whose rule's backend weights Serin's Gateway API router writes.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced
)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct GatewayHttpRouteSpec {
    /// The rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<GatewayHttpRouteRule>,
}

/// Every definition the demo registers, generated from the structs above.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Mesh::crd(),
        VirtualNode::crd(),
        VirtualRouter::crd(),
        VirtualService::crd(),
        VirtualGateway::crd(),
        GatewayRoute::crd(),
        UpstreamGroup::crd(),
        HTTPRoute::crd(),
    ]
}

/// Registers Serin's Canary CRD and [`crds`] in an embedded API server.
pub fn register(server: &kube_sandbox::ApiServer) -> anyhow::Result<()> {
    let canary: Value = serde_norway::from_str(&crate::api::crd_yaml()?)?;
    server
        .apply_crd(canary)
        .map_err(|e| anyhow::anyhow!("registering the Canary CRD: {e}"))?;
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        server
            .apply_crd(serde_json::to_value(&crd)?)
            .map_err(|e| anyhow::anyhow!("registering {name}: {e}"))?;
    }
    Ok(())
}
