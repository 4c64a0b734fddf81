//! The open-loop schedule of presence changes, fixed before the run.
//!
//! Two interleaved streams at half the rate each: a connected user goes
//! offline (the bench closes their socket), and a user who went offline
//! `stay` earlier comes back (the bench connects them). A warm-up of
//! `stay` with only the first stream fills the pool of offline users, so
//! the measured window has the full rate of both kinds from its first
//! second. Who goes offline is drawn at random (seeded) among the
//! connected users who have been online for at least `stay`, so no two
//! changes of one user are closer than `stay`: a frame about a user is
//! never ambiguous between two of their changes.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::ensure;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One scheduled change.
#[derive(Debug, Clone, Copy)]
pub struct Change {
    pub user: u32,
    /// Comes online (connects) or goes offline (closes).
    pub online: bool,
    /// Due this long after the schedule starts (µs).
    pub at_us: u64,
    /// Inside the measured window (not the warm-up).
    pub measured: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// In time order.
    pub changes: Vec<Change>,
    pub warmup_us: u64,
    pub window_us: u64,
}

impl Plan {
    pub fn measured(&self) -> impl Iterator<Item = (usize, &Change)> {
        self.changes.iter().enumerate().filter(|(_, c)| c.measured)
    }
}

/// The schedule for `n` users at `rate` changes/s over `window`.
pub fn plan(
    n: usize,
    rate: f64,
    window: Duration,
    stay: Duration,
    seed: u64,
) -> anyhow::Result<Plan> {
    ensure!(rate > 0.0, "the rate must be positive");
    let stay_us = stay.as_micros() as u64;
    let warmup_us = stay_us;
    let window_us = window.as_micros() as u64;
    let end_us = warmup_us + window_us;
    let step_us = 2e6 / rate;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut eligible: Vec<u32> = (0..n as u32).collect();
    // (eligible again at, user), in time order.
    let mut returning: VecDeque<(u64, u32)> = VecDeque::new();
    let mut went_offline: Vec<u32> = Vec::new();
    let mut changes = Vec::new();
    let (mut off, mut on) = (0usize, 0usize);
    loop {
        let t_off = (off as f64 * step_us) as u64;
        let t_on = warmup_us + (step_us / 2.0) as u64 + (on as f64 * step_us) as u64;
        let next_off = t_off < end_us;
        let next_on = t_on < end_us && on < went_offline.len();
        if next_off && (!next_on || t_off <= t_on) {
            while returning.front().is_some_and(|(at, _)| *at <= t_off) {
                if let Some((_, u)) = returning.pop_front() {
                    eligible.push(u);
                }
            }
            ensure!(
                !eligible.is_empty(),
                "{n} users are too few for {rate} changes/s (everyone is offline or just back)"
            );
            let user = eligible.swap_remove(rng.gen_range(0..eligible.len()));
            went_offline.push(user);
            changes.push(Change {
                user,
                online: false,
                at_us: t_off,
                measured: t_off >= warmup_us,
            });
            off += 1;
        } else if next_on {
            let user = went_offline[on];
            returning.push_back((t_on + stay_us, user));
            changes.push(Change {
                user,
                online: true,
                at_us: t_on,
                measured: t_on >= warmup_us,
            });
            on += 1;
        } else {
            break;
        }
    }
    Ok(Plan {
        changes,
        warmup_us,
        window_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_has_the_full_rate_of_both_kinds_and_changes_of_a_user_are_apart() {
        let stay = Duration::from_secs(5);
        let p = plan(300, 20.0, Duration::from_secs(60), stay, 1).unwrap();
        let measured: Vec<&Change> = p.changes.iter().filter(|c| c.measured).collect();
        let online = measured.iter().filter(|c| c.online).count();
        let offline = measured.len() - online;
        assert_eq!(offline, 600);
        assert!((599..=600).contains(&online), "{online}");
        assert!(p.changes.windows(2).all(|w| w[0].at_us <= w[1].at_us));
        let mut last: std::collections::HashMap<u32, (u64, bool)> = Default::default();
        for c in &p.changes {
            if let Some((at, online)) = last.get(&c.user) {
                assert_ne!(*online, c.online, "a user alternates");
                assert!(c.at_us - at >= stay.as_micros() as u64);
            } else {
                assert!(!c.online, "everyone starts online");
            }
            last.insert(c.user, (c.at_us, c.online));
        }
    }

    #[test]
    fn too_few_users_for_the_rate_is_an_error() {
        assert!(plan(50, 20.0, Duration::from_secs(30), Duration::from_secs(5), 1).is_err());
    }
}
