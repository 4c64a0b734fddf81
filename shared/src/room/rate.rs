//! The per-user flood limit: every frame draws on its user's token bucket
//! ([`crate::bucket`]), at the price [`cost`] names.

use std::collections::HashMap;

use super::Millis;
use crate::bucket::{Bucket, Rate};

/// What each kind of frame costs from its user's token bucket (a message
/// is one token). Every frame costs something, so a flood of typing,
/// reads, pings or garbage is throttled like a flood of messages; the
/// frequent small ones cost less.
pub mod cost {
    pub const MESSAGE: f64 = 1.0;
    /// A resend of a key the room remembers: answered from memory.
    pub const RESEND: f64 = 0.25;
    pub const TYPING: f64 = 0.5;
    pub const READ: f64 = 0.5;
    pub const PING: f64 = 0.25;
    pub const AUTH: f64 = 1.0;
    /// Malformed JSON, an unknown type, a bad field.
    pub const GARBAGE: f64 = 1.0;
}

#[derive(Debug)]
pub struct Limiter {
    buckets: HashMap<i64, Bucket>,
    rate: Rate,
}

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            buckets: HashMap::new(),
            rate,
        }
    }

    /// Takes `cost` from `user`'s bucket, or says in how many ms it would
    /// be there.
    pub fn take(&mut self, now: Millis, user: i64, cost: f64) -> Result<(), u64> {
        let rate = self.rate;
        self.buckets
            .entry(user)
            .or_insert_with(|| Bucket::full(rate, now))
            .take(now, cost, rate)
    }

    /// Refusals in a row for `user`.
    pub fn strikes(&self, user: i64) -> u32 {
        self.buckets.get(&user).map_or(0, |b| b.strikes)
    }

    pub fn forget(&mut self, user: i64) {
        self.buckets.remove(&user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_has_their_own_bucket() {
        let mut l = Limiter::new(Rate {
            burst: 2,
            per_sec: 1,
        });
        assert!(l.take(0, 1, cost::MESSAGE).is_ok());
        assert!(l.take(0, 1, cost::MESSAGE).is_ok());
        assert_eq!(l.take(0, 1, cost::MESSAGE), Err(1_000));
        assert_eq!(l.strikes(1), 1);
        assert!(
            l.take(0, 2, cost::MESSAGE).is_ok(),
            "another user is not affected"
        );
        l.forget(1);
        assert!(
            l.take(0, 1, cost::MESSAGE).is_ok(),
            "a removed member starts afresh"
        );
    }
}
