/**
 * The scheduler registry (names, aliases, errors), config handling shared by every scheduler,
 * the shared numerics, and the ported test fixtures themselves.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng } from '../../src/engine/rng.js';
import {
  DDIMScheduler,
  SCHEDULER_CLASSES,
  SCHEDULER_NAMES,
  UnknownSchedulerError,
  createScheduler,
  isSupportedScheduler,
  schedulerClassFor,
  type SchedulerConfig,
} from '../../src/engine/schedulers/index.js';
import { npArange, npLinspace, roundHalfEven, solveLinear, torchLinspaceF32 } from '../../src/engine/schedulers/common.js';
import { REAL_CONFIGS, SD15_PNDM } from './configs.js';
import { dummyModel, dummyNoiseDeter, dummySampleDeter } from './helpers.js';

describe('scheduler names', () => {
  test('aliases and the classes they stand for', () => {
    assert.deepEqual(
      [...SCHEDULER_NAMES],
      ['euler', 'euler_a', 'ddim', 'dpmpp_2m', 'dpmpp_2m_karras', 'dpm_single', 'unipc', 'lcm'],
    );
    const expected: Record<string, string> = {
      euler: 'EulerDiscreteScheduler',
      euler_a: 'EulerAncestralDiscreteScheduler',
      ddim: 'DDIMScheduler',
      dpmpp_2m: 'DPMSolverMultistepScheduler',
      dpmpp_2m_karras: 'DPMSolverMultistepScheduler',
      dpm_single: 'DPMSolverSinglestepScheduler',
      unipc: 'UniPCMultistepScheduler',
      lcm: 'LCMScheduler',
    };
    for (const [alias, cls] of Object.entries(expected)) {
      assert.equal(schedulerClassFor(alias), cls, alias);
      assert.equal(schedulerClassFor(alias.toUpperCase()), cls, `${alias} upper-case`);
      assert.equal(createScheduler(alias).name, cls, alias);
    }
  });

  test('class names resolve to themselves (case-insensitively) and are supported', () => {
    for (const cls of SCHEDULER_CLASSES) {
      assert.equal(schedulerClassFor(cls), cls);
      assert.equal(schedulerClassFor(cls.toLowerCase()), cls);
      assert.equal(isSupportedScheduler(cls), true);
      assert.equal(createScheduler(cls).name, cls);
    }
    assert.equal(SCHEDULER_CLASSES.length, 7);
  });

  test('unknown names: undefined / false / an UnknownSchedulerError listing the allowed names', () => {
    assert.equal(schedulerClassFor('PNDMScheduler'), undefined);
    assert.equal(isSupportedScheduler('PNDMScheduler'), false);
    assert.equal(isSupportedScheduler('euler'), false, 'aliases are not class names');
    assert.throws(
      () => createScheduler('heun'),
      (err: unknown) => {
        assert.ok(err instanceof UnknownSchedulerError);
        assert.ok(err instanceof Error);
        assert.equal(err.requested, 'heun');
        assert.match(err.message, /unknown scheduler "heun"/);
        for (const name of [...SCHEDULER_NAMES, ...SCHEDULER_CLASSES]) assert.ok(err.message.includes(name), name);
        return true;
      },
    );
  });
});

describe('configs', () => {
  test('every scheduler accepts every real Hub config and runs 4 seeded steps', () => {
    for (const [label, config] of Object.entries(REAL_CONFIGS)) {
      for (const name of SCHEDULER_NAMES) {
        const s = createScheduler(name, config);
        s.setTimesteps(4);
        assert.equal(s.timesteps.length, 4, `${label} ${name}`);
        const rng = createRng(7);
        let x: Float32Array = rng.normals(2 * 4 * 4 * 4).map((v) => v * s.initNoiseSigma);
        for (const t of s.timesteps) {
          const input = s.scaleModelInput(x, t);
          x = s.step(dummyModel(input, t), t, x, rng);
        }
        assert.ok(x.every(Number.isFinite), `${label} ${name} finite`);
        assert.equal(x.length, 128);
      }
    }
  });

  test('the resolved config has class defaults, keeps given values and drops unknown keys', () => {
    const euler = createScheduler('euler', SD15_PNDM);
    assert.equal(euler.config.num_train_timesteps, 1000);
    assert.equal(euler.config.beta_start, 0.00085);
    assert.equal(euler.config.prediction_type, 'epsilon');
    assert.equal(euler.config.trained_betas, null);
    assert.ok(!('_class_name' in euler.config));
    assert.ok(!('set_alpha_to_one' in euler.config), 'another class option is not carried over');
    const lcm = createScheduler('lcm');
    assert.equal(lcm.config.beta_schedule, 'scaled_linear', "LCM's own default");
    const ddim = createScheduler('ddim');
    assert.equal(ddim.config.beta_schedule, 'linear', "DDIM's own default");
  });

  test('wrong types and unknown values are refused with the key in the message', () => {
    // Configs come from JSON files, so the wrong types are real possibilities.
    const raw = (o: Record<string, unknown>) => o as SchedulerConfig;
    assert.throws(() => createScheduler('euler', raw({ beta_start: '0.1' })), /beta_start.*number/);
    assert.throws(() => createScheduler('euler', { beta_schedule: 'cosine' }), /beta_schedule/);
    assert.throws(() => createScheduler('ddim', { timestep_spacing: 'uniform' }), /timestep_spacing/);
    assert.throws(() => createScheduler('unipc', raw({ use_karras_sigmas: 'yes' })), /use_karras_sigmas.*boolean/);
    assert.throws(() => createScheduler('ddim', { num_train_timesteps: 10.5 }), /integer/);
    assert.throws(() => createScheduler('euler', { trained_betas: [0.1, 0.2], num_train_timesteps: 3 }), /trained_betas/);
  });

  test('trained_betas replaces the beta schedule', () => {
    const betas = Array.from({ length: 10 }, (_, i) => 0.01 * (i + 1));
    // beta_schedule is ignored when trained_betas is given.
    const d = createScheduler('ddim', { trained_betas: betas, num_train_timesteps: 10, beta_schedule: 'scaled_linear' }) as DDIMScheduler;
    let acp = 1;
    for (let i = 0; i < 10; i++) {
      acp *= Math.fround(1 - Math.fround(betas[i]!));
      assert.ok(Math.abs(d.alphasCumprod[i]! - acp) < 1e-6, `acp ${i}`);
    }
  });

  test('squaredcos_cap_v2 (Glide cosine) schedule: betas from the cosine alpha-bar, capped at 0.999', () => {
    const s = createScheduler('ddim', { beta_schedule: 'squaredcos_cap_v2' }) as DDIMScheduler;
    const alphaBar = (t: number) => Math.cos(((t + 0.008) / 1.008) * (Math.PI / 2)) ** 2;
    assert.ok(Math.abs(s.alphasCumprod[0]! - alphaBar(0.001) / alphaBar(0)) < 1e-6);
    assert.ok(Math.abs(s.alphasCumprod[499]! - alphaBar(0.5) / alphaBar(0)) < 1e-4);
  });

  test('lambda_min_clipped as the Python string "-inf" is accepted', () => {
    const s = createScheduler('dpmpp_2m', { lambda_min_clipped: '-inf' });
    s.setTimesteps(10);
    assert.equal(s.timesteps[0], 999);
    const clipped = createScheduler('dpmpp_2m', { lambda_min_clipped: -5.1, beta_schedule: 'squaredcos_cap_v2' });
    clipped.setTimesteps(10);
    assert.ok(clipped.timesteps[0]! < 999, 'the top of the cosine schedule is clipped');
  });
});

describe('shared numerics', () => {
  test('numpy rounding is half to even', () => {
    assert.deepEqual([0.5, 1.5, 2.5, 166.5, -2.5, 2.4, 2.6].map(roundHalfEven), [0, 2, 2, 166, -2, 2, 3]);
  });

  test('np.linspace and np.arange look-alikes', () => {
    assert.deepEqual(npLinspace(0, 1, 5), [0, 0.25, 0.5, 0.75, 1]);
    assert.deepEqual(npLinspace(0, 50, 4, false), [0, 12.5, 25, 37.5]);
    assert.deepEqual(npLinspace(3, 9, 1), [3]);
    assert.deepEqual(npArange(1000, 0, -250), [1000, 750, 500, 250]);
    assert.equal(npArange(1000, 0, -1000 / 3).length, 3);
  });

  test('torch.linspace in float32 keeps both endpoints exact', () => {
    const b = torchLinspaceF32(0.0001, 0.02, 1000);
    assert.equal(b[0], Math.fround(0.0001));
    assert.equal(b[999], Math.fround(0.02));
    assert.ok(b.every((v) => v === Math.fround(v)));
  });

  test('solveLinear solves a small system', () => {
    const x = solveLinear(
      [
        [2, 1],
        [1, 3],
      ],
      [3, 5],
    );
    assert.ok(Math.abs(x[0]! - 0.8) < 1e-12 && Math.abs(x[1]! - 1.4) < 1e-12);
  });
});

describe('ported fixtures', () => {
  test('dummy_sample_deter: arange reshaped (3,8,8,4)/768, permuted to (4,3,8,8)', () => {
    const s = dummySampleDeter();
    assert.equal(s.length, 768);
    // [b, c, h, w] holds arange index ((c*8 + h)*8 + w)*4 + b.
    assert.equal(s[0], 0);
    assert.equal(s[1], Math.fround(4 / 768)); // [0,0,0,1]
    assert.equal(s[192], Math.fround(1 / 768)); // [1,0,0,0]
    assert.equal(s[64], Math.fround(256 / 768)); // [0,1,0,0]
    const sum = s.reduce((a, v) => a + v, 0);
    assert.ok(Math.abs(sum - 383.5) < 1e-3);
  });

  test('dummy_noise_deter is the same fixture from the flipped arange', () => {
    const n = dummyNoiseDeter();
    const s = dummySampleDeter();
    assert.equal(n[0], Math.fround(767 / 768));
    for (const k of [0, 1, 64, 192, 767]) assert.ok(Math.abs(n[k]! + s[k]! - 767 / 768) < 1e-6);
  });
});
