/**
 * The RESP client BullMQ runs on (src/queue/redis-client.ts), against a real redis-server:
 * binary values round-trip, MULTI/EXEC answers ioredis' [err, value] pairs, reply errors
 * reject, a lost connection fails commands at once (offlineQueue: false) and the client is back
 * by itself when Redis is; and the Redis URL rules of --queue.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { RespClient, ReplyError } from '../../src/queue/redis-client.js';
import { parseRedisUrl, RedisInputStore } from '../../src/queue/redis.js';
import { RedisServer, until } from './helpers.js';

let redis: RedisServer;
let client: RespClient;

before(async () => {
  redis = await RedisServer.start();
  client = new RespClient({ port: redis.port, offlineQueue: false });
  client.on('error', () => {});
  await client.connect();
});

after(async () => {
  await client?.quit();
  await redis?.close();
});

test('binary values round-trip; bulk strings decode as text unless Buffers are asked for', async () => {
  const bytes = Buffer.from([0, 255, 13, 10, 36, 42, 128, 1]);
  assert.equal(await client.set('bin', bytes), 'OK');
  assert.deepEqual(await client.call(['GET', 'bin'], { buffers: true }), bytes);
  await client.set('text', 'héllo');
  assert.equal(await client.get('text'), 'héllo');
  assert.equal(await client.get('missing'), null);
  assert.deepEqual(await client.hgetall('nothing'), {});
  await client.hset('h', { a: '1', b: 2 });
  assert.deepEqual(await client.hgetall('h'), { a: '1', b: '2' });
});

test('MULTI/EXEC gives [err, value] per command; a reply error rejects its command only', async () => {
  const results = await client.multi().hset('m', { x: '1' }).hgetall('m').llen('m').del('m').exec();
  assert.equal(results!.length, 4);
  assert.deepEqual(results![0], [null, 1]);
  assert.deepEqual(results![1], [null, { x: '1' }]);
  assert.ok(results![2]![0] instanceof ReplyError, 'LLEN on a hash is a WRONGTYPE error');
  assert.deepEqual(results![3], [null, 1]);
  await assert.rejects(client.call(['NOSUCHCOMMAND']), ReplyError);
  assert.equal(await client.call(['PING']), 'PONG');
});

test('scripts run by name (EVALSHA, falling back to EVAL when Redis does not know them)', async () => {
  client.defineCommand('addTwo', { numberOfKeys: 1, lua: "return redis.call('INCRBY', KEYS[1], 2)" });
  assert.equal(await client.runCommand('addTwo', ['counter']), 2);
  await client.call(['SCRIPT', 'FLUSH']);
  assert.equal(await client.runCommand('addTwo', [['counter']]), 4);
});

test('uploads in Redis: put, get, delete; unknown keys are undefined', async () => {
  const store = new RedisInputStore(client, 'unit');
  const key = await store.putInput(new Uint8Array([1, 2, 3]), { contentType: 'image/png', ttlMs: 60_000 });
  assert.deepEqual(await store.getInput(key), Buffer.from([1, 2, 3]));
  await store.deleteInput(key);
  assert.equal(await store.getInput(key), undefined);
  assert.equal(await store.getInput('../../etc/passwd'), undefined);
});

test('Redis gone: commands fail at once ("Connection is closed."); Redis back: the client reconnects', async () => {
  await redis.stop();
  await until(async () => (client.status !== 'ready' ? true : undefined), 'the client to see the connection closed');
  await assert.rejects(client.get('text'), /Connection is closed\./);
  await redis.start();
  await until(async () => (client.status === 'ready' ? true : undefined), 'the client to reconnect');
  assert.equal(await client.call(['PING']), 'PONG');
});

test('--queue URLs: redis://HOST:PORT[/DB] with an optional password; anything else is refused', () => {
  assert.deepEqual(parseRedisUrl('redis://10.0.0.5:6380/2'), { host: '10.0.0.5', port: 6380, db: 2 });
  assert.deepEqual(parseRedisUrl('redis://localhost'), { host: 'localhost', port: 6379, db: 0 });
  assert.deepEqual(parseRedisUrl('redis://:s%40cret@[::1]:7000'), { host: '::1', port: 7000, db: 0, password: 's@cret' });
  assert.throws(() => parseRedisUrl('http://localhost:6379'), /not a Redis URL/);
  assert.throws(() => parseRedisUrl('redis://localhost/x'), /must be a number/);
  assert.throws(() => parseRedisUrl('localhost:6379'), /not a Redis URL/);
});
