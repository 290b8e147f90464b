/**
 * Reading the reference libraries' golden tensors (`../shared/data/diffusers-golden/`, beside
 * the repository, as in every checkout and in CI), running Kiln's graphs on them and comparing
 * the results with one rule (`roundingTolerance`), shared by every golden test.
 */
import { after, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as ort from 'onnxruntime-node';
import type { onnx as OnnxTypes } from 'onnx-proto';
import type { DiffusionModel } from '../../src/engine/model.js';
import { generate, type GenerateOptions, type GenerateResult } from '../../src/engine/pipeline.js';
import { dtypeCode, type DType, type GraphBuilder } from '../../src/graphs/onnx-builder.js';
import { openSafetensors, readTensorBytes, readTensorFloat32, writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { GRAPH_FILE, writeGraph } from '../../src/graphs/write.js';

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const GOLDEN_DIR = join(REPO_ROOT, '..', 'shared', 'data', 'diffusers-golden');
/** compel's weighted-prompt conditioning on tiny CLIP encoders (its README spells out compel's rule). */
export const COMPEL_GOLDEN_DIR = join(REPO_ROOT, '..', 'shared', 'data', 'compel-golden');

export interface GoldenTensor {
  shape: number[];
  data: Float32Array;
}

/** A path inside the golden folder (an absolute path is returned as it is). */
export function goldenPath(path: string): string {
  return resolve(GOLDEN_DIR, path);
}

/** `config.json` of a component folder (relative to the golden folder, or absolute). */
export function readConfig(dir: string): Record<string, unknown> {
  return JSON.parse(readFileSync(join(goldenPath(dir), 'config.json'), 'utf8')) as Record<string, unknown>;
}

/** Every float tensor of a golden safetensors file (path relative to the golden folder), as float32. */
export function readGolden(relPath: string): Map<string, GoldenTensor> {
  const file = openSafetensors(goldenPath(relPath));
  const out = new Map<string, GoldenTensor>();
  for (const t of file.tensors.values()) {
    if (t.dtype === 'F32' || t.dtype === 'F16' || t.dtype === 'BF16') out.set(t.name, { shape: t.shape, data: readTensorFloat32(file, t) });
  }
  return out;
}

/** Entry `i` of a tensor stacked along its first axis (transformers' hidden_states, [L+1, B, S, D]). */
export function stackedEntry(t: GoldenTensor | ort.Tensor, i: number): Float32Array {
  const count = ('shape' in t ? t.shape : t.dims)[0]!;
  const size = t.data.length / count;
  assert.ok(i >= 0 && i < count, `entry ${i} of ${count}`);
  return (t.data as Float32Array).subarray(i * size, (i + 1) * size);
}

/** An int64 golden tensor (token ids, timesteps) as numbers. */
export function readGoldenInts(relPath: string, name: string): { shape: number[]; data: number[] } {
  const file = openSafetensors(goldenPath(relPath));
  const t = file.tensors.get(name);
  assert.ok(t, `${relPath} has no tensor ${name}`);
  const bytes = readTensorBytes(file, t);
  const data: number[] = [];
  if (t.dtype === 'I64') for (let i = 0; i < bytes.length; i += 8) data.push(Number(bytes.readBigInt64LE(i)));
  else if (t.dtype === 'I32') for (let i = 0; i < bytes.length; i += 4) data.push(bytes.readInt32LE(i));
  else throw new Error(`${name} is ${t.dtype}, not an integer tensor`);
  return { shape: t.shape, data };
}

/** Every tensor of a golden safetensors file as an ORT tensor: floats as float32, int64 kept. */
export function readGoldenFeeds(relPath: string): Record<string, ort.Tensor> {
  const file = openSafetensors(goldenPath(relPath));
  const out: Record<string, ort.Tensor> = {};
  for (const t of file.tensors.values()) {
    if (t.dtype === 'I64') {
      const bytes = readTensorBytes(file, t);
      out[t.name] = new ort.Tensor('int64', new BigInt64Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)), t.shape);
    } else out[t.name] = new ort.Tensor('float32', readTensorFloat32(file, t), t.shape);
  }
  return out;
}

/** A golden JSON file; Python's json writes Infinity, -Infinity and NaN as bare tokens, read as numbers. */
export function readGoldenJson<T = unknown>(relPath: string): T {
  const text = readFileSync(goldenPath(relPath), 'utf8').replace(/([:[,]\s*)(-?Infinity|NaN)(?=\s*[,}\]])/g, '$1"@@$2"');
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

/**
 * Asserts that `actual` equals the golden `expected` (tensor `tensor` of golden file `file`,
 * which names its README figure) within `roundingTolerance`, and reports the figures.
 */
export function assertGolden(t: TestContext, what: string, actual: ArrayLike<number>, expected: ArrayLike<number>, file: string, tensor: string): void {
  assertWithinRounding(t, what, actual, expected, readmeTolerance(file, tensor));
}

/** The same rule for a golden set whose README gives its run-to-run spread `readme` directly. */
export function assertWithinRounding(t: TestContext, what: string, actual: ArrayLike<number>, expected: ArrayLike<number>, readme: number): number {
  const diff = maxAbsDiff(actual, expected);
  const largest = maxAbs(expected);
  const allowed = roundingTolerance(readme, largest);
  const ulps = diff / (2 ** -23 * largest);
  t.diagnostic(
    `${what}: max abs diff ${diff.toExponential(2)} (${ulps.toFixed(1)} ulps of max |x| ${largest.toPrecision(3)}; ` +
      `README ${readme.toExponential(2)}, allowed ${allowed.toExponential(2)})`,
  );
  assert.ok(diff <= allowed, `${what}: max abs diff ${diff} over ${allowed}`);
  return diff;
}

// ---------------------------------------------------------------------------------------------
// Golden pipeline cases: diffusers' whole runs, through Kiln's generate().

/** The arguments of a golden pipeline case (pipelines/cases.json, ip_adapter/manifest.json) that generate() takes. */
export interface GoldenCase {
  id: string;
  prompt: string;
  negative_prompt: string | null;
  guidance_scale: number;
  num_inference_steps: number;
  height: number;
  width: number;
  scheduler: { class: string; config: Record<string, unknown> };
  latents_file: string;
  outputs_file: string;
}

/** The cases of pipelines/cases.json; `T` adds the fields a test reads beyond GoldenCase. */
export function pipelineCases<T extends GoldenCase = GoldenCase>(): T[] {
  return readGoldenJson<{ cases: T[] }>('pipelines/cases.json').cases;
}

/** One case of pipelines/cases.json. */
export function pipelineCase(id: string): GoldenCase {
  const c = pipelineCases().find((x) => x.id === id);
  assert.ok(c, `pipelines/cases.json has no case ${id}`);
  return c;
}

/**
 * Runs case `c` on `model` as diffusers did: the case's scheduler (as `pipe.scheduler =
 * Cls.from_config(...)` set it), arguments and starting latents; `extra` overrides options.
 * `dir`: the golden folder the case's files are in.
 */
export function runGoldenCase(model: DiffusionModel, c: GoldenCase, extra: Partial<GenerateOptions> = {}, dir = 'pipelines'): Promise<GenerateResult> {
  model.layout.schedulerConfig = c.scheduler.config as typeof model.layout.schedulerConfig;
  return generate(model, {
    prompt: c.prompt,
    negativePrompt: c.negative_prompt ?? undefined,
    seed: 0,
    size: `${c.width}x${c.height}`,
    allowedSizes: [`${c.width}x${c.height}`],
    steps: c.num_inference_steps,
    guidanceScale: c.guidance_scale,
    scheduler: c.scheduler.class,
    latents: readGolden(join(dir, c.latents_file)).get('latents')!.data,
    ...extra,
  });
}

/**
 * Asserts that `result` is diffusers' run of case `c`: every step taken, latents_final within
 * roundingTolerance, and the 8-bit image within one level per channel (of `image_uint8` where
 * the case has it, else of `image` rounded as PIL's conversion does).
 */
export function assertGoldenCase(t: TestContext, result: GenerateResult, c: GoldenCase, dir = 'pipelines'): void {
  assert.equal(result.unetCalls, c.num_inference_steps);
  const outFile = join(dir, c.outputs_file);
  const expected = readGolden(outFile);
  assertGolden(t, 'latents_final', result.latents, expected.get('latents_final')!.data, outFile, 'latents_final');
  const file = openSafetensors(goldenPath(outFile));
  const uint8 = file.tensors.get('image_uint8');
  const image: ArrayLike<number> = uint8 ? readTensorBytes(file, uint8) : Array.from(expected.get('image')!.data, (v) => Math.round(v * 255));
  assert.equal(result.image.pixels.length, image.length);
  let levels = 0;
  for (let i = 0; i < image.length; i++) levels = Math.max(levels, Math.abs(result.image.pixels[i]! - image[i]!));
  t.diagnostic(`${uint8 ? 'image_uint8' : 'image'}: max ${levels} level(s)`);
  assert.ok(levels <= 1, `image differs by ${levels} levels`);
}

// ---------------------------------------------------------------------------------------------
// Temporary folders and running graphs.

const temps: string[] = [];
after(() => {
  for (const dir of temps.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A fresh temporary folder, removed when the test file ends. */
export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), `kiln-${prefix}-`));
  temps.push(dir);
  return dir;
}

/**
 * A temporary component folder holding a copy of golden weights file `weightsFile` (same file
 * name) with `edit` applied to its tensors, and `config` as config.json when given.
 */
export function editedWeights(weightsFile: string, edit: (tensors: Record<string, TensorToWrite>) => void = () => {}, config?: Record<string, unknown>): string {
  const file = openSafetensors(goldenPath(weightsFile));
  const tensors: Record<string, TensorToWrite> = {};
  for (const t of file.tensors.values()) tensors[t.name] = { dtype: t.dtype, shape: t.shape, data: readTensorBytes(file, t) };
  edit(tensors);
  const dir = tempDir('weights');
  writeSafetensors(join(dir, basename(weightsFile)), tensors);
  if (config) writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
  return dir;
}

/** A graph input: an ORT tensor, or float32 values with their shape (a golden tensor). */
export type Feed = ort.Tensor | GoldenTensor;

/** As the engine runs graphs ('all' optimizations), on one thread; ORT's fp16 constant-folding warnings off. */
export const SESSION_OPTIONS: ort.InferenceSession.SessionOptions = { graphOptimizationLevel: 'all', intraOpNumThreads: 1, logSeverityLevel: 3 };

/** Runs a written model on the feeds its inputs name (each must be given); `outputs`: which to fetch (default all). */
export function runModel(path: string, feeds: Record<string, Feed>, outputs?: readonly string[]): Promise<Record<string, ort.Tensor>> {
  return run(path, feeds, outputs);
}

/**
 * Writes `g` into a temporary folder, checks that the session sees the inputs and outputs `g`
 * declares (names and order), runs it on `feeds` and removes the folder.
 */
export async function runGraph(g: GraphBuilder, feeds: Record<string, Feed>, outputs?: readonly string[]): Promise<Record<string, ort.Tensor>> {
  const dir = mkdtempSync(join(tmpdir(), `kiln-${g.name}-`));
  try {
    writeGraph(g, dir);
    return await run(join(dir, GRAPH_FILE), feeds, outputs, g);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** runGraph with each output's values as float32 (graphs whose outputs are all float). */
export async function runGraphFloats(g: GraphBuilder, feeds: Record<string, Feed>): Promise<Record<string, Float32Array>> {
  const out = await runGraph(g, feeds);
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, v.data as Float32Array]));
}

async function run(path: string, feeds: Record<string, Feed>, outputs?: readonly string[], declared?: GraphBuilder): Promise<Record<string, ort.Tensor>> {
  const session = await ort.InferenceSession.create(path, SESSION_OPTIONS);
  try {
    if (declared) {
      assert.deepEqual([...session.inputNames], declared.inputs.map((v) => v.name));
      assert.deepEqual([...session.outputNames], declared.outputs.map((v) => v.name));
    }
    const inputs: Record<string, ort.Tensor> = {};
    for (const name of session.inputNames) {
      const f = feeds[name];
      assert.ok(f, `no feed for input ${name}`);
      inputs[name] = 'shape' in f ? new ort.Tensor('float32', f.data, f.shape) : f;
    }
    return await (outputs ? session.run(inputs, [...outputs]) : session.run(inputs));
  } finally {
    await session.release();
  }
}

const DTYPES: readonly DType[] = ['float32', 'float16', 'float64', 'int32', 'int64', 'bool'];
const DTYPE_OF_CODE = new Map(DTYPES.map((d) => [dtypeCode(d), d]));

/** Graph inputs or outputs as `name -> 'dtype [dims]'` (symbolic dims by name), in order. */
export function describeValues(values: readonly OnnxTypes.IValueInfoProto[]): Record<string, string> {
  return Object.fromEntries(
    values.map((v) => {
      const tensor = v.type!.tensorType!;
      const dims = (tensor.shape?.dim ?? []).map((d) => d.dimParam || String(d.dimValue ?? '?'));
      return [v.name!, `${DTYPE_OF_CODE.get(tensor.elemType!) ?? `type ${tensor.elemType}`} [${dims.join(', ')}]`];
    }),
  );
}
