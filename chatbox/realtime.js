// Realtime transports. WebSocket first; when a WebSocket cannot be opened
// (a proxy that strips upgrades, a locked-down network) the session falls
// back to Server-Sent Events plus POST, which the edge serves with the same
// guarantees. `?transport=sse` on the page forces the fallback.
//
// Both connections reconnect with exponential backoff and jitter. The room
// connection resumes from the caller's last seq (`since`), so a reconnect
// delivers exactly what was missed. Each (re)connect asks for a fresh
// single-use ticket for exactly that connection.
//
// A connection lives as long as the access token it was opened with, so
// every refreshed token is sent in band (`{"type":"auth"}`) on an open
// WebSocket; an SSE stream simply ends at expiry and reopens with a new
// ticket. The server may ask `{"type":"ping","n"}` to learn that we read
// what it sends: we answer `{"type":"pong","n"}` at once.
//
// Browsers are slow to notice a dead connection (a laptop lid, a lift, a
// captive portal), so each connection watches itself: a WebSocket pings
// after 25 s of silence and gives up without an answer in 10 s; and the
// browser's offline/online events close and reopen at once. (An SSE
// stream's heartbeats are comments, which EventSource keeps from scripts;
// it notices a dead stream itself and the offline event covers the rest.)

import { debug as pageDebug } from './debug.js';

const PING_EVERY_MS = 25_000;
const PONG_WITHIN_MS = 10_000;

export class TransportChoice {
  constructor(forced) {
    this.forced = forced;
    this.wsBroken = false;
  }
  static fromLocation() {
    const p = new URLSearchParams(window.location.search).get('transport');
    return new TransportChoice(p === 'sse' ? 'sse' : p === 'ws' ? 'ws' : null);
  }
  get kind() {
    if (this.forced) return this.forced;
    return this.wsBroken || !('WebSocket' in window) ? 'sse' : 'ws';
  }
}

class Backoff {
  constructor() {
    this.attempt = 0;
  }
  next() {
    const cap = Math.min(10_000, 500 * 2 ** this.attempt);
    this.attempt += 1;
    return cap / 2 + (Math.random() * cap) / 2;
  }
  reset() {
    this.attempt = 0;
  }
}

/**
 * A reconnecting connection to one endpoint, over WebSocket or SSE.
 * Subclasses say which paths and what `since` to use.
 */
class Connection {
  constructor({ api, choice, onFrame, onState, debug = pageDebug }) {
    this.api = api;
    // `?debug=1`: states and frame summaries on the console (debug.js).
    this.debug = debug;
    this.choice = choice;
    this.onFrame = onFrame;
    this.onState = onState ?? (() => {});
    this.backoff = new Backoff();
    this.stopped = false;
    this.ws = null;
    this.es = null;
    this.timer = null;
    this.watchdog = null;
    this.lastHeard = 0;
    this.state = 'connecting';
    this.onOffline = () => this.drop();
    this.onOnline = () => {
      if (!this.open && !this.stopped) {
        this.backoff.reset();
        clearTimeout(this.timer);
        this.connect();
      }
    };
  }

  start() {
    this.stopped = false;
    window.addEventListener('offline', this.onOffline);
    window.addEventListener('online', this.onOnline);
    this.unsubscribe = this.api.onToken((token) => this.sendWs({ type: 'auth', token }));
    this.connect();
  }

  stop() {
    this.stopped = true;
    this.unsubscribe?.();
    window.removeEventListener('offline', this.onOffline);
    window.removeEventListener('online', this.onOnline);
    clearTimeout(this.timer);
    clearInterval(this.watchdog);
    this.ws?.close(1000, 'closed by the client');
    this.es?.close();
    this.ws = null;
    this.es = null;
    this.setState('closed');
  }

  setState(state) {
    if (state !== this.state) this.debug.connection(this.label(), 'state', { state, transport: this.choice.kind });
    this.state = state;
    this.onState(state, this.choice.kind);
  }

  /** How the debug log names this connection. */
  label() {
    return 'connection';
  }

  get open() {
    return this.state === 'open';
  }

  /** Abandons the current transport (dead or offline) and retries. */
  drop() {
    clearInterval(this.watchdog);
    const ws = this.ws;
    const es = this.es;
    this.ws = null;
    this.es = null;
    ws?.close(4000, 'connection lost');
    es?.close();
    if (!this.stopped) this.retry();
  }

  /** Starts the liveness check for the transport just opened. */
  watch() {
    clearInterval(this.watchdog);
    this.lastHeard = Date.now();
    this.watchdog = setInterval(() => {
      const silent = Date.now() - this.lastHeard;
      if (!this.ws) return;
      if (silent > PING_EVERY_MS + PONG_WITHIN_MS) this.drop();
      else if (silent > PING_EVERY_MS) this.sendWs({ type: 'ping' });
    }, 5_000);
  }

  async connect() {
    if (this.stopped) return;
    if (navigator.onLine === false) {
      this.setState('reconnecting');
      return; // the 'online' event reconnects
    }
    this.setState('connecting');
    let ticket;
    try {
      ticket = (await this.api.ticket(this.ticketFor())).ticket;
    } catch (e) {
      if (e.status === 401) {
        this.setState('unauthorized');
        return;
      }
      if (e.status === 403 || e.status === 404) {
        // Not (or no longer) a member: retrying cannot help.
        this.setState('forbidden');
        return;
      }
      this.retry();
      return;
    }
    if (this.stopped) return;
    if (this.choice.kind === 'ws') this.openWs(ticket);
    else this.openSse(ticket);
  }

  retry() {
    if (this.stopped) return;
    this.setState('reconnecting');
    clearTimeout(this.timer);
    const delay = this.backoff.next();
    this.debug.connection(this.label(), 'reconnect', { attempt: this.backoff.attempt, in_ms: Math.round(delay) });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  openWs(ticket) {
    const url = this.api.wsUrl(this.wsPath(ticket));
    const ws = new WebSocket(url);
    let opened = false;
    this.ws = ws;
    this.debug.connection(this.label(), 'opening', { transport: 'ws', url });
    ws.onopen = () => {
      opened = true;
      this.debug.connection(this.label(), 'open', { transport: 'ws' });
      this.backoff.reset();
      this.watch();
      this.opened();
      this.setState('open');
    };
    // A socket given up on (a resume after a gap) may still have frames in
    // flight: only the current one is heard.
    ws.onmessage = (event) => {
      if (this.ws === ws) this.deliver(event.data);
    };
    ws.onclose = (event) => {
      this.debug.connection(this.label(), 'close', { transport: 'ws', code: event.code, reason: event.reason, clean: event.wasClean, current: this.ws === ws });
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      if (!opened && event.code === 1006 && !this.choice.forced) {
        // The upgrade never completed: assume WebSockets are blocked on
        // this network and fall back for the rest of the session.
        this.choice.wsBroken = true;
        this.debug.connection(this.label(), 'switch to SSE', { code: event.code });
        this.connect();
        return;
      }
      if (event.code === 1008 && /member|forbidden/i.test(event.reason)) {
        this.setState('forbidden');
        return;
      }
      this.retry();
    };
  }

  openSse(ticket) {
    const url = this.api.url(this.ssePath(ticket));
    const es = new EventSource(url);
    this.es = es;
    this.debug.connection(this.label(), 'opening', { transport: 'sse', url });
    es.onopen = () => {
      this.debug.connection(this.label(), 'open', { transport: 'sse' });
      this.backoff.reset();
      this.watch();
      this.setState('open');
    };
    es.onmessage = (event) => {
      if (this.es === es) this.deliver(event.data);
    };
    es.onerror = () => {
      this.debug.connection(this.label(), 'error', { transport: 'sse', ready_state: es.readyState, current: this.es === es });
      if (this.es !== es) return;
      // EventSource retries by itself with Last-Event-ID, but its ticket
      // expires after 60 s; once it gives up, reconnect with a fresh one.
      if (es.readyState === EventSource.CLOSED) {
        this.es = null;
        this.retry();
      } else {
        this.setState('reconnecting');
      }
    };
  }

  deliver(text) {
    this.lastHeard = Date.now();
    this.debug.frame(this.label(), 'in', text);
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.type === 'pong' || frame.type === 'auth_ok') return;
    if (frame.type === 'ping') {
      this.sendWs({ type: 'pong', n: frame.n });
      return;
    }
    this.onFrame(frame);
  }

  /** A WebSocket just opened (subclasses send what waited for it). */
  opened() {}

  /** Sends a frame over the WebSocket; false when it is not open. */
  sendWs(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      const text = JSON.stringify(frame);
      this.ws.send(text);
      this.debug.frame(this.label(), 'out', text);
      return true;
    }
    return false;
  }
}

/** The ChatBox's always-on connection: presence and notifications. */
export class UserConnection extends Connection {
  label() {
    return 'user';
  }
  ticketFor() {
    return undefined;
  }
  wsPath(ticket) {
    return `/api/v1/chat/ws?ticket=${encodeURIComponent(ticket)}`;
  }
  ssePath(ticket) {
    return `/api/v1/chat/events?ticket=${encodeURIComponent(ticket)}`;
  }
}

/** One conversation: messages, typing, receipts; sends over either transport. */
export class RoomConnection extends Connection {
  constructor(options) {
    super(options);
    this.conversationId = options.conversationId;
    this.lastSeq = options.lastSeq; // () => the highest seq the view has
  }

  ticketFor() {
    return this.conversationId;
  }

  label() {
    return `room ${this.conversationId}`;
  }

  // Always says what the view holds, 0 included: a conversation whose first
  // messages are acked at the edge but not yet in PostgreSQL shows nothing
  // over REST, and only `since=0` makes the room replay them.
  sinceParam() {
    return `&since=${Math.max(0, this.lastSeq())}`;
  }
  wsPath(ticket) {
    return `/api/v1/chat/conversations/${this.conversationId}/ws?ticket=${encodeURIComponent(ticket)}${this.sinceParam()}`;
  }
  ssePath(ticket) {
    return `/api/v1/chat/conversations/${this.conversationId}/events?ticket=${encodeURIComponent(ticket)}${this.sinceParam()}`;
  }

  /**
   * Sends a message. Resolves true once it is handed over: over WebSocket
   * the ack arrives as a frame; over SSE the POST's answer is the ack.
   * Throws an ApiError for a refusal the user must see. `extra`:
   * `reply_to` and `mentions`, when the message has them.
   *
   * Frames made here from an HTTP answer are marked `local`: they may
   * overtake the stream (the SSE stream brings them again, in order), so
   * they do not move the resume point.
   */
  async sendMessage(content, clientMsgId, attachmentIds = [], extra = {}) {
    const frame = { type: 'message', conversation_id: this.conversationId, content, client_msg_id: clientMsgId };
    if (attachmentIds.length) frame.attachment_ids = attachmentIds;
    if (extra.reply_to) frame.reply_to = extra.reply_to;
    if (extra.mentions?.length) frame.mentions = extra.mentions;
    if (this.choice.kind === 'ws') return this.sendWs(frame);
    this.debug.frame(`${this.label()} POST`, 'out', frame);
    try {
      const message = await this.api.postMessage(this.conversationId, content, clientMsgId, attachmentIds, extra);
      this.onFrame({ type: 'ack', client_msg_id: clientMsgId, seq: message.seq, id: message.id, conversation_id: this.conversationId, local: true });
      this.onFrame({ type: 'message', message, local: true });
      return true;
    } catch (e) {
      if (e.status === 0 || e.status >= 500 || e.status === 429) return false; // retried later
      throw e;
    }
  }

  /**
   * Sends a change to a message (`edit`, `delete` or `react`, with its
   * `client_msg_id`), the same way as a message: a frame on the WebSocket
   * (its ack arrives as a frame), or the HTTP route on SSE, whose answer is
   * the event (handed on as a local frame) or an ack. False: not handed
   * over, send it again (with the same key) on reconnect.
   */
  async sendChange(frame) {
    if (this.choice.kind === 'ws') return this.sendWs(frame);
    const id = this.conversationId;
    try {
      let answer;
      if (frame.type === 'edit') answer = await this.api.editMessage(id, frame.message_id, frame.content, frame.client_msg_id);
      else if (frame.type === 'delete') answer = await this.api.deleteMessage(id, frame.message_id, frame.client_msg_id);
      else answer = await this.api.react(id, frame.message_id, frame.emoji, frame.on !== false);
      if (answer?.type && answer.type !== 'ack') this.onFrame({ ...answer, conversation_id: answer.conversation_id ?? id, local: true });
      this.onFrame({ type: 'ack', client_msg_id: frame.client_msg_id, conversation_id: id, seq: answer?.seq, local: true });
      return true;
    } catch (e) {
      if (e.status === 0 || e.status >= 500 || e.status === 429) return false;
      throw e;
    }
  }

  typing() {
    if (this.choice.kind === 'ws') this.sendWs({ type: 'typing', conversation_id: this.conversationId });
    else this.api.postTyping(this.conversationId).catch(() => {});
  }

  /**
   * Marks read up to `seq`. A mark made while the socket is (re)connecting
   * waits for it: dropping it would leave the room counting the messages
   * unread, and its next notice would put them back on the badge.
   */
  read(seq) {
    if (this.choice.kind !== 'ws') {
      this.api.postRead(this.conversationId, seq).catch(() => {});
      return;
    }
    if (!this.sendWs({ type: 'read', conversation_id: this.conversationId, seq })) {
      this.unsentRead = Math.max(this.unsentRead ?? 0, seq);
    }
  }

  opened() {
    if (this.unsentRead) {
      this.sendWs({ type: 'read', conversation_id: this.conversationId, seq: this.unsentRead });
      this.unsentRead = 0;
    }
  }
}
