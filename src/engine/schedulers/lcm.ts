/**
 * LCMScheduler (Latent Consistency Models, Luo et al. 2023), as diffusers implements it: each
 * step maps to a denoised estimate with the consistency boundary condition, then re-noises it to
 * the next timestep. The timesteps are picked from the `original_inference_steps`-point
 * distillation schedule; `timestep_spacing` and `steps_offset` are accepted but unused (as in
 * diffusers).
 *
 * Noise: every step but the last draws `sample.length` normals from the rng (so one-step
 * sampling needs none). Dynamic thresholding is not implemented (`thresholding` is ignored).
 */
import type { Rng } from '../rng.js';
import {
  ConfigReader,
  SPACINGS,
  checkSameLength,
  checkSteps,
  checkTrainTimestep,
  ddpmAddNoise,
  makeNoiseTable,
  npLinspace,
  readBase,
} from './common.js';
import { IndexedScheduler } from './step-index.js';
import type { ResolvedSchedulerConfig, Scheduler, SchedulerConfig, TimestepSpacing } from './types.js';

export interface LCMConfig extends ResolvedSchedulerConfig {
  readonly original_inference_steps: number;
  readonly clip_sample: boolean;
  readonly clip_sample_range: number;
  readonly set_alpha_to_one: boolean;
  readonly steps_offset: number;
  readonly thresholding: boolean;
  readonly timestep_spacing: TimestepSpacing;
  readonly timestep_scaling: number;
  readonly rescale_betas_zero_snr: boolean;
}

/** sigma_data of the consistency-model boundary condition. */
const SIGMA_DATA = 0.5;

export class LCMScheduler extends IndexedScheduler implements Scheduler {
  readonly name = 'LCMScheduler';
  readonly order = 1;
  readonly config: LCMConfig;
  readonly initNoiseSigma = 1;
  timesteps: number[];
  /** float32 alphas_cumprod of the training schedule. */
  readonly alphasCumprod: Float64Array;
  private readonly finalAlphaCumprod: number;
  lastPredOriginal: Float32Array | undefined;
  private numInferenceSteps: number | null = null;

  constructor(raw: SchedulerConfig = {}) {
    super('throw');
    const r = new ConfigReader(raw, this.name);
    this.config = {
      ...readBase(r, { beta_start: 0.00085, beta_end: 0.012, beta_schedule: 'scaled_linear' }),
      original_inference_steps: r.int('original_inference_steps', 50),
      clip_sample: r.bool('clip_sample', false),
      clip_sample_range: r.number('clip_sample_range', 1),
      set_alpha_to_one: r.bool('set_alpha_to_one', true),
      steps_offset: r.int('steps_offset', 0),
      thresholding: r.bool('thresholding', false),
      timestep_spacing: r.choice('timestep_spacing', 'leading', SPACINGS),
      timestep_scaling: r.number('timestep_scaling', 10),
      rescale_betas_zero_snr: r.bool('rescale_betas_zero_snr', false),
    };
    this.alphasCumprod = makeNoiseTable(this.config, this.config.rescale_betas_zero_snr, false).alphasCumprod;
    this.finalAlphaCumprod = this.config.set_alpha_to_one ? 1 : this.alphasCumprod[0]!;
    const n = this.config.num_train_timesteps;
    this.timesteps = Array.from({ length: n }, (_, i) => n - 1 - i);
  }

  setTimesteps(numInferenceSteps: number): void {
    const cfg = this.config;
    checkSteps(numInferenceSteps, cfg.num_train_timesteps);
    const original = cfg.original_inference_steps;
    if (original < 1 || original > cfg.num_train_timesteps) {
      throw new RangeError(`original_inference_steps must be in [1, ${cfg.num_train_timesteps}], got ${original}`);
    }
    if (numInferenceSteps > original) {
      throw new RangeError(
        `numInferenceSteps ${numInferenceSteps} cannot be larger than original_inference_steps ${original}: ` +
          'LCM picks its timesteps from that schedule',
      );
    }
    // The distillation schedule: every k-th training timestep, k = T // original, highest first.
    const k = Math.floor(cfg.num_train_timesteps / original);
    const origin = Array.from({ length: original }, (_, i) => (original - i) * k - 1);
    this.timesteps = npLinspace(0, origin.length, numInferenceSteps, false).map((p) => origin[Math.floor(p)]!);
    this.numInferenceSteps = numInferenceSteps;
    this.resetStepIndex();
  }

  scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return sample;
  }

  /** Consistency-model boundary scalings c_skip, c_out at timestep t. */
  boundaryScalings(t: number): { cSkip: number; cOut: number } {
    const scaled = t * this.config.timestep_scaling;
    const d2 = SIGMA_DATA * SIGMA_DATA;
    return { cSkip: d2 / (scaled * scaled + d2), cOut: scaled / Math.sqrt(scaled * scaled + d2) };
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array, rng?: Rng): Float32Array {
    checkSameLength(modelOutput, sample, 'LCMScheduler.step');
    if (this.numInferenceSteps === null) throw new Error('LCMScheduler.step: call setTimesteps first');
    const cfg = this.config;
    checkTrainTimestep(t, cfg.num_train_timesteps);
    const i = this.currentStepIndex(t);
    const prevT = i + 1 < this.timesteps.length ? this.timesteps[i + 1]! : t;
    const a = this.alphasCumprod[t]!;
    const aPrev = prevT >= 0 ? this.alphasCumprod[prevT]! : this.finalAlphaCumprod;
    const sa = Math.sqrt(a);
    const sb = Math.sqrt(1 - a);
    const { cSkip, cOut } = this.boundaryScalings(t);
    const clip = cfg.clip_sample ? cfg.clip_sample_range : Infinity;
    const pred = cfg.prediction_type;
    // No noise on the final step (and so none for one-step sampling).
    const last = i === this.numInferenceSteps - 1;
    let noise: Float32Array | null = null;
    if (!last) {
      if (!rng) throw new Error('LCMScheduler.step needs an rng for every step but the last');
      noise = rng.normals(sample.length);
    }
    const keep = last ? 1 : Math.sqrt(aPrev);
    const renoise = Math.sqrt(1 - aPrev);
    const out = new Float32Array(sample.length);
    const predOriginal = new Float32Array(sample.length);
    for (let e = 0; e < out.length; e++) {
      const x = sample[e]!;
      const m = modelOutput[e]!;
      let x0 = pred === 'epsilon' ? (x - sb * m) / sa : pred === 'sample' ? m : sa * x - sb * m;
      x0 = Math.min(clip, Math.max(-clip, x0));
      predOriginal[e] = x0;
      const denoised = cOut * x0 + cSkip * x;
      out[e] = keep * denoised + (noise ? renoise * noise[e]! : 0);
    }
    // x0 before the boundary condition, as diffusers' pred_original_sample (its `denoised` mixes x back in).
    this.lastPredOriginal = predOriginal;
    this.stepIdx = i + 1;
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array {
    return ddpmAddNoise(this.alphasCumprod, this.config.num_train_timesteps, original, noise, t);
  }
}
