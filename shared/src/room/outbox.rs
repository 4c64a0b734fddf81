//! When the room sends what the origin lacks: a pipeline of batches.
//!
//! Light load coalesces: the first waiting message (or watermark) starts a
//! short window (`flush_delay_ms`) and everything that arrives in it goes in
//! one request, so a quiet room makes at most one request per window.
//! Heavy load pipelines: a full batch goes at once, and up to
//! `flush_max_in_flight` batches are in flight together (the origin's
//! ingest is idempotent and reports what it holds, so overlap and
//! out-of-order answers are safe). A failure backs off exponentially, and
//! while backing off nothing new is sent; the batches still in flight
//! answer as they will.
//!
//! This module only decides *when* and *which batch number*; the window
//! knows which messages wait ([`super::window::Window`]).

use std::collections::BTreeSet;

use super::Millis;
use super::window::BatchId;

/// The outbox's tunables (part of `RoomConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxConfig {
    pub flush_delay_ms: u64,
    pub flush_batch: usize,
    pub max_in_flight: usize,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

#[derive(Debug)]
pub struct Outbox {
    config: OutboxConfig,
    in_flight: BTreeSet<BatchId>,
    next_batch: BatchId,
    /// When the oldest thing now waiting started to wait.
    waiting_since: Option<Millis>,
    /// No new batch before this (after a failure).
    backoff_until: Option<Millis>,
    backoff_ms: u64,
}

impl Outbox {
    /// `first_batch` numbers the first batch: the driver's answers can
    /// outlive a room (a rebuild after a failed write), so each life starts
    /// its numbering somewhere else and an old answer never matches a new
    /// batch.
    pub fn new(config: OutboxConfig, first_batch: BatchId) -> Self {
        Self {
            config,
            in_flight: BTreeSet::new(),
            next_batch: first_batch,
            waiting_since: None,
            backoff_until: None,
            backoff_ms: config.backoff_initial_ms,
        }
    }

    pub fn batch_size(&self) -> usize {
        self.config.flush_batch.max(1)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Something started to wait at `now` (a message, a watermark).
    pub fn waiting(&mut self, now: Millis) {
        self.waiting_since.get_or_insert(now);
    }

    /// When a batch may start, given how many messages wait and whether
    /// watermarks wait: `None` when nothing waits or the pipeline is full.
    pub fn due(&self, waiting_messages: usize, receipts_waiting: bool) -> Option<Millis> {
        if waiting_messages == 0 && !receipts_waiting {
            return None;
        }
        if self.in_flight.len() >= self.config.max_in_flight.max(1) {
            return None;
        }
        let since = self.waiting_since?;
        let coalesced = if waiting_messages >= self.batch_size() {
            since // a full batch does not wait
        } else {
            since + self.config.flush_delay_ms
        };
        Some(match self.backoff_until {
            Some(b) => coalesced.max(b),
            None => coalesced,
        })
    }

    /// Starts a batch if one is due at `now`; returns its number.
    pub fn start(
        &mut self,
        now: Millis,
        waiting_messages: usize,
        receipts_waiting: bool,
    ) -> Option<BatchId> {
        if self.due(waiting_messages, receipts_waiting)? > now {
            return None;
        }
        let id = self.next_batch;
        self.next_batch += 1;
        self.in_flight.insert(id);
        Some(id)
    }

    /// After a batch took its share: whatever still waits has waited since
    /// before (it goes at once if there is room), unless nothing is left.
    pub fn taken(&mut self, left_messages: usize, receipts_left: bool) {
        if left_messages == 0 && !receipts_left {
            self.waiting_since = None;
        }
    }

    /// Batch `id` answered (completely or not). `complete`: everything it
    /// carried is settled.
    pub fn answered(&mut self, now: Millis, id: BatchId, complete: bool) {
        if !self.in_flight.remove(&id) {
            return; // from a previous life of the room, or already failed
        }
        if complete {
            self.backoff_ms = self.config.backoff_initial_ms;
            self.backoff_until = None;
        } else {
            self.back_off(now);
        }
    }

    /// Batch `id` failed (no answer, an error): back off.
    pub fn failed(&mut self, now: Millis, id: BatchId) {
        if self.in_flight.remove(&id) {
            self.back_off(now);
        }
    }

    fn back_off(&mut self, now: Millis) {
        self.backoff_until = Some(now + self.backoff_ms);
        self.backoff_ms = (self.backoff_ms * 2).min(self.config.backoff_max_ms);
        // What the failed batch carried waits again, from now.
        self.waiting_since.get_or_insert(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: OutboxConfig = OutboxConfig {
        flush_delay_ms: 100,
        flush_batch: 10,
        max_in_flight: 2,
        backoff_initial_ms: 500,
        backoff_max_ms: 2_000,
    };

    #[test]
    fn light_load_coalesces_into_one_request_per_window() {
        let mut o = Outbox::new(CONFIG, 1);
        assert_eq!(o.due(0, false), None, "nothing waits");
        o.waiting(1_000);
        o.waiting(1_040); // a second message inside the window
        assert_eq!(o.due(2, false), Some(1_100));
        assert_eq!(o.start(1_099, 2, false), None);
        assert_eq!(o.start(1_100, 2, false), Some(1));
        o.taken(0, false);
        assert_eq!(o.due(0, false), None);
        o.answered(1_150, 1, true);
        o.waiting(1_160);
        assert_eq!(o.due(1, false), Some(1_260));
    }

    #[test]
    fn heavy_load_sends_full_batches_at_once_up_to_the_pipeline_depth() {
        let mut o = Outbox::new(CONFIG, 1);
        o.waiting(0);
        assert_eq!(o.start(0, 35, false), Some(1), "a full batch does not wait");
        o.taken(25, false);
        assert_eq!(o.start(0, 25, false), Some(2));
        o.taken(15, false);
        assert_eq!(
            o.start(0, 15, false),
            None,
            "two in flight: the pipeline is full"
        );
        assert_eq!(o.due(15, false), None);
        // The second answers first; room for the next.
        o.answered(30, 2, true);
        assert_eq!(o.start(30, 15, false), Some(3));
    }

    #[test]
    fn a_failure_backs_off_exponentially_and_a_success_resets_it() {
        let mut o = Outbox::new(CONFIG, 1);
        o.waiting(0);
        let mut now = 100;
        let mut waits = Vec::new();
        for _ in 0..4 {
            let id = o.start(now, 1, false).expect("due");
            o.failed(now, id);
            let next = o.due(1, false).expect("retried");
            waits.push(next - now);
            now = next;
        }
        assert_eq!(waits, vec![500, 1_000, 2_000, 2_000]);
        let id = o.start(now, 1, false).expect("due");
        o.answered(now, id, true);
        o.taken(1, false);
        let id = o.start(now + 10, 1, false).expect("no backoff any more");
        o.failed(now + 10, id);
        assert_eq!(o.due(1, false), Some(now + 510));
    }

    #[test]
    fn an_answer_from_another_life_changes_nothing() {
        let mut o = Outbox::new(CONFIG, 1);
        o.answered(0, 7, false);
        o.failed(0, 8);
        o.waiting(0);
        assert_eq!(o.due(1, false), Some(100), "no backoff from stale answers");
    }

    #[test]
    fn watermarks_alone_are_sent_too() {
        let mut o = Outbox::new(CONFIG, 1);
        o.waiting(0);
        assert_eq!(o.start(100, 0, true), Some(1));
    }
}
