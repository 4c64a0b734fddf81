//! Bounds password guessing without handing attackers a way to lock people
//! out.
//!
//! Two layers, both counting failed password checks (login, and the
//! current password of a password change) in a fixed [`LoginGuard::WINDOW`]:
//!
//! 1. **Per email and client address: locks.** After
//!    [`LoginGuard::MAX_FAILURES`] failures for one email from one address,
//!    that pair gets `429 too_many_attempts` until its window ends, even
//!    with the right password (or guessing would simply go on). An attacker
//!    elsewhere cannot lock the owner out: the owner's address has its own
//!    count. IPv6 addresses count per /64, the block one subscriber gets.
//! 2. **Per email, every address: slows.** Past
//!    [`LoginGuard::SLOW_AFTER`] failures for an email, every attempt for it
//!    waits before its password is checked: 250 ms, doubling per further
//!    failure, at most [`LoginGuard::MAX_DELAY`]. A right password still
//!    gets through, a little later; guessing from many addresses gets one
//!    try per address per window, each a few seconds slow.
//!
//! Unknown emails count like known ones, so neither layer reveals who has
//! an account. Both maps are bounded: entries expire with their window, and
//! at [`LoginGuard::CAPACITY`] entries the oldest is evicted. Evicting only
//! forgets failures, so flooding the map can at worst give an attacker back
//! attempts it has paid for with one Argon2 check each (which the hashing
//! bound in `crate::hashing` rations). Per instance: N origins allow N× the
//! attempts, still bounded.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failure counts in fixed windows, bounded in size.
#[derive(Debug)]
struct Windows<K> {
    /// key → (failures, window start, insertion number).
    entries: HashMap<K, (u32, Instant, u64)>,
    /// (window start, insertion number, key): the order to expire and evict.
    by_age: BTreeSet<(Instant, u64, K)>,
    next: u64,
    capacity: usize,
    window: Duration,
}

impl<K: Hash + Eq + Ord + Clone> Windows<K> {
    fn new(capacity: usize, window: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            by_age: BTreeSet::new(),
            next: 0,
            capacity: capacity.max(1),
            window,
        }
    }

    /// Drops every window that ended by `now`.
    fn expire(&mut self, now: Instant) {
        while let Some((since, _, _)) = self.by_age.first() {
            if now.saturating_duration_since(*since) < self.window {
                break;
            }
            if let Some((_, _, key)) = self.by_age.pop_first() {
                self.entries.remove(&key);
            }
        }
    }

    /// The live `(count, window start)` of `key` at `now`.
    fn get(&self, key: &K, now: Instant) -> Option<(u32, Instant)> {
        self.entries
            .get(key)
            .filter(|(_, since, _)| now.saturating_duration_since(*since) < self.window)
            .map(|(count, since, _)| (*count, *since))
    }

    /// Counts one failure for `key` at `now`.
    fn bump(&mut self, key: &K, now: Instant) {
        self.expire(now);
        if let Some(entry) = self.entries.get_mut(key) {
            entry.0 = entry.0.saturating_add(1);
            return;
        }
        while self.entries.len() >= self.capacity {
            match self.by_age.pop_first() {
                Some((_, _, oldest)) => {
                    self.entries.remove(&oldest);
                }
                None => break,
            }
        }
        self.next += 1;
        self.by_age.insert((now, self.next, key.clone()));
        self.entries.insert(key.clone(), (1, now, self.next));
    }

    fn remove(&mut self, key: &K) {
        if let Some((_, since, n)) = self.entries.remove(key) {
            self.by_age.remove(&(since, n, key.clone()));
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The address a lockout counts against: IPv4 as is, IPv6 by its /64.
fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct LoginGuard {
    pairs: Mutex<Windows<(String, IpAddr)>>,
    emails: Mutex<Windows<String>>,
}

impl Default for LoginGuard {
    fn default() -> Self {
        Self::with_capacity(Self::CAPACITY)
    }
}

impl LoginGuard {
    /// Failures for one (email, address) before it is locked.
    pub const MAX_FAILURES: u32 = 10;
    /// Failures for one email (every address) before attempts slow down.
    pub const SLOW_AFTER: u32 = 10;
    /// The first delay, doubled per further failure.
    pub const FIRST_DELAY: Duration = Duration::from_millis(250);
    /// The longest delay before a password check.
    pub const MAX_DELAY: Duration = Duration::from_secs(3);
    /// How long failures count.
    pub const WINDOW: Duration = Duration::from_secs(15 * 60);
    /// Entries per map (~350 bytes each with a long email).
    pub const CAPACITY: usize = 50_000;

    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            pairs: Mutex::new(Windows::new(capacity, Self::WINDOW)),
            emails: Mutex::new(Windows::new(capacity, Self::WINDOW)),
        }
    }

    fn pairs(&self) -> std::sync::MutexGuard<'_, Windows<(String, IpAddr)>> {
        self.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emails(&self) -> std::sync::MutexGuard<'_, Windows<String>> {
        self.emails.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Some(seconds to wait)` when `email` is locked for `addr` now.
    pub fn locked(&self, email: &str, addr: IpAddr) -> Option<u64> {
        self.locked_at(email, addr, Instant::now())
    }

    pub fn locked_at(&self, email: &str, addr: IpAddr, now: Instant) -> Option<u64> {
        let key = (email.to_owned(), address_key(addr));
        let (count, since) = self.pairs().get(&key, now)?;
        let left = Self::WINDOW.saturating_sub(now.saturating_duration_since(since));
        (count >= Self::MAX_FAILURES).then(|| left.as_secs().max(1))
    }

    /// How long an attempt for `email` waits before its password is checked.
    pub fn delay(&self, email: &str) -> Duration {
        self.delay_at(email, Instant::now())
    }

    pub fn delay_at(&self, email: &str, now: Instant) -> Duration {
        let failures = self
            .emails()
            .get(&email.to_owned(), now)
            .map_or(0, |(count, _)| count);
        Self::delay_for(failures)
    }

    /// The delay after `failures` failures for one email.
    pub fn delay_for(failures: u32) -> Duration {
        if failures < Self::SLOW_AFTER {
            return Duration::ZERO;
        }
        let doublings = (failures - Self::SLOW_AFTER).min(16);
        Self::FIRST_DELAY
            .saturating_mul(1u32 << doublings)
            .min(Self::MAX_DELAY)
    }

    pub fn failed(&self, email: &str, addr: IpAddr) {
        self.failed_at(email, addr, Instant::now());
    }

    pub fn failed_at(&self, email: &str, addr: IpAddr, now: Instant) {
        self.pairs()
            .bump(&(email.to_owned(), address_key(addr)), now);
        self.emails().bump(&email.to_owned(), now);
    }

    /// A right password from `addr` clears that pair's count. The email's
    /// own count stays until its window ends: the owner logging in must not
    /// hand a distributed guesser a fresh budget.
    pub fn succeeded(&self, email: &str, addr: IpAddr) {
        self.pairs().remove(&(email.to_owned(), address_key(addr)));
    }

    /// Entries held (pairs, emails).
    pub fn len(&self) -> (usize, usize) {
        (self.pairs().len(), self.emails().len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn ten_failures_lock_that_email_from_that_address_only() {
        let guard = LoginGuard::default();
        let t0 = Instant::now();
        for _ in 0..LoginGuard::MAX_FAILURES {
            assert_eq!(guard.locked_at("a@x", ip(1), t0), None);
            guard.failed_at("a@x", ip(1), t0);
        }
        let left = guard.locked_at("a@x", ip(1), t0).expect("locked");
        assert_eq!(left, LoginGuard::WINDOW.as_secs());
        // The owner elsewhere is not locked, nor is another email.
        assert_eq!(guard.locked_at("a@x", ip(2), t0), None);
        assert_eq!(guard.locked_at("b@x", ip(1), t0), None);
        // The lock ends with the window.
        let later = t0 + LoginGuard::WINDOW;
        assert_eq!(guard.locked_at("a@x", ip(1), later), None);
    }

    #[test]
    fn a_success_clears_the_pair_but_not_the_emails_slowdown() {
        let guard = LoginGuard::default();
        let t0 = Instant::now();
        for n in 0..12 {
            guard.failed_at("a@x", ip(n % 3), t0);
        }
        guard.succeeded("a@x", ip(1));
        assert_eq!(guard.locked_at("a@x", ip(1), t0), None);
        assert_eq!(guard.delay_at("a@x", t0), Duration::from_secs(1));
    }

    #[test]
    fn the_per_email_delay_grows_from_250_ms_and_stops_at_three_seconds() {
        let delays: Vec<u128> = (8..=16)
            .map(|n| LoginGuard::delay_for(n).as_millis())
            .collect();
        assert_eq!(delays, [0, 0, 250, 500, 1000, 2000, 3000, 3000, 3000]);
        assert_eq!(LoginGuard::delay_for(u32::MAX), LoginGuard::MAX_DELAY);
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(address_key(mapped), ip(1));
    }

    #[test]
    fn the_maps_never_hold_more_than_their_capacity_and_evict_the_oldest() {
        let guard = LoginGuard::with_capacity(100);
        let t0 = Instant::now();
        for n in 0..1_000u32 {
            let at = t0 + Duration::from_millis(u64::from(n));
            guard.failed_at(&format!("user{n}@x"), ip((n % 200) as u8), at);
            let (pairs, emails) = guard.len();
            assert!(pairs <= 100 && emails <= 100, "{pairs} {emails}");
        }
        // The newest stay, the oldest went.
        let end = t0 + Duration::from_secs(1);
        assert_eq!(guard.delay_at("user0@x", end), Duration::ZERO);
        assert!(guard.emails().get(&"user999@x".to_owned(), end).is_some());
        assert!(guard.emails().get(&"user0@x".to_owned(), end).is_none());
    }

    #[test]
    fn ended_windows_are_dropped_on_the_next_failure() {
        let guard = LoginGuard::with_capacity(1_000);
        let t0 = Instant::now();
        for n in 0..50 {
            guard.failed_at(&format!("user{n}@x"), ip(1), t0);
        }
        assert_eq!(guard.len(), (50, 50));
        guard.failed_at("late@x", ip(1), t0 + LoginGuard::WINDOW);
        assert_eq!(guard.len(), (1, 1));
    }

    #[test]
    fn removing_a_pair_keeps_the_age_index_in_step() {
        let guard = LoginGuard::with_capacity(2);
        let t0 = Instant::now();
        guard.failed_at("a@x", ip(1), t0);
        guard.succeeded("a@x", ip(1));
        guard.failed_at("b@x", ip(1), t0);
        guard.failed_at("c@x", ip(1), t0);
        // Both fit: the removed pair left no stale entry to evict instead.
        assert_eq!(guard.len().0, 2);
        assert!(guard.pairs().by_age.len() == 2);
    }
}
