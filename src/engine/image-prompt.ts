/**
 * Image prompts (IP-Adapter): an uploaded picture steers the generation through the adapters'
 * decoupled cross-attention, each adapter at its own weight, as diffusers' IP-Adapter path does.
 *
 * Per generation: CLIP preprocessing of the picture (below) -> the image encoder -> what the
 * adapter reads (`image_embeds` for base adapters, the penultimate hidden states for Plus / face
 * adapters) -> the adapter's projection -> image tokens, fed to a UNet built with the adapters'
 * layers (src/graphs/ip-adapter.ts) beside the model's plain one (with a ControlNet, the same UNet
 * with residual inputs; for a LoRA variant, with its LoRAs). Under classifier-free guidance
 * the rows are [uncond, cond] like the text's; the unconditional row follows diffusers:
 * zeros in place of the image embeddings (base), the encoder's output for an all-zero
 * `pixel_values` tensor (Plus). Every weight 0: the image prompt is skipped entirely (diffusers
 * skips the IP part at scale 0), so the plain UNet runs and the image is the plain model's.
 *
 * Preprocessing, diffusers' CLIPImageProcessor(size = crop = the encoder's image_size) as
 * `load_ip_adapter` makes it: resize so that the short side is `size` with PIL's bicubic filter
 * (reproduced here in integer arithmetic, bit for bit), the long side int(size·long/short); centre
 * crop at top = (h − size) // 2, left = (w − size) // 2; ·(1/255) in float64 then float32;
 * (x − mean) / std in float32 with OpenAI CLIP's mean and std; NCHW.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { ensureImagePromptBuilt, ensureImagePromptControlUnet, type ImagePromptBuild, type IpAdapterKind } from '../graphs/ip-adapter.js';
import type { GraphDtype } from '../graphs/convert.js';
import { ipInputNames } from '../graphs/unet.js';
import { InvalidOptionError, ModelLoadError } from './errors.js';
import type { DiffusionModel } from './model.js';
import { OnnxModel, type Device, type Feed, type FloatTensor } from './onnx.js';
import type { RgbImage } from './vae.js';

// ---------------------------------------------------------------------------------------------
// PIL's bicubic resize (Pillow's Resample.c, 8-bit path)

/** Pillow's fixed point: coefficients carry 22 fractional bits. */
const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;

/** Pillow's bicubic kernel (a = -0.5), support 2. */
function bicubic(x: number): number {
  const a = -0.5;
  const t = Math.abs(x);
  if (t < 1) return ((a + 2) * t - (a + 3)) * t * t + 1;
  if (t < 2) return (((t - 5) * t + 8) * t - 4) * a;
  return 0;
}

/** Per output pixel: the first input pixel, how many, and their integer weights (Pillow's precompute_coeffs + normalize_coeffs_8bpc). */
function coefficients(inSize: number, outSize: number): { first: number[]; weights: number[][] } {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = 2 * filterscale;
  const first: number[] = [];
  const weights: number[][] = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    const k: number[] = [];
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) * ss);
      k.push(w);
      ww += w;
    }
    first.push(xmin);
    weights.push(k.map((w) => {
      const v = ww !== 0 ? w / ww : w;
      return Math.trunc(v < 0 ? -0.5 + v * ONE : 0.5 + v * ONE);
    }));
  }
  return { first, weights };
}

function clip8(acc: number): number {
  const v = Math.floor(acc / ONE);
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** One resampling pass along x (`horizontal`) or y of an interleaved RGB image. */
function resamplePass(src: Uint8Array, width: number, height: number, outSize: number, horizontal: boolean): Uint8Array {
  const { first, weights } = coefficients(horizontal ? width : height, outSize);
  const outW = horizontal ? outSize : width;
  const outH = horizontal ? height : outSize;
  const out = new Uint8Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const i = horizontal ? x : y;
      const k = weights[i]!;
      const start = first[i]!;
      for (let c = 0; c < 3; c++) {
        let acc = ONE / 2;
        for (let j = 0; j < k.length; j++) {
          const at = horizontal ? (y * width + start + j) * 3 + c : ((start + j) * width + x) * 3 + c;
          acc += src[at]! * k[j]!;
        }
        out[(y * outW + x) * 3 + c] = clip8(acc);
      }
    }
  }
  return out;
}

/** `PIL.Image.resize((width, height), BICUBIC)` of an 8-bit RGB image: horizontal pass, then vertical, each rounded to 8 bits. */
export function resizeBicubicPil(image: RgbImage, width: number, height: number): RgbImage {
  let pixels = image.pixels;
  let w = image.width;
  if (width !== image.width) {
    pixels = resamplePass(pixels, image.width, image.height, width, true);
    w = width;
  }
  if (height !== image.height) pixels = resamplePass(pixels, w, image.height, height, false);
  return { width, height, pixels: pixels === image.pixels ? new Uint8Array(pixels) : pixels };
}

// ---------------------------------------------------------------------------------------------
// CLIP preprocessing

export const CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073] as const;
export const CLIP_STD = [0.26862954, 0.26130258, 0.27577711] as const;
const RESCALE = 0.00392156862745098; // transformers' rescale_factor, 1/255 as a double

/** CLIPImageProcessor's `pixel_values` [1, 3, size, size] for an RGB picture (see the file comment). */
export function clipPixelValues(image: RgbImage, size: number): Float32Array {
  const { width, height } = image;
  if (!(width > 0 && height > 0)) throw new InvalidOptionError('the image prompt picture is empty', 'image');
  const [short, long] = width <= height ? [width, height] : [height, width];
  const newLong = Math.trunc((size * long) / short);
  const [w, h] = width <= height ? [size, newLong] : [newLong, size];
  const resized = resizeBicubicPil(image, w, h);
  const top = Math.floor((h - size) / 2);
  const left = Math.floor((w - size) / 2);
  const plane = size * size;
  const out = new Float32Array(3 * plane);
  const fround = Math.fround;
  for (let c = 0; c < 3; c++) {
    const mean = fround(CLIP_MEAN[c]!);
    const std = fround(CLIP_STD[c]!);
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const v = fround(resized.pixels[((y + top) * w + x + left) * 3 + c]! * RESCALE);
        out[c * plane + y * size + x] = fround(fround(v - mean) / std);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The runner: sessions of one model's adapters

export interface ImageAdapterFiles {
  /** The IP-Adapter .safetensors file (h94 layout: `ip-adapter_sd15.safetensors`, `ip-adapter-plus-face_sdxl_vit-h.safetensors`, ...). */
  adapter: string;
  /** Its image encoder folder (CLIPVisionModelWithProjection: config.json + model.safetensors). */
  imageEncoder: string;
}

export interface ImagePromptLoadOptions {
  /** Where the adapter graphs are built (the Engine's cacheDir); required. */
  cacheDir?: string | undefined;
  /** Graph precision (default: fp16 on CUDA, fp32 on CPU, as the Engine). */
  dtype?: GraphDtype;
  device?: Device;
}

interface EncoderRuntime {
  model: OnnxModel;
  imageSize: number;
  /** Plus adapters' unconditional input: the encoder's output for all-zero pixel values, by output name. */
  zeros: Map<string, Promise<FloatTensor>>;
}

export interface ImageAdapterRuntime {
  name: string;
  kind: IpAdapterKind;
  tokens: number;
  projection: OnnxModel;
  /** The encoder output the projection takes. */
  encoderOutput: string;
  encoder: EncoderRuntime;
}

/** A model's UNet with one or more IP-Adapters, their projections and image encoders, loaded. */
export class ImagePromptRunner {
  /** Set by loadImagePrompt: drops this runner from its cache when released. */
  onRelease?: () => void;

  constructor(
    /** The model these adapters were built for. */
    readonly model: DiffusionModel,
    /** The UNet with the adapters' layers (inputs ip_tokens / ip_scale, ...). */
    readonly unet: OnnxModel,
    readonly adapters: readonly ImageAdapterRuntime[],
    readonly build: ImagePromptBuild,
  ) {}

  /**
   * What each adapter's projection takes for `image`, as diffusers' prepare_ip_adapter_image_embeds
   * gives it: rows [uncond, cond] under guidance, else [cond]; [rows, D] or [rows, tokens, hidden].
   */
  async imageEmbeds(image: RgbImage, cfg: boolean): Promise<FloatTensor[]> {
    const pixels = new Map<number, Float32Array>();
    const out: FloatTensor[] = [];
    for (const a of this.adapters) {
      const { model, imageSize } = a.encoder;
      let pv = pixels.get(imageSize);
      if (!pv) pixels.set(imageSize, (pv = clipPixelValues(image, imageSize)));
      const dims = [1, 3, imageSize, imageSize];
      const cond = (await model.run({ pixel_values: { data: pv, dims } }, [a.encoderOutput]))[a.encoderOutput]!;
      if (!cfg) {
        out.push(cond);
        continue;
      }
      let uncond: Float32Array;
      if (a.kind === 'base') uncond = new Float32Array(cond.data.length);
      else {
        let zeros = a.encoder.zeros.get(a.encoderOutput);
        if (!zeros) {
          const blank = { pixel_values: { data: new Float32Array(pv.length), dims } };
          zeros = model.run(blank, [a.encoderOutput]).then((r) => r[a.encoderOutput]!);
          a.encoder.zeros.set(a.encoderOutput, zeros);
          zeros.catch(() => a.encoder.zeros.delete(a.encoderOutput));
        }
        uncond = (await zeros).data;
      }
      const data = new Float32Array(cond.data.length * 2);
      data.set(uncond);
      data.set(cond.data, cond.data.length);
      out.push({ data, dims: [2, ...cond.dims.slice(1)] });
    }
    return out;
  }

  /** Each adapter's image tokens [rows, N, cross_attention_dim] for `image` (rows as imageEmbeds). */
  async imageTokens(image: RgbImage, cfg: boolean): Promise<FloatTensor[]> {
    const embeds = await this.imageEmbeds(image, cfg);
    const out: FloatTensor[] = [];
    for (const [k, a] of this.adapters.entries()) {
      out.push((await a.projection.run({ image_embeds: embeds[k]! }, ['ip_tokens'])).ip_tokens!);
    }
    return out;
  }

  private controlUnet: Promise<OnnxModel> | undefined;

  /**
   * The adapter UNet a generation on `model` runs: with ControlNet residual inputs when `control`
   * (image prompt and pose together; built on first use), and with the LoRAs of `model` when it
   * is a LoRA variant of the model the adapters were built for (its kiln.json's or a prompt's:
   * folded into the adapter UNet as into its own, model.withLoras).
   */
  async unetFor(model: DiffusionModel, control: boolean): Promise<OnnxModel> {
    if (!model.sameModelAs(this.model)) {
      throw new InvalidOptionError(`the image prompt's adapters are built into model ${this.model.name}'s own UNet; this generation runs model ${model.name}`, 'image');
    }
    const graph = control ? ensureImagePromptControlUnet(this.build, this.model.name) : this.build.unet;
    const withLoras = await model.withLoras(graph);
    if (withLoras) return withLoras;
    if (!control) return this.unet;
    this.controlUnet ??= OnnxModel.load(graph, dirname(this.build.dir), { device: this.model.device, stats: this.model.stats });
    const loading = this.controlUnet;
    loading.catch(() => {
      if (this.controlUnet === loading) this.controlUnet = undefined;
    });
    return loading;
  }

  /** Frees the sessions; a later loadImagePrompt loads them afresh. */
  async release(): Promise<void> {
    this.onRelease?.();
    const control = await this.controlUnet?.catch(() => undefined);
    const sessions = new Set<OnnxModel | undefined>([this.unet, control, ...this.adapters.flatMap((a) => [a.projection, a.encoder.model])]);
    await Promise.all([...sessions].map((s) => s?.release()));
  }
}

/**
 * The UNet folder a loaded model was built from: Kiln builds adapter layers into a UNet from its
 * safetensors weights, so the model must be one the Engine built (its kiln-build.json names the source).
 */
export function modelUnetSource(model: DiffusionModel): string {
  const info = join(model.layout.dir, 'kiln-build.json');
  let source: unknown;
  if (existsSync(info)) {
    try {
      source = (JSON.parse(readFileSync(info, 'utf8')) as { source?: unknown }).source;
    } catch {
      // reported below
    }
  }
  const unet = typeof source === 'string' ? join(resolve(source), 'unet') : undefined;
  if (!unet || !existsSync(join(unet, 'config.json'))) {
    throw new ModelLoadError(
      `image prompts need model ${model.name} as diffusers safetensors weights (Kiln builds the IP-Adapter layers into its UNet); ` +
        `${model.layout.dir} is an ONNX folder without them`,
      model.layout.dir,
    );
  }
  return unet;
}

const runners = new WeakMap<DiffusionModel, Map<string, Promise<ImagePromptRunner>>>();

/**
 * The image-prompt runner for a model and adapters (loaded once per model and adapter list, then
 * shared until released; the model's own release() does not free it): the adapter graphs are built on first use into `cacheDir` (cached across runs), then
 * loaded. Errors are ModelLoadErrors naming the missing or unfitting piece: a missing adapter file
 * or image encoder, an adapter of another model family, an encoder of the wrong width, an ONNX-only model.
 */
export function loadImagePrompt(model: DiffusionModel, adapters: readonly ImageAdapterFiles[], options: ImagePromptLoadOptions): Promise<ImagePromptRunner> {
  const { cacheDir } = options;
  if (cacheDir === undefined) {
    return Promise.reject(new ModelLoadError('image prompts build adapter graphs under a cache folder: pass the cacheDir option (the Engine\'s cacheDir)'));
  }
  const device = options.device ?? model.device;
  const dtype = options.dtype ?? (device === 'cuda' ? 'fp16' : 'fp32');
  const key = JSON.stringify([adapters.map((a) => [resolve(a.adapter), resolve(a.imageEncoder)]), resolve(cacheDir), dtype, device]);
  let byKey = runners.get(model);
  if (!byKey) runners.set(model, (byKey = new Map()));
  const known = byKey.get(key);
  if (known) return known;
  const loading = loadRunner(model, adapters, cacheDir, dtype, device);
  const forget = (): void => {
    if (byKey.get(key) === loading) byKey.delete(key);
  };
  byKey.set(key, loading);
  loading.then((runner) => (runner.onRelease = forget), forget);
  return loading;
}

async function loadRunner(model: DiffusionModel, adapters: readonly ImageAdapterFiles[], cacheDir: string, dtype: GraphDtype, device: Device): Promise<ImagePromptRunner> {
  if (!adapters.length) throw new ModelLoadError('an image prompt needs at least one IP-Adapter');
  const unetSource = modelUnetSource(model);
  const build = await ensureImagePromptBuilt({
    unet: unetSource,
    adapters: adapters.map((a) => ({ file: a.adapter, imageEncoder: a.imageEncoder })),
    cacheDir,
    dtype,
    model: model.name,
  });
  const options = { device, stats: model.stats };
  const root = dirname(build.dir);
  const unet = await OnnxModel.load(build.unet, root, options);
  const encoders: EncoderRuntime[] = [];
  for (const e of build.encoders) encoders.push({ model: await OnnxModel.load(e.graph, root, options), imageSize: e.imageSize, zeros: new Map() });
  const runtimes: ImageAdapterRuntime[] = [];
  for (const a of build.adapters) {
    runtimes.push({
      name: a.name,
      kind: a.kind,
      tokens: a.tokens,
      projection: await OnnxModel.load(a.projection, root, options),
      encoderOutput: a.encoderOutput,
      encoder: encoders[a.encoder]!,
    });
  }
  return new ImagePromptRunner(model, unet, runtimes, build);
}

// ---------------------------------------------------------------------------------------------
// What a generation takes

/** An image prompt for one generation (GenerateOptions.imagePrompt). */
export interface ImagePrompt {
  /** From loadImagePrompt for the model being run. */
  runner: ImagePromptRunner;
  /** The picture, any size (it is resized and centre-cropped as CLIP's preprocessing does). */
  image: RgbImage;
  /** The weight of each adapter, in the runner's order (a number: the same for all); 0 turns one off. */
  scale: number | readonly number[];
}

export const MAX_IMAGE_PROMPT_SCALE = 5;

function scalesOf(prompt: ImagePrompt): number[] {
  const count = prompt.runner.adapters.length;
  const scales = typeof prompt.scale === 'number' ? new Array<number>(count).fill(prompt.scale) : [...prompt.scale];
  if (scales.length !== count) throw new InvalidOptionError(`the image prompt has ${scales.length} weights for ${count} adapter(s)`, 'user');
  for (const s of scales) {
    if (typeof s !== 'number' || !Number.isFinite(s) || s < 0 || s > MAX_IMAGE_PROMPT_SCALE) {
      throw new InvalidOptionError(`image prompt weights must be numbers from 0 to ${MAX_IMAGE_PROMPT_SCALE}`, 'user');
    }
  }
  return scales;
}

/** Whether an image prompt steers the generation (some weight above 0); throws for bad weights. */
export function imagePromptActive(prompt: ImagePrompt | undefined): prompt is ImagePrompt {
  return prompt !== undefined && scalesOf(prompt).some((s) => s > 0);
}

/**
 * The UNet and extra feeds of an image prompt for one generation, or undefined when there is
 * none or every weight is 0 (then the UNet the request would run anyway runs: the plain model's
 * image). `otherUnet`: the UNet the request would otherwise run, when not the model's own;
 * `control`: the request also runs a ControlNet (pose), whose residuals the adapter UNet then takes
 * (its residual-taking build replaces the model's ControlNet-UNet). A dedicated inpainting UNet
 * has no adapter layers and is refused.
 */
export async function imagePromptInputs(
  model: DiffusionModel,
  prompt: ImagePrompt | undefined,
  cfg: boolean,
  use: { otherUnet?: OnnxModel; control?: boolean } = {},
): Promise<{ unet: OnnxModel; feeds: Record<string, Feed> } | undefined> {
  if (!imagePromptActive(prompt)) return undefined;
  const scales = scalesOf(prompt);
  const { otherUnet, control = false } = use;
  if (!control && otherUnet && otherUnet !== model.unet) {
    throw new InvalidOptionError(
      `image prompts (IP-Adapter) run through model ${model.name}'s own UNet; this request needs ${otherUnet.label}, which has no adapter layers`,
      'user',
    );
  }
  const unet = await prompt.runner.unetFor(model, control);
  const tokens = await prompt.runner.imageTokens(prompt.image, cfg);
  const feeds: Record<string, Feed> = {};
  tokens.forEach((t, k) => {
    const names = ipInputNames(k);
    feeds[names.tokens] = t;
    feeds[names.scale] = { data: Float32Array.of(scales[k]!), dims: [1] };
  });
  return { unet, feeds };
}
