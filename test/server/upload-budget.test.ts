/**
 * The shared upload budgets: the bytes an edit request uploaded stay counted until its job is done,
 * and the bytes of bodies still arriving against a smaller cap; another request that would go past
 * either gets a 503 (retry later) in the envelope, and the budget is free again once the first
 * request has its answer (or a stalled one is cut). A request refused before its body was read
 * does not wedge its connection.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { toFile } from 'openai';
import { rgbPng, startTestServer } from './helpers.js';
import { createRng } from '../../src/engine/rng.js';
import { multipartBody, openSlowConnection } from '../../tools/hostile/requests.js';

/** Noise does not compress: a 128x128 PNG is ~49 kB. */
async function noisyPng(): Promise<Buffer> {
  const rng = createRng(1);
  const png = await rgbPng(128, 128, () => [0, 1, 2].map(() => Math.floor(rng.uniform() * 256)) as [number, number, number]);
  assert.ok(png.length > 45_000 && png.length < 80_000, String(png.length));
  return png;
}

test('edits past the shared upload budget answer 503 uploads_busy while another holds it; freed afterwards', async () => {
  // Two ~49 kB uploads exceed an 80 kB budget.
  const noisy = await noisyPng();
  const t = await startTestServer({ models: { 'kiln-tiny-xl': { variant: 'sdxl', options: { channels: 64 } } }, maxUploadMemory: 80_000 });
  try {
    const client = t.client();
    const image = () => toFile(noisy, 'noise.png', { type: 'image/png' });
    const edit = async (fields: Record<string, unknown>) =>
      client.images.edit({ prompt: 'a fox', size: '256x256', response_format: 'b64_json', ...fields } as any);

    // Within the budget: fine, and the budget is returned afterwards (the next one is fine too).
    await edit({ image: await image(), steps: 2 });
    await edit({ image: await image(), steps: 2 });

    // A long job holds its upload; wait until it is running.
    const slow = edit({ image: await image(), size: '512x512', steps: 60 });
    const active = async () => /kiln_queue_active\S* 1/.test(await (await fetch(`${t.url}/metrics`)).text());
    for (let i = 0; i < 200 && !(await active()); i++) await new Promise((r) => setTimeout(r, 20));
    assert.ok(await active(), 'the slow job never started');

    const res = await fetch(`${t.baseURL}/images/edits`, {
      method: 'POST',
      body: (() => {
        const form = new FormData();
        form.append('prompt', 'a fox');
        form.append('image', new Blob([noisy], { type: 'image/png' }), 'noise.png');
        return form;
      })(),
    });
    assert.equal(res.status, 503);
    assert.equal(res.headers.get('retry-after'), '2');
    const body = (await res.json()) as any;
    assert.equal(body.error.code, 'uploads_busy');
    assert.equal(body.error.type, 'server_error');
    assert.match(body.error.message, /80000 bytes of uploads/);

    await slow;
    await edit({ image: await image(), steps: 2 });
  } finally {
    await t.close();
  }
});

test('an upload that stalls is counted for what it sent: others past the incoming cap get 503 until the stalled one is cut', async () => {
  const noisy = await noisyPng();
  // The slow-client window is short here, so the stalled upload is cut within a second or so.
  const t = await startTestServer({ maxUploadMemory: 1_000_000, maxIncomingMemory: 300_000, minBodyRate: 1024, bodyRateWindowMs: 600 });
  try {
    const stalled = openSlowConnection(t.url, 'upload', { uploadBytes: 280_000, dribbleMs: 1000 });
    const edit = () => {
      const form = new FormData();
      form.append('prompt', 'a fox');
      form.append('size', '256x256');
      form.append('steps', '1');
      form.append('response_format', 'b64_json');
      form.append('image', new Blob([noisy], { type: 'image/png' }), 'noise.png');
      return fetch(`${t.baseURL}/images/edits`, { method: 'POST', body: form });
    };
    // Wait until the server has the stalled upload's bytes: the next edit does not fit beside them.
    let busy: Response | undefined;
    for (let i = 0; i < 100 && !busy; i++) {
      const res = await edit();
      if (res.status === 503) busy = res;
      else await res.arrayBuffer();
    }
    assert.ok(busy, 'no edit was refused while the stalled upload was held');
    assert.equal(busy.headers.get('retry-after'), '2');
    const body = (await busy.json()) as any;
    assert.equal(body.error.code, 'uploads_busy');
    assert.match(body.error.message, /receiving its limit of 300000 bytes/);
    assert.equal(stalled.closedAt, undefined, 'the stalled upload is still open');

    // The slow-client limit cuts it (408), which frees its bytes.
    for (let i = 0; i < 100 && stalled.closedAt === undefined; i++) await new Promise((r) => setTimeout(r, 50));
    assert.equal(stalled.status, 408);
    const after = await edit();
    assert.equal(after.status, 200, await after.text());
    await after.arrayBuffer().catch(() => {});
    stalled.close();
  } finally {
    await t.close();
  }
});

test('a request refused before its body was read leaves the keep-alive connection usable', async () => {
  const t = await startTestServer({ maxUploadMemory: 200_000 });
  try {
    const u = new URL(t.url);
    const big = Buffer.alloc(600_000, 7);
    const cases: [string, string, Buffer][] = [];
    const unknownField = multipartBody([{ name: 'picture', filename: 'a.png', data: big }, { name: 'prompt', data: 'x' }]);
    cases.push(['a file field it does not take, before the rest of the form', unknownField.type, unknownField.body]);
    const overBudget = multipartBody([{ name: 'prompt', data: 'x' }, { name: 'image', filename: 'a.png', type: 'image/png', data: big }]);
    cases.push(['an upload past the budget', overBudget.type, overBudget.body]);
    cases.push(['a JSON body past the budget', 'application/json', Buffer.from(JSON.stringify({ prompt: 'x', pad: 'p'.repeat(600_000) }))]);
    for (const [label, type, body] of cases) {
      const path = type.startsWith('multipart') ? '/v1/images/edits' : '/v1/images/generations';
      const request = Buffer.concat([Buffer.from(`POST ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: ${type}\r\nContent-Length: ${body.length}\r\n\r\n`), body]);
      // Both requests at once on one connection: the second is answered only if the rest of the
      // first's body was read (a connection left open and deaf would time out here).
      const outcome = await new Promise<{ data: string; closed: boolean }>((resolve) => {
        const socket = connect(Number(u.port), u.hostname);
        let data = '';
        const done = (closed: boolean) => {
          clearTimeout(timer);
          socket.destroy();
          resolve({ data, closed });
        };
        const timer = setTimeout(() => done(false), 5_000);
        socket.on('data', (c) => {
          data += c.toString('latin1');
          if ((data.match(/HTTP\/1\.1 \d{3}/g) ?? []).length >= 2 && data.endsWith('}')) done(false);
        });
        socket.on('close', () => done(true));
        socket.on('error', () => {});
        socket.write(request);
        socket.write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n');
      });
      const statuses = outcome.data.match(/HTTP\/1\.1 \d{3}/g) ?? [];
      assert.match(statuses[0] ?? '', /HTTP\/1\.1 (4\d\d|503)/, label);
      assert.equal(statuses[1], 'HTTP/1.1 200', `${label}: the next request on the connection was not answered (${outcome.closed ? 'closed' : 'left open'})`);
    }
  } finally {
    await t.close();
  }
});
