/**
 * DPMSolverSinglestepScheduler: DPM-Solver(++) where each order-k update restarts from the sample
 * k steps back, using the model outputs gathered since (diffusers' implementation). Timesteps are
 * always linspace-spaced (the class has no timestep_spacing option).
 *
 * Supported: dpmsolver++ / dpmsolver / sde-dpmsolver++ (draws `sample.length` normals per step),
 * orders 1-3, midpoint/heun, Karras sigmas, final_sigmas_type, lower_order_final,
 * lambda_min_clipped. Not implemented: variance_type, exponential/beta/flow sigmas, dynamic
 * thresholding (ignored).
 */
import type { Rng } from '../rng.js';
import {
  ConfigReader,
  FINAL_SIGMAS,
  addNoiseVp,
  alphaSigma,
  checkSameLength,
  checkSteps,
  firstTrainSigma,
  karrasSigmas,
  makeNoiseTable,
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
  type DpmSolverType,
} from './dpm-solver.js';
import { IndexedScheduler } from './step-index.js';
import type { FinalSigmasType, ResolvedSchedulerConfig, Scheduler, SchedulerConfig } from './types.js';

export interface DPMSolverSinglestepConfig extends ResolvedSchedulerConfig {
  readonly solver_order: number;
  readonly thresholding: boolean;
  readonly algorithm_type: 'dpmsolver++' | 'dpmsolver' | 'sde-dpmsolver++';
  readonly solver_type: DpmSolverType;
  /** May be switched on by setTimesteps, as diffusers does (uneven step counts, zero final sigma). */
  readonly lower_order_final: boolean;
  readonly use_karras_sigmas: boolean;
  readonly final_sigmas_type: FinalSigmasType;
  readonly lambda_min_clipped: number;
}

/** The solver order used at each step (diffusers `get_order_list`). */
export function singlestepOrders(steps: number, order: number, lowerOrderFinal: boolean, zeroFinal: boolean): number[] {
  const repeat = (pattern: number[], times: number) => Array.from({ length: Math.max(0, times) }, () => pattern).flat();
  let orders: number[];
  if (order === 1) orders = new Array<number>(steps).fill(1);
  else if (!lowerOrderFinal) orders = repeat(order === 3 ? [1, 2, 3] : [1, 2], Math.floor(steps / order));
  else if (order === 3) {
    const q = Math.floor(steps / 3);
    if (steps % 3 === 0) orders = [...repeat([1, 2, 3], q - 1), 1, 2, 1];
    else if (steps % 3 === 1) orders = [...repeat([1, 2, 3], q), 1];
    else orders = [...repeat([1, 2, 3], q), 1, 2];
  } else {
    const q = Math.floor(steps / 2);
    orders = steps % 2 === 0 ? [...repeat([1, 2], q - 1), 1, 1] : [...repeat([1, 2], q), 1];
  }
  if (zeroFinal && orders.length > 0) orders[orders.length - 1] = 1;
  return orders;
}

export class DPMSolverSinglestepScheduler extends IndexedScheduler implements Scheduler {
  readonly name = 'DPMSolverSinglestepScheduler';
  readonly order = 1;
  config: DPMSolverSinglestepConfig;
  readonly initNoiseSigma = 1;
  timesteps: number[];
  /** float32 sigmas, one per timestep plus the final one. */
  sigmas: number[];
  /** Solver order at each step index. */
  orderList: number[];
  private readonly table: NoiseTable;
  lastPredOriginal: Float32Array | undefined;
  private modelOutputs: (Float32Array | null)[];
  /** The sample the current multi-step update started from. */
  private anchor: Float32Array | null = null;
  private numInferenceSteps: number | null = null;

  constructor(raw: SchedulerConfig = {}) {
    super('last');
    const r = new ConfigReader(raw, this.name);
    rejectUnsupportedDpmOptions(r);
    const cfg: DPMSolverSinglestepConfig = {
      ...readBase(r, { beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' }),
      solver_order: r.int('solver_order', 2),
      thresholding: r.bool('thresholding', false),
      algorithm_type: readDpmAlgorithm(r, ['dpmsolver++', 'dpmsolver', 'sde-dpmsolver++']) as DPMSolverSinglestepConfig['algorithm_type'],
      solver_type: readDpmSolverType(r),
      lower_order_final: r.bool('lower_order_final', false),
      use_karras_sigmas: r.bool('use_karras_sigmas', false),
      final_sigmas_type: r.choice('final_sigmas_type', 'zero', FINAL_SIGMAS),
      lambda_min_clipped: r.numberOrInf('lambda_min_clipped', -Infinity),
    };
    if (cfg.solver_order < 1 || cfg.solver_order > 3) throw new RangeError(`solver_order must be 1, 2 or 3`);
    if (cfg.algorithm_type === 'dpmsolver' && cfg.final_sigmas_type === 'zero') {
      throw new Error(`${this.name}: final_sigmas_type "zero" needs algorithm_type dpmsolver++ or sde-dpmsolver++`);
    }
    this.config = cfg;
    this.table = makeNoiseTable(cfg, false, false);
    const n = cfg.num_train_timesteps;
    this.timesteps = trainTimesteps(n);
    this.sigmas = [...this.table.sigmas];
    this.modelOutputs = new Array(cfg.solver_order).fill(null);
    this.orderList = singlestepOrders(n, cfg.solver_order, cfg.lower_order_final, cfg.final_sigmas_type === 'zero');
  }

  setTimesteps(numInferenceSteps: number): void {
    checkSteps(numInferenceSteps);
    const T = this.config.num_train_timesteps;
    const lastTimestep = lambdaClippedEnd(this.table, this.config.lambda_min_clipped);
    let timesteps = spacedTimestepsPlusOne('linspace', T, lastTimestep, numInferenceSteps, 0); // no spacing option
    let sigmas: number[];
    if (this.config.use_karras_sigmas) {
      sigmas = karrasSigmas(this.table.sigmas[0]!, this.table.sigmas[T - 1]!, numInferenceSteps);
      timesteps = timestepsForSigmas(this.table, sigmas).map(roundHalfEven);
    } else {
      sigmas = sigmasForTimesteps(this.table, timesteps);
    }
    this.sigmas = withFinalSigma(sigmas, this.config.final_sigmas_type, firstTrainSigma(this.table));
    this.timesteps = timesteps;
    this.numInferenceSteps = numInferenceSteps;
    this.modelOutputs = new Array(this.config.solver_order).fill(null);
    this.anchor = null;
    // diffusers rewrites its config here; an uneven pattern or a zero final sigma needs the
    // low-order ending.
    if (
      !this.config.lower_order_final &&
      (numInferenceSteps % this.config.solver_order !== 0 || this.config.final_sigmas_type === 'zero')
    ) {
      this.config = { ...this.config, lower_order_final: true };
    }
    this.orderList = singlestepOrders(
      numInferenceSteps,
      this.config.solver_order,
      this.config.lower_order_final,
      this.config.final_sigmas_type === 'zero',
    );
    this.resetStepIndex();
  }

  scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return sample;
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array, rng?: Rng): Float32Array {
    checkSameLength(modelOutput, sample, 'DPMSolverSinglestepScheduler.step');
    if (this.numInferenceSteps === null) throw new Error(`${this.name}.step: call setTimesteps first`);
    const cfg = this.config;
    const i = this.currentStepIndex(t);
    if (i >= this.timesteps.length) throw new RangeError('step called past the end of the schedule');

    const converted = convertDpmOutput(cfg.algorithm_type, cfg.prediction_type, this.sigmas[i]!, modelOutput, sample);
    this.lastPredOriginal = dataPrediction(cfg.algorithm_type, cfg.prediction_type, this.sigmas[i]!, modelOutput, sample, converted);
    this.modelOutputs.shift();
    this.modelOutputs.push(converted);

    let noise: Float32Array | null = null;
    if (cfg.algorithm_type === 'sde-dpmsolver++') {
      if (!rng) throw new Error(`${this.name}: algorithm_type sde-dpmsolver++ needs an rng`);
      noise = rng.normals(sample.length);
    }

    let order = this.orderList[i] ?? 1;
    // Starting mid-schedule (img2img) there may be too few outputs for the planned order.
    while (this.modelOutputs[this.modelOutputs.length - order] === null) order--;
    // Each update restarts from the sample where its order-1 step began; keep a private copy.
    if (order === 1) this.anchor = Float32Array.from(sample);

    const prev = singlestepUpdate(cfg.algorithm_type, cfg.solver_type, order, this.sigmas, i, this.modelOutputs, this.anchor!, noise);
    this.stepIdx = i + 1;
    return prev;
  }

  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array {
    checkSameLength(original, noise, 'DPMSolverSinglestepScheduler.addNoise');
    return addNoiseVp(original, noise, this.sigmas[this.noiseIndex(t)]!);
  }
}

/** Update from sigmas[i+1-order] (where `anchor` was) to sigmas[i+1]. */
function singlestepUpdate(
  algorithm: DPMSolverSinglestepConfig['algorithm_type'],
  solverType: DpmSolverType,
  order: number,
  sigmas: readonly number[],
  i: number,
  outputs: readonly (Float32Array | null)[],
  anchor: Float32Array,
  noise: Float32Array | null,
): Float32Array {
  const k = outputs.length;
  const t = alphaSigma(sigmas[i + 1]!);
  const s = alphaSigma(sigmas[i + 1 - order]!); // the anchor's sigma
  const h = t.lambda - s.lambda;
  const { cx, c0, cn } = firstOrderCoefficients(algorithm, t, s, h);
  const out = new Float32Array(anchor.length);
  const nz = (e: number) => (noise ? cn * noise[e]! : 0);

  if (order === 1) {
    const m = outputs[k - 1]!;
    for (let e = 0; e < out.length; e++) out[e] = cx * anchor[e]! + c0 * m[e]! + nz(e);
    return out;
  }

  if (order === 2) {
    // D0 = m1 (at the anchor), D1 = (m0 - m1) / r0 with r0 = (lambda_s0 - lambda_s1) / h.
    const m0 = outputs[k - 1]!;
    const m1 = outputs[k - 2]!;
    const s0 = alphaSigma(sigmas[i]!);
    const r0 = (s0.lambda - s.lambda) / h;
    const c1r = secondOrderCoefficient(algorithm, solverType, t, h, c0) / r0;
    for (let e = 0; e < out.length; e++) {
      const b = m1[e]!;
      out[e] = cx * anchor[e]! + c0 * b + c1r * (m0[e]! - b) + nz(e);
    }
    return out;
  }

  // Third order: D0 = m2 (at the anchor); midpoint uses D1_1 only, heun uses D1 and D2.
  const m0 = outputs[k - 1]!;
  const m1 = outputs[k - 2]!;
  const m2 = outputs[k - 3]!;
  const s0 = alphaSigma(sigmas[i]!);
  const s1 = alphaSigma(sigmas[i - 1]!);
  const r0 = (s0.lambda - s.lambda) / h;
  const r1 = (s1.lambda - s.lambda) / h;
  const { c1, c2 } = thirdOrderCoefficients(algorithm, t, h);
  const midpoint = solverType === 'midpoint';
  for (let e = 0; e < out.length; e++) {
    const base = m2[e]!;
    const d10 = (m1[e]! - base) / r1;
    const d11 = (m0[e]! - base) / r0;
    let rest: number;
    if (midpoint) rest = c1 * d11;
    else {
      const d1 = (r0 * d10 - r1 * d11) / (r0 - r1);
      const d2 = (2 * (d11 - d10)) / (r0 - r1);
      rest = c1 * d1 + c2 * d2;
    }
    out[e] = cx * anchor[e]! + c0 * base + rest + nz(e);
  }
  return out;
}
