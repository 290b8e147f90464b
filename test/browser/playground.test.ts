/**
 * The playground at `/`, in a real browser: Debian's Chromium (through playwright-core) against
 * real Kiln servers on the built-in kiln-tiny model. What a person does (typing, Ctrl+Enter,
 * painting a mask with the mouse, reloading) and what they see (previews, the image and its
 * seed, the API's own error messages), checked against the API itself: the downloaded image is
 * the one the page's "copy as code" reproduces, and inpainting keeps the unmasked pixels.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { envelope, getJson, personPng, pixelsOf, postJson, rgbPng, type TestServer } from '../server/helpers.js';
import { chromiumMissing, launchChromium, REPO_ROOT, startPlaygroundServer } from './harness.js';
import { PLAYGROUND_CSP, PLAYGROUND_FILES, playgroundBytes } from '../../src/server/routes/playground.js';

// Browser globals, used inside page.evaluate callbacks only (the project's lib has no DOM types).
declare const window: any, document: any, MutationObserver: any;

const execFileAsync = promisify(execFile);
const SIZE = 256;
const PROMPT = 'a large red circle at the left on a blue background';
const KEY = 'the-right-key';
const WAIT = 90_000;

let browser: Browser;
let open: TestServer;
let locked: TestServer;
let posed: TestServer;
const contexts: BrowserContext[] = [];
/** Console errors and uncaught exceptions of every page (a CSP violation is a console error). */
const pageErrors: string[] = [];

async function newPage(server: TestServer): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  context.setDefaultTimeout(WAIT);
  contexts.push(context);
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') pageErrors.push(`console: ${m.text()}`);
  });
  await page.goto(`${server.url}/`);
  return page;
}

/** Clicks a download link and returns the file's bytes. */
async function download(page: Page, selector: string): Promise<Buffer> {
  const [file] = await Promise.all([page.waitForEvent('download'), page.click(selector)]);
  return readFileSync(await file.path());
}

/** Starts recording every value #result's data-kind takes (previews, then the final image). */
async function recordResultKinds(page: Page): Promise<void> {
  await page.evaluate(() => {
    const seen: string[] = [];
    (window as any).__kinds = seen;
    new MutationObserver((records: any[]) => {
      for (const r of records) seen.push((r.target as any).dataset.kind ?? '');
    }).observe(document.getElementById('result')!, { attributes: true, attributeFilter: ['data-kind'] });
  });
}

/**
 * Runs the page's Node SDK snippet as written, in a temp folder holding `files` (its uploads)
 * and this repository's node_modules (for `openai`); returns the file it wrote.
 */
async function runNodeSnippet(page: Page, files: Record<string, Buffer>, out: string): Promise<Buffer> {
  await page.click('.code-tabs [data-lang="node"]');
  const code = (await page.textContent('#code'))!;
  const dir = mkdtempSync(join(tmpdir(), 'kiln-playground-code-'));
  try {
    symlinkSync(join(REPO_ROOT, 'node_modules'), join(dir, 'node_modules'), 'dir');
    for (const [name, bytes] of Object.entries(files)) writeFileSync(join(dir, name), bytes);
    writeFileSync(join(dir, 'kiln.mjs'), code);
    // Not spawnSync: the server answering it runs in this process.
    await execFileAsync(process.execPath, ['kiln.mjs'], { cwd: dir, timeout: WAIT });
    return readFileSync(join(dir, out));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const kinds = (page: Page): Promise<string[]> => page.evaluate(() => (window as any).__kinds);
const setting = (page: Page, name: string) => page.textContent(`#settings dd[data-setting="${name}"]`);

describe('the playground in Chromium', { skip: chromiumMissing() }, () => {
  before(async () => {
    [browser, open, locked, posed] = await Promise.all([
      launchChromium(),
      startPlaygroundServer(),
      startPlaygroundServer({ apiKeys: [KEY] }),
      startPlaygroundServer({ withPose: true }),
    ]);
  });
  after(async () => {
    for (const c of contexts) await c.close().catch(() => {});
    await browser?.close();
    await Promise.all([open?.close(), locked?.close(), posed?.close()]);
  });

  test('the page and its files load without a key, with a strict CSP; the API answers as before', async () => {
    for (const server of [open, locked]) {
      for (const [path, name] of Object.entries(PLAYGROUND_FILES)) {
        const res = await fetch(`${server.url}${path}`);
        assert.equal(res.status, 200, path);
        const type = res.headers.get('content-type') ?? '';
        const expected = { html: 'text/html', js: 'text/javascript', css: 'text/css', svg: 'image/svg+xml' }[name.split('.').pop()!]!;
        assert.ok(type.startsWith(expected), `${path}: ${type}`);
        assert.equal(res.headers.get('content-security-policy'), PLAYGROUND_CSP);
        assert.equal(res.headers.get('x-content-type-options'), 'nosniff');
        assert.equal(res.headers.get('cache-control'), 'no-cache');
        const etag = res.headers.get('etag')!;
        assert.match(etag, /^"[\w-]+"$/);
        assert.equal((await res.arrayBuffer()).byteLength, readFileSync(join(REPO_ROOT, 'playground', name)).length);
        const again = await fetch(`${server.url}${path}`, { headers: { 'if-none-match': etag } });
        assert.equal(again.status, 304, path);
      }
    }
    assert.match(PLAYGROUND_CSP, /default-src 'self'/);
    assert.doesNotMatch(PLAYGROUND_CSP, /unsafe-inline|unsafe-eval/);
    // Only the listed files: the folder is not browsable.
    const other = await getJson(`${open.url}/playground/../package.json`);
    assert.equal(other.status, 404);
    envelope(other.json);
    // The API keeps its auth and answers.
    assert.equal((await getJson(`${locked.url}/v1/models`)).status, 401);
    assert.deepEqual((await getJson(`${locked.url}/v1/models`, { authorization: `Bearer ${KEY}` })).json.data.map((m: any) => m.id).sort(), ['kiln-tiny', 'kiln-tiny-xl']);
    const doc = (await getJson(`${open.url}/openapi.json`)).json;
    assert.ok(doc.paths['/v1/images/generations'] && !doc.paths['/'], 'the page is not part of the API document');
    // Small enough to load at once: every file of it, uncompressed.
    assert.ok(playgroundBytes() < 80_000, `the playground is ${playgroundBytes()} bytes`);
    const html = readFileSync(join(REPO_ROOT, 'playground', 'index.html'), 'utf8');
    assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>|<style|\sstyle=|\son[a-z]+=/i, 'no inline script, style or handler');
  });

  describe('generating', () => {
    let page: Page;
    let shownSeed: string;

    test('generate: previews while it draws, then the image with its seed; copy as code reproduces it exactly', async () => {
      page = await newPage(open);
      const requests: string[] = [];
      page.on('request', (r) => requests.push(r.url()));
      await page.waitForSelector('#model[data-loaded]');
      assert.deepEqual(await page.$$eval('#model option', (os) => os.map((o) => (o as any).value)), ['', 'kiln-tiny', 'kiln-tiny-xl']);
      await page.selectOption('#model', 'kiln-tiny');
      await page.fill('#prompt', PROMPT);
      await page.selectOption('#size', `${SIZE}x${SIZE}`);
      await page.fill('#steps', '12');
      await page.selectOption('#previews', '3');
      await recordResultKinds(page);
      await page.focus('#prompt');
      await page.keyboard.press('Control+Enter');
      await page.waitForSelector('#result[data-kind="final"]');

      const seen = await kinds(page);
      assert.ok(seen.indexOf('preview') >= 0 && seen.indexOf('preview') < seen.indexOf('final'), `previews before the image: ${seen.join(',')}`);
      assert.equal(seen.filter((k) => k === 'preview').length, 3);
      shownSeed = (await setting(page, 'seed'))!.trim();
      assert.match(shownSeed, /^\d+$/);
      assert.equal(await page.getAttribute('#result', 'data-seed'), shownSeed);
      assert.equal((await setting(page, 'steps'))!.trim(), '12');
      assert.equal((await setting(page, 'model'))!.trim(), 'kiln-tiny');
      assert.match((await setting(page, 'time'))!, /^\d+\.\d+ s/);
      assert.equal(await page.isVisible('#progress'), false);

      const image = await download(page, '#download');
      const { width, height } = await pixelsOf(image);
      assert.deepEqual([width, height], [SIZE, SIZE]);

      // curl: the JSON it sends, sent as it is, answers the same bytes.
      const curl = (await page.textContent('#code'))!;
      assert.match(curl, /^curl -sS http:\/\/127\.0\.0\.1:\d+\/v1\/images\/generations/);
      const body = JSON.parse(/-d '([^']*)'/.exec(curl)![1]!);
      assert.equal(body.seed, Number(shownSeed));
      const replay = await postJson(`${open.baseURL}/images/generations`, body);
      assert.equal(replay.status, 200, replay.text.slice(0, 300));
      assert.ok(Buffer.from(replay.json.data[0].b64_json, 'base64').equals(image), 'curl reproduces the image');

      // Node SDK: the snippet runs as written (openai from this repository) and writes the same bytes.
      const made = await runNodeSnippet(page, {}, `kiln-${shownSeed}.png`);
      assert.ok(made.equals(image), 'the Node snippet reproduces the image');

      await page.click('.code-tabs [data-lang="python"]');
      const python = (await page.textContent('#code'))!;
      assert.match(python, /client\.images\.generate\(/);
      assert.ok(python.includes(`extra_body={"seed": ${shownSeed}, "steps": 12, `), python);
      const py = spawnSync('python3', ['-c', 'import ast, sys; ast.parse(sys.stdin.read())'], { input: python, encoding: 'utf8' });
      if (!py.error) assert.equal(py.status, 0, `the Python snippet parses: ${py.stderr}`);

      // Nothing but this server was asked for anything.
      for (const u of requests) assert.ok(u.startsWith(`${open.url}/`) || u.startsWith('blob:'), u);
    });

    test('a page reload keeps the history; clicking an entry reuses its settings', async () => {
      assert.ok(page, 'needs the generation above');
      await page.reload();
      await page.waitForSelector('#history li button');
      assert.equal(await page.locator('#history li').count(), 1);
      assert.equal(await page.inputValue('#prompt'), '');
      await page.click('#history li button');
      await page.waitForSelector('#result[data-kind="final"]');
      assert.equal(await page.inputValue('#prompt'), PROMPT);
      assert.equal(await page.inputValue('#seed-mode'), 'fixed');
      assert.equal(await page.inputValue('#seed'), shownSeed);
      assert.equal(await page.inputValue('#size'), `${SIZE}x${SIZE}`);
      assert.equal(await page.inputValue('#steps'), '12');
      assert.equal((await setting(page, 'seed'))!.trim(), shownSeed);
    });

    test("an empty prompt shows the API's own error message", async () => {
      const expected = envelope((await postJson(`${open.baseURL}/images/generations`, { prompt: '', size: `${SIZE}x${SIZE}` })).json).message;
      await page.fill('#prompt', '');
      await page.click('#generate');
      await page.waitForSelector('#error:not([hidden])');
      assert.equal((await page.textContent('#error'))!.trim(), expected);
      assert.match(expected, /prompt/);
    });
  });

  describe('editing', () => {
    let page: Page;
    const input = () => rgbPng(SIZE, SIZE, (x, y) => [x, y, 255 - ((x + y) >> 1)]);

    /** The number of painted mask pixels (alpha >= 128) on the page's mask canvas. */
    const painted = () =>
      page.evaluate(() => {
        const c = document.getElementById('mask-canvas') as any;
        const { data } = c.getContext('2d')!.getImageData(0, 0, c.width, c.height);
        let n = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i]! >= 128) n++;
        return n;
      });

    /** Drags the mouse across the mask canvas between two points given as fractions of it. */
    async function stroke(from: [number, number], to: [number, number]) {
      const box = (await page.locator('#mask-canvas').boundingBox())!;
      const at = ([fx, fy]: [number, number]) => [box.x + fx * box.width, box.y + fy * box.height] as const;
      await page.mouse.move(...at(from));
      await page.mouse.down();
      await page.mouse.move(...at(to), { steps: 12 });
      await page.mouse.up();
    }

    before(async () => {
      page = await newPage(open);
      await page.click('.tabs [data-mode="edit"]');
      await page.check('input[name="edit-mode"][value="inpaint"]');
      await page.setInputFiles('#upload', { name: 'gradient.png', mimeType: 'image/png', buffer: await input() });
      await page.waitForSelector('#mask-canvas:visible');
    });

    test('the mask tools: brush, eraser, size, invert, clear', async () => {
      const total = SIZE * SIZE;
      await page.fill('#brush-size', '40');
      await stroke([0.3, 0.5], [0.7, 0.5]);
      const brushed = await painted();
      assert.ok(brushed > 2000 && brushed < total / 2, `brushed ${brushed}`);
      await page.check('input[name="tool"][value="eraser"]');
      await stroke([0.5, 0.3], [0.5, 0.7]);
      const erased = await painted();
      assert.ok(erased < brushed && erased > brushed / 3, `erased ${erased} of ${brushed}`);
      await page.click('#mask-invert');
      const inverted = await painted();
      assert.ok(Math.abs(inverted - (total - erased)) < total * 0.01, `inverted ${inverted}, expected about ${total - erased}`);
      await page.click('#mask-clear');
      assert.equal(await painted(), 0);
      await page.check('input[name="tool"][value="brush"]');
    });

    test('inpainting a mask painted with the mouse: the unmasked part is the input', async () => {
      await page.fill('#prompt', 'a yellow square, black background');
      await page.selectOption('#size', `${SIZE}x${SIZE}`);
      await page.fill('#steps', '8');
      await page.fill('#brush-size', '48');
      await stroke([0.35, 0.45], [0.65, 0.55]);
      await recordResultKinds(page);
      await page.click('#generate');
      await page.waitForSelector('#result[data-kind="final"]');
      assert.equal((await setting(page, 'mode'))!.trim(), 'inpaint');
      assert.ok((await kinds(page)).includes('preview'));

      // One at a time: each waits for the page's next download.
      const resultBytes = await download(page, '#download');
      const maskBytes = await download(page, '#download-mask');
      const inputBytes = await download(page, '#download-input');
      assert.ok(inputBytes.equals(await input()), 'the input offered is the upload');
      const result = await pixelsOf(resultBytes);
      const mask = await pixelsOf(maskBytes);
      const given = await pixelsOf(inputBytes);
      // The edit's Node snippet, with the input and mask the page offers, redraws the same image.
      const seed = (await setting(page, 'seed'))!.trim();
      const again = await runNodeSnippet(page, { 'gradient.png': inputBytes, 'mask.png': maskBytes }, `kiln-${seed}.png`);
      assert.ok(again.equals(resultBytes), 'the Node snippet reproduces the inpainting');
      assert.deepEqual([result.width, result.height, mask.width, mask.height], [SIZE, SIZE, SIZE, SIZE]);
      const white: [number, number][] = [];
      for (let y = 0; y < SIZE; y++) for (let x = 0; x < SIZE; x++) if (mask.data[(y * SIZE + x) * 3]! >= 128) white.push([x, y]);
      assert.ok(white.length > 2000 && white.length < (SIZE * SIZE) / 2, `mask has ${white.length} white pixels`);
      // The result is blended onto the input through the mask blurred by a few pixels (inpaint.ts):
      // beyond 12 px from the mask every pixel is the input's own; inside, the picture is new.
      const near = new Uint8Array(SIZE * SIZE);
      for (const [mx, my] of white) {
        for (let y = Math.max(0, my - 12); y <= Math.min(SIZE - 1, my + 12); y++) {
          for (let x = Math.max(0, mx - 12); x <= Math.min(SIZE - 1, mx + 12); x++) near[y * SIZE + x] = 1;
        }
      }
      let kept = 0;
      let changed = 0;
      for (let i = 0; i < SIZE * SIZE; i++) {
        const diff = Math.max(...[0, 1, 2].map((c) => Math.abs(result.data[i * 3 + c]! - given.data[i * 3 + c]!)));
        if (!near[i]) {
          assert.equal(diff, 0, `pixel ${i % SIZE},${Math.floor(i / SIZE)} outside the mask changed by ${diff}`);
          kept++;
        } else if (mask.data[i * 3]! >= 128 && diff > 24) changed++;
      }
      assert.ok(kept > SIZE * SIZE * 0.4, `${kept} pixels compared`);
      assert.ok(changed > white.length / 4, `only ${changed} of ${white.length} masked pixels were redrawn`);
    });

    test('image to image takes the strength slider; pose mode says what the model lacks', async () => {
      await page.check('input[name="edit-mode"][value="img2img"]');
      assert.equal(await page.isVisible('#mask-canvas'), false);
      await page.fill('#strength', '0.5');
      await page.click('#generate');
      await page.waitForSelector('#result[data-kind="final"][data-seed]');
      await page.waitForFunction(() => document.querySelector('#settings dd[data-setting="mode"]')?.textContent === 'img2img');
      assert.equal((await setting(page, 'strength'))!.trim(), '0.5');

      // kiln-tiny has no ControlNet: the API's 400 is what the page shows.
      await page.check('input[name="edit-mode"][value="pose"]');
      await page.click('#generate');
      await page.waitForSelector('#error:not([hidden])');
      const form = new FormData();
      form.append('image', new Blob([await input()], { type: 'image/png' }), 'gradient.png');
      form.append('prompt', 'a yellow square, black background');
      form.append('user', 'cn');
      form.append('size', `${SIZE}x${SIZE}`);
      const expected = envelope(await (await fetch(`${open.baseURL}/images/edits`, { method: 'POST', body: form })).json()).message;
      assert.equal((await page.textContent('#error'))!.trim(), expected);
    });

    test('after a reload, a history entry of an inpainting puts back its mode, input and mask', async () => {
      await page.reload();
      await page.waitForSelector('#history li button');
      const captions = await page.$$eval('#history li span', (ss) => ss.map((x) => x.textContent));
      assert.deepEqual(captions.map((c) => c!.split(' ')[0]), ['img2img', 'inpaint']);
      await page.click('#history li:nth-child(2) button');
      await page.waitForSelector('#mask-canvas:visible');
      assert.equal(await page.getAttribute('.tabs [data-mode="edit"]', 'aria-selected'), 'true');
      assert.equal(await page.isChecked('input[name="edit-mode"][value="inpaint"]'), true);
      assert.equal(await page.inputValue('#size'), `${SIZE}x${SIZE}`);
      assert.ok((await painted()) > 2000, 'the mask is back');
      assert.equal((await setting(page, 'mode'))!.trim(), 'inpaint');
    });
  });

  test('pose mode shows the skeleton picture the API returned beside the result', async () => {
    const page = await newPage(posed);
    await page.waitForSelector('#model[data-loaded]');
    await page.selectOption('#model', 'pose-demo');
    await page.click('.tabs [data-mode="edit"]');
    await page.check('input[name="edit-mode"][value="pose"]');
    assert.equal(await page.isVisible('#strength'), false);
    const person = await personPng(320);
    await page.setInputFiles('#upload', { name: 'dancer.png', mimeType: 'image/png', buffer: person });
    await page.fill('#prompt', 'a dancer in a red dress');
    await page.selectOption('#size', `${SIZE}x${SIZE}`);
    await page.fill('#steps', '3');
    await page.selectOption('#seed-mode', 'fixed');
    await page.fill('#seed', '7');
    await page.click('#generate');
    await page.waitForSelector('#result[data-kind="final"]');
    assert.equal((await setting(page, 'mode'))!.trim(), 'pose');
    assert.equal((await setting(page, 'people'))!.trim(), '1');
    await page.waitForSelector('#pose-figure:not([hidden]) img');
    // The picture shown is the API's skeleton, pixel for pixel.
    const shown = await page.evaluate(async () => {
      const img = document.getElementById('pose-image') as any;
      await img.decode();
      const c = document.createElement('canvas');
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const ctx = c.getContext('2d')!;
      ctx.drawImage(img, 0, 0);
      return { width: c.width, height: c.height, rgba: Array.from(ctx.getImageData(0, 0, c.width, c.height).data) };
    });
    const form = new FormData();
    form.append('image', new Blob([person], { type: 'image/png' }), 'dancer.png');
    for (const [k, v] of Object.entries({ model: 'pose-demo', prompt: 'a dancer in a red dress', user: 'cn', size: `${SIZE}x${SIZE}`, steps: '3', seed: '7', response_format: 'b64_json' })) form.append(k, v);
    const api = (await (await fetch(`${posed.baseURL}/images/edits`, { method: 'POST', body: form })).json()) as any;
    const skeleton = await pixelsOf(Buffer.from(api.data[0].b64_json_pose, 'base64'));
    assert.deepEqual([shown.width, shown.height], [skeleton.width, skeleton.height]);
    let lit = 0;
    for (let i = 0; i < shown.width * shown.height; i++) {
      for (let c = 0; c < 3; c++) assert.equal(shown.rgba[i * 4 + c], skeleton.data[i * 3 + c], `pixel ${i}`);
      if (skeleton.data[i * 3]! + skeleton.data[i * 3 + 1]! + skeleton.data[i * 3 + 2]! > 0) lit++;
    }
    assert.ok(lit > 100, `a skeleton is drawn (${lit} pixels)`);
  });

  test('with an API key set, the page asks for it and shows the 401 message for a wrong one', async () => {
    const missing = envelope((await getJson(`${locked.baseURL}/models`)).json).message;
    const wrong = envelope((await getJson(`${locked.baseURL}/models`, { authorization: 'Bearer nope' })).json).message;
    const page = await newPage(locked);
    const authorized: string[] = [];
    page.on('request', (r) => {
      if (r.headers().authorization) authorized.push(`${r.url()} ${r.headers().authorization}`);
    });
    await page.waitForSelector('#key-dialog[open]');
    assert.equal((await page.textContent('#key-message'))!.trim(), missing);
    await page.fill('#key-input', 'nope');
    await page.click('#key-ok');
    await page.waitForFunction((m) => document.getElementById('key-message')!.textContent === m && (document.getElementById('key-dialog') as any).open, wrong);
    await page.fill('#key-input', KEY);
    await page.click('#key-ok');
    await page.waitForSelector('#model[data-loaded]');
    assert.equal(await page.isVisible('#key-dialog'), false);
    // The key works for generating too.
    await page.fill('#prompt', PROMPT);
    await page.selectOption('#size', `${SIZE}x${SIZE}`);
    await page.fill('#steps', '4');
    await page.click('#generate');
    await page.waitForSelector('#result[data-kind="final"]');
    assert.ok(authorized.length >= 2);
    for (const a of authorized) assert.ok(a.startsWith(`${locked.url}/v1/`) && /Bearer (nope|the-right-key)$/.test(a), a);
  });

  test('no page logged an error or a CSP violation', () => {
    // The 401s and 400s the tests provoke are answers the page handles; the browser logs failed loads as errors.
    const unexpected = pageErrors.filter((e) => !/status of (400|401)/.test(e));
    assert.deepEqual(unexpected, []);
  });
});
