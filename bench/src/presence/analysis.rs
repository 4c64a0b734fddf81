//! What happened, counted at the receivers after the run.
//!
//! For every measured change of user `u` at time `t` (the schedule's, not
//! when the bench got round to it), the **expected receivers** are `u`'s
//! contacts whose socket was open at `t`, unless what that socket was
//! told before `t` already showed `u` in the new state (an earlier frame
//! about `u` never came: counted as **already shown**, where that earlier
//! change counted it as lost if it was measured). A receiver is **informed** by
//! the first frame on that socket at or after `t` that shows `u` in the
//! new state: a `presence` frame before `u`'s next change of the same kind
//! (changes alternate, so a late "online" is still told apart from the
//! "offline" that followed it), or a `presence_snapshot` before `u`'s next
//! change (a receiver that connected just before `t` may get its snapshot
//! after it). A receiver whose socket the schedule closed before it was
//! informed, within a bound after the change (the offline stay, 5 s), has
//! **left**, and is neither informed nor lost; every other
//! expected receiver not informed by the end of the run is **lost**. A
//! second matching `presence` frame on the same socket is **duplicated**.

use hdrhistogram::Histogram;

use super::clients::ConnRecord;
use super::schedule::Plan;
use crate::report::micros_histogram;

/// One kind of change (coming online, going offline), counted.
#[derive(Debug)]
pub struct KindResult {
    /// Measured changes of this kind.
    pub changes: usize,
    /// Changes none of whose contacts was online.
    pub no_receivers: usize,
    /// (change, contact online at the change) pairs.
    pub expected: usize,
    pub informed: usize,
    /// Informed by a snapshot rather than a `presence` frame.
    pub by_snapshot: usize,
    pub lost: usize,
    /// Receivers whose own socket closed (by the schedule) before they
    /// were informed.
    pub left: usize,
    /// Receivers whose view already showed the new state before the change
    /// (an earlier frame about the user never came): not expected.
    pub already: usize,
    pub duplicated: usize,
    /// Changes with at least one lost receiver.
    pub incomplete: usize,
    /// The change → each informed contact (µs).
    pub each: Histogram<u64>,
    /// The change → its last contact informed, for changes where every
    /// expected receiver was informed or left (µs).
    pub last: Histogram<u64>,
    /// A few lost receivers, described, for the run's report.
    pub lost_examples: Vec<String>,
}

impl KindResult {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            changes: 0,
            no_receivers: 0,
            expected: 0,
            informed: 0,
            by_snapshot: 0,
            lost: 0,
            left: 0,
            already: 0,
            duplicated: 0,
            incomplete: 0,
            each: micros_histogram()?,
            last: micros_histogram()?,
            lost_examples: Vec::new(),
        })
    }
}

/// Counts both kinds. `start_us` is the schedule's start on the
/// connections' clock; `end_us` when the bench stopped listening; a
/// receiver that closed more than `left_within_us` after the change without
/// having been informed counts as lost, not as left.
pub fn analyse(
    plan: &Plan,
    start_us: u64,
    end_us: u64,
    left_within_us: u64,
    records: &[ConnRecord],
    contacts: &[Vec<u32>],
) -> anyhow::Result<(KindResult, KindResult)> {
    let n = contacts.len();
    let mut by_user: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, r) in records.iter().enumerate() {
        if let Some(v) = by_user.get_mut(r.user as usize) {
            v.push(i);
        }
    }
    // Each change's user's next change, and next change of the same kind
    // (the ends of its attribution).
    let mut next_at = vec![u64::MAX; plan.changes.len()];
    let mut next_same_at = vec![u64::MAX; plan.changes.len()];
    let mut upcoming: Vec<[u64; 2]> = vec![[u64::MAX; 2]; n];
    for (k, c) in plan.changes.iter().enumerate().rev() {
        let up = &mut upcoming[c.user as usize];
        next_at[k] = up[0].min(up[1]);
        next_same_at[k] = up[usize::from(c.online)];
        up[usize::from(c.online)] = start_us + c.at_us;
    }
    let mut online = KindResult::new()?;
    let mut offline = KindResult::new()?;
    for (k, change) in plan.measured() {
        let out = if change.online {
            &mut online
        } else {
            &mut offline
        };
        out.changes += 1;
        let u = change.user;
        let t = start_us + change.at_us;
        let limit = next_at[k].min(end_us);
        let frame_limit = next_same_at[k].min(end_us);
        let mut expected = 0usize;
        let mut lost = 0usize;
        let mut last: Option<u64> = None;
        for &c in &contacts[u as usize] {
            let Some(conn) = by_user[c as usize]
                .iter()
                .map(|&i| &records[i])
                .find(|r| r.opened_us <= t && r.closed_us.is_none_or(|x| x > t))
            else {
                continue;
            };
            if view_before(conn, u, t) == Some(change.online) {
                out.already += 1;
                continue;
            }
            expected += 1;
            let frames: Vec<u64> = conn
                .heard
                .iter()
                .filter(|h| h.about == u && h.online == change.online)
                .map(|h| h.at_us)
                .filter(|at| (t..frame_limit).contains(at))
                .collect();
            out.duplicated += frames.len().saturating_sub(1);
            let by_frame = frames.first().copied();
            let by_snapshot = conn
                .snapshots
                .iter()
                .filter(|(at, _)| (t..limit).contains(at))
                .find(|(_, who)| who.contains(&u) == change.online)
                .map(|(at, _)| *at);
            let informed = match (by_frame, by_snapshot) {
                (Some(f), Some(s)) if s < f => {
                    out.by_snapshot += 1;
                    Some(s)
                }
                (Some(f), _) => Some(f),
                (None, Some(s)) => {
                    out.by_snapshot += 1;
                    Some(s)
                }
                (None, None) => None,
            };
            match informed {
                Some(at) => {
                    out.informed += 1;
                    let latency = at.saturating_sub(t).max(1);
                    out.each.record(latency)?;
                    last = Some(last.map_or(latency, |l| l.max(latency)));
                }
                None if conn
                    .closed_us
                    .is_some_and(|x| x < frame_limit && x < t + left_within_us) =>
                {
                    out.left += 1
                }
                None => {
                    lost += 1;
                    if out.lost_examples.len() < 5 {
                        out.lost_examples
                            .push(lost_example(conn, u, change.online, t));
                    }
                }
            }
        }
        out.expected += expected;
        out.lost += lost;
        if expected == 0 {
            out.no_receivers += 1;
        }
        if lost > 0 {
            out.incomplete += 1;
        } else if let Some(l) = last {
            out.last.record(l)?;
        }
    }
    Ok((online, offline))
}

/// Whether the connection showed `u` online just before `t` (its last
/// snapshot or frame about them), if it had been told at all.
fn view_before(conn: &ConnRecord, u: u32, t: u64) -> Option<bool> {
    let by_snapshot = conn
        .snapshots
        .iter()
        .rfind(|(at, _)| *at < t)
        .map(|(at, who)| (*at, who.contains(&u)));
    let by_frame = conn
        .heard
        .iter()
        .rfind(|h| h.about == u && h.at_us < t)
        .map(|h| (h.at_us, h.online));
    match (by_snapshot, by_frame) {
        (Some(s), Some(f)) => Some(if f.0 >= s.0 { f.1 } else { s.1 }),
        (s, f) => s.or(f).map(|(_, online)| online),
    }
}

/// What a receiver that was never informed did hear about the user, and
/// when (ms relative to the change).
fn lost_example(conn: &ConnRecord, u: u32, online: bool, t: u64) -> String {
    let rel = |at: u64| (at as f64 - t as f64) / 1000.0;
    let heard: Vec<String> = conn
        .heard
        .iter()
        .filter(|h| h.about == u)
        .map(|h| {
            format!(
                "{} at {:+.0} ms",
                if h.online { "on" } else { "off" },
                rel(h.at_us)
            )
        })
        .collect();
    format!(
        "user {u} {} at t: receiver {} (socket open {:+.0} ms{}) heard of them: [{}]",
        if online {
            "came online"
        } else {
            "went offline"
        },
        conn.user,
        rel(conn.opened_us),
        conn.closed_us
            .map_or(String::new(), |c| format!(", closed {:+.0} ms", rel(c))),
        heard.join(", ")
    )
}

/// After everyone connected: how many users' connections show every
/// contact online (their snapshot, then the `presence` frames, up to
/// `until_us`), of those connected then.
pub fn complete_views(
    records: &[ConnRecord],
    contacts: &[Vec<u32>],
    until_us: u64,
) -> (usize, usize) {
    let mut complete = 0;
    let mut connected = 0;
    for r in records
        .iter()
        .filter(|r| r.opened_us <= until_us && r.closed_us.is_none_or(|x| x > until_us))
    {
        connected += 1;
        let mut view: std::collections::HashSet<u32> = std::collections::HashSet::new();
        let mut events: Vec<(u64, Option<&Vec<u32>>, u32, bool)> = r
            .snapshots
            .iter()
            .map(|(at, who)| (*at, Some(who), 0, false))
            .chain(r.heard.iter().map(|h| (h.at_us, None, h.about, h.online)))
            .filter(|(at, ..)| *at <= until_us)
            .collect();
        events.sort_by_key(|e| e.0);
        for (_, snapshot, about, online) in events {
            match snapshot {
                Some(who) => view = who.iter().copied().collect(),
                None if online => {
                    view.insert(about);
                }
                None => {
                    view.remove(&about);
                }
            }
        }
        if contacts[r.user as usize].iter().all(|c| view.contains(c)) {
            complete += 1;
        }
    }
    (complete, connected)
}
