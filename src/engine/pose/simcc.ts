/**
 * Top-down keypoints with DWPose's RTMPose (`dw-ll_ucoco_384.onnx`, SimCC head), following the
 * reference (`IDEA-Research/DWPose@onnx: annotator/dwpose/onnxpose.py`, from mmpose):
 *
 *  - per person box: centre, size·1.25, widened to the network's aspect w/h = Wp/Hp;
 *  - an affine warp of that region onto Wp×Hp (rotation 0, bilinear, border 0);
 *  - ImageNet normalisation `(px − mean)/std` on RGB, NCHW;
 *  - decode: per keypoint, argmax of `simcc_x [K, 2·Wp]` and `simcc_y [K, 2·Hp]`,
 *    score = min(max x, max y), location −1 when score ≤ 0, then bins / 2 (split ratio 2);
 *  - back to the picture: `kp/(Wp, Hp)·scale + centre − scale/2`.
 */
import type { OnnxModel } from '../onnx.js';
import { ModelLoadError } from '../errors.js';
import type { RgbImage } from '../vae.js';
import type { Box } from './detect.js';
import { warpAxisAffine } from './image-ops.js';

export const BOX_PADDING = 1.25;
export const SIMCC_SPLIT_RATIO = 2;
export const POSE_MEAN = [123.675, 116.28, 103.53] as const;
export const POSE_STD = [58.395, 57.12, 57.375] as const;
/** The reference's input (H=384, W=288), used when the graph's sides are symbolic. */
export const DEFAULT_POSE_INPUT = { height: 384, width: 288 } as const;

export interface RawKeypoint {
  x: number;
  y: number;
  score: number;
}

/**
 * The crop a person box maps to: the region of the picture centred on `center` of size `scale`
 * (width, height; already padded and widened to the network's aspect) onto `width`×`height`.
 */
export interface CropTransform {
  centerX: number;
  centerY: number;
  scaleWidth: number;
  scaleHeight: number;
  /** Network input size (Wp, Hp). */
  width: number;
  height: number;
}

/** mmpose `bbox_xyxy2cs`: centre and padded size of a box. */
export function boxCenterScale(box: Box, padding = BOX_PADDING): { centerX: number; centerY: number; width: number; height: number } {
  return {
    centerX: (box.x1 + box.x2) * 0.5,
    centerY: (box.y1 + box.y2) * 0.5,
    width: (box.x2 - box.x1) * padding,
    height: (box.y2 - box.y1) * padding,
  };
}

/** mmpose `_fix_aspect_ratio`: grows the short side so that width/height = aspect. */
export function fixAspectRatio(width: number, height: number, aspect: number): { width: number; height: number } {
  return width > height * aspect ? { width, height: width / aspect } : { width: height * aspect, height };
}

/** The crop of a person box for a network input of width × height. */
export function cropTransform(box: Box, width: number, height: number): CropTransform {
  const cs = boxCenterScale(box);
  const scale = fixAspectRatio(cs.width, cs.height, width / height);
  return { centerX: cs.centerX, centerY: cs.centerY, scaleWidth: scale.width, scaleHeight: scale.height, width, height };
}

/**
 * Picture coordinates of a crop pixel position: `p/(Wp, Hp)·scale + centre − scale/2` (the
 * inverse of mmpose's warp matrix with rotation 0; the same formula maps decoded keypoints back).
 */
export function cropToImage(t: CropTransform, u: number, v: number): { x: number; y: number } {
  return {
    x: (u / t.width) * t.scaleWidth + t.centerX - t.scaleWidth / 2,
    y: (v / t.height) * t.scaleHeight + t.centerY - t.scaleHeight / 2,
  };
}

/** Crop pixel position of a picture point (the forward warp). */
export function imageToCrop(t: CropTransform, x: number, y: number): { u: number; v: number } {
  return {
    u: ((x - t.centerX + t.scaleWidth / 2) / t.scaleWidth) * t.width,
    v: ((y - t.centerY + t.scaleHeight / 2) / t.scaleHeight) * t.height,
  };
}

/** Warps the crop out of the picture (8-bit, as cv2.warpAffine returns). */
export function warpCrop(image: RgbImage, t: CropTransform): RgbImage {
  const origin = cropToImage(t, 0, 0);
  return warpAxisAffine(
    image,
    { scaleX: t.scaleWidth / t.width, offsetX: origin.x, scaleY: t.scaleHeight / t.height, offsetY: origin.y },
    t.width,
    t.height,
  );
}

/** The pose network's input for a crop: `(px − mean)/std` per RGB channel, NCHW [1,3,Hp,Wp]. */
export function normalizeCrop(crop: RgbImage): Float32Array {
  const plane = crop.width * crop.height;
  const out = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) out[c * plane + i] = (crop.pixels[i * 3 + c]! - POSE_MEAN[c]!) / POSE_STD[c]!;
  }
  return out;
}

/**
 * SimCC decode for one person: `simccX` is [K, Wx] and `simccY` [K, Wy] (row-major). Returns K
 * keypoints in crop pixels (`argmax / splitRatio`), score = min of the two maxima; a keypoint
 * whose score is ≤ 0 gets location −1 before the division, as in the reference.
 */
export function decodeSimcc(
  simccX: ArrayLike<number>,
  simccY: ArrayLike<number>,
  keypoints: number,
  splitRatio = SIMCC_SPLIT_RATIO,
): RawKeypoint[] {
  const wx = simccX.length / keypoints;
  const wy = simccY.length / keypoints;
  if (!Number.isInteger(wx) || !Number.isInteger(wy) || wx < 1 || wy < 1) {
    throw new RangeError(`simcc sizes ${simccX.length}, ${simccY.length} do not divide into ${keypoints} keypoints`);
  }
  const argmax = (data: ArrayLike<number>, start: number, n: number): [number, number] => {
    let best = 0;
    let value = data[start]!;
    for (let i = 1; i < n; i++) {
      const v = data[start + i]!;
      if (v > value) {
        value = v;
        best = i;
      }
    }
    return [best, value];
  };
  const out: RawKeypoint[] = [];
  for (let k = 0; k < keypoints; k++) {
    const [xi, xv] = argmax(simccX, k * wx, wx);
    const [yi, yv] = argmax(simccY, k * wy, wy);
    const score = Math.min(xv, yv);
    const visible = score > 0;
    out.push({ x: (visible ? xi : -1) / splitRatio, y: (visible ? yi : -1) / splitRatio, score });
  }
  return out;
}

/** The pose network's input side (Hp, Wp), from its metadata (384×288 when symbolic). */
export function poseInputSize(poseNet: OnnxModel): { height: number; width: number } {
  const [name] = poseNet.inputs.keys();
  if (!name) throw new ModelLoadError(`${poseNet.label} has no inputs`);
  const shape = poseNet.input(name).shape;
  const h = shape[2];
  const w = shape[3];
  return {
    height: typeof h === 'number' && h > 0 ? h : DEFAULT_POSE_INPUT.height,
    width: typeof w === 'number' && w > 0 ? w : DEFAULT_POSE_INPUT.width,
  };
}

/** Output names of a SimCC head: `simcc_x`/`simcc_y`, else the first two outputs in order. */
function simccOutputs(poseNet: OnnxModel): [string, string] {
  if (poseNet.hasOutput('simcc_x') && poseNet.hasOutput('simcc_y')) return ['simcc_x', 'simcc_y'];
  const names = [...poseNet.outputs.keys()];
  if (names.length < 2) throw new ModelLoadError(`${poseNet.label} has outputs ${names.join(', ')}; a SimCC pose net has simcc_x and simcc_y`);
  return [names[0]!, names[1]!];
}

/**
 * Runs the pose network on one person box: K keypoints (133 for COCO-WholeBody) in picture
 * pixels, with the raw SimCC scores.
 */
export async function estimateKeypoints(poseNet: OnnxModel, image: RgbImage, box: Box): Promise<RawKeypoint[]> {
  const { height, width } = poseInputSize(poseNet);
  const t = cropTransform(box, width, height);
  const input = normalizeCrop(warpCrop(image, t));
  const [inputName] = poseNet.inputs.keys();
  const [xName, yName] = simccOutputs(poseNet);
  const out = await poseNet.run({ [inputName!]: { data: input, dims: [1, 3, height, width] } }, [xName, yName]);
  const sx = out[xName]!;
  const sy = out[yName]!;
  const k = sx.dims.length === 3 ? sx.dims[1]! : sx.dims[0]!;
  if (sy.data.length % k !== 0 || sx.data.length % k !== 0) {
    throw new ModelLoadError(`${poseNet.label}: simcc outputs [${sx.dims.join(',')}] and [${sy.dims.join(',')}] disagree on the keypoint count`);
  }
  return decodeSimcc(sx.data, sy.data, k).map((p) => ({ ...cropToImage(t, p.x, p.y), score: p.score }));
}
