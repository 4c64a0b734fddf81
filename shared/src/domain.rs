//! Validation newtypes: a value of one of these types has passed its rule.
//!
//! Each `parse` returns a typed [`DomainError`] that callers map to their own
//! transport (HTTP 413/422, a WS `error` event).

use serde::{Deserialize, Serialize};

/// Longest message, in Unicode scalar values (what a user would call
/// characters): the product's limit (docs/ARCHITECTURE.md, "Limits").
pub const MAX_CONTENT_CHARS: usize = 4_000;
/// Longest `client_msg_id`. Clients use UUIDs (36 chars); the slack allows
/// other schemes without letting the unique index grow unbounded.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 64;
/// Longest group name, in characters.
pub const MAX_CONVERSATION_NAME_CHARS: usize = 100;
/// Largest WebSocket frame or HTTP body the chat paths accept.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The value is empty or only whitespace.
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    /// The value is longer than its limit. Content over the limit maps to
    /// HTTP 413 / WS close 1009, other fields to 422.
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    /// The value has characters or a shape the field does not allow.
    #[error("{field} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

impl DomainError {
    /// A stable, machine-readable code for the `{code, message}` body.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::Empty { .. } => "empty_field",
            DomainError::TooLong { .. } => "too_long",
            DomainError::Invalid { .. } => "invalid_field",
        }
    }
}

/// The text of a chat message: not blank, at most [`MAX_CONTENT_CHARS`]
/// characters, no NUL (PostgreSQL `text` cannot store it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MessageContent(String);

impl MessageContent {
    pub fn parse(raw: impl Into<String>) -> Result<Self, DomainError> {
        let raw = raw.into();
        const FIELD: &str = "content";
        if raw.trim().is_empty() {
            return Err(DomainError::Empty { field: FIELD });
        }
        // Count lazily: stop as soon as the limit is passed, so a 60 KiB frame
        // costs no more than the limit to reject.
        if raw.chars().nth(MAX_CONTENT_CHARS).is_some() {
            return Err(DomainError::TooLong {
                field: FIELD,
                max: MAX_CONTENT_CHARS,
            });
        }
        if raw.contains('\0') {
            return Err(DomainError::Invalid {
                field: FIELD,
                reason: "NUL characters are not allowed",
            });
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(raw).map_err(serde::de::Error::custom)
    }
}

/// The sender's idempotency key: 1 to 64 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    pub fn parse(raw: impl Into<String>) -> Result<Self, DomainError> {
        let raw = raw.into();
        const FIELD: &str = "client_msg_id";
        if raw.is_empty() {
            return Err(DomainError::Empty { field: FIELD });
        }
        if raw.len() > MAX_CLIENT_MSG_ID_LEN {
            return Err(DomainError::TooLong {
                field: FIELD,
                max: MAX_CLIENT_MSG_ID_LEN,
            });
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        {
            return Err(DomainError::Invalid {
                field: FIELD,
                reason: "only letters, digits and - _ . : are allowed",
            });
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for ClientMsgId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(raw).map_err(serde::de::Error::custom)
    }
}

/// A group's display name: trimmed, 1 to 100 characters, no control
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ConversationName(String);

impl ConversationName {
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        const FIELD: &str = "name";
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(DomainError::Empty { field: FIELD });
        }
        if trimmed.chars().nth(MAX_CONVERSATION_NAME_CHARS).is_some() {
            return Err(DomainError::TooLong {
                field: FIELD,
                max: MAX_CONVERSATION_NAME_CHARS,
            });
        }
        if trimmed.chars().any(char::is_control) {
            return Err(DomainError::Invalid {
                field: FIELD,
                reason: "control characters are not allowed",
            });
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a user is on the platform. Admins may manage any group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Trainer,
    Member,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Trainer => "trainer",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        match raw {
            "trainer" => Ok(Role::Trainer),
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            _ => Err(DomainError::Invalid {
                field: "role",
                reason: "must be trainer, member or admin",
            }),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_at_the_limit_is_accepted_and_one_more_char_is_refused() {
        let at_limit = "é".repeat(MAX_CONTENT_CHARS);
        assert!(MessageContent::parse(at_limit.clone()).is_ok());
        let over = format!("{at_limit}x");
        assert_eq!(
            MessageContent::parse(over),
            Err(DomainError::TooLong {
                field: "content",
                max: MAX_CONTENT_CHARS
            })
        );
    }

    #[test]
    fn blank_content_is_refused() {
        for raw in ["", "   ", "\n\t"] {
            assert!(matches!(
                MessageContent::parse(raw),
                Err(DomainError::Empty { .. })
            ));
        }
    }

    #[test]
    fn content_with_nul_is_refused() {
        assert!(matches!(
            MessageContent::parse("a\0b"),
            Err(DomainError::Invalid { .. })
        ));
    }

    #[test]
    fn content_keeps_its_whitespace() {
        let c = MessageContent::parse("  hi  ").expect("valid");
        assert_eq!(c.as_str(), "  hi  ");
    }

    #[test]
    fn client_msg_id_accepts_uuids_and_refuses_spaces_and_overlong_values() {
        assert!(ClientMsgId::parse("0190f4b2-6c1e-7cc3-8a5e-2f5b1d7d9f00").is_ok());
        assert!(ClientMsgId::parse("a b").is_err());
        assert!(ClientMsgId::parse("").is_err());
        assert!(ClientMsgId::parse("x".repeat(65)).is_err());
        assert!(ClientMsgId::parse("x".repeat(64)).is_ok());
    }

    #[test]
    fn conversation_name_is_trimmed_and_bounded() {
        assert_eq!(
            ConversationName::parse("  HIIT crew ")
                .expect("valid")
                .as_str(),
            "HIIT crew"
        );
        assert!(ConversationName::parse("   ").is_err());
        assert!(ConversationName::parse(&"x".repeat(101)).is_err());
        assert!(ConversationName::parse("a\u{7}b").is_err());
    }

    #[test]
    fn deserializing_content_applies_the_rule() {
        let err = serde_json::from_str::<MessageContent>("\"  \"");
        assert!(err.is_err());
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in [Role::Trainer, Role::Member, Role::Admin] {
            assert_eq!(Role::parse(role.as_str()), Ok(role));
        }
        assert!(Role::parse("coach").is_err());
    }
}
