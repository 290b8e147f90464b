/**
 * CORS (`kiln serve --cors-origin`), so that web pages on other origins (a browser app built on
 * the OpenAI SDK, a web UI) can call the API: @fastify/cors answers preflights and adds the
 * headers to every response, errors included. No credentials (cookies) are involved: API keys
 * travel as `Authorization` headers, which the preflight allows by reflecting the requested ones.
 */
import type { FastifyCorsOptions } from '@fastify/cors';

export function corsOptions(origins: readonly string[]): FastifyCorsOptions {
  return {
    origin: origins.includes('*') ? '*' : [...origins],
    methods: ['GET', 'HEAD', 'POST'],
    // Every response header is readable (x-kiln-*, x-request-id, retry-after for the SDK's retries):
    // a wildcard, valid since the requests carry no credentials.
    exposedHeaders: '*',
    // Browsers cache a preflight's answer this long (seconds).
    maxAge: 600,
  };
}
