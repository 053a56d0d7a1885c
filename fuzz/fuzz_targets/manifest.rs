//! `serin validate`'s path: YAML text → documents → Canary → validation messages, and then
//! what reconcile derives from each Canary that parsed.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let report = serin::api::check_manifests(text);
    for p in &report.problems {
        let _ = p.to_string();
    }
    // The operator reads the same objects from the API server as JSON.
    for doc in serde_norway::Deserializer::from_str(text).take(4) {
        let Ok(value) = <serde_json::Value as serde::Deserialize>::deserialize(doc) else {
            break;
        };
        if let Ok(canary) = serde_json::from_value::<serin::api::Canary>(value) {
            common::derive_everything(&canary.spec, chrono::Utc::now());
        }
    }
});
