/**
 * Request-level presets: `quality` names and sizes, mapped to engine settings.
 *
 * `quality` only ever picks a step count (nothing that could make a request unsafe or slow
 * beyond the `hd` tier). Names from Block Entropy (`smooth`), OpenAI (`standard`, `hd`,
 * `low`/`medium`/`high`, `auto`) and a `draft` tier all map onto three tiers.
 */
import { InvalidOptionError } from './errors.js';

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

export const DEFAULT_SIZES: readonly string[] = ['256x256', '512x512', '1024x1024'];

export interface Size {
  width: number;
  height: number;
}

/** Parses `WxH` and checks it against the allowed list (square 256/512/1024 by default). */
export function parseSize(size: string, allowed: readonly string[] = DEFAULT_SIZES): Size {
  const normalized = size.trim().toLowerCase();
  if (!allowed.includes(normalized)) {
    throw new InvalidOptionError(`unsupported size "${size}"; allowed: ${allowed.join(', ')}`, 'size');
  }
  const [w, h] = normalized.split('x').map(Number) as [number, number];
  return { width: w, height: h };
}
