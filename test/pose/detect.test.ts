/** Letterbox geometry, NMS and YOLOX decoding on hand-built tensors (no ONNX). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LETTERBOX_FILL, decodeYolox, letterbox, multiclassNms, nms, resizeBilinear, yoloxRows, type Box } from '../../src/engine/pose/index.js';

test('letterbox: r = min(S/h, S/w), picture at the top-left, the rest 114, NCHW raw 0–255', () => {
  const w = 100;
  const h = 50;
  const pixels = new Uint8Array(w * h * 3);
  for (let i = 0; i < w * h; i++) pixels.set([200, 100, 50], i * 3);
  const lb = letterbox({ width: w, height: h, pixels }, 64);
  assert.equal(lb.ratio, 0.64);
  assert.deepEqual([lb.resizedWidth, lb.resizedHeight], [64, 32]);
  assert.deepEqual(lb.dims, [1, 3, 64, 64]);
  const at = (c: number, y: number, x: number) => lb.data[c * 64 * 64 + y * 64 + x];
  assert.deepEqual([at(0, 0, 0), at(1, 0, 0), at(2, 0, 0)], [200, 100, 50]);
  assert.deepEqual([at(0, 31, 63), at(1, 31, 63), at(2, 31, 63)], [200, 100, 50]);
  assert.deepEqual([at(0, 32, 0), at(1, 40, 10), at(2, 63, 63)], [LETTERBOX_FILL, LETTERBOX_FILL, LETTERBOX_FILL]);
  // A tall picture pads on the right instead; int() truncation of the resized side.
  const tall = letterbox({ width: 30, height: 70, pixels: new Uint8Array(30 * 70 * 3) }, 64);
  assert.deepEqual([tall.resizedWidth, tall.resizedHeight], [Math.trunc(30 * (64 / 70)), 64]);
  assert.equal(tall.resizedWidth, 27);
  assert.equal(tall.data[0 * 4096 + 10 * 64 + 26], 0);
  assert.equal(tall.data[0 * 4096 + 10 * 64 + 27], LETTERBOX_FILL);
});

test('resizeBilinear: half-pixel centres, clamped edges (cv2 INTER_LINEAR)', () => {
  // 2×1 → 4×1: positions (d+0.5)/2 − 0.5 = −0.25, 0.25, 0.75, 1.25 → clamp, ¾/¼ mixes, clamp.
  const out = resizeBilinear({ width: 2, height: 1, pixels: Uint8Array.from([0, 0, 0, 200, 100, 40]) }, 4, 1);
  assert.deepEqual([...out.pixels].filter((_, i) => i % 3 === 0), [0, 50, 150, 200]);
  // 4×1 → 2×1 (downscale, no antialias): positions 0.5, 2.5 → means of neighbours.
  const down = resizeBilinear({ width: 4, height: 1, pixels: Uint8Array.from([0, 0, 0, 100, 0, 0, 10, 0, 0, 30, 0, 0]) }, 2, 1);
  assert.deepEqual([down.pixels[0], down.pixels[3]], [50, 20]);
});

const box = (x1: number, y1: number, x2: number, y2: number): Box => ({ x1, y1, x2, y2 });

test('nms: keeps the best, drops overlaps above the IoU threshold (pixel-inclusive areas), keeps the rest', () => {
  const boxes = [box(0, 0, 9, 9), box(1, 1, 10, 10), box(20, 20, 29, 29), box(0, 0, 9, 4)];
  // IoU(0,1) = 81/(100+100−81) = 0.68 → dropped; IoU(0,3) = 50/100 = 0.5 → dropped at 0.45, kept at 0.5.
  assert.deepEqual(nms(boxes, [0.9, 0.8, 0.7, 0.6], 0.45), [0, 2]);
  assert.deepEqual(nms(boxes, [0.9, 0.8, 0.7, 0.6], 0.5), [0, 2, 3]);
  // Order by score, not by position; a suppressed box does not suppress others.
  assert.deepEqual(nms(boxes, [0.5, 0.95, 0.7, 0.1], 0.45), [1, 2, 3]);
  assert.deepEqual(nms([], [], 0.45), []);
});

test('multiclassNms: classes never suppress each other; score threshold is strict', () => {
  const boxes = [box(0, 0, 9, 9), box(0, 0, 9, 9), box(1, 1, 10, 10)];
  const table = [
    [0.9, 0.0],
    [0.0, 0.8],
    [0.7, 0.1],
  ];
  const dets = multiclassNms(boxes, (i, c) => table[i]![c]!, 2, 0.45, 0.1);
  // Class 0: boxes 0 and 2 overlap → only 0. Class 1: box 1 (0.8) kept; box 2 at 0.1 is not > 0.1.
  assert.deepEqual(dets.map((d) => [d.classId, d.score]), [[0, 0.9], [1, 0.8]]);
  assert.deepEqual(multiclassNms(boxes, (i, c) => table[i]![c]!, 2, 0.45, 0.1, [1]).map((d) => d.classId), [1]);
});

/** An all-background YOLOX output for an S×S input with one row set. */
function yoloxOutput(size: number, set: Array<{ stride: number; gx: number; gy: number; row: number[] }>): { data: Float32Array; dims: number[] } {
  const rows = yoloxRows(size);
  const data = new Float32Array(rows * 85);
  const offset = (stride: number) => [8, 16, 32].filter((s) => s < stride).reduce((n, s) => n + (size / s) ** 2, 0);
  for (const { stride, gx, gy, row } of set) data.set(row, (offset(stride) + gy * (size / stride) + gx) * 85);
  return { data, dims: [1, rows, 85] };
}

test('decodeYolox: one strong cell → its box, via grid, stride, exp and the letterbox ratio', () => {
  assert.equal(yoloxRows(64), 64 + 16 + 4);
  assert.equal(yoloxRows(640), 8400);
  const person = (score: number) => [score, ...Array.from({ length: 80 }, (_, c) => (c === 0 ? 1 : 0.05))];
  // stride 8, cell (3, 5): centre ((0.5+3)·8, (0.25+5)·8) = (28, 42); size (e^0·8·2, e^ln3·8) = (16, 24).
  const { data, dims } = yoloxOutput(64, [{ stride: 8, gx: 3, gy: 5, row: [0.5, 0.25, Math.log(2), Math.log(3), ...person(0.8)] }]);
  const dets = decodeYolox(data, dims, 64, 0.5);
  assert.equal(dets.length, 1);
  const d = dets[0]!;
  const near = (a: number, b: number) => assert.ok(Math.abs(a - b) < 1e-4, `${a} vs ${b}`);
  near(d.x1, (28 - 8) / 0.5);
  near(d.y1, (42 - 12) / 0.5);
  near(d.x2, (28 + 8) / 0.5);
  near(d.y2, (42 + 12) / 0.5);
  near(d.score, 0.8);
  assert.equal(d.classId, 0);
});

test('decodeYolox: strides and grid order; persons only above 0.3; overlapping boxes merge', () => {
  const row = (obj: number, cls0: number, other = 0) => [0, 0, 0, 0, obj, cls0, ...Array.from({ length: 79 }, () => other)];
  const { data, dims } = yoloxOutput(64, [
    { stride: 32, gx: 1, gy: 0, row: row(1, 0.9) }, // centre (32, 0), 32×32
    { stride: 16, gx: 2, gy: 0, row: [0, 0, Math.log(2), Math.log(2), 1, 0.6, ...Array(79).fill(0)] }, // same box: suppressed
    { stride: 8, gx: 7, gy: 7, row: row(0.5, 0.5) }, // 0.25: below 0.3
    { stride: 8, gx: 1, gy: 1, row: row(1, 0.05, 0.99) }, // a confident non-person
  ]);
  const dets = decodeYolox(data, dims, 64, 1);
  assert.equal(dets.length, 1);
  assert.deepEqual([dets[0]!.x1, dets[0]!.y1, dets[0]!.x2, dets[0]!.y2].map((v) => Math.round(v * 1e4) / 1e4), [16, -16, 48, 16]);
  assert.ok(Math.abs(dets[0]!.score - 0.9) < 1e-6);
  // Nothing bright: nothing found.
  assert.deepEqual(decodeYolox(new Float32Array(84 * 85), [1, 84, 85], 64, 1), []);
  assert.throws(() => decodeYolox(new Float32Array(80 * 85), [1, 80, 85], 64, 1), /84/);
});
