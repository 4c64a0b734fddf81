//! How much one WebSocket may hold unread before it is cut off.
//!
//! workerd queues every frame a Durable Object sends to a WebSocket until
//! the peer reads it, with no bound and no way to ask how much is queued
//! (no `bufferedAmount`). A client that stops reading would make the object
//! hold its whole backlog. So the object counts the bytes it sent to each
//! socket and, past [`Limits::probe_at`], asks the client to prove it is
//! reading: a `{"type":"ping","n":…}` frame, answered by
//! `{"type":"pong","n":…}` once the client has read everything before it
//! (frames arrive in order). The answer releases what was sent before the
//! ping; a client that leaves more than [`Limits::max_unconfirmed`] unread
//! is closed, and resumes with `since` when it reconnects. (The bound is
//! also what a dead reader costs: `close()` queues behind the backlog.)

/// Thresholds in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub probe_at: u64,
    pub max_unconfirmed: u64,
}

impl Default for Limits {
    /// The answer to a probe waits behind every frame the room has not yet
    /// handled, so a room that is seconds behind on its input sees a
    /// healthy reader's confirmation late. The bound is set well above
    /// what a room can send to one reader in those seconds (about 1 MB/s
    /// at its knee), so only a reader that really stopped reaching it.
    fn default() -> Self {
        Self {
            probe_at: 256 * 1024,
            max_unconfirmed: 4 * 1024 * 1024,
        }
    }
}

/// What to do after a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Send `{"type":"ping","n":n}` now.
    Probe(u64),
    /// Too much unread: close the connection.
    TooSlow,
}

/// One connection's unconfirmed bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    unconfirmed: u64,
    /// The probe in flight: its number and the bytes sent before it.
    probe: Option<(u64, u64)>,
    next_probe: u64,
}

impl Backlog {
    /// Bytes sent and not yet shown read.
    pub fn unconfirmed(&self) -> u64 {
        self.unconfirmed
    }

    /// Counts a frame of `bytes` sent to the client.
    pub fn sent(&mut self, bytes: u64, limits: Limits) -> Verdict {
        self.unconfirmed = self.unconfirmed.saturating_add(bytes);
        if self.unconfirmed > limits.max_unconfirmed {
            return Verdict::TooSlow;
        }
        if self.probe.is_none() && self.unconfirmed >= limits.probe_at {
            self.next_probe += 1;
            self.probe = Some((self.next_probe, self.unconfirmed));
            return Verdict::Probe(self.next_probe);
        }
        Verdict::Fine
    }

    /// The client answered probe `n`: everything sent before it was read.
    pub fn answered(&mut self, n: u64) {
        if let Some((pending, before)) = self.probe {
            if pending == n {
                self.unconfirmed = self.unconfirmed.saturating_sub(before);
                self.probe = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        probe_at: 100,
        max_unconfirmed: 300,
    };

    #[test]
    fn a_reading_client_is_probed_and_released() {
        let mut b = Backlog::default();
        assert_eq!(b.sent(60, LIMITS), Verdict::Fine);
        assert_eq!(b.sent(60, LIMITS), Verdict::Probe(1));
        assert_eq!(b.sent(60, LIMITS), Verdict::Fine, "one probe at a time");
        b.answered(1);
        assert_eq!(b.unconfirmed(), 60, "what was sent after the probe stays");
        assert_eq!(b.sent(60, LIMITS), Verdict::Probe(2));
        for _ in 0..100 {
            match b.sent(50, LIMITS) {
                Verdict::Probe(n) => b.answered(n),
                Verdict::Fine => {}
                Verdict::TooSlow => panic!("a reading client is never cut off"),
            }
            if let Some((n, _)) = b.probe {
                b.answered(n);
            }
        }
    }

    #[test]
    fn a_client_that_never_reads_is_cut_off_past_the_limit() {
        let mut b = Backlog::default();
        let mut verdicts = Vec::new();
        for _ in 0..7 {
            verdicts.push(b.sent(50, LIMITS));
        }
        assert_eq!(verdicts[1], Verdict::Probe(1));
        assert_eq!(verdicts[6], Verdict::TooSlow);
    }

    #[test]
    fn a_stale_or_forged_answer_releases_nothing() {
        let mut b = Backlog::default();
        b.sent(150, LIMITS);
        b.answered(7);
        assert_eq!(b.unconfirmed(), 150);
    }
}
