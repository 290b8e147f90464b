/**
 * `stream: true` on the images endpoints: server-sent events in OpenAI's shape.
 *
 *   data: {"type":"image_generation.partial_image","b64_json":...,"partial_image_index":0,...}
 *   data: {"type":"image_generation.completed","b64_json":...,...}
 *
 * (`image_edit.*` on edits). Frames are data-only with the type inside the JSON, which every
 * version of the official SDKs parses; Kiln's own fields (seed, step, total_steps, kiln) ride
 * along. The response starts with the first event: anything that fails before it (validation, a
 * full queue, a model that does not load) is an ordinary HTTP error, anything after it an
 * `{"type":"error","error":{message,type,param,code}}` event (the SDKs raise it as an APIError).
 * A client that goes away cancels its job, as for any request (images-service.ts).
 */
import type { FastifyReply } from 'fastify';
import { ClientGoneError, toApiError } from './errors.js';
import type { Caller, StreamHooks } from './images-service.js';
import type { ImageParams } from './params.js';

export type StreamKind = 'image_generation' | 'image_edit';

interface ServiceResult {
  headers: Record<string, string>;
  body: {
    created: number;
    data: Record<string, unknown>[];
    size: string;
    quality: string;
    output_format: string;
    kiln: Record<string, unknown>;
  };
}

/**
 * Runs `run` (the images service, given the stream's hooks) and answers with its events; resolves
 * when the response is over. Before the first event nothing is written, so errors up to then
 * are thrown to the route's error handler as usual.
 */
export async function streamImages(
  caller: Caller,
  reply: FastifyReply,
  kind: StreamKind,
  params: ImageParams,
  run: (hooks: StreamHooks) => Promise<ServiceResult>,
): Promise<void> {
  const res = reply.raw;
  let started = false;
  const start = (headers: Record<string, string> = {}) => {
    if (started) return;
    started = true;
    reply.hijack();
    res.writeHead(200, {
      ...(reply.getHeaders() as Record<string, string>),
      ...headers,
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      // Proxies that buffer (nginx) would hold the partial images back.
      'x-accel-buffering': 'no',
    });
  };
  const send = (event: Record<string, unknown>) => {
    if (!res.destroyed) res.write(`data: ${JSON.stringify(event)}\n\n`);
  };
  const common = { background: 'opaque', output_format: params.outputFormat };

  try {
    const result = await run({
      onPartial(p) {
        start();
        send({
          type: `${kind}.partial_image`,
          b64_json: p.bytes.toString('base64'),
          partial_image_index: p.index,
          created_at: Math.floor(Date.now() / 1000),
          size: `${p.width}x${p.height}`,
          quality: params.quality,
          ...common,
          seed: p.seed,
          step: p.step,
          total_steps: p.totalSteps,
          ...(params.count > 1 ? { image_index: p.imageIndex } : {}),
        });
      },
    });
    // Without partial images nothing has gone out yet: the settings headers still can.
    start(result.headers);
    const { body } = result;
    for (const [i, item] of body.data.entries()) {
      const { b64_json, ...rest } = item;
      send({
        type: `${kind}.completed`,
        b64_json,
        created_at: body.created,
        size: body.size,
        quality: body.quality,
        ...common,
        output_format: body.output_format,
        ...rest,
        ...(body.data.length > 1 ? { image_index: i } : {}),
        kiln: body.kiln,
      });
    }
    res.end();
  } catch (err) {
    if (!started) throw err;
    if (err instanceof ClientGoneError || res.destroyed) {
      caller.log.info({ statusCode: 499 }, err instanceof Error ? err.message : 'client disconnected');
      if (!res.destroyed) res.destroy();
      return;
    }
    const api = toApiError(err);
    if (api.status >= 500 && api.code !== 'shutting_down' && api.code !== 'timeout' && api.code !== 'cancelled') {
      caller.log.error({ err: (api.cause as Error | undefined) ?? err, status: api.status }, `${api.message} (after the stream started)`);
    } else {
      caller.log.info({ status: api.status, code: api.code }, `${api.message} (after the stream started)`);
    }
    send({ type: 'error', error: api.body().error });
    res.end();
  }
}
