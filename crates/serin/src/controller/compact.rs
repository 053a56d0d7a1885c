//! Deployments as the controller caches them: the metadata typed (the watches map and
//! filter by it), the spec and status as one compact JSON string, parsed again only when a
//! reconcile reads the Deployment.
//!
//! A typed `Deployment` costs about 5 KiB in memory, mostly the empty `Option`s of its pod
//! template's structs; its spec and status as JSON are a fraction of that. `serin bench
//! scale` caches two Deployments per workload-mode Canary (the target and its primary), so
//! this is the largest part of the operator's memory per Canary.

use std::borrow::Cow;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer, Serialize};

/// A cached Deployment (see the module documentation).
#[derive(Clone, Debug)]
pub struct CompactDeployment {
    /// Its metadata, without managedFields or kubectl's last-applied copy.
    pub metadata: ObjectMeta,
    /// `{"spec": …, "status": …}` as compact JSON.
    rest: Box<str>,
}

#[derive(Serialize, Deserialize)]
struct Rest {
    #[serde(default)]
    spec: DeploymentSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<DeploymentStatus>,
}

impl CompactDeployment {
    /// Compacts `d`, dropping what no cache needs (see [`super::strip`]).
    pub fn new(mut d: Deployment) -> Result<Self, serde_json::Error> {
        super::strip(&mut d);
        let rest = serde_json::to_string(&Rest {
            spec: d.spec,
            status: d.status,
        })?;
        Ok(CompactDeployment {
            metadata: d.metadata,
            rest: rest.into_boxed_str(),
        })
    }

    /// The Deployment again.
    pub fn to_deployment(&self) -> Result<Deployment, serde_json::Error> {
        let rest: Rest = serde_json::from_str(&self.rest)?;
        Ok(Deployment {
            metadata: self.metadata.clone(),
            spec: rest.spec,
            status: rest.status,
        })
    }

    /// Bytes of the compact spec and status (for tests and measurements).
    pub fn compact_len(&self) -> usize {
        self.rest.len()
    }
}

impl<'de> Deserialize<'de> for CompactDeployment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let d = Deployment::deserialize(deserializer)?;
        CompactDeployment::new(d).map_err(serde::de::Error::custom)
    }
}

impl kube::Resource for CompactDeployment {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Deployment")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("apps")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("deployments")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> serde_json::Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "podinfo", "namespace": "shop", "generation": 4, "uid": "u-1",
                "resourceVersion": "17",
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"huge\": true}",
                    "team": "a"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
                "ownerReferences": [{"apiVersion": "serin.dev/v1alpha1", "kind": "Canary", "name": "podinfo", "uid": "c-1"}]
            },
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "podinfo"}},
                "template": {
                    "metadata": {"labels": {"app": "podinfo"}, "annotations": {"checksum": "abc"}},
                    "spec": {"containers": [{
                        "name": "app", "image": "podinfo:2",
                        "envFrom": [{"configMapRef": {"name": "podinfo-config"}}],
                        "ports": [{"containerPort": 9898}]
                    }]}
                }
            },
            "status": {
                "observedGeneration": 4, "replicas": 3, "updatedReplicas": 3,
                "readyReplicas": 3, "availableReplicas": 3,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]
            }
        })
    }

    /// What comes back is the Deployment as read, but for managedFields and kubectl's
    /// last-applied annotation: the spec, the status and the rest of the metadata are
    /// all there.
    #[test]
    fn a_compact_deployment_gives_back_what_serin_reads() {
        let full: Deployment = serde_json::from_value(deployment()).unwrap();
        let compact: CompactDeployment = serde_json::from_value(deployment()).unwrap();
        let back = compact.to_deployment().unwrap();
        assert_eq!(back.spec, full.spec);
        assert_eq!(back.status, full.status);
        let mut meta = full.metadata.clone();
        meta.managed_fields = None;
        meta.annotations
            .as_mut()
            .unwrap()
            .remove("kubectl.kubernetes.io/last-applied-configuration");
        assert_eq!(back.metadata, meta);
        assert_eq!(kube::Resource::meta(&compact).generation, Some(4));
        assert!(
            !compact.rest.contains(' ') && compact.compact_len() < 600,
            "compact JSON: {}",
            compact.rest
        );
    }

    /// A Deployment without spec or status (a watch may deliver one) survives too.
    #[test]
    fn a_bare_deployment_round_trips() {
        let bare = json!({"metadata": {"name": "x", "namespace": "y"}});
        let compact: CompactDeployment = serde_json::from_value(bare).unwrap();
        let back = compact.to_deployment().unwrap();
        assert_eq!(back.spec, DeploymentSpec::default());
        assert_eq!(back.status, None);
        assert_eq!(back.metadata.name.as_deref(), Some("x"));
    }
}
