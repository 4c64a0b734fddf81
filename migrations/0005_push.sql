-- Web Push notifications (issue 13): subscriptions, preferences, and a
-- crash-safe delivery queue.
--
-- The ingest (the transaction that stores a Room's batch of messages)
-- upserts one pending job per (recipient, conversation) into push_jobs; a
-- background task of the origin sends due jobs, deciding at send time
-- whether the recipient should hear of it at all (online, read, muted,
-- quiet hours...). A job is deleted only in the transaction after its
-- sends, so a crash loses none (see origin/src/push/worker.rs).

-- One browser's push subscription (PushSubscription.toJSON()).
CREATE TABLE push_subscriptions (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- The session that registered it: logging that session out (or its
    -- revocation, or its removal by the sweeper) removes it too. NULL for
    -- tokens minted without a session (tools, tests).
    session_id      UUID REFERENCES sessions (id) ON DELETE CASCADE,
    -- The push service URL. Unique: registering a known endpoint again
    -- re-binds it to the caller (a browser belongs to whoever logged in
    -- last).
    endpoint        TEXT NOT NULL UNIQUE CHECK (length(endpoint) BETWEEN 1 AND 2048),
    -- The browser's P-256 key (uncompressed point) and auth secret.
    p256dh          BYTEA NOT NULL CHECK (length(p256dh) = 65),
    auth            BYTEA NOT NULL CHECK (length(auth) = 16),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_success_at TIMESTAMPTZ
);
CREATE INDEX push_subscriptions_user_id_idx ON push_subscriptions (user_id);
CREATE INDEX push_subscriptions_session_id_idx ON push_subscriptions (session_id);

-- Per-user notification settings; no row means the defaults (content
-- hidden, no quiet hours).
CREATE TABLE notification_settings (
    user_id      BIGINT PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    -- Whether a notification may show the message's text. Off by default:
    -- chat about health and bodies is private.
    show_content BOOLEAN NOT NULL DEFAULT false,
    -- Quiet hours in the user's time zone, [start, end); a window may
    -- cross midnight (22:00 to 07:00).
    quiet_start  TIME,
    quiet_end    TIME,
    time_zone    TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT notification_settings_quiet_hours CHECK (
        (quiet_start IS NULL AND quiet_end IS NULL AND time_zone IS NULL)
     OR (quiet_start IS NOT NULL AND quiet_end IS NOT NULL AND time_zone IS NOT NULL
         AND quiet_start <> quiet_end)
    )
);

-- Per-user, per-conversation preferences; no row means level 'all', not
-- muted.
CREATE TABLE conversation_notification_prefs (
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    level           TEXT NOT NULL DEFAULT 'all' CHECK (level IN ('all', 'mentions', 'none')),
    muted_until     TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, conversation_id)
);
CREATE INDEX conversation_notification_prefs_conversation_id_idx
    ON conversation_notification_prefs (conversation_id);

-- The queue: at most one pending notification per (recipient,
-- conversation). The ingest adds each stored message from someone else to
-- it (count, last_seq) and moves due_at to coalesce a burst into one push.
CREATE TABLE push_jobs (
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    first_seq       BIGINT NOT NULL CHECK (first_seq >= 1),
    last_seq        BIGINT NOT NULL CHECK (last_seq >= first_seq),
    -- Messages from others this notification covers.
    count           BIGINT NOT NULL CHECK (count >= 1),
    -- The sender of last_seq, and whether anyone else sent one of them.
    last_sender_id  BIGINT NOT NULL,
    several_senders BOOLEAN NOT NULL DEFAULT false,
    -- When it may go: the latest message plus the coalescing delay, a
    -- retry's backoff, the end of a worker's lease while it sends, or
    -- the next look at a parked job.
    due_at          TIMESTAMPTZ NOT NULL,
    -- Failed sends so far (429, 5xx, network); dropped at the maximum.
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- The worker that leased it (until due_at); NULL when not leased.
    claim           UUID,
    -- Waiting for the user to go offline: they were online when it was
    -- due. Going offline makes it due at once (the presence route).
    parked          BOOLEAN NOT NULL DEFAULT false,
    -- Subscriptions that already accepted this notification (a retry of
    -- the others skips them). Emptied when a newer message joins the job.
    sent_to         BIGINT[] NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, conversation_id)
);
CREATE INDEX push_jobs_due_at_idx ON push_jobs (due_at);
CREATE INDEX push_jobs_conversation_id_idx ON push_jobs (conversation_id);

-- The last message notification sent per (user, conversation) that may
-- still be on the user's devices. A read receipt up to seq schedules a
-- `clear` push (clear_due_at); once it is sent the row goes.
CREATE TABLE push_notified (
    user_id         BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    conversation_id BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- The last_seq the notification covered.
    seq             BIGINT NOT NULL,
    notified_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set when the user has read up to seq: the clear is due.
    clear_due_at    TIMESTAMPTZ,
    -- The worker that leased the clear.
    claim           UUID,
    PRIMARY KEY (user_id, conversation_id)
);
CREATE INDEX push_notified_clear_due_at_idx ON push_notified (clear_due_at)
    WHERE clear_due_at IS NOT NULL;
CREATE INDEX push_notified_conversation_id_idx ON push_notified (conversation_id);
