-- Media attachments (issue 14): photos, videos, voice messages and files.
--
-- The bytes live in the edge's R2 bucket (keys att/{id}/original|full|thumb);
-- this table is the record of every object there. A row is reserved by the
-- edge before the first byte reaches the bucket (state 'uploading'),
-- committed once the object is stored ('processing' for what the origin's
-- worker still decodes, 'ready' for a file), and linked to its message by
-- the ingest, in the transaction that stores the message. Rows never linked
-- are reaped by the origin's cleanup after MEDIA_UNSENT_TTL_SECS, through the
-- room (which deletes the objects), so the bucket holds nothing this table
-- does not know.

-- A message may now carry attachments and no text: empty content is allowed
-- (the ingest still refuses it for a message without attachments).
ALTER TABLE messages DROP CONSTRAINT messages_content_check;
ALTER TABLE messages ADD CONSTRAINT messages_content_check
    CHECK (length(content) BETWEEN 0 AND 4000);

CREATE TABLE attachments (
    -- Minted by the origin at reservation (UUIDv7).
    id               UUID PRIMARY KEY,
    conversation_id  BIGINT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    uploader_id      BIGINT NOT NULL REFERENCES users (id),
    kind             TEXT NOT NULL CHECK (kind IN ('image', 'video', 'audio', 'file')),
    -- The type served for the main copy: the sniffed type of the original,
    -- then the re-encoded copy's type for an image.
    mime             TEXT NOT NULL CHECK (length(mime) BETWEEN 1 AND 100),
    -- Bytes of the uploaded original (the reservation's declared length).
    size             BIGINT NOT NULL CHECK (size > 0),
    -- The uploader's file name, sanitized.
    name             TEXT CHECK (name IS NULL OR length(name) BETWEEN 1 AND 100),
    width            INTEGER CHECK (width IS NULL OR width > 0),
    height           INTEGER CHECK (height IS NULL OR height > 0),
    duration_ms      BIGINT CHECK (duration_ms IS NULL OR duration_ms >= 0),
    -- The recorder's own measure of a voice message, used when the
    -- container does not say (MediaRecorder's WebM has no duration).
    duration_hint_ms BIGINT CHECK (duration_hint_ms IS NULL OR duration_hint_ms >= 0),
    state            TEXT NOT NULL DEFAULT 'uploading'
                     CHECK (state IN ('uploading', 'processing', 'ready', 'failed')),
    has_thumbnail    BOOLEAN NOT NULL DEFAULT false,
    -- The message that carries it. SET NULL, not CASCADE: if a message
    -- ever goes on its own (messages are not deleted today), its
    -- attachments become unsent again and the cleanup removes their
    -- objects through the room; a cascade would drop the rows and leave
    -- the objects in the bucket with nothing pointing at them. (A whole
    -- conversation's deletion cascades from conversations instead.)
    message_id       UUID REFERENCES messages (id) ON DELETE SET NULL,
    -- The message's seq, copied at linking, so the gallery pages on this
    -- table's own index.
    message_seq      BIGINT,
    -- Order within the message, as the sender listed them.
    position         SMALLINT NOT NULL DEFAULT 0 CHECK (position >= 0),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Processing and the notice to the room (origin/src/media/worker.rs):
    -- the row is due when next_attempt_at has passed (NULL: nothing to
    -- do); a worker leases it until lease_until under its claim token.
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  TIMESTAMPTZ,
    lease_until      TIMESTAMPTZ,
    claim            UUID,
    -- The room has heard of the processing result. Recorded separately so
    -- a failed notice retries only the notice, never the decoding.
    notified         BOOLEAN NOT NULL DEFAULT true
);
-- The gallery: a conversation's sent attachments, newest message first.
CREATE INDEX attachments_gallery_idx ON attachments (conversation_id, message_seq DESC, position)
    WHERE message_id IS NOT NULL;
-- A message's attachments in order (reads of history), and the foreign
-- key's ON DELETE SET NULL.
CREATE INDEX attachments_message_idx ON attachments (message_id, position)
    WHERE message_id IS NOT NULL;
-- The daily quota: an uploader's bytes in the last 24 hours.
CREATE INDEX attachments_quota_idx ON attachments (uploader_id, created_at) INCLUDE (size);
-- The cleanup: unsent uploads, oldest first.
CREATE INDEX attachments_unsent_idx ON attachments (created_at) WHERE message_id IS NULL;
-- The processing queue.
CREATE INDEX attachments_due_idx ON attachments (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
