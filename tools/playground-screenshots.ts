/**
 * Screenshots of the playground for the README (docs/playground-*.png), taken the way the
 * browser tests drive it (test/browser/harness.ts: Debian's Chromium, a real server on the
 * built-in kiln-tiny model):
 *
 *   node --import tsx tools/playground-screenshots.ts [--out docs]
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import sharp from 'sharp';
import type { Page } from 'playwright-core';
import { chromiumMissing, launchChromium, REPO_ROOT, startPlaygroundServer } from '../test/browser/harness.js';

const { values } = parseArgs({ options: { out: { type: 'string', default: join(REPO_ROOT, 'docs') } } });
const out = resolve(values.out!);
const missing = chromiumMissing();
if (missing) {
  console.error(missing);
  process.exit(1);
}
mkdirSync(out, { recursive: true });

/** A full-page screenshot, as a palette PNG (a third of the bytes; the page is flat colours but for the pictures). */
async function shoot(page: Page, name: string): Promise<void> {
  const path = join(out, name);
  writeFileSync(path, await sharp(await page.screenshot({ fullPage: true })).png({ palette: true, quality: 95, effort: 10 }).toBuffer());
  console.log(`wrote ${path}`);
}

const server = await startPlaygroundServer();
const browser = await launchChromium();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1, acceptDownloads: true });
  context.setDefaultTimeout(120_000);
  const page = await context.newPage();
  await page.goto(`${server.url}/`);
  await page.waitForSelector('#model[data-loaded]');

  async function generate(prompt: string, seed: number) {
    await page.fill('#prompt', prompt);
    await page.selectOption('#seed-mode', 'fixed');
    await page.fill('#seed', String(seed));
    await page.click('#generate');
    await page.waitForSelector(`#result[data-kind="final"][data-seed="${seed}"]`);
  }

  await page.selectOption('#model', 'kiln-tiny');
  await page.selectOption('#size', '512x512');
  await page.selectOption('#scheduler', 'dpmpp_2m');
  await generate('small yellow triangle at the top, black background', 11);
  await generate('a square that is white, green background', 12);
  await generate('a small purple circle at the bottom right on an orange background', 13);
  await generate('a large red circle at the left on a blue background', 42);
  await page.click('.code-tabs [data-lang="python"]');
  await shoot(page, 'playground-generate.png');

  // Inpainting: the red circle's picture, its circle painted over, redrawn as something else.
  const [file] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
  const picture = readFileSync(await file.path());
  await page.click('.tabs [data-mode="edit"]');
  await page.check('input[name="edit-mode"][value="inpaint"]');
  await page.setInputFiles('#upload', { name: 'circle.png', mimeType: 'image/png', buffer: picture });
  await page.waitForSelector('#mask-canvas:visible');
  await page.fill('#brush-size', '70');
  const box = (await page.locator('#mask-canvas').boundingBox())!;
  const at = (fx: number, fy: number) => [box.x + fx * box.width, box.y + fy * box.height] as const;
  await page.mouse.move(...at(0.12, 0.3));
  await page.mouse.down();
  for (const [fx, fy] of [[0.45, 0.3], [0.45, 0.45], [0.1, 0.45], [0.1, 0.62], [0.45, 0.62], [0.4, 0.72], [0.15, 0.72]] as const) {
    await page.mouse.move(...at(fx, fy), { steps: 8 });
  }
  await page.mouse.up();
  await page.fill('#prompt', 'a large yellow square at the left on a blue background');
  await page.selectOption('#size', '512x512');
  await page.selectOption('#seed-mode', 'fixed');
  await page.fill('#seed', '7');
  await page.click('#generate');
  await page.waitForSelector('#result[data-kind="final"][data-seed="7"]');
  await page.click('.code-tabs [data-lang="curl"]');
  await shoot(page, 'playground-inpaint.png');
  await context.close();
} finally {
  await browser.close();
  await server.close();
}
