-- Vibe Chat: the initial schema. Released migrations are never edited; the
-- origin refuses to start if a recorded checksum no longer matches.

CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stored lower-cased so that uniqueness is case-insensitive.
    email         TEXT NOT NULL UNIQUE CHECK (email = lower(email) AND email LIKE '%_@_%'),
    full_name     TEXT NOT NULL CHECK (length(full_name) BETWEEN 1 AND 200),
    role          TEXT NOT NULL CHECK (role IN ('trainer', 'member', 'admin')),
    password_hash TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    name            TEXT CHECK (name IS NULL OR length(name) BETWEEN 1 AND 100),
    created_by      BIGINT NOT NULL REFERENCES users (id),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Last activity (creation or newest message): the conversation list's order.
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Highest seq stored. A Room Durable Object whose storage is empty
    -- continues after it.
    last_seq        BIGINT NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    -- The pair of a direct conversation, smaller id first. The unique
    -- constraint below is what makes "find or create" race-free: two
    -- concurrent creates cannot both insert. NULL for groups (NULLs are
    -- distinct, so groups never collide).
    direct_user_lo  BIGINT REFERENCES users (id),
    direct_user_hi  BIGINT REFERENCES users (id),
    CONSTRAINT conversations_direct_pair_unique UNIQUE (direct_user_lo, direct_user_hi),
    CONSTRAINT conversations_direct_pair_shape CHECK (
        (kind = 'direct' AND direct_user_lo IS NOT NULL AND direct_user_hi IS NOT NULL
                         AND direct_user_lo < direct_user_hi AND name IS NULL)
     OR (kind = 'group'  AND direct_user_lo IS NULL AND direct_user_hi IS NULL AND name IS NOT NULL)
    )
);
CREATE INDEX conversations_created_by_idx ON conversations (created_by);
-- The unique index covers direct_user_lo; the hi side needs its own for the FK.
CREATE INDEX conversations_direct_user_hi_idx ON conversations (direct_user_hi);

CREATE TABLE conversation_participants (
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         BIGINT NOT NULL REFERENCES users (id),
    joined_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_seq   BIGINT NOT NULL DEFAULT 0 CHECK (delivered_seq >= 0),
    read_seq        BIGINT NOT NULL DEFAULT 0 CHECK (read_seq >= 0),
    PRIMARY KEY (conversation_id, user_id)
);
-- "My conversations" starts from the user.
CREATE INDEX conversation_participants_user_id_idx ON conversation_participants (user_id);

CREATE TABLE messages (
    -- Minted by the edge (UUIDv7) and stable from the first ack onwards.
    id              UUID PRIMARY KEY,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL CHECK (seq >= 1),
    sender_id       BIGINT NOT NULL REFERENCES users (id),
    content         TEXT NOT NULL CHECK (length(content) BETWEEN 1 AND 4000),
    created_at      TIMESTAMPTZ NOT NULL,
    client_msg_id   TEXT NOT NULL CHECK (length(client_msg_id) BETWEEN 1 AND 64),
    -- One total order per conversation. Also the keyset index for history.
    CONSTRAINT messages_conversation_seq_unique UNIQUE (conversation_id, seq),
    -- Idempotent send: one message per sender and client key.
    CONSTRAINT messages_idempotency_unique UNIQUE (conversation_id, sender_id, client_msg_id)
);
CREATE INDEX messages_sender_id_idx ON messages (sender_id);

CREATE TABLE user_presence (
    user_id   BIGINT NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    is_online BOOLEAN NOT NULL DEFAULT false,
    last_seen TIMESTAMPTZ
);
