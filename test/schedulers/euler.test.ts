/**
 * EulerDiscreteScheduler: ports of diffusers' tests/schedulers/test_scheduler_euler.py plus
 * schedule checks against diffusers' known arrays.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { EulerDiscreteScheduler, createScheduler } from '../../src/engine/schedulers/index.js';
import { SD15_PNDM, SDXL_EULER, SD_TURBO_EULER } from './configs.js';
import {
  absMean,
  absSum,
  assertClose,
  dummyModel,
  dummyNoiseDeter,
  dummySampleDeter,
  loopWithScaling,
  scale,
} from './helpers.js';

const f32 = Math.fround;
const CONFIG = { num_train_timesteps: 1100, beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' };

function fullLoop(extra: Record<string, unknown> = {}): Float32Array {
  const s = new EulerDiscreteScheduler({ ...CONFIG, ...extra });
  s.setTimesteps(10);
  return loopWithScaling(s, scale(dummySampleDeter(), s.initNoiseSigma));
}

describe('EulerDiscreteScheduler, diffusers full loops', () => {
  test('test_full_loop_no_noise: sum 10.0807, mean 0.0131', () => {
    const out = fullLoop();
    assertClose(absSum(out), 10.0807, 1e-2, 'sum');
    assertClose(absMean(out), 0.0131, 1e-3, 'mean');
  });

  test('test_full_loop_with_v_prediction: sum 0.0002, mean 2.2676e-06', () => {
    const out = fullLoop({ prediction_type: 'v_prediction' });
    assertClose(absSum(out), 0.0002, 1e-2, 'sum');
    assertClose(absMean(out), 2.2676e-6, 1e-3, 'mean');
  });

  test('test_full_loop_device_karras_sigmas: sum 124.52299, mean 0.16214', () => {
    const out = fullLoop({ use_karras_sigmas: true });
    assertClose(absSum(out), 124.52299499511719, 1e-2, 'sum');
    assertClose(absMean(out), 0.16213932633399963, 1e-3, 'mean');
  });

  test('test_full_loop_with_noise (img2img from step 8): sum 57062.9297, mean 74.3007', () => {
    const s = new EulerDiscreteScheduler(CONFIG);
    s.setTimesteps(10);
    const timesteps = s.timesteps.slice(8 * s.order);
    const noisy = s.addNoise(scale(dummySampleDeter(), s.initNoiseSigma), dummyNoiseDeter(), timesteps[0]!);
    const out = loopWithScaling(s, noisy, timesteps);
    assertClose(absSum(out), 57062.9297, 1e-2, 'sum');
    assertClose(absMean(out), 74.3007, 1e-3, 'mean');
  });
});

describe('EulerDiscreteScheduler schedules', () => {
  test('linspace spacing (the default) gives float32 fractional timesteps like np.linspace(..., float32)', () => {
    const s = new EulerDiscreteScheduler(CONFIG);
    s.setTimesteps(10);
    assert.equal(s.timesteps.length, 10);
    assert.deepEqual(
      s.timesteps,
      Array.from({ length: 10 }, (_, i) => f32(((9 - i) * 1099) / 9)),
    );
    assert.equal(s.timesteps[1], f32(976.8888888888889));
    assert.equal(s.sigmas.length, 11);
    assert.equal(s.sigmas.at(-1), 0);
    // linspace: the initial noise is the largest sigma itself.
    assert.equal(s.initNoiseSigma, s.sigmas[0]);
  });

  test('SD-Turbo config (trailing): [999] for 1 step, [999, 749, 499, 249] for 4', () => {
    const s = createScheduler('euler', SD_TURBO_EULER);
    s.setTimesteps(1);
    assert.deepEqual(s.timesteps, [999]);
    s.setTimesteps(4);
    assert.deepEqual(s.timesteps, [999, 749, 499, 249]);
    // SD's sigma_max (k-diffusion's 14.6146), and trailing uses it unscaled.
    assertClose(s.initNoiseSigma, 14.6146, 1e-3, 'init noise sigma');
  });

  test('SDXL config (leading, steps_offset 1): [901, 801, ..., 1] and sqrt(sigma^2 + 1) init noise', () => {
    const s = createScheduler('EulerDiscreteScheduler', SDXL_EULER) as EulerDiscreteScheduler;
    s.setTimesteps(10);
    assert.deepEqual(s.timesteps, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    assertClose(s.initNoiseSigma, Math.sqrt(s.sigmas[0]! ** 2 + 1), 1e-5, 'init noise sigma');
    assert.ok(s.initNoiseSigma > s.sigmas[0]!);
  });

  test("SD 1.5's PNDM config works with Euler (linspace, its betas, PNDM-only keys ignored)", () => {
    const s = createScheduler('euler', SD15_PNDM) as EulerDiscreteScheduler;
    assert.equal(s.config.timestep_spacing, 'linspace');
    assert.equal(s.config.beta_schedule, 'scaled_linear');
    assert.equal(s.config.steps_offset, 1);
    assert.ok(!('skip_prk_steps' in s.config));
    s.setTimesteps(4);
    assert.deepEqual(s.timesteps, [999, 666, 333, 0]);
    assertClose(s.sigmas[0]!, 14.6146, 1e-3, 'sigma at t=999');
    assertClose(s.sigmas[3]!, 0.0292, 1e-4, 'sigma at t=0');
  });

  test('Karras sigmas: rho-7 ramp between the schedule ends, fractional timesteps', () => {
    const plain = createScheduler('euler', SD15_PNDM) as EulerDiscreteScheduler;
    plain.setTimesteps(10);
    const s = createScheduler('euler', { ...SD15_PNDM, use_karras_sigmas: true }) as EulerDiscreteScheduler;
    s.setTimesteps(10);
    const [max, min] = [plain.sigmas[0]!, plain.sigmas[9]!];
    assert.equal(s.sigmas[0], max);
    assertClose(s.sigmas[9]!, min, 1e-7, 'sigma_min');
    for (let i = 0; i < 10; i++) {
      const ramp = i / 9;
      const expected = (max ** (1 / 7) + ramp * (min ** (1 / 7) - max ** (1 / 7))) ** 7;
      assertClose(s.sigmas[i]!, expected, Math.max(1e-6, expected * 1e-6), `karras sigma ${i}`);
    }
    assert.equal(s.sigmas[10], 0);
    assertClose(s.timesteps[0]!, 999, 1e-3, 'first timestep');
    assert.ok(s.timesteps.some((t) => !Number.isInteger(t)), 'Karras timesteps are interpolated, not rounded');
    for (let i = 1; i < 10; i++) assert.ok(s.timesteps[i]! < s.timesteps[i - 1]!);
  });

  test('sigma_min/sigma_max override the Karras ramp ends', () => {
    const s = new EulerDiscreteScheduler({ ...CONFIG, use_karras_sigmas: true, sigma_min: 0.02, sigma_max: 700 });
    s.setTimesteps(5);
    assertClose(s.sigmas[0]!, 700, 1e-3, 'max');
    assertClose(s.sigmas[4]!, 0.02, 1e-6, 'min');
  });

  test('final_sigmas_type sigma_min ends at the first training sigma instead of 0', () => {
    const s = new EulerDiscreteScheduler({ ...SD15_PNDM, final_sigmas_type: 'sigma_min' });
    s.setTimesteps(4);
    assertClose(s.sigmas.at(-1)!, 0.0292, 1e-4, 'final sigma');
    assert.equal(s.sigmas.at(-1), s.sigmas[3]); // t=0 is the last timestep, same sigma
  });

  test('rescale_betas_zero_snr pins the top sigma at 4096 (alphas_cumprod[-1] = 2^-24)', () => {
    const s = new EulerDiscreteScheduler({ ...SD15_PNDM, rescale_betas_zero_snr: true, timestep_spacing: 'trailing' });
    s.setTimesteps(4);
    assertClose(s.sigmas[0]!, Math.sqrt((1 - 2 ** -24) / 2 ** -24), 1e-2, 'top sigma');
  });

  test('interpolation_type other than linear is refused', () => {
    assert.throws(() => new EulerDiscreteScheduler({ interpolation_type: 'log_linear' }), /interpolation_type/);
  });
});

describe('EulerDiscreteScheduler stepping', () => {
  test('step is Euler: x + (x - x0)/sigma * (sigma_next - sigma), and does not mutate inputs', () => {
    const s = new EulerDiscreteScheduler(SD_TURBO_EULER);
    s.setTimesteps(4);
    const x = dummySampleDeter();
    const m = dummyModel(x, 999);
    const [xCopy, mCopy] = [x.slice(), m.slice()];
    const out = s.step(m, 999, x);
    assert.deepEqual(x, xCopy);
    assert.deepEqual(m, mCopy);
    const [s0, s1] = [s.sigmas[0]!, s.sigmas[1]!];
    for (const k of [0, 100, 767]) assertClose(out[k]!, x[k]! + m[k]! * (s1 - s0), 1e-5, `element ${k}`);
    assert.equal(s.stepIndex, 1);
  });

  test('scaleModelInput divides by sqrt(sigma^2 + 1) and returns a new array', () => {
    const s = new EulerDiscreteScheduler(SD_TURBO_EULER);
    s.setTimesteps(4);
    const x = dummySampleDeter();
    const y = s.scaleModelInput(x, 999);
    assert.notEqual(y, x);
    assertClose(y[767]!, x[767]! / Math.sqrt(s.sigmas[0]! ** 2 + 1), 1e-7, 'scaled');
  });

  test('setBeginIndex starts the counter there (img2img); addNoise then uses that sigma', () => {
    const s = new EulerDiscreteScheduler(SD_TURBO_EULER);
    s.setTimesteps(4);
    s.setBeginIndex(2);
    const x = new Float32Array(8).fill(1);
    const n = new Float32Array(8).fill(2);
    const noisy = s.addNoise(x, n, s.timesteps[2]!);
    assertClose(noisy[0]!, 1 + 2 * s.sigmas[2]!, 1e-5, 'noised');
    s.scaleModelInput(x, s.timesteps[2]!);
    assert.equal(s.stepIndex, 2);
    assert.throws(() => s.setBeginIndex(4), RangeError);
  });

  test('a timestep that is not in the schedule is an error', () => {
    const s = new EulerDiscreteScheduler(SD_TURBO_EULER);
    s.setTimesteps(4);
    assert.throws(() => s.step(new Float32Array(4), 500, new Float32Array(4)), /not in the schedule/);
  });

  test('prediction_type sample: x0 is the model output', () => {
    const s = new EulerDiscreteScheduler({ ...SD_TURBO_EULER, prediction_type: 'sample' });
    s.setTimesteps(1);
    // One step to sigma 0 lands exactly on x0.
    const out = s.step(new Float32Array([0.25, -0.5]), 999, new Float32Array([3, 4]));
    assert.deepEqual(Array.from(out), [0.25, -0.5]);
  });
});
