import { test } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import { fromFloat16Bits, toFloat16Bits, float32ToFloat16Bits, float16BitsToFloat32 } from '../../src/engine/float16.js';
import { encodeImage, insertPngText, readPngText } from '../../src/engine/image-codec.js';
import { guidanceEmbedding } from '../../src/engine/pipeline.js';
import { parseSize, qualityTier, resolveSize, sizeForUpload, QUALITY_NAMES, SIZE_RANGES } from '../../src/engine/presets.js';
import { InvalidOptionError } from '../../src/engine/errors.js';

test('float16: exact values, rounding, overflow, subnormals, NaN', () => {
  assert.equal(toFloat16Bits(1), 0x3c00);
  assert.equal(toFloat16Bits(-2), 0xc000);
  assert.equal(toFloat16Bits(65504), 0x7bff); // largest finite half
  assert.equal(toFloat16Bits(70000), 0x7c00); // overflow -> +Inf
  assert.equal(toFloat16Bits(2 ** -24), 0x0001); // smallest subnormal
  assert.equal(toFloat16Bits(0.1), 0x2e66); // round to nearest
  assert.equal(toFloat16Bits(1 + 2 ** -11), 0x3c00); // tie rounds to even
  assert.equal(toFloat16Bits(1 + 3 * 2 ** -11), 0x3c02);
  assert.ok(Number.isNaN(fromFloat16Bits(toFloat16Bits(NaN))));
  assert.equal(fromFloat16Bits(0x3555), 0.333251953125);
  const xs = Float32Array.from([0, 0.5, -3.25, 1024, 1e-5]);
  const back = float16BitsToFloat32(float32ToFloat16Bits(xs));
  for (let i = 0; i < xs.length; i++) assert.ok(Math.abs(back[i]! - xs[i]!) <= Math.abs(xs[i]!) * 1e-3 + 1e-7);
});

test('PNG text chunks survive sharp decoding and read back', async () => {
  const image = { width: 8, height: 4, pixels: new Uint8Array(8 * 4 * 3).fill(200) };
  const png = await encodeImage(image, { format: 'png', text: { parameters: 'a cat\nSteps: 3, Seed: 42' } });
  assert.deepEqual(readPngText(png), { parameters: 'a cat\nSteps: 3, Seed: 42' });
  const meta = await sharp(png).metadata(); // a CRC error would make libpng refuse the file
  assert.equal(meta.width, 8);
  assert.equal(meta.height, 4);
  const raw = await sharp(png).raw().toBuffer();
  assert.equal(raw[0], 200);
  assert.throws(() => insertPngText(Buffer.from('not a png'), { a: 'b' }));
});

test('jpeg and webp outputs', async () => {
  const image = { width: 16, height: 16, pixels: new Uint8Array(16 * 16 * 3).fill(90) };
  assert.equal((await sharp(await encodeImage(image, { format: 'jpeg', quality: 50 })).metadata()).format, 'jpeg');
  assert.equal((await sharp(await encodeImage(image, { format: 'webp' })).metadata()).format, 'webp');
});

test('LCM guidance embedding matches diffusers get_guidance_scale_embedding', () => {
  const emb = guidanceEmbedding(8, 256);
  assert.equal(emb.length, 256);
  // k = 0: sin(7000), cos(7000); k = 127: frequency 1e-4 -> sin(0.7), cos(0.7)
  assert.ok(Math.abs(emb[0]! - Math.sin(7000)) < 1e-6);
  assert.ok(Math.abs(emb[128]! - Math.cos(7000)) < 1e-6);
  assert.ok(Math.abs(emb[127]! - Math.sin(0.7)) < 1e-6);
  assert.ok(Math.abs(emb[255]! - Math.cos(0.7)) < 1e-6);
  // guidance 1 -> w = 0 -> sin half zero, cos half one
  const flat = guidanceEmbedding(1, 8);
  assert.deepEqual(Array.from(flat), [0, 0, 0, 0, 1, 1, 1, 1]);
});

test('quality names map to tiers; unknown names list the allowed ones', () => {
  assert.equal(qualityTier(undefined), 'smooth');
  assert.equal(qualityTier('standard'), 'smooth');
  assert.equal(qualityTier('HD'), 'hd');
  assert.equal(qualityTier('low'), 'draft');
  assert.throws(
    () => qualityTier('ultra'),
    (err: unknown) => err instanceof InvalidOptionError && err.param === 'quality' && QUALITY_NAMES.every((n) => err.message.includes(n)),
  );
});

test('sizes: parseSize takes the named sizes (or an explicit list) and refuses others with the list', () => {
  assert.deepEqual(parseSize('512x512'), { width: 512, height: 512 });
  assert.deepEqual(parseSize('1024x1024'), { width: 1024, height: 1024 });
  assert.deepEqual(parseSize('1792x1024'), { width: 1792, height: 1024 });
  assert.deepEqual(parseSize('1024x1536'), { width: 1024, height: 1536 });
  assert.deepEqual(parseSize('640x448', ['640x448']), { width: 640, height: 448 });
  for (const bad of ['640x480', '512', 'x', '0x0', '256X256x', 'auto']) {
    assert.throws(() => parseSize(bad), (e: unknown) => e instanceof InvalidOptionError && e.param === 'size' && /256x256/.test(e.message));
  }
});

test('sizes: resolveSize adds auto and WxH in multiples of 64 within the family range; sizeForUpload keeps the shape', () => {
  const xl = { family: 'sdxl' as const, nativeSize: { width: 1024, height: 1024 } };
  const sd = { family: 'sd1' as const, nativeSize: { width: 512, height: 512 } };
  assert.deepEqual(resolveSize('auto', xl), { width: 1024, height: 1024 });
  assert.deepEqual(resolveSize('auto', sd), { width: 512, height: 512 });
  assert.deepEqual(resolveSize('1792x1024', sd), { width: 1792, height: 1024 }, 'named sizes on every family');
  assert.deepEqual(resolveSize('2048x256', xl), { width: 2048, height: 256 });
  assert.deepEqual(resolveSize('1024x640', sd), { width: 1024, height: 640 });
  assert.deepEqual([SIZE_RANGES.sd1, SIZE_RANGES.sd2, SIZE_RANGES.sdxl], [{ min: 256, max: 1024 }, { min: 256, max: 1024 }, { min: 256, max: 2048 }]);
  const refused = (size: string, model: typeof xl | typeof sd, range: RegExp) =>
    assert.throws(() => resolveSize(size, model), (e: unknown) => e instanceof InvalidOptionError && e.param === 'size' && range.test(e.message) && /1536x1024/.test(e.message), size);
  refused('2112x1024', xl, /from 256 to 2048/);
  refused('1088x1024', sd, /from 256 to 1024/);
  refused('192x256', xl, /from 256 to 2048/);
  refused('300x300', xl, /multiples of 64/);
  refused('autox', xl, /native size, 1024x1024/);
  assert.deepEqual(resolveSize(' AUTO ', sd), { width: 512, height: 512 }, 'the engine reads sizes as parseSize does: trimmed, any case');

  assert.deepEqual(sizeForUpload({ width: 384, height: 256 }, sd), { width: 640, height: 448 });
  assert.deepEqual(sizeForUpload({ width: 3000, height: 3000 }, xl), { width: 1024, height: 1024 });
  assert.deepEqual(sizeForUpload({ width: 1080, height: 1920 }, xl), { width: 768, height: 1344 });
  // A strip is clamped to the range on both sides (the crop then trims it).
  assert.deepEqual(sizeForUpload({ width: 5000, height: 100 }, sd), { width: 1024, height: 256 });
});
