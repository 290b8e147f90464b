/**
 * Text-to-image, built on the one denoising loop every pipeline shares.
 *
 * Per request: resolve settings (size, steps from quality, scheduler, guidance) -> seeded
 * latent noise -> text conditioning -> denoise -> VAE decode. Classifier-free guidance runs
 * uncond and cond as one batch-2 UNet call per step; LCM feeds guidance through
 * `timestep_cond` and runs batch 1; Turbo (guidance 0) runs batch 1.
 *
 * A model whose kiln.json declares `native_size` is denoised at that area (the request's aspect
 * ratio, denoiseSize) whatever size is asked, and the decoded picture resized to the request:
 * such models (the built-in kiln-tiny ones, trained at 256x256) draw tiled, blotchy shapes at
 * sizes they never saw. Every mode goes through here, so every mode does the same.
 */
import { createScheduler, schedulerClassFor, isSupportedScheduler, SCHEDULER_NAMES, type Scheduler } from './schedulers/index.js';
import { encodePrompts, type TextConditioning } from './conditioning.js';
import { decodeLatents, resizeImage, type RgbImage } from './vae.js';
import { unetOutputName, type DiffusionModel } from './model.js';
import { timestepDims, type Feed, type OnnxModel, type TensorInfo } from './onnx.js';
import { createRng, MAX_SEED, type Rng } from './rng.js';
import { DEFAULT_QUALITY, nativeWorkingSize, parseSize, qualityTier, resolveSize, type Size } from './presets.js';
import { GenerationCancelledError, InvalidOptionError, ModelLoadError } from './errors.js';
import { loraSettings, withPromptLoras, type AppliedLora } from './loras.js';
import { imagePromptActive, imagePromptInputs, type ImagePrompt } from './image-prompt.js';
import type { UnetBatcher } from './unet-batcher.js';

export const MAX_STEPS = 150;
export const MAX_GUIDANCE = 30;
const LATENT_CHANNELS = 4;
const VAE_FACTOR = 8;

export interface Progress {
  stage: 'encode' | 'denoise' | 'decode';
  /** Steps done so far (denoise), 0 before the first. */
  step: number;
  totalSteps: number;
}

/** One denoising step's state, for previews (preview.ts). */
export interface StepLatents {
  /** Steps done, 1 after the first. */
  step: number;
  totalSteps: number;
  /** The latents after this step, [1, 4, h, w]. */
  latents: Float32Array;
  /** The clean sample the scheduler predicted at this step (its lastPredOriginal), if it says. */
  predOriginal: Float32Array | undefined;
  latentDims: number[];
}

export interface GenerateOptions {
  prompt: string;
  /** Absent and "" differ for SDXL (zeros vs the encoding of ""), as in diffusers. */
  negativePrompt?: string;
  /** The request's `n`: an integer 0..2^32-1. */
  seed: number;
  /**
   * Starting latents [1, 4, h/8, w/8] of unit variance, used instead of the seeded noise (scaled
   * by the scheduler's initial sigma, like diffusers' `latents=`). txt2img only. h and w are the
   * size denoised at (denoiseSize: the native one for a model that declares it).
   */
  latents?: Float32Array;
  /**
   * `WxH`: a named size (256/512/1024 squares, 1792x1024, 1024x1792, 1536x1024, 1024x1536),
   * `auto` (the model's native size) or sides that are multiples of 64 within the family's range
   * (presets.ts resolveSize). Default 512x512.
   */
  size?: string;
  /** Only these sizes instead (exact `WxH` strings). */
  allowedSizes?: readonly string[];
  quality?: string;
  /** Overrides the quality preset's step count. */
  steps?: number;
  /** Alias (`euler`, `dpmpp_2m`, ...) or diffusers class name. */
  scheduler?: string;
  guidanceScale?: number;
  /**
   * An image prompt (IP-Adapter, image-prompt.ts): the picture steers the generation at each
   * adapter's weight. Every weight 0 (or absent): the plain model, byte for byte.
   */
  imagePrompt?: ImagePrompt;
  onProgress?: (progress: Progress) => void;
  /** After every denoising step, synchronously: keep it cheap (the arrays are never changed later). */
  onStepLatents?: (step: StepLatents) => void;
  signal?: AbortSignal;
  /**
   * Runs this generation's UNet (and ControlNet) calls batched with those of concurrent
   * generations in the same thread (unet-batcher.ts); the image's bytes stay those of running alone.
   */
  batcher?: UnetBatcher;
}

/** Settings as actually used: reported back to callers and written into the PNG. */
export interface EffectiveSettings {
  model: string;
  prompt: string;
  negativePrompt: string;
  seed: number;
  width: number;
  height: number;
  steps: number;
  scheduler: string;
  guidanceScale: number;
  quality: string;
  /** img2img/inpainting: how much of the input is re-noised (0..1]. */
  strength?: number;
  /** LoRAs the model ran with (its kiln.json's and the prompt's `<lora:NAME:SCALE>` tags). */
  loras?: AppliedLora[];
  /**
   * `WxH` the model denoised at, when its kiln.json declares a native size and that differs
   * from width x height (the picture was then resized to width x height).
   */
  nativeSize?: string;
  /** Tokens of the prompt / negative prompt past the chunks encoded (weighting.ts MAX_PROMPT_CHUNKS); absent when all fit. */
  droppedTokens?: { prompt?: number; negativePrompt?: number };
}

export interface Timings {
  /** Tokenizing (part of encodeMs). */
  tokenizeMs: number;
  /** Tokenizing and running the text encoder(s). */
  encodeMs: number;
  /** One entry per denoising step: the UNet call(s) of that step. */
  unetMs: number[];
  schedulerMs: number;
  decodeMs: number;
  totalMs: number;
  /** Time inside session.run over the whole generation. */
  sessionRunMs: number;
}

export interface GenerateResult {
  /** The picture at the requested size (settings.width x settings.height). */
  image: RgbImage;
  /**
   * The final latents [1, 4, h/8, w/8], before the VAE (diffusers' output_type='latent'), at
   * the size denoised at (settings.nativeSize when present).
   */
  latents: Float32Array;
  settings: EffectiveSettings;
  timings: Timings;
  /** Number of UNet evaluations (one per step, CFG batched). */
  unetCalls: number;
}

/** Validates options against the model and fills defaults. Throws InvalidOptionError. */
export function resolveSettings(model: DiffusionModel, options: GenerateOptions): EffectiveSettings {
  if (typeof options.prompt !== 'string') throw new InvalidOptionError('prompt must be a string', 'prompt');
  if (!Number.isInteger(options.seed) || options.seed < 0 || options.seed > MAX_SEED) {
    throw new InvalidOptionError(`seed must be an integer from 0 to ${MAX_SEED}`, 'seed');
  }
  const { width, height } = resolveModelSize(model, options);
  const quality = options.quality ?? DEFAULT_QUALITY;
  const tier = qualityTier(quality);
  const defaults = model.layout.defaults;
  const steps = options.steps ?? defaults.steps[tier];
  if (!Number.isInteger(steps) || steps < 1 || steps > MAX_STEPS) {
    throw new InvalidOptionError(`steps must be an integer from 1 to ${MAX_STEPS}`, 'steps');
  }
  const guidanceScale = options.guidanceScale ?? defaults.guidanceScale;
  if (!Number.isFinite(guidanceScale) || guidanceScale < 0 || guidanceScale > MAX_GUIDANCE) {
    throw new InvalidOptionError(`guidance_scale must be a number from 0 to ${MAX_GUIDANCE}`, 'guidance_scale');
  }
  const native = denoiseSize(model, { width, height });
  return {
    model: model.name,
    prompt: options.prompt,
    negativePrompt: options.negativePrompt ?? '',
    seed: options.seed,
    width,
    height,
    steps,
    scheduler: pickScheduler(model, options.scheduler),
    guidanceScale,
    quality,
    ...loraSettings(model),
    ...(native.width !== width || native.height !== height ? { nativeSize: `${native.width}x${native.height}` } : {}),
  };
}

/**
 * The size a model denoises at for an output size: the output size itself, unless the model's
 * kiln.json declares `native_size`; then that area with the output's aspect ratio, both sides
 * multiples of 64 (presets.ts nativeWorkingSize). A square request on a square native size is
 * exactly the native size.
 */
export function denoiseSize(model: Pick<DiffusionModel, 'layout'>, output: Size): Size {
  const native = model.layout.defaults.nativeSize;
  return native ? nativeWorkingSize(output, native) : { width: output.width, height: output.height };
}

/** The output size a request asks of a model (see GenerateOptions.size). Throws InvalidOptionError ('size'). */
export function resolveModelSize(model: DiffusionModel, options: Pick<GenerateOptions, 'size' | 'allowedSizes'>): Size {
  const size = options.size ?? '512x512';
  return options.allowedSizes ? parseSize(size, options.allowedSizes) : resolveSize(size, model.layout);
}

/**
 * Request's scheduler, else the model's own (kiln.json, then its config class), else Euler.
 * Aliases are kept as given: some pin options (`dpmpp_2m_karras` turns on Karras sigmas).
 */
function pickScheduler(model: DiffusionModel, requested: string | undefined): string {
  if (requested !== undefined) {
    if (!schedulerClassFor(requested)) {
      throw new InvalidOptionError(
        `unknown scheduler "${requested}"; allowed: ${SCHEDULER_NAMES.join(', ')} (or a diffusers class name)`,
        'scheduler',
      );
    }
    return requested;
  }
  const own = model.layout.defaults.scheduler;
  if (own && schedulerClassFor(own)) return own;
  if (isSupportedScheduler(model.layout.schedulerClass)) return model.layout.schedulerClass;
  // e.g. SD 1.5's PNDMScheduler: keep its betas and spacing, step with Euler.
  return 'EulerDiscreteScheduler';
}

export function makeScheduler(model: DiffusionModel, settings: EffectiveSettings): Scheduler {
  try {
    return createScheduler(settings.scheduler, model.layout.schedulerConfig);
  } catch (err) {
    throw new InvalidOptionError(err instanceof Error ? err.message : String(err), 'scheduler');
  }
}

/** Whether this model/guidance runs classifier-free guidance as a batch of two. */
export function usesCfg(model: DiffusionModel, guidanceScale: number): boolean {
  return model.layout.distillation !== 'lcm' && guidanceScale > 1;
}

export interface DenoiseArgs {
  model: DiffusionModel;
  scheduler: Scheduler;
  /** Starting latents [1,4,h,w] (noise, or noised image latents for img2img). */
  latents: Float32Array;
  latentDims: number[];
  /** The timesteps to run (all of scheduler.timesteps, or a tail of them for img2img). */
  timesteps: number[];
  cond: TextConditioning;
  uncond?: TextConditioning;
  guidanceScale: number;
  /** Image size, for SDXL's time_ids. */
  width: number;
  height: number;
  rng: Rng;
  signal?: AbortSignal;
  onStep?: (step: number, total: number) => void;
  /** Hook after each scheduler step (inpainting blends known latents back in here). */
  afterStep?: (latents: Float32Array, stepIndex: number, t: number) => Float32Array;
  /** After each step (and afterStep): the latents and the scheduler's predicted clean sample. */
  onLatents?: (step: StepLatents) => void;
  /** ControlNet conditioning: its residuals feed a residual-taking UNet (`unet`). */
  control?: ControlInput;
  /** The UNet to run (default: the model's; inpainting may bring a 9-channel one). */
  unet?: OnnxModel;
  /**
   * Extra input channels appended to every sample row (an inpainting UNet's mask and masked
   * image latents: 5·h·w values), constant over the steps.
   */
  extraChannels?: Float32Array;
  /** Feeds that stay the same over the steps beyond the text's (an image prompt's ip_tokens / ip_scale). */
  extraFeeds?: Record<string, Feed>;
  /** Where the UNet and ControlNet calls go (GenerateOptions.batcher); default: straight to the sessions. */
  batcher?: UnetBatcher;
  timings: Timings;
}

export interface ControlInput {
  /** The ControlNet graph (split layout: residuals out by name). */
  net: OnnxModel;
  /** The conditioning picture [1,3,H,W], RGB in [0, 1]. */
  image: Float32Array;
  imageDims: number[];
  /** ControlNet conditioning scale (1.0 for `cn`). */
  scale: number;
}

export const RESIDUAL_OUTPUT = /^(down_block_\d+|mid_block)_additional_residual$/;

function timestepFeed(info: TensorInfo, batch: number, t: number): Feed {
  const dims = timestepDims(info, batch);
  return { data: new Float32Array(dims.reduce((a, b) => a * b, 1)).fill(t), dims };
}

/**
 * Runs the ControlNet on this step's UNet feeds and returns its residuals by name, scaled by
 * the conditioning scale (inside the graph when it takes `conditioning_scale`, else here).
 */
async function controlResiduals(control: ControlInput, unetFeeds: Record<string, Feed>, batch: number, t: number, run: SessionRun): Promise<Record<string, Feed>> {
  const { net } = control;
  const feeds: Record<string, Feed> = {};
  for (const name of net.inputs.keys()) {
    if (name === 'timestep') feeds[name] = timestepFeed(net.input(name), batch, t);
    else if (name === 'controlnet_cond') {
      const rows = Array<Float32Array>(batch).fill(control.image);
      feeds[name] = batched(rows, control.imageDims);
    } else if (name === 'conditioning_scale') {
      const dims = net.input(name).shape.length === 0 ? [] : [1];
      feeds[name] = { data: Float32Array.of(control.scale), dims };
    } else if (unetFeeds[name]) feeds[name] = unetFeeds[name]!;
    else throw new ModelLoadError(`${net.label} takes an input "${name}" that Kiln cannot provide`);
  }
  const names = net.outputNames(RESIDUAL_OUTPUT);
  if (!names.length) throw new ModelLoadError(`${net.label} has no *_additional_residual outputs`);
  const out = await run(net, feeds, names);
  const scaleHere = !net.hasInput('conditioning_scale') && control.scale !== 1;
  const residuals: Record<string, Feed> = {};
  for (const name of names) {
    const { data, dims } = out[name]!;
    if (scaleHere) for (let i = 0; i < data.length; i++) data[i]! *= control.scale;
    residuals[name] = { data, dims };
  }
  return residuals;
}

type SessionRun = (session: OnnxModel, feeds: Record<string, Feed>, outputs: string[]) => Promise<Record<string, { data: Float32Array; dims: number[] }>>;

/** The denoising loop shared by txt2img, img2img, inpainting and ControlNet pipelines. */
export async function denoise(args: DenoiseArgs): Promise<{ latents: Float32Array; unetCalls: number }> {
  const { model, scheduler, cond, uncond, guidanceScale, timings, batcher } = args;
  const cfg = uncond !== undefined;
  const batch = cfg ? 2 : 1;
  const run: SessionRun = batcher
    ? (session, feeds, outputs) => batcher.run(session, feeds, outputs, { rows: batch, signal: args.signal })
    : (session, feeds, outputs) => session.run(feeds, outputs);
  const unet = args.unet ?? model.unet;
  const outName = unetOutputName(unet);
  const size = args.latents.length;

  // Feeds that do not change between steps.
  const staticFeeds: Record<string, Feed> = {
    ...args.extraFeeds,
    encoder_hidden_states: batched(cfg ? [uncond.hidden.data, cond.hidden.data] : [cond.hidden.data], cond.hidden.dims),
  };
  if (unet.hasInput('text_embeds')) {
    if (!cond.pooled) throw new Error('SDXL UNet needs a pooled text embedding');
    staticFeeds.text_embeds = batched(cfg ? [uncond.pooled!.data, cond.pooled.data] : [cond.pooled.data], cond.pooled.dims);
  }
  if (unet.hasInput('time_ids')) {
    const info = unet.input('time_ids');
    const width = typeof info.shape[1] === 'number' && info.shape[1] > 0 ? info.shape[1] : 6;
    // [orig_h, orig_w, crop_top, crop_left, target_h, target_w]; the refiner's 5-wide form
    // ends in an aesthetic score instead (6.0 positive, 2.5 negative as diffusers).
    const row = (positive: boolean) =>
      width === 5 ? [args.height, args.width, 0, 0, positive ? 6 : 2.5] : [args.height, args.width, 0, 0, args.height, args.width];
    const rows = cfg ? [...row(false), ...row(true)] : row(true);
    staticFeeds.time_ids = { data: Float32Array.from(rows), dims: [batch, width] };
  }
  if (unet.hasInput('timestep_cond')) {
    const info = unet.input('timestep_cond');
    const dim = typeof info.shape[1] === 'number' && info.shape[1] > 0 ? info.shape[1] : 256;
    const emb = guidanceEmbedding(guidanceScale, dim);
    staticFeeds.timestep_cond = batched(Array(batch).fill(emb), [1, dim]);
  }
  const timestepInfo = unet.input('timestep');
  const [, channels, h, w] = args.latentDims as [number, number, number, number];
  const extra = args.extraChannels;
  const sampleChannels = channels + (extra ? extra.length / (h * w) : 0);
  const sampleDims = [batch, sampleChannels, h, w];
  const expected = model.sampleChannels(unet);
  if (expected !== undefined && expected !== sampleChannels) {
    throw new ModelLoadError(
      expected === 9
        ? `${unet.label} is an inpainting UNet (9 input channels): use it through image edits with a mask`
        : `${unet.label} takes ${expected} sample channels, the pipeline feeds ${sampleChannels}`,
    );
  }

  let latents = args.latents;
  let unetCalls = 0;
  const total = args.timesteps.length;
  for (let i = 0; i < total; i++) {
    throwIfAborted(args.signal);
    const t = args.timesteps[i]!;

    let started = performance.now();
    const scaled = scheduler.scaleModelInput(latents, t);
    const row = extra ? concat(scaled, extra) : scaled;
    const sample = cfg ? concat(row, row) : row;
    timings.schedulerMs += performance.now() - started;

    started = performance.now();
    const stepFeeds: Record<string, Feed> = {
      ...staticFeeds,
      sample: { data: sample, dims: sampleDims },
      timestep: timestepFeed(timestepInfo, batch, t),
    };
    const residuals = args.control ? await controlResiduals(args.control, stepFeeds, batch, t, run) : {};
    const out = await run(unet, { ...stepFeeds, ...residuals }, [outName]);
    timings.unetMs.push(performance.now() - started);
    unetCalls++;

    started = performance.now();
    const pred = out[outName]!.data;
    let noise: Float32Array;
    if (cfg) {
      noise = new Float32Array(size);
      for (let k = 0; k < size; k++) {
        const u = pred[k]!;
        noise[k] = u + guidanceScale * (pred[size + k]! - u);
      }
    } else {
      noise = pred;
    }
    latents = scheduler.step(noise, t, latents, args.rng);
    if (args.afterStep) latents = args.afterStep(latents, i, t);
    timings.schedulerMs += performance.now() - started;
    args.onLatents?.({ step: i + 1, totalSteps: total, latents, predOriginal: scheduler.lastPredOriginal, latentDims: args.latentDims });
    args.onStep?.(i + 1, total);
  }
  return { latents, unetCalls };
}

/** Where denoising starts: latents and the timesteps still to run (all, or a tail for img2img). */
export interface LatentStart {
  latents: Float32Array;
  timesteps: number[];
}

export interface StartContext {
  /** The request's settings: width and height are the output size. */
  settings: EffectiveSettings;
  scheduler: Scheduler;
  /** Seeded stream for the starting latents (noise, VAE sampling). */
  rng: Rng;
  /** [1, 4, h/8, w/8] at the size denoised at (`size`). */
  latentDims: number[];
  /** The size denoised at (denoiseSize): an input picture is brought to it before encoding. */
  size: Size;
}

/**
 * Runs one generation: settings -> scheduler -> starting latents (from `start`) -> text
 * conditioning -> the shared denoising loop -> VAE decode. txt2img and img2img differ only
 * in `start`; inpainting adds `afterStep`.
 */
export async function runDiffusion(
  model: DiffusionModel,
  options: GenerateOptions,
  start: (ctx: StartContext) => Promise<LatentStart> | LatentStart,
  extra: RunExtra = {},
): Promise<GenerateResult> {
  // The prompt's <lora:NAME:SCALE> tags: the model's variant with them, held while this runs.
  const use = await withPromptLoras(model, options, extra);
  try {
    // A ControlNet's UNet is the model's ControlNet-UNet: a LoRA variant's own (with its LoRAs) once
    // the prompt's tags swapped one in. A steering image prompt brings its own (runDiffusionOn).
    if (use.model !== model && use.extra.control && !imagePromptActive(options.imagePrompt)) {
      use.extra = { ...use.extra, unet: (await use.model.controlUnet()) ?? use.extra.unet };
    }
    return await runDiffusionOn(use.model, use.options, start, use.extra);
  } finally {
    use.release();
  }
}

type RunExtra = {
    settings?: Partial<EffectiveSettings>;
    afterStep?: DenoiseArgs['afterStep'];
    extraChannels?: Float32Array;
    unet?: OnnxModel;
    control?: ControlInput;
    /**
     * Post-processing of the decoded picture, after it has been resized to the output size
     * (inpainting pastes the unmasked input back at the size it was given).
     */
    afterDecode?: (image: RgbImage) => RgbImage;
};

async function runDiffusionOn(
  model: DiffusionModel,
  options: GenerateOptions,
  start: (ctx: StartContext) => Promise<LatentStart> | LatentStart,
  extra: RunExtra,
): Promise<GenerateResult> {
  const t0 = performance.now();
  const runMsBefore = model.stats.sessionRunMs;
  const settings = { ...resolveSettings(model, options), ...extra.settings };
  const scheduler = makeScheduler(model, settings);
  const timings: Timings = { tokenizeMs: 0, encodeMs: 0, unetMs: [], schedulerMs: 0, decodeMs: 0, totalMs: 0, sessionRunMs: 0 };
  const { onProgress, signal } = options;
  throwIfAborted(signal);

  const rng = createRng(settings.seed);
  const size = denoiseSize(model, settings);
  const latentDims = [1, LATENT_CHANNELS, size.height / VAE_FACTOR, size.width / VAE_FACTOR];
  scheduler.setTimesteps(settings.steps);
  const begin = await start({ settings, scheduler, rng, latentDims, size });

  onProgress?.({ stage: 'encode', step: 0, totalSteps: begin.timesteps.length });
  let started = performance.now();
  const cfg = usesCfg(model, settings.guidanceScale);
  // The option, not the settings' string: for SDXL an absent negative prompt differs from "".
  const { cond, uncond } = await encodePrompts(model, settings.prompt, options.negativePrompt, cfg, timings);
  if (cond.droppedTokens || uncond?.droppedTokens) {
    settings.droppedTokens = { ...(cond.droppedTokens ? { prompt: cond.droppedTokens } : {}), ...(uncond?.droppedTokens ? { negativePrompt: uncond.droppedTokens } : {}) };
  }
  // The image prompt's tokens, in the text's batch order; its UNet replaces the model's (with a
  // ControlNet: its residual-taking build replaces the ControlNet-UNet).
  const imagePrompt = await imagePromptInputs(model, options.imagePrompt, cfg, { otherUnet: extra.unet, control: extra.control !== undefined });
  timings.encodeMs = performance.now() - started;

  const { latents, unetCalls } = await denoise({
    model,
    scheduler,
    latents: begin.latents,
    latentDims,
    timesteps: begin.timesteps,
    cond,
    uncond,
    guidanceScale: settings.guidanceScale,
    // SDXL's size conditioning: the picture the UNet actually makes.
    width: size.width,
    height: size.height,
    rng: rng.fork(),
    signal,
    onStep: (step, total) => onProgress?.({ stage: 'denoise', step, totalSteps: total }),
    afterStep: extra.afterStep,
    onLatents: options.onStepLatents,
    extraChannels: extra.extraChannels,
    unet: imagePrompt?.unet ?? extra.unet,
    extraFeeds: imagePrompt?.feeds,
    control: extra.control && (await controlAtSize(extra.control, size)),
    batcher: options.batcher,
    timings,
  });

  throwIfAborted(signal);
  onProgress?.({ stage: 'decode', step: begin.timesteps.length, totalSteps: begin.timesteps.length });
  started = performance.now();
  const decoded = await resizeImage(await decodeLatents(model, latents, latentDims, options.batcher), settings.width, settings.height);
  const image = extra.afterDecode ? extra.afterDecode(decoded) : decoded;
  timings.decodeMs = performance.now() - started;
  timings.totalMs = performance.now() - t0;
  timings.sessionRunMs = model.stats.sessionRunMs - runMsBefore;
  return { image, latents, settings, timings, unetCalls };
}

/**
 * The ControlNet conditioning picture at the size denoised at: given at the output size, it is
 * resized like every other picture (RGB bytes in [0, 1], so the round trip through bytes is exact).
 */
async function controlAtSize(control: ControlInput, size: Size): Promise<ControlInput> {
  const [, channels, height, width] = control.imageDims as [number, number, number, number];
  if (width === size.width && height === size.height) return control;
  if (channels !== 3) throw new InvalidOptionError(`the control picture has ${channels} channels, expected 3`, 'image');
  const plane = width * height;
  const pixels = new Uint8Array(plane * 3);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) pixels[i * 3 + c] = Math.round(Math.min(1, Math.max(0, control.image[c * plane + i]!)) * 255);
  }
  const resized = await resizeImage({ width, height, pixels }, size.width, size.height);
  const out = size.width * size.height;
  const image = new Float32Array(out * 3);
  for (let i = 0; i < out; i++) for (let c = 0; c < 3; c++) image[c * out + i] = resized.pixels[i * 3 + c]! / 255;
  return { ...control, image, imageDims: [1, 3, size.height, size.width] };
}

/** Text-to-image's start: seeded Gaussian noise at the scheduler's initial sigma, all steps. */
export function noiseStart({ scheduler, rng, latentDims }: StartContext): LatentStart {
  const latents = rng.normals(latentDims.reduce((a, b) => a * b, 1));
  const sigma = scheduler.initNoiseSigma;
  for (let i = 0; i < latents.length; i++) latents[i]! *= sigma;
  return { latents, timesteps: scheduler.timesteps };
}

/** Text-to-image's start from given unit latents (`options.latents`), scaled like seeded noise. */
function givenLatentsStart(given: Float32Array): (ctx: StartContext) => LatentStart {
  return ({ scheduler, latentDims }) => {
    const expected = latentDims.reduce((a, b) => a * b, 1);
    if (!(given instanceof Float32Array) || given.length !== expected) {
      throw new InvalidOptionError(`latents must be a Float32Array of shape [${latentDims.join(', ')}] (${expected} values)`, 'latents');
    }
    const sigma = scheduler.initNoiseSigma;
    const latents = new Float32Array(expected);
    for (let i = 0; i < expected; i++) latents[i] = given[i]! * sigma;
    return { latents, timesteps: scheduler.timesteps };
  };
}

/** Text-to-image for one prompt and seed (or given starting latents). */
export function generate(model: DiffusionModel, options: GenerateOptions): Promise<GenerateResult> {
  return runDiffusion(model, options, options.latents ? givenLatentsStart(options.latents) : noiseStart);
}

/** LCM's guidance embedding: sinusoidal features of w = 1000·(g − 1), sin half then cos half. */
export function guidanceEmbedding(guidanceScale: number, dim: number): Float32Array {
  const w = (guidanceScale - 1) * 1000;
  const half = dim / 2;
  const emb = new Float32Array(dim);
  for (let k = 0; k < half; k++) {
    const freq = Math.exp((-k * Math.log(10000)) / (half - 1));
    emb[k] = Math.sin(w * freq);
    emb[half + k] = Math.cos(w * freq);
  }
  return emb;
}

function concat(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** Stacks equal-sized rows into one batch tensor; `dims` is one row's dims with batch 1. */
function batched(rows: Float32Array[], dims: number[]): { data: Float32Array; dims: number[] } {
  if (rows.length === 1) return { data: rows[0]!, dims };
  const rowSize = rows[0]!.length;
  const data = new Float32Array(rowSize * rows.length);
  rows.forEach((r, i) => data.set(r, i * rowSize));
  return { data, dims: [rows.length * dims[0]!, ...dims.slice(1)] };
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new GenerationCancelledError(signal.reason);
}
