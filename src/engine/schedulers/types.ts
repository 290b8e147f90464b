/**
 * Types shared by the schedulers. Kept apart from index.ts so scheduler files can import them
 * without a cycle through the registry.
 */
import type { Rng } from '../rng.js';

export type BetaSchedule = 'linear' | 'scaled_linear' | 'squaredcos_cap_v2';
export type PredictionType = 'epsilon' | 'v_prediction' | 'sample';
export type TimestepSpacing = 'leading' | 'trailing' | 'linspace';
export type FinalSigmasType = 'zero' | 'sigma_min';

/**
 * A diffusers `scheduler_config.json` object, as read from disk. Every key is optional; `null`
 * means "use the class default" (diffusers writes `"trained_betas": null`). Keys a scheduler does
 * not know (`_class_name`, `_diffusers_version`, `skip_prk_steps`, another class's options) are
 * ignored, as diffusers' `from_config` does.
 */
export interface SchedulerConfig {
  num_train_timesteps?: number | null;
  beta_start?: number | null;
  beta_end?: number | null;
  beta_schedule?: BetaSchedule | string | null;
  trained_betas?: readonly number[] | null;
  prediction_type?: PredictionType | string | null;
  timestep_spacing?: TimestepSpacing | string | null;
  steps_offset?: number | null;
  rescale_betas_zero_snr?: boolean | null;
  /** Euler, DPM-Solver, UniPC. */
  use_karras_sigmas?: boolean | null;
  /** Euler, UniPC: override the ends of the Karras ramp. */
  sigma_min?: number | null;
  sigma_max?: number | null;
  /** Euler: only `linear` is implemented. */
  interpolation_type?: string | null;
  final_sigmas_type?: FinalSigmasType | string | null;
  /** DDIM, LCM. */
  clip_sample?: boolean | null;
  clip_sample_range?: number | null;
  set_alpha_to_one?: boolean | null;
  /** Dynamic thresholding is not implemented (it is for pixel-space models); a true value is ignored. */
  thresholding?: boolean | null;
  /** DPM-Solver, UniPC. */
  solver_order?: number | null;
  lower_order_final?: boolean | null;
  solver_type?: string | null;
  algorithm_type?: string | null;
  euler_at_final?: boolean | null;
  /** Python's -inf has no JSON spelling; the strings "-inf"/"-Infinity" are accepted too. */
  lambda_min_clipped?: number | string | null;
  use_lu_lambdas?: boolean | null;
  /** UniPC. */
  predict_x0?: boolean | null;
  disable_corrector?: readonly number[] | null;
  /** LCM. */
  original_inference_steps?: number | null;
  timestep_scaling?: number | null;
  [key: string]: unknown;
}

/** The options every scheduler resolves (defaults applied). Each class extends this. */
export interface ResolvedSchedulerConfig {
  readonly num_train_timesteps: number;
  readonly beta_start: number;
  readonly beta_end: number;
  readonly beta_schedule: BetaSchedule;
  readonly trained_betas: readonly number[] | null;
  readonly prediction_type: PredictionType;
}

/**
 * A diffusion scheduler, shaped like diffusers' SchedulerMixin. Latents are flat Float32Arrays
 * (B*C*H*W); every operation is elementwise, so batch and layout do not matter.
 *
 * Usage: `setTimesteps(n)`, optionally `setBeginIndex(i)` (img2img), then for each `t` of
 * `timesteps`: `x = step(model(scaleModelInput(x, t), t), t, x, rng)`.
 */
export interface Scheduler {
  /** The diffusers class name, e.g. `EulerDiscreteScheduler`. */
  readonly name: string;
  /** The resolved config (class defaults applied). */
  readonly config: ResolvedSchedulerConfig;
  /** As diffusers' `order`: timesteps per model evaluation, used to slice timesteps for img2img. */
  readonly order: number;
  /** The schedule after `setTimesteps`, highest noise first. Fractional for some Euler schedules. */
  timesteps: number[];
  /** Standard deviation to multiply the initial Gaussian latents by. */
  initNoiseSigma: number;
  /** Builds the schedule; resets the step counter and the begin index. */
  setTimesteps(numInferenceSteps: number): void;
  /** Start the step counter at `timesteps[index]` (img2img); call after `setTimesteps`. */
  setBeginIndex(index: number): void;
  /** Scales the model input for timestep `t`; returns `sample` itself when there is nothing to do. */
  scaleModelInput(sample: Float32Array, t: number): Float32Array;
  /** One denoising step: the sample at the next (less noisy) timestep. Never mutates its inputs. */
  step(modelOutput: Float32Array, t: number, sample: Float32Array, rng?: Rng): Float32Array;
  /**
   * The clean sample x0 the last `step()` predicted from its model output (diffusers'
   * `pred_original_sample`), in the same latent space; undefined before the first step. A new
   * array per step, never changed afterwards (previews read it while the loop goes on).
   * Optional so that a scheduler written elsewhere still fits; Kiln's all set it.
   */
  readonly lastPredOriginal?: Float32Array;
  /** The forward process: `original` noised to the level of timestep `t` (img2img). */
  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array;
}
