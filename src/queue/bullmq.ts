/**
 * The distributed queue (`kiln serve --queue redis://...`): jobs wait in a BullMQ queue in Redis
 * and run on `kiln worker` processes anywhere (src/runner/worker.ts). Behind the same JobQueue
 * interface as the in-process queue, so the routes do not change.
 *
 * - Submitting checks, before anything is queued: Redis answers (else QueueUnavailableError,
 *   503), a live worker serves the model (heartbeats; else NoWorkerError, 503 naming what the
 *   fleet serves), and the bound: waiting jobs beyond `maxQueued` plus the fleet's idle slots
 *   are refused (QueueFullError, 429, retry-after from the depth and the measured run time).
 * - A job's progress and partial images come back as BullMQ job progress (QueueEvents); the
 *   image as a Redis key named after the job id, read once: a job that BullMQ runs twice (its
 *   worker died and the stalled check gave it to another) is still delivered once.
 * - Cancelling (client gone, timeout) removes a waiting job, or sets the job's cancel key that
 *   its worker polls and turns into an abort at the engine's next step.
 * - A job may go back to waiting (its worker shut down and gave it back, or it stalled) and run
 *   again, from the start, on another worker: the handle goes back to 'queued', progress restarts
 *   at the new run's first step, and partial images are passed on only past the last index sent
 *   (the new run's earlier ones repeat what the client has), so a stream never repeats an index.
 */
import { QueuedJob } from './job-handle.js';
import { EventEmitter } from 'node:events';
import { isModelPath } from '../engine/locate.js';
import type { Progress } from '../engine/pipeline.js';
import type { OutputFormat } from '../engine/image-codec.js';
import { Queue, QueueEvents } from 'bullmq';
import { deserializeError } from '../runner/protocol.js';
import { GenerationCancelledError } from '../engine/errors.js';
import { RunTimeEstimator } from './estimate.js';
import { jobKind } from '../jobs/types.js';
import type { Redis } from 'ioredis';
import { connect, DEFAULT_QUEUE_NAME, keys, KEY_PREFIX, readFleet, RedisInputStore, type RedisTarget, type StoredResult, type WorkerInfo } from './redis.js';
import {
  JobCancelledError,
  JobTimeoutError,
  NoWorkerError,
  QueueClosedError,
  QueueFullError,
  QueueUnavailableError,
  type FleetStatus,
 
  type JobHandle,
  type JobOutput,
  type JobQueue,
  type JobSpec,
 
  type QueueEvents as KilnQueueEvents,
  type QueueStats,
  type SubmitOptions,
} from './types.js';

export interface BullJobQueueOptions {
  redis: RedisTarget;
  /** The BullMQ queue's name (API hosts and workers of one fleet share it). */
  name?: string;
  /** Most jobs that may wait beyond the fleet's idle slots; more answer 429. */
  maxQueued: number;
  /** A first guess of milliseconds per step and megapixel, for retry-after before anything was measured. */
  priorMsPerStepMp?: (spec: JobSpec) => number;
  /** How long a fleet reading is reused (default 1 s). */
  fleetCacheMs?: number;
  /** How long a worker's result waits to be read (default 10 min). */
  resultTtlMs?: number;
  onError?: (err: Error) => void;
}

/** Progress a worker publishes: a step, or a partial image (base64). */
export type ProgressMessage =
  | { progress: Progress }
  | { partial: { index: number; step: number; totalSteps: number; width: number; height: number; bytes: string } };

/** Redis commands that would wait for a reconnect give up after this: the request answers 503. */
const COMMAND_TIMEOUT_MS = 5_000;

function timeout<T>(promise: Promise<T>, ms = COMMAND_TIMEOUT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new QueueUnavailableError()), ms);
    }),
  ]);
}

class RemoteJob extends QueuedJob {
  /** The job is in Redis (add() answered). */
  added = false;
  /** Its result is being read. */
  collecting = false;
  /** The next partial image index to pass on (a run again after a hand-back starts over at 0). */
  nextPartial = 0;

  constructor(spec: JobSpec, onCancel: (job: RemoteJob, reason: Error) => void) {
    super(spec, onCancel as (job: QueuedJob, reason: Error) => void, 12);
  }
}

export class BullJobQueue implements JobQueue {
  readonly events = new EventEmitter<KilnQueueEvents>();
  readonly inputs: RedisInputStore;
  readonly name: string;
  private readonly redis: Redis;
  /** BullMQ's connections (given, so BullMQ does not close them: close() does). */
  private readonly connections: Redis[];
  private readonly queue: Queue;
  private readonly queueEvents: QueueEvents;
  private readonly k: ReturnType<typeof keys>;
  private readonly jobs = new Map<string, RemoteJob>();
  private readonly estimator: RunTimeEstimator;
  private closed = false;
  private counts = { waiting: 0, active: 0 };
  private workers: WorkerInfo[] = [];
  private fleetAt = 0;
  private reachable = false;
  private readonly refresher: NodeJS.Timeout;

  constructor(private readonly options: BullJobQueueOptions) {
    this.name = options.name ?? DEFAULT_QUEUE_NAME;
    this.k = keys(this.name);
    this.estimator = new RunTimeEstimator(options.priorMsPerStepMp);
    // The API's own commands fail at once while Redis is down (a 503 now, not a request that hangs).
    this.redis = connect(options.redis, { failFast: true, name: 'kiln-api' });
    this.redis.on('ready', () => (this.reachable = true));
    this.redis.on('close', () => (this.reachable = false));
    this.inputs = new RedisInputStore(this.redis, this.name);
    this.connections = [connect(options.redis), connect(options.redis)];
    this.queue = new Queue(this.name, { connection: this.connections[0]!, prefix: KEY_PREFIX });
    this.queue.on('error', (err) => options.onError?.(err));
    this.queueEvents = new QueueEvents(this.name, { connection: this.connections[1]!, prefix: KEY_PREFIX });
    this.queueEvents.on('error', (err) => options.onError?.(err));
    this.queueEvents.on('active', ({ jobId }) => this.onActive(jobId));
    this.queueEvents.on('waiting', ({ jobId, prev }) => prev === 'active' && this.onRequeued(jobId));
    this.queueEvents.on('stalled', ({ jobId }) => this.onRequeued(jobId));
    this.queueEvents.on('progress', ({ jobId, data }) => this.onProgress(jobId, data as unknown as ProgressMessage));
    this.queueEvents.on('completed', ({ jobId }) => void this.collect(jobId));
    this.queueEvents.on('failed', ({ jobId, failedReason }) => this.onFailed(jobId, failedReason));
    // Depth and fleet for stats(), and a safety net for results whose event was missed (Redis came back).
    this.refresher = setInterval(() => void this.refresh().catch(() => {}), 1000);
    this.refresher.unref();
    void this.refresh().catch(() => {});
  }

  /** Waits until Redis answers (startup); rejects after `timeoutMs`. */
  async ready(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.redis.status !== 'ready') {
      if (Date.now() > deadline) throw new QueueUnavailableError(`Redis did not answer within ${Math.round(timeoutMs / 1000)} s`);
      await new Promise((r) => setTimeout(r, 50));
    }
    await Promise.all([this.queue.waitUntilReady(), this.queueEvents.waitUntilReady()]);
  }

  submit(spec: JobSpec, options: SubmitOptions = {}): JobHandle {
    if (this.closed) throw new QueueClosedError();
    if (this.redis.status !== 'ready') throw new QueueUnavailableError();
    const job = new RemoteJob(spec, (j, reason) => this.cancelJob(j, reason));
    this.jobs.set(job.id, job);
    if (options.timeoutMs !== undefined && options.timeoutMs > 0) {
      job.timer = setTimeout(() => job.cancel(new JobTimeoutError(options.timeoutMs!)), options.timeoutMs);
      job.timer.unref();
    }
    this.enqueue(job).catch((err: unknown) => this.finish(job, 'failed', err));
    return job;
  }

  private async enqueue(job: RemoteJob): Promise<void> {
    const { spec } = job;
    let workers: WorkerInfo[];
    let waiting: number;
    try {
      workers = await timeout(this.fleetNow());
      waiting = await timeout(this.waitingNow());
    } catch {
      throw new QueueUnavailableError();
    }
    if (workers.length === 0) {
      throw new NoWorkerError(`No worker is connected to the queue: start \`kiln worker --queue ...\` on a GPU host (the model '${spec.model}' cannot run).`, spec.model);
    }
    // A folder the operator configured can only be checked by the worker (a shared host).
    if (!isModelPath(spec.model) && !workers.some((w) => w.models.includes(spec.model))) {
      const served = [...new Set(workers.flatMap((w) => w.models))].sort();
      throw new NoWorkerError(
        `No live worker serves the model '${spec.model}' (${workers.length} worker(s) serve: ${served.slice(0, 20).join(', ') || 'nothing'}${served.length > 20 ? ', ...' : ''}). ` +
          `Install it on a worker host with \`kiln pull ${spec.model}\`.`,
        spec.model,
      );
    }
    const slots = workers.reduce((n, w) => n + w.slots, 0);
    const busy = workers.reduce((n, w) => n + w.active, 0);
    const idle = Math.max(0, slots - busy);
    if (waiting >= this.options.maxQueued + idle) throw new QueueFullError(this.waitFor(spec, waiting + busy, slots));
    if (job.settled) return; // cancelled while we looked
    try {
      await timeout(this.queue.add(jobKind(spec), spec, { jobId: job.id, attempts: 1, removeOnComplete: true, removeOnFail: { age: 3600 } }));
    } catch {
      throw new QueueUnavailableError();
    }
    job.added = true;
    this.counts.waiting++;
    // Cancelled while add() was under way: take it back out.
    if (job.settled) await this.withdraw(job.id, 'cancelled while it was being queued');
  }

  /** Seconds until a new job would start: the jobs ahead of it times the run time, over the fleet's slots. */
  private waitFor(spec: JobSpec, ahead: number, slots: number): number {
    return Math.max(1, Math.ceil((ahead * this.estimator.estimateMs(spec)) / Math.max(1, slots) / 1000));
  }

  stats(): QueueStats {
    const slots = this.workers.reduce((n, w) => n + w.slots, 0);
    return { active: this.counts.active, queued: this.counts.waiting, maxQueued: this.options.maxQueued, concurrency: slots };
  }

  estimatedWaitSeconds(): number {
    const slots = this.workers.reduce((n, w) => n + w.slots, 0);
    const sample = [...this.jobs.values()][0]?.spec;
    const perJob = sample ? this.estimator.estimateMs(sample) : this.estimator.rate({ mode: 'generate', model: '', options: { prompt: '', seed: 0, size: '1024x1024' }, output: { format: 'png' } }) * 30;
    return Math.max(1, Math.ceil(((this.counts.waiting + this.counts.active) * perJob) / Math.max(1, slots) / 1000));
  }

  fleet(): FleetStatus {
    return { reachable: this.reachable, workers: this.workers.map(({ id, host, pid, device, slots, active, models, loaded }) => ({ id, host, pid, device, slots, active, models, loaded: loaded ?? {} })) };
  }

  private async fleetNow(): Promise<WorkerInfo[]> {
    if (Date.now() - this.fleetAt > (this.options.fleetCacheMs ?? 1000)) {
      this.workers = await readFleet(this.redis, this.name);
      this.fleetAt = Date.now();
    }
    return this.workers;
  }

  private async waitingNow(): Promise<number> {
    const c = await this.queue.getJobCounts('waiting', 'prioritized', 'delayed', 'active');
    this.counts = { waiting: (c.waiting ?? 0) + (c.prioritized ?? 0) + (c.delayed ?? 0), active: c.active ?? 0 };
    return this.counts.waiting;
  }

  private async refresh(): Promise<void> {
    if (this.redis.status !== 'ready') return;
    this.fleetAt = 0;
    await timeout(Promise.all([this.fleetNow(), this.waitingNow()]));
    // Results whose 'completed' event went by while this host's event stream was down, and jobs
    // that are gone (a Redis restarted without persistence): neither the job nor its result left.
    const running = [...this.jobs.values()].filter((j) => j.added && !j.settled);
    for (const j of running) {
      if (j.collecting) continue;
      // The job's hash first: a worker writes the result before BullMQ removes the hash, so a
      // missing hash and then a missing result mean the job is gone.
      const queued = await timeout(this.redis.exists(`${KEY_PREFIX}:${this.name}:${j.id}`));
      const result = await timeout(this.redis.exists(this.k.result(j.id)));
      if (result) void this.collect(j.id);
      else if (!queued && !j.settled && !j.collecting) {
        this.finish(j, 'failed', new QueueUnavailableError('the job was lost from the queue (Redis restarted without it); retry'));
        // A worker may still be running it (its run outlives the Redis that held it): nobody waits
        // for it now, so flag it like a cancelled job and free the slot.
        void this.withdraw(j.id, 'the job was lost from the queue (Redis restarted without it)');
      }
    }
  }

  private onActive(jobId: string): void {
    const job = this.jobs.get(jobId);
    if (!job || job.settled || job.state === 'running') return;
    job.startedAt = performance.now();
    job.setState('running');
  }

  /** Back in the queue, to be run again from the start; its queue time then counts until that run starts. */
  private onRequeued(jobId: string): void {
    const job = this.jobs.get(jobId);
    if (!job || job.settled || job.state !== 'running') return;
    job.progress = undefined;
    job.setState('queued');
  }

  private onProgress(jobId: string, data: ProgressMessage): void {
    const job = this.jobs.get(jobId);
    if (!job || job.settled || !data || typeof data !== 'object') return;
    if (job.state === 'queued') this.onActive(jobId);
    if ('progress' in data) {
      job.progress = data.progress;
      job.events.emit('progress', data.progress);
    } else if ('partial' in data) {
      const p = data.partial;
      if (p.index < job.nextPartial) return;
      job.nextPartial = p.index + 1;
      job.events.emit('partial', { index: p.index, step: p.step, totalSteps: p.totalSteps, width: p.width, height: p.height, bytes: Buffer.from(p.bytes, 'base64') });
    }
  }

  /** Reads and deletes the job's result; the first reader delivers, any later one finds nothing. */
  private async collect(jobId: string): Promise<void> {
    const job = this.jobs.get(jobId);
    if (!job || job.settled || job.collecting) return;
    let raw: unknown;
    job.collecting = true;
    try {
      raw = await this.redis.call('GETDEL', this.k.result(jobId));
    } catch {
      return; // Redis is down: the refresher tries again once it is back
    } finally {
      job.collecting = false;
    }
    if (typeof raw !== 'string' || job.settled) return;
    const r = JSON.parse(raw) as StoredResult;
    if (!r.ok) {
      this.finish(job, r.cancelled ? 'cancelled' : 'failed', r.cancelled ? new GenerationCancelledError() : deserializeError(r.error));
      return;
    }
    const output: JobOutput = {
      bytes: Buffer.from(r.bytes, 'base64'),
      contentType: r.contentType,
      format: r.format as OutputFormat,
      settings: r.settings as JobOutput['settings'],
      timings: r.timings as JobOutput['timings'],
    };
    if (r.pose) output.pose = Buffer.from(r.pose, 'base64');
    if (r.people !== undefined) output.people = r.people;
    if (Array.isArray(r.imagePromptAdapters)) output.imagePromptAdapters = r.imagePromptAdapters.map(String);
    job.startedAt ??= performance.now();
    this.estimator.finished(job.spec, output, performance.now() - job.startedAt);
    this.finish(job, 'done', output);
  }

  private onFailed(jobId: string, reason: string): void {
    const job = this.jobs.get(jobId);
    if (!job || job.settled) return;
    // BullMQ gave up on it (stalled more often than allowed, ...): not an engine error.
    this.finish(job, 'failed', new Error(`the job failed in the queue: ${reason}`));
  }

  private cancelJob(job: RemoteJob, reason: Error): void {
    // The request is answered now; the worker stops at its next step once it sees the cancel key.
    this.finish(job, 'cancelled', reason);
    if (job.added) void this.withdraw(job.id, reason.message);
  }

  /** Removes a waiting job, or flags a running one for its worker (the flag's value says why, for its log). */
  private async withdraw(jobId: string, why: string): Promise<void> {
    try {
      await this.redis.set(this.k.cancel(jobId), why.slice(0, 200) || 'cancelled', 'PX', 3_600_000);
      await this.queue.remove(jobId).catch(() => 0); // refused while a worker holds its lock
    } catch {
      // Redis is down: the job may still run; its result expires unread
    }
  }

  private finish(job: RemoteJob, state: 'done' | 'failed' | 'cancelled', value: unknown): void {
    if (job.settled) return;
    this.jobs.delete(job.id);
    this.events.emit('finished', job.settle(state, value));
  }

  async close(deadlineMs: number): Promise<void> {
    this.closed = true;
    clearInterval(this.refresher);
    const reason = () => new JobCancelledError('the server is shutting down; retry on another server or after the restart', 'shutdown');
    for (const job of [...this.jobs.values()]) if (job.state === 'queued') job.cancel(reason());
    const deadline = Date.now() + Math.max(0, deadlineMs);
    while (this.jobs.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const job of [...this.jobs.values()]) job.cancel(new JobCancelledError('the server shut down before the image was ready', 'shutdown'));
    await Promise.allSettled([this.queueEvents.close(), this.queue.close()]);
    await Promise.allSettled([this.redis, ...this.connections].map((c) => c.quit()));
  }
}
