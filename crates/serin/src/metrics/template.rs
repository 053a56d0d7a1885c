//! Query templates: `{{ namespace }}`, `{{ canary }}`, `{{ interval }}`, `{{ variables.X }}`...
//!
//! Validation (`api::validate`) already rejects unknown variables; rendering repeats the check
//! so that a Canary that slipped past validation fails with a clear message instead of sending
//! a query with a literal `{{ }}` in it.

use std::collections::BTreeMap;
use std::time::Duration;

use super::CanaryContext;

/// The values a template may refer to.
#[derive(Clone, Debug, PartialEq)]
pub struct Vars {
    values: BTreeMap<String, String>,
}

impl Vars {
    /// The variables of `canary` for a query window of `window`.
    pub fn new(canary: &CanaryContext, window: Duration) -> Self {
        let mut values = BTreeMap::new();
        values.insert("namespace".to_string(), canary.namespace.clone());
        values.insert("name".to_string(), canary.name.clone());
        values.insert("target".to_string(), canary.names.target.clone());
        values.insert("primary".to_string(), canary.names.primary.clone());
        values.insert("canary".to_string(), canary.names.canary.clone());
        values.insert("service".to_string(), canary.names.service.clone());
        values.insert("interval".to_string(), promql_duration(window));
        for (k, v) in &canary.spec.analysis.variables {
            values.insert(format!("variables.{k}"), v.clone());
        }
        Vars { values }
    }

    /// The value of one variable.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Replaces every `{{ name }}` in `template`.
    pub fn render(&self, template: &str) -> Result<String, String> {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(format!(
                    "template {template:?} has a '{{{{' without a closing '}}}}'"
                ));
            };
            let name = after[..end].trim();
            match self.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    return Err(format!(
                        "template {template:?} uses unknown variable {{{{ {name} }}}}; use one of \
                         {}, or variables.NAME defined in spec.analysis.variables",
                        crate::api::TEMPLATE_VARIABLES.join(", ")
                    ));
                }
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// A duration as PromQL writes it: `1m`, `90s`, `2h`. Sub-second parts are dropped; zero
/// becomes `1s` so that a range selector stays valid.
pub fn promql_duration(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PromQL durations use the largest whole unit and never drop below one second.
    #[test]
    fn durations() {
        assert_eq!(promql_duration(Duration::from_secs(60)), "1m");
        assert_eq!(promql_duration(Duration::from_secs(90)), "90s");
        assert_eq!(promql_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(promql_duration(Duration::from_secs(150)), "150s");
        assert_eq!(promql_duration(Duration::from_millis(10)), "1s");
    }
}
