// Browser tests of a message's life in the ChatBox (issue 15): replies
// with their quote (and a click on it that pages back to the original),
// reactions that toggle, edits, deletes, the same over SSE, a mention in a
// group, and message search that opens the chat at the hit. Two or three
// users in their own browser contexts against the real stack started by
// e2e/tests/browser.rs; see harness.mjs.

import * as h from './harness.mjs';
import { test, shot, axe, until, expectEqual, composer, rest, sendBurst } from './harness.mjs';

const browser = await h.launch();
const open = (email, options) => h.open(browser, email, options);

/** A message's bubble by its own text (a reply's bubble also holds its original's text, in the quote). */
const said = (page, text) => page.locator('.vc-bubble[data-seq]').filter({ has: page.locator('.vc-text', { hasText: text }) });

async function send(page, text) {
  await composer(page).fill(text);
  await composer(page).press('Enter');
  await said(page, text).waitFor();
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

/** Opens a message's menu with the mouse: hover shows the ⋯ button. */
async function menuByMouse(page, message) {
  await message.hover();
  await message.getByRole('button', { name: 'Message actions' }).click();
  await page.getByRole('menu', { name: 'Message actions' }).waitFor();
}

/** Opens a message's menu with the keyboard: the message is focused, Enter opens it. */
async function menuByKeyboard(page, message) {
  await message.focus();
  await page.keyboard.press('Enter');
  await page.getByRole('menu', { name: 'Message actions' }).waitFor();
}

let alex;
let sam;
let coach;
let directId;

await test('alex and sam open their direct chat', async () => {
  alex = await open('alex@vibe.fit', { permissions: ['clipboard-read', 'clipboard-write'] });
  sam = await open('sam@vibe.fit');
  await alex.page.getByRole('tab', { name: 'People' }).click();
  await alex.page.getByRole('list', { name: 'People' }).getByRole('button', { name: /^Sam Patel/ }).click();
  await alex.page.locator('.vc-title', { hasText: 'Sam Patel' }).waitFor();
  await send(alex.page, 'Lifecycle starts here');
  await toList(sam.page);
  await sam.page.locator('.vc-row', { hasText: 'Alex Rivera' }).click();
  await said(sam.page, 'Lifecycle starts here').waitFor();
  directId = Number(await sam.page.evaluate(() => sessionStorage.getItem('vibe-chat-open')));
});

await test('a reply carries its quote to the other side', async () => {
  await send(sam.page, 'Original zebrafish plan: squats then lunges');
  await said(alex.page, 'Original zebrafish plan').waitFor();
  // Enough after it that a fresh page does not load the original: it
  // shows the newest 50, and a list that starts at its top before it
  // scrolls down may fetch one page more.
  await sendBurst(sam.page, directId, 110, 'Filler');
  await said(alex.page, 'Filler 110').waitFor();
  await alex.page.locator('.vc-messages').evaluate((list) => list.scrollTo({ top: 0 }));
  const original = said(alex.page, 'Original zebrafish plan');
  // The original may be above what alex loaded at first: scrolling up loads it.
  await until('the original loaded', async () => {
    await alex.page.locator('.vc-messages').evaluate((list) => list.scrollTo({ top: 0 }));
    return (await original.count()) === 1;
  });
  await menuByMouse(alex.page, original);
  await axe(alex.page, 'message menu');
  await shot(alex.page, 'message-menu');
  await alex.page.getByRole('menuitem', { name: 'Reply' }).click();
  await alex.page.locator('.vc-context', { hasText: 'Replying to Sam Patel' }).waitFor();
  await alex.page.locator('.vc-context', { hasText: 'Original zebrafish plan' }).waitFor();
  expectEqual(await composer(alex.page).evaluate((n) => n === document.activeElement), true, 'the composer has the focus');
  await shot(alex.page, 'replying');
  await composer(alex.page).fill('Lunges first, please');
  await composer(alex.page).press('Enter');
  await alex.page.locator('.vc-context').waitFor({ state: 'detached' });
  const reply = said(sam.page, 'Lunges first, please');
  await reply.waitFor();
  await reply.locator('.vc-quote', { hasText: 'Sam Patel' }).waitFor();
  await reply.locator('.vc-quote', { hasText: 'Original zebrafish plan' }).waitFor();
});

await test('a click on a quote pages back to the original and highlights it', async () => {
  // Sam has read it all (a page without the focus sends no reads, and a
  // chat opens back at the first unread), so after a reload sam holds the
  // latest 50 messages (100 at most): the original is older.
  const last = Number(await said(sam.page, 'Lunges first, please').getAttribute('data-seq'));
  const read = await rest(sam.page, 'POST', `/api/v1/chat/conversations/${directId}/read`, { seq: last });
  expectEqual(read.status < 300, true, `read: ${read.status}`);
  await until('the read reached the list', async () => {
    const list = await rest(sam.page, 'GET', '/api/v1/chat/conversations');
    const entry = list.body?.conversations?.find((c) => c.id === directId);
    return entry && entry.read_seq >= last;
  });
  await sam.page.reload();
  const reply = said(sam.page, 'Lunges first, please');
  await reply.waitFor();
  expectEqual(await said(sam.page, 'Original zebrafish plan').count(), 0, 'the original loaded at first');
  await reply.locator('.vc-quote').click();
  const original = sam.page.locator('.vc-bubble.vc-highlight').filter({ has: sam.page.locator('.vc-text', { hasText: 'Original zebrafish plan' }) });
  await original.waitFor();
  await until('the original on screen', () => onScreen(sam.page, original));
  expectEqual(await original.evaluate((n) => n === document.activeElement), true, 'the original has the focus');
});

await test('a reaction shows on the other side, and toggling it off takes it away', async () => {
  await send(sam.page, 'Hit a new PR today');
  const mine = said(alex.page, 'Hit a new PR today');
  await mine.waitFor();
  // The keyboard: the message is focused, Enter opens its menu, arrows move.
  await menuByKeyboard(alex.page, mine);
  const first = alex.page.getByRole('menuitem', { name: '👍' });
  expectEqual(await first.evaluate((n) => n === document.activeElement), true, 'the first item has the focus');
  await alex.page.keyboard.press('ArrowRight');
  expectEqual(await alex.page.getByRole('menuitem', { name: '❤️' }).evaluate((n) => n === document.activeElement), true, 'ArrowRight moves');
  await alex.page.keyboard.press('Escape');
  await alex.page.getByRole('menu').waitFor({ state: 'detached' });
  expectEqual(await mine.evaluate((n) => n === document.activeElement), true, 'Escape gives the focus back to the message');
  await menuByKeyboard(alex.page, mine);
  await alex.page.keyboard.press('ArrowRight');
  await alex.page.keyboard.press('Enter');
  const theirs = said(sam.page, 'Hit a new PR today');
  await theirs.getByRole('button', { name: '❤️ 1' }).waitFor();
  expectEqual(await theirs.getByRole('button', { name: '❤️ 1' }).getAttribute('aria-pressed'), 'false', 'pressed for sam');
  const chip = mine.getByRole('button', { name: '❤️ 1' });
  await chip.waitFor();
  expectEqual(await chip.getAttribute('aria-pressed'), 'true', 'pressed for alex');
  // Sam adds the same: the count goes to 2 on both sides.
  await theirs.getByRole('button', { name: '❤️ 1' }).click();
  await mine.getByRole('button', { name: '❤️ 2' }).waitFor();
  await axe(alex.page, 'chat with reactions');
  await shot(alex.page, 'reactions');
  // Alex takes theirs back.
  await mine.getByRole('button', { name: '❤️ 2' }).click();
  await theirs.getByRole('button', { name: '❤️ 1' }).waitFor();
  await theirs.getByRole('button', { name: '❤️ 1' }).click();
  await theirs.locator('.vc-reaction').waitFor({ state: 'detached' });
  await mine.locator('.vc-reaction').waitFor({ state: 'detached' });
});

await test('an edit reaches the other side with "edited"', async () => {
  await send(alex.page, 'Meet at 6:30 at the gmy');
  const theirs = said(sam.page, 'Meet at 6:30 at the gmy');
  await theirs.waitFor();
  const mine = said(alex.page, 'Meet at 6:30 at the gmy');
  await menuByMouse(alex.page, mine);
  await alex.page.getByRole('menuitem', { name: 'Edit' }).click();
  await alex.page.locator('.vc-context', { hasText: 'Editing your message' }).waitFor();
  expectEqual(await composer(alex.page).inputValue(), 'Meet at 6:30 at the gmy', 'the composer holds the text');
  await composer(alex.page).fill('Meet at 6:30 at the gym');
  await alex.page.getByRole('button', { name: 'Save' }).click();
  const edited = said(sam.page, 'Meet at 6:30 at the gym');
  await edited.waitFor();
  await edited.locator('.vc-edited', { hasText: 'edited' }).waitFor();
  await said(alex.page, 'Meet at 6:30 at the gym').locator('.vc-edited').waitFor();
  expectEqual(await composer(alex.page).inputValue(), '', 'the composer is empty again');
  // Escape cancels an edit and keeps the message as it was.
  await menuByMouse(alex.page, said(alex.page, 'Meet at 6:30 at the gym'));
  await alex.page.getByRole('menuitem', { name: 'Edit' }).click();
  await composer(alex.page).fill('never sent');
  await composer(alex.page).press('Escape');
  await alex.page.locator('.vc-context').waitFor({ state: 'detached' });
  expectEqual(await composer(alex.page).inputValue(), '', 'the draft back');
  expectEqual(await alex.page.locator('.vc-panel').isVisible(), true, 'the panel stays open');
  // Only one's own messages can be edited.
  await menuByMouse(alex.page, said(alex.page, 'Hit a new PR today'));
  expectEqual(await alex.page.getByRole('menuitem', { name: 'Edit' }).count(), 0, 'Edit on sam’s message');
  expectEqual(await alex.page.getByRole('menuitem', { name: 'Delete' }).count(), 0, 'Delete on sam’s message in a direct chat');
  // Copy text puts the message's text on the clipboard.
  await alex.page.getByRole('menuitem', { name: 'Copy text' }).click();
  await alex.page.getByRole('status').filter({ hasText: 'Copied' }).waitFor();
  expectEqual(await alex.page.evaluate(() => navigator.clipboard.readText()), 'Hit a new PR today', 'the clipboard');
});

await test('a delete asks first, then leaves a tombstone on both sides', async () => {
  await send(alex.page, 'Wrong chat, sorry');
  const theirs = said(sam.page, 'Wrong chat, sorry');
  await theirs.waitFor();
  const seq = await theirs.getAttribute('data-seq');
  await said(alex.page, 'Wrong chat, sorry').click({ button: 'right' });
  await alex.page.getByRole('menuitem', { name: 'Delete' }).click();
  const confirm = alex.page.getByRole('dialog', { name: 'Delete message' });
  await confirm.waitFor();
  await axe(alex.page, 'delete confirmation');
  await confirm.getByRole('button', { name: 'Cancel' }).click();
  await confirm.waitFor({ state: 'detached' });
  await said(alex.page, 'Wrong chat, sorry').click({ button: 'right' });
  await alex.page.getByRole('menuitem', { name: 'Delete' }).click();
  await alex.page.getByRole('dialog', { name: 'Delete message' }).getByRole('button', { name: 'Delete' }).click();
  for (const page of [sam.page, alex.page]) {
    const tomb = page.locator(`.vc-bubble[data-seq="${seq}"]`);
    await tomb.locator('.vc-tombstone', { hasText: 'Message deleted' }).waitFor();
    expectEqual(await tomb.locator('.vc-text').count(), 0, 'text in a tombstone');
    expectEqual(await tomb.getByRole('button', { name: 'Message actions' }).count(), 0, 'a menu on a tombstone');
  }
  await shot(sam.page, 'tombstone');
  await axe(sam.page, 'chat with a tombstone');
});

await test('over SSE, reactions and edits go over HTTP and reach the other side', async () => {
  await sam.context.close();
  sam = await open('sam@vibe.fit', { query: '?transport=sse' });
  await sam.page.locator('.vc-conn', { hasText: 'Connected (SSE)' }).waitFor();
  await sam.page.locator('.vc-row', { hasText: 'Alex Rivera' }).click();
  const target = said(sam.page, 'Meet at 6:30 at the gym');
  await target.waitFor();
  await menuByKeyboard(sam.page, target);
  await sam.page.getByRole('menuitem', { name: '🔥' }).click();
  await said(alex.page, 'Meet at 6:30 at the gym').getByRole('button', { name: '🔥 1' }).waitFor();
  await target.getByRole('button', { name: '🔥 1' }).waitFor();
  await send(sam.page, 'Sent over SSE, with a typo: sqaut');
  await menuByMouse(sam.page, said(sam.page, 'Sent over SSE'));
  await sam.page.getByRole('menuitem', { name: 'Edit' }).click();
  await composer(sam.page).fill('Sent over SSE, fixed: squat');
  await composer(sam.page).press('Enter');
  await said(alex.page, 'Sent over SSE, fixed: squat').locator('.vc-edited').waitFor();
  await said(sam.page, 'Sent over SSE, fixed: squat').locator('.vc-edited').waitFor();
  // An emoji typed rather than picked.
  await menuByKeyboard(sam.page, target);
  await sam.page.getByRole('menuitem', { name: 'Other emoji' }).click();
  await sam.page.getByRole('textbox', { name: 'Emoji' }).fill('🦄');
  await sam.page.getByRole('button', { name: 'React', exact: true }).click();
  await said(alex.page, 'Meet at 6:30 at the gym').getByRole('button', { name: '🦄 1' }).waitFor();
});

await test('a mention in a group is offered while typing, sent, flagged in the list and highlighted for the one mentioned', async () => {
  coach = await open('coach@vibe.fit');
  const idOf = async (query) => (await rest(coach.page, 'GET', `/api/v1/users?query=${query}&limit=1`)).body.users[0].id;
  const group = await rest(coach.page, 'POST', '/api/v1/chat/conversations', { type: 'group', name: 'Lifecycle crew', participant_ids: [await idOf('alex'), await idOf('sam')] });
  if (group.status >= 300) throw new Error(`group: ${group.status} ${JSON.stringify(group.body)}`);
  await toList(alex.page);
  await toList(sam.page);
  await sendBurst(coach.page, group.body.id, 1, 'Welcome to lifecycle crew');
  await alex.page.locator('.vc-row', { hasText: 'Lifecycle crew' }).click();
  await said(alex.page, 'Welcome to lifecycle crew 1').waitFor();
  await composer(alex.page).pressSequentially('Ready @sa');
  const option = alex.page.getByRole('option', { name: 'Sam Patel' });
  await option.waitFor();
  expectEqual(await composer(alex.page).getAttribute('aria-activedescendant'), await option.getAttribute('id'), 'the option is active');
  await axe(alex.page, 'mention picker');
  await shot(alex.page, 'mention-picker');
  await composer(alex.page).press('Enter');
  expectEqual(await composer(alex.page).inputValue(), 'Ready @Sam Patel ', 'the name inserted');
  // A second name typed and then taken out again is not mentioned.
  await composer(alex.page).pressSequentially('and @cas');
  await alex.page.getByRole('option', { name: 'Casey Coach' }).waitFor();
  await composer(alex.page).press('Tab');
  await composer(alex.page).fill((await composer(alex.page).inputValue()).replace('@Casey Coach ', 'you '));
  await composer(alex.page).pressSequentially('for legs?');
  await composer(alex.page).press('Enter');
  const sent = said(alex.page, 'Ready @Sam Patel and you for legs?');
  await sent.waitFor();
  // Sam's list flags the conversation; the message is highlighted in it.
  const row = sam.page.locator('.vc-row', { hasText: 'Lifecycle crew' });
  await row.locator('.vc-at').waitFor();
  await axe(sam.page, 'chats with a mention');
  await shot(sam.page, 'mention-badge');
  await row.click();
  const mentioned = said(sam.page, 'Ready @Sam Patel');
  await mentioned.waitFor();
  await sam.page.locator('.vc-bubble.vc-mentioned').filter({ has: sam.page.locator('.vc-text', { hasText: 'Ready @Sam Patel' }) }).waitFor();
  await mentioned.locator('.vc-mention', { hasText: '@Sam Patel' }).waitFor();
  await shot(sam.page, 'mention');
  // The coach's name was taken out: not mentioned, not highlighted.
  const forCoach = said(coach.page, 'Ready @Sam Patel');
  await coach.page.locator('.vc-row', { hasText: 'Lifecycle crew' }).click();
  await forCoach.waitFor();
  expectEqual(await forCoach.evaluate((n) => n.classList.contains('vc-mentioned')), false, 'highlighted for the coach');
  // Read: the badge goes.
  await toList(sam.page);
  await row.locator('.vc-at').waitFor({ state: 'detached' });
});

await test('on a phone, a long press on a message opens its menu', async () => {
  const phone = await open('coach@vibe.fit', { viewport: { width: 390, height: 780 }, hasTouch: true });
  try {
    await phone.page.locator('.vc-row', { hasText: 'Lifecycle crew' }).click();
    const message = said(phone.page, 'Ready @Sam Patel');
    await message.waitFor();
    // A finger held still on the message (touch events through DevTools:
    // Playwright's touchscreen only taps).
    const box = await message.boundingBox();
    const point = { x: Math.round(box.x + box.width / 2), y: Math.round(box.y + box.height / 2) };
    const cdp = await phone.context.newCDPSession(phone.page);
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: [point] });
    await phone.page.getByRole('menu', { name: 'Message actions' }).waitFor();
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] });
    await axe(phone.page, 'phone message menu');
    await shot(phone.page, 'phone-menu');
    await phone.page.getByRole('menuitem', { name: '💪' }).click();
    await said(alex.page, 'Ready @Sam Patel').getByRole('button', { name: '💪 1' }).waitFor();
    // A short touch is a tap, not a menu.
    await phone.page.getByRole('menu').waitFor({ state: 'detached' });
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: [point] });
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] });
    await new Promise((ok) => setTimeout(ok, 800));
    expectEqual(await phone.page.getByRole('menu').count(), 0, 'a menu after a tap');
    if (phone.errors.length) throw new Error(phone.errors.map(String).join('; '));
  } finally {
    await phone.context.close();
  }
});

await test('search finds a message by a word’s start, marks it, and opens the chat at it', async () => {
  await toList(alex.page);
  const box = alex.page.getByRole('searchbox', { name: 'Search messages' });
  const hit = alex.page.getByRole('list', { name: 'Messages found' }).locator('.vc-hit', { hasText: 'Original' });
  // The origin indexes what the room flushed (well under a second).
  await until(
    'the hit',
    async () => {
      await box.fill('');
      await box.fill('zebra');
      try {
        await hit.waitFor({ timeout: 2_000 });
        return true;
      } catch {
        return false;
      }
    },
    20_000,
  );
  expectEqual(await hit.locator('mark').first().textContent(), 'zebrafish', 'the marked word');
  await hit.locator('.vc-hit-sender', { hasText: 'Sam Patel' }).waitFor();
  await axe(alex.page, 'search results');
  await shot(alex.page, 'search');
  // Nothing found says so.
  await box.fill('qqqzzznothing');
  await alex.page.getByText('No messages match “qqqzzznothing”.').waitFor();
  await box.fill('zebra');
  await hit.click();
  await alex.page.locator('.vc-title', { hasText: 'Sam Patel' }).waitFor();
  const found = alex.page.locator('.vc-bubble.vc-highlight').filter({ has: alex.page.locator('.vc-text', { hasText: 'Original zebrafish plan' }) });
  await found.waitFor();
  await until('the hit on screen', () => onScreen(alex.page, found));
  // Back to the list: the query and its results are still there.
  await toList(alex.page);
  expectEqual(await box.inputValue(), 'zebra', 'the query kept');
  await hit.waitFor();
  await box.fill('');
  await alex.page.getByRole('list', { name: 'Conversations' }).waitFor();
});

await test('no page threw an error', async () => {
  const errors = [...(alex?.errors ?? []), ...(sam?.errors ?? []), ...(coach?.errors ?? [])];
  if (errors.length) throw new Error(errors.map(String).join('; '));
});

await h.finish(browser);
