/**
 * `stream: true` through the official openai SDK against a real server: partial images and the
 * completed event for generations and edits, url and b64_json requests, partial_images 0 and 3,
 * a client that stops reading mid-stream (its job is cancelled), an error after the stream
 * started (an error event the SDK raises), and errors before it (plain HTTP).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI, { toFile } from 'openai';
import sharp from 'sharp';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { GraphBuilder, serializeModel } from '../../src/graphs/onnx-builder.js';
import type { JobFinished } from '../../src/queue/types.js';
import { linkFarm, makeHome, makePng, startTestServer, type TestServer } from './helpers.js';

let t: TestServer;
let home: string;
before(async () => {
  home = await makeHome({ 'kiln-tiny-xl': 'sdxl' });
  await brokenVaeModel(join(home, 'models', 'broken-vae'));
  t = await startTestServer({ home });
});
after(async () => {
  await t.close();
  rmSync(home, { recursive: true, force: true });
});

/**
 * The sdxl fixture with a VAE decoder whose every pixel is NaN: the denoising loop (and its
 * partial images) run normally, then the decode fails with a NumericalError, after the stream started.
 */
async function brokenVaeModel(dir: string): Promise<void> {
  const fixture = await ensureFixture('sdxl');
  linkFarm(fixture, dir, ['vae_decoder']);
  mkdirSync(join(dir, 'vae_decoder'));
  copyFileSync(join(fixture, 'vae_decoder', 'config.json'), join(dir, 'vae_decoder', 'config.json'));
  const g = new GraphBuilder('vae_decoder');
  const lat = g.input('latent_sample', 'float32', ['batch', 4, 'height', 'width']);
  g.output('sample', 'float32', ['batch', 3, 'height_x8', 'width_x8']);
  // [B,4,h,w] -> [B,192,h,w] -> [B,3,8h,8w], times NaN.
  const tiled = g.op('Tile', [lat, g.constI64([1, 48, 1, 1])]);
  const img = g.op('DepthToSpace', [tiled], { blocksize: 8, mode: 'CRD' });
  g.op('Mul', [img, g.constF32([Number.NaN], [])], {}, 'sample');
  writeFileSync(join(dir, 'vae_decoder', 'model.onnx'), serializeModel(g.toModel()).model);
}

type AnyEvent = Record<string, any>;

async function collect(stream: AsyncIterable<unknown>): Promise<AnyEvent[]> {
  const events: AnyEvent[] = [];
  for await (const e of stream) events.push(e as AnyEvent);
  return events;
}

async function pngSize(b64: string): Promise<[string | undefined, number | undefined, number | undefined]> {
  const meta = await sharp(Buffer.from(b64, 'base64')).metadata();
  return [meta.format, meta.width, meta.height];
}

// Kiln's extensions (steps, seed) come in spreads: the SDK's types do not know them.
const base = { prompt: 'a red circle on a blue background', size: '256x256' as const, steps: 8, seed: 21 };

test('generations, b64_json, partial_images 3: three partial images spread over the steps, then the completed image (the same bytes as without streaming)', async () => {
  const client = t.client();
  const { data: stream, response } = await client.images.generate({ ...base, response_format: 'b64_json', stream: true, partial_images: 3 }).withResponse();
  assert.match(response.headers.get('content-type')!, /^text\/event-stream/);
  assert.match(response.headers.get('x-request-id')!, /^req_/);
  const events = await collect(stream);
  assert.deepEqual(
    events.map((e) => e.type),
    ['image_generation.partial_image', 'image_generation.partial_image', 'image_generation.partial_image', 'image_generation.completed'],
  );
  const partials = events.slice(0, 3);
  assert.deepEqual(partials.map((e) => e.partial_image_index), [0, 1, 2]);
  assert.deepEqual(partials.map((e) => e.step), [2, 4, 6], 'steps at k/(n+1) of 8');
  for (const e of partials) {
    assert.equal(e.total_steps, 8);
    assert.equal(e.seed, 21);
    assert.equal(e.size, '256x256');
    assert.equal(e.output_format, 'png');
    assert.equal(e.background, 'opaque');
    assert.equal(e.quality, 'smooth');
    assert.ok(Math.abs(e.created_at - Date.now() / 1000) < 60);
    assert.deepEqual(await pngSize(e.b64_json), ['png', 256, 256]);
  }
  assert.equal(new Set(partials.map((e) => e.b64_json)).size, 3, 'each partial is its own picture');

  const done = events[3]!;
  assert.equal(done.seed, 21);
  assert.equal(done.size, '256x256');
  assert.equal(done.url, undefined);
  assert.equal(done.kiln.steps, 8);
  assert.equal(done.kiln.seed, 21);
  const plain = await client.images.generate({ ...base, response_format: 'b64_json' });
  assert.equal(done.b64_json, plain.data![0]!.b64_json, 'previews change nothing in the image');
});

test('generations, url, partial_images 0 (and absent): only the completed event, carrying the image inline and its URL', async () => {
  const client = t.client();
  for (const partial of [0, undefined]) {
    const { data: stream, response } = await client.images
      .generate({ ...base, ...(partial === undefined ? {} : { partial_images: partial }), response_format: 'url', stream: true })
      .withResponse();
    // Nothing had been sent before the image was ready, so the settings headers still went out.
    assert.equal(response.headers.get('x-kiln-seed'), '21');
    const events = await collect(stream);
    assert.deepEqual(events.map((e) => e.type), ['image_generation.completed']);
    const [done] = events as [AnyEvent];
    assert.deepEqual(await pngSize(done.b64_json), ['png', 256, 256]);
    assert.match(done.url, new RegExp(`^${t.url}/images/`));
    const fetched = Buffer.from(await (await fetch(done.url)).arrayBuffer());
    assert.equal(fetched.toString('base64'), done.b64_json);
  }
});

test('edits, b64_json and url: image_edit.partial_image events then image_edit.completed; a JPEG request streams JPEGs', async () => {
  const client = t.client();
  const upload = await makePng(256, 256);
  for (const response_format of ['b64_json', 'url'] as const) {
    const kilnFields = { steps: 12, strength: 0.5 };
    const stream = await client.images.edit({
      ...kilnFields,
      image: await toFile(upload, 'in.png', { type: 'image/png' }),
      prompt: 'a blue square',
      size: '256x256',
      n: 5,
      response_format,
      output_format: 'jpeg',
      stream: true,
      partial_images: 2,
    });
    const events = await collect(stream);
    assert.deepEqual(events.map((e) => e.type), ['image_edit.partial_image', 'image_edit.partial_image', 'image_edit.completed'], response_format);
    // strength 0.5 runs the last 6 of 12 steps; partials at 2 and 4 of those 6.
    assert.deepEqual(events.slice(0, 2).map((e) => [e.partial_image_index, e.step, e.total_steps]), [[0, 2, 6], [1, 4, 6]]);
    for (const e of events) {
      assert.equal(e.output_format, 'jpeg');
      assert.deepEqual(await pngSize(e.b64_json), ['jpeg', 256, 256]);
    }
    const done = events[2]!;
    assert.equal(done.kiln.mode, 'img2img');
    assert.equal(done.seed, 5);
    assert.equal(done.url === undefined, response_format === 'b64_json');
  }
});

test('a client that stops reading mid-stream has its job cancelled', async () => {
  const finished = new Promise<JobFinished>((resolve) => t.server.queue.events.once('finished', resolve));
  const client = t.client();
  // 150 steps: the first partial comes at step 38, leaving the job well over a hundred steps to go.
  const stream = await client.images.generate({ ...base, ...{ steps: 150 }, stream: true, partial_images: 3 });
  let first: AnyEvent | undefined;
  for await (const e of stream) {
    first = e;
    break; // the SDK aborts the request
  }
  assert.equal(first?.type, 'image_generation.partial_image');
  assert.equal(first?.step, 38);
  const job = await finished;
  assert.equal(job.outcome, 'cancelled');
  // The queue is free again, and serves the next request.
  const ping = (await (await fetch(`${t.url}/ping`)).json()) as { active: number };
  assert.equal(ping.active, 0);
  const next = await client.images.generate({ ...base, ...{ steps: 2 }, response_format: 'b64_json' });
  assert.ok(next.data![0]!.b64_json);
});

test('an error after the stream started arrives as an error event with the envelope, which the SDK raises', async () => {
  const client = t.client();
  const events: AnyEvent[] = [];
  const stream = await client.images.generate({ ...base, model: 'broken-vae', stream: true, partial_images: 2 });
  await assert.rejects(
    (async () => {
      for await (const e of stream) events.push(e);
    })(),
    (err: unknown) => {
      assert.ok(err instanceof OpenAI.APIError, String(err));
      assert.equal(err.type, 'server_error');
      assert.equal(err.code, 'numerical_error');
      assert.equal(err.param, null);
      assert.match(err.message, /non-finite/);
      return true;
    },
  );
  assert.deepEqual(events.map((e) => e.type), ['image_generation.partial_image', 'image_generation.partial_image'], 'the partials came first');

  // On the wire: a data-only frame whose JSON carries type "error" and the envelope's fields.
  const res = await fetch(`${t.baseURL}/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ ...base, model: 'broken-vae', stream: true, partial_images: 1 }),
  });
  assert.equal(res.status, 200);
  const frames = (await res.text()).trim().split('\n\n');
  assert.ok(frames.every((f) => f.startsWith('data: ')), 'data-only frames');
  const last = JSON.parse(frames.at(-1)!.slice('data: '.length));
  assert.deepEqual(Object.keys(last), ['type', 'error']);
  assert.equal(last.type, 'error');
  assert.deepEqual(Object.keys(last.error), ['message', 'type', 'param', 'code']);
});

test('errors before the stream starts are ordinary HTTP errors: bad fields, an unknown model, and the same image failing with partial_images 0', async () => {
  const client = t.client();
  await assert.rejects(client.images.generate({ ...base, stream: true, partial_images: 4 }), (err: unknown) => {
    assert.ok(err instanceof OpenAI.BadRequestError);
    assert.equal(err.param, 'partial_images');
    return true;
  });
  await assert.rejects(client.images.generate({ ...base, model: 'no-such-model', stream: true }), (err: unknown) => err instanceof OpenAI.NotFoundError);
  // Nothing is sent before the completed event, so a failure before it keeps its status.
  await assert.rejects(client.images.generate({ ...base, model: 'broken-vae', stream: true, partial_images: 0 }), (err: unknown) => {
    assert.ok(err instanceof OpenAI.InternalServerError);
    assert.equal(err.code, 'numerical_error');
    return true;
  });
});

test('--n-as count, n 2: each image its partial images (image_index), then a completed event per image', async () => {
  const counting = await startTestServer({ home, nMeaning: 'count' });
  try {
    const stream = await counting.client().images.generate({ ...base, ...{ steps: 4 }, n: 2, stream: true, partial_images: 1 });
    const events = await collect(stream);
    assert.deepEqual(
      events.map((e) => [e.type, e.image_index, e.seed]),
      [
        ['image_generation.partial_image', 0, 21],
        ['image_generation.partial_image', 1, 22],
        ['image_generation.completed', 0, 21],
        ['image_generation.completed', 1, 22],
      ],
    );
    assert.deepEqual(events.slice(0, 2).map((e) => e.partial_image_index), [0, 0]);
    assert.deepEqual(events[2]!.kiln.seeds, [21, 22]);
  } finally {
    await counting.close();
  }
});
