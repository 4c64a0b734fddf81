//! The per-user layer's state machine: one [`User`] per user id, driven by
//! the `User` Durable Object that replaced the tenant-wide Lobby (see
//! `docs/ARCHITECTURE.md`, "The per-user layer"). Sans-IO, like
//! [`crate::room`]: inputs are `handle_*` calls, effects are
//! [`UserOutput`]s the driver executes in order after every call.
//!
//! It holds one user's live connections on every tab and device, their
//! presence (online from the first connection, offline once the last one
//! has been gone for a grace period, so a reload does not flap), what they
//! know of their **contacts'** presence (people they share a conversation
//! with), their unread count per conversation, and relays what rooms send
//! them to their own connections.
//!
//! Nothing here grows with the deployment. A presence change is announced
//! to the contacts this user knows to be online (the others read it from
//! the origin when they come online), and a contact who comes online is
//! answered once, so both views converge without a round trip through
//! everyone. A relayed frame goes to this user's connections only.
//!
//! Privacy: presence is accepted only from contacts. A notice about anyone
//! else is dropped, so nobody learns the live presence of a person they
//! share no conversation with (REST answers that on request, as before).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use chrono::{DateTime, Utc};

use crate::conn::{ConnId, Millis};
use crate::protocol::internal::PresenceUpdate;
use crate::protocol::{MessagePreview, ServerFrame};

/// Tunables.
#[derive(Debug, Clone)]
pub struct UserConfig {
    /// How long a user with no connection stays online.
    pub grace_ms: u64,
}

impl Default for UserConfig {
    fn default() -> Self {
        Self { grace_ms: 10_000 }
    }
}

/// Which of the user's connections a frame goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserTarget {
    Conn(ConnId),
    /// Every live connection of the user (all tabs and devices).
    All,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
// Outputs live for one drain; boxing the frame would cost an allocation
// per frame to save stack space nobody runs short of.
#[allow(clippy::large_enum_variant)]
pub enum UserOutput {
    Send {
        to: UserTarget,
        frame: ServerFrame,
    },
    /// This user's presence, for the `User` objects of `to` (contacts known
    /// to be online) and, when `report` is set, for the origin's presence
    /// table (a change; a reply to one contact is not reported again).
    Announce {
        update: PresenceUpdate,
        to: Vec<i64>,
        report: bool,
    },
}

/// A contact as the origin or the contact's own object reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact {
    pub user_id: i64,
    pub is_online: bool,
    /// When they were last seen (for an offline contact).
    pub last_seen: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    online: bool,
    last_seen: Option<DateTime<Utc>>,
}

/// One user's connections, presence, contacts and unread counts. See the
/// module docs.
#[derive(Debug)]
pub struct User {
    user_id: i64,
    config: UserConfig,
    conns: BTreeSet<ConnId>,
    online: bool,
    /// Set while online with no connection: when the grace period ends.
    offline_at: Option<Millis>,
    /// When the last connection closed (the `last_seen` to announce).
    last_seen: Millis,
    contacts: BTreeMap<i64, Seen>,
    /// Whether the contact list has been given once. Until then a new
    /// connection's snapshot waits: it is sent to every connection when
    /// the list arrives, so nobody starts from an empty view.
    contacts_known: bool,
    /// conversation id → (its last seq, this user's unread count there).
    unread: BTreeMap<i64, (i64, i64)>,
    /// The last message seq each connection got, per conversation: a
    /// replay and the live stream may overlap, and a connection sees each
    /// message once, in order.
    relayed: BTreeMap<(ConnId, i64), i64>,
    /// Conversations whose subscription (with its replay) is in flight:
    /// live frames wait here until the replay has gone out, so they never
    /// overtake it.
    holding: BTreeMap<i64, Held>,
    outputs: VecDeque<UserOutput>,
}

#[derive(Debug, Default)]
struct Held {
    /// Subscriptions in flight for the conversation.
    pending: u32,
    frames: Vec<ServerFrame>,
}

/// The conversation a room's frame is about.
fn conversation_of(frame: &ServerFrame) -> Option<i64> {
    match frame {
        ServerFrame::Message { message } => Some(message.conversation_id),
        ServerFrame::MessageEdited {
            conversation_id, ..
        }
        | ServerFrame::MessageDeleted {
            conversation_id, ..
        }
        | ServerFrame::Reaction {
            conversation_id, ..
        } => Some(*conversation_id),
        ServerFrame::AttachmentUpdated { attachment } => Some(attachment.meta.conversation_id),
        ServerFrame::Typing {
            conversation_id, ..
        }
        | ServerFrame::Receipt {
            conversation_id, ..
        }
        | ServerFrame::Resync {
            conversation_id, ..
        }
        | ServerFrame::Ack {
            conversation_id, ..
        }
        | ServerFrame::ConversationUpdated {
            conversation_id, ..
        } => Some(*conversation_id),
        _ => None,
    }
}

fn at(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).unwrap_or_default()
}

impl User {
    pub fn new(user_id: i64, config: UserConfig) -> Self {
        Self {
            user_id,
            config,
            conns: BTreeSet::new(),
            online: false,
            offline_at: None,
            last_seen: 0,
            contacts: BTreeMap::new(),
            contacts_known: false,
            unread: BTreeMap::new(),
            relayed: BTreeMap::new(),
            holding: BTreeMap::new(),
            outputs: VecDeque::new(),
        }
    }

    pub fn user_id(&self) -> i64 {
        self.user_id
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Online right now (the grace period included).
    pub fn is_online(&self) -> bool {
        self.online
    }

    /// Contacts this user knows to be online, ascending.
    pub fn online_contacts(&self) -> Vec<i64> {
        self.contacts
            .iter()
            .filter(|(_, s)| s.online)
            .map(|(u, _)| *u)
            .collect()
    }

    /// This user's unread count in a conversation, as the room last said.
    pub fn unread(&self, conversation_id: i64) -> Option<i64> {
        self.unread.get(&conversation_id).map(|(_, n)| *n)
    }

    pub fn poll_output(&mut self) -> Option<UserOutput> {
        self.outputs.pop_front()
    }

    /// The next grace deadline, if one is running.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.offline_at
    }

    /// Replaces the contact list (from the origin: when the user comes
    /// online, and when a conversation gains or loses a member). A contact
    /// whose state changed shows on this user's connections; a contact who
    /// is gone is shown offline and no longer listened to.
    ///
    /// While this user is online, every **new** contact, and every contact
    /// the origin now shows online, hears of them at once: the origin's copy
    /// of a contact's presence can trail their object by one report, so two
    /// users who come online together would otherwise each wait for the
    /// other. The answer from a contact who is online closes the loop (see
    /// [`User::handle_contact_presence`]).
    pub fn set_contacts(&mut self, now: Millis, contacts: &[Contact]) {
        let old = std::mem::take(&mut self.contacts);
        let first = !std::mem::replace(&mut self.contacts_known, true);
        let me = self.user_id;
        let mut tell = Vec::new();
        for c in contacts.iter().filter(|c| c.user_id != me) {
            let seen = Seen {
                online: c.is_online,
                last_seen: c.last_seen,
            };
            let before = old.get(&c.user_id).copied();
            self.contacts.insert(c.user_id, seen);
            if !first && before.map(|b| b.online) != Some(seen.online) {
                self.show(c.user_id, seen);
            }
            let came_online = seen.online && before.is_some_and(|b| !b.online);
            if self.online && (before.is_none() || came_online) {
                tell.push(c.user_id);
            }
        }
        for (user, seen) in old {
            if seen.online && !self.contacts.contains_key(&user) {
                self.show(
                    user,
                    Seen {
                        online: false,
                        last_seen: None,
                    },
                );
            }
        }
        if first {
            let online = self.online_contacts();
            self.send_all(ServerFrame::PresenceSnapshot { online });
        }
        self.announce_to(now, tell, false);
    }

    /// The contact list as this object last saved it (a wake from
    /// hibernation, or a restart): known again, nothing shown or told, since
    /// nothing changed. The origin's list replaces it when the user comes
    /// online again or a new conversation appears.
    pub fn restore_contacts(&mut self, contacts: &[Contact]) {
        let me = self.user_id;
        self.contacts = contacts
            .iter()
            .filter(|c| c.user_id != me)
            .map(|c| {
                (
                    c.user_id,
                    Seen {
                        online: c.is_online,
                        last_seen: c.last_seen,
                    },
                )
            })
            .collect();
        self.contacts_known = true;
    }

    /// The contacts as this object knows them now (to save).
    pub fn contacts(&self) -> Vec<Contact> {
        self.contacts
            .iter()
            .map(|(user_id, s)| Contact {
                user_id: *user_id,
                is_online: s.online,
                last_seen: s.last_seen,
            })
            .collect()
    }

    /// A connection that survived a restart (hibernation): counted, not
    /// announced.
    pub fn handle_reattach(&mut self, conn: ConnId) {
        self.conns.insert(conn);
        self.online = true;
        self.offline_at = None;
    }

    /// After a restart with no connection left: if the origin still shows
    /// this user online, the grace period runs again (its timer was lost
    /// with the old instance) and ends in an announcement.
    pub fn handle_restore(&mut self, now: Millis, reported_online: bool) {
        if reported_online && self.conns.is_empty() {
            self.online = true;
            self.last_seen = now;
            self.offline_at = Some(now + self.config.grace_ms);
        }
    }

    /// A new connection: it gets the contacts' presence first, so its view
    /// starts complete; the user's contacts hear of them if they were
    /// offline (back within the grace period is a reload: nothing to say).
    /// Returns whether the user came online with it (the driver then
    /// refreshes the contacts' presence from the origin: what this object
    /// holds may be stale after a time offline).
    pub fn handle_connect(&mut self, now: Millis, conn: ConnId) -> bool {
        if !self.conns.insert(conn) {
            return false;
        }
        self.offline_at = None;
        if self.contacts_known {
            self.outputs.push_back(UserOutput::Send {
                to: UserTarget::Conn(conn),
                frame: ServerFrame::PresenceSnapshot {
                    online: self.online_contacts(),
                },
            });
        }
        if self.online {
            return false;
        }
        self.online = true;
        let to = self.online_contacts();
        self.announce_to(now, to, true);
        true
    }

    /// A connection closed; the last one starts the grace period.
    pub fn handle_disconnect(&mut self, now: Millis, conn: ConnId) {
        self.relayed.retain(|(c, _), _| *c != conn);
        if self.conns.remove(&conn) && self.conns.is_empty() {
            self.last_seen = now;
            self.offline_at = Some(now + self.config.grace_ms);
        }
    }

    /// Ends a grace period that is over.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.offline_at.is_some_and(|t| now >= t) && self.conns.is_empty() {
            self.offline_at = None;
            self.online = false;
            let to = self.online_contacts();
            let last_seen = self.last_seen;
            self.announce_to(last_seen, to, true);
        }
    }

    /// Another user's `User` object says how they are. Accepted only from a
    /// contact (returns whether it was); a change shows on every connection
    /// of this user, and a contact who just came online while this user is
    /// online is answered, so their view of this user is current too.
    pub fn handle_contact_presence(&mut self, now: Millis, update: &PresenceUpdate) -> bool {
        let Some(seen) = self.contacts.get_mut(&update.user_id) else {
            return false;
        };
        let was_online = seen.online;
        seen.online = update.is_online;
        seen.last_seen = Some(update.last_seen);
        let seen = *seen;
        if was_online != update.is_online {
            self.show(update.user_id, seen);
            if update.is_online && self.online {
                self.announce_to(now, vec![update.user_id], false);
            }
        }
        true
    }

    /// A room's notice for this user: every connection gets
    /// `conversation_updated` with the unread count (reading on one device
    /// clears the badge on the others).
    pub fn handle_notice(
        &mut self,
        conversation_id: i64,
        seq: i64,
        last_message: Option<MessagePreview>,
        unread_count: i64,
        unread_mentions: i64,
    ) {
        let entry = self.unread.entry(conversation_id).or_insert((seq, 0));
        if seq < entry.0 {
            // An older notice overtaken by a newer one: drop it.
            return;
        }
        *entry = (seq, unread_count);
        self.send_all(ServerFrame::ConversationUpdated {
            conversation_id,
            seq,
            last_message,
            unread_count,
            unread_mentions,
        });
    }

    /// A group of this user's changed (its name or members): every
    /// connection gets `conversation_changed`, and refetches it. With
    /// `removed`, the user is no longer a member: every connection gets
    /// `conversation_removed`, and the conversation's unread count goes
    /// (added back later, it is a new conversation here again). Its room
    /// forwards nothing more to this user: a room forwards to current
    /// members only (`shared::room`). What each connection got of it stays,
    /// so a replay after being added back never repeats a message.
    pub fn handle_conversation_change(&mut self, conversation_id: i64, removed: bool) {
        if removed {
            self.unread.remove(&conversation_id);
            self.send_all(ServerFrame::ConversationRemoved { conversation_id });
        } else {
            self.send_all(ServerFrame::ConversationChanged { conversation_id });
        }
    }

    /// A live frame a room sends this user (a message, typing, a receipt):
    /// to every connection, each message once per connection and in order;
    /// held while a subscription to its room is in flight.
    pub fn relay(&mut self, frame: ServerFrame) {
        if let Some(held) = conversation_of(&frame).and_then(|c| self.holding.get_mut(&c)) {
            held.frames.push(frame);
            return;
        }
        self.deliver(UserTarget::All, frame);
    }

    /// A subscription to `conversation_id`'s room (with a replay) is on its
    /// way: its live frames wait for [`User::finish_subscribe`].
    pub fn begin_subscribe(&mut self, conversation_id: i64) {
        self.holding.entry(conversation_id).or_default().pending += 1;
    }

    /// The room answered a subscription: its `replay` goes to `to` (the
    /// connection that asked, or everyone), then, once no other
    /// subscription to that room is in flight, the live frames that waited,
    /// without what the replay already gave. A failed subscription passes
    /// an empty replay.
    pub fn finish_subscribe(
        &mut self,
        conversation_id: i64,
        to: UserTarget,
        replay: Vec<ServerFrame>,
    ) {
        for frame in replay {
            self.deliver(to, frame);
        }
        let Some(held) = self.holding.get_mut(&conversation_id) else {
            return;
        };
        held.pending = held.pending.saturating_sub(1);
        if held.pending > 0 {
            return;
        }
        let frames = self
            .holding
            .remove(&conversation_id)
            .map(|h| h.frames)
            .unwrap_or_default();
        for frame in frames {
            self.deliver(UserTarget::All, frame);
        }
    }

    /// Sends `frame` to `to`; a sequenced frame (a message or a change to
    /// one) only to the connections that do not have it yet (its seq is
    /// above the last they got).
    fn deliver(&mut self, to: UserTarget, frame: ServerFrame) {
        let Some((conversation, seq)) = frame.sequenced() else {
            if !self.conns.is_empty() {
                self.outputs.push_back(UserOutput::Send { to, frame });
            }
            return;
        };
        let targets: Vec<ConnId> = match to {
            UserTarget::Conn(c) => self.conns.get(&c).copied().into_iter().collect(),
            UserTarget::All => self.conns.iter().copied().collect(),
        };
        let mut fresh = Vec::with_capacity(targets.len());
        for conn in &targets {
            let last = self.relayed.entry((*conn, conversation)).or_insert(0);
            if seq > *last {
                *last = seq;
                fresh.push(*conn);
            }
        }
        if fresh.is_empty() {
            return;
        }
        if fresh.len() == self.conns.len() && matches!(to, UserTarget::All) {
            self.outputs.push_back(UserOutput::Send { to, frame });
            return;
        }
        for conn in fresh {
            self.outputs.push_back(UserOutput::Send {
                to: UserTarget::Conn(conn),
                frame: frame.clone(),
            });
        }
    }

    fn send_all(&mut self, frame: ServerFrame) {
        if !self.conns.is_empty() {
            self.outputs.push_back(UserOutput::Send {
                to: UserTarget::All,
                frame,
            });
        }
    }

    fn show(&mut self, user_id: i64, seen: Seen) {
        self.send_all(ServerFrame::Presence {
            user_id,
            is_online: seen.online,
            last_seen: seen.last_seen,
        });
    }

    fn announce_to(&mut self, when: Millis, to: Vec<i64>, report: bool) {
        if to.is_empty() && !report {
            return;
        }
        self.outputs.push_back(UserOutput::Announce {
            update: PresenceUpdate {
                user_id: self.user_id,
                is_online: self.online,
                last_seen: at(when),
            },
            to,
            report,
        });
    }
}

/// Conversations one resume may name (a `resume` frame, or an SSE
/// stream's `?resume=`).
pub const MAX_RESUME: usize = 200;

/// An SSE client's resume point, `?resume=7:42,9:0` (conversation id:seq,
/// the highest seq it holds): the same as a `resume` frame's `since`.
pub fn parse_resume(query: &str) -> Result<BTreeMap<i64, i64>, &'static str> {
    let mut since = BTreeMap::new();
    for pair in query.split(',').filter(|p| !p.is_empty()) {
        let (conv, seq) = pair
            .split_once(':')
            .ok_or("resume is conversation:seq pairs separated by commas")?;
        let conv: i64 = conv
            .parse()
            .map_err(|_| "a conversation id in resume is not a number")?;
        let seq: i64 = seq
            .parse()
            .ok()
            .filter(|s| *s >= 0)
            .ok_or("a seq in resume is not a whole number")?;
        since.insert(conv, seq);
    }
    if since.len() > MAX_RESUME {
        return Err("resume names more than 200 conversations");
    }
    Ok(since)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_800_000_000_000;
    const ME: i64 = 1;

    fn drain(u: &mut User) -> Vec<UserOutput> {
        std::iter::from_fn(|| u.poll_output()).collect()
    }

    fn contact(user_id: i64, is_online: bool) -> Contact {
        Contact {
            user_id,
            is_online,
            last_seen: None,
        }
    }

    fn update(user_id: i64, is_online: bool, ms: Millis) -> PresenceUpdate {
        PresenceUpdate {
            user_id,
            is_online,
            last_seen: at(ms),
        }
    }

    fn announcements(outs: &[UserOutput]) -> Vec<(bool, Vec<i64>, bool)> {
        outs.iter()
            .filter_map(|o| match o {
                UserOutput::Announce { update, to, report } => {
                    Some((update.is_online, to.clone(), *report))
                }
                UserOutput::Send { .. } => None,
            })
            .collect()
    }

    fn presence_frames(outs: &[UserOutput]) -> Vec<(i64, bool)> {
        outs.iter()
            .filter_map(|o| match o {
                UserOutput::Send {
                    to: UserTarget::All,
                    frame:
                        ServerFrame::Presence {
                            user_id, is_online, ..
                        },
                } => Some((*user_id, *is_online)),
                _ => None,
            })
            .collect()
    }

    /// A user with contacts 2 (online) and 3 (offline), connected once.
    fn connected() -> User {
        let mut u = User::new(ME, UserConfig::default());
        u.set_contacts(T0, &[contact(2, true), contact(3, false)]);
        u.handle_connect(T0, ConnId(10));
        drain(&mut u);
        u
    }

    #[test]
    fn coming_online_is_told_to_online_contacts_and_the_origin_only() {
        let mut u = User::new(ME, UserConfig::default());
        u.set_contacts(
            T0,
            &[contact(2, true), contact(3, false), contact(ME, true)],
        );
        assert!(drain(&mut u).is_empty(), "nobody connected, nothing shown");
        u.handle_connect(T0, ConnId(10));
        let outs = drain(&mut u);
        assert_eq!(
            outs.first(),
            Some(&UserOutput::Send {
                to: UserTarget::Conn(ConnId(10)),
                frame: ServerFrame::PresenceSnapshot { online: vec![2] },
            }),
            "the snapshot first, contacts only, never oneself"
        );
        assert_eq!(announcements(&outs), vec![(true, vec![2], true)]);
    }

    #[test]
    fn a_reload_within_the_grace_period_does_not_flap() {
        let mut u = connected();
        u.handle_disconnect(T0 + 100, ConnId(10));
        u.handle_timeout(T0 + 5_000);
        u.handle_connect(T0 + 6_000, ConnId(11));
        let outs = drain(&mut u);
        assert!(announcements(&outs).is_empty(), "{outs:?}");
        assert_eq!(u.poll_timeout(), None);
        u.handle_disconnect(T0 + 7_000, ConnId(11));
        assert_eq!(u.poll_timeout(), Some(T0 + 17_000));
        u.handle_timeout(T0 + 16_999);
        assert!(drain(&mut u).is_empty());
        u.handle_timeout(T0 + 17_000);
        let outs = drain(&mut u);
        assert_eq!(announcements(&outs), vec![(false, vec![2], true)]);
        assert!(matches!(
            &outs[0],
            UserOutput::Announce { update, .. } if update.last_seen == at(T0 + 7_000)
        ));
        assert!(!u.is_online());
    }

    #[test]
    fn the_last_device_closing_starts_the_grace_period_not_the_first() {
        let mut u = connected();
        u.handle_connect(T0, ConnId(11));
        drain(&mut u);
        u.handle_disconnect(T0 + 10, ConnId(10));
        assert_eq!(u.poll_timeout(), None, "another device is still here");
        u.handle_timeout(T0 + 60_000);
        assert!(u.is_online());
        assert!(drain(&mut u).is_empty());
    }

    #[test]
    fn presence_from_someone_who_is_not_a_contact_is_dropped() {
        let mut u = connected();
        assert!(!u.handle_contact_presence(T0, &update(99, true, T0)));
        assert!(drain(&mut u).is_empty(), "nothing about a stranger");
        assert!(!u.online_contacts().contains(&99));
    }

    #[test]
    fn a_contact_coming_online_shows_on_every_device_and_is_answered_once() {
        let mut u = connected();
        u.handle_connect(T0, ConnId(11));
        drain(&mut u);
        assert!(u.handle_contact_presence(T0 + 1, &update(3, true, T0 + 1)));
        let outs = drain(&mut u);
        assert_eq!(presence_frames(&outs), vec![(3, true)]);
        assert_eq!(
            announcements(&outs),
            vec![(true, vec![3], false)],
            "the newcomer learns this user is online; not reported again"
        );
        // Hearing the same again changes nothing and answers nothing, so
        // two objects never ping-pong.
        assert!(u.handle_contact_presence(T0 + 2, &update(3, true, T0 + 2)));
        assert!(drain(&mut u).is_empty());
    }

    #[test]
    fn an_offline_user_keeps_track_of_contacts_silently() {
        let mut u = User::new(ME, UserConfig::default());
        u.set_contacts(T0, &[contact(2, false)]);
        assert!(u.handle_contact_presence(T0, &update(2, true, T0)));
        assert!(drain(&mut u).is_empty(), "no connection, no answer");
        assert_eq!(u.online_contacts(), vec![2]);
        u.handle_connect(T0 + 1, ConnId(10));
        let outs = drain(&mut u);
        assert!(matches!(
            &outs[0],
            UserOutput::Send { frame: ServerFrame::PresenceSnapshot { online }, .. } if online == &vec![2]
        ));
    }

    #[test]
    fn a_removed_contact_goes_offline_on_screen_and_is_no_longer_heard() {
        let mut u = connected();
        u.set_contacts(T0 + 1, &[contact(3, false)]);
        let outs = drain(&mut u);
        assert_eq!(presence_frames(&outs), vec![(2, false)]);
        assert!(!u.handle_contact_presence(T0 + 2, &update(2, true, T0 + 2)));
        assert!(drain(&mut u).is_empty());
    }

    #[test]
    fn new_contacts_and_contacts_now_online_hear_of_this_user_at_once() {
        let mut u = connected();
        u.set_contacts(
            T0 + 1,
            &[
                contact(2, true),
                contact(3, true),
                contact(4, true),
                contact(5, false),
            ],
        );
        let outs = drain(&mut u);
        assert_eq!(
            presence_frames(&outs),
            vec![(3, true), (4, true), (5, false)]
        );
        assert_eq!(
            announcements(&outs),
            vec![(true, vec![3, 4, 5], false)],
            "3 came online, 4 and 5 are new (5's online state may trail); 2 knew"
        );
        // Offline, nobody is told anything.
        let mut v = User::new(ME, UserConfig::default());
        v.set_contacts(T0, &[contact(2, true)]);
        assert!(announcements(&drain(&mut v)).is_empty());
    }

    #[test]
    fn a_connection_before_the_contacts_are_known_gets_its_snapshot_when_they_are() {
        let mut u = User::new(ME, UserConfig::default());
        u.handle_connect(T0, ConnId(10));
        let outs = drain(&mut u);
        assert!(
            !outs.iter().any(|o| matches!(o, UserOutput::Send { .. })),
            "no empty snapshot: {outs:?}"
        );
        u.set_contacts(T0 + 5, &[contact(2, true), contact(3, false)]);
        let outs = drain(&mut u);
        assert_eq!(
            outs[0],
            UserOutput::Send {
                to: UserTarget::All,
                frame: ServerFrame::PresenceSnapshot { online: vec![2] },
            },
            "one snapshot, no presence frame per contact"
        );
        assert!(presence_frames(&outs).is_empty());
        assert_eq!(announcements(&outs), vec![(true, vec![2, 3], false)]);
    }

    #[test]
    fn coming_online_is_reported_once_and_a_second_device_is_not() {
        let mut u = User::new(ME, UserConfig::default());
        assert!(u.handle_connect(T0, ConnId(10)));
        assert!(!u.handle_connect(T0, ConnId(11)));
        assert!(!u.handle_connect(T0, ConnId(11)), "a known connection");
    }

    #[test]
    fn notices_reach_every_device_and_an_older_one_never_overwrites_a_newer() {
        let mut u = connected();
        u.handle_connect(T0, ConnId(11));
        drain(&mut u);
        u.handle_notice(5, 10, None, 3, 0);
        u.handle_notice(5, 12, None, 0, 0);
        u.handle_notice(5, 11, None, 1, 0);
        let outs = drain(&mut u);
        let counts: Vec<i64> = outs
            .iter()
            .filter_map(|o| match o {
                UserOutput::Send {
                    to: UserTarget::All,
                    frame: ServerFrame::ConversationUpdated { unread_count, .. },
                } => Some(*unread_count),
                _ => None,
            })
            .collect();
        assert_eq!(counts, vec![3, 0], "read on one device clears all");
        assert_eq!(u.unread(5), Some(0));
    }

    #[test]
    fn a_group_change_reaches_every_device_and_a_removal_forgets_the_count() {
        let mut u = connected();
        u.handle_connect(T0, ConnId(11));
        drain(&mut u);
        u.handle_notice(5, 10, None, 3, 0);
        drain(&mut u);
        u.handle_conversation_change(5, false);
        assert_eq!(
            drain(&mut u),
            vec![UserOutput::Send {
                to: UserTarget::All,
                frame: ServerFrame::ConversationChanged { conversation_id: 5 },
            }]
        );
        assert_eq!(u.unread(5), Some(3), "still a member: the count stays");
        u.handle_conversation_change(5, true);
        assert_eq!(
            drain(&mut u),
            vec![UserOutput::Send {
                to: UserTarget::All,
                frame: ServerFrame::ConversationRemoved { conversation_id: 5 },
            }]
        );
        assert_eq!(u.unread(5), None, "a removal forgets the conversation");
        // With no connection, nobody is told anything.
        let mut offline = User::new(ME, UserConfig::default());
        offline.handle_conversation_change(5, false);
        offline.handle_conversation_change(5, true);
        assert!(drain(&mut offline).is_empty());
    }

    #[test]
    fn after_a_restart_a_user_the_origin_shows_online_goes_offline_after_grace() {
        let mut u = User::new(ME, UserConfig::default());
        u.set_contacts(T0, &[contact(2, true)]);
        u.handle_restore(T0, true);
        assert!(u.is_online());
        u.handle_timeout(T0 + 10_000);
        assert_eq!(announcements(&drain(&mut u)), vec![(false, vec![2], true)]);
        // Survivors of hibernation keep the user online, unannounced.
        let mut v = User::new(ME, UserConfig::default());
        v.handle_reattach(ConnId(10));
        v.handle_restore(T0, true);
        assert!(v.is_online());
        assert_eq!(v.poll_timeout(), None);
        assert!(drain(&mut v).is_empty());
    }

    fn message(seq: i64) -> ServerFrame {
        ServerFrame::Message {
            message: crate::protocol::MessageView {
                id: uuid::Uuid::nil(),
                seq,
                conversation_id: 5,
                sender_id: 2,
                content: format!("m{seq}"),
                status: crate::protocol::MessageStatus::Sent,
                created_at: at(T0),
                client_msg_id: format!("k{seq}"),
                attachments: Vec::new(),
                edited_at: None,
                deleted_at: None,
                reactions: Vec::new(),
                reply_to: None,
                mentions: Vec::new(),
            },
        }
    }

    /// (connection or None for all, seq) of every message sent.
    fn messages_sent(outs: &[UserOutput]) -> Vec<(Option<u64>, i64)> {
        outs.iter()
            .filter_map(|o| match o {
                UserOutput::Send {
                    to,
                    frame: ServerFrame::Message { message },
                } => Some((
                    match to {
                        UserTarget::Conn(c) => Some(c.0),
                        UserTarget::All => None,
                    },
                    message.seq,
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn live_frames_wait_for_a_replay_in_flight_and_nobody_gets_a_message_twice() {
        let mut u = connected();
        u.handle_connect(T0, ConnId(11));
        drain(&mut u);
        u.relay(message(1));
        assert_eq!(messages_sent(&drain(&mut u)), vec![(None, 1)]);
        // Connection 10 resumes from 1 while 3 and 4 arrive live.
        u.begin_subscribe(5);
        u.relay(message(3));
        u.relay(message(4));
        assert!(drain(&mut u).is_empty(), "held until the replay is out");
        u.finish_subscribe(
            5,
            UserTarget::Conn(ConnId(10)),
            vec![message(2), message(3)],
        );
        assert_eq!(
            messages_sent(&drain(&mut u)),
            vec![(Some(10), 2), (Some(10), 3), (Some(11), 3), (None, 4)],
            "the replay first, then what waited, each once per connection"
        );
        // A late duplicate of the live stream is dropped.
        u.relay(message(4));
        assert!(drain(&mut u).is_empty());
        u.relay(message(5));
        assert_eq!(messages_sent(&drain(&mut u)), vec![(None, 5)]);
    }

    #[test]
    fn overlapping_subscriptions_release_only_when_both_answered() {
        let mut u = connected();
        u.begin_subscribe(5);
        u.begin_subscribe(5);
        u.relay(message(2));
        u.finish_subscribe(5, UserTarget::All, vec![message(1)]);
        assert_eq!(messages_sent(&drain(&mut u)), vec![(None, 1)]);
        // A failed subscription answers with nothing; the live frame goes.
        u.finish_subscribe(5, UserTarget::All, Vec::new());
        assert_eq!(messages_sent(&drain(&mut u)), vec![(None, 2)]);
        // A connection that closed forgets what it had.
        u.handle_disconnect(T0, ConnId(10));
        u.handle_connect(T0, ConnId(12));
        drain(&mut u);
        u.relay(message(2));
        assert_eq!(messages_sent(&drain(&mut u)), vec![(None, 2)]);
    }

    #[test]
    fn an_sse_resume_query_is_conversation_seq_pairs() {
        assert_eq!(
            parse_resume("7:42,9:0"),
            Ok(BTreeMap::from([(7, 42), (9, 0)]))
        );
        assert_eq!(parse_resume(""), Ok(BTreeMap::new()));
        assert!(parse_resume("7").is_err());
        assert!(parse_resume("x:1").is_err());
        assert!(parse_resume("7:-1").is_err());
        let many: Vec<String> = (0..201).map(|i| format!("{i}:0")).collect();
        assert!(parse_resume(&many.join(",")).is_err());
    }

    #[test]
    fn restored_contacts_are_known_without_a_word_to_anyone() {
        let mut u = User::new(ME, UserConfig::default());
        u.handle_reattach(ConnId(10));
        u.restore_contacts(&[contact(2, true), contact(3, false), contact(ME, true)]);
        assert!(drain(&mut u).is_empty(), "no snapshot, nobody told");
        assert_eq!(u.online_contacts(), vec![2]);
        // Presence from a restored contact is heard; the origin's list
        // later shows only what changed.
        assert!(u.handle_contact_presence(T0, &update(3, true, T0)));
        assert_eq!(presence_frames(&drain(&mut u)), vec![(3, true)]);
        u.set_contacts(T0, &[contact(2, true), contact(3, true)]);
        assert!(presence_frames(&drain(&mut u)).is_empty());
        assert_eq!(u.contacts().len(), 2);
    }
}
