/**
 * Kiln's HTTP server: Block Entropy's images API (OpenAI-compatible) on Fastify.
 *
 *   POST /v1/images/generations   JSON          -> queue -> inference worker -> store / inline
 *   POST /v1/images/edits         multipart     img2img; + mask: inpainting; user=cn / pose:<w>: pose (ControlNet)
 *                                               user=style:<w> / face:<w>: image prompt (IP-Adapter)
 *   GET  /v1/models, /v1/models/:id             installed models, read from disk per request
 *   GET  /images/:key?expires&signature         signed, expiring image URLs (no API key)
 *   GET  /ping /health /metrics /openapi.json
 *   GET  /, /playground/*                       the browser playground (routes/playground.ts; no API key)
 *
 * This file assembles the server: the queue, store and workers, the hooks every request passes
 * (request id, shutdown, API keys, metrics), the error envelope, and one plugin per concern
 * under routes/. What the image routes do lives in images-service.ts; the routes see only the
 * JobQueue and ImageStore interfaces (src/queue, src/store).
 */
import { randomBytes } from 'node:crypto';
import { readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import multipart from '@fastify/multipart';
import swagger from '@fastify/swagger';
import { pino, type Logger } from 'pino';
import { modelSearchDirs } from '../catalog/home.js';
import type { Device } from '../engine/onnx.js';
import { priorMsPerStepMp } from '../queue/estimate.js';
import { InProcessQueue } from '../queue/memory.js';
import type { JobQueue, JobRunner } from '../queue/types.js';
import { LocalDiskStore } from '../store/local.js';
import type { ImageStore, InputStore } from '../store/types.js';
import { addApiKeyAuth } from './auth.js';
import { addPerKeyRequestLimit } from './key-limits.js';
import cors from '@fastify/cors';
import { EnginePool } from '../runner/pool.js';
import { answerAndClose, clientErrorHandler, frameworkErrors, setErrorHandlers } from './error-handlers.js';
import { ApiError, SHUTTING_DOWN_HEADERS } from './errors.js';
import { createImagesService } from './images-service.js';
import { createMetrics, type Metrics } from './metrics.js';
import { createModelCatalog } from '../catalog/catalog.js';
import { withFleetModels } from '../catalog/fleet.js';
import { MemoryInputStore } from '../store/memory-inputs.js';
import { isInputStore } from '../store/index.js';
import { readModelAliases } from '../models/aliases.js';
import type { NMeaning } from './params.js';
import { fileRoutes } from './routes/files.js';
import { imageRoutes } from './routes/images.js';
import { UploadBudget } from './upload-budget.js';
import { modelRoutes } from './routes/models.js';
import { opsRoutes } from './routes/ops.js';
import { corsOptions } from './cors.js';
import { playgroundRoutes } from './routes/playground.js';
import { loadOrCreateSecret, UrlSigner } from './signing.js';
import { BodyRateGuard, connectionsCheckingInterval, DEFAULT_SLOW_CLIENT_LIMITS, type SlowClientLimits } from './slow-clients.js';
import type { UploadLimits } from './uploads.js';

export interface ServerOptions {
  /** Kiln's home folder: models/, images/, the URL-signing secret. */
  home: string;
  host?: string;
  port?: number;
  /** Base of image URLs (behind a reverse proxy); default: the listening address. */
  publicUrl?: string;
  /** Model name or folder used when a request names none; default: defaultModelName(). */
  defaultModel?: string;
  /** Names served by another model (`--model-alias NAME=MODEL`); they win over aliases.json. */
  modelAliases?: Record<string, string>;
  /** `n` is the seed (the reference's meaning, default) or the number of images (OpenAI's, `--n-as count`). */
  nMeaning?: NMeaning;
  /** Folders model names are looked up in; default: <home>/models, then the built-in models/. */
  searchDirs?: string[];
  /** When non-empty, /v1/* requires `Authorization: Bearer <one of these>`. */
  apiKeys?: string[];
  /** With API keys: image requests each key may have in flight (queued, running or streaming); one more is a 429. Default: no bound. */
  maxRequestsPerKey?: number;
  /** Origins whose web pages may call the API from a browser (CORS); `*` for any. None: no CORS headers. */
  corsOrigins?: string[];
  /** Lifetime of image URLs and their files (default 60 min). */
  urlTtlMs?: number;
  /** Jobs that may wait for a worker; more answer 429 (default 16). */
  maxQueue?: number;
  /** Inference worker threads (default 1). */
  workers?: number;
  /** Jobs each worker runs at once, their UNet steps batched (default 1; see EnginePoolOptions.maxBatch). */
  maxBatch?: number;
  /** Models each worker thread keeps loaded (EnginePoolOptions.maxModels: default $KILN_MAX_MODELS, else no bound). */
  maxModels?: number;
  /** Models unused this long are unloaded (EnginePoolOptions.unloadAfterMs; default never). */
  unloadAfterMs?: number;
  /** Per-request limit, queueing included (default 5 min); past it: 504. */
  requestTimeoutMs?: number;
  /** On close: how long running jobs may take to finish before they are cancelled (default 30 s). */
  shutdownTimeoutMs?: number;
  device?: Device;
  /** Largest upload per file (default 4 MiB, Block Entropy's limit). */
  maxUploadBytes?: number;
  /** Largest upload in pixels (default 4096 x 4096). */
  maxUploadPixels?: number;
  /** Most images per edit request (default 16). */
  maxUploadFiles?: number;
  /** Request-body and upload bytes all requests together may hold; past it a request answers 503 (default 256 MiB). */
  maxUploadMemory?: number;
  /** Of those, the bytes of bodies still arriving (default 64 MiB, at most maxUploadMemory); past it: 503. */
  maxIncomingMemory?: number;
  /** The header block must arrive within this of the request's first byte (default 10 s); past it: 408. */
  headersTimeoutMs?: number;
  /** The whole request, body included, must arrive within this (default 2 min); past it: 408. */
  bodyTimeoutMs?: number;
  /** While a body arrives, each window must bring at least this many bytes per second (default 1024; 0: no check); else 408. */
  minBodyRate?: number;
  /** The window the body rate is measured over (default 10 s). */
  bodyRateWindowMs?: number;
  /** How often expired images are deleted (default: a quarter of the TTL, between 0.5 and 15 s). */
  sweepIntervalMs?: number;
  /** Load the default model in the workers at start (default true). */
  preload?: boolean;
  /** A pino logger, or a level for one on stdout (default 'info'); 'silent' for none. */
  logger?: Logger | string;
  /** Replace the inference workers (tests, other backends). */
  runner?: JobRunner;
  queue?: JobQueue;
  store?: ImageStore;
  /** Where uploads wait for their jobs (default: this process's memory; Redis with `redisQueue`). */
  inputs?: InputStore;
  /** Scale-out: jobs go to a BullMQ queue in Redis, run by `kiln worker` processes (no inference threads here). */
  redisQueue?: { url: string; name?: string };
  /** The secret image URLs are signed with (one shared by API hosts, e.g. kept in the bucket); default: <home>/secret. */
  urlSecret?: Buffer;
}

export interface KilnServer {
  app: FastifyInstance;
  queue: JobQueue;
  store: ImageStore;
  metrics: Metrics;
  /** Where it listens, e.g. http://127.0.0.1:1234 (after listen()). */
  readonly url: string;
  /** The base image URLs are built on. */
  readonly publicUrl: string;
  listen(): Promise<string>;
  /** Graceful: stop accepting, answer queued jobs 503 at once, let running ones finish until the shutdown deadline, cancel the rest. */
  close(): Promise<void>;
}

const MINUTE = 60_000;
const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

function makeLogger(option: Logger | string | undefined): Logger {
  if (option && typeof option === 'object') return option;
  return pino({ level: option ?? 'info', base: { service: 'kiln' } });
}

/** A URL fit for logs: the value of any `signature` query parameter replaced. */
export function redactUrl(url: string): string {
  return url.replace(/([?&]signature=)[^&#]*/gi, '$1[redacted]');
}

/** What Fastify's `req` log serializer reads, with the URL redacted. */
function loggedRequest(request: FastifyRequest) {
  return { method: request.method, url: redactUrl(request.url), headers: request.headers, host: request.host, ip: request.ip, socket: request.socket };
}

/**
 * Fastify's own log lines, except that a URL never appears whole: an image URL's signature is
 * its credential. (The lines that carry the URL: incoming request, 5xx errors, unknown routes.)
 */
class RedactingLogController extends LogController {
  override incomingRequest(request: FastifyRequest): void {
    if (!this.isLogDisabled(request)) request.log.info({ req: loggedRequest(request) }, 'incoming request');
  }

  override defaultErrorLog(error: Error, request: FastifyRequest, reply: FastifyReply, metadata?: Record<string, unknown>): void {
    if (reply.statusCode >= 500 && !this.isLogDisabled(request)) reply.log.error({ req: loggedRequest(request), res: reply, err: error }, error?.message);
    else super.defaultErrorLog(error, request, reply, metadata);
  }

  override routeNotFound(request: FastifyRequest): void {
    if (!this.isLogDisabled(request)) request.log.info(`Route ${request.method}:${redactUrl(request.url)} not found`);
  }
}

/** Bytes of a model's UNet on disk (every file of unet/, external weights included); undefined when unknown. */
function unetBytes(model: string, locate: (ref: string) => string): number | undefined {
  try {
    const dir = join(locate(model), 'unet');
    return readdirSync(dir).reduce((sum, name) => sum + statSync(join(dir, name)).size, 0);
  } catch {
    return undefined; // not installed, or a layout without unet/: the default prior
  }
}

function formatHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

export async function createServer(options: ServerOptions): Promise<KilnServer> {
  const home = resolve(options.home);
  const searchDirs = options.searchDirs ?? modelSearchDirs(home);
  const ttlMs = options.urlTtlMs ?? 60 * MINUTE;
  const requestTimeoutMs = options.requestTimeoutMs ?? 5 * MINUTE;
  const shutdownTimeoutMs = options.shutdownTimeoutMs ?? 30_000;
  const limits: UploadLimits = { maxBytes: options.maxUploadBytes ?? 4 * 1024 * 1024, maxPixels: options.maxUploadPixels ?? 4096 * 4096 };
  const maxFiles = options.maxUploadFiles ?? 16;
  const logger = makeLogger(options.logger);
  let models = createModelCatalog(searchDirs, { defaultModel: options.defaultModel, aliases: options.modelAliases, home });
  try {
    readModelAliases(home);
  } catch (err) {
    logger.warn(`${(err as Error).message}; its serving aliases are ignored`);
  }

  const device = options.device ?? 'cpu';
  // retry-after before any job is measured: a guess from the size of the model's UNet (read once per model).
  const priors = new Map<string, number>();
  const prior = (model: string) => {
    let ms = priors.get(model);
    if (ms === undefined) priors.set(model, (ms = priorMsPerStepMp(unetBytes(model, models.locate), device)));
    return ms;
  };
  // Loaded only when scaled out: one machine never loads BullMQ.
  const scaleOut = options.redisQueue && (await Promise.all([import('../queue/bullmq.js'), import('../queue/redis.js')]));
  const redisQueue = options.redisQueue && scaleOut
    ? new scaleOut[0].BullJobQueue({
        redis: scaleOut[1].parseRedisUrl(options.redisQueue.url),
        name: options.redisQueue.name,
        maxQueued: options.maxQueue ?? 16,
        priorMsPerStepMp: (spec) => prior(spec.model),
        onError: (err) => logger.warn({ err }, 'queue connection'),
      })
    : undefined;
  // Uploads: in the bucket with --store s3:// (any worker host reads them there), else in Redis when scaled out, else in memory.
  // Scaled out, the names the live workers announce resolve too (the API host needs no copy of their models).
  if (redisQueue) {
    const fleetQueue = redisQueue;
    models = withFleetModels(models, () => fleetQueue.fleet().workers.flatMap((w) => w.models));
  }
  const inputs = options.inputs ?? (isInputStore(options.store) ? options.store : undefined) ?? redisQueue?.inputs ?? new MemoryInputStore();
  const runner: JobRunner | undefined =
    options.runner ??
    (redisQueue || options.queue ? undefined : new EnginePool({
      size: options.workers ?? 1,
      maxBatch: options.maxBatch,
      maxModels: options.maxModels,
      unloadAfterMs: options.unloadAfterMs,
      catalog: models,
      inputs,
      device,
      onEvent: (e) => {
        if (e.type === 'unloaded' && e.model) metrics.modelUnloads.inc({ model: e.model });
        if (e.type === 'crash' || e.error) logger.error({ err: e.error }, e.message);
        else if (e.type === 'warning') logger.warn(e.message);
        else logger.info(e.message);
      },
    }));
  const queue = options.queue ?? redisQueue ?? new InProcessQueue(runner!, { maxQueued: options.maxQueue ?? 16, priorMsPerStepMp: (spec) => prior(spec.model) });
  const store: ImageStore =
    options.store ??
    new LocalDiskStore({
      dir: join(home, 'images'),
      sweepIntervalMs: options.sweepIntervalMs ?? Math.min(15_000, Math.max(500, ttlMs / 4)),
      onError: (err) => logger.warn({ err }, 'image sweep failed'),
    }).start();
  const signer = new UrlSigner(options.urlSecret ?? loadOrCreateSecret(join(home, 'secret')));
  const localRunner = options.queue ? undefined : runner;
  const metrics = createMetrics(queue, localRunner?.loadedModels ? () => localRunner.loadedModels!() : undefined);

  const bodyTimeoutMs = options.bodyTimeoutMs ?? DEFAULT_SLOW_CLIENT_LIMITS.bodyTimeoutMs;
  const slow: SlowClientLimits = {
    bodyTimeoutMs,
    // Node refuses a header deadline past the whole request's.
    headersTimeoutMs: Math.min(options.headersTimeoutMs ?? DEFAULT_SLOW_CLIENT_LIMITS.headersTimeoutMs, bodyTimeoutMs),
    minBodyRate: options.minBodyRate ?? DEFAULT_SLOW_CLIENT_LIMITS.minBodyRate,
    bodyRateWindowMs: options.bodyRateWindowMs ?? DEFAULT_SLOW_CLIENT_LIMITS.bodyRateWindowMs,
  };

  const app = Fastify({
    loggerInstance: logger as FastifyBaseLogger,
    // Fastify's default (0) would let a request take forever to arrive.
    requestTimeout: slow.bodyTimeoutMs,
    http: {
      headersTimeout: slow.headersTimeoutMs,
      requestTimeout: slow.bodyTimeoutMs,
      connectionsCheckingInterval: connectionsCheckingInterval(slow),
    },
    requestIdHeader: false,
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && REQUEST_ID.test(given) ? given : `req_${randomBytes(12).toString('hex')}`;
    },
    bodyLimit: 1024 * 1024,
    logController: new RedactingLogController(),
    forceCloseConnections: 'idle',
    frameworkErrors,
    clientErrorHandler,
  });
  // Schemas document the API (OpenAPI); validation is params.ts, which answers in OpenAI's shape.
  app.setValidatorCompiler(() => () => true);
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));

  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Kiln images API',
        version: '0.1.0',
        description:
          options.nMeaning === 'count'
            ? "Block Entropy's OpenAI-compatible images API, served by Kiln. This server counts images with `n` (OpenAI's meaning); the seed goes in `seed`."
            : "Block Entropy's OpenAI-compatible images API, served by Kiln. `n` is the seed; one image per request.",
      },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    },
  });
  await app.register(multipart, {
    limits: {
      fileSize: limits.maxBytes,
      files: maxFiles + 1, // the images and a mask
      fields: 64,
      fieldSize: 64 * 1024,
      parts: maxFiles + 65,
      headerPairs: 100,
    },
  });

  let closing = false;
  let listenUrl = '';
  let publicBase = options.publicUrl?.replace(/\/+$/, '') ?? '';

  const rateGuard = new BodyRateGuard(slow, (request, socket) => {
    logger.info({ method: request.method, url: request.url?.slice(0, 200), minBodyRate: slow.minBodyRate }, 'request body too slow: connection closed');
    answerAndClose(socket, 408, 'Request Timeout', `The request body arrived slower than ${slow.minBodyRate} bytes per second.`, 'request_timeout');
  });

  // Hooks and handlers on the root instance reach every route plugin below, and unknown routes.
  app.addHook('onRequest', async (request, reply) => {
    rateGuard.track(request.raw);
    reply.header('x-request-id', request.id);
    if (closing) {
      throw new ApiError(503, 'The server is shutting down.', null, 'shutting_down', { headers: { ...SHUTTING_DOWN_HEADERS } });
    }
  });
  // Before the key check: a browser's preflight carries no key, and errors need the headers too.
  if (options.corsOrigins?.length) await app.register(cors, corsOptions(options.corsOrigins));
  addApiKeyAuth(app, options.apiKeys ?? []);
  if (options.maxRequestsPerKey !== undefined) addPerKeyRequestLimit(app, options.maxRequestsPerKey, () => queue.estimatedWaitSeconds());
  app.addHook('onResponse', async (request, reply) => {
    const route = request.routeOptions.url ?? 'unmatched';
    metrics.httpRequests.inc({ method: request.method, route, status: String(reply.statusCode) });
    metrics.httpDuration.observe({ method: request.method, route }, reply.elapsedTime / 1000);
  });
  // An answer sent before its request's body was read to the end (an early error in a form, a
  // refused upload) leaves the rest paused in a parser, and the connection would never get to
  // its next request: read and discard it, as Node does for bodies nobody reads (the slow-client
  // limits bound how long that may take).
  app.addHook('onResponse', async (request) => {
    const raw = request.raw;
    if (!raw.complete && !raw.destroyed) {
      raw.unpipe();
      raw.resume();
    }
  });
  setErrorHandlers(app, metrics);

  const images = createImagesService({ queue, store, inputs, signer, models, home, ttlMs, requestTimeoutMs, publicUrl: () => publicBase });
  const maxUploadMemory = options.maxUploadMemory ?? 256 * 1024 * 1024;
  const budget = new UploadBudget(maxUploadMemory, Math.min(options.maxIncomingMemory ?? 64 * 1024 * 1024, maxUploadMemory));
  await app.register(imageRoutes, { images, limits, maxFiles, budget, nMeaning: options.nMeaning ?? 'seed' });
  await app.register(fileRoutes, { store, signer });
  await app.register(modelRoutes, { models });
  await app.register(opsRoutes, { queue, metrics, runner: localRunner });
  await app.register(playgroundRoutes);

  let closePromise: Promise<void> | undefined;
  const server: KilnServer = {
    app,
    queue,
    store,
    metrics,
    get url() {
      return listenUrl;
    },
    get publicUrl() {
      return publicBase;
    },
    async listen() {
      await app.listen({ host: options.host ?? '127.0.0.1', port: options.port ?? 1234 });
      const address = app.server.address();
      if (address && typeof address === 'object') {
        listenUrl = `http://${formatHost(address.address)}:${address.port}`;
        if (!publicBase) {
          const unspecified = address.address === '0.0.0.0' || address.address === '::';
          publicBase = unspecified ? `http://${address.family === 'IPv6' ? '[::1]' : '127.0.0.1'}:${address.port}` : listenUrl;
          if (unspecified) logger.warn(`listening on all interfaces: image URLs use ${publicBase}; set --public-url to what clients reach`);
        }
      }
      if (options.preload ?? true) {
        if (runner?.preload && !options.queue) {
          try {
            runner.preload(models.resolve(undefined).ref);
          } catch (err) {
            logger.warn((err as Error).message);
          }
        }
      }
      return listenUrl;
    },
    close() {
      closePromise ??= (async () => {
        closing = true;
        // Stop listening and drop idle keep-alive connections now; requests in flight go on.
        const appClosed = app.close();
        // Queued jobs are cancelled now, running ones finish until the deadline (their requests answer 503 otherwise).
        await queue.close(shutdownTimeoutMs);
        // Responses still being written (a client that stopped reading) get a short grace.
        let grace: NodeJS.Timeout | undefined;
        await Promise.race([appClosed, new Promise((r) => (grace = setTimeout(r, 2_000)))]);
        clearTimeout(grace);
        app.server.closeAllConnections();
        await appClosed;
        rateGuard.close();
        await runner?.close();
        await store.close();
      })();
      return closePromise;
    },
  };
  return server;
}
