/**
 * The inference worker thread: owns one Engine (its ONNX sessions) and runs one job at a time,
 * off the server's event loop; with `maxBatch` > 1 up to that many, whose denoising steps share
 * UNet runs (src/engine/unet-batcher.ts). Protocol in engine-protocol.ts.
 *
 * Cancellation reaches it two ways: a `cancel` message (handled when this thread's event loop
 * is free, e.g. while a model loads) and a shared Int32 cell the server sets to the job id,
 * checked at every engine progress callback (each denoising step) even while onnxruntime keeps
 * this thread busy.
 */
import { statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import sharp from 'sharp';
import { Engine } from '../engine/engine.js';
import { generate, resolveModelSize, type GenerateResult } from '../engine/pipeline.js';
import { img2img, prepareInitImage } from '../engine/img2img.js';
import { inpaint, prepareMask } from '../engine/inpaint.js';
import { poseGenerate, type PoseAssets } from '../engine/pose-control.js';
import { loadPoseModels, type PoseModels } from '../engine/pose/index.js';
import { InvalidOptionError, ModelLoadError } from '../engine/errors.js';
import { loadImagePrompt, type ImagePrompt, type ImagePromptRunner } from '../engine/image-prompt.js';
import { OnnxModel } from '../engine/onnx.js';
import type { DiffusionModel } from '../engine/model.js';
import type { RgbImage } from '../engine/vae.js';
import { encodeGeneratedPng, encodeImage } from '../engine/image-codec.js';
import { createPreviewer, learnFromResult } from '../engine/preview.js';
import { UnetBatcher } from '../engine/unet-batcher.js';
import { serializeError, type EditJobSpec, type FromWorker, type ToWorker, type WorkerInit } from './engine-protocol.js';
import { redactPaths } from './errors.js';

const init = workerData as WorkerInit;
const port = parentPort!;
const cancelCell = new Int32Array(init.cancel);
const post = (msg: FromWorker, transfer: ArrayBuffer[] = []) => port.postMessage(msg, transfer);
// Warnings (LoRA modules that match nothing, unused checkpoint tensors) go to the server's log.
const engine = new Engine({ device: init.device, searchDirs: init.searchDirs, onWarning: (message) => post({ type: 'warning', message }) });
/** The jobs in flight, by id. */
const current = new Map<number, AbortController>();
/** Their runs: sessions are released only after they settle (releasing one mid-run aborts the process). */
const running = new Set<Promise<void>>();
const batcher = (init.maxBatch ?? 1) > 1 ? new UnetBatcher({ maxBatch: init.maxBatch! }) : undefined;

const CONTENT_TYPES = { png: 'image/png', jpeg: 'image/jpeg', webp: 'image/webp' } as const;

// ---- pose assets: loaded once per worker, kept until their files change ---------------------

/** Identity of a file's current contents (a re-pull swaps it): inode and modification time. */
function fileVersion(path: string): string {
  try {
    const st = statSync(path);
    return `${st.ino}:${st.mtimeMs}`;
  } catch {
    return 'missing';
  }
}

const controlNets = new Map<string, { version: string; loading: Promise<OnnxModel> }>();
const poseNets = new Map<string, { version: string; loading: Promise<PoseModels> }>();

function cached<T>(cache: Map<string, { version: string; loading: Promise<T> }>, key: string, version: string, load: () => Promise<T>): Promise<T> {
  const hit = cache.get(key);
  if (hit && hit.version === version) return hit.loading;
  const loading = load();
  // A failed load is not kept: a fixed install is picked up by the next request.
  loading.catch(() => {
    if (cache.get(key)?.loading === loading) cache.delete(key);
  });
  cache.set(key, { version, loading });
  return loading;
}

async function poseAssets(paths: NonNullable<EditJobSpec['pose']>): Promise<PoseAssets> {
  const options = { device: init.device };
  const [controlNet, pose] = await Promise.all([
    cached(controlNets, paths.controlNet, fileVersion(paths.controlNet), () => OnnxModel.load(paths.controlNet, dirname(paths.controlNet), options)),
    cached(poseNets, paths.dwpose, fileVersion(paths.dwpose), () => loadPoseModels(paths.dwpose, paths.dwpose, options)),
  ]);
  return { controlNet, detector: pose.detector, poseNet: pose.poseNet };
}

// ---- image prompts: each model's adapters loaded once, again when their files change -------

const runners = new Map<string, { version: string; runner: ImagePromptRunner }>();
/** Loads under way: jobs running at once (--max-batch) that need the same adapters share one. */
const loadingRunners = new Map<string, Promise<ImagePromptRunner>>();

async function imagePromptRunner(model: DiffusionModel, spec: NonNullable<EditJobSpec['imagePrompt']>): Promise<ImagePromptRunner> {
  const files = spec.adapters.map((a) => ({ adapter: a.adapter, imageEncoder: a.imageEncoder }));
  const key = JSON.stringify([model.layout.dir, files]);
  const version = files.map((f) => `${fileVersion(f.adapter)}/${fileVersion(join(f.imageEncoder, 'model.safetensors'))}`).join(',');
  const inFlight = loadingRunners.get(key);
  if (inFlight) return inFlight;
  const known = runners.get(key);
  if (known && known.version === version && known.runner.model === model) return known.runner;
  const loading = (async () => {
    // A re-pulled adapter or encoder, or a reloaded model: the old sessions go once the jobs running now (which may use them) are done.
    if (known) {
      runners.delete(key);
      const busy = [...running];
      if (busy.length > 1) void Promise.allSettled(busy).then(() => known.runner.release());
      else await known.runner.release();
    }
    const runner = await loadImagePrompt(model, files, engine);
    runners.set(key, { version, runner });
    return runner;
  })();
  loadingRunners.set(key, loading);
  try {
    return await loading;
  } finally {
    loadingRunners.delete(key);
  }
}

/**
 * The image prompt of an edit: the model's adapters and the upload as CLIP sees it (upright, its
 * alpha dropped as PIL's convert('RGB') does, at its own resolution: CLIP's preprocessing
 * resizes and crops it). Undefined when every weight is 0 (the plain model runs).
 */
async function imagePromptFor(model: DiffusionModel, spec: EditJobSpec, upload: Buffer): Promise<ImagePrompt | undefined> {
  const ip = spec.imagePrompt;
  if (!ip || ip.adapters.length === 0) return undefined;
  let runner: ImagePromptRunner;
  try {
    runner = await imagePromptRunner(model, ip);
  } catch (err) {
    // An adapter of another family, an ONNX-only model, a broken file: the request cannot be served as asked.
    if (err instanceof ModelLoadError) throw new InvalidOptionError(`the image prompt cannot be used: ${redactPaths(err.message)}`, 'user');
    throw err;
  }
  const { data, info } = await sharp(upload).rotate().removeAlpha().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`expected RGB after conversion, got ${info.channels} channels`);
  const image: RgbImage = { width: info.width, height: info.height, pixels: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
  return { runner, image, scale: ip.adapters.map((a) => a.weight) };
}

/**
 * The upload pose is estimated on: upright (EXIF orientation), alpha composited on white and the largest centred region of
 * the output's shape cropped (the edit rule, so the skeleton lands where it was), at its own
 * resolution.
 */
async function poseInput(bytes: Buffer, outWidth: number, outHeight: number): Promise<RgbImage> {
  const meta = await sharp(bytes).metadata();
  const { width, height } = meta.autoOrient ?? { width: meta.width ?? 0, height: meta.height ?? 0 };
  const cropW = Math.min(width, Math.round((height * outWidth) / outHeight));
  const cropH = Math.min(height, Math.round((width * outHeight) / outWidth));
  const { data, info } = await sharp(bytes)
    .rotate()
    .flatten({ background: '#ffffff' })
    .extract({ left: Math.floor((width - cropW) / 2), top: Math.floor((height - cropH) / 2), width: cropW, height: cropH })
    .removeAlpha()
    .toColourspace('srgb')
    .raw()
    .toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`expected RGB after conversion, got ${info.channels} channels`);
  return { width: info.width, height: info.height, pixels: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

/** A model whose only UNet is a 9-channel inpainting one can only inpaint. */
function refuseInpaintOnly(model: DiffusionModel, param: 'mask' | 'model'): void {
  if (!model.isInpaintingUnet(model.unet)) return;
  throw new InvalidOptionError(
    param === 'mask'
      ? `the model '${model.name}' is an inpainting model: send a mask with the image (POST /v1/images/edits)`
      : `the model '${model.name}' is an inpainting model: use it through POST /v1/images/edits with an image and a mask`,
    param,
  );
}

const toBuffer = (bytes: Uint8Array) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);

async function run(id: number, spec: EditJobSpec): Promise<void> {
  const controller = new AbortController();
  current.set(id, controller);
  const checkCancel = () => {
    if (!controller.signal.aborted && Atomics.load(cancelCell, 0) === id) controller.abort();
  };
  let previewer: ReturnType<typeof createPreviewer> | undefined;
  try {
    checkCancel();
    const model = await engine.model(spec.model);
    checkCancel();
    const format = spec.output.format;
    // Streaming: partial images made beside the denoising loop, each posted as soon as it is encoded.
    if (spec.partialImages) {
      const { width, height } = resolveModelSize(model, spec.options);
      previewer = createPreviewer(model, {
        count: spec.partialImages,
        width,
        height,
        format,
        quality: spec.output.quality,
        onPartial: (p) => {
          const data = standalone(p.bytes);
          post({ type: 'partial', id, index: p.index, step: p.step, totalSteps: p.totalSteps, width, height, bytes: data.buffer }, [data.buffer]);
        },
      });
    }
    const options = {
      ...spec.options,
      signal: controller.signal,
      batcher,
      onStepLatents: previewer?.onStepLatents,
      onProgress: (progress: { stage: 'encode' | 'denoise' | 'decode'; step: number; totalSteps: number }) => {
        checkCancel();
        post({ type: 'progress', id, progress });
      },
    };
    let result: GenerateResult;
    let pose: RgbImage | undefined;
    let people: number | undefined;
    if (spec.kind === 'edit') {
      const first = spec.images?.[0];
      if (!first) throw new Error('an edit job needs an image');
      const upload = toBuffer(first);
      const { width, height } = resolveModelSize(model, spec.options);
      if (spec.pose) {
        const assets = await poseAssets(spec.pose);
        const image = await poseInput(upload, width, height);
        // `face:0.5,style:0.6,pose:1.0`: the pose and the image prompt together (pipeline.ts).
        const imagePrompt = await imagePromptFor(model, spec, upload);
        checkCancel();
        const posed = await poseGenerate(model, assets, { ...options, image, controlScale: spec.pose.scale, imagePrompt });
        ({ pose, people } = posed);
        result = posed;
      } else {
        if (!spec.mask) refuseInpaintOnly(model, 'mask');
        const imagePrompt = await imagePromptFor(model, spec, upload);
        checkCancel();
        if (spec.mask) {
          const image = await prepareInitImage(upload, width, height);
          const mask = await prepareMask(toBuffer(spec.mask), width, height);
          checkCancel();
          result = await inpaint(model, { ...options, image, mask, strength: spec.strength, imagePrompt });
        } else if (spec.imagePrompt && spec.strength === undefined) {
          // An image prompt alone: a new image from noise, steered by the upload.
          result = await generate(model, { ...options, imagePrompt });
        } else {
          const image = await prepareInitImage(upload, width, height);
          checkCancel();
          result = await img2img(model, { ...options, image, strength: spec.strength, imagePrompt });
        }
      }
    } else {
      refuseInpaintOnly(model, 'model');
      result = await generate(model, options);
    }
    // Every partial goes out before the final image.
    await previewer?.flush();
    if (!model.layout.hasVaeEncoder) await learnFromResult(model, result);
    const encodeOptions = { format, quality: spec.output.quality };
    const bytes = format === 'png' ? await encodeGeneratedPng(result.image, result.settings) : await encodeImage(result.image, encodeOptions);
    // Standalone ArrayBuffers (a Buffer may be a view into a shared pool) to transfer, not copy.
    const data = standalone(bytes);
    const poseData = pose ? standalone(await encodeImage(pose, encodeOptions)) : undefined;
    post(
      {
        type: 'done',
        id,
        bytes: data.buffer,
        contentType: CONTENT_TYPES[format],
        format,
        settings: result.settings,
        timings: result.timings,
        ...(poseData ? { pose: poseData.buffer, people } : {}),
      },
      poseData ? [data.buffer, poseData.buffer] : [data.buffer],
    );
  } catch (err) {
    // Partials already under way still go out, before the failure (a stream shows them, then the error).
    await previewer?.flush().catch(() => {});
    post({ type: 'failed', id, error: serializeError(err), cancelled: controller.signal.aborted });
  } finally {
    current.delete(id);
  }
}

function standalone(bytes: Buffer): Uint8Array<ArrayBuffer> {
  const data = new Uint8Array(bytes.byteLength);
  data.set(bytes);
  return data;
}

port.on('message', (msg: ToWorker) => {
  switch (msg.type) {
    case 'run': {
      const job = run(msg.id, msg.spec);
      running.add(job);
      void job.finally(() => running.delete(job));
      break;
    }
    case 'cancel':
      current.get(msg.id)?.abort();
      break;
    case 'preload':
      engine.model(msg.model).then(
        () => post({ type: 'preloaded', model: msg.model }),
        (err: unknown) => post({ type: 'preloaded', model: msg.model, error: serializeError(err) }),
      );
      break;
    case 'close':
      for (const controller of current.values()) controller.abort();
      // The abort takes effect at the next step; wait for it before freeing the sessions the jobs run on.
      void Promise.allSettled([...running]).then(() => Promise.allSettled([
        engine.close(),
        ...[...controlNets.values()].map(async (c) => (await c.loading).release()),
        ...[...runners.values()].map((r) => r.runner.release()),
        ...[...poseNets.values()].map(async (p) => {
          const { detector, poseNet } = await p.loading;
          await Promise.all([detector.release(), poseNet.release()]);
        }),
      ])).finally(() => port.close());
      break;
  }
});

post({ type: 'ready' });
