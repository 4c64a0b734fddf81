//! The lobby: presence and conversation notifications for the ChatBox's
//! always-on connection, as a sans-IO state machine (see [`crate::room`]
//! for the pattern).
//!
//! Presence: a user is online from their first connection (any tab, any
//! device) and goes offline when their last connection has been gone for
//! a grace period, so a page reload does not flap. Online/offline changes
//! are broadcast as `presence` frames to every connection, and reported to
//! the origin.
//!
//! Notifications: rooms tell the lobby what changed in a conversation and
//! who should hear about it; only those users' connections get the
//! `conversation_updated` frame. Nobody learns of a conversation they are
//! not in.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use chrono::{DateTime, Utc};

pub use crate::protocol::internal::ConversationNotice;

use crate::conn::{ConnId, Millis};
use crate::protocol::ServerFrame;
use crate::protocol::internal::PresenceUpdate;

/// Tunables.
#[derive(Debug, Clone)]
pub struct LobbyConfig {
    /// How long a user with no connection stays online.
    pub grace_ms: u64,
}

impl Default for LobbyConfig {
    fn default() -> Self {
        Self { grace_ms: 10_000 }
    }
}

/// Who a frame goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LobbyTarget {
    Conn(ConnId),
    All,
    User(i64),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum LobbyOutput {
    Send {
        to: LobbyTarget,
        frame: ServerFrame,
    },
    /// Tell the origin (`POST /internal/v1/presence`).
    ReportPresence(PresenceUpdate),
}

#[derive(Debug, Clone, Copy)]
struct Presence {
    conns: usize,
    /// Set while the user has no connection: when the grace period ends.
    offline_at: Option<Millis>,
    /// When the last connection closed (the `last_seen` to report).
    last_seen: Millis,
}

/// Presence and notifications for one tenant. See the module docs.
#[derive(Debug)]
pub struct Lobby {
    config: LobbyConfig,
    conns: BTreeMap<ConnId, i64>,
    /// Users considered online (including those inside the grace period).
    presence: HashMap<i64, Presence>,
    outputs: VecDeque<LobbyOutput>,
}

fn at(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).unwrap_or_default()
}

impl Lobby {
    pub fn new(config: LobbyConfig) -> Self {
        Self {
            config,
            conns: BTreeMap::new(),
            presence: HashMap::new(),
            outputs: VecDeque::new(),
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn user_of(&self, conn: ConnId) -> Option<i64> {
        self.conns.get(&conn).copied()
    }

    /// Users online right now (grace period included).
    pub fn online(&self) -> Vec<i64> {
        let mut users: Vec<i64> = self.presence.keys().copied().collect();
        users.sort_unstable();
        users
    }

    /// A connection that survived a restart (hibernation): counted, not
    /// announced.
    pub fn handle_reattach(&mut self, now: Millis, conn: ConnId, user_id: i64) {
        self.count_in(now, conn, user_id);
    }

    /// Counts a new connection for `user_id` and ends any grace period.
    /// Returns whether the user was already online, or `None` if the
    /// connection was known.
    fn count_in(&mut self, now: Millis, conn: ConnId, user_id: i64) -> Option<bool> {
        if self.conns.insert(conn, user_id).is_some() {
            return None;
        }
        let was_online = self.presence.contains_key(&user_id);
        let p = self.presence.entry(user_id).or_insert(Presence {
            conns: 0,
            offline_at: None,
            last_seen: now,
        });
        p.conns += 1;
        p.offline_at = None;
        p.last_seen = now;
        Some(was_online)
    }

    /// After a restart: users the origin still believes online but who have
    /// no connection here go through the grace period again (their timer
    /// was lost with the old instance).
    pub fn handle_restore(&mut self, now: Millis, reported_online: &[i64]) {
        for &user in reported_online {
            self.presence.entry(user).or_insert(Presence {
                conns: 0,
                offline_at: Some(now + self.config.grace_ms),
                last_seen: now,
            });
        }
    }

    /// A user connects. The new connection gets the current presence
    /// snapshot; everyone else hears about the user if they were offline.
    pub fn handle_connect(&mut self, now: Millis, conn: ConnId, user_id: i64) {
        // Back within the grace period (a reload) counts as online: nothing
        // to announce.
        let Some(was_online) = self.count_in(now, conn, user_id) else {
            return;
        };
        // The snapshot first, so the newcomer's view starts complete.
        let mut online = self.online();
        online.retain(|u| *u != user_id);
        self.outputs.push_back(LobbyOutput::Send {
            to: LobbyTarget::Conn(conn),
            frame: ServerFrame::PresenceSnapshot { online },
        });
        if !was_online {
            self.announce(user_id, true, now);
        }
    }

    /// A connection closed. The user's last one starts the grace period.
    pub fn handle_disconnect(&mut self, now: Millis, conn: ConnId) {
        let Some(user_id) = self.conns.remove(&conn) else {
            return;
        };
        let grace = self.config.grace_ms;
        if let Some(p) = self.presence.get_mut(&user_id) {
            p.conns = p.conns.saturating_sub(1);
            if p.conns == 0 {
                p.last_seen = now;
                p.offline_at = Some(now + grace);
            }
        }
    }

    /// Ends grace periods that are over.
    pub fn handle_timeout(&mut self, now: Millis) {
        let gone: Vec<(i64, Millis)> = self
            .presence
            .iter()
            .filter(|(_, p)| p.conns == 0 && p.offline_at.is_some_and(|t| now >= t))
            .map(|(u, p)| (*u, p.last_seen))
            .collect();
        for (user, last_seen) in gone {
            self.presence.remove(&user);
            self.announce(user, false, last_seen);
        }
    }

    /// The next grace deadline.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.presence
            .values()
            .filter(|p| p.conns == 0)
            .filter_map(|p| p.offline_at)
            .min()
    }

    /// A room's notice: each recipient's connections get
    /// `conversation_updated` with their own unread count.
    pub fn handle_notice(&mut self, notice: &ConversationNotice) {
        let connected: HashSet<i64> = self.conns.values().copied().collect();
        for &(user, unread_count) in &notice.recipients {
            if !connected.contains(&user) {
                continue;
            }
            self.outputs.push_back(LobbyOutput::Send {
                to: LobbyTarget::User(user),
                frame: ServerFrame::ConversationUpdated {
                    conversation_id: notice.conversation_id,
                    seq: notice.seq,
                    last_message: notice.last_message.clone(),
                    unread_count,
                },
            });
        }
    }

    pub fn poll_output(&mut self) -> Option<LobbyOutput> {
        self.outputs.pop_front()
    }

    fn announce(&mut self, user_id: i64, is_online: bool, when: Millis) {
        self.outputs.push_back(LobbyOutput::Send {
            to: LobbyTarget::All,
            frame: ServerFrame::Presence {
                user_id,
                is_online,
                last_seen: Some(at(when)),
            },
        });
        self.outputs
            .push_back(LobbyOutput::ReportPresence(PresenceUpdate {
                user_id,
                is_online,
                last_seen: at(when),
            }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_800_000_000_000;

    fn drain(lobby: &mut Lobby) -> Vec<LobbyOutput> {
        std::iter::from_fn(|| lobby.poll_output()).collect()
    }

    fn presence_of(outs: &[LobbyOutput]) -> Vec<(i64, bool)> {
        outs.iter()
            .filter_map(|o| match o {
                LobbyOutput::Send {
                    to: LobbyTarget::All,
                    frame:
                        ServerFrame::Presence {
                            user_id, is_online, ..
                        },
                } => Some((*user_id, *is_online)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_first_connection_announces_and_reports_online() {
        let mut lobby = Lobby::new(LobbyConfig::default());
        lobby.handle_connect(T0, ConnId(1), 7);
        let outs = drain(&mut lobby);
        assert_eq!(presence_of(&outs), vec![(7, true)]);
        assert!(
            outs.iter().any(
                |o| matches!(o, LobbyOutput::ReportPresence(p) if p.user_id == 7 && p.is_online)
            )
        );
        // A second tab announces nothing.
        lobby.handle_connect(T0 + 10, ConnId(2), 7);
        assert!(presence_of(&drain(&mut lobby)).is_empty());
    }

    #[test]
    fn closing_one_of_two_tabs_keeps_the_user_online() {
        let mut lobby = Lobby::new(LobbyConfig::default());
        lobby.handle_connect(T0, ConnId(1), 7);
        lobby.handle_connect(T0, ConnId(2), 7);
        drain(&mut lobby);
        lobby.handle_disconnect(T0 + 100, ConnId(1));
        assert_eq!(lobby.poll_timeout(), None);
        lobby.handle_timeout(T0 + 60_000);
        assert!(drain(&mut lobby).is_empty());
        assert_eq!(lobby.online(), vec![7]);
    }

    #[test]
    fn the_last_tab_closing_goes_offline_after_the_grace_period_with_its_time() {
        let mut lobby = Lobby::new(LobbyConfig { grace_ms: 10_000 });
        lobby.handle_connect(T0, ConnId(1), 7);
        drain(&mut lobby);
        lobby.handle_disconnect(T0 + 500, ConnId(1));
        assert_eq!(lobby.poll_timeout(), Some(T0 + 10_500));
        lobby.handle_timeout(T0 + 10_499);
        assert!(drain(&mut lobby).is_empty(), "still in the grace period");
        lobby.handle_timeout(T0 + 10_500);
        let outs = drain(&mut lobby);
        assert_eq!(presence_of(&outs), vec![(7, false)]);
        let reported = outs.iter().find_map(|o| match o {
            LobbyOutput::ReportPresence(p) => Some(p.clone()),
            _ => None,
        });
        let reported = reported.expect("reported");
        assert!(!reported.is_online);
        assert_eq!(
            reported.last_seen,
            at(T0 + 500),
            "last_seen is when the last tab closed"
        );
        assert!(lobby.online().is_empty());
    }

    #[test]
    fn a_reload_within_the_grace_period_does_not_flap() {
        let mut lobby = Lobby::new(LobbyConfig::default());
        lobby.handle_connect(T0, ConnId(1), 7);
        drain(&mut lobby);
        lobby.handle_disconnect(T0 + 1_000, ConnId(1));
        lobby.handle_connect(T0 + 1_800, ConnId(2), 7);
        lobby.handle_timeout(T0 + 30_000);
        assert!(presence_of(&drain(&mut lobby)).is_empty());
        assert_eq!(lobby.online(), vec![7]);
    }

    #[test]
    fn a_newcomer_gets_a_snapshot_of_who_is_online() {
        let mut lobby = Lobby::new(LobbyConfig::default());
        lobby.handle_connect(T0, ConnId(1), 7);
        lobby.handle_connect(T0, ConnId(2), 8);
        drain(&mut lobby);
        lobby.handle_connect(T0, ConnId(3), 9);
        let outs = drain(&mut lobby);
        assert!(outs.contains(&LobbyOutput::Send {
            to: LobbyTarget::Conn(ConnId(3)),
            frame: ServerFrame::PresenceSnapshot { online: vec![7, 8] },
        }));
    }

    #[test]
    fn notices_reach_only_their_recipients_with_their_own_counts() {
        let mut lobby = Lobby::new(LobbyConfig::default());
        for (conn, user) in [(1, 7), (2, 8), (3, 9)] {
            lobby.handle_connect(T0, ConnId(conn), user);
        }
        drain(&mut lobby);
        lobby.handle_notice(&ConversationNotice {
            conversation_id: 5,
            seq: 3,
            last_message: None,
            recipients: vec![(7, 0), (8, 3), (42, 1)],
        });
        let outs = drain(&mut lobby);
        let sent: Vec<(LobbyTarget, i64)> = outs
            .iter()
            .filter_map(|o| match o {
                LobbyOutput::Send {
                    to,
                    frame: ServerFrame::ConversationUpdated { unread_count, .. },
                } => Some((to.clone(), *unread_count)),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent,
            vec![(LobbyTarget::User(7), 0), (LobbyTarget::User(8), 3)]
        );
    }

    #[test]
    fn after_a_restart_unconnected_users_go_offline_after_a_new_grace_period() {
        let mut lobby = Lobby::new(LobbyConfig { grace_ms: 1_000 });
        lobby.handle_reattach(T0, ConnId(1), 7);
        lobby.handle_restore(T0, &[7, 8]);
        assert!(drain(&mut lobby).is_empty());
        lobby.handle_timeout(T0 + 1_000);
        assert_eq!(presence_of(&drain(&mut lobby)), vec![(8, false)]);
        assert_eq!(lobby.online(), vec![7]);
    }
}
