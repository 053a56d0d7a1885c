//! End-to-end: the real `serin run` binary against this run's API server (the real
//! control plane under `scripts/test`, with its deployment, ReplicaSet and garbage-collector
//! controllers; else the in-memory one) with the upstream App Mesh, Gloo and Gateway API
//! CRDs, a real Prometheus scraping the traffic simulator, and the simulator reading the
//! weights Serin writes — the closed loop.
//!
//! Each test gets its own namespace, Prometheus and operator, waits on conditions with
//! deadlines, and prints the objects and the operator's log when it fails.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use serin::api::{Canary, Phase};
use serin::demo::traffic::{Behaviour, RouterWeights, ServiceConfig};
use serin::router::{AppMeshKubeRouter, GlooEdgeRouter, Routers};
use support::e2e::*;
use support::{require, wait_for};

/// Workload mode with App Mesh: on first sight Serin creates the primary, the Services
/// and the mesh objects; a new image is promoted 20 → 50 → 100 with every weight written
/// in that order, then traffic returns to the updated primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appmesh_workload_promotes_healthy_canary() {
    require("prometheus");
    let Some((env, weights)) = podinfo_env(Behaviour::HEALTHY).await else {
        return;
    };
    let op = Operator::start(&env, env.cluster.dir.path().join("operator.log"), &[]);
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    let stable = c.status.unwrap().stable_revision.unwrap();

    set_image(&env, "podinfo", "podinfo:2").await;
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    let status = c.status.unwrap();
    assert_ne!(status.stable_revision.as_deref(), Some(stable.as_str()));
    assert_eq!(
        status.history[0].result,
        serin::api::RolloutResult::Promoted
    );
    assert_eq!(status.canary_weight, 0);
    let seen = weights.pairs();
    assert_eq!(
        seen,
        vec![(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)],
        "weight writes"
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let primary = deployments.get("podinfo-primary").await.unwrap();
    let image = primary.spec.template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("podinfo:2"));
    assert_eq!(
        deployments.get("podinfo").await.unwrap().spec.replicas,
        Some(0),
        "canary scaled down"
    );
    // One Event per thing that happened, each with its own message, in order. A step whose
    // interval passed before the canary had the 200 requests the sequential judge needs
    // (minSampleSize's default, as the simulated primary has no errors) says it waits; how
    // often depends on the machine's speed, so those Events are checked apart.
    let events = events_after(&env, "podinfo", "Promoted").await;
    let (waiting, events): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|(r, _)| r == "WaitingForEvidence");
    for (_, message) in &waiting {
        assert!(
            message.contains("waiting for evidence: ")
                && message.contains(" of 200 canary requests"),
            "{message}"
        );
    }
    let reasons: Vec<&str> = events.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        vec![
            "Initialized",
            "RolloutStarted",
            "StepAdvanced",
            "StepAdvanced",
            "Promoting",
            "Promoted"
        ],
        "{events:#?}"
    );
    assert!(events[2].1.contains("canary weight 20%"), "{events:#?}");
    assert!(events[3].1.contains("canary weight 50%"), "{events:#?}");
    let (_, canary_totals) = env.sim.totals(0).unwrap();
    assert!(canary_totals.requests > 0, "the canary received traffic");

    // The operator's own endpoints.
    assert_eq!(operator_http(&op, "/healthz").await.0, 200);
    assert_eq!(operator_http(&op, "/readyz").await.0, 200);
    let (code, metrics) = operator_http(&op, "/metrics").await;
    assert_eq!(code, 200);
    let ns = &env.ns;
    for line in [
        format!(r#"serin_canary_weight{{namespace="{ns}",name="podinfo"}} 0"#),
        format!(r#"serin_canary_phase{{namespace="{ns}",name="podinfo",phase="Succeeded"}} 1"#),
        format!(r#"serin_rollouts_total{{namespace="{ns}",name="podinfo",result="Promoted"}} 1"#),
        r#"serin_metric_check_total{metric="error-rate",verdict="Pass"}"#.to_string(),
        r#"serin_provider_requests_total{provider="prometheus",outcome="success"}"#.to_string(),
        "serin_reconcile_duration_seconds_count".to_string(),
        r#"serin_rollout_duration_seconds_count{result="Promoted"} 1"#.to_string(),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
}

/// An invalid Canary is never acted on: it gets an Invalid condition naming the field
/// and a Warning Event, and no routing object or primary is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_canary_is_never_acted_on() {
    let Some(env) = env(|_, _| vec![]).await else {
        return;
    };
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment(&env.ns, "podinfo", "podinfo:1"),
        )
        .await
        .unwrap();
    let mut obj = workload_canary(&env.ns, "podinfo", &env.prometheus.url);
    // Valid for the CRD's schema and CEL rules; only Serin's own checks catch it.
    obj["spec"]["analysis"]["metrics"][0]["preset"] = json!("cloudwatch-appmesh-error-rate");
    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    canaries
        .create(
            &PostParams::default(),
            &serde_json::from_value(obj).unwrap(),
        )
        .await
        .unwrap();
    let op = Operator::start(&env, env.cluster.dir.path().join("operator.log"), &[]);
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    let message = wait_for("the Invalid condition", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let c = api.get("podinfo").await.ok()?;
            let cond =
                serin::api::find_condition(&c.status?.conditions, serin::api::INVALID)?.clone();
            (cond.status == serin::api::ConditionStatus::True).then_some(cond.message)
        }
    })
    .await;
    assert!(
        message.contains("spec.analysis.metrics[0].preset"),
        "{message}"
    );
    events_after(&env, "podinfo", "Invalid").await;
    // Give the operator time to (wrongly) act, then check it did not.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        deployments
            .get_opt("podinfo-primary")
            .await
            .unwrap()
            .is_none(),
        "{}",
        op.log()
    );
    let vr: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.ns, &virtual_routers());
    assert!(vr.list(&Default::default()).await.unwrap().items.is_empty());
}

/// Traffic mode with a Gloo UpstreamGroup (the seed's upstreamgroup-gateway): only the
/// destination weights move, from all-primary to all-canary, and the canary backend becomes
/// the stable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gloo_upstreamgroup_traffic_mode_promotes() {
    require("prometheus");
    let routers = |c: &kube::Client| Routers::new(vec![Arc::new(GlooEdgeRouter::new(c.clone()))]);
    let Some(env) = env(|c, ns| {
        vec![ServiceConfig {
            primary_cluster: format!("{ns}-colorgateway-9080_{ns}"),
            canary_cluster: format!("{ns}-colorgatewayv2-9080_{ns}"),
            rps: 200.0,
            primary: Behaviour::HEALTHY,
            canary: vec![(Duration::ZERO, Behaviour::HEALTHY)],
            weights: Arc::new(RouterWeights::new(
                c.clone(),
                routers(c),
                ns,
                "colorgateway",
            )),
        }]
    })
    .await
    else {
        return;
    };
    create_upstream_group(
        &env,
        "upstreamgroup-gateway",
        (
            &format!("{}-colorgateway-9080", env.ns),
            &format!("{}-colorgatewayv2-9080", env.ns),
        ),
    )
    .await;
    let canaries: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &gvk("serin.dev", "v1alpha1", "Canary", "canaries"),
    );
    let obj = json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "colorgateway", "namespace": env.ns},
        "spec": {
            "backends": {"primary": "colorgateway", "canary": "colorgatewayv2"},
            "service": {"port": 9080},
            "router": {"gloo": {"upstreamGroup": {"name": "upstreamgroup-gateway", "namespace": env.ns}}},
            "steps": [20, 50, 100],
            "analysis": {"interval": format!("{INTERVAL_SECS}s"), "metrics": [{
                "name": "error-rate", "provider": {"prometheus": {"address": env.prometheus.url}},
                "preset": "gloo-error-rate", "max": 1.0}]}
        }
    });
    canaries
        .create(
            &PostParams::default(),
            &serde_json::from_value(obj).unwrap(),
        )
        .await
        .unwrap();
    let op = Operator::start(&env, env.cluster.dir.path().join("operator.log"), &[]);
    let c = wait_phase(
        &env,
        &op,
        "colorgateway",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    let status = c.status.unwrap();
    assert_eq!(status.stable_revision.as_deref(), Some("colorgatewayv2"));
    assert_eq!(status.canary_weight, 100);
    let ug_api: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &gvk("gloo.solo.io", "v1", "UpstreamGroup", "upstreamgroups"),
    );
    let obj = ug_api.get("upstreamgroup-gateway").await.unwrap();
    let d = obj.data["spec"]["destinations"].clone();
    assert_eq!(
        (d[0]["weight"].as_i64(), d[1]["weight"].as_i64()),
        (Some(0), Some(100)),
        "{d}"
    );
    // The data plane follows: the simulator reads the same object on its next tick.
    wait_for(
        "the simulator to send all traffic to the canary",
        Duration::from_secs(5),
        || async { (env.sim.weights(0).map(|w| w.canary()) == Some(100)).then_some(()) },
    )
    .await;
    drop(op);
}

/// A new image in the middle of a rollout sets the canary weight back to 0, records the
/// old rollout as superseded, and starts the analysis again from the first step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_revision_mid_rollout_restarts_analysis() {
    require("prometheus");
    let Some((env, weights)) = podinfo_env(Behaviour::HEALTHY).await else {
        return;
    };
    let op = ready_operator(&env, "podinfo").await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_weights(&env, &op, &weights, 2).await; // (80, 20)
    let rev2 = canary(&env, "podinfo").await.status.unwrap().revision;
    set_image(&env, "podinfo", "podinfo:3").await;
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    let status = c.status.unwrap();
    assert_ne!(status.revision, rev2);
    let results: Vec<_> = status.history.iter().map(|h| h.result).collect();
    use serin::api::RolloutResult::*;
    assert_eq!(results, vec![Promoted, Superseded], "{:?}", status.history);
    assert_eq!(
        weights.pairs(),
        vec![
            (100, 0),
            (80, 20),
            (100, 0),
            (80, 20),
            (50, 50),
            (0, 100),
            (100, 0)
        ]
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let primary = deployments.get("podinfo-primary").await.unwrap();
    assert_eq!(
        primary.spec.template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("podinfo:3")
    );
}

/// kill -9 of the operator right after each weight change (so often between the weight
/// write and the status write), then a restart: the rollout ends exactly as an
/// uninterrupted one, with no step skipped or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_at_every_step_resumes_exactly() {
    require("prometheus");
    let Some((env, weights)) = podinfo_env(Behaviour::HEALTHY).await else {
        return;
    };
    let log = env.cluster.dir.path().join("operator.log");
    let mut op = Operator::start(&env, log.clone(), &[]);
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    set_image(&env, "podinfo", "podinfo:2").await;
    for len in 2..=4 {
        wait_weights(&env, &op, &weights, len).await;
        op.kill();
        op = Operator::start(&env, log.clone(), &[]);
    }
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        weights.pairs(),
        vec![(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)]
    );
    let status = c.status.unwrap();
    assert_eq!(status.history.len(), 1, "{:?}", status.history);
    assert_eq!(
        status.history[0].result,
        serin::api::RolloutResult::Promoted
    );
    // Each step lasted at least one analysis interval: none was skipped by a restart.
    let started = status.history[0].started_at.unwrap();
    let took = (status.history[0].finished_at - started).num_milliseconds();
    assert!(
        took >= 2 * INTERVAL_SECS as i64 * 1000,
        "rollout took only {took} ms"
    );
}

/// Two replicas with leader election: only the leader writes; when it is killed the
/// standby takes over within the lease duration and the rollout continues with no step
/// written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_hands_over_without_double_steps() {
    require("prometheus");
    let Some((env, weights)) = podinfo_env(Behaviour::HEALTHY).await else {
        return;
    };
    let args = |id: &'static str| {
        [
            "--leader-elect",
            "--lease-duration-secs",
            "3",
            "--identity",
            id,
        ]
    };
    let mut a = Operator::start(
        &env,
        env.cluster.dir.path().join("a.log"),
        &args("replica-a"),
    );
    // Let replica-a take the lease before replica-b starts.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), &env.ns);
    let holder = || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("serin-leader")
                .await
                .ok()
                .flatten()?
                .spec?
                .holder_identity
        }
    };
    wait_for("replica-a to lead", Duration::from_secs(20), || async {
        holder().await.filter(|h| h == "replica-a")
    })
    .await;
    let b = Operator::start(
        &env,
        env.cluster.dir.path().join("b.log"),
        &args("replica-b"),
    );
    wait_phase(&env, &a, "podinfo", Phase::Waiting, Duration::from_secs(30)).await;
    set_image(&env, "podinfo", "podinfo:2").await;
    wait_weights(&env, &a, &weights, 2).await;
    a.kill();
    wait_for(
        "replica-b to take over",
        Duration::from_secs(20),
        || async { holder().await.filter(|h| h == "replica-b") },
    )
    .await;
    let c = wait_phase(
        &env,
        &b,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        weights.pairs(),
        vec![(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)]
    );
    assert_eq!(c.status.unwrap().history.len(), 1);
    assert!(b.log().contains("acquired leadership"), "{}", b.log());
}

/// A change to a ConfigMap the pod template reads starts a rollout, as a new image does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_starts_a_rollout() {
    require("prometheus");
    let routers =
        |c: &kube::Client| Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
    let Some(env) = env(|c, ns| {
        vec![appmesh_service(
            c,
            ns,
            Behaviour::HEALTHY,
            routers(c),
            "podinfo",
        )]
    })
    .await
    else {
        return;
    };
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.client.clone(), &env.ns);
    let cm = |v: &str| {
        serde_json::from_value(
            json!({"metadata": {"name": "podinfo-config", "namespace": env.ns}, "data": {"COLOR": v}}),
        )
        .unwrap()
    };
    configmaps
        .create(&PostParams::default(), &cm("blue"))
        .await
        .unwrap();
    setup_appmesh(&env, "podinfo").await;
    let op = Operator::start(&env, env.cluster.dir.path().join("operator.log"), &[]);
    let before = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(30),
    )
    .await;
    let stable = before.status.unwrap().stable_revision;
    configmaps
        .replace("podinfo-config", &PostParams::default(), &{
            let mut c: k8s_openapi::api::core::v1::ConfigMap = cm("green");
            c.metadata.resource_version = configmaps
                .get("podinfo-config")
                .await
                .unwrap()
                .metadata
                .resource_version;
            c
        })
        .await
        .unwrap();
    let c = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let status = c.status.unwrap();
    assert_ne!(status.stable_revision, stable);
    assert_eq!(
        status.history[0].result,
        serin::api::RolloutResult::Promoted
    );
}
