// The ChatBox's state, with no DOM and no network: conversations, one
// chat's messages by seq, pending sends, read marks, what the message list
// shows (day separators, the unread divider, grouping, which bubble says
// "Read"), drafts and links. The views render from it; the unit tests in
// e2e/unit drive it under node's own test runner.

import { CHANGE_FRAMES, SeqTracker, applyChange, followOriginal, isDeleted, mentionsMe } from './lifecycle.js';

const RANK = { sent: 0, delivered: 1, read: 2 };

/** Consecutive messages from one sender this close together form a group. */
export const GROUP_GAP_MS = 5 * 60_000;
/** The list shows "99+" past this (the launcher badge). */
export const BADGE_MAX = 99;

// ---- conversations ------------------------------------------------------

/** The conversations list: summaries as REST gives them, kept up to date by frames. */
export class Conversations {
  constructor() {
    this.byId = new Map();
  }

  /** Replaces everything with a fresh REST list. */
  reset(list) {
    this.byId = new Map(list.map((c) => [c.id, { ...c }]));
  }

  get(id) {
    return this.byId.get(id);
  }

  has(id) {
    return this.byId.has(id);
  }

  get size() {
    return this.byId.size;
  }

  remove(id) {
    return this.byId.delete(id);
  }

  /**
   * A `conversation_updated` frame. Returns false for a conversation this
   * list does not know (the caller fetches it). `open` says the chat is on
   * screen, so nothing in it counts as unread.
   */
  applyUpdate(frame, { open = false } = {}) {
    const c = this.byId.get(frame.conversation_id);
    if (!c) return false;
    // A notice counted before this client's last read mark is already read.
    c.unread_count = open || (c.read_seq ?? 0) >= (frame.seq ?? 0) ? 0 : frame.unread_count;
    c.unread_mentions = c.unread_count ? frame.unread_mentions ?? 0 : 0;
    if (frame.last_message && (frame.last_message.seq ?? 0) >= (c.last_message?.seq ?? 0)) {
      c.last_message = frame.last_message;
      c.updated_at = frame.last_message.created_at;
    }
    c.last_seq = Math.max(c.last_seq ?? 0, frame.seq ?? 0);
    return true;
  }

  /** A message seen in the open chat: the list's preview follows it. */
  noteMessage(id, m) {
    const c = this.byId.get(id);
    if (!c || (c.last_message?.seq ?? 0) > m.seq) return;
    // A message with only attachments reads as the server's previews do ("📷 Photo").
    c.last_message = { id: m.id, seq: m.seq, sender_id: m.sender_id, content: messagePreview(m), created_at: m.created_at };
    c.updated_at = m.created_at;
    c.last_seq = Math.max(c.last_seq ?? 0, m.seq);
  }

  /**
   * An edit or delete of the conversation's last message: its preview
   * follows (a change is not a message: nothing else in the row moves).
   */
  noteChange(frame) {
    const c = this.byId.get(frame.conversation_id);
    const last = c?.last_message;
    if (!last || last.id !== frame.message_id) return false;
    if (frame.type === 'message_edited' && !last.deleted) c.last_message = { ...last, content: frame.content };
    else if (frame.type === 'message_deleted') c.last_message = { ...last, content: '', attachments: undefined, deleted: true };
    else return false;
    return true;
  }

  /**
   * Marks everything up to `seq` read here (the reader saw it); `seen` is
   * how many messages from others that newly covers, so a reader halfway
   * through a backlog still sees the rest counted.
   */
  markRead(id, seq, seen = Infinity) {
    const c = this.byId.get(id);
    if (!c) return false;
    const before = c.unread_count;
    c.read_seq = Math.max(c.read_seq ?? 0, seq);
    c.unread_count = (c.last_seq ?? 0) <= c.read_seq ? 0 : Math.max(0, (c.unread_count || 0) - seen);
    // The mentions are among the unread: none left unread, none left to flag.
    const mentions = c.unread_mentions;
    if (!c.unread_count) c.unread_mentions = 0;
    return before !== c.unread_count || mentions !== c.unread_mentions;
  }

  /** Newest activity first; ties by id so the order is stable. */
  sorted() {
    return [...this.byId.values()].sort((a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at) || b.id - a.id);
  }

  unreadTotal() {
    let n = 0;
    for (const c of this.byId.values()) n += c.unread_count || 0;
    return n;
  }
}

export function badgeText(unread) {
  return unread > BADGE_MAX ? `${BADGE_MAX}+` : String(unread);
}

/**
 * The launcher's accessible name. It contains what the badge shows ("99+"),
 * so what a speech-input user reads on screen is what they can say.
 */
export function launcherLabel(open, unread) {
  const base = open ? 'Close chat' : 'Open chat';
  return unread > 0 ? `${base}, ${badgeText(unread)} unread` : base;
}

// ---- one chat -----------------------------------------------------------

/**
 * One open conversation. `status` is what the view can offer: 'loading',
 * 'ready', 'failed' (the load failed: retry), 'removed' (the user is no
 * longer a member: nothing can be sent).
 */
export class ChatModel {
  constructor({ id, me }) {
    this.id = id;
    this.me = me;
    this.status = 'loading';
    this.error = null;
    this.kind = null;
    this.name = null;
    this.createdBy = null;
    this.messages = new Map(); // seq -> message
    this.pending = new Map(); // client_msg_id -> { content, state, at, error }
    this.participants = new Map(); // user_id -> participant
    this.oldest = null;
    this.hasMore = false;
    /** The first unread message when the chat was opened (the divider), or null. */
    this.firstUnread = null;
    /** The highest seq this client has marked read. */
    this.readSent = 0;
    /** A catch-up after `resync` failed: a gap the view must show. */
    this.gap = false;
    /** The highest seq held, of messages and changes alike: where the room connection resumes. */
    this.seqs = new SeqTracker();
  }

  /** The conversation's REST detail. `readSeq`: the reader's mark when they opened it. */
  load(detail, { readSeq = 0 } = {}) {
    this.kind = detail.type;
    this.name = detail.name;
    this.createdBy = detail.created_by;
    this.participants = new Map(detail.participants.map((p) => [p.user_id, { ...p }]));
    for (const m of detail.messages) this.messages.set(m.seq, m);
    this.oldest = detail.messages[0]?.seq ?? null;
    this.hasMore = detail.has_more;
    this.seqs.raise(this.maxSeq());
    this.readSent = Math.max(this.readSent, readSeq);
    const me = this.participants.get(this.me);
    const mark = Math.max(readSeq, me?.read_seq ?? 0);
    this.readSent = Math.max(this.readSent, mark);
    this.firstUnread = this.firstFromOthersAfter(mark);
    this.unreadMark = mark;
    this.status = 'ready';
    this.error = null;
  }

  /** Participants changed (a `conversation_changed`): keeps the read marks learned since. */
  refresh(detail) {
    this.kind = detail.type;
    this.name = detail.name;
    this.createdBy = detail.created_by;
    const next = new Map();
    for (const p of detail.participants) {
      const known = this.participants.get(p.user_id);
      next.set(p.user_id, {
        ...p,
        delivered_seq: Math.max(p.delivered_seq ?? 0, known?.delivered_seq ?? 0),
        read_seq: Math.max(p.read_seq ?? 0, known?.read_seq ?? 0),
      });
    }
    this.participants = next;
  }

  firstFromOthersAfter(seq) {
    let first = null;
    for (const [s, m] of this.messages) if (s > seq && m.sender_id !== this.me && (first === null || s < first)) first = s;
    return first;
  }

  /** True while the unread divider's message is older than anything loaded. */
  needsOlderForDivider() {
    return this.hasMore && this.unreadMark != null && this.oldest != null && this.oldest > this.unreadMark + 1;
  }

  get isGroup() {
    return this.kind === 'group';
  }

  /** May the reader rename the group and change its members? */
  get canManage() {
    return this.isGroup && this.createdBy === this.me && this.participants.has(this.me);
  }

  /** What the message menu needs to know about the reader (lifecycle.menuActions). */
  get permissions() {
    return { me: this.me, isGroup: this.isGroup, createdBy: this.createdBy, role: this.participants.get(this.me)?.role ?? null };
  }

  title(fallback = 'Chat') {
    if (this.name) return this.name;
    const other = [...this.participants.values()].find((p) => p.user_id !== this.me);
    return other ? other.full_name : fallback;
  }

  others() {
    return [...this.participants.values()].filter((p) => p.user_id !== this.me);
  }

  /** Messages from others with a seq in (after, upTo]. */
  countFromOthers(after, upTo) {
    let n = 0;
    for (const [seq, m] of this.messages) if (seq > after && seq <= upTo && m.sender_id !== this.me) n += 1;
    return n;
  }

  maxSeq() {
    let top = 0;
    for (const seq of this.messages.keys()) top = Math.max(top, seq);
    return top;
  }

  /** Adds a message from a frame or a page; false when it was known. */
  addMessage(m) {
    if (this.messages.has(m.seq)) return false;
    this.messages.set(m.seq, m);
    if (m.sender_id === this.me && m.client_msg_id) this.pending.delete(m.client_msg_id);
    return true;
  }

  /**
   * A message from history in its current state: a held one is replaced
   * (a catch-up after `resync` re-reads what is shown, since changes in
   * the gap may have edited or deleted it), a new one added.
   */
  upsert(m) {
    if (!this.messages.has(m.seq)) return this.addMessage(m);
    this.messages.set(m.seq, m);
    return false;
  }

  /** The seq of the loaded message with this id, or null. */
  seqOf(id) {
    for (const [seq, m] of this.messages) if (m.id === id) return seq;
    return null;
  }

  /**
   * A `message_edited`, `message_deleted` or `reaction` frame: the message
   * it names changes in place, and so do the quotes of replies to it.
   * Returns the keys of the items that changed (empty when none is loaded).
   */
  applyChange(frame) {
    if (!CHANGE_FRAMES.has(frame.type)) return [];
    const changed = [];
    const seq = this.messages.has(frame.message_seq) && this.messages.get(frame.message_seq).id === frame.message_id ? frame.message_seq : this.seqOf(frame.message_id);
    if (seq != null) {
      const m = this.messages.get(seq);
      const next = applyChange(m, frame, this.me);
      if (next !== m) {
        this.messages.set(seq, next);
        changed.push(`m:${seq}`);
      }
    }
    if (frame.type !== 'reaction') {
      for (const [s, m] of this.messages) {
        const reply = followOriginal(m.reply_to, frame);
        if (reply !== m.reply_to) {
          this.messages.set(s, { ...m, reply_to: reply });
          changed.push(`m:${s}`);
        }
      }
    }
    return changed;
  }

  /**
   * A page of history from `after_seq` = `after` forward, filling the
   * stretch between an older message (a search hit) and what is loaded.
   * Messages already held keep their live state.
   */
  addRange(page, after) {
    for (const m of page.messages) if (!this.messages.has(m.seq)) this.messages.set(m.seq, m);
    const first = page.messages[0]?.seq;
    if (first != null && (this.oldest == null || first < this.oldest)) {
      this.oldest = first;
      // Whatever came before the stretch is still there to page back to.
      this.hasMore = after > 0;
    }
  }

  /** An older page (REST, `before_seq`). */
  addOlder(page) {
    for (const m of page.messages) this.messages.set(m.seq, m);
    if (page.messages.length) this.oldest = Math.min(this.oldest ?? Infinity, page.messages[0].seq);
    this.hasMore = page.has_more;
    if (this.firstUnread === null || (this.unreadMark != null && this.firstUnread > this.unreadMark)) {
      this.firstUnread = this.firstFromOthersAfter(this.unreadMark ?? this.readSent);
    }
  }

  /**
   * A new send: shown at once as "Sending…"; `attachments`: the uploads it
   * carries; `replyTo`: the quote of the message it answers; `mentions`:
   * the user ids it mentions.
   */
  queue(clientMsgId, content, at = new Date().toISOString(), attachments = [], { replyTo = null, mentions = [] } = {}) {
    this.pending.set(clientMsgId, { content, attachments, replyTo, mentions, state: 'sending', at, error: null });
  }

  /**
   * An `attachment_updated` (or a re-signed attachment): replaces it in
   * every message and pending send that shows it. Returns the keys of the
   * items that changed (empty when it is not in this chat).
   */
  updateAttachment(fresh) {
    const changed = [];
    for (const [seq, m] of this.messages) {
      const next = replaceAttachment(m.attachments, fresh);
      if (next !== m.attachments) {
        this.messages.set(seq, { ...m, attachments: next });
        changed.push(`m:${seq}`);
      }
    }
    for (const [id, p] of this.pending) {
      const next = replaceAttachment(p.attachments, fresh);
      if (next !== p.attachments) {
        p.attachments = next;
        changed.push(`p:${id}`);
      }
    }
    return changed;
  }

  ack(frame) {
    const p = this.pending.get(frame.client_msg_id);
    if (!p) return false;
    p.state = 'acked';
    p.seq = frame.seq;
    return true;
  }

  fail(clientMsgId, error) {
    const p = this.pending.get(clientMsgId);
    if (!p) return;
    p.state = 'failed';
    p.error = error;
  }

  retry(clientMsgId) {
    const p = this.pending.get(clientMsgId);
    if (!p) return;
    p.state = 'sending';
    p.error = null;
  }

  /** The reader is no longer a member: nothing more goes out. */
  removed() {
    this.status = 'removed';
    for (const p of this.pending.values()) {
      if (p.state !== 'acked') {
        p.state = 'failed';
        p.error = 'You are no longer a member of this group.';
      }
    }
  }

  receipt(frame) {
    const p = this.participants.get(frame.user_id) ?? { user_id: frame.user_id };
    const before = `${p.delivered_seq}/${p.read_seq}`;
    p.delivered_seq = Math.max(p.delivered_seq ?? 0, frame.delivered_seq ?? 0);
    p.read_seq = Math.max(p.read_seq ?? 0, frame.read_seq ?? 0);
    this.participants.set(frame.user_id, p);
    return before !== `${p.delivered_seq}/${p.read_seq}`;
  }

  /**
   * sent / delivered / read, from everyone else's marks and from what the
   * message said when it was stored (a message to members who were all
   * connected arrives "delivered": the room sends no receipt for that).
   */
  statusOf(m) {
    const others = this.others();
    let status = 'sent';
    if (others.length && others.every((p) => (p.read_seq ?? 0) >= m.seq)) status = 'read';
    else if (others.length && others.every((p) => Math.max(p.delivered_seq ?? 0, p.read_seq ?? 0) >= m.seq)) status = 'delivered';
    return RANK[m.status] > RANK[status] ? m.status : status;
  }

  /** The seq of the reader's last message everyone else has read (0: none). */
  lastReadMine() {
    const others = this.others();
    if (!others.length) return 0;
    const read = Math.min(...others.map((p) => p.read_seq ?? 0));
    let last = 0;
    for (const [seq, m] of this.messages) if (m.sender_id === this.me && seq <= read && seq > last) last = seq;
    return last;
  }

  /**
   * What the message list shows, in order, each item with a stable `key`:
   * the "older messages" row, day separators, the unread divider, messages
   * (with grouping and which one says what), then sends not yet stored.
   */
  items(now = new Date(), locale = undefined) {
    const out = [];
    if (this.hasMore) out.push({ key: 'more', kind: 'more' });
    const seqs = [...this.messages.keys()].sort((a, b) => a - b);
    const readMine = this.lastReadMine();
    let prev = null;
    let prevDay = null;
    for (const seq of seqs) {
      const m = this.messages.get(seq);
      const at = new Date(m.created_at);
      const day = dayKey(at);
      let breakGroup = false;
      if (day !== prevDay) {
        out.push({ key: `day:${day}`, kind: 'day', label: dayLabel(at, now, locale) });
        prevDay = day;
        breakGroup = true;
      }
      if (seq === this.firstUnread) {
        out.push({ key: 'unread', kind: 'unread' });
        breakGroup = true;
      }
      const mine = m.sender_id === this.me;
      const continues = !breakGroup && prev && prev.m.sender_id === m.sender_id && at - new Date(prev.m.created_at) < GROUP_GAP_MS;
      let status = null;
      if (mine) {
        if (seq === readMine) status = 'read';
        else if (seq > readMine) status = this.statusOf(m);
      }
      const item = { key: `m:${seq}`, kind: 'message', seq, m, mine, first: !continues, last: true, status, deleted: isDeleted(m), mentioned: mentionsMe(m, this.me) };
      if (continues) prev.last = false;
      out.push(item);
      prev = item;
    }
    const stored = new Set();
    for (const m of this.messages.values()) if (m.sender_id === this.me && m.client_msg_id) stored.add(m.client_msg_id);
    for (const [id, p] of this.pending) {
      if (stored.has(id)) continue;
      const status = p.state === 'failed' ? 'failed' : p.state === 'acked' ? 'sent' : 'sending';
      out.push({ key: `p:${id}`, kind: 'pending', id, content: p.content, attachments: p.attachments ?? [], replyTo: p.replyTo ?? null, at: p.at, mine: true, first: true, last: true, status, error: p.error });
    }
    return out;
  }
}

// ---- read tracking ------------------------------------------------------

/**
 * What to mark read: the highest seq on screen, when the reader can see the
 * page (the tab is visible and the panel open). Null: nothing new to mark.
 */
export function readTarget({ visible, canSee, readSent }) {
  if (!canSee || !visible || visible.size === 0) return null;
  let top = 0;
  for (const seq of visible) top = Math.max(top, seq);
  return top > readSent ? top : null;
}

// ---- days and times -----------------------------------------------------

/** A local calendar day, as a sortable key. */
export function dayKey(d) {
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
}

/** "Today", "Yesterday", a weekday this week, else a date (with the year when it is not this year's). */
export function dayLabel(d, now = new Date(), locale = undefined) {
  const days = Math.round((startOfDay(now) - startOfDay(d)) / 86_400_000);
  if (days === 0) return 'Today';
  if (days === 1) return 'Yesterday';
  if (days > 1 && days < 7) return d.toLocaleDateString(locale, { weekday: 'long' });
  const opts = { weekday: 'short', day: 'numeric', month: 'short' };
  if (d.getFullYear() !== now.getFullYear()) opts.year = 'numeric';
  return d.toLocaleDateString(locale, opts);
}

/** A time of day for a bubble (its day is on the separator above it). */
export function timeLabel(d, locale = undefined) {
  return d.toLocaleTimeString(locale, { hour: '2-digit', minute: '2-digit' });
}

/** The conversations list's time: today a time, else "Yesterday" or a date. */
export function listTime(d, now = new Date(), locale = undefined) {
  const days = Math.round((startOfDay(now) - startOfDay(d)) / 86_400_000);
  if (days === 0) return timeLabel(d, locale);
  if (days === 1) return 'Yesterday';
  const opts = { day: 'numeric', month: 'short' };
  if (d.getFullYear() !== now.getFullYear()) opts.year = 'numeric';
  return d.toLocaleDateString(locale, opts);
}

function startOfDay(d) {
  return new Date(d.getFullYear(), d.getMonth(), d.getDate()).getTime();
}

// ---- drafts ---------------------------------------------------------------

/** Unsent text per conversation, kept across reloads (in localStorage). */
export class Drafts {
  constructor(store, userId) {
    this.store = store;
    this.prefix = `vibe-chat-draft:${userId}:`;
  }
  get(conversationId) {
    try {
      return this.store.getItem(this.prefix + conversationId) ?? '';
    } catch {
      return '';
    }
  }
  set(conversationId, text) {
    try {
      if (text) this.store.setItem(this.prefix + conversationId, text);
      else this.store.removeItem(this.prefix + conversationId);
    } catch {
      // Storage full or blocked: the draft lives only in the page.
    }
  }
  clear(conversationId) {
    this.set(conversationId, '');
  }
}

// ---- text -----------------------------------------------------------------

const URL_RE = /\bhttps?:\/\/[^\s<>"]+/gi;

/**
 * Splits text into plain runs and links. Only http and https become links;
 * trailing punctuation stays text ("see https://x.io/a." links without the
 * dot), and an unbalanced closing parenthesis is left out.
 */
export function linkify(text) {
  const out = [];
  let last = 0;
  for (const match of text.matchAll(URL_RE)) {
    let url = match[0];
    url = trimUrl(url);
    const start = match.index;
    let href = null;
    try {
      const parsed = new URL(url);
      if (parsed.protocol === 'http:' || parsed.protocol === 'https:') href = parsed.href;
    } catch {
      href = null;
    }
    if (!href) continue;
    if (start > last) out.push({ text: text.slice(last, start) });
    out.push({ text: url, href });
    last = start + url.length;
  }
  if (last < text.length) out.push({ text: text.slice(last) });
  return out;
}

function trimUrl(url) {
  for (;;) {
    const end = url[url.length - 1];
    if (/[.,;:!?'*]/.test(end)) url = url.slice(0, -1);
    else if (end === ')' && count(url, '(') < count(url, ')')) url = url.slice(0, -1);
    else return url;
  }
}

function count(s, ch) {
  return s.split(ch).length - 1;
}

/** "Alex Rivera" → "AR"; one name → its first letter. */
export function initials(name) {
  const words = (name ?? '').trim().split(/\s+/).filter(Boolean);
  if (!words.length) return '?';
  const first = [...words[0]][0] ?? '';
  const last = words.length > 1 ? [...words[words.length - 1]][0] ?? '' : '';
  return (first + last).toUpperCase();
}

/**
 * A colour per user for their initials: each has at least 4.5:1 contrast
 * with white text.
 */
export const AVATAR_COLOURS = ['#1d4ed8', '#7c3aed', '#b91c1c', '#047857', '#9a3412', '#0f766e', '#be185d', '#4338ca'];

export function avatarColour(userId) {
  const n = Math.abs(Number(userId) || 0);
  return AVATAR_COLOURS[n % AVATAR_COLOURS.length];
}

export function firstName(full) {
  return (full ?? '').trim().split(/\s+/)[0] || 'Someone';
}

// ---- JWT (a host's token) -------------------------------------------------

/** The claims of a JWT, unverified: the client only reads its own token's expiry and name. */
export function jwtClaims(token) {
  const part = String(token).split('.')[1];
  if (!part) return null;
  try {
    const json = atobUrl(part);
    return JSON.parse(json);
  } catch {
    return null;
  }
}

function atobUrl(s) {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(s.length / 4) * 4, '=');
  const bin = atob(b64);
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

// ---- attachments ------------------------------------------------------------

/** At most this many attachments go with one message (the server's limit). */
export const MAX_ATTACHMENTS = 10;

/**
 * What the client accepts before uploading, by MIME type: a courtesy so a
 * wrong file fails at once instead of after its upload. The server sniffs
 * the bytes and has the last word (and its own size limits).
 */
const ACCEPTED = [
  [/^image\/(jpeg|png|webp|gif)$/, 'image'],
  [/^video\/(mp4|webm|quicktime)$/, 'video'],
  [/^audio\/(webm|mp4|aac|x-m4a|m4a|mpeg|ogg)(;.*)?$/, 'audio'],
  [/^application\/pdf$/, 'file'],
];
/** The largest upload any kind allows (video): anything bigger fails at once. */
export const MAX_UPLOAD_BYTES = 100 * 1024 * 1024;
/** What the file chooser offers. */
export const ACCEPT_ATTRIBUTE = 'image/jpeg,image/png,image/webp,image/gif,video/mp4,video/webm,audio/webm,audio/mp4,application/pdf';

/** The kind a file will probably be, from its type; null: not accepted. */
export function kindOfMime(mime) {
  const type = String(mime ?? '').toLowerCase();
  for (const [re, kind] of ACCEPTED) if (re.test(type)) return kind;
  return null;
}

/** Why a file cannot be sent (a sentence), or null: try it. */
export function precheck({ type, size }) {
  if (!kindOfMime(type)) return 'This type of file can’t be sent (photos, videos, voice messages and PDFs can).';
  if (size > MAX_UPLOAD_BYTES) return `This file is too large (${formatBytes(size)}; at most ${formatBytes(MAX_UPLOAD_BYTES)}).`;
  if (size === 0) return 'This file is empty.';
  return null;
}

/** "812 B", "14 KB", "1.2 MB": a size for people. */
export function formatBytes(n) {
  const bytes = Math.max(0, Number(n) || 0);
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KB', 'MB', 'GB'];
  let v = bytes / 1024;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return `${v < 10 ? v.toFixed(1).replace(/\.0$/, '') : Math.round(v)} ${units[u]}`;
}

/** "0:07", "12:34", "1:02:03": a duration for a voice message or a video. */
export function formatDuration(ms) {
  // A WebM from MediaRecorder reports an Infinity duration: show 0:00, not "NaN".
  const n = Number(ms);
  const total = Number.isFinite(n) ? Math.max(0, Math.floor(n / 1000)) : 0;
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

/**
 * A message without text in the conversations list (the same words the
 * server's previews use): "📷 Photo", "🎤 Voice message", "📎 3 attachments".
 */
export function attachmentSummary(attachments) {
  if (!attachments?.length) return '';
  if (attachments.length > 1) return `📎 ${attachments.length} attachments`;
  const a = attachments[0];
  switch (a.kind) {
    case 'image':
      return '📷 Photo';
    case 'video':
      return '🎬 Video';
    case 'audio':
      return '🎤 Voice message';
    default:
      return `📄 ${a.name || 'File'}`;
  }
}

/** What a list or an announcement says for a message: its text, else what it carries. */
export function messagePreview(m) {
  if (isDeleted(m) || m?.deleted) return 'Message deleted';
  const text = m?.content ?? '';
  return text.trim() || !m?.attachments?.length ? text : attachmentSummary(m.attachments);
}

/** What a screen reader calls an attachment. */
export function attachmentLabel(a) {
  switch (a.kind) {
    case 'image':
      return 'Photo';
    case 'video':
      return a.duration_ms ? `Video, ${formatDuration(a.duration_ms)}` : 'Video';
    case 'audio':
      return a.duration_ms ? `Voice message, ${formatDuration(a.duration_ms)}` : 'Voice message';
    default:
      return a.name || 'File';
  }
}

/**
 * The size to show media at inside a `maxW` × `maxH` box, keeping its
 * aspect ratio and never enlarging it; known before the bytes arrive, so
 * nothing below moves when they do. Unknown dimensions get a square-ish box.
 */
export function fitBox(width, height, maxW = 240, maxH = 300) {
  const w = Number(width) || 0;
  const h = Number(height) || 0;
  if (w <= 0 || h <= 0) return { width: maxW, height: Math.round((maxW * 3) / 4) };
  const scale = Math.min(1, maxW / w, maxH / h);
  return { width: Math.max(1, Math.round(w * scale)), height: Math.max(1, Math.round(h * scale)) };
}

/**
 * The MediaRecorder type for a voice message: WebM/Opus where the browser
 * records it, else MP4/AAC (Safari); the server accepts both. "" lets the
 * browser choose.
 */
export function recorderMime(isTypeSupported) {
  for (const t of ['audio/webm;codecs=opus', 'audio/webm', 'audio/mp4;codecs=mp4a.40.2', 'audio/mp4']) {
    try {
      if (isTypeSupported(t)) return t;
    } catch {
      // An old browser that throws for a type it does not know.
    }
  }
  return '';
}

/** Attachments with `fresh` put in place of the one with its id; the same array when it is not there. */
export function replaceAttachment(list, fresh) {
  if (!list?.some((a) => a.id === fresh.id)) return list;
  return list.map((a) => (a.id === fresh.id ? { ...a, ...fresh } : a));
}

/**
 * The files chosen for the next message, each uploading, uploaded, failed
 * or cancelled. Pure bookkeeping: the controller runs the uploads and
 * reports to it; the view renders `items()`. A voice recording is an item
 * too (`auto`: it is sent on its own as soon as it is uploaded).
 */
export class UploadTray {
  constructor() {
    this.byKey = new Map();
    this.next = 1;
  }

  /** A new file: returns its key, or null when the tray is full. */
  add({ name, type, size, durationMs = null, auto = false, error = null }) {
    if (this.byKey.size >= MAX_ATTACHMENTS) return null;
    const key = `u${this.next++}`;
    this.byKey.set(key, {
      key,
      name: name || 'file',
      type: type || '',
      kind: kindOfMime(type) ?? 'file',
      size: size ?? 0,
      durationMs,
      auto,
      // A file refused before upload starts out failed, with no retry.
      state: error ? 'refused' : 'uploading',
      loaded: 0,
      error,
      attachment: null,
    });
    return key;
  }

  get(key) {
    return this.byKey.get(key);
  }

  get size() {
    return this.byKey.size;
  }

  /** Room left for more files. */
  get room() {
    return MAX_ATTACHMENTS - this.byKey.size;
  }

  progress(key, loaded, total) {
    const item = this.byKey.get(key);
    if (!item || item.state !== 'uploading') return false;
    item.loaded = loaded;
    if (total) item.size = total;
    return true;
  }

  done(key, attachment) {
    const item = this.byKey.get(key);
    if (!item || item.state !== 'uploading') return false;
    item.state = 'done';
    item.loaded = item.size;
    item.attachment = attachment;
    item.kind = attachment.kind ?? item.kind;
    return true;
  }

  fail(key, error) {
    const item = this.byKey.get(key);
    if (!item || item.state !== 'uploading') return false;
    item.state = 'failed';
    item.error = error;
    return true;
  }

  /** A failed upload starts again (a refused file cannot). */
  retry(key) {
    const item = this.byKey.get(key);
    if (!item || item.state !== 'failed') return false;
    item.state = 'uploading';
    item.loaded = 0;
    item.error = null;
    return true;
  }

  /** Cancels (the caller aborts the request) or removes an item. */
  remove(key) {
    return this.byKey.delete(key);
  }

  items() {
    return [...this.byKey.values()];
  }

  /** Uploads still running: Send waits for them. */
  get busy() {
    return this.items().some((i) => i.state === 'uploading' && !i.auto);
  }

  /** Failed or refused items the user must retry or remove before sending. */
  get blocked() {
    return this.items().some((i) => (i.state === 'failed' || i.state === 'refused') && !i.auto);
  }

  /** The uploaded attachments a message would carry, in the order chosen. */
  ready() {
    return this.items().filter((i) => i.state === 'done' && !i.auto).map((i) => i.attachment);
  }

  /**
   * Can Send go now, and if not, why (for the hint beside it). A message
   * needs text or an attachment, and no upload may be unfinished.
   */
  sendState(text) {
    const uploading = this.items().filter((i) => i.state === 'uploading' && !i.auto).length;
    if (uploading) return { ok: false, why: uploading === 1 ? 'Waiting for 1 upload…' : `Waiting for ${uploading} uploads…` };
    if (this.blocked) return { ok: false, why: 'Retry or remove the file that failed.' };
    return { ok: Boolean(String(text ?? '').trim()) || this.ready().length > 0, why: '' };
  }

  /** After a send: the items it took leave the tray. */
  takeReady() {
    const taken = this.ready();
    for (const i of this.items()) if (i.state === 'done' && !i.auto) this.byKey.delete(i.key);
    return taken;
  }
}

/**
 * The images and videos of the loaded messages, oldest first: what the
 * full-size viewer steps through from a bubble.
 */
export function chatMedia(model) {
  const out = [];
  const seqs = [...model.messages.keys()].sort((a, b) => a - b);
  for (const seq of seqs) {
    const m = model.messages.get(seq);
    for (const a of m.attachments ?? []) if (a.kind === 'image' || a.kind === 'video') out.push({ ...a, seq, sender_id: m.sender_id, created_at: m.created_at });
  }
  return out;
}
