/**
 * POST /v1/images/edits through the official openai SDK: a PNG upload runs image-to-image
 * (the engine's img2img) at the requested size; image and image[] forms; determinism.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import sharp from 'sharp';
import { toFile } from 'openai';
import { startTestServer, makePng, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  t = await startTestServer();
});
after(() => t.close());

const bytesOf = (r: { data?: { b64_json?: string }[] }) => Buffer.from(r.data![0]!.b64_json!, 'base64');

test('an uploaded PNG is redrawn at the requested size; same n and input give the same bytes', async () => {
  const client = t.client();
  const input = await makePng(96, 64);
  const edit = async (png: Buffer, extra: Record<string, unknown> = {}) =>
    client.images.edit({
      image: await toFile(png, 'otter.png', { type: 'image/png' }),
      prompt: 'A cute baby sea otter wearing a beret',
      n: 2,
      size: '256x256',
      response_format: 'b64_json',
      ...extra,
    } as any);
  const a = await edit(input);
  const meta = await sharp(bytesOf(a)).metadata();
  assert.deepEqual([meta.format, meta.width, meta.height], ['png', 256, 256]);
  const item = a.data![0] as any;
  assert.equal(item.seed, 2);
  assert.equal(item.revised_prompt, null);
  assert.equal((a as any).kiln.strength, 0.75);
  assert.equal((a as any).kiln.model, 'kiln-tiny-xl');

  const b = await edit(input);
  assert.ok(bytesOf(a).equals(bytesOf(b)), 'same input and n, same bytes');
  const other = await edit(await makePng(64, 64, true));
  assert.ok(!bytesOf(a).equals(bytesOf(other)), 'the input image matters (an RGBA upload is accepted too)');
  const weaker = await edit(input, { strength: 0.3 });
  assert.equal((weaker as any).kiln.strength, 0.3);
  assert.ok(!bytesOf(a).equals(bytesOf(weaker)));
});

test('image[] (several uploads): the first steers the result; url responses fetch a PNG', async () => {
  const client = t.client();
  const first = await makePng(64, 64);
  const second = await makePng(32, 32, true);
  const many = await client.images.edit({
    image: [await toFile(first, 'a.png', { type: 'image/png' }), await toFile(second, 'b.png', { type: 'image/png' })],
    prompt: 'a beret',
    n: 9,
    size: '256x256',
    response_format: 'b64_json',
  } as any);
  const single = await client.images.edit({
    image: await toFile(first, 'a.png', { type: 'image/png' }),
    prompt: 'a beret',
    n: 9,
    size: '256x256',
    response_format: 'b64_json',
  } as any);
  assert.ok(bytesOf(many).equals(bytesOf(single)));

  const byUrl = await client.images.edit({
    image: await toFile(first, 'a.png', { type: 'image/png' }),
    prompt: 'a beret',
    size: '512x512',
    quality: 'low',
  } as any);
  const res = await fetch(byUrl.data![0]!.url!);
  assert.equal(res.status, 200);
  const meta = await sharp(Buffer.from(await res.arrayBuffer())).metadata();
  assert.deepEqual([meta.format, meta.width, meta.height], ['png', 512, 512]);
});
