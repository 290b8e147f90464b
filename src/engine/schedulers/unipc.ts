/**
 * UniPCMultistepScheduler (Zhao et al. 2023): a multistep predictor (UniP) followed, on the next
 * call, by a corrector (UniC) that reuses the new model output. As diffusers implements it.
 *
 * Supported: predict_x0 true/false, solver_type bh1/bh2, orders 1-3 (higher orders work too),
 * lower_order_final, disable_corrector, Karras sigmas (with sigma_min/sigma_max), all spacings,
 * final_sigmas_type. Not implemented: solver_p, exponential/beta/flow sigmas, dynamic
 * thresholding (ignored).
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
  convertModelOutput,
  firstTrainSigma,
  karrasSigmas,
  makeNoiseTable,
  readBase,
  roundHalfEven,
  sigmasForTimesteps,
  solveLinear,
  spacedTimestepsPlusOne,
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

export interface UniPCMultistepConfig extends ResolvedSchedulerConfig {
  readonly solver_order: number;
  readonly thresholding: boolean;
  readonly predict_x0: boolean;
  readonly solver_type: 'bh1' | 'bh2';
  readonly lower_order_final: boolean;
  readonly disable_corrector: readonly number[];
  readonly use_karras_sigmas: boolean;
  readonly sigma_min: number | null;
  readonly sigma_max: number | null;
  readonly timestep_spacing: TimestepSpacing;
  readonly steps_offset: number;
  readonly final_sigmas_type: FinalSigmasType;
  readonly rescale_betas_zero_snr: boolean;
}

export class UniPCMultistepScheduler extends IndexedScheduler implements Scheduler {
  readonly name = 'UniPCMultistepScheduler';
  readonly order = 1;
  readonly config: UniPCMultistepConfig;
  readonly initNoiseSigma = 1;
  timesteps: number[];
  /** float32 sigmas, one per timestep plus the final one. */
  sigmas: number[];
  lastPredOriginal: Float32Array | undefined;
  private readonly table: NoiseTable;
  private modelOutputs: (Float32Array | null)[];
  private lowerOrderNums = 0;
  private thisOrder = 1;
  /** The sample the last predictor started from (the corrector re-solves that step). */
  private lastSample: Float32Array | null = null;
  private numInferenceSteps: number | null = null;

  constructor(raw: SchedulerConfig = {}) {
    super('last');
    const r = new ConfigReader(raw, this.name);
    r.unsupportedIfSet('solver_p', undefined);
    r.unsupportedIfSet('use_exponential_sigmas');
    r.unsupportedIfSet('use_beta_sigmas');
    r.unsupportedIfSet('use_flow_sigmas');
    r.unsupportedIfSet('use_dynamic_shifting');
    // DPM-Solver/DEIS solver types map to bh2 when configs are shared, as in diffusers.
    const solverType = r.choice('solver_type', 'bh2', ['bh1', 'bh2', 'midpoint', 'heun', 'logrho'] as const);
    const disable = r.numberArray('disable_corrector') ?? [];
    this.config = {
      ...readBase(r, { beta_start: 0.0001, beta_end: 0.02, beta_schedule: 'linear' }),
      solver_order: r.int('solver_order', 2),
      thresholding: r.bool('thresholding', false),
      predict_x0: r.bool('predict_x0', true),
      solver_type: solverType === 'bh1' ? 'bh1' : 'bh2',
      lower_order_final: r.bool('lower_order_final', true),
      disable_corrector: disable,
      use_karras_sigmas: r.bool('use_karras_sigmas', false),
      sigma_min: r.optionalNumber('sigma_min'),
      sigma_max: r.optionalNumber('sigma_max'),
      timestep_spacing: r.choice('timestep_spacing', 'linspace', SPACINGS),
      steps_offset: r.int('steps_offset', 0),
      final_sigmas_type: r.choice('final_sigmas_type', 'zero', FINAL_SIGMAS),
      rescale_betas_zero_snr: r.bool('rescale_betas_zero_snr', false),
    };
    if (this.config.solver_order < 1) throw new RangeError('solver_order must be >= 1');
    this.table = makeNoiseTable(this.config, this.config.rescale_betas_zero_snr, true);
    const n = this.config.num_train_timesteps;
    this.timesteps = trainTimesteps(n);
    this.sigmas = [...this.table.sigmas];
    this.modelOutputs = new Array(this.config.solver_order).fill(null);
  }

  setTimesteps(numInferenceSteps: number): void {
    checkSteps(numInferenceSteps);
    const cfg = this.config;
    const T = cfg.num_train_timesteps;
    let timesteps = spacedTimestepsPlusOne(cfg.timestep_spacing, T, T, numInferenceSteps, cfg.steps_offset);
    let sigmas: number[];
    if (cfg.use_karras_sigmas) {
      sigmas = karrasSigmas(cfg.sigma_min ?? this.table.sigmas[0]!, cfg.sigma_max ?? this.table.sigmas[T - 1]!, numInferenceSteps);
      timesteps = timestepsForSigmas(this.table, sigmas).map(roundHalfEven);
    } else {
      sigmas = sigmasForTimesteps(this.table, timesteps);
    }
    // With Karras sigmas "sigma_min" means the bottom of the ramp, not the training schedule's.
    const sigmaMin = cfg.use_karras_sigmas ? sigmas.at(-1)! : firstTrainSigma(this.table);
    this.sigmas = withFinalSigma(sigmas, cfg.final_sigmas_type, sigmaMin);
    this.timesteps = timesteps;
    this.numInferenceSteps = timesteps.length;
    this.modelOutputs = new Array(cfg.solver_order).fill(null);
    this.lowerOrderNums = 0;
    this.lastSample = null;
    this.resetStepIndex();
  }

  scaleModelInput(sample: Float32Array, _t: number): Float32Array {
    return sample;
  }

  step(modelOutput: Float32Array, t: number, sample: Float32Array, _rng?: Rng): Float32Array {
    checkSameLength(modelOutput, sample, 'UniPCMultistepScheduler.step');
    if (this.numInferenceSteps === null) throw new Error(`${this.name}.step: call setTimesteps first`);
    const cfg = this.config;
    const i = this.currentStepIndex(t);
    const n = this.timesteps.length;
    if (i >= n) throw new RangeError('step called past the end of the schedule');

    const useCorrector = i > 0 && !cfg.disable_corrector.includes(i - 1) && this.lastSample !== null;
    const converted = convertModelOutput(cfg.predict_x0, cfg.prediction_type, this.sigmas[i]!, modelOutput, sample);
    this.lastPredOriginal = cfg.predict_x0 ? converted : convertModelOutput(true, cfg.prediction_type, this.sigmas[i]!, modelOutput, sample);
    let x = sample;
    if (useCorrector) x = this.correct(converted, this.lastSample!, sample, this.thisOrder, i);

    this.modelOutputs.shift();
    this.modelOutputs.push(converted);

    const planned = cfg.lower_order_final ? Math.min(cfg.solver_order, n - i) : cfg.solver_order;
    this.thisOrder = Math.min(planned, this.lowerOrderNums + 1); // warm up through the first steps
    this.lastSample = x === sample ? Float32Array.from(sample) : x;
    const prev = this.predict(x, this.thisOrder, i);
    if (this.lowerOrderNums < cfg.solver_order) this.lowerOrderNums++;
    this.stepIdx = i + 1;
    return prev;
  }

  /**
   * The B(h) coefficient tables shared by predictor and corrector: phi-function moments `b`
   * against powers of the step ratios `rks` (the last rk is 1).
   */
  private coefficients(h: number, rks: number[], order: number) {
    const hh = this.config.predict_x0 ? -h : h;
    const hPhi1 = Math.expm1(hh);
    const bH = this.config.solver_type === 'bh1' ? hh : Math.expm1(hh);
    let hPhiK = hPhi1 / hh - 1;
    let factorial = 1;
    const R: number[][] = [];
    const b: number[] = [];
    for (let j = 1; j <= order; j++) {
      R.push(rks.map((rk) => rk ** (j - 1)));
      b.push((hPhiK * factorial) / bH);
      factorial *= j + 1;
      hPhiK = hPhiK / hh - 1 / factorial;
    }
    return { hPhi1, bH, R, b };
  }

  /** Differences D1_k = (m_k - m0) / r_k of older outputs against m0, with their ratios r_k. */
  private history(h: number, lambda0: number, order: number, sigmaIndexOf: (j: number) => number) {
    const k = this.modelOutputs.length;
    const m0 = this.modelOutputs[k - 1]!;
    const rks: number[] = [];
    const d1s: Float32Array[] = [];
    for (let j = 1; j < order; j++) {
      const mj = this.modelOutputs[k - 1 - j]!;
      const rk = (alphaSigma(this.sigmas[sigmaIndexOf(j)]!).lambda - lambda0) / h;
      rks.push(rk);
      d1s.push(mj.map((v, e) => (v - m0[e]!) / rk));
    }
    rks.push(1);
    return { m0, rks, d1s };
  }

  /** UniP: predicts the sample at sigmas[i+1] from `x` at sigmas[i]. */
  private predict(x: Float32Array, order: number, i: number): Float32Array {
    const t = alphaSigma(this.sigmas[i + 1]!);
    const s0 = alphaSigma(this.sigmas[i]!);
    const h = t.lambda - s0.lambda;
    const { m0, rks, d1s } = this.history(h, s0.lambda, order, (j) => i - j);
    const { hPhi1, bH, R, b } = this.coefficients(h, rks, order);
    let rhos: number[] = [];
    if (d1s.length > 0) {
      rhos = order === 2 ? [0.5] : solveLinear(R.slice(0, -1).map((row) => row.slice(0, -1)), b.slice(0, -1));
    }
    return this.combine(x, m0, t, s0, hPhi1, bH, d1s, rhos, null, 0);
  }

  /** UniC: re-solves the step sigmas[i-1] -> sigmas[i] using the new output `modelT`. */
  private correct(modelT: Float32Array, last: Float32Array, current: Float32Array, order: number, i: number): Float32Array {
    checkSameLength(last, current, 'UniPC corrector');
    const t = alphaSigma(this.sigmas[i]!);
    const s0 = alphaSigma(this.sigmas[i - 1]!);
    const h = t.lambda - s0.lambda;
    const { m0, rks, d1s } = this.history(h, s0.lambda, order, (j) => i - (j + 1));
    const { hPhi1, bH, R, b } = this.coefficients(h, rks, order);
    const rhos = order === 1 ? [0.5] : solveLinear(R, b);
    return this.combine(last, m0, t, s0, hPhi1, bH, d1s, rhos.slice(0, -1), modelT, rhos.at(-1)!);
  }

  /** x_t = base(x, m0) - c * B(h) * (sum rho_k D1_k + rhoT (modelT - m0)), per element. */
  private combine(
    x: Float32Array,
    m0: Float32Array,
    t: { alpha: number; sigma: number },
    s0: { alpha: number; sigma: number },
    hPhi1: number,
    bH: number,
    d1s: Float32Array[],
    rhos: number[],
    modelT: Float32Array | null,
    rhoT: number,
  ): Float32Array {
    const x0 = this.config.predict_x0;
    const cx = x0 ? t.sigma / s0.sigma : t.alpha / s0.alpha;
    const scale = x0 ? t.alpha : t.sigma;
    const cm = -scale * hPhi1;
    const cres = -scale * bH;
    const out = new Float32Array(x.length);
    for (let e = 0; e < out.length; e++) {
      let res = 0;
      for (let j = 0; j < d1s.length; j++) res += rhos[j]! * d1s[j]![e]!;
      if (modelT) res += rhoT * (modelT[e]! - m0[e]!);
      out[e] = cx * x[e]! + cm * m0[e]! + cres * res;
    }
    return out;
  }

  addNoise(original: Float32Array, noise: Float32Array, t: number): Float32Array {
    checkSameLength(original, noise, 'UniPCMultistepScheduler.addNoise');
    return addNoiseVp(original, noise, this.sigmas[this.noiseIndex(t)]!);
  }
}
