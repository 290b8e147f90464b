/**
 * What every queue's job handle shares (in-process and BullMQ): its id, events, the result
 * promise the queue settles, timings and state. Each queue adds its own bookkeeping.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Progress } from '../engine/pipeline.js';
import { jobKind } from '../jobs/types.js';
import { JobCancelledError, JobTimeoutError, type JobEvents, type JobFinished, type JobHandle, type JobOutput, type JobSpec, type JobState } from './types.js';

export abstract class QueuedJob implements JobHandle {
  readonly id: string;
  readonly events = new EventEmitter<JobEvents>();
  readonly result: Promise<JobOutput>;
  readonly submittedAt = performance.now();
  startedAt: number | undefined;
  state: JobState = 'queued';
  progress: Progress | undefined;
  timer: NodeJS.Timeout | undefined;
  resolve!: (output: JobOutput) => void;
  reject!: (err: unknown) => void;

  constructor(
    readonly spec: JobSpec,
    private readonly onCancel: (job: QueuedJob, reason: Error) => void,
    idBytes: number,
  ) {
    this.id = `job_${randomBytes(idBytes).toString('base64url')}`;
    this.result = new Promise<JobOutput>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // Nobody may be listening any more (client gone); never let that be an unhandled rejection.
    this.result.catch(() => {});
  }

  get queuedMs(): number | undefined {
    return this.startedAt === undefined ? undefined : this.startedAt - this.submittedAt;
  }

  get settled(): boolean {
    return this.state === 'done' || this.state === 'failed' || this.state === 'cancelled';
  }

  setState(state: JobState): void {
    this.state = state;
    this.events.emit('state', state);
  }

  /** Ends the job with its outcome: its state, its result promise, and what the queue's 'finished' event reports. */
  settle(state: 'done' | 'failed' | 'cancelled', value: unknown): JobFinished {
    clearTimeout(this.timer);
    this.setState(state);
    const now = performance.now();
    const queuedMs = (this.startedAt ?? now) - this.submittedAt;
    const runMs = this.startedAt === undefined ? 0 : now - this.startedAt;
    const outcome = state === 'cancelled' && value instanceof JobTimeoutError ? 'timeout' : state;
    if (state === 'done') this.resolve(value as JobOutput);
    else this.reject(value);
    return { job: this, kind: jobKind(this.spec), outcome, queuedMs, runMs };
  }

  cancel(reason: Error = new JobCancelledError()): void {
    if (!this.settled) this.onCancel(this, reason);
  }
}
