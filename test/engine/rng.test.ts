import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng, MAX_SEED } from '../../src/engine/rng.js';

test('same seed gives the same sequence; different seeds differ', () => {
  const a = createRng(42).normals(1000);
  const b = createRng(42).normals(1000);
  const c = createRng(43).normals(1000);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
});

test('sequence for seed 0 is pinned (changing it would change every image)', () => {
  const rng = createRng(0);
  const first = Array.from({ length: 3 }, () => rng.uniform());
  // Pinned values: regenerate only with a deliberate, documented break of image reproducibility.
  assert.deepEqual(first.map((x) => x.toFixed(12)), PINNED_SEED0);
});

test('normals have mean ~0 and variance ~1', () => {
  const xs = createRng(7).normals(200_000);
  let sum = 0;
  let sq = 0;
  for (const x of xs) {
    sum += x;
    sq += x * x;
  }
  const mean = sum / xs.length;
  const variance = sq / xs.length - mean * mean;
  assert.ok(Math.abs(mean) < 0.01, `mean ${mean}`);
  assert.ok(Math.abs(variance - 1) < 0.01, `variance ${variance}`);
});

test('uniforms stay in [0, 1)', () => {
  const rng = createRng(MAX_SEED);
  for (let i = 0; i < 100_000; i++) {
    const u = rng.uniform();
    assert.ok(u >= 0 && u < 1);
  }
});

test('seeds outside 0..2^32-1 are refused', () => {
  assert.throws(() => createRng(-1), RangeError);
  assert.throws(() => createRng(MAX_SEED + 1), RangeError);
  assert.throws(() => createRng(1.5), RangeError);
});

const PINNED_SEED0 = ['0.886853950202', '0.012474988947', '0.032522145755'];
