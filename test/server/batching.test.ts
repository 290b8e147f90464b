/**
 * `maxBatch` (`kiln serve --max-batch`): a worker runs several jobs at once, their denoising
 * steps batched into shared UNet runs (test/engine/batching.test.ts counts the runs). Through the
 * official SDK against a real server: concurrent generations and an edit come back byte for byte
 * as each does alone, and a client that leaves mid-batch does not disturb the others.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import OpenAI, { toFile } from 'openai';
import { join } from 'node:path';
import type { JobFinished, JobSpec } from '../../src/queue/types.js';
import { EnginePool } from '../../src/runner/pool.js';
import { createModelCatalog } from '../../src/catalog/catalog.js';
import { makePng, startTestServer, type TestServer } from './helpers.js';

let t: TestServer;
let upload: Buffer;
before(async () => {
  t = await startTestServer({ maxBatch: 4 });
  upload = await makePng(256, 256);
});
after(() => t.close());

type AnyEvent = Record<string, any>;
type Req = { kind: 'generate' | 'edit'; prompt: string; seed: number; steps: number };

// Kiln's extensions (steps, seed) ride in spreads: the SDK's types do not know them.
async function streamed(client: OpenAI, r: Req, partials: number) {
  const common = { prompt: r.prompt, size: '256x256' as const, response_format: 'b64_json' as const, stream: true as const, partial_images: partials, ...{ steps: r.steps, seed: r.seed } };
  return r.kind === 'edit'
    ? client.images.edit({ ...common, image: await toFile(upload, 'in.png', { type: 'image/png' }), ...{ strength: 0.6 } })
    : client.images.generate(common);
}

/** The same request alone (nothing else running) and not streamed: the reference bytes. */
async function alone(client: OpenAI, r: Req): Promise<string> {
  const common = { prompt: r.prompt, size: '256x256' as const, response_format: 'b64_json' as const, ...{ steps: r.steps, seed: r.seed } };
  const res =
    r.kind === 'edit'
      ? await client.images.edit({ ...common, image: await toFile(upload, 'in.png', { type: 'image/png' }), ...{ strength: 0.6 } })
      : await client.images.generate(common);
  return res.data![0]!.b64_json!;
}

test('max-batch 4: the queue runs four jobs at once, and the default runs one', async () => {
  assert.equal(t.server.queue.stats().concurrency, 4);
  const plain = await startTestServer();
  try {
    assert.equal(plain.server.queue.stats().concurrency, 1);
  } finally {
    await plain.close();
  }
});

test('concurrent generations and an edit run together and come back byte for byte as each alone', async () => {
  const client = t.client();
  const reqs: Req[] = [
    { kind: 'generate', prompt: 'a red circle on a blue background', seed: 1, steps: 30 },
    { kind: 'generate', prompt: 'a green square', seed: 2, steps: 30 },
    { kind: 'generate', prompt: 'a yellow star at night', seed: 3, steps: 36 },
    { kind: 'edit', prompt: 'a blue square', seed: 4, steps: 50 },
  ];
  const order: string[] = [];
  const results = await Promise.all(
    reqs.map(async (r, i) => {
      let done: AnyEvent | undefined;
      for await (const e of (await streamed(client, r, 2)) as AsyncIterable<AnyEvent>) {
        order.push(`${e.type.endsWith('completed') ? 'done' : 'partial'}${i}`);
        if (e.type.endsWith('completed')) done = e;
      }
      return done!;
    }),
  );
  // One job at a time would complete the first before the others started; here every job had
  // drawn a third of its steps (its first partial image) before any finished.
  const firstDone = order.findIndex((e) => e.startsWith('done'));
  for (let i = 0; i < reqs.length; i++) assert.ok(order.indexOf(`partial${i}`) < firstDone, `job ${i} ran beside the others: ${order.join(' ')}`);
  assert.equal(results[3]!.kiln.mode, 'img2img');
  for (let i = 0; i < reqs.length; i++) {
    assert.equal(results[i]!.b64_json, await alone(client, reqs[i]!), `request ${i}: batched bytes equal running alone`);
  }
});

test('a client that leaves mid-batch has its job cancelled; the others finish byte for byte as alone', async () => {
  const client = t.client();
  const finished: JobFinished[] = [];
  let threeFinished!: () => void;
  const three = new Promise<void>((resolve) => (threeFinished = resolve));
  const onFinished = (f: JobFinished) => {
    if (finished.push(f) === 3) threeFinished();
  };
  t.server.queue.events.on('finished', onFinished);
  try {
    const stay: Req[] = [
      { kind: 'generate', prompt: 'two grey stones', seed: 7, steps: 40 },
      { kind: 'generate', prompt: 'a white boat', seed: 8, steps: 40 },
    ];
    const leaving: Req = { kind: 'generate', prompt: 'a long one', seed: 9, steps: 150 };
    const leaver = (async () => {
      for await (const e of (await streamed(client, leaving, 3)) as AsyncIterable<AnyEvent>) {
        assert.equal(e.type, 'image_generation.partial_image');
        break; // the SDK aborts the request: the job stops at its next step
      }
    })();
    const kept = stay.map(async (r) => {
      let done: AnyEvent | undefined;
      for await (const e of (await streamed(client, r, 1)) as AsyncIterable<AnyEvent>) if (e.type.endsWith('completed')) done = e;
      return done!.b64_json as string;
    });
    await leaver;
    const bytes = await Promise.all(kept);
    await three;
    assert.deepEqual(finished.map((f) => f.outcome).sort(), ['cancelled', 'done', 'done']);
    for (let i = 0; i < stay.length; i++) assert.equal(bytes[i], await alone(client, stay[i]!), `request ${i} after the other left`);
  } finally {
    t.server.queue.events.off('finished', onFinished);
  }
});

test('kiln serve --max-batch takes 1 to 64 and lists the option in its help', async () => {
  const kiln = (args: string[]) => promisify(execFile)(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'serve', ...args]);
  for (const bad of ['0', '65', 'two']) {
    await assert.rejects(kiln(['--max-batch', bad, '--port', '0']), (err: { code?: number; stderr?: string }) => {
      assert.notEqual(err.code, 0);
      assert.match(err.stderr ?? '', /--max-batch/);
      return true;
    });
  }
  const { stdout } = await kiln(['--help']);
  assert.match(stdout, /--max-batch <n>/);
});

// (A worker that dies fails every job it holds: src/runner/pool.ts rejects them all. Not tested by
// killing a thread here: terminating one in the middle of an ONNX Runtime call can abort the test
// process, 'terminate called after throwing Napi::Error'.)
test('a pool of one worker with maxBatch 2 takes two jobs at once, refuses a third, and has room for two again after', async () => {
  const pool = new EnginePool({ catalog: createModelCatalog([join(t.home, 'models')], { home: t.home }), maxBatch: 2 });
  try {
    assert.equal(pool.slots, 2);
    const spec = (seed: number, steps: number): JobSpec => ({
      mode: 'generate',
      model: 'kiln-tiny-xl',
      options: { prompt: 'two at once', seed, size: '256x256', steps },
      output: { format: 'png' },
    });
    const run = (s: JobSpec, onStep?: () => void) =>
      pool.run(s, { signal: new AbortController().signal, onProgress: (p) => p.stage === 'denoise' && onStep?.() });
    let bothRunning!: () => void;
    const running = new Promise<void>((r) => (bothRunning = r));
    const seen = new Set<number>();
    const jobs = [1, 2].map((seed) => run(spec(seed, 40), () => (seen.add(seed), seen.size === 2 && bothRunning())));
    await running;
    await assert.rejects(run(spec(3, 1)), /no idle inference worker/);
    assert.deepEqual((await Promise.all(jobs)).map((o) => o.contentType), ['image/png', 'image/png']);
    const again = await Promise.all([run(spec(4, 2)), run(spec(5, 2))]);
    assert.deepEqual(again.map((o) => o.contentType), ['image/png', 'image/png']);
  } finally {
    await pool.close();
  }
});
