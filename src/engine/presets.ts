/**
 * Request-level presets: `quality` names and sizes, mapped to engine settings.
 *
 * `quality` only ever picks a step count (nothing that could make a request unsafe or slow
 * beyond the `hd` tier). Names from Block Entropy (`smooth`), OpenAI (`standard`, `hd`,
 * `low`/`medium`/`high`, `auto`) and a `draft` tier all map onto three tiers.
 */
import { InvalidOptionError } from './errors.js';
import type { ModelFamily } from './model.js';

export type QualityTier = 'draft' | 'smooth' | 'hd';

const QUALITY_TIERS: Record<string, QualityTier> = {
  draft: 'draft',
  low: 'draft',
  smooth: 'smooth',
  standard: 'smooth',
  medium: 'smooth',
  auto: 'smooth',
  hd: 'hd',
  high: 'hd',
};

export const QUALITY_NAMES: readonly string[] = Object.keys(QUALITY_TIERS);
export const DEFAULT_QUALITY = 'smooth';

export type StepsByTier = Record<QualityTier, number>;

/** Full models (SD 1.x/2.x, SDXL) and distilled ones (Turbo, LCM). */
export const DEFAULT_STEPS: { full: StepsByTier; distilled: StepsByTier } = {
  full: { draft: 12, smooth: 25, hd: 40 },
  distilled: { draft: 1, smooth: 4, hd: 8 },
};

export function qualityTier(quality: string | undefined): QualityTier {
  const name = (quality ?? DEFAULT_QUALITY).toLowerCase();
  const tier = QUALITY_TIERS[name];
  if (!tier) {
    throw new InvalidOptionError(
      `unknown quality "${quality}"; allowed: ${QUALITY_NAMES.join(', ')}`,
      'quality',
    );
  }
  return tier;
}

/** The squares of the reference API. */
export const SQUARE_SIZES: readonly string[] = ['256x256', '512x512', '1024x1024'];
/** The sizes every model takes by name: the squares and OpenAI's wide and tall ones (DALL-E 3, GPT image). */
export const DEFAULT_SIZES: readonly string[] = [...SQUARE_SIZES, '1792x1024', '1024x1792', '1536x1024', '1024x1536'];
/** Other sizes: both sides a multiple of this (the UNet halves the latent three times), within the family's range. */
export const SIZE_STEP = 64;

export interface SizeRange {
  min: number;
  max: number;
}

/**
 * The sides a family takes besides the named sizes. SDXL was trained on buckets from 512 to 2048
 * pixels a side (1024² area); SD 1.x/2.x at 512 or 768, and much past 1024 they repeat subjects.
 */
export const SIZE_RANGES: Readonly<Record<ModelFamily, SizeRange>> = {
  sd1: { min: 256, max: 1024 },
  sd2: { min: 256, max: 1024 },
  sdxl: { min: 256, max: 2048 },
};

export interface Size {
  width: number;
  height: number;
}

/** Parses `WxH` and checks it against an explicit list of sizes (default: the named sizes). */
export function parseSize(size: string, allowed: readonly string[] = DEFAULT_SIZES): Size {
  const normalized = size.trim().toLowerCase();
  if (!allowed.includes(normalized)) {
    throw new InvalidOptionError(`unsupported size "${size}"; allowed: ${allowed.join(', ')}`, 'size');
  }
  const [w, h] = normalized.split('x').map(Number) as [number, number];
  return { width: w, height: h };
}

/** What a size depends on: the model's family (its range) and its native size (`auto`). */
export interface SizeContext {
  family: ModelFamily;
  nativeSize: Size;
}

/**
 * A request's size for a model: a named size, `auto` (the model's native size), or `WxH` with
 * both sides multiples of 64 within the family's range. Throws InvalidOptionError ('size').
 */
export function resolveSize(size: string, model: SizeContext): Size {
  const normalized = size.trim().toLowerCase();
  if (normalized === 'auto') return { ...model.nativeSize };
  if (DEFAULT_SIZES.includes(normalized)) return parseSize(normalized);
  const range = SIZE_RANGES[model.family];
  const m = /^(\d{1,6})x(\d{1,6})$/.exec(normalized);
  if (m) {
    const width = Number(m[1]);
    const height = Number(m[2]);
    const fits = (v: number) => v % SIZE_STEP === 0 && v >= range.min && v <= range.max;
    if (fits(width) && fits(height)) return { width, height };
  }
  throw new InvalidOptionError(
    `unsupported size "${size.length > 40 ? `${size.slice(0, 37)}...` : size}"; allowed: ${DEFAULT_SIZES.join(', ')}, auto (the model's native size, ` +
      `${model.nativeSize.width}x${model.nativeSize.height}), or WxH with both sides multiples of ${SIZE_STEP} from ${range.min} to ${range.max} for this model`,
    'size',
  );
}

/**
 * `auto` for an edit: the upload's shape at the model's native area, sides rounded to multiples
 * of 64 and kept within the family's range (the upload is then cropped to that shape, if at all,
 * by a sliver).
 */
export function sizeForUpload(upload: Size, model: SizeContext): Size {
  const range = SIZE_RANGES[model.family];
  const scale = Math.sqrt((model.nativeSize.width * model.nativeSize.height) / (upload.width * upload.height));
  const side = (v: number) => Math.min(range.max, Math.max(range.min, Math.round((v * scale) / SIZE_STEP) * SIZE_STEP));
  return { width: side(upload.width), height: side(upload.height) };
}

/**
 * The size a model that declares a native size (kiln.json `native_size`) denoises at for a
 * requested size: the native area with the requested aspect ratio, both sides multiples of
 * `step` (at least one step). Of the four roundings of the ideal sides, the one closest in
 * aspect ratio wins, then the one closest in area; the decoded picture is then resized to the
 * request (a stretch of a few percent at most for OpenAI's wide and tall sizes).
 */
export function nativeWorkingSize(requested: Size, native: Size, step = SIZE_STEP): Size {
  const area = native.width * native.height;
  const aspect = requested.width / requested.height;
  const idealW = Math.sqrt(area * aspect);
  const idealH = Math.sqrt(area / aspect);
  const around = (v: number) => [...new Set([Math.floor(v / step), Math.ceil(v / step)].map((k) => Math.max(1, k) * step))];
  let best: Size = { ...native };
  let bestScore = [Infinity, Infinity];
  for (const width of around(idealW)) {
    for (const height of around(idealH)) {
      const score = [Math.abs(Math.log(width / height / aspect)), Math.abs(Math.log((width * height) / area))];
      // Aspect errors within float noise count as equal, so that the area decides.
      const better = score[0]! < bestScore[0]! - 1e-9 || (Math.abs(score[0]! - bestScore[0]!) <= 1e-9 && score[1]! < bestScore[1]!);
      if (better) {
        best = { width, height };
        bestScore = score;
      }
    }
  }
  return best;
}
