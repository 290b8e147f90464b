/** The skeleton picture: pixel values, the cv2 golden, the detect-resolution canvas. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { COLORS, LIMBS, detectCanvasSize, drawBodyPose, drawSkeleton, ellipse2Poly, limbColor, resizeBilinear, type Person } from '../../src/engine/pose/index.js';

const pixel = (img: { width: number; pixels: Uint8Array }, x: number, y: number) => [...img.pixels.subarray((y * img.width + x) * 3, (y * img.width + x) * 3 + 3)];

/** A standing figure (normalised), all 18 points. */
const FIGURE: Array<[number, number]> = [
  [0.5, 0.15], [0.5, 0.25], [0.4, 0.25], [0.36, 0.38], [0.33, 0.5], [0.6, 0.25], [0.64, 0.38], [0.67, 0.5], [0.44, 0.52],
  [0.43, 0.7], [0.42, 0.88], [0.56, 0.52], [0.57, 0.7], [0.58, 0.88], [0.48, 0.13], [0.52, 0.13], [0.46, 0.14], [0.54, 0.14],
];
const person = (pts: Array<[number, number] | null>): Person => pts.map((p) => (p ? { x: p[0], y: p[1], score: 1 } : null));

test('limb colour int(0.6·c) at a limb midpoint, full colour at a joint centre, black far away', () => {
  const img = drawSkeleton([person(FIGURE)], 512, 512);
  assert.deepEqual([img.width, img.height], [512, 512]);
  // Limb 7: R-hip (8) → R-knee (9), colour index 7 = [0,255,85] → [0,153,51].
  const [a, b] = LIMBS[7]!;
  const mx = Math.trunc(((FIGURE[a]![0] + FIGURE[b]![0]) / 2) * 512);
  const my = Math.trunc(((FIGURE[a]![1] + FIGURE[b]![1]) / 2) * 512);
  assert.deepEqual(limbColor(7), [0, 153, 51]);
  assert.deepEqual(pixel(img, mx, my), [0, 153, 51]);
  // Joint 4 (R-wrist) centre, radius 4 all round: full colour [170,255,0].
  const jx = Math.trunc(FIGURE[4]![0] * 512);
  const jy = Math.trunc(FIGURE[4]![1] * 512);
  for (const [dx, dy] of [[0, 0], [4, 0], [-4, 0], [0, 4], [0, -4], [2, 3]]) assert.deepEqual(pixel(img, jx + dx!, jy + dy!), [...COLORS[4]!], `joint +${dx},${dy}`);
  assert.deepEqual(pixel(img, jx + 5, jy), [0, 0, 0], 'radius 4 ends there');
  for (const [x, y] of [[5, 5], [500, 500], [100, 300], [400, 100]]) assert.deepEqual(pixel(img, x!, y!), [0, 0, 0], `black at ${x},${y}`);
  // All 18 joints in full colour (drawn after every limb).
  FIGURE.forEach(([x, y], i) => assert.deepEqual(pixel(img, Math.trunc(x * 512), Math.trunc(y * 512)), [...COLORS[i]!], `joint ${i}`));
});

test('limb thickness is the stick width 4 across the limb (a horizontal limb spans 9 rows)', () => {
  const canvas = { width: 200, height: 100, pixels: new Uint8Array(200 * 100 * 3) };
  // Neck (1) → L-shoulder (5), horizontal, limb 1 colour [255,85,0] → [153,51,0].
  const pts: Array<[number, number] | null> = Array(18).fill(null);
  pts[1] = [0.2, 0.5];
  pts[5] = [0.8, 0.5];
  drawBodyPose(canvas, [person(pts)], { jointRadius: 0 });
  const column = Array.from({ length: 100 }, (_, y) => pixel(canvas, 100, y)).map((p) => p.join(','));
  const lit = column.map((c, y) => (c === '153,51,0' ? y : -1)).filter((y) => y >= 0);
  assert.deepEqual(lit, [46, 47, 48, 49, 50, 51, 52, 53, 54]);
});

test('hidden points draw nothing; limbs need both ends', () => {
  const pts: Array<[number, number] | null> = FIGURE.map((p, i) => (i === 3 ? null : p)); // no R-elbow
  const img = drawSkeleton([person(pts)], 512, 512);
  const [ex, ey] = FIGURE[3]!;
  assert.deepEqual(pixel(img, Math.trunc(ex * 512), Math.trunc(ey * 512)), [0, 0, 0]);
  const empty = drawSkeleton([], 64, 64);
  assert.ok(empty.pixels.every((v) => v === 0));
});

test('ellipse2Poly and the whole drawing equal cv2 (4.6) byte for byte', () => {
  const pts = ellipse2Poly({ x: 100, y: 50 }, { width: 30, height: 4 }, 37, 0, 360, 1);
  assert.equal(pts.length, 139);
  assert.deepEqual(pts.slice(0, 4), [{ x: 124, y: 68 }, { x: 123, y: 68 }, { x: 122, y: 68 }, { x: 121, y: 68 }]);
  const flat = Int32Array.from(pts.flatMap((p) => [p.x, p.y]));
  assert.equal(createHash('sha256').update(new Uint8Array(flat.buffer)).digest('hex'), '4de32acf19c2644c8cc9733cc571fa55843222fe18312e16b48c571a2c154e83');
  // Two people on 512×768, one partly off the canvas with hidden points (cv2's draw_bodypose on the same input).
  const second: Array<[number, number] | null> = [
    [0.95, 0.3], [0.97, 0.4], null, [1.05, 0.55], [1.1, 0.6], [0.9, 0.4], [0.85, 0.5], [0.8, 0.62], [0.99, 0.7],
    [1.02, 0.85], [1.0, 1.02], [0.92, 0.7], [0.9, 0.86], [0.9, 1.05], [0.96, 0.28], null, [0.98, 0.29], [0.92, 0.29],
  ];
  const canvas = { width: 512, height: 768, pixels: new Uint8Array(512 * 768 * 3) };
  drawBodyPose(canvas, [person(FIGURE), person(second)]);
  assert.equal(createHash('sha256').update(canvas.pixels).digest('hex'), '1a2987b48d0d63c602afd9466d564776f7814b3ca7c83c644790d5ee2c502cf8');
});

test('drawn at the detect resolution (short side 512, multiples of 64), then resized to the output', () => {
  assert.deepEqual(detectCanvasSize(512, 512), { width: 512, height: 512 });
  assert.deepEqual(detectCanvasSize(1024, 1024), { width: 512, height: 512 });
  assert.deepEqual(detectCanvasSize(768, 512), { width: 768, height: 512 });
  assert.deepEqual(detectCanvasSize(1216, 832), { width: 768, height: 512 }); // 748.3 → 768
  assert.deepEqual(detectCanvasSize(600, 400), { width: 768, height: 512 });
  const big = drawSkeleton([person(FIGURE)], 1024, 1024);
  assert.deepEqual([big.width, big.height], [1024, 1024]);
  // The same picture as at 512, scaled up (so limbs are 8 px wide, as the model saw at 512).
  const small = drawSkeleton([person(FIGURE)], 512, 512);
  assert.deepEqual(big.pixels, resizeBilinear(small, 1024, 1024).pixels);
  assert.throws(() => drawSkeleton([], 0, 10), RangeError);
});
