/**
 * DPMSolverMultistepScheduler (Lu et al. 2022, DPM-Solver and DPM-Solver++), as diffusers
 * implements it. The `dpmpp_2m` alias is algorithm_type `dpmsolver++` with solver_order 2.
 *
 * Supported: algorithm_type dpmsolver++ / dpmsolver / sde-dpmsolver++ / sde-dpmsolver (the SDE
 * variants draw `sample.length` normals per step from the rng), orders 1-3, midpoint/heun,
 * Karras sigmas, Lu lambdas, lower_order_final, euler_at_final, final_sigmas_type,
 * lambda_min_clipped. Not implemented: variance_type (learned variance models), exponential/beta/
 * flow sigmas, dynamic thresholding (`thresholding: true` is ignored).
 */
import type { Rng } from '../rng.js';
import {
  ConfigReader,
  FINAL_SIGMAS,
  SPACINGS,
  addNoiseVp,
  alphaSigma,
  checkSameLength,
  checkSteps,
  firstTrainSigma,
  karrasSigmas,
  makeNoiseTable,
  npLinspace,
  readBase,
  roundHalfEven,
  sigmasForTimesteps,
  spacedTimestepsPlusOne,
  timestepsForSigmas,
  trainTimesteps,
  withFinalSigma,
  type NoiseTable,
} from './common.js';
import {
  convertDpmOutput,
  dataPrediction,
  firstOrderCoefficients,
  lambdaClippedEnd,
  readDpmAlgorithm,
  readDpmSolverType,
  rejectUnsupportedDpmOptions,
  secondOrderCoefficient,
  thirdOrderCoefficients,
  type DpmAlgorithm,
  type DpmSolverType,
} from './dpm-solver.js';
import { IndexedScheduler } from './step-index.js';
import type {
  FinalSigmasType,
  ResolvedSchedulerConfig,
  Scheduler,
  SchedulerConfig,
  TimestepSpacing,
} from './types.js';

export interface DPMSolverMultistepConfig extends ResolvedSchedulerConfig {
  readonly solver_order: number;
  readonly thresholding: boolean;
  readonly algorithm_type: DpmAlgorithm;
  readonly solver_type: DpmSolverType;
  readonly lower_order_final: boolean;
  readonly euler_at_final: boolean;
  readonly use_karras_sigmas: boolean;
  readonly use_lu_lambdas: boolean;
  readonly final_sigmas_type: FinalSigmasType;
  readonly lambda_min_clipped: number;
  readonly timestep_spacing: TimestepSpacing;
  readonly steps_offset: number;
  readonly rescale_betas_zero_snr: boolean;
}

export class DPMSolverMultistepScheduler extends IndexedScheduler implements Scheduler {
  readonly name = 'DPMSolverMultistepScheduler';
  readonly order = 1;
  readonly config: DPMSolverMultistepConfig;
  readonly initNoiseSigma = 1;
  timesteps: number[];
  /** float32 sigmas, one per timestep plus the final one. */
  sigmas: number[];
  private readonly table: NoiseTable;
  lastPredOriginal: Float32Array | undefined;
  private modelOutputs: (Float32Array | null)[];
  private lowerOrderNums = 0;
  private numInferenceSteps: number | null = null;

  constructor(raw: SchedulerConfig = {}) {
    super('last');
    const r = new ConfigReader(raw, this.name);
    rejectUnsupportedDpmOptions(r);
    const cfg: DPMSolverMultistepConfig = {
      ...readBase(r, { beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' }),
      solver_order: r.int('solver_order', 2),
      thresholding: r.bool('thresholding', false),
      algorithm_type: readDpmAlgorithm(r, ['dpmsolver++', 'dpmsolver', 'sde-dpmsolver++', 'sde-dpmsolver']),
      solver_type: readDpmSolverType(r),
      lower_order_final: r.bool('lower_order_final', true),
      euler_at_final: r.bool('euler_at_final', false),
      use_karras_sigmas: r.bool('use_karras_sigmas', false),
      use_lu_lambdas: r.bool('use_lu_lambdas', false),
      final_sigmas_type: r.choice('final_sigmas_type', 'zero', FINAL_SIGMAS),
      lambda_min_clipped: r.numberOrInf('lambda_min_clipped', -Infinity),
      timestep_spacing: r.choice('timestep_spacing', 'linspace', SPACINGS),
      steps_offset: r.int('steps_offset', 0),
      rescale_betas_zero_snr: r.bool('rescale_betas_zero_snr', false),
    };
    if (cfg.solver_order < 1 || cfg.solver_order > 3) throw new RangeError(`solver_order must be 1, 2 or 3`);
    if (cfg.use_karras_sigmas && cfg.use_lu_lambdas) {
      throw new Error(`${this.name}: use_karras_sigmas and use_lu_lambdas cannot both be set`);
    }
    // A final sigma of 0 is a data prediction; the epsilon-space solvers cannot reach it.
    if ((cfg.algorithm_type === 'dpmsolver' || cfg.algorithm_type === 'sde-dpmsolver') && cfg.final_sigmas_type === 'zero') {
      throw new Error(`${this.name}: final_sigmas_type "zero" needs algorithm_type dpmsolver++ or sde-dpmsolver++`);
    }
    this.config = cfg;
    this.table = makeNoiseTable(cfg, cfg.rescale_betas_zero_snr, true);
    const n = cfg.num_train_timesteps;
    this.timesteps = trainTimesteps(n);
    this.sigmas = [...this.table.sigmas];
    this.modelOutputs = new Array(cfg.solver_order).fill(null);
  }

  setTimesteps(numInferenceSteps: number): void {
    checkSteps(numInferenceSteps);
    const cfg = this.config;
    const T = cfg.num_train_timesteps;
    const lastTimestep = lambdaClippedEnd(this.table, cfg.lambda_min_clipped);
    let timesteps = spacedTimestepsPlusOne(cfg.timestep_spacing, T, lastTimestep, numInferenceSteps, cfg.steps_offset);
    let sigmas: number[];
    if (cfg.use_karras_sigmas || cfg.use_lu_lambdas) {
      sigmas = cfg.use_karras_sigmas
        ? karrasSigmas(this.table.sigmas[0]!, this.table.sigmas[T - 1]!, numInferenceSteps)
        : luLambdaSigmas(this.table, numInferenceSteps);
      const cosine = cfg.beta_schedule === 'squaredcos_cap_v2';
      timesteps = timestepsForSigmas(this.table, sigmas).map((t) => (cosine ? t : roundHalfEven(t)));
    } else {
      sigmas = sigmasForTimesteps(this.table, timesteps);
    }
    this.sigmas = withFinalSigma(sigmas, cfg.final_sigmas_type, firstTrainSigma(this.table));
    this.timesteps = timesteps;
    this.numInferenceSteps = timesteps.length;
    this.modelOutputs = new Array(cfg.solver_order).fill(null);
    this.lowerOrderNums = 0;
    this.resetStepIndex();
  }

  scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return sample;
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array, rng?: Rng): Float32Array {
    checkSameLength(modelOutput, sample, 'DPMSolverMultistepScheduler.step');
    if (this.numInferenceSteps === null) throw new Error(`${this.name}.step: call setTimesteps first`);
    const cfg = this.config;
    const i = this.currentStepIndex(t);
    const n = this.timesteps.length;
    if (i >= n) throw new RangeError('step called past the end of the schedule');

    // Drop to lower orders at the end: more stable for few steps, and required to reach sigma 0.
    const finalFirstOrder =
      i === n - 1 && (cfg.euler_at_final || (cfg.lower_order_final && n < 15) || cfg.final_sigmas_type === 'zero');
    const finalSecondOrder = i === n - 2 && cfg.lower_order_final && n < 15;

    const converted = convertDpmOutput(cfg.algorithm_type, cfg.prediction_type, this.sigmas[i]!, modelOutput, sample);
    this.lastPredOriginal = dataPrediction(cfg.algorithm_type, cfg.prediction_type, this.sigmas[i]!, modelOutput, sample, converted);
    this.modelOutputs.shift();
    this.modelOutputs.push(converted);

    let noise: Float32Array | null = null;
    if (cfg.algorithm_type.startsWith('sde-')) {
      if (!rng) throw new Error(`${this.name}: algorithm_type ${cfg.algorithm_type} needs an rng`);
      noise = rng.normals(sample.length);
    }

    let order: number;
    if (cfg.solver_order === 1 || this.lowerOrderNums < 1 || finalFirstOrder) order = 1;
    else if (cfg.solver_order === 2 || this.lowerOrderNums < 2 || finalSecondOrder) order = 2;
    else order = 3;

    const prev = multistepUpdate(cfg.algorithm_type, cfg.solver_type, order, this.sigmas, i, this.modelOutputs, sample, noise);
    if (this.lowerOrderNums < cfg.solver_order) this.lowerOrderNums++;
    this.stepIdx = i + 1;
    return prev;
  }

  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array {
    checkSameLength(original, noise, 'DPMSolverMultistepScheduler.addNoise');
    return addNoiseVp(original, noise, this.sigmas[this.noiseIndex(t)]!);
  }
}

/** Lu et al.'s logSNR spacing: uniform in log-sigma between the ends of the training schedule. */
function luLambdaSigmas(table: NoiseTable, n: number): number[] {
  const [hi, lo] = [table.logSigmas.at(-1)!, table.logSigmas[0]!];
  return npLinspace(0, 1, n).map((ramp) => Math.exp(hi + ramp * (lo - hi)));
}

/**
 * One multistep DPM-Solver update from sigmas[i] to sigmas[i+1]; `outputs` ends with the
 * current converted output (m0), preceded by the previous ones (m1, m2).
 */
function multistepUpdate(
  algorithm: DpmAlgorithm,
  solverType: DpmSolverType,
  order: number,
  sigmas: readonly number[],
  i: number,
  outputs: readonly (Float32Array | null)[],
  sample: Float32Array,
  noise: Float32Array | null,
): Float32Array {
  const k = outputs.length;
  const m0 = outputs[k - 1]!;
  const t = alphaSigma(sigmas[i + 1]!);
  const s0 = alphaSigma(sigmas[i]!);
  const h = t.lambda - s0.lambda;
  const out = new Float32Array(sample.length);
  // x_t = cx * x + c0 * D0 + c1 * D1 + c2 * D2 + cn * noise.
  const { cx, c0, cn } = firstOrderCoefficients(algorithm, t, s0, h);

  if (order === 1) {
    for (let e = 0; e < out.length; e++) out[e] = cx * sample[e]! + c0 * m0[e]! + (noise ? cn * noise[e]! : 0);
    return out;
  }

  const m1 = outputs[k - 2]!;
  const s1 = alphaSigma(sigmas[i - 1]!);
  const h0 = s0.lambda - s1.lambda;
  const r0 = h0 / h;
  if (order === 2) {
    // D1 = (m0 - m1) / r0
    const c1r = secondOrderCoefficient(algorithm, solverType, t, h, c0) / r0;
    for (let e = 0; e < out.length; e++) {
      const a = m0[e]!;
      out[e] = cx * sample[e]! + c0 * a + c1r * (a - m1[e]!) + (noise ? cn * noise[e]! : 0);
    }
    return out;
  }

  const { c1, c2 } = thirdOrderCoefficients(algorithm, t, h);
  const m2 = outputs[k - 3]!;
  const s2 = alphaSigma(sigmas[i - 2]!);
  const h1 = s1.lambda - s2.lambda;
  const r1 = h1 / h;
  for (let e = 0; e < out.length; e++) {
    const a = m0[e]!;
    const b = m1[e]!;
    const d10 = (a - b) / r0;
    const d11 = (b - m2[e]!) / r1;
    const d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11);
    const d2 = (d10 - d11) / (r0 + r1);
    out[e] = cx * sample[e]! + c0 * a + c1 * d1 + c2 * d2 + (noise ? cn * noise[e]! : 0);
  }
  return out;
}
