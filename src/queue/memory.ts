/**
 * The in-process queue: a bounded FIFO in front of a JobRunner's slots. Waiting jobs live in
 * memory; a cancelled waiting job is simply dropped, a cancelled running one is aborted through
 * its AbortSignal (the engine stops at its next step) and keeps its runner slot until it has.
 * On close, waiting jobs are cancelled at once and running ones get until the deadline.
 */
import { QueuedJob } from './job-handle.js';
import { EventEmitter } from 'node:events';
import type { Progress } from '../engine/pipeline.js';
import { megapixels, RunTimeEstimator } from './estimate.js';
import {
  JobCancelledError,
  JobTimeoutError,
  QueueClosedError,
  QueueFullError,
 
  type JobHandle,
  type JobOutput,
  type JobQueue,
  type JobRunner,
  type JobSpec,
 
  type PartialImageEvent,
  type QueueEvents,
  type QueueStats,
  type SubmitOptions,
} from './types.js';

export interface InProcessQueueOptions {
  /** Most jobs that may wait for a slot (0: only as many as run at once are accepted). */
  maxQueued: number;
  /** Jobs run at once (default: the runner's slots). */
  concurrency?: number;
  /**
   * A first guess of a job's milliseconds per denoising step and megapixel, used for
   * retry-after until a job has been measured (e.g. from the size of the model's UNet).
   */
  priorMsPerStepMp?: (spec: JobSpec) => number;
}

class Job extends QueuedJob {
  readonly controller = new AbortController();
  /** When its first and latest denoising steps were reported: its measured time per step. */
  firstStep: { at: number; step: number } | undefined;
  lastStep: { at: number; step: number } | undefined;

  constructor(spec: JobSpec, onCancel: (job: Job, reason: Error) => void) {
    super(spec, onCancel as (job: QueuedJob, reason: Error) => void, 9);
  }
}

export class InProcessQueue implements JobQueue {
  readonly events = new EventEmitter<QueueEvents>();
  private readonly waiting: Job[] = [];
  private readonly running = new Set<Job>();
  private readonly concurrency: number;
  private readonly maxQueued: number;
  private closed = false;
  private idleWaiters: (() => void)[] = [];
  /** Run times, for retry-after. */
  private readonly estimator: RunTimeEstimator;

  constructor(
    private readonly runner: JobRunner,
    options: InProcessQueueOptions,
  ) {
    this.concurrency = Math.max(1, options.concurrency ?? runner.slots);
    this.maxQueued = Math.max(0, options.maxQueued);
    this.estimator = new RunTimeEstimator(options.priorMsPerStepMp);
  }

  submit(spec: JobSpec, options: SubmitOptions = {}): JobHandle {
    if (this.closed) throw new QueueClosedError();
    const startsNow = this.running.size < this.concurrency && this.waiting.length === 0;
    if (!startsNow && this.waiting.length >= this.maxQueued) throw new QueueFullError(this.estimatedWaitSeconds());
    const job = new Job(spec, (j, reason) => this.cancelJob(j, reason));
    if (options.timeoutMs !== undefined && options.timeoutMs > 0) {
      job.timer = setTimeout(() => job.cancel(new JobTimeoutError(options.timeoutMs!)), options.timeoutMs);
      job.timer.unref();
    }
    this.waiting.push(job);
    this.pump();
    return job;
  }

  stats(): QueueStats {
    return { active: this.running.size, queued: this.waiting.length, maxQueued: this.maxQueued, concurrency: this.concurrency };
  }

  /** What the jobs ahead of a new one still need (running: what is left of them), shared among the slots. */
  estimatedWaitSeconds(): number {
    const now = performance.now();
    const live = this.liveMsPerWork();
    let totalMs = 0;
    for (const job of this.running) {
      const perStep = job.firstStep && job.lastStep && job.lastStep.step > job.firstStep.step
        ? (job.lastStep.at - job.firstStep.at) / (job.lastStep.step - job.firstStep.step)
        : undefined;
      const left = perStep !== undefined && job.progress?.stage === 'denoise'
        ? perStep * (job.progress.totalSteps - job.progress.step + 1) // +1: decoding and encoding the image
        : this.estimator.estimateMs(job.spec, live) - (now - job.startedAt!);
      totalMs += Math.max(0, left);
    }
    for (const job of this.waiting) totalMs += this.estimator.estimateMs(job.spec, live);
    return Math.max(1, Math.ceil(totalMs / this.concurrency / 1000));
  }

  /** Milliseconds per unit of work the running jobs show so far (their denoising steps), if any. */
  private liveMsPerWork(): number | undefined {
    let sum = 0;
    let n = 0;
    for (const job of this.running) {
      if (!job.firstStep || !job.lastStep || job.lastStep.step <= job.firstStep.step) continue;
      const perStep = (job.lastStep.at - job.firstStep.at) / (job.lastStep.step - job.firstStep.step);
      sum += perStep / megapixels(job.spec.options.size);
      n++;
    }
    return n ? sum / n : undefined;
  }

  async close(deadlineMs: number): Promise<void> {
    this.closed = true;
    const reason = () => new JobCancelledError('the server is shutting down; retry on another server or after the restart', 'shutdown');
    // Waiting jobs are answered now, so that their clients can go elsewhere at once.
    for (const job of [...this.waiting]) job.cancel(reason());
    if (this.isIdle()) return;
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<'deadline'>((resolve) => {
      timer = setTimeout(() => resolve('deadline'), Math.max(0, deadlineMs));
    });
    const outcome = await Promise.race([this.whenIdle(), deadline]);
    clearTimeout(timer);
    if (outcome === 'deadline') {
      for (const job of [...this.running]) job.cancel(new JobCancelledError('the server shut down before the image was ready', 'shutdown'));
      // Running jobs stop at their next step; the runner's own close() bounds a stuck one.
      await Promise.race([this.whenIdle(), new Promise((r) => setTimeout(r, 5_000).unref())]);
    }
  }

  private isIdle(): boolean {
    return this.waiting.length === 0 && this.running.size === 0;
  }

  private whenIdle(): Promise<'idle'> {
    if (this.isIdle()) return Promise.resolve('idle');
    return new Promise((resolve) => this.idleWaiters.push(() => resolve('idle')));
  }

  private cancelJob(job: Job, reason: Error): void {
    if (job.state === 'queued') {
      const i = this.waiting.indexOf(job);
      if (i >= 0) this.waiting.splice(i, 1);
      this.finish(job, 'cancelled', reason);
      this.checkIdle();
    } else if (job.state === 'running' && !job.controller.signal.aborted) {
      // The runner rejects once the engine has stopped; the slot stays taken until then.
      job.controller.abort(reason);
    }
  }

  private pump(): void {
    while (this.running.size < this.concurrency && this.waiting.length > 0) {
      const job = this.waiting.shift()!;
      this.start(job);
    }
  }

  private start(job: Job): void {
    this.running.add(job);
    job.startedAt = performance.now();
    job.setState('running');
    const onProgress = (progress: Progress) => {
      job.progress = progress;
      if (progress.stage === 'denoise') {
        const mark = { at: performance.now(), step: progress.step };
        job.firstStep ??= mark;
        job.lastStep = mark;
      }
      job.events.emit('progress', progress);
    };
    let run: Promise<JobOutput>;
    try {
      const onPartial = (partial: PartialImageEvent) => job.events.emit('partial', partial);
      run = this.runner.run(job.spec, { signal: job.controller.signal, onProgress, onPartial });
    } catch (err) {
      run = Promise.reject(err);
    }
    run.then(
      (output) => {
        this.running.delete(job);
        this.estimator.finished(job.spec, output, performance.now() - job.startedAt!);
        this.finish(job, 'done', output);
        this.pump();
        this.checkIdle();
      },
      (err: unknown) => {
        this.running.delete(job);
        const aborted = job.controller.signal.aborted;
        this.finish(job, aborted ? 'cancelled' : 'failed', aborted ? job.controller.signal.reason : err);
        this.pump();
        this.checkIdle();
      },
    );
  }

  private finish(job: Job, state: 'done' | 'failed' | 'cancelled', value: unknown): void {
    this.events.emit('finished', job.settle(state, value));
  }

  private checkIdle(): void {
    if (!this.isIdle()) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }
}
