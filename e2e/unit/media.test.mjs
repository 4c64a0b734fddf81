// Unit tests of the ChatBox's attachment logic in chatbox/state.js: the
// upload tray, sizes and durations, previews, layout boxes and merging an
// `attachment_updated` into the messages. Run: node --test e2e/unit/

import test from 'node:test';
import assert from 'node:assert/strict';
import {
  ChatModel,
  Conversations,
  UploadTray,
  MAX_ATTACHMENTS,
  attachmentLabel,
  attachmentSummary,
  chatMedia,
  fitBox,
  formatBytes,
  formatDuration,
  kindOfMime,
  messagePreview,
  precheck,
  recorderMime,
  replaceAttachment,
} from '../../chatbox/state.js';

const ME = 1;
const SAM = 2;

function att(id, extra = {}) {
  return { id, conversation_id: 7, uploader_id: SAM, kind: 'image', mime: 'image/jpeg', size: 1000, width: 800, height: 600, status: 'processing', has_thumbnail: false, ...extra };
}

function msg(seq, sender, extra = {}) {
  return { id: `id-${seq}`, seq, sender_id: sender, content: '', created_at: new Date(2026, 0, 1, 9, seq).toISOString(), ...extra };
}

test('sizes read as people say them', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(812), '812 B');
  assert.equal(formatBytes(1024), '1 KB');
  assert.equal(formatBytes(1536), '1.5 KB');
  assert.equal(formatBytes(14 * 1024 + 300), '14 KB');
  assert.equal(formatBytes(1.25 * 1024 * 1024), '1.3 MB');
  assert.equal(formatBytes(100 * 1024 * 1024), '100 MB');
  assert.equal(formatBytes(3 * 1024 ** 3), '3 GB');
  assert.equal(formatBytes(undefined), '0 B');
});

test('durations: minutes and seconds, hours when there are any', () => {
  assert.equal(formatDuration(0), '0:00');
  assert.equal(formatDuration(999), '0:00');
  assert.equal(formatDuration(7_400), '0:07');
  assert.equal(formatDuration(754_000), '12:34');
  assert.equal(formatDuration(3_723_000), '1:02:03');
  assert.equal(formatDuration(-5), '0:00');
  assert.equal(formatDuration(Infinity), '0:00');
});

test('the client accepts the server’s kinds by type and refuses the rest before uploading', () => {
  assert.equal(kindOfMime('image/jpeg'), 'image');
  assert.equal(kindOfMime('IMAGE/PNG'), 'image');
  assert.equal(kindOfMime('video/webm'), 'video');
  assert.equal(kindOfMime('audio/webm;codecs=opus'), 'audio');
  assert.equal(kindOfMime('application/pdf'), 'file');
  assert.equal(kindOfMime('application/x-msdownload'), null);
  assert.equal(kindOfMime(''), null);
  assert.equal(precheck({ type: 'image/png', size: 10 }), null);
  assert.match(precheck({ type: 'text/plain', size: 10 }), /can’t be sent/);
  assert.match(precheck({ type: 'video/mp4', size: 200 * 1024 * 1024 }), /too large \(200 MB; at most 100 MB\)/);
  assert.match(precheck({ type: 'image/png', size: 0 }), /empty/);
});

test('a message without text previews as the server’s lists do', () => {
  assert.equal(attachmentSummary([]), '');
  assert.equal(attachmentSummary([att('a')]), '📷 Photo');
  assert.equal(attachmentSummary([att('a', { kind: 'video' })]), '🎬 Video');
  assert.equal(attachmentSummary([att('a', { kind: 'audio' })]), '🎤 Voice message');
  assert.equal(attachmentSummary([att('a', { kind: 'file', name: 'plan.pdf' })]), '📄 plan.pdf');
  assert.equal(attachmentSummary([att('a', { kind: 'file' })]), '📄 File');
  assert.equal(attachmentSummary([att('a'), att('b')]), '📎 2 attachments');
  assert.equal(messagePreview({ content: 'Look', attachments: [att('a')] }), 'Look');
  assert.equal(messagePreview({ content: '  ', attachments: [att('a')] }), '📷 Photo');
  assert.equal(messagePreview({ content: 'Hi' }), 'Hi');
  assert.equal(attachmentLabel(att('a', { kind: 'audio', duration_ms: 7_000 })), 'Voice message, 0:07');
  assert.equal(attachmentLabel(att('a', { kind: 'file', name: 'plan.pdf' })), 'plan.pdf');
});

test('the conversations list previews a photo-only message the way the server does', () => {
  const list = new Conversations();
  list.reset([{ id: 7, title: 'Sam', updated_at: new Date(2026, 0, 1).toISOString(), last_seq: 0 }]);
  list.noteMessage(7, msg(1, SAM, { attachments: [att('a')] }));
  assert.equal(list.get(7).last_message.content, '📷 Photo');
});

test('media boxes keep the aspect ratio, fit the box and never enlarge', () => {
  assert.deepEqual(fitBox(4000, 3000), { width: 240, height: 180 });
  assert.deepEqual(fitBox(1080, 1920), { width: 169, height: 300 });
  assert.deepEqual(fitBox(100, 50), { width: 100, height: 50 });
  assert.deepEqual(fitBox(null, null), { width: 240, height: 180 });
  assert.deepEqual(fitBox(10_000, 1), { width: 240, height: 1 });
});

test('the recorder prefers WebM/Opus, then what the browser has', () => {
  assert.equal(recorderMime(() => true), 'audio/webm;codecs=opus');
  assert.equal(recorderMime((t) => t.startsWith('audio/mp4')), 'audio/mp4;codecs=mp4a.40.2');
  assert.equal(recorderMime((t) => t === 'audio/mp4'), 'audio/mp4');
  assert.equal(recorderMime(() => false), '');
  assert.equal(recorderMime(() => { throw new Error('old browser'); }), '');
});

test('the upload tray: progress, done, failure, retry, cancel; Send waits for uploads', () => {
  const tray = new UploadTray();
  assert.deepEqual(tray.sendState(''), { ok: false, why: '' });
  assert.deepEqual(tray.sendState('hi'), { ok: true, why: '' });
  const a = tray.add({ name: 'a.jpg', type: 'image/jpeg', size: 100 });
  const b = tray.add({ name: 'b.pdf', type: 'application/pdf', size: 200 });
  assert.equal(tray.get(a).kind, 'image');
  assert.equal(tray.get(b).kind, 'file');
  assert.equal(tray.busy, true);
  assert.deepEqual(tray.sendState('hi'), { ok: false, why: 'Waiting for 2 uploads…' });
  assert.ok(tray.progress(a, 50, 100));
  assert.equal(tray.get(a).loaded, 50);
  assert.ok(tray.done(a, att('A')));
  assert.equal(tray.progress(a, 10, 100), false, 'progress after done is ignored');
  assert.deepEqual(tray.sendState(''), { ok: false, why: 'Waiting for 1 upload…' });
  assert.ok(tray.fail(b, 'The file is too large.'));
  assert.equal(tray.busy, false);
  assert.deepEqual(tray.sendState('hi'), { ok: false, why: 'Retry or remove the file that failed.' });
  assert.equal(tray.get(b).error, 'The file is too large.');
  assert.ok(tray.retry(b));
  assert.equal(tray.get(b).state, 'uploading');
  assert.equal(tray.get(b).error, null);
  // Cancelled: it leaves the tray, and a late answer for it is ignored.
  assert.ok(tray.remove(b));
  assert.equal(tray.done(b, att('B')), false);
  assert.deepEqual(tray.sendState(''), { ok: true, why: '' }, 'a photo alone can be sent');
  assert.deepEqual(tray.takeReady().map((x) => x.id), ['A']);
  assert.equal(tray.size, 0);
});

test('a file refused before upload blocks Send until removed, and cannot be retried', () => {
  const tray = new UploadTray();
  const k = tray.add({ name: 'x.exe', type: 'application/x-msdownload', size: 5, error: 'nope' });
  assert.equal(tray.get(k).state, 'refused');
  assert.equal(tray.retry(k), false);
  assert.equal(tray.sendState('hi').ok, false);
  tray.remove(k);
  assert.equal(tray.sendState('hi').ok, true);
});

test('a voice recording uploads in the tray without holding up Send, and is not taken by it', () => {
  const tray = new UploadTray();
  const v = tray.add({ name: 'voice.webm', type: 'audio/webm;codecs=opus', size: 10, durationMs: 2_000, auto: true });
  assert.equal(tray.busy, false);
  assert.equal(tray.sendState('hi').ok, true);
  tray.done(v, att('V', { kind: 'audio' }));
  assert.deepEqual(tray.takeReady(), []);
  assert.equal(tray.size, 1);
});

test('the tray holds at most the attachments one message may carry', () => {
  const tray = new UploadTray();
  for (let i = 0; i < MAX_ATTACHMENTS; i++) assert.ok(tray.add({ name: `${i}.png`, type: 'image/png', size: 1 }));
  assert.equal(tray.room, 0);
  assert.equal(tray.add({ name: 'one more.png', type: 'image/png', size: 1 }), null);
});

test('attachment_updated replaces the attachment in stored and pending messages, once', () => {
  const chat = new ChatModel({ id: 7, me: ME });
  chat.load({ type: 'direct', name: null, created_by: ME, has_more: false, participants: [], messages: [msg(1, SAM, { attachments: [att('a'), att('b')] }), msg(2, SAM, { content: 'no media' })] });
  chat.queue('c1', '', undefined, [att('a')]);
  const before = chat.messages.get(1);
  const fresh = att('a', { status: 'ready', has_thumbnail: true, url: '/api/v1/media/a/full?exp=1&sig=x', thumbnail_url: '/api/v1/media/a/thumb?exp=1&sig=y' });
  assert.deepEqual(chat.updateAttachment(fresh), ['m:1', 'p:c1']);
  const after = chat.messages.get(1);
  assert.notEqual(after, before, 'a new message object, so the view sees the change');
  assert.equal(after.attachments[0].status, 'ready');
  assert.equal(after.attachments[0].url, fresh.url);
  assert.equal(after.attachments[1].status, 'processing', 'the other attachment is untouched');
  assert.equal(chat.pending.get('c1').attachments[0].status, 'ready');
  assert.deepEqual(chat.updateAttachment(att('zzz')), []);
  // The pending send's attachments show until the stored message replaces it.
  const pending = chat.items().find((i) => i.kind === 'pending');
  assert.equal(pending.attachments[0].id, 'a');
});

test('replaceAttachment keeps the list when the id is not in it', () => {
  const list = [att('a')];
  assert.equal(replaceAttachment(list, att('b')), list);
  assert.equal(replaceAttachment(undefined, att('b')), undefined);
  assert.equal(replaceAttachment(list, att('a', { status: 'failed' }))[0].status, 'failed');
});

test('the chat’s media for the viewer: images and videos, oldest first', () => {
  const chat = new ChatModel({ id: 7, me: ME });
  chat.load({
    type: 'direct', name: null, created_by: ME, has_more: false, participants: [],
    messages: [
      msg(3, SAM, { attachments: [att('v', { kind: 'video' })] }),
      msg(1, SAM, { attachments: [att('a'), att('f', { kind: 'file' })] }),
      msg(2, ME, { attachments: [att('voice', { kind: 'audio' })] }),
    ],
  });
  assert.deepEqual(chatMedia(chat).map((a) => [a.id, a.seq]), [['a', 1], ['v', 3]]);
});
