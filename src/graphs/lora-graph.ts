/**
 * LoRAs applied inside a built graph: W' = W + scale · (alpha / rank) · up @ down is written as
 * graph nodes (a Gemm per LoRA, with Casts and a Reshape where needed) over small initializers
 * holding `up` and `down`, feeding the weight's consumers in place of the stored weight. ONNX Runtime's constant folding
 * computes each fused weight once, with its own matrix kernels, while the session is created; no
 * fused copy of the weights is written anywhere.
 *
 * A variant is a second graph file beside the base's `model.onnx` (`model.lora-<key>.onnx`),
 * reading the base's weights from the same external-data files and the LoRA tensors in place
 * from a hard link of the LoRA file (ONNX Runtime refuses external data outside the graph's
 * folder). It is written once per (base graph, LoRA file contents, scales) and reused.
 *
 * Only graphs Kiln builds carry the diffusers weight names this matches against (an exported
 * ONNX folder names its transposed weights `onnx::MatMul_1234`); the engine refuses LoRAs there.
 */
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, linkSync, readdirSync, readFileSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import onnxProto from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';
import { ModelLoadError } from '../engine/errors.js';
import { assertNotPickle } from './checkpoint.js';
import type { ModelFamily } from './keys-ldm.js';
import { readLora, withLoras, type LoraComponent, type LoraFile, type LoraReport } from './lora.js';
import type { SafetensorsDType, SafetensorsTensor } from './safetensors.js';
import type { WeightEntry, WeightSource } from './weights.js';

const { onnx } = onnxProto;
const T = onnx.TensorProto.DataType;
const DATA_TYPE: Partial<Record<SafetensorsDType, number>> = { F32: T.FLOAT, F16: T.FLOAT16, BF16: T.BFLOAT16 };
const FILE_DTYPE: Record<number, SafetensorsDType> = { [T.FLOAT]: 'F32', [T.FLOAT16]: 'F16', [T.BFLOAT16]: 'BF16' };

/** Bump when the nodes written here change, so that old variant files are not reused. */
const VARIANT_FORMAT = 2;
/** Variant graph files kept per component folder (least recently used removed first). */
export const KEEP_VARIANT_FILES = 16;

export interface LoraSpec {
  /** The LoRA file. */
  path: string;
  scale: number;
}

export interface LoraGraphResult {
  /** The graph to load: the variant, or the base's own file when no weight changes (all scales 0). */
  path: string;
  reports: LoraReport[];
  /** Weights that get a delta. */
  changedWeights: number;
  /** "N LoRA modules match nothing in the unet: ..." per LoRA that has some. */
  unmatched: string[];
  /** Whether the variant file was written now (false: reused, or nothing to write). */
  written: boolean;
}

/** The initializers of a decoded graph as a WeightSource (names and shapes only: enough to match and check). */
class InitializerShapes implements WeightSource {
  readonly location: string;
  private readonly byName = new Map<string, OnnxTypes.ITensorProto>();

  constructor(
    readonly component: string,
    path: string,
    initializers: readonly OnnxTypes.ITensorProto[],
  ) {
    this.location = path;
    for (const t of initializers) if (t.name) this.byName.set(t.name, t);
  }

  lookup(key: string): WeightEntry | undefined {
    const t = this.byName.get(key);
    if (!t) return undefined;
    const location = this.location;
    return {
      shape: (t.dims ?? []).map(Number),
      dtype: FILE_DTYPE[t.dataType ?? 0] ?? 'F32',
      source: {
        kind: 'values',
        values: () => {
          throw new Error(`${location}: initializer values are not read here`);
        },
      },
    };
  }

  has(key: string): boolean {
    return this.byName.has(key);
  }

  keys(): string[] {
    return [...this.byName.keys()];
  }
}

/** Identity of a file's contents as far as it is cheap to know: size, modification time, inode. */
function fileStamp(path: string): string {
  const st = statSync(path);
  return `${st.size}:${st.mtimeMs}:${st.ino}`;
}

/** A LoRA file's identity: its size and safetensors header (a replaced file is a new key). */
function loraContentKey(lora: LoraFile): string {
  const h = createHash('sha256').update(`${lora.file.size}\n`);
  for (const t of [...lora.file.tensors.values()].sort((a, b) => a.begin - b.begin)) h.update(`${t.name}:${t.dtype}:${t.shape}:${t.begin}:${t.byteLength}\n`);
  h.update(statSync(lora.path).mtimeMs.toString());
  return h.digest('hex').slice(0, 16);
}

/**
 * The graph at `basePath` (a Kiln-built component graph) with `loras` applied, written beside it
 * as a variant file unless one with the same key exists. Throws a ModelLoadError for a LoRA of
 * another family or a module whose shapes do not fit.
 */
export function loraGraph(
  basePath: string,
  loras: readonly LoraSpec[],
  component: LoraComponent,
  options: { family?: ModelFamily } = {},
): LoraGraphResult {
  const bytes = readFileSync(basePath);
  const model = onnx.ModelProto.decode(bytes);
  const graph = model.graph;
  if (!graph) throw new ModelLoadError(`${basePath} has no graph`, basePath);
  const files = loras.map((l) => {
    assertNotPickle(l.path);
    return readLora(l.path);
  });
  const fused = withLoras(
    new InitializerShapes(component, basePath, graph.initializer ?? []),
    files.map((file, i) => ({ file, scale: loras[i]!.scale })),
    component,
    options,
  );
  const result = { reports: fused.reports, changedWeights: fused.changedWeights, unmatched: fused.unmatchedSummary() };
  if (fused.changedWeights === 0) return { ...result, path: basePath, written: false };

  const dir = dirname(basePath);
  const keys = files.map(loraContentKey);
  const key = createHash('sha256')
    .update(`kiln-lora-graph ${VARIANT_FORMAT}\n${component}\n${basename(basePath)}:${fileStamp(basePath)}\n${options.family ?? ''}\n`)
    .update(loras.map((l, i) => `${keys[i]}:${l.scale}`).join('\n'))
    .digest('hex')
    .slice(0, 16);
  const stem = basename(basePath).replace(/\.onnx$/, '');
  const variant = join(dir, `${stem}.lora-${key}.onnx`);
  if (existsSync(variant)) {
    const now = new Date();
    utimesSync(variant, now, now); // recently used: kept by the pruning below
    return { ...result, path: variant, written: false };
  }

  // Each LoRA file once in the folder, under a name that changes with its contents.
  const linked = files.map((lora, i) => linkInto(dir, lora.path, `lora-${keys[i]}.safetensors`));
  let counter = 0;
  const fresh = (what: string): string => `/kiln_lora/${what}_${counter++}`;
  const nodes: OnnxTypes.INodeProto[] = [];
  const added: OnnxTypes.ITensorProto[] = [];
  const node = (opType: string, inputs: string[], attrs: OnnxTypes.IAttributeProto[] = [], output = fresh(`${opType}_output`)): string => {
    nodes.push({ name: fresh(opType), opType, input: inputs, output: [output], attribute: attrs });
    return output;
  };
  const toFloat = (x: string, from: number): string => (from === T.FLOAT ? x : node('Cast', [x], [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: T.FLOAT }]));
  const constant = (name: string, dataType: number, dims: number[], raw: Uint8Array): string => {
    added.push({ name, dataType, dims, rawData: raw });
    return name;
  };
  const external = (lora: number, tensor: SafetensorsTensor, dims: number[]): { name: string; dataType: number } => {
    const dataType = DATA_TYPE[tensor.dtype];
    if (dataType === undefined) throw new ModelLoadError(`${files[lora]!.path}: LoRA tensor "${tensor.name}" has dtype ${tensor.dtype}, not F32, F16 or BF16`, files[lora]!.path);
    const name = fresh('lora_tensor');
    added.push({
      name,
      dataType,
      dims,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: linked[lora]! },
        { key: 'offset', value: String(tensor.begin) },
        { key: 'length', value: String(tensor.byteLength) },
      ],
    });
    return { name, dataType };
  };

  const initializers = new Map((graph.initializer ?? []).map((t) => [t.name!, t]));
  const INT = onnx.AttributeProto.AttributeType.INT;
  const FLOAT_ATTR = onnx.AttributeProto.AttributeType.FLOAT;
  for (const [weight, updates] of fused.plan) {
    const w = initializers.get(weight)!;
    const dims = (w.dims ?? []).map(Number);
    const wType = w.dataType ?? T.FLOAT;
    if (wType !== T.FLOAT && wType !== T.FLOAT16) throw new ModelLoadError(`${basePath}: weight "${weight}" is not float32 or float16`, basePath);
    const out = dims[0]!;
    const inner = dims.slice(1).reduce((a, b) => a * b, 1);
    // The stored weight, renamed and read as the [out, in·kh·kw] matrix it is (same bytes).
    const baseName = `${weight}/kiln_lora_base`;
    w.name = baseName;
    w.dims = [out, inner];
    let acc = toFloat(baseName, wType);
    for (const u of updates) {
      const i = files.indexOf(u.lora);
      const rank = u.module.rank;
      // up [out, r(, 1, 1)] and down [r, in(, kh, kw)] as matrices (same bytes).
      const up = external(i, u.module.up, [out, rank]);
      const down = external(i, u.module.down, [rank, inner]);
      // One Gemm per LoRA: factor · (up @ down) + W (PEFT's order: the product scaled, then added),
      // a single pass over the weight where MatMul, Mul and Add would take three.
      acc = node('Gemm', [toFloat(up.name, up.dataType), toFloat(down.name, down.dataType), acc], [
        { name: 'alpha', type: FLOAT_ATTR, f: u.factor },
        { name: 'beta', type: FLOAT_ATTR, f: 1 },
      ]);
    }
    if (wType === T.FLOAT16) acc = node('Cast', [acc], [{ name: 'to', type: INT, i: T.FLOAT16 }]);
    // The last node produces the weight's own name and shape, so its readers are unchanged.
    if (dims.length !== 2) node('Reshape', [acc, constant(fresh('shape'), T.INT64, [dims.length], new Uint8Array(BigInt64Array.from(dims.map(BigInt)).buffer))], [], weight);
    else nodes[nodes.length - 1]!.output = [weight];
  }
  // Nodes that read only initializers go first: the graph stays topologically sorted.
  graph.node = [...nodes, ...(graph.node ?? [])];
  graph.initializer = [...(graph.initializer ?? []), ...added];
  const encoded = onnx.ModelProto.encode(model).finish();
  const tmp = `${variant}.${randomBytes(4).toString('hex')}.tmp`; // threads of one process build too
  writeFileSync(tmp, encoded);
  renameSync(tmp, variant);
  pruneVariants(dir, stem, variant);
  return { ...result, path: variant, written: true };
}

/** Hard-links `path` into `dir` as `name` (a copy across filesystems: LoRA files are small). */
function linkInto(dir: string, path: string, name: string): string {
  const target = join(dir, name);
  if (!existsSync(target)) {
    const tmp = `${target}.${randomBytes(4).toString('hex')}.tmp`;
    try {
      linkSync(path, tmp);
    } catch {
      copyFileSync(path, tmp);
    }
    renameSync(tmp, target);
  }
  return name;
}

/** Keeps the KEEP_VARIANT_FILES most recently used variant files of a graph, and the LoRA links they read. */
function pruneVariants(dir: string, stem: string, keep: string): void {
  const prefix = `${stem}.lora-`;
  const variants = readdirSync(dir)
    .filter((f) => f.startsWith(prefix) && f.endsWith('.onnx'))
    .map((f) => ({ f, t: statSync(join(dir, f)).mtimeMs }))
    .sort((a, b) => b.t - a.t);
  const removed = variants.slice(KEEP_VARIANT_FILES).filter((v) => join(dir, v.f) !== keep);
  if (removed.length === 0) return;
  for (const v of removed) rmSync(join(dir, v.f), { force: true });
  // LoRA links no remaining variant reads (any graph of the folder may share them).
  const graphs = readdirSync(dir).filter((f) => /\.lora-[0-9a-f]+\.onnx$/.test(f));
  const used = new Set<string>();
  for (const g of graphs) {
    const text = readFileSync(join(dir, g)).toString('latin1');
    for (const m of text.matchAll(/lora-[0-9a-f]{16}\.safetensors/g)) used.add(m[0]);
  }
  for (const f of readdirSync(dir)) if (/^lora-[0-9a-f]{16}\.safetensors$/.test(f) && !used.has(f)) rmSync(join(dir, f), { force: true });
}
