/**
 * Installed models, for `kiln models` and `kiln rm`: what each folder is (the engine's
 * detectLayout; for a diffusers safetensors folder, its unet/config.json), its size, where it came
 * from (kiln-source.json), and which aliases reach it.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, lstatSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { mkdir, rename, rm } from 'node:fs/promises';
import { join, relative, sep } from 'node:path';
import { ModelNotFoundError } from '../engine/errors.js';
import { builtinModelsDir } from '../engine/locate.js';
import { kilnHome } from '../catalog/home.js';
import { detectLayout, FAMILY_LABELS } from '../engine/model.js';
import { aliasTableLenient, isValidModelName, type InstallKind } from './aliases.js';
import { PullError } from './errors.js';
import type { RepoFile } from './hub.js';
import { planSafetensors, type LayoutFormat } from './select.js';
import {
  downloadsDir,
  installedAliasLinks,
  lockHolder,
  lockPath,
  modelsDir,
  readManifest,
  stagingDir,
  type SourceManifest,
} from './registry.js';

export interface InstalledModel {
  name: string;
  dir: string;
  kind: InstallKind;
  /**
   * For diffusion models detectLayout's label (`SD 1.x`, `SD 2.x`, `SDXL`, `LCM`, `SD Turbo`,
   * `SDXL Turbo`, ...); `ControlNet`, `annotator` or `files` otherwise; `broken` when the folder
   * does not load (see `problem`).
   */
  family: string;
  problem?: string;
  /** Diffusion models: the layout of the folder (`safetensors`: Kiln builds the ONNX graphs from it). */
  layout?: LayoutFormat;
  /** Apparent size of its files (hard links counted once). */
  bytes: number;
  /** Shipped with Kiln (not removable). */
  builtin: boolean;
  source?: Pick<SourceManifest, 'endpoint' | 'repo' | 'revision' | 'commit' | 'pulledAt' | 'alias'>;
  /** Aliases that resolve to this model. */
  aliases: string[];
}

export interface ListOptions {
  home?: string;
  /** Built-in models folder (default: the package's models/); `null` to leave it out. */
  builtinDir?: string | null;
}

/** Total size of the files under `dir`. */
export function folderSize(dir: string): number {
  const seen = new Set<string>();
  let total = 0;
  const walk = (d: string) => {
    for (const entry of readdirSync(d, { withFileTypes: true })) {
      const path = join(d, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.isFile()) {
        const st = lstatSync(path);
        const key = `${st.dev}:${st.ino}`;
        if (seen.has(key)) continue;
        seen.add(key);
        total += st.size;
      }
    }
  };
  if (existsSync(dir)) walk(dir);
  return total;
}

function describe(name: string, dir: string, builtin: boolean, manifest: SourceManifest | undefined): InstalledModel {
  const kind: InstallKind = manifest?.kind ?? 'diffusion';
  let family: string;
  let problem: string | undefined;
  let layout: LayoutFormat | undefined;
  if (kind === 'diffusion') {
    try {
      const found = detectLayout(dir);
      family = found.label;
      layout = (found as { format?: LayoutFormat }).format ?? 'onnx';
    } catch (err) {
      const st = safetensorsFamily(dir);
      family = st?.family ?? 'broken';
      problem = st ? st.problem : (err as Error).message;
      if (st) layout = 'safetensors';
    }
  } else {
    family = kind === 'controlnet' ? 'ControlNet' : kind;
  }
  const model: InstalledModel = { name, dir, kind, family, bytes: folderSize(dir), builtin, aliases: [] };
  if (problem) model.problem = problem;
  if (layout) model.layout = layout;
  if (manifest) {
    const { endpoint, repo, revision, commit, pulledAt, alias } = manifest;
    model.source = { endpoint, repo, revision, commit, pulledAt, ...(alias ? { alias } : {}) };
    if (alias && alias !== name) model.aliases.push(alias);
  }
  return model;
}

function readJsonObject(path: string): Record<string, unknown> | undefined {
  try {
    const v = JSON.parse(readFileSync(path, 'utf8')) as unknown;
    return v && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The family of a diffusers safetensors folder (no `unet/model.onnx`, a `unet/config.json`), from
 * its UNet config: `text_time` addition embedding → SDXL, cross-attention width 1024 → SD 2.x,
 * else SD 1.x (`unknown` when the config is unreadable). A folder missing part of the layout is
 * `broken`, with what it lacks. Undefined for folders that are not such a layout.
 */
export function safetensorsFamily(dir: string): { family: string; problem?: string } | undefined {
  if (existsSync(join(dir, 'unet', 'model.onnx')) || !existsSync(join(dir, 'unet', 'config.json'))) return undefined;
  const files: RepoFile[] = [];
  const walk = (d: string) => {
    for (const entry of readdirSync(d, { withFileTypes: true })) {
      const path = join(d, entry.name);
      if (entry.isDirectory()) walk(path);
      else files.push({ path: relative(dir, path).split(sep).join('/'), size: 0 });
    }
  };
  walk(dir);
  if (!files.some((f) => f.path.startsWith('unet/') && f.path.endsWith('.safetensors'))) return undefined;
  const { missing } = planSafetensors(files, readJsonObject(join(dir, 'model_index.json')));
  if (missing.length) {
    return { family: 'broken', problem: `model folder ${dir} is not a complete diffusers safetensors layout: missing ${missing.join(', ')}` };
  }
  const unet = readJsonObject(join(dir, 'unet', 'config.json'));
  if (!unet) return { family: 'unknown', problem: `${join(dir, 'unet', 'config.json')} is not a JSON object` };
  const family = unet.addition_embed_type === 'text_time' ? 'sdxl' : unet.cross_attention_dim === 1024 ? 'sd2' : 'sd1';
  return { family: FAMILY_LABELS[family] };
}

/** Installed models (`$KILN_HOME/models`, then the built-in ones; first name wins), plus file aliases installed elsewhere by `dir`. */
export function listModels(options: ListOptions = {}): InstalledModel[] {
  const home = options.home ?? kilnHome();
  const builtin = options.builtinDir === undefined ? builtinModelsDir() : options.builtinDir;
  const out = new Map<string, InstalledModel>();
  const roots: [string, boolean][] = [[modelsDir(home), false]];
  if (builtin) roots.push([builtin, true]);
  for (const [root, isBuiltin] of roots) {
    if (!existsSync(root)) continue;
    for (const name of readdirSync(root).sort()) {
      if (name.startsWith('.') || out.has(name)) continue;
      const dir = join(root, name);
      if (!statSync(dir).isDirectory()) continue;
      const manifest = readManifest(dir);
      if (!manifest && !existsSync(join(dir, 'model_index.json'))) continue;
      out.set(name, describe(name, dir, isBuiltin, manifest));
    }
  }
  for (const [alias, entry] of Object.entries(aliasTableLenient(home))) {
    if (!entry.dir || out.has(alias)) continue;
    const dir = join(home, entry.dir);
    const manifest = readManifest(dir);
    if (manifest) out.set(alias, describe(alias, dir, false, manifest));
  }
  const diffusion = [...out.values()].filter((m) => m.kind === 'diffusion');
  for (const link of installedAliasLinks(diffusion, home)) {
    const target = out.get(link.name);
    if (target && !target.aliases.includes(link.alias)) target.aliases.push(link.alias);
  }
  return [...out.values()];
}

/** Finds an installed model by name or by an alias that reaches it. */
export function findInstalled(name: string, options: ListOptions = {}): InstalledModel | undefined {
  const models = listModels(options);
  return models.find((m) => m.name === name) ?? models.find((m) => m.aliases.includes(name));
}

export interface RemoveResult {
  name: string;
  dir: string;
  bytes: number;
}

/**
 * Removes an installed model (by name or alias) and any unfinished pull of it. The folder is
 * first renamed away, so a server never sees it half-deleted. Built-in models cannot be removed.
 */
export async function removeModel(name: string, options: { home?: string } = {}): Promise<RemoveResult> {
  const home = options.home ?? kilnHome();
  if (!isValidModelName(name)) throw new ModelNotFoundError(`"${name}" is not a model name`, name);
  const model = findInstalled(name, { home });
  const staging = stagingDir(home, name);
  if (!model) {
    if (existsSync(staging) && lockHolder(lockPath(home, name)) === undefined) {
      await rm(staging, { recursive: true, force: true });
      return { name, dir: staging, bytes: 0 };
    }
    throw new ModelNotFoundError(`model "${name}" is not installed (see kiln models)`, name);
  }
  if (model.builtin) throw new PullError(`"${model.name}" ships with Kiln and cannot be removed`, 'exists');
  const holder = lockHolder(lockPath(home, model.name));
  if (holder !== undefined) throw new PullError(`a kiln pull of "${model.name}" is running (pid ${holder}); stop it first`, 'busy');
  await mkdir(downloadsDir(home), { recursive: true });
  const trash = join(downloadsDir(home), `.removed-${randomBytes(4).toString('hex')}`);
  try {
    await rename(model.dir, trash);
    await rm(trash, { recursive: true, force: true });
  } catch {
    await rm(model.dir, { recursive: true, force: true });
  }
  await rm(stagingDir(home, model.name), { recursive: true, force: true });
  return { name: model.name, dir: model.dir, bytes: model.bytes };
}
