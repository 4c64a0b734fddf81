// Unit tests of the ChatBox's state module (chatbox/state.js): pure logic,
// no DOM, no network. Run: node --test e2e/unit/ (cargo xtask test does).

import test from 'node:test';
import assert from 'node:assert/strict';
import {
  ChatModel,
  Conversations,
  Drafts,
  badgeText,
  dayLabel,
  initials,
  jwtClaims,
  launcherLabel,
  linkify,
  listTime,
  readTarget,
  avatarColour,
  AVATAR_COLOURS,
} from '../../chatbox/state.js';

const ME = 1;
const SAM = 2;
const CASEY = 3;
const T0 = new Date(2026, 10, 27, 9, 0, 0); // 27 Nov 2026, 09:00 local

function at(minutes, base = T0) {
  return new Date(base.getTime() + minutes * 60_000).toISOString();
}

function msg(seq, sender, minutes, extra = {}) {
  return { id: `id-${seq}`, seq, sender_id: sender, content: `m${seq}`, created_at: at(minutes), ...extra };
}

function detail({ messages = [], participants, kind = 'direct', name = null, createdBy = ME, hasMore = false } = {}) {
  return {
    id: 7,
    type: kind,
    name,
    created_by: createdBy,
    participants: participants ?? [
      { user_id: ME, full_name: 'Alex Rivera', delivered_seq: 0, read_seq: 0 },
      { user_id: SAM, full_name: 'Sam Patel', delivered_seq: 0, read_seq: 0 },
    ],
    messages,
    has_more: hasMore,
  };
}

function chatWith(messages, opts = {}) {
  const chat = new ChatModel({ id: 7, me: ME });
  chat.load(detail({ messages, ...opts }), { readSeq: opts.readSeq ?? 0 });
  return chat;
}

const kinds = (items) => items.map((i) => (i.kind === 'message' ? `m${i.seq}` : i.kind === 'day' ? `day:${i.label}` : i.kind));

test('the unread divider sits before the first message from others after the read mark', () => {
  const chat = chatWith([msg(1, SAM, 0), msg(2, ME, 1), msg(3, ME, 2), msg(4, SAM, 3), msg(5, SAM, 4)], { readSeq: 2 });
  assert.equal(chat.firstUnread, 4);
  assert.deepEqual(kinds(chat.items(T0)), ['day:Today', 'm1', 'm2', 'm3', 'unread', 'm4', 'm5']);
});

test('no divider when everything was read, and none for the reader’s own messages', () => {
  assert.equal(chatWith([msg(1, SAM, 0), msg(2, ME, 1)], { readSeq: 2 }).firstUnread, null);
  assert.equal(chatWith([msg(1, SAM, 0), msg(2, ME, 1)], { readSeq: 1 }).firstUnread, null);
});

test('a divider older than the loaded page asks for older history, and an older page places it', () => {
  const chat = chatWith([msg(51, SAM, 50), msg(52, SAM, 51)], { readSeq: 10, hasMore: true });
  assert.equal(chat.needsOlderForDivider(), true);
  chat.addOlder({ messages: [msg(10, ME, 9), msg(11, SAM, 10)], has_more: true });
  assert.equal(chat.firstUnread, 11);
  assert.equal(chat.needsOlderForDivider(), false);
});

test('day separators: Today, Yesterday, a weekday, a date, and a year when it is not this one', () => {
  const now = new Date(2026, 10, 27, 12, 0);
  assert.equal(dayLabel(new Date(2026, 10, 27, 0, 5), now, 'en-GB'), 'Today');
  assert.equal(dayLabel(new Date(2026, 10, 26, 23, 55), now, 'en-GB'), 'Yesterday');
  assert.equal(dayLabel(new Date(2026, 10, 24, 8, 0), now, 'en-GB'), 'Tuesday');
  assert.match(dayLabel(new Date(2026, 9, 2, 8, 0), now, 'en-GB'), /^Fri,? 2 Oct$/);
  assert.match(dayLabel(new Date(2025, 9, 2, 8, 0), now, 'en-GB'), /^Thu,? 2 Oct 2025$/);
  const chat = chatWith([
    { ...msg(1, SAM, 0), created_at: new Date(2026, 10, 26, 22, 0).toISOString() },
    { ...msg(2, SAM, 0), created_at: new Date(2026, 10, 27, 8, 0).toISOString() },
  ], { readSeq: 2 });
  assert.deepEqual(kinds(chat.items(now, 'en-GB')), ['day:Yesterday', 'm1', 'day:Today', 'm2']);
});

test('the list shows a time today and a date before, never a date without context', () => {
  const now = new Date(2026, 10, 27, 12, 0);
  assert.match(listTime(new Date(2026, 10, 27, 9, 5), now, 'en-GB'), /^09:05$/);
  assert.equal(listTime(new Date(2026, 10, 26, 9, 5), now, 'en-GB'), 'Yesterday');
  assert.equal(listTime(new Date(2026, 9, 2, 9, 5), now, 'en-GB'), '2 Oct');
});

test('consecutive messages from one sender group until five minutes pass, another sender or a separator', () => {
  const chat = chatWith([msg(1, SAM, 0), msg(2, SAM, 1), msg(3, SAM, 7), msg(4, ME, 8), msg(5, SAM, 9)], { readSeq: 5 });
  const items = chat.items(T0).filter((i) => i.kind === 'message');
  assert.deepEqual(items.map((i) => [i.seq, i.first, i.last]), [
    [1, true, false],
    [2, false, true],
    [3, true, true],
    [4, true, true],
    [5, true, true],
  ]);
});

test('"Read" shows once, on the last message the other side read; later ones say delivered or sent', () => {
  const chat = chatWith([msg(1, ME, 0), msg(2, ME, 1), msg(3, ME, 2), msg(4, ME, 3)], {
    participants: [
      { user_id: ME, full_name: 'Alex', delivered_seq: 4, read_seq: 4 },
      { user_id: SAM, full_name: 'Sam', delivered_seq: 3, read_seq: 2 },
    ],
    readSeq: 4,
  });
  const status = () => chat.items(T0).filter((i) => i.kind === 'message').map((i) => i.status);
  assert.deepEqual(status(), [null, 'read', 'delivered', 'sent']);
  chat.receipt({ user_id: SAM, delivered_seq: 4, read_seq: 4 });
  assert.deepEqual(status(), [null, null, null, 'read']);
});

test('a message stored while everyone was connected says delivered without a receipt', () => {
  const chat = chatWith([msg(1, ME, 0, { status: 'delivered' }), msg(2, ME, 1)]);
  assert.deepEqual(chat.items(T0).filter((i) => i.kind === 'message').map((i) => i.status), ['delivered', 'sent']);
  chat.receipt({ user_id: SAM, delivered_seq: 2, read_seq: 1 });
  assert.deepEqual(chat.items(T0).filter((i) => i.kind === 'message').map((i) => i.status), ['read', 'delivered']);
});

test('in a group, read means everyone else read it', () => {
  const chat = chatWith([msg(1, ME, 0)], {
    kind: 'group',
    name: 'Squad',
    participants: [
      { user_id: ME, full_name: 'Alex', delivered_seq: 1, read_seq: 1 },
      { user_id: SAM, full_name: 'Sam', delivered_seq: 1, read_seq: 1 },
      { user_id: CASEY, full_name: 'Casey', delivered_seq: 1, read_seq: 0 },
    ],
  });
  assert.equal(chat.statusOf(chat.messages.get(1)), 'delivered');
  assert.equal(chat.lastReadMine(), 0);
  assert.equal(chat.receipt({ user_id: CASEY, delivered_seq: 1, read_seq: 1 }), true);
  assert.equal(chat.receipt({ user_id: CASEY, delivered_seq: 1, read_seq: 1 }), false, 'a repeated receipt changes nothing');
  assert.equal(chat.lastReadMine(), 1);
});

test('a send is pending until its message arrives, then shows once', () => {
  const chat = chatWith([]);
  chat.queue('c1', 'hello', at(0));
  assert.deepEqual(chat.items(T0).map((i) => [i.kind, i.status]), [['pending', 'sending']]);
  chat.ack({ client_msg_id: 'c1', seq: 1 });
  assert.equal(chat.items(T0).at(-1).status, 'sent');
  chat.addMessage(msg(1, ME, 0, { client_msg_id: 'c1' }));
  assert.deepEqual(kinds(chat.items(T0)), ['day:Today', 'm1']);
  assert.equal(chat.addMessage(msg(1, ME, 0, { client_msg_id: 'c1' })), false, 'a replayed message is not added twice');
});

test('a removed member: pending sends fail with the reason, acked ones stay', () => {
  const chat = chatWith([], { kind: 'group', name: 'G' });
  chat.queue('a', 'one');
  chat.queue('b', 'two');
  chat.ack({ client_msg_id: 'a', seq: 1 });
  chat.removed();
  assert.equal(chat.status, 'removed');
  assert.equal(chat.pending.get('a').state, 'acked');
  assert.equal(chat.pending.get('b').state, 'failed');
  assert.match(chat.pending.get('b').error, /no longer a member/);
});

test('only the group creator, while a member, manages it', () => {
  const group = chatWith([], { kind: 'group', name: 'G', createdBy: ME });
  assert.equal(group.canManage, true);
  assert.equal(chatWith([], { kind: 'group', name: 'G', createdBy: SAM }).canManage, false);
  assert.equal(chatWith([], { kind: 'direct', createdBy: ME }).canManage, false);
  group.refresh(detail({ kind: 'group', name: 'G2', createdBy: ME, participants: [{ user_id: SAM, full_name: 'Sam' }] }));
  assert.equal(group.canManage, false, 'a creator who left manages nothing');
  assert.equal(group.title(), 'G2');
});

test('a refresh of the participants keeps read marks learned from receipts', () => {
  const chat = chatWith([msg(1, ME, 0)]);
  chat.receipt({ user_id: SAM, delivered_seq: 1, read_seq: 1 });
  chat.refresh(detail());
  assert.equal(chat.participants.get(SAM).read_seq, 1);
});

test('messages from others are counted between two read marks', () => {
  const chat = chatWith([msg(1, SAM, 0), msg(2, ME, 1), msg(3, SAM, 2), msg(4, SAM, 3)]);
  assert.equal(chat.countFromOthers(0, 3), 2);
  assert.equal(chat.countFromOthers(3, 4), 1);
  assert.equal(chat.countFromOthers(4, 4), 0);
});

test('read marks follow what is on screen in a visible page, and only move forward', () => {
  assert.equal(readTarget({ visible: new Set([3, 4]), canSee: true, readSent: 2 }), 4);
  assert.equal(readTarget({ visible: new Set([3, 4]), canSee: false, readSent: 2 }), null, 'hidden tab');
  assert.equal(readTarget({ visible: new Set([1, 2]), canSee: true, readSent: 2 }), null, 'already read');
  assert.equal(readTarget({ visible: new Set(), canSee: true, readSent: 0 }), null, 'nothing on screen');
});

test('conversations: updates, the open chat stays read, unknown ones are reported, totals', () => {
  const list = new Conversations();
  list.reset([
    { id: 1, updated_at: at(0), unread_count: 0, last_seq: 1 },
    { id: 2, updated_at: at(1), unread_count: 2, last_seq: 5 },
  ]);
  assert.deepEqual(list.sorted().map((c) => c.id), [2, 1]);
  assert.equal(list.applyUpdate({ conversation_id: 1, seq: 2, unread_count: 1, last_message: { seq: 2, created_at: at(5), content: 'x' } }), true);
  assert.deepEqual(list.sorted().map((c) => c.id), [1, 2]);
  assert.equal(list.unreadTotal(), 3);
  list.applyUpdate({ conversation_id: 2, seq: 6, unread_count: 3, last_message: null }, { open: true });
  assert.equal(list.get(2).unread_count, 0);
  assert.equal(list.applyUpdate({ conversation_id: 9, seq: 1, unread_count: 1 }), false);
  // An older preview never replaces a newer one.
  list.applyUpdate({ conversation_id: 1, seq: 2, unread_count: 1, last_message: { seq: 1, created_at: at(0), content: 'old' } });
  assert.equal(list.get(1).last_message.content, 'x');
  assert.equal(list.markRead(1, 2), true);
  assert.equal(list.get(1).unread_count, 0);
  // Halfway through a backlog: the rest still counts.
  list.reset([{ id: 3, updated_at: at(0), unread_count: 25, last_seq: 25, read_seq: 0 }]);
  assert.equal(list.markRead(3, 7, 7), true);
  assert.equal(list.get(3).unread_count, 18);
  assert.equal(list.markRead(3, 25, 18), true);
  assert.equal(list.get(3).unread_count, 0);
  assert.equal(list.markRead(3, 25, 0), false);
});

test('the badge and the launcher name say the same thing', () => {
  assert.equal(badgeText(5), '5');
  assert.equal(badgeText(722), '99+');
  assert.equal(launcherLabel(true, 722), 'Close chat, 99+ unread');
  assert.equal(launcherLabel(false, 0), 'Open chat');
});

test('drafts are kept per user and conversation, and an empty one is removed', () => {
  const data = new Map();
  const store = { getItem: (k) => data.get(k) ?? null, setItem: (k, v) => data.set(k, v), removeItem: (k) => data.delete(k) };
  const alex = new Drafts(store, 1);
  alex.set(7, 'half a thought');
  assert.equal(alex.get(7), 'half a thought');
  assert.equal(new Drafts(store, 2).get(7), '', 'another user sees nothing');
  alex.clear(7);
  assert.equal(data.size, 0);
  const broken = new Drafts({ getItem() { throw new Error('blocked'); }, setItem() { throw new Error('full'); }, removeItem() {} }, 1);
  broken.set(7, 'x');
  assert.equal(broken.get(7), '');
});

test('links: only http and https, trailing punctuation stays text', () => {
  assert.deepEqual(linkify('see https://vibe.fit/plan. ok'), [
    { text: 'see ' },
    { text: 'https://vibe.fit/plan', href: 'https://vibe.fit/plan' },
    { text: '. ok' },
  ]);
  assert.deepEqual(linkify('javascript:alert(1) and ftp://x.io'), [{ text: 'javascript:alert(1) and ftp://x.io' }]);
  assert.deepEqual(linkify('(http://a.io/x_(y)) end').map((s) => s.href ?? null), [null, 'http://a.io/x_(y)', null]);
  assert.deepEqual(linkify('http://'), [{ text: 'http://' }]);
  assert.deepEqual(linkify('<b>https://a.io/"onmouseover=x</b>').filter((s) => s.href).map((s) => s.href), ['https://a.io/']);
});

test('initials and avatar colours', () => {
  assert.equal(initials('Alex Rivera'), 'AR');
  assert.equal(initials('  casey  '), 'C');
  assert.equal(initials('Émile de la Tour'), 'ÉT');
  assert.equal(initials(''), '?');
  assert.equal(avatarColour(3), AVATAR_COLOURS[3]);
  assert.equal(avatarColour(3), avatarColour(3 + AVATAR_COLOURS.length));
});

test('every avatar colour has at least 4.5:1 contrast with white', () => {
  for (const hex of AVATAR_COLOURS) assert.ok(contrast(hex, '#ffffff') >= 4.5, `${hex}: ${contrast(hex, '#ffffff').toFixed(2)}`);
});

test('a JWT’s claims are read without a library; garbage is null', () => {
  const payload = Buffer.from(JSON.stringify({ sub: '5', name: 'Zoë', exp: 1 })).toString('base64url');
  assert.deepEqual(jwtClaims(`h.${payload}.s`), { sub: '5', name: 'Zoë', exp: 1 });
  assert.equal(jwtClaims('nope'), null);
  assert.equal(jwtClaims('a.!!!.c'), null);
});

function contrast(a, b) {
  const lum = (hex) => {
    const [r, g, bl] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16) / 255).map((c) => (c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4));
    return 0.2126 * r + 0.7152 * g + 0.0722 * bl;
  };
  const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
  return (x + 0.05) / (y + 0.05);
}
