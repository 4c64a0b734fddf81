// The Vibe Chat ChatBox: a floating launcher with an unread badge, and a
// panel with the conversations, people, a chat, a new group and a group's
// settings.
//
// Embed it on any page of the platform, either with its own login:
//
//   <script type="module" src="https://chat.vibe.fit/chatbox.js"
//           data-vibe-chat data-edge="https://chat.vibe.fit"></script>
//
// or with the session the host page already has (no second login):
//
//   import { mountChatBox } from 'https://chat.vibe.fit/chatbox.js';
//   mountChatBox({ edge: 'https://chat.vibe.fit', token: async () => getChatToken() });
//
// This file is the controller: the session, the connections and which view
// is on screen. State lives in state.js (no DOM, no network); the views in
// chat-view.js and views.js render from it. It talks to the edge only:
// REST (proxied to the origin), the user's own connection (presence, notices
// and group changes), and one Room connection for the open chat.

import { Api, ApiError } from './api.js';
import { UserConnection, RoomConnection, TransportChoice } from './realtime.js';
import { ChatModel, Conversations, Drafts, UploadTray, badgeText, chatMedia, launcherLabel, firstName, messagePreview, precheck } from './state.js';
import { CHANGE_FRAMES } from './lifecycle.js';
import { ChatView } from './chat-view.js';
import { GalleryView, Lightbox } from './media-view.js';
import { ConversationsView, GroupSettingsView, NewGroupView, PeopleView, loginView } from './views.js';
import { ChatNotificationsView, NotificationsView } from './notify-view.js';
import { Push } from './push.js';
import { debug } from './debug.js';
import { backIcon, bellIcon, button, chatIcon, closeIcon, el, galleryIcon, infoIcon } from './dom.js';

const TYPING_SHOW_MS = 5_000;
/** Pages of older history fetched to reach the first unread message on open. */
const DIVIDER_PAGES = 10;
/** Contacts older than this are reloaded when People opens. */
const CONTACTS_STALE_MS = 60_000;
/** A quoted original this close above what is loaded is reached by paging back (100 a page)… */
const REVEAL_BACK_SEQS = 500;
/** …a farther one (a search hit) by filling forward from just before it, up to this many pages of 200. */
const REVEAL_FILL_PAGES = 25;
/** Messages shown above a search hit, for its context. */
const HIT_CONTEXT = 25;
/** Refusals of an edit, a delete or a reaction (their `error` frames name no client_msg_id). */
const CHANGE_REFUSALS = {
  message_not_found: 'That message is no longer there.',
  message_deleted: 'That message was deleted.',
  edit_window_passed: 'Messages can be edited for 24 hours after sending.',
  invalid_emoji: 'That is not one emoji.',
  too_many_reactions: 'This message has as many different reactions as it can take.',
  forbidden: 'You can’t change that message.',
};

/**
 * Mounts the ChatBox into `host` (default: document.body).
 * - `edge`: the chat's origin ("" = this page's).
 * - `token`: the host's access token, or an async function returning a
 *   fresh one; without it the ChatBox shows its own login.
 * - `demo`: offer the dev build's demo accounts on the login.
 * - `serviceWorker`: the push service worker's URL, on the page's origin
 *   (default: push-sw.js next to this file; a host on another origin
 *   serves a copy itself).
 */
export function mountChatBox({ edge = '', host = document.body, open = false, token, demo = false, serviceWorker } = {}) {
  const api = new Api(edge);
  if (token) api.useHost(token);
  const box = new ChatBox({ api, host, open, demo, push: new Push(api, serviceWorker) });
  box.start();
  return box;
}

class ChatBox {
  constructor({ api, host, open, demo, push }) {
    this.api = api;
    this.demo = demo;
    this.push = push;
    this.choice = TransportChoice.fromLocation();
    this.user = null;
    this.view = 'loading';
    this.conversations = new Conversations();
    this.listLoaded = false;
    this.listError = null;
    this.contacts = new Map();
    this.contactsAt = 0;
    this.fetchingUsers = new Set();
    this.online = new Set();
    this.own = null;
    this.chat = null; // { model, view, conn, typing }
    this.transportKind = this.choice.kind;
    this.reloadTimer = null;
    /** attachment id -> a blob URL of the sender's own image, shown until the server's copy is ready. */
    this.localMedia = new Map();
    this.lightbox = null;
    this.build(host, open);
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden) this.chat?.view.checkRead();
    });
    // A notification was clicked: its service worker names the chat.
    navigator.serviceWorker?.addEventListener('message', (e) => {
      if (e.data?.type === 'vibe-chat-open' && this.user) this.openFromNotification(Number(e.data.conversation_id));
    });
    navigator.serviceWorker?.startMessages();
  }

  openFromNotification(id) {
    if (!id) return;
    if (!this.isOpen) this.toggle(true);
    this.openChat(id);
  }

  // ---- skeleton ---------------------------------------------------------

  build(host, open) {
    const css = document.createElement('link');
    css.rel = 'stylesheet';
    css.href = new URL('./chatbox.css', import.meta.url).href;
    document.head.append(css);

    this.root = el('div', { class: 'vc-root' });
    this.launcher = el('button', { class: 'vc-launcher', type: 'button', 'aria-expanded': String(open), 'aria-controls': 'vc-panel' });
    this.launcher.append(chatIcon());
    this.badge = el('span', { class: 'vc-badge', hidden: true });
    this.launcher.append(this.badge);
    this.launcher.addEventListener('click', () => this.toggle());
    this.panel = el('section', { id: 'vc-panel', class: 'vc-panel', role: 'dialog', 'aria-label': 'Vibe Chat' });
    if (!open) this.panel.hidden = true;
    this.panel.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') this.toggle(false);
    });
    // Incoming messages are read out here (the panel's views come and go).
    this.live = el('div', { class: 'vc-sr', 'aria-live': 'polite', 'aria-atomic': 'true' });
    this.root.append(this.panel, this.launcher, this.live);
    host.append(this.root);
    this.updateBadge();
  }

  get isOpen() {
    return !this.panel.hidden;
  }

  /** The reader can see the panel: it is open and the tab is visible. */
  canSee() {
    return this.isOpen && !document.hidden;
  }

  toggle(force) {
    const show = force ?? this.panel.hidden;
    this.panel.hidden = !show;
    this.launcher.setAttribute('aria-expanded', String(show));
    this.updateBadge();
    if (show) {
      if (this.chat && this.view === 'chat') {
        this.chat.view.render('status');
        this.chat.view.focus();
      }
      else this.panel.querySelector('input, textarea, button:not(.vc-close)')?.focus();
      this.chat?.view.checkRead();
    } else {
      this.launcher.focus();
    }
  }

  async start() {
    // The session is refreshed silently; when it ends (revoked, logged out
    // in another tab, refresh refused, the host's token gone) it says so.
    this.api.onSignedOut = () => this.signedOut();
    const session = await this.api.restore();
    if (session) this.signIn(session);
    else this.renderLogin();
  }

  // ---- session ----------------------------------------------------------

  async signIn(session) {
    this.user = session.user;
    this.drafts = new Drafts(window.localStorage, this.user.id);
    let opened = false;
    this.own = new UserConnection({
      api: this.api,
      choice: this.choice,
      onFrame: (f) => this.onUserFrame(f),
      onState: (state, kind) => {
        this.onConnectionState(state, kind);
        // Notices missed while away: the list is fetched again on reconnect.
        if (state === 'open' && opened) this.scheduleListReload();
        if (state === 'open') opened = true;
      },
    });
    this.own.start();
    await Promise.all([this.loadConversations(), this.loadContacts()]);
    // A notification opened this page at `?conversation=<id>`.
    const asked = Number(new URLSearchParams(location.search).get('conversation'));
    const openChat = asked || Number(sessionStorage.getItem('vibe-chat-open'));
    if (asked) this.toggle(true);
    if (openChat && (asked || this.conversations.has(openChat))) this.openChat(openChat);
    else this.show('conversations');
  }

  async signOut() {
    await this.push.forget();
    await this.api.logout();
    this.signedOut();
  }

  signedOut() {
    this.own?.stop();
    this.own = null;
    this.closeChat();
    sessionStorage.removeItem('vibe-chat-open');
    this.user = null;
    this.conversations = new Conversations();
    this.contacts.clear();
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
    // The open chat's own connection is what its reader depends on.
    const shown = this.chat?.conn?.state ?? this.own?.state ?? state;
    if (status) status.textContent = connectionLabel(shown, kind);
  }

  // ---- data -------------------------------------------------------------

  async loadConversations() {
    try {
      const { conversations } = await this.api.conversations();
      this.conversations.reset(conversations);
      this.listError = null;
      debug.state('conversations loaded', { count: conversations.length, unread_total: this.conversations.unreadTotal() });
      // A new direct chat's peer is a new contact: fetch just them.
      if (this.contactsAt) for (const c of conversations) if (c.peer) this.learnUser(c.peer.user_id);
    } catch (e) {
      this.listError = e.message;
      debug.state('conversations failed', { status: e.status });
    }
    this.listLoaded = true;
    this.updateBadge();
    this.refreshView();
  }

  /** Several notices in a burst make one request. */
  scheduleListReload() {
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => this.loadConversations(), 300);
  }

  async loadContacts() {
    try {
      const { users } = await this.api.activeUsers();
      this.contacts = new Map(users.map((u) => [u.id, u]));
      for (const u of users) if (u.is_online) this.online.add(u.id);
      this.contactsAt = Date.now();
      this.refreshView();
    } catch (e) {
      this.flash(e);
    }
  }

  /** Someone not in the contacts appeared (a presence, a new chat): fetch just them. */
  async learnUser(id) {
    if (this.contacts.has(id) || this.fetchingUsers.has(id) || id === this.user?.id) return;
    this.fetchingUsers.add(id);
    try {
      const u = await this.api.user(id);
      if (!this.online.has(id) && u.is_online) this.online.add(id);
      this.contacts.set(id, u);
      this.refreshView();
    } catch {
      // Not shown until the next full load; nothing else depends on it.
    } finally {
      this.fetchingUsers.delete(id);
    }
  }

  nameOf(userId) {
    return this.chat?.model.participants.get(userId)?.full_name ?? this.contacts.get(userId)?.full_name ?? 'Someone';
  }

  onUserFrame(frame) {
    switch (frame.type) {
      case 'presence_snapshot':
        this.online = new Set(frame.online);
        break;
      case 'presence':
        if (frame.is_online) this.online.add(frame.user_id);
        else this.online.delete(frame.user_id);
        if (this.contacts.has(frame.user_id)) {
          Object.assign(this.contacts.get(frame.user_id), { is_online: frame.is_online, last_seen: frame.last_seen });
        } else {
          this.learnUser(frame.user_id);
        }
        break;
      case 'conversation_updated':
        if (!this.conversations.applyUpdate(frame)) {
          this.scheduleListReload();
          return;
        }
        this.updateBadge();
        break;
      case 'conversation_changed':
        this.scheduleListReload();
        if (this.chat?.model.id === frame.conversation_id) this.refreshChat();
        return;
      case 'attachment_updated':
        // Also on the room's connection: applying it twice changes nothing.
        this.applyAttachment(frame.attachment);
        return;
      case 'message_edited':
      case 'message_deleted':
        // The open chat hears it on its own connection; the list's preview
        // of any conversation's last message follows it here.
        if (!this.conversations.noteChange(frame)) return;
        break;
      case 'conversation_removed':
        this.conversations.remove(frame.conversation_id);
        this.updateBadge();
        if (this.chat?.model.id === frame.conversation_id) this.removedFromChat();
        break;
      default:
        return;
    }
    this.refreshView();
  }

  updateBadge() {
    const unread = this.conversations.unreadTotal();
    if (debug.enabled) this.logUnread(unread);
    this.badge.hidden = unread === 0;
    this.badge.textContent = badgeText(unread);
    this.launcher.setAttribute('aria-label', launcherLabel(this.isOpen, unread));
  }

  /** `?debug=1`: each conversation whose unread count changed, and the total. */
  logUnread(total) {
    const now = new Map(this.conversations.sorted().map((c) => [c.id, c.unread_count ?? 0]));
    const before = this.unreadLogged ?? new Map();
    for (const [id, unread] of now) {
      const was = before.get(id) ?? 0;
      if (unread !== was) debug.state('unread', { conversation_id: id, unread, was });
    }
    for (const [id, was] of before) if (!now.has(id) && was) debug.state('unread', { conversation_id: id, unread: 0, was });
    if (total !== this.unreadTotalLogged) debug.state('unread total', { unread: total, was: this.unreadTotalLogged ?? 0 });
    this.unreadLogged = now;
    this.unreadTotalLogged = total;
  }

  // ---- views ------------------------------------------------------------

  show(view) {
    if (view !== 'chat' && view !== 'group') this.closeChat();
    this.current?.search?.destroy();
    this.view = view;
    if (view === 'conversations') {
      this.current = new ConversationsView({
        onOpen: (id) => this.openChat(id),
        onNewGroup: () => this.show('new-group'),
        onNotifications: () => this.show('notifications'),
        onRetry: () => this.loadConversations(),
        search: {
          run: (q, options) => this.api.search(q, options),
          // The query outlives the view: back from a hit, the results are there.
          query: this.searchQuery ?? '',
          onQuery: (q) => (this.searchQuery = q),
          onHit: (hit) => this.openChat(hit.conversation_id, { focus: hit.seq }),
        },
      });
      this.frame('Chats', this.current.element, { tabs: true });
    } else if (view === 'people') {
      if (Date.now() - this.contactsAt > CONTACTS_STALE_MS) this.loadContacts();
      this.current = new PeopleView({ api: this.api, flash: (e) => this.flash(e), onPick: (u) => this.startDirect(u.id) });
      this.frame('People', this.current.element, { tabs: true });
    } else if (view === 'notifications') {
      this.current = new NotificationsView({ api: this.api, push: this.push, userId: this.user.id });
      this.frame('Notifications', this.current.element, { back: ['Back to conversations', () => this.show('conversations')] });
    } else if (view === 'new-group') {
      this.current = new NewGroupView({ api: this.api, flash: (e) => this.flash(e), onCreate: (name, ids) => this.createGroup(name, ids) });
      this.frame('New group', this.current.element, { back: ['Back to conversations', () => this.show('conversations')] });
      this.current.name.focus();
    }
    this.refreshView();
  }

  /** Brings the view on screen in line with the state. */
  refreshView() {
    const state = { contacts: [...this.contacts.values()], isOnline: (id) => this.online.has(id) };
    switch (this.view) {
      case 'conversations':
        this.current.update({ conversations: this.conversations.sorted(), isOnline: state.isOnline, me: this.user?.id, failed: this.listError, loaded: this.listLoaded });
        break;
      case 'people':
      case 'new-group':
      case 'group':
        this.current?.update(state);
        break;
      case 'chat':
        this.chat?.view.renderHeader();
        break;
      default:
        break;
    }
  }

  frame(title, body, { back = null, tabs = false, extra = [] } = {}) {
    this.lightbox?.hide();
    this.closeGallery();
    this.panel.replaceChildren();
    const header = el('header', { class: 'vc-header' });
    if (back) {
      const b = button(null, { class: 'vc-icon', 'aria-label': back[0] }, back[1]);
      b.append(backIcon());
      header.append(b);
    }
    header.append(el('h2', { class: 'vc-title' }, title));
    header.append(...extra);
    if (this.user && tabs && !this.api.host) header.append(button('Log out', { class: 'vc-link vc-logout' }, () => this.signOut()));
    // On a phone the panel covers the launcher, so it closes from here too.
    const close = button(null, { class: 'vc-icon vc-close', 'aria-label': 'Minimise chat' }, () => this.toggle(false));
    close.append(closeIcon());
    header.append(close);
    this.panel.append(header);
    if (this.user && tabs) {
      const nav = el('div', { class: 'vc-tabs', role: 'tablist', 'aria-label': 'Chat views' });
      for (const [id, label] of [
        ['conversations', 'Chats'],
        ['people', 'People'],
      ]) {
        const selected = this.view === id;
        nav.append(button(label, { role: 'tab', 'aria-selected': String(selected), class: 'vc-tab', tabindex: selected ? '0' : '-1' }, () => this.show(id)));
      }
      nav.addEventListener('keydown', (e) => {
        if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
        this.show(this.view === 'conversations' ? 'people' : 'conversations');
        this.panel.querySelector('.vc-tab[aria-selected="true"]')?.focus();
      });
      this.panel.append(nav);
    }
    const main = el('div', { class: 'vc-body', role: tabs ? 'tabpanel' : null, 'aria-label': tabs ? title : null });
    main.append(body);
    this.panel.append(main);
    const footer = el('footer', { class: 'vc-footer' });
    footer.append(el('span', { class: 'vc-conn', role: 'status' }, this.own ? connectionLabel(this.own.state, this.transportKind) : ''));
    this.panel.append(footer);
  }

  async renderLogin(error) {
    this.view = 'login';
    if (this.api.host) {
      const box = el('div', { class: 'vc-login' });
      box.append(el('p', { class: 'vc-error', role: 'alert' }, 'Your chat session has ended.'), button('Try again', { class: 'vc-primary' }, () => this.start()));
      this.frame('Vibe Chat', box);
      return;
    }
    const demo = this.demo ? await this.api.demo() : null;
    if (this.view !== 'login') return;
    this.frame('Vibe Chat', loginView({ demo, error, onSubmit: async (email, password) => this.signIn(await this.api.login(email, password)) }));
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

  async createGroup(name, ids) {
    const conv = await this.api.createGroup(name, ids);
    await this.loadConversations();
    this.openChat(conv.id);
  }

  // ---- chat -------------------------------------------------------------

  /** Opens a chat; `focus`: a message's seq to show (a search hit) instead of the latest. */
  openChat(id, { focus = null } = {}) {
    this.closeChat();
    this.view = 'chat';
    sessionStorage.setItem('vibe-chat-open', String(id));
    const model = new ChatModel({ id, me: this.user.id });
    // `changes`: edits, deletes and reactions sent and not yet acknowledged (client_msg_id -> entry).
    const chat = { model, conn: null, typing: new Map(), tray: new UploadTray(), uploads: new Map(), changes: new Map(), focus };
    chat.media = {
      url: (path) => this.api.mediaUrl(path),
      localUrl: (attachmentId) => this.localMedia.get(attachmentId) ?? null,
      resign: (a) => this.resign(chat, a),
      open: (a, from) => this.openMedia(chat, a, from),
    };
    chat.view = new ChatView({
      model,
      tray: chat.tray,
      media: chat.media,
      previewOf: (key) => chat.uploads.get(key)?.preview ?? null,
      draft: this.drafts.get(id),
      nameOf: (u) => this.nameOf(u),
      isOnline: (u) => this.online.has(u),
      canSee: () => this.canSee() && this.view === 'chat',
      actions: {
        send: (text, extra) => this.send(chat, text, extra),
        retrySend: (clientId) => this.retrySend(chat, clientId),
        loadOlder: () => this.loadOlder(chat),
        retryLoad: () => this.loadChat(chat),
        retryGap: () => this.catchUp(chat, chat.gapFrom),
        typing: () => chat.conn?.typing(),
        read: (seq) => this.markRead(chat, seq),
        back: () => this.show('conversations'),
        draft: (text) => this.drafts.set(id, text),
        attach: (files) => this.attach(chat, files),
        cancelUpload: (key) => this.removeUpload(chat, key),
        removeUpload: (key) => this.removeUpload(chat, key),
        retryUpload: (key) => this.retryUpload(chat, key),
        sendVoice: (recording) => this.sendVoice(chat, recording),
        error: (message) => this.flash({ message }),
        edit: (m, text) => this.queueChange(chat, { type: 'edit', message_id: m.id, content: text }),
        remove: (m) => this.queueChange(chat, { type: 'delete', message_id: m.id }),
        react: (m, emoji, on) => this.queueChange(chat, { type: 'react', message_id: m.id, emoji, on }),
        copy: (m) => this.copy(m),
        openQuote: (reply) => this.reveal(chat, reply.seq),
      },
    });
    this.chat = chat;
    this.showChat();
    this.loadChat(chat);
  }

  /** Puts the open chat's view in the panel (again, coming back from its settings). */
  showChat() {
    const chat = this.chat;
    this.view = 'chat';
    const extra = [];
    if (chat.model.status === 'ready') {
      const media = button(null, { class: 'vc-icon', 'aria-label': 'Photos, videos and files' }, () => this.showGallery());
      media.append(galleryIcon());
      extra.push(media);
    }
    if (chat.model.status === 'ready') {
      const bell = button(null, { class: 'vc-icon', 'aria-label': 'Notification settings' }, () => this.showChatNotifications());
      bell.append(bellIcon());
      extra.push(bell);
    }
    if (chat.model.isGroup && chat.model.status === 'ready') {
      const info = button(null, { class: 'vc-icon', 'aria-label': 'Group settings' }, () => this.showGroup());
      info.append(infoIcon());
      extra.push(info);
    }
    this.frame(chat.model.title(this.conversations.get(chat.model.id)?.title ?? 'Chat'), chat.view.element, {
      back: ['Back to conversations', () => this.show('conversations')],
      extra,
    });
    chat.view.render('status');
    chat.view.focus();
  }

  async loadChat(chat) {
    chat.model.status = 'loading';
    chat.view.render();
    const summary = this.conversations.get(chat.model.id);
    try {
      const detail = await this.api.conversation(chat.model.id);
      if (this.chat !== chat) return;
      chat.model.load(detail, { readSeq: summary?.read_seq ?? 0 });
      // With many unread, the first of them may be older than the latest
      // page: fetch back to it, so the divider is where the reader left.
      for (let i = 0; i < DIVIDER_PAGES && chat.model.needsOlderForDivider(); i++) {
        chat.model.addOlder(await this.api.messagesBefore(chat.model.id, chat.model.oldest, 100));
        if (this.chat !== chat) return;
      }
    } catch (e) {
      if (this.chat !== chat) return;
      if (e.status === 403 || e.status === 404) {
        this.conversations.remove(chat.model.id);
        this.updateBadge();
      }
      chat.model.status = 'failed';
      chat.model.error = e.status === 403 ? 'you are not a member of this conversation' : e.message;
      this.showChat();
      return;
    }
    this.showChat();
    chat.conn?.stop();
    chat.conn = new RoomConnection({
      api: this.api,
      choice: this.choice,
      conversationId: chat.model.id,
      // Messages and changes alike: a reaction after the last message is held too.
      lastSeq: () => chat.model.seqs.top,
      onFrame: (f) => this.onRoomFrame(chat, f),
      onState: (state, kind) => {
        this.onConnectionState(state, kind);
        if (this.chat !== chat) return;
        if (state === 'open') {
          this.flushPending(chat);
          this.flushChanges(chat);
        }
        if (state === 'forbidden') this.removedFromChat();
      },
    });
    chat.conn.start();
    if (chat.focus) {
      const seq = chat.focus;
      chat.focus = null;
      this.reveal(chat, seq);
    }
  }

  /** The group's name or members changed: the chat and its settings follow. */
  async refreshChat() {
    const chat = this.chat;
    try {
      const detail = await this.api.conversation(chat.model.id);
      if (this.chat !== chat) return;
      chat.model.refresh(detail);
      if (!chat.model.participants.has(this.user.id)) {
        this.removedFromChat();
        return;
      }
    } catch (e) {
      if (this.chat === chat && (e.status === 403 || e.status === 404)) this.removedFromChat();
      return;
    }
    if (this.view === 'chat') {
      const title = this.panel.querySelector('.vc-title');
      if (title) title.textContent = chat.model.title();
      chat.view.render();
    } else if (this.view === 'group') {
      // Patched, not rebuilt: the creator may be typing in it.
      const title = this.panel.querySelector('.vc-title');
      if (title) title.textContent = `${chat.model.title()} · Settings`;
      this.current.refreshed();
      this.refreshView();
    }
  }

  /** The reader was removed from (or left) the open group. */
  removedFromChat() {
    const chat = this.chat;
    if (!chat || chat.model.status === 'removed') return;
    chat.conn?.stop();
    chat.conn = null;
    chat.model.removed();
    this.conversations.remove(chat.model.id);
    this.updateBadge();
    sessionStorage.removeItem('vibe-chat-open');
    this.showChat();
  }

  closeChat() {
    if (!this.chat) return;
    this.chat.conn?.stop();
    this.chat.view.destroy();
    // Uploads for a message that will not be sent from here stop; the
    // server deletes what was never attached after a day.
    for (const u of this.chat.uploads.values()) {
      u.handle?.abort();
      if (u.preview) URL.revokeObjectURL(u.preview);
    }
    for (const url of this.localMedia.values()) URL.revokeObjectURL(url);
    this.localMedia.clear();
    this.closeGallery();
    for (const t of this.chat.typing.values()) clearTimeout(t);
    this.chat = null;
    sessionStorage.removeItem('vibe-chat-open');
  }

  onRoomFrame(chat, frame) {
    if (this.chat !== chat) return;
    const model = chat.model;
    // Messages and changes share the room's one order. A frame made from
    // an HTTP answer (`local`) may overtake the stream, which brings it
    // again in order: it does not move the resume point.
    const seq = frame.type === 'message' ? frame.message?.seq : CHANGE_FRAMES.has(frame.type) ? frame.seq : null;
    if (seq != null && !frame.local) {
      const verdict = model.seqs.note(seq);
      if (verdict === 'dup') return;
      if (verdict === 'gap') {
        // Something before it never arrived: resume from what is held (the
        // room replays it, this frame included). A catch-up under way brings
        // it anyway.
        if (!chat.catchingUp) this.resume(chat);
        return;
      }
    }
    switch (frame.type) {
      case 'message_edited':
      case 'message_deleted':
      case 'reaction':
        this.applyChange(chat, frame);
        break;
      case 'message': {
        const m = frame.message;
        if (!model.addMessage(m)) return;
        this.conversations.noteMessage(model.id, m);
        const mine = m.sender_id === this.user.id;
        if (!mine) this.stopTyping(chat, m.sender_id);
        chat.view.render(mine ? 'status' : 'incoming');
        if (!mine) {
          chat.view.noteIncoming(1);
          if (this.canSee()) this.announce(`${firstName(this.nameOf(m.sender_id))}: ${messagePreview(m)}`);
        }
        if (this.view === 'conversations') this.refreshView();
        break;
      }
      case 'ack':
        // An edit, delete or reaction of ours is durable (or changed nothing).
        if (chat.changes.delete(frame.client_msg_id)) break;
        if (model.ack(frame)) chat.view.render('status');
        break;
      case 'typing': {
        if (frame.user_id === this.user.id) return;
        clearTimeout(chat.typing.get(frame.user_id));
        chat.typing.set(frame.user_id, setTimeout(() => this.stopTyping(chat, frame.user_id), TYPING_SHOW_MS));
        chat.view.renderTyping([...chat.typing.keys()]);
        break;
      }
      case 'receipt':
        if (model.receipt(frame)) chat.view.render('status');
        break;
      case 'resync':
        this.catchUp(chat, frame.from_seq - 1);
        break;
      case 'attachment_updated':
        this.applyAttachment(frame.attachment);
        break;
      case 'error':
        if (this.changeRefused(chat, frame)) break;
        if (frame.code === 'not_member' || frame.code === 'forbidden') this.removedFromChat();
        else if (frame.code !== 'rate_limited') this.flash(new ApiError(0, frame.code, frame.message));
        break;
      default:
        break;
    }
  }

  stopTyping(chat, userId) {
    const t = chat.typing.get(userId);
    if (t === undefined) return;
    clearTimeout(t);
    chat.typing.delete(userId);
    chat.view.renderTyping([...chat.typing.keys()]);
  }

  /**
   * After `resync`: pages forward through REST, from the oldest message
   * held (changes in the gap may have edited or deleted what is shown:
   * history has every message as it is now) past `after`; a failure is
   * shown with a retry.
   */
  async catchUp(chat, after) {
    const oldest = chat.model.oldest;
    let cursor = oldest != null && oldest <= after ? oldest - 1 : after;
    chat.gapFrom = cursor;
    chat.catchingUp = true;
    try {
      for (;;) {
        const page = await this.api.messagesAfter(chat.model.id, cursor);
        if (this.chat !== chat) return;
        for (const m of page.messages) chat.model.upsert(m);
        if (!page.messages.length || !page.has_more) break;
        cursor = page.messages[page.messages.length - 1].seq;
        chat.gapFrom = cursor;
      }
    } catch {
      if (this.chat !== chat) return;
      chat.model.gap = true;
      chat.view.render('status');
      return;
    } finally {
      chat.catchingUp = false;
    }
    chat.model.gap = false;
    // History is the messages' current state: the room resumes after it.
    chat.model.seqs.raise(chat.model.maxSeq());
    chat.view.render('incoming');
    // Reconnect from the new high-water mark.
    chat.conn?.stop();
    chat.conn?.start();
  }

  /** Sends the text with every uploaded file in the tray. */
  /** `extra`: `replyTo` (the quote of the message answered) and `mentions` (user ids). */
  send(chat, content, extra = {}) {
    const attachments = chat.tray.takeReady();
    for (const key of [...chat.uploads.keys()]) if (!chat.tray.get(key)) chat.uploads.delete(key);
    chat.view.renderTray();
    this.queueSend(chat, content, attachments, extra);
  }

  queueSend(chat, content, attachments = [], { replyTo = null, mentions = [] } = {}) {
    const id = crypto.randomUUID();
    chat.model.queue(id, content, undefined, attachments, { replyTo, mentions });
    chat.view.render('sent');
    this.trySend(chat, id);
  }

  // ---- attachments --------------------------------------------------------

  /** Files chosen, dropped or pasted: each goes to the tray and starts uploading. */
  attach(chat, files) {
    for (const file of files) {
      const error = precheck(file);
      const key = chat.tray.add({ name: file.name, type: file.type, size: file.size, error });
      if (!key) {
        this.flash({ message: 'A message can carry at most 10 files: send these first.' });
        break;
      }
      const preview = !error && file.type.startsWith('image/') ? URL.createObjectURL(file) : null;
      chat.uploads.set(key, { file, preview, handle: null });
      if (!error) this.startUpload(chat, key);
    }
    chat.view.renderTray();
  }

  async startUpload(chat, key) {
    const entry = chat.uploads.get(key);
    const item = chat.tray.get(key);
    if (!entry || !item) return;
    // A video's size, read by the browser before the upload, lets every
    // member hold its box from the first frame (the server reads it from
    // the container only while processing).
    if (entry.videoSize === undefined && entry.file.type.startsWith('video/')) {
      entry.videoSize = await videoSize(entry.file);
      if (chat.uploads.get(key) !== entry) return; // removed meanwhile
    }
    const handle = this.api.upload(chat.model.id, entry.file, {
      name: entry.file.name,
      durationMs: item.durationMs ?? undefined,
      size: entry.videoSize ?? undefined,
      onProgress: (loaded, total) => {
        if (chat.tray.progress(key, loaded, total)) chat.view.renderTray();
      },
    });
    entry.handle = handle;
    let attachment;
    try {
      attachment = await handle.done;
    } catch (e) {
      if (e.code === 'aborted') return;
      if (chat.tray.fail(key, e.message)) chat.view.renderTray();
      return;
    }
    // The server measures a voice message's length while processing it; its
    // sender knows it already.
    if (item.durationMs && attachment.duration_ms == null) attachment = { ...attachment, duration_ms: Math.round(item.durationMs) };
    if (!chat.tray.done(key, attachment)) return; // cancelled meanwhile
    // Until the server has re-encoded the photo, its sender sees their own copy.
    if (entry.preview && attachment.kind === 'image') this.localMedia.set(attachment.id, entry.preview);
    if (item.auto) {
      // A voice message is a message of its own, sent once uploaded.
      chat.tray.remove(key);
      chat.uploads.delete(key);
      this.queueSend(chat, '', [attachment]);
    }
    chat.view.renderTray();
  }

  retryUpload(chat, key) {
    if (!chat.tray.retry(key)) return;
    chat.view.renderTray();
    this.startUpload(chat, key);
  }

  /** Cancels an upload (aborts it) or takes a file out of the tray. */
  removeUpload(chat, key) {
    const entry = chat.uploads.get(key);
    entry?.handle?.abort();
    chat.uploads.delete(key);
    chat.tray.remove(key);
    if (entry?.preview && ![...this.localMedia.values()].includes(entry.preview)) URL.revokeObjectURL(entry.preview);
    chat.view.renderTray();
    chat.view.input.focus();
  }

  /** A finished recording: uploaded with its measured length, then sent on its own. */
  sendVoice(chat, { blob, type, durationMs }) {
    const ext = type.includes('mp4') ? 'm4a' : 'webm';
    const file = new File([blob], `voice-message.${ext}`, { type });
    const key = chat.tray.add({ name: file.name, type, size: file.size, durationMs, auto: true });
    if (!key) {
      this.flash({ message: 'Send or remove the files waiting first.' });
      return;
    }
    chat.uploads.set(key, { file, preview: null, handle: null });
    chat.view.renderTray();
    this.startUpload(chat, key);
  }

  /** An attachment changed (processing done, failed, or fresh links): every view showing it follows. */
  applyAttachment(a) {
    const chat = this.chat;
    if (!a || !chat || chat.model.id !== a.conversation_id) return;
    if (chat.model.updateAttachment(a).length) chat.view.render('status');
    this.lightbox?.updateAttachment(a);
    this.gallery?.updateAttachment(a);
  }

  /** Fresh signed links for an attachment whose link failed (expired). */
  async resign(chat, a) {
    try {
      const fresh = await this.api.attachment(a.conversation_id ?? chat.model.id, a.id);
      if (this.chat === chat) this.applyAttachment(fresh);
      return fresh;
    } catch {
      return null;
    }
  }

  /** A photo or video full size, with the chat's others a step away. */
  openMedia(chat, a, from) {
    let items = chatMedia(chat.model);
    let index = items.findIndex((x) => x.id === a.id);
    if (index < 0) {
      items = [a]; // a send not yet stored
      index = 0;
    }
    this.lightbox?.hide();
    this.lightbox = new Lightbox({ items, index, media: chat.media, onClose: () => (this.lightbox = null) });
    this.lightbox.show(this.panel, from);
  }

  showGallery() {
    const chat = this.chat;
    if (!chat) return;
    this.view = 'gallery';
    const gallery = new GalleryView({ api: this.api, conversationId: chat.model.id, media: chat.media });
    this.current = gallery;
    this.frame(`${chat.model.title()} · Media`, gallery.element, { back: ['Back to the chat', () => this.showChat()] });
    this.gallery = gallery;
    this.panel.querySelector('.vc-gallery .vc-tab[aria-selected="true"]')?.focus();
  }

  closeGallery() {
    this.gallery?.destroy();
    this.gallery = null;
  }

  retrySend(chat, id) {
    chat.model.retry(id);
    chat.view.render('status');
    this.trySend(chat, id);
  }

  async trySend(chat, id) {
    const p = chat.model.pending.get(id);
    if (!p || !chat.conn || p.state === 'acked') return;
    try {
      const extra = { reply_to: p.replyTo?.id ?? null, mentions: p.mentions ?? [] };
      await chat.conn.sendMessage(p.content, id, (p.attachments ?? []).map((a) => a.id), extra); // false: goes out on reconnect
    } catch (e) {
      if (e.status === 403) {
        this.removedFromChat();
        return;
      }
      chat.model.fail(id, e.message);
      chat.view.render('status');
    }
  }

  /** Resends everything not yet acknowledged, with the same client_msg_id. */
  flushPending(chat) {
    for (const [id, p] of chat.model.pending) if (p.state === 'sending') this.trySend(chat, id);
  }

  // ---- edits, deletes, reactions ------------------------------------------------

  /**
   * An edit, delete or reaction of the reader's: sent like a message, with
   * a fresh client_msg_id kept until its ack, so a reconnect sends it again
   * under the same key (the room applies it once). The message changes
   * when the room's event comes back, to everyone at once.
   */
  queueChange(chat, frame) {
    const id = crypto.randomUUID();
    chat.changes.set(id, { frame: { ...frame, conversation_id: chat.model.id, client_msg_id: id }, sent: false, busy: false });
    this.trySendChange(chat, id);
  }

  async trySendChange(chat, id) {
    const entry = chat.changes.get(id);
    if (!entry || entry.busy || !chat.conn) return;
    entry.busy = true;
    try {
      entry.sent = await chat.conn.sendChange(entry.frame); // false: goes out on reconnect
    } catch (e) {
      chat.changes.delete(id);
      if (this.chat === chat) this.flash({ message: CHANGE_REFUSALS[e.code] ?? e.message });
    } finally {
      entry.busy = false;
    }
  }

  flushChanges(chat) {
    for (const id of chat.changes.keys()) this.trySendChange(chat, id);
  }

  /**
   * An `error` that refuses a change of ours: frames on one connection are
   * answered in order, so it is the oldest change sent. False: not one.
   */
  changeRefused(chat, frame) {
    const why = CHANGE_REFUSALS[frame.code];
    if (!why) return false;
    const sent = [...chat.changes].find(([, c]) => c.sent);
    if (!sent) {
      // A reply to a message deleted meanwhile is refused the same way.
      if (frame.code === 'message_not_found') {
        const reply = [...chat.model.pending].find(([, p]) => p.state === 'sending' && p.replyTo);
        if (reply) {
          chat.model.fail(reply[0], 'The message you replied to is no longer there.');
          chat.view.render('status');
          return true;
        }
      }
      return false;
    }
    chat.changes.delete(sent[0]);
    this.flash({ message: why });
    return true;
  }

  /** A change frame from the room: the message, its quotes and the list's preview follow. */
  applyChange(chat, frame) {
    const model = chat.model;
    if (model.applyChange(frame).length) chat.view.render('status');
    if (frame.type !== 'reaction' && this.conversations.noteChange(frame) && this.view === 'conversations') this.refreshView();
    if (frame.type === 'message_deleted') {
      // Nothing left to edit or answer.
      if (chat.view.editing?.id === frame.message_id) {
        chat.view.endEdit();
        this.flash({ message: 'The message you were editing was deleted.' });
      }
      if (chat.view.replyTo?.id === frame.message_id) chat.view.cancelReply(false);
    }
  }

  /** Reconnects the room from the highest seq held (the room replays what follows). */
  resume(chat) {
    chat.conn?.stop();
    chat.conn?.start();
  }

  /**
   * Shows a message (a quote's original, a search hit): loads the history
   * between it and what is on screen if needed, then scrolls to it and
   * highlights it. Near ones are paged back to (`before_seq`); far ones
   * are filled forward from a little before them (`after_seq`), so the
   * list never has a hole.
   */
  async reveal(chat, seq) {
    const model = chat.model;
    if (!model.messages.has(seq) && model.hasMore && model.oldest != null && seq < model.oldest) {
      try {
        if (model.oldest - seq <= REVEAL_BACK_SEQS) {
          while (model.hasMore && model.oldest > seq) {
            model.addOlder(await this.api.messagesBefore(model.id, model.oldest, 100));
            if (this.chat !== chat) return;
          }
        } else {
          const stop = model.oldest;
          const from = Math.max(0, seq - HIT_CONTEXT);
          if (stop - from > REVEAL_FILL_PAGES * 200) {
            this.flash({ message: 'That message is too far back in this chat to show here.' });
            return;
          }
          let cursor = from;
          for (;;) {
            const page = await this.api.messagesAfter(model.id, cursor, 200);
            if (this.chat !== chat) return;
            model.addRange(page, from);
            const last = page.messages[page.messages.length - 1]?.seq;
            if (!page.has_more || last == null || last >= stop) break;
            cursor = last;
          }
        }
      } catch (e) {
        if (this.chat === chat) this.flash(e);
        return;
      }
      chat.view.render('status');
    }
    if (!chat.view.highlight(seq)) this.flash({ message: 'That message is no longer in this chat.' });
  }

  async copy(m) {
    try {
      await navigator.clipboard.writeText(m.content);
      this.toast('Copied');
    } catch {
      this.flash({ message: 'The text could not be copied: the browser did not allow it.' });
    }
  }

  /** The reader saw everything up to `seq`. */
  markRead(chat, seq) {
    if (!chat.conn || seq <= chat.model.readSent) return;
    const seen = chat.model.countFromOthers(chat.model.readSent, seq);
    chat.model.readSent = seq;
    chat.conn.read(seq);
    if (this.conversations.markRead(chat.model.id, seq, seen)) this.updateBadge();
  }

  async loadOlder(chat) {
    const model = chat.model;
    if (!model.hasMore || chat.loadingOlder || model.oldest == null) return;
    chat.loadingOlder = true;
    try {
      const page = await this.api.messagesBefore(model.id, model.oldest);
      if (this.chat !== chat) return;
      model.addOlder(page);
      chat.view.render('older');
    } catch (e) {
      this.flash(e);
    } finally {
      chat.loadingOlder = false;
    }
  }

  /** One conversation's notification level and mute. */
  showChatNotifications() {
    const chat = this.chat;
    if (!chat) return;
    this.view = 'chat-notifications';
    this.current = new ChatNotificationsView({ api: this.api, conversationId: chat.model.id });
    this.frame(`${chat.model.title()} · Notifications`, this.current.element, { back: ['Back to the chat', () => this.showChat()] });
  }

  // ---- groups -------------------------------------------------------------

  showGroup() {
    const chat = this.chat;
    if (!chat) return;
    this.view = 'group';
    const model = chat.model;
    this.current = new GroupSettingsView({
      api: this.api,
      flash: (e) => this.flash(e),
      model,
      me: this.user.id,
      actions: {
        rename: async (name) => {
          const view = await this.api.renameGroup(model.id, name);
          model.refresh(view);
          const c = this.conversations.get(model.id);
          if (c) Object.assign(c, { name: view.name, title: view.name });
          this.showGroup();
          this.announce(`Group renamed to ${view.name}`);
        },
        add: async (userId) => {
          model.refresh(await this.api.addMembers(model.id, [userId]));
          this.refreshView();
        },
        remove: async (userId) => {
          model.refresh(await this.api.removeMembers(model.id, [userId]));
          this.refreshView();
        },
        leave: async () => {
          await this.api.removeMembers(model.id, [this.user.id]);
          this.conversations.remove(model.id);
          this.drafts.clear(model.id);
          this.updateBadge();
          this.show('conversations');
          this.announce(`You left ${model.name}`);
        },
      },
    });
    this.frame(`${model.title()} · Settings`, this.current.element, { back: ['Back to the chat', () => this.showChat()] });
    this.refreshView();
    this.panel.querySelector('.vc-body input, .vc-body button')?.focus();
  }

  // ---- feedback -----------------------------------------------------------

  announce(text) {
    this.live.textContent = '';
    // A change after a tick is what screen readers pick up.
    setTimeout(() => (this.live.textContent = text), 50);
  }

  /** A short confirmation (not an error), read out too. */
  toast(text) {
    const note = el('p', { class: 'vc-toast', role: 'status' }, text);
    this.panel.prepend(note);
    setTimeout(() => note.remove(), 2_000);
  }

  flash(error) {
    const note = el('p', { class: 'vc-flash', role: 'alert' }, error.message || String(error));
    this.panel.prepend(note);
    setTimeout(() => note.remove(), 5_000);
  }
}

function connectionLabel(state, kind) {
  const via = kind === 'sse' ? 'SSE' : 'WebSocket';
  return { open: `Connected (${via})`, connecting: 'Connecting…', reconnecting: 'Reconnecting…', closed: '', forbidden: 'No access' }[state] ?? '';
}

// Auto-mount from <script type="module" src=".../chatbox.js" data-vibe-chat>.
const script = document.querySelector('script[data-vibe-chat]');
if (script) {
  mountChatBox({ edge: script.dataset.edge ?? '', open: script.dataset.open === 'true', demo: script.dataset.demo === 'true' });
}

/** A video file's width and height from its own header, or null. */
async function videoSize(file) {
  const url = URL.createObjectURL(file);
  const video = document.createElement('video');
  try {
    video.preload = 'metadata';
    video.muted = true;
    await new Promise((resolve, reject) => {
      video.onloadedmetadata = resolve;
      video.onerror = reject;
      setTimeout(reject, 3000);
      video.src = url;
    });
    const { videoWidth: width, videoHeight: height } = video;
    return width > 0 && height > 0 ? { width, height } : null;
  } catch {
    return null;
  } finally {
    video.removeAttribute('src');
    URL.revokeObjectURL(url);
  }
}
