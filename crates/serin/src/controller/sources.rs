//! Adapters between the controller and the metric providers: the provider evaluator as a
//! [`MetricSource`], and Secrets read through the Kubernetes API for provider credentials.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::MetricSource;
use crate::analysis::{LookBatch, MetricObservation};
use crate::metrics::{CanaryContext, Evaluator, SecretLookup};

#[async_trait]
impl MetricSource for Evaluator {
    async fn evaluate(&self, canary: &CanaryContext, now: DateTime<Utc>) -> Vec<MetricObservation> {
        Evaluator::evaluate(self, canary, now).await
    }

    async fn looks(
        &self,
        canary: &CanaryContext,
        from: DateTime<Utc>,
        step: std::time::Duration,
        now: DateTime<Utc>,
    ) -> LookBatch {
        Evaluator::looks(self, canary, from, step, now).await
    }
}

/// Reads provider credentials from Secrets in the Canary's namespace.
pub struct KubeSecrets {
    client: kube::Client,
}

impl KubeSecrets {
    /// Secrets through `client`.
    pub fn new(client: kube::Client) -> Self {
        KubeSecrets { client }
    }
}

#[async_trait]
impl SecretLookup for KubeSecrets {
    async fn secret_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(s)) => {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    data.insert(k, v.into_bytes());
                }
                Ok(data)
            }
            Ok(None) => Err(format!(
                "secret {namespace}/{name} not found: create it or fix secretRef.name"
            )),
            Err(kube::Error::Api(s)) if s.code == 403 => Err(format!(
                "reading secret {namespace}/{name} is forbidden: grant Serin's service account get on secrets"
            )),
            Err(e) => Err(format!("reading secret {namespace}/{name}: {e}")),
        }
    }
}
