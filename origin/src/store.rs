//! Queries shared by several routes.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use shared::protocol::{MessageView, ReactionView, ReplyPreview, preview_text};
use shared::receipts::{Watermark, status_of};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::metrics::Timed;

/// What a participant may know about a conversation before reading it.
#[derive(Debug, Clone)]
pub struct Access {
    pub kind: String,
    pub created_by: i64,
    pub last_seq: i64,
    /// Bumped with every change to the member list (a trigger does it).
    pub members_version: i64,
    pub members: Vec<Watermark>,
}

/// The conversation `conversation_id` as `user_id` may see it: 404 when it
/// does not exist, 403 when the user is not a participant.
pub async fn conversation_access(
    client: &impl GenericClient,
    conversation_id: i64,
    user_id: i64,
) -> ApiResult<Access> {
    let access = conversation_members(client, conversation_id).await?;
    if !access.members.iter().any(|m| m.user_id == user_id) {
        return Err(ApiError::Forbidden(
            "you are not a participant of this conversation",
        ));
    }
    Ok(access)
}

/// A conversation and its members' watermarks; 404 when it does not exist.
pub async fn conversation_members(
    client: &impl GenericClient,
    conversation_id: i64,
) -> ApiResult<Access> {
    let stmt = client
        .prepare_cached(
            "SELECT c.kind, c.created_by, c.last_seq, p.user_id, p.delivered_seq, p.read_seq,
                    c.members_version
             FROM conversations c
             LEFT JOIN conversation_participants p ON p.conversation_id = c.id
             WHERE c.id = $1
             ORDER BY p.user_id",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&conversation_id])
        .timed("conversation_members")
        .await?;
    let first = rows.first().ok_or(ApiError::NotFound("conversation"))?;
    let members = rows
        .iter()
        .filter_map(|r| {
            r.get::<_, Option<i64>>(3).map(|user_id| Watermark {
                user_id,
                delivered_seq: r.get(4),
                read_seq: r.get(5),
            })
        })
        .collect();
    Ok(Access {
        kind: first.get(0),
        created_by: first.get(1),
        last_seq: first.get(2),
        members_version: first.get(6),
        members,
    })
}

/// Columns every message query selects, in the order [`message_view`] reads.
pub const MESSAGE_COLUMNS: &str = "id, seq, conversation_id, sender_id, content, created_at, \
     client_msg_id, edited_at, deleted_at, reply_to, mentions";

/// Message rows (selected with [`MESSAGE_COLUMNS`]) as views in their
/// current state, each with its status, its attachments (signed now), its
/// reactions as `viewer` sees them (`me`) and the quote of the message it
/// answers. A bounded number of queries for the whole page, whatever its
/// size: one each for attachments, reactions and quotes (each skipped when
/// nothing on the page needs it).
pub async fn message_views(
    client: &impl GenericClient,
    rows: &[Row],
    members: &[Watermark],
    media: &crate::media::Media,
    viewer: Option<i64>,
) -> ApiResult<Vec<MessageView>> {
    // A deleted message carries nothing but its tombstone.
    let live: Vec<&Row> = rows
        .iter()
        .filter(|r| r.get::<_, Option<DateTime<Utc>>>(8).is_none())
        .collect();
    let ids: Vec<Uuid> = live.iter().map(|r| r.get(0)).collect();
    let mut attachments = crate::media::attachments_of(client, &ids).await?;
    let mut reactions = reactions_of(client, &live, viewer).await?;
    let quotes = replies_of(client, &live).await?;
    let now = crate::auth::now_unix();
    Ok(rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let mut view = message_view(r, members);
            if view.deleted_at.is_none() {
                view.attachments = attachments
                    .remove(&id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|meta| media.signer.view(meta, now))
                    .collect();
                view.reactions = reactions.remove(&id).unwrap_or_default();
                view.reply_to = r
                    .get::<_, Option<Uuid>>(9)
                    .and_then(|target| quotes.get(&target).cloned());
            }
            view
        })
        .collect())
}

/// A message row (selected with [`MESSAGE_COLUMNS`]) with its status, its
/// edit and deletion times and its mentions; a deleted one as a tombstone.
/// Attachments, reactions and the quote come from [`message_views`].
pub fn message_view(row: &Row, members: &[Watermark]) -> MessageView {
    let seq: i64 = row.get(1);
    let sender_id: i64 = row.get(3);
    let deleted_at: Option<DateTime<Utc>> = row.get(8);
    let deleted = deleted_at.is_some();
    MessageView {
        id: row.get(0),
        seq,
        conversation_id: row.get(2),
        sender_id,
        content: if deleted { String::new() } else { row.get(4) },
        status: status_of(seq, sender_id, members),
        created_at: row.get(5),
        client_msg_id: row.get(6),
        attachments: Vec::new(),
        edited_at: if deleted { None } else { row.get(7) },
        deleted_at,
        reactions: Vec::new(),
        reply_to: None,
        mentions: if deleted { Vec::new() } else { row.get(10) },
    }
}

/// The reactions of the messages in `rows` (not deleted), per message, as
/// `viewer` sees them: one query, the `react` events of those messages in
/// seq order (`message_events_target_idx`), folded by [`fold_reactions`].
async fn reactions_of(
    client: &impl GenericClient,
    rows: &[&Row],
    viewer: Option<i64>,
) -> ApiResult<HashMap<Uuid, Vec<ReactionView>>> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let conversation_of: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get(0), r.get(2))).collect();
    let ids: Vec<Uuid> = conversation_of.keys().copied().collect();
    let stmt = client
        .prepare_cached(
            "SELECT target_id, conversation_id, actor_id, emoji, \"on\" FROM message_events
             WHERE target_id = ANY($1::uuid[]) AND kind = 'react'
             ORDER BY target_id, seq",
        )
        .await?;
    let events = client
        .query(&stmt, &[&ids])
        .timed("message_reactions")
        .await?;
    let mut per_message: HashMap<Uuid, Vec<(i64, &str, bool)>> = HashMap::new();
    for e in &events {
        let target: Uuid = e.get(0);
        // A reaction belongs to the message's own conversation.
        if conversation_of.get(&target) != Some(&e.get::<_, i64>(1)) {
            continue;
        }
        per_message
            .entry(target)
            .or_default()
            .push((e.get(2), e.get(3), e.get(4)));
    }
    Ok(per_message
        .into_iter()
        .map(|(id, events)| (id, fold_reactions(events, viewer)))
        .filter(|(_, views)| !views.is_empty())
        .collect())
}

/// A message's reactions from its `react` events in seq order: `(actor,
/// emoji, on)`. The same rules as the room's: an emoji is listed from the
/// moment someone adds it while nobody holds it (so "in the order first
/// used", counting again after everyone took it back), its users in the
/// order they added it; adding twice or taking back what one does not hold
/// changes nothing.
pub fn fold_reactions<'a>(
    events: impl IntoIterator<Item = (i64, &'a str, bool)>,
    viewer: Option<i64>,
) -> Vec<ReactionView> {
    let mut state: Vec<(&str, Vec<i64>)> = Vec::new();
    for (actor, emoji, on) in events {
        let at = state.iter().position(|(e, _)| *e == emoji);
        match (at, on) {
            (Some(i), true) => {
                if !state[i].1.contains(&actor) {
                    state[i].1.push(actor);
                }
            }
            (Some(i), false) => {
                state[i].1.retain(|u| *u != actor);
                if state[i].1.is_empty() {
                    state.remove(i);
                }
            }
            (None, true) => state.push((emoji, vec![actor])),
            (None, false) => {}
        }
    }
    state
        .into_iter()
        .map(|(emoji, users)| ReactionView {
            emoji: emoji.to_owned(),
            count: users.len() as i64,
            me: viewer.is_some_and(|v| users.contains(&v)),
            user_ids: users,
        })
        .collect()
}

/// The quotes of the messages in `rows` that answer another (not deleted
/// themselves), by the quoted message's id: one query, by primary key,
/// read now (never a copy). A quoted message of another conversation is
/// never shown; one not stored yet (its batch commits later) has no quote
/// until it is. A message of attachments alone is quoted by what it
/// carries ("📷 Photo"), like the conversation list.
async fn replies_of(
    client: &impl GenericClient,
    rows: &[&Row],
) -> ApiResult<HashMap<Uuid, ReplyPreview>> {
    let wanted: HashMap<Uuid, i64> = rows
        .iter()
        .filter_map(|r| r.get::<_, Option<Uuid>>(9).map(|t| (t, r.get::<_, i64>(2))))
        .collect();
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Uuid> = wanted.keys().copied().collect();
    let stmt = client
        .prepare_cached(
            "SELECT m.id, m.conversation_id, m.seq, m.sender_id, left(m.content, 200),
                    m.deleted_at IS NOT NULL, att.kinds, att.names
             FROM messages m
             LEFT JOIN LATERAL (
                 SELECT array_agg(a.kind ORDER BY a.position) AS kinds,
                        array_agg(a.name ORDER BY a.position) AS names
                 FROM attachments a
                 WHERE a.message_id = m.id AND m.content = '' AND m.deleted_at IS NULL) att
               ON true
             WHERE m.id = ANY($1::uuid[])",
        )
        .await?;
    let mut out = HashMap::new();
    for r in client.query(&stmt, &[&ids]).timed("message_quotes").await? {
        let id: Uuid = r.get(0);
        if wanted.get(&id) != Some(&r.get::<_, i64>(1)) {
            continue;
        }
        let deleted: bool = r.get(5);
        let text: &str = r.get(4);
        let content = if deleted {
            String::new()
        } else if text.trim().is_empty() {
            let kinds: Option<Vec<String>> = r.get(6);
            let names: Option<Vec<Option<String>>> = r.get(7);
            attachments_summary(&kinds.unwrap_or_default(), &names.unwrap_or_default())
        } else {
            preview_text(text)
        };
        out.insert(
            id,
            ReplyPreview {
                id,
                seq: r.get(2),
                sender_id: r.get(3),
                content,
                deleted,
            },
        );
    }
    Ok(out)
}

/// "📷 Photo", "📎 3 attachments": what a message without text carries, from
/// its attachments' kinds and names as a query reads them.
pub fn attachments_summary(kinds: &[String], names: &[Option<String>]) -> String {
    let items: Vec<(shared::media::MediaKind, Option<&str>)> = kinds
        .iter()
        .enumerate()
        .filter_map(|(i, k)| {
            let name = names.get(i).and_then(|n| n.as_deref());
            shared::media::MediaKind::parse(k).map(|k| (k, name))
        })
        .collect();
    shared::room::summarize_attachments(&items)
}

/// The ids in `ids` that are not users.
pub async fn unknown_users(client: &impl GenericClient, ids: &[i64]) -> ApiResult<Vec<i64>> {
    let rows = client
        .query("SELECT id FROM users WHERE id = ANY($1)", &[&ids])
        .timed("unknown_users")
        .await?;
    let known: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(ids
        .iter()
        .copied()
        .filter(|id| !known.contains(id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(emoji: &str, users: &[i64], me: bool) -> ReactionView {
        ReactionView {
            emoji: emoji.to_owned(),
            count: users.len() as i64,
            me,
            user_ids: users.to_vec(),
        }
    }

    #[test]
    fn reactions_fold_in_order_of_first_use_per_emoji_with_their_users_in_order() {
        let events = [
            (1, "👍", true),
            (2, "❤️", true),
            (2, "👍", true),
            // Adding twice, or taking back what one does not hold, changes
            // nothing.
            (1, "👍", true),
            (3, "🔥", false),
            (1, "👍", false),
            (3, "👍", true),
        ];
        assert_eq!(
            fold_reactions(events, Some(2)),
            vec![view("👍", &[2, 3], true), view("❤️", &[2], true)]
        );
        assert_eq!(
            fold_reactions(events, None),
            vec![view("👍", &[2, 3], false), view("❤️", &[2], false)]
        );
    }

    #[test]
    fn an_emoji_everyone_took_back_counts_as_new_when_used_again() {
        let events = [
            (1, "👍", true),
            (1, "❤️", true),
            (1, "👍", false),
            (2, "👍", true),
        ];
        assert_eq!(
            fold_reactions(events, Some(1)),
            vec![view("❤️", &[1], true), view("👍", &[2], false)]
        );
        assert!(fold_reactions([(1, "👍", true), (1, "👍", false)], Some(1)).is_empty());
    }

    #[test]
    fn a_message_without_text_is_summarised_by_what_it_carries() {
        assert_eq!(
            attachments_summary(&["image".to_owned()], &[None]),
            "📷 Photo"
        );
        assert_eq!(
            attachments_summary(&["file".to_owned()], &[Some("plan.pdf".to_owned())]),
            "📄 plan.pdf"
        );
        assert_eq!(attachments_summary(&[], &[]), "");
    }
}
