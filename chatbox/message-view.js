// What a message shows after it is sent, and what can be done to it: the
// quote of the message it answers, reaction chips, the "edited" label, a
// deleted message's tombstone, the message menu (reply, react, edit, copy,
// delete), the composer's "Replying to…" / "Editing" bar and the
// @-mention picker. Everything is text nodes, never HTML. The logic lives in
// lifecycle.js; the chat view puts these pieces in its bubbles.

import { QUICK_REACTIONS, isSingleEmoji, reactedBy } from './lifecycle.js';
import { avatar, button, closeIcon, el, hidden } from './dom.js';

/** Above this many pixels of movement a touch is a scroll, not a long press. */
const LONG_PRESS_SLOP_PX = 10;
/** A touch held this long opens the message menu. */
export const LONG_PRESS_MS = 500;

// ---- in a bubble -------------------------------------------------------------

/**
 * The quote of the message a reply answers: its sender and text (or
 * "Message deleted"). A button: choosing it shows the original.
 */
export function quoteBlock(reply, { nameOf, textOf, onOpen }) {
  const b = button(null, { class: 'vc-quote' }, () => onOpen(reply));
  b.append(hidden('In reply to '), el('span', { class: 'vc-quote-name' }, nameOf(reply.sender_id)), hidden(': '));
  if (reply.deleted) b.append(el('span', { class: 'vc-quote-text vc-quote-deleted' }, 'Message deleted'));
  else b.append(el('span', { class: 'vc-quote-text' }, textOf(reply) || '…'));
  return b;
}

/**
 * One chip per emoji: the emoji and its count, pressed when the reader is
 * among those who reacted (a click takes it back, or adds it). The tooltip
 * names who reacted, as far as this client knows.
 */
export function reactionChips(reactions, { me, nameOf, onToggle }) {
  const box = el('div', { class: 'vc-reactions', role: 'group', 'aria-label': 'Reactions' });
  for (const r of reactions ?? []) {
    const mine = reactedBy(r, me);
    const chip = button(`${r.emoji} ${r.count}`, { class: `vc-reaction${mine ? ' vc-reaction-mine' : ''}`, 'aria-pressed': String(mine) }, () => onToggle(r.emoji, !mine));
    chip.dataset.emoji = r.emoji;
    const names = (r.user_ids ?? []).map((u) => (u === me ? 'You' : nameOf(u)));
    if (names.length) chip.title = names.length < r.count ? `${names.join(', ')} and ${r.count - names.length} more` : names.join(', ');
    box.append(chip);
  }
  box.hidden = !reactions?.length;
  return box;
}

/** A signature of what the chips show, to patch them only when it changed. */
export function reactionsSig(reactions, me) {
  return (reactions ?? []).map((r) => `${r.emoji}${r.count}${reactedBy(r, me) ? '*' : ''}:${(r.user_ids ?? []).join('.')}`).join('|');
}

// ---- the message menu ----------------------------------------------------------

const LABELS = { reply: 'Reply', edit: 'Edit', copy: 'Copy text', delete: 'Delete' };

/**
 * The menu of one message, over the message list: a row of emoji (React,
 * plus any emoji typed), then Reply, Edit, Copy text, Delete, as the
 * message allows. A real ARIA menu: its items are `menuitem`s, the arrow
 * keys move between them (Home, End), Escape or Tab closes it and the focus
 * goes back to the message. Delete asks first, in place.
 */
export class MessageMenu {
  /** @param {HTMLElement} host the positioned box the menu floats in (the scroll area) */
  constructor(host) {
    this.host = host;
    this.element = null;
    this.onOutside = (e) => {
      if (this.element && !this.element.contains(e.target) && !this.anchor?.querySelector('.vc-more-btn')?.contains(e.target)) this.close(false);
    };
  }

  get isOpen() {
    return Boolean(this.element);
  }

  /**
   * Opens for `anchor` (the bubble). `actions`: what lifecycle.menuActions
   * allows; `pick(action, arg)`: 'reply', 'edit', 'copy', 'delete' (after
   * the confirmation), 'react' with the emoji.
   */
  open({ anchor, actions, pick, onClose }) {
    this.close(false);
    this.anchor = anchor;
    this.pick = pick;
    this.onClose = onClose;
    const menu = el('div', { class: 'vc-menu', role: 'menu', 'aria-label': 'Message actions' });
    if (actions.includes('react')) {
      const row = el('div', { class: 'vc-menu-emoji', role: 'group', 'aria-label': 'React' });
      for (const emoji of QUICK_REACTIONS) row.append(this.item(emoji, () => this.choose('react', emoji), 'vc-menu-emo'));
      row.append(this.item('+', () => this.askEmoji(), 'vc-menu-emo', 'Other emoji'));
      menu.append(row);
    }
    for (const action of ['reply', 'edit', 'copy', 'delete']) {
      if (!actions.includes(action)) continue;
      const run = action === 'delete' ? () => this.confirmDelete() : () => this.choose(action);
      menu.append(this.item(LABELS[action], run, action === 'delete' ? 'vc-menu-danger' : ''));
    }
    menu.addEventListener('keydown', (e) => this.onKey(e));
    this.show(menu);
    this.items()[0]?.focus();
    anchor.querySelector('.vc-more-btn')?.setAttribute('aria-expanded', 'true');
    document.addEventListener('pointerdown', this.onOutside, true);
  }

  item(label, run, cls = '', ariaLabel = null) {
    const b = button(label, { role: 'menuitem', tabindex: '-1', class: `vc-menu-item ${cls}`.trim(), 'aria-label': ariaLabel });
    b.addEventListener('click', run);
    return b;
  }

  items() {
    return this.element ? [...this.element.querySelectorAll('[role="menuitem"]')] : [];
  }

  onKey(e) {
    const items = this.items();
    const i = items.indexOf(document.activeElement);
    let next = null;
    switch (e.key) {
      case 'ArrowDown':
      case 'ArrowRight':
        next = items[(i + 1) % items.length];
        break;
      case 'ArrowUp':
      case 'ArrowLeft':
        next = items[(i - 1 + items.length) % items.length];
        break;
      case 'Home':
        next = items[0];
        break;
      case 'End':
        next = items[items.length - 1];
        break;
      case 'Escape':
        e.preventDefault();
        e.stopPropagation(); // the panel closes on Escape too: only the menu goes
        this.close(true);
        return;
      case 'Tab':
        e.preventDefault();
        this.close(true);
        return;
      default:
        return;
    }
    e.preventDefault();
    next?.focus();
  }

  choose(action, arg) {
    const pick = this.pick;
    // The action decides where the focus goes (the composer for a reply).
    this.close(action === 'react' || action === 'copy');
    pick(action, arg);
  }

  /** Any emoji, typed: a small form in place of the menu. */
  askEmoji() {
    const form = el('form', { class: 'vc-menu vc-menu-form', role: 'dialog', 'aria-label': 'React with any emoji' });
    const input = el('input', { type: 'text', maxlength: '16', autocomplete: 'off', class: 'vc-menu-input' });
    const label = el('label', { class: 'vc-field' });
    label.append(el('span', {}, 'Emoji'), input);
    const error = el('p', { class: 'vc-error', role: 'alert' });
    const actions = el('div', { class: 'vc-menu-buttons' });
    actions.append(el('button', { type: 'submit', class: 'vc-primary' }, 'React'), button('Cancel', { class: 'vc-secondary' }, () => this.close(true)));
    form.append(label, error, actions);
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const emoji = input.value.trim();
      if (!isSingleEmoji(emoji)) {
        error.textContent = 'Type one emoji.';
        input.focus();
        return;
      }
      this.choose('react', emoji);
    });
    form.addEventListener('keydown', (e) => this.onDialogKey(e));
    this.show(form);
    input.focus();
  }

  /** Deleting is for everyone and cannot be undone: it asks first. */
  confirmDelete() {
    const box = el('div', { class: 'vc-menu vc-menu-form', role: 'dialog', 'aria-label': 'Delete message' });
    box.append(el('p', {}, 'Delete this message for everyone?'));
    const actions = el('div', { class: 'vc-menu-buttons' });
    const yes = button('Delete', { class: 'vc-danger' }, () => this.choose('delete'));
    actions.append(yes, button('Cancel', { class: 'vc-secondary' }, () => this.close(true)));
    box.append(actions);
    box.addEventListener('keydown', (e) => this.onDialogKey(e));
    this.show(box);
    yes.focus();
  }

  onDialogKey(e) {
    if (e.key !== 'Escape') return;
    e.preventDefault();
    e.stopPropagation();
    this.close(true);
  }

  /** Puts `node` where the menu is, next to its message and inside the host. */
  show(node) {
    if (this.element) this.element.replaceWith(node);
    else this.host.append(node);
    this.element = node;
    this.place();
  }

  /** Next to its message (below it, or above when there is no room), inside the host. */
  place() {
    const node = this.element;
    if (!node || !this.anchor?.isConnected) return;
    const host = this.host.getBoundingClientRect();
    const at = this.anchor.getBoundingClientRect();
    const w = node.offsetWidth;
    const h = node.offsetHeight;
    let top = at.bottom - host.top + 4;
    if (top + h > host.height - 4) top = Math.max(4, at.top - host.top - h - 4);
    const mine = this.anchor.classList.contains('vc-mine');
    let left = mine ? at.right - host.left - w : at.left - host.left;
    left = Math.min(Math.max(4, left), Math.max(4, host.width - w - 4));
    node.style.top = `${Math.round(top)}px`;
    node.style.left = `${Math.round(left)}px`;
  }

  /** Closes; `restore`: the focus goes back to the message. */
  close(restore = true) {
    if (!this.element) return;
    document.removeEventListener('pointerdown', this.onOutside, true);
    this.element.remove();
    this.element = null;
    const anchor = this.anchor;
    anchor?.querySelector('.vc-more-btn')?.setAttribute('aria-expanded', 'false');
    if (restore && anchor?.isConnected) anchor.focus({ preventScroll: true });
    const onClose = this.onClose;
    this.onClose = null;
    onClose?.();
  }
}

/**
 * Opens `open()` on a touch held still for LONG_PRESS_MS on `node` (a
 * phone has no hover and no right click); the press's own context menu is
 * kept from the browser.
 */
export function watchLongPress(node, open) {
  let timer = null;
  let start = null;
  let fired = false;
  const cancel = () => {
    clearTimeout(timer);
    timer = null;
  };
  node.addEventListener('pointerdown', (e) => {
    if (e.pointerType !== 'touch') return;
    fired = false;
    start = { x: e.clientX, y: e.clientY };
    cancel();
    timer = setTimeout(() => {
      fired = true;
      open();
    }, LONG_PRESS_MS);
  });
  node.addEventListener('pointermove', (e) => {
    if (timer && start && Math.hypot(e.clientX - start.x, e.clientY - start.y) > LONG_PRESS_SLOP_PX) cancel();
  });
  for (const type of ['pointerup', 'pointercancel', 'pointerleave']) node.addEventListener(type, cancel);
  node.addEventListener('contextmenu', (e) => {
    if (fired) e.preventDefault();
  });
}

// ---- the composer ---------------------------------------------------------------

/**
 * Above the composer: "Replying to Sam Patel: <quote>" or "Editing your
 * message", with a button to cancel.
 */
export function composerContext({ mode, name, quote, onCancel }) {
  const box = el('div', { class: `vc-context vc-context-${mode}` });
  const text = el('p', { class: 'vc-context-text' });
  if (mode === 'reply') {
    text.append(el('span', { class: 'vc-context-title' }, `Replying to ${name}`));
    text.append(el('span', { class: 'vc-context-quote' }, quote || '…'));
  } else {
    text.append(el('span', { class: 'vc-context-title' }, 'Editing your message'));
    text.append(el('span', { class: 'vc-context-quote' }, 'Enter saves, Escape cancels.'));
  }
  const cancel = button(null, { class: 'vc-icon vc-context-cancel', 'aria-label': mode === 'reply' ? 'Cancel reply' : 'Cancel editing' }, onCancel);
  cancel.append(closeIcon());
  box.append(text, cancel);
  return box;
}

let pickers = 0;

/**
 * The members offered while an "@" mention is typed: a listbox the
 * textarea controls (aria-activedescendant), so the focus stays in the
 * text. Up and Down move, Enter or Tab picks, Escape closes; a click picks.
 */
export class MentionPicker {
  constructor({ input, onPick }) {
    this.input = input;
    this.onPick = onPick;
    this.id = `vc-mentions-${++pickers}`;
    this.element = el('ul', { class: 'vc-mentions', role: 'listbox', id: this.id, 'aria-label': 'Mention someone', hidden: true });
    this.members = [];
    this.index = 0;
    input.setAttribute('aria-autocomplete', 'list');
    input.setAttribute('aria-controls', this.id);
  }

  get isOpen() {
    return !this.element.hidden;
  }

  show(members) {
    const before = this.members[this.index]?.user_id;
    this.members = members;
    if (!members.length) {
      this.hide();
      return;
    }
    const keep = members.findIndex((p) => p.user_id === before);
    this.index = keep >= 0 ? keep : 0;
    this.element.replaceChildren(
      ...members.map((p, i) => {
        const li = el('li', { role: 'option', id: `${this.id}-${p.user_id}`, class: 'vc-mention-option', 'aria-selected': String(i === this.index) });
        li.append(avatar(p.user_id, p.full_name), el('span', {}, p.full_name));
        // A press would take the focus from the text: pick on pointerdown instead.
        li.addEventListener('pointerdown', (e) => {
          e.preventDefault();
          this.onPick(p);
        });
        return li;
      }),
    );
    this.element.hidden = false;
    this.mark();
  }

  hide() {
    this.element.hidden = true;
    this.members = [];
    this.input.removeAttribute('aria-activedescendant');
  }

  mark() {
    for (const [i, li] of [...this.element.children].entries()) li.setAttribute('aria-selected', String(i === this.index));
    const current = this.element.children[this.index];
    if (current) {
      this.input.setAttribute('aria-activedescendant', current.id);
      current.scrollIntoView({ block: 'nearest' });
    }
  }

  /** Handles a key in the textarea while open; true when it was the picker's. */
  onKey(e) {
    if (!this.isOpen) return false;
    switch (e.key) {
      case 'ArrowDown':
        this.index = (this.index + 1) % this.members.length;
        break;
      case 'ArrowUp':
        this.index = (this.index - 1 + this.members.length) % this.members.length;
        break;
      case 'Enter':
      case 'Tab':
        if (e.shiftKey && e.key === 'Enter') return false;
        e.preventDefault();
        this.onPick(this.members[this.index]);
        return true;
      case 'Escape':
        e.stopPropagation();
        e.preventDefault();
        this.hide();
        return true;
      default:
        return false;
    }
    e.preventDefault();
    this.mark();
    return true;
  }
}
