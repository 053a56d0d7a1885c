//! Workload mode: the target Deployment, the `<target>-primary` copy Serin owns, and the
//! Services in front of them.
//!
//! The pure parts (revision hashing, building the primary and the Services, readiness)
//! are functions of their inputs and are unit-tested here; the async parts apply them
//! with server-side apply under the `serin` field manager, so every call is idempotent.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::autoscaling::v2::{CrossVersionObjectReference, HorizontalPodAutoscaler};
use k8s_openapi::api::core::v1::{
    ConfigMap, PodTemplateSpec, Secret, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::api::{Canary, MANAGER};
use crate::arms::{ArmNames, primary_name};
use crate::rollout::WorkloadState;

use super::Error;

/// Annotation on `<target>-primary` naming the revision it runs.
pub const REVISION_ANNOTATION: &str = "serin.dev/revision";

/// 64-bit FNV-1a: a stable hash (unlike `DefaultHasher`) so revisions survive upgrades.
fn fnv1a(bytes: &[u8], mut hash: u64) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The revision of a pod template and the config it references: a short hex hash of the
/// template (serde_json orders keys, so equal templates hash equally) and of the data of
/// each referenced ConfigMap and Secret, in name order.
pub fn revision(template: &PodTemplateSpec, configs: &BTreeMap<String, String>) -> String {
    let mut template = template.clone();
    // Serin's own bookkeeping must not look like a new version.
    if let Some(a) = template
        .metadata
        .as_mut()
        .and_then(|m| m.annotations.as_mut())
    {
        a.remove(REVISION_ANNOTATION);
    }
    let bytes = serde_json::to_vec(&template).unwrap_or_default();
    let mut h = fnv1a(&bytes, FNV_OFFSET);
    for (name, digest) in configs {
        h = fnv1a(name.as_bytes(), h);
        h = fnv1a(digest.as_bytes(), h);
    }
    format!("{h:016x}")
}

/// ConfigMaps and Secrets a pod template reads (env, envFrom, volumes, projected volumes),
/// as `configmap/NAME` and `secret/NAME`.
pub fn referenced_configs(template: &PodTemplateSpec) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(spec) = &template.spec else {
        return out;
    };
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                out.insert(format!("configmap/{}", r.name));
            }
            if let Some(r) = &e.secret_ref {
                out.insert(format!("secret/{}", r.name));
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value_from {
                if let Some(r) = &v.config_map_key_ref {
                    out.insert(format!("configmap/{}", r.name));
                }
                if let Some(r) = &v.secret_key_ref {
                    out.insert(format!("secret/{}", r.name));
                }
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            out.insert(format!("configmap/{}", c.name));
        }
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_ref()) {
            out.insert(format!("secret/{name}"));
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &p.config_map {
                out.insert(format!("configmap/{}", c.name));
            }
            if let Some(s) = &p.secret {
                out.insert(format!("secret/{}", s.name));
            }
        }
    }
    out
}

/// Reads the referenced configs and digests their data. A missing optional config digests
/// as "absent", so creating it later starts a rollout.
pub async fn config_digests(
    client: &kube::Client,
    namespace: &str,
    refs: &BTreeSet<String>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for r in refs {
        let (kind, name) = r.split_once('/').unwrap_or(("configmap", r));
        let digest = if kind == "secret" {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let s = api.get_opt(name).await.map_err(|source| Error::Kube {
                operation: "get",
                kind: "Secret",
                name: name.to_string(),
                source,
            })?;
            s.map(|s| digest_json(&json!([s.data, s.string_data])))
        } else {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let c = api.get_opt(name).await.map_err(|source| Error::Kube {
                operation: "get",
                kind: "ConfigMap",
                name: name.to_string(),
                source,
            })?;
            c.map(|c| digest_json(&json!([c.data, c.binary_data])))
        };
        out.insert(r.clone(), digest.unwrap_or_else(|| "absent".into()));
    }
    Ok(out)
}

fn digest_json(v: &serde_json::Value) -> String {
    format!(
        "{:016x}",
        fnv1a(&serde_json::to_vec(v).unwrap_or_default(), FNV_OFFSET)
    )
}

/// Desired replicas of a Deployment (Kubernetes defaults an unset value to 1).
pub fn replicas(d: &Deployment) -> i32 {
    d.spec.replicas.unwrap_or(1)
}

/// True when the Deployment's controller has rolled out its current spec and every desired
/// replica is available (and at least one is desired).
pub fn is_ready(d: &Deployment) -> bool {
    let want = replicas(d);
    let Some(status) = &d.status else {
        return false;
    };
    let generation = d.metadata.generation.unwrap_or(0);
    want > 0
        && status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) >= want
        && status.available_replicas.unwrap_or(0) >= want
        && status.replicas.unwrap_or(0) <= want
}

/// The observed state of the primary.
pub fn primary_state(primary: Option<&Deployment>) -> WorkloadState {
    match primary {
        None => WorkloadState::default(),
        Some(d) => WorkloadState {
            revision: d
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REVISION_ANNOTATION))
                .cloned(),
            ready: is_ready(d),
        },
    }
}

/// The labels that select the target's pods.
pub fn selector_labels(target: &Deployment) -> BTreeMap<String, String> {
    target
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default()
}

/// The primary's selector: every selector label of the target with `-primary` appended to
/// its value, so primary pods are never selected by the target's (canary's) selector.
pub fn primary_selector(target: &Deployment) -> BTreeMap<String, String> {
    selector_labels(target)
        .into_iter()
        .map(|(k, v)| (k, primary_name(&v)))
        .collect()
}

/// The ownerReference that makes an object belong to the Canary.
pub fn owner(canary: &Canary) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
        kind: "Canary".into(),
        name: canary.metadata.name.clone()?,
        uid: canary.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// `<target>-primary` running the target's current pod template, labelled as the primary.
pub fn build_primary(
    canary: &Canary,
    target: &Deployment,
    revision: &str,
    replicas: i32,
) -> Deployment {
    let name = primary_name(target.metadata.name.as_deref().unwrap_or_default());
    let selector = primary_selector(target);
    let target_spec = target.spec.clone();
    let mut template = target_spec.template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.extend(selector.clone());
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(REVISION_ANNOTATION.into(), revision.into());
    Deployment {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: target.metadata.namespace.clone(),
            labels: Some(selector.clone()),
            annotations: Some([(REVISION_ANNOTATION.to_string(), revision.to_string())].into()),
            owner_references: owner(canary).map(|o| vec![o]),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                match_expressions: None,
            },
            template,
            strategy: target_spec.strategy,
            min_ready_seconds: target_spec.min_ready_seconds,
            revision_history_limit: target_spec.revision_history_limit,
            progress_deadline_seconds: target_spec.progress_deadline_seconds,
            paused: None,
        },
        status: None,
    }
}

/// Serin's copy of the target's autoscaler: `<name>-primary`.
pub fn primary_autoscaler_name(name: &str) -> String {
    primary_name(name)
}

/// Why the target's autoscaler cannot be copied for the primary (`None`: it can): it must
/// scale the target Deployment.
pub fn autoscaler_mismatch(hpa: &HorizontalPodAutoscaler, target: &str) -> Option<String> {
    let r = &hpa.spec.scale_target_ref;
    (r.kind != "Deployment" || r.name != target).then(|| {
        format!(
            "scales {} {}, not the target Deployment {target}",
            r.kind, r.name
        )
    })
}

/// `<name>-primary`: the target's HorizontalPodAutoscaler (bounds, metrics, behaviour)
/// scaling `<target>-primary` instead, owned by the Canary.
pub fn build_primary_autoscaler(
    canary: &Canary,
    hpa: &HorizontalPodAutoscaler,
    target: &str,
) -> HorizontalPodAutoscaler {
    let mut spec = hpa.spec.clone();
    spec.scale_target_ref = CrossVersionObjectReference {
        api_version: Some("apps/v1".into()),
        kind: "Deployment".into(),
        name: primary_name(target),
    };
    HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some(primary_autoscaler_name(
                hpa.metadata.name.as_deref().unwrap_or_default(),
            )),
            namespace: hpa.metadata.namespace.clone(),
            labels: hpa.metadata.labels.clone(),
            owner_references: owner(canary).map(|o| vec![o]),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

/// Whether the primary's autoscaler `current` already is `desired` (its spec, and owned
/// by the Canary): then nothing is written.
pub fn autoscaler_in_step(
    current: Option<&HorizontalPodAutoscaler>,
    desired: &HorizontalPodAutoscaler,
) -> bool {
    current.is_some_and(|c| {
        c.spec == desired.spec
            && c.metadata.labels.clone().unwrap_or_default()
                == desired.metadata.labels.clone().unwrap_or_default()
            && c.metadata.owner_references.iter().flatten().any(|o| {
                desired
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|d| d.uid == o.uid)
            })
    })
}

/// The Services `<service>` (all traffic, selects the primary), `<service>-primary` and
/// `<service>-canary`.
pub fn build_services(canary: &Canary, target: &Deployment) -> Vec<Service> {
    let arms = ArmNames::of(canary);
    let services = arms.services();
    let port = canary.spec.service.port;
    let target_port = canary.spec.service.target_port.unwrap_or(port);
    let ns = canary.metadata.namespace.clone();
    let svc = |name: String, selector: BTreeMap<String, String>| Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: ns.clone(),
            owner_references: owner(canary).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                target_port: Some(IntOrString::Int(target_port)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        status: None,
    };
    vec![
        svc(arms.service.clone(), primary_selector(target)),
        svc(services.primary, primary_selector(target)),
        svc(services.canary, selector_labels(target)),
    ]
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Server-side applies `obj` (created if missing, unchanged if equal).
pub async fn apply<K>(api: &Api<K>, obj: &K, kind: &'static str) -> Result<K, Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut value = serde_json::to_value(obj).map_err(|e| Error::Serialize(e.to_string()))?;
    if let Some(o) = value.as_object_mut() {
        o.insert(
            "apiVersion".into(),
            json!(K::api_version(&Default::default())),
        );
        o.insert("kind".into(), json!(K::kind(&Default::default())));
        o.remove("status");
    }
    api.patch(&name, &apply_params(), &Patch::Apply(&value))
        .await
        .map_err(|source| Error::Kube {
            operation: "apply",
            kind,
            name,
            source,
        })
}

/// Sets a Deployment's replicas through a merge patch (idempotent).
pub async fn scale(api: &Api<Deployment>, name: &str, replicas: i32) -> Result<(), Error> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .map_err(|source| Error::Kube {
        operation: "scale",
        kind: "Deployment",
        name: name.to_string(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, Container, EnvFromSource, PodSpec, SecretVolumeSource, Volume,
    };

    fn target(image: &str) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "podinfo", "namespace": "test", "generation": 3},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "podinfo"}},
                "template": {
                    "metadata": {"labels": {"app": "podinfo", "tier": "web"}},
                    "spec": {"containers": [{"name": "app", "image": image}]}
                }
            }
        }))
        .unwrap()
    }

    fn canary() -> Canary {
        let mut c: Canary = serde_norway::from_str(
            r#"
apiVersion: serin.dev/v1alpha1
kind: Canary
metadata: {name: podinfo, namespace: test, uid: u-1}
spec:
  targetRef: {apiVersion: apps/v1, kind: Deployment, name: podinfo}
  service: {port: 9898, targetPort: 8080}
  router: {appMesh: {mesh: global}}
  analysis:
    metrics:
      - {name: e, provider: {prometheus: {address: "http://p:9090"}}, preset: appmesh-error-rate, max: 1}
"#,
        )
        .unwrap();
        c.metadata.uid = Some("u-1".into());
        c
    }

    fn template(d: &Deployment) -> PodTemplateSpec {
        d.spec.template.clone()
    }

    /// Equal templates give equal revisions; a new image or new config data a new one.
    #[test]
    fn revision_tracks_template_and_config() {
        let none = BTreeMap::new();
        let a = revision(&template(&target("app:1")), &none);
        assert_eq!(a, revision(&template(&target("app:1")), &none));
        assert_eq!(a.len(), 16);
        assert_ne!(a, revision(&template(&target("app:2")), &none));
        let cfg1 = BTreeMap::from([("configmap/c".to_string(), "1".to_string())]);
        let cfg2 = BTreeMap::from([("configmap/c".to_string(), "2".to_string())]);
        assert_ne!(
            revision(&template(&target("app:1")), &cfg1),
            revision(&template(&target("app:1")), &cfg2)
        );
    }

    /// Config references are found in envFrom, env and volumes.
    #[test]
    fn finds_referenced_configs() {
        let t = PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "a".into(),
                    env_from: Some(vec![EnvFromSource {
                        config_map_ref: Some(ConfigMapEnvSource {
                            name: "settings".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                volumes: Some(vec![Volume {
                    name: "tls".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some("certs".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let refs: Vec<String> = referenced_configs(&t).into_iter().collect();
        assert_eq!(refs, vec!["configmap/settings", "secret/certs"]);
    }

    fn autoscaler(scales: &str) -> HorizontalPodAutoscaler {
        serde_json::from_value(json!({
            "metadata": {"name": "podinfo", "namespace": "test", "labels": {"team": "web"},
                         "resourceVersion": "7", "uid": "h-1"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": scales},
                "minReplicas": 2,
                "maxReplicas": 6,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                             "target": {"type": "Utilization", "averageUtilization": 70}}}],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 120}}
            },
            "status": {"currentReplicas": 3, "desiredReplicas": 3}
        }))
        .unwrap()
    }

    /// The primary's autoscaler is the target's with only the scale target swapped for
    /// `<target>-primary`, owned by the Canary; written again only when it drifts.
    #[test]
    fn primary_autoscaler_copies_the_targets() {
        let hpa = autoscaler("podinfo");
        assert_eq!(autoscaler_mismatch(&hpa, "podinfo"), None);
        let p = build_primary_autoscaler(&canary(), &hpa, "podinfo");
        assert_eq!(p.metadata.name.as_deref(), Some("podinfo-primary"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("test"));
        assert_eq!(p.metadata.resource_version, None);
        assert_eq!(p.metadata.owner_references.as_ref().unwrap()[0].uid, "u-1");
        let (mut got, want) = (p.spec.clone(), hpa.spec.clone());
        assert_eq!(got.scale_target_ref.name, "podinfo-primary");
        assert_eq!(got.scale_target_ref.kind, "Deployment");
        got.scale_target_ref = want.scale_target_ref.clone();
        assert_eq!(got, want, "all but the scale target is the target's");
        assert!(p.status.is_none());

        assert!(!autoscaler_in_step(None, &p));
        let mut stored = p.clone();
        stored.metadata.resource_version = Some("9".into());
        stored.status = hpa.status.clone();
        assert!(
            autoscaler_in_step(Some(&stored), &p),
            "status and metadata the server adds are no drift"
        );
        let mut edited = autoscaler("podinfo");
        edited.spec.max_replicas = 9;
        let desired = build_primary_autoscaler(&canary(), &edited, "podinfo");
        assert!(
            !autoscaler_in_step(Some(&stored), &desired),
            "a new maxReplicas is drift"
        );
        stored.metadata.owner_references = None;
        assert!(
            !autoscaler_in_step(Some(&stored), &p),
            "a released copy is taken back"
        );
    }

    /// An autoscaler that scales anything but the target is not copied.
    #[test]
    fn autoscaler_of_another_workload_is_refused() {
        let why = autoscaler_mismatch(&autoscaler("other"), "podinfo").unwrap();
        assert_eq!(
            why,
            "scales Deployment other, not the target Deployment podinfo"
        );
    }

    /// The primary copies the template, relabels the selector so the canary's selector never
    /// matches primary pods, records its revision, and is owned by the Canary.
    #[test]
    fn primary_is_a_relabelled_copy() {
        let p = build_primary(&canary(), &target("app:1"), "abc", 2);
        assert_eq!(p.metadata.name.as_deref(), Some("podinfo-primary"));
        let spec = p.spec;
        let sel = spec.selector.match_labels.unwrap();
        assert_eq!(
            sel,
            BTreeMap::from([("app".to_string(), "podinfo-primary".to_string())])
        );
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        assert_eq!(
            labels.get("app").map(String::as_str),
            Some("podinfo-primary")
        );
        assert_eq!(labels.get("tier").map(String::as_str), Some("web"));
        assert_eq!(
            spec.template.spec.unwrap().containers[0].image.as_deref(),
            Some("app:1")
        );
        assert_eq!(p.metadata.annotations.unwrap()[REVISION_ANNOTATION], "abc");
        let o = &p.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (o.kind.as_str(), o.uid.as_str(), o.controller),
            ("Canary", "u-1", Some(true))
        );
    }

    /// The apex and primary Services select primary pods; the canary Service the target's.
    #[test]
    fn services_select_the_right_pods() {
        let s = build_services(&canary(), &target("app:1"));
        let sel = |i: usize| s[i].spec.as_ref().unwrap().selector.clone().unwrap()["app"].clone();
        let names: Vec<_> = s.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, vec!["podinfo", "podinfo-primary", "podinfo-canary"]);
        assert_eq!(
            (sel(0), sel(1), sel(2)),
            (
                "podinfo-primary".into(),
                "podinfo-primary".into(),
                "podinfo".into()
            )
        );
        let port = &s[0].spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (9898, Some(IntOrString::Int(8080)))
        );
    }

    /// Ready means the current generation is rolled out and every replica is available.
    #[test]
    fn readiness() {
        let mut d = target("app:1");
        assert!(!is_ready(&d));
        d.status = Some(DeploymentStatus {
            observed_generation: Some(3),
            replicas: Some(2),
            updated_replicas: Some(2),
            available_replicas: Some(2),
            ready_replicas: Some(2),
            ..Default::default()
        });
        assert!(is_ready(&d));
        d.metadata.generation = Some(4);
        assert!(!is_ready(&d), "status of an older generation");
        d.metadata.generation = Some(3);
        d.spec.replicas = Some(0);
        assert!(!is_ready(&d), "zero replicas is not ready");
    }
}
