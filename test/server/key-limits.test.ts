/**
 * `maxRequestsPerKey` (kiln serve --max-requests-per-key): against a real server with two API
 * keys, one request in flight per key. A key's second request is a 429 in the envelope with
 * retry-after while another key is served; the place frees when the first is done, or at once
 * when a streaming client goes away; the official SDK's own retries get a stock client through.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { envelope, getJson, postJson, startTestServer, type ModelSpec, type TestServer } from './helpers.js';

/** A wide UNet (as test/scale's kiln-slow): about 0.05 s per step at 512x512 on one core. */
const SLOW: ModelSpec = { variant: 'sdxl', options: { channels: 64 } };
let server: TestServer;

before(async () => {
  server = await startTestServer({ models: { slow: SLOW }, defaultModel: 'slow', apiKeys: ['key-a', 'key-b'], maxRequestsPerKey: 1 });
});
after(() => server?.close());

const generate = (key: string, body: Record<string, unknown> = {}) =>
  postJson(`${server.url}/v1/images/generations`, { prompt: 'a kiln', size: '512x512', steps: 30, response_format: 'b64_json', ...body }, { authorization: `Bearer ${key}` });

/** Until the server has a job queued or running (the first request is in flight). */
async function inFlight(): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const ping = (await getJson(`${server.url}/ping`)).json as { active: number; queued: number };
    if (ping.active + ping.queued > 0) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail('the first request never reached the queue');
}

test("a key's second request in flight is a 429 with retry-after; another key is served; the place frees when the first is done", async () => {
  const first = generate('key-a', { n: 1 });
  await inFlight();
  const second = await generate('key-a', { n: 2, steps: 1 });
  assert.equal(second.status, 429, second.text);
  const e = envelope(second.json);
  assert.equal(e.code, 'too_many_requests');
  assert.match(e.message, /1 image request\(s\) in flight, the most this server allows per key \(--max-requests-per-key 1\)/);
  assert.ok(Number(second.headers.get('retry-after')) >= 1, `retry-after ${second.headers.get('retry-after')}`);
  assert.equal(second.headers.get('x-should-retry'), 'true');
  const other = await generate('key-b', { n: 3, steps: 1 });
  assert.equal(other.status, 200, other.text);
  assert.equal((await first).status, 200);
  const third = await generate('key-a', { n: 4, steps: 1 });
  assert.equal(third.status, 200, third.text);
});

test('a streaming client that goes away frees its place at once', async () => {
  const abort = new AbortController();
  const res = await fetch(`${server.url}/v1/images/generations`, {
    method: 'POST',
    headers: { authorization: 'Bearer key-a', 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'a kiln', size: '512x512', steps: 60, stream: true, partial_images: 3 }),
    signal: abort.signal,
  });
  assert.equal(res.status, 200);
  const reader = res.body!.getReader();
  await reader.read(); // the stream has started
  assert.equal((await generate('key-a', { steps: 1 })).status, 429, 'the stream holds the place');
  abort.abort();
  let status = 0;
  for (let i = 0; i < 250 && status !== 200; i++) {
    status = (await generate('key-a', { steps: 1 })).status;
    if (status !== 200) await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(status, 200, 'served once the stream was gone');
});

test("the official SDK's retries get a stock client through the 429", async () => {
  const first = generate('key-b', { n: 5, steps: 20 });
  await inFlight();
  const statuses: number[] = [];
  const counting = async (url: any, init: any) => {
    const res = await fetch(url, init);
    statuses.push(res.status);
    return res;
  };
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'key-b', maxRetries: 5, timeout: 60_000, fetch: counting as any });
  const r = await client.images.generate({ prompt: 'a kiln', size: '512x512', n: 6, response_format: 'b64_json', steps: 1 } as any);
  assert.equal((r.data![0] as any).seed, 6);
  assert.equal(statuses[0], 429, `what the SDK got: ${statuses}`);
  assert.equal(statuses.at(-1), 200);
  assert.equal((await first).status, 200);
});
