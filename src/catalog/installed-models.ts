/**
 * Installed models and their aliases, under a home the caller names: the model folders'
 * entries, the aliases (built-in and `<home>/aliases.json`) of models installed under another
 * name, the default model, and name -> folder with those aliases (the engine's locateModel,
 * given the alias lookup).
 */
import { readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { isModelDir, locateModel as locateInFolders } from '../engine/locate.js';
import { modelSearchDirs } from './home.js';
import { installedAliasLinks } from '../models/registry.js';
import { REFERENCE_DEFAULT_ALIAS } from '../models/aliases.js';

function modelFolders(searchDirs: readonly string[]): { name: string; dir: string }[] {
  const seen = new Map<string, string>();
  for (const dir of searchDirs) {
    if (!existsSync(dir)) continue;
    for (const name of readdirSync(dir).sort()) {
      if (name.startsWith('.')) continue; // never a model: temporary folders of kiln pull
      const candidate = join(dir, name);
      if (!seen.has(name) && isModelDir(candidate)) seen.set(name, candidate);
    }
  }
  return [...seen].map(([name, dir]) => ({ name, dir }));
}

/** `home`: where aliases.json is. */
function aliasLinks(searchDirs: readonly string[], home: string) {
  return installedAliasLinks(modelFolders(searchDirs), home);
}

/** An installed model, or an alias of one (`aliasOf`: the installed model's name). */
export interface InstalledModelEntry {
  name: string;
  dir: string;
  aliasOf?: string;
}

/**
 * Installed model names (folder names that hold a model_index.json), first match wins, then
 * the aliases (built-in and `<home>/aliases.json`) of models installed under another name, as
 * entries with `aliasOf`. Cheap enough to call per request: newly pulled models appear without
 * a restart.
 */
export function listInstalledModels(searchDirs: readonly string[], home: string): InstalledModelEntry[] {
  const models: InstalledModelEntry[] = modelFolders(searchDirs);
  for (const link of installedAliasLinks(models, home)) models.push({ name: link.alias, dir: link.dir, aliasOf: link.name });
  return models;
}

/** Name or path -> model folder, aliases of installed models included; `cacheDir` for single-file checkpoints (default <home>/cache). */
export function locateModel(nameOrPath: string, searchDirs: readonly string[], options: { home: string; cacheDir?: string }): string {
  return locateInFolders(nameOrPath, searchDirs, {
    cacheDir: options.cacheDir ?? join(options.home, 'cache'),
    alias: (name) => aliasLinks(searchDirs, options.home).find((l) => l.alias === name)?.dir,
  });
}

/** The reference's default model when installed, else the built-in kiln-tiny-xl. */
export { REFERENCE_DEFAULT_ALIAS as REFERENCE_DEFAULT_MODEL };
export const BUILTIN_DEFAULT_MODEL = 'kiln-tiny-xl';

export function defaultModelName(searchDirs: readonly string[], home: string): string {
  const installed =
    searchDirs.some((d) => isModelDir(join(d, REFERENCE_DEFAULT_ALIAS))) ||
    aliasLinks(searchDirs, home).some((l) => l.alias === REFERENCE_DEFAULT_ALIAS);
  return installed ? REFERENCE_DEFAULT_ALIAS : BUILTIN_DEFAULT_MODEL;
}

/** Name or path -> model folder, looked up in `home`'s models and the built-in ones (benchmarks, tools). */
export function locateInHome(nameOrPath: string, home: string): string {
  return locateModel(nameOrPath, modelSearchDirs(home), { home });
}
