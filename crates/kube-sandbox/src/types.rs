//! The resource types the embedded server serves: built-in kinds and kinds defined by CRDs,
//! plus the discovery documents built from them.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::error::{ApiError, Cause};

/// Where a CRD's scale subresource finds replicas and the selector.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePaths {
    /// `.spec.replicas`
    pub spec_replicas: String,
    /// `.status.replicas`
    pub status_replicas: String,
    /// `.status.selector`, when declared.
    pub label_selector: Option<String>,
}

/// One served version of a resource.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    /// `v1`, `v1beta2`, ...
    pub name: String,
    /// `openAPIV3Schema`, for custom resources.
    pub schema: Option<Value>,
    /// `additionalPrinterColumns`.
    pub printer_columns: Vec<Value>,
    /// Status subresource declared for this version.
    pub status: bool,
    /// Scale subresource declared for this version.
    pub scale: Option<ScalePaths>,
    /// The CRD's `selectableFields` (paths without the leading dot).
    pub selectable_fields: Vec<String>,
}

/// A resource type (group + plural) with everything needed to serve it.
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// API group, `""` for core.
    pub group: String,
    /// Lower-case plural, e.g. `canaries`.
    pub plural: String,
    /// Lower-case singular.
    pub singular: String,
    /// Kind, e.g. `Canary`.
    pub kind: String,
    /// Short names for discovery.
    pub short_names: Vec<String>,
    /// Categories for discovery (`all`, ...).
    pub categories: Vec<String>,
    /// Namespaced (`true`) or cluster-scoped.
    pub namespaced: bool,
    /// Served versions, storage version first.
    pub versions: Vec<VersionInfo>,
    /// Version objects are stored in.
    pub storage_version: String,
    /// Defined by a CRD (schema validation, pruning, `generation` always tracked).
    pub custom: bool,
    /// `metadata.generation` is maintained.
    pub tracks_generation: bool,
}

impl ResourceType {
    /// Looks up a served version.
    pub fn version(&self, name: &str) -> Option<&VersionInfo> {
        self.versions.iter().find(|v| v.name == name)
    }

    /// Checks that a field selector names only fields this type can select on, as the real
    /// server's lists allow them, with its wording for a refusal.
    pub fn check_field_selector<'a>(
        &self,
        version: &str,
        fields: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ApiError> {
        const META: &[&str] = &["metadata.name", "metadata.namespace"];
        const INVOLVED: &[&str] = &[
            "kind",
            "namespace",
            "name",
            "uid",
            "apiVersion",
            "resourceVersion",
            "fieldPath",
        ];
        // Kinds with their own field-label conversion answer `field label not supported`;
        // the others list what they accept.
        let (extra, own_conversion): (Vec<String>, bool) =
            match (self.group.as_str(), self.plural.as_str()) {
                _ if self.custom => (
                    self.version(version)
                        .map(|v| v.selectable_fields.clone())
                        .unwrap_or_default(),
                    true,
                ),
                ("", "pods") => (
                    [
                        "spec.nodeName",
                        "spec.restartPolicy",
                        "spec.schedulerName",
                        "spec.serviceAccountName",
                        "spec.hostNetwork",
                        "status.phase",
                        "status.podIP",
                        "status.podIPs",
                        "status.nominatedNodeName",
                    ]
                    .map(String::from)
                    .to_vec(),
                    true,
                ),
                ("", "secrets") => (vec!["type".into()], true),
                ("", "services") => (vec!["spec.clusterIP".into(), "spec.type".into()], true),
                ("", "namespaces") => (vec!["status.phase".into()], true),
                ("", "events") => (
                    INVOLVED
                        .iter()
                        .map(|f| format!("involvedObject.{f}"))
                        .chain(["reason", "reportingComponent", "source", "type"].map(String::from))
                        .collect(),
                    true,
                ),
                ("events.k8s.io", "events") => (
                    INVOLVED
                        .iter()
                        .map(|f| format!("regarding.{f}"))
                        .chain(["reason", "reportingController", "type"].map(String::from))
                        .collect(),
                    true,
                ),
                ("apps", "replicasets") => (vec!["status.replicas".into()], false),
                _ => (Vec::new(), false),
            };
        for field in fields {
            let meta = if self.plural == "namespaces" && self.group.is_empty() {
                field == "metadata.name"
            } else {
                META.contains(&field)
            };
            if meta || extra.iter().any(|e| e == field) {
                continue;
            }
            return Err(ApiError::bad_request(if own_conversion {
                format!("field label not supported: {field}")
            } else {
                format!(
                    "{field:?} is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
                )
            }));
        }
        Ok(())
    }

    /// `apiVersion` string for a version.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }
}

/// Kubernetes version priority: GA > beta > alpha > other; higher numbers first.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn key(v: &str) -> (u8, u64, u64, String) {
        let Some(rest) = v.strip_prefix('v') else {
            return (0, 0, 0, v.to_string());
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(major) = digits.parse::<u64>() else {
            return (0, 0, 0, v.to_string());
        };
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return (3, major, 0, String::new());
        }
        for (prefix, rank) in [("beta", 2u8), ("alpha", 1u8)] {
            if let Some(n) = tail.strip_prefix(prefix)
                && let Ok(minor) = n.parse::<u64>()
            {
                return (rank, major, minor, String::new());
            }
        }
        (0, 0, 0, v.to_string())
    }
    let (ka, kb) = (key(a), key(b));
    // Unknown shapes sort alphabetically, but below every Kubernetes-style version.
    ka.0.cmp(&kb.0)
        .then(ka.1.cmp(&kb.1))
        .then(ka.2.cmp(&kb.2))
        .then(kb.3.cmp(&ka.3))
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short_names: &[&str],
    status: bool,
    scale: bool,
) -> ResourceType {
    let scale = scale.then(|| ScalePaths {
        spec_replicas: ".spec.replicas".to_string(),
        status_replicas: ".status.replicas".to_string(),
        label_selector: None,
    });
    ResourceType {
        group: group.to_string(),
        plural: plural.to_string(),
        singular: kind.to_lowercase(),
        kind: kind.to_string(),
        short_names: short_names.iter().map(|s| s.to_string()).collect(),
        categories: if matches!(plural, "services" | "deployments" | "replicasets" | "pods") {
            vec!["all".to_string()]
        } else {
            Vec::new()
        },
        namespaced,
        versions: vec![VersionInfo {
            name: version.to_string(),
            schema: None,
            printer_columns: Vec::new(),
            status,
            scale,
            selectable_fields: Vec::new(),
        }],
        storage_version: version.to_string(),
        custom: false,
        tracks_generation: matches!(
            plural,
            "deployments" | "replicasets" | "customresourcedefinitions"
        ),
    }
}

/// The built-in kinds this server knows.
pub fn builtins() -> Vec<ResourceType> {
    vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
        ),
        builtin("", "v1", "services", "Service", true, &["svc"], true, false),
        builtin("", "v1", "pods", "Pod", true, &["po"], true, false),
        builtin("", "v1", "events", "Event", true, &["ev"], false, false),
        builtin(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
        ),
        builtin("", "v1", "secrets", "Secret", true, &[], false, false),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
        ),
        builtin(
            "",
            "v1",
            "endpoints",
            "Endpoints",
            true,
            &["ep"],
            false,
            false,
        ),
        builtin(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            true,
            true,
        ),
        builtin(
            "apps",
            "v1",
            "replicasets",
            "ReplicaSet",
            true,
            &["rs"],
            true,
            true,
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            false,
            false,
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            true,
            &["hpa"],
            true,
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            false,
        ),
    ]
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn crd_invalid(name: &str, field: &str, message: &str) -> ApiError {
    ApiError::invalid(
        "apiextensions.k8s.io",
        "CustomResourceDefinition",
        name,
        vec![Cause {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: message.to_string(),
        }],
    )
}

/// Builds the served type from an `apiextensions.k8s.io/v1` CustomResourceDefinition.
pub fn from_crd(crd: &Value) -> Result<ResourceType, ApiError> {
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let spec = crd
        .get("spec")
        .ok_or_else(|| crd_invalid(name, "spec", "Required value"))?;
    let group = spec.get("group").and_then(Value::as_str).unwrap_or("");
    if group.is_empty() {
        return Err(crd_invalid(name, "spec.group", "Required value"));
    }
    let names = spec.get("names").cloned().unwrap_or(Value::Null);
    let plural = names.get("plural").and_then(Value::as_str).unwrap_or("");
    let kind = names.get("kind").and_then(Value::as_str).unwrap_or("");
    if plural.is_empty() {
        return Err(crd_invalid(name, "spec.names.plural", "Required value"));
    }
    if kind.is_empty() {
        return Err(crd_invalid(name, "spec.names.kind", "Required value"));
    }
    if name != format!("{plural}.{group}") {
        return Err(crd_invalid(
            name,
            "metadata.name",
            &format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    let scope = spec
        .get("scope")
        .and_then(Value::as_str)
        .unwrap_or("Namespaced");
    let mut versions = Vec::new();
    let mut storage = Vec::new();
    for (i, v) in spec
        .get("versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let vname = v
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            storage.push(vname.clone());
        }
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let sub = v.get("subresources");
        let scale = sub.and_then(|s| s.get("scale")).map(|s| ScalePaths {
            spec_replicas: s
                .get("specReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".spec.replicas")
                .to_string(),
            status_replicas: s
                .get("statusReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".status.replicas")
                .to_string(),
            label_selector: s
                .get("labelSelectorPath")
                .and_then(Value::as_str)
                .map(str::to_string),
        });
        if vname.is_empty() {
            return Err(crd_invalid(
                name,
                &format!("spec.versions[{i}].name"),
                "Required value",
            ));
        }
        versions.push(VersionInfo {
            name: vname,
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            printer_columns: v
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            status: sub.and_then(|s| s.get("status")).is_some(),
            scale,
            selectable_fields: v
                .get("selectableFields")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|f| f.get("jsonPath").and_then(Value::as_str))
                .map(|p| p.trim_start_matches('.').to_string())
                .collect(),
        });
    }
    if storage.len() != 1 {
        return Err(crd_invalid(
            name,
            "spec.versions",
            &format!(
                "Invalid value: {}: must have exactly one version marked as storage version",
                storage.len()
            ),
        ));
    }
    Ok(ResourceType {
        group: group.to_string(),
        plural: plural.to_string(),
        singular: names
            .get("singular")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| kind.to_lowercase()),
        kind: kind.to_string(),
        short_names: strings(names.get("shortNames")),
        categories: strings(names.get("categories")),
        namespaced: scope == "Namespaced",
        versions,
        storage_version: storage.remove(0),
        custom: true,
        tracks_generation: true,
    })
}

/// `APIResourceList` for one group/version.
pub fn resource_list(types: &[&ResourceType], group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for t in types {
        let Some(v) = t.version(version) else {
            continue;
        };
        let mut verbs = vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        verbs.sort_unstable();
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": verbs,
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if v.status {
            resources.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
        if v.scale.is_some() {
            resources.push(json!({"name": format!("{}/scale", t.plural), "singularName": "", "namespaced": t.namespaced,
                "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// `APIGroupList` for `/apis`.
pub fn group_list(types: &[&ResourceType]) -> Value {
    let mut groups: BTreeMap<&str, Vec<&ResourceType>> = BTreeMap::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        groups.entry(t.group.as_str()).or_default().push(t);
    }
    let list: Vec<Value> = groups
        .into_iter()
        .map(|(group, ts)| {
            let mut names: Vec<String> = ts
                .iter()
                .flat_map(|t| t.versions.iter().map(|v| v.name.clone()))
                .collect();
            names.sort_by(|a, b| compare_versions(b, a));
            names.dedup();
            let versions: Vec<Value> = names
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            let preferred = versions.first().cloned().unwrap_or(Value::Null);
            json!({"name": group, "versions": versions, "preferredVersion": preferred})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Version priority orders GA before beta before alpha, as discovery does.
    #[test]
    fn version_priority() {
        let mut v = vec!["v1alpha1", "v1beta2", "v2", "v1", "foo", "v1beta1"];
        v.sort_by(|a, b| compare_versions(b, a));
        assert_eq!(v, vec!["v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]);
    }
}
