/**
 * The model catalog: Kiln's home, the folders models are looked up in, aliases, the installed
 * list and name -> folder, passed explicitly to whatever needs them (the API to resolve and
 * check requests; the runner to give the engine folders, never the environment).
 *
 * Which models a request may name: those installed in the home's model folders (read from disk
 * on every call, so a `kiln pull` shows up without a restart), plus the operator's
 * --default-model, which may be a folder that clients can name only by its id.
 *
 * Names that stock OpenAI clients send (`dall-e-3`, `gpt-image-1`, anything starting with
 * `dall-e` or `gpt-image`) are served by the default model, unless the operator maps a name
 * elsewhere: `--model-alias NAME=MODEL` (over) `{ "NAME": { "model": "MODEL" } }` entries in
 * `$KILN_HOME/aliases.json` (re-read per request). An alias wins over an installed model of the
 * same name; the OpenAI fallback only applies to names nothing else answers to.
 */
import { existsSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { isModelPath } from '../engine/locate.js';
import { defaultModelName, listInstalledModels, locateModel } from './installed-models.js';
import { ModelNotFoundError } from '../engine/errors.js';
import { readModelAliases } from '../models/aliases.js';

export const MODEL_NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,255}$/;

/** OpenAI's image model names; any name starting with `dall-e` or `gpt-image` counts too. */
export const OPENAI_IMAGE_MODELS = ['dall-e-2', 'dall-e-3', 'gpt-image-1', 'gpt-image-1-mini', 'gpt-image-1.5', 'gpt-image-2'] as const;

export function isOpenAiImageModel(name: string): boolean {
  return /^(dall-e|gpt-image)/i.test(name);
}

/** GPT image models only ever answer in base64, so clients asking for them read `b64_json`. */
export function isGptImageModel(name: string | undefined): boolean {
  return name !== undefined && /^gpt-image/i.test(name);
}

/** A model as a request resolves it: the id clients see and the ref the engine loads. */
export interface ResolvedModel {
  id: string;
  ref: string;
  /** The installed folder, when resolving found it in the model folders. */
  dir?: string;
  /** The name the request asked for, when an alias or the OpenAI fallback answered it with `id`. */
  requested?: string;
  /** Scale-out: served by the workers only, no folder on this host (catalog/fleet.ts). */
  remote?: boolean;
}

/** The folders an Engine works in, all from the catalog's home. */
export interface EngineFolders {
  home: string;
  searchDirs: string[];
  /** Graphs built from safetensors folders. */
  cacheDir: string;
  /** `<name>.safetensors` LoRAs. */
  lorasDir: string;
}

export interface ModelCatalog {
  /** Kiln's home (aliases.json, cache/, loras/, ip-adapters/, annotators/). */
  readonly home: string;
  readonly folders: EngineFolders;
  /** A model ref (a name a job carries, or a folder) -> its folder, or ModelNotFoundError. */
  locate(ref: string): string;
  /** Installed models, the configured default when it is not among them, and the operator's aliases. */
  installed(): { id: string; dir: string }[];
  /** The model a request names (or the default), or ModelNotFoundError (404). */
  resolve(requested: string | undefined): ResolvedModel;
  /** The folder of a resolved model (for reading its files before anything is queued); '' for a remote one. */
  dir(model: ResolvedModel): string;
  /** The serving aliases, alias -> MODEL as written (--model-alias over aliases.json), whether or not MODEL is here. */
  aliases(): Record<string, string>;
  /** The default model as configured (--default-model), a name or a folder; undefined: the built-in choice. */
  readonly configuredDefault: string | undefined;
}

export interface CatalogOptions {
  /** Model name or folder for requests that name none. */
  defaultModel?: string;
  /** `--model-alias NAME=MODEL` entries; they win over aliases.json. */
  aliases?: Record<string, string>;
  /** Kiln's home, for its aliases.json. */
  home: string;
}

/** aliases.json's serving aliases, or none when the file is absent or malformed (the server warns at start). */
function fileAliases(home: string | undefined): Record<string, string> {
  if (!home) return {};
  try {
    return readModelAliases(home);
  } catch {
    return {};
  }
}

const shorten = (name: string) => (name.length > 80 ? `${name.slice(0, 77)}...` : name);

export function createModelCatalog(searchDirs: string[], options: CatalogOptions): ModelCatalog {
  const { defaultModel, home } = options;
  const folders: EngineFolders = { home, searchDirs, cacheDir: join(home, 'cache'), lorasDir: join(home, 'loras') };
  const locate = (ref: string) => locateModel(ref, searchDirs, { cacheDir: folders.cacheDir, home });
  const operatorAliases = options.aliases ?? {};
  // An operator's --default-model may be a folder; clients may only name installed models.
  const configuredDefault = defaultModel
    ? isModelPath(defaultModel)
      ? { id: basename(resolve(defaultModel)), ref: resolve(defaultModel) }
      : { id: defaultModel, ref: defaultModel }
    : undefined;

  const aliasTable = () => ({ ...fileAliases(home), ...operatorAliases });
  const installedEntry = (name: string) => (MODEL_NAME.test(name) ? listInstalledModels(searchDirs, home).find((m) => m.name === name) : undefined);

  function notInstalled(name: string): ModelNotFoundError {
    const shown = shorten(name);
    return new ModelNotFoundError(
      MODEL_NAME.test(name)
        ? `The model '${shown}' is not installed on this server. Install it with \`kiln pull ${shown}\` (GET /v1/models lists installed models).`
        : `The model '${shown}' does not exist: model names are letters, digits and . _ + - (GET /v1/models lists installed models).`,
      name,
    );
  }

  /** A model by its own name (no aliases): the configured default, or an installed model. */
  function direct(name: string): ResolvedModel | undefined {
    if (configuredDefault?.id === name) return configuredDefault;
    const entry = installedEntry(name);
    return entry ? { id: name, ref: name, dir: entry.dir } : undefined;
  }

  function defaultResolved(): ResolvedModel {
    if (configuredDefault) {
      // A default named by one of the aliases serves the model it stands for (the table is re-read, as for requests by name).
      const target = isModelPath(defaultModel!) ? undefined : aliasTable()[configuredDefault.id];
      return target !== undefined && target !== configuredDefault.id ? aliasTarget(configuredDefault.id, target) : configuredDefault;
    }
    const name = defaultModelName(searchDirs, home);
    const found = direct(name);
    if (!found) throw notInstalled(name);
    return found;
  }

  /** What an alias points at: an installed name, the default's id, a model folder, or another alias (followed). */
  function aliasTarget(alias: string, target: string, seen: ReadonlySet<string> = new Set([alias])): ResolvedModel {
    const further = isModelPath(target) ? undefined : aliasTable()[target];
    if (further !== undefined && further !== target) {
      if (seen.has(target)) {
        throw new ModelNotFoundError(`The model '${shorten(alias)}' is an alias in a loop (${[...seen, target].map(shorten).join(' -> ')}).`, alias);
      }
      return aliasTarget(alias, further, new Set([...seen, target]));
    }
    if (isModelPath(target)) {
      const ref = resolve(target);
      if (!existsSync(ref)) throw new ModelNotFoundError(`The model '${shorten(alias)}' is an alias for the folder ${ref}, which does not exist.`, alias);
      return { id: basename(ref), ref, dir: ref };
    }
    const found = direct(target);
    if (!found) {
      throw new ModelNotFoundError(
        `The model '${shorten(alias)}' is an alias for '${shorten(target)}', which is not installed on this server (\`kiln pull ${shorten(target)}\`).`,
        alias,
      );
    }
    return found;
  }

  function resolveModel(requested: string | undefined): ResolvedModel {
    if (requested === undefined) return defaultResolved();
    const withName = (m: ResolvedModel): ResolvedModel => (m.id === requested ? m : { ...m, requested });
    const target = aliasTable()[requested];
    if (target !== undefined) return withName(aliasTarget(requested, target));
    const found = direct(requested);
    if (found) return found;
    if (isOpenAiImageModel(requested) && MODEL_NAME.test(requested)) {
      try {
        return withName(defaultResolved());
      } catch (err) {
        if (!(err instanceof ModelNotFoundError)) throw err;
        throw new ModelNotFoundError(`The model '${shorten(requested)}' is served by this server's default model, '${err.model}', which is not installed (\`kiln pull ${err.model}\`).`, requested);
      }
    }
    throw notInstalled(requested);
  }

  function installed(): { id: string; dir: string }[] {
    const list = listInstalledModels(searchDirs, home).map((m) => ({ id: m.name, dir: m.dir }));
    if (configuredDefault && !list.some((m) => m.id === configuredDefault.id)) {
      list.push({ id: configuredDefault.id, dir: configuredDefault.ref });
    }
    for (const [alias, target] of Object.entries(aliasTable()).sort(([a], [b]) => a.localeCompare(b))) {
      try {
        const m = aliasTarget(alias, target);
        const entry = { id: alias, dir: m.dir ?? locate(m.ref) };
        const at = list.findIndex((x) => x.id === alias);
        if (at >= 0) list[at] = entry; // the alias answers that name
        else list.push(entry);
      } catch {
        // an alias whose model is gone is not listed (requests naming it get the 404 saying why)
      }
    }
    return list;
  }

  // Installed models carry the folder resolve() found; the configured default is located here.
  function dir(model: ResolvedModel): string {
    return model.dir ?? locate(model.ref);
  }

  return { home, folders, locate, installed, resolve: resolveModel, dir, aliases: aliasTable, configuredDefault: defaultModel };
}
