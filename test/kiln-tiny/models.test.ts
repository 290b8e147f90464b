/**
 * The committed kiln-tiny models (models/kiln-tiny, models/kiln-tiny-xl) through Kiln's engine,
 * judged by pixels with the world's scorer: a few captions from the whole world at default
 * quality must come out right at 256x256, 512x512 and 1024x1024 (the API's default; the models
 * declare native_size 256 in kiln.json, so larger pictures are the 256 ones resized), and the same
 * images must score as wrong against other captions (so the check can fail). The full accuracy
 * run is `npm run bench:eval-tiny` (`--size` for the larger sizes).
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { DiffusionModel } from '../../src/engine/model.js';
import { generate } from '../../src/engine/pipeline.js';
import { builtinModelsDir, locateModel } from '../../src/engine/locate.js';
import {
  ACCURACY_BAR, accuracy, describe, emptyTally, scoreImage, tallyImage, worldCaptions, type ScoredImage,
} from '../../bench/tiny-world.js';
import { startTestServer } from '../server/helpers.js';
import sharp from 'sharp';

const PAIRS = worldCaptions(10, 2026);
const SIZES = [256, 512, 1024];

for (const name of ['kiln-tiny', 'kiln-tiny-xl']) {
  test(`${name} draws what 10 captions from the world say at 256, 512 and 1024 (scored by pixels)`, async (ctx) => {
    const model = await DiffusionModel.load(locateModel(name, [builtinModelsDir()]), { device: 'cpu' });
    try {
      const scored: ScoredImage[] = [];
      const tally = emptyTally();
      const misses: string[] = [];
      for (const [i, pair] of PAIRS.entries()) {
        const side = SIZES[i % SIZES.length]!;
        const r = await generate(model, { prompt: pair.caption, seed: 1000 + i, size: `${side}x${side}` });
        assert.equal(r.settings.steps, 25);
        assert.equal(r.image.width, side);
        assert.equal(r.settings.width, side);
        const s = scoreImage(r.image.pixels, r.image.width, r.image.height);
        scored.push(s);
        const wrong = tallyImage(tally, pair, s);
        if (wrong.length) misses.push(`"${pair.caption}" at ${side} -> ${describe(s)} (${wrong.join(', ')})`);
      }
      ctx.diagnostic(`accuracy ${JSON.stringify(accuracy(tally))}; misses: ${misses.join('; ') || 'none'}`);
      // Ten images cannot show 90% (one unlucky draw is 10 points, and onnxruntime's float results differ a
      // little between CPUs): this is a smoke check, the bar less 0.2, at most 3 of 10 images with a miss.
      // The 200-pair figures are the benchmark's (npm run bench:eval-tiny). The previously committed,
      // undertrained models fail it (8 and 9 of these 10 images with a miss; fg 0.5, shape 0.5/0.4).
      const acc = accuracy(tally);
      for (const [attr, bar] of Object.entries(ACCURACY_BAR)) {
        const min = bar! - 0.2;
        assert.ok(acc[attr as keyof typeof acc] >= min, `${attr} ${acc[attr as keyof typeof acc]} < ${min}; misses:\n${misses.join('\n')}`);
      }
      assert.ok(misses.length <= 3, misses.join('\n'));
      // The same pictures against the next pair's caption: colours and shapes no longer match.
      const shifted = emptyTally();
      scored.forEach((s, i) => tallyImage(shifted, PAIRS[(i + 1) % PAIRS.length]!, s));
      const off = accuracy(shifted);
      assert.ok(off.fg < 0.6 && off.shape < 0.8, JSON.stringify(off));
    } finally {
      await model.release();
    }
  });
}

test('kiln serve with only the built-in models: kiln-tiny-xl is the default; 512x512 and 1024x1024 come back at that size', async () => {
  const t = await startTestServer({ models: {}, searchDirs: [builtinModelsDir()] });
  try {
    const client = t.client();
    const ids = (await client.models.list()).data.map((m) => m.id).sort();
    assert.deepEqual(ids, ['kiln-tiny', 'kiln-tiny-xl']);
    for (const [model, size] of [['kiln-tiny-xl', '512x512'], ['kiln-tiny', '1024x1024'], [undefined, '1024x1024']] as const) {
      const res = await client.images.generate({
        prompt: 'a large green square on a white background', size, n: 3, response_format: 'b64_json', quality: 'draft',
        ...(model ? { model } : {}),
      } as any);
      assert.equal((res as any).kiln.model, model ?? 'kiln-tiny-xl');
      const meta = await sharp(Buffer.from(res.data![0]!.b64_json!, 'base64')).metadata();
      assert.equal(`${meta.width}x${meta.height}`, size);
    }
  } finally {
    await t.close();
  }
});

test('kiln-tiny: a weight below 1 takes the word out of the picture (compel\'s rule, REMOVE mode on its ONNX encoder)', async () => {
  const model = await DiffusionModel.load(locateModel('kiln-tiny', [builtinModelsDir()]), { device: 'cpu' });
  try {
    const base = { seed: 7, size: '256x256', steps: 12 };
    const draw = async (prompt: string) => (await generate(model, { ...base, prompt })).image.pixels;
    const plain = await draw('a large red circle at the left on a blue background');
    const change = (pixels: ArrayLike<number>) => {
      let sum = 0;
      for (let i = 0; i < pixels.length; i++) sum += Math.abs(pixels[i]! - plain[i]!);
      return sum / pixels.length;
    };
    assert.deepEqual(await draw('a large (red)1.0 circle at the left on a blue background'), plain);
    const down = change(await draw('a large (red)0.1 circle at the left on a blue background'));
    assert.ok(down > 5, `weight 0.1 changed pixels by ${down.toFixed(2)} of 255`);
  } finally {
    await model.release();
  }
});
