//! The ingest: what the edge's outbox flush writes into PostgreSQL, through
//! `POST /internal/v1/messages/batch` (messages and watermarks in one
//! transaction) and the older `POST /internal/v1/receipts`.
//!
//! # Plans that cannot leave the indexes
//!
//! A batch names every row it touches by a key, so each statement below is
//! a set of key lookups, and it is written so that **no other plan is
//! possible**, whatever PostgreSQL's statistics say. That matters because
//! statistics go stale (autovacuum late or off, a table grown since its last
//! `ANALYZE`), and a prepared statement keeps the generic plan it chose while
//! a table was small until the next `ANALYZE`: a batch once took 134 ms and
//! most of a core scanning `messages` (5 ms after `ANALYZE`), and on stale
//! statistics the previous statements also chose `messages_sender_id_idx`
//! (every message of the sender, per row) and the `user_id` indexes of
//! `conversation_participants` and `conversation_memberships` (every
//! conversation of a trainer, per row).
//!
//! Two rules give each lookup exactly one index:
//!
//! - **One-column keys are looked up with `key = ANY($n)` on the column of
//!   a primary key** (`messages.id`, `conversations.id`, `users.id`), and no
//!   other index starts with that column. Where the lookup sits beside a
//!   join (the stored-message comparison, the `last_seq` update) the key
//!   condition is a restriction of its own (a `MATERIALIZED` CTE, or `c.id
//!   = ANY($1)` next to the join), so every join method reads the same
//!   index range and no join condition can offer the planner another index.
//! - **Two-column keys are compared as rows**, `(a, b) >= (x, y) AND (a, b)
//!   <= (x, y)`, which is `(a, b) = (x, y)`. Written as two equalities, the
//!   planner could serve `b = y` from the `user_id` index; a row
//!   comparison can be served only by an index that starts with exactly
//!   those columns (the primary key of `conversation_participants`, and
//!   `conversation_memberships_member_idx`). It is also not an equality, so
//!   no hash or merge join applies, and without a restriction there is no
//!   unparameterised index path: the only plan left is a nested loop over
//!   the batch that probes the index once per row, in the batch's order
//!   (which is sorted, so row locks are taken in one order).
//!
//! That leaves one alternative in every case: a sequential scan. Each
//! transaction therefore starts with [`PLANNER_GUARD`]:
//!
//! - `SET LOCAL enable_seqscan = off` removes it (PostgreSQL charges a
//!   disabled path so much that any index path wins; 18 and later count
//!   disabled nodes first). The foreign-key checks of the `INSERT`
//!   (`conversations` and `users` by primary key) are planned under it too,
//!   and since only the ingest inserts messages, their cached plans are
//!   always made under it.
//! - `SET LOCAL jit = off`: these are short key lookups, where JIT only
//!   costs, and the cost of a disabled path (10¹⁰ before PostgreSQL 18)
//!   would push a plan that still held one over `jit_above_cost`, turning a
//!   slow plan into a plan that first compiles for tens of milliseconds.
//!
//! `SET LOCAL` ends with the transaction, so the pooled connection returns
//! to its defaults, and the settings cannot leak into other routes.
//! Prepared statements keep their plans across transactions; every
//! statement here runs only under the guard, so every plan of theirs
//! (custom or generic) is made under it.
//!
//! # Push notifications
//!
//! With push on, the same transaction queues the Web Push notifications of
//! the messages it stored ([`ENQUEUE_PUSH`]: one statement for the batch)
//! and schedules a `clear` for every notification a receipt has now read
//! ([`SCHEDULE_CLEARS`]); [`crate::push::worker`] sends them later. The
//! queueing is the one read here that is not a single key: a
//! conversation's *members*, once per conversation of the batch, which is
//! the range of `conversation_participants_pkey` that starts with the
//! conversation id (bounded by a group's size), written as a row
//! comparison on both key columns so that, as above, only that index can
//! serve it.
//!
//! # Attachments
//!
//! A message's `attachment_ids` are linked to it in the same transaction
//! ([`LINK_ATTACHMENTS`], one statement for the batch, run only when some
//! stored message carries attachments), by the primary key of
//! `attachments` like every other lookup here.
//!
//! `origin/tests/api/plans.rs` checks both the `EXPLAIN` of each statement
//! (custom and generic plans, before any `ANALYZE` and with statistics
//! taken while the tables were tiny) and, through `auto_explain`, every
//! plan a real ingest executes, foreign-key checks included.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use shared::media::MAX_ATTACHMENTS_PER_MESSAGE;
use shared::protocol::internal::{
    ConversationVersion, IngestBatch, IngestRejection, IngestResult, MAX_INGEST_BATCH,
    ReceiptUpdate, StoredMessage,
};
use shared::{ClientMsgId, MessageContent};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
pub use crate::push::Enqueue;

/// Clock skew tolerated between a message's `created_at` (the edge's clock)
/// and the membership periods (PostgreSQL's clock), in seconds. A message
/// from `created_at` within this margin of the sender's join or departure
/// counts as sent while a member. It also covers the moment between a
/// removal's commit and the room hearing of it (the members-changed notice
/// takes milliseconds; its timeout is 2 s).
pub const MEMBERSHIP_SKEW_SECS: f64 = 5.0;

/// Run first in every ingest and receipts transaction: the only plan the
/// statements below leave besides their index lookups is a sequential scan,
/// and this rules it out (see the module documentation).
pub const PLANNER_GUARD: &str = "SET LOCAL enable_seqscan = off; SET LOCAL jit = off";

/// Locks the batch's conversations in id order and reads their member-list
/// version. `$1`: the conversation ids, sorted.
///
/// The lock makes concurrent batches touching the same conversations queue
/// instead of deadlocking on the `last_seq` update, and it holds off member
/// changes (their trigger updates the conversation row), so the membership
/// check and the version reported describe one state.
pub const LOCK_CONVERSATIONS: &str = "SELECT id, members_version FROM conversations
     WHERE id = ANY($1::int8[])
     ORDER BY id FOR NO KEY UPDATE";

/// The senders that exist. `$1`: user ids.
pub const KNOWN_USERS: &str = "SELECT id FROM users WHERE id = ANY($1::int8[])";

/// The messages whose sender had no membership period in the conversation
/// covering `sent_at` (± `$5` seconds). `$1..$4`: id, conversation, sender,
/// sent_at per message.
///
/// The member is named as a row, `(conversation_id, user_id)`, so that only
/// `conversation_memberships_member_idx` can serve it: the range runs from
/// the member's first period to the last one that began by `sent_at + $5`.
pub const NOT_MEMBERS: &str = "SELECT t.id
     FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::timestamptz[])
         AS t(id, conversation_id, sender_id, sent_at)
     WHERE NOT EXISTS (
         SELECT 1 FROM conversation_memberships m
         WHERE (m.conversation_id, m.user_id) >= (t.conversation_id, t.sender_id)
           AND (m.conversation_id, m.user_id, m.joined_at)
               <= (t.conversation_id, t.sender_id, t.sent_at + make_interval(secs => $5::float8))
           AND (m.left_at IS NULL OR m.left_at >= t.sent_at - make_interval(secs => $5::float8)))";

/// Inserts what is new and reports both the rows inserted now (`true`) and
/// the identical rows stored by an earlier call (`false`). A row that
/// conflicts with a *different* stored message is in neither list.
/// `$1..$7`: the columns per message.
///
/// `stored` reads the earlier rows by primary key alone (`id = ANY($1)`),
/// fenced as a `MATERIALIZED` CTE so that the comparison of the other
/// columns is a join between two small in-memory sets and cannot steer the
/// planner to `messages_sender_id_idx` or the unique constraints. It reads
/// the statement's snapshot, so it never sees the rows `inserted` writes.
/// The `INSERT`'s conflict checks are index probes of the unique
/// constraints and need no plan.
pub const UPSERT_MESSAGES: &str = "WITH input AS (
         SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[],
                              $5::text[], $6::timestamptz[], $7::text[])
             AS t(id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
     ), stored AS MATERIALIZED (
         SELECT id, conversation_id, seq, sender_id, content, client_msg_id
         FROM messages WHERE id = ANY($1::uuid[])
     ), inserted AS (
         INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at, client_msg_id)
         SELECT id, conversation_id, seq, sender_id, content, created_at, client_msg_id FROM input
         ON CONFLICT DO NOTHING
         RETURNING id
     )
     SELECT id, true FROM inserted
     UNION ALL
     SELECT s.id, false FROM stored s JOIN input i ON i.id = s.id
         AND s.conversation_id = i.conversation_id AND s.seq = i.seq
         AND s.sender_id = i.sender_id AND s.client_msg_id = i.client_msg_id
         AND s.content = i.content";

/// Advances each conversation's `last_seq` and activity time. `$1`: the
/// conversation ids (the restriction `c.id = ANY($1)` keeps every join
/// method on the primary key), `$2`, `$3`: the highest seq and time each.
pub const ADVANCE_CONVERSATIONS: &str = "UPDATE conversations c
     SET last_seq = GREATEST(c.last_seq, t.seq),
         updated_at = GREATEST(c.updated_at, t.at)
     FROM UNNEST($1::int8[], $2::int8[], $3::timestamptz[]) AS t(id, seq, at)
     WHERE c.id = ANY($1::int8[]) AND c.id = t.id";

/// Moves watermarks forward; a stale or replayed one is a no-op, and a user
/// who is not a participant has no row to update. `$1..$4`: conversation,
/// user, delivered, read, sorted by (conversation, user).
///
/// The participant is named as a row, so only the primary key can serve
/// it (never `conversation_participants_user_id_idx`), one probe per
/// receipt in the order given.
pub const APPLY_RECEIPTS: &str = "UPDATE conversation_participants p
     SET delivered_seq = GREATEST(p.delivered_seq, t.delivered, t.read),
         read_seq = GREATEST(p.read_seq, t.read)
     FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[])
         AS t(conversation_id, user_id, delivered, read)
     WHERE (p.conversation_id, p.user_id) >= (t.conversation_id, t.user_id)
       AND (p.conversation_id, p.user_id) <= (t.conversation_id, t.user_id)";

/// Schedules the `clear` push of every notification a receipt has now
/// read (the notified seq is at most the read watermark). `$1..$3`:
/// conversation, user, read, sorted by (conversation, user), as
/// [`APPLY_RECEIPTS`] takes them.
///
/// The notification is named as a row, `(user_id, conversation_id)`, so
/// only `push_notified_pkey` can serve it, one probe per receipt.
pub const SCHEDULE_CLEARS: &str = "UPDATE push_notified n
     SET clear_due_at = now()
     FROM UNNEST($1::int8[], $2::int8[], $3::int8[]) AS t(conversation_id, user_id, read)
     WHERE (n.user_id, n.conversation_id) >= (t.user_id, t.conversation_id)
       AND (n.user_id, n.conversation_id) <= (t.user_id, t.conversation_id)
       AND n.seq <= t.read AND n.clear_due_at IS NULL";

/// Queues a notification of the messages just stored for every *current*
/// participant with a push subscription except their sender who has not
/// read them yet (members with no subscription could not be reached, so
/// they cost the message path nothing: the queue's writes grow with the
/// subscribed recipients, not with a group's size; the origin bench measured
/// 16–27 % of ingest throughput for one recipient per message). One pending
/// job per recipient and conversation: count and last_seq grow, and it is
/// due `$4` seconds after its latest message, at most `$5` seconds after
/// its first). `$1..$3`: conversation, seq, sender of each message
/// inserted by this call (a replay queues nothing again).
///
/// A conversation's members are read once per conversation of the batch:
/// the range of the primary key of `conversation_participants` from
/// `(conversation, 0)` to `(conversation, max)` (user ids are positive, an
/// identity), written as row comparisons so that only that index can
/// serve it. The lookup is a `LATERAL` subquery fenced with `OFFSET 0`, so
/// it stays the inner side of a nested loop driven by the batch's
/// conversations: as a plain join, the planner could instead walk a whole
/// participants index in `user_id` order to feed the grouping. Someone
/// who is not a participant has no row, so can never be notified (and a
/// non-member's messages were refused before this).
///
/// The join is batch × subscribed members rows (100,000 for a batch of 100
/// in a group of 1,000), so its aggregates must not sort each group: the
/// last sender is `max(ARRAY[seq, sender])` and "several senders" is
/// `min <> max` (with `array_agg(… ORDER BY …)` and `count(DISTINCT …)`,
/// the origin bench's 1,000-member group ingested 1,109 msgs/s).
pub const ENQUEUE_PUSH: &str = "WITH t AS MATERIALIZED (
         SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[])
             AS t(conversation_id, seq, sender_id)
     )
     INSERT INTO push_jobs AS j
         (user_id, conversation_id, first_seq, last_seq, count,
          last_sender_id, several_senders, due_at)
     SELECT p.user_id, t.conversation_id, min(t.seq), max(t.seq), count(*),
            (max(ARRAY[t.seq, t.sender_id]))[2],
            min(t.sender_id) <> max(t.sender_id),
            now() + make_interval(secs => $4::float8)
     FROM (SELECT DISTINCT conversation_id FROM t) AS c
     CROSS JOIN LATERAL (
         SELECT m.user_id, m.read_seq FROM conversation_participants m
         WHERE (m.conversation_id, m.user_id) > (c.conversation_id, 0::int8)
           AND (m.conversation_id, m.user_id) <= (c.conversation_id, 9223372036854775807::int8)
           AND EXISTS (SELECT 1 FROM push_subscriptions s WHERE s.user_id = m.user_id)
         OFFSET 0
     ) AS p
     JOIN t ON t.conversation_id = c.conversation_id
           AND t.sender_id <> p.user_id AND t.seq > p.read_seq
     GROUP BY p.user_id, t.conversation_id
     ORDER BY p.user_id, t.conversation_id
     ON CONFLICT (user_id, conversation_id) DO UPDATE
     SET first_seq = LEAST(j.first_seq, EXCLUDED.first_seq),
         last_seq = GREATEST(j.last_seq, EXCLUDED.last_seq),
         count = j.count + EXCLUDED.count,
         last_sender_id = CASE WHEN EXCLUDED.last_seq > j.last_seq
                               THEN EXCLUDED.last_sender_id ELSE j.last_sender_id END,
         several_senders = j.several_senders OR EXCLUDED.several_senders
                           OR j.last_sender_id <> EXCLUDED.last_sender_id,
         due_at = GREATEST(j.due_at, LEAST(EXCLUDED.due_at,
                                           j.created_at + make_interval(secs => $5::float8))),
         updated_at = now()";

/// Links the attachments of the messages just stored (or replayed
/// identically) to them, in the sender's order. `$1..$6`: attachment id,
/// message id, conversation, sender, seq, position, sorted by attachment
/// id (so rows are locked in one order).
///
/// Only an attachment of the same conversation, uploaded by the sender and
/// not sent with another message is linked; anything else (an id the
/// cleanup reaped, someone else's upload) is left alone and the message is
/// stored without it: the room checked these ids when it accepted the
/// message, and refusing a message it acknowledged would lose it.
///
/// Keyed like the others: `current` reads the rows by primary key alone,
/// fenced as a `MATERIALIZED` CTE, and the ownership checks compare it
/// with the batch in memory. Written as join conditions on the table, the
/// `uploader_id` comparison could steer the planner to
/// `attachments_quota_idx` (the plan tests caught exactly that).
pub const LINK_ATTACHMENTS: &str = "WITH t AS (
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::int8[], $5::int8[],
                              $6::int2[])
             AS t(id, message_id, conversation_id, sender_id, seq, position)
     ), current AS MATERIALIZED (
         SELECT id, conversation_id, uploader_id, message_id
         FROM attachments WHERE id = ANY($1::uuid[])
     ), linkable AS (
         SELECT t.* FROM t JOIN current c ON c.id = t.id
             AND c.conversation_id = t.conversation_id AND c.uploader_id = t.sender_id
             AND (c.message_id IS NULL OR c.message_id = t.message_id)
     )
     UPDATE attachments a
     SET message_id = l.message_id, message_seq = l.seq, position = l.position
     FROM linkable l
     WHERE a.id = ANY($1::uuid[]) AND a.id = l.id";

/// Every statement the ingest and the receipts route run, by name: what the
/// plan tests check.
pub const STATEMENTS: [(&str, &str); 9] = [
    ("lock_conversations", LOCK_CONVERSATIONS),
    ("known_users", KNOWN_USERS),
    ("not_members", NOT_MEMBERS),
    ("upsert_messages", UPSERT_MESSAGES),
    ("advance_conversations", ADVANCE_CONVERSATIONS),
    ("apply_receipts", APPLY_RECEIPTS),
    ("schedule_clears", SCHEDULE_CLEARS),
    ("enqueue_push", ENQUEUE_PUSH),
    ("link_attachments", LINK_ATTACHMENTS),
];

/// Watermarks per (conversation, user), the highest of each reported: the
/// form [`APPLY_RECEIPTS`] takes, sorted.
pub type MergedReceipts = BTreeMap<(i64, i64), (i64, i64)>;

/// Merges `receipts` per member, keeping the highest of each watermark. A
/// negative watermark refuses them all: nothing the edge should send.
pub fn merge_receipts(receipts: &[ReceiptUpdate]) -> ApiResult<MergedReceipts> {
    let mut merged = MergedReceipts::new();
    for r in receipts {
        if r.delivered_seq < 0 || r.read_seq < 0 {
            return Err(ApiError::invalid("watermarks must not be negative"));
        }
        let e = merged
            .entry((r.conversation_id, r.user_id))
            .or_insert((0, 0));
        e.0 = e.0.max(r.delivered_seq);
        e.1 = e.1.max(r.read_seq);
    }
    Ok(merged)
}

/// Stores a batch and applies its receipts, in one transaction.
///
/// Idempotent: replaying a batch changes nothing and answers the same. The
/// answer lists what PostgreSQL holds, so the edge drops an outbox entry
/// only once it is really stored. Invalid messages, conflicts and messages
/// from non-members are rejected one by one; the rest of the batch, and
/// every receipt, is applied.
///
/// With `push` (push is on), the same transaction queues the notifications
/// of the messages it inserted and schedules the clears its receipts call
/// for (see the module documentation).
pub async fn ingest(
    pool: &Pool,
    batch: IngestBatch,
    push: Option<Enqueue>,
) -> ApiResult<IngestResult> {
    if batch.messages.len() > MAX_INGEST_BATCH {
        return Err(ApiError::TooLarge(format!(
            "a batch holds at most {MAX_INGEST_BATCH} messages"
        )));
    }
    let receipts = merge_receipts(&batch.receipts)?;
    let mut rejected = Vec::new();
    let mut seen = HashSet::new();
    let mut valid: Vec<StoredMessage> = Vec::with_capacity(batch.messages.len());
    for m in batch.messages {
        if !seen.insert(m.id) {
            continue;
        }
        match validate(&m) {
            Ok(()) => valid.push(m),
            Err((code, message)) => rejected.push(IngestRejection {
                id: m.id,
                code: code.to_owned(),
                message,
            }),
        }
    }
    if valid.is_empty() && receipts.is_empty() {
        return Ok(IngestResult {
            stored: Vec::new(),
            rejected,
            members_versions: Vec::new(),
        });
    }

    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(PLANNER_GUARD).await?;

    // Every conversation the batch names, by its messages or its receipts,
    // locked in id order.
    let conversation_ids: Vec<i64> = valid
        .iter()
        .map(|m| m.conversation_id)
        .chain(receipts.keys().map(|k| k.0))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let lock = tx.prepare_cached(LOCK_CONVERSATIONS).await?;
    let members_versions: Vec<ConversationVersion> = tx
        .query(&lock, &[&conversation_ids])
        .await?
        .iter()
        .map(|r| ConversationVersion {
            conversation_id: r.get(0),
            members_version: r.get(1),
        })
        .collect();

    let mut stored: HashSet<Uuid> = HashSet::new();
    let mut inserted: HashSet<Uuid> = HashSet::new();
    if !valid.is_empty() {
        let known_conversations: HashSet<i64> =
            members_versions.iter().map(|v| v.conversation_id).collect();
        refuse_unknown(&tx, &known_conversations, &mut valid, &mut rejected).await?;
        // The sender must have been a member when the message was sent: a
        // message sent while a member and flushed after a removal is
        // stored; one sent after it is not.
        refuse_non_members(&tx, &mut valid, &mut rejected).await?;
        if !valid.is_empty() {
            for (id, new) in upsert(&tx, &valid).await? {
                stored.insert(id);
                if new {
                    inserted.insert(id);
                }
            }
            advance_conversations(&tx, &valid, &stored).await?;
            link_attachments(&tx, &valid, &stored).await?;
        }
    }
    // Receipts first: a message its recipient has just read is not queued.
    // And push_notified (the clears) before push_jobs, the order the push
    // worker locks them in too.
    if !receipts.is_empty() {
        apply_receipts(&tx, &receipts, push).await?;
    }
    if let Some(push) = push {
        enqueue_push(&tx, &valid, &inserted, push).await?;
    }
    tx.commit().await?;
    let new_rows = inserted.len() as u64;

    for m in &valid {
        if !stored.contains(&m.id) {
            tracing::error!(
                id = %m.id,
                conversation_id = m.conversation_id,
                seq = m.seq,
                "ingest conflict: a different message holds this seq or client_msg_id"
            );
            rejected.push(IngestRejection {
                id: m.id,
                code: "conflict".to_owned(),
                message: "a different message already holds this seq or client_msg_id".to_owned(),
            });
        }
    }
    let replayed = stored.len() as u64 - new_rows;
    crate::metrics::record_ingested(new_rows, replayed);
    let mut stored: Vec<Uuid> = stored.into_iter().collect();
    stored.sort_unstable();
    Ok(IngestResult {
        stored,
        rejected,
        members_versions,
    })
}

/// Applies receipts alone (`POST /internal/v1/receipts`, from edges that
/// predate receipts in the ingest batch), under the same guard.
pub async fn receipts(
    pool: &Pool,
    receipts: &[ReceiptUpdate],
    push: Option<Enqueue>,
) -> ApiResult<()> {
    let merged = merge_receipts(receipts)?;
    if merged.is_empty() {
        return Ok(());
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.batch_execute(PLANNER_GUARD).await?;
    apply_receipts(&tx, &merged, push).await?;
    tx.commit().await?;
    Ok(())
}

/// Rejects the messages of conversations that do not exist (not in
/// `known_conversations`) and of senders who are not users.
async fn refuse_unknown(
    tx: &Transaction<'_>,
    known_conversations: &HashSet<i64>,
    valid: &mut Vec<StoredMessage>,
    rejected: &mut Vec<IngestRejection>,
) -> ApiResult<()> {
    let sender_ids: Vec<i64> = valid
        .iter()
        .map(|m| m.sender_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stmt = tx.prepare_cached(KNOWN_USERS).await?;
    let known_senders: HashSet<i64> = tx
        .query(&stmt, &[&sender_ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    valid.retain(|m| {
        let reason = if !known_conversations.contains(&m.conversation_id) {
            Some(("unknown_conversation", "no such conversation"))
        } else if !known_senders.contains(&m.sender_id) {
            Some(("unknown_sender", "no such user"))
        } else {
            None
        };
        if let Some((code, message)) = reason {
            rejected.push(IngestRejection {
                id: m.id,
                code: code.to_owned(),
                message: message.to_owned(),
            });
        }
        reason.is_none()
    });
    Ok(())
}

/// Rejects the messages whose sender had no membership period in the
/// conversation covering `created_at` (± [`MEMBERSHIP_SKEW_SECS`]).
async fn refuse_non_members(
    tx: &Transaction<'_>,
    valid: &mut Vec<StoredMessage>,
    rejected: &mut Vec<IngestRejection>,
) -> ApiResult<()> {
    if valid.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = valid.iter().map(|m| m.id).collect();
    let convs: Vec<i64> = valid.iter().map(|m| m.conversation_id).collect();
    let senders: Vec<i64> = valid.iter().map(|m| m.sender_id).collect();
    let sent: Vec<DateTime<Utc>> = valid.iter().map(|m| m.created_at).collect();
    let stmt = tx.prepare_cached(NOT_MEMBERS).await?;
    let not_members: HashSet<Uuid> = tx
        .query(
            &stmt,
            &[&ids, &convs, &senders, &sent, &MEMBERSHIP_SKEW_SECS],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    valid.retain(|m| {
        if not_members.contains(&m.id) {
            tracing::warn!(
                id = %m.id,
                conversation_id = m.conversation_id,
                sender_id = m.sender_id,
                "ingest refused a message from a non-member"
            );
            rejected.push(IngestRejection {
                id: m.id,
                code: "not_member".to_owned(),
                message: "the sender was not a member of the conversation when it was sent"
                    .to_owned(),
            });
            false
        } else {
            true
        }
    });
    Ok(())
}

/// Runs [`UPSERT_MESSAGES`]: each id PostgreSQL now holds, and whether this
/// call wrote it.
async fn upsert(tx: &Transaction<'_>, valid: &[StoredMessage]) -> ApiResult<Vec<(Uuid, bool)>> {
    let ids: Vec<Uuid> = valid.iter().map(|m| m.id).collect();
    let convs: Vec<i64> = valid.iter().map(|m| m.conversation_id).collect();
    let seqs: Vec<i64> = valid.iter().map(|m| m.seq).collect();
    let senders: Vec<i64> = valid.iter().map(|m| m.sender_id).collect();
    let contents: Vec<&str> = valid.iter().map(|m| m.content.as_str()).collect();
    let created: Vec<DateTime<Utc>> = valid.iter().map(|m| m.created_at).collect();
    let keys: Vec<&str> = valid.iter().map(|m| m.client_msg_id.as_str()).collect();
    let stmt = tx.prepare_cached(UPSERT_MESSAGES).await?;
    let rows = tx
        .query(
            &stmt,
            &[&ids, &convs, &seqs, &senders, &contents, &created, &keys],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Advances `last_seq` and the activity time of each conversation that has
/// a message in `stored`.
async fn advance_conversations(
    tx: &Transaction<'_>,
    valid: &[StoredMessage],
    stored: &HashSet<Uuid>,
) -> ApiResult<()> {
    let mut latest: BTreeMap<i64, (i64, DateTime<Utc>)> = BTreeMap::new();
    for m in valid.iter().filter(|m| stored.contains(&m.id)) {
        let e = latest
            .entry(m.conversation_id)
            .or_insert((m.seq, m.created_at));
        e.0 = e.0.max(m.seq);
        e.1 = e.1.max(m.created_at);
    }
    if latest.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = latest.keys().copied().collect();
    let seqs: Vec<i64> = latest.values().map(|v| v.0).collect();
    let ats: Vec<DateTime<Utc>> = latest.values().map(|v| v.1).collect();
    let stmt = tx.prepare_cached(ADVANCE_CONVERSATIONS).await?;
    tx.execute(&stmt, &[&ids, &seqs, &ats]).await?;
    Ok(())
}

/// Runs [`LINK_ATTACHMENTS`] for the messages of `valid` in `stored` that
/// carry attachments; nothing (not even a statement) when none does, so a
/// batch of text costs what it did.
async fn link_attachments(
    tx: &Transaction<'_>,
    valid: &[StoredMessage],
    stored: &HashSet<Uuid>,
) -> ApiResult<()> {
    let mut links: Vec<(Uuid, &StoredMessage, i16)> = valid
        .iter()
        .filter(|m| !m.attachment_ids.is_empty() && stored.contains(&m.id))
        .flat_map(|m| {
            m.attachment_ids
                .iter()
                .enumerate()
                .map(move |(i, id)| (*id, m, i16::try_from(i).unwrap_or(i16::MAX)))
        })
        .collect();
    if links.is_empty() {
        return Ok(());
    }
    links.sort_unstable_by_key(|l| l.0);
    // An id listed twice (by one message or two) is linked once: the first.
    links.dedup_by_key(|l| l.0);
    let ids: Vec<Uuid> = links.iter().map(|l| l.0).collect();
    let messages: Vec<Uuid> = links.iter().map(|l| l.1.id).collect();
    let convs: Vec<i64> = links.iter().map(|l| l.1.conversation_id).collect();
    let senders: Vec<i64> = links.iter().map(|l| l.1.sender_id).collect();
    let seqs: Vec<i64> = links.iter().map(|l| l.1.seq).collect();
    let positions: Vec<i16> = links.iter().map(|l| l.2).collect();
    let stmt = tx.prepare_cached(LINK_ATTACHMENTS).await?;
    tx.execute(
        &stmt,
        &[&ids, &messages, &convs, &senders, &seqs, &positions],
    )
    .await?;
    Ok(())
}

/// Runs [`APPLY_RECEIPTS`] for `merged` (sorted, so rows are locked in key
/// order), and with push on [`SCHEDULE_CLEARS`].
async fn apply_receipts(
    tx: &Transaction<'_>,
    merged: &MergedReceipts,
    push: Option<Enqueue>,
) -> ApiResult<()> {
    let convs: Vec<i64> = merged.keys().map(|k| k.0).collect();
    let users: Vec<i64> = merged.keys().map(|k| k.1).collect();
    let delivered: Vec<i64> = merged.values().map(|v| v.0).collect();
    let read: Vec<i64> = merged.values().map(|v| v.1).collect();
    let stmt = tx.prepare_cached(APPLY_RECEIPTS).await?;
    tx.execute(&stmt, &[&convs, &users, &delivered, &read])
        .await?;
    if push.is_some() {
        let stmt = tx.prepare_cached(SCHEDULE_CLEARS).await?;
        tx.execute(&stmt, &[&convs, &users, &read]).await?;
    }
    Ok(())
}

/// Runs [`ENQUEUE_PUSH`] for the messages of `valid` that this call
/// inserted (in seq order per conversation).
async fn enqueue_push(
    tx: &Transaction<'_>,
    valid: &[StoredMessage],
    inserted: &HashSet<Uuid>,
    push: Enqueue,
) -> ApiResult<()> {
    let mut new: Vec<&StoredMessage> = valid.iter().filter(|m| inserted.contains(&m.id)).collect();
    if new.is_empty() {
        return Ok(());
    }
    new.sort_unstable_by_key(|m| (m.conversation_id, m.seq));
    let convs: Vec<i64> = new.iter().map(|m| m.conversation_id).collect();
    let seqs: Vec<i64> = new.iter().map(|m| m.seq).collect();
    let senders: Vec<i64> = new.iter().map(|m| m.sender_id).collect();
    let stmt = tx.prepare_cached(ENQUEUE_PUSH).await?;
    tx.execute(
        &stmt,
        &[
            &convs,
            &seqs,
            &senders,
            &push.coalesce.as_secs_f64(),
            &push.max_wait.as_secs_f64(),
        ],
    )
    .await?;
    Ok(())
}

/// Applies the shared field rules to one message. Text is optional next
/// to attachments (the room stores such a message with empty content).
fn validate(m: &StoredMessage) -> Result<(), (&'static str, String)> {
    if m.seq < 1 {
        return Err(("invalid_field", "seq must be at least 1".to_owned()));
    }
    if m.attachment_ids.len() > MAX_ATTACHMENTS_PER_MESSAGE {
        return Err((
            "invalid_attachment",
            format!("at most {MAX_ATTACHMENTS_PER_MESSAGE} attachments per message"),
        ));
    }
    if m.attachment_ids.is_empty() || !m.content.trim().is_empty() {
        MessageContent::parse(m.content.as_str()).map_err(|e| (e.code(), e.to_string()))?;
    }
    ClientMsgId::parse(m.client_msg_id.as_str()).map_err(|e| (e.code(), e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(conversation_id: i64, user_id: i64, delivered: i64, read: i64) -> ReceiptUpdate {
        ReceiptUpdate {
            conversation_id,
            user_id,
            delivered_seq: delivered,
            read_seq: read,
        }
    }

    #[test]
    fn receipts_merge_per_member_to_the_highest_of_each_watermark_in_key_order() {
        let merged = merge_receipts(&[
            receipt(9, 1, 3, 1),
            receipt(2, 5, 7, 5),
            receipt(9, 1, 2, 2),
        ])
        .map_err(|e| e.to_string());
        let expected: MergedReceipts = [((2, 5), (7, 5)), ((9, 1), (3, 2))].into();
        assert_eq!(merged, Ok(expected));
    }

    fn stored(content: &str, attachments: usize) -> StoredMessage {
        StoredMessage {
            id: Uuid::now_v7(),
            conversation_id: 1,
            seq: 1,
            sender_id: 1,
            content: content.to_owned(),
            created_at: Utc::now(),
            client_msg_id: "k1".to_owned(),
            attachment_ids: (0..attachments).map(|_| Uuid::now_v7()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn text_is_optional_only_next_to_attachments() {
        assert!(validate(&stored("hi", 0)).is_ok());
        assert!(validate(&stored("", 1)).is_ok());
        assert!(validate(&stored("  ", 2)).is_ok());
        assert!(validate(&stored("caption", 1)).is_ok());
        assert_eq!(
            validate(&stored("", 0)).map_err(|e| e.0),
            Err("empty_field")
        );
        assert_eq!(
            validate(&stored("", MAX_ATTACHMENTS_PER_MESSAGE + 1)).map_err(|e| e.0),
            Err("invalid_attachment")
        );
    }

    #[test]
    fn a_negative_watermark_refuses_the_receipts() {
        let err = merge_receipts(&[receipt(1, 1, 2, 2), receipt(1, 2, 0, -1)]);
        assert!(matches!(err, Err(ApiError::Unprocessable { .. })));
    }

    #[test]
    fn every_statement_is_listed_once_for_the_plan_tests() {
        let names: BTreeSet<&str> = STATEMENTS.iter().map(|(n, _)| *n).collect();
        let texts: BTreeSet<&str> = STATEMENTS.iter().map(|(_, s)| *s).collect();
        assert_eq!(names.len(), STATEMENTS.len());
        assert_eq!(texts.len(), STATEMENTS.len());
    }
}
