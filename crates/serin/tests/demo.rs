//! `serin demo`: the real binary end to end (exit code, what it prints, kubectl against its
//! API server while it runs), and the demo's own App Mesh and Gloo definitions against the
//! writes Serin's routers make.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::GroupVersionKind;
use kube_sandbox::{ApiServer, Options};
use serde_json::{Value, json};
use serin::api::Canary;
use serin::arms::Weights;
use serin::router::{AppMeshKubeRouter, GlooEdgeRouter, Router, WriteOutcome};

/// The demo as a child process; killed on drop.
struct Demo {
    child: Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Demo {
    fn start(dir: &Path, args: &[&str]) -> Demo {
        let out = dir.join("stdout");
        let err = dir.join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_serin"))
            .arg("demo")
            .args(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start serin demo");
        Demo { child, out, err }
    }

    fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.out) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits for the exit code, killing the demo after `timeout`.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "serin demo did not finish within {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
                    self.output(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The part of the demo's output between `from` and the next scenario banner.
fn section<'a>(output: &'a str, from: &str) -> &'a str {
    let start = output.find(from).unwrap_or(output.len());
    let rest = &output[start..];
    let end = rest[1..]
        .find("== scenario")
        .or_else(|| rest.find("\nSummary"))
        .map(|i| i + 1)
        .unwrap_or(rest.len());
    &rest[..end]
}

/// At a fast speed the whole demo finishes with exit code 0 (its duration is printed, not
/// asserted: the 60 s limit only stops a hung demo): the healthy build goes through the
/// weights 20, 50 and 100 and is promoted, the one that fails under load is rolled back from
/// 50%, and the plain (not a terminal) output has no escape codes.
#[test]
fn demo_promotes_then_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut demo = Demo::start(dir.path(), &["--speed", "30"]);
    let status = demo.wait(Duration::from_secs(60));
    let out = demo.output();
    let context = format!("--- stdout\n{out}\n--- stderr\n{}", demo.stderr());
    assert!(status.success(), "exit {status}\n{context}");
    eprintln!("serin demo --speed 30 took {:?}", started.elapsed());
    assert!(
        !out.contains('\x1b'),
        "escape codes in piped output\n{context}"
    );

    let promote = section(&out, "== scenario 1/2: promote");
    let mut at = 0;
    for weight in ["canary 20%", "canary 50%", "canary 100%"] {
        let found = promote[at..]
            .find(weight)
            .unwrap_or_else(|| panic!("{weight} missing or out of order\n{context}"));
        at += found;
    }
    assert!(promote.contains("Succeeded"), "{context}");
    assert!(promote.contains("event Normal Promoted"), "{context}");

    let rollback = section(&out, "== scenario 2/2: rollback");
    assert!(rollback.contains("canary 50%"), "{context}");
    assert!(rollback.contains("Fail"), "{context}");
    assert!(rollback.contains("event Warning RolledBack"), "{context}");
    assert!(rollback.contains("Failed"), "{context}");

    let summary = &out[out.find("Summary").expect("a summary")..];
    assert!(
        summary.contains("✓ promote") && summary.contains("got Succeeded, Promoted (reached 100%)"),
        "{context}"
    );
    assert!(
        summary.contains("✓ rollback") && summary.contains("got Failed, RolledBack (reached 50%)"),
        "{context}"
    );
    assert!(summary.contains("0% → 20% → 50% → 0%"), "{context}");
    assert!(summary.contains("0% → 20% → 50% → 100% → 0%"), "{context}");
    assert!(summary.contains("canary failing from "), "{context}");
}

/// With --kubeconfig-out and --hold, a real kubectl lists the demo's Canary and the
/// VirtualRouter Serin created while the demo runs.
#[test]
fn kubectl_watches_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let kc = kubeconfig.to_str().unwrap();
    let demo = Demo::start(
        dir.path(),
        &[
            "--scenario",
            "promote",
            "--speed",
            "30",
            "--kubeconfig-out",
            kc,
            "--hold",
        ],
    );
    let kubectl = |args: &[&str]| -> Option<String> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl is on PATH (scripts/install-deps installs it)");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        if kubeconfig.exists()
            && let Some(out) = kubectl(&["get", "canaries", "-A"])
            && out.contains("colorteller")
        {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl never listed the Canary\n--- stdout\n{}\n--- stderr\n{}",
            demo.output(),
            demo.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(listed.contains("appmesh-demo"), "{listed}");
    assert!(listed.contains("PHASE"), "{listed}");
    // Held after the demo: the promoted Canary is still there to inspect.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !demo.output().contains("holding") {
        assert!(
            Instant::now() < deadline,
            "the demo did not finish\n{}",
            demo.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let phase = kubectl(&[
        "get",
        "canary",
        "-n",
        "appmesh-demo",
        "colorteller",
        "-o",
        "jsonpath={.status.phase}",
    ]);
    assert_eq!(phase.as_deref(), Some("Succeeded"));
    let vr = kubectl(&["get", "virtualrouters", "-n", "appmesh-demo"]).unwrap_or_default();
    assert!(vr.contains("colorteller"), "{vr}");

    // The README's second terminal: `kubectl serin dashboard` serves the held demo, whose
    // promoted rollout keeps its weight timeline and checks.
    let mut dashboard = Command::new(env!("CARGO_BIN_EXE_kubectl-serin"))
        .args(["--kubeconfig", kc, "dashboard", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run kubectl-serin dashboard");
    let mut first = String::new();
    // Kept open until the dashboard is stopped: it writes more lines.
    let mut out = std::io::BufReader::new(dashboard.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    let url = first
        .trim()
        .strip_prefix("Serin dashboard: ")
        .expect(&first);
    let body = http_get(&format!("{url}api/canaries"));
    let _ = dashboard.kill();
    let _ = dashboard.wait();
    drop(out);
    let data: serde_json::Value = serde_json::from_str(&body).expect(&body);
    let c = data["canaries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "colorteller")
        .unwrap_or_else(|| panic!("no colorteller in {body}"));
    let entry = &c["status"]["history"][0];
    assert_eq!(entry["result"], "Promoted", "{entry}");
    let weights: Vec<u64> = entry["timeline"]["points"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline in {entry}"))
        .iter()
        .map(|p| p["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, vec![20, 50, 100, 0], "{entry}");
    assert_eq!(entry["timeline"]["points"][0]["verdict"], "Pass", "{entry}");
}

/// A GET of `url` (plain http on 127.0.0.1), its body.
fn http_get(url: &str) -> String {
    use std::io::{Read as _, Write as _};
    let rest = url.strip_prefix("http://").expect(url);
    let (host, path) = rest.split_once('/').expect(url);
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    write!(
        conn,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect(&response);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// `serin demo --router gateway-api`: the same Canary with only `spec.router` changed walks
/// the HTTPRoute's rule `split` 20 → 50 → 100 and promotes, then rolls the failing build
/// back from 50%; kubectl, while the demo holds, shows the route back on the primary
/// (100/0, the header-free rule as written) and that no App Mesh routing was created.
#[test]
fn demo_routes_with_the_gateway_api() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let kc = kubeconfig.to_str().unwrap();
    let demo = Demo::start(
        dir.path(),
        &[
            "--router",
            "gateway-api",
            "--speed",
            "30",
            "--kubeconfig-out",
            kc,
            "--hold",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !demo.output().contains("holding") {
        assert!(
            Instant::now() < deadline,
            "the demo did not finish\n--- stdout\n{}\n--- stderr\n{}",
            demo.output(),
            demo.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = demo.output();
    let context = format!("--- stdout\n{out}\n--- stderr\n{}", demo.stderr());
    assert!(out.contains("The demo behaved as expected."), "{context}");
    let summary = &out[out.find("Summary").expect("a summary")..];
    assert!(
        summary.contains("canary weight on the HTTPRoute colorteller: 0% → 20% → 50% → 100% → 0%"),
        "{context}"
    );
    assert!(
        summary.contains("canary weight on the HTTPRoute colorteller: 0% → 20% → 50% → 0%"),
        "{context}"
    );
    let kubectl = |args: &[&str]| -> String {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl is on PATH (scripts/install-deps installs it)");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let weights = kubectl(&[
        "get",
        "httproute",
        "-n",
        "appmesh-demo",
        "colorteller",
        "-o",
        "jsonpath={range .spec.rules[0].backendRefs[*]}{.name}={.weight} {end}",
    ]);
    assert_eq!(
        weights.trim(),
        "colorteller-primary=100 colorteller-canary=0"
    );
    let canary = kubectl(&[
        "get",
        "canary",
        "-n",
        "appmesh-demo",
        "colorteller",
        "-o",
        "json",
    ]);
    let canary: Value = serde_json::from_str(&canary).unwrap();
    assert_eq!(
        canary["spec"]["router"],
        json!({"gatewayApi": {"httpRoute": {"name": "colorteller"}}})
    );
    assert_eq!(canary["status"]["phase"], "Failed");
    let routers = kubectl(&["get", "virtualrouters", "-n", "appmesh-demo", "-o", "name"]);
    assert_eq!(
        routers.trim(),
        "",
        "App Mesh routing created for a Gateway API Canary"
    );
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Creates every document of an example file except `skip_kinds`, in namespace `ns` when
/// given.
async fn create_docs(
    client: &kube::Client,
    path: &str,
    skip_kinds: &[&str],
    ns: Option<&str>,
) -> Vec<Value> {
    let text = std::fs::read_to_string(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(path),
    )
    .unwrap();
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() || skip_kinds.contains(&v["kind"].as_str().unwrap_or_default()) {
            continue;
        }
        if let Some(ns) = ns {
            v["metadata"]["namespace"] = json!(ns);
        }
        serin::demo::create(client, &v).await.unwrap();
        docs.push(v);
    }
    docs
}

async fn namespace(client: &kube::Client, name: &str) {
    serin::demo::create(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .await
    .unwrap();
}

/// The demo's own App Mesh and Gloo definitions accept what Serin's routers write, with
/// strict field validation: workload-mode creation and weight writes, a traffic-mode route
/// whose retry policy and header match survive, and Gloo UpstreamGroup weights.
#[tokio::test]
async fn demo_kinds_accept_router_writes() {
    let server = ApiServer::start(Options::default()).await.unwrap();
    serin::demo::kinds::register(&server).unwrap();
    let client = server.client().unwrap();
    namespace(&client, "appmesh-demo").await;
    namespace(&client, "gloo-system").await;
    serin::demo::create(
        &client,
        &json!({"apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "Mesh",
                "metadata": {"name": "color-mesh"},
                "spec": {"namespaceSelector": {"matchLabels": {"mesh": "color-mesh"}}}}),
    )
    .await
    .unwrap();
    let canaries: Api<Canary> = Api::namespaced(client.clone(), "appmesh-demo");

    // Workload mode: Serin creates the VirtualNodes, VirtualRouter and VirtualService.
    serin::demo::create(
        &client,
        &serin::demo::canary_manifest(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let canary = canaries.get("colorteller").await.unwrap();
    let router = AppMeshKubeRouter::new(client.clone());
    router.prepare(&canary).await.unwrap();
    router.prepare(&canary).await.unwrap();
    let mut current = Weights::STABLE;
    for w in [20, 50, 100, 0] {
        let next = Weights::with_canary(w);
        let outcome = router.set_weights(&canary, current, next).await.unwrap();
        assert_eq!(outcome, WriteOutcome::Written, "{w}");
        assert_eq!(router.weights(&canary).await.unwrap(), next);
        current = next;
    }
    let nodes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "appmesh-demo",
        &resource("appmesh.k8s.aws", "v1beta2", "VirtualNode", "virtualnodes"),
    );
    let node = nodes.get("colorteller-canary").await.unwrap();
    assert_eq!(
        node.data["spec"]["serviceDiscovery"]["dns"]["hostname"],
        "colorteller-canary.appmesh-demo.svc.cluster.local"
    );
    assert_eq!(node.metadata.owner_references.unwrap()[0].kind, "Canary");

    // Traffic mode on the colorapp's own VirtualRouter: only the two weights change.
    // (In its own namespace: its VirtualService has the workload-mode one's name.)
    namespace(&client, "colorapp").await;
    create_docs(
        &client,
        "examples/routing/appmesh-colorapp.yaml",
        &[],
        Some("colorapp"),
    )
    .await;
    create_docs(
        &client,
        "examples/appmesh-colorapp-traffic.yaml",
        &[],
        Some("colorapp"),
    )
    .await;
    let traffic_canary: Canary = Api::namespaced(client.clone(), "colorapp")
        .get("colorteller")
        .await
        .unwrap();
    let routers_api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "colorapp",
        &resource(
            "appmesh.k8s.aws",
            "v1beta2",
            "VirtualRouter",
            "virtualrouters",
        ),
    );
    let before = routers_api.get("colorteller-router").await.unwrap();
    router.prepare(&traffic_canary).await.unwrap();
    router
        .set_weights(&traffic_canary, Weights::STABLE, Weights::with_canary(10))
        .await
        .unwrap();
    let after = routers_api.get("colorteller-router").await.unwrap();
    let route = |o: &DynamicObject, i: usize| o.data["spec"]["routes"][i].clone();
    assert_eq!(
        route(&after, 0)["httpRoute"]["retryPolicy"],
        route(&before, 0)["httpRoute"]["retryPolicy"]
    );
    assert_eq!(
        route(&after, 1),
        route(&before, 1),
        "the header route stays"
    );
    assert_eq!(
        route(&after, 0)["httpRoute"]["action"]["weightedTargets"][1]["weight"],
        10
    );

    // Gloo: the seed's UpstreamGroup (the gateway.solo.io VirtualService is not needed).
    create_docs(
        &client,
        "examples/routing/gloo-upstreamgroup.yaml",
        &["VirtualService"],
        None,
    )
    .await;
    create_docs(&client, "examples/gloo-upstreamgroup.yaml", &[], None).await;
    let gloo_canary: Canary = Api::namespaced(client.clone(), "gloo-system")
        .get("colorgateway")
        .await
        .unwrap();
    let gloo = GlooEdgeRouter::new(client.clone());
    gloo.prepare(&gloo_canary).await.unwrap();
    gloo.set_weights(&gloo_canary, Weights::STABLE, Weights::with_canary(20))
        .await
        .unwrap();
    assert_eq!(
        gloo.weights(&gloo_canary).await.unwrap(),
        Weights::with_canary(20)
    );
    let groups: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "gloo-system",
        &resource("gloo.solo.io", "v1", "UpstreamGroup", "upstreamgroups"),
    );
    let ug = groups.get("upstreamgroup-gateway").await.unwrap();
    assert_eq!(ug.data["spec"]["destinations"][1]["weight"], 20);
    assert_eq!(
        ug.data["spec"]["destinations"][1]["destination"]["upstream"]["name"],
        "appmesh-demo-colorgatewayv2-9080"
    );
}

/// A route weight outside 0..=100 is refused by the demo's VirtualRouter definition, as by
/// the real one.
#[tokio::test]
async fn demo_kinds_enforce_weight_bounds() {
    let server = ApiServer::start(Options::default()).await.unwrap();
    serin::demo::kinds::register(&server).unwrap();
    let client = server.client().unwrap();
    namespace(&client, "appmesh-demo").await;
    let bad = json!({"apiVersion": "appmesh.k8s.aws/v1beta2", "kind": "VirtualRouter",
        "metadata": {"name": "x", "namespace": "appmesh-demo"},
        "spec": {"routes": [{"name": "r", "httpRoute": {"match": {"prefix": "/"},
            "action": {"weightedTargets": [{"virtualNodeRef": {"name": "a"}, "weight": 101}]}}}]}});
    let err = serin::demo::create(&client, &bad).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("less than or equal to 100"),
        "{err:#}"
    );
}
