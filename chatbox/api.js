// REST client for the Vibe Chat edge, and the session behind it. Every
// error is an ApiError with the server's {code, message}, so the views can
// show something precise.
//
// The session: a short-lived access token (15 minutes) and a single-use
// refresh token. The access token is refreshed before it expires, without
// the user noticing; a request that still meets an expired token refreshes
// once and retries. Tabs share one session through localStorage, and a
// refresh runs under a cross-tab lock (Web Locks): the origin treats a
// refresh token used twice as stolen and revokes the session, so two tabs
// must never refresh with the same one. A tab that waited for the lock
// adopts the session the other tab just stored. Listeners (the realtime
// connections) hear every new access token, so open sockets renew in band.

import { jwtClaims } from './state.js';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const SESSION_KEY = 'vibe-chat-session';
/** A token this close to expiry is refreshed before use. */
const STALE_MS = 30_000;

export class Api {
  /** @param {string} base the edge origin, e.g. "https://chat.vibe.fit" ("" = same origin) */
  constructor(base, store = window.localStorage) {
    this.base = base.replace(/\/$/, '');
    this.store = store;
    this.session = null;
    this.tokenListeners = new Set();
    this.onSignedOut = () => {};
    this.refreshing = null;
    this.timer = null;
    // Another tab refreshed, logged in or logged out.
    window.addEventListener('storage', (e) => {
      if (e.key !== SESSION_KEY || this.host) return;
      const next = safeJson(e.newValue);
      if (!next) {
        if (this.session) this.ended();
      } else if (this.session && next.token !== this.session.token) {
        this.use(next, false);
      }
    });
  }

  get token() {
    return this.session?.token ?? null;
  }

  /** Calls `fn(token)` with every new access token; returns an unsubscribe. */
  onToken(fn) {
    this.tokenListeners.add(fn);
    return () => this.tokenListeners.delete(fn);
  }

  /**
   * Embedding with the host's session: `provider` is an access token or an
   * async function that returns one (called again whenever a fresh token
   * is needed). The ChatBox then never shows its login and never refreshes
   * or logs out by itself: the host owns the session.
   */
  useHost(provider) {
    this.host = typeof provider === 'function' ? provider : async () => provider;
  }

  /** A session built from a host's token (its claims name the user). */
  async hostSession() {
    const token = await this.host();
    const claims = token ? jwtClaims(token) : null;
    if (!claims?.sub || !claims.exp) throw new ApiError(401, 'invalid_token', 'The host page gave no usable token.');
    return {
      token,
      expires_at: new Date(claims.exp * 1000).toISOString(),
      obtained_at: Date.now(),
      user: { id: Number(claims.sub), full_name: claims.name, role: claims.role },
    };
  }

  /** The saved session, refreshed if its access token is stale; null if there is none. */
  async restore() {
    if (this.host) {
      try {
        const session = await this.hostSession();
        this.use(session, false);
        return this.session;
      } catch {
        return null;
      }
    }
    const saved = safeJson(this.store.getItem(SESSION_KEY));
    if (!saved?.refresh_token || Date.parse(saved.refresh_expires_at) <= Date.now()) return null;
    this.use(saved, false);
    if (stale(saved)) {
      try {
        await this.refresh();
      } catch {
        return null;
      }
    }
    return this.session;
  }

  /** Starts using `session` (a login or refresh answer) and keeps it fresh. */
  use(session, save = true) {
    this.session = { ...session, obtained_at: session.obtained_at ?? Date.now() };
    if (save) this.store.setItem(SESSION_KEY, JSON.stringify(this.session));
    this.schedule();
    for (const fn of this.tokenListeners) fn(this.session.token);
  }

  /** Refreshes a while before the access token expires (a quarter of its life, at most a minute). */
  schedule() {
    clearTimeout(this.timer);
    if (!this.session) return;
    const expires = Date.parse(this.session.expires_at);
    const lead = Math.min(60_000, (expires - this.session.obtained_at) / 4);
    const wait = Math.max(1_000, expires - lead - Date.now());
    this.timer = setTimeout(() => this.refresh().catch(() => {}), wait);
  }

  /** One refresh at a time in this tab, and across tabs. */
  refresh() {
    if (!this.refreshing) {
      this.refreshing = this.refreshNow().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  async refreshNow() {
    if (this.host) {
      const before = this.session?.token;
      let next;
      try {
        next = await this.hostSession();
      } catch (e) {
        this.ended();
        throw e;
      }
      if (next.token === before && stale(next)) {
        this.ended();
        throw new ApiError(401, 'token_expired', 'The host page’s token has expired.');
      }
      this.use(next, false);
      return;
    }
    const run = async () => {
      // Another tab may have refreshed while this one waited for the lock.
      const stored = safeJson(this.store.getItem(SESSION_KEY));
      if (stored?.token && stored.token !== this.session?.token && !stale(stored)) {
        this.use(stored, false);
        return;
      }
      const refreshToken = stored?.refresh_token ?? this.session?.refresh_token;
      if (!refreshToken) throw new ApiError(401, 'missing_token', 'Not signed in.');
      try {
        const next = await this.send('POST', '/api/v1/auth/refresh', { refresh_token: refreshToken }, false);
        this.use({ ...next, obtained_at: Date.now() });
      } catch (e) {
        if (e.status === 401) this.ended();
        throw e;
      }
    };
    if (navigator.locks?.request) await navigator.locks.request('vibe-chat-refresh', run);
    else await run();
  }

  /** The session is over (revoked, logged out elsewhere, refresh refused). */
  ended() {
    clearTimeout(this.timer);
    const had = this.session !== null;
    this.session = null;
    this.store.removeItem(SESSION_KEY);
    if (had) this.onSignedOut();
  }

  /** Logs this session out at the origin, then forgets it here. */
  async logout() {
    if (this.host) return; // the host owns the session
    try {
      if (this.session) await this.request('POST', '/api/v1/auth/logout');
    } catch {
      // Forgetting it locally is what matters to this device.
    }
    clearTimeout(this.timer);
    this.session = null;
    this.store.removeItem(SESSION_KEY);
  }

  /**
   * A request with the session's token; an expired token is refreshed once.
   * `signal` cancels it (an ApiError with code 'aborted').
   */
  async request(method, path, body, { signal } = {}) {
    if (this.session && stale(this.session)) await this.refresh().catch(() => {});
    try {
      return await this.send(method, path, body, true, signal);
    } catch (e) {
      if (e.status !== 401 || !(this.session?.refresh_token || this.host)) throw e;
      await this.refresh();
      return this.send(method, path, body, true, signal);
    }
  }

  async send(method, path, body, auth, signal) {
    const headers = { accept: 'application/json' };
    if (auth && this.token) headers.authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    let res;
    try {
      res = await fetch(this.base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    } catch (e) {
      if (e.name === 'AbortError') throw new ApiError(0, 'aborted', 'Cancelled.');
      throw new ApiError(0, 'network', 'The chat server cannot be reached.');
    }
    const text = await res.text();
    const data = text ? safeJson(text) : null;
    if (!res.ok) {
      throw new ApiError(res.status, data?.code ?? 'http_' + res.status, data?.message ?? res.statusText);
    }
    return data;
  }

  async login(email, password) {
    const session = await this.send('POST', '/api/v1/auth/login', { email, password }, false);
    this.use(session);
    return this.session;
  }
  conversations() {
    return this.request('GET', '/api/v1/chat/conversations');
  }
  conversation(id) {
    return this.request('GET', `/api/v1/chat/conversations/${id}`);
  }
  messagesBefore(id, beforeSeq, limit = 50) {
    return this.request('GET', `/api/v1/chat/conversations/${id}/messages?before_seq=${beforeSeq}&limit=${limit}`);
  }
  messagesAfter(id, afterSeq, limit = 200) {
    return this.request('GET', `/api/v1/chat/conversations/${id}/messages?after_seq=${afterSeq}&limit=${limit}`);
  }
  activeUsers() {
    return this.request('GET', '/api/v1/chat/active-users');
  }
  /** The user directory: names or emails starting with `query`. */
  directory(query, limit = 20) {
    return this.request('GET', `/api/v1/users?query=${encodeURIComponent(query)}&limit=${limit}`);
  }
  /** One person, for a presence or a conversation that names someone not yet known. */
  user(id) {
    return this.request('GET', `/api/v1/users/${id}`);
  }
  createGroup(name, participantIds) {
    return this.request('POST', '/api/v1/chat/conversations', { type: 'group', name, participant_ids: participantIds });
  }
  renameGroup(id, name) {
    return this.request('PATCH', `/api/v1/chat/conversations/${id}`, { name });
  }
  addMembers(id, userIds) {
    return this.request('POST', `/api/v1/chat/conversations/${id}/participants`, { user_ids: userIds });
  }
  removeMembers(id, userIds) {
    return this.request('DELETE', `/api/v1/chat/conversations/${id}/participants`, { user_ids: userIds });
  }
  vapidKey() {
    return this.request('GET', '/api/v1/push/vapid-public-key');
  }
  addPushSubscription(subscription) {
    return this.request('POST', '/api/v1/push/subscriptions', subscription);
  }
  deletePushSubscription(id) {
    return this.request('DELETE', `/api/v1/push/subscriptions/${id}`);
  }
  pushSettings() {
    return this.request('GET', '/api/v1/push/settings');
  }
  savePushSettings(settings) {
    return this.request('PUT', '/api/v1/push/settings', settings);
  }
  conversationNotifications(id) {
    return this.request('GET', `/api/v1/chat/conversations/${id}/notifications`);
  }
  saveConversationNotifications(id, prefs) {
    return this.request('PUT', `/api/v1/chat/conversations/${id}/notifications`, prefs);
  }
  /** Demo accounts, offered by dev builds only (404 elsewhere). */
  async demo() {
    try {
      return await this.send('GET', '/api/v1/edge/demo', undefined, false);
    } catch {
      return null;
    }
  }
  openDirect(userId) {
    return this.request('POST', '/api/v1/chat/conversations', { type: 'direct', participant_id: userId });
  }
  /** A single-use ticket for one room's connection, or (no id) the user's own. */
  ticket(conversationId) {
    const body = conversationId ? { conversation_id: conversationId } : undefined;
    return this.request('POST', '/api/v1/chat/ws-ticket', body);
  }
  /** `extra`: `reply_to` (a message id) and `mentions` (user ids), when the message has them. */
  postMessage(id, content, clientMsgId, attachmentIds = [], extra = {}) {
    const body = { content, client_msg_id: clientMsgId };
    if (attachmentIds.length) body.attachment_ids = attachmentIds;
    if (extra.reply_to) body.reply_to = extra.reply_to;
    if (extra.mentions?.length) body.mentions = extra.mentions;
    return this.request('POST', `/api/v1/chat/conversations/${id}/messages`, body);
  }
  // A message's changes over HTTP (the SSE fallback's way to send them):
  // each answers the event frame (`message_edited`, `message_deleted`,
  // `reaction`), or an ack-shaped frame when nothing changed.
  editMessage(id, messageId, content, clientMsgId) {
    return this.request('PATCH', `/api/v1/chat/conversations/${id}/messages/${messageId}`, { content, client_msg_id: clientMsgId });
  }
  deleteMessage(id, messageId, clientMsgId) {
    const query = clientMsgId ? `?client_msg_id=${encodeURIComponent(clientMsgId)}` : '';
    return this.request('DELETE', `/api/v1/chat/conversations/${id}/messages/${messageId}${query}`);
  }
  react(id, messageId, emoji, on = true) {
    return this.request(on ? 'PUT' : 'DELETE', `/api/v1/chat/conversations/${id}/messages/${messageId}/reactions/${encodeURIComponent(emoji)}`);
  }
  /** Messages in the caller's conversations: `{hits, next_cursor}`. `signal` cancels a stale search. */
  search(q, { cursor = null, conversationId = null, limit = 20, signal } = {}) {
    const params = new URLSearchParams({ q, limit: String(limit) });
    if (cursor) params.set('cursor', cursor);
    if (conversationId) params.set('conversation_id', String(conversationId));
    return this.request('GET', `/api/v1/chat/search?${params}`, undefined, { signal });
  }

  /**
   * Uploads one file to a conversation: the raw bytes as the body (a Blob,
   * so the browser sends its Content-Length, which the edge needs). Over
   * XMLHttpRequest, because fetch reports no upload progress.
   * `onProgress(loaded, total)`; returns `{ done, abort }`: `done` resolves
   * to the attachment, or rejects with an ApiError (code 'aborted' after
   * `abort()`). An expired token is refreshed once and the upload retried.
   */
  upload(conversationId, file, { name, durationMs, size, onProgress } = {}) {
    let xhr = null;
    let aborted = false;
    const params = new URLSearchParams();
    if (name) params.set('name', name);
    if (durationMs != null) params.set('duration_ms', String(Math.round(durationMs)));
    if (size) {
      params.set('width', String(size.width));
      params.set('height', String(size.height));
    }
    const url = `${this.base}/api/v1/chat/conversations/${conversationId}/attachments?${params}`;
    const once = () =>
      new Promise((resolve, reject) => {
        xhr = new XMLHttpRequest();
        xhr.open('POST', url);
        xhr.setRequestHeader('accept', 'application/json');
        if (this.token) xhr.setRequestHeader('authorization', `Bearer ${this.token}`);
        // Only says "audio" or "video" for a WebM or MP4: the server sniffs the bytes.
        xhr.setRequestHeader('content-type', file.type || 'application/octet-stream');
        xhr.upload.onprogress = (e) => onProgress?.(e.loaded, e.lengthComputable ? e.total : file.size);
        xhr.onload = () => {
          const data = safeJson(xhr.responseText);
          if (xhr.status >= 200 && xhr.status < 300 && data) resolve(data);
          else reject(new ApiError(xhr.status, data?.code ?? `http_${xhr.status}`, data?.message ?? uploadError(xhr.status)));
        };
        xhr.onerror = () => reject(new ApiError(0, 'network', 'The upload was interrupted: the chat server cannot be reached.'));
        xhr.onabort = () => reject(new ApiError(0, 'aborted', 'Cancelled.'));
        xhr.send(file);
      });
    const done = (async () => {
      if (this.session && stale(this.session)) await this.refresh().catch(() => {});
      try {
        return await once();
      } catch (e) {
        if (aborted || e.status !== 401 || !(this.session?.refresh_token || this.host)) throw e;
        await this.refresh();
        if (aborted) throw new ApiError(0, 'aborted', 'Cancelled.');
        return once();
      }
    })();
    return {
      done,
      abort: () => {
        aborted = true;
        xhr?.abort();
      },
    };
  }
  /** One attachment with freshly signed links (the old ones expired). */
  attachment(conversationId, attachmentId) {
    return this.request('GET', `/api/v1/chat/conversations/${conversationId}/attachments/${attachmentId}`);
  }
  /** A page of a conversation's attachments of one kind, newest first. */
  gallery(conversationId, kind, cursor = null, limit = 30) {
    const params = new URLSearchParams({ kind, limit: String(limit) });
    if (cursor) params.set('cursor', cursor);
    return this.request('GET', `/api/v1/chat/conversations/${conversationId}/attachments?${params}`);
  }
  /** An absolute URL for a signed media path (relative to the edge). */
  mediaUrl(path) {
    if (!path) return null;
    return /^https?:/.test(path) ? path : this.url(path);
  }
  postTyping(id) {
    return this.request('POST', `/api/v1/chat/conversations/${id}/typing`, {});
  }
  postRead(id, seq) {
    return this.request('POST', `/api/v1/chat/conversations/${id}/read`, { seq });
  }

  /** ws:// or wss:// URL for a path on the edge. */
  wsUrl(path) {
    const origin = this.base || window.location.origin;
    return origin.replace(/^http/, 'ws') + path;
  }
  url(path) {
    return (this.base || window.location.origin) + path;
  }
}

/** What to say when an upload's refusal carries no message of its own. */
function uploadError(status) {
  if (status === 413) return 'The file is too large.';
  if (status === 415) return 'This type of file can’t be sent.';
  if (status === 422) return 'The file is damaged or incomplete.';
  if (status === 403) return 'You can’t send files to this conversation.';
  if (status >= 500 || status === 0) return 'The upload failed: the chat server is unavailable. Try again.';
  return `The upload failed (${status}).`;
}

function stale(session) {
  return Date.parse(session.expires_at) - Date.now() < STALE_MS;
}

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
