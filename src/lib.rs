//! Serin: a progressive-delivery (canary) operator for Kubernetes.
//!
//! Data flows one way: observe → decide → act → record. See `DESIGN.md` in the team's shared
//! folder and `docs/` in this repository.
#![forbid(unsafe_code)]

pub mod analysis;
pub mod api;
pub mod controller;
pub mod demo;
pub mod embedded;
pub mod metrics;
pub mod rollout;
pub mod router;
