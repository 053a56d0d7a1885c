//! Serin: a progressive-delivery (canary) operator for Kubernetes.
//!
//! Data flows one way: observe → decide → act → record. `docs/architecture.md` maps the
//! modules; `DESIGN.md` in the team's shared folder gives the shape agreed on.
//!
//! - [`arms`]: the shared vocabulary (the two arms, their weights and names);
//! - [`api`]: the Canary resource and its validation;
//! - [`rollout`] and [`analysis`]: pure decisions;
//! - [`metrics`]: metric providers; [`router`]: data planes;
//! - [`controller`]: the kube-runtime wiring that joins them; [`analyze`]: `serin analyze`;
//! - [`view`]: the terminal view of a rollout (the demo and the kubectl plugin);
//! - `demo` (feature `demo`): `serin demo` and its traffic simulator, on the in-memory API
//!   server of the `kube-sandbox` crate.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod analyze;
pub mod api;
pub mod arms;
pub mod bench;
pub mod bounded;
pub mod controller;
pub mod dashboard;
#[cfg(feature = "demo")]
pub mod demo;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod plugin;
pub mod policy;
pub mod rollout;
pub mod router;
pub mod view;
pub mod webhook;
