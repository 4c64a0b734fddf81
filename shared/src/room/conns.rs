//! The room's live connections (WebSockets and SSE streams alike), each
//! with its user and the time its token runs out. The driver sends to the
//! connections this registry names and no others.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::{ConnId, Millis};

#[derive(Debug)]
struct Conn {
    user_id: i64,
    valid_until: Option<Millis>,
}

#[derive(Debug, Default)]
pub struct Conns {
    map: BTreeMap<ConnId, Conn>,
    /// Connections by the time their token runs out, earliest first.
    expiries: BTreeSet<(Millis, ConnId)>,
}

impl Conns {
    pub fn add(&mut self, conn: ConnId, user_id: i64, valid_until: Option<Millis>) {
        self.remove(conn);
        self.map.insert(
            conn,
            Conn {
                user_id,
                valid_until: None,
            },
        );
        self.set_valid_until(conn, valid_until);
    }

    pub fn remove(&mut self, conn: ConnId) {
        if let Some(c) = self.map.remove(&conn) {
            if let Some(at) = c.valid_until {
                self.expiries.remove(&(at, conn));
            }
        }
    }

    pub fn set_valid_until(&mut self, conn: ConnId, valid_until: Option<Millis>) {
        let Some(c) = self.map.get_mut(&conn) else {
            return;
        };
        if let Some(old) = c.valid_until.take() {
            self.expiries.remove(&(old, conn));
        }
        c.valid_until = valid_until;
        if let Some(at) = valid_until {
            self.expiries.insert((at, conn));
        }
    }

    pub fn valid_until(&self, conn: ConnId) -> Option<Millis> {
        self.map.get(&conn).and_then(|c| c.valid_until)
    }

    pub fn user_of(&self, conn: ConnId) -> Option<i64> {
        self.map.get(&conn).map(|c| c.user_id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The connections of `user`.
    pub fn of_user(&self, user: i64) -> Vec<ConnId> {
        self.map
            .iter()
            .filter(|(_, c)| c.user_id == user)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Users with at least one connection.
    pub fn users(&self) -> HashSet<i64> {
        self.map.values().map(|c| c.user_id).collect()
    }

    /// The next connection whose token ran out by `now`.
    pub fn next_expired(&self, now: Millis) -> Option<ConnId> {
        self.expiries
            .first()
            .filter(|(at, _)| *at <= now)
            .map(|(_, c)| *c)
    }

    pub fn next_expiry(&self) -> Option<Millis> {
        self.expiries.first().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_follow_renewals_and_removals() {
        let mut c = Conns::default();
        c.add(ConnId(1), 7, Some(100));
        c.add(ConnId(2), 8, Some(50));
        c.add(ConnId(3), 7, None);
        assert_eq!(c.next_expiry(), Some(50));
        c.set_valid_until(ConnId(2), Some(500));
        assert_eq!(c.next_expiry(), Some(100));
        assert_eq!(c.next_expired(99), None);
        assert_eq!(c.next_expired(100), Some(ConnId(1)));
        c.remove(ConnId(1));
        assert_eq!(c.next_expiry(), Some(500));
        assert_eq!(c.of_user(7), vec![ConnId(3)]);
        assert_eq!(c.users().len(), 2);
    }
}
