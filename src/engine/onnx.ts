/**
 * One ONNX sub-model (text encoder, UNet, VAE part) behind a small typed wrapper.
 *
 * Real model files disagree on dtypes and ranks (int32 or int64 ids; int64, float32 or float16
 * timesteps of rank 0, 1 or B; fp16 or fp32 I/O), so nothing here is hard-coded: the wrapper
 * reads each input's declared type from the session and converts our float32/number feeds to
 * it, and converts every float output back to float32. Outputs are selected by name.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { basename, dirname, join, relative } from 'node:path';
import ort from 'onnxruntime-node';
import { DeviceUnavailableError, ModelLoadError } from './errors.js';
import { float16BitsToFloat32, float32ToFloat16Bits } from './float16.js';

export type Device = 'cpu' | 'cuda';

export interface TensorInfo {
  name: string;
  type: ort.Tensor.Type;
  /** Declared shape: numbers for fixed dims, strings (or -1) for symbolic ones; [] for scalars. */
  shape: ReadonlyArray<number | string>;
}

/** A float tensor on the JS side: always float32 here, whatever the graph uses. */
export interface FloatTensor {
  data: Float32Array;
  dims: number[];
}

/** What a caller may feed: float data (converted to the input's float type) or integer data. */
export type Feed =
  | { data: Float32Array; dims: number[] }
  | { ints: ArrayLike<number>; dims: number[] };

export interface RunStats {
  /** Milliseconds spent inside session.run, summed over all sub-models. */
  sessionRunMs: number;
  runs: number;
}

export interface SessionOptions {
  device?: Device;
  /** Shared counter of time spent in session.run, for benchmarks. */
  stats?: RunStats;
  /** Threads per session for one operator; default: what setSessionThreads set, else ONNX Runtime's (one per physical core). */
  intraOpThreads?: number;
}

let defaultIntraOpThreads = 0;

/**
 * Threads each session made from now on in this JS thread uses for one operator (0: ONNX
 * Runtime's default, one per physical core). A process that runs several inference threads
 * sets it so that together they fit the cores: every session has its own pool, and N threads at
 * the default would each start one thread per core (kiln-tiny, 2 cores, --workers 2:
 * 5.0-5.3 images/s at the default, 5.8-6.4 with one thread each).
 */
export function setSessionThreads(threads: number): void {
  if (!Number.isInteger(threads) || threads < 0) throw new RangeError('session threads must be an integer >= 0');
  defaultIntraOpThreads = threads;
}

export class OnnxModel {
  readonly inputs: ReadonlyMap<string, TensorInfo>;
  readonly outputs: ReadonlyMap<string, TensorInfo>;

  private constructor(
    /** Path relative to the model folder, for messages (`unet/model.onnx`). */
    readonly label: string,
    private readonly session: ort.InferenceSession,
    private readonly stats: RunStats | undefined,
  ) {
    this.inputs = toInfoMap(session.inputMetadata);
    this.outputs = toInfoMap(session.outputMetadata);
  }

  static async load(path: string, modelRoot: string, options: SessionOptions = {}): Promise<OnnxModel> {
    const label = relative(modelRoot, path) || basename(path);
    if (!existsSync(path)) {
      throw new ModelLoadError(`missing file ${label} in model folder ${modelRoot}`, path);
    }
    return OnnxModel.create(path, label, path, options);
  }

  /** A session from graph bytes held in memory (a patched graph without external data). */
  static fromBytes(bytes: Uint8Array, label: string, sourcePath: string, options: SessionOptions = {}): Promise<OnnxModel> {
    return OnnxModel.create(bytes, label, sourcePath, options);
  }

  private static async create(source: string | Uint8Array, label: string, path: string, options: SessionOptions): Promise<OnnxModel> {
    const device = options.device ?? 'cpu';
    if (device === 'cuda') assertCudaProviderInstalled();
    let session: ort.InferenceSession;
    const threads = options.intraOpThreads ?? defaultIntraOpThreads;
    try {
      const sessionOptions: ort.InferenceSession.SessionOptions = {
        executionProviders: device === 'cuda' ? ['cuda'] : ['cpu'],
        graphOptimizationLevel: 'all',
        ...(threads > 0 ? { intraOpNumThreads: threads } : {}),
        // Every session has its own intra-op pool, and by default its threads spin after each op
        // waiting for the next. A pipeline runs several sessions in turn beside HTTP, PNG encoding
        // and other worker threads, so spinning threads take the cores the next piece of work
        // needs. Measured with kiln-tiny (bench:server, 8 clients, 256x256): 3.41 -> 4.09 images/s
        // unbatched, 4.96 -> 5.49 batched, CPU per image 579 -> 386 ms; the same kernels run, so
        // the same bytes come out.
        extra: { session: { intra_op: { allow_spinning: '0' }, inter_op: { allow_spinning: '0' } } },
      };
      session =
        typeof source === 'string'
          ? await ort.InferenceSession.create(source, sessionOptions)
          : await ort.InferenceSession.create(source, sessionOptions);
    } catch (err) {
      const detail = firstLine(err);
      if (device === 'cuda' && /cuda|provider|backend/i.test(detail)) {
        throw new DeviceUnavailableError(
          `the CUDA execution provider is not available (${detail}). ${CUDA_HINT}`,
        );
      }
      throw new ModelLoadError(`cannot load ${label} from ${dirname(path)}: ${explainLoadFailure(detail, path)}`, path);
    }
    return new OnnxModel(label, session, options.stats);
  }

  hasInput(name: string): boolean {
    return this.inputs.has(name);
  }

  hasOutput(name: string): boolean {
    return this.outputs.has(name);
  }

  input(name: string): TensorInfo {
    const info = this.inputs.get(name);
    if (!info) throw new ModelLoadError(`${this.label} has no input named "${name}" (inputs: ${[...this.inputs.keys()].join(', ')})`);
    return info;
  }

  /** Names of outputs matching a pattern, e.g. /^hidden_states\.\d+$/. */
  outputNames(pattern: RegExp): string[] {
    return [...this.outputs.keys()].filter((n) => pattern.test(n));
  }

  /**
   * Runs the graph. Feeds are converted to each input's declared dtype; the outputs asked for
   * are returned as float32.
   */
  async run(feeds: Record<string, Feed>, outputNames: string[]): Promise<Record<string, FloatTensor>> {
    // A released native session must never be run (it would take the process down): a bug made loud.
    if (this.isReleased) throw new Error(`${this.label}: the session was released (its model was unloaded)`);
    const ortFeeds: Record<string, ort.Tensor> = {};
    for (const [name, feed] of Object.entries(feeds)) {
      ortFeeds[name] = toOrtTensor(this.input(name), feed);
    }
    for (const name of outputNames) {
      if (!this.outputs.has(name)) {
        throw new ModelLoadError(`${this.label} has no output named "${name}" (outputs: ${[...this.outputs.keys()].join(', ')})`);
      }
    }
    const started = performance.now();
    const result = await this.session.run(ortFeeds, outputNames);
    if (this.stats) {
      this.stats.sessionRunMs += performance.now() - started;
      this.stats.runs++;
    }
    const out: Record<string, FloatTensor> = {};
    for (const name of outputNames) {
      const tensor = result[name] as ort.Tensor;
      out[name] = { data: toFloat32(tensor), dims: [...tensor.dims] };
      tensor.dispose?.();
    }
    return out;
  }

  private isReleased = false;

  /** Whether release() was called (the sessions of an unloaded model). */
  get released(): boolean {
    return this.isReleased;
  }

  async release(): Promise<void> {
    if (this.isReleased) return;
    this.isReleased = true;
    await this.session.release();
  }
}

const CUDA_HINT =
  'Install it with `ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node` on a host with CUDA 12, or use --device cpu.';

/**
 * onnxruntime-node ships the CPU provider only; the CUDA provider library is fetched at install
 * time on GPU hosts. Checking for it first gives one clear error instead of ORT's loader noise.
 */
export function cudaProviderInstalled(): boolean {
  if (process.platform !== 'linux' && process.platform !== 'win32') return false;
  const binding = dirname(createRequire(import.meta.url).resolve('onnxruntime-node'));
  const lib = process.platform === 'win32' ? 'onnxruntime_providers_cuda.dll' : 'libonnxruntime_providers_cuda.so';
  const dir = join(binding, '..', 'bin', 'napi-v6', process.platform, process.arch);
  return existsSync(join(dir, lib));
}

function assertCudaProviderInstalled(): void {
  if (!cudaProviderInstalled()) {
    throw new DeviceUnavailableError(`the CUDA execution provider is not installed. ${CUDA_HINT}`);
  }
}

function toInfoMap(metadata: readonly ort.InferenceSession.ValueMetadata[]): Map<string, TensorInfo> {
  const map = new Map<string, TensorInfo>();
  for (const m of metadata) {
    if (m.isTensor) map.set(m.name, { name: m.name, type: m.type, shape: m.shape });
  }
  return map;
}

function toOrtTensor(info: TensorInfo, feed: Feed): ort.Tensor {
  const count = feed.dims.reduce((a, b) => a * b, 1);
  const values = 'data' in feed ? feed.data : feed.ints;
  if (values.length !== count) {
    throw new Error(`feed "${info.name}" has ${values.length} values for dims [${feed.dims}]`);
  }
  switch (info.type) {
    case 'float32':
      return new ort.Tensor('float32', 'data' in feed ? feed.data : Float32Array.from(feed.ints), feed.dims);
    case 'float16':
      return new ort.Tensor('float16', float32ToFloat16Bits('data' in feed ? feed.data : Float32Array.from(feed.ints)), feed.dims);
    case 'float64':
      return new ort.Tensor('float64', Float64Array.from(values), feed.dims);
    case 'int64': {
      const out = new BigInt64Array(count);
      for (let i = 0; i < count; i++) out[i] = BigInt(Math.trunc(values[i]!));
      return new ort.Tensor('int64', out, feed.dims);
    }
    case 'int32': {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) out[i] = Math.trunc(values[i]!);
      return new ort.Tensor('int32', out, feed.dims);
    }
    default:
      throw new ModelLoadError(`input "${info.name}" has unsupported type ${info.type}`);
  }
}

function toFloat32(tensor: ort.Tensor): Float32Array {
  switch (tensor.type) {
    case 'float32':
      // Copy: the native buffer may be reused or released by the session.
      return new Float32Array(tensor.data as Float32Array);
    case 'float16':
      return float16BitsToFloat32(tensor.data as Uint16Array);
    case 'float64':
      return Float32Array.from(tensor.data as Float64Array);
    default:
      throw new Error(`output has non-float type ${tensor.type}`);
  }
}

/**
 * Shape of a timestep feed as the graph declares it: rank 0 (`[]`), a fixed `[1]`, or one per
 * batch row (`[B]`, symbolic).
 */
export function timestepDims(info: TensorInfo, batch: number): number[] {
  if (info.shape.length === 0) return [];
  const first = info.shape[0];
  return typeof first === 'number' && first === 1 ? [1] : [batch];
}

function firstLine(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  return text.split('\n')[0]!.trim();
}

/** ORT's messages for missing external data are long; say which file was expected. */
function explainLoadFailure(detail: string, modelPath: string): string {
  const m = /(?:external data|initializer).*?(?:file|path)[^\w/.-]*([^\s'"]+)/i.exec(detail);
  if (m && !existsSync(join(dirname(modelPath), basename(m[1]!)))) {
    return `its external-data file ${basename(m[1]!)} is missing beside it (${detail})`;
  }
  return detail;
}
