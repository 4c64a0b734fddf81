//! A simulator for the sans-IO room: many clients, a virtual clock, and
//! random interleavings of sends, resends, typing, reads, disconnects,
//! reconnects, garbage, and origin flushes that succeed or fail.
//!
//! Every output is executed the way the Durable Object executes it, and the
//! invariants the product promises are checked after every step and at the
//! end.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use shared::protocol::ServerFrame;
use shared::receipts::Watermark;
use shared::room::{
    ConnId, FlushBatch, FlushOutcome, Millis, Output, Record, Room, RoomConfig, Target,
};
use uuid::Uuid;

const CONVERSATION: i64 = 7;
/// Users 1, 2, 3; user 1 has two clients (two tabs).
const CLIENT_USERS: [i64; 4] = [1, 1, 2, 3];

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
    FlushStart,
    FlushOk,
    FlushFail,
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
        2 => Just(Action::FlushStart),
        2 => Just(Action::FlushOk),
        1 => Just(Action::FlushFail),
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
    /// Times typing frames about each user reached this client.
    typing_seen: Vec<(i64, Millis)>,
}

struct Sim {
    room: Room,
    now: Millis,
    clients: Vec<Client>,
    /// The room's durable log (what the DO's SQLite holds).
    durable: BTreeMap<i64, Record>,
    /// PostgreSQL: seq → id.
    origin: BTreeMap<i64, Uuid>,
    /// PostgreSQL's watermarks: user → (delivered, read).
    origin_receipts: BTreeMap<i64, (i64, i64)>,
    in_flight: Option<FlushBatch>,
    next_conn: u64,
    next_key: u64,
    /// Per user, in order: typing relays (true) and messages (false), with
    /// their times.
    typing_log: HashMap<i64, Vec<(bool, Millis)>>,
    /// Clients told to `resync`, to reconnect once the outputs are drained.
    pending_reconnects: Vec<usize>,
}

impl Sim {
    fn new(config: RoomConfig) -> Self {
        let mut room = Room::new(CONVERSATION, config, 42);
        let members: Vec<Watermark> = [1, 2, 3]
            .iter()
            .map(|&user_id| Watermark {
                user_id,
                delivered_seq: 0,
                read_seq: 0,
            })
            .collect();
        room.set_members(0, &members, 0);
        Self {
            room,
            now: 1_700_000_000_000,
            clients: CLIENT_USERS
                .iter()
                .map(|&user| Client {
                    user,
                    ..Client::default()
                })
                .collect(),
            durable: BTreeMap::new(),
            origin: BTreeMap::new(),
            origin_receipts: BTreeMap::new(),
            in_flight: None,
            next_conn: 1,
            next_key: 1,
            typing_log: HashMap::new(),
            pending_reconnects: Vec::new(),
        }
    }

    fn client_of(&self, conn: ConnId) -> Option<usize> {
        self.clients.iter().position(|c| c.conn == Some(conn))
    }

    fn connect(&mut self, i: usize) {
        if self.clients[i].conn.is_some() {
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let since = self.clients[i].have.last().copied().unwrap_or(0);
        self.clients[i].conn = Some(conn);
        self.room
            .handle_connect(self.now, conn, self.clients[i].user, Some(since))
            .expect("members may connect");
        self.drain();
    }

    fn apply(&mut self, action: &Action) {
        match *action {
            Action::Connect(i) => self.connect(i),
            Action::Disconnect(i) => {
                if let Some(conn) = self.clients[i].conn.take() {
                    self.room.handle_disconnect(self.now, conn);
                }
            }
            Action::Send(i) => {
                let Some(conn) = self.clients[i].conn else {
                    return;
                };
                let key = format!("k{}", self.next_key);
                self.next_key += 1;
                let content = format!("hello {key}");
                self.clients[i]
                    .sent
                    .push((key.clone(), content.clone(), None));
                let frame = serde_json::json!({
                    "type": "message", "conversation_id": CONVERSATION,
                    "content": content, "client_msg_id": key,
                });
                self.room.handle_text(self.now, conn, &frame.to_string());
            }
            Action::Resend(i, k) => {
                let Some(conn) = self.clients[i].conn else {
                    return;
                };
                let Some((key, content, _)) = self.clients[i].sent.get(k).cloned() else {
                    return;
                };
                let before = self.durable.len();
                let frame = serde_json::json!({
                    "type": "message", "conversation_id": CONVERSATION,
                    "content": content, "client_msg_id": key,
                });
                self.room.handle_text(self.now, conn, &frame.to_string());
                let acked = self.clients[i].sent[k].2.is_some();
                self.drain();
                if acked {
                    assert_eq!(self.durable.len(), before, "a resend stores nothing");
                }
                return;
            }
            Action::Typing(i) => {
                let Some(conn) = self.clients[i].conn else {
                    return;
                };
                let frame = serde_json::json!({"type": "typing", "conversation_id": CONVERSATION});
                self.room.handle_text(self.now, conn, &frame.to_string());
            }
            Action::Read(i) => {
                let Some(conn) = self.clients[i].conn else {
                    return;
                };
                let seq = self.clients[i].have.last().copied().unwrap_or(0);
                let frame = serde_json::json!({"type": "read", "conversation_id": CONVERSATION, "seq": seq});
                self.room.handle_text(self.now, conn, &frame.to_string());
            }
            Action::Garbage(i) => {
                let Some(conn) = self.clients[i].conn else {
                    return;
                };
                self.room.handle_text(self.now, conn, "{not json");
                self.drain();
                assert!(
                    self.clients[i].conn.is_some(),
                    "a malformed frame does not cost the connection"
                );
                assert_eq!(self.room.user_of(conn), Some(self.clients[i].user));
                return;
            }
            Action::Advance(ms) => {
                self.now += ms;
                self.room.handle_timeout(self.now);
            }
            Action::FlushStart => {
                if self.in_flight.is_none() {
                    self.in_flight = self.room.poll_flush(self.now);
                }
            }
            Action::FlushOk => self.flush_ok(),
            Action::FlushFail => {
                if self.in_flight.take().is_some() {
                    self.room.handle_flush_failure(self.now);
                }
            }
        }
        self.drain();
    }

    fn flush_ok(&mut self) {
        let Some(batch) = self.in_flight.take() else {
            return;
        };
        let mut stored = Vec::new();
        for m in &batch.messages {
            // The origin's unique (conversation_id, seq): one id per seq.
            let id = *self.origin.entry(m.seq).or_insert(m.id);
            assert_eq!(id, m.id, "seq {} arrived with two different ids", m.seq);
            stored.push(m.id);
        }
        for r in &batch.receipts {
            let e = self.origin_receipts.entry(r.user_id).or_insert((0, 0));
            e.0 = e.0.max(r.delivered_seq);
            e.1 = e.1.max(r.read_seq);
        }
        self.room.handle_flush_result(
            self.now,
            &FlushOutcome {
                stored,
                rejected: Vec::new(),
                receipts_ok: true,
            },
        );
    }

    /// Executes outputs the way the Durable Object does.
    fn drain(&mut self) {
        while let Some(out) = self.room.poll_output() {
            match out {
                Output::Store(r) => {
                    assert_eq!(
                        r.seq,
                        self.durable.len() as i64 + 1,
                        "seq is contiguous in the durable log"
                    );
                    self.typing_log
                        .entry(r.sender_id)
                        .or_default()
                        .push((false, self.now));
                    self.durable.insert(r.seq, r);
                }
                Output::MarkFlushed(seqs) => {
                    for s in seqs {
                        let r = self.durable.get_mut(&s).expect("flushed a stored message");
                        assert!(self.origin.contains_key(&s));
                        r.flushed = true;
                    }
                }
                Output::StoreWatermark(_) => {}
                Output::Notify(notice) => {
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
                Output::Close { conn, .. } => {
                    if let Some(i) = self.client_of(conn) {
                        self.clients[i].conn = None;
                    }
                }
                Output::Send { to, frame } => {
                    let targets: Vec<usize> = (0..self.clients.len())
                        .filter(|&i| {
                            let c = &self.clients[i];
                            match (to, c.conn) {
                                (_, None) => false,
                                (Target::Conn(t), Some(conn)) => t == conn,
                                (Target::All, Some(_)) => true,
                                (Target::OthersOf(u), Some(_)) => c.user != u,
                            }
                        })
                        .collect();
                    // A relay goes to the others; a Conn-targeted typing
                    // frame is the current state for a new connection.
                    if let (ServerFrame::Typing { user_id, .. }, Target::OthersOf(_)) = (&frame, to)
                    {
                        let user_id = *user_id;
                        self.typing_log
                            .entry(user_id)
                            .or_default()
                            .push((true, self.now));
                    }
                    for i in targets {
                        self.deliver(i, &frame);
                    }
                }
            }
        }
        while let Some(i) = self.pending_reconnects.pop() {
            self.connect(i);
        }
    }

    fn deliver(&mut self, i: usize, frame: &ServerFrame) {
        let now = self.now;
        match frame {
            ServerFrame::Message { message } => {
                let stored = self
                    .durable
                    .get(&message.seq)
                    .expect("delivered only once stored");
                assert_eq!(stored.id, message.id);
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
                assert!(self.durable.contains_key(seq), "acked only once stored");
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
                self.clients[i].typing_seen.push((*user_id, now));
            }
            ServerFrame::Resync { from_seq, .. } => {
                // Everything the room cannot replay must be in PostgreSQL.
                let start = self.room.window_start();
                for s in *from_seq..start {
                    assert!(
                        self.origin.contains_key(&s),
                        "resync points at REST, which lacks {s}"
                    );
                }
                let client = &mut self.clients[i];
                for s in *from_seq..start {
                    client.have.insert(s);
                }
                // Reconnect from the REST high-water mark.
                if let Some(conn) = client.conn.take() {
                    self.room.handle_disconnect(now, conn);
                }
                self.pending_reconnects.push(i);
            }
            ServerFrame::Error { .. }
            | ServerFrame::Receipt { .. }
            | ServerFrame::Pong
            | ServerFrame::Presence { .. }
            | ServerFrame::PresenceSnapshot { .. }
            | ServerFrame::ConversationUpdated { .. } => {}
        }
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
            sim.origin_receipts
                .get(&w.user_id)
                .copied()
                .unwrap_or((0, 0))
                == (w.delivered_seq, w.read_seq)
        });
        if sim.room.unflushed() == 0 && sim.in_flight.is_none() && receipts_synced {
            break;
        }
        sim.apply(&Action::Advance(15_000));
        sim.apply(&Action::FlushStart);
        sim.apply(&Action::FlushOk);
    }
    assert_eq!(sim.room.unflushed(), 0, "the outbox drains");
    for w in sim.room.members() {
        assert_eq!(
            sim.origin_receipts
                .get(&w.user_id)
                .copied()
                .unwrap_or((0, 0)),
            (w.delivered_seq, w.read_seq),
            "the origin has user {}'s watermarks",
            w.user_id
        );
    }
    for i in 0..sim.clients.len() {
        sim.apply(&Action::Disconnect(i));
        sim.apply(&Action::Connect(i));
    }
}

fn check_invariants(sim: &Sim) {
    let n = sim.durable.len() as i64;
    let seqs: Vec<i64> = sim.durable.keys().copied().collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "seq runs 1..N with no gaps"
    );
    assert_eq!(sim.room.last_seq(), n);
    let durable_ids: BTreeMap<i64, Uuid> = sim.durable.iter().map(|(s, r)| (*s, r.id)).collect();
    assert_eq!(
        durable_ids, sim.origin,
        "PostgreSQL holds every message exactly once"
    );
    for (i, c) in sim.clients.iter().enumerate() {
        assert_eq!(
            c.have.iter().copied().collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "client {i} has every message after resuming"
        );
    }
    for (user, log) in &sim.typing_log {
        let mut last_relay: Option<Millis> = None;
        for &(is_relay, t) in log {
            if is_relay {
                if let Some(prev) = last_relay {
                    assert!(
                        t >= prev + 2_000,
                        "user {user}: two typing relays within 2 s"
                    );
                }
                last_relay = Some(t);
            } else {
                // A message clears the throttle.
                last_relay = None;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_order_idempotency_and_exactly_once_delivery(
        actions in proptest::collection::vec(action(), 1..250),
        small_window in any::<bool>(),
    ) {
        let mut sim = Sim::new(config(small_window));
        for a in &actions {
            sim.apply(a);
        }
        settle(&mut sim);
        check_invariants(&sim);
    }
}

#[test]
fn a_long_outage_then_recovery_loses_nothing() {
    let mut sim = Sim::new(config(true));
    for i in 0..sim.clients.len() {
        sim.apply(&Action::Connect(i));
    }
    for round in 0..60 {
        sim.apply(&Action::Send(round % 4));
        sim.apply(&Action::Advance(700));
        sim.apply(&Action::FlushStart);
        sim.apply(&Action::FlushFail);
        if round % 7 == 0 {
            sim.apply(&Action::Disconnect(2));
        }
        if round % 7 == 3 {
            sim.apply(&Action::Connect(2));
        }
    }
    assert!(sim.origin.is_empty());
    assert!(sim.room.unflushed() > 0);
    settle(&mut sim);
    check_invariants(&sim);
}
