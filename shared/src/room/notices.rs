//! Notices to the per-user layer ("conversation updated"), coalesced: at
//! most one per `interval` per room, carrying every member touched since the
//! last one. Best effort: the REST conversation list is the truth.

use std::collections::HashSet;

use super::Millis;

#[derive(Debug)]
pub struct Notices {
    users: HashSet<i64>,
    last: Option<Millis>,
    interval_ms: u64,
}

impl Notices {
    pub fn new(interval_ms: u64) -> Self {
        Self {
            users: HashSet::new(),
            last: None,
            interval_ms,
        }
    }

    /// `users` need a notice; true when one may go now.
    pub fn want(&mut self, now: Millis, users: impl IntoIterator<Item = i64>) -> bool {
        self.users.extend(users);
        self.due_at().is_some_and(|t| now >= t)
    }

    /// When the pending notice may go.
    pub fn due_at(&self) -> Option<Millis> {
        if self.users.is_empty() {
            return None;
        }
        Some(self.last.map_or(0, |last| last + self.interval_ms))
    }

    /// Takes the recipients of the notice going at `now`, sorted.
    pub fn take(&mut self, now: Millis) -> Vec<i64> {
        self.last = Some(now);
        let mut users: Vec<i64> = self.users.drain().collect();
        users.sort_unstable();
        users
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_go_at_once_then_at_most_once_per_interval() {
        let mut n = Notices::new(250);
        assert!(n.want(1_000, [1, 2]));
        assert_eq!(n.take(1_000), vec![1, 2]);
        assert!(!n.want(1_100, [2]));
        assert!(!n.want(1_200, [3]));
        assert_eq!(n.due_at(), Some(1_250));
        assert_eq!(n.take(1_250), vec![2, 3]);
        assert_eq!(n.due_at(), None);
    }
}
