//! Durations as users write them (`interval`, `window`, `timeout`, `progressDeadline`):
//! parsed as Kubernetes durations, then through validation, the next check time, query
//! windows and CloudWatch periods.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    duration: &'a str,
    /// Which fields get it.
    fields: u8,
    now_ms: i64,
}

fuzz_target!(|input: Input<'_>| {
    // The parser every duration field of the spec deserializes with (kube-core's own
    // panics on `1m-1s` and on huge values; this one must not).
    let _ = serin::api::checked_duration::parse(input.duration);
    let mut spec = common::base_spec();
    let d = serde_json::Value::from(input.duration);
    if input.fields & 1 != 0 {
        spec["analysis"]["interval"] = d.clone();
    }
    if input.fields & 2 != 0 {
        spec["analysis"]["metrics"][0]["window"] = d.clone();
        spec["analysis"]["metrics"][1]["window"] = d.clone();
    }
    if input.fields & 4 != 0 {
        spec["analysis"]["metrics"][0]["provider"]["prometheus"]["timeout"] = d.clone();
    }
    if input.fields & 8 != 0 {
        spec["progressDeadline"] = d;
    }
    if let Ok(spec) = serde_json::from_value::<serin::api::CanarySpec>(spec) {
        common::derive_everything(&spec, common::time(input.now_ms));
    }
});
