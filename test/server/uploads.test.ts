/**
 * Edit uploads in PNG, JPEG and WebP: each checked like PNGs (size, pixel count, a full decode),
 * the EXIF orientation applied (a phone's portrait JPEG is a portrait), image[] lists checked
 * entry by entry; and what the engine makes of an oriented JPEG.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI, { toFile } from 'openai';
import sharp from 'sharp';
import { prepareInitImage } from '../../src/engine/img2img.js';
import { prepareMask } from '../../src/engine/inpaint.js';
import { checkImageUpload, sniffImageFormat } from '../../src/server/uploads.js';
import { ApiError } from '../../src/server/errors.js';
import { rgbPng, startTestServer, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  t = await startTestServer({ maxUploadPixels: 400 * 400 });
});
after(() => t.close());

/** Stored 96 wide x 64 high: left half red, right half blue. */
const stored = () => rgbPng(96, 64, (x) => (x < 48 ? [230, 20, 20] : [20, 20, 230]));
/** The same pixels as a JPEG whose EXIF says "rotate 90° clockwise to view" (orientation 6): upright it is 64x96, red on top. */
const orientedJpeg = async () => sharp(await stored()).jpeg({ quality: 95 }).withMetadata({ orientation: 6 }).toBuffer();

const FAST = { prompt: 'a beret', steps: 2, n: 4, response_format: 'b64_json' } as const;
const file = (bytes: Buffer, name: string, type: string) => toFile(bytes, name, { type });

test('JPEG and WebP uploads are edited like PNGs; image[] lists of mixed formats work', async () => {
  const client = t.client();
  const png = await stored();
  const jpeg = await sharp(png).jpeg().toBuffer();
  const webp = await sharp(png).webp().toBuffer();
  for (const [bytes, name, type] of [
    [jpeg, 'a.jpg', 'image/jpeg'],
    [webp, 'a.webp', 'image/webp'],
  ] as const) {
    const r = (await client.images.edit({ ...FAST, image: await file(bytes, name, type), size: '256x256' } as any)) as any;
    assert.equal(r.kiln.mode, 'img2img', name);
    assert.equal((await sharp(Buffer.from(r.data[0].b64_json, 'base64')).metadata()).width, 256);
  }
  const list = (await client.images.edit({
    ...FAST,
    image: [await file(webp, 'a.webp', 'image/webp'), await file(jpeg, 'b.jpg', 'image/jpeg'), await file(png, 'c.png', 'image/png')],
    size: '256x256',
  } as any)) as any;
  assert.equal(list.data.length, 1);
  // A mask may be a JPEG too (black/white: no transparency).
  const mask = await sharp(await rgbPng(96, 64, (x) => (x >= 48 ? [255, 255, 255] : [0, 0, 0]))).jpeg().toBuffer();
  const inp = (await client.images.edit({ ...FAST, image: await file(jpeg, 'a.jpg', 'image/jpeg'), mask: await file(mask, 'm.jpg', 'image/jpeg'), size: '256x256' } as any)) as any;
  assert.equal(inp.kiln.mode, 'inpaint');
});

test('the EXIF orientation is applied: size auto follows the upright shape, the mask must match it', async () => {
  const client = t.client();
  const jpeg = await orientedJpeg();
  // Upright 64x96 (2:3) at the fixture's native 1024x1024 area: 832x1280, a portrait (stored, it is a landscape).
  const r = (await client.images.edit({ ...FAST, image: await file(jpeg, 'phone.jpg', 'image/jpeg'), size: 'auto' } as any)) as any;
  assert.equal(r.size, '832x1280');
  const uprightMask = await rgbPng(64, 96, () => [255, 255, 255]);
  const ok = (await client.images.edit({ ...FAST, image: await file(jpeg, 'phone.jpg', 'image/jpeg'), mask: await file(uprightMask, 'm.png', 'image/png'), size: '256x256' } as any)) as any;
  assert.equal(ok.kiln.mode, 'inpaint');
  const storedShapeMask = await rgbPng(96, 64, () => [255, 255, 255]);
  await assert.rejects(
    client.images.edit({ ...FAST, image: await file(jpeg, 'phone.jpg', 'image/jpeg'), mask: await file(storedShapeMask, 'm.png', 'image/png'), size: '256x256' } as any),
    (e: unknown) => e instanceof OpenAI.BadRequestError && e.param === 'mask' && /96x64 but the image is 64x96/.test(e.message),
  );

  // What the engine gets: upright, red on top.
  const init = await prepareInitImage(jpeg, 64, 96);
  const at = (x: number, y: number) => [...init.pixels.subarray((y * 64 + x) * 3, (y * 64 + x) * 3 + 3)];
  assert.ok(at(32, 10)[0]! > 180 && at(32, 10)[2]! < 80, `top is red: ${at(32, 10)}`);
  assert.ok(at(32, 85)[2]! > 180 && at(32, 85)[0]! < 80, `bottom is blue: ${at(32, 85)}`);
  // And a mask JPEG with an orientation is turned the same way: white (stored left half) lands on top.
  const maskJpeg = await sharp(await rgbPng(96, 64, (x) => (x < 48 ? [255, 255, 255] : [0, 0, 0]))).jpeg().withMetadata({ orientation: 6 }).toBuffer();
  const weights = await prepareMask(maskJpeg, 64, 96);
  assert.equal(weights[10 * 64 + 32], 1);
  assert.equal(weights[85 * 64 + 32], 0);
});

test('JPEG and WebP uploads are checked like PNGs: damage, pixel budget, size, and what is not an image', async () => {
  const limits = { maxBytes: 4 * 1024 * 1024, maxPixels: 400 * 400 };
  const reject = async (bytes: Buffer, status: number, code: string) => {
    await assert.rejects(checkImageUpload(bytes, 'image', limits), (e: unknown) => e instanceof ApiError && e.status === status && e.code === code && e.param === 'image', code);
  };
  const photo = await sharp({ create: { width: 300, height: 200, channels: 3, background: { r: 90, g: 140, b: 200 } } }).jpeg().toBuffer();
  const webp = await sharp(photo).webp().toBuffer();
  assert.deepEqual(await checkImageUpload(photo, 'image', limits), { format: 'jpeg', width: 300, height: 200 });
  assert.deepEqual(await checkImageUpload(webp, 'image', limits), { format: 'webp', width: 300, height: 200 });
  assert.deepEqual(await checkImageUpload(await orientedJpeg(), 'image', limits), { format: 'jpeg', width: 64, height: 96 });
  await reject(photo.subarray(0, Math.floor(photo.length / 2)), 400, 'invalid_image'); // truncated
  await reject(webp.subarray(0, webp.length - 40), 400, 'invalid_image');
  await reject(Buffer.concat([Buffer.from([0xff, 0xd8, 0xff]), Buffer.alloc(200, 7)]), 400, 'invalid_image'); // a JPEG signature and garbage
  const large = await sharp({ create: { width: 500, height: 400, channels: 3, background: '#888' } }).webp().toBuffer();
  await reject(large, 400, 'image_too_large');
  await reject(await sharp(photo).gif().toBuffer(), 415, 'invalid_image_format');
  await reject(Buffer.alloc(5 * 1024 * 1024, 0xff), 413, 'file_too_large');
  assert.equal(sniffImageFormat(Buffer.from('RIFF\0\0\0\0WAVE')), undefined);

  // Through the server: the 400 names the upload, image[] entries included.
  await assert.rejects(
    t.client().images.edit({ ...FAST, image: [await file(photo, 'a.jpg', 'image/jpeg'), await file(photo.subarray(0, 300), 'b.jpg', 'image/jpeg')] } as any),
    (e: unknown) => e instanceof OpenAI.BadRequestError && e.param === 'image' && /could not be decoded as a JPEG|not a valid JPEG/.test(e.message),
  );
});
