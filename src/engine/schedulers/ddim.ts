/**
 * DDIMScheduler (Song et al. 2020), deterministic (eta = 0, which is what the diffusers
 * pipelines use by default). Works on integer training timesteps, not sigmas.
 *
 * Not implemented: eta > 0 (diffusers' step argument, not a config key) and dynamic
 * thresholding (`thresholding: true` is ignored; it is meant for pixel-space models).
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
  readBase,
  spacedTimesteps,
  type NoiseTable,
} from './common.js';
import type { ResolvedSchedulerConfig, Scheduler, SchedulerConfig, TimestepSpacing } from './types.js';

export interface DDIMConfig extends ResolvedSchedulerConfig {
  readonly clip_sample: boolean;
  readonly clip_sample_range: number;
  readonly set_alpha_to_one: boolean;
  readonly steps_offset: number;
  readonly thresholding: boolean;
  readonly timestep_spacing: TimestepSpacing;
  readonly rescale_betas_zero_snr: boolean;
}

export class DDIMScheduler implements Scheduler {
  readonly name = 'DDIMScheduler';
  readonly order = 1;
  readonly config: DDIMConfig;
  readonly initNoiseSigma = 1;
  timesteps: number[];
  /** float32 alphas_cumprod of the training schedule. */
  readonly alphasCumprod: Float64Array;
  private readonly table: NoiseTable;
  private readonly finalAlphaCumprod: number;
  lastPredOriginal: Float32Array | undefined;
  private numInferenceSteps: number | null = null;

  constructor(raw: SchedulerConfig = {}) {
    const r = new ConfigReader(raw, this.name);
    this.config = {
      ...readBase(r, { beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' }),
      clip_sample: r.bool('clip_sample', true),
      clip_sample_range: r.number('clip_sample_range', 1),
      set_alpha_to_one: r.bool('set_alpha_to_one', true),
      steps_offset: r.int('steps_offset', 0),
      thresholding: r.bool('thresholding', false),
      timestep_spacing: r.choice('timestep_spacing', 'leading', SPACINGS),
      rescale_betas_zero_snr: r.bool('rescale_betas_zero_snr', false),
    };
    this.table = makeNoiseTable(this.config, this.config.rescale_betas_zero_snr, false);
    this.alphasCumprod = this.table.alphasCumprod;
    // The step after the last has no "previous" alpha: 1 (fully denoised) or alpha at t=0.
    this.finalAlphaCumprod = this.config.set_alpha_to_one ? 1 : this.alphasCumprod[0]!;
    const n = this.config.num_train_timesteps;
    this.timesteps = Array.from({ length: n }, (_, i) => n - 1 - i);
  }

  /** DDIM has no step counter (it works from the timestep value); accepted for API symmetry. */
  setBeginIndex(_index: number): void {}

  setTimesteps(numInferenceSteps: number): void {
    const cfg = this.config;
    checkSteps(numInferenceSteps, cfg.num_train_timesteps);
    this.numInferenceSteps = numInferenceSteps;
    this.timesteps = spacedTimesteps(
      cfg.timestep_spacing,
      cfg.num_train_timesteps,
      numInferenceSteps,
      cfg.steps_offset,
      true,
    );
  }

  scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return sample;
  }

  private alphaPrev(prevT: number): number {
    return prevT >= 0 ? this.alphasCumprod[prevT]! : this.finalAlphaCumprod;
  }

  /** DDIM's sigma_t^2 at eta = 1 (diffusers `_get_variance`). */
  variance(t: number, prevT: number): number {
    const a = this.alphasCumprod[t]!;
    const aPrev = this.alphaPrev(prevT);
    return ((1 - aPrev) / (1 - a)) * (1 - a / aPrev);
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array, _rng?: Rng): Float32Array {
    checkSameLength(modelOutput, sample, 'DDIMScheduler.step');
    if (this.numInferenceSteps === null) throw new Error('DDIMScheduler.step: call setTimesteps first');
    const cfg = this.config;
    checkTrainTimestep(t, cfg.num_train_timesteps);
    // diffusers steps back by the leading stride whatever the spacing; kept for parity.
    const prevT = t - Math.floor(cfg.num_train_timesteps / this.numInferenceSteps);
    const a = this.alphasCumprod[t]!;
    const aPrev = this.alphaPrev(prevT);
    const sa = Math.sqrt(a);
    const sb = Math.sqrt(1 - a);
    const saPrev = Math.sqrt(aPrev);
    const dirScale = Math.sqrt(1 - aPrev); // eta = 0: no variance term
    const clip = cfg.clip_sample ? cfg.clip_sample_range : Infinity;
    const pred = cfg.prediction_type;
    const out = new Float32Array(sample.length);
    const predOriginal = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) {
      const x = sample[k]!;
      const m = modelOutput[k]!;
      let x0: number;
      let eps: number;
      if (pred === 'epsilon') {
        x0 = (x - sb * m) / sa;
        eps = m;
      } else if (pred === 'sample') {
        x0 = m;
        eps = (x - sa * m) / sb;
      } else {
        x0 = sa * x - sb * m;
        eps = sa * m + sb * x;
      }
      // eps is taken before clipping, as diffusers does (use_clipped_model_output = false).
      x0 = Math.min(clip, Math.max(-clip, x0));
      predOriginal[k] = x0;
      out[k] = saPrev * x0 + dirScale * eps;
    }
    this.lastPredOriginal = predOriginal;
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array {
    return ddpmAddNoise(this.alphasCumprod, this.config.num_train_timesteps, original, noise, t);
  }
}
