//! Query templates (`{{ namespace }}`, `{{ variables.X }}`...) with arbitrary variables, as
//! validation reads them and as the providers render them, and the PromQL scanner that
//! finds the selectors of the rendered query.
#![no_main]

mod common;

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serin::api::{Canary, CanarySpec, TEMPLATE_VARIABLES, template_variables};
use serin::metrics::template::{Vars, promql_duration};
use serin::metrics::{CanaryContext, freshness_query, promql_selectors};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    template: &'a str,
    variables: Vec<(&'a str, &'a str)>,
    namespace: &'a str,
    name: &'a str,
    window_ms: u64,
}

fuzz_target!(|input: Input<'_>| {
    let Ok(mut spec) = serde_json::from_value::<CanarySpec>(common::base_spec()) else {
        return;
    };
    for (k, v) in &input.variables {
        spec.analysis.variables.insert(k.to_string(), v.to_string());
    }
    let mut canary = Canary::new(input.name, spec.clone());
    canary.metadata.namespace = Some(input.namespace.to_string());
    let Ok(arms) = serin::router::data_plane_arms(&canary) else {
        return;
    };
    let ctx = CanaryContext::of(&canary, arms);
    let window = Duration::from_millis(input.window_ms);
    let _ = promql_duration(window);
    let vars = Vars::new(&ctx, window);
    let rendered = vars.render(input.template);
    // Validation and rendering agree: a template validation accepts always renders, and
    // one it rejects for syntax never does.
    match template_variables(input.template) {
        Ok(names) => {
            let known = names.iter().all(|n| {
                TEMPLATE_VARIABLES.contains(&n.as_str())
                    || n.strip_prefix("variables.")
                        .is_some_and(|k| spec.analysis.variables.contains_key(k))
            });
            assert_eq!(
                known,
                rendered.is_ok(),
                "{:?}: {rendered:?}",
                input.template
            );
        }
        Err(_) => assert!(rendered.is_err(), "{:?}", input.template),
    }
    for q in [Some(input.template), rendered.as_deref().ok()]
        .into_iter()
        .flatten()
    {
        let selectors = promql_selectors(q);
        assert!(selectors.iter().all(|s| !s.is_empty()));
        assert_eq!(freshness_query(q).is_some(), !selectors.is_empty());
    }
});
