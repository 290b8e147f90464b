/**
 * Reading the reference libraries' golden tensors (`../shared/data/diffusers-golden/`, beside
 * the repository, as in every checkout and in CI) and comparing Kiln's results with them.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openSafetensors, readTensorBytes, readTensorFloat32 } from '../../src/graphs/safetensors.js';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const GOLDEN_DIR = join(REPO_ROOT, '..', 'shared', 'data', 'diffusers-golden');

export interface GoldenTensor {
  shape: number[];
  data: Float32Array;
}

/** Every float tensor of a golden safetensors file (path relative to the golden folder), as float32. */
export function readGolden(relPath: string): Map<string, GoldenTensor> {
  const file = openSafetensors(join(GOLDEN_DIR, relPath));
  const out = new Map<string, GoldenTensor>();
  for (const t of file.tensors.values()) {
    if (t.dtype === 'F32' || t.dtype === 'F16' || t.dtype === 'BF16') out.set(t.name, { shape: t.shape, data: readTensorFloat32(file, t) });
  }
  return out;
}

/** An int64 golden tensor (token ids, timesteps) as numbers. */
export function readGoldenInts(relPath: string, name: string): { shape: number[]; data: number[] } {
  const file = openSafetensors(join(GOLDEN_DIR, relPath));
  const t = file.tensors.get(name);
  assert.ok(t, `${relPath} has no tensor ${name}`);
  const bytes = readTensorBytes(file, t);
  const data: number[] = [];
  if (t.dtype === 'I64') for (let i = 0; i < bytes.length; i += 8) data.push(Number(bytes.readBigInt64LE(i)));
  else if (t.dtype === 'I32') for (let i = 0; i < bytes.length; i += 4) data.push(bytes.readInt32LE(i));
  else throw new Error(`${name} is ${t.dtype}, not an integer tensor`);
  return { shape: t.shape, data };
}

/** A golden JSON file; Python's json writes Infinity, -Infinity and NaN as bare tokens, read as numbers. */
export function readGoldenJson<T = unknown>(relPath: string): T {
  const text = readFileSync(join(GOLDEN_DIR, relPath), 'utf8').replace(/([:[,]\s*)(-?Infinity|NaN)(?=\s*[,}\]])/g, '$1"@@$2"');
  const special: Record<string, number> = { '@@Infinity': Infinity, '@@-Infinity': -Infinity, '@@NaN': NaN };
  return JSON.parse(text, (_k, v: unknown) => (typeof v === 'string' && v in special ? special[v] : v)) as T;
}

const tolerances = readGoldenJson<{ per_file: Record<string, number | Record<string, number>> }>('tolerances.json');

/** The golden README's 1-vs-2-thread difference of a tensor (torch's own run-to-run spread). */
export function readmeTolerance(file: string, tensor: string): number {
  const entry = tolerances.per_file[file];
  if (entry === undefined) throw new Error(`tolerances.json has no ${file}`);
  return typeof entry === 'number' ? entry : (entry[tensor] ?? 0);
}

/**
 * How far Kiln's float32 result may be from the reference's. ONNX Runtime and PyTorch sum in
 * different orders, so their float32 results differ in the last bits; the golden README
 * measures how much that alone moves each tensor (torch at 1 vs 2 threads). Kiln may differ by
 * three times that, or by 8 float32 ulps of the tensor's largest value where torch happened to
 * be bit-stable (README 0). Measured: 1.1 to 2.0 times the README's figure (VAE logvar the
 * highest), CLIP within 6 ulps; an independent float64 forward pass of the VAE is closer to
 * Kiln's output than to torch's. Real defects are far larger: a LayerNorm eps of 1e-6 instead of
 * 1e-5 moves the UNet by 4e-6 to 6e-6 (10 times the allowance), a VAE norm eps of 1e-5 instead
 * of 1e-6 moves the decoded image by 2.3e-4.
 */
export function roundingTolerance(readme: number, maxAbsValue: number): number {
  return Math.max(3 * readme, 8 * 2 ** -23 * maxAbsValue);
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, `lengths differ: ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
