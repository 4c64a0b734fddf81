// Web Push on this device: the service worker, the browser's permission and
// subscription, and the origin's record of it. Permission is asked only from
// a user's click ("Turn on notifications"), never on load.

const STATE_KEY = 'vibe-chat-push';
const SUBSCRIBE_TIMEOUT_MS = 15_000;

export class Push {
  /**
   * @param {import('./api.js').Api} api
   * @param {string} worker the service worker's URL. It must be on the
   *   page's origin: a host page on another origin serves a copy of
   *   push-sw.js itself and passes its URL to mountChatBox.
   */
  constructor(api, worker = new URL('./push-sw.js', import.meta.url).href) {
    this.api = api;
    this.worker = worker;
    // A scope no page lives under: the worker controls nothing, so an
    // embedding page's own service worker keeps its pages.
    this.scope = new URL('./vibe-chat-push/', worker).href;
  }

  get supported() {
    return 'serviceWorker' in navigator && 'PushManager' in window && 'Notification' in window && new URL(this.worker).origin === location.origin;
  }

  /** 'unsupported' | 'blocked' | 'off' | 'on' */
  async status(userId) {
    if (!this.supported) return 'unsupported';
    if (Notification.permission === 'denied') return 'blocked';
    const saved = this.saved();
    if (!saved || saved.user !== userId) return 'off';
    const reg = await navigator.serviceWorker.getRegistration(this.scope);
    const sub = await reg?.pushManager.getSubscription();
    return sub && sub.endpoint === saved.endpoint ? 'on' : 'off';
  }

  /** The service worker, registered (once) under its own scope. */
  register() {
    return navigator.serviceWorker.register(this.worker, { scope: this.scope, type: 'classic' });
  }

  /** Call from a click: asks for permission, subscribes, tells the origin. */
  async enable(userId) {
    if (!this.supported) throw new Error('This browser cannot show notifications from this page.');
    const permission = await Notification.requestPermission();
    if (permission === 'denied') throw new Error('Notifications are blocked for this site in the browser’s settings.');
    if (permission !== 'granted') throw new Error('Notifications were not allowed.');
    const reg = await this.register();
    // Not `navigator.serviceWorker.ready`: that waits for a worker whose
    // scope covers this page, which this one's never does.
    await activated(reg);
    const { key } = await this.api.vapidKey();
    let sub;
    try {
      // A browser that cannot reach its push service may never answer.
      sub = await Promise.race([
        reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: fromBase64Url(key) }),
        new Promise((_, fail) => setTimeout(() => fail(new Error('its push service did not answer')), SUBSCRIBE_TIMEOUT_MS)),
      ]);
    } catch (e) {
      throw new Error(`This browser could not subscribe to notifications (${e.message}).`);
    }
    const json = sub.toJSON();
    const saved = await this.api.addPushSubscription({ endpoint: json.endpoint, keys: json.keys });
    localStorage.setItem(STATE_KEY, JSON.stringify({ id: saved.id, endpoint: json.endpoint, user: userId }));
  }

  /** Unsubscribes here and at the origin. */
  async disable() {
    const saved = this.saved();
    localStorage.removeItem(STATE_KEY);
    const reg = this.supported ? await navigator.serviceWorker.getRegistration(this.scope) : null;
    await (await reg?.pushManager.getSubscription())?.unsubscribe().catch(() => {});
    if (saved?.id) await this.api.deletePushSubscription(saved.id).catch(() => {});
  }

  /** Logging out: the origin drops the session's subscription itself. */
  async forget() {
    localStorage.removeItem(STATE_KEY);
    const reg = this.supported ? await navigator.serviceWorker.getRegistration(this.scope).catch(() => null) : null;
    await (await reg?.pushManager.getSubscription())?.unsubscribe().catch(() => {});
  }

  saved() {
    try {
      return JSON.parse(localStorage.getItem(STATE_KEY));
    } catch {
      return null;
    }
  }
}

function activated(reg) {
  if (reg.active) return Promise.resolve();
  const worker = reg.installing || reg.waiting;
  return new Promise((ok, fail) => {
    worker.addEventListener('statechange', () => {
      if (worker.state === 'activated') ok();
      if (worker.state === 'redundant') fail(new Error('The notification worker could not start.'));
    });
  });
}

function fromBase64Url(s) {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(s.length / 4) * 4, '=');
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}
