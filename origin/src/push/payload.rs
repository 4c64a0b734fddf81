//! What a push carries to the service worker (JSON, then encrypted).
//!
//! ```json
//! {"type":"message","conversation_id":7,"seq":42,"count":3,"title":"Sam Patel",
//!  "body":"3 new messages from Sam Patel","sender_id":2,"sender_name":"Sam Patel",
//!  "tag":"conversation-7","url":"/?conversation=7"}
//! {"type":"clear","conversation_id":7,"tag":"conversation-7"}
//! ```
//!
//! The title is the sender's name in a direct conversation and the group's
//! name in a group. The body names the sender (and the count) unless the
//! user allowed the message text (`show_content`), which is off by default:
//! a notification on a lock screen must not show what someone wrote about
//! their health.

use serde::Serialize;

use super::webpush::MAX_PLAINTEXT;

/// Longest preview of a message's text, in characters (the ellipsis
/// included).
pub const PREVIEW_CHARS: usize = 200;

/// The service worker's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Payload {
    /// New messages in a conversation: show (or replace) its notification.
    Message {
        conversation_id: i64,
        /// The latest message the notification covers.
        seq: i64,
        /// Unread messages from others it covers.
        count: i64,
        title: String,
        body: String,
        /// The sender of `seq`.
        sender_id: i64,
        sender_name: String,
        /// The notification's tag: one notification per conversation.
        tag: String,
        /// What a click opens.
        url: String,
    },
    /// The user read the conversation elsewhere: close its notification.
    Clear { conversation_id: i64, tag: String },
}

/// The notification tag of a conversation.
pub fn tag(conversation_id: i64) -> String {
    format!("conversation-{conversation_id}")
}

/// The `Topic` header of a conversation's pushes (at most 32 base64url
/// characters: `c` and up to 19 digits).
pub fn topic(conversation_id: i64) -> String {
    format!("c{conversation_id}")
}

/// Everything a message notification is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFacts {
    pub conversation_id: i64,
    pub seq: i64,
    pub count: i64,
    /// The group's name; `None` for a direct conversation.
    pub group_name: Option<String>,
    pub sender_id: i64,
    pub sender_name: String,
    /// Whether the messages came from more than one person.
    pub several_senders: bool,
    /// The text of message `seq`, if the user allowed content and it is
    /// at hand.
    pub content: Option<String>,
}

/// `text` cut to `max` characters, the last one an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((idx, _)) if text.chars().nth(max).is_some() => format!("{}…", &text[..idx]),
        _ => text.to_owned(),
    }
}

impl MessageFacts {
    /// The payload, with names and text cut to `max_name` and
    /// `max_text` characters.
    fn payload_with(&self, max_name: usize, max_text: usize) -> Payload {
        let sender = shorten(self.sender_name.trim(), max_name);
        let sender = if sender.is_empty() {
            "Someone".to_owned()
        } else {
            sender
        };
        let title = match &self.group_name {
            Some(name) => shorten(name, max_name),
            None => sender.clone(),
        };
        let count = self.count.max(1);
        let body = match &self.content {
            Some(text) => {
                let preview = shorten(text, max_text);
                match self.group_name {
                    // "Sam: …": the first name, as a group chat shows it.
                    Some(_) => {
                        let first = sender.split_whitespace().next().unwrap_or(&sender);
                        format!("{first}: {preview}")
                    }
                    None => preview,
                }
            }
            None if count == 1 => format!("New message from {sender}"),
            None if self.several_senders => format!("{count} new messages"),
            None => format!("{count} new messages from {sender}"),
        };
        Payload::Message {
            conversation_id: self.conversation_id,
            seq: self.seq,
            count,
            title,
            body,
            sender_id: self.sender_id,
            sender_name: sender,
            tag: tag(self.conversation_id),
            url: format!("/?conversation={}", self.conversation_id),
        }
    }

    /// The payload as JSON, at most [`MAX_PLAINTEXT`] bytes: names and text
    /// are cut further in the rare case that they do not fit (names of 200
    /// characters, each escaped to six bytes).
    pub fn to_json(&self) -> Vec<u8> {
        for (max_name, max_text) in [(200, PREVIEW_CHARS), (60, 100), (20, 40)] {
            if let Ok(json) = serde_json::to_vec(&self.payload_with(max_name, max_text)) {
                if json.len() <= MAX_PLAINTEXT {
                    return json;
                }
            }
        }
        // 20-character names and 40 characters of text, escaped, cannot
        // reach 3,993 bytes; this is never used.
        serde_json::to_vec(&Payload::Clear {
            conversation_id: self.conversation_id,
            tag: tag(self.conversation_id),
        })
        .unwrap_or_default()
    }
}

/// The `clear` payload of a conversation.
pub fn clear_json(conversation_id: i64) -> Vec<u8> {
    serde_json::to_vec(&Payload::Clear {
        conversation_id,
        tag: tag(conversation_id),
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn facts() -> MessageFacts {
        MessageFacts {
            conversation_id: 7,
            seq: 42,
            count: 1,
            group_name: None,
            sender_id: 2,
            sender_name: "Sam Patel".to_owned(),
            several_senders: false,
            content: None,
        }
    }

    fn json_of(f: &MessageFacts) -> Value {
        serde_json::from_slice(&f.to_json()).expect("json")
    }

    #[test]
    fn a_direct_message_without_content_names_the_sender_only() {
        assert_eq!(
            json_of(&facts()),
            json!({"type": "message", "conversation_id": 7, "seq": 42, "count": 1,
                   "title": "Sam Patel", "body": "New message from Sam Patel",
                   "sender_id": 2, "sender_name": "Sam Patel",
                   "tag": "conversation-7", "url": "/?conversation=7"})
        );
        let f = MessageFacts {
            count: 3,
            ..facts()
        };
        assert_eq!(json_of(&f)["body"], "3 new messages from Sam Patel");
        let f = MessageFacts {
            count: 3,
            several_senders: true,
            group_name: Some("Morning runners".to_owned()),
            ..facts()
        };
        let j = json_of(&f);
        assert_eq!(j["body"], "3 new messages");
        assert_eq!(j["title"], "Morning runners");
        assert_eq!(j["count"], 3);
    }

    #[test]
    fn content_is_shown_only_when_given_cut_to_200_characters_with_the_first_name_in_a_group() {
        let f = MessageFacts {
            content: Some("How did the run go?".to_owned()),
            count: 2,
            ..facts()
        };
        let j = json_of(&f);
        assert_eq!(j["body"], "How did the run go?");
        assert_eq!(j["count"], 2);
        let f = MessageFacts {
            group_name: Some("Morning runners".to_owned()),
            content: Some("é".repeat(500)),
            ..facts()
        };
        let body = json_of(&f)["body"].as_str().expect("body").to_owned();
        let preview = body.strip_prefix("Sam: ").expect("first name");
        assert_eq!(preview.chars().count(), 200);
        assert!(preview.ends_with('…'));
        assert_eq!(shorten("short", 200), "short");
        assert_eq!(shorten(&"a".repeat(200), 200), "a".repeat(200));
    }

    #[test]
    fn the_payload_always_fits_one_record() {
        let f = MessageFacts {
            group_name: Some("\u{1}".repeat(100)),
            sender_name: "\u{1}".repeat(200),
            content: Some("\u{1}".repeat(4000)),
            ..facts()
        };
        let bytes = f.to_json();
        assert!(bytes.len() <= MAX_PLAINTEXT, "{}", bytes.len());
        assert_eq!(json_of(&f)["type"], "message");
    }

    #[test]
    fn clear_names_the_conversation_and_its_tag() {
        let j: Value = serde_json::from_slice(&clear_json(7)).expect("json");
        assert_eq!(
            j,
            json!({"type": "clear", "conversation_id": 7, "tag": "conversation-7"})
        );
        assert_eq!(topic(7), "c7");
        assert!(topic(i64::MAX).len() <= 32);
    }
}
