/**
 * `maxModels` (kiln serve --max-models) over the API: with one model kept loaded, requests that
 * alternate between two models all succeed, each image the same bytes as on a server that keeps
 * both, and the log says which model was unloaded; requests at once on both models (two jobs at
 * once per thread) each finish with the same image (the model a job runs on is never unloaded
 * under it).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { getJson, postJson, startTestServer, type ModelSpec, type TestServer } from './helpers.js';

const MODELS: Record<string, ModelSpec> = { 'model-xl': 'sdxl', 'model-15': 'sd15-optimum' };
let bounded: TestServer;
let unbounded: TestServer;
const logLines: string[] = [];

before(async () => {
  const logStream = new Writable({
    write(chunk, _encoding, done) {
      logLines.push(...String(chunk).split('\n').filter(Boolean));
      done();
    },
  });
  // Two jobs at once per thread: a request on one model runs while the other model is loaded.
  bounded = await startTestServer({ models: MODELS, maxModels: 1, maxBatch: 2, logger: pino({ level: 'info' }, logStream) });
  unbounded = await startTestServer({ models: MODELS });
});
after(async () => {
  await bounded?.close();
  await unbounded?.close();
});

const generate = (server: TestServer, model: string, seed: number) =>
  postJson(`${server.url}/v1/images/generations`, { prompt: 'a kiln at night', model, n: seed, size: '256x256', steps: 2, response_format: 'b64_json' });
const unloads = () => logLines.map((l) => JSON.parse(l) as { msg: string }).filter((l) => /^unloaded /.test(l.msg)).map((l) => l.msg.split(' ')[1]);

const loadedNow = async (server: TestServer) => (await getJson(`${server.url}/ping`)).json.loaded_models as Record<string, number>;

test('--max-models 1: alternating models are unloaded and loaded again, the images as with both kept', async () => {
  assert.deepEqual(await loadedNow(bounded), {}, 'nothing loaded before the first request');
  const order = ['model-xl', 'model-15', 'model-xl', 'model-15'];
  for (const [i, model] of order.entries()) {
    const [r, ref] = await Promise.all([generate(bounded, model, 10 + i), generate(unbounded, model, 10 + i)]);
    assert.equal(r.status, 200, r.text);
    assert.equal(ref.status, 200, ref.text);
    assert.equal(r.json.data[0].b64_json, ref.json.data[0].b64_json, `request ${i} (${model}): the same image`);
  }
  assert.deepEqual(unloads(), ['model-xl', 'model-15', 'model-xl'], 'each switch unloads the other model');
  assert.match(logLines.find((l) => l.includes('unloaded '))!, /at most 1 model\(s\) loaded per inference thread/);
  assert.deepEqual(await loadedNow(bounded), { 'model-15': 1 }, 'the last one used, in its one thread');
  assert.deepEqual(await loadedNow(unbounded), { 'model-15': 1, 'model-xl': 1 });
  const metrics = await (await fetch(`${bounded.url}/metrics`)).text();
  assert.match(metrics, /^kiln_models_loaded\{model="model-15"\} 1$/m);
  assert.doesNotMatch(metrics, /^kiln_models_loaded\{model="model-xl"\}/m);
  assert.match(metrics, /^kiln_model_unloads_total\{model="model-xl"\} 2$/m, metrics);
  assert.match(metrics, /^kiln_model_unloads_total\{model="model-15"\} 1$/m);
});

test('--max-models 1: requests on both models at once all finish, with the images as alone (no model unloaded under a running job)', async () => {
  const before = unloads().length;
  const model = (i: number) => (i % 2 ? 'model-15' : 'model-xl');
  const rs = await Promise.all([0, 1, 2, 3].map((i) => generate(bounded, model(i), 20 + i)));
  for (const [i, r] of rs.entries()) {
    assert.equal(r.status, 200, r.text);
    const ref = await generate(unbounded, model(i), 20 + i);
    assert.equal(r.json.data[0].b64_json, ref.json.data[0].b64_json, `request ${i}: the same image`);
  }
  assert.ok(unloads().length > before, 'models were unloaded between the requests');
});

test('--unload-after: a model no request used for that long is unloaded (logged and counted), and serves again the same image', async () => {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      lines.push(...String(chunk).split('\n').filter(Boolean));
      done();
    },
  });
  const server = await startTestServer({ models: MODELS, unloadAfterMs: 200, logger: pino({ level: 'info' }, stream) });
  try {
    const first = await generate(server, 'model-xl', 5);
    assert.equal(first.status, 200, first.text);
    for (let i = 0; i < 250 && !lines.some((l) => l.includes('unloaded model-xl')); i++) await new Promise((r) => setTimeout(r, 20));
    assert.ok(lines.some((l) => /unloaded model-xl \(unused for 200 ms\)/.test(l)), lines.join('\n'));
    assert.match(await (await fetch(`${server.url}/metrics`)).text(), /^kiln_model_unloads_total\{model="model-xl"\} 1$/m);
    assert.deepEqual(await loadedNow(server), {});
    const again = await generate(server, 'model-xl', 5);
    assert.equal(again.status, 200, again.text);
    assert.equal(again.json.data[0].b64_json, first.json.data[0].b64_json);
  } finally {
    await server.close();
  }
});
