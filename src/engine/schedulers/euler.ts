/**
 * EulerDiscreteScheduler: Euler's method on the Karras-sigma ODE (Karras et al. 2022, Algorithm 2
 * without churn), as diffusers implements it. Deterministic: s_churn is fixed at 0, so no noise.
 */
import type { Rng } from '../rng.js';
import {
  ConfigReader,
  FINAL_SIGMAS,
  SPACINGS,
  addNoiseAtSigma,
  checkSameLength,
  checkSteps,
  f32,
  firstTrainSigma,
  karrasInitNoiseSigma,
  karrasSigmas,
  makeNoiseTable,
  readBase,
  scaleInputAtSigma,
  sigmasForTimesteps,
  spacedTimesteps,
  timestepsForSigmas,
  trainTimesteps,
  withFinalSigma,
  type NoiseTable,
} from './common.js';
import { IndexedScheduler } from './step-index.js';
import type {
  FinalSigmasType,
  ResolvedSchedulerConfig,
  Scheduler,
  SchedulerConfig,
  TimestepSpacing,
} from './types.js';

export interface EulerDiscreteConfig extends ResolvedSchedulerConfig {
  readonly timestep_spacing: TimestepSpacing;
  readonly steps_offset: number;
  readonly interpolation_type: 'linear';
  readonly use_karras_sigmas: boolean;
  readonly sigma_min: number | null;
  readonly sigma_max: number | null;
  readonly final_sigmas_type: FinalSigmasType;
  readonly rescale_betas_zero_snr: boolean;
}

export class EulerDiscreteScheduler extends IndexedScheduler implements Scheduler {
  readonly name = 'EulerDiscreteScheduler';
  readonly order = 1;
  readonly config: EulerDiscreteConfig;
  timesteps: number[];
  /** float32 sigmas, one per timestep plus the final one. */
  sigmas: number[];
  private readonly table: NoiseTable;
  lastPredOriginal: Float32Array | undefined;

  constructor(raw: SchedulerConfig = {}) {
    super('throw');
    const r = new ConfigReader(raw, this.name);
    // Not implemented: continuous-time v-prediction (EDM), exponential and beta sigma ramps.
    r.unsupportedIfSet('timestep_type', 'discrete');
    r.unsupportedIfSet('use_exponential_sigmas');
    r.unsupportedIfSet('use_beta_sigmas');
    this.config = {
      ...readBase(r, { beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' }),
      timestep_spacing: r.choice('timestep_spacing', 'linspace', SPACINGS),
      steps_offset: r.int('steps_offset', 0),
      interpolation_type: r.choice('interpolation_type', 'linear', ['linear'] as const),
      use_karras_sigmas: r.bool('use_karras_sigmas', false),
      sigma_min: r.optionalNumber('sigma_min'),
      sigma_max: r.optionalNumber('sigma_max'),
      final_sigmas_type: r.choice('final_sigmas_type', 'zero', FINAL_SIGMAS),
      rescale_betas_zero_snr: r.bool('rescale_betas_zero_snr', false),
    };
    this.table = makeNoiseTable(this.config, this.config.rescale_betas_zero_snr, true);
    // Before setTimesteps diffusers exposes the full training schedule.
    const n = this.config.num_train_timesteps;
    this.timesteps = trainTimesteps(n).map(f32);
    this.sigmas = [...this.table.sigmas].reverse().concat(0);
  }

  get initNoiseSigma(): number {
    return karrasInitNoiseSigma(this.sigmas, this.config.timestep_spacing);
  }

  setTimesteps(numInferenceSteps: number): void {
    checkSteps(numInferenceSteps);
    const cfg = this.config;
    let timesteps = spacedTimesteps(
      cfg.timestep_spacing,
      cfg.num_train_timesteps,
      numInferenceSteps,
      cfg.steps_offset,
      false,
    ).map(f32);
    let sigmas = sigmasForTimesteps(this.table, timesteps);
    if (cfg.use_karras_sigmas) {
      sigmas = karrasSigmas(cfg.sigma_min ?? sigmas.at(-1)!, cfg.sigma_max ?? sigmas[0]!, numInferenceSteps);
      timesteps = timestepsForSigmas(this.table, sigmas).map(f32);
    }
    this.sigmas = withFinalSigma(sigmas, cfg.final_sigmas_type, firstTrainSigma(this.table));
    this.timesteps = timesteps;
    this.resetStepIndex();
  }

  scaleModelInput(sample: Float32Array, t: number): Float32Array {
    return scaleInputAtSigma(sample, this.sigmas[this.currentStepIndex(t)]!);
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array, _rng?: Rng): Float32Array {
    checkSameLength(modelOutput, sample, 'EulerDiscreteScheduler.step');
    const i = this.currentStepIndex(t);
    if (i + 1 >= this.sigmas.length) throw new RangeError('step called past the end of the schedule');
    const sigma = this.sigmas[i]!;
    const dt = f32(this.sigmas[i + 1]! - sigma);
    const out = new Float32Array(sample.length);
    const pred = this.config.prediction_type;
    // Rounded to float32 where torch rounds, so long runs track diffusers' numbers closely.
    const vOut = -sigma / Math.sqrt(sigma * sigma + 1);
    const vSkip = 1 / (sigma * sigma + 1);
    const predOriginal = new Float32Array(sample.length);
    for (let k = 0; k < out.length; k++) {
      const x = sample[k]!;
      const m = modelOutput[k]!;
      const x0 = pred === 'epsilon' ? f32(x - f32(sigma * m)) : pred === 'v_prediction' ? m * vOut + x * vSkip : m;
      predOriginal[k] = x0;
      out[k] = x + f32(f32(f32(x - x0) / sigma) * dt);
    }
    this.lastPredOriginal = predOriginal;
    this.stepIdx = i + 1;
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array {
    checkSameLength(original, noise, 'EulerDiscreteScheduler.addNoise');
    return addNoiseAtSigma(original, noise, this.sigmas[this.noiseIndex(t)]!);
  }
}
