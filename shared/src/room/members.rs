//! Members and their watermarks: who may use the room, how far each has
//! received (`delivered_seq`) and read (`read_seq`), which of those the
//! origin has not seen yet, and when each member's next `receipt` broadcast
//! may go (one per member per `receipt_interval_ms`).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::Millis;
use super::storage::StoredWatermark;
use crate::receipts::Watermark;

#[derive(Debug, Clone, Copy)]
struct ReceiptClock {
    last_sent: Millis,
    /// A broadcast waits for `last_sent + interval`.
    pending: bool,
}

#[derive(Debug)]
pub struct Members {
    watermarks: BTreeMap<i64, Watermark>,
    /// Members whose watermarks the origin may not have.
    dirty: HashSet<i64>,
    clocks: HashMap<i64, ReceiptClock>,
    receipt_interval_ms: u64,
}

/// What a new member list from the origin changed.
#[derive(Debug, Default)]
pub struct Changed {
    pub removed: Vec<i64>,
    /// The list to store, with what the origin holds marked synced.
    pub stored: Vec<StoredWatermark>,
}

impl Members {
    pub fn new(receipt_interval_ms: u64) -> Self {
        Self {
            watermarks: BTreeMap::new(),
            dirty: HashSet::new(),
            clocks: HashMap::new(),
            receipt_interval_ms,
        }
    }

    pub fn contains(&self, user: i64) -> bool {
        self.watermarks.contains_key(&user)
    }

    pub fn get(&self, user: i64) -> Option<&Watermark> {
        self.watermarks.get(&user)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Watermark> {
        self.watermarks.values()
    }

    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.watermarks.keys().copied()
    }

    /// Every member's watermarks, for deriving message status.
    pub fn snapshot(&self) -> Vec<Watermark> {
        self.watermarks.values().copied().collect()
    }

    /// Loads what storage holds.
    pub fn restore(&mut self, stored: Vec<StoredWatermark>) {
        for m in stored {
            let user = m.watermark.user_id;
            self.watermarks.insert(user, m.watermark);
            // Written before it was sent, so the origin may lack it.
            if !m.synced {
                self.dirty.insert(user);
            }
        }
    }

    /// Replaces the list with the origin's; watermarks only move forward.
    pub fn replace(&mut self, incoming: &[Watermark]) -> Changed {
        let incoming: BTreeMap<i64, Watermark> = incoming.iter().map(|w| (w.user_id, *w)).collect();
        let removed: Vec<i64> = self
            .watermarks
            .keys()
            .filter(|u| !incoming.contains_key(u))
            .copied()
            .collect();
        for user in &removed {
            self.watermarks.remove(user);
            self.dirty.remove(user);
            self.clocks.remove(user);
        }
        let mut stored = Vec::with_capacity(incoming.len());
        for (user, w) in incoming {
            let entry = self.watermarks.entry(user).or_insert(w);
            entry.delivered_seq = entry.delivered_seq.max(w.delivered_seq);
            entry.read_seq = entry.read_seq.max(w.read_seq);
            // The origin just told us its values: ours are synced exactly
            // when they are the same.
            let synced = *entry == w;
            if synced {
                self.dirty.remove(&user);
            } else {
                self.dirty.insert(user);
            }
            stored.push(StoredWatermark {
                watermark: *entry,
                synced,
            });
        }
        Changed { removed, stored }
    }

    /// `user` has everything up to `seq`. Returns whether that moved.
    pub fn delivered(&mut self, user: i64, seq: i64) -> bool {
        match self.watermarks.get_mut(&user) {
            Some(w) if w.delivered_seq < seq => {
                w.delivered_seq = seq;
                self.dirty.insert(user);
                true
            }
            _ => false,
        }
    }

    /// `user` read up to `seq` (already clamped). Returns the new
    /// watermark when it moved.
    pub fn read(&mut self, user: i64, seq: i64) -> Option<Watermark> {
        let w = self.watermarks.get_mut(&user)?;
        if seq <= w.read_seq {
            return None;
        }
        w.read_seq = seq;
        w.delivered_seq = w.delivered_seq.max(seq);
        self.dirty.insert(user);
        Some(*w)
    }

    /// Watermarks the origin may lack.
    pub fn dirty(&self) -> Vec<Watermark> {
        let mut out: Vec<Watermark> = self
            .dirty
            .iter()
            .filter_map(|u| self.watermarks.get(u))
            .copied()
            .collect();
        out.sort_by_key(|w| w.user_id);
        out
    }

    pub fn any_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The origin holds these exact values: those still current are synced.
    pub fn synced(&mut self, sent: &[Watermark]) {
        for s in sent {
            if self.watermarks.get(&s.user_id) == Some(s) {
                self.dirty.remove(&s.user_id);
            }
        }
    }

    /// Whether `user`'s receipt may be broadcast now; if not, it is marked
    /// pending for [`Members::due_receipts`].
    pub fn receipt_now(&mut self, now: Millis, user: i64) -> bool {
        let interval = self.receipt_interval_ms;
        let clock = self.clocks.entry(user).or_insert(ReceiptClock {
            last_sent: 0,
            pending: false,
        });
        if now >= clock.last_sent + interval && !clock.pending {
            clock.last_sent = now;
            true
        } else {
            clock.pending = true;
            false
        }
    }

    /// Members whose pending receipt is due at `now` (taken).
    pub fn due_receipts(&mut self, now: Millis) -> Vec<i64> {
        let interval = self.receipt_interval_ms;
        let mut due: Vec<i64> = Vec::new();
        for (user, c) in self.clocks.iter_mut() {
            if c.pending && now >= c.last_sent + interval {
                c.pending = false;
                c.last_sent = now;
                due.push(*user);
            }
        }
        due.sort_unstable();
        due
    }

    /// When the next pending receipt is due.
    pub fn next_receipt(&self) -> Option<Millis> {
        self.clocks
            .values()
            .filter(|c| c.pending)
            .map(|c| c.last_sent + self.receipt_interval_ms)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(user_id: i64, delivered_seq: i64, read_seq: i64) -> Watermark {
        Watermark {
            user_id,
            delivered_seq,
            read_seq,
        }
    }

    #[test]
    fn a_new_list_keeps_the_higher_watermark_and_says_what_the_origin_lacks() {
        let mut m = Members::new(1_000);
        m.restore(vec![
            StoredWatermark {
                watermark: w(1, 5, 3),
                synced: false,
            },
            StoredWatermark {
                watermark: w(2, 1, 1),
                synced: true,
            },
        ]);
        let changed = m.replace(&[w(1, 4, 4), w(3, 0, 0)]);
        assert_eq!(changed.removed, vec![2]);
        assert_eq!(
            m.get(1),
            Some(&w(1, 5, 4)),
            "each watermark only moves forward"
        );
        let synced: Vec<(i64, bool)> = changed
            .stored
            .iter()
            .map(|s| (s.watermark.user_id, s.synced))
            .collect();
        assert_eq!(synced, vec![(1, false), (3, true)]);
        assert_eq!(m.dirty(), vec![w(1, 5, 4)]);
        m.synced(&[w(1, 5, 4)]);
        assert!(!m.any_dirty());
    }

    #[test]
    fn a_synced_answer_for_older_values_leaves_the_member_dirty() {
        let mut m = Members::new(1_000);
        m.replace(&[w(1, 0, 0)]);
        assert!(m.delivered(1, 3));
        let sent = m.dirty();
        assert!(m.read(1, 3).is_some());
        m.synced(&sent);
        assert_eq!(m.dirty(), vec![w(1, 3, 3)], "the read came after the send");
    }

    #[test]
    fn receipts_are_coalesced_to_one_per_member_per_interval() {
        let mut m = Members::new(1_000);
        m.replace(&[w(1, 0, 0)]);
        assert!(m.receipt_now(5_000, 1));
        assert!(!m.receipt_now(5_100, 1));
        assert!(!m.receipt_now(5_200, 1));
        assert_eq!(m.next_receipt(), Some(6_000));
        assert!(m.due_receipts(5_999).is_empty());
        assert_eq!(m.due_receipts(6_000), vec![1]);
        assert_eq!(m.next_receipt(), None);
    }
}
