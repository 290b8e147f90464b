/**
 * Messages between a runner (EnginePool, pool.ts) and its inference worker threads (thread.ts).
 *
 *   runner -> thread   run {id, job}   cancel {id}   preload {model}   close
 *   thread -> runner   ready   progress {id, progress}   partial {id, index, ...}   done {id, bytes, ...}   failed {id, error}
 *                      preloaded {model, error?}   loaded {model}   unloaded {model, why}   warning {message}
 *
 * A thread runs up to `maxBatch` jobs at once (their UNet steps batched; one by default). Besides
 * `cancel`, the runner writes the id of a job to stop into the shared Int32 cell `cancel`
 * (workerData), which the thread reads at every step. Errors travel as SerializedError (also
 * through Redis, src/queue/bullmq.ts) and are rebuilt as the engine's classes, so the server maps
 * them like local ones.
 */
import type { Device } from '../engine/onnx.js';
import type { EffectiveSettings, Progress, Timings } from '../engine/pipeline.js';
import type { OutputFormat } from '../engine/image-codec.js';
import type { EngineJob } from '../engine/run-job.js';
import type { UnloadReason } from '../engine/engine.js';
import type { EngineFolders } from '../catalog/catalog.js';
import { AssetUnavailableError } from '../catalog/errors.js';
import { ImagePromptUnavailableError } from '../catalog/image-prompt-assets.js';
import { PoseUnavailableError } from '../catalog/pose-assets.js';
import { NoPersonError } from '../engine/pose-control.js';
import {
  DeviceUnavailableError,
  GenerationCancelledError,
  InvalidOptionError,
  ModelLoadError,
  ModelNotFoundError,
  NumericalError,
} from '../engine/errors.js';

export interface WorkerInit {
  /** Every folder the thread's Engine uses (from the catalog: the thread reads no environment). */
  folders: EngineFolders;
  device: Device;
  /** SharedArrayBuffer of one Int32: the id of the job to stop. */
  cancel: SharedArrayBuffer;
  /** Jobs run at once, their UNet calls batched step by step (src/engine/unet-batcher.ts); default 1. */
  maxBatch?: number;
  /** Threads per ONNX Runtime session (0: one per physical core); the runner shares the cores among its threads. */
  sessionThreads: number;
  /** Engine tuning the runner resolved ($KILN_LORA_CACHE, $KILN_MAX_MODELS, $KILN_PREVIEW_BUDGET). */
  tuning: EngineTuning;
}

export interface EngineTuning {
  loraCacheSize?: number;
  maxModels?: number;
  unloadAfterMs?: number;
  previewBudget?: number;
}

export type ToWorker =
  | { type: 'run'; id: number; job: EngineJob }
  | { type: 'cancel'; id: number }
  | { type: 'preload'; model: { dir: string; name: string } }
  | { type: 'close' };

export interface SerializedError {
  name: string;
  message: string;
  param?: string;
  model?: string;
  path?: string;
  /** AssetUnavailableError's code (pose_model_missing, image_prompt_model_missing). */
  code?: string;
  stack?: string;
}

export type FromWorker =
  | { type: 'ready' }
  | { type: 'progress'; id: number; progress: Progress }
  | { type: 'partial'; id: number; index: number; step: number; totalSteps: number; width: number; height: number; bytes: ArrayBuffer }
  | {
      type: 'done';
      id: number;
      bytes: ArrayBuffer;
      contentType: string;
      format: OutputFormat;
      settings: EffectiveSettings;
      timings: Timings;
      pose?: ArrayBuffer;
      people?: number;
    }
  | { type: 'failed'; id: number; error: SerializedError; cancelled: boolean }
  | { type: 'preloaded'; model: string; error?: SerializedError }
  /** The engine loaded a model. */
  | { type: 'loaded'; model: string }
  /** The engine unloaded an idle model (to keep within maxModels, idle past unloadAfterMs, or replaced). */
  | { type: 'unloaded'; model: string; why: UnloadReason }
  /** Something the engine reports that does not stop a job (LoRA modules matching nothing, ...). */
  | { type: 'warning'; message: string };

export function serializeError(err: unknown): SerializedError {
  if (!(err instanceof Error)) return { name: 'Error', message: String(err) };
  // Subclasses of InvalidOptionError other than NoPersonError travel as their base class, as do
  // ModelLoadError's (a broken safetensors file, a LoRA for another model).
  const name =
    err instanceof InvalidOptionError && !(err instanceof NoPersonError) ? 'InvalidOptionError' : err instanceof ModelLoadError ? 'ModelLoadError' : err.name;
  const out: SerializedError = { name, message: err.message, stack: err.stack };
  if (err instanceof InvalidOptionError) out.param = err.param;
  if (err instanceof ModelNotFoundError) out.model = err.model;
  if (err instanceof ModelLoadError && err.path) out.path = err.path;
  if (err instanceof AssetUnavailableError) Object.assign(out, { param: err.param, code: err.code });
  return out;
}

/** Rebuilds the engine's error classes so the server maps them like local ones. */
export function deserializeError(e: SerializedError): Error {
  let err: Error;
  switch (e.name) {
    case 'InvalidOptionError':
      err = new InvalidOptionError(e.message, e.param ?? 'unknown');
      break;
    case 'NoPersonError':
      err = new NoPersonError();
      break;
    case 'ModelNotFoundError':
      err = new ModelNotFoundError(e.message, e.model ?? '');
      break;
    case 'ModelLoadError':
      err = new ModelLoadError(e.message, e.path);
      break;
    case 'DeviceUnavailableError':
      err = new DeviceUnavailableError(e.message);
      break;
    case 'NumericalError':
      err = new NumericalError(e.message);
      break;
    case 'PoseUnavailableError':
      err = new PoseUnavailableError(e.message);
      break;
    case 'ImagePromptUnavailableError':
      err = new ImagePromptUnavailableError(e.message, e.param === 'style' ? 'style' : 'user');
      break;
    case 'AssetUnavailableError':
      err = new AssetUnavailableError(e.message, e.param ?? 'user', e.code ?? 'model_missing');
      break;
    case 'AbortError':
      err = new GenerationCancelledError(new Error(e.message));
      break;
    default:
      err = new Error(e.message);
      err.name = e.name;
  }
  if (e.stack) err.stack = `${err.name}: ${err.message} (in the inference worker)\n${e.stack.split('\n').slice(1).join('\n')}`;
  return err;
}
