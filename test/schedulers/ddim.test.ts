/**
 * DDIMScheduler: ports of diffusers' tests/schedulers/test_scheduler_ddim.py.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { DDIMScheduler, createScheduler } from '../../src/engine/schedulers/index.js';
import { SD15_PNDM, SD21_DDIM } from './configs.js';
import { absMean, absSum, assertClose, dummyNoiseDeter, dummySampleDeter, loopPlain } from './helpers.js';

const CONFIG = { num_train_timesteps: 1000, beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear', clip_sample: true };

function fullLoop(extra: Record<string, unknown> = {}): Float32Array {
  const s = new DDIMScheduler({ ...CONFIG, ...extra });
  s.setTimesteps(10);
  return loopPlain(s, dummySampleDeter());
}

describe('DDIMScheduler, diffusers full loops (eta 0)', () => {
  test('test_full_loop_no_noise: sum 172.0067, mean 0.223967', () => {
    const out = fullLoop();
    assertClose(absSum(out), 172.0067, 1e-2, 'sum');
    assertClose(absMean(out), 0.223967, 1e-3, 'mean');
  });

  test('test_full_loop_with_v_prediction: sum 52.5302, mean 0.0684', () => {
    const out = fullLoop({ prediction_type: 'v_prediction' });
    assertClose(absSum(out), 52.5302, 1e-2, 'sum');
    assertClose(absMean(out), 0.0684, 1e-3, 'mean');
  });

  test('test_full_loop_with_set_alpha_to_one: sum 149.8295, mean 0.1951', () => {
    const out = fullLoop({ set_alpha_to_one: true, beta_start: 0.01 });
    assertClose(absSum(out), 149.8295, 1e-2, 'sum');
    assertClose(absMean(out), 0.1951, 1e-3, 'mean');
  });

  test('test_full_loop_with_no_set_alpha_to_one: sum 149.0784, mean 0.1941', () => {
    const out = fullLoop({ set_alpha_to_one: false, beta_start: 0.01 });
    assertClose(absSum(out), 149.0784, 1e-2, 'sum');
    assertClose(absMean(out), 0.1941, 1e-3, 'mean');
  });

  test('test_full_loop_with_noise (from step 8): sum 354.5418, mean 0.4616', () => {
    const s = new DDIMScheduler(CONFIG);
    s.setTimesteps(10);
    const timesteps = s.timesteps.slice(8 * s.order);
    const noisy = s.addNoise(dummySampleDeter(), dummyNoiseDeter(), timesteps[0]!);
    const out = loopPlain(s, noisy, timesteps);
    assertClose(absSum(out), 354.5418, 1e-2, 'sum');
    assertClose(absMean(out), 0.4616, 1e-3, 'mean');
  });

  test('test_variance: _get_variance values', () => {
    const s = new DDIMScheduler(CONFIG);
    assertClose(s.variance(0, 0), 0, 1e-5);
    assertClose(s.variance(420, 400), 0.14771, 1e-5);
    assertClose(s.variance(980, 960), 0.3246, 1e-5);
    assertClose(s.variance(487, 486), 0.00979, 1e-5);
    assertClose(s.variance(999, 998), 0.02, 1e-5);
  });
});

describe('DDIMScheduler schedules', () => {
  test('test_steps_offset: leading, offset 1, 5 steps -> [801, 601, 401, 201, 1]', () => {
    const s = new DDIMScheduler({ ...CONFIG, steps_offset: 1 });
    s.setTimesteps(5);
    assert.deepEqual(s.timesteps, [801, 601, 401, 201, 1]);
    s.setTimesteps(10);
    assert.deepEqual(s.timesteps, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
  });

  test('trailing: 10 steps -> [999, 899, ..., 99]', () => {
    const s = new DDIMScheduler({ ...CONFIG, timestep_spacing: 'trailing' });
    s.setTimesteps(10);
    assert.deepEqual(s.timesteps, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
  });

  test('linspace rounds like numpy (half to even): 7 steps -> [999, 832, 666, 500, 333, 166, 0]', () => {
    const s = new DDIMScheduler({ ...CONFIG, timestep_spacing: 'linspace' });
    s.setTimesteps(7);
    // 999/6 = 166.5 -> 166 and 832.5 -> 832 (numpy), not 167/833.
    assert.deepEqual(s.timesteps, [999, 832, 666, 500, 333, 166, 0]);
  });

  test('more steps than training timesteps is an error', () => {
    const s = new DDIMScheduler(CONFIG);
    assert.throws(() => s.setTimesteps(1001), /cannot be larger/);
  });

  test("SD 1.5's PNDM config and SD 2.1's v-prediction config are accepted", () => {
    const a = createScheduler('ddim', SD15_PNDM) as DDIMScheduler;
    assert.equal(a.config.set_alpha_to_one, false);
    assert.equal(a.config.clip_sample, false);
    a.setTimesteps(50);
    assert.equal(a.timesteps[0], 981);
    assert.equal(a.timesteps.at(-1), 1);
    const b = createScheduler('DDIMScheduler', SD21_DDIM);
    assert.equal(b.config.prediction_type, 'v_prediction');
    b.setTimesteps(20);
    const x = dummySampleDeter();
    const out = loopPlain(b, x);
    assert.ok(out.every(Number.isFinite));
  });
});

describe('DDIMScheduler step and addNoise', () => {
  test('one epsilon step matches the DDIM formula; inputs are not mutated', () => {
    const s = new DDIMScheduler({ ...CONFIG, clip_sample: false });
    s.setTimesteps(10);
    const x = dummySampleDeter();
    const m = dummySampleDeter().map((v) => v * 0.5);
    const [xc, mc] = [x.slice(), m.slice()];
    const out = s.step(m, 900, x);
    assert.deepEqual(x, xc);
    assert.deepEqual(m, mc);
    const a = s.alphasCumprod[900]!;
    const ap = s.alphasCumprod[800]!;
    for (const k of [3, 200, 700]) {
      const x0 = (x[k]! - Math.sqrt(1 - a) * m[k]!) / Math.sqrt(a);
      assertClose(out[k]!, Math.sqrt(ap) * x0 + Math.sqrt(1 - ap) * m[k]!, 1e-5, `element ${k}`);
    }
  });

  test('clip_sample clamps the predicted x0 to clip_sample_range', () => {
    const s = new DDIMScheduler({ ...CONFIG, clip_sample: true, clip_sample_range: 0.5, prediction_type: 'sample' });
    s.setTimesteps(10);
    // Last step (t=0 -> alpha_prev 1): the output is the clipped x0 itself.
    const out = s.step(new Float32Array([3, -3, 0.25]), 0, new Float32Array([0, 0, 0]));
    assert.deepEqual(Array.from(out), [0.5, -0.5, 0.25]);
  });

  test('addNoise is sqrt(acp[t]) x + sqrt(1 - acp[t]) noise', () => {
    const s = new DDIMScheduler(CONFIG);
    const out = s.addNoise(new Float32Array([1, 2]), new Float32Array([3, -1]), 500);
    const a = s.alphasCumprod[500]!;
    assertClose(out[0]!, Math.sqrt(a) + 3 * Math.sqrt(1 - a), 1e-6);
    assertClose(out[1]!, 2 * Math.sqrt(a) - Math.sqrt(1 - a), 1e-6);
    assert.throws(() => s.addNoise(new Float32Array(1), new Float32Array(1), 1000), RangeError);
  });

  test('step before setTimesteps is an error', () => {
    assert.throws(() => new DDIMScheduler().step(new Float32Array(1), 999, new Float32Array(1)), /setTimesteps/);
  });
});
