/**
 * DPM-Solver(++) pieces shared by the multistep and single-step schedulers: config reading, the
 * model-output conversion, lambda clipping of the schedule, and the update coefficients
 * (Lu et al. 2022) as diffusers writes them. The schedulers differ in which model outputs feed
 * an update and where it starts; that stays in their own files.
 */
import { ConfigReader, alphaSigma, convertModelOutput, f32, type NoiseTable } from './common.js';
import type { PredictionType } from './types.js';

export type DpmAlgorithm = 'dpmsolver++' | 'dpmsolver' | 'sde-dpmsolver++' | 'sde-dpmsolver';
export type DpmSolverType = 'midpoint' | 'heun';
type AlphaSigma = ReturnType<typeof alphaSigma>;

/** diffusers maps other schedulers' values onto its own when a config is shared (from_config). */
export function readDpmAlgorithm(r: ConfigReader, allowed: readonly DpmAlgorithm[]): DpmAlgorithm {
  const v = r.choice('algorithm_type', 'dpmsolver++', [...allowed, 'deis'] as const);
  return v === 'deis' ? 'dpmsolver++' : v;
}

export function readDpmSolverType(r: ConfigReader): DpmSolverType {
  const v = r.choice('solver_type', 'midpoint', ['midpoint', 'heun', 'logrho', 'bh1', 'bh2'] as const);
  return v === 'midpoint' || v === 'heun' ? v : 'midpoint';
}

/** Reject options we do not implement. */
export function rejectUnsupportedDpmOptions(r: ConfigReader): void {
  r.unsupportedIfSet('variance_type', undefined);
  r.unsupportedIfSet('use_exponential_sigmas');
  r.unsupportedIfSet('use_beta_sigmas');
  r.unsupportedIfSet('use_flow_sigmas');
  r.unsupportedIfSet('use_dynamic_shifting');
}

/** What the solver integrates: x0 for the ++ variants, epsilon for the others. */
export function convertDpmOutput(
  algorithm: DpmAlgorithm,
  prediction: PredictionType,
  sigma: number,
  modelOutput: Float32Array,
  sample: Float32Array,
): Float32Array {
  const dataPrediction = algorithm === 'dpmsolver++' || algorithm === 'sde-dpmsolver++';
  return convertModelOutput(dataPrediction, prediction, sigma, modelOutput, sample);
}

/** The x0 prediction (pred_original_sample): `converted` itself for the ++ variants, else converted anew. */
export function dataPrediction(
  algorithm: DpmAlgorithm,
  prediction: PredictionType,
  sigma: number,
  modelOutput: Float32Array,
  sample: Float32Array,
  converted: Float32Array,
): Float32Array {
  if (algorithm === 'dpmsolver++' || algorithm === 'sde-dpmsolver++') return converted;
  return convertModelOutput(true, prediction, sigma, modelOutput, sample);
}

/**
 * One past the highest training timestep the schedule may start from: the top timesteps whose
 * lambda = log(alpha_t) - log(sigma_t) (float32, as diffusers' lambda_t) falls below
 * `lambda_min_clipped` are cut off.
 */
export function lambdaClippedEnd(table: NoiseTable, lambdaMinClipped: number): number {
  const lambda = (a: number) => f32(f32(Math.log(f32(Math.sqrt(a)))) - f32(Math.log(f32(Math.sqrt(f32(1 - a))))));
  let end = table.alphasCumprod.length;
  while (end > 0 && lambda(table.alphasCumprod[end - 1]!) < lambdaMinClipped) end--;
  return end;
}

/**
 * The first-order part of an update from `s` to `t` (h = lambda_t - lambda_s):
 * x_t = cx * x_s + c0 * D0 + cn * noise, with cn = 0 for the ODE solvers.
 */
export function firstOrderCoefficients(
  algorithm: DpmAlgorithm,
  t: AlphaSigma,
  s: AlphaSigma,
  h: number,
): { cx: number; c0: number; cn: number } {
  if (algorithm === 'dpmsolver++') return { cx: t.sigma / s.sigma, c0: -t.alpha * Math.expm1(-h), cn: 0 };
  if (algorithm === 'sde-dpmsolver++') {
    return {
      cx: (t.sigma / s.sigma) * Math.exp(-h),
      c0: -t.alpha * Math.expm1(-2 * h),
      cn: t.sigma * Math.sqrt(-Math.expm1(-2 * h)),
    };
  }
  const sde = algorithm === 'sde-dpmsolver';
  return {
    cx: t.alpha / s.alpha,
    c0: -(sde ? 2 : 1) * t.sigma * Math.expm1(h),
    cn: sde ? t.sigma * Math.sqrt(Math.expm1(2 * h)) : 0,
  };
}

/** The coefficient of the first difference D1 in a second-order update (c0 from firstOrderCoefficients). */
export function secondOrderCoefficient(
  algorithm: DpmAlgorithm,
  solverType: DpmSolverType,
  t: AlphaSigma,
  h: number,
  c0: number,
): number {
  const midpoint = solverType === 'midpoint';
  if (algorithm === 'dpmsolver++') return midpoint ? 0.5 * c0 : t.alpha * (Math.expm1(-h) / h + 1);
  if (algorithm === 'sde-dpmsolver++') return midpoint ? 0.5 * c0 : t.alpha * (-Math.expm1(-2 * h) / (-2 * h) + 1);
  if (algorithm === 'sde-dpmsolver') {
    return midpoint ? -t.sigma * Math.expm1(h) : -2 * t.sigma * (Math.expm1(h) / h - 1);
  }
  return midpoint ? 0.5 * c0 : -t.sigma * (Math.expm1(h) / h - 1);
}

/** The coefficients of D1 and D2 in a third-order update (there is none for sde-dpmsolver). */
export function thirdOrderCoefficients(algorithm: DpmAlgorithm, t: AlphaSigma, h: number): { c1: number; c2: number } {
  if (algorithm === 'sde-dpmsolver') {
    throw new Error('third-order sde-dpmsolver is not defined (diffusers has no such update)');
  }
  if (algorithm === 'dpmsolver++') {
    return { c1: t.alpha * (Math.expm1(-h) / h + 1), c2: -t.alpha * ((Math.expm1(-h) + h) / (h * h) - 0.5) };
  }
  if (algorithm === 'sde-dpmsolver++') {
    return {
      c1: t.alpha * (-Math.expm1(-2 * h) / (-2 * h) + 1),
      c2: t.alpha * ((-Math.expm1(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5),
    };
  }
  return { c1: -t.sigma * (Math.expm1(h) / h - 1), c2: -t.sigma * ((Math.expm1(h) - h) / (h * h) - 0.5) };
}
