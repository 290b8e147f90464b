/**
 * Scale-out with `--store s3://`: the API host (in-process, on Redis and a real s3rver) keeps an
 * edit's upload in the bucket, and a `kiln worker --store s3://...` (configured through the AWS
 * SDK's standard environment) reads it there; a worker without the bucket cannot. The result
 * comes back through Redis and is served from the bucket at Kiln's URL.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { createStore } from '../../src/store/index.js';
import { startTestServer, makeHome, makePng, envelope, getJson, type TestServer } from '../server/helpers.js';
import { startS3, type TestS3 } from '../store/s3rver.js';
import { RedisServer, WorkerProcess, until } from './helpers.js';

let redis: RedisServer;
let s3: TestS3;
let api: TestServer;
let workerHome: string;
let worker: WorkerProcess | undefined;

before(async () => {
  redis = await RedisServer.start();
  s3 = await startS3('kiln-scale');
  workerHome = await makeHome({});
  const store = createStore('s3://kiln-scale/fleet', { ttlMs: 600_000 });
  api = await startTestServer({ models: {}, searchDirs: undefined, store, urlSecret: await store.urlSecret(), redisQueue: { url: redis.url }, requestTimeoutMs: 120_000 });
});

after(async () => {
  await worker?.stop();
  await api?.close();
  await s3?.close();
  await redis?.close();
  rmSync(workerHome, { recursive: true, force: true });
});

async function edit(): Promise<{ status: number; json: any }> {
  const form = new FormData();
  form.append('image', new Blob([await makePng(256, 256)], { type: 'image/png' }), 'in.png');
  form.append('prompt', 'a lighthouse at dusk');
  form.append('model', 'kiln-tiny');
  form.append('steps', '3');
  form.append('response_format', 'url');
  const res = await fetch(`${api.url}/v1/images/edits`, { method: 'POST', body: form });
  return { status: res.status, json: await res.json() };
}

const workersLive = async (n: number) => until(async () => ((await getJson(`${api.url}/ping`)).json.workers?.length === n ? true : undefined), `${n} live worker(s)`);

test('a worker without the bucket cannot read an upload kept in S3: the job fails saying so', async () => {
  worker = await WorkerProcess.start(redis.url, workerHome);
  await workersLive(1);
  const r = await edit();
  assert.equal(r.status, 500);
  assert.equal(envelope(r.json).type, 'server_error');
  assert.match(worker.log, /no longer in the input store/);
  await worker.stop();
  worker = undefined;
  await workersLive(0);
});

test('kiln worker --store s3://...: the upload is read from the bucket, the image is served from the bucket', async () => {
  worker = await WorkerProcess.start(redis.url, workerHome, ['--store', 's3://kiln-scale/fleet']);
  await workersLive(1);
  const r = await edit();
  assert.equal(r.status, 200, JSON.stringify(r.json));
  assert.equal(r.json.kiln.mode, 'img2img');
  const image = await fetch(r.json.data[0].url);
  assert.equal(image.status, 200);
  assert.equal(image.headers.get('content-type'), 'image/png');
});
