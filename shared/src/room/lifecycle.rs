//! Changes to sent messages: edits, deletes and reactions.
//!
//! A change is a room event like a message: it takes the conversation's
//! next seq, is stored before it is acknowledged, relayed, replayed and
//! flushed through the outbox. Its record ([`super::Record`] with
//! `change`) names the target; the target's current state
//! ([`MessageState`]) lives on the target's own record while the window
//! holds it, and in the driver's storage always (see [`Target`]).
//!
//! What is decided here, without I/O: who may change what, whether a
//! change changes anything, what the state becomes, and whether an emoji is
//! one emoji.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::RoomError;
use crate::protocol::ReactionView;
pub use crate::protocol::internal::Change;

/// Distinct emoji one message may carry: a bound on what a toggle burst
/// can make a message (and every frame that carries it) grow to.
pub const MAX_REACTIONS_PER_MESSAGE: usize = 20;
/// Users a message may mention.
pub const MAX_MENTIONS: usize = 50;
/// The longest emoji accepted, in bytes (a ZWJ family with skin tones is
/// about 35).
const MAX_EMOJI_BYTES: usize = 64;

/// A change as the room stores it: what it does, and to which message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub target_id: Uuid,
    pub target_seq: i64,
    #[serde(flatten)]
    pub change: Change,
    /// A reaction's count for its emoji after it (what the frame says).
    #[serde(default)]
    pub count: i64,
}

/// What has happened to a message since it was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at_ms: Option<i64>,
    /// Each emoji with who reacted, in the order first used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<(String, Vec<i64>)>,
}

impl MessageState {
    pub fn is_deleted(&self) -> bool {
        self.deleted_at_ms.is_some()
    }

    /// How many have reacted with `emoji`.
    pub fn count(&self, emoji: &str) -> i64 {
        self.reactions
            .iter()
            .find(|(e, _)| e == emoji)
            .map_or(0, |(_, users)| users.len() as i64)
    }

    /// The reactions as `viewer` sees them (`me`), or as a broadcast
    /// does (`None`: `me` false, `user_ids` tell).
    pub fn views(&self, viewer: Option<i64>) -> Vec<ReactionView> {
        self.reactions
            .iter()
            .map(|(emoji, users)| ReactionView {
                emoji: emoji.clone(),
                count: users.len() as i64,
                me: viewer.is_some_and(|v| users.contains(&v)),
                user_ids: users.clone(),
            })
            .collect()
    }

    /// Sets `user`'s `emoji` on or off; whether that changed anything.
    fn react(&mut self, user: i64, emoji: &str, on: bool) -> Result<bool, RoomError> {
        let pos = self.reactions.iter().position(|(e, _)| e == emoji);
        match (pos, on) {
            (Some(i), true) => {
                let users = &mut self.reactions[i].1;
                if users.contains(&user) {
                    return Ok(false);
                }
                users.push(user);
                Ok(true)
            }
            (Some(i), false) => {
                let users = &mut self.reactions[i].1;
                let Some(at) = users.iter().position(|u| *u == user) else {
                    return Ok(false);
                };
                users.remove(at);
                if users.is_empty() {
                    self.reactions.remove(i);
                }
                Ok(true)
            }
            (None, true) => {
                if self.reactions.len() >= MAX_REACTIONS_PER_MESSAGE {
                    return Err(RoomError::TooManyReactions);
                }
                self.reactions.push((emoji.to_owned(), vec![user]));
                Ok(true)
            }
            (None, false) => Ok(false),
        }
    }
}

/// A message a change or a reply names, as the room or its storage knows
/// it. The driver's storage answers for messages beyond the window
/// ([`super::Context::target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: Uuid,
    pub seq: i64,
    pub sender_id: i64,
    pub created_at_ms: i64,
    pub state: MessageState,
    /// Its preview text, while storage still holds its content.
    pub preview: Option<String>,
}

/// Who may do what to a message, and what it changes. `Ok(None)`: allowed,
/// and it changes nothing (an edit to the same words, a reaction already
/// in that state, a second delete): acknowledged, not stored.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    target: &Target,
    current_content: Option<&str>,
    actor: i64,
    is_moderator: bool,
    change: &Change,
    now_ms: i64,
    edit_window_ms: i64,
) -> Result<Option<MessageState>, RoomError> {
    let mut state = target.state.clone();
    match change {
        Change::Edit { content } => {
            if target.sender_id != actor {
                return Err(RoomError::NotAllowed("only its sender may edit a message"));
            }
            if state.is_deleted() {
                return Err(RoomError::MessageDeleted);
            }
            if now_ms - target.created_at_ms > edit_window_ms {
                return Err(RoomError::EditWindowPassed);
            }
            if current_content == Some(content.as_str()) {
                return Ok(None);
            }
            state.edited_at_ms = Some(now_ms);
        }
        Change::Delete => {
            if target.sender_id != actor && !is_moderator {
                return Err(RoomError::NotAllowed(
                    "only its sender, or a group's creator or an admin, may delete a message",
                ));
            }
            if state.is_deleted() {
                return Ok(None);
            }
            state = MessageState {
                edited_at_ms: None,
                deleted_at_ms: Some(now_ms),
                reactions: Vec::new(),
            };
        }
        Change::React { emoji, on } => {
            if state.is_deleted() {
                return Err(RoomError::MessageDeleted);
            }
            if !state.react(actor, emoji, *on)? {
                return Ok(None);
            }
        }
    }
    Ok(Some(state))
}

/// Checks that `emoji` is exactly one emoji: one extended grapheme cluster
/// whose base is a pictograph (or a flag, or a keycap). Text is refused,
/// so a reaction cannot carry a message.
pub fn valid_emoji(emoji: &str) -> bool {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
        return false;
    }
    let chars: Vec<char> = emoji.chars().collect();
    // A flag: exactly two regional indicators.
    if chars.iter().all(|c| is_regional_indicator(*c)) {
        return chars.len() == 2;
    }
    // A keycap: [0-9#*] FE0F? 20E3.
    if matches!(chars.as_slice(), [b, '\u{20E3}'] | [b, '\u{FE0F}', '\u{20E3}'] if b.is_ascii_digit() || *b == '#' || *b == '*')
    {
        return true;
    }
    // A pictograph, optionally modified (variation selector, skin tone,
    // tags), and joined to further pictographs with ZWJ: one grapheme.
    let mut expect_base = true;
    for &c in &chars {
        if expect_base {
            if !is_pictograph(c) {
                return false;
            }
            expect_base = false;
        } else if c == '\u{200D}' {
            expect_base = true;
        } else if !is_modifier(c) {
            return false;
        }
    }
    !expect_base
}

fn is_regional_indicator(c: char) -> bool {
    ('\u{1F1E6}'..='\u{1F1FF}').contains(&c)
}

/// Extended_Pictographic, approximately: the blocks emoji live in.
fn is_pictograph(c: char) -> bool {
    matches!(c,
        '\u{00A9}' | '\u{00AE}' | '\u{203C}' | '\u{2049}' | '\u{2122}' | '\u{2139}'
        | '\u{2194}'..='\u{21AA}'
        | '\u{231A}'..='\u{23FF}'
        | '\u{24C2}'
        | '\u{25AA}'..='\u{25FE}'
        | '\u{2600}'..='\u{27BF}'
        | '\u{2934}' | '\u{2935}'
        | '\u{2B05}'..='\u{2B55}'
        | '\u{3030}' | '\u{303D}' | '\u{3297}' | '\u{3299}'
        | '\u{1F000}'..='\u{1FAFF}')
        && !is_regional_indicator(c)
        && !is_skin_tone(c)
}

fn is_skin_tone(c: char) -> bool {
    ('\u{1F3FB}'..='\u{1F3FF}').contains(&c)
}

/// What may follow a pictograph inside one emoji.
fn is_modifier(c: char) -> bool {
    c == '\u{FE0F}'
        || c == '\u{20E3}'
        || is_skin_tone(c)
        || ('\u{E0020}'..='\u{E007F}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_emoji_is_accepted_and_text_is_not() {
        for ok in [
            "👍",
            "❤️",
            "😂",
            "💪🏽",
            "👨‍👩‍👧‍👦",
            "🏳️‍🌈",
            "🇩🇪",
            "1️⃣",
            "#⃣",
            "🔥",
            "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
        ] {
            assert!(valid_emoji(ok), "{ok:?} is one emoji");
        }
        for bad in [
            "",
            "a",
            "ok",
            "👍👍",
            "👍 ",
            " 👍",
            "🇩🇪🇫🇷",
            "🇩",
            "👍a",
            "‍👍",
            "👍‍",
            "🏽",
            "12",
        ] {
            assert!(!valid_emoji(bad), "{bad:?} is not one emoji");
        }
        assert!(!valid_emoji(&"👍".repeat(40)));
    }

    fn target(sender: i64) -> Target {
        Target {
            id: Uuid::nil(),
            seq: 4,
            sender_id: sender,
            created_at_ms: 1_000,
            state: MessageState::default(),
            preview: Some("hi".into()),
        }
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn only_the_sender_edits_within_the_window() {
        let edit = Change::Edit {
            content: "fixed".into(),
        };
        let t = target(1);
        assert_eq!(
            decide(&t, Some("hi"), 2, true, &edit, 2_000, DAY),
            Err(RoomError::NotAllowed("only its sender may edit a message"))
        );
        let s = decide(&t, Some("hi"), 1, false, &edit, 2_000, DAY)
            .expect("allowed")
            .expect("changed");
        assert_eq!(s.edited_at_ms, Some(2_000));
        assert_eq!(
            decide(&t, Some("hi"), 1, false, &edit, 1_000 + DAY + 1, DAY),
            Err(RoomError::EditWindowPassed)
        );
        let same = Change::Edit {
            content: "hi".into(),
        };
        assert_eq!(
            decide(&t, Some("hi"), 1, false, &same, 2_000, DAY),
            Ok(None)
        );
    }

    #[test]
    fn the_sender_or_a_moderator_deletes_and_a_deleted_message_takes_no_change() {
        let t = target(1);
        assert!(matches!(
            decide(&t, None, 2, false, &Change::Delete, 2_000, DAY),
            Err(RoomError::NotAllowed(_))
        ));
        let mut t = target(1);
        t.state.reactions = vec![("👍".into(), vec![2])];
        let s = decide(&t, None, 3, true, &Change::Delete, 2_000, DAY)
            .expect("moderator")
            .expect("changed");
        assert!(s.is_deleted());
        assert!(s.reactions.is_empty(), "a tombstone carries no reactions");
        t.state = s;
        assert_eq!(
            decide(&t, None, 1, false, &Change::Delete, 3_000, DAY),
            Ok(None)
        );
        let react = Change::React {
            emoji: "👍".into(),
            on: true,
        };
        assert_eq!(
            decide(&t, None, 1, false, &react, 3_000, DAY),
            Err(RoomError::MessageDeleted)
        );
    }

    #[test]
    fn reactions_toggle_per_user_and_are_bounded() {
        let mut s = MessageState::default();
        assert_eq!(s.react(1, "👍", true), Ok(true));
        assert_eq!(s.react(1, "👍", true), Ok(false));
        assert_eq!(s.react(2, "👍", true), Ok(true));
        assert_eq!(s.count("👍"), 2);
        assert_eq!(s.react(1, "👍", false), Ok(true));
        assert_eq!(s.react(1, "👍", false), Ok(false));
        assert!(s.views(Some(2))[0].me);
        assert!(!s.views(Some(1))[0].me);
        assert_eq!(s.react(2, "👍", false), Ok(true));
        assert!(s.reactions.is_empty(), "an emoji nobody holds goes");
        for i in 0..MAX_REACTIONS_PER_MESSAGE {
            let e = char::from_u32(0x1F600 + i as u32)
                .expect("emoji")
                .to_string();
            assert_eq!(s.react(1, &e, true), Ok(true));
        }
        assert_eq!(s.react(1, "🔥", true), Err(RoomError::TooManyReactions));
        assert_eq!(s.react(1, "😀", true), Ok(false), "an existing one is fine");
    }
}
