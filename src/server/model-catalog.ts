/**
 * Which models a request may name: those installed in the home's model folders (read from disk
 * on every call, so a `kiln pull` shows up without a restart), plus the operator's
 * --default-model, which may be a folder that clients can name only by its id.
 */
import { basename, resolve } from 'node:path';
import { defaultModelName, isModelPath, listInstalledModels, locateModel } from '../engine/locate.js';
import { ModelNotFoundError } from '../engine/errors.js';

const MODEL_NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,255}$/;

/** A model as a request resolves it: the id clients see and the ref the engine loads. */
export interface ResolvedModel {
  id: string;
  ref: string;
  /** The installed folder, when resolving found it in the model folders. */
  dir?: string;
}

export interface ModelCatalog {
  /** Installed models (and the configured default when it is not among them). */
  installed(): { id: string; dir: string }[];
  /** The model a request names (or the default), or ModelNotFoundError (404). */
  resolve(requested: string | undefined): ResolvedModel;
  /** The folder of a resolved model (for reading its files before anything is queued). */
  dir(model: ResolvedModel): string;
}

export function createModelCatalog(searchDirs: string[], defaultModel: string | undefined): ModelCatalog {
  // An operator's --default-model may be a folder; clients may only name installed models.
  const configuredDefault = defaultModel
    ? isModelPath(defaultModel)
      ? { id: basename(resolve(defaultModel)), ref: resolve(defaultModel) }
      : { id: defaultModel, ref: defaultModel }
    : undefined;

  function installed(): { id: string; dir: string }[] {
    const list = listInstalledModels(searchDirs).map((m) => ({ id: m.name, dir: m.dir }));
    if (configuredDefault && !list.some((m) => m.id === configuredDefault.id)) {
      list.push({ id: configuredDefault.id, dir: configuredDefault.ref });
    }
    return list;
  }

  function fallback(): ResolvedModel {
    if (configuredDefault) return configuredDefault;
    const name = defaultModelName(searchDirs);
    return { id: name, ref: name };
  }

  function resolveModel(requested: string | undefined): ResolvedModel {
    const chosen = requested === undefined ? fallback() : configuredDefault?.id === requested ? configuredDefault : { id: requested, ref: requested };
    if (chosen === configuredDefault) return chosen;
    const entry = MODEL_NAME.test(chosen.id) ? listInstalledModels(searchDirs).find((m) => m.name === chosen.id) : undefined;
    if (entry) return { ...chosen, dir: entry.dir };
    const shown = chosen.id.length > 80 ? `${chosen.id.slice(0, 77)}...` : chosen.id;
    throw new ModelNotFoundError(
      MODEL_NAME.test(chosen.id)
        ? `The model '${shown}' is not installed on this server. Install it with \`kiln pull ${shown}\` (GET /v1/models lists installed models).`
        : `The model '${shown}' does not exist: model names are letters, digits and . _ + - (GET /v1/models lists installed models).`,
      chosen.id,
    );
  }

  // Installed models carry the folder resolve() found; the configured default is located here.
  function dir(model: ResolvedModel): string {
    return model.dir ?? locateModel(model.ref, searchDirs);
  }

  return { installed, resolve: resolveModel, dir };
}
