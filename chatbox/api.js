// REST client for the Vibe Chat edge. Every error is an ApiError with the
// server's {code, message}, so the views can show something precise.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  /** @param {string} base the edge origin, e.g. "https://chat.vibe.fit" ("" = same origin) */
  constructor(base) {
    this.base = base.replace(/\/$/, '');
    this.token = null;
  }

  async request(method, path, body) {
    const headers = { accept: 'application/json' };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    let res;
    try {
      res = await fetch(this.base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, 'network', 'The chat server cannot be reached.');
    }
    const text = await res.text();
    const data = text ? safeJson(text) : null;
    if (!res.ok) {
      throw new ApiError(res.status, data?.code ?? 'http_' + res.status, data?.message ?? res.statusText);
    }
    return data;
  }

  login(email, password) {
    return this.request('POST', '/api/v1/auth/login', { email, password });
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
  openDirect(userId) {
    return this.request('POST', '/api/v1/chat/conversations', { type: 'direct', participant_id: userId });
  }
  ticket() {
    return this.request('POST', '/api/v1/chat/ws-ticket');
  }
  postMessage(id, content, clientMsgId) {
    return this.request('POST', `/api/v1/chat/conversations/${id}/messages`, { content, client_msg_id: clientMsgId });
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

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
