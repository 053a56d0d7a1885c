//! What only a real server shows: `kubectl explain` from the OpenAPI the real kube-apiserver
//! publishes for Serin's CRD, `kubectl wait` on Serin's conditions, the real CEL cost budget
//! and rule messages (set side by side with the in-memory server's), and what deleting a
//! workload-mode Canary leaves, with the real garbage collector and endpoint controllers,
//! while requests are routed through the Services and the mesh; the chart's roles for
//! people folded into `view` and `edit` by the real aggregation controller; and the
//! primary's copy of the target's HorizontalPodAutoscaler.
//!
//! Every test runs on a real control plane (`TestCluster::start_real`) whatever the run's
//! backend, each in a namespace of its own. The closed-loop tests put `support::e2e`'s parts
//! (traffic simulator, Prometheus, the real `serin run` with its chart's RBAC) together on
//! it, as `e2e::env` does on the run's backend. This file does not test the in-memory server;
//! it only compares the real server's CEL verdicts with it.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use serin::api::{Canary, ConditionStatus, Phase};
use serin::demo::traffic::Behaviour;
use support::cluster::{TestCluster, kubectl, repo_root};
use support::e2e::*;
use support::wait_for;

// ---------------------------------------------------------------------------------------
// Helpers

/// Runs the control plane's `kubectl` with `--kubeconfig`.
fn run_kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `s` with every run of whitespace made one space: `kubectl explain` wraps descriptions
/// at its terminal width.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn example(name: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("examples").join(name)).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn canaries_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("serin.dev", "v1alpha1", "Canary"),
        "canaries",
    )
}

// ---------------------------------------------------------------------------------------
// 1. kubectl explain

/// `kubectl explain canary.spec.analysis.metrics` prints the doc comments of `MetricSpec`
/// and of its fields from the OpenAPI the real server publishes for Serin's CRD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_shows_the_metric_docs() {
    let Some(cluster) = TestCluster::start_real("explain").await else {
        return;
    };
    // The server publishes a CRD's OpenAPI a moment after the CRD is Established.
    let out = wait_for(
        "kubectl explain to describe canary.spec.analysis.metrics",
        Duration::from_secs(30),
        || async {
            let out = run_kubectl(
                &cluster.kubeconfig,
                &["explain", "canary.spec.analysis.metrics"],
            );
            let stdout = text(&out.stdout);
            (out.status.success() && stdout.contains("FIELDS:")).then_some(stdout)
        },
    )
    .await;
    eprintln!("{out}");
    let flat = squash(&out);
    for expected in [
        "GROUP: serin.dev",
        "KIND: Canary",
        "VERSION: v1alpha1",
        "FIELD: metrics <[]Object>",
        // The field's doc comment (`AnalysisSpec::metrics`), then the item type's
        // (`MetricSpec`).
        "DESCRIPTION: The SLOs checked at every step. At least one: Serin never advances without a check. One SLO.",
        "max <number> Upper bound: the check fails when the value is above it.",
        "min <number> Lower bound: the check fails when the value is below it.",
        "name <string> -required- A name for this check, unique within the Canary (used in status, Events and metrics).",
        "provider <Object> -required- Where the metric comes from.",
        // `preset` shows the doc comment of the `Preset` enum (the CRD carries that one),
        // and its values.
        "preset <string> enum: appmesh-error-rate, appmesh-latency-p99,",
        "Built-in queries. Error rates are percent of requests with 5xx responses; latencies are the 99th percentile in milliseconds.",
        "query <string> A PromQL query (Prometheus provider) returning one number.",
        "window <string> Query window, at most `analysis.interval` (between 1s and 24h); defaults to `analysis.interval`.",
    ] {
        assert!(flat.contains(expected), "{expected:?} not in\n{out}");
    }
    let fields: Vec<&str> = out
        .split_once("FIELDS:")
        .map(|(_, f)| f)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.contains('\t'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for field in ["provider", "preset", "query", "max", "min", "name"] {
        assert!(fields.contains(&field), "{field} not listed in {fields:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. kubectl wait

/// `kubectl wait --for=condition=Promoted canary/podinfo`, started before a new image is
/// rolled out, keeps waiting through the steps and exits 0 once the rollout has promoted
/// (phase Succeeded), not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_wait_for_promoted_returns_when_the_rollout_promotes() {
    let Some((env, weights)) = podinfo_env_real("kubectl-wait", Behaviour::HEALTHY).await else {
        return;
    };
    let op = ready_operator(&env, "podinfo").await;
    let mut wait = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["--namespace", &env.ns])
        .args(["wait", "--for=condition=Promoted", "canary/podinfo"])
        .arg("--timeout=150s")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kubectl wait");
    set_image(&env, "podinfo", "podinfo:2").await;

    let deadline = Instant::now() + Duration::from_secs(150);
    let mut phases_while_waiting = Vec::new();
    let status = loop {
        // The phase first, then whether kubectl has exited: a phase other than Succeeded
        // read here was current while kubectl was still waiting.
        let phase = canary(&env, "podinfo").await.status.map(|s| s.phase);
        if let Some(status) = wait.try_wait().unwrap() {
            break status;
        }
        if let Some(p) = phase
            && phases_while_waiting.last() != Some(&p)
        {
            phases_while_waiting.push(p);
        }
        if Instant::now() > deadline {
            let _ = wait.kill();
            dump(&env, &op, "podinfo").await;
            panic!("kubectl wait did not return; phases seen: {phases_while_waiting:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = wait.wait_with_output().unwrap();
    let c = canary(&env, "podinfo").await;
    let st = c.status.clone().unwrap();
    eprintln!(
        "kubectl wait exited ({status}: {}) with the phase {:?}; phases seen while it waited: {phases_while_waiting:?}",
        text(&out.stdout).trim(),
        st.phase
    );
    if !status.success() || st.phase != Phase::Succeeded {
        dump(&env, &op, "podinfo").await;
    }
    assert!(
        status.success(),
        "kubectl wait: {status}\n{}",
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "canary.serin.dev/podinfo condition met"
    );
    assert_eq!(st.phase, Phase::Succeeded, "kubectl wait returned early");
    let promoted = serin::api::find_condition(&st.conditions, serin::api::PROMOTED).unwrap();
    assert_eq!(promoted.status, ConditionStatus::True);
    assert_eq!(promoted.reason, "Promoted");
    assert_eq!(
        st.history[0].result,
        serin::api::RolloutResult::Promoted,
        "{:?}",
        st.history
    );
    // It waited through the rollout: it was still running while the canary was analysed.
    assert!(
        phases_while_waiting.contains(&Phase::Progressing),
        "{phases_while_waiting:?}"
    );
    assert_eq!(
        weights.pairs(),
        vec![(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)]
    );
}

// ---------------------------------------------------------------------------------------
// 3. CEL rules

/// Serin's CRD as users apply it (`crds/serin.dev_canaries.yaml`), created afresh under a
/// group of its own, passes the real server's CEL compilation and cost budget and becomes
/// Established, with no warning (schemars' unsigned-integer formats, which the server warned
/// about on every apply, are left out of the CRD).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serin_crd_passes_the_real_cost_budget() {
    let Some(cluster) = TestCluster::start_real("crd").await else {
        return;
    };
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client.clone());
    let installed = crds.get("canaries.serin.dev").await.unwrap();
    let conditions = installed.status.unwrap().conditions.unwrap_or_default();
    for type_ in ["Established", "NamesAccepted"] {
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == type_ && c.status == "True"),
            "canaries.serin.dev is not {type_}: {conditions:?}"
        );
    }

    // A create (not an update of the shared CRD) is where the server checks every rule's
    // estimated cost against the budget. Under a group and names of its own, so that
    // `canary` still means Serin's kind for the other tests' kubectl.
    let group = format!("{}.serin-test.dev", cluster.namespace);
    let name = format!("probecanaries.{group}");
    let yaml = std::fs::read_to_string(repo_root().join("crds/serin.dev_canaries.yaml")).unwrap();
    let mut crd: Value = serde_norway::from_str(&yaml).unwrap();
    crd["metadata"]["name"] = json!(name);
    crd["spec"]["group"] = json!(group);
    crd["spec"]["names"] = json!({
        "kind": "ProbeCanary", "listKind": "ProbeCanaryList",
        "plural": "probecanaries", "singular": "probecanary"
    });
    let file = cluster.dir.path().join("crd.json");
    std::fs::write(&file, crd.to_string()).unwrap();
    let out = run_kubectl(
        &cluster.kubeconfig,
        &["create", "-f", file.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    eprintln!("kubectl create: {}{stderr}", text(&out.stdout));
    assert!(
        out.status.success(),
        "the real server refused the CRD: {stderr}"
    );
    let established = run_kubectl(
        &cluster.kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            &format!("crd/{name}"),
            "--timeout=30s",
        ],
    );
    let _ = run_kubectl(
        &cluster.kubeconfig,
        &["delete", "crd", &name, "--wait=false"],
    );
    assert!(
        established.status.success(),
        "{}",
        text(&established.stderr)
    );
    let mut warnings: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    warnings.sort();
    warnings.dedup();
    assert_eq!(
        warnings,
        Vec::<&str>::new(),
        "creating Serin's CRD printed warnings"
    );
}

/// A change to a valid Canary.
type Mutation = Box<dyn Fn(&mut Value)>;

/// How a server answered the create of a Canary.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Accepted,
    Rejected {
        code: u16,
        message: String,
        /// (field, message) of each cause, sorted.
        causes: Vec<(String, String)>,
    },
}

impl Verdict {
    fn code(&self) -> u16 {
        match self {
            Verdict::Accepted => 201,
            Verdict::Rejected { code, .. } => *code,
        }
    }

    fn message(&self) -> &str {
        match self {
            Verdict::Accepted => "",
            Verdict::Rejected { message, .. } => message,
        }
    }
}

async fn create_canary(api: &Api<DynamicObject>, ns: &str, mut obj: Value, name: &str) -> Verdict {
    obj["metadata"] = json!({"name": name, "namespace": ns});
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Verdict::Accepted,
        Err(kube::Error::Api(s)) => {
            let mut causes: Vec<(String, String)> = s
                .details
                .iter()
                .flat_map(|d| d.causes.iter())
                .map(|c| (c.field.clone(), c.message.clone()))
                .collect();
            causes.sort();
            Verdict::Rejected {
                code: s.code,
                message: s.message,
                causes,
            }
        }
        Err(e) => panic!("create Canary {name}: {e}"),
    }
}

/// The in-memory API server with Serin's CRD and a namespace `cel` (as `crd_cel.rs` has it).
async fn embedded_canaries() -> (kube_sandbox::ApiServer, Api<DynamicObject>) {
    let server = kube_sandbox::ApiServer::start(kube_sandbox::Options::default())
        .await
        .unwrap();
    let crd: Value = serde_norway::from_str(&serin::api::crd_yaml().unwrap()).unwrap();
    server.apply_crd(crd).unwrap();
    let client = server.client().unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "cel"}})).unwrap(),
        )
        .await
        .unwrap();
    let api = Api::namespaced_with(client, "cel", &canaries_resource());
    (server, api)
}

/// Every example Canary, and one at the schema's size limits (20 steps, 20 metrics), is
/// accepted by the real server's schema and CEL rules, within the runtime cost budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_pass_the_real_crd_rules() {
    let Some(cluster) = TestCluster::start_real("cel-ok").await else {
        return;
    };
    let api = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.namespace,
        &canaries_resource(),
    );
    let mut largest = example("appmesh-workload.yaml");
    largest["spec"]["steps"] = json!((1..=20).map(|i| i * 5).collect::<Vec<_>>());
    let metric = largest["spec"]["analysis"]["metrics"][0].clone();
    largest["spec"]["analysis"]["metrics"] = Value::Array(
        (0..20)
            .map(|i| {
                let mut m = metric.clone();
                m["name"] = json!(format!("m-{i}"));
                m
            })
            .collect(),
    );
    let mut objects: Vec<(String, Value)> = [
        "appmesh-workload.yaml",
        "appmesh-colorapp-traffic.yaml",
        "gloo-upstreamgroup.yaml",
        "gateway-api.yaml",
        "appmesh-api-cloudwatch.yaml",
        "gateway-api-webhooks.yaml",
    ]
    .iter()
    .map(|n| (n.to_string(), example(n)))
    .collect();
    objects.push(("the largest Canary".into(), largest));
    for (i, (what, obj)) in objects.into_iter().enumerate() {
        let verdict = create_canary(&api, &cluster.namespace, obj, &format!("ok-{i}")).await;
        assert_eq!(verdict, Verdict::Accepted, "{what}");
    }
}

/// One mistake per case: (name, example it changes, the change, the messages the real
/// server must give).
fn mistakes() -> Vec<(&'static str, &'static str, Mutation, Vec<&'static str>)> {
    const WORKLOAD: &str = "appmesh-workload.yaml";
    const GLOO: &str = "gloo-upstreamgroup.yaml";
    const CLOUDWATCH: &str = "appmesh-api-cloudwatch.yaml";
    let queries = |v: &mut Value| v["spec"]["analysis"]["metrics"][1]["metricDataQueries"].clone();
    vec![
        // The cases of crd_cel.rs.
        (
            "steps-order",
            WORKLOAD,
            Box::new(|v: &mut Value| v["spec"]["steps"] = json!([50, 20, 100])),
            vec!["spec.steps: Invalid value: steps must be strictly increasing"],
        ),
        (
            "steps-dup",
            WORKLOAD,
            Box::new(|v| v["spec"]["steps"] = json!([50, 50, 100])),
            vec!["spec.steps: Invalid value: steps must be strictly increasing"],
        ),
        (
            "steps-last",
            WORKLOAD,
            Box::new(|v| v["spec"]["steps"] = json!([20, 50])),
            vec!["spec.steps: Invalid value: the last step must be 100 (promotion)"],
        ),
        (
            "interval-too-long",
            WORKLOAD,
            Box::new(|v| v["spec"]["analysis"]["interval"] = json!("25h")),
            vec!["spec.analysis.interval: Invalid value: \"25h\": must be between 1s and 24h"],
        ),
        (
            // Beyond what a duration holds: CEL cannot even convert it, and says so.
            "interval-overflows",
            WORKLOAD,
            Box::new(|v| v["spec"]["analysis"]["interval"] = json!("3000000000h")),
            vec!["spec.analysis.interval", "must be between 1s and 24h"],
        ),
        (
            "window-negative",
            WORKLOAD,
            Box::new(|v| v["spec"]["analysis"]["metrics"][0]["window"] = json!("-1s")),
            vec![
                "spec.analysis.metrics[0].window: Invalid value: \"-1s\": must be between 1s and 24h",
            ],
        ),
        (
            "progress-deadline-too-short",
            WORKLOAD,
            Box::new(|v| v["spec"]["progressDeadline"] = json!("5s")),
            vec!["spec.progressDeadline: Invalid value: \"5s\": must be between 10s and 24h"],
        ),
        (
            "steps-range",
            WORKLOAD,
            Box::new(|v| v["spec"]["steps"] = json!([0, 50, 100])),
            vec!["spec.steps: Invalid value: each step must be between 1 and 100"],
        ),
        (
            "both-modes",
            WORKLOAD,
            Box::new(|v| v["spec"]["backends"] = json!({"primary": "a", "canary": "b"})),
            vec![
                "spec: Invalid value: set exactly one of spec.targetRef (workload mode) or spec.backends (traffic mode)",
            ],
        ),
        (
            "two-routers",
            WORKLOAD,
            Box::new(|v| v["spec"]["router"]["gatewayApi"] = json!({"httpRoute": {"name": "x"}})),
            vec![
                "spec.router: Invalid value: set exactly one of router.appMesh, router.appMeshApi, router.gloo or router.gatewayApi",
            ],
        ),
        (
            "no-bound",
            WORKLOAD,
            Box::new(|v| {
                v["spec"]["analysis"]["metrics"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("max");
            }),
            vec!["spec.analysis.metrics[1]: Invalid value: set min, max or both"],
        ),
        (
            "preset-and-query",
            WORKLOAD,
            Box::new(|v| v["spec"]["analysis"]["metrics"][0]["query"] = json!("sum(up)")),
            vec![
                "spec.analysis.metrics[0]: Invalid value: set exactly one of preset, query (PromQL) or metricDataQueries (CloudWatch)",
            ],
        ),
        (
            "two-providers",
            WORKLOAD,
            Box::new(|v| {
                v["spec"]["analysis"]["metrics"][0]["provider"]["cloudWatch"] =
                    json!({"region": "us-west-2"})
            }),
            vec![
                "spec.analysis.metrics[0].provider: Invalid value: set exactly one of provider.prometheus or provider.cloudWatch",
            ],
        ),
        // The rules crd_cel.rs does not reach, and edges where servers could differ.
        (
            "no-mode",
            WORKLOAD,
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("targetRef");
            }),
            vec![
                "spec: Invalid value: set exactly one of spec.targetRef (workload mode) or spec.backends (traffic mode)",
            ],
        ),
        (
            "no-router",
            WORKLOAD,
            Box::new(|v| v["spec"]["router"] = json!({})),
            vec![
                "spec.router: Invalid value: set exactly one of router.appMesh, router.appMeshApi, router.gloo or router.gatewayApi",
            ],
        ),
        (
            "gloo-two-targets",
            GLOO,
            Box::new(|v| {
                v["spec"]["router"]["gloo"]["virtualService"] =
                    json!({"name": "vs", "namespace": "gloo-system"})
            }),
            vec![
                "spec.router.gloo: Invalid value: set exactly one of router.gloo.upstreamGroup, router.gloo.virtualService or router.gloo.routeTable",
            ],
        ),
        (
            "gloo-no-target",
            GLOO,
            Box::new(|v| {
                v["spec"]["router"]["gloo"]
                    .as_object_mut()
                    .unwrap()
                    .remove("upstreamGroup");
            }),
            vec![
                "spec.router.gloo: Invalid value: set exactly one of router.gloo.upstreamGroup, router.gloo.virtualService or router.gloo.routeTable",
            ],
        ),
        (
            "query-stat-and-expression",
            CLOUDWATCH,
            Box::new(move |v| {
                let mut q = queries(v);
                q[1]["metricStat"] = q[0]["metricStat"].clone();
                v["spec"]["analysis"]["metrics"][1]["metricDataQueries"] = q;
            }),
            vec![
                "spec.analysis.metrics[1].metricDataQueries[1]: Invalid value: set exactly one of metricStat or expression",
            ],
        ),
        (
            "query-neither",
            CLOUDWATCH,
            Box::new(move |v| {
                let mut q = queries(v);
                q[1].as_object_mut().unwrap().remove("expression");
                v["spec"]["analysis"]["metrics"][1]["metricDataQueries"] = q;
            }),
            vec![
                "spec.analysis.metrics[1].metricDataQueries[1]: Invalid value: set exactly one of metricStat or expression",
            ],
        ),
        (
            "null-max",
            WORKLOAD,
            Box::new(|v| v["spec"]["analysis"]["metrics"][1]["max"] = Value::Null),
            vec!["spec.analysis.metrics[1]: Invalid value: set min, max or both"],
        ),
        (
            "null-preset",
            WORKLOAD,
            Box::new(|v| v["spec"]["analysis"]["metrics"][0]["preset"] = Value::Null),
            vec!["spec.analysis.metrics[0].preset: Unsupported value: null"],
        ),
        (
            "empty-steps",
            WORKLOAD,
            Box::new(|v| v["spec"]["steps"] = json!([])),
            vec![
                "spec.steps in body should have at least 2 items",
                "the last step must be 100 (promotion)",
            ],
        ),
        (
            "no-metrics",
            WORKLOAD,
            Box::new(|v| v["spec"]["analysis"]["metrics"] = json!([])),
            vec!["spec.analysis.metrics in body should have at least 1 items"],
        ),
    ]
}

/// The cases where the in-memory server answers differently from the real one today (the
/// wording aside: the real server's "Invalid value: <rule message>" has no `"object"` or
/// `"array"` before the message, and its causes do not repeat the field path):
/// - `null-max`: for `max: null` the real server's CEL `has(self.max)` is false, so the
///   metric has no bound and is rejected; the in-memory server accepts it (Serin's own
///   validation then reports it).
/// - `null-preset`: the real server checks `null` against the enum (`nullable` does not
///   add it) and rejects it; the in-memory server accepts it.
/// - `empty-steps`: the real server reports the CEL rule besides `minItems`; the in-memory
///   server skips the rules of a field that fails its schema.
/// - `interval-overflows`: both reject a duration beyond what CEL's duration holds with the
///   rule's message, but the real server says first that the conversion failed (and shows
///   the value as `"string"`).
const KNOWN_DIFFERENCES: [&str; 4] = [
    "null-max",
    "null-preset",
    "empty-steps",
    "interval-overflows",
];

/// Each mistake is rejected by the real server with 422 and the rule's message; the same
/// object sent to the in-memory server gets the same verdict and the same causes (wording
/// aside), except in the [`KNOWN_DIFFERENCES`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cel_rules_reject_mistakes_with_the_real_messages() {
    let Some(cluster) = TestCluster::start_real("cel").await else {
        return;
    };
    let real = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.namespace,
        &canaries_resource(),
    );
    let (_server, embedded) = embedded_canaries().await;
    let mut failures = Vec::new();
    let mut differences = Vec::new();
    for (name, base, mutate, expected) in mistakes() {
        let mut obj = example(base);
        mutate(&mut obj);
        let r = create_canary(&real, &cluster.namespace, obj.clone(), name).await;
        let e = create_canary(&embedded, "cel", obj, name).await;
        if r.code() != 422 {
            failures.push(format!("{name}: the real server answered {r:?}"));
        }
        for m in &expected {
            if !r.message().contains(m) {
                failures.push(format!(
                    "{name}: {m:?} not in the real server's {:?}",
                    r.message()
                ));
            }
        }
        let agree = r.code() == e.code() && rule_texts(&r) == rule_texts(&e);
        if !agree {
            differences.push(name);
        }
        eprintln!(
            "{name}{}\n  real:      {} {}\n  in-memory: {} {}",
            if agree { "" } else { "  <-- differs" },
            r.code(),
            r.message(),
            e.code(),
            e.message(),
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
    let unknown: Vec<&&str> = differences
        .iter()
        .filter(|d| !KNOWN_DIFFERENCES.contains(d))
        .collect();
    assert!(
        unknown.is_empty(),
        "the in-memory server now also differs from the real one in {unknown:?}"
    );
    for k in KNOWN_DIFFERENCES {
        if !differences.contains(&k) {
            eprintln!("NOTICE: the servers now agree on {k}: drop it from KNOWN_DIFFERENCES");
        }
    }
}

/// The causes of a rejection as (field, what is wrong), without the wording that differs
/// between the servers: the field path repeated in the message and the `"object"`,
/// `"array"` or length between "Invalid value:" and the message.
fn rule_texts(v: &Verdict) -> Vec<(String, String)> {
    let Verdict::Rejected { causes, .. } = v else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = causes
        .iter()
        .map(|(field, message)| {
            let m = message
                .strip_prefix(&format!("{field}: "))
                .unwrap_or(message);
            let m = match m.strip_prefix("Invalid value: ") {
                Some(rest) => {
                    let token = rest.split_once(": ").map(|(t, _)| t).unwrap_or_default();
                    let is_value = token == "\"object\""
                        || token == "\"array\""
                        || (!token.is_empty() && token.chars().all(|c| c.is_ascii_digit()));
                    if is_value {
                        &rest[token.len() + 2..]
                    } else {
                        rest
                    }
                }
                None => m,
            };
            (field.clone(), m.to_string())
        })
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------
// 4. Deleting a workload-mode Canary

/// The kinds whose objects the deletion tests record, with their API resources.
fn recorded_kinds() -> Vec<(&'static str, ApiResource)> {
    vec![
        (
            "VirtualNode",
            gvk("appmesh.k8s.aws", "v1beta2", "VirtualNode", "virtualnodes"),
        ),
        ("VirtualRouter", virtual_routers()),
        (
            "VirtualService",
            gvk(
                "appmesh.k8s.aws",
                "v1beta2",
                "VirtualService",
                "virtualservices",
            ),
        ),
    ]
}

/// What exists in the namespace: `Kind/name` → a short description (owned by the Canary
/// with `uid` or not, replicas and image of Deployments), plus the row
/// `ready endpoints of Service podinfo` counted from its EndpointSlices.
async fn inventory(client: &kube::Client, ns: &str, uid: &str) -> BTreeMap<String, String> {
    let owned = |m: &kube::core::ObjectMeta| {
        let by_canary = m
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.kind == "Canary");
        if by_canary {
            "owned by the Canary"
        } else {
            "not owned"
        }
    };
    let lp = ListParams::default();
    let mut out = BTreeMap::new();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for d in deployments.list(&lp).await.unwrap() {
        let replicas = d.spec.replicas.unwrap_or(1);
        let image = d
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        out.insert(
            format!("Deployment/{}", d.metadata.name.clone().unwrap_or_default()),
            format!("{}, replicas={replicas}, image={image}", owned(&d.metadata)),
        );
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    for s in services.list(&lp).await.unwrap() {
        out.insert(
            format!("Service/{}", s.metadata.name.clone().unwrap_or_default()),
            owned(&s.metadata).to_string(),
        );
    }
    for (kind, ar) in recorded_kinds() {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        for o in api.list(&lp).await.unwrap() {
            let mut what = owned(&o.metadata).to_string();
            if kind == "VirtualRouter"
                && let Some(Value::Array(t)) = o
                    .data
                    .pointer("/spec/routes/0/httpRoute/action/weightedTargets")
            {
                let w: Vec<String> = t.iter().map(|x| x["weight"].to_string()).collect();
                what.push_str(&format!(", weights {}", w.join("/")));
            }
            out.insert(
                format!("{kind}/{}", o.metadata.name.clone().unwrap_or_default()),
                what,
            );
        }
    }
    out.insert(
        "ready endpoints of Service podinfo".into(),
        ready_endpoints(client, ns, "podinfo").await.to_string(),
    );
    out
}

/// One client "request" routed as the data plane would route it: through Service `podinfo`
/// (the name plain clients use: it must have ready endpoints) and through the mesh
/// (VirtualService `podinfo` → its VirtualRouter → every VirtualNode the route gives weight →
/// that node's DNS hostname, a Service with ready endpoints). `Err` says which hop failed.
async fn route_request(client: &kube::Client, ns: &str) -> Result<(), String> {
    if ready_endpoints(client, ns, "podinfo").await == 0 {
        return Err("Service podinfo has no ready endpoints".into());
    }
    let get = |ar: ApiResource, name: String| {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        async move {
            api.get_opt(&name)
                .await
                .map_err(|e| format!("get {}: {e}", ar.kind))?
                .map(|o| serde_json::to_value(o).unwrap())
                .ok_or(format!("{} {name} is gone", ar.kind))
        }
    };
    let kinds: BTreeMap<&str, ApiResource> = recorded_kinds().into_iter().collect();
    let vs = get(kinds["VirtualService"].clone(), "podinfo".into()).await?;
    let vr_name = vs
        .pointer("/spec/provider/virtualRouter/virtualRouterRef/name")
        .and_then(Value::as_str)
        .ok_or("VirtualService podinfo has no virtual router")?;
    let vr = get(kinds["VirtualRouter"].clone(), vr_name.into()).await?;
    let targets = vr
        .pointer("/spec/routes/0/httpRoute/action/weightedTargets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut served = 0;
    for t in targets.iter().filter(|t| t["weight"].as_i64() > Some(0)) {
        let node = t["virtualNodeRef"]["name"].as_str().unwrap_or_default();
        let vn = get(kinds["VirtualNode"].clone(), node.into()).await?;
        let host = vn
            .pointer("/spec/serviceDiscovery/dns/hostname")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let svc = host.split('.').next().unwrap_or_default();
        if ready_endpoints(client, ns, svc).await == 0 {
            return Err(format!(
                "VirtualNode {node} (weight {}) resolves to Service {svc}, which has no ready endpoints",
                t["weight"]
            ));
        }
        served += 1;
    }
    if served == 0 {
        return Err(format!(
            "VirtualRouter {vr_name} gives no target any weight"
        ));
    }
    Ok(())
}

/// A client sending "requests" ([`route_request`]) every 50 ms until stopped; returns how
/// many it sent and the failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Traffic {
    fn start(client: &kube::Client, ns: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, ns, flag) = (client.clone(), ns.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut sent, mut failed) = (0, Vec::new());
            while !flag.load(Ordering::SeqCst) {
                sent += 1;
                if let Err(e) = route_request(&client, &ns).await {
                    failed.push(e);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (sent, failed)
        });
        Traffic { stop, task }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Deletes Canary `podinfo` as `kubectl delete` does (background propagation) while
/// [`Traffic`] flows, waits until the Canary is gone and the namespace is settled, prints what
/// changed, and returns (before, after). Asserts that every request was routed to ready
/// pods before, during and after the deletion.
async fn delete_with_traffic(
    env: &Env,
    op: &Operator,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    let c = api.get("podinfo").await.unwrap();
    assert_eq!(
        c.metadata.finalizers.clone().unwrap_or_default(),
        vec![serin::controller::FINALIZER.to_string()],
        "every Canary Serin acts on carries its finalizer"
    );
    let uid = c.metadata.uid.clone().unwrap();
    wait_for(
        "requests to be routed to ready pods",
        Duration::from_secs(60),
        || async { route_request(&env.client, &env.ns).await.ok() },
    )
    .await;
    // The primary may still be scaling up when the first request routes: a snapshot then
    // would record one ready endpoint where the settled state has two.
    wait_for(
        "every replica behind Service podinfo to be a ready endpoint",
        Duration::from_secs(60),
        || async {
            let want = replicas_behind(&env.client, &env.ns, "podinfo").await;
            (want > 0 && ready_endpoints(&env.client, &env.ns, "podinfo").await == want)
                .then_some(())
        },
    )
    .await;
    let before = inventory(&env.client, &env.ns, &uid).await;
    let traffic = Traffic::start(&env.client, &env.ns);
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.delete("podinfo", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while api.get_opt("podinfo").await.unwrap().is_some() {
        if Instant::now() > deadline {
            dump(env, op, "podinfo").await;
            panic!("Canary podinfo was not deleted within 120s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give the garbage collector and the endpoint controller time to act on whatever the
    // deletion left (an absence can only be observed by waiting), while requests still flow.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (sent, failed) = traffic.stop().await;
    let after = inventory(&env.client, &env.ns, &uid).await;
    print_table(&before, &after);
    eprintln!(
        "requests during the deletion: {sent}, failed: {}",
        failed.len()
    );
    // At least one request a second over the deletion and the settling time after it.
    assert!(sent >= 10, "only {sent} requests were sent");
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed during the deletion, first: {:?}",
        failed.len(),
        failed.first()
    );
    let again = inventory(&env.client, &env.ns, &uid).await;
    assert_eq!(again, after, "the state changed after the deletion settled");
    (before, after)
}

/// The replicas the Deployments whose pods Service `svc` selects are scaled to.
async fn replicas_behind(client: &kube::Client, ns: &str, svc: &str) -> usize {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let selector = services
        .get(svc)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.selector)
        .unwrap_or_default();
    if selector.is_empty() {
        return 0;
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    deployments
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|d| {
            let labels = d
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.as_ref());
            labels.is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)))
        })
        .map(|d| d.spec.replicas.unwrap_or(1).max(0) as usize)
        .sum()
}

fn print_table(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    eprintln!(
        "{:<38} | {:<52} | after deleting the Canary",
        "object", "before"
    );
    eprintln!("{}", "-".repeat(130));
    for k in keys {
        eprintln!(
            "{k:<38} | {:<52} | {}",
            before.get(k).map(String::as_str).unwrap_or("absent"),
            after.get(k).map(String::as_str).unwrap_or("removed")
        );
    }
}

fn map(rows: &[(&str, &str)]) -> BTreeMap<String, String> {
    rows.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What Serin creates for the workload Canary `podinfo`, all owned by the Canary.
const OWNED: [&str; 7] = [
    "Service/podinfo",
    "Service/podinfo-canary",
    "Service/podinfo-primary",
    "VirtualNode/podinfo-canary",
    "VirtualNode/podinfo-primary",
    "VirtualRouter/podinfo",
    "VirtualService/podinfo",
];

fn assert_owned(before: &BTreeMap<String, String>) {
    for k in OWNED {
        assert!(
            before
                .get(k)
                .is_some_and(|v| v.starts_with("owned by the Canary")),
            "{k}: {before:#?}"
        );
    }
}

/// What stays after a `Revert` deletion: the target serves all traffic through the same
/// names, which are no longer owned by the Canary; `podinfo-primary` is gone.
fn reverted(image: &str) -> BTreeMap<String, String> {
    map(&[
        (
            "Deployment/podinfo",
            &format!("not owned, replicas=2, image={image}"),
        ),
        ("Service/podinfo", "not owned"),
        ("Service/podinfo-canary", "not owned"),
        ("Service/podinfo-primary", "not owned"),
        ("VirtualNode/podinfo-canary", "not owned"),
        ("VirtualNode/podinfo-primary", "not owned"),
        ("VirtualRouter/podinfo", "not owned, weights 0/100"),
        ("VirtualService/podinfo", "not owned"),
        ("ready endpoints of Service podinfo", "2"),
    ])
}

/// Deleting the workload Canary mid-rollout (canary at 20% or 50%), deletionPolicy Revert
/// (the default): the target, which runs the unanalysed podinfo:2, is scaled back up, then
/// Service `podinfo` and the route move to it, then `podinfo-primary` goes; no request fails
/// at any point, and an Event says that an unanalysed revision now serves.
/// Before the finalizer, the garbage collector removed `podinfo-primary`, the Services and
/// the mesh objects: Service `podinfo` was left with 0 endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_canary_mid_rollout_reverts_to_the_target_without_dropping_a_request() {
    let Some((env, weights)) = podinfo_env_real("delete-mid", Behaviour::HEALTHY).await else {
        return;
    };
    let op = ready_operator(&env, "podinfo").await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_weights(&env, &op, &weights, 2).await; // (80, 20)
    let (before, after) = delete_with_traffic(&env, &op).await;
    assert_owned(&before);
    assert_eq!(
        before.get("Deployment/podinfo-primary").map(String::as_str),
        Some("owned by the Canary, replicas=2, image=podinfo:1")
    );
    assert_eq!(
        after,
        reverted("podinfo:2"),
        "what is left after a mid-rollout Revert"
    );
    let reasons: Vec<String> = event_messages(&env, "podinfo")
        .await
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    for r in ["UnanalysedRevisionServing", "Reverted"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} Event: {reasons:?}");
    }
}

/// Deleting the workload Canary after a promotion (the target is at 0 replicas and
/// `podinfo-primary` runs the promoted podinfo:2): the target is scaled back up to 2 and
/// serves everything through the same names; no request fails. Before the finalizer,
/// nothing ran or served the app any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_promoted_canary_reverts_to_the_target_without_dropping_a_request() {
    let Some((env, _weights)) = podinfo_env_real("delete-done", Behaviour::HEALTHY).await else {
        return;
    };
    let op = ready_operator(&env, "podinfo").await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let (before, after) = delete_with_traffic(&env, &op).await;
    assert_owned(&before);
    assert_eq!(
        before.get("Deployment/podinfo").map(String::as_str),
        Some("not owned, replicas=0, image=podinfo:2")
    );
    assert_eq!(after, reverted("podinfo:2"), "what is left after a Revert");
    let reasons: Vec<String> = event_messages(&env, "podinfo")
        .await
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert!(reasons.iter().any(|x| x == "Reverted"), "{reasons:?}");
    assert!(
        !reasons.iter().any(|x| x == "UnanalysedRevisionServing"),
        "the promoted revision was analysed: {reasons:?}"
    );
}

/// deletionPolicy Orphan mid-rollout: everything Serin created stays, serving as it was
/// (the weights where the rollout left them), released from the Canary; no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_orphan_canary_leaves_everything_serving() {
    let Some((env, weights)) = podinfo_env_real("delete-orphan", Behaviour::HEALTHY).await else {
        return;
    };
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "podinfo",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"deletionPolicy": "Orphan"}})),
    )
    .await
    .unwrap();
    let op = ready_operator(&env, "podinfo").await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_weights(&env, &op, &weights, 2).await; // (80, 20)
    let (before, after) = delete_with_traffic(&env, &op).await;
    assert_owned(&before);
    // Exactly what was there, only released (the rollout may have moved on one step
    // before the deletion: compare with the weights as they were at the deletion).
    let released: BTreeMap<String, String> = before
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("owned by the Canary", "not owned")))
        .collect();
    let mut after_weights = after.clone();
    let mut before_weights = released.clone();
    after_weights.remove("VirtualRouter/podinfo");
    before_weights.remove("VirtualRouter/podinfo");
    assert_eq!(after_weights, before_weights, "Orphan changed something");
    let vr = after.get("VirtualRouter/podinfo").map(String::as_str);
    assert!(
        matches!(
            vr,
            Some("not owned, weights 80/20" | "not owned, weights 50/50")
        ),
        "{vr:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. The chart's roles for people

/// `kubectl auth can-i VERB RESOURCE -n NS --as USER`: whether the real API server's
/// authorizer allows it.
fn can_i(kubeconfig: &std::path::Path, user: &str, ns: &str, verb: &str, resource: &str) -> bool {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let mut args = vec!["auth", "can-i", verb, resource, "-n", ns, "--as", user];
    let flag = format!("--subresource={subresource}");
    if !subresource.is_empty() {
        args.push(&flag);
    }
    let out = run_kubectl(kubeconfig, &args);
    let answer = text(&out.stdout);
    match answer.trim() {
        "yes" => true,
        "no" => false,
        _ => panic!("kubectl auth can-i {args:?}: {answer}{}", text(&out.stderr)),
    }
}

/// The chart's aggregated ClusterRoles on a real control plane: its
/// clusterrole-aggregation controller folds them into the built-in `view` and `edit`. A
/// user bound to `view` in a namespace (a RoleBinding) can read its Canaries, which is
/// what `kubectl serin get/list/history` needs, but not steer them; one bound to `edit` can
/// also patch them (`kubectl serin promote` writes an annotation), create and delete them;
/// neither can write their status, nor touch another namespace's Canaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_roles_let_view_read_and_edit_steer_canaries() {
    let Some(cluster) = TestCluster::start_real("agg-roles").await else {
        return;
    };
    let ns = &cluster.namespace;
    let gvk = GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "ClusterRole");
    let cluster_roles: Api<DynamicObject> = Api::all_with(
        cluster.client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "clusterroles"),
    );
    let mut applied = Vec::new();
    for doc in support::rbac::render_chart(ns) {
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if doc["kind"] == "ClusterRole" && name.contains("-aggregate-") {
            let obj: DynamicObject = serde_json::from_value(doc).unwrap();
            cluster_roles
                .patch(
                    &name,
                    &kube::api::PatchParams::apply("serin-tests").force(),
                    &kube::api::Patch::Apply(&obj),
                )
                .await
                .unwrap_or_else(|e| panic!("apply the chart's ClusterRole {name}: {e}"));
            applied.push(name);
        }
    }
    assert_eq!(
        applied.len(),
        2,
        "the chart renders two aggregated roles: {applied:?}"
    );
    for (user, role) in [("viewer", "view"), ("editor", "edit")] {
        let out = run_kubectl(
            &cluster.kubeconfig,
            &[
                "create",
                "rolebinding",
                user,
                "-n",
                ns,
                "--clusterrole",
                role,
                "--user",
                user,
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let kc = &cluster.kubeconfig;
    wait_for(
        "the aggregation controller to add the Canary rules to view and edit",
        Duration::from_secs(60),
        || async {
            (can_i(kc, "viewer", ns, "get", "canaries.serin.dev")
                && can_i(kc, "editor", ns, "patch", "canaries.serin.dev"))
            .then_some(())
        },
    )
    .await;
    let mut table = Vec::new();
    for user in ["viewer", "editor"] {
        for verb in [
            "get", "list", "watch", "create", "patch", "update", "delete",
        ] {
            table.push((
                user,
                verb,
                "canaries.serin.dev",
                can_i(kc, user, ns, verb, "canaries.serin.dev"),
            ));
        }
        for verb in ["update", "patch"] {
            let r = "canaries.serin.dev/status";
            table.push((user, verb, r, can_i(kc, user, ns, verb, r)));
        }
        table.push((
            user,
            "get",
            "canaries.serin.dev in default",
            can_i(kc, user, "default", "get", "canaries.serin.dev"),
        ));
    }
    for (user, verb, resource, allowed) in &table {
        eprintln!(
            "{user:7} {verb:7} {resource:32} {}",
            if *allowed { "yes" } else { "no" }
        );
    }
    let expected = |user: &str, verb: &str, resource: &str| {
        resource == "canaries.serin.dev"
            && (["get", "list", "watch"].contains(&verb) || user == "editor")
    };
    for (user, verb, resource, allowed) in &table {
        assert_eq!(
            *allowed,
            expected(user, verb, resource),
            "{user} {verb} {resource}"
        );
    }
    // A real request as the viewer: what `kubectl serin list` sends.
    let out = run_kubectl(kc, &["get", "canaries", "-n", ns, "--as", "viewer"]);
    assert!(
        out.status.success(),
        "viewer lists Canaries: {}",
        text(&out.stderr)
    );
    // And a real write: what `kubectl serin promote` sends, refused to the viewer only.
    let canaries: Api<DynamicObject> =
        Api::namespaced_with(cluster.client.clone(), ns, &canaries_resource());
    let verdict = create_canary(&canaries, ns, example("gateway-api.yaml"), "web").await;
    assert!(matches!(verdict, Verdict::Accepted), "{verdict:?}");
    for (user, allowed) in [("viewer", false), ("editor", true)] {
        let out = run_kubectl(
            kc,
            &[
                "annotate",
                "canary",
                "web",
                "-n",
                ns,
                "--as",
                user,
                "--overwrite",
                "serin.dev/command=promote",
            ],
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.success(), allowed, "{user} annotates: {stderr}");
        assert!(allowed || stderr.contains("forbidden"), "{user}: {stderr}");
    }
    for name in applied {
        cluster_roles
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// 6. Autoscaling: spec.autoscalerRef

/// The HPA `podinfo`: 2 to `max` replicas of Deployment `scales` at 70 % CPU.
fn podinfo_autoscaler(ns: &str, scales: &str, max: i32) -> HorizontalPodAutoscaler {
    serde_json::from_value(json!({
        "metadata": {"name": "podinfo", "namespace": ns, "labels": {"team": "web"}},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": scales},
            "minReplicas": 2,
            "maxReplicas": max,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                         "target": {"type": "Utilization", "averageUtilization": 70}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 120}}
        }
    }))
    .unwrap()
}

/// Waits until the Canary's Ready condition has `reason`, and returns its message.
async fn wait_ready_reason(env: &Env, op: &Operator, reason: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = canary(env, "podinfo").await;
        let conditions = c.status.map(|s| s.conditions).unwrap_or_default();
        if let Some(r) = serin::api::find_condition(&conditions, serin::api::READY)
            && r.reason == reason
        {
            return r.message.clone();
        }
        if Instant::now() > deadline {
            dump(env, op, "podinfo").await;
            panic!("Ready never had reason {reason}: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A workload-mode Canary naming the target's HorizontalPodAutoscaler, on the real API
/// server: Serin creates `podinfo-primary` (the HPA scaling `podinfo-primary`, otherwise the
/// target's), keeps it in step when the user edits the target's HPA, keeps it through a
/// promotion, says so in Ready when the HPA disappears or scales something else (and
/// recovers when it is back), and deleting the Canary (Revert) removes the copy with the
/// primary and leaves the user's HPA alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_autoscales_like_the_target() {
    let Some(env) = env_real("hpa", podinfo_services(Behaviour::HEALTHY)).await else {
        return;
    };
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &env.ns);
    hpas.create(
        &PostParams::default(),
        &podinfo_autoscaler(&env.ns, "podinfo", 6),
    )
    .await
    .unwrap();
    let mut spec = workload_canary(&env.ns, "podinfo", &env.prometheus.url);
    spec["spec"]["autoscalerRef"] = json!({"name": "podinfo"});
    setup_appmesh_with(&env, "podinfo", spec).await;
    let op = ready_operator(&env, "podinfo").await;
    let uid = canary(&env, "podinfo").await.metadata.uid.unwrap();
    let copy = |max: i32| {
        let hpas = hpas.clone();
        async move {
            hpas.get_opt("podinfo-primary")
                .await
                .unwrap()
                .filter(|h| h.spec.max_replicas == max)
        }
    };
    let first = wait_for("the primary's autoscaler", Duration::from_secs(30), || {
        copy(6)
    })
    .await;
    let target = hpas.get("podinfo").await.unwrap();
    let (got, mut want) = (first.spec.clone(), target.spec.clone());
    assert_eq!(got.scale_target_ref.name, "podinfo-primary");
    assert_eq!(got.scale_target_ref.kind, "Deployment");
    assert_eq!(got.scale_target_ref.api_version.as_deref(), Some("apps/v1"));
    want.scale_target_ref = got.scale_target_ref.clone();
    assert_eq!(
        got, want,
        "the copy is the target's HPA but for what it scales"
    );
    assert_eq!(first.metadata.labels, target.metadata.labels);
    let owners = first.metadata.owner_references.clone().unwrap_or_default();
    assert!(
        owners.iter().any(|o| o.uid == uid && o.kind == "Canary"),
        "{owners:?}"
    );

    // The user edits the target's HPA: the copy follows (woken by the watch).
    hpas.patch(
        "podinfo",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"maxReplicas": 9}})),
    )
    .await
    .unwrap();
    wait_for(
        "the copy to follow maxReplicas 9",
        Duration::from_secs(30),
        || copy(9),
    )
    .await;

    // A rollout promotes with the copy in place.
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let after = hpas.get("podinfo-primary").await.unwrap().spec;
    assert_eq!(
        (after.scale_target_ref.name.as_str(), after.max_replicas),
        ("podinfo-primary", 9)
    );

    // The HPA goes, then comes back scaling the wrong Deployment, then right again.
    hpas.delete("podinfo", &DeleteParams::default())
        .await
        .unwrap();
    let message = wait_ready_reason(&env, &op, "AutoscalerNotFound").await;
    assert_eq!(
        message,
        format!(
            "HorizontalPodAutoscaler {}/podinfo (spec.autoscalerRef) not found: create it, or remove spec.autoscalerRef",
            env.ns
        )
    );
    hpas.create(
        &PostParams::default(),
        &podinfo_autoscaler(&env.ns, "podinfo-primary", 9),
    )
    .await
    .unwrap();
    let message = wait_ready_reason(&env, &op, "AutoscalerMismatch").await;
    assert!(
        message.contains("scales Deployment podinfo-primary, not the target Deployment podinfo"),
        "{message}"
    );
    let warnings: Vec<String> = event_messages(&env, "podinfo")
        .await
        .into_iter()
        .filter(|(r, _)| r.starts_with("Autoscaler"))
        .map(|(r, _)| r)
        .collect();
    assert_eq!(
        warnings,
        ["AutoscalerNotFound", "AutoscalerMismatch"],
        "one Warning Event each"
    );
    hpas.replace("podinfo", &PostParams::default(), &{
        let mut h = podinfo_autoscaler(&env.ns, "podinfo", 9);
        h.metadata.resource_version = hpas.get("podinfo").await.unwrap().metadata.resource_version;
        h
    })
    .await
    .unwrap();
    wait_ready_reason(&env, &op, "Succeeded").await;

    // Deleting the Canary (Revert): the target serves again, its HPA untouched; the
    // primary and its autoscaler are gone.
    let canaries: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    canaries
        .delete("podinfo", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the Canary's deletion to finish",
        Duration::from_secs(90),
        || async {
            canaries
                .get_opt("podinfo")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        hpas.get_opt("podinfo-primary").await.unwrap().is_none(),
        "the copy is left behind"
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    assert!(
        deployments
            .get_opt("podinfo-primary")
            .await
            .unwrap()
            .is_none()
    );
    let kept = hpas.get("podinfo").await.unwrap().spec;
    assert_eq!(
        (kept.scale_target_ref.name.as_str(), kept.max_replicas),
        ("podinfo", 9)
    );
    drop(op);
}

// ---------------------------------------------------------------------------------------
// 7. An operator without Secret access (chart readSecrets: false)

/// Serin run as the chart renders it with `readSecrets: false` (its Role grants no Secret
/// access, and it runs with `--no-read-secrets`), on the real API server: a target whose
/// pods read a Secret still rolls out and is promoted, no Secret request is refused (the
/// operator sends none: `scripts/rbac-report` fails the run on any refusal), and a Canary
/// that asks for a Prometheus secretRef is Invalid with a message that names the field and
/// the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_without_secret_access_rolls_out_and_refuses_a_secret_ref() {
    let Some(mut env) = env_real("no-secrets", podinfo_services(Behaviour::HEALTHY)).await else {
        return;
    };
    env.operator_kubeconfig =
        support::rbac::operator_kubeconfig_with(&env.cluster, json!({"readSecrets": false})).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.client.clone(), &env.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "podinfo-creds"},
                                           "stringData": {"TOKEN": "one"}}))
            .unwrap(),
        )
        .await
        .unwrap();
    ensure_mesh(&env.client).await;
    let mut target = deployment(&env.ns, "podinfo", "podinfo:1");
    let container = &mut target.spec.template.spec.as_mut().unwrap().containers[0];
    container
        .env_from
        .get_or_insert_with(Vec::new)
        .push(serde_json::from_value(json!({"secretRef": {"name": "podinfo-creds"}})).unwrap());
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    deployments
        .create(&PostParams::default(), &target)
        .await
        .unwrap();
    support::e2e::create_canary(
        &env,
        workload_canary(&env.ns, "podinfo", &env.prometheus.url),
    )
    .await;
    let log = env.cluster.dir.path().join("operator.log");
    let op = Operator::start(&env, log, &["--no-read-secrets"]);
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(60),
    )
    .await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;

    // A metric that needs a Secret: Invalid, saying which field and which setting.
    let canaries: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    let mut metric =
        workload_canary(&env.ns, "podinfo", &env.prometheus.url)["spec"]["analysis"]["metrics"][0]
            .clone();
    metric["name"] = json!("tenant-error-rate");
    metric["provider"]["prometheus"]["secretRef"] = json!({"name": "podinfo-creds"});
    let mut metrics = workload_canary(&env.ns, "podinfo", &env.prometheus.url)["spec"]["analysis"]
        ["metrics"]
        .clone();
    metrics.as_array_mut().unwrap().push(metric);
    canaries
        .patch(
            "podinfo",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"analysis": {"metrics": metrics}}})),
        )
        .await
        .unwrap();
    let message = wait_for("the Invalid condition", Duration::from_secs(30), || async {
        let c = canary(&env, "podinfo").await;
        let conditions = c.status.map(|s| s.conditions).unwrap_or_default();
        serin::api::find_condition(&conditions, serin::api::INVALID)
            .filter(|i| i.status == ConditionStatus::True)
            .map(|i| i.message.clone())
    })
    .await;
    assert_eq!(
        message,
        "spec.analysis.metrics[1].provider.prometheus.secretRef: this operator reads no Secrets (serin run --no-read-secrets, chart value readSecrets: false); remove secretRef (send credentials another way, for example headers), or have the operator's administrator set readSecrets: true"
    );
    let log = op.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("secrets") && l.contains("forbidden")),
        "the operator asked for Secrets:\n{log}"
    );
}
