/**
 * CORS (`corsOrigins`, kiln serve --cors-origin) at the HTTP level, against a real server with an
 * API key: a listed origin's preflight is answered without a key, its requests and their errors
 * (401, 400) and streams carry the headers; another origin gets none; a server without the
 * option sends none. What a browser does with them: test/browser/cors.test.ts.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { envelope, postJson, startTestServer, type TestServer } from './helpers.js';

const APP = 'https://app.example';
const KEY = 'cors-key';
let server: TestServer;
let plain: TestServer;

before(async () => {
  server = await startTestServer({ corsOrigins: [APP], apiKeys: [KEY] });
  plain = await startTestServer({ apiKeys: [KEY] });
});
after(async () => {
  await server?.close();
  await plain?.close();
});

const preflight = (t: TestServer, origin: string) =>
  fetch(`${t.url}/v1/images/generations`, {
    method: 'OPTIONS',
    headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type' },
  });
const generate = (t: TestServer, headers: Record<string, string>, body: Record<string, unknown> = {}) =>
  postJson(`${t.url}/v1/images/generations`, { prompt: 'a kiln', size: '256x256', steps: 1, response_format: 'b64_json', ...body }, headers);

test('a listed origin: the preflight is answered without a key; requests, their errors and streams carry the headers', async () => {
  const pre = await preflight(server, APP);
  assert.equal(pre.status, 204);
  assert.equal(pre.headers.get('access-control-allow-origin'), APP);
  assert.match(pre.headers.get('access-control-allow-methods') ?? '', /\bPOST\b/);
  assert.match(pre.headers.get('access-control-allow-headers') ?? '', /\bauthorization\b/i);
  assert.equal(pre.headers.get('access-control-max-age'), '600');

  const ok = await generate(server, { origin: APP, authorization: `Bearer ${KEY}` }, { n: 3 });
  assert.equal(ok.status, 200, ok.text);
  assert.equal(ok.headers.get('access-control-allow-origin'), APP);
  assert.equal(ok.headers.get('access-control-expose-headers'), '*');
  assert.equal(ok.headers.get('x-kiln-seed'), '3');

  const noKey = await generate(server, { origin: APP });
  assert.equal(noKey.status, 401);
  assert.equal(envelope(noKey.json).code, 'missing_api_key');
  assert.equal(noKey.headers.get('access-control-allow-origin'), APP, 'a browser app can read why it was refused');

  const bad = await generate(server, { origin: APP, authorization: `Bearer ${KEY}` }, { size: '3x3' });
  assert.equal(bad.status, 400);
  assert.equal(bad.headers.get('access-control-allow-origin'), APP);

  const stream = await fetch(`${server.url}/v1/images/generations`, {
    method: 'POST',
    headers: { origin: APP, authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'a kiln', size: '256x256', steps: 1, stream: true, partial_images: 0 }),
  });
  assert.equal(stream.status, 200);
  assert.match(stream.headers.get('content-type') ?? '', /text\/event-stream/);
  assert.equal(stream.headers.get('access-control-allow-origin'), APP);
  assert.match(await stream.text(), /image_generation\.completed/);
});

test('another origin gets no CORS headers (a browser blocks it); without --cors-origin none are sent and a preflight needs the key', async () => {
  const pre = await preflight(server, 'https://evil.example');
  assert.equal(pre.headers.get('access-control-allow-origin'), null);
  const r = await generate(server, { origin: 'https://evil.example', authorization: `Bearer ${KEY}` });
  assert.equal(r.headers.get('access-control-allow-origin'), null);

  const none = await preflight(plain, APP);
  assert.equal(none.headers.get('access-control-allow-origin'), null);
  assert.equal(none.status, 401, 'no CORS: an OPTIONS request is one more request under /v1');
  const direct = await generate(plain, { origin: APP, authorization: `Bearer ${KEY}` });
  assert.equal(direct.status, 200, direct.text);
  assert.equal(direct.headers.get('access-control-allow-origin'), null);
});
