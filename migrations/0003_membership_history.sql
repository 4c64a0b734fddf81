-- Membership history and a version per member list.
--
-- Removing a member deletes their conversation_participants row, so the
-- origin could not tell whether a message that reaches it late was sent by
-- a member. conversation_memberships keeps every period of membership
-- (joined_at, left_at); the ingest stores a message only when its sender
-- was a member when it was sent. members_version counts changes to the
-- member list, so the edge's rooms can tell theirs is stale.
--
-- Both are maintained by triggers on conversation_participants, in the
-- transaction that changes it, whatever changes it (the REST routes, the
-- demo seed, a tool with SQL).

ALTER TABLE conversations
    ADD COLUMN members_version BIGINT NOT NULL DEFAULT 0 CHECK (members_version >= 0);

CREATE TABLE conversation_memberships (
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         BIGINT NOT NULL REFERENCES users (id),
    joined_at       TIMESTAMPTZ NOT NULL,
    -- NULL while the user is a member.
    left_at         TIMESTAMPTZ,
    CONSTRAINT conversation_memberships_period CHECK (left_at IS NULL OR left_at >= joined_at)
);
-- At most one open period per member; also the lookup of the ingest check.
CREATE UNIQUE INDEX conversation_memberships_open_idx
    ON conversation_memberships (conversation_id, user_id) WHERE left_at IS NULL;
CREATE INDEX conversation_memberships_member_idx
    ON conversation_memberships (conversation_id, user_id, joined_at);
CREATE INDEX conversation_memberships_user_id_idx ON conversation_memberships (user_id);

-- Today's members joined when their row says. Members who left before this
-- migration left no trace; their late messages (if any) will be refused.
INSERT INTO conversation_memberships (conversation_id, user_id, joined_at)
SELECT conversation_id, user_id, joined_at FROM conversation_participants;
UPDATE conversations c SET members_version = 1
WHERE EXISTS (SELECT 1 FROM conversation_participants p WHERE p.conversation_id = c.id);

CREATE FUNCTION conversation_participants_joined() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversation_memberships (conversation_id, user_id, joined_at)
    SELECT conversation_id, user_id, joined_at FROM joined;
    UPDATE conversations c SET members_version = c.members_version + 1
    WHERE c.id IN (SELECT conversation_id FROM joined);
    RETURN NULL;
END;
$$;

CREATE FUNCTION conversation_participants_left() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE conversation_memberships m SET left_at = GREATEST(now(), m.joined_at)
    FROM departed d
    WHERE m.conversation_id = d.conversation_id AND m.user_id = d.user_id
      AND m.left_at IS NULL;
    UPDATE conversations c SET members_version = c.members_version + 1
    WHERE c.id IN (SELECT conversation_id FROM departed);
    RETURN NULL;
END;
$$;

-- Statement triggers: one version bump per change, however many rows; a
-- statement that changes no row (ON CONFLICT DO NOTHING) bumps nothing.
CREATE TRIGGER conversation_participants_joined
    AFTER INSERT ON conversation_participants
    REFERENCING NEW TABLE AS joined
    FOR EACH STATEMENT EXECUTE FUNCTION conversation_participants_joined();

CREATE TRIGGER conversation_participants_left
    AFTER DELETE ON conversation_participants
    REFERENCING OLD TABLE AS departed
    FOR EACH STATEMENT EXECUTE FUNCTION conversation_participants_left();
