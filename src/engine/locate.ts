/**
 * Finding a model folder from what a user typed: a path, or a name looked up in the model
 * folders (Kiln's home first, then the models shipped in the package).
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ModelNotFoundError } from './errors.js';
import { installedAliasLinks } from '../models/registry.js';
import { REFERENCE_DEFAULT_ALIAS } from '../models/aliases.js';
import { fileModelFolder, isWeightsFilePath } from '../graphs/checkpoint.js';

/** Kiln's data folder: `$KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`. */
export function kilnHome(env: NodeJS.ProcessEnv = process.env): string {
  if (env.KILN_HOME) return resolve(env.KILN_HOME);
  const xdg = env.XDG_DATA_HOME || join(homedir(), '.local', 'share');
  return join(xdg, 'kiln');
}

/** The `models/` folder shipped with the package (kiln-tiny lives there). */
export function builtinModelsDir(): string {
  // src/engine/locate.ts and dist/engine/locate.js are both two levels below the package root.
  return resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'models');
}

export function modelSearchDirs(home: string = kilnHome()): string[] {
  return [join(home, 'models'), builtinModelsDir()];
}

const isModelDir = (dir: string) => existsSync(join(dir, 'model_index.json'));

/** Whether what a user typed is a path (has a separator, starts with '.', or names a weights file), not a name. */
export function isModelPath(nameOrPath: string): boolean {
  return /[\\/]/.test(nameOrPath) || nameOrPath.startsWith('.') || isWeightsFilePath(nameOrPath);
}

/**
 * Resolves a model name or path to a folder, or throws ModelNotFoundError. A single-file
 * checkpoint (`.safetensors`) becomes the model folder Kiln keeps for it under `cacheDir`
 * (src/graphs/checkpoint.ts); a pickle file is refused with the reason (ModelLoadError).
 */
export function locateModel(nameOrPath: string, searchDirs: string[] = modelSearchDirs(), options: { cacheDir?: string; home?: string } = {}): string {
  const asPath = resolve(nameOrPath);
  if (isWeightsFilePath(nameOrPath) && existsSync(asPath) && statSync(asPath).isFile()) {
    return fileModelFolder(asPath, options.cacheDir ?? join(options.home ?? kilnHome(), 'cache'));
  }
  if (isModelPath(nameOrPath)) {
    if (existsSync(asPath)) return asPath;
    throw new ModelNotFoundError(`model folder ${asPath} does not exist`, nameOrPath);
  }
  for (const dir of searchDirs) {
    const candidate = join(dir, nameOrPath);
    if (isModelDir(candidate)) return candidate;
  }
  // An alias (built-in or $KILN_HOME/aliases.json) of a model installed under another name.
  const link = aliasLinks(searchDirs, options.home).find((l) => l.alias === nameOrPath);
  if (link) return link.dir;
  if (existsSync(asPath) && statSync(asPath).isDirectory()) return asPath;
  throw new ModelNotFoundError(
    `model "${nameOrPath}" is not installed (looked in ${searchDirs.join(', ')}); ` +
      `install it with \`kiln pull ${nameOrPath}\` or pass a model folder path`,
    nameOrPath,
  );
}

function modelFolders(searchDirs: string[]): { name: string; dir: string }[] {
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

/** `home`: where aliases.json is (the environment's home when the caller gives none). */
function aliasLinks(searchDirs: string[], home: string = kilnHome()) {
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
 * the aliases (built-in and `$KILN_HOME/aliases.json`) of models installed under another
 * name, as entries with `aliasOf`. Cheap enough to call per request: newly pulled models appear
 * without a restart.
 */
export function listInstalledModels(searchDirs: string[] = modelSearchDirs(), home: string = kilnHome()): InstalledModelEntry[] {
  const models: InstalledModelEntry[] = modelFolders(searchDirs);
  for (const link of installedAliasLinks(models, home)) models.push({ name: link.alias, dir: link.dir, aliasOf: link.name });
  return models;
}

/** The reference's default model when installed, else the built-in kiln-tiny-xl. */
export { REFERENCE_DEFAULT_ALIAS as REFERENCE_DEFAULT_MODEL };
export const BUILTIN_DEFAULT_MODEL = 'kiln-tiny-xl';

export function defaultModelName(searchDirs: string[] = modelSearchDirs(), home?: string): string {
  const installed =
    searchDirs.some((d) => isModelDir(join(d, REFERENCE_DEFAULT_ALIAS))) ||
    aliasLinks(searchDirs, home).some((l) => l.alias === REFERENCE_DEFAULT_ALIAS);
  return installed ? REFERENCE_DEFAULT_ALIAS : BUILTIN_DEFAULT_MODEL;
}
