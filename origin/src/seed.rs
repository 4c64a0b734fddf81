//! Demo data for `cargo xtask dev`: a trainer, two members and a group, all
//! with the password `demo-password`. Idempotent: running it again changes
//! nothing.

use anyhow::Context;
use deadpool_postgres::Pool;

use crate::auth::hash_password;

pub const DEMO_PASSWORD: &str = "demo-password";

/// (email, full name, role)
pub const DEMO_USERS: &[(&str, &str, &str)] = &[
    ("coach@vibe.fit", "Casey Coach", "trainer"),
    ("alex@vibe.fit", "Alex Rivera", "member"),
    ("sam@vibe.fit", "Sam Patel", "member"),
];

const DEMO_GROUP: &str = "Morning HIIT";

/// Creates the demo users (and a group with all three) when missing.
pub async fn seed_demo(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await.context("connect to seed")?;
    let mut ids = Vec::new();
    for (email, name, role) in DEMO_USERS {
        let existing = client
            .query_opt("SELECT id FROM users WHERE email = $1", &[email])
            .await
            .context("look up demo user")?;
        let id: i64 = match existing {
            Some(row) => row.get(0),
            None => {
                let hash = tokio::task::spawn_blocking(|| hash_password(DEMO_PASSWORD))
                    .await
                    .context("hash demo password")??;
                let row = client
                    .query_one(
                        "INSERT INTO users (email, full_name, role, password_hash)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email
                         RETURNING id",
                        &[email, name, role, &hash],
                    )
                    .await
                    .context("insert demo user")?;
                row.get(0)
            }
        };
        ids.push(id);
    }
    let coach = ids[0];
    let tx = client.transaction().await.context("begin seed")?;
    let group = tx
        .query_opt(
            "SELECT id FROM conversations WHERE kind = 'group' AND name = $1 AND created_by = $2",
            &[&DEMO_GROUP, &coach],
        )
        .await
        .context("look up demo group")?;
    if group.is_none() {
        let row = tx
            .query_one(
                "INSERT INTO conversations (kind, name, created_by) VALUES ('group', $1, $2)
                 RETURNING id",
                &[&DEMO_GROUP, &coach],
            )
            .await
            .context("insert demo group")?;
        let id: i64 = row.get(0);
        tx.execute(
            "INSERT INTO conversation_participants (conversation_id, user_id)
             SELECT $1, unnest($2::int8[])",
            &[&id, &ids],
        )
        .await
        .context("add demo group members")?;
    }
    tx.commit().await.context("commit seed")?;
    Ok(())
}
