/**
 * Scale-out aliases, against real services (Redis, a `kiln worker` child process, the API
 * in-process): an alias of the API host's own (its aliases.json) whose model only the workers
 * have runs that model on them and is reported as one machine reports an alias; names nothing
 * serves keep their 404, a model no worker serves its 503. And `kiln worker --preload` of one of
 * the worker's own aliases loads the model it stands for.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startTestServer, postJson, getJson, envelope, makeHome, type TestServer } from '../server/helpers.js';
import { GOLDEN_DIR } from '../graphs/golden.js';
import { RedisServer, WorkerProcess, until } from './helpers.js';

let redis: RedisServer;
let api: TestServer;
let apiHome: string;
let workerHome: string;
let worker: WorkerProcess;

before(async () => {
  redis = await RedisServer.start();
  // The worker's models, as in scale.test.ts: 'worker-only' (which the API host lacks), and the golden
  // SD 1.5 pipeline as 'worker-sd15' with the worker's serving alias of it, 'worker-pretty'.
  workerHome = await makeHome({ 'worker-only': 'sdxl' });
  symlinkSync(join(GOLDEN_DIR, 'pipelines', 'sd15'), join(workerHome, 'models', 'worker-sd15'), 'dir');
  writeFileSync(join(workerHome, 'aliases.json'), JSON.stringify({ 'worker-pretty': { model: 'worker-sd15' } }));
  // The API host has 'only-here', which no worker serves, and its own aliases: of a worker-only model,
  // of a worker's alias, of its own model, and of a model nobody has.
  apiHome = await makeHome({ 'only-here': 'sdxl' });
  writeFileSync(
    join(apiHome, 'aliases.json'),
    JSON.stringify({
      'api-only': { model: 'worker-only' },
      'api-pretty': { model: 'worker-pretty' },
      'api-here': { model: 'only-here' },
      'api-nowhere': { model: 'no-such-model' },
    }),
  );
  api = await startTestServer({ home: apiHome, searchDirs: undefined, redisQueue: { url: redis.url }, requestTimeoutMs: 180_000 });
  // A preload by the worker's alias, and one of a name it does not have (which says so).
  worker = await WorkerProcess.start(redis.url, workerHome, ['--preload', 'worker-pretty', '--preload', 'no-such-model']);
  await until(async () => {
    const ping = (await getJson(`${api.url}/ping`)).json as { workers?: unknown[] };
    return ping.workers?.length === 1 ? true : undefined;
  }, 'the worker in /ping');
});

after(async () => {
  await worker?.stop();
  await api?.close();
  await redis?.close();
  if (workerHome) rmSync(workerHome, { recursive: true, force: true });
  if (apiHome) rmSync(apiHome, { recursive: true, force: true });
});

const generate = (model: string, extra: Record<string, unknown> = {}) =>
  postJson(`${api.url}/v1/images/generations`, { prompt: 'a lighthouse', model, size: '256x256', steps: 2, seed: 7, response_format: 'b64_json', ...extra });

test("the API host's alias of a model only the workers have: it runs there and answers as the model's own name does, naming both", async () => {
  const byAlias = await generate('api-only');
  assert.equal(byAlias.status, 200, byAlias.text);
  const byName = await generate('worker-only');
  assert.equal(byName.status, 200, byName.text);
  assert.equal(byAlias.json.kiln.model, 'worker-only');
  assert.equal(byAlias.json.kiln.requested_model, 'api-only');
  assert.equal(byAlias.headers.get('x-kiln-model'), 'worker-only');
  assert.equal(byName.json.kiln.model, 'worker-only');
  assert.equal(byName.json.kiln.requested_model, undefined);
  assert.equal(byAlias.json.data[0].b64_json, byName.json.data[0].b64_json, 'the same image as by the model name');
  // Listed with the models, and answered by GET /v1/models/{id}, as one machine lists its aliases.
  const list = await getJson(`${api.url}/v1/models`);
  const ids = list.json.data.map((m: { id: string }) => m.id);
  assert.ok(ids.includes('api-only') && ids.includes('api-pretty'), JSON.stringify(ids));
  assert.ok(!ids.includes('api-nowhere'), JSON.stringify(ids));
  const one = await getJson(`${api.url}/v1/models/api-only`);
  assert.equal(one.status, 200);
  assert.equal(one.json.id, 'api-only');
});

test("the API host's alias of a worker's alias: the worker's model draws, the response names the alias asked for", async () => {
  const byAlias = await generate('api-pretty', { steps: 1 });
  assert.equal(byAlias.status, 200, byAlias.text);
  const byName = await generate('worker-sd15', { steps: 1 });
  assert.equal(byName.status, 200, byName.text);
  assert.equal(byAlias.json.kiln.model, 'worker-sd15');
  assert.equal(byAlias.json.kiln.requested_model, 'api-pretty');
  assert.equal(byAlias.json.data[0].b64_json, byName.json.data[0].b64_json);
});

test('names nothing serves keep their 404; an alias of a model no worker serves, the 503', async () => {
  const nowhere = await generate('api-nowhere');
  assert.equal(nowhere.status, 404, nowhere.text);
  const e = envelope(nowhere.json);
  assert.equal(e.code, 'model_not_found');
  assert.match(e.message, /'api-nowhere' is an alias for 'no-such-model'/);
  assert.match(e.message, /No live worker serves it either \(the workers serve [^)]*\bworker-sd15\b/, 'and what the fleet does serve');
  const unknown = await generate('no-such-model');
  assert.equal(unknown.status, 404, unknown.text);
  assert.equal(envelope(unknown.json).code, 'model_not_found');
  assert.match(envelope(unknown.json).message, /No live worker serves it either/);
  assert.equal((await getJson(`${api.url}/v1/models/api-nowhere`)).status, 404);
  const here = await generate('api-here');
  assert.equal(here.status, 503, here.text);
  assert.equal(envelope(here.json).code, 'no_worker_for_model');
  assert.match(envelope(here.json).message, /only-here/);
});

test("kiln worker --preload of the worker's own alias loads the model it stands for; an unknown name is reported", async () => {
  // Waits for each preload's outcome, whichever it is (loading the SD 1.5 graphs may take a while on a busy machine).
  await until(
    async () => /preloaded worker-sd15\b|could not preload worker-pretty/.test(worker.log) && /preload(ed)? no-such-model/.test(worker.log),
    () => `both preloads reported; the worker's log:\n${worker.log}`,
    1200,
  );
  assert.doesNotMatch(worker.log, /could not preload worker-pretty/);
  assert.match(worker.log, /info: preloaded worker-sd15\b/);
  assert.match(worker.log, /error: could not preload no-such-model: /);
  // And a job by that alias runs the preloaded model.
  const r = await generate('worker-pretty', { steps: 1 });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.kiln.model, 'worker-sd15');
  assert.equal(r.json.kiln.requested_model, 'worker-pretty');
});

test('an API host whose default model only the workers have (by name or by its alias): requests naming no model, and OpenAI names, run there', async () => {
  for (const defaultModel of ['worker-only', 'api-only']) {
    const second = await startTestServer({ home: apiHome, searchDirs: undefined, redisQueue: { url: redis.url }, requestTimeoutMs: 180_000, defaultModel });
    try {
      await until(async () => (((await getJson(`${second.url}/ping`)).json as { workers?: unknown[] }).workers?.length === 1 ? true : undefined), 'the worker in the second host\'s /ping');
      const body = { prompt: 'a lighthouse', size: '256x256', steps: 2, seed: 7, response_format: 'b64_json' };
      const plain = await postJson(`${second.url}/v1/images/generations`, body);
      assert.equal(plain.status, 200, `${defaultModel}: ${plain.text}`);
      assert.equal(plain.json.kiln.model, 'worker-only', defaultModel);
      const openAi = await postJson(`${second.url}/v1/images/generations`, { ...body, model: 'dall-e-3' });
      assert.equal(openAi.status, 200, `${defaultModel}: ${openAi.text}`);
      assert.equal(openAi.json.kiln.model, 'worker-only', defaultModel);
      assert.equal(openAi.json.kiln.requested_model, 'dall-e-3', defaultModel);
      const byName = await generate('worker-only');
      assert.equal(plain.json.data[0].b64_json, byName.json.data[0].b64_json, `${defaultModel}: the same image as by the model name`);
    } finally {
      await second.close();
    }
  }
});
