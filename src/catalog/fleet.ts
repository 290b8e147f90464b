/**
 * Scale-out: the API host's catalog plus the models its live workers announce. A name that
 * this host does not have but a worker serves resolves to that name with no local folder
 * (`remote`), so an API host needs no copy of the workers' models; what it would have checked
 * from the folder (size, pose and image-prompt assets) the worker checks, and its errors come
 * back as the same 400s.
 */
import { ModelNotFoundError } from '../engine/errors.js';
import { MODEL_NAME, type ModelCatalog, type ResolvedModel } from './catalog.js';

export function withFleetModels(local: ModelCatalog, fleetModels: () => string[]): ModelCatalog {
  return {
    get home() {
      return local.home;
    },
    get folders() {
      return local.folders;
    },
    locate: (ref) => local.locate(ref),
    installed() {
      const list = local.installed();
      const known = new Set(list.map((m) => m.id));
      for (const name of [...new Set(fleetModels())].sort()) if (!known.has(name)) list.push({ id: name, dir: '' });
      return list;
    },
    resolve(requested): ResolvedModel {
      try {
        return local.resolve(requested);
      } catch (err) {
        if (!(err instanceof ModelNotFoundError) || requested === undefined || !MODEL_NAME.test(requested) || !fleetModels().includes(requested)) throw err;
        return { id: requested, ref: requested, remote: true };
      }
    },
    dir: (model) => (model.remote ? '' : local.dir(model)),
  };
}
