//! The room's message log in memory: the replay window and the outbox's
//! contents.
//!
//! It holds the newest `replay_window` messages **and every message the
//! origin has not confirmed**, oldest first and contiguous by seq. The
//! window never drops an unconfirmed message: a `resync` sends a client to
//! REST for everything before the window, so REST must already have it.
//! Each unconfirmed message is either waiting for a batch or in one.

use std::collections::VecDeque;
use std::ops::RangeInclusive;

use super::Record;
use super::lifecycle::{Change, MessageState};

/// Which batch an unconfirmed message is in, if any.
pub type BatchId = u64;

#[derive(Debug)]
struct Entry {
    record: Record,
    /// The batch carrying it to the origin right now.
    sending: Option<BatchId>,
}

/// What an answer from the origin settled.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Newly confirmed seqs, as runs.
    pub confirmed: Vec<RangeInclusive<i64>>,
    /// Every seq below this one is confirmed (answers arrive out of order,
    /// so this is where the confirmed prefix of the log ends).
    pub prefix_end: i64,
    /// Messages the batch carried that the origin did not confirm: they
    /// wait again.
    pub released: usize,
}

/// What a resume from `since` gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Nothing is newer.
    UpToDate,
    /// These seqs, from the window.
    Messages(RangeInclusive<i64>),
    /// The gap starts before the window: reload from REST from this seq.
    Resync { from_seq: i64 },
}

#[derive(Debug)]
pub struct Window {
    entries: VecDeque<Entry>,
    last_seq: i64,
    unflushed: usize,
    /// Unconfirmed messages in no batch.
    waiting: usize,
    replay_window: usize,
}

impl Window {
    pub fn new(replay_window: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            last_seq: 0,
            unflushed: 0,
            waiting: 0,
            replay_window,
        }
    }

    /// The highest seq anywhere (stored here, or known from the origin).
    pub fn last_seq(&self) -> i64 {
        self.last_seq
    }

    /// Raises the last seq to one the origin reports (a room whose storage
    /// restarted after the origin's).
    pub fn advance_last_seq(&mut self, seq: i64) {
        self.last_seq = self.last_seq.max(seq);
    }

    pub fn unflushed(&self) -> usize {
        self.unflushed
    }

    /// Unconfirmed messages not in any batch.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Seq of the oldest message held.
    pub fn start(&self) -> i64 {
        self.entries
            .front()
            .map_or(self.last_seq + 1, |e| e.record.seq)
    }

    /// The newest message (not a change).
    pub fn newest(&self) -> Option<&Record> {
        self.entries
            .iter()
            .rev()
            .map(|e| &e.record)
            .find(|r| r.is_message())
    }

    /// A held record by id. A scan from the newest: changes mostly name
    /// recent messages, and the window is bounded.
    pub fn find(&self, id: uuid::Uuid) -> Option<&Record> {
        self.entries
            .iter()
            .rev()
            .map(|e| &e.record)
            .find(|r| r.id == id)
    }

    /// Applies a change to what the window holds: its target gets `state`
    /// (and an edit's content); a delete erases the target, the content of
    /// earlier edits to it, and quotes of it.
    pub fn apply_change(&mut self, event: &Record, state: &MessageState) {
        let Some(c) = &event.change else {
            return;
        };
        let deleted = state.is_deleted();
        for e in &mut self.entries {
            let r = &mut e.record;
            if r.id == c.target_id {
                r.state = state.clone();
                match &c.change {
                    Change::Edit { content } => r.content = content.clone(),
                    Change::Delete => {
                        r.content.clear();
                        r.attachments.clear();
                        r.mentions.clear();
                        r.reply_to = None;
                    }
                    Change::React { .. } => {}
                }
            } else if deleted {
                if let Some(Change::Edit { content }) = r
                    .change
                    .as_mut()
                    .filter(|rc| rc.target_id == c.target_id)
                    .map(|rc| &mut rc.change)
                {
                    content.clear();
                }
                if let Some(q) = r.reply_to.as_mut().filter(|q| q.id == c.target_id) {
                    q.content.clear();
                    q.deleted = true;
                }
            }
        }
    }

    /// A message by seq, if held.
    pub fn get(&self, seq: i64) -> Option<&Record> {
        let start = self.entries.front()?.record.seq;
        let idx = usize::try_from(seq - start).ok()?;
        self.entries.get(idx).map(|e| &e.record)
    }

    /// Replaces an attachment's metadata in every held message that carries
    /// it; returns their seqs. A scan: updates are rare (one per upload) and
    /// the window is bounded.
    pub fn update_attachment(&mut self, meta: &crate::media::AttachmentMeta) -> Vec<i64> {
        let mut seqs = Vec::new();
        for e in &mut self.entries {
            let mut hit = false;
            for a in e.record.attachments.iter_mut().filter(|a| a.id == meta.id) {
                *a = meta.clone();
                hit = true;
            }
            if hit {
                seqs.push(e.record.seq);
            }
        }
        seqs
    }

    /// Appends the next message (its seq must be `last_seq + 1`, or any seq
    /// past it when restoring).
    pub fn push(&mut self, record: Record) {
        self.last_seq = self.last_seq.max(record.seq);
        if !record.flushed {
            self.unflushed += 1;
            self.waiting += 1;
        }
        self.entries.push_back(Entry {
            record,
            sending: None,
        });
        self.prune();
    }

    /// What a client holding everything up to `since` must be sent.
    pub fn replay(&self, since: i64) -> Replay {
        if since >= self.last_seq {
            return Replay::UpToDate;
        }
        let start = self.start();
        if since + 1 < start {
            Replay::Resync {
                from_seq: since + 1,
            }
        } else {
            Replay::Messages(since + 1..=self.last_seq)
        }
    }

    /// Messages from `from` on, oldest first.
    pub fn since(&self, from: i64) -> impl Iterator<Item = &Record> {
        let skip = usize::try_from(from - self.start()).unwrap_or(0);
        self.entries.iter().skip(skip).map(|e| &e.record)
    }

    /// Messages (not changes) after `seq` from senders other than `user`.
    pub fn count_from_others_after(&self, seq: i64, user: i64) -> usize {
        self.since(seq + 1)
            .filter(|r| r.is_message() && r.sender_id != user)
            .count()
    }

    /// Messages after `seq` that mention `user` and still stand.
    pub fn count_mentions_after(&self, seq: i64, user: i64) -> usize {
        self.since(seq + 1)
            .filter(|r| r.is_message() && !r.state.is_deleted() && r.mentions.contains(&user))
            .count()
    }

    /// Hands up to `max` waiting messages, oldest first, to batch `batch`.
    pub fn take_waiting(&mut self, batch: BatchId, max: usize) -> Vec<&Record> {
        let mut taken = 0;
        for e in self.entries.iter_mut() {
            if taken == max {
                break;
            }
            if !e.record.flushed && e.sending.is_none() {
                e.sending = Some(batch);
                taken += 1;
            }
        }
        self.waiting -= taken;
        self.entries
            .iter()
            .filter(|e| e.sending == Some(batch))
            .map(|e| &e.record)
            .collect()
    }

    /// The origin answered batch `batch`: the ids it holds (or will never
    /// take) are confirmed, whichever batch carried them; the batch's other
    /// messages wait again.
    pub fn settle(&mut self, batch: BatchId, done: &dyn Fn(&Record) -> bool) -> Settled {
        let mut confirmed = Vec::new();
        let mut released = 0;
        for e in self.entries.iter_mut() {
            if e.record.flushed {
                continue;
            }
            if done(&e.record) {
                e.record.flushed = true;
                if e.sending.take().is_none() {
                    self.waiting -= 1;
                }
                confirmed.push(e.record.seq);
            } else if e.sending == Some(batch) {
                e.sending = None;
                self.waiting += 1;
                released += 1;
            }
        }
        self.unflushed -= confirmed.len();
        self.prune();
        Settled {
            confirmed: runs(&confirmed),
            prefix_end: self.oldest_unconfirmed(),
            released,
        }
    }

    /// The seq of the oldest message the origin has not confirmed, or the
    /// next seq when it has them all. The window holds every unconfirmed
    /// message, so nothing older can be unconfirmed.
    pub fn oldest_unconfirmed(&self) -> i64 {
        self.entries
            .iter()
            .find(|e| !e.record.flushed)
            .map_or(self.last_seq + 1, |e| e.record.seq)
    }

    /// When the oldest message the origin has not confirmed was acked.
    pub fn oldest_unconfirmed_at(&self) -> Option<i64> {
        if self.unflushed == 0 {
            return None;
        }
        self.entries
            .iter()
            .find(|e| !e.record.flushed)
            .map(|e| e.record.created_at_ms)
    }

    /// Batch `batch` failed: its messages wait again.
    pub fn release(&mut self, batch: BatchId) {
        for e in self.entries.iter_mut() {
            if e.sending == Some(batch) {
                e.sending = None;
                self.waiting += 1;
            }
        }
    }

    /// Drops the oldest messages beyond the replay window, but never an
    /// unconfirmed one.
    fn prune(&mut self) {
        while self.entries.len() > self.replay_window
            && self.entries.front().is_some_and(|e| e.record.flushed)
        {
            self.entries.pop_front();
        }
    }
}

/// Sorted seqs as inclusive runs of consecutive values: the exact set, in
/// as few ranges as it takes (a storage update per run).
pub fn runs(seqs: &[i64]) -> Vec<RangeInclusive<i64>> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<RangeInclusive<i64>> = Vec::new();
    for s in sorted {
        match out.last_mut() {
            Some(r) if *r.end() + 1 == s => *r = *r.start()..=s,
            _ => out.push(s..=s),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn record(seq: i64) -> Record {
        Record {
            id: Uuid::from_u128(seq as u128),
            seq,
            sender_id: seq % 2,
            content: format!("m{seq}"),
            created_at_ms: 0,
            client_msg_id: format!("k{seq}"),
            flushed: false,
            ..Record::default()
        }
    }

    fn window_of(n: i64, replay: usize) -> Window {
        let mut w = Window::new(replay);
        for s in 1..=n {
            w.push(record(s));
        }
        w
    }

    #[test]
    fn unconfirmed_messages_are_never_pruned_and_confirmed_ones_beyond_the_window_are() {
        let mut w = window_of(6, 3);
        assert_eq!(w.start(), 1, "nothing is confirmed yet");
        let batch = w.take_waiting(1, 10).len();
        assert_eq!(batch, 6);
        let settled = w.settle(1, &|r| r.seq <= 4);
        assert_eq!(settled.confirmed, vec![1..=4]);
        assert_eq!(settled.prefix_end, 5, "5 is the oldest unconfirmed");
        assert_eq!(settled.released, 2);
        assert_eq!(
            w.start(),
            4,
            "the newest three stay, 4 is confirmed but in the window"
        );
        assert_eq!(w.unflushed(), 2);
        assert_eq!(w.waiting(), 2, "5 and 6 were in the batch and wait again");
    }

    #[test]
    fn replay_sends_the_gap_or_a_resync_when_it_starts_before_the_window() {
        let mut w = window_of(6, 3);
        w.take_waiting(1, 10);
        w.settle(1, &|_| true);
        assert_eq!(w.replay(6), Replay::UpToDate);
        assert_eq!(w.replay(3), Replay::Messages(4..=6));
        assert_eq!(w.replay(1), Replay::Resync { from_seq: 2 });
        assert_eq!(w.since(5).map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6]);
    }

    #[test]
    fn several_batches_settle_in_any_order_and_a_failed_one_waits_again() {
        let mut w = window_of(9, 100);
        let a: Vec<i64> = w.take_waiting(1, 3).iter().map(|r| r.seq).collect();
        let b: Vec<i64> = w.take_waiting(2, 3).iter().map(|r| r.seq).collect();
        let c: Vec<i64> = w.take_waiting(3, 3).iter().map(|r| r.seq).collect();
        assert_eq!((a, b, c), (vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]));
        assert_eq!(w.waiting(), 0);
        // The last answers first; the second fails; the first is lost and
        // its messages are confirmed by a later answer that lists them.
        let late = w.settle(3, &|r| (7..=9).contains(&r.seq));
        assert_eq!(late.confirmed, vec![7..=9]);
        assert_eq!(
            late.prefix_end, 1,
            "confirmed above a hole: nothing may leave the log yet"
        );
        w.release(2);
        assert_eq!(w.waiting(), 3);
        let again: Vec<i64> = w.take_waiting(4, 10).iter().map(|r| r.seq).collect();
        assert_eq!(again, vec![4, 5, 6], "only what waits, oldest first");
        let settled = w.settle(4, &|r| r.seq <= 6);
        assert_eq!(
            settled.confirmed,
            vec![1..=6],
            "1..=3 were confirmed by this answer too"
        );
        assert_eq!(settled.prefix_end, 10, "all confirmed: the next seq");
        assert_eq!(settled.released, 0);
        assert_eq!(w.unflushed(), 0);
        assert_eq!(w.waiting(), 0);
    }

    #[test]
    fn runs_are_exactly_the_listed_seqs() {
        assert_eq!(runs(&[5, 3, 4, 9, 10, 1]), vec![1..=1, 3..=5, 9..=10]);
        assert!(runs(&[]).is_empty());
    }
}
