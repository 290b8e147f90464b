/**
 * Sizes beyond the squares, through the real server and its workers on fixture models: OpenAI's
 * wide and tall sizes, `auto`, and WxH within the family's range, in every mode (txt2img,
 * image-to-image, inpainting, pose); a size the model cannot take is a 400 before any job runs.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { toFile } from 'openai';
import { ensureControlNetFixture, ensureFixture, ensurePoseFixture } from '../../tools/fixtures/variants.js';
import { envelope, linkFarm, makeHome, pixelsOf, postJson, rgbPng, startTestServer, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  const home = await makeHome({ xl: 'sdxl', sd15: 'sd15-optimum' });
  // An SD 1.5 model with its own pose assets (ControlNet-UNet, OpenPose ControlNet, DWPose stand-ins).
  const cn = linkFarm(await ensureFixture('sd15-controlnet'), join(home, 'models', 'sd15-cn'));
  linkFarm(await ensureControlNetFixture('sd15-openpose'), join(cn, 'controlnet-openpose'), ['annotators']);
  mkdirSync(join(cn, 'annotators'));
  symlinkSync(await ensurePoseFixture(), join(cn, 'annotators', 'dwpose'));
  t = await startTestServer({ home, defaultModel: 'xl' });
});
after(async () => {
  await t.close();
  rmSync(t.home, { recursive: true, force: true });
});

const GEN = () => `${t.baseURL}/images/generations`;
const FAST = { prompt: 'a red circle on a blue background', steps: 2, n: 3, response_format: 'b64_json' } as const;
const decoded = (json: any, key = 'b64_json') => pixelsOf(Buffer.from(json.data[0][key], 'base64'));

test('txt2img: OpenAI sizes, auto (the native size) and WxH in range, on SDXL and SD 1.x', async () => {
  const cases: [string, string, string][] = [
    ['xl', '1536x1024', '1536x1024'],
    ['xl', '1024x1792', '1024x1792'],
    ['xl', '384x256', '384x256'],
    ['xl', '2048x256', '2048x256'],
    ['xl', 'auto', '1024x1024'], // the fixture's unet/config.json: sample_size 128
    ['sd15', 'auto', '512x512'], // sample_size 64
    ['sd15', '1792x1024', '1792x1024'], // named sizes work on every model
    ['sd15', '256x640', '256x640'],
  ];
  for (const [model, size, expected] of cases) {
    const r = await postJson(GEN(), { ...FAST, model, size });
    assert.equal(r.status, 200, `${model} ${size}: ${r.text.slice(0, 300)}`);
    assert.equal(r.json.size, expected);
    assert.equal(r.headers.get('x-kiln-size'), expected);
    const img = await decoded(r.json);
    assert.equal(`${img.width}x${img.height}`, expected, `${model} ${size}`);
  }
});

test('a size outside the model family\'s range is a 400 naming the range, answered before a worker loads anything', async () => {
  const cases: [string, string, RegExp][] = [
    ['xl', '2112x1024', /from 256 to 2048/],
    ['xl', '192x256', /from 256 to 2048/],
    ['xl', '400x256', /multiples of 64/],
    ['sd15', '1280x1280', /from 256 to 1024/],
  ];
  const native: Record<string, string> = { xl: '1024x1024', sd15: '512x512' };
  for (const [model, size, message] of cases) {
    const r = await postJson(GEN(), { ...FAST, model, size });
    assert.equal(r.status, 400, `${model} ${size}`);
    const e = envelope(r.json);
    assert.equal(e.param, 'size');
    assert.match(e.message, message);
    assert.ok(e.message.includes(`auto (the model's native size, ${native[model]})`), e.message);
  }
  const ping = (await (await fetch(`${t.url}/ping`)).json()) as { active: number; queued: number };
  assert.equal(ping.active + ping.queued, 0);
});

/** A wide picture: left third red, the rest blue (so a crop or a squeeze would show). */
const wide = () => rgbPng(384, 256, (x) => (x < 128 ? [220, 30, 30] : [30, 30, 220]));

test('image-to-image and inpainting at non-square sizes; auto keeps the upload\'s shape', async () => {
  const client = t.client();
  const image = () => toFile(wide(), 'wide.png', { type: 'image/png' });
  const i2i = (await client.images.edit({ ...FAST, model: 'xl', image: await image(), size: '384x256' } as any)) as any;
  assert.equal(i2i.kiln.mode, 'img2img');
  assert.deepEqual(await decoded(i2i).then((p) => [p.width, p.height]), [384, 256]);

  // auto: a 3:2 upload at the model's native area (SD 1.5 fixture: 512x512) -> 640x448, multiples of 64.
  const auto = (await client.images.edit({ ...FAST, model: 'sd15', image: await image(), size: 'auto' } as any)) as any;
  assert.equal(auto.size, '640x448');
  assert.deepEqual(await decoded(auto).then((p) => [p.width, p.height]), [640, 448]);

  // Inpainting: repaint the right half; the left third (outside the mask, away from the seam) stays the upload's red.
  const mask = await rgbPng(384, 256, (x) => (x >= 192 ? [255, 255, 255] : [0, 0, 0]));
  const inp = (await client.images.edit({
    ...FAST,
    model: 'xl',
    image: await image(),
    mask: await toFile(mask, 'mask.png', { type: 'image/png' }),
    size: '384x256',
  } as any)) as any;
  assert.equal(inp.kiln.mode, 'inpaint');
  const out = await decoded(inp);
  assert.deepEqual([out.width, out.height], [384, 256]);
  for (const [x, y] of [
    [10, 10],
    [100, 200],
    [60, 128],
  ]) {
    const i = (y * out.width + x) * 3;
    assert.deepEqual([...out.data.subarray(i, i + 3)], [220, 30, 30], `unmasked pixel ${x},${y} kept`);
  }
});

test('pose mode at a non-square size: the skeleton is drawn where the person stands in the upload', async () => {
  // A bright upright "person" (the DWPose stand-in's notion) at the left of a wide, dark picture.
  const person = await rgbPng(384, 256, (x, y) => (x >= 40 && x < 100 && y >= 40 && y < 230 ? [240, 240, 240] : [20, 20, 20]));
  const r = (await t.client().images.edit({ ...FAST, model: 'sd15-cn', image: await toFile(person, 'p.png', { type: 'image/png' }), user: 'cn', size: '384x256' } as any)) as any;
  assert.equal(r.kiln.mode, 'pose');
  assert.equal(r.kiln.people, 1);
  const [image, pose] = await Promise.all([decoded(r), decoded(r, 'b64_json_pose')]);
  assert.deepEqual([image.width, image.height, pose.width, pose.height], [384, 256, 384, 256]);
  // The skeleton's horizontal centre follows the person's (x 40..100 of 384), not a centre-square crop's.
  let sum = 0;
  let count = 0;
  for (let y = 0; y < pose.height; y++) {
    for (let x = 0; x < pose.width; x++) {
      const i = (y * pose.width + x) * 3;
      if (pose.data[i]! + pose.data[i + 1]! + pose.data[i + 2]! > 120) {
        sum += x;
        count++;
      }
    }
  }
  assert.ok(count > 50, `skeleton pixels: ${count}`);
  const centre = sum / count / pose.width;
  assert.ok(Math.abs(centre - 70 / 384) < 0.08, `skeleton centre at ${centre.toFixed(3)} of the width, the person's at ${(70 / 384).toFixed(3)}`);
});
