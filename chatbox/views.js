// The ChatBox's views other than the chat: login, conversations, people,
// a new group, and a group's settings. Each builds its DOM once and offers
// an update that patches it, so a presence change or a new message does not
// rebuild a list (or take the focus from the search box).

import { badgeText, firstName, listTime, messagePreview } from './state.js';
import { avatar, button, el, hidden, labelled, presenceDot, reconcile } from './dom.js';
import { SearchView } from './search-view.js';

const SEARCH_DEBOUNCE_MS = 250;

// ---- login ------------------------------------------------------------------

/** The sign-in form; `demo` (dev builds only) lists accounts to try. */
export function loginView({ onSubmit, demo, error }) {
  const form = el('form', { class: 'vc-login', novalidate: true });
  const email = el('input', { name: 'email', type: 'email', autocomplete: 'username', required: true });
  const password = el('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const err = el('p', { class: 'vc-error', role: 'alert' }, error ?? '');
  const submit = el('button', { type: 'submit', class: 'vc-primary' }, 'Log in');
  form.append(el('p', { class: 'vc-hint' }, 'Sign in to chat with your trainer and your group.'), labelled('Email', email), labelled('Password', password), err, submit);
  if (demo?.accounts?.length) {
    const demos = el('div', { class: 'vc-demos' });
    demos.append(el('span', {}, 'Demo accounts (one click logs in): '));
    for (const account of demo.accounts) {
      demos.append(
        button(account, { class: 'vc-link' }, () => {
          email.value = account;
          password.value = demo.password;
          form.requestSubmit();
        }),
      );
    }
    form.append(demos);
  }
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    submit.disabled = true;
    err.textContent = '';
    try {
      await onSubmit(email.value.trim(), password.value);
    } catch (ex) {
      err.textContent = ex.code === 'bad_credentials' ? 'Wrong email or password.' : ex.message;
      submit.disabled = false;
    }
  });
  return form;
}

// ---- conversations -----------------------------------------------------------

/**
 * The conversations, with message search above them: while the search box
 * has a query, its results take the list's place.
 */
export class ConversationsView {
  constructor({ onOpen, onNewGroup, onRetry, onNotifications, search }) {
    this.onOpen = onOpen;
    this.element = el('div', { class: 'vc-pane' });
    const bar = el('div', { class: 'vc-toolbar' });
    bar.append(button('Notifications', { class: 'vc-secondary' }, onNotifications), button('New group', { class: 'vc-secondary' }, onNewGroup));
    this.status = el('div', { class: 'vc-status-slot' });
    this.list = el('ul', { class: 'vc-list', 'aria-label': 'Conversations' });
    this.element.append(bar);
    if (search) {
      this.search = new SearchView({ ...search, onActive: (active) => (this.list.hidden = active) });
      this.element.append(this.search.element, this.search.results);
      this.list.hidden = this.search.active;
    }
    this.element.append(this.status, this.list);
    this.onRetry = onRetry;
  }

  /** `failed`: the list could not be loaded (an error message), with a retry. */
  update({ conversations, isOnline, me, failed, loaded }) {
    this.status.replaceChildren();
    if (failed) {
      const box = el('div', { class: 'vc-banner vc-banner-error', role: 'alert' });
      box.append(el('p', {}, `Your conversations could not be loaded: ${failed}.`), button('Try again', { class: 'vc-secondary' }, this.onRetry));
      this.status.append(box);
    }
    const items = conversations.map((c) => ({ key: `c:${c.id}`, c, online: c.peer ? isOnline(c.peer.user_id) : null }));
    if (!items.length && loaded && !failed) items.push({ key: 'empty', empty: true });
    reconcile(this.list, items, {
      create: (item) => (item.empty ? el('li', { class: 'vc-empty' }, 'No conversations yet. Start one from People, or make a group.') : this.row(item, me)),
      update: (node, item) => !item.empty && node.dataset.sig === rowSig(item),
    });
  }

  row(item, me) {
    const c = item.c;
    const li = el('li');
    li.dataset.sig = rowSig(item);
    const b = button(null, { class: 'vc-row', 'data-conversation-id': String(c.id) }, () => this.onOpen(c.id));
    const title = el('span', { class: 'vc-row-title' });
    if (c.peer) title.append(presenceDot(item.online), hidden(item.online ? 'Online: ' : ''));
    title.append(document.createTextNode(c.title));
    const last = c.last_message;
    const who = last && c.type === 'group' ? (last.sender_id === me ? 'You: ' : '') : last?.sender_id === me ? 'You: ' : '';
    const preview = el('span', { class: 'vc-row-preview' }, last ? who + messagePreview(last) : c.type === 'group' ? `Group · ${c.participant_count} members` : 'No messages yet');
    const meta = el('span', { class: 'vc-row-meta' }, last ? listTime(new Date(last.created_at)) : '');
    b.append(title, meta, preview);
    const badges = el('span', { class: 'vc-badges' });
    // Someone mentioned the reader in what is unread.
    if (c.unread_mentions > 0) badges.append(el('span', { class: 'vc-at', title: 'You were mentioned' }, '@'), hidden(' mentioned you, '));
    if (c.unread_count > 0) {
      const n = c.unread_count > 999 ? '999+' : String(c.unread_count);
      badges.append(el('span', { class: 'vc-unread' }, n), hidden(' unread'));
    }
    if (badges.firstChild) b.append(badges);
    li.append(b);
    return li;
  }
}

function rowSig({ c, online }) {
  return JSON.stringify([c.title, c.unread_count, c.unread_mentions ?? 0, c.last_message?.seq, c.last_message?.content, c.last_message?.deleted, c.participant_count, online]);
}

// ---- people --------------------------------------------------------------------

/** Contacts with live presence; typing searches the whole directory. */
export class PeopleView {
  constructor({ api, onPick, flash }) {
    this.element = el('div', { class: 'vc-people' });
    this.picker = new UserPicker({
      api,
      flash,
      label: 'Find people by name or email',
      listLabel: 'People',
      empty: 'No contacts yet. Find someone above.',
      action: null,
      onPick,
    });
    this.element.append(this.picker.element);
  }
  update(state) {
    this.picker.update(state);
  }
}

/**
 * A searchable list of people: the contacts when the box is empty, the
 * directory's matches otherwise. Each row is one button; `action` names a
 * visible second part of it ("Add") when picking adds someone.
 */
export class UserPicker {
  constructor({ api, flash, label, listLabel, empty, action, onPick, exclude = () => false }) {
    this.api = api;
    this.flash = flash;
    this.listLabel = listLabel;
    this.emptyText = empty;
    this.action = action;
    this.onPick = onPick;
    this.exclude = exclude;
    this.query = '';
    this.found = null;
    this.timer = null;
    this.state = { contacts: [], isOnline: () => false };
    this.element = el('div', { class: 'vc-picker' });
    this.search = el('input', { type: 'search', class: 'vc-search', placeholder: label, 'aria-label': label, autocomplete: 'off' });
    this.search.addEventListener('input', () => this.typed());
    this.list = el('ul', { class: 'vc-list', 'aria-label': listLabel });
    this.element.append(this.search, this.list);
  }

  typed() {
    this.query = this.search.value;
    clearTimeout(this.timer);
    const q = this.query.trim();
    if (!q) {
      this.found = null;
      this.render();
      return;
    }
    this.timer = setTimeout(async () => {
      try {
        const { users } = await this.api.directory(q);
        if (this.query.trim() !== q) return;
        this.found = users;
        this.render();
      } catch (e) {
        this.flash(e);
      }
    }, SEARCH_DEBOUNCE_MS);
  }

  update(state) {
    this.state = state;
    this.render();
  }

  render() {
    const { contacts, isOnline } = this.state;
    const searching = this.found !== null;
    const people = (searching ? this.found : [...contacts].sort((a, b) => Number(isOnline(b.id)) - Number(isOnline(a.id)) || a.full_name.localeCompare(b.full_name))).filter(
      (u) => !this.exclude(u.id),
    );
    this.list.setAttribute('aria-label', searching ? 'Search results' : this.listLabel);
    const items = people.map((u) => {
      const online = contacts.some((c) => c.id === u.id) ? isOnline(u.id) : u.is_online;
      return { key: `u:${u.id}`, u, online };
    });
    if (!items.length) items.push({ key: `empty:${searching ? this.query : ''}`, empty: true });
    reconcile(this.list, items, {
      create: (item) => (item.empty ? el('li', { class: 'vc-empty' }, searching ? `Nobody found for “${this.query.trim()}”.` : this.emptyText) : this.row(item)),
      update: (node, item) => !item.empty && node.dataset.sig === `${item.online}|${item.u.full_name}`,
    });
  }

  row({ u, online }) {
    const li = el('li');
    li.dataset.sig = `${online}|${u.full_name}`;
    const b = button(null, { class: 'vc-row vc-person', 'data-user-id': String(u.id) }, () => this.onPick(u));
    const title = el('span', { class: 'vc-row-title' });
    title.append(avatar(u.id, u.full_name), presenceDot(online), el('span', { class: 'vc-name' }, u.full_name));
    b.append(title, el('span', { class: 'vc-role' }, u.role));
    b.append(el('span', { class: 'vc-row-preview' }, online ? 'Online' : u.last_seen ? `Last seen ${listTime(new Date(u.last_seen))}` : 'Offline'));
    if (this.action) b.append(el('span', { class: 'vc-row-action' }, this.action));
    li.append(b);
    return li;
  }
}

// ---- a new group -------------------------------------------------------------

export class NewGroupView {
  constructor({ api, flash, onCreate }) {
    this.selected = new Map();
    this.element = el('form', { class: 'vc-form', novalidate: true });
    this.name = el('input', { name: 'name', maxlength: '100', required: true, autocomplete: 'off' });
    this.chips = el('ul', { class: 'vc-chips', 'aria-label': 'Members to add' });
    this.error = el('p', { class: 'vc-error', role: 'alert' });
    this.create = el('button', { type: 'submit', class: 'vc-primary', disabled: true }, 'Create group');
    this.picker = new UserPicker({
      api,
      flash,
      label: 'Add people by name or email',
      listLabel: 'Contacts',
      empty: 'Search for people to add.',
      action: 'Add',
      exclude: (id) => this.selected.has(id),
      onPick: (u) => {
        this.selected.set(u.id, u);
        this.renderChips();
        this.picker.render();
        this.picker.search.focus();
      },
    });
    this.name.addEventListener('input', () => this.validate());
    this.element.append(labelled('Group name', this.name), el('h3', { class: 'vc-section' }, 'Members'), this.chips, this.picker.element, this.error, this.create);
    this.element.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (this.create.disabled) return;
      this.create.disabled = true;
      this.error.textContent = '';
      try {
        await onCreate(this.name.value.trim(), [...this.selected.keys()]);
      } catch (ex) {
        this.error.textContent = ex.message;
        this.validate();
      }
    });
    this.renderChips();
  }

  validate() {
    this.create.disabled = !this.name.value.trim() || this.selected.size === 0;
  }

  renderChips() {
    const chips = [...this.selected.values()].map((u) => {
      const li = el('li', { class: 'vc-chip' });
      li.append(el('span', {}, u.full_name), button('×', { class: 'vc-chip-remove', 'aria-label': `Remove ${u.full_name}` }, () => {
        this.selected.delete(u.id);
        this.renderChips();
        this.picker.render();
      }));
      return li;
    });
    if (!chips.length) chips.push(el('li', { class: 'vc-empty-inline' }, 'Nobody yet.'));
    this.chips.replaceChildren(...chips);
    this.validate();
  }

  update(state) {
    this.picker.update(state);
  }
}

// ---- a group's settings -----------------------------------------------------

export class GroupSettingsView {
  constructor({ api, flash, model, me, actions }) {
    this.model = model;
    this.me = me;
    this.actions = actions;
    this.element = el('div', { class: 'vc-form' });
    this.nameSlot = el('div');
    this.membersList = el('ul', { class: 'vc-list vc-members', 'aria-label': 'Members' });
    this.error = el('p', { class: 'vc-error', role: 'alert' });
    this.addSlot = el('div');
    this.leaveSlot = el('div', { class: 'vc-leave' });
    this.picker = new UserPicker({
      api,
      flash,
      label: 'Add people by name or email',
      listLabel: 'Contacts to add',
      empty: 'Search for people to add.',
      action: 'Add',
      exclude: (id) => this.model.participants.has(id),
      onPick: (u) => this.run(() => this.actions.add(u.id)),
    });
    this.membersHeading = el('h3', { class: 'vc-section' });
    this.element.append(this.nameSlot, this.error, this.membersHeading, this.membersList, this.addSlot, this.leaveSlot);
    this.renderName();
    this.renderLeave(false);
  }

  async run(action) {
    this.error.textContent = '';
    try {
      await action();
    } catch (e) {
      this.error.textContent = e.message;
    }
  }

  /** The group changed elsewhere: what depends on the reader's rights follows. */
  refreshed() {
    if (this.managing !== this.model.canManage) this.renderName();
  }

  renderName() {
    const m = this.model;
    this.managing = m.canManage;
    if (!m.canManage) {
      this.nameSlot.replaceChildren(el('p', { class: 'vc-hint' }, 'Only the group’s creator can rename it and change who is in it.'));
      return;
    }
    const form = el('form', { class: 'vc-inline-form', novalidate: true });
    const input = el('input', { name: 'name', maxlength: '100', autocomplete: 'off' });
    input.value = m.name ?? '';
    const save = el('button', { type: 'submit', class: 'vc-secondary' }, 'Rename');
    form.append(labelled('Group name', input), save);
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const name = input.value.trim();
      if (!name || name === m.name) return;
      this.run(() => this.actions.rename(name));
    });
    this.nameSlot.replaceChildren(form);
  }

  renderLeave(confirming) {
    if (!confirming) {
      this.leaveSlot.replaceChildren(button('Leave group', { class: 'vc-danger' }, () => this.renderLeave(true)));
      return;
    }
    const box = el('div', { class: 'vc-confirm', role: 'group', 'aria-label': 'Confirm leaving' });
    box.append(
      el('p', {}, `Leave “${this.model.name}”? You will stop getting its messages.`),
      button('Yes, leave', { class: 'vc-danger' }, () => this.run(() => this.actions.leave())),
      button('Cancel', { class: 'vc-secondary' }, () => this.renderLeave(false)),
    );
    this.leaveSlot.replaceChildren(box);
    box.querySelector('button').focus();
  }

  update(state) {
    const m = this.model;
    const count = m.participants.size;
    this.membersHeading.textContent = `${count} ${count === 1 ? 'member' : 'members'}`;
    const members = [...m.participants.values()].sort((a, b) => Number(b.user_id === m.createdBy) - Number(a.user_id === m.createdBy) || a.full_name.localeCompare(b.full_name));
    reconcile(
      this.membersList,
      members.map((p) => ({ key: `p:${p.user_id}`, p, online: state.isOnline(p.user_id), manage: m.canManage })),
      {
        create: (item) => this.memberRow(item),
        update: (node, item) => node.dataset.sig === `${item.online}|${item.manage}|${item.p.full_name}`,
      },
    );
    if (m.canManage && !this.addSlot.firstChild) {
      this.addSlot.replaceChildren(el('h3', { class: 'vc-section' }, 'Add people'), this.picker.element);
    } else if (!m.canManage) {
      this.addSlot.replaceChildren();
    }
    if (m.canManage) this.picker.update(state);
  }

  memberRow({ p, online, manage }) {
    const m = this.model;
    const li = el('li', { class: 'vc-member' });
    li.dataset.sig = `${online}|${manage}|${p.full_name}`;
    const who = el('span', { class: 'vc-row-title' });
    const you = p.user_id === this.me ? ' (you)' : '';
    who.append(avatar(p.user_id, p.full_name), presenceDot(online), el('span', { class: 'vc-name' }, p.full_name + you));
    li.append(who, el('span', { class: 'vc-role' }, p.user_id === m.createdBy ? 'creator' : p.role));
    if (manage && p.user_id !== this.me) {
      li.append(button('Remove', { class: 'vc-link', 'aria-label': `Remove ${p.full_name}` }, () => this.run(() => this.actions.remove(p.user_id))));
    }
    return li;
  }
}

export { badgeText, firstName };
