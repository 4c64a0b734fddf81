//! The delivery queue and the task that sends it.
//!
//! # The queue
//!
//! `push_jobs` holds at most one pending notification per (recipient,
//! conversation). The ingest upserts it in the transaction that stores the
//! messages ([`crate::ingest::ENQUEUE_PUSH`]): every current participant
//! but the sender who has not read the message gets `count + 1`,
//! `last_seq = greatest`, and `due_at` moved to the latest message plus
//! `PUSH_COALESCE_MS`, so a burst becomes one push. The message path only
//! inserts rows; it never waits for a push service.
//!
//! # Sending
//!
//! [`run`] leases due jobs (`FOR UPDATE SKIP LOCKED`, then `due_at` moved
//! past the lease and a `claim` token set, committed at once) and decides
//! for each at send time, from PostgreSQL as it is then: no push if the
//! user has no subscription, has read up to `last_seq`, is no longer a
//! participant, set the conversation to `none` (or to `mentions` and none
//! of the unread messages the job covers mentions them), muted it, or is in
//! their quiet hours.
//!
//! Deleted messages are read as they are *now* too: they do not count
//! (a job whose messages were all deleted sends nothing), a mention in a
//! deleted message notifies nobody, and the text shown (with
//! `show_content`) is read at send time, never copied into the queue, so
//! a message deleted before its push is never in one. (The job holds
//! seqs and counts only; what reaches a push service is read in the
//! round that sends it.)
//!
//! Presence (`user_presence`, which the per-user edge layer reports: online
//! at the first connection, offline once the last one closed *and* its
//! grace period passed, with `last_seen` the moment it closed) decides the
//! rest. A member with a live connection is not pushed: a job that comes
//! due while its user is online is *parked* until they go offline (the
//! presence route makes it due then, [`WAKE_PARKED`]; it is looked at again
//! every [`PARK_RECHECK`] in any case). Once the user is offline, only the
//! unread messages stored after their last connection closed count: those
//! they could not have seen live (a message in the grace period after
//! the last tab closed is pushed, one that arrived while a tab was open is
//! not). None left: no push.
//!
//! Otherwise the notification goes to each of the user's subscriptions;
//! then, in one transaction, the job is deleted (or, if messages joined it
//! while it was being sent, reduced to them) and the notified seq is
//! recorded (`push_notified`), so that a later read receipt schedules a
//! `clear` push that closes it on every device.
//!
//! A push service's 2xx marks the subscription's `last_success_at`; 404
//! and 410 delete the subscription; 429, 5xx and network errors keep the
//! job for another attempt after an exponential backoff (at least the
//! `Retry-After` asked for), up to `PUSH_MAX_ATTEMPTS`, without resending to
//! the subscriptions that already accepted it; any other answer is logged
//! and that subscription skipped.
//!
//! # Crash safety, honestly
//!
//! A job leaves the queue only in the transaction after its sends, so a
//! crash loses no notification: a lease that is not finished ends after
//! [`LEASE`] and the job is sent then. The price is at the HTTP boundary:
//! a crash between a push service's `201` and that commit sends that one
//! notification again after the restart (at-least-once). The repeat
//! carries the same `Topic` (per conversation) and the same notification
//! tag, so the push service or the device replaces the first with it
//! rather than showing two. A graceful stop (SIGTERM) finishes the sends
//! in flight first, so it repeats nothing.
//!
//! Two origin instances never send one job at the same time: a job is
//! taken under `SKIP LOCKED` and leased for [`LEASE`], three times the
//! longest a round of sends can take (each request is bounded by
//! [`webpush::SEND_TIMEOUT`]). Jobs are leased rather than kept row-locked
//! during the sends because the ingest upserts the same rows: a lock held
//! across HTTP calls would make storing a message wait for a push service.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt as _;
use tokio::sync::watch;
use uuid::Uuid;

use super::Push;
use super::payload::{self, MessageFacts};
use super::webpush::{self, Keys, Outcome, PushRequest, Urgency, Vapid};
use crate::metrics::Timed;

/// Jobs (and clears) leased per round.
///
/// One wave of [`CONCURRENCY`]: a round then lasts at most one
/// [`webpush::SEND_TIMEOUT`] (a job's subscriptions are sent at once) plus
/// its database writes, well inside [`LEASE`] and the graceful stop's wait.
/// (Four waves of 8 took up to 40 s, past the 30 s lease, so a second
/// instance could send a slow round's jobs again.)
pub const BATCH: i64 = CONCURRENCY as i64;
/// How long a lease lasts: past it, another worker may take the job.
pub const LEASE: Duration = Duration::from_secs(30);
/// Jobs sent at once.
const CONCURRENCY: usize = 8;
/// Longest sleep between looks at the queue (other instances' jobs, and
/// due times nobody woke this one for).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The longest backoff between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How often a parked job is looked at again while its user stays online
/// (going offline wakes it at once; this only bounds a missed wake).
pub const PARK_RECHECK: Duration = Duration::from_secs(600);

/// Leases up to `$1` due jobs for `$2` seconds under claim `$3`.
pub const CLAIM_JOBS: &str = "UPDATE push_jobs j
     SET due_at = now() + make_interval(secs => $2::float8), claim = $3, parked = false
     FROM (SELECT user_id, conversation_id FROM push_jobs
           WHERE due_at <= now()
           ORDER BY due_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED) due
     WHERE j.user_id = due.user_id AND j.conversation_id = due.conversation_id
     RETURNING j.user_id, j.conversation_id, j.first_seq, j.last_seq, j.count,
               j.last_sender_id, j.attempts, j.sent_to";

/// Everything the decision and the payload need, per leased job. `$1..$5`:
/// user, conversation, first_seq, last_seq, last_sender_id per job.
///
/// Quiet hours are evaluated in the user's zone by PostgreSQL (`AT TIME
/// ZONE`); `[start, end)`, and a window whose end is before its start
/// crosses midnight. `unread` counts the messages from others the
/// notification covers that are still unread (the job's range after
/// `read_seq`), not deleted and, for a user who is offline, that were
/// stored after their last connection closed (`last_seen`: both times are
/// the edge's clock), and how many of them mention the user.
const JOB_CONTEXT: &str = "SELECT t.user_id, t.conversation_id,
            p.user_id IS NOT NULL,
            COALESCE(p.read_seq, 0),
            COALESCE(pr.is_online, false),
            COALESCE(np.level, 'all'),
            COALESCE(np.muted_until > now(), false),
            COALESCE(s.show_content, false),
            COALESCE(CASE WHEN s.quiet_start < s.quiet_end
                          THEN (now() AT TIME ZONE s.time_zone)::time >= s.quiet_start
                           AND (now() AT TIME ZONE s.time_zone)::time < s.quiet_end
                          ELSE (now() AT TIME ZONE s.time_zone)::time >= s.quiet_start
                            OR (now() AT TIME ZONE s.time_zone)::time < s.quiet_end
                     END, false),
            c.kind, c.name, su.full_name,
            CASE WHEN COALESCE(s.show_content, false) AND m.deleted_at IS NULL
                 THEN NULLIF(m.content, '') END,
            unread.n, unread.senders,
            att.kinds, att.names, unread.mentions
     FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
          AS t(user_id, conversation_id, first_seq, last_seq, sender_id)
     JOIN conversations c ON c.id = t.conversation_id
     LEFT JOIN conversation_participants p
            ON p.conversation_id = t.conversation_id AND p.user_id = t.user_id
     LEFT JOIN user_presence pr ON pr.user_id = t.user_id
     LEFT JOIN conversation_notification_prefs np
            ON np.user_id = t.user_id AND np.conversation_id = t.conversation_id
     LEFT JOIN notification_settings s ON s.user_id = t.user_id
     LEFT JOIN users su ON su.id = t.sender_id
     LEFT JOIN messages m ON m.conversation_id = t.conversation_id AND m.seq = t.last_seq
     CROSS JOIN LATERAL (
         SELECT count(*) AS n, count(DISTINCT mm.sender_id) AS senders,
                count(*) FILTER (WHERE mm.mentions @> ARRAY[t.user_id]) AS mentions
         FROM messages mm
         WHERE mm.conversation_id = t.conversation_id
           AND mm.seq > GREATEST(COALESCE(p.read_seq, 0), t.first_seq - 1)
           AND mm.seq <= t.last_seq
           AND mm.sender_id <> t.user_id
           AND mm.deleted_at IS NULL
           AND (pr.last_seen IS NULL OR pr.is_online OR mm.created_at > pr.last_seen)) unread
     LEFT JOIN LATERAL (
         -- What a message without text carries, for its notification's body.
         SELECT array_agg(a.kind ORDER BY a.position) AS kinds,
                array_agg(a.name ORDER BY a.position) AS names
         FROM attachments a
         WHERE a.message_id = m.id AND COALESCE(s.show_content, false) AND m.content = ''
           AND m.deleted_at IS NULL) att
       ON true";

/// The subscriptions of users `$1`.
const SUBSCRIPTIONS: &str = "SELECT id, user_id, endpoint, p256dh, auth
     FROM push_subscriptions WHERE user_id = ANY($1::int8[]) ORDER BY id";

/// Records that user `$1` was notified about conversation `$2` up to seq
/// `$3`. If they have read that far already (a receipt that raced the
/// send), the clear is due at once.
const RECORD_NOTIFIED: &str = "INSERT INTO push_notified AS n
         (user_id, conversation_id, seq, notified_at, clear_due_at, claim)
     VALUES ($1, $2, $3, now(),
             CASE WHEN EXISTS (SELECT 1 FROM conversation_participants p
                               WHERE p.conversation_id = $2 AND p.user_id = $1
                                 AND p.read_seq >= $3)
                  THEN now() END,
             NULL)
     ON CONFLICT (user_id, conversation_id) DO UPDATE
     SET seq = GREATEST(n.seq, EXCLUDED.seq), notified_at = now(),
         clear_due_at = EXCLUDED.clear_due_at, claim = NULL";

/// Deletes a finished job: still ours (`$3`) and nothing joined it
/// (`last_seq` still `$4`).
const DELETE_JOB: &str = "DELETE FROM push_jobs
     WHERE user_id = $1 AND conversation_id = $2 AND claim = $3 AND last_seq = $4";

/// A finished job that messages joined while it was being sent: it keeps
/// only them (after seq `$4`; `$5` messages were covered), due after the
/// coalescing delay `$6` seconds.
const KEEP_REMAINDER: &str = "UPDATE push_jobs j
     SET first_seq = $4 + 1,
         count = GREATEST(j.count - $5, 1),
         several_senders = (SELECT count(DISTINCT m.sender_id) > 1 FROM messages m
                            WHERE m.conversation_id = j.conversation_id AND m.seq > $4
                              AND m.seq <= j.last_seq AND m.sender_id <> j.user_id),
         due_at = now() + make_interval(secs => $6::float8),
         claim = NULL, attempts = 0, sent_to = '{}', updated_at = now()
     WHERE j.user_id = $1 AND j.conversation_id = $2 AND j.claim = $3 AND j.last_seq > $4";

/// Another attempt in `$4` seconds; the subscriptions `$6` accepted this
/// version (`last_seq` `$5`) and are skipped next time.
const RETRY_JOB: &str = "UPDATE push_jobs
     SET attempts = attempts + 1,
         due_at = now() + make_interval(secs => $4::float8),
         claim = NULL,
         sent_to = CASE WHEN last_seq = $5 THEN sent_to || $6::int8[] ELSE '{}' END,
         updated_at = now()
     WHERE user_id = $1 AND conversation_id = $2 AND claim = $3";

/// Leases up to `$1` due clears for `$2` seconds under claim `$3`.
const CLAIM_CLEARS: &str = "UPDATE push_notified n
     SET clear_due_at = now() + make_interval(secs => $2::float8), claim = $3
     FROM (SELECT user_id, conversation_id FROM push_notified
           WHERE clear_due_at <= now()
           ORDER BY clear_due_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED) due
     WHERE n.user_id = due.user_id AND n.conversation_id = due.conversation_id
     RETURNING n.user_id, n.conversation_id";

/// A sent clear: nothing is on the devices any more (unless a newer
/// notification replaced the row, which reset the claim).
const FINISH_CLEAR: &str = "DELETE FROM push_notified
     WHERE user_id = $1 AND conversation_id = $2 AND claim = $3";

/// Makes the parked jobs of the users `$1`, just reported offline, due now.
/// Run in the presence route's transaction, after the presence rows are
/// written, as a statement of its own (its snapshot then sees a job that
/// [`park`] committed while the presence write waited for it).
pub const WAKE_PARKED: &str = "UPDATE push_jobs SET due_at = now(), parked = false
     WHERE user_id = ANY($1::int8[]) AND parked AND claim IS NULL";

/// Parks a leased job (`$3`) until its user goes offline, looking again
/// after `$4` seconds at the latest.
const PARK_JOB: &str = "UPDATE push_jobs
     SET parked = true, due_at = now() + make_interval(secs => $4::float8),
         claim = NULL, updated_at = now()
     WHERE user_id = $1 AND conversation_id = $2 AND claim = $3";

/// Hands a leased job (`$3`) back, due now.
const RELEASE_JOB: &str = "UPDATE push_jobs SET due_at = now(), claim = NULL
     WHERE user_id = $1 AND conversation_id = $2 AND claim = $3";

/// Seconds until the next job or clear is due (NULL: nothing queued).
const NEXT_DUE: &str = "SELECT EXTRACT(EPOCH FROM LEAST(
         (SELECT min(due_at) FROM push_jobs),
         (SELECT min(clear_due_at) FROM push_notified WHERE clear_due_at IS NOT NULL)
     ) - now())::float8";

/// A leased job.
#[derive(Debug, Clone)]
pub struct Job {
    pub user_id: i64,
    pub conversation_id: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub count: i64,
    pub last_sender_id: i64,
    pub attempts: i32,
    /// Subscriptions that accepted this version already.
    pub sent_to: Vec<i64>,
}

/// What the decision reads about a job's recipient and conversation.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub participant: bool,
    pub read_seq: i64,
    pub online: bool,
    pub level: String,
    pub muted: bool,
    pub show_content: bool,
    pub quiet: bool,
    pub group: bool,
    pub group_name: Option<String>,
    pub sender_name: Option<String>,
    /// The text of `last_seq` (or what it carries, when it has none), only
    /// when the user allowed content.
    pub content: Option<String>,
    /// Unread messages from others in the job's range (not deleted), and
    /// their senders.
    pub unread: i64,
    pub unread_senders: i64,
    /// Of those, the ones that mention the user.
    pub unread_mentions: i64,
}

/// What to do with a leased job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No push; the reason (a metric label).
    Drop(&'static str),
    /// The user is online: wait until they are not.
    Park,
    Send(Box<MessageFacts>),
}

/// The send-time rules (see the module documentation).
pub fn decide(job: &Job, context: Option<&Context>) -> Decision {
    let Some(c) = context else {
        return Decision::Drop("gone");
    };
    if !c.participant {
        return Decision::Drop("not_participant");
    }
    if c.read_seq >= job.last_seq {
        return Decision::Drop("read");
    }
    // 'mentions' means "only when one of these messages mentions me".
    match c.level.as_str() {
        "all" => {}
        "mentions" if c.unread_mentions > 0 => {}
        _ => return Decision::Drop("level"),
    }
    if c.muted {
        return Decision::Drop("muted");
    }
    if c.quiet {
        return Decision::Drop("quiet_hours");
    }
    if c.online {
        return Decision::Park;
    }
    // Every unread message came while a connection was open (or was
    // deleted since).
    if c.unread == 0 {
        return Decision::Drop("seen_live");
    }
    Decision::Send(Box::new(MessageFacts {
        conversation_id: job.conversation_id,
        seq: job.last_seq,
        count: c.unread,
        group_name: c
            .group
            .then(|| c.group_name.clone().unwrap_or_else(|| "Group".to_owned())),
        sender_id: job.last_sender_id,
        sender_name: c.sender_name.clone().unwrap_or_default(),
        several_senders: c.unread_senders > 1,
        content: if c.show_content {
            c.content.clone()
        } else {
            None
        },
    }))
}

/// The delay before attempt `attempts + 1` after a failure: the base
/// doubled per earlier failure, at most [`MAX_BACKOFF`], and at least the
/// `Retry-After` a push service asked for (at most an hour).
pub fn backoff(base: Duration, attempts: i32, retry_after: Option<Duration>) -> Duration {
    let doublings = u32::try_from(attempts.clamp(0, 20)).unwrap_or(0);
    let exponential = base.saturating_mul(2u32.saturating_pow(doublings));
    let delay = exponential.min(MAX_BACKOFF);
    match retry_after {
        Some(after) => delay.max(after.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

/// A subscription as stored.
#[derive(Debug, Clone)]
struct Subscription {
    id: i64,
    endpoint: String,
    p256dh: Vec<u8>,
    auth: Vec<u8>,
}

/// Sends until `stop` turns true (or its sender goes), then returns after
/// finishing the round in flight. Does nothing when push is off.
pub async fn run(pool: Pool, push: Arc<Push>, stop: watch::Receiver<bool>) {
    let Some(vapid) = push.vapid.as_ref() else {
        return;
    };
    let queue = crate::queue::Queue {
        name: "push",
        next_due_sql: NEXT_DUE,
        next_due_query: "push_next_due",
        idle: IDLE_POLL,
        full: BATCH as usize,
    };
    crate::queue::drive(&pool, queue, &push.wake, Some(stop), || async {
        let clears = clear_round(&pool, &push, vapid).await?;
        let jobs = job_round(&pool, &push, vapid).await?;
        anyhow::Ok(clears.max(jobs))
    })
    .await;
}

/// The subscriptions of `users`, by user.
async fn subscriptions(
    client: &deadpool_postgres::Client,
    users: &[i64],
) -> anyhow::Result<HashMap<i64, Vec<Subscription>>> {
    let mut by_user: HashMap<i64, Vec<Subscription>> = HashMap::new();
    for r in client
        .query(SUBSCRIPTIONS, &[&users])
        .timed("push_subscriptions")
        .await?
    {
        by_user.entry(r.get(1)).or_default().push(Subscription {
            id: r.get(0),
            endpoint: r.get(2),
            p256dh: r.get(3),
            auth: r.get(4),
        });
    }
    Ok(by_user)
}

/// Sends `payload` to `subscription`, acting on what the push service
/// answered for the subscription itself (deleted when gone, marked when
/// delivered).
async fn send_one(
    pool: &Pool,
    push: &Push,
    vapid: &Vapid,
    subscription: &Subscription,
    request: PushRequest<'_>,
    kind: &'static str,
) -> Outcome {
    let outcome = match (
        push.rule.check(&subscription.endpoint),
        Keys::from_bytes(&subscription.p256dh, &subscription.auth),
    ) {
        (Ok(url), Ok(keys)) => webpush::send(&push.client, vapid, &url, &keys, request).await,
        (Err(why), _) => {
            // Allowed when registered, not any more (the allowlist shrank).
            tracing::warn!(
                subscription = subscription.id,
                why,
                "push endpoint no longer allowed; skipped"
            );
            Outcome::Refused { status: 0 }
        }
        (_, Err(why)) => {
            tracing::warn!(
                subscription = subscription.id,
                why,
                "stored push keys unusable; skipped"
            );
            Outcome::Refused { status: 0 }
        }
    };
    metrics::counter!("push_requests_total", "kind" => kind, "outcome" => outcome.label())
        .increment(1);
    let update = async {
        let client = pool.get().await?;
        match outcome {
            Outcome::Delivered => {
                client
                    .execute(
                        "UPDATE push_subscriptions SET last_success_at = now() WHERE id = $1",
                        &[&subscription.id],
                    )
                    .timed("push_subscription_delivered")
                    .await?;
            }
            Outcome::Gone => {
                client
                    .execute(
                        "DELETE FROM push_subscriptions WHERE id = $1",
                        &[&subscription.id],
                    )
                    .timed("push_subscription_gone")
                    .await?;
                tracing::info!(
                    subscription = subscription.id,
                    "push subscription gone; deleted"
                );
            }
            Outcome::Refused { status } if status != 0 => {
                tracing::warn!(
                    subscription = subscription.id,
                    status,
                    "push service refused a push; skipped"
                );
            }
            _ => {}
        }
        anyhow::Ok(())
    };
    if let Err(e) = update.await {
        tracing::warn!(error = %crate::error::Chain(e.as_ref()), "push subscription not updated");
    }
    outcome
}

/// Leases due clears and sends them; the number leased.
async fn clear_round(pool: &Pool, push: &Push, vapid: &Vapid) -> anyhow::Result<usize> {
    let token = Uuid::now_v7();
    let client = pool.get().await?;
    let rows = client
        .query(CLAIM_CLEARS, &[&BATCH, &LEASE.as_secs_f64(), &token])
        .timed("push_claim_clears")
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let clears: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let users: Vec<i64> = clears.iter().map(|c| c.0).collect();
    let subs = subscriptions(&client, &users).await?;
    drop(client);
    futures::stream::iter(&clears)
        .for_each_concurrent(CONCURRENCY, |&(user_id, conversation_id)| {
            let subs = subs.get(&user_id).map(Vec::as_slice).unwrap_or_default();
            async move {
                let payload = payload::clear_json(conversation_id);
                let topic = payload::topic(conversation_id);
                let request = PushRequest {
                    payload: &payload,
                    ttl: push.config.ttl,
                    urgency: Urgency::Low,
                    topic: &topic,
                };
                // Best effort: one attempt per subscription.
                futures::future::join_all(
                    subs.iter()
                        .map(|s| send_one(pool, push, vapid, s, request, "clear")),
                )
                .await;
                let finished = async {
                    pool.get()
                        .await?
                        .execute(FINISH_CLEAR, &[&user_id, &conversation_id, &token])
                        .timed("push_finish_clear").await?;
                    anyhow::Ok(())
                };
                if let Err(e) = finished.await {
                    tracing::warn!(error = %crate::error::Chain(e.as_ref()), conversation_id, "clear not recorded; it may repeat");
                }
            }
        })
        .await;
    Ok(clears.len())
}

/// Leases due jobs, decides and sends; the number leased.
async fn job_round(pool: &Pool, push: &Push, vapid: &Vapid) -> anyhow::Result<usize> {
    let token = Uuid::now_v7();
    let client = pool.get().await?;
    let rows = client
        .query(CLAIM_JOBS, &[&BATCH, &LEASE.as_secs_f64(), &token])
        .timed("push_claim_jobs")
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let jobs: Vec<Job> = rows
        .iter()
        .map(|r| Job {
            user_id: r.get(0),
            conversation_id: r.get(1),
            first_seq: r.get(2),
            last_seq: r.get(3),
            count: r.get(4),
            last_sender_id: r.get(5),
            attempts: r.get(6),
            sent_to: r.get(7),
        })
        .collect();
    let contexts = contexts(&client, &jobs).await?;
    let users: Vec<i64> = jobs.iter().map(|j| j.user_id).collect();
    let subs = subscriptions(&client, &users).await?;
    drop(client);
    futures::stream::iter(&jobs)
        .for_each_concurrent(CONCURRENCY, |job| {
            let context = contexts.get(&(job.user_id, job.conversation_id));
            let subs = subs.get(&job.user_id).map(Vec::as_slice).unwrap_or_default();
            async move {
                if let Err(e) = handle_job(pool, push, vapid, token, job, context, subs).await {
                    // The lease runs out and the job is taken again.
                    tracing::warn!(error = %crate::error::Chain(e.as_ref()), conversation_id = job.conversation_id, "push job not finished; it will be retried");
                }
            }
        })
        .await;
    Ok(jobs.len())
}

/// [`JOB_CONTEXT`] for `jobs`, by (user, conversation).
/// "📷 Photo", "📎 3 attachments": the body of a notification for a
/// message without text (when the user shows content at all).
fn attachments_text(kinds: &[String], names: &[Option<String>]) -> Option<String> {
    let text = crate::store::attachments_summary(kinds, names);
    (!text.is_empty()).then_some(text)
}

async fn contexts(
    client: &deadpool_postgres::Client,
    jobs: &[Job],
) -> anyhow::Result<HashMap<(i64, i64), Context>> {
    let column = |f: fn(&Job) -> i64| jobs.iter().map(f).collect::<Vec<i64>>();
    let (users, convs, firsts, lasts, senders) = (
        column(|j| j.user_id),
        column(|j| j.conversation_id),
        column(|j| j.first_seq),
        column(|j| j.last_seq),
        column(|j| j.last_sender_id),
    );
    let rows = client
        .query(JOB_CONTEXT, &[&users, &convs, &firsts, &lasts, &senders])
        .timed("push_job_context")
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let kind: String = r.get(9);
            (
                (r.get(0), r.get(1)),
                Context {
                    participant: r.get(2),
                    read_seq: r.get(3),
                    online: r.get(4),
                    level: r.get(5),
                    muted: r.get(6),
                    show_content: r.get(7),
                    quiet: r.get(8),
                    group: kind == "group",
                    group_name: r.get(10),
                    sender_name: r.get(11),
                    content: r.get::<_, Option<String>>(12).or_else(|| {
                        let kinds: Option<Vec<String>> = r.get(15);
                        let names: Option<Vec<Option<String>>> = r.get(16);
                        attachments_text(&kinds.unwrap_or_default(), &names.unwrap_or_default())
                    }),
                    unread: r.get(13),
                    unread_senders: r.get(14),
                    unread_mentions: r.get(17),
                },
            )
        })
        .collect())
}

/// One leased job: decide, send, then finish it in one transaction.
async fn handle_job(
    pool: &Pool,
    push: &Push,
    vapid: &Vapid,
    token: Uuid,
    job: &Job,
    context: Option<&Context>,
    subs: &[Subscription],
) -> anyhow::Result<()> {
    // Nowhere to send it: nothing to decide (and nothing to park while the
    // user is online).
    if subs.is_empty() {
        metrics::counter!("push_jobs_total", "result" => "no_subscription").increment(1);
        return finish(pool, push, token, job, !job.sent_to.is_empty()).await;
    }
    let facts = match decide(job, context) {
        Decision::Drop(reason) => {
            metrics::counter!("push_jobs_total", "result" => reason).increment(1);
            tracing::debug!(
                conversation_id = job.conversation_id,
                reason,
                "push job dropped"
            );
            return finish(pool, push, token, job, false).await;
        }
        Decision::Park => {
            metrics::counter!("push_jobs_total", "result" => "parked").increment(1);
            return park(pool, token, job).await;
        }
        Decision::Send(facts) => facts,
    };
    let targets: Vec<&Subscription> = subs
        .iter()
        .filter(|s| !job.sent_to.contains(&s.id))
        .collect();
    let already_notified = !job.sent_to.is_empty();
    if targets.is_empty() {
        let reason = if already_notified {
            "sent"
        } else {
            "no_subscription"
        };
        metrics::counter!("push_jobs_total", "result" => reason).increment(1);
        return finish(pool, push, token, job, already_notified).await;
    }
    let payload = facts.to_json();
    let topic = payload::topic(job.conversation_id);
    let request = PushRequest {
        payload: &payload,
        ttl: push.config.ttl,
        urgency: Urgency::Normal,
        topic: &topic,
    };
    let outcomes = futures::future::join_all(
        targets
            .iter()
            .map(|s| send_one(pool, push, vapid, s, request, "message")),
    )
    .await;
    let delivered: Vec<i64> = targets
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| **o == Outcome::Delivered)
        .map(|(s, _)| s.id)
        .collect();
    let retry_after = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Retry { after } => Some(*after),
            _ => None,
        })
        .reduce(|a, b| a.max(b));
    let notified = already_notified || !delivered.is_empty();
    match retry_after {
        Some(after) if job.attempts.saturating_add(1) < push.config.max_attempts as i32 => {
            let delay = backoff(push.config.retry_base, job.attempts, after);
            metrics::counter!("push_jobs_total", "result" => "retry").increment(1);
            tracing::debug!(
                conversation_id = job.conversation_id,
                attempts = job.attempts + 1,
                delay_ms = delay.as_millis() as u64,
                "push job retried later"
            );
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            if !delivered.is_empty() {
                tx.execute(
                    RECORD_NOTIFIED,
                    &[&job.user_id, &job.conversation_id, &job.last_seq],
                )
                .timed("push_record_notified")
                .await?;
            }
            tx.execute(
                RETRY_JOB,
                &[
                    &job.user_id,
                    &job.conversation_id,
                    &token,
                    &delay.as_secs_f64(),
                    &job.last_seq,
                    &delivered,
                ],
            )
            .timed("push_retry_job")
            .await?;
            tx.commit().await?;
            Ok(())
        }
        Some(_) => {
            metrics::counter!("push_jobs_total", "result" => "gave_up").increment(1);
            tracing::warn!(
                conversation_id = job.conversation_id,
                attempts = job.attempts + 1,
                "push job dropped after its last attempt"
            );
            finish(pool, push, token, job, notified).await
        }
        None => {
            let result = if notified { "sent" } else { "refused" };
            metrics::counter!("push_jobs_total", "result" => result).increment(1);
            finish(pool, push, token, job, notified).await
        }
    }
}

/// Parks a job whose user is online, unless they went offline since the
/// decision. The presence row is read `FOR SHARE`: a concurrent presence
/// write waits for this transaction (and then wakes what it parked), or
/// this one waits for it (and then sees the user offline).
async fn park(pool: &Pool, token: Uuid, job: &Job) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let online = tx
        .query_opt(
            "SELECT is_online FROM user_presence WHERE user_id = $1 FOR SHARE",
            &[&job.user_id],
        )
        .timed("push_presence_for_park")
        .await?
        .is_some_and(|r| r.get(0));
    if online {
        tx.execute(
            PARK_JOB,
            &[
                &job.user_id,
                &job.conversation_id,
                &token,
                &PARK_RECHECK.as_secs_f64(),
            ],
        )
        .timed("push_park_job")
        .await?;
    } else {
        tx.execute(RELEASE_JOB, &[&job.user_id, &job.conversation_id, &token])
            .timed("push_release_job")
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Ends a job in one transaction: the notified seq recorded (when a push
/// went out), then the job deleted, or reduced to the messages that joined
/// it meanwhile. `push_notified` before `push_jobs`, the order the ingest
/// locks them in, so the two cannot deadlock.
async fn finish(
    pool: &Pool,
    push: &Push,
    token: Uuid,
    job: &Job,
    notified: bool,
) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if notified {
        tx.execute(
            RECORD_NOTIFIED,
            &[&job.user_id, &job.conversation_id, &job.last_seq],
        )
        .timed("push_record_notified")
        .await?;
    }
    let deleted = tx
        .execute(
            DELETE_JOB,
            &[&job.user_id, &job.conversation_id, &token, &job.last_seq],
        )
        .timed("push_delete_job")
        .await?;
    if deleted == 0 {
        tx.execute(
            KEEP_REMAINDER,
            &[
                &job.user_id,
                &job.conversation_id,
                &token,
                &job.last_seq,
                &job.count,
                &push.config.coalesce.as_secs_f64(),
            ],
        )
        .timed("push_keep_remainder")
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            user_id: 1,
            conversation_id: 7,
            first_seq: 40,
            last_seq: 42,
            count: 3,
            last_sender_id: 2,
            attempts: 0,
            sent_to: Vec::new(),
        }
    }

    fn context() -> Context {
        Context {
            participant: true,
            read_seq: 39,
            level: "all".to_owned(),
            sender_name: Some("Sam Patel".to_owned()),
            content: Some("secret".to_owned()),
            unread: 3,
            unread_senders: 1,
            ..Context::default()
        }
    }

    #[test]
    fn an_offline_participant_who_allows_it_is_sent_the_unread_count() {
        let Decision::Send(facts) = decide(&job(), Some(&context())) else {
            panic!("not sent");
        };
        assert_eq!(facts.count, 3);
        assert_eq!(facts.seq, 42);
        assert_eq!(facts.sender_name, "Sam Patel");
        assert!(!facts.several_senders);
        assert_eq!(facts.group_name, None);
        // Content only when allowed.
        assert_eq!(facts.content, None);
        let c = Context {
            show_content: true,
            group: true,
            group_name: Some("Runners".to_owned()),
            unread: 2,
            unread_senders: 2,
            ..context()
        };
        let Decision::Send(facts) = decide(&job(), Some(&c)) else {
            panic!("not sent");
        };
        assert_eq!(facts.content.as_deref(), Some("secret"));
        assert_eq!(facts.group_name.as_deref(), Some("Runners"));
        assert_eq!(facts.count, 2);
        assert!(facts.several_senders);
    }

    #[test]
    fn every_reason_not_to_notify_drops_the_job() {
        let cases: [(Context, &str); 8] = [
            (
                Context {
                    participant: false,
                    ..context()
                },
                "not_participant",
            ),
            (
                Context {
                    read_seq: 42,
                    ..context()
                },
                "read",
            ),
            (
                Context {
                    unread: 0,
                    ..context()
                },
                "seen_live",
            ),
            (
                Context {
                    level: "none".to_owned(),
                    ..context()
                },
                "level",
            ),
            (
                Context {
                    level: "mentions".to_owned(),
                    ..context()
                },
                "level",
            ),
            (
                Context {
                    muted: true,
                    ..context()
                },
                "muted",
            ),
            (
                Context {
                    quiet: true,
                    ..context()
                },
                "quiet_hours",
            ),
            (
                Context {
                    read_seq: 100,
                    online: true,
                    ..context()
                },
                "read",
            ),
        ];
        for (c, reason) in cases {
            assert_eq!(decide(&job(), Some(&c)), Decision::Drop(reason), "{c:?}");
        }
        assert_eq!(decide(&job(), None), Decision::Drop("gone"));
        // Online and nothing else against it: wait until offline.
        let online = Context {
            online: true,
            ..context()
        };
        assert_eq!(decide(&job(), Some(&online)), Decision::Park);
        let muted = Context {
            muted: true,
            ..online
        };
        assert_eq!(decide(&job(), Some(&muted)), Decision::Drop("muted"));
    }

    #[test]
    fn the_level_mentions_notifies_only_of_a_job_that_mentions_the_user() {
        let mentions = Context {
            level: "mentions".to_owned(),
            ..context()
        };
        assert_eq!(decide(&job(), Some(&mentions)), Decision::Drop("level"));
        let mentioned = Context {
            unread_mentions: 1,
            ..mentions
        };
        let Decision::Send(facts) = decide(&job(), Some(&mentioned)) else {
            panic!("not sent");
        };
        // The notification still covers every unread message of the job.
        assert_eq!(facts.count, 3);
        // 'none' stays none, mentioned or not.
        let none = Context {
            level: "none".to_owned(),
            ..mentioned
        };
        assert_eq!(decide(&job(), Some(&none)), Decision::Drop("level"));
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes_and_honours_retry_after() {
        let base = Duration::from_secs(1);
        assert_eq!(backoff(base, 0, None), Duration::from_secs(1));
        assert_eq!(backoff(base, 1, None), Duration::from_secs(2));
        assert_eq!(backoff(base, 4, None), Duration::from_secs(16));
        assert_eq!(backoff(base, 30, None), MAX_BACKOFF);
        assert_eq!(
            backoff(base, 0, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            backoff(base, 3, Some(Duration::from_secs(1))),
            Duration::from_secs(8)
        );
        assert_eq!(
            backoff(base, 0, Some(Duration::from_secs(86_400))),
            Duration::from_secs(3600)
        );
    }
}
