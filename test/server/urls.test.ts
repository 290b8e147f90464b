/**
 * Images behind URLs: stored under KILN_HOME/images with unguessable names, served at URLs
 * signed with the home folder's secret and carrying their expiry; tampering is refused, expiry
 * answers 410 and the sweeper deletes the file (also files left by a previous run).
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { redactUrl } from '../../src/server/app.js';
import { makeHome, startTestServer, postJson, envelope } from './helpers.js';

const homes: string[] = [];
after(() => homes.forEach((h) => rmSync(h, { recursive: true, force: true })));

async function generateUrl(url: string, extra: Record<string, unknown> = {}, headers: Record<string, string> = {}): Promise<string> {
  const r = await postJson(`${url}/v1/images/generations`, { prompt: 'a kiln', size: '256x256', steps: 1, ...extra }, headers);
  assert.equal(r.status, 200, r.text);
  return r.json.data[0].url;
}

/** Fetches and reads the whole body (an unread body would keep the connection busy). */
async function statusOf(url: string): Promise<number> {
  const res = await fetch(url);
  await res.arrayBuffer();
  return res.status;
}

const fileOf = (home: string, url: string) => join(home, 'images', new URL(url).pathname.split('/').pop()!);

test('a valid URL needs no key; any tampering is refused with 403', async () => {
  const t = await startTestServer({ apiKeys: ['secret-key'] });
  try {
    const url = await generateUrl(t.url, {}, { authorization: 'Bearer secret-key' });
    assert.equal(await statusOf(url), 200);
    const u = new URL(url);
    const sig = u.searchParams.get('signature')!;
    const tampered: string[] = [];
    const flip = (s: string) => (s[0] === 'A' ? 'B' : 'A') + s.slice(1);
    tampered.push(url.replace(`signature=${sig}`, `signature=${flip(sig)}`));
    tampered.push(url.replace(/expires=(\d+)/, (_, e) => `expires=${Number(e) + 3600}`));
    tampered.push(url.replace(/images\/([0-9a-z]+)_([0-9a-f])/, (_, a, b) => `images/${a}_${b === '0' ? '1' : '0'}`));
    tampered.push(url.replace(/&signature=.*$/, ''));
    tampered.push(url.split('?')[0]!);
    tampered.push(url.replace(`signature=${sig}`, 'signature=%00%2e%2e'));
    // The same expiry spelled otherwise (a leading zero, a plus sign) is another URL, refused too.
    tampered.push(url.replace(/expires=(\d+)/, 'expires=0$1'));
    tampered.push(url.replace(/expires=(\d+)/, 'expires=%2B$1'));
    tampered.push(url.replace(/expires=(\d+)/, 'expires=$1&expires=$1'));
    for (const bad of tampered) {
      const res = await fetch(bad);
      assert.equal(res.status, 403, bad);
      assert.equal(envelope(await res.json()).code, 'invalid_signature');
    }
    // Path tricks never reach the disk.
    assert.equal(await statusOf(`${t.url}/images/..%2Fsecret?expires=9999999999&signature=${sig}`), 403);
    assert.equal(await statusOf(url), 200, 'the real one still works');
  } finally {
    await t.close();
  }
});

test('--url-ttl 2s: the URL works, then answers 410, and the sweeper has deleted the file', async () => {
  const t = await startTestServer({ urlTtlMs: 2000 });
  try {
    const url = await generateUrl(t.url);
    const file = fileOf(t.home, url);
    const expires = Number(new URL(url).searchParams.get('expires')) * 1000;
    assert.ok(expires - Date.now() <= 3000 && expires - Date.now() > 0);
    const res = await fetch(url);
    assert.equal(res.status, 200);
    await res.arrayBuffer();
    assert.match(res.headers.get('cache-control')!, /private, max-age=[0-3]/);
    assert.ok(existsSync(file));
    // Not fetched again before the sweeper runs: the file must go by itself.
    while (Date.now() < expires + 1500) await sleep(250);
    assert.ok(!existsSync(file), 'the sweeper deleted the expired file');
    const gone = await fetch(url);
    assert.equal(gone.status, 410);
    assert.equal(envelope(await gone.json()).code, 'expired');
  } finally {
    await t.close();
  }
});

test('files left by a previous run are swept at start; the secret survives a restart', async () => {
  const home = await makeHome({ 'kiln-tiny-xl': 'sdxl' });
  homes.push(home);
  mkdirSync(join(home, 'images'), { recursive: true });
  const past = Math.floor(Date.now() / 1000) - 60;
  const future = Math.floor(Date.now() / 1000) + 3600;
  const stale = `${past.toString(36)}_${'a'.repeat(48)}.png`;
  const fresh = `${future.toString(36)}_${'b'.repeat(48)}.png`;
  writeFileSync(join(home, 'images', stale), 'old');
  writeFileSync(join(home, 'images', fresh), 'new');

  const first = await startTestServer({ home });
  let url: string;
  try {
    for (let i = 0; i < 20 && existsSync(join(home, 'images', stale)); i++) await sleep(100);
    const names = readdirSync(join(home, 'images'));
    assert.ok(!names.includes(stale), 'expired leftover deleted');
    assert.ok(names.includes(fresh), 'unexpired leftover kept');
    url = await generateUrl(first.url);
  } finally {
    await first.close();
  }
  const second = await startTestServer({ home });
  try {
    const moved = url.replace(first.url, second.url);
    assert.equal(await statusOf(moved), 200, 'same home, same secret: old URLs stay valid');
  } finally {
    await second.close();
  }
});

test('URLs are built from --public-url, else the listening address, never from the Host header', async () => {
  const t = await startTestServer({ publicUrl: 'https://images.example.com/kiln/' });
  try {
    const url = await generateUrl(t.url);
    assert.match(url, /^https:\/\/images\.example\.com\/kiln\/images\/[0-9a-z]+_[0-9a-f]{48}\.png\?expires=\d+&signature=/);
    // The same path works on this server (the proxy forwards it).
    assert.equal(await statusOf(url.replace('https://images.example.com/kiln', t.url)), 200);
  } finally {
    await t.close();
  }
  const plain = await startTestServer();
  try {
    const url = await generateUrl(plain.url, {}, { 'x-forwarded-host': 'evil.example' });
    assert.ok(url.startsWith(`${plain.url}/images/`));
    // fetch cannot forge Host; a raw request can.
    const { request } = await import('node:http');
    const u = new URL(plain.url);
    const body = JSON.stringify({ prompt: 'x', size: '256x256', steps: 1 });
    const json: any = await new Promise((resolve, reject) => {
      const req = request(
        { host: u.hostname, port: u.port, path: '/v1/images/generations', method: 'POST', headers: { host: 'evil.example:666', 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } },
        (res) => {
          let data = '';
          res.on('data', (c) => (data += c));
          res.on('end', () => resolve(JSON.parse(data)));
        },
      );
      req.on('error', reject);
      req.end(body);
    });
    assert.ok(json.data[0].url.startsWith(`${plain.url}/images/`), json.data[0].url);
  } finally {
    await plain.close();
  }
});

test('the access log never holds a whole signed URL: each request is logged with its signature redacted', async () => {
  const lines: any[] = [];
  const sink = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split('\n').filter(Boolean)) lines.push(JSON.parse(line));
      done();
    },
  });
  const t = await startTestServer({ logger: pino({ level: 'info' }, sink) });
  try {
    const url = await generateUrl(t.url);
    const signature = new URL(url).searchParams.get('signature')!;
    assert.equal(await statusOf(url), 200);
    assert.equal(await statusOf(url.replace(/signature=[^&]*/, 'signature=forged')), 403);
    await t.close();
    const text = JSON.stringify(lines);
    assert.ok(!text.includes(signature), 'the signature is in no log line');
    const incoming = lines.filter((l) => l.msg === 'incoming request' && String(l.req?.url).startsWith('/images/'));
    assert.equal(incoming.length, 2, 'both image fetches are logged');
    for (const l of incoming) {
      assert.match(l.req.url, /^\/images\/[0-9a-z]+_[0-9a-f]{48}\.png\?expires=\d+&signature=\[redacted\]$/);
      assert.equal(l.req.method, 'GET');
      assert.ok(l.reqId);
    }
    const completed = lines.filter((l) => l.msg === 'request completed');
    assert.deepEqual(completed.map((l) => l.res.statusCode).sort(), [200, 200, 403]);
    assert.ok(completed.every((l) => typeof l.responseTime === 'number'));
    assert.equal(redactUrl('/a?x=1&signature=abc&y=2#f'), '/a?x=1&signature=[redacted]&y=2#f');
  } finally {
    await t.close();
  }
});
