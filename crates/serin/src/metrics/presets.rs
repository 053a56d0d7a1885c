//! Built-in queries for the data planes Serin routes, over the metrics those data planes
//! really emit. The exact text of each is in `docs/metrics.md`.
//!
//! Error-rate presets do not ask the provider for a ratio: they fetch the request and error
//! counts of both arms over the window, and Serin computes the canary's rate. That keeps the
//! counts as evidence, makes "no requests" no data rather than 0% errors, and works on
//! CloudWatch servers whose metric math is limited (moto).

use crate::api::{CloudWatchMetric, Dimension, MetricDataQuery, MetricStat, Preset};
use crate::arms::{Arm, DataPlaneArms};

use super::CanaryContext;

/// What a preset measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Percent of requests answered with 5xx.
    ErrorRate,
    /// 99th percentile latency in milliseconds.
    LatencyP99,
}

/// The kind of a preset.
pub fn kind(preset: Preset) -> Kind {
    match preset {
        Preset::AppmeshErrorRate
        | Preset::GlooErrorRate
        | Preset::GatewayErrorRate
        | Preset::CloudwatchAppmeshErrorRate
        | Preset::CloudwatchEcsAppmeshErrorRate => Kind::ErrorRate,
        Preset::AppmeshLatencyP99
        | Preset::GlooLatencyP99
        | Preset::GatewayLatencyP99
        | Preset::CloudwatchAppmeshLatencyP99
        | Preset::CloudwatchEcsAppmeshLatencyP99 => Kind::LatencyP99,
    }
}

/// The regex (RE2, which Prometheus anchors at both ends) of the `envoy_cluster_name` of one
/// arm's Envoy cluster. The names come from the router's resolution of the arms
/// ([`DataPlaneArms`]), never from a second naming rule, so the series judged are the ones
/// the weights move.
pub fn cluster_regex(preset: Preset, arms: &DataPlaneArms, arm: Arm) -> String {
    let target = arms.get(arm);
    let (name, namespace) = (&target.name, &target.namespace);
    match preset {
        // The caller's Envoy names the cluster of a virtual node target
        // `cds_egress_<mesh>_<virtual node>_<protocol>_<port>`, and the App Mesh controller
        // names a VirtualNode `<name>_<namespace>` in AWS.
        Preset::AppmeshErrorRate | Preset::AppmeshLatencyP99 => {
            format!(r#"cds_egress_.+_{name}_{namespace}_(http|http2|grpc)_[0-9]+"#)
        }
        // Gloo names the cluster of an Upstream `<upstream name>_<upstream namespace>`; with
        // its Kubernetes Gateway integration on, kube upstreams' stats carry the prefix
        // `kube-upstream_` (solo-io/gloo#10439).
        Preset::GlooErrorRate | Preset::GlooLatencyP99 => format!(r#"(kube-upstream_)?{name}_.+"#),
        // Envoy-based Gateway API implementations name a backend Service's cluster with its
        // namespace, name and port as path or underscore components:
        // Contour `<ns>/<service>/<port>/<hash>`, kgateway `kube_<ns>_<service>_<port>`.
        _ => format!(r#".*{namespace}[/_]{name}[/_][0-9]+.*"#),
    }
}

/// The arm's name when every cluster [`cluster_regex`] matches holds it as a whole `_`- or
/// `/`-separated part: always, for names of lowercase letters, digits and `-` (Kubernetes
/// names), since each regex puts the name between separators or at the start. `None` for
/// other names (a `.` in a name is a regex wildcard), whose clusters must all be searched.
pub fn cluster_token(arms: &DataPlaneArms, arm: Arm) -> Option<String> {
    let name = &arms.get(arm).name;
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    plain.then(|| name.clone())
}

/// The PromQL label matcher that selects one arm's Envoy cluster ([`cluster_regex`]).
fn cluster_matcher(preset: Preset, arms: &DataPlaneArms, arm: Arm) -> String {
    format!(
        r#"envoy_cluster_name=~"{}""#,
        cluster_regex(preset, arms, arm)
    )
}

/// The PromQL of a preset for many Canaries at once: each query's series are kept apart by
/// `envoy_cluster_name` (and `le` for histogram buckets), so that every Canary's arms are
/// summed from them ([`cluster_regex`] picks an arm's series). `clusters` is the union of
/// the arms' regexes, `fresh` that of the arms whose freshness is judged (the canaries'),
/// `window` the rendered `{{ interval }}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batched {
    /// Instant queries. Error rate: requests, then 5xx responses, by cluster. Latency:
    /// request-time bucket rates by cluster and `le`, then request counts by cluster.
    pub instant: [String; 2],
    /// The range query whose values are the newest sample time by cluster, of the series
    /// the judged query reads (as [`super::freshness_query`] for one Canary).
    pub freshness: String,
}

/// The batched queries of a preset kind (see [`Batched`]).
pub fn promql_batched(kind: Kind, clusters: &str, fresh: &str, window: &str) -> Batched {
    let m = format!(r#"envoy_cluster_name=~"{clusters}""#);
    let f = format!(r#"envoy_cluster_name=~"{fresh}""#);
    match kind {
        Kind::ErrorRate => Batched {
            instant: [
                format!(
                    "sum by (envoy_cluster_name) (increase(envoy_cluster_upstream_rq{{{m}}}[{window}]))"
                ),
                format!(
                    r#"sum by (envoy_cluster_name) (increase(envoy_cluster_upstream_rq{{{m},envoy_response_code=~"5.."}}[{window}]))"#
                ),
            ],
            freshness: format!(
                "max by (envoy_cluster_name) (timestamp(envoy_cluster_upstream_rq{{{f}}}))"
            ),
        },
        Kind::LatencyP99 => Batched {
            instant: [
                format!(
                    "sum by (envoy_cluster_name, le) (rate(envoy_cluster_upstream_rq_time_bucket{{{m}}}[{window}]))"
                ),
                format!(
                    "sum by (envoy_cluster_name) (increase(envoy_cluster_upstream_rq_time_count{{{m}}}[{window}]))"
                ),
            ],
            freshness: format!(
                "max by (envoy_cluster_name) (timestamp(envoy_cluster_upstream_rq_time_count{{{f}}}))"
            ),
        },
    }
}

/// The PromQL templates of a Prometheus error-rate preset: (requests, errors) per arm,
/// primary first.
pub fn promql_error_rate(preset: Preset, canary: &CanaryContext) -> Vec<(Arm, String, String)> {
    Arm::BOTH
        .iter()
        .map(|&arm| {
            let m = cluster_matcher(preset, &canary.data_plane, arm);
            (
                arm,
                format!("sum(increase(envoy_cluster_upstream_rq{{{m}}}[{{{{ interval }}}}]))"),
                format!(
                    r#"sum(increase(envoy_cluster_upstream_rq{{{m},envoy_response_code=~"5.."}}[{{{{ interval }}}}]))"#
                ),
            )
        })
        .collect()
}

/// The PromQL templates of a Prometheus latency preset: (p99 in ms, request count) of the
/// canary.
pub fn promql_latency(preset: Preset, canary: &CanaryContext) -> (String, String) {
    let m = cluster_matcher(preset, &canary.data_plane, Arm::Canary);
    (
        format!(
            "histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket{{{m}}}[{{{{ interval }}}}])))"
        ),
        format!("sum(increase(envoy_cluster_upstream_rq_time_count{{{m}}}[{{{{ interval }}}}]))"),
    )
}

/// The counters the sequential judge reads for one arm, as PromQL selectors of raw
/// cumulative series (not `increase()`: Serin takes the differences itself, so each request
/// counts in exactly one look and nothing is extrapolated).
#[derive(Clone, Debug, PartialEq)]
pub enum Counters {
    /// `envoy_cluster_upstream_rq{...}` by response code: every series is requests, those
    /// with a 5xx `envoy_response_code` are bad.
    Responses(String),
    /// `envoy_cluster_upstream_rq_time_count{...}` (requests) and
    /// `envoy_cluster_upstream_rq_time_bucket{...}` (the series whose `le` is the bound are
    /// the requests at most that slow).
    Latency {
        /// The request count selector.
        count: String,
        /// The bucket selector.
        buckets: String,
    },
}

impl Counters {
    /// The selectors, as sent.
    pub fn queries(&self) -> Vec<String> {
        match self {
            Counters::Responses(q) => vec![q.clone()],
            Counters::Latency { count, buckets } => vec![count.clone(), buckets.clone()],
        }
    }
}

/// The counter selectors of [`promql_counters`] for many arms at once (`clusters`, the union
/// of their regexes), in the order of [`Counters::queries`].
pub fn promql_counters_batched(kind: Kind, clusters: &str) -> Vec<String> {
    let m = format!(r#"envoy_cluster_name=~"{clusters}""#);
    match kind {
        Kind::ErrorRate => vec![format!("envoy_cluster_upstream_rq{{{m}}}")],
        Kind::LatencyP99 => vec![
            format!("envoy_cluster_upstream_rq_time_count{{{m}}}"),
            format!("envoy_cluster_upstream_rq_time_bucket{{{m}}}"),
        ],
    }
}

/// The counter selectors of a Prometheus preset for each arm, primary first.
pub fn promql_counters(preset: Preset, canary: &CanaryContext) -> Vec<(Arm, Counters)> {
    Arm::BOTH
        .iter()
        .map(|&arm| {
            let m = cluster_matcher(preset, &canary.data_plane, arm);
            let counters = match kind(preset) {
                Kind::ErrorRate => Counters::Responses(format!("envoy_cluster_upstream_rq{{{m}}}")),
                Kind::LatencyP99 => Counters::Latency {
                    count: format!("envoy_cluster_upstream_rq_time_count{{{m}}}"),
                    buckets: format!("envoy_cluster_upstream_rq_time_bucket{{{m}}}"),
                },
            };
            (arm, counters)
        })
        .collect()
}

/// True for an Envoy response code label that is a 5xx.
pub fn is_server_error(code: &str) -> bool {
    code.len() == 3 && code.starts_with('5') && code.bytes().all(|b| b.is_ascii_digit())
}

/// CloudWatch namespace the CloudWatch agent (Container Insights, Prometheus support) writes
/// EKS metrics to.
pub const CLOUDWATCH_NAMESPACE: &str = "ContainerInsights/Prometheus";

/// CloudWatch namespace the CloudWatch agent writes ECS tasks' Prometheus metrics to.
pub const CLOUDWATCH_ECS_NAMESPACE: &str = "ECS/ContainerInsights/Prometheus";

/// Where the CloudWatch agent published an arm's Envoy metrics.
#[derive(Clone, Copy)]
enum Publisher<'a> {
    /// EKS: by the pods' Kubernetes `Namespace` and `app` label.
    Eks { app: &'a str },
    /// ECS: by `ClusterName` (`{{ variables.cluster }}`) and the tasks' definition family.
    Ecs { family: &'a str },
}

impl Publisher<'_> {
    fn namespace(self) -> &'static str {
        match self {
            Publisher::Eks { .. } => CLOUDWATCH_NAMESPACE,
            Publisher::Ecs { .. } => CLOUDWATCH_ECS_NAMESPACE,
        }
    }

    fn dimensions(self) -> Vec<Dimension> {
        let dim = |name: &str, value: &str| Dimension {
            name: name.into(),
            value: value.into(),
        };
        match self {
            Publisher::Eks { app } => vec![dim("Namespace", "{{ namespace }}"), dim("app", app)],
            Publisher::Ecs { family } => vec![
                dim("ClusterName", "{{ variables.cluster }}"),
                dim("TaskDefinitionFamily", family),
            ],
        }
    }
}

fn cw_query(
    id: &str,
    metric: &str,
    publisher: Publisher<'_>,
    extra: &[(&str, &str)],
    stat: &str,
    period: i32,
) -> MetricDataQuery {
    let mut dimensions = publisher.dimensions();
    for (name, value) in extra {
        dimensions.push(Dimension {
            name: (*name).into(),
            value: (*value).into(),
        });
    }
    MetricDataQuery {
        id: id.into(),
        metric_stat: Some(MetricStat {
            metric: CloudWatchMetric {
                namespace: publisher.namespace().into(),
                metric_name: metric.into(),
                dimensions,
            },
            period,
            stat: stat.into(),
            unit: None,
        }),
        expression: None,
        label: None,
        return_data: Some(true),
        period: None,
    }
}

/// True for the ECS CloudWatch presets (which need `analysis.variables.cluster`).
pub fn is_ecs(preset: Preset) -> bool {
    matches!(
        preset,
        Preset::CloudwatchEcsAppmeshErrorRate | Preset::CloudwatchEcsAppmeshLatencyP99
    )
}

/// The GetMetricData queries (templates) of a CloudWatch preset, with `period` seconds.
/// Error rate: `primary_requests`, `primary_errors`, `canary_requests`, `canary_errors`
/// (sums). Latency: `canary_p99` and `canary_requests`. These metrics come from each
/// workload's own Envoy (its ingress listener), so they select an arm by its workload
/// ([`DataPlaneArms::pod_apps`]): on EKS the pods' `app` label, on ECS the task definition
/// family; never by a Service or VirtualNode name.
pub fn cloudwatch_queries(
    preset: Preset,
    period: i32,
    arms: &DataPlaneArms,
) -> Vec<MetricDataQuery> {
    let ecs = is_ecs(preset);
    let publisher = |arm: Arm| {
        let name = arms.pod_apps.get(arm).as_str();
        if ecs {
            Publisher::Ecs { family: name }
        } else {
            Publisher::Eks { app: name }
        }
    };
    // On ECS the agent keeps the listener prefix on the status-class counter.
    let errors: &[(&str, &str)] = if ecs {
        &[
            ("envoy_http_conn_manager_prefix", "ingress"),
            ("envoy_response_code_class", "5"),
        ]
    } else {
        &[("envoy_response_code_class", "5")]
    };
    match kind(preset) {
        Kind::ErrorRate => Arm::BOTH
            .iter()
            .flat_map(|&arm| {
                [
                    cw_query(
                        &format!("{}_requests", arm.as_str()),
                        "envoy_http_downstream_rq_total",
                        publisher(arm),
                        &[],
                        "Sum",
                        period,
                    ),
                    cw_query(
                        &format!("{}_errors", arm.as_str()),
                        "envoy_http_downstream_rq_xx",
                        publisher(arm),
                        errors,
                        "Sum",
                        period,
                    ),
                ]
            })
            .collect(),
        Kind::LatencyP99 => vec![
            cw_query(
                "canary_p99",
                "envoy_http_downstream_rq_time",
                publisher(Arm::Canary),
                &[],
                "p99",
                period,
            ),
            cw_query(
                "canary_requests",
                "envoy_http_downstream_rq_total",
                publisher(Arm::Canary),
                &[],
                "Sum",
                period,
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arms::{DataPlaneArm, PerArm};
    use crate::metrics::template::Vars;

    /// A workload-mode Canary whose router resolved its arms to `primary`/`canary` objects
    /// of `kind` in namespace `test`.
    fn ctx(kind: &'static str, primary: &str, canary: &str) -> CanaryContext {
        let spec: crate::api::CanarySpec = serde_norway::from_str(
            r#"
targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
service: {port: 9898}
router: {appMesh: {mesh: global}}
analysis:
  interval: 1m
  metrics:
    - name: e
      provider: {prometheus: {address: "http://p:9090"}}
      preset: appmesh-error-rate
      max: 1
"#,
        )
        .unwrap();
        let arm = |name: &str| DataPlaneArm {
            name: name.into(),
            namespace: "test".into(),
        };
        let data_plane = DataPlaneArms {
            kind,
            primary: arm(primary),
            canary: arm(canary),
            pod_apps: PerArm {
                primary: "podinfo-primary".into(),
                canary: "podinfo".into(),
            },
        };
        CanaryContext::new("test", "podinfo", spec, data_plane)
    }

    /// The App Mesh preset selects the caller-side cluster of exactly one arm's VirtualNode.
    #[test]
    fn appmesh_error_rate_renders() {
        let c = ctx("VirtualNode", "podinfo-primary", "podinfo-canary");
        let vars = Vars::new(&c, std::time::Duration::from_secs(60));
        let q = promql_error_rate(Preset::AppmeshErrorRate, &c);
        assert_eq!(
            vars.render(&q[1].2).unwrap(),
            r#"sum(increase(envoy_cluster_upstream_rq{envoy_cluster_name=~"cds_egress_.+_podinfo-canary_test_(http|http2|grpc)_[0-9]+",envoy_response_code=~"5.."}[1m]))"#
        );
        assert!(
            vars.render(&q[0].1)
                .unwrap()
                .contains("_podinfo-primary_test_")
        );
    }

    /// Gloo presets select the upstream the router resolved for each arm, whatever its
    /// naming rule.
    #[test]
    fn gloo_uses_the_resolved_upstreams() {
        let c = ctx(
            "Upstream",
            "appmesh-demo-colorgateway-9080",
            "appmesh-demo-colorgatewayv2-9080",
        );
        let vars = Vars::new(&c, std::time::Duration::from_secs(90));
        let (p99, _) = promql_latency(Preset::GlooLatencyP99, &c);
        assert_eq!(
            vars.render(&p99).unwrap(),
            r#"histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=~"(kube-upstream_)?appmesh-demo-colorgatewayv2-9080_.+"}[90s])))"#
        );
        let q = promql_error_rate(Preset::GlooErrorRate, &c);
        assert!(
            q[0].1.contains(
                r#"envoy_cluster_name=~"(kube-upstream_)?appmesh-demo-colorgateway-9080_.+""#
            ),
            "{}",
            q[0].1
        );
    }

    /// CloudWatch presets select each arm by its pods' `app` label.
    #[test]
    fn cloudwatch_selects_pods() {
        let c = ctx("VirtualNode", "podinfo-primary", "podinfo-canary");
        let q = cloudwatch_queries(Preset::CloudwatchAppmeshErrorRate, 60, &c.data_plane);
        let apps: Vec<&str> = q
            .iter()
            .map(|q| {
                let dims = &q.metric_stat.as_ref().unwrap().metric.dimensions;
                dims.iter()
                    .find(|d| d.name == "app")
                    .unwrap()
                    .value
                    .as_str()
            })
            .collect();
        assert_eq!(
            apps,
            ["podinfo-primary", "podinfo-primary", "podinfo", "podinfo"]
        );
    }
}
