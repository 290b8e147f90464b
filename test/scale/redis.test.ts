/**
 * The Redis pieces beside BullMQ, against a real redis-server: uploads by key (RedisInputStore)
 * and the --queue URL rules.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import type { Redis } from 'ioredis';
import { connect, parseRedisUrl, RedisInputStore } from '../../src/queue/redis.js';
import { RedisServer } from './helpers.js';

let server: RedisServer;
let redis: Redis;

before(async () => {
  server = await RedisServer.start();
  redis = connect(parseRedisUrl(server.url));
});

after(async () => {
  await redis?.quit();
  await server?.close();
});

test('uploads in Redis: binary bytes round-trip by key, then go; unknown or malformed keys are undefined', async () => {
  const store = new RedisInputStore(redis, 'unit');
  const bytes = new Uint8Array([0, 255, 13, 10, 36, 42, 128, 1]);
  const key = await store.putInput(bytes, { contentType: 'image/png', ttlMs: 60_000 });
  assert.deepEqual(await store.getInput(key), Buffer.from(bytes));
  const ttl = await redis.pttl(`kiln:unit:input:${key}`);
  assert.ok(ttl > 0 && ttl <= 60_000, `ttl ${ttl}`);
  await store.deleteInput(key);
  assert.equal(await store.getInput(key), undefined);
  assert.equal(await store.getInput('../../etc/passwd'), undefined);
});

test('--queue URLs: redis://HOST:PORT[/DB] with an optional password; anything else is refused', () => {
  assert.deepEqual(parseRedisUrl('redis://10.0.0.5:6380/2'), { host: '10.0.0.5', port: 6380, db: 2 });
  assert.deepEqual(parseRedisUrl('redis://localhost'), { host: 'localhost', port: 6379, db: 0 });
  assert.deepEqual(parseRedisUrl('redis://:s%40cret@[::1]:7000'), { host: '::1', port: 7000, db: 0, password: 's@cret' });
  assert.throws(() => parseRedisUrl('http://localhost:6379'), /not a Redis URL/);
  assert.throws(() => parseRedisUrl('redis://localhost/x'), /must be a number/);
  assert.throws(() => parseRedisUrl('localhost:6379'), /not a Redis URL/);
});
