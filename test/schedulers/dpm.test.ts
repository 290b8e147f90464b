/**
 * DPM-Solver multistep (DPM++ 2M) and single-step: ports of diffusers'
 * tests/schedulers/test_scheduler_dpm_multi.py and test_scheduler_dpm_single.py.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng } from '../../src/engine/rng.js';
import {
  DPMSolverMultistepScheduler,
  DPMSolverSinglestepScheduler,
  createScheduler,
  type Scheduler,
} from '../../src/engine/schedulers/index.js';
import { singlestepOrders } from '../../src/engine/schedulers/dpm-singlestep.js';
import { SD15_PNDM, SDXL_EULER } from './configs.js';
import {
  absMean,
  absSum,
  assertClose,
  dummyNoiseDeter,
  dummySampleDeter,
  loopPlain,
  maxAbsDiff,
} from './helpers.js';

/** diffusers' get_scheduler_config for both DPM tests (lower_order_final only in the multistep one). */
const COMMON = {
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: 'linear',
  solver_order: 2,
  prediction_type: 'epsilon',
  thresholding: false,
  sample_max_value: 1.0,
  algorithm_type: 'dpmsolver++',
  solver_type: 'midpoint',
  lambda_min_clipped: null, // -inf in Python; null means "default" here
  variance_type: null,
  final_sigmas_type: 'sigma_min',
};
const MULTI = { ...COMMON, lower_order_final: false, euler_at_final: false };

function run(s: Scheduler, steps = 10, start = 0): Float32Array {
  s.setTimesteps(steps);
  const timesteps = s.timesteps.slice(start * s.order);
  let x = dummySampleDeter();
  if (start > 0) x = s.addNoise(x, dummyNoiseDeter(), timesteps[0]!);
  return loopPlain(s, x, timesteps);
}

const multi = (extra: Record<string, unknown> = {}) => new DPMSolverMultistepScheduler({ ...MULTI, ...extra });
const single = (extra: Record<string, unknown> = {}) => new DPMSolverSinglestepScheduler({ ...COMMON, ...extra });

describe('DPMSolverMultistepScheduler, diffusers full loops', () => {
  test('test_full_loop_no_noise: mean 0.3301', () => {
    assertClose(absMean(run(multi())), 0.3301, 1e-3, 'mean');
  });

  test('test_full_loop_with_v_prediction: mean 0.2251', () => {
    assertClose(absMean(run(multi({ prediction_type: 'v_prediction' }))), 0.2251, 1e-3, 'mean');
  });

  test('test_full_loop_with_karras_and_v_prediction: mean 0.2096', () => {
    assertClose(absMean(run(multi({ prediction_type: 'v_prediction', use_karras_sigmas: true }))), 0.2096, 1e-3);
  });

  test('test_full_loop_with_lu_and_v_prediction: mean 0.1554', () => {
    assertClose(absMean(run(multi({ prediction_type: 'v_prediction', use_lu_lambdas: true }))), 0.1554, 1e-3);
  });

  test('test_full_loop_with_noise (from step 5): sum 318.4111, mean 0.4146', () => {
    const out = run(multi(), 10, 5);
    assertClose(absSum(out), 318.4111, 1e-2, 'sum');
    assertClose(absMean(out), 0.4146, 1e-3, 'mean');
  });

  test('test_switch: a config that went through other schedulers gives the same 0.3301', () => {
    // diffusers passes the config through DPM single, UniPC and DEIS; their keys are ignored here.
    const s = createScheduler('DPMSolverMultistepScheduler', { ...MULTI, solver_type: 'bh2', predict_x0: true });
    assertClose(absMean(run(s)), 0.3301, 1e-3, 'mean');
  });
});

describe('DPMSolverMultistepScheduler schedules and aliases', () => {
  test('linspace takes N+1 points and drops t=0: [999, 899, ..., 500, 400, ..., 100]', () => {
    const s = multi();
    s.setTimesteps(10);
    // 499.5 rounds to 500 (numpy half-to-even).
    assert.deepEqual(s.timesteps, [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]);
    assert.equal(s.sigmas.length, 11);
  });

  test('leading with steps_offset (SD configs): stride T // (N+1)', () => {
    const s = createScheduler('dpmpp_2m', { ...SD15_PNDM, timestep_spacing: 'leading' });
    s.setTimesteps(10);
    // 1000 // 11 = 90: [900, 810, ..., 90] + 1
    assert.deepEqual(s.timesteps, [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]);
  });

  test('dpmpp_2m pins dpmsolver++ order 2 without Karras; dpmpp_2m_karras adds Karras sigmas', () => {
    const plain = createScheduler('dpmpp_2m', { ...SDXL_EULER, use_karras_sigmas: true, solver_order: 3 });
    assert.equal(plain.name, 'DPMSolverMultistepScheduler');
    const pc = (plain as DPMSolverMultistepScheduler).config;
    assert.deepEqual([pc.algorithm_type, pc.solver_order, pc.use_karras_sigmas], ['dpmsolver++', 2, false]);
    const karras = createScheduler('DPMPP_2M_KARRAS', SDXL_EULER) as DPMSolverMultistepScheduler;
    assert.equal(karras.config.use_karras_sigmas, true);
    karras.setTimesteps(10);
    assert.ok(karras.timesteps.every(Number.isInteger), 'Karras timesteps are rounded for DPM');
    assertClose(karras.sigmas[0]!, 14.6146, 1e-3, 'Karras starts at sigma_max');
    assertClose(karras.sigmas[9]!, 0.0292, 1e-4, 'Karras ends at sigma_min');
    assert.equal(karras.sigmas[10], 0); // final_sigmas_type zero by default
    const mid = (14.6146 ** (1 / 7) + (4 / 9) * (0.0292 ** (1 / 7) - 14.6146 ** (1 / 7))) ** 7;
    assertClose(karras.sigmas[4]!, mid, 2e-3, 'rho-7 ramp');
  });

  test('final_sigmas_type zero: the last step lands on the predicted x0 (here the model output)', () => {
    const s = multi({ final_sigmas_type: 'zero', prediction_type: 'sample' });
    s.setTimesteps(3);
    let x = dummySampleDeter();
    const target = new Float32Array(x.length).fill(0.125);
    for (const t of s.timesteps) x = s.step(target, t, x);
    assert.ok(maxAbsDiff(x, target) < 1e-6);
  });

  test('dpmsolver (epsilon space) with final_sigmas_type zero is refused, as in diffusers', () => {
    assert.throws(() => multi({ algorithm_type: 'dpmsolver', final_sigmas_type: 'zero' }), /final_sigmas_type/);
    assert.ok(Number.isFinite(absMean(run(multi({ algorithm_type: 'dpmsolver' })))));
  });

  test('orders 1-3 and heun all run and differ from each other', () => {
    const outs = [
      run(multi({ solver_order: 1 })),
      run(multi({ solver_order: 2 })),
      run(multi({ solver_order: 3 })),
      run(multi({ solver_order: 2, solver_type: 'heun' })),
    ];
    for (const o of outs) assert.ok(o.every(Number.isFinite));
    for (let i = 1; i < outs.length; i++) assert.ok(maxAbsDiff(outs[0]!, outs[i]!) > 1e-4);
  });

  test('sde-dpmsolver++ needs an rng and is deterministic per seed', () => {
    const go = (seed: number) => {
      const s = multi({ algorithm_type: 'sde-dpmsolver++' });
      s.setTimesteps(10);
      return loopPlain(s, dummySampleDeter(), s.timesteps, createRng(seed));
    };
    assert.deepEqual(go(5), go(5));
    assert.ok(maxAbsDiff(go(5), go(6)) > 1e-4);
    const s = multi({ algorithm_type: 'sde-dpmsolver++' });
    s.setTimesteps(10);
    assert.throws(() => s.step(dummySampleDeter(), s.timesteps[0]!, dummySampleDeter()), /needs an rng/);
  });

  test('setBeginIndex (img2img) starts the counter there, whatever timestep value is passed', () => {
    const a = multi();
    a.setTimesteps(10);
    const viaLookup = loopPlain(a, dummySampleDeter(), a.timesteps.slice(5));
    const b = multi();
    b.setTimesteps(10);
    b.setBeginIndex(5);
    // 12345 is not in the schedule: without the begin index it would map to the last step.
    const first = b.step(dummySampleDeter(), 12345, dummySampleDeter());
    assert.equal(b.stepIndex, 6);
    const c = multi();
    c.setTimesteps(10);
    const expectedFirst = c.step(dummySampleDeter(), c.timesteps[5]!, dummySampleDeter());
    assert.deepEqual(first, expectedFirst);
    const d = multi();
    d.setTimesteps(10);
    d.setBeginIndex(5);
    assert.deepEqual(loopPlain(d, dummySampleDeter(), d.timesteps.slice(5)), viaLookup);
  });

  test('unsupported options are refused instead of silently ignored', () => {
    assert.throws(() => multi({ variance_type: 'learned_range' }), /variance_type/);
    assert.throws(() => multi({ use_exponential_sigmas: true }), /use_exponential_sigmas/);
  });
});

describe('DPMSolverSinglestepScheduler, diffusers full loops', () => {
  test('test_full_loop_no_noise: mean 0.2791', () => {
    assertClose(absMean(run(single())), 0.2791, 1e-3, 'mean');
  });

  test('test_full_loop_with_karras: mean 0.2248', () => {
    assertClose(absMean(run(single({ use_karras_sigmas: true }))), 0.2248, 1e-3, 'mean');
  });

  test('test_full_loop_with_v_prediction: mean 0.1453', () => {
    assertClose(absMean(run(single({ prediction_type: 'v_prediction' }))), 0.1453, 1e-3, 'mean');
  });

  test('test_full_loop_with_karras_and_v_prediction: mean 0.0649', () => {
    assertClose(absMean(run(single({ prediction_type: 'v_prediction', use_karras_sigmas: true }))), 0.0649, 1e-3);
  });

  test('test_full_uneven_loop (50 steps, starting at index 3): mean 0.2574', () => {
    const s = single();
    s.setTimesteps(50);
    assertClose(absMean(loopPlain(s, dummySampleDeter(), s.timesteps.slice(3))), 0.2574, 1e-3, 'mean');
  });

  test('test_full_loop_with_noise (from step 5): sum 269.2187, mean 0.3505', () => {
    const out = run(single(), 10, 5);
    assertClose(absSum(out), 269.2187, 1e-2, 'sum');
    assertClose(absMean(out), 0.3505, 1e-3, 'mean');
  });
});

describe('DPMSolverSinglestepScheduler orders', () => {
  test('order list as diffusers get_order_list', () => {
    assert.deepEqual(singlestepOrders(10, 2, false, false), [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]);
    assert.deepEqual(singlestepOrders(6, 2, true, false), [1, 2, 1, 2, 1, 1]);
    assert.deepEqual(singlestepOrders(7, 2, true, false), [1, 2, 1, 2, 1, 2, 1]);
    assert.deepEqual(singlestepOrders(9, 3, true, false), [1, 2, 3, 1, 2, 3, 1, 2, 1]);
    assert.deepEqual(singlestepOrders(10, 3, true, false), [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]);
    assert.deepEqual(singlestepOrders(8, 3, true, true), [1, 2, 3, 1, 2, 3, 1, 1]);
  });

  test('an uneven step count switches on lower_order_final (as diffusers rewrites its config)', () => {
    const s = single();
    assert.equal(s.config.lower_order_final, false);
    s.setTimesteps(9);
    assert.equal(s.config.lower_order_final, true);
    assert.deepEqual(s.orderList, [1, 2, 1, 2, 1, 2, 1, 2, 1]);
  });

  test('the default config (final sigma zero) ends in a first-order step onto x0', () => {
    const s = createScheduler('dpm_single', { ...SD15_PNDM, prediction_type: 'sample' }) as DPMSolverSinglestepScheduler;
    s.setTimesteps(4);
    assert.equal(s.orderList.at(-1), 1);
    let x = dummySampleDeter();
    const target = new Float32Array(x.length).fill(-0.25);
    for (const t of s.timesteps) x = s.step(target, t, x);
    assert.ok(maxAbsDiff(x, target) < 1e-6);
  });
});
