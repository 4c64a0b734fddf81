// Notification settings: this device's push subscription and the user's
// privacy and quiet hours (NotificationsView), and one conversation's level
// and mute (ChatNotificationsView).

import { button, el, labelled } from './dom.js';

const MUTES = [
  ['1 hour', 3_600_000],
  ['8 hours', 8 * 3_600_000],
  ['1 week', 7 * 86_400_000],
];

export class NotificationsView {
  constructor({ api, push, userId }) {
    this.api = api;
    this.push = push;
    this.userId = userId;
    this.element = el('div', { class: 'vc-form' });
    this.device = el('div', { class: 'vc-setting' });
    this.error = el('p', { class: 'vc-error', role: 'alert' });
    this.saved = el('p', { class: 'vc-hint', role: 'status' });
    this.prefs = el('form', { class: 'vc-setting', novalidate: true });
    this.element.append(el('h3', { class: 'vc-section' }, 'This device'), this.device, this.error, el('h3', { class: 'vc-section' }, 'What notifications show'), this.prefs, this.saved);
    this.renderDevice();
    this.loadPrefs();
  }

  async renderDevice() {
    const status = await this.push.status(this.userId);
    const text = {
      unsupported: 'This browser cannot show notifications from this page.',
      blocked: 'Notifications are blocked for this site in the browser’s settings.',
      off: 'Notifications are off on this device.',
      on: 'Notifications are on: new messages reach you here when Vibe Chat is closed.',
    }[status];
    const parts = [el('p', { class: 'vc-hint' }, text)];
    if (status === 'off') parts.push(button('Turn on notifications', { class: 'vc-primary' }, () => this.run(() => this.push.enable(this.userId))));
    if (status === 'on') parts.push(button('Turn off notifications', { class: 'vc-secondary' }, () => this.run(() => this.push.disable())));
    this.device.replaceChildren(...parts);
  }

  async run(action) {
    this.error.textContent = '';
    try {
      await action();
    } catch (e) {
      this.error.textContent = e.message;
    }
    await this.renderDevice();
  }

  async loadPrefs() {
    let settings;
    try {
      settings = await this.api.pushSettings();
    } catch (e) {
      this.prefs.replaceChildren(el('p', { class: 'vc-error', role: 'alert' }, `Your notification settings could not be loaded: ${e.message}.`), button('Try again', { class: 'vc-secondary' }, () => this.loadPrefs()));
      return;
    }
    const content = el('input', { type: 'checkbox', name: 'show_content' });
    content.checked = settings.show_content;
    const contentLabel = el('label', { class: 'vc-check' });
    contentLabel.append(content, el('span', {}, 'Show the message text in notifications'));
    const contentHint = el('p', { class: 'vc-hint' }, 'Off by default: a notification then says only who wrote, so nobody reads your chat over your shoulder.');

    const quiet = el('input', { type: 'checkbox', name: 'quiet' });
    quiet.checked = Boolean(settings.quiet_hours);
    const quietLabel = el('label', { class: 'vc-check' });
    quietLabel.append(quiet, el('span', {}, 'Quiet hours (no notifications)'));
    const zone = settings.quiet_hours?.time_zone ?? Intl.DateTimeFormat().resolvedOptions().timeZone ?? 'UTC';
    const start = el('input', { type: 'time', name: 'start', value: settings.quiet_hours?.start ?? '22:00' });
    const end = el('input', { type: 'time', name: 'end', value: settings.quiet_hours?.end ?? '07:00' });
    const times = el('div', { class: 'vc-inline-form' });
    times.append(labelled('From', start), labelled('To', end));
    const zoneNote = el('p', { class: 'vc-hint' }, `Times are in ${zone}.`);
    const sync = () => {
      start.disabled = !quiet.checked;
      end.disabled = !quiet.checked;
    };
    quiet.addEventListener('change', sync);
    sync();
    const save = el('button', { type: 'submit', class: 'vc-secondary' }, 'Save');
    this.prefs.replaceChildren(contentLabel, contentHint, quietLabel, times, zoneNote, save);
    this.prefs.onsubmit = async (e) => {
      e.preventDefault();
      this.saved.textContent = '';
      this.error.textContent = '';
      try {
        await this.api.savePushSettings({
          show_content: content.checked,
          quiet_hours: quiet.checked ? { start: start.value, end: end.value, time_zone: zone } : null,
        });
        this.saved.textContent = 'Saved.';
      } catch (ex) {
        this.error.textContent = ex.message;
      }
    };
  }
}

/** One conversation: all messages or none, and a mute for a while. */
export class ChatNotificationsView {
  constructor({ api, conversationId }) {
    this.api = api;
    this.id = conversationId;
    this.element = el('div', { class: 'vc-form' });
    this.error = el('p', { class: 'vc-error', role: 'alert' });
    this.status = el('p', { class: 'vc-hint', role: 'status' });
    this.body = el('div');
    this.element.append(this.body, this.status, this.error);
    this.load();
  }

  async load() {
    try {
      this.render(await this.api.conversationNotifications(this.id));
    } catch (e) {
      this.body.replaceChildren(el('p', { class: 'vc-error', role: 'alert' }, `These settings could not be loaded: ${e.message}.`), button('Try again', { class: 'vc-secondary' }, () => this.load()));
    }
  }

  async save(prefs) {
    this.error.textContent = '';
    try {
      this.render(await this.api.saveConversationNotifications(this.id, prefs));
      this.status.textContent = 'Saved.';
    } catch (e) {
      this.error.textContent = e.message;
    }
  }

  render(prefs) {
    this.prefs = prefs;
    const group = el('fieldset', { class: 'vc-fieldset' });
    group.append(el('legend', {}, 'Notify me about'));
    for (const [value, text] of [
      ['all', 'Every new message'],
      ['none', 'Nothing'],
    ]) {
      const input = el('input', { type: 'radio', name: 'level', value });
      input.checked = prefs.level === value || (value === 'none' && prefs.level === 'mentions');
      input.addEventListener('change', () => this.save({ ...this.prefs, level: value }));
      const label = el('label', { class: 'vc-check' });
      label.append(input, el('span', {}, text));
      group.append(label);
    }
    const mute = el('div', { class: 'vc-setting' });
    const until = prefs.muted_until && Date.parse(prefs.muted_until) > Date.now() ? new Date(prefs.muted_until) : null;
    if (until) {
      mute.append(
        el('p', {}, `Muted until ${until.toLocaleString([], { weekday: 'short', hour: '2-digit', minute: '2-digit' })}.`),
        button('Unmute', { class: 'vc-secondary' }, () => this.save({ ...this.prefs, muted_until: null })),
      );
    } else {
      const row = el('div', { class: 'vc-inline-form', role: 'group', 'aria-label': 'Mute' });
      row.append(el('span', { class: 'vc-hint' }, 'Mute for'));
      for (const [text, ms] of MUTES) {
        row.append(button(text, { class: 'vc-secondary' }, () => this.save({ ...this.prefs, muted_until: new Date(Date.now() + ms).toISOString() })));
      }
      mute.append(row);
    }
    this.body.replaceChildren(group, mute);
  }
}
