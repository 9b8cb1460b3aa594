//! The subscription index: which local connections listen on which channel.
//!
//! Many connection tasks subscribe and unsubscribe concurrently while publishers fan out, so the
//! map is split into shards by channel hash, each behind its own `RwLock`. A publication takes
//! one read lock for the whole fan-out; subscribing to one channel never blocks publishing to
//! another shard. Callbacks run under the lock, so they must not block (pushing into a
//! connection's queue is fine).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, PoisonError, RwLock};

/// A connection's id, unique within one server process.
pub type ConnId = u64;

type Shard<S> = RwLock<HashMap<Arc<str>, HashMap<ConnId, S>>>;

/// Channel → (connection → subscriber handle `S`).
pub struct SubscriptionIndex<S> {
    shards: Box<[Shard<S>]>,
    hasher: RandomState,
}

impl<S> Default for SubscriptionIndex<S> {
    fn default() -> Self {
        Self::with_shards(64)
    }
}

impl<S> SubscriptionIndex<S> {
    pub fn with_shards(shards: usize) -> Self {
        let shards = shards.max(1);
        Self {
            shards: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, channel: &str) -> &Shard<S> {
        let i = self.hasher.hash_one(channel) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Adds `conn` to `channel`. Returns `false` (and keeps the old handle) when it was already
    /// there.
    pub fn subscribe(&self, channel: &Arc<str>, conn: ConnId, subscriber: S) -> bool {
        let mut shard = self
            .shard(channel)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let subs = shard.entry(Arc::clone(channel)).or_default();
        if subs.contains_key(&conn) {
            return false;
        }
        subs.insert(conn, subscriber);
        true
    }

    /// Removes `conn` from `channel`. Returns whether it was subscribed. A channel left with no
    /// subscriber is dropped from the map.
    pub fn unsubscribe(&self, channel: &str, conn: ConnId) -> bool {
        let mut shard = self
            .shard(channel)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(subs) = shard.get_mut(channel) else {
            return false;
        };
        let removed = subs.remove(&conn).is_some();
        if subs.is_empty() {
            shard.remove(channel);
        }
        removed
    }

    /// Calls `f` for every subscriber of `channel` and returns how many there were.
    pub fn for_each_subscriber(&self, channel: &str, mut f: impl FnMut(ConnId, &S)) -> usize {
        let shard = self
            .shard(channel)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.get(channel) {
            None => 0,
            Some(subs) => {
                for (id, s) in subs {
                    f(*id, s);
                }
                subs.len()
            }
        }
    }

    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.for_each_subscriber(channel, |_, _| {})
    }

    /// Every channel with at least one subscriber, with its subscriber count, sorted by name.
    pub fn channels(&self) -> Vec<(Arc<str>, usize)> {
        let mut all: Vec<(Arc<str>, usize)> = self
            .shards
            .iter()
            .flat_map(|s| {
                let shard = s.read().unwrap_or_else(PoisonError::into_inner);
                shard
                    .iter()
                    .map(|(c, subs)| (Arc::clone(c), subs.len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Number of channels with at least one subscriber.
    pub fn channel_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ch(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn subscribe_fan_out_unsubscribe() {
        let idx = SubscriptionIndex::<&'static str>::with_shards(4);
        assert!(idx.subscribe(&ch("a"), 1, "one"));
        assert!(idx.subscribe(&ch("a"), 2, "two"));
        assert!(!idx.subscribe(&ch("a"), 2, "again"));
        assert!(idx.subscribe(&ch("b"), 1, "one"));
        let mut seen = vec![];
        assert_eq!(idx.for_each_subscriber("a", |id, s| seen.push((id, *s))), 2);
        seen.sort();
        assert_eq!(seen, vec![(1, "one"), (2, "two")]);
        assert_eq!(idx.channel_count(), 2);
        assert!(idx.unsubscribe("a", 1));
        assert!(!idx.unsubscribe("a", 1));
        assert!(idx.unsubscribe("a", 2));
        assert_eq!(idx.subscriber_count("a"), 0);
        assert_eq!(idx.channels(), vec![(ch("b"), 1)]);
    }

    proptest! {
        /// After any sequence of subscribes and unsubscribes, the index agrees with a plain model.
        #[test]
        fn agrees_with_a_model(ops in proptest::collection::vec((any::<bool>(), 0u8..4, 0u64..5), 0..200)) {
            let idx = SubscriptionIndex::<()>::with_shards(3);
            let mut model = std::collections::BTreeSet::new();
            for (sub, c, conn) in ops {
                let name = format!("c{c}");
                if sub {
                    prop_assert_eq!(idx.subscribe(&ch(&name), conn, ()), model.insert((name, conn)));
                } else {
                    prop_assert_eq!(idx.unsubscribe(&name, conn), model.remove(&(name, conn)));
                }
            }
            let mut counts = std::collections::BTreeMap::<String, usize>::new();
            for (c, _) in &model { *counts.entry(c.clone()).or_default() += 1; }
            let got: Vec<(String, usize)> = idx.channels().into_iter().map(|(c, n)| (c.to_string(), n)).collect();
            prop_assert_eq!(got, counts.into_iter().collect::<Vec<_>>());
        }
    }
}
