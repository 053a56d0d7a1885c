//! Semantic validation of a `CanarySpec`: one [`Problem`] per mistake, each naming the field,
//! what is wrong and how to fix it.
//!
//! The generated CRD carries the same rules as CEL where CEL can express them, so a cluster
//! rejects most mistakes at `kubectl apply`; this function is what `serin validate`, the
//! controller's `Invalid` condition and its Warning Event use, so the wording is the same
//! everywhere. It does not look at anything outside the spec (for example whether the
//! target Deployment exists): that is the controller's job.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use super::spec::*;

/// One mistake in a Canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Field path, for example `spec.steps[2]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

impl Problem {
    /// A problem at `field`.
    pub fn new(
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Problem {
            field: field.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.field, self.message, self.fix)
    }
}

/// Template variables every query may use, besides `variables.NAME`.
pub const TEMPLATE_VARIABLES: [&str; 7] = [
    "namespace",
    "name",
    "target",
    "primary",
    "canary",
    "service",
    "interval",
];

/// Checks a Canary spec. An empty result means valid.
pub fn validate(spec: &CanarySpec) -> Vec<Problem> {
    let mut p = Vec::new();
    check_mode(spec, &mut p);
    check_service(&spec.service, &mut p);
    check_router(spec, &mut p);
    check_steps(&spec.steps, &mut p);
    check_analysis(&spec.analysis, &mut p);
    check_webhooks(&spec.webhooks, &mut p);
    if let Some(d) = &spec.progress_deadline {
        check_duration("spec.progressDeadline", d, &mut p);
        let std: std::time::Duration = (*d).into();
        if !d.is_negative()
            && std >= std::time::Duration::from_secs(1)
            && std < MIN_PROGRESS_DEADLINE
        {
            p.push(Problem::new(
                "spec.progressDeadline",
                format!(
                    "is {}s, shorter than the 10s a Deployment needs to start",
                    std.as_secs()
                ),
                "write at least 10s, for example 5m or 10m (the default)",
            ));
        }
    }
    if let Some(limit) = spec.history_limit
        && !(1..=100).contains(&limit)
    {
        p.push(Problem::new(
            "spec.historyLimit",
            format!("{limit} is out of range"),
            "use a number from 1 to 100, or leave it out for 10",
        ));
    }
    p
}

/// The most webhooks a Canary may have.
pub const MAX_WEBHOOKS: usize = 20;

/// Names unique and usable as a delivery key; a URL (or a Secret that holds one) that is
/// http(s); headers that can be sent; a timeout in range.
fn check_webhooks(hooks: &[WebhookSpec], p: &mut Vec<Problem>) {
    if hooks.len() > MAX_WEBHOOKS {
        p.push(Problem::new(
            "spec.webhooks",
            format!("has {} webhooks", hooks.len()),
            format!("keep at most {MAX_WEBHOOKS}; one webhook can fan out behind its URL"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, w) in hooks.iter().enumerate() {
        let f = format!("spec.webhooks[{i}]");
        if !is_dns_label(&w.name) {
            p.push(Problem::new(
                format!("{f}.name"),
                format!("{:?} is not a valid webhook name", w.name),
                "use lowercase letters, digits and '-', at most 63 characters, for example load-test",
            ));
        } else if !seen.insert(w.name.as_str()) {
            p.push(Problem::new(
                format!("{f}.name"),
                format!("{:?} is used by another webhook", w.name),
                "give each webhook its own name",
            ));
        }
        match (&w.url, &w.secret_ref) {
            (None, None) => p.push(Problem::new(
                format!("{f}.url"),
                "is not set",
                "set url (for example http://loadtester.test/gate/approve), or secretRef naming a Secret whose key `url` holds it",
            )),
            (Some(url), _) if !is_http_url(url) => p.push(Problem::new(
                format!("{f}.url"),
                format!("{url:?} is not an http(s) URL"),
                "write an absolute URL that starts with http:// or https://",
            )),
            _ => {}
        }
        if w.format.is_some() && w.type_ != WebhookType::Event {
            p.push(Problem::new(
                format!("{f}.format"),
                format!("is set on a {} webhook", w.type_.as_str()),
                "remove format: only event webhooks send Slack or Teams messages (the others get Serin's payload)",
            ));
        }
        if let Some(r) = &w.secret_ref
            && !is_dns_subdomain(&r.name)
        {
            p.push(Problem::new(
                format!("{f}.secretRef.name"),
                format!("{:?} is not a Secret name", r.name),
                "name a Secret in the Canary's own namespace (lowercase letters, digits, '-' and '.'); Serin never reads Secrets of other namespaces",
            ));
        }
        for (j, h) in w.headers.iter().enumerate() {
            if reqwest::header::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                p.push(Problem::new(
                    format!("{f}.headers[{j}].name"),
                    format!("{:?} is not an HTTP header name", h.name),
                    "use letters, digits and '-', for example X-Api-Key",
                ));
            }
            if reqwest::header::HeaderValue::from_str(&h.value).is_err() {
                p.push(Problem::new(
                    format!("{f}.headers[{j}].value"),
                    "holds characters that cannot go in an HTTP header (a line break?)",
                    "write the value on one line of printable characters",
                ));
            }
        }
        if let Some(t) = &w.timeout {
            check_duration(&format!("{f}.timeout"), t, p);
            let std: std::time::Duration = (*t).into();
            if !t.is_negative() && !(1..=300).contains(&std.as_secs()) {
                p.push(Problem::new(
                    format!("{f}.timeout"),
                    format!("{}s is out of range", std.as_secs_f64()),
                    "use a timeout between 1s and 5m, or leave it out for 10s",
                ));
            }
        }
    }
}

/// Whether `url` is an absolute http or https URL with a host.
pub fn is_http_url(url: &str) -> bool {
    reqwest::Url::parse(url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

fn check_mode(spec: &CanarySpec, p: &mut Vec<Problem>) {
    match (&spec.target_ref, &spec.backends) {
        (None, None) => p.push(Problem::new(
            "spec",
            "neither targetRef nor backends is set",
            "set spec.targetRef (a Deployment Serin rolls out) or spec.backends (two existing backends whose traffic Serin shifts)",
        )),
        (Some(_), Some(_)) => p.push(Problem::new(
            "spec.backends",
            "both targetRef and backends are set",
            "keep spec.targetRef for workload mode or spec.backends for traffic mode, not both",
        )),
        (Some(t), None) => {
            if t.api_version != "apps/v1" || t.kind != "Deployment" {
                p.push(Problem::new(
                    "spec.targetRef",
                    format!("{}/{} is not supported", t.api_version, t.kind),
                    "point targetRef at a Deployment: apiVersion apps/v1, kind Deployment",
                ));
            }
            check_name("spec.targetRef.name", &t.name, p);
            if let Some(a) = &spec.autoscaler_ref {
                if a.api_version != "autoscaling/v2" || a.kind != "HorizontalPodAutoscaler" {
                    p.push(Problem::new(
                        "spec.autoscalerRef",
                        format!("{}/{} is not supported", a.api_version, a.kind),
                        "point autoscalerRef at a HorizontalPodAutoscaler: apiVersion autoscaling/v2, kind HorizontalPodAutoscaler",
                    ));
                }
                check_name("spec.autoscalerRef.name", &a.name, p);
                // `<name>-primary` must be a valid name too.
                if a.name.len() > 63 - "-primary".len() {
                    p.push(Problem::new(
                        "spec.autoscalerRef.name",
                        format!("{:?} is too long for Serin's copy {:?}", a.name, format!("{}-primary", a.name)),
                        "use an autoscaler name of at most 55 characters",
                    ));
                }
            }
        }
        (None, Some(b)) => {
            if spec.autoscaler_ref.is_some() {
                p.push(Problem::new(
                    "spec.autoscalerRef",
                    "is set in traffic mode (spec.backends)",
                    "remove spec.autoscalerRef: in traffic mode Serin touches no workload, so the backends keep their own autoscalers",
                ));
            }
            check_name("spec.backends.primary", &b.primary, p);
            check_name("spec.backends.canary", &b.canary, p);
            if !b.primary.is_empty() && b.primary == b.canary {
                p.push(Problem::new(
                    "spec.backends.canary",
                    format!("is the same as backends.primary ({})", b.primary),
                    "name the new version's backend in canary and the stable one in primary",
                ));
            }
        }
    }
}

fn check_name(field: &str, name: &str, p: &mut Vec<Problem>) {
    if name.is_empty() {
        p.push(Problem::new(field, "is empty", "give the object's name"));
    } else if !is_dns_label(name) {
        p.push(Problem::new(
            field,
            format!("{name:?} is not a valid Kubernetes name"),
            "use lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters",
        ));
    }
}

/// A DNS-1123 subdomain: what Kubernetes accepts as a Secret's name.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_service(s: &ServiceSpec, p: &mut Vec<Problem>) {
    if !(1..=65535).contains(&s.port) {
        p.push(Problem::new(
            "spec.service.port",
            format!("{} is not a port number", s.port),
            "use the Service's port, from 1 to 65535",
        ));
    }
    if let Some(tp) = s.target_port
        && !(1..=65535).contains(&tp)
    {
        p.push(Problem::new(
            "spec.service.targetPort",
            format!("{tp} is not a port number"),
            "use the container port, from 1 to 65535, or leave it out to use service.port",
        ));
    }
    if let Some(name) = &s.name {
        check_name("spec.service.name", name, p);
    }
}

fn check_router(spec: &CanarySpec, p: &mut Vec<Problem>) {
    let r = &spec.router;
    let kinds = r.kinds();
    if kinds.is_empty() {
        p.push(Problem::new(
            "spec.router",
            "no router is set",
            "set one of router.appMesh, router.appMeshApi, router.gloo or router.gatewayApi",
        ));
        return;
    }
    if kinds.len() > 1 {
        p.push(Problem::new(
            "spec.router",
            format!("{} routers are set", kinds.len()),
            "keep exactly one of router.appMesh, router.appMeshApi, router.gloo or router.gatewayApi",
        ));
    }
    if let Some(m) = &r.app_mesh {
        if m.mesh.is_empty() {
            p.push(Problem::new(
                "spec.router.appMesh.mesh",
                "is empty",
                "name the App Mesh mesh",
            ));
        }
        if spec.is_traffic_mode() && spec.target_ref.is_none() && m.virtual_router.is_none() {
            p.push(Problem::new(
                "spec.router.appMesh.virtualRouter",
                "is required in traffic mode (spec.backends)",
                "name the existing VirtualRouter whose route targets the primary and canary VirtualNodes",
            ));
        }
    }
    if let Some(m) = &r.app_mesh_api {
        for (field, value) in [
            ("mesh", &m.mesh),
            ("virtualRouter", &m.virtual_router),
            ("route", &m.route),
            ("region", &m.aws.region),
        ] {
            if value.is_empty() {
                p.push(Problem::new(
                    format!("spec.router.appMeshApi.{field}"),
                    "is empty",
                    format!("set {field} as it is named in AWS App Mesh"),
                ));
            }
        }
        check_endpoint(
            "spec.router.appMeshApi.endpoint",
            m.aws.endpoint.as_deref(),
            p,
        );
    }
    if let Some(g) = &r.gloo {
        let set = [
            g.upstream_group.is_some(),
            g.virtual_service.is_some(),
            g.route_table.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            p.push(Problem::new(
                "spec.router.gloo",
                format!("{set} of upstreamGroup, virtualService, routeTable are set"),
                "set exactly one of router.gloo.upstreamGroup, router.gloo.virtualService or router.gloo.routeTable",
            ));
        }
        for (field, obj) in [
            ("upstreamGroup", &g.upstream_group),
            ("virtualService", &g.virtual_service),
            ("routeTable", &g.route_table),
        ] {
            if let Some(o) = obj {
                check_name(&format!("spec.router.gloo.{field}.name"), &o.name, p);
            }
        }
    }
    if let Some(g) = &r.gateway_api {
        check_name(
            "spec.router.gatewayApi.httpRoute.name",
            &g.http_route.name,
            p,
        );
    }
}

fn check_endpoint(field: &str, endpoint: Option<&str>, p: &mut Vec<Problem>) {
    if let Some(e) = endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        p.push(Problem::new(
            field,
            format!("{e:?} is not an http(s) URL"),
            "write the endpoint as a URL, for example https://appmesh.us-west-2.amazonaws.com",
        ));
    }
}

fn check_steps(steps: &[i32], p: &mut Vec<Problem>) {
    if steps.is_empty() {
        p.push(Problem::new(
            "spec.steps",
            "is empty",
            "list canary weights ending in 100, for example [20, 50, 100], or leave steps out for that default",
        ));
        return;
    }
    if steps.len() == 1 && steps[0] == 100 {
        p.push(Problem::new(
            "spec.steps",
            "has no step below 100, so nothing would be checked before promotion",
            "add at least one partial step before 100, for example [20, 50, 100]",
        ));
    }
    if steps.len() > 20 {
        p.push(Problem::new(
            "spec.steps",
            format!("has {} steps", steps.len()),
            "use at most 20 steps",
        ));
    }
    for (i, &s) in steps.iter().enumerate() {
        if !(1..=100).contains(&s) {
            p.push(Problem::new(
                format!("spec.steps[{i}]"),
                format!("{s} is not a weight from 1 to 100"),
                "give each step the canary's percent of traffic, from 1 to 100",
            ));
        } else if i > 0 && s <= steps[i - 1] {
            p.push(Problem::new(
                format!("spec.steps[{i}]"),
                format!(
                    "{s} does not increase on the step before it ({})",
                    steps[i - 1]
                ),
                "list steps in strictly increasing order, for example [20, 50, 100]",
            ));
        }
    }
    if let Some(&last) = steps.last()
        && last != 100
    {
        p.push(Problem::new(
            format!("spec.steps[{}]", steps.len() - 1),
            format!("the last step is {last}, not 100"),
            "end the steps with 100: reaching it promotes the canary",
        ));
    }
}

fn check_analysis(a: &AnalysisSpec, p: &mut Vec<Problem>) {
    check_duration("spec.analysis.interval", &a.interval, p);
    if a.checks_per_step == 0 {
        p.push(Problem::new(
            "spec.analysis.checksPerStep",
            "is 0",
            "use at least 1: the number of successful checks needed before the next step",
        ));
    }
    if a.failure_threshold == 0 {
        p.push(Problem::new(
            "spec.analysis.failureThreshold",
            "is 0",
            "use at least 1: the number of failed checks that trigger a rollback",
        ));
    }
    if let Some(look) = &a.look_interval {
        check_duration("spec.analysis.lookInterval", look, p);
        let (look, interval): (std::time::Duration, std::time::Duration) =
            ((*look).into(), a.interval.into());
        if !a.interval.is_negative() && look > interval {
            p.push(Problem::new(
                "spec.analysis.lookInterval",
                format!(
                    "is {}s, longer than analysis.interval ({}s)",
                    look.as_secs(),
                    interval.as_secs()
                ),
                "make lookInterval at most the interval (the default, 10s, suits Prometheus)",
            ));
        }
    }
    if let Some(d) = &a.ingestion_delay {
        let secs = std::time::Duration::from(*d).as_secs();
        if d.is_negative() || secs > 600 {
            p.push(Problem::new(
                "spec.analysis.ingestionDelay",
                "must be between 0s and 10m",
                "use how long CloudWatch takes to publish a period completely, for example 2m",
            ));
        }
    }
    if let Some(w) = &a.warmup {
        check_duration("spec.analysis.warmup", w, p);
        let w: std::time::Duration = (*w).into();
        if w > std::time::Duration::from_secs(3600) {
            p.push(Problem::new(
                "spec.analysis.warmup",
                format!("is {}s, longer than 1h", w.as_secs()),
                "use the time a new version needs to warm up, for example 30s",
            ));
        }
    }
    if let Some(look) = &a.look_interval
        && a.sequential_cloudwatch()
        && !look.is_negative()
        && !std::time::Duration::from(*look)
            .as_secs()
            .is_multiple_of(60)
    {
        p.push(Problem::new(
            "spec.analysis.lookInterval",
            format!(
                "is {}s, but a sequential metric reads CloudWatch, which answers in whole minutes",
                std::time::Duration::from(*look).as_secs()
            ),
            "use a multiple of 1m (the default for CloudWatch is 1m), or set judge: Threshold on the CloudWatch metrics",
        ));
    }
    if let Some(alpha) = a.alpha
        && !(0.0001..=0.2).contains(&alpha)
    {
        p.push(Problem::new(
            "spec.analysis.alpha",
            format!("is {alpha}, outside 0.0001..0.2"),
            "use a small probability such as 0.01 (one good release in a hundred rolled back at most)",
        ));
    }
    if let Some(r) = a.min_detectable_ratio
        && !(1.1..=100.0).contains(&r)
    {
        p.push(Problem::new(
            "spec.analysis.minDetectableRatio",
            format!("is {r}, outside 1.1..100"),
            "use the smallest regression worth catching, as a multiple of the primary's rate, for example 3",
        ));
    }
    for key in a.variables.keys() {
        if !is_identifier(key) {
            p.push(Problem::new(
                format!("spec.analysis.variables.{key}"),
                "is not a valid variable name",
                "use letters, digits and '_', starting with a letter",
            ));
        }
    }
    if a.metrics.is_empty() {
        p.push(Problem::new(
            "spec.analysis.metrics",
            "is empty",
            "add at least one metric, for example {name: error-rate, preset: appmesh-error-rate, max: 1, provider: {prometheus: {address: http://prometheus:9090}}}: Serin never advances without a check",
        ));
    }
    let mut names = HashSet::new();
    for (i, m) in a.metrics.iter().enumerate() {
        let f = format!("spec.analysis.metrics[{i}]");
        if m.name.is_empty() {
            p.push(Problem::new(
                format!("{f}.name"),
                "is empty",
                "give the metric a short name, for example error-rate",
            ));
        } else if !names.insert(m.name.as_str()) {
            p.push(Problem::new(
                format!("{f}.name"),
                format!("{:?} is used by an earlier metric", m.name),
                "give each metric its own name",
            ));
        }
        check_metric(&f, m, a, p);
    }
}

/// The longest duration Serin accepts anywhere (an analysis interval of a day is already
/// beyond any canary's patience); longer ones would overflow time arithmetic.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The shortest `spec.progressDeadline`: less would fail any real Deployment.
const MIN_PROGRESS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn check_duration(field: &str, d: &kube::core::Duration, p: &mut Vec<Problem>) {
    let std: std::time::Duration = (*d).into();
    if d.is_negative() || std < std::time::Duration::from_secs(1) {
        p.push(Problem::new(
            field,
            "is shorter than one second",
            "write a positive duration such as 30s, 1m or 2m30s",
        ));
    } else if std > MAX_DURATION {
        p.push(Problem::new(
            field,
            format!("is {}s, longer than the 24h Serin allows", std.as_secs()),
            "write a duration of at most 24h, such as 1m or 10m",
        ));
    }
}

/// One metric `f` (`analysis.metrics[i]`): its provider, window, query source and bounds.
fn check_metric(f: &str, m: &MetricSpec, a: &AnalysisSpec, p: &mut Vec<Problem>) {
    check_provider(f, m, p);
    if let Some(w) = &m.window {
        check_duration(&format!("{f}.window"), w, p);
        check_window(f, w, a, p);
    }
    check_source(f, m, a, p);
    check_bounds(f, m, p);
    check_judge(f, m, p);
}

/// The sequential judge only where it can read per-arm counts, and latency bounds on a
/// histogram bucket edge.
fn check_judge(f: &str, m: &MetricSpec, p: &mut Vec<Problem>) {
    if m.judge != Some(Judge::Sequential) && !m.is_sequential() {
        return;
    }
    let Some(preset) = m.preset else {
        p.push(Problem::new(
            format!("{f}.judge"),
            "is Sequential, which needs per-arm request counts that only presets provide",
            "use a preset, or set judge: Threshold for a query or metricDataQueries",
        ));
        return;
    };
    if !preset.supports_sequential() {
        p.push(Problem::new(
            format!("{f}.judge"),
            format!(
                "is Sequential, but preset {} reads CloudWatch percentiles, which cannot count the requests slower than a bound",
                preset.as_str()
            ),
            "leave judge out or set judge: Threshold (see docs/analysis.md), or use a Prometheus latency preset",
        ));
        return;
    }
    if m.min.is_some() {
        p.push(Problem::new(
            format!("{f}.min"),
            "does not apply to the sequential judge, which tests for rates that are too high",
            "remove min, or set judge: Threshold",
        ));
    }
    if crate::metrics::presets::kind(preset) == crate::metrics::presets::Kind::LatencyP99 {
        match m.max {
            None => p.push(Problem::new(
                format!("{f}.max"),
                "is missing: the sequential latency judge counts requests slower than max",
                "set max in milliseconds on a bucket edge, for example max: 500",
            )),
            Some(max) if !ENVOY_LATENCY_BUCKETS_MS.contains(&max) => p.push(Problem::new(
                format!("{f}.max"),
                format!(
                    "is {max}, not an edge of Envoy's latency histogram buckets, so requests slower than it cannot be counted"
                ),
                format!(
                    "use one of {} (milliseconds), or set judge: Threshold",
                    ENVOY_LATENCY_BUCKETS_MS
                        .iter()
                        .map(|b| crate::analysis::display_value(*b))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            Some(_) => {}
        }
    }
}

/// A window no longer than the step interval: a longer one reaches back into the traffic of
/// the previous step (another weight, or before the canary got any).
fn check_window(f: &str, w: &kube::core::Duration, a: &AnalysisSpec, p: &mut Vec<Problem>) {
    let (window, interval): (std::time::Duration, std::time::Duration) =
        ((*w).into(), a.interval.into());
    if !w.is_negative() && !a.interval.is_negative() && window > interval {
        p.push(Problem::new(
            format!("{f}.window"),
            format!(
                "is {}s, longer than analysis.interval ({}s): each check would also judge the previous step's traffic",
                window.as_secs(),
                interval.as_secs()
            ),
            "make window at most analysis.interval, or leave it out (it defaults to the interval)",
        ));
    }
}

/// Exactly one provider, with a usable address or region.
fn check_provider(f: &str, m: &MetricSpec, p: &mut Vec<Problem>) {
    let prom = m.provider.prometheus.as_ref();
    let cw = m.provider.cloud_watch.as_ref();
    match (prom, cw) {
        (None, None) => p.push(Problem::new(
            format!("{f}.provider"),
            "no provider is set",
            "set provider.prometheus.address or provider.cloudWatch.region",
        )),
        (Some(_), Some(_)) => p.push(Problem::new(
            format!("{f}.provider"),
            "both prometheus and cloudWatch are set",
            "keep one provider per metric; add a second metric for the other",
        )),
        _ => {}
    }
    if let Some(pr) = prom {
        if !(pr.address.starts_with("http://") || pr.address.starts_with("https://")) {
            p.push(Problem::new(
                format!("{f}.provider.prometheus.address"),
                format!("{:?} is not an http(s) URL", pr.address),
                "write the server's base URL, for example http://prometheus.monitoring:9090",
            ));
        }
        if let Some(t) = &pr.timeout {
            check_duration(&format!("{f}.provider.prometheus.timeout"), t, p);
        }
        if let Some(r) = &pr.secret_ref
            && !is_dns_subdomain(&r.name)
        {
            // Also what keeps a name like `../../kube-system/secrets/x` from reaching
            // another namespace's Secret through the request path.
            p.push(Problem::new(
                format!("{f}.provider.prometheus.secretRef.name"),
                format!("{:?} is not a Secret name", r.name),
                "name a Secret in the Canary's own namespace (lowercase letters, digits, '-' and '.'); Serin never reads Secrets of other namespaces",
            ));
        }
    }
    if let Some(c) = cw {
        if c.region.is_empty() {
            p.push(Problem::new(
                format!("{f}.provider.cloudWatch.region"),
                "is empty",
                "set the AWS region of the metrics, for example us-west-2",
            ));
        }
        check_endpoint(
            &format!("{f}.provider.cloudWatch.endpoint"),
            c.endpoint.as_deref(),
            p,
        );
    }
}

/// Exactly one of preset, query and metricDataQueries, each fitting the provider.
fn check_source(f: &str, m: &MetricSpec, a: &AnalysisSpec, p: &mut Vec<Problem>) {
    let sources = [
        m.preset.is_some(),
        m.query.is_some(),
        m.metric_data_queries.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if sources == 0 {
        p.push(Problem::new(
            f.to_string(),
            "has no preset, query or metricDataQueries",
            format!(
                "set preset (one of {}), query (PromQL) or metricDataQueries (CloudWatch)",
                Preset::ALL.map(Preset::as_str).join(", ")
            ),
        ));
    } else if sources > 1 {
        p.push(Problem::new(
            f.to_string(),
            "sets more than one of preset, query and metricDataQueries",
            "keep exactly one of them",
        ));
    }
    if let Some(preset) = m.preset {
        check_preset_provider(f, preset, m, p);
        check_preset_variables(f, preset, a, p);
    }
    if let Some(q) = &m.query {
        check_query(f, q, m, a, p);
    }
    if let Some(qs) = &m.metric_data_queries {
        if m.provider.prometheus.is_some() {
            p.push(Problem::new(
                format!("{f}.metricDataQueries"),
                "are CloudWatch queries, but the provider is prometheus",
                "use query (PromQL) for Prometheus, or provider.cloudWatch",
            ));
        }
        check_metric_data_queries(&format!("{f}.metricDataQueries"), qs, a, p);
    }
}

/// The ECS presets select the ECS cluster by `analysis.variables.cluster`.
fn check_preset_variables(f: &str, preset: Preset, a: &AnalysisSpec, p: &mut Vec<Problem>) {
    if crate::metrics::presets::is_ecs(preset) && !a.variables.contains_key("cluster") {
        p.push(Problem::new(
            format!("{f}.preset"),
            format!(
                "{} selects the ECS cluster by analysis.variables.cluster, which is not set",
                preset.as_str()
            ),
            "add analysis.variables.cluster: the ECS cluster name the CloudWatch agent publishes as ClusterName",
        ));
    }
}

/// A preset reads the provider it is made for.
fn check_preset_provider(f: &str, preset: Preset, m: &MetricSpec, p: &mut Vec<Problem>) {
    if preset.is_cloudwatch() && m.provider.prometheus.is_some() {
        p.push(Problem::new(
            format!("{f}.preset"),
            format!(
                "{} reads CloudWatch, but the provider is prometheus",
                preset.as_str()
            ),
            "use provider.cloudWatch, or a Prometheus preset such as appmesh-error-rate",
        ));
    }
    if !preset.is_cloudwatch() && m.provider.cloud_watch.is_some() {
        p.push(Problem::new(
            format!("{f}.preset"),
            format!(
                "{} is a PromQL preset, but the provider is cloudWatch",
                preset.as_str()
            ),
            "use provider.prometheus, or a CloudWatch preset such as cloudwatch-appmesh-error-rate",
        ));
    }
}

/// A PromQL query: for Prometheus, not empty, with known template variables.
fn check_query(f: &str, q: &str, m: &MetricSpec, a: &AnalysisSpec, p: &mut Vec<Problem>) {
    if m.provider.cloud_watch.is_some() {
        p.push(Problem::new(
            format!("{f}.query"),
            "is PromQL, but the provider is cloudWatch",
            "use metricDataQueries for CloudWatch, or provider.prometheus for PromQL",
        ));
    }
    if q.trim().is_empty() {
        p.push(Problem::new(
            format!("{f}.query"),
            "is empty",
            "write a PromQL query that returns one number",
        ));
    }
    check_template(&format!("{f}.query"), q, a, p);
}

/// At least one bound, finite, and min ≤ max.
fn check_bounds(f: &str, m: &MetricSpec, p: &mut Vec<Problem>) {
    match (m.min, m.max) {
        (None, None) => p.push(Problem::new(
            f.to_string(),
            "has neither min nor max",
            "set max (breach when above, e.g. max: 1 for a 1% error rate) and/or min (breach when below)",
        )),
        (Some(lo), Some(hi)) if lo > hi => p.push(Problem::new(
            format!("{f}.min"),
            format!("{lo} is greater than max ({hi})"),
            "make min less than or equal to max",
        )),
        _ => {}
    }
    for (name, v) in [("min", m.min), ("max", m.max)] {
        if let Some(v) = v
            && !v.is_finite()
        {
            p.push(Problem::new(
                format!("{f}.{name}"),
                "is not a finite number",
                "write a plain number",
            ));
        }
    }
}

fn check_metric_data_queries(
    f: &str,
    qs: &[MetricDataQuery],
    a: &AnalysisSpec,
    p: &mut Vec<Problem>,
) {
    if qs.is_empty() {
        p.push(Problem::new(
            f,
            "is empty",
            "add the GetMetricData queries; mark the result with returnData: true",
        ));
        return;
    }
    // GetMetricData treats a missing ReturnData as true.
    let returning: Vec<&str> = qs
        .iter()
        .filter(|q| q.return_data != Some(false))
        .map(|q| q.id.as_str())
        .collect();
    if returning.len() != 1 {
        p.push(Problem::new(
            f,
            format!(
                "{} queries return data ({}); CloudWatch treats a missing returnData as true",
                returning.len(),
                returning.join(", ")
            ),
            "set returnData: true on the one query that gives the value and returnData: false on every other",
        ));
    }
    let mut ids = BTreeSet::new();
    for (i, q) in qs.iter().enumerate() {
        let qf = format!("{f}[{i}]");
        if !is_cloudwatch_id(&q.id) {
            p.push(Problem::new(
                format!("{qf}.id"),
                format!("{:?} is not a valid query id", q.id),
                "start with a lower-case letter; use only letters, digits and '_'",
            ));
        } else if !ids.insert(q.id.as_str()) {
            p.push(Problem::new(
                format!("{qf}.id"),
                format!("{:?} is used twice", q.id),
                "give each query its own id",
            ));
        }
        match (&q.metric_stat, &q.expression) {
            (None, None) | (Some(_), Some(_)) => p.push(Problem::new(
                qf.clone(),
                "must set exactly one of metricStat or expression",
                "use metricStat to fetch a metric, or expression for metric math over other ids",
            )),
            (Some(ms), None) => {
                if ms.period <= 0 || (ms.period >= 60 && ms.period % 60 != 0) {
                    p.push(Problem::new(
                        format!("{qf}.metricStat.period"),
                        format!("{} seconds is not a valid period", ms.period),
                        "use 1, 5, 10, 30 or a multiple of 60 seconds",
                    ));
                }
                for (j, d) in ms.metric.dimensions.iter().enumerate() {
                    check_template(
                        &format!("{qf}.metricStat.metric.dimensions[{j}].value"),
                        &d.value,
                        a,
                        p,
                    );
                }
            }
            (None, Some(e)) => check_template(&format!("{qf}.expression"), e, a, p),
        }
    }
}

fn is_cloudwatch_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The variables a template uses, in order, or the first syntax error.
pub fn template_variables(template: &str) -> Result<Vec<String>, String> {
    let mut vars = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err("has a '{{' without a closing '}}'".to_string());
        };
        vars.push(after[..end].trim().to_string());
        rest = &after[end + 2..];
    }
    Ok(vars)
}

fn check_template(field: &str, template: &str, a: &AnalysisSpec, p: &mut Vec<Problem>) {
    let vars = match template_variables(template) {
        Ok(v) => v,
        Err(e) => {
            p.push(Problem::new(
                field,
                e,
                "close every {{ with }}, for example {{ namespace }}",
            ));
            return;
        }
    };
    for v in vars {
        let known = TEMPLATE_VARIABLES.contains(&v.as_str())
            || v.strip_prefix("variables.")
                .is_some_and(|k| a.variables.contains_key(k));
        if !known {
            let fix = if let Some(k) = v.strip_prefix("variables.") {
                format!("define {k} under spec.analysis.variables, or remove {{{{ {v} }}}}")
            } else {
                format!(
                    "use one of {}, or variables.NAME defined in spec.analysis.variables",
                    TEMPLATE_VARIABLES.join(", ")
                )
            };
            p.push(Problem::new(
                field,
                format!("uses unknown variable {{{{ {v} }}}}"),
                fix,
            ));
        }
    }
}
