/**
 * Streamed partial images from the family's tiny VAE decoder, through the official SDK against a
 * real server: with $KILN_HOME/previews/taesdxl installed (the diffusers-made fixture of
 * test/graphs/taesd.test.ts) an SDXL model's partials are its pictures; removed, the same request
 * gets the linear map's; installed again, the tiny decoder's again, without a restart. The
 * completed image is the same bytes every time.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { PREVIEWS_DIR } from '../../src/engine/tiny-decoder.js';
import { makeHome, startTestServer, type TestServer } from './helpers.js';

const TAESD_FIXTURE = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'taesd');

let t: TestServer;
let home: string;
const savedBudget = process.env.KILN_PREVIEW_BUDGET;
before(async () => {
  home = await makeHome({ 'kiln-tiny-xl': 'sdxl' });
  // The server's runner reads it when it starts and hands it to its engines: the decoder is used whatever it costs
  // beside the tiny model on a loaded host, so that the test does not depend on timings.
  process.env.KILN_PREVIEW_BUDGET = 'Infinity';
  t = await startTestServer({ home });
});
after(async () => {
  await t.close();
  rmSync(home, { recursive: true, force: true });
  if (savedBudget === undefined) delete process.env.KILN_PREVIEW_BUDGET;
  else process.env.KILN_PREVIEW_BUDGET = savedBudget;
});

function install(): void {
  const dir = join(home, PREVIEWS_DIR, 'taesdxl');
  mkdirSync(dir, { recursive: true });
  for (const f of ['config.json', 'diffusion_pytorch_model.safetensors']) copyFileSync(join(TAESD_FIXTURE, f), join(dir, f));
}

type AnyEvent = Record<string, any>;

async function streamed(): Promise<{ partials: Buffer[]; final: Buffer }> {
  const stream = await t.client().images.generate({
    prompt: 'a red circle on a blue background',
    size: '256x256',
    steps: 6,
    seed: 5,
    response_format: 'b64_json',
    stream: true,
    partial_images: 2,
  } as any);
  const events: AnyEvent[] = [];
  for await (const e of stream as unknown as AsyncIterable<AnyEvent>) events.push(e);
  assert.deepEqual(
    events.map((e) => e.type),
    ['image_generation.partial_image', 'image_generation.partial_image', 'image_generation.completed'],
  );
  const partials = events.slice(0, 2).map((e) => Buffer.from(e.b64_json, 'base64'));
  for (const p of partials) {
    const meta = await sharp(p).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', 256, 256]);
  }
  return { partials, final: Buffer.from(events[2]!.b64_json, 'base64') };
}

test('with previews/taesdxl the partials are the tiny decoder\'s; removed, the linear map\'s; back, the decoder\'s again', async () => {
  install();
  const tiny = await streamed();
  rmSync(join(home, PREVIEWS_DIR, 'taesdxl'), { recursive: true });
  const linear = await streamed();
  install();
  const again = await streamed();
  for (let i = 0; i < 2; i++) {
    assert.ok(!tiny.partials[i]!.equals(linear.partials[i]!), `partial ${i}: the tiny decoder draws another picture than the linear map`);
    assert.ok(again.partials[i]!.equals(tiny.partials[i]!), `partial ${i}: the reinstalled decoder draws the same`);
  }
  assert.ok(!tiny.partials[0]!.equals(tiny.partials[1]!), 'each partial is its own picture');
  assert.ok(linear.final.equals(tiny.final) && again.final.equals(tiny.final), 'previews never change the image');
});
