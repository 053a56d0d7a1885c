//! The `serin` binary as a user runs it: `crd`, `validate`, `version`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn serin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_serin"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(path)
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `serin crd` prints exactly the committed crds/serin.dev_canaries.yaml; regenerate it with
/// `cargo run -- crd > crds/serin.dev_canaries.yaml` when the API changes.
#[test]
fn committed_crd_is_fresh() {
    let out = serin().arg("crd").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let committed = std::fs::read_to_string(repo("crds/serin.dev_canaries.yaml")).unwrap();
    assert!(
        String::from_utf8(out.stdout).unwrap() == committed,
        "crds/serin.dev_canaries.yaml is stale: run `cargo run -- crd > crds/serin.dev_canaries.yaml`"
    );
}

/// The generated CRD is structural and carries the cross-field CEL rules.
#[test]
fn crd_has_schema_rules() {
    let crd: serde_json::Value = serde_norway::from_str(&serin::api::crd_yaml().unwrap()).unwrap();
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(v["subresources"]["status"], serde_json::json!({}));
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "cnry");
    let text = serde_json::to_string(&crd).unwrap();
    for rule in [
        "has(self.targetRef) != has(self.backends)",
        "self.isSorted()",
        "self[size(self) - 1] == 100",
        "[has(self.appMesh), has(self.appMeshApi), has(self.gloo), has(self.gatewayApi)].filter(x, x).size() == 1",
        "has(self.min) || has(self.max)",
    ] {
        assert!(text.contains(rule), "missing CEL rule {rule}");
    }
    // Structural schemas may not use anyOf/oneOf at the top of a property without types.
    assert!(!text.contains("\"oneOf\""), "oneOf in the schema");
}

/// Every example under examples/ passes `serin validate`.
#[test]
fn examples_are_valid() {
    let files = yaml_files("examples");
    assert!(files.len() >= 4, "expected the examples, found {files:?}");
    let out = serin().arg("validate").args(&files).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches(": valid (")
            .count(),
        files.len()
    );
}

/// Each broken manifest under tests/fixtures/invalid is rejected with exactly one message,
/// which names the field and says what is wrong (declared in the file's first two lines).
#[test]
fn invalid_manifests_get_one_clear_message_each() {
    let files = yaml_files("crates/serin/tests/fixtures/invalid");
    assert!(files.len() >= 10, "expected at least 10 broken manifests");
    let mut fields = std::collections::BTreeSet::new();
    for f in &files {
        let body = std::fs::read_to_string(f).unwrap();
        let expect = |key: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .unwrap_or_else(|| panic!("{} lacks '# {key}:'", f.display()))
                .to_string()
        };
        let (field, fragment) = (expect("expect-field"), expect("expect-message"));
        let out = serin().arg("validate").arg(f).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            f.display(),
            text(&out)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: expected one message, got {lines:#?}",
            f.display()
        );
        assert!(
            lines[0].contains(&format!(" {field}: ")),
            "{}: message does not name {field}: {}",
            f.display(),
            lines[0]
        );
        assert!(
            lines[0].contains(&fragment),
            "{}: {:?} not in {}",
            f.display(),
            fragment,
            lines[0]
        );
        fields.insert(field);
    }
    assert!(
        fields.len() >= 10,
        "fewer than 10 distinct fields: {fields:?}"
    );
}

/// `serin validate -` reads standard input, and reports every file of a mixed run.
#[test]
fn validate_reads_stdin_and_checks_every_file() {
    let good = std::fs::read_to_string(repo("examples/gloo-upstreamgroup.yaml")).unwrap();
    let mut child = serin()
        .args(["validate", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(good.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("<stdin>: valid (gloo-system/colorgateway)")
    );

    let bad = repo("crates/serin/tests/fixtures/invalid/two-routers.yaml");
    let out = serin()
        .arg("validate")
        .arg(repo("examples/gloo-upstreamgroup.yaml"))
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("gloo-upstreamgroup.yaml: valid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("spec.router: 2 routers are set"),
        "{stdout}"
    );
}

/// A file without any Canary, and a file with broken YAML, are errors too.
#[test]
fn validate_rejects_empty_and_unparsable_files() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(
        &empty,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: serin.dev/v1alpha1\nkind: Canary\nspec: [unclosed\n",
    )
    .unwrap();
    for (f, fragment) in [
        (&empty, "contains no Canary"),
        (&broken, "cannot be parsed"),
    ] {
        let out = serin().arg("validate").arg(f).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(fragment), "{}", text(&out));
    }
    let out = serin()
        .args(["validate", "/nonexistent/canary.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cannot read"));
}

/// `serin version` prints the crate version.
#[test]
fn version() {
    let out = serin().arg("version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("serin {}", env!("CARGO_PKG_VERSION"))
    );
}

/// The Gateway API example is the App Mesh workload example with only `spec.router` (and
/// the data plane's presets) changed: the migration path off App Mesh.
#[test]
fn gateway_api_example_differs_from_appmesh_only_in_router() {
    let load = |name: &str| -> serin::api::Canary {
        serde_norway::from_str(&std::fs::read_to_string(repo(&format!("examples/{name}"))).unwrap())
            .unwrap()
    };
    let appmesh = load("appmesh-workload.yaml");
    let mut gateway = load("gateway-api.yaml");
    assert!(gateway.spec.router.gateway_api.is_some());
    gateway.spec.router = appmesh.spec.router.clone();
    for m in &mut gateway.spec.analysis.metrics {
        m.preset = m.preset.map(|p| match p {
            serin::api::Preset::GatewayErrorRate => serin::api::Preset::AppmeshErrorRate,
            serin::api::Preset::GatewayLatencyP99 => serin::api::Preset::AppmeshLatencyP99,
            other => other,
        });
    }
    assert_eq!(gateway.spec, appmesh.spec);
}
