/**
 * Ports of diffusers' scheduler test fixtures (tests/schedulers/test_schedulers.py).
 */
import assert from 'node:assert/strict';
import type { Rng } from '../../src/engine/rng.js';
import type { Scheduler } from '../../src/engine/schedulers/index.js';

const f32 = Math.fround;

/**
 * diffusers' arange fixture: torch.arange(n) (flipped for the noise), reshaped (C, ...spatial, B),
 * divided by n, permuted to (B, C, ...spatial); flattened here in that final row-major order.
 */
function arangeFixture(shape: readonly number[], flip: boolean): Float32Array {
  const [b, c, ...spatial] = shape as [number, number, ...number[]];
  const inner = spatial.reduce((p, x) => p * x, 1);
  const n = b * c * inner;
  const out = new Float32Array(n);
  for (let bi = 0; bi < b; bi++) {
    for (let ci = 0; ci < c; ci++) {
      for (let s = 0; s < inner; s++) {
        // Index of [c, ...spatial, b] in the pre-permute (C, ...spatial, B) layout.
        const k = (ci * inner + s) * b + bi;
        out[(bi * c + ci) * inner + s] = f32((flip ? n - 1 - k : k) / n);
      }
    }
  }
  return out;
}

/** `dummy_sample_deter`: shape (4, 3, 8, 8) by default; (4, 3, 8) for the UniPC 1-D tests. */
export function dummySampleDeter(shape: readonly number[] = [4, 3, 8, 8]): Float32Array {
  return arangeFixture(shape, false);
}

/** `dummy_noise_deter`: the same fixture built from the flipped arange. */
export function dummyNoiseDeter(shape: readonly number[] = [4, 3, 8, 8]): Float32Array {
  return arangeFixture(shape, true);
}

/** `dummy_model`: sample * t / (t + 1), in float32 like torch. */
export function dummyModel(sample: Float32Array, t: number): Float32Array {
  const tf = f32(t);
  const denom = f32(tf + 1);
  return sample.map((x) => f32(x * tf) / denom);
}

export function scale(sample: Float32Array, s: number): Float32Array {
  return sample.map((x) => x * s);
}

export function absSum(a: Float32Array): number {
  let s = 0;
  for (const x of a) s += Math.abs(x);
  return s;
}

export function absMean(a: Float32Array): number {
  return absSum(a) / a.length;
}

/** diffusers' `abs(x - expected) < tol`. */
export function assertClose(actual: number, expected: number, tol: number, what = 'value'): void {
  assert.ok(
    Math.abs(actual - expected) < tol,
    `${what}: expected ${expected} ± ${tol}, got ${actual} (off by ${Math.abs(actual - expected)})`,
  );
}

/**
 * The Euler-style test loop: scale_model_input's result is also passed to step as the sample
 * (that is what the diffusers tests do).
 */
export function loopWithScaling(s: Scheduler, sample: Float32Array, timesteps = s.timesteps, rng?: Rng): Float32Array {
  let x = sample;
  for (const t of timesteps) {
    x = s.scaleModelInput(x, t);
    x = s.step(dummyModel(x, t), t, x, rng);
  }
  return x;
}

/** The DDIM/DPM/UniPC/LCM test loop: no input scaling. */
export function loopPlain(s: Scheduler, sample: Float32Array, timesteps = s.timesteps, rng?: Rng): Float32Array {
  let x = sample;
  for (const t of timesteps) x = s.step(dummyModel(x, t), t, x, rng);
  return x;
}

/** An Rng that hands out the given normals (for checking the noise term analytically). */
export function fixedRng(normals: (length: number) => Float32Array): Rng {
  const rng: Rng = {
    uniform: () => 0.5,
    normal: () => 0,
    normals,
    fork: () => rng,
  };
  return rng;
}

export function zerosRng(): Rng {
  return fixedRng((n) => new Float32Array(n));
}

export function onesRng(): Rng {
  return fixedRng((n) => new Float32Array(n).fill(1));
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
