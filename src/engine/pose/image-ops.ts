/**
 * Pixel operations the pose pipeline needs, with OpenCV's semantics (the DWPose reference and
 * controlnet_aux run on cv2): bilinear resize (`cv2.resize`, INTER_LINEAR) and an axis-aligned
 * affine warp (`cv2.warpAffine`, INTER_LINEAR, constant border 0).
 *
 * Both are synchronous and work on 8-bit RGB. The warp reproduces OpenCV's arithmetic (checked
 * byte for byte against cv2 4.6); the resize samples the same source pixels with the same weights
 * but in floating point, where OpenCV rounds in 11-bit fixed point, so a value can differ by one level.
 */
import type { RgbImage } from '../vae.js';
import { roundHalfEven } from '../schedulers/common.js';

function clampByte(v: number): number {
  return v <= 0 ? 0 : v >= 255 ? 255 : Math.round(v);
}

/**
 * `cv2.resize(img, (width, height), interpolation=INTER_LINEAR)`: half-pixel centres
 * (`src = (dst + 0.5)·scale − 0.5`), neighbours clamped to the border, no antialiasing.
 */
export function resizeBilinear(image: RgbImage, width: number, height: number): RgbImage {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new RangeError(`cannot resize to ${width}x${height}`);
  }
  const { width: sw, height: sh, pixels: src } = image;
  if (sw === width && sh === height) return { width, height, pixels: new Uint8Array(src) };
  const taps = (dst: number, srcSize: number): { i0: Int32Array; i1: Int32Array; f: Float32Array } => {
    const scale = srcSize / dst;
    const i0 = new Int32Array(dst);
    const i1 = new Int32Array(dst);
    const f = new Float32Array(dst);
    for (let d = 0; d < dst; d++) {
      let s = (d + 0.5) * scale - 0.5;
      let i = Math.floor(s);
      s -= i;
      if (i < 0) {
        i = 0;
        s = 0;
      }
      if (i >= srcSize - 1) {
        i = srcSize - 1;
        s = 0;
      }
      i0[d] = i;
      i1[d] = Math.min(i + 1, srcSize - 1);
      f[d] = s;
    }
    return { i0, i1, f };
  };
  const xs = taps(width, sw);
  const ys = taps(height, sh);
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const r0 = ys.i0[y]! * sw * 3;
    const r1 = ys.i1[y]! * sw * 3;
    const fy = ys.f[y]!;
    for (let x = 0; x < width; x++) {
      const c0 = xs.i0[x]! * 3;
      const c1 = xs.i1[x]! * 3;
      const fx = xs.f[x]!;
      const o = (y * width + x) * 3;
      for (let c = 0; c < 3; c++) {
        const top = src[r0 + c0 + c]! * (1 - fx) + src[r0 + c1 + c]! * fx;
        const bottom = src[r1 + c0 + c]! * (1 - fx) + src[r1 + c1 + c]! * fx;
        out[o + c] = clampByte(top * (1 - fy) + bottom * fy);
      }
    }
  }
  return { width, height, pixels: out };
}

/**
 * An axis-aligned affine map from output pixel (u, v) to source position:
 * `x = u·scaleX + offsetX`, `y = v·scaleY + offsetY` (no rotation: DWPose warps with rotation 0).
 */
export interface AxisAffine {
  scaleX: number;
  offsetX: number;
  scaleY: number;
  offsetY: number;
}

/** OpenCV's warp grid: source positions are quantised to 1/32 pixel (INTER_BITS = 5). */
const INTER_BITS = 5;
const INTER_TAB_SIZE = 1 << INTER_BITS;
const AB_BITS = 10;
const AB_SCALE = 1 << AB_BITS;
/** Bilinear weights are 15-bit fixed point (INTER_REMAP_COEF_BITS). */
const REMAP_SHIFT = 15;

/**
 * `cv2.warpAffine(img, M, (width, height), flags=INTER_LINEAR)` for an axis-aligned M, given as
 * its inverse (output → source), with OpenCV's arithmetic: each output pixel's source position
 * is computed in 1/1024 fixed point and quantised to 1/32 pixel, the bilinear weights are those of
 * that grid in 15-bit fixed point, taps outside the source read 0 (BORDER_CONSTANT).
 */
export function warpAxisAffine(image: RgbImage, inverse: AxisAffine, width: number, height: number): RgbImage {
  const { width: sw, height: sh, pixels: src } = image;
  const out = new Uint8Array(width * height * 3);
  const at = (x: number, y: number, c: number): number => (x < 0 || y < 0 || x >= sw || y >= sh ? 0 : src[(y * sw + x) * 3 + c]!);
  const roundDelta = AB_SCALE / INTER_TAB_SIZE / 2;
  const x0 = roundHalfEven(inverse.offsetX * AB_SCALE) + roundDelta;
  const xs = new Int32Array(width);
  const fxs = new Int32Array(width);
  for (let u = 0; u < width; u++) {
    const X = Math.floor((x0 + roundHalfEven(inverse.scaleX * u * AB_SCALE)) / (1 << (AB_BITS - INTER_BITS)));
    xs[u] = Math.floor(X / INTER_TAB_SIZE);
    fxs[u] = X & (INTER_TAB_SIZE - 1);
  }
  for (let v = 0; v < height; v++) {
    const Y = Math.floor((roundHalfEven((inverse.scaleY * v + inverse.offsetY) * AB_SCALE) + roundDelta) / (1 << (AB_BITS - INTER_BITS)));
    const sy = Math.floor(Y / INTER_TAB_SIZE);
    const fy = Y & (INTER_TAB_SIZE - 1);
    for (let u = 0; u < width; u++) {
      const sx = xs[u]!;
      if (sx < -1 || sy < -1 || sx >= sw || sy >= sh) continue; // all four taps outside: the border value 0
      const fx = fxs[u]!;
      // (1 − t)(1 − s)·32768 with t, s in 1/32 steps: exact integers.
      const w00 = (INTER_TAB_SIZE - fy) * (INTER_TAB_SIZE - fx) * 32;
      const w01 = (INTER_TAB_SIZE - fy) * fx * 32;
      const w10 = fy * (INTER_TAB_SIZE - fx) * 32;
      const w11 = fy * fx * 32;
      const o = (v * width + u) * 3;
      for (let c = 0; c < 3; c++) {
        const sum = at(sx, sy, c) * w00 + at(sx + 1, sy, c) * w01 + at(sx, sy + 1, c) * w10 + at(sx + 1, sy + 1, c) * w11;
        out[o + c] = Math.min(255, (sum + (1 << (REMAP_SHIFT - 1))) >> REMAP_SHIFT);
      }
    }
  }
  return { width, height, pixels: out };
}
