/**
 * What the image routes do, without HTTP: build a job spec from validated fields, submit it to
 * the queue, wait for it (cancelling it when the client goes away), store the image(s) behind
 * signed URLs or inline them, and shape OpenAI's response (and Kiln's x-kiln-* headers).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FastifyBaseLogger } from 'fastify';
import { ModelLoadError } from '../engine/errors.js';
import { detectLayout, type ModelLayout } from '../engine/model.js';
import { resolveSize, sizeForUpload, type Size } from '../engine/presets.js';
import { MAX_SEED, randomSeed } from '../engine/rng.js';
import { JobCancelledError, JobTimeoutError, type JobOutput, type JobQueue, type JobSpec, type PartialImageEvent } from '../queue/types.js';
import type { JobMode } from '../jobs/types.js';
import type { ImageStore, InputStore } from '../store/types.js';
import { ClientGoneError } from './errors.js';
import type { ModelCatalog, ResolvedModel } from '../catalog/catalog.js';
import { DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, type ImageParams, type ImagePromptWeights } from './params.js';
import { resolveImagePromptAssets, type ImagePromptAdapter } from '../catalog/image-prompt-assets.js';
import { resolvePoseAssets } from '../catalog/pose-assets.js';
import type { UrlSigner } from './signing.js';

export interface ImagesServiceOptions {
  queue: JobQueue;
  store: ImageStore;
  /** Where a request's uploads wait for the worker that runs its job (jobs carry their keys). */
  inputs: InputStore;
  signer: UrlSigner;
  models: ModelCatalog;
  /** Kiln's home folder (pose-mode and image-prompt assets). */
  home: string;
  /** Lifetime of image URLs and their files. */
  ttlMs: number;
  /** Per-request limit, queueing included. */
  requestTimeoutMs: number;
  /** The base of image URLs (known once the server listens). */
  publicUrl: () => string;
}

/** The request a job runs for: its id and logger, and its connection (the job is cancelled when the client goes away). */
export interface Caller {
  id: string;
  log: FastifyBaseLogger;
  req: IncomingMessage;
  res: ServerResponse;
}

/** A validated edit upload: the init image, an optional mask (inpainting), pose scale (pose mode) or image-prompt weights. */
export interface EditUpload {
  image: Buffer;
  /** The image's size as it will be used (upright); `size: auto` follows its shape. */
  imageSize: Size;
  mask?: Buffer;
  poseScale?: number;
  imagePrompt?: ImagePromptWeights;
}

/** A streamed request (streaming.ts): its partial images as they come, per image of the request. */
export interface StreamHooks {
  onPartial(partial: PartialImageEvent & { imageIndex: number; seed: number }): void;
}

interface EditInput {
  images: Buffer[];
  imageSize: Size;
  mask?: Buffer;
  /** Pose mode: its scale (the worker finds the pose models from the model's name). */
  pose?: { scale: number };
  imagePrompt?: { weights: ImagePromptWeights; adapters: ImagePromptAdapter[] };
}

function headerValue(v: string | number): string {
  return encodeURIComponent(String(v)).replace(/%20/g, ' ');
}

/** `kiln.image_prompt`: the weight of each role asked for (0 included) and the adapter files used. */
function imagePromptReport(weights: ImagePromptWeights, adapters: string[]) {
  return {
    style: weights.style,
    ...(weights.face !== undefined ? { face: weights.face } : {}),
    adapters,
  };
}

export type ImagesService = ReturnType<typeof createImagesService>;

export function createImagesService({ queue, store, inputs, signer, models, home, ttlMs, requestTimeoutMs, publicUrl }: ImagesServiceOptions) {
  /**
   * The size to queue, checked against the model's family and native size now rather than after
   * a worker has loaded the model (InvalidOptionError: 400 `size`). An edit's `auto` becomes the
   * upload's shape at the model's native area.
   */
  function requestSize(params: ImageParams, model: ResolvedModel, upload?: Size): string {
    // Only the workers have its folder: they check the size and turn an edit's `auto` into the upload's shape (runner/prepare.ts).
    if (model.remote) return params.size;
    let layout: ModelLayout;
    try {
      layout = detectLayout(models.dir(model));
    } catch (err) {
      if (err instanceof ModelLoadError) return params.size; // a broken folder: the worker reports it
      throw err;
    }
    if (upload && params.size === 'auto') {
      const size = sizeForUpload(upload, layout);
      return `${size.width}x${size.height}`;
    }
    resolveSize(params.size, layout);
    return params.size;
  }

  /** Runs one job to its end, cancelling it when the client goes away. */
  async function runJob(caller: Caller, spec: JobSpec, timeoutMs: number, onPartial?: (partial: PartialImageEvent) => void) {
    const job = queue.submit(spec, { timeoutMs, requestId: caller.id });
    if (onPartial) job.events.on('partial', onPartial);
    caller.log.debug({ job: job.id, mode: spec.mode, model: spec.model, seed: spec.options.seed }, 'job queued');
    const onClose = () => {
      if (!caller.res.writableEnded) job.cancel(new JobCancelledError('the client disconnected', 'client'));
    };
    caller.res.on('close', onClose);
    // Gone already (while its upload was being checked): 'close' has fired before we listened.
    if (caller.res.destroyed || caller.req.socket?.destroyed) onClose();
    job.events.on('progress', (p) => caller.log.debug({ job: job.id, stage: p.stage, step: p.step, totalSteps: p.totalSteps }, 'progress'));
    let output: JobOutput;
    try {
      output = await job.result;
    } catch (err) {
      if (err instanceof JobCancelledError && err.reason === 'client') {
        throw new ClientGoneError(`client disconnected; job ${job.id} cancelled at ${job.progress ? `${job.progress.stage} step ${job.progress.step}/${job.progress.totalSteps}` : 'queue'}`);
      }
      throw err;
    } finally {
      caller.res.off('close', onClose);
    }
    if (caller.res.destroyed) throw new ClientGoneError(`client disconnected; job ${job.id} finished unread`);
    return { output, queueMs: job.queuedMs ?? 0 };
  }

  async function runImageJob(caller: Caller, params: ImageParams, kind: 'generate' | 'edit', edit?: EditInput, resolved?: ResolvedModel, stream?: StreamHooks) {
    const model = resolved ?? models.resolve(params.model);
    const size = requestSize(params, model, edit?.imageSize);
    // One seed per image: the given one (then +1 each, so a request stays reproducible), else random each.
    const first = params.seed;
    const seeds = Array.from({ length: params.count }, (_, i) => (first === undefined ? randomSeed() : (first + i) % (MAX_SEED + 1)));
    // An image prompt without a mask draws from noise (the reference's meaning) unless `strength` asks to start from the upload.
    const fromNoise = edit?.imagePrompt !== undefined && !edit.mask && params.strength === undefined;
    const mode: JobMode = kind === 'generate' ? 'generate' : edit?.pose ? 'pose' : edit?.mask ? 'inpaint' : fromNoise ? 'image_prompt' : 'img2img';
    // The uploads wait in the input store, once for all the request's images; the jobs carry their keys.
    const keys: string[] = [];
    const putInput = async (bytes: Buffer) => {
      const key = await inputs.putInput(bytes, { contentType: 'application/octet-stream', ttlMs: requestTimeoutMs + 60_000 });
      keys.push(key);
      return key;
    };
    const jobInputs = edit ? { image: await putInput(edit.images[0]!), ...(edit.mask ? { mask: await putInput(edit.mask) } : {}) } : undefined;
    const specFor = (seed: number): JobSpec => {
      const spec: JobSpec = {
        mode,
        model: model.ref,
        options: {
          prompt: params.prompt,
          negativePrompt: params.negativePrompt,
          seed,
          size,
          quality: params.quality,
          steps: params.steps,
          scheduler: params.scheduler,
          guidanceScale: params.guidanceScale,
        },
        output: { format: params.outputFormat, quality: params.outputCompression },
      };
      if (stream && params.partialImages > 0) spec.partialImages = params.partialImages;
      if (edit) {
        spec.inputs = jobInputs;
        // Weights all 0: the plain model (no adapter is resolved on the worker either).
        if (edit.imagePrompt && (edit.imagePrompt.adapters.length || model.remote)) spec.imagePrompt = edit.imagePrompt.weights;
        if (edit.pose) spec.pose = edit.pose;
        else if (!fromNoise) spec.strength = params.strength ?? (edit.mask ? DEFAULT_INPAINT_STRENGTH : DEFAULT_STRENGTH);
      }
      return spec;
    };

    const received = performance.now();
    // The images of one request run one after another: a request holds one queue place at a time,
    // and the per-request limit covers them all.
    const outputs: JobOutput[] = [];
    let queueMs = 0;
    let generationMs = 0;
    try {
      for (const [imageIndex, seed] of seeds.entries()) {
        const left = requestTimeoutMs - (performance.now() - received);
        if (left <= 0) throw new JobTimeoutError(requestTimeoutMs);
        const onPartial = stream && ((partial: PartialImageEvent) => stream.onPartial({ ...partial, imageIndex, seed }));
        const done = await runJob(caller, specFor(seed), left, onPartial || undefined);
        outputs.push(done.output);
        queueMs += done.queueMs;
        generationMs += done.output.timings.totalMs;
      }
    } finally {
      await Promise.allSettled(keys.map((k) => inputs.deleteInput(k)));
    }

    const s = outputs[0]!.settings;
    // A remote model is queued by the name this host resolved it to (an alias of this host's: its target); the worker may have
    // resolved that name (its own aliases) to another model: report that one, and the name the client asked for, as one machine does.
    const drew = model.remote ? s.model : model.id;
    const requested = model.remote ? (model.requested ?? (s.model !== model.id ? model.id : undefined)) : model.requested;
    const totalMs = performance.now() - received;
    let expiresAt: number | undefined;
    const put = async (bytes: Buffer, contentType: string) => {
      const stored = await store.put(bytes, { contentType, ttlMs });
      expiresAt = stored.expiresAt;
      return (await store.externalUrl?.(stored)) ?? `${publicUrl()}${signer.path(stored.key, stored.expiresAt)}`;
    };
    const data: Record<string, unknown>[] = [];
    for (const output of outputs) {
      const item: Record<string, unknown> = {};
      // A streamed answer always carries the image inline (as OpenAI's does), and the URL when asked.
      if (params.responseFormat === 'b64_json' || stream) {
        item.b64_json = output.bytes.toString('base64');
        if (output.pose) item.b64_json_pose = output.pose.toString('base64');
      }
      if (params.responseFormat === 'url') {
        item.url = await put(output.bytes, output.contentType);
        if (output.pose) item.url_pose = await put(output.pose, output.contentType);
      }
      item.seed = output.settings.seed;
      item.revised_prompt = null;
      data.push(item);
    }
    const allSeeds = outputs.map((o) => o.settings.seed);

    const headers: Record<string, string> = {
      'x-kiln-model': headerValue(drew),
      'x-kiln-seed': allSeeds.join(','),
      'x-kiln-size': `${s.width}x${s.height}`,
      'x-kiln-quality': headerValue(s.quality),
      'x-kiln-steps': String(s.steps),
      'x-kiln-scheduler': headerValue(s.scheduler),
      'x-kiln-guidance-scale': String(s.guidanceScale),
      'x-kiln-queue-ms': queueMs.toFixed(0),
      'x-kiln-generation-ms': generationMs.toFixed(0),
      'server-timing': `queue;dur=${queueMs.toFixed(1)}, generate;dur=${generationMs.toFixed(1)}, total;dur=${totalMs.toFixed(1)}`,
    };
    const people = outputs.map((o) => o.people ?? null);
    const body = {
      created: Math.floor(Date.now() / 1000),
      data,
      size: `${s.width}x${s.height}`,
      quality: s.quality,
      output_format: outputs[0]!.format,
      kiln: {
        model: drew,
        ...(requested !== undefined ? { requested_model: requested } : {}),
        seed: s.seed,
        ...(outputs.length > 1 ? { seeds: allSeeds } : {}),
        size: `${s.width}x${s.height}`,
        quality: s.quality,
        steps: s.steps,
        scheduler: s.scheduler,
        guidance_scale: s.guidanceScale,
        negative_prompt: s.negativePrompt,
        ...(kind === 'edit' ? { mode } : {}),
        ...(s.strength !== undefined ? { strength: s.strength } : {}),
        ...(edit?.pose ? { control_scale: edit.pose.scale, people: people.length > 1 ? people : people[0] } : {}),
        // The adapters the runner resolved (a worker's own home for a remote model); this host's when no job resolved any (weights all 0).
        ...(edit?.imagePrompt
          ? { image_prompt: imagePromptReport(edit.imagePrompt.weights, outputs[0]!.imagePromptAdapters ?? edit.imagePrompt.adapters.map((a) => a.name)) }
          : {}),
        ...(s.loras?.length ? { loras: s.loras } : {}),
        // A prompt longer than the chunks Kiln encodes (MAX_PROMPT_CHUNKS): what was left out.
        ...(s.droppedTokens
          ? { dropped_tokens: { ...(s.droppedTokens.prompt ? { prompt: s.droppedTokens.prompt } : {}), ...(s.droppedTokens.negativePrompt ? { negative_prompt: s.droppedTokens.negativePrompt } : {}) } }
          : {}),
        ...(expiresAt !== undefined ? { expires_at: Math.floor(expiresAt / 1000) } : {}),
        timings: {
          queue_ms: Math.round(queueMs),
          generation_ms: Math.round(generationMs),
          total_ms: Math.round(totalMs),
        },
      },
    };
    return { headers, body };
  }

  return {
    /** POST /v1/images/generations: an image from a prompt. */
    async generate(caller: Caller, params: ImageParams, stream?: StreamHooks) {
      return runImageJob(caller, params, 'generate', undefined, undefined, stream);
    },

    /** POST /v1/images/edits: img2img, inpainting (with a mask), pose-guided (with a pose scale) or with an image prompt. */
    async edit(caller: Caller, params: ImageParams, upload: EditUpload, stream?: StreamHooks) {
      const model = models.resolve(params.model);
      let pose: EditInput['pose'];
      if (upload.poseScale !== undefined) {
        // Checked here too, so that a request that cannot be honoured gets its 400 before it is queued (a remote model: on the worker).
        if (!model.remote) {
          const assets = resolvePoseAssets(models.dir(model), model.id, home);
          caller.log.debug({ model: model.id, ...assets.sources }, 'pose assets');
        }
        pose = { scale: upload.poseScale };
      }
      let imagePrompt: EditInput['imagePrompt'];
      if (upload.imagePrompt) {
        // A folder the layout check refuses cannot be served at all: its load error, not an image without the image prompt.
        // A remote model's adapters are found (or refused) on the worker; the response names the ones its result reports.
        const adapters = model.remote ? [] : resolveImagePromptAssets(detectLayout(models.dir(model)).family, model.id, home, upload.imagePrompt);
        caller.log.debug({ model: model.id, adapters: model.remote ? 'resolved on the worker' : adapters.map((a) => `${a.name}:${a.weight}`) }, 'image prompt');
        imagePrompt = { weights: upload.imagePrompt, adapters };
      }
      return runImageJob(caller, params, 'edit', { images: [upload.image], imageSize: upload.imageSize, mask: upload.mask, pose, imagePrompt }, model, stream);
    },
  };
}
