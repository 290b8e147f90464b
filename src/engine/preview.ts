/**
 * Cheap previews of a generation in progress: the clean sample the scheduler predicts at a step
 * (its pred_original_sample) mapped to RGB by a linear map per VAE, 4 latent channels -> 3
 * colours plus a bias, one pixel per latent cell, then scaled up to the image size. No VAE run
 * per preview: the map costs 15 multiply-adds per latent cell. When the family's tiny VAE
 * decoder is installed (TAESD / TAESDXL, tiny-decoder.ts) it decodes the clean sample instead,
 * a picture that looks like the final image.
 *
 * The map is fitted once per VAE (per worker) by least squares from the VAE itself, so it holds
 * for any VAE (a family's stock one, kiln-tiny's own, a `--vae` replacement):
 *   - with a VAE encoder: a chart of 64 flat colours (4 levels per channel) is encoded once and
 *     each latent cell is paired with the colour it came from;
 *   - without one: the first finished image teaches it (its final latents paired with the decoded
 *     pixels, 8x8 block means); until then no previews are made.
 */
import sharp from 'sharp';
import type { DiffusionModel } from './model.js';
import type { OnnxModel } from './onnx.js';
import type { StepLatents } from './pipeline.js';
import { encodeImageToLatents, type RgbImage } from './vae.js';
import type { OutputFormat } from './image-codec.js';
import { solveLinear } from './schedulers/common.js';
import { DEFAULT_PREVIEW_BUDGET, tinyDecoderFor, type TinyDecoderLocation } from './tiny-decoder.js';

const CHANNELS = 4;
const FEATURES = CHANNELS + 1;
/** The chart: 8x8 patches of 16 px (2x2 latent cells each), colours {0, 85, 170, 255}^3. */
const PATCH = 16;
const GRID = 8;

/** RGB in the VAE's [-1, 1] output space = weights (3x4, row per colour) · latent + bias. */
export interface LatentRgbMap {
  weights: Float64Array;
  bias: Float64Array;
  /** Where it was fitted from. */
  source: 'vae-encoder' | 'final-image';
}

/** Sums for a least-squares fit: XᵀX (5x5) and XᵀY (5x3) over [latent, 1] -> rgb rows. */
class Fit {
  readonly xtx = new Float64Array(FEATURES * FEATURES);
  readonly xty = new Float64Array(FEATURES * 3);
  rows = 0;

  add(latent: ArrayLike<number>, rgb: ArrayLike<number>): void {
    const f = [...Array.from({ length: CHANNELS }, (_, c) => latent[c]!), 1];
    for (let i = 0; i < FEATURES; i++) {
      for (let j = 0; j < FEATURES; j++) this.xtx[i * FEATURES + j]! += f[i]! * f[j]!;
      for (let k = 0; k < 3; k++) this.xty[i * 3 + k]! += f[i]! * rgb[k]!;
    }
    this.rows++;
  }

  solve(source: LatentRgbMap['source']): LatentRgbMap {
    // A touch of ridge keeps a degenerate VAE (all cells alike) solvable; it changes nothing visible otherwise.
    const ridge = 1e-6 * this.rows;
    const a = Array.from({ length: FEATURES }, (_, i) =>
      Array.from({ length: FEATURES }, (_, j) => this.xtx[i * FEATURES + j]! + (i === j && i < CHANNELS ? ridge : 0)),
    );
    const weights = new Float64Array(3 * CHANNELS);
    const bias = new Float64Array(3);
    for (let k = 0; k < 3; k++) {
      const coef = solveLinear(a, Array.from({ length: FEATURES }, (_, i) => this.xty[i * 3 + k]!));
      for (let c = 0; c < CHANNELS; c++) weights[k * CHANNELS + c] = coef[c]!;
      bias[k] = coef[CHANNELS]!;
    }
    return { weights, bias, source };
  }
}

/** The colour chart the encoder fit uses, and each patch's colour. */
export function colourChart(): { image: RgbImage; colours: number[][] } {
  const levels = [0, 85, 170, 255];
  const colours: number[][] = [];
  for (const r of levels) for (const g of levels) for (const b of levels) colours.push([r, g, b]);
  const side = GRID * PATCH;
  const pixels = new Uint8Array(side * side * 3);
  for (let y = 0; y < side; y++) {
    for (let x = 0; x < side; x++) {
      const colour = colours[Math.floor(y / PATCH) * GRID + Math.floor(x / PATCH)]!;
      pixels.set(colour, (y * side + x) * 3);
    }
  }
  return { image: { width: side, height: side, pixels }, colours };
}

const toUnit = (v: number) => (v / 255) * 2 - 1;

/** Pairs latent cells [1,4,h,w] with target colours (in [-1, 1]) given per cell. */
function addCells(fit: Fit, latents: Float32Array, h: number, w: number, colourAt: (y: number, x: number) => ArrayLike<number>): void {
  const plane = h * w;
  const cell = new Float64Array(CHANNELS);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      for (let c = 0; c < CHANNELS; c++) cell[c] = latents[c * plane + y * w + x]!;
      fit.add(cell, colourAt(y, x));
    }
  }
}

/** Fits the map from the model's VAE encoder and the colour chart. */
export async function fitFromEncoder(model: DiffusionModel): Promise<LatentRgbMap> {
  const { image, colours } = colourChart();
  const { latents, dims } = await encodeImageToLatents(model, image, null);
  const [, , h, w] = dims as [number, number, number, number];
  const cellsPerPatch = PATCH / 8;
  const fit = new Fit();
  addCells(fit, latents, h, w, (y, x) => colours[Math.floor(y / cellsPerPatch) * GRID + Math.floor(x / cellsPerPatch)]!.map(toUnit));
  return fit.solve('vae-encoder');
}

/** Fits the map from a finished generation: its final latents [1,4,h,w] and the decoded image (8x8 px per cell). */
export function fitFromImage(latents: Float32Array, latentDims: number[], image: RgbImage): LatentRgbMap {
  const [, , h, w] = latentDims as [number, number, number, number];
  const fit = new Fit();
  const mean = new Float64Array(3);
  addCells(fit, latents, h, w, (y, x) => {
    mean.fill(0);
    for (let dy = 0; dy < 8; dy++) {
      for (let dx = 0; dx < 8; dx++) {
        const p = ((y * 8 + dy) * image.width + x * 8 + dx) * 3;
        for (let k = 0; k < 3; k++) mean[k]! += image.pixels[p + k]!;
      }
    }
    return Array.from(mean, (v) => toUnit(v / 64));
  });
  return fit.solve('final-image');
}

/** Maps latents [1,4,h,w] to an RGB image of h x w pixels. */
export function latentsToRgb(map: LatentRgbMap, latents: Float32Array, latentDims: number[]): RgbImage {
  const [, , h, w] = latentDims as [number, number, number, number];
  const plane = h * w;
  const pixels = new Uint8Array(plane * 3);
  const { weights, bias } = map;
  for (let i = 0; i < plane; i++) {
    const l0 = latents[i]!;
    const l1 = latents[plane + i]!;
    const l2 = latents[2 * plane + i]!;
    const l3 = latents[3 * plane + i]!;
    for (let k = 0; k < 3; k++) {
      const o = k * CHANNELS;
      const v = weights[o]! * l0 + weights[o + 1]! * l1 + weights[o + 2]! * l2 + weights[o + 3]! * l3 + bias[k]!;
      pixels[i * 3 + k] = Math.round(Math.min(1, Math.max(0, v / 2 + 0.5)) * 255);
    }
  }
  return { width: w, height: h, pixels };
}

// ---- the map of each VAE, fitted once --------------------------------------------------------

const maps = new WeakMap<OnnxModel, Promise<LatentRgbMap | undefined>>();

/**
 * The model's latent -> RGB map; undefined while it has no VAE encoder and no finished image has
 * taught it one. An encoder that fails to load or run is treated as absent (a preview is never
 * worth failing the image for).
 */
export function latentRgbMap(model: DiffusionModel): Promise<LatentRgbMap | undefined> {
  let map = maps.get(model.vaeDecoder);
  if (!map) {
    map = model.layout.hasVaeEncoder ? fitFromEncoder(model).catch(() => undefined) : Promise.resolve(undefined);
    maps.set(model.vaeDecoder, map);
  }
  return map;
}

/** Lets a finished generation teach the map to a model that has none yet (no VAE encoder). */
export async function learnFromResult(model: DiffusionModel, result: { latents: Float32Array; image: RgbImage }): Promise<void> {
  if (await latentRgbMap(model)) return;
  const h = result.image.height / 8;
  const w = result.image.width / 8;
  if (result.latents.length !== CHANNELS * h * w) return;
  maps.set(model.vaeDecoder, Promise.resolve(fitFromImage(result.latents, [1, CHANNELS, h, w], result.image)));
}

// ---- which steps, and the partial images themselves -------------------------------------------

/**
 * The step counts (1-based: after that many steps) to preview for `count` partial images of a
 * `totalSteps` run: spread over the run at k/(count+1), never the last step (the final image is
 * what comes then). Fewer than `count` when the run is too short to spread them.
 */
export function previewSteps(totalSteps: number, count: number): number[] {
  const steps = new Set<number>();
  for (let k = 1; k <= count; k++) {
    const s = Math.round((totalSteps * k) / (count + 1));
    if (s >= 1 && s < totalSteps) steps.add(s);
  }
  return [...steps].sort((a, b) => a - b);
}

/**
 * A preview scaled to the image size (bilinear) and encoded in the image's format, in one sharp
 * pipeline (PNG without text chunks and at zlib's fastest level, WebP at the lowest effort: a
 * preview is not worth the slow settings). A linear-map preview, upscaled from one pixel per
 * latent cell, barely compresses anyway (256x256: 195 KB at level 1, 178 KB at level 6, 197 KB
 * raw), and level 6 cost about 7 ms of CPU more per preview (stream / plain p50 on kiln-tiny,
 * bench:server --partial-images 3: 1.05-1.07 at level 6, 1.01-1.02 at level 1).
 */
export async function encodePreview(image: RgbImage, width: number, height: number, format: OutputFormat, quality?: number): Promise<Buffer> {
  const scaled = sharp(Buffer.from(image.pixels.buffer, image.pixels.byteOffset, image.pixels.byteLength), {
    raw: { width: image.width, height: image.height, channels: 3 },
  }).resize(width, height, { kernel: 'linear', fit: 'fill' });
  switch (format) {
    case 'jpeg':
      return scaled.jpeg({ quality: quality ?? 90 }).toBuffer();
    case 'webp':
      return scaled.webp({ quality: quality ?? 90, effort: 0 }).toBuffer();
    case 'png':
      return scaled.png({ compressionLevel: 1, adaptiveFiltering: false }).toBuffer();
  }
}

export interface PartialImage {
  /** 0-based, in the order they are made. */
  index: number;
  /** Steps done when it was taken, and the run's total. */
  step: number;
  totalSteps: number;
  bytes: Buffer;
  /** What drew it: the family's tiny decoder (`taesd`, `taesdxl`) or the linear map. */
  decoder: string;
}

export interface PreviewerOptions {
  /** How many partial images (the API's partial_images). */
  count: number;
  width: number;
  height: number;
  format: OutputFormat;
  quality?: number;
  onPartial: (partial: PartialImage) => void;
  /** Where the tiny decoders are (<home>/previews/); absent or false: the linear map only. */
  tinyDecoder?: TinyDecoderLocation | false;
  /** A tiny decoder that does not load or run (default: a line on stderr). */
  onWarning?: (message: string) => void;
  /** The share of the run's time tiny-decoder previews may take (default 0.05; commands pass $KILN_PREVIEW_BUDGET; see withinBudget). */
  budget?: number;
}

/**
 * Whether a run can afford its previews from the tiny decoder: `count` decodes of `decodeMs`
 * each within `budget` of the run's expected time, `totalSteps` at the pace of the first `step`
 * (`elapsedMs` since the run began, text encoding included).
 */
export function withinBudget(decodeMs: number, count: number, elapsedMs: number, step: number, totalSteps: number, budget: number): boolean {
  if (budget === Infinity) return true;
  const runMs = (elapsedMs / Math.max(1, step)) * totalSteps;
  return decodeMs * count <= budget * runMs;
}

/**
 * Turns a run's steps into partial images: pass `onStepLatents` to the generation, then await
 * `flush()` before using the final image, so that every partial has been delivered before it.
 * Encoding runs beside the denoising loop (sharp works off the JS thread).
 */
export function createPreviewer(model: DiffusionModel, options: PreviewerOptions) {
  const map = latentRgbMap(model);
  const warn = options.onWarning ?? ((m: string): void => void process.stderr.write(`kiln: warning: ${m}\n`));
  const tiny = options.tinyDecoder ? tinyDecoderFor(model, options.tinyDecoder, warn) : Promise.resolve(undefined);
  const budget = options.budget ?? DEFAULT_PREVIEW_BUDGET;
  const started = performance.now();
  let tinyFailed = false;
  /** Decided at the first preview, for the whole run (previews of one run all look alike). */
  let affordable: boolean | undefined;
  /** The step's picture: the tiny decoder's when it has one, else the linear map's (undefined while there is none). */
  const draw = async (x0: Float32Array, dims: number[], at: { step: number; totalSteps: number; elapsedMs: number }): Promise<{ image: RgbImage; decoder: string } | undefined> => {
    const decoder = tinyFailed ? undefined : await tiny;
    if (decoder && decoder.config.latentChannels === dims[1]) {
      affordable ??= withinBudget(decoder.estimateMs(dims), wanted!.size, at.elapsedMs, at.step, at.totalSteps, budget);
    }
    if (decoder && affordable && decoder.config.latentChannels === dims[1]) {
      try {
        return { image: await decoder.decode(x0, dims), decoder: decoder.alias };
      } catch (err) {
        tinyFailed = true; // for the rest of this run
        warn(`previews: the tiny decoder in ${decoder.dir} failed (${err instanceof Error ? err.message : String(err)}); this run's previews use the linear latent map`);
      }
    }
    const m = await map;
    return m && { image: latentsToRgb(m, x0, dims), decoder: 'linear' };
  };
  let chain: Promise<void> = Promise.resolve();
  let wanted: Set<number> | undefined;
  let index = 0;
  return {
    onStepLatents(s: StepLatents): void {
      wanted ??= new Set(previewSteps(s.totalSteps, options.count));
      if (!wanted.has(s.step)) return;
      const x0 = s.predOriginal ?? s.latents;
      const at = { step: s.step, totalSteps: s.totalSteps, elapsedMs: performance.now() - started };
      chain = chain.then(async () => {
        const drawn = await draw(x0, s.latentDims, at);
        if (!drawn) return;
        const bytes = await encodePreview(drawn.image, options.width, options.height, options.format, options.quality);
        options.onPartial({ index: index++, step: s.step, totalSteps: s.totalSteps, bytes, decoder: drawn.decoder });
      });
    },
    /** Resolves when every partial so far is delivered; rejects if one failed. */
    flush(): Promise<void> {
      return chain;
    },
  };
}
