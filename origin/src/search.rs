//! Message search (issue 15): PostgreSQL full-text search over the
//! caller's current conversations, best match first.
//!
//! # The index
//!
//! `messages.search_vector` (migration 0008) is a stored generated column,
//! `to_tsvector('english', content)`, with a GIN index
//! (`messages_search_idx`). PostgreSQL computes it in the statement that
//! writes `content`: the ingest's insert, an edit's update (so an edit is
//! searchable by its new words, and no longer by its old ones, at once), a
//! delete's tombstone (`content = ''`, an empty vector that matches
//! nothing; the query also says `deleted_at IS NULL`).
//!
//! `english` stems ("deadlifts" and "deadlifting" find "deadlift") and
//! drops English stop words ("the", "I", "with"). The cost is in other
//! languages: their words are matched as written (an exact word still
//! finds itself, but a German plural does not find its singular), the
//! English stemmer may clip a foreign word oddly (harmless: the query is
//! clipped the same way), and a foreign word that happens to be an English
//! stop word ("die" is not one, "an" is) cannot be searched. Accents are
//! kept ("café" does not find "cafe"). See docs/ARCHITECTURE.md, "Search".
//!
//! # The query
//!
//! `q` is read by `websearch_to_tsquery` (quotes, `-word`, `or`; any other
//! punctuation is ignored, so no input can be a syntax error), and its last
//! word, when it is a plain word of at least [`MIN_PREFIX_CHARS`] letters
//! or digits outside quotes and not after `or`, matches as a prefix instead:
//! `to_tsquery('english', quote_literal(word) || ':*')`, ANDed with the
//! rest. The word is checked to be letters and digits only before it gets
//! there, so `quote_literal` never has to escape anything (its `E'…'`
//! form for a backslash would not be tsquery syntax). One or two letters
//! match exactly: a one-letter prefix expands to thousands of lexemes.
//!
//! A query with nothing to look for (only stop words or punctuation) or
//! only words to exclude (`-word`, which would need every message) finds
//! nothing: `200` with no hits, not an error, because a search box passes
//! through such states while the user types.
//!
//! [`SEARCH_HITS`] restricts to the caller's conversations with
//! `conversation_id = ANY($2)` (their ids, read first). PostgreSQL ANDs two
//! bitmaps: the GIN index's for the words and the `(conversation_id, seq)`
//! index's for the conversations, and visits only the rows in both. When
//! the conversations searched hold few messages ([`SCAN_BELOW`]), they are
//! read whole instead ([`SEARCH_HITS_SCAN`]): cheaper than a common word's
//! posting list. Ranking
//! (`ts_rank_cd`) is bounded by [`RANK_WINDOW`]: only the newest that many
//! matches are ranked and paged. docs/ARCHITECTURE.md, "Search", has the
//! plans measured and why this one.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Longest `q`, in characters.
pub const MAX_QUERY_CHARS: usize = 200;
/// Largest page.
pub const MAX_PAGE: i64 = 50;
/// Page size when `limit` is absent.
pub const DEFAULT_PAGE: i64 = 20;
/// The shortest last word matched as a prefix.
pub const MIN_PREFIX_CHARS: usize = 3;
/// Matches ranked per search: the newest this many of the caller's. A
/// search that matches more ranks only these, and pages only through them.
pub const RANK_WINDOW: i64 = 1_000;

/// Run first in the search's transaction.
///
/// - `force_custom_plan`: the plan depends on the words and on how many
///   conversations the caller has (one, with `conversation_id`, or
///   hundreds). A generic plan would know neither.
/// - `enable_seqscan = off`: reading all of `messages` is never the right
///   plan for a search, but a planner with stale statistics (a table
///   analysed while it was small) can believe it is; the indexes serve
///   every part of these statements (see origin/tests/api/plans.rs).
/// - `jit = off`: milliseconds of work, where compiling costs more.
/// - `statement_timeout`: whatever a query costs, a search gives up after
///   5 s (a `503`) instead of holding a connection.
pub const SEARCH_GUARD: &str = "SET LOCAL plan_cache_mode = force_custom_plan;
     SET LOCAL enable_seqscan = off;
     SET LOCAL jit = off;
     SET LOCAL statement_timeout = '5s'";

/// The tsquery of a search, as text, with how many operands it has and
/// whether an index can serve it (`querytree` is `T` when it cannot: only
/// negations). `$1`: `q` without its prefix word; `$2`: the prefix word or
/// NULL.
pub const BUILD_QUERY: &str = "SELECT q::text, numnode(q), querytree(q) <> 'T'
     FROM (SELECT CASE WHEN $2::text IS NULL THEN websearch_to_tsquery('english', $1::text)
                       ELSE websearch_to_tsquery('english', $1::text)
                            && to_tsquery('english', quote_literal($2::text) || ':*')
                  END AS q) s";

/// The caller's current conversations, and the highest seq of each summed:
/// at least how many messages they hold (seqs also number changes, so
/// fewer). `$1`: the caller.
pub const CALLER_CONVERSATIONS: &str = "SELECT COALESCE(array_agg(p.conversation_id), '{}'),
            COALESCE(sum(c.last_seq), 0)::int8
     FROM conversation_participants p JOIN conversations c ON c.id = p.conversation_id
     WHERE p.user_id = $1";

/// Whether conversation `$1` exists (a row), whether `$2` is a current
/// participant, and its highest seq.
pub const CONVERSATION_ACCESS: &str = "SELECT EXISTS (
         SELECT 1 FROM conversation_participants p
         WHERE p.conversation_id = c.id AND p.user_id = $2),
         c.last_seq
     FROM conversations c WHERE c.id = $1";

/// Searched conversations holding at most this many seqs in all are read
/// whole ([`SEARCH_HITS_SCAN`]) instead of through the GIN index.
pub const SCAN_BELOW: i64 = 2_000;

/// [`SEARCH_HITS`] with its condition on the words.
macro_rules! search_hits {
    ($matches:literal) => {
        concat!("SELECT m.id, m.conversation_id, m.seq, m.sender_id, m.created_at, page.rank,
            COALESCE(CASE WHEN c.kind = 'group' THEN c.name ELSE peer.full_name END, ''),
            sender.full_name,
            ts_headline('english', t.body, $1::text::tsquery,
                        CASE WHEN char_length(t.body) <= 300
                             THEN 'StartSel=«, StopSel=», HighlightAll=true'
                             ELSE 'StartSel=«, StopSel=», MaxWords=30, MinWords=12, ShortWord=2, MaxFragments=2, FragmentDelimiter=\" … \"'
                        END)
     FROM (
         SELECT ranked.id, ranked.created_at, ranked.rank
         FROM (
             SELECT w.id, w.created_at, ts_rank_cd(w.search_vector, $1::text::tsquery) AS rank
             FROM (
                 SELECT id, created_at, search_vector FROM messages
                 WHERE conversation_id = ANY($2::int8[])
                   AND ", $matches, "
                   AND deleted_at IS NULL
                 ORDER BY created_at DESC, id DESC
                 LIMIT $3::int8
             ) w
         ) ranked
         WHERE $6::float4 IS NULL
            OR (ranked.rank, ranked.created_at, ranked.id) < ($6::float4, $7::timestamptz, $8::uuid)
         ORDER BY ranked.rank DESC, ranked.created_at DESC, ranked.id DESC
         LIMIT $4::int8
     ) page
     JOIN messages m ON m.id = page.id
     CROSS JOIN LATERAL (SELECT translate(m.content, '«»', '') AS body) t
     JOIN conversations c ON c.id = m.conversation_id
     JOIN users sender ON sender.id = m.sender_id
     LEFT JOIN users peer ON c.kind = 'direct'
         AND peer.id = CASE WHEN c.direct_user_lo = $5::int8 THEN c.direct_user_hi
                            ELSE c.direct_user_lo END
     ORDER BY page.rank DESC, page.created_at DESC, page.id DESC")
    };
}

/// One page of hits.
///
/// `$1`: the tsquery (text, from [`BUILD_QUERY`]); `$2`: the conversations
/// searched; `$3`: [`RANK_WINDOW`]; `$4`: rows to return (the page plus
/// one, to learn whether there is more); `$5`: the caller (to name a
/// direct conversation by the other person); `$6..$8`: the cursor (rank,
/// created_at, id of the last hit of the previous page) or NULLs.
///
/// Innermost, the newest `$3` matches (the bitmaps ANDed, then a top-N
/// sort on time, carrying no content); then their ranks; then the page,
/// best first, newest first among equals, after the cursor. Only the page's
/// rows are read again by id for their content, conversation and sender,
/// and only they get a `ts_headline` (the costly part: it parses the text
/// again): the whole message, highlighted, when it is up to 300
/// characters (a chat message usually is), else up to two fragments of
/// about 30 words around the matches, joined by ` … `. `«` and `»` are
/// removed from the content first: the snippet marks matches with them,
/// and a message could otherwise fake one.
pub const SEARCH_HITS: &str = search_hits!("search_vector @@ $1::text::tsquery");

/// [`SEARCH_HITS`] for conversations that hold few messages
/// ([`SCAN_BELOW`]): the words are checked on each of their messages,
/// read through `messages_conversation_seq_unique`, and never looked up in
/// the GIN index. `IS TRUE` makes the condition one no index can serve.
///
/// Why: a word's GIN lookup costs its posting list across the whole
/// deployment, whoever searches: 3 ms for a common word, 7–12 ms as a
/// prefix, on the bench's million messages, while reading 500 messages and
/// checking each costs well under a millisecond. The planner misjudges
/// that (it ANDs the GIN bitmap with a conversation of 500 rows); the
/// conversations' size, known before the query, decides instead.
pub const SEARCH_HITS_SCAN: &str = search_hits!("(search_vector @@ $1::text::tsquery) IS TRUE");

/// The statement for conversations holding `seqs` seqs in all.
pub fn search_hits(seqs: i64) -> &'static str {
    if seqs <= SCAN_BELOW {
        SEARCH_HITS_SCAN
    } else {
        SEARCH_HITS
    }
}

/// The name of [`search_hits`]'s statement in `chat_db_query_seconds`.
pub fn search_hits_query(seqs: i64) -> &'static str {
    if seqs <= SCAN_BELOW {
        "search_scan"
    } else {
        "search"
    }
}

/// `q` split for [`BUILD_QUERY`]: the text read by `websearch_to_tsquery`,
/// and the last word when it is to match as a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    pub web: String,
    pub prefix: Option<String>,
}

/// Splits `q` (see the module documentation). Control characters become
/// spaces: PostgreSQL text cannot hold NUL, and none of them means anything
/// to a search.
pub fn terms(q: &str) -> Terms {
    let q: String = q
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = q.trim_end();
    let start = trimmed
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8());
    let (rest, word) = trimmed.split_at(start);
    let plain = word.chars().count() >= MIN_PREFIX_CHARS && word.chars().all(char::is_alphanumeric);
    // Inside an unclosed phrase, the word belongs to the phrase.
    let in_phrase = rest.matches('"').count() % 2 == 1;
    // "a or dead": the word is an alternative, not another requirement.
    let after_or = rest
        .split_whitespace()
        .next_back()
        .is_some_and(|w| w.eq_ignore_ascii_case("or"));
    if plain && !in_phrase && !after_or {
        Terms {
            web: rest.to_owned(),
            prefix: Some(word.to_owned()),
        }
    } else {
        Terms {
            web: q,
            prefix: None,
        }
    }
}

/// Where a page ended: the last hit's rank, time and id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    pub rank: f32,
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    const LEN: usize = 4 + 8 + 16;

    /// Opaque: base64url of the rank's bits, the time in microseconds and
    /// the id, 28 bytes.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(Self::LEN);
        bytes.extend_from_slice(&self.rank.to_bits().to_be_bytes());
        bytes.extend_from_slice(&self.created_at.timestamp_micros().to_be_bytes());
        bytes.extend_from_slice(self.id.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `None` for anything [`Cursor::encode`] cannot have made.
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        if bytes.len() != Self::LEN {
            return None;
        }
        let rank = f32::from_bits(u32::from_be_bytes(bytes[0..4].try_into().ok()?));
        if !rank.is_finite() || rank < 0.0 {
            return None;
        }
        let micros = i64::from_be_bytes(bytes[4..12].try_into().ok()?);
        let created_at = DateTime::from_timestamp_micros(micros)?;
        let id = Uuid::from_slice(&bytes[12..]).ok()?;
        Some(Self {
            rank,
            created_at,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(q: &str) -> (String, Option<String>) {
        let t = terms(q);
        (t.web, t.prefix)
    }

    #[test]
    fn the_last_plain_word_is_a_prefix() {
        assert_eq!(
            split("great dead"),
            ("great ".to_owned(), Some("dead".to_owned()))
        );
        assert_eq!(split("dead  "), (String::new(), Some("dead".to_owned())));
        assert_eq!(split("łódź"), (String::new(), Some("łódź".to_owned())));
        assert_eq!(split("5x5"), (String::new(), Some("5x5".to_owned())));
    }

    #[test]
    fn anything_else_is_read_as_typed() {
        for q in [
            "de",
            "great de",
            "-dead",
            "\"great dead",
            "\"great dead\"",
            "squat or dead",
            "squat OR dead",
            "dead:*",
            "don't",
            "e-mail",
            "'",
            "&|!()",
            "",
        ] {
            assert_eq!(split(q), (q.to_owned(), None), "{q:?}");
        }
    }

    #[test]
    fn control_characters_become_spaces() {
        assert_eq!(
            split("a\0b\tdead"),
            ("a b ".to_owned(), Some("dead".to_owned()))
        );
        assert_eq!(split("x\0"), ("x ".to_owned(), None));
    }

    #[test]
    fn cursors_round_trip_and_nothing_else_decodes() {
        let c = Cursor {
            rank: 0.1,
            created_at: DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        let nan = {
            let mut bytes = f32::NAN.to_bits().to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0; 24]);
            URL_SAFE_NO_PAD.encode(bytes)
        };
        for bad in [
            "",
            "x",
            "!!!!",
            &c.encode()[1..],
            &format!("{}A", c.encode()),
            &nan,
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad:?}");
        }
    }
}
