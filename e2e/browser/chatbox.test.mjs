// Browser tests of the ChatBox: Debian's Chromium driven by playwright-core,
// two users in two browser contexts, against a real `wrangler dev`, the
// origin and PostgreSQL (started by e2e/tests/browser.rs).
//
// env: EDGE_URL (required), SCREENSHOT_DIR (optional: save each view).

import { chromium } from 'playwright-core';

const EDGE = process.env.EDGE_URL;
const SHOTS = process.env.SCREENSHOT_DIR;
const TIMEOUT = 15_000;

if (!EDGE) {
  console.error('EDGE_URL is not set');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});

const results = [];
async function test(name, body) {
  const started = Date.now();
  try {
    await body();
    results.push([name, null]);
    console.log(`test ${name} ... ok (${((Date.now() - started) / 1000).toFixed(1)}s)`);
  } catch (e) {
    results.push([name, e]);
    console.log(`test ${name} ... FAILED\n    ${String(e.stack ?? e).split('\n').slice(0, 6).join('\n    ')}`);
  }
}

async function shot(page, name) {
  if (SHOTS) await page.screenshot({ path: `${SHOTS}/${name}.png` });
}

/** A signed-in ChatBox in its own browser context. */
async function open(email, { query = '', viewport = { width: 1100, height: 760 } } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on('pageerror', (e) => errors.push(e));
  await page.goto(`${EDGE}/${query}`);
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill('demo-password');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('tab', { name: 'Chats' }).waitFor();
  return { context, page, errors };
}

function expectEqual(actual, expected, what) {
  if (actual !== expected) throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
}

const composer = (page) => page.getByRole('textbox', { name: 'Message' });
const bubble = (page, text) => page.locator('.vc-bubble', { hasText: text });

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
  await page.getByLabel('Email').fill('alex@vibe.fit');
  await page.getByLabel('Password').fill('not the password');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('alert').filter({ hasText: 'Wrong email or password' }).waitFor();
  await context.close();
});

await test('alex and sam log in and see each other online', async () => {
  alex = await open('alex@vibe.fit');
  sam = await open('sam@vibe.fit');
  await alex.page.getByRole('tab', { name: 'People' }).click();
  await alex.page.getByRole('button', { name: /^Sam Patel, member, online$/ }).waitFor();
  await sam.page.getByRole('tab', { name: 'People' }).click();
  await sam.page.getByRole('button', { name: /^Alex Rivera, member, online$/ }).waitFor();
  await shot(alex.page, 'active-users');
});

await test('people search finds anyone by name or email and goes back to the contacts', async () => {
  await alex.page.getByRole('tab', { name: 'People' }).click();
  const search = alex.page.getByRole('searchbox', { name: 'Find people by name or email' });
  const results = alex.page.getByRole('list', { name: 'Search results' });
  await search.fill('cas');
  await results.getByRole('button', { name: /^Casey Coach, trainer, / }).waitFor();
  expectEqual(await results.getByRole('button').count(), 1, 'people whose name starts with "cas"');
  await search.fill('sam@');
  await results.getByRole('button', { name: /^Sam Patel, member, / }).waitFor();
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
  await shot(alex.page, 'chat');
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
  // The full-screen panel closes from its own header, and the launcher
  // comes back; the keyboard reaches it.
  await phone.page.getByRole('button', { name: 'Minimise chat' }).click();
  await phone.page.getByRole('button', { name: /Open chat/ }).waitFor();
  await phone.page.keyboard.press('Enter');
  await phone.page.getByRole('tab', { name: 'People' }).waitFor();
  await phone.context.close();
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

await test('logging out ends the session at the origin, not just in this tab', async () => {
  const { context, page } = await open('coach@vibe.fit');
  const stored = await page.evaluate(() => JSON.parse(localStorage.getItem('vibe-chat-session')));
  await page.getByRole('button', { name: 'Log out' }).click();
  await page.getByRole('button', { name: 'Log in' }).waitFor();
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
  const errors = [...(alex?.errors ?? []), ...(sam?.errors ?? [])];
  if (errors.length) throw new Error(errors.map(String).join('; '));
});

await browser.close();
const failed = results.filter(([, e]) => e);
console.log(`\ntest result: ${failed.length ? 'FAILED' : 'ok'}. ${results.length - failed.length} passed; ${failed.length} failed`);
process.exit(failed.length ? 1 : 0);
