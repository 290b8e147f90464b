import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import sharp from 'sharp';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { DiffusionModel } from '../../src/engine/model.js';
import { prepareInitImage, img2img } from '../../src/engine/img2img.js';
import { checkMaskMatchesImage, inpaint, latentMask, prepareMask } from '../../src/engine/inpaint.js';
import { replaceRandomNormalLike } from '../../src/engine/seeded-sampling.js';
import { InvalidOptionError } from '../../src/engine/errors.js';

const models: DiffusionModel[] = [];
after(() => Promise.all(models.map((m) => m.release())));
async function load(variant: 'sd15-optimum' | 'sd15-optimum124' | 'sdxl'): Promise<DiffusionModel> {
  const m = await DiffusionModel.load(await ensureFixture(variant));
  models.push(m);
  return m;
}

const W = 256;
const solid = (r: number, g: number, b: number, alpha = 1, size = W) =>
  sharp({ create: { width: size, height: size, channels: 4, background: { r, g, b, alpha } } }).png().toBuffer();

/** A square mask picture: the centre 96x96 square marked, in the given convention. */
function centreMask(convention: 'alpha' | 'white', size = W): Promise<Buffer> {
  const inner = 96;
  const lo = (size - inner) / 2;
  const rgba = Buffer.alloc(size * size * 4);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const marked = x >= lo && x < lo + inner && y >= lo && y < lo + inner;
      const i = (y * size + x) * 4;
      if (convention === 'alpha') rgba.set([10, 10, 10, marked ? 0 : 255], i);
      else rgba.set(marked ? [255, 255, 255, 255] : [0, 0, 0, 255], i);
    }
  }
  return sharp(rgba, { raw: { width: size, height: size, channels: 4 } }).png().toBuffer();
}

test('both mask conventions give the same repaint region', async () => {
  for (const convention of ['alpha', 'white'] as const) {
    const mask = await prepareMask(await centreMask(convention), W, W);
    assert.equal(mask.length, W * W);
    assert.equal(mask[128 * W + 128], 1, `${convention}: centre is repainted`);
    assert.equal(mask[5 * W + 5], 0, `${convention}: corner is kept`);
    const marked = mask.reduce((n, v) => n + (v >= 0.5 ? 1 : 0), 0);
    assert.ok(Math.abs(marked - 96 * 96) < 400, `${convention}: ${marked} pixels marked`);
  }
  // An opaque mask with no white repaints nothing; a fully transparent one repaints everything.
  assert.equal((await prepareMask(await solid(0, 0, 0), W, W)).reduce((a, b) => a + b, 0), 0);
  assert.equal((await prepareMask(await solid(0, 0, 0, 0), W, W)).reduce((a, b) => a + b, 0), W * W);
});

test('latent mask marks a cell when any of its pixels is marked', () => {
  const mask = new Float32Array(16 * 16);
  mask[9 * 16 + 9] = 1;
  assert.deepEqual(Array.from(latentMask(mask, 16, 16)), [0, 0, 0, 1]);
});

test('a mask of other dimensions is refused with param "mask"', async () => {
  await assert.rejects(checkMaskMatchesImage(await solid(1, 2, 3), await centreMask('white', 128)), (e: unknown) => e instanceof InvalidOptionError && e.param === 'mask' && /128x128/.test(e.message));
  await checkMaskMatchesImage(await solid(1, 2, 3), await centreMask('white'));
});

test('inpainting changes the masked region and keeps the rest (latent blending, any model)', async () => {
  for (const variant of ['sd15-optimum', 'sdxl'] as const) {
    const model = await load(variant);
    const image = await prepareInitImage(await solid(40, 180, 70), W, W);
    const mask = await prepareMask(await centreMask('alpha'), W, W);
    const result = await inpaint(model, { prompt: 'a red circle', seed: 3, size: '256x256', steps: 6, image, mask });
    let inside = 0;
    let outside = 0;
    let nIn = 0;
    let nOut = 0;
    for (let i = 0; i < W * W; i++) {
      const d = Math.abs(result.image.pixels[i * 3]! - image.pixels[i * 3]!) + Math.abs(result.image.pixels[i * 3 + 1]! - image.pixels[i * 3 + 1]!);
      const x = i % W;
      const y = Math.floor(i / W);
      const far = Math.max(Math.abs(x - 128), Math.abs(y - 128));
      if (far < 40) (inside += d), nIn++;
      else if (far > 60) (outside += d), nOut++;
    }
    assert.ok(outside / nOut < 1, `${variant}: outside the mask stays the input (mean diff ${outside / nOut})`);
    assert.ok(inside / nIn > 20, `${variant}: inside the mask is repainted (mean diff ${inside / nIn})`);
    const again = await inpaint(model, { prompt: 'a red circle', seed: 3, size: '256x256', steps: 6, image, mask });
    assert.deepEqual(again.image.pixels, result.image.pixels, `${variant}: deterministic`);
  }
});

test('in-graph VAE sampling is replaced by a seeded noise input', async () => {
  const dir = await ensureFixture('sd15-optimum');
  const patched = replaceRandomNormalLike(readFileSync(join(dir, 'vae_encoder/model.onnx')));
  assert.ok(patched, 'the fixture samples in-graph');
  assert.equal(patched.noiseInputs.length, 1);
  assert.equal(replaceRandomNormalLike(readFileSync(join(dir, 'vae_decoder/model.onnx'))), undefined);
  // img2img on that encoder form is now reproducible per seed.
  const model = await load('sd15-optimum');
  const image = await prepareInitImage(await solid(220, 40, 40), W, W);
  const run = (seed: number) => img2img(model, { prompt: 'x', seed, size: '256x256', steps: 4, strength: 0.5, image });
  const [a, b, c] = [await run(1), await run(1), await run(2)];
  assert.deepEqual(a.image.pixels, b.image.pixels);
  assert.notDeepEqual(a.image.pixels, c.image.pixels);
});
