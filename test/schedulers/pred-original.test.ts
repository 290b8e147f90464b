/**
 * Every scheduler's `lastPredOriginal` (diffusers' pred_original_sample): fed the model output a
 * perfect model would give for a known clean sample x0 (the true noise, the true velocity, or x0
 * itself), the predicted clean sample is x0 again, at any point of the schedule.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRng } from '../../src/engine/rng.js';
import { SCHEDULER_NAMES, createScheduler, type Scheduler, type SchedulerConfig } from '../../src/engine/schedulers/index.js';
import { SD15_PNDM } from './configs.js';

const N = 64;

/** The forward process' coefficients at timestep t, read off addNoise: x = c0·x0 + cn·noise. */
function forwardCoefficients(s: Scheduler, t: number): { c0: number; cn: number } {
  const ones = new Float32Array(4).fill(1);
  const zeros = new Float32Array(4);
  return { c0: s.addNoise(ones, zeros, t)[0]!, cn: s.addNoise(zeros, ones, t)[0]! };
}

function perfectOutput(prediction: string, x0: Float32Array, noise: Float32Array, c0: number, cn: number): Float32Array {
  if (prediction === 'epsilon') return noise;
  if (prediction === 'sample') return x0;
  // v = alpha·noise - sigma·x0 in the variance-preserving terms of this noise level.
  const ratio = cn / c0;
  const alpha = 1 / Math.sqrt(1 + ratio * ratio);
  const sigma = ratio * alpha;
  return x0.map((x, k) => alpha * noise[k]! - sigma * x);
}

/** Every alias, and the variants that integrate epsilon rather than x0 (converted back for x0). */
const CASES: { label: string; name: string; extra?: SchedulerConfig }[] = [
  ...SCHEDULER_NAMES.map((name) => ({ label: name, name })),
  { label: 'DPM-Solver multistep, algorithm dpmsolver', name: 'DPMSolverMultistepScheduler', extra: { algorithm_type: 'dpmsolver', final_sigmas_type: 'sigma_min' } },
  { label: 'DPM-Solver single-step, algorithm dpmsolver', name: 'DPMSolverSinglestepScheduler', extra: { algorithm_type: 'dpmsolver', final_sigmas_type: 'sigma_min' } },
  { label: 'UniPC, predict_x0 false', name: 'UniPCMultistepScheduler', extra: { predict_x0: false } },
];

for (const { label, name, extra } of CASES) {
  test(`${label}: lastPredOriginal recovers x0 from a perfect model output (epsilon, v_prediction, sample)`, () => {
    const rng = createRng(7);
    // Euler ancestral refuses `sample` (as diffusers does).
    for (const prediction of name === 'euler_a' ? ['epsilon', 'v_prediction'] : ['epsilon', 'v_prediction', 'sample']) {
      for (const begin of [0, 3, 7]) {
        const s = createScheduler(name, { ...SD15_PNDM, ...extra, prediction_type: prediction });
        s.setTimesteps(8);
        if (begin > 0) s.setBeginIndex(begin * s.order);
        assert.equal(s.lastPredOriginal, undefined, 'nothing before the first step');
        const t = s.timesteps[begin * s.order]!;
        // Inside DDIM/LCM's clip range, so clipping changes nothing.
        const x0 = rng.normals(N).map((v) => Math.tanh(v) * 0.9);
        const noise = rng.normals(N);
        const { c0, cn } = forwardCoefficients(s, t);
        const x = s.addNoise(x0, noise, t);
        s.step(perfectOutput(prediction, x0, noise, c0, cn), t, x, rng);
        const got = s.lastPredOriginal!;
        assert.equal(got.length, N);
        let worst = 0;
        for (let k = 0; k < N; k++) worst = Math.max(worst, Math.abs(got[k]! - x0[k]!));
        assert.ok(worst < 2e-4, `${label} ${prediction} begin ${begin}: max |x0' - x0| = ${worst}`);
      }
    }
  });
}

test('lastPredOriginal is a new array each step, left as it was', () => {
  const rng = createRng(3);
  for (const name of SCHEDULER_NAMES) {
    const s = createScheduler(name, SD15_PNDM);
    s.setTimesteps(4);
    let x: Float32Array = rng.normals(N).map((v) => v * s.initNoiseSigma);
    const seen: Float32Array[] = [];
    const copies: Float32Array[] = [];
    for (const t of s.timesteps) {
      x = s.step(rng.normals(N), t, x, rng);
      seen.push(s.lastPredOriginal!);
      copies.push(Float32Array.from(s.lastPredOriginal!));
    }
    assert.equal(new Set(seen).size, seen.length, `${name}: one array per step`);
    seen.forEach((a, i) => assert.deepEqual(a, copies[i], `${name}: step ${i} unchanged after later steps`));
  }
});
