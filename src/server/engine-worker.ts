/**
 * The inference worker thread: owns one Engine (its ONNX sessions) and runs one job at a time,
 * off the server's event loop. Protocol in engine-protocol.ts.
 *
 * Cancellation reaches it two ways: a `cancel` message (handled when this thread's event loop
 * is free, e.g. while a model loads) and a shared Int32 cell the server sets to the job id,
 * checked at every engine progress callback (each denoising step) even while onnxruntime keeps
 * this thread busy.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { Engine } from '../engine/engine.js';
import { generate } from '../engine/pipeline.js';
import { img2img, prepareInitImage } from '../engine/index.js';
import { parseSize } from '../engine/presets.js';
import { encodeGeneratedPng, encodeImage } from '../engine/image-codec.js';
import type { JobSpec } from '../queue/types.js';
import { serializeError, type FromWorker, type ToWorker, type WorkerInit } from './engine-protocol.js';

const init = workerData as WorkerInit;
const port = parentPort!;
const cancelCell = new Int32Array(init.cancel);
const engine = new Engine({ device: init.device, searchDirs: init.searchDirs });
let current: { id: number; controller: AbortController } | undefined;

const post = (msg: FromWorker, transfer: ArrayBuffer[] = []) => port.postMessage(msg, transfer);

const CONTENT_TYPES = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' } as const;

async function run(id: number, spec: JobSpec): Promise<void> {
  const controller = new AbortController();
  current = { id, controller };
  const checkCancel = () => {
    if (!controller.signal.aborted && Atomics.load(cancelCell, 0) === id) controller.abort();
  };
  try {
    checkCancel();
    const model = await engine.model(spec.model);
    checkCancel();
    const options = {
      ...spec.options,
      signal: controller.signal,
      onProgress: (progress: { stage: 'encode' | 'denoise' | 'decode'; step: number; totalSteps: number }) => {
        checkCancel();
        post({ type: 'progress', id, progress });
      },
    };
    let result;
    if (spec.kind === 'edit') {
      const first = spec.images?.[0];
      if (!first) throw new Error('an edit job needs an image');
      const { width, height } = parseSize(spec.options.size);
      const image = await prepareInitImage(Buffer.from(first.buffer, first.byteOffset, first.byteLength), width, height);
      checkCancel();
      result = await img2img(model, { ...options, image, strength: spec.strength });
    } else {
      result = await generate(model, options);
    }
    const format = spec.output.format;
    const bytes =
      format === 'png'
        ? await encodeGeneratedPng(result.image, result.settings)
        : await encodeImage(result.image, { format, quality: spec.output.quality });
    // A standalone ArrayBuffer (a Buffer may be a view into a shared pool) to transfer, not copy.
    const data = new Uint8Array(bytes.byteLength);
    data.set(bytes);
    post(
      { type: 'done', id, bytes: data.buffer, contentType: CONTENT_TYPES[format], format, settings: result.settings, timings: result.timings },
      [data.buffer],
    );
  } catch (err) {
    post({ type: 'failed', id, error: serializeError(err), cancelled: controller.signal.aborted });
  } finally {
    current = undefined;
  }
}

port.on('message', (msg: ToWorker) => {
  switch (msg.type) {
    case 'run':
      void run(msg.id, msg.spec);
      break;
    case 'cancel':
      if (current?.id === msg.id) current.controller.abort();
      break;
    case 'preload':
      engine.model(msg.model).then(
        () => post({ type: 'preloaded', model: msg.model }),
        (err: unknown) => post({ type: 'preloaded', model: msg.model, error: serializeError(err) }),
      );
      break;
    case 'close':
      current?.controller.abort();
      void engine.close().finally(() => port.close());
      break;
  }
});

post({ type: 'ready' });
