// Browser tests of the ChatBox's attachments (issue 14): photos from the
// file chooser seen on both sides, upload failures and retry, paste and
// drop, a PDF card, voice messages recorded with Chromium's fake
// microphone (a tone) and played on the other side, and the gallery with
// its full-size viewer. Two users in two browser contexts against a real
// `wrangler dev` (its local R2), the origin and PostgreSQL, started by
// e2e/tests/browser.rs; see harness.mjs.

import * as h from './harness.mjs';
import { TIMEOUT, test, shot, axe, until, expectEqual, composer, bubble } from './harness.mjs';

/** Thumbnails are made off the request path, by the origin: allow for it. */
const PROCESSING_TIMEOUT = 45_000;

const browser = await h.launch([
  // A fake microphone (a beeping tone) that needs no permission prompt,
  // so MediaRecorder records something real.
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--autoplay-policy=no-user-gesture-required',
]);
/** A signed-in ChatBox in its own browser context, allowed the microphone. */
const open = (email, options) => h.open(browser, email, { permissions: ['microphone'], ...options });

/** Opens (or starts) the direct chat with `name` from People. */
async function chatWith(page, name) {
  const back = page.getByRole('button', { name: 'Back to conversations' });
  if (await back.count()) await back.click();
  await page.getByRole('tab', { name: 'People' }).click();
  await page.getByRole('list', { name: 'People' }).getByRole('button', { name: new RegExp(`^${name}`) }).click();
  await page.locator('.vc-title', { hasText: name }).waitFor();
  await composer(page).waitFor();
}

const tray = (page) => page.getByRole('list', { name: 'Attachments to send' });

/**
 * A real image made by the browser itself (a canvas encoded as JPEG or
 * PNG), so the server has something to decode, re-encode and thumbnail.
 */
async function makeImage(page, { width, height, type = 'image/jpeg', colour = '#c43d18', label = 'Vibe' }) {
  const base64 = await page.evaluate(
    async ({ width, height, type, colour, label }) => {
      const canvas = new OffscreenCanvas(width, height);
      const g = canvas.getContext('2d');
      const grad = g.createLinearGradient(0, 0, width, height);
      grad.addColorStop(0, colour);
      grad.addColorStop(1, '#1d4ed8');
      g.fillStyle = grad;
      g.fillRect(0, 0, width, height);
      g.fillStyle = '#fff';
      g.font = `${Math.round(height / 6)}px sans-serif`;
      g.fillText(label, width / 10, height / 2);
      const blob = await canvas.convertToBlob({ type, quality: 0.85 });
      const bytes = new Uint8Array(await blob.arrayBuffer());
      let bin = '';
      for (const b of bytes) bin += String.fromCharCode(b);
      return btoa(bin);
    },
    { width, height, type, colour, label },
  );
  return Buffer.from(base64, 'base64');
}

/**
 * A short WebM video made by the browser: a canvas animated for `ms` and
 * recorded with MediaRecorder (VP8), so the origin has real frames to size.
 */
async function makeVideo(page, { width, height, ms = 1_500 }) {
  const base64 = await page.evaluate(
    async ({ width, height, ms }) => {
      const canvas = document.createElement('canvas');
      canvas.width = width;
      canvas.height = height;
      const g = canvas.getContext('2d');
      const stream = canvas.captureStream(25);
      const recorder = new MediaRecorder(stream, { mimeType: 'video/webm;codecs=vp8' });
      const chunks = [];
      recorder.ondataavailable = (e) => chunks.push(e.data);
      const started = performance.now();
      const draw = () => {
        const t = performance.now() - started;
        g.fillStyle = '#1d4ed8';
        g.fillRect(0, 0, width, height);
        g.fillStyle = '#fff';
        g.fillRect((t / 5) % width, height / 3, width / 6, height / 3);
        if (recorder.state === 'recording') requestAnimationFrame(draw);
      };
      recorder.start(100);
      draw();
      await new Promise((ok) => setTimeout(ok, ms));
      await new Promise((ok) => {
        recorder.onstop = ok;
        recorder.stop();
      });
      const bytes = new Uint8Array(await new Blob(chunks).arrayBuffer());
      let bin = '';
      for (const b of bytes) bin += String.fromCharCode(b);
      return btoa(bin);
    },
    { width, height, ms },
  );
  return Buffer.from(base64, 'base64');
}

/** A small, valid one-page PDF (its xref offsets computed, not guessed). */
function makePdf(text) {
  const objects = [
    '<< /Type /Catalog /Pages 2 0 R >>',
    '<< /Type /Pages /Kids [3 0 R] /Count 1 >>',
    '<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 144] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>',
    null, // the content stream, below
    '<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>',
  ];
  const stream = `BT /F1 18 Tf 20 70 Td (${text}) Tj ET`;
  objects[3] = `<< /Length ${stream.length} >>\nstream\n${stream}\nendstream`;
  let out = '%PDF-1.4\n';
  const offsets = [];
  objects.forEach((body, i) => {
    offsets.push(out.length);
    out += `${i + 1} 0 obj\n${body}\nendobj\n`;
  });
  const xref = out.length;
  out += `xref\n0 ${objects.length + 1}\n0000000000 65535 f \n`;
  for (const o of offsets) out += `${String(o).padStart(10, '0')} 00000 n \n`;
  out += `trailer\n<< /Size ${objects.length + 1} /Root 1 0 R >>\nstartxref\n${xref}\n%%EOF\n`;
  return Buffer.from(out, 'latin1');
}

/** An upload's URL (the gallery's GET has the same path, but no test routes it). */
const isUpload = (url) => /\/api\/v1\/chat\/conversations\/\d+\/attachments$/.test(url.pathname);

/** Chooses files through the paperclip's file chooser. */
async function attachFiles(page, files) {
  const [chooser] = await Promise.all([page.waitForEvent('filechooser'), page.getByRole('button', { name: 'Attach files' }).click()]);
  await chooser.setFiles(files);
}

/** Waits for every <img> in `locator` to have decoded pixels. */
async function loaded(locator, what, timeout = PROCESSING_TIMEOUT) {
  await until(what, async () => {
    const widths = await locator.evaluateAll((imgs) => imgs.map((i) => (i.complete ? i.naturalWidth : 0)));
    return widths.length > 0 && widths.every((w) => w > 0);
  }, timeout);
}

let alex;
let sam;

await test('two photos sent from the file chooser show on both sides at their shape, without a jump', async () => {
  alex = await open('alex@vibe.fit');
  sam = await open('sam@vibe.fit');
  await chatWith(alex.page, 'Sam Patel');
  await chatWith(sam.page, 'Alex Rivera');
  const landscape = await makeImage(alex.page, { width: 640, height: 480, label: 'Squat form' });
  const portrait = await makeImage(alex.page, { width: 300, height: 500, type: 'image/png', colour: '#047857', label: 'Meal' });
  await attachFiles(alex.page, [
    { name: 'squat.jpg', mimeType: 'image/jpeg', buffer: landscape },
    { name: 'meal.png', mimeType: 'image/png', buffer: portrait },
  ]);
  // The tray: both files, each uploading then ready; Send waits for them.
  await tray(alex.page).getByText('squat.jpg').waitFor();
  await tray(alex.page).getByText('meal.png').waitFor();
  await until('both uploads ready', async () => (await tray(alex.page).getByText('ready to send').count()) === 2);
  await shot(alex.page, 'media-tray');
  await axe(alex.page, 'upload tray');
  await composer(alex.page).fill('Form check and lunch');
  await alex.page.getByRole('button', { name: 'Send', exact: true }).click();
  await tray(alex.page).waitFor({ state: 'hidden' });

  // The sender sees them at once (their own copies while the server works).
  const mine = bubble(alex.page, 'Form check and lunch');
  await mine.locator('.vc-att-image').nth(1).waitFor();
  await loaded(mine.locator('.vc-att-image img'), 'the sender’s photos');

  // The receiver: the boxes have the photos' shape before any pixel arrives.
  const theirs = bubble(sam.page, 'Form check and lunch');
  await theirs.waitFor();
  const boxes = await theirs.locator('.vc-att-image').evaluateAll((els) => els.map((e) => e.getBoundingClientRect()).map((r) => r.width / r.height));
  if (Math.abs(boxes[0] - 640 / 480) > 0.02 || Math.abs(boxes[1] - 300 / 500) > 0.02) throw new Error(`boxes' aspect ratios ${boxes}`);
  const before = await theirs.boundingBox();
  // The images arrive with `attachment_updated`, once the origin has re-encoded them.
  await until('both photos processed', async () => (await theirs.locator('.vc-att-image[data-status="ready"]').count()) === 2, PROCESSING_TIMEOUT);
  await loaded(theirs.locator('.vc-att-image img'), 'the receiver’s photos');
  const after = await theirs.boundingBox();
  expectEqual(Math.round(after.height), Math.round(before.height), 'the bubble’s height once the photos loaded');
  await shot(sam.page, 'media-chat');
  await axe(sam.page, 'chat with photos');
});

await test('a photo opens full size with next and previous, and the keyboard works it', async () => {
  const page = sam.page;
  const theirs = bubble(page, 'Form check and lunch');
  await theirs.getByRole('button', { name: /Open photo squat\.jpg full size/ }).click();
  const viewer = page.getByRole('dialog', { name: /^Photo \d+ of \d+/ });
  await viewer.waitFor();
  await loaded(viewer.locator('img'), 'the full-size photo');
  const first = await viewer.locator('img').evaluate((i) => i.naturalWidth);
  expectEqual(first, 640, 'the full-size photo’s width');
  await axe(page, 'full-size viewer');
  await shot(page, 'media-lightbox');
  await viewer.getByRole('button', { name: 'Next' }).click();
  await until('the next photo', async () => (await viewer.locator('img').evaluate((i) => i.naturalWidth)) === 300);
  await page.keyboard.press('ArrowLeft');
  await until('the previous photo', async () => (await viewer.locator('img').evaluate((i) => i.naturalWidth)) === 640);
  // Escape closes the viewer, not the panel, and the focus goes back.
  await page.keyboard.press('Escape');
  await viewer.waitFor({ state: 'detached' });
  expectEqual(await page.locator('.vc-panel').isVisible(), true, 'the panel still open');
  expectEqual(await theirs.getByRole('button', { name: /squat\.jpg/ }).evaluate((b) => b === document.activeElement), true, 'focus back on the photo');
});

await test('a refused upload says why and Retry sends it; Cancel stops one; a wrong type never uploads', async () => {
  const page = alex.page;
  const photo = await makeImage(page, { width: 200, height: 200, label: 'Retry' });
  // The first upload is refused as the origin would when it is down.
  await page.route(isUpload, (route) =>
    route.fulfill({ status: 503, contentType: 'application/json', body: JSON.stringify({ code: 'origin_unavailable', message: 'The chat service is unavailable; try again shortly.' }) }), { times: 1 });
  await attachFiles(page, [{ name: 'retry.jpg', mimeType: 'image/jpeg', buffer: photo }]);
  await tray(page).getByRole('alert').filter({ hasText: 'The chat service is unavailable' }).waitFor();
  expectEqual(await page.getByRole('button', { name: 'Send', exact: true }).isDisabled(), true, 'Send with a failed upload');
  await page.getByText('Retry or remove the file that failed.').waitFor();
  await page.getByRole('button', { name: 'Retry upload of retry.jpg' }).click();
  await tray(page).getByText('ready to send').waitFor();
  expectEqual(await page.getByRole('button', { name: 'Send', exact: true }).isDisabled(), false, 'Send once uploaded');

  // An upload held by the network is cancelled: it leaves the tray.
  let release;
  const held = new Promise((ok) => (release = ok));
  await page.route(isUpload, async (route) => {
    await held;
    await route.abort().catch(() => {});
  }, { times: 1 });
  await attachFiles(page, [{ name: 'slow.jpg', mimeType: 'image/jpeg', buffer: photo }]);
  await page.getByText('Waiting for 1 upload…').waitFor();
  expectEqual(await page.getByRole('button', { name: 'Send', exact: true }).isDisabled(), true, 'Send while uploading');
  await page.getByRole('button', { name: 'Cancel upload of slow.jpg' }).click();
  await tray(page).getByText('slow.jpg').waitFor({ state: 'detached' });
  release();

  // Not a type the chat takes: refused before a byte goes out.
  await attachFiles(page, [{ name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('hello') }]);
  await tray(page).getByRole('alert').filter({ hasText: 'can’t be sent' }).waitFor();
  expectEqual(await page.getByRole('button', { name: 'Retry upload of notes.txt' }).count(), 0, 'a retry for a refused type');
  await page.getByRole('button', { name: 'Remove notes.txt' }).click();

  // The retried photo goes, alone (a message without text).
  await page.getByRole('button', { name: 'Send', exact: true }).click();
  await until('the photo-only message on the other side', async () => (await sam.page.locator('.vc-bubble .vc-att-image').count()) === 3);
});

await test('a pasted image and a dropped PDF join the tray; the PDF arrives as a file card', async () => {
  const page = alex.page;
  const png = await makeImage(page, { width: 120, height: 80, type: 'image/png', label: 'Paste' });
  // Paste: the clipboard's image, as a screenshot tool leaves it.
  await composer(page).focus();
  await page.evaluate((b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], 'image.png', { type: 'image/png' }));
    document.querySelector('.vc-compose textarea').dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
  }, png.toString('base64'));
  await tray(page).getByText('image.png').waitFor();
  // Drop: a PDF dragged onto the chat.
  await page.evaluate((b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], 'week-3-plan.pdf', { type: 'application/pdf' }));
    const target = document.querySelector('.vc-messages');
    for (const type of ['dragenter', 'dragover', 'drop']) target.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, makePdf('Week 3: squats 5x5').toString('base64'));
  await tray(page).getByText('week-3-plan.pdf').waitFor();
  await until('both ready', async () => (await tray(page).getByText('ready to send').count()) === 2);
  // The pasted image is not wanted after all.
  await page.getByRole('button', { name: 'Remove image.png' }).click();
  await composer(page).fill('The plan');
  await composer(page).press('Enter');
  const card = bubble(sam.page, 'The plan').getByRole('link', { name: /week-3-plan\.pdf/ });
  await card.waitFor();
  const href = await card.getAttribute('href');
  const got = await sam.page.evaluate(async (url) => {
    const r = await fetch(url);
    const bytes = new Uint8Array(await r.arrayBuffer());
    return { status: r.status, type: r.headers.get('content-type'), head: String.fromCharCode(...bytes.slice(0, 5)), headers: [...r.headers] };
  }, href);
  if (!got.type) console.log(`    (the PDF's response headers: ${JSON.stringify(got.headers)})`);
  expectEqual(`${got.status} ${got.type} ${got.head}`, '200 application/pdf %PDF-', 'the PDF through its signed link');
  await axe(sam.page, 'chat with a file card');
});

await test('a voice message recorded by tapping plays on the other side with its length and a moving bar', async () => {
  const page = alex.page;
  await page.getByRole('button', { name: 'Record a voice message' }).click();
  const timer = page.getByRole('timer', { name: 'Recording time' });
  await timer.waitFor();
  await until('two seconds recorded', async () => (await timer.textContent()) >= '0:02', 10_000);
  await shot(page, 'media-recording');
  await axe(page, 'recording');
  await page.getByRole('button', { name: 'Send voice message' }).click();
  await timer.waitFor({ state: 'hidden' });
  const voice = sam.page.locator('.vc-bubble .vc-voice').last();
  await voice.getByRole('button', { name: 'Play voice message' }).waitFor();
  // Its length is the recorder's, not the WebM's (which has none): it
  // comes with the message or with `attachment_updated` once processed.
  const time = voice.locator('.vc-voice-time');
  await until('the voice message’s length', async () => /^0:00 \/ 0:0[2-4]$/.test(await time.textContent()), PROCESSING_TIMEOUT)
    .catch(async (e) => {
      throw new Error(`${e.message}: it reads "${await time.textContent()}"`);
    });
  await voice.getByRole('button', { name: 'Play voice message' }).click();
  await voice.getByRole('button', { name: 'Pause voice message' }).waitFor();
  await until('the position moving', async () => Number(await voice.getByRole('slider', { name: 'Position' }).inputValue()) > 500);
  await until('the time advancing', async () => !(await voice.locator('.vc-voice-time').textContent()).startsWith('0:00'));
  await shot(sam.page, 'media-voice');
  await axe(sam.page, 'voice message');
  // It plays to the end and is ready to play again.
  await voice.getByRole('button', { name: 'Play voice message' }).waitFor({ timeout: 10_000 });
});

await test('a voice message recorded by holding the button is sent on release', async () => {
  const page = alex.page;
  const before = await sam.page.locator('.vc-bubble .vc-voice').count();
  const mic = await page.getByRole('button', { name: 'Record a voice message' }).boundingBox();
  await page.mouse.move(mic.x + mic.width / 2, mic.y + mic.height / 2);
  await page.mouse.down();
  await page.getByRole('timer', { name: 'Recording time' }).waitFor();
  await page.waitForTimeout(1_500);
  await page.mouse.up();
  await page.getByRole('timer', { name: 'Recording time' }).waitFor({ state: 'hidden' });
  await until('the second voice message on the other side', async () => (await sam.page.locator('.vc-bubble .vc-voice').count()) === before + 1);
  // And Cancel throws a recording away.
  await page.getByRole('button', { name: 'Record a voice message' }).click();
  await page.getByRole('timer', { name: 'Recording time' }).waitFor();
  await page.getByRole('button', { name: 'Cancel recording' }).click();
  await page.getByRole('button', { name: 'Record a voice message' }).waitFor();
  await page.waitForTimeout(1_000);
  expectEqual(await sam.page.locator('.vc-bubble .vc-voice').count(), before + 1, 'voice messages after a cancel');
  // The list previews a voice message the server's way.
  await sam.page.getByRole('button', { name: 'Back to conversations' }).click();
  await sam.page.locator('.vc-row', { hasText: 'Alex Rivera' }).locator('.vc-row-preview', { hasText: '🎤 Voice message' }).waitFor();
  await sam.page.locator('.vc-row', { hasText: 'Alex Rivera' }).click();
  await composer(sam.page).waitFor();
});

await test('a video plays inline with its controls, at its shape from the first frame', async () => {
  const clip = await makeVideo(alex.page, { width: 320, height: 180 });
  await attachFiles(alex.page, [{ name: 'deadlift.webm', mimeType: 'video/webm', buffer: clip }]);
  await tray(alex.page).getByText('ready to send').waitFor();
  await composer(alex.page).fill('Deadlift form');
  await composer(alex.page).press('Enter');
  const video = bubble(sam.page, 'Deadlift form').locator('video');
  await video.waitFor();
  expectEqual(await video.getAttribute('preload'), 'metadata', 'preload');
  expectEqual(await video.evaluate((v) => v.controls), true, 'controls');
  // The sender's browser read the size before the upload, so the box is
  // 16:9 as soon as the message shows (no jump when processing ends).
  const first = await video.boundingBox();
  if (!first || Math.abs(first.width / first.height - 16 / 9) > 0.03) {
    throw new Error(`the first box is ${first?.width}x${first?.height}, not 16:9`);
  }
  await until('the video’s first frame', () => video.evaluate((v) => v.readyState >= 1 && v.videoWidth === 320));
  await axe(sam.page, 'chat with a video');
});

await test('the gallery shows the photos, opens them full size with next and previous, and lists voice and files', async () => {
  const page = sam.page;
  await page.getByRole('button', { name: 'Photos, videos and files' }).click();
  const photos = page.getByRole('list', { name: 'Photos' });
  await photos.getByRole('button').nth(2).waitFor();
  expectEqual(await photos.getByRole('button').count(), 3, 'photos in the gallery');
  await loaded(photos.locator('img'), 'the thumbnails');
  await shot(page, 'media-gallery');
  await axe(page, 'gallery');
  // Newest first: the retried photo, then the two sent together.
  await photos.getByRole('button').first().click();
  const viewer = page.getByRole('dialog', { name: /^Photo 1 of 3/ });
  await viewer.waitFor();
  await loaded(viewer.locator('img'), 'the first photo full size');
  await viewer.getByRole('button', { name: 'Next' }).click();
  await page.getByRole('dialog', { name: /^Photo 2 of 3/ }).waitFor();
  await page.keyboard.press('ArrowRight');
  await page.getByRole('dialog', { name: /^Photo 3 of 3/ }).waitFor();
  expectEqual(await page.getByRole('button', { name: 'Next' }).isDisabled(), true, 'Next on the last photo');
  await page.getByRole('button', { name: 'Previous' }).click();
  await page.getByRole('dialog', { name: /^Photo 2 of 3/ }).waitFor();
  await loaded(page.getByRole('dialog').locator('img'), 'the second photo full size');
  await page.getByRole('button', { name: 'Close full size view' }).click();
  await page.getByRole('dialog', { name: /^Photo/ }).waitFor({ state: 'detached' });
  // The other kinds.
  await page.getByRole('tab', { name: 'Voice' }).click();
  await page.getByRole('list', { name: 'Voice' }).getByRole('button', { name: 'Play voice message' }).nth(1).waitFor();
  await page.getByRole('tab', { name: 'Files' }).click();
  await page.getByRole('list', { name: 'Files' }).getByRole('link', { name: /week-3-plan\.pdf/ }).waitFor();
  await axe(page, 'gallery files');
  await page.getByRole('tab', { name: 'Videos' }).click();
  await page.getByRole('list', { name: 'Videos' }).getByRole('button', { name: /^Open video/ }).click();
  const player = page.getByRole('dialog', { name: 'Video 1 of 1' }).locator('video');
  await player.waitFor();
  await until('the video full size', () => player.evaluate((v) => v.readyState >= 1 && v.videoWidth === 320));
  await page.keyboard.press('Escape');
  await player.waitFor({ state: 'detached' });
  await page.getByRole('button', { name: 'Back to the chat' }).click();
  await composer(page).waitFor();
});

await test('a media link that expired is signed again and the photo still shows', async () => {
  const page = sam.page;
  // The first download after a reload answers as an expired link does.
  await page.route((url) => url.pathname.startsWith('/api/v1/media/'), (route) =>
    route.fulfill({ status: 403, contentType: 'application/json', body: JSON.stringify({ code: 'expired', message: 'the download link has expired' }) }), { times: 1 });
  const resigned = [];
  page.on('request', (r) => {
    if (/\/api\/v1\/chat\/conversations\/\d+\/attachments\/[0-9a-f-]{36}$/.test(new URL(r.url()).pathname)) resigned.push(r.url());
  });
  await page.reload();
  const photos = page.locator('.vc-bubble .vc-att-image img');
  await photos.nth(2).waitFor();
  await loaded(photos, 'every photo after a link failed', TIMEOUT);
  expectEqual(resigned.length, 1, 'attachments signed again');
});

await test('no page threw an error', async () => {
  const errors = [...(alex?.errors ?? []), ...(sam?.errors ?? [])];
  if (errors.length) throw new Error(errors.map(String).join('; '));
});

await h.finish(browser);
