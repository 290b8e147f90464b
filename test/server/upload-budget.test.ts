/**
 * The shared upload budget: the bytes an edit request uploaded stay counted until its job is done;
 * another request whose files would go past the budget gets a 503 (retry later) in the envelope,
 * and the budget is free again once the first request has its answer.
 */
import test from 'node:test';
import assert from 'node:assert/strict';
import { toFile } from 'openai';
import { rgbPng, startTestServer } from './helpers.js';
import { createRng } from '../../src/engine/rng.js';

test('edits past the shared upload budget answer 503 uploads_busy while another holds it; freed afterwards', async () => {
  // Noise does not compress: a 128x128 PNG is ~49 kB; two of them exceed an 80 kB budget.
  const rng = createRng(1);
  const noisy = await rgbPng(128, 128, () => [0, 1, 2].map(() => Math.floor(rng.uniform() * 256)) as [number, number, number]);
  assert.ok(noisy.length > 45_000 && noisy.length < 80_000, String(noisy.length));
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
