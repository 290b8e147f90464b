/**
 * `kiln serve`: the HTTP API (src/server), with graceful shutdown on SIGTERM/SIGINT.
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { builtinModelsDir, isModelPath } from '../engine/locate.js';
import { kilnHome, maxModels as maxModelsFromEnv, modelSearchDirs } from '../catalog/home.js';
import { defaultModelName, locateModel, REFERENCE_DEFAULT_MODEL } from '../catalog/installed-models.js';
import { MODEL_NAME, OPENAI_IMAGE_MODELS } from '../catalog/catalog.js';
import type { Device } from '../engine/onnx.js';
import { createServer } from '../server/app.js';
import { describeDuration } from '../runner/pool.js';
import { fileModelFolder, isWeightsFilePath } from '../graphs/checkpoint.js';
import { MAX_IMAGES, N_MEANINGS, type NMeaning } from '../server/params.js';
import { describeRedis, parseRedisUrl } from '../queue/redis-url.js';
import { checkStoreUrl, createStore, describeStoreError } from '../store/index.js';

export interface ServeFlags {
  host: string;
  port: number;
  home?: string;
  defaultModel?: string;
  modelAlias?: Record<string, string>;
  nAs: NMeaning;
  apiKey?: string[];
  corsOrigin?: string[];
  maxRequestsPerKey?: number;
  publicUrl?: string;
  urlTtl: number;
  maxQueue: number;
  workers: number;
  maxBatch: number;
  maxModels?: number;
  unloadAfter?: number;
  timeout: number;
  shutdownTimeout: number;
  headersTimeout: number;
  bodyTimeout: number;
  minBodyRate: number;
  device: Device;
  logLevel: string;
  preload: boolean;
  queue?: string;
  store?: string;
  s3PresignedUrls?: boolean;
}

/** `90`, `90s`, `500ms`, `2m`, `1h` -> milliseconds (a bare number is seconds). */
export function parseDuration(value: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/i.exec(value);
  if (!m) throw new InvalidArgumentError('expected a duration such as 500ms, 30s, 10m or 1h');
  const unit = (m[2] ?? 's').toLowerCase();
  const ms = Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[unit as 'ms' | 's' | 'm' | 'h'];
  if (!(ms > 0)) throw new InvalidArgumentError('expected a positive duration');
  return Math.round(ms);
}

function parseCount(value: string): number {
  if (!/^\s*\d+\s*$/.test(value)) throw new InvalidArgumentError('expected a non-negative integer');
  return Number(value);
}

function parseMaxBatch(value: string): number {
  const n = parseCount(value);
  if (n < 1 || n > 64) throw new InvalidArgumentError('expected an integer from 1 to 64');
  return n;
}

export function parsePositiveCount(value: string): number {
  if (!/^\s*\d+\s*$/.test(value) || Number(value) < 1) throw new InvalidArgumentError('expected a positive integer');
  return Number(value);
}

function parsePort(value: string): number {
  const n = parseCount(value);
  if (n > 65535) throw new InvalidArgumentError('expected a port from 0 to 65535');
  return n;
}

function storeArg(value: string): string {
  try {
    return checkStoreUrl(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** `*`, or an origin as browsers send it: scheme://host[:port], nothing after. */
export function collectCorsOrigin(value: string, previous: string[] = []): string[] {
  if (value !== '*') {
    let url: URL;
    try {
      url = new URL(value);
    } catch {
      throw new InvalidArgumentError('expected * or an origin such as https://app.example.com');
    }
    if (!/^https?:$/.test(url.protocol) || url.origin !== value.replace(/\/$/, '')) {
      throw new InvalidArgumentError(`expected * or an origin (scheme://host[:port], no path), such as ${url.origin === 'null' ? 'https://app.example.com' : url.origin}`);
    }
    value = url.origin;
  }
  return [...previous, value];
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** `NAME=MODEL` (repeatable) into a table; a folder MODEL is made absolute here, against the cwd. */
export function parseModelAlias(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const at = value.indexOf('=');
  const name = at > 0 ? value.slice(0, at).trim() : '';
  const model = at > 0 ? value.slice(at + 1).trim() : '';
  if (!MODEL_NAME.test(name) || !model) {
    throw new InvalidArgumentError('expected NAME=MODEL, e.g. dall-e-3=be-stable-diffusion-xl-base-1.0 (NAME: letters, digits, . _ + -; MODEL: an installed name or a folder)');
  }
  return { ...previous, [name]: isModelPath(model) ? resolve(model) : model };
}

function parseQueueUrl(value: string): string {
  try {
    parseRedisUrl(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
  return value;
}

function parseUrl(value: string): string {
  try {
    const url = new URL(value);
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error();
    return value.replace(/\/+$/, '');
  } catch {
    throw new InvalidArgumentError('expected an http(s) URL, e.g. https://images.example.com');
  }
}

/** The default model as people should read it: its name, and where it comes from. */
function describeDefaultModel(configured: string | undefined, home: string): string {
  if (configured) return `${configured} (--default-model)`;
  const searchDirs = modelSearchDirs(home);
  const name = defaultModelName(searchDirs, home);
  try {
    const dir = locateModel(name, searchDirs, { home });
    return dir.startsWith(builtinModelsDir()) ? `${name} (built into Kiln; \`kiln pull ${REFERENCE_DEFAULT_MODEL}\` for the reference's SDXL)` : name;
  } catch {
    return `${name} (not installed: requests that name no model get 404)`;
  }
}

export async function serveCommand(flags: ServeFlags): Promise<void> {
  const envKeys = (process.env.KILN_API_KEYS ?? '')
    .split(',')
    .map((k) => k.trim())
    .filter(Boolean);
  const apiKeys = [...(flags.apiKey ?? []), ...envKeys];
  // One home for everything that reads it (model aliases included).
  const home = resolve(flags.home ?? kilnHome());
  process.env.KILN_HOME = home;
  // A single-file checkpoint is served through the model folder Kiln keeps for it (named after the file).
  const defaultModel =
    flags.defaultModel && isWeightsFilePath(flags.defaultModel) && existsSync(flags.defaultModel)
      ? fileModelFolder(flags.defaultModel, join(home, 'cache'))
      : flags.defaultModel;
  if (flags.s3PresignedUrls && !flags.store) throw new Error('--s3-presigned-urls needs --store s3://BUCKET[/PREFIX]');
  // Resolved once here, for the inference threads and the banner alike.
  const maxModels = flags.maxModels ?? maxModelsFromEnv();
  if (flags.maxRequestsPerKey !== undefined && apiKeys.length === 0) throw new Error('--max-requests-per-key needs API keys (--api-key or KILN_API_KEYS): it counts requests per key');
  // The server's logger exists once it is made; the store's sweeper reports through it.
  let storeLog: (err: unknown) => void = () => {};
  const store = flags.store
    ? createStore(flags.store, { ttlMs: flags.urlTtl, presignedUrls: flags.s3PresignedUrls, onError: (err) => storeLog(err) })
    : undefined;
  // Every API host on the bucket signs image URLs with the secret kept there (and start-up checks the bucket).
  const urlSecret = await store?.urlSecret().catch(async (err: unknown) => {
    await store.close();
    throw new Error(`--store ${flags.store}: ${describeStoreError(err)}`);
  });
  const server = await createServer({
    store,
    urlSecret,
    home,
    host: flags.host,
    port: flags.port,
    publicUrl: flags.publicUrl,
    defaultModel,
    modelAliases: flags.modelAlias,
    nMeaning: flags.nAs,
    apiKeys,
    corsOrigins: flags.corsOrigin,
    maxRequestsPerKey: flags.maxRequestsPerKey,
    urlTtlMs: flags.urlTtl,
    maxQueue: flags.maxQueue,
    workers: flags.workers,
    maxBatch: flags.maxBatch,
    maxModels,
    unloadAfterMs: flags.unloadAfter,
    requestTimeoutMs: flags.timeout,
    shutdownTimeoutMs: flags.shutdownTimeout,
    headersTimeoutMs: flags.headersTimeout,
    bodyTimeoutMs: flags.bodyTimeout,
    minBodyRate: flags.minBodyRate,
    device: flags.device,
    logger: flags.logLevel,
    preload: flags.preload,
    ...(flags.queue ? { redisQueue: { url: flags.queue } } : {}),
  });
  storeLog = (err) => server.app.log.warn({ err }, 'image store: sweep or delete failed');
  let stopping = false;
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) {
      server.app.log.warn(`${signal} again: exiting now`);
      process.exit(1);
    }
    stopping = true;
    server.app.log.info(`${signal}: shutting down (running jobs get ${Math.round(flags.shutdownTimeout / 1000)} s)`);
    server.close().then(
      () => process.exit(0),
      (err: unknown) => {
        server.app.log.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const url = await server.listen();
  // For people (stderr, whatever the log level); the JSON logs go to stdout.
  process.stderr.write(
    `kiln: serving the images API at ${url}/v1 (image URLs at ${server.publicUrl}; ` +
      `${apiKeys.length ? `${apiKeys.length} API key(s) required${flags.maxRequestsPerKey ? `, ${flags.maxRequestsPerKey} request(s) in flight each` : ''}` : 'no API key required'}; Ctrl-C to stop)\n` +
      (flags.queue ? `kiln: scaled out: jobs go to the queue at ${describeRedis(parseRedisUrl(flags.queue))}; \`kiln worker --queue ...\` processes run them\n` : '') +
      (flags.nAs === 'count' ? `kiln: n is the number of images (1 to ${MAX_IMAGES}, each with its own seed; --n-as count)\n` : '') +
      `kiln: default model ${describeDefaultModel(flags.defaultModel, home)}; it also serves OpenAI's model names ` +
      `(${OPENAI_IMAGE_MODELS.join(', ')}, any dall-e-* or gpt-image-*)${flags.modelAlias ? ' not mapped by --model-alias' : ''}\n` +
      Object.entries(flags.modelAlias ?? {})
        .map(([name, model]) => `kiln: model alias ${name} -> ${model}\n`)
        .join('') +
      (flags.store ? `kiln: images and uploads in ${flags.store}${flags.s3PresignedUrls ? ' (url responses: presigned S3 URLs)' : ''}\n` : '') +
      (flags.corsOrigin?.length ? `kiln: browser pages from ${flags.corsOrigin.join(', ')} may call the API (CORS)\n` : '') +
      (flags.corsOrigin?.includes('*') && apiKeys.length === 0
        ? 'kiln: warning: --cors-origin * without an API key: any web page a visitor of this network opens may generate images here\n'
        : '') +
      modelMemoryLine(flags.queue ? undefined : maxModels, flags.queue ? undefined : flags.unloadAfter) +
      (flags.queue && (flags.maxModels !== undefined || flags.unloadAfter !== undefined)
        ? 'kiln: warning: --max-models and --unload-after bound the models of inference threads; scaled out, pass them to `kiln worker`\n'
        : ''),
  );
}

/** The banner's line on model memory, when either bound is set. */
export function modelMemoryLine(maxModels: number | undefined, unloadAfterMs: number | undefined): string {
  const parts = [
    maxModels !== undefined ? `at most ${maxModels} model(s) loaded per worker` : '',
    unloadAfterMs !== undefined ? `models unused for ${describeDuration(unloadAfterMs)} unloaded` : '',
  ].filter(Boolean);
  return parts.length ? `kiln: ${parts.join('; ')}\n` : '';
}

export function registerServeCommand(program: Command): void {
  program
    .command('serve')
    .description("serve Block Entropy's OpenAI-compatible images API (POST /v1/images/generations, /v1/images/edits)")
    .option('--host <host>', 'address to bind (loopback unless told otherwise)', '127.0.0.1')
    .option('--port <port>', 'port to listen on (0: any free port)', parsePort, 1234)
    .option('--home <dir>', "Kiln's home folder: models/, images/, the URL secret (default $KILN_HOME or ~/.local/share/kiln)")
    .option('--default-model <name|dir|file>', 'model for requests that name none: a name, a model folder or a single-file checkpoint (default: be-stable-diffusion-xl-base-1.0 if installed, else kiln-tiny-xl)')
    .option('--model-alias <name=model>', 'serve requests naming NAME with MODEL, an installed name or a folder (repeatable; over aliases.json)', parseModelAlias)
    .addOption(
      new Option('--n-as <meaning>', "what the API's n means: seed (the reference: n is the seed, one image) or count (OpenAI: n images, each with a random seed)")
        .choices([...N_MEANINGS])
        .default('seed'),
    )
    .option('--api-key <key>', 'require this bearer key on /v1/* (repeatable; also KILN_API_KEYS=k1,k2)', collect)
    .option('--max-requests-per-key <n>', 'image requests each API key may have in flight (queued, running or streaming); one more is answered 429 with retry-after', parsePositiveCount)
    .option('--cors-origin <origin>', 'let web pages from this origin call the API from the browser (repeatable; * for any)', collectCorsOrigin)
    .option('--public-url <url>', 'base URL clients reach this server at, for image URLs (behind a reverse proxy)', parseUrl)
    .addOption(new Option('--url-ttl <duration>', 'lifetime of image URLs and their files').argParser(parseDuration).default(3_600_000, '60m'))
    .option('--max-queue <n>', 'requests that may wait for a worker; more are answered 429', parseCount, 16)
    .option('--workers <n>', 'inference worker threads', parseCount, 1)
    .option('--max-batch <n>', "jobs each worker runs at once, their denoising steps batched into shared UNet runs (images byte for byte as alone); 1: one at a time", parseMaxBatch, 1)
    .option('--max-models <n>', 'models each worker keeps loaded; the least recently used idle one is unloaded to load another (default: $KILN_MAX_MODELS, else no bound)', parsePositiveCount)
    .addOption(new Option('--unload-after <duration>', 'unload a model no request has used for this long (default: never)').argParser(parseDuration))
    .addOption(new Option('--timeout <duration>', 'per-request limit, waiting included (answered 504 past it)').argParser(parseDuration).default(300_000, '5m'))
    .addOption(
      new Option('--shutdown-timeout <duration>', 'on SIGTERM, how long running jobs may take before they are cancelled')
        .argParser(parseDuration)
        .default(30_000, '30s'),
    )
    .addOption(
      new Option('--headers-timeout <duration>', "a request's headers must arrive within this (else 408)").argParser(parseDuration).default(10_000, '10s'),
    )
    .addOption(
      new Option('--body-timeout <duration>', 'a whole request, body included, must arrive within this (else 408)').argParser(parseDuration).default(120_000, '2m'),
    )
    .option('--min-body-rate <bytes/s>', 'a body that brings less than this per second over 10 s is cut (408); 0: no check', parseCount, 1024)
    .addOption(new Option('--device <device>', 'execution provider').choices(['cpu', 'cuda']).default('cpu'))
    .addOption(new Option('--log-level <level>', 'log level').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'))
    .option('--no-preload', 'do not load the default model at start')
    .option('--queue <redis-url>', 'scale out: put jobs on a BullMQ queue in Redis (redis://HOST:PORT[/DB]) for `kiln worker` processes; no inference here', parseQueueUrl)
    .option('--store <s3://bucket[/prefix]>', 'keep images and uploads in an S3-compatible bucket (AWS_REGION, AWS_ENDPOINT_URL_S3, the AWS credentials chain) instead of <home>/images', storeArg)
    .option('--s3-presigned-urls', 'with --store s3://: url responses are presigned S3 GET URLs (same lifetime) instead of Kiln\'s own signed URLs')
    .action(serveCommand);
}
