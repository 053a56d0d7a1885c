//! `kubectl serin` against this run's API server (the real control plane under
//! `scripts/test`, else the in-memory one) with the real `serin run` carrying out its
//! commands: run as a kubectl plugin by the real `kubectl` (found on PATH), and directly.
//!
//! The Canary's interval is an hour, so no check ever comes due: every step it takes is one
//! the plugin asked for.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::json;
use serin::api::{Canary, Phase};
use support::e2e::*;
use support::{cluster, require, wait_for};

fn plugin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kubectl-serin"))
}

/// Runs `kubectl-serin` with `args` against `kubeconfig`.
fn run(kubeconfig: &Path, args: &[&str]) -> Output {
    let out = plugin()
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl-serin");
    eprintln!(
        "$ kubectl serin {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; returns its output.
fn ok(kubeconfig: &Path, args: &[&str]) -> String {
    let out = run(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl serin {args:?} failed: {}",
        stderr(&out)
    );
    stdout(&out)
}

/// Runs a command that must fail; returns its error.
fn fails(kubeconfig: &Path, args: &[&str]) -> String {
    let out = run(kubeconfig, args);
    assert!(
        !out.status.success(),
        "kubectl serin {args:?} succeeded: {}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    err
}

async fn status(env: &Env) -> serin::api::CanaryStatus {
    canary(env, "web").await.status.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_reads_and_steers_a_rollout() {
    require("prometheus");
    let env = env(|_, _| Vec::new()).await.expect("the upstream CRDs");
    create_upstream_group(
        &env,
        "web",
        (
            &format!("{}-web-v1-8080", env.ns),
            &format!("{}-web-v2-8080", env.ns),
        ),
    )
    .await;
    let obj = json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": "web", "namespace": env.ns},
        "spec": {
            "backends": {"primary": "web-v1", "canary": "web-v2"},
            "service": {"port": 8080},
            "router": {"gloo": {"upstreamGroup": {"name": "web"}}},
            "steps": [20, 50, 100],
            "analysis": {"interval": "1h", "metrics": [{
                "name": "errors", "provider": {"prometheus": {"address": env.prometheus.url}},
                "query": "vector(0)", "max": 1.0}]}
        }
    });
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(obj).unwrap(),
    )
    .await
    .unwrap();
    let mut op = Operator::start(&env, env.cluster.dir.path().join("operator.log"), &[]);
    wait_phase(
        &env,
        &op,
        "web",
        Phase::Progressing,
        Duration::from_secs(30),
    )
    .await;
    let k = env.kubeconfig.as_path();
    let ns = env.ns.as_str();

    // The namespace comes from the kubeconfig's context, as kubectl's does, and the real
    // kubectl runs the plugin from PATH.
    let own = env.cluster.dir.path().join("kubeconfig-with-namespace");
    std::fs::copy(k, &own).unwrap();
    let set = Command::new(cluster::kubectl())
        .args(["config", "set-context", "--current", "--namespace", ns])
        .env("KUBECONFIG", &own)
        .status()
        .unwrap();
    assert!(set.success());
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-serin"))
        .parent()
        .unwrap();
    let path = std::env::join_paths(
        std::iter::once(bin_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let listed = Command::new(cluster::kubectl())
        .args(["serin", "list"])
        .env("KUBECONFIG", &own)
        .env("PATH", &path)
        .output()
        .unwrap();
    let list = stdout(&listed);
    eprintln!("$ kubectl serin list\n{list}{}", stderr(&listed));
    assert!(listed.status.success(), "{}", stderr(&listed));
    let row = list.lines().find(|l| l.starts_with("web ")).expect(&list);
    for cell in ["Progressing", "80/20", "1/3"] {
        assert!(row.contains(cell), "{cell} not in {row:?}");
    }
    let all = ok(k, &["list", "-A"]);
    assert!(
        all.lines()
            .any(|l| l.starts_with(ns) && l.contains(" web ")),
        "{all}"
    );

    // get: piped, so plain text.
    let got = ok(k, &["-n", ns, "get", "web"]);
    assert!(!got.contains('\x1b'), "escape codes when piped: {got}");
    for part in [
        &format!("{ns}/web  Progressing  step 1/3 (20 → 50 → 100)"),
        "primary 80% / canary 20%",
        "revision web-v2",
        "next check in 59m",
        "failed checks 0 of",
        "errors",
        "max 1",
        "RolloutStarted",
        "StepAdvanced",
    ] {
        assert!(got.contains(part), "{part:?} not in:\n{got}");
    }

    // Pause holds the rollout; promote still moves it a step (commands are explicit);
    // resume lifts the pause.
    let out = ok(k, &["-n", ns, "pause", "web"]);
    assert!(
        out.contains(&format!("pause of canary {ns}/web: done")),
        "{out}"
    );
    let s = status(&env).await;
    assert!(s.paused_by_command);
    assert_eq!(s.phase, Phase::Paused);
    let err = fails(k, &["-n", ns, "pause", "web"]);
    assert!(err.contains("already paused"), "{err}");

    let out = ok(k, &["-n", ns, "promote", "web"]);
    assert!(out.contains("skipping the rest of step 1 of 3"), "{out}");
    assert!(out.contains("primary 50% / canary 50%"), "{out}");
    assert_eq!(status(&env).await.step, 1);

    let out = ok(k, &["-n", ns, "resume", "web"]);
    assert!(out.contains("resume requested"), "{out}");
    let s = status(&env).await;
    assert!(!s.paused_by_command);
    assert_eq!(s.phase, Phase::Progressing);

    // A command that does not apply says so, and fails.
    let err = fails(k, &["-n", ns, "retry", "web"]);
    assert!(
        err.contains(&format!("retry of canary {ns}/web did not apply")),
        "{err}"
    );
    assert!(err.contains("does not apply in phase Progressing"), "{err}");

    // promote --full: to 100 now; traffic mode, so the canary backend is the stable one.
    let out = ok(k, &["-n", ns, "promote", "web", "--full"]);
    assert!(out.contains("full promotion requested"), "{out}");
    let s = status(&env).await;
    assert_eq!(s.phase, Phase::Succeeded);
    assert_eq!(s.canary_weight, 100);

    let history = ok(k, &["-n", ns, "history", "web"]);
    let first = history.lines().nth(1).expect(&history);
    for cell in ["web-v2", "Promoted", "100%", "promoted by user"] {
        assert!(first.contains(cell), "{cell} not in {first:?}");
    }

    // get --watch, piped: one line per change.
    let mut watch = plugin()
        .arg("--kubeconfig")
        .arg(k)
        .args(["-n", ns, "get", "web", "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(watch.stdout.take().unwrap());
    let line = wait_for("a line from get --watch", Duration::from_secs(10), || {
        let mut l = String::new();
        let read = std::io::BufRead::read_line(&mut reader, &mut l).ok();
        std::future::ready(
            read.filter(|n| *n > 0 && l.contains("Succeeded"))
                .map(|_| l),
        )
    })
    .await;
    assert!(line.contains(&format!("{ns}/web Succeeded")), "{line}");
    let _ = watch.kill();
    let _ = watch.wait();

    // Errors name the Canary and the namespace, and say what to do.
    let err = fails(k, &["-n", ns, "get", "nope"]);
    assert!(
        err.contains(&format!("canary \"nope\" not found in namespace \"{ns}\"")),
        "{err}"
    );
    assert!(
        err.contains(&format!("kubectl serin list -n {ns}")),
        "{err}"
    );
    let err = fails(k, &["--context", "no-such-context", "list"]);
    assert!(err.contains("no-such-context"), "{err}");
    assert!(err.contains("kubectl config get-contexts"), "{err}");

    // With no operator, a command is written, and the plugin says it was not carried out.
    op.kill();
    let err = fails(k, &["-n", ns, "abort", "web", "--wait", "2"]);
    assert!(err.contains("did not carry it out within 2s"), "{err}");
    let c = canary(&env, "web").await;
    assert!(
        c.metadata
            .annotations
            .unwrap_or_default()
            .get(serin::controller::COMMAND_ANNOTATION)
            .is_some_and(|v| v.starts_with("abort/kubectl-")),
        "the command stays for the operator"
    );
}
