/**
 * `kiln worker`'s core: takes jobs from the BullMQ queue and runs them on this host's inference
 * threads (EnginePool), resolving models through this host's catalog and uploads from the
 * input store.
 *
 * - Locks: BullMQ renews a job's lock from this process's event loop every lockDuration/2;
 *   inference runs in worker threads, so a busy GPU or CPU never starves the renewal and a
 *   healthy job of minutes never looks stalled. A worker that dies stops renewing: after
 *   lockDuration the stalled check (any worker, every stalledInterval) puts the job back and
 *   another worker runs it again (at least once); the API delivers one image per job id.
 * - Progress: each engine step and partial image becomes BullMQ job progress (QueueEvents on
 *   the API host).
 * - Cancellation: the API sets `cancel:<job>`; this process polls the keys of its running jobs
 *   and aborts them, and the thread stops at the engine's next step.
 * - Shutdown (close): no new jobs; running ones finish until the deadline, then stop at their next
 *   step and are given back to the queue (BullMQ's manual retry: moveToWait + WaitingError), so
 *   another worker runs them from the start and the request still gets its one image.
 * - Heartbeat: `worker:<id>` with a TTL of three beats, naming the models this host serves.
 */
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { WaitingError, Worker, type Job as BullJob } from 'bullmq';
import type { ModelCatalog } from '../catalog/catalog.js';
import type { Device } from '../engine/onnx.js';
import type { Job } from '../jobs/types.js';
import type { InputStore } from '../store/types.js';
import type { ProgressMessage } from '../queue/bullmq.js';
import { connect, DEFAULT_QUEUE_NAME, keys, KEY_PREFIX, RedisInputStore, type RedisTarget, type StoredResult, type WorkerInfo } from '../queue/redis.js';
import { EnginePool } from './pool.js';
import { serializeError } from './protocol.js';

export interface QueueWorkerOptions {
  redis: RedisTarget;
  name?: string;
  catalog: ModelCatalog;
  device?: Device;
  /** Inference threads (default 1). */
  workers?: number;
  /** Jobs each thread runs at once, their UNet steps batched (default 1); jobs taken at once: workers x maxBatch. */
  maxBatch?: number;
  /** Models each thread keeps loaded (EnginePoolOptions.maxModels). */
  maxModels?: number;
  /** Models unused this long are unloaded (EnginePoolOptions.unloadAfterMs). */
  unloadAfterMs?: number;
  /**
   * The bucket's uploads (`--store s3://`, the API host's S3Store). Jobs whose uploads the API
   * host kept in Redis (keys `in_...`) are read from Redis either way.
   */
  inputs?: InputStore;
  /** BullMQ's job lock; renewed every half of it while the job runs (default 60 s). */
  lockDurationMs?: number;
  /** How often BullMQ looks for jobs whose lock expired (default 30 s). */
  stalledIntervalMs?: number;
  /** Times a job may be found stalled and run again before it fails (default 2). */
  maxStalledCount?: number;
  /** Heartbeat period; the key lives three of them (default 5 s). */
  heartbeatMs?: number;
  /** How long a result waits for the API host (default 10 min). */
  resultTtlMs?: number;
  /** How often running jobs' cancel keys are read (default 250 ms). */
  cancelPollMs?: number;
  /** Models (names, this host's aliases, folders) each inference thread loads at start, before its first job; results are logged. */
  preload?: string[];
  log?: (level: 'info' | 'warn' | 'error', message: string, extra?: Record<string, unknown>) => void;
}

export interface QueueWorker {
  readonly id: string;
  /**
   * Stops taking jobs, lets running ones finish (up to `deadlineMs`), then stops the rest at their
   * next step and gives them back to the queue for another worker; frees the threads. Called again
   * while closing, the earlier of the two deadlines holds (a second signal: `close(0)`).
   */
  close(deadlineMs?: number): Promise<void>;
}

export async function startQueueWorker(options: QueueWorkerOptions): Promise<QueueWorker> {
  const name = options.name ?? DEFAULT_QUEUE_NAME;
  const k = keys(name);
  const id = `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`;
  const threads = Math.max(1, options.workers ?? 1);
  const log = options.log ?? (() => {});
  const redis = connect(options.redis, { name: `kiln-worker-${id}` });
  // BullMQ's own (it duplicates it for its blocking reads); given, so close() quits it.
  const bullConnection = connect(options.redis);
  const inRedis = new RedisInputStore(redis, name);
  const bucket = options.inputs;
  const inputs: InputStore = bucket
    ? {
        putInput: (bytes, o) => bucket.putInput(bytes, o),
        getInput: (key) => (key.startsWith('in_') ? inRedis.getInput(key) : bucket.getInput(key)),
        deleteInput: (key) => (key.startsWith('in_') ? inRedis.deleteInput(key) : bucket.deleteInput(key)),
      }
    : inRedis;
  const pool = new EnginePool({
    size: threads,
    maxBatch: options.maxBatch,
    maxModels: options.maxModels,
    unloadAfterMs: options.unloadAfterMs,
    catalog: options.catalog,
    inputs,
    device: options.device,
    onEvent: (e) => log(e.type === 'crash' || e.error ? 'error' : e.type === 'warning' ? 'warn' : 'info', e.message),
  });
  const slots = pool.slots;
  const running = new Map<string, AbortController>();
  /** The abort reason of a job stopped by shutdown (a cancel key's abort leaves the default one). */
  const HAND_BACK = new Error('the worker is shutting down: the job goes back to the queue');
  const resultTtlMs = options.resultTtlMs ?? 10 * 60_000;
  const startedAt = Date.now();

  async function processJob(job: BullJob, token?: string): Promise<{ ok: boolean }> {
    const jobId = job.id!;
    const spec = job.data as Job;
    const controller = new AbortController();
    running.set(jobId, controller);
    const publish = (message: ProgressMessage) => {
      void job.updateProgress(message as unknown as object).catch(() => {});
    };
    let result: StoredResult;
    try {
      if (await redis.get(k.cancel(jobId))) controller.abort();
      const output = await pool.run(spec, {
        signal: controller.signal,
        onProgress: (progress) => publish({ progress }),
        onPartial: (p) => publish({ partial: { index: p.index, step: p.step, totalSteps: p.totalSteps, width: p.width, height: p.height, bytes: p.bytes.toString('base64') } }),
      });
      result = {
        ok: true,
        bytes: output.bytes.toString('base64'),
        contentType: output.contentType,
        format: output.format,
        settings: output.settings,
        timings: output.timings,
        ...(output.pose ? { pose: output.pose.toString('base64'), people: output.people } : {}),
        ...(output.imagePromptAdapters ? { imagePromptAdapters: output.imagePromptAdapters } : {}),
        worker: id,
      };
    } catch (err) {
      result = { ok: false, error: serializeError(err), cancelled: controller.signal.aborted, worker: id };
    } finally {
      running.delete(jobId);
    }
    // Stopped by shutdown and not cancelled by its client: back to the queue, whole (no result, so
    // no second image). The cancel key wins: a request that is gone is not run again.
    if (!result.ok && controller.signal.reason === HAND_BACK && !(await redis.get(k.cancel(jobId)).catch(() => null))) {
      try {
        // At the head of the wait list: the next free worker takes it.
        await job.moveToWait(token);
        log('info', 'job given back to the queue (shutting down)', { job: jobId });
      } catch (err) {
        // Left active: once this process stops renewing its lock the stalled check puts it back.
        log('warn', `could not give the job back (${(err as Error).message}); it is run again once its lock expires`, { job: jobId });
      }
      // BullMQ's signal that the job was moved: neither completed nor failed.
      throw new WaitingError();
    }
    // A job cancelled by the API host (its client went away, its request timed out, it was lost
    // from the queue): nobody waits for it any more. The flag's value says why.
    const cancelled = !result.ok && result.cancelled ? await redis.get(k.cancel(jobId)).catch(() => null) : null;
    if (cancelled) {
      log('info', `job cancelled: ${cancelled}`, { job: jobId });
      return { ok: false };
    }
    // Keyed by job id: a job run twice (a stalled first run) leaves one result; the API reads it once.
    await redis.set(k.result(jobId), JSON.stringify(result), 'PX', resultTtlMs);
    log(result.ok ? 'info' : 'warn', result.ok ? 'job done' : `job failed: ${result.error.message}`, { job: jobId, mode: spec.mode, model: spec.model });
    return { ok: result.ok };
  }

  const worker = new Worker(name, processJob, {
    connection: bullConnection,
    prefix: KEY_PREFIX,
    concurrency: slots,
    lockDuration: options.lockDurationMs ?? 60_000,
    stalledInterval: options.stalledIntervalMs ?? 30_000,
    maxStalledCount: options.maxStalledCount ?? 2,
    autorun: false,
  });
  worker.on('error', (err) => log('warn', `queue: ${err.message}`));
  worker.on('stalled', (jobId) => log('warn', 'a job was found stalled and put back in the queue', { job: jobId }));

  const heartbeatMs = options.heartbeatMs ?? 5_000;
  const beat = async () => {
    let models: string[] = [];
    try {
      models = options.catalog.installed().map((m) => m.id);
    } catch {
      models = [];
    }
    const info: WorkerInfo = { id, host: hostname(), pid: process.pid, device: options.device ?? 'cpu', slots, active: running.size, models, loaded: pool.loadedModels(), startedAt };
    await redis.set(k.worker(id), JSON.stringify(info), 'PX', heartbeatMs * 3);
  };
  const heartbeat = setInterval(() => void beat().catch(() => {}), heartbeatMs);
  const cancelPoll = setInterval(() => {
    if (running.size === 0) return;
    const ids = [...running.keys()];
    redis.mget(...ids.map((j) => k.cancel(j))).then(
      (values) => values.forEach((v, i) => v && running.get(ids[i]!)?.abort()),
      () => {},
    );
  }, options.cancelPollMs ?? 250);

  // Posted before any job can reach the threads, so each loads these first (a job for one of them waits for that load).
  for (const model of options.preload ?? []) pool.preload(model);
  await worker.waitUntilReady();
  await beat().catch(() => {});
  void worker.run().catch((err: Error) => log('error', `the queue worker stopped: ${err.message}`));
  log('info', `worker ${id} takes jobs (${threads} inference thread(s), ${slots} job(s) at once)`);

  let closing: Promise<void> | undefined;
  let deadline = Infinity;
  let stopper: NodeJS.Timeout | undefined;
  const handBack = () => {
    for (const c of running.values()) c.abort(HAND_BACK);
  };
  /** (Re)arms the hand-back for the earliest deadline asked for. */
  const handBackAt = (at: number) => {
    if (at >= deadline) return;
    deadline = at;
    clearTimeout(stopper);
    stopper = setTimeout(handBack, Math.max(0, at - Date.now()));
  };

  return {
    id,
    close(deadlineMs = 30_000) {
      handBackAt(Date.now() + Math.max(0, deadlineMs));
      closing ??= (async () => {
        clearInterval(heartbeat);
        await redis.del(k.worker(id)).catch(() => {});
        // Resolves once every running job has finished or been given back (BullMQ takes no new one meanwhile).
        await worker.close();
        clearTimeout(stopper);
        clearInterval(cancelPoll);
        await pool.close();
        await Promise.allSettled([redis.quit(), bullConnection.quit()]);
      })();
      return closing;
    },
  };
}
