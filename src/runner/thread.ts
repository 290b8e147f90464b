/**
 * An inference worker thread: one Engine (its ONNX sessions) behind the JobEngine entry point
 * (src/engine/run-job.ts), running one job at a time (with `maxBatch` > 1 up to that many, their
 * UNet steps batched) off the process's event loop, so that
 * HTTP (kiln serve) or BullMQ's lock renewals (kiln worker) go on while ONNX Runtime computes.
 * Protocol in protocol.ts.
 *
 * Cancellation reaches it two ways: a `cancel` message (handled when this thread's event loop
 * is free, e.g. while a model loads) and a shared Int32 cell the runner sets to the job id,
 * checked at every engine progress callback (each denoising step) even while onnxruntime keeps
 * this thread busy.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { Engine } from '../engine/engine.js';
import { JobEngine } from '../engine/run-job.js';
import { setSessionThreads } from '../engine/onnx.js';
import { serializeError, type FromWorker, type ToWorker, type WorkerInit } from './protocol.js';

const init = workerData as WorkerInit;
const port = parentPort!;
const cancelCell = new Int32Array(init.cancel);
const post = (msg: FromWorker, transfer: ArrayBuffer[] = []) => port.postMessage(msg, transfer);
const { home, searchDirs, cacheDir, lorasDir } = init.folders;
// Warnings (LoRA modules that match nothing, unused checkpoint tensors) go to the server's log.
const warn = (message: string) => post({ type: 'warning', message });
setSessionThreads(init.sessionThreads);
const engine = new Engine({
  device: init.device,
  home,
  searchDirs,
  cacheDir,
  lorasDir,
  ...init.tuning,
  onWarning: warn,
  onLoad: (model) => post({ type: 'loaded', model }),
  onUnload: (model, why) => post({ type: 'unloaded', model, why }),
});
const jobs = new JobEngine(engine, init.device, { maxBatch: init.maxBatch, onWarning: warn });
const controllers = new Map<number, AbortController>();

/** A standalone ArrayBuffer (a Buffer may be a view into a shared pool) to transfer, not copy. */
function standalone(bytes: Buffer): Uint8Array<ArrayBuffer> {
  const data = new Uint8Array(bytes.byteLength);
  data.set(bytes);
  return data;
}

async function run(id: number, msg: Extract<ToWorker, { type: 'run' }>): Promise<void> {
  const controller = new AbortController();
  controllers.set(id, controller);
  try {
    const result = await jobs.run(msg.job, {
      signal: controller.signal,
      isCancelled: () => Atomics.load(cancelCell, 0) === id,
      onProgress: (progress) => post({ type: 'progress', id, progress }),
      onPartial: (p) => {
        const data = standalone(p.bytes);
        post({ type: 'partial', id, index: p.index, step: p.step, totalSteps: p.totalSteps, width: p.width, height: p.height, bytes: data.buffer }, [data.buffer]);
      },
    });
    const data = standalone(result.bytes);
    const poseData = result.pose ? standalone(result.pose) : undefined;
    post(
      {
        type: 'done',
        id,
        bytes: data.buffer,
        contentType: result.contentType,
        format: result.format,
        settings: result.settings,
        timings: result.timings,
        ...(poseData ? { pose: poseData.buffer, people: result.people } : {}),
      },
      poseData ? [data.buffer, poseData.buffer] : [data.buffer],
    );
  } catch (err) {
    const cancelled = controller.signal.aborted || Atomics.load(cancelCell, 0) === id;
    post({ type: 'failed', id, error: serializeError(err), cancelled });
  } finally {
    controllers.delete(id);
  }
}

port.on('message', (msg: ToWorker) => {
  switch (msg.type) {
    case 'run':
      void run(msg.id, msg);
      break;
    case 'cancel':
      controllers.get(msg.id)?.abort();
      break;
    case 'preload':
      jobs.preload(msg.model).then(
        () => post({ type: 'preloaded', model: msg.model.name }),
        (err: unknown) => post({ type: 'preloaded', model: msg.model.name, error: serializeError(err) }),
      );
      break;
    case 'close':
      // The job in flight stops at its next step; its sessions are freed once it has.
      for (const c of controllers.values()) c.abort();
      void jobs.close().finally(() => port.close());
      break;
  }
});

post({ type: 'ready' });
