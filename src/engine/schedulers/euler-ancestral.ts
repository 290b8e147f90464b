/**
 * EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise of size
 * sigma_up (k-diffusion's `sample_euler_ancestral`), as diffusers implements it.
 *
 * Noise: each step that needs it draws `sample.length` normals from the rng given to `step`.
 * A step to sigma 0 (the last one) adds none, so it draws nothing and needs no rng.
 */
import type { Rng } from '../rng.js';
import {
  ConfigReader,
  SPACINGS,
  addNoiseAtSigma,
  checkSameLength,
  checkSteps,
  f32,
  karrasInitNoiseSigma,
  makeNoiseTable,
  readBase,
  scaleInputAtSigma,
  sigmasForTimesteps,
  spacedTimesteps,
  trainTimesteps,
  type NoiseTable,
} from './common.js';
import { IndexedScheduler } from './step-index.js';
import type { ResolvedSchedulerConfig, Scheduler, SchedulerConfig, TimestepSpacing } from './types.js';

export interface EulerAncestralDiscreteConfig extends ResolvedSchedulerConfig {
  readonly prediction_type: 'epsilon' | 'v_prediction';
  readonly timestep_spacing: TimestepSpacing;
  readonly steps_offset: number;
  readonly rescale_betas_zero_snr: boolean;
}

/** The ancestral split of a step from sigmaFrom to sigmaTo (both > 0 except sigmaTo may be 0). */
export function ancestralSigmas(sigmaFrom: number, sigmaTo: number): { up: number; down: number } {
  const up = Math.sqrt((sigmaTo * sigmaTo * (sigmaFrom * sigmaFrom - sigmaTo * sigmaTo)) / (sigmaFrom * sigmaFrom));
  const down = Math.sqrt(sigmaTo * sigmaTo - up * up);
  return { up, down };
}

export class EulerAncestralDiscreteScheduler extends IndexedScheduler implements Scheduler {
  readonly name = 'EulerAncestralDiscreteScheduler';
  readonly order = 1;
  readonly config: EulerAncestralDiscreteConfig;
  timesteps: number[];
  /** float32 sigmas, one per timestep plus the final 0. */
  sigmas: number[];
  private readonly table: NoiseTable;
  lastPredOriginal: Float32Array | undefined;

  constructor(raw: SchedulerConfig = {}) {
    super('throw');
    const r = new ConfigReader(raw, this.name);
    // diffusers raises NotImplementedError for `sample` prediction here; we refuse it up front.
    const base = readBase(r, { beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' }, [
      'epsilon',
      'v_prediction',
    ]);
    this.config = {
      ...base,
      prediction_type: base.prediction_type as 'epsilon' | 'v_prediction',
      timestep_spacing: r.choice('timestep_spacing', 'linspace', SPACINGS),
      steps_offset: r.int('steps_offset', 0),
      rescale_betas_zero_snr: r.bool('rescale_betas_zero_snr', false),
    };
    this.table = makeNoiseTable(this.config, this.config.rescale_betas_zero_snr, true);
    const n = this.config.num_train_timesteps;
    this.timesteps = trainTimesteps(n);
    this.sigmas = [...this.table.sigmas].reverse().concat(0);
  }

  get initNoiseSigma(): number {
    return karrasInitNoiseSigma(this.sigmas, this.config.timestep_spacing);
  }

  setTimesteps(numInferenceSteps: number): void {
    checkSteps(numInferenceSteps);
    const cfg = this.config;
    this.timesteps = spacedTimesteps(
      cfg.timestep_spacing,
      cfg.num_train_timesteps,
      numInferenceSteps,
      cfg.steps_offset,
      false,
    ).map(f32);
    this.sigmas = sigmasForTimesteps(this.table, this.timesteps).concat(0).map(f32);
    this.resetStepIndex();
  }

  scaleModelInput(sample: Float32Array, t: number): Float32Array {
    return scaleInputAtSigma(sample, this.sigmas[this.currentStepIndex(t)]!);
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array, rng?: Rng): Float32Array {
    checkSameLength(modelOutput, sample, 'EulerAncestralDiscreteScheduler.step');
    const i = this.currentStepIndex(t);
    if (i + 1 >= this.sigmas.length) throw new RangeError('step called past the end of the schedule');
    const sigma = this.sigmas[i]!;
    const { up, down } = ancestralSigmas(sigma, this.sigmas[i + 1]!);
    let noise: Float32Array | null = null;
    if (up > 0) {
      if (!rng) throw new Error('EulerAncestralDiscreteScheduler.step needs an rng for its noise');
      noise = rng.normals(sample.length);
    }
    const dt = down - sigma;
    const v = this.config.prediction_type === 'v_prediction';
    const vOut = -sigma / Math.sqrt(sigma * sigma + 1);
    const vSkip = 1 / (sigma * sigma + 1);
    const out = new Float32Array(sample.length);
    const predOriginal = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) {
      const x = sample[k]!;
      const m = modelOutput[k]!;
      const x0 = v ? m * vOut + x * vSkip : x - sigma * m;
      predOriginal[k] = x0;
      out[k] = x + ((x - x0) / sigma) * dt + (noise ? noise[k]! * up : 0);
    }
    this.lastPredOriginal = predOriginal;
    this.stepIdx = i + 1;
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array {
    checkSameLength(original, noise, 'EulerAncestralDiscreteScheduler.addNoise');
    return addNoiseAtSigma(original, noise, this.sigmas[this.noiseIndex(t)]!);
  }
}
