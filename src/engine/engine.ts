/**
 * The engine facade: resolves model names, keeps one loaded model (its sessions) per folder
 * and device for the life of the process, and runs generations on them.
 */
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { DiffusionModel } from './model.js';
import { isModelPath, locateModel, modelSearchDirs } from './locate.js';
import { generate, type GenerateOptions, type GenerateResult } from './pipeline.js';
import type { Device } from './onnx.js';

export interface EngineOptions {
  device?: Device;
  /** Folders to look model names up in (default: $KILN_HOME/models, then the built-in models). */
  searchDirs?: string[];
}

export class Engine {
  readonly device: Device;
  readonly searchDirs: string[];
  private readonly models = new Map<string, { version: string; loading: Promise<DiffusionModel> }>();

  constructor(options: EngineOptions = {}) {
    this.device = options.device ?? 'cpu';
    this.searchDirs = options.searchDirs ?? modelSearchDirs();
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
    const loading = DiffusionModel.load(dir, { device: this.device, name });
    // A failed load is not cached, so a fixed folder can be retried without a restart.
    loading.catch(() => {
      if (this.models.get(dir)?.loading === loading) this.models.delete(dir);
    });
    this.models.set(dir, { version, loading });
    return loading;
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
