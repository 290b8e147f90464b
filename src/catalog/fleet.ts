/**
 * Scale-out: the API host's catalog plus the models its live workers announce. A name that
 * this host does not have but a worker serves resolves to that name with no local folder
 * (`remote`), so an API host needs no copy of the workers' models; what it would have checked
 * from the folder (size, pose and image-prompt assets) the worker checks, and its errors come
 * back as the same 400s. This host's own aliases come first, as on one machine: one whose
 * target only the workers serve resolves to that target, remote, with the alias as `requested`.
 */
import { ModelNotFoundError } from '../engine/errors.js';
import { isModelPath } from '../engine/locate.js';
import { MODEL_NAME, isOpenAiImageModel, type ModelCatalog, type ResolvedModel } from './catalog.js';

/** For a 404 on an API host: the models its live workers announce, or that none is live. */
function fleetNote(served: readonly string[]): string {
  const names = [...new Set(served)].sort();
  if (names.length === 0) return 'No live worker serves it either (none is live now).';
  const shown = names.slice(0, 20).join(', ') + (names.length > 20 ? ', ...' : '');
  return `No live worker serves it either (the workers serve ${shown}).`;
}

export function withFleetModels(local: ModelCatalog, fleetModels: () => string[]): ModelCatalog {
  /** What the fleet serves a name as: its own name, or (this host's alias) the target; undefined when no live worker does. */
  function remote(name: string, served: string[]): ResolvedModel | undefined {
    if (!MODEL_NAME.test(name)) return undefined;
    const target = local.aliases()[name];
    if (target === undefined) return served.includes(name) ? { id: name, ref: name, remote: true } : undefined;
    // A folder target is this host's, and names nothing a worker announces.
    if (isModelPath(target) || !MODEL_NAME.test(target) || !served.includes(target)) return undefined;
    return { id: target, ref: target, remote: true, ...(target !== name ? { requested: name } : {}) };
  }

  return {
    get home() {
      return local.home;
    },
    get folders() {
      return local.folders;
    },
    locate: (ref) => local.locate(ref),
    aliases: () => local.aliases(),
    get configuredDefault() {
      return local.configuredDefault;
    },
    installed() {
      const list = local.installed();
      const known = new Set(list.map((m) => m.id));
      const served = fleetModels();
      // This host's aliases of the workers' models (local.installed() leaves out aliases whose model is not here).
      for (const alias of Object.keys(local.aliases()).sort()) {
        if (!known.has(alias) && remote(alias, served)) {
          list.push({ id: alias, dir: '' });
          known.add(alias);
        }
      }
      for (const name of [...new Set(served)].sort()) if (!known.has(name)) list.push({ id: name, dir: '' });
      return list;
    },
    resolve(requested): ResolvedModel {
      let found: ResolvedModel;
      try {
        found = local.resolve(requested);
      } catch (err) {
        if (!(err instanceof ModelNotFoundError)) throw err;
        const served = fleetModels();
        // A request naming no model, or an OpenAI name no alias maps, is the configured default's
        // (which, or whose alias target, only the workers may have).
        const byDefault = requested === undefined || (isOpenAiImageModel(requested) && local.aliases()[requested] === undefined);
        const fallback = byDefault && local.configuredDefault !== undefined ? remote(local.configuredDefault, served) : undefined;
        if (fallback) return requested === undefined ? fallback : { ...fallback, requested };
        // Unknown to the fleet too (or an alias whose target no live worker serves): this host's 404,
        // which says why, and what the live workers do serve.
        const named = requested === undefined ? undefined : remote(requested, served);
        if (!named) throw new ModelNotFoundError(`${err.message} ${fleetNote(served)}`, err.model);
        return named;
      }
      if (found.dir !== undefined || isModelPath(found.ref)) return found;
      // The configured default (for a request naming no model, or an OpenAI name) comes back
      // unlocated, and may be a name only the workers have. Located here, the folder rides along
      // (dir() then reads it instead of looking again).
      try {
        return { ...found, dir: local.locate(found.ref) };
      } catch (err) {
        const served = err instanceof ModelNotFoundError ? remote(found.id, fleetModels()) : undefined;
        if (!served) throw err;
        return { ...served, ...(found.requested !== undefined ? { requested: found.requested } : {}) };
      }
    },
    dir: (model) => (model.remote ? '' : local.dir(model)),
  };
}
