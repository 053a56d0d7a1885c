//! The Grafana dashboard (grafana/serin-dashboard.json) only uses metrics the operator
//! exports, and every panel query is valid PromQL for a real Prometheus.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use support::prometheus::TestPrometheus;

fn dashboard() -> Value {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("grafana/serin-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn queries(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_string());
        }
    }
    out.extend(annotations(d).into_iter().map(|(_, e)| e));
    out
}

/// The annotation queries: (name, expr).
fn annotations(d: &Value) -> Vec<(String, String)> {
    d["annotations"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A query's expression with Grafana's variables filled in as for "All".
fn filled(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$namespace", ".*")
        .replace("$canary", ".*")
}

/// An instant query at `time` (Unix seconds): the `data.result` array.
fn instant(prom: &TestPrometheus, expr: &str, time: i64) -> Vec<Value> {
    let port: u16 = prom.url.rsplit(':').next().unwrap().parse().unwrap();
    let response = support::e2e::http_get(
        port,
        &format!("/api/v1/query?query={}&time={time}", encode(expr)),
    );
    let json = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    let body: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    assert_eq!(body["status"], "success", "{expr}: {body}");
    body["data"]["result"].as_array().unwrap().clone()
}

/// The per-rollout table and the annotations read the records Serin exports, in a real
/// Prometheus: the table has one row per rollout in the history; the promotion annotation
/// marks the rollout that finished in the last minute, and neither marks one that finished
/// an hour ago.
#[test]
fn rollout_records_feed_the_history_table_and_the_annotations() {
    let now = chrono::Utc::now().timestamp();
    let at = |secs_ago: i64| {
        chrono::DateTime::from_timestamp(now - secs_ago, 0)
            .unwrap()
            .to_rfc3339()
    };
    let metrics = serin::controller::telemetry::Metrics::new(|_| {});
    let status: serin::api::CanaryStatus = serde_json::from_value(serde_json::json!({
        "phase": "Succeeded",
        "history": [
            {"revision": "web-v3", "startedAt": at(330), "finishedAt": at(30),
             "result": "Promoted", "reachedWeight": 100},
            {"revision": "web-v2", "startedAt": at(3900), "finishedAt": at(3600),
             "result": "RolledBack", "reachedWeight": 50}
        ]
    }))
    .unwrap();
    metrics.observe_status("shop", "web", &Default::default(), &status);
    let exposition = metrics.encode();
    let series: Vec<&str> = exposition
        .lines()
        .filter(|l| l.starts_with("serin_rollout_finished_timestamp_seconds{"))
        .collect();
    assert_eq!(series.len(), 2, "{exposition}");
    // Ten minutes of scrapes of those series, every 30 s, ending now.
    let mut openmetrics = String::from("# TYPE serin_rollout_finished_timestamp_seconds gauge\n");
    for s in &series {
        for t in (now - 600..=now).step_by(30) {
            openmetrics.push_str(&format!("{s} {t}\n"));
        }
    }
    openmetrics.push_str("# EOF\n");
    let prom = TestPrometheus::start(&openmetrics);

    let d = dashboard();
    let table = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Promotion history (per rollout)")
        .expect("the per-rollout panel");
    let rows = instant(
        &prom,
        &filled(table["targets"][0]["expr"].as_str().unwrap()),
        now,
    );
    let mut seen: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| {
            let m = &r["metric"];
            (
                m["revision"].as_str().unwrap().to_string(),
                m["result"].as_str().unwrap().to_string(),
                m["reached_weight"].as_str().unwrap().to_string(),
                r["value"][1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                "web-v2".into(),
                "RolledBack".into(),
                "50".into(),
                format!("{}", (now - 3600) * 1000)
            ),
            (
                "web-v3".into(),
                "Promoted".into(),
                "100".into(),
                format!("{}", (now - 30) * 1000)
            ),
        ]
    );

    let marks: Vec<(String, Vec<String>)> = annotations(&d)
        .into_iter()
        .map(|(name, expr)| {
            let revisions = instant(&prom, &filled(&expr), now)
                .iter()
                .map(|r| r["metric"]["revision"].as_str().unwrap().to_string())
                .collect();
            (name, revisions)
        })
        .collect();
    assert_eq!(
        marks,
        vec![
            ("Promotions".to_string(), vec!["web-v3".to_string()]),
            ("Rollbacks".to_string(), vec![]),
        ]
    );
}

/// Metric names (`serin_*`) a query uses, without histogram and counter suffixes.
fn names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("serin_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_total", "_bucket", "_count", "_sum"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        out.insert(name.to_string());
        rest = &tail[end..];
    }
    out
}

/// Every serin_* metric a panel or variable uses is in the operator's exposition.
#[test]
fn dashboard_uses_exported_metrics() {
    let provider = serin::metrics::ProviderMetrics::default();
    let registered = provider.clone();
    let metrics = serin::controller::telemetry::Metrics::new(move |r| registered.register(r));
    // Families without series are not described: give each one a sample, as a rollout would.
    provider.inc("prometheus", "success");
    metrics.reconcile_failed("KubernetesApiError");
    let after: serin::api::CanaryStatus = serde_json::from_value(serde_json::json!({
        "phase": "Succeeded",
        "canaryWeight": 0,
        "lastCheck": {"time": "2026-11-22T10:05:00Z", "verdict": "Pass",
                      "results": [{"metric": "error-rate", "value": 0.1, "verdict": "Pass"}]},
        "history": [{"revision": "r2", "startedAt": "2026-11-22T10:00:00Z",
                     "finishedAt": "2026-11-22T10:05:00Z", "result": "Promoted", "reachedWeight": 100}]
    }))
    .unwrap();
    metrics.observe_status("shop", "web", &Default::default(), &after);
    let exposition = metrics.encode();
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let d = dashboard();
    let mut used = BTreeSet::new();
    for q in queries(&d) {
        used.extend(names(&q));
    }
    assert!(used.len() >= 8, "{used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}; exported: {exported:?}"
    );
}

/// A real Prometheus accepts every panel query (Grafana's variables filled in).
#[test]
fn dashboard_queries_are_valid_promql() {
    let prom = TestPrometheus::start("# EOF\n");
    for q in queries(&dashboard()) {
        let expr = filled(&q);
        // label_values(...) is Grafana's, not PromQL: check the selector inside it.
        let expr = match expr.strip_prefix("label_values(") {
            Some(inner) => inner
                .rsplit_once(',')
                .map(|(s, _)| s.to_string())
                .unwrap_or(inner.to_string()),
            None => expr,
        };
        let port: u16 = prom.url.rsplit(':').next().unwrap().parse().unwrap();
        let response =
            support::e2e::http_get(port, &format!("/api/v1/query?query={}", encode(&expr)));
        let json = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or("");
        let body: Value = serde_json::from_str(json).unwrap_or(Value::Null);
        assert_eq!(body["status"], "success", "{expr}: {body}");
    }
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
