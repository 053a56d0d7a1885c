//! Traffic routers: where Serin writes weights.
//!
//! One trait, [`Router`], with one implementation per data plane: App Mesh through its
//! Kubernetes resources, App Mesh through the AWS API, Gloo Edge, and Gateway API. The
//! controller holds one instance of each ([`Routers`]) and picks the one a Canary's
//! `spec.router` names; routers keep no per-Canary state.
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
mod gateway_api;
mod gloo;
mod k8s;
mod split;

use std::sync::Arc;

use async_trait::async_trait;

use crate::api::{Canary, RouterKind};
use crate::rollout::Weights;

pub use appmesh::AppMeshKubeRouter;
pub use appmesh_api::{AppMeshAwsRouter, AwsOptions};
pub use gateway_api::HttpRouteRouter;
pub use gloo::GlooEdgeRouter;
pub use k8s::{FIELD_MANAGER, MAX_ATTEMPTS};
pub use split::to_percent;

/// Names of the two arms of a Canary, as routers and metric queries see them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arms {
    /// The stable arm: `<target>-primary` in workload mode, `backends.primary` in traffic mode.
    pub primary: String,
    /// The new arm: `<target>-canary` in workload mode, `backends.canary` in traffic mode.
    pub canary: String,
    /// The Service in front of both: `service.name`, else the target's (or Canary's) name.
    pub service: String,
}

impl Arms {
    /// The arm names of `canary`.
    pub fn of(canary: &Canary) -> Arms {
        Arms::from_spec(
            canary.metadata.name.as_deref().unwrap_or_default(),
            &canary.spec,
        )
    }

    /// The arm names of the Canary called `name` with `spec`.
    pub fn from_spec(name: &str, spec: &crate::api::CanarySpec) -> Arms {
        let base = spec
            .target_ref
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_else(|| name.to_string());
        let service = spec.service.name.clone().unwrap_or_else(|| base.clone());
        match &spec.backends {
            Some(b) => Arms {
                primary: b.primary.clone(),
                canary: b.canary.clone(),
                service,
            },
            None => Arms {
                primary: format!("{base}-primary"),
                canary: format!("{base}-canary"),
                service,
            },
        }
    }
}

/// The Services of the two arms: `<service>-primary` and `<service>-canary` in workload
/// mode, `spec.backends` in traffic mode. Gateway API backendRefs and Gloo upstreams name
/// these; App Mesh VirtualNodes use [`Arms`] and resolve these Services by DNS.
pub fn backend_services(canary: &Canary) -> (String, String) {
    let arms = Arms::of(canary);
    if canary.spec.is_traffic_mode() {
        (arms.primary, arms.canary)
    } else {
        (
            format!("{}-primary", arms.service),
            format!("{}-canary", arms.service),
        )
    }
}

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

    /// Restores all traffic to the primary before the Canary is deleted. Only routers whose
    /// state lives outside Kubernetes need it (they hold a finalizer); the default does
    /// nothing.
    async fn finalize(&self, _canary: &Canary) -> Result<(), RouterError> {
        Ok(())
    }

    /// Whether this router keeps state outside Kubernetes and so needs a finalizer.
    fn needs_finalizer(&self) -> bool {
        false
    }
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

    /// The four routers, the three Kubernetes ones sharing `client`, the AWS one with the
    /// default credential chain and retry settings.
    pub fn standard(client: kube::Client) -> Self {
        Routers::new(vec![
            Arc::new(AppMeshKubeRouter::new(client.clone())),
            Arc::new(AppMeshAwsRouter::new()),
            Arc::new(GlooEdgeRouter::new(client.clone())),
            Arc::new(HttpRouteRouter::new(client)),
        ])
    }

    /// The router for `spec.router` of `canary`, if one of that kind is configured.
    pub fn for_canary(&self, canary: &Canary) -> Result<&dyn Router, RouterError> {
        let kind = canary
            .spec
            .router
            .kinds()
            .first()
            .copied()
            .ok_or(RouterError::NotConfigured { kind: None })?;
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
