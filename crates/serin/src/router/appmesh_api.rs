//! App Mesh through the AWS API (`aws-sdk-appmesh`), for meshes managed outside Kubernetes
//! (ECS, Terraform).
//!
//! `UpdateRoute` replaces the whole route spec, so Serin sends back exactly what
//! `DescribeRoute` returned (match, retry policy, timeouts, priority) with only the two
//! weights changed; it edits the SDK's structs in place, so fields it does not know are
//! carried over too. App Mesh has no write precondition: Serin checks the weights it read,
//! and afterwards that the route's version went up by exactly one; if it went up by more,
//! another writer raced it, and the call reports [`RouterError::Conflict`].
//!
//! One SDK client per (region, endpoint, role), built on first use and cached. Throttling
//! and 5xx answers are retried by the SDK's standard retry strategy (bounded attempts,
//! exponential backoff with jitter). The state lives outside Kubernetes, so this router
//! needs a finalizer, and [`Router::finalize`] puts all traffic back on the primary.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_appmesh::config::{BehaviorVersion, Region, SharedCredentialsProvider};
use aws_sdk_appmesh::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_appmesh::types::{RouteData, RouteSpec, WeightedTarget};
use tokio::sync::Mutex;

use crate::api::{AppMeshApiRouter as AppMeshApiSpec, AwsConnection, Canary, RouterKind};
use crate::arms::{ArmNames, DataPlaneArm, DataPlaneArms, Weights};
use crate::bounded::{self, Bounded};

use super::split::{Plan, Subject, plan, to_percent};
use super::{Registration, Router, RouterError, WriteOutcome};

/// How the AWS clients are built.
#[derive(Clone, Debug)]
pub struct AwsOptions {
    /// Credentials for every client; `None` uses the SDK's default chain (environment, web
    /// identity / IRSA, profile, container and instance metadata). A `roleArn` in the Canary
    /// is assumed on top of these.
    pub credentials: Option<SharedCredentialsProvider>,
    /// Attempts per API call, including the first (throttling and 5xx are retried).
    pub max_attempts: u32,
    /// First retry backoff; it grows exponentially, with jitter, up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest backoff between two attempts.
    pub max_backoff: Duration,
}

impl Default for AwsOptions {
    fn default() -> Self {
        AwsOptions {
            credentials: None,
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(20),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClientKey {
    region: String,
    endpoint: Option<String>,
    role_arn: Option<String>,
}

/// The registry's line for this router.
pub(super) const ENTRY: Registration = Registration {
    kind: RouterKind::AppMeshApi,
    build: |_, _| std::sync::Arc::new(AppMeshAwsRouter::new()),
    arms,
};

/// The arms are the route's weighted VirtualNodes, named after them; their Kubernetes
/// namespace is the Canary's.
fn arms(canary: &Canary) -> Result<DataPlaneArms, RouterError> {
    let t = Target::of(canary)?;
    let namespace = canary.metadata.namespace.clone().unwrap_or_default();
    let node = |name: &str| DataPlaneArm {
        name: name.to_string(),
        namespace: namespace.clone(),
    };
    Ok(DataPlaneArms {
        kind: "VirtualNode",
        primary: node(&t.arms.primary),
        canary: node(&t.arms.canary),
        pod_apps: t.arms.pod_apps(),
    })
}

/// Routes traffic by updating an App Mesh route through the AWS API.
pub struct AppMeshAwsRouter {
    options: AwsOptions,
    /// By region, endpoint and role (as users write them, so bounded).
    clients: Mutex<Bounded<ClientKey, aws_sdk_appmesh::Client>>,
}

struct Target {
    spec: AppMeshApiSpec,
    arms: ArmNames,
    subject: Subject,
}

impl Target {
    fn of(canary: &Canary) -> Result<Target, RouterError> {
        let Some(spec) = canary.spec.router.app_mesh_api.clone() else {
            return Err(RouterError::NotConfigured {
                kind: canary.spec.router.kinds().first().copied(),
            });
        };
        let subject = Subject::new(
            "App Mesh route",
            &spec.mesh,
            &format!("{}/{}", spec.virtual_router, spec.route),
        );
        Ok(Target {
            arms: ArmNames::of(canary),
            spec,
            subject,
        })
    }

    fn aws_error<E, R>(&self, operation: &'static str, err: &SdkError<E, R>) -> RouterError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        if err.code() == Some("NotFoundException") {
            return self.subject.not_found(format!(
                "{operation}: {}; check spec.router.appMeshApi (mesh, virtualRouter, route, meshOwner, region)",
                err.message().unwrap_or("not found")
            ));
        }
        let retryable = match err.code() {
            Some(code) => matches!(
                code,
                "TooManyRequestsException"
                    | "ServiceUnavailableException"
                    | "InternalServerErrorException"
                    | "LimitExceededException"
            ),
            None => !matches!(err, SdkError::ServiceError(_)),
        };
        RouterError::Aws {
            operation,
            mesh: self.spec.mesh.clone(),
            name: self.subject.name.clone(),
            message: DisplayErrorContext(err).to_string().replace('\n', " "),
            retryable,
        }
    }
}

/// The weighted targets of a route spec (of whichever of its four route types is set).
fn targets_mut(spec: &mut RouteSpec) -> Result<&mut Vec<WeightedTarget>, String> {
    let set = [
        spec.http_route.is_some(),
        spec.http2_route.is_some(),
        spec.grpc_route.is_some(),
        spec.tcp_route.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        return Err(format!(
            "the route must have exactly one of httpRoute, http2Route, grpcRoute, tcpRoute; it has {set}"
        ));
    }
    let action = if let Some(r) = spec.http_route.as_mut() {
        r.action.as_mut().map(|a| &mut a.weighted_targets)
    } else if let Some(r) = spec.http2_route.as_mut() {
        r.action.as_mut().map(|a| &mut a.weighted_targets)
    } else if let Some(r) = spec.grpc_route.as_mut() {
        r.action.as_mut().map(|a| &mut a.weighted_targets)
    } else {
        spec.tcp_route
            .as_mut()
            .and_then(|r| r.action.as_mut())
            .map(|a| &mut a.weighted_targets)
    };
    action.ok_or_else(|| "the route has no action".to_string())
}

/// Indices of the primary and canary targets; exactly two targets, one of each.
fn locate(t: &Target, targets: &[WeightedTarget]) -> Result<(usize, usize), RouterError> {
    let names: Vec<&str> = targets.iter().map(|w| w.virtual_node.as_str()).collect();
    if targets.len() != 2 {
        return Err(t.subject.unroutable(format!(
            "it has {} weighted targets {names:?}; Serin needs exactly two, the virtual nodes {} and {}",
            targets.len(),
            t.arms.primary,
            t.arms.canary
        )));
    }
    let find = |arm: &str| {
        names.iter().position(|n| *n == arm).ok_or_else(|| {
            t.subject.unroutable(format!(
                "its weighted targets are {names:?}; the virtual node {arm} is not among them"
            ))
        })
    };
    let (p, c) = (find(&t.arms.primary)?, find(&t.arms.canary)?);
    if p == c {
        return Err(t
            .subject
            .unroutable("the primary and canary are the same virtual node"));
    }
    Ok((p, c))
}

fn weights_of(
    t: &Target,
    targets: &[WeightedTarget],
    p: usize,
    c: usize,
) -> Result<Weights, RouterError> {
    let w = |i: usize| u64::try_from(targets[i].weight).unwrap_or(0);
    to_percent(w(p), w(c)).ok_or_else(|| {
        t.subject
            .unroutable("both the primary and the canary have weight 0; give the primary a weight")
    })
}

impl AppMeshAwsRouter {
    /// A router with the default credential chain and retry settings.
    pub fn new() -> Self {
        Self::with_options(AwsOptions::default())
    }

    /// A router with explicit options.
    pub fn with_options(options: AwsOptions) -> Self {
        AppMeshAwsRouter {
            options,
            clients: Mutex::new(Bounded::new(bounded::CLIENTS)),
        }
    }

    /// How many SDK clients have been built (one per region, endpoint and role).
    pub async fn cached_clients(&self) -> usize {
        self.clients.lock().await.len()
    }

    async fn client(&self, aws: &AwsConnection) -> aws_sdk_appmesh::Client {
        let key = ClientKey {
            region: aws.region.clone(),
            endpoint: aws.endpoint.clone(),
            role_arn: aws.role_arn.clone(),
        };
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let retry = aws_sdk_appmesh::config::retry::RetryConfig::standard()
            .with_max_attempts(self.options.max_attempts.max(1))
            .with_initial_backoff(self.options.initial_backoff)
            .with_max_backoff(self.options.max_backoff);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(key.region.clone()))
            .retry_config(retry);
        if let Some(creds) = &self.options.credentials {
            loader = loader.credentials_provider(creds.clone());
        }
        let base = loader.load().await;
        let mut conf = aws_sdk_appmesh::config::Builder::from(&base);
        // Only App Mesh goes to the override; STS (for the role) keeps its own endpoint.
        if let Some(endpoint) = &key.endpoint {
            conf = conf.endpoint_url(endpoint);
        }
        if let Some(role) = &key.role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("serin")
                .configure(&base)
                .build()
                .await;
            conf = conf.credentials_provider(provider);
        }
        let client = aws_sdk_appmesh::Client::from_conf(conf.build());
        clients.insert(key, client.clone());
        client
    }

    async fn describe(
        &self,
        client: &aws_sdk_appmesh::Client,
        t: &Target,
    ) -> Result<RouteData, RouterError> {
        let out = client
            .describe_route()
            .mesh_name(&t.spec.mesh)
            .virtual_router_name(&t.spec.virtual_router)
            .route_name(&t.spec.route)
            .set_mesh_owner(t.spec.mesh_owner.clone())
            .send()
            .await
            .map_err(|e| t.aws_error("DescribeRoute", &e))?;
        out.route
            .ok_or_else(|| t.subject.unroutable("DescribeRoute returned no route"))
    }

    /// Reads, checks and writes; `expected: None` overwrites whatever is there.
    async fn write(
        &self,
        canary: &Canary,
        expected: Option<Weights>,
        desired: Weights,
    ) -> Result<WriteOutcome, RouterError> {
        let t = Target::of(canary)?;
        let client = self.client(&t.spec.aws).await;
        {
            let route = self.describe(&client, &t).await?;
            let version = route.metadata.as_ref().map(|m| m.version);
            let mut spec = route
                .spec
                .clone()
                .ok_or_else(|| t.subject.unroutable("the route has no spec"))?;
            let targets = targets_mut(&mut spec).map_err(|r| t.subject.unroutable(r))?;
            let (p, c) = locate(&t, targets)?;
            let found = weights_of(&t, targets, p, c)?;
            if plan(&t.subject, found, expected, desired)? == Plan::Nothing {
                return Ok(WriteOutcome::Unchanged);
            }
            targets[p].weight = i32::from(desired.primary());
            targets[c].weight = i32::from(desired.canary());
            let refused = |message: String| RouterError::Aws {
                operation: "UpdateRoute",
                mesh: t.spec.mesh.clone(),
                name: t.spec.route.clone(),
                message,
                retryable: true,
            };
            // The leader lease must outlive the write (the Kubernetes client is fenced the
            // same way): a write that may still land after a standby took over is not sent.
            let deadline =
                super::admit_write().map_err(|why| refused(format!("not sent: {why}")))?;
            let send = client
                .update_route()
                .mesh_name(&t.spec.mesh)
                .virtual_router_name(&t.spec.virtual_router)
                .route_name(&t.spec.route)
                .set_mesh_owner(t.spec.mesh_owner.clone())
                .spec(spec)
                .send();
            let sent = match deadline {
                None => send.await,
                Some(limit) => tokio::time::timeout(limit, send).await.map_err(|_| {
                    refused(format!(
                        "abandoned after {limit:?}: the leader lease would not have outlived it"
                    ))
                })?,
            };
            let out = sent.map_err(|e| t.aws_error("UpdateRoute", &e))?;
            let new_version = out.route.and_then(|r| r.metadata).map(|m| m.version);
            match (version, new_version) {
                (Some(v), Some(n)) if n != v + 1 => {
                    tracing::warn!(
                        mesh = %t.spec.mesh,
                        route = %t.subject.name,
                        from = v,
                        to = n,
                        "the App Mesh route was updated by another writer at the same time"
                    );
                    Err(t.subject.conflict())
                }
                _ => Ok(WriteOutcome::Written),
            }
        }
    }
}

impl Default for AppMeshAwsRouter {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Router for AppMeshAwsRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::AppMeshApi
    }

    /// Checks that the route exists and has the two weighted targets; writes nothing.
    async fn prepare(&self, canary: &Canary) -> Result<(), RouterError> {
        self.weights(canary).await.map(|_| ())
    }

    async fn weights(&self, canary: &Canary) -> Result<Weights, RouterError> {
        let t = Target::of(canary)?;
        let client = self.client(&t.spec.aws).await;
        let route = self.describe(&client, &t).await?;
        let mut spec = route
            .spec
            .ok_or_else(|| t.subject.unroutable("the route has no spec"))?;
        let targets = targets_mut(&mut spec).map_err(|r| t.subject.unroutable(r))?;
        let (p, c) = locate(&t, targets)?;
        weights_of(&t, targets, p, c)
    }

    async fn set_weights(
        &self,
        canary: &Canary,
        expected: Weights,
        desired: Weights,
    ) -> Result<WriteOutcome, RouterError> {
        self.write(canary, Some(expected), desired).await
    }
}
