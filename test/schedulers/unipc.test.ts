/**
 * UniPCMultistepScheduler: ports of diffusers' tests/schedulers/test_scheduler_unipc.py,
 * including the 1-D (4, 3, 8) variant.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { UniPCMultistepScheduler, createScheduler } from '../../src/engine/schedulers/index.js';
import { SD15_PNDM } from './configs.js';
import {
  absMean,
  absSum,
  assertClose,
  dummyModel,
  dummyNoiseDeter,
  dummySampleDeter,
  loopPlain,
  maxAbsDiff,
} from './helpers.js';

const CONFIG = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  solver_order: 2,
  solver_type: 'bh2',
  final_sigmas_type: 'sigma_min',
};

function fullLoop(extra: Record<string, unknown> = {}, shape?: number[]): Float32Array {
  const s = new UniPCMultistepScheduler({ ...CONFIG, ...extra });
  s.setTimesteps(10);
  return loopPlain(s, dummySampleDeter(shape));
}

describe('UniPCMultistepScheduler, diffusers full loops', () => {
  test('test_full_loop_no_noise: mean 0.2464', () => {
    assertClose(absMean(fullLoop()), 0.2464, 1e-3, 'mean');
  });

  test('test_full_loop_with_karras: mean 0.2925', () => {
    assertClose(absMean(fullLoop({ use_karras_sigmas: true })), 0.2925, 1e-3, 'mean');
  });

  test('test_full_loop_with_v_prediction: mean 0.1014', () => {
    assertClose(absMean(fullLoop({ prediction_type: 'v_prediction' })), 0.1014, 1e-3, 'mean');
  });

  test('test_full_loop_with_karras_and_v_prediction: mean 0.1966', () => {
    assertClose(absMean(fullLoop({ prediction_type: 'v_prediction', use_karras_sigmas: true })), 0.1966, 1e-3);
  });

  test('test_full_loop_with_noise (from step 8): sum 315.5757, mean 0.4109', () => {
    const s = new UniPCMultistepScheduler(CONFIG);
    s.setTimesteps(10);
    const timesteps = s.timesteps.slice(8 * s.order);
    const noisy = s.addNoise(dummySampleDeter(), dummyNoiseDeter(), timesteps[0]!);
    const out = loopPlain(s, noisy, timesteps);
    assertClose(absSum(out), 315.5757, 1e-2, 'sum');
    assertClose(absMean(out), 0.4109, 1e-3, 'mean');
  });

  test('test_switch: DPM-style solver_type values map to bh2 and give the same 0.2464', () => {
    assertClose(absMean(fullLoop({ solver_type: 'midpoint' })), 0.2464, 1e-3, 'mean');
  });
});

describe('UniPCMultistepScheduler 1-D sample (4, 3, 8), diffusers full loops', () => {
  const shape = [4, 3, 8];
  test('no noise: mean 0.2441', () => assertClose(absMean(fullLoop({}, shape)), 0.2441, 1e-3));
  test('karras: mean 0.2898', () => assertClose(absMean(fullLoop({ use_karras_sigmas: true }, shape)), 0.2898, 1e-3));
  test('v_prediction: mean 0.1014', () => {
    assertClose(absMean(fullLoop({ prediction_type: 'v_prediction' }, shape)), 0.1014, 1e-3);
  });
  test('karras + v_prediction: mean 0.1944', () => {
    assertClose(absMean(fullLoop({ prediction_type: 'v_prediction', use_karras_sigmas: true }, shape)), 0.1944, 1e-3);
  });
});

describe('UniPCMultistepScheduler behaviour', () => {
  test('linspace schedule as DPM-Solver: N+1 points, t=0 dropped', () => {
    const s = new UniPCMultistepScheduler(CONFIG);
    s.setTimesteps(10);
    assert.deepEqual(s.timesteps, [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
  });

  test('Karras with final_sigmas_type sigma_min ends on the bottom of the ramp', () => {
    const s = new UniPCMultistepScheduler({ ...CONFIG, use_karras_sigmas: true });
    s.setTimesteps(10);
    assert.equal(s.sigmas[10], s.sigmas[9]);
    assert.ok(s.timesteps.every(Number.isInteger));
  });

  test('the corrector changes the result; disable_corrector turns it off per step', () => {
    const withC = fullLoop();
    const without = fullLoop({ disable_corrector: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] });
    const partly = fullLoop({ disable_corrector: [0] });
    assert.ok(maxAbsDiff(withC, without) > 1e-4);
    assert.ok(maxAbsDiff(withC, partly) > 1e-6);
    assert.ok(maxAbsDiff(without, partly) > 1e-6);
  });

  test('bh1, order 3 and predict_x0 false run to finite results that differ from the default', () => {
    const base = fullLoop();
    for (const extra of [{ solver_type: 'bh1' }, { solver_order: 3 }, { predict_x0: false }, { solver_order: 1 }]) {
      const out = fullLoop(extra);
      assert.ok(out.every(Number.isFinite), JSON.stringify(extra));
      assert.ok(maxAbsDiff(out, base) > 1e-5, JSON.stringify(extra));
    }
  });

  test('step does not mutate its inputs, even though the corrector keeps the previous sample', () => {
    const s = createScheduler('unipc', SD15_PNDM);
    s.setTimesteps(5);
    let x = dummySampleDeter();
    for (const t of s.timesteps) {
      const before = x.slice();
      const m = dummyModel(x, t);
      const mBefore = m.slice();
      const next = s.step(m, t, x);
      assert.deepEqual(x, before);
      assert.deepEqual(m, mBefore);
      x.fill(123); // the caller reusing its buffer must not disturb the scheduler's history
      x = next;
    }
    const ref = createScheduler('unipc', SD15_PNDM);
    ref.setTimesteps(5);
    assert.deepEqual(x, loopPlain(ref, dummySampleDeter()));
  });
});
