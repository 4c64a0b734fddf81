// Unit tests of the ChatBox's debug log (chatbox/debug.js) and of how the
// connections use it (chatbox/realtime.js, with a fake WebSocket): silent
// without the flag; with it, states and frame summaries; and never what
// people wrote, nor a token or a ticket. Run: node --test e2e/unit/.

import test from 'node:test';
import assert from 'node:assert/strict';
import { DebugLog, debug as pageDebug, debugEnabled, frameSummary, redactUrl } from '../../chatbox/debug.js';
import { RoomConnection, TransportChoice, UserConnection } from '../../chatbox/realtime.js';

const TOKEN = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiIsIm5hbWUiOiJBbGV4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ';
const TICKET = 'tkt-9f8e7d6c5b4a39281706f5e4d3c2b1a0';
const SECRETS = ['top secret words', 'the reply nobody may read', 'EDITED SECRET', TOKEN, TICKET];

/** A console that keeps every call. */
function recorder() {
  const calls = [];
  const sink = {};
  for (const level of ['debug', 'info', 'log', 'warn', 'error']) sink[level] = (...args) => calls.push({ level, args });
  return { sink, calls, text: () => JSON.stringify(calls.map((c) => c.args)) };
}

function storage(values = {}) {
  return { getItem: (k) => (k in values ? values[k] : null) };
}

// ---- the flag ---------------------------------------------------------------

test('the flag is off by default and on with ?debug=1 or vibe.debug = "1"', () => {
  assert.equal(debugEnabled({ search: '', storage: storage() }), false);
  assert.equal(debugEnabled({ search: '?transport=sse', storage: storage() }), false);
  assert.equal(debugEnabled({ search: '?debug=0', storage: storage({ 'vibe.debug': '0' }) }), false);
  assert.equal(debugEnabled({ search: '?debug=1', storage: storage() }), true);
  assert.equal(debugEnabled({ search: '?transport=sse&debug=1', storage: storage() }), true);
  assert.equal(debugEnabled({ search: '', storage: storage({ 'vibe.debug': '1' }) }), true);
  // Storage a browser refuses (a sandboxed frame) is "off", not a crash.
  const refusing = { getItem: () => { throw new Error('SecurityError'); } };
  assert.equal(debugEnabled({ search: '', storage: refusing }), false);
});

test('without the flag nothing reaches the console', () => {
  const { sink, calls } = recorder();
  const log = new DebugLog({ enabled: debugEnabled({ search: '', storage: storage() }), sink });
  log.connection('user', 'open', { transport: 'ws' });
  log.frame('room 7', 'in', JSON.stringify({ type: 'message', message: { seq: 1 } }));
  log.state('conversations loaded', { count: 3 });
  assert.deepEqual(calls, []);
  // The page's own log reads the flag from the (absent) page: off.
  assert.equal(pageDebug.enabled, false);
});

// ---- what a frame becomes ---------------------------------------------------

test('a frame is logged as its type, seq, conversation, client_msg_id and size only', () => {
  const raw = JSON.stringify({
    type: 'message',
    message: { id: 'm-1', seq: 12, conversation_id: 7, sender_id: 3, client_msg_id: 'c-123e4567-e89b', content: 'top secret words', reply_to: { content: 'the reply nobody may read' } },
  });
  assert.deepEqual(frameSummary(raw), {
    type: 'message',
    seq: 12,
    conversation_id: 7,
    client_msg_id: 'c-123e4567-e89b',
    bytes: new TextEncoder().encode(raw).length,
  });
  // Multi-byte text counts in bytes, as on the wire.
  const accented = JSON.stringify({ type: 'message', conversation_id: 7, content: 'é😀', client_msg_id: 'k' });
  assert.equal(frameSummary(accented).bytes, new TextEncoder().encode(accented).length);
  assert.deepEqual(frameSummary({ type: 'auth', token: TOKEN }), { type: 'auth', bytes: JSON.stringify({ type: 'auth', token: TOKEN }).length });
  assert.equal(frameSummary({ type: 'error', code: 'empty_field', message: 'top secret words' }).code, 'empty_field');
  assert.deepEqual(frameSummary('not json at all: top secret words'), { type: '(not JSON)', bytes: 33 });
  // An identifier field that carries something else is not logged either.
  assert.equal(frameSummary({ type: 'message', client_msg_id: 'top secret words' }).client_msg_id, '(redacted)');
  assert.equal(frameSummary({ type: TOKEN }).type, '(redacted)');
});

test('URLs lose their tickets and tokens', () => {
  const url = `wss://chat.example/api/v1/chat/conversations/7/ws?ticket=${TICKET}&since=4`;
  assert.equal(redactUrl(url), 'wss://chat.example/api/v1/chat/conversations/7/ws?ticket=redacted&since=4');
  assert.equal(redactUrl(`/api/v1/chat/ws/${TOKEN}`), '/api/v1/chat/ws/redacted');
  assert.equal(redactUrl(`/x?token=${TOKEN}`), '/x?token=redacted');
});

// ---- the connections, with the flag -----------------------------------------

class FakeWebSocket {
  static OPEN = 1;
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWebSocket.all.push(this);
  }
  send(text) {
    this.sent.push(text);
  }
  close(code, reason) {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: true });
  }
  // The server's side.
  accept() {
    this.readyState = 1;
    this.onopen?.();
  }
  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: false });
  }
}

class FakeEventSource {
  static CLOSED = 2;
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    FakeEventSource.all.push(this);
  }
  close() {
    this.readyState = 2;
  }
}

function installBrowser() {
  globalThis.window = { addEventListener() {}, removeEventListener() {}, location: { search: '' }, WebSocket: FakeWebSocket };
  globalThis.WebSocket = FakeWebSocket;
  globalThis.EventSource = FakeEventSource;
  Object.defineProperty(globalThis, 'navigator', { value: { onLine: true }, configurable: true, writable: true });
}

function fakeApi() {
  const listeners = [];
  return {
    listeners,
    onToken(fn) {
      listeners.push(fn);
      return () => {};
    },
    async ticket() {
      return { ticket: TICKET };
    },
    wsUrl: (path) => `ws://edge.test${path}`,
    url: (path) => `http://edge.test${path}`,
    async postMessage(conversationId, content, clientMsgId) {
      return { id: 'm-9', seq: 9, conversation_id: conversationId, content, client_msg_id: clientMsgId };
    },
  };
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

test('with the flag a room connection logs states, closes, the switch to SSE and frame summaries, and no content, token or ticket', async () => {
  installBrowser();
  const { sink, calls, text } = recorder();
  const api = fakeApi();
  const frames = [];
  const conn = new RoomConnection({
    api,
    choice: new TransportChoice(null),
    conversationId: 7,
    lastSeq: () => 4,
    onFrame: (f) => frames.push(f),
    debug: new DebugLog({ enabled: true, sink }),
  });
  conn.start();
  await tick();
  const ws = FakeWebSocket.all.at(-1);
  assert.ok(ws.url.includes(TICKET), 'the socket itself gets the ticket');
  ws.accept();
  // Frames both ways, with text, a reply's text, an edit, and a token.
  ws.receive({ type: 'message', message: { seq: 5, conversation_id: 7, client_msg_id: 'c-5', content: 'top secret words', reply_to: { content: 'the reply nobody may read' } } });
  ws.receive({ type: 'message_edited', conversation_id: 7, seq: 6, content: 'EDITED SECRET' });
  await conn.sendMessage('top secret words', 'c-6');
  for (const listener of api.listeners) listener(TOKEN);
  ws.receive({ type: 'ping', n: 3 });
  // The socket drops; the reconnect's upgrade never completes: SSE.
  ws.drop(1011, 'internal error');
  assert.equal(frames.length, 2, 'the frames were delivered as usual');
  clearTimeout(conn.timer);
  await conn.connect();
  FakeWebSocket.all.at(-1).drop(1006);
  await tick();
  assert.ok(FakeEventSource.all.length >= 1, 'fell back to SSE');
  conn.stop();

  const logged = text();
  for (const secret of SECRETS) assert.ok(!logged.includes(secret), `logged ${secret}: ${logged}`);
  const events = calls.map((c) => c.args.slice(1, 3).join(' '));
  for (const expected of ['room 7 state', 'room 7 opening', 'room 7 open', 'room 7 close', 'room 7 reconnect', 'room 7 switch to SSE']) {
    assert.ok(events.some((e) => e.startsWith(expected)), `no "${expected}" in ${JSON.stringify(events)}`);
  }
  const close = calls.find((c) => c.args[2] === 'close' && c.args[3].code === 1011);
  assert.ok(close, 'the close code is logged');
  const frameLogs = calls.filter((c) => c.level === 'debug').map((c) => [c.args[2], c.args[3]]);
  assert.deepEqual(frameLogs.find(([, f]) => f.type === 'message' && f.seq === 5), ['←', { type: 'message', seq: 5, conversation_id: 7, client_msg_id: 'c-5', bytes: frameLogs.find(([, f]) => f.seq === 5)[1].bytes }]);
  assert.ok(frameLogs.some(([dir, f]) => dir === '→' && f.type === 'message' && f.client_msg_id === 'c-6' && f.conversation_id === 7 && f.bytes > 0), JSON.stringify(frameLogs));
  assert.ok(frameLogs.some(([dir, f]) => dir === '→' && f.type === 'auth'), 'the renewal is logged, without its token');
  assert.ok(calls.every((c) => c.args[0] === '[vibe-chat]'));
});

test('without the flag a connection at work logs nothing', async () => {
  installBrowser();
  const { sink, calls } = recorder();
  const original = { debug: console.debug, info: console.info, log: console.log };
  Object.assign(console, { debug: sink.debug, info: sink.info, log: sink.log });
  try {
    const conn = new UserConnection({ api: fakeApi(), choice: new TransportChoice(null), onFrame: () => {} });
    conn.start();
    await tick();
    const ws = FakeWebSocket.all.at(-1);
    ws.accept();
    ws.receive({ type: 'presence', user_id: 3, is_online: true });
    ws.drop(1011);
    conn.stop();
  } finally {
    Object.assign(console, original);
  }
  assert.deepEqual(calls, []);
});

test('state updates log numbers and ids only', () => {
  const { sink, calls } = recorder();
  const log = new DebugLog({ enabled: true, sink });
  log.state('conversations loaded', { count: 3, unread_total: 5 });
  log.state('unread', { conversation_id: 7, unread: 2, was: 0 });
  assert.deepEqual(calls.map((c) => [c.level, ...c.args]), [
    ['info', '[vibe-chat]', 'state', 'conversations loaded', { count: 3, unread_total: 5 }],
    ['info', '[vibe-chat]', 'state', 'unread', { conversation_id: 7, unread: 2, was: 0 }],
  ]);
});
