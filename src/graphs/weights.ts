/**
 * Weights as the model pages ask for them: `p.get('conv_in.weight', [320, 4, 3, 3])` returns the
 * name of a graph initializer holding that tensor, after checking that the weights have it with
 * exactly the shape the config implies. The page, not the file, decides what is needed, so a
 * missing key or a wrong shape is one ModelLoadError naming the component, the key and both
 * shapes, raised while the graph is built (before any session exists).
 *
 * A WeightSource says where tensors come from: a component folder's safetensors files (single,
 * fp16 variant, or sharded with an index), or seeded random values of whatever shape is asked for
 * (full-size architectures without a download: parameter counts and benchmarks).
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ModelLoadError } from '../engine/errors.js';
import { hashString, uniformValues, type GraphBuilder, type TensorSource } from './onnx-builder.js';
import { FLOAT_DTYPES, openSafetensors, type SafetensorsDType, type SafetensorsFile } from './safetensors.js';

export interface WeightEntry {
  shape: number[];
  dtype: SafetensorsDType;
  source: TensorSource;
}

export interface WeightSource {
  /** Component name for messages (`unet`, `text_encoder_2`, ...). */
  readonly component: string;
  /** Where the weights are (folder or file), for messages. */
  readonly location: string;
  /** The tensor stored under `key`; `shape` is what the caller expects (random sources use it). */
  lookup(key: string, shape: readonly number[]): WeightEntry | undefined;
  /** Whether a tensor is stored under `key` (random sources: always). */
  has(key: string): boolean;
  /** Every stored key (random sources: none). */
  keys(): string[];
}

const SOURCE_DTYPE: Partial<Record<SafetensorsDType, 'float32' | 'float16' | 'bfloat16'>> = {
  F32: 'float32',
  F16: 'float16',
  BF16: 'bfloat16',
};

/** Tensors of one or more safetensors files, under their stored names (optionally re-keyed). */
export class SafetensorsWeights implements WeightSource {
  private readonly entries = new Map<string, { file: SafetensorsFile; name: string }>();

  constructor(
    readonly component: string,
    readonly location: string,
    readonly files: SafetensorsFile[],
    /** Maps a stored name to the name pages ask for (undefined: drop the tensor). */
    rename: (stored: string) => string | undefined = (s) => s,
  ) {
    for (const file of files) {
      for (const name of file.tensors.keys()) {
        const key = rename(name);
        if (key === undefined) continue;
        if (this.entries.has(key)) {
          throw new ModelLoadError(`${component}: weight "${key}" is stored twice (${file.path} and ${this.entries.get(key)!.file.path})`, file.path);
        }
        this.entries.set(key, { file, name });
      }
    }
  }

  lookup(key: string): WeightEntry | undefined {
    const hit = this.entries.get(key);
    if (!hit) return undefined;
    const t = hit.file.tensors.get(hit.name)!;
    const dtype = SOURCE_DTYPE[t.dtype];
    if (!dtype) {
      throw new ModelLoadError(
        `${this.component}: weight "${key}" in ${hit.file.path} has dtype ${t.dtype}; weights must be one of ${FLOAT_DTYPES.join(', ')}`,
        hit.file.path,
      );
    }
    return { shape: t.shape, dtype: t.dtype, source: { kind: 'file', path: hit.file.path, dtype, begin: t.begin, byteLength: t.byteLength } };
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  keys(): string[] {
    return [...this.entries.keys()];
  }
}

/** Weight file names diffusers and transformers write, by precision variant. */
const WEIGHT_FILE_NAMES = ['diffusion_pytorch_model', 'model'];

/**
 * The safetensors weights of a diffusers component folder (`unet/`, `text_encoder/`, ...):
 * `<name>[.<variant>].safetensors`, or the shards listed in `<name>[.<variant>].safetensors.index.json`
 * (diffusers itself names a variant's index `<name>.safetensors.index.<variant>.json`: both are read).
 * Without a variant the plain file is preferred, then the fp16 one.
 */
export function componentWeights(dir: string, component: string, variant?: string): SafetensorsWeights {
  const variants = variant ? [variant] : [undefined, 'fp16'];
  for (const v of variants) {
    for (const base of WEIGHT_FILE_NAMES) {
      const stem = v ? `${base}.${v}.safetensors` : `${base}.safetensors`;
      const single = join(dir, stem);
      if (existsSync(single)) return new SafetensorsWeights(component, dir, [openSafetensors(single)]);
      const indexNames = v ? [`${stem}.index.json`, `${base}.safetensors.index.${v}.json`] : [`${stem}.index.json`];
      const index = indexNames.map((n) => join(dir, n)).find((p) => existsSync(p));
      if (index) return new SafetensorsWeights(component, dir, shardFiles(index, dir, component).map(openSafetensors));
    }
  }
  const present = existsSync(dir) ? readdirSync(dir).join(', ') : 'the folder does not exist';
  throw new ModelLoadError(`${component}: no safetensors weights in ${dir} (found: ${present || 'nothing'})`, dir);
}

function shardFiles(indexPath: string, dir: string, component: string): string[] {
  let index: unknown;
  try {
    index = JSON.parse(readFileSync(indexPath, 'utf8'));
  } catch {
    throw new ModelLoadError(`${component}: ${indexPath} is not JSON`, indexPath);
  }
  const map = index && typeof index === 'object' ? (index as { weight_map?: unknown }).weight_map : undefined;
  if (!map || typeof map !== 'object' || Array.isArray(map)) throw new ModelLoadError(`${component}: ${indexPath} has no weight_map object`, indexPath);
  const files = [...new Set(Object.values(map as Record<string, unknown>))];
  // An empty map would give a component with no weights and a confusing "no key" error later.
  if (files.length === 0) throw new ModelLoadError(`${component}: ${indexPath} lists no shards`, indexPath);
  for (const f of files) {
    if (typeof f !== 'string') throw new ModelLoadError(`${component}: ${indexPath} has a weight_map value that is not a file name: ${JSON.stringify(f)}`, indexPath);
    if (f.includes('/') || f.includes('\\') || f.startsWith('.')) {
      throw new ModelLoadError(`${component}: ${indexPath} names a shard outside its folder: ${String(f)}`, indexPath);
    }
    if (!existsSync(join(dir, f))) throw new ModelLoadError(`${component}: shard ${f} listed in ${indexPath} is missing`, indexPath);
  }
  return (files as string[]).sort().map((f) => join(dir, f));
}

/**
 * Seeded random weights of whatever shape a page asks for: the real architectures at full size
 * without a download. Values ~ U(-s, s) with s = 1/sqrt(fan_in) (norm scales near 1), which keeps
 * activations finite through deep stacks.
 */
export class RandomWeights implements WeightSource {
  readonly location = 'random weights';
  constructor(
    readonly component: string,
    readonly seed = 0,
  ) {}

  lookup(key: string, shape: readonly number[]): WeightEntry {
    const count = shape.reduce((a, b) => a * b, 1);
    const fanIn = shape.length > 1 ? shape.slice(1).reduce((a, b) => a * b, 1) : 0;
    const isNormScale = shape.length === 1 && /\.weight$/.test(key) && /norm|(^|\.)ln/.test(key);
    const seed = (hashString(`${this.component}/${key}`) ^ this.seed) >>> 0;
    const values = (): Float32Array => {
      if (!isNormScale) return uniformValues(count, fanIn > 0 ? 1 / Math.sqrt(fanIn) : 0.02, seed);
      const out = uniformValues(count, 0.02, seed);
      for (let i = 0; i < count; i++) out[i]! += 1;
      return out;
    };
    return { shape: [...shape], dtype: 'F32', source: { kind: 'values', values } };
  }

  has(): boolean {
    return true;
  }

  keys(): string[] {
    return [];
  }
}

/**
 * RandomWeights that records each weight a page asks for with its shape: the full weight list
 * of a config (what a real checkpoint of it holds), no file needed.
 */
export class RecordingWeights extends RandomWeights {
  readonly shapes = new Map<string, number[]>();

  override lookup(key: string, shape: readonly number[]): WeightEntry {
    this.shapes.set(key, [...shape]);
    return super.lookup(key, shape);
  }
}

/** Shared state of a component's Params views: what was used, and how many parameters. */
interface ParamsState {
  /** Key -> the shape it was taken with. */
  used: Map<string, readonly number[]>;
  count: number;
}

/**
 * A page's view of a component's weights, bound to the graph being built. `at(prefix)` gives
 * the view of a submodule (`p.at('down_blocks.0.resnets.1')`), like torch's module paths.
 */
export class Params {
  private constructor(
    private readonly g: GraphBuilder,
    readonly source: WeightSource,
    private readonly prefix: string,
    private readonly state: ParamsState,
  ) {}

  static of(g: GraphBuilder, source: WeightSource): Params {
    return new Params(g, source, '', { used: new Map(), count: 0 });
  }

  /** The view of a submodule: keys are prefixed with `prefix.`. */
  at(prefix: string | number): Params {
    return new Params(this.g, this.source, this.key(String(prefix)), this.state);
  }

  private key(name: string): string {
    return this.prefix ? `${this.prefix}.${name}` : name;
  }

  has(name: string): boolean {
    return this.source.has(this.key(name));
  }

  /** The initializer holding weight `name` of exactly `shape`; the same name twice is the same tensor. */
  get(name: string, shape: readonly number[]): string {
    const key = this.key(name);
    const { component, location } = this.source;
    const taken = this.state.used.get(key);
    if (taken) {
      // Same tensor again; a different shape is a page bug that would otherwise pass silently.
      if (!sameShape(taken, shape)) {
        throw new ModelLoadError(`${component}: weight "${key}" is asked for as [${shape.join(', ')}] after [${taken.join(', ')}]`, location);
      }
      return key;
    }
    const entry = this.source.lookup(key, shape);
    if (!entry) {
      throw new ModelLoadError(`${component}: the weights in ${location} have no "${key}" (config.json implies shape [${shape.join(', ')}])`, location);
    }
    if (!sameShape(entry.shape, shape)) {
      throw new ModelLoadError(
        `${component}: weight "${key}" in ${location} has shape [${entry.shape.join(', ')}] but config.json implies [${shape.join(', ')}]`,
        location,
      );
    }
    this.state.used.set(key, [...shape]);
    this.state.count += shape.reduce((a, b) => a * b, 1);
    return this.g.deferredInitializer(key, 'float32', shape, entry.source);
  }

  /** Number of parameters the graph has taken so far. */
  get parameterCount(): number {
    return this.state.count;
  }

  /** Stored keys the graph did not use (ignored buffers such as CLIP's position_ids, or a mismatch). */
  unusedKeys(): string[] {
    return this.source.keys().filter((k) => !this.state.used.has(k));
  }
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}
