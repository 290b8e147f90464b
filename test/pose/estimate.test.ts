/**
 * estimatePose end to end on the DWPose stand-ins (tools/fixtures/pose.ts): detector → crop →
 * pose net → OpenPose-18, checked against positions computed here from the contract's formulas.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { ensurePoseFixture, poseTemplate, POSE_INPUT } from '../../tools/fixtures/variants.js';
import {
  DWPOSE_DETECTOR_FILE,
  DWPOSE_POSE_FILE,
  cropTransform,
  cropToImage,
  detectPersons,
  detectorInputSize,
  drawSkeleton,
  estimatePose,
  estimateWholebody,
  loadPoseModels,
  poseInputSize,
  type PoseModels,
} from '../../src/engine/pose/index.js';
import type { RgbImage } from '../../src/engine/vae.js';

let models: PoseModels;
before(async () => {
  const dir = await ensurePoseFixture();
  models = await loadPoseModels(dir);
  assert.equal(models.detector.label, DWPOSE_DETECTOR_FILE);
  assert.equal(models.poseNet.label, DWPOSE_POSE_FILE);
});
after(() => Promise.all([models?.detector.release(), models?.poseNet.release()]));

/** A black picture with white rectangles [x1, y1, x2, y2) (pixel ranges). */
function picture(width: number, height: number, rects: Array<[number, number, number, number]>): RgbImage {
  const pixels = new Uint8Array(width * height * 3);
  for (const [x1, y1, x2, y2] of rects) {
    for (let y = y1; y < y2; y++) pixels.fill(255, (y * width + x1) * 3, (y * width + x2) * 3);
  }
  return { width, height, pixels };
}

test('sizes come from the graphs’ metadata', () => {
  assert.equal(detectorInputSize(models.detector), 64);
  assert.deepEqual(poseInputSize(models.poseNet), { height: POSE_INPUT.height, width: POSE_INPUT.width });
});

test('a bright figure is found: its box, and keypoints where the template maps through the crop', async () => {
  // 256² → letterboxed to 64 (r = 1/4): the rectangle maps to whole detector pixels.
  const image = picture(256, 256, [[96, 48, 160, 224]]);
  const dets = await detectPersons(models.detector, image);
  assert.equal(dets.length, 1);
  const d = dets[0]!;
  for (const [got, want] of [[d.x1, 96], [d.y1, 48], [d.x2, 160], [d.y2, 224]] as const) assert.ok(Math.abs(got - want) < 0.01, `box ${got} vs ${want}`);
  assert.ok(d.score > 0.85 && d.score <= 0.9, `score ${d.score}`);

  const [pose] = await estimateWholebody(models.detector, models.poseNet, image);
  assert.equal(pose!.keypoints.length, 133);
  const t = cropTransform(d, POSE_INPUT.width, POSE_INPUT.height);
  // Box 64×176 ×1.25 = 80×220, widened to w/h = 0.75: 165×220 around (128, 136).
  assert.ok(Math.abs(t.scaleWidth - 165) < 0.01 && Math.abs(t.scaleHeight - 220) < 0.01);
  const template = poseTemplate();
  pose!.keypoints.forEach((k, i) => {
    const want = cropToImage(t, template[i]!.xBin / 2, template[i]!.yBin / 2);
    assert.ok(Math.abs(k.x - want.x) < 1e-6 && Math.abs(k.y - want.y) < 1e-6, `keypoint ${i}: (${k.x}, ${k.y}) vs (${want.x}, ${want.y})`);
    assert.ok(k.score > 0.3, `keypoint ${i} visible`);
  });

  const people = await estimatePose(models.detector, models.poseNet, image);
  assert.equal(people.length, 1);
  const body = people[0]!;
  assert.equal(body.length, 18);
  assert.ok(body.every((p) => p !== null), 'all 18 visible');
  // Normalised; OpenPose order: R-shoulder (2) is mmpose 6, on the image's left of the neck (1).
  const kp = pose!.keypoints;
  assert.ok(Math.abs(body[2]!.x - kp[6]!.x / 256) < 1e-9);
  assert.ok(Math.abs(body[1]!.x - (kp[5]!.x + kp[6]!.x) / 2 / 256) < 1e-9, 'neck between the shoulders');
  assert.equal(body[1]!.score, 1);
  assert.ok(body[2]!.x < body[1]!.x && body[5]!.x > body[1]!.x);
  assert.ok(body[0]!.y < body[1]!.y && body[1]!.y < body[8]!.y && body[8]!.y < body[10]!.y, 'head above neck above hips above ankles');

  // And it draws: non-black around the skeleton, black in the corners.
  const control = drawSkeleton(people, 512, 512);
  const lit = control.pixels.reduce((n, v) => n + (v ? 1 : 0), 0);
  assert.ok(lit > 2000, `${lit} lit values`);
  assert.deepEqual([...control.pixels.subarray(0, 3)], [0, 0, 0]);
});

test('no person: a black picture, a grey one and a tiny speck give an empty list', async () => {
  assert.deepEqual(await estimatePose(models.detector, models.poseNet, picture(200, 120, [])), []);
  const grey = { width: 64, height: 64, pixels: new Uint8Array(64 * 64 * 3).fill(114) };
  assert.deepEqual(await estimatePose(models.detector, models.poseNet, grey), []);
  assert.deepEqual(await estimatePose(models.detector, models.poseNet, picture(256, 256, [[100, 100, 102, 102]])), []);
});

test('a non-square picture: the box maps back through the letterbox ratio (r = 64/512)', async () => {
  const image = picture(512, 256, [[304, 64, 368, 240]]);
  const dets = await detectPersons(models.detector, image);
  assert.equal(dets.length, 1);
  for (const [got, want] of [[dets[0]!.x1, 304], [dets[0]!.y1, 64], [dets[0]!.x2, 368], [dets[0]!.y2, 240]] as const) assert.ok(Math.abs(got - want) < 0.01, `box ${got} vs ${want}`);
  const people = await estimatePose(models.detector, models.poseNet, image);
  assert.equal(people.length, 1);
  for (const p of people[0]!) {
    assert.ok(p && p.x > 304 / 512 - 0.05 && p.x < 368 / 512 + 0.05 && p.y > 64 / 256 - 0.05 && p.y < 240 / 256 + 0.05, JSON.stringify(p));
  }
});

test('the fixture folder holds the two files under their DWPose names', async () => {
  const dir = await ensurePoseFixture();
  const { readdirSync } = await import('node:fs');
  assert.deepEqual(readdirSync(dir).sort(), [DWPOSE_POSE_FILE, DWPOSE_DETECTOR_FILE].sort());
  assert.ok(join(dir, DWPOSE_DETECTOR_FILE));
});
