/**
 * Finding a model folder from a name or path, in folders the caller gives. The engine reads no
 * environment and knows no home: where Kiln's models, aliases and caches live is the catalog's
 * business (src/catalog/home.ts, src/catalog/installed-models.ts), which passes folders in.
 */
import { existsSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ModelLoadError, ModelNotFoundError } from './errors.js';
import { assertNotPickle, fileModelFolder, isWeightsFilePath } from '../graphs/checkpoint.js';

/** The `models/` folder shipped with the package (kiln-tiny lives there). */
export function builtinModelsDir(): string {
  // src/engine/locate.ts and dist/engine/locate.js are both two levels below the package root.
  return resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'models');
}

export const isModelDir = (dir: string): boolean => existsSync(join(dir, 'model_index.json'));

/** Whether what a user typed is a path (has a separator, starts with '.', or names a weights file), not a name. */
export function isModelPath(nameOrPath: string): boolean {
  return /[\\/]/.test(nameOrPath) || nameOrPath.startsWith('.') || isWeightsFilePath(nameOrPath);
}

export interface LocateOptions {
  /** Where a single-file checkpoint's model folder is built; required to locate one. */
  cacheDir?: string;
  /** A name no search folder holds -> the folder it stands for (the catalog's aliases), if any. */
  alias?: (name: string) => string | undefined;
}

/**
 * Resolves a model name or path to a folder, or throws ModelNotFoundError. A single-file
 * checkpoint (`.safetensors`) becomes the model folder Kiln keeps for it under `cacheDir`
 * (src/graphs/checkpoint.ts); a pickle file is refused with the reason (ModelLoadError).
 */
export function locateModel(nameOrPath: string, searchDirs: readonly string[], options: LocateOptions = {}): string {
  const asPath = resolve(nameOrPath);
  if (isWeightsFilePath(nameOrPath) && existsSync(asPath) && statSync(asPath).isFile()) {
    assertNotPickle(asPath); // what is wrong with the file comes before what is missing from the call
    if (options.cacheDir === undefined) {
      throw new ModelLoadError(`${asPath} is a single-file checkpoint, built into a model folder under a cache folder: pass the cacheDir option`, asPath);
    }
    return fileModelFolder(asPath, options.cacheDir);
  }
  if (isModelPath(nameOrPath)) {
    if (existsSync(asPath)) return asPath;
    throw new ModelNotFoundError(`model folder ${asPath} does not exist`, nameOrPath);
  }
  for (const dir of searchDirs) {
    const candidate = join(dir, nameOrPath);
    if (isModelDir(candidate)) return candidate;
  }
  const aliased = options.alias?.(nameOrPath);
  if (aliased) return aliased;
  if (existsSync(asPath) && statSync(asPath).isDirectory()) return asPath;
  throw new ModelNotFoundError(
    `model "${nameOrPath}" is not installed (looked in ${searchDirs.join(', ')}); ` +
      `install it with \`kiln pull ${nameOrPath}\` or pass a model folder path`,
    nameOrPath,
  );
}
