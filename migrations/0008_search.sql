-- Message search (issue 15): PostgreSQL full-text search, no second system.
--
-- search_vector is computed by PostgreSQL from content in the statement
-- that writes content: the ingest's insert, an edit's update (searchable
-- by its new words at once, no longer by its old ones) and a delete's
-- tombstone (content '' gives an empty vector, which matches nothing; the
-- search also filters deleted_at IS NULL). No trigger, no backfill job, no
-- code path that could forget it.
--
-- 'english': Snowball stemming ("deadlifts" finds "deadlift") and English
-- stop words dropped. Other languages are matched word for word (no
-- stemming of their own, and a word that is an English stop word cannot be
-- searched). The configuration is named, not taken from
-- default_text_search_config: a generated column needs an immutable
-- expression, and the query side (origin/src/search.rs) must use the same
-- one. docs/ARCHITECTURE.md, "Search", has the trade-offs.
--
-- Adding a stored generated column rewrites the table under an exclusive
-- lock: about 10 s per million messages on the development machine, plus
-- about 3 s to build the index. A much larger table would instead get a
-- plain column filled by a trigger, a batched backfill, and CREATE INDEX
-- CONCURRENTLY outside a migration transaction.

ALTER TABLE messages
    ADD COLUMN search_vector tsvector
        GENERATED ALWAYS AS (to_tsvector('english'::regconfig, content)) STORED;

-- Not partial: a deleted message's vector is empty and adds no key.
-- fastupdate (the default) keeps the ingest's inserts cheap: new entries
-- go to a pending list that a search also reads and that is merged into
-- the index by (auto)vacuum or once it reaches gin_pending_list_limit.
CREATE INDEX messages_search_idx ON messages USING gin (search_vector);
