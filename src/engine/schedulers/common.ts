/**
 * Numerics shared by the schedulers: config reading, small numpy/torch look-alikes, the training
 * noise schedule, the pieces setTimesteps builds inference schedules from, and the sigma-space
 * helpers (VP conversions, Euler-family input scaling, the forward processes of addNoise).
 *
 * diffusers builds its tables in float32 (torch) and moves them through numpy, and the values it
 * keeps (betas, alphas_cumprod, sigmas, timesteps) are float32. We reproduce those roundings with
 * Math.fround so schedules match diffusers to the bit where it matters (timesteps compared for
 * equality, sigma tables); the per-element step arithmetic runs in float64 and is rounded once.
 */
import type {
  BetaSchedule,
  FinalSigmasType,
  PredictionType,
  ResolvedSchedulerConfig,
  SchedulerConfig,
  TimestepSpacing,
} from './types.js';

export const f32 = Math.fround;

// ---------------------------------------------------------------------------------------------
// Config reading

/** Reads typed values out of a raw scheduler_config.json object; null/absent means default. */
export class ConfigReader {
  constructor(
    private readonly raw: SchedulerConfig,
    private readonly owner: string,
  ) {}

  private get(key: string): unknown {
    const v = this.raw[key];
    return v === null ? undefined : v;
  }

  private fail(key: string, want: string, got: unknown): never {
    throw new TypeError(`${this.owner}: config "${key}" must be ${want}, got ${JSON.stringify(got)}`);
  }

  number(key: string, def: number): number {
    const v = this.get(key);
    if (v === undefined) return def;
    if (typeof v !== 'number' || Number.isNaN(v)) this.fail(key, 'a number', v);
    return v;
  }

  /** Python configs may write `-inf` for lambda_min_clipped; JSON cannot, so accept strings too. */
  numberOrInf(key: string, def: number): number {
    const v = this.get(key);
    if (typeof v === 'string' && /^[-+]?inf(inity)?$/i.test(v.trim())) {
      return v.trim().startsWith('-') ? -Infinity : Infinity;
    }
    return this.number(key, def);
  }

  int(key: string, def: number): number {
    const v = this.number(key, def);
    if (!Number.isInteger(v)) this.fail(key, 'an integer', v);
    return v;
  }

  optionalNumber(key: string): number | null {
    const v = this.get(key);
    if (v === undefined) return null;
    if (typeof v !== 'number' || Number.isNaN(v)) this.fail(key, 'a number or null', v);
    return v;
  }

  bool(key: string, def: boolean): boolean {
    const v = this.get(key);
    if (v === undefined) return def;
    if (typeof v !== 'boolean') this.fail(key, 'a boolean', v);
    return v;
  }

  choice<T extends string>(key: string, def: T, allowed: readonly T[]): T {
    const v = this.get(key);
    if (v === undefined) return def;
    if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) {
      this.fail(key, `one of ${allowed.map((a) => `"${a}"`).join(', ')}`, v);
    }
    return v as T;
  }

  numberArray(key: string): number[] | null {
    const v = this.get(key);
    if (v === undefined) return null;
    if (!Array.isArray(v) || !v.every((x) => typeof x === 'number' && Number.isFinite(x))) {
      this.fail(key, 'an array of numbers', v);
    }
    return [...(v as number[])];
  }

  /** Throws when an option we do not implement is switched on; its off value is fine. */
  unsupportedIfSet(key: string, offValue: unknown = false): void {
    const v = this.get(key);
    if (v !== undefined && v !== offValue) {
      throw new Error(`${this.owner}: config "${key}" = ${JSON.stringify(v)} is not supported by Kiln`);
    }
  }
}

export const BETA_SCHEDULES: readonly BetaSchedule[] = ['linear', 'scaled_linear', 'squaredcos_cap_v2'];
export const PREDICTION_TYPES: readonly PredictionType[] = ['epsilon', 'v_prediction', 'sample'];
export const SPACINGS: readonly TimestepSpacing[] = ['linspace', 'leading', 'trailing'];
export const FINAL_SIGMAS: readonly FinalSigmasType[] = ['zero', 'sigma_min'];

/** The keys every class has, with the class's own defaults. */
export function readBase(
  r: ConfigReader,
  defaults: { beta_start: number; beta_end: number; beta_schedule: BetaSchedule },
  predictionTypes: readonly PredictionType[] = PREDICTION_TYPES,
): ResolvedSchedulerConfig {
  const num_train_timesteps = r.int('num_train_timesteps', 1000);
  if (num_train_timesteps < 2) throw new RangeError(`num_train_timesteps must be >= 2, got ${num_train_timesteps}`);
  const trained_betas = r.numberArray('trained_betas');
  if (trained_betas && trained_betas.length !== num_train_timesteps) {
    throw new RangeError(
      `trained_betas has ${trained_betas.length} entries but num_train_timesteps is ${num_train_timesteps}`,
    );
  }
  return {
    num_train_timesteps,
    beta_start: r.number('beta_start', defaults.beta_start),
    beta_end: r.number('beta_end', defaults.beta_end),
    beta_schedule: r.choice('beta_schedule', defaults.beta_schedule, BETA_SCHEDULES),
    trained_betas,
    prediction_type: r.choice('prediction_type', 'epsilon', predictionTypes),
  };
}

// ---------------------------------------------------------------------------------------------
// numpy / torch look-alikes

/** numpy's round(): exact halves go to the even neighbour (np.round(2.5) == 2). */
export function roundHalfEven(x: number): number {
  if (x - Math.floor(x) === 0.5) return 2 * Math.round(x / 2);
  return Math.round(x);
}

/** np.linspace in float64 (numpy multiplies index by step, then pins the endpoint). */
export function npLinspace(start: number, stop: number, num: number, endpoint = true): number[] {
  if (num <= 0) return [];
  const div = endpoint ? num - 1 : num;
  if (div === 0) return [start];
  const step = (stop - start) / div;
  const out = new Array<number>(num);
  for (let i = 0; i < num; i++) out[i] = i * step + start;
  if (endpoint) out[num - 1] = stop;
  return out;
}

/** np.arange for floats: length ceil((stop-start)/step); numpy fills with start + i*((start+step)-start). */
export function npArange(start: number, stop: number, step: number): number[] {
  const n = Math.max(0, Math.ceil((stop - start) / step));
  if (n === 0) return [];
  const delta = start + step - start;
  const out = new Array<number>(n);
  out[0] = start;
  for (let i = 1; i < n; i++) out[i] = start + i * delta;
  return out;
}

/** torch.linspace(..., dtype=float32) on CPU: float32 step, filled from both ends towards the middle. */
export function torchLinspaceF32(start: number, end: number, steps: number): Float64Array {
  const out = new Float64Array(steps);
  const s = f32(start);
  const e = f32(end);
  if (steps === 1) {
    out[0] = s;
    return out;
  }
  const step = f32(f32(e - s) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  for (let i = 0; i < steps; i++) {
    out[i] = i < halfway ? f32(s + f32(step * i)) : f32(e - f32(step * (steps - i - 1)));
  }
  return out;
}

/** np.interp(x, arange(fp.length), fp): linear interpolation, clamped at the ends. */
export function interpIndex(x: number, fp: ArrayLike<number>): number {
  const n = fp.length;
  if (x <= 0) return fp[0]!;
  if (x >= n - 1) return fp[n - 1]!;
  const j = Math.floor(x);
  const lo = fp[j]!;
  const hi = fp[j + 1]!;
  if (x === j) return lo;
  return (hi - lo) * (x - j) + lo;
}

/** Solves the small dense system A x = b (Gaussian elimination, partial pivoting). */
export function solveLinear(a: number[][], b: number[]): number[] {
  const n = b.length;
  const m = a.map((row, i) => [...row.slice(0, n), b[i]!]);
  for (let col = 0; col < n; col++) {
    let pivot = col;
    for (let r = col + 1; r < n; r++) if (Math.abs(m[r]![col]!) > Math.abs(m[pivot]![col]!)) pivot = r;
    [m[col], m[pivot]] = [m[pivot]!, m[col]!];
    const p = m[col]![col]!;
    if (p === 0) throw new Error('singular system in scheduler coefficients');
    for (let r = col + 1; r < n; r++) {
      const f = m[r]![col]! / p;
      for (let c = col; c <= n; c++) m[r]![c]! -= f * m[col]![c]!;
    }
  }
  const x = new Array<number>(n).fill(0);
  for (let r = n - 1; r >= 0; r--) {
    let s = m[r]![n]!;
    for (let c = r + 1; c < n; c++) s -= m[r]![c]! * x[c]!;
    x[r] = s / m[r]![r]!;
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Training noise schedule

/** Glide's cosine schedule (`squaredcos_cap_v2`), computed in float64 then stored as float32. */
function betasForAlphaBar(n: number, maxBeta = 0.999): Float64Array {
  const alphaBar = (t: number) => Math.cos(((t + 0.008) / 1.008) * (Math.PI / 2)) ** 2;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = f32(Math.min(1 - alphaBar((i + 1) / n) / alphaBar(i / n), maxBeta));
  return out;
}

/** Zero-terminal-SNR rescaling (arXiv 2305.08891, Algorithm 1), in float32 like diffusers. */
function rescaleZeroTerminalSnr(betas: Float64Array): Float64Array {
  const n = betas.length;
  const acp = cumprodF32(betas);
  const root = acp.map((a) => f32(Math.sqrt(a)));
  const first = root[0]!;
  const last = root[n - 1]!;
  const scale = f32(first / f32(first - last));
  const bar = root.map((v) => {
    const shifted = f32(f32(v - last) * scale);
    return f32(shifted * shifted);
  });
  const out = new Float64Array(n);
  out[0] = f32(1 - bar[0]!);
  for (let i = 1; i < n; i++) out[i] = f32(1 - f32(bar[i]! / bar[i - 1]!));
  return out;
}

/** cumprod(1 - betas) as torch does it on CPU: float32 inputs, double accumulator, float32 outputs. */
function cumprodF32(betas: Float64Array): Float64Array {
  const out = new Float64Array(betas.length);
  let acc = 1;
  for (let i = 0; i < betas.length; i++) {
    acc *= f32(1 - betas[i]!);
    out[i] = f32(acc);
  }
  return out;
}

export function makeBetas(cfg: ResolvedSchedulerConfig, rescaleZeroSnr: boolean): Float64Array {
  const n = cfg.num_train_timesteps;
  let betas: Float64Array;
  if (cfg.trained_betas) betas = Float64Array.from(cfg.trained_betas, f32);
  else if (cfg.beta_schedule === 'linear') betas = torchLinspaceF32(cfg.beta_start, cfg.beta_end, n);
  else if (cfg.beta_schedule === 'scaled_linear') {
    betas = torchLinspaceF32(Math.sqrt(cfg.beta_start), Math.sqrt(cfg.beta_end), n).map((b) => f32(b * b));
  } else betas = betasForAlphaBar(n);
  return rescaleZeroSnr ? rescaleZeroTerminalSnr(betas) : betas;
}

/** The training schedule tables every scheduler derives from. */
export interface NoiseTable {
  readonly betas: Float64Array;
  /** float32 values. */
  readonly alphasCumprod: Float64Array;
  /** sqrt((1 - acp) / acp) per training timestep, float32 values, increasing with t. */
  readonly sigmas: Float64Array;
  /** np.log of the float32 sigma table (a float32 result). */
  readonly logSigmas: Float64Array;
}

/**
 * @param pinLast set alphas_cumprod[-1] to 2^-24 after zero-SNR rescaling, as the sigma-based
 *   diffusers schedulers do (keeps the top sigma finite); DDIM and LCM do not.
 */
export function makeNoiseTable(cfg: ResolvedSchedulerConfig, rescaleZeroSnr: boolean, pinLast: boolean): NoiseTable {
  const betas = makeBetas(cfg, rescaleZeroSnr);
  const alphasCumprod = cumprodF32(betas);
  if (rescaleZeroSnr && pinLast) alphasCumprod[alphasCumprod.length - 1] = 2 ** -24;
  const sigmas = alphasCumprod.map((a) => f32(Math.sqrt(f32(f32(1 - a) / a))));
  const logSigmas = sigmas.map((s) => f32(Math.log(s)));
  return { betas, alphasCumprod, sigmas, logSigmas };
}

/** sigma of the first training timestep, the `sigma_min` final sigma (float32 like torch). */
export function firstTrainSigma(table: NoiseTable): number {
  const a = table.alphasCumprod[0]!;
  return f32(Math.sqrt(f32(f32(1 - a) / a)));
}

/** Karras et al. (2022) rho=7 ramp from sigmaMax down to sigmaMin, float64. */
export function karrasSigmas(sigmaMin: number, sigmaMax: number, n: number): number[] {
  const rho = 7;
  const minInv = sigmaMin ** (1 / rho);
  const maxInv = sigmaMax ** (1 / rho);
  return npLinspace(0, 1, n).map((ramp) => (maxInv + ramp * (minInv - maxInv)) ** rho);
}

/** Fractional training timestep whose log-sigma matches `sigma` (diffusers `_sigma_to_t`). */
export function sigmaToT(sigma: number, logSigmas: Float64Array): number {
  const logSigma = Math.log(Math.max(sigma, 1e-10));
  const n = logSigmas.length;
  // argmax of the running count of log_sigmas <= log_sigma: the last index where the count grows.
  let count = 0;
  let best = 0;
  let bestIdx = 0;
  for (let i = 0; i < n; i++) {
    if (logSigma - logSigmas[i]! >= 0) count++;
    if (count > best) {
      best = count;
      bestIdx = i;
    }
  }
  const lowIdx = Math.min(bestIdx, n - 2);
  const low = logSigmas[lowIdx]!;
  const high = logSigmas[lowIdx + 1]!;
  const w = Math.min(1, Math.max(0, (low - logSigma) / (low - high)));
  return (1 - w) * lowIdx + w * (lowIdx + 1);
}

/**
 * Index of `t` in `timesteps`, as diffusers' `index_for_timestep`: the second match when `t`
 * appears twice (so an img2img start does not skip a sigma).
 * @param missing `throw` (Euler, LCM) or `last` (DPM-Solver, UniPC fall back to the last index).
 */
export function indexForTimestep(timesteps: readonly number[], t: number, missing: 'throw' | 'last'): number {
  const hits: number[] = [];
  for (let i = 0; i < timesteps.length && hits.length < 2; i++) if (timesteps[i] === t) hits.push(i);
  if (hits.length === 0) {
    if (missing === 'last') return timesteps.length - 1;
    throw new RangeError(`timestep ${t} is not in the schedule (call setTimesteps and pass one of timesteps)`);
  }
  return hits.length > 1 ? hits[1]! : hits[0]!;
}

// ---------------------------------------------------------------------------------------------
// Argument checks

export function checkSteps(n: number, max?: number): void {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`numInferenceSteps must be a positive integer, got ${n}`);
  if (max !== undefined && n > max) {
    throw new RangeError(`numInferenceSteps ${n} cannot be larger than num_train_timesteps ${max}`);
  }
}

export function checkBeginIndex(index: number, length: number): void {
  if (!Number.isInteger(index) || index < 0 || index >= length) {
    throw new RangeError(`begin index must be an integer in [0, ${length - 1}], got ${index}`);
  }
}

export function checkSameLength(a: Float32Array, b: Float32Array, what: string): void {
  if (a.length !== b.length) throw new RangeError(`${what}: lengths differ (${a.length} vs ${b.length})`);
}

export function checkTrainTimestep(t: number, numTrain: number): void {
  if (!Number.isInteger(t) || t < 0 || t >= numTrain) {
    throw new RangeError(`timestep must be an integer in [0, ${numTrain - 1}], got ${t}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Inference schedules (setTimesteps)

/** All training timesteps, highest first: the schedule diffusers exposes before setTimesteps. */
export function trainTimesteps(numTrain: number): number[] {
  return npLinspace(0, numTrain - 1, numTrain).reverse();
}

/** The training timesteps spaced per `timestep_spacing` (Euler/Ancestral/DDIM flavour: N points). */
export function spacedTimesteps(
  spacing: TimestepSpacing,
  numTrain: number,
  n: number,
  stepsOffset: number,
  linspaceRound: boolean,
): number[] {
  if (spacing === 'linspace') {
    const ts = npLinspace(0, numTrain - 1, n).reverse();
    return linspaceRound ? ts.map(roundHalfEven) : ts;
  }
  if (spacing === 'leading') {
    const ratio = Math.floor(numTrain / n);
    const ts: number[] = [];
    for (let i = n - 1; i >= 0; i--) ts.push(i * ratio + stepsOffset);
    return ts;
  }
  return npArange(numTrain, 0, -numTrain / n).map((t) => roundHalfEven(t) - 1);
}

/**
 * DPM-Solver/UniPC flavour: linspace and leading take N+1 points and drop the last (t=0),
 * and the top of the range may be clipped (`lambda_min_clipped`).
 */
export function spacedTimestepsPlusOne(
  spacing: TimestepSpacing,
  numTrain: number,
  lastTimestep: number,
  n: number,
  stepsOffset: number,
): number[] {
  if (spacing === 'linspace') {
    return npLinspace(0, lastTimestep - 1, n + 1)
      .map(roundHalfEven)
      .reverse()
      .slice(0, n);
  }
  if (spacing === 'leading') {
    const ratio = Math.floor(lastTimestep / (n + 1));
    const ts: number[] = [];
    for (let i = n; i >= 1; i--) ts.push(i * ratio + stepsOffset);
    return ts;
  }
  return npArange(lastTimestep, 0, -numTrain / n).map((t) => roundHalfEven(t) - 1);
}

/** The training sigma at each (possibly fractional) timestep, interpolated linearly. */
export function sigmasForTimesteps(table: NoiseTable, timesteps: readonly number[]): number[] {
  return timesteps.map((t) => interpIndex(t, table.sigmas));
}

/** The fractional training timestep of each sigma (for Karras-style sigma ramps; callers round). */
export function timestepsForSigmas(table: NoiseTable, sigmas: readonly number[]): number[] {
  return sigmas.map((s) => sigmaToT(s, table.logSigmas));
}

/**
 * The sigmas a scheduler stores: float32, ending with the final sigma of `final_sigmas_type`,
 * 0 or `sigmaMin` (the smallest training sigma, or the bottom of a Karras ramp for UniPC).
 */
export function withFinalSigma(sigmas: readonly number[], type: FinalSigmasType, sigmaMin: number): number[] {
  return sigmas.concat(type === 'sigma_min' ? sigmaMin : 0).map(f32);
}

// ---------------------------------------------------------------------------------------------
// The VP process in Karras sigmas (DPM-Solver, UniPC)

/** alpha_t, sigma_t of the VP process at Karras sigma `s` (diffusers `_sigma_to_alpha_sigma_t`). */
export function alphaSigma(s: number): { alpha: number; sigma: number; lambda: number } {
  const alpha = 1 / Math.sqrt(s * s + 1);
  const sigma = s * alpha;
  return { alpha, sigma, lambda: Math.log(alpha) - Math.log(sigma) };
}

/**
 * The model output converted to what a VP solver integrates (diffusers `convert_model_output`):
 * the data prediction x0 when `toData`, else the noise prediction epsilon, at Karras sigma `sigma`.
 */
export function convertModelOutput(
  toData: boolean,
  prediction: PredictionType,
  sigma: number,
  modelOutput: Float32Array,
  sample: Float32Array,
): Float32Array {
  const { alpha, sigma: sigmaT } = alphaSigma(sigma);
  const out = new Float32Array(sample.length);
  for (let k = 0; k < out.length; k++) {
    const x = sample[k]!;
    const m = modelOutput[k]!;
    if (toData) {
      out[k] = prediction === 'epsilon' ? (x - sigmaT * m) / alpha : prediction === 'sample' ? m : alpha * x - sigmaT * m;
    } else {
      out[k] = prediction === 'epsilon' ? m : prediction === 'sample' ? (x - alpha * m) / sigmaT : alpha * m + sigmaT * x;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Karras sigmas as the Euler family uses them (Euler, Euler ancestral)

/** init_noise_sigma: the largest sigma, or sqrt(max^2 + 1) for `leading` spacing (diffusers' quirk). */
export function karrasInitNoiseSigma(sigmas: readonly number[], spacing: TimestepSpacing): number {
  const max = Math.max(...sigmas);
  return spacing === 'linspace' || spacing === 'trailing' ? max : f32(Math.sqrt(f32(f32(max * max) + 1)));
}

/** The model input at sigma: sample / sqrt(sigma^2 + 1), the divisor rounded to float32 as torch does. */
export function scaleInputAtSigma(sample: Float32Array, sigma: number): Float32Array {
  const scale = f32(Math.sqrt(f32(f32(sigma * sigma) + 1)));
  return sample.map((x) => x / scale);
}

// ---------------------------------------------------------------------------------------------
// Forward processes (addNoise)

/** Karras form x + sigma * noise (Euler family), the product rounded to float32 as torch does. */
export function addNoiseAtSigma(original: Float32Array, noise: Float32Array, sigma: number): Float32Array {
  return original.map((x, k) => x + f32(noise[k]! * sigma));
}

/** VP form alpha_t x + sigma_t noise at Karras sigma `s` (DPM-Solver, UniPC). */
export function addNoiseVp(original: Float32Array, noise: Float32Array, s: number): Float32Array {
  const { alpha, sigma } = alphaSigma(s);
  return original.map((x, k) => alpha * x + sigma * noise[k]!);
}

/** The DDPM forward process sqrt(acp[t]) x + sqrt(1 - acp[t]) noise (DDIM, LCM). */
export function ddpmAddNoise(
  alphasCumprod: Float64Array,
  numTrain: number,
  original: Float32Array,
  noise: Float32Array,
  t: number,
): Float32Array {
  checkSameLength(original, noise, 'addNoise');
  checkTrainTimestep(t, numTrain);
  const a = alphasCumprod[t]!;
  const sa = Math.sqrt(a);
  const sb = Math.sqrt(1 - a);
  return original.map((x, k) => sa * x + sb * noise[k]!);
}
