/**
 * `--max-requests-per-key N`: each API key may have at most N image requests in flight (queued,
 * running or streaming) on this server; one more is answered 429 `too_many_requests` with
 * `retry-after`, which the OpenAI SDKs honour by retrying. So one client cannot fill the queue
 * for everyone else. A request counts from the moment its key is checked until its response is
 * done or its connection closes (a client that goes away frees its place at once).
 */
import type { FastifyInstance } from 'fastify';
import { apiKeyIndex } from './auth.js';
import { ApiError } from './errors.js';

const IMAGE_ROUTES = new Set(['/v1/images/generations', '/v1/images/edits']);

export function addPerKeyRequestLimit(app: FastifyInstance, max: number, retryAfterSeconds: () => number): void {
  const inFlight = new Map<number, number>();
  app.addHook('onRequest', async (request, reply) => {
    if (request.method !== 'POST' || !IMAGE_ROUTES.has(request.routeOptions.url ?? '')) return;
    const key = apiKeyIndex(request);
    if (key === undefined) return;
    const now = inFlight.get(key) ?? 0;
    if (now >= max) {
      request.log.info({ key, inFlight: now }, 'per-key request limit reached');
      throw new ApiError(
        429,
        `This API key has ${now} image request(s) in flight, the most this server allows per key (--max-requests-per-key ${max}); retry when one is done.`,
        null,
        'too_many_requests',
        { headers: { 'retry-after': String(Math.max(1, retryAfterSeconds())), 'x-should-retry': 'true' } },
      );
    }
    inFlight.set(key, now + 1);
    reply.raw.once('close', () => {
      const left = (inFlight.get(key) ?? 1) - 1;
      if (left > 0) inFlight.set(key, left);
      else inFlight.delete(key);
    });
  });
}
