//! Deleting a workload-mode Canary (`spec.targetRef`) mid-rollout, `deletionPolicy: Revert`
//! (the default), for the Kubernetes routers other than App Mesh (which `real_cluster.rs`
//! covers): the Gloo UpstreamGroup (`router.gloo.upstreamGroup`) and the Gateway API HTTPRoute
//! (`router.gatewayApi.httpRoute`). Traffic mode: `deletion_traffic.rs`.
//!
//! Always on a real control plane (`e2e::env_real`): the kube-testbed node agent makes pods
//! ready, the real endpoint controller fills EndpointSlices, the real garbage collector
//! runs, and `serin run` acts as the chart's ServiceAccount with the chart's RBAC. Serin
//! creates no Gloo or Gateway API objects, so each test creates what the platform team (and,
//! for Gloo, Gloo discovery) would have: for Gloo the Upstreams `<ns>-podinfo-primary-9898`
//! and `<ns>-podinfo-canary-9898` (discovery's names, each `kube` upstream pointing at its
//! Service) and an UpstreamGroup splitting between them; for Gateway API an HTTPRoute whose
//! rule has backendRefs to the Services `podinfo-primary` and `podinfo-canary`.
//!
//! Each test rolls out podinfo:2 to its first step (80/20 on the routing object), then
//! deletes the Canary while a client resolves a "request" every 50 ms as the data plane
//! would: Service `podinfo` must have ready endpoints, and every destination (backendRef)
//! with weight > 0 must lead to a Service (for Gloo through the Upstream's
//! `kube.serviceName`) with ready endpoints. No request may fail. Afterwards the target
//! serves everything: the routing object holds 0/100 (all on the `-canary` Service, which
//! selects the target's pods), `podinfo-primary` is gone, the target runs podinfo:2 at the
//! primary's replica count, and the Services Serin created stay, released from the Canary.
//!
//! The analysis interval is long (10m; the metric is Prometheus' `vector(0)`, always within
//! `max: 1`), so no check falls due during a test: the first step is written when the canary
//! is ready, and only the deletion moves the weights after it. Both arms carry traffic
//! when the deletion starts.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use serin::api::{Canary, Phase};
use serin::controller::FINALIZER;
use support::e2e::*;
use support::wait_for;

/// The target Deployment, the Service clients call, and the Canary: all `podinfo`.
const APP: &str = "podinfo";
const PORT: i64 = 9898;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gloo,
    GatewayApi,
}

impl Kind {
    /// `spec.router` (the routing object in the Canary's namespace).
    fn router(self) -> Value {
        match self {
            Kind::Gloo => json!({"gloo": {"upstreamGroup": {"name": APP}}}),
            Kind::GatewayApi => json!({"gatewayApi": {"httpRoute": {"name": APP}}}),
        }
    }

    /// The kind of the routing object, as the table names it.
    fn object_kind(self) -> &'static str {
        match self {
            Kind::Gloo => "UpstreamGroup",
            Kind::GatewayApi => "HTTPRoute",
        }
    }

    fn resource(self) -> ApiResource {
        match self {
            Kind::Gloo => gvk("gloo.solo.io", "v1", "UpstreamGroup", "upstreamgroups"),
            Kind::GatewayApi => gvk("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
        }
    }

    /// The list whose entries 0 (primary) and 1 (canary) carry the weights.
    fn weights_at(self) -> &'static str {
        match self {
            Kind::Gloo => "/spec/destinations",
            Kind::GatewayApi => "/spec/rules/0/backendRefs",
        }
    }

    /// The weight of an entry that has none: 0 for Gloo, 1 for Gateway API (as each API
    /// documents).
    fn default_weight(self) -> i64 {
        match self {
            Kind::Gloo => 0,
            Kind::GatewayApi => 1,
        }
    }
}

fn upstreams() -> ApiResource {
    gvk("gloo.solo.io", "v1", "Upstream", "upstreams")
}

/// Gloo discovery's name for the upstream of Service `svc` on [`PORT`] in `ns`.
fn upstream_name(ns: &str, svc: &str) -> String {
    format!("{ns}-{svc}-{PORT}")
}

// ---------------------------------------------------------------------------------------
// Arrange

/// The objects of `kind` the platform team (and Gloo discovery) would have made, weights
/// 100/0, for the Services Serin creates: `podinfo-primary` and `podinfo-canary`.
async fn create_routing(env: &Env, kind: Kind) {
    let ns = &env.ns;
    let (primary, canary) = (format!("{APP}-primary"), format!("{APP}-canary"));
    match kind {
        Kind::Gloo => {
            for svc in [&primary, &canary] {
                create(
                    &env.client,
                    &upstreams(),
                    Some(ns),
                    json!({
                        "apiVersion": "gloo.solo.io/v1", "kind": "Upstream",
                        "metadata": {"name": upstream_name(ns, svc), "namespace": ns,
                                     "labels": {"discovered_by": "kubernetesplugin"}},
                        "spec": {"kube": {"serviceName": svc, "serviceNamespace": ns, "servicePort": PORT}}
                    }),
                )
                .await;
            }
            let dest = |svc: &str, weight: i64| {
                json!({"destination": {"upstream": {"name": upstream_name(ns, svc), "namespace": ns}},
                       "weight": weight})
            };
            create(
                &env.client,
                &kind.resource(),
                Some(ns),
                json!({
                    "apiVersion": "gloo.solo.io/v1", "kind": "UpstreamGroup",
                    "metadata": {"name": APP, "namespace": ns},
                    "spec": {"destinations": [dest(&primary, 100), dest(&canary, 0)]}
                }),
            )
            .await;
        }
        Kind::GatewayApi => {
            create(
                &env.client,
                &kind.resource(),
                Some(ns),
                json!({
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": APP, "namespace": ns},
                    "spec": {
                        "parentRefs": [{"name": "public-gateway", "namespace": "gateway-system"}],
                        "hostnames": ["podinfo.example.com"],
                        "rules": [{
                            "name": "split",
                            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                            "backendRefs": [
                                {"name": primary, "port": PORT, "weight": 100},
                                {"name": canary, "port": PORT, "weight": 0}
                            ]
                        }]
                    }
                }),
            )
            .await;
        }
    }
}

/// The workload-mode Canary `podinfo` for `kind`.
fn workload_canary_for(env: &Env, kind: Kind) -> Value {
    json!({
        "apiVersion": "serin.dev/v1alpha1",
        "kind": "Canary",
        "metadata": {"name": APP, "namespace": env.ns},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
            "service": {"port": PORT},
            "router": kind.router(),
            "steps": [20, 50, 100],
            "analysis": {
                // No check falls due while the test runs: the deletion starts at 80/20.
                "interval": "10m",
                "metrics": [{
                    "name": "always-fine",
                    "provider": {"prometheus": {"address": env.prometheus.url}},
                    "query": "vector(0)",
                    "max": 1
                }]
            }
        }
    })
}

/// A namespace on the real control plane with the target Deployment `podinfo` (podinfo:1,
/// 2 replicas), the routing objects of `kind` and the Canary, the routing object's weights
/// recorded from the start.
async fn arrange(kind: Kind) -> Option<(Env, WeightLog)> {
    let prefix = match kind {
        Kind::Gloo => "delete-wl-gloo",
        Kind::GatewayApi => "delete-wl-gateway",
    };
    let mut env = env_real(prefix, |_, _| vec![]).await?;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment(&env.ns, APP, "podinfo:1"),
        )
        .await
        .unwrap();
    create_routing(&env, kind).await;
    let (weights, recorder) = record_weights_of(
        &env.client,
        &env.ns,
        kind.resource(),
        APP,
        kind.weights_at(),
    )
    .await;
    env.tasks.push(recorder);
    let canary: Canary = serde_json::from_value(workload_canary_for(&env, kind)).unwrap();
    Api::<Canary>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &canary)
        .await
        .unwrap();
    Some((env, weights))
}

// ---------------------------------------------------------------------------------------
// The data plane, as a client sees it

async fn get(
    client: &kube::Client,
    ns: &str,
    ar: &ApiResource,
    name: &str,
) -> Result<Value, String> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    api.get_opt(name)
        .await
        .map_err(|e| format!("get {} {name}: {e}", ar.kind))?
        .map(|o| serde_json::to_value(o).unwrap())
        .ok_or(format!("{} {name} is gone", ar.kind))
}

/// The Service (namespace, name) a weighted entry of the routing object sends traffic to:
/// a Gloo destination through its Upstream's `kube` spec (or a `kube` destination), a
/// Gateway API backendRef directly.
async fn service_of(
    client: &kube::Client,
    ns: &str,
    kind: Kind,
    entry: &Value,
) -> Result<(String, String), String> {
    let s = |v: &Value, p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match kind {
        Kind::Gloo => {
            let up = s(entry, "/destination/upstream/name");
            if up.is_empty() {
                let svc = s(entry, "/destination/kube/ref/name");
                let svc_ns = s(entry, "/destination/kube/ref/namespace");
                return match svc.is_empty() {
                    true => Err(format!("destination {entry} names no upstream or Service")),
                    false => Ok((if svc_ns.is_empty() { ns.into() } else { svc_ns }, svc)),
                };
            }
            let up_ns = s(entry, "/destination/upstream/namespace");
            let up_ns = if up_ns.is_empty() {
                ns.to_string()
            } else {
                up_ns
            };
            let upstream = get(client, &up_ns, &upstreams(), &up).await?;
            let svc = s(&upstream, "/spec/kube/serviceName");
            let svc_ns = s(&upstream, "/spec/kube/serviceNamespace");
            if svc.is_empty() {
                return Err(format!("Upstream {up} is not a kube upstream"));
            }
            Ok((if svc_ns.is_empty() { up_ns } else { svc_ns }, svc))
        }
        Kind::GatewayApi => {
            let group = s(entry, "/group");
            let k = s(entry, "/kind");
            if !group.is_empty() || !(k.is_empty() || k == "Service") {
                return Err(format!("backendRef {entry} is not a Service"));
            }
            let ref_ns = s(entry, "/namespace");
            Ok((
                if ref_ns.is_empty() { ns.into() } else { ref_ns },
                s(entry, "/name"),
            ))
        }
    }
}

/// One client "request" routed as the data plane would route it: through Service `podinfo`
/// (the name plain clients use: it must have ready endpoints) and through the routing
/// object of `kind` (every entry with weight > 0 → its Service → at least one ready
/// endpoint). `Err` says which hop failed.
async fn route_request(client: &kube::Client, ns: &str, kind: Kind) -> Result<(), String> {
    if ready_endpoints(client, ns, APP).await == 0 {
        return Err(format!("Service {APP} has no ready endpoints"));
    }
    let obj = get(client, ns, &kind.resource(), APP).await?;
    let entries: Vec<Value> = match kind {
        Kind::Gloo => obj
            .pointer("/spec/destinations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        Kind::GatewayApi => obj
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|r| r["backendRefs"].as_array().cloned().unwrap_or_default())
            .collect(),
    };
    let mut served = 0;
    for e in entries
        .iter()
        .filter(|e| e["weight"].as_i64().unwrap_or(kind.default_weight()) > 0)
    {
        let (svc_ns, svc) = service_of(client, ns, kind, e).await?;
        if ready_endpoints(client, &svc_ns, &svc).await == 0 {
            return Err(format!(
                "{} {APP}: an entry with weight {} resolves to Service {svc_ns}/{svc}, which has no ready endpoints",
                kind.object_kind(),
                e["weight"]
            ));
        }
        served += 1;
    }
    if served == 0 {
        return Err(format!(
            "{} {APP} gives no entry any weight",
            kind.object_kind()
        ));
    }
    Ok(())
}

/// A client sending "requests" ([`route_request`]) every 50 ms until stopped; returns how
/// many it sent and the failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Traffic {
    fn start(client: &kube::Client, ns: &str, kind: Kind) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, ns, flag) = (client.clone(), ns.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut sent, mut failed) = (0, Vec::new());
            while !flag.load(Ordering::SeqCst) {
                sent += 1;
                if let Err(e) = route_request(&client, &ns, kind).await {
                    failed.push(e);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (sent, failed)
        });
        Traffic { stop, task }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// What exists

/// What exists in the namespace: `Kind/name` (the namespace shown as `<ns>`) → a short
/// description (owned by the Canary with `uid` or not; replicas and image of Deployments;
/// selectors of Services; weights of the routing object; the Service of an Upstream), plus
/// the ready endpoints of each Service and the pods per `app` label.
async fn inventory(env: &Env, kind: Kind, uid: &str) -> BTreeMap<String, String> {
    let (client, ns) = (&env.client, env.ns.as_str());
    let owned = |m: &kube::core::ObjectMeta| {
        let by_canary = m
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.kind == "Canary");
        if by_canary {
            "owned by the Canary"
        } else {
            "not owned"
        }
    };
    let short = |name: &str| name.replace(&format!("{ns}-"), "<ns>-");
    let lp = ListParams::default();
    let mut out = BTreeMap::new();
    for d in Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .unwrap()
    {
        let image = d
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        let replicas = d.spec.replicas.unwrap_or(1);
        out.insert(
            format!("Deployment/{}", d.metadata.name.clone().unwrap_or_default()),
            format!("{}, replicas={replicas}, image={image}", owned(&d.metadata)),
        );
    }
    let mut services = Vec::new();
    for s in Api::<Service>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .unwrap()
    {
        let name = s.metadata.name.clone().unwrap_or_default();
        let selector: Vec<String> = s
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.insert(
            format!("Service/{name}"),
            format!("{}, selects {}", owned(&s.metadata), selector.join(",")),
        );
        services.push(name);
    }
    for svc in services {
        out.insert(
            format!("ready endpoints of Service {svc}"),
            ready_endpoints(client, ns, &svc).await.to_string(),
        );
    }
    let mut pods: BTreeMap<String, usize> = BTreeMap::new();
    for p in Api::<Pod>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .unwrap()
    {
        let app = p
            .metadata
            .labels
            .unwrap_or_default()
            .get("app")
            .cloned()
            .unwrap_or_default();
        *pods.entry(app).or_default() += 1;
    }
    for (app, n) in pods {
        out.insert(format!("pods app={app}"), n.to_string());
    }
    let routing: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &kind.resource());
    for o in routing.list(&lp).await.unwrap() {
        let w: Vec<String> = o
            .data
            .pointer(kind.weights_at())
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|x| x["weight"].to_string())
            .collect();
        out.insert(
            format!(
                "{}/{}",
                kind.object_kind(),
                o.metadata.name.clone().unwrap_or_default()
            ),
            format!("{}, weights {}", owned(&o.metadata), w.join("/")),
        );
    }
    if kind == Kind::Gloo {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &upstreams());
        for o in api.list(&lp).await.unwrap() {
            let svc = o
                .data
                .pointer("/spec/kube/serviceName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            out.insert(
                format!(
                    "Upstream/{}",
                    short(&o.metadata.name.clone().unwrap_or_default())
                ),
                format!("{}, kube Service {svc}:{PORT}", owned(&o.metadata)),
            );
        }
    }
    out
}

fn print_table(kind: Kind, before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    eprintln!("--- {kind:?}, workload mode, deletionPolicy Revert, deleted at 80/20");
    eprintln!(
        "{:<42} | {:<50} | after deleting the Canary",
        "object", "before"
    );
    eprintln!("{}", "-".repeat(130));
    for k in keys {
        eprintln!(
            "{k:<42} | {:<50} | {}",
            before.get(k).map(String::as_str).unwrap_or("absent"),
            after.get(k).map(String::as_str).unwrap_or("removed")
        );
    }
}

/// Fails the test with what the operator, the Canary and the routing object were doing.
async fn fail(env: &Env, op: &Operator, kind: Kind, why: String) -> ! {
    if let Ok(Some(c)) = Api::<Canary>::namespaced(env.client.clone(), &env.ns)
        .get_opt(APP)
        .await
    {
        eprintln!(
            "--- Canary\n{}",
            serde_norway::to_string(&c).unwrap_or_default()
        );
    }
    if let Ok(o) = get(&env.client, &env.ns, &kind.resource(), APP).await {
        eprintln!(
            "--- {}\n{}",
            kind.object_kind(),
            serde_norway::to_string(&o["spec"]).unwrap_or_default()
        );
    }
    let log = op.log();
    let tail: Vec<&str> = log.lines().rev().take(80).collect();
    eprintln!(
        "--- operator log (last 80 lines)\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    panic!("{kind:?}: {why}");
}

// ---------------------------------------------------------------------------------------
// The test

/// The whole scenario for `kind`; see the file's documentation.
async fn delete_mid_rollout(kind: Kind) {
    let started = Instant::now();
    let Some((env, weights)) = arrange(kind).await else {
        return;
    };
    let op = ready_operator(&env, APP).await;
    set_image(&env, APP, "podinfo:2").await;
    wait_weights(&env, &op, &weights, 2).await;
    if weights.pairs() != vec![(100, 0), (80, 20)] {
        fail(
            &env,
            &op,
            kind,
            format!("the rollout's weights: {:?}", weights.pairs()),
        )
        .await;
    }
    let api: Api<Canary> = Api::namespaced(env.client.clone(), &env.ns);
    // Serin writes the weights, then the status.
    let c = wait_for(
        "the Canary's status to record the first step",
        Duration::from_secs(10),
        || async {
            let c = api.get(APP).await.unwrap();
            let s = c.status.clone().unwrap_or_default();
            (s.phase == Phase::Progressing && s.canary_weight == 20).then_some(c)
        },
    )
    .await;
    assert!(
        c.finalizers().iter().any(|f| f == FINALIZER),
        "{kind:?}: a Canary Serin acts on carries {FINALIZER}"
    );
    let uid = c.metadata.uid.clone().unwrap();
    wait_for(
        "requests to be routed to ready pods",
        Duration::from_secs(30),
        || async { route_request(&env.client, &env.ns, kind).await.ok() },
    )
    .await;
    let before = inventory(&env, kind, &uid).await;

    let traffic = Traffic::start(&env.client, &env.ns, kind);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deleted = Instant::now();
    api.delete(APP, &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while api.get_opt(APP).await.unwrap().is_some() {
        if Instant::now() > deadline {
            let _ = traffic.stop().await;
            fail(
                &env,
                &op,
                kind,
                "the Canary was not deleted within 40s".into(),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = deleted.elapsed();
    // Give the garbage collector and the endpoint controller time to act on whatever the
    // deletion left (an absence can only be observed by waiting), while requests still flow.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (sent, failed) = traffic.stop().await;
    let after = inventory(&env, kind, &uid).await;
    print_table(kind, &before, &after);
    eprintln!(
        "{kind:?}: the Canary was gone {took:.1?} after the delete; requests during the deletion and 4 s after: {sent}, failed: {}; test time {:.1?}",
        failed.len(),
        started.elapsed()
    );
    if !failed.is_empty() {
        let first = failed.first().cloned().unwrap_or_default();
        fail(
            &env,
            &op,
            kind,
            format!(
                "{} of {sent} requests failed during the deletion, first: {first}",
                failed.len()
            ),
        )
        .await;
    }
    assert!(sent >= 40, "{kind:?}: only {sent} requests were sent");

    // Before: Serin's objects owned by the Canary, the primary serving podinfo:1, the
    // target (the canary arm) podinfo:2, 80/20.
    let object = format!("{}/{APP}", kind.object_kind());
    for (k, v) in [
        (
            "Deployment/podinfo-primary",
            "owned by the Canary, replicas=2, image=podinfo:1",
        ),
        (
            "Deployment/podinfo",
            "not owned, replicas=2, image=podinfo:2",
        ),
        (
            "Service/podinfo",
            "owned by the Canary, selects app=podinfo-primary",
        ),
        (
            "Service/podinfo-primary",
            "owned by the Canary, selects app=podinfo-primary",
        ),
        (
            "Service/podinfo-canary",
            "owned by the Canary, selects app=podinfo",
        ),
        (object.as_str(), "not owned, weights 80/20"),
    ] {
        assert_eq!(
            before.get(k).map(String::as_str),
            Some(v),
            "{kind:?} before: {k}"
        );
    }
    // After: the target serves everything through the same names; the primary is gone
    // (and the garbage collector took its pods); nothing is owned by the Canary.
    let mut expected: BTreeMap<String, String> = [
        (
            "Deployment/podinfo",
            "not owned, replicas=2, image=podinfo:2",
        ),
        ("Service/podinfo", "not owned, selects app=podinfo"),
        (
            "Service/podinfo-primary",
            "not owned, selects app=podinfo-primary",
        ),
        ("Service/podinfo-canary", "not owned, selects app=podinfo"),
        ("ready endpoints of Service podinfo", "2"),
        ("ready endpoints of Service podinfo-canary", "2"),
        ("ready endpoints of Service podinfo-primary", "0"),
        ("pods app=podinfo", "2"),
        (object.as_str(), "not owned, weights 0/100"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if kind == Kind::Gloo {
        for arm in ["primary", "canary"] {
            expected.insert(
                format!("Upstream/<ns>-podinfo-{arm}-{PORT}"),
                format!("not owned, kube Service podinfo-{arm}:{PORT}"),
            );
        }
    }
    assert_eq!(
        after, expected,
        "{kind:?}: what is left after a mid-rollout Revert"
    );
    let primary_replicas = before["Deployment/podinfo-primary"].clone();
    assert!(
        primary_replicas.contains("replicas=2")
            && after["Deployment/podinfo"].contains("replicas=2"),
        "{kind:?}: the target runs at the primary's replica count"
    );
    let again = inventory(&env, kind, &uid).await;
    assert_eq!(
        again, after,
        "{kind:?}: the state changed after the deletion settled"
    );

    let events = events_after(&env, APP, "Reverted").await;
    let reasons: Vec<&str> = events.iter().map(|(r, _)| r.as_str()).collect();
    eprintln!("{kind:?}: Events about the Canary: {reasons:?}");
    assert!(
        reasons.contains(&"UnanalysedRevisionServing"),
        "{kind:?}: a rollout was in progress: {reasons:?}"
    );
    assert!(
        !reasons
            .iter()
            .any(|r| *r == "RevertImpossible" || *r == "Orphaned"),
        "{kind:?}: {events:#?}"
    );
}

/// Gloo: the UpstreamGroup `podinfo` between the discovered upstreams of
/// `podinfo-primary` and `podinfo-canary`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gloo_workload_deletion_mid_rollout_reverts_to_the_target_without_dropping_a_request() {
    delete_mid_rollout(Kind::Gloo).await;
}

/// Gateway API: the HTTPRoute `podinfo` with backendRefs `podinfo-primary` and
/// `podinfo-canary`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_workload_deletion_mid_rollout_reverts_to_the_target_without_dropping_a_request()
 {
    delete_mid_rollout(Kind::GatewayApi).await;
}
