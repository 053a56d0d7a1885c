//! The real `kubectl` binary against the embedded API server.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kube_sandbox::{ApiServer, Options};

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.dev}
spec:
  group: example.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, maximum: 10}
"#;

const WIDGET: &str = "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w1, labels: {tier: front}}\nspec: {size: 3}\n";

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {tier: back}}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: app, image: "app:1", env: [{name: A, value: "1"}]}
      - {name: sidecar, image: "side:1"}
"#;

struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
    dir: tempfile::TempDir,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn new(server: &ApiServer) -> Option<Self> {
        if Command::new("kubectl")
            .arg("version")
            .arg("--client")
            .output()
            .is_err()
        {
            eprintln!("NOTICE: kubectl is not on PATH; skipping the kubectl tests");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let cache = dir.path().join("cache");
        Some(Self {
            kubeconfig,
            cache,
            dir,
        })
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write manifest");
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Out {
        let mut cmd = self.command(args);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .expect("kubectl runs");
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        out.stdout
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// kubectl applies a CRD and an object, prints columns, re-applies without change and rejects unknown fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_crd_and_custom_object() {
    let server = ApiServer::start(Options::default()).await.expect("server");
    let Some(k) = Kubectl::new(&server) else {
        return;
    };
    let crd = k.file("crd.yaml", CRD);
    k.ok(&["apply", "-f", path(&crd)]).await;
    k.ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=10s",
        "crd/widgets.example.dev",
    ])
    .await;
    let widget = k.file("w.yaml", WIDGET);
    assert!(
        k.ok(&["apply", "-f", path(&widget)])
            .await
            .contains("widget.example.dev/w1 created")
    );
    let rv1 = k
        .ok(&[
            "get",
            "widget",
            "w1",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .await;
    assert!(
        k.ok(&["apply", "-f", path(&widget)])
            .await
            .contains("unchanged")
    );
    let rv2 = k
        .ok(&[
            "get",
            "wdg",
            "w1",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .await;
    assert_eq!(
        rv1, rv2,
        "re-applying an unchanged manifest keeps the resourceVersion"
    );

    let yaml = k.ok(&["get", "widgets", "w1", "-o", "yaml"]).await;
    assert!(
        yaml.contains("size: 3") && yaml.contains("generation: 1"),
        "{yaml}"
    );
    let table = k.ok(&["get", "widgets"]).await;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "SIZE", "AGE"], "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("w1") && l.contains(" 3 ")),
        "{table}"
    );

    let typo = k.file("typo.yaml", "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {size: 1, colour: red}\n");
    let out = k.run(&["apply", "-f", path(&typo)]).await;
    assert!(
        !out.ok && out.stderr.contains("unknown field \"spec.colour\""),
        "{}",
        out.stderr
    );
    let big = k.file(
        "big.yaml",
        "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w3}\nspec: {size: 11}\n",
    );
    let out = k.run(&["apply", "-f", path(&big)]).await;
    assert!(
        !out.ok && out.stderr.contains("spec.size: Invalid value: 11"),
        "{}",
        out.stderr
    );
    let ssa = k
        .ok(&[
            "apply",
            "--server-side",
            "-f",
            path(&typo.with_file_name("w.yaml")),
        ])
        .await;
    assert!(ssa.contains("serverside-applied"), "{ssa}");
}

/// kubectl patches a Deployment with merge, JSON and strategic patches and selects by label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_patch_types_and_selectors() {
    let server = ApiServer::start(Options::default()).await.expect("server");
    let Some(k) = Kubectl::new(&server) else {
        return;
    };
    let dep = k.file("dep.yaml", DEPLOYMENT);
    k.ok(&["apply", "-f", path(&dep)]).await;
    k.ok(&[
        "patch",
        "deployment",
        "web",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":3}}"#,
    ])
    .await;
    k.ok(&[
        "patch",
        "deployment",
        "web",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/template/spec/containers/1/image","value":"side:2"}]"#,
    ])
    .await;
    k.ok(&[
        "patch",
        "deployment",
        "web",
        "--type",
        "strategic",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"app","image":"app:2"}]}}}}"#,
    ])
    .await;
    let images = k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[*].image} {.metadata.generation}"]).await;
    assert_eq!(images, "3 app:2 side:2 4");
    let out = k
        .run(&[
            "patch",
            "deployment",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        ])
        .await;
    assert!(!out.ok, "a failed test op must fail: {}", out.stdout);
    k.ok(&["scale", "deployment", "web", "--replicas", "5"])
        .await;
    assert_eq!(
        k.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "5"
    );

    let cm = k.file("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: front, labels: {tier: front}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: back, labels: {tier: back}}\n");
    k.ok(&["apply", "-f", path(&cm)]).await;
    assert_eq!(
        k.ok(&["get", "cm", "-l", "tier=front", "-o", "name"])
            .await
            .trim(),
        "configmap/front"
    );
    assert_eq!(
        k.ok(&["get", "cm,deploy", "-l", "tier!=front", "-o", "name"])
            .await
            .trim(),
        "configmap/back\ndeployment.apps/web"
    );
    assert_eq!(
        k.ok(&["get", "cm", "-l", "tier in (back)", "-o", "name"])
            .await
            .trim(),
        "configmap/back"
    );

    let stale = k.ok(&["get", "cm", "front", "-o", "json"]).await;
    k.ok(&["label", "cm", "front", "x=y"]).await;
    let stale = k.file("stale.json", &stale);
    let out = k.run(&["replace", "-f", path(&stale)]).await;
    assert!(
        !out.ok && out.stderr.contains("the object has been modified"),
        "{}",
        out.stderr
    );
}

/// `kubectl get -w` prints existing objects and then new ones as they are created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_streams_changes() {
    let server = ApiServer::start(Options::default()).await.expect("server");
    let Some(k) = Kubectl::new(&server) else {
        return;
    };
    let first = k.file(
        "a.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: first}\n",
    );
    k.ok(&["apply", "-f", path(&first)]).await;
    let mut child = k
        .command(&["get", "cm", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str, lines: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lines.iter().any(|l| l.starts_with(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => return false,
            }
        }
        true
    };
    let mut lines = Vec::new();
    let saw_first = tokio::task::block_in_place(|| wait_for("first", &mut lines));
    let second = k.file(
        "b.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: second}\n",
    );
    k.ok(&["apply", "-f", path(&second)]).await;
    let saw_second = tokio::task::block_in_place(|| wait_for("second", &mut lines));
    let _ = child.kill();
    let _ = child.wait();
    assert!(saw_first && saw_second, "kubectl get -w printed: {lines:?}");
    assert!(lines[0].starts_with("NAME"), "{lines:?}");
}

/// `kubectl delete` of an object with a finalizer leaves it terminating until the finalizer is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_waits_for_finalizer() {
    let server = ApiServer::start(Options::default()).await.expect("server");
    let Some(k) = Kubectl::new(&server) else {
        return;
    };
    let cm = k.file(
        "f.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, finalizers: [example.dev/hold]}\n",
    );
    k.ok(&["apply", "-f", path(&cm)]).await;
    k.ok(&["delete", "cm", "held", "--wait=false"]).await;
    let ts = k
        .ok(&[
            "get",
            "cm",
            "held",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ])
        .await;
    assert!(
        !ts.is_empty(),
        "deletionTimestamp set while the finalizer remains"
    );
    k.ok(&[
        "patch",
        "cm",
        "held",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .await;
    let out = k.run(&["get", "cm", "held"]).await;
    assert!(
        !out.ok && out.stderr.contains("configmaps \"held\" not found"),
        "{}",
        out.stderr
    );
}

/// Imperative `kubectl create namespace|configmap|secret` (protobuf request bodies) work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_imperative_protobuf() {
    let server = ApiServer::start(Options::default()).await.expect("server");
    let Some(k) = Kubectl::new(&server) else {
        return;
    };
    k.ok(&["create", "namespace", "demo"]).await;
    k.ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "demo",
        "--from-literal=a=b",
    ])
    .await;
    k.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "demo",
        "--from-literal=p=hunter2",
    ])
    .await;
    let data = k
        .ok(&["get", "cm", "c", "-n", "demo", "-o", "jsonpath={.data.a}"])
        .await;
    let secret = k
        .ok(&[
            "get",
            "secret",
            "s",
            "-n",
            "demo",
            "-o",
            "jsonpath={.data.p}",
        ])
        .await;
    assert_eq!((data.as_str(), secret.as_str()), ("b", "aHVudGVyMg=="));
    let out = k.run(&["create", "configmap", "c", "-n", "missing"]).await;
    assert!(
        !out.ok && out.stderr.contains("namespaces \"missing\" not found"),
        "{}",
        out.stderr
    );
}
