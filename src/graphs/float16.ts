/**
 * The fp16 pass for Kiln's own graphs: weights and compute in float16, float32 where fp16 breaks.
 *
 * Policy (the mixed precision of ONNX Runtime's Stable Diffusion tooling and of PyTorch autocast):
 * - Every float constant and weight is stored as fp16 and every op computes in fp16, except the
 *   ops of `keepFp32Ops` (default DEFAULT_FP32_OPS): norm statistics (x² overflows 65504 for
 *   activations above ~256), softmax and exp (exp overflows above 11), and sin/cos (the timestep
 *   embedding's arguments reach 999·freq, where fp16's spacing of 0.5 makes sin meaningless).
 * - What only feeds those ops (or a graph output) is computed in fp32 too, walking back through
 *   cheap ops: Mul(t, freqs) before sin/cos, the Reshape before a norm, bias and residual Adds
 *   read only by norms. Rounding an argument to fp16 would lose exactly what the op was kept
 *   for, and the Cast is needed somewhere anyway. The walk never passes the ops that read the big
 *   weights (FP16_WORK), so those are always fp16; the constants that only fp32 ops read (norm
 *   scale and bias, frequencies, CLIP's mask) stay fp32.
 * - Float graph inputs and outputs stay float32 (onnxconverter-common's keep_io_types): a Cast
 *   after each input, before each output.
 * Shape and integer paths are untouched; Casts to float inside the graph take the precision of
 * the node they are, and ConstantOfShape/Constant values follow theirs.
 *
 * The algorithm: decide each node's precision (last node first, so that a node's readers are
 * decided before it), give every float value the dtype of its producer, then insert one Cast per
 * (value, dtype) that some reader needs and does not get.
 */
import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';
import { float32ToFloat16Bits } from '../engine/float16.js';
import type { GraphBuilder } from './onnx-builder.js';

const { onnx } = onnxProto;
const FLOAT = onnx.TensorProto.DataType.FLOAT;
const FLOAT16 = onnx.TensorProto.DataType.FLOAT16;
const CODE = { f32: FLOAT, f16: FLOAT16 } as const;

type Precision = 'f16' | 'f32';
type Node = OnnxTypes.INodeProto;
type Tensor = OnnxTypes.ITensorProto;

/** Ops kept in float32 by default. */
export const DEFAULT_FP32_OPS: readonly string[] = ['InstanceNormalization', 'LayerNormalization', 'Softmax', 'Exp', 'Sin', 'Cos'];

/**
 * The ops fp16 is for, which read the big weights (Gather: embedding tables): never moved to fp32
 * by the walk back from a kept op, so those weights are always stored as fp16.
 */
const FP16_WORK = new Set(['Conv', 'ConvTranspose', 'MatMul', 'FusedMatMul', 'Gemm', 'Gather']);

/** Ops whose outputs are never float, whatever their inputs. */
const NON_FLOAT_OUTPUT = new Set(['Shape', 'Size', 'ArgMax', 'ArgMin', 'NonZero', 'Equal', 'Less', 'Greater', 'LessOrEqual', 'GreaterOrEqual', 'Not', 'And', 'Or', 'Xor', 'IsNaN', 'IsInf']);

/** fp16's largest finite value: float constants beyond it are clamped, not turned into ±Inf. */
const FP16_MAX = 65504;

export interface Float16Options {
  /** Op types computed in float32 (replaces DEFAULT_FP32_OPS; extend it with `[...DEFAULT_FP32_OPS, 'X']`). */
  keepFp32Ops?: readonly string[];
}

/** What input `i` of a node needs: the node's precision, unless the op fixes that input's type. */
function need(node: Node, i: number, precision: Precision): Precision | 'any' {
  switch (node.opType) {
    case 'Shape':
    case 'Size':
    case 'Cast':
      return 'any'; // read any element type
    case 'Resize':
      return i === 0 ? precision : 'f32'; // roi and scales are float32 whatever X is
    default:
      return precision;
  }
}

function attr(node: Node, name: string): OnnxTypes.IAttributeProto | undefined {
  return node.attribute?.find((a) => a.name === name);
}

const isFloatCode = (code: number | null | undefined): boolean => code === FLOAT || code === FLOAT16;

/** Whether a node's outputs are float, from its op and the type of the input that carries it. */
function floatOutput(node: Node, isFloat: (v: string) => boolean): boolean {
  const op = node.opType!;
  if (op === 'Cast') return isFloatCode(Number(attr(node, 'to')?.i));
  if (op === 'ConstantOfShape') return isFloatCode(attr(node, 'value')?.t?.dataType ?? FLOAT); // default: float32 zero
  if (op === 'Constant') return attr(node, 'value') ? isFloatCode(attr(node, 'value')!.t?.dataType) : !!attr(node, 'value_float') || !!attr(node, 'value_floats');
  if (NON_FLOAT_OUTPUT.has(op)) return false;
  const carrier = node.input?.[op === 'Where' ? 1 : 0];
  return !!carrier && isFloat(carrier);
}

/** A float32 tensor's values as fp16 bits, in place (clamped to fp16's finite range). */
function toFloat16Tensor(t: Tensor): void {
  if (t.dataType !== FLOAT) return;
  const raw = t.rawData;
  const values = raw?.length ? new Float32Array(raw.slice().buffer) : Float32Array.from(t.floatData ?? []);
  for (let i = 0; i < values.length; i++) values[i] = Math.max(-FP16_MAX, Math.min(FP16_MAX, values[i]!));
  const bits = float32ToFloat16Bits(values);
  t.rawData = new Uint8Array(bits.buffer);
  t.floatData = [];
  t.dataType = FLOAT16;
}

/** Converts a built graph to fp16 compute in place (see the file comment for the policy). */
export function toFloat16Graph(g: GraphBuilder, options: Float16Options = {}): void {
  const keep = new Set(options.keepFp32Ops ?? DEFAULT_FP32_OPS);
  const nodes = g.nodes;

  // Float values with a fixed stored dtype: graph inputs (kept as they are) and constants.
  const inputs = new Map<string, Precision>();
  for (const v of g.inputs) {
    const code = v.type?.tensorType?.elemType;
    if (isFloatCode(code)) inputs.set(v.name!, code === FLOAT ? 'f32' : 'f16');
  }
  const constants = new Map<string, Precision>();
  const inline = g.initializers.filter((t) => isFloatCode(t.dataType));
  for (const t of inline) constants.set(t.name!, t.dataType === FLOAT ? 'f32' : 'f16');
  for (const d of g.deferred) constants.set(d.name, d.dtype === 'float32' ? 'f32' : 'f16');

  // Which node outputs are float, who produces and who reads each value.
  const floats = new Set([...inputs.keys(), ...constants.keys()]);
  const producer = new Map<string, Node>();
  const readers = new Map<string, { node: Node; i: number }[]>();
  for (const node of nodes) {
    node.input!.forEach((v, i) => {
      if (!floats.has(v)) return;
      if (!readers.has(v)) readers.set(v, []);
      readers.get(v)!.push({ node, i });
    });
    const isFloat = floatOutput(node, (v) => floats.has(v));
    for (const o of node.output!) {
      if (!o) continue;
      producer.set(o, node);
      if (isFloat) floats.add(o);
    }
  }
  const graphOutputs = new Set(g.outputs.map((o) => o.name!));

  // 1. Node precisions, readers first. A graph output is read in float32.
  const fp32 = new Set<Node>();
  const precision = (node: Node): Precision => (fp32.has(node) ? 'f32' : 'f16');
  const wants = (v: string): Precision[] => {
    const w: (Precision | 'any')[] = graphOutputs.has(v) ? ['f32'] : [];
    for (const r of readers.get(v) ?? []) w.push(need(r.node, r.i, precision(r.node)));
    return w.filter((x): x is Precision => x !== 'any');
  };
  const onlyFp32Readers = (values: string[]): boolean => {
    const w = values.flatMap(wants);
    return w.length > 0 && w.every((x) => x === 'f32');
  };
  for (let k = nodes.length - 1; k >= 0; k--) {
    const node = nodes[k]!;
    const outs = node.output!.filter((o) => floats.has(o));
    const constantWithoutTensor = node.opType === 'Constant' && !attr(node, 'value'); // value_float(s): float32 only
    if (keep.has(node.opType!) || constantWithoutTensor) fp32.add(node);
    else if (!FP16_WORK.has(node.opType!) && outs.length > 0 && onlyFp32Readers(outs)) fp32.add(node);
  }

  // 2. Value dtypes: a node's outputs have its precision; a float32 constant becomes fp16 when
  // some reader computes in fp16 (readers in fp32 then read it through a Cast).
  const dtype = new Map<string, Precision>(inputs);
  for (const [v, d] of constants) dtype.set(v, d === 'f32' && wants(v).includes('f16') ? 'f16' : d);
  for (const v of floats) if (producer.has(v)) dtype.set(v, precision(producer.get(v)!));
  for (const t of inline) if (dtype.get(t.name!) === 'f16') toFloat16Tensor(t);
  for (const d of g.deferred) if (dtype.get(d.name) === 'f16') d.dtype = 'float16'; // write.ts converts the values

  // 3. Casts: one per (value, dtype), placed right after the value's producer (first for
  // graph inputs and constants, which keeps the node list topologically sorted).
  const names = new Set([...g.inputs.map((v) => v.name!), ...g.initializers.map((t) => t.name!), ...g.deferred.map((d) => d.name), ...producer.keys()]);
  const unique = (base: string): string => {
    let name = base;
    for (let i = 1; names.has(name); i++) name = `${base}_${i}`;
    names.add(name);
    return name;
  };
  const after = new Map<Node | undefined, Node[]>();
  const place = (v: string, cast: Node): void => {
    const at = producer.get(v);
    if (!after.has(at)) after.set(at, []);
    after.get(at)!.push(cast);
  };
  const casts = new Map<string, string>();
  const castNode = (from: string, to: string, d: Precision): Node => ({
    name: `${to}/Cast`,
    opType: 'Cast',
    input: [from],
    output: [to],
    attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: CODE[d] }],
  });
  const castTo = (v: string, d: Precision): string => {
    const key = `${v}|${d}`;
    let out = casts.get(key);
    if (out === undefined) {
      out = unique(`${v}_${d === 'f16' ? 'fp16' : 'fp32'}`);
      place(v, castNode(v, out, d));
      casts.set(key, out);
      dtype.set(out, d);
    }
    return out;
  };

  // A float output computed in fp16 keeps its name on the Cast to float32; the producer and the
  // graph's own readers use the fp16 value.
  for (const name of graphOutputs) {
    if (dtype.get(name) !== 'f16') continue;
    const node = producer.get(name);
    if (!node) throw new Error(`toFloat16Graph: graph output ${name} is not computed by a node`);
    const half = unique(`${name}_fp16`);
    node.output![node.output!.indexOf(name)] = half;
    producer.set(half, node);
    dtype.set(half, 'f16');
    for (const r of readers.get(name) ?? []) r.node.input![r.i] = half;
    place(half, castNode(half, name, 'f32'));
    casts.set(`${half}|f32`, name);
    dtype.set(name, 'f32');
  }

  for (const node of nodes) {
    const p = precision(node);
    node.input!.forEach((v, i) => {
      const has = dtype.get(v);
      const wanted = need(node, i, p);
      if (has && wanted !== 'any' && has !== wanted) node.input![i] = castTo(v, wanted);
    });
    // Typed attributes follow the node's precision (float attributes such as epsilon are untyped).
    if (node.opType === 'Cast' && isFloatCode(Number(attr(node, 'to')?.i))) attr(node, 'to')!.i = CODE[p];
    if ((node.opType === 'ConstantOfShape' || node.opType === 'Constant') && p === 'f16' && floats.has(node.output![0]!)) {
      let value = attr(node, 'value');
      if (!value) {
        value = { name: 'value', type: onnx.AttributeProto.AttributeType.TENSOR, t: { dataType: FLOAT, dims: [1], rawData: new Uint8Array(4) } };
        node.attribute = [...(node.attribute ?? []), value];
      }
      toFloat16Tensor(value.t!);
    }
  }

  const ordered = [...(after.get(undefined) ?? [])];
  for (const node of nodes) ordered.push(node, ...(after.get(node) ?? []));
  nodes.length = 0;
  for (const node of ordered) nodes.push(node);
}
