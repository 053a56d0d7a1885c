//! Shards on the real control plane: three `serin run --leader-elect --shards 2` replicas,
//! each as the chart's ServiceAccount behind a fault proxy of its own that records every
//! request ([`support::replica`]), share five Canaries; then one leader is killed, and then
//! the shard count changes to 3 the way a rolling update changes it (three new replicas
//! start, the old ones are stopped).
//!
//! Checked throughout: each Canary's writes come only from the leader of its shard (its
//! label `serin.io/shard` modulo the shard count), never from two replicas in overlapping
//! intervals, and its weights go through exactly the steps of uninterrupted rollouts; the
//! replicas of the new count write nothing while a replica of the old count leads; Serin
//! labels an unlabelled Canary and reports an invalid label on the Canary.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::json;
use serin::api::Phase;
use serin::demo::traffic::Behaviour;
use serin::router::{AppMeshKubeRouter, Routers};
use support::e2e::*;
use support::fault_proxy::Exchange;
use support::replica::{Replica, describe, overlapping};
use support::{require, wait_for};

/// The Canaries and the bucket each is labelled with (`None`: left to Serin).
const CANARIES: [(&str, Option<&str>); 5] = [
    ("app-0", Some("0")),
    ("app-1", Some("1")),
    ("app-2", Some("2")),
    ("app-3", Some("3")),
    ("app-4", None),
];

/// A Canary whose label is no bucket: nobody's, reported on the Canary.
const BAD: &str = "app-bad";

/// One uninterrupted rollout's weights, after the initial (100, 0).
const ROLLOUT: [Pair; 4] = [(80, 20), (50, 50), (0, 100), (100, 0)];

fn canary_value(ns: &str, name: &str, label: Option<&str>, prometheus: &str) -> serde_json::Value {
    let mut c = workload_canary(ns, name, prometheus);
    if let Some(l) = label {
        c["metadata"]["labels"] = json!({"serin.io/shard": l});
    }
    c
}

/// Whether a write's path is about Canary `name` (the Canary, its Deployments, Services
/// and App Mesh objects are all named `name` or `name-…`).
fn concerns(e: &Exchange, name: &str) -> bool {
    let path = e.path.split('?').next().unwrap_or_default();
    path.split('/')
        .any(|seg| seg == name || seg.strip_prefix(name).is_some_and(|r| r.starts_with('-')))
}

/// The holder of Lease `name` in the test's namespace ("" when none).
async fn holder(env: &Env, name: &str) -> String {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .unwrap_or_default()
}

/// Waits until every shard of `count` has a leader among `replicas`; returns them by shard.
async fn leaders<'a>(env: &Env, count: u16, replicas: &'a [&'a Replica]) -> Vec<&'a Replica> {
    wait_for(
        &format!("every one of {count} shards to have a leader"),
        Duration::from_secs(90),
        || async {
            let mut out = Vec::new();
            for i in 0..count {
                let h = holder(env, &format!("serin-leader-{i}-of-{count}")).await;
                out.push(*replicas.iter().find(|r| r.name == h)?);
            }
            Some(out)
        },
    )
    .await
}

async fn bucket(env: &Env, name: &str) -> Option<u16> {
    canary(env, name)
        .await
        .metadata
        .labels
        .and_then(|l| l.get("serin.io/shard").cloned())
        .and_then(|v| v.parse().ok())
}

async fn wait_all(env: &Env, phase: Phase, history: usize, what: &str) {
    wait_for(what, Duration::from_secs(180), || async {
        for (name, _) in CANARIES {
            let c = canary(env, name).await;
            let s = c.status?;
            (s.phase == phase && s.history.len() == history).then_some(())?;
        }
        Some(())
    })
    .await;
}

/// Serin's labelling of an unlabelled Canary: a merge patch of the Canary itself, by the
/// leader of shard 0 before the Canary has a shard.
fn is_labelling(e: &Exchange, name: &str) -> bool {
    name == "app-4"
        && e.method == "PATCH"
        && e.path
            .split('?')
            .next()
            .unwrap_or_default()
            .ends_with(&format!("/canaries/{name}"))
        && e.proxy == LABELLER.get().map(String::as_str).unwrap_or_default()
}

/// The replica that led shard 0 first (it labelled app-4).
static LABELLER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The writes about `name` of each replica, since `since` (Serin's labelling aside).
fn writes_about<'a>(
    replicas: &[&'a Replica],
    name: &str,
    since: Instant,
) -> Vec<(&'a str, Vec<Exchange>)> {
    replicas
        .iter()
        .map(|r| {
            let w: Vec<Exchange> = r
                .proxy
                .writes()
                .into_iter()
                .filter(|e| concerns(e, name) && e.forwarded.is_some_and(|t| t >= since))
                .filter(|e| !is_labelling(e, name))
                .collect();
            (r.name, w)
        })
        .filter(|(_, w)| !w.is_empty())
        .collect()
}

/// Each Canary's writes since `since` came only from the leader of its shard.
async fn assert_owned(env: &Env, leaders: &[&Replica], all: &[&Replica], since: Instant) {
    let count = u16::try_from(leaders.len()).unwrap();
    for (name, _) in CANARIES {
        let b = bucket(env, name).await.expect("every Canary has a bucket");
        let owner = leaders[usize::from(b % count)].name;
        for (writer, w) in writes_about(all, name, since) {
            assert_eq!(
                writer,
                owner,
                "{name} (bucket {b}, shard {} of {count}) was written by {writer}, not its shard's leader {owner}: {}",
                b % count,
                describe(&w[0], since)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_share_canaries_fail_over_and_change_count_without_two_writers() {
    require("prometheus");
    let t0 = Instant::now();
    let names: Vec<&str> = CANARIES.iter().map(|(n, _)| *n).collect();
    let Some(mut env) = env_real("shards", |c, ns| {
        names
            .iter()
            .map(|n| {
                let routers = Routers::new(vec![Arc::new(AppMeshKubeRouter::new(c.clone()))]);
                appmesh_service(c, ns, Behaviour::HEALTHY, routers, n)
            })
            .collect()
    })
    .await
    else {
        return;
    };
    let mut weights = BTreeMap::new();
    for (name, label) in CANARIES {
        let canary = canary_value(&env.ns, name, label, &env.prometheus.url);
        setup_appmesh_with(&env, name, canary).await;
        let (log, task) = record_weights(&env.client, &env.ns, name).await;
        env.tasks.push(task);
        weights.insert(name, log);
    }
    create_canary(
        &env,
        canary_value(&env.ns, BAD, Some("x"), &env.prometheus.url),
    )
    .await;

    // Two shards, three replicas: two lead, one stands by.
    let two = ["--shards", "2"];
    let a = Replica::start(&env, "replica-a", None, &two).await;
    let b = Replica::start(&env, "replica-b", None, &two).await;
    let c = Replica::start(&env, "replica-c", None, &two).await;
    let old = [&a, &b, &c];
    let by_shard = leaders(&env, 2, &old).await;
    LABELLER.set(by_shard[0].name.to_string()).unwrap();
    wait_all(&env, Phase::Waiting, 0, "every Canary to be initialised").await;
    assert_eq!(
        holder(&env, "serin-leader-shards").await,
        "shards=2",
        "the shard-count Lease"
    );
    let unlabelled = bucket(&env, "app-4").await;
    assert!(
        unlabelled.is_some_and(|b| b < 64),
        "Serin labels an unlabelled Canary with a bucket: {unlabelled:?}"
    );
    let labelled_by: Vec<&str> = old
        .iter()
        .filter(|r| r.proxy.writes().iter().any(|e| is_labelling(e, "app-4")))
        .map(|r| r.name)
        .collect();
    assert_eq!(labelled_by, [by_shard[0].name], "shard 0's leader labels");
    // The invalid label is reported on the Canary, and nobody acts on it.
    let reported = wait_for(
        "the invalid shard label to be reported",
        Duration::from_secs(30),
        || async {
            let c = canary(&env, BAD).await;
            let cond = c
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (cond.reason == "InvalidShardLabel").then_some(cond.message)
        },
    )
    .await;
    assert!(
        reported.contains("metadata.labels[\"serin.io/shard\"] is \"x\"")
            && reported.contains("0 to 63"),
        "{reported}"
    );
    let events = events_after(&env, BAD, "InvalidShardLabel").await;
    assert!(
        events.iter().all(|(r, _)| r == "InvalidShardLabel"),
        "{events:?}"
    );
    assert_eq!(
        canary(&env, BAD).await.metadata.labels.unwrap()["serin.io/shard"],
        "x",
        "Serin does not overwrite a user's label"
    );
    assert_owned(&env, &by_shard, &old, t0).await;
    let standby = old
        .iter()
        .find(|r| !by_shard.iter().any(|l| l.name == r.name))
        .unwrap();
    assert!(
        standby.proxy.writes().is_empty(),
        "the standby wrote: {:?}",
        standby
            .proxy
            .writes()
            .iter()
            .map(|e| describe(e, t0))
            .collect::<Vec<_>>()
    );

    // A rollout on every Canary; shard 1's leader is killed mid-rollout.
    for (name, _) in CANARIES {
        set_image(&env, name, "podinfo:2").await;
    }
    let victim = by_shard[1];
    let shard1_canary = if bucket(&env, "app-4").await.unwrap() % 2 == 1 {
        "app-4"
    } else {
        "app-1"
    };
    wait_for(
        "shard 1 to move traffic",
        Duration::from_secs(60),
        || async { (weights[shard1_canary].len() >= 2).then_some(()) },
    )
    .await;
    victim.kill();
    let survivors: Vec<&Replica> = old
        .iter()
        .copied()
        .filter(|r| r.name != victim.name)
        .collect();
    let after_kill = leaders(&env, 2, &survivors).await;
    assert_eq!(
        after_kill[1].name, standby.name,
        "the standby takes over the killed leader's shard"
    );
    assert_eq!(
        after_kill[0].name, by_shard[0].name,
        "shard 0 keeps its leader"
    );
    wait_all(&env, Phase::Succeeded, 1, "every first rollout to succeed").await;

    // Three shards: the new replicas stand by while the old count leads.
    let three = ["--shards", "3"];
    let d = Replica::start(&env, "replica-d", None, &three).await;
    let e = Replica::start(&env, "replica-e", None, &three).await;
    let f = Replica::start(&env, "replica-f", None, &three).await;
    let new = [&d, &e, &f];
    wait_for(
        "the new replicas to read the shard-count Lease",
        Duration::from_secs(30),
        || async {
            new.iter()
                .all(|r| {
                    r.proxy
                        .log()
                        .iter()
                        .any(|x| x.path.ends_with("/leases/serin-leader-shards"))
                })
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    for r in new {
        assert!(
            r.proxy.writes().is_empty(),
            "{} (3 shards) wrote while replicas of 2 shards led: {:?}",
            r.name,
            r.proxy
                .writes()
                .iter()
                .map(|e| describe(e, t0))
                .collect::<Vec<_>>()
        );
    }
    let stopped_at = Instant::now();
    for r in &survivors {
        r.terminate();
    }
    let by_shard3 = leaders(&env, 3, &new).await;
    assert_eq!(holder(&env, "serin-leader-shards").await, "shards=3");
    for (name, _) in CANARIES {
        set_image(&env, name, "podinfo:3").await;
    }
    wait_all(&env, Phase::Succeeded, 2, "every second rollout to succeed").await;
    assert_owned(&env, &by_shard3, &new, stopped_at).await;

    // No Canary was ever written by two replicas at once, and every rollout went through
    // its steps exactly once.
    let everyone = [&a, &b, &c, &d, &e, &f];
    let mut summary = Vec::new();
    for (name, _) in CANARIES {
        let mut spans = writes_about(&everyone, name, t0);
        spans.sort_by_key(|(_, w)| w.iter().filter_map(|x| x.forwarded).min());
        summary.push(format!(
            "{name}: {}",
            spans
                .iter()
                .map(|(r, w)| format!("{r}×{}", w.len()))
                .collect::<Vec<_>>()
                .join(" → ")
        ));
        for pair in spans.windows(2) {
            if let Some(msg) = overlapping(&pair[0].1, &pair[1].1) {
                panic!("{name}: {msg}");
            }
        }
        let mut expected = vec![(100, 0)];
        expected.extend(ROLLOUT);
        expected.extend(ROLLOUT);
        assert_eq!(weights[name].pairs(), expected, "{name}'s weights");
    }
    eprintln!("SUMMARY writers per Canary: {}", summary.join("; "));
    let bad_writes: Vec<String> = everyone
        .iter()
        .flat_map(|r| r.proxy.writes())
        .filter(|x| concerns(x, BAD) && !x.path.contains("/status") && x.method != "POST")
        .map(|x| describe(&x, t0))
        .collect();
    assert!(
        bad_writes.is_empty(),
        "nobody acts on {BAD}: {bad_writes:?}"
    );
}
