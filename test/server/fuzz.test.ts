/**
 * Fuzz-style: a few hundred malformed requests (bad JSON, wrong types, huge fields, truncated
 * multipart, non-PNG and corrupt PNG uploads, PNGs declaring huge dimensions, malformed HTTP).
 * Every answer must be a 4xx in OpenAI's envelope, nothing may be queued, and the server must
 * still serve afterwards. Seeded, so a failure replays; bounded in count and time; loopback only.
 * The requests are built in tools/hostile/ (the memory benchmark replays them by the thousand).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { malformedRequests, multipartBody, prng, sendHostile, type Answer } from '../../tools/hostile/requests.js';
import { startTestServer, makePng, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  t = await startTestServer({ maxUploadBytes: 256 * 1024 });
});
after(() => t.close());

test('200+ malformed requests: each a 4xx in the envelope; nothing queued; the server still serves', async (ctx) => {
  const started = Date.now();
  const good = await makePng(48, 48);
  const answers: Answer[] = [];
  for (const r of malformedRequests(prng(20260423), { good })) answers.push(await sendHostile(t.url, r));

  const GEN = '/v1/images/generations';
  const EDIT = '/v1/images/edits';
  const form = multipartBody([
    { name: 'prompt', data: 'an otter' },
    { name: 'size', data: '256x256' },
    { name: 'image', filename: 'otter.png', type: 'image/png', data: good },
  ]);
  const valid = JSON.stringify({ prompt: 'a fox in the snow', n: 3, size: '256x256', quality: 'draft' });
  const send = (label: string, path: string, init: { headers: Record<string, string>; body: Buffer | string }) => sendHostile(t.url, { label, path, ...init });
  const json = (label: string, body: string) => send(label, GEN, { headers: { 'content-type': 'application/json' }, body });

  // A few concurrent bursts of the above kinds.
  const burst = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      i % 2 ? json(`burst json ${i}`, valid.slice(0, 5 + i)) : send(`burst multipart ${i}`, EDIT, { headers: { 'content-type': form.type }, body: form.body.subarray(0, 100 + i * 10) }),
    ),
  );
  answers.push(...burst);

  assert.ok(answers.length >= 200, `sent ${answers.length} malformed requests`);
  ctx.diagnostic(`${answers.length} malformed requests in ${Date.now() - started} ms`);
  const bad: string[] = [];
  for (const a of answers) {
    let e: any;
    try {
      e = JSON.parse(a.body).error;
    } catch {}
    const ok = a.status >= 400 && a.status < 500 && e && typeof e.message === 'string' && typeof e.type === 'string' && 'param' in e && 'code' in e;
    if (!ok) bad.push(`${a.label}: ${a.status} ${a.body.slice(0, 160)}`);
  }
  assert.deepEqual(bad, [], `answers that were not a 4xx envelope:\n${bad.join('\n')}`);

  // Nothing reached the queue, and the server still serves.
  const metrics = await (await fetch(`${t.url}/metrics`)).text();
  assert.doesNotMatch(metrics, /kiln_jobs_total\{/);
  assert.doesNotMatch(metrics, /status="5\d\d"/);
  const health = await fetch(`${t.url}/health`);
  assert.equal(health.status, 200);
  await health.arrayBuffer();
  const okRes = await send('valid', GEN, { headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'still alive', size: '256x256', steps: 1, response_format: 'b64_json' }) });
  assert.equal(okRes.status, 200, okRes.body.slice(0, 200));
  const editRes = await send('valid edit', EDIT, { headers: { 'content-type': form.type }, body: form.body });
  assert.equal(editRes.status, 200, editRes.body.slice(0, 200));
  assert.ok(Date.now() - started < 90_000, 'bounded in time');
});
