// The ChatBox's opt-in console log, for support and for developers: with
// `?debug=1` in the page's URL, or `localStorage['vibe.debug'] = '1'` (which
// survives reloads and works on a host page whose URL we do not control),
// it logs connection states, every frame sent and received, and the
// state's updates. Without the flag it logs nothing at all.
//
// It never logs what people wrote or what grants access: a frame is logged
// as a summary built from an allow-list (type, seq, conversation id,
// client_msg_id, byte size), never the frame itself, so a field added to
// the protocol later cannot leak through here; URLs lose their tickets and
// tokens. A console is often copied into a support ticket.

const PREFIX = '[vibe-chat]';
const STORAGE_KEY = 'vibe.debug';

/** Query parameters that grant access, dropped from every logged URL. */
const SECRET_PARAMS = ['ticket', 'token', 'access_token', 'refresh_token', 'sig'];
/** Anything shaped like a JWT, wherever it sits (a path, a reason). */
const JWT = /[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}/g;
const LOOKS_LIKE_JWT = new RegExp(JWT.source);

/** Whether the flag is on: `?debug=1`, or `vibe.debug` = "1" in storage. */
export function debugEnabled({ search = globalThis.location?.search ?? '', storage = safeStorage() } = {}) {
  if (new URLSearchParams(search).get('debug') === '1') return true;
  try {
    return storage?.getItem(STORAGE_KEY) === '1';
  } catch {
    return false; // storage blocked (third-party frame, privacy mode)
  }
}

function safeStorage() {
  try {
    return globalThis.localStorage;
  } catch {
    return undefined;
  }
}

/** A URL (or path) without secrets: ticket and token parameters redacted. */
export function redactUrl(url) {
  const text = String(url ?? '');
  const q = text.indexOf('?');
  let out = text;
  if (q >= 0) {
    const params = new URLSearchParams(text.slice(q + 1));
    for (const name of SECRET_PARAMS) if (params.has(name)) params.set(name, 'redacted');
    out = `${text.slice(0, q)}?${params.toString()}`;
  }
  return out.replace(JWT, 'redacted');
}

/**
 * What may be logged of a frame: the allow-listed fields, also looked up in
 * a `message` it carries, and its size in bytes. `frame` is the parsed
 * frame, or the raw text off the wire.
 */
export function frameSummary(frame) {
  let parsed = frame;
  let bytes;
  if (typeof frame === 'string') {
    bytes = byteLength(frame);
    try {
      parsed = JSON.parse(frame);
    } catch {
      return { type: '(not JSON)', bytes };
    }
  } else {
    try {
      bytes = byteLength(JSON.stringify(frame));
    } catch {
      bytes = undefined;
    }
  }
  const inner = parsed?.message && typeof parsed.message === 'object' ? parsed.message : {};
  const summary = { type: plain(parsed?.type) };
  const seq = parsed?.seq ?? inner.seq;
  const conversationId = parsed?.conversation_id ?? inner.conversation_id;
  const clientMsgId = parsed?.client_msg_id ?? inner.client_msg_id;
  if (seq !== undefined) summary.seq = plain(seq);
  if (conversationId !== undefined) summary.conversation_id = plain(conversationId);
  if (clientMsgId !== undefined) summary.client_msg_id = plain(clientMsgId);
  if (parsed?.code !== undefined) summary.code = plain(parsed.code); // an error's code, not its text
  if (bytes !== undefined) summary.bytes = bytes;
  return summary;
}

/** Only numbers and short identifiers pass; anything else is dropped. */
function plain(value) {
  if (typeof value === 'number' || typeof value === 'boolean' || value === null) return value;
  if (typeof value === 'string' && value.length <= 64 && /^[\w.:-]*$/.test(value) && !LOOKS_LIKE_JWT.test(value)) {
    return value;
  }
  return '(redacted)';
}

function byteLength(text) {
  return new TextEncoder().encode(text).length;
}

/**
 * The log. Every method is a no-op unless enabled; callers need not check.
 * `sink` is the console (tests pass their own).
 */
export class DebugLog {
  constructor({ enabled = debugEnabled(), sink = globalThis.console } = {}) {
    this.enabled = Boolean(enabled);
    this.sink = sink;
  }

  /** A connection's state: opened, closed (with its code), a reconnect, a switch to SSE. */
  connection(label, event, fields = {}) {
    if (!this.enabled) return;
    const safe = { ...fields };
    if ('url' in safe) safe.url = redactUrl(safe.url);
    if ('reason' in safe) safe.reason = String(safe.reason ?? '').replace(JWT, 'redacted').slice(0, 120);
    this.sink.info(PREFIX, label, event, safe);
  }

  /** A frame off the wire (`in`) or onto it (`out`): its summary only. */
  frame(label, direction, frame) {
    if (!this.enabled) return;
    this.sink.debug(PREFIX, label, direction === 'out' ? '→' : '←', frameSummary(frame));
  }

  /** A state update: the list loaded, unread counts that changed. Numbers and ids only. */
  state(event, fields = {}) {
    if (!this.enabled) return;
    this.sink.info(PREFIX, 'state', event, fields);
  }
}

/** The page's log: one per page, the flag read once at load. */
export const debug = new DebugLog();
