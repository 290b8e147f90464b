/**
 * The OpenPose skeleton picture ControlNet-OpenPose was trained on (controlnet_aux
 * `open_pose/util.py` `draw_bodypose`, identical in DWPose's `util.py`):
 *
 *  - a black RGB canvas;
 *  - 17 limbs, each a filled convex polygon from `cv2.ellipse2Poly(centre, (len/2, 4), angle, 0, 360, 1)`
 *    with centre = int(midpoint), angle = int(deg(atan2(y1−y2, x1−x2))), in colour int(0.6·c);
 *  - then the 18 joints as filled circles of radius 4 in the full colour.
 *
 * The rasterisation is a port of OpenCV's own (`imgproc/src/drawing.cpp`: ellipse2Poly with its
 * sine table and cvRound, FillConvexPoly with its 8-connected edge lines and 16.16 fixed-point
 * scanlines, the midpoint Circle), so the pixels are the ones cv2 draws.
 *
 * Like the original ControlNet annotator (and DWPose), every person's limbs are drawn before any
 * joint. Coordinates are normalised (x·W, y·H, truncated like Python's int()).
 *
 * Resolution (controlnet_aux): the skeleton is drawn on a canvas whose short side is the detect
 * resolution (512) with both sides rounded to multiples of 64, then resized to the output with
 * bilinear interpolation. So a 512×512 or 512×768 output is drawn directly, and a 1024×1024 one
 * gets the same proportions (limbs 8 px wide after the resize) as the pictures the model saw.
 */
import type { RgbImage } from '../vae.js';
import { roundHalfEven } from '../schedulers/common.js';
import { resizeBilinear } from './image-ops.js';
import type { Person } from './openpose.js';

export const STICK_WIDTH = 4;
export const JOINT_RADIUS = 4;
export const DETECT_RESOLUTION = 512;

/** Limbs drawn, as pairs of OpenPose-18 indices (0-based; the reference lists them 1-based). */
export const LIMBS: ReadonlyArray<readonly [number, number]> = [
  [1, 2], [1, 5], [2, 3], [3, 4], [5, 6], [6, 7], [1, 8], [8, 9], [9, 10],
  [1, 11], [11, 12], [12, 13], [1, 0], [0, 14], [14, 16], [0, 15], [15, 17],
];

/** RGB colour of limb i and of joint i. */
export const COLORS: ReadonlyArray<readonly [number, number, number]> = [
  [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
  [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
  [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
];

/** Limb fill: Python's `int(float(c) * 0.6)`. */
export function limbColor(i: number): [number, number, number] {
  const c = COLORS[i]!;
  return [Math.trunc(c[0] * 0.6), Math.trunc(c[1] * 0.6), Math.trunc(c[2] * 0.6)];
}

// ---------------------------------------------------------------------------------------------
// OpenCV rasterisation

type Point = { x: number; y: number };
type Color = readonly [number, number, number];

/** OpenCV's SinTable: sin of whole degrees 0…450 as 7-decimal float literals. */
const SIN_TABLE: Float64Array = (() => {
  const t = new Float64Array(451);
  for (let i = 0; i <= 450; i++) t[i] = Math.fround(Number(Math.sin((i * Math.PI) / 180).toFixed(7)));
  return t;
})();

/** `cv2.ellipse2Poly(center, axes, angle, arcStart, arcEnd, delta)` for integer arguments. */
export function ellipse2Poly(center: Point, axes: { width: number; height: number }, angle: number, arcStart: number, arcEnd: number, delta: number): Point[] {
  if (!(delta > 0 && delta <= 180)) throw new RangeError(`delta ${delta} out of (0, 180]`);
  let a = Math.trunc(angle);
  while (a < 0) a += 360;
  while (a > 360) a -= 360;
  let start = arcStart;
  let end = arcEnd;
  if (start > end) [start, end] = [end, start];
  while (start < 0) {
    start += 360;
    end += 360;
  }
  while (end > 360) {
    end -= 360;
    start -= 360;
  }
  if (end - start > 360) {
    start = 0;
    end = 360;
  }
  const alpha = SIN_TABLE[450 - a]!; // cos
  const beta = SIN_TABLE[a]!; // sin
  const pts: Point[] = [];
  let prev: Point | undefined;
  for (let i = start; i < end + delta; i += delta) {
    let t = i > end ? end : i;
    if (t < 0) t += 360;
    const x = axes.width * SIN_TABLE[450 - t]!;
    const y = axes.height * SIN_TABLE[t]!;
    const p = { x: roundHalfEven(center.x + x * alpha - y * beta), y: roundHalfEven(center.y + x * beta + y * alpha) };
    if (!prev || p.x !== prev.x || p.y !== prev.y) {
      pts.push(p);
      prev = p;
    }
  }
  if (pts.length === 1) return [{ ...center }, { ...center }];
  return pts;
}

function hline(img: RgbImage, y: number, x1: number, x2: number, color: Color): void {
  const row = y * img.width * 3;
  for (let x = x1; x <= x2; x++) {
    const o = row + x * 3;
    img.pixels[o] = color[0];
    img.pixels[o + 1] = color[1];
    img.pixels[o + 2] = color[2];
  }
}

function setPixel(img: RgbImage, x: number, y: number, color: Color): void {
  const o = (y * img.width + x) * 3;
  img.pixels[o] = color[0];
  img.pixels[o + 1] = color[1];
  img.pixels[o + 2] = color[2];
}

/** OpenCV `clipLine` (Cohen–Sutherland on integer points); false when the line misses the image. */
function clipLine(width: number, height: number, p1: Point, p2: Point): boolean {
  const right = width - 1;
  const bottom = height - 1;
  const code = (p: Point): number => (p.x < 0 ? 1 : 0) + (p.x > right ? 2 : 0) + (p.y < 0 ? 4 : 0) + (p.y > bottom ? 8 : 0);
  let c1 = code(p1);
  let c2 = code(p2);
  if ((c1 & c2) === 0 && (c1 | c2) !== 0) {
    if (c1 & 12) {
      const a = c1 < 8 ? 0 : bottom;
      p1.x += Math.trunc(((a - p1.y) * (p2.x - p1.x)) / (p2.y - p1.y));
      p1.y = a;
      c1 = (p1.x < 0 ? 1 : 0) + (p1.x > right ? 2 : 0);
    }
    if (c2 & 12) {
      const a = c2 < 8 ? 0 : bottom;
      p2.x += Math.trunc(((a - p2.y) * (p2.x - p1.x)) / (p2.y - p1.y));
      p2.y = a;
      c2 = (p2.x < 0 ? 1 : 0) + (p2.x > right ? 2 : 0);
    }
    if ((c1 & c2) === 0 && (c1 | c2) !== 0) {
      if (c1) {
        const a = c1 === 1 ? 0 : right;
        p1.y += Math.trunc(((a - p1.x) * (p2.y - p1.y)) / (p2.x - p1.x));
        p1.x = a;
        c1 = 0;
      }
      if (c2) {
        const a = c2 === 1 ? 0 : right;
        p2.y += Math.trunc(((a - p2.x) * (p2.y - p1.y)) / (p2.x - p1.x));
        p2.x = a;
        c2 = 0;
      }
    }
  }
  return (c1 | c2) === 0;
}

/** OpenCV `Line` with 8-connectivity (its LineIterator, left to right). */
function line8(img: RgbImage, a: Point, b: Point, color: Color): void {
  let p1 = { ...a };
  let p2 = { ...b };
  const outside = (p: Point): boolean => p.x < 0 || p.y < 0 || p.x >= img.width || p.y >= img.height;
  if ((outside(p1) || outside(p2)) && !clipLine(img.width, img.height, p1, p2)) return;
  let deltaX = 1;
  let deltaY = 1;
  let dx = p2.x - p1.x;
  let dy = p2.y - p1.y;
  if (dx < 0) {
    dx = -dx;
    dy = -dy;
    p1 = p2;
  }
  if (dy < 0) {
    dy = -dy;
    deltaY = -1;
  }
  const vert = dy > dx;
  if (vert) {
    [dx, dy] = [dy, dx];
    [deltaX, deltaY] = [deltaY, deltaX];
  }
  let err = dx - (dy + dy);
  const plusDelta = dx + dx;
  const minusDelta = -(dy + dy);
  // Column ("shift") and row ("step") increments for the minus and plus moves.
  let minusShift = deltaX;
  let plusShift = 0;
  let minusStep = 0;
  let plusStep = deltaY;
  if (vert) {
    [plusStep, plusShift] = [plusShift, plusStep];
    [minusStep, minusShift] = [minusShift, minusStep];
  }
  let { x, y } = p1;
  for (let i = 0; i <= dx; i++) {
    setPixel(img, x, y, color);
    const mask = err < 0;
    err += minusDelta + (mask ? plusDelta : 0);
    x += minusShift + (mask ? plusShift : 0);
    y += minusStep + (mask ? plusStep : 0);
  }
}

const XY_SHIFT = 16;
const XY_ONE = 1 << XY_SHIFT;
const fixedFloor = (v: number): number => Math.floor(v / XY_ONE);

/** `cv2.fillConvexPoly(img, pts, color)` (LINE_8, shift 0). */
export function fillConvexPoly(img: RgbImage, v: ReadonlyArray<Point>, color: Color): void {
  const npts = v.length;
  if (npts === 0) return;
  const half = XY_ONE >> 1;
  let edges = npts;
  let imin = 0;
  let xmin = v[0]!.x;
  let xmax = xmin;
  let ymin = v[0]!.y;
  let ymax = ymin;
  let p0 = v[npts - 1]!;
  for (let i = 0; i < npts; i++) {
    const p = v[i]!;
    if (p.y < ymin) {
      ymin = p.y;
      imin = i;
    }
    ymax = Math.max(ymax, p.y);
    xmax = Math.max(xmax, p.x);
    xmin = Math.min(xmin, p.x);
    line8(img, p0, p, color);
    p0 = p;
  }
  if (npts < 3 || xmax < 0 || ymax < 0 || xmin >= img.width || ymin >= img.height) return;
  ymax = Math.min(ymax, img.height - 1);
  const edge = [
    { idx: imin, di: 1, x: -XY_ONE, dx: 0, ye: ymin },
    { idx: imin, di: npts - 1, x: -XY_ONE, dx: 0, ye: ymin },
  ];
  let y = ymin;
  do {
    for (const e of edge) {
      if (y >= e.ye) {
        let idx0 = e.idx;
        let idx = idx0 + e.di;
        if (idx >= npts) idx -= npts;
        while (edges-- > 0) {
          const ty = v[idx]!.y;
          if (ty > y) {
            const xs = v[idx0]!.x * XY_ONE;
            const xe = v[idx]!.x * XY_ONE;
            e.ye = ty;
            e.dx = Math.trunc(((xe - xs) * 2 + (ty - y)) / (2 * (ty - y)));
            e.x = xs;
            e.idx = idx;
            break;
          }
          idx0 = idx;
          idx += e.di;
          if (idx >= npts) idx -= npts;
        }
      }
    }
    if (edges < 0) break;
    if (y >= 0) {
      const [l, r] = edge[0]!.x > edge[1]!.x ? [edge[1]!, edge[0]!] : [edge[0]!, edge[1]!];
      let x1 = fixedFloor(l.x + half);
      let x2 = fixedFloor(r.x + half);
      if (x2 >= 0 && x1 < img.width) {
        if (x1 < 0) x1 = 0;
        if (x2 >= img.width) x2 = img.width - 1;
        hline(img, y, x1, x2, color);
      }
    }
    edge[0]!.x += edge[0]!.dx;
    edge[1]!.x += edge[1]!.dx;
  } while (++y <= ymax);
}

/** `cv2.circle(img, center, radius, color, thickness=-1)` (LINE_8: OpenCV's midpoint Circle, filled). */
export function fillCircle(img: RgbImage, center: Point, radius: number, color: Color): void {
  const { width, height } = img;
  const { x: cx, y: cy } = center;
  let err = 0;
  let dx = radius;
  let dy = 0;
  let plus = 1;
  let minus = (radius << 1) - 1;
  const inside = cx >= radius && cx < width - radius && cy >= radius && cy < height - radius;
  while (dx >= dy) {
    const y11 = cy - dy;
    const y12 = cy + dy;
    const y21 = cy - dx;
    const y22 = cy + dx;
    let x11 = cx - dx;
    let x12 = cx + dx;
    let x21 = cx - dy;
    let x22 = cx + dy;
    if (inside) {
      hline(img, y11, x11, x12, color);
      hline(img, y12, x11, x12, color);
      hline(img, y21, x21, x22, color);
      hline(img, y22, x21, x22, color);
    } else if (x11 < width && x12 >= 0 && y21 < height && y22 >= 0) {
      x11 = Math.max(x11, 0);
      x12 = Math.min(x12, width - 1);
      if (y11 >= 0 && y11 < height) hline(img, y11, x11, x12, color);
      if (y12 >= 0 && y12 < height) hline(img, y12, x11, x12, color);
      if (x21 < width && x22 >= 0) {
        x21 = Math.max(x21, 0);
        x22 = Math.min(x22, width - 1);
        if (y21 >= 0 && y21 < height) hline(img, y21, x21, x22, color);
        if (y22 >= 0 && y22 < height) hline(img, y22, x21, x22, color);
      }
    }
    dy++;
    err += plus;
    plus += 2;
    if (err > 0) {
      err -= minus;
      dx--;
      minus -= 2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Skeletons

export interface DrawOptions {
  /** Limb half-thickness (the ellipse's minor semi-axis); 4 as in training. */
  stickWidth?: number;
  /** Joint circle radius; 4 as in training. */
  jointRadius?: number;
}

/** Draws people's bodies onto `canvas` in place (at the canvas's own size). */
export function drawBodyPose(canvas: RgbImage, people: ReadonlyArray<Person>, options: DrawOptions = {}): RgbImage {
  const stick = options.stickWidth ?? STICK_WIDTH;
  const radius = options.jointRadius ?? JOINT_RADIUS;
  const W = canvas.width;
  const H = canvas.height;
  LIMBS.forEach(([a, b], i) => {
    const color = limbColor(i);
    for (const person of people) {
      const p = person[a];
      const q = person[b];
      if (!p || !q) continue;
      const x1 = p.x * W;
      const y1 = p.y * H;
      const x2 = q.x * W;
      const y2 = q.y * H;
      const length = Math.hypot(x1 - x2, y1 - y2);
      const angle = (Math.atan2(y1 - y2, x1 - x2) * 180) / Math.PI;
      const polygon = ellipse2Poly(
        { x: Math.trunc((x1 + x2) / 2), y: Math.trunc((y1 + y2) / 2) },
        { width: Math.trunc(length / 2), height: stick },
        Math.trunc(angle),
        0,
        360,
        1,
      );
      fillConvexPoly(canvas, polygon, color);
    }
  });
  for (let i = 0; i < COLORS.length; i++) {
    for (const person of people) {
      const p = person[i];
      if (!p) continue;
      fillCircle(canvas, { x: Math.trunc(p.x * W), y: Math.trunc(p.y * H) }, radius, COLORS[i]!);
    }
  }
  return canvas;
}

/**
 * The canvas controlnet_aux draws on for an output of width × height: short side scaled to
 * `resolution`, both sides rounded (half to even) to multiples of 64.
 */
export function detectCanvasSize(width: number, height: number, resolution = DETECT_RESOLUTION): { width: number; height: number } {
  const k = resolution / Math.min(width, height);
  return {
    width: Math.max(64, roundHalfEven((width * k) / 64) * 64),
    height: Math.max(64, roundHalfEven((height * k) / 64) * 64),
  };
}

export interface SkeletonOptions extends DrawOptions {
  /** Short side of the canvas the skeleton is drawn on before the resize (512). */
  detectResolution?: number;
}

/**
 * The control picture for a ControlNet-OpenPose: the people's bodies (normalised coordinates)
 * drawn on black at the detect resolution, then resized (bilinear) to width × height.
 */
export function drawSkeleton(people: ReadonlyArray<Person>, width: number, height: number, options: SkeletonOptions = {}): RgbImage {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new RangeError(`cannot draw a ${width}x${height} skeleton`);
  }
  const size = detectCanvasSize(width, height, options.detectResolution);
  const canvas: RgbImage = { width: size.width, height: size.height, pixels: new Uint8Array(size.width * size.height * 3) };
  drawBodyPose(canvas, people, options);
  return size.width === width && size.height === height ? canvas : resizeBilinear(canvas, width, height);
}
