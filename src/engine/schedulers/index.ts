/**
 * Diffusion schedulers, mirroring diffusers' classes and numbers, configured from a model's
 * `scheduler_config.json`. Pick one by diffusers class name or by a short alias.
 */
import { DDIMScheduler } from './ddim.js';
import { DPMSolverMultistepScheduler } from './dpm-multistep.js';
import { DPMSolverSinglestepScheduler } from './dpm-singlestep.js';
import { EulerAncestralDiscreteScheduler } from './euler-ancestral.js';
import { EulerDiscreteScheduler } from './euler.js';
import { LCMScheduler } from './lcm.js';
import type { Scheduler, SchedulerConfig } from './types.js';
import { UniPCMultistepScheduler } from './unipc.js';

export type {
  BetaSchedule,
  FinalSigmasType,
  PredictionType,
  ResolvedSchedulerConfig,
  Scheduler,
  SchedulerConfig,
  TimestepSpacing,
} from './types.js';
export { DDIMScheduler, type DDIMConfig } from './ddim.js';
export { DPMSolverMultistepScheduler, type DPMSolverMultistepConfig } from './dpm-multistep.js';
export { DPMSolverSinglestepScheduler, type DPMSolverSinglestepConfig } from './dpm-singlestep.js';
export {
  EulerAncestralDiscreteScheduler,
  ancestralSigmas,
  type EulerAncestralDiscreteConfig,
} from './euler-ancestral.js';
export { EulerDiscreteScheduler, type EulerDiscreteConfig } from './euler.js';
export { LCMScheduler, type LCMConfig } from './lcm.js';
export { UniPCMultistepScheduler, type UniPCMultistepConfig } from './unipc.js';

const CLASSES: Record<string, new (config?: SchedulerConfig) => Scheduler> = {
  EulerDiscreteScheduler,
  EulerAncestralDiscreteScheduler,
  DDIMScheduler,
  DPMSolverMultistepScheduler,
  DPMSolverSinglestepScheduler,
  UniPCMultistepScheduler,
  LCMScheduler,
};

/** alias -> class, plus config keys the alias pins (a named sampler means that exact sampler). */
const ALIASES: Record<string, { className: string; overrides: SchedulerConfig }> = {
  euler: { className: 'EulerDiscreteScheduler', overrides: {} },
  euler_a: { className: 'EulerAncestralDiscreteScheduler', overrides: {} },
  ddim: { className: 'DDIMScheduler', overrides: {} },
  dpmpp_2m: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: false },
  },
  dpmpp_2m_karras: {
    className: 'DPMSolverMultistepScheduler',
    overrides: { algorithm_type: 'dpmsolver++', solver_order: 2, use_karras_sigmas: true },
  },
  dpm_single: { className: 'DPMSolverSinglestepScheduler', overrides: {} },
  unipc: { className: 'UniPCMultistepScheduler', overrides: {} },
  lcm: { className: 'LCMScheduler', overrides: {} },
};

/** The aliases, for help text and validation. */
export const SCHEDULER_NAMES: readonly string[] = Object.freeze(Object.keys(ALIASES));

/** The diffusers class names Kiln implements. */
export const SCHEDULER_CLASSES: readonly string[] = Object.freeze(Object.keys(CLASSES));

export class UnknownSchedulerError extends Error {
  readonly requested: string;
  constructor(requested: string) {
    super(
      `unknown scheduler "${requested}"; use one of: ${SCHEDULER_NAMES.join(', ')} ` +
        `(or a class name: ${SCHEDULER_CLASSES.join(', ')})`,
    );
    this.name = 'UnknownSchedulerError';
    this.requested = requested;
  }
}

function lookupClass(name: string): string | undefined {
  const key = name.trim().toLowerCase();
  return SCHEDULER_CLASSES.find((c) => c.toLowerCase() === key);
}

/** Alias or class name (case-insensitive) -> diffusers class name; undefined when unknown. */
export function schedulerClassFor(name: string): string | undefined {
  return ALIASES[name.trim().toLowerCase()]?.className ?? lookupClass(name);
}

/** Whether Kiln implements this diffusers class name (e.g. a model's `_class_name`); not aliases. */
export function isSupportedScheduler(className: string): boolean {
  return lookupClass(className) !== undefined;
}

/**
 * A scheduler by alias or class name, configured from a diffusers scheduler_config.json object
 * (another class's config is fine: unknown keys are ignored, as with diffusers' from_config).
 * Aliases pin the options that define them (e.g. `dpmpp_2m_karras` sets use_karras_sigmas).
 * @throws UnknownSchedulerError for an unknown name.
 */
export function createScheduler(name: string, config: SchedulerConfig = {}): Scheduler {
  const alias = ALIASES[name.trim().toLowerCase()];
  const className = alias?.className ?? lookupClass(name);
  if (!className) throw new UnknownSchedulerError(name);
  const Ctor = CLASSES[className]!;
  return new Ctor({ ...config, ...(alias?.overrides ?? {}) });
}
