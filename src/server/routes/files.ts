/**
 * GET /images/:key?expires&signature: an image behind a signed, expiring URL. No API key: the
 * signature and expiry are the credential. Expired images are deleted when asked for.
 */
import type { FastifyInstance } from 'fastify';
import type { ImageStore } from '../../store/types.js';
import { ApiError } from '../errors.js';
import type { UrlSigner } from '../signing.js';

export async function fileRoutes(app: FastifyInstance, { store, signer }: { store: ImageStore; signer: UrlSigner }): Promise<void> {
  app.get(
    '/images/:key',
    {
      schema: {
        summary: 'An image behind a signed URL (no API key; the signature and expiry are the credential)',
        params: { type: 'object', properties: { key: { type: 'string' } } },
        querystring: { type: 'object', properties: { expires: { type: 'string' }, signature: { type: 'string' } } },
      },
    },
    async (request, reply) => {
      const { key } = request.params as { key: string };
      const query = request.query as Record<string, unknown>;
      const expires = typeof query.expires === 'string' ? query.expires : '';
      const signature = typeof query.signature === 'string' ? query.signature : '';
      if (!signer.verify(key, expires, signature)) {
        throw new ApiError(403, 'This image URL is not valid (bad or missing signature).', null, 'invalid_signature');
      }
      if (Number(expires) * 1000 <= Date.now()) {
        await store.delete(key);
        throw new ApiError(410, 'This image URL has expired; the image was deleted.', null, 'expired');
      }
      const found = await store.get(key);
      if (!found) throw new ApiError(404, 'This image no longer exists.', null, 'not_found');
      const maxAge = Math.max(0, Math.floor((found.image.expiresAt - Date.now()) / 1000));
      return reply
        .type(found.image.contentType)
        .headers({ 'content-length': String(found.image.size), 'cache-control': `private, max-age=${maxAge}`, 'x-content-type-options': 'nosniff' })
        .send(found.body);
    },
  );
}
