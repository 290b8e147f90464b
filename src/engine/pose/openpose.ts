/**
 * COCO-WholeBody (133 keypoints, mmpose order) → the OpenPose-18 body that ControlNet-OpenPose
 * was trained on, as DWPose's `wholebody.py` and `__init__.py` do it:
 *
 *  1. insert a neck at index 17: the mean of the shoulders (5, 6), score 1 if both shoulder scores
 *     are > 0.3, else 0;
 *  2. `openpose[1,2,3,4,6,7,8,9,10,12,13,14,15,16,17] = mm[17,6,8,10,7,9,12,14,16,13,15,2,1,4,3]`
 *     (a simultaneous assignment: every source is read before any target is written);
 *  3. keep body indices 0–17; a point is drawn only when its score is > 0.3.
 *
 * OpenPose-18 order: 0 nose, 1 neck, 2 R-shoulder, 3 R-elbow, 4 R-wrist, 5 L-shoulder, 6 L-elbow,
 * 7 L-wrist, 8 R-hip, 9 R-knee, 10 R-ankle, 11 L-hip, 12 L-knee, 13 L-ankle, 14 R-eye, 15 L-eye,
 * 16 R-ear, 17 L-ear.
 */
import type { RawKeypoint } from './simcc.js';

export const OPENPOSE_BODY_POINTS = 18;
export const VISIBILITY_THRESHOLD = 0.3;
const SHOULDER_L = 5;
const SHOULDER_R = 6;
const NECK = 17;
const OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17] as const;
const MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3] as const;

/** One body keypoint, normalised to the picture: x / width and y / height, in [0, 1] when inside. */
export interface PoseKeypoint {
  x: number;
  y: number;
  score: number;
}

/**
 * One person: 18 entries in OpenPose order, `null` for a point that is not visible
 * (score ≤ 0.3). Coordinates are normalised to the picture the pose was estimated on.
 */
export type Person = ReadonlyArray<PoseKeypoint | null>;

/**
 * Steps 1–2 on raw keypoints (picture pixels): returns 134 points (133 + neck) re-ordered so that
 * indices 0–17 are the OpenPose body; feet, face and hands keep their places after it
 * (18–23 feet, 24–91 face, 92–112 and 113–133 hands).
 */
export function toOpenPoseOrder(keypoints: ReadonlyArray<RawKeypoint>): RawKeypoint[] {
  if (keypoints.length < 17) throw new RangeError(`need the 17 COCO body keypoints, got ${keypoints.length}`);
  const l = keypoints[SHOULDER_L]!;
  const r = keypoints[SHOULDER_R]!;
  const neck: RawKeypoint = {
    x: (l.x + r.x) / 2,
    y: (l.y + r.y) / 2,
    score: l.score > VISIBILITY_THRESHOLD && r.score > VISIBILITY_THRESHOLD ? 1 : 0,
  };
  const withNeck = [...keypoints.slice(0, NECK), neck, ...keypoints.slice(NECK)].map((p) => ({ ...p }));
  const source = withNeck.map((p) => ({ ...p }));
  OPENPOSE_IDX.forEach((to, i) => {
    withNeck[to] = source[MMPOSE_IDX[i]!]!;
  });
  return withNeck;
}

/**
 * The OpenPose-18 body of one person from its COCO-WholeBody (or COCO-17) keypoints in picture
 * pixels, normalised by the picture size; invisible points are null.
 */
export function openPoseBody(keypoints: ReadonlyArray<RawKeypoint>, width: number, height: number): Person {
  return toOpenPoseOrder(keypoints)
    .slice(0, OPENPOSE_BODY_POINTS)
    .map((p) => (p.score > VISIBILITY_THRESHOLD ? { x: p.x / width, y: p.y / height, score: p.score } : null));
}
