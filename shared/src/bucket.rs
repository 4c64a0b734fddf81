//! A token bucket per user: the flood limit of every realtime object.
//!
//! Every frame a client sends costs tokens (see `room::cost`); the bucket
//! refills at a steady rate up to a burst. Refusals in a row are counted,
//! so a client that keeps sending into an empty bucket can be closed.

/// Milliseconds on the caller's clock.
type Millis = u64;

/// Burst size and refill rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub per_sec: u32,
}

/// One user's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated: Millis,
    /// Refusals since the last accepted frame.
    pub strikes: u32,
}

impl Bucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Millis) -> Self {
        Self {
            tokens: f64::from(rate.burst.max(1)),
            updated: now,
            strikes: 0,
        }
    }

    /// Takes `cost` tokens, or says in how many milliseconds they will be
    /// there.
    pub fn take(&mut self, now: Millis, cost: f64, rate: Rate) -> Result<(), u64> {
        let burst = f64::from(rate.burst.max(1));
        let per_sec = f64::from(rate.per_sec.max(1));
        let elapsed = now.saturating_sub(self.updated) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * per_sec).min(burst);
        self.updated = self.updated.max(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            self.strikes = 0;
            Ok(())
        } else {
            self.strikes += 1;
            Err(((cost - self.tokens) / per_sec * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        burst: 3,
        per_sec: 2,
    };

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_refusals_count() {
        let mut b = Bucket::full(RATE, 0);
        for _ in 0..3 {
            assert_eq!(b.take(0, 1.0, RATE), Ok(()));
        }
        assert_eq!(b.take(0, 1.0, RATE), Err(500));
        assert_eq!(b.take(0, 0.5, RATE), Err(250));
        assert_eq!(b.strikes, 2);
        assert_eq!(b.take(500, 1.0, RATE), Ok(()));
        assert_eq!(b.strikes, 0);
    }

    #[test]
    fn cheap_frames_cost_less() {
        let mut b = Bucket::full(RATE, 0);
        for _ in 0..12 {
            assert_eq!(b.take(0, 0.25, RATE), Ok(()));
        }
        assert!(b.take(0, 0.25, RATE).is_err());
    }
}
