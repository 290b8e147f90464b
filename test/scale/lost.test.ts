/**
 * Redis restarted empty under waiting requests (no persistence: the README's setup), against the
 * real rig: redis-server on a free loopback port, the API in-process, one `kiln worker` with one
 * slot. One job runs, one waits behind it; Redis is stopped and a fresh redis-server with an empty
 * folder takes its port. Both requests must end with the OpenAI envelope's 503
 * `queue_unavailable` saying the job was lost (not hang until --timeout, which here is minutes
 * away and answers 504 `timeout`), the worker must stop the lost job it was running (nobody waits
 * for it), and the server must serve a new request afterwards (the worker keeps one model
 * loaded, `--max-models 1`: the next job's model unloads the stopped one's). Waits poll for
 * states, never for a time.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { startTestServer, postJson, getJson, envelope, makeHome, type ModelSpec, type TestServer } from '../server/helpers.js';
import { RedisServer, WorkerProcess, until } from './helpers.js';

let redis: RedisServer;
let api: TestServer;
let workerHome: string;
let worker: WorkerProcess | undefined;

/** As in scale.test.ts: a wide UNet, about 0.2 s per step at 1024x1024 on one core. */
const SLOW: ModelSpec = { variant: 'sdxl', options: { channels: 64 } };

const fleet = async () => (await getJson(`${api.url}/ping`)).json as { workers?: { pid: number; active: number }[] };

before(async () => {
  redis = await RedisServer.start();
  workerHome = await makeHome({ 'kiln-slow': SLOW });
  api = await startTestServer({ models: { 'kiln-slow': SLOW }, searchDirs: undefined, redisQueue: { url: redis.url }, maxQueue: 8, requestTimeoutMs: 240_000 });
  // One model kept loaded: the worker's --max-models reaches its engine (checked at the end).
  worker = await WorkerProcess.start(redis.url, workerHome, ['--max-models', '1']);
  await until(async () => ((await fleet()).workers?.length === 1 ? true : undefined), 'the worker in /ping');
});

after(async () => {
  await worker?.stop();
  await api?.close();
  await redis?.close();
  rmSync(workerHome, { recursive: true, force: true });
});

const generate = (body: Record<string, unknown>) =>
  postJson(`${api.url}/v1/images/generations`, { prompt: 'a lighthouse', model: 'kiln-tiny', size: '256x256', steps: 3, response_format: 'b64_json', ...body });

test('Redis restarted empty: the running and the waiting request answer 503 (job lost), the worker drops the lost job, new requests work', async () => {
  // The most steps a request may ask: about half a minute on these CPUs, still running long after Redis is back.
  const running = generate({ seed: 1, model: 'kiln-slow', size: '1024x1024', steps: 150 });
  await until(async () => ((await fleet()).workers?.[0]?.active === 1 ? true : undefined), 'the worker running the first job');
  const waiting = generate({ seed: 2 });
  // In Redis's wait list behind the running job (the API's count comes from Redis).
  await until(async () => (api.server.queue.stats().queued >= 1 ? true : undefined), 'the second job waiting in Redis');

  const old = redis;
  await old.stop();
  // A new redis-server, empty folder, same port: what a restart without persistence leaves.
  redis = new RedisServer(old.port);
  rmSync(old.dir, { recursive: true, force: true });
  await redis.start();

  for (const [what, pending] of [['running', running], ['waiting', waiting]] as const) {
    const r = await pending;
    assert.equal(r.status, 503, `${what}: ${r.text}`);
    const e = envelope(r.json);
    assert.equal(e.code, 'queue_unavailable', what);
    assert.equal(e.type, 'server_error', what);
    assert.match(e.message, /the job was lost from the queue \(Redis restarted without it\); retry/, what);
    assert.equal(r.headers.get('retry-after'), '5', what);
  }

  // Nobody waits for the lost job any more: its worker stops it instead of running it to the end.
  await until(async () => /job cancelled: the job was lost from the queue/.test(worker!.log), () => `the worker to stop the lost job; its log:\n${worker!.log}`);
  await until(async () => ((await fleet()).workers?.[0]?.active === 0 ? true : undefined), 'the worker idle again');
  assert.equal(worker!.jobsDone, 0, 'neither lost job was finished');

  // The server and the worker carry on on the new Redis.
  const ok = await until(async () => {
    const r = await generate({ seed: 3 });
    return r.status === 200 ? r : undefined;
  }, 'a 200 on the new Redis');
  assert.equal(ok.json.data[0].seed, 3);
  assert.equal((await getJson(`${api.url}/health`)).status, 200);
  // kiln-tiny's job made room: the stopped job's model was unloaded, and the heartbeat says so.
  await until(async () => /unloaded kiln-slow \(idle; at most 1 model\(s\) loaded per inference thread\)/.test(worker!.log), () => `the unload in the worker's log:\n${worker!.log}`);
  await until(async () => {
    const w = ((await getJson(`${api.url}/ping`)).json as { workers?: { loaded_models: Record<string, number> }[] }).workers?.[0];
    return w && JSON.stringify(w.loaded_models) === JSON.stringify({ 'kiln-tiny': 1 }) ? true : undefined;
  }, 'loaded_models {"kiln-tiny": 1} in the heartbeat');
});
