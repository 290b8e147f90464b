/**
 * IEEE 754 half-precision conversion. Node 20 has no Float16Array, and onnxruntime-node takes
 * float16 tensors as Uint16Array bit patterns, so fp16-I/O models need these two functions.
 */

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 -> float16 bits, round to nearest even; overflow goes to ±Inf, NaN stays NaN. */
export function toFloat16Bits(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;

  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // Inf or NaN
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow
  if (e <= 0) {
    if (e < -10) return sign; // underflow to zero
    // Subnormal: shift the implicit leading 1 into the mantissa, then round.
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = mant & ((1 << shift) - 1);
    let result = mant >>> shift;
    if (rest > half || (rest === half && (result & 1))) result++;
    return sign | result;
  }
  let result = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (result & 1))) result++; // may carry into the exponent: still correct
  return sign | result;
}

/** float16 bits -> float32 value. */
export function fromFloat16Bits(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >>> 10) & 0x1f;
  const mant = bits & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

export function float32ToFloat16Bits(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = toFloat16Bits(values[i]!);
  return out;
}

/** Every binary16 value as float32, built on first use: converting GBs of fp16 weights is a table lookup. */
let halfTable: Float32Array | undefined;

export function float16BitsToFloat32(bits: ArrayLike<number>): Float32Array {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let b = 0; b < 65536; b++) halfTable[b] = fromFloat16Bits(b);
  }
  const table = halfTable;
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = table[bits[i]! & 0xffff]!;
  return out;
}
