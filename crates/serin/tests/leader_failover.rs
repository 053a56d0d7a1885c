//! Failover that cannot split the brain, on the real control plane: two `serin run`
//! replicas with leader election, each as the chart's ServiceAccount (its token) behind a
//! fault proxy of its own ([`support::fault_proxy`]) that records every request it sends
//! and can stall or hold them.
//!
//! Every case runs a whole rollout (20 → 50 → 100) while something goes wrong, and checks
//! the same three things:
//! - no write (weights, status, Deployments, Events; Lease writes aside) of one replica
//!   overlaps in time with a write of the other, and the writes change hands at most once;
//! - the Lease's holder changes only when the case expects it;
//! - the weights go through exactly the sequence of an uninterrupted rollout.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use serin::api::{Canary, Phase};
use serin::demo::traffic::Behaviour;
use support::e2e::*;
use support::fault_proxy::{FaultProxy, HoldAt};
use support::replica::{Replica, describe, overlapping};
use support::{require, wait_for};

/// The weights of an uninterrupted rollout.
const WEIGHTS: [Pair; 5] = [(100, 0), (80, 20), (50, 50), (0, 100), (100, 0)];

/// Who held the Lease `serin-leader`, from when.
#[derive(Clone, Default)]
struct Holders(Arc<Mutex<Vec<(String, Instant)>>>);

impl Holders {
    fn record(env: &Env) -> (Holders, tokio::task::JoinHandle<()>) {
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
        let seen = Holders::default();
        let out = seen.clone();
        let task = tokio::spawn(async move {
            let config = watcher::Config::default().fields("metadata.name=serin-leader");
            let mut stream = watcher::watcher(leases, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(lease) = stream.next().await {
                let Ok(lease) = lease else { continue };
                let holder = lease
                    .spec
                    .and_then(|s| s.holder_identity)
                    .unwrap_or_default();
                let mut v = out.0.lock().unwrap();
                if v.last().map(|(h, _)| h) != Some(&holder) {
                    v.push((holder, Instant::now()));
                }
            }
        });
        (seen, task)
    }

    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// When `holder` was first seen holding the Lease.
    fn since(&self, holder: &str) -> Option<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(h, _)| h == holder)
            .map(|(_, t)| *t)
    }

    async fn wait_for(&self, holder: &str) -> Instant {
        wait_for(
            &format!("{holder} to hold the Lease"),
            Duration::from_secs(60),
            || async { self.since(holder) },
        )
        .await
    }
}

/// A rollout of Canary `podinfo` with two replicas on the real control plane: `a` leads,
/// `b` (with `b_clock` as its clock offset) stands by.
struct Case {
    /// When the case started (the origin of the times in failure messages).
    t0: Instant,
    env: Env,
    weights: WeightLog,
    holders: Holders,
    a: Replica,
    b: Replica,
}

impl Case {
    async fn start(prefix: &str, b_clock: Option<&str>) -> Option<Case> {
        require("prometheus");
        let t0 = Instant::now();
        let (mut env, weights) = podinfo_env_real(prefix, Behaviour::HEALTHY).await?;
        let (holders, task) = Holders::record(&env);
        env.tasks.push(task);
        let a = Replica::start(&env, "replica-a", None, &[]).await;
        holders.wait_for("replica-a").await;
        let b = Replica::start(&env, "replica-b", b_clock, &[]).await;
        // b has read the Lease (it is standing by) before anything else happens.
        wait_for(
            "replica-b to read the Lease",
            Duration::from_secs(30),
            || async {
                b.proxy
                    .log()
                    .iter()
                    .any(|e| e.method == "GET" && e.path.ends_with("/leases/serin-leader"))
                    .then_some(())
            },
        )
        .await;
        let case = Case {
            t0,
            env,
            weights,
            holders,
            a,
            b,
        };
        case.wait_phase(Phase::Waiting, Duration::from_secs(60))
            .await;
        Some(case)
    }

    async fn wait_phase(&self, phase: Phase, timeout: Duration) -> Canary {
        let deadline = Instant::now() + timeout;
        loop {
            let c = canary(&self.env, "podinfo").await;
            if c.status.as_ref().is_some_and(|s| s.phase == phase) {
                return c;
            }
            if Instant::now() > deadline {
                self.dump().await;
                panic!("timed out after {timeout:?} waiting for phase {phase:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_weights(&self, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.weights.len() < len {
            if Instant::now() > deadline {
                self.dump().await;
                panic!(
                    "timed out waiting for weight change {len}: {:?}",
                    self.weights.pairs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What happened, in ms from the start (printed; `--nocapture` shows it).
    fn summary(&self, first: &Replica, then: &Replica) {
        let ms = |t: Instant| t.saturating_duration_since(self.t0).as_millis();
        let holders: Vec<String> = self
            .holders
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(h, t)| format!("{h}@{}", ms(*t)))
            .collect();
        let span = |r: &Replica| {
            let w = r.proxy.writes();
            let start = w.iter().filter_map(|e| e.forwarded).min().map(ms);
            let end = w
                .iter()
                .filter_map(|e| e.answered.or(e.forwarded))
                .max()
                .map(ms);
            format!("{} writes {start:?}..{end:?}", w.len())
        };
        let exit = |r: &Replica| {
            let why = r
                .log()
                .lines()
                .find(|l| l.contains("leadership lost"))
                .map(|l| {
                    l.chars()
                        .skip(l.find("error=").unwrap_or(0))
                        .take(160)
                        .collect::<String>()
                });
            format!(
                "exit {:?} {why:?}",
                r.exited().map(|(t, s)| (ms(t), s.code()))
            )
        };
        eprintln!(
            "SUMMARY holders [{}]; {}: {}, {}; {}: {}, {}; weights {:?}",
            holders.join(", "),
            first.name,
            span(first),
            exit(first),
            then.name,
            span(then),
            exit(then),
            self.weights.pairs()
        );
    }

    async fn dump(&self) {
        let c = canary(&self.env, "podinfo").await;
        eprintln!(
            "--- Canary\n{}",
            serde_norway::to_string(&c).unwrap_or_default()
        );
        eprintln!("--- weights {:?}", self.weights.pairs());
        eprintln!("--- lease holders {:?}", self.holders.names());
        for r in [&self.a, &self.b] {
            let log = r.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- {} (exit {:?}), last 40 lines\n{}",
                r.name,
                r.exited().map(|(_, s)| s),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            eprintln!("--- {} writes", r.name);
            for w in r.proxy.writes() {
                eprintln!("  {}", describe(&w, self.t0));
            }
        }
    }

    /// The checks every case ends with: the uninterrupted weight sequence, one rollout in
    /// the history, and writes that change hands at most once, from `first` to the other,
    /// never overlapping.
    async fn assert_one_writer_at_a_time(&self, first: &Replica, then: &Replica) {
        let c = self
            .wait_phase(Phase::Succeeded, Duration::from_secs(120))
            .await;
        let status = c.status.unwrap();
        self.summary(first, then);
        let ok = self.weights.pairs() == WEIGHTS && status.history.len() == 1;
        let overlap = overlapping(&first.proxy.writes(), &then.proxy.writes());
        if !ok || overlap.is_some() {
            self.dump().await;
        }
        assert_eq!(self.weights.pairs(), WEIGHTS, "the weight sequence");
        assert_eq!(status.history.len(), 1, "{:?}", status.history);
        if let Some(msg) = overlap {
            panic!("{msg}");
        }
    }
}

/// How far ahead of this process's clock the first timestamp of a replica's log is, in
/// seconds (its log lines start with its wall-clock time).
fn clock_offset(log: &str) -> Option<i64> {
    let line = log.lines().next()?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // An ANSI colour sequence: skip to its final letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let stamp = chrono::DateTime::parse_from_rfc3339(plain.split_whitespace().next()?).ok()?;
    Some((stamp.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds())
}

/// A standby whose clock is five minutes ahead (libfaketime) sees the leader's renewTime
/// as minutes old. It must still wait until it has watched the record stay unchanged for
/// a lease duration: during the whole rollout the leader keeps the Lease and the standby,
/// ready but idle, writes nothing; it takes over only once the leader is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_a_skewed_clock_does_not_take_a_live_lease() {
    let Some(case) = Case::start("leader-skew", Some("+5m")).await else {
        return;
    };
    let offset = clock_offset(&case.b.log());
    assert!(
        offset.is_some_and(|s| (240..=360).contains(&s)),
        "replica-b's clock should be 5 minutes ahead, its log is {offset:?} s ahead: {}",
        case.b.log()
    );
    assert_eq!(
        case.b.http("/readyz").await,
        200,
        "a standby is ready (healthy)"
    );
    set_image(&case.env, "podinfo", "podinfo:2").await;
    // Throughout the rollout: one holder, and no write from the standby.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stolen = case.holders.names() != ["replica-a"];
        let wrote = !case.b.proxy.writes().is_empty();
        if stolen || wrote {
            case.dump().await;
        }
        assert!(!stolen, "the skewed standby took a live lease");
        assert!(!wrote, "the standby wrote while it did not lead");
        let c = canary(&case.env, "podinfo").await;
        if c.status.is_some_and(|s| s.phase == Phase::Succeeded) {
            break;
        }
        assert!(Instant::now() < deadline, "the rollout did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(case.a.exited().is_none(), "{}", case.a.log());

    let killed = case.a.kill();
    let took_over = case.holders.wait_for("replica-b").await;
    assert!(took_over > killed);
    // The Lease shows the new holder a moment before its log line is written.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !case.b.log().contains("acquired leadership") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        case.b.log().contains("acquired leadership"),
        "{}",
        case.b.log()
    );
    case.assert_one_writer_at_a_time(&case.a, &case.b).await;
}

/// The leader's connection to the API server stalls mid-rollout (its proxy stops
/// forwarding in both directions). It cannot renew within its renew deadline, so it stops
/// writing and exits non-zero; only then does the standby take over and finish the
/// rollout. When the connection comes back nothing the old leader sent arrives late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_connection_stalls_stops_before_the_standby_starts() {
    let Some(case) = Case::start("leader-stall", None).await else {
        return;
    };
    set_image(&case.env, "podinfo", "podinfo:2").await;
    case.wait_weights(2).await;
    case.a.proxy.stall();
    let stalled_at = Instant::now();
    let took_over = case.holders.wait_for("replica-b").await;
    case.wait_phase(Phase::Succeeded, Duration::from_secs(120))
        .await;
    case.a.proxy.resume();
    // With the connection back, a leader still running would now learn it lost.
    let (exited_at, status) = wait_for("replica-a to exit", Duration::from_secs(30), || async {
        case.a.exited()
    })
    .await;
    if exited_at >= took_over {
        case.dump().await;
    }
    assert!(
        exited_at < took_over,
        "replica-a was still running {:?} after replica-b took over",
        exited_at - took_over
    );
    assert!(
        !status.success(),
        "a leader that lost its lease exits non-zero"
    );
    assert!(case.a.log().contains("lost leadership"), "{}", case.a.log());
    let late: Vec<String> = case
        .a
        .proxy
        .log()
        .iter()
        .filter(|e| e.forwarded.is_some_and(|f| f > stalled_at))
        .map(|e| describe(e, stalled_at))
        .collect();
    assert!(
        late.is_empty(),
        "the stalled leader's requests reached the server later: {late:#?}"
    );
    // The stall did hold requests (its renewals at least), and they died with their client.
    assert!(
        case.a
            .proxy
            .log()
            .iter()
            .any(|e| e.received > stalled_at
                && e.outcome == support::fault_proxy::Outcome::Abandoned),
        "{:#?}",
        case.a.proxy.log()
    );
    case.assert_one_writer_at_a_time(&case.a, &case.b).await;
}

/// The leader is killed with SIGKILL in the middle of a weight write: the 50% write has
/// reached the API server, its answer has not reached the leader. The standby takes over
/// after the lease duration and finishes the rollout from the weights the object holds,
/// with no step written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_weight_write_hands_over_cleanly() {
    let Some(case) = Case::start("leader-kill", None).await else {
        return;
    };
    set_image(&case.env, "podinfo", "podinfo:2").await;
    case.wait_weights(2).await;
    let mut held = case
        .a
        .proxy
        .hold_nth("PATCH", "/virtualrouters/podinfo", 1, HoldAt::Response);
    tokio::time::timeout(Duration::from_secs(60), held.reached())
        .await
        .unwrap_or_else(|_| panic!("no weight write after 80/20: {:?}", case.weights.pairs()));
    let killed = case.a.kill();
    held.release();
    let took_over = case.holders.wait_for("replica-b").await;
    assert!(took_over > killed);
    // The write the leader died in had reached the server: the standby found 50/50 already
    // in place while status still said 20.
    assert_eq!(case.weights.pairs().get(2), Some(&(50, 50)));
    assert!(case.weights.seen_at(2).is_some_and(|t| t < took_over));
    let b_writes = case.b.proxy.writes();
    assert!(
        b_writes
            .iter()
            .all(|w| w.forwarded.is_some_and(|f| f > killed)),
        "{b_writes:#?}"
    );
    case.assert_one_writer_at_a_time(&case.a, &case.b).await;
}

/// The leader is stopped cleanly (SIGTERM) mid-rollout: it stops writing, waits until
/// every write it sent has ended, then releases the Lease, so the standby takes over well
/// before a lease duration (10 s here) has passed, the writes never overlap, and the rollout
/// completes with the uninterrupted weights. Before, a standby always waited out the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_cleanly_releases_the_lease() {
    let Some(case) = Case::start("leader-term", None).await else {
        return;
    };
    set_image(&case.env, "podinfo", "podinfo:2").await;
    case.wait_weights(2).await;
    let stopped = case.a.terminate();
    let took_over = case.holders.wait_for("replica-b").await;
    let (exited, status) = wait_for("replica-a to exit", Duration::from_secs(30), || async {
        case.a.exited()
    })
    .await;
    assert!(
        status.success(),
        "a clean shutdown exits 0: {status:?}\n{}",
        case.a.log()
    );
    assert!(
        case.a.log().contains("released leadership"),
        "{}",
        case.a.log()
    );
    let handover = took_over.duration_since(stopped);
    eprintln!("handover after SIGTERM: {handover:?} (lease duration 10s)");
    assert!(
        handover < Duration::from_secs(10),
        "the standby waited out the lease: {handover:?}"
    );
    assert!(
        exited <= took_over + Duration::from_secs(1),
        "replica-a still ran after the takeover"
    );
    case.wait_phase(Phase::Succeeded, Duration::from_secs(120))
        .await;
    assert_eq!(case.weights.pairs(), WEIGHTS.to_vec());
    case.assert_one_writer_at_a_time(&case.a, &case.b).await;
}

/// The fault proxy itself: it fails exactly the `nth` matching request (the API another
/// test uses for a status-write fault), forwards nothing while stalled and moves on at
/// resume, and records how each exchange ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_fails_the_nth_request_and_stalls() {
    use support::fault_proxy::Outcome;
    let Some(cluster) = support::cluster::TestCluster::start_real("fault-proxy").await else {
        return;
    };
    let proxy = FaultProxy::start("t", cluster.client.clone()).await;
    let client = kube::Client::try_from(kube::Config::new(proxy.url.parse().unwrap())).unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let ns = cluster.namespace.as_str();
    let path = format!("/api/v1/namespaces/{ns}");

    proxy.fail_nth("GET", &path, 2, 1, 500);
    assert!(namespaces.get(ns).await.is_ok());
    let failed = namespaces.get(ns).await.unwrap_err();
    assert!(
        matches!(&failed, kube::Error::Api(s) if s.code == 500),
        "{failed:?}"
    );
    assert!(namespaces.get(ns).await.is_ok());

    proxy.stall();
    let stalled = tokio::time::timeout(Duration::from_millis(500), namespaces.get(ns)).await;
    assert!(stalled.is_err(), "a request went through a stalled proxy");
    let waiting = tokio::spawn({
        let namespaces = namespaces.clone();
        let ns = ns.to_string();
        async move { namespaces.get(&ns).await.map(|_| ()) }
    });
    wait_for(
        "the second stalled request to arrive",
        Duration::from_secs(10),
        || async { (proxy.log().len() == 5).then_some(()) },
    )
    .await;
    proxy.resume();
    assert!(waiting.await.unwrap().is_ok());

    let outcomes: Vec<Outcome> = proxy.log().iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Answered,
            Outcome::Failed,
            Outcome::Answered,
            Outcome::Abandoned,
            Outcome::Answered
        ]
    );
    assert!(proxy.log().iter().all(|e| e.path == path));
}
