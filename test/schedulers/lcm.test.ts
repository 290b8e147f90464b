/**
 * LCMScheduler: ports of diffusers' tests/schedulers/test_scheduler_lcm.py. The one-step loop is
 * noise-free and ported exactly; the multistep loop (197.7616) depends on torch's RNG, so its
 * noise term is checked analytically and seeded runs for determinism.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng } from '../../src/engine/rng.js';
import { LCMScheduler, createScheduler } from '../../src/engine/schedulers/index.js';
import { LCM_DREAMSHAPER } from './configs.js';
import {
  absMean,
  absSum,
  assertClose,
  dummyModel,
  dummySampleDeter,
  loopPlain,
  maxAbsDiff,
  onesRng,
  zerosRng,
} from './helpers.js';

const CONFIG = {
  num_train_timesteps: 1000,
  beta_start: 0.00085,
  beta_end: 0.012,
  beta_schedule: 'scaled_linear',
  prediction_type: 'epsilon',
};

describe('LCMScheduler', () => {
  test('test_full_loop_onestep: sum 18.7097, mean 0.0244 (no noise on the only step)', () => {
    const s = new LCMScheduler(CONFIG);
    s.setTimesteps(1);
    assert.deepEqual(s.timesteps, [999]);
    const out = loopPlain(s, dummySampleDeter());
    assertClose(absSum(out), 18.7097, 1e-3, 'sum');
    assertClose(absMean(out), 0.0244, 1e-3, 'mean');
  });

  test('test_inference_steps timesteps: last of 10/25/26/50 steps is 99/39/39/19', () => {
    const s = new LCMScheduler(CONFIG);
    for (const [steps, last] of [
      [10, 99],
      [25, 39],
      [26, 39],
      [50, 19],
    ] as const) {
      s.setTimesteps(steps);
      assert.equal(s.timesteps.length, steps);
      assert.equal(s.timesteps.at(-1), last, `${steps} steps`);
    }
    s.setTimesteps(4);
    assert.deepEqual(s.timesteps, [999, 759, 499, 259]);
  });

  test('more steps than original_inference_steps is an error', () => {
    const s = new LCMScheduler(CONFIG);
    assert.throws(() => s.setTimesteps(51), /original_inference_steps/);
    const wide = new LCMScheduler({ ...CONFIG, original_inference_steps: 100 });
    wide.setTimesteps(51);
    assert.equal(wide.timesteps[0], 999);
  });

  test('multistep: denoised is re-noised to the next timestep as sqrt(a_prev) d + sqrt(1 - a_prev) z', () => {
    const x = dummySampleDeter();
    const m = dummyModel(x, 999);
    const make = () => {
      const s = new LCMScheduler(CONFIG);
      s.setTimesteps(4);
      return s;
    };
    const quiet = make().step(m, 999, x, zerosRng());
    const loud = make().step(m, 999, x, onesRng());
    const s = make();
    const a = s.alphasCumprod[999]!;
    const aPrev = s.alphasCumprod[759]!;
    const { cSkip, cOut } = s.boundaryScalings(999);
    for (const k of [0, 50, 767]) {
      const x0 = (x[k]! - Math.sqrt(1 - a) * m[k]!) / Math.sqrt(a);
      const denoised = cOut * x0 + cSkip * x[k]!;
      assertClose(quiet[k]!, Math.sqrt(aPrev) * denoised, 1e-5, `mean path ${k}`);
      assertClose(loud[k]! - quiet[k]!, Math.sqrt(1 - aPrev), 1e-5, `noise term ${k}`);
    }
  });

  test('boundary scalings: c_skip = 0.25/((10t)^2 + 0.25), c_out = 10t/sqrt((10t)^2 + 0.25)', () => {
    const s = new LCMScheduler(CONFIG);
    const { cSkip, cOut } = s.boundaryScalings(0);
    assert.deepEqual([cSkip, cOut], [1, 0]);
    const b = s.boundaryScalings(99);
    assertClose(b.cSkip, 0.25 / (990 ** 2 + 0.25), 1e-15);
    assertClose(b.cOut, 990 / Math.sqrt(990 ** 2 + 0.25), 1e-15);
  });

  test('seeded multistep runs are deterministic; an rng is required before the last step', () => {
    const go = (seed: number) => {
      const s = createScheduler('lcm', LCM_DREAMSHAPER);
      s.setTimesteps(4);
      return loopPlain(s, dummySampleDeter(), s.timesteps, createRng(seed));
    };
    assert.deepEqual(go(3), go(3));
    assert.ok(maxAbsDiff(go(3), go(4)) > 1e-4);
    const s = createScheduler('lcm', LCM_DREAMSHAPER);
    s.setTimesteps(4);
    assert.throws(() => s.step(dummySampleDeter(), 999, dummySampleDeter()), /needs an rng/);
  });

  test('the LCM Dreamshaper config is accepted with its values', () => {
    const s = createScheduler('LCMScheduler', LCM_DREAMSHAPER) as LCMScheduler;
    assert.equal(s.config.original_inference_steps, 50);
    assert.equal(s.config.timestep_scaling, 10);
    assert.equal(s.config.set_alpha_to_one, true);
    s.setTimesteps(4);
    assert.deepEqual(s.timesteps, [999, 759, 499, 259]);
  });

  test('setBeginIndex starts mid-schedule; the final step still adds no noise', () => {
    const s = new LCMScheduler(CONFIG);
    s.setTimesteps(4);
    s.setBeginIndex(3);
    const out = s.step(dummyModel(dummySampleDeter(), 259), 259, dummySampleDeter());
    assert.equal(s.stepIndex, 4);
    assert.ok(out.every(Number.isFinite));
  });
});
