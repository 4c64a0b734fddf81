// Attachments in the ChatBox: how a photo, video, voice message or file
// shows in a bubble, the voice player, the upload tray above the composer,
// the voice recorder, the full-size viewer and the conversation's gallery.
//
// Media links are signed and expire (≤ 1 hour), so every element that
// loads one asks for a fresh link once when it fails (`media.resign`).
// Sizes come from the attachment's metadata before any byte arrives, so
// nothing in the message list moves when an image loads.

import { attachmentLabel, fitBox, formatBytes, formatDuration, recorderMime } from './state.js';
import { button, el, hidden, reconcile, closeIcon, downloadIcon, fileIcon, nextIcon, pauseIcon, playIcon, prevIcon } from './dom.js';

/**
 * What the media elements need from the controller:
 * - `url(path)`: an absolute URL for a signed path;
 * - `localUrl(id)`: a blob URL of the sender's own copy, while the server
 *   has none to show;
 * - `resign(a)`: a fresh copy of the attachment (new links), or null;
 * - `open(a, from)`: the full-size viewer.
 * @typedef {{url: (p: string) => string|null, localUrl: (id: string) => string|null, resign: (a: object) => Promise<object|null>, open: (a: object, from: Element) => void}} Media
 */

/**
 * What, when it changes, makes an attachment's element again. Not its
 * links (re-signed in place), and for what plays, not what can change
 * under a player (a poster, a duration: patched in place), so a voice
 * message or a video keeps playing through an `attachment_updated`.
 */
export function attachmentSig(a, media) {
  const failed = a.status === 'failed' ? 1 : 0;
  if (a.kind === 'image') return ['i', a.status, a.thumbnail_url ? 1 : 0, a.url ? 1 : 0, a.width, a.height, media.localUrl(a.id) ? 1 : 0].join('|');
  return [a.kind, failed, a.url ? 1 : 0].join('|');
}

/** The players in bubbles, by their element, for patching in place. */
const players = new WeakMap();

/** The attachments of a message, in order. */
export function attachmentsBlock(attachments, media) {
  const box = el('div', { class: 'vc-atts' });
  for (const a of attachments) box.append(attachmentNode(a, media));
  return box;
}

/** Brings a bubble's attachments in line with the message, re-making only those that changed. */
export function patchAttachments(box, attachments, media) {
  const nodes = [...box.children];
  if (nodes.length !== attachments.length || nodes.some((n, i) => n.dataset.att !== attachments[i].id)) {
    box.replaceChildren(...attachments.map((a) => attachmentNode(a, media)));
    return;
  }
  attachments.forEach((a, i) => {
    const node = nodes[i];
    if (node.dataset.sig !== attachmentSig(a, media)) {
      node.replaceWith(attachmentNode(a, media));
      return;
    }
    node.dataset.status = a.status;
    players.get(node)?.update(a);
    const video = node.querySelector('video');
    if (video) {
      // A video's size is known once processed: its box follows in place.
      const box = sizeBox(node, a, 240, 300);
      video.width = box.width;
      video.height = box.height;
      if (a.thumbnail_url && !video.poster) video.poster = media.url(a.thumbnail_url);
    }
  });
}

export function attachmentNode(a, media) {
  let node;
  if (a.kind === 'image') node = imageNode(a, media);
  else if (a.kind === 'video') node = videoNode(a, media);
  else if (a.kind === 'audio') {
    const player = new VoicePlayer(a, media);
    node = player.element;
    players.set(node, player);
  }
  else node = fileCard(a, media);
  node.dataset.att = a.id;
  node.dataset.sig = attachmentSig(a, media);
  node.dataset.status = a.status;
  return node;
}

/** Sets a media element's box from the metadata, so the list does not jump when it loads. */
function sizeBox(node, a, maxW, maxH) {
  const box = fitBox(a.width, a.height, maxW, maxH);
  node.style.width = `${box.width}px`;
  node.style.aspectRatio = `${box.width} / ${box.height}`;
  return box;
}

/**
 * Loads a signed link into `node[attr]`; when it fails (expired), asks for
 * fresh links once and tries again with `pick(fresh)`.
 */
function signedSource(node, attr, path, a, media, pick) {
  node[attr] = media.url(path);
  node.addEventListener('error', async () => {
    if (node.dataset.resigned) return;
    node.dataset.resigned = '1';
    const fresh = await media.resign(a);
    const next = fresh && pick(fresh);
    if (next) node[attr] = media.url(next);
  });
}

function imageNode(a, media) {
  if (a.status === 'failed') return failedBox(a, 'Couldn’t process this photo.');
  const path = a.thumbnail_url || a.url;
  // The visible "Processing…" is part of the name (what a speech-input user says).
  const label = `Open photo${a.name ? ` ${a.name}` : ''} full size${path ? '' : ', Processing…'}`;
  const open = button(null, { class: 'vc-att vc-att-image', 'aria-label': label });
  open.addEventListener('click', () => media.open(a, open));
  const box = sizeBox(open, a, 240, 300);
  const local = media.localUrl(a.id);
  if (path || local) {
    const img = el('img', { alt: '', width: String(box.width), height: String(box.height), decoding: 'async' });
    if (path) signedSource(img, 'src', path, a, media, (f) => f.thumbnail_url || f.url);
    else img.src = local;
    open.append(img);
  }
  if (!path) {
    // The server re-encodes the photo (which strips its location data)
    // before anyone may download it: until then, its box and a note.
    open.append(el('span', { class: 'vc-att-wait' }, 'Processing…'));
  }
  return open;
}

function videoNode(a, media) {
  if (!a.url) return failedBox(a, a.status === 'failed' ? 'Couldn’t process this video.' : 'Processing…');
  const wrap = el('div', { class: 'vc-att vc-att-video' });
  const box = sizeBox(wrap, a, 240, 300);
  const video = el('video', { controls: true, preload: 'metadata', playsinline: true, width: String(box.width), height: String(box.height), 'aria-label': attachmentLabel(a) });
  if (a.thumbnail_url) video.poster = media.url(a.thumbnail_url);
  signedSource(video, 'src', a.url, a, media, (f) => f.url);
  const full = button('Full size', { class: 'vc-link vc-att-full', 'aria-label': 'Open video full size' });
  full.addEventListener('click', () => {
    video.pause();
    media.open(a, full);
  });
  wrap.append(video, full);
  return wrap;
}

function failedBox(a, text) {
  const box = el('div', { class: `vc-att vc-att-failed${a.status === 'failed' ? '' : ' vc-att-pending'}`, role: 'img', 'aria-label': `${attachmentLabel(a)}: ${text}` });
  // A failure needs no more room than its sentence; a video still
  // processing keeps its shape, so the list does not move when it is ready.
  if (a.status !== 'failed') sizeBox(box, a, 240, 300);
  box.append(el('span', { 'aria-hidden': 'true' }, text));
  return box;
}

/** A PDF (or another file): an icon, its name and size, and a download link. */
export function fileCard(a, media) {
  const name = a.name || 'File';
  const details = `${formatBytes(a.size)}${a.mime === 'application/pdf' ? ' · PDF' : ''}`;
  const card = a.url ? el('a', { class: 'vc-file', href: media.url(a.url), download: name, target: '_blank', rel: 'noopener' }) : el('div', { class: 'vc-file' });
  const text = el('span', { class: 'vc-file-text' });
  text.append(el('span', { class: 'vc-file-name' }, name), el('span', { class: 'vc-file-size' }, a.status === 'failed' && !a.url ? 'Couldn’t process this file.' : details));
  card.append(fileIcon(), text);
  if (a.url) {
    card.prepend(hidden('Download '));
    card.append(downloadIcon());
    // Links are valid an hour: a card left on screen longer gets a fresh
    // one when the pointer or the focus comes to it, before it is followed.
    const signedAt = Date.now();
    const refresh = async () => {
      if (Date.now() - signedAt < LINK_STALE_MS || card.dataset.refreshing) return;
      card.dataset.refreshing = '1';
      const fresh = await media.resign(a);
      if (fresh?.url) card.href = media.url(fresh.url);
    };
    card.addEventListener('pointerenter', refresh);
    card.addEventListener('focus', refresh);
  }
  return card;
}

const LINK_STALE_MS = 45 * 60_000;

// ---- voice ------------------------------------------------------------------

/**
 * A compact player: play/pause, a position bar (a slider, so the keyboard
 * can seek) and the time. The length is the metadata's `duration_ms`: a
 * WebM from MediaRecorder has no duration of its own (Infinity).
 */
export class VoicePlayer {
  constructor(a, media) {
    this.a = a;
    this.duration = a.duration_ms ?? 0;
    this.element = el('div', { class: 'vc-voice', role: 'group', 'aria-label': attachmentLabel(a) });
    if (!a.url) {
      this.element.append(el('span', { class: 'vc-voice-time' }, a.status === 'failed' ? 'Couldn’t process this voice message.' : 'Processing…'));
      return;
    }
    this.audio = el('audio', { preload: 'metadata' });
    signedSource(this.audio, 'src', a.url, a, media, (f) => f.url);
    this.play = button(null, { class: 'vc-icon vc-voice-play', 'aria-label': 'Play voice message' }, () => this.toggle());
    this.play.append(playIcon());
    this.bar = el('input', { type: 'range', class: 'vc-voice-bar', min: '0', max: String(Math.max(1, this.duration)), step: '100', value: '0', 'aria-label': 'Position' });
    this.bar.addEventListener('input', () => {
      if (Number.isFinite(this.audio.duration) || this.audio.seekable.length) this.audio.currentTime = Number(this.bar.value) / 1000;
      this.show(Number(this.bar.value));
    });
    this.time = el('span', { class: 'vc-voice-time' });
    this.audio.addEventListener('play', () => this.playing(true));
    this.audio.addEventListener('pause', () => this.playing(false));
    this.audio.addEventListener('ended', () => {
      this.playing(false);
      this.show(0);
    });
    this.audio.addEventListener('loadedmetadata', () => {
      if (!this.duration && Number.isFinite(this.audio.duration)) {
        this.duration = Math.round(this.audio.duration * 1000);
        this.bar.max = String(this.duration);
        this.show(0);
      }
    });
    this.element.append(this.play, this.bar, this.time, this.audio);
    this.show(0);
  }

  /** A fresher copy of the attachment: its measured duration may have arrived. */
  update(a) {
    if (!this.audio || !a.duration_ms || a.duration_ms === this.duration) return;
    this.duration = a.duration_ms;
    this.bar.max = String(this.duration);
    this.show(this.audio.currentTime * 1000);
  }

  toggle() {
    if (this.audio.paused) {
      // Only one voice message plays at a time.
      for (const other of document.querySelectorAll('.vc-voice audio')) if (other !== this.audio) other.pause();
      this.audio.play().catch(() => {});
    } else {
      this.audio.pause();
    }
  }

  playing(on) {
    this.play.replaceChildren(on ? pauseIcon() : playIcon());
    this.play.setAttribute('aria-label', on ? 'Pause voice message' : 'Play voice message');
    this.element.classList.toggle('vc-playing', on);
    cancelAnimationFrame(this.frame);
    if (on) {
      const tick = () => {
        this.show(this.audio.currentTime * 1000);
        this.frame = requestAnimationFrame(tick);
      };
      tick();
    }
  }

  show(ms) {
    const at = Math.min(ms, this.duration || ms);
    this.bar.value = String(Math.round(at));
    // The length arrives with processing when the upload did not say it.
    const text = this.duration ? `${formatDuration(at)} / ${formatDuration(this.duration)}` : formatDuration(at);
    this.bar.setAttribute('aria-valuetext', text);
    if (this.time.textContent !== text) this.time.textContent = text;
  }
}

/**
 * Records a voice message with MediaRecorder (WebM/Opus where the browser
 * has it, MP4/AAC on Safari). `start()` asks for the microphone; `stop()`
 * resolves to `{ blob, type, durationMs }`; `cancel()` throws it away.
 * The duration is measured here: the recording's container may not say.
 */
export class VoiceRecorder {
  static get supported() {
    return Boolean(navigator.mediaDevices?.getUserMedia && window.MediaRecorder);
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const mimeType = recorderMime((t) => MediaRecorder.isTypeSupported(t));
    this.recorder = new MediaRecorder(this.stream, mimeType ? { mimeType } : undefined);
    this.chunks = [];
    this.recorder.addEventListener('dataavailable', (e) => {
      if (e.data.size) this.chunks.push(e.data);
    });
    this.recorder.start(250);
    this.startedAt = performance.now();
  }

  get elapsed() {
    return this.startedAt ? performance.now() - this.startedAt : 0;
  }

  stop() {
    const durationMs = Math.round(this.elapsed);
    return new Promise((resolve) => {
      this.recorder.addEventListener('stop', () => {
        this.release();
        const type = this.recorder.mimeType || 'audio/webm';
        resolve({ blob: new Blob(this.chunks, { type }), type, durationMs });
      }, { once: true });
      this.recorder.stop();
    });
  }

  cancel() {
    if (this.recorder?.state === 'recording') this.recorder.stop();
    this.release();
  }

  release() {
    for (const t of this.stream?.getTracks() ?? []) t.stop();
  }
}

// ---- the upload tray ----------------------------------------------------------

/**
 * The files chosen for the next message, above the composer: each with its
 * progress, a Cancel while it uploads, and the reason plus Retry when it
 * failed. `actions`: cancel(key), retry(key), remove(key).
 */
export class TrayView {
  constructor({ actions, preview }) {
    this.actions = actions;
    this.preview = preview; // (key) => a blob URL for an image, or null
    this.element = el('ul', { class: 'vc-tray', 'aria-label': 'Attachments to send' });
  }

  render(tray) {
    const items = tray.items().map((i) => ({ ...i }));
    this.element.hidden = items.length === 0;
    reconcile(this.element, items, { create: (i) => this.row(i), update: (n, i) => this.patch(n, i) });
  }

  row(i) {
    const li = el('li', { class: `vc-tray-item vc-tray-${i.state}` });
    li.dataset.state = i.state;
    const url = i.kind === 'image' ? this.preview(i.key) : null;
    const thumb = el('span', { class: 'vc-tray-thumb', 'aria-hidden': 'true' });
    if (url) thumb.append(el('img', { src: url, alt: '' }));
    else thumb.append(fileIcon());
    const text = el('span', { class: 'vc-tray-text' });
    const name = i.auto ? `Voice message ${formatDuration(i.durationMs)}` : i.name;
    text.append(el('span', { class: 'vc-tray-name' }, name));
    const status = el('span', { class: 'vc-tray-status' });
    text.append(status);
    li.append(thumb, text);
    if (i.state === 'uploading') {
      const bar = el('progress', { max: String(Math.max(1, i.size)), value: String(i.loaded), 'aria-label': `Uploading ${name}` });
      text.append(bar);
      li.append(button('Cancel', { class: 'vc-secondary vc-tray-btn', 'aria-label': `Cancel upload of ${name}` }, () => this.actions.cancel(i.key)));
    } else if (i.state === 'failed') {
      status.setAttribute('role', 'alert');
      li.append(
        button('Retry', { class: 'vc-secondary vc-tray-btn', 'aria-label': `Retry upload of ${name}` }, () => this.actions.retry(i.key)),
        button('Remove', { class: 'vc-secondary vc-tray-btn', 'aria-label': `Remove ${name}` }, () => this.actions.remove(i.key)),
      );
    } else {
      if (i.state === 'refused') status.setAttribute('role', 'alert');
      li.append(button('Remove', { class: 'vc-secondary vc-tray-btn', 'aria-label': `Remove ${name}` }, () => this.actions.remove(i.key)));
    }
    this.patch(li, i);
    return li;
  }

  patch(li, i) {
    if (li.dataset.state !== i.state) return false;
    const status = li.querySelector('.vc-tray-status');
    let text;
    if (i.state === 'uploading') {
      const pct = i.size ? Math.floor((100 * i.loaded) / i.size) : 0;
      text = `${pct}% of ${formatBytes(i.size)}`;
      const bar = li.querySelector('progress');
      bar.max = Math.max(1, i.size);
      bar.value = i.loaded;
    } else if (i.state === 'done') {
      text = i.auto ? 'Sending…' : `${formatBytes(i.size)} · ready to send`;
    } else {
      text = i.error ?? 'Failed.';
    }
    if (status.textContent !== text) status.textContent = text;
    return true;
  }
}

// ---- full size --------------------------------------------------------------------

/**
 * The full-size viewer over the panel: one photo or video at a time with
 * Previous and Next (and the arrow keys), a download link and Close (and
 * Escape). `items`: attachments; `more()`: a promise of further items (the
 * gallery's next page) or null.
 */
export class Lightbox {
  constructor({ items, index, media, more = null, onClose }) {
    this.items = items;
    this.index = index;
    this.media = media;
    this.more = more;
    this.onClose = onClose;
    this.element = el('div', { class: 'vc-lightbox', role: 'dialog', 'aria-modal': 'true', 'aria-label': 'Full size' });
    this.caption = el('p', { class: 'vc-lightbox-caption', 'aria-live': 'polite' });
    this.download = el('a', { class: 'vc-icon vc-lightbox-download', 'aria-label': 'Download', target: '_blank', rel: 'noopener' });
    this.download.append(downloadIcon());
    this.close = button(null, { class: 'vc-icon vc-lightbox-close', 'aria-label': 'Close full size view' }, () => this.hide());
    this.close.append(closeIcon());
    const bar = el('div', { class: 'vc-lightbox-bar' });
    bar.append(this.caption, this.download, this.close);
    this.stage = el('div', { class: 'vc-lightbox-stage' });
    this.prev = button(null, { class: 'vc-icon vc-lightbox-prev', 'aria-label': 'Previous' }, () => this.step(-1));
    this.prev.append(prevIcon());
    this.next = button(null, { class: 'vc-icon vc-lightbox-next', 'aria-label': 'Next' }, () => this.step(1));
    this.next.append(nextIcon());
    const body = el('div', { class: 'vc-lightbox-body' });
    body.append(this.prev, this.stage, this.next);
    this.element.append(bar, body);
    // On the document while open: a button that became disabled (Next on
    // the last photo) drops the focus to the page, and the arrows must
    // still work.
    this.keys = (e) => {
      if (this.element.contains(e.target) || e.target === document.body) this.onKey(e);
    };
    this.render();
  }

  onKey(e) {
    if (e.key === 'Escape') {
      // The viewer closes, not the whole panel.
      e.stopPropagation();
      this.hide();
    } else if (e.key === 'ArrowLeft' && !isSeekable(e.target)) {
      e.preventDefault();
      this.step(-1);
    } else if (e.key === 'ArrowRight' && !isSeekable(e.target)) {
      e.preventDefault();
      this.step(1);
    } else if (e.key === 'Tab') {
      // Keep the keyboard inside the dialog.
      const focusable = [...this.element.querySelectorAll('button:not([disabled]), a[href], video[controls]')];
      const first = focusable[0];
      const last = focusable[focusable.length - 1];
      if (e.shiftKey && document.activeElement === first) {
        e.preventDefault();
        last.focus();
      } else if (!e.shiftKey && document.activeElement === last) {
        e.preventDefault();
        first.focus();
      }
    }
  }

  async step(delta) {
    let to = this.index + delta;
    if (to >= this.items.length && this.more && !this.loading) {
      this.loading = true;
      try {
        const extra = await this.more();
        if (extra?.length) this.items = [...this.items, ...extra];
        else this.more = null;
      } finally {
        this.loading = false;
      }
    }
    to = Math.max(0, Math.min(this.items.length - 1, to));
    if (to === this.index) return;
    this.index = to;
    this.render();
  }

  render() {
    const a = this.items[this.index];
    const total = this.items.length;
    this.element.setAttribute('aria-label', `${a.kind === 'video' ? 'Video' : 'Photo'} ${this.index + 1} of ${total}${this.more ? '+' : ''}`);
    const when = a.created_at ? ` · ${new Date(a.created_at).toLocaleString(undefined, { day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit' })}` : '';
    this.caption.textContent = `${this.index + 1} of ${total}${this.more ? '+' : ''}${when}`;
    const focused = document.activeElement;
    this.prev.disabled = this.index === 0;
    this.next.disabled = this.index === total - 1 && !this.more;
    // Stepping to an end keeps the focus in the dialog, on the way back.
    if (focused === this.next && this.next.disabled) this.prev.focus();
    if (focused === this.prev && this.prev.disabled) this.next.focus();
    this.download.hidden = !a.url;
    if (a.url) this.download.href = this.media.url(a.url);
    let node;
    if (a.kind === 'video' && a.url) {
      node = el('video', { controls: true, preload: 'metadata', playsinline: true, 'aria-label': attachmentLabel(a) });
      if (a.thumbnail_url) node.poster = this.media.url(a.thumbnail_url);
      signedSource(node, 'src', a.url, a, this.media, (f) => f.url);
    } else if (a.url || this.media.localUrl(a.id) || a.thumbnail_url) {
      node = el('img', { alt: a.name ? `Photo ${a.name}` : `Photo ${this.index + 1} of ${total}`, class: 'vc-lightbox-img' });
      if (a.width && a.height) {
        node.width = a.width;
        node.height = a.height;
      }
      if (a.url) signedSource(node, 'src', a.url, a, this.media, (f) => f.url);
      else node.src = this.media.localUrl(a.id) ?? this.media.url(a.thumbnail_url);
    } else {
      node = el('p', { class: 'vc-lightbox-wait' }, a.status === 'failed' ? 'Couldn’t process this photo.' : 'This photo is still being processed.');
    }
    node.dataset.att = a.id;
    this.stage.replaceChildren(node);
  }

  /** Puts it over `container` and takes the focus (given back on close). */
  show(container, from) {
    this.from = from ?? document.activeElement;
    container.append(this.element);
    document.addEventListener('keydown', this.keys, true);
    this.close.focus();
  }

  hide() {
    document.removeEventListener('keydown', this.keys, true);
    for (const v of this.element.querySelectorAll('video')) v.pause();
    this.element.remove();
    if (this.from?.isConnected) this.from.focus();
    this.onClose?.();
  }

  /** A fresher copy of one of its items (a live update). */
  updateAttachment(fresh) {
    const i = this.items.findIndex((a) => a.id === fresh.id);
    if (i < 0) return;
    this.items[i] = { ...this.items[i], ...fresh };
    if (i === this.index) this.render();
  }
}

function isSeekable(target) {
  return target instanceof HTMLInputElement || target instanceof HTMLMediaElement;
}

// ---- the gallery ----------------------------------------------------------------

const GALLERY_TABS = [
  ['image', 'Photos', 'No photos yet.'],
  ['video', 'Videos', 'No videos yet.'],
  ['audio', 'Voice', 'No voice messages yet.'],
  ['file', 'Files', 'No files yet.'],
];

/**
 * A conversation's attachments, newest first, one kind per tab: a grid of
 * thumbnails for photos and videos (a click opens them full size), players
 * for voice messages and cards for files. Pages load as the end scrolls
 * into view (and from a "Load more" button).
 */
export class GalleryView {
  constructor({ api, conversationId, media }) {
    this.api = api;
    this.conversationId = conversationId;
    this.media = media;
    this.kind = 'image';
    this.element = el('div', { class: 'vc-gallery' });
    this.tabs = el('div', { class: 'vc-tabs', role: 'tablist', 'aria-label': 'Kinds of media' });
    for (const [kind, label] of GALLERY_TABS) {
      const tab = button(label, { role: 'tab', class: 'vc-tab', id: `vc-gallery-tab-${kind}`, 'aria-controls': 'vc-gallery-panel' }, () => this.select(kind, true));
      tab.dataset.kind = kind;
      this.tabs.append(tab);
    }
    this.tabs.addEventListener('keydown', (e) => {
      if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
      const kinds = GALLERY_TABS.map(([k]) => k);
      const i = kinds.indexOf(this.kind);
      this.select(kinds[(i + (e.key === 'ArrowRight' ? 1 : kinds.length - 1)) % kinds.length], true);
    });
    this.panel = el('div', { class: 'vc-gallery-panel', id: 'vc-gallery-panel', role: 'tabpanel' });
    this.list = el('ul', { class: 'vc-gallery-grid' });
    this.status = el('div', { class: 'vc-gallery-status' });
    this.moreButton = button('Load more', { class: 'vc-secondary vc-gallery-more', hidden: true }, () => this.load());
    this.sentinel = el('div', { class: 'vc-gallery-end', 'aria-hidden': 'true' });
    this.panel.append(this.list, this.status, this.moreButton, this.sentinel);
    this.element.append(this.tabs, this.panel);
    this.observer = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting) && this.cursor && !this.loading) this.load();
    }, { root: this.panel, rootMargin: '200px' });
    this.observer.observe(this.sentinel);
    this.select('image', false);
  }

  destroy() {
    this.observer.disconnect();
    this.lightbox?.hide();
  }

  select(kind, focus) {
    this.kind = kind;
    this.items = [];
    this.cursor = null;
    this.done = false;
    this.generation = (this.generation ?? 0) + 1;
    for (const tab of this.tabs.children) {
      const on = tab.dataset.kind === kind;
      tab.setAttribute('aria-selected', String(on));
      tab.tabIndex = on ? 0 : -1;
      if (on && focus) tab.focus();
    }
    this.panel.setAttribute('aria-labelledby', `vc-gallery-tab-${kind}`);
    this.list.className = `vc-gallery-grid vc-gallery-${kind}`;
    this.list.setAttribute('aria-label', GALLERY_TABS.find(([k]) => k === kind)[1]);
    this.list.replaceChildren();
    this.load();
  }

  /** The next page of the current tab; resolves to the items it added. */
  async load() {
    if (this.loading || this.done) return this.loading ?? [];
    const generation = this.generation;
    this.status.replaceChildren(el('p', { class: 'vc-hint', role: 'status' }, 'Loading…'));
    this.moreButton.hidden = true;
    this.loading = (async () => {
      try {
        const page = await this.api.gallery(this.conversationId, this.kind, this.cursor);
        if (generation !== this.generation) return [];
        this.items.push(...page.attachments);
        this.cursor = page.next_cursor;
        this.done = !page.next_cursor;
        for (const a of page.attachments) this.list.append(this.tile(a));
        this.status.replaceChildren();
        if (!this.items.length) this.status.append(el('p', { class: 'vc-empty' }, GALLERY_TABS.find(([k]) => k === this.kind)[2]));
        this.moreButton.hidden = this.done;
        return page.attachments;
      } catch (e) {
        if (generation !== this.generation) return [];
        const box = el('div', { class: 'vc-banner vc-banner-error', role: 'alert' });
        box.append(el('p', {}, `The gallery could not be loaded: ${e.message}`), button('Try again', { class: 'vc-secondary' }, () => this.load()));
        this.status.replaceChildren(box);
        return [];
      } finally {
        if (generation === this.generation) this.loading = null;
      }
    })();
    return this.loading;
  }

  tile(a) {
    const li = el('li', { class: 'vc-gallery-item' });
    li.dataset.att = a.id;
    if (a.kind === 'audio') {
      li.append(el('span', { class: 'vc-gallery-date' }, dateLabel(a.created_at)), new VoicePlayer(a, this.media).element);
      return li;
    }
    if (a.kind === 'file') {
      li.append(fileCard(a, this.media), el('span', { class: 'vc-gallery-date' }, dateLabel(a.created_at)));
      return li;
    }
    const what = a.kind === 'video' ? 'video' : 'photo';
    const open = button(null, { class: 'vc-gallery-thumb', 'aria-label': `Open ${what} from ${dateLabel(a.created_at)}` }, () => this.open(a, open));
    const path = a.thumbnail_url || (a.kind === 'image' ? a.url : null);
    if (path) {
      const img = el('img', { alt: '', loading: 'lazy', decoding: 'async' });
      signedSource(img, 'src', path, a, this.media, (f) => f.thumbnail_url || (f.kind === 'image' ? f.url : null));
      open.append(img);
    } else {
      open.append(el('span', { class: 'vc-gallery-placeholder', 'aria-hidden': 'true' }, a.status === 'failed' ? '!' : a.kind === 'video' ? '▶' : '…'));
    }
    if (a.kind === 'video') open.append(el('span', { class: 'vc-gallery-badge', 'aria-hidden': 'true' }, a.duration_ms ? `▶ ${formatDuration(a.duration_ms)}` : '▶'));
    li.append(open);
    return li;
  }

  open(a, from) {
    const index = this.items.findIndex((x) => x.id === a.id);
    this.lightbox = new Lightbox({
      items: [...this.items],
      index,
      media: this.media,
      more: this.done ? null : async () => {
        const extra = await this.load();
        return extra;
      },
      onClose: () => (this.lightbox = null),
    });
    this.lightbox.show(this.element.closest('.vc-panel') ?? this.element, from);
  }

  /** A live update of one attachment. */
  updateAttachment(fresh) {
    const i = this.items.findIndex((a) => a.id === fresh.id);
    if (i < 0) return;
    this.items[i] = { ...this.items[i], ...fresh };
    const node = this.list.querySelector(`[data-att="${CSS.escape(fresh.id)}"]`);
    node?.replaceWith(this.tile(this.items[i]));
    this.lightbox?.updateAttachment(fresh);
  }
}

function dateLabel(iso) {
  if (!iso) return '';
  return new Date(iso).toLocaleString(undefined, { day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit' });
}
