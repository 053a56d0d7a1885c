//! `kubectl serin dashboard` in a real browser: Debian's headless Chromium, driven by
//! Playwright (`tools/browser/dashboard.mjs`), against this run's API server (the real
//! control plane under `scripts/test`, else the in-memory one) with the real `serin run`
//! carrying out the page's commands. The page must show the live list, carry out Promote and
//! Abort, draw each rollout's weight timeline with its checks, and refuse another origin's
//! page; a screenshot goes to the test output.

mod support;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::json;
use serin::api::{Canary, Phase, RolloutResult};
use support::e2e::*;
use support::require;

/// The browser tools `scripts/install-deps` provides: Chromium and playwright-core.
fn browser_tools() -> (PathBuf, PathBuf) {
    let chromium =
        PathBuf::from(std::env::var_os("CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into()));
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/browser");
    assert!(
        chromium.is_file(),
        "{} is missing: run scripts/install-deps (it installs Debian's chromium)",
        chromium.display()
    );
    assert!(
        tools.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing in {}: run scripts/install-deps (it runs npm ci there)",
        tools.display()
    );
    require("node");
    (chromium, tools)
}

fn canary_object(ns: &str, name: &str, interval: &str, prometheus: &str) -> Canary {
    serde_json::from_value(json!({
        "apiVersion": "serin.dev/v1alpha1", "kind": "Canary",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "backends": {"primary": format!("{name}-v1"), "canary": format!("{name}-v2")},
            "service": {"port": 8080},
            "router": {"gloo": {"upstreamGroup": {"name": name}}},
            "steps": [20, 50, 100],
            "analysis": {"interval": interval, "metrics": [{
                "name": "errors", "provider": {"prometheus": {"address": prometheus}},
                "query": "vector(0)", "max": 1.0}]}
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_and_steers_rollouts_in_a_browser() {
    require("prometheus");
    let (chromium, tools) = browser_tools();
    let env = env(|_, _| Vec::new()).await.expect("the upstream CRDs");
    let ns = env.ns.clone();
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &ns);
    // `web` checks once an hour, so only the page's buttons move it; `api` checks every 2s
    // and promotes itself.
    for (name, interval) in [("web", "1h"), ("api", "2s")] {
        create_upstream_group(
            &env,
            name,
            (
                &format!("{ns}-{name}-v1-8080"),
                &format!("{ns}-{name}-v2-8080"),
            ),
        )
        .await;
        api.create(
            &PostParams::default(),
            &canary_object(&ns, name, interval, &env.prometheus.url),
        )
        .await
        .unwrap();
    }
    let op = Operator::start(&env, env.cluster.dir.path().join("operator.log"), &[]);
    wait_phase(
        &env,
        &op,
        "web",
        Phase::Progressing,
        Duration::from_secs(30),
    )
    .await;

    let mut dashboard = Command::new(env!("CARGO_BIN_EXE_kubectl-serin"))
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["dashboard", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run kubectl-serin dashboard");
    let mut out = std::io::BufReader::new(dashboard.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    eprintln!("$ kubectl serin dashboard --port 0\n{first}");
    let url = first
        .trim()
        .strip_prefix("Serin dashboard: ")
        .unwrap_or_else(|| panic!("no URL in {first:?}"))
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // Outside the browser: without the token, or with another Host (DNS rebinding), nothing
    // is served.
    let http = reqwest::Client::new();
    let base = url.rsplit_once('/').unwrap().0.rsplit_once('/').unwrap().0;
    let no_token = http
        .get(format!("{base}/api/canaries"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 404);
    let rebound = http
        .get(format!("{url}api/canaries"))
        .header("host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    let listed: serde_json::Value = serde_json::from_str(
        &http
            .get(format!("{url}api/canaries"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        listed["canaries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["namespace"] == ns.as_str() && c["name"] == "web"),
        "{listed}"
    );

    let screenshot = env.cluster.dir.path().join("dashboard.png");
    let driven = Command::new("node")
        .arg(tools.join("dashboard.mjs"))
        .env("DASHBOARD_URL", &url)
        .env("NAMESPACE", &ns)
        .env("SCREENSHOT", &screenshot)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&driven.stdout),
        String::from_utf8_lossy(&driven.stderr)
    );
    // The screenshot outlives the test's temporary directory.
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    if screenshot.is_file() {
        std::fs::copy(&screenshot, &kept).unwrap();
        eprintln!("screenshot: {}", kept.display());
    }
    let _ = dashboard.kill();
    let _ = dashboard.wait();
    assert!(driven.status.success(), "the browser run failed (above)");
    assert!(kept.is_file(), "no screenshot");

    // What the page did reached the cluster: web was aborted at 50% by the page's buttons,
    // with its timeline; the other origin's retry never became a command.
    let web = canary(&env, "web").await;
    let status = web.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Failed);
    let h = &status.history[0];
    assert_eq!((h.result, h.reached_weight), (RolloutResult::Aborted, 50));
    let weights: Vec<u8> = h
        .timeline
        .as_ref()
        .unwrap()
        .points
        .iter()
        .map(|p| p.weight)
        .collect();
    assert_eq!(weights, vec![20, 50, 0]);
    let command = web
        .metadata
        .annotations
        .unwrap_or_default()
        .get(serin::controller::COMMAND_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    assert!(command.starts_with("abort/"), "last command {command:?}");
    drop(op);
}
