//! What the room reads from durable storage, and how a room is rebuilt from
//! it after a wake, an eviction, a crash or a failed write.
//!
//! Writes are outputs ([`super::Output`]) that the driver executes in order;
//! reads are this trait, because a Durable Object's SQLite answers them
//! synchronously and the room needs two of them on its hot path and at
//! start-up. Keeping the rows-to-state logic here (not in the driver) lets
//! the simulator rebuild a room from its own model of SQLite with exactly
//! the code the Durable Object runs.
//!
//! What the storage must hold for a room to be rebuilt without loss:
//! - every message not yet confirmed by the origin (`flushed = false`), and
//!   at least the newest `replay_window` messages;
//! - every `(sender, client_msg_id)` the room ever stored, with its `seq`
//!   and `id` (idempotency is forever, not a window);
//! - each member's watermarks and whether the origin has them;
//! - the highest seq the origin held when the room was created.

use uuid::Uuid;

use super::{Millis, Record, RoomConfig};
use crate::receipts::Watermark;

/// The original of an idempotency key: a resend gets these back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownKey {
    pub seq: i64,
    pub id: Uuid,
    pub created_at_ms: i64,
}

/// A member's watermarks as stored, and whether the origin has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredWatermark {
    pub watermark: Watermark,
    /// The origin confirmed exactly these values.
    pub synced: bool,
}

/// Durable storage could not answer. The room refuses what it cannot decide
/// safely (a `storage` error the client may retry); the driver logs the cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the room's storage did not answer")]
pub struct StorageFailed;

/// A token presented on a live connection (`{"type":"auth"}`), verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub user_id: i64,
    /// The instant after which the token is refused (its `exp` plus the
    /// leeway), on the driver's clock.
    pub valid_until: Millis,
}

/// What [`Context::claim_key`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key is new and now recorded with the candidate's seq and id.
    Claimed,
    /// The room stored this key before: nothing was written, and this is
    /// the original.
    Known(KnownKey),
}

/// What the room asks of its driver synchronously, while handling an event.
pub trait Context {
    /// Records `client_msg_id` from `sender_id` as belonging to the new
    /// message `candidate`, unless the room ever stored that key: then
    /// nothing is written and the original comes back. Called when the
    /// in-memory cache misses, once nothing can refuse the message any
    /// more; its `Output::Store` comes next. One conditional insert decides
    /// what used to take a lookup and an insert.
    ///
    /// If the message's own write then fails, the claim stays behind with a
    /// seq the log never stored; the next load drops it
    /// ([`RoomStorage::forget_keys_after`]) before that seq is reused.
    fn claim_key(
        &self,
        sender_id: i64,
        client_msg_id: &str,
        candidate: KnownKey,
    ) -> Result<Claim, StorageFailed>;

    /// The original of `(sender_id, client_msg_id)` if the room ever
    /// stored it, without claiming anything. Asked only on the paths that
    /// answer before a claim when the in-memory cache misses: a change
    /// refused or changing nothing, a message refused for its attachments
    /// (already sent: by the original) or its quote (deleted since). So a
    /// resend whose original the cache forgot (an older key, a new
    /// instance) still gets the original `ack`, not a refusal or a no-op.
    /// The default knows none.
    fn known_key(
        &self,
        _sender_id: i64,
        _client_msg_id: &str,
    ) -> Result<Option<KnownKey>, StorageFailed> {
        Ok(None)
    }

    /// The id of the request (or socket frame) being handled, which a
    /// message or change made now carries to the origin so one message can
    /// be followed through the logs. The default has none.
    fn request_id(&self) -> Option<String> {
        None
    }

    /// Verifies a session token a client sends to renew its connection.
    fn verify_token(&self, token: &str, now: Millis) -> Result<Verified, crate::auth::AuthError>;

    /// An upload registered with this room (`None` if the room never heard
    /// of it, or it was reaped). The default knows none, for contexts
    /// that never see attachments.
    fn attachment(&self, _id: Uuid) -> Result<Option<PendingAttachment>, StorageFailed> {
        Ok(None)
    }

    /// A message of this room older than its window, by id, with its
    /// current state (`None`: never stored here, or not a message). The
    /// default knows none.
    fn target(&self, _id: Uuid) -> Result<Option<super::lifecycle::Target>, StorageFailed> {
        Ok(None)
    }
}

/// An upload as the room knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAttachment {
    pub meta: crate::media::AttachmentMeta,
    /// When the edge registered it.
    pub registered_at_ms: i64,
    /// The message that carries it, once sent.
    pub seq: Option<i64>,
}

/// Reads a room needs when it is rebuilt.
pub trait RoomStorage {
    /// Members with their stored watermarks.
    fn members(&self) -> Result<Vec<StoredWatermark>, StorageFailed>;
    /// The highest seq the room has stored, or the origin held when the
    /// room was created, whichever is higher.
    fn last_seq(&self) -> Result<i64, StorageFailed>;
    /// The seq of the oldest message the origin has not confirmed.
    fn oldest_unflushed(&self) -> Result<Option<i64>, StorageFailed>;
    /// Stored messages with `seq >= from`, oldest first.
    fn messages_from(&self, from: i64) -> Result<Vec<Record>, StorageFailed>;
    /// Drops idempotency keys claimed for seqs after `last_seq`: claims
    /// whose message write failed ([`Context::claim_key`]). The only write
    /// of a load, and it must happen before the room hands out those seqs
    /// again, or a resend of the lost message would get another's.
    fn forget_keys_after(&self, last_seq: i64) -> Result<(), StorageFailed>;
}

/// The durable state a room starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restore {
    pub members: Vec<StoredWatermark>,
    pub last_seq: i64,
    /// The replay window and every unflushed message, oldest first,
    /// contiguous by seq, ending at `last_seq` (or empty).
    pub messages: Vec<Record>,
}

/// Why stored state cannot be turned into a room.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Storage(#[from] StorageFailed),
    /// A stored message is missing below an unflushed one, or the log does
    /// not end at the room's last seq: the storage lost data the room
    /// acknowledged. Refusing to start is the only honest answer.
    #[error("the room's message log has a gap at seq {missing}")]
    Gap { missing: i64 },
}

impl Restore {
    /// Reads what a room needs: the newest `replay_window` messages, and
    /// every older one the origin has not confirmed (an outbox entry must
    /// never be forgotten, and the window must reach back to it or a
    /// `resync` would send clients to a REST that lacks it).
    pub fn load(storage: &impl RoomStorage, config: &RoomConfig) -> Result<Self, RestoreError> {
        let last_seq = storage.last_seq()?;
        storage.forget_keys_after(last_seq)?;
        let window = i64::try_from(config.replay_window).unwrap_or(i64::MAX);
        let window_from = last_seq.saturating_sub(window).saturating_add(1).max(1);
        let from = match storage.oldest_unflushed()? {
            Some(oldest) => oldest.min(window_from),
            None => window_from,
        };
        let stored = storage.messages_from(from)?;
        let messages = contiguous_tail(stored, last_seq)?;
        Ok(Self {
            members: storage.members()?,
            last_seq,
            messages,
        })
    }
}

/// The part of `stored` (oldest first) that the room can hold: contiguous
/// up to `last_seq`. Flushed rows below a hole can be dropped (PostgreSQL
/// has them); an unflushed row below a hole is lost data.
fn contiguous_tail(stored: Vec<Record>, last_seq: i64) -> Result<Vec<Record>, RestoreError> {
    let Some(last) = stored.last() else {
        return Ok(Vec::new());
    };
    if last.seq != last_seq {
        // The origin knows a later seq than the log holds (the log was
        // reset): fine while the log owes it nothing.
        if stored.iter().any(|r| !r.flushed) {
            return Err(RestoreError::Gap {
                missing: last.seq + 1,
            });
        }
        return Ok(Vec::new());
    }
    // Walk back from the newest row while seqs are consecutive.
    let mut start = stored.len() - 1;
    while start > 0 && stored[start - 1].seq + 1 == stored[start].seq {
        start -= 1;
    }
    if let Some(lost) = stored[..start].iter().find(|r| !r.flushed) {
        let missing = stored[start..].first().map_or(lost.seq + 1, |r| r.seq - 1);
        return Err(RestoreError::Gap { missing });
    }
    Ok(stored.into_iter().skip(start).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, flushed: bool) -> Record {
        Record {
            id: Uuid::from_u128(seq as u128),
            seq,
            sender_id: 1,
            content: format!("m{seq}"),
            created_at_ms: 0,
            client_msg_id: format!("k{seq}"),
            flushed,
            ..Record::default()
        }
    }

    /// A log in memory: (seq → record), the origin's base seq, members.
    #[derive(Default)]
    struct Log {
        rows: Vec<Record>,
        base_seq: i64,
    }

    impl RoomStorage for Log {
        fn members(&self) -> Result<Vec<StoredWatermark>, StorageFailed> {
            Ok(Vec::new())
        }
        fn last_seq(&self) -> Result<i64, StorageFailed> {
            Ok(self
                .rows
                .iter()
                .map(|r| r.seq)
                .max()
                .unwrap_or(0)
                .max(self.base_seq))
        }
        fn oldest_unflushed(&self) -> Result<Option<i64>, StorageFailed> {
            Ok(self.rows.iter().filter(|r| !r.flushed).map(|r| r.seq).min())
        }
        fn messages_from(&self, from: i64) -> Result<Vec<Record>, StorageFailed> {
            Ok(self
                .rows
                .iter()
                .filter(|r| r.seq >= from)
                .cloned()
                .collect())
        }
        fn forget_keys_after(&self, _: i64) -> Result<(), StorageFailed> {
            Ok(())
        }
    }

    fn config(window: usize) -> RoomConfig {
        RoomConfig {
            replay_window: window,
            ..RoomConfig::default()
        }
    }

    fn seqs(r: &Restore) -> Vec<i64> {
        r.messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn a_new_room_starts_after_the_origins_last_seq_with_an_empty_window() {
        let log = Log {
            rows: vec![],
            base_seq: 41,
        };
        let r = Restore::load(&log, &config(3)).expect("load");
        assert_eq!(r.last_seq, 41);
        assert!(r.messages.is_empty());
    }

    #[test]
    fn the_window_is_the_newest_messages_when_everything_is_flushed() {
        let log = Log {
            rows: (1..=10).map(|s| record(s, true)).collect(),
            base_seq: 0,
        };
        let r = Restore::load(&log, &config(3)).expect("load");
        assert_eq!(seqs(&r), vec![8, 9, 10]);
        assert_eq!(r.last_seq, 10);
    }

    #[test]
    fn the_window_reaches_back_to_the_oldest_unflushed_message() {
        let log = Log {
            rows: (1..=10).map(|s| record(s, s < 3)).collect(),
            base_seq: 0,
        };
        let r = Restore::load(&log, &config(3)).expect("load");
        assert_eq!(seqs(&r), (3..=10).collect::<Vec<_>>());
        assert!(r.messages.iter().all(|m| !m.flushed));
    }

    #[test]
    fn pruned_flushed_rows_below_the_window_are_fine() {
        // Rows 1..=5 were pruned after the origin confirmed them.
        let log = Log {
            rows: (6..=10).map(|s| record(s, true)).collect(),
            base_seq: 0,
        };
        let r = Restore::load(&log, &config(8)).expect("load");
        assert_eq!(seqs(&r), (6..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_hole_below_an_unflushed_message_is_lost_data() {
        let mut rows: Vec<Record> = (1..=10).map(|s| record(s, false)).collect();
        rows.retain(|r| r.seq != 4);
        let log = Log { rows, base_seq: 0 };
        assert_eq!(
            Restore::load(&log, &config(3)),
            Err(RestoreError::Gap { missing: 4 })
        );
    }

    #[test]
    fn a_log_that_stops_short_of_the_last_seq_is_lost_data_only_if_it_owes_the_origin() {
        let flushed = Log {
            rows: (1..=3).map(|s| record(s, true)).collect(),
            base_seq: 5,
        };
        let r = Restore::load(&flushed, &config(3)).expect("load");
        assert_eq!(r.last_seq, 5);
        assert!(r.messages.is_empty(), "REST has 1..=3; the window restarts");
        let owing = Log {
            rows: (1..=3).map(|s| record(s, s < 3)).collect(),
            base_seq: 5,
        };
        assert_eq!(
            Restore::load(&owing, &config(3)),
            Err(RestoreError::Gap { missing: 4 })
        );
    }
}
