/**
 * Previews (src/engine/preview.ts): which steps, the linear latent -> RGB map fitted from a real
 * VAE (kiln-tiny's own, whose latents look like no stock family's), partial images through a real
 * generation, and the fit from a finished image for a model without a VAE encoder.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { DiffusionModel } from '../../src/engine/model.js';
import { builtinModelsDir, locateModel } from '../../src/engine/locate.js';
import { generate } from '../../src/engine/pipeline.js';
import type { RgbImage } from '../../src/engine/vae.js';
import {
  createPreviewer,
  fitFromImage,
  latentRgbMap,
  latentsToRgb,
  learnFromResult,
  previewSteps,
  type LatentRgbMap,
  type PartialImage,
} from '../../src/engine/preview.js';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { linkFarm } from '../server/helpers.js';

const loaded: DiffusionModel[] = [];
const temp: string[] = [];
after(async () => {
  await Promise.all(loaded.map((m) => m.release()));
  for (const dir of temp) rmSync(dir, { recursive: true, force: true });
});

async function load(dir: string): Promise<DiffusionModel> {
  const model = await DiffusionModel.load(dir);
  loaded.push(model);
  return model;
}

/** Mean absolute difference (0-255) between a preview (one pixel per latent cell) and the image's 8x8 block means. */
function blockError(preview: RgbImage, image: RgbImage): number {
  let sum = 0;
  for (let y = 0; y < preview.height; y++) {
    for (let x = 0; x < preview.width; x++) {
      for (let k = 0; k < 3; k++) {
        let mean = 0;
        for (let dy = 0; dy < 8; dy++) for (let dx = 0; dx < 8; dx++) mean += image.pixels[((y * 8 + dy) * image.width + x * 8 + dx) * 3 + k]!;
        sum += Math.abs(mean / 64 - preview.pixels[(y * preview.width + x) * 3 + k]!);
      }
    }
  }
  return sum / (preview.width * preview.height * 3);
}

const GREY: LatentRgbMap = { weights: new Float64Array(12), bias: new Float64Array(3), source: 'vae-encoder' };
const request = { prompt: 'a large red circle at the left on a blue background', seed: 3, size: '256x256', steps: 8 };

test('previewSteps: spread at k/(n+1), never the last step, fewer when the run is short', () => {
  assert.deepEqual(previewSteps(25, 3), [6, 13, 19]);
  assert.deepEqual(previewSteps(8, 3), [2, 4, 6]);
  assert.deepEqual(previewSteps(6, 2), [2, 4]);
  assert.deepEqual(previewSteps(25, 1), [13]);
  assert.deepEqual(previewSteps(4, 3), [1, 2, 3]);
  assert.deepEqual(previewSteps(2, 3), [1]);
  assert.deepEqual(previewSteps(1, 3), []);
  assert.deepEqual(previewSteps(25, 0), []);
});

test('kiln-tiny: the map fitted from its VAE encoder previews the final latents close to the decoded image', async () => {
  const model = await load(locateModel('kiln-tiny', [builtinModelsDir()]));
  const map = (await latentRgbMap(model))!;
  assert.equal(map.source, 'vae-encoder');
  assert.equal(await latentRgbMap(model), map, 'fitted once per VAE');
  const result = await generate(model, request);
  const dims = [1, 4, 32, 32];
  const error = blockError(latentsToRgb(map, result.latents, dims), result.image);
  const greyError = blockError(latentsToRgb(GREY, result.latents, dims), result.image);
  assert.ok(error < 35 && error < greyError / 2, `preview error ${error.toFixed(1)} (a flat grey: ${greyError.toFixed(1)})`);
  // Fitted on the image itself, the same kind of map does at least as well.
  const own = fitFromImage(result.latents, dims, result.image);
  assert.equal(own.source, 'final-image');
  assert.ok(blockError(latentsToRgb(own, result.latents, dims), result.image) <= error + 1);
});

test('partial images through a generation: at the planned steps, in order, at the image size; the image itself unchanged', async () => {
  const model = await load(locateModel('kiln-tiny', [builtinModelsDir()]));
  const partials: PartialImage[] = [];
  const previewer = createPreviewer(model, { count: 3, width: 256, height: 256, format: 'png', onPartial: (p) => partials.push(p) });
  const withPreviews = await generate(model, { ...request, onStepLatents: previewer.onStepLatents });
  await previewer.flush();
  assert.deepEqual(partials.map((p) => [p.index, p.step, p.totalSteps]), [[0, 2, 8], [1, 4, 8], [2, 6, 8]]);
  for (const p of partials) {
    const meta = await sharp(p.bytes).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', 256, 256]);
  }
  // The last partial already looks like the result: compared at 32x32, block means against pixels.
  const { data } = await sharp(partials[2]!.bytes).resize(32, 32, { kernel: 'nearest' }).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  const last: RgbImage = { width: 32, height: 32, pixels: new Uint8Array(data) };
  assert.ok(blockError(last, withPreviews.image) < 45, `last partial vs final: ${blockError(last, withPreviews.image).toFixed(1)}`);
  const without = await generate(model, request);
  assert.deepEqual(withPreviews.image.pixels, without.image.pixels);
});

test('a model without a VAE encoder: no previews until a finished image has taught it the map', async () => {
  const dir = linkFarm(await ensureFixture('sd15-optimum'), join(mkdtempSync(join(tmpdir(), 'kiln-preview-')), 'no-encoder'), ['vae_encoder']);
  temp.push(join(dir, '..'));
  const model = await load(dir);
  assert.equal(model.layout.hasVaeEncoder, false);
  assert.equal(await latentRgbMap(model), undefined);
  const run = async () => {
    const partials: PartialImage[] = [];
    const previewer = createPreviewer(model, { count: 2, width: 256, height: 256, format: 'webp', onPartial: (p) => partials.push(p) });
    const result = await generate(model, { ...request, onStepLatents: previewer.onStepLatents });
    await previewer.flush();
    return { result, partials };
  };
  const first = await run();
  assert.equal(first.partials.length, 0);
  await learnFromResult(model, first.result);
  assert.equal((await latentRgbMap(model))?.source, 'final-image');
  const second = await run();
  assert.deepEqual(second.partials.map((p) => p.step), [3, 5]);
  assert.equal((await sharp(second.partials[0]!.bytes).metadata()).format, 'webp');
});
