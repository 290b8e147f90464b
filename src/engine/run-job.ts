/**
 * The engine's one entry point for a job: the mode dispatch, the preprocessing of uploads (pose
 * input, image-prompt image, init image and mask) and the caches beside the Engine's models
 * (ControlNets, DWPose, image-prompt runners), all keyed by folder and file version. It takes
 * folders and bytes, never names of the server's or the environment: whoever calls it
 * (src/runner's worker thread) has resolved the job's model and assets through the catalog.
 *
 * Cancellation: `signal`, plus `isCancelled`, polled between stages and at every engine
 * progress callback (each denoising step), for callers whose flag is set from another thread.
 */
import { statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import sharp from 'sharp';
import type { Engine, ModelLease } from './engine.js';
import { generate, resolveModelSize, type EffectiveSettings, type GenerateResult, type Progress, type Timings } from './pipeline.js';
import { img2img, prepareInitImage } from './img2img.js';
import { inpaint, prepareMask } from './inpaint.js';
import { poseGenerate, type PoseAssets } from './pose-control.js';
import { loadPoseModels, type PoseModels } from './pose/index.js';
import { InvalidOptionError, ModelLoadError } from './errors.js';
import { loadImagePrompt, type ImagePrompt, type ImagePromptRunner } from './image-prompt.js';
import { UnetBatcher } from './unet-batcher.js';
import { LeaseCache } from './lease-cache.js';
import { OnnxModel, type Device } from './onnx.js';
import type { DiffusionModel } from './model.js';
import type { RgbImage } from './vae.js';
import { encodeGeneratedPng, encodeImage, type OutputFormat } from './image-codec.js';
import { createPreviewer, learnFromResult } from './preview.js';

/** What one job needs, resolved: folders, files and bytes. */
export interface EngineJob {
  mode: 'generate' | 'img2img' | 'inpaint' | 'pose' | 'image_prompt';
  /** The model's folder, and the name messages show. */
  model: { dir: string; name: string };
  options: {
    prompt: string;
    negativePrompt?: string;
    seed: number;
    size: string;
    quality?: string;
    steps?: number;
    scheduler?: string;
    guidanceScale?: number;
  };
  /** Every mode but generate: the upload (PNG, JPEG or WebP, already validated). */
  image?: Uint8Array;
  /** Inpaint: the mask (same dimensions as the image; either convention). */
  mask?: Uint8Array;
  strength?: number;
  /** Pose mode: the ControlNet scale and graph, and the DWPose folder. */
  pose?: { scale: number; controlNet: string; dwpose: string };
  /** The image prompt's adapters (files), each at its weight; none: the plain model. */
  imagePrompt?: { adapters: { adapter: string; imageEncoder: string; weight: number }[] };
  output: { format: OutputFormat; quality?: number };
  partialImages?: number;
}

export interface EngineJobResult {
  bytes: Buffer;
  contentType: string;
  format: OutputFormat;
  settings: EffectiveSettings;
  timings: Timings;
  pose?: Buffer;
  people?: number;
}

export interface EngineJobHooks {
  signal?: AbortSignal;
  /** Polled at every step: true stops the job there. */
  isCancelled?: () => boolean;
  onProgress?: (progress: Progress) => void;
  onPartial?: (partial: { index: number; step: number; totalSteps: number; width: number; height: number; bytes: Buffer }) => void;
}

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

/**
 * Runs jobs on one Engine: one at a time, or with `maxBatch` > 1 up to that many at once, whose
 * denoising steps share UNet runs (unet-batcher.ts).
 */
export class JobEngine {
  // ---- pose assets: loaded once, kept until their files change (or unused for the engine's unloadAfterMs)
  private readonly controlNets: LeaseCache<OnnxModel>;
  private readonly poseNets: LeaseCache<PoseModels>;
  // ---- image prompts: each model's adapters loaded once, again when their files change -------
  private readonly runners = new Map<string, { version: string; runner: ImagePromptRunner }>();
  /** Loads under way: jobs running at once (--max-batch) that need the same adapters share one. */
  private readonly loadingRunners = new Map<string, Promise<ImagePromptRunner>>();
  /** The jobs in flight: sessions are released only after they settle (releasing one mid-run aborts the process). */
  private readonly running = new Set<Promise<unknown>>();
  private readonly current = new Set<AbortController>();
  private readonly batcher: UnetBatcher | undefined;
  private readonly onWarning: ((message: string) => void) | undefined;

  constructor(
    readonly engine: Engine,
    private readonly device: Device,
    options: { maxBatch?: number; onWarning?: (message: string) => void } = {},
  ) {
    this.onWarning = options.onWarning;
    // Shared by every model of a family, so not counted by maxModels; gone when unused as long as an idle model.
    this.controlNets = new LeaseCache(Infinity, (m) => m.release(), engine.unloadAfterMs);
    this.poseNets = new LeaseCache(Infinity, (p) => Promise.all([p.detector.release(), p.poseNet.release()]).then(() => undefined), engine.unloadAfterMs);
    // An unloaded model's image-prompt sessions (its adapter UNet, the image encoder) go with it.
    engine.onModelUnloaded((unloaded) => {
      for (const [key, { runner }] of this.runners) {
        if (!runner.model.sameModelAs(unloaded)) continue;
        this.runners.delete(key);
        void runner.release().catch((err: Error) => this.onWarning?.(`releasing an image prompt of ${unloaded.name}: ${err.message}`));
      }
    });
    this.batcher = (options.maxBatch ?? 1) > 1 ? new UnetBatcher({ maxBatch: options.maxBatch!, batchDecodes: device === 'cuda' }) : undefined;
  }

  /** Image prompts (adapter UNet and image encoders) loaded now, one per model and adapter set. */
  get loadedImagePrompts(): number {
    return this.runners.size;
  }

  /** Loads a model ahead of its first job (it stays loaded as any model does: see the Engine's maxModels). */
  async preload(model: { dir: string; name: string }): Promise<void> {
    (await this.engine.lease(model.dir, { name: model.name })).release();
  }

  /**
   * The pose networks of a job, held until `release()` (at the job's end): their files as they are
   * now (a re-pulled one is loaded afresh, the old sessions freed once no job holds them; a failed
   * load is not kept, so a fixed install is picked up by the next request).
   */
  private async poseAssets(paths: NonNullable<EngineJob['pose']>): Promise<{ assets: PoseAssets; release(): void }> {
    const options = { device: this.device };
    const [controlNet, pose] = await Promise.allSettled([
      this.controlNets.acquireCurrent(paths.controlNet, fileVersion(paths.controlNet), () => OnnxModel.load(paths.controlNet, dirname(paths.controlNet), options)),
      this.poseNets.acquireCurrent(paths.dwpose, fileVersion(paths.dwpose), () => loadPoseModels(paths.dwpose, paths.dwpose, options)),
    ]);
    if (controlNet.status === 'rejected' || pose.status === 'rejected') {
      for (const r of [controlNet, pose]) if (r.status === 'fulfilled') r.value.release();
      throw controlNet.status === 'rejected' ? controlNet.reason : (pose as PromiseRejectedResult).reason;
    }
    return {
      assets: { controlNet: controlNet.value.value, detector: pose.value.value.detector, poseNet: pose.value.value.poseNet },
      release: () => (controlNet.value.release(), pose.value.release()),
    };
  }

  /** Pose networks (ControlNets, DWPose folders) loaded now. */
  get loadedPoseNetworks(): number {
    return this.controlNets.size + this.poseNets.size;
  }

  private async imagePromptRunner(model: DiffusionModel, spec: NonNullable<EngineJob['imagePrompt']>): Promise<ImagePromptRunner> {
    const files = spec.adapters.map((a) => ({ adapter: a.adapter, imageEncoder: a.imageEncoder }));
    const key = JSON.stringify([model.layout.dir, files]);
    const version = files.map((f) => `${fileVersion(f.adapter)}/${fileVersion(join(f.imageEncoder, 'model.safetensors'))}`).join(',');
    const inFlight = this.loadingRunners.get(key);
    if (inFlight) return inFlight;
    const known = this.runners.get(key);
    if (known && known.version === version && known.runner.model === model) return known.runner;
    const loading = (async () => {
      // A re-pulled adapter or encoder, or a reloaded model: the old sessions go once the jobs running now (which may use them) are done.
      if (known) {
        this.runners.delete(key);
        const busy = [...this.running];
        if (busy.length > 1) void Promise.allSettled(busy).then(() => known.runner.release());
        else await known.runner.release();
      }
      const runner = await loadImagePrompt(model, files, this.engine);
      this.runners.set(key, { version, runner });
      return runner;
    })();
    this.loadingRunners.set(key, loading);
    try {
      return await loading;
    } finally {
      this.loadingRunners.delete(key);
    }
  }

  /**
   * The image prompt of an edit: the model's adapters and the upload as CLIP sees it (upright, its
   * alpha dropped as PIL's convert('RGB') does, at its own resolution: CLIP's preprocessing
   * resizes and crops it). Undefined when every weight is 0 (the plain model runs).
   */
  private async imagePromptFor(model: DiffusionModel, spec: EngineJob, upload: Buffer): Promise<ImagePrompt | undefined> {
    const ip = spec.imagePrompt;
    if (!ip || ip.adapters.length === 0) return undefined;
    let runner: ImagePromptRunner;
    try {
      runner = await this.imagePromptRunner(model, ip);
    } catch (err) {
      // An adapter of another family, an ONNX-only model, a broken file: the request cannot be served as asked
      // (the server strips paths from InvalidOptionError messages).
      if (err instanceof ModelLoadError) throw new InvalidOptionError(`the image prompt cannot be used: ${err.message}`, 'user');
      throw err;
    }
    const { data, info } = await sharp(upload).rotate().removeAlpha().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
    if (info.channels !== 3) throw new Error(`expected RGB after conversion, got ${info.channels} channels`);
    const image: RgbImage = { width: info.width, height: info.height, pixels: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
    return { runner, image, scale: ip.adapters.map((a) => a.weight) };
  }

  /** Runs one job to its encoded image; rejects with the engine's error (GenerationCancelledError when stopped). */
  run(spec: EngineJob, hooks: EngineJobHooks = {}): Promise<EngineJobResult> {
    const done = this.runOne(spec, hooks);
    this.running.add(done);
    void done.catch(() => undefined).finally(() => this.running.delete(done));
    return done;
  }

  private async runOne(spec: EngineJob, hooks: EngineJobHooks): Promise<EngineJobResult> {
    const controller = new AbortController();
    this.current.add(controller);
    const onAbort = () => controller.abort();
    if (hooks.signal?.aborted) controller.abort();
    hooks.signal?.addEventListener('abort', onAbort, { once: true });
    const checkCancel = () => {
      if (!controller.signal.aborted && hooks.isCancelled?.()) controller.abort();
    };
    let previewer: ReturnType<typeof createPreviewer> | undefined;
    // Held until the job is done: the engine never unloads a model a job runs on.
    let lease: ModelLease | undefined;
    try {
      checkCancel();
      lease = await this.engine.lease(spec.model.dir, { name: spec.model.name });
      const model = lease.model;
      checkCancel();
      const format = spec.output.format;
      // Streaming: partial images made beside the denoising loop, each handed on as soon as it is encoded.
      if (spec.partialImages) {
        const { width, height } = resolveModelSize(model, spec.options);
        previewer = createPreviewer(model, {
          count: spec.partialImages,
          width,
          height,
          format,
          quality: spec.output.quality,
          onPartial: (p) => hooks.onPartial?.({ index: p.index, step: p.step, totalSteps: p.totalSteps, width, height, bytes: p.bytes }),
          // The tiny decoders are under the Engine's home (previews/), given by the caller, never read from the environment here.
          tinyDecoder: this.engine.home ? { home: this.engine.home, cacheDir: this.engine.cacheDir } : undefined,
          budget: this.engine.previewBudget,
          onWarning: this.onWarning,
        });
      }
      const options = {
        ...spec.options,
        signal: controller.signal,
        batcher: this.batcher,
        onStepLatents: previewer?.onStepLatents,
        onProgress: (progress: Progress) => {
          checkCancel();
          hooks.onProgress?.(progress);
        },
      };
      let result: GenerateResult;
      let pose: RgbImage | undefined;
      let people: number | undefined;
      if (spec.mode !== 'generate') {
        if (!spec.image) throw new Error(`a ${spec.mode} job needs an image`);
        const upload = toBuffer(spec.image);
        const { width, height } = resolveModelSize(model, spec.options);
        if (spec.mode === 'pose') {
          if (!spec.pose) throw new Error('a pose job needs its pose assets');
          const networks = await this.poseAssets(spec.pose);
          try {
            const image = await poseInput(upload, width, height);
            // `face:0.5,style:0.6,pose:1.0`: the pose and the image prompt together (pipeline.ts).
            const imagePrompt = await this.imagePromptFor(model, spec, upload);
            checkCancel();
            const posed = await poseGenerate(model, networks.assets, { ...options, image, controlScale: spec.pose.scale, imagePrompt });
            ({ pose, people } = posed);
            result = posed;
          } finally {
            networks.release();
          }
        } else {
          if (spec.mode !== 'inpaint') refuseInpaintOnly(model, 'mask');
          const imagePrompt = await this.imagePromptFor(model, spec, upload);
          checkCancel();
          if (spec.mode === 'inpaint') {
            if (!spec.mask) throw new Error('an inpaint job needs a mask');
            const image = await prepareInitImage(upload, width, height);
            const mask = await prepareMask(toBuffer(spec.mask), width, height);
            checkCancel();
            result = await inpaint(model, { ...options, image, mask, strength: spec.strength, imagePrompt });
          } else if (spec.mode === 'image_prompt') {
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
      const out: EngineJobResult = { bytes, contentType: CONTENT_TYPES[format], format, settings: result.settings, timings: result.timings };
      if (pose) {
        out.pose = await encodeImage(pose, encodeOptions);
        out.people = people;
      }
      return out;
    } catch (err) {
      // Partials already under way still go out, before the failure (a stream shows them, then the error).
      await previewer?.flush().catch(() => {});
      throw err;
    } finally {
      lease?.release();
      hooks.signal?.removeEventListener('abort', onAbort);
      this.current.delete(controller);
    }
  }

  /** Stops the jobs in flight at their next step, waits for them, then frees every session. */
  async close(): Promise<void> {
    for (const c of this.current) c.abort();
    await Promise.allSettled([...this.running]);
    await Promise.allSettled([
      this.engine.close(),
      this.controlNets.clear(),
      ...[...this.runners.values()].map((r) => r.runner.release()),
      this.poseNets.clear(),
    ]);
  }
}
