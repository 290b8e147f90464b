/** GET /v1/models and /v1/models/:model: the installed models, read from disk on every call. */
import { statSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { ApiError } from '../errors.js';
import type { ModelCatalog } from '../../catalog/catalog.js';
import { ModelNotFoundError } from '../../engine/errors.js';

function modelObject(m: { id: string; dir: string }) {
  let created = 0;
  try {
    created = Math.floor(statSync(m.dir).mtimeMs / 1000);
  } catch {
    // listed a moment ago, gone now
  }
  return { id: m.id, object: 'model', created, owned_by: 'kiln' };
}

export async function modelRoutes(app: FastifyInstance, { models }: { models: ModelCatalog }): Promise<void> {
  app.get('/v1/models', { schema: { summary: 'Installed models (read from disk on every call)', security: [{ bearer: [] }] } }, async () => ({
    object: 'list',
    data: models.installed().map(modelObject),
  }));

  // Any name a request may use answers here, the OpenAI names the default model serves included.
  app.get('/v1/models/:model', { schema: { summary: 'One model a request may name', security: [{ bearer: [] }] } }, async (request) => {
    const { model } = request.params as { model: string };
    const found = models.installed().find((m) => m.id === model);
    if (found) return modelObject(found);
    let resolved;
    try {
      resolved = models.resolve(model);
    } catch (err) {
      if (!(err instanceof ModelNotFoundError)) throw err;
      throw new ApiError(404, err.message, 'model', 'model_not_found');
    }
    return modelObject({ id: model, dir: models.dir(resolved) });
  });
}
