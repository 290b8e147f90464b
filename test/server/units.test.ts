/**
 * The server's parts without HTTP: the in-process queue (with a fake runner) and its run-time
 * estimates, the local disk store and its sweeper, URL signing, parameter reading, error
 * mapping, worker error transport.
 */
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { InProcessQueue } from '../../src/queue/memory.js';
import { DEFAULT_MS_PER_STEP_MP, priorMsPerStepMp, RunTimeEstimator } from '../../src/queue/estimate.js';
import {
  JobCancelledError,
  JobTimeoutError,
  QueueClosedError,
  QueueFullError,
  type JobOutput,
  type JobRunner,
  type JobSpec,
  type RunContext,
} from '../../src/queue/types.js';
import { LocalDiskStore, parseKey } from '../../src/store/local.js';
import { UrlSigner, loadOrCreateSecret } from '../../src/server/signing.js';
import { readParams } from '../../src/server/params.js';
import { ApiError, toApiError } from '../../src/server/errors.js';
import { deserializeError, serializeError } from '../../src/runner/protocol.js';
import { parseDuration } from '../../src/cli/serve.js';
import { GenerationCancelledError, InvalidOptionError, ModelLoadError, ModelNotFoundError } from '../../src/engine/errors.js';

/** A runner whose jobs finish when the test says so (or stop when aborted). */
class FakeRunner implements JobRunner {
  readonly slots: number;
  started: { spec: JobSpec; context: RunContext; finish: () => void; fail: (e: Error) => void }[] = [];
  constructor(slots = 1) {
    this.slots = slots;
  }
  run(spec: JobSpec, context: RunContext): Promise<JobOutput> {
    return new Promise((resolve, reject) => {
      const output = { bytes: Buffer.from(spec.options.prompt), contentType: 'image/png', format: 'png' } as JobOutput;
      this.started.push({ spec, context, finish: () => resolve(output), fail: reject });
      context.onProgress({ stage: 'encode', step: 0, totalSteps: 3 });
      // Like the engine: notices an abort at its next step, a little later.
      context.signal.addEventListener('abort', () => setTimeout(() => reject(new GenerationCancelledError()), 20));
    });
  }
  async close() {}
}

const spec = (prompt: string): JobSpec => ({ mode: 'generate', model: 'm', options: { prompt, seed: 1, size: '256x256' }, output: { format: 'png' } });

describe('InProcessQueue', () => {
  // The queue's timers are unref'd (a server's sockets keep it alive); here nothing else does.
  let keepAlive: NodeJS.Timeout;
  before(() => (keepAlive = setInterval(() => {}, 1000)));
  after(() => clearInterval(keepAlive));
  test('runs jobs in order, one per slot; a full queue throws QueueFullError', async () => {
    const runner = new FakeRunner(1);
    const q = new InProcessQueue(runner, { maxQueued: 2 });
    const a = q.submit(spec('a'));
    const b = q.submit(spec('b'));
    const c = q.submit(spec('c'));
    assert.deepEqual(q.stats(), { active: 1, queued: 2, maxQueued: 2, concurrency: 1 });
    assert.throws(() => q.submit(spec('d')), (e: unknown) => e instanceof QueueFullError && e.retryAfterSeconds >= 1);
    assert.equal(a.state, 'running');
    assert.equal(b.state, 'queued');
    const progress: string[] = [];
    b.events.on('progress', (p) => progress.push(p.stage));
    runner.started[0]!.finish();
    assert.equal((await a.result).bytes.toString(), 'a');
    await sleep(0);
    assert.equal(runner.started.length, 2);
    assert.deepEqual(progress, ['encode']);
    runner.started[1]!.finish();
    await b.result;
    await sleep(0);
    runner.started[2]!.finish();
    await c.result;
    assert.deepEqual(runner.started.map((s) => s.spec.options.prompt), ['a', 'b', 'c']);
    assert.deepEqual(q.stats(), { active: 0, queued: 0, maxQueued: 2, concurrency: 1 });
  });

  test('cancelling a queued job drops it; cancelling a running one aborts it and holds the slot until it stops', async () => {
    const runner = new FakeRunner(1);
    const q = new InProcessQueue(runner, { maxQueued: 4 });
    const outcomes: string[] = [];
    q.events.on('finished', (f) => outcomes.push(`${f.job.id === a.id ? 'a' : 'b'}:${f.outcome}`));
    const a = q.submit(spec('a'));
    const b = q.submit(spec('b'));
    b.cancel(new JobCancelledError('gone', 'client'));
    await assert.rejects(b.result, (e: unknown) => e instanceof JobCancelledError && e.reason === 'client');
    assert.equal(b.state, 'cancelled');
    assert.equal(q.stats().queued, 0);
    a.cancel(new JobCancelledError('gone', 'client'));
    assert.ok(runner.started[0]!.context.signal.aborted);
    assert.equal(q.stats().active, 1, 'the slot is held until the runner has stopped');
    await assert.rejects(a.result, (e: unknown) => e instanceof JobCancelledError);
    assert.equal(q.stats().active, 0);
    assert.deepEqual(outcomes, ['b:cancelled', 'a:cancelled']);
    assert.equal(runner.started.length, 1, 'the dropped job never ran');
  });

  test('a job past its timeout is stopped with JobTimeoutError', async () => {
    const q = new InProcessQueue(new FakeRunner(1), { maxQueued: 1 });
    let outcome = '';
    q.events.on('finished', (f) => (outcome = f.outcome));
    const job = q.submit(spec('slow'), { timeoutMs: 50 });
    await assert.rejects(job.result, JobTimeoutError);
    assert.equal(outcome, 'timeout');
  });

  test('close: refuses new jobs, cancels queued ones at once, waits for running ones, cancels them past the deadline', async () => {
    const runner = new FakeRunner(1);
    const q = new InProcessQueue(runner, { maxQueued: 2 });
    const a = q.submit(spec('a'));
    const queued = [q.submit(spec('q1')), q.submit(spec('q2'))];
    const closing = q.close(5_000);
    assert.throws(() => q.submit(spec('x')), QueueClosedError);
    // The queued ones are answered before the running one is done, and never start.
    for (const job of queued) {
      await assert.rejects(job.result, (e: unknown) => e instanceof JobCancelledError && e.reason === 'shutdown');
      assert.equal(job.state, 'cancelled');
    }
    assert.equal(a.state, 'running');
    setTimeout(() => runner.started[0]!.finish(), 30);
    await closing;
    assert.equal((await a.result).bytes.toString(), 'a');
    assert.equal(runner.started.length, 1);

    const runner2 = new FakeRunner(1);
    const q2 = new InProcessQueue(runner2, { maxQueued: 1 });
    const b = q2.submit(spec('b'));
    const c = q2.submit(spec('c'));
    const t0 = Date.now();
    await q2.close(50);
    assert.ok(Date.now() - t0 < 2_000);
    await assert.rejects(b.result, (e: unknown) => e instanceof JobCancelledError && e.reason === 'shutdown');
    await assert.rejects(c.result, (e: unknown) => e instanceof JobCancelledError && e.reason === 'shutdown');
  });

  test('a runner that throws synchronously fails the job, not the queue', async () => {
    const q = new InProcessQueue(
      {
        slots: 1,
        run: () => {
          throw new Error('boom');
        },
        close: async () => {},
      },
      { maxQueued: 1 },
    );
    await assert.rejects(q.submit(spec('a')).result, /boom/);
    assert.equal(q.stats().active, 0);
  });
});

describe('run-time estimates (retry-after)', () => {
  const job = (options: Partial<JobSpec['options']>, model = 'm'): JobSpec => ({
    mode: 'generate',
    model,
    options: { prompt: 'x', seed: 1, size: '1024x1024', ...options },
    output: { format: 'png' },
  });
  const output = (steps: number, side: number, totalMs: number) =>
    ({ settings: { steps, width: side, height: side }, timings: { totalMs } }) as unknown as JobOutput;

  test('the prior until a job finished, then what jobs measured, per step and megapixel', () => {
    const e = new RunTimeEstimator(() => 500);
    assert.equal(e.estimateMs(job({ steps: 10 })), 5000);
    assert.equal(e.estimateMs(job({ steps: 10, size: '512x512' })), 1250);
    assert.equal(e.estimateMs(job({ steps: 10 }), 100), 1000, 'a running job\'s steps win over the prior');
    // 8 steps at 512x512 in 400 ms (model loading not counted): 200 ms per step and megapixel.
    e.finished(job({ steps: 8, size: '512x512' }), output(8, 512, 400), 9_000);
    assert.equal(e.estimateMs(job({ steps: 10 }), 100), 2000, 'measured jobs win over everything');
    // A quality preset means the steps it turned out to mean for that model.
    assert.equal(e.steps(job({ quality: 'smooth' }, 'turbo')), 25);
    e.finished(job({ quality: 'smooth' }, 'turbo'), output(4, 1024, 800), 900);
    assert.equal(e.steps(job({ quality: 'smooth' }, 'turbo')), 4);
    assert.equal(e.steps(job({ quality: 'smooth' }, 'other')), 25);
  });

  test('the prior grows with the UNet\'s size; a GPU is far faster', () => {
    assert.equal(priorMsPerStepMp(65_536, 'cpu'), 150);
    assert.equal(priorMsPerStepMp(4 * 65_536, 'cpu'), 300);
    const sdxl = priorMsPerStepMp(10e9, 'cpu');
    assert.ok(sdxl > 30_000 && sdxl < 120_000, String(sdxl));
    assert.ok(priorMsPerStepMp(10e9, 'cuda') < 1_000);
    assert.equal(priorMsPerStepMp(65_536, 'cuda'), 20);
    assert.equal(priorMsPerStepMp(undefined, 'cpu'), DEFAULT_MS_PER_STEP_MP);
  });

  test("the queue's wait: what is left of the running job (from its steps) plus the queued ones", async () => {
    let report!: (p: { stage: 'denoise'; step: number; totalSteps: number }) => void;
    const runner: JobRunner = {
      slots: 1,
      run: (_spec, context) => {
        report = (p) => context.onProgress(p);
        return new Promise(() => {});
      },
      close: async () => {},
    };
    const q = new InProcessQueue(runner, { maxQueued: 1, priorMsPerStepMp: () => 60_000 });
    q.submit(job({ steps: 20 }));
    q.submit(job({ steps: 20 }));
    // Nothing measured: the prior, a minute per step of each.
    assert.ok(q.estimatedWaitSeconds() > 1000);
    report({ stage: 'denoise', step: 0, totalSteps: 20 });
    await sleep(200);
    report({ stage: 'denoise', step: 2, totalSteps: 20 });
    // ~100 ms per step: 19 steps left of the running job, 20 of the queued one: ~3.9 s.
    const wait = q.estimatedWaitSeconds();
    assert.ok(wait >= 3 && wait <= 5, String(wait));
  });
});

describe('LocalDiskStore', () => {
  test('put/get/delete with unguessable keys that carry their expiry; the sweeper deletes expired files and stale temp files', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kiln-store-'));
    try {
      const store = new LocalDiskStore({ dir });
      const a = await store.put(Buffer.from('png bytes'), { contentType: 'image/png', ttlMs: 60_000 });
      const b = await store.put(Buffer.from('webp'), { contentType: 'image/webp', ttlMs: 60_000 });
      assert.match(a.key, /^[0-9a-z]+_[0-9a-f]{48}\.png$/);
      assert.match(b.key, /\.webp$/);
      assert.notEqual(a.key, b.key);
      assert.equal(parseKey(a.key)!.expiresAt, a.expiresAt);
      assert.ok(a.expiresAt >= Date.now() + 59_000);
      const got = await store.get(a.key);
      assert.equal(got!.image.size, 9);
      got!.body.destroy();
      for (const bad of ['../secret', 'x.png', `${a.key}/..`, '', a.key.replace('.png', '.exe')]) assert.equal(await store.get(bad), undefined);

      writeFileSync(join(dir, '.tmp-stale'), 'half');
      const old = new Date(Date.now() - 3_600_000);
      utimesSync(join(dir, '.tmp-stale'), old, old);
      writeFileSync(join(dir, '.tmp-fresh'), 'writing');
      writeFileSync(join(dir, 'notes.txt'), 'not ours');
      assert.equal(await store.sweep(Date.now()), 1, 'only the stale temp file');
      assert.equal(await store.sweep(a.expiresAt + 1), 2);
      assert.deepEqual(readdirSync(dir).sort(), ['.tmp-fresh', 'notes.txt']);
      await store.delete('../../etc/passwd'); // ignored
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('signing', () => {
  test('a URL verifies; any change to key, expiry or signature does not; the secret is made once and kept', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kiln-secret-'));
    try {
      const path = join(dir, 'secret');
      const secret = loadOrCreateSecret(path);
      assert.ok(existsSync(path));
      assert.ok(loadOrCreateSecret(path).equals(secret));
      const signer = new UrlSigner(secret);
      const key = 'abc_' + 'f'.repeat(48) + '.png';
      const url = new URL(`http://x${signer.path(key, 1_900_000_000_000)}`);
      const expires = url.searchParams.get('expires')!;
      const sig = url.searchParams.get('signature')!;
      assert.equal(expires, '1900000000');
      assert.ok(signer.verify(key, expires, sig));
      assert.ok(!signer.verify(key, '1900000001', sig));
      assert.ok(!signer.verify(key.replace('abc', 'abd'), expires, sig));
      // Every one-character change is refused, the last character's spare bits included.
      for (const at of [0, 21, sig.length - 1]) {
        const other = sig[at] === 'A' ? 'B' : 'A';
        assert.ok(!signer.verify(key, expires, sig.slice(0, at) + other + sig.slice(at + 1)), `changed at ${at}`);
      }
      assert.ok(!signer.verify(key, expires, ''));
      assert.ok(!signer.verify(key, '-1', sig));
      // Only the canonical spelling of the expiry: the same number written otherwise is refused.
      for (const other of [`0${expires}`, `00${expires}`, `+${expires}`, ` ${expires}`, `${expires}.0`, `${expires}e0`]) {
        assert.ok(!signer.verify(key, other, sig), other);
      }
      assert.ok(!new UrlSigner(Buffer.alloc(32, 1)).verify(key, expires, sig), 'another secret');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('params', () => {
  test('form fields: text converted to each type; "null" and empty mean the default; repeated fields refused', () => {
    const p = readParams({ prompt: 'x', n: '12', steps: '3', guidance_scale: '4.5', size: 'null', response_format: '', strength: '0.5' }, 'edits', 'form');
    assert.equal(p.seed, 12);
    assert.equal(p.steps, 3);
    assert.equal(p.guidanceScale, 4.5);
    assert.equal(p.size, '1024x1024');
    assert.equal(p.responseFormat, 'url');
    assert.equal(p.strength, 0.5);
    assert.throws(() => readParams({ prompt: 'x', n: '1.5' }, 'edits', 'form'), (e: unknown) => e instanceof ApiError && e.param === 'n');
    assert.throws(() => readParams({ prompt: ['a', 'b'] }, 'edits', 'form'), (e: unknown) => e instanceof ApiError && e.param === 'prompt');
    assert.throws(() => readParams({ prompt: 'x', stream: 'yes' }, 'edits', 'form'), (e: unknown) => e instanceof ApiError && e.param === 'stream');
    // What the SDK sends for edits({ stream: true, partial_images: 2 }).
    const streamed = readParams({ prompt: 'x', stream: 'true', partial_images: '2' }, 'edits', 'form');
    assert.deepEqual([streamed.stream, streamed.partialImages], [true, 2]);
    assert.deepEqual([p.stream, p.partialImages], [false, 0]);
  });

  test('JSON: defaults, seed over n, negative_prompt over negprompt, quality case-insensitive, strength only on edits', () => {
    const p = readParams({ prompt: 'x', n: 1, seed: 2, negprompt: 'a', negative_prompt: 'b', quality: 'HD', strength: 'ignored' }, 'generations', 'json');
    assert.deepEqual(
      [p.seed, p.negativePrompt, p.quality, p.size, p.responseFormat, p.outputFormat, p.strength],
      [2, 'b', 'HD', '1024x1024', 'url', 'png', undefined],
    );
    assert.equal(readParams({ prompt: 'x', n: 0 }, 'generations', 'json').seed, 0);
  });
});

describe('errors', () => {
  test('engine and queue errors map to the API statuses; unknown ones to a 500 that hides details', () => {
    const cases: [unknown, number, string | null, string][] = [
      [new InvalidOptionError('bad scheduler', 'scheduler'), 400, 'scheduler', 'invalid_request_error'],
      [new ModelNotFoundError('no model', 'x'), 404, 'model', 'invalid_request_error'],
      [new ModelLoadError('missing unet/model.onnx'), 500, 'model', 'server_error'],
      [new QueueFullError(3), 429, null, 'invalid_request_error'],
      [new QueueClosedError(), 503, null, 'server_error'],
      [new JobTimeoutError(1000), 504, null, 'server_error'],
      [new Error('secret internals'), 500, null, 'server_error'],
    ];
    for (const [err, status, param, type] of cases) {
      const api = toApiError(err);
      assert.deepEqual([api.status, api.param, api.type], [status, param, type], String(err));
    }
    assert.equal(toApiError(new QueueFullError(3)).headers['retry-after'], '3');
    assert.doesNotMatch(toApiError(new Error('secret internals')).message, /secret/);
    assert.match(toApiError(new ModelLoadError('missing unet/model.onnx')).message, /missing unet\/model\.onnx/);
    // A worker's lookup names the folders it searched; the client sees their last parts only.
    const missing = toApiError(new ModelNotFoundError('model "x" is not installed (looked in /srv/kiln/home/models, /opt/kiln/models); pull it', 'x'));
    assert.equal(missing.message, 'model "x" is not installed (looked in models, models); pull it');
  });

  test('errors cross the worker boundary with their class and fields', () => {
    const back = deserializeError(serializeError(new InvalidOptionError('strength must be ...', 'strength')));
    assert.ok(back instanceof InvalidOptionError);
    assert.equal((back as InvalidOptionError).param, 'strength');
    assert.ok(deserializeError(serializeError(new ModelNotFoundError('m', 'x'))) instanceof ModelNotFoundError);
    assert.ok(deserializeError(serializeError(new ModelLoadError('l', '/p'))) instanceof ModelLoadError);
    assert.ok(deserializeError(serializeError(new GenerationCancelledError())) instanceof GenerationCancelledError);
    const other = deserializeError(serializeError(new RangeError('r')));
    assert.equal(other.name, 'RangeError');
  });
});

test('parseDuration', () => {
  assert.equal(parseDuration('2s'), 2000);
  assert.equal(parseDuration('90'), 90_000);
  assert.equal(parseDuration('500ms'), 500);
  assert.equal(parseDuration('60m'), 3_600_000);
  assert.equal(parseDuration('1h'), 3_600_000);
  assert.throws(() => parseDuration('soon'));
  assert.throws(() => parseDuration('0s'));
});
