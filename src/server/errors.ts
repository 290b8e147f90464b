/**
 * Every error the server sends, in OpenAI's envelope:
 *   {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
 * with the status the official SDKs map to their error classes.
 */
import { AssetUnavailableError } from '../catalog/errors.js';
import {
  DeviceUnavailableError,
  GenerationCancelledError,
  InvalidOptionError,
  ModelLoadError,
  ModelNotFoundError,
  NumericalError,
} from '../engine/errors.js';
import { NoPersonError } from '../engine/pose-control.js';
import { JobCancelledError, JobTimeoutError, NoWorkerError, QueueClosedError, QueueFullError, QueueUnavailableError } from '../queue/types.js';
import { StoreUnavailableError } from '../store/errors.js';

export type ErrorType = 'invalid_request_error' | 'authentication_error' | 'server_error';

export interface ErrorBody {
  error: { message: string; type: ErrorType; param: string | null; code: string | null };
}

export class ApiError extends Error {
  override name = 'ApiError';
  readonly headers: Record<string, string>;
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    options: { type?: ErrorType; headers?: Record<string, string>; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.type = options.type ?? (status === 401 ? 'authentication_error' : status >= 500 ? 'server_error' : 'invalid_request_error');
    this.headers = options.headers ?? {};
  }
  readonly type: ErrorType;

  body(): ErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** A client went away before its image was ready: nothing is sent, 499 is logged. */
export class ClientGoneError extends Error {
  override name = 'ClientGoneError';
}

/** Fastify's own errors (parsing, limits) as API errors. */
function fromFastify(err: { code?: string; statusCode?: number; message: string }): ApiError | undefined {
  switch (err.code) {
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return new ApiError(400, `We could not parse the JSON body of your request: ${err.message}`, null, 'invalid_json');
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return new ApiError(400, 'The request body does not match its Content-Length.', null, 'invalid_body');
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new ApiError(413, `The request body is too large: ${err.message}.`, null, 'request_too_large');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
    case 'FST_ERR_CTP_INVALID_TYPE':
      return new ApiError(415, `Unsupported content type: ${err.message}.`, null, 'unsupported_media_type');
    case 'FST_ERR_CTP_INVALID_CONTENT_TYPE':
      return new ApiError(415, 'The Content-Type header is not valid.', null, 'unsupported_media_type');
    case 'FST_REQ_FILE_TOO_LARGE':
      return new ApiError(413, 'An uploaded file is larger than the server accepts.', 'image', 'file_too_large');
    case 'FST_FILES_LIMIT':
      return new ApiError(413, 'Too many files in the form.', 'image', 'too_many_files');
    case 'FST_FIELDS_LIMIT':
    case 'FST_PARTS_LIMIT':
      return new ApiError(413, 'Too many fields in the form.', null, 'too_many_fields');
    case 'FST_PROTO_VIOLATION':
      return new ApiError(400, 'A form field name is not allowed.', null, 'invalid_field');
    case 'FST_INVALID_MULTIPART_CONTENT_TYPE':
      return new ApiError(415, 'This endpoint takes multipart/form-data.', null, 'unsupported_media_type');
    case 'FST_INVALID_JSON_FIELD_ERROR':
      return new ApiError(400, 'A form field declared as JSON is not valid JSON.', null, 'invalid_json');
    case 'FST_MP_PREMATURE_CLOSE':
      return new ApiError(400, 'The multipart body ended before it was complete.', null, 'invalid_multipart');
  }
  if (typeof err.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 500) {
    return new ApiError(err.statusCode, err.message, null, err.code ?? null);
  }
  return undefined;
}

/**
 * A message fit for clients: every absolute path in it (a server folder, a LoRA or model file)
 * shortened to its last part. The full message stays in the server's log.
 */
export function redactPaths(message: string): string {
  // API routes (/v1/...) are not server paths.
  const path = /(^|[\s"'`(=,])\/(?!v1\/)((?:[^\s"'`():,/]+\/)+)([^\s"'`():,/]*)/g;
  return message.replace(path, (_, before: string, dirs: string, last: string) => before + (last || dirs.split('/').at(-2)!));
}

/** What a request refused or cancelled by a shutdown carries: retry soon (elsewhere, or after the restart). */
export const SHUTTING_DOWN_HEADERS: Readonly<Record<string, string>> = { 'retry-after': '5', 'x-should-retry': 'true' };

/** Maps anything thrown while serving a request to the API error to send. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof AssetUnavailableError) return new ApiError(err.status, err.message, err.param, err.code);
  if (err instanceof QueueUnavailableError) return new ApiError(503, err.message, null, 'queue_unavailable', { headers: { 'retry-after': '5', 'x-should-retry': 'true' } });
  if (err instanceof NoWorkerError) return new ApiError(503, err.message, 'model', 'no_worker_for_model', { headers: { 'retry-after': '30', 'x-should-retry': 'false' } });
  if (err instanceof NoPersonError) return new ApiError(400, err.message, 'image', 'no_person_found');
  if (err instanceof InvalidOptionError) return new ApiError(400, redactPaths(err.message), err.param, 'invalid_value');
  // A worker's (or the engine's) lookup names the folders it searched: not for clients.
  if (err instanceof ModelNotFoundError) return new ApiError(404, redactPaths(err.message), 'model', 'model_not_found');
  if (err instanceof ModelLoadError) {
    return new ApiError(500, `The model could not be loaded: ${redactPaths(err.message)}`, 'model', 'model_load_failed', { cause: err });
  }
  if (err instanceof DeviceUnavailableError) return new ApiError(500, err.message, null, 'device_unavailable', { cause: err });
  if (err instanceof NumericalError) return new ApiError(500, err.message, null, 'numerical_error', { cause: err });
  if (err instanceof QueueFullError) {
    return new ApiError(429, err.message, null, 'queue_full', {
      headers: { 'retry-after': String(err.retryAfterSeconds), 'x-should-retry': 'true' },
    });
  }
  if (err instanceof StoreUnavailableError) {
    return new ApiError(503, err.message, null, 'storage_unavailable', { headers: { 'retry-after': '5', 'x-should-retry': 'true' }, cause: err });
  }
  if (err instanceof QueueClosedError) {
    return new ApiError(503, err.message, null, 'shutting_down', { headers: { ...SHUTTING_DOWN_HEADERS } });
  }
  if (err instanceof JobTimeoutError) {
    return new ApiError(504, err.message, null, 'timeout', { headers: { 'x-should-retry': 'false' } });
  }
  if (err instanceof JobCancelledError && err.reason === 'shutdown') {
    return new ApiError(503, err.message, null, 'shutting_down', { headers: { ...SHUTTING_DOWN_HEADERS } });
  }
  if (err instanceof JobCancelledError || err instanceof GenerationCancelledError) {
    return new ApiError(503, 'The generation was cancelled.', null, 'cancelled', { headers: { 'x-should-retry': 'false' } });
  }
  if (err && typeof err === 'object' && 'message' in err) {
    const mapped = fromFastify(err as { code?: string; statusCode?: number; message: string });
    if (mapped) return mapped;
  }
  return new ApiError(500, 'The server had an error while processing your request.', null, 'internal_error', { cause: err });
}
