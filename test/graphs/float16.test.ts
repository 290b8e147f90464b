/**
 * The fp16 pass (src/graphs/float16.ts): small graphs made of the model pages' layers, built once
 * in fp32 and once through toFloat16Graph, run on ONNX Runtime's CPU provider (which runs most
 * fp16 ops in fp32 behind casts, but keeps every Cast the graph states), then the golden
 * components through the fp16 pass against diffusers' fp32 outputs.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';
import { buildComponent } from '../../src/graphs/convert.js';
import { buildClipText } from '../../src/graphs/clip-text.js';
import { DEFAULT_FP32_OPS, toFloat16Graph, type Float16Options } from '../../src/graphs/float16.js';
import { attention, conv2d, groupNorm, layerNorm, linear, silu } from '../../src/graphs/layers.js';
import { decodeModel, GraphBuilder, mulberry32 } from '../../src/graphs/onnx-builder.js';
import { writeSafetensors, type TensorToWrite } from '../../src/graphs/safetensors.js';
import { buildUnet } from '../../src/graphs/unet.js';
import { buildVaeDecoder } from '../../src/graphs/vae.js';
import { componentWeights, Params, type WeightSource } from '../../src/graphs/weights.js';
import { DATA_FILE, GRAPH_FILE, writeGraph } from '../../src/graphs/write.js';
import { goldenPath, maxAbs, maxAbsDiff, readConfig, readGoldenFeeds, runModel, stackedEntry, tempDir } from './golden.js';

const { onnx } = onnxProto;
const { FLOAT, FLOAT16 } = onnx.TensorProto.DataType;
type Feeds = Record<string, ort.Tensor>;

/** Seeded uniform values in [-scale, scale). */
function uniform(count: number, scale: number, seed: number): Float32Array {
  const next = mulberry32(seed);
  return Float32Array.from({ length: count }, () => (next() * 2 - 1) * scale);
}

/** Writes `shapes` as seeded F32 tensors into `dir/model.safetensors` and opens them as weights. */
function weightsOf(dir: string, shapes: Record<string, number[]>, scale = (shape: number[]) => 1 / Math.sqrt(shape.slice(1).reduce((a, b) => a * b, 1))): WeightSource {
  const tensors: Record<string, TensorToWrite> = {};
  Object.entries(shapes).forEach(([name, shape], i) => {
    const count = shape.reduce((a, b) => a * b, 1);
    tensors[name] = { dtype: 'F32', shape, data: uniform(count, shape.length === 1 ? 0.5 : scale(shape), 1000 + i) };
  });
  writeSafetensors(join(dir, 'model.safetensors'), tensors);
  return componentWeights(dir, 'test');
}

/** Builds with `build` twice (fp32, then through the fp16 pass), writes and runs both. */
async function fp32AndFp16(
  name: string,
  weights: WeightSource,
  build: (g: GraphBuilder, p: Params) => void,
  feeds: Feeds,
  options?: Float16Options,
): Promise<{ fp32: Record<string, ort.Tensor>; fp16: Record<string, ort.Tensor>; model: OnnxTypes.ModelProto; dataBytes: number }> {
  const dir = tempDir(`f16-${name}`);
  const results: Record<string, ort.Tensor>[] = [];
  for (const half of [false, true]) {
    const g = new GraphBuilder(name);
    build(g, Params.of(g, weights));
    if (half) toFloat16Graph(g, options);
    const out = join(dir, half ? 'fp16' : 'fp32');
    mkdirSync(out);
    writeGraph(g, out);
    results.push(await runModel(join(out, GRAPH_FILE), feeds));
  }
  const model = decodeModel(readFileSync(join(dir, 'fp16', GRAPH_FILE)));
  let dataBytes = 0;
  try {
    dataBytes = statSync(join(dir, 'fp16', DATA_FILE)).size;
  } catch {
    // nothing converted
  }
  return { fp32: results[0]!, fp16: results[1]!, model, dataBytes };
}

/** Max abs difference, the reference's max magnitude and their ratio, reported; fails on NaN/Inf. */
function compare(t: TestContext, what: string, actual: ArrayLike<number>, expected: ArrayLike<number>): { diff: number; maxAbs: number; rel: number } {
  for (let i = 0; i < actual.length; i++) assert.ok(Number.isFinite(actual[i]!), `${what}[${i}] is ${actual[i]}`);
  const diff = maxAbsDiff(actual, expected);
  const largest = maxAbs(expected);
  const rel = diff / largest;
  t.diagnostic(`${what}: max abs diff ${diff.toExponential(2)}, max abs ${largest.toPrecision(3)}, relative ${rel.toExponential(2)}`);
  return { diff, maxAbs: largest, rel };
}

/** The element type of every float value of a decoded model (graph inputs, initializers, node outputs). */
function floatTypes(model: OnnxTypes.ModelProto): Map<string, number> {
  const types = new Map<string, number>();
  const graph = model.graph!;
  for (const v of graph.input!) types.set(v.name!, v.type!.tensorType!.elemType!);
  for (const t of graph.initializer!) types.set(t.name!, t.dataType!);
  for (const n of graph.node!) {
    const to = n.attribute!.find((a) => a.name === 'to' || a.name === 'value');
    let type: number | undefined;
    if (n.opType === 'Cast') type = Number(to!.i);
    else if (n.opType === 'ConstantOfShape') type = to?.t?.dataType ?? FLOAT;
    else if (['Shape', 'Equal', 'ArgMax'].includes(n.opType!)) type = undefined;
    else type = types.get(n.input![n.opType === 'Where' ? 1 : 0]!);
    if (type !== undefined) for (const o of n.output!) types.set(o, type);
  }
  return types;
}

/** A small UNet-like graph with every kind of value the pass handles. */
const MINI_SHAPES: Record<string, number[]> = {
  'conv_in.weight': [8, 4, 3, 3],
  'conv_in.bias': [8],
  'time.weight': [8, 8],
  'time.bias': [8],
  'temb_proj.weight': [8, 8],
  'temb_proj.bias': [8],
  'norm.weight': [8],
  'norm.bias': [8],
  'ln.weight': [8],
  'ln.bias': [8],
  ...Object.fromEntries(['to_q', 'to_k', 'to_v', 'to_out'].flatMap((m) => [[`${m}.weight`, [8, 8]], [`${m}.bias`, [8]]])),
  'conv_out.weight': [4, 8, 3, 3],
  'conv_out.bias': [4],
};

function buildMini(g: GraphBuilder, p: Params): void {
  const sample = g.input('sample', 'float32', ['batch', 4, 'height', 'width']);
  const timestep = g.input('timestep', 'float32', ['batch']);
  const step = g.input('step', 'int64', ['batch']);
  // Timestep embedding as diffusers' Timesteps: exp(-ln(10000)·i/half), t·freq, [cos, sin].
  const temb = g.scope('time', () => {
    const freqs = g.op('Exp', [g.constF32([0, 1, 2, 3].map((i) => (-Math.log(10000) * i) / 4), [1, 4])]);
    const args = g.op('Mul', [g.op('Unsqueeze', [timestep, g.constI64([1])]), freqs]);
    const emb = g.op('Concat', [g.op('Cos', [args]), g.op('Sin', [args])], { axis: 1 });
    return g.op('Identity', [linear(g, p.at('time'), emb, 8, 8)], {}, 'temb');
  });
  // A graph output that fp16 compute also reads.
  g.output('temb', 'float32', ['batch', 8]);
  // A Cast to float32 in the graph (int64 step -> float) and a ConstantOfShape (typed tensor
  // attribute), both feeding fp16 compute.
  const stepF = g.op('Mul', [g.op('Unsqueeze', [g.cast(step, 'float32'), g.constI64([1, 2, 3])]), g.constF32([0.01], [])]);
  const quarter = g.op('ConstantOfShape', [g.op('Shape', [sample])]);
  g.nodes.at(-1)!.attribute = [{ name: 'value', type: onnx.AttributeProto.AttributeType.TENSOR, t: { dataType: FLOAT, dims: [1], rawData: new Uint8Array(Float32Array.of(0.25).buffer) } }];
  let h = conv2d(g, p.at('conv_in'), g.op('Add', [g.op('Add', [sample, stepF]), quarter]), 4, 8);
  const t = linear(g, p.at('temb_proj'), silu(g, temb), 8, 8);
  h = g.op('Add', [h, g.op('Unsqueeze', [t, g.constI64([2, 3])])]);
  h = silu(g, groupNorm(g, p.at('norm'), h, 8, 2, 1e-5));
  const shape = g.op('Shape', [h]);
  const tokens = g.op('Transpose', [g.op('Reshape', [h, g.constI64([0, 0, -1])])], { perm: [0, 2, 1] });
  const x = layerNorm(g, p.at('ln'), tokens, 8, 1e-5);
  const a = attention(g, linear(g, p.at('to_q'), x, 8, 8), linear(g, p.at('to_k'), x, 8, 8), linear(g, p.at('to_v'), x, 8, 8), 2, 4);
  const back = g.op('Reshape', [g.op('Transpose', [linear(g, p.at('to_out'), a, 8, 8)], { perm: [0, 2, 1] }), shape]);
  g.op('Identity', [conv2d(g, p.at('conv_out'), g.op('Add', [h, back]), 8, 4)], {}, 'out');
  g.output('out', 'float32', ['batch', 4, 'height', 'width']);
}

test('fp16 mini UNet: float32 I/O, fp16 weights and compute, fp32 norms, softmax and timestep, outputs within fp16 precision', async (t) => {
  const dir = tempDir('f16-mini-weights');
  const weights = weightsOf(dir, MINI_SHAPES);
  const feeds: Feeds = {
    sample: new ort.Tensor('float32', uniform(2 * 4 * 6 * 10, 2, 7), [2, 4, 6, 10]),
    // Euler-style fractional timesteps: fp16's spacing at 958 is 0.5.
    timestep: new ort.Tensor('float32', Float32Array.of(958.47, 421.3), [2]),
    step: new ort.Tensor('int64', BigInt64Array.of(3n, 17n), [2]),
  };
  const { fp32, fp16, model, dataBytes } = await fp32AndFp16('mini', weights, buildMini, feeds);
  const graph = model.graph!;

  // I/O stays float32.
  assert.deepEqual(graph.input!.map((v) => [v.name, v.type!.tensorType!.elemType]), [['sample', FLOAT], ['timestep', FLOAT], ['step', onnx.TensorProto.DataType.INT64]]);
  assert.deepEqual(graph.output!.map((v) => [v.name, v.type!.tensorType!.elemType]), [['temb', FLOAT], ['out', FLOAT]]);
  for (const name of ['temb', 'out']) {
    assert.equal(fp16[name]!.type, 'float32');
    const { rel } = compare(t, `mini ${name}`, fp16[name]!.data as Float32Array, fp32[name]!.data as Float32Array);
    assert.ok(rel < 1e-2, `${name}: relative difference ${rel}`);
  }

  // Weights: fp16 (written into model.onnx_data), except those only fp32 compute reads: the
  // LayerNorm's, and temb_proj's bias, added in the cheap chain that only feeds the group norm.
  const weightTypes = Object.fromEntries(graph.initializer!.filter((t) => t.name! in MINI_SHAPES).map((t) => [t.name, t.dataType]));
  const fp32Weights = ['ln.weight', 'ln.bias', 'temb_proj.bias'];
  for (const name of Object.keys(MINI_SHAPES)) assert.equal(weightTypes[name], fp32Weights.includes(name) ? FLOAT : FLOAT16, name);
  const halfCount = Object.entries(MINI_SHAPES).filter(([n]) => !fp32Weights.includes(n)).reduce((a, [, s]) => a + s.reduce((x, y) => x * y, 1), 0);
  assert.equal(dataBytes, 2 * halfCount); // no tensor here is large enough to be page-aligned

  // Compute: the heavy ops read fp16, the kept ops fp32 (through a Cast to float32 or an fp32 chain).
  const types = floatTypes(model);
  const nodes = graph.node!;
  for (const n of nodes.filter((n) => ['Conv', 'FusedMatMul', 'MatMul'].includes(n.opType!))) {
    for (const v of n.input!) if (v) assert.equal(types.get(v), FLOAT16, `${n.opType} input ${v}`);
  }
  const kept = nodes.filter((n) => DEFAULT_FP32_OPS.includes(n.opType!));
  assert.deepEqual([...new Set(kept.map((n) => n.opType))].sort(), ['Cos', 'Exp', 'InstanceNormalization', 'LayerNormalization', 'Sin', 'Softmax']);
  for (const n of kept) for (const v of [...n.input!, ...n.output!]) if (v) assert.equal(types.get(v), FLOAT, `${n.opType} ${v}`);
  // The norms' data inputs are fp16 activations cast up: a Cast to float32 sits before each.
  const producer = new Map(nodes.flatMap((n) => n.output!.map((o) => [o, n] as const)));
  const castUp = (v: string): boolean => {
    const p = producer.get(v);
    if (!p) return false;
    if (p.opType === 'Cast') return Number(p.attribute![0]!.i) === FLOAT && types.get(p.input![0]!) === FLOAT16;
    return types.get(v) === FLOAT && p.input!.some((x) => castUp(x)); // through the fp32 chain in front (Reshape, Transpose, bias Add)
  };
  for (const n of kept.filter((n) => ['InstanceNormalization', 'LayerNormalization', 'Softmax'].includes(n.opType!))) assert.ok(castUp(n.input![0]!), n.name!);
  // The graph's own Cast to float32 (int64 step) became a Cast to float16; ConstantOfShape's value is fp16.
  const stepCast = nodes.find((n) => n.opType === 'Cast' && n.input![0] === 'step')!;
  assert.equal(Number(stepCast.attribute![0]!.i), FLOAT16);
  assert.equal(nodes.find((n) => n.opType === 'ConstantOfShape')!.attribute![0]!.t!.dataType, FLOAT16);
  // One Cast in from `sample`; none from `timestep`, which only the fp32 path reads. `temb`,
  // computed in fp16 and read by fp16 ops too, is a Cast of that fp16 value.
  assert.equal(nodes.filter((n) => n.input![0] === 'sample' && n.opType === 'Cast').length, 1);
  assert.equal(nodes.filter((n) => n.input![0] === 'timestep' && n.opType === 'Cast').length, 0);
  const tembCast = producer.get('temb')!;
  assert.equal(tembCast.opType, 'Cast');
  assert.equal(types.get(tembCast.input![0]!), FLOAT16);
  // The node list stays topologically sorted.
  const defined = new Set([...graph.input!.map((v) => v.name!), ...graph.initializer!.map((t) => t.name!), '']);
  for (const n of nodes) {
    for (const v of n.input!) assert.ok(defined.has(v), `${n.name} reads ${v} before it is computed`);
    for (const o of n.output!) defined.add(o);
  }
});

test('fp16 timestep embedding: t·freq stays fp32; computed in fp16 it is visibly wrong', async (t) => {
  const dir = tempDir('f16-temb-weights');
  const shapes = { 'time.weight': [8, 8], 'time.bias': [8] };
  const weights = weightsOf(dir, shapes, () => 1);
  const build = (g: GraphBuilder, p: Params): void => {
    const timestep = g.input('timestep', 'float32', ['batch']);
    const freqs = g.op('Exp', [g.constF32([0, 1, 2, 3].map((i) => (-Math.log(10000) * i) / 4), [1, 4])]);
    const args = g.op('Mul', [g.op('Unsqueeze', [timestep, g.constI64([1])]), freqs]);
    const emb = g.op('Concat', [g.op('Cos', [args]), g.op('Sin', [args])], { axis: 1 });
    g.op('Identity', [linear(g, p.at('time'), emb, 8, 8)], {}, 'temb');
    g.output('temb', 'float32', ['batch', 8]);
  };
  const feeds = { timestep: new ort.Tensor('float32', Float32Array.of(999, 958.47, 421.3, 1.7), [4]) };
  const kept = await fp32AndFp16('temb', weights, build, feeds);
  const good = compare(t, 'temb (default policy)', kept.fp16.temb!.data as Float32Array, kept.fp32.temb!.data as Float32Array);
  const naive = await fp32AndFp16('temb', weights, build, feeds, { keepFp32Ops: [] });
  const bad = compare(t, 'temb (all fp16)', naive.fp16.temb!.data as Float32Array, naive.fp32.temb!.data as Float32Array);
  assert.ok(good.rel < 5e-3, `default policy: ${good.rel}`);
  assert.ok(bad.rel > 10 * good.rel, `all-fp16 should be far worse: ${bad.rel} vs ${good.rel}`);
});

test('fp16 group norm of activations ~300 (x² past 65504) gives the fp32 answer', async (t) => {
  const dir = tempDir('f16-norm-weights');
  const weights = weightsOf(dir, { 'conv.weight': [8, 8, 1, 1], 'conv.bias': [8], 'norm.weight': [8], 'norm.bias': [8] }, () => 1);
  const build = (g: GraphBuilder, p: Params): void => {
    const x = g.input('x', 'float32', ['batch', 8, 'height', 'width']);
    // A 1x1 conv makes the activations fp16 values before the norm (as inside the UNet).
    const h = g.op('Identity', [conv2d(g, p.at('conv'), x, 8, 8, { kernel: 1 })], {}, 'h');
    g.output('h', 'float32', ['batch', 8, 'height', 'width']);
    g.op('Identity', [groupNorm(g, p.at('norm'), h, 8, 2, 1e-5)], {}, 'y');
    g.output('y', 'float32', ['batch', 8, 'height', 'width']);
  };
  const x = uniform(2 * 8 * 8 * 8, 300, 11);
  const { fp32, fp16 } = await fp32AndFp16('norm', weights, build, { x: new ort.Tensor('float32', x, [2, 8, 8, 8]) });
  // The conv output (a graph output that the norm also reads) is in the range where x² overflows fp16.
  compare(t, 'conv output', fp16.h!.data as Float32Array, fp32.h!.data as Float32Array);
  const big = (fp32.h!.data as Float32Array).filter((v) => Math.abs(v) > 256).length;
  assert.ok(big > 100, `${big} values above 256`);
  const { rel } = compare(t, 'group norm of ~300s', fp16.y!.data as Float32Array, fp32.y!.data as Float32Array);
  assert.ok(rel < 1e-2, `relative ${rel}`);
});


// ---------------------------------------------------------------------------------------------
// The golden components through the fp16 pass, against diffusers' / transformers' fp32 outputs.

interface GoldenCase {
  folder: string;
  build: (g: GraphBuilder, config: Record<string, unknown>, p: Params) => unknown;
  /** Graph input -> golden input. */
  inputs: Record<string, string>;
  /** Graph output -> its golden values. */
  outputs: (golden: Record<string, ort.Tensor>) => Record<string, Float32Array>;
}

const clipOutputs = (pooled: string, layers: number) => (o: Record<string, ort.Tensor>): Record<string, Float32Array> => ({
  last_hidden_state: o.last_hidden_state!.data as Float32Array,
  [pooled]: o[pooled]!.data as Float32Array,
  ...Object.fromEntries(Array.from({ length: layers + 1 }, (_, i) => [`hidden_states.${i}`, stackedEntry(o.hidden_states!, i)])),
});
const unetInputs = { sample: 'sample', timestep: 'timestep', encoder_hidden_states: 'encoder_hidden_states' };

const GOLDEN_CASES: GoldenCase[] = [
  { folder: 'clip_l', build: buildClipText, inputs: { input_ids: 'input_ids' }, outputs: clipOutputs('pooler_output', 3) },
  { folder: 'clip_g', build: buildClipText, inputs: { input_ids: 'input_ids' }, outputs: clipOutputs('text_embeds', 3) },
  { folder: 'unet_sd15', build: buildUnet, inputs: unetInputs, outputs: (o) => ({ out_sample: o.sample!.data as Float32Array }) },
  {
    folder: 'unet_sdxl',
    build: buildUnet,
    inputs: { ...unetInputs, text_embeds: 'text_embeds', time_ids: 'time_ids' },
    outputs: (o) => ({ out_sample: o.sample!.data as Float32Array }),
  },
  { folder: 'vae', build: buildVaeDecoder, inputs: { latent_sample: 'latent' }, outputs: (o) => ({ sample: o.decoded!.data as Float32Array }) },
];

/**
 * fp16 keeps 11 significant bits (unit roundoff 2^-11 = 4.9e-4 of a value); the golden weights
 * are already on the fp16 grid, so what differs is the rounding of activations between ops, a
 * few dozen times along these networks' longest paths: 1e-2 of the output's largest magnitude
 * (about 20 roundings) bounds that. This is fp16's rule, not golden.ts's roundingTolerance
 * (float32 rounding). Measured (t.diagnostic): 2.7e-4 (clip_l pooler_output) to 1.7e-3 (vae
 * sample); hidden_states.0 (embeddings) exact.
 */
const FP16_RELATIVE_TOLERANCE = 1e-2;

for (const c of GOLDEN_CASES) {
  test(`fp16 pass on golden ${c.folder}: within fp16 precision of diffusers' fp32 outputs`, async (t) => {
    const folder = `components/${c.folder}`;
    const config = readConfig(folder);
    const dir = tempDir(`f16-${c.folder}`);
    buildComponent({ build: c.build }, c.folder, config, componentWeights(goldenPath(folder), c.folder), dir, { dtype: 'fp16' });
    const model = decodeModel(readFileSync(join(dir, GRAPH_FILE)));
    // Weights are fp16 on disk, except small ones only fp32 compute reads: norm scale and bias,
    // biases added in the cheap chains in front of a norm, CLIP's position table (Slice, Add).
    const weights = model.graph!.initializer!.filter((w) => w.externalData?.length);
    const size = (w: OnnxTypes.ITensorProto): number => w.dims!.reduce((a: number, b) => a * Number(b), 1);
    const kept = weights.filter((w) => w.dataType === FLOAT);
    for (const w of kept) assert.ok(w.dims!.length === 1 || w.name!.endsWith('position_embedding.weight'), `${w.name} [${w.dims}] is fp32`);
    const keptShare = kept.reduce((a, w) => a + size(w), 0) / weights.reduce((a, w) => a + size(w), 0);
    t.diagnostic(`${c.folder}: ${kept.length} of ${weights.length} weights kept fp32 (${(100 * keptShare).toFixed(2)}% of the values)`);
    assert.ok(keptShare < 0.01);
    for (const v of [...model.graph!.input!, ...model.graph!.output!]) assert.notEqual(v.type!.tensorType!.elemType, FLOAT16, v.name!);

    const golden = readGoldenFeeds(`${folder}/inputs.safetensors`);
    const feeds = Object.fromEntries(Object.entries(c.inputs).map(([name, key]) => [name, golden[key]!]));
    const actual = await runModel(join(dir, GRAPH_FILE), feeds);
    const expected = c.outputs(readGoldenFeeds(`${folder}/outputs.safetensors`));
    for (const [name, want] of Object.entries(expected)) {
      assert.equal(actual[name]!.type, 'float32');
      const { rel } = compare(t, `${c.folder} ${name}`, actual[name]!.data as Float32Array, want);
      assert.ok(rel <= FP16_RELATIVE_TOLERANCE, `${c.folder} ${name}: ${rel} of max magnitude`);
    }
  });
}
