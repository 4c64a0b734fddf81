//! Message status from watermarks.
//!
//! Each member has a `delivered_seq` (their client has the message) and a
//! `read_seq` (they have seen it). A message is `read` once every other
//! current member has read it, `delivered` once every other member has it,
//! and `sent` before that. The sender's own watermarks never count: in a
//! 1:1 chat "read" means the other person read it.

use crate::protocol::MessageStatus;

/// One member's watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    pub user_id: i64,
    pub delivered_seq: i64,
    pub read_seq: i64,
}

/// The status of message `seq` sent by `sender_id`, given every member's
/// watermarks. A conversation where the sender is alone counts as `sent`.
pub fn status_of(seq: i64, sender_id: i64, members: &[Watermark]) -> MessageStatus {
    let mut others = members.iter().filter(|w| w.user_id != sender_id).peekable();
    if others.peek().is_none() {
        return MessageStatus::Sent;
    }
    let mut all_read = true;
    let mut all_delivered = true;
    for w in others {
        // Reading implies delivery even if the delivered report was lost.
        let delivered = w.delivered_seq.max(w.read_seq);
        all_read &= w.read_seq >= seq;
        all_delivered &= delivered >= seq;
    }
    if all_read {
        MessageStatus::Read
    } else if all_delivered {
        MessageStatus::Delivered
    } else {
        MessageStatus::Sent
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
    fn status_follows_the_slowest_other_member() {
        let members = [w(1, 10, 10), w(2, 5, 3), w(3, 9, 4)];
        assert_eq!(status_of(3, 1, &members), MessageStatus::Read);
        assert_eq!(status_of(5, 1, &members), MessageStatus::Delivered);
        assert_eq!(status_of(6, 1, &members), MessageStatus::Sent);
    }

    #[test]
    fn the_senders_own_watermarks_do_not_count() {
        let members = [w(1, 0, 0), w(2, 7, 7)];
        assert_eq!(status_of(7, 1, &members), MessageStatus::Read);
        assert_eq!(status_of(7, 2, &members), MessageStatus::Sent);
    }

    #[test]
    fn reading_implies_delivery() {
        let members = [w(1, 0, 0), w(2, 0, 4)];
        assert_eq!(status_of(4, 1, &members), MessageStatus::Read);
    }

    #[test]
    fn a_sender_alone_sees_sent() {
        assert_eq!(status_of(1, 1, &[w(1, 1, 1)]), MessageStatus::Sent);
    }
}
