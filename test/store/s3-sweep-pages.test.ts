/**
 * The S3 sweep over more than one page of a listing (ListObjectsV2 answers at most 1000 keys a
 * page; the sweep follows NextContinuationToken), against a real s3rver: more than a page of
 * expired images and a few live ones; one sweep deletes every expired one, across the page
 * boundary, and keeps the live ones.
 *
 * s3rver runs in its own process (startS3's `ownProcess`): it makes continuation tokens with DES,
 * which OpenSSL 3 refuses without the legacy provider. Its tokens then behave as S3's do for this
 * test: a token names the last key of its page and the next page starts after it, so deleting a
 * page's keys before asking for the next one skips nothing.
 *
 * The slow case of the store tests (a few seconds): over a thousand PutObject requests.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { s3ClientConfig, S3Store } from '../../src/store/s3.js';
import { startS3, type TestS3 } from './s3rver.js';

let s3: TestS3;
let raw: S3Client;
let store: S3Store;

before(async () => {
  s3 = await startS3('kiln-pages', { ownProcess: true });
  raw = new S3Client(s3ClientConfig());
  store = new S3Store({ bucket: s3.bucket, prefix: 'pages/' });
});
after(async () => {
  await store?.close();
  raw?.destroy();
  await s3?.close();
});

/** Every key under `prefix`, page after page (bounded). */
async function allKeys(prefix: string): Promise<string[]> {
  const keys: string[] = [];
  let token: string | undefined;
  for (let page = 0; page < 100; page++) {
    const res = await raw.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: prefix, ContinuationToken: token }));
    keys.push(...(res.Contents ?? []).map((o) => o.Key!));
    token = res.IsTruncated ? res.NextContinuationToken : undefined;
    if (!token) return keys.sort();
  }
  throw new Error(`more than 100 pages under ${prefix}`);
}

/** Runs `task(i)` for i < count, at most `width` at a time. */
async function bounded(count: number, width: number, task: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: width }, async () => {
    while (next < count) await task(next++);
  }));
}

test('sweep: more than a page of expired images goes, across the page boundary; the live ones stay', async () => {
  const EXPIRED = 1100;
  // Short-lived (1 s) and seen expired by a sweep "a minute from now"; the live ones last an hour.
  await bounded(EXPIRED, 16, async () => {
    await store.put(Buffer.from('x'), { contentType: 'image/png', ttlMs: 1000 });
  });
  const live = [];
  for (let i = 0; i < 3; i++) live.push(await store.put(Buffer.from('live'), { contentType: 'image/webp', ttlMs: 3_600_000 }));
  const liveKeys = live.map((image) => `pages/images/${image.key}`).sort();

  // The listing really is paged: the first page is full and says there is more.
  const first = await raw.send(new ListObjectsV2Command({ Bucket: s3.bucket, Prefix: 'pages/images/' }));
  assert.equal(first.KeyCount, 1000);
  assert.equal(first.IsTruncated, true);
  assert.equal((await allKeys('pages/')).length, EXPIRED + live.length);

  assert.equal(await store.sweep(Date.now() + 60_000), EXPIRED, 'every expired image, both pages');
  assert.deepEqual(await allKeys('pages/'), liveKeys, 'only the live images are left');
  for (const image of live) assert.ok(await store.get(image.key), image.key);
  assert.equal(await store.sweep(Date.now() + 60_000), 0, 'nothing left to do');
});
