/**
 * The kiln-tiny world in TypeScript: palette, captions, a renderer and the pixel scorer.
 *
 * The models in models/kiln-tiny* were trained on this world (tools/kiln-tiny/world.py renders
 * the training set). Kiln's side needs the same world to judge its own output: the accuracy
 * benchmark (bench/eval-tiny.ts), the suite's accuracy test and the edit tests all score images
 * by pixels alone, with the rules of world.py's scorer:
 * - background: nearest palette colour to the per-channel median of the outer 8-pixel border;
 * - foreground: the largest 4-connected region whose pixels' nearest palette colour is not the
 *   background; its colour is the nearest palette entry to its median;
 * - shape from the fill ratio of its bounding box (circle 0.70-0.86, square >= 0.90, triangle
 *   0.40-0.60), size from its larger side (< 40% of the width: small), position from its centroid.
 */
import { createRng, type Rng } from '../src/engine/rng.js';
import { median } from './stats.js';

export const COLORS = {
  red: [220, 40, 40],
  green: [40, 180, 70],
  blue: [40, 80, 220],
  yellow: [240, 210, 40],
  orange: [245, 140, 30],
  purple: [140, 60, 190],
  white: [245, 245, 245],
  black: [20, 20, 20],
} as const satisfies Record<string, readonly [number, number, number]>;
export type ColorName = keyof typeof COLORS;
export const COLOR_NAMES = Object.keys(COLORS) as ColorName[];
const PALETTE = COLOR_NAMES.map((c) => COLORS[c]);

export const SHAPES = ['circle', 'square', 'triangle'] as const;
export const SIZES = { small: 0.25, large: 0.55 } as const;
export const SIZE_NAMES = ['small', 'large'] as const;
export const POSITIONS = {
  center: [0.5, 0.5],
  left: [0.25, 0.5],
  right: [0.75, 0.5],
  top: [0.5, 0.25],
  bottom: [0.5, 0.75],
} as const;
export const POSITION_NAMES = ['center', 'left', 'right', 'top', 'bottom'] as const;

/** One image of the world, as indices into COLOR_NAMES / SHAPES / SIZE_NAMES / POSITION_NAMES. */
export interface WorldImage {
  bg: number;
  fg: number;
  shape: number;
  size: number;
  pos: number;
}
export const ATTRIBUTES = ['bg', 'fg', 'shape', 'size', 'pos'] as const;
export type Attribute = (typeof ATTRIBUTES)[number];
/** Which attributes a caption states (the others are random in the training images). */
export type Stated = Record<Attribute, boolean>;

export interface CaptionedImage {
  caption: string;
  stated: Stated;
  image: WorldImage;
}

const pick = (rng: Rng, n: number) => Math.floor(rng.uniform() * n);

/** A uniformly drawn world image (foreground and background colours differ). */
export function randomWorldImage(rng: Rng): WorldImage {
  const bg = pick(rng, 8);
  let fg = pick(rng, 7);
  if (fg >= bg) fg += 1;
  return { bg, fg, shape: pick(rng, 3), size: pick(rng, 2), pos: pick(rng, 5) };
}

/**
 * A caption for `image` in one of the world's forms (same grammar and proportions as world.py):
 * `a [small|large] <color> <shape> [at the <position>] on a <color> background` (60%),
 * `[size] <color> <shape> [at the <position>]` (12%), `a [size] <shape> [at the <position>] that is
 * <color>, <color> background` (14%), `a [size] <color> <shape> [at the <position>]` (14%).
 * Size and position are each stated with probability 1/2.
 */
export function captionFor(image: WorldImage, rng: Rng): CaptionedImage {
  const color = (i: number) => COLOR_NAMES[i]!;
  const article = (word: string) => (/^[aeiou]/.test(word) && rng.uniform() < 0.5 ? 'an' : 'a');
  const form = rng.uniform();
  const useSize = rng.uniform() < 0.5;
  const usePos = rng.uniform() < 0.5;
  const size = useSize ? `${SIZE_NAMES[image.size]} ` : '';
  const at = usePos ? ` at the ${POSITION_NAMES[image.pos]}` : '';
  const shape = SHAPES[image.shape];
  const fg = color(image.fg);
  const bg = color(image.bg);
  let caption: string;
  let statesBg = true;
  if (form < 0.6) {
    const first = useSize ? SIZE_NAMES[image.size] : fg;
    caption = `${article(first)} ${size}${fg} ${shape}${at} on ${article(bg)} ${bg} background`;
  } else if (form < 0.72) {
    caption = `${size}${fg} ${shape}${at}`;
    statesBg = false;
  } else if (form < 0.86) {
    caption = `a ${size}${shape}${at} that is ${fg}, ${bg} background`;
  } else {
    caption = `a ${size}${fg} ${shape}${at}`;
    statesBg = false;
  }
  return { caption, stated: { bg: statesBg, fg: true, shape: true, size: useSize, pos: usePos }, image };
}

/** `count` (caption, image) pairs drawn from the whole world with a fixed seed. */
export function worldCaptions(count: number, seed: number): CaptionedImage[] {
  const rng = createRng(seed);
  return Array.from({ length: count }, () => captionFor(randomWorldImage(rng), rng));
}

/** Renders a world image (2x2 supersampled edges, as the training set). RGB, row-major. */
export function renderWorldImage(image: WorldImage, res = 256): Uint8Array {
  const ss = 2;
  const n = res * ss;
  const [cx, cy] = POSITIONS[POSITION_NAMES[image.pos]!];
  const s = SIZES[SIZE_NAMES[image.size]!];
  const shape = SHAPES[image.shape];
  const h = (s * Math.sqrt(3)) / 2;
  const inside = (x: number, y: number): boolean => {
    if (shape === 'circle') return (x - cx) ** 2 + (y - cy) ** 2 <= (s / 2) ** 2;
    if (shape === 'square') return Math.abs(x - cx) <= s / 2 && Math.abs(y - cy) <= s / 2;
    const t = (y - (cy - h / 2)) / h; // 0 at the apex, 1 at the base
    return t >= 0 && t <= 1 && Math.abs(x - cx) <= (t * s) / 2;
  };
  const bg = PALETTE[image.bg]!;
  const fg = PALETTE[image.fg]!;
  const out = new Uint8Array(res * res * 3);
  for (let py = 0; py < res; py++) {
    for (let px = 0; px < res; px++) {
      let cover = 0;
      for (let sy = 0; sy < ss; sy++) {
        for (let sx = 0; sx < ss; sx++) {
          if (inside((px * ss + sx + 0.5) / n, (py * ss + sy + 0.5) / n)) cover++;
        }
      }
      const m = cover / (ss * ss);
      for (let c = 0; c < 3; c++) out[(py * res + px) * 3 + c] = Math.round(bg[c]! * (1 - m) + fg[c]! * m);
    }
  }
  return out;
}

function nearestColor(r: number, g: number, b: number): number {
  let best = 0;
  let bestD = Infinity;
  PALETTE.forEach(([pr, pg, pb], i) => {
    const d = (r - pr) ** 2 + (g - pg) ** 2 + (b - pb) ** 2;
    if (d < bestD) {
      bestD = d;
      best = i;
    }
  });
  return best;
}

/** What the scorer sees in an image; foreground fields are null when nothing but background is there. */
export interface ScoredImage {
  bg: number;
  fg: number | null;
  /** Index into SHAPES, or -1 when the fill ratio fits no shape. */
  shape: number | null;
  size: number | null;
  pos: number | null;
}

/** Scores an RGB image (row-major, 3 bytes per pixel) by pixels alone. */
export function scoreImage(rgb: Uint8Array, width: number, height: number): ScoredImage {
  const B = 8;
  const border: [number[], number[], number[]] = [[], [], []];
  const take = (x: number, y: number) => {
    for (let c = 0; c < 3; c++) border[c]!.push(rgb[(y * width + x) * 3 + c]!);
  };
  // Top and bottom bands, then left and right bands (corners twice, as world.py does).
  for (let y = 0; y < B; y++) for (let x = 0; x < width; x++) take(x, y);
  for (let y = height - B; y < height; y++) for (let x = 0; x < width; x++) take(x, y);
  for (let y = 0; y < height; y++) for (let x = 0; x < B; x++) take(x, y);
  for (let y = 0; y < height; y++) for (let x = width - B; x < width; x++) take(x, y);
  const bg = nearestColor(median(border[0]), median(border[1]), median(border[2]));

  const notBg = new Uint8Array(width * height);
  for (let i = 0; i < width * height; i++) {
    notBg[i] = nearestColor(rgb[i * 3]!, rgb[i * 3 + 1]!, rgb[i * 3 + 2]!) !== bg ? 1 : 0;
  }
  const region = largestRegion(notBg, width, height);
  if (region.length === 0) return { bg, fg: null, shape: null, size: null, pos: null };

  const channels: [number[], number[], number[]] = [[], [], []];
  let minX = width, maxX = 0, minY = height, maxY = 0, sumX = 0, sumY = 0;
  for (const i of region) {
    const x = i % width;
    const y = (i - x) / width;
    for (let c = 0; c < 3; c++) channels[c]!.push(rgb[i * 3 + c]!);
    minX = Math.min(minX, x); maxX = Math.max(maxX, x);
    minY = Math.min(minY, y); maxY = Math.max(maxY, y);
    sumX += x; sumY += y;
  }
  const fg = nearestColor(median(channels[0]), median(channels[1]), median(channels[2]));
  const w = maxX - minX + 1;
  const h = maxY - minY + 1;
  const fill = region.length / (w * h);
  const shape = fill >= 0.7 && fill <= 0.86 ? 0 : fill >= 0.9 ? 1 : fill >= 0.4 && fill <= 0.6 ? 2 : -1;
  const size = Math.max(w, h) / width < 0.4 ? 0 : 1;
  const cx = sumX / region.length / width - 0.5;
  const cy = sumY / region.length / height - 0.5;
  let pos: number;
  if (Math.abs(cx) < 0.125 && Math.abs(cy) < 0.125) pos = 0;
  else if (Math.abs(cx) >= Math.abs(cy)) pos = cx < 0 ? 1 : 2;
  else pos = cy < 0 ? 3 : 4;
  return { bg, fg, shape, size, pos };
}

/** Pixel indices of the largest 4-connected region of `mask` (first found wins a tie). */
function largestRegion(mask: Uint8Array, width: number, height: number): number[] {
  const seen = new Uint8Array(mask.length);
  let best: number[] = [];
  const stack: number[] = [];
  for (let start = 0; start < mask.length; start++) {
    if (!mask[start] || seen[start]) continue;
    const region: number[] = [];
    seen[start] = 1;
    stack.push(start);
    while (stack.length) {
      const i = stack.pop()!;
      region.push(i);
      const x = i % width;
      const neighbours = [x > 0 ? i - 1 : -1, x < width - 1 ? i + 1 : -1, i - width, i + width];
      for (const j of neighbours) {
        if (j >= 0 && j < mask.length && mask[j] && !seen[j]) {
          seen[j] = 1;
          stack.push(j);
        }
      }
    }
    if (region.length > best.length) best = region;
  }
  return best;
}

/** Per-attribute hits and totals; an attribute counts only where the caption states it. */
export interface Tally {
  hits: Record<Attribute, number>;
  totals: Record<Attribute, number>;
}

export function emptyTally(): Tally {
  const zero = () => ({ bg: 0, fg: 0, shape: 0, size: 0, pos: 0 });
  return { hits: zero(), totals: zero() };
}

/** Adds one scored image to `tally`; returns the stated attributes it got wrong. */
export function tallyImage(tally: Tally, item: CaptionedImage, scored: ScoredImage): Attribute[] {
  const wrong: Attribute[] = [];
  for (const a of ATTRIBUTES) {
    if (!item.stated[a]) continue;
    tally.totals[a]++;
    if (scored[a] === item.image[a]) tally.hits[a]++;
    else wrong.push(a);
  }
  return wrong;
}

export function accuracy(tally: Tally): Record<Attribute, number> {
  const out = { bg: 0, fg: 0, shape: 0, size: 0, pos: 0 };
  for (const a of ATTRIBUTES) out[a] = tally.totals[a] ? tally.hits[a] / tally.totals[a] : NaN;
  return out;
}

/** The acceptance bar of kiln-tiny (issue 3): colours and shape 90%, position 80%. */
export const ACCURACY_BAR: Partial<Record<Attribute, number>> = { bg: 0.9, fg: 0.9, shape: 0.9, pos: 0.8 };

/** Human-readable description of a scored image, for failure messages. */
export function describe(s: ScoredImage | WorldImage): string {
  const name = <T>(list: readonly T[], i: number | null) => (i === null ? '-' : i < 0 ? '?' : String(list[i]));
  return `${name(SIZE_NAMES, s.size)} ${name(COLOR_NAMES, s.fg)} ${name(SHAPES, s.shape)} at ${name(POSITION_NAMES, s.pos)} on ${name(COLOR_NAMES, s.bg)}`;
}
