/**
 * The engine facade: resolves model names, keeps loaded models (their sessions) by folder, and
 * runs generations on them. Models are leased (`lease`) by whoever runs on them; at most
 * `maxModels` stay loaded (default: no bound), the least recently used idle one unloaded first,
 * and with `unloadAfterMs` one unused that long goes too, never one a request runs on;
 * `model()` loads one for the engine's life. A diffusers folder
 * with safetensors weights (or a single-file checkpoint, src/graphs/checkpoint.ts) is first
 * built into ONNX graphs (once, cached: src/graphs/cache.ts).
 *
 * LoRAs: a model runs with the LoRAs its kiln.json lists (`"loras": [{"name", "scale"}]`),
 * plus those a request's prompt names (`<lora:NAME:SCALE>`, src/engine/loras.ts), plus those
 * `model(name, { loras })` is given. Each set is a variant whose UNet / text encoder graphs fold
 * the LoRAs in (src/graphs/lora-graph.ts); variants are kept in an LRU cache of
 * `loraCacheSize` (default 2; commands pass $KILN_LORA_CACHE) beside the base models. A variant's other
 * UNets (ControlNet-UNet, image-prompt UNets) fold in the same LoRAs when used (model.withLoras).
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { DiffusionModel, isSafetensorsLayout } from './model.js';
import { builtinModelsDir, isModelPath, locateModel } from './locate.js';
import { InvalidOptionError, ModelLoadError } from './errors.js';
import { attachLoras, isValidLoraName, mergeLoras, type AppliedLora, type LoraLease } from './loras.js';
import { LeaseCache, type FreeReason } from './lease-cache.js';
import { OnnxModel } from './onnx.js';
import { BUILD_INFO, ensureBuilt } from '../graphs/cache.js';
import { readKilnJson } from '../graphs/checkpoint.js';
import { syncSettingsFile, type GraphDtype } from '../graphs/convert.js';
import { loraGraph } from '../graphs/lora-graph.js';
import { LoraMismatchError, type LoraComponent } from '../graphs/lora.js';
import { generate, type GenerateOptions, type GenerateResult } from './pipeline.js';
import type { Device } from './onnx.js';

export interface EngineOptions {
  device?: Device;
  /**
   * Folders to look model names up in (default: the models shipped with Kiln). The engine reads
   * no environment and assumes no home: callers pass every folder (src/catalog/ resolves them).
   */
  searchDirs?: string[];
  /** Kiln's home: where the tiny preview decoders are (<home>/previews/); without it previews use the linear map. */
  home?: string;
  /** Where graphs built from safetensors folders are kept; loading such a folder without it is an error naming this option. */
  cacheDir?: string;
  /** Precision of graphs built from safetensors (default: fp16 on CUDA, fp32 on CPU). */
  dtype?: GraphDtype;
  /** Where LoRA names are looked up: `<lorasDir>/<name>.safetensors`; naming a LoRA without it is an error naming this option. */
  lorasDir?: string;
  /** LoRA variants kept loaded beside the base models (default 2). */
  loraCacheSize?: number;
  /** Models kept loaded, idle ones unloaded least recently used first (default: no bound); a model in use is never unloaded. */
  maxModels?: number;
  /** Models nobody has used for this long are unloaded (default: never). */
  unloadAfterMs?: number;
  /** Told each time a model has loaded (the name it was loaded under), for the logs and /ping. */
  onLoad?: (model: string) => void;
  /** Told each time the cache unloads a model (the name it was loaded under) and why, for the logs (not when the engine closes). */
  onUnload?: (model: string, why: UnloadReason) => void;
  /** The share of a run's time tiny-decoder previews may take (default 0.05; see preview.ts withinBudget). */
  previewBudget?: number;
  /** Progress of a graph build (first use of a safetensors folder). */
  onBuildProgress?: (event: { model: string; component: string; done: number; total: number }) => void;
  /** Things people should know that do not stop a load (LoRA modules matching nothing, unused checkpoint tensors). */
  onWarning?: (message: string) => void;
}

/** Where a set of LoRAs comes from, for messages and for which error a problem is. */
type LoraOrigin = 'prompt' | 'kiln.json' | 'option';

/** A LoRA resolved to its file. */
interface ResolvedLora extends AppliedLora {
  path: string;
}

interface LoadedModel {
  /** The cache key: the folder and its version (folderVersion). */
  key: string;
  /** The folder the name resolved to (where kiln.json is read). */
  dir: string;
  /** The ONNX folder the sessions come from (`dir`, or its build in the cache). */
  onnxDir: string;
  base: DiffusionModel;
  /** Whether Kiln built the graphs (LoRAs match their weight names; exported graphs have others). */
  kilnBuilt: boolean;
  /** kiln.json's LoRAs. */
  defaults: AppliedLora[];
  /** The variant with the defaults, held for the life of the entry. */
  defaultVariant?: Promise<LoraLease>;
}

const LORA_COMPONENTS: readonly [LoraComponent, 'unet' | 'textEncoder' | 'textEncoder2'][] = [
  ['unet', 'unet'],
  ['text_encoder', 'textEncoder'],
  ['text_encoder_2', 'textEncoder2'],
];

export class Engine {
  readonly device: Device;
  readonly searchDirs: string[];
  readonly cacheDir: string | undefined;
  readonly dtype: GraphDtype;
  readonly lorasDir: string | undefined;
  readonly home: string | undefined;
  readonly previewBudget: number | undefined;
  /** How long a model may go unused before it is unloaded (Infinity: never). */
  readonly unloadAfterMs: number;
  private readonly onBuildProgress: EngineOptions['onBuildProgress'];
  private readonly warn: (message: string) => void;
  /** By folder and folderVersion (LeaseCache.acquireCurrent): a replaced folder is another entry. */
  private readonly models: LeaseCache<LoadedModel>;
  /** LoRA variants, keyed by `${their model's key}\n${LoRA stamps}`. */
  private readonly variants: LeaseCache<{ model: DiffusionModel; release(): Promise<void> }>;
  /** Leases of `model()` callers (one per model they were given), released when the engine closes. */
  private readonly held = new Map<DiffusionModel, ModelLease>();
  private readonly onUnload: EngineOptions['onUnload'];
  private readonly onLoad: EngineOptions['onLoad'];
  private readonly unloadListeners: ((model: DiffusionModel) => void)[] = [];

  constructor(options: EngineOptions = {}) {
    this.device = options.device ?? 'cpu';
    this.home = options.home;
    this.searchDirs = options.searchDirs ?? [builtinModelsDir()];
    this.cacheDir = options.cacheDir;
    this.dtype = options.dtype ?? (this.device === 'cuda' ? 'fp16' : 'fp32');
    this.lorasDir = options.lorasDir === undefined ? undefined : resolve(options.lorasDir);
    this.previewBudget = options.previewBudget;
    this.variants = new LeaseCache(options.loraCacheSize ?? 2, (v) => v.release());
    this.unloadAfterMs = options.unloadAfterMs ?? Infinity;
    this.models = new LeaseCache(options.maxModels ?? Infinity, (m, why) => this.unload(m, why), this.unloadAfterMs);
    this.onUnload = options.onUnload;
    this.onLoad = options.onLoad;
    this.onBuildProgress = options.onBuildProgress;
    this.warn = options.onWarning ?? ((m) => process.stderr.write(`kiln: warning: ${m}\n`));
  }

  /**
   * A model, loaded on first use (by folder) and the same instance afterwards until the folder
   * is replaced (a re-pull swaps the files under the same name) or its kiln.json changes: then
   * it is loaded afresh (the old one unloaded once nobody runs on it). With kiln.json LoRAs (or
   * `options.loras`, added to them) the model is the variant that applies them. It stays loaded
   * until `release()`: then it may be unloaded to keep within `maxModels`, or once unused for
   * `unloadAfterMs`.
   */
  async lease(nameOrPath: string, options: { loras?: readonly AppliedLora[]; name?: string } = {}): Promise<ModelLease> {
    for (const l of options.loras ?? []) this.resolveLora(l, 'option'); // an unknown name fails before any load
    const dir = locateModel(nameOrPath, this.searchDirs, { cacheDir: this.cacheDir });
    const name = options.name ?? (isModelPath(nameOrPath) ? basename(dir) : nameOrPath);
    // A replaced folder's old entry goes (freed once no request runs on it).
    const held = await this.models.acquireCurrent(dir, folderVersion(dir), (key) => this.loadFolder(key, dir, name));
    const loaded = held.value;
    try {
      if (options.loras?.length) {
        const variant = await this.acquire(loaded, mergeLoras(loaded.defaults, options.loras), 'option');
        return { model: variant.model, release: once(() => (variant.release(), held.release())) };
      }
      const model = loaded.defaultVariant ? (await loaded.defaultVariant).model : loaded.base;
      return { model, release: once(held.release) };
    } catch (err) {
      held.release();
      throw err;
    }
  }

  /** `lease` for the engine's life: the model is never unloaded (the engine closes it). */
  async model(nameOrPath: string, options: { loras?: readonly AppliedLora[]; name?: string } = {}): Promise<DiffusionModel> {
    const lease = await this.lease(nameOrPath, options);
    if (this.held.has(lease.model)) lease.release();
    else this.held.set(lease.model, lease);
    return lease.model;
  }

  /** Models loaded now (in use or kept in the cache). */
  get loadedModels(): number {
    return this.models.size;
  }

  /** `listener` is told each base model the cache unloads, after its sessions are released (for caches of things made from it). */
  onModelUnloaded(listener: (model: DiffusionModel) => void): void {
    this.unloadListeners.push(listener);
  }

  private async loadFolder(key: string, dir: string, name: string): Promise<LoadedModel> {
    const settings = readKilnJson(dir);
    const onnxDir = await this.onnxFolder(dir);
    const base = await DiffusionModel.load(onnxDir, { device: this.device, name });
    const loaded: LoadedModel = { key, dir, onnxDir, base, kilnBuilt: existsSync(join(onnxDir, BUILD_INFO)), defaults: settings?.loras ?? [] };
    attachLoras(base, [], (tags) => this.acquire(loaded, mergeLoras(loaded.defaults, tags), 'prompt'));
    if (loaded.defaults.length) {
      loaded.defaultVariant = this.acquire(loaded, loaded.defaults, 'kiln.json');
      try {
        await loaded.defaultVariant;
      } catch (err) {
        await base.release();
        throw err;
      }
    }
    this.onLoad?.(name);
    return loaded;
  }

  /** Frees a model the cache let go of: its kiln.json variant, its other LoRA variants (idle: no request runs on the model), its sessions. */
  private async unload(loaded: LoadedModel, why: FreeReason): Promise<void> {
    try {
      (await loaded.defaultVariant?.catch(() => undefined))?.release();
      await this.variants.evict((k) => k.startsWith(`${loaded.key}\n`));
      await loaded.base.release();
      for (const listener of this.unloadListeners) listener(loaded.base);
      if (why !== 'cleared') this.onUnload?.(loaded.base.name, why === 'evicted' ? 'replaced' : why);
    } catch (err) {
      this.warn(`${loaded.base.name}: unloading failed: ${(err as Error).message}`);
    }
  }

  /** The folder to load: `dir` itself, or the graphs built from it when it holds safetensors. */
  private async onnxFolder(dir: string): Promise<string> {
    if (!isSafetensorsLayout(dir)) return dir;
    if (this.cacheDir === undefined) {
      throw new ModelLoadError(`${dir} holds safetensors weights, which Kiln builds into ONNX graphs under a cache folder: pass the Engine's cacheDir option`, dir);
    }
    const model = basename(dir);
    const built = await ensureBuilt(dir, {
      cacheDir: this.cacheDir,
      dtype: this.dtype,
      onProgress: (e) => this.onBuildProgress?.({ model, ...e }),
      onWarning: this.warn,
    });
    // Generation defaults may change without a rebuild (the build key leaves them out).
    syncSettingsFile(dir, built);
    return built;
  }

  /**
   * `<lorasDir>/<name>.safetensors`, or an error naming the LoRA and what is installed: an
   * InvalidOptionError for what a request or command asked, a ModelLoadError for a model's kiln.json.
   */
  private resolveLora(lora: AppliedLora, origin: LoraOrigin): ResolvedLora {
    const param = origin === 'prompt' ? 'prompt' : 'lora';
    const where = origin === 'kiln.json' ? "the model's kiln.json" : origin === 'prompt' ? 'the prompt' : '--lora';
    const fail = (message: string): never => {
      throw origin === 'kiln.json' ? new ModelLoadError(message) : new InvalidOptionError(message, param);
    };
    if (!isValidLoraName(lora.name)) fail(`"${lora.name}" (in ${where}) is not a LoRA name: letters, digits, . _ + -, without .safetensors`);
    if (!Number.isFinite(lora.scale)) fail(`LoRA "${lora.name}" (in ${where}) has scale ${lora.scale}, not a number`);
    const lorasDir = this.lorasDir;
    if (lorasDir === undefined) {
      // How the engine was set up, not what was asked: the same error whoever named the LoRA.
      throw new ModelLoadError(`LoRA "${lora.name}" (in ${where}) cannot be looked up: this Engine was given no lorasDir option (the folder of <name>.safetensors LoRAs)`);
    }
    const path = join(lorasDir, `${lora.name}.safetensors`);
    if (!existsSync(path) || !statSync(path).isFile()) {
      // A request is told the names it may use, not where the server keeps them.
      const installed = existsSync(lorasDir) ? readdirSync(lorasDir).filter((f) => f.endsWith('.safetensors')).map((f) => f.slice(0, -'.safetensors'.length)).filter(isValidLoraName).sort() : [];
      const names = installed.length ? `installed LoRAs: ${installed.slice(0, 20).join(', ')}${installed.length > 20 ? ', ...' : ''}` : 'no LoRAs are installed';
      fail(
        origin === 'prompt'
          ? `unknown LoRA "${lora.name}" in the prompt (${names})`
          : `unknown LoRA "${lora.name}" (in ${where}): there is no ${lora.name}.safetensors in ${lorasDir} (${names}; install one with \`kiln import --lora FILE --name ${lora.name}\`)`,
      );
    }
    return { ...lora, path };
  }

  /** A lease on the variant of `loaded` with `loras` (all resolved first: an unknown name fails before any build). */
  private acquire(loaded: LoadedModel, loras: readonly AppliedLora[], origin: LoraOrigin): Promise<LoraLease> {
    let resolved: ResolvedLora[];
    try {
      resolved = loras.map((l) => this.resolveLora(l, origin));
    } catch (err) {
      return Promise.reject(err);
    }
    if (!loaded.kilnBuilt) {
      const message = `model ${loaded.base.name} is an ONNX export, whose graphs do not carry the weight names LoRAs are matched against; LoRAs apply to models Kiln builds from safetensors (a diffusers folder or a single-file checkpoint)`;
      return Promise.reject(origin === 'kiln.json' ? new ModelLoadError(message) : new InvalidOptionError(message, origin === 'prompt' ? 'prompt' : 'lora'));
    }
    const stamps = resolved.map((l) => {
      const st = statSync(l.path);
      return `${l.name}:${l.scale}:${st.size}:${st.mtimeMs}:${st.ino}`;
    });
    // Per loaded entry: a variant shares its base model's sessions, so it goes with them.
    const key = `${loaded.key}\n${stamps.join('\n')}`;
    return this.variants.acquire(key, () => this.buildVariant(loaded, resolved, origin)).then((l) => ({ model: l.value.model, release: l.release }));
  }

  private async buildVariant(loaded: LoadedModel, loras: ResolvedLora[], origin: LoraOrigin) {
    const { base, onnxDir } = loaded;
    const specs = loras.map((l) => ({ path: l.path, scale: l.scale }));
    const replaced: Partial<Record<'unet' | 'textEncoder' | 'textEncoder2', OnnxModel>> = {};
    const matched = loras.map(() => 0);
    try {
      for (const [component, field] of LORA_COMPONENTS) {
        const session = base[field];
        if (!session) continue;
        const graph = join(onnxDir, component, 'model.onnx');
        let result;
        try {
          result = loraGraph(graph, specs, component, { family: base.layout.family });
        } catch (err) {
          // A LoRA made for another model: the request's fault when the request named it.
          if (err instanceof LoraMismatchError && origin !== 'kiln.json') throw new InvalidOptionError(err.message, origin === 'prompt' ? 'prompt' : 'lora');
          throw err;
        }
        result.reports.forEach((r, i) => (matched[i]! += r.matched.length));
        for (const line of result.unmatched) this.warn(`${base.name}: ${line}`);
        if (result.path !== graph) replaced[field] = await OnnxModel.load(result.path, onnxDir, { device: this.device, stats: base.stats });
      }
    } catch (err) {
      await Promise.all(Object.values(replaced).map((s) => s.release()));
      throw err;
    }
    loras.forEach((l, i) => {
      if (matched[i] === 0) this.warn(`${base.name}: LoRA "${l.name}" (${l.path}) matches no module of the model; it changes nothing`);
    });
    // The model's other UNet graphs (its ControlNet-UNet, image-prompt UNets: the same weight
    // names, plus residual inputs or adapter layers) get the same LoRAs when a request uses them.
    const family = base.layout.family;
    const model = base.withSessions(replaced, (graph) => loraGraph(graph, specs, 'unet', { family }).path);
    const applied = loras.map(({ name, scale }) => ({ name, scale }));
    attachLoras(model, applied, (tags) => this.acquire(loaded, mergeLoras(applied, tags), 'prompt'));
    return { model, release: () => model.release() };
  }

  /** LoRA variants loaded now (in use or kept in the cache). */
  get loraVariants(): number {
    return this.variants.size;
  }

  async generate(nameOrPath: string, options: GenerateOptions): Promise<GenerateResult> {
    const { model, release } = await this.lease(nameOrPath);
    try {
      return await generate(model, options);
    } finally {
      release();
    }
  }

  async close(): Promise<void> {
    for (const lease of this.held.values()) lease.release();
    this.held.clear();
    await this.models.clear();
    await this.variants.clear();
  }
}

/** Why a model was unloaded: to keep within maxModels, idle past unloadAfterMs, or its folder replaced (a re-pull). */
export type UnloadReason = 'capacity' | 'idle' | 'replaced';

/** A model held until `release()` (see Engine.lease); releasing twice is harmless. */
export interface ModelLease {
  model: DiffusionModel;
  release(): void;
}

function once(fn: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    fn();
  };
}

/** Identity of a folder's current contents: its index file's and kiln.json's inode and modification time. */
function folderVersion(dir: string): string {
  const stamp = (file: string): string => {
    try {
      const st = statSync(join(dir, file));
      return `${st.ino}:${st.mtimeMs}`;
    } catch {
      return 'missing';
    }
  };
  return `${stamp('model_index.json')}/${stamp('kiln.json')}`;
}
