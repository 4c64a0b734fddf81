// What every browser suite shares: Debian's Chromium driven by
// playwright-core, a tiny test runner, signed-in ChatBoxes, axe-core and
// waiting helpers. The suites run against a real `wrangler dev`, the
// origin and PostgreSQL (started by e2e/tests/browser.rs).
//
// env: EDGE_URL (required), SCREENSHOT_DIR (optional: save each view),
// CHROMIUM (optional: the browser binary).

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

const AXE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

export const EDGE = process.env.EDGE_URL;
const SHOTS = process.env.SCREENSHOT_DIR;
export const TIMEOUT = 15_000;

if (!EDGE) {
  console.error('EDGE_URL is not set');
  process.exit(2);
}

/** Launches Chromium headless, with `args` beyond the usual quiet ones. */
export function launch(args = []) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...args,
    ],
  });
}

const results = [];

/** Runs one test, printing a line in cargo's format. */
export async function test(name, body) {
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

/** Closes the browser, prints the summary and exits 1 on any failure. */
export async function finish(browser) {
  await browser.close();
  const failed = results.filter(([, e]) => e);
  console.log(`\ntest result: ${failed.length ? 'FAILED' : 'ok'}. ${results.length - failed.length} passed; ${failed.length} failed`);
  process.exit(failed.length ? 1 : 0);
}

export async function shot(page, name) {
  if (SHOTS) await page.screenshot({ path: `${SHOTS}/${name}.png` });
}

/**
 * A signed-in ChatBox in its own browser context (`query` after the
 * page's path; `permissions` granted to the edge's origin; `hasTouch`: a
 * touch screen, as a phone has).
 */
export async function open(browser, email, { query = '', viewport = { width: 1100, height: 760 }, permissions = [], hasTouch = false } = {}) {
  const context = await browser.newContext({ viewport, hasTouch });
  if (permissions.length) await context.grantPermissions(permissions, { origin: EDGE });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on('pageerror', (e) => errors.push(e));
  await page.goto(`${EDGE}/${query}`);
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill('demo-password');
  await page.getByRole('button', { name: 'Log in', exact: true }).click();
  await page.getByRole('tab', { name: 'Chats' }).waitFor();
  return { context, page, errors };
}

/**
 * axe-core on the page as it is now: any serious or critical violation
 * fails the test, with the rule, the nodes and how to fix it.
 */
export async function axe(page, view) {
  if (!(await page.evaluate(() => Boolean(window.axe)))) await page.addScriptTag({ content: AXE });
  const violations = await page.evaluate(async () => {
    const result = await window.axe.run(document, { resultTypes: ['violations'] });
    return result.violations
      .filter((v) => v.impact === 'serious' || v.impact === 'critical')
      .map((v) => `${v.id} (${v.impact}): ${v.help}\n      ${v.nodes.slice(0, 3).map((n) => n.target.join(' ') + ' — ' + n.failureSummary.replace(/\n/g, ' ')).join('\n      ')}`);
  });
  if (violations.length) throw new Error(`accessibility, ${view} view:\n    ${violations.join('\n    ')}`);
}

/** Polls `check` every 100 ms until it is truthy, or throws after `timeout`. */
export async function until(what, check, timeout = TIMEOUT) {
  const end = Date.now() + timeout;
  for (;;) {
    if (await check()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((ok) => setTimeout(ok, 100));
  }
}

export function expectEqual(actual, expected, what) {
  if (actual !== expected) throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
}

export const composer = (page) => page.getByRole('textbox', { name: 'Message' });
export const bubble = (page, text) => page.locator('.vc-bubble', { hasText: text });

/** A REST call as the page's signed-in user (through the edge). */
export async function rest(page, method, path, body) {
  return page.evaluate(
    async ({ method, path, body }) => {
      const token = JSON.parse(localStorage.getItem('vibe-chat-session')).token;
      const headers = { authorization: `Bearer ${token}` };
      if (body) headers['content-type'] = 'application/json';
      const r = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
      return { status: r.status, body: await r.json().catch(() => null) };
    },
    { method, path, body },
  );
}

/** Sends `n` messages over REST, one after another (waiting out a 429). */
export async function sendBurst(page, conversationId, n, prefix) {
  for (let i = 1; i <= n; i++) {
    for (;;) {
      const r = await rest(page, 'POST', `/api/v1/chat/conversations/${conversationId}/messages`, { content: `${prefix} ${i}`, client_msg_id: crypto.randomUUID() });
      if (r.status === 201 || r.status === 200) break;
      if (r.status !== 429) throw new Error(`send ${prefix} ${i}: ${r.status} ${JSON.stringify(r.body)}`);
      await new Promise((ok) => setTimeout(ok, 500));
    }
  }
}
