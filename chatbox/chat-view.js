// The chat view: one conversation's messages, rendered from a ChatModel.
// It updates what changed (a new bubble, one status) instead of rebuilding
// the list, watches which messages are on screen to mark them read, and
// always offers a way forward: a retry for a failed load or catch-up, a
// clear state for a removed member, a jump to the latest messages.

import { readTarget, timeLabel, firstName } from './state.js';
import { avatar, button, el, hidden, linkedText, presenceDot, reconcile, downIcon } from './dom.js';

/** Within this many pixels of the bottom, the reader is "at the latest". */
const AT_END_PX = 60;
const TYPING_SEND_EVERY_MS = 2_000;

export class ChatView {
  /**
   * @param {object} o
   * @param {import('./state.js').ChatModel} o.model
   * @param {(userId: number) => string} o.nameOf
   * @param {(userId: number) => boolean} o.isOnline
   * @param {() => boolean} o.canSee the panel is open and the tab visible
   * @param {object} o.actions send, retrySend, loadOlder, retryLoad, retryGap, typing, read, back, draft
   */
  constructor({ model, nameOf, isOnline, canSee, actions, draft }) {
    this.model = model;
    this.nameOf = nameOf;
    this.isOnline = isOnline;
    this.canSee = canSee;
    this.actions = actions;
    this.visible = new Set();
    this.newBelow = 0;
    this.positioned = false;
    this.lastTypingSent = 0;

    this.element = el('div', { class: 'vc-chat' });
    this.subtitle = el('p', { class: 'vc-subtitle' });
    this.banner = el('div', { class: 'vc-banner-slot' });
    this.scroller = el('ol', { class: 'vc-messages', 'aria-label': 'Messages', tabindex: '0' });
    this.jump = button('', { class: 'vc-jump', hidden: true }, () => this.scrollToEnd(true));
    this.typingSlot = el('p', { class: 'vc-typing', 'aria-live': 'polite' });
    this.composer = this.buildComposer(draft);
    const body = el('div', { class: 'vc-scroll-area' });
    body.append(this.scroller, this.jump);
    this.element.append(this.subtitle, this.banner, body, this.typingSlot, this.composer);

    this.scroller.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.observer = new IntersectionObserver((entries) => this.onIntersect(entries), {
      root: this.scroller,
      threshold: [0, 0.5, 1],
    });
  }

  destroy() {
    this.observer.disconnect();
  }

  buildComposer(draft) {
    const form = el('form', { class: 'vc-compose' });
    const input = el('textarea', { rows: '1', 'aria-label': 'Message', placeholder: 'Write a message…', maxlength: '4000' });
    input.value = draft ?? '';
    const send = el('button', { type: 'submit', class: 'vc-primary' }, 'Send');
    send.disabled = input.value.trim() === '';
    input.addEventListener('input', () => {
      send.disabled = input.value.trim() === '';
      this.actions.draft(input.value);
      const now = Date.now();
      if (input.value && now - this.lastTypingSent > TYPING_SEND_EVERY_MS) {
        this.lastTypingSent = now;
        this.actions.typing();
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
      if (!text.trim() || this.model.status !== 'ready') return;
      input.value = '';
      send.disabled = true;
      this.lastTypingSent = 0;
      this.actions.draft('');
      this.actions.send(text);
      input.focus();
    });
    form.append(input, send);
    this.input = input;
    return form;
  }

  focus() {
    if (this.model.status === 'ready') this.input.focus();
    else this.banner.querySelector('button')?.focus();
  }

  get atEnd() {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < AT_END_PX;
  }

  // ---- rendering ----------------------------------------------------------

  /** Brings everything in line with the model. `cause`: 'open', 'incoming', 'sent', 'older', 'status'. */
  render(cause = 'status') {
    const wasAtEnd = this.atEnd;
    const heightBefore = this.scroller.scrollHeight;
    const topBefore = this.scroller.scrollTop;
    this.renderHeader();
    this.renderBanner();
    const items = this.model.status === 'ready' || this.model.status === 'removed' ? this.model.items() : [];
    reconcile(this.scroller, items, { create: (i) => this.create(i), update: (n, i) => this.update(n, i) });
    for (const node of this.scroller.querySelectorAll('li[data-seq]:not([data-watched])')) {
      node.dataset.watched = '';
      this.observer.observe(node);
    }
    this.composer.hidden = this.model.status !== 'ready';

    if (this.model.status !== 'ready') return;
    if (!this.positioned) {
      // A closed panel has no layout yet: place it when it opens.
      if (this.scroller.clientHeight === 0) return;
      this.positioned = true;
      this.placeOnOpen();
    } else if (cause === 'sent') {
      this.scrollToEnd(false);
    } else if (cause === 'incoming') {
      if (wasAtEnd) this.scrollToEnd(false);
    } else if (cause === 'older') {
      // Keep the reader's place while history grows above it.
      this.scroller.scrollTop = topBefore + (this.scroller.scrollHeight - heightBefore);
    }
  }

  /** Opening: the unread divider at the top if there is one, else the latest. */
  placeOnOpen() {
    const divider = this.scroller.querySelector('.vc-divider');
    if (divider) this.scroller.scrollTop = Math.max(0, divider.offsetTop - 8);
    else this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  /** New messages from others arrived while the reader is above them. */
  noteIncoming(count) {
    if (this.atEnd) return;
    this.newBelow += count;
    this.renderJump();
  }

  renderJump() {
    const show = this.newBelow > 0 && !this.atEnd;
    this.jump.hidden = !show;
    if (show) {
      const label = `Jump to latest (${this.newBelow} new)`;
      this.jump.replaceChildren(downIcon(), document.createTextNode(label));
    }
  }

  scrollToEnd(smooth) {
    const s = this.scroller;
    s.scrollTo({ top: s.scrollHeight, behavior: smooth ? 'smooth' : 'auto' });
    this.newBelow = 0;
    this.renderJump();
  }

  renderHeader() {
    const m = this.model;
    if (m.status === 'loading') {
      this.subtitle.textContent = 'Loading…';
      return;
    }
    const others = m.others();
    if (!m.isGroup && others.length === 1) {
      const online = this.isOnline(others[0].user_id);
      this.subtitle.replaceChildren(presenceDot(online), document.createTextNode(online ? 'Online' : 'Offline'));
    } else if (m.isGroup) {
      this.subtitle.textContent = `${m.participants.size} ${m.participants.size === 1 ? 'member' : 'members'}`;
    } else {
      this.subtitle.textContent = '';
    }
  }

  renderBanner() {
    const m = this.model;
    let banner = null;
    if (m.status === 'failed') {
      banner = this.notice(`This chat could not be loaded: ${m.error ?? 'unknown error'}.`, 'Try again', () => this.actions.retryLoad(), 'vc-banner-error');
    } else if (m.status === 'removed') {
      banner = this.notice('You are no longer a member of this group. You can still read what was said before.', 'Back to chats', () => this.actions.back(), 'vc-banner-info');
    } else if (m.gap) {
      banner = this.notice('Some messages could not be loaded.', 'Retry', () => this.actions.retryGap(), 'vc-banner-error');
    }
    const key = banner ? banner.dataset.key : '';
    if ((this.banner.firstElementChild?.dataset.key ?? '') === key) return;
    this.banner.replaceChildren(...(banner ? [banner] : []));
  }

  notice(text, action, onClick, cls) {
    const box = el('div', { class: `vc-banner ${cls}`, role: 'alert' });
    box.dataset.key = `${cls}:${text}`;
    box.append(el('p', {}, text), button(action, { class: 'vc-secondary' }, onClick));
    return box;
  }

  renderTyping(userIds) {
    const names = userIds.map((u) => firstName(this.nameOf(u)));
    this.typingSlot.textContent = names.length ? `${names.join(', ')} ${names.length > 1 ? 'are' : 'is'} typing…` : '';
  }

  // ---- items ------------------------------------------------------------

  create(item) {
    switch (item.kind) {
      case 'more':
        return el('li', { class: 'vc-more' }, 'Scroll up for older messages');
      // Plain list items (a separator role is not allowed in a list).
      case 'day':
        return el('li', { class: 'vc-day' }, item.label);
      case 'unread':
        return el('li', { class: 'vc-divider' }, 'New messages');
      default:
        return this.bubble(item);
    }
  }

  /** Patches a node in place where it can (status only); false: make it again. */
  update(node, item) {
    if (item.kind === 'day') return node.textContent === item.label;
    if (item.kind !== 'message' && item.kind !== 'pending') return true;
    if (node.dataset.shape !== shapeOf(item)) return false;
    // The text is never touched, so a selection in it survives; only the
    // group edge and the time/status line change.
    const last = node.classList.contains('vc-last');
    const meta = node.querySelector('.vc-meta');
    const changed = last !== item.last || node.dataset.status !== (item.status ?? '') || node.dataset.error !== (item.error ?? '');
    if (!changed) return true;
    node.classList.toggle('vc-last', item.last);
    node.dataset.status = item.status ?? '';
    node.dataset.error = item.error ?? '';
    if (showsMeta(item)) {
      const next = this.meta(item);
      if (meta) meta.replaceWith(next);
      else node.append(next);
      node.removeAttribute('title');
    } else {
      meta?.remove();
      node.title = node.querySelector('time')?.textContent ?? timeLabel(new Date(item.m ? item.m.created_at : item.at));
    }
    return true;
  }

  bubble(item) {
    const mine = item.mine;
    const m = item.m;
    const li = el('li', {
      class: `vc-bubble ${mine ? 'vc-mine' : 'vc-theirs'}${item.first ? ' vc-first' : ''}${item.last ? ' vc-last' : ''}`,
    });
    li.dataset.shape = shapeOf(item);
    li.dataset.status = item.status ?? '';
    li.dataset.error = item.error ?? '';
    if (item.kind === 'message') li.dataset.seq = String(item.seq);
    else li.dataset.pending = item.id;
    const sender = m ? m.sender_id : null;
    if (!mine && item.first) {
      li.append(avatar(sender, this.nameOf(sender)));
      if (this.model.isGroup) li.append(el('span', { class: 'vc-sender' }, this.nameOf(sender)));
      else li.append(hidden(`${this.nameOf(sender)}:`));
    }
    li.append(linkedText(m ? m.content : item.content));
    // A group's time and status show once, under its last bubble (and
    // wherever a status must be seen); the rest keep it as a tooltip.
    if (showsMeta(item)) li.append(this.meta(item));
    else li.title = timeLabel(new Date(m ? m.created_at : item.at));
    return li;
  }

  meta(item) {
    const at = new Date(item.m ? item.m.created_at : item.at);
    const meta = el('span', { class: 'vc-meta' });
    meta.append(el('time', { datetime: at.toISOString() }, timeLabel(at)));
    if (item.status) {
      meta.append(el('span', { class: `vc-status vc-status-${item.status}`, title: item.error ?? statusLabel(item.status) }, statusLabel(item.status)));
    }
    if (item.status === 'failed' && this.model.status === 'ready') {
      meta.append(button('Retry', { class: 'vc-link vc-retry', 'aria-label': 'Retry sending' }, () => this.actions.retrySend(item.id)));
    }
    return meta;
  }

  // ---- scrolling and reading ---------------------------------------------

  onScroll() {
    if (this.scroller.scrollTop < 40) this.actions.loadOlder();
    if (this.atEnd && this.newBelow) {
      this.newBelow = 0;
      this.renderJump();
    }
  }

  onIntersect(entries) {
    for (const e of entries) {
      const seq = Number(e.target.dataset.seq);
      // A bubble made again (its shape changed) leaves its old node behind.
      if (!seq || !e.target.isConnected) continue;
      const rootHeight = e.rootBounds?.height ?? 0;
      const seen = e.isIntersecting && (e.intersectionRatio >= 0.5 || e.intersectionRect.height >= rootHeight / 2);
      if (seen) this.visible.add(seq);
      else this.visible.delete(seq);
    }
    this.checkRead();
  }

  /** Marks read what is on screen, if the reader can see it. */
  checkRead() {
    for (const seq of this.visible) if (!this.scroller.querySelector(`li[data-seq="${seq}"]`)) this.visible.delete(seq);
    const target = readTarget({ visible: this.visible, canSee: this.canSee() && this.model.status === 'ready', readSent: this.model.readSent });
    if (target !== null) this.actions.read(target);
  }
}

function showsMeta(item) {
  return item.last || Boolean(item.status);
}

function shapeOf(item) {
  return `${item.kind}|${item.first ? 1 : 0}`;
}

export function statusLabel(status) {
  return { sending: 'Sending…', sent: 'Sent', delivered: 'Delivered', read: 'Read', failed: 'Not sent' }[status] ?? status;
}
