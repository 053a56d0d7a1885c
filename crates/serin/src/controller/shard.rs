//! Shards: several replicas share the Canaries, each shard led through its own Lease.
//!
//! A Canary's shard is its label `serin.io/shard`, a **bucket** from 0 to 63 that never
//! changes with the shard count: Serin sets it on first sight from a hash of the Canary's
//! UID, or a user sets it to pin a Canary. With `--shards N`, shard `i` owns the buckets
//! `b` with `b mod N = i`, and its leader watches only those (a set-based label selector),
//! so each replica caches only its own shard's Canaries. One shard count never moves a
//! bucket between two live shards; the shard-count Lease of [`super::leader`] keeps two
//! shard counts from acting at once.
//!
//! Canaries without a valid label are nobody's: the leader of shard 0 watches them
//! (`serin.io/shard notin (0, …, 63)`, which also matches a missing label), labels the
//! unlabelled ones, and reports an invalid value on the Canary (a `Ready=False` condition
//! and a Warning Event naming the label and the fix) without changing it. With one shard
//! the label is not needed: the one leader owns every Canary, labelled or not.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

use super::{Context, EventType, publish};
use crate::api::Canary;

/// The label that holds a Canary's bucket.
pub const LABEL: &str = "serin.io/shard";

/// Buckets, and so the most shards there can be.
pub const BUCKETS: u16 = 64;

/// This replica's part: shard `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 0.
    pub index: u16,
    /// How many shards there are, 1 to [`BUCKETS`].
    pub count: u16,
}

impl Shard {
    /// The one shard of an unsharded operator.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// The buckets this shard owns, ascending.
    pub fn buckets(&self) -> Vec<u16> {
        let count = self.count.max(1);
        (0..BUCKETS).filter(|b| b % count == self.index).collect()
    }

    /// The label selector of this shard's Canaries; `None` with one shard (every Canary,
    /// labelled or not).
    pub fn selector(&self) -> Option<String> {
        (self.count > 1).then(|| format!("{LABEL} in ({})", list(&self.buckets())))
    }

    /// Whether this shard labels the Canaries nobody owns.
    pub fn labels_unassigned(&self) -> bool {
        self.count > 1 && self.index == 0
    }

    /// Whether this shard owns a Canary with `label` (the value of `serin.io/shard`).
    pub fn owns(&self, label: Option<&str>) -> bool {
        if self.count <= 1 {
            return true;
        }
        matches!(label.map(parse), Some(Ok(b)) if b % self.count == self.index)
    }
}

fn list(buckets: &[u16]) -> String {
    buckets
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The selector of the Canaries no shard owns: no label, or a value that is no bucket.
pub fn unassigned_selector() -> String {
    let all: Vec<u16> = (0..BUCKETS).collect();
    format!("{LABEL} notin ({})", list(&all))
}

/// The bucket of a Canary with this UID: FNV-1a, stable across releases and processes.
pub fn bucket_of(uid: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u16::try_from(h % u64::from(BUCKETS)).unwrap_or(0)
}

/// A label value as a bucket, or the message that says what is wrong and what to do.
pub fn parse(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(b) if b < BUCKETS && value == b.to_string() => Ok(b),
        _ => Err(format!(
            "metadata.labels[\"{LABEL}\"] is {value:?}, which is no shard bucket: set it to a whole number from 0 to {} (the shard is the bucket modulo the shard count), or remove it and Serin picks one",
            BUCKETS - 1
        )),
    }
}

/// Labels the Canaries no shard owns, and reports invalid labels, until the stream ends.
/// Run by the leader of shard 0 only; its writes pass the same fence as every other.
pub async fn label_unassigned(ctx: Arc<Context>, namespace: Option<String>) {
    let api: Api<PartialObjectMeta<Canary>> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let config = watcher::Config::default().labels(&unassigned_selector());
    let mut stream = watcher::watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    // Invalid labels already reported, by (uid, value): reported again only when the
    // value changes. Bounded: it starts afresh past 10,000.
    let mut reported: HashSet<(String, String)> = HashSet::new();
    while let Some(next) = stream.next().await {
        let Ok(canary) = next else { continue };
        let (Some(ns), Some(name), Some(uid)) = (
            canary.metadata.namespace.clone(),
            canary.metadata.name.clone(),
            canary.metadata.uid.clone(),
        ) else {
            continue;
        };
        let namespaced: Api<Canary> = Api::namespaced(ctx.client.clone(), &ns);
        let label = canary
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL))
            .cloned();
        match label {
            None => {
                let bucket = bucket_of(&uid);
                // Guarded by the resourceVersion: a label a user sets meanwhile wins.
                let patch = json!({"metadata": {
                    "labels": {LABEL: bucket.to_string()},
                    "resourceVersion": canary.metadata.resource_version,
                }});
                match namespaced
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(namespace = %ns, canary = %name, bucket, "assigned the Canary to a shard bucket")
                    }
                    Err(e) => {
                        tracing::debug!(namespace = %ns, canary = %name, error = %e, "could not label the Canary; the watch brings it again")
                    }
                }
            }
            Some(value) => {
                let Err(message) = parse(&value) else {
                    continue;
                };
                if reported.len() > 10_000 {
                    reported.clear();
                }
                if !reported.insert((uid.clone(), value)) {
                    continue;
                }
                tracing::warn!(namespace = %ns, canary = %name, "{message}");
                let condition = json!({
                    "type": "Ready",
                    "status": "False",
                    "reason": "InvalidShardLabel",
                    "message": message,
                    "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "observedGeneration": canary.metadata.generation,
                });
                let status = json!({"status": {"conditions": [condition]}});
                if let Err(e) = namespaced
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                {
                    tracing::debug!(error = %e, "could not record the invalid shard label");
                }
                let reference = ObjectReference {
                    api_version: Some("serin.dev/v1alpha1".into()),
                    kind: Some("Canary".into()),
                    name: Some(name),
                    namespace: Some(ns),
                    uid: Some(uid),
                    ..Default::default()
                };
                publish(
                    &ctx,
                    &reference,
                    EventType::Warning,
                    "InvalidShardLabel",
                    message,
                )
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// For every shard count, each bucket belongs to exactly one shard, by selector and by
    /// [`Shard::owns`] alike: no Canary has two shards, none has none.
    #[test]
    fn every_bucket_has_exactly_one_shard_for_every_count() {
        for count in 1..=BUCKETS {
            let mut owners = vec![0u16; usize::from(BUCKETS)];
            for index in 0..count {
                let shard = Shard { index, count };
                for b in shard.buckets() {
                    owners[usize::from(b)] += 1;
                    assert!(shard.owns(Some(&b.to_string())), "{shard:?} bucket {b}");
                }
                for b in 0..BUCKETS {
                    let other = Shard {
                        index: (index + 1) % count,
                        count,
                    };
                    if count > 1 && shard.owns(Some(&b.to_string())) {
                        assert!(!other.owns(Some(&b.to_string())), "{b} in two shards");
                    }
                }
            }
            assert!(owners.iter().all(|&n| n == 1), "count {count}: {owners:?}");
        }
    }

    #[test]
    fn selectors_name_the_buckets_and_one_shard_needs_none() {
        assert_eq!(Shard::ALL.selector(), None);
        assert!(Shard::ALL.owns(None), "one shard owns unlabelled Canaries");
        let s = Shard { index: 1, count: 3 };
        let sel = s.selector().unwrap();
        assert!(sel.starts_with("serin.io/shard in (1,4,7,"), "{sel}");
        assert!(sel.ends_with(",61)"), "{sel}");
        assert!(
            !s.owns(None),
            "with shards, an unlabelled Canary is nobody's"
        );
        assert!(unassigned_selector().starts_with("serin.io/shard notin (0,1,2,"));
        assert!(unassigned_selector().ends_with(",63)"));
        assert!(Shard { index: 0, count: 2 }.labels_unassigned());
        assert!(!Shard { index: 1, count: 2 }.labels_unassigned());
        assert!(!Shard::ALL.labels_unassigned());
    }

    #[test]
    fn invalid_labels_are_named_with_the_fix() {
        for bad in ["64", "-1", "01", "x", "", " 3"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("metadata.labels[\"serin.io/shard\"]"), "{e}");
            assert!(e.contains("from 0 to 63"), "{e}");
        }
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("63"), Ok(63));
    }

    proptest! {
        /// Buckets are in range and the same for the same UID.
        #[test]
        fn buckets_are_stable_and_in_range(uid in "[0-9a-f-]{0,40}") {
            let b = bucket_of(&uid);
            prop_assert!(b < BUCKETS);
            prop_assert_eq!(b, bucket_of(&uid));
        }
    }

    /// UIDs spread over the buckets: no bucket gets more than twice its share of 64,000.
    #[test]
    fn uids_spread_over_the_buckets() {
        let mut n = vec![0u32; usize::from(BUCKETS)];
        for i in 0..64_000u32 {
            let uid = format!(
                "{:08x}-1c2d-4e5f-8a9b-{:012x}",
                i.wrapping_mul(2_654_435_761),
                i
            );
            n[usize::from(bucket_of(&uid))] += 1;
        }
        let (min, max) = (n.iter().min().unwrap(), n.iter().max().unwrap());
        assert!(*min > 500 && *max < 2000, "{min}..{max}");
    }
}
