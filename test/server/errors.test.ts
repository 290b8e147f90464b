/**
 * Every error the API promises, with its status, OpenAI envelope (type, param, code) and
 * `x-should-retry`; the SDK's error classes; auth on and off. Nothing here reaches the engine
 * except the model-load failure, which must be a 500 that leaves the server serving.
 */
import { test, before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI, { toFile } from 'openai';
import { ensureFixture } from '../../tools/fixtures/variants.js';
import { sendHostile } from '../../tools/hostile/requests.js';
import { startTestServer, postJson, getJson, makePng, envelope, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  t = await startTestServer();
  // A folder with a model_index.json and nothing else: listed, but fails to load.
  const broken = join(t.home, 'models', 'broken-model');
  mkdirSync(broken);
  copyFileSync(join(await ensureFixture('sdxl'), 'model_index.json'), join(broken, 'model_index.json'));
});
after(() => t.close());

const GEN = () => `${t.url}/v1/images/generations`;
const EDIT = () => `${t.url}/v1/images/edits`;

function expectError(
  r: { status: number; headers: Headers; json: any },
  status: number,
  param: string | null,
  code?: string,
  type = status === 401 ? 'authentication_error' : status >= 500 ? 'server_error' : 'invalid_request_error',
) {
  const e = envelope(r.json);
  assert.equal(r.status, status, `status for ${JSON.stringify(r.json)}`);
  assert.equal(e.type, type);
  assert.equal(e.param, param, `param for ${e.message}`);
  if (code) assert.equal(e.code, code);
  if (status >= 400 && status < 500 && status !== 429) assert.equal(r.headers.get('x-should-retry'), 'false');
  assert.ok(r.headers.get('x-request-id'));
  return e;
}

async function postForm(url: string, fields: Record<string, string | Blob | (string | Blob)[]>, headers: Record<string, string> = {}) {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) for (const item of Array.isArray(v) ? v : [v]) form.append(k, item);
  const res = await fetch(url, { method: 'POST', body: form, headers });
  const text = await res.text();
  let json: any;
  try {
    json = JSON.parse(text);
  } catch {}
  return { status: res.status, headers: res.headers, json };
}

const png = (b: Buffer) => new Blob([new Uint8Array(b)], { type: 'image/png' });

describe('generations: 400 for what the client sent, naming the field', () => {
  test('body: invalid JSON, not an object, empty', async () => {
    expectError(await postJson(GEN(), '{"prompt": "x",'), 400, null, 'invalid_json');
    expectError(await postJson(GEN(), '["prompt"]'), 400, null);
    expectError(await postJson(GEN(), '"a prompt"'), 400, null);
    expectError(await postJson(GEN(), 'null'), 400, null);
    expectError(await postJson(GEN(), ''), 400, null);
  });

  test('prompt: missing, null, empty, blank, wrong type, too long (limit 32000 characters, OpenAI\'s largest)', async () => {
    expectError(await postJson(GEN(), {}), 400, 'prompt', 'missing_required_parameter');
    expectError(await postJson(GEN(), { prompt: null }), 400, 'prompt', 'missing_required_parameter');
    expectError(await postJson(GEN(), { prompt: '' }), 400, 'prompt', 'empty_string');
    expectError(await postJson(GEN(), { prompt: '  \n ' }), 400, 'prompt', 'empty_string');
    expectError(await postJson(GEN(), { prompt: 42 }), 400, 'prompt', 'invalid_type');
    expectError(await postJson(GEN(), { prompt: ['a'] }), 400, 'prompt', 'invalid_type');
    const e = expectError(await postJson(GEN(), { prompt: 'x'.repeat(32001) }), 400, 'prompt', 'string_above_max_length');
    assert.match(e.message, /32000/);
    expectError(await postJson(GEN(), { prompt: 'x', negprompt: 'y'.repeat(32001) }), 400, 'negprompt');
  });

  test('n (and seed): a non-negative integer up to 2^32-1', async () => {
    for (const n of [-1, 1.5, '5', 4294967296, true, {}, 1e300]) {
      expectError(await postJson(GEN(), { prompt: 'x', n }), 400, 'n');
    }
    expectError(await postJson(GEN(), { prompt: 'x', seed: -3 }), 400, 'seed');
  });

  test('size, quality, response_format, scheduler, steps, guidance_scale, output_format, output_compression, stream, partial_images', async () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ size: '300x300' }, 'size'],
      [{ size: '1792x1000' }, 'size'],
      [{ size: '4096x4096' }, 'size'],
      [{ size: 'auto ' }, 'size'],
      [{ size: 512 }, 'size'],
      [{ quality: 'ultra' }, 'quality'],
      [{ response_format: 'png' }, 'response_format'],
      [{ scheduler: 'bogus' }, 'scheduler'],
      [{ steps: 0 }, 'steps'],
      [{ steps: 151 }, 'steps'],
      [{ steps: 2.5 }, 'steps'],
      [{ guidance_scale: -1 }, 'guidance_scale'],
      [{ guidance_scale: 'high' }, 'guidance_scale'],
      [{ output_format: 'gif' }, 'output_format'],
      [{ output_compression: 101 }, 'output_compression'],
      [{ stream: 'yes' }, 'stream'],
      [{ stream: true, partial_images: 4 }, 'partial_images'],
      [{ stream: true, partial_images: 1.5 }, 'partial_images'],
      [{ model: 7 }, 'model'],
      [{ user: { id: 1 } }, 'user'],
    ];
    for (const [extra, param] of cases) {
      const e = expectError(await postJson(GEN(), { prompt: 'x', ...extra }), 400, param);
      assert.ok(e.message.includes(param), e.message);
    }
  });

  test('the SDK raises BadRequestError with the param', async () => {
    const client = t.client();
    await assert.rejects(client.images.generate({ prompt: 'x', size: '999x999' as any }), (err: unknown) => {
      assert.ok(err instanceof OpenAI.BadRequestError);
      assert.equal(err.status, 400);
      assert.equal(err.param, 'size');
      assert.equal(err.type, 'invalid_request_error');
      assert.match(err.requestID!, /^req_/);
      return true;
    });
  });
});

describe('generations: 404, 413, 415', () => {
  test('unknown model: 404 naming `kiln pull <name>`; paths are not model names', async () => {
    const e = expectError(await postJson(GEN(), { prompt: 'x', model: 'be-stable-diffusion-xl-base-1.0' }), 404, 'model', 'model_not_found');
    assert.match(e.message, /kiln pull be-stable-diffusion-xl-base-1\.0/);
    expectError(await postJson(GEN(), { prompt: 'x', model: '../models/kiln-tiny-xl' }), 404, 'model');
    expectError(await postJson(GEN(), { prompt: 'x', model: '/etc' }), 404, 'model');
    await assert.rejects(t.client().images.generate({ prompt: 'x', model: 'nope' }), OpenAI.NotFoundError);
    expectError(await getJson(`${t.url}/v1/models/nope`), 404, 'model');
  });

  test('unknown route or method: 404 in the envelope', async () => {
    expectError(await getJson(`${t.url}/v1/images/variations`), 404, null, 'unknown_route');
    expectError(await getJson(`${t.url}/v1/images/generations`), 404, null);
    expectError(await postJson(`${t.url}/v2/whatever`, {}), 404, null);
  });

  test('wrong content type: 415; body over 1 MiB: 413', async () => {
    const text = await fetch(GEN(), { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'prompt=x' });
    expectError({ status: text.status, headers: text.headers, json: await text.json() }, 415, null, 'unsupported_media_type');
    const xml = await fetch(GEN(), { method: 'POST', headers: { 'content-type': 'application/xml' }, body: '<x/>' });
    expectError({ status: xml.status, headers: xml.headers, json: await xml.json() }, 415, null);
    expectError(await postForm(GEN(), { prompt: 'x' }), 415, null);
    expectError(await postJson(GEN(), { prompt: 'x', padding: 'p'.repeat(1_100_000) }), 413, null, 'request_too_large');
  });
});

describe('edits: every upload is checked before any work is queued', () => {
  test('missing image, image as text, JSON body', async () => {
    expectError(await postForm(EDIT(), { prompt: 'x' }), 400, 'image', 'missing_required_parameter');
    expectError(await postForm(EDIT(), { prompt: 'x', image: 'not a file' }), 400, 'image', 'invalid_type');
    expectError(await postJson(EDIT(), { prompt: 'x' }), 415, null, 'unsupported_media_type');
    expectError(await postForm(EDIT(), { image: png(await makePng()) }), 400, 'prompt');
    expectError(await postForm(EDIT(), { image: png(await makePng()), prompt: 'x', n: 'seven' }), 400, 'n', 'invalid_type');
    expectError(await postForm(EDIT(), { image: png(await makePng()), prompt: 'x', strength: '0' }), 400, 'strength');
    expectError(await postForm(EDIT(), { image: png(await makePng()), prompt: 'x', size: '100x100' }), 400, 'size');
  });

  test('not a PNG, JPEG or WebP: 415; corrupt PNG: 400; a PNG declaring huge dimensions: 400; too large: 413', async () => {
    const gif = await (await import('sharp')).default(await makePng()).gif().toBuffer();
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(gif) }), 415, 'image', 'invalid_image_format');
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(Buffer.from('hello')) }), 415, 'image');
    const good = await makePng();
    const corrupt = Buffer.from(good);
    corrupt.fill(0x41, 40, corrupt.length - 12);
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(corrupt) }), 400, 'image', 'invalid_image');
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(good.subarray(0, good.length - 30)) }), 400, 'image', 'invalid_image');
    const bomb = Buffer.from(good);
    bomb.writeUInt32BE(100_000, 16);
    bomb.writeUInt32BE(100_000, 20);
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(bomb) }), 400, 'image', 'image_too_large');
    const big = Buffer.concat([good, Buffer.alloc(4 * 1024 * 1024)]);
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(big) }), 413, 'image', 'file_too_large');
    // A bad second image fails the request too.
    expectError(await postForm(EDIT(), { prompt: 'x', 'image[]': [png(good), png(gif)] }), 415, 'image');
  });

  test('masks are checked like images and must match the image; pose mode needs its models; a bad pose weight', async () => {
    const good = await makePng();
    const gif = await (await import('sharp')).default(good).gif().toBuffer();
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(good), mask: png(gif) }), 415, 'mask', 'invalid_image_format');
    const corrupt = Buffer.from(good);
    corrupt.fill(0x41, 40, corrupt.length - 12);
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(good), mask: png(corrupt) }), 400, 'mask', 'invalid_image');
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(good), mask: png(await makePng(32, 64)) }), 400, 'mask', 'invalid_value');
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(good), mask: 'text' }), 400, 'mask', 'invalid_type');
    // The default model here (an SDXL fixture) has no ControlNet-UNet.
    const e = expectError(await postForm(EDIT(), { prompt: 'x', image: png(good), user: 'cn' }), 400, 'user', 'pose_model_missing');
    assert.match(e.message, /ControlNet-UNet/);
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(good), user: 'pose:2.5' }), 400, 'user', 'invalid_value');
    await assert.rejects(
      t.client().images.edit({ image: await toFile(Buffer.from('GIF89a'), 'x.gif', { type: 'image/gif' }), prompt: 'x' }),
      (err: unknown) => err instanceof OpenAI.APIError && err.status === 415 && err.param === 'image',
    );
  });

  test('nothing was queued by any of the above', async () => {
    const text = await (await fetch(`${t.url}/metrics`)).text();
    assert.doesNotMatch(text, /kiln_jobs_total\{/);
  });
});

describe('engine failures', () => {
  test('a model that fails to load: 500 server_error with a clear message, and the server keeps serving', async () => {
    const e = expectError(await postJson(GEN(), { prompt: 'x', model: 'broken-model', size: '256x256' }), 500, 'model', 'model_load_failed');
    assert.match(e.message, /could not be loaded/);
    assert.equal((await postJson(GEN(), { prompt: 'x', size: '256x256', steps: 1, response_format: 'b64_json' })).status, 200);
  });
});

describe('auth', () => {
  test('with keys: /v1/* needs a valid bearer key (401 otherwise); status routes and image URLs do not', async () => {
    const a = await startTestServer({ apiKeys: ['key-one', 'key-two'] });
    try {
      expectError(await getJson(`${a.url}/v1/models`), 401, null, 'missing_api_key');
      expectError(await getJson(`${a.url}/v1/models`, { authorization: 'Bearer wrong' }), 401, null, 'invalid_api_key');
      expectError(await getJson(`${a.url}/v1/models`, { authorization: 'Basic a2V5LW9uZQ==' }), 401, null);
      expectError(await postJson(`${a.url}/v1/images/generations`, { prompt: 'x' }, { authorization: 'Bearer key-one2' }), 401, null);
      // Percent-encoded paths that the router decodes to /v1/... are guarded too.
      for (const path of ['/%761/models', '/%76%31/models', '/v%31/models']) {
        const res = await getJson(`${a.url}${path}`);
        assert.equal(res.status, 401, `${path} without a key`);
      }
      expectError(await postJson(`${a.url}/%761/images/generations`, { prompt: 'x' }), 401, null, 'missing_api_key');
      // Absolute-form targets: every /v1 one is 401 without a key, unknown routes included (not 404).
      const port = new URL(a.url).port;
      for (const target of [`http://127.0.0.1:${port}/v1/unknown`, 'http://x/v1/models', 'HTTP://x/v1/nothing/here', 'http://x/%76%31/y', 'https://x/v1']) {
        const answer = await sendHostile(a.url, { label: target, raw: `GET ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n` });
        assert.equal(answer.status, 401, `GET ${target} without a key: ${answer.body.slice(0, 120)}`);
        assert.equal(envelope(JSON.parse(answer.body)).code, 'missing_api_key');
      }
      const withKey = await sendHostile(a.url, {
        label: 'absolute, with a key',
        raw: `GET http://x/v1/unknown HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one\r\nConnection: close\r\n\r\n`,
      });
      assert.equal(withKey.status, 404, 'with the key, the unknown route is a 404');
      const health = await sendHostile(a.url, { label: 'absolute /health', raw: 'GET http://x/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' });
      assert.equal(health.status, 200, 'status routes stay open in absolute form');
      await assert.rejects(a.client('wrong').models.list(), OpenAI.AuthenticationError);
      assert.equal((await a.client('key-two').models.list()).data.length, 1);
      const res = await a.client('key-one').images.generate({ prompt: 'x', size: '256x256', steps: 1 } as any);
      const image = await fetch(res.data![0]!.url!); // no key
      assert.equal(image.status, 200);
      await image.arrayBuffer();
      assert.equal((await getJson(`${a.url}/health`)).status, 200);
      assert.equal((await getJson(`${a.url}/ping`)).status, 200);
    } finally {
      await a.close();
    }
  });

  test('without keys: any or no key works', async () => {
    assert.equal((await getJson(`${t.url}/v1/models`)).status, 200);
    assert.equal((await getJson(`${t.url}/v1/models`, { authorization: 'Bearer anything' })).status, 200);
  });
});

describe("OpenAI's fields Kiln cannot honour", () => {
  test('background: transparent is a 400 saying why; auto/opaque, style, moderation and input_fidelity are accepted and change nothing', async () => {
    const e = expectError(await postJson(GEN(), { prompt: 'x', size: '256x256', steps: 1, background: 'transparent' }), 400, 'background', 'unsupported_value');
    assert.match(e.message, /draw opaque images/);
    expectError(await postForm(EDIT(), { prompt: 'x', image: png(await makePng()), background: 'transparent' }), 400, 'background');
    expectError(await postJson(GEN(), { prompt: 'x', style: 'dramatic' }), 400, 'style');
    const base = { prompt: 'x', size: '256x256', steps: 1, n: 3, response_format: 'b64_json' };
    const plain = await postJson(GEN(), base);
    const extra = await postJson(GEN(), { ...base, background: 'opaque', style: 'natural', moderation: 'low' });
    const auto = await postJson(GEN(), { ...base, background: 'auto', style: 'vivid', moderation: 'auto' });
    assert.equal(plain.status, 200);
    assert.equal(extra.json.data[0].b64_json, plain.json.data[0].b64_json, 'ignored fields do not change the image');
    assert.equal(auto.json.data[0].b64_json, plain.json.data[0].b64_json);
    const edited = await postForm(EDIT(), { prompt: 'x', image: png(await makePng()), size: '256x256', steps: '1', input_fidelity: 'high', response_format: 'b64_json' });
    assert.equal(edited.status, 200);
  });
});
