/**
 * OpenAI's error envelope on every failure path: Fastify's error and not-found handlers, the
 * router's own rejections (frameworkErrors) and malformed HTTP (clientErrorHandler).
 */
import type { Socket } from 'node:net';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { ApiError, ClientGoneError, toApiError } from './errors.js';
import type { Metrics } from './metrics.js';

/** Fastify's `frameworkErrors` option: URLs the router rejects before any hook runs (bad escapes, over-long path parameters). */
export function frameworkErrors(error: FastifyError, request: FastifyRequest, reply: FastifyReply): void {
  const code = (error as { code?: string }).code;
  const api =
    code === 'FST_ERR_MAX_PARAM_LENGTH'
      ? new ApiError(414, 'The URL is too long.', null, 'uri_too_long')
      : code === 'FST_ERR_BAD_URL'
        ? new ApiError(400, 'The URL is not valid.', null, 'invalid_url')
        : new ApiError(500, 'The server had an error while routing your request.', null, 'internal_error');
  if (api.status >= 500) request.log.error({ err: error }, api.message);
  void (reply as unknown as FastifyReply)
    .code(api.status)
    .headers({ 'x-request-id': request.id, 'x-should-retry': api.status < 500 ? 'false' : 'true' })
    .type('application/json')
    .send(api.body());
}

/**
 * Answers on a bare socket (no Fastify reply exists, or it cannot be used) and closes it. The
 * answer is written only where it cannot corrupt the stream: no response in flight on this
 * connection, or one whose headers have not gone out yet (as Node itself does).
 */
export function answerAndClose(socket: Socket, status: number, text: string, message: string, code: string): void {
  const inFlight = (socket as Socket & { _httpMessage?: { headersSent?: boolean } | null })._httpMessage;
  if (socket.writable && !inFlight?.headersSent) {
    const body = JSON.stringify(new ApiError(status, message, null, code).body());
    socket.write(
      `HTTP/1.1 ${status} ${text}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nContent-Type: application/json\r\n` +
        `x-should-retry: false\r\nConnection: close\r\n\r\n${body}`,
    );
  }
  socket.destroy();
}

/** Fastify's `clientErrorHandler` option: malformed HTTP (bad request line, oversized headers) and Node's header and request deadlines still get OpenAI's envelope. */
export function clientErrorHandler(err: Error, socket: Socket): void {
  if ((err as NodeJS.ErrnoException).code === 'ECONNRESET' || socket.destroyed) return;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'HPE_HEADER_OVERFLOW') answerAndClose(socket, 431, 'Request Header Fields Too Large', 'The request headers are too large.', 'malformed_http');
  else if (code === 'ERR_HTTP_REQUEST_TIMEOUT') answerAndClose(socket, 408, 'Request Timeout', 'The request took too long to arrive.', 'request_timeout');
  else answerAndClose(socket, 400, 'Bad Request', 'The request is not valid HTTP.', 'malformed_http');
}

/**
 * Sets `app`'s error handler (anything thrown becomes the envelope, logged by severity; a client
 * that went away is logged as 499 and its socket dropped) and its not-found handler (404 unknown_route).
 */
export function setErrorHandlers(app: FastifyInstance, metrics: Metrics): void {
  app.setErrorHandler(async (error: unknown, request, reply) => {
    if (error instanceof ClientGoneError) {
      // Nothing can be sent; log it as nginx does.
      request.log.info({ statusCode: 499 }, error.message);
      metrics.httpRequests.inc({ method: request.method, route: request.routeOptions.url ?? 'unmatched', status: '499' });
      reply.hijack();
      if (!reply.raw.destroyed) reply.raw.destroy();
      return;
    }
    const api = toApiError(error);
    const expected = api.code === 'shutting_down' || api.code === 'timeout' || api.code === 'cancelled';
    if (api.status >= 500 && !expected) request.log.error({ err: (api.cause as Error | undefined) ?? error, status: api.status }, api.message);
    else if (api.status >= 500) request.log.warn({ status: api.status, code: api.code }, api.message);
    else request.log.info({ status: api.status, code: api.code, param: api.param }, api.message);
    const headers: Record<string, string> = { 'x-should-retry': api.status >= 400 && api.status < 500 ? 'false' : 'true', ...api.headers };
    return reply.code(api.status).headers(headers).type('application/json').send(api.body());
  });

  app.setNotFoundHandler(async (request) => {
    throw new ApiError(404, `Unknown route: ${request.method} ${request.url.split('?')[0]}.`, null, 'unknown_route');
  });
}
