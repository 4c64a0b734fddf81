// The ChatBox's service worker: shows Web Push notifications and opens the
// conversation when one is clicked. It controls no page: it is registered
// with a scope no page lives under (see push.js), so an embedding page's
// own service worker keeps its scope; push events reach a registration
// whatever its scope.
//
// Payloads (decrypted by the browser; the origin sends them):
//   {"type":"message","conversation_id","seq","count","title","body","tag","url"}
//   {"type":"clear","conversation_id","tag"}   the user read it on some device

/* eslint-env serviceworker */

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  let data = null;
  try {
    data = event.data ? event.data.json() : null;
  } catch {
    data = null;
  }
  event.waitUntil(handle(data));
});

async function handle(data) {
  if (data && data.type === 'clear') {
    for (const n of await self.registration.getNotifications({ tag: data.tag })) n.close();
    return;
  }
  if (!data || data.type !== 'message') {
    // Browsers require a visible notification for a push; say something
    // true rather than nothing.
    await self.registration.showNotification('Vibe Chat', { body: 'You have new messages.', tag: 'vibe-chat' });
    return;
  }
  await self.registration.showNotification(data.title || 'Vibe Chat', {
    body: data.body || 'New message',
    // One notification per conversation: a later push replaces it.
    tag: data.tag || `conversation-${data.conversation_id}`,
    renotify: true,
    data: { conversation_id: data.conversation_id, url: data.url || `/?conversation=${data.conversation_id}` },
  });
}

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const { conversation_id: id, url } = event.notification.data || {};
  const work = openConversation(id, url);
  try {
    event.waitUntil(work);
  } catch {
    // Only a browser-made (trusted) event can extend the worker's life;
    // the work still runs for a synthetic one.
  }
});

/** Focuses a tab with the ChatBox and tells it which chat to open; else opens one. */
async function openConversation(id, url) {
  const tabs = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
  for (const tab of tabs) {
    if (new URL(tab.url).origin !== self.location.origin) continue;
    tab.postMessage({ type: 'vibe-chat-open', conversation_id: id });
    if ('focus' in tab) await tab.focus();
    return;
  }
  await self.clients.openWindow(new URL(url || '/', self.location.origin).href);
}
