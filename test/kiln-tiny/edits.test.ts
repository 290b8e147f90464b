/**
 * Edits with the built-in kiln-tiny models, through the official SDK: image-to-image at
 * strength 0.3 keeps what a world image shows (scored by pixels), and inpainting repaints the
 * masked region and nothing else, at 256x256 and (drawn at the models' native 256, the input and
 * mask brought down and the result up) at 512x512.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { toFile } from 'openai';
import sharp from 'sharp';
import { builtinModelsDir } from '../../src/engine/locate.js';
import { captionFor, describe, renderWorldImage, scoreImage, type WorldImage } from '../../bench/tiny-world.js';
import { createRng } from '../../src/engine/rng.js';
import { startTestServer, type TestServer } from '../server/helpers.js';

const SIZE = 256;
let t: TestServer;
before(async () => {
  t = await startTestServer({ models: {}, searchDirs: [builtinModelsDir()] });
});
after(async () => {
  await t?.close();
});

const pngOf = (rgb: Uint8Array | Buffer, channels: 1 | 3 = 3, size = SIZE) =>
  sharp(rgb, { raw: { width: size, height: size, channels } }).png().toBuffer();
const rgbOf = async (png: Buffer) => new Uint8Array(await sharp(png).removeAlpha().raw().toBuffer());
const allStated = { bg: true, fg: true, shape: true, size: true, pos: true };

async function edit(fields: Record<string, unknown>, size = SIZE): Promise<Uint8Array> {
  const res = await t.client().images.edit({ size: `${size}x${size}`, response_format: 'b64_json', ...fields } as any);
  const png = Buffer.from(res.data![0]!.b64_json!, 'base64');
  const meta = await sharp(png).metadata();
  assert.equal(`${meta.width}x${meta.height}`, `${size}x${size}`);
  return rgbOf(png);
}

const WORLD: WorldImage[] = [
  { bg: 2, fg: 0, shape: 0, size: 1, pos: 0 }, // large red circle, centre, blue
  { bg: 6, fg: 5, shape: 1, size: 1, pos: 1 }, // large purple square, left, white
  { bg: 7, fg: 3, shape: 2, size: 1, pos: 3 }, // large yellow triangle, top, black
];

for (const model of ['kiln-tiny', 'kiln-tiny-xl']) {
  test(`${model}: image-to-image at strength 0.3 keeps the shape, colours, size and place of world images`, async (ctx) => {
    for (const [i, image] of WORLD.entries()) {
      const input = renderWorldImage(image);
      // A caption of another form than the picture's own words: the picture must carry it.
      const { caption } = captionFor(image, createRng(i));
      const out = await edit({ model, image: await toFile(await pngOf(input), 'world.png', { type: 'image/png' }), prompt: caption, n: 40 + i, strength: 0.3 });
      const seen = scoreImage(out, SIZE, SIZE);
      assert.deepEqual(seen, image, `${model}: "${caption}": asked ${describe(image)}, saw ${describe(seen)}`);
      let diff = 0;
      for (let p = 0; p < input.length; p++) diff += Math.abs(out[p]! - input[p]!);
      ctx.diagnostic(`${describe(image)}: scored ${describe(seen)}, mean |diff| ${(diff / input.length).toFixed(2)}`);
      assert.ok(diff / input.length < 20, `mean |diff| ${diff / input.length}`);
    }
  });

  for (const S of model === 'kiln-tiny-xl' ? [SIZE, 512] : [SIZE]) test(`${model}: inpainting at ${S}x${S} repaints the masked region only`, async (ctx) => {
    const image: WorldImage = { bg: 2, fg: 0, shape: 1, size: 1, pos: 0 }; // large red square on blue
    const input = renderWorldImage(image, S);
    // White = repaint: a box around the square (black/white convention, no alpha).
    const lo = (48 * S) / SIZE, hi = (208 * S) / SIZE;
    const mask = new Uint8Array(S * S);
    for (let y = lo; y < hi; y++) mask.fill(255, y * S + lo, y * S + hi);
    const out = await edit({
      model, image: await toFile(await pngOf(input, 3, S), 'world.png', { type: 'image/png' }),
      mask: await toFile(await pngOf(mask, 1, S), 'mask.png', { type: 'image/png' }),
      prompt: 'a large yellow circle on a blue background', n: 9,
    }, S);
    const margin = 12; // the blend-back mask is softened across the edge (at the output size)
    let outsideMax = 0, outsideSum = 0, outsideN = 0, insideSum = 0, insideN = 0;
    for (let y = 0; y < S; y++) {
      for (let x = 0; x < S; x++) {
        const d = Math.max(...[0, 1, 2].map((c) => Math.abs(out[(y * S + x) * 3 + c]! - input[(y * S + x) * 3 + c]!)));
        const inBox = (v: number, m: number) => v >= lo - m && v < hi + m;
        if (!(inBox(x, margin) && inBox(y, margin))) {
          outsideMax = Math.max(outsideMax, d);
          outsideSum += d;
          outsideN++;
        } else if (inBox(x, -margin) && inBox(y, -margin)) {
          insideSum += d;
          insideN++;
        }
      }
    }
    const detail = `outside max ${outsideMax} mean ${(outsideSum / outsideN).toFixed(2)}, inside mean ${(insideSum / insideN).toFixed(1)}`;
    ctx.diagnostic(detail);
    assert.ok(outsideMax <= 2, detail);
    assert.ok(insideSum / insideN > 40, detail);
    // The repainted region follows the prompt: the square became a yellow, non-square shape.
    const seen = scoreImage(out, S, S);
    assert.equal(seen.fg, 3, `${detail}; saw ${describe(seen)}`);
  });
}
