/**
 * `retry-after` on a full queue predicts the wait: what the jobs ahead still need, from measured
 * generation times as soon as there are any (the running job's steps before any has finished;
 * the prior from the model's size is unit-tested). Each case compares the header with the time
 * the queue then really took to drain.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { startTestServer, getJson, type TestServer } from './helpers.js';

// A UNet 8x wider than the default fixture: about 0.5 s per 1024x1024 step on a CPU core.
const MODEL = { 'kiln-tiny-xl': { variant: 'sdxl' as const, options: { channels: 64 } } };

function generate(t: TestServer, steps: number) {
  return fetch(`${t.url}/v1/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'a queue', size: '1024x1024', steps, response_format: 'b64_json' }),
  }).then(async (res) => {
    await res.arrayBuffer();
    return { status: res.status, at: performance.now(), generationMs: Number(res.headers.get('x-kiln-generation-ms')) };
  });
}

async function waitFor(t: TestServer, pred: (ping: { active: number; queued: number }) => boolean) {
  for (let i = 0; i < 1000; i++) {
    if (pred((await getJson(`${t.url}/ping`)).json)) return;
    await sleep(10);
  }
  throw new Error('the queue never got there');
}

/** One job running and one queued, then a third: its retry-after against the time until the queued one is done. */
async function fullQueue(t: TestServer, steps: number, beforeQueueing: () => Promise<void>) {
  const running = generate(t, steps);
  await waitFor(t, (p) => p.active === 1);
  await beforeQueueing();
  const queued = generate(t, steps);
  await waitFor(t, (p) => p.queued === 1);
  const refused = await fetch(`${t.url}/v1/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'one too many', size: '1024x1024', steps }),
  });
  const askedAt = performance.now();
  await refused.arrayBuffer();
  assert.equal(refused.status, 429);
  const retryAfter = Number(refused.headers.get('retry-after'));
  const [a, b] = await Promise.all([running, queued]);
  assert.equal(a.status, 200);
  assert.equal(b.status, 200);
  return { retryAfter, drainedS: (b.at - askedAt) / 1000, perImageS: b.generationMs / 1000 };
}

/** retry-after is whole seconds, at least 1: within a factor of 3 of the real wait (or 1 s for a shorter one). */
function assertClose(retryAfter: number, realS: number, what: string) {
  assert.ok(Number.isInteger(retryAfter) && retryAfter >= 1, `retry-after ${retryAfter}`);
  assert.ok(retryAfter <= Math.max(1, 3 * realS) + 1 && retryAfter >= realS / 3, `${what}: retry-after ${retryAfter} s, the queue took ${realS.toFixed(1)} s`);
}

test('after a few images: retry-after is the measured time per image times the jobs ahead', async (ctx) => {
  const t = await startTestServer({ models: MODEL, maxQueue: 1 });
  try {
    for (let i = 0; i < 2; i++) assert.equal((await generate(t, 3)).status, 200);
    const r = await fullQueue(t, 3, async () => {});
    ctx.diagnostic(`retry-after ${r.retryAfter} s; the running and the queued image took ${r.drainedS.toFixed(2)} s more; ${r.perImageS.toFixed(2)} s per image`);
    assertClose(r.retryAfter, r.drainedS, 'after 2 images');
    // Two jobs ahead (one running): about two images' time, not a 10 s-per-job guess.
    assertClose(r.retryAfter, 2 * r.perImageS, 'per image x position');
  } finally {
    await t.close();
  }
});

test("right after start, before any job has finished: retry-after comes from the running job's steps", async (ctx) => {
  // The job's progress, from the server's debug log: its first steps are the only measurement.
  let denoised = 0;
  const log = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n')) {
        if (!line.includes('"progress"')) continue;
        const entry = JSON.parse(line) as { stage?: string; step?: number };
        if (entry.stage === 'denoise') denoised = Math.max(denoised, entry.step ?? 0);
      }
      done();
    },
  });
  const t = await startTestServer({ models: MODEL, maxQueue: 1, logger: pino({ level: 'debug' }, log) });
  try {
    const r = await fullQueue(t, 6, async () => {
      for (let i = 0; denoised < 2; i++) {
        if (i > 3000) throw new Error('the running job reported no denoising steps');
        await sleep(10);
      }
    });
    ctx.diagnostic(`retry-after ${r.retryAfter} s; the queue took ${r.drainedS.toFixed(2)} s more`);
    assertClose(r.retryAfter, r.drainedS, 'right after start');
  } finally {
    await t.close();
  }
});
