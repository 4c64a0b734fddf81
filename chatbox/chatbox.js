// The Vibe Chat ChatBox: a floating launcher with an unread badge, and a
// panel with three views: conversations, people (contacts, and a search
// of the directory), and a chat.
//
// Embed it on any page of the platform:
//
//   <script type="module" src="https://chat.vibe.fit/chatbox.js"
//           data-vibe-chat data-edge="https://chat.vibe.fit"></script>
//
// or import { mountChatBox } and call it. It talks to the edge only: REST
// (proxied to the origin), one always-on connection (the user's own) for presence and
// unread counts, and one Room connection for the open chat.

import { Api, ApiError } from './api.js';
import { UserConnection, RoomConnection, TransportChoice } from './realtime.js';

const TYPING_SHOW_MS = 5_000;
const TYPING_SEND_EVERY_MS = 2_000;
const DEMO_USERS = ['coach@vibe.fit', 'alex@vibe.fit', 'sam@vibe.fit'];

/** Mounts the ChatBox into `host` (default: document.body). */
export function mountChatBox({ edge = '', host = document.body, open = false } = {}) {
  const box = new ChatBox(new Api(edge), host, open);
  box.start();
  return box;
}

class ChatBox {
  constructor(api, host, open) {
    this.api = api;
    this.choice = TransportChoice.fromLocation();
    this.user = null;
    this.view = 'conversations';
    this.conversations = new Map();
    this.users = new Map();
    this.online = new Set();
    // The People view's directory search: what was typed, and its results
    // (null while the box is empty: the view lists contacts).
    this.peopleQuery = '';
    this.found = null;
    this.searchTimer = null;
    this.own = null;
    this.chat = null;
    this.transportKind = this.choice.kind;
    this.root = this.build(host, open);
  }

  // ---- skeleton ---------------------------------------------------------

  build(host, open) {
    const css = document.createElement('link');
    css.rel = 'stylesheet';
    css.href = new URL('./chatbox.css', import.meta.url).href;
    document.head.append(css);

    const root = el('div', { class: 'vc-root' });
    this.launcher = el('button', {
      class: 'vc-launcher',
      type: 'button',
      'aria-label': 'Open chat',
      'aria-expanded': String(open),
      'aria-controls': 'vc-panel',
    });
    this.launcher.append(chatIcon());
    this.badge = el('span', { class: 'vc-badge', hidden: '' });
    this.launcher.append(this.badge);
    this.launcher.addEventListener('click', () => this.toggle());

    this.panel = el('section', { id: 'vc-panel', class: 'vc-panel', role: 'dialog', 'aria-label': 'Vibe Chat' });
    if (!open) this.panel.hidden = true;
    this.panel.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') this.toggle(false);
    });
    root.append(this.panel, this.launcher);
    host.append(root);
    return root;
  }

  toggle(force) {
    const show = force ?? this.panel.hidden;
    this.panel.hidden = !show;
    this.launcher.setAttribute('aria-expanded', String(show));
    this.launcher.setAttribute('aria-label', show ? 'Close chat' : 'Open chat');
    if (show) {
      this.panel.querySelector('input, textarea, button')?.focus();
      this.markRead();
    } else {
      this.launcher.focus();
    }
  }

  async start() {
    // The session is refreshed silently; when it ends (revoked, logged out
    // in another tab, refresh refused) the login comes back.
    this.api.onSignedOut = () => this.signedOut();
    const session = await this.api.restore();
    if (session) this.signIn(session);
    else this.renderLogin();
  }

  // ---- session ----------------------------------------------------------

  async signIn(session) {
    this.user = session.user;
    this.own = new UserConnection({
      api: this.api,
      choice: this.choice,
      onFrame: (f) => this.onUserFrame(f),
      onState: (state, kind) => this.onConnectionState(state, kind),
    });
    this.own.start();
    await Promise.all([this.loadConversations(), this.loadUsers()]);
    const openChat = Number(sessionStorage.getItem('vibe-chat-open'));
    if (openChat && this.conversations.has(openChat)) this.openChat(openChat);
    else this.show('conversations');
  }

  /** The Log out button: ends the session at the origin too. */
  async signOut() {
    await this.api.logout();
    this.signedOut();
  }

  signedOut() {
    this.own?.stop();
    this.own = null;
    this.closeChat();
    sessionStorage.removeItem('vibe-chat-open');
    this.user = null;
    this.conversations.clear();
    this.users.clear();
    this.updateBadge();
    this.renderLogin();
  }

  onConnectionState(state, kind) {
    this.transportKind = kind;
    if (state === 'unauthorized') {
      if (this.api.session) this.api.ended();
      else this.signedOut();
      return;
    }
    this.root.dataset.transport = kind;
    const status = this.panel.querySelector('.vc-conn');
    if (status) status.textContent = connectionLabel(state, kind);
  }

  // ---- data -------------------------------------------------------------

  async loadConversations() {
    try {
      const { conversations } = await this.api.conversations();
      this.conversations = new Map(conversations.map((c) => [c.id, c]));
      this.updateBadge();
      if (this.view === 'conversations') this.renderConversations();
    } catch (e) {
      this.flash(e);
    }
  }

  async loadUsers() {
    try {
      const { users } = await this.api.activeUsers();
      this.users = new Map(users.map((u) => [u.id, u]));
      for (const u of users) if (u.is_online) this.online.add(u.id);
      if (this.view === 'people') this.renderPeople();
    } catch (e) {
      this.flash(e);
    }
  }

  onUserFrame(frame) {
    switch (frame.type) {
      case 'presence_snapshot':
        this.online = new Set(frame.online);
        break;
      case 'presence':
        if (frame.is_online) this.online.add(frame.user_id);
        else this.online.delete(frame.user_id);
        // Only contacts are listed; presence of anyone else is not reloaded
        // for (a new contact arrives with their conversation).
        if (this.users.has(frame.user_id)) {
          Object.assign(this.users.get(frame.user_id), { is_online: frame.is_online, last_seen: frame.last_seen });
        }
        break;
      case 'conversation_updated': {
        const known = this.conversations.get(frame.conversation_id);
        if (!known) {
          // A new conversation: its members may be new contacts.
          this.loadConversations();
          this.loadUsers();
          return;
        }
        const open = this.chat?.id === frame.conversation_id && !this.panel.hidden && !document.hidden;
        known.unread_count = open ? 0 : frame.unread_count;
        if (frame.last_message) known.last_message = frame.last_message;
        known.last_seq = Math.max(known.last_seq ?? 0, frame.seq);
        if (frame.last_message) known.updated_at = frame.last_message.created_at;
        this.updateBadge();
        break;
      }
      default:
        return;
    }
    if (this.view === 'conversations') this.renderConversations();
    if (this.view === 'people') this.renderPeople();
    if (this.view === 'chat') this.renderChatHeader();
  }

  updateBadge() {
    const unread = [...this.conversations.values()].reduce((n, c) => n + (c.unread_count || 0), 0);
    this.badge.hidden = unread === 0;
    this.badge.textContent = unread > 99 ? '99+' : String(unread);
    this.launcher.setAttribute('aria-label', (this.panel.hidden ? 'Open chat' : 'Close chat') + (unread ? `, ${unread} unread` : ''));
  }

  // ---- views ------------------------------------------------------------

  show(view) {
    this.view = view;
    if (view === 'conversations') this.renderConversations();
    if (view === 'people') this.renderPeople();
  }

  frame(title, body, { back = false } = {}) {
    this.panel.replaceChildren();
    const header = el('header', { class: 'vc-header' });
    if (back) {
      const b = el('button', { type: 'button', class: 'vc-back', 'aria-label': 'Back to conversations' }, '←');
      b.addEventListener('click', () => {
        this.closeChat();
        this.show('conversations');
      });
      header.append(b);
    }
    header.append(el('h2', { class: 'vc-title' }, title));
    if (this.user) {
      const out = el('button', { type: 'button', class: 'vc-link' }, 'Log out');
      out.addEventListener('click', () => this.signOut());
      header.append(out);
    }
    // On a phone the panel covers the launcher, so it closes from here too.
    const close = el('button', { type: 'button', class: 'vc-close', 'aria-label': 'Minimise chat' }, '×');
    close.addEventListener('click', () => this.toggle(false));
    header.append(close);
    this.panel.append(header);
    if (this.user && !back) {
      const tabs = el('nav', { class: 'vc-tabs', role: 'tablist', 'aria-label': 'Chat views' });
      for (const [id, label] of [
        ['conversations', 'Chats'],
        ['people', 'People'],
      ]) {
        const tab = el('button', { type: 'button', role: 'tab', 'aria-selected': String(this.view === id), class: 'vc-tab' }, label);
        tab.addEventListener('click', () => this.show(id));
        tabs.append(tab);
      }
      this.panel.append(tabs);
    }
    this.panel.append(body);
    const footer = el('footer', { class: 'vc-footer' });
    footer.append(el('span', { class: 'vc-conn', 'aria-live': 'polite' }, this.own ? connectionLabel(this.own.state, this.transportKind) : ''));
    this.panel.append(footer);
  }

  renderLogin(error) {
    this.view = 'login';
    const form = el('form', { class: 'vc-login', novalidate: '' });
    form.append(
      el('p', { class: 'vc-hint' }, 'Sign in to chat with your trainer and your group.'),
      labelled('Email', el('input', { name: 'email', type: 'email', autocomplete: 'username', required: '' })),
      labelled('Password', el('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: '' })),
    );
    const err = el('p', { class: 'vc-error', role: 'alert' }, error ?? '');
    const submit = el('button', { type: 'submit', class: 'vc-primary' }, 'Log in');
    form.append(err, submit);
    const demos = el('div', { class: 'vc-demos' }, 'Demo: ');
    for (const email of DEMO_USERS) {
      const b = el('button', { type: 'button', class: 'vc-link' }, email.split('@')[0]);
      b.addEventListener('click', () => {
        form.email.value = email;
        form.password.value = 'demo-password';
        form.requestSubmit();
      });
      demos.append(b);
    }
    form.append(demos);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      submit.disabled = true;
      err.textContent = '';
      try {
        const session = await this.api.login(form.email.value.trim(), form.password.value);
        await this.signIn(session);
      } catch (ex) {
        err.textContent = ex.code === 'bad_credentials' ? 'Wrong email or password.' : ex.message;
        submit.disabled = false;
      }
    });
    this.frame('Vibe Chat', form);
  }

  renderConversations() {
    const list = el('ul', { class: 'vc-list', 'aria-label': 'Conversations' });
    const sorted = [...this.conversations.values()].sort((a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at) || b.id - a.id);
    if (sorted.length === 0) list.append(el('li', { class: 'vc-empty' }, 'No conversations yet. Start one from People.'));
    for (const c of sorted) {
      const item = el('li');
      const button = el('button', { type: 'button', class: 'vc-row', 'data-conversation-id': String(c.id) });
      const online = c.peer && this.online.has(c.peer.user_id);
      const name = el('span', { class: 'vc-row-title' });
      if (c.peer) name.append(presenceDot(online));
      name.append(document.createTextNode(c.title));
      const preview = el('span', { class: 'vc-row-preview' }, c.last_message ? c.last_message.content : 'No messages yet');
      const meta = el('span', { class: 'vc-row-meta' }, c.last_message ? shortTime(c.last_message.created_at) : '');
      button.append(name, meta, preview);
      if (c.unread_count > 0) {
        button.append(el('span', { class: 'vc-unread', 'aria-label': `${c.unread_count} unread` }, c.unread_count > 999 ? '999+' : String(c.unread_count)));
      }
      button.addEventListener('click', () => this.openChat(c.id));
      item.append(button);
      list.append(item);
    }
    this.frame('Chats', list);
  }

  renderPeople() {
    const search = el('input', {
      type: 'search',
      class: 'vc-search',
      placeholder: 'Find people by name or email',
      'aria-label': 'Find people by name or email',
      autocomplete: 'off',
    });
    search.value = this.peopleQuery;
    search.addEventListener('input', () => this.searchPeople(search.value));
    const searching = this.found !== null;
    const people = searching
      ? this.found
      : [...this.users.values()].sort(
          (a, b) => Number(this.online.has(b.id)) - Number(this.online.has(a.id)) || a.full_name.localeCompare(b.full_name),
        );
    const list = el('ul', { class: 'vc-list', 'aria-label': searching ? 'Search results' : 'People' });
    for (const u of people) {
      // Contacts' presence is live; a directory result's is as REST said.
      const online = this.users.has(u.id) ? this.online.has(u.id) : u.is_online;
      const item = el('li');
      const button = el('button', { type: 'button', class: 'vc-row', 'data-user-id': String(u.id), 'aria-label': `${u.full_name}, ${u.role}, ${online ? 'online' : 'offline'}` });
      const name = el('span', { class: 'vc-row-title' });
      name.append(presenceDot(online), document.createTextNode(u.full_name));
      button.append(name, el('span', { class: 'vc-role' }, u.role), el('span', { class: 'vc-row-preview' }, online ? 'Online' : u.last_seen ? `Last seen ${shortTime(u.last_seen)}` : 'Offline'));
      button.addEventListener('click', () => this.startDirect(u.id));
      item.append(button);
      list.append(item);
    }
    if (people.length === 0) {
      list.append(el('li', { class: 'vc-empty' }, searching ? `Nobody found for “${this.peopleQuery.trim()}”.` : 'No contacts yet. Find someone above.'));
    }
    // Re-rendered on every presence change: keep the search box's focus
    // and caret.
    const focused = document.activeElement?.classList?.contains('vc-search');
    const caret = focused ? document.activeElement.selectionStart : null;
    const body = el('div', { class: 'vc-people' });
    body.append(search, list);
    this.frame('People', body);
    if (focused) {
      search.focus();
      search.setSelectionRange(caret, caret);
    }
  }

  /** Debounced directory search; an empty box goes back to the contacts. */
  searchPeople(query) {
    this.peopleQuery = query;
    clearTimeout(this.searchTimer);
    const q = query.trim();
    if (!q) {
      this.found = null;
      if (this.view === 'people') this.renderPeople();
      return;
    }
    this.searchTimer = setTimeout(async () => {
      try {
        const { users } = await this.api.directory(q);
        // A slower answer to an older query must not replace a newer one.
        if (this.peopleQuery.trim() !== q) return;
        this.found = users;
        if (this.view === 'people') this.renderPeople();
      } catch (e) {
        this.flash(e);
      }
    }, 250);
  }

  async startDirect(userId) {
    try {
      const conv = await this.api.openDirect(userId);
      if (!this.conversations.has(conv.id)) await this.loadConversations();
      this.openChat(conv.id);
    } catch (e) {
      this.flash(e);
    }
  }

  // ---- chat -------------------------------------------------------------

  async openChat(id) {
    this.closeChat();
    this.view = 'chat';
    sessionStorage.setItem('vibe-chat-open', String(id));
    const chat = {
      id,
      messages: new Map(), // seq -> message
      pending: new Map(), // client_msg_id -> { content, state }
      participants: new Map(),
      oldest: null,
      hasMore: false,
      typing: new Map(), // user_id -> timeout
      lastTypingSent: 0,
      readSent: 0,
      conn: null,
    };
    this.chat = chat;
    this.renderChat();
    try {
      const detail = await this.api.conversation(id);
      if (this.chat !== chat) return;
      for (const p of detail.participants) chat.participants.set(p.user_id, p);
      for (const m of detail.messages) chat.messages.set(m.seq, m);
      chat.oldest = detail.messages[0]?.seq ?? null;
      chat.hasMore = detail.has_more;
      chat.title = titleOf(detail, this.user.id);
    } catch (e) {
      this.flash(e);
      return;
    }
    chat.conn = new RoomConnection({
      api: this.api,
      choice: this.choice,
      conversationId: id,
      lastSeq: () => maxSeq(chat),
      onFrame: (f) => this.onRoomFrame(chat, f),
      onState: (state, kind) => {
        this.onConnectionState(state, kind);
        if (state === 'open') this.flushPending(chat);
      },
    });
    chat.conn.start();
    this.renderChat();
    this.markRead();
  }

  closeChat() {
    if (!this.chat) return;
    this.chat.conn?.stop();
    for (const t of this.chat.typing.values()) clearTimeout(t);
    this.chat = null;
    sessionStorage.removeItem('vibe-chat-open');
  }

  onRoomFrame(chat, frame) {
    if (this.chat !== chat) return;
    switch (frame.type) {
      case 'message': {
        const m = frame.message;
        if (!chat.messages.has(m.seq)) {
          chat.messages.set(m.seq, m);
          if (m.sender_id === this.user.id) chat.pending.delete(m.client_msg_id);
          this.clearTyping(chat, m.sender_id);
          const conv = this.conversations.get(chat.id);
          if (conv) {
            conv.last_message = { ...m };
            conv.updated_at = m.created_at;
          }
          this.renderMessages('follow');
          this.markRead();
        }
        break;
      }
      case 'ack': {
        const p = chat.pending.get(frame.client_msg_id);
        if (p) p.state = 'acked';
        this.renderMessages('keep');
        break;
      }
      case 'typing':
        if (frame.user_id === this.user.id) return;
        this.clearTyping(chat, frame.user_id);
        chat.typing.set(
          frame.user_id,
          setTimeout(() => {
            chat.typing.delete(frame.user_id);
            this.renderTyping();
          }, TYPING_SHOW_MS),
        );
        this.renderTyping();
        break;
      case 'receipt': {
        const p = chat.participants.get(frame.user_id) ?? { user_id: frame.user_id };
        p.delivered_seq = Math.max(p.delivered_seq ?? 0, frame.delivered_seq);
        p.read_seq = Math.max(p.read_seq ?? 0, frame.read_seq);
        chat.participants.set(frame.user_id, p);
        this.renderMessages('keep');
        break;
      }
      case 'resync':
        this.catchUp(chat, frame.from_seq - 1);
        break;
      case 'error':
        if (frame.code !== 'rate_limited') this.flash(new ApiError(0, frame.code, frame.message));
        break;
      default:
        break;
    }
  }

  /** After `resync`: pages forward through REST from `after`. */
  async catchUp(chat, after) {
    let cursor = after;
    for (;;) {
      const page = await this.api.messagesAfter(chat.id, cursor).catch(() => null);
      if (!page || this.chat !== chat) return;
      for (const m of page.messages) chat.messages.set(m.seq, m);
      if (!page.messages.length || !page.has_more) break;
      cursor = page.messages[page.messages.length - 1].seq;
    }
    this.renderMessages('follow');
    // Reconnect from the new high-water mark.
    chat.conn.stop();
    chat.conn.start();
  }

  clearTyping(chat, userId) {
    const t = chat.typing.get(userId);
    if (t) {
      clearTimeout(t);
      chat.typing.delete(userId);
      this.renderTyping();
    }
  }

  async send(content) {
    const chat = this.chat;
    if (!chat) return;
    const id = crypto.randomUUID();
    chat.pending.set(id, { content, state: 'sending', at: new Date().toISOString() });
    this.renderMessages('end');
    await this.trySend(chat, id);
  }

  async trySend(chat, id) {
    const p = chat.pending.get(id);
    if (!p || !chat.conn || p.state === 'acked') return;
    try {
      const handed = await chat.conn.sendMessage(p.content, id);
      if (!handed) p.state = 'sending'; // waits for the reconnect
    } catch (e) {
      p.state = 'failed';
      p.error = e.message;
      this.renderMessages('keep');
    }
  }

  /** Resends everything not yet acknowledged, with the same client_msg_id. */
  flushPending(chat) {
    for (const [id, p] of chat.pending) if (p.state === 'sending') this.trySend(chat, id);
  }

  markRead() {
    const chat = this.chat;
    if (!chat || !chat.conn || this.panel.hidden || document.hidden) return;
    const top = maxSeq(chat);
    if (top > chat.readSent) {
      chat.readSent = top;
      chat.conn.read(top);
    }
    const conv = this.conversations.get(chat.id);
    if (conv && conv.unread_count) {
      conv.unread_count = 0;
      this.updateBadge();
    }
  }

  renderChat() {
    const chat = this.chat;
    const body = el('div', { class: 'vc-chat' });
    this.chatHeaderSlot = el('p', { class: 'vc-subtitle', 'aria-live': 'polite' });
    const scroller = el('ol', { class: 'vc-messages', 'aria-label': 'Messages', tabindex: '0' });
    scroller.addEventListener('scroll', () => {
      if (scroller.scrollTop < 40) this.loadOlder();
      if (scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40) this.markRead();
    });
    this.scroller = scroller;
    this.typingSlot = el('p', { class: 'vc-typing', 'aria-live': 'polite' });
    const form = el('form', { class: 'vc-compose' });
    const input = el('textarea', { rows: '1', 'aria-label': 'Message', placeholder: 'Write a message…', maxlength: '4000' });
    const sendBtn = el('button', { type: 'submit', class: 'vc-primary', disabled: '' }, 'Send');
    input.addEventListener('input', () => {
      sendBtn.disabled = input.value.trim() === '';
      const now = Date.now();
      if (input.value && now - chat.lastTypingSent > TYPING_SEND_EVERY_MS) {
        chat.lastTypingSent = now;
        chat.conn?.typing();
      }
    });
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const text = input.value;
      if (!text.trim()) return;
      input.value = '';
      sendBtn.disabled = true;
      chat.lastTypingSent = 0;
      this.send(text);
      input.focus();
    });
    form.append(input, sendBtn);
    body.append(this.chatHeaderSlot, scroller, this.typingSlot, form);
    this.frame(chat.title ?? 'Chat', body, { back: true });
    this.renderChatHeader();
    this.renderMessages('end');
    input.focus();
  }

  renderChatHeader() {
    const chat = this.chat;
    if (!chat || !this.chatHeaderSlot) return;
    const title = this.panel.querySelector('.vc-title');
    if (title && chat.title) title.textContent = chat.title;
    const others = [...chat.participants.keys()].filter((u) => u !== this.user.id);
    if (others.length === 1) {
      const online = this.online.has(others[0]);
      this.chatHeaderSlot.replaceChildren(presenceDot(online), document.createTextNode(online ? 'Online' : 'Offline'));
    } else {
      this.chatHeaderSlot.textContent = `${chat.participants.size} members`;
    }
  }

  renderTyping() {
    const chat = this.chat;
    if (!chat || !this.typingSlot) return;
    const names = [...chat.typing.keys()].map((u) => firstName(chat.participants.get(u)?.full_name ?? this.users.get(u)?.full_name ?? 'Someone'));
    this.typingSlot.textContent = names.length ? `${names.join(', ')} ${names.length > 1 ? 'are' : 'is'} typing…` : '';
  }

  renderMessages(mode) {
    const chat = this.chat;
    const scroller = this.scroller;
    if (!chat || !scroller) return;
    const atEnd = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 60;
    const items = [];
    if (chat.hasMore) items.push(el('li', { class: 'vc-more' }, 'Scroll up for older messages'));
    const seqs = [...chat.messages.keys()].sort((a, b) => a - b);
    for (const seq of seqs) {
      const m = chat.messages.get(seq);
      const mine = m.sender_id === this.user.id;
      const status = mine ? statusOf(chat, m, this.user.id) : null;
      items.push(bubble({ mine, text: m.content, at: m.created_at, status, seq, sender: mine ? null : this.senderName(chat, m.sender_id) }));
    }
    for (const [id, p] of chat.pending) {
      if ([...chat.messages.values()].some((m) => m.client_msg_id === id)) continue;
      const status = { failed: 'failed', acked: 'sent' }[p.state] ?? 'sending';
      items.push(bubble({ mine: true, text: p.content, at: p.at, status, pendingId: id, error: p.error }));
    }
    scroller.replaceChildren(...items);
    // 'end': always (opening, sending); 'follow': only if the reader was at
    // the end already (new messages); 'keep': never (status updates).
    if (mode === 'end' || (mode === 'follow' && atEnd)) this.scrollToEnd();
  }

  senderName(chat, userId) {
    if (chat.participants.size <= 2) return null;
    return firstName(chat.participants.get(userId)?.full_name ?? 'Someone');
  }

  scrollToEnd(force) {
    if (!this.scroller) return;
    if (force) this.scroller.scrollTop = this.scroller.scrollHeight;
    else requestAnimationFrame(() => (this.scroller.scrollTop = this.scroller.scrollHeight));
  }

  async loadOlder() {
    const chat = this.chat;
    if (!chat || !chat.hasMore || chat.loadingOlder || chat.oldest == null) return;
    chat.loadingOlder = true;
    try {
      const page = await this.api.messagesBefore(chat.id, chat.oldest);
      if (this.chat !== chat) return;
      const before = this.scroller.scrollHeight;
      for (const m of page.messages) chat.messages.set(m.seq, m);
      chat.oldest = page.messages[0]?.seq ?? chat.oldest;
      chat.hasMore = page.has_more;
      this.renderMessages('keep');
      // Keep the reader's place.
      this.scroller.scrollTop += this.scroller.scrollHeight - before;
    } catch (e) {
      this.flash(e);
    } finally {
      chat.loadingOlder = false;
    }
  }

  flash(error) {
    const note = el('p', { class: 'vc-flash', role: 'alert' }, error.message || String(error));
    this.panel.prepend(note);
    setTimeout(() => note.remove(), 5_000);
  }
}

// ---- helpers ----------------------------------------------------------

function statusOf(chat, m, me) {
  const others = [...chat.participants.values()].filter((p) => p.user_id !== me);
  let status = m.status ?? 'sent';
  if (others.length) {
    if (others.every((p) => (p.read_seq ?? 0) >= m.seq)) status = 'read';
    else if (status !== 'read' && others.every((p) => Math.max(p.delivered_seq ?? 0, p.read_seq ?? 0) >= m.seq)) status = 'delivered';
  }
  return status;
}

function maxSeq(chat) {
  let top = 0;
  for (const seq of chat.messages.keys()) top = Math.max(top, seq);
  return top;
}

function titleOf(detail, me) {
  if (detail.name) return detail.name;
  const other = detail.participants.find((p) => p.user_id !== me);
  return other ? other.full_name : 'Chat';
}

function bubble({ mine, text, at, status, seq, pendingId, sender, error }) {
  const li = el('li', { class: `vc-bubble ${mine ? 'vc-mine' : 'vc-theirs'}` });
  if (seq != null) li.dataset.seq = String(seq);
  if (pendingId) li.dataset.pending = pendingId;
  if (status) li.dataset.status = status;
  if (sender) li.append(el('span', { class: 'vc-sender' }, sender));
  li.append(el('span', { class: 'vc-text' }, text));
  const meta = el('span', { class: 'vc-meta' }, shortTime(at));
  if (status) meta.append(el('span', { class: `vc-status vc-status-${status}`, title: error ?? status }, statusLabel(status)));
  li.append(meta);
  return li;
}

function statusLabel(status) {
  return { sending: 'Sending…', sent: '✓ Sent', delivered: '✓✓ Delivered', read: '✓✓ Read', failed: 'Not sent' }[status] ?? status;
}

function connectionLabel(state, kind) {
  const via = kind === 'sse' ? 'SSE' : 'WebSocket';
  return { open: `Connected (${via})`, connecting: 'Connecting…', reconnecting: 'Reconnecting…', closed: '', forbidden: 'No access' }[state] ?? '';
}

/** A speech-bubble icon (inline SVG: no icon font or emoji needed). */
function chatIcon() {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('width', '28');
  svg.setAttribute('height', '28');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('focusable', 'false');
  const path = document.createElementNS(ns, 'path');
  path.setAttribute('fill', 'currentColor');
  path.setAttribute('d', 'M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4H4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2zm3 6v2h2V9H7zm4 0v2h2V9h-2zm4 0v2h2V9h-2z');
  svg.append(path);
  return svg;
}

function presenceDot(online) {
  return el('span', { class: `vc-dot ${online ? 'vc-online' : 'vc-offline'}`, 'aria-hidden': 'true' });
}

function shortTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  const today = new Date();
  return d.toDateString() === today.toDateString()
    ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : d.toLocaleDateString([], { month: 'short', day: 'numeric' });
}

function firstName(full) {
  return (full ?? '').split(' ')[0];
}

function labelled(text, input) {
  const label = el('label', { class: 'vc-field' });
  label.append(el('span', {}, text), input);
  return label;
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}


// Auto-mount from <script type="module" src=".../chatbox.js" data-vibe-chat>.
const script = document.querySelector('script[data-vibe-chat]');
if (script) {
  mountChatBox({ edge: script.dataset.edge ?? '', open: script.dataset.open === 'true' });
}
