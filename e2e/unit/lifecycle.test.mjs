// Unit tests of a message's life in the ChatBox (chatbox/lifecycle.js and
// what state.js does with it): change frames applied to messages and
// quotes, the resume point that changes move, who may do what, mentions in
// the composer, search snippets. Run: node --test e2e/unit/.

import test from 'node:test';
import assert from 'node:assert/strict';
import {
  SeqTracker,
  applyChange,
  applyReaction,
  canDelete,
  canEdit,
  cut,
  followOriginal,
  insertMention,
  isSingleEmoji,
  matchMembers,
  mentionQuery,
  mentionsMe,
  menuActions,
  pruneMentions,
  quoteOf,
  reactedBy,
  reactionToggle,
  snippetSegments,
  splitMentions,
  EDIT_WINDOW_MS,
} from '../../chatbox/lifecycle.js';
import { ChatModel, Conversations, messagePreview } from '../../chatbox/state.js';

const ME = 1;
const SAM = 2;
const CASEY = 3;
const T0 = Date.parse('2026-11-27T09:00:00Z');
const at = (minutes) => new Date(T0 + minutes * 60_000).toISOString();

function msg(seq, sender, extra = {}) {
  return { id: `id-${seq}`, seq, conversation_id: 7, sender_id: sender, content: `m${seq}`, status: 'sent', created_at: at(seq), client_msg_id: `c${seq}`, ...extra };
}

const edited = (m, content, when, seq = 100) => ({ type: 'message_edited', conversation_id: 7, seq, message_id: m.id, message_seq: m.seq, user_id: m.sender_id, content, edited_at: when });
const deleted = (m, seq = 100) => ({ type: 'message_deleted', conversation_id: 7, seq, message_id: m.id, message_seq: m.seq, user_id: m.sender_id, deleted_at: at(500) });
const reaction = (m, user, emoji, on, count, seq = 100) => ({ type: 'reaction', conversation_id: 7, seq, message_id: m.id, message_seq: m.seq, user_id: user, emoji, on, count });

function chatWith(messages, { kind = 'direct', createdBy = ME, role = 'member' } = {}) {
  const chat = new ChatModel({ id: 7, me: ME });
  chat.load({
    id: 7,
    type: kind,
    name: kind === 'group' ? 'Crew' : null,
    created_by: createdBy,
    participants: [
      { user_id: ME, full_name: 'Alex Rivera', role, delivered_seq: 0, read_seq: 0 },
      { user_id: SAM, full_name: 'Sam Patel', role: 'member', delivered_seq: 0, read_seq: 0 },
      { user_id: CASEY, full_name: 'Casey Coach', role: 'trainer', delivered_seq: 0, read_seq: 0 },
    ],
    messages,
    has_more: false,
  });
  return chat;
}

// ---- the resume point -----------------------------------------------------------

test('change frames move the resume point like messages, duplicates are dropped', () => {
  const seqs = new SeqTracker(41);
  assert.equal(seqs.note(42), 'next'); // a message
  assert.equal(seqs.note(43), 'next'); // a reaction to it: not a hole in the messages
  assert.equal(seqs.note(44), 'next'); // the next message
  assert.equal(seqs.top, 44);
  assert.equal(seqs.note(43), 'dup'); // a replay after a reconnect
  assert.equal(seqs.note(44), 'dup');
  assert.equal(seqs.top, 44);
});

test('a hole asks for one resume from the last seq held, then is accepted', () => {
  const seqs = new SeqTracker(10);
  assert.equal(seqs.note(12), 'gap');
  assert.equal(seqs.top, 10, 'the frame after the hole is not applied');
  // The resume replays 11 and 12 in order.
  assert.equal(seqs.note(11), 'next');
  assert.equal(seqs.note(12), 'next');
  // A hole the room never fills (a seq it does not relay) costs one resume, not a loop.
  assert.equal(seqs.note(14), 'gap');
  assert.equal(seqs.note(14), 'next');
  assert.equal(seqs.top, 14);
  // raise: a catch-up from history holds everything up to its last message.
  seqs.raise(20);
  assert.equal(seqs.note(18), 'dup');
  assert.equal(seqs.note(21), 'next');
});

test('a chat resumes after its highest seq: loaded history, then live messages and changes', () => {
  const chat = chatWith([msg(1, SAM), msg(2, ME)]);
  assert.equal(chat.seqs.top, 2);
  assert.equal(chat.seqs.note(3), 'next');
  chat.applyChange(reaction(chat.messages.get(2), SAM, '👍', true, 1, 3));
  assert.equal(chat.seqs.top, 3);
  assert.equal(chat.maxSeq(), 2, 'the highest message is not the resume point');
});

// ---- change frames on a message ---------------------------------------------------------

test('an edit replaces the text and marks it edited; an older edit replayed later changes nothing', () => {
  const m = msg(5, ME);
  const once = applyChange(m, edited(m, 'fixed typo', at(10)), ME);
  assert.equal(once.content, 'fixed typo');
  assert.equal(once.edited_at, at(10));
  assert.equal(applyChange(once, edited(m, 'fixed typo', at(10)), ME), once, 'the same frame twice');
  assert.equal(applyChange(once, edited(m, 'first try', at(8)), ME), once, 'an older edit after a newer one');
  const again = applyChange(once, edited(m, 'fixed again', at(12)), ME);
  assert.equal(again.content, 'fixed again');
});

test('a delete leaves a tombstone: who and when, no text, attachments, reactions, mentions or quote', () => {
  const m = msg(5, SAM, {
    content: '@Alex Rivera look',
    attachments: [{ id: 'a1', kind: 'image' }],
    reactions: [{ emoji: '👍', count: 1, me: true, user_ids: [ME] }],
    mentions: [ME],
    reply_to: { id: 'id-4', seq: 4, sender_id: ME, content: 'm4', deleted: false },
    edited_at: at(6),
  });
  const t = applyChange(m, deleted(m), ME);
  assert.deepEqual(Object.keys(t).sort(), ['client_msg_id', 'content', 'conversation_id', 'created_at', 'deleted_at', 'id', 'sender_id', 'seq', 'status'].sort());
  assert.equal(t.content, '');
  assert.equal(t.deleted_at, at(500));
  assert.equal(mentionsMe(t, ME), false, 'a tombstone mentions nobody');
  // Nothing changes a tombstone again.
  assert.equal(applyChange(t, deleted(m), ME), t);
  assert.equal(applyChange(t, edited(m, 'back?', at(600)), ME), t);
  assert.equal(applyChange(t, reaction(m, SAM, '🔥', true, 1), ME), t);
  assert.equal(messagePreview(t), 'Message deleted');
});

test('reactions: chips by emoji in first-use order, the server’s count, the reader’s own flagged, gone at zero', () => {
  let list = [];
  list = applyReaction(list, reaction(msg(5, SAM), SAM, '👍', true, 1), ME);
  list = applyReaction(list, reaction(msg(5, SAM), ME, '🔥', true, 1), ME);
  list = applyReaction(list, reaction(msg(5, SAM), ME, '👍', true, 2), ME);
  assert.deepEqual(list, [
    { emoji: '👍', count: 2, me: true, user_ids: [SAM, ME] },
    { emoji: '🔥', count: 1, me: true, user_ids: [ME] },
  ]);
  // The same frame again (a replay) changes nothing.
  assert.deepEqual(applyReaction(list, reaction(msg(5, SAM), ME, '👍', true, 2), ME), list);
  // Someone else taking theirs back leaves the reader's flag alone.
  list = applyReaction(list, reaction(msg(5, SAM), SAM, '👍', false, 1), ME);
  assert.deepEqual(list[0], { emoji: '👍', count: 1, me: true, user_ids: [ME] });
  list = applyReaction(list, reaction(msg(5, SAM), ME, '🔥', false, 0), ME);
  assert.deepEqual(list.map((r) => r.emoji), ['👍']);
  // A live message's count may cover people this client has not heard of.
  const live = applyReaction([], reaction(msg(5, SAM), CASEY, '💪', true, 3), ME);
  assert.deepEqual(live, [{ emoji: '💪', count: 3, me: false, user_ids: [CASEY] }]);
});

test('a chip toggles the reader’s reaction: me from the server or their id among user_ids', () => {
  const m = msg(5, SAM, { reactions: [{ emoji: '👍', count: 1, me: true, user_ids: [] }, { emoji: '🔥', count: 2, user_ids: [SAM, ME] }, { emoji: '😂', count: 1, user_ids: [SAM] }] });
  assert.equal(reactedBy(m.reactions[0], ME), true);
  assert.equal(reactedBy(m.reactions[1], ME), true);
  assert.equal(reactionToggle(m, '👍', ME), false, 'a click takes it back');
  assert.equal(reactionToggle(m, '😂', ME), true, 'a click adds it');
  assert.equal(reactionToggle(m, '🙏', ME), true, 'a new emoji');
});

test('the model applies a frame to the message it names and to the quotes of replies to it', () => {
  const original = msg(2, SAM, { content: 'Leg day at 7?' });
  const reply = msg(3, ME, { content: 'Yes', reply_to: quoteOf(original) });
  const chat = chatWith([msg(1, SAM), original, reply]);
  assert.deepEqual(chat.applyChange(edited(original, 'Leg day at 8?', at(20))), ['m:2', 'm:3']);
  assert.equal(chat.messages.get(2).content, 'Leg day at 8?');
  assert.equal(chat.messages.get(3).reply_to.content, 'Leg day at 8?');
  assert.deepEqual(chat.applyChange(deleted(original)), ['m:2', 'm:3']);
  assert.deepEqual(chat.messages.get(3).reply_to, { id: 'id-2', seq: 2, sender_id: SAM, content: '', deleted: true });
  const items = chat.items(new Date(T0));
  assert.equal(items.find((i) => i.seq === 2).deleted, true);
  // A frame for a message not loaded (older history) changes nothing here.
  assert.deepEqual(chat.applyChange(edited(msg(90, SAM, { id: 'elsewhere' }), 'x', at(30))), []);
  // Found by id even when message_seq is off.
  assert.deepEqual(chat.applyChange({ ...reaction(msg(1, SAM), SAM, '👍', true, 1), message_seq: 99 }), ['m:1']);
  assert.equal(chat.applyChange({ type: 'typing' }).length, 0);
});

test('a reply’s quote follows only its own original', () => {
  const q = { id: 'id-2', seq: 2, sender_id: SAM, content: 'hi', deleted: false };
  assert.equal(followOriginal(q, edited(msg(4, SAM), 'x', at(1))), q);
  assert.equal(followOriginal(q, reaction(msg(2, SAM), ME, '👍', true, 1)), q);
  assert.equal(followOriginal(null, deleted(msg(2, SAM))), null);
  assert.equal(followOriginal(q, edited(msg(2, SAM), 'y'.repeat(130), at(1))).content, `${'y'.repeat(120)}…`);
  assert.equal(cut('😀'.repeat(121)), `${'😀'.repeat(120)}…`, 'cut by characters, not UTF-16 units');
});

test('a mention of the reader flags the message; the reader’s own do not', () => {
  const chat = chatWith([msg(1, SAM, { mentions: [ME] }), msg(2, ME, { mentions: [SAM] }), msg(3, CASEY, { mentions: [SAM] })], { kind: 'group' });
  const flagged = chat.items(new Date(T0)).filter((i) => i.mentioned).map((i) => i.seq);
  assert.deepEqual(flagged, [1]);
});

test('a pending reply keeps its quote until it is stored', () => {
  const chat = chatWith([msg(1, SAM)]);
  chat.queue('k1', 'answer', at(5), [], { replyTo: quoteOf(chat.messages.get(1)), mentions: [SAM] });
  const pending = chat.items(new Date(T0)).find((i) => i.kind === 'pending');
  assert.equal(pending.replyTo.id, 'id-1');
  assert.deepEqual(chat.pending.get('k1').mentions, [SAM]);
});

test('filling history forward from before a search hit keeps live state and the older pages', () => {
  const chat = chatWith([msg(300, SAM), msg(301, SAM)]);
  chat.hasMore = true;
  chat.applyChange(edited(chat.messages.get(300), 'live edit', at(40)));
  chat.addRange({ messages: [msg(76, SAM), msg(77, ME), msg(300, SAM)], has_more: false }, 75);
  assert.equal(chat.oldest, 76);
  assert.equal(chat.hasMore, true, 'older than the stretch is still there');
  assert.equal(chat.messages.get(300).content, 'live edit');
  chat.addRange({ messages: [msg(1, SAM)], has_more: false }, 0);
  assert.equal(chat.hasMore, false);
});

// ---- who may do what -----------------------------------------------------------------

test('edit: own messages within 24 hours, never a tombstone', () => {
  const now = T0 + 60 * 60_000;
  assert.equal(canEdit(msg(1, ME), ME, now), true);
  assert.equal(canEdit(msg(1, SAM), ME, now), false);
  assert.equal(canEdit(msg(1, ME), ME, Date.parse(at(1)) + EDIT_WINDOW_MS + 1), false);
  assert.equal(canEdit(msg(1, ME, { deleted_at: at(2) }), ME, now), false);
});

test('delete: own messages; in a group also the creator’s and an admin’s to delete', () => {
  const theirs = msg(1, SAM);
  assert.equal(canDelete(msg(1, ME), { me: ME }), true);
  assert.equal(canDelete(theirs, { me: ME }), false);
  assert.equal(canDelete(theirs, { me: ME, isGroup: true, createdBy: ME }), true);
  assert.equal(canDelete(theirs, { me: ME, isGroup: true, createdBy: CASEY, role: 'admin' }), true);
  assert.equal(canDelete(theirs, { me: ME, isGroup: true, createdBy: CASEY, role: 'member' }), false);
  assert.equal(canDelete(theirs, { me: ME, isGroup: false, createdBy: ME, role: 'admin' }), false, 'a direct chat has no moderators');
});

test('the menu offers what the reader may do, and nothing on a tombstone', () => {
  const now = T0 + 60_000;
  assert.deepEqual(menuActions(msg(1, ME), { me: ME }, now), ['reply', 'react', 'edit', 'copy', 'delete']);
  assert.deepEqual(menuActions(msg(1, SAM), { me: ME }, now), ['reply', 'react', 'copy']);
  assert.deepEqual(menuActions(msg(1, SAM, { content: '' }), { me: ME, isGroup: true, createdBy: ME }, now), ['reply', 'react', 'delete'], 'a photo without text has nothing to copy');
  assert.deepEqual(menuActions(msg(1, ME, { content: '', deleted_at: at(3) }), { me: ME }, now), []);
  const chat = chatWith([], { kind: 'group', createdBy: CASEY, role: 'admin' });
  assert.deepEqual(chat.permissions, { me: ME, isGroup: true, createdBy: CASEY, role: 'admin' });
});

test('a typed reaction must be exactly one emoji', () => {
  for (const ok of ['👍', '❤️', '❤', ' 🔥 ', '👍🏽', '👨‍👩‍👧', '🇩🇪', '1️⃣']) assert.equal(isSingleEmoji(ok), true, ok);
  for (const bad of ['', 'a', '👍👍', ':)', '👍 ok', '1']) assert.equal(isSingleEmoji(bad), false, bad);
});

// ---- mentions ----------------------------------------------------------------------------

const members = [
  { user_id: SAM, full_name: 'Sam Patel' },
  { user_id: CASEY, full_name: 'Casey Coach' },
  { user_id: 9, full_name: 'Samira Jones' },
];

test('an "@" at the start or after a space starts a mention query, up to the caret', () => {
  assert.deepEqual(mentionQuery('@', 1), { start: 0, query: '' });
  assert.deepEqual(mentionQuery('hi @sa', 6), { start: 3, query: 'sa' });
  assert.deepEqual(mentionQuery('hi @Sam P and more', 9), { start: 3, query: 'Sam P' });
  assert.equal(mentionQuery('mail alex@vibe.fit', 18), null, 'an email address');
  assert.equal(mentionQuery('@sam\nnext', 9), null, 'a new line ends it');
  assert.equal(mentionQuery('@ sam', 5), null);
  assert.equal(mentionQuery('no at sign', 5), null);
  assert.equal(mentionQuery('@one two three four', 19), null, 'too many words');
});

test('members are matched by the start of their name or of any of its words', () => {
  assert.deepEqual(matchMembers(members, 'sam').map((p) => p.user_id), [SAM, 9]);
  assert.deepEqual(matchMembers(members, 'co').map((p) => p.user_id), [CASEY], 'a surname');
  assert.deepEqual(matchMembers(members, 'sam p').map((p) => p.user_id), [SAM]);
  assert.deepEqual(matchMembers(members, '').length, 3);
  assert.deepEqual(matchMembers(members, 'Sam Patel ').length, 0, 'once inserted, the picker closes');
  assert.deepEqual(matchMembers(members, 'x'), []);
});

test('picking a member inserts "@Full Name " and the caret goes after it', () => {
  assert.deepEqual(insertMention('hi @sa', 3, 6, 'Sam Patel'), { text: 'hi @Sam Patel ', caret: 14 });
  assert.deepEqual(insertMention('@ca see you', 0, 3, 'Casey Coach'), { text: '@Casey Coach see you', caret: 12 });
});

test('a picked name removed from the text is not mentioned', () => {
  const picked = new Map([
    [SAM, 'Sam Patel'],
    [CASEY, 'Casey Coach'],
  ]);
  assert.deepEqual(pruneMentions('@Sam Patel and @Casey Coach, hi', picked), [SAM, CASEY]);
  assert.deepEqual(pruneMentions('@Sam Patel hi', picked), [SAM]);
  assert.deepEqual(pruneMentions('@Sam Pat hi', picked), [], 'half a name');
  assert.deepEqual(pruneMentions('@Sam Patelson', picked), [], 'a longer name');
  assert.deepEqual(pruneMentions('Sam Patel', picked), [], 'the name without its @');
  assert.deepEqual(pruneMentions('(@Casey Coach)', picked), [CASEY]);
});

test('the mentioned names are set off in a message’s text, longest first', () => {
  assert.deepEqual(splitMentions('hi @Sam Patel and @Sam, ok', ['Sam', 'Sam Patel']), [
    { text: 'hi ' },
    { text: '@Sam Patel', mention: true },
    { text: ' and ' },
    { text: '@Sam', mention: true },
    { text: ', ok' },
  ]);
  assert.deepEqual(splitMentions('mail x@Sam Patel', ['Sam Patel']), [{ text: 'mail x@Sam Patel' }]);
  assert.deepEqual(splitMentions('plain', []), [{ text: 'plain' }]);
  assert.deepEqual(splitMentions('', ['Sam']), []);
});

// ---- search -------------------------------------------------------------------------------------

test('a snippet splits into plain and matched runs at « and »', () => {
  assert.deepEqual(snippetSegments('…before the «deadlift» on «Friday»!'), [
    { text: '…before the ' },
    { text: 'deadlift', hit: true },
    { text: ' on ' },
    { text: 'Friday', hit: true },
    { text: '!' },
  ]);
  assert.deepEqual(snippetSegments('«all»'), [{ text: 'all', hit: true }]);
  assert.deepEqual(snippetSegments('a » b'), [{ text: 'a » b' }], 'a stray closing marker is text');
  assert.deepEqual(snippetSegments('a «b'), [{ text: 'a ' }, { text: 'b', hit: true }], 'an unclosed one runs to the end');
  assert.deepEqual(snippetSegments('<b>x</b> «<i>»'), [{ text: '<b>x</b> ' }, { text: '<i>', hit: true }], 'markup is text');
  assert.deepEqual(snippetSegments(''), []);
  assert.deepEqual(snippetSegments(null), []);
});

// ---- the conversations list ------------------------------------------------------------------

test('the list keeps unread mentions from conversation_updated, and reading clears them', () => {
  const list = new Conversations();
  list.reset([{ id: 7, title: 'Crew', type: 'group', unread_count: 0, unread_mentions: 0, updated_at: at(0), last_message: { id: 'id-1', seq: 1, sender_id: SAM, content: 'hi', created_at: at(1) }, last_seq: 1 }]);
  list.applyUpdate({ conversation_id: 7, seq: 3, last_message: { id: 'id-3', seq: 3, sender_id: SAM, content: '@Alex Rivera go', created_at: at(3) }, unread_count: 2, unread_mentions: 1 });
  assert.equal(list.get(7).unread_mentions, 1);
  // A change's notice (a reaction at seq 4) is not a message: the counts are the server's.
  list.applyUpdate({ conversation_id: 7, seq: 4, last_message: { id: 'id-3', seq: 3, sender_id: SAM, content: '@Alex Rivera go', created_at: at(3) }, unread_count: 2, unread_mentions: 1 });
  assert.equal(list.get(7).unread_count, 2);
  assert.equal(list.markRead(7, 3, 2), true);
  assert.equal(list.get(7).unread_count, 0);
  assert.equal(list.get(7).unread_mentions, 0);
  list.applyUpdate({ conversation_id: 7, seq: 5, last_message: null, unread_count: 0 });
  assert.equal(list.get(7).unread_mentions, 0, 'an older server without the field');
});

test('an edit or delete of the last message updates its preview; of another message it does not', () => {
  const list = new Conversations();
  list.reset([{ id: 7, title: 'Sam', type: 'direct', updated_at: at(0), last_message: { id: 'id-3', seq: 3, sender_id: SAM, content: 'Leg day', created_at: at(3) } }]);
  assert.equal(list.noteChange(edited(msg(2, SAM), 'older', at(9))), false);
  assert.equal(list.noteChange(reaction(msg(3, SAM), ME, '👍', true, 1)), false);
  assert.equal(list.noteChange(edited(msg(3, SAM), 'Leg day at 8', at(9))), true);
  assert.equal(list.get(7).last_message.content, 'Leg day at 8');
  assert.equal(list.get(7).last_message.seq, 3, 'still the last message');
  assert.equal(list.noteChange(deleted(msg(3, SAM))), true);
  assert.equal(messagePreview(list.get(7).last_message), 'Message deleted');
  assert.equal(list.noteChange({ ...edited(msg(3, SAM), 'zombie', at(10)) }), false, 'a deleted preview stays deleted');
});

test('a catch-up after resync replaces what is held with history’s current state', () => {
  const chat = chatWith([msg(1, SAM), msg(2, ME)]);
  assert.equal(chat.upsert({ ...msg(1, SAM), content: '', deleted_at: at(9) }), false);
  assert.equal(chat.messages.get(1).deleted_at, at(9));
  assert.equal(chat.upsert(msg(5, SAM)), true);
  assert.equal(chat.messages.size, 3);
});
