//! A simulator for the sans-IO room: many clients, a virtual clock, and
//! random interleavings of sends, resends, **edits, deletes and reactions**
//! (over the room socket and over HTTP, allowed and forbidden), typing,
//! reads, disconnects, reconnects, garbage, **several origin flushes in
//! flight at once whose answers arrive in any order**, succeed, fail or are
//! lost after the origin stored the batch, durable writes that fail, and
//! **restarts** of the room at any point (a wake from hibernation, an
//! eviction, a kill -9).
//!
//! The world around the room is modelled the way the Durable Object has it:
//! a durable log (its SQLite: messages and changes, every idempotency key
//! ever stored and whether it is a change's, the state of every changed
//! message by id, watermarks with a synced flag, flushed rows pruned beyond
//! a retention), PostgreSQL (one row per message in its current state, the
//! change events, watermarks; batches may commit out of order, so an event
//! can arrive before its message), and clients that keep what they
//! received. The room is driven through the same [`drain`] the Durable
//! Object uses and rebuilt with the same [`Room::load`].
//!
//! Beside them the simulator keeps its own **reference** of every message
//! (content and state), computed from the change events the room stores by
//! rules written here independently of the room's: only the sender edits,
//! within the edit window; the sender or a moderator deletes; a deleted
//! message takes nothing more; reactions toggle per (user, emoji).
//!
//! Checked after **every** step: the durable log is contiguous and matches
//! the room's last seq and outbox count, and its rows read as the reference
//! says; PostgreSQL holds only what the log holds, each seq once with one
//! id; every ack and every delivered frame is durable; no client gets a seq
//! twice or with a gap (messages and changes share one order); a connected
//! client is never behind, and its view of every message it just heard of
//! (built from the frames it received) is the reference's; a message frame
//! always carries the message as it is now; a resend returns the original;
//! every change is stored, answered as a no-op or refused exactly as the
//! reference predicts (forbidden edits and deletes included); once a
//! message is deleted, no text it ever had is left in the durable log, in
//! PostgreSQL (once PostgreSQL has the delete), or in any frame sent after.
//! At the end, after the origin is reachable again and every client
//! resumes: PostgreSQL has every stored message and change exactly once,
//! every watermark, and each message in the reference's state (latest edit
//! by seq, deletes erased, the latest reaction by seq per user and emoji);
//! every client (and the subscribed member's object) has every seq, and its
//! view of every message equals the reference, the room's and PostgreSQL's.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proptest::prelude::*;
use shared::auth::AuthError;
use shared::protocol::internal::{Change, ConversationNotice, StoredMessage};
use shared::protocol::{MessageView, ServerFrame};
use shared::receipts::Watermark;
use shared::room::lifecycle::{self, ChangeRecord, MessageState, Target as MessageRef};
use shared::room::{
    Claim, Confirmed, ConnId, Context, Driver, FlushBatch, FlushOutcome, KnownKey, Millis,
    Recipients, Record, Room, RoomConfig, RoomStorage, StorageFailed, StoredWatermark, Target,
    Verified, drain,
};
use uuid::Uuid;

const CONVERSATION: i64 = 7;
/// Users 1, 2, 3; user 1 has two clients (two tabs).
const CLIENT_USERS: [i64; 4] = [1, 1, 2, 3];
/// Flushed rows older than this many seqs leave the durable log (the
/// Durable Object keeps 5,000; small here so pruning happens).
const RETAIN: i64 = 8;
/// The member whose `User` object subscribes to the room (they also have a
/// client of their own: both paths at once).
const SUBSCRIBER: i64 = 3;
/// The member who may delete anyone's message (a group admin).
const MODERATOR: i64 = 2;
/// Short, so edits past the window happen.
const EDIT_WINDOW_MS: i64 = 20_000;
/// Reactions the clients use; the last is text, which the room refuses.
const EMOJIS: [&str; 4] = ["👍", "❤️", "🔥", "ok"];

#[derive(Debug, Clone)]
enum Action {
    Connect(usize),
    Disconnect(usize),
    Send(usize),
    /// Sends the client's k-th message or change again, with its key.
    Resend(usize, usize),
    Typing(usize),
    Read(usize),
    Garbage(usize),
    /// An edit of a message: the `pick`-th newest of the actor's own
    /// (`own`) or of all. `how`: 0 blank (refused), 1 the current text
    /// again (a no-op), else new text. `http`: the HTTP route, not the
    /// socket.
    Edit {
        client: usize,
        pick: usize,
        own: bool,
        how: u8,
        http: bool,
    },
    Delete {
        client: usize,
        pick: usize,
        own: bool,
        http: bool,
    },
    React {
        client: usize,
        pick: usize,
        emoji: usize,
        on: bool,
        http: bool,
    },
    /// A change naming no message: an unknown id, or a change's own id.
    Stray {
        client: usize,
        pick: usize,
        event: bool,
    },
    Advance(u64),
    /// Start a batch if one is due (several can be in flight).
    FlushStart,
    /// The origin answers the k-th batch in flight (mod their number).
    FlushOk(usize),
    /// The k-th batch fails before reaching the origin.
    FlushFail(usize),
    /// The origin stores the k-th batch, but the answer is lost: the driver
    /// reports a failure (its request timed out).
    FlushLost(usize),
    /// A durable write fails: the next one (0), or the one after (1), which
    /// for a new message or change is its store after its key's claim.
    FailWrite(u8),
    /// The room's instance goes away and a new one loads from storage.
    /// `survivors`: which clients' connections survive (bit per client;
    /// hibernation keeps sockets, a crash drops them). `answer_lost`: an
    /// in-flight flush reached PostgreSQL but its answer never came back.
    Restart {
        survivors: u8,
        answer_lost: bool,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let client = 0..CLIENT_USERS.len();
    let pick = 0..16usize;
    let http = || prop::bool::weighted(0.2);
    prop_oneof![
        2 => client.clone().prop_map(Action::Connect),
        1 => client.clone().prop_map(Action::Disconnect),
        6 => client.clone().prop_map(Action::Send),
        2 => (client.clone(), 0..8usize).prop_map(|(c, k)| Action::Resend(c, k)),
        2 => client.clone().prop_map(Action::Typing),
        2 => client.clone().prop_map(Action::Read),
        1 => client.clone().prop_map(Action::Garbage),
        3 => (client.clone(), pick.clone(), prop::bool::weighted(0.7), 0..8u8, http())
            .prop_map(|(client, pick, own, how, http)| Action::Edit { client, pick, own, how, http }),
        1 => (client.clone(), pick.clone(), prop::bool::weighted(0.6), http())
            .prop_map(|(client, pick, own, http)| Action::Delete { client, pick, own, http }),
        3 => (client.clone(), pick.clone(), prop_oneof![8 => 0..3usize, 1 => Just(3usize)], any::<bool>(), http())
            .prop_map(|(client, pick, emoji, on, http)| Action::React { client, pick, emoji, on, http }),
        1 => (client.clone(), pick, any::<bool>())
            .prop_map(|(client, pick, event)| Action::Stray { client, pick, event }),
        3 => (0..3_000u64).prop_map(Action::Advance),
        3 => Just(Action::FlushStart),
        2 => (0..4usize).prop_map(Action::FlushOk),
        1 => (0..4usize).prop_map(Action::FlushFail),
        1 => (0..4usize).prop_map(Action::FlushLost),
        1 => (0..2u8).prop_map(Action::FailWrite),
        1 => (any::<u8>(), any::<bool>())
            .prop_map(|(survivors, answer_lost)| Action::Restart { survivors, answer_lost }),
    ]
}

/// A message or change a client sent.
#[derive(Debug, Clone)]
struct SentEntry {
    key: String,
    /// The frame as sent, for a resend.
    frame: serde_json::Value,
    /// A change's target `(seq, id)`: a change that changes nothing is
    /// acknowledged with these, and stores nothing.
    target: Option<(i64, Uuid)>,
    /// `(seq, id)` of its first ack.
    acked: Option<(i64, Uuid)>,
}

impl SentEntry {
    /// Acknowledged as a change that changed nothing: no key was stored,
    /// so a resend is decided again.
    fn acked_as_no_op(&self) -> bool {
        self.acked.is_some() && self.acked == self.target
    }
}

/// A message as someone sees it: what the frames (or REST) said.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    id: Uuid,
    content: String,
    edited_at: Option<i64>,
    deleted_at: Option<i64>,
    /// emoji → who reacted (the order is the room's business).
    reactions: BTreeMap<String, BTreeSet<i64>>,
}

fn reaction_sets(state: &MessageState) -> BTreeMap<String, BTreeSet<i64>> {
    state
        .reactions
        .iter()
        .map(|(e, users)| (e.clone(), users.iter().copied().collect()))
        .collect()
}

impl View {
    /// A `message` frame's message.
    fn of(m: &MessageView) -> Self {
        let mut reactions = BTreeMap::new();
        for r in &m.reactions {
            assert_eq!(r.count, r.user_ids.len() as i64, "a reaction's count");
            reactions.insert(r.emoji.clone(), r.user_ids.iter().copied().collect());
        }
        Self {
            id: m.id,
            content: m.content.clone(),
            edited_at: m.edited_at.map(|t| t.timestamp_millis()),
            deleted_at: m.deleted_at.map(|t| t.timestamp_millis()),
            reactions,
        }
    }

    fn of_truth(t: &Truth) -> Self {
        Self {
            id: t.id,
            content: t.content.clone(),
            edited_at: t.state.edited_at_ms,
            deleted_at: t.state.deleted_at_ms,
            reactions: reaction_sets(&t.state),
        }
    }
}

/// Applies a sequenced frame to a set of views (message seq → view). With
/// `strict`, a change must name a message the views hold (a client holds
/// every seq before the change's).
fn apply_frame(
    views: &mut BTreeMap<i64, View>,
    frame: &ServerFrame,
    viewer: Option<i64>,
    strict: bool,
) {
    let (message_id, message_seq) = match frame {
        ServerFrame::Message { message } => {
            for r in &message.reactions {
                assert_eq!(
                    r.me,
                    viewer.is_some_and(|v| r.user_ids.contains(&v)),
                    "`me` is the reader's (a broadcast's is nobody's)"
                );
            }
            views.insert(message.seq, View::of(message));
            return;
        }
        ServerFrame::MessageEdited {
            message_id,
            message_seq,
            ..
        }
        | ServerFrame::MessageDeleted {
            message_id,
            message_seq,
            ..
        }
        | ServerFrame::Reaction {
            message_id,
            message_seq,
            ..
        } => (*message_id, *message_seq),
        _ => return,
    };
    let Some(v) = views.get_mut(&message_seq) else {
        assert!(
            !strict,
            "a change to message {message_seq}, which the client lacks"
        );
        return;
    };
    assert_eq!(v.id, message_id, "a change names its message by seq and id");
    match frame {
        ServerFrame::MessageEdited {
            content, edited_at, ..
        } => {
            if v.deleted_at.is_some() {
                // A replay after the delete: the edit is erased too.
                assert!(
                    content.is_empty(),
                    "an erased message's edit keeps its text"
                );
            } else {
                v.content = content.clone();
                v.edited_at = Some(edited_at.timestamp_millis());
            }
        }
        ServerFrame::MessageDeleted { deleted_at, .. } => {
            v.content.clear();
            v.edited_at = None;
            v.deleted_at = Some(deleted_at.timestamp_millis());
            v.reactions.clear();
        }
        ServerFrame::Reaction {
            user_id, emoji, on, ..
        } => {
            // A tombstone carries no reactions (a replay shows it deleted
            // before the reactions that preceded the delete).
            if v.deleted_at.is_none() {
                let users = v.reactions.entry(emoji.clone()).or_default();
                if *on {
                    users.insert(*user_id);
                } else {
                    users.remove(user_id);
                }
                if users.is_empty() {
                    v.reactions.remove(emoji);
                }
            }
        }
        _ => unreachable!(),
    }
}

#[derive(Debug, Default)]
struct Client {
    user: i64,
    conn: Option<ConnId>,
    /// Every seq this client has, from the room or from REST.
    have: BTreeSet<i64>,
    sent: Vec<SentEntry>,
    /// Its view of each message, by seq.
    views: BTreeMap<i64, View>,
    /// Acks and errors it got during the current change (for its checks).
    inbox: Vec<ServerFrame>,
}

/// The reference: a message as the rules say it reads now.
#[derive(Debug, Clone)]
struct Truth {
    id: Uuid,
    seq: i64,
    sender: i64,
    created_at_ms: i64,
    content: String,
    state: MessageState,
    /// Every text it had (the original and its edits): erased on delete.
    texts: Vec<String>,
}

/// What the reference says a change does to `t`, checking that it may.
fn reference(t: &Truth, actor: i64, change: &Change, at: i64) -> MessageState {
    let mut s = t.state.clone();
    assert!(!s.is_deleted(), "a deleted message took a change");
    match change {
        Change::Edit { .. } => {
            assert_eq!(actor, t.sender, "only its sender edits a message");
            assert!(
                at - t.created_at_ms <= EDIT_WINDOW_MS,
                "an edit past the window"
            );
            s.edited_at_ms = Some(at);
        }
        Change::Delete => {
            assert!(
                actor == t.sender || actor == MODERATOR,
                "user {actor} deleted user {}'s message",
                t.sender
            );
            s = MessageState {
                deleted_at_ms: Some(at),
                ..MessageState::default()
            };
        }
        Change::React { emoji, on } => {
            assert!(lifecycle::valid_emoji(emoji), "{emoji:?} is no emoji");
            let pos = s.reactions.iter().position(|(e, _)| e == emoji);
            match (pos, *on) {
                (Some(p), true) => {
                    assert!(!s.reactions[p].1.contains(&actor), "stored a no-op");
                    s.reactions[p].1.push(actor);
                }
                (None, true) => s.reactions.push((emoji.clone(), vec![actor])),
                (Some(p), false) => {
                    let users = &mut s.reactions[p].1;
                    let at = users
                        .iter()
                        .position(|u| *u == actor)
                        .expect("stored a no-op");
                    users.remove(at);
                    if users.is_empty() {
                        s.reactions.remove(p);
                    }
                }
                (None, false) => panic!("stored a no-op"),
            }
        }
    }
    s
}

/// A row of PostgreSQL's model: a message in its current state, or a
/// change event.
#[derive(Debug, Clone)]
enum OriginRow {
    Message {
        id: Uuid,
        content: String,
        /// The seq of the edit that set `content` (0: the original).
        edit_seq: i64,
        edited_at: Option<i64>,
        deleted_at: Option<i64>,
    },
    Event {
        target: Uuid,
        actor: i64,
        /// An edit's content is erased when its message is deleted.
        change: Change,
        at: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypingEvent {
    Relay,
    /// A message from the typer clears the throttle.
    Message,
    /// The throttle is memory; a new instance starts without it.
    Restart,
}

/// Everything outside the room: its durable storage, PostgreSQL, clients.
#[derive(Default)]
struct World {
    now: Millis,
    clients: Vec<Client>,
    /// The room's durable log: seq → record (its SQLite).
    durable: BTreeMap<i64, Record>,
    /// Every idempotency key ever claimed (never pruned; a claim whose
    /// message was not stored goes at the next load).
    keys: RefCell<HashMap<(i64, String), KnownKey>>,
    /// The keys that are a change's (a change is no message to change).
    change_keys: HashSet<(i64, String)>,
    /// The current state of every message ever changed, by id (never
    /// pruned: a change to a message older than the log still knows it).
    msg_state: HashMap<Uuid, MessageState>,
    /// Every message and change ever stored: seq → id (for checks; pruning
    /// spares it).
    ever_stored: BTreeMap<i64, Uuid>,
    /// The reference: every message ever stored, by seq.
    truth: BTreeMap<i64, Truth>,
    truth_ids: HashMap<Uuid, i64>,
    /// Ids of stored changes (targets that are not messages).
    event_ids: Vec<Uuid>,
    /// Every text of a deleted message → the message.
    erased: HashMap<String, Uuid>,
    /// Message seqs whose reference or views changed in this step.
    touched: BTreeSet<i64>,
    watermarks: BTreeMap<i64, StoredWatermark>,
    /// What the origin held when the room was created.
    base_seq: i64,
    /// PostgreSQL: seq → id.
    origin: BTreeMap<i64, Uuid>,
    /// PostgreSQL's rows: seq → message or event.
    origin_rows: BTreeMap<i64, OriginRow>,
    /// PostgreSQL's messages: id → seq.
    origin_ids: HashMap<Uuid, i64>,
    /// Messages PostgreSQL holds a delete for (it may not hold the
    /// message yet).
    origin_deleted: HashSet<Uuid>,
    /// PostgreSQL's watermarks: user → (delivered, read).
    origin_receipts: BTreeMap<i64, (i64, i64)>,
    /// Writes to let through before one fails.
    fail_in: Cell<Option<u8>>,
    typing_log: HashMap<i64, Vec<(TypingEvent, Millis)>>,
    /// Clients told to `resync` (and from where), to reload from REST and
    /// reconnect once the outputs are drained.
    pending_resyncs: Vec<(usize, i64)>,
    /// Writes that failed (the room was rebuilt after each).
    failed_writes: Cell<usize>,
    /// Seqs forwarded to the subscribed user's object, in order.
    forwarded: Vec<i64>,
    /// The subscribed user's object's view of each message.
    forwarded_views: BTreeMap<i64, View>,
}

impl World {
    fn client_of(&self, conn: ConnId) -> Option<usize> {
        self.clients.iter().position(|c| c.conn == Some(conn))
    }

    fn last_durable_seq(&self) -> i64 {
        self.durable
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.base_seq)
    }

    /// A write the driver may be asked to fail.
    fn write(&self) -> Result<(), &'static str> {
        match self.fail_in.get() {
            None => Ok(()),
            Some(0) => {
                self.fail_in.set(None);
                self.failed_writes.set(self.failed_writes.get() + 1);
                Err("injected write failure")
            }
            Some(n) => {
                self.fail_in.set(Some(n - 1));
                Ok(())
            }
        }
    }

    /// Checks a sequenced frame against what is stored and the reference,
    /// as it leaves the room.
    fn check_sequenced(&mut self, frame: &ServerFrame) -> Option<i64> {
        let (_, seq) = frame.sequenced()?;
        assert!(
            self.ever_stored.contains_key(&seq),
            "seq {seq} went out before it was stored"
        );
        match frame {
            ServerFrame::Message { message } => {
                assert_eq!(
                    self.ever_stored.get(&seq),
                    Some(&message.id),
                    "delivered only once stored"
                );
                let t = &self.truth[&seq];
                assert_eq!(
                    View::of(message),
                    View::of_truth(t),
                    "a message frame carries the message as it is now"
                );
                self.touched.insert(seq);
            }
            ServerFrame::MessageEdited {
                message_seq,
                content,
                ..
            } => {
                let t = &self.truth[message_seq];
                if t.state.is_deleted() {
                    assert!(content.is_empty(), "a deleted message's edit went out");
                }
                self.touched.insert(*message_seq);
            }
            ServerFrame::MessageDeleted { message_seq, .. }
            | ServerFrame::Reaction { message_seq, .. } => {
                self.touched.insert(*message_seq);
            }
            _ => {}
        }
        Some(seq)
    }

    fn deliver(&mut self, i: usize, frame: &ServerFrame) {
        if let Some(seq) = self.check_sequenced(frame) {
            let client = &mut self.clients[i];
            assert!(
                client.have.insert(seq),
                "seq {seq} delivered twice to client {i}"
            );
            let expected_next = client.have.len() as i64;
            assert_eq!(
                client.have.last().copied(),
                Some(expected_next),
                "client {i} has a gap"
            );
            let user = client.user;
            apply_frame(&mut client.views, frame, Some(user), true);
            return;
        }
        match frame {
            ServerFrame::Ack {
                client_msg_id,
                seq,
                id,
                ..
            } => {
                assert_eq!(
                    self.ever_stored.get(seq),
                    Some(id),
                    "acked only once stored"
                );
                let client = &mut self.clients[i];
                client.inbox.push(frame.clone());
                let entry = client
                    .sent
                    .iter_mut()
                    .find(|e| e.key == *client_msg_id)
                    .expect("ack for a key this client sent");
                match entry.acked {
                    None => entry.acked = Some((*seq, *id)),
                    // Nothing was stored for it: a resend is a new change.
                    Some(_) if entry.acked_as_no_op() => {}
                    Some(first) => assert_eq!(first, (*seq, *id), "a resend returns the original"),
                }
            }
            ServerFrame::Error { .. } => self.clients[i].inbox.push(frame.clone()),
            ServerFrame::Typing { user_id, .. } => {
                assert_ne!(
                    *user_id, self.clients[i].user,
                    "typing never echoes to the typer"
                );
            }
            ServerFrame::Resync { from_seq, .. } => {
                // Checked and acted on once the outputs are drained.
                self.pending_resyncs.push((i, *from_seq));
            }
            ServerFrame::Receipt { .. }
            | ServerFrame::Pong
            | ServerFrame::AuthOk
            | ServerFrame::Ping { .. }
            | ServerFrame::Presence { .. }
            | ServerFrame::PresenceSnapshot { .. }
            | ServerFrame::ConversationUpdated { .. }
            | ServerFrame::ConversationChanged { .. }
            | ServerFrame::ConversationRemoved { .. }
            | ServerFrame::AttachmentUpdated { .. }
            | ServerFrame::Resumed { .. } => {}
            ServerFrame::Message { .. }
            | ServerFrame::MessageEdited { .. }
            | ServerFrame::MessageDeleted { .. }
            | ServerFrame::Reaction { .. } => unreachable!("sequenced"),
        }
    }

    /// Checks the key of a record about to be written: claimed for exactly
    /// it just before.
    fn check_claimed(&self, r: &Record) {
        let key = (r.sender_id, r.client_msg_id.clone());
        let claimed = self.keys.borrow().get(&key).copied();
        assert_eq!(
            claimed.map(|k| (k.seq, k.id)),
            Some((r.seq, r.id)),
            "a record is stored under the key claimed for it"
        );
    }

    // ---- PostgreSQL ----------------------------------------------------------

    /// The ingest of one new row, the way the origin's must work when
    /// batches commit in any order: a message's current state is kept in
    /// its row (the latest edit by seq wins; a delete erases it and its
    /// edits' text), events are kept, and events that arrived before their
    /// message apply when it arrives.
    fn origin_ingest(&mut self, m: &StoredMessage) {
        let at = m.created_at.timestamp_millis();
        match &m.change {
            None => {
                self.origin_rows.insert(
                    m.seq,
                    OriginRow::Message {
                        id: m.id,
                        content: m.content.clone(),
                        edit_seq: 0,
                        edited_at: None,
                        deleted_at: None,
                    },
                );
                self.origin_ids.insert(m.id, m.seq);
                let early: Vec<i64> = self
                    .origin_rows
                    .iter()
                    .filter(
                        |(_, r)| matches!(r, OriginRow::Event { target, .. } if *target == m.id),
                    )
                    .map(|(s, _)| *s)
                    .collect();
                for s in early {
                    self.origin_apply(s);
                }
            }
            Some(c) => {
                assert!(m.content.is_empty(), "a change carries no content");
                self.origin_rows.insert(
                    m.seq,
                    OriginRow::Event {
                        target: c.target_id,
                        actor: m.sender_id,
                        change: c.change.clone(),
                        at,
                    },
                );
                self.origin_apply(m.seq);
            }
        }
    }

    /// Applies the event at `seq` to PostgreSQL's rows.
    fn origin_apply(&mut self, seq: i64) {
        let Some(OriginRow::Event {
            target, change, at, ..
        }) = self.origin_rows.get(&seq).cloned()
        else {
            unreachable!("an event")
        };
        let erase_edits = |rows: &mut BTreeMap<i64, OriginRow>, of: Uuid| {
            for r in rows.values_mut() {
                if let OriginRow::Event {
                    target,
                    change: Change::Edit { content },
                    ..
                } = r
                {
                    if *target == of {
                        content.clear();
                    }
                }
            }
        };
        match &change {
            Change::Delete => {
                self.origin_deleted.insert(target);
                erase_edits(&mut self.origin_rows, target);
            }
            Change::Edit { .. } if self.origin_deleted.contains(&target) => {
                erase_edits(&mut self.origin_rows, target);
            }
            _ => {}
        }
        let Some(&target_seq) = self.origin_ids.get(&target) else {
            return;
        };
        let Some(OriginRow::Message {
            content: text,
            edit_seq,
            edited_at,
            deleted_at,
            ..
        }) = self.origin_rows.get_mut(&target_seq)
        else {
            unreachable!("a message")
        };
        match change {
            Change::Edit { content } => {
                if deleted_at.is_none() && seq > *edit_seq {
                    *text = content;
                    *edit_seq = seq;
                    *edited_at = Some(at);
                }
            }
            Change::Delete => {
                text.clear();
                *edited_at = None;
                *deleted_at = Some(at);
            }
            Change::React { .. } => {}
        }
    }

    /// A message as PostgreSQL (REST) has it now: reactions are the
    /// latest event by seq per (user, emoji).
    fn origin_view(&self, seq: i64) -> Option<View> {
        let Some(OriginRow::Message {
            id,
            content,
            edited_at,
            deleted_at,
            ..
        }) = self.origin_rows.get(&seq)
        else {
            return None;
        };
        let mut latest: BTreeMap<(String, i64), bool> = BTreeMap::new();
        for r in self.origin_rows.values() {
            if let OriginRow::Event {
                target,
                actor,
                change: Change::React { emoji, on },
                ..
            } = r
            {
                if target == id {
                    latest.insert((emoji.clone(), *actor), *on);
                }
            }
        }
        let mut reactions: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        if deleted_at.is_none() {
            for ((emoji, actor), on) in latest {
                if on {
                    reactions.entry(emoji).or_default().insert(actor);
                }
            }
        }
        Some(View {
            id: *id,
            content: content.clone(),
            edited_at: *edited_at,
            deleted_at: *deleted_at,
            reactions,
        })
    }

    /// No text of a message PostgreSQL knows deleted is left in it.
    fn check_origin_erasure(&self) {
        for (seq, r) in &self.origin_rows {
            let text = match r {
                OriginRow::Message {
                    content,
                    deleted_at,
                    ..
                } => {
                    if deleted_at.is_some() {
                        assert!(content.is_empty(), "PostgreSQL's seq {seq} is no tombstone");
                    }
                    content
                }
                OriginRow::Event {
                    change: Change::Edit { content },
                    ..
                } => content,
                OriginRow::Event { .. } => continue,
            };
            if let Some(owner) = self.erased.get(text) {
                assert!(
                    !self.origin_deleted.contains(owner),
                    "PostgreSQL's seq {seq} keeps {text:?} of a message it holds deleted"
                );
            }
        }
    }
}

impl Driver for World {
    type Error = &'static str;

    fn store(&mut self, r: &Record) -> Result<(), &'static str> {
        self.write()?;
        assert_eq!(
            r.seq,
            self.last_durable_seq() + 1,
            "seq is contiguous in the durable log"
        );
        assert!(r.is_message(), "a change is stored with store_change");
        assert_eq!(
            r.state,
            MessageState::default(),
            "a new message is unchanged"
        );
        self.check_claimed(r);
        self.typing_log
            .entry(r.sender_id)
            .or_default()
            .push((TypingEvent::Message, self.now));
        self.ever_stored.insert(r.seq, r.id);
        self.durable.insert(r.seq, r.clone());
        self.truth.insert(
            r.seq,
            Truth {
                id: r.id,
                seq: r.seq,
                sender: r.sender_id,
                created_at_ms: r.created_at_ms,
                content: r.content.clone(),
                state: MessageState::default(),
                texts: vec![r.content.clone()],
            },
        );
        self.truth_ids.insert(r.id, r.seq);
        self.touched.insert(r.seq);
        Ok(())
    }

    fn store_change(&mut self, r: &Record, state: &MessageState) -> Result<(), &'static str> {
        self.write()?;
        assert_eq!(
            r.seq,
            self.last_durable_seq() + 1,
            "seq is contiguous in the durable log"
        );
        self.check_claimed(r);
        let c = r.change.clone().expect("a change record names its change");
        assert!(
            r.content.is_empty(),
            "a change carries no content of its own"
        );
        // The reference decides, independently of the room, what the
        // change does and whether it was allowed.
        let target_seq = *self
            .truth_ids
            .get(&c.target_id)
            .expect("a change names a stored message");
        assert_eq!(c.target_seq, target_seq, "a change names its target's seq");
        let t = self.truth.get_mut(&target_seq).expect("the reference");
        let expected = reference(t, r.sender_id, &c.change, r.created_at_ms);
        assert_eq!(
            *state, expected,
            "seq {}: the room's state of message {target_seq} is the reference's",
            r.seq
        );
        if let Change::React { emoji, .. } = &c.change {
            assert_eq!(c.count, state.count(emoji), "a reaction's count");
        }
        t.state = state.clone();
        match &c.change {
            Change::Edit { content } => {
                t.content = content.clone();
                t.texts.push(content.clone());
            }
            Change::Delete => {
                t.content.clear();
                for text in t.texts.drain(..) {
                    self.erased.insert(text, t.id);
                }
            }
            Change::React { .. } => {}
        }
        self.touched.insert(target_seq);
        self.ever_stored.insert(r.seq, r.id);
        self.event_ids.push(r.id);

        // The Durable Object's writes: the event, its key marked as a
        // change's, the state by id, and the target's row if the log still
        // holds it; a delete also erases the text of the edits to it.
        self.durable.insert(r.seq, r.clone());
        self.change_keys
            .insert((r.sender_id, r.client_msg_id.clone()));
        self.msg_state.insert(c.target_id, state.clone());
        if let Some(row) = self
            .durable
            .get_mut(&c.target_seq)
            .filter(|row| row.id == c.target_id)
        {
            row.state = state.clone();
            match &c.change {
                Change::Edit { content } => row.content = content.clone(),
                Change::Delete => {
                    row.content.clear();
                    row.attachments.clear();
                    row.mentions.clear();
                    row.reply_to = None;
                }
                Change::React { .. } => {}
            }
        }
        if c.change == Change::Delete {
            for row in self.durable.values_mut() {
                if let Some(ChangeRecord {
                    target_id,
                    change: Change::Edit { content },
                    ..
                }) = row.change.as_mut()
                {
                    if *target_id == c.target_id {
                        content.clear();
                    }
                }
            }
        }
        Ok(())
    }

    fn store_watermark(&mut self, w: &Watermark) -> Result<(), &'static str> {
        self.write()?;
        let e = self.watermarks.entry(w.user_id).or_insert(StoredWatermark {
            watermark: *w,
            synced: false,
        });
        e.watermark.delivered_seq = e.watermark.delivered_seq.max(w.delivered_seq);
        e.watermark.read_seq = e.watermark.read_seq.max(w.read_seq);
        e.synced = false;
        Ok(())
    }

    fn replace_members(&mut self, members: &[StoredWatermark]) -> Result<(), &'static str> {
        self.write()?;
        self.watermarks = members.iter().map(|m| (m.watermark.user_id, *m)).collect();
        Ok(())
    }

    fn mark_flushed(&mut self, confirmed: &Confirmed) -> Result<(), &'static str> {
        self.write()?;
        for s in confirmed.runs.iter().flat_map(|r| r.clone()) {
            assert!(
                self.origin.contains_key(&s),
                "flushed before PostgreSQL has it"
            );
            if let Some(r) = self.durable.get_mut(&s) {
                r.flushed = true;
            }
        }
        // As the Durable Object does: rows below the room's confirmed
        // prefix and beyond the retention go, trusting the room's bound (a
        // wrong one leaves a gap that the restore check catches).
        let keep_from = confirmed.prefix_end.min(confirmed.last_seq - RETAIN + 1);
        self.durable.retain(|s, _| *s >= keep_from);
        Ok(())
    }

    fn mark_receipts_synced(&mut self, ws: &[Watermark]) -> Result<(), &'static str> {
        self.write()?;
        for w in ws {
            if let Some(e) = self.watermarks.get_mut(&w.user_id) {
                if e.watermark == *w {
                    e.synced = true;
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, to: &Recipients<'_>, frame: &ServerFrame) {
        let targets: Vec<usize> = (0..self.clients.len())
            .filter(|&i| self.clients[i].conn.is_some_and(|conn| to.includes(conn)))
            .collect();
        // A relay goes to the others; a Conn-targeted typing frame is the
        // current state for a new connection.
        if let (ServerFrame::Typing { user_id, .. }, Target::OthersOf(_)) = (frame, to.target()) {
            self.typing_log
                .entry(*user_id)
                .or_default()
                .push((TypingEvent::Relay, self.now));
        }
        for i in targets {
            self.deliver(i, frame);
        }
    }

    fn forward(&mut self, users: &[i64], frame: &ServerFrame) {
        assert_eq!(users, [SUBSCRIBER], "only the subscribed member's object");
        if let Some(seq) = self.check_sequenced(frame) {
            let last = self.forwarded.last().copied().unwrap_or(0);
            assert!(
                seq > last,
                "forwarded seq {seq} after {last}: out of order or twice"
            );
            self.forwarded.push(seq);
            apply_frame(&mut self.forwarded_views, frame, None, false);
        }
    }

    fn close(&mut self, conn: ConnId, _code: u16, _reason: &str) {
        if let Some(i) = self.client_of(conn) {
            self.clients[i].conn = None;
        }
    }

    fn notify(&mut self, notice: ConversationNotice) {
        for (user, unread) in &notice.recipients {
            assert!(
                CLIENT_USERS.contains(user),
                "a notice for a non-member {user}"
            );
            assert!(
                (0..=notice.seq).contains(unread),
                "unread {unread} of {}",
                notice.seq
            );
        }
        if let Some(last) = &notice.last_message {
            let t = &self.truth[&last.seq];
            if t.state.is_deleted() {
                assert!(
                    !self.erased.contains_key(&last.content),
                    "a notice quotes a deleted message"
                );
            }
        }
    }
}

impl Context for World {
    fn claim_key(
        &self,
        sender: i64,
        key: &str,
        candidate: KnownKey,
    ) -> Result<Claim, StorageFailed> {
        self.write().map_err(|_| StorageFailed)?;
        let mut keys = self.keys.borrow_mut();
        let k = (sender, key.to_owned());
        if let Some(known) = keys.get(&k) {
            return Ok(Claim::Known(*known));
        }
        assert_eq!(
            candidate.seq,
            self.last_durable_seq() + 1,
            "a key is claimed for the next seq"
        );
        keys.insert(k, candidate);
        Ok(Claim::Claimed)
    }

    fn known_key(&self, sender: i64, key: &str) -> Result<Option<KnownKey>, StorageFailed> {
        Ok(self.keys.borrow().get(&(sender, key.to_owned())).copied())
    }

    fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
        Err(AuthError::Invalid)
    }

    /// As the Durable Object answers: the message's key (never pruned)
    /// gives its seq, sender and time, the state table its state, and the
    /// log, while it holds the row, its preview.
    fn target(&self, id: Uuid) -> Result<Option<MessageRef>, StorageFailed> {
        let keys = self.keys.borrow();
        let Some(((sender, key), known)) = keys.iter().find(|(_, k)| k.id == id) else {
            return Ok(None);
        };
        if self.change_keys.contains(&(*sender, key.clone())) {
            return Ok(None);
        }
        let logged = self.durable.get(&known.seq).filter(|r| r.id == id);
        let state = self
            .msg_state
            .get(&id)
            .cloned()
            .or_else(|| logged.map(|r| r.state.clone()))
            .unwrap_or_default();
        Ok(Some(MessageRef {
            id,
            seq: known.seq,
            sender_id: *sender,
            created_at_ms: known.created_at_ms,
            preview: logged.filter(|_| !state.is_deleted()).map(Record::preview),
            state,
        }))
    }
}

impl RoomStorage for World {
    fn members(&self) -> Result<Vec<StoredWatermark>, StorageFailed> {
        Ok(self.watermarks.values().copied().collect())
    }

    fn last_seq(&self) -> Result<i64, StorageFailed> {
        Ok(self.last_durable_seq())
    }

    fn oldest_unflushed(&self) -> Result<Option<i64>, StorageFailed> {
        Ok(self.durable.values().find(|r| !r.flushed).map(|r| r.seq))
    }

    fn messages_from(&self, from: i64) -> Result<Vec<Record>, StorageFailed> {
        Ok(self.durable.range(from..).map(|(_, r)| r.clone()).collect())
    }

    fn forget_keys_after(&self, last_seq: i64) -> Result<(), StorageFailed> {
        self.keys.borrow_mut().retain(|_, k| k.seq <= last_seq);
        Ok(())
    }
}

/// What the reference predicts for a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Stored,
    NoOp,
    /// The same text again, for a message beyond the room's window: the
    /// room cannot compare it with the stored text, and stores it.
    StoredOrNoOp,
    Refused(&'static str),
}

/// What the actor heard back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Stored(i64),
    NoOp,
    Refused(String),
    /// Nothing: the write failed (the Durable Object answers 503).
    Nothing,
}

/// Refusals that come before the room looks at the message.
fn preempts(code: &str) -> bool {
    matches!(code, "rate_limited" | "backpressure")
}

struct Sim {
    room: Room,
    world: World,
    config: RoomConfig,
    /// Batches sent and not answered, oldest first.
    in_flight: Vec<FlushBatch>,
    next_conn: u64,
    next_key: u64,
    next_seed: u64,
    restarts: usize,
    /// Changes stored, answered as no-ops, and refused (for the tests'
    /// own checks that the paths are hit).
    changes: BTreeMap<&'static str, usize>,
    /// What the last change heard back.
    last_change: Option<Outcome>,
    /// Views of messages held from before a resync's gap that REST's
    /// re-read changed: what `after_seq` alone would have left stale.
    refreshed: usize,
}

impl Sim {
    fn new(config: RoomConfig) -> Self {
        let mut world = World {
            now: 1_700_000_000_000,
            clients: CLIENT_USERS
                .iter()
                .map(|&user| Client {
                    user,
                    ..Client::default()
                })
                .collect(),
            ..World::default()
        };
        let mut room = Room::new(CONVERSATION, config.clone(), 42);
        let members: Vec<Watermark> = [1, 2, 3]
            .iter()
            .map(|&user_id| Watermark {
                user_id,
                delivered_seq: 0,
                read_seq: 0,
            })
            .collect();
        room.set_members(world.now, &members, 0);
        room.set_moderators([MODERATOR]);
        // One member is online on their always-on connection only.
        room.handle_subscribe(world.now, SUBSCRIBER, None)
            .expect("a member may subscribe");
        drain(&mut room, &mut world).expect("the first write succeeds");
        Self {
            room,
            world,
            config,
            in_flight: Vec::new(),
            next_conn: 1,
            next_key: 1,
            next_seed: 43,
            restarts: 0,
            changes: BTreeMap::new(),
            last_change: None,
            refreshed: 0,
        }
    }

    /// A new instance from storage, with the connections that survived.
    fn reload(&mut self, survivors: impl Fn(usize) -> bool) {
        self.next_seed += 1;
        self.restarts += 1;
        self.room = Room::load(
            CONVERSATION,
            self.config.clone(),
            self.next_seed,
            self.world.now,
            &self.world,
        )
        .expect("storage holds a loadable room");
        // The Durable Object keeps subscriptions and moderators in its
        // SQLite.
        self.room.restore_subscriber(SUBSCRIBER);
        self.room.set_moderators([MODERATOR]);
        for (i, client) in self.world.clients.iter_mut().enumerate() {
            let Some(conn) = client.conn else { continue };
            if survivors(i) {
                self.room.handle_reattach(conn, client.user, None);
            } else {
                client.conn = None;
            }
        }
        for log in self.world.typing_log.values_mut() {
            log.push((TypingEvent::Restart, self.world.now));
        }
    }

    fn connect(&mut self, i: usize) {
        if self.world.clients[i].conn.is_some() {
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let since = self.world.clients[i].have.last().copied().unwrap_or(0);
        self.world.clients[i].conn = Some(conn);
        self.room
            .handle_connect(
                self.world.now,
                conn,
                self.world.clients[i].user,
                Some(since),
            )
            .expect("members may connect");
        self.drain();
    }

    fn text(&mut self, i: usize, frame: &serde_json::Value) {
        if let Some(conn) = self.world.clients[i].conn {
            self.room
                .handle_text(self.world.now, conn, &frame.to_string(), &self.world);
        }
    }

    fn key(&mut self) -> String {
        let key = format!("k{}", self.next_key);
        self.next_key += 1;
        key
    }

    /// The `pick`-th newest message, among `user`'s own if `own` and they
    /// have any.
    fn pick_message(&self, user: i64, pick: usize, own: bool) -> Option<&Truth> {
        let mine: Vec<&Truth> = self
            .world
            .truth
            .values()
            .filter(|t| t.sender == user)
            .collect();
        let from: Vec<&Truth> = if own && !mine.is_empty() {
            mine
        } else {
            self.world.truth.values().collect()
        };
        from.get(from.len().checked_sub(1 + pick % from.len().max(1))?)
            .copied()
    }

    fn apply(&mut self, action: &Action) {
        match *action {
            Action::Connect(i) => self.connect(i),
            Action::Disconnect(i) => {
                if let Some(conn) = self.world.clients[i].conn.take() {
                    self.room.handle_disconnect(self.world.now, conn);
                }
            }
            Action::Send(i) => {
                if self.world.clients[i].conn.is_none() {
                    return;
                }
                let key = self.key();
                let frame = serde_json::json!({
                    "type": "message", "conversation_id": CONVERSATION,
                    "content": format!("hello {key}"), "client_msg_id": key,
                });
                self.world.clients[i].sent.push(SentEntry {
                    key,
                    frame: frame.clone(),
                    target: None,
                    acked: None,
                });
                self.text(i, &frame);
            }
            Action::Resend(i, k) => return self.resend(i, k),
            Action::Typing(i) => self.text(
                i,
                &serde_json::json!({"type": "typing", "conversation_id": CONVERSATION}),
            ),
            Action::Read(i) => {
                let seq = self.world.clients[i].have.last().copied().unwrap_or(0);
                self.text(
                    i,
                    &serde_json::json!({"type": "read", "conversation_id": CONVERSATION, "seq": seq}),
                );
            }
            Action::Garbage(i) => {
                let Some(conn) = self.world.clients[i].conn else {
                    return;
                };
                self.room
                    .handle_text(self.world.now, conn, "{not json", &self.world);
                self.drain();
                // Garbage costs tokens; only a flood of it closes.
                if self.world.clients[i].conn.is_some() {
                    assert_eq!(self.room.user_of(conn), Some(self.world.clients[i].user));
                }
                return;
            }
            Action::Edit {
                client,
                pick,
                own,
                how,
                http,
            } => {
                let user = self.world.clients[client].user;
                let Some(t) = self.pick_message(user, pick, own) else {
                    return;
                };
                let (id, current) = (t.id, t.content.clone());
                let content = match how {
                    0 => "  ".to_owned(),
                    1 if !current.is_empty() => current,
                    _ => format!("edit k{}", self.next_key),
                };
                return self.change(client, id, Change::Edit { content }, http);
            }
            Action::Delete {
                client,
                pick,
                own,
                http,
            } => {
                let user = self.world.clients[client].user;
                let Some(t) = self.pick_message(user, pick, own) else {
                    return;
                };
                let id = t.id;
                return self.change(client, id, Change::Delete, http);
            }
            Action::React {
                client,
                pick,
                emoji,
                on,
                http,
            } => {
                let user = self.world.clients[client].user;
                let Some(t) = self.pick_message(user, pick, false) else {
                    return;
                };
                let id = t.id;
                let change = Change::React {
                    emoji: EMOJIS[emoji].to_owned(),
                    on,
                };
                return self.change(client, id, change, http);
            }
            Action::Stray {
                client,
                pick,
                event,
            } => {
                let ids = &self.world.event_ids;
                let id = if event && !ids.is_empty() {
                    ids[ids.len() - 1 - pick % ids.len()]
                } else {
                    Uuid::from_u128(0x5eed_0000 + pick as u128)
                };
                let change = Change::React {
                    emoji: EMOJIS[0].to_owned(),
                    on: true,
                };
                return self.change(client, id, change, false);
            }
            Action::Advance(ms) => {
                self.world.now += ms;
                self.room.handle_timeout(self.world.now);
            }
            Action::FlushStart => {
                if let Some(batch) = self.room.poll_flush(self.world.now) {
                    // The batch leaves only once what it says is durable
                    // here; a failed write keeps it home.
                    if self.drain() {
                        self.in_flight.push(batch);
                    }
                }
            }
            Action::FlushOk(k) => self.flush_ok(k),
            Action::FlushFail(k) => {
                if let Some(batch) = self.take_in_flight(k) {
                    self.room.handle_flush_failure(self.world.now, batch.id);
                }
            }
            Action::FlushLost(k) => {
                if let Some(batch) = self.take_in_flight(k) {
                    self.origin_store(&batch);
                    self.room.handle_flush_failure(self.world.now, batch.id);
                }
            }
            Action::FailWrite(skip) => self.world.fail_in.set(Some(skip)),
            Action::Restart {
                survivors,
                answer_lost,
            } => {
                // The instance and its requests are gone; the origin may
                // have stored what they carried.
                for batch in std::mem::take(&mut self.in_flight) {
                    if answer_lost {
                        self.origin_store(&batch);
                    }
                }
                self.reload(|i| survivors & (1 << i) != 0);
            }
        }
        self.drain();
    }

    fn resend(&mut self, i: usize, k: usize) {
        let Some(entry) = self.world.clients[i].sent.get(k).cloned() else {
            return;
        };
        if self.world.clients[i].conn.is_none() {
            return;
        }
        let before = self.world.keys.borrow().len();
        let last_seq = self.room.last_seq();
        self.world.clients[i].inbox.clear();
        self.text(i, &entry.frame);
        self.drain();
        if entry.acked.is_some() && !entry.acked_as_no_op() {
            assert_eq!(
                self.world.keys.borrow().len(),
                before,
                "a resend stores nothing"
            );
            assert_eq!(self.room.last_seq(), last_seq, "a resend stores nothing");
            // The original ack again (checked on delivery), or a refusal
            // before the room looked at it, or storage failing to answer.
            for f in &self.world.clients[i].inbox {
                if let ServerFrame::Error { code, .. } = f {
                    assert!(
                        preempts(code) || code == "storage_unavailable",
                        "a resend of stored {:?} was refused: {code}",
                        entry.frame
                    );
                }
            }
        }
    }

    /// What the reference says `user`'s change to `target` does now.
    fn expect(&self, user: i64, target: Uuid, change: &Change) -> Expect {
        match change {
            Change::Edit { content } if content.trim().is_empty() => {
                return Expect::Refused("empty_field");
            }
            Change::React { emoji, .. } if !lifecycle::valid_emoji(emoji) => {
                return Expect::Refused("invalid_emoji");
            }
            _ => {}
        }
        let Some(t) = self
            .world
            .truth_ids
            .get(&target)
            .map(|s| &self.world.truth[s])
        else {
            return Expect::Refused("message_not_found");
        };
        let deleted = t.state.is_deleted();
        let now = i64::try_from(self.world.now).expect("ms");
        match change {
            Change::Edit { content } => {
                if user != t.sender {
                    Expect::Refused("forbidden")
                } else if deleted {
                    Expect::Refused("message_deleted")
                } else if now - t.created_at_ms > EDIT_WINDOW_MS {
                    Expect::Refused("edit_window_passed")
                } else if *content != t.content {
                    Expect::Stored
                } else if self.room.window_start() <= t.seq {
                    Expect::NoOp
                } else {
                    Expect::StoredOrNoOp
                }
            }
            Change::Delete => {
                if user != t.sender && user != MODERATOR {
                    Expect::Refused("forbidden")
                } else if deleted {
                    Expect::NoOp
                } else {
                    Expect::Stored
                }
            }
            Change::React { emoji, on } => {
                let has = t
                    .state
                    .reactions
                    .iter()
                    .any(|(e, users)| e == emoji && users.contains(&user));
                if deleted {
                    Expect::Refused("message_deleted")
                } else if has == *on {
                    Expect::NoOp
                } else {
                    Expect::Stored
                }
            }
        }
    }

    /// `client` changes message `target` (over its socket, or over HTTP),
    /// and what it hears back is checked against the reference.
    fn change(&mut self, i: usize, target: Uuid, change: Change, http: bool) {
        if !http && self.world.clients[i].conn.is_none() {
            return;
        }
        let user = self.world.clients[i].user;
        let key = self.key();
        let expect = self.expect(user, target, &change);
        let target_ref = self.world.truth_ids.get(&target).map(|s| (*s, target));
        let mut frame = serde_json::json!({
            "conversation_id": CONVERSATION, "message_id": target, "client_msg_id": key,
        });
        match &change {
            Change::Edit { content } => {
                frame["type"] = "edit".into();
                frame["content"] = content.clone().into();
            }
            Change::Delete => frame["type"] = "delete".into(),
            Change::React { emoji, on } => {
                frame["type"] = "react".into();
                frame["emoji"] = emoji.clone().into();
                frame["on"] = (*on).into();
            }
        }
        self.world.clients[i].sent.push(SentEntry {
            key: key.clone(),
            frame: frame.clone(),
            target: target_ref,
            acked: None,
        });
        let before = self.room.last_seq();
        let failed_before = self.world.failed_writes.get();
        self.world.clients[i].inbox.clear();
        let outcome = if http {
            // The POST fallback: the answer leaves once the outputs are
            // drained (a failed write answers 503).
            let result = self.room.submit_change(
                self.world.now,
                user,
                target,
                change,
                Some(key),
                None,
                &self.world,
            );
            let complete = self.drain();
            match result {
                Err(e) => Outcome::Refused(e.code().to_owned()),
                Ok(_) if !complete => Outcome::Nothing,
                Ok(out) => {
                    let ServerFrame::Ack { seq, id, .. } = out.ack else {
                        panic!("a change is answered with an ack: {:?}", out.ack)
                    };
                    assert_eq!(
                        self.world.ever_stored.get(&seq),
                        Some(&id),
                        "acked once stored"
                    );
                    self.world.clients[i].sent.last_mut().expect("sent").acked = Some((seq, id));
                    if Some((seq, id)) == target_ref {
                        assert!(out.event.is_none(), "a no-op relays nothing");
                        Outcome::NoOp
                    } else {
                        assert!(out.event.is_some(), "a new change is relayed");
                        Outcome::Stored(seq)
                    }
                }
            }
        } else {
            let conn = self.world.clients[i].conn;
            self.text(i, &frame);
            self.drain();
            let inbox = std::mem::take(&mut self.world.clients[i].inbox);
            let ack = inbox.iter().find_map(|f| match f {
                ServerFrame::Ack { seq, id, .. } => Some((*seq, *id)),
                _ => None,
            });
            let error = inbox.iter().find_map(|f| match f {
                ServerFrame::Error { code, .. } => Some(code.clone()),
                _ => None,
            });
            assert!(
                ack.is_none() || error.is_none(),
                "acked and refused at once: {inbox:?}"
            );
            match (ack, error) {
                (Some(a), _) if Some(a) == target_ref => Outcome::NoOp,
                (Some((seq, _)), _) => Outcome::Stored(seq),
                (None, Some(code)) => Outcome::Refused(code),
                (None, None) => {
                    assert!(conn.is_some());
                    Outcome::Nothing
                }
            }
        };
        let after = self.room.last_seq();
        if let Outcome::Stored(seq) = outcome {
            assert_eq!((seq, after), (before + 1, before + 1), "the next seq");
        } else {
            assert_eq!(after, before, "a change not acked as new stored nothing");
        }
        let write_failed = self.world.failed_writes.get() > failed_before;
        let ok = match (&expect, &outcome) {
            (Expect::Refused(c), Outcome::Refused(o)) => {
                o == c || (preempts(o) && !matches!(*c, "invalid_emoji" | "empty_field"))
            }
            (Expect::Stored | Expect::StoredOrNoOp, Outcome::Stored(_)) => true,
            (Expect::NoOp | Expect::StoredOrNoOp, Outcome::NoOp) => true,
            (Expect::Stored | Expect::StoredOrNoOp, Outcome::Refused(o)) => {
                preempts(o) || o == "storage_unavailable"
            }
            (Expect::NoOp, Outcome::Refused(o)) => preempts(o),
            (Expect::Stored | Expect::StoredOrNoOp, Outcome::Nothing) => write_failed,
            _ => false,
        };
        assert!(
            ok,
            "user {user}'s change to {target}: expected {expect:?}, got {outcome:?}"
        );
        let label = match (&outcome, &expect) {
            (Outcome::Stored(_), _) => "stored",
            (Outcome::NoOp, _) => "no-op",
            (Outcome::Refused(_), Expect::Refused("forbidden")) => "forbidden",
            (Outcome::Refused(_), _) => "refused",
            (Outcome::Nothing, _) => "lost",
        };
        *self.changes.entry(label).or_default() += 1;
        self.last_change = Some(outcome);
    }

    /// The origin's ingest: idempotent, one id per seq, in any order.
    fn origin_store(&mut self, batch: &FlushBatch) -> Vec<Uuid> {
        let mut stored = Vec::new();
        for m in &batch.messages {
            let id = *self.world.origin.entry(m.seq).or_insert(m.id);
            assert_eq!(id, m.id, "seq {} arrived with two different ids", m.seq);
            if !self.world.origin_rows.contains_key(&m.seq) {
                self.world.origin_ingest(m);
            }
            stored.push(m.id);
        }
        for r in &batch.receipts {
            let e = self
                .world
                .origin_receipts
                .entry(r.user_id)
                .or_insert((0, 0));
            e.0 = e.0.max(r.delivered_seq);
            e.1 = e.1.max(r.read_seq);
        }
        self.world.check_origin_erasure();
        stored
    }

    fn take_in_flight(&mut self, k: usize) -> Option<FlushBatch> {
        if self.in_flight.is_empty() {
            return None;
        }
        let i = k % self.in_flight.len();
        Some(self.in_flight.remove(i))
    }

    fn flush_ok(&mut self, k: usize) {
        let Some(batch) = self.take_in_flight(k) else {
            return;
        };
        let stored = self.origin_store(&batch);
        self.room.handle_flush_result(
            self.world.now,
            batch.id,
            &FlushOutcome {
                stored,
                rejected: Vec::new(),
                receipts_ok: true,
            },
        );
    }

    /// Executes outputs the way the Durable Object does: through `drain`,
    /// rebuilding the room from storage when a write fails (every
    /// connection survives that; only memory is thrown away). Returns
    /// whether the drain completed.
    fn drain(&mut self) -> bool {
        let mut complete = true;
        loop {
            if drain(&mut self.room, &mut self.world).is_err() {
                // A batch in flight stays in flight: its answer will reach
                // the new instance, which ignores it (and flushes again).
                complete = false;
                self.reload(|_| true);
                continue;
            }
            let Some((i, from_seq)) = self.world.pending_resyncs.pop() else {
                break;
            };
            self.resync(i, from_seq);
        }
        check_step(self);
        self.world.touched.clear();
        complete
    }

    /// A client told to `resync` loads the gap from REST and reconnects.
    /// REST has every seq before the room's window, with each message in
    /// its current state; the change events in the gap are not messages,
    /// so the client also re-reads the messages it held from before the
    /// gap (one of them may have changed there).
    fn resync(&mut self, i: usize, from_seq: i64) {
        let start = self.room.window_start();
        let w = &mut self.world;
        for s in from_seq..start {
            assert!(
                w.origin.contains_key(&s),
                "resync points at REST, which lacks {s}"
            );
            w.clients[i].have.insert(s);
            if let Some(v) = w.origin_view(s) {
                w.clients[i].views.insert(s, v);
                w.touched.insert(s);
            }
        }
        let held: Vec<i64> = w.clients[i]
            .views
            .range(..from_seq)
            .map(|(s, _)| *s)
            .collect();
        for s in held {
            let v = w.origin_view(s).expect("REST has what the client held");
            if w.clients[i].views.insert(s, v.clone()) != Some(v) {
                self.refreshed += 1;
            }
            w.touched.insert(s);
        }
        if let Some(conn) = w.clients[i].conn.take() {
            self.room.handle_disconnect(self.world.now, conn);
        }
        self.connect(i);
    }
}

/// Invariants that hold between any two steps.
fn check_step(sim: &Sim) {
    let w = &sim.world;
    // The log is contiguous up to the room's last seq (pruning only takes
    // a flushed prefix).
    let seqs: Vec<i64> = w.durable.keys().copied().collect();
    if let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) {
        assert_eq!(
            seqs,
            (first..=last).collect::<Vec<_>>(),
            "the log has a hole"
        );
        assert!(
            (1..first).all(|s| w.origin.contains_key(&s)),
            "pruned rows are in PostgreSQL"
        );
    }
    assert_eq!(
        sim.room.last_seq(),
        w.last_durable_seq(),
        "memory matches storage"
    );
    let unflushed = w.durable.values().filter(|r| !r.flushed).count();
    assert_eq!(
        sim.room.unflushed(),
        unflushed,
        "the outbox matches storage"
    );
    for (seq, id) in &w.origin {
        assert_eq!(
            w.ever_stored.get(seq),
            Some(id),
            "PostgreSQL holds only what the room stored"
        );
    }
    // The log's rows read as the reference says, and hold nothing a delete
    // erased (a message's text, or an edit's).
    for r in w.durable.values() {
        match &r.change {
            None => {
                let t = &w.truth[&r.seq];
                assert_eq!(
                    (&r.content, &r.state),
                    (&t.content, &t.state),
                    "the log's seq {} is the reference's",
                    r.seq
                );
            }
            Some(c) => {
                if let Change::Edit { content } = &c.change {
                    assert!(
                        !w.erased.contains_key(content),
                        "the log's seq {} keeps the text of a deleted message",
                        r.seq
                    );
                }
            }
        }
    }
    for (id, state) in &w.msg_state {
        assert_eq!(state, &w.truth[&w.truth_ids[id]].state, "the state table");
    }
    // A connected client is never behind, and sees what it just heard of
    // as it is.
    for (i, c) in w.clients.iter().enumerate() {
        if c.conn.is_none() {
            continue;
        }
        assert_eq!(
            c.have.last().copied().unwrap_or(0),
            sim.room.last_seq(),
            "connected client {i} is behind"
        );
        for s in &w.touched {
            assert_eq!(
                c.views.get(s),
                Some(&View::of_truth(&w.truth[s])),
                "client {i}'s view of message {s}"
            );
        }
    }
}

fn config(small_window: bool) -> RoomConfig {
    RoomConfig {
        replay_window: if small_window { 4 } else { 1_000 },
        rate_burst: 6,
        rate_per_sec: 2,
        flood_strikes: 4,
        edit_window_ms: EDIT_WINDOW_MS,
        ..RoomConfig::default()
    }
}

/// Flushes until the origin has everything, then reconnects every client
/// from its high-water mark.
fn settle(sim: &mut Sim) {
    for _ in 0..1_000 {
        let receipts_synced = sim.room.members().all(|w| {
            sim.world
                .origin_receipts
                .get(&w.user_id)
                .copied()
                .unwrap_or((0, 0))
                == (w.delivered_seq, w.read_seq)
        });
        if sim.room.unflushed() == 0 && sim.in_flight.is_empty() && receipts_synced {
            break;
        }
        sim.apply(&Action::Advance(15_000));
        sim.apply(&Action::FlushStart);
        sim.apply(&Action::FlushOk(0));
    }
    assert_eq!(sim.room.unflushed(), 0, "the outbox drains");
    for w in sim.room.members() {
        assert_eq!(
            sim.world
                .origin_receipts
                .get(&w.user_id)
                .copied()
                .unwrap_or((0, 0)),
            (w.delivered_seq, w.read_seq),
            "the origin has user {}'s watermarks",
            w.user_id
        );
    }
    for i in 0..sim.world.clients.len() {
        sim.apply(&Action::Disconnect(i));
        sim.apply(&Action::Connect(i));
    }
}

fn check_end(sim: &Sim) {
    let w = &sim.world;
    let n = w.last_durable_seq();
    assert_eq!(sim.room.last_seq(), n);
    // A forward is dropped only with a failed write's outputs; the rest
    // reached the subscriber's object (in order: checked on the way).
    if n > 0 && w.failed_writes.get() == 0 {
        assert_eq!(
            w.forwarded,
            (1..=n).collect::<Vec<_>>(),
            "every message and change forwarded"
        );
        for (s, t) in &w.truth {
            assert_eq!(
                w.forwarded_views.get(s),
                Some(&View::of_truth(t)),
                "the subscriber's object's view of message {s}"
            );
        }
    }
    if n > 0 {
        assert!(!w.forwarded.is_empty(), "the subscriber got live messages");
    }
    assert_eq!(
        w.origin.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>(),
        "PostgreSQL holds every stored message and change, each seq once"
    );
    for (seq, r) in &w.durable {
        assert_eq!(
            w.origin.get(seq),
            Some(&r.id),
            "PostgreSQL has the room's id"
        );
    }
    // PostgreSQL, the room's window and every client read each message as
    // the reference does.
    w.check_origin_erasure();
    for (s, t) in &w.truth {
        let expected = View::of_truth(t);
        assert_eq!(
            w.origin_view(*s).as_ref(),
            Some(&expected),
            "PostgreSQL's message {s}"
        );
        if let Some(m) = sim.room.message(*s) {
            assert_eq!(View::of(&m), expected, "the room's message {s}");
        }
    }
    for (i, c) in w.clients.iter().enumerate() {
        assert_eq!(
            c.have.iter().copied().collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "client {i} has every seq after resuming"
        );
        assert_eq!(
            c.views.keys().collect::<Vec<_>>(),
            w.truth.keys().collect::<Vec<_>>(),
            "client {i} has every message"
        );
        for (s, t) in &w.truth {
            assert_eq!(
                c.views[s],
                View::of_truth(t),
                "client {i}'s view of message {s}"
            );
        }
        for e in &c.sent {
            if e.acked_as_no_op() {
                continue;
            }
            if let Some((seq, id)) = e.acked {
                let k = *w
                    .keys
                    .borrow()
                    .get(&(c.user, e.key.clone()))
                    .expect("acked keys are stored");
                assert_eq!((k.seq, k.id), (seq, id), "an ack names what is stored");
            }
        }
    }
    for (user, log) in &w.typing_log {
        let mut last_relay: Option<Millis> = None;
        for &(event, t) in log {
            match event {
                TypingEvent::Relay => {
                    if let Some(prev) = last_relay {
                        assert!(
                            t >= prev + 2_000,
                            "user {user}: two typing relays within 2 s"
                        );
                    }
                    last_relay = Some(t);
                }
                TypingEvent::Message | TypingEvent::Restart => last_relay = None,
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_with_restarts_keep_order_idempotency_and_exactly_once(
        actions in proptest::collection::vec(action(), 1..250),
        small_window in any::<bool>(),
    ) {
        let mut sim = Sim::new(config(small_window));
        for a in &actions {
            sim.apply(a);
        }
        settle(&mut sim);
        check_end(&sim);
    }
}

#[test]
fn a_long_outage_then_recovery_loses_nothing() {
    let mut sim = Sim::new(config(true));
    for i in 0..sim.world.clients.len() {
        sim.apply(&Action::Connect(i));
    }
    for round in 0..60 {
        sim.apply(&Action::Send(round % 4));
        sim.apply(&Action::Advance(700));
        sim.apply(&Action::FlushStart);
        sim.apply(&Action::FlushFail(0));
        if round % 7 == 0 {
            sim.apply(&Action::Disconnect(2));
        }
        if round % 7 == 3 {
            sim.apply(&Action::Connect(2));
        }
    }
    assert!(sim.world.origin.is_empty());
    assert!(sim.room.unflushed() > 0);
    settle(&mut sim);
    check_end(&sim);
}

/// The paths the random runs must keep hitting, spelled out once: a crash
/// with unflushed messages older than the window and an answer lost in
/// flight, a failed write in the middle of a send, and a resend of a key
/// the new instance has never seen.
#[test]
fn a_crash_mid_flush_and_a_failed_write_lose_nothing_and_duplicate_nothing() {
    let mut sim = Sim::new(config(true));
    for i in 0..sim.world.clients.len() {
        sim.apply(&Action::Connect(i));
    }
    for round in 0..12 {
        sim.apply(&Action::Send(round % 4));
        sim.apply(&Action::Advance(600));
    }
    sim.apply(&Action::FlushStart);
    assert!(!sim.in_flight.is_empty());
    // The origin stores the batch; the answer is lost with the instance,
    // and only client 0's socket survives (hibernation vs. crash).
    sim.apply(&Action::Restart {
        survivors: 0b0001,
        answer_lost: true,
    });
    assert!(sim.room.unflushed() > 0, "the outbox survived the restart");
    assert!(!sim.world.origin.is_empty());
    // A failed write in the middle of a send: no ack, no broadcast.
    let acked = |sim: &Sim| {
        sim.world.clients[0]
            .sent
            .iter()
            .filter(|s| s.acked.is_some())
            .count()
    };
    let acked_before = acked(&sim);
    sim.apply(&Action::FailWrite(0));
    sim.apply(&Action::Send(0));
    assert_eq!(
        acked_before,
        acked(&sim),
        "no ack for a message that was not stored"
    );
    assert_eq!(sim.world.failed_writes.get(), 1);
    // The first message left memory with the old instance; resending it
    // returns the original from storage.
    sim.apply(&Action::Resend(0, 0));
    // Now the key's claim succeeds and the message's own write fails: the
    // claim is left behind for a seq that another message takes next.
    let failed_seq = sim.room.last_seq() + 1;
    sim.apply(&Action::FailWrite(1));
    sim.apply(&Action::Send(0));
    assert_eq!(sim.world.failed_writes.get(), 2);
    assert_eq!(sim.room.last_seq(), failed_seq - 1, "nothing was stored");
    let lost = sim.world.clients[0].sent.len() - 1;
    sim.apply(&Action::Send(0));
    assert_eq!(
        sim.room.last_seq(),
        failed_seq,
        "the seq was handed out again"
    );
    // The unacked message's resend is a new message, not the other's.
    sim.apply(&Action::Resend(0, lost));
    assert_eq!(
        sim.world.clients[0].sent[lost].acked.map(|(seq, _)| seq),
        Some(failed_seq + 1),
        "stored anew after the lost write"
    );
    for i in 0..sim.world.clients.len() {
        sim.apply(&Action::Connect(i));
    }
    settle(&mut sim);
    check_end(&sim);
    assert!(sim.restarts >= 2);
}

/// The change paths spelled out once: forbidden edits and deletes, a
/// moderator's delete, batches that reach PostgreSQL out of order (the
/// delete before the message and the edit it erases), a resync over a
/// change to a message the client held, a restart, a change to a message
/// beyond the new window (found through storage), a resend the new
/// instance never saw of a change that would now be refused, and the edit
/// window.
#[test]
fn changes_survive_out_of_order_batches_a_resync_and_a_restart() {
    let mut sim = Sim::new(config(true));
    for i in 0..sim.world.clients.len() {
        sim.apply(&Action::Connect(i));
    }
    let outcome = |sim: &Sim| sim.last_change.clone().expect("a change");
    // Messages 1 (user 1), 2 (user 2), 3 (user 3).
    for i in [0, 2, 3] {
        sim.apply(&Action::Send(i));
    }
    let m1 = sim.world.truth[&1].id;
    // Message 1 is user 1's: user 2 may not edit it, user 3 may not
    // delete it; user 1 edits it and user 2 reacts.
    sim.apply(&Action::Edit {
        client: 2,
        pick: 2,
        own: false,
        how: 2,
        http: false,
    });
    assert_eq!(outcome(&sim), Outcome::Refused("forbidden".into()));
    sim.apply(&Action::Delete {
        client: 3,
        pick: 2,
        own: false,
        http: true,
    });
    assert_eq!(outcome(&sim), Outcome::Refused("forbidden".into()));
    sim.apply(&Action::Edit {
        client: 0,
        pick: 0,
        own: true,
        how: 2,
        http: false,
    });
    assert_eq!(outcome(&sim), Outcome::Stored(4));
    sim.apply(&Action::React {
        client: 2,
        pick: 2,
        emoji: 0,
        on: true,
        http: false,
    });
    assert_eq!(outcome(&sim), Outcome::Stored(5));
    // Batch A carries seqs 1..=5 (message 1's text and its edit's).
    sim.apply(&Action::Advance(200));
    sim.apply(&Action::FlushStart);
    // The moderator deletes message 1; batch B carries the delete, and
    // PostgreSQL gets B before A.
    sim.apply(&Action::Delete {
        client: 2,
        pick: 2,
        own: false,
        http: false,
    });
    assert_eq!(outcome(&sim), Outcome::Stored(6));
    assert!(sim.world.truth[&1].state.is_deleted());
    sim.apply(&Action::Advance(200));
    sim.apply(&Action::FlushStart);
    assert_eq!(sim.in_flight.len(), 2);
    sim.apply(&Action::FlushOk(1));
    assert!(sim.world.origin_deleted.contains(&m1));
    assert!(
        !sim.world.origin_ids.contains_key(&m1),
        "the delete came first"
    );
    sim.apply(&Action::FlushOk(0));
    assert_eq!(
        sim.world.origin_view(1).map(|v| v.content),
        Some(String::new()),
        "message 1 arrived after its delete, and was erased on arrival"
    );
    // A deleted message takes no reaction.
    sim.apply(&Action::React {
        client: 3,
        pick: 2,
        emoji: 1,
        on: true,
        http: true,
    });
    assert_eq!(outcome(&sim), Outcome::Refused("message_deleted".into()));
    // Client 2 leaves holding message 2; user 1 reacts to it, and enough
    // follows (confirmed by the origin) that the window moves past the
    // reaction.
    sim.apply(&Action::Disconnect(2));
    sim.apply(&Action::React {
        client: 0,
        pick: 1,
        emoji: 2,
        on: true,
        http: false,
    });
    assert_eq!(outcome(&sim), Outcome::Stored(7));
    assert_eq!(sim.world.truth[&2].state.count("🔥"), 1);
    for round in 0..8 {
        sim.apply(&Action::Send([0, 3][round % 2]));
        sim.apply(&Action::Advance(600));
        sim.apply(&Action::FlushStart);
        sim.apply(&Action::FlushOk(0));
    }
    assert!(sim.room.window_start() > 7);
    // Its resume point is older than the window: resync. REST's messages
    // after it do not include message 2, and the reaction is no message:
    // only re-reading what it held shows the reaction.
    let before = sim.refreshed;
    sim.apply(&Action::Connect(2));
    assert!(sim.refreshed > before, "a held message changed in the gap");
    assert_eq!(
        sim.world.clients[2].views[&2].reactions.get("🔥"),
        Some(&BTreeSet::from([1])),
    );
    // A new instance; message 3 is beyond its window, so storage answers
    // for it.
    sim.apply(&Action::Restart {
        survivors: 0,
        answer_lost: false,
    });
    assert!(sim.room.window_start() > 3);
    for i in 0..sim.world.clients.len() {
        sim.apply(&Action::Connect(i));
    }
    sim.apply(&Action::Advance(5_000));
    sim.apply(&Action::React {
        client: 2,
        pick: sim.world.truth.len() - 3,
        emoji: 0,
        on: true,
        http: false,
    });
    assert!(
        matches!(outcome(&sim), Outcome::Stored(_)),
        "{:?}",
        outcome(&sim)
    );
    assert_eq!(sim.world.truth[&3].state.count("👍"), 1);
    // Client 2's reaction to message 1 (its sent entry 2), resent: the new
    // instance never saw its key, and message 1 is deleted since, yet the
    // answer is the original ack.
    let entry = sim.world.clients[2].sent[2].clone();
    assert_eq!(entry.acked.map(|(seq, _)| seq), Some(5));
    sim.apply(&Action::Resend(2, 2));
    let ack = sim.world.clients[2].inbox.iter().find_map(|f| match f {
        ServerFrame::Ack { seq, id, .. } => Some((*seq, *id)),
        _ => None,
    });
    assert_eq!(ack, entry.acked, "the original ack");
    // Past the edit window, the sender's own edit is refused.
    sim.apply(&Action::Advance(EDIT_WINDOW_MS as u64 + 1));
    sim.apply(&Action::Edit {
        client: 3,
        pick: 0,
        own: true,
        how: 2,
        http: true,
    });
    assert_eq!(outcome(&sim), Outcome::Refused("edit_window_passed".into()));
    settle(&mut sim);
    check_end(&sim);
    assert_eq!(sim.changes["forbidden"], 2);
}
