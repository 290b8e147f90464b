/**
 * A JobRunner over inference worker threads, each owning its own Engine (thread.ts). Jobs are
 * resolved on this host first (prepare.ts: the catalog's folders, the input store's bytes).
 * A worker that dies (native crash, out of memory) fails its job and is replaced.
 * Used by `kiln serve` (one machine) and by `kiln worker` (scale-out, src/runner/worker.ts).
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { EventEmitter } from 'node:events';
import type { Device } from '../engine/onnx.js';
import type { UnloadReason } from '../engine/engine.js';
import { GenerationCancelledError } from '../engine/errors.js';
import type { JobOutput, JobRunner, JobSpec, RunContext } from '../queue/types.js';
import type { ModelCatalog } from '../catalog/catalog.js';
import type { InputStore } from '../store/types.js';
import { loraCacheSize, maxModels, previewBudget } from '../catalog/home.js';
import { jobModel, toEngineJob } from './prepare.js';
import { deserializeError, type FromWorker, type EngineTuning, type ToWorker, type WorkerInit } from './protocol.js';

export interface EnginePoolOptions {
  /** Worker threads. Default 1: one job already uses every core. */
  size?: number;
  /**
   * Jobs each worker runs at once, their denoising steps batched into shared UNet runs
   * (src/engine/unet-batcher.ts; images byte for byte as alone). Default 1: one job at a time.
   */
  maxBatch?: number;
  /** Models and every folder the threads' engines use (the threads read no environment). */
  catalog: ModelCatalog;
  /** Where the jobs' uploads are (InputStore keys). */
  inputs?: InputStore;
  device?: Device;
  /** LoRA variants each thread's engine keeps loaded (default: $KILN_LORA_CACHE, else the engine's 2). */
  loraCacheSize?: number;
  /** Models each thread's engine keeps loaded, idle ones unloaded least recently used first (default: $KILN_MAX_MODELS, else no bound). */
  maxModels?: number;
  /** Models unused this long are unloaded (default: never). */
  unloadAfterMs?: number;
  /** The share of a run's time tiny-decoder previews may take (default: $KILN_PREVIEW_BUDGET, else 0.05). */
  previewBudget?: number;
  /** Worker lifecycle messages (crashes, preload results) and the engine's warnings. */
  onEvent?: (event: { type: 'crash' | 'preloaded' | 'unloaded' | 'warning'; message: string; error?: Error; model?: string }) => void;
}

interface Pending {
  id: number;
  context: RunContext;
  resolve: (output: JobOutput) => void;
  reject: (err: unknown) => void;
  /** Known once the job is resolved on this thread (prepare.ts); added to its output. */
  imagePromptAdapters?: string[];
}

/** Starts the worker entry: the .ts source under tsx (tests, `npm run`), the .js build under dist. */
function startWorker(init: WorkerInit): Worker {
  const here = import.meta.url;
  if (here.endsWith('.ts')) {
    // Node 20 does not apply --import loaders to worker threads (nodejs/node#47747), so the
    // worker registers tsx itself before importing the TypeScript entry.
    const tsx = import.meta.resolve('tsx/esm/api');
    const entry = new URL('./thread.ts', here).href;
    const code = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); });`;
    return new Worker(code, { eval: true, workerData: init, execArgv: [] });
  }
  return new Worker(new URL('./thread.js', here), { workerData: init });
}

/** A duration (--unload-after) as people wrote it: `10 min`, `45 s`, `200 ms`. */
export function describeDuration(ms: number): string {
  if (ms >= 60_000 && ms % 60_000 === 0) return `${ms / 60_000} min`;
  if (ms % 1000 === 0) return `${ms / 1000} s`;
  return `${ms} ms`;
}

class WorkerSlot {
  worker!: Worker;
  cancelCell!: Int32Array;
  /** The jobs it runs (up to the pool's maxBatch), by id. */
  readonly pending = new Map<number, Pending>();
  /** The models its engine holds now (by the name each was loaded under; a replaced folder briefly twice). */
  readonly loaded = new Map<string, number>();
  exited = false;

  constructor(private readonly pool: EnginePool) {
    this.spawn();
  }

  spawn(): void {
    const shared = new SharedArrayBuffer(4);
    this.cancelCell = new Int32Array(shared);
    this.exited = false;
    const { catalog, device = 'cpu' } = this.pool.options;
    this.worker = startWorker({ folders: catalog.folders, device, cancel: shared, maxBatch: this.pool.maxBatch, sessionThreads: this.pool.sessionThreads, tuning: this.pool.tuning });
    this.worker.on('message', (msg: FromWorker) => this.onMessage(msg));
    this.worker.on('error', (err) => this.onExit(err));
    this.worker.on('exit', (code) => this.onExit(new Error(`the inference worker exited with code ${code}`)));
  }

  post(msg: ToWorker): void {
    if (!this.exited) this.worker.postMessage(msg);
  }

  run(id: number, spec: JobSpec, context: RunContext): Promise<JobOutput> {
    return new Promise<JobOutput>((resolve, reject) => {
      const fail = (err: unknown) => {
        if (!this.pending.has(id)) return;
        this.pending.delete(id);
        reject(err);
        this.pool.release(this);
      };
      this.pending.set(id, { id, context, resolve, reject });
      const onAbort = () => {
        Atomics.store(this.cancelCell, 0, id);
        this.post({ type: 'cancel', id });
      };
      if (context.signal.aborted) onAbort();
      else context.signal.addEventListener('abort', onAbort, { once: true });
      // Resolved on this thread (the input store lives here); a job that cannot be resolved fails without running.
      toEngineJob(spec, this.pool.options.catalog, this.pool.options.inputs).then(
        ({ engineJob, imagePromptAdapters }) => {
          const p = this.pending.get(id);
          if (!p) return;
          if (imagePromptAdapters) p.imagePromptAdapters = imagePromptAdapters;
          this.post({ type: 'run', id, job: engineJob });
        },
        fail,
      );
    });
  }

  private onMessage(msg: FromWorker): void {
    const p = 'id' in msg ? this.pending.get(msg.id) : undefined;
    switch (msg.type) {
      case 'progress':
        if (p?.id === msg.id) p.context.onProgress(msg.progress);
        break;
      case 'partial':
        if (p?.id === msg.id) {
          const { index, step, totalSteps, width, height } = msg;
          p.context.onPartial?.({ index, step, totalSteps, width, height, bytes: Buffer.from(msg.bytes) });
        }
        break;
      case 'done':
        if (p?.id === msg.id) {
          this.pending.delete(msg.id);
          const output: JobOutput = {
            bytes: Buffer.from(msg.bytes),
            contentType: msg.contentType,
            format: msg.format,
            settings: msg.settings,
            timings: msg.timings,
          };
          if (msg.pose) output.pose = Buffer.from(msg.pose);
          if (msg.people !== undefined) output.people = msg.people;
          if (p.imagePromptAdapters) output.imagePromptAdapters = p.imagePromptAdapters;
          p.resolve(output);
          this.pool.release(this);
        }
        break;
      case 'failed':
        if (p?.id === msg.id) {
          this.pending.delete(msg.id);
          p.reject(msg.cancelled ? new GenerationCancelledError() : deserializeError(msg.error));
          this.pool.release(this);
        }
        break;
      case 'preloaded':
        this.pool.options.onEvent?.({
          type: 'preloaded',
          message: msg.error ? `could not preload ${msg.model}: ${msg.error.message}` : `preloaded ${msg.model}`,
          error: msg.error ? deserializeError(msg.error) : undefined,
        });
        break;
      case 'loaded':
        this.loaded.set(msg.model, (this.loaded.get(msg.model) ?? 0) + 1);
        break;
      case 'unloaded': {
        const left = (this.loaded.get(msg.model) ?? 1) - 1;
        if (left > 0) this.loaded.set(msg.model, left);
        else this.loaded.delete(msg.model);
        this.pool.options.onEvent?.({ type: 'unloaded', model: msg.model, message: `unloaded ${msg.model} (${this.unloadReason(msg.why)})` });
        break;
      }
      case 'warning':
        this.pool.options.onEvent?.({ type: 'warning', message: msg.message });
        break;
      case 'ready':
        break;
    }
  }

  private unloadReason(why: UnloadReason): string {
    const { maxModels, unloadAfterMs } = this.pool.tuning;
    if (why === 'capacity') return `idle; at most ${maxModels} model(s) loaded per inference thread`;
    if (why === 'idle') return `unused for ${describeDuration(unloadAfterMs!)}`;
    return 'its folder was replaced';
  }

  private onExit(err: Error): void {
    if (this.exited) return;
    this.exited = true;
    this.loaded.clear();
    const jobs = [...this.pending.values()];
    this.pending.clear();
    if (this.pool.closing) {
      for (const p of jobs) p.reject(new GenerationCancelledError(new Error('the server is shutting down')));
      return;
    }
    this.pool.options.onEvent?.({ type: 'crash', message: `inference worker failed: ${err.message}; starting a new one`, error: err });
    for (const p of jobs) p.reject(new Error(`the inference worker failed while generating: ${err.message}`));
    this.worker.removeAllListeners();
    this.spawn();
    for (let i = 0; i < jobs.length; i++) this.pool.release(this);
  }
}

export class EnginePool extends EventEmitter implements JobRunner {
  /** Jobs run at once: workers x maxBatch. */
  readonly slots: number;
  readonly maxBatch: number;
  readonly tuning: EngineTuning;
  /** Threads per ONNX Runtime session in each worker thread (0: the default). */
  readonly sessionThreads: number;
  closing = false;
  private readonly workers: WorkerSlot[] = [];
  /** One entry per job a worker can take now (a worker appears up to maxBatch times). */
  private readonly idle: WorkerSlot[] = [];
  private nextId = 1;

  constructor(readonly options: EnginePoolOptions) {
    super();
    const size = Math.max(1, options.size ?? 1);
    this.maxBatch = Math.max(1, options.maxBatch ?? 1);
    // The environment's tuning is read here, once, on the runner's side: the threads' engines get values.
    this.tuning = { loraCacheSize: options.loraCacheSize ?? loraCacheSize(), maxModels: options.maxModels ?? maxModels(), unloadAfterMs: options.unloadAfterMs, previewBudget: options.previewBudget ?? previewBudget() };
    this.slots = size * this.maxBatch;
    // One thread: ONNX Runtime's default (every physical core). Several: the cores shared among them.
    this.sessionThreads = size > 1 ? Math.max(1, Math.floor(availableParallelism() / size)) : 0;
    for (let i = 0; i < size; i++) this.workers.push(new WorkerSlot(this));
    // Jobs spread over the workers before any worker takes a second one.
    for (let k = 0; k < this.maxBatch; k++) this.idle.push(...this.workers);
  }

  run(spec: JobSpec, context: RunContext): Promise<JobOutput> {
    if (this.closing) return Promise.reject(new GenerationCancelledError(new Error('the server is shutting down')));
    const slot = this.idle.shift();
    // The queue never runs more jobs than there are slots.
    if (!slot) return Promise.reject(new Error('no idle inference worker (more jobs than slots)'));
    const id = this.nextId++;
    return slot.run(id, spec, context);
  }

  /** Loads a model in every worker ahead of the first request (errors are reported, not thrown). */
  preload(model: string): void {
    let found: { dir: string; name: string };
    try {
      // A job's lookup (an alias: the model it stands for), so the preloaded model is the one such jobs run.
      found = jobModel(model, this.options.catalog);
    } catch (err) {
      this.options.onEvent?.({ type: 'preloaded', message: `could not preload ${model}: ${(err as Error).message}`, error: err as Error });
      return;
    }
    for (const w of this.workers) w.post({ type: 'preload', model: found });
  }

  /** The models loaded now: each name with the number of inference threads holding it. */
  loadedModels(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const w of this.workers) for (const name of w.loaded.keys()) out[name] = (out[name] ?? 0) + 1;
    return Object.fromEntries(Object.entries(out).sort(([a], [b]) => a.localeCompare(b)));
  }

  /** @internal */
  release(slot: WorkerSlot): void {
    if (this.idle.filter((s) => s === slot).length + slot.pending.size < this.maxBatch) this.idle.push(slot);
  }

  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(
      this.workers.map(async (w) => {
        if (w.exited) return;
        const exited = new Promise((resolve) => w.worker.once('exit', resolve));
        w.post({ type: 'close' });
        // The worker stops its job at the next step and frees its sessions; terminating it while
        // ONNX Runtime is mid-run can abort the whole process, so it gets ample time first.
        const timer = setTimeout(() => void w.worker.terminate(), 15_000);
        await exited;
        clearTimeout(timer);
      }),
    );
  }
}
