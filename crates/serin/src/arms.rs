//! The words every part of Serin shares: the two arms of a Canary, the weights between them,
//! and the one rule that names them. Rollout, routers, metric presets, the view and the
//! traffic simulator import these; nothing else builds a `-primary` or `-canary` name.
//!
//! Naming:
//! - **Workload mode** (`spec.targetRef`): the user's Deployment `<target>` is the canary
//!   (its pods keep the `app` label `<target>`); Serin runs the stable version as
//!   `<target>-primary` (pods relabelled `<target>-primary`). The Services are `<service>`
//!   (clients use it; it selects the primary), `<service>-primary` and `<service>-canary`,
//!   where `<service>` is `spec.service.name`, else the target.
//! - **Traffic mode** (`spec.backends`): the two backends the user names are both the arms'
//!   workloads and their Services.
//!
//! Where each arm's traffic goes in a data plane (a VirtualNode, a Gloo upstream, a backend
//! Service) is a router's business: the router resolves it as [`DataPlaneArms`], and metric
//! presets name series from that value only, so a verdict is always about the series the
//! weights move.
//!
//! This module does no I/O.

use crate::api::{Canary, CanarySpec};

/// One of the two arms of a Canary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arm {
    /// The stable version.
    Primary,
    /// The new version under analysis.
    Canary,
}

impl Arm {
    /// Both arms, primary first.
    pub const BOTH: [Arm; 2] = [Arm::Primary, Arm::Canary];

    /// `primary` or `canary`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Primary => "primary",
            Arm::Canary => "canary",
        }
    }
}

/// A value per arm.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerArm<T> {
    /// The stable arm's.
    pub primary: T,
    /// The new arm's.
    pub canary: T,
}

impl<T> PerArm<T> {
    /// The value of `arm`.
    pub fn get(&self, arm: Arm) -> &T {
        match arm {
            Arm::Primary => &self.primary,
            Arm::Canary => &self.canary,
        }
    }
}

impl<T> From<PerArm<T>> for (T, T) {
    fn from(p: PerArm<T>) -> (T, T) {
        (p.primary, p.canary)
    }
}

/// Traffic weights of the primary and the canary. They always sum to 100: the only
/// constructor takes the canary's share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Weights {
    primary: u8,
    canary: u8,
}

impl Weights {
    /// All traffic on the primary.
    pub const STABLE: Weights = Weights {
        primary: 100,
        canary: 0,
    };

    /// `canary` percent on the canary (clamped to 100), the rest on the primary.
    pub fn with_canary(canary: u8) -> Self {
        let canary = canary.min(100);
        Weights {
            primary: 100 - canary,
            canary,
        }
    }

    /// The primary's share, in percent.
    pub fn primary(self) -> u8 {
        self.primary
    }

    /// The canary's share, in percent.
    pub fn canary(self) -> u8 {
        self.canary
    }

    /// The share of `arm`, in percent.
    pub fn of(self, arm: Arm) -> u8 {
        match arm {
            Arm::Primary => self.primary,
            Arm::Canary => self.canary,
        }
    }
}

/// The name of the primary counterpart of `base`: the Deployment `<target>-primary`, the
/// Service `<service>-primary`, or a pod label value.
pub fn primary_name(base: &str) -> String {
    format!("{base}-primary")
}

/// The name of the canary counterpart of `base`: the Service `<service>-canary` or the
/// VirtualNode `<target>-canary`.
pub fn canary_name(base: &str) -> String {
    format!("{base}-canary")
}

/// The names of a Canary's arms, from its spec alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArmNames {
    /// `spec.targetRef.name` in workload mode; `spec.service.name`, else the Canary's name,
    /// in traffic mode.
    pub target: String,
    /// The stable arm: `<target>-primary` in workload mode, `backends.primary` in traffic
    /// mode. App Mesh names its VirtualNodes after the arms.
    pub primary: String,
    /// The new arm: `<target>-canary` in workload mode, `backends.canary` in traffic mode.
    pub canary: String,
    /// The Service in front of both: `service.name`, else the target's (or Canary's) name.
    pub service: String,
    /// Whether the Canary is in traffic mode (`spec.backends`).
    pub traffic_mode: bool,
}

impl ArmNames {
    /// The arm names of `canary`.
    pub fn of(canary: &Canary) -> ArmNames {
        ArmNames::from_spec(
            canary.metadata.name.as_deref().unwrap_or_default(),
            &canary.spec,
        )
    }

    /// The arm names of the Canary called `name` with `spec`.
    pub fn from_spec(name: &str, spec: &CanarySpec) -> ArmNames {
        let base = spec
            .target_ref
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_else(|| name.to_string());
        let service = spec.service.name.clone().unwrap_or_else(|| base.clone());
        let target = match (&spec.target_ref, &spec.service.name) {
            (Some(t), _) => t.name.clone(),
            (None, Some(s)) => s.clone(),
            (None, None) => name.to_string(),
        };
        match &spec.backends {
            Some(b) => ArmNames {
                target,
                primary: b.primary.clone(),
                canary: b.canary.clone(),
                service,
                traffic_mode: true,
            },
            None => ArmNames {
                target,
                primary: primary_name(&base),
                canary: canary_name(&base),
                service,
                traffic_mode: false,
            },
        }
    }

    /// The name of `arm`.
    pub fn get(&self, arm: Arm) -> &str {
        match arm {
            Arm::Primary => &self.primary,
            Arm::Canary => &self.canary,
        }
    }

    /// The Services of the two arms: `<service>-primary` and `<service>-canary` in workload
    /// mode, `spec.backends` in traffic mode. Gateway API backendRefs and Gloo upstreams
    /// name these; App Mesh VirtualNodes resolve them by DNS.
    pub fn services(&self) -> PerArm<String> {
        if self.traffic_mode {
            PerArm {
                primary: self.primary.clone(),
                canary: self.canary.clone(),
            }
        } else {
            PerArm {
                primary: primary_name(&self.service),
                canary: canary_name(&self.service),
            }
        }
    }

    /// The `app` label of each arm's pods. In workload mode the canary's pods are the
    /// target's (`app: <target>`) and the primary's are relabelled `<target>-primary`; in
    /// traffic mode the backends are named after their pods' `app`.
    pub fn pod_apps(&self) -> PerArm<String> {
        PerArm {
            primary: self.primary.clone(),
            canary: if self.traffic_mode {
                self.canary.clone()
            } else {
                self.target.clone()
            },
        }
    }
}

/// What an arm is called in a data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPlaneArm {
    /// The object that receives the arm's traffic: a VirtualNode, a Gloo upstream, or a
    /// backend Service.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

/// Where a router sends each arm's traffic, as its data plane names it: the one value metric
/// presets name series from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPlaneArms {
    /// Which kind of object the names are: `VirtualNode`, `Upstream` or `Service`.
    pub kind: &'static str,
    /// The stable arm.
    pub primary: DataPlaneArm,
    /// The new arm.
    pub canary: DataPlaneArm,
    /// The `app` label of each arm's pods (for metrics that carry pod labels, such as the
    /// CloudWatch agent's).
    pub pod_apps: PerArm<String>,
}

impl DataPlaneArms {
    /// The data-plane name of `arm`.
    pub fn get(&self, arm: Arm) -> &DataPlaneArm {
        match arm {
            Arm::Primary => &self.primary,
            Arm::Canary => &self.canary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> CanarySpec {
        serde_norway::from_str(yaml).unwrap()
    }

    /// Workload mode names the primary after the target and the arm Services after the
    /// user-facing Service.
    #[test]
    fn workload_mode_names() {
        let s = spec(
            "targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}\nservice: {port: 9898, name: web}\nrouter: {gatewayApi: {httpRoute: {name: r}}}\nanalysis: {metrics: []}\n",
        );
        let n = ArmNames::from_spec("c", &s);
        assert_eq!(
            (n.primary.as_str(), n.canary.as_str(), n.service.as_str()),
            ("podinfo-primary", "podinfo-canary", "web")
        );
        assert_eq!(n.services().primary, "web-primary");
        assert_eq!(n.services().canary, "web-canary");
        assert_eq!(n.pod_apps().canary, "podinfo");
        assert_eq!(n.pod_apps().primary, "podinfo-primary");
    }

    /// Traffic mode takes both arms from `spec.backends`, for workloads and Services alike.
    #[test]
    fn traffic_mode_names() {
        let s = spec(
            "backends: {primary: blue, canary: green}\nservice: {port: 80}\nrouter: {gatewayApi: {httpRoute: {name: r}}}\nanalysis: {metrics: []}\n",
        );
        let n = ArmNames::from_spec("shop", &s);
        assert_eq!((n.primary.as_str(), n.canary.as_str()), ("blue", "green"));
        assert_eq!(
            n.services(),
            PerArm {
                primary: "blue".into(),
                canary: "green".into()
            }
        );
        assert_eq!(n.pod_apps().canary, "green");
        assert_eq!(n.target, "shop");
    }

    /// Weights always sum to 100 and clamp the canary's share.
    #[test]
    fn weights_sum_to_100() {
        for c in [0u8, 1, 50, 99, 100, 101, 255] {
            let w = Weights::with_canary(c);
            assert_eq!(u16::from(w.primary()) + u16::from(w.canary()), 100);
            assert_eq!(w.of(Arm::Canary), c.min(100));
        }
    }
}
