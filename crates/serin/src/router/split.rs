//! The weight arithmetic every router shares: turning a data plane's (relative) weights into
//! percent, and deciding whether a write is needed, allowed or refused.

use crate::arms::Weights;

use super::RouterError;

/// Which object a decision is about, for error messages.
#[derive(Clone, Debug)]
pub(crate) struct Subject {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl Subject {
    pub fn new(kind: &'static str, namespace: &str, name: &str) -> Self {
        Subject {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    pub fn unroutable(&self, reason: impl Into<String>) -> RouterError {
        RouterError::Unroutable {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    pub fn not_found(&self, hint: impl Into<String>) -> RouterError {
        RouterError::NotFound {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            hint: hint.into(),
        }
    }

    pub fn conflict(&self) -> RouterError {
        RouterError::Conflict {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    pub fn kube(&self, operation: &'static str, source: kube::Error) -> RouterError {
        RouterError::Kube {
            operation,
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        }
    }
}

/// Converts relative weights (App Mesh, Gloo and Gateway API all treat weights as relative)
/// to percent. The canary's share is rounded to the nearest percent, halves up, and the
/// primary gets the rest, so the result always sums to 100. `None` when both are zero (no
/// traffic is routed at all, which Serin cannot express).
pub fn to_percent(primary: u64, canary: u64) -> Option<Weights> {
    let total = u128::from(primary) + u128::from(canary);
    if total == 0 {
        return None;
    }
    let pct = (u128::from(canary) * 100 + total / 2) / total;
    Some(Weights::with_canary(u8::try_from(pct).unwrap_or(100)))
}

/// What `set_weights` must do after reading the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The desired weights are there already.
    Nothing,
    /// The object holds the expected weights: write the desired ones.
    Write,
}

/// Decides between "already done", "write" and "someone else changed it". `expected: None`
/// overwrites whatever is there (used by `finalize`).
pub(crate) fn plan(
    subject: &Subject,
    found: Weights,
    expected: Option<Weights>,
    desired: Weights,
) -> Result<Plan, RouterError> {
    if found == desired {
        return Ok(Plan::Nothing);
    }
    match expected {
        Some(expected) if expected != found => Err(RouterError::WeightsChanged {
            kind: subject.kind,
            namespace: subject.namespace.clone(),
            name: subject.name.clone(),
            found_primary: u32::from(found.primary()),
            found_canary: u32::from(found.canary()),
            expected_canary: expected.canary(),
        }),
        _ => Ok(Plan::Write),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Relative weights become percentages that sum to 100, with halves rounded up.
    #[test]
    fn percent_rounding() {
        assert_eq!(to_percent(100, 0), Some(Weights::STABLE));
        assert_eq!(to_percent(4, 1), Some(Weights::with_canary(20)));
        assert_eq!(to_percent(2, 1), Some(Weights::with_canary(33)));
        assert_eq!(to_percent(1, 2), Some(Weights::with_canary(67)));
        assert_eq!(to_percent(199, 1), Some(Weights::with_canary(1)));
        assert_eq!(to_percent(201, 1), Some(Weights::with_canary(0)));
        assert_eq!(to_percent(0, 0), None);
        assert_eq!(
            to_percent(u64::from(u32::MAX), u64::from(u32::MAX)),
            Some(Weights::with_canary(50))
        );
    }

    /// A plan writes only from the expected weights, does nothing when the desired ones are
    /// there, and reports anything else as changed by someone else.
    #[test]
    fn plan_decisions() {
        let s = Subject::new("VirtualRouter", "ns", "vr");
        let (w20, w50) = (Weights::with_canary(20), Weights::with_canary(50));
        assert_eq!(plan(&s, w50, Some(w20), w50).ok(), Some(Plan::Nothing));
        assert_eq!(plan(&s, w20, Some(w20), w50).ok(), Some(Plan::Write));
        assert!(matches!(
            plan(&s, Weights::with_canary(30), Some(w20), w50),
            Err(RouterError::WeightsChanged {
                found_canary: 30,
                expected_canary: 20,
                ..
            })
        ));
        assert_eq!(
            plan(&s, Weights::with_canary(30), None, Weights::STABLE).ok(),
            Some(Plan::Write)
        );
    }

    proptest! {
        /// Any pair of relative weights with a non-zero total normalises to weights summing
        /// to 100 that are within half a percent of the exact share.
        #[test]
        fn percent_is_close(p in 0u64..=u64::from(u32::MAX), c in 0u64..=u64::from(u32::MAX)) {
            prop_assume!(p + c > 0);
            let w = to_percent(p, c).unwrap();
            prop_assert_eq!(u32::from(w.primary()) + u32::from(w.canary()), 100);
            let exact = c as f64 * 100.0 / (p + c) as f64;
            prop_assert!((f64::from(w.canary()) - exact).abs() <= 0.5 + 1e-9);
        }
    }
}
