//! A map of fixed capacity that evicts its least recently used entry. Serin keeps clients
//! and batchers keyed by what users write in Canaries (a Prometheus address, an AWS region,
//! role and endpoint); with a plain map, a churn of such values would grow the operator for
//! as long as it runs. An evicted entry is built again on its next use.
//!
//! It does not expire entries by time, and finding the entry to evict is a scan: meant for
//! capacities of a few hundred.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// How many entries each of Serin's client caches keeps.
pub const CLIENTS: usize = 256;

/// A map holding at most `capacity` entries.
#[derive(Debug)]
pub struct Bounded<K, V> {
    capacity: usize,
    /// Advances on every use; an entry's stamp is its last use.
    clock: u64,
    entries: HashMap<K, (V, u64)>,
}

impl<K: Eq + Hash + Clone, V> Bounded<K, V> {
    /// An empty map for at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Bounded {
            capacity: capacity.max(1),
            clock: 0,
            entries: HashMap::new(),
        }
    }

    /// The value of `key`, marked as used now.
    pub fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|(v, used)| {
            *used = now;
            &*v
        })
    }

    /// Sets `key` to `value`; when that makes one entry too many, the least recently used
    /// other entry goes.
    pub fn insert(&mut self, key: K, value: V) {
        self.clock += 1;
        let now = self.clock;
        if self.entries.insert(key, (value, now)).is_none() && self.entries.len() > self.capacity {
            let oldest = self
                .entries
                .iter()
                .filter(|(_, (_, used))| *used != now)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A full map drops the entry used longest ago, not the one just read.
    #[test]
    fn evicts_the_least_recently_used() {
        let mut m = Bounded::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        assert_eq!(m.get("a"), Some(&1));
        m.insert("c", 3);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("b"), None);
        assert_eq!(m.get("a"), Some(&1));
        assert_eq!(m.get("c"), Some(&3));
        // Replacing a present key evicts nothing.
        m.insert("a", 10);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("a"), Some(&10));
        assert_eq!(m.get("c"), Some(&3));
    }

    proptest! {
        /// Under any sequence of uses the map never exceeds its capacity, and the key just
        /// inserted is always present.
        #[test]
        fn never_exceeds_its_capacity(cap in 1usize..6, keys in proptest::collection::vec(0u8..12, 0..80)) {
            let mut m = Bounded::new(cap);
            for (i, k) in keys.into_iter().enumerate() {
                if i % 3 == 0 {
                    let _ = m.get(&k);
                } else {
                    m.insert(k, i);
                    prop_assert_eq!(m.get(&k), Some(&i));
                }
                prop_assert!(m.len() <= cap);
            }
        }
    }
}
