/**
 * The engine facade: resolves model names, keeps one loaded model (its sessions) per folder
 * and device for the life of the process, and runs generations on them.
 */
import { DiffusionModel } from './model.js';
import { locateModel, modelSearchDirs } from './locate.js';
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
  private readonly models = new Map<string, Promise<DiffusionModel>>();

  constructor(options: EngineOptions = {}) {
    this.device = options.device ?? 'cpu';
    this.searchDirs = options.searchDirs ?? modelSearchDirs();
  }

  /** Loads a model once (by folder) and returns the same instance afterwards. */
  model(nameOrPath: string): Promise<DiffusionModel> {
    const dir = locateModel(nameOrPath, this.searchDirs);
    let loading = this.models.get(dir);
    if (!loading) {
      const name = /[\\/]/.test(nameOrPath) ? undefined : nameOrPath;
      loading = DiffusionModel.load(dir, { device: this.device, name });
      // A failed load is not cached, so a fixed folder can be retried without a restart.
      loading.catch(() => this.models.delete(dir));
      this.models.set(dir, loading);
    }
    return loading;
  }

  async generate(nameOrPath: string, options: GenerateOptions): Promise<GenerateResult> {
    return generate(await this.model(nameOrPath), options);
  }

  async close(): Promise<void> {
    const loaded = await Promise.allSettled(this.models.values());
    this.models.clear();
    await Promise.all(loaded.map((r) => (r.status === 'fulfilled' ? r.value.release() : undefined)));
  }
}
