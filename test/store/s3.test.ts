/**
 * The S3 store against a real S3-compatible server (s3rver on a loopback port): what the local
 * disk store does (put/get/delete, unguessable keys checked before any request, expiry in the
 * key, a sweeper that deletes what expired, leftovers included), uploads by key, presigned URLs
 * that expire, and a store that cannot be reached answering StoreUnavailableError.
 *
 * s3rver checks a presigned URL's expiry but not its signature, so these tests cannot show a
 * tampered presigned URL refused, and do not claim to.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { GetObjectCommand, HeadObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { StoreUnavailableError } from '../../src/store/errors.js';
import { createStore } from '../../src/store/index.js';
import { isUnavailable, parseS3ImageKey, parseS3Url, s3ClientConfig, S3Store } from '../../src/store/s3.js';
import { closedPort, startS3, type TestS3 } from './s3rver.js';

let s3: TestS3;
let raw: S3Client;
const stores: S3Store[] = [];

before(async () => {
  s3 = await startS3();
  raw = new S3Client(s3ClientConfig());
});
after(async () => {
  for (const store of stores) await store.close();
  raw?.destroy();
  await s3?.close();
});

function makeStore(prefix: string, extra: Partial<ConstructorParameters<typeof S3Store>[0]> = {}): S3Store {
  const store = new S3Store({ bucket: s3.bucket, prefix, ...extra });
  stores.push(store);
  return store;
}

async function keysUnder(prefix: string): Promise<string[]> {
  const res = await raw.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: prefix }));
  return (res.Contents ?? []).map((o) => o.Key!).sort();
}

async function readAll(body: AsyncIterable<unknown>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of body) chunks.push(Buffer.from(chunk as Uint8Array));
  return Buffer.concat(chunks);
}

test('s3:// URLs: bucket and prefix; anything else is refused', () => {
  assert.deepEqual(parseS3Url('s3://my-bucket'), { bucket: 'my-bucket', prefix: '' });
  assert.deepEqual(parseS3Url('s3://my-bucket/'), { bucket: 'my-bucket', prefix: '' });
  assert.deepEqual(parseS3Url('s3://my.bucket/kiln/prod/'), { bucket: 'my.bucket', prefix: 'kiln/prod/' });
  assert.deepEqual(parseS3Url('s3://b12/a//b'), { bucket: 'b12', prefix: 'a/b/' });
  for (const bad of ['http://bucket', 's3://', 's3://ab', 's3://Upper', 's3://bucket/../x', 's3://bucket?x=1', 'bucket', 's3://-bucket']) {
    assert.equal(parseS3Url(bad), undefined, bad);
    assert.throws(() => createStore(bad, { ttlMs: 1000 }), /s3:\/\/BUCKET/, bad);
  }
  assert.throws(() => createStore('s3://bucket', { ttlMs: 8 * 24 * 3600_000, presignedUrls: true }), /7 days/);
});

test('the SDK reads AWS_ENDPOINT_URL_S3 itself; an endpoint means path-style addressing', () => {
  assert.equal(s3ClientConfig({}, {}).forcePathStyle, false, 'AWS itself: virtual-hosted buckets');
  assert.equal(s3ClientConfig({}, { AWS_ENDPOINT_URL_S3: 'http://127.0.0.1:9000' }).forcePathStyle, true);
  assert.equal(s3ClientConfig({}, { AWS_ENDPOINT_URL: 'http://minio:9000' }).forcePathStyle, true);
  // No endpoint is passed to the client: the stores of these tests reach s3rver through the environment alone.
  assert.equal(s3ClientConfig().endpoint, undefined);
});

test('put, get, delete: the bytes round-trip under <prefix>images/, the key carries the expiry', async () => {
  const store = makeStore('rt/');
  const bytes = Buffer.from('not really a png, but bytes');
  const before = Date.now();
  const image = await store.put(bytes, { contentType: 'image/png', ttlMs: 60_000 });
  assert.match(image.key, /^[0-9a-z]{7}_[0-9a-f]{48}\.png$/);
  assert.equal(image.size, bytes.length);
  assert.equal(image.contentType, 'image/png');
  assert.ok(image.expiresAt >= before + 60_000 && image.expiresAt <= Date.now() + 61_000, 'expiry: the TTL rounded up to a second');
  assert.equal(image.expiresAt % 1000, 0);
  assert.equal(parseS3ImageKey(image.key)?.expiresAt, image.expiresAt);
  assert.deepEqual(await keysUnder('rt/'), [`rt/images/${image.key}`]);
  const head = await raw.send(new HeadObjectCommand({ Bucket: s3.bucket, Key: `rt/images/${image.key}` }));
  assert.equal(head.ContentType, 'image/png');
  assert.equal(head.Metadata?.['kiln-expires'], String(image.expiresAt / 1000));

  const found = await store.get(image.key);
  assert.ok(found);
  assert.deepEqual(found.image, image);
  assert.deepEqual(await readAll(found.body), bytes);

  const jpeg = await store.put(Buffer.from('jpeg bytes'), { contentType: 'image/jpeg', ttlMs: 60_000 });
  assert.match(jpeg.key, /\.jpeg$/);
  assert.notEqual(jpeg.key.slice(8), image.key.slice(8), 'random part differs');
  await assert.rejects(store.put(bytes, { contentType: 'image/gif', ttlMs: 1000 }), /unsupported content type/);

  await store.delete(image.key);
  assert.equal(await store.get(image.key), undefined, 'deleted');
  assert.deepEqual(await keysUnder('rt/'), [`rt/images/${jpeg.key}`]);
  await store.delete(image.key); // twice: harmless
});

test('malformed keys are refused before any request (a store that cannot be reached answers them too)', async () => {
  const down = makeStore('', { client: { endpoint: `http://127.0.0.1:${await closedPort()}`, maxAttempts: 1 } });
  const good = `${'1'.repeat(7)}_${'a'.repeat(48)}.png`;
  for (const key of ['', 'x', '../secret', `../${good}`, `${good}/x`, good.toUpperCase(), good.replace('.png', '.gif'), `${'1'.repeat(6)}_${'a'.repeat(48)}.png`]) {
    assert.equal(await down.get(key), undefined, key);
    await down.delete(key);
    assert.equal(await down.getInput(key), undefined, key);
    await down.deleteInput(key);
  }
  // A well-formed key does make a request, and that one fails as unavailable.
  await assert.rejects(down.get(good), StoreUnavailableError);
  // An unknown well-formed key on a live store is simply not there.
  assert.equal(await makeStore('none/').get(good), undefined);
});

test('uploads by key: putInput / getInput / deleteInput under <prefix>inputs/, undefined once expired', async () => {
  const store = makeStore('in/');
  const bytes = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]);
  const key = await store.putInput(bytes, { contentType: 'image/png', ttlMs: 60_000 });
  assert.match(key, /^[0-9a-z]{7}_[0-9a-f]{48}$/);
  assert.deepEqual(await keysUnder('in/'), [`in/inputs/${key}`]);
  assert.deepEqual(await store.getInput(key), Buffer.from(bytes));
  await store.deleteInput(key);
  assert.equal(await store.getInput(key), undefined);

  const short = await store.putInput(bytes, { contentType: 'image/png', ttlMs: 1 });
  const expiresAt = parseInt(short.slice(0, 7), 36) * 1000;
  while (Date.now() < expiresAt) await sleep(100);
  assert.equal(await store.getInput(short), undefined, 'expired: gone even before the sweeper runs');
  assert.deepEqual(await keysUnder('in/'), [`in/inputs/${short}`], 'still in the bucket until swept');
});

test('sweep deletes what has expired (images and uploads, leftovers of any host) and nothing else', async () => {
  const store = makeStore('sw/');
  const soon = await store.put(Buffer.from('a'), { contentType: 'image/png', ttlMs: 1000 });
  const later = await store.put(Buffer.from('b'), { contentType: 'image/webp', ttlMs: 3_600_000 });
  const input = await store.putInput(Buffer.from('c'), { contentType: 'image/png', ttlMs: 1000 });
  const laterInput = await store.putInput(Buffer.from('d'), { contentType: 'image/png', ttlMs: 3_600_000 });
  // A leftover written by another host (or an earlier run) long ago, and objects that are not Kiln's.
  const old = `${(Math.floor(Date.now() / 1000) - 600).toString(36).padStart(7, '0')}_${'e'.repeat(48)}.png`;
  for (const key of [`sw/images/${old}`, 'sw/images/readme.txt', 'sw/other/0000001_x', 'elsewhere/images/' + old]) {
    await raw.send(new PutObjectCommand({ Bucket: s3.bucket, Key: key, Body: 'x' }));
  }
  assert.equal(await store.sweep(), 1, 'now: only the old leftover');
  assert.ok(!(await keysUnder('sw/')).includes(`sw/images/${old}`));

  // As seen a minute from now (no waiting): the short-lived image and upload have expired.
  assert.equal(await store.sweep(Date.now() + 60_000), 2);
  assert.deepEqual(await keysUnder('sw/'), [`sw/images/${later.key}`, `sw/images/readme.txt`, `sw/inputs/${laterInput}`, 'sw/other/0000001_x'].sort());
  assert.deepEqual(await keysUnder('elsewhere/'), [`elsewhere/images/${old}`], 'outside the prefix: untouched');
  assert.equal(await store.get(soon.key), undefined);
  assert.equal(await store.getInput(input), undefined);
  assert.ok(await store.get(later.key));
  assert.equal(await store.sweep(Date.now() + 60_000), 0, 'nothing left to do');
});

test('the started sweeper deletes expired objects by itself', async () => {
  const store = makeStore('auto/', { sweepIntervalMs: 200 }).start();
  const image = await store.put(Buffer.from('a'), { contentType: 'image/png', ttlMs: 1 });
  const key = `auto/images/${image.key}`;
  for (let i = 0; i < 100 && (await keysUnder('auto/')).includes(key); i++) await sleep(100);
  assert.deepEqual(await keysUnder('auto/'), [], 'swept without anyone asking');
});

test('the URL secret lives in the bucket: made once, read by every store on the prefix, never swept', async () => {
  const a = makeStore('sec/');
  const b = makeStore('sec/');
  const secret = await a.urlSecret();
  assert.equal(secret.length, 32);
  assert.deepEqual(await b.urlSecret(), secret, 'another host reads the same secret');
  assert.deepEqual(await a.urlSecret(), secret, 'and it stays');
  assert.deepEqual(await keysUnder('sec/'), ['sec/url-secret']);
  assert.equal(await a.sweep(Date.now() + 365 * 24 * 3600_000), 0);
  assert.deepEqual(await keysUnder('sec/'), ['sec/url-secret']);
  assert.notDeepEqual(await makeStore('sec2/').urlSecret(), secret, 'another prefix, another secret');
  await raw.send(new PutObjectCommand({ Bucket: s3.bucket, Key: 'sec3/url-secret', Body: 'short' }));
  await assert.rejects(makeStore('sec3/').urlSecret(), /does not hold a hex secret/);
});

/**
 * Hosts starting together: four stores on a fresh prefix ask for the secret at the same moment,
 * ten times over.
 *
 * s3rver ignores If-None-Match on PUT (node_modules/s3rver/lib/controllers/object.js checks it on
 * GET only), so what S3 guarantees with it cannot be shown here. What is shown: every store's
 * write carries `If-None-Match: *` (read off the request the SDK sends); the bucket always ends
 * with one whole secret, which every store asked again (a host restarting) reads; and in the
 * usual interleaving, where several of the writes land, the read-back still makes all four agree
 * at once (returning what each one sent would not). What s3rver also produces, and is counted,
 * not hidden: a store that reads back before another's write lands keeps its own secret (a split:
 * one round in a few hundred here), which only a store honouring If-None-Match (as S3 does) rules
 * out; and, s3rver writing objects in place, a read-back that overlaps a write and gets an empty
 * object (a torn read, about one round in a hundred, refused as not a hex secret; S3 never serves
 * a partial object). Not shown at all: the 412 and 409 answers, which s3rver never gives.
 */
test('the URL secret made by several stores at once: the read-back makes them agree on the one in the bucket', async () => {
  const rounds = { agreed: 0, split: 0, torn: 0 };
  for (let round = 0; round < 10; round++) {
    const prefix = `race${round}/`;
    const stores = [0, 1, 2, 3].map(() => makeStore(prefix));
    const writes: { ifNoneMatch: string | undefined; status: number | undefined }[] = [];
    for (const store of stores) {
      store.client.middlewareStack.add(
        (next) => async (args) => {
          const request = args.request as { method?: string; path?: string; headers?: Record<string, string> };
          if (request.method !== 'PUT' || !request.path?.endsWith('/url-secret')) return next(args);
          const write: (typeof writes)[number] = { ifNoneMatch: request.headers?.['if-none-match'], status: undefined };
          writes.push(write);
          try {
            const out = await next(args);
            write.status = (out.response as { statusCode?: number }).statusCode;
            return out;
          } catch (err) {
            write.status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
            throw err;
          }
        },
        { step: 'finalizeRequest', name: 'recordSecretWrites' },
      );
    }
    const answers = await Promise.allSettled(stores.map((store) => store.urlSecret()));
    const inBucket = await raw.send(new GetObjectCommand({ Bucket: s3.bucket, Key: `${prefix}url-secret` }));
    const text = (await inBucket.Body!.transformToString()).trim();
    assert.match(text, /^[0-9a-f]{64}$/, `round ${round}: the bucket holds one whole secret`);
    const stored = Buffer.from(text, 'hex');
    assert.deepEqual(await keysUnder(prefix), [`${prefix}url-secret`]);
    assert.ok(writes.length >= 1, `round ${round}: someone wrote it`);
    for (const w of writes) assert.equal(w.ifNoneMatch, '*', `round ${round}: the write is conditional`);
    for (const answer of answers) {
      if (answer.status === 'rejected') assert.match(String(answer.reason), /does not hold a hex secret/, `round ${round}: only a torn read fails a store`);
    }
    for (const [i, store] of stores.entries()) assert.deepEqual(await store.urlSecret(), stored, `round ${round}: store ${i} asked again`);
    if (answers.some((a) => a.status === 'rejected')) rounds.torn++;
    else if (answers.some((a) => a.status === 'fulfilled' && !a.value.equals(stored))) rounds.split++;
    else if (writes.filter((w) => w.status === 200).length > 1) rounds.agreed++;
  }
  // Rounds where several writes landed and all four stores still agreed: most of them (a split or
  // a torn read is rare; without the read-back every such round would split).
  assert.ok(rounds.agreed >= 5, `rounds: ${JSON.stringify(rounds)}`);
});

test('presigned URLs: only when asked; they serve the object, then expire (s3rver checks expiry, not the signature)', async () => {
  const plain = makeStore('ps/');
  const presigning = makeStore('ps/', { presignedUrls: true });
  const bytes = Buffer.from('presigned bytes');
  const image = await presigning.put(bytes, { contentType: 'image/png', ttlMs: 1000 });
  assert.equal(await plain.externalUrl(image), undefined, 'Kiln serves its own URL unless asked');
  const url = await presigning.externalUrl(image);
  assert.ok(url);
  const u = new URL(url);
  assert.equal(u.origin, s3.endpoint, 'path-style, on the configured endpoint');
  assert.equal(u.pathname, `/${s3.bucket}/ps/images/${image.key}`);
  const seconds = Number(u.searchParams.get('X-Amz-Expires'));
  assert.ok(seconds >= 1 && seconds <= 2, `lifetime ${seconds} s: what is left of the image's`);
  const res = await fetch(url);
  assert.equal(res.status, 200);
  assert.deepEqual(Buffer.from(await res.arrayBuffer()), bytes);
  assert.equal(res.headers.get('content-type'), 'image/png');

  const signedAt = Date.parse(u.searchParams.get('X-Amz-Date')!.replace(/^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/, '$1-$2-$3T$4:$5:$6Z'));
  while (Date.now() <= signedAt + seconds * 1000 + 1000) await sleep(200);
  const expired = await fetch(url);
  assert.equal(expired.status, 403);
  assert.match(await expired.text(), /Request has expired/);
});

test('a store that cannot be reached: put, get, uploads and sweep throw StoreUnavailableError; deletes do not throw', async () => {
  const errors: unknown[] = [];
  const down = makeStore('', { client: { endpoint: `http://127.0.0.1:${await closedPort()}`, maxAttempts: 2 }, onError: (e) => errors.push(e) });
  const err = await down.put(Buffer.from('x'), { contentType: 'image/png', ttlMs: 1000 }).catch((e: unknown) => e);
  assert.ok(err instanceof StoreUnavailableError, String(err));
  assert.match(err.message, /unavailable/);
  assert.ok(isUnavailable(err.cause), 'the cause is the network error');
  await assert.rejects(down.get(`${'1'.repeat(7)}_${'a'.repeat(48)}.png`), StoreUnavailableError);
  await assert.rejects(down.putInput(Buffer.from('x'), { contentType: 'image/png', ttlMs: 1000 }), StoreUnavailableError);
  await assert.rejects(down.getInput(`${'z'.repeat(7)}_${'a'.repeat(48)}`), StoreUnavailableError);
  await assert.rejects(down.sweep(), StoreUnavailableError);
  await down.delete(`${'1'.repeat(7)}_${'a'.repeat(48)}.png`);
  assert.equal(errors.length, 1, 'the failed delete is reported, not thrown');
  // Not every failure is an outage: a missing bucket is a configuration error (a 500, logged).
  const wrongBucket = makeStore('', { bucket: 'no-such-bucket' });
  const missing = await wrongBucket.put(Buffer.from('x'), { contentType: 'image/png', ttlMs: 1000 }).catch((e: unknown) => e);
  assert.ok(missing instanceof Error && !(missing instanceof StoreUnavailableError), String(missing));
});

test('an outage passes: the same store works again once S3 is back', async () => {
  const store = makeStore('back/', { client: { maxAttempts: 1 } });
  const image = await store.put(Buffer.from('before'), { contentType: 'image/png', ttlMs: 60_000 });
  await s3.stop();
  try {
    await assert.rejects(store.put(Buffer.from('during'), { contentType: 'image/png', ttlMs: 60_000 }), StoreUnavailableError);
    await assert.rejects(store.get(image.key), StoreUnavailableError);
  } finally {
    await s3.restart();
  }
  const found = await store.get(image.key);
  assert.ok(found, 'objects kept across the outage');
  assert.equal((await readAll(found.body)).toString(), 'before');
  const after = await store.put(Buffer.from('after'), { contentType: 'image/png', ttlMs: 60_000 });
  const res = await raw.send(new GetObjectCommand({ Bucket: s3.bucket, Key: `back/images/${after.key}` }));
  assert.equal(await res.Body!.transformToString(), 'after');
});
