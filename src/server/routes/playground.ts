/**
 * GET / and /playground/*: the browser playground, a handful of hand-written files shipped in
 * the package's playground/ folder (no build step). It calls the public API like any client, so
 * it needs no key to load; the API keeps its own auth. Files are read once at start and served
 * from memory with their ETag (revalidated on every load: the page is small, and a stale script
 * after an upgrade would be worse than a 304).
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

/** playground/ at the package root: three levels up from src/server/routes/ (tsx) and from dist/server/routes/ (built). */
export const PLAYGROUND_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'playground');

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
};

/** The files served, by URL path; nothing else under playground/ is reachable. */
export const PLAYGROUND_FILES: Record<string, string> = {
  '/': 'index.html',
  '/playground/style.css': 'style.css',
  '/playground/app.js': 'app.js',
  '/playground/api.js': 'api.js',
  '/playground/mask.js': 'mask.js',
  '/playground/history.js': 'history.js',
  '/playground/code.js': 'code.js',
  '/playground/favicon.svg': 'favicon.svg',
};

/**
 * No inline script or style, no eval; fetches only to this origin (so an API key typed into
 * the page can go nowhere else); images from here, decoded base64 (blob:) and data: URLs.
 */
export const PLAYGROUND_CSP = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data: blob:",
  "connect-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

interface Served {
  body: Buffer;
  type: string;
  etag: string;
}

function load(dir: string): Map<string, Served> | undefined {
  const files = new Map<string, Served>();
  for (const [path, name] of Object.entries(PLAYGROUND_FILES)) {
    const file = join(dir, name);
    if (!existsSync(file)) return undefined;
    const body = readFileSync(file);
    const type = TYPES[name.slice(name.lastIndexOf('.'))]!;
    files.set(path, { body, type, etag: `"${createHash('sha256').update(body).digest('base64url').slice(0, 22)}"` });
  }
  return files;
}

/** Total bytes of the playground's files (what a first visit downloads, uncompressed). */
export function playgroundBytes(dir = PLAYGROUND_DIR): number {
  return Object.values(PLAYGROUND_FILES).reduce((sum, name) => sum + readFileSync(join(dir, name)).length, 0);
}

export async function playgroundRoutes(app: FastifyInstance, { dir = PLAYGROUND_DIR }: { dir?: string } = {}): Promise<void> {
  const files = load(dir);
  if (!files) {
    // A package without the folder still serves the API.
    app.log.warn(`playground files not found in ${dir}; GET / is not served`);
    return;
  }
  const serve = (file: Served) => async (request: FastifyRequest, reply: FastifyReply) => {
    reply.headers({
      'cache-control': 'no-cache',
      etag: file.etag,
      'x-content-type-options': 'nosniff',
      'referrer-policy': 'no-referrer',
      'content-security-policy': PLAYGROUND_CSP,
      'cross-origin-opener-policy': 'same-origin',
    });
    if (request.headers['if-none-match'] === file.etag) return reply.code(304).send();
    return reply.type(file.type).send(file.body);
  };
  for (const [path, file] of files) app.get(path, { schema: { hide: true } }, serve(file));
}
