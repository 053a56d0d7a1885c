//! Deleting a Canary: the service is made whole without Serin before the finalizer goes.
//!
//! Every Canary Serin acts on carries [`FINALIZER`](super::FINALIZER). When it is deleted,
//! each reconcile takes the next idempotent step of its `spec.deletionPolicy` from what it
//! reads (no state beyond the Canary's status), so a crash or a failover at any point
//! resumes correctly:
//!
//! 1. **Release** everything Serin created (the Services, `<target>-primary` and the
//!    copy of the target's autoscaler, the routing objects a router created): their ownerReference to the Canary is removed, so the
//!    garbage collector can never take the serving path away, whatever happens next.
//! 2. `Orphan` stops here: everything keeps serving as it was.
//! 3. `Revert`, traffic mode: all traffic moves to `backends.primary`.
//! 4. `Revert`, workload mode: the target Deployment is scaled back up to the primary's
//!    replicas and waited for until ready; then the user-facing Service selects the
//!    target's pods and the route sends all traffic to the target's arm (the canary arm,
//!    which is where the target's pods are); one reconcile later (the drain), the now idle
//!    `<target>-primary` is deleted, with its autoscaler. The target's pod template is never rewritten.
//!
//! A deletion never wedges: an invalid Canary, a missing target or routing object, a target
//! whose revision failed analysis, or a target that is not ready within
//! `spec.progressDeadline` of the deletion finish as `Orphan` (the primary keeps serving)
//! with a Warning Event that says why.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DeleteParams};
use kube::runtime::controller::Action as Requeue;
use kube::{Resource, ResourceExt};

use crate::api::{Canary, DeletionPolicy, Phase};
use crate::arms::{ArmNames, Weights, primary_name};
use crate::rollout::EventType;
use crate::router::{self, Router, RouterError, WriteOutcome};

use super::{Context, Error, FINALIZER, workload};

/// How soon a deletion that waits (for the target to become ready, or for traffic to drain
/// from the primary) looks again.
const DELETION_POLL: Duration = Duration::from_secs(2);

/// Event reasons of a deletion.
pub mod reasons {
    /// Serin started putting the target back (scaling it up).
    pub const REVERTING: &str = "Reverting";
    /// The service was put back as the user declared it.
    pub const REVERTED: &str = "Reverted";
    /// Everything Serin created was left in place and released.
    pub const ORPHANED: &str = "Orphaned";
    /// A rollout was in progress: its unanalysed revision now serves.
    pub const UNANALYSED_REVISION_SERVING: &str = "UnanalysedRevisionServing";
    /// The deletion could not revert and left the primary serving.
    pub const REVERT_IMPOSSIBLE: &str = "RevertImpossible";
}

/// What one deletion reconcile concluded.
enum Progress {
    /// Look again after this long.
    Wait(Duration),
    /// The service is whole without Serin: publish these Events and release the finalizer.
    Done(Vec<(EventType, &'static str, String)>),
}

/// A Canary being deleted: makes the service whole without Serin, then removes the
/// finalizer.
pub(super) async fn finalize(canary: &Canary, ctx: &Context) -> Result<Requeue, Error> {
    let ns = canary.namespace().unwrap_or_default();
    if !canary.finalizers().iter().any(|f| f == FINALIZER) {
        ctx.metrics.forget(&ns, &canary.name_any());
        return Ok(Requeue::await_change());
    }
    match restore(canary, ctx, Utc::now()).await? {
        Progress::Wait(after) => Ok(Requeue::requeue(after)),
        Progress::Done(events) => {
            let reference = canary.object_ref(&());
            for (type_, reason, message) in events {
                super::publish(ctx, &reference, type_, reason, message).await;
            }
            let rest = canary
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            super::set_finalizers(canary, ctx, rest, "remove finalizer from").await?;
            ctx.metrics.forget(&ns, &canary.name_any());
            Ok(Requeue::await_change())
        }
    }
}

/// The next step of the deletion.
async fn restore(canary: &Canary, ctx: &Context, now: DateTime<Utc>) -> Result<Progress, Error> {
    // Whatever happens next, the garbage collector must not remove the serving path.
    release(canary, ctx).await?;
    let problems = ctx.problems(canary);
    if let Some(first) = problems.first() {
        return Ok(orphaned(format!(
            "the Canary is invalid ({first}), so Serin changed no traffic: what it created stays in place and serving, no longer owned by the Canary"
        )));
    }
    let router = match ctx.routers.for_canary(canary) {
        Ok(r) => r,
        Err(e) => {
            return Ok(orphaned(format!(
                "{e}, so Serin changed no traffic: what it created stays in place and serving"
            )));
        }
    };
    if canary.spec.deletion_policy == DeletionPolicy::Orphan {
        // The data plane says where the traffic stays (status may be behind a hand edit).
        let split = match router.weights(canary).await {
            Ok(w) => format!("the canary keeps {}% of the traffic", w.canary()),
            Err(e) => format!("the split could not be read ({e})"),
        };
        return Ok(Progress::Done(vec![(
            EventType::Normal,
            reasons::ORPHANED,
            format!(
                "deletionPolicy Orphan: everything Serin created stays in place and serving, no longer owned by the Canary; {split}"
            ),
        )]));
    }
    let overdue = deadline(canary).is_some_and(|d| now > d);
    if canary.spec.is_traffic_mode() {
        revert_traffic(canary, router, overdue).await
    } else {
        revert_workload(canary, ctx, router, overdue).await
    }
}

/// When a `Revert` deletion gives up waiting: `spec.progressDeadline` after the deletion.
fn deadline(canary: &Canary) -> Option<DateTime<Utc>> {
    let since = canary.metadata.deletion_timestamp.as_ref()?;
    let since = DateTime::<Utc>::from_timestamp_micros(since.0.as_microsecond())?;
    let wait = chrono::Duration::from_std(canary.spec.progress_deadline()).ok()?;
    since.checked_add_signed(wait)
}

/// A deletion that could not revert: the primary keeps serving.
fn orphaned(why: String) -> Progress {
    Progress::Done(vec![(
        EventType::Warning,
        reasons::REVERT_IMPOSSIBLE,
        format!("deleted without reverting: {why}"),
    )])
}

/// Traffic mode: all traffic to `backends.primary`.
async fn revert_traffic(
    canary: &Canary,
    router: &dyn Router,
    overdue: bool,
) -> Result<Progress, Error> {
    let primary = canary
        .spec
        .backends
        .as_ref()
        .map(|b| b.primary.clone())
        .unwrap_or_default();
    match router::move_all(router, canary, Weights::STABLE).await {
        Ok(_) => Ok(Progress::Done(vec![(
            EventType::Normal,
            reasons::REVERTED,
            format!("all traffic is on the stable backend {primary} again"),
        )])),
        Err(e @ RouterError::NotFound { .. }) => Ok(orphaned(format!(
            "could not move traffic back to {primary}: {e}; there are no weights left to restore"
        ))),
        Err(e) if e.needs_user() || overdue => Ok(orphaned(format!(
            "could not move traffic back to {primary}: {e}; the weights stay where they were"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Workload mode: the target serves again through the user-facing names.
async fn revert_workload(
    canary: &Canary,
    ctx: &Context,
    router: &dyn Router,
    overdue: bool,
) -> Result<Progress, Error> {
    let ns = canary.namespace().unwrap_or_default();
    let Some(target_ref) = &canary.spec.target_ref else {
        return Ok(orphaned("the Canary names no target".into()));
    };
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let primary_name = primary_name(&target_ref.name);
    let Some(target) = super::get_deployment(&deployments, &target_ref.name).await? else {
        return Ok(orphaned(format!(
            "the target Deployment {} is gone, so {primary_name} keeps serving",
            target_ref.name
        )));
    };
    let primary = super::get_deployment(&deployments, &primary_name).await?;
    let Some(primary) = primary else {
        // Serin never took over serving (or it was undone already): the target serves.
        return Ok(Progress::Done(vec![(
            EventType::Normal,
            reasons::REVERTED,
            format!(
                "Deployment {} serves through Service {}",
                target_ref.name,
                ArmNames::of(canary).service
            ),
        )]));
    };
    let status = canary.status.clone().unwrap_or_default();
    let revision = super::target_revision(ctx, canary, &target).await?;
    let stable = workload::primary_state(Some(&primary)).revision;
    if status.phase == Phase::Failed && status.revision.as_deref() == Some(revision.as_str()) {
        return Ok(orphaned(format!(
            "the target's revision {revision} failed analysis, so Serin did not put it back; {primary_name} keeps serving it. Fix the target, then delete {primary_name} once the target serves"
        )));
    }
    let mut events = Vec::new();
    let want = workload::replicas(&primary).max(1);
    if workload::replicas(&target) < want {
        workload::scale(&deployments, &target_ref.name, want).await?;
        super::publish(
            ctx,
            &canary.object_ref(&()),
            EventType::Normal,
            reasons::REVERTING,
            format!(
                "scaling Deployment {} up to {want} so it serves again; {primary_name} serves until it is ready",
                target_ref.name
            ),
        )
        .await;
        return Ok(Progress::Wait(DELETION_POLL));
    }
    if !workload::is_ready(&target) {
        if overdue {
            return Ok(orphaned(format!(
                "Deployment {} did not become ready within spec.progressDeadline, so {primary_name} keeps serving",
                target_ref.name
            )));
        }
        return Ok(Progress::Wait(DELETION_POLL));
    }
    // The target is ready: move the user-facing names to it.
    let moved_service = point_service_at_target(canary, ctx, &target).await?;
    let moved_route = match router::move_all(router, canary, Weights::with_canary(100)).await {
        Ok(outcome) => outcome == WriteOutcome::Written,
        Err(e) if e.needs_user() => {
            events.push((
                EventType::Warning,
                reasons::REVERT_IMPOSSIBLE,
                format!("could not point the route at {}: {e}", target_ref.name),
            ));
            false
        }
        Err(e) => return Err(e.into()),
    };
    if moved_service || moved_route {
        // Let connections to the primary drain before it goes.
        return Ok(Progress::Wait(DELETION_POLL));
    }
    delete_if_present(&deployments, "Deployment", &primary_name).await?;
    // Its autoscaler goes with it: the target's own scales the target again.
    let mut deleted = primary_name.clone();
    if let Some(a) = &canary.spec.autoscaler_ref {
        let name = workload::primary_autoscaler_name(&a.name);
        let autoscalers: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &ns);
        delete_if_present(&autoscalers, "HorizontalPodAutoscaler", &name).await?;
        deleted = format!("{primary_name} and its autoscaler {name} were");
    } else {
        deleted.push_str(" was");
    }
    if stable.as_deref() != Some(revision.as_str()) {
        events.push((
            EventType::Warning,
            reasons::UNANALYSED_REVISION_SERVING,
            format!(
                "a rollout of revision {revision} was in progress: it now serves all traffic without a finished analysis (the last analysed revision was {})",
                stable.as_deref().unwrap_or("none")
            ),
        ));
    }
    let arms = ArmNames::of(canary);
    events.push((
        EventType::Normal,
        reasons::REVERTED,
        format!(
            "Deployment {} serves all traffic again through Service {}; {deleted} deleted; the Services and routing objects Serin created stay, no longer owned by the Canary",
            target_ref.name, arms.service
        ),
    ));
    Ok(Progress::Done(events))
}

/// Makes the user-facing Service select the target's pods. Returns whether it wrote.
async fn point_service_at_target(
    canary: &Canary,
    ctx: &Context,
    target: &Deployment,
) -> Result<bool, Error> {
    let ns = canary.namespace().unwrap_or_default();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(mut desired) = workload::build_services(canary, target).into_iter().next() else {
        return Ok(false);
    };
    let name = desired.metadata.name.clone().unwrap_or_default();
    let selector = workload::selector_labels(target);
    let current = services
        .get_opt(&name)
        .await
        .map_err(|source| Error::Kube {
            operation: "get",
            kind: "Service",
            name: name.clone(),
            source,
        })?;
    if current
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.selector.as_ref())
        == Some(&selector)
    {
        return Ok(false);
    }
    desired.metadata.owner_references = None;
    if let Some(spec) = desired.spec.as_mut() {
        spec.selector = Some(selector);
    }
    workload::apply(&services, &desired, "Service").await?;
    Ok(true)
}

/// Removes the Canary's ownerReference from everything Serin created for it, so nothing on
/// the serving path is garbage-collected with it.
async fn release(canary: &Canary, ctx: &Context) -> Result<(), Error> {
    let (Some(uid), Some(ns)) = (canary.uid(), canary.namespace()) else {
        return Ok(());
    };
    let mut objects: Vec<(ApiResource, &'static str, String)> = Vec::new();
    if let Some(target_ref) = &canary.spec.target_ref {
        let arms = ArmNames::of(canary);
        let services = arms.services();
        for name in [arms.service.clone(), services.primary, services.canary] {
            objects.push((ApiResource::erase::<Service>(&()), "Service", name));
        }
        objects.push((
            ApiResource::erase::<Deployment>(&()),
            "Deployment",
            primary_name(&target_ref.name),
        ));
        if let Some(a) = &canary.spec.autoscaler_ref {
            objects.push((
                ApiResource::erase::<HorizontalPodAutoscaler>(&()),
                "HorizontalPodAutoscaler",
                workload::primary_autoscaler_name(&a.name),
            ));
        }
    }
    if let Ok(router) = ctx.routers.for_canary(canary) {
        for (ar, _, name) in router.created(canary) {
            objects.push((ar, "routing object", name));
        }
    }
    for (ar, kind, name) in objects {
        router::release_owner(&ctx.client, &ar, &ns, &name, &uid)
            .await
            .map_err(|source| Error::Kube {
                operation: "release",
                kind,
                name: name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// Deletes `name` through `api` in the background; one already gone is fine.
async fn delete_if_present<K>(api: &Api<K>, kind: &'static str, name: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            operation: "delete",
            kind,
            name: name.to_string(),
            source,
        }),
    }
}
