//! The room's side of edits, deletes, reactions, replies and mentions: the
//! order of outputs, who may do what, replay, erasure in memory, and what
//! goes to the origin.

use super::*;
use crate::protocol::internal::Change;

use super::tests::{Bare, T0, outputs as outs, room_with};

/// Members `users`, each with a room socket (`ConnId(1)`, `ConnId(2)`, … in
/// order), outputs drained.
fn room(users: &[i64]) -> Room {
    let mut room = room_with(RoomConfig::default(), users);
    for (i, &u) in users.iter().enumerate() {
        room.handle_connect(T0, ConnId(i as u64 + 1), u, None)
            .expect("member");
    }
    outs(&mut room);
    room
}

fn send(room: &mut Room, now: Millis, user: i64, text: &str) -> MessageView {
    match room
        .submit(now, user, text.into(), None, None, &Bare)
        .expect("sent")
    {
        Sent::New(m) => m,
        other => panic!("{other:?}"),
    }
}

fn frame(conn: u64, v: &serde_json::Value) -> (ConnId, String) {
    (ConnId(conn), v.to_string())
}

fn sent_to_all(outs: &[Output]) -> Vec<&ServerFrame> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send {
                to: Target::All,
                frame,
            } => Some(frame),
            _ => None,
        })
        .collect()
}

fn error_codes(outs: &[Output]) -> Vec<String> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send {
                frame: ServerFrame::Error { code, .. },
                ..
            } => Some(code.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_edit_is_stored_then_acked_then_relayed_with_the_next_seq() {
    let mut room = room(&[1, 2]);
    let m = send(&mut room, T0, 1, "helo");
    outs(&mut room);
    let (conn, text) = frame(
        1,
        &serde_json::json!({"type":"edit","conversation_id":1,"message_id":m.id,"content":"hello","client_msg_id":"e1"}),
    );
    room.handle_text(T0 + 10, conn, &text, &Bare);
    let o = outs(&mut room);
    let Output::StoreChange { event, state } = &o[0] else {
        panic!("the change is stored first: {o:?}");
    };
    assert_eq!(event.seq, 2);
    assert_eq!(state.edited_at_ms, Some(T0 as i64 + 10));
    assert!(
        matches!(&o[1], Output::Send { to: Target::Conn(c), frame: ServerFrame::Ack { seq: 2, client_msg_id, .. } } if *c == conn && client_msg_id == "e1")
    );
    let relayed = sent_to_all(&o);
    assert!(
        matches!(relayed[0], ServerFrame::MessageEdited { seq: 2, message_seq: 1, content, .. } if content == "hello")
    );
    // The message in the window reads as edited, for a replay.
    let now = room.message(1).expect("held");
    assert_eq!(now.content, "hello");
    assert!(now.edited_at.is_some());
    // A change is not a message: no unread, not the last message.
    assert_eq!(room.unread_for(2), 1);
    // The origin gets the change as an event naming its target.
    let batch = room.poll_flush(T0 + 10_000).expect("due");
    let stored = &batch.messages[1];
    assert_eq!(stored.seq, 2);
    assert!(stored.content.is_empty());
    assert_eq!(
        stored
            .change
            .as_ref()
            .map(|c| (c.target_id, c.change.clone())),
        Some((
            m.id,
            Change::Edit {
                content: "hello".into()
            }
        ))
    );
}

#[test]
fn only_the_sender_edits_and_a_resend_stores_nothing() {
    let mut room = room(&[1, 2]);
    let m = send(&mut room, T0, 1, "mine");
    outs(&mut room);
    let edit = |c: &str| Change::Edit { content: c.into() };
    assert_eq!(
        room.submit_change(T0, 2, m.id, edit("theirs"), None, None, &Bare),
        Err(RoomError::NotAllowed("only its sender may edit a message"))
    );
    assert_eq!(RoomError::NotAllowed("").http_status(), 403);
    let first = room
        .submit_change(T0, 1, m.id, edit("v2"), Some("k".into()), None, &Bare)
        .expect("edit");
    outs(&mut room);
    let again = room
        .submit_change(T0, 1, m.id, edit("v2"), Some("k".into()), None, &Bare)
        .expect("resend");
    assert_eq!(again.ack, first.ack, "the original ack");
    assert!(
        !outs(&mut room)
            .iter()
            .any(|o| matches!(o, Output::StoreChange { .. })),
        "a resend stores nothing"
    );
    // The same words again change nothing: acknowledged, not stored.
    let same = room
        .submit_change(T0, 1, m.id, edit("v2"), Some("k2".into()), None, &Bare)
        .expect("no-op");
    assert!(same.event.is_none());
    assert_eq!(room.last_seq(), 2);
    // Past the window.
    let late = T0 + 24 * 3_600_000 + 1;
    assert_eq!(
        room.submit_change(late, 1, m.id, edit("v3"), None, None, &Bare),
        Err(RoomError::EditWindowPassed)
    );
    // Unknown ids, and changes are not messages.
    assert_eq!(
        room.submit_change(T0, 1, Uuid::nil(), edit("x"), None, None, &Bare),
        Err(RoomError::MessageNotFound)
    );
    let Some(ServerFrame::Ack { id: event_id, .. }) = Some(first.ack) else {
        unreachable!()
    };
    assert_eq!(
        room.submit_change(T0, 1, event_id, edit("x"), None, None, &Bare),
        Err(RoomError::MessageNotFound)
    );
}

#[test]
fn a_delete_erases_the_message_its_edits_and_its_quotes_in_memory() {
    let mut room = room(&[1, 2, 3]);
    room.set_moderators([3]);
    let m = send(&mut room, T0, 1, "secret");
    room.submit_change(
        T0,
        1,
        m.id,
        Change::Edit {
            content: "secret v2".into(),
        },
        None,
        None,
        &Bare,
    )
    .expect("edit");
    let draft = Draft {
        content: "what?".into(),
        reply_to: Some(m.id),
        ..Draft::default()
    };
    let reply = match room.submit_draft(T0, 2, draft, None, &Bare).expect("reply") {
        Sent::New(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        reply.reply_to.as_ref().map(|q| q.content.as_str()),
        Some("secret v2"),
        "the quote reads the original as it is"
    );
    outs(&mut room);
    // Neither another member nor a stranger may delete it; a moderator may.
    assert!(matches!(
        room.submit_change(T0, 2, m.id, Change::Delete, None, None, &Bare),
        Err(RoomError::NotAllowed(_))
    ));
    let out = room
        .submit_change(T0 + 5, 3, m.id, Change::Delete, None, None, &Bare)
        .expect("moderator deletes");
    assert!(matches!(
        out.event,
        Some(ServerFrame::MessageDeleted {
            message_seq: 1,
            user_id: 3,
            ..
        })
    ));
    // Nothing of the content is left in memory: the message, the edit's
    // record (as replayed), the quote.
    let mut replay = room.replay_frames(T0 + 6, 2, 0);
    let text = serde_json::to_string(&replay).expect("json");
    assert!(!text.contains("secret"), "erased everywhere: {text}");
    let ServerFrame::Message { message } = replay.remove(0) else {
        panic!("the message first")
    };
    assert!(message.deleted_at.is_some());
    assert!(message.content.is_empty());
    let quote = room.message(3).and_then(|r| r.reply_to).expect("quote");
    assert!(quote.deleted && quote.content.is_empty());
    // A deleted message takes no edit or reaction, and a second delete is
    // a no-op.
    assert_eq!(
        room.submit_change(
            T0,
            1,
            m.id,
            Change::Edit {
                content: "x".into()
            },
            None,
            None,
            &Bare
        ),
        Err(RoomError::MessageDeleted)
    );
    let react = Change::React {
        emoji: "👍".into(),
        on: true,
    };
    assert_eq!(
        room.submit_change(T0, 2, m.id, react, None, None, &Bare),
        Err(RoomError::MessageDeleted)
    );
    let again = room
        .submit_change(T0, 1, m.id, Change::Delete, None, None, &Bare)
        .expect("no-op");
    assert!(again.event.is_none());
    // Replies to a deleted message are refused.
    let draft = Draft {
        content: "re".into(),
        reply_to: Some(m.id),
        ..Draft::default()
    };
    assert_eq!(
        room.submit_draft(T0, 2, draft, None, &Bare).map(|_| ()),
        Err(RoomError::MessageDeleted)
    );
}

#[test]
fn reactions_toggle_count_and_replay_with_me_for_the_reader() {
    let mut room = room(&[1, 2]);
    let m = send(&mut room, T0, 1, "PR today");
    outs(&mut room);
    let react = |on| Change::React {
        emoji: "💪".into(),
        on,
    };
    let a = room
        .submit_change(T0, 2, m.id, react(true), None, None, &Bare)
        .expect("react");
    assert!(matches!(
        a.event,
        Some(ServerFrame::Reaction {
            count: 1,
            on: true,
            user_id: 2,
            ..
        })
    ));
    room.submit_change(T0, 1, m.id, react(true), None, None, &Bare)
        .expect("react");
    let v = room.replay_frames(T0, 2, 0);
    let ServerFrame::Message { message } = &v[0] else {
        panic!()
    };
    assert_eq!(message.reactions[0].count, 2);
    assert!(message.reactions[0].me);
    assert_eq!(message.reactions[0].user_ids, vec![2, 1]);
    let off = room
        .submit_change(T0, 2, m.id, react(false), None, None, &Bare)
        .expect("off");
    assert!(matches!(
        off.event,
        Some(ServerFrame::Reaction {
            count: 1,
            on: false,
            ..
        })
    ));
    // Taking back what is not there changes nothing.
    let none = room
        .submit_change(T0, 2, m.id, react(false), None, None, &Bare)
        .expect("no-op");
    assert!(none.event.is_none());
    // Text is not a reaction.
    let text = Change::React {
        emoji: "lol".into(),
        on: true,
    };
    assert_eq!(
        room.submit_change(T0, 2, m.id, text, None, None, &Bare),
        Err(RoomError::InvalidEmoji)
    );
    // Replay carries the changes in order after the message.
    let seqs: Vec<i64> = room
        .replay_frames(T0, 2, 1)
        .iter()
        .filter_map(ServerFrame::sequenced)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(seqs, vec![2, 3, 4]);
}

#[test]
fn a_burst_of_toggles_is_bounded_by_the_bucket() {
    let mut room = room(&[1, 2]);
    let m = send(&mut room, T0, 1, "x");
    outs(&mut room);
    let mut refused = 0;
    for i in 0..100 {
        let (conn, text) = frame(
            2,
            &serde_json::json!({"type":"react","conversation_id":1,"message_id":m.id,"emoji":"🔥","on": i % 2 == 0}),
        );
        room.handle_text(T0, conn, &text, &Bare);
        refused += error_codes(&outs(&mut room))
            .iter()
            .filter(|c| *c == "rate_limited")
            .count();
    }
    // The burst (30) goes through, then refusals until the flood limit
    // closes the connection: a hundred toggles stored at most 30 events.
    assert!(refused >= 20, "refused: {refused}");
    assert!(room.last_seq() <= 1 + 30, "stored: {}", room.last_seq() - 1);
    assert_eq!(
        room.connection_count(),
        1,
        "the flooding connection is closed"
    );
}

#[test]
fn mentions_keep_members_only_and_count_for_the_mentioned() {
    let mut room = room(&[1, 2, 3]);
    let draft = Draft {
        content: "@Sam @Kim".into(),
        mentions: vec![2, 99, 2, 3],
        ..Draft::default()
    };
    let Sent::New(m) = room.submit_draft(T0, 1, draft, None, &Bare).expect("sent") else {
        panic!()
    };
    assert_eq!(m.mentions, vec![2, 3]);
    assert_eq!(room.unread_mentions_for(2), 1);
    assert_eq!(room.unread_mentions_for(1), 0);
    room.handle_read(T0, 2, 1).expect("read");
    assert_eq!(room.unread_mentions_for(2), 0);
    // A notice names the mentioned with their count.
    let notice = outs(&mut room).into_iter().find_map(|o| match o {
        Output::Notify(n) => Some(n),
        _ => None,
    });
    let notice = notice.expect("a notice");
    assert!(notice.mentions.iter().any(|&(u, n)| u == 3 && n == 1));
}

#[test]
fn a_target_beyond_the_window_is_found_through_storage() {
    struct Old(MessageRef);
    impl Context for Old {
        fn claim_key(&self, _: i64, _: &str, _: KnownKey) -> Result<Claim, StorageFailed> {
            Ok(Claim::Claimed)
        }
        fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
            Err(AuthError::Invalid)
        }
        fn target(&self, id: Uuid) -> Result<Option<MessageRef>, StorageFailed> {
            Ok((id == self.0.id).then(|| self.0.clone()))
        }
    }
    let mut room = room(&[1, 2]);
    let old = MessageRef {
        id: Uuid::from_u128(42),
        seq: 1,
        sender_id: 2,
        created_at_ms: T0 as i64 - 1_000,
        state: lifecycle::MessageState {
            reactions: vec![("👍".into(), vec![1])],
            ..Default::default()
        },
        preview: None,
    };
    let out = room
        .submit_change(
            T0,
            1,
            old.id,
            Change::React {
                emoji: "👍".into(),
                on: true,
            },
            None,
            None,
            &Old(old.clone()),
        )
        .expect("no-op");
    assert!(out.event.is_none(), "already on, as storage says");
    let out = room
        .submit_change(T0, 2, old.id, Change::Delete, None, None, &Old(old.clone()))
        .expect("deleted");
    assert!(matches!(
        out.event,
        Some(ServerFrame::MessageDeleted { message_seq: 1, .. })
    ));
    let o = outs(&mut room);
    assert!(o.iter().any(
        |x| matches!(x, Output::StoreChange { state, event } if state.is_deleted() && event.change.as_ref().is_some_and(|c| c.target_seq == 1))
    ));
}

/// Storage that keeps every key, as the Durable Object's does, and the
/// uploads registered with the room.
#[derive(Default)]
struct Keys(
    std::cell::RefCell<std::collections::HashMap<(i64, String), KnownKey>>,
    std::cell::RefCell<Vec<PendingAttachment>>,
);

impl Context for Keys {
    fn claim_key(&self, user: i64, key: &str, k: KnownKey) -> Result<Claim, StorageFailed> {
        let mut keys = self.0.borrow_mut();
        Ok(match keys.get(&(user, key.to_owned())) {
            Some(known) => Claim::Known(*known),
            None => {
                keys.insert((user, key.to_owned()), k);
                Claim::Claimed
            }
        })
    }
    fn known_key(&self, user: i64, key: &str) -> Result<Option<KnownKey>, StorageFailed> {
        Ok(self.0.borrow().get(&(user, key.to_owned())).copied())
    }
    fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
        Err(AuthError::Invalid)
    }
    fn attachment(&self, id: Uuid) -> Result<Option<PendingAttachment>, StorageFailed> {
        Ok(self.1.borrow().iter().find(|p| p.meta.id == id).cloned())
    }
}

/// A room whose key cache holds one key: the next key pushes the first
/// out, as a new instance or an old key would.
fn forgetful_room() -> Room {
    let config = RoomConfig {
        dedup_horizon: 1,
        ..RoomConfig::default()
    };
    let mut room = Room::new(1, config, 7);
    let members: Vec<Watermark> = [1, 2]
        .iter()
        .map(|&user_id| Watermark {
            user_id,
            delivered_seq: 0,
            read_seq: 0,
        })
        .collect();
    room.set_members(T0, &members, 0);
    room
}

#[test]
fn a_resend_the_cache_forgot_gets_its_original_ack_even_when_it_would_now_be_refused() {
    let mut room = forgetful_room();
    let keys = Keys::default();
    let m = match room
        .submit(T0, 1, "hi".into(), Some("m".into()), None, &keys)
        .expect("sent")
    {
        Sent::New(m) => m,
        other => panic!("{other:?}"),
    };
    let thumbs = Change::React {
        emoji: "👍".into(),
        on: true,
    };
    let first = room
        .submit_change(T0, 2, m.id, thumbs.clone(), Some("r".into()), None, &keys)
        .expect("stored");
    let edit = Change::Edit {
        content: "hi!".into(),
    };
    let edited = room
        .submit_change(T0, 1, m.id, edit.clone(), Some("e".into()), None, &keys)
        .expect("stored");
    // The reaction is still on: decided afresh, its resend would be a
    // no-op naming the message.
    let again = room
        .submit_change(T0, 2, m.id, thumbs, Some("r".into()), None, &keys)
        .expect("the original");
    assert_eq!(again.ack, first.ack, "the reaction's own ack");
    // The message is deleted: decided afresh, the edit's resend would be
    // refused.
    room.submit_change(T0, 1, m.id, Change::Delete, Some("d".into()), None, &keys)
        .expect("deleted");
    let late = room
        .submit_change(T0, 1, m.id, edit, Some("e".into()), None, &keys)
        .expect("the original, not message_deleted");
    assert_eq!(late.ack, edited.ack);
    assert_eq!(room.last_seq(), 4, "no resend stored anything");
    // A new key is still refused as before.
    let react = Change::React {
        emoji: "👍".into(),
        on: true,
    };
    assert_eq!(
        room.submit_change(T0, 2, m.id, react, Some("r2".into()), None, &keys),
        Err(RoomError::MessageDeleted)
    );
}

#[test]
fn a_message_resend_the_cache_forgot_gets_its_original_ack_though_its_photo_is_sent() {
    let mut room = forgetful_room();
    let keys = Keys::default();
    let photo = Uuid::from_u128(10);
    keys.1.borrow_mut().push(PendingAttachment {
        meta: crate::media::AttachmentMeta {
            id: photo,
            conversation_id: 1,
            uploader_id: 1,
            kind: crate::media::MediaKind::Image,
            mime: "image/jpeg".into(),
            size: 1_000,
            name: None,
            width: Some(4),
            height: Some(3),
            duration_ms: None,
            status: crate::media::AttachmentStatus::Ready,
            has_thumbnail: true,
        },
        registered_at_ms: T0 as i64,
        seq: None,
    });
    let draft = |key: &str, photo: Option<Uuid>, reply_to: Option<Uuid>| Draft {
        content: "look".into(),
        client_msg_id: Some(key.into()),
        attachment_ids: photo.into_iter().collect(),
        reply_to,
        ..Draft::default()
    };
    let sent = room
        .submit_draft(T0, 1, draft("p", Some(photo), None), None, &keys)
        .expect("sent");
    // The driver records the upload as sent with the message.
    keys.1.borrow_mut()[0].seq = Some(sent.seq());
    let reply = room
        .submit_draft(T0, 2, draft("re", None, Some(sent_id(&sent))), None, &keys)
        .expect("sent");
    room.submit_change(T0, 1, sent_id(&sent), Change::Delete, None, None, &keys)
        .expect("deleted");
    // Both keys have left the cache. Decided afresh, the photo would be
    // "already sent" and the quote "deleted".
    let again = room
        .submit_draft(T0, 1, draft("p", Some(photo), None), None, &keys)
        .expect("the original, not invalid_attachment");
    assert_eq!(again.seq(), sent.seq());
    assert!(again.is_duplicate());
    let again = room
        .submit_draft(T0, 2, draft("re", None, Some(sent_id(&sent))), None, &keys)
        .expect("the original, not message_deleted");
    assert_eq!(again.seq(), reply.seq());
    assert_eq!(room.last_seq(), 3, "no resend stored anything");
    // A new key is refused as before.
    assert_eq!(
        room.submit_draft(T0, 2, draft("re2", None, Some(sent_id(&sent))), None, &keys)
            .map(|_| ()),
        Err(RoomError::MessageDeleted)
    );
}

fn sent_id(sent: &Sent) -> Uuid {
    match sent {
        Sent::New(m) | Sent::Duplicate(m) => m.id,
        Sent::DuplicateOlder(k) => k.id,
    }
}

#[test]
fn a_message_deleted_before_its_flush_leaves_as_a_tombstone_and_its_edit_without_words() {
    let mut room = room(&[1, 2]);
    let m = send(&mut room, T0, 1, "private");
    room.submit_change(
        T0,
        1,
        m.id,
        Change::Edit {
            content: "still private".into(),
        },
        None,
        None,
        &Bare,
    )
    .expect("edit");
    room.submit_change(T0 + 1, 1, m.id, Change::Delete, None, None, &Bare)
        .expect("delete");
    outs(&mut room);
    let batch = room.poll_flush(T0 + 10_000).expect("due");
    let text = serde_json::to_string(&batch.messages).expect("json");
    assert!(!text.contains("private"), "nothing of it leaves: {text}");
    assert!(batch.messages[0].deleted_at.is_some(), "a tombstone");
    assert_eq!(
        batch.messages[1].change.as_ref().map(|c| c.change.clone()),
        Some(Change::Edit {
            content: String::new()
        })
    );
}
