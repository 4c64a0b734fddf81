//! Who may open one more connection to a Durable Object, and whose
//! connection makes room for it.
//!
//! One member opening hundreds of streams must not push everyone else out.
//! The rule: a user over their own cap loses **their own** oldest
//! connection; a full object makes room only at the expense of the
//! newcomer's own oldest connection, and refuses a user who has none
//! (never evicting someone else).

/// A live connection, as the cap sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub conn: u64,
    pub user: i64,
    pub opened_at: u64,
}

/// Caps for one object and one kind of connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub per_user: usize,
    pub total: usize,
}

/// The decision for a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Admit it after closing these (the user's own oldest), if any.
    Admit { evict: Vec<u64> },
    /// The object is full and the user holds nothing to give up.
    Refuse,
}

/// Decides whether `user` may open one more connection next to `live`.
pub fn admit(live: &[Live], user: i64, caps: Caps) -> Admission {
    let per_user = caps.per_user.max(1);
    let total = caps.total.max(1);
    let mut own: Vec<&Live> = live.iter().filter(|l| l.user == user).collect();
    own.sort_by_key(|l| (l.opened_at, l.conn));
    // Room for the newcomer within the user's own cap…
    let over_own = (own.len() + 1).saturating_sub(per_user);
    // …and within the object's, paid for by the user's own connections.
    let over_total = (live.len() + 1).saturating_sub(total);
    let needed = over_own.max(over_total);
    if needed > own.len() {
        return Admission::Refuse;
    }
    Admission::Admit {
        evict: own.iter().take(needed).map(|l| l.conn).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(conn: u64, user: i64, opened_at: u64) -> Live {
        Live {
            conn,
            user,
            opened_at,
        }
    }

    const CAPS: Caps = Caps {
        per_user: 2,
        total: 4,
    };

    #[test]
    fn under_both_caps_nobody_is_evicted() {
        let now = [live(1, 7, 10), live(2, 8, 20)];
        assert_eq!(admit(&now, 7, CAPS), Admission::Admit { evict: vec![] });
    }

    #[test]
    fn a_user_at_their_cap_gives_up_their_own_oldest() {
        let now = [live(1, 7, 30), live(2, 8, 5), live(3, 7, 10)];
        assert_eq!(admit(&now, 7, CAPS), Admission::Admit { evict: vec![3] });
    }

    #[test]
    fn a_full_object_evicts_only_the_newcomers_own_connection() {
        let now = [live(1, 8, 1), live(2, 9, 2), live(3, 7, 3), live(4, 10, 4)];
        assert_eq!(admit(&now, 7, CAPS), Admission::Admit { evict: vec![3] });
        // Someone with nothing here is refused; nobody else pays.
        assert_eq!(admit(&now, 11, CAPS), Admission::Refuse);
    }

    #[test]
    fn a_flood_from_one_user_never_touches_the_others() {
        let mut now = vec![live(1, 8, 0), live(2, 9, 0)];
        for i in 0..200u64 {
            match admit(&now, 7, CAPS) {
                Admission::Admit { evict } => {
                    now.retain(|l| !evict.contains(&l.conn));
                    now.push(live(100 + i, 7, i + 1));
                }
                Admission::Refuse => panic!("the flooder always has its own to give up"),
            }
        }
        assert!(now.iter().any(|l| l.user == 8) && now.iter().any(|l| l.user == 9));
        assert_eq!(now.iter().filter(|l| l.user == 7).count(), 2);
    }
}
