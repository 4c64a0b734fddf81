//! The in-memory cache of idempotency keys: the newest `horizon` of them.
//!
//! Idempotency itself has no horizon: a key the cache does not hold is
//! claimed in storage (`Context::claim_key`), which answers with the
//! original if the room ever stored it. The cache answers the resends that
//! matter most, the recent ones (a client back from a short outage),
//! without touching storage.

use std::collections::{HashMap, VecDeque};

use super::storage::KnownKey;

#[derive(Debug)]
pub struct KeyCache {
    keys: HashMap<(i64, String), KnownKey>,
    order: VecDeque<(i64, String)>,
    horizon: usize,
}

impl KeyCache {
    pub fn new(horizon: usize) -> Self {
        Self {
            keys: HashMap::new(),
            order: VecDeque::new(),
            horizon,
        }
    }

    pub fn get(&self, sender: i64, key: &str) -> Option<KnownKey> {
        // The map is keyed by owned strings; a lookup allocates one, which
        // is the price of a simple map (issue 10 measures the hot path).
        self.keys.get(&(sender, key.to_owned())).copied()
    }

    pub fn remember(&mut self, sender: i64, key: String, known: KnownKey) {
        if self.keys.insert((sender, key.clone()), known).is_none() {
            self.order.push_back((sender, key));
        }
        while self.order.len() > self.horizon {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn known(seq: i64) -> KnownKey {
        KnownKey {
            seq,
            id: Uuid::from_u128(seq as u128),
            created_at_ms: 0,
        }
    }

    #[test]
    fn the_cache_keeps_the_newest_keys_per_sender_and_key() {
        let mut c = KeyCache::new(2);
        c.remember(1, "a".into(), known(1));
        c.remember(2, "a".into(), known(2));
        assert_eq!(c.get(1, "a"), Some(known(1)));
        assert_eq!(c.get(2, "a"), Some(known(2)), "another sender, same key");
        c.remember(1, "b".into(), known(3));
        assert_eq!(c.get(1, "a"), None, "the oldest left the cache");
        assert_eq!(c.get(1, "b"), Some(known(3)));
        // Remembering a key again does not count twice.
        c.remember(1, "b".into(), known(3));
        assert_eq!(c.get(2, "a"), Some(known(2)));
    }
}
