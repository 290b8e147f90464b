// Kiln's public API as any client calls it: relative URLs only (this page's own origin, which
// is the only place the API key is ever sent), OpenAI's error envelope, and the streamed
// answers (server-sent events) read from fetch's body stream.

const KEY_NAME = 'kiln-api-key';

/** An answer in OpenAI's error envelope: its message is what the page shows. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.type = error.type ?? null;
    this.param = error.param ?? null;
    this.code = error.code ?? null;
  }
}

let apiKey = sessionStorage.getItem(KEY_NAME) ?? localStorage.getItem(KEY_NAME) ?? '';

export function hasApiKey() {
  return apiKey !== '';
}

/** Keeps the key for this tab (sessionStorage), or in this browser when `remember`. */
export function setApiKey(key, remember) {
  apiKey = key.trim();
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  if (apiKey) (remember ? localStorage : sessionStorage).setItem(KEY_NAME, apiKey);
}

function headers(extra = {}) {
  return apiKey ? { ...extra, authorization: `Bearer ${apiKey}` } : extra;
}

async function errorOf(res) {
  let body;
  try {
    body = await res.json();
  } catch {
    // not JSON (a proxy's page): the status says what it can
  }
  const error = body && typeof body.error === 'object' && body.error && typeof body.error.message === 'string'
    ? body.error
    : { message: `The server answered ${res.status} ${res.statusText}.`, type: 'http_error' };
  return new ApiError(res.status, error);
}

/** GET /v1/models: the installed models and aliases. */
export async function listModels() {
  const res = await fetch('/v1/models', { headers: headers(), cache: 'no-store' });
  if (!res.ok) throw await errorOf(res);
  const body = await res.json();
  return Array.isArray(body.data) ? body.data : [];
}

/** Decoded base64 as a Blob of `type` (fetch on a data: URL would need connect-src data:). */
export function base64Blob(b64, type) {
  const text = atob(b64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return new Blob([bytes], { type });
}

/** One server-sent event's data (its `data:` lines joined), or undefined for a frame without data. */
function frameData(frame) {
  const lines = [];
  for (const line of frame.split('\n')) {
    if (line.startsWith('data:')) lines.push(line.slice(line[5] === ' ' ? 6 : 5));
  }
  return lines.length ? lines.join('\n') : undefined;
}

/**
 * POSTs an images request with `stream: true` (JSON `body` for generations, FormData for
 * edits) and reads its events: `onPartial(event)` per partial image, then resolves with the
 * completed event. HTTP errors and `error` events reject with ApiError.
 */
export async function streamImages(path, body, { onPartial, signal }) {
  const form = body instanceof FormData;
  const res = await fetch(path, {
    method: 'POST',
    headers: headers(form ? {} : { 'content-type': 'application/json' }),
    body: form ? body : JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw await errorOf(res);
  if (!(res.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
    // A server that ignored `stream`: its JSON answer has the same parts.
    const json = await res.json();
    return { ...json.data[0], kiln: json.kiln, size: json.size, output_format: json.output_format };
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const data = frameData(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (data === undefined || data === '[DONE]') continue;
      const event = JSON.parse(data);
      if (event.type === 'error') throw new ApiError(res.status, event.error ?? { message: 'The stream reported an error.' });
      if (event.type?.endsWith('.partial_image')) onPartial?.(event);
      else if (event.type?.endsWith('.completed')) {
        reader.cancel().catch(() => {});
        return event;
      }
    }
  }
  throw new Error('The stream ended before the image was complete.');
}
