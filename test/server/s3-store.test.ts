/**
 * The server with `--store s3://BUCKET/PREFIX` against a real S3-compatible server (s3rver on
 * a loopback port): results go to the bucket, `url` responses are Kiln's own signed, expiring
 * URLs that any API host on the bucket (the URL secret is kept there) serves from it (tampered: 403, expired:
 * 410, as with the local store), `--s3-presigned-urls` gives presigned S3 URLs that expire, and
 * S3 unreachable is a 503 in OpenAI's envelope, after which the server works again.
 *
 * s3rver checks a presigned URL's expiry but not its signature: a tampered presigned URL is not
 * tested here (AWS, MinIO and R2 refuse it; s3rver would serve it).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { GetObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { createStore } from '../../src/store/index.js';
import { s3ClientConfig } from '../../src/store/s3.js';
import { startS3, type TestS3 } from '../store/s3rver.js';
import { envelope, getJson, postJson, startTestServer, type TestServer } from './helpers.js';

let s3: TestS3;
let raw: S3Client;

before(async () => {
  s3 = await startS3('kiln-images');
  raw = new S3Client(s3ClientConfig());
});
after(async () => {
  raw?.destroy();
  await s3?.close();
});

const PNG = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

/** A server as `kiln serve --store s3://BUCKET/PREFIX` makes it: the S3 store, and the URL secret kept in the bucket. */
async function s3Server(prefix: string, options: { ttlMs?: number; presigned?: boolean } = {}): Promise<TestServer> {
  const ttlMs = options.ttlMs ?? 60_000;
  const store = createStore(`s3://${s3.bucket}/${prefix}`, { ttlMs, presignedUrls: options.presigned });
  return startTestServer({ store, urlSecret: await store.urlSecret(), urlTtlMs: ttlMs });
}

async function generate(url: string, extra: Record<string, unknown> = {}) {
  return postJson(`${url}/v1/images/generations`, { prompt: 'a kiln', size: '256x256', steps: 1, ...extra });
}

async function generateUrl(url: string): Promise<string> {
  const r = await generate(url);
  assert.equal(r.status, 200, r.text);
  return r.json.data[0].url;
}

async function objectBytes(key: string): Promise<Buffer | undefined> {
  try {
    const res = await raw.send(new GetObjectCommand({ Bucket: s3.bucket, Key: key }));
    return Buffer.from(await res.Body!.transformToByteArray());
  } catch (err) {
    if ((err as { name?: string }).name === 'NoSuchKey') return undefined;
    throw err;
  }
}

async function keysUnder(prefix: string): Promise<string[]> {
  const res = await raw.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: prefix }));
  return (res.Contents ?? []).map((o) => o.Key!);
}

test('--store s3://bucket/prefix: the image is in the bucket, and any API host on the bucket serves its Kiln URL from there', async () => {
  const first = await s3Server('hosts/');
  // A second API host: its own home (no secret copied), the same bucket.
  const second = await s3Server('hosts/');
  // A host on another prefix has another secret: the URL is not valid there.
  const other = await s3Server('elsewhere/');
  try {
    assert.notEqual(first.home, second.home);
    assert.ok(!existsSync(join(first.home, 'secret')) && !existsSync(join(second.home, 'secret')), 'no secret in the homes');
    const url = await generateUrl(first.url);
    const u = new URL(url);
    assert.equal(u.origin, first.url, "Kiln's own URL, not the bucket's");
    const key = u.pathname.replace(/^\/images\//, '');
    assert.match(key, /^[0-9a-z]{7}_[0-9a-f]{48}\.png$/);
    assert.ok(u.searchParams.get('expires') && u.searchParams.get('signature'));

    const stored = await objectBytes(`hosts/images/${key}`);
    assert.ok(stored, 'the object is in the bucket under the prefix');
    assert.deepEqual(stored.subarray(0, 8), PNG);
    assert.ok(!existsSync(join(first.home, 'images')) || readdirSync(join(first.home, 'images')).length === 0, 'nothing on local disk');

    for (const host of [first, second]) {
      const res = await fetch(url.replace(first.url, host.url));
      assert.equal(res.status, 200);
      assert.equal(res.headers.get('content-type'), 'image/png');
      assert.match(res.headers.get('cache-control')!, /^private, max-age=\d+$/);
      assert.deepEqual(Buffer.from(await res.arrayBuffer()), stored, 'the bytes in the bucket, streamed by Kiln');
    }
    const refused = await fetch(url.replace(first.url, other.url));
    assert.equal(refused.status, 403);
    await refused.arrayBuffer();
  } finally {
    await first.close();
    await second.close();
    await other.close();
  }
});

test('S3 mode: a tampered Kiln URL is refused with 403 as with the local store; an unknown key with a valid signature is 404', async () => {
  const t = await s3Server('tamper/');
  try {
    const url = await generateUrl(t.url);
    const sig = new URL(url).searchParams.get('signature')!;
    const flip = (s: string) => (s[0] === 'A' ? 'B' : 'A') + s.slice(1);
    const tampered = [
      url.replace(`signature=${sig}`, `signature=${flip(sig)}`),
      url.replace(/expires=(\d+)/, (_, e) => `expires=${Number(e) + 3600}`),
      url.replace(/images\/([0-9a-z]+)_([0-9a-f])/, (_, a, b) => `images/${a}_${b === '0' ? '1' : '0'}`),
      url.replace(/&signature=.*$/, ''),
      url.replace(/expires=(\d+)/, 'expires=0$1'),
    ];
    for (const bad of tampered) {
      const res = await fetch(bad);
      assert.equal(res.status, 403, bad);
      assert.equal(envelope(await res.json()).code, 'invalid_signature');
    }
    // Correctly signed, but the object is gone (deleted behind Kiln's back): 404, as locally.
    const key = new URL(url).pathname.replace(/^\/images\//, '');
    await t.server.store.delete(key);
    const gone = await fetch(url);
    assert.equal(gone.status, 404);
    assert.equal(envelope(await gone.json()).code, 'not_found');
  } finally {
    await t.close();
  }
});

test('S3 mode, --url-ttl 2s: the Kiln URL works, then answers 410 and the object is deleted from the bucket', async () => {
  const t = await s3Server('expiry/', { ttlMs: 2000 });
  try {
    const url = await generateUrl(t.url);
    const key = new URL(url).pathname.replace(/^\/images\//, '');
    const expires = Number(new URL(url).searchParams.get('expires')) * 1000;
    const ok = await fetch(url);
    assert.equal(ok.status, 200);
    await ok.arrayBuffer();
    while (Date.now() <= expires) await sleep(200);
    const res = await fetch(url);
    assert.equal(res.status, 410);
    assert.equal(envelope(await res.json()).code, 'expired');
    assert.equal(await objectBytes(`expiry/images/${key}`), undefined, 'deleted from the bucket');
  } finally {
    await t.close();
  }
});

test('S3 mode: the sweeper deletes expired results nobody fetched', async () => {
  const t = await s3Server('sweep/', { ttlMs: 1000 });
  try {
    const url = await generateUrl(t.url);
    const key = `sweep/images/${new URL(url).pathname.replace(/^\/images\//, '')}`;
    assert.ok((await keysUnder('sweep/')).includes(key));
    // The sweeper runs every 2 s at this TTL; allow it many rounds on a loaded machine.
    for (let i = 0; i < 150 && (await keysUnder('sweep/')).includes(key); i++) await sleep(200);
    assert.ok(!(await keysUnder('sweep/')).includes(key), 'swept without being fetched');
  } finally {
    await t.close();
  }
});

test('--s3-presigned-urls: url is a presigned S3 GET URL for the same lifetime, and it expires', async () => {
  const t = await s3Server('presigned/', { ttlMs: 2000, presigned: true });
  try {
    const r = await generate(t.url);
    assert.equal(r.status, 200, r.text);
    const url: string = r.json.data[0].url;
    const u = new URL(url);
    assert.equal(u.origin, s3.endpoint, 'the bucket serves it, not Kiln');
    assert.match(u.pathname, new RegExp(`^/${s3.bucket}/presigned/images/[0-9a-z]{7}_[0-9a-f]{48}\\.png$`));
    assert.ok(u.searchParams.get('X-Amz-Signature'));
    const lifetime = Number(u.searchParams.get('X-Amz-Expires'));
    assert.ok(lifetime >= 1 && lifetime <= 3, `presigned for ${lifetime} s, the --url-ttl`);
    const stamp = /images\/([0-9a-z]{7})_/.exec(u.pathname)![1]!;
    assert.equal(r.json.kiln.expires_at, parseInt(stamp, 36), 'the object expires when the response says');

    const res = await fetch(url);
    assert.equal(res.status, 200);
    const bytes = Buffer.from(await res.arrayBuffer());
    assert.deepEqual(bytes.subarray(0, 8), PNG);

    const signedAt = Date.parse(u.searchParams.get('X-Amz-Date')!.replace(/^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/, '$1-$2-$3T$4:$5:$6Z'));
    while (Date.now() <= signedAt + lifetime * 1000 + 1000) await sleep(200);
    const expired = await fetch(url);
    assert.equal(expired.status, 403, 'S3 refuses the expired URL');
    assert.match(await expired.text(), /Request has expired/);
  } finally {
    await t.close();
  }
});

test('S3 unreachable: url requests and image fetches answer 503 in the envelope (a started stream: an error event); b64_json still works; all is well once S3 is back', async () => {
  const t = await s3Server('outage/');
  try {
    const url = await generateUrl(t.url);
    await s3.stop();
    try {
      const r = await generate(t.url);
      assert.equal(r.status, 503, r.text);
      const err = envelope(r.json);
      assert.equal(err.code, 'storage_unavailable');
      assert.equal(err.type, 'server_error');
      assert.match(err.message, /unavailable/);
      assert.equal(r.headers.get('retry-after'), '5');
      assert.equal(r.headers.get('x-should-retry'), 'true');

      const fetched = await getJson(url);
      assert.equal(fetched.status, 503);
      assert.equal(envelope(fetched.json).code, 'storage_unavailable');

      // A streamed request with url: the stream has started, so the failure is its last event.
      const streamed = await generate(t.url, { stream: true, partial_images: 1, steps: 2, response_format: 'url' });
      assert.equal(streamed.status, 200);
      const events = streamed.text.split('\n').filter((l) => l.startsWith('data: ')).map((l) => JSON.parse(l.slice(6)));
      assert.equal(events.at(-1)?.type, 'error', streamed.text.slice(0, 300));
      assert.equal(events.at(-1).error.code, 'storage_unavailable');

      const inline = await generate(t.url, { response_format: 'b64_json' });
      assert.equal(inline.status, 200, 'no store needed for an inline image');
      assert.equal((await getJson(`${t.url}/health`)).status, 200, 'the server is up');
    } finally {
      await s3.restart();
    }
    const again = await generateUrl(t.url);
    const res = await fetch(again);
    assert.equal(res.status, 200);
    assert.deepEqual(Buffer.from(await res.arrayBuffer()).subarray(0, 8), PNG);
    const old = await fetch(url);
    assert.equal(old.status, 200, 'the image stored before the outage is served again');
    await old.arrayBuffer();
  } finally {
    await t.close();
  }
});

test('a bucket that does not exist is a configuration fault: 500 internal_error (logged), not 503 or 404', async () => {
  const store = createStore('s3://no-such-bucket', { ttlMs: 60_000 });
  const t = await startTestServer({ store });
  try {
    const r = await generate(t.url);
    assert.equal(r.status, 500, r.text);
    assert.equal(envelope(r.json).code, 'internal_error');
    // A correctly signed URL for a key in that bucket: the fault again, not "no longer exists".
    const key = `${'1'.repeat(7)}_${'a'.repeat(48)}.png`;
    const { UrlSigner, loadOrCreateSecret } = await import('../../src/server/signing.js');
    const path = new UrlSigner(loadOrCreateSecret(join(t.home, 'secret'))).path(key, Date.now() + 60_000);
    const fetched = await getJson(`${t.url}${path}`);
    assert.equal(fetched.status, 500);
    assert.equal(envelope(fetched.json).code, 'internal_error');
  } finally {
    await t.close();
  }
});
