/**
 * Test servers: a temp KILN_HOME whose models/ links fixture folders under the names the server
 * expects (`kiln-tiny-xl` acts as the default model), a real server on 127.0.0.1 port 0, and an
 * official `openai` SDK client pointed at it.
 */
import { mkdtempSync, mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import sharp from 'sharp';
import { ensureFixture, type FixtureOptions, type FixtureVariant } from '../../tools/fixtures/variants.js';
import { createServer, type KilnServer, type ServerOptions } from '../../src/server/app.js';

export interface TestServer {
  server: KilnServer;
  home: string;
  /** http://127.0.0.1:PORT */
  url: string;
  /** http://127.0.0.1:PORT/v1 */
  baseURL: string;
  client(apiKey?: string, options?: Partial<ConstructorParameters<typeof OpenAI>[0]>): OpenAI;
  close(): Promise<void>;
}

export type ModelSpec = FixtureVariant | { variant: FixtureVariant; options: FixtureOptions };

/** A temp home whose models/<name> are symlinks to fixture folders. */
export async function makeHome(models: Record<string, ModelSpec>): Promise<string> {
  const home = mkdtempSync(join(tmpdir(), 'kiln-server-test-'));
  mkdirSync(join(home, 'models'));
  for (const [name, spec] of Object.entries(models)) {
    const dir = typeof spec === 'string' ? await ensureFixture(spec) : await ensureFixture(spec.variant, spec.options);
    symlinkSync(dir, join(home, 'models', name), 'dir');
  }
  return home;
}

export async function startTestServer(
  options: Partial<ServerOptions> & { models?: Record<string, ModelSpec> } = {},
): Promise<TestServer> {
  const { models = { 'kiln-tiny-xl': 'sdxl' }, ...rest } = options;
  const home = options.home ?? (await makeHome(models));
  const server = await createServer({ logger: process.env.KILN_TEST_LOG ?? 'silent', preload: false, ...rest, home, host: '127.0.0.1', port: 0 });
  const url = await server.listen();
  let closed = false;
  return {
    server,
    home,
    url,
    baseURL: `${url}/v1`,
    client: (apiKey = 'unused', extra = {}) => new OpenAI({ baseURL: `${url}/v1`, apiKey, maxRetries: 0, timeout: 60_000, ...extra }),
    async close() {
      if (closed) return;
      closed = true;
      await server.close();
      if (!options.home) rmSync(home, { recursive: true, force: true });
    },
  };
}

/** POSTs JSON (or raw text) and returns status, headers and the parsed body. */
export async function postJson(url: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let json: any;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, headers: res.headers, json, text };
}

/** A small valid PNG (a gradient), `width` x `height`, RGBA when `alpha`. */
export async function makePng(width = 64, height = 64, alpha = false): Promise<Buffer> {
  const channels = alpha ? 4 : 3;
  const data = Buffer.alloc(width * height * channels);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * channels;
      data[i] = (x * 255) / width;
      data[i + 1] = (y * 255) / height;
      data[i + 2] = 128;
      if (alpha) data[i + 3] = x < width / 2 ? 255 : 0;
    }
  }
  return sharp(data, { raw: { width, height, channels } }).png().toBuffer();
}

/** Asserts OpenAI's error envelope and returns its `error`. */
export function envelope(json: any): { message: string; type: string; param: string | null; code: string | null } {
  if (!json || typeof json !== 'object' || !json.error || typeof json.error !== 'object') {
    throw new Error(`not an error envelope: ${JSON.stringify(json)?.slice(0, 300)}`);
  }
  const { message, type, param, code } = json.error;
  if (typeof message !== 'string' || typeof type !== 'string') throw new Error(`bad envelope: ${JSON.stringify(json)}`);
  if (!('param' in json.error) || !('code' in json.error)) throw new Error(`envelope lacks param/code: ${JSON.stringify(json)}`);
  return { message, type, param, code };
}

/** GETs and parses JSON (typed loosely for assertions). */
export async function getJson(url: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: Headers; json: any }> {
  const res = await fetch(url, { headers });
  const text = await res.text();
  let json: any;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, headers: res.headers, json };
}
