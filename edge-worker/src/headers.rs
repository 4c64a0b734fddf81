//! The headers the Worker sets on requests it forwards to a Durable Object.
//! A client never reaches a Durable Object directly, so these are trusted.
//! Below the Room and the User object, so neither imports the other for them.

/// Who the caller is (set after the token was verified).
pub const USER_HEADER: &str = "x-vibe-user-id";
pub const CONVERSATION_HEADER: &str = "x-vibe-conversation-id";
/// When the caller's token stops being valid (ms since the epoch): a
/// realtime connection it opens lives until then unless renewed.
pub const VALID_UNTIL_HEADER: &str = "x-vibe-valid-until";
/// `{jti}:{exp}` of the ticket the caller came with: burnt where it is used.
pub const TICKET_HEADER: &str = "x-vibe-ticket";
/// How a message reached the Room (`user_socket` from a User object; the
/// Worker's POST otherwise), for `chat_messages_total{transport}`.
pub const TRANSPORT_HEADER: &str = "x-vibe-transport";
