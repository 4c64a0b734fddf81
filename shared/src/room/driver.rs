//! Executing the room's outputs: the one rule every driver follows.
//!
//! The Durable Object and the simulator both drain the room through
//! [`drain`], so the rule that makes an `ack` trustworthy is written once:
//! outputs run in order, and **a failed durable write stops the drain**.
//! Nothing queued after it goes out (in particular not the `ack` and the
//! broadcast of a message that was not stored); the rest of the queue is
//! dropped, and the room must be rebuilt from storage
//! ([`super::Room::load`]) before it handles anything else, because its
//! memory now claims something storage does not hold.

use super::{ConnId, Output, Room, Target};
use crate::lobby::ConversationNotice;
use crate::protocol::ServerFrame;
use crate::receipts::Watermark;

use super::storage::StoredWatermark;

/// The I/O behind the outputs. Durable writes return errors; sends and
/// closes do not (a dead connection is cleaned up by its own close event).
pub trait Driver {
    type Error;

    /// Writes a new message and its idempotency key, atomically.
    fn store(&mut self, record: &super::Record) -> Result<(), Self::Error>;
    /// Upserts a member's watermarks (never moving them back), as not yet
    /// confirmed by the origin.
    fn store_watermark(&mut self, watermark: &Watermark) -> Result<(), Self::Error>;
    /// Replaces the member list (after the origin's list changed).
    fn replace_members(&mut self, members: &[StoredWatermark]) -> Result<(), Self::Error>;
    /// The origin holds these messages.
    fn mark_flushed(&mut self, seqs: &[i64]) -> Result<(), Self::Error>;
    /// The origin holds these exact watermarks.
    fn mark_receipts_synced(&mut self, watermarks: &[Watermark]) -> Result<(), Self::Error>;
    fn send(&mut self, to: Target, frame: &ServerFrame);
    fn close(&mut self, conn: ConnId, code: u16, reason: &str);
    /// A notice for the per-user layer (best effort).
    fn notify(&mut self, notice: ConversationNotice);
}

/// A durable write failed; the room that produced it must be rebuilt.
#[derive(Debug)]
pub struct WriteFailed<E> {
    pub error: E,
    /// Outputs dropped with it (for logs and tests).
    pub dropped: usize,
}

/// Executes the room's queued outputs in order, stopping at the first
/// failed durable write. See the module docs for what the caller must do
/// then.
pub fn drain<D: Driver>(room: &mut Room, driver: &mut D) -> Result<(), WriteFailed<D::Error>> {
    while let Some(output) = room.poll_output() {
        let written = match output {
            Output::Store(record) => driver.store(&record),
            Output::StoreWatermark(w) => driver.store_watermark(&w),
            Output::ReplaceMembers(members) => driver.replace_members(&members),
            Output::MarkFlushed(seqs) => driver.mark_flushed(&seqs),
            Output::MarkReceiptsSynced(ws) => driver.mark_receipts_synced(&ws),
            Output::Send { to, frame } => {
                driver.send(to, &frame);
                Ok(())
            }
            Output::Close { conn, code, reason } => {
                driver.close(conn, code, &reason);
                Ok(())
            }
            Output::Notify(notice) => {
                driver.notify(notice);
                Ok(())
            }
        };
        if let Err(error) = written {
            let dropped = room.discard_outputs();
            return Err(WriteFailed { error, dropped });
        }
    }
    Ok(())
}
