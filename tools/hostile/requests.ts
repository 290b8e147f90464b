/**
 * Hostile requests against a Kiln server, as data: broken JSON and HTTP, wrong types, huge
 * fields, truncated multipart, non-PNG, corrupt and oversized uploads, PNG bombs, tampered image
 * URLs, requests without the key, unknown routes. Shared by the fuzz test (which asserts every
 * answer is a 4xx envelope) and the memory benchmark (which replays thousands of them).
 * Everything is drawn from a seeded PRNG, so a run replays; the requests go to loopback only.
 */
import { connect } from 'node:net';
import { crc32, deflateSync } from 'node:zlib';
import { mulberry32 } from '../../src/graphs/onnx-builder.js';
import { MAX_PROMPT_CHARS } from '../../src/server/params.js';

/** A small seeded PRNG in [0, 1): the graph builder's mulberry32. */
export const prng = mulberry32;

/** One PNG chunk with its length and CRC. */
export function pngChunk(type: string, data: Buffer): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)) >>> 0, 8 + data.length);
  return out;
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

function ihdr(width: number, height: number, colourType = 2): Buffer {
  const data = Buffer.alloc(13);
  data.writeUInt32BE(width, 0);
  data.writeUInt32BE(height, 4);
  data[8] = 8; // bit depth
  data[9] = colourType;
  return pngChunk('IHDR', data);
}

/** A PNG written by hand whose IHDR declares width x height (valid CRCs, a tiny IDAT that does not fill it). */
export function pngDeclaring(width: number, height: number): Buffer {
  return Buffer.concat([PNG_SIGNATURE, ihdr(width, height), pngChunk('IDAT', deflateSync(Buffer.alloc(1024))), pngChunk('IEND', Buffer.alloc(0))]);
}

/**
 * A decompression bomb that is a valid PNG: `side` x `side` grey pixels (one byte each), all
 * zero, so it compresses ~1000:1 (4096 x 4096: 16 MiB of pixels in ~16 KiB). It passes every
 * check and is decoded in full.
 */
export function pngBomb(side: number): Buffer {
  const rows = Buffer.alloc((side + 1) * side); // each row: filter byte 0, then zeros
  return Buffer.concat([PNG_SIGNATURE, ihdr(side, side, 0), pngChunk('IDAT', deflateSync(rows, { level: 9 })), pngChunk('IEND', Buffer.alloc(0))]);
}

/** An APNG: `png` with an acTL chunk after IHDR (one frame; decoders show the default image). */
export function apng(png: Buffer): Buffer {
  const actl = Buffer.alloc(8);
  actl.writeUInt32BE(1, 0);
  return Buffer.concat([png.subarray(0, 33), pngChunk('acTL', actl), png.subarray(33)]);
}

export interface FormPart {
  name: string;
  filename?: string;
  type?: string;
  data: Buffer | string;
}

/** A multipart body by hand, so it can be cut anywhere. */
export function multipartBody(parts: FormPart[], boundary = 'fuzzBoundary7MA4YWxkTrZu0gW'): { body: Buffer; type: string } {
  const pieces: Buffer[] = [];
  for (const p of parts) {
    const disposition = `form-data; name="${p.name}"${p.filename ? `; filename="${p.filename}"` : ''}`;
    pieces.push(Buffer.from(`--${boundary}\r\nContent-Disposition: ${disposition}\r\n${p.type ? `Content-Type: ${p.type}\r\n` : ''}\r\n`));
    pieces.push(Buffer.isBuffer(p.data) ? p.data : Buffer.from(p.data));
    pieces.push(Buffer.from('\r\n'));
  }
  pieces.push(Buffer.from(`--${boundary}--\r\n`));
  return { body: Buffer.concat(pieces), type: `multipart/form-data; boundary=${boundary}` };
}

/** A request to send: over fetch (method, path, headers, body) or as raw bytes on a socket. */
export interface HostileRequest {
  label: string;
  method?: string;
  path?: string;
  headers?: Record<string, string>;
  body?: Buffer | string;
  /** Raw bytes written to a fresh connection instead (malformed HTTP, absolute-form targets). */
  raw?: string | Buffer;
}

export interface Answer {
  label: string;
  /** 0 when the connection closed without a status line. */
  status: number;
  body: string;
}

/** Sends one request to `base` (http://127.0.0.1:PORT) and reads the whole answer. */
export async function sendHostile(base: string, r: HostileRequest, timeoutMs = 10_000): Promise<Answer> {
  if (r.raw !== undefined) return sendRaw(base, r.label, r.raw, timeoutMs);
  const res = await fetch(`${base}${r.path ?? '/'}`, {
    method: r.method ?? 'POST',
    headers: r.headers,
    body: r.body as RequestInit['body'],
    signal: AbortSignal.timeout(timeoutMs),
  });
  return { label: r.label, status: res.status, body: await res.text() };
}

function sendRaw(base: string, label: string, request: string | Buffer, timeoutMs: number): Promise<Answer> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(u.port), u.hostname);
    let data = '';
    socket.setTimeout(timeoutMs, () => socket.destroy(new Error(`${label}: no answer`)));
    socket.on('data', (c) => (data += c.toString('latin1')));
    socket.on('error', reject);
    socket.on('close', () => {
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(data)?.[1] ?? 0);
      resolve({ status, body: data.slice(data.indexOf('\r\n\r\n') + 4), label });
    });
    socket.end(request);
  });
}

const GEN = '/v1/images/generations';
const EDIT = '/v1/images/edits';

export interface MalformedOptions {
  /** A small valid PNG (the base of corrupt variants and of forms). */
  good: Buffer;
  /** Bytes past the server's per-file limit are appended to make a too-large upload. */
  tooLargePad?: number;
  /** Sent as `Authorization: Bearer <key>` on every /v1 request (when the server requires keys). */
  apiKey?: string;
}

/**
 * The fuzz set: ~300 malformed requests (truncated and random JSON, wrong types for every field,
 * huge fields, wrong content types and methods, cut and odd multipart forms, corrupt and huge
 * uploads, junk image URLs, malformed HTTP). The truncation points and flipped bytes come from
 * `rand`, so another seed gives other variants.
 */
export function malformedRequests(rand: () => number, { good, tooLargePad = 300 * 1024, apiKey }: MalformedOptions): HostileRequest[] {
  const int = (n: number) => Math.floor(rand() * n);
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
  const auth: Record<string, string> = apiKey ? { authorization: `Bearer ${apiKey}` } : {};
  const out: HostileRequest[] = [];
  const post = (label: string, path: string, type: string | undefined, body: Buffer | string, method = 'POST') =>
    out.push({ label, path, method, headers: { ...auth, ...(type ? { 'content-type': type } : {}) }, body });
  const json = (label: string, body: string | Buffer) => post(label, GEN, 'application/json', body);

  // 1. Broken JSON: truncations of a valid body, random bytes, odd documents.
  const valid = JSON.stringify({ prompt: 'a fox in the snow', n: 3, size: '256x256', quality: 'draft' });
  for (let i = 0; i < 30; i++) json(`truncated json ${i}`, valid.slice(0, int(valid.length - 1)));
  for (let i = 0; i < 15; i++) json(`random bytes ${i}`, bytes(1 + int(200)));
  for (const doc of ['', ' ', '[]', '{}', 'true', '0', '"prompt"', '{"prompt":}', '{"prompt":"x",}', "{'prompt':'x'}", '{"prompt":"x"}{"n":1}', '{"__proto__":{"x":1},"prompt":1}', '{"constructor":{"prototype":{"x":1}},"prompt":"x"}', '['.repeat(5000) + ']'.repeat(5000), '{"prompt":"\\ud800"', '\u0000']) {
    json(`document ${doc.slice(0, 20)}`, doc);
  }

  // 2. Wrong types and values for every field (1e309 parses to Infinity).
  const notString = [7, 1.5, true, [], ['x'], {}, { a: 1 }];
  const invalid: Record<string, unknown[]> = {
    prompt: [...notString, '', ' \t\n', 'p'.repeat(MAX_PROMPT_CHARS + 1)],
    model: [...notString, 'm'.repeat(257), 'no-such-model', '../escape', '/etc/passwd', ''],
    user: [...notString, 'u'.repeat(257)],
    negprompt: [...notString, 'n'.repeat(MAX_PROMPT_CHARS + 1)],
    negative_prompt: [...notString, 'n'.repeat(MAX_PROMPT_CHARS + 1)],
    scheduler: [...notString, 'bogus', ''],
    quality: [...notString, 'ultra', ''],
    response_format: [...notString, 'png', 'URL'],
    size: [...notString, '1x1', '1024X1024 ', '4096x4096', '1000x1000', 'AUTO', ''],
    output_format: [...notString, 'gif', 'jpg'],
    n: ['1', 1.5, true, [], {}, -1, 4294967296, 'INF'],
    seed: ['1', 1.5, true, [], {}, -1, 4294967296],
    steps: ['1', 1.5, true, [], {}, 0, 151, -1],
    output_compression: ['1', 1.5, true, [], {}, -1, 101],
    guidance_scale: ['1', true, [], {}, -1, 31, 'INF'],
    stream: ['true', 1, [], {}],
    partial_images: ['1', 1.5, true, [], {}, -1, 4],
  };
  for (const [field, values] of Object.entries(invalid)) {
    for (const v of values) {
      json(`field ${field}=${JSON.stringify(v).slice(0, 24)}`, JSON.stringify({ prompt: 'x', size: '256x256', steps: 1, [field]: v }).replace('"INF"', '1e309'));
    }
  }

  // 3. Huge fields and bodies.
  json('prompt 100k', JSON.stringify({ prompt: 'y'.repeat(100_000) }));
  json('body 2 MiB', JSON.stringify({ prompt: 'x', pad: 'z'.repeat(2 * 1024 * 1024) }));
  json('many keys', JSON.stringify(Object.fromEntries(Array.from({ length: 20_000 }, (_, i) => [`k${i}`, i]))));
  json('unicode prompt too long', JSON.stringify({ prompt: '😀'.repeat(MAX_PROMPT_CHARS + 1) }));

  // 4. Wrong content types and methods.
  for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'application/xml', 'image/png', 'application/octet-stream', 'multipart/form-data']) {
    post(`gen as ${type}`, GEN, type, 'prompt=x');
    post(`edit as ${type}`, EDIT, type, 'prompt=x');
  }
  post('edits as json', EDIT, 'application/json', valid);
  for (const method of ['PUT', 'DELETE', 'PATCH']) post(`${method} generations`, GEN, 'application/json', valid, method);

  // 5. Multipart: truncated anywhere, bad boundaries, bad parts, bad uploads.
  const form = multipartBody([
    { name: 'prompt', data: 'an otter' },
    { name: 'size', data: '256x256' },
    { name: 'image', filename: 'otter.png', type: 'image/png', data: good },
  ]);
  for (let i = 0; i < 30; i++) {
    const cut = 1 + int(form.body.length - 8);
    post(`multipart cut at ${cut}`, EDIT, form.type, form.body.subarray(0, cut));
  }
  post('multipart wrong boundary', EDIT, 'multipart/form-data; boundary=other', form.body);
  post('multipart no boundary', EDIT, 'multipart/form-data', form.body);
  post('multipart garbage', EDIT, form.type, bytes(500));
  const uploads: [string, Buffer][] = [
    ['empty file', Buffer.alloc(0)],
    ['text', Buffer.from('definitely not an image')],
    ['gif', Buffer.from('GIF89a\x01\x00\x01\x00\x00\x00\x00;')],
    ['jpeg magic', Buffer.from([0xff, 0xd8, 0xff, 0xe0, 0, 16, 0x4a, 0x46, 0x49, 0x46])],
    ['signature only', good.subarray(0, 8)],
    ['signature and half IHDR', good.subarray(0, 20)],
    ['truncated png', good.subarray(0, good.length >> 1)],
    ['no IEND', good.subarray(0, good.length - 12)],
    ['huge 100000x100000', pngDeclaring(100_000, 100_000)],
    ['huge 4097x4097', pngDeclaring(4097, 4097)],
    ['huge 1x4294967295', pngDeclaring(1, 0xffffffff)],
    ['zero width', pngDeclaring(0, 64)],
    ['tiny IDAT for 4000x4000', pngDeclaring(4000, 4000)],
    ['too large', Buffer.concat([good, Buffer.alloc(tooLargePad)])],
  ];
  for (let i = 0; i < 20; i++) {
    const flipped = Buffer.from(good);
    const at = 33 + int(flipped.length - 33 - 12); // after IHDR, before IEND: IDAT data or its CRC
    flipped[at] = flipped[at]! ^ (1 + int(255));
    uploads.push([`flipped byte ${at}`, flipped]);
  }
  for (const [label, data] of uploads) {
    const f = multipartBody([
      { name: 'prompt', data: 'x' },
      { name: 'image', filename: 'x.png', type: 'image/png', data },
    ]);
    post(`upload ${label}`, EDIT, f.type, f.body);
  }
  const oddForms: [string, FormPart[]][] = [
    ['file in prompt', [{ name: 'prompt', filename: 'p.txt', type: 'text/plain', data: 'x' }, { name: 'image', filename: 'a.png', data: good }]],
    ['prompt twice', [{ name: 'prompt', data: 'x' }, { name: 'prompt', data: 'y' }, { name: 'image', filename: 'a.png', data: good }]],
    ['image as text', [{ name: 'prompt', data: 'x' }, { name: 'image', data: 'abc' }]],
    ['unknown file field', [{ name: 'prompt', data: 'x' }, { name: 'picture', filename: 'a.png', data: good }]],
    ['__proto__ field', [{ name: '__proto__', data: 'x' }, { name: 'image', filename: 'a.png', data: good }]],
    ['huge field', [{ name: 'prompt', data: 'p'.repeat(100_000) }, { name: 'image', filename: 'a.png', data: good }]],
    ['n not integer', [{ name: 'prompt', data: 'x' }, { name: 'n', data: '1.5' }, { name: 'image', filename: 'a.png', data: good }]],
    ['n too large', [{ name: 'prompt', data: 'x' }, { name: 'n', data: '4294967296' }, { name: 'image', filename: 'a.png', data: good }]],
    ['20 images', [{ name: 'prompt', data: 'x' }, ...Array.from({ length: 20 }, () => ({ name: 'image[]', filename: 'a.png', data: good }))]],
    ['json field bad', [{ name: 'prompt', type: 'application/json', data: '{"bad' }, { name: 'image', filename: 'a.png', data: good }]],
  ];
  for (const [label, parts] of oddForms) {
    const f = multipartBody(parts);
    post(`form ${label}`, EDIT, f.type, f.body);
  }

  // 6. Signed image URLs with junk.
  for (const path of ['/images/x', '/images/..%2F..%2Fsecret?expires=1&signature=a', `/images/${'a'.repeat(300)}?expires=9999999999&signature=${'b'.repeat(43)}`, '/images/1_2.png?expires=-1&signature=', '/images/%00?expires=1e10&signature=%ff']) {
    out.push({ label: `GET ${path.slice(0, 40)}`, method: 'GET', path });
  }

  // 7. Malformed HTTP on a raw socket.
  out.push({ label: 'garbage request line', raw: 'HELLO THERE\r\n\r\n' });
  out.push({ label: 'bad header', raw: 'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n' });
  out.push({ label: 'header overflow', raw: `GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n` });
  out.push({ label: 'bad content-length', raw: 'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}' });
  out.push({ label: 'bad chunked', raw: 'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n' });
  return out;
}

export interface HeavyOptions {
  good: Buffer;
  /** The server's API key: most requests carry it, the `no key` ones do not. */
  apiKey?: string;
  /** A real signed image URL (path and query) to tamper with. */
  signedPath?: string;
  /** Side of the PNG bombs (default 4096, the largest a default server decodes). */
  bombSide?: number;
}

/**
 * What an attacker adds to the fuzz set, for the memory benchmark: uploads that pass every
 * check and are decoded in full before the request fails (PNG bombs, APNG, a mask of the wrong
 * size, each with a model that is not installed), tampered signed URLs, requests without the
 * key, unknown and random routes, absolute-form targets and big headers.
 */
export function heavyRequests(rand: () => number, { good, apiKey, signedPath, bombSide = 4096 }: HeavyOptions): HostileRequest[] {
  const int = (n: number) => Math.floor(rand() * n);
  const token = () => Math.floor(rand() * 2 ** 48).toString(36);
  const auth: Record<string, string> = apiKey ? { authorization: `Bearer ${apiKey}` } : {};
  const out: HostileRequest[] = [];
  const edit = (label: string, parts: FormPart[], headers = auth) => {
    const f = multipartBody(parts);
    out.push({ label, path: EDIT, headers: { ...headers, 'content-type': f.type }, body: f.body });
  };
  const bomb = pngBomb(bombSide);
  const fields = (model: string): FormPart[] => [
    { name: 'prompt', data: `a bomb ${token()}` },
    { name: 'model', data: model },
  ];
  edit('png bomb, unknown model', [...fields(`missing-${token()}`), { name: 'image', filename: 'bomb.png', type: 'image/png', data: bomb }]);
  edit('apng, unknown model', [...fields(`missing-${token()}`), { name: 'image', filename: 'a.png', type: 'image/png', data: apng(good) }]);
  edit('mask of another size', [
    { name: 'prompt', data: 'x' },
    { name: 'image', filename: 'a.png', type: 'image/png', data: bomb },
    { name: 'mask', filename: 'm.png', type: 'image/png', data: good },
  ]);
  edit('16 images, unknown model', [...fields(`missing-${token()}`), ...Array.from({ length: 16 }, () => ({ name: 'image[]', filename: 'a.png', data: good }))]);
  out.push({
    label: 'huge prompt near the body limit',
    path: GEN,
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: `${token()} `.repeat(100_000).slice(0, 1_000_000) }),
  });
  edit('many large fields', [
    ...Array.from({ length: 60 }, (_, i) => ({ name: `f${i}`, data: token().repeat(6000).slice(0, 60_000) })),
    { name: 'prompt', data: 'x' },
  ]);
  edit('edit without key', [{ name: 'prompt', data: 'x' }, { name: 'image', filename: 'a.png', data: good }], {});

  if (signedPath) {
    const flip = (s: string, i: number) => s.slice(0, i) + (s[i] === 'A' ? 'B' : 'A') + s.slice(i + 1);
    const sigAt = signedPath.indexOf('signature=') + 'signature='.length;
    out.push({ label: 'tampered signature', method: 'GET', path: flip(signedPath, sigAt + int(43)) });
    out.push({ label: 'tampered expiry', method: 'GET', path: signedPath.replace(/expires=(\d+)/, (_, e) => `expires=${Number(e) + 1 + int(100_000)}`) });
    out.push({ label: 'tampered key', method: 'GET', path: signedPath.replace(/images\/([^?]+)/, `images/${token()}_0`) });
  }
  out.push({ label: 'no key', path: GEN, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'x' }) });
  out.push({ label: 'wrong key', path: GEN, headers: { 'content-type': 'application/json', authorization: `Bearer ${token()}` }, body: '{}' });
  out.push({ label: 'unknown /v1 route', method: 'GET', path: `/v1/${token()}/${token()}`, headers: auth });
  out.push({ label: 'random route', method: 'GET', path: `/${token()}?${token()}=${token()}` });
  out.push({ label: 'random method', method: ['OPTIONS', 'PROPFIND', 'DELETE', 'HEAD'][int(4)]!, path: `/v1/images/${token()}`, headers: auth });
  out.push({ label: 'absolute-form target', raw: `GET http://127.0.0.1/v1/${token()} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n` });
  out.push({ label: 'big header', method: 'GET', path: `/v1/models/${token()}`, headers: { ...auth, 'x-junk': 'j'.repeat(8000 + int(4000)), 'x-request-id': token() } });
  out.push({ label: 'long url', method: 'GET', path: `/v1/models/${'m'.repeat(2000 + int(4000))}`, headers: auth });
  return out;
}

export type SlowKind = 'upload' | 'json' | 'headers';

export interface SlowConnection {
  kind: SlowKind;
  openedAt: number;
  /** When the server closed the connection (performance.now()), if it has. */
  closedAt?: number;
  /** The status line's code the server answered with before closing (0: none). */
  status: number;
  /** Whether the server closed it (as opposed to close() here). */
  readonly closedByServer: boolean;
  /** Stops dribbling and closes the connection. */
  close(): void;
}

/**
 * A slowloris connection: sends most of a request at once and then one byte every
 * `dribbleMs`, for as long as the server keeps it open. `upload`: a multipart edit whose PNG
 * part is `uploadBytes` long, all but its last kilobyte sent at once (the server holds what it
 * got); `json`: a generation body of `jsonBytes` declared in Content-Length, all but 1000 bytes
 * sent; `headers`: a request line and then header bytes, never finished.
 */
export function openSlowConnection(
  base: string,
  kind: SlowKind,
  options: { apiKey?: string; dribbleMs?: number; uploadBytes?: number; jsonBytes?: number } = {},
): SlowConnection {
  const { apiKey, dribbleMs = 1000, uploadBytes = 3_900_000, jsonBytes = 1_000_000 } = options;
  const u = new URL(base);
  const auth = apiKey ? `Authorization: Bearer ${apiKey}\r\n` : '';
  let head: Buffer;
  let rest: Buffer;
  if (kind === 'headers') {
    head = Buffer.from(`POST /v1/images/generations HTTP/1.1\r\nHost: ${u.host}\r\n${auth}`);
    rest = Buffer.from(`X-Slow: ${'s'.repeat(100_000)}`);
  } else {
    let body: Buffer;
    let type: string;
    if (kind === 'upload') {
      const png = Buffer.concat([PNG_SIGNATURE, Buffer.alloc(uploadBytes - 8, 0x5a)]);
      ({ body, type } = multipartBody([{ name: 'prompt', data: 'slow' }, { name: 'image', filename: 'slow.png', type: 'image/png', data: png }]));
    } else {
      body = Buffer.from(JSON.stringify({ prompt: 'slow', pad: 'p'.repeat(jsonBytes - 30) }));
      type = 'application/json';
    }
    const cut = Math.max(0, body.length - 1000);
    head = Buffer.concat([
      Buffer.from(`POST /v1/images/${kind === 'upload' ? 'edits' : 'generations'} HTTP/1.1\r\nHost: ${u.host}\r\n${auth}Content-Type: ${type}\r\nContent-Length: ${body.length}\r\n\r\n`),
      body.subarray(0, cut),
    ]);
    // A copy: a view would keep the whole body alive as long as this connection object.
    rest = Buffer.from(body.subarray(cut));
  }
  const socket = connect(Number(u.port), u.hostname);
  let received = '';
  let closedHere = false;
  let sent = 0;
  const conn: SlowConnection = {
    kind,
    openedAt: performance.now(),
    status: 0,
    get closedByServer() {
      return conn.closedAt !== undefined && !closedHere;
    },
    close() {
      if (conn.closedAt === undefined) closedHere = true;
      clearInterval(timer);
      socket.destroy();
    },
  };
  const timer = setInterval(() => {
    if (sent < rest.length && socket.writable) socket.write(rest.subarray(sent, ++sent));
  }, dribbleMs);
  socket.on('data', (c) => {
    if (received.length < 4096) received += c.toString('latin1');
  });
  socket.on('error', () => {});
  socket.on('close', () => {
    clearInterval(timer);
    conn.closedAt = performance.now();
    conn.status = Number(/^HTTP\/1\.1 (\d{3})/.exec(received)?.[1] ?? 0);
  });
  socket.write(head);
  return conn;
}
