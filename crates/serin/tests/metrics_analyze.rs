//! `serin analyze` against a real Prometheus: one evaluation, and a replay (backtest) that
//! promotes or rolls back.

mod support;

use std::process::Command;
use std::sync::OnceLock;

use chrono::{TimeZone, Utc};
use support::prometheus::{History, TestPrometheus};

struct Fixture {
    prometheus: TestPrometheus,
    base: i64,
    dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let base = (Utc::now().timestamp() - 2 * 3600) / 60 * 60;
        let mut h = History::default();
        let cluster = |arm: &str| format!("cds_egress_global_{arm}_shop_http_8080");
        // Canary: 0.5% errors; primary: 0.1%.
        h.counter(
            "envoy_cluster_upstream_rq",
            &format!(
                r#"envoy_cluster_name="{}",envoy_response_code="200""#,
                cluster("web-canary")
            ),
            19.9,
        );
        h.counter(
            "envoy_cluster_upstream_rq",
            &format!(
                r#"envoy_cluster_name="{}",envoy_response_code="503""#,
                cluster("web-canary")
            ),
            0.1,
        );
        h.counter(
            "envoy_cluster_upstream_rq",
            &format!(
                r#"envoy_cluster_name="{}",envoy_response_code="200""#,
                cluster("web-primary")
            ),
            39.96,
        );
        h.counter(
            "envoy_cluster_upstream_rq",
            &format!(
                r#"envoy_cluster_name="{}",envoy_response_code="503""#,
                cluster("web-primary")
            ),
            0.04,
        );
        let prometheus = TestPrometheus::start(&h.render(base, base + 1800, 10));
        Fixture {
            prometheus,
            base,
            dir: tempfile::tempdir().unwrap(),
        }
    })
}

/// The Canary `shop/web` with an error-rate bound `max`, judged by `judge` (`Sequential`
/// or `Threshold`).
fn manifest_judged(f: &Fixture, max: f64, judge: &str) -> std::path::PathBuf {
    let path = f.dir.path().join(format!("canary-{max}-{judge}.yaml"));
    let text = format!(
        r#"apiVersion: serin.dev/v1alpha1
kind: Canary
metadata: {{name: web, namespace: shop}}
spec:
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  service: {{port: 8080}}
  router: {{appMesh: {{mesh: global}}}}
  steps: [20, 50, 100]
  analysis:
    interval: 1m
    failureThreshold: 2
    metrics:
      - name: error-rate
        provider: {{prometheus: {{address: "{}"}}}}
        preset: appmesh-error-rate
        max: {max}
        minSampleSize: 100
        judge: {judge}
"#,
        f.prometheus.url
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// [`manifest_judged`] with the threshold judge.
fn manifest(f: &Fixture, max: f64) -> std::path::PathBuf {
    manifest_judged(f, max, "Threshold")
}

fn serin(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_serin"))
        .args(args)
        .output()
        .expect("run serin");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn at(f: &Fixture, offset: i64) -> String {
    Utc.timestamp_opt(f.base + offset, 0).unwrap().to_rfc3339()
}

/// One evaluation prints the rendered queries, the value with its sample size, the bound
/// and the verdict.
#[test]
fn analyze_once() {
    let f = fixture();
    let file = manifest(f, 1.0);
    let (ok, out) = serin(&["analyze", "-f", file.to_str().unwrap(), "--at", &at(f, 600)]);
    assert!(ok, "{out}");
    println!("{out}");
    assert!(out.contains(r#"query:   sum(increase(envoy_cluster_upstream_rq{envoy_cluster_name=~"cds_egress_.+_web-canary_shop_(http|http2|grpc)_[0-9]+",envoy_response_code=~"5.."}[1m]))"#), "{out}");
    assert!(out.contains("value:   0.5"), "{out}");
    assert!(out.contains("(sample size 1200)"), "{out}");
    assert!(out.contains("bound:   value <= 1"), "{out}");
    assert!(out.contains("verdict: Pass"), "{out}");
    assert!(out.contains("check verdict: Pass"), "{out}");
}

/// The threshold judge promotes this window (0.5% canary errors stay under max 1) in a
/// replay that advances 20 → 50.
#[test]
fn backtest_promotes() {
    let f = fixture();
    let file = manifest(f, 1.0);
    let (ok, out) = serin(&[
        "analyze",
        "-f",
        file.to_str().unwrap(),
        "--from",
        &at(f, 300),
        "--to",
        &at(f, 900),
        "--step",
        "30s",
    ]);
    assert!(ok, "{out}");
    println!("{out}");
    assert!(out.contains("outcome: Promoted"), "{out}");
    assert!(out.contains("   50%  Pass"), "{out}");
}

/// A replay against a bound the canary breaches rolls back after failureThreshold checks.
#[test]
fn backtest_rolls_back() {
    let f = fixture();
    let file = manifest(f, 0.2);
    let (ok, out) = serin(&[
        "analyze",
        "-f",
        file.to_str().unwrap(),
        "--from",
        &at(f, 300),
        "--to",
        &at(f, 900),
    ]);
    assert!(ok, "{out}");
    println!("{out}");
    assert!(out.contains("outcome: RolledBack"), "{out}");
    assert!(out.contains("0.500 Fail"), "{out}");
}

/// The sequential judge (the default) sees in the same window what the threshold judge
/// cannot: the canary fails five times as often as the primary (0.5% against 0.1%), under
/// the bound. The replay prints the e-value and the evidence at every look, waits for
/// evidence at the first check, and rolls back before the first step ends.
#[test]
fn backtest_sequential_catches_a_regression_under_the_bound() {
    let f = fixture();
    let file = manifest_judged(f, 1.0, "Sequential");
    let (ok, out) = serin(&[
        "analyze",
        "-f",
        file.to_str().unwrap(),
        "--from",
        &at(f, 300),
        "--to",
        &at(f, 900),
    ]);
    assert!(ok, "{out}");
    println!("{out}");
    assert!(out.contains("e-value "), "{out}");
    assert!(out.contains(" canary requests"), "{out}");
    assert!(out.contains("  Waiting "), "{out}");
    assert!(
        out.contains("outcome: RolledBack") && out.contains("(reached 20%)"),
        "{out}"
    );
    assert!(
        out.contains("the canary is worse than the primary"),
        "{out}"
    );
    assert!(
        out.contains("canary 0.5% (") && out.contains("primary 0.1% ("),
        "{out}"
    );
}

/// `serin analyze` once, on a sequential metric, shows each look of the last interval with
/// both arms' counts and the e-value after it.
#[test]
fn analyze_once_shows_the_looks() {
    let f = fixture();
    let file = manifest_judged(f, 1.0, "Sequential");
    let (ok, out) = serin(&["analyze", "-f", file.to_str().unwrap(), "--at", &at(f, 600)]);
    assert!(ok, "{out}");
    println!("{out}");
    assert!(
        out.contains("sequential judge (alpha 0.01, looks every 10s)"),
        "{out}"
    );
    // Six looks of 10 s in the minute: each 200 canary requests (1 bad) and 400 primary.
    assert_eq!(out.matches("  look ").count(), 6, "{out}");
    assert!(
        out.contains("primary 0.4/400 bad, canary 1/200 bad"),
        "{out}"
    );
    assert!(out.contains("evidence 1200 of "), "{out}");
}

/// An invalid Canary is refused with the validation messages, and nothing is queried.
#[test]
fn refuses_invalid_canary() {
    let f = fixture();
    let path = f.dir.path().join("invalid.yaml");
    let text = std::fs::read_to_string(manifest(f, 1.0))
        .unwrap()
        .replace("[20, 50, 100]", "[20, 50]");
    std::fs::write(&path, text).unwrap();
    let (ok, out) = serin(&["analyze", "-f", path.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("the last step must be 100") || out.contains("not 100"),
        "{out}"
    );
}
