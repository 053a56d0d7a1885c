//! `Canary.spec`: what the user asks for.

use std::collections::BTreeMap;

use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::CanaryStatus;

/// A Canary shifts live traffic from the stable version of a service to a new one in steps,
/// checks SLOs at every step, and rolls back by itself when the new version breaches them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serin.dev",
    version = "v1alpha1",
    kind = "Canary",
    plural = "canaries",
    singular = "canary",
    shortname = "cnry",
    category = "serin",
    namespaced,
    status = "CanaryStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.canaryWeight","description":"Percent of traffic on the canary"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.step","priority":1}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failedChecks"}"#,
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".status.revision","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.targetRef) != has(self.backends)").message("set exactly one of spec.targetRef (workload mode) or spec.backends (traffic mode)"))]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// Workload mode: the Deployment whose pod template changes start a rollout. Serin owns
    /// `<name>-primary` (the stable copy) and shifts traffic to the target when its template
    /// changes. Exactly one of `targetRef` or `backends` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,

    /// Workload mode: the HorizontalPodAutoscaler (`autoscaling/v2`) that scales the target.
    /// Serin keeps `<name>-primary`, a copy of it that scales `<target>-primary`, in step
    /// with it (same bounds, metrics and behaviour), so the stable version autoscales as
    /// the target did; the target's own HPA scales the canary during a rollout (Kubernetes
    /// leaves a Deployment that Serin scaled to 0 alone between rollouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler_ref: Option<AutoscalerRef>,

    /// Traffic mode: two backends that already exist (Services, VirtualNodes or upstreams,
    /// depending on the router). Serin only moves weights between them and touches no
    /// workload. Exactly one of `targetRef` or `backends` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<Backends>,

    /// The Service in front of the workload.
    pub service: ServiceSpec,

    /// How traffic is split. Set exactly one of `appMesh`, `appMeshApi`, `gloo`, `gatewayApi`.
    pub router: RouterSpec,

    /// Canary weight (percent of traffic) at each step, strictly increasing, each in 1..=100.
    /// The last step must be 100: reaching it promotes the canary. Default: [20, 50, 100].
    #[serde(default = "default_steps")]
    #[x_kube(validation = Rule::new("self.all(s, s >= 1 && s <= 100)").message("each step must be between 1 and 100"))]
    #[x_kube(validation = Rule::new("size(self) > 0 && self[size(self) - 1] == 100").message("the last step must be 100 (promotion)"))]
    #[x_kube(validation = Rule::new("self.isSorted() && self.all(s, size(self.filter(t, t == s)) == 1)").message("steps must be strictly increasing"))]
    #[schemars(length(min = 2, max = 20))]
    pub steps: Vec<i32>,

    /// How each step is judged.
    pub analysis: AnalysisSpec,

    /// Freeze the rollout: no step advances, no check is counted, no new rollout starts.
    /// Set back to false to resume where it stopped.
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,

    /// How many finished rollouts `status.history` keeps (newest first). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub history_limit: Option<u32>,

    /// What deleting this Canary does. Serin holds a finalizer until the service is whole
    /// without it. `Revert` (default): workload mode scales the target Deployment back up,
    /// waits until it is ready, points the user-facing Service and the route at it, then
    /// deletes `<target>-primary`; the Services and routing objects are kept, no longer
    /// owned by the Canary. Traffic mode moves all traffic to `backends.primary`. A target
    /// whose revision failed analysis is never put back: the primary keeps serving, as with
    /// `Orphan`. `Orphan`: leave everything Serin created in place and serving, no longer
    /// owned by the Canary, and the weights where they are.
    #[serde(default, skip_serializing_if = "DeletionPolicy::is_default")]
    pub deletion_policy: DeletionPolicy,

    /// How long a Deployment may take to become ready before Serin gives up on it: a canary
    /// that is not ready by then fails the rollout, and a target that is not ready by then
    /// during a `Revert` deletion leaves the primary serving (as `Orphan`). Between 10s and
    /// 24h. Default 10m.
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('24h')").message("must be between 10s and 24h"))]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "checked_duration::optional"
    )]
    pub progress_deadline: Option<Duration>,

    /// HTTP calls at the points of a rollout (Flagger's webhook types and meanings): gates
    /// that hold the rollout until they answer 2xx (`confirm-rollout`, `confirm-promotion`),
    /// hooks that must succeed (`pre-rollout`, `rollout`), a gate that rolls back when it
    /// answers 2xx (`rollback`), and deliveries after the fact (`post-rollout`, `event`).
    /// See docs/webhooks.md for the payload, timeouts and retries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub webhooks: Vec<WebhookSpec>,
}

/// One webhook of `spec.webhooks`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Unique in the Canary; part of the delivery key (`Serin-Delivery` header).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// When it is called and what its answer does.
    #[serde(rename = "type")]
    pub type_: WebhookType,
    /// Where Serin POSTs the payload (`http` or `https`). May be left out when `secretRef`
    /// holds the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Secret in the Canary's namespace: its key `url`, when present, is the URL (and
    /// overrides `url`); every other key is sent as an HTTP header of that name (for
    /// example `Authorization`). Read at each call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// HTTP headers sent with each call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<Header>,
    /// How long one call may take, between 1s and 5m. Default 10s. A call that takes
    /// longer counts as failed (for a gate: not yet).
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('5m')").message("must be between 1s and 5m"))]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "checked_duration::optional"
    )]
    pub timeout: Option<Duration>,
    /// Passed through in the payload's `metadata` (for example a load test's command).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// `event` webhooks only: the body's shape. `Json` (default) is Serin's payload;
    /// `Slack` a Slack-compatible incoming webhook's `{"text"}`; `Teams` a Microsoft Teams
    /// Workflows message with an Adaptive Card, as `serin run --notifications` sends them:
    /// this Canary's own notification channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<WebhookFormat>,
}

/// The body of an `event` webhook.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookFormat {
    /// Serin's payload (docs/webhooks.md).
    Json,
    /// A Slack-compatible incoming webhook (Mattermost, Rocket.Chat): `{"text"}`.
    Slack,
    /// A Microsoft Teams Workflows webhook: a message with an Adaptive Card.
    Teams,
}

/// Default `spec.webhooks[].timeout`.
pub const DEFAULT_WEBHOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl WebhookSpec {
    /// `timeout`, or its default.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
            .map(std::time::Duration::from)
            .unwrap_or(DEFAULT_WEBHOOK_TIMEOUT)
    }
}

/// When a webhook is called, and what its answer does (Flagger's meanings).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookType {
    /// A gate before the rollout starts: the canary is not scaled up and gets no traffic
    /// until every `confirm-rollout` webhook answers 2xx. Polled once per
    /// `analysis.interval`; it waits as long as it takes (no progress deadline runs).
    ConfirmRollout,
    /// Called once the canary is ready, before it gets traffic: every one must answer 2xx.
    /// A failed call is retried at the next interval and counts toward
    /// `analysis.failureThreshold`; reaching it rolls back.
    PreRollout,
    /// Called with every check: a call that fails fails the check (as a failing metric).
    Rollout,
    /// A gate before promotion: at the last analysed step, the rollout does not promote
    /// until every `confirm-promotion` webhook answers 2xx. Called with each check of that
    /// step; the checks go on (and can roll back) while it waits.
    ConfirmPromotion,
    /// Called once after a rollout is promoted or rolled back; a failed delivery is retried
    /// (up to 5 attempts, backing off) and never changes the outcome.
    PostRollout,
    /// A gate that rolls back: called with each check and while a gate waits; an answer 2xx
    /// rolls the rollout back. Any other answer (or none) changes nothing.
    Rollback,
    /// Told of every Event Serin records for the Canary (up to 3 attempts, never awaited by
    /// the rollout).
    Event,
}

impl WebhookType {
    /// Every type, in rollout order.
    pub const ALL: [WebhookType; 7] = [
        WebhookType::ConfirmRollout,
        WebhookType::PreRollout,
        WebhookType::Rollout,
        WebhookType::ConfirmPromotion,
        WebhookType::PostRollout,
        WebhookType::Rollback,
        WebhookType::Event,
    ];

    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookType::ConfirmRollout => "confirm-rollout",
            WebhookType::PreRollout => "pre-rollout",
            WebhookType::Rollout => "rollout",
            WebhookType::ConfirmPromotion => "confirm-promotion",
            WebhookType::PostRollout => "post-rollout",
            WebhookType::Rollback => "rollback",
            WebhookType::Event => "event",
        }
    }
}

/// What deleting a Canary does to the service (see `spec.deletionPolicy`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Put the service back as the user declared it, reached through the same names.
    #[default]
    Revert,
    /// Leave everything Serin created in place and serving, released from the Canary.
    Orphan,
}

impl DeletionPolicy {
    fn is_default(&self) -> bool {
        *self == DeletionPolicy::Revert
    }
}

/// Default `spec.progressDeadline`: ten minutes.
pub const DEFAULT_PROGRESS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

fn is_false(b: &bool) -> bool {
    !*b
}

/// The default canary weights: 80/20, then 50/50, then promotion.
pub fn default_steps() -> Vec<i32> {
    vec![20, 50, 100]
}

/// The history length used when `spec.historyLimit` is not set.
pub const DEFAULT_HISTORY_LIMIT: u32 = 10;

impl CanarySpec {
    /// True in traffic mode (`spec.backends`), false in workload mode (`spec.targetRef`).
    pub fn is_traffic_mode(&self) -> bool {
        self.backends.is_some()
    }

    /// `spec.progressDeadline`, or its default.
    pub fn progress_deadline(&self) -> std::time::Duration {
        self.progress_deadline
            .map(std::time::Duration::from)
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE)
    }

    /// The webhooks of type `t`, in spec order.
    pub fn webhooks_of(&self, t: WebhookType) -> impl Iterator<Item = &WebhookSpec> {
        self.webhooks.iter().filter(move |w| w.type_ == t)
    }

    /// Whether any webhook has type `t`.
    pub fn has_webhook(&self, t: WebhookType) -> bool {
        self.webhooks_of(t).next().is_some()
    }

    /// The number of history entries to keep.
    pub fn history_limit(&self) -> usize {
        self.history_limit.unwrap_or(DEFAULT_HISTORY_LIMIT).max(1) as usize
    }
}

/// A reference to the workload that Serin rolls out.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API version of the target, `apps/v1`.
    pub api_version: String,
    /// Kind of the target, `Deployment`.
    pub kind: String,
    /// Name of the target in the Canary's namespace.
    pub name: String,
}

/// A reference to the target's autoscaler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerRef {
    /// API version of the autoscaler, `autoscaling/v2`.
    #[serde(default = "default_autoscaler_api_version")]
    pub api_version: String,
    /// Kind of the autoscaler, `HorizontalPodAutoscaler`.
    #[serde(default = "default_autoscaler_kind")]
    pub kind: String,
    /// Name of the autoscaler in the Canary's namespace; it must scale the target.
    pub name: String,
}

fn default_autoscaler_api_version() -> String {
    "autoscaling/v2".into()
}

fn default_autoscaler_kind() -> String {
    "HorizontalPodAutoscaler".into()
}

/// The two backends of traffic mode.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Backends {
    /// The backend that receives all traffic before the rollout (the stable version).
    pub primary: String,
    /// The backend that receives traffic step by step (the new version).
    pub canary: String,
}

/// The Service through which the workload is reached.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service name; defaults to the target's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port the Service listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port on the pods; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<i32>,
}

/// Where Serin writes weights. Exactly one field is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.appMesh), has(self.appMeshApi), has(self.gloo), has(self.gatewayApi)].filter(x, x).size() == 1").message("set exactly one of router.appMesh, router.appMeshApi, router.gloo or router.gatewayApi"))]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// AWS App Mesh through its Kubernetes resources (`appmesh.k8s.aws/v1beta2` VirtualRouter
    /// route weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_mesh: Option<AppMeshRouter>,
    /// AWS App Mesh through the AWS API, for meshes managed outside Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_mesh_api: Option<AppMeshApiRouter>,
    /// Gloo Edge UpstreamGroup destinations, or VirtualService/RouteTable multi destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gloo: Option<GlooRouter>,
    /// Gateway API HTTPRoute backendRefs weights (`gateway.networking.k8s.io/v1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_api: Option<GatewayApiRouter>,
}

/// The kind of router a Canary uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterKind {
    /// `router.appMesh`
    AppMesh,
    /// `router.appMeshApi`
    AppMeshApi,
    /// `router.gloo`
    Gloo,
    /// `router.gatewayApi`
    GatewayApi,
}

impl RouterSpec {
    /// The routers that are set, in field order (valid specs have exactly one).
    pub fn kinds(&self) -> Vec<RouterKind> {
        let mut kinds = Vec::new();
        if self.app_mesh.is_some() {
            kinds.push(RouterKind::AppMesh);
        }
        if self.app_mesh_api.is_some() {
            kinds.push(RouterKind::AppMeshApi);
        }
        if self.gloo.is_some() {
            kinds.push(RouterKind::Gloo);
        }
        if self.gateway_api.is_some() {
            kinds.push(RouterKind::GatewayApi);
        }
        kinds
    }
}

/// App Mesh through Kubernetes resources.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppMeshRouter {
    /// Name of the Mesh.
    pub mesh: String,
    /// Traffic mode: an existing VirtualRouter in the Canary's namespace whose route names the
    /// primary and canary VirtualNodes. Workload mode: Serin creates `<target>` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_router: Option<String>,
    /// Name of the route inside the VirtualRouter; defaults to the router's only route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Virtual services the generated VirtualNodes may call (workload mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
}

/// App Mesh through the AWS API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppMeshApiRouter {
    /// Name of the mesh.
    pub mesh: String,
    /// Name of the virtual router.
    pub virtual_router: String,
    /// Name of the route whose weighted targets Serin sets.
    pub route: String,
    /// AWS account that owns the mesh, when it is shared with this account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_owner: Option<String>,
    /// AWS connection settings.
    #[serde(flatten)]
    pub aws: AwsConnection,
}

/// How to reach an AWS API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AwsConnection {
    /// AWS region, for example `us-west-2`.
    pub region: String,
    /// IAM role to assume; credentials otherwise come from the standard AWS chain (IRSA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// Endpoint override (for example a VPC endpoint, or a local test server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// Gloo Edge routing. Set exactly one of `upstreamGroup`, `virtualService` or `routeTable`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.upstreamGroup), has(self.virtualService), has(self.routeTable)].filter(x, x).size() == 1").message("set exactly one of router.gloo.upstreamGroup, router.gloo.virtualService or router.gloo.routeTable"))]
#[serde(rename_all = "camelCase")]
pub struct GlooRouter {
    /// The UpstreamGroup whose destinations carry the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_group: Option<ObjectRef>,
    /// A VirtualService whose route uses `routeAction.multi.destinations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_service: Option<ObjectRef>,
    /// A RouteTable whose route uses `routeAction.multi.destinations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_table: Option<ObjectRef>,
    /// Names of the primary and canary Upstreams when they do not follow Gloo discovery's
    /// `<namespace>-<service>-<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<Backends>,
}

/// Gateway API routing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiRouter {
    /// The HTTPRoute whose rule references the primary and canary Services.
    pub http_route: HttpRouteRef,
}

/// A reference to an HTTPRoute and, optionally, one of its rules.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRef {
    /// Name of the HTTPRoute.
    pub name: String,
    /// Namespace of the HTTPRoute; defaults to the Canary's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the rule (`spec.rules[].name`); defaults to the rule that references both the
    /// primary and canary Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// A reference to a named object, in the Canary's namespace unless `namespace` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// Object name.
    pub name: String,
    /// Object namespace; defaults to the Canary's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// How each step is judged.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// Time between checks at one step, as Kubernetes durations are written (`30s`, `1m`,
    /// `2m30s`), between 1s and 24h. It is also the default query window of each metric.
    /// Default 1m.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("must be between 1s and 24h"))]
    #[serde(
        default = "default_interval",
        deserialize_with = "checked_duration::required"
    )]
    pub interval: Duration,
    /// Successful checks needed at a step before the next step. Default 1.
    #[serde(default = "default_checks_per_step")]
    #[schemars(range(min = 1))]
    pub checks_per_step: u32,
    /// Failed checks in one rollout that trigger a rollback. Default 2.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1))]
    pub failure_threshold: u32,
    /// What an inconclusive check does (no data, NaN, stale data, too few samples, or a
    /// provider error): `Hold` (default) keeps the step and checks again at the next
    /// interval; `Fail` counts it as a failed check. Either way it never advances a step.
    #[serde(default)]
    pub inconclusive_policy: InconclusivePolicy,
    /// Consecutive inconclusive checks after which Serin rolls back, so a rollout does not
    /// hold forever on a broken metric source. 0 means never. Default 5.
    #[serde(default = "default_max_inconclusive")]
    pub max_inconclusive_checks: u32,
    /// How often the sequential judge (`metrics[].judge: Sequential`, the default for
    /// presets) counts the requests since its previous look, between 1s and 24h. Any look
    /// can roll back; only `interval` lets traffic move on. Default 10s, or 1m when a
    /// sequential metric reads CloudWatch (its data comes in one-minute periods).
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("must be between 1s and 24h"))]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "checked_duration::optional"
    )]
    pub look_interval: Option<Duration>,
    /// The chance, per rollout, that the sequential judge rolls back a canary that is no
    /// worse than the primary, however often it looks. Between 0.0001 and 0.2. Default 0.01.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0001, max = 0.2))]
    pub alpha: Option<f64>,
    /// The regression, as a multiple of the primary's error (or slow-request) rate, that a
    /// step must have seen enough canary requests to catch before it advances. At least
    /// 1.1. Default 3. The floor is each metric's `minSampleSize` (default 200 requests),
    /// which alone applies while the primary shows no bad requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.1, max = 100.0))]
    pub min_detectable_ratio: Option<f64>,
    /// How long after a CloudWatch period ends the sequential judge waits before reading it
    /// (CloudWatch can take about two minutes to publish a period completely; a period read
    /// short would lose its missing requests). Between 0s and 10m. Default 2m. Applies only
    /// when a sequential metric reads CloudWatch; a hard failure is then rolled back one
    /// period plus this delay after it starts.
    #[x_kube(validation = Rule::new("duration(self) >= duration('0s') && duration(self) <= duration('10m')").message("must be between 0s and 10m"))]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "checked_duration::optional"
    )]
    pub ingestion_delay: Option<Duration>,
    /// A warm-up after the canary first gets traffic, between 1s and 1h: looks that end
    /// within it roll back only a canary many times (×20 or more) worse than the primary,
    /// and are kept out of the main tests, so a cold start (caches, JIT, connection pools)
    /// is not mistaken for a regression while a hard failure is still caught at once. It
    /// delays the detection of milder regressions by about its length. Default none.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('1h')").message("must be between 1s and 1h"))]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "checked_duration::optional"
    )]
    pub warmup: Option<Duration>,
    /// What the sequential judge does when the canary and the primary are both surely above
    /// `max` and the canary is no worse than the primary (the baseline is unhealthy too):
    /// `RollBack` (default: a bad canary can degrade both arms through shared dependencies)
    /// or `Hold` (stay at this step, keep looking, and wait for a person's command).
    #[serde(default)]
    pub baseline_unhealthy: BaselineUnhealthyPolicy,
    /// Values for `{{ variables.NAME }}` in metric queries.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
    /// The SLOs checked at every step. At least one: Serin never advances without a check.
    #[schemars(length(min = 1, max = 20))]
    pub metrics: Vec<MetricSpec>,
}

/// Default `analysis.interval`: one minute.
pub fn default_interval() -> Duration {
    Duration::from(std::time::Duration::from_secs(60))
}
fn default_checks_per_step() -> u32 {
    1
}
fn default_failure_threshold() -> u32 {
    2
}
fn default_max_inconclusive() -> u32 {
    5
}

/// What the sequential judge does when both arms breach the bound alike.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BaselineUnhealthyPolicy {
    /// Roll the canary back.
    #[default]
    RollBack,
    /// Hold the step (no traffic moves on) and keep looking; a relative regression still
    /// rolls back.
    Hold,
}

/// How a metric is judged.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judge {
    /// Canary against primary, anytime-valid: every look may roll back, and the chance of
    /// rolling back a canary that is no worse stays below `analysis.alpha`. Presets only.
    Sequential,
    /// The canary's value over each `interval` against `min`/`max`; `failureThreshold`
    /// failed checks roll back.
    Threshold,
}

/// What an inconclusive check counts as.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InconclusivePolicy {
    /// Hold the step and check again; only `maxInconclusiveChecks` in a row roll back.
    #[default]
    Hold,
    /// Count the check as failed toward `failureThreshold`.
    Fail,
}

/// One SLO.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.preset), has(self.query), has(self.metricDataQueries)].filter(x, x).size() == 1").message("set exactly one of preset, query (PromQL) or metricDataQueries (CloudWatch)"))]
#[x_kube(validation = Rule::new("has(self.min) || has(self.max)").message("set min, max or both"))]
#[serde(rename_all = "camelCase")]
pub struct MetricSpec {
    /// A name for this check, unique within the Canary (used in status, Events and metrics).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Where the metric comes from.
    pub provider: ProviderSpec,
    /// A built-in query for the router's data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// A PromQL query (Prometheus provider) returning one number. It may use
    /// `{{ namespace }}`, `{{ name }}`, `{{ target }}`, `{{ primary }}`, `{{ canary }}`,
    /// `{{ service }}`, `{{ interval }}` and `{{ variables.NAME }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// CloudWatch GetMetricData queries (CloudWatch provider); exactly one has
    /// `returnData: true` and gives the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_data_queries: Option<Vec<MetricDataQuery>>,
    /// How this metric is judged: `Sequential` (the default for presets that support it:
    /// canary against primary at every look, see docs/analysis.md) or `Threshold` (the
    /// default, and the only judge, for `query` and `metricDataQueries`, and for
    /// `cloudwatch-appmesh-latency-p99`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<Judge>,
    /// Lower bound: the check fails when the value is below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Upper bound: the check fails when the value is above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Minimum sample size (for presets: canary requests in the window) below which the check
    /// is inconclusive instead of pass or fail. With the sequential judge: the fewest canary
    /// requests before a step may advance (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_sample_size: Option<u64>,
    /// Query window, at most `analysis.interval` (between 1s and 24h); defaults to
    /// `analysis.interval`.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("must be between 1s and 24h"))]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "checked_duration::optional"
    )]
    pub window: Option<Duration>,
}

/// Where a metric comes from. Exactly one field is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.prometheus) != has(self.cloudWatch)").message("set exactly one of provider.prometheus or provider.cloudWatch"))]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    /// A Prometheus server (or compatible API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusProvider>,
    /// Amazon CloudWatch GetMetricData.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_watch: Option<AwsConnection>,
}

/// Which metric provider a metric uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// `provider.prometheus`
    Prometheus,
    /// `provider.cloudWatch`
    CloudWatch,
}

impl ProviderSpec {
    /// The provider that is set, when exactly one is (validation rejects anything else).
    pub fn kind(&self) -> Option<ProviderKind> {
        match (&self.prometheus, &self.cloud_watch) {
            (Some(_), None) => Some(ProviderKind::Prometheus),
            (None, Some(_)) => Some(ProviderKind::CloudWatch),
            _ => None,
        }
    }
}

/// A Prometheus server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusProvider {
    /// Base URL, for example `http://prometheus.monitoring:9090`.
    pub address: String,
    /// Query timeout, between 1s and 24h. Default 10s.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("must be between 1s and 24h"))]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "checked_duration::optional"
    )]
    pub timeout: Option<Duration>,
    /// A Secret in the Canary's namespace with `token` (bearer) or `username` and `password`
    /// (basic auth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Extra HTTP headers, for example a tenant header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<Header>,
}

/// A reference to a Secret in the Canary's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    /// Secret name.
    pub name: String,
}

/// An HTTP header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// Built-in queries. Error rates are percent of requests with 5xx responses; latencies are
/// the 99th percentile in milliseconds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// App Mesh Envoy `envoy_cluster_upstream_rq` error rate (Prometheus).
    AppmeshErrorRate,
    /// App Mesh Envoy `envoy_cluster_upstream_rq_time_bucket` p99 (Prometheus).
    AppmeshLatencyP99,
    /// Gloo Envoy cluster error rate (Prometheus).
    GlooErrorRate,
    /// Gloo Envoy cluster p99 latency (Prometheus).
    GlooLatencyP99,
    /// Envoy-based Gateway API implementation error rate (Prometheus).
    GatewayErrorRate,
    /// Envoy-based Gateway API implementation p99 latency (Prometheus).
    GatewayLatencyP99,
    /// App Mesh Envoy metrics published by the CloudWatch agent: error rate.
    CloudwatchAppmeshErrorRate,
    /// App Mesh Envoy metrics published by the CloudWatch agent: p99 latency.
    CloudwatchAppmeshLatencyP99,
    /// App Mesh Envoy metrics the CloudWatch agent publishes from ECS tasks (by ClusterName
    /// `{{ variables.cluster }}` and TaskDefinitionFamily): error rate.
    CloudwatchEcsAppmeshErrorRate,
    /// The same on ECS: p99 latency.
    CloudwatchEcsAppmeshLatencyP99,
}

impl Preset {
    /// All presets, for listing them in messages.
    pub const ALL: [Preset; 10] = [
        Preset::AppmeshErrorRate,
        Preset::AppmeshLatencyP99,
        Preset::GlooErrorRate,
        Preset::GlooLatencyP99,
        Preset::GatewayErrorRate,
        Preset::GatewayLatencyP99,
        Preset::CloudwatchAppmeshErrorRate,
        Preset::CloudwatchAppmeshLatencyP99,
        Preset::CloudwatchEcsAppmeshErrorRate,
        Preset::CloudwatchEcsAppmeshLatencyP99,
    ];

    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::AppmeshErrorRate => "appmesh-error-rate",
            Preset::AppmeshLatencyP99 => "appmesh-latency-p99",
            Preset::GlooErrorRate => "gloo-error-rate",
            Preset::GlooLatencyP99 => "gloo-latency-p99",
            Preset::GatewayErrorRate => "gateway-error-rate",
            Preset::GatewayLatencyP99 => "gateway-latency-p99",
            Preset::CloudwatchAppmeshErrorRate => "cloudwatch-appmesh-error-rate",
            Preset::CloudwatchAppmeshLatencyP99 => "cloudwatch-appmesh-latency-p99",
            Preset::CloudwatchEcsAppmeshErrorRate => "cloudwatch-ecs-appmesh-error-rate",
            Preset::CloudwatchEcsAppmeshLatencyP99 => "cloudwatch-ecs-appmesh-latency-p99",
        }
    }

    /// True for presets answered by CloudWatch, false for Prometheus presets.
    pub fn is_cloudwatch(self) -> bool {
        matches!(
            self,
            Preset::CloudwatchAppmeshErrorRate
                | Preset::CloudwatchAppmeshLatencyP99
                | Preset::CloudwatchEcsAppmeshErrorRate
                | Preset::CloudwatchEcsAppmeshLatencyP99
        )
    }
}

/// One CloudWatch `MetricDataQuery`, as in the GetMetricData API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.metricStat) != has(self.expression)").message("set exactly one of metricStat or expression"))]
#[serde(rename_all = "camelCase")]
pub struct MetricDataQuery {
    /// Short id, starting with a lower-case letter; expressions refer to queries by id.
    pub id: String,
    /// A metric to fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_stat: Option<MetricStat>,
    /// Metric math over other queries' ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
    /// Label shown in CloudWatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// True for exactly one query: the one whose value is the check's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_data: Option<bool>,
    /// Period in seconds for expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<i32>,
}

/// A CloudWatch metric and statistic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricStat {
    /// The metric.
    pub metric: CloudWatchMetric,
    /// Period in seconds (60 or a multiple of 60 for standard resolution).
    #[schemars(range(min = 1))]
    pub period: i32,
    /// Statistic: `Sum`, `Average`, `Maximum`, `Minimum`, `SampleCount` or a percentile such
    /// as `p99`.
    pub stat: String,
    /// Unit filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// A CloudWatch metric identity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudWatchMetric {
    /// Namespace, for example `AWS/AppMesh` or `CWAgent`.
    pub namespace: String,
    /// Metric name.
    pub metric_name: String,
    /// Dimensions; values may use the same templates as PromQL queries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<Dimension>,
}

/// A CloudWatch dimension.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Dimension {
    /// Dimension name.
    pub name: String,
    /// Dimension value.
    pub value: String,
}

/// Durations as Kubernetes writes them (`30s`, `1h30m`, `2.5s`), parsed without panicking:
/// kube-core's parser panics on a sign inside (`1m-1s`) or a value too large for a
/// `std::time::Duration` (`99999999999999999999h`), and it runs while a watch decodes a
/// Canary, where a panic would stop the whole operator. Those are refused as a decoding
/// error of the field instead.
pub mod checked_duration {
    use kube::core::Duration;
    use serde::{Deserialize, Deserializer, de::Error as _};

    /// The longest duration that is parsed at all (10^15 s, well inside what a
    /// `std::time::Duration` holds); validation then keeps every field within its own,
    /// much smaller, bounds and says so.
    const LONGEST_NANOS: f64 = 1e15 * 1e9;

    /// Parses `s`, refusing what kube-core's parser would panic on.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let body = s.strip_prefix(['+', '-']).unwrap_or(s);
        if body.is_empty() {
            return Err(format!(
                "{s:?} is not a duration: write one such as 30s, 1m or 2m30s"
            ));
        }
        if body != "0" {
            let mut rest = body;
            let mut nanos = 0.0_f64;
            while !rest.is_empty() {
                let number_len = rest
                    .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .unwrap_or(rest.len());
                let (number, after) = rest.split_at(number_len);
                let value: f64 = number.parse().map_err(|_| {
                    format!("{s:?} is not a duration: write one such as 30s, 1m or 2m30s")
                })?;
                let unit_len = after
                    .find(|c: char| c.is_ascii_digit() || c == '.')
                    .unwrap_or(after.len());
                let (unit, after) = after.split_at(unit_len);
                let per = match unit {
                    "ns" => 1.0,
                    "us" | "\u{00b5}s" | "\u{03bc}s" => 1e3,
                    "ms" => 1e6,
                    "s" => 1e9,
                    "m" => 60e9,
                    "h" => 3600e9,
                    _ => {
                        return Err(format!(
                            "{s:?} is not a duration: each number needs a unit (h, m, s, ms), as in 1m30s"
                        ));
                    }
                };
                nanos += value * per;
                rest = after;
            }
            if !nanos.is_finite() || nanos > LONGEST_NANOS {
                return Err(format!("{s:?} is far too long: write at most 24h"));
            }
        }
        s.parse::<Duration>().map_err(|e| format!("{s:?}: {e}"))
    }

    /// `deserialize_with` for a required duration.
    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    /// `deserialize_with` for an optional duration.
    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => parse(&s).map(Some).map_err(D::Error::custom),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::parse;

        #[test]
        fn what_kube_core_would_panic_on_is_an_error() {
            for bad in [
                "1m-1s",
                "444407ms-7ms",
                "99999999999999999999h",
                "5124095576030431h1h",
                "",
                "-",
                "1",
                "1x",
                "1..5s",
                "m",
            ] {
                assert!(parse(bad).is_err(), "{bad:?}");
            }
            for (good, secs) in [
                ("30s", 30.0),
                ("1m", 60.0),
                ("2m30s", 150.0),
                ("1.5h", 5400.0),
                ("0", 0.0),
                ("250ms", 0.25),
            ] {
                let d: std::time::Duration = parse(good).unwrap().into();
                assert_eq!(d.as_secs_f64(), secs, "{good}");
            }
            assert!(parse("-1s").unwrap().is_negative());
        }
    }
}

/// The upper edges, in milliseconds, of Envoy's default request-time histogram buckets
/// (`envoy_cluster_upstream_rq_time_bucket{le}`): the sequential judge of a latency preset
/// counts requests slower than `max`, so `max` must be one of them.
pub const ENVOY_LATENCY_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The default `analysis.lookInterval` against Prometheus.
pub const DEFAULT_LOOK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The default `analysis.lookInterval` when a sequential metric reads CloudWatch.
pub const DEFAULT_CLOUDWATCH_LOOK_INTERVAL: std::time::Duration =
    std::time::Duration::from_secs(60);

/// How long after a CloudWatch period ends the sequential judge waits before reading it:
/// CloudWatch may take up to about two minutes to publish a period completely, and a
/// period read short would lose its missing requests for good.
pub const CLOUDWATCH_INGESTION_DELAY: std::time::Duration = std::time::Duration::from_secs(120);

/// The longest `analysis.ingestionDelay`.
pub const MAX_INGESTION_DELAY: std::time::Duration = std::time::Duration::from_secs(600);

impl Preset {
    /// True for the p99 latency presets.
    pub fn is_latency(self) -> bool {
        matches!(
            self,
            Preset::AppmeshLatencyP99
                | Preset::GlooLatencyP99
                | Preset::GatewayLatencyP99
                | Preset::CloudwatchAppmeshLatencyP99
                | Preset::CloudwatchEcsAppmeshLatencyP99
        )
    }

    /// True for presets the sequential judge can read: the Prometheus presets (error rates
    /// from the request counters, latency from the histogram buckets) and the CloudWatch
    /// error rate (per-period sums). CloudWatch latency stays on the threshold judge: its
    /// percentile statistics cannot count requests slower than a bound.
    pub fn supports_sequential(self) -> bool {
        !matches!(
            self,
            Preset::CloudwatchAppmeshLatencyP99 | Preset::CloudwatchEcsAppmeshLatencyP99
        )
    }
}

impl MetricSpec {
    /// The judge of this metric: `judge` when set, else `Sequential` for presets that
    /// support it and `Threshold` for everything else.
    pub fn judge(&self) -> Judge {
        match (self.judge, self.preset) {
            (Some(j), _) => j,
            (None, Some(p)) if p.supports_sequential() => Judge::Sequential,
            _ => Judge::Threshold,
        }
    }

    /// True when the metric's value is read at checks: every threshold-judged metric, and
    /// the sequential latency presets, whose p99 stays the value users see (the judge
    /// itself counts the requests slower than `max`).
    pub fn is_read_at_checks(&self) -> bool {
        !self.is_sequential() || self.preset.is_some_and(Preset::is_latency)
    }

    /// The sequential judge's bound as a fraction of requests: an error rate's `max`
    /// percent; for latency, 1% slower than `max` (p99 at most `max`). `None` without `max`.
    pub fn guard_bound(&self) -> Option<f64> {
        let max = self.max?;
        Some(if self.preset.is_some_and(Preset::is_latency) {
            0.01
        } else {
            max / 100.0
        })
    }

    /// True when the sequential judge applies (and the spec allows it).
    pub fn is_sequential(&self) -> bool {
        self.judge() == Judge::Sequential && self.preset.is_some_and(Preset::supports_sequential)
    }
}

impl AnalysisSpec {
    /// `alpha`, or its default.
    pub fn alpha(&self) -> f64 {
        self.alpha
            .filter(|a| a.is_finite() && *a > 0.0 && *a < 1.0)
            .unwrap_or(crate::analysis::sequential::DEFAULT_ALPHA)
    }

    /// `minDetectableRatio`, or its default.
    pub fn min_detectable_ratio(&self) -> f64 {
        self.min_detectable_ratio
            .filter(|r| r.is_finite() && *r > 1.0)
            .unwrap_or(crate::analysis::sequential::DEFAULT_MIN_DETECTABLE_RATIO)
    }

    /// How far behind the present the sequential judge's looks stay: the CloudWatch
    /// ingestion delay when a sequential metric reads CloudWatch, else none.
    pub fn look_delay(&self) -> std::time::Duration {
        if self.sequential_cloudwatch() {
            match self.ingestion_delay {
                Some(d) if !d.is_negative() => {
                    std::time::Duration::from(d).min(MAX_INGESTION_DELAY)
                }
                _ => CLOUDWATCH_INGESTION_DELAY,
            }
        } else {
            std::time::Duration::ZERO
        }
    }

    /// True when a sequential metric reads CloudWatch (whose looks fall on whole periods).
    pub fn sequential_cloudwatch(&self) -> bool {
        self.metrics
            .iter()
            .any(|m| m.is_sequential() && m.provider.cloud_watch.is_some())
    }

    /// How many tests the sequential judge averages: one per sequential metric, one more
    /// for each bound.
    pub fn sequential_tests(&self) -> usize {
        self.metrics
            .iter()
            .filter(|m| m.is_sequential())
            .map(|m| 1 + usize::from(m.guard_bound().is_some()))
            .sum()
    }

    /// True when at least one metric is judged sequentially.
    pub fn has_sequential(&self) -> bool {
        self.metrics.iter().any(MetricSpec::is_sequential)
    }

    /// `lookInterval`, or its default (never longer than `interval`).
    pub fn look_interval(&self) -> std::time::Duration {
        let interval: std::time::Duration = if self.interval.is_negative() {
            std::time::Duration::from_secs(1)
        } else {
            self.interval.into()
        };
        let default = if self.sequential_cloudwatch() {
            DEFAULT_CLOUDWATCH_LOOK_INTERVAL
        } else {
            DEFAULT_LOOK_INTERVAL
        };
        let look = match self.look_interval {
            Some(d) if !d.is_negative() => d.into(),
            _ => default,
        };
        look.clamp(
            std::time::Duration::from_secs(1),
            interval.max(std::time::Duration::from_secs(1)),
        )
    }
}
