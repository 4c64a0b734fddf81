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
//! # Changes to messages (edits, deletes, reactions)
//!
//! An entry with `change` is an event the room sequenced: it holds a seq
//! of the conversation like a message, so a message and an event never
//! share one (each upsert probes the other table's `(conversation_id,
//! seq)` index as a row), and `last_seq` advances for it. Events are
//! stored in `message_events` ([`UPSERT_EVENTS`], idempotent like
//! messages), after a second look at who may make them ([`judge`]: an
//! edit is the sender's, a delete the sender's or a group moderator's).
//! Each event inserted *now* is applied once: an edit sets the content
//! unless a later edit (by seq) is applied already ([`APPLY_EDITS`]), a
//! delete erases the message, its edits' text, its reactions and its
//! attachments' rows ([`APPLY_DELETES`]); a reaction is read from the
//! events when shown, so it changes no row.
//!
//! Batches of one conversation run one at a time (the conversation lock)
//! but the edge has several in flight, so they can commit out of order:
//! an event can be stored before the message it changes. It is then kept
//! as it is, and when the message is inserted, [`CATCH_UP`] (one statement
//! per batch that inserted messages: a probe of `message_events`'s target
//! index per new message, which finds nothing almost always) applies what
//! came first, by the same rules. Either order ends in the same state.
//!
//! `origin/tests/api/plans.rs` checks both the `EXPLAIN` of each statement
//! (custom and generic plans, before any `ANALYZE` and with statistics
//! taken while the tables were tiny) and, through `auto_explain`, every
//! plan a real ingest executes, foreign-key checks included.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use shared::media::MAX_ATTACHMENTS_PER_MESSAGE;
use shared::protocol::internal::{
    Change, ConversationVersion, IngestBatch, IngestRejection, IngestResult, MAX_INGEST_BATCH,
    ReceiptUpdate, StoredMessage,
};
use shared::{ClientMsgId, MessageContent};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::metrics::Timed;
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
///
/// It also reads what a delete's permission needs: whether the
/// conversation is a group, and who created it.
pub const LOCK_CONVERSATIONS: &str = "SELECT id, members_version, kind = 'group', created_by
     FROM conversations
     WHERE id = ANY($1::int8[])
     ORDER BY id FOR NO KEY UPDATE";

/// The senders that exist, and whether each is an admin (who may delete
/// anyone's message in a group). `$1`: user ids.
pub const KNOWN_USERS: &str = "SELECT id, role = 'admin' FROM users WHERE id = ANY($1::int8[])";

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
/// conflicts with a *different* stored message, or whose seq a change
/// event holds, is in neither list. `$1..$9`: the columns per message
/// (`$9`, the mentions, as array literals: one text per message).
///
/// `stored` reads the earlier rows by primary key alone (`id = ANY($1)`),
/// fenced as a `MATERIALIZED` CTE so that the comparison of the other
/// columns is a join between two small in-memory sets and cannot steer the
/// planner to `messages_sender_id_idx` or the unique constraints. It reads
/// the statement's snapshot, so it never sees the rows `inserted` writes.
/// The same id at the same seq, from the same sender with the same key,
/// is the same message whatever its content: the room may resend it edited
/// or as a tombstone after a change it made before the first answer came.
/// The `INSERT`'s conflict checks are index probes of the unique
/// constraints and need no plan. Whether a change event holds the seq is
/// a subquery fenced with `OFFSET 0`, so it stays a subplan run per
/// message with the message's seq and conversation as its parameters (as
/// an anti-join, a table the statistics call empty, as `message_events`
/// is for a while, was read whole once and compared in memory). They are
/// compared as a row, `(seq, conversation_id)`, which only
/// `message_events_seq_unique` can serve: it is the one index of the table
/// that has `seq` (migration 0007 orders it so for this probe).
pub const UPSERT_MESSAGES: &str = "WITH input AS (
         SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[],
                              $5::text[], $6::timestamptz[], $7::text[], $8::uuid[], $9::text[],
                              $10::timestamptz[])
             AS t(id, conversation_id, seq, sender_id, content, created_at, client_msg_id,
                  reply_to, mentions, deleted_at)
     ), stored AS MATERIALIZED (
         SELECT id, conversation_id, seq, sender_id, content, client_msg_id, edit_seq, deleted_at
         FROM messages WHERE id = ANY($1::uuid[])
     ), inserted AS (
         INSERT INTO messages (id, conversation_id, seq, sender_id, content, created_at,
                               client_msg_id, reply_to, mentions, deleted_at)
         SELECT id, conversation_id, seq, sender_id, content, created_at, client_msg_id,
                reply_to, mentions::int8[], deleted_at
         FROM input i
         WHERE NOT EXISTS (
             SELECT 1 FROM message_events e
             WHERE (e.seq, e.conversation_id) >= (i.seq, i.conversation_id)
               AND (e.seq, e.conversation_id) <= (i.seq, i.conversation_id)
             OFFSET 0)
         ON CONFLICT DO NOTHING
         RETURNING id
     )
     SELECT id, true FROM inserted
     UNION ALL
     SELECT s.id, false FROM stored s JOIN input i ON i.id = s.id
         AND s.conversation_id = i.conversation_id AND s.seq = i.seq
         AND s.sender_id = i.sender_id AND s.client_msg_id = i.client_msg_id";

/// The messages that changes name, by primary key: which exist, in which
/// conversation, by whom, and whether they are deleted. `$1`: target ids.
pub const EVENT_TARGETS: &str = "SELECT id, conversation_id, sender_id, deleted_at IS NOT NULL
     FROM messages WHERE id = ANY($1::uuid[])";

/// Inserts the change events that are new, like [`UPSERT_MESSAGES`]: the
/// rows inserted now (`true`) and the identical rows an earlier call
/// stored (`false`); an event whose seq or key a different entry holds (in
/// `message_events`, or a message at its seq) is in neither list.
/// `$1..$11`: id, conversation, seq, actor, key, target, kind, content
/// (edits), emoji and on (reactions), created_at per event.
///
/// `stored` reads by primary key alone (fenced, as above), and compares
/// everything but an edit's content, which is erased when its target is
/// deleted. The seq a message holds is probed in a subplan fenced like
/// [`UPSERT_MESSAGES`]'s: one probe of `messages_conversation_seq_unique`
/// per event.
pub const UPSERT_EVENTS: &str = "WITH input AS (
         SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::text[],
                              $6::uuid[], $7::text[], $8::text[], $9::text[], $10::bool[],
                              $11::timestamptz[])
             AS t(id, conversation_id, seq, actor_id, client_msg_id, target_id, kind, content,
                  emoji, is_on, created_at)
     ), stored AS MATERIALIZED (
         SELECT id, conversation_id, seq, actor_id, client_msg_id, target_id, kind
         FROM message_events WHERE id = ANY($1::uuid[])
     ), inserted AS (
         INSERT INTO message_events (id, conversation_id, seq, actor_id, client_msg_id, target_id,
                                     kind, content, emoji, \"on\", created_at)
         SELECT id, conversation_id, seq, actor_id, client_msg_id, target_id, kind, content,
                emoji, is_on, created_at
         FROM input i
         WHERE NOT EXISTS (
             SELECT 1 FROM messages m
             WHERE m.conversation_id = i.conversation_id AND m.seq = i.seq
             OFFSET 0)
         ON CONFLICT DO NOTHING
         RETURNING id
     )
     SELECT id, true FROM inserted
     UNION ALL
     SELECT s.id, false FROM stored s JOIN input i ON i.id = s.id
         AND s.conversation_id = i.conversation_id AND s.seq = i.seq
         AND s.actor_id = i.actor_id AND s.client_msg_id = i.client_msg_id
         AND s.target_id = i.target_id AND s.kind = i.kind";

/// The catch-up: the edits and deletes committed earlier for the messages
/// this call inserted (an event can commit before its message: the edge
/// has several flushes in flight). `$1`, `$2`: id and conversation of each
/// message inserted now. Whether a delete's actor is an admin comes along
/// (a group's admin may delete anyone's message).
///
/// One probe of `message_events_target_idx` per new message: a `LATERAL`
/// subquery fenced with `OFFSET 0`, so it stays the inner side of a nested
/// loop over the batch, parameterised by the message's id (a join could
/// instead read a table the statistics call empty whole). It finds
/// nothing almost always, which is what keeps the common batch as cheap
/// as before.
pub const CATCH_UP: &str = "SELECT f.target_id, f.seq, f.kind, f.actor_id, f.content, f.created_at,
            f.kind = 'delete' AND EXISTS (
                SELECT 1 FROM users u WHERE u.id = f.actor_id AND u.role = 'admin')
     FROM UNNEST($1::uuid[], $2::int8[]) AS t(id, conversation_id)
     CROSS JOIN LATERAL (
         SELECT e.target_id, e.conversation_id, e.seq, e.kind, e.actor_id, e.content,
                e.created_at
         FROM message_events e
         WHERE e.target_id = t.id AND e.kind IN ('edit', 'delete')
         OFFSET 0
     ) AS f
     WHERE f.conversation_id = t.conversation_id";

/// Applies edits: the content, `edited_at` and `edit_seq` of each target,
/// unless it is deleted or a later edit (by seq) is already applied, so
/// edits that commit out of order end in the latest one's text. `$1..$6`:
/// target, conversation, actor, content, edited_at, seq; one edit per
/// target.
///
/// Only the sender edits: `current` reads the targets by primary key alone
/// (fenced) and the sender and conversation are compared in memory, so
/// the comparison cannot steer the planner to `messages_sender_id_idx`.
pub const APPLY_EDITS: &str = "WITH t AS (
         SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::text[],
                              $5::timestamptz[], $6::int8[])
             AS t(id, conversation_id, actor_id, content, at, seq)
     ), current AS MATERIALIZED (
         SELECT id, conversation_id, sender_id FROM messages WHERE id = ANY($1::uuid[])
     ), allowed AS (
         SELECT t.* FROM t JOIN current c ON c.id = t.id
             AND c.conversation_id = t.conversation_id AND c.sender_id = t.actor_id
     )
     UPDATE messages m
     SET content = a.content, edited_at = a.at, edit_seq = a.seq
     FROM allowed a
     WHERE m.id = ANY($1::uuid[]) AND m.id = a.id
       AND m.deleted_at IS NULL AND m.edit_seq < a.seq";

/// Erases deleted messages: content `''`, `deleted_at`, no mentions, no
/// quote, no `edited_at`; the content of their edit events (copies of
/// their text) set to NULL; their reactions (the `react` events) and their
/// attachments' rows deleted (the room deletes the objects in R2).
/// `$1`, `$2`: target and deleted_at, one per target; the caller has
/// checked who may delete (the sender, or a group's moderator).
///
/// Every part is a lookup of the targets' keys. The messages by primary
/// key; the events and the attachments of each target found first by a
/// probe per target (`message_events_target_idx`,
/// `attachments_message_idx`, each a `LATERAL` subquery fenced with
/// `OFFSET 0` as in [`CATCH_UP`]: `attachments_gallery_idx` covers the
/// same rows, and on statistics that call the table empty a whole read of
/// it looked as cheap as the probes), then changed by primary key.
/// Answers how many rows of each kind it erased.
pub const APPLY_DELETES: &str = "WITH t AS (
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[]) AS t(id, at)
     ), erased AS (
         UPDATE messages m
         SET content = '', deleted_at = t.at, edited_at = NULL, mentions = '{}', reply_to = NULL
         FROM t
         WHERE m.id = ANY($1::uuid[]) AND m.id = t.id AND m.deleted_at IS NULL
         RETURNING m.id
     ), events AS MATERIALIZED (
         SELECT e.id, e.kind FROM t
         CROSS JOIN LATERAL (
             SELECT id, kind FROM message_events
             WHERE target_id = t.id AND kind IN ('edit', 'react')
             OFFSET 0) AS e
     ), edits AS (
         UPDATE message_events e SET content = NULL
         WHERE e.id = ANY(ARRAY(SELECT id FROM events WHERE kind = 'edit'))
           AND e.content IS NOT NULL
         RETURNING e.id
     ), reactions AS (
         DELETE FROM message_events e
         WHERE e.id = ANY(ARRAY(SELECT id FROM events WHERE kind = 'react'))
         RETURNING e.id
     ), files AS (
         DELETE FROM attachments a
         WHERE a.id = ANY(ARRAY(
             SELECT f.id FROM t
             CROSS JOIN LATERAL (
                 SELECT id FROM attachments WHERE message_id = t.id OFFSET 0) AS f))
         RETURNING a.id
     )
     SELECT (SELECT count(*) FROM erased), (SELECT count(*) FROM edits),
            (SELECT count(*) FROM reactions), (SELECT count(*) FROM files)";

/// Advances each conversation's `last_seq` and activity time. `$1`: the
/// conversation ids (the restriction `c.id = ANY($1)` keeps every join
/// method on the primary key), `$2`, `$3`: the highest seq and time each.
/// A change event moves `last_seq` (a room that restarts continues after
/// it) but not the activity time: a reaction does not lift a conversation
/// to the top of the list (`$3` is NULL, which `GREATEST` ignores).
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
pub const STATEMENTS: [(&str, &str); 14] = [
    ("lock_conversations", LOCK_CONVERSATIONS),
    ("known_users", KNOWN_USERS),
    ("not_members", NOT_MEMBERS),
    ("upsert_messages", UPSERT_MESSAGES),
    ("event_targets", EVENT_TARGETS),
    ("upsert_events", UPSERT_EVENTS),
    ("catch_up", CATCH_UP),
    ("apply_edits", APPLY_EDITS),
    ("apply_deletes", APPLY_DELETES),
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
/// Entries with `change` are events (edits, deletes, reactions; see the
/// module documentation): stored in `message_events` and, when new,
/// applied to their target, now or when it arrives.
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
    let started = std::time::Instant::now();
    let received = batch.messages.len();
    let receipts = merge_receipts(&batch.receipts)?;
    let receipt_count = receipts.len();
    let mut rejected = Vec::new();
    let mut seen = HashSet::new();
    let mut valid: Vec<StoredMessage> = Vec::with_capacity(batch.messages.len());
    for mut m in batch.messages {
        if !seen.insert(m.id) {
            continue;
        }
        dedup_mentions(&mut m.mentions);
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
        for r in &rejected {
            crate::metrics::record_error(&r.code);
        }
        tracing::info!(
            entries = received,
            rejected = rejected.len(),
            "ingest batch stored nothing"
        );
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
    let locked = tx
        .query(&lock, &[&conversation_ids])
        .timed("ingest_lock_conversations")
        .await?;
    let members_versions: Vec<ConversationVersion> = locked
        .iter()
        .map(|r| ConversationVersion {
            conversation_id: r.get(0),
            members_version: r.get(1),
        })
        .collect();
    let conversations: HashMap<i64, ConversationFacts> = locked
        .iter()
        .map(|r| {
            (
                r.get(0),
                ConversationFacts {
                    group: r.get(2),
                    created_by: r.get(3),
                },
            )
        })
        .collect();

    let mut stored: HashSet<Uuid> = HashSet::new();
    let mut inserted: HashSet<Uuid> = HashSet::new();
    let mut messages: Vec<StoredMessage> = Vec::new();
    let mut events: Vec<StoredMessage> = Vec::new();
    if !valid.is_empty() {
        let admins = refuse_unknown(&tx, &conversations, &mut valid, &mut rejected).await?;
        // The sender (or a change's actor) must have been a member when it
        // was sent: a message sent while a member and flushed after a
        // removal is stored; one sent after it is not.
        refuse_non_members(&tx, &mut valid, &mut rejected).await?;
        (messages, events) = valid.into_iter().partition(|m| m.change.is_none());
        let mut applied = Applied::default();
        if !messages.is_empty() {
            for (id, new) in upsert(&tx, &messages).await? {
                stored.insert(id);
                if new {
                    inserted.insert(id);
                }
            }
            // Linked before any delete below erases them.
            link_attachments(&tx, &messages, &stored).await?;
            catch_up(&tx, &messages, &inserted, &conversations, &mut applied).await?;
        }
        if !events.is_empty() {
            let targets = event_targets(&tx, &events).await?;
            let (keep, erased) = judge_events(
                &mut events,
                &targets,
                &conversations,
                &admins,
                &mut rejected,
            );
            stored.extend(erased);
            if !keep.is_empty() {
                for (id, new) in upsert_events(&tx, &keep).await? {
                    stored.insert(id);
                    if new {
                        inserted.insert(id);
                    }
                }
                for e in keep.iter().filter(|e| inserted.contains(&e.event.id)) {
                    applied.add_new(e, &targets);
                }
            }
        }
        apply(&tx, &applied).await?;
        advance_conversations(&tx, messages.iter().chain(&events), &stored).await?;
    }
    // Receipts first: a message its recipient has just read is not queued.
    // And push_notified (the clears) before push_jobs, the order the push
    // worker locks them in too.
    if !receipts.is_empty() {
        apply_receipts(&tx, &receipts, push).await?;
    }
    if let Some(push) = push {
        enqueue_push(&tx, &messages, &inserted, push).await?;
    }
    tx.commit().timed("ingest_commit").await?;
    let committed = Utc::now();
    crate::metrics::record_persisted(
        messages
            .iter()
            .filter(|m| inserted.contains(&m.id))
            .map(|m| m.created_at),
        committed,
    );
    log_stored(messages.iter().chain(&events), &inserted);

    for m in messages.iter().chain(&events) {
        if !stored.contains(&m.id) {
            tracing::error!(
                id = %m.id,
                conversation_id = m.conversation_id,
                seq = m.seq,
                "ingest conflict: a different entry holds this seq or client_msg_id"
            );
            rejected.push(IngestRejection {
                id: m.id,
                code: "conflict".to_owned(),
                message: "a different message already holds this seq or client_msg_id".to_owned(),
            });
        }
    }
    let count = |list: &[StoredMessage], set: &HashSet<Uuid>| {
        list.iter().filter(|m| set.contains(&m.id)).count() as u64
    };
    let (new_messages, new_events) = (count(&messages, &inserted), count(&events, &inserted));
    let replayed = count(&messages, &stored) - new_messages;
    crate::metrics::record_ingested(new_messages, replayed);
    metrics::counter!("message_events_ingested_total").increment(new_events);
    for r in &rejected {
        // The codes are the origin's own (static), so the label is bounded.
        crate::metrics::record_error(&r.code);
    }
    tracing::info!(
        entries = received,
        new_messages,
        replayed,
        new_events,
        rejected = rejected.len(),
        receipts = receipt_count,
        ms = started.elapsed().as_millis() as u64,
        "ingest batch stored"
    );
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
    tx.commit().timed("receipts_commit").await?;
    Ok(())
}

/// Rejects the entries of conversations that do not exist (not in
/// `conversations`, the ones the lock found) and of senders who are not
/// users. Answers which of the senders are admins.
async fn refuse_unknown(
    tx: &Transaction<'_>,
    conversations: &HashMap<i64, ConversationFacts>,
    valid: &mut Vec<StoredMessage>,
    rejected: &mut Vec<IngestRejection>,
) -> ApiResult<HashSet<i64>> {
    let sender_ids: Vec<i64> = valid
        .iter()
        .map(|m| m.sender_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stmt = tx.prepare_cached(KNOWN_USERS).await?;
    let rows = tx
        .query(&stmt, &[&sender_ids])
        .timed("ingest_known_users")
        .await?;
    let known_senders: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let admins: HashSet<i64> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    valid.retain(|m| {
        let reason = if !conversations.contains_key(&m.conversation_id) {
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
    Ok(admins)
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
        .timed("ingest_not_members")
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
    let replies: Vec<Option<Uuid>> = valid.iter().map(|m| m.reply_to).collect();
    let mentions: Vec<String> = valid.iter().map(|m| array_literal(&m.mentions)).collect();
    let deleted: Vec<Option<DateTime<Utc>>> = valid.iter().map(|m| m.deleted_at).collect();
    let stmt = tx.prepare_cached(UPSERT_MESSAGES).await?;
    let rows = tx
        .query(
            &stmt,
            &[
                &ids, &convs, &seqs, &senders, &contents, &created, &keys, &replies, &mentions,
                &deleted,
            ],
        )
        .timed("ingest_upsert_messages")
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `{1,2,3}`: a PostgreSQL array literal of `ids` (how [`UPSERT_MESSAGES`]
/// takes one array per message).
fn array_literal(ids: &[i64]) -> String {
    let items: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// Keeps the first of each user id, in order.
fn dedup_mentions(mentions: &mut Vec<i64>) {
    let mut seen = HashSet::new();
    mentions.retain(|id| seen.insert(*id));
}

/// Advances `last_seq` of each conversation that has an entry (a message
/// or an event) in `stored`, and its activity time for the messages.
async fn advance_conversations<'a>(
    tx: &Transaction<'_>,
    entries: impl Iterator<Item = &'a StoredMessage>,
    stored: &HashSet<Uuid>,
) -> ApiResult<()> {
    let mut latest: BTreeMap<i64, (i64, Option<DateTime<Utc>>)> = BTreeMap::new();
    for m in entries.filter(|m| stored.contains(&m.id)) {
        let e = latest.entry(m.conversation_id).or_insert((m.seq, None));
        e.0 = e.0.max(m.seq);
        if m.change.is_none() {
            e.1 = e.1.max(Some(m.created_at));
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = latest.keys().copied().collect();
    let seqs: Vec<i64> = latest.values().map(|v| v.0).collect();
    let ats: Vec<Option<DateTime<Utc>>> = latest.values().map(|v| v.1).collect();
    let stmt = tx.prepare_cached(ADVANCE_CONVERSATIONS).await?;
    tx.execute(&stmt, &[&ids, &seqs, &ats])
        .timed("ingest_advance_conversations")
        .await?;
    Ok(())
}

/// What a delete's permission needs to know of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationFacts {
    pub group: bool,
    pub created_by: i64,
}

impl ConversationFacts {
    /// Whether `actor` may delete anyone's message here: in a group, its
    /// creator or an admin (the room checked the same; this is the
    /// origin's second look).
    pub fn moderates(&self, actor: i64, admin: bool) -> bool {
        self.group && (actor == self.created_by || admin)
    }
}

/// A message a change names, as [`EVENT_TARGETS`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetFacts {
    pub conversation_id: i64,
    pub sender_id: i64,
    pub deleted: bool,
}

/// What becomes of a change event, given its target as stored now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused for good: the code and why.
    Refuse(&'static str, &'static str),
    /// A reaction to a message deleted already: nothing of it is kept (a
    /// delete erases reactions), and it counts as stored.
    Moot,
    /// Stored; `erase_content` for an edit of a message deleted already (by
    /// a delete with a later seq that committed first): its text is not
    /// kept.
    Keep { erase_content: bool },
}

/// The origin's check of a change (the room decided it first): an edit is
/// its target's sender's, a delete its sender's or a group moderator's; the
/// target must be in the event's conversation. A target not stored yet
/// (its batch commits later) cannot be checked now: the event is kept and
/// the same rules decide whether it applies when the message arrives
/// ([`Applied::add_found`]).
pub fn judge(
    actor: i64,
    conversation_id: i64,
    change: &Change,
    target: Option<&TargetFacts>,
    conversation: Option<&ConversationFacts>,
    admin: bool,
) -> Verdict {
    let Some(t) = target else {
        return Verdict::Keep {
            erase_content: false,
        };
    };
    if t.conversation_id != conversation_id {
        return Verdict::Refuse(
            "message_not_found",
            "the changed message is not in this conversation",
        );
    }
    match change {
        Change::Edit { .. } if t.sender_id != actor => {
            Verdict::Refuse("forbidden", "only its sender may edit a message")
        }
        Change::Edit { .. } => Verdict::Keep {
            erase_content: t.deleted,
        },
        Change::Delete
            if t.sender_id != actor && !conversation.is_some_and(|c| c.moderates(actor, admin)) =>
        {
            Verdict::Refuse(
                "forbidden",
                "only its sender, or a group's creator or an admin, may delete a message",
            )
        }
        Change::React { .. } if t.deleted => Verdict::Moot,
        Change::Delete | Change::React { .. } => Verdict::Keep {
            erase_content: false,
        },
    }
}

/// Runs [`EVENT_TARGETS`] for the targets of `events`.
async fn event_targets(
    tx: &Transaction<'_>,
    events: &[StoredMessage],
) -> ApiResult<HashMap<Uuid, TargetFacts>> {
    let ids: Vec<Uuid> = events
        .iter()
        .filter_map(|e| e.change.as_ref().map(|c| c.target_id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stmt = tx.prepare_cached(EVENT_TARGETS).await?;
    Ok(tx
        .query(&stmt, &[&ids])
        .timed("ingest_event_targets")
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                TargetFacts {
                    conversation_id: r.get(1),
                    sender_id: r.get(2),
                    deleted: r.get(3),
                },
            )
        })
        .collect())
}

/// A change event to store, as stored.
#[derive(Debug, Clone, Copy)]
struct KeptEvent<'a> {
    event: &'a StoredMessage,
    target_id: Uuid,
    change: &'a Change,
    /// An edit's text, unless erased.
    content: Option<&'a str>,
}

/// Judges every event ([`judge`]): the refused leave `events` for
/// `rejected`; answers the events to store and the ids of the moot ones
/// (stored as they are: nothing to keep).
fn judge_events<'a>(
    events: &'a mut Vec<StoredMessage>,
    targets: &HashMap<Uuid, TargetFacts>,
    conversations: &HashMap<i64, ConversationFacts>,
    admins: &HashSet<i64>,
    rejected: &mut Vec<IngestRejection>,
) -> (Vec<KeptEvent<'a>>, Vec<Uuid>) {
    let mut erase = HashSet::new();
    let mut moot = Vec::new();
    events.retain(|e| {
        let Some(c) = e.change.as_ref() else {
            return false;
        };
        match judge(
            e.sender_id,
            e.conversation_id,
            &c.change,
            targets.get(&c.target_id),
            conversations.get(&e.conversation_id),
            admins.contains(&e.sender_id),
        ) {
            Verdict::Refuse(code, message) => {
                tracing::warn!(
                    id = %e.id,
                    conversation_id = e.conversation_id,
                    actor_id = e.sender_id,
                    target_id = %c.target_id,
                    code,
                    "ingest refused a change"
                );
                rejected.push(IngestRejection {
                    id: e.id,
                    code: code.to_owned(),
                    message: message.to_owned(),
                });
                false
            }
            Verdict::Moot => {
                moot.push(e.id);
                true
            }
            Verdict::Keep { erase_content } => {
                let emptied = matches!(&c.change, Change::Edit { content } if content.is_empty());
                if erase_content || emptied {
                    erase.insert(e.id);
                }
                true
            }
        }
    });
    let moot_set: HashSet<Uuid> = moot.iter().copied().collect();
    let events: &'a [StoredMessage] = events;
    let keep = events
        .iter()
        .filter(|e| !moot_set.contains(&e.id))
        .filter_map(|e| {
            let c = e.change.as_ref()?;
            let content = match &c.change {
                Change::Edit { content } if !erase.contains(&e.id) => Some(content.as_str()),
                _ => None,
            };
            Some(KeptEvent {
                event: e,
                target_id: c.target_id,
                change: &c.change,
                content,
            })
        })
        .collect();
    (keep, moot)
}

/// Runs [`UPSERT_EVENTS`]: each id PostgreSQL now holds, and whether this
/// call wrote it.
async fn upsert_events(
    tx: &Transaction<'_>,
    events: &[KeptEvent<'_>],
) -> ApiResult<Vec<(Uuid, bool)>> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.event.id).collect();
    let convs: Vec<i64> = events.iter().map(|e| e.event.conversation_id).collect();
    let seqs: Vec<i64> = events.iter().map(|e| e.event.seq).collect();
    let actors: Vec<i64> = events.iter().map(|e| e.event.sender_id).collect();
    let keys: Vec<&str> = events
        .iter()
        .map(|e| e.event.client_msg_id.as_str())
        .collect();
    let targets: Vec<Uuid> = events.iter().map(|e| e.target_id).collect();
    let kinds: Vec<&str> = events.iter().map(|e| kind_of(e.change)).collect();
    let contents: Vec<Option<&str>> = events.iter().map(|e| e.content).collect();
    let (emojis, ons): (Vec<Option<&str>>, Vec<Option<bool>>) = events
        .iter()
        .map(|e| match e.change {
            Change::React { emoji, on } => (Some(emoji.as_str()), Some(*on)),
            _ => (None, None),
        })
        .unzip();
    let created: Vec<DateTime<Utc>> = events.iter().map(|e| e.event.created_at).collect();
    let stmt = tx.prepare_cached(UPSERT_EVENTS).await?;
    let rows = tx
        .query(
            &stmt,
            &[
                &ids, &convs, &seqs, &actors, &keys, &targets, &kinds, &contents, &emojis, &ons,
                &created,
            ],
        )
        .timed("ingest_upsert_events")
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `message_events.kind` of a change.
pub fn kind_of(change: &Change) -> &'static str {
    match change {
        Change::Edit { .. } => "edit",
        Change::Delete => "delete",
        Change::React { .. } => "react",
    }
}

/// An edit to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditToApply {
    pub conversation_id: i64,
    pub actor_id: i64,
    pub content: String,
    pub at: DateTime<Utc>,
    pub seq: i64,
}

/// A change event [`CATCH_UP`] found for a message just inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundEvent {
    pub target_id: Uuid,
    pub seq: i64,
    pub kind: String,
    pub actor_id: i64,
    /// An edit's text (NULL once erased).
    pub content: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The actor is an admin (read for deletes only).
    pub admin: bool,
}

/// The edits and deletes one call applies, per target: the latest edit by
/// seq, the first delete.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub edits: BTreeMap<Uuid, EditToApply>,
    pub deletes: BTreeMap<Uuid, (i64, DateTime<Utc>)>,
}

impl Applied {
    fn edit(&mut self, target: Uuid, edit: EditToApply) {
        match self.edits.get(&target) {
            Some(e) if e.seq >= edit.seq => {}
            _ => {
                self.edits.insert(target, edit);
            }
        }
    }

    fn delete(&mut self, target: Uuid, seq: i64, at: DateTime<Utc>) {
        match self.deletes.get(&target) {
            Some(d) if d.0 <= seq => {}
            _ => {
                self.deletes.insert(target, (seq, at));
            }
        }
    }

    /// An event this call inserted, applied when its target is stored
    /// (otherwise [`CATCH_UP`] applies it once the target arrives).
    fn add_new(&mut self, e: &KeptEvent<'_>, targets: &HashMap<Uuid, TargetFacts>) {
        let Some(t) = targets.get(&e.target_id) else {
            return;
        };
        if t.deleted {
            return;
        }
        match e.change {
            Change::Edit { .. } => {
                if let Some(content) = e.content {
                    self.edit(
                        e.target_id,
                        EditToApply {
                            conversation_id: e.event.conversation_id,
                            actor_id: e.event.sender_id,
                            content: content.to_owned(),
                            at: e.event.created_at,
                            seq: e.event.seq,
                        },
                    );
                }
            }
            Change::Delete => self.delete(e.target_id, e.event.seq, e.event.created_at),
            Change::React { .. } => {}
        }
    }

    /// An event committed before its message `m`, which this call inserted:
    /// applied by the rules [`judge`] would have checked had the message
    /// been there (an edit by its sender, a delete by its sender or a
    /// moderator); any other is left as it is, applying to nothing.
    pub fn add_found(
        &mut self,
        found: &FoundEvent,
        m: &StoredMessage,
        conversation: Option<&ConversationFacts>,
    ) {
        match found.kind.as_str() {
            "delete"
                if found.actor_id == m.sender_id
                    || conversation.is_some_and(|c| c.moderates(found.actor_id, found.admin)) =>
            {
                self.delete(found.target_id, found.seq, found.created_at);
            }
            "edit" if found.actor_id == m.sender_id => {
                if let Some(content) = &found.content {
                    self.edit(
                        found.target_id,
                        EditToApply {
                            conversation_id: m.conversation_id,
                            actor_id: found.actor_id,
                            content: content.clone(),
                            at: found.created_at,
                            seq: found.seq,
                        },
                    );
                }
            }
            _ => {}
        }
    }
}

/// Runs [`CATCH_UP`] for the messages of `messages` this call inserted,
/// adding what it finds to `applied`.
async fn catch_up(
    tx: &Transaction<'_>,
    messages: &[StoredMessage],
    inserted: &HashSet<Uuid>,
    conversations: &HashMap<i64, ConversationFacts>,
    applied: &mut Applied,
) -> ApiResult<()> {
    let new: HashMap<Uuid, &StoredMessage> = messages
        .iter()
        .filter(|m| inserted.contains(&m.id))
        .map(|m| (m.id, m))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    // A message the room deleted before its first flush arrives as a
    // tombstone: whatever of it came first (an edit's text, reactions) is
    // erased now, as its delete would (which finds it deleted already).
    for m in new.values() {
        if let Some(at) = m.deleted_at {
            applied.delete(m.id, m.seq, at);
        }
    }
    let ids: Vec<Uuid> = new.keys().copied().collect();
    let convs: Vec<i64> = ids.iter().map(|id| new[id].conversation_id).collect();
    let stmt = tx.prepare_cached(CATCH_UP).await?;
    for r in tx
        .query(&stmt, &[&ids, &convs])
        .timed("ingest_catch_up")
        .await?
    {
        let found = FoundEvent {
            target_id: r.get(0),
            seq: r.get(1),
            kind: r.get(2),
            actor_id: r.get(3),
            content: r.get(4),
            created_at: r.get(5),
            admin: r.get(6),
        };
        if let Some(m) = new.get(&found.target_id) {
            applied.add_found(&found, m, conversations.get(&m.conversation_id));
        }
    }
    Ok(())
}

/// Runs [`APPLY_EDITS`] and then [`APPLY_DELETES`] for what `applied`
/// holds (nothing, not even a statement, when it holds nothing). An edit of
/// a message deleted in the same call is not applied: the delete would
/// erase it at once.
async fn apply(tx: &Transaction<'_>, applied: &Applied) -> ApiResult<()> {
    let edits: Vec<(&Uuid, &EditToApply)> = applied
        .edits
        .iter()
        .filter(|(id, _)| !applied.deletes.contains_key(id))
        .collect();
    if !edits.is_empty() {
        let ids: Vec<Uuid> = edits.iter().map(|e| *e.0).collect();
        let convs: Vec<i64> = edits.iter().map(|e| e.1.conversation_id).collect();
        let actors: Vec<i64> = edits.iter().map(|e| e.1.actor_id).collect();
        let contents: Vec<&str> = edits.iter().map(|e| e.1.content.as_str()).collect();
        let ats: Vec<DateTime<Utc>> = edits.iter().map(|e| e.1.at).collect();
        let seqs: Vec<i64> = edits.iter().map(|e| e.1.seq).collect();
        let stmt = tx.prepare_cached(APPLY_EDITS).await?;
        tx.execute(&stmt, &[&ids, &convs, &actors, &contents, &ats, &seqs])
            .timed("ingest_apply_edits")
            .await?;
    }
    if !applied.deletes.is_empty() {
        let ids: Vec<Uuid> = applied.deletes.keys().copied().collect();
        let ats: Vec<DateTime<Utc>> = applied.deletes.values().map(|d| d.1).collect();
        let stmt = tx.prepare_cached(APPLY_DELETES).await?;
        let r = tx
            .query_one(&stmt, &[&ids, &ats])
            .timed("ingest_apply_deletes")
            .await?;
        tracing::debug!(
            messages = r.get::<_, i64>(0),
            edits = r.get::<_, i64>(1),
            reactions = r.get::<_, i64>(2),
            attachments = r.get::<_, i64>(3),
            "ingest erased deleted messages"
        );
    }
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
    .timed("ingest_link_attachments")
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
        .timed("ingest_apply_receipts")
        .await?;
    if push.is_some() {
        let stmt = tx.prepare_cached(SCHEDULE_CLEARS).await?;
        tx.execute(&stmt, &[&convs, &users, &read])
            .timed("ingest_schedule_clears")
            .await?;
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
    .timed("ingest_enqueue_push")
    .await?;
    Ok(())
}

/// One `debug` line per entry this call inserted (a replay logs nothing
/// again): the request id of the client request or socket frame that sent
/// it, where it is and its size, never its content. Enable with
/// `RUST_LOG=info,origin::ingest=debug`.
fn log_stored<'a>(entries: impl Iterator<Item = &'a StoredMessage>, inserted: &HashSet<Uuid>) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    for m in entries.filter(|m| inserted.contains(&m.id)) {
        let (kind, bytes) = match m.change.as_ref().map(|c| &c.change) {
            None => ("message", m.content.len()),
            Some(Change::Edit { content }) => ("edit", content.len()),
            Some(c) => (kind_of(c), 0),
        };
        tracing::debug!(
            request_id = m.request_id.as_deref().unwrap_or(""),
            conversation_id = m.conversation_id,
            seq = m.seq,
            message_id = %m.id,
            kind,
            bytes,
            "ingest stored"
        );
    }
}

/// Users a message may mention (the room keeps at most as many).
pub const MAX_MENTIONS: usize = 50;

/// The longest emoji a reaction may be, in bytes (the room's bound too).
pub const MAX_EMOJI_BYTES: usize = 64;

/// Applies the shared field rules to one entry. Text is optional next to
/// attachments (the room stores such a message with empty content); a
/// change event has no text of its own (an edit's is in its change).
fn validate(m: &StoredMessage) -> Result<(), (&'static str, String)> {
    if m.seq < 1 {
        return Err(("invalid_field", "seq must be at least 1".to_owned()));
    }
    ClientMsgId::parse(m.client_msg_id.as_str()).map_err(|e| (e.code(), e.to_string()))?;
    if let Some(c) = &m.change {
        return match &c.change {
            // An edit the room emptied because its message was deleted
            // before the edit left (the delete follows in the log): kept
            // for its seq, applied to nothing.
            Change::Edit { content } if content.is_empty() => Ok(()),
            Change::Edit { content } => MessageContent::parse(content.as_str())
                .map(|_| ())
                .map_err(|e| (e.code(), e.to_string())),
            Change::Delete => Ok(()),
            Change::React { emoji, .. } => {
                if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
                    Err((
                        "invalid_emoji",
                        format!("a reaction is one emoji of 1 to {MAX_EMOJI_BYTES} bytes"),
                    ))
                } else {
                    Ok(())
                }
            }
        };
    }
    if m.attachment_ids.len() > MAX_ATTACHMENTS_PER_MESSAGE {
        return Err((
            "invalid_attachment",
            format!("at most {MAX_ATTACHMENTS_PER_MESSAGE} attachments per message"),
        ));
    }
    if m.mentions.len() > MAX_MENTIONS {
        return Err((
            "invalid_field",
            format!("a message mentions at most {MAX_MENTIONS} users"),
        ));
    }
    if m.deleted_at.is_some() {
        // A tombstone: deleted in the room before it was flushed.
        if !m.content.is_empty() || !m.mentions.is_empty() || m.reply_to.is_some() {
            return Err((
                "invalid_field",
                "a deleted message arrives without content, mentions or quote".to_owned(),
            ));
        }
        return Ok(());
    }
    if m.attachment_ids.is_empty() || !m.content.trim().is_empty() {
        MessageContent::parse(m.content.as_str()).map_err(|e| (e.code(), e.to_string()))?;
    }
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

    fn event(seq: i64, actor: i64, change: Change) -> StoredMessage {
        StoredMessage {
            seq,
            sender_id: actor,
            client_msg_id: format!("k{seq}"),
            change: Some(shared::protocol::internal::StoredChange {
                target_id: Uuid::from_u128(1),
                change,
            }),
            ..stored("", 0)
        }
    }

    #[test]
    fn a_change_is_validated_by_its_own_fields() {
        let edit = |content: &str| Change::Edit {
            content: content.to_owned(),
        };
        assert!(validate(&event(2, 1, edit("fixed"))).is_ok());
        assert!(validate(&event(2, 1, Change::Delete)).is_ok());
        assert_eq!(
            validate(&event(2, 1, edit(" "))).map_err(|e| e.0),
            Err("empty_field")
        );
        let react = |emoji: &str| Change::React {
            emoji: emoji.to_owned(),
            on: true,
        };
        assert!(validate(&event(2, 1, react("👍"))).is_ok());
        assert_eq!(
            validate(&event(2, 1, react(""))).map_err(|e| e.0),
            Err("invalid_emoji")
        );
        assert_eq!(
            validate(&event(2, 1, react(&"👍".repeat(17)))).map_err(|e| e.0),
            Err("invalid_emoji")
        );
        let mut many = stored("hi", 0);
        many.mentions = (1..=MAX_MENTIONS as i64 + 1).collect();
        assert_eq!(validate(&many).map_err(|e| e.0), Err("invalid_field"));
        let mut twice = vec![3, 1, 3, 2, 1];
        dedup_mentions(&mut twice);
        assert_eq!(twice, vec![3, 1, 2]);
        assert_eq!(array_literal(&twice), "{3,1,2}");
        assert_eq!(array_literal(&[]), "{}");
    }

    #[test]
    fn the_origin_checks_who_may_change_a_message() {
        let target = |sender: i64, deleted: bool| TargetFacts {
            conversation_id: 7,
            sender_id: sender,
            deleted,
        };
        let group = ConversationFacts {
            group: true,
            created_by: 9,
        };
        let direct = ConversationFacts {
            group: false,
            created_by: 9,
        };
        let edit = Change::Edit {
            content: "x".to_owned(),
        };
        let react = Change::React {
            emoji: "👍".to_owned(),
            on: true,
        };
        let keep = Verdict::Keep {
            erase_content: false,
        };
        let judged = |actor, change: &Change, t: Option<TargetFacts>, c, admin| {
            judge(actor, 7, change, t.as_ref(), Some(c), admin)
        };
        // Edits: the sender only, even in a group its creator moderates.
        assert_eq!(
            judged(1, &edit, Some(target(1, false)), &group, false),
            keep
        );
        assert!(matches!(
            judged(9, &edit, Some(target(1, false)), &group, true),
            Verdict::Refuse("forbidden", _)
        ));
        // An edit of a message deleted already keeps no text.
        assert_eq!(
            judged(1, &edit, Some(target(1, true)), &group, false),
            Verdict::Keep {
                erase_content: true
            }
        );
        // Deletes: the sender, or in a group its creator or an admin.
        for (actor, c, admin, allowed) in [
            (1, &direct, false, true),
            (2, &direct, false, false),
            (2, &direct, true, false),
            (9, &direct, false, false),
            (2, &group, false, false),
            (9, &group, false, true),
            (2, &group, true, true),
        ] {
            let v = judged(actor, &Change::Delete, Some(target(1, false)), c, admin);
            assert_eq!(v == keep, allowed, "{actor} {c:?} admin {admin}: {v:?}");
        }
        // Reactions: anyone; on a deleted message, nothing to keep.
        assert_eq!(
            judged(5, &react, Some(target(1, false)), &direct, false),
            keep
        );
        assert_eq!(
            judged(5, &react, Some(target(1, true)), &direct, false),
            Verdict::Moot
        );
        // Another conversation's message; a target not stored yet.
        let mut elsewhere = target(1, false);
        elsewhere.conversation_id = 8;
        assert!(matches!(
            judged(1, &edit, Some(elsewhere), &group, false),
            Verdict::Refuse("message_not_found", _)
        ));
        assert_eq!(judged(2, &Change::Delete, None, &direct, false), keep);
    }

    #[test]
    fn changes_found_for_a_late_message_apply_by_the_same_rules() {
        let at = Utc::now();
        let m = StoredMessage {
            id: Uuid::from_u128(1),
            conversation_id: 7,
            sender_id: 1,
            ..stored("hi", 0)
        };
        let found =
            |seq: i64, kind: &str, actor: i64, content: Option<&str>, admin: bool| FoundEvent {
                target_id: m.id,
                seq,
                kind: kind.to_owned(),
                actor_id: actor,
                content: content.map(str::to_owned),
                created_at: at,
                admin,
            };
        let direct = ConversationFacts {
            group: false,
            created_by: 9,
        };
        let mut applied = Applied::default();
        for f in [
            found(5, "edit", 1, Some("fifth"), false),
            found(3, "edit", 1, Some("third"), false),
            // Not the sender's: never applied.
            found(6, "edit", 2, Some("not yours"), false),
            // Erased already.
            found(7, "edit", 1, None, false),
            found(8, "delete", 2, None, true),
        ] {
            applied.add_found(&f, &m, Some(&direct));
        }
        assert_eq!(
            applied
                .edits
                .get(&m.id)
                .map(|e| (e.seq, e.content.as_str())),
            Some((5, "fifth"))
        );
        // An admin's delete counts in a group only.
        assert!(applied.deletes.is_empty());
        let group = ConversationFacts {
            group: true,
            created_by: 9,
        };
        applied.add_found(&found(8, "delete", 2, None, true), &m, Some(&group));
        applied.add_found(&found(4, "delete", 1, None, false), &m, Some(&direct));
        assert_eq!(applied.deletes.get(&m.id).map(|d| d.0), Some(4));
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
