/**
 * Threads per ONNX Runtime session: a session's intra-op pool starts (threads - 1) OS threads
 * (the calling thread is the other one), so the count of this process's threads shows what a
 * session was given. The runner shares the cores among its inference threads.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { OnnxModel, setSessionThreads } from '../../src/engine/onnx.js';
import { EnginePool } from '../../src/runner/pool.js';
import { createModelCatalog } from '../../src/catalog/catalog.js';

const root = fileURLToPath(new URL('../../models/kiln-tiny', import.meta.url));
const unet = join(root, 'unet/model.onnx');
const osThreads = (): number => readdirSync('/proc/self/task').length;

/** OS threads a new UNet session adds. */
async function threadsAdded(options: { intraOpThreads?: number } = {}): Promise<number> {
  const before = osThreads();
  const session = await OnnxModel.load(unet, root, options);
  const added = osThreads() - before;
  await session.release();
  return added;
}

test('setSessionThreads sets the intra-op threads of the sessions made after it; a session\'s own option wins', { skip: process.platform !== 'linux' && 'counts threads in /proc' }, async () => {
  await threadsAdded(); // ONNX Runtime's own environment threads, once per process, are not counted below
  try {
    setSessionThreads(1);
    assert.equal(await threadsAdded(), 0);
    setSessionThreads(3);
    assert.equal(await threadsAdded(), 2);
    assert.equal(await threadsAdded({ intraOpThreads: 1 }), 0);
  } finally {
    setSessionThreads(0);
  }
  assert.throws(() => setSessionThreads(-1), RangeError);
  assert.throws(() => setSessionThreads(1.5), RangeError);
});

test('the pool shares the cores among its inference threads; one thread keeps ONNX Runtime\'s default', async () => {
  const catalog = createModelCatalog([join(root, '..')], { home: join(root, '..') });
  const one = new EnginePool({ catalog, size: 1 });
  const three = new EnginePool({ catalog, size: 3 });
  try {
    assert.equal(one.sessionThreads, 0);
    assert.equal(three.sessionThreads, Math.max(1, Math.floor(availableParallelism() / 3)));
  } finally {
    await Promise.all([one.close(), three.close()]);
  }
});
