/**
 * How long jobs take, for `retry-after`: a job's work is its denoising steps times its
 * megapixels (what the UNet's time scales with), and a job takes `work x rate` milliseconds.
 * The rate comes from measurement as soon as there is any: the jobs that finished (their
 * generation time over their effective steps and size), else the steps of a job still running;
 * before that, from a prior the server derives from the model (its UNet's size).
 */
import { DEFAULT_STEPS, qualityTier, type QualityTier } from '../engine/presets.js';
import type { JobOutput, JobSpec } from './types.js';

/** Milliseconds per step and megapixel when nothing better is known (a small model on a few CPU cores). */
export const DEFAULT_MS_PER_STEP_MP = 1000;

/** Megapixels of a `WxH` size (1 when it cannot be read). */
export function megapixels(size: string): number {
  const m = /^\s*(\d+)\s*x\s*(\d+)\s*$/i.exec(size);
  return m ? (Number(m[1]) * Number(m[2])) / 2 ** 20 : 1;
}

function tierOf(quality: string | undefined): QualityTier {
  try {
    return qualityTier(quality);
  } catch {
    return 'smooth';
  }
}

export class RunTimeEstimator {
  /** Learned from finished jobs (moving average); undefined until one has finished. */
  private msPerWork: number | undefined;
  /** The steps a quality tier turned out to mean, per model (distilled models take fewer). */
  private readonly stepsByTier = new Map<string, number>();

  constructor(private readonly prior: (spec: JobSpec) => number = () => DEFAULT_MS_PER_STEP_MP) {}

  steps(spec: JobSpec): number {
    if (spec.options.steps !== undefined) return spec.options.steps;
    const tier = tierOf(spec.options.quality);
    return this.stepsByTier.get(`${spec.model}\n${tier}`) ?? DEFAULT_STEPS.full[tier];
  }

  work(spec: JobSpec): number {
    return this.steps(spec) * megapixels(spec.options.size);
  }

  /** Learns from a job that finished: its generation time (without model loading) over its work. */
  finished(spec: JobSpec, output: JobOutput, runMs: number): void {
    const settings = output.settings;
    if (spec.options.steps === undefined && settings?.steps > 0) {
      this.stepsByTier.set(`${spec.model}\n${tierOf(spec.options.quality)}`, settings.steps);
    }
    const work = settings?.steps > 0 && settings.width > 0 ? (settings.steps * settings.width * settings.height) / 2 ** 20 : this.work(spec);
    const ms = output.timings?.totalMs > 0 ? output.timings.totalMs : runMs;
    if (!(work > 0) || !(ms > 0)) return;
    const rate = ms / work;
    this.msPerWork = this.msPerWork === undefined ? rate : this.msPerWork * 0.6 + rate * 0.4;
  }

  /** Milliseconds per unit of work: measured if any job finished, else `live` (running jobs' steps), else the prior. */
  rate(spec: JobSpec, live?: number): number {
    return this.msPerWork ?? live ?? this.prior(spec);
  }

  estimateMs(spec: JobSpec, live?: number): number {
    return this.work(spec) * this.rate(spec, live);
  }
}

/**
 * A prior from the model's size, before anything is measured: milliseconds per step and
 * megapixel from the bytes of its UNet. On 2 CPU cores it grows about with the square root of
 * the size (measured: a 64 kB test UNet 100-340 ms, a 2 MB one 170-980 ms, the 6 MB kiln-tiny
 * ones 1.1-1.7 s, depending on the load), which puts SDXL's 10 GB fp32 UNet near a minute. A GPU
 * is taken as ~500x faster, with a floor for small models (kernel launches). Rough on purpose,
 * and on the low side (a client that retries early is told again; one told to wait too long
 * waits for nothing): the first denoising steps measured replace it.
 */
export function priorMsPerStepMp(unetBytes: number | undefined, device: 'cpu' | 'cuda'): number {
  if (!unetBytes || !(unetBytes > 0)) return DEFAULT_MS_PER_STEP_MP;
  const cpu = 150 * Math.sqrt(Math.max(1, unetBytes / 65_536));
  return device === 'cuda' ? Math.max(20, cpu / 500) : cpu;
}
