/**
 * diffusers' step-index bookkeeping (`_step_index`, `_begin_index`), shared by the schedulers
 * that walk their schedule by position: all but DDIM, which works from the timestep value alone.
 */
import { checkBeginIndex, indexForTimestep } from './common.js';

export abstract class IndexedScheduler {
  /** The schedule after `setTimesteps`, highest noise first. */
  abstract timesteps: number[];
  /** Index of the current step in `timesteps`; null until the first step after setTimesteps. */
  protected stepIdx: number | null = null;
  /** Where the first step starts, when set (img2img); null otherwise. */
  protected beginIdx: number | null = null;

  /**
   * @param missingTimestep what looking up a timestep that is not in the schedule does: throw
   *   (Euler, LCM) or fall back to the last index (DPM-Solver, UniPC).
   */
  protected constructor(private readonly missingTimestep: 'throw' | 'last') {}

  get stepIndex(): number | null {
    return this.stepIdx;
  }

  get beginIndex(): number | null {
    return this.beginIdx;
  }

  setBeginIndex(index: number): void {
    checkBeginIndex(index, this.timesteps.length);
    this.beginIdx = index;
  }

  /** Forgets the position, for a new schedule. */
  protected resetStepIndex(): void {
    this.stepIdx = null;
    this.beginIdx = null;
  }

  /**
   * The current step's index; the first call fixes it at the begin index, or else at `t`'s place
   * in the schedule (diffusers `_init_step_index`).
   */
  protected currentStepIndex(t: number): number {
    this.stepIdx ??= this.beginIdx ?? indexForTimestep(this.timesteps, t, this.missingTimestep);
    return this.stepIdx;
  }

  /**
   * Which sigma add_noise uses, as diffusers: the timestep's index when no begin index is set,
   * else the current step (inpainting, after the first step) or the begin index (img2img start).
   */
  protected noiseIndex(t: number): number {
    if (this.beginIdx === null) return indexForTimestep(this.timesteps, t, this.missingTimestep);
    return this.stepIdx ?? this.beginIdx;
  }
}
