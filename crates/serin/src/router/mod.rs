//! Traffic routers: where Serin writes weights.
//!
//! One trait, [`Router`], with one implementation per data plane: App Mesh through its
//! Kubernetes resources, App Mesh through the AWS API, Gloo Edge, and Gateway API. The
//! [`REGISTRY`] lists them, one line each: a new data plane is one new file plus one line
//! there (and its field in `spec.router`). The controller holds one instance of each
//! ([`Routers`]) and picks the one a Canary's `spec.router` names; routers keep no
//! per-Canary state.
//!
//! The Kubernetes routers read the routing objects through a shared [`ObjectCache`] fed by
//! one watch per kind, so that reading a Canary's weights on every reconcile costs no
//! request; weight writes always read the object fresh.
//!
//! Each router also says where it sends each arm's traffic ([`data_plane_arms`]): the
//! VirtualNodes, upstreams or Services whose series the metric presets then query.
//!
//! The data-plane object is the source of truth for weights, not Serin's status: after a
//! crash the controller reads them back with [`Router::weights`]. Every write is guarded
//! against lost updates (resourceVersion preconditions or a JSON Patch `test` op), and
//! [`Router::set_weights`] refuses to overwrite weights that someone else changed, so the
//! rollout holds instead of fighting.
//!
//! Routers never create or delete the Services, Deployments or Gloo/Gateway objects the
//! user owns; only App Mesh in workload mode creates objects (owned by the Canary).
//! `docs/routers.md` describes each data plane's mapping and its limits.

mod appmesh;
mod appmesh_api;
mod cache;
mod gateway_api;
mod gloo;
mod k8s;
mod split;

use std::sync::Arc;

use async_trait::async_trait;

use crate::api::{Canary, RouterKind};
use crate::arms::{DataPlaneArms, Weights};

pub use appmesh::AppMeshKubeRouter;
pub use appmesh_api::{AppMeshAwsRouter, AwsOptions};
pub use cache::ObjectCache;
pub use gateway_api::HttpRouteRouter;
pub use gloo::GlooEdgeRouter;
pub use k8s::{FIELD_MANAGER, MAX_ATTEMPTS, release_owner};
pub use split::to_percent;

/// What a weight write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The object already had the desired weights: no API call was made.
    Unchanged,
    /// The weights were written.
    Written,
}

/// A data plane whose weights Serin sets.
#[async_trait]
pub trait Router: Send + Sync {
    /// Which `spec.router` field this router serves.
    fn kind(&self) -> RouterKind;

    /// Creates or adopts the routing objects the Canary needs. Idempotent: a second call
    /// with nothing changed makes no write.
    async fn prepare(&self, canary: &Canary) -> Result<(), RouterError>;

    /// Reads the current weights from the data-plane object.
    async fn weights(&self, canary: &Canary) -> Result<Weights, RouterError>;

    /// Where each arm's traffic goes, as the weights this router moves see it: the only
    /// names metric presets query. The default resolves them from the Canary alone
    /// ([`data_plane_arms`]); a router whose arms are only known from its routing object
    /// (Gloo's discovered upstream names) reads it.
    async fn data_plane_arms(&self, canary: &Canary) -> Result<DataPlaneArms, RouterError> {
        data_plane_arms(canary)
    }

    /// Moves the weights from `expected` (what Serin last wrote, from status) to `desired`.
    /// Returns `Unchanged` without an API call when `desired` is already there (for example
    /// after a crash between the write and the status update). Fails with
    /// [`RouterError::WeightsChanged`] when the object holds neither `expected` nor
    /// `desired`, and with [`RouterError::Conflict`] when a concurrent write won; a
    /// successful call leaves weights that sum to 100.
    async fn set_weights(
        &self,
        canary: &Canary,
        expected: Weights,
        desired: Weights,
    ) -> Result<WriteOutcome, RouterError>;

    /// The objects this router created for `canary` (and owns through it), as
    /// `(resource, namespace, name)`, from the Canary alone: deleting the Canary releases
    /// them (removes its ownerReference) so the garbage collector never takes the serving
    /// path away. Routers that create nothing return none (the default).
    fn created(&self, _canary: &Canary) -> Vec<(kube::api::ApiResource, String, String)> {
        Vec::new()
    }
}

/// Moves all of `canary`'s traffic to `desired`, whatever the object holds now (a hand
/// edit included): what a deletion does to restore the service. Reads, then writes only when
/// the weights differ.
pub async fn move_all(
    router: &dyn Router,
    canary: &Canary,
    desired: Weights,
) -> Result<WriteOutcome, RouterError> {
    let mut last = None;
    for _ in 0..MAX_ATTEMPTS {
        let found = router.weights(canary).await?;
        match router.set_weights(canary, found, desired).await {
            // A write between our read and our write: read again.
            Err(e @ (RouterError::WeightsChanged { .. } | RouterError::Conflict { .. })) => {
                last = Some(e)
            }
            other => return other,
        }
    }
    Err(last.unwrap_or(RouterError::NotConfigured { kind: None }))
}

/// Asked before every write that does not go through the Kubernetes client (the App Mesh
/// AWS API): whether it may be sent now, and how long it may take. The leader election's
/// fence implements it (a write must finish while this replica still holds the lease);
/// without one every write may go.
pub trait WriteGuard: Send + Sync {
    /// `Ok(None)`: send, without a deadline; `Ok(Some(t))`: send, and give up after `t`;
    /// `Err(why)`: do not send.
    fn admit(&self) -> Result<Option<std::time::Duration>, String>;
}

static WRITE_GUARD: std::sync::OnceLock<Arc<dyn WriteGuard>> = std::sync::OnceLock::new();

/// Puts every non-Kubernetes write of this process behind `guard` (once per process: one
/// operator per process, as the leader election's fence is).
pub fn guard_writes(guard: Arc<dyn WriteGuard>) {
    let _ = WRITE_GUARD.set(guard);
}

/// The verdict of the process's [`WriteGuard`] on a write about to be sent.
pub(crate) fn admit_write() -> Result<Option<std::time::Duration>, String> {
    WRITE_GUARD.get().map_or(Ok(None), |g| g.admit())
}

/// A data plane Serin can route, as the [`REGISTRY`] holds it.
pub struct Registration {
    /// The `spec.router` field it serves.
    pub kind: RouterKind,
    /// Builds the router; the Kubernetes routers share the operator's client and the
    /// cache of routing objects.
    pub build: fn(&kube::Client, &ObjectCache) -> Arc<dyn Router>,
    /// Where the router sends each arm's traffic, from the Canary alone (no I/O).
    pub arms: fn(&Canary) -> Result<DataPlaneArms, RouterError>,
}

/// Every router Serin has, one line each.
pub const REGISTRY: [Registration; 4] = [
    appmesh::ENTRY,
    appmesh_api::ENTRY,
    gloo::ENTRY,
    gateway_api::ENTRY,
];

/// The `spec.router` kind of `canary` (the first, if several are set: validation rejects
/// that).
fn kind_of(canary: &Canary) -> Result<RouterKind, RouterError> {
    canary
        .spec
        .router
        .kinds()
        .first()
        .copied()
        .ok_or(RouterError::NotConfigured { kind: None })
}

/// Where `canary`'s router sends each arm's traffic, as its data plane names them.
pub fn data_plane_arms(canary: &Canary) -> Result<DataPlaneArms, RouterError> {
    data_plane_arms_resolved(canary, None)
}

/// [`data_plane_arms`] with the routing object as read (`None` when not read): routers that
/// find their arms in the object (Gloo's suffix rule for discovered upstreams) name them as
/// found there, exactly as the weight writes do. Pure: the object is passed in.
pub fn data_plane_arms_in(
    canary: &Canary,
    routing_object: &serde_json::Value,
) -> Result<DataPlaneArms, RouterError> {
    data_plane_arms_resolved(canary, Some(routing_object))
}

fn data_plane_arms_resolved(
    canary: &Canary,
    routing_object: Option<&serde_json::Value>,
) -> Result<DataPlaneArms, RouterError> {
    if let (Ok(RouterKind::Gloo), Some(obj)) = (kind_of(canary), routing_object) {
        return gloo::arms_in(canary, obj);
    }
    let kind = kind_of(canary)?;
    let entry = REGISTRY
        .iter()
        .find(|e| e.kind == kind)
        .ok_or(RouterError::NotConfigured { kind: Some(kind) })?;
    (entry.arms)(canary)
}

/// One router of each kind, shared by every reconcile.
#[derive(Clone)]
pub struct Routers {
    routers: Vec<Arc<dyn Router>>,
}

impl Routers {
    /// A set of routers; at most one per kind is used.
    pub fn new(routers: Vec<Arc<dyn Router>>) -> Self {
        Routers { routers }
    }

    /// Every router of the [`REGISTRY`]: the Kubernetes ones sharing `client` and `cache`,
    /// the AWS one with the default credential chain and retry settings.
    pub fn standard(client: &kube::Client, cache: &ObjectCache) -> Self {
        Routers::new(REGISTRY.iter().map(|e| (e.build)(client, cache)).collect())
    }

    /// The router for `spec.router` of `canary`, if one of that kind is configured.
    pub fn for_canary(&self, canary: &Canary) -> Result<&dyn Router, RouterError> {
        let kind = kind_of(canary)?;
        self.routers
            .iter()
            .find(|r| r.kind() == kind)
            .map(|r| r.as_ref())
            .ok_or(RouterError::NotConfigured { kind: Some(kind) })
    }
}

/// Why a router operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// No router of the requested kind is configured in this operator.
    #[error("no router is configured for {kind:?}")]
    NotConfigured {
        /// The kind asked for.
        kind: Option<RouterKind>,
    },
    /// A routing object the Canary names does not exist.
    #[error("{kind} {namespace}/{name} not found: {hint}")]
    NotFound {
        /// Object kind, for example `VirtualRouter`.
        kind: &'static str,
        /// Namespace (or AWS mesh).
        namespace: String,
        /// Name.
        name: String,
        /// What to do about it.
        hint: String,
    },
    /// The object does not have the shape Serin can route with (for example a route with
    /// one target or three, or the canary not among the targets).
    #[error("{kind} {namespace}/{name} cannot be routed: {reason}")]
    Unroutable {
        /// Object kind.
        kind: &'static str,
        /// Namespace (or AWS mesh).
        namespace: String,
        /// Name.
        name: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Someone else changed the weights since Serin wrote them.
    #[error(
        "weights on {kind} {namespace}/{name} were changed by someone else: found primary {found_primary}% / canary {found_canary}%, expected canary {expected_canary}%; the rollout holds until they are restored or the rollout is aborted"
    )]
    WeightsChanged {
        /// Object kind.
        kind: &'static str,
        /// Namespace (or AWS mesh).
        namespace: String,
        /// Name.
        name: String,
        /// Primary weight found.
        found_primary: u32,
        /// Canary weight found.
        found_canary: u32,
        /// Canary weight Serin expected.
        expected_canary: u8,
    },
    /// A concurrent write won (409, or a failed JSON Patch test); retry with fresh state.
    #[error("conflicting write on {kind} {namespace}/{name}; retrying with fresh state")]
    Conflict {
        /// Object kind.
        kind: &'static str,
        /// Namespace (or AWS mesh).
        namespace: String,
        /// Name.
        name: String,
    },
    /// The Kubernetes API failed.
    #[error("{operation} {kind} {namespace}/{name}: {source}")]
    Kube {
        /// What was being done, for example `patch`.
        operation: &'static str,
        /// Object kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The client error (boxed: `kube::Error` is large and every router result carries
        /// this enum).
        #[source]
        source: Box<kube::Error>,
    },
    /// The AWS API failed (after bounded retries for throttling).
    #[error("AWS App Mesh {operation} {mesh}/{name}: {message}")]
    Aws {
        /// The API operation, for example `UpdateRoute`.
        operation: &'static str,
        /// Mesh name.
        mesh: String,
        /// Route or router name.
        name: String,
        /// The service's error, as one line.
        message: String,
        /// Whether retrying later may help (throttling, 5xx, network).
        retryable: bool,
    },
}

impl RouterError {
    /// A short constant category: the Event reason suffix and the metric label.
    pub fn category(&self) -> &'static str {
        match self {
            RouterError::NotConfigured { .. } => "RouterNotConfigured",
            RouterError::NotFound { .. } => "RoutingObjectNotFound",
            RouterError::Unroutable { .. } => "RoutingObjectUnroutable",
            RouterError::WeightsChanged { .. } => "WeightsChangedExternally",
            RouterError::Conflict { .. } => "RouterConflict",
            RouterError::Kube { .. } => "KubernetesApiError",
            RouterError::Aws { .. } => "AwsApiError",
        }
    }

    /// True when the user must change something (the object is missing or has the wrong
    /// shape, or weights were edited by hand); false when retrying soon may help.
    pub fn needs_user(&self) -> bool {
        matches!(
            self,
            RouterError::NotConfigured { .. }
                | RouterError::NotFound { .. }
                | RouterError::Unroutable { .. }
                | RouterError::WeightsChanged { .. }
        )
    }
}
