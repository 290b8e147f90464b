/**
 * Pose estimation for OpenPose ControlNets: DWPose (YOLOX-L person detector + RTMPose-l SimCC
 * whole-body keypoints) on onnxruntime, and the OpenPose skeleton picture.
 *
 *   const { detector, poseNet } = await loadPoseModels(dir, root);
 *   const people = await estimatePose(detector, poseNet, image);   // [] when nobody is found
 *   const control = drawSkeleton(people, 512, 512);
 *
 * Keypoints come back in OpenPose-18 order, normalised to the picture (x/width, y/height), with
 * `null` for points scoring ≤ 0.3; `drawSkeleton` maps them onto any output size.
 */
import { join } from 'node:path';
import { OnnxModel, type SessionOptions } from '../onnx.js';
import type { RgbImage } from '../vae.js';
import { detectPersons, type Detection } from './detect.js';
import { openPoseBody, type Person } from './openpose.js';
import { estimateKeypoints, type RawKeypoint } from './simcc.js';

export * from './detect.js';
export * from './draw.js';
export * from './image-ops.js';
export * from './letterbox.js';
export * from './openpose.js';
export * from './simcc.js';

/** File names in `yzd-v/DWPose` (and the fixture's pose folder). */
export const DWPOSE_DETECTOR_FILE = 'yolox_l.onnx';
export const DWPOSE_POSE_FILE = 'dw-ll_ucoco_384.onnx';

export interface PoseModels {
  detector: OnnxModel;
  poseNet: OnnxModel;
}

/** Loads `yolox_l.onnx` and `dw-ll_ucoco_384.onnx` from `dir` (labels are relative to `root`). */
export async function loadPoseModels(dir: string, root: string = dir, options: SessionOptions = {}): Promise<PoseModels> {
  const [detector, poseNet] = await Promise.all([
    OnnxModel.load(join(dir, DWPOSE_DETECTOR_FILE), root, options),
    OnnxModel.load(join(dir, DWPOSE_POSE_FILE), root, options),
  ]);
  return { detector, poseNet };
}

/** One detected person with everything the networks gave (picture pixels). */
export interface WholebodyPose {
  box: Detection;
  /** K keypoints (133 COCO-WholeBody for DWPose) in picture pixels with raw SimCC scores. */
  keypoints: RawKeypoint[];
}

/**
 * Detection then keypoints, one pose-net run per person. Unlike the reference, which falls back
 * to the whole picture as the box, a picture without a detected person gives an empty list.
 */
export async function estimateWholebody(detector: OnnxModel, poseNet: OnnxModel, image: RgbImage): Promise<WholebodyPose[]> {
  const boxes = await detectPersons(detector, image);
  const out: WholebodyPose[] = [];
  for (const box of boxes) out.push({ box, keypoints: await estimateKeypoints(poseNet, image, box) });
  return out;
}

/**
 * The OpenPose-18 bodies of the people in `image` (normalised coordinates; null = not visible).
 * Empty when no person is detected: the caller decides how to report that.
 */
export async function estimatePose(detector: OnnxModel, poseNet: OnnxModel, image: RgbImage): Promise<Person[]> {
  const poses = await estimateWholebody(detector, poseNet, image);
  return poses.map((p) => openPoseBody(p.keypoints, image.width, image.height));
}
