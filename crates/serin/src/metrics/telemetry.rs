//! `serin_provider_requests_total{provider, outcome}`: calls to metric providers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    provider: String,
    outcome: String,
}

/// Counts provider calls: one per Prometheus HTTP query, one per CloudWatch GetMetricData
/// call (a batch, retries included). `outcome` is `success` or a [`MetricError`] category.
///
/// [`MetricError`]: super::MetricError
#[derive(Clone, Debug, Default)]
pub struct ProviderMetrics {
    requests: Family<Labels, Counter>,
}

impl ProviderMetrics {
    /// Registers the counter as `serin_provider_requests_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "serin_provider_requests",
            "Calls to metric providers (Prometheus queries, CloudWatch GetMetricData calls) by outcome",
            self.requests.clone(),
        );
    }

    /// Counts one call.
    pub fn inc(&self, provider: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&Labels {
                provider: provider.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// The count so far for one label pair.
    pub fn get(&self, provider: &str, outcome: &str) -> u64 {
        self.requests
            .get_or_create(&Labels {
                provider: provider.to_string(),
                outcome: outcome.to_string(),
            })
            .get()
    }
}
