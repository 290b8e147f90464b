/** COCO-WholeBody → OpenPose-18: neck insertion, reordering, visibility. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openPoseBody, toOpenPoseOrder, type RawKeypoint } from '../../src/engine/pose/index.js';

/** 133 keypoints where keypoint i sits at (i, 1000 + i) with score `score(i)`. */
function wholebody(score: (i: number) => number = () => 0.9): RawKeypoint[] {
  return Array.from({ length: 133 }, (_, i) => ({ x: i, y: 1000 + i, score: score(i) }));
}

test('neck is the shoulders’ mean, inserted at 17; OpenPose order from the mmpose indices', () => {
  const op = toOpenPoseOrder(wholebody());
  assert.equal(op.length, 134);
  // openpose[i] = mm[j] for these pairs; 0, 5, 11 keep their mmpose index (nose, L-shoulder… see below).
  const expected = [0, 17, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3];
  // Index 17 of the 134 is the neck (mean of 5 and 6), everything else is mm index (with +1 after 17).
  op.slice(0, 18).forEach((p, i) => {
    const mm = expected[i]!;
    if (mm === 17) assert.deepEqual(p, { x: 5.5, y: 1005.5, score: 1 }, 'neck');
    else assert.deepEqual([p.x, p.y], [mm, 1000 + mm], `openpose ${i} ← mmpose ${mm}`);
  });
  // Feet, face and hands follow, shifted by one for the inserted neck.
  assert.deepEqual([op[18]!.x, op[133]!.x], [17, 132]);
});

test('neck score: 1 only when both shoulders score > 0.3', () => {
  for (const [l, r, want] of [
    [0.9, 0.9, 1],
    [0.31, 0.9, 1],
    [0.3, 0.9, 0],
    [0.9, 0.1, 0],
    [0.2, 0.2, 0],
  ] as const) {
    const op = toOpenPoseOrder(wholebody((i) => (i === 5 ? l : i === 6 ? r : 0.9)));
    assert.equal(op[1]!.score, want, `shoulders ${l}, ${r}`);
    // A low shoulder still moves the neck: position is always the mean.
    assert.deepEqual([op[1]!.x, op[1]!.y], [5.5, 1005.5]);
  }
});

test('openPoseBody: 18 points normalised by the picture, null when score <= 0.3', () => {
  const kps = wholebody((i) => (i === 9 ? 0.3 : i === 0 ? 0.31 : i === 6 ? 0.05 : 0.9));
  const body = openPoseBody(kps, 200, 2000);
  assert.equal(body.length, 18);
  assert.deepEqual(body[0], { x: 0 / 200, y: 1000 / 2000, score: 0.31 });
  assert.equal(body[7], null, 'L-wrist (mm 9) at exactly 0.3 is hidden');
  assert.equal(body[2], null, 'R-shoulder (mm 6) is hidden');
  assert.equal(body[1], null, 'neck hidden when a shoulder is');
  assert.deepEqual(body[5], { x: 5 / 200, y: 1005 / 2000, score: 0.9 });
  // COCO-17 alone is enough for the body.
  assert.equal(openPoseBody(kps.slice(0, 17), 200, 2000).length, 18);
  assert.throws(() => toOpenPoseOrder(kps.slice(0, 10)), /17/);
});
