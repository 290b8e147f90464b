/**
 * SimCC decode, the crop geometry (box → centre/scale → aspect → affine) and the warp, on
 * synthetic data: no ONNX here.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  boxCenterScale,
  cropToImage,
  cropTransform,
  decodeSimcc,
  fixAspectRatio,
  imageToCrop,
  normalizeCrop,
  warpAxisAffine,
  warpCrop,
} from '../../src/engine/pose/index.js';

const close = (a: number, b: number, tol = 1e-9, what = '') => assert.ok(Math.abs(a - b) <= tol, `${what}: ${a} vs ${b}`);

/** simcc rows [K, n] all `floor`, with a peak of `value` at bin `at[k]`. */
function simcc(at: number[], n: number, value: number[] | number, floor = 0.01): Float32Array {
  const out = new Float32Array(at.length * n).fill(floor);
  at.forEach((b, k) => {
    out[k * n + b] = Array.isArray(value) ? value[k]! : value;
  });
  return out;
}

test('decodeSimcc: argmax / 2 per axis, score = min of the two maxima', () => {
  const wx = 96;
  const wy = 128;
  const x = simcc([10, 57, 95], wx, [0.9, 0.4, 0.8]);
  const y = simcc([3, 100, 127], wy, [0.5, 0.7, 0.2]);
  const kps = decodeSimcc(x, y, 3);
  assert.deepEqual(kps.map((k) => [k.x, k.y]), [[5, 1.5], [28.5, 50], [47.5, 63.5]]);
  assert.deepEqual(kps.map((k) => Math.fround(k.score)), [0.5, 0.4, 0.2].map(Math.fround));
});

test('decodeSimcc: first maximum wins ties; score <= 0 puts the point at -1 (then / 2)', () => {
  const x = new Float32Array(2 * 8);
  x.set([0, 3, 1, 3, 0, 0, 0, 0], 0); // tie at 1 and 3: first
  x.set([-5, -1, -2, -3, -4, -6, -7, -8], 8); // all negative
  const y = new Float32Array(2 * 4);
  y.set([1, 2, 0, 0], 0);
  y.set([0.5, 9, 0, 0], 4);
  const [a, b] = decodeSimcc(x, y, 2);
  assert.deepEqual([a!.x, a!.y, a!.score], [0.5, 0.5, 2]);
  assert.equal(b!.score, -1);
  assert.deepEqual([b!.x, b!.y], [-0.5, -0.5]);
  assert.throws(() => decodeSimcc(new Float32Array(7), new Float32Array(8), 2), /do not divide/);
});

test('box → centre and padded scale; aspect fixed by growing the short side', () => {
  const cs = boxCenterScale({ x1: 100, y1: 50, x2: 180, y2: 250 });
  assert.deepEqual(cs, { centerX: 140, centerY: 150, width: 100, height: 250 });
  // 288×384: w/h = 0.75. A tall box grows in width, a wide box in height.
  assert.deepEqual(fixAspectRatio(100, 250, 0.75), { width: 187.5, height: 250 });
  assert.deepEqual(fixAspectRatio(300, 100, 0.75), { width: 300, height: 400 });
  const t = cropTransform({ x1: 100, y1: 50, x2: 180, y2: 250 }, 288, 384);
  assert.deepEqual(t, { centerX: 140, centerY: 150, scaleWidth: 187.5, scaleHeight: 250, width: 288, height: 384 });
});

test('crop ↔ picture mapping: centre to centre, corners to the scaled box, round trips', () => {
  const t = cropTransform({ x1: 31.5, y1: 12.25, x2: 97, y2: 201 }, 48, 64);
  const c = cropToImage(t, 24, 32);
  close(c.x, t.centerX, 1e-9, 'centre x');
  close(c.y, t.centerY, 1e-9, 'centre y');
  const tl = cropToImage(t, 0, 0);
  close(tl.x, t.centerX - t.scaleWidth / 2, 1e-9, 'left');
  close(tl.y, t.centerY - t.scaleHeight / 2, 1e-9, 'top');
  // One scale for both axes (no distortion): 48 crop px span scaleWidth, 64 span scaleHeight.
  close(t.scaleWidth / 48, t.scaleHeight / 64, 1e-12, 'isotropic');
  for (const [x, y] of [[40, 20], [64.25, 106.5], [0, 0], [500, -3]] as const) {
    const { u, v } = imageToCrop(t, x, y);
    const back = cropToImage(t, u, v);
    close(back.x, x, 1e-9, 'x');
    close(back.y, y, 1e-9, 'y');
  }
  // A SimCC peak at bin b decodes to crop pixel b/2, then to the picture through the same map.
  const kp = decodeSimcc(simcc([30], 96, 1), simcc([100], 128, 1), 1)[0]!;
  const img = cropToImage(t, kp.x, kp.y);
  close(img.x, (15 / 48) * t.scaleWidth + t.centerX - t.scaleWidth / 2, 1e-9, 'decoded x');
  close(img.y, (50 / 64) * t.scaleHeight + t.centerY - t.scaleHeight / 2, 1e-9, 'decoded y');
});

test('warpCrop samples the picture where the mapping says: a marked pixel lands at its crop position', () => {
  const W = 200;
  const H = 160;
  const pixels = new Uint8Array(W * H * 3);
  const mark = { x: 120, y: 70 };
  pixels.set([255, 255, 255], (mark.y * W + mark.x) * 3);
  // Box chosen so the scale is exactly 2 picture px per crop px: scaleWidth 96 for 48, 128 for 64.
  const t = { centerX: 100, centerY: 80, scaleWidth: 96, scaleHeight: 128, width: 48, height: 64 };
  const crop = warpCrop({ width: W, height: H, pixels }, t);
  const { u, v } = imageToCrop(t, mark.x, mark.y);
  assert.deepEqual([u, v], [34, 27]);
  const at = (x: number, y: number) => crop.pixels[(y * 48 + x) * 3]!;
  assert.equal(at(34, 27), 255);
  let lit = 0;
  for (let i = 0; i < crop.pixels.length; i += 3) if (crop.pixels[i]) lit++;
  assert.equal(lit, 1);
  // Outside the picture the crop reads 0 (constant border).
  const off = warpCrop({ width: W, height: H, pixels: new Uint8Array(W * H * 3).fill(200) }, { ...t, centerX: -1000 });
  assert.ok(off.pixels.every((p) => p === 0));
});

test('warpAxisAffine equals cv2.warpAffine(INTER_LINEAR) byte for byte', () => {
  // Golden from cv2 4.6: src[y,x,c] = (7x + 13y + 50c) % 256, 53×37; M = [[1.7,0,-5.3],[0,1.7,-2.1]] (float32), dsize 48×64.
  const src = new Uint8Array(53 * 37 * 3);
  for (let y = 0; y < 37; y++) for (let x = 0; x < 53; x++) for (let c = 0; c < 3; c++) src[(y * 53 + x) * 3 + c] = (x * 7 + y * 13 + c * 50) % 256;
  const f = Math.fround;
  const out = warpAxisAffine({ width: 53, height: 37, pixels: src }, { scaleX: 1 / f(1.7), offsetX: f(5.3) / f(1.7), scaleY: 1 / f(1.7), offsetY: f(2.1) / f(1.7) }, 48, 64);
  assert.equal(createHash('sha256').update(out.pixels).digest('hex'), '895b84dcb18587bea7ad0d3da91cfd4166f6bbe76f376e60e7a2e2e3021e931d');
});

test('normalizeCrop: ImageNet mean/std per RGB channel, NCHW', () => {
  const crop = { width: 2, height: 1, pixels: Uint8Array.from([123.675, 116.28, 103.53, 255, 0, 128].map(Math.round)) };
  const out = normalizeCrop(crop);
  assert.equal(out.length, 6);
  close(out[0]!, (124 - 123.675) / 58.395, 1e-6, 'R of pixel 0');
  close(out[1]!, (255 - 123.675) / 58.395, 1e-6, 'R of pixel 1');
  close(out[3]!, (0 - 116.28) / 57.12, 1e-6, 'G of pixel 1');
  close(out[5]!, (128 - 103.53) / 57.375, 1e-6, 'B of pixel 1');
});
