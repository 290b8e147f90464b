/**
 * POST /v1/images/generations through the official openai SDK against a real server: defaults,
 * every size, url and b64_json, seeds (n) and determinism, the extensions, models, status routes.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { symlinkSync } from 'node:fs';
import { join } from 'node:path';
import sharp from 'sharp';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { readPngText } from '../../src/engine/image-codec.js';
import { startTestServer, postJson, getJson, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  t = await startTestServer({ models: { 'kiln-tiny-xl': 'sdxl', 'kiln-tiny': 'sd-turbo' } });
});
after(() => t.close());

const b64 = (r: { data?: { b64_json?: string }[] }) => Buffer.from(r.data![0]!.b64_json!, 'base64');

test('defaults: the default model, 1024x1024, smooth, a url to a PNG, the seed and settings reported', async () => {
  const client = t.client();
  const { data: res, response, request_id } = await client.images.generate({ prompt: 'a cute baby sea otter' }).withResponse();
  const now = Math.floor(Date.now() / 1000);
  assert.ok(Math.abs(res.created - now) <= 5);
  assert.equal(res.data!.length, 1);
  const item = res.data![0]! as { url?: string; seed?: number; revised_prompt?: null; b64_json?: string };
  assert.equal(item.revised_prompt, null);
  assert.equal(item.b64_json, undefined);
  assert.ok(Number.isInteger(item.seed) && item.seed! >= 0 && item.seed! <= 4294967295, 'a random seed is reported');
  assert.match(item.url!, new RegExp(`^${t.url}/images/[0-9a-z]+_[0-9a-f]{48}\\.png\\?expires=\\d+&signature=[A-Za-z0-9_-]{43}$`));
  const kiln = (res as any).kiln;
  assert.equal(kiln.model, 'kiln-tiny-xl');
  assert.equal(kiln.size, '1024x1024');
  assert.equal(kiln.quality, 'smooth');
  assert.equal(kiln.steps, 25);
  assert.equal(kiln.seed, item.seed);
  assert.ok(kiln.timings.generation_ms > 0);
  assert.equal((res as any).size, '1024x1024');
  assert.equal((res as any).output_format, 'png');
  // Headers a stock client can read too; the SDK surfaces x-request-id.
  assert.equal(response.headers.get('x-kiln-seed'), String(item.seed));
  assert.equal(response.headers.get('x-kiln-model'), 'kiln-tiny-xl');
  assert.equal(response.headers.get('x-kiln-size'), '1024x1024');
  assert.equal(response.headers.get('x-kiln-steps'), '25');
  assert.match(response.headers.get('server-timing')!, /generate;dur=/);
  assert.match(request_id!, /^req_[0-9a-f]{24}$/);

  const png = Buffer.from(await (await fetch(item.url!)).arrayBuffer());
  const meta = await sharp(png).metadata();
  assert.equal(meta.format, 'png');
  assert.equal(meta.width, 1024);
  assert.equal(meta.height, 1024);
  assert.match(readPngText(png).parameters!, new RegExp(`Seed: ${item.seed}`));
});

test('every size, as b64_json and as url (null means the default)', async () => {
  const client = t.client();
  for (const size of ['256x256', '512x512', '1024x1024'] as const) {
    const res = await client.images.generate({ prompt: 'a red circle', size, quality: 'low' as any, n: 1, response_format: 'b64_json' });
    const meta = await sharp(b64(res)).metadata();
    assert.deepEqual([meta.format, meta.width, meta.height], ['png', Number(size.split('x')[0]), Number(size.split('x')[1])], size);
    assert.equal((res.data![0] as any).url, undefined);
  }
  const res = await client.images.generate({ prompt: 'a red circle', size: '256x256', quality: 'low' as any, n: 1, response_format: null });
  const png = Buffer.from(await (await fetch(res.data![0]!.url!)).arrayBuffer());
  const meta = await sharp(png).metadata();
  assert.deepEqual([meta.width, meta.height], [256, 256]);
  const defaults = await client.images.generate({ prompt: 'a red circle', size: null, quality: 'low' as any, response_format: 'b64_json' });
  assert.equal((await sharp(b64(defaults)).metadata()).width, 1024);
});

test('n is the seed: the same n gives identical bytes, another n other bytes; seed wins over n', async () => {
  const client = t.client();
  const req = { prompt: 'a cat playing with a (ball)0.5', size: '256x256' as const, response_format: 'b64_json' as const };
  const a = await client.images.generate({ ...req, n: 42 });
  const b = await client.images.generate({ ...req, n: 42 });
  const c = await client.images.generate({ ...req, n: 43 });
  assert.equal((a.data![0] as any).seed, 42);
  assert.ok(b64(a).equals(b64(b)), 'same n, same bytes');
  assert.ok(!b64(a).equals(b64(c)), 'other n, other bytes');
  const d = await client.images.generate({ ...req, n: 7, seed: 42 } as any);
  assert.equal((d.data![0] as any).seed, 42);
  assert.ok(b64(d).equals(b64(a)), 'seed wins over n');
  const max = await client.images.generate({ ...req, n: 4294967295 });
  assert.equal((max.data![0] as any).seed, 4294967295);
});

test('extensions: negprompt/negative_prompt, steps, guidance_scale, scheduler, output_format and compression', async () => {
  const client = t.client();
  const base = { prompt: 'a lighthouse', size: '256x256', n: 5, response_format: 'b64_json' };
  const { data: res, response } = await client.images
    .generate({ ...base, negprompt: 'fog', steps: 3, guidance_scale: 4.5, scheduler: 'dpmpp_2m', quality: 'hd' } as any)
    .withResponse();
  const k = (res as any).kiln;
  assert.deepEqual([k.steps, k.guidance_scale, k.scheduler, k.negative_prompt, k.quality], [3, 4.5, 'dpmpp_2m', 'fog', 'hd']);
  assert.equal(response.headers.get('x-kiln-scheduler'), 'dpmpp_2m');
  assert.equal(response.headers.get('x-kiln-guidance-scale'), '4.5');
  const text = readPngText(b64(res)).parameters!;
  assert.match(text, /Negative prompt: fog/);
  assert.match(text, /Steps: 3, Sampler: dpmpp_2m, CFG scale: 4.5, Seed: 5/);
  const both = await client.images.generate({ ...base, steps: 2, negprompt: 'fog', negative_prompt: 'rain' } as any);
  assert.equal((both as any).kiln.negative_prompt, 'rain');

  const jpeg = await client.images.generate({ ...base, steps: 2, output_format: 'jpeg', output_compression: 50 } as any);
  assert.equal((await sharp(b64(jpeg)).metadata()).format, 'jpeg');
  assert.equal((jpeg as any).output_format, 'jpeg');
  const webp = await client.images.generate({ ...base, steps: 2, output_format: 'webp', response_format: 'url' } as any);
  assert.match(webp.data![0]!.url!, /\.webp\?/);
  const res2 = await fetch(webp.data![0]!.url!);
  assert.equal(res2.headers.get('content-type'), 'image/webp');
  assert.equal((await sharp(Buffer.from(await res2.arrayBuffer())).metadata()).format, 'webp');
});

test('a prompt longer than Kiln encodes (the gpt-image-1 limit is 32000 characters): drawn from its first 16 chunks, the rest reported', async () => {
  const client = t.client();
  // 7 tokens a sentence, so a 77-token chunk holds 10 sentences (it ends at the last full stop):
  // 16 chunks are 160 sentences, and 1,300 (29,900 characters) leave 1,140 x 7 = 7,980 tokens out.
  const sentence = 'a red fox in the snow. ';
  const ask = (prompt: string) => client.images.generate({ model: 'gpt-image-1', prompt, size: '256x256', n: 3, steps: 2 } as any) as Promise<any>;
  const long = await ask(sentence.repeat(1300));
  assert.deepEqual(long.kiln.dropped_tokens, { prompt: 1140 * 7 });
  const fits = await ask(sentence.repeat(160));
  assert.equal(fits.kiln.dropped_tokens, undefined, 'a prompt that fits reports nothing');
  // The PNGs differ in their text chunk (the prompt as given); the pixels are the same.
  const pixels = async (r: any) => sharp(Buffer.from(r.data[0].b64_json, 'base64')).raw().toBuffer();
  assert.ok((await pixels(long)).equals(await pixels(fits)), 'what is drawn is the kept start of the prompt');
  const negative = (await client.images.generate({ prompt: 'a fox', size: '256x256', n: 3, steps: 2, negative_prompt: 'fog, '.repeat(2000), response_format: 'b64_json' } as any)) as any;
  assert.ok(negative.kiln.dropped_tokens.negative_prompt > 0 && negative.kiln.dropped_tokens.prompt === undefined, JSON.stringify(negative.kiln.dropped_tokens));
});

test('models: listed from disk per request (a model installed while running appears and works), chosen by name', async () => {
  const client = t.client();
  const ids = (await client.models.list()).data.map((m) => m.id).sort();
  assert.deepEqual(ids, ['kiln-tiny', 'kiln-tiny-xl']);
  const one = await client.models.retrieve('kiln-tiny');
  assert.equal(one.object, 'model');
  assert.equal(one.owned_by, 'kiln');

  const turbo = await client.images.generate({ prompt: 'a boat', model: 'kiln-tiny', size: '256x256', response_format: 'b64_json' });
  assert.equal((turbo as any).kiln.model, 'kiln-tiny');
  assert.equal((turbo as any).kiln.steps, 4, 'a distilled model gets its own step counts');

  symlinkSync(await ensureFixture('sd15-optimum'), join(t.home, 'models', 'fresh-model'), 'dir');
  const after = (await client.models.list()).data.map((m) => m.id);
  assert.ok(after.includes('fresh-model'));
  const fresh = await client.images.generate({ prompt: 'a boat', model: 'fresh-model', size: '256x256', steps: 2, response_format: 'b64_json' } as any);
  assert.equal((fresh as any).kiln.model, 'fresh-model');
});

test('/ping, /health, /metrics, /openapi.json, x-request-id', async () => {
  const ping = (await getJson(`${t.url}/ping`)).json;
  assert.equal(ping.active, 0);
  assert.equal(ping.queued, 0);
  const health = await fetch(`${t.url}/health`);
  assert.equal(health.status, 200);
  assert.equal(((await health.json()) as any).status, 'ok');
  assert.match(health.headers.get('x-request-id')!, /^req_/);

  const echoed = await fetch(`${t.url}/health`, { headers: { 'x-request-id': 'my-trace-123' } });
  await echoed.arrayBuffer();
  assert.equal(echoed.headers.get('x-request-id'), 'my-trace-123');
  const rejected = await fetch(`${t.url}/health`, { headers: { 'x-request-id': 'bad id with spaces' } });
  await rejected.arrayBuffer();
  assert.match(rejected.headers.get('x-request-id')!, /^req_/);

  const metrics = await fetch(`${t.url}/metrics`);
  assert.match(metrics.headers.get('content-type')!, /text\/plain/);
  const text = await metrics.text();
  assert.match(text, /kiln_http_requests_total\{method="POST",route="\/v1\/images\/generations",status="200"\} \d+/);
  assert.match(text, /kiln_jobs_total\{kind="generate",outcome="done"\} \d+/);
  assert.match(text, /kiln_queue_active 0/);

  const doc = (await getJson(`${t.url}/openapi.json`)).json;
  assert.equal(doc.openapi, '3.1.0');
  const gen = doc.paths['/v1/images/generations'].post;
  const props = gen.requestBody.content['application/json'].schema.properties;
  for (const f of ['prompt', 'model', 'n', 'quality', 'response_format', 'size', 'user', 'negprompt', 'seed', 'steps', 'output_format']) {
    assert.ok(props[f], `openapi documents ${f}`);
  }
  assert.deepEqual(props.size.examples, ['256x256', '512x512', '1024x1024', '1792x1024', '1024x1792', '1536x1024', '1024x1536', 'auto']);
  assert.ok(new RegExp(props.size.pattern).test('640x448') && !new RegExp(props.size.pattern).test('640x'));
  assert.ok(doc.paths['/v1/images/edits'].post.requestBody.content['multipart/form-data']);
  assert.ok(doc.paths['/v1/models']);

  // The raw shape, not through the SDK.
  const raw = await postJson(`${t.url}/v1/images/generations`, { prompt: 'x', size: '256x256', steps: 1, response_format: 'b64_json' });
  assert.equal(raw.status, 200);
  assert.deepEqual(Object.keys(raw.json.data[0]).sort(), ['b64_json', 'revised_prompt', 'seed']);
});
