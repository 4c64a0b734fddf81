-- The message lifecycle (issue 15): edits, deletes, reactions, replies and
-- mentions.
--
-- The edge's room gives every change to a message (an edit, a delete, a
-- reaction) the conversation's next seq, in one order with the messages,
-- and flushes it through the same ingest (POST /internal/v1/messages/batch)
-- as a StoredMessage with `change`. The origin keeps:
--
-- - each message's *current* state in its own row (the content after its
--   latest edit, or a tombstone after its deletion), so history still reads
--   one row per message and never replays events;
-- - the events themselves in message_events: reactions are read from them
--   (the latest `react` per target, actor and emoji), and they let the
--   ingest be idempotent and end in the right state when batches commit out
--   of order (the edge has up to 4 flushes in flight, so an event can reach
--   PostgreSQL before the message it changes; the ingest then applies it
--   when the message arrives).
--
-- One ALTER TABLE: the columns are added with constant defaults (no table
-- rewrite), and the new checks are validated in one scan of the table
-- (cheap next to 0008's rewrite; validated, so the catalog states them
-- like any other constraint).

ALTER TABLE messages
    -- When the sender last edited it: the created_at of the edit event
    -- that set `content`. NULL when never edited, and again once deleted.
    ADD COLUMN edited_at TIMESTAMPTZ,
    -- When it was deleted. A deleted message is a tombstone: content '',
    -- no mentions, no reply_to, its attachments' rows and its reactions
    -- gone, and the content of its edit events erased too.
    ADD COLUMN deleted_at TIMESTAMPTZ,
    -- The seq of the edit event that set `content` (0: the original text).
    -- An edit applies only over an older one (edit_seq < its seq), so
    -- edits that commit out of order end with the latest one by seq.
    ADD COLUMN edit_seq BIGINT NOT NULL DEFAULT 0,
    -- The message this one answers, in the same conversation. No foreign
    -- key: the target may be in a batch that commits later. The quote is
    -- read from the target when shown, never copied, so deleting the
    -- target hides it everywhere.
    ADD COLUMN reply_to UUID,
    -- Users the message mentions (members when sent; the room checks).
    ADD COLUMN mentions BIGINT[] NOT NULL DEFAULT '{}',
    -- 0006 already allows content '' (a message of attachments alone); a
    -- deleted message must have exactly that, and nothing it mentioned or
    -- quoted: erasure is a property of the row, not only of the code.
    ADD CONSTRAINT messages_tombstone_check
        CHECK (deleted_at IS NULL OR (content = '' AND mentions = '{}' AND reply_to IS NULL)),
    -- The room keeps at most 50 mentions per message.
    ADD CONSTRAINT messages_mentions_check CHECK (cardinality(mentions) <= 50),
    ADD CONSTRAINT messages_edit_seq_check CHECK (edit_seq >= 0);

-- Unread mentions (the conversation list's unread_mentions): only the
-- messages that mention anyone are indexed, so counting a member's
-- mentions after their read seq reads those messages alone, not the whole
-- unread backlog. A deleted message mentions nobody, so it leaves the
-- index's scope.
CREATE INDEX messages_mentions_idx ON messages (conversation_id, seq)
    WHERE mentions <> '{}';

-- Changes to messages, as the room sequenced them. One row per event; the
-- row is the event's, the change applies to `target_id`.
CREATE TABLE message_events (
    -- The event's id (UUIDv7, minted by the room), like a message's.
    id              UUID PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- The event's seq: one order with the conversation's messages (the
    -- ingest refuses an event at a seq a message holds, and the reverse).
    seq             BIGINT NOT NULL CHECK (seq >= 1),
    -- Who made the change: the sender for an edit, the sender or a
    -- moderator for a delete, any member for a reaction.
    actor_id        BIGINT NOT NULL REFERENCES users (id),
    -- The actor's idempotency key (the same key space as messages').
    client_msg_id   TEXT NOT NULL CHECK (length(client_msg_id) BETWEEN 1 AND 64),
    -- The changed message. No foreign key: the event may commit before
    -- its message does (batches commit out of order).
    target_id       UUID NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('edit', 'delete', 'react')),
    -- An edit's new text; set to NULL when the target is deleted (erased
    -- with the message, since it is a copy of the message's content).
    content         TEXT CHECK (content IS NULL OR length(content) BETWEEN 1 AND 4000),
    -- A reaction's emoji and whether it is added (true) or taken back.
    emoji           TEXT CHECK (emoji IS NULL OR octet_length(emoji) BETWEEN 1 AND 64),
    "on"            BOOLEAN,
    -- When the room accepted it (the edge's clock): an edit's edited_at, a
    -- delete's deleted_at.
    created_at      TIMESTAMPTZ NOT NULL,
    -- One event per seq of a conversation. The columns are in the order
    -- (seq, conversation_id) on purpose: the ingest asks "does an event
    -- hold this seq?" for every message it stores, and compares
    -- (seq, conversation_id) as a row, which only an index that starts
    -- with seq can serve; no other index here has seq (or starts with it),
    -- so that probe has exactly one plan whatever the statistics say (in
    -- (conversation_id, seq) order, the idempotency index's leading
    -- conversation_id could serve it too, and on a table ANALYZE saw empty
    -- the planner picked that and read every event of the conversation).
    CONSTRAINT message_events_seq_unique UNIQUE (seq, conversation_id),
    -- Idempotent changes: one event per actor and key.
    CONSTRAINT message_events_idempotency_unique UNIQUE (conversation_id, actor_id, client_msg_id),
    CONSTRAINT message_events_shape CHECK (
        (kind = 'edit' AND emoji IS NULL AND "on" IS NULL)
     OR (kind = 'delete' AND content IS NULL AND emoji IS NULL AND "on" IS NULL)
     OR (kind = 'react' AND content IS NULL AND emoji IS NOT NULL AND "on" IS NOT NULL)
    )
);
-- A message's events: its reactions at read time, the catch-up when a
-- message arrives after its events (one probe per new message, which finds
-- nothing almost always), and the erasure of its edits' content and its
-- reactions on delete. By target_id alone, not (target_id, seq): a
-- message's events are few and sorted in memory, and a seq column here
-- would let this index serve the seq probe above (a qual on a non-leading
-- column) as another plan for it.
CREATE INDEX message_events_target_idx ON message_events (target_id);
-- The foreign key to users (deleting a user must not scan this table).
CREATE INDEX message_events_actor_id_idx ON message_events (actor_id);
