/**
 * Kiln's HTTP server: Block Entropy's images API (OpenAI-compatible) on Fastify.
 *
 *   POST /v1/images/generations   JSON          -> queue -> inference worker -> store / inline
 *   POST /v1/images/edits         multipart     img2img; + mask: inpainting; user=cn / pose:<w>: pose (ControlNet)
 *   GET  /v1/models, /v1/models/:id             installed models, read from disk per request
 *   GET  /images/:key?expires&signature         signed, expiring image URLs (no API key)
 *   GET  /ping /health /metrics /openapi.json
 *
 * The routes see only the JobQueue and ImageStore interfaces (src/queue, src/store).
 */
import { statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import multipart from '@fastify/multipart';
import swagger from '@fastify/swagger';
import { pino, type Logger } from 'pino';
import { modelSearchDirs } from '../engine/locate.js';
import { checkMaskMatchesImage } from '../engine/inpaint.js';
import { randomSeed } from '../engine/rng.js';
import type { Device } from '../engine/onnx.js';
import { InProcessQueue } from '../queue/memory.js';
import { JobCancelledError, type JobQueue, type JobRunner, type JobSpec } from '../queue/types.js';
import { LocalDiskStore } from '../store/local.js';
import type { ImageStore } from '../store/types.js';
import { addApiKeyAuth } from './auth.js';
import { clientErrorHandler, frameworkErrors, setErrorHandlers } from './error-handlers.js';
import { ApiError, ClientGoneError } from './errors.js';
import { EnginePool } from './engine-pool.js';
import { createMetrics, type Metrics } from './metrics.js';
import { createModelCatalog, type ResolvedModel } from './model-catalog.js';
import { DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, paramsSchema, parsePoseUser, readParams, type ImageParams } from './params.js';
import type { EditJobOutput, EditJobSpec } from './engine-protocol.js';
import { resolvePoseAssets } from './pose-assets.js';
import { loadOrCreateSecret, UrlSigner } from './signing.js';
import { checkPngUpload, type UploadLimits } from './uploads.js';

export interface ServerOptions {
  /** Kiln's home folder: models/, images/, the URL-signing secret. */
  home: string;
  host?: string;
  port?: number;
  /** Base of image URLs (behind a reverse proxy); default: the listening address. */
  publicUrl?: string;
  /** Model name or folder used when a request names none; default: defaultModelName(). */
  defaultModel?: string;
  /** When non-empty, /v1/* requires `Authorization: Bearer <one of these>`. */
  apiKeys?: string[];
  /** Lifetime of image URLs and their files (default 60 min). */
  urlTtlMs?: number;
  /** Jobs that may wait for a worker; more answer 429 (default 16). */
  maxQueue?: number;
  /** Inference worker threads (default 1). */
  workers?: number;
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
  /** Graceful: stop accepting, let jobs finish until the shutdown deadline, cancel the rest. */
  close(): Promise<void>;
}

const MINUTE = 60_000;
const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

function makeLogger(option: Logger | string | undefined): Logger {
  if (option && typeof option === 'object') return option;
  return pino({ level: option ?? 'info', base: { service: 'kiln' } });
}

function formatHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

export async function createServer(options: ServerOptions): Promise<KilnServer> {
  const home = resolve(options.home);
  const searchDirs = modelSearchDirs(home);
  const ttlMs = options.urlTtlMs ?? 60 * MINUTE;
  const requestTimeoutMs = options.requestTimeoutMs ?? 5 * MINUTE;
  const shutdownTimeoutMs = options.shutdownTimeoutMs ?? 30_000;
  const limits: UploadLimits = { maxBytes: options.maxUploadBytes ?? 4 * 1024 * 1024, maxPixels: options.maxUploadPixels ?? 4096 * 4096 };
  const maxFiles = options.maxUploadFiles ?? 16;
  const logger = makeLogger(options.logger);
  const models = createModelCatalog(searchDirs, options.defaultModel);

  const runner =
    options.runner ??
    new EnginePool({
      size: options.workers ?? 1,
      searchDirs,
      device: options.device ?? 'cpu',
      env: { ...process.env, KILN_HOME: home },
      onEvent: (e) => (e.type === 'crash' || e.error ? logger.error({ err: e.error }, e.message) : logger.info(e.message)),
    });
  const queue = options.queue ?? new InProcessQueue(runner, { maxQueued: options.maxQueue ?? 16 });
  const store: ImageStore =
    options.store ??
    new LocalDiskStore({
      dir: join(home, 'images'),
      sweepIntervalMs: options.sweepIntervalMs ?? Math.min(15_000, Math.max(500, ttlMs / 4)),
      onError: (err) => logger.warn({ err }, 'image sweep failed'),
    }).start();
  const signer = new UrlSigner(loadOrCreateSecret(join(home, 'secret')));
  const metrics = createMetrics(queue);

  const app = Fastify({
    loggerInstance: logger as FastifyBaseLogger,
    requestIdHeader: false,
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && REQUEST_ID.test(given) ? given : `req_${randomBytes(12).toString('hex')}`;
    },
    bodyLimit: 1024 * 1024,
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
        description: "Block Entropy's OpenAI-compatible images API, served by Kiln. `n` is the seed; one image per request.",
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

  app.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id);
    if (closing) {
      throw new ApiError(503, 'The server is shutting down.', null, 'shutting_down', { headers: { 'x-should-retry': 'true' } });
    }
  });
  addApiKeyAuth(app, options.apiKeys ?? []);
  app.addHook('onResponse', async (request, reply) => {
    const route = request.routeOptions.url ?? 'unmatched';
    metrics.httpRequests.inc({ method: request.method, route, status: String(reply.statusCode) });
    metrics.httpDuration.observe({ method: request.method, route }, reply.elapsedTime / 1000);
  });
  setErrorHandlers(app, metrics);

  // ---- images -----------------------------------------------------------------------------

  function headerValue(v: string | number): string {
    return encodeURIComponent(String(v)).replace(/%20/g, ' ');
  }

  interface EditInput {
    images: Buffer[];
    mask?: Buffer;
    pose?: EditJobSpec['pose'];
  }

  async function runImageJob(
    request: FastifyRequest,
    reply: FastifyReply,
    params: ImageParams,
    kind: JobSpec['kind'],
    edit?: EditInput,
    resolved?: ResolvedModel,
  ) {
    const model = resolved ?? models.resolve(params.model);
    const seed = params.seed ?? randomSeed();
    const spec: EditJobSpec = {
      kind,
      model: model.ref,
      options: {
        prompt: params.prompt,
        negativePrompt: params.negativePrompt,
        seed,
        size: params.size,
        quality: params.quality,
        steps: params.steps,
        scheduler: params.scheduler,
        guidanceScale: params.guidanceScale,
      },
      output: { format: params.outputFormat, quality: params.outputCompression },
    };
    const mode = kind === 'generate' ? 'generate' : edit?.pose ? 'pose' : edit?.mask ? 'inpaint' : 'img2img';
    if (edit) {
      spec.images = edit.images;
      if (edit.mask) spec.mask = edit.mask;
      if (edit.pose) spec.pose = edit.pose;
      else spec.strength = params.strength ?? (edit.mask ? DEFAULT_INPAINT_STRENGTH : DEFAULT_STRENGTH);
    }
    const received = performance.now();
    const job = queue.submit(spec, { timeoutMs: requestTimeoutMs, requestId: request.id });
    request.log.debug({ job: job.id, kind, mode, model: model.id, seed }, 'job queued');
    const onClose = () => {
      if (!reply.raw.writableEnded) job.cancel(new JobCancelledError('the client disconnected', 'client'));
    };
    reply.raw.on('close', onClose);
    // Gone already (while its upload was being checked): 'close' has fired before we listened.
    if (reply.raw.destroyed || request.raw.socket?.destroyed) onClose();
    job.events.on('progress', (p) => request.log.debug({ job: job.id, stage: p.stage, step: p.step, totalSteps: p.totalSteps }, 'progress'));
    let output: EditJobOutput;
    try {
      output = await job.result;
    } catch (err) {
      if (err instanceof JobCancelledError && err.reason === 'client') {
        throw new ClientGoneError(`client disconnected; job ${job.id} cancelled at ${job.progress ? `${job.progress.stage} step ${job.progress.step}/${job.progress.totalSteps}` : 'queue'}`);
      }
      throw err;
    } finally {
      reply.raw.off('close', onClose);
    }
    if (reply.raw.destroyed) throw new ClientGoneError(`client disconnected; job ${job.id} finished unread`);

    const s = output.settings;
    const queueMs = job.queuedMs ?? 0;
    const totalMs = performance.now() - received;
    const item: Record<string, unknown> = {};
    let expiresAt: number | undefined;
    const put = async (bytes: Buffer) => {
      const stored = await store.put(bytes, { contentType: output.contentType, ttlMs });
      expiresAt = stored.expiresAt;
      return (await store.externalUrl?.(stored)) ?? `${publicBase}${signer.path(stored.key, stored.expiresAt)}`;
    };
    if (params.responseFormat === 'b64_json') {
      item.b64_json = output.bytes.toString('base64');
      if (output.pose) item.b64_json_pose = output.pose.toString('base64');
    } else {
      item.url = await put(output.bytes);
      if (output.pose) item.url_pose = await put(output.pose);
    }
    item.seed = s.seed;
    item.revised_prompt = null;

    reply.headers({
      'x-kiln-model': headerValue(model.id),
      'x-kiln-seed': String(s.seed),
      'x-kiln-size': `${s.width}x${s.height}`,
      'x-kiln-quality': headerValue(s.quality),
      'x-kiln-steps': String(s.steps),
      'x-kiln-scheduler': headerValue(s.scheduler),
      'x-kiln-guidance-scale': String(s.guidanceScale),
      'x-kiln-queue-ms': queueMs.toFixed(0),
      'x-kiln-generation-ms': output.timings.totalMs.toFixed(0),
      'server-timing': `queue;dur=${queueMs.toFixed(1)}, generate;dur=${output.timings.totalMs.toFixed(1)}, total;dur=${totalMs.toFixed(1)}`,
    });
    return {
      created: Math.floor(Date.now() / 1000),
      data: [item],
      size: `${s.width}x${s.height}`,
      quality: s.quality,
      output_format: output.format,
      kiln: {
        model: model.id,
        seed: s.seed,
        size: `${s.width}x${s.height}`,
        quality: s.quality,
        steps: s.steps,
        scheduler: s.scheduler,
        guidance_scale: s.guidanceScale,
        negative_prompt: s.negativePrompt,
        ...(kind === 'edit' ? { mode } : {}),
        ...(s.strength !== undefined ? { strength: s.strength } : {}),
        ...(edit?.pose ? { control_scale: edit.pose.scale, people: output.people ?? null } : {}),
        ...(expiresAt !== undefined ? { expires_at: Math.floor(expiresAt / 1000) } : {}),
        timings: {
          queue_ms: Math.round(queueMs),
          generation_ms: Math.round(output.timings.totalMs),
          total_ms: Math.round(totalMs),
        },
      },
    };
  }

  const imageItemSchema = {
    type: 'object',
    properties: {
      url: { type: 'string', description: 'Signed URL, valid until it expires (response_format=url).' },
      b64_json: { type: 'string', description: 'The image, base64 (response_format=b64_json).' },
      url_pose: { type: 'string', description: 'Edits in pose mode: the skeleton picture the image followed, as a signed URL.' },
      b64_json_pose: { type: 'string', description: 'Edits in pose mode: the skeleton picture, base64 (same format as the image).' },
      seed: { type: 'integer', description: 'The seed used.' },
      revised_prompt: { type: 'null' },
    },
  };
  const imagesResponseSchema = {
    200: {
      type: 'object',
      properties: {
        created: { type: 'integer' },
        data: { type: 'array', items: imageItemSchema },
        size: { type: 'string' },
        quality: { type: 'string' },
        output_format: { type: 'string' },
        kiln: { type: 'object', description: 'Effective settings and timings (also in x-kiln-* headers).', additionalProperties: true },
      },
    },
    default: {
      type: 'object',
      description: "OpenAI's error envelope.",
      properties: {
        error: {
          type: 'object',
          properties: { message: { type: 'string' }, type: { type: 'string' }, param: { type: ['string', 'null'] }, code: { type: ['string', 'null'] } },
        },
      },
    },
  };

  app.post(
    '/v1/images/generations',
    {
      schema: {
        summary: 'Create an image from a prompt',
        body: paramsSchema('generations', 'json'),
        response: imagesResponseSchema,
        security: [{ bearer: [] }],
      },
      preValidation: async (request) => {
        const type = String(request.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
        if (type !== 'application/json') {
          throw new ApiError(415, `This endpoint takes application/json, not '${type || 'no content type'}'.`, null, 'unsupported_media_type');
        }
      },
    },
    async (request, reply) => runImageJob(request, reply, readParams(request.body, 'generations', 'json'), 'generate'),
  );

  const editsFormSchema = paramsSchema('edits', 'form') as { properties: Record<string, unknown>; required: string[] };
  app.post(
    '/v1/images/edits',
    {
      schema: {
        summary: 'Edit an uploaded PNG: image-to-image, inpainting (with a mask) or pose-guided (user=cn)',
        description:
          'Without a mask: image-to-image (strength default 0.75). With a mask (same dimensions as the image; transparent pixels, ' +
          'or white ones in a mask without transparency, are repainted): inpainting (strength default 1). With `user=cn`, `pose:<w>` ' +
          'or a weight list with `pose`: the pose of the person in the image guides a new image (ControlNet OpenPose); the skeleton ' +
          'picture comes back as `url_pose` / `b64_json_pose`.',
        consumes: ['multipart/form-data'],
        body: {
          ...editsFormSchema,
          required: ['image', ...editsFormSchema.required],
          properties: {
            image: { type: 'string', format: 'binary', description: `PNG under ${limits.maxBytes} bytes (also image[]; the first is used).` },
            mask: {
              type: 'string',
              format: 'binary',
              description:
                "PNG with the image's dimensions: fully transparent pixels are repainted (OpenAI's convention); in a mask without transparency, white ones are.",
            },
            ...editsFormSchema.properties,
          },
        },
        response: imagesResponseSchema,
        security: [{ bearer: [] }],
      },
      preValidation: async (request) => {
        if (!request.isMultipart()) {
          const type = String(request.headers['content-type'] ?? '').split(';')[0]!.trim();
          throw new ApiError(415, `This endpoint takes multipart/form-data, not '${type || 'no content type'}'.`, null, 'unsupported_media_type');
        }
      },
    },
    async (request, reply) => {
      const fields: Record<string, string | string[]> = {};
      const images: Buffer[] = [];
      let mask: Buffer | undefined;
      try {
        for await (const part of request.parts()) {
          const name = part.fieldname;
          if (part.type === 'file') {
            if (name === 'image' || name === 'image[]') {
              if (images.length >= maxFiles) throw new ApiError(400, `At most ${maxFiles} images per request.`, 'image', 'too_many_files');
              images.push(await part.toBuffer());
            } else if (name === 'mask') {
              mask = await part.toBuffer();
            } else {
              throw new ApiError(400, `Unexpected file field '${name.slice(0, 64)}'; files go in 'image' (or 'image[]') and 'mask'.`, name.slice(0, 64), 'invalid_field');
            }
          } else {
            if (name === 'image' || name === 'image[]' || name === 'mask') {
              throw new ApiError(400, `'${name}' must be a file upload.`, name === 'mask' ? 'mask' : 'image', 'invalid_type');
            }
            if (part.valueTruncated) throw new ApiError(413, `Form field '${name.slice(0, 64)}' is too long.`, name.slice(0, 64), 'field_too_large');
            const value = String(part.value);
            const prev = fields[name];
            fields[name] = prev === undefined ? value : Array.isArray(prev) ? [...prev, value] : [prev, value];
          }
        }
      } catch (err) {
        if (err instanceof ApiError || (err as { code?: string }).code?.startsWith('FST_')) throw err;
        throw new ApiError(400, `The multipart body is malformed: ${err instanceof Error ? err.message : String(err)}.`, null, 'invalid_multipart');
      }
      const params = readParams(fields, 'edits', 'form');
      if (images.length === 0) throw new ApiError(400, "Missing required parameter: 'image' (a PNG file).", 'image', 'missing_required_parameter');
      for (const image of images) await checkPngUpload(image, 'image', limits);
      const image = images[0]!;
      if (mask) {
        await checkPngUpload(mask, 'mask', limits);
        await checkMaskMatchesImage(image, mask);
      }
      const poseScale = parsePoseUser(params.user);
      if (poseScale !== undefined && mask) {
        throw new ApiError(400, 'A mask cannot be combined with pose mode (user=cn / pose:<w>); send one or the other.', 'mask', 'unsupported_value');
      }
      const model = models.resolve(params.model);
      let pose: EditJobSpec['pose'];
      if (poseScale !== undefined) {
        const assets = resolvePoseAssets(models.dir(model), model.id, home);
        request.log.debug({ model: model.id, ...assets.sources }, 'pose assets');
        pose = { scale: poseScale, controlNet: assets.controlNet, dwpose: assets.dwpose };
      }
      return runImageJob(request, reply, params, 'edit', { images: [image], mask, pose }, model);
    },
  );

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

  // ---- models and status ------------------------------------------------------------------

  function modelObject(m: { id: string; dir: string }) {
    let created = 0;
    try {
      created = Math.floor(statSync(m.dir).mtimeMs / 1000);
    } catch {
      // listed a moment ago, gone now
    }
    return { id: m.id, object: 'model', created, owned_by: 'kiln' };
  }

  app.get('/v1/models', { schema: { summary: 'Installed models (read from disk on every call)', security: [{ bearer: [] }] } }, async () => ({
    object: 'list',
    data: models.installed().map(modelObject),
  }));

  app.get('/v1/models/:model', { schema: { summary: 'One installed model', security: [{ bearer: [] }] } }, async (request) => {
    const { model } = request.params as { model: string };
    const found = models.installed().find((m) => m.id === model);
    if (!found) throw new ApiError(404, `The model '${model.slice(0, 80)}' does not exist; install it with \`kiln pull ${model.slice(0, 80)}\`.`, 'model', 'model_not_found');
    return modelObject(found);
  });

  app.get('/ping', { schema: { summary: 'Jobs running and waiting' } }, async () => {
    const s = queue.stats();
    return { active: s.active, queued: s.queued, max_queued: s.maxQueued, concurrency: s.concurrency };
  });

  const started = Date.now();
  app.get('/health', { schema: { summary: 'Liveness' } }, async () => ({ status: 'ok', uptime_s: Math.round((Date.now() - started) / 1000) }));

  app.get('/metrics', { schema: { summary: 'Prometheus metrics', hide: false } }, async (_request, reply) => {
    reply.type(metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());

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
        if (runner instanceof EnginePool) {
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
        // Jobs finish until the deadline, then are cancelled (their requests answer 503).
        await queue.close(shutdownTimeoutMs);
        // Responses still being written (a client that stopped reading) get a short grace.
        let grace: NodeJS.Timeout | undefined;
        await Promise.race([appClosed, new Promise((r) => (grace = setTimeout(r, 2_000)))]);
        clearTimeout(grace);
        app.server.closeAllConnections();
        await appClosed;
        await runner.close();
        await store.close();
      })();
      return closePromise;
    },
  };
  return server;
}
