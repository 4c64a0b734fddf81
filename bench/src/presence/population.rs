//! The simulated users: rows in PostgreSQL, written with a few bulk
//! statements (10,000 users through the API would take longer than the
//! bench), their direct conversations, and a session token each, minted
//! with the stack's secret as the e2e harness does.
//!
//! The contact graph is a ring: user `i` has a direct conversation with
//! `i ± 1 … i ± contacts/2` (mod n), so everyone has exactly `contacts`
//! contacts and nobody is special.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, ensure};
use e2e::Stack;

/// How long the bench's tokens live: longer than any run, so no
/// connection reaches its renewal deadline during one.
const TOKEN_TTL_SECS: i64 = 6 * 3600;

/// The users of one run.
#[derive(Debug)]
pub struct Population {
    /// Database id → index.
    pub index: HashMap<i64, u32>,
    /// Contacts of user `i`, as indices.
    pub contacts: Vec<Vec<u32>>,
    /// A session token per user.
    pub tokens: Vec<String>,
    pub conversations: usize,
    /// Time to write the rows and mint the tokens.
    pub created_in_secs: f64,
}

/// The ring's pairs `(i, j)`, `i` < `j` by position in the ring walk, each
/// unordered pair once.
pub fn ring_pairs(n: usize, contacts: usize) -> Vec<(usize, usize)> {
    let half = contacts / 2;
    let mut pairs = Vec::with_capacity(n * half);
    for i in 0..n {
        for d in 1..=half {
            pairs.push((i, (i + d) % n));
        }
    }
    pairs
}

/// Creates `n` users with `contacts` contacts each in the stack's database.
pub async fn create(stack: &Stack, n: usize, contacts: usize) -> anyhow::Result<Population> {
    ensure!(
        contacts.is_multiple_of(2) && contacts > 0,
        "contacts per user must be even and positive"
    );
    ensure!(
        n > contacts + 1,
        "{n} users cannot each have {contacts} distinct contacts"
    );
    let began = Instant::now();
    let mut db = stack.pool.get().await?;
    let count = i32::try_from(n).context("user count")?;
    let rows = db
        .query(
            "INSERT INTO users (email, full_name, role, password_hash)
             SELECT 'presence-' || g || '@bench.vibe', 'Presence ' || g, 'member', 'not-a-login'
             FROM generate_series(0, $1 - 1) AS g
             RETURNING id, email",
            &[&count],
        )
        .await
        .context("insert the users")?;
    let mut ids = vec![0i64; n];
    for row in &rows {
        let id: i64 = row.get(0);
        let email: String = row.get(1);
        let i: usize = email
            .strip_prefix("presence-")
            .and_then(|r| r.split('@').next())
            .and_then(|g| g.parse().ok())
            .with_context(|| format!("unexpected email {email}"))?;
        ids[i] = id;
    }
    ensure!(ids.iter().all(|id| *id > 0), "some users were not created");
    let index: HashMap<i64, u32> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();

    // A direct conversation's row as the origin writes it
    // (`find_or_create_direct`): the pair smaller id first, created by the
    // first, both as participants (the membership triggers run once per
    // statement).
    let pairs = ring_pairs(n, contacts);
    let (lo, hi): (Vec<i64>, Vec<i64>) = pairs
        .iter()
        .map(|&(a, b)| {
            let (a, b) = (ids[a], ids[b]);
            (a.min(b), a.max(b))
        })
        .unzip();
    let tx = db.transaction().await?;
    let created = tx
        .query(
            "INSERT INTO conversations (kind, created_by, direct_user_lo, direct_user_hi)
             SELECT 'direct', lo, lo, hi FROM unnest($1::bigint[], $2::bigint[]) AS t(lo, hi)
             RETURNING id, direct_user_lo, direct_user_hi",
            &[&lo, &hi],
        )
        .await
        .context("insert the direct conversations")?;
    let mut conv = Vec::with_capacity(created.len() * 2);
    let mut member = Vec::with_capacity(created.len() * 2);
    for row in &created {
        let id: i64 = row.get(0);
        conv.extend([id, id]);
        member.extend([row.get::<_, i64>(1), row.get::<_, i64>(2)]);
    }
    tx.execute(
        "INSERT INTO conversation_participants (conversation_id, user_id)
         SELECT c, u FROM unnest($1::bigint[], $2::bigint[]) AS t(c, u)",
        &[&conv, &member],
    )
    .await
    .context("insert the participants")?;
    tx.commit().await?;
    // Fresh statistics, so the origin's contact query plans for the rows
    // just written rather than for an empty table.
    db.batch_execute("ANALYZE users, conversations, conversation_participants")
        .await?;

    let mut contact_lists = vec![Vec::with_capacity(contacts); n];
    for &(a, b) in &pairs {
        contact_lists[a].push(b as u32);
        contact_lists[b].push(a as u32);
    }
    ensure!(
        contact_lists.iter().all(|c| c.len() == contacts),
        "the ring did not give everyone {contacts} contacts"
    );
    let tokens = ids
        .iter()
        .enumerate()
        .map(|(i, id)| stack.token_for(*id, &format!("Presence {i}"), TOKEN_TTL_SECS))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Population {
        index,
        contacts: contact_lists,
        tokens,
        conversations: created.len(),
        created_in_secs: began.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_gives_everyone_the_same_number_of_distinct_contacts() {
        let n = 25;
        let pairs = ring_pairs(n, 20);
        assert_eq!(pairs.len(), n * 10);
        let mut seen = std::collections::HashSet::new();
        let mut degree = vec![0; n];
        for (a, b) in pairs {
            assert_ne!(a, b);
            assert!(seen.insert((a.min(b), a.max(b))), "pair twice");
            degree[a] += 1;
            degree[b] += 1;
        }
        assert!(degree.iter().all(|d| *d == 20));
    }
}
