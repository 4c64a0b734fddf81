//! A simulator for the sans-IO room: many clients, a virtual clock, and
//! random interleavings of sends, resends, typing, reads, disconnects,
//! reconnects, garbage, **several origin flushes in flight at once whose
//! answers arrive in any order**, succeed, fail or are lost after the origin
//! stored the batch, durable writes that fail, and **restarts** of the room
//! at any point (a wake from hibernation, an eviction, a kill -9).
//!
//! The world around the room is modelled the way the Durable Object has it:
//! a durable log (its SQLite: messages, every idempotency key ever stored,
//! watermarks with a synced flag, flushed rows pruned beyond a retention),
//! PostgreSQL (seq → id, watermarks), and clients that keep what they
//! received. The room is driven through the same [`drain`] the Durable
//! Object uses and rebuilt with the same [`Room::load`].
//!
//! Checked after **every** step: the durable log is contiguous and matches
//! the room's last seq and outbox count; PostgreSQL holds only what the log
//! holds, each seq once with one id; every ack and every delivered message
//! is durable; no client gets a seq twice or with a gap; a resend returns the
//! original. At the end, after the origin is reachable again and every
//! client resumes: PostgreSQL has every stored message exactly once and
//! every watermark, and every client has every message.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use shared::auth::AuthError;
use shared::protocol::ServerFrame;
use shared::protocol::internal::ConversationNotice;
use shared::receipts::Watermark;
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

#[derive(Debug, Clone)]
enum Action {
    Connect(usize),
    Disconnect(usize),
    Send(usize),
    Resend(usize, usize),
    Typing(usize),
    Read(usize),
    Garbage(usize),
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
    /// for a new message is its store after its key's claim.
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
    prop_oneof![
        2 => client.clone().prop_map(Action::Connect),
        1 => client.clone().prop_map(Action::Disconnect),
        6 => client.clone().prop_map(Action::Send),
        2 => (client.clone(), 0..8usize).prop_map(|(c, k)| Action::Resend(c, k)),
        2 => client.clone().prop_map(Action::Typing),
        2 => client.clone().prop_map(Action::Read),
        1 => client.clone().prop_map(Action::Garbage),
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

/// client_msg_id, content, and the (seq, id) of its first ack.
type SentMessage = (String, String, Option<(i64, Uuid)>);

#[derive(Debug, Default)]
struct Client {
    user: i64,
    conn: Option<ConnId>,
    /// Every seq this client has, from the room or from REST.
    have: BTreeSet<i64>,
    sent: Vec<SentMessage>,
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
    /// Every message ever stored: seq → id (for checks; pruning spares it).
    ever_stored: BTreeMap<i64, Uuid>,
    watermarks: BTreeMap<i64, StoredWatermark>,
    /// What the origin held when the room was created.
    base_seq: i64,
    /// PostgreSQL: seq → id.
    origin: BTreeMap<i64, Uuid>,
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

    fn deliver(&mut self, i: usize, frame: &ServerFrame) {
        match frame {
            ServerFrame::MessageEdited { .. }
            | ServerFrame::MessageDeleted { .. }
            | ServerFrame::Reaction { .. } => {}
            ServerFrame::Message { message } => {
                let stored = self.ever_stored.get(&message.seq);
                assert_eq!(stored, Some(&message.id), "delivered only once stored");
                let client = &mut self.clients[i];
                assert!(
                    client.have.insert(message.seq),
                    "seq {} delivered twice to client {i}",
                    message.seq
                );
                let expected_next = client.have.len() as i64;
                assert_eq!(
                    client.have.last().copied(),
                    Some(expected_next),
                    "client {i} has a gap"
                );
            }
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
                let entry = client
                    .sent
                    .iter_mut()
                    .find(|(k, _, _)| k == client_msg_id)
                    .expect("ack for a key this client sent");
                match entry.2 {
                    None => entry.2 = Some((*seq, *id)),
                    Some(first) => assert_eq!(first, (*seq, *id), "a resend returns the original"),
                }
            }
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
            ServerFrame::Error { .. }
            | ServerFrame::Receipt { .. }
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
        // The key was claimed for exactly this message just before.
        let key = (r.sender_id, r.client_msg_id.clone());
        let claimed = self.keys.borrow().get(&key).copied();
        assert_eq!(
            claimed.map(|k| (k.seq, k.id)),
            Some((r.seq, r.id)),
            "a message is stored under the key claimed for it"
        );
        self.typing_log
            .entry(r.sender_id)
            .or_default()
            .push((TypingEvent::Message, self.now));
        self.ever_stored.insert(r.seq, r.id);
        self.durable.insert(r.seq, r.clone());
        Ok(())
    }

    fn store_change(
        &mut self,
        r: &Record,
        _state: &shared::room::lifecycle::MessageState,
    ) -> Result<(), &'static str> {
        self.write()?;
        assert_eq!(r.seq, self.last_durable_seq() + 1);
        self.ever_stored.insert(r.seq, r.id);
        self.durable.insert(r.seq, r.clone());
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
        if let ServerFrame::Message { message } = frame {
            let stored = self.ever_stored.get(&message.seq);
            assert_eq!(stored, Some(&message.id), "forwarded only once stored");
            let last = self.forwarded.last().copied().unwrap_or(0);
            assert!(
                message.seq > last,
                "forwarded seq {} after {last}: out of order or twice",
                message.seq
            );
            self.forwarded.push(message.seq);
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

    fn verify_token(&self, _: &str, _: Millis) -> Result<Verified, AuthError> {
        Err(AuthError::Invalid)
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
        // The Durable Object keeps subscriptions in its SQLite.
        self.room.restore_subscriber(SUBSCRIBER);
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
                let key = format!("k{}", self.next_key);
                self.next_key += 1;
                let content = format!("hello {key}");
                self.world.clients[i]
                    .sent
                    .push((key.clone(), content.clone(), None));
                self.text(
                    i,
                    &serde_json::json!({
                        "type": "message", "conversation_id": CONVERSATION,
                        "content": content, "client_msg_id": key,
                    }),
                );
            }
            Action::Resend(i, k) => {
                let Some((key, content, acked)) = self.world.clients[i].sent.get(k).cloned() else {
                    return;
                };
                if self.world.clients[i].conn.is_none() {
                    return;
                }
                let before = self.world.keys.borrow().len();
                self.text(
                    i,
                    &serde_json::json!({
                        "type": "message", "conversation_id": CONVERSATION,
                        "content": content, "client_msg_id": key,
                    }),
                );
                self.drain();
                if acked.is_some() {
                    assert_eq!(
                        self.world.keys.borrow().len(),
                        before,
                        "a resend stores nothing"
                    );
                }
                return;
            }
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

    /// The origin's ingest: idempotent, one id per seq.
    fn origin_store(&mut self, batch: &FlushBatch) -> Vec<Uuid> {
        let mut stored = Vec::new();
        for m in &batch.messages {
            let id = *self.world.origin.entry(m.seq).or_insert(m.id);
            assert_eq!(id, m.id, "seq {} arrived with two different ids", m.seq);
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
        complete
    }

    /// A client told to `resync` loads the gap from REST and reconnects.
    fn resync(&mut self, i: usize, from_seq: i64) {
        let start = self.room.window_start();
        let client = &mut self.world.clients[i];
        for s in from_seq..start {
            assert!(
                self.world.origin.contains_key(&s),
                "resync points at REST, which lacks {s}"
            );
            client.have.insert(s);
        }
        if let Some(conn) = client.conn.take() {
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
}

fn config(small_window: bool) -> RoomConfig {
    RoomConfig {
        replay_window: if small_window { 4 } else { 1_000 },
        rate_burst: 6,
        rate_per_sec: 2,
        flood_strikes: 4,
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
            "every message forwarded"
        );
    }
    if n > 0 {
        assert!(!w.forwarded.is_empty(), "the subscriber got live messages");
    }
    assert_eq!(
        w.origin.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>(),
        "PostgreSQL holds every stored message, each seq once"
    );
    for (seq, r) in &w.durable {
        assert_eq!(
            w.origin.get(seq),
            Some(&r.id),
            "PostgreSQL has the room's id"
        );
    }
    for (i, c) in w.clients.iter().enumerate() {
        assert_eq!(
            c.have.iter().copied().collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "client {i} has every message after resuming"
        );
        for (key, _, acked) in &c.sent {
            if let Some((seq, id)) = acked {
                let k = *w
                    .keys
                    .borrow()
                    .get(&(c.user, key.clone()))
                    .expect("acked keys are stored");
                assert_eq!((k.seq, k.id), (*seq, *id), "an ack names what is stored");
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
    let acked_before = sim.world.clients[0]
        .sent
        .iter()
        .filter(|s| s.2.is_some())
        .count();
    sim.apply(&Action::FailWrite(0));
    sim.apply(&Action::Send(0));
    let acked_after = sim.world.clients[0]
        .sent
        .iter()
        .filter(|s| s.2.is_some())
        .count();
    assert_eq!(
        acked_before, acked_after,
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
    let (_, _, acked) = sim.world.clients[0].sent[lost].clone();
    assert_eq!(
        acked.map(|(seq, _)| seq),
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
