/**
 * The engine facade: resolves model names, keeps one loaded model (its sessions) per folder
 * and device for the life of the process, and runs generations on them. A diffusers folder
 * with safetensors weights is first built into ONNX graphs (once, cached: src/graphs/cache.ts).
 */
import { statSync } from 'node:fs';
import { basename, join } from 'node:path';
import { DiffusionModel, isSafetensorsLayout } from './model.js';
import { isModelPath, kilnHome, locateModel, modelSearchDirs } from './locate.js';
import { ensureBuilt } from '../graphs/cache.js';
import type { GraphDtype } from '../graphs/convert.js';
import { generate, type GenerateOptions, type GenerateResult } from './pipeline.js';
import type { Device } from './onnx.js';

export interface EngineOptions {
  device?: Device;
  /** Folders to look model names up in (default: $KILN_HOME/models, then the built-in models). */
  searchDirs?: string[];
  /** Where graphs built from safetensors folders are kept (default: $KILN_HOME/cache). */
  cacheDir?: string;
  /** Precision of graphs built from safetensors (default: fp16 on CUDA, fp32 on CPU). */
  dtype?: GraphDtype;
  /** Progress of a graph build (first use of a safetensors folder). */
  onBuildProgress?: (event: { model: string; component: string; done: number; total: number }) => void;
}

export class Engine {
  readonly device: Device;
  readonly searchDirs: string[];
  readonly cacheDir: string;
  readonly dtype: GraphDtype;
  private readonly onBuildProgress: EngineOptions['onBuildProgress'];
  private readonly models = new Map<string, { version: string; loading: Promise<DiffusionModel> }>();

  constructor(options: EngineOptions = {}) {
    this.device = options.device ?? 'cpu';
    this.searchDirs = options.searchDirs ?? modelSearchDirs();
    this.cacheDir = options.cacheDir ?? join(kilnHome(), 'cache');
    this.dtype = options.dtype ?? (this.device === 'cuda' ? 'fp16' : 'fp32');
    this.onBuildProgress = options.onBuildProgress;
  }

  /**
   * Loads a model once (by folder) and returns the same instance afterwards, until the folder
   * is replaced (a re-pull swaps the files under the same name): then it is loaded afresh.
   */
  model(nameOrPath: string): Promise<DiffusionModel> {
    const dir = locateModel(nameOrPath, this.searchDirs);
    const version = folderVersion(dir);
    const cached = this.models.get(dir);
    if (cached && cached.version === version) return cached.loading;
    // A replaced model's sessions are not released here: a request may still be running on
    // them. They are freed with the last reference.
    const name = isModelPath(nameOrPath) ? undefined : nameOrPath;
    const loading = this.onnxFolder(dir).then((onnxDir) =>
      DiffusionModel.load(onnxDir, { device: this.device, name: name ?? basename(dir) }),
    );
    // A failed load is not cached, so a fixed folder can be retried without a restart.
    loading.catch(() => {
      if (this.models.get(dir)?.loading === loading) this.models.delete(dir);
    });
    this.models.set(dir, { version, loading });
    return loading;
  }

  /** The folder to load: `dir` itself, or the graphs built from it when it holds safetensors. */
  private async onnxFolder(dir: string): Promise<string> {
    if (!isSafetensorsLayout(dir)) return dir;
    const model = basename(dir);
    return ensureBuilt(dir, {
      cacheDir: this.cacheDir,
      dtype: this.dtype,
      onProgress: (e) => this.onBuildProgress?.({ model, ...e }),
    });
  }

  async generate(nameOrPath: string, options: GenerateOptions): Promise<GenerateResult> {
    return generate(await this.model(nameOrPath), options);
  }

  async close(): Promise<void> {
    const loaded = await Promise.allSettled([...this.models.values()].map((m) => m.loading));
    this.models.clear();
    await Promise.all(loaded.map((r) => (r.status === 'fulfilled' ? r.value.release() : undefined)));
  }
}

/** Identity of a folder's current contents: its index file's inode and modification time. */
function folderVersion(dir: string): string {
  try {
    const st = statSync(join(dir, 'model_index.json'));
    return `${st.ino}:${st.mtimeMs}`;
  } catch {
    return 'missing';
  }
}
