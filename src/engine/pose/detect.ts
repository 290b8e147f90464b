/**
 * Person detection with DWPose's YOLOX-L (`yolox_l.onnx`), following the reference
 * (`IDEA-Research/DWPose@onnx: annotator/dwpose/onnxdet.py`):
 *
 *  - the output `[1, N, 85]` has one row per grid cell of the strides 8, 16, 32 (row-major within
 *    each stride, strides in that order; N = Σ (S/stride)²), each row `cx, cy, w, h, obj, 80 classes`;
 *  - `xy = (xy + grid)·stride`, `wh = exp(wh)·stride`, `score = obj·cls`;
 *  - boxes to xyxy, divided by the letterbox ratio (back to picture pixels);
 *  - class-wise NMS (IoU 0.45, score > 0.1), then persons (class 0) with score > 0.3.
 */
import type { OnnxModel } from '../onnx.js';
import { ModelLoadError } from '../errors.js';
import type { RgbImage } from '../vae.js';
import { letterbox } from './letterbox.js';

/** A box in pixel coordinates: (x1, y1) top-left, (x2, y2) bottom-right. */
export interface Box {
  x1: number;
  y1: number;
  x2: number;
  y2: number;
}

export interface Detection extends Box {
  score: number;
  classId: number;
}

export const YOLOX_STRIDES = [8, 16, 32] as const;
export const NMS_IOU = 0.45;
export const NMS_SCORE = 0.1;
export const PERSON_SCORE = 0.3;
export const PERSON_CLASS = 0;
/** The reference's input size, used when the graph's input side is symbolic. */
export const DEFAULT_DETECTOR_SIZE = 640;

/** Rows a YOLOX head gives for an S×S input: Σ over strides 8, 16, 32 of (S/stride)². */
export function yoloxRows(size: number): number {
  return YOLOX_STRIDES.reduce((n, s) => n + Math.floor(size / s) ** 2, 0);
}

/**
 * Single-class non-maximum suppression, as the reference (py-faster-rcnn style): boxes are pixel-
 * inclusive (`area = (x2−x1+1)·(y2−y1+1)`), visited by descending score (ties: lower index first),
 * and a box is dropped when its IoU with a kept one is above `iouThreshold`.
 * Returns the indices kept, best first.
 */
export function nms(boxes: ReadonlyArray<Box>, scores: ArrayLike<number>, iouThreshold: number): number[] {
  if (boxes.length !== scores.length) throw new RangeError(`${boxes.length} boxes but ${scores.length} scores`);
  const order = boxes.map((_, i) => i).sort((a, b) => scores[b]! - scores[a]! || a - b);
  const area = (b: Box): number => (b.x2 - b.x1 + 1) * (b.y2 - b.y1 + 1);
  const suppressed = new Uint8Array(boxes.length);
  const keep: number[] = [];
  for (let oi = 0; oi < order.length; oi++) {
    const i = order[oi]!;
    if (suppressed[i]) continue;
    keep.push(i);
    const a = boxes[i]!;
    const areaA = area(a);
    for (let oj = oi + 1; oj < order.length; oj++) {
      const j = order[oj]!;
      if (suppressed[j]) continue;
      const b = boxes[j]!;
      const w = Math.max(0, Math.min(a.x2, b.x2) - Math.max(a.x1, b.x1) + 1);
      const h = Math.max(0, Math.min(a.y2, b.y2) - Math.max(a.y1, b.y1) + 1);
      const inter = w * h;
      if (inter / (areaA + area(b) - inter) > iouThreshold) suppressed[j] = 1;
    }
  }
  return keep;
}

/**
 * Class-aware NMS (the reference's `multiclass_nms`): for each class, the boxes whose score for
 * that class is above `scoreThreshold` go through `nms` on their own, so boxes of different
 * classes never suppress each other. `scores(i, c)` reads the score of box i for class c.
 * Results are grouped by class (ascending), best first within a class.
 */
export function multiclassNms(
  boxes: ReadonlyArray<Box>,
  scores: (box: number, cls: number) => number,
  numClasses: number,
  iouThreshold: number,
  scoreThreshold: number,
  classes: Iterable<number> = Array.from({ length: numClasses }, (_, c) => c),
): Detection[] {
  const out: Detection[] = [];
  for (const c of classes) {
    const idx: number[] = [];
    const s: number[] = [];
    for (let i = 0; i < boxes.length; i++) {
      const v = scores(i, c);
      if (v > scoreThreshold) {
        idx.push(i);
        s.push(v);
      }
    }
    if (idx.length === 0) continue;
    for (const k of nms(idx.map((i) => boxes[i]!), s, iouThreshold)) {
      out.push({ ...boxes[idx[k]!]!, score: s[k]!, classId: c });
    }
  }
  return out;
}

/**
 * Decodes a YOLOX output `[1, N, 5 + C]` for an S×S letterboxed input into persons, in the
 * coordinates of the picture before letterboxing (`ratio` from `letterbox`).
 * Only class 0 goes through NMS: NMS is class-wise, so the other classes cannot change it.
 */
export function decodeYolox(output: ArrayLike<number>, dims: ReadonlyArray<number>, inputSize: number, ratio: number): Detection[] {
  const [batch, rows, width] = dims as [number, number, number];
  if (dims.length !== 3 || batch !== 1 || width < 6) throw new ModelLoadError(`detector output has shape [${dims.join(',')}], expected [1,N,85]`);
  const expected = yoloxRows(inputSize);
  if (rows !== expected) {
    throw new ModelLoadError(`detector output has ${rows} rows; a ${inputSize}x${inputSize} YOLOX input gives ${expected} (strides 8, 16, 32)`);
  }
  if (output.length !== rows * width) throw new RangeError(`detector output has ${output.length} values for [${dims.join(',')}]`);
  const boxes: Box[] = new Array(rows);
  let r = 0;
  for (const stride of YOLOX_STRIDES) {
    const g = Math.floor(inputSize / stride);
    for (let gy = 0; gy < g; gy++) {
      for (let gx = 0; gx < g; gx++, r++) {
        const o = r * width;
        const cx = (output[o]! + gx) * stride;
        const cy = (output[o + 1]! + gy) * stride;
        const w = Math.exp(output[o + 2]!) * stride;
        const h = Math.exp(output[o + 3]!) * stride;
        boxes[r] = { x1: (cx - w / 2) / ratio, y1: (cy - h / 2) / ratio, x2: (cx + w / 2) / ratio, y2: (cy + h / 2) / ratio };
      }
    }
  }
  const score = (i: number, c: number): number => output[i * width + 4]! * output[i * width + 5 + c]!;
  return multiclassNms(boxes, score, width - 5, NMS_IOU, NMS_SCORE, [PERSON_CLASS]).filter((d) => d.score > PERSON_SCORE);
}

/** The square input side of a detector graph (read from its metadata; 640 when symbolic). */
export function detectorInputSize(detector: OnnxModel): number {
  const [name] = detector.inputs.keys();
  if (!name) throw new ModelLoadError(`${detector.label} has no inputs`);
  const shape = detector.input(name).shape;
  const h = shape[2];
  const w = shape[3];
  if (typeof h === 'number' && h > 0 && typeof w === 'number' && w > 0 && h !== w) {
    throw new ModelLoadError(`${detector.label} takes ${w}x${h} pictures; the YOLOX letterbox needs a square input`);
  }
  return typeof h === 'number' && h > 0 ? h : typeof w === 'number' && w > 0 ? w : DEFAULT_DETECTOR_SIZE;
}

/** Runs the detector on a picture: the persons found, in picture pixels, best first. */
export async function detectPersons(detector: OnnxModel, image: RgbImage): Promise<Detection[]> {
  const size = detectorInputSize(detector);
  const input = letterbox(image, size);
  const [inputName] = detector.inputs.keys();
  const [outputName] = detector.outputs.keys();
  if (!outputName) throw new ModelLoadError(`${detector.label} has no outputs`);
  const out = await detector.run({ [inputName!]: { data: input.data, dims: input.dims } }, [outputName]);
  const { data, dims } = out[outputName]!;
  return decodeYolox(data, dims, size, input.ratio);
}
