/**
 * EulerAncestralDiscreteScheduler. diffusers' full-loop numbers (152.3192 etc.) come from torch's
 * RNG, which we do not reproduce; instead the deterministic part is checked analytically, the
 * noise term is isolated with fixed "random" normals, and seeded runs are checked for determinism.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng } from '../../src/engine/rng.js';
import {
  EulerAncestralDiscreteScheduler,
  EulerDiscreteScheduler,
  ancestralSigmas,
  createScheduler,
} from '../../src/engine/schedulers/index.js';
import { SDXL_TURBO_EULER_A } from './configs.js';
import {
  absMean,
  assertClose,
  dummyModel,
  dummySampleDeter,
  loopWithScaling,
  maxAbsDiff,
  onesRng,
  scale,
  zerosRng,
} from './helpers.js';

const CONFIG = { num_train_timesteps: 1100, beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' };

function fresh(extra: Record<string, unknown> = {}, steps = 10): EulerAncestralDiscreteScheduler {
  const s = new EulerAncestralDiscreteScheduler({ ...CONFIG, ...extra });
  s.setTimesteps(steps);
  return s;
}

describe('EulerAncestralDiscreteScheduler', () => {
  test('sigma_up/sigma_down split: up^2 + down^2 = sigma_to^2, up = sigma_to*sqrt(1 - to^2/from^2)', () => {
    for (const [from, to] of [
      [14.6, 7.3],
      [2, 1.5],
      [0.5, 0.01],
    ] as const) {
      const { up, down } = ancestralSigmas(from, to);
      assertClose(up * up + down * down, to * to, 1e-12, 'energy');
      assertClose(up, to * Math.sqrt(1 - (to * to) / (from * from)), 1e-12, 'sigma_up');
    }
    assert.deepEqual(ancestralSigmas(3, 0), { up: 0, down: 0 });
  });

  test('one step with zero noise is an Euler step to sigma_down; the noise enters as noise * sigma_up', () => {
    const x = scale(dummySampleDeter(), 10);
    const t0 = fresh().timesteps[0]!;
    const m = dummyModel(x, t0);
    const quiet = fresh().step(m, t0, x, zerosRng());
    const loud = fresh().step(m, t0, x, onesRng());
    const s = fresh();
    const [from, to] = [s.sigmas[0]!, s.sigmas[1]!];
    const { up, down } = ancestralSigmas(from, to);
    for (const k of [0, 5, 400, 767]) {
      // epsilon: (x - x0)/sigma = m, so x + m * (down - sigma)
      // Outputs are float32 of magnitude ~100: compare to ~1e-6 relative.
      assertClose(quiet[k]!, x[k]! + m[k]! * (down - from), 1e-3, `mean path ${k}`);
      assertClose(loud[k]! - quiet[k]!, up, 1e-3, `noise term ${k}`);
    }
    assert.ok(up > 1, `a real ancestral step injects noise (sigma_up ${up})`);
  });

  test('v_prediction mean path uses x0 = m * (-sigma/sqrt(sigma^2+1)) + x/(sigma^2+1)', () => {
    const s = fresh({ prediction_type: 'v_prediction' });
    const t0 = s.timesteps[0]!;
    const x = dummySampleDeter();
    const m = dummyModel(x, t0);
    const out = s.step(m, t0, x, zerosRng());
    const [from, to] = [s.sigmas[0]!, s.sigmas[1]!];
    const { down } = ancestralSigmas(from, to);
    for (const k of [1, 300, 766]) {
      const x0 = m[k]! * (-from / Math.sqrt(from * from + 1)) + x[k]! / (from * from + 1);
      assertClose(out[k]!, x[k]! + ((x[k]! - x0) / from) * (down - from), 1e-4, `element ${k}`);
    }
  });

  test('full loop with zero noise ends on the noise-free ancestral path (differs from plain Euler)', () => {
    const a = fresh();
    const outA = loopWithScaling(a, scale(dummySampleDeter(), a.initNoiseSigma), a.timesteps, zerosRng());
    const e = new EulerDiscreteScheduler(CONFIG);
    e.setTimesteps(10);
    const outE = loopWithScaling(e, scale(dummySampleDeter(), e.initNoiseSigma));
    assert.ok(Number.isFinite(absMean(outA)));
    assert.ok(maxAbsDiff(outA, outE) > 1e-3, 'ancestral steps land on sigma_down, not sigma_next');
  });

  test('seeded runs: same seed, same output; different seed, different output', () => {
    const run = (seed: number) => {
      const s = fresh();
      return loopWithScaling(s, scale(dummySampleDeter(), s.initNoiseSigma), s.timesteps, createRng(seed));
    };
    const a = run(1);
    assert.deepEqual(run(1), a);
    assert.ok(maxAbsDiff(run(2), a) > 1e-3);
    assert.equal(a.length, 4 * 3 * 8 * 8);
  });

  test('SDXL-Turbo config: trailing [999], one step to sigma 0 needs no rng', () => {
    const s = createScheduler('euler_a', SDXL_TURBO_EULER_A);
    assert.equal(s.name, 'EulerAncestralDiscreteScheduler');
    s.setTimesteps(1);
    assert.deepEqual(s.timesteps, [999]);
    assertClose(s.initNoiseSigma, 14.6146, 1e-3, 'init noise sigma');
    const x = scale(dummySampleDeter(), s.initNoiseSigma);
    const out = s.step(dummyModel(s.scaleModelInput(x, 999), 999), 999, x);
    assert.equal(out.length, x.length);
    s.setTimesteps(4);
    assert.deepEqual(s.timesteps, [999, 749, 499, 249]);
    assert.throws(() => s.step(x, 999, x), /needs an rng/);
  });

  test('prediction_type sample is refused (diffusers does not implement it here)', () => {
    assert.throws(() => new EulerAncestralDiscreteScheduler({ prediction_type: 'sample' }), /prediction_type/);
  });
});
