-- Sessions and rotating refresh tokens.
--
-- A session is one login on one device: a family of refresh tokens, each
-- used once. Access tokens (short-lived JWTs) name their session in `sid`.
-- Revoking the session (logout, logout-all, a password change, or the reuse
-- of a rotated refresh token) stops every token of the family from being
-- renewed.

CREATE TABLE sessions (
    id             UUID PRIMARY KEY,
    user_id        BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at     TIMESTAMPTZ,
    revoked_reason TEXT CHECK (revoked_reason IN
                       ('logout', 'logout_all', 'password_changed', 'refresh_token_reused')),
    user_agent     TEXT CHECK (length(user_agent) <= 256),
    CONSTRAINT sessions_revoked_with_reason CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);
-- "Every session of this user" (logout-all, password change).
CREATE INDEX sessions_user_id_idx ON sessions (user_id);

CREATE TABLE refresh_tokens (
    -- SHA-256 of the token as the client holds it. The token itself is
    -- never stored: a database leak does not hand out sessions.
    token_hash BYTEA PRIMARY KEY CHECK (length(token_hash) = 32),
    session_id UUID NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    -- Set when the token was exchanged for its successor. A second use of a
    -- used token is a reuse: the family is revoked.
    used_at    TIMESTAMPTZ
);
CREATE INDEX refresh_tokens_session_id_idx ON refresh_tokens (session_id);
-- The sweeper deletes expired tokens.
CREATE INDEX refresh_tokens_expires_at_idx ON refresh_tokens (expires_at);
