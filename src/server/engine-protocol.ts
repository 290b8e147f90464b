/**
 * Messages between the server (EnginePool) and its inference worker threads (engine-worker.ts).
 *
 *   server -> worker   run {id, spec}   cancel {id}   preload {model}   close
 *   worker -> server   ready   progress {id, progress}   partial {id, index, ...}   done {id, bytes, ...}   failed {id, error}
 *                      preloaded {model, error?}   warning {message}
 *
 * A worker runs up to `maxBatch` jobs at once (their UNet steps batched; one by default). Besides
 * `cancel`, the server writes the id of a job to stop into the shared Int32 cell `cancel`
 * (workerData), which the worker reads at every step.
 */
import type { Device } from '../engine/onnx.js';
import type { EffectiveSettings, Progress, Timings } from '../engine/pipeline.js';
import type { OutputFormat } from '../engine/image-codec.js';
import type { JobOutput, JobSpec } from '../queue/types.js';
import { NoPersonError } from '../engine/pose-control.js';
import {
  DeviceUnavailableError,
  GenerationCancelledError,
  InvalidOptionError,
  ModelLoadError,
  ModelNotFoundError,
  NumericalError,
} from '../engine/errors.js';

/**
 * What the edits route adds to a queued edit job (the queue passes specs through untouched).
 * Without `mask`, `pose` and `imagePrompt` an edit is image-to-image.
 */
export interface EditJobSpec extends JobSpec {
  /** Inpainting: the validated mask PNG (same dimensions as the image; either convention). */
  mask?: Uint8Array;
  /** Pose mode: the ControlNet scale and the assets resolved for the model (pose-assets.ts). */
  pose?: { scale: number; controlNet: string; dwpose: string };
  /**
   * The upload is an image prompt: the adapters resolved for the model (image-prompt-assets.ts),
   * each at its weight; none when every weight is 0 (the plain model). Without a mask or
   * `strength` the image is drawn from noise; with `strength`, from the upload (image-to-image).
   */
  imagePrompt?: { adapters: { adapter: string; imageEncoder: string; weight: number }[] };
}

/** A finished job; pose mode adds the skeleton picture (same format as the image). */
export interface EditJobOutput extends JobOutput {
  pose?: Buffer;
  /** People DWPose found (pose mode). */
  people?: number;
}

export interface WorkerInit {
  searchDirs: string[];
  device: Device;
  /** SharedArrayBuffer of one Int32: the id of the job to stop. */
  cancel: SharedArrayBuffer;
  /** Jobs run at once, their UNet calls batched step by step (src/engine/unet-batcher.ts); default 1. */
  maxBatch?: number;
}

export type ToWorker =
  | { type: 'run'; id: number; spec: JobSpec }
  | { type: 'cancel'; id: number }
  | { type: 'preload'; model: string }
  | { type: 'close' };

export interface SerializedError {
  name: string;
  message: string;
  param?: string;
  model?: string;
  path?: string;
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
