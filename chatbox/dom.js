// Small DOM helpers for the ChatBox views: element creation, keyed
// reconciliation (update what changed, never rebuild a list), icons,
// avatars and linkified text.

import { avatarColour, initials, linkify } from './state.js';
import { splitMentions } from './lifecycle.js';

export function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v == null) continue;
    node.setAttribute(k, v === true ? '' : v);
  }
  if (text != null) node.textContent = text;
  return node;
}

export function button(label, attrs, onClick) {
  const b = el('button', { type: 'button', ...attrs }, label);
  if (onClick) b.addEventListener('click', onClick);
  return b;
}

/** Text only for screen readers. */
export function hidden(text) {
  return el('span', { class: 'vc-sr' }, text);
}

export function labelled(text, input) {
  const label = el('label', { class: 'vc-field' });
  label.append(el('span', {}, text), input);
  return label;
}

/**
 * Makes `container`'s children match `items` (each with a `key`), reusing
 * the nodes that are there. `create(item)` makes a node; `update(node,
 * item)` patches one in place and returns false when it cannot (the node is
 * then made again). A node left alone keeps its text selection and focus,
 * so an incoming message does not clear what the reader selected.
 */
export function reconcile(container, items, { create, update }) {
  const existing = new Map();
  for (const child of container.children) if (child.dataset.key) existing.set(child.dataset.key, child);
  let cursor = container.firstElementChild;
  for (const item of items) {
    let node = existing.get(item.key);
    existing.delete(item.key);
    if (node && !update(node, item)) {
      const fresh = create(item);
      fresh.dataset.key = item.key;
      if (cursor === node) cursor = fresh;
      node.replaceWith(fresh);
      node = fresh;
    }
    if (!node) {
      node = create(item);
      node.dataset.key = item.key;
    }
    if (node !== cursor) container.insertBefore(node, cursor);
    else cursor = cursor.nextElementSibling;
  }
  for (const gone of existing.values()) gone.remove();
}

/**
 * Text with http(s) links made clickable, and "@Full Name" of the people
 * in `mentioned` set off; never HTML.
 */
export function linkedText(text, mentioned = []) {
  const span = el('span', { class: 'vc-text' });
  for (const part of linkify(text)) {
    if (part.href) {
      span.append(el('a', { href: part.href, target: '_blank', rel: 'noopener noreferrer nofollow' }, part.text));
      continue;
    }
    for (const run of splitMentions(part.text, mentioned)) {
      span.append(run.mention ? el('strong', { class: 'vc-mention' }, run.text) : document.createTextNode(run.text));
    }
  }
  return span;
}

/** Initials on a colour of the user's own; decorative (the name is in the text). */
export function avatar(userId, name, size = 'small') {
  const a = el('span', { class: `vc-avatar vc-avatar-${size}`, 'aria-hidden': 'true' }, initials(name));
  a.style.background = avatarColour(userId);
  return a;
}

export function presenceDot(online) {
  return el('span', { class: `vc-dot ${online ? 'vc-online' : 'vc-offline'}`, 'aria-hidden': 'true' });
}

const SVG = 'http://www.w3.org/2000/svg';

function icon(d, size = 24) {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('width', String(size));
  svg.setAttribute('height', String(size));
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('focusable', 'false');
  const path = document.createElementNS(SVG, 'path');
  path.setAttribute('fill', 'currentColor');
  path.setAttribute('d', d);
  svg.append(path);
  return svg;
}

/** A speech bubble (inline SVG: no icon font needed). */
export const chatIcon = () =>
  icon('M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4H4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2zm3 6v2h2V9H7zm4 0v2h2V9h-2zm4 0v2h2V9h-2z', 28);
export const closeIcon = () => icon('M6.4 5 12 10.6 17.6 5 19 6.4 13.4 12l5.6 5.6-1.4 1.4-5.6-5.6L6.4 19 5 17.6 10.6 12 5 6.4z', 22);
export const backIcon = () => icon('M20 11H7.8l5.6-5.6L12 4l-8 8 8 8 1.4-1.4L7.8 13H20z', 22);
export const infoIcon = () =>
  icon('M11 7h2v2h-2zm0 4h2v6h-2zm1-9a10 10 0 1 0 0 20 10 10 0 0 0 0-20zm0 18a8 8 0 1 1 0-16 8 8 0 0 1 0 16z', 22);
export const downIcon = () => icon('M12 16.6 5.4 10 6.8 8.6l5.2 5.2 5.2-5.2 1.4 1.4z', 18);
export const bellIcon = () =>
  icon('M12 22a2 2 0 0 0 2-2h-4a2 2 0 0 0 2 2zm6-6V11a6 6 0 0 0-5-5.9V4a1 1 0 1 0-2 0v1.1A6 6 0 0 0 6 11v5l-2 2v1h16v-1l-2-2z', 22);
export const attachIcon = () =>
  icon('M16.5 6v11.5a4 4 0 0 1-8 0V5a2.5 2.5 0 0 1 5 0v10.5a1 1 0 0 1-2 0V6H10v9.5a2.5 2.5 0 0 0 5 0V5a4 4 0 0 0-8 0v12.5a5.5 5.5 0 0 0 11 0V6z', 22);
export const micIcon = () =>
  icon('M12 14a3 3 0 0 0 3-3V5a3 3 0 0 0-6 0v6a3 3 0 0 0 3 3zm5.3-3c0 3-2.5 5.1-5.3 5.1S6.7 14 6.7 11H5c0 3.4 2.7 6.2 6 6.7V21h2v-3.3c3.3-.5 6-3.3 6-6.7z', 22);
export const sendIcon = () => icon('M2 21 23 12 2 3v7l15 2-15 2z', 22);
export const trashIcon = () => icon('M6 19a2 2 0 0 0 2 2h8a2 2 0 0 0 2-2V7H6zM19 4h-3.5l-1-1h-5l-1 1H5v2h14z', 22);
export const galleryIcon = () =>
  icon('M22 16V4a2 2 0 0 0-2-2H8a2 2 0 0 0-2 2v12a2 2 0 0 0 2 2h12a2 2 0 0 0 2-2zm-11-4 2 2.7 3-3.7 4 5H8zM2 6v14a2 2 0 0 0 2 2h14v-2H4V6z', 22);
export const playIcon = () => icon('M8 5v14l11-7z', 22);
export const pauseIcon = () => icon('M6 19h4V5H6zm8-14v14h4V5z', 22);
export const fileIcon = () =>
  icon('M14 2H6a2 2 0 0 0-2 2v16a2 2 0 0 0 2 2h12a2 2 0 0 0 2-2V8zm2 16H8v-2h8zm0-4H8v-2h8zm-3-5V3.5L18.5 9z', 28);
export const prevIcon = () => icon('M15.4 7.4 14 6l-6 6 6 6 1.4-1.4-4.6-4.6z', 28);
export const nextIcon = () => icon('M10 6 8.6 7.4l4.6 4.6-4.6 4.6L10 18l6-6z', 28);
export const moreIcon = () =>
  icon('M6 10a2 2 0 1 0 0 4 2 2 0 0 0 0-4zm6 0a2 2 0 1 0 0 4 2 2 0 0 0 0-4zm6 0a2 2 0 1 0 0 4 2 2 0 0 0 0-4z', 20);
export const searchIcon = () =>
  icon('M10 3a7 7 0 0 1 5.6 11.2l5.1 5.1-1.4 1.4-5.1-5.1A7 7 0 1 1 10 3zm0 2a5 5 0 1 0 0 10 5 5 0 0 0 0-10z', 18);
export const downloadIcon = () => icon('M19 9h-4V3H9v6H5l7 7zM5 18v2h14v-2z', 22);
