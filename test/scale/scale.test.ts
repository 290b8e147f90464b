/**
 * Scale-out, against real services: Debian's redis-server on a free loopback port, the API
 * in-process (`redisQueue`), and two `kiln worker` child processes on the built-in kiln-tiny
 * models. Jobs spread over both workers; per-step progress and partial images come back;
 * a worker SIGKILLed mid-job has its job finished by the other, one image delivered; a model no
 * worker serves and a stopped Redis answer 503 (and the server recovers when Redis is back);
 * the queue bound answers 429 with retry-after. Nothing here waits for a fixed time: each step
 * polls for the state it needs (bounded), with short lock/stall settings passed as options.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Progress } from '../../src/engine/pipeline.js';
import { detectLayout } from '../../src/engine/model.js';
import { sizeForUpload } from '../../src/engine/presets.js';
import { startTestServer, postJson, getJson, envelope, makeHome, makePng, personPng, type ModelSpec, type TestServer } from '../server/helpers.js';
import { installImagePromptPose } from '../server/image-prompt-fixtures.js';
import { RedisServer, WorkerProcess, until } from './helpers.js';

let redis: RedisServer;
let api: TestServer;
let workerHome: string;
const workers: WorkerProcess[] = [];
/** One machine (its in-process runner) with the workers' 'worker-sd15', its assets and alias: what the same requests report there. */
let one: TestServer;
let oneHome: string;

/** 'worker-sd15' with its IP-Adapters (style and face) and pose models, and a serving alias of it, 'worker-pretty'. */
async function installWorkerSd15(home: string): Promise<void> {
  await installImagePromptPose(home, 'worker-sd15');
  writeFileSync(join(home, 'aliases.json'), JSON.stringify({ 'worker-pretty': { model: 'worker-sd15' } }));
}

const fleet = async (t: TestServer) => (await getJson(`${t.url}/ping`)).json as { workers?: { pid: number; active: number; models: string[] }[] };

/** A UNet 8x wider than the default fixture: jobs long enough to be caught running (about 0.2 s per step at 1024x1024 on one core). */
const SLOW: ModelSpec = { variant: 'sdxl', options: { channels: 64 } };

before(async () => {
  redis = await RedisServer.start();
  // The workers serve the built-in kiln-tiny models, 'kiln-slow', and 'worker-only', which the API host does not have.
  workerHome = await makeHome({ 'kiln-slow': SLOW, 'worker-only': 'sdxl' });
  // And 'worker-sd15' (installWorkerSd15), also only theirs.
  await installWorkerSd15(workerHome);
  oneHome = mkdtempSync(join(tmpdir(), 'kiln-scale-one-'));
  mkdirSync(join(oneHome, 'models'));
  await installWorkerSd15(oneHome);
  one = await startTestServer({ home: oneHome });
  // The API's home has one more model, 'only-here', that no worker has.
  api = await startTestServer({
    models: { 'only-here': 'sdxl', 'kiln-slow': SLOW },
    searchDirs: undefined,
    redisQueue: { url: redis.url },
    maxQueue: 16,
    requestTimeoutMs: 180_000,
  });
  workers.push(...(await Promise.all([WorkerProcess.start(redis.url, workerHome), WorkerProcess.start(redis.url, workerHome)])));
  await until(async () => ((await fleet(api)).workers?.length === 2 ? true : undefined), 'two live workers in /ping');
});

after(async () => {
  await Promise.allSettled(workers.map((w) => w.stop()));
  await api?.close();
  await one?.close();
  await redis?.close();
  rmSync(workerHome, { recursive: true, force: true });
  if (oneHome) rmSync(oneHome, { recursive: true, force: true });
});

/** Every worker's heartbeat says it is idle: any job seen running after this is the next one submitted. */
const idle = (t: TestServer) => until(async () => ((await fleet(t)).workers!.every((w) => w.active === 0) ? true : undefined), 'idle workers');

const generate = (t: TestServer, body: Record<string, unknown>) =>
  postJson(`${t.url}/v1/images/generations`, { prompt: 'a lighthouse', model: 'kiln-tiny', size: '256x256', steps: 3, response_format: 'b64_json', ...body });

test('/ping, /health and /metrics show the queue, the live workers and their models', async () => {
  const ping = await fleet(api);
  assert.equal(ping.workers!.length, 2);
  assert.deepEqual(new Set(ping.workers!.map((w) => w.pid)), new Set(workers.map((w) => w.pid)));
  for (const w of ping.workers!) assert.ok(w.models.includes('kiln-tiny') && w.models.includes('kiln-tiny-xl'), JSON.stringify(w.models));
  const health = await getJson(`${api.url}/health`);
  assert.equal(health.status, 200);
  assert.equal(health.json.queue.reachable, true);
  const metrics = await (await fetch(`${api.url}/metrics`)).text();
  assert.match(metrics, /^kiln_workers_live 2$/m);
  assert.match(metrics, /^kiln_queue_reachable 1$/m);
  assert.match(metrics, /^kiln_worker_model\{worker="[^"]+",model="kiln-tiny"\} 1$/m);
});

test('jobs spread over the two workers, each image delivered to its request', async () => {
  const before = workers.map((w) => w.jobsDone);
  const results = await Promise.all([1, 2, 3, 4, 5, 6].map((seed) => generate(api, { seed, steps: 4 })));
  for (const [i, r] of results.entries()) {
    assert.equal(r.status, 200, r.text);
    assert.equal(r.json.data.length, 1);
    assert.equal(r.json.data[0].seed, i + 1);
    assert.ok(Buffer.from(r.json.data[0].b64_json, 'base64').subarray(1, 4).toString() === 'PNG');
  }
  const ran = workers.map((w, i) => w.jobsDone - before[i]!);
  assert.equal(ran[0]! + ran[1]!, 6, `jobs per worker: ${ran}`);
  assert.ok(ran[0]! > 0 && ran[1]! > 0, `both workers ran jobs: ${ran}`);
  // Each worker's heartbeat says which models its threads hold now.
  await until(async () => {
    const ping = (await getJson(`${api.url}/ping`)).json as { workers: { loaded_models: Record<string, number> }[] };
    return ping.workers.length === 2 && ping.workers.every((w) => w.loaded_models['kiln-tiny'] === 1) ? true : undefined;
  }, 'kiln-tiny loaded on both workers in /ping');
});

test('every denoising step reaches the waiting job handle (BullMQ job progress)', async () => {
  const job = api.server.queue.submit({ mode: 'generate', model: 'kiln-tiny', options: { prompt: 'steps', seed: 3, size: '256x256', steps: 5 }, output: { format: 'png' } });
  const seen: Progress[] = [];
  job.events.on('progress', (p) => seen.push(p));
  const out = await job.result;
  assert.equal(out.contentType, 'image/png');
  const steps = seen.filter((p) => p.stage === 'denoise').map((p) => p.step);
  assert.deepEqual([...new Set(steps)].sort((a, b) => a - b), [1, 2, 3, 4, 5]);
  assert.equal(job.state, 'done');
});

test('streaming: partial images made on a worker reach the SSE client, then the image', async () => {
  const res = await fetch(`${api.url}/v1/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'a lighthouse', model: 'kiln-tiny', size: '256x256', steps: 6, stream: true, partial_images: 2 }),
  });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type') ?? '', /text\/event-stream/);
  const text = await res.text();
  const events = text
    .split('\n')
    .filter((l) => l.startsWith('data: '))
    .map((l) => JSON.parse(l.slice(6)) as { type: string; partial_image_index?: number; b64_json?: string });
  assert.deepEqual(events.map((e) => e.type), ['image_generation.partial_image', 'image_generation.partial_image', 'image_generation.completed']);
  assert.deepEqual(events.slice(0, 2).map((e) => e.partial_image_index), [0, 1]);
  for (const e of events) assert.ok(e.b64_json && e.b64_json.length > 100);
});

test('an edit: the upload travels through Redis (by key) to the worker', async () => {
  const form = new FormData();
  form.append('image', new Blob([await makePng(256, 256)], { type: 'image/png' }), 'in.png');
  form.append('prompt', 'a lighthouse at dusk');
  form.append('model', 'kiln-tiny');
  form.append('steps', '4');
  form.append('response_format', 'b64_json');
  const res = await fetch(`${api.url}/v1/images/edits`, { method: 'POST', body: form });
  const json = (await res.json()) as any;
  assert.equal(res.status, 200, JSON.stringify(json));
  assert.equal(json.kiln.mode, 'img2img');
  assert.equal(json.data.length, 1);
});

test('a job longer than the lock duration keeps its lock (renewed from the free event loop): it runs once', async () => {
  const before = workers.map((w) => w.jobsDone);
  const stalledBefore = workers.map((w) => (w.log.match(/found stalled/g) ?? []).length);
  // Several lock durations (2 s) of work on these CPUs.
  const r = await generate(api, { seed: 11, model: 'kiln-slow', size: '1024x1024', steps: 60 });
  assert.equal(r.status, 200, r.text);
  assert.ok(r.json.kiln.timings.generation_ms > 2000, `the job outlasted the 2 s lock (${r.json.kiln.timings.generation_ms} ms)`);
  assert.equal(workers.reduce((n, w, i) => n + w.jobsDone - before[i]!, 0), 1, 'one run');
  assert.deepEqual(workers.map((w) => (w.log.match(/found stalled/g) ?? []).length), stalledBefore);
});

test('a client that disconnects mid-job: the worker stops the job between steps', async () => {
  await idle(api);
  const before = workers.map((w) => w.jobsDone);
  const controller = new AbortController();
  const pending = fetch(`${api.url}/v1/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'a very long job', model: 'kiln-slow', size: '1024x1024', steps: 150, response_format: 'b64_json' }),
    signal: controller.signal,
  }).catch((err: Error) => err);
  const busy = await until(async () => (await fleet(api)).workers!.find((w) => w.active > 0), 'a worker running the job');
  controller.abort();
  assert.ok((await pending) instanceof Error);
  const worker = workers.find((w) => w.pid === busy.pid)!;
  await until(async () => /job cancelled: the client disconnected/.test(worker.log), () => `the worker to report the job cancelled; its log:\n${worker.log}`);
  await until(async () => ((await fleet(api)).workers!.every((w) => w.active === 0) ? true : undefined), 'the worker idle again');
  assert.deepEqual(workers.map((w) => w.jobsDone), before, 'the job never finished');
});

test('a model only the workers have: listed in /v1/models, served, and its pose refusal comes back from the worker as a 400', async () => {
  const list = await getJson(`${api.url}/v1/models`);
  assert.ok(list.json.data.some((m: { id: string }) => m.id === 'worker-only'), JSON.stringify(list.json.data.map((m: { id: string }) => m.id)));
  const r = await generate(api, { model: 'worker-only', size: '512x512' });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.kiln.model, 'worker-only');
  assert.equal(r.json.size, '512x512');
  // An edit's `size: auto` follows the upload's shape there too, by one machine's rule (the worker
  // resolves it), not the model's square native size.
  const auto = new FormData();
  auto.append('image', new Blob([await makePng(384, 256)], { type: 'image/png' }), 'wide.png');
  auto.append('prompt', 'a wide field');
  auto.append('model', 'worker-only');
  auto.append('size', 'auto');
  auto.append('steps', '2');
  auto.append('response_format', 'b64_json');
  const autoRes = await fetch(`${api.url}/v1/images/edits`, { method: 'POST', body: auto });
  const autoJson = (await autoRes.json()) as any;
  assert.equal(autoRes.status, 200, JSON.stringify(autoJson));
  const expected = sizeForUpload({ width: 384, height: 256 }, detectLayout(join(workerHome, 'models', 'worker-only')));
  assert.ok(expected.width > expected.height, `${expected.width}x${expected.height}`);
  assert.equal(autoJson.size, `${expected.width}x${expected.height}`);
  // Its folder (no ControlNet-UNet) is only on the workers: the worker refuses pose mode, the API answers the same 400 as one machine would.
  const form = new FormData();
  form.append('image', new Blob([await makePng(256, 256)], { type: 'image/png' }), 'in.png');
  form.append('prompt', 'a dancer');
  form.append('model', 'worker-only');
  form.append('user', 'cn');
  const res = await fetch(`${api.url}/v1/images/edits`, { method: 'POST', body: form });
  assert.equal(res.status, 400);
  const e = envelope(await res.json());
  assert.equal(e.code, 'pose_model_missing');
  assert.equal(e.param, 'user');
  assert.match(e.message, /worker-only/);
});

/** The kiln block but its timings: the model, the settings, the mode, people and the image prompt. */
const kilnBlock = (json: any) => {
  const { timings: _timings, ...rest } = json.kiln;
  return rest;
};

test('an image prompt on a model only the workers have: kiln.image_prompt names the adapters the worker used, as one machine does', async () => {
  const person = await personPng(256);
  const edit = async (t: TestServer, user: string) => {
    const form = new FormData();
    form.append('image', new Blob([person], { type: 'image/png' }), 'in.png');
    form.append('prompt', 'a dancer on a stage');
    form.append('model', 'worker-sd15');
    form.append('user', user);
    form.append('size', '256x256');
    form.append('steps', '1');
    form.append('seed', '5');
    form.append('response_format', 'b64_json');
    const res = await fetch(`${t.url}/v1/images/edits`, { method: 'POST', body: form });
    return { status: res.status, json: (await res.json()) as any };
  };
  const reports: Record<string, any> = {};
  for (const user of ['face:0.5,style:0.6', 'face:0,style:0', 'face:0.5,style:0.6,pose:1.0']) {
    const remote = await edit(api, user);
    assert.equal(remote.status, 200, JSON.stringify(remote.json));
    const local = await edit(one, user);
    assert.equal(local.status, 200, JSON.stringify(local.json));
    assert.deepEqual(kilnBlock(remote.json), kilnBlock(local.json), user);
    assert.equal(remote.json.data[0].b64_json, local.json.data[0].b64_json, `${user}: the worker drew what one machine draws`);
    reports[user] = remote.json.kiln;
  }
  assert.deepEqual(reports['face:0.5,style:0.6']!.image_prompt, {
    style: 0.6,
    face: 0.5,
    adapters: ['ip-adapter_sd15.safetensors', 'ip-adapter-plus-face_sd15.safetensors'],
  });
  assert.deepEqual(reports['face:0,style:0']!.image_prompt, { style: 0, face: 0, adapters: [] });
  const posed = reports['face:0.5,style:0.6,pose:1.0']!;
  assert.equal(posed.mode, 'pose');
  assert.equal(posed.control_scale, 1);
  assert.equal(posed.people, 1);
  assert.deepEqual(posed.image_prompt, reports['face:0.5,style:0.6']!.image_prompt);
});

test("a worker's own alias (aliases.json) of a model only it has: it runs that model, and the response names both, as one machine's does", async () => {
  const body = { prompt: 'a lighthouse', model: 'worker-pretty', size: '256x256', steps: 1, seed: 9, response_format: 'b64_json' };
  const remote = await postJson(`${api.url}/v1/images/generations`, body);
  assert.equal(remote.status, 200, remote.text);
  const local = await postJson(`${one.url}/v1/images/generations`, body);
  assert.equal(local.status, 200, local.text);
  assert.equal(remote.json.kiln.model, 'worker-sd15');
  assert.equal(remote.json.kiln.requested_model, 'worker-pretty');
  assert.deepEqual(kilnBlock(remote.json), kilnBlock(local.json));
  assert.equal(remote.headers.get('x-kiln-model'), local.headers.get('x-kiln-model'));
  assert.equal(remote.json.data[0].b64_json, local.json.data[0].b64_json);
});

test('a model no live worker serves answers 503 saying so (not a hanging request)', async () => {
  const r = await generate(api, { model: 'only-here' });
  assert.equal(r.status, 503);
  const e = envelope(r.json);
  assert.equal(e.code, 'no_worker_for_model');
  assert.equal(e.param, 'model');
  assert.match(e.message, /No live worker serves the model 'only-here'/);
  assert.match(e.message, /kiln-tiny/); // what the fleet does serve
});

test('the queue bound answers 429 with a retry-after from the depth and the run time', async () => {
  // A second API host on the same queue, which lets no job wait beyond the fleet's idle slots.
  const strict = await startTestServer({ models: { 'kiln-slow': SLOW }, searchDirs: undefined, redisQueue: { url: redis.url }, maxQueue: 0, requestTimeoutMs: 180_000 });
  try {
    await until(async () => ((await fleet(strict)).workers?.length === 2 ? true : undefined), 'the fleet seen by the second API host');
    await idle(strict);
    const long = [1, 2].map((seed) => generate(strict, { seed, model: 'kiln-slow', size: '1024x1024', steps: 20 }));
      await until(async () => ((await fleet(strict)).workers!.reduce((n, w) => n + w.active, 0) === 2 ? true : undefined), () => `both workers busy; logs:\n${workers.map((w) => w.log).join('\n---\n')}`);
    const refused = await generate(strict, { seed: 3 });
    assert.equal(refused.status, 429, refused.text);
    assert.equal(envelope(refused.json).code, 'queue_full');
    const retryAfter = Number(refused.headers.get('retry-after'));
    assert.ok(Number.isInteger(retryAfter) && retryAfter >= 1, `retry-after ${refused.headers.get('retry-after')}`);
    for (const r of await Promise.all(long)) assert.equal(r.status, 200, r.text);
  } finally {
    await strict.close();
  }
});

test('a worker SIGKILLed mid-job: the other worker runs the job again, one image is delivered', async () => {
  await idle(api);
  const imagesDir = join(api.home, 'images');
  const filesBefore = readdirSync(imagesDir).filter((f) => !f.startsWith('.')).length;
  const pending = generate(api, { seed: 42, model: 'kiln-slow', size: '1024x1024', steps: 20, response_format: 'url' });
  const busy = await until(async () => (await fleet(api)).workers!.find((w) => w.active > 0), 'a worker running the job');
  const victim = workers.find((w) => w.pid === busy.pid)!;
  const survivor = workers.find((w) => w !== victim)!;
  const survivorDone = survivor.jobsDone;
  await victim.kill();
  const r = await pending;
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.data.length, 1);
  assert.equal(r.json.data[0].seed, 42);
  assert.equal(survivor.jobsDone, survivorDone + 1, 'the surviving worker ran it');
  const image = await fetch(r.json.data[0].url);
  assert.equal(image.status, 200);
  // Exactly one stored image for the one request: the re-run did not deliver a second one.
  assert.equal(readdirSync(imagesDir).filter((f) => !f.startsWith('.')).length, filesBefore + 1);
  // The dead worker's heartbeat expires: /ping shows one worker.
  await until(async () => ((await fleet(api)).workers?.length === 1 ? true : undefined), 'the dead worker gone from /ping');
  workers.splice(workers.indexOf(victim), 1, await WorkerProcess.start(redis.url, workerHome));
  await until(async () => ((await fleet(api)).workers?.length === 2 ? true : undefined), 'a replacement worker');
});

test('Redis stopped: requests and /health answer 503; Redis back: the server works again', async () => {
  await redis.stop();
  const down = await until(async () => {
    const r = await generate(api, { seed: 5 });
    return r.status === 503 ? r : undefined;
  }, 'a 503 while Redis is down');
  assert.equal(envelope(down.json).code, 'queue_unavailable');
  assert.ok(Number(down.headers.get('retry-after')) >= 1);
  const health = await until(async () => {
    const h = await getJson(`${api.url}/health`);
    return h.status === 503 ? h : undefined;
  }, '/health 503');
  assert.equal(health.json.queue.reachable, false);
  await redis.start();
  // Workers and API reconnect by themselves; the first requests may still see no worker until their heartbeats are back.
  const ok = await until(async () => {
    const r = await generate(api, { seed: 6 });
    return r.status === 200 ? r : undefined;
  }, 'a 200 after Redis came back');
  assert.equal(ok.json.data[0].seed, 6);
  assert.equal((await getJson(`${api.url}/health`)).status, 200);
});
