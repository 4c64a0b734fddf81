// A message after it is sent, with no DOM and no network: edits, deletes
// and reactions applied to a message (from `message_edited`,
// `message_deleted` and `reaction` frames), who may do what to it, the
// resume point that change frames move like messages, mentions in the
// composer, and search snippets. The views render from it; the unit tests
// in e2e/unit drive it under node's own test runner. See the "Message
// lifecycle" section of docs/PROTOCOL.md.

/** The sender may edit a message this long after sending it (the server's EDIT_WINDOW). */
export const EDIT_WINDOW_MS = 24 * 3_600_000;
/** The palette the message menu offers; any other emoji can be typed. */
export const QUICK_REACTIONS = ['👍', '❤️', '😂', '😮', '😢', '🙏', '💪', '🔥'];
/** A quote shows this many characters (the server's PREVIEW_CHARS). */
export const QUOTE_CHARS = 120;
/** The mention picker offers at most this many members. */
export const MENTION_CHOICES = 6;
/** What the user typed after "@" stops being a mention query past this. */
const MENTION_QUERY_MAX = 40;

export const CHANGE_FRAMES = new Set(['message_edited', 'message_deleted', 'reaction']);

// ---- the resume point -----------------------------------------------------

/**
 * The highest seq a chat holds, of messages and of changes alike: the room
 * gives both one order, so a reaction's seq moves the resume point as a
 * message's does (resuming from the last message would replay every change
 * after it, and a change would look like a hole in the messages).
 *
 * `note(seq)` says what to do with a frame: 'dup' (held already: drop it),
 * 'next' (apply it), or 'gap' (a seq before it never arrived: resume from
 * `top` instead of applying it). A hole that is still there after one
 * resume is accepted, so a seq the room never relays cannot make a client
 * reconnect for ever.
 */
export class SeqTracker {
  constructor(top = 0) {
    this.top = top;
    this.resumedAt = null;
  }

  /** Everything up to `seq` is held (a REST page, a catch-up). */
  raise(seq) {
    if (seq > this.top) this.top = seq;
  }

  note(seq) {
    if (!(seq > 0)) return 'next'; // not in the conversation's order
    if (seq <= this.top) return 'dup';
    if (seq !== this.top + 1 && this.resumedAt !== this.top) {
      this.resumedAt = this.top;
      return 'gap';
    }
    this.top = seq;
    this.resumedAt = null;
    return 'next';
  }
}

// ---- a message's state -----------------------------------------------------

export function isDeleted(m) {
  return Boolean(m?.deleted_at);
}

/** A deleted message as the server shows it: who and when, nothing of what. */
export function tombstone(m, deletedAt) {
  return {
    id: m.id,
    seq: m.seq,
    conversation_id: m.conversation_id,
    sender_id: m.sender_id,
    created_at: m.created_at,
    client_msg_id: m.client_msg_id,
    status: m.status,
    content: '',
    deleted_at: deletedAt ?? m.deleted_at ?? new Date().toISOString(),
  };
}

/**
 * A change frame applied to the message it names; the same object when it
 * changes nothing (a replayed frame, an edit older than what is shown, a
 * reaction on a tombstone). Applying a frame twice is harmless.
 */
export function applyChange(m, frame, me) {
  switch (frame.type) {
    case 'message_edited': {
      if (isDeleted(m)) return m;
      // A replay may bring an older edit after history showed a newer one.
      if (m.edited_at && Date.parse(frame.edited_at) < Date.parse(m.edited_at)) return m;
      if (m.content === frame.content && m.edited_at === frame.edited_at) return m;
      return { ...m, content: frame.content, edited_at: frame.edited_at };
    }
    case 'message_deleted':
      return isDeleted(m) ? m : tombstone(m, frame.deleted_at);
    case 'reaction': {
      if (isDeleted(m)) return m;
      const reactions = applyReaction(m.reactions ?? [], frame, me);
      return sameReactions(reactions, m.reactions ?? []) ? m : { ...m, reactions };
    }
    default:
      return m;
  }
}

/**
 * A `reaction` frame applied to a message's reactions: `count` is the
 * server's total for that emoji; who reacted is kept as far as this client
 * has heard (a live message starts with none). A count of 0 removes the chip.
 */
export function applyReaction(reactions, frame, me) {
  const i = reactions.findIndex((r) => r.emoji === frame.emoji);
  const prev = i >= 0 ? reactions[i] : { emoji: frame.emoji, count: 0, me: false, user_ids: [] };
  const on = frame.on !== false;
  const userIds = (prev.user_ids ?? []).filter((u) => u !== frame.user_id);
  if (on) userIds.push(frame.user_id);
  const count = Number.isFinite(frame.count) ? frame.count : userIds.length;
  const next = { emoji: frame.emoji, count, me: frame.user_id === me ? on : Boolean(prev.me), user_ids: userIds };
  if (count <= 0) return reactions.filter((_, j) => j !== i);
  if (i < 0) return [...reactions, next];
  return reactions.map((r, j) => (j === i ? next : r));
}

function sameReactions(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** Has the reader put this emoji on the message? */
export function reactedBy(r, me) {
  return Boolean(r?.me) || (r?.user_ids ?? []).includes(me);
}

/** Whether a click on `emoji` adds it (true) or takes it back (false). */
export function reactionToggle(m, emoji, me) {
  return !reactedBy((m.reactions ?? []).find((r) => r.emoji === emoji), me);
}

/** Cuts text to a quote, on a character boundary. */
export function cut(text, n = QUOTE_CHARS) {
  const chars = [...(text ?? '')];
  return chars.length > n ? `${chars.slice(0, n).join('')}…` : chars.join('');
}

/** The quote of `m` for a reply (the composer's, and a send not yet stored). */
export function quoteOf(m) {
  return { id: m.id, seq: m.seq, sender_id: m.sender_id, content: isDeleted(m) ? '' : cut(m.content), deleted: isDeleted(m) };
}

/** A reply's quote follows its original's edit or delete; the same object otherwise. */
export function followOriginal(reply, frame) {
  if (!reply || reply.id !== frame.message_id) return reply;
  if (frame.type === 'message_edited' && !reply.deleted) return { ...reply, content: cut(frame.content) };
  if (frame.type === 'message_deleted') return { ...reply, content: '', deleted: true };
  return reply;
}

/** Does this message mention the reader (and come from someone else)? */
export function mentionsMe(m, me) {
  return !isDeleted(m) && m.sender_id !== me && (m.mentions ?? []).includes(me);
}

// ---- who may do what -------------------------------------------------------

/** The sender, within the edit window, of a message that is not deleted. */
export function canEdit(m, me, now = Date.now()) {
  return !isDeleted(m) && m.sender_id === me && now - Date.parse(m.created_at) < EDIT_WINDOW_MS;
}

/** The sender; in a group also its creator and anyone whose role is admin. */
export function canDelete(m, { me, isGroup = false, createdBy = null, role = null }) {
  if (isDeleted(m)) return false;
  return m.sender_id === me || (isGroup && (createdBy === me || role === 'admin'));
}

/**
 * What the message menu offers for `m`, in order. A tombstone offers
 * nothing (there is nothing left to copy or answer).
 */
export function menuActions(m, ctx, now = Date.now()) {
  if (isDeleted(m)) return [];
  const out = ['reply', 'react'];
  if (canEdit(m, ctx.me, now)) out.push('edit');
  if (m.content) out.push('copy');
  if (canDelete(m, ctx)) out.push('delete');
  return out;
}

/** Exactly one emoji (one grapheme that is a pictograph, a flag or a keycap): what `react` accepts. */
export function isSingleEmoji(text) {
  const s = String(text ?? '').trim();
  if (!s) return false;
  const graphemes = typeof Intl.Segmenter === 'function' ? [...new Intl.Segmenter(undefined, { granularity: 'grapheme' }).segment(s)] : [...s];
  if (graphemes.length !== 1) return false;
  return /\p{Extended_Pictographic}|\p{Regional_Indicator}|\u20e3/u.test(s);
}

// ---- mentions --------------------------------------------------------------

/**
 * The mention being typed at the caret: the "@" that starts it (at the
 * start or after a space, so an email address is not one) and what
 * follows it up to the caret; null when the caret is not in one. Names
 * have spaces, so the query may too (up to three words).
 */
export function mentionQuery(text, caret) {
  const before = String(text ?? '').slice(0, caret);
  const at = before.lastIndexOf('@');
  if (at < 0) return null;
  if (at > 0 && !/\s/.test(before[at - 1])) return null;
  const query = before.slice(at + 1);
  if (query.length > MENTION_QUERY_MAX || /[\n@]/.test(query) || /^\s/.test(query)) return null;
  if ((query.match(/\s/g) ?? []).length > 2) return null;
  return { start: at, query };
}

/**
 * Members whose name starts with the query, or has a word that does (one
 * word typed); whole-name matches first, then by name.
 */
export function matchMembers(members, query, limit = MENTION_CHOICES) {
  const q = query.toLocaleLowerCase();
  const scored = [];
  for (const p of members) {
    const name = (p.full_name ?? '').toLocaleLowerCase();
    if (name.startsWith(q)) scored.push([0, p]);
    else if (!/\s/.test(q) && name.split(/\s+/).some((w) => w.startsWith(q))) scored.push([1, p]);
  }
  scored.sort((a, b) => a[0] - b[0] || a[1].full_name.localeCompare(b[1].full_name));
  return scored.slice(0, limit).map(([, p]) => p);
}

/** Replaces the "@query" from `start` to the caret with "@Full Name ", and says where the caret goes. */
export function insertMention(text, start, caret, name) {
  const after = text.slice(caret);
  const space = /^\s/.test(after) ? '' : ' ';
  const inserted = `@${name}${space}`;
  return { text: text.slice(0, start) + inserted + after, caret: start + inserted.length };
}

function escapeRe(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function mentionRe(name) {
  // "@Sam Patel" but not "@Sam Patelson".
  return new RegExp(`(^|[^\\p{L}\\p{N}_])@${escapeRe(name)}(?![\\p{L}\\p{N}_])`, 'u');
}

/**
 * The ids of the people picked in the composer whose "@Full Name" is
 * still in the text: a name the writer deleted is not mentioned.
 */
export function pruneMentions(text, picked) {
  const out = [];
  for (const [id, name] of picked) if (name && mentionRe(name).test(text) && !out.includes(id)) out.push(id);
  return out;
}

/**
 * Splits text into runs, marking each "@Full Name" of the given names
 * (the people the message mentions), longest names first so "@Sam Patel"
 * wins over "@Sam".
 */
export function splitMentions(text, names) {
  const list = [...new Set(names.filter(Boolean))].sort((a, b) => b.length - a.length);
  if (!list.length || !text) return text ? [{ text }] : [];
  const re = new RegExp(`@(?:${list.map(escapeRe).join('|')})(?![\\p{L}\\p{N}_])`, 'gu');
  const out = [];
  let last = 0;
  for (const match of text.matchAll(re)) {
    const start = match.index;
    if (start > 0 && /[\p{L}\p{N}_]/u.test(text[start - 1])) continue;
    if (start > last) out.push({ text: text.slice(last, start) });
    out.push({ text: match[0], mention: true });
    last = start + match[0].length;
  }
  if (last < text.length) out.push({ text: text.slice(last) });
  return out;
}

// ---- search ----------------------------------------------------------------

/**
 * A search hit's snippet as runs of plain and matched text: the server
 * puts matched words between « and ». Rendered as text nodes and <mark>,
 * never as HTML. A stray marker is kept as text; an unclosed « runs to the
 * end.
 */
export function snippetSegments(snippet) {
  const out = [];
  let run = '';
  let hit = false;
  const flush = () => {
    if (!run) return;
    const last = out[out.length - 1];
    if (last && Boolean(last.hit) === hit) last.text += run;
    else out.push(hit ? { text: run, hit: true } : { text: run });
    run = '';
  };
  for (const ch of String(snippet ?? '')) {
    if (ch === '«' && !hit) {
      flush();
      hit = true;
    } else if (ch === '»' && hit) {
      flush();
      hit = false;
    } else {
      run += ch;
    }
  }
  flush();
  return out;
}
