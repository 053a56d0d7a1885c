//! The data plane is the truth: a weight write that succeeded is never forgotten because
//! the status write after it failed.
//!
//! The real `serin run` (the chart's ServiceAccount) reaches the real API server through
//! `support::fault_proxy`, which holds the answer of each VirtualRouter weight write until
//! the test has armed a failure of the very next status write, so exactly the status write
//! after every weight write of the rollout fails. At the 50% step the test also pauses the
//! Canary before the operator retries: the retry then makes a different decision (pause,
//! no weight write), so only what the operator reads from the VirtualRouter can tell it
//! that 50% is live. Before the operator read the split from the router, status said 20%
//! while 50% served, and the Paused Canary showed the wrong weight.

mod support;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use serin::api::{Canary, Phase, RolloutResult};
use serin::demo::traffic::Behaviour;
use support::e2e::*;
use support::fault_proxy::{FaultProxy, HoldAt, Outcome};

/// The weights of an uninterrupted rollout.
const UNINTERRUPTED: [(i64, i64); 5] = [(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)];

const WEIGHT_WRITE: &str = "/virtualrouters/podinfo";
const STATUS_WRITE: &str = "/canaries/podinfo/status";

/// Holds the answer of the next weight write until the next status write is set to fail,
/// runs `meanwhile` (with the write done on the server, its answer not yet delivered), then
/// lets the answer go.
async fn fail_status_after_next_weight_write<F: Future<Output = ()>>(
    proxy: &FaultProxy,
    meanwhile: F,
) {
    let mut held = proxy.hold_nth("PATCH", WEIGHT_WRITE, 1, HoldAt::Response);
    tokio::time::timeout(Duration::from_secs(90), held.reached())
        .await
        .expect("a weight write within 90s");
    meanwhile.await;
    proxy.fail_nth("PUT", STATUS_WRITE, 1, 1, 500);
    held.release();
}

async fn set_paused(env: &Env, paused: bool) {
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "podinfo",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": paused}})),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_status_write_after_each_weight_write_changes_nothing() {
    let Some((env, weights)) = podinfo_env_real("truth", Behaviour::HEALTHY).await else {
        return;
    };
    let dir = env.cluster.dir.path().to_path_buf();
    let (proxy, kubeconfig) =
        FaultProxy::for_operator("serin", &env.operator_kubeconfig, &dir).await;
    let op = Operator::start_via(&env, &kubeconfig, dir.join("operator.log"), &[], &[]);
    wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Waiting,
        Duration::from_secs(60),
    )
    .await;

    set_image(&env, "podinfo", "podinfo:2").await;
    // 20%: the status write after it fails; the retry makes the same decision.
    fail_status_after_next_weight_write(&proxy, async {}).await;
    // 50%: the status write after it fails, and the Canary is paused before the retry.
    fail_status_after_next_weight_write(&proxy, set_paused(&env, true)).await;
    let paused = wait_phase(&env, &op, "podinfo", Phase::Paused, Duration::from_secs(60)).await;
    let on_route = weights.pairs().last().copied();
    assert_eq!(on_route, Some((50, 50)), "{:?}", weights.pairs());
    let status = paused.status.clone().unwrap_or_default();
    assert_eq!(
        status.canary_weight, 50,
        "the Paused Canary must show the weight that serves: {status:#?}"
    );
    // 100% and the final return to the primary: each status write after them fails too.
    let rest = async {
        fail_status_after_next_weight_write(&proxy, async {}).await;
        fail_status_after_next_weight_write(&proxy, async {}).await;
    };
    set_paused(&env, false).await;
    rest.await;
    let done = wait_phase(
        &env,
        &op,
        "podinfo",
        Phase::Succeeded,
        Duration::from_secs(120),
    )
    .await;

    let failed_status_writes = proxy
        .log()
        .iter()
        .filter(|e| e.method == "PUT" && e.path.contains(STATUS_WRITE))
        .filter(|e| e.outcome == Outcome::Failed)
        .count();
    assert_eq!(
        failed_status_writes, 4,
        "one lost status write per weight write"
    );
    assert_eq!(
        weights.pairs(),
        UNINTERRUPTED.to_vec(),
        "the weights must move as in an uninterrupted rollout"
    );
    let status = done.status.unwrap_or_default();
    assert_eq!(status.canary_weight, 0);
    let last = &status.history[0];
    assert_eq!(last.result, RolloutResult::Promoted, "{last:?}");
    assert_eq!(last.reached_weight, 100, "{last:?}");
    let reasons: Vec<String> = event_messages(&env, "podinfo")
        .await
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert!(
        !reasons.iter().any(|r| r == "WeightsChanged"),
        "Serin took its own write for someone else's: {reasons:?}"
    );
    drop(op);
}
