//! Built-in queries for the data planes Serin routes, over the metrics those data planes
//! really emit. The exact text of each is in `docs/metrics.md`.
//!
//! Error-rate presets do not ask the provider for a ratio: they fetch the request and error
//! counts of both arms over the window, and Serin computes the canary's rate. That keeps the
//! counts as evidence, makes "no requests" no data rather than 0% errors, and works on
//! CloudWatch servers whose metric math is limited (moto).

use crate::api::{CloudWatchMetric, Dimension, MetricDataQuery, MetricStat, Preset};

use super::CanaryContext;

/// Which arm a query is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// The stable arm.
    Primary,
    /// The new arm.
    Canary,
}

impl Arm {
    /// Both arms, primary first.
    pub const BOTH: [Arm; 2] = [Arm::Primary, Arm::Canary];

    /// The template variable holding the arm's name.
    pub fn variable(self) -> &'static str {
        match self {
            Arm::Primary => "{{ primary }}",
            Arm::Canary => "{{ canary }}",
        }
    }

    /// `primary` or `canary`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Primary => "primary",
            Arm::Canary => "canary",
        }
    }
}

/// What a preset measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        | Preset::CloudwatchAppmeshErrorRate => Kind::ErrorRate,
        Preset::AppmeshLatencyP99
        | Preset::GlooLatencyP99
        | Preset::GatewayLatencyP99
        | Preset::CloudwatchAppmeshLatencyP99 => Kind::LatencyP99,
    }
}

/// The PromQL label matcher that selects one arm's Envoy cluster, as a template.
fn cluster_matcher(preset: Preset, canary: &CanaryContext, arm: Arm) -> String {
    let v = arm.variable();
    match preset {
        // The caller's Envoy names the cluster of a virtual node target
        // `cds_egress_<mesh>_<virtual node>_<protocol>_<port>`, and the App Mesh controller
        // names a VirtualNode `<name>_<namespace>` in AWS.
        Preset::AppmeshErrorRate | Preset::AppmeshLatencyP99 => format!(
            r#"envoy_cluster_name=~"cds_egress_.+_{v}_{{{{ namespace }}}}_(http|http2|grpc)_[0-9]+""#
        ),
        // Gloo names the cluster of an Upstream `<upstream name>_<upstream namespace>`;
        // discovery names Upstreams `<service namespace>-<service>-<port>`.
        Preset::GlooErrorRate | Preset::GlooLatencyP99 => {
            let upstream = canary
                .spec
                .router
                .gloo
                .as_ref()
                .and_then(|g| g.upstreams.as_ref())
                .map(|u| match arm {
                    Arm::Primary => u.primary.clone(),
                    Arm::Canary => u.canary.clone(),
                });
            match upstream {
                Some(u) => format!(r#"envoy_cluster_name=~"{u}_.+""#),
                None => format!(r#"envoy_cluster_name=~"{{{{ namespace }}}}-{v}-[0-9]+_.+""#),
            }
        }
        // Envoy-based Gateway API implementations name a backend Service's cluster with its
        // namespace, name and port as path or underscore components:
        // Contour `<ns>/<service>/<port>/<hash>`, kgateway `kube_<ns>_<service>_<port>`.
        _ => format!(r#"envoy_cluster_name=~".*{{{{ namespace }}}}[/_]{v}[/_][0-9]+.*""#),
    }
}

/// The PromQL templates of a Prometheus error-rate preset: (requests, errors) per arm,
/// primary first.
pub fn promql_error_rate(preset: Preset, canary: &CanaryContext) -> Vec<(Arm, String, String)> {
    Arm::BOTH
        .iter()
        .map(|&arm| {
            let m = cluster_matcher(preset, canary, arm);
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
    let m = cluster_matcher(preset, canary, Arm::Canary);
    (
        format!(
            "histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket{{{m}}}[{{{{ interval }}}}])))"
        ),
        format!("sum(increase(envoy_cluster_upstream_rq_time_count{{{m}}}[{{{{ interval }}}}]))"),
    )
}

/// CloudWatch namespace the CloudWatch agent (Container Insights, Prometheus support) writes
/// EKS metrics to.
pub const CLOUDWATCH_NAMESPACE: &str = "ContainerInsights/Prometheus";

/// The `app` pod label of an arm's pods, as a template. These metrics come from each pod's
/// own Envoy, so they carry pod labels, not Service or VirtualNode names: in workload mode
/// the canary's pods are the target's (`app: <target>`) and the primary's are relabelled
/// `<target>-primary`; in traffic mode the backends are named after their pods' `app`.
fn pod_app(arm: Arm, workload: bool) -> &'static str {
    match (arm, workload) {
        (Arm::Canary, true) => "{{ target }}",
        _ => arm.variable(),
    }
}

fn cw_query(
    id: &str,
    metric: &str,
    (arm, workload): (Arm, bool),
    extra: Option<(&str, &str)>,
    stat: &str,
    period: i32,
) -> MetricDataQuery {
    let mut dimensions = vec![
        Dimension {
            name: "Namespace".into(),
            value: "{{ namespace }}".into(),
        },
        Dimension {
            name: "app".into(),
            value: pod_app(arm, workload).into(),
        },
    ];
    if let Some((name, value)) = extra {
        dimensions.push(Dimension {
            name: name.into(),
            value: value.into(),
        });
    }
    MetricDataQuery {
        id: id.into(),
        metric_stat: Some(MetricStat {
            metric: CloudWatchMetric {
                namespace: CLOUDWATCH_NAMESPACE.into(),
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

/// The GetMetricData queries (templates) of a CloudWatch preset, with `period` seconds.
/// Error rate: `primary_requests`, `primary_errors`, `canary_requests`, `canary_errors`
/// (sums). Latency: `canary_p99` and `canary_requests`. `workload` is true in workload mode
/// (`spec.targetRef`), which decides the pods' `app` label of each arm.
pub fn cloudwatch_queries(preset: Preset, period: i32, workload: bool) -> Vec<MetricDataQuery> {
    match kind(preset) {
        Kind::ErrorRate => Arm::BOTH
            .iter()
            .flat_map(|&arm| {
                [
                    cw_query(
                        &format!("{}_requests", arm.as_str()),
                        "envoy_http_downstream_rq_total",
                        (arm, workload),
                        None,
                        "Sum",
                        period,
                    ),
                    cw_query(
                        &format!("{}_errors", arm.as_str()),
                        "envoy_http_downstream_rq_xx",
                        (arm, workload),
                        Some(("envoy_response_code_class", "5")),
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
                (Arm::Canary, workload),
                None,
                "p99",
                period,
            ),
            cw_query(
                "canary_requests",
                "envoy_http_downstream_rq_total",
                (Arm::Canary, workload),
                None,
                "Sum",
                period,
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::template::Vars;

    fn ctx() -> CanaryContext {
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
        CanaryContext::new("test", "podinfo", spec)
    }

    /// The App Mesh preset selects the caller-side cluster of exactly one arm.
    #[test]
    fn appmesh_error_rate_renders() {
        let c = ctx();
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

    /// Gloo presets use `spec.router.gloo.upstreams` when set, discovery names otherwise.
    #[test]
    fn gloo_upstream_names() {
        let mut c = ctx();
        let vars = Vars::new(&c, std::time::Duration::from_secs(90));
        let (p99, _) = promql_latency(Preset::GlooLatencyP99, &c);
        assert_eq!(
            vars.render(&p99).unwrap(),
            r#"histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=~"test-podinfo-canary-[0-9]+_.+"}[90s])))"#
        );
        c.spec.router.gloo = Some(crate::api::GlooRouter {
            upstream_group: None,
            virtual_service: None,
            route_table: None,
            upstreams: Some(crate::api::Backends {
                primary: "a".into(),
                canary: "b".into(),
            }),
        });
        let (p99, _) = promql_latency(Preset::GlooLatencyP99, &c);
        assert!(p99.contains(r#"envoy_cluster_name=~"b_.+""#), "{p99}");
    }
}
