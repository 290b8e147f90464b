/**
 * API keys: when any are configured, every request to /v1 and /v1/* (known routes and unknown
 * ones alike) must carry `Authorization: Bearer <one of them>`; 401 otherwise.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { ApiError } from './errors.js';

function sha256(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** Constant-time check of a bearer token against the configured keys (hashes have equal lengths): the matching key's index, or -1. */
function keyIndex(token: string, keyHashes: Buffer[]): number {
  const given = sha256(token);
  let found = -1;
  keyHashes.forEach((h, i) => {
    if (timingSafeEqual(given, h)) found = i;
  });
  return found;
}

/** Which configured key (by its index, never the key) a request authenticated with. */
const keyOfRequest = new WeakMap<object, number>();

/** The index of the API key `request` carried, when keys are configured and it carried one. */
export function apiKeyIndex(request: FastifyRequest): number | undefined {
  return keyOfRequest.get(request.raw);
}

/**
 * Whether a request is under /v1. Both the route the router matched and the percent-decoded
 * path count: the raw URL alone would let `/%761/models` (decoded and routed as /v1/models)
 * through without a key. An absolute-form target (`GET http://host/v1/... HTTP/1.1`) counts by
 * its path, whether or not a route matched it; a target in any other form (`*`) is guarded.
 */
export function isGuarded(rawUrl: string, matchedRoute: string | undefined): boolean {
  if (matchedRoute === '/v1' || matchedRoute?.startsWith('/v1/')) return true;
  let target = rawUrl.split(/[?#]/)[0]!;
  if (!target.startsWith('/')) {
    const authority = /^[a-z][a-z0-9+.-]*:\/\/[^/]*/i.exec(target);
    // `*`, or anything else that is neither a path nor absolute: refuse rather than guess.
    if (!authority) return true;
    target = target.slice(authority[0].length) || '/';
  }
  let path: string;
  try {
    path = decodeURIComponent(target);
  } catch {
    return true; // undecodable: refuse rather than guess
  }
  return path === '/v1' || path.startsWith('/v1/');
}

/**
 * Adds the API-key check to `app` as an onRequest hook on the instance itself (not an
 * encapsulated child), so that it also guards the not-found handler under /v1. Empty keys are
 * ignored; with none, nothing is added.
 */
export function addApiKeyAuth(app: FastifyInstance, apiKeys: string[]): void {
  const keyHashes = apiKeys.filter((k) => k.length > 0).map(sha256);
  if (keyHashes.length === 0) return;
  app.addHook('onRequest', async (request) => {
    if (!isGuarded(request.url, request.routeOptions.url)) return;
    const header = request.headers.authorization;
    const match = typeof header === 'string' ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
    if (!match) {
      throw new ApiError(401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.", null, 'missing_api_key', {
        headers: { 'www-authenticate': 'Bearer' },
      });
    }
    const index = keyIndex(match[1]!, keyHashes);
    if (index < 0) {
      throw new ApiError(401, 'Incorrect API key provided.', null, 'invalid_api_key', { headers: { 'www-authenticate': 'Bearer' } });
    }
    keyOfRequest.set(request.raw, index);
  });
}
