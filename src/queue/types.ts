/**
 * The job queue's contract: what the HTTP routes submit and what they get back. The routes
 * only see `JobQueue` and `JobHandle`, so a distributed queue (Redis, ...) can replace the
 * in-process one without touching them. Who actually runs a job is a `JobRunner`.
 */
import type { EventEmitter } from 'node:events';
import type { EffectiveSettings, Progress, Timings } from '../engine/pipeline.js';
import type { OutputFormat } from '../engine/image-codec.js';

/** A queued job: src/jobs/types.ts (one serializable type, its mode explicit, its inputs by key). */
export type { Job as JobSpec, JobOptions } from '../jobs/types.js';
import type { Job as JobSpec } from '../jobs/types.js';

/** A preview made during a run (streaming), encoded like the final image. */
export interface PartialImageEvent {
  /** 0-based, in the order they were made. */
  index: number;
  /** Steps done when it was taken, of `totalSteps`. */
  step: number;
  totalSteps: number;
  width: number;
  height: number;
  bytes: Buffer;
}

export interface JobOutput {
  /** The encoded image (PNG with its parameters chunk, or JPEG/WebP). */
  bytes: Buffer;
  contentType: string;
  format: OutputFormat;
  settings: EffectiveSettings & { strength?: number };
  timings: Timings;
  /** Pose mode: the skeleton picture (same format as the image) and how many people DWPose found. */
  pose?: Buffer;
  people?: number;
  /**
   * Image prompt: the adapter files the runner resolved from its own home and ran with, in the
   * response's order (none: every weight 0). Set where the job ran, so that an API host without
   * the model (scale-out) reports what the worker used.
   */
  imagePromptAdapters?: string[];
}

export type JobState = 'queued' | 'running' | 'done' | 'failed' | 'cancelled';

export interface JobEvents {
  /** Per stage and per denoising step, as the engine reports it. */
  progress: [Progress];
  /** Partial images of a streaming job (spec.partialImages). */
  partial: [PartialImageEvent];
  state: [JobState];
}

export interface JobHandle {
  readonly id: string;
  readonly state: JobState;
  /** Milliseconds spent waiting before a runner picked the job up (set once it starts). */
  readonly queuedMs: number | undefined;
  /** The last progress event (stage and step), if any. */
  readonly progress: Progress | undefined;
  /** Resolves with the image; rejects with the engine's error, JobCancelledError or JobTimeoutError. */
  readonly result: Promise<JobOutput>;
  readonly events: EventEmitter<JobEvents>;
  /** Queued: removed from the queue. Running: stopped at the engine's next step. */
  cancel(reason?: Error): void;
}

export interface SubmitOptions {
  /** Total time allowed, waiting included; past it the job is cancelled with JobTimeoutError. */
  timeoutMs?: number;
  /** For logs. */
  requestId?: string;
}

export interface QueueStats {
  /** Jobs being run now. */
  active: number;
  /** Jobs waiting for a runner. */
  queued: number;
  /** Most jobs that may wait. */
  maxQueued: number;
  /** Jobs run at once. */
  concurrency: number;
}

export interface JobQueue {
  /** Throws QueueFullError when `maxQueued` jobs wait already, QueueClosedError after close(). */
  submit(spec: JobSpec, options?: SubmitOptions): JobHandle;
  stats(): QueueStats;
  /** A rough wait in seconds for a new job (for `retry-after`): what the jobs ahead of it still need. */
  estimatedWaitSeconds(): number;
  /** Emits 'finished' (handle, outcome, durations) for metrics. */
  readonly events: EventEmitter<QueueEvents>;
  /**
   * Stops accepting jobs and cancels the queued ones at once; lets running ones finish for up to
   * `deadlineMs`, then cancels them too (JobCancelledError with a shutdown reason). Resolves
   * when none is left.
   */
  close(deadlineMs: number): Promise<void>;
  /** A distributed queue's workers (scale-out); absent for the in-process queue. */
  fleet?(): FleetStatus;
}

export interface JobFinished {
  job: JobHandle;
  kind: 'generate' | 'edit';
  outcome: 'done' | 'failed' | 'cancelled' | 'timeout';
  queuedMs: number;
  runMs: number;
}

export interface QueueEvents {
  finished: [JobFinished];
}

export interface RunContext {
  signal: AbortSignal;
  onProgress: (progress: Progress) => void;
  onPartial?: (partial: PartialImageEvent) => void;
}

/** Runs jobs (a pool of engine worker threads, a remote GPU box, a fake in tests). */
export interface JobRunner {
  /** How many jobs it can run at once. */
  readonly slots: number;
  run(spec: JobSpec, context: RunContext): Promise<JobOutput>;
  /** Loads a model ahead of the first request (errors are reported, not thrown). */
  preload?(model: string): void;
  /** The models loaded now, each with the number of inference threads holding it. */
  loadedModels?(): Record<string, number>;
  close(): Promise<void>;
}

export class QueueFullError extends Error {
  override name = 'QueueFullError';
  constructor(readonly retryAfterSeconds: number) {
    super('the server is busy: its queue is full; retry later');
  }
}

export class QueueClosedError extends Error {
  override name = 'QueueClosedError';
  constructor() {
    super('the server is shutting down and accepts no new work');
  }
}

/** Why a job was cancelled: the client went away, the server shuts down, or the caller said so. */
export class JobCancelledError extends Error {
  override name = 'JobCancelledError';
  constructor(
    message = 'the job was cancelled',
    readonly reason: 'client' | 'shutdown' | 'caller' = 'caller',
  ) {
    super(message);
  }
}

export class JobTimeoutError extends Error {
  override name = 'JobTimeoutError';
  constructor(readonly timeoutMs: number) {
    super(`the image was not ready within the server's limit of ${Math.round(timeoutMs / 1000)} s`);
  }
}

/** The queue's backing store (Redis) cannot be reached: 503, retry soon. */
export class QueueUnavailableError extends Error {
  override name = 'QueueUnavailableError';
  constructor(message = 'the job queue (Redis) is unreachable; retry shortly') {
    super(message);
  }
}

/** No live worker serves the job's model (scale-out): 503, with the models the fleet does serve. */
export class NoWorkerError extends Error {
  override name = 'NoWorkerError';
  constructor(
    message: string,
    readonly model: string,
  ) {
    super(message);
  }
}

/** What /ping, /health and /metrics show of a distributed queue's workers. */
export interface FleetStatus {
  /** Whether the queue's backing store answers. */
  reachable: boolean;
  /** `loaded`: the models each holds now, with the number of its inference threads holding each. */
  workers: { id: string; host: string; pid: number; device: string; slots: number; active: number; models: string[]; loaded: Record<string, number> }[];
}
