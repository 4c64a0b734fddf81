// The chat view: one conversation's messages, rendered from a ChatModel.
// It updates what changed (a new bubble, one status) instead of rebuilding
// the list, watches which messages are on screen to mark them read, and
// always offers a way forward: a retry for a failed load or catch-up, a
// clear state for a removed member, a jump to the latest messages.
//
// A sent message has a menu (reply, react, edit, copy, delete; the "⋯"
// button on hover, a long press, or Enter on a focused message), shows its
// quote, reactions and "edited", and turns into a tombstone when deleted.
// Messages are one roving tab stop: the arrow keys move between them.

import { ACCEPT_ATTRIBUTE, formatDuration, readTarget, timeLabel, firstName, messagePreview } from './state.js';
import { insertMention, isDeleted, matchMembers, mentionQuery, menuActions, pruneMentions, quoteOf, reactionToggle } from './lifecycle.js';
import { attachIcon, avatar, button, el, hidden, linkedText, micIcon, moreIcon, presenceDot, reconcile, downIcon, sendIcon, trashIcon } from './dom.js';
import { TrayView, VoiceRecorder, attachmentsBlock, patchAttachments } from './media-view.js';
import { MentionPicker, MessageMenu, composerContext, quoteBlock, reactionChips, reactionsSig, watchLongPress } from './message-view.js';

/** How long a message jumped to stays highlighted. */
const HIGHLIGHT_MS = 3_000;
/** Within this many pixels of the bottom, the reader is "at the latest". */
const AT_END_PX = 60;
const TYPING_SEND_EVERY_MS = 2_000;
/** A press on the mic held at least this long records until released; a shorter one is a tap (tap again to send). */
const HOLD_MS = 400;
/** A recording shorter than this is a slip, not a message. */
const MIN_VOICE_MS = 500;

export class ChatView {
  /**
   * @param {object} o
   * @param {import('./state.js').ChatModel} o.model
   * @param {(userId: number) => string} o.nameOf
   * @param {(userId: number) => boolean} o.isOnline
   * @param {() => boolean} o.canSee the panel is open and the tab visible
   * @param {object} o.actions send(text, {replyTo, mentions}), retrySend, loadOlder, retryLoad, retryGap, typing, read, back, draft,
   *   attach(files), cancelUpload(key), retryUpload(key), removeUpload(key), sendVoice(recording), error(message),
   *   edit(m, text), remove(m), react(m, emoji, on), copy(m), openQuote(reply)
   * @param {import('./state.js').UploadTray} o.tray the files chosen for the next message
   * @param {import('./media-view.js').Media} o.media how attachments load and open
   */
  constructor({ model, nameOf, isOnline, canSee, actions, draft, tray, media, previewOf }) {
    this.model = model;
    this.tray = tray;
    this.media = media;
    this.nameOf = nameOf;
    this.isOnline = isOnline;
    this.canSee = canSee;
    this.actions = actions;
    this.visible = new Set();
    this.newBelow = 0;
    this.positioned = false;
    this.lastTypingSent = 0;
    /** The message that is the list's tab stop (null: the latest). */
    this.activeSeq = null;
    /** The quote of the message being answered, or null. */
    this.replyTo = null;
    /** The message being edited ({ id, seq, content }), or null. */
    this.editing = null;
    /** People picked with "@" in the composer: user id -> the name inserted. */
    this.picked = new Map();

    this.element = el('div', { class: 'vc-chat' });
    this.subtitle = el('p', { class: 'vc-subtitle' });
    this.banner = el('div', { class: 'vc-banner-slot' });
    this.scroller = el('ol', { class: 'vc-messages', 'aria-label': 'Messages', tabindex: '0' });
    this.jump = button('', { class: 'vc-jump', hidden: true }, () => this.scrollToEnd(true));
    this.typingSlot = el('p', { class: 'vc-typing', 'aria-live': 'polite' });
    this.trayView = new TrayView({
      actions: { cancel: (k) => this.actions.cancelUpload(k), retry: (k) => this.actions.retryUpload(k), remove: (k) => this.actions.removeUpload(k) },
      preview: previewOf,
    });
    this.hint = el('p', { class: 'vc-send-hint', 'aria-live': 'polite' });
    this.composer = el('div', { class: 'vc-composer' });
    this.contextSlot = el('div', { class: 'vc-context-slot' });
    const form = this.buildComposer(draft);
    this.composer.append(this.trayView.element, this.contextSlot, this.mentionPicker.element, this.hint, form);
    const body = el('div', { class: 'vc-scroll-area' });
    this.dropZone = el('div', { class: 'vc-drop', 'aria-hidden': 'true' }, 'Drop files to attach');
    body.append(this.scroller, this.jump, this.dropZone);
    this.menu = new MessageMenu(body);
    this.scroller.addEventListener('keydown', (e) => this.onListKey(e));
    this.scroller.addEventListener('focusin', (e) => {
      const seq = Number(e.target.dataset?.seq);
      if (seq && e.target.matches('li[data-seq]') && seq !== this.activeSeq) {
        this.activeSeq = seq;
        this.rove();
      }
    });
    this.element.append(this.subtitle, this.banner, body, this.typingSlot, this.composer);
    this.watchDrops();
    this.renderTray();

    this.scroller.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.observer = new IntersectionObserver((entries) => this.onIntersect(entries), {
      root: this.scroller,
      threshold: [0, 0.5, 1],
    });
  }

  destroy() {
    this.observer.disconnect();
    this.cancelRecording();
    this.menu.close(false);
    clearTimeout(this.highlightTimer);
  }

  buildComposer(draft) {
    const form = el('form', { class: 'vc-compose' });
    const input = el('textarea', { rows: '1', 'aria-label': 'Message', placeholder: 'Write a message…', maxlength: '4000' });
    input.value = draft ?? '';
    const send = el('button', { type: 'submit', class: 'vc-primary' }, 'Send');
    this.sendButton = send;
    this.input = input;
    // Files: a chooser behind the paperclip, a drop on the chat, a paste.
    const picker = el('input', { type: 'file', multiple: true, accept: ACCEPT_ATTRIBUTE, hidden: true, tabindex: '-1' });
    picker.addEventListener('change', () => {
      if (picker.files.length) this.actions.attach([...picker.files]);
      picker.value = '';
    });
    const attach = button(null, { class: 'vc-icon vc-attach', 'aria-label': 'Attach files' }, () => picker.click());
    attach.append(attachIcon());
    input.addEventListener('paste', (e) => {
      const files = [...(e.clipboardData?.files ?? [])];
      if (!files.length) return;
      // A copied image: attach it (the text of a copied file name is not wanted).
      e.preventDefault();
      this.actions.attach(files);
    });
    this.mic = button(null, { class: 'vc-icon vc-mic', 'aria-label': 'Record a voice message' });
    this.mic.append(micIcon());
    this.mic.hidden = !VoiceRecorder.supported;
    // A long press on a phone would open the context menu instead of recording.
    this.mic.addEventListener('contextmenu', (e) => e.preventDefault());
    this.watchMic();
    this.recording = el('div', { class: 'vc-rec', hidden: true });
    this.recTime = el('span', { class: 'vc-rec-time', role: 'timer', 'aria-label': 'Recording time' }, '0:00');
    const cancelRec = button(null, { class: 'vc-icon vc-rec-cancel', 'aria-label': 'Cancel recording' }, () => this.cancelRecording());
    cancelRec.append(trashIcon());
    this.recording.append(cancelRec, el('span', { class: 'vc-rec-dot', 'aria-hidden': 'true' }), el('span', { class: 'vc-rec-label' }, 'Recording'), this.recTime);
    this.updateSend();
    this.mentionPicker = new MentionPicker({ input, onPick: (p) => this.pickMention(p) });
    input.addEventListener('input', () => {
      this.updateSend();
      this.updateMentions();
      // An edit is not a draft: the draft waits under it.
      if (this.editing) return;
      this.actions.draft(input.value);
      const now = Date.now();
      if (input.value && now - this.lastTypingSent > TYPING_SEND_EVERY_MS) {
        this.lastTypingSent = now;
        this.actions.typing();
      }
    });
    // The caret moved into or out of an "@name".
    input.addEventListener('click', () => this.updateMentions());
    input.addEventListener('keyup', (e) => {
      if (e.key === 'ArrowLeft' || e.key === 'ArrowRight' || e.key === 'Home' || e.key === 'End') this.updateMentions();
    });
    input.addEventListener('blur', () => this.mentionPicker.hide());
    input.addEventListener('keydown', (e) => {
      if (e.isComposing) return;
      if (this.mentionPicker.onKey(e)) return;
      if (e.key === 'Escape' && (this.editing || this.replyTo)) {
        // Only the edit or the reply is cancelled, not the panel.
        e.preventDefault();
        e.stopPropagation();
        if (this.editing) this.endEdit();
        else this.cancelReply();
        return;
      }
      if (e.key === 'Enter' && !e.shiftKey) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      if (this.model.status !== 'ready') return;
      if (this.editing) {
        this.finishEdit();
        return;
      }
      const text = input.value;
      if (!this.tray.sendState(text).ok) return;
      // A name taken out of the text is not mentioned.
      const mentions = this.model.isGroup ? pruneMentions(text, this.picked) : [];
      const replyTo = this.replyTo;
      input.value = '';
      this.lastTypingSent = 0;
      this.picked.clear();
      this.mentionPicker.hide();
      this.actions.draft('');
      this.actions.send(text, { replyTo, mentions });
      this.cancelReply(false);
      this.updateSend();
      input.focus();
    });
    form.append(attach, picker, input, this.recording, this.mic, send);
    this.form = form;
    return form;
  }

  /**
   * Send goes when there is text or an uploaded file and nothing is still
   * uploading or failed; the hint beside it says what it waits for.
   */
  updateSend() {
    const state = this.editing ? { ok: Boolean(this.input.value.trim()), why: '' } : this.tray.sendState(this.input.value);
    this.sendButton.disabled = !state.ok;
    if (this.hint.textContent !== state.why) this.hint.textContent = state.why;
  }

  // ---- replies, edits and mentions in the composer --------------------------------

  /** What a quote says: its text, else what the original carries (a photo). */
  quoteText(reply) {
    if (reply.deleted) return '';
    if (reply.content) return reply.content;
    const original = this.model.messages.get(reply.seq);
    return original?.id === reply.id ? messagePreview(original) : '';
  }

  /** The "Replying to…" or "Editing" bar; the composer is described by it, so a screen reader says what Enter will do. */
  setContext(node) {
    this.contextSlot.replaceChildren(...(node ? [node] : []));
    const text = node?.querySelector('.vc-context-text');
    if (text) {
      text.id = `vc-context-${this.model.id}`;
      this.input.setAttribute('aria-describedby', text.id);
    } else {
      this.input.removeAttribute('aria-describedby');
    }
  }

  startReply(m) {
    if (this.editing) this.endEdit();
    this.replyTo = quoteOf(m);
    const quote = this.quoteText(this.replyTo) || messagePreview(m);
    this.setContext(composerContext({ mode: 'reply', name: this.nameOf(m.sender_id), quote, onCancel: () => this.cancelReply() }));
    this.input.focus();
  }

  cancelReply(focus = true) {
    if (!this.replyTo) return;
    this.replyTo = null;
    this.setContext(null);
    if (focus) this.input.focus();
  }

  /** The composer takes the message's text; Enter saves, Escape puts the draft back. */
  startEdit(m) {
    this.cancelReply(false);
    if (!this.editing) this.savedDraft = this.input.value;
    this.editing = { id: m.id, seq: m.seq, content: m.content };
    this.mentionPicker.hide();
    this.input.value = m.content;
    this.sendButton.textContent = 'Save';
    this.setContext(composerContext({ mode: 'edit', onCancel: () => this.endEdit() }));
    this.updateSend();
    this.input.focus();
    this.input.setSelectionRange(this.input.value.length, this.input.value.length);
  }

  finishEdit() {
    const editing = this.editing;
    const text = this.input.value;
    if (!text.trim()) return;
    if (text !== editing.content) this.actions.edit(editing, text);
    this.endEdit();
  }

  endEdit() {
    if (!this.editing) return;
    this.editing = null;
    this.input.value = this.savedDraft ?? '';
    this.savedDraft = null;
    this.sendButton.textContent = 'Send';
    this.setContext(null);
    this.updateSend();
    this.input.focus();
  }

  /** In a group, "@" followed by the start of a name offers the members it fits. */
  updateMentions() {
    const input = this.input;
    const q = this.model.isGroup && !this.editing && input.selectionStart === input.selectionEnd ? mentionQuery(input.value, input.selectionStart) : null;
    if (!q) {
      this.mentionPicker.hide();
      return;
    }
    this.mentionPicker.show(matchMembers(this.model.others(), q.query));
  }

  pickMention(p) {
    const input = this.input;
    const q = mentionQuery(input.value, input.selectionStart);
    if (!q) return;
    const next = insertMention(input.value, q.start, input.selectionStart, p.full_name);
    input.value = next.text;
    input.setSelectionRange(next.caret, next.caret);
    this.picked.set(p.user_id, p.full_name);
    this.mentionPicker.hide();
    this.actions.draft(input.value);
    this.updateSend();
    input.focus();
  }

  /** The tray changed (a file added, progress, done, failed, removed). */
  renderTray() {
    this.trayView.render(this.tray);
    this.updateSend();
  }

  watchDrops() {
    const hasFiles = (e) => [...(e.dataTransfer?.types ?? [])].includes('Files');
    let depth = 0;
    this.element.addEventListener('dragenter', (e) => {
      if (!hasFiles(e) || this.model.status !== 'ready') return;
      depth += 1;
      this.element.classList.add('vc-dropping');
    });
    this.element.addEventListener('dragover', (e) => {
      if (!hasFiles(e) || this.model.status !== 'ready') return;
      e.preventDefault();
      e.dataTransfer.dropEffect = 'copy';
    });
    this.element.addEventListener('dragleave', () => {
      depth = Math.max(0, depth - 1);
      if (!depth) this.element.classList.remove('vc-dropping');
    });
    this.element.addEventListener('drop', (e) => {
      depth = 0;
      this.element.classList.remove('vc-dropping');
      if (!hasFiles(e) || this.model.status !== 'ready') return;
      e.preventDefault();
      const files = [...e.dataTransfer.files];
      if (files.length) this.actions.attach(files);
    });
  }

  // ---- voice messages ---------------------------------------------------------

  /**
   * The mic: hold to record and release to send, or tap to start and tap
   * (the same button, now "Send voice message") to send; Cancel throws the
   * recording away. The keyboard taps.
   */
  watchMic() {
    let pressedAt = 0;
    let fromPointer = false;
    this.mic.addEventListener('pointerdown', (e) => {
      if (e.button !== 0 || this.recorder) return;
      fromPointer = true;
      pressedAt = performance.now();
      this.startRecording();
      const up = () => {
        // Held: release sends. A tap (or a release before the microphone
        // was granted) leaves it recording until the next tap.
        const held = performance.now() - pressedAt >= HOLD_MS;
        if (held && this.recorder?.startedAt) this.finishRecording();
      };
      window.addEventListener('pointerup', up, { once: true });
    });
    this.mic.addEventListener('click', () => {
      if (fromPointer) {
        // The click that ends the press that started: the press did its part.
        fromPointer = false;
        return;
      }
      if (this.recorder) this.finishRecording();
      else this.startRecording();
    });
  }

  async startRecording() {
    if (this.recorder || this.model.status !== 'ready') return;
    const recorder = new VoiceRecorder();
    this.recorder = recorder;
    try {
      await recorder.start();
    } catch (e) {
      if (this.recorder === recorder) this.recorder = null;
      recorder.release();
      this.actions.error(e.name === 'NotAllowedError' ? 'The microphone is blocked: allow it in the browser to record voice messages.' : 'The microphone could not be used to record.');
      return;
    }
    if (this.recorder !== recorder) {
      recorder.cancel(); // cancelled while the microphone was being granted
      return;
    }
    this.showRecording(true);
    this.recTimer = setInterval(() => (this.recTime.textContent = formatDuration(recorder.elapsed)), 250);
  }

  async finishRecording() {
    const recorder = this.recorder;
    if (!recorder?.startedAt) return;
    this.recorder = null;
    this.showRecording(false);
    if (recorder.elapsed < MIN_VOICE_MS) {
      recorder.cancel();
      this.actions.error('Too short: hold the microphone button while you speak, or tap it to start and tap again to send.');
      return;
    }
    this.actions.sendVoice(await recorder.stop());
  }

  cancelRecording() {
    const recorder = this.recorder;
    this.recorder = null;
    recorder?.cancel();
    if (this.form) this.showRecording(false);
  }

  showRecording(on) {
    clearInterval(this.recTimer);
    this.form.classList.toggle('vc-recording', on);
    this.recording.hidden = !on;
    this.recTime.textContent = '0:00';
    this.mic.replaceChildren(on ? sendIcon() : micIcon());
    this.mic.setAttribute('aria-label', on ? 'Send voice message' : 'Record a voice message');
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
    this.rove();
    // A message made again (deleted meanwhile) takes its menu with it.
    if (this.menu.isOpen && !this.menu.anchor?.isConnected) this.menu.close(false);
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
    // A thumbnail ready, a failure: only that attachment is made again (a
    // video playing next to it plays on).
    const atts = item.m ? item.m.attachments : item.attachments;
    if (atts?.length) patchAttachments(node.querySelector('.vc-atts'), atts, this.media);
    // An edit, a reaction, a quote whose original changed: only that part.
    if (item.m && !item.deleted && node.dataset.life !== this.lifeSig(item.m)) this.patchLife(node, item.m);
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
    if (item.kind === 'message') {
      li.dataset.seq = String(item.seq);
      li.dataset.id = m.id;
      li.tabIndex = -1;
    } else {
      li.dataset.pending = item.id;
    }
    const sender = m ? m.sender_id : null;
    if (!mine && item.first) {
      li.append(avatar(sender, this.nameOf(sender)));
      if (this.model.isGroup) li.append(el('span', { class: 'vc-sender' }, this.nameOf(sender)));
      else li.append(hidden(`${this.nameOf(sender)}:`));
    }
    if (item.deleted) {
      // A tombstone: who and when, nothing to answer, copy or react to.
      li.classList.add('vc-deleted');
      li.append(el('span', { class: 'vc-tombstone' }, 'Message deleted'));
      if (showsMeta(item)) li.append(this.meta(item));
      else li.title = timeLabel(new Date(m.created_at));
      return li;
    }
    if (item.mentioned) {
      li.classList.add('vc-mentioned');
      li.append(hidden('Mentions you.'));
    }
    const reply = m ? m.reply_to : item.replyTo;
    if (reply) li.append(this.quote(reply));
    const text = m ? m.content : item.content;
    const atts = (m ? m.attachments : item.attachments) ?? [];
    if (text || !atts.length) li.append(linkedText(text, m ? this.mentionNames(m) : []));
    if (atts.length) {
      li.classList.add('vc-has-media');
      li.append(attachmentsBlock(atts, this.media));
    }
    if (m) {
      li.vcContent = m.content;
      li.append(this.editedLabel(m), this.chips(m));
      li.dataset.life = this.lifeSig(m);
      const more = button(null, { class: 'vc-more-btn', 'aria-label': 'Message actions', 'aria-haspopup': 'menu', 'aria-expanded': 'false', tabindex: '-1' }, (e) => {
        e.stopPropagation();
        if (this.menu.isOpen && this.menu.anchor === li) this.menu.close(true);
        else this.openMenu(li);
      });
      more.append(moreIcon());
      li.append(more);
      watchLongPress(li, () => this.openMenu(li));
      li.addEventListener('contextmenu', (e) => this.onContextMenu(e, li));
    }
    // A group's time and status show once, under its last bubble (and
    // wherever a status must be seen); the rest keep it as a tooltip.
    if (showsMeta(item)) li.append(this.meta(item));
    else li.title = timeLabel(new Date(m ? m.created_at : item.at));
    return li;
  }

  // ---- a sent message's life ------------------------------------------------------

  /** The names of the people a message mentions, to set them off in its text. */
  mentionNames(m) {
    return (m.mentions ?? []).map((u) => (u === this.model.me ? this.model.participants.get(u)?.full_name : this.nameOf(u))).filter((n) => n && n !== 'Someone');
  }

  quote(reply) {
    return quoteBlock(reply, { nameOf: (u) => this.nameOf(u), textOf: (r) => this.quoteText(r), onOpen: (r) => this.actions.openQuote(r) });
  }

  editedLabel(m) {
    const label = el('span', { class: 'vc-edited', hidden: !m.edited_at }, 'edited');
    if (m.edited_at) label.title = `Edited ${new Date(m.edited_at).toLocaleString()}`;
    return label;
  }

  chips(m) {
    return reactionChips(m.reactions, {
      me: this.model.me,
      nameOf: (u) => this.nameOf(u),
      onToggle: (emoji, on) => this.actions.react(this.model.messages.get(m.seq) ?? m, emoji, on),
    });
  }

  lifeSig(m) {
    const r = m.reply_to;
    return JSON.stringify([m.content, m.edited_at ?? '', reactionsSig(m.reactions, this.model.me), r ? [r.content, r.deleted, this.quoteText(r)] : null]);
  }

  /** Patches what a change frame changed: the text, "edited", the chips, the quote. */
  patchLife(node, m) {
    if (node.vcContent !== m.content) {
      const text = linkedText(m.content, this.mentionNames(m));
      const old = node.querySelector(':scope > .vc-text');
      if (old) old.replaceWith(text);
      else if (m.content) node.querySelector(':scope > .vc-atts, :scope > .vc-edited')?.before(text);
      node.vcContent = m.content;
    }
    node.querySelector(':scope > .vc-edited')?.replaceWith(this.editedLabel(m));
    node.querySelector(':scope > .vc-reactions')?.replaceWith(this.chips(m));
    if (m.reply_to) node.querySelector(':scope > .vc-quote')?.replaceWith(this.quote(m.reply_to));
    node.dataset.life = this.lifeSig(m);
  }

  /** The message menu for a bubble, with what the reader may do to that message. */
  openMenu(li) {
    const seq = Number(li.dataset.seq);
    const m = this.model.messages.get(seq);
    if (!m || this.model.status !== 'ready') return;
    const actions = menuActions(m, this.model.permissions);
    if (!actions.length) return;
    this.activeSeq = seq;
    this.rove();
    this.menu.open({ anchor: li, actions, pick: (action, arg) => this.onMenu(action, seq, arg) });
  }

  onMenu(action, seq, arg) {
    const m = this.model.messages.get(seq);
    if (!m || isDeleted(m)) return;
    switch (action) {
      case 'reply':
        this.startReply(m);
        break;
      case 'edit':
        this.startEdit(m);
        break;
      case 'copy':
        this.actions.copy(m);
        break;
      case 'delete':
        this.actions.remove(m);
        break;
      case 'react':
        // An emoji the reader already put there is taken back.
        this.actions.react(m, arg, reactionToggle(m, arg, this.model.me));
        break;
      default:
        break;
    }
  }

  /**
   * A right click (or Android's long press) opens the message menu, unless
   * it is on a link or media, or text in the bubble is selected: the
   * browser's own menu is better for those.
   */
  onContextMenu(e, li) {
    if (this.menu.isOpen && this.menu.anchor === li) {
      e.preventDefault();
      return;
    }
    if (e.target.closest('a, img, video, audio, input')) return;
    const selection = getSelection();
    if (selection && !selection.isCollapsed && li.contains(selection.anchorNode)) return;
    e.preventDefault();
    this.openMenu(li);
  }

  /** Keys on a focused message: Up and Down move, Enter or the menu key opens its menu. */
  onListKey(e) {
    const li = e.target;
    if (!li.matches?.('li[data-seq]')) return; // a link's or a chip's own keys
    const all = [...this.scroller.querySelectorAll('li[data-seq]')];
    const i = all.indexOf(li);
    let next = null;
    if (e.key === 'ArrowDown') next = all[i + 1];
    else if (e.key === 'ArrowUp') next = all[i - 1];
    else if (e.key === 'Home' && e.ctrlKey) next = all[0];
    else if (e.key === 'End' && e.ctrlKey) next = all[all.length - 1];
    else if (e.key === 'Enter' || e.key === 'ContextMenu' || (e.key === 'F10' && e.shiftKey)) {
      e.preventDefault();
      this.openMenu(li);
      return;
    } else {
      return;
    }
    e.preventDefault();
    if (!next) return;
    this.activeSeq = Number(next.dataset.seq);
    this.rove();
    next.focus();
    next.scrollIntoView({ block: 'nearest' });
  }

  /** One message is the list's tab stop: the one last focused, else the latest. */
  rove() {
    const bubbles = this.scroller.querySelectorAll('li[data-seq]');
    let current = this.activeSeq != null ? this.scroller.querySelector(`li[data-seq="${this.activeSeq}"]`) : null;
    if (!current) current = bubbles[bubbles.length - 1];
    for (const b of bubbles) {
      const t = b === current ? '0' : '-1';
      if (b.getAttribute('tabindex') !== t) b.setAttribute('tabindex', t);
    }
  }

  /**
   * Scrolls to a loaded message and highlights it for a moment (a quote's
   * original, a search hit), with the focus on it. False: it is not loaded.
   */
  highlight(seq) {
    const li = this.scroller.querySelector(`li[data-seq="${seq}"]`);
    if (!li) return false;
    this.positioned = true;
    li.scrollIntoView({ block: 'center' });
    li.classList.remove('vc-highlight');
    void li.offsetWidth; // restarts the animation for a second jump to it
    li.classList.add('vc-highlight');
    clearTimeout(this.highlightTimer);
    this.highlightTimer = setTimeout(() => li.classList.remove('vc-highlight'), HIGHLIGHT_MS);
    this.activeSeq = seq;
    this.rove();
    li.focus({ preventScroll: true });
    return true;
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
    // The menu floats over the list: it follows its message.
    if (this.menu.isOpen) this.menu.place();
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
  const atts = (item.m ? item.m.attachments : item.attachments) ?? [];
  const reply = item.m ? item.m.reply_to : item.replyTo;
  return `${item.kind}|${item.first ? 1 : 0}|${atts.length}|${item.deleted ? 'x' : ''}|${reply ? 'r' : ''}|${item.mentioned ? '@' : ''}`;
}

export function statusLabel(status) {
  return { sending: 'Sending…', sent: 'Sent', delivered: 'Delivered', read: 'Read', failed: 'Not sent' }[status] ?? status;
}
