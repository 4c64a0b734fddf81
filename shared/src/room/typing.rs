//! Who is typing: at most one relay per user per `interval`, forgotten
//! after `ttl`, cleared by that user's next message. Never persisted: a
//! restarted room simply forgets (the next keystroke relays again).

use std::collections::HashMap;

use super::Millis;

#[derive(Debug, Clone, Copy)]
struct State {
    last_relay: Millis,
    expires: Millis,
}

#[derive(Debug)]
pub struct Typing {
    users: HashMap<i64, State>,
    interval_ms: u64,
    ttl_ms: u64,
}

impl Typing {
    pub fn new(interval_ms: u64, ttl_ms: u64) -> Self {
        Self {
            users: HashMap::new(),
            interval_ms,
            ttl_ms,
        }
    }

    /// `user` typed at `now`: whether to relay it to the others.
    pub fn typed(&mut self, now: Millis, user: i64) -> bool {
        let relay = self
            .users
            .get(&user)
            .is_none_or(|t| now >= t.last_relay + self.interval_ms);
        let expires = now + self.ttl_ms;
        match self.users.get_mut(&user) {
            Some(t) if !relay => t.expires = expires,
            _ => {
                self.users.insert(
                    user,
                    State {
                        last_relay: now,
                        expires,
                    },
                );
            }
        }
        relay
    }

    /// A message ends its sender's typing.
    pub fn stopped(&mut self, user: i64) {
        self.users.remove(&user);
    }

    /// Users typing at `now`, but `except`.
    pub fn typing_now(&self, now: Millis, except: i64) -> Vec<i64> {
        let mut users: Vec<i64> = self
            .users
            .iter()
            .filter(|(u, t)| **u != except && t.expires > now)
            .map(|(u, _)| *u)
            .collect();
        users.sort_unstable();
        users
    }

    pub fn expire(&mut self, now: Millis) {
        self.users.retain(|_, t| t.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_relays_at_most_once_per_interval_and_a_message_clears_it() {
        let mut t = Typing::new(2_000, 5_000);
        assert!(t.typed(0, 7));
        assert!(!t.typed(1_000, 7), "throttled");
        assert!(t.typed(2_000, 7));
        t.stopped(7);
        assert!(t.typed(2_100, 7), "a message cleared the throttle");
        assert_eq!(t.typing_now(3_000, 8), vec![7]);
        assert!(
            t.typing_now(3_000, 7).is_empty(),
            "nobody is told of themselves"
        );
        t.expire(8_000);
        assert!(t.typing_now(8_000, 8).is_empty(), "forgotten after the ttl");
    }
}
