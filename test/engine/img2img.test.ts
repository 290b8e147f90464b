import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { DiffusionModel } from '../../src/engine/model.js';
import { img2img, prepareInitImage } from '../../src/engine/img2img.js';
import { InvalidOptionError } from '../../src/engine/errors.js';
import type { OnnxModel, Feed } from '../../src/engine/onnx.js';

const models: DiffusionModel[] = [];
after(() => Promise.all(models.map((m) => m.release())));
async function load(variant: 'sd15-optimum124' | 'sd15-optimum' | 'sdxl'): Promise<DiffusionModel> {
  const m = await DiffusionModel.load(await ensureFixture(variant));
  models.push(m);
  return m;
}

/** A 300x200 RGBA picture: red left half, transparent right half. */
async function samplePng(color = { r: 220, g: 40, b: 40 }): Promise<Buffer> {
  const left = await sharp({ create: { width: 150, height: 200, channels: 4, background: { ...color, alpha: 1 } } }).png().toBuffer();
  return sharp({ create: { width: 300, height: 200, channels: 4, background: { r: 0, g: 0, b: 0, alpha: 0 } } })
    .composite([{ input: left, left: 0, top: 0 }])
    .png()
    .toBuffer();
}

test('prepareInitImage: alpha on white, centre square crop, resized to the output size', async () => {
  const image = await prepareInitImage(await samplePng(), 64, 64);
  assert.equal(image.width, 64);
  assert.equal(image.height, 64);
  assert.equal(image.pixels.length, 64 * 64 * 3);
  const px = (x: number, y: number) => Array.from(image.pixels.subarray((y * 64 + x) * 3, (y * 64 + x) * 3 + 3));
  // The centred 200x200 square spans x 50..250: red on its left quarter, white (was transparent) on the right.
  assert.deepEqual(px(2, 32), [220, 40, 40]);
  assert.deepEqual(px(60, 32), [255, 255, 255]);
});

test('img2img: size, determinism per seed, steps follow strength, input matters', async () => {
  const model = await load('sd15-optimum124'); // latent_parameters: Kiln samples the latent itself
  const image = await prepareInitImage(await samplePng(), 256, 256);
  const other = await prepareInitImage(await samplePng({ r: 40, g: 80, b: 220 }), 256, 256);
  const base = { prompt: 'a red square', seed: 5, size: '256x256', steps: 10, image };
  const a = await img2img(model, { ...base, strength: 0.3 });
  const b = await img2img(model, { ...base, strength: 0.3 });
  const c = await img2img(model, { ...base, strength: 0.3, seed: 6 });
  const d = await img2img(model, { ...base, strength: 0.3, image: other });
  assert.equal(a.image.width, 256);
  assert.deepEqual(a.image.pixels, b.image.pixels);
  assert.notDeepEqual(a.image.pixels, c.image.pixels);
  assert.notDeepEqual(a.image.pixels, d.image.pixels);
  assert.equal(a.unetCalls, 3, 'strength 0.3 of 10 steps runs the last 3');
  assert.equal((await img2img(model, { ...base, strength: 1 })).unetCalls, 10);
  assert.equal(a.settings.strength, 0.3);
});

test('img2img works with every scheduler and the in-graph-sampling encoder form', async () => {
  const model = await load('sd15-optimum'); // latent_sample, sampled inside the graph
  const image = await prepareInitImage(await samplePng(), 256, 256);
  for (const scheduler of ['euler', 'euler_a', 'ddim', 'dpmpp_2m', 'dpmpp_2m_karras', 'dpm_single', 'unipc', 'lcm']) {
    const r = await img2img(model, { prompt: 'x', seed: 1, size: '256x256', steps: 6, strength: 0.5, scheduler, image });
    assert.equal(r.unetCalls, 3, scheduler);
    assert.equal(r.image.width, 256);
  }
});

test('img2img on SDXL feeds CFG batch 2 and encodes with the VAE encoder', async () => {
  const model = await load('sdxl');
  const seen: number[] = [];
  const unet = model.unet as OnnxModel;
  const run = unet.run.bind(unet);
  unet.run = (feeds: Record<string, Feed>, out: string[]) => {
    seen.push(feeds.sample!.dims[0]!);
    return run(feeds, out);
  };
  const image = await prepareInitImage(await samplePng(), 256, 256);
  const r = await img2img(model, { prompt: 'x', seed: 1, size: '256x256', steps: 4, strength: 0.5, image });
  assert.equal(r.image.height, 256);
  assert.deepEqual(seen, [2, 2]);
});

test('bad strength and mismatched input size are InvalidOptionErrors', async () => {
  const model = await load('sd15-optimum124');
  const image = await prepareInitImage(await samplePng(), 256, 256);
  for (const strength of [0, -0.5, 1.5, NaN]) {
    await assert.rejects(img2img(model, { prompt: 'x', seed: 1, size: '256x256', image, strength }), (e: unknown) => e instanceof InvalidOptionError && e.param === 'strength');
  }
  await assert.rejects(img2img(model, { prompt: 'x', seed: 1, size: '512x512', image }), (e: unknown) => e instanceof InvalidOptionError && e.param === 'image');
});
