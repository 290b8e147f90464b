/**
 * Test servers: a temp KILN_HOME whose models/ links fixture folders under the names the server
 * expects (`kiln-tiny-xl` acts as the default model), a real server on 127.0.0.1 port 0, and an
 * official `openai` SDK client pointed at it.
 */
import { mkdtempSync, mkdirSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
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
  // Only the test home's models: the built-in kiln-tiny models would change what /v1/models lists.
  const server = await createServer({
    logger: process.env.KILN_TEST_LOG ?? 'silent',
    preload: false,
    searchDirs: [join(home, 'models')],
    ...rest,
    home,
    host: '127.0.0.1',
    port: 0,
  });
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

/**
 * A folder at `dest` whose entries are symlinks to those of `src` (a fixture folder that stays
 * untouched), minus `omit`; the caller may then add its own entries (controlnet-openpose/, ...).
 */
export function linkFarm(src: string, dest: string, omit: string[] = []): string {
  mkdirSync(dest, { recursive: true });
  for (const name of readdirSync(src)) {
    if (!omit.includes(name)) symlinkSync(join(src, name), join(dest, name));
  }
  return dest;
}

/** Marks a folder as installed by `kiln pull` (a kiln-source.json of the given kind). */
export function markInstalled(dir: string, alias: string, kind: 'controlnet' | 'annotator' | 'diffusion'): void {
  const manifest = {
    format: 1,
    source: 'huggingface',
    endpoint: 'https://huggingface.co',
    repo: `test/${alias}`,
    revision: 'main',
    commit: '0'.repeat(40),
    alias,
    kind,
    pulledAt: new Date(0).toISOString(),
    files: [],
  };
  writeFileSync(join(dir, 'kiln-source.json'), JSON.stringify(manifest));
}

/** A raw RGB picture as a PNG. */
export function rgbPng(width: number, height: number, pixel: (x: number, y: number) => [number, number, number]): Promise<Buffer> {
  const data = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) data.set(pixel(x, y), (y * width + x) * 3);
  return sharp(data, { raw: { width, height, channels: 3 } }).png().toBuffer();
}

/**
 * A "person" for the DWPose stand-in detector (bright pixels are a person): a white upright
 * rectangle on a dark picture; `person: false` gives the dark picture alone (nobody).
 */
export function personPng(size = 320, person = true): Promise<Buffer> {
  const inside = (x: number, y: number) => person && x >= size * 0.375 && x < size * 0.625 && y >= size * 0.19 && y < size * 0.875;
  return rgbPng(size, size, (x, y) => (inside(x, y) ? [240, 240, 240] : [20, 20, 20]));
}

/** Decoded pixels (RGB) and size of an encoded image. */
export async function pixelsOf(bytes: Buffer): Promise<{ width: number; height: number; data: Buffer }> {
  const { data, info } = await sharp(bytes).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  return { width: info.width, height: info.height, data };
}
