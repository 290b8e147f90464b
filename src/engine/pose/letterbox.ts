/**
 * YOLOX detector preprocessing (DWPose `onnxdet.py` `preprocess`): scale the picture by
 * r = min(S/h, S/w), paste it at the top-left of an S×S canvas filled with 114, and hand the
 * raw 0–255 values to the network as NCHW float32 (no mean, no std, RGB order kept).
 */
import type { RgbImage } from '../vae.js';
import { resizeBilinear } from './image-ops.js';

/** Grey level of the padding (YOLOX's convention). */
export const LETTERBOX_FILL = 114;

export interface Letterbox {
  /** [1, 3, size, size], raw 0–255. */
  data: Float32Array;
  dims: [1, 3, number, number];
  /** The scale applied to the picture: divide detector coordinates by it to get back to the picture. */
  ratio: number;
  /** Size of the pasted picture on the canvas: `int(w·r)` × `int(h·r)`. */
  resizedWidth: number;
  resizedHeight: number;
}

export function letterbox(image: RgbImage, size: number): Letterbox {
  const { width: w, height: h } = image;
  if (w < 1 || h < 1) throw new RangeError(`cannot letterbox an empty ${w}x${h} picture`);
  const ratio = Math.min(size / h, size / w);
  // Python's int() truncates; at least one pixel so a very thin picture still resizes.
  const rw = Math.max(1, Math.min(size, Math.trunc(w * ratio)));
  const rh = Math.max(1, Math.min(size, Math.trunc(h * ratio)));
  const resized = resizeBilinear(image, rw, rh);
  const plane = size * size;
  const data = new Float32Array(3 * plane).fill(LETTERBOX_FILL);
  for (let y = 0; y < rh; y++) {
    for (let x = 0; x < rw; x++) {
      const s = (y * rw + x) * 3;
      const d = y * size + x;
      data[d] = resized.pixels[s]!;
      data[plane + d] = resized.pixels[s + 1]!;
      data[2 * plane + d] = resized.pixels[s + 2]!;
    }
  }
  return { data, dims: [1, 3, size, size], ratio, resizedWidth: rw, resizedHeight: rh };
}
