/**
 * A rolling restart of `kiln worker` (SIGTERM), against the real rig of scale.test.ts: redis-server
 * on a free loopback port, the API in-process, two `kiln worker` processes. A job still running
 * at --shutdown-timeout goes back to the queue and the other worker runs it: the request gets the
 * same image as an uninterrupted run; a job that finishes in time is delivered by its own worker,
 * which takes no new job meanwhile; a second SIGTERM gives the job back at once; the stopped
 * workers exit 0. A streamed job handed over keeps its partial image indices increasing (none
 * sent twice). Waits poll for states, never for a time.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { QueueEvents } from 'bullmq';
import { DEFAULT_QUEUE_NAME, KEY_PREFIX, connect } from '../../src/queue/redis.js';
import { parseRedisUrl } from '../../src/queue/redis-url.js';
import { startTestServer, postJson, getJson, makeHome, type ModelSpec, type TestServer } from '../server/helpers.js';
import { RedisServer, WorkerProcess, until, waitForOutput } from './helpers.js';

let redis: RedisServer;
let api: TestServer;
let workerHome: string;
let events: QueueEvents;
let eventsConnection: ReturnType<typeof connect>;
const workers: WorkerProcess[] = [];

/** As in scale.test.ts: a wide UNet, about 0.2 s per step at 1024x1024 on one core (0.05 s at 512x512, the size used here). */
const SLOW: ModelSpec = { variant: 'sdxl', options: { channels: 64 } };
const SHORT = ['--shutdown-timeout', '300ms'];

/** The highest denoising step each job has reported (BullMQ job progress, read from Redis as the API does). */
const stepOf = new Map<string, number>();

const fleet = async () => (await getJson(`${api.url}/ping`)).json as { workers: { pid: number; active: number }[] };

before(async () => {
  redis = await RedisServer.start();
  workerHome = await makeHome({ 'kiln-slow': SLOW });
  api = await startTestServer({ models: { 'kiln-slow': SLOW }, searchDirs: undefined, redisQueue: { url: redis.url }, maxQueue: 16, requestTimeoutMs: 300_000 });
  eventsConnection = connect(parseRedisUrl(redis.url));
  events = new QueueEvents(DEFAULT_QUEUE_NAME, { connection: eventsConnection, prefix: KEY_PREFIX });
  events.on('progress', ({ jobId, data }) => {
    const p = (data as { progress?: { stage: string; step: number } }).progress;
    if (p?.stage === 'denoise') stepOf.set(jobId, Math.max(stepOf.get(jobId) ?? 0, p.step));
  });
  await events.waitUntilReady();
  // A short shutdown timeout: far less than what is left of the jobs below when they are stopped.
  workers.push(...(await Promise.all([0, 1].map(() => WorkerProcess.start(redis.url, workerHome, SHORT)))));
  await until(async () => ((await fleet()).workers?.length === 2 ? true : undefined), 'two live workers in /ping');
});

after(async () => {
  await Promise.allSettled(workers.map((w) => w.stop()));
  await events?.close();
  await eventsConnection?.quit().catch(() => {});
  await api?.close();
  await redis?.close();
  rmSync(workerHome, { recursive: true, force: true });
});

const generate = (body: Record<string, unknown>) =>
  postJson(`${api.url}/v1/images/generations`, { prompt: 'a lighthouse in a storm', model: 'kiln-slow', size: '512x512', response_format: 'b64_json', ...body });

const idle = () => until(async () => ((await fleet()).workers.length === 2 && (await fleet()).workers.every((w) => w.active === 0) ? true : undefined), 'two idle workers');

/** The worker whose heartbeat says it runs a job, once that job has reported `step` denoising steps. */
async function holderAt(step: number): Promise<WorkerProcess> {
  // Polled often: the job must be far from done when the caller signals its worker.
  const busy = await until(async () => (await fleet()).workers.find((w) => w.active > 0), 'a worker running the job', 1200, 50);
  await until(async () => [...stepOf.values()].some((s) => s >= step), `the job at denoising step ${step}`, 1200, 50);
  return workers.find((w) => w.pid === busy.pid)!;
}

/** Sends SIGTERM; resolves with the exit code. */
function sigterm(w: WorkerProcess): Promise<number | null> {
  const exited = new Promise<number | null>((r) => w.child.once('exit', (code) => r(code)));
  w.child.kill('SIGTERM');
  return exited;
}

/** Replaces a stopped worker, so that each test starts with two. */
async function replace(w: WorkerProcess, extra = SHORT): Promise<void> {
  workers.splice(workers.indexOf(w), 1, await WorkerProcess.start(redis.url, workerHome, extra));
  await until(async () => ((await fleet()).workers.length === 2 ? true : undefined), 'a replacement worker');
}

const given = (w: WorkerProcess) => (w.log.match(/job given back to the queue/g) ?? []).length;

test('SIGTERM with a short --shutdown-timeout: the running job goes back to the queue, the other worker runs it, the request gets the normal image', async () => {
  await idle();
  stepOf.clear();
  const body = { seed: 1234, steps: 60 };
  const pending = generate(body);
  const victim = await holderAt(3);
  const other = workers.find((w) => w !== victim)!;
  const otherDone = other.jobsDone;
  const code = await sigterm(victim);
  const r = await pending;
  assert.equal(r.status, 200, r.text);
  assert.equal(code, 0, victim.log);
  assert.equal(given(victim), 1, `the job was given back; its log:\n${victim.log}`);
  assert.equal(victim.jobsDone, 0, 'the stopped worker delivered nothing');
  assert.equal(r.json.data.length, 1);
  assert.equal(r.json.data[0].seed, 1234);
  assert.equal(other.jobsDone, otherDone + 1, `the other worker ran it; its log:\n${other.log}`);
  await replace(victim);
  // The same request, run once without interruption: the same bytes.
  const normal = await generate(body);
  assert.equal(normal.status, 200, normal.text);
  assert.equal(r.json.data[0].b64_json, normal.json.data[0].b64_json, 'the handed-over run drew the same image');
});

test('a streamed job handed over: partial image indices keep increasing (none sent twice), then the image', async (t) => {
  await idle();
  stepOf.clear();
  const res = await fetch(`${api.url}/v1/images/generations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'a lighthouse in a storm', model: 'kiln-slow', size: '512x512', steps: 60, seed: 7, stream: true, partial_images: 3 }),
  });
  assert.equal(res.status, 200);
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let text = '';
  // Whole events only (each ends with a blank line); a chunk may end inside one.
  const types = () =>
    text
      .split('\n\n')
      .slice(0, -1)
      .flatMap((e) => e.split('\n'))
      .filter((l) => l.startsWith('data: '))
      .map((l) => JSON.parse(l.slice(6)) as { type: string; partial_image_index?: number; b64_json?: string });
  // Not to leave the job running for the next test should an assertion fail.
  t.after(() => reader.cancel().catch(() => {}));
  // Read until the first partial image is in, then hand the job over.
  while (!types().some((e) => e.type === 'image_generation.partial_image')) {
    const { value, done } = await reader.read();
    assert.ok(!done, `the stream ended before a partial image: ${text.slice(0, 500)}`);
    text += value;
  }
  const busy = await until(async () => (await fleet()).workers.find((w) => w.active > 0), 'the worker running the streamed job', 1200, 50);
  const victim = workers.find((w) => w.pid === busy.pid)!;
  assert.equal(await sigterm(victim), 0, victim.log);
  assert.equal(given(victim), 1, victim.log);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  const all = types();
  assert.equal(all.at(-1)?.type, 'image_generation.completed', text.slice(-500));
  assert.equal(all.filter((e) => e.type === 'image_generation.completed').length, 1);
  const indices = all.filter((e) => e.type === 'image_generation.partial_image').map((e) => e.partial_image_index!);
  assert.ok(indices.length >= 1 && indices.length <= 3, `indices ${indices}`);
  assert.deepEqual(indices, [...new Set(indices)].sort((a, b) => a - b), `strictly increasing: ${indices}`);
  await replace(victim);
});

test('SIGTERM with a long --shutdown-timeout: the worker finishes its job (delivered), takes no new one, exits 0', async () => {
  await idle();
  stepOf.clear();
  // Both restarted with a shutdown timeout far beyond the job.
  await Promise.all(workers.splice(0).map((w) => w.stop()));
  workers.push(...(await Promise.all([0, 1].map(() => WorkerProcess.start(redis.url, workerHome, ['--shutdown-timeout', '10m'])))));
  await idle();
  const first = generate({ seed: 21, steps: 60 });
  const victim = await holderAt(2);
  const other = workers.find((w) => w !== victim)!;
  // The other worker busy with a longer job, so that the next one waits in the queue while the
  // stopping worker is still running (and would be free first).
  const long = generate({ seed: 22, steps: 90 });
  await until(async () => ((await fleet()).workers.every((w) => w.active > 0) ? true : undefined), 'both workers busy');
  const exited = sigterm(victim);
  // Its heartbeat is withdrawn as it stops taking jobs: the fleet is the other worker alone.
  await until(async () => ((await fleet()).workers.length === 1 && (await fleet()).workers[0]!.pid === other.pid ? true : undefined), 'the stopping worker gone from /ping');
  const next = generate({ seed: 23, model: 'kiln-tiny', size: '256x256', steps: 3 });
  const r = await first;
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.data[0].seed, 21);
  assert.equal(await exited, 0, victim.log);
  assert.equal(victim.jobsDone, 1, `the stopping worker finished its own job; its log:\n${victim.log}`);
  assert.equal(given(victim), 0, victim.log);
  const [l, n] = await Promise.all([long, next]);
  assert.equal(l.status, 200, l.text);
  assert.equal(n.status, 200, n.text);
  assert.equal(other.jobsDone, 2, `the other worker ran the long job and the one queued during the shutdown; its log:\n${other.log}`);
});

test('a second SIGTERM during a long shutdown gives the running job back at once: the other worker delivers it, the first exits 0', async () => {
  // Its predecessor exited in the test above; both now wait up to 10 min on SIGTERM.
  const gone = workers.find((w) => w.child.exitCode !== null)!;
  await replace(gone, ['--shutdown-timeout', '10m']);
  await idle();
  stepOf.clear();
  // Long enough that the job cannot finish between the two signals on a fast host (the second
  // one is sent the moment the first is acknowledged, not after a poll).
  const pending = generate({ seed: 31, steps: 150 });
  const victim = await holderAt(2);
  const other = workers.find((w) => w !== victim)!;
  const otherDone = other.jobsDone;
  const exited = new Promise<number | null>((r) => victim.child.once('exit', (code) => r(code)));
  const acknowledged = waitForOutput(victim.child, /taking no new jobs/, 30_000, 'the first SIGTERM handled');
  victim.child.kill('SIGTERM');
  await acknowledged;
  victim.child.kill('SIGTERM');
  const r = await pending;
  assert.equal(r.status, 200, r.text);
  assert.equal(r.json.data[0].seed, 31);
  assert.equal(await exited, 0, victim.log);
  assert.equal(given(victim), 1, victim.log);
  assert.equal(other.jobsDone, otherDone + 1, other.log);
});
