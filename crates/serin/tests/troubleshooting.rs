//! docs/troubleshooting.md explains every condition reason and Event reason Serin emits,
//! and lists nothing Serin does not emit. The reasons are read from the source, so a new
//! reason without an entry fails here: the `reasons` modules' constants, the error
//! categories (`Ready=False` and a Warning Event when the user must act, else
//! `serin_reconcile_errors_total{category}`), every literal reason of a condition or an
//! Event, and the reasons taken from a phase (`Ready`) or a rollout result (`Promoted`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use regex_lite::Regex;
use serin::api::{Phase, RolloutResult};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every reason the operator's source emits (tests, the demo and benchmarks excluded).
fn emitted() -> BTreeSet<String> {
    let mut files = Vec::new();
    sources(&root().join("crates/serin/src"), &mut files);
    let reasons_mod = Regex::new(r"(?s)pub mod reasons \{(.*?)\n\}").unwrap();
    let constant = Regex::new(r#"pub const \w+: &str = "(\w+)";"#).unwrap();
    let category = Regex::new(r"(?s)fn category\(&self\) -> &'static str \{(.*?)\n    \}").unwrap();
    let arm = Regex::new(r#"=> "([A-Z]\w+)""#).unwrap();
    let literals = [
        // self.condition(api::READY, ConditionStatus::False, "Reason", ...)
        Regex::new(r#"condition\(\s*api::\w+,\s*ConditionStatus::\w+,\s*"(\w+)""#).unwrap(),
        // publish(ctx, &reference, EventType::Warning, "Reason", ...)
        Regex::new(r#"EventType::(?:Warning|Normal),\s*"(\w+)""#).unwrap(),
        // A condition written as JSON.
        Regex::new(r#""reason":\s*"(\w+)""#).unwrap(),
    ];
    let mut out = BTreeSet::new();
    for f in files {
        let rel = f
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if ["/demo/", "/bench/", "/bin/", "tests.rs"]
            .iter()
            .any(|x| rel.contains(x))
        {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests sit at the end of a file, after #[cfg(test)].
        let text = text.split("#[cfg(test)]").next().unwrap();
        for m in reasons_mod.captures_iter(text) {
            out.extend(constant.captures_iter(&m[1]).map(|c| c[1].to_string()));
        }
        for m in category.captures_iter(text) {
            out.extend(arm.captures_iter(&m[1]).map(|c| c[1].to_string()));
        }
        for re in &literals {
            out.extend(re.captures_iter(text).map(|c| c[1].to_string()));
        }
    }
    out.extend(Phase::ALL.iter().map(|p| p.as_str().to_string()));
    out.extend(RolloutResult::ALL.iter().map(|r| r.as_str().to_string()));
    out
}

/// The reasons the page explains: the first cell of each table row, in backticks.
fn documented() -> BTreeSet<String> {
    let page = std::fs::read_to_string(root().join("docs/troubleshooting.md")).unwrap();
    let row = Regex::new(r"(?m)^\| `(\w+)` \|").unwrap();
    row.captures_iter(&page).map(|c| c[1].to_string()).collect()
}

#[test]
fn every_reason_is_explained() {
    let emitted = emitted();
    // The scan itself works: reasons of each source it reads are found.
    for known in [
        "RolledBack",            // rollout::reasons
        "Reverted",              // deletion reasons
        "TargetNotFound",        // controller error category
        "RoutingObjectNotFound", // router error category
        "InvalidSpec",           // a literal condition reason
        "InvalidShardLabel",     // a literal Event reason and a JSON condition
        "SpecValid",             // the Invalid condition when all is well
        "Waiting",               // a phase, as the Ready reason
        "Aborted",               // a rollout result, as the Promoted reason
    ] {
        assert!(
            emitted.contains(known),
            "the scan missed {known}: {emitted:?}"
        );
    }
    assert!(
        emitted.len() >= 45,
        "{} reasons: {emitted:?}",
        emitted.len()
    );
    let documented = documented();
    let missing: Vec<_> = emitted.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&emitted).collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md does not explain {missing:?}: add a row `| `Reason` | ... |`"
    );
    assert!(
        stale.is_empty(),
        "docs/troubleshooting.md explains {stale:?}, which Serin no longer emits"
    );
}
