// Browser tests of the ChatBox: two users in two browser contexts (see
// harness.mjs for the browser, the runner and the shared helpers).

import * as h from './harness.mjs';
import { EDGE, TIMEOUT, test, shot, axe, until, expectEqual, composer, bubble, rest, sendBurst } from './harness.mjs';

const browser = await h.launch();
/** A signed-in ChatBox in its own browser context. */
const open = (email, options) => h.open(browser, email, options);

/** Pretends the tab is hidden (or visible again), as switching tabs would. */
async function setHidden(page, hidden) {
  await page.evaluate((hidden) => {
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => hidden });
    Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => (hidden ? 'hidden' : 'visible') });
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
}

/** Is the element inside the message list's visible area? */
async function onScreen(page, locator) {
  const box = await locator.boundingBox();
  const list = await page.locator('.vc-messages').boundingBox();
  return Boolean(box && list && box.y >= list.y - 1 && box.y + box.height <= list.y + list.height + 1);
}

const toList = async (page) => {
  const back = page.getByRole('button', { name: 'Back to conversations' });
  if (await back.count()) await back.click();
  await page.getByRole('tab', { name: 'Chats' }).click();
};
const conversationId = (page, title) => page.locator('.vc-row', { hasText: title }).first().getAttribute('data-conversation-id').then(Number);

async function send(page, text) {
  await composer(page).fill(text);
  await composer(page).press('Enter');
  await bubble(page, text).waitFor();
}

let alex;
let sam;

await test('the login form refuses a wrong password with a clear message', async () => {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(`${EDGE}/`);
  await shot(page, 'login');
  await axe(page, 'login');
  // The dev build offers its demo accounts (production has none to offer).
  await page.getByRole('button', { name: 'sam@vibe.fit' }).waitFor();
  await page.getByLabel('Email').fill('alex@vibe.fit');
  await page.getByLabel('Password').fill('not the password');
  await page.getByRole('button', { name: 'Log in', exact: true }).click();
  await page.getByRole('alert').filter({ hasText: 'Wrong email or password' }).waitFor();
  await context.close();
});

await test('alex and sam log in and see each other online', async () => {
  alex = await open('alex@vibe.fit');
  sam = await open('sam@vibe.fit');
  await alex.page.getByRole('tab', { name: 'People' }).click();
  await alex.page.getByRole('button', { name: /^Sam Patel member Online$/i }).waitFor();
  await sam.page.getByRole('tab', { name: 'People' }).click();
  await sam.page.getByRole('button', { name: /^Alex Rivera member Online$/i }).waitFor();
  await shot(alex.page, 'active-users');
  await axe(alex.page, 'people');
});

await test('people search finds anyone by name or email and goes back to the contacts', async () => {
  await alex.page.getByRole('tab', { name: 'People' }).click();
  const search = alex.page.getByRole('searchbox', { name: 'Find people by name or email' });
  const results = alex.page.getByRole('list', { name: 'Search results' });
  await search.fill('cas');
  await results.getByRole('button', { name: /^Casey Coach trainer/i }).waitFor();
  expectEqual(await results.getByRole('button').count(), 1, 'people whose name starts with "cas"');
  await search.fill('sam@');
  await results.getByRole('button', { name: /^Sam Patel member/i }).waitFor();
  await search.fill('zzz-nobody');
  await alex.page.getByText('Nobody found for “zzz-nobody”.').waitFor();
  // The box keeps focus while results come and go.
  expectEqual(await search.evaluate((n) => n === document.activeElement), true, 'search keeps focus');
  await search.fill('');
  await alex.page.getByRole('list', { name: 'People' }).getByRole('button', { name: /^Sam Patel/ }).waitFor();
});

await test('alex starts a direct chat and they exchange messages both ways', async () => {
  await alex.page.getByRole('button', { name: /^Sam Patel/ }).click();
  await alex.page.locator('.vc-title', { hasText: 'Sam Patel' }).waitFor();
  await send(alex.page, 'Hi Sam! Leg day at 7?');
  // Sam sees the unread count on the conversation, opens it, replies.
  await sam.page.getByRole('tab', { name: 'Chats' }).click();
  const row = sam.page.locator('.vc-row', { hasText: 'Alex Rivera' });
  await row.locator('.vc-unread', { hasText: '1' }).waitFor();
  await shot(sam.page, 'conversations');
  await axe(sam.page, 'chats');
  await row.click();
  await bubble(sam.page, 'Hi Sam! Leg day at 7?').waitFor();
  await send(sam.page, 'See you there!');
  await bubble(alex.page, 'See you there').waitFor();
});

await test('typing shows on the other side and read status reaches the sender', async () => {
  await composer(sam.page).fill('typing a long reply');
  await alex.page.locator('.vc-typing', { hasText: 'Sam is typing' }).waitFor();
  await composer(sam.page).fill('');
  await send(alex.page, 'Bring water');
  // Sam has the chat open and visible, so it is read.
  await bubble(sam.page, 'Bring water').waitFor();
  await alex.page.locator('.vc-bubble[data-status="read"]', { hasText: 'Bring water' }).waitFor();
  // "Read" shows once: on the last message the other side read.
  expectEqual(await alex.page.locator('.vc-status-read').count(), 1, 'bubbles saying Read');
  await shot(alex.page, 'chat');
  await axe(alex.page, 'chat');
});

await test('the send button is disabled while the input is empty', async () => {
  const button = alex.page.getByRole('button', { name: 'Send' });
  await composer(alex.page).fill('');
  expectEqual(await button.isDisabled(), true, 'disabled when empty');
  await composer(alex.page).fill('   ');
  expectEqual(await button.isDisabled(), true, 'disabled when blank');
  await composer(alex.page).fill('x');
  expectEqual(await button.isDisabled(), false, 'enabled with text');
  await composer(alex.page).fill('');
});

await test('the launcher badge counts unread messages while the panel is closed', async () => {
  await alex.page.getByRole('button', { name: /Close chat/ }).click();
  await send(sam.page, 'One');
  await send(sam.page, 'Two');
  await alex.page.locator('.vc-badge', { hasText: '2' }).waitFor();
  // Its name carries what the badge shows.
  await alex.page.getByRole('button', { name: 'Open chat, 2 unread' }).waitFor();
  await shot(alex.page, 'launcher-badge');
  await alex.page.getByRole('button', { name: /Open chat/ }).click();
  await bubble(alex.page, 'Two').waitFor();
  await alex.page.locator('.vc-badge').waitFor({ state: 'hidden' });
});

await test('a reload mid-chat keeps the session and the history', async () => {
  await alex.page.reload();
  await bubble(alex.page, 'Hi Sam! Leg day at 7?').waitFor();
  await bubble(alex.page, 'Two').waitFor();
  await send(alex.page, 'Back after a reload');
  await bubble(sam.page, 'Back after a reload').waitFor();
  const seqs = await alex.page.locator('.vc-bubble[data-seq]').evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
  const unique = new Set(seqs);
  expectEqual(unique.size, seqs.length, 'no duplicated message');
  expectEqual(seqs.join(','), [...seqs].sort((a, b) => a - b).join(','), 'messages in seq order');
});

await test('a message sent while offline shows as sending and goes out once on reconnect', async () => {
  await alex.context.setOffline(true);
  // The socket notices the network is gone when it next tries to use it.
  await alex.page.locator('.vc-conn', { hasText: /Reconnecting|Connecting/ }).waitFor();
  await composer(alex.page).fill('Sent from the tunnel');
  await composer(alex.page).press('Enter');
  await alex.page.locator('.vc-bubble[data-status="sending"]', { hasText: 'Sent from the tunnel' }).waitFor();
  await alex.context.setOffline(false);
  await bubble(sam.page, 'Sent from the tunnel').waitFor({ timeout: 30_000 });
  await alex.page.locator('.vc-bubble[data-seq]', { hasText: 'Sent from the tunnel' }).waitFor({ timeout: 30_000 });
  expectEqual(await bubble(sam.page, 'Sent from the tunnel').count(), 1, 'delivered once');
  expectEqual(await bubble(alex.page, 'Sent from the tunnel').count(), 1, 'one bubble for the sender');
});

await test('with sam forced to SSE the conversation works the same', async () => {
  await sam.context.close();
  sam = await open('sam@vibe.fit', { query: '?transport=sse' });
  await sam.page.locator('.vc-conn', { hasText: 'Connected (SSE)' }).waitFor();
  await sam.page.locator('.vc-row', { hasText: 'Alex Rivera' }).click();
  await bubble(sam.page, 'Back after a reload').waitFor();
  await send(sam.page, 'Now over SSE');
  await bubble(alex.page, 'Now over SSE').waitFor();
  await send(alex.page, 'Reply to SSE');
  await bubble(sam.page, 'Reply to SSE').waitFor();
  await composer(sam.page).fill('typing over SSE');
  await alex.page.locator('.vc-typing', { hasText: 'Sam is typing' }).waitFor();
  await alex.page.locator('.vc-bubble[data-status="read"]', { hasText: 'Reply to SSE' }).waitFor();
  await sam.page.locator('.vc-root[data-transport="sse"]').waitFor({ state: 'attached' });
});

await test('the chatbox fits a phone-sized screen', async () => {
  const phone = await open('coach@vibe.fit', { viewport: { width: 390, height: 780 } });
  await phone.page.getByRole('tab', { name: 'People' }).click();
  const box = await phone.page.locator('.vc-panel').boundingBox();
  if (!box || box.width > 390 || box.x < 0) throw new Error(`panel overflows: ${JSON.stringify(box)}`);
  await shot(phone.page, 'phone');
  await axe(phone.page, 'phone');
  // A finger-sized close button (44 × 44 px at least).
  const close = await phone.page.getByRole('button', { name: 'Minimise chat' }).boundingBox();
  if (close.width < 44 || close.height < 44) throw new Error(`the close button is ${close.width} × ${close.height} px`);
  // The full-screen panel closes from its own header, and the launcher
  // comes back; the keyboard reaches it.
  await phone.page.getByRole('button', { name: 'Minimise chat' }).click();
  await phone.page.getByRole('button', { name: /Open chat/ }).waitFor();
  await phone.page.keyboard.press('Enter');
  await phone.page.getByRole('tab', { name: 'People' }).waitFor();
  await phone.context.close();
});

let coach;
const GROUP = 'Morning crew';
const RENAMED = 'Morning crew 6am';

await test('a trainer creates a group of three from the UI and its members see it', async () => {
  coach = await open('coach@vibe.fit');
  await coach.page.getByRole('button', { name: 'New group' }).click();
  await axe(coach.page, 'new group');
  await coach.page.getByLabel('Group name').fill(GROUP);
  const search = coach.page.getByRole('searchbox', { name: 'Add people by name or email' });
  await search.fill('alex');
  await coach.page.getByRole('list', { name: 'Search results' }).getByRole('button', { name: /^Alex Rivera/ }).click();
  await search.fill('sam');
  await coach.page.getByRole('list', { name: 'Search results' }).getByRole('button', { name: /^Sam Patel/ }).click();
  await coach.page.getByRole('list', { name: 'Members to add' }).getByText('Sam Patel').waitFor();
  await coach.page.getByRole('button', { name: 'Create group' }).click();
  await coach.page.locator('.vc-title', { hasText: GROUP }).waitFor();
  await coach.page.locator('.vc-subtitle', { hasText: '3 members' }).waitFor();
  await send(coach.page, 'Welcome to the crew');
  for (const who of [alex, sam]) {
    await toList(who.page);
    await who.page.locator('.vc-row', { hasText: GROUP }).waitFor();
  }
});

await test('the creator renames the group and every member sees the new name', async () => {
  await coach.page.getByRole('button', { name: 'Group settings' }).click();
  await coach.page.getByRole('heading', { name: '3 members' }).waitFor();
  await shot(coach.page, 'group-settings');
  await axe(coach.page, 'group settings');
  await coach.page.getByLabel('Group name').fill(RENAMED);
  await coach.page.getByRole('button', { name: 'Rename' }).click();
  await coach.page.locator('.vc-title', { hasText: RENAMED }).waitFor();
  for (const who of [alex, sam]) await who.page.locator('.vc-row', { hasText: RENAMED }).waitFor();
});

await test('a removed member sees a clear state, the group leaves their list, and adding them back returns it', async () => {
  await sam.page.locator('.vc-row', { hasText: RENAMED }).click();
  await bubble(sam.page, 'Welcome to the crew').waitFor();
  await coach.page.getByRole('button', { name: 'Remove Sam Patel' }).click();
  await coach.page.getByRole('heading', { name: '2 members' }).waitFor();
  await sam.page.getByRole('alert').filter({ hasText: 'You are no longer a member of this group' }).waitFor();
  await composer(sam.page).waitFor({ state: 'hidden' });
  await sam.page.getByRole('button', { name: 'Back to chats' }).click();
  await sam.page.getByRole('list', { name: 'Conversations' }).waitFor();
  await sam.page.locator('.vc-row', { hasText: RENAMED }).waitFor({ state: 'detached' });
  // Added back: the group comes back to their list.
  await coach.page.getByRole('searchbox', { name: 'Add people by name or email' }).fill('sam');
  await coach.page.getByRole('list', { name: 'Search results' }).getByRole('button', { name: /^Sam Patel/ }).click();
  await coach.page.getByRole('heading', { name: '3 members' }).waitFor();
  await sam.page.locator('.vc-row', { hasText: RENAMED }).waitFor();
});

await test('a member leaves the group: it leaves their list and the others see them go', async () => {
  await alex.page.locator('.vc-row', { hasText: RENAMED }).click();
  await alex.page.getByRole('button', { name: 'Group settings' }).click();
  // Only the creator manages the group.
  await alex.page.getByRole('button', { name: 'Rename' }).waitFor({ state: 'detached' });
  await alex.page.getByRole('button', { name: 'Leave group' }).click();
  await alex.page.getByRole('button', { name: 'Yes, leave' }).click();
  await alex.page.getByRole('list', { name: 'Conversations' }).waitFor();
  await alex.page.locator('.vc-row', { hasText: RENAMED }).waitFor({ state: 'detached' });
  await coach.page.getByRole('heading', { name: '2 members' }).waitFor();
});

await test('many unread open at a "New messages" divider; new ones while scrolled up offer a jump', async () => {
  await toList(alex.page);
  await toList(sam.page);
  const id = await conversationId(alex.page, 'Sam Patel');
  await sendBurst(sam.page, id, 25, 'Burst');
  await alex.page.locator('.vc-row', { hasText: 'Sam Patel' }).locator('.vc-unread', { hasText: '25' }).waitFor();
  await sam.page.locator('.vc-row', { hasText: 'Alex Rivera' }).click();
  await bubble(sam.page, 'Burst 25').waitFor();
  await alex.page.locator('.vc-row', { hasText: 'Sam Patel' }).click();
  const divider = alex.page.locator('.vc-divider', { hasText: 'New messages' });
  await divider.waitFor();
  await until('the divider on screen', () => onScreen(alex.page, divider));
  await until('the first unread on screen', () => onScreen(alex.page, bubble(alex.page, 'Burst 1').first()));
  if (await onScreen(alex.page, bubble(alex.page, 'Burst 25'))) throw new Error('opened at the bottom, not at the divider');
  // What is on screen is read, the rest still counts.
  const badge = async () => Number(await alex.page.locator('.vc-badge').textContent());
  await until('the badge counting only what is still unseen', async () => (await badge()) > 0 && (await badge()) < 25);
  // What the reader has not seen is not read: the last stays "Delivered".
  await sam.page.locator('.vc-bubble[data-status="delivered"]', { hasText: 'Burst 25' }).waitFor();
  await shot(alex.page, 'unread-divider');
  await sendBurst(sam.page, id, 3, 'Later');
  const jump = alex.page.getByRole('button', { name: 'Jump to latest (3 new)' });
  await jump.waitFor();
  await shot(alex.page, 'jump-to-latest');
  await new Promise((ok) => setTimeout(ok, 1_000));
  expectEqual(await sam.page.locator('.vc-bubble[data-status="read"]', { hasText: 'Later 3' }).count(), 0, 'read while scrolled up');
  const unseen = await badge();
  if (unseen >= 28 || unseen < 3) throw new Error(`badge ${unseen} with three more below a partly read backlog`);
  await jump.click();
  await jump.waitFor({ state: 'hidden' });
  await alex.page.locator('.vc-badge').waitFor({ state: 'hidden' });
  await until('the latest on screen', () => onScreen(alex.page, bubble(alex.page, 'Later 3')));
  await sam.page.locator('.vc-bubble[data-status="read"]', { hasText: 'Later 3' }).waitFor();
  expectEqual(await sam.page.locator('.vc-status-read').count(), 1, 'bubbles saying Read');
});

await test('read status stays "Delivered" while the reader’s tab is hidden, and turns "Read" when they look', async () => {
  await setHidden(alex.page, true);
  await send(sam.page, 'While you were away');
  await bubble(alex.page, 'While you were away').waitFor();
  await sam.page.locator('.vc-bubble[data-status="delivered"]', { hasText: 'While you were away' }).waitFor();
  await new Promise((ok) => setTimeout(ok, 1_000));
  expectEqual(await sam.page.locator('.vc-bubble[data-status="read"]', { hasText: 'While you were away' }).count(), 0, 'read while hidden');
  await setHidden(alex.page, false);
  await sam.page.locator('.vc-bubble[data-status="read"]', { hasText: 'While you were away' }).waitFor();
});

await test('an incoming message keeps the reader’s selection, is announced, and its links are safe', async () => {
  const selected = await alex.page.evaluate(() => {
    // The last bubble of Sam's group: the next message from Sam joins the group below it.
    const text = [...document.querySelectorAll('.vc-bubble .vc-text')].find((n) => n.textContent === 'While you were away');
    const range = document.createRange();
    range.selectNodeContents(text);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    return getSelection().toString();
  });
  expectEqual(selected, 'While you were away', 'selection made');
  await send(sam.page, 'Plan: https://example.com/plan?week=3. Not javascript:alert(1)');
  const incoming = bubble(alex.page, 'Plan: https://example.com/plan');
  await incoming.waitFor();
  expectEqual(await alex.page.evaluate(() => getSelection().toString()), 'While you were away', 'selection after a message arrived');
  const links = incoming.locator('a');
  expectEqual(await links.count(), 1, 'links');
  expectEqual(await links.getAttribute('href'), 'https://example.com/plan?week=3', 'href');
  expectEqual(await links.getAttribute('target'), '_blank', 'target');
  if (!/noopener/.test(await links.getAttribute('rel')) || !/noreferrer/.test(await links.getAttribute('rel'))) throw new Error('rel lacks noopener noreferrer');
  await alex.page.locator('.vc-root > [aria-live]', { hasText: 'Sam: Plan:' }).waitFor({ state: 'attached' });
  // A long word wraps inside its bubble instead of widening the chat.
  await send(sam.page, 'Squat'.repeat(60));
  const long = await bubble(alex.page, 'SquatSquatSquat').boundingBox();
  const list = await alex.page.locator('.vc-messages').boundingBox();
  if (long.x + long.width > list.x + list.width) throw new Error(`a long word overflows: ${JSON.stringify({ long, list })}`);
});

await test('a chat that fails to load says so and its retry works', async () => {
  const id = Number(await alex.page.evaluate(() => sessionStorage.getItem('vibe-chat-open')));
  await toList(alex.page);
  await alex.page.route(`**/api/v1/chat/conversations/${id}`, (route) =>
    route.fulfill({ status: 503, contentType: 'application/json', body: JSON.stringify({ code: 'unavailable', message: 'The service is unavailable' }) }), { times: 1 });
  await alex.page.locator('.vc-row', { hasText: 'Sam Patel' }).click();
  await alex.page.getByRole('alert').filter({ hasText: 'This chat could not be loaded' }).waitFor();
  expectEqual(await composer(alex.page).isVisible(), false, 'a composer for a chat that did not load');
  await alex.page.getByRole('button', { name: 'Try again' }).click();
  await bubble(alex.page, 'While you were away').waitFor();
  await composer(alex.page).waitFor();
});

await test('a draft survives switching chats and a reload', async () => {
  await composer(alex.page).fill('Half a plan for Friday');
  // Another chat, then back.
  await toList(alex.page);
  await alex.page.getByRole('tab', { name: 'People' }).click();
  await alex.page.getByRole('button', { name: /^Casey Coach/ }).click();
  await alex.page.locator('.vc-title', { hasText: 'Casey Coach' }).waitFor();
  expectEqual(await composer(alex.page).inputValue(), '', 'another chat’s draft');
  await toList(alex.page);
  await alex.page.locator('.vc-row', { hasText: 'Sam Patel' }).click();
  await until('the draft back', async () => (await composer(alex.page).inputValue()) === 'Half a plan for Friday');
  await alex.page.reload();
  await bubble(alex.page, 'While you were away').waitFor();
  expectEqual(await composer(alex.page).inputValue(), 'Half a plan for Friday', 'draft after a reload');
  await composer(alex.page).press('Enter');
  await bubble(sam.page, 'Half a plan for Friday').waitFor();
  await alex.page.reload();
  await bubble(alex.page, 'Half a plan for Friday').waitFor();
  expectEqual(await composer(alex.page).inputValue(), '', 'a sent draft is gone');
});

await test('a host page hands the ChatBox its own session: no second login', async () => {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  let asked = 0;
  await page.exposeFunction('hostToken', async () => {
    asked += 1;
    const r = await fetch(`${EDGE}/api/v1/auth/login`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ email: 'coach@vibe.fit', password: 'demo-password' }) });
    return (await r.json()).token;
  });
  await page.route(`${EDGE}/embedded.html`, (route) =>
    route.fulfill({
      contentType: 'text/html',
      body: `<!doctype html><html lang="en"><head><title>Host</title></head><body><main><h1>Host page</h1></main>
        <script type="module">
          import { mountChatBox } from '/chatbox.js';
          mountChatBox({ open: true, token: () => window.hostToken() });
        </script></body></html>`,
    }),
  );
  await page.goto(`${EDGE}/embedded.html`);
  await page.getByRole('tab', { name: 'Chats' }).waitFor();
  await page.locator('.vc-row', { hasText: RENAMED }).waitFor();
  expectEqual(await page.getByLabel('Password').count(), 0, 'a login form');
  expectEqual(await page.getByRole('button', { name: 'Log out' }).count(), 0, 'a log-out button (the host owns the session)');
  expectEqual(await page.getByText('Demo accounts').count(), 0, 'demo accounts on a host page');
  if (asked < 1) throw new Error('the host was never asked for a token');
  await context.close();
});

await test('notifications: settings private by default, turned on only from a click, a push shows and opens its chat', async () => {
  const page = alex.page;
  await alex.context.grantPermissions(['notifications'], { origin: EDGE });
  await toList(page);
  const id = await conversationId(page, 'Sam Patel');
  await page.getByRole('button', { name: 'Notifications' }).click();
  const content = page.getByRole('checkbox', { name: 'Show the message text in notifications' });
  await content.waitFor();
  expectEqual(await content.isChecked(), false, 'message text shown by default');
  await axe(page, 'notifications');
  await shot(page, 'notifications');
  // Quiet hours, saved at the origin.
  await page.getByRole('checkbox', { name: 'Quiet hours (no notifications)' }).check();
  await page.getByLabel('From', { exact: true }).fill('23:00');
  await page.getByLabel('To', { exact: true }).fill('06:30');
  await page.getByRole('button', { name: 'Save' }).click();
  await page.getByRole('status').filter({ hasText: 'Saved.' }).waitFor();
  const settings = await rest(page, 'GET', '/api/v1/push/settings');
  expectEqual(JSON.stringify(settings.body.quiet_hours && [settings.body.quiet_hours.start, settings.body.quiet_hours.end]), JSON.stringify(['23:00', '06:30']), 'quiet hours at the origin');
  expectEqual(settings.body.show_content, false, 'show_content at the origin');

  // Nothing was asked before the click; the click registers the worker.
  const cdp = await alex.context.newCDPSession(page);
  const registrations = new Map();
  cdp.on('ServiceWorker.workerRegistrationUpdated', (e) => {
    for (const r of e.registrations) registrations.set(r.registrationId, r);
  });
  await cdp.send('ServiceWorker.enable');
  await page.getByRole('button', { name: 'Turn on notifications' }).click();
  // Headless Chromium has no push service to subscribe with: the ChatBox
  // says so instead of failing silently (a real browser subscribes here).
  await until('the worker registered', () => [...registrations.values()].some((r) => r.scopeURL.endsWith('/vibe-chat-push/') && !r.isDeleted), 30_000);
  await page.getByRole('alert').filter({ hasText: /could not subscribe|Turn on|blocked/ }).or(page.getByText('Notifications are on')).waitFor({ timeout: 30_000 });
  await shot(page, 'notifications-turned-on');
  console.log(`    (turning on here: ${(await page.locator('.vc-setting').first().innerText()).replace(/\s+/g, ' ')} ${(await page.locator('.vc-error').first().innerText()).trim()})`);
  const registration = [...registrations.values()].find((r) => r.scopeURL.endsWith('/vibe-chat-push/'));

  // A push as the origin sends it, delivered to the worker by DevTools.
  await page.getByRole('button', { name: 'Back to conversations' }).click();
  const payload = { type: 'message', conversation_id: id, seq: 1, count: 2, title: 'Sam Patel', body: '2 new messages from Sam Patel', tag: `conversation-${id}`, url: `/?conversation=${id}` };
  await cdp.send('ServiceWorker.deliverPushMessage', { origin: EDGE, registrationId: registration.registrationId, data: JSON.stringify(payload) });
  let worker;
  await until('the service worker', () => (worker = alex.context.serviceWorkers().find((w) => w.url().endsWith('/push-sw.js'))));
  let shown = [];
  await until('the notification shown', async () => {
    shown = await worker.evaluate(async () => (await self.registration.getNotifications()).map((n) => ({ title: n.title, body: n.body, tag: n.tag })));
    return shown.length > 0;
  });
  expectEqual(JSON.stringify(shown), JSON.stringify([{ title: 'Sam Patel', body: '2 new messages from Sam Patel', tag: `conversation-${id}` }]), 'notifications');
  // A second push for the conversation replaces it (one per conversation).
  await cdp.send('ServiceWorker.deliverPushMessage', { origin: EDGE, registrationId: registration.registrationId, data: JSON.stringify({ ...payload, count: 3, body: '3 new messages from Sam Patel' }) });
  await until('the notification replaced', async () => {
    shown = await worker.evaluate(async () => (await self.registration.getNotifications()).map((n) => n.body));
    return shown.length === 1 && shown[0].startsWith('3 new');
  });
  // A click opens that conversation in this tab.
  await worker.evaluate(async () => {
    const [n] = await self.registration.getNotifications();
    self.dispatchEvent(new NotificationEvent('notificationclick', { notification: n }));
  });
  await page.locator('.vc-title', { hasText: 'Sam Patel' }).waitFor();
  await bubble(page, 'While you were away').waitFor();
  // Reading clears it: the origin's "clear" push closes it.
  await cdp.send('ServiceWorker.deliverPushMessage', { origin: EDGE, registrationId: registration.registrationId, data: JSON.stringify({ type: 'clear', conversation_id: id, tag: `conversation-${id}` }) });
  await until('the notification closed', async () => (await worker.evaluate(async () => (await self.registration.getNotifications()).length)) === 0);
  await cdp.detach();
});

await test('a conversation can be muted and set to notify about nothing', async () => {
  const page = alex.page;
  const id = Number(await page.evaluate(() => sessionStorage.getItem('vibe-chat-open')));
  await page.getByRole('button', { name: 'Notification settings' }).click();
  await page.getByRole('radio', { name: 'Every new message' }).waitFor();
  await axe(page, 'conversation notifications');
  await page.getByRole('button', { name: '8 hours' }).click();
  await page.getByText(/^Muted until/).waitFor();
  let prefs = await rest(page, 'GET', `/api/v1/chat/conversations/${id}/notifications`);
  const hours = (Date.parse(prefs.body.muted_until) - Date.now()) / 3_600_000;
  if (!(hours > 7.5 && hours <= 8)) throw new Error(`muted for ${hours} h`);
  await page.getByRole('radio', { name: 'Nothing' }).check();
  await page.getByRole('status').filter({ hasText: 'Saved.' }).waitFor();
  prefs = await rest(page, 'GET', `/api/v1/chat/conversations/${id}/notifications`);
  expectEqual(prefs.body.level, 'none', 'level');
  await page.getByRole('button', { name: 'Unmute' }).click();
  await page.getByRole('button', { name: '1 hour' }).waitFor();
  await page.getByRole('radio', { name: 'Every new message' }).check();
  await page.getByRole('button', { name: 'Back to the chat' }).click();
  await composer(page).waitFor();
});

await test('the session refreshes silently and open sockets renew in band', async () => {
  // The suite's access tokens live 60 s (the origin's minimum) and the
  // edge allows 30 s past expiry: a socket that was not renewed is closed
  // with token_expired within 90 s. Over 100 s nothing may reconnect, and
  // chat goes on.
  const page = alex.page;
  const refreshes = [];
  const sockets = [];
  page.on('request', (r) => {
    if (r.url().endsWith('/api/v1/auth/refresh')) refreshes.push(r.url());
  });
  page.on('websocket', (ws) => sockets.push(ws.url()));
  const tokenNow = () => page.evaluate(() => JSON.parse(localStorage.getItem('vibe-chat-session')).token);
  const first = await tokenNow();
  await page.waitForTimeout(100_000);
  if (refreshes.length < 2) throw new Error(`expected silent refreshes, saw ${refreshes.length}`);
  if ((await tokenNow()) === first) throw new Error('the stored access token never changed');
  if (sockets.length) throw new Error(`sockets were reopened instead of renewed: ${sockets.join(', ')}`);
  await send(page, 'Still here after the first token died');
  await bubble(sam.page, 'Still here after the first token died').waitFor();
  // A reload keeps the session (the refresh token is in storage) and the
  // open chat.
  await page.reload();
  await bubble(page, 'Still here after the first token died').waitFor();
  await send(page, 'And after a reload');
  await bubble(sam.page, 'And after a reload').waitFor();
});

await test('a catch-up that fails after resync shows the gap, and its retry fills it', async () => {
  const page = alex.page;
  // The room's socket through a relay that can drop frames and inject a
  // `resync`, as a room whose replay window was passed would send.
  let client = null;
  let dropping = false;
  const dropped = [];
  await page.routeWebSocket(/\/api\/v1\/chat\/conversations\/\d+\/ws/, (ws) => {
    client = ws;
    const server = ws.connectToServer();
    ws.onMessage((m) => server.send(m));
    server.onMessage((m) => {
      const frame = JSON.parse(m);
      if (dropping && frame.type === 'message') dropped.push(frame.message.seq);
      else ws.send(m);
    });
  });
  await page.reload();
  await bubble(page, 'And after a reload').waitFor();
  await until('the room socket relayed', () => Boolean(client));
  const id = Number(await page.evaluate(() => sessionStorage.getItem('vibe-chat-open')));
  dropping = true;
  await sendBurst(sam.page, id, 2, 'Missed while away');
  await until('two messages dropped', () => dropped.length === 2);
  dropping = false;
  // The catch-up's first page fails.
  await page.route(`**/api/v1/chat/conversations/${id}/messages?after_seq=*`, (route) =>
    route.fulfill({ status: 503, contentType: 'application/json', body: JSON.stringify({ code: 'unavailable', message: 'The service is unavailable' }) }), { times: 1 });
  client.send(JSON.stringify({ type: 'resync', conversation_id: id, from_seq: Math.min(...dropped) }));
  await page.getByRole('alert').filter({ hasText: 'Some messages could not be loaded' }).waitFor();
  expectEqual(await bubble(page, 'Missed while away').count(), 0, 'messages shown before the catch-up');
  await page.getByRole('button', { name: 'Retry', exact: true }).click();
  await bubble(page, 'Missed while away 1').waitFor();
  await bubble(page, 'Missed while away 2').waitFor();
  await page.getByRole('alert').filter({ hasText: 'Some messages could not be loaded' }).waitFor({ state: 'detached' });
  const seqs = await page.locator('.vc-bubble[data-seq]').evaluateAll((els) => els.map((e) => Number(e.dataset.seq)));
  expectEqual(new Set(seqs).size, seqs.length, 'no duplicated message');
});

await test('logging out ends the session at the origin, not just in this tab', async () => {
  const { context, page } = await open('coach@vibe.fit');
  const stored = await page.evaluate(() => JSON.parse(localStorage.getItem('vibe-chat-session')));
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByRole('button', { name: 'Log in', exact: true }).waitFor();
  const res = await page.evaluate(async (refreshToken) => {
    const r = await fetch('/api/v1/auth/refresh', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ refresh_token: refreshToken }),
    });
    return { status: r.status, body: await r.json() };
  }, stored.refresh_token);
  expectEqual(res.status, 401, 'refresh after logout');
  await context.close();
});

await test('no page threw an error', async () => {
  const errors = [...(alex?.errors ?? []), ...(sam?.errors ?? []), ...(coach?.errors ?? [])];
  if (errors.length) throw new Error(errors.map(String).join('; '));
});

await h.finish(browser);
