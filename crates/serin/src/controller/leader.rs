//! Leader election with a `coordination.k8s.io/v1` Lease.
//!
//! A replica acquires the Lease when it is free or expired, then renews it. Every write is
//! a compare-and-swap on the Lease's resourceVersion, so two replicas can never both
//! believe they hold it. A leader that fails to renew before the lease would expire, or
//! finds another holder, reports the loss and the process exits: it stops writing at once,
//! and a standby takes over within the lease duration.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

/// Lease timing.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (well under `duration`).
    pub renew_every: Duration,
}

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another replica holds the lease now.
    #[error("lease {0} was taken over by {1}")]
    TakenOver(String, String),
    /// Renewal kept failing until the lease expired.
    #[error("could not renew lease {name} before it expired: {source}")]
    RenewFailed {
        /// Lease name.
        name: String,
        /// The last error.
        #[source]
        source: kube::Error,
    },
}

/// Converts between chrono and the Lease's `MicroTime` (jiff inside k8s-openapi): the one
/// place this boundary is crossed.
fn micro_time(t: DateTime<Utc>) -> MicroTime {
    let ts = k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(t.timestamp_micros()) * 1000)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    MicroTime(ts)
}

fn from_micro_time(t: &MicroTime) -> DateTime<Utc> {
    DateTime::from_timestamp_micros((t.0.as_nanosecond() / 1000) as i64).unwrap_or_default()
}

/// Whether `lease` is free for `identity` at `now`: unheld, held by us, or expired.
pub fn is_free(lease: &Lease, identity: &str, now: DateTime<Utc>) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = chrono::Duration::seconds(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(renewed) => from_micro_time(renewed) + duration < now,
        None => true,
    }
}

/// Holds and renews a Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl LeaderElector {
    /// An elector for `config`.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        let api = Api::namespaced(client, &config.namespace);
        LeaderElector { api, config }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "acquired leadership");
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "lease acquisition failed; retrying"),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Utc::now();
        let spec = |transitions: i32| LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.duration.as_secs() as i32),
            acquire_time: Some(micro_time(now)),
            renew_time: Some(micro_time(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        match self.api.get_opt(&self.config.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(0)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                if !is_free(&lease, &self.config.identity, now) {
                    return Ok(false);
                }
                let transitions = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0);
                let ours = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(&self.config.identity);
                lease.spec = Some(spec(if ours { transitions } else { transitions + 1 }));
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Renews the Lease until leadership is lost; returns why. Never returns while leading.
    pub async fn hold(&self) -> LeaseError {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.renew().await {
                Ok(()) => last_renewal = tokio::time::Instant::now(),
                Err(RenewError::Lost(holder)) => {
                    return LeaseError::TakenOver(self.config.name.clone(), holder);
                }
                Err(RenewError::Api(source)) => {
                    // Give up before the lease can expire under us, so no two leaders overlap.
                    if last_renewal.elapsed() + self.config.renew_every >= self.config.duration {
                        return LeaseError::RenewFailed {
                            name: self.config.name.clone(),
                            source,
                        };
                    }
                    tracing::warn!(error = %source, "lease renewal failed; retrying");
                }
            }
        }
    }

    async fn renew(&self) -> Result<(), RenewError> {
        let mut lease = self
            .api
            .get(&self.config.name)
            .await
            .map_err(RenewError::Api)?;
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        if holder != self.config.identity {
            return Err(RenewError::Lost(holder));
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(micro_time(Utc::now()));
        }
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote the Lease between our read and write: it is no longer ours.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Err(RenewError::Lost("another replica".into()))
            }
            Err(e) => Err(RenewError::Api(e)),
        }
    }
}

enum RenewError {
    Lost(String),
    Api(kube::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn lease(holder: &str, renewed: DateTime<Utc>, secs: i32) -> Lease {
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(secs),
                renew_time: Some(micro_time(renewed)),
                ..Default::default()
            }),
        }
    }

    /// A lease is free when unheld, held by us, or not renewed within its duration.
    #[test]
    fn lease_expiry() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let l = lease("a", t, 15);
        assert!(is_free(&l, "a", t));
        assert!(!is_free(&l, "b", t + chrono::Duration::seconds(10)));
        assert!(is_free(&l, "b", t + chrono::Duration::seconds(16)));
        assert!(is_free(&lease("", t, 15), "b", t));
        assert_eq!(from_micro_time(&micro_time(t)), t);
    }
}
