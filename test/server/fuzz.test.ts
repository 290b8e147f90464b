/**
 * Fuzz-style: a few hundred malformed requests (bad JSON, wrong types, huge fields, truncated
 * multipart, non-PNG and corrupt PNG uploads, PNGs declaring huge dimensions, malformed HTTP).
 * Every answer must be a 4xx in OpenAI's envelope, nothing may be queued, and the server must
 * still serve afterwards. Seeded, so a failure replays; bounded in count and time; loopback only.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { crc32, deflateSync } from 'node:zlib';
import { startTestServer, makePng, type TestServer } from './helpers.js';

let t: TestServer;
before(async () => {
  t = await startTestServer({ maxUploadBytes: 256 * 1024 });
});
after(() => t.close());

/** mulberry32: small seeded PRNG. */
function prng(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
const rand = prng(20260423);
const int = (n: number) => Math.floor(rand() * n);
const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));

function chunk(type: string, data: Buffer): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)) >>> 0, 8 + data.length);
  return out;
}

/** A PNG written by hand whose IHDR declares width x height (valid CRCs, a tiny IDAT). */
function pngDeclaring(width: number, height: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(Buffer.alloc(1024))),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

interface Answer {
  status: number;
  body: string;
  label: string;
}

async function send(label: string, path: string, init: RequestInit): Promise<Answer> {
  const res = await fetch(`${t.url}${path}`, { method: 'POST', ...init, signal: AbortSignal.timeout(10_000) });
  return { status: res.status, body: await res.text(), label };
}

/** A multipart body by hand, so it can be cut anywhere. */
function multipart(parts: { name: string; filename?: string; type?: string; data: Buffer | string }[], boundary = 'fuzzBoundary7MA4YWxkTrZu0gW') {
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

/** Raw bytes on a socket (for malformed HTTP); returns the status line's code and the body. */
function raw(label: string, request: string | Buffer): Promise<Answer> {
  const u = new URL(t.url);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(u.port), u.hostname);
    let data = '';
    socket.setTimeout(10_000, () => socket.destroy(new Error(`${label}: no answer`)));
    socket.on('data', (c) => (data += c.toString('latin1')));
    socket.on('error', reject);
    socket.on('close', () => {
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(data)?.[1] ?? 0);
      resolve({ status, body: data.slice(data.indexOf('\r\n\r\n') + 4), label });
    });
    socket.end(request);
  });
}

test('200+ malformed requests: each a 4xx in the envelope; nothing queued; the server still serves', async (ctx) => {
  const started = Date.now();
  const answers: Answer[] = [];
  const GEN = '/v1/images/generations';
  const EDIT = '/v1/images/edits';
  const json = (label: string, body: string | Buffer, path = GEN) =>
    send(label, path, { headers: { 'content-type': 'application/json' }, body: body as RequestInit['body'] });

  // 1. Broken JSON: truncations of a valid body, random bytes, odd documents.
  const valid = JSON.stringify({ prompt: 'a fox in the snow', n: 3, size: '256x256', quality: 'draft' });
  for (let i = 0; i < 30; i++) answers.push(await json(`truncated json ${i}`, valid.slice(0, int(valid.length - 1))));
  for (let i = 0; i < 15; i++) answers.push(await json(`random bytes ${i}`, bytes(1 + int(200))));
  for (const doc of ['', ' ', '[]', '{}', 'true', '0', '"prompt"', '{"prompt":}', '{"prompt":"x",}', "{'prompt':'x'}", '{"prompt":"x"}{"n":1}', '{"__proto__":{"x":1},"prompt":1}', '{"constructor":{"prototype":{"x":1}},"prompt":"x"}', '['.repeat(5000) + ']'.repeat(5000), '{"prompt":"\\ud800"', '\u0000']) {
    answers.push(await json(`document ${doc.slice(0, 20)}`, doc));
  }

  // 2. Wrong types and values for every field (1e309 parses to Infinity).
  const notString = [7, 1.5, true, [], ['x'], {}, { a: 1 }];
  const invalid: Record<string, unknown[]> = {
    prompt: [...notString, '', ' \t\n', 'p'.repeat(4001)],
    model: [...notString, 'm'.repeat(257), 'no-such-model', '../escape', '/etc/passwd', ''],
    user: [...notString, 'u'.repeat(257)],
    negprompt: [...notString, 'n'.repeat(4001)],
    negative_prompt: [...notString, 'n'.repeat(4001)],
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
      const body = JSON.stringify({ prompt: 'x', size: '256x256', steps: 1, [field]: v }).replace('"INF"', '1e309');
      answers.push(await json(`field ${field}=${JSON.stringify(v).slice(0, 24)}`, body));
    }
  }

  // 3. Huge fields and bodies.
  answers.push(await json('prompt 100k', JSON.stringify({ prompt: 'y'.repeat(100_000) })));
  answers.push(await json('body 2 MiB', JSON.stringify({ prompt: 'x', pad: 'z'.repeat(2 * 1024 * 1024) })));
  answers.push(await json('many keys', JSON.stringify(Object.fromEntries(Array.from({ length: 20_000 }, (_, i) => [`k${i}`, i])))));
  answers.push(await json('unicode prompt too long', JSON.stringify({ prompt: '😀'.repeat(4001) })));

  // 4. Wrong content types and methods.
  for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'application/xml', 'image/png', 'application/octet-stream', 'multipart/form-data']) {
    answers.push(await send(`gen as ${type}`, GEN, { headers: { 'content-type': type }, body: 'prompt=x' }));
    answers.push(await send(`edit as ${type}`, EDIT, { headers: { 'content-type': type }, body: 'prompt=x' }));
  }
  answers.push(await send('edits as json', EDIT, { headers: { 'content-type': 'application/json' }, body: valid }));
  for (const method of ['PUT', 'DELETE', 'PATCH']) answers.push(await send(`${method} generations`, GEN, { method, headers: { 'content-type': 'application/json' }, body: valid }));

  // 5. Multipart: truncated anywhere, bad boundaries, bad parts, bad uploads.
  const good = await makePng(48, 48);
  const form = multipart([
    { name: 'prompt', data: 'an otter' },
    { name: 'size', data: '256x256' },
    { name: 'image', filename: 'otter.png', type: 'image/png', data: good },
  ]);
  for (let i = 0; i < 30; i++) {
    const cut = 1 + int(form.body.length - 8);
    answers.push(await send(`multipart cut at ${cut}`, EDIT, { headers: { 'content-type': form.type }, body: form.body.subarray(0, cut) }));
  }
  answers.push(await send('multipart wrong boundary', EDIT, { headers: { 'content-type': 'multipart/form-data; boundary=other' }, body: form.body }));
  answers.push(await send('multipart no boundary', EDIT, { headers: { 'content-type': 'multipart/form-data' }, body: form.body }));
  answers.push(await send('multipart garbage', EDIT, { headers: { 'content-type': form.type }, body: bytes(500) }));
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
    ['too large', Buffer.concat([good, Buffer.alloc(300 * 1024)])],
  ];
  for (let i = 0; i < 20; i++) {
    const flipped = Buffer.from(good);
    const at = 33 + int(flipped.length - 33 - 12); // after IHDR, before IEND: IDAT data or its CRC
    flipped[at] = flipped[at]! ^ (1 + int(255));
    uploads.push([`flipped byte ${at}`, flipped]);
  }
  for (const [label, data] of uploads) {
    const f = multipart([
      { name: 'prompt', data: 'x' },
      { name: 'image', filename: 'x.png', type: 'image/png', data },
    ]);
    answers.push(await send(`upload ${label}`, EDIT, { headers: { 'content-type': f.type }, body: f.body }));
  }
  const oddForms: [string, ReturnType<typeof multipart>][] = [
    ['file in prompt', multipart([{ name: 'prompt', filename: 'p.txt', type: 'text/plain', data: 'x' }, { name: 'image', filename: 'a.png', data: good }])],
    ['prompt twice', multipart([{ name: 'prompt', data: 'x' }, { name: 'prompt', data: 'y' }, { name: 'image', filename: 'a.png', data: good }])],
    ['image as text', multipart([{ name: 'prompt', data: 'x' }, { name: 'image', data: 'abc' }])],
    ['unknown file field', multipart([{ name: 'prompt', data: 'x' }, { name: 'picture', filename: 'a.png', data: good }])],
    ['__proto__ field', multipart([{ name: '__proto__', data: 'x' }, { name: 'image', filename: 'a.png', data: good }])],
    ['huge field', multipart([{ name: 'prompt', data: 'p'.repeat(100_000) }, { name: 'image', filename: 'a.png', data: good }])],
    ['n not integer', multipart([{ name: 'prompt', data: 'x' }, { name: 'n', data: '1.5' }, { name: 'image', filename: 'a.png', data: good }])],
    ['n too large', multipart([{ name: 'prompt', data: 'x' }, { name: 'n', data: '4294967296' }, { name: 'image', filename: 'a.png', data: good }])],
    ['20 images', multipart([{ name: 'prompt', data: 'x' }, ...Array.from({ length: 20 }, () => ({ name: 'image[]', filename: 'a.png', data: good }))])],
    ['json field bad', multipart([{ name: 'prompt', type: 'application/json', data: '{"bad' }, { name: 'image', filename: 'a.png', data: good }])],
  ];
  for (const [label, f] of oddForms) answers.push(await send(`form ${label}`, EDIT, { headers: { 'content-type': f.type }, body: f.body }));

  // 6. Signed image URLs with junk.
  for (const path of ['/images/x', '/images/..%2F..%2Fsecret?expires=1&signature=a', `/images/${'a'.repeat(300)}?expires=9999999999&signature=${'b'.repeat(43)}`, '/images/1_2.png?expires=-1&signature=', '/images/%00?expires=1e10&signature=%ff']) {
    const res = await fetch(`${t.url}${path}`);
    answers.push({ status: res.status, body: await res.text(), label: `GET ${path.slice(0, 40)}` });
  }

  // 7. Malformed HTTP on a raw socket.
  answers.push(await raw('garbage request line', 'HELLO THERE\r\n\r\n'));
  answers.push(await raw('bad header', 'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n'));
  answers.push(await raw('header overflow', `GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`));
  answers.push(await raw('bad content-length', 'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}'));
  answers.push(await raw('bad chunked', 'POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n'));

  // A few concurrent bursts of the above kinds.
  const burst = await Promise.all(
    Array.from({ length: 20 }, (_, i) =>
      i % 2 ? json(`burst json ${i}`, valid.slice(0, 5 + i)) : send(`burst multipart ${i}`, EDIT, { headers: { 'content-type': form.type }, body: form.body.subarray(0, 100 + i * 10) }),
    ),
  );
  answers.push(...burst);

  assert.ok(answers.length >= 200, `sent ${answers.length} malformed requests`);
  ctx.diagnostic(`${answers.length} malformed requests in ${Date.now() - started} ms`);
  const bad: string[] = [];
  for (const a of answers) {
    let e: any;
    try {
      e = JSON.parse(a.body).error;
    } catch {}
    const ok = a.status >= 400 && a.status < 500 && e && typeof e.message === 'string' && typeof e.type === 'string' && 'param' in e && 'code' in e;
    if (!ok) bad.push(`${a.label}: ${a.status} ${a.body.slice(0, 160)}`);
  }
  assert.deepEqual(bad, [], `answers that were not a 4xx envelope:\n${bad.join('\n')}`);

  // Nothing reached the queue, and the server still serves.
  const metrics = await (await fetch(`${t.url}/metrics`)).text();
  assert.doesNotMatch(metrics, /kiln_jobs_total\{/);
  assert.doesNotMatch(metrics, /status="5\d\d"/);
  const health = await fetch(`${t.url}/health`);
  assert.equal(health.status, 200);
  await health.arrayBuffer();
  const okRes = await send('valid', GEN, { headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'still alive', size: '256x256', steps: 1, response_format: 'b64_json' }) });
  assert.equal(okRes.status, 200, okRes.body.slice(0, 200));
  const editRes = await send('valid edit', EDIT, { headers: { 'content-type': form.type }, body: form.body });
  assert.equal(editRes.status, 200, editRes.body.slice(0, 200));
  assert.ok(Date.now() - started < 90_000, 'bounded in time');
});
