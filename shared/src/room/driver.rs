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

use super::conns::Conns;
use super::storage::StoredWatermark;
use super::{Confirmed, ConnId, Output, Room, Target};
use crate::protocol::ServerFrame;
use crate::protocol::internal::ConversationNotice;
use crate::receipts::Watermark;

/// The connections a frame goes to, resolved against the room's own
/// registry: the driver sends to the connections this includes and to no
/// others, whatever sockets it holds itself.
#[derive(Debug, Clone, Copy)]
pub struct Recipients<'a> {
    to: Target,
    conns: &'a Conns,
}

impl Recipients<'_> {
    /// Whether `conn` gets the frame.
    pub fn includes(&self, conn: ConnId) -> bool {
        match self.to {
            // Named explicitly: also a connection the room has just closed
            // (the error frame before the close).
            Target::Conn(c) => c == conn,
            Target::All => self.conns.user_of(conn).is_some(),
            Target::OthersOf(user) => self.conns.user_of(conn).is_some_and(|u| u != user),
        }
    }

    pub fn target(&self) -> Target {
        self.to
    }
}

/// The I/O behind the outputs. Durable writes return errors; sends and
/// closes do not (a dead connection is cleaned up by its own close event).
pub trait Driver {
    type Error;

    /// Writes a new message (its idempotency key was claimed just before,
    /// through `Context::claim_key`).
    fn store(&mut self, record: &super::Record) -> Result<(), Self::Error>;
    /// Writes a change (its key claimed like a message's) and applies it
    /// to its target's stored state: see [`Output::StoreChange`].
    fn store_change(
        &mut self,
        event: &super::Record,
        state: &super::lifecycle::MessageState,
    ) -> Result<(), Self::Error>;
    /// Upserts a member's watermarks (never moving them back), as not yet
    /// confirmed by the origin.
    fn store_watermark(&mut self, watermark: &Watermark) -> Result<(), Self::Error>;
    /// Replaces the member list (after the origin's list changed).
    fn replace_members(&mut self, members: &[StoredWatermark]) -> Result<(), Self::Error>;
    /// The origin holds exactly the messages in `confirmed.runs`; rows
    /// below `confirmed.prefix_end` may be pruned.
    fn mark_flushed(&mut self, confirmed: &Confirmed) -> Result<(), Self::Error>;
    /// The origin holds these exact watermarks.
    fn mark_receipts_synced(&mut self, watermarks: &[Watermark]) -> Result<(), Self::Error>;
    fn send(&mut self, to: &Recipients<'_>, frame: &ServerFrame);
    fn close(&mut self, conn: ConnId, code: u16, reason: &str);
    /// A notice for the per-user layer (best effort).
    fn notify(&mut self, notice: ConversationNotice);
    /// A live frame for these members' `User` objects, in the room's order
    /// per member.
    fn forward(&mut self, users: &[i64], frame: &ServerFrame);
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
            Output::StoreChange { event, state } => driver.store_change(&event, &state),
            Output::StoreWatermark(w) => driver.store_watermark(&w),
            Output::ReplaceMembers(members) => driver.replace_members(&members),
            Output::MarkFlushed(confirmed) => driver.mark_flushed(&confirmed),
            Output::MarkReceiptsSynced(ws) => driver.mark_receipts_synced(&ws),
            Output::Send { to, frame } => {
                let recipients = Recipients {
                    to,
                    conns: &room.conns,
                };
                driver.send(&recipients, &frame);
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
            Output::Forward { users, frame } => {
                driver.forward(&users, &frame);
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
