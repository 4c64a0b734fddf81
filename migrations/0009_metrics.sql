-- The figures /metrics reads from PostgreSQL at scrape time (cached; see
-- origin/src/metrics.rs), kept bounded by activity rather than by the size
-- of the tables.

-- chat_active_conversations: the conversations of the messages created in
-- the last five minutes. The ingest appends messages roughly in created_at
-- order (the edge's ack time, flushed within seconds), so a BRIN index
-- narrows the read to the newest block ranges. It costs the ingest next to
-- nothing (a summary per 32 pages, no entry per row), unlike a B-tree on a
-- column every message fills. autosummarize: a filled range is summarised
-- without waiting for VACUUM (an unsummarised range is always read).
CREATE INDEX messages_created_at_brin ON messages USING brin (created_at)
    WITH (pages_per_range = 32, autosummarize = on);

-- chat_online_users: the users online, as the edge reports presence. Only
-- their rows are in the index, and only a change of is_online (a connect
-- or a disconnect, not a heartbeat's last_seen) touches it.
CREATE INDEX user_presence_online_idx ON user_presence (user_id) WHERE is_online;
